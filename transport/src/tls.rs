//! TLS 1.3 as both ends of a QUIC connection set it up (rustls with the ring provider), from
//! the PEM files an operator hands failbackd and failback.
//!
//! gRPC's TLS is tonic's (`ServerTlsConfig`, `ClientTlsConfig`, which build rustls from the
//! same PEM files); QUIC needs the rustls configurations itself, with failback's ALPN name
//! ([`failback_proto::ALPN`]) so that another protocol on the same port is refused during the
//! handshake.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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
    tls.alpn_protocols = vec![failback_proto::ALPN.to_vec()];
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
    tls.alpn_protocols = vec![failback_proto::ALPN.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| TlsError::Refused {
        what: "QUIC TLS",
        reason: e.to_string(),
    })
}
