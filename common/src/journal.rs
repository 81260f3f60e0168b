//! The rewind journal: what an interrupted rewind needs to finish, kept in the target itself.
//!
//! A rewind reads the target's WAL since the divergence to learn which blocks the old primary
//! changed, then overwrites the target — `pg_wal` included. Interrupted half-way, the target's
//! own WAL may be gone, so nothing can recompute the plan: PostgreSQL's documentation calls such
//! a directory "likely not in a state that can be recovered". failback writes the plan and
//! everything the commit needs (the divergence point, the target's changes, the start of the
//! backup window a running source is copied in, the source's identity) to a journal **before
//! the first change**, then appends a record for each range once its bytes are written and
//! synced, and one per phase. Run again, failback replays the journal instead of the target's
//! WAL and fetches only what is missing (and, from a running source, what it changed since).
//!
//! The journal is an append-only file (`failback.journal` at the root of the data directory):
//! an 8-byte magic, then frames `[len u32][crc32c u32][kind u8][payload]`, little-endian, the CRC
//! covering kind and payload. A crash can leave a torn last frame; replay stops at the first
//! frame that is short or fails its CRC and reports where (the writer truncates there before
//! appending). Everything before it was fsynced before anything it describes was relied on.
//!
//! This module is pure: it encodes records to bytes and replays bytes into a [`JournalState`].

use std::collections::BTreeMap;

use crate::changes::Changes;
use crate::filemap::{FileAction, FileEntry, FileType};
use crate::lsn::{Lsn, TimeLineId};
use crate::plan::{BlockBitmap, Plan, PlanEntry, Reason};
use crate::relpath::RelFileLocator;

/// The journal's file name, at the root of the target data directory.
pub const JOURNAL_FILE: &str = "failback.journal";

const MAGIC: &[u8; 8] = b"FBJRNL03";
/// The magics of earlier formats: the first did not keep why the plan left an entry alone, the
/// second planned pg_rewind's way (replay from the last common checkpoint).
const OLDER_MAGICS: [&[u8; 8]; 2] = [b"FBJRNL01", b"FBJRNL02"];
/// A frame larger than this is corruption, not a plan (a plan of a terabyte cluster with every
/// block changed is far smaller).
const MAX_FRAME: u32 = 1 << 30;

const KIND_BEGIN: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_PHASE: u8 = 3;

/// Everything a rewind needs to finish without the target's WAL.
#[derive(Clone, Debug)]
pub struct JournalHeader {
    pub system_identifier: u64,
    pub pg_major: u32,
    /// Where the histories part, and on which timeline of the target.
    pub divergence: Lsn,
    pub divergence_tli: TimeLineId,
    /// The source's timeline when the plan was made; a resumed run checks that the source's
    /// history still passes through `divergence` on the same timelines.
    pub source_tli: TimeLineId,
    /// Where the backup window the copy is made in began, for a running source: a resumed run
    /// copies again what the source changed since.
    pub window_start: Option<Lsn>,
    /// The target's changes since the divergence, when its WAL said them: a resumed run from a
    /// running source plans again with them, as the target's WAL may be gone by then.
    pub target_changes: Option<Changes>,
    /// A resync (`failback resync`): every relation file compared, and the source may be on
    /// the target's own timeline, so a resumed run does not look for a divergence.
    pub resync: bool,
    pub plan: Plan,
}

/// How far a rewind got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// The plan is written; the target is being changed.
    Copying = 1,
    /// Every range is written and the target is synced; the commit may start.
    Copied = 2,
    /// `backup_label` and the control file are written and durable.
    Committed = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Option<Phase> {
        match v {
            1 => Some(Phase::Copying),
            2 => Some(Phase::Copied),
            3 => Some(Phase::Committed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Copied => "copied, not committed",
            Phase::Committed => "committed",
        }
    }
}

/// Why a journal cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("{JOURNAL_FILE} does not start with failback's journal magic: not a journal")]
    BadMagic,
    #[error(
        "{JOURNAL_FILE} was written by an older failback, whose journal lacks what this one \
         needs to resume it; finish the rewind with the failback that began it"
    )]
    OlderFormat,
    #[error("{JOURNAL_FILE} holds no complete plan (torn at byte {0}): the rewind never started")]
    NoHeader(u64),
    #[error("{JOURNAL_FILE}: frame at byte {at}: {what}")]
    Corrupt { at: u64, what: String },
}

