//! Opening paths beneath a data directory without following a link out of it.
//!
//! **Where PostgreSQL puts symlinks.** A data directory holds regular files and directories,
//! and symlinks in exactly two places: `pg_tblspc/<oid>`, made by `CREATE TABLESPACE ...
//! LOCATION`, points at the tablespace's directory elsewhere; and `pg_wal` points at the WAL
//! directory when `initdb --waldir` put it elsewhere. PostgreSQL follows those two and never
//! makes another. It insists that its data directory, its tablespace locations and a separate
//! WAL directory all belong to the operating-system user it runs as (it refuses to start on a
//! data directory of another owner, and `CREATE TABLESPACE` and `initdb` `chmod` the location,
//! which only its owner may do).
//!
//! **What an attacker can do.** Whoever can write into the data directory (its owner, or a
//! database superuser through the server's file functions) can plant a symlink anywhere in it,
//! and can swap one in for a file or a directory at any moment: `rename(2)` of a prepared link
//! over a path is atomic, and can be repeated in a loop while failbackd reads. Checking each
//! component with `lstat` and then opening the path by name loses that race: between the check
//! and the open the component becomes a link, and the open follows it out (to
//! `/etc/shadow`, or a directory holding another cluster's files). failbackd, often run as
//! root, would then serve bytes, sizes and hashes it must not.
//!
//! **What the kernel guarantees.** Paths are therefore never opened by name from `/`. The data
//! directory is opened once, as a directory file descriptor, and every path beneath it is
//! resolved by the kernel relative to that descriptor in one call: `openat2(2)` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` fails with `ELOOP` at any
//! symlink on the way (the last component included) and with `EXDEV` at any escape, and the
//! descriptor it returns is the file that one lookup found, whatever is renamed afterwards.
//! Where `openat2` is missing (Linux before 5.6, or a seccomp filter answering `ENOSYS`), the
//! path is walked one component at a time with `openat(dir, component, O_NOFOLLOW)`, each step
//! relative to the descriptor the previous one returned: as race-free, one syscall a
//! component. A listing opens each directory the same way and reads the entries of that open
//! directory (`getdents`, `fstatat(AT_SYMLINK_NOFOLLOW)`, `readlinkat`), never a path.
//!
//! **The two links followed.** A path whose first component is `pg_wal`, or whose first two are
//! `pg_tblspc/<name>`, starts at that entry: when it is a symlink, exactly that one link is
//! followed (`openat` of the entry without `O_NOFOLLOW`, `O_DIRECTORY`), and the directory it
//! leads to must belong to the owner of the data directory (`fstat` of both descriptors), as
//! PostgreSQL requires of its tablespaces and WAL directory: a link swapped to `/`, `/etc` or
//! another user's home is refused. The rest of the path is then resolved beneath the
//! directory reached, by the same rules.
//!
//! **What is left.** Someone who can rewrite a `pg_tblspc` link or `pg_wal` can point it at
//! another directory of the same owner (another cluster of the same server user, say), and its
//! files are then served as that tablespace's: exactly what PostgreSQL itself would read
//! there. The data directory's own path is resolved once, when it is first opened; a link in
//! it is the administrator's choice.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Flags for a directory only passed through or `fstat`ed: no read permission needed.
pub(crate) const DIR_PATH: OFlags = OFlags::PATH.union(OFlags::DIRECTORY);
/// Flags for a directory whose entries are read.
pub(crate) const DIR_READ: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY);
/// Flags for a file that is read. `NONBLOCK` so that a FIFO planted under a served name does
/// not block the open forever (the caller refuses anything but a file or a directory).
pub(crate) const FILE_READ: OFlags = OFlags::RDONLY.union(OFlags::NOCTTY).union(OFlags::NONBLOCK);

/// Set once `openat2` answered `ENOSYS`: every later lookup walks component by component.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Tests run the component walk on their thread as if `openat2` were missing.
    static FORCE_WALK: Cell<bool> = const { Cell::new(false) };
}

/// Whether the lookups of this thread must walk component by component (tests of the fallback).
#[cfg(test)]
pub(crate) fn force_walk(on: bool) {
    FORCE_WALK.with(|f| f.set(on));
}

/// The data directory, opened once.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    /// Its owner: the only owner a followed link may lead to.
    uid: u32,
}

/// What a lookup beneath the data directory found.
pub(crate) enum Found {
    Fd(OwnedFd),
    /// Nothing by that name (a component is missing).
    Missing,
    /// A symlink where none may be followed, a followed link leading to a directory of another
    /// owner, or an escape.
    Refused,
}

impl Root {
    pub(crate) fn open(path: &Path) -> std::io::Result<Root> {
        let fd = rustix::fs::open(path, DIR_PATH | OFlags::CLOEXEC, Mode::empty())?;
        let uid = rustix::fs::fstat(&fd)?.st_uid;
        Ok(Root { fd, uid })
    }

