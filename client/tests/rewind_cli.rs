//! The `failback rewind` command line, run as a program.
//!
//! Besides what it checks, this file makes cargo build the `failback` binary whenever the
//! workspace's tests are built (cargo builds a package's binaries for its integration tests):
//! the rewind scenarios in `tests/` run that binary.

use std::process::Command;

fn failback(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_failback"))
        .args(args)
        .output()
        .expect("the failback binary runs")
}

#[test]
fn rewind_help_lists_pg_rewind_flags() {
    let out = failback(&["rewind", "--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--target-pgdata",
        "--source-pgdata",
        "--write-recovery-conf",
        "--dry-run",
        "--no-sync",
        "--restore-target-wal",
        "--no-ensure-shutdown",
        "--debug",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn usage_errors_exit_2_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_str().unwrap();
    for args in [
        vec!["rewind"],
        vec!["rewind", "-D", target, "--source-pgdata", target, "extra"],
        vec![
            "rewind",
            "-D",
            target,
            "--source-pgdata",
            target,
            "--no-such-flag",
        ],
    ] {
        let out = failback(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: a usage error says why");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// pg_rewind's 006_options, translated: help and version, then each misuse upstream checks fails
// with a message that says what is wrong, and the target is left as it was.
#[test]
fn t006_options() {
    for args in [&["--help"][..], &["--version"], &["rewind", "--help"]] {
        let out = failback(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(!out.stdout.is_empty(), "{args:?} prints something");
    }
    let primary = tempfile::tempdir().unwrap();
    let standby = tempfile::tempdir().unwrap();
    let (p, s) = (
        primary.path().to_str().unwrap(),
        standby.path().to_str().unwrap(),
    );
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "rewind",
                "--debug",
                "-D",
                p,
                "--source-pgdata",
                s,
                "extra_arg1",
            ],
            "unexpected argument 'extra_arg1'",
        ),
        (&["rewind", "-D", p], "--source-pgdata"),
        (
            &[
                "rewind",
                "--debug",
                "-D",
                p,
                "--source-pgdata",
                s,
                "--source",
                "grpc://incorrect_source:1",
            ],
            "cannot be used with",
        ),
        (
            &[
                "rewind",
                "--debug",
                "-D",
                p,
                "--source-pgdata",
                s,
                "--write-recovery-conf",
            ],
            "-R needs --primary-conninfo",
        ),
    ];
    for (args, needle) in cases {
        let out = failback(args);
        let err = String::from_utf8_lossy(&out.stderr);
        // Every one is a usage error, said before anything is read: exit status 2.
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(err.contains(needle), "{args:?}: {needle:?} not in:\n{err}");
    }
    for dir in [primary.path(), standby.path()] {
        assert_eq!(
            std::fs::read_dir(dir).unwrap().count(),
            0,
            "{dir:?} changed"
        );
    }
}
