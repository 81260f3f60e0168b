//! failbackd over QUIC (`--source quic://host:port`).
//!
//! Only the transport lives here: one quinn connection (TLS 1.3 always, so `--ca` or
//! `--server-fingerprint` is required; `--cert/--key` when failbackd asks for client
//! certificates; a failed handshake explained by [`failback_transport::tls::hint`]), and one
//! bidirectional stream per call, framed as [`failback_transport::frame`] describes. Batching,
//! verification and retries are [`super::remote`]'s, exactly as over gRPC; `--jobs` reads run
//! as that many streams of the one connection, each with its own flow control, so a lost
//! packet delays one of them and not all. A connection that breaks or goes silent for the
//! liveness `--timeout` sets (keep-alives unanswered) is closed and a new one made.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use failback_proto::limits::MAX_REPLY;
use failback_proto::v1 as pb;
use failback_proto::v1::{QuicReply, QuicRequest, quic_reply::Reply, quic_request::Call};
use failback_transport::frame::{read_frame, reply_status, write_frame};
use failback_transport::tls::{
    Dialled, Failure, Fingerprint, Refusals, ServerTrust, hint, quic_client_tls,
};
use failback_transport::tune::{self, DEFAULT_INITIAL_WINDOW, DEFAULT_WINDOW, transport_config};
use failback_transport::url::Scheme;
use prost::Message;
use tokio::io::BufReader;
use tonic::Status;

use super::SourceError;
use super::remote::{
    CONNECT_TIMEOUT, ChunkStream, Current, Held, RemoteOptions, RemoteSource, Transport, chain,
    runtime,
};

/// failbackd over QUIC.
pub type QuicSource = RemoteSource<QuicTransport>;

/// The longest a finished client waits for its close to leave before it exits: long enough
/// for a busy machine to give the connection's driver its turn (20 ms was not, on two loaded
/// cores, and failbackd then held an abandoned backup window until its idle timeout), short
/// beside a rewind. The wait ends as soon as the close has been sent ([`sent_more`]).
const CLOSE_GRACE: Duration = Duration::from_millis(200);
/// How many milliseconds a finished client waits at most for its connection to fall quiet
/// before it closes it, and for the close once a datagram it cannot tell from the close left.
const QUIET_CHECKS: usize = 5;

/// One QUIC connection to failbackd, the token every call carries, and where to connect again.
#[derive(Clone)]
pub struct QuicTransport {
    current: Arc<Current<quinn::Connection>>,
    addr: SocketAddr,
    host: Arc<str>,
    token: String,
    /// Why a TLS handshake failed, in words: see [`Tls::explain`].
    tls: Arc<Tls>,
    // The endpoint drives the connection's socket; it lives as long as the connection.
    endpoint: quinn::Endpoint,
}

fn lost(e: impl std::error::Error + 'static) -> Status {
    Status::unavailable(format!("QUIC: {}", chain(&e)))
}

/// The replies of one call, up to its end or its error.
pub struct Replies {
    recv: BufReader<quinn::RecvStream>,
    done: bool,
}

impl Replies {
    async fn next(&mut self) -> Result<Option<Reply>, Status> {
        if self.done {
            return Ok(None);
        }
        let Some(frame) = read_frame(&mut self.recv, MAX_REPLY).await.map_err(lost)? else {
            self.done = true;
            return Ok(None);
        };
        let reply = QuicReply::decode(&frame[..])
            .map_err(|e| Status::internal(format!("malformed reply from failbackd: {e}")))?;
        match reply.reply {
            Some(Reply::Error(s)) => {
                self.done = true;
                Err(reply_status(s))
            }
            Some(r) => Ok(Some(r)),
            None => Err(Status::internal("an empty reply from failbackd")),
        }
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!(
        "failbackd answered with something other than {what}"
    ))
}

/// The chunks of one ReadRanges call.
pub struct QuicChunks(Replies);

impl ChunkStream for QuicChunks {
    async fn next(&mut self) -> Result<Option<pb::Chunk>, Status> {
        match self.0.next().await? {
            None => Ok(None),
            Some(Reply::Chunk(c)) => Ok(Some(c)),
            Some(_) => Err(unexpected("a chunk")),
        }
    }
}

impl QuicTransport {
    /// Opens a stream, sends the request and finishes the sending side.
    async fn call(&self, call: Call) -> Result<Replies, Status> {
        let (mut send, recv) = self.current.get().open_bi().await.map_err(lost)?;
        let req = QuicRequest {
            token: self.token.clone(),
            call: Some(call),
        };
        write_frame(&mut send, &req).await.map_err(lost)?;
        send.finish().map_err(lost)?;
        Ok(Replies {
            recv: BufReader::with_capacity(64 << 10, recv),
            done: false,
        })
    }

