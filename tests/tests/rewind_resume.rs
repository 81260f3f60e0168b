//! A rewind killed half-way can be neither started by mistake nor lost: it is resumed.
//!
//! failback is killed with SIGKILL (its own fault hook, `FAILBACK_FAULT=kill-after-bytes=N`)
//! after 24 MiB of writes to the target, when the journal and the marker are in place and the
//! journal records a first 16 MiB as done (written and synced). Then, on every major version 13–18: `failback status` says the rewind is
//! unfinished; PostgreSQL refuses to start on the target and names the marker; `failback
//! rewind` run again resumes from the journal (the target's own WAL is no longer needed),
//! fetches only what the journal does not record as done, and the rejoined old primary holds
//! the new primary's data.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use failback_tests::rewind::{
    assert_resumed, assert_tens_of_mb_rewound, assert_unfinished, diverged_with_tens_of_mb, rejoin,
    rewind_ok, status, stop_for_rewind,
};
use failback_tests::run::run_with_timeout;
use failback_tests::{StopMode, pg_test};

pg_test!(killed_mid_copy_then_resumed, |major| {
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    stop_for_rewind(&mut old, &mut new, StopMode::Immediate);

    let mut killed = Command::new(failback_tests::programs::failback());
    killed
        .args(["rewind", "-D"])
        .arg(old.data_dir())
        .arg("--source-pgdata")
        .arg(new.data_dir())
        .arg("--pg-bindir")
        .arg(&old.bins().bin_dir)
        .env("FAILBACK_FAULT", format!("kill-after-bytes={}", 24 << 20));
    let out = run_with_timeout(&mut killed, Duration::from_secs(300)).unwrap();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "failback was not killed mid-copy:\n{}",
        out.both()
    );

    assert_unfinished(&mut old);
    // How far it got, as status says it: at least the first 16 MiB, recorded as done.
    let st = status(&old);
    let synced: u64 = st
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("written and synced:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("status does not say how far the rewind got:\n{}", st.show()));
    assert!(synced >= 16 << 20, "{}", st.show());

    let run = rewind_ok(&old, &new, &[]);
    assert_eq!(assert_resumed(&run, 16 << 20), synced, "{}", run.show());
    let st = status(&old);
    assert_eq!(st.status.code(), Some(0), "{}", st.show());
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
});

// A live source under pgbench load the whole time while a rewind is killed and resumed. The
// killed run copied inside one backup window; the resumed run opens another, plans again and
// must still leave
// the target's pg_wal holding every segment from the new window's start (its backup_label) up
// to the window's end (its minimum recovery point), so that it becomes consistent from its own
// pg_wal alone, which it then does, before it rejoins.
pg_test!(
    live_source_killed_mid_copy_then_resumed_keeps_all_its_wal,
    |major| {
        use failback_common::lsn::wal_file_name;
        use failback_common::timeline::{TimeLineHistory, timeline_for_segment};
        use failback_tests::failbackd::{Failbackd, Via};
        use failback_tests::rewind::{
            assert_consistent_alone, context, control_file, run_failback, run_failback_with,
            under_load,
        };
        use std::ffi::OsString;

        let (mut old, mut new) = diverged_with_tens_of_mb(major);
        old.stop(StopMode::Immediate);
        let server = Failbackd::serve_live(&new);
        let mut args: Vec<OsString> = vec!["rewind".into(), "-D".into(), old.data_dir().into()];
        args.extend(server.source_args(Via::Grpc));
        args.extend(["--pg-bindir".into(), old.bins().bin_dir.clone().into()]);
        let mut first = args.clone();
        first.push("--debug".into());
        let killed = under_load(&new, || {
            run_failback_with(
                &first,
                None,
                &[("FAILBACK_FAULT", &format!("kill-after-bytes={}", 24 << 20))],
            )
        });
        assert_eq!(killed.status.signal(), Some(9), "{}", killed.show());
        assert!(
            killed.stderr.contains("copying inside a backup window"),
            "{}",
            killed.show()
        );
        assert_unfinished(&mut old);

        // The source moves on, into a new segment.
        new.query_one("SELECT pg_switch_wal()");
        new.execute(
            "INSERT INTO t SELECT g, 'after the kill' FROM generate_series(100001, 101000) g",
        );
        let report = old.base_dir().join("resumed.json");
        let run = under_load(&new, || run_failback(&args, Some(&report)));
        assert!(run.success(), "{}", context(&run, &[&old, &new]));
        assert_eq!(run.report()["resumed"], true, "{}", run.show());
        assert!(
            run.stderr
                .contains("the source ran since the unfinished rewind was planned"),
            "{}",
            run.show()
        );
        drop(server);

        let control = control_file(&old);
        let seg = control.xlog_seg_size;
        let label = std::fs::read_to_string(old.data_dir().join("backup_label")).unwrap();
        let redo: failback_common::Lsn = label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("no START WAL LOCATION in backup_label:\n{label}"));
        let tli = control.minRecoveryPointTLI;
        let name = failback_common::lsn::history_file_name(tli);
        let history = TimeLineHistory::parse(
            &std::fs::read(old.data_dir().join("pg_wal").join(&name)).unwrap(),
            tli,
            &name,
        )
        .unwrap();
        let missing: Vec<String> = (redo.segment_number(seg)
            ..=control.minRecoveryPoint.segment_number(seg))
            .map(|segno| wal_file_name(timeline_for_segment(&history, segno, seg), segno, seg))
            .filter(|n| {
                std::fs::metadata(old.data_dir().join("pg_wal").join(n))
                    .map_or(true, |m| m.len() != u64::from(seg))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "the target lacks WAL its replay needs up to its minimum recovery point {}: {missing:?}\n{}",
            control.minRecoveryPoint,
            run.show()
        );
        assert_consistent_alone(&mut old);
        rejoin(&mut old, &mut new);
        assert_tens_of_mb_rewound(&old);
    }
);
