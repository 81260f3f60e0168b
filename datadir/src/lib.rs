//! failback-datadir: read-only access to one PostgreSQL data directory, as both ends need it.
//!
//! A data directory holds regular files and directories, plus symlinks in two places:
//! `pg_tblspc/<oid>` points at a tablespace location outside the directory, and `pg_wal` may
//! point at a WAL directory elsewhere (`initdb --waldir`). pg_rewind's lister
//! (`src/bin/pg_rewind/file_ops.c`, `recurse_dir`) follows exactly those symlinks and reports
//! every other symlink as a symlink. Entries may vanish while the directory is listed (a live
//! server removes WAL segments and temporary files); vanished entries are skipped.
//!
//! Everything here is confined to the data directory: a path is relative, has no `..` or empty
//! components, and is opened by the kernel beneath a descriptor of the data directory opened
//! once, following no symlink but a tablespace link or `pg_wal` (and those only to a directory
//! of the data directory's owner), whatever is renamed in the directory meanwhile: how, and
//! what is left, is in [`beneath`]. failbackd serves through this crate, the client's local
//! source reads through it too, and the client lists its target with it.
//!
//! Beside the files: [`hash_chunks`], the one way both ends hash a file in fixed-size chunks
//! to compare them without sending them; [`postmaster`], whether PostgreSQL runs on a data
//! directory (its `postmaster.pid`); [`wal`], its WAL read along a timeline history; and
//! [`check_data_directory`], whether a directory is one at all.

pub mod beneath;
pub mod checksums;
pub mod history;
pub mod postmaster;
pub mod summaries;
pub mod wal;

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use failback_common::chunkdiff::{ByteRange, ChunkHash, WHOLE_FILE};
use failback_common::filemap::{FileEntry, FileType};
use rustix::fs::{AtFlags, FileType as Kind, OFlags};
use rustix::io::Errno;

use beneath::{DIR_READ, FILE_READ, Found, Root};

/// Why a request for a path was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "path {0:?} is not allowed: only relative paths inside the data directory, without '..', \
         are served, following no symbolic link but pg_wal and pg_tblspc/<oid>, and those only \
         to a directory of the data directory's owner"
    )]
    PathNotAllowed(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl DataDirError {
    fn io(path: &str, source: impl Into<io::Error>) -> Self {
        DataDirError::Io {
            path: path.to_string(),
            source: source.into(),
        }
    }

    /// Whether trying again can help: a refused path never will; an IO error might.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DataDirError::Io { .. })
    }
}

/// How a range read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// The whole range was read.
    Complete,
    /// The file ended inside the range (it was shorter, or shrank); the bytes are what there was.
    Short,
    /// The file does not exist (any more).
    Vanished,
}

/// One data directory, opened read-only.
///
/// The directory is opened once, when this is made (or, if it could not be then, on first
/// use), and every path is looked up beneath that descriptor: a directory renamed or replaced
/// at the root's path afterwards is not followed. Clones share the descriptor.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    opened: Arc<OnceLock<Root>>,
}

/// The checked components of a data-directory-relative path.
fn components(rel: &str) -> Result<Vec<&str>, DataDirError> {
    let refuse = || DataDirError::PathNotAllowed(rel.to_string());
    if rel.is_empty() || rel.starts_with('/') || rel.contains('\0') {
        return Err(refuse());
    }
    let parts: Vec<&str> = rel.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(refuse());
    }
    Ok(parts)
}

