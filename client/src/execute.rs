//! Carrying out a plan against the target data directory.
//!
//! The plan says, per path, what pg_rewind would do; this module does it through one writer:
//! directories and tablespace links are created first, files are cut down, then every byte to
//! fetch (whole files, tails, changed blocks) is requested from the source in one batch, so a
//! remote source can keep its link full, and written at its 64-bit offset as it arrives; while
//! it arrives, what the source no longer has is removed, deepest paths first.
//!
//! A whole-file copy writes only the pieces whose bytes differ from what the target already
//! holds at the same offset: configuration files, SLRUs and WAL segments from before the fork
//! are mostly identical, and a rewrite would only cost disk bandwidth.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use failback_common::chunkdiff::{self, ByteRange, ChunkList};
use failback_common::filemap::{FileAction, FileType};
use failback_common::plan::Plan;
use serde::Serialize;

use failback_datadir::{hash_chunks, read_full_at};

use crate::fsutil::{self, Ownership, TargetFull};
use crate::progress::Progress;
use crate::source::{FetchRange, Fetched, Source, SourceError};
use crate::unfinished::Recorder;
use failback_common::journal::JournalState;

/// Why the plan could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error("could not {what} \"{}\"", path.display())]
    Target {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The target's file system filled up: the one error for it, wherever it was written.
    #[error(transparent)]
    TargetFull(#[from] TargetFull),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Journal(#[from] crate::unfinished::UnfinishedError),
    #[error(
        "the rewind must change \"{}\" in the target data directory, but it cannot be written \
         (check its permissions, its owner, `lsattr` for the immutable flag, and whether the file \
         system is mounted read-only); the plan was not started",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ExecuteError {
    fn target(what: &'static str, path: &Path, source: io::Error) -> Self {
        fsutil::target_error(path, source, |source| ExecuteError::Target {
            what,
            path: path.to_path_buf(),
            source,
        })
    }

    /// A full file system, wherever it was met (the copy or the journal), with how much the
    /// rest of the plan may still write.
    fn needing(self, bytes: u64) -> Self {
        match self {
            ExecuteError::TargetFull(f) => ExecuteError::TargetFull(f.needing(bytes)),
            ExecuteError::Journal(crate::unfinished::UnfinishedError::TargetFull(f)) => {
                ExecuteError::Journal(crate::unfinished::UnfinishedError::TargetFull(
                    f.needing(bytes),
                ))
            }
            e => e,
        }
    }

    /// The target's file system is full, if that is what this error says.
    pub fn target_full(&self) -> Option<&TargetFull> {
        match self {
            ExecuteError::TargetFull(f)
            | ExecuteError::Journal(crate::unfinished::UnfinishedError::TargetFull(f)) => Some(f),
            _ => None,
        }
    }
}

/// What the execution did, for `-n`, the report and tests.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ExecuteStats {
    pub bytes_fetched: u64,
    pub bytes_written: u64,
    /// Bytes of whole-file copies that were already identical on the target.
    pub bytes_identical: u64,
    pub files_vanished_on_source: u64,
    /// Whole-file copies whose chunks were compared by hash with the source's (ChunkHashes).
    pub files_hashed: u64,
    /// Bytes of those files that were not fetched because the target's chunk was the same.
    pub bytes_skipped_by_hashes: u64,
    /// Bytes a resumed run did not fetch because the interrupted one had written them.
    pub bytes_already_done: u64,
    /// Every regular file whose bytes or length this execution changed: what the sync must
    /// make durable. A whole copy found identical everywhere is not in it.
    #[serde(skip)]
    pub changed: std::collections::BTreeSet<String>,
}

/// The chunk size whole-file copies are compared in: a WAL page is 8 KiB, a segment 16 MiB
/// (256 hashes), and 64 KiB keeps the hash lists under 0.05% of the bytes they describe.
pub const HASH_CHUNK: u64 = 64 << 10;

/// A live source's file may have grown since it was listed: like pg_rewind's libpq source,
/// a whole-file copy asks for at least this much, and the source says where the file ends.
pub const LIVE_MIN_COPY: u64 = 1 << 20;

/// Adjacent changed blocks become one range, so a run of blocks is one request.
fn block_ranges(path: &str, blocks: impl Iterator<Item = u32>, block_size: u32) -> Vec<FetchRange> {
    let bs = u64::from(block_size);
    let mut out: Vec<FetchRange> = Vec::new();
    for blk in blocks {
        let off = u64::from(blk) * bs;
        match out.last_mut() {
            Some(r) if r.offset + r.length == off => r.length += bs,
            _ => out.push(FetchRange {
                path: path.to_string(),
                offset: off,
                length: bs,
            }),
        }
    }
    out
}

/// The ranges the plan fetches, in plan order.
pub fn plan_ranges(plan: &Plan) -> Vec<FetchRange> {
    fetch_ranges(plan, false, &HashMap::new())
}

/// The ranges to fetch: the plan's, with the whole-file copies in `diffs` cut down to the
/// chunks that differ, and a live source's whole copies stretched to [`LIVE_MIN_COPY`].
fn fetch_ranges(
    plan: &Plan,
    live: bool,
    diffs: &HashMap<String, Vec<ByteRange>>,
) -> Vec<FetchRange> {
    let mut ranges = Vec::new();
    for e in &plan.entries {
        ranges.extend(block_ranges(&e.path, e.blocks.iter(), plan.block_size));
        let src = e.source.as_ref().map_or(0, |s| s.size);
        let tgt = e.target.as_ref().map_or(0, |t| t.size);
        match e.action {
            FileAction::Copy if diffs.contains_key(&e.path) => {
                ranges.extend(diffs[&e.path].iter().map(|r| FetchRange {
                    path: e.path.clone(),
                    offset: r.offset,
                    length: r.length,
                }))
            }
            FileAction::Copy if live => ranges.push(FetchRange {
                path: e.path.clone(),
                offset: 0,
                length: src.max(LIVE_MIN_COPY),
            }),
            FileAction::Copy if src > 0 => ranges.push(FetchRange {
                path: e.path.clone(),
                offset: 0,
                length: src,
            }),
            FileAction::CopyTail => ranges.push(FetchRange {
                path: e.path.clone(),
                offset: tgt,
                length: src - tgt,
            }),
            _ => {}
        }
    }
    ranges
}

/// Checks, before anything is changed, that every file the plan writes and every directory it
/// creates or removes entries in can be written (`access(W_OK)`, which also sees the immutable
/// flag and read-only mounts, even for root). A rewind that stopped halfway on an unwritable
/// file would leave the target neither old nor new.
pub fn preflight(plan: &Plan, pgdata: &Path) -> Result<(), ExecuteError> {
    use std::collections::BTreeSet;
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    // The commit writes backup_label and global/pg_control through temporary files.
    dirs.insert(pgdata.to_path_buf());
    dirs.insert(pgdata.join("global"));
    for e in &plan.entries {
        let path = pgdata.join(&e.path);
        let parent = path.parent().unwrap_or(pgdata).to_path_buf();
        let writes_in_place = !e.blocks.is_empty()
            || e.zero_from.is_some()
            || match e.action {
                FileAction::Copy => e.target.is_some(),
                FileAction::CopyTail | FileAction::Truncate => true,
                _ => false,
            };
        if writes_in_place {
            files.insert(path);
        }
        match e.action {
            FileAction::Create | FileAction::Remove => {
                dirs.insert(parent);
            }
            FileAction::Copy if e.target.is_none() => {
                dirs.insert(parent);
            }
            _ => {}
        }
    }
    // A directory the plan creates does not exist yet; its parent is checked instead.
    for p in files.iter().chain(dirs.iter()) {
        if !p.exists() {
            continue;
        }
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
            ExecuteError::NotWritable {
                path: p.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"),
            }
        })?;
        // SAFETY: `c` is a NUL-terminated path that lives across the call.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            return Err(ExecuteError::NotWritable {
                path: p.clone(),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Carries out `plan` on the data directory `pgdata`, fetching from `source`.
pub fn execute(
    plan: &Plan,
    pgdata: &Path,
    own: &Ownership,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
) -> Result<ExecuteStats, ExecuteError> {
    execute_journaled(plan, pgdata, own, source, progress, None, None)
}

/// [`execute`], skipping what `done` (the journal of an interrupted run) says is on the target
/// already, and recording with `recorder` what this run writes.
pub fn execute_journaled(
    plan: &Plan,
    pgdata: &Path,
    own: &Ownership,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
    done: Option<&JournalState>,
    mut recorder: Option<&mut Recorder>,
) -> Result<ExecuteStats, ExecuteError> {
    let mut stats = ExecuteStats::default();
    let full = |p: &str| pgdata.join(p);

    // Whole copies of files the target has: only the chunks that differ, when the source can
    // say which. Asked first, before any change: a source that fails to answer leaves the
    // target as it was.
    let (diffs, hashed_sizes) = hash_diffs(plan, pgdata, source, &mut stats)?;
    if stats.files_hashed > 0 {
        progress.info(&format!(
            "compared {} files with the source's chunk hashes: {} MB of them already on the \
             target, not fetched",
            stats.files_hashed,
            stats.bytes_skipped_by_hashes / 1_000_000
        ));
    }

    // Every byte to fetch, as one batch; worked out before any change, so that a full disk
    // can be told how much the rest of the plan needs.
    let mut ranges = fetch_ranges(plan, source.is_live(), &diffs);
    if let Some(d) = done {
        let mut left = Vec::with_capacity(ranges.len());
        for r in ranges {
            let Some(set) = d.done.get(&r.path) else {
                left.push(r);
                continue;
            };
            let missing = set.missing(r.offset, r.length);
            let kept: u64 = missing.iter().map(|(_, l)| l).sum();
            stats.bytes_already_done += r.length - kept;
            left.extend(missing.into_iter().map(|(offset, length)| FetchRange {
                path: r.path.clone(),
                offset,
                length,
            }));
        }
        ranges = left;
    }
    let total: u64 = ranges.iter().map(|r| r.length).sum();
    prepare(plan, pgdata, own, done, &hashed_sizes, &mut stats).map_err(|e| e.needing(total))?;
    progress.total(total);
    let whole_copies: std::collections::HashSet<&str> = plan
        .entries
        .iter()
        .filter(|e| e.action == FileAction::Copy && e.target.is_some())
        .map(|e| e.path.as_str())
        .collect();
    let mut files: HashMap<String, File> = HashMap::new();
    let mut compare = Vec::new();
    let mut write_error: Option<ExecuteError> = None;
    let mut sink = |piece: Fetched<'_>| -> Result<(), SourceError> {
        let left = total.saturating_sub(stats.bytes_fetched);
        let r = (|| -> Result<(), ExecuteError> {
            match piece {
                Fetched::Data { path, offset, data } => {
                    stats.bytes_fetched += data.len() as u64;
                    progress.advance(data.len() as u64);
                    let full_path = full(path);
                    if !files.contains_key(path) {
                        if files.len() >= 64 {
                            files.clear();
                        }
                        let f = own
                            .open_for_write(&full_path, false)
                            .map_err(|err| ExecuteError::target("open", &full_path, err))?;
                        // Reading back the target's bytes needs a readable handle.
                        drop(f);
                        let f = fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&full_path)
                            .map_err(|err| ExecuteError::target("open", &full_path, err))?;
                        files.insert(path.to_string(), f);
                    }
                    let f = &files[path];
                    if whole_copies.contains(path) {
                        compare.resize(data.len(), 0);
                        if read_full_at(f, &mut compare, offset).is_ok_and(|n| n == data.len())
                            && compare == data
                        {
                            stats.bytes_identical += data.len() as u64;
                            if let Some(rec) = recorder.as_deref_mut() {
                                rec.note(path, &full_path, offset, data.len() as u64)?;
                            }
                            return Ok(());
                        }
                    }
                    f.write_all_at(data, offset)
                        .map_err(|err| ExecuteError::target("write", &full_path, err))?;
                    start_writeback(f, offset, data.len() as u64);
                    stats.bytes_written += data.len() as u64;
                    if let Some(rec) = recorder.as_deref_mut() {
                        rec.note(path, &full_path, offset, data.len() as u64)?;
                    }
                    crate::fault::passed(crate::fault::Point::Bytes, data.len() as u64);
                    if !stats.changed.contains(path) {
                        stats.changed.insert(path.to_string());
                    }
                }
                Fetched::Short { path, size } => {
                    // The source file is shorter than listed: so must the copy be. WAL replay
                    // recreates whatever a live source appended or cut meanwhile.
                    let full_path = full(path);
                    files.remove(path);
                    if let Ok(f) = fs::OpenOptions::new().write(true).open(&full_path) {
                        f.set_len(size)
                            .map_err(|err| ExecuteError::target("truncate", &full_path, err))?;
                        stats.changed.insert(path.to_string());
                    }
                }
                Fetched::Vanished { path } => {
                    stats.files_vanished_on_source += 1;
                    files.remove(path);
                    let full_path = full(path);
                    match fs::remove_file(&full_path) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        Err(err) => return Err(ExecuteError::target("remove", &full_path, err)),
                    }
                }
            }
            Ok(())
        })();
        r.map_err(|e| {
            let e = e.needing(left);
            let msg = e.to_string();
            write_error = Some(e);
            SourceError::Sink(msg.into())
        })
    };
    // What the source does not have goes while the fetch runs, on a thread of its own:
    // unlinking a 16 MiB WAL segment costs the file system several milliseconds, and a
    // diverged old primary has dozens of them. No fetched path is removed (the plan removes
    // only what the source lacks), and a removal that is lost to a crash is done again by
    // the resumed run.
    let fetched = std::thread::scope(|scope| {
        let removals = scope.spawn(|| remove_what_the_source_lacks(plan, pgdata));
        let fetched = source.fetch(&ranges, &mut sink);
        let removed = removals
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (fetched, removed)
    });
    if let Err(e) = fetched.0 {
        return Err(write_error.take().unwrap_or(ExecuteError::Source(e)));
    }
    fetched.1?;
    drop(files);
    if let Some(rec) = recorder {
        rec.flush()?;
    }
    Ok(stats)
}

