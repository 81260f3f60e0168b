//! Timeline history files (`access/transam/timeline.c`, `pg_rewind/timeline.c`).
//!
//! Every promotion (and every point-in-time recovery that ends) starts a new *timeline*: WAL
//! written afterwards carries the new timeline id (TLI) in its file names and page headers, so
//! two servers that were once one can both write "0/5000000" without their WAL files colliding.
//! When timeline N starts, the server writes `pg_wal/%08X.history` for N: a copy of its parent's
//! history file followed by one line
//!
//! ```text
//! <parentTLI>\t<switchpoint %X/%X>\t<reason>\n
//! ```
//!
//! preceded by an empty line when the parent had a file itself. The *switchpoint* is where the
//! parent timeline ends and N begins: the end of the last record replayed from the parent.
//! Timeline 1 has no history file.
//!
//! Read back, a history is a list of entries {tli, begin, end}: each line gives one ancestor,
//! beginning where the previous one ended (0 for the first) and ending at its switchpoint, and
//! the file's own timeline is appended with an open end (PostgreSQL's `InvalidXLogRecPtr`,
//! here `None`).
//!
//! pg_rewind compares the source's and the target's histories to find where they diverged
//! ([`find_common_ancestor`]) and walks the target's history while reading its WAL, opening
//! each segment from the timeline that owns it ([`timeline_for_segment`]).

use serde::{Serialize, Serializer};

use crate::control::serialize_lsn;
use crate::{Lsn, TimeLineId, XLogSegNo};

/// What is wrong with a history file, or with two histories pg_rewind compares.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// A line PostgreSQL could not scan; `expected` is PostgreSQL's hint, verbatim.
    #[error("syntax error in history file {name} at line {line}: {text:?}: {expected}")]
    Syntax {
        name: String,
        line: usize,
        text: String,
        expected: &'static str,
    },

    #[error(
        "invalid data in history file {name} at line {line}: {text:?}: Timeline IDs must be in \
         increasing sequence (timeline {tli} after timeline {previous})."
    )]
    NotIncreasing {
        name: String,
        line: usize,
        text: String,
        tli: TimeLineId,
        previous: TimeLineId,
    },

    #[error(
        "invalid data in history file {name}: Timeline IDs must be less than child timeline's \
         ID (the file lists timeline {last} but belongs to timeline {own})."
    )]
    NotBelowOwn {
        name: String,
        last: TimeLineId,
        own: TimeLineId,
    },

    /// PostgreSQL never writes a 0/0 switchpoint; it would mean "no end" and make the history
    /// ambiguous, so it is refused (PostgreSQL itself does not check).
    #[error(
        "invalid data in history file {name} at line {line}: {text:?}: switchpoint 0/0 is not \
         a valid write-ahead log location"
    )]
    ZeroSwitchpoint {
        name: String,
        line: usize,
        text: String,
    },

    #[error(
        "could not find common ancestor of the source and target cluster's timelines (source \
         timeline {source_tli} descends from timeline {source_root}, target timeline \
         {target_tli} from timeline {target_root})"
    )]
    NoCommonAncestor {
        source_tli: TimeLineId,
        source_root: TimeLineId,
        target_tli: TimeLineId,
        target_root: TimeLineId,
    },

    #[error("source and target cluster are on the same timeline ({tli})")]
    SameTimeline { tli: TimeLineId },
}

const EXPECTED_TLI: &str = "Expected a numeric timeline ID.";
const EXPECTED_SWITCHPOINT: &str = "Expected a write-ahead log switchpoint location.";

/// `TimeLineHistoryEntry`: timeline `tli` covers WAL positions `begin..end`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimeLineHistoryEntry {
    pub tli: TimeLineId,
    #[serde(serialize_with = "serialize_lsn")]
    pub begin: Lsn,
    /// The switchpoint to the next timeline; `None` for the history's own (current) timeline,
    /// which has not ended.
    #[serde(serialize_with = "serialize_opt_lsn")]
    pub end: Option<Lsn>,
    /// The reason text of the line, as written (empty for the own timeline).
    pub reason: String,
}

