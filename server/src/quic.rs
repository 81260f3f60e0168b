//! failbackd over QUIC (quinn), beside gRPC, carrying the same prost messages.
//!
//! QUIC gives each call its own stream inside one connection, so a lost packet stalls only
//! the stream it belongs to (HTTP/2 over TCP stalls every call behind it). A call is framed as
//! [`failback_transport::frame`] describes. The answers come from the very [`Failback`]
//! implementation the gRPC server runs, and the token from the same [`TokenCheck`]. QUIC
//! always runs TLS 1.3 ([`failback_transport::tls`]), with optional client certificates.
//!
//! **Nothing is spent on a client before it authenticates**, beyond a small fixed amount:
//!
//! - A request's token comes first: prost writes fields in field-number order and
//!   `QuicRequest.token` is field 1, so a frame starts with its length, the token's tag (0x0A),
//!   the token's length and the token. When a token is required, only that head is read
//!   (at most [`MAX_TOKEN`] bytes of token) and checked before anything else of the request is
//!   read or decoded; a request that does not start with the right token is refused as
//!   unauthenticated and its stream stopped. Every request is checked so, not only the first.
//! - A connection is authenticated by its first request with the right token, or by its
//!   handshake when no token is required (client certificates, `--client-ca`, are checked by
//!   TLS during the handshake). Until then the client may send it only
//!   [`PENDING_WINDOW`] bytes and open [`PENDING_STREAMS`] streams (QUIC's flow control), and
//!   it has [`QuicLimits::auth_timeout`] after its handshake (itself bounded by
//!   [`QuicLimits::handshake_timeout`]) to authenticate, or it is closed; a connection from the
//!   address (the very UDP socket) of an authenticated connection is given more time, as
//!   failback opens its `--connections` at once and first uses the others for its reads.
//! - [`QuicLimits::max_connections`] counts authenticated connections; a connection
//!   authenticating when they are all taken is closed with a reason the client shows. Those
//!   still in their handshake or not yet authenticated are as many at most, apart: a new one
//!   makes the oldest give way (one with no authenticated sibling first), so idle
//!   connections cannot lock a real client out; while they are that many, a client must first
//!   prove its address (a QUIC Retry), so spoofed packets cannot make them give way. Without
//!   a token, where the handshake authenticates, a connection reserves its slot as it comes
//!   (proving its address first once half the slots are taken), and one past the limit is
//!   refused at once.
//! - failbackd sends no keep-alives: the client sends its own while it wants the connection,
//!   and a connection left idle ends at the idle timeout.
//!
//! Limits: a request larger than [`QuicLimits::max_request`] is refused on its stream, and so
//! is a request that does not decode; an authenticated connection may open at most
//! [`QuicLimits::max_streams_per_connection`] streams at once (QUIC's own stream credit, so an
//! over-eager client waits rather than fails). None of that stops the server, and every
//! refusal is told to the audit log ([`crate::audit`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failback_proto::v1::failback_server::Failback;
use failback_proto::v1::{QuicReply, QuicRequest, quic_reply, quic_request};
use failback_transport::frame::{status_reply, write_frame};
use failback_transport::tls::server_tls;
use failback_transport::tune::{self, ServerReceive, server_transport_config};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Status};

use crate::audit::{Audit, Peer};
use crate::metrics::{Metered, Metrics, Refusal, Transport};
use crate::service::{FailbackService, TokenCheck};
use crate::{Config, ServeError, lock};

/// How long a client may take to send its request once it opened a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest token read before it is checked; a longer one is refused unread.
pub const MAX_TOKEN: usize = 1024;
/// Streams a connection may open at once before it has authenticated.
pub const PENDING_STREAMS: u32 = 16;
/// Bytes a connection may send before it has authenticated (its connection receive window):
/// the heads of its first requests, and failback's first requests whole.
pub const PENDING_WINDOW: u32 = 64 << 10;
/// What a connection may send on one stream before it is read: a request of the largest size
/// (and its frame) crosses in one window, and a request is read as it arrives.
fn stream_window(limits: &QuicLimits, window: u32) -> u32 {
    let request = u32::try_from(limits.max_request + 16).unwrap_or(u32::MAX);
    request.clamp(PENDING_WINDOW, window.max(PENDING_WINDOW))
}
/// An authenticated connection's receive window: four requests' worth in flight, as gRPC's.
fn connection_window(stream: u32) -> u32 {
    stream.saturating_mul(4)
}

