//! Certificates an operator can make and use: `failback certs new` and `failback certs
//! fingerprint`, and connecting to failbackd trusted by a fingerprint.
//!
//! `certs new` makes what a pair of nodes needs and nothing more: a CA of its own (its key
//! only makes certificates; neither program reads it), one certificate for failbackd naming
//! every host or address clients dial it by (serverAuth), so the same files serve on either
//! node of a pair, and one for failback (clientAuth) for a failbackd that asks for client
//! certificates (`--client-ca`). ECDSA P-256 keys, written with mode 0600 from the moment
//! they exist (a file is made under a temporary name with that mode, then linked into place),
//! and nothing existing is replaced without `--force`.
//!
//! A certificate's fingerprint (SHA-256 of its DER) is what `--server-fingerprint` pins,
//! instead of a CA: see [`failback_transport::tls`] for the ways a client trusts failbackd.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use failback_common::civil::civil_from_days;
use failback_transport::tls::Fingerprint;
use failback_transport::url::Scheme;

use crate::source::remote::RemoteOptions;
use crate::source::{Source, SourceError};

/// Why certificates could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error(
        "{dir} already has {files}: give --force to replace them (failbackd and failback must \
         then be given the new files), or choose another --dir"
    )]
    Exists { dir: String, files: String },
    #[error("could not write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] failback_transport::tls::TlsError),
    #[error("could not make {what}: {reason} (is every --server-name a host name or an address?)")]
    Make { what: &'static str, reason: String },
}

/// What `failback certs new` makes.
pub struct NewCerts {
    pub dir: PathBuf,
    /// The host names and addresses clients dial failbackd by: its certificate's names.
    pub server_names: Vec<String>,
    /// The client certificate's common name.
    pub client_name: String,
    /// How long the certificates are valid, from yesterday (clocks of a pair may disagree).
    pub days: u32,
    pub force: bool,
}

/// The files `failback certs new` writes, in the order it writes them.
pub const FILES: [&str; 6] = [
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
];

/// What was made: the server certificate's fingerprint, and the words [`NewCerts::make`]'s
/// caller prints.
pub struct Made {
    pub server_fingerprint: Fingerprint,
    pub summary: String,
}

fn make_err(what: &'static str) -> impl Fn(rcgen::Error) -> CertsError {
    move |e| CertsError::Make {
        what,
        reason: e.to_string(),
    }
}

/// Midnight (UTC) `days` after 1970-01-01, as rcgen takes it.
fn date(days: i64) -> (i32, u8, u8) {
    let (y, m, d) = civil_from_days(days);
    (y as i32, m as u8, d as u8)
}