/// Removes, deepest first (the plan's order), every path the plan removes.
fn remove_what_the_source_lacks(plan: &Plan, pgdata: &Path) -> Result<(), ExecuteError> {
    for e in plan
        .entries
        .iter()
        .filter(|e| e.action == FileAction::Remove)
    {
        let path = pgdata.join(&e.path);
        let t = e.target.as_ref().map_or(FileType::Regular, |t| t.file_type);
        let r = match t {
            FileType::Directory => fs::remove_dir(&path),
            FileType::Regular | FileType::Symlink => fs::remove_file(&path),
        };
        match r {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(ExecuteError::target("remove", &path, err)),
        }
    }
    Ok(())
}

/// What comes before the fetch: directories and links are created, the diverged WAL of kept
/// segments is zeroed, and files are cut down or created empty.
fn prepare(
    plan: &Plan,
    pgdata: &Path,
    own: &Ownership,
    done: Option<&JournalState>,
    hashed_sizes: &HashMap<String, u64>,
    stats: &mut ExecuteStats,
) -> Result<(), ExecuteError> {
    let full = |p: &str| pgdata.join(p);
    // Directories and links first, so that files below them can be written.
    for e in plan
        .entries
        .iter()
        .filter(|e| e.action == FileAction::Create)
    {
        let path = full(&e.path);
        let src = e.source.as_ref().expect("CREATE comes from a source entry");
        match src.file_type {
            FileType::Directory => own
                .create_dir(&path)
                .map_err(|err| ExecuteError::target("create directory", &path, err))?,
            FileType::Symlink => {
                let to = src.link_target.as_deref().unwrap_or_default();
                match std::os::unix::fs::symlink(to, &path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(ExecuteError::target("create symlink", &path, err)),
                }
                if own.chown {
                    std::os::unix::fs::lchown(&path, Some(own.uid), Some(own.gid))
                        .map_err(|err| ExecuteError::target("chown", &path, err))?;
                }
            }
            FileType::Regular => unreachable!("regular files are copied, not created"),
        }
    }

    // Kept WAL segments lose the old primary's WAL past the divergence point (see the planner).
    for e in &plan.entries {
        if let Some(from) = e.zero_from {
            let path = full(&e.path);
            let size = e.target.as_ref().map_or(0, |t| t.size);
            zero_range(&path, from, size)
                .map_err(|err| ExecuteError::target("zero the diverged WAL in", &path, err))?;
            stats.changed.insert(e.path.clone());
        }
    }

    // Files the source has less of: cut them down before anything is written into them.
    for e in &plan.entries {
        let target_len = e.target.as_ref().map_or(0, |t| t.size);
        let new_len = match e.action {
            FileAction::Truncate => e.source.as_ref().map_or(0, |s| s.size),
            // A whole copy ends at the source's size (as hashed, when it was); bytes past it
            // must go.
            FileAction::Copy if e.target.is_some() => e
                .source
                .as_ref()
                .map_or(0, |s| s.size)
                .min(target_len)
                .min(hashed_sizes.get(&e.path).copied().unwrap_or(u64::MAX)),
            FileAction::Copy => {
                let path = full(&e.path);
                // An interrupted run's part of the copy stays: only what it lacks is fetched.
                let resumed = done.is_some_and(|d| d.done.contains_key(&e.path));
                own.open_for_write(&path, !resumed)
                    .map_err(|err| ExecuteError::target("create", &path, err))?;
                stats.changed.insert(e.path.clone());
                continue;
            }
            _ => continue,
        };
        if new_len < target_len {
            let path = full(&e.path);
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|err| ExecuteError::target("open", &path, err))?;
            f.set_len(new_len)
                .map_err(|err| ExecuteError::target("truncate", &path, err))?;
            stats.changed.insert(e.path.clone());
        }
    }

    Ok(())
}

