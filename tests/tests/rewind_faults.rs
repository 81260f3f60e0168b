//! A rewind interrupted anywhere ends, after one more run, with the new primary's data.
//!
//! - `crash_anywhere`: for deterministic seeds, failback kills itself with SIGKILL (its fault
//!   hook, `FAILBACK_FAULT=kill-at=POINT:N`) during the WAL scan, the copy, the final sync or
//!   one of the commit's steps, on a fresh copy of the same diverged target. Then: a kill
//!   during the scan left no rewind begun; a later one left it marked unfinished, and
//!   PostgreSQL refuses to start on it while the marker is there; `failback rewind` run again
//!   completes, and the old primary rejoins with the new primary's fingerprint. A few seeds on
//!   every version 13–18, many on one.
//! - The source side, through failbackd (gRPC and QUIC), mid-copy: failbackd killed and
//!   restarted (failback waits and goes on), failbackd gone for longer than `--timeout`
//!   (failback stops with a clear message; a run once it is back resumes), and the link cut
//!   (every TCP connection closed; every datagram dropped for a while).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use failback_common::journal::JOURNAL_FILE;
use failback_tests::failbackd::{Failbackd, Via};
use failback_tests::proxy::{TcpCut, UdpCut};
use failback_tests::rewind::{
    FailbackRun, assert_resumed, assert_tens_of_mb_rewound, assert_unfinished,
    diverged_with_tens_of_mb, rejoin, run_failback, run_failback_with, status, stop_for_rewind,
};
use failback_tests::run::run_ok;
use failback_tests::{Cluster, PgMajor, StopMode, pg_test};

/// An old primary and its promoted standby, both shut down, diverged by tens of MB.
fn diverged(major: PgMajor) -> (Cluster, Cluster) {
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    stop_for_rewind(&mut old, &mut new, StopMode::Immediate);
    (old, new)
}

fn rewind_args(old: &Cluster, source: Vec<OsString>, extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["rewind".into(), "-D".into(), old.data_dir().into()];
    a.extend(source);
    a.extend(["--pg-bindir".into(), old.bins().bin_dir.clone().into()]);
    a.extend(extra.iter().map(OsString::from));
    a
}

fn local(new: &Cluster) -> Vec<OsString> {
    vec!["--source-pgdata".into(), new.data_dir().into()]
}

/// `failback status -D`'s exit code: 0 nothing unfinished, 3 an unfinished rewind.
fn status_code(old: &Cluster) -> i32 {
    status(old).status.code().unwrap_or(-1)
}

fn assert_killed(run: &FailbackRun, what: &str) {
    assert_eq!(
        run.status.signal(),
        Some(9),
        "{what}: failback was not killed where asked:\n{}",
        run.show()
    );
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    run_ok(
        Command::new("cp").arg("-a").arg(from).arg(to),
        Duration::from_secs(120),
    );
}

// ---- the client killed anywhere ----

/// A crash point for `seed`: the phase by turns (scan, copy, sync, commit), how far into it by
/// a splitmix64 draw. Counts past the end of a phase leave the run unharmed, which the test
/// accepts: most seeds land inside.
fn crash_point(seed: u64) -> (&'static str, u64) {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let (point, hi) = match seed % 4 {
        0 => ("scan", 400),
        1 => ("bytes", 24 << 20),
        2 => ("sync", 12),
        // With -R: 1 journal "copied", 2 backup_label, 3 pg_control, 4 journal "committed",
        // 5 standby.signal, 6 postgresql.auto.conf without the marker, 7 the journal removed.
        _ => ("commit", 7),
    };
    (point, 1 + z % hi)
}

