//! failbackd over QUIC against clients that misbehave on purpose: floods of requests without
//! the token that never finish, idle connections that would take every slot, connections that
//! never authenticate, and one past the limit; a real client is served beside each. (gRPC's
//! own: `tests/tests/hostile_grpc.rs`.)
//!
//! In process, on loopback, over a data directory holding only a real control file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failback_proto::v1::{self as pb, QuicReply, QuicRequest, quic_reply::Reply, quic_request};
use failback_server::Config;
use failback_transport::frame::read_frame;
use failback_transport::tls::client_tls;
use failback_transport::tune::transport_config;
use prost::Message;
use tonic::Code;

const CONTROL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../common/tests/data/control/pg16/pg_control.shutdown"
);
const TOKEN: &str = "right-token";
/// What a test waits at most for an answer the server gives at once (the old server waited
/// for whole requests that never came).
const PROMPTLY: Duration = Duration::from_secs(15);

/// failbackd serving QUIC with a token, its audit lines collected.
struct Server {
    addr: SocketAddr,
    cert: Vec<u8>,
    control: Vec<u8>,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    dir: PathBuf,
}

impl Server {
    async fn start(name: &str, adjust: impl FnOnce(&mut Config)) -> Server {
        let dir = std::env::temp_dir().join(format!("hostile-quic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("global")).unwrap();
        let control = std::fs::read(CONTROL).unwrap();
        std::fs::write(dir.join("global/pg_control"), &control).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.pem().into_bytes();
        let mut config = Config::new(&dir);
        config.tls = Some((cert.clone(), ck.signing_key.serialize_pem().into_bytes()));
        config.token = Some(TOKEN.into());
        adjust(&mut config);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        config.audit = Arc::new(failback_server::audit::Audit::to(move |l| {
            l2.lock().unwrap().push(l.to_string())
        }));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            failback_server::quic::serve_quic(socket, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("failbackd serves QUIC");
        });
        Server {
            addr,
            cert,
            control,
            lines,
            stop: Some(stop),
            dir,
        }
    }

    /// A client endpoint of its own (its own UDP socket), trusting the server's certificate.
    fn endpoint(&self) -> quinn::Endpoint {
        let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(client_tls(&self.cert, None).unwrap()));
        // The client's own settings: keep-alives every 10 s, as failback's.
        config.transport_config(Arc::new(transport_config(1 << 20, 0, 1 << 20)));
        e.set_default_client_config(config);
        e
    }

    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        endpoint.connect(self.addr, "localhost").unwrap().await
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(token: &str, call: quic_request::Call) -> Vec<u8> {
    QuicRequest {
        token: token.into(),
        call: Some(call),
    }
    .encode_length_delimited_to_vec()
}

fn control_file_request(token: &str) -> Vec<u8> {
    request(
        token,
        quic_request::Call::ControlFile(pb::ControlFileRequest {}),
    )
}

/// Sends `bytes` as a whole request on a new stream and reads every reply; the error, as the
/// client would show it, when the stream or the connection breaks.
async fn call(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<Reply>, String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // The server may stop reading (a refused request): then the write fails.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let mut recv = tokio::io::BufReader::new(recv);
    let mut out = Vec::new();
    loop {
        match read_frame(&mut recv, 32 << 20).await {
            Ok(Some(f)) => out.push(QuicReply::decode(&f[..]).unwrap().reply.unwrap()),
            Ok(None) => return Ok(out),
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(e) = src {
                    s += &format!(": {e}");
                    src = e.source();
                }
                return Err(s);
            }
        }
    }
}

/// The control file, asked with `token`.
async fn control_file(conn: &quinn::Connection, token: &str) -> Result<Vec<u8>, String> {
    match &call(conn, &control_file_request(token)).await?[..] {
        [Reply::ControlFile(c)] => Ok(c.data.to_vec()),
        other => Err(format!("not a control file: {other:?}")),
    }
}

/// The one error a call ended with.
fn error_code(replies: &[Reply]) -> Code {
    match replies {
        [Reply::Error(s)] => Code::from_i32(s.code),
        other => panic!("expected one error, got {other:?}"),
    }
}

/// Opens a stream and sends `bytes`, the head of a request that announces more, never
/// finishing it: the server's first answer, and whether (with which code) it stopped reading.
async fn unfinished(conn: quinn::Connection, bytes: Vec<u8>) -> (Code, Option<quinn::VarInt>) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = tokio::io::BufReader::new(recv);
    let (_, frame) = tokio::join!(
        async {
            // Fails once the server stops reading; never finished either way.
            let _ = send.write_all(&bytes).await;
        },
        read_frame(&mut recv, 1 << 20)
    );
    let frame = frame.unwrap().expect("an answer");
    let code = error_code(&[QuicReply::decode(&frame[..]).unwrap().reply.unwrap()]);
    let stopped = send.stopped().await.unwrap();
    (code, stopped)
}