/// The ranges to fetch per file, and the size the source hashed per file.
type HashDiffs = (HashMap<String, Vec<ByteRange>>, HashMap<String, u64>);

/// For each whole-file copy of a file the target has (at least one chunk long), the ranges
/// that differ from the source's, by comparing the source's chunk hashes with the target's,
/// and the size the source hashed: the target file must be cut to it, so that skipped chunks
/// and fetched ranges together make the source's file. Changes nothing.
fn hash_diffs(
    plan: &Plan,
    pgdata: &Path,
    source: &mut dyn Source,
    stats: &mut ExecuteStats,
) -> Result<HashDiffs, ExecuteError> {
    let mut diffs = HashMap::new();
    let mut sizes = HashMap::new();
    // failbackd hashes at most MAX_HASHES_PER_FILE chunks of a file (16 GiB here) and
    // refuses the whole request otherwise: a file over half that (room for a live file to
    // grow) is copied whole instead.
    let most = HASH_CHUNK * failback_proto::limits::MAX_HASHES_PER_FILE;
    let paths: Vec<String> = plan
        .entries
        .iter()
        .filter(|e| {
            e.action == FileAction::Copy
                && e.source
                    .as_ref()
                    .is_some_and(|s| (HASH_CHUNK..=most / 2).contains(&s.size))
                && e.target.as_ref().is_some_and(|t| t.size >= HASH_CHUNK)
        })
        .map(|e| e.path.clone())
        .collect();
    if paths.is_empty() {
        return Ok((diffs, sizes));
    }
    // The target's own hashes are computed while the source computes its (a round trip and
    // the source's reading), not after.
    let (hashes, mut local) = std::thread::scope(|scope| {
        let local = scope.spawn(|| {
            let mut buf = vec![0u8; HASH_CHUNK as usize];
            paths
                .iter()
                .map(|p| {
                    let path = pgdata.join(p);
                    let hashed = File::open(&path)
                        .map_err(|err| ExecuteError::target("open", &path, err))
                        .and_then(|f| {
                            hash_chunks(&f, &mut buf, u64::MAX).map_err(|err| {
                                let err = match err {
                                    failback_datadir::HashError::Io(e) => e,
                                    e => io::Error::other(e),
                                };
                                ExecuteError::target("read", &path, err)
                            })
                        });
                    (p.clone(), hashed)
                })
                .collect::<HashMap<_, _>>()
        });
        let hashes = source.chunk_hashes(&paths, HASH_CHUNK);
        let local = local
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (hashes, local)
    });
    let Some(hashes) = hashes? else {
        return Ok((diffs, sizes));
    };
    for h in hashes {
        // A vanished file is fetched as planned, and the fetch reports it gone.
        if h.vanished {
            continue;
        }
        let Some(hashed) = local.remove(&h.path) else {
            continue;
        };
        let (size, mine) = hashed?;
        let ranges = chunkdiff::ranges_to_fetch(
            HASH_CHUNK,
            &ChunkList {
                size: h.size,
                hashes: &h.hashes,
            },
            &ChunkList {
                size,
                hashes: &mine,
            },
        );
        let fetched: u64 = ranges.iter().map(|r| r.length).sum();
        stats.files_hashed += 1;
        stats.bytes_skipped_by_hashes += h.size.saturating_sub(fetched);
        sizes.insert(h.path.clone(), h.size);
        diffs.insert(h.path, ranges);
    }
    Ok((diffs, sizes))
}

