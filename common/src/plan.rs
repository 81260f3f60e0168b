//! The rewind plan: a pure function from both sides' facts to a list of file actions.
//!
//! pg_rewind's plan has two inputs besides the two directory listings (see [`crate::filemap`]):
//! the *page map*, every main-fork block that the target's WAL touched after the last common
//! checkpoint (`datapagemap` per relation segment file), and the *keepwal* set, target WAL
//! segments that recovery may still need and so must not be removed even though the source
//! lacks them. A block in the page map is fetched from the source only if the file exists on
//! both sides and the block lies within both (a block past either end is handled by the
//! file's truncate or tail copy).
//!
//! failback adds one refinement: WAL segments older than the segment holding the last common
//! checkpoint's redo pointer are never needed by the recovery that follows the rewind, so they
//! are neither copied from the source nor removed from the target.
//!
//! And one safeguard: a kept segment must not carry the target's own WAL from past the
//! divergence point. The segment holding the divergence point is opened by the backward walk
//! to the last common checkpoint, so keepwal keeps it; its bytes before the divergence point
//! are the common history recovery needs, its bytes after it are the old primary's lost writes.
//! When the source has no copy of that segment on its newer timeline (a standby source made by a
//! base backup after the promotion has no WAL from before its backup), recovery falls back to
//! the old timeline's file (`XLogFileReadAnyTLI` tries every timeline of the history, newest
//! first) and would replay those lost writes on top of the source's blocks. So the part of a
//! kept segment past the divergence point is zeroed, where recovery sees the end of that file's
//! WAL and asks the new primary for the rest; a kept segment wholly past it is removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::PgMajor;
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
#[derive(Clone, Debug, Default)]
pub struct ChangedBlocks {
    segments: HashMap<(RelFileLocator, u32), BlockBitmap, rustc_hash::FxBuildHasher>,
}

impl ChangedBlocks {
    /// Block `blkno` of `locator`'s main fork, in segments of `relseg_size` blocks
    /// (`RELSEG_SIZE`; 0 ignores the block, as no file can hold it).
    pub fn insert(&mut self, locator: RelFileLocator, blkno: u32, relseg_size: u32) {
        if let Some((segno, in_seg)) = relpath::block_segment(blkno, relseg_size) {
            self.segments
                .entry((locator, segno))
                .or_default()
                .insert(in_seg);
        }
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
}

/// Everything the planner decides from.
pub struct PlanInput<'a> {
    pub source: &'a [FileEntry],
    pub target: &'a [FileEntry],
    pub page_map: &'a PageMap,
    /// Target WAL segment paths (`pg_wal/<name>`) that must not be removed.
    pub keep_wal: &'a BTreeSet<String>,
    /// Whether a path is a main-fork relation segment (`isRelDataFile`).
    pub is_relation_file: &'a dyn Fn(&str) -> bool,
    pub block_size: u32,
    pub wal_segment_size: u32,
    /// The segment of the last common checkpoint's redo pointer; older segments are left alone.
    pub oldest_needed_wal_segment: Option<XLogSegNo>,
    /// Where the histories diverged: no kept target segment may keep WAL from this point on.
    pub divergence: Option<Lsn>,
    /// Where the source's WAL ends when the plan is made (its insert or replay position when
    /// live, its last checkpoint or minimum recovery point when shut down). A source segment
    /// that starts more than a WAL page past it holds no WAL yet — a recycled or preallocated
    /// file — and is not copied to a target that lacks it ([`Reason::PastSourceEnd`]).
    pub source_wal_end: Option<Lsn>,
}

