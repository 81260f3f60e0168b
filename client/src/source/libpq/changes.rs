//! What a running server changed since the divergence, asked over plain libpq.
//!
//! A rewind by the pages that differ needs the blocks the source changed after the two
//! histories parted. failbackd finds them by decoding the source's WAL beside it
//! ([`failback_datadir::wal::source_changes`]); a server reached with `--source-server` has no
//! failbackd, and perhaps only pg_rewind's four grants (EXECUTE on `pg_ls_dir`, `pg_stat_file`
//! and both `pg_read_binary_file`s). Two ways remain:
//!
//! - **WAL summaries** (PostgreSQL 17 and later, `summarize_wal = on`). The server's WAL
//!   summarizer writes, for each stretch of WAL between checkpoints' redo points (and up to
//!   timeline switches), the blocks its records touched (`pg_wal_summary_contents`), and each
//!   relation fork's *limit block*: the length it was cut to (`XLOG_SMGR_TRUNCATE`), or 0 for a
//!   fork created or dropped (`XLOG_SMGR_CREATE`, a transaction's dropped relations) and, with
//!   relfilenode 0, for every relation of a database created or dropped
//!   (`walsummarizer.c`, `blkreftable.c`). A limit drops the blocks recorded before it past
//!   the limit, so blocks past a truncation are taken from the file's size now. Where the
//!   summaries that `pg_available_wal_summaries()` lists cover the start of the stretch, they
//!   stand in for decoding it; the summaries need privileges pg_rewind's role lacks, and a
//!   refusal just means decoding.
//! - **Decoding the WAL**: the segments covering the stretch, read a window at a time with
//!   `pg_read_binary_file('pg_wal/<segment>', offset, length, true)` along the source's
//!   timeline history, fed to the project's decoder through a [`SegmentSource`] of their own,
//!   and never written to disk. Only the segments the stretch lies in are read, and past the
//!   page holding its end a page at a time: never more than pg_rewind copies, which is every
//!   one of those segments whole.
//!
//! WAL that is gone (a segment recycled or removed, WAL ending early) is not an error: the
//! answer is [`ChangesAnswer::Unknown`], and the rewind compares chunk hashes instead.

use std::path::PathBuf;

use failback_common::changes::Changes;
use failback_common::control::ControlFileData;
use failback_common::plan::ChangedBlocks;
use failback_common::relpath::{ForkNumber, RelFileLocator, segment_path};
use failback_common::timeline::TimeLineHistory;
use failback_common::wal::WalParams;
use failback_common::{Lsn, TimeLineId, XLogSegNo};
use failback_datadir::wal::{SegmentSource, WalReadError, WalReader};
use failback_sql::libpq::{Conn, Format, PqError};

use super::hashes::query_error;
use crate::source::{ChangesAnswer, SourceChanges, SourceError};

/// WAL read by one query: a quarter of a default segment, so that a link's round trip is paid
/// once per 4 MiB and little more than that is held in memory.
const WINDOW: u64 = 4 << 20;

/// How [`source_changes_with`] went, beyond its answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangesReport {
    /// WAL bytes read from the server's `pg_wal`.
    pub wal_bytes: u64,
    /// PostgreSQL WAL summaries used, as (timeline, start, end).
    pub summaries: Vec<(TimeLineId, Lsn, Lsn)>,
    /// Where the summaries' coverage ended and decoding began (`since` when none was used).
    pub summarized_until: Lsn,
}

/// What the server `conn` reaches changed from `since` (where its history and the target's
/// part) up to `until` (its end of WAL, at most its flush position: WAL beyond it may not be
/// in its files yet), read along `history`, the history of the server's timeline at `until`.
/// `control` is the server's control file (WAL segment size, relation segment size, system
/// identifier). Errors are failed queries, retryable when the link broke
/// ([`SourceError::is_retryable`]).
pub fn source_changes(
    conn: &mut Conn,
    control: &ControlFileData,
    history: &TimeLineHistory,
    since: Lsn,
    until: Lsn,
) -> Result<ChangesAnswer, SourceError> {
    source_changes_with(conn, control, history, since, until, true).map(|(answer, _)| answer)
}

