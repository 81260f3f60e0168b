//! Telling systemd how failbackd is doing: the `sd_notify` protocol, for `Type=notify` units.
//!
//! systemd passes the unit a datagram socket in `$NOTIFY_SOCKET`: a path, or a name in the
//! abstract namespace written with a leading `@`. The service sends it newline-separated
//! `KEY=VALUE` assignments in one datagram: `READY=1` once it serves (systemd then starts what is
//! ordered after it, and `systemctl start` returns), `STOPPING=1` when it begins to shut down,
//! `STATUS=...` a line `systemctl status` shows. That is the whole protocol failbackd needs, so
//! it speaks it itself rather than through libsystemd.
//!
//! failbackd says `READY=1` only once every listener is bound and its start-up checks passed:
//! a unit ordered after it finds the port open.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where systemd listens, from `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    addr: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for messages.
    name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "NOTIFY_SOCKET={0:?} is neither a path nor an abstract socket name (@NAME): failbackd \
         cannot tell systemd it is ready; run it with Type=notify under systemd, or unset \
         NOTIFY_SOCKET"
    )]
    Unsupported(String),
    #[error("could not tell systemd at NOTIFY_SOCKET={name:?} {what}")]
    Send {
        name: String,
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Notifier {
    /// The socket `$NOTIFY_SOCKET` names; `None` when it is not set (not run by systemd, or not
    /// as `Type=notify`).
    pub fn from_env() -> Option<Result<Notifier, NotifyError>> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        Some(Notifier::new(&name.to_string_lossy()))
    }

    /// The socket `name` names: an absolute path, or `@` and an abstract name.
    pub fn new(name: &str) -> Result<Notifier, NotifyError> {
        let unsupported = || NotifyError::Unsupported(name.to_string());
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            abstract_addr(abstract_name.as_bytes()).ok_or_else(unsupported)?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name).map_err(|_| unsupported())?
        } else {
            return Err(unsupported());
        };
        Ok(Notifier {
            addr,
            name: name.to_string(),
        })
    }

    /// Sends `state` (`KEY=VALUE` lines) in one datagram.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let sent =
            UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), &self.addr));
        match sent {
            Ok(_) => Ok(()),
            Err(source) => Err(NotifyError::Send {
                name: self.name.clone(),
                what: state.lines().next().unwrap_or_default().to_string(),
                source,
            }),
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name).ok()
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> Option<SocketAddr> {
    None
}

/// A `STATUS=` value on one line (systemd shows the first line only).
pub fn status_line(text: &str) -> String {
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn received(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_path_socket_gets_the_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.send("READY=1\nSTATUS=serving /d on 127.0.0.1:1").unwrap();
        assert_eq!(
            received(&socket),
            "READY=1\nSTATUS=serving /d on 127.0.0.1:1"
        );
        n.send("STOPPING=1").unwrap();
        assert_eq!(received(&socket), "STOPPING=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_abstract_socket_gets_the_datagram() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("failbackd-notify-test-{}", std::process::id());
        let socket =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .send("READY=1")
            .unwrap();
        assert_eq!(received(&socket), "READY=1");
    }

    #[test]
    fn other_names_are_refused_and_a_missing_socket_fails_saying_where() {
        let e = Notifier::new("vsock:2:9999").unwrap_err().to_string();
        assert!(
            e.contains("vsock:2:9999") && e.contains("unset NOTIFY_SOCKET"),
            "{e}"
        );
        let e = Notifier::new("/nonexistent/notify")
            .unwrap()
            .send("READY=1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/notify") && e.contains("READY=1"),
            "{e}"
        );
    }
}
