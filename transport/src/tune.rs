//! How both ends tune their connections for long fat links (a rewind across regions).
//!
//! A sender may only have one flow-control window of data unacknowledged, so a link of
//! 200 Mbit/s at 50 ms round trip needs at least 200e6 / 8 * 0.05 = 2.5 MB of window to stay
//! full. HTTP/2 and QUIC both default to far less; [`DEFAULT_WINDOW`] is 16 MiB, per stream and
//! per connection, on both transports, for what flows towards the client. What flows towards
//! the server is requests only, so a QUIC server takes small receive windows
//! ([`server_transport_config`]). QUIC's congestion control and socket buffers are chosen here
//! too, rather than by the kernel.

use std::sync::Arc;
use std::time::Duration;

/// Flow-control window per stream and per connection, in bytes (see the module header).
pub const DEFAULT_WINDOW: u32 = 16 << 20;
/// The window's bounds: HTTP/2's initial window, and a gigabyte of memory per stream.
pub const MIN_WINDOW: u32 = 65_535;
pub const MAX_WINDOW: u32 = 1 << 30;

/// A QUIC connection with no packet for this long is gone (the client's keep-alives are sent
/// well within it; the server sends none of its own).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The congestion window a QUIC connection starts with: 1 MiB, paced over the first round
/// trip. RFC 9002 suggests ten datagrams (about 14 KB), from which slow start needs seven round
/// trips to fill a link of 200 Mbit/s at 50 ms (1.25 MB in flight); a rewind's fetch is over
/// in a handful of round trips, so most of it would run at a fraction of the link. failbackd
/// talks to a few clients an operator sends it, over links chosen for the job, as TCP on such
/// links is given a larger `initcwnd`; a shallow or shared path loses part of the first flight
/// and Cubic backs off from there (`--quic-initial-window` to choose less).
pub const DEFAULT_INITIAL_WINDOW: u64 = 1 << 20;
/// The smallest initial window accepted: RFC 9002's ten datagrams of 1472 bytes.
pub const MIN_INITIAL_WINDOW: u64 = 14_720;

/// The client's QUIC transport settings: large windows (replies are a rewind's bulk),
/// keep-alives so an idle rewind phase does not drop the connection, and Cubic congestion
/// control starting from `initial_window` bytes in flight. Not quinn's BBR: on a 50 ms path its
/// window fell to a few datagrams for hundreds of milliseconds in the middle of a fetch
/// (bench/results/rewind_pair-2026-11-24e.md). The server's are
/// [`server_transport_config`].
pub fn transport_config(
    window: u32,
    max_streams: u32,
    initial_window: u64,
) -> quinn::TransportConfig {
    let w = u64::from(window);
    let mut t = common(window, max_streams, initial_window);
    t.stream_receive_window(quinn::VarInt::from_u32(window))
        // Several streams share the connection: let a few of them fill their window at once.
        .receive_window(quinn::VarInt::from_u64(w * 4).unwrap_or(quinn::VarInt::MAX))
        .keep_alive_interval(Some(KEEP_ALIVE));
    t
}

/// What a QUIC server lets a client send before reading it, and its streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerReceive {
    /// Per stream: one request's worth (a client sends one request a stream).
    pub stream: u32,
    /// Per connection, until the connection has authenticated: a few requests' heads. The
    /// server raises it once a request carried the right token
    /// (`quinn::Connection::set_receive_window`).
    pub connection: u32,
    /// Streams open at once, until the connection has authenticated (raised likewise).
    pub streams: u32,
}

/// The server's QUIC transport settings: its replies go out as the client's (a send window of
/// four `window`s, Cubic from `initial_window`), but a client may only send it `receive`'s
/// small windows: the server receives nothing but requests, and holds nothing for a client that
/// has not authenticated beyond those. No keep-alives of its own: the client sends its own
/// while it wants the connection, so a connection left idle ends at [`IDLE_TIMEOUT`].
pub fn server_transport_config(
    window: u32,
    receive: ServerReceive,
    initial_window: u64,
) -> quinn::TransportConfig {
    let mut t = common(window, receive.streams, initial_window);
    t.stream_receive_window(quinn::VarInt::from_u32(receive.stream))
        .receive_window(quinn::VarInt::from_u32(receive.connection))
        .keep_alive_interval(None);
    t
}