/// [`source_changes`], taking PostgreSQL's WAL summaries only when `summaries`, and saying
/// how it went.
pub fn source_changes_with(
    conn: &mut Conn,
    control: &ControlFileData,
    history: &TimeLineHistory,
    since: Lsn,
    until: Lsn,
    summaries: bool,
) -> Result<(ChangesAnswer, ChangesReport), SourceError> {
    let mut report = ChangesReport {
        summarized_until: since,
        ..ChangesReport::default()
    };
    let mut changes = Changes::default();
    if summaries
        && since < until
        && let Some((found, used, covered)) = from_summaries(conn, control, history, since, until)?
    {
        changes = found;
        report.summaries = used;
        report.summarized_until = covered;
    }
    let seg_size = control.xlog_seg_size;
    let params =
        WalParams::new(control.major, seg_size).with_system_identifier(control.system_identifier);
    // Decoding resumes at the page holding the summaries' end (a record start, or the first
    // byte of a page): the records between the page's start and there are in the summaries
    // already, and taking them twice costs nothing. The record continued into the page is
    // skipped by the decoder, and was summarized.
    let page = u64::from(params.page_size);
    let from = if report.summarized_until > since {
        Lsn(report.summarized_until.0 / page * page).max(since)
    } else {
        since
    };
    let mut reader = WalReader::with_segments(
        ServerSegments::new(conn, seg_size, page, until),
        history,
        params,
    );
    let decoded = reader.changes(from, until.max(from), control.relseg_size, || {});
    report.wal_bytes = reader.segments().fetched;
    let decoded = match decoded {
        Ok(d) => d,
        Err(e) => {
            if let Some(q) = reader.segments_mut().failed.take() {
                if q.is_permission_denied() {
                    return Ok((
                        ChangesAnswer::Unknown {
                            why: format!("the role may not read the server's WAL: {q}"),
                        },
                        report,
                    ));
                }
                return Err(query_error("the source's WAL", q));
            }
            return match e {
                WalReadError::MissingSegment { .. }
                | WalReadError::EndedEarly { .. }
                | WalReadError::Decode { .. } => Ok((
                    ChangesAnswer::Unknown {
                        why: format!(
                            "the WAL from {since} to {until} is no longer complete in the \
                             source's pg_wal: {}",
                            crate::source::remote::chain(&e)
                        ),
                    },
                    report,
                )),
                e => Err(SourceError::Refused {
                    what: "the source's WAL".into(),
                    reason: crate::source::remote::chain(&e),
                }),
            };
        }
    };
    let records = decoded.records();
    changes.merge(decoded.finish(control.major));
    let summarized_segments = if report.summarized_until > since {
        let seg = u64::from(seg_size);
        (report.summarized_until.0 - 1) / seg - since.0 / seg + 1
    } else {
        0
    };
    Ok((
        ChangesAnswer::Found(SourceChanges {
            changes,
            until,
            records,
            summarized_segments,
        }),
        report,
    ))
}

/// A running server's WAL segment files, read over SQL a window at a time.
struct ServerSegments<'c> {
    conn: &'c mut Conn,
    seg_size: u64,
    /// The end of the WAL page holding `until`: reads stop there, and go on past it a page at
    /// a time, only as far as a record crossing it needs.
    soft_end: Lsn,
    page: u64,
    /// The last window read: segment file name, its offset, its bytes.
    window: Option<(String, u64, Vec<u8>)>,
    /// WAL bytes fetched.
    fetched: u64,
    /// The query that failed, kept for its kind (a refusal, or a link that broke).
    failed: Option<PqError>,
}

impl<'c> ServerSegments<'c> {
    fn new(conn: &'c mut Conn, seg_size: u32, page: u64, until: Lsn) -> Self {
        ServerSegments {
            conn,
            seg_size: u64::from(seg_size),
            soft_end: Lsn((until.0 / page + 1) * page),
            page,
            window: None,
            fetched: 0,
            failed: None,
        }
    }
}

/// How many bytes to read at `offset` of segment `segno` (segments of `seg_size` bytes, WAL
/// pages of `page`): a window, not past the segment, nor past `soft_end`, the end of the page
/// holding the end of the stretch (and past that, a page).
fn window_len(seg_size: u64, page: u64, soft_end: Lsn, segno: XLogSegNo, offset: u64) -> u64 {
    let at = segno.saturating_mul(seg_size).saturating_add(offset);
    let to_soft = soft_end.0.saturating_sub(at);
    let want = if to_soft == 0 {
        page
    } else {
        WINDOW.min(to_soft)
    };
    want.min(seg_size.saturating_sub(offset))
}