/// Application error codes: a stream stopped because its request is refused, and why a
/// connection was closed.
const STOP_REFUSED: u32 = 1;
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_BUSY: u32 = 2;
const CLOSE_NO_AUTH: u32 = 3;
const CLOSE_GAVE_WAY: u32 = 4;

const A_CONNECTION: &str = "a QUIC connection";
const A_REQUEST: &str = "a QUIC request";

/// Limits of the QUIC listener.
#[derive(Clone, Debug)]
pub struct QuicLimits {
    /// The largest request (`QuicRequest`) accepted, in bytes.
    pub max_request: usize,
    /// Streams (calls) an authenticated connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Authenticated connections served at once; one authenticating past them is closed. As
    /// many again may be in their handshake or not yet authenticated, the oldest giving way.
    pub max_connections: usize,
    /// Bytes a new connection may have in flight before its first acknowledgement
    /// ([`DEFAULT_INITIAL_WINDOW`](failback_transport::tune::DEFAULT_INITIAL_WINDOW)).
    pub initial_window: u64,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long a connection may take after its handshake to send a request with the right
    /// token.
    pub auth_timeout: Duration,
}

/// [`QuicLimits::handshake_timeout`] by default: a handshake is a round trip or two.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// [`QuicLimits::auth_timeout`] by default: failback sends its first request at once.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_request: failback_proto::limits::MAX_REQUEST,
            // The client keeps at most 256 reads (--jobs) plus a few small calls in flight.
            max_streams_per_connection: 300,
            max_connections: 64,
            initial_window: tune::DEFAULT_INITIAL_WINDOW,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            auth_timeout: AUTH_TIMEOUT,
        }
    }
}

/// A request as it arrived on a stream: exactly one frame, nothing after it.
fn decode_request(bytes: &[u8]) -> Result<QuicRequest, Status> {
    let mut rest = bytes;
    let len = prost::decode_length_delimiter(&mut rest)
        .map_err(|e| Status::invalid_argument(format!("malformed request frame: {e}")))?;
    if rest.len() != len {
        return Err(Status::invalid_argument(format!(
            "malformed request frame: it announces {len} bytes and carries {}",
            rest.len()
        )));
    }
    QuicRequest::decode(rest)
        .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
}

/// Serves `config.pgdata` over QUIC on `socket` until `shutdown` completes.
pub async fn serve_quic(
    socket: std::net::UdpSocket,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.check()?;
    let svc = Metered::new(FailbackService::for_config(&config), config.metrics.clone());
    serve_quic_with(socket, svc, &config, shutdown).await
}

