//! TLS 1.3 as both ends of a failbackd connection set it up (rustls with the ring provider),
//! from the PEM files an operator hands failbackd and failback, and what a failed handshake
//! tells the operator to do.
//!
//! **Trusting failbackd.** The client trusts failbackd's certificate in one of three ways
//! ([`ServerTrust`], checked by one verifier on both transports):
//! - it chains to a CA given as `--ca` and names the host dialled, and is within its dates:
//!   webpki's checks, as any TLS client makes them;
//! - it is byte for byte a certificate given as `--ca`: the operator pinned that very
//!   certificate (the self-signed one `openssl req -x509` makes, marked as a CA and often
//!   without a subjectAltName, which webpki refuses as a server's certificate), so neither
//!   its CA flag nor its names are asked about;
//! - its SHA-256 is the one `--server-fingerprint` gives (a two-node pair needs no CA).
//!
//! A pinned certificate's dates still apply, and the handshake's signatures are verified
//! whichever way, so only the holder of the certificate's key gets through.
//!
//! **Trusting clients.** failbackd's `--client-ca` over QUIC works the same way: a client
//! certificate that chains to it, or is byte for byte one of its certificates. gRPC's TLS is
//! tonic's on the server side, which only knows the first way.
//!
//! **Failures.** Whatever failed (the client refusing failbackd's certificate, failbackd
//! refusing the client's, one end not speaking TLS), [`hint`] turns it into one sentence
//! that says what to do; the verifier keeps what it refused ([`Refusals`]) because QUIC
//! passes on only the alert and a text.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use failback_common::civil;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

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
    #[error(
        "failbackd's certificate cannot be checked: give --ca FILE (the CA that signed it, or \
         that certificate itself) or --server-fingerprint sha256:HEX"
    )]
    NoTrust,
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

