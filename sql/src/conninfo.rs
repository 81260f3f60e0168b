//! libpq connection strings (`keyword=value ...`), as far as failback reads or writes them.
//!
//! Values are quoted as libpq's `conninfo_parse` reads them (`fe-connect.c`), by
//! [`quote_value`].

use std::time::Duration;

use crate::libpq::Conn;

/// Connects to the server `conninfo` names, as `application`, within a connect timeout of its
/// own unless the string or the environment sets one: a server that is down must not hold a
/// caller for a TCP timeout. The error is in words.
pub fn connect(conninfo: &str, application: &str) -> Result<Conn, String> {
    Conn::connect(conninfo, application, Duration::from_secs(10), None).map_err(|e| e.to_string())
}

/// The user a connection string connects as, when it says (keywords or URI, as libpq reads
/// them; not the environment).
pub fn user(conninfo: &str) -> Option<String> {
    crate::libpq::keyword(conninfo, "user")
}

/// A value as a connection string writes it (the one quoting rule, pure, in
/// `failback-common`).
pub use failback_common::recovery::quote_conninfo_value as quote_value;

/// `conninfo` with `host=HOST` in front, unless it names a host already (`host` or `hostaddr`).
pub fn with_host(conninfo: &str, host: &str) -> String {
    let names_host = conninfo.split_whitespace().any(|kv| {
        let key = kv.split('=').next().unwrap_or_default().trim();
        key == "host" || key == "hostaddr"
    });
    match (names_host, conninfo.trim()) {
        (true, c) => c.to_string(),
        (false, "") => format!("host={}", quote_value(host)),
        (false, c) => format!("host={} {c}", quote_value(host)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_added_unless_one_is_named() {
        assert_eq!(
            with_host("port=5433 user=postgres", "db1"),
            "host=db1 port=5433 user=postgres"
        );
        assert_eq!(with_host("", "db1"), "host=db1");
        assert_eq!(with_host("", "::1"), "host='::1'");
        assert_eq!(
            with_host("hostaddr=10.0.0.1 port=5", "db1"),
            "hostaddr=10.0.0.1 port=5"
        );
        assert_eq!(with_host("host = x", "db1"), "host = x");
    }

    #[test]
    fn the_user_is_read_back() {
        assert_eq!(user("host=x user='re pl'").as_deref(), Some("re pl"));
        assert_eq!(user("host=x"), None);
    }
}
