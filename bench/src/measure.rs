//! Measuring a child process: wall time, CPU time, peak memory and the bytes it read and wrote.
//!
//! The kernel counts every byte a process passes through read(2) and write(2) in
//! `/proc/PID/io` (`rchar`, `wchar`), and every byte it dirtied in files, bound for the disk
//! (`write_bytes`, less `cancelled_write_bytes` for what was truncated before writeback); a
//! process's counters include those of the children it reaped. They vanish when the process is
//! reaped, so the child is waited for with `WNOWAIT`: it stays a zombie, its counters
//! readable, until reaped.
//!
//! `write_bytes` charges a process for every page-cache folio it dirties, whole: where the
//! kernel caches a file in large folios (read ahead into 64 KiB or more), an 8 KiB block
//! written into one is charged as the folio's size, and scattered blocks look several times
//! their bytes. What reached the disks is counted too: the sectors the machine's disks wrote
//! (`/proc/diskstats`) from the start to the end, after a `sync` at both, which includes
//! whatever else was written meanwhile.

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
    /// Bytes written to files, bound for the disk (not to sockets or pipes), as the process
    /// was charged for them (whole folios).
    pub storage_written: u64,
    /// Bytes the machine's disks wrote while it ran, after a sync at its start and end.
    pub disk_written: u64,
    pub exit_code: i32,
    pub stderr: String,
}

/// Bytes the machine's disks have written since boot, once what is dirty has been written: the
/// sectors of every whole physical disk (those with a `device` under `/sys/block`; not
/// partitions, device-mapper or loop devices, which would count the same bytes twice).
pub fn disk_written_after_sync() -> u64 {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let stats = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
    stats
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(2)?;
            std::path::Path::new("/sys/block")
                .join(name)
                .join("device")
                .exists()
                .then(|| f.get(9)?.parse::<u64>().ok())
                .flatten()
        })
        .sum::<u64>()
        * 512
}

fn io_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A measured child process still running (a server measured over a whole run).
pub struct Running {
    pid: i32,
    start: Instant,
    disk_before: u64,
    reader: std::thread::JoinHandle<()>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The highest `VmHWM` seen, kB.
    hwm_kb: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The process's own peak resident memory (`VmHWM` in `/proc/PID/status`), kB; None once it has
/// exited (a zombie has no memory left to describe).
fn vm_hwm_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Starts `cmd` (stdout discarded, stderr collected) to be measured by [`Running::finish`].
pub fn spawn(cmd: &mut Command) -> std::io::Result<Running> {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let disk_before = disk_written_after_sync();
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let pipe = child.stderr.take();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = stderr.clone();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let Some(e) = pipe else { return };
        for line in std::io::BufReader::new(e).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.push_str(&line);
            s.push('\n');
        }
    });
    // Reaped by `finish` with wait4, which std's Child does not know about.
    std::mem::forget(child);
    // Peak memory is sampled, not taken from wait4: Linux carries a parent's high-water mark
    // into a child across fork and exec (`ru_maxrss` is at least the benchmark's own resident
    // size when it started the child, some 100 MB with a run's logs held). VmHWM is the
    // exec'd program's own; a peak in its last 10 ms before exiting would be missed.
    let hwm_kb = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = hwm_kb.clone();
    std::thread::spawn(move || {
        while let Some(kb) = vm_hwm_kb(pid) {
            seen.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    Ok(Running {
        pid,
        start,
        disk_before,
        reader,
        stderr,
        hwm_kb,
    })
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// What it printed on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends `signal` (e.g. `libc::SIGINT` to stop a server).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own, not yet reaped, child.
        unsafe {
            libc::kill(self.pid, signal);
        }
    }

    /// Waits for the process to exit and measures it.
    pub fn finish(self) -> Cost {
        let pid = self.pid;
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
        let wall = self.start.elapsed();
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        // SAFETY: reaping our own zombie child and reading its resource usage.
        let (status, usage) = unsafe {
            let mut status = 0;
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::wait4(pid, &mut status, 0, &mut usage);
            (status, usage)
        };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        Cost {
            wall,
            cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
            max_rss_kb: match self.hwm_kb.load(std::sync::atomic::Ordering::Relaxed) {
                0 => usage.ru_maxrss as u64,
                kb => kb,
            },
            bytes_read: io_field(&io, "rchar:"),
            bytes_written: io_field(&io, "wchar:"),
            storage_written: io_field(&io, "write_bytes:")
                .saturating_sub(io_field(&io, "cancelled_write_bytes:")),
            disk_written: disk_written_after_sync().saturating_sub(self.disk_before),
            exit_code: if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            },
            stderr: {
                let _ = self.reader.join();
                let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
                s.clone()
            },
        }
    }
}

/// Runs `cmd` to completion and measures it.
pub fn run(cmd: &mut Command) -> Cost {
    spawn(cmd).expect("spawn benchmarked command").finish()
}

/// CPU time and peak memory of processes that are not our children (a PostgreSQL backend
/// serving a client), sampled from `/proc` until [`Sampler::stop`]. The last few milliseconds
/// of a process that exits between two samples are missed, so this is a lower bound.
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, u64)>,
}

/// utime + stime in clock ticks and VmHWM in kB of `pid`, if it still exists.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((ticks, vm_hwm_kb(pid as i32).unwrap_or(0)))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Sampler {
    /// Samples every child of `parent` whose command line contains `needle` and not `unless`.
    pub fn start(parent: u32, needle: &str, unless: &str) -> Sampler {
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (s, needle, unless) = (stop.clone(), needle.to_string(), unless.to_string());
        let thread = std::thread::spawn(move || {
            let mut seen: HashMap<u32, (u64, u64)> = HashMap::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(dir) = std::fs::read_dir("/proc") {
                    for e in dir.flatten() {
                        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
                            continue;
                        };
                        if parent_of(pid) != Some(parent) {
                            continue;
                        }
                        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        let cmd = String::from_utf8_lossy(&cmd);
                        if !cmd.contains(&needle) || (!unless.is_empty() && cmd.contains(&unless)) {
                            continue;
                        }
                        if let Some(u) = proc_usage(pid) {
                            let entry = seen.entry(pid).or_default();
                            *entry = (entry.0.max(u.0), entry.1.max(u.1));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            let ticks: u64 = seen.values().map(|v| v.0).sum();
            let hwm = seen.values().map(|v| v.1).max().unwrap_or(0);
            (Duration::from_millis(ticks * 1000 / hz), hwm)
        });
        Sampler { stop, thread }
    }

    /// Stops sampling: (CPU time, largest peak RSS in kB) of the processes seen.
    pub fn stop(self) -> (Duration, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
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