impl SegmentSource for ServerSegments<'_> {
    fn read_segment(
        &mut self,
        name: &str,
        segno: XLogSegNo,
        offset: u64,
        buf: &mut [u8],
        _lsn: Lsn,
    ) -> Result<Option<usize>, WalReadError> {
        let cached = match &self.window {
            Some((n, start, bytes))
                if n == name && *start <= offset && offset < start + bytes.len() as u64 =>
            {
                Some(&bytes[(offset - start) as usize..])
            }
            _ => None,
        };
        if cached.is_none() {
            let len = window_len(self.seg_size, self.page, self.soft_end, segno, offset);
            if len == 0 {
                return Ok(Some(0));
            }
            let path = format!("pg_wal/{name}");
            let rows = self
                .conn
                .query(
                    "SELECT pg_catalog.pg_read_binary_file($1, $2::int8, $3::int8, true)",
                    &[&path, &offset.to_string(), &len.to_string()],
                    Format::Binary,
                )
                .map_err(|e| {
                    let io = std::io::Error::other(e.to_string());
                    self.failed = Some(e);
                    WalReadError::Io {
                        path: PathBuf::from(&path),
                        source: io,
                    }
                })?;
            let Some(bytes) = rows.get(0, 0) else {
                return Ok(None);
            };
            self.fetched += bytes.len() as u64;
            self.window = Some((name.to_string(), offset, bytes.to_vec()));
        }
        let Some((_, start, bytes)) = &self.window else {
            return Ok(Some(0));
        };
        let from = (offset - start) as usize;
        let have = &bytes[from.min(bytes.len())..];
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        Ok(Some(n))
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("pg_wal of the source server")
    }
}

/// A WAL summary as `pg_available_wal_summaries()` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub tli: TimeLineId,
    pub start: Lsn,
    pub end: Lsn,
}

/// The summaries that cover `[since, …)` without a gap along `history`, in order, and where
/// their coverage ends (at most where the last one ends; `since` when none covers `since`).
/// A summary of the timeline `history` names at a position covers it when it starts at or
/// before it and ends after it; of several, the one reaching furthest is taken.
pub fn cover(
    history: &TimeLineHistory,
    summaries: &[Summary],
    since: Lsn,
    until: Lsn,
) -> (Vec<Summary>, Lsn) {
    let mut used = Vec::new();
    let mut at = since;
    while at < until {
        let Some(tli) = history
            .entries()
            .iter()
            .find(|e| e.contains(at))
            .map(|e| e.tli)
        else {
            break;
        };
        let Some(next) = summaries
            .iter()
            .filter(|s| s.tli == tli && s.start <= at && at < s.end)
            .max_by_key(|s| s.end)
        else {
            break;
        };
        used.push(*next);
        at = next.end;
    }
    (used, at)
}

type Summarized = (Changes, Vec<(TimeLineId, Lsn, Lsn)>, Lsn);

/// The changes the server's WAL summaries record from `since` on, the summaries used, and
/// where they stop; `None` when the server has none covering `since`, or will not show them.
fn from_summaries(
    conn: &mut Conn,
    control: &ControlFileData,
    history: &TimeLineHistory,
    since: Lsn,
    until: Lsn,
) -> Result<Option<Summarized>, SourceError> {
    if conn.server_major() < 17 {
        return Ok(None);
    }
    let answer = summaries_of(conn, control, history, since, until);
    match answer {
        Ok(found) => Ok(found),
        // Not allowed, or summaries gone meanwhile: decoding says the same.
        Err(e) if !e.is_retryable() => Ok(None),
        Err(e) => Err(query_error("the source's WAL summaries", e)),
    }
}