/// Whether `rel` can name a path of a data directory at all, by its words alone: relative,
/// without `..`, `.` or empty components, without NUL. Nothing is looked up: a symlink on the
/// way is refused when the path is opened.
pub fn check_relative(rel: &str) -> Result<(), DataDirError> {
    components(rel).map(|_| ())
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let dir = DataDir {
            root: root.into(),
            opened: Arc::new(OnceLock::new()),
        };
        // Pinned now if it exists; a directory made later is opened on first use.
        let _ = dir.opened();
        dir
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The data directory's descriptor, opened now if it was not yet.
    fn opened(&self) -> io::Result<&Root> {
        if let Some(r) = self.opened.get() {
            return Ok(r);
        }
        let root = Root::open(&self.root)?;
        // Another thread may have opened it meanwhile; either descriptor is the same directory
        // and the first one stays.
        let _ = self.opened.set(root);
        Ok(self.opened.get().expect("set just above"))
    }

    /// Opens the data-directory-relative `parts` (none: the directory itself) with `flags`,
    /// confined as [`beneath`] explains. `Ok(None)`: it (or the data directory) does not exist.
    fn open_fd(
        &self,
        rel: &str,
        parts: &[&str],
        flags: OFlags,
    ) -> Result<Option<OwnedFd>, DataDirError> {
        let root = match self.opened() {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataDirError::io(rel, e)),
        };
        match root.open_path(parts, flags) {
            Ok(Found::Fd(fd)) => Ok(Some(fd)),
            Ok(Found::Missing) => Ok(None),
            Ok(Found::Refused) => Err(DataDirError::PathNotAllowed(rel.to_string())),
            Err(e) => Err(DataDirError::io(rel, e)),
        }
    }

    /// The absolute path of a data-directory-relative path, after the confinement checks (one
    /// lookup, nothing read): how the confinement tests probe the rules below. No request is
    /// checked this way any more — a lookup up front cost as much as hashing a one-page file,
    /// and proved nothing for the read after it; every read looks its path up again, confined,
    /// and refuses it then.
    ///
    /// Symlinks are allowed only where PostgreSQL puts them: `pg_tblspc/<name>` and `pg_wal`,
    /// and only to a directory of the data directory's owner. Every other symlink on the way
    /// (including the final component) is refused, so a link planted in the data directory
    /// cannot expose files outside it. A missing path, or one that cannot be looked at, is not
    /// refused here: reading it says what is wrong.
    #[cfg(test)]
    pub(crate) fn resolve(&self, rel: &str) -> Result<PathBuf, DataDirError> {
        let parts = components(rel)?;
        match self.open_fd(rel, &parts, OFlags::PATH) {
            Err(e @ DataDirError::PathNotAllowed(_)) => Err(e),
            _ => Ok(self.root.join(rel)),
        }
    }

    /// Every entry below the data directory, in pg_rewind's terms, sorted by path. Each
    /// directory is opened beneath the one holding it and its entries looked at there, so a
    /// directory swapped for a link meanwhile is not followed (the listing fails instead); a
    /// tablespace link or a linked `pg_wal` leading to a directory of another owner than the
    /// data directory's is refused, not listed as empty.
    pub fn list(&self) -> Result<Vec<FileEntry>, DataDirError> {
        let root = self
            .open_fd("", &[], DIR_READ)?
            .ok_or_else(|| DataDirError::io("", io::Error::from(io::ErrorKind::NotFound)))?;
        let mut out = Vec::new();
        self.walk(root, "", &mut out)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Lists the open directory `dir` (`prefix` in the data directory) into `out`, and the
    /// directories below it, each opened beneath the one holding it.
    fn walk(
        &self,
        dir: OwnedFd,
        prefix: &str,
        out: &mut Vec<FileEntry>,
    ) -> Result<(), DataDirError> {
        // Kept open (a duplicate of the descriptor the listing read) to look at the entries.
        let at = dir.try_clone().map_err(|e| DataDirError::io(prefix, e))?;
        let names = beneath::entries(dir).map_err(|e| DataDirError::io(prefix, e))?;
        for name in names {
            let Ok(name) = name.to_str() else {
                // PostgreSQL never creates such names; a stray one cannot be served by path.
                continue;
            };
            let rel = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            let st = match rustix::fs::statat(&at, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(DataDirError::io(&rel, e)),
            };
            match Kind::from_raw_mode(st.st_mode) {
                Kind::Symlink => {
                    let target = match rustix::fs::readlinkat(&at, name, Vec::new()) {
                        Ok(t) => t,
                        Err(Errno::NOENT) => continue,
                        Err(e) => return Err(DataDirError::io(&rel, e)),
                    };
                    let followed = rel == "pg_wal" || prefix == "pg_tblspc";
                    out.push(if rel == "pg_wal" {
                        // pg_wal is always treated as a directory, wherever it lives.
                        dir_entry(rel.clone())
                    } else {
                        symlink_entry(rel.clone(), &target)
                    });
                    if followed {
                        let root = self.opened().map_err(|e| DataDirError::io(&rel, e))?;
                        let child = root.enter(at.as_fd(), name, DIR_READ);
                        self.walk_into(child, &rel, out)?;
                    }
                }
                Kind::Directory => {
                    out.push(dir_entry(rel.clone()));
                    let child = beneath::found(beneath::child(at.as_fd(), name, DIR_READ));
                    self.walk_into(child, &rel, out)?;
                }
                Kind::RegularFile => out.push(FileEntry::regular(rel, st.st_size as u64)),
                // Sockets, fifos and devices have no place in a data directory; they are skipped.
                _ => {}
            }
        }
        Ok(())
    }

    /// Walks the directory `rel` just opened: nothing when it vanished meanwhile, an error when
    /// it became (or leads through) a link that may not be followed.
    fn walk_into(
        &self,
        opened: Result<Found, Errno>,
        rel: &str,
        out: &mut Vec<FileEntry>,
    ) -> Result<(), DataDirError> {
        match opened {
            Ok(Found::Fd(fd)) => self.walk(fd, rel, out),
            Ok(Found::Missing) => Ok(()),
            Ok(Found::Refused) => Err(DataDirError::PathNotAllowed(rel.to_string())),
            Err(e) => Err(DataDirError::io(rel, e)),
        }
    }

    /// The names in the directory `rel` (`pg_wal`, say), confined like every read; names that
    /// are not UTF-8 are left out. A directory that does not exist is an error.
    pub fn names(&self, rel: &str) -> Result<Vec<String>, DataDirError> {
        let parts = components(rel)?;
        let dir = self
            .open_fd(rel, &parts, DIR_READ)?
            .ok_or_else(|| DataDirError::io(rel, io::Error::from(io::ErrorKind::NotFound)))?;
        let names = beneath::entries(dir).map_err(|e| DataDirError::io(rel, e))?;
        Ok(names
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect())
    }

    /// Reads a whole (small) file, such as `global/pg_control` or a timeline history file.
    /// `Ok(None)` when it does not exist.
    pub fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>, DataDirError> {
        let Some(mut file) = self.open(rel)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| DataDirError::io(rel, e))?;
        Ok(Some(bytes))
    }

    /// Reads `len` bytes at the 64-bit `offset` of a file into `buf` (its old content replaced).
    pub fn read_range(
        &self,
        rel: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<ReadStatus, DataDirError> {
        self.range_reader().read(rel, offset, len, buf)
    }

    /// A reader of many ranges that keeps the last file it opened open.
    pub fn range_reader(&self) -> RangeReader<'_> {
        RangeReader {
            dir: self,
            open: None,
        }
    }

    /// Opens a file for sequential reading (hashing, streaming a whole file), confined as
    /// [`beneath`] explains. `Ok(None)` when it does not exist. Anything but a regular file
    /// or a directory (a FIFO, a socket, a device) is an error.
    pub fn open(&self, rel: &str) -> Result<Option<File>, DataDirError> {
        let parts = components(rel)?;
        let Some(fd) = self.open_fd(rel, &parts, FILE_READ)? else {
            return Ok(None);
        };
        let kind = rustix::fs::fstat(&fd)
            .map(|st| Kind::from_raw_mode(st.st_mode))
            .map_err(|e| DataDirError::io(rel, e))?;
        if !matches!(kind, Kind::RegularFile | Kind::Directory) {
            return Err(DataDirError::io(
                rel,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file or a directory",
                ),
            ));
        }
        // Opened non-blocking only so that a FIFO could not hold the open; reads block as usual.
        rustix::fs::fcntl_setfl(&fd, OFlags::empty()).map_err(|e| DataDirError::io(rel, e))?;
        Ok(Some(File::from(fd)))
    }
}

