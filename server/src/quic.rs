//! failbackd over QUIC (quinn), beside gRPC, carrying the same prost messages.
//!
//! QUIC gives each call its own stream inside one connection, so a lost packet stalls only
//! the stream it belongs to (HTTP/2 over TCP stalls every call behind it), and its congestion
//! control and windows are chosen here rather than by the kernel. QUIC has no notion of a
//! "call", so failback frames one itself:
//!
//! - one bidirectional stream per call, opened by the client;
//! - the client writes one `QuicRequest` (the token and one request), length-delimited: a
//!   protobuf varint length then the message, and finishes its side;
//! - the server writes `QuicReply` messages, length-delimited (one for a unary call, one per
//!   item for a streaming call) and finishes; a failure is a last `QuicReply` carrying a
//!   `QuicStatus` with the gRPC status code, so the client maps errors the same way whatever
//!   the transport.
//!
//! The answers come from the very [`Failback`] implementation the gRPC server runs, and the
//! token from the same [`TokenCheck`]. QUIC always runs TLS 1.3 (rustls, ALPN [`ALPN`]), with
//! optional client certificates. Limits: a request larger than [`QuicLimits::max_request`] is
//! refused on its stream, and so is a request that does not decode; a connection may open at
//! most [`QuicLimits::max_streams_per_connection`] streams at once (QUIC's own stream credit,
//! so an over-eager client waits rather than fails), and connections past
//! [`QuicLimits::max_connections`] are refused at once. None of that stops the server.
//!
//! The TLS, transport and framing helpers are public: the client's QUIC source uses them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use failback_proto::v1::failback_server::Failback;
use failback_proto::v1::{QuicReply, QuicRequest, QuicStatus, quic_reply, quic_request};
use prost::Message;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Status};

use crate::service::{FailbackService, TokenCheck};
use crate::{Config, ServeError};

/// The ALPN protocol both ends must agree on; another protocol on the same port is refused
/// during the TLS handshake.
pub const ALPN: &[u8] = b"failback/1";

/// How long a client may take to send its request once it opened a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no packet for this long is gone (keep-alives are sent well within it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Limits of the QUIC listener.
#[derive(Clone, Debug)]
pub struct QuicLimits {
    /// The largest request (`QuicRequest`) accepted, in bytes.
    pub max_request: usize,
    /// Streams (calls) one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// Bytes a new connection may have in flight before its first acknowledgement
    /// ([`DEFAULT_INITIAL_WINDOW`]).
    pub initial_window: u64,
}

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

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_request: crate::MAX_REQUEST,
            // The client keeps at most 256 reads (--jobs) plus a few small calls in flight.
            max_streams_per_connection: 300,
            max_connections: 64,
            initial_window: DEFAULT_INITIAL_WINDOW,
        }
    }
}

/// The QUIC transport settings of both ends: large windows for long fat links (see the crate
/// header), keep-alives so an idle rewind phase does not drop the connection, and Cubic
/// congestion control starting from `initial_window` bytes in flight. Not quinn's BBR: on a
/// 50 ms path its window fell to a few datagrams for hundreds of milliseconds in the middle of
/// a fetch (bench/results/rewind_pair-2026-11-24e.md).
pub fn transport_config(
    window: u32,
    max_streams: u32,
    initial_window: u64,
) -> quinn::TransportConfig {
    let window = u64::from(window);
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(window as u32))
        // Several streams share the connection: let a few of them fill their window at once.
        .receive_window(quinn::VarInt::from_u64(window * 4).unwrap_or(quinn::VarInt::MAX))
        .send_window(window * 4)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE))
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

/// ring, explicitly: rustls refuses to guess when more than one provider is compiled in.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: not PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("{0}: no certificate in the PEM")]
    NoCertificate(&'static str),
    #[error("{what}: {reason}")]
    Refused { what: &'static str, reason: String },
}

/// Every certificate of a PEM file.
pub fn pem_certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

fn pem_key(pem: &[u8], what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })
}