fn summaries_of(
    conn: &mut Conn,
    control: &ControlFileData,
    history: &TimeLineHistory,
    since: Lsn,
    until: Lsn,
) -> Result<Option<Summarized>, PqError> {
    let on = conn.query_one_text(
        "SELECT pg_catalog.current_setting('summarize_wal', true)",
        &[],
    )?;
    if on.as_deref() != Some("on") {
        return Ok(None);
    }
    let rows = conn.query(
        "SELECT tli, start_lsn::text, end_lsn::text \
         FROM pg_catalog.pg_available_wal_summaries()",
        &[],
        Format::Text,
    )?;
    let listed: Vec<Summary> = (0..rows.len())
        .filter_map(|r| {
            Some(Summary {
                tli: rows.text(r, 0)?.parse().ok()?,
                start: rows.text(r, 1)?.parse().ok()?,
                end: rows.text(r, 2)?.parse().ok()?,
            })
        })
        .collect();
    let (used, covered) = cover(history, &listed, since, until);
    if used.is_empty() {
        return Ok(None);
    }
    let mut blocks = ChangedBlocks::default();
    let mut changes = Changes::default();
    let mut truncated: Vec<(RelFileLocator, u32)> = Vec::new();
    for s in &used {
        let rows = conn.query(
            "SELECT relfilenode, reltablespace, reldatabase, relforknumber, relblocknumber, \
                    is_limit_block \
             FROM pg_catalog.pg_wal_summary_contents($1::int8, $2::pg_lsn, $3::pg_lsn)",
            &[&s.tli.to_string(), &s.start.to_string(), &s.end.to_string()],
            Format::Text,
        )?;
        for r in 0..rows.len() {
            let num = |c| rows.text(r, c).and_then(|t| t.parse::<i64>().ok());
            let (Some(rel), Some(spc), Some(db), Some(fork), Some(block)) =
                (num(0), num(1), num(2), num(3), num(4))
            else {
                continue;
            };
            let limit = rows.text(r, 5).as_deref() == Some("t");
            let (Ok(rel), Ok(spc), Ok(db), Ok(block)) = (
                u32::try_from(rel),
                u32::try_from(spc),
                u32::try_from(db),
                u32::try_from(block),
            ) else {
                continue;
            };
            let row = SummaryRow {
                locator: RelFileLocator::new(spc, db, rel),
                main_fork: fork == i64::from(ForkNumber::Main.to_i32()),
                block,
                limit,
            };
            take_row(
                &row,
                &mut blocks,
                &mut changes,
                &mut truncated,
                control.relseg_size,
            );
        }
    }
    // Blocks past a truncation that exist now were written after it: their references may
    // have been dropped with the limit, so all of them count as changed.
    for (locator, limit) in truncated {
        for (segno, size) in segment_sizes(conn, locator, limit, control)? {
            let per_seg = u64::from(control.relseg_size);
            let first = u64::from(segno) * per_seg;
            let end = first + size / u64::from(control.blcksz.max(1));
            for b in first.max(u64::from(limit))..end {
                if let Ok(b) = u32::try_from(b) {
                    blocks.insert(locator, b, control.relseg_size);
                }
            }
        }
    }
    changes.page_map = blocks.into_page_map(control.major);
    Ok(Some((
        changes,
        used.iter().map(|s| (s.tli, s.start, s.end)).collect(),
        covered,
    )))
}

/// One row of `pg_wal_summary_contents`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryRow {
    pub locator: RelFileLocator,
    pub main_fork: bool,
    pub block: u32,
    pub limit: bool,
}

/// Takes one summary row into the changes: a main-fork block changed; a limit of 0 (a
/// relation created or dropped; with relfilenode 0, a whole database) copied whole; a limit
/// past 0 (a truncation) kept to look at the file's size. Other forks are not relation data
/// the page map carries (as in [`failback_common::changes::WalChanges`]).
pub fn take_row(
    row: &SummaryRow,
    blocks: &mut ChangedBlocks,
    changes: &mut Changes,
    truncated: &mut Vec<(RelFileLocator, u32)>,
    relseg_size: u32,
) {
    if !row.main_fork {
        return;
    }
    match (row.limit, row.locator.relNumber, row.block) {
        (false, _, b) => blocks.insert(row.locator, b, relseg_size),
        (true, 0, _) => {
            changes
                .databases
                .insert((row.locator.spcOid, row.locator.dbOid));
        }
        (true, _, 0) => {
            changes.created.insert(row.locator);
        }
        (true, _, limit) => truncated.push((row.locator, limit)),
    }
}

