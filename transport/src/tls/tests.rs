//! The verifier and the hints, with certificates rcgen makes here.

use super::*;

fn key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate().unwrap()
}

struct Ca {
    pem: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let k = key();
    let pem = p.self_signed(&k).unwrap().pem().into_bytes();
    Ca {
        pem,
        issuer: rcgen::Issuer::new(p, k),
    }
}

fn issue(ca: &Ca, names: &[&str]) -> rcgen::Certificate {
    let p = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap();
    p.signed_by(&key(), &ca.issuer).unwrap()
}

/// What `openssl req -x509 -subj /CN=host` makes: self-signed, CA:TRUE, no subjectAltName.
fn openssl_like(cn: &str, days: (i32, i32)) -> rcgen::Certificate {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.not_before = rcgen::date_time_ymd(days.0, 1, 1);
    p.not_after = rcgen::date_time_ymd(days.1, 1, 1);
    p.self_signed(&key()).unwrap()
}

fn pem(c: &rcgen::Certificate) -> Vec<u8> {
    c.pem().into_bytes()
}

fn verifier(ca: Option<&[u8]>, fp: Option<Fingerprint>) -> (ServerVerifier, Refusals) {
    let refusals = Refusals::default();
    let v = ServerVerifier::new(&ServerTrust::new(ca, fp).unwrap(), refusals.clone()).unwrap();
    (v, refusals)
}

fn verify(v: &ServerVerifier, cert: &rcgen::Certificate, host: &str) -> Result<(), rustls::Error> {
    v.verify_server_cert(
        cert.der(),
        &[],
        &server_name(host).unwrap(),
        &[],
        UnixTime::now(),
    )
    .map(|_| ())
}

fn dialled(host: &str) -> Dialled {
    Dialled {
        url: format!("quic://{host}:7000"),
        host: host.into(),
        authority: format!("{host}:7000"),
        grpc: false,
        ca: true,
        fingerprint: false,
        identity: false,
    }
}

/// The hint for what `v` refused last.
fn hint_of(e: rustls::Error, refusals: &Refusals, host: &str) -> String {
    hint(&Failure::from_rustls(&e, refusals).unwrap(), &dialled(host))
}

#[test]
fn a_ca_signed_certificate_is_checked_by_webpki() {
    let ca = new_ca("pair CA");
    let cert = issue(&ca, &["db1.example", "10.0.0.1"]);
    let (v, refusals) = verifier(Some(&ca.pem), None);
    verify(&v, &cert, "db1.example").unwrap();
    verify(&v, &cert, "10.0.0.1").unwrap();
    let e = verify(&v, &cert, "db2.example").unwrap_err();
    let h = hint_of(e, &refusals, "db2.example");
    assert!(h.contains("db1.example, 10.0.0.1"), "{h}");
    assert!(h.contains("not for db2.example"), "{h}");
    assert!(
        h.contains("failback certs new --server-name db2.example"),
        "{h}"
    );

    let stranger = new_ca("another CA");
    let (v, refusals) = verifier(Some(&stranger.pem), None);
    let h = hint_of(
        verify(&v, &cert, "db1.example").unwrap_err(),
        &refusals,
        "db1.example",
    );
    assert!(h.contains("not signed by --ca"), "{h}");
    assert!(h.contains("failback certs fingerprint server.crt"), "{h}");
}

#[test]
fn an_exact_copy_in_ca_is_trusted_as_it_is() {
    let cert = openssl_like("db1", (2020, 2090));
    let (v, _) = verifier(Some(&pem(&cert)), None);
    // Marked CA, no subjectAltName: webpki alone refuses it; pinned, any host name goes.
    verify(&v, &cert, "db1").unwrap();
    verify(&v, &cert, "elsewhere.example").unwrap();
    verify(&v, &cert, "127.0.0.1").unwrap();

    // Not the same certificate: webpki's verdict, in words.
    let ca = new_ca("pair CA");
    let (v, refusals) = verifier(Some(&ca.pem), None);
    let h = hint_of(verify(&v, &cert, "db1").unwrap_err(), &refusals, "db1");
    assert!(h.contains("CA certificate") && h.contains("--ca"), "{h}");
}

#[test]
fn a_pinned_certificate_keeps_its_dates() {
    let cert = openssl_like("db1", (2001, 2002));
    let (v, refusals) = verifier(Some(&pem(&cert)), None);
    let h = hint_of(verify(&v, &cert, "db1").unwrap_err(), &refusals, "db1");
    assert!(h.contains("expired on 2002-01-01 00:00:00 UTC"), "{h}");
    assert!(h.contains("failback certs new --server-name db1"), "{h}");

    let cert = openssl_like("db1", (2090, 2091));
    let (v, refusals) = verifier(None, Some(Fingerprint::of(cert.der())));
    let h = hint_of(verify(&v, &cert, "db1").unwrap_err(), &refusals, "db1");
    assert!(h.contains("valid only from 2090-01-01"), "{h}");
}

