//! The rewind plan: a pure function from both sides' facts to a list of file actions.
//!
//! The target must end up as a copy of the source that WAL replay can make consistent. Most of
//! the two data directories is the same: both replayed the same WAL up to the point where their
//! histories part. What differs is what either side changed since, and only that is copied:
//!
//! - **Relation files** (main-fork segments): the blocks either side's WAL names since the
//!   divergence ([`Changes`]: the target's from its own WAL, the source's from its own, or none
//!   of the source's when the rewound node replays its WAL since the divergence), within
//!   both files (a block past either end is handled by the file's truncate or tail copy), and
//!   whole the relations either side created since (their contents at the same offsets differ in
//!   ways no block reference names). When one side's changes are unknown (its WAL since the
//!   divergence is gone), every relation file both sides have is compared whole, chunk by chunk
//!   ([`Reason::Compared`]).
//! - **Other files** are pg_rewind's business ([`crate::filemap`]): copied whole (and compared
//!   chunk by chunk by the copy), created, removed.
//! - **WAL**: none of the source's WAL from before the copy is needed. The rewound node replays
//!   only what makes the copy consistent: the WAL of the backup window a running source was
//!   copied in (fetched once the window closes, outside the plan), or, from a shut-down source,
//!   the WAL from its last checkpoint's redo pointer to where its WAL ends. A window that starts
//!   at the last checkpoint before the divergence (pg_rewind's way, for a source whose changes
//!   only its WAL can name) replays the source's WAL from the divergence on; the segments of it
//!   already complete are copied with the rest. Those the plan copies are `replay_wal`
//!   ([`Reason::Replayed`]); other source segments are not copied ([`Reason::NotReplayed`]);
//!   target segments holding WAL past the divergence point hold the old primary's lost writes
//!   and are removed ([`Reason::PastDivergence`]), older ones are left alone. Those wholly
//!   past the end of the target's WAL hold none of it: PostgreSQL recycles a segment it no
//!   longer needs by renaming it to a future segment's name (`RemoveXlogFile`,
//!   `InstallXLogFileSegment` in `src/backend/access/transam/xlog.c`), and when it switches
//!   timelines it recycles the old timeline's segments past the switch as the new one's
//!   (`RemoveNonParentXlogFiles`). The plan does the same ([`Reason::Recycled`]): such a
//!   segment is renamed at the commit to a future segment of the source's timeline rather than
//!   removed, so that the rewind does not pay for dropping its cached pages and the rewound
//!   node for allocating new ones; one with a `.ready` status file is removed as before.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::PgMajor;
use crate::changes::Changes;
use crate::filemap::{self, FileAction, FileEntry, FileMapError, FileType};
use crate::lsn::{Lsn, XLogSegNo, parse_wal_file_name, segment_start};
use crate::relpath::{self, ForkNumber, RelFileLocator};

/// Blocks of one relation segment file, as a bitmap over block numbers within the segment
/// (pg_rewind's `datapagemap_t`): memory grows with the highest changed block, not the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockBitmap {
    words: Vec<u64>,
}

impl BlockBitmap {
    pub fn insert(&mut self, blk: u32) {
        let w = (blk / 64) as usize;
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (blk % 64);
    }

    /// The bitmap as little-endian 64-bit words (the wire form of `ChangedFile.block_bitmap`).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let used = self
            .words
            .iter()
            .rposition(|w| *w != 0)
            .map_or(0, |i| i + 1);
        self.words[..used]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    /// A bitmap from little-endian 64-bit words; `None` unless whole words.
    pub fn from_le_bytes(bytes: &[u8]) -> Option<BlockBitmap> {
        if !bytes.len().is_multiple_of(8) {
            return None;
        }
        Some(BlockBitmap {
            words: bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("eight bytes")))
                .collect(),
        })
    }

    /// Adds every block of `other`.
    pub fn union_with(&mut self, other: &BlockBitmap) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    pub fn contains(&self, blk: u32) -> bool {
        self.words
            .get((blk / 64) as usize)
            .is_some_and(|w| w & (1 << (blk % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Block numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u32 * 64 + bit)
            })
        })
    }
}

/// The page map: relation segment file path → changed blocks within it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageMap {
    pub files: BTreeMap<String, BlockBitmap>,
}