fn roots(pem: &[u8], what: &'static str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in pem_certs(pem, what)? {
        roots.add(c).map_err(|e| TlsError::Refused {
            what,
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn refused(what: &'static str) -> impl Fn(rustls::Error) -> TlsError {
    move |e| TlsError::Refused {
        what,
        reason: e.to_string(),
    }
}

/// The server's TLS 1.3 configuration: its certificate chain and key, and, with `client_ca`,
/// the CA every client certificate must chain to (a client without one is refused).
pub fn server_tls(
    cert: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
) -> Result<QuicServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(refused("TLS versions"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots(ca, "--client-ca")?,
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Refused {
                what: "--client-ca",
                reason: e.to_string(),
            })?,
        ),
    };
    let mut tls = builder
        .with_single_cert(pem_certs(cert, "--tls-cert")?, pem_key(key, "--tls-key")?)
        .map_err(refused("--tls-cert/--tls-key"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|e| TlsError::Refused {
        what: "QUIC TLS",
        reason: e.to_string(),
    })
}

/// The client's TLS 1.3 configuration: the server must chain to `ca`; with `identity` (PEM
/// certificate chain and key) the client presents a certificate of its own.
pub fn client_tls(
    ca: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<QuicClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(refused("TLS versions"))?
        .with_root_certificates(roots(ca, "--ca")?);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(pem_certs(cert, "--cert")?, pem_key(key, "--key")?)
            .map_err(refused("--cert/--key"))?,
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| TlsError::Refused {
        what: "QUIC TLS",
        reason: e.to_string(),
    })
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("the frame length is not a valid varint")]
    BadLength,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one length-delimited frame; `None` when the stream ends cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        if r.read(&mut b).await? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            if len > max as u64 {
                return Err(FrameError::TooLarge { len, max });
            }
            let mut buf = vec![0u8; len as usize];
            return match r.read_exact(&mut buf).await {
                Ok(_) => Ok(Some(buf)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err(FrameError::Truncated)
                }
                Err(e) => Err(e.into()),
            };
        }
    }
    Err(FrameError::BadLength)
}

/// Writes one message as a length-delimited frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    msg: &impl Message,
) -> Result<(), quinn::WriteError> {
    send.write_all(&msg.encode_length_delimited_to_vec()).await
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

/// A status as the last reply of a stream.
pub fn status_reply(s: &Status) -> QuicReply {
    QuicReply {
        reply: Some(quic_reply::Reply::Error(QuicStatus {
            code: s.code() as i32,
            message: s.message().to_string(),
        })),
    }
}

/// The status a `QuicStatus` carries (an unknown code is `Unknown`).
pub fn reply_status(s: QuicStatus) -> Status {
    Status::new(Code::from_i32(s.code), s.message)
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

/// Serves `config.pgdata` over QUIC on `socket` until `shutdown` completes.
pub async fn serve_quic(
    socket: std::net::UdpSocket,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.check()?;
    let svc = FailbackService::for_config(&config);
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
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
    server.transport_config(Arc::new(transport_config(
        config.window,
        limits.max_streams_per_connection,
        limits.initial_window,
    )));
    socket
        .set_nonblocking(true)
        .map_err(ServeError::QuicSocket)?;
    deepen_buffers(&socket);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(ServeError::QuicSocket)?;
    let svc = Arc::new(svc);
    let token = TokenCheck::new(config.token.clone());
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let (svc, token, max_request) = (svc.clone(), token.clone(), limits.max_request);
        tokio::spawn(async move {
            let _permit = permit;
            // A failed TLS handshake (wrong CA, no client certificate, wrong ALPN) ends here.
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (svc, token) = (svc.clone(), token.clone());
                tokio::spawn(async move {
                    serve_stream(&*svc, &token, max_request, send, recv).await;
                });
            }
        });
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"failbackd is shutting down");
    endpoint.wait_idle().await;
    Ok(())
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
    svc: &S,
    token: &TokenCheck,
    max_request: usize,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // The frame's varint length takes at most 10 bytes.
    let read = tokio::time::timeout(REQUEST_TIMEOUT, recv.read_to_end(max_request + 10)).await;
    let outcome = match read {
        Err(_) => Err(Failure::Status(Status::deadline_exceeded(format!(
            "no complete request within {} s",
            REQUEST_TIMEOUT.as_secs()
        )))),
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            // Tell the client to stop sending the rest.
            let _ = recv.stop(quinn::VarInt::from_u32(1));
            Err(Failure::Status(Status::resource_exhausted(format!(
                "request over the limit of {max_request} bytes"
            ))))
        }
        Ok(Err(_)) => Err(Failure::Gone),
        Ok(Ok(bytes)) => match decode_request(&bytes) {
            Err(s) => Err(s.into()),
            Ok(req) => answer(svc, token, req, &mut send).await,
        },
    };
    if let Err(Failure::Status(s)) = outcome {
        let _ = write_frame(&mut send, &status_reply(&s)).await;
    }
    let _ = send.finish();
    // Finishing only queues the end of the stream: wait until the client has it (or is gone),
    // so the connection is not torn down under the last reply.
    let _ = send.stopped().await;
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
    while let Some(item) = stream.next().await {
        reply(send, wrap(item?)).await?;
    }
    Ok(())
}

