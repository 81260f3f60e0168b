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
//! components, and is resolved component by component so that no symlink except a tablespace
//! link or `pg_wal` can lead out. failbackd serves through this crate, the client's local
//! source reads through it too, and the client lists its target with it.
//!
//! Beside the files: [`hash_chunks`], the one way both ends hash a file in fixed-size chunks
//! to compare them without sending them; [`postmaster`], whether PostgreSQL runs on a data
//! directory (its `postmaster.pid`); and [`wal`], its WAL read along a timeline history.

pub mod checksums;
pub mod history;
pub mod postmaster;
pub mod summaries;
pub mod wal;

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use failback_common::filemap::{FileEntry, FileType};

/// Why a request for a path was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "path {0:?} is not allowed: only relative paths inside the data directory, without '..', are served"
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
    fn io(path: &str, source: io::Error) -> Self {
        DataDirError::Io {
            path: path.to_string(),
            source,
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
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of a data-directory-relative path, after the confinement checks.
    ///
    /// Symlinks are allowed only where PostgreSQL puts them: `pg_tblspc/<name>` and `pg_wal`.
    /// Every other symlink on the way (including the final component) is refused, so a link
    /// planted in the data directory cannot expose files outside it.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, DataDirError> {
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
        let mut path = self.root.clone();
        for (i, part) in parts.iter().enumerate() {
            path.push(part);
            match fs::symlink_metadata(&path) {
                Ok(md) if md.file_type().is_symlink() => {
                    let allowed =
                        (i == 0 && *part == "pg_wal") || (i == 1 && parts[0] == "pg_tblspc");
                    if !allowed {
                        return Err(refuse());
                    }
                }
                // A missing component is not a confinement problem; the caller's open reports it.
                _ => {}
            }
        }
        Ok(path)
    }

    /// Every entry below the data directory, in pg_rewind's terms, sorted by path.
    pub fn list(&self) -> Result<Vec<FileEntry>, DataDirError> {
        let mut out = Vec::new();
        self.walk(&self.root.clone(), "", &mut out)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<FileEntry>) -> Result<(), DataDirError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !prefix.is_empty() => return Ok(()),
            Err(e) => return Err(DataDirError::io(prefix, e)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DataDirError::io(prefix, e)),
            };
            let Ok(name) = entry.file_name().into_string() else {
                // PostgreSQL never creates such names; a stray one cannot be served by path.
                continue;
            };
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let full = entry.path();
            let md = match fs::symlink_metadata(&full) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DataDirError::io(&rel, e)),
            };
            let ft = md.file_type();
            if ft.is_symlink() {
                let target = match fs::read_link(&full) {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(DataDirError::io(&rel, e)),
                };
                if rel == "pg_wal" {
                    // pg_wal is always treated as a directory, wherever it lives.
                    out.push(dir_entry(rel.clone()));
                    self.walk(&full, &rel, out)?;
                } else if prefix == "pg_tblspc" {
                    out.push(FileEntry {
                        path: rel.clone(),
                        file_type: FileType::Symlink,
                        size: 0,
                        link_target: Some(target.to_string_lossy().into_owned()),
                    });
                    self.walk(&full, &rel, out)?;
                } else {
                    out.push(FileEntry {
                        path: rel,
                        file_type: FileType::Symlink,
                        size: 0,
                        link_target: Some(target.to_string_lossy().into_owned()),
                    });
                }
            } else if ft.is_dir() {
                out.push(dir_entry(rel.clone()));
                self.walk(&full, &rel, out)?;
            } else if ft.is_file() {
                out.push(FileEntry::regular(rel, md.len()));
            }
            // Sockets, fifos and devices have no place in a data directory; they are skipped.
        }
        Ok(())
    }

    /// Reads a whole (small) file, such as `global/pg_control` or a timeline history file.
    /// `Ok(None)` when it does not exist.
    pub fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>, DataDirError> {
        let path = self.resolve(rel)?;
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataDirError::io(rel, e)),
        }
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

    /// Opens a file for sequential reading (hashing, streaming a whole file).
    pub fn open(&self, rel: &str) -> Result<Option<File>, DataDirError> {
        let path = self.resolve(rel)?;
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataDirError::io(rel, e)),
        }
    }
}

/// Reads ranges of files of a [`DataDir`], one after the other. A request for the blocks that
/// differ names thousands of 8 KiB ranges of the same file in a row; resolving the path (a
/// `lstat` per component) and opening the file for each cost more than reading it, so the last
/// file opened stays open for the next range of the same path. A file unlinked meanwhile is
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
            let path = self.dir.resolve(rel)?;
            let file = match File::open(&path) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(DataDirError::io(rel, e)),
            };
            self.open = Some((rel.to_string(), file));
        }
        let Some((_, Some(file))) = &self.open else {
            buf.clear();
            return Ok(ReadStatus::Vanished);
        };
        let len = usize::try_from(len).map_err(|_| DataDirError::PathNotAllowed(rel.into()))?;
        // The old bytes are read over, so only growth is zeroed: not a megabyte per chunk.
        buf.resize(len, 0);
        let done = read_full_at(file, buf, offset).map_err(|e| DataDirError::io(rel, e))?;
        buf.truncate(done);
        Ok(if done == len {
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
    file: &impl FileExt,
    chunk: usize,
    buf: &mut [u8],
    max_chunks: u64,
) -> Result<(u64, Vec<[u8; 32]>), HashError> {
    assert!(
        chunk > 0 && buf.len() >= chunk,
        "a buffer of at least one chunk"
    );
    let whole = buf.len() / chunk * chunk;
    let buf = &mut buf[..whole];
    let mut hashes = Vec::new();
    let mut off = 0u64;
    loop {
        let n = read_full_at(file, buf, off)?;
        for piece in buf[..n].chunks(chunk) {
            if hashes.len() as u64 >= max_chunks {
                return Err(HashError::TooManyChunks { max: max_chunks });
            }
            hashes.push(*blake3::hash(piece).as_bytes());
        }
        off += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((off, hashes))
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
    use std::os::unix::fs::symlink;

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
}