fn crash_anywhere(major: PgMajor, seeds: std::ops::Range<u64>) {
    let (mut old, mut new) = diverged(major);
    let snapshot = old.base_dir().join("diverged");
    copy_tree(&old.data_dir(), &snapshot);
    let conninfo = new.conninfo();
    let args = rewind_args(&old, local(&new), &["-R", "--primary-conninfo", &conninfo]);
    let mut killed = 0;
    for seed in seeds {
        copy_tree(&snapshot, &old.data_dir());
        let (point, n) = crash_point(seed);
        let fault = format!("kill-at={point}:{n}");
        let what = format!("PostgreSQL {major}, seed {seed} ({fault})");
        let first = run_failback_with(&args, None, &[("FAILBACK_FAULT", &fault)]);
        if first.success() {
            eprintln!("{what}: past the end of the phase, the run finished");
        } else {
            assert_killed(&first, &what);
            killed += 1;
            let code = status_code(&old);
            // Killed in the scan, the rewind had not begun (the crash recovery that cleans up
            // an old primary that crashed runs before it); killed after its last step, it was
            // over. In between, it is unfinished.
            let expected = if point == "scan" || (point == "commit" && n == 7) {
                0
            } else {
                3
            };
            assert_eq!(code, expected, "{what}: failback status exits with {code}");
            // Until its last step the commit leaves the marker in place.
            if code == 3 && !(point == "commit" && n >= 6) {
                assert_unfinished(&mut old);
            }
            let again = run_failback(&args, Some(&old.base_dir().join("again.json")));
            if point == "commit" && n == 7 {
                // Killed once all was done: one more run finds nothing to do, says so and
                // succeeds (an orchestrator that runs it again is not told to re-clone).
                assert!(again.success(), "{what}:\n{}", again.show());
                for needle in ["was already rewound", "nothing to rewind"] {
                    assert!(again.stderr.contains(needle), "{what}:\n{}", again.show());
                }
                assert_eq!(again.report()["already_rewound"], true, "{}", again.show());
                rejoin(&mut old, &mut new);
                assert_tens_of_mb_rewound(&old);
                old.stop(StopMode::Fast);
                new.stop(StopMode::Fast);
                continue;
            }
            assert!(
                again.success(),
                "{what}: the run after the crash failed:\n{}\n--- old's log ---\n{}",
                again.show(),
                old.log_tail(20)
            );
            assert_eq!(
                status_code(&old),
                0,
                "{what}: still unfinished after the rerun"
            );
        }
        rejoin(&mut old, &mut new);
        assert_tens_of_mb_rewound(&old);
        old.stop(StopMode::Fast);
        new.stop(StopMode::Fast);
    }
    assert!(
        killed > 0,
        "no seed killed failback: the fault hook does nothing"
    );
}

pg_test!(crash_anywhere_four_seeds, |major| crash_anywhere(
    major,
    0..4
));

mod crash_anywhere_many_seeds {
    use super::*;

    fn body(major: PgMajor) {
        crash_anywhere(major, 4..16)
    }

    #[test]
    fn pg17() {
        body(PgMajor::V17)
    }
}

// ---- the source side breaks mid-copy ----

/// failback run in the background through `source`, its fetch held to 4 MiB/s so that the copy
/// lasts seconds, one request at a time so that what is buffered (one request of up to 16 MiB)
/// lasts less than the faults.
fn background(
    old: &Cluster,
    source: Vec<OsString>,
    timeout_s: u32,
) -> thread::JoinHandle<FailbackRun> {
    let timeout = timeout_s.to_string();
    let args = rewind_args(
        old,
        source,
        &["--max-rate", "4M", "--timeout", &timeout, "--jobs", "1"],
    );
    let report = old.base_dir().join("background.json");
    thread::spawn(move || run_failback(&args, Some(&report)))
}