impl PageMap {
    pub fn insert(&mut self, path: &str, blk_in_segment: u32) {
        if let Some(b) = self.files.get_mut(path) {
            b.insert(blk_in_segment);
        } else {
            let mut b = BlockBitmap::default();
            b.insert(blk_in_segment);
            self.files.insert(path.to_string(), b);
        }
    }

    pub fn block_count(&self) -> usize {
        self.files.values().map(BlockBitmap::len).sum()
    }
}

/// The main-fork blocks WAL block references name, gathered as WAL names them (relation and
/// segment number) and turned into file paths once, at the end: a scan sees a block reference
/// per record, most of them to a few relations, and a path built and looked up for each was
/// over a third of the scan's time. The keys are a few integers of a trusted local WAL, so
/// a fast hash rather than a DoS-resistant one (SipHash took a quarter of the scan).
///
/// Even that hash, with its lookup, was a sixteenth of a scan's CPU: the last few keys used are
/// therefore kept beside it and compared first. A workload touches few relations at a time (a
/// pgbench run's million block references named 17 relation segments, and the last 8 used
/// held the next one's key all but 0.01 % of the time), and comparing 8 keys costs less than
/// hashing one.
#[derive(Clone, Debug, Default)]
pub struct ChangedBlocks {
    /// Each segment's blocks, in the order first named.
    segments: Vec<(SegmentKey, BlockBitmap)>,
    /// Where each key's entry is in `segments`.
    index: HashMap<SegmentKey, usize, rustc_hash::FxBuildHasher>,
    /// Some keys used lately ([`packed`]) and their entries, replaced in turn.
    recent: Vec<(u128, usize)>,
    /// The slot of `recent` the next key not found there replaces.
    replace: usize,
}

/// A relation's main-fork segment: its locator and segment number.
type SegmentKey = (RelFileLocator, u32);

/// A key as one integer: compared in two instructions rather than four.
#[inline]
fn packed((l, segno): SegmentKey) -> u128 {
    u128::from(l.spcOid)
        | u128::from(l.dbOid) << 32
        | u128::from(l.relNumber) << 64
        | u128::from(segno) << 96
}

/// How many keys [`ChangedBlocks`] compares before hashing.
const RECENT_KEYS: usize = 8;

impl ChangedBlocks {
    /// Block `blkno` of `locator`'s main fork, in segments of `relseg_size` blocks
    /// (`RELSEG_SIZE`; 0 ignores the block, as no file can hold it).
    #[inline]
    pub fn insert(&mut self, locator: RelFileLocator, blkno: u32, relseg_size: u32) {
        if let Some((segno, in_seg)) = relpath::block_segment(blkno, relseg_size) {
            self.entry((locator, segno)).insert(in_seg);
        }
    }

    /// The blocks of `key`'s segment, added empty if it had none.
    #[inline]
    fn entry(&mut self, key: SegmentKey) -> &mut BlockBitmap {
        let wanted = packed(key);
        let at = match self.recent.iter().find(|(k, _)| *k == wanted) {
            Some(&(_, at)) => at,
            None => self.look_up(key),
        };
        &mut self.segments[at].1
    }

    /// [`Self::entry`] for a key not among the recent ones: its index, made recent.
    #[cold]
    fn look_up(&mut self, key: SegmentKey) -> usize {
        let next = self.segments.len();
        let at = *self.index.entry(key).or_insert(next);
        if at == next {
            self.segments.push((key, BlockBitmap::default()));
        }
        if self.recent.len() < RECENT_KEYS {
            self.recent.push((packed(key), at));
        } else {
            self.recent[self.replace] = (packed(key), at);
            self.replace = (self.replace + 1) % RECENT_KEYS;
        }
        at
    }

    /// The page map: each segment's blocks under its file's path for `major`.
    pub fn into_page_map(self, major: PgMajor) -> PageMap {
        PageMap {
            files: self
                .segments
                .into_iter()
                .map(|((loc, segno), blocks)| {
                    (
                        relpath::segment_path(loc, ForkNumber::Main, segno, major),
                        blocks,
                    )
                })
                .collect(),
        }
    }

