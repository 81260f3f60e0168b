//! A simulated wide-area link in user space: a TCP and UDP proxy that delays every byte by a
//! fixed one-way latency in each direction and caps each direction's bandwidth.
//!
//! A real path between two sites has a bottleneck (the slowest hop): packets queue in front of
//! it, leave it at the link rate, and arrive a propagation delay later. The model here is the
//! same, per direction:
//!
//! ```text
//!  reader ──► Shaper (token bucket, bounded queue) ──departure──► DelayLine (+delay) ──► writer
//! ```
//!
//! - [`Shaper`]: a token bucket filled at the link rate up to a small burst; a segment leaves
//!   when the bucket holds its size, in arrival order. Segments waiting to leave form the
//!   bottleneck queue, bounded in bytes: a UDP datagram that does not fit is dropped (as a
//!   router drops), a TCP reader waits until there is room (backpressure: the proxy stops
//!   reading, its socket buffers fill, and the sender's TCP window closes).
//! - [`DelayLine`]: what left the shaper is delivered `delay` later, in order.
//!
//! Both take the time as a parameter (a [`Duration`] since the proxy started), so their
//! arithmetic is tested without sleeping; [`TcpProxy`] and [`UdpProxy`] drive them with real
//! sockets and threads. The proxy terminates TCP: the endpoints' congestion control sees a
//! loopback connection to the proxy, not the long path, so slow start and window limits of a
//! real long fat pipe are not reproduced — round trips and the rate cap are, which is what a
//! request/response protocol such as pg_rewind's libpq session pays for. UDP (QUIC) is relayed
//! datagram by datagram, so QUIC's own congestion control does see the delay, the rate and the
//! drops; a direction with neither delay nor cap (loopback) sends each datagram on from the
//! thread that received it, and relays TCP inside the kernel (`splice`), so that the proxy
//! takes little of the CPU the tools it sits between share on one machine.
//!
//! Every byte delivered is counted per direction ([`Counters`]): "bytes on the wire".

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What one direction of the simulated link does to traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Bits per second leaving the bottleneck; `None`: unlimited.
    pub rate_bits: Option<u64>,
    /// Bytes the token bucket holds when full (the largest burst sent at once).
    pub burst: u64,
    /// Bytes that may wait in front of the bottleneck.
    pub queue: u64,
    /// The bottleneck's rate changes once, during the run (a path that narrows or widens).
    pub change: Option<RateChange>,
    /// The largest UDP payload the path carries, in bytes: a larger datagram is dropped, as a
    /// router drops a packet too big for its next link when its sender forbids fragmenting
    /// it (QUIC's senders do, and find the path's size by probing). `None`: any size.
    pub mtu: Option<u64>,
}

/// The UDP payload a 1500-byte Ethernet path carries (less 20 bytes of IPv4 header and 8 of
/// UDP): what [`LinkSpec::wan`] lets through, as most of the Internet does.
pub const ETHERNET_UDP_PAYLOAD: u64 = 1472;

/// A new rate for the bottleneck, from `after` (since the proxy started) on. The queue is
/// resized with it, as [`LinkSpec::wan`] sizes it for the new rate, so that each phase of the
/// run sees the link a run at that rate alone would see.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateChange {
    pub after: Duration,
    pub rate_bits: Option<u64>,
    pub queue: u64,
}

fn bytes_per_sec(rate_bits: Option<u64>) -> Option<f64> {
    rate_bits.map(|b| (b as f64 / 8.0).max(1.0))
}

impl LinkSpec {
    /// No delay, no cap: loopback with byte counting.
    pub fn unlimited() -> LinkSpec {
        LinkSpec {
            delay: Duration::ZERO,
            rate_bits: None,
            burst: 64 * 1024,
            queue: u64::MAX,
            change: None,
            mtu: None,
        }
    }

    /// `delay` each way and `mbit` Mbit/s; a 32 KiB burst and a queue of one bandwidth-delay
    /// product of the round trip (a common router sizing), at least 64 KiB.
    pub fn wan(delay: Duration, mbit: u64) -> LinkSpec {
        let rate_bits = mbit.saturating_mul(1_000_000);
        let bdp = (rate_bits as f64 / 8.0 * 2.0 * delay.as_secs_f64()) as u64;
        LinkSpec {
            delay,
            rate_bits: Some(rate_bits),
            burst: 32 * 1024,
            queue: bdp.max(64 * 1024),
            change: None,
            mtu: Some(ETHERNET_UDP_PAYLOAD),
        }
    }

    /// This link, whose rate becomes `mbit` Mbit/s `after` the proxy started.
    pub fn changing(self, after: Duration, mbit: u64) -> LinkSpec {
        let then = LinkSpec::wan(self.delay, mbit);
        LinkSpec {
            change: Some(RateChange {
                after,
                rate_bits: then.rate_bits,
                queue: then.queue,
            }),
            ..self
        }
    }

    /// Neither delayed nor capped in any phase, nor cut to an MTU: loopback.
    pub fn is_plain(&self) -> bool {
        self.delay.is_zero() && !self.shaped() && self.mtu.is_none()
    }

