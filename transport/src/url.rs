//! The URL that names a failbackd: `grpc://HOST:PORT`, `grpcs://HOST:PORT` or
//! `quic://HOST:PORT` (an IPv6 host in brackets: `quic://[::1]:7433`).

use std::fmt;

/// How a URL says to reach failbackd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// gRPC over plain HTTP/2.
    Grpc,
    /// gRPC over HTTP/2 with TLS.
    Grpcs,
    /// QUIC (always TLS 1.3).
    Quic,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Grpc => "grpc",
            Scheme::Grpcs => "grpcs",
            Scheme::Quic => "quic",
        }
    }

    /// Whether the connection runs TLS.
    pub fn is_tls(self) -> bool {
        self != Scheme::Grpc
    }
}

/// A parsed source URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceUrl {
    pub scheme: Scheme,
    /// `HOST:PORT` as written (brackets kept): what a resolver takes.
    pub authority: String,
    /// The host without IPv6 brackets: what TLS checks the certificate against, and what a
    /// standby of the source connects to.
    pub host: String,
    pub port: u16,
}

/// Why a URL names no failbackd.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("the source URL must start with grpc://, grpcs:// or quic://")]
    Scheme,
    #[error("the source URL must name a host and a port (scheme://HOST:PORT)")]
    Authority,
}

impl SourceUrl {
    pub fn parse(url: &str) -> Result<SourceUrl, UrlError> {
        let (scheme, rest) = url.split_once("://").ok_or(UrlError::Scheme)?;
        let scheme = match scheme {
            "grpc" => Scheme::Grpc,
            "grpcs" => Scheme::Grpcs,
            "quic" => Scheme::Quic,
            _ => return Err(UrlError::Scheme),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = authority.rsplit_once(':').ok_or(UrlError::Authority)?;
        let port: u16 = port.parse().map_err(|_| UrlError::Authority)?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']').ok_or(UrlError::Authority)?,
            None if host.contains(':') => return Err(UrlError::Authority),
            None => host,
        };
        if host.is_empty() || authority.contains('/') {
            return Err(UrlError::Authority);
        }
        Ok(SourceUrl {
            scheme,
            authority: authority.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.name(), self.authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_scheme_a_host_and_a_port() {
        let u = SourceUrl::parse("grpcs://db1.example:7432").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.authority.as_str()),
            (Scheme::Grpcs, "db1.example", 7432, "db1.example:7432")
        );
        let u = SourceUrl::parse("quic://[::1]:7433").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority.as_str()),
            ("::1", "[::1]:7433")
        );
        assert_eq!(u.to_string(), "quic://[::1]:7433");
        assert_eq!(SourceUrl::parse("grpc://127.0.0.1:1/").unwrap().port, 1);
        assert_eq!(SourceUrl::parse("http://x:1"), Err(UrlError::Scheme));
        assert_eq!(SourceUrl::parse("x:1"), Err(UrlError::Scheme));
        for bad in [
            "grpc://x",
            "grpc://:1",
            "grpc://x:port",
            "grpc://::1:7",
            "grpc://[::1:7",
            "grpc://x:1/path",
            "grpc://x:70000",
        ] {
            assert_eq!(SourceUrl::parse(bad), Err(UrlError::Authority), "{bad}");
        }
    }
}
