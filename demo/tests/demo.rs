//! The demo, as a newcomer runs it.

use std::process::Command;

fn demo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_failback-demo"))
        .args(args)
        .output()
        .expect("run failback-demo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_rewinds_and_rejoins_with_identical_data() {
    let (code, out, err) = demo(&[]);
    assert_eq!(
        code, 0,
        "failback-demo failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(err.contains("servers diverged at WAL location"), "{err}");
    assert!(
        out.contains("the old primary follows timeline 2 and is in recovery: true"),
        "{out}"
    );
    assert!(out.contains("only_on_new: 101 rows"), "{out}");
    assert!(!out.contains("DIFFERS"), "{out}");
    assert!(out.contains("identical data"), "{out}");
}

#[test]
fn an_unsupported_version_is_refused() {
    let (code, _, err) = demo(&["--pg-version", "12"]);
    assert_eq!(code, 1);
    assert!(err.contains("PostgreSQL 12 is not supported"), "{err}");
}
