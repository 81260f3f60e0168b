//! Carrying out a plan: what to fetch from the source, and the changes it makes to the target.
//!
//! The plan says, per path, what pg_rewind would do; this module does it through the one owner
//! of every change to the target ([`Target`]):
//! directories and tablespace links are created first, files are cut down, then every byte to
//! fetch (whole files, tails, changed blocks) is requested from the source in one batch, so a
//! remote source can keep its link full, and written at its 64-bit offset as it arrives. What
//! the source no longer has is not removed here: the rewind removes it meanwhile, on a thread of
//! its own ([`Target::start_removing`]).
//!
//! A whole-file copy writes only the pieces whose bytes differ from what the target already
//! holds at the same offset: configuration files, SLRUs and WAL segments from before the fork
//! are mostly identical, and a rewrite would only cost disk bandwidth. For the same reason a
//! piece of zeros is allocated as zeros rather than written ([`Target::write`]): the WAL
//! segment a backup window barely began is 16 MiB of them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use failback_common::chunkdiff::{self, ByteRange, ChunkHash, ChunkList, WHOLE_FILE};
use failback_common::filemap::{FileAction, FileType};
use failback_common::journal::JournalState;
use failback_common::plan::{PageMap, Plan, PlanEntry, Reason};
use failback_datadir::{hash_buffer, hash_ranges};
use serde::Serialize;

use crate::first_batch;
use crate::progress::Progress;
use crate::source::{FetchRange, Fetched, FileHashes, Source, SourceError, without};
use crate::target::{Target, TargetError, Written};

/// Why the plan could not be carried out: the source failed, or a change to the target did.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// What the copy did, for the report and tests.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CopyStats {
    pub bytes_fetched: u64,
    pub bytes_written: u64,
    /// Bytes of whole-file copies that were already identical on the target.
    pub bytes_identical: u64,
    /// Bytes fetched that were all zeros, allocated as zeros on the target rather than written
    /// (the WAL segment a backup window barely began is mostly these).
    pub bytes_zeroed: u64,
    pub files_vanished_on_source: u64,
    /// Whole-file copies whose chunks were compared by hash with the source's (ChunkHashes).
    pub files_hashed: u64,
    /// Bytes of those files that were not fetched because the target's chunk was the same.
    pub bytes_skipped_by_hashes: u64,
    /// Bytes a resumed run did not fetch because the interrupted one had written them.
    pub bytes_already_done: u64,
    /// Bytes of WAL written during the backup window a running source was copied in, fetched
    /// once it closed (counted in `bytes_fetched` too).
    pub window_wal_bytes: u64,
    /// Bytes of the source's changed blocks that had arrived, fetched ahead, when the copy
    /// began: the link's work while the target's WAL was read and the plan made (counted in
    /// `bytes_fetched` too).
    pub bytes_fetched_ahead: u64,
    /// The target's WAL segments past the end of its WAL renamed to future segments of the
    /// source's timeline at the commit, as PostgreSQL recycles segments, rather than removed.
    pub wal_segments_recycled: u64,
}