/// The largest UDP payload a QUIC connection grows into, where the path carries it (loopback,
/// a LAN of jumbo frames): path MTU discovery starts from QUIC's 1200 bytes and searches up
/// to this; an Internet path's 1500-byte MTU stops it at 1452, as quinn's own bound did.
/// Every datagram costs both ends CPU whatever its size (its encryption's set-up, its
/// acknowledgement, the kernel's socket calls), and on loopback a rewind over QUIC was
/// CPU-bound. Not 8952 (a 9000-byte jumbo frame): quinn hands the kernel up to
/// [`GSO_SEGMENTS`] datagrams in one call, which must fit in one IP packet's length field
/// (65,507 bytes of UDP payload over IPv4); a larger call is refused with `EMSGSIZE`, which
/// quinn takes for a lost MTU probe and drops in silence, so whole bursts were lost.
pub const MAX_UDP_PAYLOAD: u16 = 6500;
/// The most datagrams quinn 0.11 hands the kernel in one send (`MAX_TRANSMIT_SEGMENTS`).
pub const GSO_SEGMENTS: usize = 10;
/// The most UDP payload one send may carry over IPv4 (65,535 bytes less the IP and UDP
/// headers).
pub const MAX_SEND: usize = 65_535 - 20 - 8;

/// A QUIC endpoint on `socket` as both ends make theirs (failbackd's with `server`, the
/// client's without): the socket non-blocking with [`deepen_buffers`], and datagrams of up to
/// [`MAX_UDP_PAYLOAD`] bytes accepted (what it tells its peer it can receive). Within a tokio
/// runtime: the endpoint's driver is spawned on it.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    socket.set_nonblocking(true)?;
    deepen_buffers(&socket);
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("6500 bytes is within QUIC's bounds");
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

/// What both ends share: the send window, streams, idle timeout, congestion control, and path
/// MTU discovery up to [`MAX_UDP_PAYLOAD`].
fn common(window: u32, max_streams: u32, initial_window: u64) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t.send_window(u64::from(window) * 4)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("60 s is a valid idle timeout"),
        ))
        .congestion_controller_factory(congestion(initial_window));
    t
}

fn congestion(initial_window: u64) -> Arc<quinn::congestion::CubicConfig> {
    let mut c = quinn::congestion::CubicConfig::default();
    c.initial_window(initial_window);
    Arc::new(c)
}

/// The receive and send buffers asked for a QUIC socket. The kernel's default receive buffer
/// (about 208 KiB) holds some 150 datagrams: a burst of a 16 MiB window overflows it and every
/// datagram dropped there costs a retransmission and a congestion back-off.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Makes `socket`'s buffers [`SOCKET_BUFFER`] deep: with `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`
/// when allowed (root, `CAP_NET_ADMIN`), which pass the `net.core.rmem_max` cap, otherwise as
/// deep as that cap allows. Best effort: a shallow buffer only costs speed.
pub fn deepen_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    let set = |option: libc::c_int| {
        // SAFETY: setsockopt on a descriptor we own, with a pointer to a c_int and its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    for (forced, capped) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set(forced) {
            set(capped);
        }
    }
}

// quinn's sends of [`GSO_SEGMENTS`] datagrams must each fit in one IP packet.
const _: () = assert!(GSO_SEGMENTS * MAX_UDP_PAYLOAD as usize <= MAX_SEND);

#[cfg(test)]
mod tests {
    use super::*;

