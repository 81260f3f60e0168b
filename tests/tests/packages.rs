//! The Debian packages an operator installs, built by `packaging/build-debs` from the binaries
//! under test.
//!
//! What is proven, on the packages as built (`dpkg-deb --info/--contents`, extracted):
//! - their names, versions (the binaries' own) and control fields: Depends covers every shared
//!   library the binaries need (libc6 with a version, libpq5), failbackd recommends postgresql,
//!   and /etc/failback/failbackd.toml is a conffile;
//! - their files, owned by root: each binary, its man pages, bash, zsh and fish completions,
//!   the copyright file, and for failbackd the unit;
//! - the man pages render (`man -l`) and list the flags; the bash completion completes one;
//! - the unit passes `systemd-analyze verify` (with ExecStart pointed at the extracted binary,
//!   which is not installed yet) with nothing to say, and `systemd-analyze security` rates it
//!   well hardened;
//! - the example failbackd.toml names every key failbackd's config file knows
//!   (server/src/config.rs), and each, uncommented, is one failbackd accepts;
//! - failbackd's maintainer scripts never enable or start the service.
//!
//! With `FAILBACK_TEST_DPKG_INSTALL=1`, as root (CI, a throwaway machine: `.ci/run` sets it),
//! the packages are really installed with `dpkg -i`: `/usr/bin/failback --version` and
//! `failbackd --version` name the commit, `man failbackd` and `man failback-rewind` show their
//! flags, the installed unit verifies, the completions are in place and the service is not
//! enabled; both are then purged, also when the test fails, leaving the machine as it was.
//!
//! Without dpkg-deb the test fails under CI (`CI` set) and is skipped, saying why, elsewhere;
//! likewise for man and systemd-analyze, whose checks alone are skipped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use failback_tests::programs;
use failback_tests::run::{Output, run_ok, run_with_timeout};

/// Building the packages: stripping and compressing two binaries; generous on a busy machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Any other command.
const TIMEOUT: Duration = Duration::from_secs(120);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Whether `program` runs; when it does not, under CI the test fails, elsewhere the checks that
/// need it are skipped with the reason printed.
fn have(program: &str, package: &str, needed_for: &str) -> bool {
    let runs = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        let what = format!(
            "{program} is not installed (Debian package {package}); it is needed for \
             {needed_for}. `.ci/run` installs it"
        );
        assert!(!in_ci(), "{what}");
        eprintln!("\n!!!!! SKIPPED: {what}\n");
    }
    runs
}

fn run(cmd: &mut Command) -> Output {
    run_ok(cmd, TIMEOUT)
}

/// The line `--version` prints, e.g. `failback 0.1.0 (commit 3f2a9c01be47)`.
fn version_line(program: &Path) -> String {
    run(Command::new(program).arg("--version"))
        .stdout
        .trim()
        .to_owned()
}

/// `dpkg-deb --field DEB FIELD`.
fn field(deb: &Path, name: &str) -> String {
    run(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))
        .stdout
        .trim()
        .to_owned()
}

/// The paths a package installs (`dpkg-deb --contents`), e.g. `/usr/bin/failback`, each
/// checked to be owned by root.
fn contents(deb: &Path) -> BTreeSet<String> {
    let out = run(Command::new("dpkg-deb").arg("--contents").arg(deb)).stdout;
    out.lines()
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert!(
                cols.len() >= 6,
                "unexpected dpkg-deb --contents line {line:?}"
            );
            assert_eq!(cols[1], "root/root", "{line}: not owned by root");
            let path = cols[5].trim_start_matches('.');
            if cols[0].starts_with('-') && path.starts_with("/usr/bin/") {
                assert_eq!(cols[0], "-rwxr-xr-x", "{line}");
            } else if cols[0].starts_with('-') {
                assert_eq!(cols[0], "-rw-r--r--", "{line}");
            }
            path.trim_end_matches('/').to_owned()
        })
        .collect()
}

