//! Measuring a child process: wall time, CPU time, peak memory and the bytes it read and wrote.
//!
//! The kernel counts every byte a process passes through read(2) and write(2) in
//! `/proc/PID/io` (`rchar`, `wchar`). Those counters vanish when the process is reaped, so the
//! child is waited for with `WNOWAIT`: it stays a zombie, its counters readable, until reaped.

use std::process::Command;
use std::time::{Duration, Instant};

/// What one run of a command cost.
#[derive(Clone, Debug, Default)]
pub struct Cost {
    pub wall: Duration,
    pub cpu: Duration,
    pub max_rss_kb: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub exit_code: i32,
    pub stderr: String,
}

fn io_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `cmd` to completion and measures it.
pub fn run(cmd: &mut Command) -> Cost {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn benchmarked command");
    let pid = child.id() as i32;
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            use std::io::Read;
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    // SAFETY: waitid on our own child; the siginfo struct is plain data.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        );
    }
    let wall = start.elapsed();
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    // SAFETY: reaping our own zombie child and reading its resource usage.
    let (status, usage) = unsafe {
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::wait4(pid, &mut status, 0, &mut usage);
        (status, usage)
    };
    std::mem::forget(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Cost {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kb: usage.ru_maxrss as u64,
        bytes_read: io_field(&io, "rchar:"),
        bytes_written: io_field(&io, "wchar:"),
        exit_code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        stderr: reader.join().unwrap_or_default(),
    }
}

/// A row of a side-by-side table.
pub fn row(name: &str, c: &Cost) -> String {
    format!(
        "{name:<28} {:>9.2} s {:>9.2} s {:>9} MB {:>11.1} MB {:>11.1} MB",
        c.wall.as_secs_f64(),
        c.cpu.as_secs_f64(),
        c.max_rss_kb / 1024,
        c.bytes_read as f64 / 1e6,
        c.bytes_written as f64 / 1e6
    )
}

pub fn header() -> String {
    format!(
        "{:<28} {:>11} {:>11} {:>12} {:>14} {:>14}",
        "tool", "wall", "cpu", "peak rss", "read", "written"
    )
}
