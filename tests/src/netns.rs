//! Two hosts on one machine: Linux network namespaces joined by a veth pair.
//!
//! A network namespace has its own interfaces, addresses, routes and ports, and shares
//! everything else (files, users, Unix sockets named by path) with the machine. So a deployment
//! "on two hosts" — failbackd listening on the new primary's address, failback dialling it from
//! the old primary, the rewound standby streaming from the new primary over the same link — is
//! run for real on one machine: each side's processes are started inside its namespace and can
//! reach the other only through the veth pair, by its address.
//!
//! A process is put into a namespace by spawning it from a thread that first joined the
//! namespace (`setns(2)` with `CLONE_NEWNET` moves only the calling thread), so the child
//! inherits it and still drops to the test bed's unprivileged user as usual.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command};

/// One side of a [`Link`]: a namespace and its address on the link.
#[derive(Clone, Debug)]
pub struct Host {
    pub netns: String,
    pub addr: Ipv4Addr,
}

/// Two namespaces joined by a veth pair on a /24 of their own; both are deleted on drop.
#[derive(Debug)]
pub struct Link {
    pub a: Host,
    pub b: Host,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("could not run ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why namespaces cannot be made here, if they cannot (not root, or no `ip`).
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    ip(&["netns", "list"]).err()
}

impl Link {
    /// Namespaces `<tag>a` and `<tag>b` (tag: a few letters; names are made unique per process)
    /// with addresses 10.231.N.1 and 10.231.N.2, loopback up in both.
    pub fn new(tag: &str) -> Result<Link, String> {
        let n = std::process::id() % 250 + 1;
        let name = |side: &str| format!("{tag}{}{side}", std::process::id() % 100_000);
        let (na, nb) = (name("a"), name("b"));
        let link = Link {
            a: Host {
                netns: na.clone(),
                addr: Ipv4Addr::new(10, 231, n as u8, 1),
            },
            b: Host {
                netns: nb.clone(),
                addr: Ipv4Addr::new(10, 231, n as u8, 2),
            },
        };
        // Stale ones of an earlier run of this process id go first.
        for ns in [&na, &nb] {
            let _ = ip(&["netns", "del", ns]);
        }
        ip(&["netns", "add", &na])?;
        ip(&["netns", "add", &nb])?;
        // From here on, Drop cleans up whatever fails.
        let (va, vb) = (format!("v{na}"), format!("v{nb}"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &na])?;
        ip(&["link", "set", &vb, "netns", &nb])?;
        for (host, dev) in [(&link.a, &va), (&link.b, &vb)] {
            let ns = host.netns.as_str();
            let cidr = format!("{}/24", host.addr);
            ip(&["-n", ns, "addr", "add", &cidr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and so the pair.
        for host in [&self.a, &self.b] {
            let _ = ip(&["netns", "del", &host.netns]);
        }
    }
}

/// Spawns `cmd` inside network namespace `netns` (see the module's header).
pub fn spawn_in(netns: &str, cmd: &mut Command) -> std::io::Result<Child> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let ns = File::open(&path)?;
            // SAFETY: a valid descriptor of a namespace file; only this thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            cmd.spawn()
        })
        .join()
        .expect("spawning thread panicked")
    })
}
