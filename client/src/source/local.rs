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

use failback_datadir::wal::{SourceChangesError, source_changes};

use super::{ChangesAnswer, Fetch, FetchRange, Fetched, Source, SourceEnd, SourceError};

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

    fn fetch(&mut self, ranges: Vec<FetchRange>) -> Result<Box<dyn Fetch + '_>, SourceError> {
        // One buffer, zeroed once: a buffer cleared and re-filled per piece costs a byte loop
        // per byte fetched in an unoptimised build, which made multi-GiB copies crawl.
        if self.buf.len() < PIECE as usize {
            self.buf = vec![0; PIECE as usize];
        }
        Ok(Box::new(LocalFetch {
            src: self,
            ranges: ranges.into_iter(),
            cur: None,
        }))
    }

    fn is_live(&self) -> bool {
        false
    }

    /// A shut-down directory's WAL ends where its files say, before any later `until`.
    fn changes(
        &mut self,
        since: failback_common::Lsn,
        _until: Option<failback_common::Lsn>,
    ) -> Result<ChangesAnswer, SourceError> {
        let bytes = self.control_file()?;
        let control =
            failback_common::ControlFileData::parse(&bytes).map_err(|e| SourceError::Refused {
                what: "global/pg_control".into(),
                reason: e.to_string(),
            })?;
        match source_changes(&self.dir, &control, since, None, None) {
            Ok(found) => Ok(ChangesAnswer::Found(found)),
            Err(e @ SourceChangesError::Gone { .. }) => Ok(ChangesAnswer::Unknown {
                why: failback_common::errors::one_line(&e),
            }),
            Err(e) => Err(SourceError::Refused {
                what: "the source's WAL".into(),
                reason: failback_common::errors::one_line(&e),
            }),
        }
    }

    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError> {
        Ok(None)
    }
}

/// A fetch from a local directory: each range read piece by piece, in order.
struct LocalFetch<'s> {
    src: &'s mut LocalSource,
    ranges: std::vec::IntoIter<FetchRange>,
    cur: Option<Reading>,
}

/// The range being read.
struct Reading {
    path: String,
    /// `None` once the file turned out to be gone.
    file: Option<std::fs::File>,
    next: u64,
    end: u64,
    /// The file ended at this size before the range did: said next, then the range is over.
    short: Option<u64>,
    over: bool,
}

impl LocalFetch<'_> {
    /// A shut-down source's file must still have the size it was listed with.
    fn check_unchanged(src: &LocalSource, r: &Reading) -> Result<(), SourceError> {
        let (Some(file), Some(&listed)) = (&r.file, src.listed.get(&r.path)) else {
            return Ok(());
        };
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
        Ok(())
    }
}

/// What the next piece is, without borrowing the fetch (the piece itself is made from the
/// fetch's state once the state has moved on).
enum Emit {
    End,
    Vanished,
    Short(u64),
    Data { offset: u64, len: usize },
}

impl LocalFetch<'_> {
    /// Moves the reading on to the next piece.
    fn advance(&mut self) -> Result<Emit, SourceError> {
        loop {
            if self.cur.as_ref().is_some_and(|r| r.over) {
                let done = self.cur.take().expect("a range being read");
                Self::check_unchanged(self.src, &done)?;
            }
            let Some(r) = self.cur.as_mut() else {
                let Some(range) = self.ranges.next() else {
                    return Ok(Emit::End);
                };
                let file = self
                    .src
                    .dir
                    .open(&range.path)
                    .map_err(|e| err(&range.path, e))?;
                let vanished = file.is_none();
                self.cur = Some(Reading {
                    path: range.path,
                    file,
                    next: range.offset,
                    end: range.offset.saturating_add(range.length),
                    short: None,
                    over: vanished,
                });
                if vanished {
                    return Ok(Emit::Vanished);
                }
                continue;
            };
            if let Some(size) = r.short.take() {
                r.over = true;
                return Ok(Emit::Short(size));
            }
            if r.next >= r.end {
                r.over = true;
                continue;
            }
            let want = (r.end - r.next).min(PIECE) as usize;
            let file = r.file.as_ref().expect("an open file");
            let done = read_full_at(file, &mut self.src.buf[..want], r.next).map_err(|e| {
                SourceError::Io {
                    what: r.path.clone(),
                    source: e,
                }
            })?;
            let offset = r.next;
            r.next += done as u64;
            if done < want {
                // The file ended before the range did.
                r.short = Some(r.next);
            }
            if done > 0 {
                return Ok(Emit::Data { offset, len: done });
            }
        }
    }
}

impl Fetch for LocalFetch<'_> {
    fn next(&mut self) -> Result<Option<Fetched<'_>>, SourceError> {
        let emit = self.advance()?;
        let path = || self.cur.as_ref().map_or("", |r| r.path.as_str());
        Ok(match emit {
            Emit::End => None,
            Emit::Vanished => Some(Fetched::Vanished { path: path() }),
            Emit::Short(size) => Some(Fetched::Short { path: path(), size }),
            Emit::Data { offset, len } => Some(Fetched::Data {
                path: path(),
                offset,
                data: &self.src.buf[..len],
            }),
        })
    }
}