/// Why an entry's action is not pg_rewind's: what the plan decided, kept as data (the journal
/// stores it), so that a resumed rewind acts on it exactly as the run that planned it would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A target WAL segment the source lacks, kept because recovery may need it (pg_rewind's
    /// keepwal).
    KeptForRecovery,
    /// A kept target WAL segment holding the divergence point: its bytes from there on (the
    /// old primary's lost writes) are zeroed.
    KeptDivergenceZeroed,
    /// A target WAL segment recovery would keep, but that starts at or past the divergence
    /// point: it holds only lost writes, and goes.
    PastDivergence,
    /// A WAL segment older than the segment of the last common checkpoint's redo pointer:
    /// recovery never reads it, so it is neither copied nor removed.
    OlderThanCheckpoint,
    /// A source WAL segment that started past the source's end of WAL when the plan was made
    /// (a recycled or preallocated file, holding no WAL yet): not copied. A live source may
    /// write into it by the end of the copy; the rewind then fetches those its final end of
    /// WAL reaches.
    PastSourceEnd,
    /// `postgresql.auto.conf`: it carries the marker of an unfinished rewind, so it is written
    /// once, at the end of the commit, not copied with the rest.
    WrittenAtCommit,
}

impl Reason {
    /// Every reason, in the order of their journal codes (1, 2, ...).
    pub const ALL: [Reason; 6] = [
        Reason::KeptForRecovery,
        Reason::KeptDivergenceZeroed,
        Reason::PastDivergence,
        Reason::OlderThanCheckpoint,
        Reason::PastSourceEnd,
        Reason::WrittenAtCommit,
    ];