    /// Adds every block of `other`.
    pub fn union_with(&mut self, other: &ChangedBlocks) {
        for (key, blocks) in &other.segments {
            self.entry(*key).union_with(blocks);
        }
    }
}

/// Everything the planner decides from.
pub struct PlanInput<'a> {
    pub source: &'a [FileEntry],
    pub target: &'a [FileEntry],
    /// What may differ in relation files: both sides' changes since the divergence, or `None`
    /// when a side's are unknown (then every relation file both sides have is compared whole).
    pub changes: Option<&'a Changes>,
    /// The relation a path is a main-fork segment of (`isRelDataFile`), if it is one.
    pub relation_of: &'a dyn Fn(&str) -> Option<RelFileLocator>,
    pub block_size: u32,
    pub wal_segment_size: u32,
    /// Where the histories part: target WAL segments ending past it hold lost writes.
    pub divergence: Lsn,
    /// The source WAL segments (first and last, inclusive) the rewound node replays, copied
    /// with the rest: a shut-down source's, or those complete when a window opened at the last
    /// common checkpoint. `None` for a running source whose window's WAL is all fetched once
    /// the window closes.
    pub replay_wal: Option<(XLogSegNo, XLogSegNo)>,
    /// Where the target's WAL ends, when known: target segments past the divergence that
    /// begin at or after it are recycled ([`Reason::Recycled`]) rather than removed. `None`
    /// removes them all.
    pub target_wal_end: Option<Lsn>,
}

/// Why an entry's action is not pg_rewind's: what the plan decided, kept as data (the journal
/// stores it), so that a resumed rewind acts on it exactly as the run that planned it would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A relation file created since the divergence on either side, or of a database copied
    /// from a template since: copied whole.
    CreatedSince,
    /// A relation file compared whole, chunk by chunk: a side's changes are unknown.
    Compared,
    /// A target WAL segment holding WAL past the divergence point (the old primary's lost
    /// writes): removed.
    PastDivergence,
    /// A source WAL segment the rewound node does not replay: not copied.
    NotReplayed,
    /// `postgresql.auto.conf`: it carries the marker of an unfinished rewind, so it is written
    /// once, at the end of the commit, not copied with the rest.
    WrittenAtCommit,
    /// A target WAL segment from before the divergence that the source lacks (pg_rewind removes
    /// it): the target's own history, neither replayed nor in the way, so left alone.
    BeforeDivergence,
    /// A source WAL segment the rewound node replays, complete when the plan was made: copied
    /// with the rest, not again when the copy is committed.
    Replayed,
    /// A target WAL segment wholly past the end of its WAL (one PostgreSQL recycled or
    /// allocated ahead of use): renamed at the commit to a future segment of the source's
    /// timeline, as PostgreSQL recycles segments, rather than removed.
    Recycled,
}

impl Reason {
    /// Every reason, in the order of their journal codes (1, 2, ...).
    pub const ALL: [Reason; 8] = [
        Reason::CreatedSince,
        Reason::Compared,
        Reason::PastDivergence,
        Reason::NotReplayed,
        Reason::WrittenAtCommit,
        Reason::BeforeDivergence,
        Reason::Replayed,
        Reason::Recycled,
    ];

