//! Certificates as an operator makes them, on both transports: `failback certs new`'s for a
//! real rewind (TLS, token and client certificate), a self-signed one from the real `openssl
//! req -x509` given as `--ca`, `--server-fingerprint`, and every TLS failure explained in
//! words that say what to do.

mod support;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use failback_client::certs;
use failback_client::source::SourceError;
use failback_client::source::remote::RemoteOptions;
use failback_server::Config;
use failback_tests::{Cluster, ClusterOptions, PgMajor};
use failback_transport::tls::Fingerprint;
use support::*;

/// `failback certs new` for `localhost` and 127.0.0.1 in a fresh directory.
fn certs_new(dir: &Path) -> String {
    let out = Command::new(failback_tests::programs::failback())
        .args(["certs", "new", "--dir"])
        .arg(dir)
        .args(["--server-name", "localhost", "--server-name", "127.0.0.1"])
        .args(["--client-name", "old-primary"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("failback-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// failbackd on both transports with `dir`'s server certificate, `--client-ca dir/ca.crt`
/// and a token, serving `pgdata`.
fn serve_certs_new(dir: &Path, pgdata: &Path) -> Failbackd {
    let mut config = Failbackd::config(pgdata);
    config.tls = Some((read(dir, "server.crt"), read(dir, "server.key")));
    config.client_ca = Some(read(dir, "ca.crt"));
    config.token = Some("tls-token".into());
    Failbackd::serve(config, true)
}

/// A real rewind by the `failback` binary over `url(server)` with `certs new`'s files.
fn rewind_with_certs_new(name: &str, url: fn(&Failbackd) -> String) {
    let dir = scratch(name);
    let summary = certs_new(&dir);
    let (primary, new_primary) = diverged(PgMajor::V15);
    let server = serve_certs_new(&dir, &new_primary.data_dir());
    let mut extra = Vec::<OsString>::new();
    for (flag, file) in [
        ("--ca", "ca.crt"),
        ("--cert", "client.crt"),
        ("--key", "client.key"),
    ] {
        assert!(
            summary.contains(&format!("{flag} {}", dir.join(file).display())),
            "{summary}"
        );
        extra.push(flag.into());
        extra.push(dir.join(file).into());
    }
    cli_rewind(&primary, &new_primary, &url(&server), "tls-token", &extra);
    drop(server);
    rejoin_and_compare(primary, new_primary);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn certs_new_serves_a_rewind_over_quic() {
    rewind_with_certs_new("quic", Failbackd::quic_url);
}

#[test]
fn certs_new_serves_a_rewind_over_grpcs() {
    rewind_with_certs_new("grpcs", Failbackd::tls_url);
}

#[test]
fn certs_new_keeps_keys_private_and_files_in_place() {
    let dir = scratch("files");
    let summary = certs_new(&dir);
    for f in certs::FILES {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        let want = if f.ends_with(".key") { 0o600 } else { 0o644 };
        assert_eq!(mode, want, "{f}: {mode:o}");
    }
    // The fingerprint it prints is the server certificate's, as `certs fingerprint` says.
    let fp = Command::new(failback_tests::programs::failback())
        .args(["certs", "fingerprint"])
        .arg(dir.join("server.crt"))
        .output()
        .unwrap();
    assert!(fp.status.success(), "{fp:?}");
    let fp = String::from_utf8(fp.stdout).unwrap();
    let want = Fingerprint::of_pem(&read(&dir, "server.crt"), "server.crt").unwrap();
    assert_eq!(fp.trim(), want.to_string());
    assert!(
        summary.contains(&format!("--server-fingerprint {want}")),
        "{summary}"
    );
    // Nothing is replaced without --force.
    let before = read(&dir, "server.key");
    let again = Command::new(failback_tests::programs::failback())
        .args(["certs", "new", "--server-name", "db1", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already has ca.crt") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(read(&dir, "server.key"), before);
    let forced = Command::new(failback_tests::programs::failback())
        .args(["certs", "new", "--server-name", "db1", "--force", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(read(&dir, "server.key"), before);
    let mode = std::fs::metadata(dir.join("server.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// failbackd serving a fresh cluster (the handshake reads its control file) on both
/// transports, with `tls` and, given, `--client-ca`.
fn serve_tls(
    name: &str,
    tls: (Vec<u8>, Vec<u8>),
    client_ca: Option<Vec<u8>>,
) -> (Failbackd, Cluster) {
    let cluster = Cluster::init(PgMajor::V15, name, ClusterOptions::default());
    let mut config = Config::new(cluster.data_dir());
    config.tls = Some(tls);
    config.client_ca = client_ca;
    (Failbackd::serve(config, true), cluster)
}

fn connect(
    url: &str,
    ca: Option<&[u8]>,
    pin: Option<Fingerprint>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<(), SourceError> {
    certs::connect(
        RemoteOptions {
            ca: ca.map(<[u8]>::to_vec),
            identity,
            connections: 1,
            ..options(url.to_string(), None)
        },
        pin,
    )
    .map(drop)
}

/// The refusal's words, for a connection that must fail.
fn refusal(r: Result<(), SourceError>) -> String {
    match r {
        Ok(()) => panic!("connected, where a refusal was expected"),
        Err(e @ SourceError::Refused { .. }) => e.to_string(),
        Err(e) => panic!("expected a refusal in words, got {e}"),
    }
}

/// Both transports, by name (`localhost`) and by address (127.0.0.1).
fn urls(server: &Failbackd) -> Vec<String> {
    let (g, q) = (server.addr().port(), server.quic_addr().port());
    vec![
        format!("grpcs://localhost:{g}"),
        format!("quic://localhost:{q}"),
        format!("grpcs://127.0.0.1:{g}"),
        format!("quic://127.0.0.1:{q}"),
    ]
}

/// What most guides make: `openssl req -x509` with a CN of `cn`, no subjectAltName, marked as
/// a CA (basicConstraints CA:TRUE, openssl's default for -x509). (certificate, key), PEM.
fn openssl_self_signed(dir: &Path, cn: &str) -> (Vec<u8>, Vec<u8>) {
    let (crt, key) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{out:?}");
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&crt)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CA:TRUE") && !text.contains("Subject Alternative Name"),
        "{text}"
    );
    (std::fs::read(crt).unwrap(), std::fs::read(key).unwrap())
}

#[test]
fn an_openssl_certificate_given_as_ca_is_pinned_on_both_transports() {
    let dir = scratch("openssl");
    // Its only name is db1: neither localhost nor 127.0.0.1 that the URLs dial.
    let (cert, key) = openssl_self_signed(&dir, "db1");
    let (server, _cluster) = serve_tls("tls-openssl", (cert.clone(), key), None);
    for url in urls(&server) {
        // Trusted because it is that very certificate: its CA flag and names are not asked.
        connect(&url, Some(&cert), None, None).unwrap_or_else(|e| panic!("{url}: {e}"));
        // Another certificate made the same way is another key: refused, in words.
        let (other, _) = openssl_self_signed(&dir, "db2");
        let why = refusal(connect(&url, Some(&other), None, None));
        assert!(
            why.contains("CA certificate") && why.contains("--ca"),
            "{url}: {why}"
        );
    }
    // The CLI says so too.
    let out = Command::new(failback_tests::programs::failback())
        .args(["rewind", "-D", "/nonexistent", "--source"])
        .arg(format!("grpcs://localhost:{}", server.addr().port()))
        .arg("--ca")
        .arg(dir.join("db2.crt"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--server-fingerprint") && err.contains("failback certs"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fingerprint_pins_failbackd_and_a_wrong_one_says_which() {
    let dir = scratch("pin");
    let (cert, key) = openssl_self_signed(&dir, "db1");
    let right = Fingerprint::of_pem(&cert, "cert").unwrap();
    let wrong = Fingerprint([7; 32]);
    let (server, _cluster) = serve_tls("tls-pin", (cert, key), None);
    for url in urls(&server) {
        connect(&url, None, Some(right), None).unwrap_or_else(|e| panic!("{url}: {e}"));
        let why = refusal(connect(&url, None, Some(wrong), None));
        assert!(
            why.contains(&format!("has fingerprint {right}, not {wrong}")),
            "{url}: {why}"
        );
    }
    // The flag, through the CLI: a typo is a usage error naming the form.
    let out = Command::new(failback_tests::programs::failback())
        .args(["rewind", "-D", "/x", "--source", "quic://localhost:1"])
        .args(["--server-fingerprint", "sha256:abc"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 hex digits"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_ca_wrong_name_and_client_certificates_are_explained() {
    let ca = Ca::new("pair CA");
    let stranger = Ca::new("another CA");
    let (server, _cluster) = serve_tls(
        "tls-words",
        ca.issue("localhost", false),
        Some(ca.pem.clone()),
    );
    let ours = ca.issue("old-primary", true);
    let theirs = stranger.issue("old-primary", true);
    for url in urls(&server) {
        let by_name = url.contains("localhost");
        // A certificate from another CA: give the right CA, or pin.
        let why = refusal(connect(&url, Some(&stranger.pem), None, Some(ours.clone())));
        assert!(
            why.contains("not signed by --ca")
                && why.contains("failback certs fingerprint server.crt"),
            "{url}: {why}"
        );
        if !by_name {
            // The certificate names localhost only: dialled by address, the names are said.
            let why = refusal(connect(&url, Some(&ca.pem), None, Some(ours.clone())));
            assert!(
                why.contains("is for localhost, not for 127.0.0.1")
                    && why.contains("failback certs new --server-name 127.0.0.1"),
                "{url}: {why}"
            );
            continue;
        }
        // failbackd asks for a client certificate: none, or one from another CA.
        for identity in [None, Some(theirs.clone())] {
            let why = refusal(connect(&url, Some(&ca.pem), None, identity));
            assert!(
                why.contains("--cert and --key") && why.contains("--client-ca"),
                "{url}: {why}"
            );
        }
        connect(&url, Some(&ca.pem), None, Some(ours.clone()))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn plain_and_tls_mixed_up_are_explained() {
    let (cert, key) = self_signed("localhost");
    let (tls, cluster) = serve_tls("tls-mixed", (cert.clone(), key), None);
    let port = tls.addr().port();
    let why = refusal(connect(
        &format!("grpc://localhost:{port}"),
        None,
        None,
        None,
    ));
    assert!(
        why.contains(&format!("use grpcs://localhost:{port}")),
        "{why}"
    );

    let plain = Failbackd::start(&cluster.data_dir(), None);
    let port = plain.addr().port();
    let why = refusal(connect(
        &format!("grpcs://localhost:{port}"),
        Some(&cert),
        None,
        None,
    ));
    assert!(
        why.contains(&format!("use grpc://localhost:{port}")),
        "{why}"
    );
}
