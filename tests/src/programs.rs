//! The workspace's own programs under test (`failback`, `failbackd`), built by cargo for the
//! test run that uses them.
//!
//! A test must run the code it was built with, never a binary left over from an earlier build
//! that happens to lie in `target/`. Cargo tells a package's integration tests where its own
//! binaries are, but not another package's, and these tests need both. So the first test
//! process of a run asks cargo to build them (`cargo build --bin failback --bin failbackd`
//! with the test's own profile and target directory), which is a no-op when they are up to
//! date; the others wait for it on a lock and then trust its stamp. A run is nextest's
//! (`NEXTEST_RUN_ID`), or, under `cargo test`, this test process.
//!
//! The build selects what `cargo nextest run --workspace` selects (`--workspace --tests`),
//! besides the two binaries: dependencies then resolve with the same features and nothing
//! but the binaries is compiled (`-p failback-client` alone would resolve serde, tokio and
//! others with fewer features and rebuild half the tree).
//!
//! It runs without the variables cargo sets for the test process itself (`CARGO_MANIFEST_DIR`,
//! `CARGO_PKG_NAME`, `OUT_DIR`, ...): build scripts ask to be rerun when such a variable changes
//! (ring's asks for eleven of them), and cargo compares their values in its own environment,
//! where the build that made the test programs had none. With them set, every test run
//! rebuilt ring and all that depends on it (rustls, tonic, quinn, failback itself) while the
//! first six tests waited some two minutes on the lock.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::run::{lock_exclusive, run_with_timeout};

/// Whether cargo sets `name` for a package's compiler, build script or test process (the
/// Cargo book's "Environment variables Cargo sets for crates" and "for build scripts"), rather
/// than reading it.
fn set_for_the_test_process(name: &str) -> bool {
    const PREFIXES: [&str; 4] = [
        "CARGO_PKG_",
        "CARGO_BIN_EXE_",
        "CARGO_CFG_",
        "CARGO_MANIFEST_",
    ];
    const NAMES: [&str; 6] = [
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

/// The programs cargo builds for the tests.
const PROGRAMS: [&str; 2] = ["failback", "failbackd"];

/// The `failback` binary of this build.
pub fn failback() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built().join("failback"))
}

/// The `failbackd` binary of this build.
pub fn failbackd() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built().join("failbackd"))
}

/// The directory of this build's binaries (`target/<profile>`), once they are built.
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(build)
}

/// The cargo profile whose outputs are in `profile_dir` (`target/<dir>`), as a build beside the
/// test programs must name it: `target/debug` holds `cargo test`'s and nextest's `test` profile.
/// (Named `dev` instead, `--tests` would build every test program once more under `dev`, each
/// tens of MB: minutes of CI's first tests, and gigabytes of its disk.)
pub fn cargo_profile(profile_dir: &Path) -> &str {
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "test",
        Some(other) => other,
    }
}

fn build() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>
    let profile_dir = exe
        .parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| {
            panic!(
                "{} is not in a cargo target/<profile>/deps directory, so the programs under \
                 test cannot be built beside it",
                exe.display()
            )
        })
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let profile = cargo_profile(&profile_dir);
    let run = std::env::var("NEXTEST_RUN_ID")
        .unwrap_or_else(|_| format!("process {}", std::process::id()));
    let stamp = profile_dir.join(".failback-tests-programs.built");
    // Until the end of this function: another process's build is waited for.
    let _lock = lock_exclusive(&profile_dir.join(".failback-tests-programs.lock"));
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s == run)
        && PROGRAMS.iter().all(|p| profile_dir.join(p).is_file());
    if !fresh {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("Cargo.toml");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(set_for_the_test_process) {
                cmd.env_remove(&name);
            }
        }
        cmd.args(["build", "--quiet", "--workspace", "--tests"]);
        for p in PROGRAMS {
            cmd.args(["--bin", p]);
        }
        cmd.args(["--profile", profile])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir);
        match run_with_timeout(&mut cmd, Duration::from_secs(1800)) {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "could not build the programs under test ({cmd:?}):\n{}",
                out.both()
            ),
            Err(e) => panic!("could not build the programs under test: {e}"),
        }
        for p in PROGRAMS {
            let bin = profile_dir.join(p);
            assert!(
                bin.is_file(),
                "{} is missing after cargo build",
                bin.display()
            );
        }
        std::fs::write(&stamp, &run)
            .unwrap_or_else(|e| panic!("could not write {}: {e}", stamp.display()));
    }
    profile_dir
}