#[test]
fn a_fingerprint_pins_one_certificate() {
    let cert = openssl_like("db1", (2020, 2090));
    let other = openssl_like("db1", (2020, 2090));
    let fp = Fingerprint::of(cert.der());
    let (v, refusals) = verifier(None, Some(fp));
    verify(&v, &cert, "anything.example").unwrap();
    let e = verify(&v, &other, "db1").unwrap_err();
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    );
    let h = hint_of(e, &refusals, "db1");
    assert!(
        h.contains(&format!(
            "has fingerprint {}, not {fp}",
            Fingerprint::of(other.der())
        )),
        "{h}"
    );
    // With both, the fingerprint decides.
    let (v, _) = verifier(Some(&pem(&other)), Some(fp));
    assert!(verify(&v, &other, "db1").is_err());
    verify(&v, &cert, "db1").unwrap();
}

#[test]
fn fingerprints_read_both_spellings() {
    let fp = Fingerprint([0xab; 32]);
    let text = fp.to_string();
    assert_eq!(text, format!("sha256:{}", "ab".repeat(32)));
    assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
    let openssl = format!("sha256 Fingerprint={}", vec!["AB"; 32].join(":"));
    assert_eq!(openssl.parse::<Fingerprint>().unwrap(), fp);
    for bad in [
        "ab".repeat(32),
        "sha256:abc".into(),
        format!("sha256:{}", "zz".repeat(32)),
    ] {
        let e = bad.parse::<Fingerprint>().unwrap_err();
        assert!(e.contains("failback certs fingerprint"), "{e}");
    }
    assert!(matches!(
        ServerTrust::new(None, None),
        Err(TlsError::NoTrust)
    ));
}

#[test]
fn validity_is_read_from_the_der() {
    let cert = openssl_like("x", (1999, 2051));
    let (nb, na) = validity(cert.der()).unwrap();
    assert_eq!(when(nb), "1999-01-01 00:00:00 UTC");
    assert_eq!(when(na), "2051-01-01 00:00:00 UTC");
    assert_eq!(validity(b"\x30\x03\x02\x01\x00"), None);
}

#[test]
fn alerts_from_failbackd_name_the_client_flags() {
    let d = dialled("db1");
    let required = hint(&Failure::Alert(AlertDescription::CertificateRequired), &d);
    assert!(required.contains("--cert and --key") && required.contains("--client-ca"));
    let refusals = Refusals::default();
    // A QUIC close with TLS alert 48 (unknown CA): our certificate was refused.
    let f = Failure::from_quic_code(0x100 + 48, &refusals).unwrap();
    let h = hint(
        &f,
        &Dialled {
            identity: true,
            grpc: true,
            ..d.clone()
        },
    );
    assert!(
        h.contains("refused failback's client certificate (UnknownCA)"),
        "{h}"
    );
    assert!(h.contains("quic://"), "{h}");
    assert!(Failure::from_quic_code(0x0a, &refusals).is_none());
    let not_tls = hint(&Failure::NotTls, &d);
    assert!(not_tls.contains("use grpc://db1:7000"), "{not_tls}");
    let serves = hint(&Failure::ServesTls, &d);
    assert!(serves.contains("use grpcs://db1:7000"), "{serves}");
    assert!(matches!(
        Failure::from_rustls(
            &rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            &refusals
        ),
        Some(Failure::NotTls)
    ));
}

#[test]
fn failbackd_takes_a_client_certificate_given_as_it_is() {
    let client = openssl_like("failback", (2020, 2090));
    let pinned = pem_certs(&pem(&client), "--client-ca").unwrap();
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&pinned, "--client-ca").unwrap(),
        provider(),
    )
    .build()
    .unwrap();
    // webpki alone refuses it (a CA as an end entity); the exact copy is accepted.
    assert!(
        webpki
            .verify_client_cert(client.der(), &[], UnixTime::now())
            .is_err()
    );
    let v = ClientVerifier { webpki, pinned };
    v.verify_client_cert(client.der(), &[], UnixTime::now())
        .unwrap();
    let stranger = openssl_like("failback", (2020, 2090));
    assert!(
        v.verify_client_cert(stranger.der(), &[], UnixTime::now())
            .is_err()
    );
}