fn serialize_opt_lsn<S: Serializer>(v: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(l) => s.collect_str(l),
        None => s.serialize_none(),
    }
}

impl TimeLineHistoryEntry {
    /// Whether `lsn` lies on this timeline's stretch of the history (`begin <= lsn < end`).
    pub fn contains(&self, lsn: Lsn) -> bool {
        self.begin <= lsn && self.end.is_none_or(|end| lsn < end)
    }
}

/// The parsed history of one timeline: its ancestors oldest first, then itself.
/// Never empty; only the last entry has `end == None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct TimeLineHistory {
    entries: Vec<TimeLineHistoryEntry>,
}

impl TimeLineHistory {
    /// The history of a timeline without a history file (timeline 1): one open entry.
    pub fn single(tli: TimeLineId) -> TimeLineHistory {
        TimeLineHistory {
            entries: vec![TimeLineHistoryEntry {
                tli,
                begin: Lsn::INVALID,
                end: None,
                reason: String::new(),
            }],
        }
    }

    /// Parses the contents of the history file of timeline `own_tli`; `name` (usually the file
    /// name, `0000000A.history`) is used in error messages.
    ///
    /// Follows pg_rewind's parser: lines are separated by LF; blank lines and lines whose first
    /// non-blank character is `#` are skipped; each other line must start with a decimal
    /// timeline id, then white space, then an `%X/%X` switchpoint; the rest of the line is the
    /// reason. Timeline ids must increase and stay below `own_tli`.
    pub fn parse(
        bytes: &[u8],
        own_tli: TimeLineId,
        name: &str,
    ) -> Result<TimeLineHistory, HistoryError> {
        let mut lines = Vec::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line_no = i + 1;
            let text = String::from_utf8_lossy(raw);
            let trimmed = text.trim_start_matches(is_c_space);
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let syntax = |expected| HistoryError::Syntax {
                name: name.to_string(),
                line: line_no,
                text: text.to_string(),
                expected,
            };
            let digits_end = trimmed
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(trimmed.len());
            let (digits, rest) = trimmed.split_at(digits_end);
            let tli: TimeLineId = digits.parse().map_err(|_| syntax(EXPECTED_TLI))?;
            let after_space = rest.trim_start_matches(is_c_space);
            if after_space.len() == rest.len() {
                return Err(syntax(EXPECTED_SWITCHPOINT));
            }
            let token_end = after_space.find(is_c_space).unwrap_or(after_space.len());
            let (token, reason) = after_space.split_at(token_end);
            let switchpoint: Lsn = token.parse().map_err(|_| syntax(EXPECTED_SWITCHPOINT))?;
            let reason = reason.trim_matches(is_c_space).to_string();
            lines.push((line_no, text.to_string(), tli, switchpoint, reason));
        }
        Self::build(name, own_tli, lines)
    }

    /// A history from its ancestors' (tli, switchpoint, reason), oldest first, checked like a
    /// parsed file.
    pub fn from_switchpoints(
        own_tli: TimeLineId,
        switches: &[(TimeLineId, Lsn, &str)],
    ) -> Result<TimeLineHistory, HistoryError> {
        let lines = switches
            .iter()
            .enumerate()
            .map(|(i, &(tli, sp, reason))| {
                (
                    i + 1,
                    format!("{tli}\t{sp}\t{reason}"),
                    tli,
                    sp,
                    reason.to_string(),
                )
            })
            .collect();
        Self::build("<constructed history>", own_tli, lines)
    }

    #[allow(clippy::type_complexity)]
    fn build(
        name: &str,
        own_tli: TimeLineId,
        lines: Vec<(usize, String, TimeLineId, Lsn, String)>,
    ) -> Result<TimeLineHistory, HistoryError> {
        let mut entries: Vec<TimeLineHistoryEntry> = Vec::with_capacity(lines.len() + 1);
        let mut prev_end = Lsn::INVALID;
        for (line, text, tli, switchpoint, reason) in lines {
            if let Some(last) = entries.last()
                && tli <= last.tli
            {
                return Err(HistoryError::NotIncreasing {
                    name: name.to_string(),
                    line,
                    text,
                    tli,
                    previous: last.tli,
                });
            }
            if !switchpoint.is_valid() {
                return Err(HistoryError::ZeroSwitchpoint {
                    name: name.to_string(),
                    line,
                    text,
                });
            }
            entries.push(TimeLineHistoryEntry {
                tli,
                begin: prev_end,
                end: Some(switchpoint),
                reason,
            });
            prev_end = switchpoint;
        }
        if let Some(last) = entries.last()
            && own_tli <= last.tli
        {
            return Err(HistoryError::NotBelowOwn {
                name: name.to_string(),
                last: last.tli,
                own: own_tli,
            });
        }
        entries.push(TimeLineHistoryEntry {
            tli: own_tli,
            begin: prev_end,
            end: None,
            reason: String::new(),
        });
        Ok(TimeLineHistory { entries })
    }

    /// The entries, oldest first; the last one is the history's own timeline.
    pub fn entries(&self) -> &[TimeLineHistoryEntry] {
        &self.entries
    }

    /// The timeline this history belongs to.
    pub fn own_tli(&self) -> TimeLineId {
        self.last().tli
    }

    fn last(&self) -> &TimeLineHistoryEntry {
        // `entries` is never empty by construction; the fallback keeps this total anyway.
        static EMPTY: TimeLineHistoryEntry = TimeLineHistoryEntry {
            tli: 0,
            begin: Lsn::INVALID,
            end: None,
            reason: String::new(),
        };
        self.entries.last().unwrap_or(&EMPTY)
    }

    /// The entry of timeline `tli`, if it is in this history.
    pub fn entry(&self, tli: TimeLineId) -> Option<&TimeLineHistoryEntry> {
        self.entries.iter().find(|e| e.tli == tli)
    }

    /// The timeline that `lsn` belongs to in this history (`tliOfPointInHistory`).
    pub fn tli_of_point(&self, lsn: Lsn) -> Option<TimeLineId> {
        self.entries.iter().find(|e| e.contains(lsn)).map(|e| e.tli)
    }

    /// The history file's text, as PostgreSQL would have written it: one line per ancestor,
    /// every line after the first preceded by an empty line. Timeline 1 (one entry) gives "".
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let ancestors = self.entries.len().saturating_sub(1);
        for (i, e) in self.entries.iter().take(ancestors).enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let end = e.end.unwrap_or(Lsn::INVALID);
            out.push_str(&format!("{}\t{}\t{}\n", e.tli, end, e.reason));
        }
        out
    }
}

