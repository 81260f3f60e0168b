//! `failbackd --config FILE`: the same settings as the flags, in TOML.
//!
//! ```toml
//! pgdata = "/var/lib/postgresql/16/main"
//! listen = "0.0.0.0:7432"
//! pg_conn = "host=/var/run/postgresql user=postgres dbname=postgres"
//! token_file = "/etc/failback/token"
//! tls_cert = "/etc/failback/server.pem"
//! tls_key = "/etc/failback/server.key"
//! max_chunk = 1048576
//! quic_listen = "0.0.0.0:7433"
//! metrics_listen = "127.0.0.1:9187"
//! client_ca = "/etc/failback/clients-ca.pem"
//! window = 16777216
//! quic_max_connections = 64
//! quic_max_streams = 300
//! quic_initial_window = 1048576
//! primary_conninfo = "host=db1.example port=5432 user=replicator"
//! wal_summaries = true
//! stall_timeout = 120
//! shutdown_timeout = 30
//! log_format = "json"
//! ```
//!
//! A flag given on the command line wins over the file. A key the file does not know is
//! refused rather than ignored: a misspelt `tls_cert` must not silently serve plain text.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Every setting, each optional so that the file and the flags can be merged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub pgdata: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub max_chunk: Option<u64>,
    pub pg_conn: Option<String>,
    pub quic_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub client_ca: Option<PathBuf>,
    pub window: Option<u32>,
    pub quic_max_connections: Option<usize>,
    pub quic_max_streams: Option<u32>,
    pub quic_initial_window: Option<u64>,
    pub primary_conninfo: Option<String>,
    /// `false`: no background WAL summaries (`--no-wal-summaries`).
    pub wal_summaries: Option<bool>,
    /// Seconds (`--stall-timeout`).
    pub stall_timeout: Option<u64>,
    /// Seconds (`--shutdown-timeout`).
    pub shutdown_timeout: Option<u64>,
    /// `text` or `json` (`--log-format`).
    pub log_format: Option<crate::log::Format>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

impl Settings {
    /// Parses the TOML text of the config file at `path` (named in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    pub fn read(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::parse(&text, path)
    }

    /// These settings with every setting `flags` gives replaced by the flag's value.
    pub fn overridden_by(self, flags: Settings) -> Settings {
        Settings {
            pgdata: flags.pgdata.or(self.pgdata),
            listen: flags.listen.or(self.listen),
            tls_cert: flags.tls_cert.or(self.tls_cert),
            tls_key: flags.tls_key.or(self.tls_key),
            token_file: flags.token_file.or(self.token_file),
            max_chunk: flags.max_chunk.or(self.max_chunk),
            pg_conn: flags.pg_conn.or(self.pg_conn),
            quic_listen: flags.quic_listen.or(self.quic_listen),
            metrics_listen: flags.metrics_listen.or(self.metrics_listen),
            client_ca: flags.client_ca.or(self.client_ca),
            window: flags.window.or(self.window),
            quic_max_connections: flags.quic_max_connections.or(self.quic_max_connections),
            quic_max_streams: flags.quic_max_streams.or(self.quic_max_streams),
            quic_initial_window: flags.quic_initial_window.or(self.quic_initial_window),
            primary_conninfo: flags.primary_conninfo.or(self.primary_conninfo),
            wal_summaries: flags.wal_summaries.or(self.wal_summaries),
            stall_timeout: flags.stall_timeout.or(self.stall_timeout),
            shutdown_timeout: flags.shutdown_timeout.or(self.shutdown_timeout),
            log_format: flags.log_format.or(self.log_format),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(text, Path::new("/etc/failbackd.toml"))
    }

    #[test]
    fn every_setting_parses() {
        let s = parse(
            r#"
            pgdata = "/data"
            listen = "127.0.0.1:7432"
            tls_cert = "c.pem"
            tls_key = "k.pem"
            token_file = "t"
            max_chunk = 65536
            pg_conn = "host=/tmp user=postgres"
            quic_listen = "127.0.0.1:7433"
            metrics_listen = "127.0.0.1:9187"
            client_ca = "ca.pem"
            window = 1048576
            quic_max_connections = 8
            quic_max_streams = 100
            quic_initial_window = 262144
            primary_conninfo = "host=db1 user=replicator"
            wal_summaries = false
            stall_timeout = 30
            shutdown_timeout = 5
            log_format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(s.pgdata, Some(PathBuf::from("/data")));
        assert_eq!(s.listen, Some("127.0.0.1:7432".parse().unwrap()));
        assert_eq!(s.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(s.tls_key, Some(PathBuf::from("k.pem")));
        assert_eq!(s.token_file, Some(PathBuf::from("t")));
        assert_eq!(s.max_chunk, Some(65536));
        assert_eq!(s.pg_conn.as_deref(), Some("host=/tmp user=postgres"));
        assert_eq!(s.quic_listen, Some("127.0.0.1:7433".parse().unwrap()));
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(s.client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(s.window, Some(1 << 20));
        assert_eq!(s.quic_max_connections, Some(8));
        assert_eq!(s.quic_max_streams, Some(100));
        assert_eq!(s.quic_initial_window, Some(256 << 10));
        assert_eq!(
            s.primary_conninfo.as_deref(),
            Some("host=db1 user=replicator")
        );
        assert_eq!(s.wal_summaries, Some(false));
        assert_eq!(s.stall_timeout, Some(30));
        assert_eq!(s.shutdown_timeout, Some(5));
        assert_eq!(s.log_format, Some(crate::log::Format::Json));
        assert!(parse("log_format = \"xml\"").is_err());
        assert_eq!(parse("").unwrap(), Settings::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_file_and_key() {
        let e = parse("pgdata = \"/data\"\ntls_certificate = \"c.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/failbackd.toml"), "{e}");
        assert!(e.contains("tls_certificate"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = parse("listen = \"nowhere\"").unwrap_err().to_string();
        assert!(e.contains("listen") || e.contains("line 1"), "{e}");
        let e = parse("max_chunk = -1").unwrap_err().to_string();
        assert!(e.contains("max_chunk") || e.contains("line 1"), "{e}");
        assert!(parse("pgdata = ").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            "pgdata = \"/from-file\"\nmax_chunk = 4096\npg_conn = \"port=5433\"\nlisten = \"0.0.0.0:1\"",
        )
        .unwrap();
        let flags = Settings {
            pgdata: Some("/from-flag".into()),
            token_file: Some("tok".into()),
            ..Default::default()
        };
        let m = file.overridden_by(flags);
        assert_eq!(m.pgdata, Some(PathBuf::from("/from-flag")));
        assert_eq!(m.token_file, Some(PathBuf::from("tok")));
        assert_eq!(m.max_chunk, Some(4096));
        assert_eq!(m.pg_conn.as_deref(), Some("port=5433"));
        assert_eq!(m.listen, Some("0.0.0.0:1".parse().unwrap()));
        assert_eq!(m.tls_cert, None);
    }
}