/// The head of a request that announces `len` bytes, carrying `token` (field 1) if any and
/// then the start of a ReadRanges (field 6) that never ends: `sent` bytes in all.
fn announcing(len: usize, token: Option<&str>, sent: usize) -> Vec<u8> {
    let mut b = Vec::new();
    prost::encoding::encode_varint(len as u64, &mut b);
    if let Some(t) = token {
        prost::encoding::string::encode(1, &t.to_string(), &mut b);
    }
    b.push(0x32);
    prost::encoding::encode_varint((len - b.len()) as u64, &mut b);
    b.resize(sent, 0x0a);
    b
}

/// Streams that announce a request of 8 MiB without the token (or with a wrong one) and
/// never finish it, 24 on each of three connections, are each answered at once as
/// unauthenticated and stopped from their head, and logged; a real client is served
/// meanwhile, and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unauthenticated_flood_is_refused_from_each_request_s_head() {
    let server = Server::start("flood", |_| {}).await;
    let attacker = server.endpoint();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let conn = server.connect(&attacker).await.unwrap();
        for i in 0..24 {
            let token = [None, Some("wrong"), Some("")][i % 3];
            let head = announcing(8 << 20, token, 16 << 10);
            streams.push(tokio::spawn(unfinished(conn.clone(), head)));
        }
    }
    let client = server.endpoint();
    let conn = server.connect(&client).await.unwrap();
    assert_eq!(control_file(&conn, TOKEN).await.unwrap(), server.control);
    let answers = tokio::time::timeout(PROMPTLY, async {
        let mut out = Vec::new();
        for s in streams {
            out.push(s.await.unwrap());
        }
        out
    })
    .await
    .expect("the unfinished unauthenticated requests were not answered at once");
    for (code, stopped) in answers {
        assert_eq!(code, Code::Unauthenticated);
        assert_eq!(stopped, Some(quinn::VarInt::from_u32(1)), "not stopped");
    }
    assert_eq!(control_file(&conn, TOKEN).await.unwrap(), server.control);
    let log = server.log();
    assert!(
        log.contains("refused a QUIC request from 127.0.0.1:")
            && log.contains("(QUIC connection")
            && log.contains("missing or wrong bearer token"),
        "{log}"
    );
}

/// Idle connections that completed their handshake and never send anything, twice as many as
/// `--quic-max-connections`, cannot lock a real client out: the oldest give way (and are
/// told so), and the client's call is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_cannot_lock_a_client_out() {
    let server = Server::start("lockout", |c| c.quic.max_connections = 8).await;
    let attacker = server.endpoint();
    let mut idle = Vec::new();
    for _ in 0..16 {
        if let Ok(c) = server.connect(&attacker).await {
            idle.push(c);
        }
    }
    let client = server.endpoint();
    let conn = server
        .connect(&client)
        .await
        .expect("a real client was refused beside idle connections");
    assert_eq!(control_file(&conn, TOKEN).await.unwrap(), server.control);
    assert_eq!(idle.len(), 16, "idle connections were refused at once");
    // The first nine gave way: eight to the later idle ones, one to the client.
    for (i, c) in idle.iter().take(9).enumerate() {
        let closed = tokio::time::timeout(PROMPTLY, c.closed())
            .await
            .unwrap_or_else(|_| panic!("idle connection {i} is still open"));
        match closed {
            quinn::ConnectionError::ApplicationClosed(a) => {
                assert_eq!(a.error_code, quinn::VarInt::from_u32(4), "{i}: {a}")
            }
            other => panic!("idle connection {i}: {other}"),
        }
    }
    let log = server.log();
    assert!(
        log.contains("ended a QUIC connection of 127.0.0.1:") && log.contains("oldest"),
        "{log}"
    );
}

/// A connection that does not authenticate within its deadline is closed and told why,
/// whether it sends nothing or only a wrong token (the client's keep-alives do not keep it);
/// an authenticated connection, and an idle one from the same client socket (failback's
/// other `--connections`), are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_that_does_not_authenticate_is_closed_at_its_deadline() {
    let server = Server::start("deadline", |c| {
        c.quic.auth_timeout = Duration::from_secs(1);
        c.quic.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let client = server.endpoint();
    let first = server.connect(&client).await.unwrap();
    let second = server.connect(&client).await.unwrap();
    assert_eq!(control_file(&first, TOKEN).await.unwrap(), server.control);

    let attacker = server.endpoint();
    let silent = server.connect(&attacker).await.unwrap();
    let wrong = server.connect(&attacker).await.unwrap();
    assert_eq!(
        error_code(&call(&wrong, &control_file_request("wrong")).await.unwrap()),
        Code::Unauthenticated
    );
    for c in [&silent, &wrong] {
        match tokio::time::timeout(PROMPTLY, c.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(a)) => {
                assert_eq!(a.error_code, quinn::VarInt::from_u32(3), "{a}");
                let reason = String::from_utf8_lossy(&a.reason);
                assert!(
                    reason.contains("no request with the right token within 1 s"),
                    "{reason}"
                );
            }
            Ok(other) => panic!("closed otherwise: {other}"),
            Err(_) => panic!("a connection that never authenticated is still open"),
        }
    }
    // Well past two deadlines: the client's connections still answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(control_file(&first, TOKEN).await.unwrap(), server.control);
    assert_eq!(control_file(&second, TOKEN).await.unwrap(), server.control);
    let log = server.log();
    assert!(
        log.contains("ended a QUIC connection of 127.0.0.1:")
            && log.contains("no request with the right token within 1 s"),
        "{log}"
    );
}