/// One record of the journal.
#[derive(Clone, Debug)]
pub enum Record {
    Begin(Box<JournalHeader>),
    /// `length` bytes of `path` from `offset` are written and synced.
    Done {
        path: String,
        offset: u64,
        length: u64,
    },
    Phase(Phase),
}

/// The journal's magic, which the file starts with.
pub fn magic() -> &'static [u8] {
    MAGIC
}

/// One record as a frame, ready to append.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut payload = Vec::new();
    let kind = match record {
        Record::Begin(h) => {
            put_header(&mut payload, h);
            KIND_BEGIN
        }
        Record::Done {
            path,
            offset,
            length,
        } => {
            put_str(&mut payload, path);
            payload.extend_from_slice(&offset.to_le_bytes());
            payload.extend_from_slice(&length.to_le_bytes());
            KIND_DONE
        }
        Record::Phase(p) => {
            payload.push(*p as u8);
            KIND_PHASE
        }
    };
    let mut body = Vec::with_capacity(payload.len() + 1);
    body.push(kind);
    body.extend_from_slice(&payload);
    let mut frame = Vec::with_capacity(body.len() + 8);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Byte ranges of one file, merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (exclusive), disjoint and not touching.
    spans: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let (mut start, mut end) = (offset, offset.saturating_add(length));
        // Absorb every span that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .spans
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.spans.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.spans.insert(start, end);
    }

    /// Takes `[offset, offset + length)` out of the set.
    pub fn remove(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let end = offset.saturating_add(length);
        let overlapping: Vec<(u64, u64)> = self
            .spans
            .range(..end)
            .rev()
            .take_while(|(_, e)| **e > offset)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.spans.remove(&s);
            if s < offset {
                self.spans.insert(s, offset);
            }
            if e > end {
                self.spans.insert(end, e);
            }
        }
    }

    /// Whether every byte of `[offset, offset + length)` is in the set.
    pub fn covers(&self, offset: u64, length: u64) -> bool {
        if length == 0 {
            return true;
        }
        let end = offset.saturating_add(length);
        self.spans
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, e)| *e >= end)
    }

    /// The parts of `[offset, offset + length)` not in the set, in order.
    pub fn missing(&self, offset: u64, length: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(length);
        let mut out = Vec::new();
        let mut at = offset;
        // The span that may cover `offset`, then every span starting inside the range.
        let first = self.spans.range(..=offset).next_back();
        let rest = self.spans.range(offset.saturating_add(1)..end);
        for (&s, &e) in first.into_iter().chain(rest) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s.min(end) - at));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end - at));
        }
        out
    }

    /// The parts of `[offset, offset + length)` in the set, in order: what [`missing`] leaves.
    ///
    /// [`missing`]: RangeSet::missing
    pub fn present(&self, offset: u64, length: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(length);
        let mut out = Vec::new();
        let mut at = offset;
        for (gap, gap_len) in self.missing(offset, length) {
            if gap > at {
                out.push((at, gap - at));
            }
            at = gap + gap_len;
        }
        if at < end {
            out.push((at, end - at));
        }
        out
    }

    /// The ranges in the set, as (offset, length), in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.spans.iter().map(|(s, e)| (*s, e - s))
    }

    /// Bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.spans.iter().map(|(s, e)| e - s).sum()
    }
}

/// What a journal says, replayed.
#[derive(Clone, Debug)]
pub struct JournalState {
    pub header: JournalHeader,
    pub phase: Phase,
    /// Ranges written and synced, per path.
    pub done: BTreeMap<String, RangeSet>,
    /// Where the valid frames end; a torn frame (if any) starts here.
    pub valid_len: u64,
    /// Whether bytes after `valid_len` were dropped (a torn or corrupt last frame).
    pub torn_tail: bool,
}

impl JournalState {
    pub fn is_done(&self, path: &str, offset: u64, length: u64) -> bool {
        self.done
            .get(path)
            .is_some_and(|r| r.covers(offset, length))
    }

    pub fn done_bytes(&self) -> u64 {
        self.done.values().map(RangeSet::bytes).sum()
    }
}