fn assert_has(files: &BTreeSet<String>, expected: &[&str], deb: &Path) {
    for f in expected {
        assert!(
            files.contains(*f),
            "{} does not install {f}; it installs:\n{}",
            deb.display(),
            files.iter().cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

/// A man page as text: `man -l FILE`, or `man NAME` when `page` has no slash.
fn render_man(page: &str) -> String {
    let mut cmd = Command::new("man");
    if page.contains('/') {
        cmd.arg("-l");
    }
    // C locale: `\-` renders as an ASCII hyphen; wide enough that no flag name is broken.
    cmd.arg(page)
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("MANWIDTH", "200")
        .env("LC_ALL", "C");
    run(&mut cmd).stdout
}

fn assert_mentions(text: &str, what: &str, words: &[&str]) {
    for w in words {
        assert!(text.contains(w), "{what} does not mention {w}:\n{text}");
    }
}

/// What bash's completion for `failback` offers after `words` (the last one being completed),
/// from the completion file `file`.
fn bash_completes(file: &Path, words: &[&str]) -> Vec<String> {
    let script = format!(
        "source {file}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\n\
         _failback failback {cur} {prev}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file = file.display(),
        words = words.join(" "),
        cword = words.len() - 1,
        cur = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    run(Command::new("bash").arg("-c").arg(script))
        .stdout
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The keys of failbackd's config file: the fields of `Settings` in server/src/config.rs.
fn config_keys() -> Vec<String> {
    let path = workspace().join("server/src/config.rs");
    let src = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("could not read {}: {e}", path.display()));
    let body = src
        .split_once("pub struct Settings {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .unwrap_or_else(|| panic!("no `pub struct Settings {{ ... }}` in {}", path.display()))
        .0;
    let keys: Vec<String> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .collect();
    assert!(
        keys.len() >= 10,
        "found only {keys:?} in {}: has Settings changed shape?",
        path.display()
    );
    keys
}

/// The example config: as shipped it is valid (everything commented out), it shows every key,
/// and with every example uncommented failbackd accepts it.
fn check_example_config(text: &str) {
    use failback_server::config::Settings;
    let path = Path::new("/etc/failback/failbackd.toml");
    let shipped = Settings::parse(text, path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        shipped,
        Settings::default(),
        "the shipped config sets something: it should only show examples, commented out"
    );
    let examples: String = text
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix('#')?;
            let (key, _) = l.split_once(" = ")?;
            (!key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .then(|| format!("{l}\n"))
        })
        .collect();
    let uncommented = Settings::parse(&examples, path).unwrap_or_else(|e| {
        panic!("the examples of failbackd.toml, uncommented, are refused: {e}\n{examples}")
    });
    assert!(uncommented.pgdata.is_some() && uncommented.listen.is_some());
    for key in config_keys() {
        assert!(
            examples
                .lines()
                .any(|l| l.starts_with(&format!("{key} = "))),
            "packaging/failbackd.toml has no example of `{key}` (a key of server/src/config.rs): \
             add it, commented out, with its default"
        );
    }
}

/// The unit, verified before installation: ExecStart pointed at the extracted binary, the man
/// page found under the extracted tree (`Documentation=man:failbackd(8)` is checked).
fn check_unit(root: &Path, scratch: &Path) {
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/failbackd.service")).unwrap();
    for line in [
        "Type=notify",
        "User=postgres",
        "ExecStart=/usr/bin/failbackd --config /etc/failback/failbackd.toml",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "failbackd.service lacks {line}"
        );
    }
    // Stop timeout above failbackd's default shutdown timeout (30 s), or SIGKILL cuts replies.
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec=")?.strip_suffix('s'))
        .and_then(|s| s.parse::<u64>().ok())
        .expect("failbackd.service sets TimeoutStopSec=<N>s");
    assert!(
        stop > 30,
        "TimeoutStopSec={stop}s is not above the 30 s shutdown timeout"
    );
    // Either would remove the postgres user's IPC objects, the running server's included.
    assert!(
        !unit
            .lines()
            .any(|l| l == "RemoveIPC=yes" || l == "DynamicUser=yes")
    );

    if !have("systemd-analyze", "systemd", "checking failbackd.service") {
        return;
    }
    let binary = root.join("usr/bin/failbackd");
    let copy = scratch.join("failbackd.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/failbackd", binary.to_str().unwrap()),
    )
    .unwrap();
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("MANPATH", root.join("usr/share/man")));
    assert_eq!(
        out.both().trim(),
        "stdout:\n\nstderr:",
        "systemd-analyze verify has something to say about failbackd.service"
    );
    // systemd's own rating, 0 (locked down) .. 10 (exposed), times ten: "OK" is up to 2.9.
    let out = run_with_timeout(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(&copy),
        TIMEOUT,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "failbackd.service is rated exposed by systemd-analyze security:\n{}",
        out.stdout
    );
}

/// Purges the packages when dropped, so that a failed test leaves the machine as it was.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("dpkg").args(["--purge", "failback", "failbackd"]),
            TIMEOUT,
        );
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"installed"))
}