/// With every slot taken by authenticated connections, one more is closed when it
/// authenticates, with a reason the client shows; once a slot is free, a client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_past_the_limit_is_told_why() {
    let server = Server::start("busy", |c| c.quic.max_connections = 2).await;
    let client = server.endpoint();
    let mut served = Vec::new();
    for _ in 0..2 {
        let c = server.connect(&client).await.unwrap();
        assert_eq!(control_file(&c, TOKEN).await.unwrap(), server.control);
        served.push(c);
    }
    let third = server
        .connect(&client)
        .await
        .expect("a third connection could not even shake hands");
    let err = control_file(&third, TOKEN).await.unwrap_err();
    assert!(
        err.contains(
            "failbackd serves 2 QUIC connections already; try again later or raise \
             --quic-max-connections"
        ),
        "{err}"
    );
    assert!(
        server
            .log()
            .contains("refused a QUIC connection from 127.0.0.1:"),
        "{}",
        server.log()
    );
    served
        .pop()
        .unwrap()
        .close(quinn::VarInt::from_u32(0), b"done");
    let again = tokio::time::timeout(PROMPTLY, async {
        loop {
            let c = server.connect(&client).await.unwrap();
            if let Ok(bytes) = control_file(&c, TOKEN).await {
                break bytes;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the freed slot stays taken");
    assert_eq!(again, server.control);
}

/// On an authenticated connection every request is still checked from its head: a wrong
/// token, or none, is refused at once (unfinished, it is stopped), and so is a request that
/// announces more than the limit; the right token is served before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_is_checked_from_its_head() {
    let server = Server::start("head", |_| {}).await;
    let client = server.endpoint();
    let conn = server.connect(&client).await.unwrap();
    assert_eq!(control_file(&conn, TOKEN).await.unwrap(), server.control);
    let answers = tokio::time::timeout(PROMPTLY, async {
        [
            unfinished(conn.clone(), announcing(512 << 10, Some("wrong"), 4096)).await,
            unfinished(conn.clone(), announcing(512 << 10, None, 4096)).await,
            unfinished(conn.clone(), announcing(2 << 20, Some(TOKEN), 4096)).await,
        ]
    })
    .await
    .expect("unfinished requests were not answered from their head");
    let stop = Some(quinn::VarInt::from_u32(1));
    assert_eq!(answers[0], (Code::Unauthenticated, stop));
    assert_eq!(answers[1], (Code::Unauthenticated, stop));
    assert_eq!(answers[2], (Code::ResourceExhausted, stop));
    // Whole requests too.
    let replies = call(&conn, &control_file_request("")).await.unwrap();
    assert_eq!(error_code(&replies), Code::Unauthenticated);
    assert_eq!(control_file(&conn, TOKEN).await.unwrap(), server.control);
    let log = server.log();
    assert!(
        log.contains("refused a QUIC request from 127.0.0.1:")
            && log.contains("missing or wrong bearer token")
            && log.contains("over the limit"),
        "{log}"
    );
}

/// Without a token the handshake authenticates: a connection reserves its slot as it comes,
/// so a client whose handshakes completed is served on every connection it opened, and one
/// past the limit is refused at once; a slot frees when its connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_token_the_handshake_takes_the_slot() {
    let server = Server::start("no-token", |c| {
        c.token = None;
        c.quic.max_connections = 2;
    })
    .await;
    let client = server.endpoint();
    let mut conns = Vec::new();
    for _ in 0..2 {
        conns.push(server.connect(&client).await.unwrap());
    }
    assert!(
        server.connect(&client).await.is_err(),
        "a third connection was let in"
    );
    for c in &conns {
        assert_eq!(control_file(c, "").await.unwrap(), server.control);
    }
    conns
        .pop()
        .unwrap()
        .close(quinn::VarInt::from_u32(0), b"done");
    let again = tokio::time::timeout(PROMPTLY, async {
        loop {
            if let Ok(c) = server.connect(&client).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the freed slot stays taken");
    assert_eq!(control_file(&again, "").await.unwrap(), server.control);
    assert!(
        server
            .log()
            .contains("refused a QUIC connection from 127.0.0.1:")
            && server
                .log()
                .contains("failbackd serves 2 QUIC connections already"),
        "{}",
        server.log()
    );
}