/// Why a directory is not a PostgreSQL data directory failbackd may serve.
#[derive(Debug, thiserror::Error)]
pub enum NotADataDirectory {
    #[error(
        "{} does not exist: give -D the data directory of the PostgreSQL server to serve",
        .root.display()
    )]
    Missing { root: PathBuf },
    #[error("{} cannot be read: {source}", .root.display())]
    Unreadable {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not a directory: give -D the data directory of the PostgreSQL server to serve",
        .root.display()
    )]
    NotADirectory { root: PathBuf },
    #[error(
        "{} has no PG_VERSION: it is not a PostgreSQL data directory (give -D the directory initdb \
         created, the one holding PG_VERSION and global/pg_control)",
        .root.display()
    )]
    NoPgVersion { root: PathBuf },
    #[error("{}/global/pg_control cannot be read: {reason}", .root.display())]
    ControlUnreadable { root: PathBuf, reason: String },
    #[error("{}/global/pg_control is not a valid control file: {reason}", .root.display())]
    ControlInvalid { root: PathBuf, reason: String },
    #[error(
        "{}/PG_VERSION says {pg_version:?} but global/pg_control was written by PostgreSQL \
         {control}: the directory is damaged or was assembled from two clusters",
        .root.display()
    )]
    VersionMismatch {
        root: PathBuf,
        pg_version: String,
        control: failback_common::PgMajor,
    },
}