/// Installs both packages, checks them as an operator would meet them, purges them.
fn install_and_check(failback_deb: &Path, failbackd_deb: &Path, failback_version: &str) {
    for p in ["failback", "failbackd"] {
        assert!(
            !installed(p),
            "{p} is already installed on this machine: this test would replace and purge it. \
             Run it on a throwaway machine, or without FAILBACK_TEST_DPKG_INSTALL=1"
        );
    }
    let guard = Installed;
    // A minimal image may exclude man pages from installation (dpkg path-exclude); this
    // installation keeps them, to show them.
    run(Command::new("dpkg")
        .arg("--path-include=/usr/share/man/*")
        .arg("-i")
        .arg(failback_deb)
        .arg(failbackd_deb));
    assert!(installed("failback") && installed("failbackd"));

    assert_eq!(
        version_line(Path::new("/usr/bin/failback")),
        failback_version
    );
    let server = version_line(Path::new("/usr/bin/failbackd"));
    assert_eq!(
        server,
        failback_version.replacen("failback", "failbackd", 1)
    );

    if have("man", "man-db", "showing the installed man pages") {
        assert_mentions(
            &render_man("failbackd"),
            "man failbackd",
            &["--pg-conn", "--config", "/etc/failback/failbackd.toml"],
        );
        assert_mentions(
            &render_man("failback-rewind"),
            "man failback-rewind",
            &["--target-pgdata", "--source-server"],
        );
    }
    if have("systemd-analyze", "systemd", "verifying the installed unit") {
        let out = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg("/lib/systemd/system/failbackd.service"));
        assert_eq!(
            out.both().trim(),
            "stdout:\n\nstderr:",
            "systemd-analyze verify has something to say about the installed unit"
        );
    }
    let completion = Path::new("/usr/share/bash-completion/completions/failback");
    assert!(
        bash_completes(completion, &["failback", "rewind", "--target"])
            .contains(&"--target-pgdata".to_owned())
    );
    for f in [
        "/usr/share/bash-completion/completions/failbackd",
        "/usr/share/zsh/vendor-completions/_failback",
        "/usr/share/fish/vendor_completions.d/failbackd.fish",
        "/etc/failback/failbackd.toml",
    ] {
        assert!(Path::new(f).is_file(), "{f} is missing after dpkg -i");
    }
    let conffiles =
        run(Command::new("dpkg-query").args(["--show", "--showformat=${Conffiles}", "failbackd"]))
            .stdout;
    assert!(
        conffiles.contains("/etc/failback/failbackd.toml"),
        "{conffiles}"
    );
    // Installed, not enabled: the operator configures it first.
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/failbackd.service").exists(),
        "installing failbackd enabled its service"
    );

    run(Command::new("dpkg").args(["--purge", "failback", "failbackd"]));
    std::mem::forget(guard);
    for f in [
        "/usr/bin/failback",
        "/usr/bin/failbackd",
        "/etc/failback/failbackd.toml",
    ] {
        assert!(!Path::new(f).exists(), "{f} is left after dpkg --purge");
    }
}

