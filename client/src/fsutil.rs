//! Durable file operations: the mechanisms [`crate::target::Target`] changes the target with.
//!
//! PostgreSQL trusts what is on disk after a crash only if it was fsynced: a file's data by
//! `fsync` of the file, its name by `fsync` of the directory holding it. A rewind that writes
//! blocks, then a new `pg_control`, must make the blocks durable *before* the control file that
//! points recovery at them; otherwise a power cut can leave a control file that claims a state
//! the data files never reached.
//!
//! The target directory belongs to the OS user that runs PostgreSQL. When failback runs as root
//! it must leave every file it creates owned by that user and with the directory's mode
//! (0700/0600, or 0750/0640 with group access, as `initdb -g` sets), or the server will not
//! start.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How the finished target is flushed to disk (`--sync-method`, PostgreSQL 17's options).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMethod {
    /// fsync every file and directory, as `initdb --sync-only` does.
    Fsync,
    /// One syncfs(2) per filesystem: the data directory, each tablespace and a linked pg_wal.
    Syncfs,
}

/// Who owns the data directory and which modes new files and directories get.
#[derive(Clone, Copy, Debug)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
    /// Whether we run as root and so must chown what we create.
    pub chown: bool,
}

impl Ownership {
    /// Reads the owner and mode of the data directory. Group access (mode 0750) gives files
    /// 0640, else 0600 (PostgreSQL's `pg_mode_mask`).
    pub fn of_data_dir(pgdata: &Path) -> io::Result<Ownership> {
        let md = fs::metadata(pgdata)?;
        let group = md.mode() & 0o070 != 0;
        Ok(Ownership {
            uid: md.uid(),
            gid: md.gid(),
            file_mode: if group { 0o640 } else { 0o600 },
            dir_mode: if group { 0o750 } else { 0o700 },
            chown: unsafe { libc::geteuid() } == 0,
        })
    }