impl NewCerts {
    /// Makes the CA and both certificates and writes the six files ([`FILES`]).
    pub fn make(&self) -> Result<Made, CertsError> {
        let present: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| self.dir.join(f).symlink_metadata().is_ok())
            .collect();
        if !present.is_empty() && !self.force {
            return Err(CertsError::Exists {
                dir: self.dir.display().to_string(),
                files: present.join(", "),
            });
        }
        let today = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86400) as i64;
        let ((y0, m0, d0), (y1, m1, d1)) = (date(today - 1), date(today + i64::from(self.days)));
        let from = rcgen::date_time_ymd(y0, m0, d0);
        let until = rcgen::date_time_ymd(y1, m1, d1);

        let mut ca =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(make_err("the CA"))?;
        ca.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("failback CA for {}", self.server_names.join(" ")),
        );
        // It signs certificates only: none of its own sub-CAs.
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        (ca.not_before, ca.not_after) = (from, until);
        let ca_key = rcgen::KeyPair::generate().map_err(make_err("the CA's key"))?;
        let ca_cert = ca.self_signed(&ca_key).map_err(make_err("the CA"))?;
        let (ca_pem, ca_key_pem) = (ca_cert.pem(), ca_key.serialize_pem());
        let issuer = rcgen::Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>,
                    cn: &str,
                    eku: rcgen::ExtendedKeyUsagePurpose,
                    what: &'static str| {
            let mut p = rcgen::CertificateParams::new(names).map_err(make_err(what))?;
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.is_ca = rcgen::IsCa::ExplicitNoCa;
            p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![eku];
            p.use_authority_key_identifier_extension = true;
            (p.not_before, p.not_after) = (from, until);
            let key = rcgen::KeyPair::generate().map_err(make_err(what))?;
            let cert = p.signed_by(&key, &issuer).map_err(make_err(what))?;
            Ok::<_, CertsError>((cert, key))
        };
        let (server, server_key) = leaf(
            self.server_names.clone(),
            &self.server_names[0],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            "failbackd's certificate",
        )?;
        let (client, client_key) = leaf(
            Vec::new(),
            &self.client_name,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            "failback's certificate",
        )?;

        std::fs::create_dir_all(&self.dir).map_err(|e| CertsError::Write {
            path: self.dir.display().to_string(),
            source: e,
        })?;
        let contents = [
            ca_pem,
            ca_key_pem,
            server.pem(),
            server_key.serialize_pem(),
            client.pem(),
            client_key.serialize_pem(),
        ];
        for (name, text) in FILES.iter().zip(&contents) {
            let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
            write_file(&self.dir, name, text.as_bytes(), mode, self.force)?;
        }
        crate::fsutil::fsync_dir(&self.dir).map_err(|e| CertsError::Write {
            path: self.dir.display().to_string(),
            source: e,
        })?;
        let fingerprint = Fingerprint::of(server.der());
        Ok(Made {
            server_fingerprint: fingerprint,
            summary: self.summary(fingerprint),
        })
    }

    fn summary(&self, fingerprint: Fingerprint) -> String {
        let d = self.dir.display();
        let names = self.server_names.join(", ");
        format!(
            "made in {d}, valid {days} days:\n\
             \x20 ca.crt      the CA: on every host running failback (--ca {d}/ca.crt), and on \
             every host running failbackd with --client-ca {d}/ca.crt\n\
             \x20 ca.key      the CA's key: neither program needs it; keep it offline (it \
             makes certificates anyone would trust) or delete it\n\
             \x20 server.crt  failbackd's certificate, for {names}: failbackd --tls-cert \
             {d}/server.crt\n\
             \x20 server.key  its key, on failbackd's hosts only: failbackd --tls-key \
             {d}/server.key\n\
             \x20 client.crt  failback's certificate ({client}): failback rewind --cert \
             {d}/client.crt, for a failbackd started with --client-ca\n\
             \x20 client.key  its key, on failback's hosts only: failback rewind --key \
             {d}/client.key\n\
             failback dials failbackd by one of these names: --source grpcs://HOST:PORT or \
             quic://HOST:PORT with HOST among {names}.\n\
             To trust failbackd without ca.crt, pin its certificate: --server-fingerprint \
             {fingerprint}",
            days = self.days,
            client = self.client_name,
        )
    }
}

/// Writes `name` in `dir` with `mode` from its creation on: under a temporary name first
/// (created, never opened existing, so no earlier mode or reader carries over), then linked
/// into place, replacing an existing file only with `force`.
fn write_file(
    dir: &Path,
    name: &str,
    text: &[u8],
    mode: u32,
    force: bool,
) -> Result<(), CertsError> {
    let dest = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let failed = |e: std::io::Error| CertsError::Write {
        path: dest.display().to_string(),
        source: e,
    };
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
        if force {
            std::fs::rename(&tmp, &dest)
        } else {
            // A link fails if the name exists: nothing is replaced without --force, even a
            // file that appeared after the check.
            std::fs::hard_link(&tmp, &dest)
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map_err(failed)
}

/// The fingerprint of the (first) certificate of a PEM file, as `--server-fingerprint`
/// takes it.
pub fn fingerprint(path: &Path) -> Result<Fingerprint, CertsError> {
    let pem = std::fs::read(path).map_err(|e| CertsError::Read {
        path: path.display().to_string(),
        source: e,
    })?;
    Ok(Fingerprint::of_pem(&pem, "the certificate file")?)
}

/// Connects to the failbackd `opts.url` names, trusting it by `--ca` or, given, by
/// `--server-fingerprint`.
pub fn connect(
    opts: RemoteOptions,
    fingerprint: Option<Fingerprint>,
) -> Result<Box<dyn Source>, SourceError> {
    use crate::source::grpc::GrpcSource;
    use crate::source::quic::QuicSource;
    Ok(match opts.url.scheme {
        Scheme::Quic => Box::new(QuicSource::connect_with(opts, fingerprint)?),
        Scheme::Grpc | Scheme::Grpcs => Box::new(GrpcSource::connect_with(opts, fingerprint)?),
    })
}
