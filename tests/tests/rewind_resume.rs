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

// A live source keeps writing while a rewind is killed and resumed. When the plan was made,
// one of its WAL segment files lay past its end of WAL (made ahead of time, holding no WAL
// yet) and was left out; by the end of the resumed copy its WAL has moved into it. The resumed
// run must fetch them as an uninterrupted run does, so that the target's pg_wal holds every
// segment from the checkpoint its replay starts at up to the end of WAL it recorded as its
// minimum recovery point.
pg_test!(
    live_source_killed_mid_copy_then_resumed_keeps_all_its_wal,
    |major| {
        use failback_common::lsn::wal_file_name;
        use failback_common::timeline::{TimeLineHistory, timeline_for_segment};
        use failback_tests::failbackd::{Failbackd, Via};
        use failback_tests::rewind::{context, control_file, run_failback, run_failback_with};
        use std::ffi::OsString;

        let (mut old, mut new) = diverged_with_tens_of_mb(major);
        old.stop(StopMode::Immediate);
        // A checkpoint taken when the insert position is past three quarters of its segment
        // creates the next segment ahead of time (PreallocXlogFiles in xlog.c): a file the source
        // lists that holds no WAL yet.
        new.execute("CREATE TABLE pad (g int, p text)");
        let seg: u64 = new
            .query_one("SELECT pg_size_bytes(current_setting('wal_segment_size'))")
            .parse()
            .unwrap();
        let offset = || -> u64 {
            new.query_one(
                "SELECT file_offset FROM pg_walfile_name_offset(pg_current_wal_insert_lsn())",
            )
            .parse()
            .unwrap()
        };
        while offset() < seg * 4 / 5 {
            new.execute(
                "INSERT INTO pad SELECT g, repeat('p', 200) FROM generate_series(1, 1000) g",
            );
        }
        new.execute("CHECKPOINT");
        let current = new.query_one("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
        let (tli_now, segno_now) =
            failback_common::lsn::parse_wal_file_name(&current, seg as u32).unwrap();
        let ahead = wal_file_name(tli_now, segno_now + 1, seg as u32);
        assert!(
            new.data_dir().join("pg_wal").join(&ahead).is_file(),
            "the checkpoint at {current} made no segment ahead of the end of WAL"
        );
        let server = Failbackd::serve_live(&new);
        let mut args: Vec<OsString> = vec!["rewind".into(), "-D".into(), old.data_dir().into()];
        args.extend(server.source_args(Via::Grpc));
        args.extend(["--pg-bindir".into(), old.bins().bin_dir.clone().into()]);
        let mut first = args.clone();
        first.push("--debug".into());
        let killed = run_failback_with(
            &first,
            None,
            &[("FAILBACK_FAULT", &format!("kill-after-bytes={}", 24 << 20))],
        );
        assert_eq!(killed.status.signal(), Some(9), "{}", killed.show());
        assert!(
            killed.stderr.contains("past the source's end of WAL"),
            "the plan left no recycled source segment out, so this test shows nothing:\n{}",
            killed.show()
        );
        assert_unfinished(&mut old);

        // The source's WAL moves on into the segment the plan left out.
        new.query_one("SELECT pg_switch_wal()");
        new.execute(
            "INSERT INTO t SELECT g, 'after the kill' FROM generate_series(100001, 101000) g",
        );
        assert_eq!(
            new.query_one("SELECT pg_walfile_name(pg_current_wal_insert_lsn())"),
            ahead
        );
        let report = old.base_dir().join("resumed.json");
        let run = run_failback(&args, Some(&report));
        assert!(run.success(), "{}", context(&run, &[&old, &new]));
        assert_eq!(run.report()["resumed"], true, "{}", run.show());
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
        rejoin(&mut old, &mut new);
        assert_tens_of_mb_rewound(&old);
    }
);
