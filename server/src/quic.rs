//! failbackd over QUIC (quinn), beside gRPC, carrying the same prost messages.
//!
//! QUIC gives each call its own stream inside one connection, so a lost packet stalls only
//! the stream it belongs to (HTTP/2 over TCP stalls every call behind it). A call is framed as
//! [`failback_transport::frame`] describes. The answers come from the very [`Failback`]
//! implementation the gRPC server runs, and the token from the same [`TokenCheck`]. QUIC
//! always runs TLS 1.3 ([`failback_transport::tls`]), with optional client certificates.
//!
//! Limits: a request larger than [`QuicLimits::max_request`] is refused on its stream, and so
//! is a request that does not decode; a connection may open at most
//! [`QuicLimits::max_streams_per_connection`] streams at once (QUIC's own stream credit, so an
//! over-eager client waits rather than fails), and connections past
//! [`QuicLimits::max_connections`] are refused at once. None of that stops the server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use failback_proto::v1::failback_server::Failback;
use failback_proto::v1::{QuicReply, QuicRequest, quic_reply, quic_request};
use failback_transport::frame::{status_reply, write_frame};
use failback_transport::tls::server_tls;
use failback_transport::tune::{self, deepen_buffers, transport_config};
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Status};

use crate::service::{FailbackService, TokenCheck};
use crate::{Config, ServeError};

/// How long a client may take to send its request once it opened a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// ([`DEFAULT_INITIAL_WINDOW`](failback_transport::tune::DEFAULT_INITIAL_WINDOW)).
    pub initial_window: u64,
}

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_request: failback_proto::limits::MAX_REQUEST,
            // The client keeps at most 256 reads (--jobs) plus a few small calls in flight.
            max_streams_per_connection: 300,
            max_connections: 64,
            initial_window: tune::DEFAULT_INITIAL_WINDOW,
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
        Call::Changes(r) => {
            let s = svc.changes(Request::new(r)).await?.into_inner();
            return forward(s, Reply::Changes, send).await;
        }
        Call::BackupWindow(r) => {
            let s = svc.backup_window(Request::new(r)).await?.into_inner();
            return forward(s, Reply::BackupWindow, send).await;
        }
        Call::EndBackupWindow(r) => {
            Reply::EndBackupWindow(svc.end_backup_window(Request::new(r)).await?.into_inner())
        }
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