/// C `isspace` in the "C" locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\u{0b}' | '\u{0c}')
}

/// Where two histories part (pg_rewind's `findCommonAncestorTimeline`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CommonAncestor {
    /// `divergerec`: the first WAL position that is not shared; the earlier of the two
    /// histories' ends of the last common timeline.
    #[serde(serialize_with = "serialize_lsn")]
    pub divergerec: Lsn,
    /// The last timeline both histories share.
    pub tli: TimeLineId,
    /// Its index in both histories (pg_rewind's `lastcommontliIndex`): reading the target's WAL
    /// backwards from the divergence starts with this entry.
    pub index: usize,
}

/// Finds the last timeline `source` and `target` share and where they diverged, as pg_rewind
/// does: scan both lists from the start to the first index where the timeline id **or** its
/// begin position differs; the entry before it is the common ancestor, and the divergence point
/// is the earlier of its two ends, an open end counting as infinite.
///
/// The target may have switched timelines after the fork (a standby promoted later): its
/// history is then longer than the source's and the comparison stops at the source's end.
pub fn find_common_ancestor(
    source: &TimeLineHistory,
    target: &TimeLineHistory,
) -> Result<CommonAncestor, HistoryError> {
    let shared = source
        .entries
        .iter()
        .zip(target.entries.iter())
        .take_while(|(s, t)| s.tli == t.tli && s.begin == t.begin)
        .count();
    let Some(index) = shared.checked_sub(1) else {
        return Err(HistoryError::NoCommonAncestor {
            source_tli: source.own_tli(),
            source_root: source.entries.first().map_or(0, |e| e.tli),
            target_tli: target.own_tli(),
            target_root: target.entries.first().map_or(0, |e| e.tli),
        });
    };
    let (Some(s), Some(t)) = (source.entries.get(index), target.entries.get(index)) else {
        return Err(HistoryError::SameTimeline {
            tli: source.own_tli(),
        });
    };
    // MinXLogRecPtr: an open end is infinite.
    let divergerec = match (s.end, t.end) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return Err(HistoryError::SameTimeline { tli: s.tli }),
    };
    Ok(CommonAncestor {
        divergerec,
        tli: s.tli,
        index,
    })
}