/// Serves any [`Failback`] implementation over QUIC with `config`'s TLS, token, window and
/// limits (its data directory and chunk size are the service's business).
pub async fn serve_quic_with<S: Failback>(
    socket: std::net::UdpSocket,
    svc: S,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Some((cert, key)) = &config.tls else {
        return Err(ServeError::QuicWithoutTls);
    };
    let tls = server_tls(cert, key, config.client_ca.as_deref())
        .map_err(|e| ServeError::QuicTls(e.to_string()))?;
    let limits = config.quic.clone();
    let _flush = crate::audit::flush_every_second(config.audit.clone());
    config.audit.count_into(config.metrics.clone());
    let stream = stream_window(&limits, config.window);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
    server.transport_config(Arc::new(server_transport_config(
        config.window,
        ServerReceive {
            stream,
            connection: PENDING_WINDOW,
            streams: PENDING_STREAMS.min(limits.max_streams_per_connection),
        },
        limits.initial_window,
    )));
    let endpoint = tune::endpoint(socket, Some(server)).map_err(ServeError::QuicSocket)?;
    let svc = Arc::new(svc);
    let doors = Arc::new(Doors {
        token: TokenCheck::new(config.token.clone()),
        audit: config.audit.clone(),
        metrics: config.metrics.clone(),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        admission: Mutex::default(),
        window: connection_window(stream),
        limits,
        drain: config.drain.clone(),
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = &mut shutdown => break,
            // Shutdown begun by the other transport, or by failbackd itself.
            () = doors.drain.stopping() => break,
        };
        let Some(incoming) = incoming else {
            doors.drain.begin();
            break;
        };
        let early = Peer::at(incoming.remote_address());
        if doors.under_pressure() && !incoming.remote_address_validated() && incoming.may_retry() {
            // Only a client that proved it receives at its address may make a pending
            // connection give way, or reserve a slot for its handshake.
            let _ = incoming.retry();
            continue;
        }
        let reserved = if doors.token.required() {
            None
        } else {
            // Without a token the handshake authenticates: no slot, no handshake (refused at
            // once, as QUIC can say nothing more before a handshake).
            match doors.slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    doors.audit.refused(
                        &early,
                        A_CONNECTION,
                        Refusal::ConnectionLimit,
                        &doors.busy(),
                    );
                    incoming.refuse();
                    continue;
                }
            }
        };
        tokio::spawn(connection(doors.clone(), svc.clone(), incoming, reserved));
    }
    doors.drain.begin();
    // QUIC has no GOAWAY: until the replies in flight are done (or the shutdown timeout is
    // up), new connections are refused here and new streams by their connection's task.
    let drained = async {
        let mut finished = std::pin::pin!(doors.drain.finished());
        loop {
            tokio::select! {
                () = &mut finished => break,
                i = endpoint.accept() => match i {
                    Some(i) => i.refuse(),
                    None => break,
                },
            }
        }
    };
    let _ = tokio::time::timeout(config.shutdown_timeout, drained).await;
    // Any code but the refusals' makes the client connect again (and retry), failbackd's
    // restart being what it waits for.
    endpoint.close(
        quinn::VarInt::from_u32(CLOSE_SHUTDOWN),
        b"failbackd is shutting down",
    );
    // The close is a packet or two to each client; a client that does not acknowledge it is
    // not waited for long.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    Ok(())
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In its handshake, or not yet authenticated.
    Pending,
    /// A request carried the right token (or none is needed): it holds a slot.
    Authenticated,
    /// Not yet authenticated, it gave way to a newer connection.
    GaveWay,
    /// It authenticated when every slot was taken.
    Busy,
    /// Ended.
    Closed,
}

/// One connection's way in. Its phase changes only under [`Doors::admission`]'s lock.
struct Gate {
    id: u64,
    addr: SocketAddr,
    phase: watch::Sender<Phase>,
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

/// The connections waiting to authenticate and those served.
#[derive(Default)]
struct Admission {
    next: u64,
    /// In their handshake or not yet authenticated, oldest first.
    pending: BTreeMap<u64, Arc<Gate>>,
    /// Authenticated connections by the client's address (IP and port: one UDP socket).
    served: HashMap<SocketAddr, usize>,
}

/// Who comes in, and how many.
struct Doors {
    token: TokenCheck,
    limits: QuicLimits,
    audit: Arc<Audit>,
    /// Where connections and requests refused before they are read are counted.
    metrics: Arc<Metrics>,
    /// One per authenticated connection.
    slots: Arc<Semaphore>,
    admission: Mutex<Admission>,
    /// An authenticated connection's receive window.
    window: u32,
    /// Shutdown, and the replies in flight.
    drain: Arc<crate::shutdown::Drain>,
}

impl Doors {
    fn busy(&self) -> String {
        format!(
            "failbackd serves {} QUIC connections already; try again later or raise \
             --quic-max-connections",
            self.limits.max_connections
        )
    }

