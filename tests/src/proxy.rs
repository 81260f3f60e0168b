//! Loopback proxies that break the path between failback and failbackd on demand, as a
//! flapping link does: [`TcpCut`] cuts every TCP connection at once and refuses new ones for a
//! while (a NAT or firewall that forgets its flows, a route that comes back) and
//! [`TcpCut::set_rate`] narrows the link or widens it again (a shared link that fills up and
//! frees), [`UdpCut`] drops every datagram while it is "down" (a route that vanishes for a
//! while). Both forward everything else untouched.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How often the proxies' threads look at their stop flag.
const TICK: Duration = Duration::from_millis(100);

/// A TCP proxy to one target; [`TcpCut::cut_for`] closes every connection it carries and
/// refuses new ones for a while.
pub struct TcpCut {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    down_until: Arc<Mutex<Option<std::time::Instant>>>,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// While set, nothing is forwarded either way and connections stay open: a peer that has
    /// hung (a frozen server, a black-holed route), not one that has gone.
    stalled: Arc<AtomicBool>,
    pace: Arc<Mutex<Pace>>,
}

/// One rate shared by every connection and both directions: the link's width.
#[derive(Default)]
struct Pace {
    /// Bytes per second; `None` forwards as fast as loopback does.
    rate: Option<u64>,
    /// When the link is free again for the next bytes.
    free_at: Option<std::time::Instant>,
}

impl Pace {
    /// How long the sender of `n` bytes waits for them to have crossed.
    fn reserve(&mut self, n: usize) -> Duration {
        let Some(rate) = self.rate else {
            self.free_at = None;
            return Duration::ZERO;
        };
        let now = std::time::Instant::now();
        let start = self.free_at.filter(|&t| t > now).unwrap_or(now);
        let done = start + Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        self.free_at = Some(done);
        done - now
    }
}

/// Copies `from` to `to` until either side ends, holding every byte back while `stalled` and
/// pacing them to the link's rate.
fn forward(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool, pace: &Mutex<Pace>) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(Ordering::Relaxed) {
            thread::sleep(TICK / 10);
        }
        let wait = pace.lock().unwrap_or_else(|p| p.into_inner()).reserve(n);
        if !wait.is_zero() {
            thread::sleep(wait);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl TcpCut {
    pub fn start(target: SocketAddr) -> TcpCut {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the bound address");
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let down_until = Arc::new(Mutex::new(None::<std::time::Instant>));
        let stalled = Arc::new(AtomicBool::new(false));
        let pace = Arc::new(Mutex::new(Pace::default()));
        let (c, a, r, s, d, st, pc) = (
            conns.clone(),
            accepted.clone(),
            refused.clone(),
            stop.clone(),
            down_until.clone(),
            stalled.clone(),
            pace.clone(),
        );
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(TICK / 10);
                        continue;
                    }
                    Err(_) => break,
                };
                let down = d
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some_and(|t| std::time::Instant::now() < t);
                if down {
                    // Refused: the client sees its connection reset.
                    let _ = client.shutdown(Shutdown::Both);
                    r.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                a.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let pair = [client, upstream];
                {
                    let mut all = c.lock().unwrap_or_else(|p| p.into_inner());
                    all.extend(pair.iter().filter_map(|s| s.try_clone().ok()));
                }
                let [client, upstream] = pair;
                for (from, to) in [
                    (client.try_clone(), upstream.try_clone()),
                    (upstream.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(f, t)| Some((f.ok()?, t.ok()?)))
                {
                    let (st, pc) = (st.clone(), pc.clone());
                    thread::spawn(move || forward(from, to, &st, &pc));
                }
            }
        });
        TcpCut {
            addr,
            conns,
            down_until,
            accepted,
            refused,
            stop,
            stalled,
            pace,
        }
    }

    /// Paces everything forwarded, both ways and over every connection together, to `rate`
    /// bytes a second; `None` lifts the limit.
    pub fn set_rate(&self, rate: Option<u64>) {
        self.pace.lock().unwrap_or_else(|p| p.into_inner()).rate = rate;
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops forwarding (`true`) with every connection left open, new ones accepted but not
    /// answered, or forwards again (`false`).
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Relaxed);
    }

    /// Closes every connection carried now and refuses new ones until at least `outage` has
    /// passed and the client has been refused at least once, so the client cannot ride the
    /// outage out on data already buffered on its side (a fixed outage raced the buffers).
    /// Gives up waiting for a refusal after `patience`.
    pub fn cut_until_refused(&self, outage: Duration, patience: Duration) {
        let t0 = std::time::Instant::now();
        let before = self.refused.load(Ordering::Relaxed);
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(t0 + patience);
        self.cut();
        while t0.elapsed() < patience
            && (t0.elapsed() < outage || self.refused.load(Ordering::Relaxed) == before)
        {
            thread::sleep(TICK / 10);
        }
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Connections accepted (and carried) so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes every connection carried now, both ways; new ones are still accepted.
    pub fn cut(&self) {
        let mut all = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for s in all.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpCut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// A UDP proxy to one target, one upstream socket per client address; while
/// [`UdpCut::set_down`] holds it down, datagrams both ways are dropped.
pub struct UdpCut {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl UdpCut {
    pub fn start(target: SocketAddr) -> UdpCut {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("a loopback port"));
        sock.set_read_timeout(Some(TICK)).expect("a read timeout");
        let addr = sock.local_addr().expect("the bound address");
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (down.clone(), stop.clone());
        thread::spawn(move || {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, client)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if d.load(Ordering::Relaxed) {
                    continue;
                }
                let up = upstreams.entry(client).or_insert_with(|| {
                    let up = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("a loopback port"));
                    up.connect(target).expect("a connected upstream socket");
                    up.set_read_timeout(Some(TICK)).expect("a read timeout");
                    let (up2, back, d, s) = (up.clone(), sock.clone(), d.clone(), s.clone());
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while !s.load(Ordering::Relaxed) {
                            let Ok(n) = up2.recv(&mut buf) else {
                                continue;
                            };
                            if !d.load(Ordering::Relaxed) {
                                let _ = back.send_to(&buf[..n], client);
                            }
                        }
                    });
                    up
                });
                let _ = up.send(&buf[..n]);
            }
        });
        UdpCut { addr, down, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Drops (`true`) or forwards (`false`) every datagram from now on.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }
}

impl Drop for UdpCut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