/// The index of the history entry whose timeline's WAL file holds segment `segno`, when
/// reading from a position tracked at `start_index` (pg_rewind's `SimpleXLogPageRead`).
///
/// A segment that contains a switch point exists under both timelines' names — the new
/// timeline's copy has the parent's WAL up to the switch point and the new WAL after it — so it
/// is read from the newer timeline: move forward while the entry ends before the segment's end,
/// backward while the entry begins at or after it. `start_index` matters only for histories
/// whose switchpoints go backwards (a point-in-time recovery that stopped before an earlier
/// switch); pass the index pg_rewind would hold (the common ancestor's index when reading
/// forward from the last common checkpoint, the last index when reading the target's latest
/// checkpoint).
pub fn timeline_index_for_segment(
    history: &TimeLineHistory,
    start_index: usize,
    segno: XLogSegNo,
    seg_size: u32,
) -> usize {
    let entries = &history.entries;
    let last = entries.len().saturating_sub(1);
    // XLogSegNoOffsetToRecPtr(segno + 1, 0): the first byte after the segment.
    let seg_end = Lsn(segno.saturating_add(1).saturating_mul(u64::from(seg_size)));
    let mut i = start_index.min(last);
    while i < last
        && entries
            .get(i)
            .and_then(|e| e.end)
            .is_some_and(|end| end < seg_end)
    {
        i += 1;
    }
    while i > 0 && entries.get(i).is_some_and(|e| e.begin >= seg_end) {
        i -= 1;
    }
    i
}

/// The timeline whose WAL file holds segment `segno` (see [`timeline_index_for_segment`]),
/// for a history whose switchpoints never go backwards.
pub fn timeline_for_segment(
    history: &TimeLineHistory,
    segno: XLogSegNo,
    seg_size: u32,
) -> TimeLineId {
    let i = timeline_index_for_segment(history, 0, segno, seg_size);
    history.entries.get(i).map_or(0, |e| e.tli)
}