    /// Whether any phase of the link caps the rate.
    fn shaped(&self) -> bool {
        self.rate_bits.is_some() || self.change.is_some_and(|c| c.rate_bits.is_some())
    }

    /// Bytes on the simulated wire and in the bottleneck queue at most, over both phases.
    fn max_in_flight(&self) -> u64 {
        let phase = |rate_bits, queue: u64| {
            bytes_per_sec(rate_bits).map_or(0.0, |r| {
                r * self.delay.as_secs_f64() + queue.min(64 << 20) as f64
            }) as u64
        };
        let first = phase(self.rate_bits, self.queue);
        self.change
            .map_or(first, |c| first.max(phase(c.rate_bits, c.queue)))
    }

    /// Seconds the bottleneck needs to carry `bytes` when busy from the proxy's start: the
    /// floor of any transfer of that many bytes over this link. `None` when never capped.
    pub fn link_time(&self, bytes: u64) -> Option<f64> {
        let rate = bytes_per_sec(self.rate_bits);
        let Some(c) = self.change else {
            return rate.map(|r| bytes as f64 / r);
        };
        let then = bytes_per_sec(c.rate_bits);
        let before = rate.map_or(f64::INFINITY, |r| r * c.after.as_secs_f64());
        if (bytes as f64) <= before {
            return rate.map(|r| bytes as f64 / r);
        }
        then.map(|t| c.after.as_secs_f64() + (bytes as f64 - before) / t)
    }
}

/// The answer of [`Shaper::offer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Offer {
    /// The segment leaves the bottleneck at this time.
    Depart(Duration),
    /// The queue is full; it has room again no earlier than this time.
    Full { retry_at: Duration },
}

/// Token bucket with a bounded FIFO queue in front of it. Times are offsets from a common start.
#[derive(Debug)]
pub struct Shaper {
    rate: Option<f64>,
    burst: f64,
    queue_limit: u64,
    /// Tokens (bytes) in the bucket at time `at`; `at` is the latest departure scheduled.
    tokens: f64,
    at: Duration,
    /// Segments scheduled to leave in the future: (departure, size).
    waiting: VecDeque<(Duration, u64)>,
    waiting_bytes: u64,
    /// The spec's rate change, until it is applied.
    change: Option<RateChange>,
}

impl Shaper {
    pub fn new(spec: &LinkSpec) -> Shaper {
        Shaper {
            rate: bytes_per_sec(spec.rate_bits),
            burst: spec.burst as f64,
            queue_limit: spec.queue,
            tokens: spec.burst as f64,
            at: Duration::ZERO,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            change: spec.change,
        }
    }

    /// From `now` on, the bottleneck sends at `rate_bits` (`None`: unlimited) with room for
    /// `queue` bytes. Segments already scheduled keep their departures: they were queued behind
    /// the old rate and the change does not reach back to them. The bucket is what the old rate
    /// left in it at `now`, or after the last scheduled departure if that is later; only then
    /// does it fill at the new rate. A smaller queue refuses segments until what waits has
    /// drained below it.
    pub fn set_rate(&mut self, now: Duration, rate_bits: Option<u64>, queue: u64) {
        if now > self.at {
            self.tokens = match self.rate {
                Some(rate) => (self.tokens + (now - self.at).as_secs_f64() * rate).min(self.burst),
                None => self.burst,
            };
            self.at = now;
        }
        self.rate = bytes_per_sec(rate_bits);
        self.queue_limit = queue;
    }

    /// Applies the spec's rate change once its time has come, at its own time rather than at
    /// the first offer after it: an idle link changes rate even when nothing crosses it.
    fn due_change(&mut self, now: Duration) {
        if let Some(c) = self.change.filter(|c| c.after <= now) {
            self.change = None;
            self.set_rate(c.after, c.rate_bits, c.queue);
        }
    }

    /// Bytes still waiting to leave at `now`.
    pub fn queued(&mut self, now: Duration) -> u64 {
        while let Some(&(dep, size)) = self.waiting.front() {
            if dep > now {
                break;
            }
            self.waiting.pop_front();
            self.waiting_bytes -= size;
        }
        self.waiting_bytes
    }

    /// A segment of `size` bytes arrives at `now`: when does it leave? An empty queue takes a
    /// segment of any size; otherwise a segment that would overflow the queue is refused.
    pub fn offer(&mut self, now: Duration, size: u64) -> Offer {
        self.due_change(now);
        let Some(rate) = self.rate else {
            return Offer::Depart(now);
        };
        let queued = self.queued(now);
        if queued > 0 && queued.saturating_add(size) > self.queue_limit {
            let retry_at = self.waiting.front().map_or(now, |&(dep, _)| dep);
            return Offer::Full { retry_at };
        }
        // FIFO: this segment starts waiting for tokens when it arrives or when the segment
        // before it left, whichever is later.
        let start = now.max(self.at);
        let refill = start.saturating_sub(self.at).as_secs_f64() * rate;
        let tokens = (self.tokens + refill).min(self.burst);
        let need = size as f64;
        let departure = if tokens >= need {
            self.tokens = tokens - need;
            start
        } else {
            self.tokens = 0.0;
            start + Duration::from_secs_f64((need - tokens) / rate)
        };
        self.at = departure;
        if departure > now {
            self.waiting.push_back((departure, size));
            self.waiting_bytes += size;
        }
        Offer::Depart(departure)
    }
}