    /// Opens the data-directory-relative path `parts` (components already checked: none empty,
    /// `.` or `..`; none at all for the directory itself) with `flags`.
    pub(crate) fn open_path(&self, parts: &[&str], flags: OFlags) -> Result<Found, Errno> {
        let (start, rest) = match parts {
            ["pg_wal", rest @ ..] => match self.enter(self.fd.as_fd(), "pg_wal", DIR_PATH)? {
                Found::Fd(fd) => (Some(fd), rest),
                other => return Ok(other),
            },
            ["pg_tblspc", name, rest @ ..] => {
                let tblspc = match beneath(self.fd.as_fd(), &["pg_tblspc"], DIR_PATH) {
                    Ok(fd) => fd,
                    Err(e) => return found(Err(e)),
                };
                match self.enter(tblspc.as_fd(), name, DIR_PATH)? {
                    Found::Fd(fd) => (Some(fd), rest),
                    other => return Ok(other),
                }
            }
            _ => (None, parts),
        };
        let start = start.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
        found(beneath(start, rest, flags))
    }

    /// Opens `name` in `parent`, one of the two places where PostgreSQL makes symlinks
    /// (`pg_wal` in the data directory, an entry of `pg_tblspc`): a directory is opened as any
    /// other; a symlink is followed, and the directory it leads to must belong to the owner of
    /// the data directory.
    pub(crate) fn enter(
        &self,
        parent: BorrowedFd<'_>,
        name: &str,
        flags: OFlags,
    ) -> Result<Found, Errno> {
        match child(parent, name, flags) {
            Err(Errno::LOOP) => {}
            r => return found(r),
        }
        // Exactly this one link is followed; whatever it was swapped for meanwhile, the
        // directory reached is what is checked.
        let fd = match rustix::fs::openat(
            parent,
            name,
            flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => return found(Err(e)),
        };
        if rustix::fs::fstat(&fd)?.st_uid != self.uid {
            return Ok(Found::Refused);
        }
        Ok(Found::Fd(fd))
    }
}

/// Sorts an open's outcome: a link met or an escape is refused, a missing name is missing, any
/// other error stays one.
pub(crate) fn found(r: Result<OwnedFd, Errno>) -> Result<Found, Errno> {
    match r {
        Ok(fd) => Ok(Found::Fd(fd)),
        Err(Errno::LOOP | Errno::XDEV) => Ok(Found::Refused),
        Err(Errno::NOENT) => Ok(Found::Missing),
        Err(e) => Err(e),
    }
}

/// Opens `parts` beneath `start` with `flags`, following no symlink: `ELOOP` at a symlink,
/// `EXDEV` at an escape. No components: `start` itself, opened anew with `flags`.
pub(crate) fn beneath(
    start: BorrowedFd<'_>,
    parts: &[&str],
    flags: OFlags,
) -> Result<OwnedFd, Errno> {
    if FORCE_WALK.with(Cell::get) || NO_OPENAT2.load(Ordering::Relaxed) {
        return walk(start, parts, flags);
    }
    let path = if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    // EAGAIN: a rename raced the lookup in a way the kernel could not rule out an escape for
    // (it says so only for `..`, which no path here has); trying again is what it asks.
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(
            start,
            &path,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        ) {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            Err(Errno::NOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                return walk(start, parts, flags);
            }
            // An old seccomp profile refuses syscalls it does not know with EPERM; the walk
            // says what is really wrong, if anything.
            Err(Errno::PERM) => return walk(start, parts, flags),
            r => return r,
        }
    }
}

/// [`beneath`] without `openat2`: one `openat(O_NOFOLLOW)` a component, each relative to the
/// directory the previous one opened.
fn walk(start: BorrowedFd<'_>, parts: &[&str], flags: OFlags) -> Result<OwnedFd, Errno> {
    let Some((last, dirs)) = parts.split_last() else {
        return rustix::fs::openat(start, ".", flags | OFlags::CLOEXEC, Mode::empty());
    };
    let mut dir: Option<OwnedFd> = None;
    for name in dirs {
        let at = dir.as_ref().map_or(start, |d| d.as_fd());
        dir = Some(child(at, name, DIR_PATH)?);
    }
    child(dir.as_ref().map_or(start, |d| d.as_fd()), last, flags)
}

/// Opens the entry `name` of `dir` with `flags`, without following it if it is a symlink:
/// `ELOOP` then.
pub(crate) fn child(dir: BorrowedFd<'_>, name: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for _ in 0..8 {
        match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            // O_DIRECTORY | O_NOFOLLOW fails with ENOTDIR on a symlink as on a file: what the
            // entry is now tells which, unless it is a directory again (swapped back
            // meanwhile), when it is opened anew.
            Err(Errno::NOTDIR) if flags.contains(OFlags::DIRECTORY) => {
                match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                        FileType::Symlink => return Err(Errno::LOOP),
                        FileType::Directory => continue,
                        _ => return Err(Errno::NOTDIR),
                    },
                    Err(Errno::NOENT) => return Err(Errno::NOENT),
                    Err(_) => return Err(Errno::NOTDIR),
                }
            }
            // O_PATH | O_NOFOLLOW opens a symlink itself.
            Ok(fd)
                if flags.contains(OFlags::PATH)
                    && FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode)
                        == FileType::Symlink =>
            {
                return Err(Errno::LOOP);
            }
            r => return r,
        }
    }
    // Swapped between a directory and something else at every try: not what PostgreSQL does.
    Err(Errno::LOOP)
}

/// The names in the open directory `dir`, `.` and `..` left out; a directory removed while it
/// is read ends there.
pub(crate) fn entries(dir: OwnedFd) -> Result<Vec<std::ffi::CString>, Errno> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::new(dir)? {
        match entry {
            Ok(e) => {
                let name = e.file_name();
                if name != c"." && name != c".." {
                    out.push(name.to_owned());
                }
            }
            Err(Errno::NOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
