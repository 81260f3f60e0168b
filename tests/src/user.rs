//! The operating-system user that PostgreSQL runs as.
//!
//! PostgreSQL refuses to run as root (`postgres`, `initdb`, `pg_ctl` and `pg_rewind` all check
//! `geteuid() == 0` and exit), and it insists that its data directory is owned by the user it
//! runs as and not readable by others (mode 0700 or 0750). CI runs as root, so when the tests
//! run as root every server and every program that writes into a data directory runs as a
//! dedicated unprivileged system user, [`PG_USER_NAME`], created on first use; directories the
//! bed makes for it are owned by it. When the tests do not run as root, everything runs as the
//! current user and nothing is switched.
//!
//! Client programs that only talk to a server over a socket (`psql`, `pgbench`) do not need to
//! switch: any user may run them.

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use crate::run::run_with_timeout;

/// The name of the system user the servers run as when the tests run as root.
pub const PG_USER_NAME: &str = "failback-test";

/// The user PostgreSQL processes run as.
#[derive(Debug, Clone)]
pub struct PgUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Whether commands must switch to this user (the tests run as root).
    pub switch: bool,
}

/// The user PostgreSQL runs as, created on first use when the tests run as root.
pub fn pg_user() -> &'static PgUser {
    static USER: OnceLock<PgUser> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if euid != 0 {
            return PgUser {
                name: lookup_name(euid).unwrap_or_else(|| euid.to_string()),
                uid: euid,
                gid: egid,
                switch: false,
            };
        }
        let (uid, gid) = ensure_system_user(PG_USER_NAME);
        PgUser {
            name: PG_USER_NAME.to_string(),
            uid,
            gid,
            switch: true,
        }
    })
}

/// A command for `program` that runs as [`pg_user`], in `/`, with no libpq settings inherited
/// from the environment (a stray `PGPORT` or `PGDATA` must not redirect a test), and with
/// untranslated messages so logs can be matched.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let user = pg_user();
    if user.switch {
        // std drops the supplementary groups when switching uid as root.
        cmd.uid(user.uid).gid(user.gid);
        cmd.env("HOME", "/tmp").env("USER", &user.name);
    }
    clean_env(&mut cmd);
    cmd.current_dir("/");
    cmd
}

/// Removes the environment variables libpq and PostgreSQL programs read on their own.
pub fn clean_env(cmd: &mut Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGDATA",
        "PGOPTIONS",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLMODE",
        "PGTZ",
        "PGAPPNAME",
        "PGCONNECT_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C").env("LANG", "C");
}

/// Makes `path` owned by [`pg_user`] (not following a symlink at `path` itself).
pub fn give(path: &Path) {
    let user = pg_user();
    if user.switch {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("could not chown {} to {}: {e}", path.display(), user.name));
    }
}

/// Makes `path` and everything below it owned by [`pg_user`]; symlinks are not followed.
pub fn give_tree(path: &Path) {
    give(path);
    let meta = fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("could not stat {}: {e}", path.display()));
    if meta.is_dir() {
        for entry in
            fs::read_dir(path).unwrap_or_else(|e| panic!("could not list {}: {e}", path.display()))
        {
            let entry = entry.unwrap_or_else(|e| panic!("could not list {}: {e}", path.display()));
            give_tree(&entry.path());
        }
    }
}

/// Creates directory `path` (and missing parents) with mode 0700, owned by [`pg_user`].
pub fn create_dir(path: &Path) {
    fs::create_dir_all(path)
        .unwrap_or_else(|e| panic!("could not create directory {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("could not chmod {}: {e}", path.display()));
    give(path);
}

/// Writes `contents` to `path` with mode 0600, owned by [`pg_user`].
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("could not chmod {}: {e}", path.display()));
    give(path);
}

/// The uid and gid of system user `name`, creating it if missing. Many test processes start
/// at once and may all find the user missing: `useradd` then fails in all but one of them
/// (user exists, or /etc/passwd locked), so the answer is whatever the user database says
/// after a few tries, not useradd's exit status.
fn ensure_system_user(name: &str) -> (u32, u32) {
    let mut last_error = String::new();
    for attempt in 0..50 {
        if let Some(ids) = lookup_ids(name) {
            return ids;
        }
        if attempt % 5 == 0 {
            let useradd = ["/usr/sbin/useradd", "/sbin/useradd"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .unwrap_or("useradd");
            let mut cmd = Command::new(useradd);
            cmd.args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "failback test bed, runs PostgreSQL",
                name,
            ]);
            match run_with_timeout(&mut cmd, Duration::from_secs(30)) {
                Ok(out) => {
                    last_error = format!("useradd exited with {}: {}", out.status, out.both())
                }
                Err(e) => last_error = e,
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "could not create the system user {name:?} that PostgreSQL runs as (the tests run as \
         root and PostgreSQL refuses root): {last_error}"
    );
}

/// uid and gid of user `name` from the user database (`getpwnam_r`, thread-safe).
fn lookup_ids(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live storage of the stated size; getpwnam_r writes only
    // into `pwd` and `buf` and sets `result` to null or to `&pwd`.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}

/// The name of user `uid`, if the user database knows it.
fn lookup_name(uid: u32) -> Option<String> {
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as in lookup_ids.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name points into `buf`, NUL-terminated by getpwuid_r.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}