impl CopyStats {
    /// Adds what a further copy of the same run did.
    pub fn add(&mut self, more: &CopyStats) {
        self.bytes_fetched += more.bytes_fetched;
        self.bytes_written += more.bytes_written;
        self.bytes_identical += more.bytes_identical;
        self.bytes_zeroed += more.bytes_zeroed;
        self.files_vanished_on_source += more.files_vanished_on_source;
        self.files_hashed += more.files_hashed;
        self.bytes_skipped_by_hashes += more.bytes_skipped_by_hashes;
        self.bytes_already_done += more.bytes_already_done;
        self.window_wal_bytes += more.window_wal_bytes;
        self.bytes_fetched_ahead += more.bytes_fetched_ahead;
        self.wal_segments_recycled += more.wal_segments_recycled;
    }
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

/// The changed blocks of `page_map` as ranges, adjacent blocks together: what a plan fetches
/// of them.
pub fn changed_ranges(page_map: &PageMap, block_size: u32) -> Vec<FetchRange> {
    page_map
        .files
        .iter()
        .flat_map(|(path, blocks)| block_ranges(path, blocks.iter(), block_size))
        .collect()
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

/// Carries out `plan` on `target`, fetching from `source`, skipping what `done` (the journal of
/// an interrupted run) records as on the target already.
pub fn copy(
    plan: &Plan,
    target: &mut Target,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
    done: Option<&JournalState>,
) -> Result<CopyStats, CopyError> {
    let mut stats = CopyStats::default();

    // Whole copies of files the target has: only the chunks that differ, when the source can
    // say which. Asked first, before any change: a source that fails to answer leaves the
    // target as it was.
    let (diffs, hashed_sizes) = hash_diffs(plan, target.dir(), source, &mut stats)?;
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
        let (left, kept) = without(ranges, &d.done);
        stats.bytes_already_done += kept;
        ranges = left;
    }
    let total: u64 = ranges.iter().map(|r| r.length).sum();
    prepare(plan, target, done, &hashed_sizes).map_err(|e| e.needing(total))?;
    progress.total(total);
    // Whole copies of files the target has are written only where they differ, unless their
    // hashes already said which chunks do.
    let whole_copies: std::collections::HashSet<&str> = plan
        .entries
        .iter()
        .filter(|e| {
            e.action == FileAction::Copy && e.target.is_some() && !diffs.contains_key(&e.path)
        })
        .map(|e| e.path.as_str())
        .collect();

    fetch_into(
        source,
        ranges,
        target,
        &whole_copies,
        total,
        progress,
        &mut stats,
    )?;
    target.record_done()?;
    Ok(stats)
}

/// Pulls every piece of `ranges` from the source and hands it to the target.
fn fetch_into(
    source: &mut dyn Source,
    ranges: Vec<FetchRange>,
    target: &mut Target,
    whole_copies: &std::collections::HashSet<&str>,
    total: u64,
    progress: &mut dyn Progress,
    stats: &mut CopyStats,
) -> Result<(), CopyError> {
    let mut fetch = source.fetch(ranges)?;
    while let Some(piece) = fetch.next()? {
        let left = total.saturating_sub(stats.bytes_fetched);
        let applied = match piece {
            Fetched::Data { path, offset, data } => {
                let n = data.len() as u64;
                stats.bytes_fetched += n;
                progress.advance(n);
                target
                    .write(path, offset, data, whole_copies.contains(path))
                    .map(|w| match w {
                        Written::Written => stats.bytes_written += n,
                        Written::Identical => stats.bytes_identical += n,
                        Written::Zeroed => stats.bytes_zeroed += n,
                    })
            }
            Fetched::Short { path, size } => target.cut_short(path, size),
            Fetched::Vanished { path } => {
                stats.files_vanished_on_source += 1;
                target.remove_vanished(path)
            }
        };
        applied.map_err(|e| e.needing(left))?;
    }
    Ok(())
}

/// What comes before the fetch: directories and links are created, and files are cut down or
/// created empty.
fn prepare(
    plan: &Plan,
    target: &mut Target,
    done: Option<&JournalState>,
    hashed_sizes: &HashMap<String, HashedSizes>,
) -> Result<(), TargetError> {
    // Directories and links first, so that files below them can be written.
    for e in plan
        .entries
        .iter()
        .filter(|e| e.action == FileAction::Create)
    {
        let src = e.source.as_ref().expect("CREATE comes from a source entry");
        match src.file_type {
            FileType::Directory => target.create_dir(&e.path)?,
            FileType::Symlink => {
                target.create_symlink(&e.path, src.link_target.as_deref().unwrap_or_default())?
            }
            FileType::Regular => unreachable!("regular files are copied, not created"),
        }
    }

    // Files the source has less of: cut them down before anything is written into them.
    for e in &plan.entries {
        let source_len = e.source.as_ref().map_or(0, |s| s.size);
        match e.action {
            FileAction::Truncate => target.truncate(&e.path, source_len)?,
            // A whole copy ends at the source's size (as hashed, when it was); bytes past it
            // must go. A file hashed on both sides is known to hold no more than that (the
            // target is this run's alone) and is left alone: a resync's plan holds every
            // relation file of the cluster.
            FileAction::Copy if e.target.is_some() => {
                let hashed = hashed_sizes.get(&e.path);
                let len = source_len.min(hashed.map_or(u64::MAX, |h| h.source));
                if hashed.is_none_or(|h| h.target > len) {
                    target.truncate(&e.path, len)?
                }
            }
            // An interrupted run's part of the copy stays: only what it lacks is fetched.
            FileAction::Copy => {
                let resumed = done.is_some_and(|d| d.done.contains_key(&e.path));
                target.create_file(&e.path, resumed)?
            }
            _ => {}
        }
    }
    Ok(())
}

/// The ranges to fetch per file, and the sizes each side hashed per file.
type HashDiffs = (
    HashMap<String, Vec<ByteRange>>,
    HashMap<String, HashedSizes>,
);

/// A file's size as each side hashed it.
#[derive(Clone, Copy, Debug)]
struct HashedSizes {
    source: u64,
    target: u64,
}

/// The chunk size a whole copy of `e`, a file the target has, is compared in, if it can be:
/// page by page for a relation file whose changes on a side are unknown ([`Reason::Compared`]),
/// where pages changed at random leave few 64 KiB chunks alike but many pages (the hash lists
/// are then 0.4 % of the bytes they describe); [`HASH_CHUNK`] for the rest, and for a relation
/// file too long to be hashed by the page. failbackd hashes at most `MAX_HASHES_PER_FILE`
/// chunks of a file and refuses the whole request otherwise: a file over half that (room for a
/// live file to grow) is copied whole instead. `None` for a file shorter than a chunk, or one
/// copied whole anyway.
fn compare_chunk(e: &PlanEntry, block_size: u32) -> Option<u64> {
    if e.action != FileAction::Copy {
        return None;
    }
    let (src, tgt) = (e.source.as_ref()?.size, e.target.as_ref()?.size);
    let fits = |chunk: u64| {
        let most = chunk * failback_proto::limits::MAX_HASHES_PER_FILE;
        (chunk..=most / 2).contains(&src) && tgt >= chunk
    };
    let page = u64::from(block_size).max(failback_proto::limits::MIN_HASH_CHUNK);
    if e.reason == Some(Reason::Compared) && fits(page) {
        return Some(page);
    }
    fits(HASH_CHUNK).then_some(HASH_CHUNK)
}

/// Bytes of whole copies (relation files compared for want of their WAL aside) below which
/// they are fetched whole rather than compared by hashes first: the comparison is a round trip
/// before the copy can start writing (50 ms through a WAN, 40 ms on loopback where the source
/// is busy sending the blocks fetched ahead), and a mebibyte of free space maps, visibility
/// maps and SLRU pages crosses in less, compressed, on any link the copy is meant for. The
/// target still writes only the pieces that differ from what it holds ([`Target::write`]).
/// A stock pgbench rewind of 1 % at scale 100 hashes one file, `pgbench_accounts`' 352 KiB
/// free space map.
pub const HASHING_PAYS: u64 = 1 << 20;

/// The whole copies to compare by hashes, and the chunk each is compared in
/// ([`compare_chunk`]): every relation file compared for want of its WAL, and the other
/// files only when they add up to more than [`HASHING_PAYS`].
fn to_compare(plan: &Plan) -> Vec<(&PlanEntry, u64)> {
    let all: Vec<(&PlanEntry, u64)> = plan
        .entries
        .iter()
        .filter_map(|e| compare_chunk(e, plan.block_size).map(|c| (e, c)))
        .collect();
    let others: u64 = all
        .iter()
        .filter(|(e, _)| e.reason != Some(Reason::Compared))
        .filter_map(|(e, _)| e.source.as_ref().map(|s| s.size))
        .sum();
    if others > HASHING_PAYS {
        return all;
    }
    all.into_iter()
        .filter(|(e, _)| e.reason == Some(Reason::Compared))
        .collect()
}

/// For each whole-file copy of a file the target has (at least one chunk long), the ranges
/// that differ from the source's, by comparing the source's chunk hashes with the target's
/// (in the chunks [`compare_chunk`] picks), and the sizes both sides hashed: the target file
/// must be cut to the source's, so that skipped chunks and fetched ranges together make the
/// source's file. Changes nothing.
///
/// A file compared page by page is compared in two rounds where the source hashes byte ranges
/// ([`Source::hashes_ranges`]): a mebibyte at a time ([`COARSE_CHUNK`]), then page by page
/// within the mebibytes that differ ([`refine`]). A resync of a terabyte whose divergence is a
/// few tables then moves a million hashes, not 128 million: 32 MB, not 4 GB, and as little
/// memory and CPU for them on both ends.
///
/// The files are compared a batch at a time, each batch at most [`HASHES_IN_MEMORY`] chunks
/// (the source's sizes say how many), so that the hash lists in memory stay bounded however
/// large the cluster.
fn hash_diffs(
    plan: &Plan,
    pgdata: &Path,
    source: &mut dyn Source,
    stats: &mut CopyStats,
) -> Result<HashDiffs, CopyError> {
    let mut diffs = HashMap::new();
    let mut sizes = HashMap::new();
    // The chunk of the first round and of a second round if any.
    type Rounds = (u64, Option<u64>);
    // Files (and their chunks in the first round) by rounds.
    let mut groups: BTreeMap<Rounds, Vec<(String, u64)>> = BTreeMap::new();
    let two_rounds = source.hashes_ranges();
    for (e, chunk) in to_compare(plan) {
        if let Some(src) = &e.source {
            // Page by page is the one comparison in chunks smaller than HASH_CHUNK.
            let key = if two_rounds && chunk < HASH_CHUNK && src.size > COARSE_CHUNK {
                (COARSE_CHUNK, Some(chunk))
            } else {
                (chunk, None)
            };
            groups
                .entry(key)
                .or_default()
                .push((e.path.clone(), src.size.div_ceil(key.0)));
        }
    }
    let algorithm = source.chunk_hash_algorithm();
    for (&(chunk, fine), files) in &groups {
        let mut batch: Vec<String> = Vec::new();
        let mut in_batch = 0u64;
        for (i, (path, chunks)) in files.iter().enumerate() {
            batch.push(path.clone());
            in_batch += chunks;
            let last = i + 1 == files.len();
            if !last && in_batch + files[i + 1].1 <= HASHES_IN_MEMORY {
                continue;
            }
            let compared =
                compare_batch(&batch, chunk, algorithm, pgdata, source, stats, &mut sizes)?;
            let Some(mut compared) = compared else {
                // A source that cannot hash (or no longer will) leaves the whole copies not
                // yet compared whole.
                return Ok((diffs, sizes));
            };
            if let Some(fine) = fine {
                refine(&mut compared, fine, algorithm, pgdata, source, stats)?;
            }
            diffs.extend(compared);
            batch.clear();
            in_batch = 0;
        }
    }
    Ok((diffs, sizes))
}

/// Hash lists held at once while comparing, per side: 2^20 chunks, 32 MiB of hashes (8 GiB of
/// relation files compared page by page). A single larger file is compared on its own.
const HASHES_IN_MEMORY: u64 = 1 << 20;

/// The chunk of the first round of a comparison page by page: a mebibyte (128 pages), whose
/// hash list is 0.003 % of the bytes it describes, against 0.4 % for pages.
const COARSE_CHUNK: u64 = 1 << 20;

/// The most ranges of one file asked in one go in a second round; a file with more is asked
/// in several pieces (in the same request or the next).
const RANGES_PER_ASK: usize = 1024;

/// The second round of a comparison: within the coarse ranges `diffs` holds per file (the
/// first round's differences), the `fine`-byte chunks that differ, the target's hashed while
/// the source hashes its own, in batches of at most [`HASHES_IN_MEMORY`] chunks. A file the
/// source cannot hash by ranges now (or that vanished) keeps its coarse ranges: it is
/// fetched by the mebibyte.
fn refine(
    diffs: &mut HashMap<String, Vec<ByteRange>>,
    fine: u64,
    algorithm: ChunkHash,
    pgdata: &Path,
    source: &mut dyn Source,
    stats: &mut CopyStats,
) -> Result<(), CopyError> {
    let mut asks: Vec<(String, Vec<ByteRange>)> = Vec::new();
    for (path, ranges) in diffs.iter() {
        for piece in ranges.chunks(RANGES_PER_ASK) {
            asks.push((path.clone(), piece.to_vec()));
        }
    }
    asks.sort_unstable_by(|a, b| (&a.0, a.1[0].offset).cmp(&(&b.0, b.1[0].offset)));
    let mut refined: HashMap<String, Vec<ByteRange>> = HashMap::new();
    let mut rest = asks.as_slice();
    while !rest.is_empty() {
        let batch;
        (batch, rest) = first_batch(rest, HASHES_IN_MEMORY, |(_, r)| {
            chunkdiff::chunks_within(r, fine, u64::MAX).unwrap_or(0)
        });
        let (answers, local) = std::thread::scope(|scope| {
            let local = scope.spawn(|| {
                let mut buf = hash_buffer(fine);
                batch
                    .iter()
                    .map(|(p, r)| hash_local(algorithm, &pgdata.join(p), fine, r, &mut buf))
                    .collect::<Vec<_>>()
            });
            let answers = source.range_hashes(batch, fine);
            let local = local
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (answers, local)
        });
        let answers = answers?.unwrap_or_default();
        for (i, ((path, ranges), hashed)) in batch.iter().zip(local).enumerate() {
            let list = refined.entry(path.clone()).or_default();
            let Some(h) = answers.get(i).filter(|h| !h.vanished && h.path == *path) else {
                list.extend_from_slice(ranges);
                continue;
            };
            let mine = in_its_function(hashed, h, algorithm, pgdata, fine, ranges)?;
            let (theirs, mine) = lists(h, &mine);
            let fetch = chunkdiff::ranges_to_fetch_within(fine, ranges, &theirs, &mine);
            let length = |r: &[ByteRange]| r.iter().map(|r| r.length).sum::<u64>();
            stats.bytes_skipped_by_hashes += length(ranges).saturating_sub(length(&fetch));
            list.extend(fetch);
        }
    }
    diffs.extend(refined);
    Ok(())
}

/// [`hash_diffs`] for one batch of files of `chunk`-byte chunks: the target's hashes computed
/// while the source computes its own (a round trip and the source's reading), not after, with
/// the function the source says it hashes with. `None` when the source cannot hash.
fn compare_batch(
    paths: &[String],
    chunk: u64,
    algorithm: ChunkHash,
    pgdata: &Path,
    source: &mut dyn Source,
    stats: &mut CopyStats,
    sizes: &mut HashMap<String, HashedSizes>,
) -> Result<Option<HashMap<String, Vec<ByteRange>>>, CopyError> {
    let (answers, mut local) = std::thread::scope(|scope| {
        let local = scope.spawn(|| {
            let mut buf = hash_buffer(chunk);
            paths
                .iter()
                .map(|p| {
                    let hashed =
                        hash_local(algorithm, &pgdata.join(p), chunk, &[WHOLE_FILE], &mut buf);
                    (p.clone(), hashed)
                })
                .collect::<HashMap<_, _>>()
        });
        let answers = source.chunk_hashes(paths, chunk);
        let local = local
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (answers, local)
    });
    let Some(answers) = answers? else {
        return Ok(None);
    };
    let mut diffs = HashMap::new();
    for h in answers {
        // A vanished file is fetched as planned, and the fetch reports it gone.
        if h.vanished {
            continue;
        }
        let Some(hashed) = local.remove(&h.path) else {
            continue;
        };
        let mine = in_its_function(hashed, &h, algorithm, pgdata, chunk, &[WHOLE_FILE])?;
        let (theirs, mine) = lists(&h, &mine);
        let ranges = chunkdiff::ranges_to_fetch(chunk, &theirs, &mine);
        let fetched: u64 = ranges.iter().map(|r| r.length).sum();
        stats.files_hashed += 1;
        stats.bytes_skipped_by_hashes += h.size.saturating_sub(fetched);
        sizes.insert(
            h.path.clone(),
            HashedSizes {
                source: h.size,
                target: mine.size,
            },
        );
        diffs.insert(h.path, ranges);
    }
    Ok(Some(diffs))
}

/// The target's hashes (`hashed`, its size and hashes as [`hash_local`] gives them) to compare
/// with the source's answer `h`: as computed, by the function the source announced, or
/// computed again where it answered in another, as hashes of two functions never compare
/// equal.
fn in_its_function(
    hashed: Result<(u64, Vec<[u8; 32]>), TargetError>,
    h: &FileHashes,
    announced: ChunkHash,
    pgdata: &Path,
    chunk: u64,
    ranges: &[ByteRange],
) -> Result<(u64, Vec<[u8; 32]>), TargetError> {
    if h.algorithm == announced {
        return hashed;
    }
    let mut buf = hash_buffer(chunk);
    hash_local(h.algorithm, &pgdata.join(&h.path), chunk, ranges, &mut buf)
}

/// The source's answer and the target's hashes as the two lists a comparison takes.
fn lists<'a>(
    h: &'a FileHashes,
    (size, hashes): &'a (u64, Vec<[u8; 32]>),
) -> (ChunkList<'a>, ChunkList<'a>) {
    (
        ChunkList {
            size: h.size,
            hashes: &h.hashes,
        },
        ChunkList {
            size: *size,
            hashes,
        },
    )
}