    async fn unary<T>(&self, call: Call, pick: fn(Reply) -> Option<T>) -> Result<T, Status> {
        match self.call(call).await?.next().await? {
            Some(r) => pick(r).ok_or_else(|| unexpected("the answer asked for")),
            None => Err(Status::unavailable(
                "failbackd finished the call without an answer",
            )),
        }
    }
}

impl Transport for QuicTransport {
    type Chunks = QuicChunks;

    async fn handshake(&self, req: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, Status> {
        let answer = self
            .unary(Call::Handshake(req), |r| match r {
                Reply::Handshake(h) => Some(h),
                _ => None,
            })
            .await;
        // TLS 1.3 lets the client finish its handshake before failbackd has checked the
        // client's certificate: a refusal closes the connection at the first call.
        answer.map_err(|s| match self.current.get().close_reason() {
            Some(closed) => match self.tls.explain(&closed) {
                Some(words) => Status::permission_denied(words),
                None => s,
            },
            None => s,
        })
    }

    async fn control_file(&self) -> Result<pb::ControlFileResponse, Status> {
        self.unary(Call::ControlFile(pb::ControlFileRequest {}), |r| match r {
            Reply::ControlFile(c) => Some(c),
            _ => None,
        })
        .await
    }

    async fn list_files(&self) -> Result<Vec<pb::FileEntry>, Status> {
        let mut replies = self.call(Call::ListFiles(pb::ListFilesRequest {})).await?;
        let mut out = Vec::new();
        while let Some(r) = replies.next().await? {
            match r {
                Reply::FileEntry(e) => out.push(e),
                _ => return Err(unexpected("a file entry")),
            }
        }
        Ok(out)
    }

    async fn read_ranges(&self, req: pb::ReadRangesRequest) -> Result<QuicChunks, Status> {
        Ok(QuicChunks(self.call(Call::ReadRanges(req)).await?))
    }

    async fn timelines(&self) -> Result<pb::TimelinesResponse, Status> {
        self.unary(Call::Timelines(pb::TimelinesRequest {}), |r| match r {
            Reply::Timelines(t) => Some(t),
            _ => None,
        })
        .await
    }

    async fn chunk_hashes(
        &self,
        req: pb::ChunkHashesRequest,
    ) -> Result<Vec<pb::FileHashes>, Status> {
        let mut replies = self.call(Call::ChunkHashes(req)).await?;
        let mut out = Vec::new();
        while let Some(r) = replies.next().await? {
            match r {
                Reply::FileHashes(h) => out.push(h),
                _ => return Err(unexpected("file hashes")),
            }
        }
        Ok(out)
    }

    async fn end_of_wal(&self) -> Result<pb::EndOfWalResponse, Status> {
        self.unary(Call::EndOfWal(pb::EndOfWalRequest {}), |r| match r {
            Reply::EndOfWal(e) => Some(e),
            _ => None,
        })
        .await
    }

    async fn backup_window(
        &self,
        req: pb::BackupWindowRequest,
    ) -> Result<(pb::BackupWindowReply, Held), Status> {
        let mut replies = self.call(Call::BackupWindow(req)).await?;
        match replies.next().await? {
            Some(Reply::BackupWindow(w)) => Ok((w, Box::new(replies))),
            Some(_) => Err(unexpected("a backup window")),
            None => Err(Status::unavailable(
                "failbackd ended the window's call at once",
            )),
        }
    }

    async fn end_backup_window(
        &self,
        req: pb::EndBackupWindowRequest,
    ) -> Result<pb::EndBackupWindowResponse, Status> {
        self.unary(Call::EndBackupWindow(req), |r| match r {
            Reply::EndBackupWindow(e) => Some(e),
            _ => None,
        })
        .await
    }

    async fn changes(&self, req: pb::ChangesRequest) -> Result<Vec<pb::ChangesReply>, Status> {
        let mut replies = self.call(Call::Changes(req)).await?;
        let mut out = Vec::new();
        while let Some(r) = replies.next().await? {
            match r {
                Reply::Changes(c) => out.push(c),
                _ => return Err(unexpected("changes")),
            }
        }
        Ok(out)
    }

    fn generation(&self) -> u64 {
        self.current.generation()
    }

    async fn reconnect(&self, generation: u64) {
        self.current
            .replace(generation, |broken| async move {
                // Calls still waiting on it fail now rather than at its idle timeout.
                broken.close(quinn::VarInt::from_u32(1), b"connection replaced");
                connect_one(&self.endpoint, self.addr, &self.host, &self.tls)
                    .await
                    .ok()
            })
            .await;
    }

    async fn close(&self) {
        let conn = self.current.get();
        if conn.close_reason().is_some() {
            // Closed already (by failbackd, or its idle timeout): nothing left to send.
            return;
        }
        // Let the driver first send what was queued last (the streams the source dropped just
        // before, which it tells failbackd about), so that what it sends next is the close.
        let mut before = conn.stats().udp_tx.datagrams;
        for _ in 0..QUIET_CHECKS {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = conn.stats().udp_tx.datagrams;
            if now == before {
                break;
            }
            before = now;
        }
        conn.close(quinn::VarInt::from_u32(0), b"failback is done");
        let after = conn.stats().udp_tx.datagrams;
        // The connection's driver sends CONNECTION_CLOSE at its next turn; wait for that turn
        // and no longer. Not for the endpoint to go idle: the closing state lasts three probe
        // timeouts (some 80 ms on an idle loopback, 200 ms and more on a busy one or across a
        // continent), nothing acknowledges a close, and a lost one only makes failbackd free
        // the connection at its idle timeout.
        let left = async {
            if after == before {
                sent_more(&conn, after).await;
            } else {
                // A datagram left between the two counts: on a connection quiet a moment
                // before, the close (the driver runs on another thread, and often took its
                // turn at once). Should it have been the last of what came before, the close
                // follows it at the driver's next turn: a few milliseconds are given for that.
                let _ = tokio::time::timeout(
                    Duration::from_millis(QUIET_CHECKS as u64),
                    sent_more(&conn, after),
                )
                .await;
            }
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, left).await;
    }
}

/// Returns once `conn` has sent more than `count` datagrams. Its driver counts a datagram and
/// hands it to the socket under the lock [`quinn::Connection::stats`] takes, so a count seen
/// higher is a datagram gone to the socket (unless the socket was full, when the driver keeps
/// it for its next turn; a rewind's end leaves the socket's 8 MiB buffer idle).
async fn sent_more(conn: &quinn::Connection, count: u64) {
    while conn.stats().udp_tx.datagrams == count {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The client's TLS: how it dialled and what its verifier refused, for the words of a
/// failed handshake.
struct Tls {
    dialled: Dialled,
    refusals: Refusals,
}

impl Tls {
    /// What to do about a connection TLS ended, if TLS ended it (either end's alert).
    fn explain(&self, closed: &quinn::ConnectionError) -> Option<String> {
        let code = match closed {
            quinn::ConnectionError::TransportError(e) => u64::from(e.code),
            quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
            _ => return None,
        };
        Some(hint(
            &Failure::from_quic_code(code, &self.refusals)?,
            &self.dialled,
        ))
    }
}

/// Why a connection could not be made.
enum NoConnection {
    /// TLS refused it: what to do, in words.
    Tls(String),
    Failed(String),
}

async fn connect_one(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    host: &str,
    tls: &Tls,
) -> Result<quinn::Connection, NoConnection> {
    let connecting = endpoint
        .connect(addr, host)
        .map_err(|e| NoConnection::Failed(chain(&e)))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| NoConnection::Failed(format!("no answer in {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| match tls.explain(&e) {
            Some(words) => NoConnection::Tls(words),
            None => NoConnection::Failed(chain(&e)),
        })
}

impl RemoteSource<QuicTransport> {
    /// Connects (TLS 1.3, the server's certificate checked against `--ca`) and shakes hands.
    pub fn connect(opts: RemoteOptions) -> Result<QuicSource, SourceError> {
        QuicSource::connect_with(opts, None)
    }

    /// Connects trusting failbackd by `--ca` or, given, by its certificate's fingerprint
    /// (`--server-fingerprint`), and shakes hands.
    pub fn connect_with(
        opts: RemoteOptions,
        fingerprint: Option<Fingerprint>,
    ) -> Result<QuicSource, SourceError> {
        if opts.url.scheme != Scheme::Quic {
            return Err(opts.refuse("only a quic:// source is reached over QUIC"));
        }
        let (rest, host) = (opts.url.authority.as_str(), opts.url.host.as_str());
        let trust = ServerTrust::new(opts.ca.as_deref(), fingerprint)
            .map_err(|e| opts.refuse(format!("quic:// always runs TLS: {e}")))?;
        let identity = opts.identity_pem();
        let (tls, refusals) =
            quic_client_tls(&trust, identity).map_err(|e| opts.refuse(e.to_string()))?;
        let words = Arc::new(Tls {
            dialled: Dialled {
                url: opts.url.to_string(),
                host: host.to_string(),
                authority: rest.to_string(),
                grpc: false,
                ca: opts.ca.is_some(),
                fingerprint: fingerprint.is_some(),
                identity: identity.is_some(),
            },
            refusals,
        });
        let rt = runtime("QUIC")?;
        let could_not =
            |why: String| SourceError::Transport(format!("{}: could not connect: {why}", opts.url));
        let transports = rt.block_on(async {
            let addr = tokio::net::lookup_host(rest)
                .await
                .map_err(|e| could_not(e.to_string()))?
                .next()
                .ok_or_else(|| could_not(format!("{rest} has no address")))?;
            let any: SocketAddr = if addr.is_ipv6() {
                "[::]:0".parse().expect("an address")
            } else {
                "0.0.0.0:0".parse().expect("an address")
            };
            let mut endpoint = std::net::UdpSocket::bind(any)
                .and_then(|socket| tune::endpoint(socket, None))
                .map_err(|e| could_not(chain(&e)))?;
            let mut config = quinn::ClientConfig::new(Arc::new(tls));
            // failbackd opens no streams towards the client.
            let mut transport = transport_config(DEFAULT_WINDOW, 0, DEFAULT_INITIAL_WINDOW);
            // A silent peer (failbackd stopped, the path gone) is found within the liveness,
            // whatever failbackd's own idle timeout.
            let liveness = opts.patience.liveness();
            if let Ok(idle) = quinn::IdleTimeout::try_from(liveness) {
                transport
                    .max_idle_timeout(Some(idle))
                    .keep_alive_interval(Some(liveness / 3));
            }
            config.transport_config(Arc::new(transport));
            endpoint.set_default_client_config(config);
            // Connections of one endpoint share its UDP socket; each has its own congestion
            // control and flow-control windows.
            let mut transports: Vec<QuicTransport> = Vec::with_capacity(opts.connections.max(1));
            for _ in 0..opts.connections.max(1) {
                let conn = match connect_one(&endpoint, addr, host, &words).await {
                    Ok(c) => c,
                    Err(no) => {
                        // Free the server's slots now, not at its idle timeout.
                        for t in &transports {
                            t.current
                                .get()
                                .close(quinn::VarInt::from_u32(0), b"connect failed");
                        }
                        if !transports.is_empty() {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle())
                                    .await;
                        }
                        return Err(match no {
                            NoConnection::Tls(reason) => SourceError::Refused {
                                what: opts.url.to_string(),
                                reason,
                            },
                            NoConnection::Failed(why) => could_not(why),
                        });
                    }
                };
                transports.push(QuicTransport {
                    current: Arc::new(Current::new(conn)),
                    addr,
                    host: Arc::from(host),
                    token: opts.token.clone().unwrap_or_default(),
                    tls: words.clone(),
                    endpoint: endpoint.clone(),
                });
            }
            Ok::<_, SourceError>(transports)
        })?;
        RemoteSource::handshake(rt, transports, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failback_transport::tls::{client_tls, server_tls};

    /// A finished client's close reaches the server, and the client returns as soon as it has
    /// sent it: not once its endpoint has let the connection drain (the closing state's three
    /// probe timeouts, some 80 ms even on an idle loopback), which every QUIC rewind paid.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_close_is_sent_and_not_waited_out() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
        let tls = server_tls(cert.as_bytes(), key.as_bytes(), None).unwrap();
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(tls)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            conn.closed().await
        });
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            client_tls(cert.as_bytes(), None).unwrap(),
        )));
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let transport = QuicTransport {
            current: Arc::new(Current::new(conn)),
            addr,
            host: Arc::from("localhost"),
            token: String::new(),
            tls: Arc::new(Tls {
                dialled: Dialled {
                    url: format!("quic://{addr}"),
                    host: "localhost".into(),
                    authority: addr.to_string(),
                    grpc: false,
                    ca: true,
                    fingerprint: false,
                    identity: false,
                },
                refusals: Refusals::default(),
            }),
            endpoint: endpoint.clone(),
        };
        transport.close().await;
        assert_eq!(
            endpoint.open_connections(),
            1,
            "the close waited for the connection to drain"
        );
        let why = tokio::time::timeout(Duration::from_secs(10), accepted)
            .await
            .expect("the server saw no close")
            .unwrap();
        match why {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    (u64::from(c.error_code), &c.reason[..]),
                    (0, &b"failback is done"[..])
                )
            }
            other => panic!("closed otherwise: {other:?}"),
        }
        // A second close (a source dropped after a failed call closed it) returns at once.
        transport.close().await;
    }
}