/// The sizes now of the main-fork segment files of `locator` from the one holding block
/// `from` on, as (segment number, bytes), until one does not exist.
fn segment_sizes(
    conn: &mut Conn,
    locator: RelFileLocator,
    from: u32,
    control: &ControlFileData,
) -> Result<Vec<(u32, u64)>, PqError> {
    let mut out = Vec::new();
    let mut segno = from / control.relseg_size.max(1);
    loop {
        let path = segment_path(locator, ForkNumber::Main, segno, control.major);
        let size = conn.query_one_text(
            "SELECT (pg_catalog.pg_stat_file($1, true)).size::text",
            &[&path],
        )?;
        let Some(size) = size.and_then(|s| s.parse::<u64>().ok()) else {
            break;
        };
        out.push((segno, size));
        segno += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> TimeLineHistory {
        // Timeline 1 until 0/5000000, then 2.
        TimeLineHistory::from_switchpoints(2, &[(1, Lsn(0x500_0000), "")]).unwrap()
    }

    fn s(tli: TimeLineId, start: u64, end: u64) -> Summary {
        Summary {
            tli,
            start: Lsn(start),
            end: Lsn(end),
        }
    }

    #[test]
    fn summaries_chain_across_a_timeline_switch_and_stop_at_a_gap() {
        let h = history();
        let listed = [
            s(1, 0x100_0000, 0x300_0000),
            s(1, 0x300_0000, 0x500_0000),
            // Timeline 1 past its switch point is not this history's.
            s(1, 0x500_0000, 0x900_0000),
            s(2, 0x500_0000, 0x600_0000),
            s(2, 0x600_0000, 0x700_0000),
            // A gap: 0/7000000 to 0/7100000 is not summarized.
            s(2, 0x710_0000, 0x800_0000),
        ];
        let (used, covered) = cover(&h, &listed, Lsn(0x200_0000), Lsn(0x800_0000));
        assert_eq!(
            used,
            vec![listed[0], listed[1], listed[3], listed[4]],
            "{used:?}"
        );
        assert_eq!(covered, Lsn(0x700_0000));
        // The end is reached before the summaries end.
        let (used, covered) = cover(&h, &listed, Lsn(0x200_0000), Lsn(0x280_0000));
        assert_eq!((used.len(), covered), (1, Lsn(0x300_0000)));
        // Nothing covers the start: nothing is used.
        assert_eq!(
            cover(&h, &listed, Lsn(0x700_0000), Lsn(0x800_0000)),
            (vec![], Lsn(0x700_0000))
        );
        // The longer of two overlapping summaries is taken.
        let two = [s(2, 0x500_0000, 0x600_0000), s(2, 0x400_0000, 0x680_0000)];
        assert_eq!(
            cover(&h, &two, Lsn(0x500_0000), Lsn(0x900_0000)),
            (vec![two[1]], Lsn(0x680_0000))
        );
    }

    #[test]
    fn limit_blocks_mean_created_databases_and_truncations() {
        let loc = RelFileLocator::new(1663, 5, 16384);
        let mut blocks = ChangedBlocks::default();
        let mut changes = Changes::default();
        let mut truncated = Vec::new();
        let row = |locator, main_fork, block, limit| SummaryRow {
            locator,
            main_fork,
            block,
            limit,
        };
        for r in [
            row(loc, true, 7, false),
            row(loc, false, 9, false),
            row(RelFileLocator::new(1663, 5, 16390), true, 0, true),
            row(RelFileLocator::new(1663, 16400, 0), true, 0, true),
            row(loc, true, 3, true),
            row(RelFileLocator::new(1663, 5, 16391), false, 0, true),
        ] {
            take_row(&r, &mut blocks, &mut changes, &mut truncated, 131072);
        }
        let map = blocks.into_page_map(failback_common::PgMajor::V17);
        assert_eq!(
            map.files["base/5/16384"].iter().collect::<Vec<_>>(),
            vec![7]
        );
        assert_eq!(map.files.len(), 1);
        assert!(changes.copies_whole(RelFileLocator::new(1663, 5, 16390)));
        assert!(!changes.copies_whole(RelFileLocator::new(1663, 5, 16391)));
        assert!(changes.databases.contains(&(1663, 16400)));
        assert_eq!(truncated, vec![(loc, 3)]);
    }

    #[test]
    fn reads_stop_at_the_page_holding_the_end_then_go_a_page_at_a_time() {
        let seg = 16u64 << 20;
        let page = 8192;
        let until = Lsn(seg * 3 + 100_000);
        let soft_end = Lsn((until.0 / page + 1) * page);
        let len = |segno, offset| window_len(seg, page, soft_end, segno, offset);
        // A whole window inside the stretch; the segment's tail; the end's page; past it.
        assert_eq!(len(1, 0), WINDOW);
        assert_eq!(len(1, seg - 1000), 1000);
        assert_eq!(len(3, 0), 106_496);
        assert_eq!(len(3, 106_496), page);
        assert_eq!(len(3, seg - 10), 10);
    }
}