/// Dispatches one request to the service and writes its answer.
async fn answer<S: Failback>(
    svc: &S,
    token: &TokenCheck,
    req: QuicRequest,
    send: &mut quinn::SendStream,
) -> Result<(), Failure> {
    use quic_reply::Reply;
    use quic_request::Call;
    token.check((!req.token.is_empty()).then_some(req.token.as_str()))?;
    let call = req
        .call
        .ok_or_else(|| Status::invalid_argument("the request names no call"))?;
    let r = match call {
        Call::Handshake(r) => Reply::Handshake(svc.handshake(Request::new(r)).await?.into_inner()),
        Call::ControlFile(r) => {
            Reply::ControlFile(svc.control_file(Request::new(r)).await?.into_inner())
        }
        Call::Timelines(r) => Reply::Timelines(svc.timelines(Request::new(r)).await?.into_inner()),
        Call::EndOfWal(r) => Reply::EndOfWal(svc.end_of_wal(Request::new(r)).await?.into_inner()),
        Call::ListFiles(r) => {
            let s = svc.list_files(Request::new(r)).await?.into_inner();
            return forward(s, Reply::FileEntry, send).await;
        }
        Call::ReadRanges(r) => {
            let s = svc.read_ranges(Request::new(r)).await?.into_inner();
            return forward(s, Reply::Chunk, send).await;
        }
        Call::ChunkHashes(r) => {
            let s = svc.chunk_hashes(Request::new(r)).await?.into_inner();
            return forward(s, Reply::FileHashes, send).await;
        }
    };
    reply(send, r).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_refuse_what_is_wrong() {
        let msg = QuicReply {
            reply: Some(quic_reply::Reply::Error(QuicStatus {
                code: 3,
                message: "x".repeat(300),
            })),
        };
        let bytes = msg.encode_length_delimited_to_vec();
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let mut r = &two[..];
        for _ in 0..2 {
            let f = read_frame(&mut r, 1000).await.unwrap().unwrap();
            assert_eq!(QuicReply::decode(&f[..]).unwrap(), msg);
        }
        assert!(read_frame(&mut r, 1000).await.unwrap().is_none());
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, 100).await,
            Err(FrameError::TooLarge { max: 100, .. })
        ));
        let mut r = &bytes[..bytes.len() - 1];
        assert!(matches!(
            read_frame(&mut r, 1000).await,
            Err(FrameError::Truncated)
        ));
        let mut r = &[0xffu8; 12][..];
        assert!(matches!(
            read_frame(&mut r, 1000).await,
            Err(FrameError::BadLength)
        ));
    }

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

    #[test]
    fn connections_start_with_the_initial_window_asked_for() {
        use quinn::congestion::ControllerFactory;
        for w in [MIN_INITIAL_WINDOW, DEFAULT_INITIAL_WINDOW, 5 << 20] {
            let c = congestion(w).build(std::time::Instant::now(), 1200);
            assert_eq!(c.window(), w);
        }
    }

    /// Run as root (as the test bed is), the forced options pass `net.core.rmem_max`.
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
        // Linux reports twice what was set (the other half is its bookkeeping).
        let (rcv, snd) = (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF));
        assert!(
            rcv >= SOCKET_BUFFER && snd >= SOCKET_BUFFER,
            "receive {before} -> {rcv}, send {snd}"
        );
    }
}
