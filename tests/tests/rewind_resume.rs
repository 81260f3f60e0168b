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

use failback_tests::rewind::{failback_bin, promote, rejoin, rewind_ok, stop_for_rewind};
use failback_tests::run::run_with_timeout;
use failback_tests::{Cluster, StopMode, pg_test};

pg_test!(killed_mid_copy_then_resumed, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.pgbench_init(1);
    old.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, 'before the fork' FROM generate_series(1, 5000) i",
    );
    let mut new = old.create_standby("new");
    promote(&old, &new);
    old.execute("UPDATE t SET v = 'lost on old' WHERE id % 3 = 0; CREATE TABLE only_old (x int)");
    // A relation only the new primary has and the WAL that made it: tens of MB to copy.
    new.execute(
        "UPDATE t SET v = 'kept on new' WHERE id % 5 = 0;
         CREATE TABLE only_new AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 150000) g",
    );
    stop_for_rewind(&mut old, &mut new, StopMode::Immediate);

    let mut killed = Command::new(failback_bin());
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

    let mut status = Command::new(failback_bin());
    status.args(["status", "-D"]).arg(old.data_dir());
    let st = run_with_timeout(&mut status, Duration::from_secs(60)).unwrap();
    assert_eq!(st.status.code(), Some(3), "{}", st.both());
    assert!(st.stdout.contains("unfinished rewind"), "{}", st.both());

    let refused = old.try_start();
    assert!(
        refused.is_err(),
        "PostgreSQL started on a half-rewound target"
    );
    let log = old.log_tail(30);
    assert!(
        log.contains("failback_unfinished_rewind"),
        "the refusal does not name failback's marker:\n{log}"
    );

    let run = rewind_ok(&old, &new, &[]);
    let report = run.report();
    assert_eq!(report["resumed"], true, "{}", run.show());
    let done = report["execution"]["bytes_already_done"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        done >= 16 << 20,
        "the resumed run fetched again what the killed one had recorded:\n{}",
        run.show()
    );
    let st = run_with_timeout(&mut status, Duration::from_secs(60)).unwrap();
    assert_eq!(st.status.code(), Some(0), "{}", st.both());
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE v = 'lost on old'"),
        "0"
    );
    assert_eq!(old.query_one("SELECT count(*) FROM only_new"), "150000");
});
