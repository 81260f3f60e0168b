//! The commit a binary is built from, found by its package's build script and handed to the
//! compiler as `FAILBACK_COMMIT` (read by `failback_common::long_version!`).
//!
//! Where the commit comes from, first that answers:
//! 1. `FAILBACK_COMMIT` in the build's environment: a packager building from a tarball says
//!    which commit it is (a developer may also set it, e.g. to `dev`, to stop the rebuild
//!    that every new commit otherwise causes, below).
//! 2. git, when the workspace is the top of a git work tree (never a repository around it,
//!    such as a home directory kept in git): `git rev-parse --short=12 HEAD`, with `-dirty`
//!    when tracked files differ from it.
//! 3. `unknown`.
//!
//! Cargo reruns the script, and so rebuilds the package and what depends on it, only when the
//! commit can have changed: when `.git/HEAD` or the branch it names moves (a commit, a
//! checkout), when the package's own sources change (they are recompiled anyway, and may
//! now be `-dirty`), or when `FAILBACK_COMMIT` changes. Never on a build where none did. The
//! dirty mark is therefore what it was when the script last ran: an edit elsewhere in the
//! workspace after a commit is not noticed until the next commit. A packager builds from a
//! clean checkout, where it is exact.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The variable the compiler sees, and the packager's override.
pub const VAR: &str = "FAILBACK_COMMIT";

/// Prints the cargo instructions of a build script: `FAILBACK_COMMIT` for the compiler and
/// what to rerun on. Call it from the `main` of `build.rs`.
pub fn emit_commit() {
    println!("cargo::rerun-if-env-changed={VAR}");
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR")
            .expect("cargo sets CARGO_MANIFEST_DIR for build scripts"),
    );
    let commit = match from_env() {
        Some(c) => c,
        None => {
            // Watched whatever git says: a source change may make the tree dirty, and a
            // later `git init` or checkout is noticed through the package's own files.
            println!(
                "cargo::rerun-if-changed={}",
                manifest_dir.join("src").display()
            );
            match manifest_dir.parent().and_then(from_git) {
                Some(git) => {
                    for f in &git.watch {
                        println!("cargo::rerun-if-changed={}", f.display());
                    }
                    git.commit
                }
                None => "unknown".to_owned(),
            }
        }
    };
    println!("cargo::rustc-env={VAR}={commit}");
}

/// The packager's `FAILBACK_COMMIT`, when it is set to something printable on one line.
fn from_env() -> Option<String> {
    let v = std::env::var(VAR).ok()?;
    let v = v.trim();
    let printable = !v.is_empty() && v.chars().all(|c| c.is_ascii_graphic());
    if !printable {
        println!(
            "cargo::warning={VAR}={v:?} is not a commit (empty, or not printable ASCII on one \
             word); ignored, the commit is taken from git"
        );
        return None;
    }
    Some(v.to_owned())
}

struct Git {
    commit: String,
    /// Files whose change means HEAD may have moved.
    watch: Vec<PathBuf>,
}

/// The commit checked out in `root`, when `root` is the top of a git work tree.
fn from_git(root: &Path) -> Option<Git> {
    // The build runs this tree's own code (build scripts included), so trusting its git
    // configuration adds nothing; without this a checkout owned by another user than the
    // builder (a CI runner as root) makes git refuse to answer.
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-c")
            .arg(format!("safe.directory={}", root.display()))
            // `status` would otherwise take index.lock to refresh the index, and a `git
            // commit` running at that moment would fail on it.
            .arg("--no-optional-locks")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).ok())
            .flatten()
    };
    let out = git(&[
        "rev-parse",
        "--show-toplevel",
        "--absolute-git-dir",
        "--git-common-dir",
        "--short=12",
        "HEAD",
    ])?;
    let mut lines = out.lines();
    let (top, git_dir, common_dir, commit) =
        (lines.next()?, lines.next()?, lines.next()?, lines.next()?);
    if std::fs::canonicalize(top).ok()? != std::fs::canonicalize(root).ok()? {
        return None;
    }
    let git_dir = PathBuf::from(git_dir);
    let common_dir = root.join(common_dir); // relative to `root` when git prints it relative
    let head = git_dir.join("HEAD");
    let mut watch = vec![head.clone()];
    // HEAD names a branch ("ref: refs/heads/main"): a commit rewrites the branch's file, or
    // packed-refs when the branch is packed. A file cargo is told to watch must exist (a
    // missing one reruns the script on every build), so only those that do are watched.
    if let Some(branch) = std::fs::read_to_string(&head)
        .ok()
        .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
    {
        watch.extend(
            [
                git_dir.join(&branch),
                common_dir.join(&branch),
                common_dir.join("packed-refs"),
            ]
            .into_iter()
            .filter(|f| f.is_file()),
        );
    }
    watch.sort();
    watch.dedup();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])?;
    let commit = if dirty.trim().is_empty() {
        commit.to_owned()
    } else {
        format!("{commit}-dirty")
    };
    Some(Git { commit, watch })
}