    /// Whether a new connection would make a pending one give way (with a token), or half the
    /// slots are taken (without one, where a handshake reserves a slot).
    fn under_pressure(&self) -> bool {
        let max = self.limits.max_connections;
        if self.token.required() {
            lock(&self.admission).pending.len() >= max
        } else {
            self.slots.available_permits() * 2 <= max
        }
    }

    /// Lets a new connection from `addr` in among those waiting to authenticate; when they are
    /// as many as allowed, the oldest with no authenticated sibling (else the oldest) gives way.
    fn admit(&self, addr: SocketAddr) -> Arc<Gate> {
        let mut a = lock(&self.admission);
        while a.pending.len() >= self.limits.max_connections {
            let oldest = a
                .pending
                .values()
                .find(|g| !a.served.contains_key(&g.addr))
                .or_else(|| a.pending.values().next())
                .map(|g| g.id);
            let Some(gate) = oldest.and_then(|id| a.pending.remove(&id)) else {
                break;
            };
            gate.phase.send_if_modified(|p| {
                let pending = *p == Phase::Pending;
                if pending {
                    *p = Phase::GaveWay;
                }
                pending
            });
        }
        let id = a.next;
        a.next += 1;
        let gate = Arc::new(Gate {
            id,
            addr,
            phase: watch::Sender::new(Phase::Pending),
            slot: Mutex::new(None),
        });
        a.pending.insert(id, gate.clone());
        gate
    }

    /// `gate`'s connection presented the right token, or needs none: it takes a slot (the one
    /// `reserved` for it, if any), and may send as an authenticated connection. `false` when
    /// it cannot be served (every slot taken, or it gave way meanwhile): it is then closed.
    fn authenticate(
        &self,
        gate: &Gate,
        conn: &quinn::Connection,
        reserved: Option<OwnedSemaphorePermit>,
    ) -> bool {
        let mut a = lock(&self.admission);
        let phase = *gate.phase.borrow();
        match phase {
            Phase::Authenticated => return true,
            Phase::Pending => {}
            Phase::GaveWay | Phase::Busy | Phase::Closed => return false,
        }
        let Some(permit) = reserved.or_else(|| self.slots.clone().try_acquire_owned().ok()) else {
            gate.phase.send_replace(Phase::Busy);
            return false;
        };
        *lock(&gate.slot) = Some(permit);
        gate.phase.send_replace(Phase::Authenticated);
        a.pending.remove(&gate.id);
        *a.served.entry(gate.addr).or_default() += 1;
        drop(a);
        conn.set_receive_window(quinn::VarInt::from_u32(self.window));
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(
            self.limits.max_streams_per_connection,
        ));
        true
    }

    /// Closes a connection that gave way or came past the limit, telling the client why (once,
    /// whoever sees it first: its connection task or the stream that authenticated it).
    fn shut(&self, conn: &quinn::Connection, peer: &Peer, phase: Phase) {
        if conn.close_reason().is_some() {
            return;
        }
        match phase {
            Phase::GaveWay => {
                conn.close(
                    quinn::VarInt::from_u32(CLOSE_GAVE_WAY),
                    b"failbackd: too many connections waiting to authenticate",
                );
                self.audit
                    .cut_off(peer, A_CONNECTION, Refusal::GaveWay, GAVE_WAY);
            }
            Phase::Busy => {
                let why = self.busy();
                conn.close(quinn::VarInt::from_u32(CLOSE_BUSY), why.as_bytes());
                self.audit
                    .refused(peer, A_CONNECTION, Refusal::ConnectionLimit, &why);
            }
            Phase::Pending | Phase::Authenticated | Phase::Closed => {}
        }
    }

    /// Whether an authenticated connection comes from `addr` (the same client socket).
    fn has_sibling(&self, addr: SocketAddr) -> bool {
        lock(&self.admission).served.contains_key(&addr)
    }

    /// `gate`'s connection ended: its place and its slot are free.
    fn release(&self, gate: &Gate) {
        let mut a = lock(&self.admission);
        a.pending.remove(&gate.id);
        let authenticated = *gate.phase.borrow() == Phase::Authenticated;
        if authenticated && let Some(n) = a.served.get_mut(&gate.addr) {
            *n -= 1;
            if *n == 0 {
                a.served.remove(&gate.addr);
            }
        }
        gate.phase.send_replace(Phase::Closed);
        lock(&gate.slot).take();
    }
}

