//! failback's server/client pair vs `pg_rewind --source-server`, on loopback and through a
//! simulated WAN, side by side in one run.
//!
//! The input is [`failback_bench::pair::DivergedPair`] (pgbench scale 100 by default, 1 % of
//! the accounts changed on each side unless `--changed-percent`). The old primary's data directory is saved once and
//! restored before every run, so every tool rewinds the very same target:
//!
//! - `pg_rewind --source-server` (PostgreSQL 15's) against the running new primary, through
//!   a TCP [`TcpProxy`];
//! - `failback rewind --source grpc://…` through `failbackd`, through a TCP proxy;
//! - `failback rewind --source quic://…` through a UDP [`UdpProxy`] across the WAN and
//!   straight to failbackd on loopback (its bytes then from failbackd's metrics: a user-space
//!   relay of every datagram on the same cores cost more CPU than QUIC itself), when
//!   `failbackd --help` offers `--quic-listen`;
//! - `failback rewind --source-server` against the running new primary through the same kind
//!   of TCP proxy as pg_rewind: plain libpq, no failbackd, when `failback rewind --help` offers
//!   it.
//!
//! `failbackd` serves the running new primary when it offers `--pg-conn`, otherwise its
//! shut-down data directory (the output says which). Each tool runs once on loopback (the proxy
//! with no delay and no cap, relaying TCP inside the kernel, so bytes on the wire are counted
//! the same way; QUIC direct, above) and once through
//! the WAN (`--delay-ms` each way, `--rate-mbit` each way). Reported: wall time, bytes on the
//! wire each way, CPU time and peak RSS of the client and of the server side (failbackd; the
//! PostgreSQL backend that served pg_rewind, sampled from /proc). After all measured runs, one
//! more failback rewind (gRPC, WAN) is started as a standby of the new primary and the
//! fingerprints of all tables compared: last, because the rejoin makes the source write WAL
//! that a later run would have to copy too. Before every run the restored target is written
//! back to disk (syncfs), so no tool pays for the restore's dirty pages. The table goes to
//! stdout and to `bench/results/rewind_pair-<date>.md`.
//!
//! ```text
//! cargo build --release -p failback-client -p failback-server -p failback-bench
//! target/release/rewind_pair [--scale 100] [--changed-percent 1] [--delay-ms 25] [--rate-mbit 200] [--jobs 16]
//!     [--compress 1] [--bin-dir DIR] [--baseline-bin-dir DIR] [--source-mode auto|stopped|running] [--out FILE]
//!     [--rounds N] [--no-sync] [--log-dir DIR] [--perf DIR] [--skip-pg-rewind] [--skip-verify]
//!     [--hold FILE] [--data stock|realistic] [--pattern contiguous|random]
//!     [--kept-wal-mb N] [--skip-failbackd] [--rate-mbit-then M --rate-change-after SECS]
//!     [--skip-loopback] [--skip-wan] [--skip-source-server] [--warm-summaries]
//! ```
//!
//! `--rate-mbit-then M --rate-change-after SECS`: the WAN's rate becomes M Mbit/s each way
//! SECS seconds after each tool's run starts (the proxy's start, just before the tool's), so
//! every tool meets the same link: fast then thin, or thin then fast, to see whether
//! `--compress auto` follows. `--compress` takes a comma-separated list (`auto,none,1`): every
//! failback row runs once per value, named by it, and a table sets each value against the
//! fastest fixed one; the compression choices `auto` made are listed run by run, and
//! `--log-dir DIR` keeps each run's logs in `DIR/round-N/compress-C`.
//! `--skip-loopback` runs the WAN only, `--skip-wan` loopback only (the closing check of a
//! rejoin still crosses the WAN); `--skip-source-server` leaves out the
//! `failback --source-server` rows. `--warm-summaries` starts each failback run only once
//! failbackd's WAL summarizer has caught up with the new primary's `pg_wal`, as it has when
//! failbackd is deployed beside the new primary (without it, failbackd starts just before each
//! run and decodes for the request the segments its summarizer has not reached); failbackd's
//! CPU then includes that catch-up.
//!
//! `--kept-wal-mb N` builds the pair with N MB of WAL written before the divergence and kept
//! on both sides (`wal_keep_size`): pg_rewind copies it all, failback none of it.
//! `--skip-failbackd` leaves out the failbackd rows (the libpq comparison alone).
//! `--baseline-bin-dir DIR` also runs the `failback`/`failbackd` of another build (an earlier
//! commit's `target/release`) in every round, beside this build's, and reports this build's
//! wall time against it round by round: a change is no slower when the median ratio is about 1.
//! `--data` and `--pattern` build the pair as `rewind_shapes` does (realistic filler, rows
//! drawn at random). `--changed-percent P` changes P % of the accounts on each side instead of 1 %: a rewind
//! whose bytes, not its round trips, take most of the time on the link.
//! `--rounds N` runs every configuration N times, round by round (each round runs every tool
//! once, so all see the same neighbours), and reports the round with the median wall time
//! and the median of the per-round speed-ups (the machine is shared: single runs are noisy). `--no-sync` passes `-N` to both tools (no final flush), to see the network's share of the
//! time; `--log-dir` keeps each run's `--debug` output and failback's report; `--perf DIR` runs
//! failback and failbackd under `perf record -g` (a profiling run, not a measurement);
//! `--hold FILE` builds the pair, starts the source, writes where everything is to FILE and
//! waits until FILE is removed, for runs by hand.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use failback_bench::args::{self, arg, flag};
use failback_bench::host::{cpu_ticks, dir_size, help_of, loadavg, mb, steal_percent, today};
use failback_bench::pair::{DivergedPair, copy_dir, workspace_binary};
use failback_bench::runs::{Bench, LIBPQ, Row, median, paired_speedup, table};
use failback_bench::wan::LinkSpec;
use failback_tests::{StopMode, user};

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The rows of `tool` against pg_rewind on `net`: bytes on the wire, speed-up, and the
/// speed-up round by round; each goal is its words and the bound it means.
fn against_pg_rewind(
    s: &mut String,
    tool: &str,
    net: &str,
    f: &Row,
    p: &Row,
    (bytes_goal, bytes_need): (&str, f64),
    (speed_goal, speed_need): (&str, f64),
) {
    let bytes = f.wire() as f64 / p.wire().max(1) as f64;
    let _ = writeln!(
        s,
        "| {tool} | {net} | bytes on the wire ÷ pg_rewind's | {bytes:.3} | {bytes_goal} | {} |",
        verdict(bytes <= bytes_need)
    );
    let speed = p.client.wall.as_secs_f64() / f.client.wall.as_secs_f64().max(1e-9);
    let _ = writeln!(
        s,
        "| {tool} | {net} | speed-up (pg_rewind wall ÷ failback wall) | {speed:.2}× | {speed_goal} | {} |",
        verdict(speed >= speed_need)
    );
    if let Some(paired) = paired_speedup(&p.walls, &f.walls) {
        let _ = writeln!(
            s,
            "| {tool} | {net} | speed-up round by round (median over rounds of that round's pg_rewind wall ÷ failback wall) | {paired:.2}× | {speed_goal} | {} |",
            verdict(paired >= speed_need)
        );
    }
}

