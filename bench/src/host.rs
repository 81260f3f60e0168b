//! What the end-to-end benchmarks share besides the pair and the link: waiting for a server,
//! the machine's load, sizes and dates for the report.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::measure;
use crate::wan::{Counters, TcpProxy, UdpProxy};

/// What `bin args --help` prints (empty if it cannot run): which flags a build offers.
pub fn help_of(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Bytes as (decimal) megabytes.
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Waits up to 30 s until `addr` takes TCP connections; false if `server` exits first.
pub fn wait_listening(addr: SocketAddr, server: &measure::Running) -> bool {
    wait_for(server, Duration::from_secs(30), || {
        std::net::TcpStream::connect(addr).is_ok()
    })
}

/// Waits up to `limit` until `ready` says so; false after it, or when `server` exits first.
pub fn wait_for(
    server: &measure::Running,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if ready() {
            return true;
        }
        // SAFETY: probing whether our child still exists.
        if unsafe { libc::kill(server.pid(), 0) } != 0 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The chunk bytes failbackd says it sent over `transport` (`failbackd_sent_bytes_total`),
/// scraped from its `--metrics-listen` address; 0 when it cannot be asked.
pub fn sent_bytes(metrics: SocketAddr, transport: &str) -> u64 {
    use std::io::{Read, Write};
    let scrape = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: failbackd\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    };
    let name = format!("failbackd_sent_bytes_total{{transport=\"{transport}\"}}");
    scrape().map_or(0, |text| metric(&text, &name).unwrap_or(0))
}

/// The value of the sample named `name` (labels included, as written) in Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A proxy of either kind, for the runs that may go through either.
pub enum Proxy {
    Tcp(TcpProxy),
    Udp(UdpProxy),
}

impl Proxy {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Proxy::Tcp(p) => p.local_addr(),
            Proxy::Udp(p) => p.local_addr(),
        }
    }

    pub fn counters(&self) -> std::sync::Arc<Counters> {
        match self {
            Proxy::Tcp(p) => p.counters(),
            Proxy::Udp(p) => p.counters(),
        }
    }
}

/// The machine's load average (1, 5, 15 minutes): the benchmark shares two cores with others.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The share (%) of the CPU time between two [`cpu_ticks`] readings that the hypervisor stole.
pub fn steal_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    (after.1 - before.1) as f64 * 100.0 / (after.0 - before.0).max(1) as f64
}

/// The machine's CPU time so far, in clock ticks: (all, stolen by the hypervisor). On a
/// virtual machine whose host is busy, the "steal" share is time this machine wanted to run
/// and could not: CPU-bound tools slow down with it.
pub fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let all = v.iter().take(8).sum();
    (all, v.get(7).copied().unwrap_or(0))
}

/// Today's date (UTC), for the report's name.
pub fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "undated".to_string())
}

/// The bytes of every file under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Writes back every dirty page of the file system holding `dir`. A copy of gigabytes leaves
/// them dirty; whichever tool fsyncs first would write them back on its own clock (ext4 commits
/// them with the first fsync's transaction), so every tool starts with none dirty instead.
pub fn syncfs(dir: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
    // SAFETY: syncfs only reads the descriptor, which lives until the call returns.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    assert_eq!(rc, 0, "syncfs: {}", std::io::Error::last_os_error());
}

/// `failback rewind` (or `subcommand`, e.g. `resync`) of `target` from `url`, as the
/// benchmarks run it: `--jobs`, `--compress`, the target's PostgreSQL binaries, and the report
/// written to `report`.
#[allow(clippy::too_many_arguments)]
pub fn failback_rewind_args(
    cmd: &mut Command,
    subcommand: &str,
    target: &Path,
    url: &str,
    jobs: u32,
    compress: &str,
    pg_bindir: &Path,
    report: &Path,
) {
    cmd.arg(subcommand)
        .arg("-D")
        .arg(target)
        .arg("--source")
        .arg(url)
        .arg("--jobs")
        .arg(jobs.to_string())
        .arg("--compress")
        .arg(compress)
        .arg("--pg-bindir")
        .arg(pg_bindir)
        .arg("--report")
        .arg(report);
}

/// The disk under `dir`, measured with 1 GiB of random bytes in a file of its own (then
/// removed): how fast a program writes it there and flushes it (`write` then `fsync`: what a
/// tool writing a target pays, page cache included), and how fast it reads it back past the
/// page cache (`dd iflag=direct`), in GB/s. `None` where a step fails.
pub struct DiskSpeed {
    pub write_gbps: Option<f64>,
    pub read_gbps: Option<f64>,
}

pub fn disk_speed(dir: &Path) -> DiskSpeed {
    use std::io::Write;
    const GIB: usize = 1 << 30;
    let file = dir.join("disk-speed-probe");
    // Random bytes, so that no layer can compress or deduplicate them (xorshift: the probe
    // measures the disk, not a random number generator).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..GIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let started = Instant::now();
    let written = std::fs::File::create(&file).and_then(|mut f| {
        for piece in data.chunks(4 << 20) {
            f.write_all(piece)?;
        }
        f.sync_all()
    });
    let write_gbps = written
        .is_ok()
        .then(|| GIB as f64 / started.elapsed().as_secs_f64() / 1e9);
    drop(data);
    let read_gbps = write_gbps.and_then(|_| {
        let started = Instant::now();
        let out = Command::new("dd")
            .args(["bs=4M", "iflag=direct", "of=/dev/null", "status=none"])
            .arg(format!("if={}", file.display()))
            .output()
            .ok()?;
        let secs = started.elapsed().as_secs_f64();
        out.status.success().then(|| GIB as f64 / secs / 1e9)
    });
    let _ = std::fs::remove_file(&file);
    DiskSpeed {
        write_gbps,
        read_gbps,
    }
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn a_sample_is_read_by_its_name_and_labels() {
        let text = "# HELP failbackd_sent_bytes_total chunk data bytes sent\n\
                    failbackd_sent_bytes_total{transport=\"grpc\"} 12\n\
                    failbackd_sent_bytes_total{transport=\"quic\"} 489668622\n\
                    failbackd_sent_bytes_total_other{transport=\"quic\"} 7\n";
        let quic = "failbackd_sent_bytes_total{transport=\"quic\"}";
        assert_eq!(metric(text, quic), Some(489_668_622));
        assert_eq!(
            metric(text, "failbackd_sent_bytes_total{transport=\"grpc\"}"),
            Some(12)
        );
        assert_eq!(metric(text, "failbackd_chunks_total"), None);
    }
}