    /// Gives a path we created its owner and mode.
    pub fn apply(&self, path: &Path, is_dir: bool) -> io::Result<()> {
        let mode = if is_dir {
            self.dir_mode
        } else {
            self.file_mode
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        if self.chown {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))?;
        }
        Ok(())
    }

    /// Opens a file for writing, creating it (owned and moded) if needed.
    pub fn open_for_write(&self, path: &Path, truncate: bool) -> io::Result<File> {
        let existed = path.exists();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(truncate)
            .mode(self.file_mode)
            .open(path)?;
        if !existed {
            self.apply(path, false)?;
        }
        Ok(f)
    }

    /// Creates a directory (owned and moded); an existing one is fine.
    pub fn create_dir(&self, path: &Path) -> io::Result<()> {
        match fs::create_dir(path) {
            Ok(()) => self.apply(path, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// fsyncs a directory, so that the names in it (creations, renames, removals) are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Threads [`fsync_files`] uses at most. A file's fsync mostly waits: for its writeback, for
/// the file system's journal commit and for the disk's cache flush. Issued together, the
/// file system commits many files' metadata at once and the disk overlaps the flushes, so a
/// few hundred small files (visibility maps, free space maps, SLRU segments) take about as
/// long as a few.
const FSYNC_THREADS: usize = 8;

/// fsyncs every file in `paths` (a missing one is skipped: it was removed since, and its name
/// is the directory's business), several at a time. The first failure, with its path.
pub fn fsync_files(paths: &[PathBuf]) -> Result<(), (PathBuf, io::Error)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let one = |p: &PathBuf| match File::open(p) {
        Ok(f) => {
            f.sync_all().map_err(|e| (p.clone(), e))?;
            crate::fault::passed(crate::fault::Point::Sync, 1);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err((p.clone(), e)),
    };
    let work = || -> Result<(), (PathBuf, io::Error)> {
        while let Some(p) = paths.get(next.fetch_add(1, Ordering::Relaxed)) {
            one(p)?;
        }
        Ok(())
    };
    let threads = paths.len().min(FSYNC_THREADS);
    if threads <= 1 {
        return work();
    }
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut result = work();
        for h in helpers {
            let r = h
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            result = result.and(r);
        }
        result
    })
}

/// Replaces `to` by `from` so that after a crash at any instant either the old or the new
/// content is there, never a mix, and the new content is durable when this returns:
/// fsync the new file's data, rename it over the old name, then fsync the directory so the
/// rename itself survives. (The same sequence as PostgreSQL's `durable_rename`.)
pub fn durable_rename(from: &Path, to: &Path) -> io::Result<()> {
    File::open(from)?.sync_all()?;
    fs::rename(from, to)?;
    fsync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Writes `data` to `path` durably and atomically: into `path.tmp`, then `durable_rename`.
/// When that fails (a full disk, most likely), `path` keeps its old content and the temporary
/// file is removed, so a failed write neither leaves a half file under the real name nor
/// holds on to the space it took.
pub fn durable_write(path: &Path, data: &[u8], own: &Ownership) -> io::Result<()> {
    let tmp = with_suffix(path, ".failback.tmp");
    let written = write_new(&tmp, data, own).and_then(|()| durable_rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn write_new(path: &Path, data: &[u8], own: &Ownership) -> io::Result<()> {
    use std::io::Write;
    own.open_for_write(path, true)?.write_all(data)
}

/// Removes a file and makes the removal durable.
pub fn durable_remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(path.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Flushes the whole data directory: every file and directory below `pgdata`, following the
/// `pg_wal` link and the tablespace links, as PostgreSQL's `sync_pgdata` does.
pub fn sync_data_dir(pgdata: &Path, method: SyncMethod) -> io::Result<()> {
    let mut roots = vec![pgdata.to_path_buf()];
    let wal = pgdata.join("pg_wal");
    if fs::symlink_metadata(&wal).is_ok_and(|m| m.file_type().is_symlink()) {
        roots.push(fs::canonicalize(&wal)?);
    }
    if let Ok(rd) = fs::read_dir(pgdata.join("pg_tblspc")) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_symlink()) {
                roots.push(fs::canonicalize(e.path())?);
            }
        }
    }
    for root in &roots {
        match method {
            SyncMethod::Syncfs => {
                let f = File::open(root)?;
                use std::os::fd::AsRawFd;
                // SAFETY: syncfs only reads the descriptor, which lives until the call returns.
                if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            SyncMethod::Fsync => fsync_tree(root)?,
        }
    }
    Ok(())
}

/// Two passes over the tree, as PostgreSQL's `sync_pgdata` does: first ask the kernel to start
/// writing back every file (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), then
/// fsync each. The writes of all files then proceed together instead of one file at a time.
fn fsync_tree(dir: &Path) -> io::Result<()> {
    walk_files(dir, &mut |f| {
        use std::os::fd::AsRawFd;
        // SAFETY: a hint on a descriptor we own; failure only means no head start.
        unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        Ok(())
    })?;
    walk_files(dir, &mut |f| f.sync_all())
}

/// Calls `each` with every regular file below `dir` (opened read-only), then fsyncs `dir` and
/// every directory below it, children first.
fn walk_files(dir: &Path, each: &mut dyn FnMut(&File) -> io::Result<()>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            walk_files(&entry.path(), each)?;
        } else if ft.is_file() {
            match File::open(entry.path()) {
                Ok(f) => each(&f)?,
                // A file we cannot open for reading (a read-only key owned by another user)
                // is not one failback wrote.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_write_replaces_whole_content() {
        let dir = std::env::temp_dir().join(format!("fb-fsutil-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        let own = Ownership::of_data_dir(&dir).unwrap();
        assert_eq!((own.file_mode, own.dir_mode), (0o640, 0o750));
        let p = dir.join("f");
        durable_write(&p, b"old", &own).unwrap();
        durable_write(&p, b"new content", &own).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new content");
        assert!(!with_suffix(&p, ".failback.tmp").exists());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        sync_data_dir(&dir, SyncMethod::Fsync).unwrap();
        sync_data_dir(&dir, SyncMethod::Syncfs).unwrap();
        let missing = dir.join("never-there");
        fsync_files(&[]).unwrap();
        fsync_files(&[p.clone(), missing.clone()]).unwrap();
        let many: Vec<PathBuf> = (0..20).map(|i| dir.join(format!("many-{i}"))).collect();
        for m in &many {
            fs::write(m, b"x").unwrap();
        }
        fsync_files(&many).unwrap();
        // A path that cannot be opened (a file below a regular file) is reported by name.
        let bad = p.join("below-a-file");
        let (path, _) = fsync_files(&[many[0].clone(), bad.clone()]).unwrap_err();
        assert_eq!(path, bad);
        durable_remove(&p).unwrap();
        durable_remove(&p).unwrap();
        assert!(!p.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