fn roots(
    certs: &[CertificateDer<'static>],
    what: &'static str,
) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c.clone()).map_err(|e| TlsError::Refused {
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

/// A certificate's SHA-256, over its DER encoding: what `--server-fingerprint` pins, written
/// `sha256:` and 64 hex digits (`openssl x509 -fingerprint -sha256`'s colon-separated
/// uppercase form is read too).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate of a PEM file (a chain starts with its own).
    pub fn of_pem(pem: &[u8], what: &'static str) -> Result<Fingerprint, TlsError> {
        Ok(Fingerprint::of(&pem_certs(pem, what)?[0]))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;

    fn from_str(s: &str) -> Result<Fingerprint, String> {
        let bad = || {
            format!(
                "{s:?} is not a SHA-256 fingerprint: write sha256: and 64 hex digits, as \
                 `failback certs fingerprint server.crt` prints it"
            )
        };
        let t = s.trim();
        let hex = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256 Fingerprint="))
            .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
            .ok_or_else(bad)?;
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// What the client trusts failbackd's certificate by: `--ca`, `--server-fingerprint`, or both
/// (then the certificate must have that fingerprint, and the CA is not asked).
#[derive(Clone, Default)]
pub struct ServerTrust {
    ca: Vec<CertificateDer<'static>>,
    fingerprint: Option<Fingerprint>,
}

impl ServerTrust {
    /// From `--ca`'s PEM and `--server-fingerprint`; one of them is needed.
    pub fn new(ca_pem: Option<&[u8]>, fingerprint: Option<Fingerprint>) -> Result<Self, TlsError> {
        let ca = match ca_pem {
            Some(pem) => pem_certs(pem, "--ca")?,
            None => Vec::new(),
        };
        if ca.is_empty() && fingerprint.is_none() {
            return Err(TlsError::NoTrust);
        }
        Ok(ServerTrust { ca, fingerprint })
    }
}

/// Why the client refused failbackd's certificate.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// `--server-fingerprint` named another certificate.
    Fingerprint {
        expected: Fingerprint,
        got: Fingerprint,
    },
    /// webpki's verdict, or the dates of a pinned certificate.
    Certificate(CertificateError),
    /// Anything else the verifier said.
    Other(String),
}

impl Refusal {
    fn into_rustls(self) -> rustls::Error {
        match self {
            // failbackd is told access denied: its certificate may be fine, just not this one.
            Refusal::Fingerprint { .. } => CertificateError::ApplicationVerificationFailure.into(),
            Refusal::Certificate(c) => c.into(),
            Refusal::Other(why) => rustls::Error::General(why),
        }
    }
}

/// The last certificate a client configuration's verifier refused: QUIC hands on only an
/// alert and a text, so the words for the operator are taken from here.
#[derive(Clone, Default, Debug)]
pub struct Refusals(Arc<Mutex<Option<Refusal>>>);

impl Refusals {
    fn set(&self, r: Refusal) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// What was refused last, if anything, forgetting it.
    pub fn take(&self) -> Option<Refusal> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The client's check of failbackd's certificate (see the module's header).
#[derive(Debug)]
struct ServerVerifier {
    /// None with only a fingerprint.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// `--ca`'s certificates, accepted as they are when presented as they are.
    pinned: Vec<CertificateDer<'static>>,
    fingerprint: Option<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
    refusals: Refusals,
}

impl ServerVerifier {
    fn new(trust: &ServerTrust, refusals: Refusals) -> Result<Self, TlsError> {
        let provider = provider();
        let webpki = if trust.ca.is_empty() || trust.fingerprint.is_some() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(
                    roots(&trust.ca, "--ca")?,
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError::Refused {
                    what: "--ca",
                    reason: e.to_string(),
                })?,
            )
        };
        Ok(ServerVerifier {
            webpki,
            pinned: trust.ca.clone(),
            fingerprint: trust.fingerprint,
            algorithms: provider.signature_verification_algorithms,
            refusals,
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<(), Refusal> {
        if let Some(expected) = self.fingerprint {
            let got = Fingerprint::of(end_entity);
            if got != expected {
                return Err(Refusal::Fingerprint { expected, got });
            }
            return within_dates(end_entity, now);
        }
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return within_dates(end_entity, now);
        }
        let Some(webpki) = &self.webpki else {
            return Err(Refusal::Other("no CA to check against".into()));
        };
        webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map(|_| ())
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(c) => Refusal::Certificate(c),
                other => Refusal::Other(other.to_string()),
            })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, server_name, ocsp, now) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(r) => {
                self.refusals.set(r.clone());
                Err(r.into_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// failbackd's check of client certificates over QUIC: webpki against `--client-ca`, or a
/// certificate that is byte for byte one of `--client-ca`'s (within its dates).
#[derive(Debug)]
struct ClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return within_dates(end_entity, now)
                .map(|()| ClientCertVerified::assertion())
                .map_err(Refusal::into_rustls);
        }
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The server's TLS 1.3 configuration: its certificate chain and key, and, with `client_ca`,
/// the CA every client certificate must chain to, or the client certificates themselves (a
/// client without one is refused).
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
        Some(ca) => {
            let pinned = pem_certs(ca, "--client-ca")?;
            let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots(&pinned, "--client-ca")?,
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Refused {
                what: "--client-ca",
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(Arc::new(ClientVerifier { webpki, pinned }))
        }
    };
    let mut tls = builder
        .with_single_cert(pem_certs(cert, "--tls-cert")?, pem_key(key, "--tls-key")?)
        .map_err(refused("--tls-cert/--tls-key"))?;
    tls.alpn_protocols = vec![failback_proto::ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|e| TlsError::Refused {
        what: "QUIC TLS",
        reason: e.to_string(),
    })
}

/// A client's TLS 1.3 configuration offering `alpn`, trusting failbackd by `trust`; with
/// `identity` (PEM certificate chain and key) the client presents a certificate of its own.
/// The [`Refusals`] say why its verifier refused a certificate.
pub fn client_config(
    trust: &ServerTrust,
    identity: Option<(&[u8], &[u8])>,
    alpn: &[u8],
) -> Result<(rustls::ClientConfig, Refusals), TlsError> {
    let refusals = Refusals::default();
    let verifier = ServerVerifier::new(trust, refusals.clone())?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(refused("TLS versions"))?
        .dangerous()
        // Not less than webpki: its checks, or an exact pinned certificate (module header).
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(pem_certs(cert, "--cert")?, pem_key(key, "--key")?)
            .map_err(refused("--cert/--key"))?,
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok((tls, refusals))
}

/// QUIC's client configuration trusting failbackd by `trust`.
pub fn quic_client_tls(
    trust: &ServerTrust,
    identity: Option<(&[u8], &[u8])>,
) -> Result<(QuicClientConfig, Refusals), TlsError> {
    let (tls, refusals) = client_config(trust, identity, failback_proto::ALPN)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Refused {
        what: "QUIC TLS",
        reason: e.to_string(),
    })?;
    Ok((quic, refusals))
}

/// QUIC's client configuration: the server's certificate must chain to `ca` (or be one of
/// its certificates).
pub fn client_tls(
    ca: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<QuicClientConfig, TlsError> {
    Ok(quic_client_tls(&ServerTrust::new(Some(ca), None)?, identity)?.0)
}

/// A pinned certificate's dates, read from its DER (webpki does not look at a certificate it
/// is not asked to chain).
fn within_dates(cert: &[u8], now: UnixTime) -> Result<(), Refusal> {
    let Some((not_before, not_after)) = validity(cert) else {
        return Err(Refusal::Certificate(CertificateError::BadEncoding));
    };
    if now.as_secs() < not_before.as_secs() {
        return Err(Refusal::Certificate(CertificateError::NotValidYetContext {
            time: now,
            not_before,
        }));
    }
    if now.as_secs() > not_after.as_secs() {
        return Err(Refusal::Certificate(CertificateError::ExpiredContext {
            time: now,
            not_after,
        }));
    }
    Ok(())
}

/// One DER element: its tag, its contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, &b| (l << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A certificate's notBefore and notAfter (RFC 5280 4.1: Certificate, TBSCertificate, an
/// optional [0] version, serial, signature algorithm, issuer, then Validity).
pub fn validity(cert: &[u8]) -> Option<(UnixTime, UnixTime)> {
    let (0x30, cert, _) = der(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der(cert)? else {
        return None;
    };
    let (tag, _, mut rest) = der(tbs)?;
    if tag == 0xa0 {
        rest = der(rest)?.2; // the serial number
    }
    let rest = der(rest)?.2; // the signature algorithm
    let rest = der(rest)?.2; // the issuer
    let (0x30, validity, _) = der(rest)? else {
        return None;
    };
    let (t1, not_before, rest) = der(validity)?;
    let (t2, not_after, _) = der(rest)?;
    Some((asn1_time(t1, not_before)?, asn1_time(t2, not_after)?))
}

/// UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ).
fn asn1_time(tag: u8, s: &[u8]) -> Option<UnixTime> {
    let s = std::str::from_utf8(s).ok()?.strip_suffix('Z')?;
    let (year, rest) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        (0x18, 14) => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, h, m, sec) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    let days = civil::days_from_civil(year, month, day);
    let secs = days * 86400 + h * 3600 + m * 60 + sec;
    Some(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(secs).ok()?,
    )))
}

/// `2026-12-01 18:25:50 UTC`.
fn when(t: UnixTime) -> String {
    civil::from_unix(i64::try_from(t.as_secs()).unwrap_or(i64::MAX)).to_string()
}

/// How the client reached failbackd, for the words of [`hint`].
#[derive(Clone, Debug)]
pub struct Dialled {
    /// `grpcs://host:port`, `quic://host:port`.
    pub url: String,
    /// The host in the URL (a name, or an address).
    pub host: String,
    /// `host:port`.
    pub authority: String,
    /// gRPC (tonic's TLS on failbackd's side) rather than QUIC.
    pub grpc: bool,
    pub ca: bool,
    pub fingerprint: bool,
    /// `--cert/--key` were given.
    pub identity: bool,
}

/// What went wrong in a TLS handshake with failbackd.
#[derive(Clone, Debug)]
pub enum Failure {
    /// The client refused failbackd's certificate.
    Refused(Refusal),
    /// failbackd ended the handshake with this alert: it refused the client (its certificate,
    /// or the lack of one), or the protocol.
    Alert(AlertDescription),
    /// What came back was not TLS: a failbackd without `--tls-cert`.
    NotTls,
    /// failbackd serves TLS and the client spoke plain gRPC.
    ServesTls,
}

impl Failure {
    /// The failure a rustls error (from the client's own connection) stands for, taking the
    /// verifier's own words when it refused.
    pub fn from_rustls(e: &rustls::Error, refusals: &Refusals) -> Option<Failure> {
        match e {
            rustls::Error::AlertReceived(a) => Some(Failure::Alert(*a)),
            rustls::Error::InvalidCertificate(c) => Some(Failure::Refused(
                refusals
                    .take()
                    .unwrap_or_else(|| Refusal::Certificate(c.clone())),
            )),
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                Some(Failure::NotTls)
            }
            _ => refusals.take().map(Failure::Refused),
        }
    }

    /// The failure a QUIC connection's close code stands for: the verifier's refusal when it
    /// refused, else a TLS alert (codes 0x100-0x1ff, RFC 9001 4.8) from either end.
    pub fn from_quic_code(code: u64, refusals: &Refusals) -> Option<Failure> {
        if let Some(r) = refusals.take() {
            return Some(Failure::Refused(r));
        }
        let alert = u8::try_from(code.checked_sub(0x100)?).ok()?;
        Some(Failure::Alert(AlertDescription::from(alert)))
    }
}

/// What an operator should do about `failure`: one sentence (or two) naming the flags.
pub fn hint(failure: &Failure, d: &Dialled) -> String {
    let host = &d.host;
    let new_cert = format!("failback certs new --server-name {host}");
    let pin = "--server-fingerprint sha256:… (`failback certs fingerprint server.crt` \
               prints it, run where failbackd's certificate is)";
    match failure {
        Failure::Refused(Refusal::Fingerprint { expected, got }) => format!(
            "failbackd's certificate has fingerprint {got}, not {expected} as \
             --server-fingerprint expects: if failbackd's certificate was replaced, take its \
             new fingerprint where failbackd runs (failback certs fingerprint FILE); otherwise \
             {} is not the failbackd you meant",
            d.authority
        ),
        Failure::Refused(Refusal::Certificate(c)) => certificate_hint(c, d, &new_cert, pin),
        Failure::Refused(Refusal::Other(why)) => format!(
            "failbackd's certificate was refused ({why}): give --ca with the CA that signed it \
             or that certificate itself, or pin it with {pin}"
        ),
        Failure::Alert(a) => alert_hint(*a, d),
        Failure::NotTls => format!(
            "{} does not answer in TLS: a failbackd started without --tls-cert serves plain \
             gRPC; use grpc://{} (and no --ca), or start failbackd with --tls-cert and \
             --tls-key",
            d.authority, d.authority
        ),
        Failure::ServesTls => format!(
            "failbackd at {} serves TLS (it was started with --tls-cert): use grpcs://{} with \
             --ca (the CA that signed its certificate, or that certificate) or \
             --server-fingerprint",
            d.authority, d.authority
        ),
    }
}

fn certificate_hint(c: &CertificateError, d: &Dialled, new_cert: &str, pin: &str) -> String {
    let host = &d.host;
    match c {
        CertificateError::UnknownIssuer => format!(
            "failbackd's certificate is not signed by --ca: give the CA that signed it (ca.crt \
             of failback certs new), or that very certificate, or pin it with {pin}"
        ),
        CertificateError::NotValidForNameContext { presented, .. } => {
            let names = if presented.is_empty() {
                "no name at all (it has no subjectAltName; the CN is not used)".to_string()
            } else {
                presented
                    .iter()
                    .map(|n| bare_name(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "failbackd's certificate is for {names}, not for {host} that {} dials: use one \
                 of its names in the URL, or make a certificate for {host} with {new_cert} (or \
                 give that very certificate as --ca to pin it)",
                d.url
            )
        }
        CertificateError::NotValidForName => format!(
            "failbackd's certificate does not name {host} that {} dials: use one of its names \
             in the URL, or make a certificate for {host} with {new_cert}",
            d.url
        ),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "failbackd's certificate expired on {} (it is {} here): make a new one \
             ({new_cert}) and restart failbackd with it",
            when(*not_after),
            when(*time)
        ),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "failbackd's certificate is valid only from {} (it is {} here): the two hosts' \
             clocks disagree, or the certificate was made for later; fix the clock, or make \
             one valid now ({new_cert})",
            when(*not_before),
            when(*time)
        ),
        CertificateError::Expired | CertificateError::NotValidYet => format!(
            "failbackd's certificate is outside its dates: make a new one ({new_cert}) and \
             restart failbackd with it"
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!(
                "failbackd's certificate is not one for a TLS server (its extended key usage \
                 lacks serverAuth): make one with {new_cert}"
            )
        }
        CertificateError::Other(o)
            if o.0.downcast_ref::<webpki::Error>() == Some(&webpki::Error::CaUsedAsEndEntity) =>
        {
            format!(
                "failbackd's certificate is a CA certificate (basicConstraints CA:TRUE, as \
                 `openssl req -x509` makes it), which TLS does not take as a server's own: give \
                 that very certificate as --ca (an exact copy is trusted as it is), pin it with \
                 {pin}, or make a server certificate with {new_cert}"
            )
        }
        other => format!(
            "failbackd's certificate was refused ({other}): give --ca with the CA that signed \
             it or that certificate itself, pin it with {pin}, or make certificates with \
             {new_cert}"
        ),
    }
}

/// `db1` from webpki's `DnsName("db1")`, `10.0.0.1` from `IpAddress(10.0.0.1)`.
fn bare_name(n: &str) -> &str {
    n.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| n.strip_prefix("IpAddress(")?.strip_suffix(')'))
        .unwrap_or(n)
}