    /// Over loopback (an MTU of 64 KiB) a connection of both ends' settings grows its
    /// datagrams to [`MAX_UDP_PAYLOAD`] and a bulk reply loses next to none of them. With
    /// jumbo frames' 8952 bytes instead, quinn's sends of ten datagrams were refused by the
    /// kernel whole and taken for lost: MTU discovery fell back to 1200 bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_grows_into_large_datagrams_and_loses_none() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
        let endpoint = |server: Option<quinn::ServerConfig>| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            super::endpoint(socket, server).unwrap()
        };
        let tls = crate::tls::server_tls(cert.as_bytes(), key.as_bytes(), None).unwrap();
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
        let receive = ServerReceive {
            stream: 1 << 20,
            connection: 1 << 20,
            streams: 4,
        };
        server.transport_config(Arc::new(server_transport_config(
            DEFAULT_WINDOW,
            receive,
            DEFAULT_INITIAL_WINDOW,
        )));
        let server = endpoint(Some(server));
        let addr = server.local_addr().unwrap();
        const REPLY: usize = 64 << 20;
        let replied = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            recv.read_to_end(64).await.unwrap();
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..REPLY / chunk.len() {
                send.write_all(&chunk).await.unwrap();
            }
            send.finish().unwrap();
            let _ = send.stopped().await;
            conn.stats()
        });
        let mut client = endpoint(None);
        let tls = crate::tls::client_tls(cert.as_bytes(), None).unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(tls));
        config.transport_config(Arc::new(transport_config(
            DEFAULT_WINDOW,
            0,
            DEFAULT_INITIAL_WINDOW,
        )));
        client.set_default_client_config(config);
        let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"ask").await.unwrap();
        send.finish().unwrap();
        let got = recv.read_to_end(REPLY).await.unwrap();
        assert_eq!(got.len(), REPLY);
        let sent = replied.await.unwrap();
        // Discovery stops within a few bytes of the bound; loopback's 1452 would be quinn's
        // default bound, an Internet path's.
        let mtu = conn.stats().path.current_mtu;
        assert!(
            mtu > 6000,
            "the path MTU stayed at {mtu} bytes over loopback: {sent:?}"
        );
        let (lost, datagrams) = (sent.path.lost_packets, sent.udp_tx.datagrams);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Not root: the buffers stop at `net.core.rmem_max`, which may drop a burst.
            eprintln!("not root: {lost} of {datagrams} datagrams lost, not checked");
            return;
        }
        assert!(
            lost * 100 <= datagrams,
            "{lost} of {datagrams} datagrams lost over loopback"
        );
    }

    #[test]
    fn connections_start_with_the_initial_window_asked_for() {
        use quinn::congestion::ControllerFactory;
        for w in [MIN_INITIAL_WINDOW, DEFAULT_INITIAL_WINDOW, 5 << 20] {
            let c = congestion(w).build(std::time::Instant::now(), 1200);
            assert_eq!(c.window(), w);
        }
    }

    /// The client keeps its keep-alives and large windows; the server sends none and takes
    /// only what it is told to.
    #[test]
    fn only_the_client_keeps_connections_alive() {
        let client = format!(
            "{:?}",
            transport_config(DEFAULT_WINDOW, 0, DEFAULT_INITIAL_WINDOW)
        );
        let server = format!(
            "{:?}",
            server_transport_config(
                DEFAULT_WINDOW,
                ServerReceive {
                    stream: 1 << 20,
                    connection: 64 << 10,
                    streams: 16,
                },
                DEFAULT_INITIAL_WINDOW,
            )
        );
        assert!(
            client.contains("keep_alive_interval: Some(10s)"),
            "{client}"
        );
        assert!(server.contains("keep_alive_interval: None"), "{server}");
        for (config, field, value) in [
            (&client, "stream_receive_window", DEFAULT_WINDOW as u64),
            (&client, "receive_window", 4 * DEFAULT_WINDOW as u64),
            (&client, "send_window", 4 * DEFAULT_WINDOW as u64),
            (&server, "stream_receive_window", 1 << 20),
            (&server, "receive_window", 64 << 10),
            (&server, "send_window", 4 * DEFAULT_WINDOW as u64),
            (&server, "max_concurrent_bidi_streams", 16),
        ] {
            let shown = [
                format!("{field}: {value},"),
                format!("{field}: VarInt({value}),"),
            ];
            assert!(
                shown.iter().any(|s| config.contains(&format!(" {s}"))),
                "{field} is not {value}: {config}"
            );
        }
    }

    /// Run as root (as the test bed is), the forced options pass `net.core.rmem_max`;
    /// otherwise the buffers only grow to that cap, which the test then skips, saying so.
    #[test]
    fn quic_sockets_get_deep_buffers() {
        use std::os::fd::AsRawFd;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let get = |option| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into a c_int we own.
            let rc = unsafe {
                libc::getsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            usize::try_from(v).unwrap()
        };
        let before = get(libc::SO_RCVBUF);
        deepen_buffers(&socket);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: not root, so the buffers stop at net.core.rmem_max");
            return;
        }
        // Linux reports twice what was set (the other half is its bookkeeping).
        let (rcv, snd) = (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF));
        assert!(
            rcv >= SOCKET_BUFFER && snd >= SOCKET_BUFFER,
            "receive {before} -> {rcv}, send {snd}"
        );
    }
}