/// Releases a gate however its connection task ends.
struct Release<'a>(&'a Doors, &'a Gate);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

const GAVE_WAY: &str =
    "not authenticated, it was the oldest of the connections waiting to, and a new one came";

/// One connection, from its handshake to its end.
///
/// Without a token the handshake authenticates, and its slot is `reserved` from the start (so
/// a client that saw its handshake complete is served, as is every connection it opens
/// after); with a token, the slot is taken by the first request that carries it.
async fn connection<S: Failback>(
    doors: Arc<Doors>,
    svc: Arc<S>,
    incoming: quinn::Incoming,
    reserved: Option<OwnedSemaphorePermit>,
) {
    let addr = incoming.remote_address();
    let early = Peer::at(addr);
    let gate = doors.admit(addr);
    let _release = Release(&doors, &gate);
    let mut phase = gate.phase.subscribe();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            doors
                .audit
                .refused(&early, A_CONNECTION, Refusal::Handshake, &e.to_string());
            return;
        }
    };
    let limit = doors.limits.handshake_timeout;
    // A handshake that fails (wrong CA, no client certificate, wrong ALPN), takes too long or
    // gives way ends here; dropping it closes the connection.
    let handshake = tokio::select! {
        r = tokio::time::timeout(limit, connecting) => r,
        _ = phase.wait_for(|p| *p != Phase::Pending) => {
            doors
                .audit
                .cut_off(&early, "a QUIC handshake", Refusal::GaveWay, GAVE_WAY);
            return;
        }
    };
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            doors.audit.refused(
                &early,
                A_CONNECTION,
                Refusal::Handshake,
                &format!("TLS handshake failed: {e}"),
            );
            return;
        }
        Err(_) => {
            let why = format!("no TLS handshake within {} s", limit.as_secs_f64());
            doors
                .audit
                .refused(&early, A_CONNECTION, Refusal::HandshakeTimeout, &why);
            return;
        }
    };
    let peer = Peer::quic(conn.remote_address(), conn.stable_id());
    let _connected = doors.metrics.connection(Transport::Quic);
    if !doors.token.required() {
        // Nothing to check beyond TLS (and its client certificate, if asked for).
        doors.authenticate(&gate, &conn, reserved);
    }
    let auth_timeout = doors.limits.auth_timeout;
    let mut deadline = std::pin::pin!(tokio::time::sleep(auth_timeout));
    loop {
        let now = *phase.borrow_and_update();
        match now {
            Phase::Pending | Phase::Authenticated => {}
            Phase::GaveWay | Phase::Busy => {
                doors.shut(&conn, &peer, now);
                break;
            }
            Phase::Closed => break,
        }
        tokio::select! {
            s = conn.accept_bi() => {
                let Ok((send, recv)) = s else { break };
                if doors.drain.is_stopping() {
                    tokio::spawn(refuse_while_stopping(send, recv));
                    continue;
                }
                let (doors, svc, gate, conn) =
                    (doors.clone(), svc.clone(), gate.clone(), conn.clone());
                tokio::spawn(async move {
                    serve_stream(&doors, &*svc, &conn, &gate, peer, send, recv).await;
                });
            }
            _ = phase.changed() => {}
            () = &mut deadline, if now == Phase::Pending => {
                if doors.has_sibling(addr) {
                    // failback's other connections, opened with the first, wait for reads.
                    deadline.as_mut().reset(tokio::time::Instant::now() + auth_timeout);
                    continue;
                }
                let why = format!(
                    "no request with the right token within {} s of its handshake",
                    auth_timeout.as_secs_f64()
                );
                let reason = format!("failbackd: {why}");
                conn.close(quinn::VarInt::from_u32(CLOSE_NO_AUTH), reason.as_bytes());
                doors
                    .audit
                    .cut_off(&peer, A_CONNECTION, Refusal::AuthTimeout, &why);
                break;
            }
        }
    }
}