fn alert_hint(a: AlertDescription, d: &Dialled) -> String {
    let give = "give --cert and --key with a client certificate signed by the CA failbackd has \
                as --client-ca (client.crt and client.key of failback certs new)";
    // tonic's TLS, not ours, checks client certificates on failbackd's gRPC port.
    let grpc_note = if d.grpc {
        "; over grpcs:// failbackd takes --client-ca as a CA only (a self-signed client \
         certificate listed there as it is is accepted over quic:// alone)"
    } else {
        ""
    };
    match a {
        AlertDescription::CertificateRequired => {
            format!("failbackd requires a client certificate (it runs with --client-ca): {give}")
        }
        AlertDescription::HandshakeFailure if !d.identity => {
            format!(
                "failbackd refused the TLS handshake, most likely for want of a client certificate: {give}"
            )
        }
        AlertDescription::UnknownCA
        | AlertDescription::BadCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateRevoked
        | AlertDescription::DecryptError
        | AlertDescription::AccessDenied
        | AlertDescription::HandshakeFailure => {
            format!("failbackd refused failback's client certificate ({a:?}): {give}{grpc_note}")
        }
        AlertDescription::NoApplicationProtocol => format!(
            "{} speaks TLS but not failback's protocol: is it failbackd, on its {} port?",
            d.authority,
            if d.grpc { "--listen" } else { "--quic-listen" }
        ),
        AlertDescription::ProtocolVersion => format!(
            "{} does not speak TLS 1.3, which failback needs: is it failbackd?",
            d.authority
        ),
        other => format!("failbackd ended the TLS handshake with the alert {other:?}"),
    }
}

/// Whether `authority` answers a TLS ClientHello with TLS (a handshake record): asked when
/// plain gRPC failed, to tell a TLS failbackd from a broken one.
pub async fn speaks_tls(authority: &str, host: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .ok()?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = server_name(host)?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).ok()?;
        let mut tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
        tcp.write_all(&hello).await.ok()?;
        let mut head = [0u8; 3];
        tcp.read_exact(&mut head).await.ok()?;
        // A TLS handshake (22) or alert (21) record of version 3.x.
        Some(matches!(head, [21 | 22, 3, _]))
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The name a client sends in SNI and checks the certificate for: a DNS name or an address.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).ok()
}

#[cfg(test)]
mod tests;
