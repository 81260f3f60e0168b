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

/// What this test process's build of the programs under test compiled (see [`rebuilt`]): empty
/// when another process of the run built them.
pub fn compiled_here() -> &'static [String] {
    built();
    COMPILED_HERE.get().map_or(&[], Vec::as_slice)
}

static COMPILED_HERE: OnceLock<Vec<String>> = OnceLock::new();

/// The directory of this build's binaries (`target/<profile>`), once they are built.
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(build)
}

/// The cargo profile whose outputs are in `profile_dir` (`target/<dir>`), as a build beside the
/// test programs must name it: `target/debug` holds `cargo test`'s and nextest's `test` profile.
/// (Named `dev` instead, `--tests` would build every test program once more under `dev`, each
/// tens of MB: minutes of CI's first tests, and gigabytes of its disk.)
fn cargo_profile(profile_dir: &Path) -> &str {
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "test",
        Some(other) => other,
    }
}

/// `cargo build` of the workspace's binaries `bins` into `profile_dir` (`target/<profile>`),
/// beside the test programs: the same selection (`--workspace --tests`), profile and target
/// directory, and none of the variables cargo set for this test process (see the module
/// header: with them, ring and all that depends on it would be rebuilt, test programs too).
/// A no-op when the binaries are up to date. Returns what cargo compiled (see [`rebuilt`]).
pub fn build_beside_tests(profile_dir: &Path, bins: &[&str]) -> Vec<String> {
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
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
    cmd.args([
        "build",
        "--quiet",
        "--message-format",
        "json-render-diagnostics",
    ])
    .args(["--workspace", "--tests"]);
    for b in bins {
        cmd.args(["--bin", b]);
    }
    cmd.args(["--profile", cargo_profile(profile_dir)])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    let out = match run_with_timeout(&mut cmd, Duration::from_secs(1800)) {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!("could not build {bins:?} ({cmd:?}):\n{}", out.both()),
        Err(e) => panic!("could not build {bins:?}: {e}"),
    };
    for b in bins {
        let bin = profile_dir.join(b);
        assert!(
            bin.is_file(),
            "{} is missing after cargo build",
            bin.display()
        );
    }
    rebuilt(&out.stdout)
}

/// The targets cargo compiled rather than found fresh (`"fresh": false` in its
/// `--message-format json` lines), each named by its target and package, e.g.
/// `ring (registry+https://github.com/rust-lang/crates.io-index#ring@0.17.14)`.
fn rebuilt(messages: &str) -> Vec<String> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["fresh"] == false)
        .map(|m| {
            let target = m["target"]["name"].as_str().unwrap_or("?");
            format!("{target} ({})", m["package_id"].as_str().unwrap_or("?"))
        })
        .collect()
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
    let run = std::env::var("NEXTEST_RUN_ID")
        .unwrap_or_else(|_| format!("process {}", std::process::id()));
    let stamp = profile_dir.join(".failback-tests-programs.built");
    // Until the end of this function: another process's build is waited for.
    let _lock = lock_exclusive(&profile_dir.join(".failback-tests-programs.lock"));
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s == run)
        && PROGRAMS.iter().all(|p| profile_dir.join(p).is_file());
    if !fresh {
        let compiled = build_beside_tests(&profile_dir, &PROGRAMS);
        COMPILED_HERE.get_or_init(|| compiled);
        std::fs::write(&stamp, &run)
            .unwrap_or_else(|e| panic!("could not write {}: {e}", stamp.display()));
    }
    profile_dir
}