fn goals(rows: &[Row], wan: &LinkSpec, kept_wal_mb: u64, disk_write_gbps: Option<f64>) -> String {
    let mut s = String::new();
    let find = |tool: &str, net: &str| rows.iter().find(|r| r.tool == tool && r.net == net && r.ok);
    s.push_str(
        "| pair | network | measure | value | goal | verdict |\n|---|---|---|---:|---|---|\n",
    );
    // The same libpq link as pg_rewind (issue 15): never slower, never more bytes; with much
    // WAL kept from before the divergence, ≥ 5× faster through the WAN with ≤ 1/10 the bytes.
    for net in ["loopback", "wan"] {
        let (Some(f), Some(p)) = (find(LIBPQ, net), find("pg_rewind --source-server", net)) else {
            continue;
        };
        let (bytes_goal, speed_goal) = if kept_wal_mb > 0 && net == "wan" {
            (("≤ 0.1", 0.1), ("≥ 5×", 5.0))
        } else {
            (("≤ 1", 1.0), ("≥ 1×", 1.0))
        };
        against_pg_rewind(&mut s, LIBPQ, net, f, p, bytes_goal, speed_goal);
    }
    // Every failback row (one per `--compress` value when several were given).
    let failback_tools: Vec<&str> = rows
        .iter()
        .map(|r| r.tool.as_str())
        .filter(|t| t.starts_with("failback (gRPC)") || t.starts_with("failback (QUIC)"))
        .fold(Vec::new(), |mut seen, t| {
            if !seen.contains(&t) {
                seen.push(t);
            }
            seen
        });
    for tool in failback_tools {
        for net in ["loopback", "wan"] {
            let Some(f) = find(tool, net) else {
                continue;
            };
            // Without pg_rewind's runs (`--skip-pg-rewind`) only the floor below is a goal.
            if let Some(p) = find("pg_rewind --source-server", net) {
                let speed_goal = if net == "wan" {
                    ("≥ 5×", 5.0)
                } else {
                    ("≥ 2×", 2.0)
                };
                against_pg_rewind(&mut s, tool, net, f, p, ("≤ 0.333", 1.0 / 3.0), speed_goal);
            }
            // The floor is physical: the target's disk must write and flush what failback
            // wrote (`disk_speed`'s write rate, page cache included) and, through the WAN, the
            // link must carry what the source sent; the rewind takes at least the longer.
            let wall = f.client.wall.as_secs_f64();
            let disk = disk_write_gbps.map(|gbps| {
                let t = f.client.storage_written as f64 / (gbps * 1e9);
                (
                    t,
                    format!(
                        "bytes written {:.0} MB ÷ the disk's write rate {gbps:.2} GB/s = {t:.2} s",
                        mb(f.client.storage_written)
                    ),
                )
            });
            let link = wan
                .link_time(f.down)
                .filter(|_| net == "wan")
                .map(|t| (t, format!("server→client bytes ÷ link rate = {t:.2} s")));
            let terms: Vec<&(f64, String)> = [&disk, &link].into_iter().flatten().collect();
            if let Some(floor) = terms.iter().map(|(t, _)| *t).reduce(f64::max) {
                let what = terms.iter().map(|(_, w)| w.as_str()).collect::<Vec<_>>();
                let what = match what.as_slice() {
                    [one] => format!("({one})"),
                    more => format!("the longer of ({})", more.join("; ")),
                };
                let ratio = wall / floor.max(1e-9);
                let _ = writeln!(
                    s,
                    "| {tool} | {net} | wall ÷ {what} | {ratio:.2} | ≤ 1.3 | {} |",
                    verdict(ratio <= 1.3)
                );
            }
        }
    }
    s
}