/// Why a call ended early.
enum Failure {
    /// Answered with this status.
    Status(Status),
    /// The client went away; nobody to tell.
    Gone,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Status(s)
    }
}

async fn serve_stream<S: Failback>(
    doors: &Doors,
    svc: &S,
    conn: &quinn::Connection,
    gate: &Gate,
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        read_request(doors, conn, gate, &peer, &mut recv),
    )
    .await;
    // A reply is in flight from its request's arrival to the client's receipt of its end; a
    // request still arriving holds no shutdown up (a client sending nothing would).
    let mut in_flight = None;
    let outcome = match read {
        Err(_) => {
            let why = format!("no complete request within {} s", REQUEST_TIMEOUT.as_secs());
            let _ = recv.stop(quinn::VarInt::from_u32(STOP_REFUSED));
            doors
                .audit
                .cut_off(&peer, A_REQUEST, Refusal::RequestTimeout, &why);
            Err(unread(doors, Status::deadline_exceeded(why)))
        }
        Ok(Err(Failure::Status(s))) => Err(unread(doors, s)),
        Ok(Err(f)) => Err(f),
        Ok(Ok(_)) if doors.drain.is_stopping() => Err(Failure::Status(Status::unavailable(
            crate::shutdown::SHUTTING_DOWN,
        ))),
        Ok(Ok(req)) => {
            in_flight = Some(doors.drain.reply());
            answer(svc, doors, peer, req, &mut send).await
        }
    };
    if let Err(Failure::Status(s)) = outcome {
        let _ = write_frame(&mut send, &status_reply(&s)).await;
    }
    let _ = send.finish();
    // Finishing only queues the end of the stream: wait until the client has it (or is gone),
    // so the connection is not torn down under the last reply.
    let _ = send.stopped().await;
    drop(in_flight);
}

/// A stream opened once shutdown began: refused unread with `UNAVAILABLE`, which the client
/// retries on a new connection.
async fn refuse_while_stopping(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let _ = recv.stop(quinn::VarInt::from_u32(STOP_REFUSED));
    let refusal = status_reply(&Status::unavailable(crate::shutdown::SHUTTING_DOWN));
    let _ = write_frame(&mut send, &refusal).await;
    let _ = send.finish();
}

/// A request answered `s` before its call was read (or reached the service, which counts
/// the others): counted with `kind="unknown"`.
fn unread(doors: &Doors, s: Status) -> Failure {
    doors.metrics.unread_request(Transport::Quic, s.code());
    Failure::Status(s)
}

/// Refuses a request on its stream for `reason`: the client is told to stop sending it, the
/// audit log hears of it, and `status` is the answer.
fn refuse(
    doors: &Doors,
    peer: &Peer,
    recv: &mut quinn::RecvStream,
    reason: Refusal,
    why: &str,
    status: Status,
) -> Failure {
    let _ = recv.stop(quinn::VarInt::from_u32(STOP_REFUSED));
    doors.audit.refused(peer, A_REQUEST, reason, why);
    Failure::Status(status)
}