/// The target's own hashes by `algorithm` of the chunks within `ranges` of the file at `path`,
/// and its size as hashed.
fn hash_local(
    algorithm: ChunkHash,
    path: &Path,
    chunk: u64,
    ranges: &[ByteRange],
    buf: &mut [u8],
) -> Result<(u64, Vec<[u8; 32]>), TargetError> {
    let f = File::open(path).map_err(|e| TargetError::io("open", path, None, e))?;
    hash_ranges(algorithm, &f, chunk as usize, buf, ranges, u64::MAX).map_err(|e| match e {
        failback_datadir::HashError::Io(e) => TargetError::io("read", path, None, e),
        e => TargetError::io("read", path, None, std::io::Error::other(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(path: &str, src: u64, tgt: Option<u64>) -> failback_common::plan::PlanEntry {
        let file = |size| failback_common::filemap::FileEntry::regular(path, size);
        failback_common::plan::PlanEntry::new(
            path,
            FileAction::Copy,
            Some(file(src)),
            tgt.map(file),
        )
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

    // Whole copies are compared by hashes when they add up to more than a mebibyte; below,
    // they are fetched whole, but relation files of unknown changes are compared whatever
    // their size.
    #[test]
    fn small_whole_copies_are_fetched_not_hashed() {
        let fsm = copy("base/5/16396_fsm", 352 << 10, Some(352 << 10));
        let xact = copy("pg_xact/0000", 256 << 10, Some(256 << 10));
        let wal = copy("pg_wal/000000010000000000000003", 16 << 20, Some(16 << 20));
        let mut rel = copy("base/5/16384", 256 << 10, Some(256 << 10));
        rel.reason = Some(Reason::Compared);
        let compared = |entries: &[&PlanEntry]| {
            let plan = Plan {
                entries: entries.iter().map(|&e| e.clone()).collect(),
                block_size: 8192,
            };
            to_compare(&plan)
                .into_iter()
                .map(|(e, _)| e.path.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(compared(&[&fsm, &xact]), Vec::<String>::new());
        assert_eq!(compared(&[&fsm, &rel]), ["base/5/16384"]);
        assert_eq!(
            compared(&[&fsm, &xact, &wal]),
            [
                "base/5/16396_fsm",
                "pg_xact/0000",
                "pg_wal/000000010000000000000003"
            ]
        );
        let mut many: Vec<PlanEntry> = (0..5)
            .map(|i| copy(&format!("base/5/{i}_fsm"), 256 << 10, Some(256 << 10)))
            .collect();
        many.push(rel.clone());
        assert_eq!(compared(&many.iter().collect::<Vec<_>>()).len(), 6);
    }

    #[test]
    fn relation_files_of_unknown_changes_are_compared_page_by_page() {
        let compared = |src, tgt| {
            let mut e = copy("base/5/16384", src, tgt);
            e.reason = Some(Reason::Compared);
            e
        };
        let gib = 1u64 << 30;
        // A whole segment, and one grown past what failbackd hashes by the page with room to
        // grow: 64 KiB chunks then.
        assert_eq!(compare_chunk(&compared(gib, Some(gib)), 8192), Some(8192));
        assert_eq!(
            compare_chunk(&compared(gib + 1, Some(gib)), 8192),
            Some(HASH_CHUNK)
        );
        // 32 KiB pages; pages under failbackd's smallest chunk are compared in those.
        assert_eq!(
            compare_chunk(&compared(1 << 20, Some(1 << 20)), 32768),
            Some(32768)
        );
        assert_eq!(
            compare_chunk(&compared(1 << 20, Some(1 << 20)), 1024),
            Some(4096)
        );
        // Shorter than a page on either side, or not on the target: copied whole.
        assert_eq!(compare_chunk(&compared(8192, Some(4096)), 8192), None);
        assert_eq!(compare_chunk(&compared(4096, Some(8192)), 8192), None);
        assert_eq!(compare_chunk(&compared(8192, None), 8192), None);
        // Other whole copies: 64 KiB chunks, from one chunk on.
        assert_eq!(
            compare_chunk(&copy("pg_xact/0000", 1 << 18, Some(1 << 18)), 8192),
            Some(HASH_CHUNK)
        );
        assert_eq!(
            compare_chunk(&copy("base/5/16384", 8192, Some(8192)), 8192),
            None
        );
        let mut tail = compared(1 << 20, Some(8192));
        tail.action = FileAction::CopyTail;
        assert_eq!(compare_chunk(&tail, 8192), None);
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
}