/// Replays a whole journal file. The first frame must be a complete plan; every later frame
/// that is short or fails its CRC ends the replay there (a crash mid-append).
pub fn replay(bytes: &[u8]) -> Result<JournalState, JournalError> {
    if OLDER_MAGICS
        .iter()
        .any(|m| bytes.get(..MAGIC.len()) == Some(&m[..]))
    {
        return Err(JournalError::OlderFormat);
    }
    if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(JournalError::BadMagic);
    }
    let mut at = MAGIC.len();
    let mut state: Option<JournalState> = None;
    while let Some(body) = frame_at(bytes, at) {
        let frame_start = at as u64;
        at += 8 + body.len();
        let (kind, payload) = match body.split_first() {
            Some((k, p)) => (*k, p),
            None => {
                return Err(JournalError::Corrupt {
                    at: frame_start,
                    what: "empty frame".into(),
                });
            }
        };
        let corrupt = |what: &str| JournalError::Corrupt {
            at: frame_start,
            what: what.to_string(),
        };
        match (&mut state, kind) {
            (None, KIND_BEGIN) => {
                let mut c = Cursor::new(payload);
                let header = get_header(&mut c).ok_or_else(|| corrupt("unreadable plan"))?;
                state = Some(JournalState {
                    header,
                    phase: Phase::Copying,
                    done: BTreeMap::new(),
                    valid_len: 0,
                    torn_tail: false,
                });
            }
            (None, _) => return Err(corrupt("the first record is not the plan")),
            (Some(_), KIND_BEGIN) => return Err(corrupt("a second plan")),
            (Some(s), KIND_DONE) => {
                let mut c = Cursor::new(payload);
                let (path, offset, length) = c
                    .str()
                    .and_then(|p| Some((p, c.u64()?, c.u64()?)))
                    .ok_or_else(|| corrupt("unreadable range"))?;
                s.done.entry(path).or_default().insert(offset, length);
            }
            (Some(s), KIND_PHASE) => {
                let p = payload
                    .first()
                    .and_then(|v| Phase::from_u8(*v))
                    .ok_or_else(|| corrupt("unknown phase"))?;
                s.phase = s.phase.max(p);
            }
            (Some(_), k) => return Err(corrupt(&format!("unknown record kind {k}"))),
        }
        if let Some(s) = &mut state {
            s.valid_len = at as u64;
        }
    }
    let mut s = state.ok_or(JournalError::NoHeader(at as u64))?;
    s.torn_tail = s.valid_len < bytes.len() as u64;
    Ok(s)
}

/// The body of the frame at `at`, if it is whole and its CRC matches.
fn frame_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let len = u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?);
    if len == 0 || len > MAX_FRAME {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(at + 4..at + 8)?.try_into().ok()?);
    let body = bytes.get(at + 8..(at + 8).checked_add(len as usize)?)?;
    (crc32c::crc32c(body) == crc).then_some(body)
}

// ---- encoding of the header and plan ----

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_entry(out: &mut Vec<u8>, e: &Option<FileEntry>) {
    match e {
        None => out.push(0),
        Some(f) => {
            out.push(match f.file_type {
                FileType::Regular => 1,
                FileType::Directory => 2,
                FileType::Symlink => 3,
            });
            out.extend_from_slice(&f.size.to_le_bytes());
            match &f.link_target {
                None => out.push(0),
                Some(t) => {
                    out.push(1);
                    put_str(out, t);
                }
            }
        }
    }
}

const ACTIONS: [FileAction; 6] = [
    FileAction::Create,
    FileAction::Copy,
    FileAction::CopyTail,
    FileAction::None,
    FileAction::Truncate,
    FileAction::Remove,
];

fn put_header(out: &mut Vec<u8>, h: &JournalHeader) {
    for v in [
        h.system_identifier,
        u64::from(h.pg_major),
        h.divergence.0,
        u64::from(h.divergence_tli),
        u64::from(h.source_tli),
        h.window_start.map_or(0, |l| l.0),
        u64::from(h.plan.block_size),
        h.plan.entries.len() as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(u8::from(h.resync));
    match &h.target_changes {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            put_changes(out, c);
        }
    }
    for e in &h.plan.entries {
        put_str(out, &e.path);
        out.push(ACTIONS.iter().position(|a| *a == e.action).unwrap_or(0) as u8);
        put_entry(out, &e.source);
        put_entry(out, &e.target);
        out.push(e.reason.map_or(0, reason_code));
        let blocks: Vec<u32> = e.blocks.iter().collect();
        out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
        for b in blocks {
            out.extend_from_slice(&b.to_le_bytes());
        }
    }
}

