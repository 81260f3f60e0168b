//! Loopback ports for test servers, reserved across concurrently running test processes.
//!
//! A port that is free now may be taken a moment later by another test process starting its
//! own server, or while one of our servers is stopped for a rewind. Each cluster therefore holds
//! an exclusive `flock` on `<tmp>/failback-test-ports/<port>` for its whole life; the kernel
//! drops the lock when the process dies, so a crashed test frees its ports. Ports are drawn
//! from below Linux's ephemeral range (32768+) so outgoing connections never occupy them.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

const FIRST: u16 = 15000;
const LAST: u16 = 32000;

/// A port held for the life of this value.
#[derive(Debug)]
pub struct PortLock {
    pub port: u16,
    _lock: File,
}

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("failback-test-ports");
    if !dir.is_dir() {
        let _ = fs::create_dir_all(&dir);
        // Shared by every user that runs the tests on this machine.
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777));
    }
    dir
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// Reserves a loopback port no other test process holds and nothing listens on.
pub fn reserve_port() -> PortLock {
    let dir = lock_dir();
    for _ in 0..1000 {
        let port = FIRST + (random_u64() % u64::from(LAST - FIRST)) as u16;
        let path = dir.join(port.to_string());
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o666));
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return PortLock { port, _lock: file };
        }
    }
    panic!(
        "found no free loopback port in {FIRST}..{LAST} (locks in {})",
        dir.display()
    );
}