    /// The words `--debug` shows after the entry.
    pub fn text(self) -> &'static str {
        match self {
            Reason::CreatedSince => "created since the divergence: copied whole",
            Reason::Compared => "a side's changes are unknown: compared whole",
            Reason::PastDivergence => "holds WAL past the divergence point: removed",
            Reason::NotReplayed => "WAL the rewound node does not replay: not copied",
            Reason::WrittenAtCommit => "written at the end of the commit",
            Reason::BeforeDivergence => "the target's own WAL from before the divergence: kept",
            Reason::Replayed => "WAL the rewound node replays: copied",
            Reason::Recycled => {
                "past the end of the target's WAL: recycled as a future segment of the source's timeline"
            }
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

/// The configuration file `ALTER SYSTEM` writes, which carries the marker of an unfinished
/// rewind: the rewind writes it last ([`Reason::WrittenAtCommit`]).
pub const AUTO_CONF: &str = "postgresql.auto.conf";

/// A WAL segment's number, when `path` names one (`pg_wal/<24 hex digits>`).
fn wal_segment(path: &str, wal_segment_size: u32) -> Option<XLogSegNo> {
    path.strip_prefix("pg_wal/")
        .and_then(|name| parse_wal_file_name(name, wal_segment_size))
        .map(|(_, segno)| segno)
}

/// One path's part of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlanEntry {
    pub path: String,
    pub action: FileAction,
    pub source: Option<FileEntry>,
    pub target: Option<FileEntry>,
    /// Changed blocks within the file to fetch from the source (block numbers in the segment).
    #[serde(skip)]
    pub blocks: BlockBitmap,
    /// Why the action is not pg_rewind's, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

impl PlanEntry {
    /// An entry as pg_rewind decides it: `action` on `path`, with no blocks and no reason of
    /// failback's.
    pub fn new(
        path: &str,
        action: FileAction,
        source: Option<FileEntry>,
        target: Option<FileEntry>,
    ) -> PlanEntry {
        PlanEntry {
            path: path.to_string(),
            action,
            source,
            target,
            blocks: BlockBitmap::default(),
            reason: None,
        }
    }

    /// Bytes this entry fetches from the source.
    pub fn fetch_bytes(&self, block_size: u32) -> u64 {
        let blocks = self.blocks.len() as u64 * u64::from(block_size);
        let src = self.source.as_ref().map_or(0, |s| s.size);
        let tgt = self.target.as_ref().map_or(0, |t| t.size);
        blocks
            + match self.action {
                FileAction::Copy => src,
                FileAction::CopyTail => src.saturating_sub(tgt),
                _ => 0,
            }
    }
}

/// Files and bytes per action.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ActionTotals {
    pub files: u64,
    pub bytes: u64,
}

/// The whole plan, in execution order.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub entries: Vec<PlanEntry>,
    pub block_size: u32,
}

impl Plan {
    /// Totals per action name; blocks fetched for unchanged-size files count under "BLOCKS".
    pub fn totals(&self) -> BTreeMap<&'static str, ActionTotals> {
        let mut t: BTreeMap<&'static str, ActionTotals> = BTreeMap::new();
        for e in &self.entries {
            let bytes =
                e.fetch_bytes(self.block_size) - e.blocks.len() as u64 * u64::from(self.block_size);
            let a = t.entry(e.action.name()).or_default();
            a.files += 1;
            a.bytes += match e.action {
                FileAction::Truncate => e
                    .target
                    .as_ref()
                    .map_or(0, |t| t.size)
                    .saturating_sub(e.source.as_ref().map_or(0, |s| s.size)),
                FileAction::Remove => e.target.as_ref().map_or(0, |t| t.size),
                _ => bytes,
            };
            if !e.blocks.is_empty() {
                let b = t.entry("BLOCKS").or_default();
                b.files += 1;
                b.bytes += e.blocks.len() as u64 * u64::from(self.block_size);
            }
        }
        t
    }

    /// Bytes to fetch from the source in all.
    pub fn fetch_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.fetch_bytes(self.block_size))
            .sum()
    }
}