/// Whether `root` is a PostgreSQL data directory failbackd may serve: an existing directory
/// holding `PG_VERSION` and a valid `global/pg_control` of the same major version (read through
/// the same confinement as everything served, so neither may be a symlink). A mistyped `-D`,
/// `/`, or a tablespace location given for the data directory is refused at start-up with
/// what to do, instead of being served.
pub fn check_data_directory(root: &Path) -> Result<(), NotADataDirectory> {
    let owned = || root.to_path_buf();
    match std::fs::metadata(root) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(NotADataDirectory::NotADirectory { root: owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(NotADataDirectory::Missing { root: owned() });
        }
        Err(source) => {
            return Err(NotADataDirectory::Unreadable {
                root: owned(),
                source,
            });
        }
    }
    let dir = DataDir::new(root);
    let pg_version = match dir.read_file("PG_VERSION") {
        Ok(Some(b)) => String::from_utf8_lossy(&b).trim().to_string(),
        Ok(None) | Err(DataDirError::PathNotAllowed(_)) => {
            return Err(NotADataDirectory::NoPgVersion { root: owned() });
        }
        Err(DataDirError::Io { source, .. }) => {
            return Err(NotADataDirectory::Unreadable {
                root: owned(),
                source,
            });
        }
    };
    let control = match dir.read_file("global/pg_control") {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Err(NotADataDirectory::ControlUnreadable {
                root: owned(),
                reason: "it does not exist".into(),
            });
        }
        Err(e) => {
            return Err(NotADataDirectory::ControlUnreadable {
                root: owned(),
                reason: e.to_string(),
            });
        }
    };
    let control = failback_common::ControlFileData::parse(&control).map_err(|e| {
        NotADataDirectory::ControlInvalid {
            root: owned(),
            reason: e.to_string(),
        }
    })?;
    if pg_version != control.major.number().to_string() {
        return Err(NotADataDirectory::VersionMismatch {
            root: owned(),
            pg_version,
            control: control.major,
        });
    }
    Ok(())
}