/// Asks the kernel to start writing these bytes to disk now, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the disk works while the next pieces cross the
/// network, and the final fsync finds little left to flush. Only a hint: durability is still
/// the sync's job.
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a hint on a descriptor we own, over a range we just wrote.
    unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Overwrites `[from, to)` of an existing file with zeros (allocated, as PostgreSQL keeps WAL).
fn zero_range(path: &Path, from: u64, to: u64) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(path)?;
    let zeros = vec![0u8; 1 << 16];
    let mut off = from;
    while off < to {
        let n = (to - off).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(path: &str, src: u64, tgt: Option<u64>) -> failback_common::plan::PlanEntry {
        let file = |size| failback_common::filemap::FileEntry::regular(path, size);
        failback_common::plan::PlanEntry {
            path: path.into(),
            action: FileAction::Copy,
            source: Some(file(src)),
            target: tgt.map(file),
            blocks: Default::default(),
            reason: None,
            zero_from: None,
        }
    }

    #[test]
    fn whole_copies_fetch_the_differing_chunks_or_at_least_a_mebibyte_when_live() {
        let plan = Plan {
            entries: vec![
                copy("pg_wal/000000010000000000000003", 16 << 20, Some(16 << 20)),
                copy("postgresql.auto.conf", 88, Some(100)),
                copy("pg_xact/0001", 0, None),
            ],
            block_size: 8192,
        };
        let got = |live, diffs: &HashMap<String, Vec<ByteRange>>| {
            fetch_ranges(&plan, live, diffs)
                .into_iter()
                .map(|r| (r.path, r.offset, r.length))
                .collect::<Vec<_>>()
        };
        let wal = "pg_wal/000000010000000000000003".to_string();
        let conf = "postgresql.auto.conf".to_string();
        assert_eq!(
            got(false, &HashMap::new()),
            vec![(wal.clone(), 0, 16 << 20), (conf.clone(), 0, 88)]
        );
        // Live: a file may have grown since it was listed, even from nothing.
        assert_eq!(
            got(true, &HashMap::new()),
            vec![
                (wal.clone(), 0, 16 << 20),
                (conf.clone(), 0, LIVE_MIN_COPY),
                ("pg_xact/0001".to_string(), 0, LIVE_MIN_COPY)
            ]
        );
        // Hashed: only the differing chunks, live or not; a file with no differing chunk
        // fetches nothing.
        let mut diffs = HashMap::new();
        diffs.insert(
            wal.clone(),
            vec![ByteRange {
                offset: 65536,
                length: 131072,
            }],
        );
        diffs.insert(conf.clone(), vec![]);
        assert_eq!(
            got(true, &diffs),
            vec![
                (wal, 65536, 131072),
                ("pg_xact/0001".to_string(), 0, LIVE_MIN_COPY)
            ]
        );
    }

    #[test]
    fn adjacent_blocks_merge() {
        let r = block_ranges("f", [0u32, 1, 2, 5, 7, 8].into_iter(), 8192);
        let got: Vec<_> = r.iter().map(|r| (r.offset, r.length)).collect();
        assert_eq!(
            got,
            vec![(0, 3 * 8192), (5 * 8192, 8192), (7 * 8192, 2 * 8192)]
        );
    }

    // What the sync flushes is what was changed: an identical whole copy is not written, so it
    // is not in `changed`; a different, a new and a cut-down file are.
    #[test]
    fn changed_holds_exactly_the_files_written_or_cut() {
        let src = tempfile::tempdir().unwrap();
        let tgt = tempfile::tempdir().unwrap();
        let put = |d: &tempfile::TempDir, name: &str, bytes: &[u8]| {
            fs::write(d.path().join(name), bytes).unwrap();
        };
        put(&src, "same", b"identical bytes");
        put(&tgt, "same", b"identical bytes");
        put(&src, "differs", b"source bytes");
        put(&tgt, "differs", b"target bytes");
        put(&src, "new", b"only on the source");
        put(&src, "shorter", b"abc");
        put(&tgt, "shorter", b"abcdef");
        let plan = Plan {
            entries: vec![
                copy("same", 15, Some(15)),
                copy("differs", 12, Some(12)),
                copy("new", 18, None),
                copy("shorter", 3, Some(6)),
            ],
            block_size: 8192,
        };
        let own = Ownership::of_data_dir(tgt.path()).unwrap();
        let mut source = crate::source::local::LocalSource::new(src.path());
        let mut progress = crate::progress::Terminal::new(false, false);
        let stats = execute(&plan, tgt.path(), &own, &mut source, &mut progress).unwrap();
        let changed: Vec<&str> = stats.changed.iter().map(String::as_str).collect();
        assert_eq!(changed, ["differs", "new", "shorter"]);
        for name in ["same", "differs", "new", "shorter"] {
            assert_eq!(
                fs::read(tgt.path().join(name)).unwrap(),
                fs::read(src.path().join(name)).unwrap(),
                "{name}"
            );
        }
    }
}
