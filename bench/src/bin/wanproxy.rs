//! `wanproxy`: a simulated wide-area link between a client and a server on this machine.
//!
//! Listens on `--listen` and forwards TCP connections (`--tcp`, the default) and/or UDP
//! datagrams (`--udp`; each client address gets its own upstream socket) to `--target`,
//! delaying each direction by `--delay-ms` and capping each direction at `--rate-mbit`
//! (see `failback_bench::wan` for the model). On SIGINT or SIGTERM it prints the bytes carried
//! each way and exits; `--stats-secs N` prints them every N seconds too.
//!
//! `wanproxy --listen 127.0.0.1:17432 --target 127.0.0.1:7432 --delay-ms 25 --rate-mbit 200`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use failback_bench::wan::{Counters, LinkSpec, TcpProxy, UdpProxy};

#[derive(Parser)]
#[command(
    name = "wanproxy",
    about = "TCP/UDP proxy adding delay and a bandwidth cap"
)]
struct Args {
    /// Address to listen on (TCP and/or UDP).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Address to forward to.
    #[arg(long, value_name = "ADDR")]
    target: SocketAddr,
    /// Proxy TCP connections (the default when neither --tcp nor --udp is given).
    #[arg(long)]
    tcp: bool,
    /// Relay UDP datagrams.
    #[arg(long)]
    udp: bool,
    /// One-way delay added in each direction, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Bandwidth cap of each direction in Mbit/s (0: none).
    #[arg(long, default_value_t = 0)]
    rate_mbit: u64,
    /// Token bucket size in KiB (largest burst at line speed).
    #[arg(long, value_name = "KIB")]
    burst_kb: Option<u64>,
    /// Bottleneck queue in KiB [default: one round trip's bandwidth-delay product].
    #[arg(long, value_name = "KIB")]
    queue_kb: Option<u64>,
    /// Print the byte counts every N seconds.
    #[arg(long, value_name = "N")]
    stats_secs: Option<u64>,
}

fn show(what: &str, c: &Counters) -> String {
    let (up, down, dropped) = c.snapshot();
    format!(
        "{what}: client->target {up} bytes, target->client {down} bytes, {dropped} datagrams dropped"
    )
}

fn main() -> Result<()> {
    let a = Args::parse();
    let delay = Duration::from_secs_f64(a.delay_ms.max(0.0) / 1000.0);
    let mut spec = if a.rate_mbit == 0 {
        LinkSpec {
            delay,
            ..LinkSpec::unlimited()
        }
    } else {
        LinkSpec::wan(delay, a.rate_mbit)
    };
    if let Some(b) = a.burst_kb {
        spec.burst = b.max(1) * 1024;
    }
    if let Some(q) = a.queue_kb {
        spec.queue = q * 1024;
    }
    // Block the termination signals before any thread starts, so only sigwait sees them.
    // SAFETY: signal-set manipulation and default dispositions; no handlers are installed.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        // A shell starts background jobs with SIGINT ignored, and sigwait never sees an
        // ignored signal: restore the default first (it stays blocked, so it only wakes us).
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mut counters: Vec<(&str, Arc<Counters>)> = Vec::new();
    let _tcp = if a.tcp || !a.udp {
        let p = TcpProxy::start(a.listen, a.target, spec, spec)
            .with_context(|| format!("TCP proxy on {}", a.listen))?;
        counters.push(("tcp", p.counters()));
        Some(p)
    } else {
        None
    };
    let _udp = if a.udp {
        let p = UdpProxy::start(a.listen, a.target, spec, spec)
            .with_context(|| format!("UDP proxy on {}", a.listen))?;
        counters.push(("udp", p.counters()));
        Some(p)
    } else {
        None
    };
    eprintln!(
        "wanproxy: {} -> {}, {:?} each way, {}",
        a.listen,
        a.target,
        delay,
        spec.rate_bits
            .map_or("no rate cap".to_string(), |r| format!(
                "{} Mbit/s each way",
                r / 1_000_000
            ))
    );
    if let Some(secs) = a.stats_secs.filter(|s| *s > 0) {
        let c = counters.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(secs));
                for (what, c) in &c {
                    eprintln!("wanproxy: {}", show(what, c));
                }
            }
        });
    }
    let mut sig = 0;
    // SAFETY: waits for one of the signals blocked above.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
    for (what, c) in &counters {
        println!("{}", show(what, c));
    }
    Ok(())
}
