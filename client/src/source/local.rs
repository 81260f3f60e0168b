//! A shut-down data directory on this machine (`--source-pgdata`), read through the same
//! confined reader failbackd serves with.
//!
//! Nothing may write into a shut-down source: a file whose size differs, after its range is
//! read, from the size the listing saw means a server (or anything else) is running on it, and
//! the copy cannot be trusted. As pg_rewind's local source does, that stops the rewind
//! ("size of source file changed concurrently") rather than copying a torn file.

use std::collections::HashMap;

use failback_common::filemap::{FileEntry, FileType};

use failback_datadir::{DataDir, DataDirError, read_full_at};

use super::{FetchRange, Fetched, Source, SourceEnd, SourceError};

/// How much of a file is read at a time; large enough to stream, small enough to bound memory.
const PIECE: u64 = 1 << 20;

pub struct LocalSource {
    dir: DataDir,
    buf: Vec<u8>,
    /// Regular files' sizes as [`Source::list_files`] saw them.
    listed: HashMap<String, u64>,
}

impl LocalSource {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        LocalSource {
            dir: DataDir::new(path),
            buf: Vec::new(),
            listed: HashMap::new(),
        }
    }
}

fn err(what: &str, e: DataDirError) -> SourceError {
    match e {
        DataDirError::PathNotAllowed(p) => SourceError::Refused {
            what: what.to_string(),
            reason: format!("path {p:?} is outside the data directory"),
        },
        DataDirError::Io { source, .. } => SourceError::Io {
            what: what.to_string(),
            source,
        },
    }
}

impl Source for LocalSource {
    fn describe(&self) -> String {
        self.dir.root().display().to_string()
    }

    fn control_file(&mut self) -> Result<Vec<u8>, SourceError> {
        self.dir
            .read_file("global/pg_control")
            .map_err(|e| err("global/pg_control", e))?
            .ok_or_else(|| SourceError::Refused {
                what: "global/pg_control".into(),
                reason: format!("{} is not a PostgreSQL data directory", self.describe()),
            })
    }

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        self.dir.read_file(path).map_err(|e| err(path, e))
    }

    fn list_files(&mut self) -> Result<Vec<FileEntry>, SourceError> {
        let entries = self.dir.list().map_err(|e| err("the file list", e))?;
        self.listed = entries
            .iter()
            .filter(|e| e.file_type == FileType::Regular)
            .map(|e| (e.path.clone(), e.size))
            .collect();
        Ok(entries)
    }

    fn fetch(
        &mut self,
        ranges: &[FetchRange],
        sink: &mut dyn FnMut(Fetched<'_>) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        // One buffer, zeroed once: a buffer cleared and re-filled per piece costs a byte loop
        // per byte fetched in an unoptimised build, which made multi-GiB copies crawl.
        if self.buf.len() < PIECE as usize {
            self.buf = vec![0; PIECE as usize];
        }
        for r in ranges {
            let Some(file) = self.dir.open(&r.path).map_err(|e| err(&r.path, e))? else {
                sink(Fetched::Vanished { path: &r.path })?;
                continue;
            };
            let mut off = r.offset;
            let end = r.offset.saturating_add(r.length);
            while off < end {
                let want = (end - off).min(PIECE) as usize;
                let done = read_full_at(&file, &mut self.buf[..want], off).map_err(|e| {
                    SourceError::Io {
                        what: r.path.clone(),
                        source: e,
                    }
                })?;
                if done > 0 {
                    sink(Fetched::Data {
                        path: &r.path,
                        offset: off,
                        data: &self.buf[..done],
                    })?;
                }
                if done < want {
                    // The file ended before the range did.
                    sink(Fetched::Short {
                        path: &r.path,
                        size: off + done as u64,
                    })?;
                    break;
                }
                off += done as u64;
            }
            if let Some(&listed) = self.listed.get(&r.path) {
                let now = file
                    .metadata()
                    .map_err(|e| SourceError::Io {
                        what: r.path.clone(),
                        source: e,
                    })?
                    .len();
                if now != listed {
                    return Err(SourceError::ChangedConcurrently {
                        path: r.path.clone(),
                        listed,
                        now,
                    });
                }
            }
        }
        Ok(())
    }

    fn is_live(&self) -> bool {
        false
    }

    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError> {
        Ok(None)
    }
}