/// Items in flight, each delivered at its time, in order.
#[derive(Debug)]
pub struct DelayLine<T> {
    items: VecDeque<(Duration, T)>,
}

impl<T> Default for DelayLine<T> {
    fn default() -> Self {
        DelayLine {
            items: VecDeque::new(),
        }
    }
}

impl<T> DelayLine<T> {
    /// Adds `item`, due at `due`; never earlier than an item added before it (order is kept).
    pub fn push(&mut self, due: Duration, item: T) {
        let due = self.items.back().map_or(due, |&(last, _)| due.max(last));
        self.items.push_back((due, item));
    }

    /// The next item if it is due at `now`.
    pub fn pop_due(&mut self, now: Duration) -> Option<T> {
        match self.items.front() {
            Some(&(due, _)) if due <= now => self.items.pop_front().map(|(_, t)| t),
            _ => None,
        }
    }

    /// When the next item is due.
    pub fn next_due(&self) -> Option<Duration> {
        self.items.front().map(|&(d, _)| d)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Bytes delivered in each direction, and datagrams dropped at a full queue.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client to target.
    pub up: AtomicU64,
    /// Target to client.
    pub down: AtomicU64,
    pub dropped: AtomicU64,
}

impl Counters {
    /// (up, down, dropped)
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// The real clock the proxies read, as an offset from their start.
#[derive(Clone, Copy, Debug)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }

    fn sleep_until(&self, t: Duration) {
        let now = self.now();
        if t > now {
            thread::sleep(t - now);
        }
    }
}

/// One direction of the link, shared by every flow that crosses it.
struct Direction {
    spec: LinkSpec,
    shaper: Mutex<Shaper>,
}

impl Direction {
    fn new(spec: LinkSpec) -> Arc<Direction> {
        Arc::new(Direction {
            shaper: Mutex::new(Shaper::new(&spec)),
            spec,
        })
    }

