//! What failbackd tells its operator about the clients it refuses or cuts off.
//!
//! failbackd serves a primary's data directory on a network port: a wrong token, a request
//! over a limit, a client that stops reading or never authenticates, are each worth a line
//! naming who (the peer's address), what (the call or the connection) and why. A flood of
//! such clients must not become a flood of lines: at most [`BURST`] at once and
//! [`PER_SECOND`] a second on average are written ([`LineLimiter`]); the lines held back are
//! counted and the count is told with the next line written, or, when the flood is over and
//! no line follows, by [`flush_every_second`] within a second.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use failback_common::ratelimit::LineLimiter;

use crate::metrics::{Metrics, Refusal};

/// Lines written at once before the limit applies.
pub const BURST: u64 = 20;
/// Lines written a second, on average, under a flood.
pub const PER_SECOND: u64 = 2;

/// Who sent a request: the peer's address and which of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The remote address, when the transport knows it.
    pub addr: Option<SocketAddr>,
    /// One connection of that address: a QUIC connection's id; 0 for TCP, whose address and
    /// port already name the connection.
    pub conn: u64,
}

impl Peer {
    /// An address whose connection is not known yet (a QUIC handshake).
    pub fn at(addr: SocketAddr) -> Peer {
        Peer::tcp(Some(addr))
    }

    pub fn tcp(addr: Option<SocketAddr>) -> Peer {
        Peer { addr, conn: 0 }
    }

    pub fn quic(addr: SocketAddr, conn: usize) -> Peer {
        Peer {
            addr: Some(addr),
            conn: conn as u64 + 1,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(a) => write!(f, "{a}")?,
            None => f.write_str("an unknown peer")?,
        }
        if self.conn != 0 {
            write!(f, " (QUIC connection {})", self.conn - 1)?;
        }
        Ok(())
    }
}

/// Where a line goes: its text, and its fields for a JSON log ([`crate::log`]).
type Sink = dyn Fn(&str, &[(&str, serde_json::Value)]) + Send + Sync;

/// The rate-limited log of refused and abusive clients.
pub struct Audit {
    origin: Instant,
    limiter: Mutex<LineLimiter>,
    sink: Box<Sink>,
    /// Where each refusal is counted by its reason, whether or not its line is written: the
    /// metrics of the server this log serves ([`Audit::count_into`]).
    metrics: std::sync::RwLock<std::sync::Arc<Metrics>>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Audit")
    }
}

impl Default for Audit {
    /// Writes to failbackd's log ([`crate::log`]), as warnings with the event and the peer
    /// as fields.
    fn default() -> Self {
        Audit::with_sink(Box::new(|line, fields| {
            crate::log::event(crate::log::Level::Warning, line, fields)
        }))
    }
}

impl Audit {
    /// An audit log writing its lines to `sink` (tests collect them).
    pub fn to(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Audit::with_sink(Box::new(move |line, _| sink(line)))
    }

    fn with_sink(sink: Box<Sink>) -> Self {
        Audit {
            origin: Instant::now(),
            limiter: Mutex::new(LineLimiter::new(PER_SECOND, BURST, 0)),
            sink,
            metrics: Default::default(),
        }
    }

    /// Counts refusals into `metrics` from now on. The servers call it with their
    /// [`crate::Config::metrics`], so an audit log set up apart from them counts there too.
    pub fn count_into(&self, metrics: std::sync::Arc<Metrics>) {
        *self.metrics.write().unwrap_or_else(|p| p.into_inner()) = metrics;
    }

    /// The metrics refusals are counted into.
    pub fn metrics(&self) -> std::sync::Arc<Metrics> {
        self.metrics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `peer` was refused `what` (a call, a connection) because of `why`, counted as `reason`.
    pub fn refused(&self, peer: &Peer, what: &str, reason: Refusal, why: &str) {
        self.metrics().refused(reason);
        self.line(
            "refused",
            peer,
            what,
            format_args!("refused {what} from {peer}: {why}"),
        );
    }

    /// `peer`'s `what` was ended by failbackd because of `why`, counted as `reason`.
    pub fn cut_off(&self, peer: &Peer, what: &str, reason: Refusal, why: &str) {
        self.metrics().refused(reason);
        self.line(
            "ended",
            peer,
            what,
            format_args!("ended {what} of {peer}: {why}"),
        );
    }

    /// Tells the count of lines held back when no later line has told it.
    pub fn flush(&self) {
        let held_back = crate::lock(&self.limiter).flush(self.now());
        if let Some(n) = held_back {
            (self.sink)(
                &format!(
                    "{n} more lines of refused or ended clients held back (at most \
                     {PER_SECOND} such lines a second are written)"
                ),
                &[("event", "held_back".into()), ("held_back", n.into())],
            );
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn line(&self, event: &str, peer: &Peer, what: &str, text: fmt::Arguments<'_>) {
        let now = self.now();
        let admitted = crate::lock(&self.limiter).admit(now);
        let Some(held_back) = admitted else { return };
        let mut fields = vec![("event", event.into()), ("what", what.into())];
        if let Some(a) = peer.addr {
            fields.push(("peer", a.to_string().into()));
        }
        if peer.conn != 0 {
            fields.push(("quic_connection", (peer.conn - 1).into()));
        }
        if held_back == 0 {
            (self.sink)(&text.to_string(), &fields);
        } else {
            fields.push(("held_back", held_back.into()));
            (self.sink)(
                &format!("{text} ({held_back} more such lines held back)"),
                &fields,
            );
        }
    }
}

/// Flushes `audit` every second for as long as the returned guard lives (a server holds it
/// while it serves); the count of a flood's last held-back lines is told within a second.
pub fn flush_every_second(audit: std::sync::Arc<Audit>) -> FlushGuard {
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            audit.flush();
        }
    });
    FlushGuard(task)
}

/// Stops the flushing task of [`flush_every_second`] when dropped.
pub struct FlushGuard(tokio::task::JoinHandle<()>);

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_flood_writes_the_burst_and_names_the_peer() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let audit = Audit::to(move |l| l2.lock().unwrap().push(l.to_string()));
        let peer = Peer::quic("192.0.2.7:4433".parse().unwrap(), 3);
        for _ in 0..1000 {
            audit.refused(
                &peer,
                "ReadRanges",
                Refusal::Token,
                "missing or wrong bearer token",
            );
        }
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len() as u64, BURST, "{lines:?}");
        // Every refusal is counted, written or held back.
        let counted = audit.metrics().snapshot().refusals[Refusal::Token as usize];
        assert_eq!(counted, 1000);
        assert_eq!(
            lines[0],
            "refused ReadRanges from 192.0.2.7:4433 (QUIC connection 3): missing or wrong \
             bearer token"
        );
        assert_eq!(Peer::tcp(None).to_string(), "an unknown peer");
    }

    #[test]
    fn the_count_is_told_after_a_flood_that_ends() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let audit = Audit::to(move |l| l2.lock().unwrap().push(l.to_string()));
        let peer = Peer::tcp(Some("192.0.2.8:5000".parse().unwrap()));
        for _ in 0..BURST + 7 {
            audit.cut_off(&peer, "its connection", Refusal::Stalled, "stopped reading");
        }
        std::thread::sleep(std::time::Duration::from_millis(600));
        audit.flush();
        audit.flush();
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len() as u64, BURST + 1, "{lines:?}");
        assert_eq!(
            lines.last().unwrap(),
            "7 more lines of refused or ended clients held back (at most 2 such lines a second \
             are written)"
        );
    }
}
