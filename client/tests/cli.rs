//! The `failback` binary as a user runs it.

use std::process::Command;

fn failback(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_failback"))
        .args(args)
        .output()
        .expect("run failback");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_non_zero_with_a_message() {
    let (code, _, err) = failback(&["rewind", "-D", "/nonexistent"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--source-pgdata"), "{err}");
    let (code, _, err) = failback(&[
        "rewind",
        "-D",
        "/nonexistent",
        "--source-pgdata",
        "/nonexistent",
        "--max-rate",
        "fast",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-rate") && err.contains("kbit"), "{err}");
    let (code, _, err) = failback(&["inspect", "control", "-D", "/nonexistent"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("could not read control file") && err.contains("caused by"),
        "{err}"
    );
}
