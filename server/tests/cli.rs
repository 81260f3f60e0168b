//! The `failbackd` binary as an operator starts it: `--config` files and their refusals.

use std::process::Command;

fn failbackd(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .args(args)
        .output()
        .expect("run failbackd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_files_are_checked_and_flags_win() {
    let dir = std::env::temp_dir().join(format!("failbackd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("failbackd.toml");
    let file_s = file.to_str().unwrap();

    std::fs::write(
        &file,
        "pgdata = \"/nonexistent\"\nlisten_on = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let (code, err) = failbackd(&["--config", file_s]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(file_s) && err.contains("listen_on"), "{err}");

    // Complete only with the flag: the file has no address, the flag gives one.
    std::fs::write(&file, "pgdata = \"/nonexistent\"\n").unwrap();
    let (code, err) = failbackd(&["--config", file_s]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no address to listen on"), "{err}");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"\n").unwrap();
    let (code, err) = failbackd(&["--config", file_s, "-D", "/nonexistent"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tls_cert and tls_key go together"), "{err}");

    let (code, err) = failbackd(&["--config", "/nonexistent/failbackd.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("could not read config file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// failbackd reports an error as failback does: what failed, then each cause on a line of its
// own; never a debug dump or a backtrace, whatever RUST_BACKTRACE asks for.
#[test]
fn errors_are_reported_with_their_causes_and_no_backtrace() {
    let out = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .args([
            "-D",
            "/nonexistent",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            "/nonexistent/token",
        ])
        .env("RUST_BACKTRACE", "full")
        .output()
        .expect("run failbackd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "failbackd: error: could not read token file /nonexistent/token",
            "  caused by: No such file or directory (os error 2)",
        ],
        "{err}"
    );
}