    /// The words `--debug` shows after the entry.
    pub fn text(self) -> &'static str {
        match self {
            Reason::KeptForRecovery => "kept: required for recovery",
            Reason::KeptDivergenceZeroed => {
                "kept: required for recovery; WAL past the divergence point zeroed"
            }
            Reason::PastDivergence => "not kept: wholly past the divergence point",
            Reason::OlderThanCheckpoint => "older than the last common checkpoint: not needed",
            Reason::PastSourceEnd => "not copied: past the source's end of WAL (recycled)",
            Reason::WrittenAtCommit => "written at the end of the commit",
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

/// The slack past the source's end of WAL: a shut-down source's end is the start of its last
/// checkpoint record, whose bytes (and a page header) follow it.
const END_SLACK: u64 = 8192;

/// Whether the source segment `path` starts past `end` (plus [`END_SLACK`]).
pub fn wal_segment_past(path: &str, end: Lsn, wal_segment_size: u32) -> bool {
    path.strip_prefix("pg_wal/")
        .and_then(|name| parse_wal_file_name(name, wal_segment_size))
        .is_some_and(|(_, segno)| {
            segment_start(segno, wal_segment_size).0 > end.0.saturating_add(END_SLACK)
        })
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
    /// For a kept target WAL segment holding the divergence point: the offset from which its
    /// bytes (the old primary's WAL after the divergence) are overwritten with zeros.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_from: Option<u64>,
}

impl PlanEntry {
    /// An entry as pg_rewind decides it: `action` on `path`, with no blocks, no reason of
    /// failback's and nothing to zero.
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
            zero_from: None,
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

/// Builds the plan: pg_rewind's decisions, then the page map, then the order of execution.
pub fn make_plan(input: &PlanInput<'_>) -> Result<Plan, FileMapError> {
    let mut paths: BTreeMap<&str, (Option<&FileEntry>, Option<&FileEntry>)> = BTreeMap::new();
    for s in input.source {
        paths.entry(&s.path).or_default().0 = Some(s);
    }
    for t in input.target {
        paths.entry(&t.path).or_default().1 = Some(t);
    }
    let mut entries = Vec::with_capacity(paths.len());
    for (path, (source, target)) in paths {
        let is_rel = (input.is_relation_file)(path);
        if is_rel && source.is_some_and(|s| s.file_type != FileType::Regular) {
            return Err(FileMapError::RelationNotRegular { path: path.into() });
        }
        let mut action = filemap::decide_file_action(path, source, target, is_rel)?;
        let mut reason = None;
        let mut zero_from = None;
        if action == FileAction::Remove && input.keep_wal.contains(path) {
            action = FileAction::None;
            reason = Some(Reason::KeptForRecovery);
            if let (Some(div), Some(name)) = (input.divergence, path.strip_prefix("pg_wal/"))
                && let Some((_, segno)) = parse_wal_file_name(name, input.wal_segment_size)
            {
                let start = segment_start(segno, input.wal_segment_size);
                let size = u64::from(input.wal_segment_size);
                if start >= div {
                    action = FileAction::Remove;
                    reason = Some(Reason::PastDivergence);
                } else if div.0 - start.0 < size {
                    zero_from = Some(div.0 - start.0);
                    reason = Some(Reason::KeptDivergenceZeroed);
                }
            }
        }
        if let (Some(oldest), Some(name)) = (
            input.oldest_needed_wal_segment,
            path.strip_prefix("pg_wal/"),
        ) && let Some((_, segno)) = parse_wal_file_name(name, input.wal_segment_size)
            && segno < oldest
            && matches!(action, FileAction::Copy | FileAction::Remove)
        {
            action = FileAction::None;
            reason = Some(Reason::OlderThanCheckpoint);
        }
        if let Some(end) = input.source_wal_end
            && action == FileAction::Copy
            && target.is_none()
            && wal_segment_past(path, end, input.wal_segment_size)
        {
            action = FileAction::None;
            reason = Some(Reason::PastSourceEnd);
        }
        if path == AUTO_CONF && action != FileAction::None {
            action = FileAction::None;
            reason = Some(Reason::WrittenAtCommit);
        }
        let mut blocks = BlockBitmap::default();
        if let (Some(s), Some(t), Some(changed)) = (source, target, input.page_map.files.get(path))
            && s.file_type == FileType::Regular
            && t.file_type == FileType::Regular
            && matches!(
                action,
                FileAction::None | FileAction::CopyTail | FileAction::Truncate
            )
        {
            let limit = s.size.min(t.size);
            for blk in changed.iter() {
                if (u64::from(blk) + 1) * u64::from(input.block_size) <= limit {
                    blocks.insert(blk);
                }
            }
        }
        entries.push(PlanEntry {
            path: path.to_string(),
            action,
            source: source.cloned(),
            target: target.cloned(),
            blocks,
            reason,
            zero_from,
        });
    }
    entries.sort_by(|a, b| filemap::execution_order((&a.path, a.action), (&b.path, b.action)));
    Ok(Plan {
        entries,
        block_size: input.block_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn blocks_only_within_both_files() {
        let source = vec![reg("base/5/16384", 4 * 8192), reg("base/5/16385", 8192)];
        let target = vec![
            reg("base/5/16384", 2 * 8192),
            reg("pg_wal/000000010000000000000001", 16 << 20),
        ];
        let mut pm = PageMap::default();
        for b in [0, 1, 2, 3] {
            pm.insert("base/5/16384", b);
        }
        pm.insert("base/5/16385", 0);
        let keep = BTreeSet::new();
        let plan = make_plan(&PlanInput {
            source: &source,
            target: &target,
            page_map: &pm,
            keep_wal: &keep,
            is_relation_file: &|p| p.starts_with("base/"),
            block_size: 8192,
            wal_segment_size: 16 << 20,
            oldest_needed_wal_segment: Some(2),
            divergence: None,
            source_wal_end: None,
        })
        .unwrap();
        let e = plan
            .entries
            .iter()
            .find(|e| e.path == "base/5/16384")
            .unwrap();
        assert_eq!(e.action, FileAction::CopyTail);
        assert_eq!(e.blocks.iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(e.fetch_bytes(8192), 4 * 8192);
        let e = plan
            .entries
            .iter()
            .find(|e| e.path == "base/5/16385")
            .unwrap();
        assert_eq!(e.action, FileAction::Copy);
        assert!(e.blocks.is_empty());
        // An old target-only segment is neither removed nor needed.
        let e = plan
            .entries
            .iter()
            .find(|e| e.path.starts_with("pg_wal/"))
            .unwrap();
        assert_eq!(e.action, FileAction::None);
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

    /// A plan of WAL segments only (16 MiB), the last common checkpoint in segment 2.
    fn wal_plan(
        source: &[FileEntry],
        target: &[FileEntry],
        keep: &BTreeSet<String>,
        divergence: Option<Lsn>,
        source_wal_end: Option<Lsn>,
    ) -> Plan {
        make_plan(&PlanInput {
            source,
            target,
            page_map: &PageMap::default(),
            keep_wal: keep,
            is_relation_file: &|_| false,
            block_size: 8192,
            wal_segment_size: 16 << 20,
            oldest_needed_wal_segment: Some(2),
            divergence,
            source_wal_end,
        })
        .unwrap()
    }

    #[test]
    fn source_segments_past_its_end_of_wal_are_not_copied() {
        let seg = 16u32 << 20;
        let name = |n: u64| format!("pg_wal/0000000200000000000000{n:02X}");
        let source: Vec<FileEntry> = (3..=6).map(|n| reg(&name(n), u64::from(seg))).collect();
        // The target already has segment 6 under the same name: it is copied over, as
        // pg_rewind does, never left stale.
        let target = vec![reg(&name(6), u64::from(seg))];
        let keep = BTreeSet::new();
        let plan = |end: Lsn| wal_plan(&source, &target, &keep, None, Some(end));
        let actions = |p: &Plan| -> Vec<(u64, FileAction)> {
            (3..=6)
                .map(|n| {
                    let e = p.entries.iter().find(|e| e.path == name(n)).unwrap();
                    (n, e.action)
                })
                .collect()
        };
        // The end in segment 4: 3 and 4 are copied, 5 is not, 6 is (the target has it).
        let p = plan(Lsn(4 * u64::from(seg) + 100));
        assert_eq!(
            actions(&p),
            [
                (3, FileAction::Copy),
                (4, FileAction::Copy),
                (5, FileAction::None),
                (6, FileAction::Copy)
            ]
        );
        let five = p.entries.iter().find(|e| e.path == name(5)).unwrap();
        assert_eq!(five.reason, Some(Reason::PastSourceEnd));
        // A checkpoint record that starts in the last page of segment 4 may end in segment 5.
        let p = plan(Lsn(5 * u64::from(seg) - 100));
        assert_eq!(actions(&p)[2], (5, FileAction::Copy));
        assert!(!wal_segment_past("base/1/1", Lsn(0), seg));
        assert!(!wal_segment_past("pg_wal/00000002.history", Lsn(0), seg));
    }

    #[test]
    fn the_auto_conf_is_written_at_the_commit_not_copied() {
        let source = vec![reg(AUTO_CONF, 120), reg("postgresql.conf", 30)];
        let target = vec![reg(AUTO_CONF, 88), reg("postgresql.conf", 30)];
        let plan = wal_plan(&source, &target, &BTreeSet::new(), None, None);
        let e = plan.entries.iter().find(|e| e.path == AUTO_CONF).unwrap();
        assert_eq!(
            (e.action, e.reason),
            (FileAction::None, Some(Reason::WrittenAtCommit))
        );
        assert_eq!(e.fetch_bytes(8192), 0);
        let conf = plan
            .entries
            .iter()
            .find(|e| e.path == "postgresql.conf")
            .unwrap();
        assert_eq!(conf.action, FileAction::Copy);
    }

    #[test]
    fn kept_segments_lose_what_follows_the_divergence() {
        let seg = 16u32 << 20;
        let name = |n: u64| format!("pg_wal/0000000100000000000000{n:02X}");
        let target: Vec<FileEntry> = (2..=5).map(|n| reg(&name(n), u64::from(seg))).collect();
        let keep: BTreeSet<String> = (2..=4).map(name).collect();
        let plan = |div: Lsn| wal_plan(&[], &target, &keep, Some(div), None);
        let find = |p: &Plan, n: u64| {
            let e = p.entries.iter().find(|e| e.path == name(n)).unwrap();
            (e.action, e.zero_from)
        };
        // Divergence inside segment 3: segment 2 is all common history, segment 3 keeps its
        // head, segment 4 would hold only lost writes, 5 was never kept.
        let p = plan(Lsn(3 * u64::from(seg) + 0x1234));
        assert_eq!(find(&p, 2), (FileAction::None, None));
        assert_eq!(find(&p, 3), (FileAction::None, Some(0x1234)));
        assert_eq!(find(&p, 4), (FileAction::Remove, None));
        assert_eq!(find(&p, 5), (FileAction::Remove, None));
        // Divergence exactly at the start of segment 4 (the walk read its first record).
        let p = plan(Lsn(4 * u64::from(seg)));
        assert_eq!(find(&p, 3), (FileAction::None, None));
        assert_eq!(find(&p, 4), (FileAction::Remove, None));
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
