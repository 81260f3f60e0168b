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
    assert_resumed, assert_tens_of_mb_rewound, assert_unfinished, diverged_with_tens_of_mb,
    failback_bin, rejoin, rewind_ok, status, stop_for_rewind,
};
use failback_tests::run::run_with_timeout;
use failback_tests::{StopMode, pg_test};

pg_test!(killed_mid_copy_then_resumed, |major| {
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
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