#[test]
fn debian_packages() {
    if !have("dpkg-deb", "dpkg", "building and reading the packages") {
        return;
    }
    let bin_dir = programs::failback()
        .parent()
        .expect("the binary is in a directory")
        .to_path_buf();
    assert_eq!(programs::failbackd().parent(), Some(bin_dir.as_path()));
    // Beside the programs under test, with the same selection as the test programs' build: no
    // dependency from crates.io is compiled again. (With cargo's variables for this test process
    // left in the builds' environment, ring and all that depends on it were compiled again, the
    // test programs too: minutes of CI's two cores.) The workspace's own crates may be: the
    // first build after a commit reruns the build scripts that name the commit.
    let mut compiled = programs::compiled_here().to_vec();
    compiled.extend(programs::build_beside_tests(
        &bin_dir,
        &["failback-gen-docs"],
    ));
    let registry: Vec<&String> = compiled
        .iter()
        .filter(|c| c.contains("(registry+"))
        .collect();
    assert!(
        registry.is_empty(),
        "building the binaries compiled crates.io dependencies again:\n{}",
        compiled.join("\n")
    );

    let scratch = tempfile::tempdir().unwrap();
    let out_dir = scratch.path().join("debs");
    let built = run_ok(
        Command::new(workspace().join("packaging/build-debs"))
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--out")
            .arg(&out_dir)
            .args(["--compress", "gzip"]),
        BUILD_TIMEOUT,
    );

    // "failback 0.1.0 (commit 3f2a9c01be47)": the package is named after the binary's version.
    let failback_version = version_line(programs::failback());
    let (version, commit) = failback_version
        .strip_prefix("failback ")
        .and_then(|v| v.strip_suffix(')')?.split_once(" (commit "))
        .unwrap_or_else(|| panic!("failback --version printed {failback_version:?}"));
    assert!(!commit.is_empty());
    if workspace().join(".git").exists() {
        assert_ne!(
            commit, "unknown",
            "built in a git checkout, yet the commit is unknown"
        );
    }
    let arch = run(Command::new("dpkg").arg("--print-architecture"))
        .stdout
        .trim()
        .to_owned();
    let failback_deb = out_dir.join(format!("failback_{version}_{arch}.deb"));
    let failbackd_deb = out_dir.join(format!("failbackd_{version}_{arch}.deb"));
    for deb in [&failback_deb, &failbackd_deb] {
        assert!(
            deb.is_file(),
            "build-debs did not write {}:\n{}",
            deb.display(),
            built.both()
        );
        assert_eq!(field(deb, "Version"), version);
        assert_eq!(field(deb, "Architecture"), arch);
        let depends = field(deb, "Depends");
        assert!(
            depends.contains("libc6 (>= 2.") && depends.contains("libpq5"),
            "{}: Depends: {depends}",
            deb.display()
        );
        assert!(field(deb, "Description").contains(commit));
    }
    assert_eq!(field(&failback_deb, "Package"), "failback");
    assert_eq!(field(&failbackd_deb, "Package"), "failbackd");
    assert_eq!(field(&failbackd_deb, "Recommends"), "postgresql");

    assert_has(
        &contents(&failback_deb),
        &[
            "/usr/bin/failback",
            "/usr/share/man/man1/failback.1.gz",
            "/usr/share/man/man1/failback-rewind.1.gz",
            "/usr/share/man/man1/failback-resync.1.gz",
            "/usr/share/man/man1/failback-status.1.gz",
            "/usr/share/man/man1/failback-inspect-wal.1.gz",
            "/usr/share/bash-completion/completions/failback",
            "/usr/share/zsh/vendor-completions/_failback",
            "/usr/share/fish/vendor_completions.d/failback.fish",
            "/usr/share/doc/failback/copyright",
        ],
        &failback_deb,
    );
    assert_has(
        &contents(&failbackd_deb),
        &[
            "/usr/bin/failbackd",
            "/usr/share/man/man8/failbackd.8.gz",
            "/lib/systemd/system/failbackd.service",
            "/etc/failback/failbackd.toml",
            "/usr/share/bash-completion/completions/failbackd",
            "/usr/share/doc/failbackd/copyright",
        ],
        &failbackd_deb,
    );
    let info = |deb: &Path, file: &str| {
        run(Command::new("dpkg-deb").arg("--info").arg(deb).arg(file)).stdout
    };
    assert_eq!(
        info(&failbackd_deb, "conffiles").trim(),
        "/etc/failback/failbackd.toml"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let text = info(&failbackd_deb, script);
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for forbidden in ["systemctl enable", "systemctl start", "systemctl --now"] {
            assert!(
                !code.contains(forbidden),
                "failbackd's {script} runs `{forbidden}`: the operator starts the service"
            );
        }
    }
    assert!(info(&failbackd_deb, "postinst").contains("daemon-reload"));

    // The files themselves.
    let root = scratch.path().join("root");
    for deb in [&failback_deb, &failbackd_deb] {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    }
    assert_eq!(
        version_line(&root.join("usr/bin/failbackd")),
        failback_version.replacen("failback", "failbackd", 1)
    );
    check_example_config(
        &std::fs::read_to_string(root.join("etc/failback/failbackd.toml")).unwrap(),
    );
    assert!(
        bash_completes(
            &root.join("usr/share/bash-completion/completions/failback"),
            &["failback", "rewind", "--source-s"]
        )
        .contains(&"--source-server".to_owned())
    );
    if have("man", "man-db", "rendering the man pages") {
        let man = root.join("usr/share/man");
        assert_mentions(
            &render_man(man.join("man1/failback-rewind.1.gz").to_str().unwrap()),
            "failback-rewind(1)",
            &[
                "--target-pgdata",
                "--source-server",
                "--write-recovery-conf",
            ],
        );
        assert_mentions(
            &render_man(man.join("man1/failback.1.gz").to_str().unwrap()),
            "failback(1)",
            &["rewind", "resync", "inspect", "failbackd(8)", version],
        );
        assert_mentions(
            &render_man(man.join("man8/failbackd.8.gz").to_str().unwrap()),
            "failbackd(8)",
            &[
                "--pg-conn",
                "--pgdata",
                "--listen",
                "--config",
                "/etc/failback/failbackd.toml",
            ],
        );
    }
    check_unit(&root, scratch.path());

    let install = std::env::var("FAILBACK_TEST_DPKG_INSTALL").is_ok_and(|v| v == "1");
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    match (install, root_user) {
        (true, true) => install_and_check(&failback_deb, &failbackd_deb, &failback_version),
        (true, false) => panic!(
            "FAILBACK_TEST_DPKG_INSTALL=1 installs the packages with dpkg -i, which needs root"
        ),
        (false, _) => eprintln!(
            "not installing the packages (FAILBACK_TEST_DPKG_INSTALL=1, as root, does: CI)"
        ),
    }
}