/// Reads a stream's request. With a token required, only its head is read until the token in
/// it has been checked (and the connection authenticated by it); then the rest.
async fn read_request(
    doors: &Doors,
    conn: &quinn::Connection,
    gate: &Gate,
    peer: &Peer,
    recv: &mut quinn::RecvStream,
) -> Result<QuicRequest, Failure> {
    let max_request = doors.limits.max_request;
    let mut head = Vec::new();
    if doors.token.required() {
        let unauthenticated = || doors.token.check(None).unwrap_err();
        let (len, token) = match read_head(recv, &mut head).await? {
            Ok(h) => h,
            Err(why) => {
                let why = format!("missing or wrong bearer token ({why})");
                return Err(refuse(
                    doors,
                    peer,
                    recv,
                    Refusal::Token,
                    &why,
                    unauthenticated(),
                ));
            }
        };
        if let Err(s) = doors.token.check(Some(&token)) {
            let why = s.message().to_string();
            return Err(refuse(doors, peer, recv, Refusal::Token, &why, s));
        }
        if !doors.authenticate(gate, conn, None) {
            // Closed here, before this stream could end without an answer: the client's call
            // fails with the connection's reason.
            doors.shut(conn, peer, *gate.phase.borrow());
            return Err(Failure::Gone);
        }
        if len > max_request as u64 {
            let why = format!("a request of {len} bytes is over the limit of {max_request}");
            return Err(refuse(
                doors,
                peer,
                recv,
                Refusal::OverLimit,
                &why,
                Status::resource_exhausted(&why),
            ));
        }
    }
    // The frame's varint length takes at most 10 bytes.
    match recv
        .read_to_end((max_request + 10).saturating_sub(head.len()))
        .await
    {
        Ok(rest) => {
            head.extend_from_slice(&rest);
            decode_request(&head).map_err(|s| {
                doors
                    .audit
                    .refused(peer, A_REQUEST, Refusal::Malformed, s.message());
                Failure::Status(s)
            })
        }
        Err(quinn::ReadToEndError::TooLong) => {
            let why = format!("request over the limit of {max_request} bytes");
            Err(refuse(
                doors,
                peer,
                recv,
                Refusal::OverLimit,
                &why,
                Status::resource_exhausted(&why),
            ))
        }
        Err(_) => Err(Failure::Gone),
    }
}

/// One byte of a stream's head, kept in `head`; `None` when the stream ended.
async fn head_byte(
    recv: &mut quinn::RecvStream,
    head: &mut Vec<u8>,
) -> Result<Option<u8>, Failure> {
    let mut b = [0u8];
    match recv.read_exact(&mut b).await {
        Ok(()) => {
            head.push(b[0]);
            Ok(Some(b[0]))
        }
        Err(quinn::ReadExactError::FinishedEarly(_)) => Ok(None),
        Err(quinn::ReadExactError::ReadError(_)) => Err(Failure::Gone),
    }
}

/// A protobuf varint of a stream's head; `None` when the stream ended inside it or it is not
/// one (more than 10 bytes).
async fn head_varint(
    recv: &mut quinn::RecvStream,
    head: &mut Vec<u8>,
) -> Result<Option<u64>, Failure> {
    let start = head.len();
    for _ in 0..10 {
        let Some(b) = head_byte(recv, head).await? else {
            return Ok(None);
        };
        if b & 0x80 == 0 {
            return Ok(prost::encoding::decode_varint(&mut &head[start..]).ok());
        }
    }
    Ok(None)
}

/// Reads the head of a request, as failback writes it: the frame's length, then the token
/// (`QuicRequest.token`, field 1, first). `Err(why)` inside when the request does not start
/// so: it carries no token (or one over [`MAX_TOKEN`]).
async fn read_head(
    recv: &mut quinn::RecvStream,
    head: &mut Vec<u8>,
) -> Result<Result<(u64, String), &'static str>, Failure> {
    let Some(len) = head_varint(recv, head).await? else {
        return Ok(Err("not a request frame"));
    };
    // Field 1, length-delimited.
    if head_byte(recv, head).await? != Some(0x0a) {
        return Ok(Err("the request does not start with one"));
    }
    let framed = head.len() as u64 - 1;
    let Some(token_len) = head_varint(recv, head).await? else {
        return Ok(Err("not a request frame"));
    };
    if token_len > MAX_TOKEN as u64 {
        return Ok(Err("a token over 1024 bytes"));
    }
    if (head.len() as u64 - framed).saturating_add(token_len) > len {
        return Ok(Err("a token longer than its request"));
    }
    let mut token = vec![0u8; token_len as usize];
    match recv.read_exact(&mut token).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Ok(Err("the request ends inside its token"));
        }
        Err(quinn::ReadExactError::ReadError(_)) => return Err(Failure::Gone),
    }
    head.extend_from_slice(&token);
    Ok(String::from_utf8(token)
        .map(|t| (len, t))
        .map_err(|_| "a token that is not UTF-8"))
}