/// Builds the plan: pg_rewind's decisions, then the changes, then the WAL, then the order of
/// execution.
pub fn make_plan(input: &PlanInput<'_>) -> Result<Plan, FileMapError> {
    let mut paths: BTreeMap<&str, (Option<&FileEntry>, Option<&FileEntry>)> = BTreeMap::new();
    for s in input.source {
        paths.entry(&s.path).or_default().0 = Some(s);
    }
    for t in input.target {
        paths.entry(&t.path).or_default().1 = Some(t);
    }
    let seg_size = u64::from(input.wal_segment_size);
    // The segments waiting to be archived (`pg_wal/archive_status/<segment>.ready`).
    let ready: HashSet<&str> = input
        .target
        .iter()
        .filter_map(|t| {
            t.path
                .strip_prefix("pg_wal/archive_status/")?
                .strip_suffix(".ready")
        })
        .collect();
    let mut entries = Vec::with_capacity(paths.len());
    for (path, (source, target)) in paths {
        let relation = (input.relation_of)(path);
        if relation.is_some() && source.is_some_and(|s| s.file_type != FileType::Regular) {
            return Err(FileMapError::RelationNotRegular { path: path.into() });
        }
        let mut entry = PlanEntry::new(
            path,
            filemap::decide_file_action(path, source, target, relation.is_some())?,
            source.cloned(),
            target.cloned(),
        );
        let both_regular = source.is_some_and(|s| s.file_type == FileType::Regular)
            && target.is_some_and(|t| t.file_type == FileType::Regular);
        if let Some(locator) = relation
            && both_regular
        {
            match input.changes {
                None => {
                    entry.action = FileAction::Copy;
                    entry.reason = Some(Reason::Compared);
                }
                Some(c) if c.copies_whole(locator) => {
                    entry.action = FileAction::Copy;
                    entry.reason = Some(Reason::CreatedSince);
                }
                Some(c) => {
                    if let Some(changed) = c.page_map.files.get(path) {
                        let limit = entry_sizes(&entry).0.min(entry_sizes(&entry).1);
                        for blk in changed.iter() {
                            if (u64::from(blk) + 1) * u64::from(input.block_size) <= limit {
                                entry.blocks.insert(blk);
                            }
                        }
                    }
                }
            }
        }
        if let Some(segno) = wal_segment(path, input.wal_segment_size) {
            let replayed = input
                .replay_wal
                .is_some_and(|(first, last)| (first..=last).contains(&segno));
            match (source.is_some(), target.is_some()) {
                (true, _) if replayed => entry.reason = Some(Reason::Replayed),
                (true, _) => {
                    entry.action = FileAction::None;
                    entry.reason = Some(Reason::NotReplayed);
                }
                (false, true)
                    if segment_start(segno, input.wal_segment_size).0 + seg_size
                        > input.divergence.0 =>
                {
                    if recyclable(path, segno, target, input, &ready) {
                        entry.action = FileAction::None;
                        entry.reason = Some(Reason::Recycled);
                    } else {
                        entry.action = FileAction::Remove;
                        entry.reason = Some(Reason::PastDivergence);
                    }
                }
                (false, true) => {
                    entry.action = FileAction::None;
                    entry.reason = Some(Reason::BeforeDivergence);
                }
                (false, false) => {}
            }
        }
        if path == AUTO_CONF && entry.action != FileAction::None {
            entry.action = FileAction::None;
            entry.reason = Some(Reason::WrittenAtCommit);
        }
        entries.push(entry);
    }
    entries.sort_by(|a, b| filemap::execution_order((&a.path, a.action), (&b.path, b.action)));
    Ok(Plan {
        entries,
        block_size: input.block_size,
    })
}

/// Whether target WAL segment `segno` at `path`, past the divergence, can be recycled rather
/// than removed: it begins where the target's WAL has ended, so it holds none of it; it is a
/// whole regular file (PostgreSQL recycles no symbolic link); and no `.ready` file asks for it
/// to be archived (`RemoveNonParentXlogFiles` leaves those to the archiver).
fn recyclable(
    path: &str,
    segno: XLogSegNo,
    target: Option<&FileEntry>,
    input: &PlanInput<'_>,
    ready: &HashSet<&str>,
) -> bool {
    let Some(end) = input.target_wal_end else {
        return false;
    };
    let whole = target.is_some_and(|t| {
        t.file_type == FileType::Regular && t.size == u64::from(input.wal_segment_size)
    });
    whole
        && segment_start(segno, input.wal_segment_size) >= end
        && !ready.contains(&path["pg_wal/".len()..])
}