fn put_changes(out: &mut Vec<u8>, c: &Changes) {
    out.extend_from_slice(&(c.page_map.files.len() as u32).to_le_bytes());
    for (path, blocks) in &c.page_map.files {
        put_str(out, path);
        let bytes = blocks.to_le_bytes();
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(&(c.created.len() as u32).to_le_bytes());
    for l in &c.created {
        for v in [l.spcOid, l.dbOid, l.relNumber] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out.extend_from_slice(&(c.databases.len() as u32).to_le_bytes());
    for (spc, db) in &c.databases {
        out.extend_from_slice(&spc.to_le_bytes());
        out.extend_from_slice(&db.to_le_bytes());
    }
}

/// A reason's journal code: its place in [`Reason::ALL`], from 1 (0 is "none").
fn reason_code(r: Reason) -> u8 {
    Reason::ALL
        .iter()
        .position(|a| *a == r)
        .map_or(0, |i| i as u8 + 1)
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.b.split_at_checked(n)?;
        self.b = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn entry(&mut self, path: &str) -> Option<Option<FileEntry>> {
        let file_type = match self.u8()? {
            0 => return Some(None),
            1 => FileType::Regular,
            2 => FileType::Directory,
            3 => FileType::Symlink,
            _ => return None,
        };
        let size = self.u64()?;
        let link_target = match self.u8()? {
            0 => None,
            1 => Some(self.str()?),
            _ => return None,
        };
        Some(Some(FileEntry {
            path: path.to_string(),
            file_type,
            size,
            link_target,
        }))
    }
}

fn get_header(c: &mut Cursor<'_>) -> Option<JournalHeader> {
    let system_identifier = c.u64()?;
    let pg_major = u32::try_from(c.u64()?).ok()?;
    let divergence = Lsn(c.u64()?);
    let divergence_tli = u32::try_from(c.u64()?).ok()?;
    let source_tli = u32::try_from(c.u64()?).ok()?;
    let window_start = Some(Lsn(c.u64()?)).filter(|l| l.0 != 0);
    let block_size = u32::try_from(c.u64()?).ok()?;
    let n = c.u64()?;
    let resync = match c.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let target_changes = match c.u8()? {
        0 => None,
        1 => Some(get_changes(c)?),
        _ => return None,
    };
    let mut entries = Vec::new();
    for _ in 0..n {
        let path = c.str()?;
        let action = *ACTIONS.get(usize::from(c.u8()?))?;
        let source = c.entry(&path)?;
        let target = c.entry(&path)?;
        let reason = match c.u8()? {
            0 => None,
            code => Some(*Reason::ALL.get(usize::from(code) - 1)?),
        };
        let mut blocks = BlockBitmap::default();
        for _ in 0..c.u32()? {
            let blk = c.u32()?;
            // A segment of 2^24 blocks is 128 GiB; more is corruption, and would size the bitmap.
            if blk >= 1 << 24 {
                return None;
            }
            blocks.insert(blk);
        }
        entries.push(PlanEntry {
            path,
            action,
            source,
            target,
            blocks,
            reason,
        });
    }
    c.b.is_empty().then_some(JournalHeader {
        system_identifier,
        pg_major,
        divergence,
        divergence_tli,
        source_tli,
        window_start,
        target_changes,
        resync,
        plan: Plan {
            entries,
            block_size,
        },
    })
}

fn get_changes(c: &mut Cursor<'_>) -> Option<Changes> {
    let mut changes = Changes::default();
    for _ in 0..c.u32()? {
        let path = c.str()?;
        let len = c.u32()? as usize;
        // A bitmap longer than a segment of 2^24 blocks is corruption.
        if len > (1 << 24) / 8 {
            return None;
        }
        let blocks = BlockBitmap::from_le_bytes(c.take(len)?)?;
        changes.page_map.files.insert(path, blocks);
    }
    for _ in 0..c.u32()? {
        let (spc, db, rel) = (c.u32()?, c.u32()?, c.u32()?);
        changes.created.insert(RelFileLocator::new(spc, db, rel));
    }
    for _ in 0..c.u32()? {
        changes.databases.insert((c.u32()?, c.u32()?));
    }
    Some(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> FileEntry {
        FileEntry::regular(path, size)
    }

    fn header() -> JournalHeader {
        let mut blocks = BlockBitmap::default();
        for b in [0, 7, 8, 131_071] {
            blocks.insert(b);
        }
        JournalHeader {
            system_identifier: 0x7000_0000_1234_5678,
            pg_major: 16,
            divergence: Lsn(0x3_0000_2760),
            divergence_tli: 1,
            source_tli: 2,
            window_start: Some(Lsn(0x4_0000_0028)),
            target_changes: Some({
                let mut c = Changes::default();
                c.page_map.insert("base/5/16384", 7);
                c.page_map.insert("base/5/16384", 131_071);
                c.created.insert(RelFileLocator::new(1663, 5, 16390));
                c.databases.insert((1663, 16400));
                c
            }),
            resync: true,
            plan: Plan {
                block_size: 8192,
                entries: vec![
                    PlanEntry {
                        path: "base/5/16384".into(),
                        action: FileAction::None,
                        source: Some(file("base/5/16384", 1 << 30)),
                        target: Some(file("base/5/16384", 1 << 30)),
                        blocks,
                        reason: None,
                    },
                    PlanEntry {
                        path: "pg_tblspc/16400".into(),
                        action: FileAction::Create,
                        source: Some(FileEntry {
                            path: "pg_tblspc/16400".into(),
                            file_type: FileType::Symlink,
                            size: 0,
                            link_target: Some("/srv/ts".into()),
                        }),
                        target: None,
                        blocks: BlockBitmap::default(),
                        reason: None,
                    },
                    PlanEntry {
                        path: "pg_wal/000000010000000000000003".into(),
                        action: FileAction::None,
                        source: None,
                        target: Some(file("pg_wal/000000010000000000000003", 16 << 20)),
                        blocks: BlockBitmap::default(),
                        reason: Some(Reason::PastDivergence),
                    },
                    PlanEntry {
                        path: "big".into(),
                        action: FileAction::Copy,
                        source: Some(file("big", 5 << 30)),
                        target: None,
                        blocks: BlockBitmap::default(),
                        reason: None,
                    },
                ],
            },
        }
    }

    fn journal(records: &[Record]) -> Vec<u8> {
        let mut out = magic().to_vec();
        for r in records {
            out.extend(encode(r));
        }
        out
    }

    fn sample() -> Vec<u8> {
        journal(&[
            Record::Begin(Box::new(header())),
            Record::Done {
                path: "big".into(),
                offset: 0,
                length: 1 << 30,
            },
            Record::Done {
                path: "big".into(),
                offset: 2 << 30,
                length: 1 << 30,
            },
            Record::Done {
                path: "big".into(),
                offset: 1 << 30,
                length: 1 << 30,
            },
            Record::Phase(Phase::Copied),
        ])
    }

    #[test]
    fn replays_what_was_written() {
        let s = replay(&sample()).unwrap();
        assert!(!s.torn_tail);
        assert_eq!(s.phase, Phase::Copied);
        assert_eq!(s.header.system_identifier, 0x7000_0000_1234_5678);
        assert_eq!(s.header.divergence, Lsn(0x3_0000_2760));
        assert_eq!(s.header.source_tli, 2);
        assert_eq!(s.header.window_start, Some(Lsn(0x4_0000_0028)));
        assert_eq!(s.header.target_changes, header().target_changes);
        assert!(s.header.resync);
        let want = header().plan;
        assert_eq!(s.header.plan.entries.len(), want.entries.len());
        for (a, b) in s.header.plan.entries.iter().zip(&want.entries) {
            assert_eq!(a.path, b.path);
            assert_eq!(a.action, b.action);
            assert_eq!(a.source, b.source);
            assert_eq!(a.target, b.target);
            assert_eq!(a.blocks, b.blocks);
            assert_eq!(a.reason, b.reason, "{}", a.path);
        }
        assert!(
            s.is_done("big", 0, 3 << 30),
            "three adjacent gigabytes merge"
        );
        assert!(!s.is_done("big", 0, (3 << 30) + 1));
        assert!(!s.is_done("other", 0, 1));
        assert_eq!(s.done_bytes(), 3 << 30);
    }

    // Every reason the plan can give survives the journal, so a resumed run decides what the
    // run that planned it would have (the WAL a live source wrote during the copy is fetched by
    // its reason).
    #[test]
    fn every_reason_round_trips() {
        let mut h = header();
        let template = h.plan.entries[0].clone();
        h.plan.entries = Reason::ALL
            .iter()
            .map(|r| PlanEntry {
                reason: Some(*r),
                ..template.clone()
            })
            .collect();
        let s = replay(&journal(&[Record::Begin(Box::new(h))])).unwrap();
        let got: Vec<_> = s.header.plan.entries.iter().map(|e| e.reason).collect();
        let want: Vec<_> = Reason::ALL.iter().map(|r| Some(*r)).collect();
        assert_eq!(got, want);
        let mut old = sample();
        old[..MAGIC.len()].copy_from_slice(OLDER_MAGICS[1]);
        assert_eq!(replay(&old).unwrap_err(), JournalError::OlderFormat);
    }

    #[test]
    fn a_torn_tail_is_dropped_at_every_cut() {
        let full = sample();
        let whole = replay(&full).unwrap();
        let header_end = MAGIC.len() + 8 + encode(&Record::Begin(Box::new(header()))).len() - 8;
        for cut in 0..full.len() {
            match replay(&full[..cut]) {
                Ok(s) => {
                    assert!(cut >= header_end, "a plan replayed from {cut} bytes");
                    assert!(s.valid_len <= cut as u64);
                    assert_eq!(s.torn_tail, s.valid_len < cut as u64);
                    assert!(s.done_bytes() <= whole.done_bytes());
                    assert!(s.phase <= whole.phase);
                }
                Err(JournalError::BadMagic | JournalError::OlderFormat) => {
                    assert!(cut < MAGIC.len())
                }
                Err(JournalError::NoHeader(_)) => assert!(cut < header_end),
                Err(e) => panic!("cut at {cut}: {e}"),
            }
        }
    }

    #[test]
    fn a_flipped_bit_ends_the_replay_there_and_never_panics() {
        let full = sample();
        for i in MAGIC.len()..full.len() {
            let mut b = full.clone();
            b[i] ^= 0x10;
            if let Ok(s) = replay(&b) {
                assert!(s.valid_len <= i as u64 || s.valid_len == full.len() as u64);
            }
        }
    }

    #[test]
    fn range_sets_merge_overlaps_and_neighbours() {
        let mut r = RangeSet::default();
        r.insert(10, 10);
        r.insert(30, 10);
        assert!(!r.covers(10, 30));
        r.insert(20, 10);
        assert!(r.covers(10, 30));
        r.insert(5, 100);
        assert_eq!(r.bytes(), 100);
        assert_eq!(r.missing(0, 200), vec![(0, 5), (105, 95)]);
        assert_eq!(r.missing(5, 100), vec![]);
        assert_eq!(r.missing(50, 10), vec![]);
        assert_eq!(r.missing(100, 10), vec![(105, 5)]);
        let mut holes = RangeSet::default();
        holes.insert(10, 10);
        holes.insert(30, 10);
        assert_eq!(holes.missing(0, 50), vec![(0, 10), (20, 10), (40, 10)]);
        assert_eq!(holes.missing(15, 20), vec![(20, 10)]);
        assert_eq!(RangeSet::default().missing(7, 3), vec![(7, 3)]);
        assert_eq!(holes.present(0, 50), vec![(10, 10), (30, 10)]);
        assert_eq!(holes.present(15, 20), vec![(15, 5), (30, 5)]);
        assert_eq!(holes.present(12, 5), vec![(12, 5)]);
        assert_eq!(holes.present(20, 10), vec![]);
        assert_eq!(RangeSet::default().present(7, 3), vec![]);
        let mut cut = holes.clone();
        cut.remove(15, 20);
        assert_eq!(cut.missing(0, 50), vec![(0, 10), (15, 20), (40, 10)]);
        cut.remove(0, 100);
        assert_eq!(cut.bytes(), 0);
        let mut mid = RangeSet::default();
        mid.insert(0, 100);
        mid.remove(40, 10);
        assert_eq!(mid.missing(0, 100), vec![(40, 10)]);
        r.insert(u64::MAX - 1, 10);
        assert!(r.covers(u64::MAX - 1, 1));
        assert!(r.covers(7, 0));
    }
}