async fn reply(send: &mut quinn::SendStream, r: quic_reply::Reply) -> Result<(), Failure> {
    write_frame(send, &QuicReply { reply: Some(r) })
        .await
        .map_err(|_| Failure::Gone)
}

async fn forward<T, St>(
    stream: St,
    wrap: fn(T) -> quic_reply::Reply,
    send: &mut quinn::SendStream,
) -> Result<(), Failure>
where
    St: Stream<Item = Result<T, Status>>,
{
    let mut stream = std::pin::pin!(stream);
    // A call may sit idle for long (a backup window lasts a whole copy): a client that went
    // away meanwhile ends it, rather than the next reply that never comes.
    let mut gone = std::pin::pin!(send.stopped());
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = &mut gone => return Err(Failure::Gone),
        };
        let Some(item) = item else { return Ok(()) };
        reply(send, wrap(item?)).await?;
    }
}

/// `r` as the service gets it: it knows the connection by its peer (reader slots per
/// connection, the audit log).
fn with_peer<T>(r: T, peer: Peer) -> Request<T> {
    let mut r = Request::new(r);
    r.extensions_mut().insert(peer);
    r
}

/// Dispatches one request to the service and writes its answer.
async fn answer<S: Failback>(
    svc: &S,
    doors: &Doors,
    peer: Peer,
    req: QuicRequest,
    send: &mut quinn::SendStream,
) -> Result<(), Failure> {
    use quic_reply::Reply;
    use quic_request::Call;
    // The head's token was checked; the request's own (the last of its token fields) too.
    if let Err(s) = doors
        .token
        .check((!req.token.is_empty()).then_some(req.token.as_str()))
    {
        doors
            .audit
            .refused(&peer, A_REQUEST, Refusal::Token, s.message());
        return Err(unread(doors, s));
    }
    let Some(call) = req.call else {
        return Err(unread(
            doors,
            Status::invalid_argument("the request names no call"),
        ));
    };
    let r = match call {
        Call::Handshake(r) => {
            Reply::Handshake(svc.handshake(with_peer(r, peer)).await?.into_inner())
        }
        Call::ControlFile(r) => {
            Reply::ControlFile(svc.control_file(with_peer(r, peer)).await?.into_inner())
        }
        Call::Timelines(r) => {
            Reply::Timelines(svc.timelines(with_peer(r, peer)).await?.into_inner())
        }
        Call::EndOfWal(r) => {
            Reply::EndOfWal(svc.end_of_wal(with_peer(r, peer)).await?.into_inner())
        }
        Call::ListFiles(r) => {
            let s = svc.list_files(with_peer(r, peer)).await?.into_inner();
            return forward(s, Reply::FileEntry, send).await;
        }
        Call::ReadRanges(r) => {
            let s = svc.read_ranges(with_peer(r, peer)).await?.into_inner();
            return forward(s, Reply::Chunk, send).await;
        }
        Call::ChunkHashes(r) => {
            let s = svc.chunk_hashes(with_peer(r, peer)).await?.into_inner();
            return forward(s, Reply::FileHashes, send).await;
        }
        Call::Changes(r) => {
            let s = svc.changes(with_peer(r, peer)).await?.into_inner();
            return forward(s, Reply::Changes, send).await;
        }
        Call::BackupWindow(r) => {
            let s = svc.backup_window(with_peer(r, peer)).await?.into_inner();
            return forward(s, Reply::BackupWindow, send).await;
        }
        Call::EndBackupWindow(r) => Reply::EndBackupWindow(
            svc.end_backup_window(with_peer(r, peer))
                .await?
                .into_inner(),
        ),
    };
    reply(send, r).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_request_is_one_whole_frame() {
        let req = QuicRequest {
            token: "t".into(),
            call: Some(quic_request::Call::ControlFile(Default::default())),
        };
        let bytes = req.encode_length_delimited_to_vec();
        assert_eq!(decode_request(&bytes).unwrap(), req);
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(
            decode_request(&extra).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            decode_request(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        assert_eq!(
            decode_request(b"\x03\xff\xff\xff").unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