/// With several `--compress` values: each one's wall time per transport and network against
/// the fastest fixed choice (every value but `auto`), as the ratio of the medians and the
/// median of each round's ratio (the runs of one round ran back to back).
fn against_fixed(rows: &[Row], compressions: &[String]) -> String {
    let mut s = String::from(
        "| tool | network | --compress | wall (s) | wire server→client (MB) | wall ÷ fastest fixed | round by round | fastest fixed |\n\
         |---|---|---|---:|---:|---:|---:|---|\n",
    );
    for tool in ["failback (gRPC)", "failback (QUIC)"] {
        for net in ["loopback", "wan"] {
            let of = |c: &str| {
                let name = format!("{tool} --compress {c}");
                rows.iter().find(|r| r.tool == name && r.net == net && r.ok)
            };
            let Some((best_c, best)) = compressions
                .iter()
                .filter(|c| c.as_str() != "auto")
                .filter_map(|c| of(c).map(|r| (c, r)))
                .min_by(|a, b| a.1.client.wall.cmp(&b.1.client.wall))
            else {
                continue;
            };
            for c in compressions {
                let Some(r) = of(c) else { continue };
                let wall = r.client.wall.as_secs_f64();
                let paired = paired_speedup(&r.walls, &best.walls)
                    .map_or("-".to_string(), |x| format!("{x:.2}"));
                let _ = writeln!(
                    s,
                    "| {tool} | {net} | {c} | {wall:.2} | {:.2} | {:.2} | {paired} | {best_c} |",
                    mb(r.down),
                    wall / best.client.wall.as_secs_f64().max(1e-9)
                );
            }
        }
    }
    s
}