/// Waits until the copy is well under way: the journal records a first batch of pieces as done
/// (16 MiB written and synced), so the fetch has been running for seconds and has more to go.
fn wait_for_copy(old: &Cluster) {
    let journal = old.data_dir().join(JOURNAL_FILE);
    let size = || std::fs::metadata(&journal).map_or(0, |m| m.len());
    let t0 = Instant::now();
    let mut begun = 0;
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the rewind never got 16 MiB into its copy"
        );
        match (begun, size()) {
            (_, 0) => {}
            // The journal appears whole (written aside, then renamed): its first size is the
            // plan's.
            (0, n) => begun = n,
            (b, n) if n > b => return,
            _ => {}
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that `run` succeeded — after retrying, which it said, when `retried` — then rejoins
/// and compares.
fn finish_and_compare(
    mut old: Cluster,
    mut new: Cluster,
    run: &FailbackRun,
    server: &Failbackd,
    retried: bool,
) {
    assert!(
        run.success(),
        "failback did not ride out the fault:\n{}\n--- failbackd ---\n{}",
        run.show(),
        server.log()
    );
    assert!(
        !retried || run.stderr.contains("trying again in"),
        "the fault did not hit the copy (failback never retried):\n{}",
        run.show()
    );
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
}

fn via_of(quic: bool) -> Via {
    if quic { Via::Quic } else { Via::Grpc }
}

/// failbackd killed mid-copy and back once failback has asked it for something: failback
/// retries, goes on and finishes.
fn server_restarted(quic: bool) {
    let (old, new) = diverged(PgMajor::V16);
    let mut server = Failbackd::serve(&new.data_dir());
    let client = background(&old, server.source_args(via_of(quic)), 30);
    wait_for_copy(&old);
    server.kill();
    if quic {
        // Longer than QUIC's flow-control windows' worth of chunks lasts at 4 MiB/s (16 MiB:
        // 4 s), so that failback has to ask while failbackd is down.
        thread::sleep(Duration::from_secs(6));
    } else {
        // What failback has read ahead (its pieces in hand and HTTP/2's window, some 20 MiB)
        // can last it longer than a fixed pause, and a call made after failbackd is back
        // would just reconnect: failbackd's port is held until failback knocks on it.
        let (grpc_addr, _) = server.addrs();
        assert!(
            hold_port_until_asked(grpc_addr, &client),
            "failback finished without asking failbackd for anything after it was killed"
        );
    }
    server.restart();
    let run = client.join().expect("the failback thread");
    finish_and_compare(old, new, &run, &server, true);
}

/// Listens on `addr` (a killed failbackd's gRPC port) until a connection arrives, which is
/// closed unanswered: true once failback has tried to reach failbackd, false when `client`
/// finished first.
fn hold_port_until_asked(
    addr: std::net::SocketAddr,
    client: &thread::JoinHandle<FailbackRun>,
) -> bool {
    let t0 = Instant::now();
    let listener = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "binding {addr} again: {e}"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    };
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    loop {
        match listener.accept() {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accepting on {addr}: {e}"),
        }
        if client.is_finished() {
            return false;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "failback did not try to reach failbackd within 120 s of its end"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// failbackd killed mid-copy and not back within `--timeout`: failback stops, says so and
/// how to go on, and leaves the target unfinished; once failbackd is back, a run resumes.
fn server_gone(quic: bool) {
    let (old, new) = diverged(PgMajor::V16);
    let mut server = Failbackd::serve(&new.data_dir());
    let client = background(&old, server.source_args(via_of(quic)), 4);
    wait_for_copy(&old);
    server.kill();
    let t0 = Instant::now();
    let run = client.join().expect("the failback thread");
    let waited = t0.elapsed();
    eprintln!("{}", run.show());
    assert_eq!(
        run.status.code(),
        Some(failback_tests::rewind::EXIT_UNFINISHED),
        "{}",
        run.show()
    );
    for needle in [
        "made no progress",
        "--timeout 4 s",
        "run failback rewind again",
    ] {
        assert!(
            run.stderr.contains(needle),
            "no {needle:?}:\n{}",
            run.show()
        );
    }
    assert!(
        waited < Duration::from_secs(30),
        "failback took {waited:?} to give up on a --timeout of 4 s"
    );
    assert_eq!(status_code(&old), 3);
    server.restart();
    let args = rewind_args(&old, server.source_args(via_of(quic)), &[]);
    let again = run_failback(&args, Some(&old.base_dir().join("again.json")));
    assert_resumed(&again, 16 << 20);
    finish_and_compare(old, new, &again, &server, false);
}

/// The link breaks mid-copy: every TCP connection closed and new ones refused for at least 6 s
/// and until failback has been refused once, or every datagram dropped for longer than the
/// liveness check; failback connects again and finishes.
fn link_cut(quic: bool) {
    let (old, new) = diverged(PgMajor::V16);
    let server = Failbackd::serve(&new.data_dir());
    let (grpc_addr, quic_addr) = server.addrs();
    if quic {
        let proxy = UdpCut::start(quic_addr);
        // --timeout 15: a connection silent for 5 s is replaced.
        let client = background(&old, server.source_args_at(Via::Quic, proxy.port()), 15);
        wait_for_copy(&old);
        proxy.set_down(true);
        thread::sleep(Duration::from_secs(7));
        proxy.set_down(false);
        let run = client.join().expect("the failback thread");
        finish_and_compare(old, new, &run, &server, true);
    } else {
        let proxy = TcpCut::start(grpc_addr);
        let client = background(&old, server.source_args_at(Via::Grpc, proxy.port()), 15);
        wait_for_copy(&old);
        proxy.cut_until_refused(Duration::from_secs(6), Duration::from_secs(60));
        let run = client.join().expect("the failback thread");
        assert!(
            proxy.accepted() >= 2,
            "failback did not connect again after the cut ({} connections):\n{}",
            proxy.accepted(),
            run.show()
        );
        finish_and_compare(old, new, &run, &server, true);
    }
}

#[test]
fn server_restarted_mid_copy_grpc() {
    server_restarted(false)
}

#[test]
fn server_restarted_mid_copy_quic() {
    server_restarted(true)
}

#[test]
fn server_gone_past_the_timeout_then_resumed_grpc() {
    server_gone(false)
}

#[test]
fn server_gone_past_the_timeout_then_resumed_quic() {
    server_gone(true)
}

#[test]
fn link_cut_mid_copy_grpc() {
    link_cut(false)
}

#[test]
fn link_cut_mid_copy_quic() {
    link_cut(true)
}