/// Reads ranges of files of a [`DataDir`], one after the other. A request for the blocks that
/// differ names thousands of 8 KiB ranges of the same file in a row; looking the path up and
/// opening the file for each cost more than reading it, so the last file opened stays open for
/// the next range of the same path. A file unlinked meanwhile is
/// then read as it was when opened, as if the range had been read a moment earlier: the backup
/// window's WAL replay brings it to what the source has since, as it does for every byte.
pub struct RangeReader<'a> {
    dir: &'a DataDir,
    /// The path last opened, and its file (`None`: it did not exist).
    open: Option<(String, Option<File>)>,
}

impl RangeReader<'_> {
    /// Reads `len` bytes at the 64-bit `offset` of `rel` into `buf` (its old content replaced).
    pub fn read(
        &mut self,
        rel: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<ReadStatus, DataDirError> {
        if self.open.as_ref().is_none_or(|(p, _)| p != rel) {
            self.open = None;
            let file = self.dir.open(rel)?;
            self.open = Some((rel.to_string(), file));
        }
        let Some((_, Some(file))) = &self.open else {
            buf.clear();
            return Ok(ReadStatus::Vanished);
        };
        let want = usize::try_from(len).map_err(|_| DataDirError::PathNotAllowed(rel.into()))?;
        // Read into the buffer's spare room, never zeroed first: a caller that hands each
        // chunk's buffer on (failbackd sends it as it is) reads into a new one every time.
        buf.clear();
        buf.reserve_exact(want);
        let mut f = file;
        let done = f
            .seek(io::SeekFrom::Start(offset))
            .and_then(|_| f.take(len).read_to_end(buf))
            .map_err(|e| DataDirError::io(rel, e))?;
        Ok(if done == want {
            ReadStatus::Complete
        } else {
            ReadStatus::Short
        })
    }
}

/// Reads at `offset` until `buf` is full or the file ends; the bytes read.
pub fn read_full_at(file: &impl FileExt, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Why a file could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the file has more than {max} chunks")]
    TooManyChunks { max: u64 },
}

/// A buffer for [`hash_chunks`] with `chunk`-byte chunks: whole chunks, a mebibyte of them
/// or one chunk if that is larger.
pub fn hash_buffer(chunk: u64) -> Vec<u8> {
    let chunk = chunk.max(1) as usize;
    vec![0u8; chunk.max((1 << 20) / chunk * chunk)]
}

/// The blake3 hash of each `chunk`-byte chunk of `file` (the last may be shorter), read to its
/// current end (a file of a live source may have grown or shrunk since it was listed), and the
/// size hashed. `buf` is read into whole: as many chunks as fit in it (at least one) at a
/// time, so that chunks as small as a page cost one read per many of them. A file of more than
/// `max_chunks` chunks is refused rather than hashed: the caller asked for chunks too small
/// for it.
pub fn hash_chunks(
    file: &(impl FileExt + AsFd),
    chunk: usize,
    buf: &mut [u8],
    max_chunks: u64,
) -> Result<(u64, Vec<[u8; 32]>), HashError> {
    hash_ranges(
        ChunkHash::Blake3,
        file,
        chunk,
        buf,
        &[WHOLE_FILE],
        max_chunks,
    )
}