    /// When a segment offered now is delivered; `None`: the queue is full.
    fn try_schedule(&self, now: Duration, size: u64) -> Result<Duration, Duration> {
        let mut s = self.shaper.lock().unwrap_or_else(|e| e.into_inner());
        match s.offer(now, size) {
            Offer::Depart(d) => Ok(d + self.spec.delay),
            Offer::Full { retry_at } => Err(retry_at),
        }
    }
}

/// A delay line with a condition variable, written by one thread and drained by another.
struct Pipe<T> {
    state: Mutex<PipeState<T>>,
    cv: Condvar,
}

struct PipeState<T> {
    line: DelayLine<T>,
    /// Bytes pushed and not yet delivered (bounds a flow's memory when the writer is slow).
    pending: u64,
    closed: bool,
}

impl<T> Pipe<T> {
    fn new() -> Arc<Pipe<T>> {
        Arc::new(Pipe {
            state: Mutex::new(PipeState {
                line: DelayLine::default(),
                pending: 0,
                closed: false,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while more than `limit` bytes are pending; false when the pipe was closed.
    fn wait_room(&self, limit: u64) -> bool {
        let mut st = self.lock();
        while st.pending > limit && !st.closed {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        !st.closed
    }

    fn push(&self, due: Duration, size: u64, item: T) {
        let mut st = self.lock();
        st.line.push(due, item);
        st.pending += size;
        self.cv.notify_all();
    }

    /// The next item once it is due; `None` once closed and empty, or when `stop` is set.
    fn pop(&self, clock: Clock, stop: &AtomicBool) -> Option<T> {
        let mut st = self.lock();
        loop {
            let now = clock.now();
            if let Some(item) = st.line.pop_due(now) {
                return Some(item);
            }
            if (st.closed && st.line.is_empty()) || stop.load(Ordering::Relaxed) {
                return None;
            }
            let wait = match st.line.next_due() {
                Some(due) => due.saturating_sub(now).max(Duration::from_micros(50)),
                None => Duration::from_millis(100),
            };
            st = self
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn delivered(&self, size: u64) {
        let mut st = self.lock();
        st.pending = st.pending.saturating_sub(size);
        self.cv.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }
}

/// Both directions of a proxied link and its counters.
struct Link {
    up: Arc<Direction>,
    down: Arc<Direction>,
    counters: Arc<Counters>,
    clock: Clock,
    stop: Arc<AtomicBool>,
}

impl Link {
    fn new(up: LinkSpec, down: LinkSpec) -> Arc<Link> {
        Arc::new(Link {
            up: Direction::new(up),
            down: Direction::new(down),
            counters: Arc::new(Counters::default()),
            clock: Clock(Instant::now()),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// Largest segment a TCP reader hands to the shaper at once: within the burst when shaped, so
/// the bucket paces segments rather than whole reads.
fn segment_size(spec: &LinkSpec) -> usize {
    if spec.shaped() {
        (spec.burst.clamp(1024, 64 * 1024) / 2) as usize
    } else {
        64 * 1024
    }
}

/// A proxy running on its own threads until dropped (or [`TcpProxy::stop`]).
pub struct TcpProxy {
    addr: SocketAddr,
    link: Arc<Link>,
}

impl TcpProxy {
    /// Listens on `listen` (port 0 picks one) and forwards each connection to `target`.
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        up: LinkSpec,
        down: LinkSpec,
    ) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let link = Link::new(up, down);
        let l = link.clone();
        thread::Builder::new()
            .name("wan-tcp-accept".into())
            .spawn(move || {
                while !l.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            match TcpStream::connect(target) {
                                Ok(server) => tcp_flow(&l, client, server),
                                Err(e) => {
                                    eprintln!("wanproxy: cannot connect to {target}: {e}");
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => {
                            eprintln!("wanproxy: accept failed: {e}");
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(TcpProxy { addr, link })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.link.counters.clone()
    }

    /// Stops accepting; connections in progress end when their peers close them.
    pub fn stop(&self) {
        self.link.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tcp_flow(link: &Arc<Link>, client: TcpStream, server: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let pairs = [
        (
            client.try_clone(),
            server.try_clone(),
            link.up.clone(),
            true,
        ),
        (
            server.try_clone(),
            client.try_clone(),
            link.down.clone(),
            false,
        ),
    ];
    for (from, to, dir, up) in pairs {
        let (Ok(from), Ok(to)) = (from, to) else {
            eprintln!("wanproxy: cannot clone a socket");
            return;
        };
        if dir.spec.is_plain() {
            let l = link.clone();
            let _ = thread::Builder::new()
                .name("wan-tcp-splice".into())
                .spawn(move || tcp_splice(&l, from, to, up));
            continue;
        }
        let pipe: Arc<Pipe<Option<Vec<u8>>>> = Pipe::new();
        let (p, l, d) = (pipe.clone(), link.clone(), dir.clone());
        let from_r = from.try_clone();
        let _ = thread::Builder::new()
            .name("wan-tcp-read".into())
            .spawn(move || {
                if let Ok(from) = from_r {
                    tcp_read(&l, &d, &p, from);
                }
            });
        let l = link.clone();
        let _ = thread::Builder::new()
            .name("wan-tcp-write".into())
            .spawn(move || tcp_write(&l, &pipe, from, to, up));
    }
}

/// One direction with neither delay nor cap (loopback), relayed inside the kernel: `splice`
/// moves what arrives on `from` through a pipe to `to` without copying it into this process.
/// On the same machine as both ends, a relay that copies every byte twice and hands it from
/// thread to thread costs the CPU the measured tools share (a tenth of a rewind's wall time
/// on two cores); this one costs little more than the second TCP hop itself.
fn tcp_splice(link: &Link, from: TcpStream, to: TcpStream, up: bool) {
    use std::os::fd::AsRawFd;
    let counter = if up {
        &link.counters.up
    } else {
        &link.counters.down
    };
    let (pipe_r, pipe_w) = match io::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("wanproxy: pipe: {e}");
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    };
    let (pr, pw) = (pipe_r.as_raw_fd(), pipe_w.as_raw_fd());
    const MOST: usize = 1 << 20;
    let splice = |fd_in: i32, fd_out: i32, len: usize| loop {
        // SAFETY: descriptors of the pipe and the streams, open for this whole function, and
        // no offsets.
        let n = unsafe {
            libc::splice(
                fd_in,
                std::ptr::null_mut(),
                fd_out,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Whether the receiving side went away (as against the sending side ending its stream).
    let mut receiver_gone = false;
    'relay: loop {
        let n = match splice(from.as_raw_fd(), pw, MOST) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut left = n;
        while left > 0 {
            match splice(pr, to.as_raw_fd(), left) {
                Ok(0) | Err(_) => {
                    receiver_gone = true;
                    break 'relay;
                }
                Ok(m) => {
                    left -= m;
                    counter.fetch_add(m as u64, Ordering::Relaxed);
                }
            }
        }
    }
    if receiver_gone {
        // As `tcp_write` does: tear the connection down both ways.
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    } else {
        // The end of the stream (or its reset) is passed on.
        let _ = to.shutdown(Shutdown::Write);
    }
}

/// Reads one direction into the shaper and the delay line, waiting for room (backpressure).
fn tcp_read(link: &Link, dir: &Direction, pipe: &Pipe<Option<Vec<u8>>>, mut from: TcpStream) {
    let seg = segment_size(&dir.spec);
    // In flight on the simulated wire plus the bottleneck queue, plus slack for loopback.
    let limit = dir.spec.max_in_flight() + (4 << 20);
    let mut buf = vec![0u8; seg];
    loop {
        if !pipe.wait_room(limit) {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let due = loop {
            match dir.try_schedule(link.clock.now(), n as u64) {
                Ok(due) => break due,
                Err(retry_at) => link.clock.sleep_until(retry_at),
            }
        };
        pipe.push(due, n as u64, Some(buf[..n].to_vec()));
    }
    // The end of the stream travels behind the last byte.
    pipe.push(link.clock.now() + dir.spec.delay, 0, None);
}

fn tcp_write(
    link: &Link,
    pipe: &Pipe<Option<Vec<u8>>>,
    from: TcpStream,
    mut to: TcpStream,
    up: bool,
) {
    let never = AtomicBool::new(false);
    while let Some(item) = pipe.pop(link.clock, &never) {
        let Some(bytes) = item else {
            let _ = to.shutdown(Shutdown::Write);
            return;
        };
        if to.write_all(&bytes).is_err() {
            break;
        }
        let n = bytes.len() as u64;
        let counter = if up {
            &link.counters.up
        } else {
            &link.counters.down
        };
        counter.fetch_add(n, Ordering::Relaxed);
        pipe.delivered(n);
    }
    // The receiver is gone: tear the connection down both ways.
    pipe.close();
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// A UDP relay: each client address gets its own upstream socket (one 4-tuple per client, as
/// QUIC expects); datagrams that find the bottleneck queue full are dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    link: Arc<Link>,
}

type Datagram = (Arc<UdpSocket>, Option<SocketAddr>, Vec<u8>);

impl UdpProxy {
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        up: LinkSpec,
        down: LinkSpec,
    ) -> io::Result<UdpProxy> {
        let sock = UdpSocket::bind(listen)?;
        deep_receive_buffer(&sock);
        let sock = Arc::new(sock);
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let link = Link::new(up, down);
        let up_pipe: Arc<Pipe<Datagram>> = Pipe::new();
        let down_pipe: Arc<Pipe<Datagram>> = Pipe::new();
        for (pipe, is_up) in [(up_pipe.clone(), true), (down_pipe.clone(), false)] {
            let l = link.clone();
            thread::Builder::new()
                .name("wan-udp-write".into())
                .spawn(move || {
                    while let Some(d) = pipe.pop(l.clock, &l.stop) {
                        deliver(&l, is_up, &d);
                        pipe.delivered(d.2.len() as u64);
                    }
                })?;
        }
        let l = link.clone();
        thread::Builder::new()
            .name("wan-udp-listen".into())
            .spawn(move || {
                let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut buf = vec![0u8; 65536];
                while !l.stop.load(Ordering::Relaxed) {
                    let Ok((n, client)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let upstream = match clients.get(&client) {
                        Some(u) => u.clone(),
                        None => match udp_upstream(&l, &sock, client, target, &down_pipe) {
                            Ok(u) => {
                                clients.insert(client, u.clone());
                                u
                            }
                            Err(e) => {
                                eprintln!("wanproxy: no upstream socket for {client}: {e}");
                                continue;
                            }
                        },
                    };
                    udp_forward(&l, &l.up, &up_pipe, (upstream, None, buf[..n].to_vec()));
                }
            })?;
        Ok(UdpProxy { addr, link })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.link.counters.clone()
    }

    pub fn stop(&self) {
        self.link.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends a datagram on and counts it.
fn deliver(link: &Link, is_up: bool, (s, dest, bytes): &Datagram) {
    let sent = match dest {
        Some(d) => s.send_to(bytes, *d),
        None => s.send(bytes),
    };
    if sent.is_ok() {
        let c = if is_up {
            &link.counters.up
        } else {
            &link.counters.down
        };
        c.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
}

fn udp_forward(link: &Link, dir: &Direction, pipe: &Pipe<Datagram>, d: Datagram) {
    let is_up = std::ptr::eq(dir, &*link.up);
    if dir.spec.mtu.is_some_and(|mtu| d.2.len() as u64 > mtu) {
        link.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if dir.spec.delay.is_zero() && !dir.spec.shaped() {
        // Nothing to model: the datagram leaves from the thread that received it, as from a
        // router with an idle line. Handing each one to the writer thread would cost a
        // wake-up per datagram, which loopback (and a QUIC flow of small datagrams over it)
        // does not pay.
        deliver(link, is_up, &d);
        return;
    }
    let n = d.2.len() as u64;
    match dir.try_schedule(link.clock.now(), n) {
        Ok(due) => pipe.push(due, n, d),
        Err(_) => {
            link.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The proxy's sockets must not drop what the modelled link would carry: a burst larger than
/// the kernel's default receive buffer (208 KiB) would be lost before the proxy reads it,
/// losses the link model (its queue, `LinkSpec::queue`) never decided. 8 MiB, forced past
/// `rmem_max` when running as root; best effort otherwise.
fn deep_receive_buffer(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads `bytes` (a c_int that outlives the call) on our socket.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// A socket connected to `target` for `client`, and the thread relaying its replies.
fn udp_upstream(
    link: &Arc<Link>,
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
    down_pipe: &Arc<Pipe<Datagram>>,
) -> io::Result<Arc<UdpSocket>> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal address")
    } else {
        "[::]:0".parse().expect("literal address")
    };
    let up = UdpSocket::bind(bind)?;
    deep_receive_buffer(&up);
    up.connect(target)?;
    up.set_read_timeout(Some(Duration::from_millis(100)))?;
    let up = Arc::new(up);
    let (u, l, s, p) = (up.clone(), link.clone(), listen.clone(), down_pipe.clone());
    thread::Builder::new()
        .name("wan-udp-up".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !l.stop.load(Ordering::Relaxed) {
                if let Ok(n) = u.recv(&mut buf) {
                    udp_forward(
                        &l,
                        &l.down,
                        &p,
                        (s.clone(), Some(client), buf[..n].to_vec()),
                    );
                }
            }
        })?;
    Ok(up)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn unlimited_shaper_sends_at_once() {
        let mut s = Shaper::new(&LinkSpec::unlimited());
        for i in 0..100u32 {
            let now = MS * i;
            assert_eq!(s.offer(now, 1 << 20), Offer::Depart(now));
        }
    }

    #[test]
    fn shaper_paces_at_the_rate_after_the_burst() {
        // 8 Mbit/s = 1 MB/s; 1000 segments of 1000 bytes offered at once.
        let spec = LinkSpec {
            delay: Duration::ZERO,
            rate_bits: Some(8_000_000),
            burst: 10_000,
            queue: u64::MAX,
            change: None,
            mtu: None,
        };
        let mut s = Shaper::new(&spec);
        let mut last = Duration::ZERO;
        for i in 0..1000 {
            let Offer::Depart(d) = s.offer(Duration::ZERO, 1000) else {
                panic!("unbounded queue refused a segment");
            };
            assert!(d >= last, "departures keep arrival order");
            if i < 10 {
                assert_eq!(d, Duration::ZERO, "segment {i} fits in the burst");
            }
            last = d;
        }
        // 990 000 bytes beyond the burst at 1 MB/s.
        let expect = 0.99;
        assert!(
            (last.as_secs_f64() - expect).abs() < 1e-6,
            "last departure {last:?}, expected {expect} s"
        );
        // An idle link refills to the burst, no more.
        let later = last + Duration::from_secs(10);
        for _ in 0..10 {
            assert_eq!(s.offer(later, 1000), Offer::Depart(later));
        }
        assert_ne!(s.offer(later, 1000), Offer::Depart(later));
    }

    #[test]
    fn full_queue_refuses_until_it_drains() {
        let spec = LinkSpec {
            delay: Duration::ZERO,
            rate_bits: Some(8_000_000),
            burst: 1000,
            queue: 5000,
            change: None,
            mtu: None,
        };
        let mut s = Shaper::new(&spec);
        let mut accepted = 0;
        let retry = loop {
            match s.offer(Duration::ZERO, 1000) {
                Offer::Depart(_) => accepted += 1,
                Offer::Full { retry_at } => break retry_at,
            }
        };
        // One leaves at once (burst), five wait.
        assert_eq!(accepted, 6);
        assert!(retry > Duration::ZERO);
        assert_eq!(s.queued(Duration::ZERO), 5000);
        assert!(matches!(s.offer(retry, 1000), Offer::Depart(_)));
    }

    /// 8 Mbit/s (1 MB/s), a 1000-byte bucket, an unbounded queue.
    fn one_mb_per_sec() -> LinkSpec {
        LinkSpec {
            delay: Duration::ZERO,
            rate_bits: Some(8_000_000),
            burst: 1000,
            queue: u64::MAX,
            change: None,
            mtu: None,
        }
    }

    fn departs(s: &mut Shaper, now: Duration, size: u64) -> Duration {
        match s.offer(now, size) {
            Offer::Depart(d) => d,
            Offer::Full { .. } => panic!("segment refused at {now:?}"),
        }
    }

    fn close(a: Duration, b: Duration) -> bool {
        (a.as_secs_f64() - b.as_secs_f64()).abs() < 1e-9
    }

    #[test]
    fn set_rate_keeps_what_was_scheduled_and_paces_what_follows_at_the_new_rate() {
        let us = Duration::from_micros(1);
        let mut s = Shaper::new(&one_mb_per_sec());
        // Ten segments at once: one from the bucket, then one a millisecond.
        let before: Vec<Duration> = (0..10)
            .map(|_| departs(&mut s, Duration::ZERO, 1000))
            .collect();
        assert!(close(before[9], 9 * MS));
        // Twice the rate from 2 ms: what waits still leaves at the old pace, by 9 ms.
        s.set_rate(2 * MS, Some(16_000_000), u64::MAX);
        assert_eq!(
            s.queued(2 * MS),
            7000,
            "the seven still waiting are unchanged"
        );
        assert_eq!(s.queued(9 * MS), 0, "and gone at their old departures");
        // The next segment waits for the last of them, then for 1000 bytes at 2 MB/s.
        let after = departs(&mut s, 2 * MS, 1000);
        assert!(close(after, 9 * MS + 500 * us), "{after:?}");

        // An idle bucket refills at the old rate up to the change, at the new one after it.
        let mut s = Shaper::new(&one_mb_per_sec());
        assert_eq!(departs(&mut s, Duration::ZERO, 1000), Duration::ZERO);
        s.set_rate(500 * us, Some(16_000_000), u64::MAX);
        // 500 bytes from the old rate; the other 500 take 250 µs at the new one.
        let d = departs(&mut s, 500 * us, 1000);
        assert!(close(d, 750 * us), "{d:?}");

        // A tenth of the rate: each segment takes ten times as long.
        let mut s = Shaper::new(&one_mb_per_sec());
        departs(&mut s, Duration::ZERO, 1000);
        s.set_rate(Duration::ZERO, Some(800_000), u64::MAX);
        let d = departs(&mut s, Duration::ZERO, 1000);
        assert!(close(d, 10 * MS), "{d:?}");
    }

    #[test]
    fn a_smaller_queue_refuses_until_what_waits_has_drained() {
        let mut s = Shaper::new(&one_mb_per_sec());
        for _ in 0..6 {
            departs(&mut s, Duration::ZERO, 1000);
        }
        assert_eq!(s.queued(Duration::ZERO), 5000);
        s.set_rate(Duration::ZERO, Some(8_000_000), 2000);
        let Offer::Full { retry_at } = s.offer(Duration::ZERO, 1000) else {
            panic!("5000 bytes waiting in a queue of 2000: no room");
        };
        assert_eq!(retry_at, MS, "the first waiting segment leaves at 1 ms");
        // At 4 ms one segment (5 ms) waits: 1000 + 1000 fits in 2000.
        assert!(close(departs(&mut s, 4 * MS, 1000), 6 * MS));
    }

    #[test]
    fn a_spec_change_applies_at_its_time_even_to_an_idle_link() {
        // 1 MB/s for a second, then 100 kB/s.
        let spec = LinkSpec {
            change: Some(RateChange {
                after: Duration::from_secs(1),
                rate_bits: Some(800_000),
                queue: u64::MAX,
            }),
            ..one_mb_per_sec()
        };
        // A steady sender of 1000-byte segments, each offered as the previous one leaves.
        let mut s = Shaper::new(&spec);
        let mut now = Duration::ZERO;
        let mut sent = 0u64;
        while now < Duration::from_secs(2) {
            now = departs(&mut s, now, 1000);
            sent += 1000;
        }
        // 1 MB in the first second (plus the bucket), 100 kB in the second.
        let expect = 1000 + 1_000_000 + 100_000;
        assert!(
            sent.abs_diff(expect) <= 2000,
            "{sent} bytes, about {expect} expected"
        );
        assert!(close(
            Duration::from_secs_f64(spec.link_time(1_100_000).unwrap()),
            Duration::from_secs(2)
        ));

        // The bucket empties 0.5 ms before the change and the next segment comes 1.5 ms after
        // it: 500 bytes refilled at the old rate, 150 at the new one, the other 350 take
        // 3.5 ms. Had the change waited for that segment, the bucket would be full.
        let us = Duration::from_micros(1);
        let mut s = Shaper::new(&spec);
        let t0 = Duration::from_secs(1) - 500 * us;
        assert_eq!(departs(&mut s, t0, 1000), t0);
        let d = departs(&mut s, Duration::from_secs(1) + 1500 * us, 1000);
        assert!(close(d, Duration::from_secs(1) + 5 * MS), "{d:?}");
    }

    #[test]
    fn link_time_counts_each_phase_at_its_rate() {
        let fast_then_thin =
            LinkSpec::wan(Duration::from_millis(20), 1000).changing(Duration::from_secs(10), 50);
        // 125 MB/s for 10 s carries 1250 MB; the rest at 6.25 MB/s.
        assert_eq!(fast_then_thin.link_time(125_000_000), Some(1.0));
        assert_eq!(
            fast_then_thin.link_time(1_250_000_000 + 62_500_000),
            Some(20.0)
        );
        let plain = LinkSpec::wan(Duration::from_millis(20), 100);
        assert_eq!(plain.link_time(12_500_000), Some(1.0));
        assert_eq!(LinkSpec::unlimited().link_time(1), None);
    }

    #[test]
    fn delivery_is_never_before_the_delay() {
        // A deterministic irregular arrival pattern through a shaped, delayed direction.
        let spec = LinkSpec::wan(Duration::from_millis(25), 200);
        let mut s = Shaper::new(&spec);
        let mut line = DelayLine::default();
        let mut now = Duration::ZERO;
        let mut x: u64 = 12345;
        let mut bytes = 0u64;
        for i in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            now += Duration::from_micros(x >> 58);
            let size = 1 + (x >> 40) % 16_000;
            bytes += size;
            let dep = loop {
                match s.offer(now, size) {
                    Offer::Depart(d) => break d,
                    Offer::Full { retry_at } => {
                        assert!(retry_at >= now);
                        now = retry_at;
                    }
                }
            };
            assert!(dep >= now);
            line.push(dep + spec.delay, (i, now));
        }
        let mut next = 0;
        let mut t = Duration::ZERO;
        while !line.is_empty() {
            t = line.next_due().unwrap();
            while let Some((i, sent)) = line.pop_due(t) {
                assert_eq!(i, next, "order kept");
                assert!(t >= sent + spec.delay, "item {i} delivered early");
                next += 1;
            }
        }
        assert_eq!(next, 20_000);
        // The rate holds on average: nothing beats (bytes - burst) / rate, plus the delay.
        let floor = (bytes - spec.burst) as f64 / 25e6 + spec.delay.as_secs_f64();
        assert!(t.as_secs_f64() >= floor - 1e-6, "{t:?} < {floor} s");
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
    }

    #[test]
    fn tcp_bytes_pass_intact_both_ways_and_late_enough() {
        tcp_echo_through(LinkSpec::wan(Duration::from_millis(20), 100));
    }

    #[test]
    fn tcp_bytes_pass_intact_and_counted_on_an_unlimited_link() {
        // Relayed by splice, inside the kernel.
        tcp_echo_through(LinkSpec::unlimited());
    }

    /// A byte, then 3 MiB, echoed through a TCP proxy of `spec`: intact, no round trip
    /// shorter than twice the delay, every byte counted each way, and the end of the stream
    /// passed on both ways.
    fn tcp_echo_through(spec: LinkSpec) {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut r = s.try_clone().unwrap();
            io::copy(&mut r, &mut s).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        });
        let delay = spec.delay;
        let proxy = TcpProxy::start("127.0.0.1:0".parse().unwrap(), target, spec, spec).unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
        // Round trip of one byte: at least two one-way delays.
        let t0 = Instant::now();
        c.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).unwrap();
        assert!(t0.elapsed() >= 2 * delay, "round trip {:?}", t0.elapsed());
        assert_eq!(&one, b"x");
        let data = pattern(3 << 20);
        let mut w = c.try_clone().unwrap();
        let d2 = data.clone();
        let writer = thread::spawn(move || {
            w.write_all(&d2).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == data, "echoed bytes differ");
        let (up, down, _) = proxy.counters().snapshot();
        assert_eq!(up, data.len() as u64 + 1);
        assert_eq!(down, data.len() as u64 + 1);
    }

    #[test]
    fn udp_datagrams_pass_intact_both_ways_and_late_enough() {
        udp_echo_through(LinkSpec::wan(Duration::from_millis(15), 100));
    }

    #[test]
    fn udp_datagrams_pass_intact_and_counted_on_an_unlimited_link() {
        // Sent from the receiving thread, not through the writer's delay line.
        udp_echo_through(LinkSpec::unlimited());
    }

    /// Two clients each echo 20 datagrams through a proxy of `spec`: every reply intact, no
    /// round trip shorter than twice the delay, every byte counted each way.
    fn udp_echo_through(spec: LinkSpec) {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        thread::spawn(move || {
            let mut buf = [0u8; 2000];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let reply: Vec<u8> = buf[..n].iter().rev().copied().collect();
                echo.send_to(&reply, from).unwrap();
            }
        });
        let delay = spec.delay;
        let proxy = UdpProxy::start("127.0.0.1:0".parse().unwrap(), target, spec, spec).unwrap();
        let clients: Vec<UdpSocket> = (0..2)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut total = 0;
        for (k, c) in clients.iter().enumerate() {
            c.connect(proxy.local_addr()).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for i in 0..20usize {
                let msg: Vec<u8> = pattern(1200 + i + k)
                    .into_iter()
                    .map(|b| b ^ k as u8)
                    .collect();
                let t0 = Instant::now();
                c.send(&msg).unwrap();
                let mut buf = [0u8; 2000];
                let n = c.recv(&mut buf).unwrap();
                assert!(t0.elapsed() >= 2 * delay, "round trip {:?}", t0.elapsed());
                let expect: Vec<u8> = msg.iter().rev().copied().collect();
                assert_eq!(&buf[..n], &expect[..], "client {k} datagram {i}");
                total += msg.len() as u64;
            }
        }
        // The writer counts a datagram after send() returns, so the echo of the last one can
        // reach the client a moment before it is counted.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut seen = proxy.counters().snapshot();
        while seen != (total, total, 0) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
            seen = proxy.counters().snapshot();
        }
        assert_eq!(seen, (total, total, 0));
    }

    #[test]
    fn udp_drops_when_the_queue_is_full() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = sink.local_addr().unwrap();
        let spec = LinkSpec {
            delay: Duration::from_millis(5),
            rate_bits: Some(1_000_000),
            burst: 1500,
            queue: 6000,
            change: None,
            mtu: None,
        };
        let proxy = UdpProxy::start("127.0.0.1:0".parse().unwrap(), target, spec, spec).unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..50 {
            c.send_to(&[7u8; 1200], proxy.local_addr()).unwrap();
        }
        thread::sleep(Duration::from_millis(300));
        let (_, _, dropped) = proxy.counters().snapshot();
        assert!(
            dropped > 0,
            "50 datagrams into a 6 kB queue at 1 Mbit/s: some must drop"
        );
    }

    #[test]
    fn udp_drops_what_exceeds_the_paths_mtu() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let target = sink.local_addr().unwrap();
        let spec = LinkSpec::wan(Duration::from_millis(1), 1000);
        assert_eq!(spec.mtu, Some(ETHERNET_UDP_PAYLOAD));
        let proxy = UdpProxy::start("127.0.0.1:0".parse().unwrap(), target, spec, spec).unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.send_to(&[1u8; 1473], proxy.local_addr()).unwrap();
        c.send_to(&[2u8; 1472], proxy.local_addr()).unwrap();
        let mut buf = [0u8; 65536];
        let (n, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(
            (n, buf[0]),
            (1472, 2),
            "only the datagram that fits arrives"
        );
        let (_, _, dropped) = proxy.counters().snapshot();
        assert_eq!(
            dropped, 1,
            "the datagram one byte too big is dropped and counted"
        );
    }
}