/// This build's wall time against the baseline build's, per tool and network: the ratio of the
/// medians, and the median of each round's ratio (both ran in the same round, back to back).
fn against_baseline(rows: &[Row]) -> String {
    let mut s = String::from(
        "| tool | network | wall (s) | baseline wall (s) | wall ÷ baseline's | round by round |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for tool in ["failback (gRPC)", "failback (QUIC)"] {
        for net in ["loopback", "wan"] {
            let base = format!("{tool}, baseline");
            let find = |t: &str| rows.iter().find(|r| r.tool == t && r.net == net && r.ok);
            let (Some(new), Some(old)) = (find(tool), find(&base)) else {
                continue;
            };
            let (w, b) = (new.client.wall.as_secs_f64(), old.client.wall.as_secs_f64());
            let paired = paired_speedup(&new.walls, &old.walls)
                .map_or("-".to_string(), |r| format!("{r:.2}"));
            let _ = writeln!(
                s,
                "| {tool} | {net} | {w:.2} | {b:.2} | {:.2} | {paired} |",
                w / b.max(1e-9)
            );
        }
    }
    s
}

fn main() {
    let scale = arg("--scale", 100u32);
    let percent = arg("--changed-percent", 1u32);
    let delay_ms = arg("--delay-ms", 25u64);
    let rate_mbit = arg("--rate-mbit", 200u64);
    let rate_mbit_then = arg("--rate-mbit-then", 0u64);
    let rate_change_after = arg("--rate-change-after", 0f64);
    let jobs = arg("--jobs", 16u32);
    let compress = arg("--compress", "1".to_string());
    let compressions: Vec<String> = compress
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    assert!(!compressions.is_empty(), "--compress: no value");
    // One --compress value names rows as before; several name each row by its value.
    let labelled = compressions.len() > 1;
    let skip_loopback = flag("--skip-loopback");
    let skip_wan = flag("--skip-wan");
    let bin_dir = arg("--bin-dir", String::new());
    let source_mode = arg("--source-mode", "auto".to_string());
    let no_sync = flag("--no-sync");
    let rounds = arg("--rounds", 1usize).max(1);
    let skip_pg_rewind = flag("--skip-pg-rewind");
    let skip_verify = flag("--skip-verify");
    let skip_failbackd = flag("--skip-failbackd");
    let skip_source_server = flag("--skip-source-server");
    let warm_summaries = flag("--warm-summaries");
    let kept_wal_mb = arg("--kept-wal-mb", 0u64);
    let log_dir = arg("--log-dir", String::new());
    let log_dir = (!log_dir.is_empty()).then(|| PathBuf::from(log_dir));
    let perf_dir = arg("--perf", String::new());
    let perf_dir = (!perf_dir.is_empty()).then(|| PathBuf::from(perf_dir));
    let bin_dir = (!bin_dir.is_empty()).then(|| PathBuf::from(bin_dir));
    let baseline = arg("--baseline-bin-dir", String::new());
    let data: failback_bench::pair::Data = arg("--data", "stock".to_string())
        .parse()
        .unwrap_or_else(|e| panic!("--data: {e}"));
    let pattern: failback_bench::pair::Pattern = arg("--pattern", "contiguous".to_string())
        .parse()
        .unwrap_or_else(|e| panic!("--pattern: {e}"));
    let hold = arg("--hold", String::new());
    let out_path = args::out_file(&format!("rewind_pair-{}.md", today()));
    args::done();
    let failback = workspace_binary("failback", bin_dir.as_deref());
    let failbackd = workspace_binary("failbackd", bin_dir.as_deref());
    let baseline = (!baseline.is_empty()).then(|| {
        let dir = PathBuf::from(baseline);
        (
            workspace_binary("failback", Some(&dir)),
            workspace_binary("failbackd", Some(&dir)),
        )
    });
    let daemon_help = help_of(&failbackd, &[]);
    let client_help = help_of(&failback, &["rewind"]);
    let quic = daemon_help.contains("--quic-listen") && client_help.contains("quic");
    let pg_conn = daemon_help.contains("--pg-conn");
    let libpq = client_help.contains("--source-server") && !skip_source_server;
    let running_source = match source_mode.as_str() {
        "running" => true,
        "stopped" => false,
        _ => pg_conn,
    };
    let mut wan = LinkSpec::wan(Duration::from_millis(delay_ms), rate_mbit);
    if rate_mbit_then > 0 {
        wan = wan.changing(Duration::from_secs_f64(rate_change_after), rate_mbit_then);
    }
    let mut nets: Vec<(&'static str, LinkSpec)> = vec![("loopback", LinkSpec::unlimited())];
    if skip_loopback {
        nets.clear();
    }
    if !skip_wan {
        nets.push(("wan", wan));
    }

    let started = Instant::now();
    let load_before = loadavg();
    let DivergedPair {
        old, new, changed, ..
    } = DivergedPair::build_keeping(scale, percent, data, pattern, kept_wal_mb);
    let work = old.base_dir().join("bench");
    user::create_dir(&work);
    let pristine = work.join("pristine");
    copy_dir(&old.data_dir(), &pristine);
    let target_size: u64 = dir_size(&old.data_dir());
    // Measured before the runs, on the file system the targets are rewound on.
    let disk = failback_bench::host::disk_speed(&work);
    let mut b = Bench {
        old,
        new,
        pristine,
        work,
        failback,
        failbackd,
        baseline,
        jobs,
        compress: compressions[0].clone(),
        running_source,
        no_sync,
        log_dir: log_dir.clone(),
        perf_dir,
        after_restore: None,
        subcommand: "rewind",
        restore_changed_only: false,
        warm_summaries,
    };
    eprintln!("pair ready after {:.0?}", started.elapsed());

    let mut rows = Vec::new();
    let mut verified = String::from("not run");
    if b.running_source {
        b.new.start();
        b.new.execute("CHECKPOINT");
    }
    if !hold.is_empty() {
        hold_for_manual_runs(&b, Path::new(&hold));
        return;
    }
    // Round by round, every tool in turn: the machine is shared, and a tool measured only
    // while a neighbour is busy would carry that neighbour's load in its median.
    let ticks_before = cpu_ticks();
    let mut runs: Vec<Vec<Row>> = Vec::new();
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        let mut this_round = Vec::new();
        for &(net, spec) in &nets {
            if !b.running_source && b.new.is_running() {
                b.new.stop(StopMode::Fast);
            }
            for c in compressions.iter().filter(|_| !skip_failbackd) {
                b.compress = c.clone();
                if labelled {
                    // Each value's runs keep their own logs: they share the file names.
                    b.log_dir = log_dir.as_ref().map(|d| {
                        d.join(format!("round-{}", round + 1))
                            .join(format!("compress-{c}"))
                    });
                }
                let label = |mut r: Row| {
                    if labelled {
                        r.tool = format!("{} --compress {c}", r.tool);
                    }
                    r
                };
                this_round.push(label(b.failback_run(net, spec, false)));
                this_round.extend(b.baseline_run(net, spec, false).map(label));
                if quic {
                    this_round.push(label(b.failback_run(net, spec, true)));
                    this_round.extend(b.baseline_run(net, spec, true).map(label));
                }
            }
            // pg_rewind and failback --source-server need the source running, and pg_rewind a
            // checkpoint on its new timeline.
            if !b.new.is_running() && (libpq || !skip_pg_rewind) {
                b.new.start();
            }
            if round == 0 && !skip_pg_rewind {
                b.new.execute("CHECKPOINT");
            }
            if libpq {
                this_round.push(b.libpq_run(net, spec));
            }
            if !skip_pg_rewind {
                this_round.push(b.pg_rewind_run(net, spec));
            }
        }
        runs.push(this_round);
    }
    let ticks_after = cpu_ticks();
    b.log_dir = log_dir;
    let mut choices = String::new();
    for (round, rows) in runs.iter().enumerate() {
        for r in rows {
            let Some(c) = &r.compression else { continue };
            let ahead = r
                .fetched_ahead
                .map(|b| format!(", {:.1} MB of it fetched ahead of the plan", mb(b)))
                .unwrap_or_default();
            let _ = writeln!(
                choices,
                "- round {}, {} over {}: {:.2} s, {:.1} MB server→client{ahead}. {c}",
                round + 1,
                r.tool,
                r.net,
                r.client.wall.as_secs_f64(),
                mb(r.down)
            );
        }
    }
    let mut columns: Vec<Vec<Row>> = Vec::new();
    for round in runs {
        columns.resize_with(round.len(), Vec::new);
        for (i, row) in round.into_iter().enumerate() {
            columns[i].push(row);
        }
    }
    rows.extend(columns.into_iter().map(median));
    // Last, not before a measured run: the rejoin makes the source write WAL, and a later
    // run would have more to copy than the others.
    if !skip_verify {
        if !b.running_source && b.new.is_running() {
            b.new.stop(StopMode::Fast);
        }
        let (ok, how) = if skip_failbackd && libpq {
            if !b.new.is_running() {
                b.new.start();
            }
            (b.libpq_run("wan", wan).ok, "--source-server")
        } else {
            (b.failback_run("wan", wan, false).ok, "gRPC")
        };
        if ok {
            b.verify();
            verified = format!(
                "after all measured runs, one more failback rewind ({how}, WAN; not in the table) started as a standby of the new primary, caught up, and every table's fingerprint matched"
            );
        } else {
            verified = format!("FAILED: the verification rewind ({how}, WAN) did not succeed");
        }
    }
    let mode = if skip_failbackd {
        "no failbackd rows (--skip-failbackd): pg_rewind and failback --source-server, both against the running new primary"
    } else if b.running_source {
        "failbackd served the RUNNING new primary (--pg-conn), as pg_rewind --source-server does"
    } else if pg_conn {
        "failbackd served the new primary's data directory while it was SHUT DOWN (--source-mode stopped); pg_rewind ran against the running server"
    } else {
        "failbackd served the new primary's data directory while it was SHUT DOWN (this failbackd has no --pg-conn yet); pg_rewind ran against the running server"
    };
    let summaries_note = if b.warm_summaries {
        " Each failback run started once failbackd's WAL summarizer had caught up with pg_wal (`--warm-summaries`: failbackd deployed beside the new primary); failbackd's CPU includes that catch-up."
    } else {
        " failbackd started just before each failback run: what its WAL summarizer had not reached was decoded for the request."
    };
    let mode = format!(
        "{mode}.{}",
        if skip_failbackd { "" } else { summaries_note }
    );
    let quic_note = if skip_failbackd {
        "QUIC: not measured (--skip-failbackd)."
    } else if quic {
        "QUIC: measured (failbackd --quic-listen, failback --source quic://) through the UDP proxy."
    } else {
        "QUIC: skipped — this failbackd has no --quic-listen (or this failback no quic:// source)."
    };
    let gbps = |v: Option<f64>| v.map_or("not measured".to_string(), |g| format!("{g:.2} GB/s"));
    let disk_note = format!(
        "writes {} (1 GiB of random bytes written and flushed), reads {} (`dd iflag=direct`)",
        gbps(disk.write_gbps),
        gbps(disk.read_gbps)
    );
    let load_after = loadavg();
    let steal = steal_percent(ticks_before, ticks_after);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# failback pair vs pg_rewind --source-server — {}\n",
        today()
    );
    let change = wan.change.map_or(String::new(), |c| {
        format!(
            ", then {rate_mbit_then} Mbit/s each way (queue {} KiB) from {:.1} s after the start of each tool's run (`--rate-mbit-then`, `--rate-change-after`; bytes already queued keep their departure)",
            c.queue / 1024,
            c.after.as_secs_f64()
        )
    });
    let loopback = if skip_loopback {
        "Loopback: not run (--skip-loopback)."
    } else {
        "Loopback: the proxy with no delay and no cap (TCP relayed inside the kernel); QUIC straight to failbackd."
    };
    let _ = writeln!(
        out,
        "PostgreSQL 15, pgbench scale {scale} ({data:?} data, {pattern:?} rows; target data directory {:.0} MB), {changed} accounts changed on each side. \
         failback: --jobs {} --compress {compress}. {loopback} \
         WAN: {delay_ms} ms each way ({} ms RTT), {rate_mbit} Mbit/s each way{change}, token bucket {} KiB, queue {} KiB \
         (`failback_bench::wan`). Each tool rewound a fresh copy of the same diverged target, \
         written back to disk (syncfs) before the tool started. WAL kept on both sides from \
         before the divergence: {kept_wal_mb} MB (`--kept-wal-mb`).\n",
        mb(target_size),
        b.jobs,
        2 * delay_ms,
        wan.burst / 1024,
        wan.queue / 1024
    );
    let sync_note = if b.no_sync {
        "Both tools ran with -N (no final flush to disk): a diagnostic run, not the comparison."
    } else {
        "Both tools flushed the target to disk at the end (their default)."
    };
    let _ = writeln!(
        out,
        "- Source mode: {mode}\n- {quic_note}\n- {sync_note}\n- Correctness: {verified}.\n\
         - The targets' disk: {disk_note}.\n\
         - Machine: {cpus} CPUs, load average {load_before} at the start and {load_after} at the \
         end, {steal:.0} % of CPU time stolen by the hypervisor during the measured runs (other \
         work shares the machine; CPU-bound steps slow down with it).\n"
    );
    out.push_str(&table(&rows));
    out.push_str("\n## Against the goals (design.md)\n\n");
    out.push_str(&goals(&rows, &wan, kept_wal_mb, disk.write_gbps));
    if labelled {
        out.push_str("\n## Each --compress against the fastest fixed choice\n\n");
        out.push_str(&against_fixed(&rows, &compressions));
    }
    if !choices.is_empty() {
        out.push_str("\n## failback's compression, run by run (`--report`)\n\n");
        out.push_str(&choices);
    }
    if b.baseline.is_some() {
        out.push_str("\n## Against the baseline build (`--baseline-bin-dir`)\n\n");
        out.push_str(&against_baseline(&rows));
    }
    out.push_str("\n## failback's time per phase (`--report`, seconds)\n\n");
    for r in rows.iter().filter(|r| r.phases.is_some()) {
        let _ = writeln!(
            out,
            "- {} over {}: `{}`",
            r.tool,
            r.net,
            r.phases.as_ref().map(|p| p.to_string()).unwrap_or_default()
        );
    }
    println!("{out}");
    if let Some(dir) = out_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&out_path, &out) {
        Ok(()) => eprintln!("written to {}", out_path.display()),
        Err(e) => eprintln!("could not write {}: {e}", out_path.display()),
    }
}

/// `--hold FILE`: writes to FILE, as shell assignments, where the pair is (the target, its
/// pristine copy, the source's data directory, conninfo and binaries), then waits until FILE
/// is removed: for profiling and tracing single runs by hand on one pair.
fn hold_for_manual_runs(b: &Bench, file: &Path) {
    let text = format!(
        "OLD={}\nPRISTINE={}\nNEW={}\nCONN='{}'\nPGBIN={}\nFAILBACK={}\nFAILBACKD={}\n",
        b.old.data_dir().display(),
        b.pristine.display(),
        b.new.data_dir().display(),
        b.new.conninfo(),
        b.old.bins().bin_dir.display(),
        b.failback.display(),
        b.failbackd.display(),
    );
    std::fs::write(file, text).expect("write the --hold file");
    eprintln!("holding the pair: remove {} to end", file.display());
    while file.exists() {
        std::thread::sleep(Duration::from_millis(500));
    }
}