/// The hashes of the `chunk`-byte chunks within `ranges` of `file`, range after range, and
/// the file's size: each range's chunks start at its offset and are cut at its end and at the
/// file's end, as [`failback_common::chunkdiff::chunks_within`] counts them (the second round
/// of a comparison hashes only the coarse chunks the first found different). The size is the
/// file's when hashing begins (a live source's file may have grown or shrunk since it was
/// listed), or where a read found it ending earlier (it shrank meanwhile): never less than a
/// hashed extent's end, so that both sides agree on every chunk's extent. Knowing the size
/// first, no read is spent finding the end: a file of one page costs one `fstat` and one read,
/// which matters when a cluster's 100,000 small relation files are hashed one after the other.
/// `buf` is read into whole: as many chunks as fit in it (at least one) at a time, so that
/// chunks as small as a page cost one read per many of them. More than `max_chunks` chunks are
/// refused rather than hashed: the caller asked for chunks too small.
///
/// Holes are not read. A file's holes read as zeros, and reading them still costs: the kernel
/// makes and zeroes a page-cache page for every page read (here about 0.3 GB/s, slower than the
/// disk reads data, with as much of the page cache spent). PostgreSQL leaves holes where a
/// relation was extended by `posix_fallocate` (PostgreSQL 16 on, which file systems keep as
/// unwritten extents, reported as holes) and files copied sparse have them. So before each
/// read the file is asked where its next data is (`SEEK_DATA`); every whole chunk before it
/// is a chunk of zeros, whose hash is computed once. What is left of a range within one chunk
/// is read without asking: a hole is skipped a whole chunk at a time, so the question could
/// save nothing.
pub fn hash_ranges(
    algorithm: ChunkHash,
    file: &(impl FileExt + AsFd),
    chunk: usize,
    buf: &mut [u8],
    ranges: &[ByteRange],
    max_chunks: u64,
) -> Result<(u64, Vec<[u8; 32]>), HashError> {
    assert!(
        chunk > 0 && buf.len() >= chunk,
        "a buffer of at least one chunk"
    );
    let whole = buf.len() / chunk * chunk;
    let buf = &mut buf[..whole];
    let mut hashes = Vec::new();
    let mut zeros: Option<[u8; 32]> = None;
    let push = |hashes: &mut Vec<[u8; 32]>, h: [u8; 32]| {
        if hashes.len() as u64 >= max_chunks {
            return Err(HashError::TooManyChunks { max: max_chunks });
        }
        hashes.push(h);
        Ok(())
    };
    let size = rustix::fs::fstat(file).map_err(io::Error::from)?.st_size;
    let size = u64::try_from(size).unwrap_or(0);
    for r in ranges {
        let end = r.offset.saturating_add(r.length).min(size);
        let mut off = r.offset;
        while off < end {
            let left = end - off;
            if left > chunk as u64 {
                let hole_chunks = hole_at(file, off)?.min(left) / chunk as u64;
                if hole_chunks > 0 {
                    let zero = *zeros.get_or_insert_with(|| algorithm.hash(&vec![0u8; chunk]));
                    for _ in 0..hole_chunks {
                        push(&mut hashes, zero)?;
                    }
                    off += hole_chunks * chunk as u64;
                    continue;
                }
            }
            let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            let n = read_full_at(file, &mut buf[..want], off)?;
            for piece in buf[..n].chunks(chunk) {
                push(&mut hashes, algorithm.hash(piece))?;
            }
            off += n as u64;
            if n < want {
                // The file shrank since it was measured: it ends here, and later ranges have
                // no chunks.
                return Ok((off, hashes));
            }
        }
    }
    Ok((size, hashes))
}

/// How many bytes of hole begin at `off`, up to the data after it or the file's end: 0 where
/// data begins at `off`, past the end, or where the file system cannot say (`SEEK_DATA`
/// refused), so that the caller reads.
fn hole_at(file: &impl AsFd, off: u64) -> io::Result<u64> {
    use rustix::fs::{SeekFrom, seek};
    match seek(file, SeekFrom::Data(off)) {
        Ok(data) => Ok(data.saturating_sub(off)),
        // No data at or after `off`: a hole to the end, if `off` is before it.
        Err(rustix::io::Errno::NXIO) => {
            let end = seek(file, SeekFrom::End(0)).map_err(io::Error::from)?;
            Ok(end.saturating_sub(off))
        }
        Err(_) => Ok(0),
    }
}

fn symlink_entry(path: String, target: &CStr) -> FileEntry {
    FileEntry {
        path,
        file_type: FileType::Symlink,
        size: 0,
        link_target: Some(String::from_utf8_lossy(target.to_bytes()).into_owned()),
    }
}

