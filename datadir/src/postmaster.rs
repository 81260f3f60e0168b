//! Whether PostgreSQL runs on a data directory.
//!
//! A running postmaster holds `postmaster.pid` in its data directory (`miscadmin.h`,
//! `LOCK_FILE_LINE_*`): line 1 is its PID, line 4 the port it listens on. The file outlives a
//! crash, so it only says a server runs when the process it names exists. A PID owned by another
//! user still counts (`kill(pid, 0)` fails with `EPERM` then); a stale file names a process
//! that is gone.

use std::path::Path;

/// `LOCK_FILE_LINE_PORT`: the line of `postmaster.pid` holding the port (1-based).
const LOCK_FILE_LINE_PORT: usize = 4;

/// `postmaster.pid`, read like every file of the data directory (a link planted there is
/// not followed).
fn pid_file(pgdata: &Path) -> Option<String> {
    let bytes = crate::DataDir::new(pgdata)
        .read_file("postmaster.pid")
        .ok()??;
    String::from_utf8(bytes).ok()
}

/// The PID in `pgdata/postmaster.pid` when that process exists: PostgreSQL runs on `pgdata`.
pub fn running_postmaster(pgdata: &Path) -> Option<i32> {
    let text = pid_file(pgdata)?;
    let pid = text.lines().next()?.trim().parse::<i32>().ok()?;
    if pid <= 0 {
        return None;
    }
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive.then_some(pid)
}

/// The port the PostgreSQL running on `pgdata` listens on, when one runs.
pub fn running_port(pgdata: &Path) -> Option<u16> {
    running_postmaster(pgdata)?;
    let text = pid_file(pgdata)?;
    text.lines()
        .nth(LOCK_FILE_LINE_PORT - 1)?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_stale_pid_file_is_not_a_running_server() {
        let dir = std::env::temp_dir().join(format!("fb-postmaster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(running_postmaster(&dir), None);
        std::fs::write(dir.join("postmaster.pid"), "garbage\n").unwrap();
        assert_eq!(running_postmaster(&dir), None);
        // This process is alive: its PID counts as a running postmaster.
        let me = std::process::id() as i32;
        std::fs::write(
            dir.join("postmaster.pid"),
            format!("{me}\n/data\n1700000000\n5433\n"),
        )
        .unwrap();
        assert_eq!(running_postmaster(&dir), Some(me));
        assert_eq!(running_port(&dir), Some(5433));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