/// The name of the WAL file that holds segment `segno` of `history` (its timeline's, per
/// [`timeline_for_segment`]).
pub fn segment_file_name(history: &TimeLineHistory, segno: XLogSegNo, seg_size: u32) -> String {
    crate::lsn::wal_file_name(
        timeline_for_segment(history, segno, seg_size),
        segno,
        seg_size,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    fn hist(own: TimeLineId, sw: &[(TimeLineId, &str)]) -> TimeLineHistory {
        let v: Vec<(TimeLineId, Lsn, &str)> = sw.iter().map(|&(t, l)| (t, lsn(l), "x")).collect();
        TimeLineHistory::from_switchpoints(own, &v).unwrap()
    }

    #[test]
    fn parses_pg_format_with_comments_and_blank_lines() {
        let text = b"# comment\n\n1\t0/30034B0\tno recovery target specified\n\n  \t\n\
                     3 \t 0/5000000 before 2000-01-01 00:00:00+00\n";
        let h = TimeLineHistory::parse(text, 4, "00000004.history").unwrap();
        let e = h.entries();
        assert_eq!(e.len(), 3);
        assert_eq!(
            (e[0].tli, e[0].begin, e[0].end),
            (1, Lsn(0), Some(lsn("0/30034B0")))
        );
        assert_eq!(e[0].reason, "no recovery target specified");
        assert_eq!(
            (e[1].tli, e[1].begin, e[1].end),
            (3, lsn("0/30034B0"), Some(lsn("0/5000000")))
        );
        assert_eq!(e[1].reason, "before 2000-01-01 00:00:00+00");
        assert_eq!(
            (e[2].tli, e[2].begin, e[2].end),
            (4, lsn("0/5000000"), None)
        );
        assert_eq!(h.own_tli(), 4);
    }

    #[test]
    fn empty_file_is_own_timeline_only() {
        let h = TimeLineHistory::parse(b"", 7, "x").unwrap();
        assert_eq!(h, TimeLineHistory::single(7));
        assert_eq!(h.to_text(), "");
    }

    #[test]
    fn errors_name_file_line_and_expectation() {
        let e = TimeLineHistory::parse(b"1\t0/10\tx\nbogus\n", 5, "00000005.history").unwrap_err();
        assert_eq!(
            e.to_string(),
            "syntax error in history file 00000005.history at line 2: \"bogus\": \
             Expected a numeric timeline ID."
        );
        for bad in [
            &b"7\n"[..],
            b"7 x/y",
            b"7\t0/123456789",
            b"7/0/10",
            b"7\t/10",
        ] {
            let e = TimeLineHistory::parse(bad, 9, "f").unwrap_err();
            assert!(
                matches!(e, HistoryError::Syntax { expected, line: 1, .. } if expected == EXPECTED_SWITCHPOINT),
                "{bad:?}: {e}"
            );
        }
        let e = TimeLineHistory::parse(b"99999999999\t0/1", 9, "f").unwrap_err();
        assert!(matches!(e, HistoryError::Syntax { expected, .. } if expected == EXPECTED_TLI));
        let e = TimeLineHistory::parse(b"2\t0/10\n1\t0/20\n", 5, "f").unwrap_err();
        assert!(matches!(
            e,
            HistoryError::NotIncreasing {
                line: 2,
                tli: 1,
                previous: 2,
                ..
            }
        ));
        let e = TimeLineHistory::parse(b"2\t0/10\n2\t0/20\n", 5, "f").unwrap_err();
        assert!(matches!(e, HistoryError::NotIncreasing { line: 2, .. }));
        let e = TimeLineHistory::parse(b"14\t0/10\tx\n", 14, "0000000E.history").unwrap_err();
        assert_eq!(
            e,
            HistoryError::NotBelowOwn {
                name: "0000000E.history".into(),
                last: 14,
                own: 14
            }
        );
        let e = TimeLineHistory::parse(b"1\t0/0\tx\n", 2, "f").unwrap_err();
        assert!(matches!(e, HistoryError::ZeroSwitchpoint { line: 1, .. }));
    }

    #[test]
    fn text_round_trip_matches_postgres_layout() {
        let h = hist(4, &[(1, "0/4007E38"), (2, "0/7007E38"), (3, "0/A007E38")]);
        assert_eq!(
            h.to_text(),
            "1\t0/4007E38\tx\n\n2\t0/7007E38\tx\n\n3\t0/A007E38\tx\n"
        );
        assert_eq!(
            TimeLineHistory::parse(h.to_text().as_bytes(), 4, "f").unwrap(),
            h
        );
    }

    #[test]
    fn divergence_of_siblings() {
        // Old primary still on 1; the promoted standby on 2 from 0/3000000.
        let target = TimeLineHistory::single(1);
        let source = hist(2, &[(1, "0/3000000")]);
        let c = find_common_ancestor(&source, &target).unwrap();
        assert_eq!(
            c,
            CommonAncestor {
                divergerec: lsn("0/3000000"),
                tli: 1,
                index: 0
            }
        );
        // Symmetric.
        assert_eq!(find_common_ancestor(&target, &source).unwrap(), c);
        // Two standbys promoted from 1 at different points: the earlier switch wins.
        let a = hist(2, &[(1, "0/3000000")]);
        let b = hist(3, &[(1, "0/2800000")]);
        assert_eq!(
            find_common_ancestor(&a, &b).unwrap().divergerec,
            lsn("0/2800000")
        );
    }

    #[test]
    fn divergence_when_target_switched_timelines_after_the_fork() {
        // Source: 1 -> 2 at 0/3000000, still on 2. Target was a standby following 2 that was
        // itself promoted to 3 at 0/5000000, and later to 4.
        let source = hist(2, &[(1, "0/3000000")]);
        let target = hist(4, &[(1, "0/3000000"), (2, "0/5000000"), (3, "0/6000000")]);
        let c = find_common_ancestor(&source, &target).unwrap();
        assert_eq!(
            c,
            CommonAncestor {
                divergerec: lsn("0/5000000"),
                tli: 2,
                index: 1
            }
        );
        // And the other way round (source is the longer one).
        let c = find_common_ancestor(&target, &source).unwrap();
        assert_eq!(c.divergerec, lsn("0/5000000"));
    }

    #[test]
    fn same_tli_different_begin_is_a_fork() {
        // Timeline 2 created twice from different points of 1 (a TLI reused after a lost
        // history file): tli matches, begin does not.
        let a = hist(3, &[(1, "0/3000000"), (2, "0/4000000")]);
        let b = hist(3, &[(1, "0/3000000"), (2, "0/4800000")]);
        assert_eq!(
            find_common_ancestor(&a, &b).unwrap().divergerec,
            lsn("0/4000000")
        );
        let a = TimeLineHistory::parse(b"2\t0/100", 3, "a").unwrap();
        let b = TimeLineHistory::parse(b"1\t0/100", 3, "b").unwrap();
        let e = find_common_ancestor(&a, &b).unwrap_err();
        assert!(e.to_string().starts_with(
            "could not find common ancestor of the source and target cluster's timelines"
        ));
        assert_eq!(
            find_common_ancestor(&TimeLineHistory::single(1), &TimeLineHistory::single(1)),
            Err(HistoryError::SameTimeline { tli: 1 })
        );
    }

    #[test]
    fn segment_with_switch_point_is_read_from_newer_timeline() {
        let seg = 16 << 20;
        // Switch 1 -> 2 in the middle of segment 3, 2 -> 3 exactly at the start of segment 5.
        let h = hist(3, &[(1, "0/3007E38"), (2, "0/5000000")]);
        assert_eq!(timeline_for_segment(&h, 0, seg), 1);
        assert_eq!(timeline_for_segment(&h, 2, seg), 1);
        assert_eq!(timeline_for_segment(&h, 3, seg), 2);
        assert_eq!(
            segment_file_name(&h, 3, seg),
            crate::lsn::wal_file_name(2, 3, seg)
        );
        assert_eq!(timeline_for_segment(&h, 4, seg), 2);
        assert_eq!(timeline_for_segment(&h, 5, seg), 3);
        assert_eq!(timeline_for_segment(&h, 1000, seg), 3);
        assert_eq!(timeline_for_segment(&h, u64::MAX, seg), 3);
        // Any start index gives the same answer for a monotone history.
        for start in 0..5 {
            assert_eq!(timeline_index_for_segment(&h, start, 3, seg), 1);
            assert_eq!(timeline_index_for_segment(&h, start, 4, seg), 1);
            assert_eq!(timeline_index_for_segment(&h, start, 2, seg), 0);
        }
    }

    #[test]
    fn tli_of_point() {
        let h = hist(3, &[(1, "0/3007E38"), (2, "0/5000000")]);
        assert_eq!(h.tli_of_point(lsn("0/0")), Some(1));
        assert_eq!(h.tli_of_point(lsn("0/3007E37")), Some(1));
        assert_eq!(h.tli_of_point(lsn("0/3007E38")), Some(2));
        assert_eq!(h.tli_of_point(lsn("FF/0")), Some(3));
    }
}