fn dir_entry(path: String) -> FileEntry {
    FileEntry {
        path,
        file_type: FileType::Directory,
        size: 0,
        link_target: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    use crate::confinement_tests::both;

    fn tmp() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "fb-datadir-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn lists_like_pg_rewind_and_confines_paths() {
        both(lists_and_confines);
    }

    fn lists_and_confines() {
        let root = tmp();
        let outside = root.with_extension("outside");
        let _ = fs::remove_dir_all(&outside);
        fs::create_dir_all(outside.join("PG_15_202209061/5")).unwrap();
        fs::write(outside.join("PG_15_202209061/5/16384"), vec![1u8; 8192]).unwrap();
        let secret_dir = root.with_extension("secret");
        fs::create_dir_all(&secret_dir).unwrap();
        fs::write(secret_dir.join("secret"), b"x").unwrap();
        fs::create_dir_all(root.join("base/5")).unwrap();
        fs::create_dir_all(root.join("pg_tblspc")).unwrap();
        fs::write(root.join("base/5/16384"), vec![0u8; 3 * 8192]).unwrap();
        symlink(&outside, root.join("pg_tblspc/16400")).unwrap();
        symlink(secret_dir.join("secret"), root.join("evil")).unwrap();

        let dd = DataDir::new(&root);
        let list = dd.list().unwrap();
        let paths: Vec<_> = list
            .iter()
            .map(|e| (e.path.as_str(), e.file_type))
            .collect();
        assert!(paths.contains(&("base/5/16384", FileType::Regular)));
        assert!(paths.contains(&("pg_tblspc/16400", FileType::Symlink)));
        assert!(paths.contains(&("pg_tblspc/16400/PG_15_202209061/5/16384", FileType::Regular)));
        assert!(paths.contains(&("evil", FileType::Symlink)));
        assert!(!paths.iter().any(|p| p.0.contains("secret")));

        let mut buf = Vec::new();
        assert_eq!(
            dd.read_range("base/5/16384", 8192, 8192, &mut buf).unwrap(),
            ReadStatus::Complete
        );
        assert_eq!(
            dd.read_range("base/5/16384", 16384, 9000, &mut buf)
                .unwrap(),
            ReadStatus::Short
        );
        assert_eq!(buf.len(), 8192);
        assert_eq!(
            dd.read_range("base/5/nope", 0, 1, &mut buf).unwrap(),
            ReadStatus::Vanished
        );
        assert!(
            dd.read_range("pg_tblspc/16400/PG_15_202209061/5/16384", 0, 8192, &mut buf)
                .is_ok()
        );
        for bad in [
            "/etc/passwd",
            "../x",
            "base/../../x",
            "evil",
            "base//5",
            "",
            "pg_tblspc/16400/../../x",
        ] {
            assert!(
                matches!(
                    dd.read_range(bad, 0, 1, &mut buf),
                    Err(DataDirError::PathNotAllowed(_))
                ),
                "{bad}"
            );
        }
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
        fs::remove_dir_all(&secret_dir).unwrap();
    }

    #[test]
    fn holes_hash_as_the_zeros_they_read_as() {
        let root = tmp().with_extension("holes");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let (sparse, dense) = (root.join("sparse"), root.join("dense"));
        // Data at the start, a hole of several buffers, data in the middle of a chunk, a
        // hole to an end that is not on a chunk boundary.
        let len = 9 * (1 << 20) + 5000;
        let mut content = vec![0u8; len];
        content[..3000].fill(7);
        content[5 * (1 << 20) + 100..5 * (1 << 20) + 9000].fill(9);
        let f = fs::File::create(&sparse).unwrap();
        f.write_all_at(&content[..3000], 0).unwrap();
        f.write_all_at(
            &content[5 * (1 << 20) + 100..5 * (1 << 20) + 9000],
            5 * (1 << 20) + 100,
        )
        .unwrap();
        f.set_len(len as u64).unwrap();
        fs::write(&dense, &content).unwrap();
        for chunk in [8192usize, 1 << 20] {
            let mut buf = hash_buffer(chunk as u64);
            let want: Vec<[u8; 32]> = content
                .chunks(chunk)
                .map(|c| *blake3::hash(c).as_bytes())
                .collect();
            for path in [&sparse, &dense] {
                let f = File::open(path).unwrap();
                assert_eq!(
                    hash_chunks(&f, chunk, &mut buf, u64::MAX).unwrap(),
                    (len as u64, want.clone()),
                    "{} in chunks of {chunk}",
                    path.display()
                );
            }
            let f = File::open(&sparse).unwrap();
            assert!(matches!(
                hash_chunks(&f, chunk, &mut buf, want.len() as u64 - 1),
                Err(HashError::TooManyChunks { .. })
            ));
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn chunks_are_hashed_to_the_end_of_the_file_and_counted() {
        let root = tmp().with_extension("hash");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let path = root.join("f");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        // A buffer of two chunks and a half: read two at a time, the half unused.
        let mut buf = vec![0u8; 4096 * 5 / 2];
        let (size, hashes) = hash_chunks(&f, 4096, &mut buf, 3).unwrap();
        assert_eq!(size, 10_000);
        let want: Vec<[u8; 32]> = bytes
            .chunks(4096)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        assert_eq!(hashes, want);
        assert!(matches!(
            hash_chunks(&f, 4096, &mut buf, 2),
            Err(HashError::TooManyChunks { max: 2 })
        ));
        assert_eq!(
            hash_chunks(&f, 4096, &mut buf[..4096], 3).unwrap(),
            (size, want)
        );
        fs::write(&path, b"").unwrap();
        assert_eq!(hash_chunks(&f, 4096, &mut buf, 0).unwrap(), (0, vec![]));
        fs::remove_dir_all(&root).unwrap();
    }

    /// The chunks of ranges are hashed as the comparison counts them
    /// (`chunkdiff::chunks_within`), holes or not: the same hashes as the bytes read whole.
    #[test]
    fn ranges_are_hashed_in_their_own_chunks_cut_at_the_end_of_the_file() {
        use failback_common::chunkdiff::chunks_within;
        let root = tmp().with_extension("ranges");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let (sparse, dense) = (root.join("sparse"), root.join("dense"));
        let len = 3 * (1 << 20) + 700;
        let mut content = vec![0u8; len];
        content[(1 << 20) + 10..(1 << 20) + 20_000].fill(5);
        let f = fs::File::create(&sparse).unwrap();
        f.write_all_at(&content[(1 << 20) + 10..(1 << 20) + 20_000], (1 << 20) + 10)
            .unwrap();
        f.set_len(len as u64).unwrap();
        fs::write(&dense, &content).unwrap();
        let r = |offset, length| ByteRange { offset, length };
        let ranges = [
            r(0, 8192),
            r(1 << 20, 1 << 20),
            r((2 << 20) + 100, 5000),
            r(3 << 20, 1 << 20),
            r(4 << 20, 4096),
        ];
        let chunk = 8192usize;
        let mut want = Vec::new();
        for x in &ranges {
            let end = ((x.offset + x.length) as usize).min(len);
            let start = (x.offset as usize).min(end);
            want.extend(
                content[start..end]
                    .chunks(chunk)
                    .map(|c| *blake3::hash(c).as_bytes()),
            );
        }
        assert_eq!(
            chunks_within(&ranges, chunk as u64, len as u64),
            Some(want.len() as u64)
        );
        let mut buf = hash_buffer(chunk as u64);
        for path in [&sparse, &dense] {
            let f = File::open(path).unwrap();
            assert_eq!(
                hash_ranges(ChunkHash::Blake3, &f, chunk, &mut buf, &ranges, u64::MAX).unwrap(),
                (len as u64, want.clone()),
                "{}",
                path.display()
            );
            // Ranges inside the file report its size, not the end of the last range.
            let inside = hash_ranges(ChunkHash::Blake3, &f, chunk, &mut buf, &ranges[..2], 1000);
            assert_eq!(inside.unwrap().0, len as u64);
        }
        fs::remove_dir_all(&root).unwrap();
    }
}

#[cfg(test)]
mod confinement_tests;