/// (source size, target size) of an entry, 0 for a side without the file.
fn entry_sizes(e: &PlanEntry) -> (u64, u64) {
    (
        e.source.as_ref().map_or(0, |s| s.size),
        e.target.as_ref().map_or(0, |t| t.size),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn reg(path: &str, size: u64) -> FileEntry {
        FileEntry::regular(path, size)
    }

    /// The same map as building each block's path with `relpath::block_path` and inserting it.
    #[test]
    fn changed_blocks_become_the_page_map_of_their_segment_files() {
        let relseg = 131072;
        let refs = [
            (RelFileLocator::new(1663, 5, 16384), 0),
            (RelFileLocator::new(1663, 5, 16384), 3),
            (RelFileLocator::new(1663, 5, 16384), 3),
            (RelFileLocator::new(1663, 5, 16384), relseg + 7),
            (RelFileLocator::new(1664, 0, 1262), 1),
            (RelFileLocator::new(16500, 5, 16390), u32::MAX),
        ];
        for major in [PgMajor::V13, PgMajor::V18] {
            let mut cb = ChangedBlocks::default();
            let mut want = PageMap::default();
            for (loc, blk) in refs {
                cb.insert(loc, blk, relseg);
                let (path, off) =
                    relpath::block_path(loc, ForkNumber::Main, blk, relseg, 8192, major).unwrap();
                want.insert(&path, (off / 8192) as u32);
            }
            let got = cb.into_page_map(major);
            assert_eq!(got.files, want.files);
            assert_eq!(got.block_count(), 5);
            assert!(
                got.files.contains_key("base/5/16384.1"),
                "{:?}",
                got.files.keys()
            );
        }
        let mut none = ChangedBlocks::default();
        none.insert(RelFileLocator::new(1663, 5, 16384), 1, 0);
        assert!(none.into_page_map(PgMajor::V15).files.is_empty());
    }

    /// More relations than the keys compared before hashing, named in turns and at random,
    /// and joined from two halves: every block lands in its own segment's bitmap.
    #[test]
    fn changed_blocks_past_the_recent_keys() {
        let relseg = 1000;
        let mut want: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        let (mut first, mut second) = (ChangedBlocks::default(), ChangedBlocks::default());
        let mut x: u32 = 12345;
        for i in 0..5000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            // Runs over a few relations, then jumps among 3 * RECENT_KEYS of them.
            let rel = if i % 500 < 250 {
                i % 3
            } else {
                (x >> 8) % (3 * RECENT_KEYS as u32)
            };
            let loc = RelFileLocator::new(1663, 5, 16384 + rel);
            let blk = (x >> 4) % 2500;
            let half = if i % 7 < 4 { &mut first } else { &mut second };
            half.insert(loc, blk, relseg);
            let path = relpath::segment_path(loc, ForkNumber::Main, blk / relseg, PgMajor::V16);
            want.entry(path).or_default().insert(blk % relseg);
        }
        first.union_with(&second);
        let got = first.into_page_map(PgMajor::V16);
        let got: BTreeMap<String, BTreeSet<u32>> = got
            .files
            .iter()
            .map(|(p, b)| (p.clone(), (0..relseg).filter(|&k| b.contains(k)).collect()))
            .collect();
        assert_eq!(got, want);
    }

    /// The relation a test path stands for: `base/5/<rel>` main-fork segments.
    fn relation_of(path: &str) -> Option<RelFileLocator> {
        relpath::is_rel_data_file(path, PgMajor::V16).map(|(l, _)| l)
    }

    fn plan_of(
        source: &[FileEntry],
        target: &[FileEntry],
        changes: Option<&Changes>,
        divergence: Lsn,
        replay_wal: Option<(XLogSegNo, XLogSegNo)>,
    ) -> Plan {
        make_plan(&PlanInput {
            source,
            target,
            changes,
            relation_of: &relation_of,
            block_size: 8192,
            wal_segment_size: 16 << 20,
            divergence,
            replay_wal,
            target_wal_end: None,
        })
        .unwrap()
    }

    fn find<'p>(plan: &'p Plan, path: &str) -> &'p PlanEntry {
        plan.entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} not in the plan"))
    }

    #[test]
    fn blocks_of_either_side_within_both_files() {
        let source = vec![reg("base/5/16384", 4 * 8192), reg("base/5/16385", 8192)];
        let target = vec![reg("base/5/16384", 2 * 8192), reg("base/5/16386", 8192)];
        let mut changes = Changes::default();
        for b in [0, 1, 2, 3] {
            changes.page_map.insert("base/5/16384", b);
        }
        changes.page_map.insert("base/5/16385", 0);
        let plan = plan_of(&source, &target, Some(&changes), Lsn(0), None);
        let e = find(&plan, "base/5/16384");
        assert_eq!(e.action, FileAction::CopyTail);
        assert_eq!(e.blocks.iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(e.fetch_bytes(8192), 4 * 8192);
        assert_eq!(find(&plan, "base/5/16385").action, FileAction::Copy);
        assert_eq!(find(&plan, "base/5/16386").action, FileAction::Remove);
        assert_eq!(plan.fetch_bytes(), 4 * 8192 + 8192);
        let t = plan.totals();
        assert_eq!(
            t["COPY_TAIL"],
            ActionTotals {
                files: 1,
                bytes: 2 * 8192
            }
        );
        assert_eq!(
            t["BLOCKS"],
            ActionTotals {
                files: 1,
                bytes: 2 * 8192
            }
        );
    }

    #[test]
    fn created_relations_and_unknown_changes_are_copied_whole() {
        let source = vec![reg("base/5/16384", 8192), reg("base/7/1259", 8192)];
        let target = source.clone();
        let mut changes = Changes::default();
        changes.created.insert(RelFileLocator::new(1663, 5, 16384));
        changes.databases.insert((1663, 7));
        let plan = plan_of(&source, &target, Some(&changes), Lsn(0), None);
        for path in ["base/5/16384", "base/7/1259"] {
            let e = find(&plan, path);
            assert_eq!(
                (e.action, e.reason),
                (FileAction::Copy, Some(Reason::CreatedSince))
            );
        }
        // Without one side's changes, every relation file both sides have is compared whole.
        let plan = plan_of(&source, &target, None, Lsn(0), None);
        for path in ["base/5/16384", "base/7/1259"] {
            let e = find(&plan, path);
            assert_eq!(
                (e.action, e.reason),
                (FileAction::Copy, Some(Reason::Compared))
            );
        }
        // Changes that name neither: the files stay.
        let plan = plan_of(&source, &target, Some(&Changes::default()), Lsn(0), None);
        assert_eq!(find(&plan, "base/5/16384").action, FileAction::None);
    }

    #[test]
    fn only_the_wal_the_node_replays_is_copied_and_lost_writes_go() {
        let seg = 16u64 << 20;
        let name =
            |tli: u32, n: u64| format!("pg_wal/{}", crate::lsn::wal_file_name(tli, n, 16 << 20));
        // The histories part in segment 3, on timeline 1; the source went on on timeline 2.
        let divergence = Lsn(3 * seg + 0x1234);
        let source: Vec<FileEntry> = [name(1, 2), name(2, 3), name(2, 4), name(2, 5), name(2, 6)]
            .iter()
            .map(|p| reg(p, seg))
            .collect();
        let target: Vec<FileEntry> = [name(1, 1), name(1, 2), name(1, 3), name(1, 4)]
            .iter()
            .map(|p| reg(p, seg))
            .collect();
        // A shut-down source whose checkpoint's redo lies in segment 5 and WAL ends in 6.
        let plan = plan_of(
            &source,
            &target,
            Some(&Changes::default()),
            divergence,
            Some((5, 6)),
        );
        let got = |p: &str| {
            let e = find(&plan, p);
            (e.action, e.reason)
        };
        assert_eq!(got(&name(2, 5)), (FileAction::Copy, Some(Reason::Replayed)));
        assert_eq!(got(&name(2, 6)), (FileAction::Copy, Some(Reason::Replayed)));
        assert_eq!(
            got(&name(2, 3)),
            (FileAction::None, Some(Reason::NotReplayed))
        );
        assert_eq!(
            got(&name(1, 2)),
            (FileAction::None, Some(Reason::NotReplayed))
        );
        // The target's own: those holding WAL past the divergence go; older ones stay.
        assert_eq!(
            got(&name(1, 3)),
            (FileAction::Remove, Some(Reason::PastDivergence))
        );
        assert_eq!(
            got(&name(1, 4)),
            (FileAction::Remove, Some(Reason::PastDivergence))
        );
        assert_eq!(
            got(&name(1, 1)),
            (FileAction::None, Some(Reason::BeforeDivergence))
        );
        // A running source: its window's WAL comes later, none of it now.
        let plan = plan_of(
            &source,
            &target,
            Some(&Changes::default()),
            divergence,
            None,
        );
        assert_eq!(find(&plan, &name(2, 5)).action, FileAction::None);
        assert_eq!(plan.fetch_bytes(), 0);
    }

    /// Target segments past the divergence that begin where its WAL has ended are recycled,
    /// not removed; one holding some of that WAL, one waiting to be archived, a partial one or
    /// one that is not a regular file is removed as before, and so is each without a known end.
    #[test]
    fn segments_past_the_end_of_the_targets_wal_are_recycled() {
        let seg = 16u64 << 20;
        let name =
            |tli: u32, n: u64| format!("pg_wal/{}", crate::lsn::wal_file_name(tli, n, 16 << 20));
        let divergence = Lsn(3 * seg + 0x1234);
        // The target's WAL ends in segment 4; 5 to 9 lie ahead of it.
        let end = Lsn(4 * seg + 0x88);
        let mut target: Vec<FileEntry> = (2..=9).map(|n| reg(&name(1, n), seg)).collect();
        target[5].size = seg / 2; // segment 7: not whole
        target[6].file_type = FileType::Symlink; // segment 8
        let ready = format!(
            "{}.ready",
            name(1, 9).replace("pg_wal/", "pg_wal/archive_status/")
        );
        target.push(reg(&ready, 0));
        let source = vec![reg(&name(2, 3), seg)];
        let make = |end: Option<Lsn>| {
            make_plan(&PlanInput {
                source: &source,
                target: &target,
                changes: Some(&Changes::default()),
                relation_of: &relation_of,
                block_size: 8192,
                wal_segment_size: 16 << 20,
                divergence,
                replay_wal: None,
                target_wal_end: end,
            })
            .unwrap()
        };
        let plan = make(Some(end));
        let got = |n: u64| {
            let e = find(&plan, &name(1, n));
            (e.action, e.reason)
        };
        let recycled = (FileAction::None, Some(Reason::Recycled));
        let removed = (FileAction::Remove, Some(Reason::PastDivergence));
        assert_eq!(got(2), (FileAction::None, Some(Reason::BeforeDivergence)));
        assert_eq!(got(3), removed);
        assert_eq!(got(4), removed);
        assert_eq!(got(5), recycled);
        assert_eq!(got(6), recycled);
        assert_eq!(got(7), removed);
        assert_eq!(got(8), removed);
        assert_eq!(got(9), removed);
        // Where the target's WAL ends is not known: all go.
        let plan = make(None);
        assert!(
            plan.entries
                .iter()
                .all(|e| e.reason != Some(Reason::Recycled))
        );
        // Ending on a segment's first byte: that segment holds none of it.
        let plan = make(Some(Lsn(5 * seg)));
        assert_eq!(find(&plan, &name(1, 5)).reason, Some(Reason::Recycled));
        let plan = make(Some(Lsn(5 * seg + 1)));
        assert_eq!(
            find(&plan, &name(1, 5)).reason,
            Some(Reason::PastDivergence)
        );
    }

    #[test]
    fn the_auto_conf_is_written_at_the_commit_not_copied() {
        let source = vec![reg(AUTO_CONF, 120), reg("postgresql.conf", 30)];
        let target = vec![reg(AUTO_CONF, 88), reg("postgresql.conf", 30)];
        let plan = plan_of(&source, &target, None, Lsn(0), None);
        let e = find(&plan, AUTO_CONF);
        assert_eq!(
            (e.action, e.reason),
            (FileAction::None, Some(Reason::WrittenAtCommit))
        );
        assert_eq!(e.fetch_bytes(8192), 0);
        assert_eq!(find(&plan, "postgresql.conf").action, FileAction::Copy);
    }

    proptest! {
        #[test]
        fn bitmap_matches_a_set(blocks in proptest::collection::vec(0u32..100_000, 0..200)) {
            let mut bm = BlockBitmap::default();
            for &b in &blocks { bm.insert(b); }
            let set: BTreeSet<u32> = blocks.iter().copied().collect();
            prop_assert_eq!(bm.iter().collect::<Vec<_>>(), set.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(bm.len(), set.len());
            let mut halves = BlockBitmap::default();
            let mut other = BlockBitmap::default();
            for (i, &b) in blocks.iter().enumerate() {
                if i % 2 == 0 { halves.insert(b) } else { other.insert(b) }
            }
            halves.union_with(&other);
            prop_assert_eq!(&halves, &bm);
            let back = BlockBitmap::from_le_bytes(&bm.to_le_bytes()).unwrap();
            prop_assert_eq!(back.iter().collect::<Vec<_>>(), bm.iter().collect::<Vec<_>>());
            for b in 0..64 { prop_assert_eq!(bm.contains(b), set.contains(&b)); }
        }
    }
}
