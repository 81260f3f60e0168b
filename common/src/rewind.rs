//! The decisions of a rewind, as pure functions of what the two clusters say.
//!
//! 1. Whether the two clusters can be rewound into each other at all (pg_rewind's
//!    `sanityChecks`): one system, one version and geometry, hint-bit changes WAL-logged on the
//!    target, both shut down cleanly unless the source is served live.
//! 2. Where the target's WAL ends (its last checkpoint record's end, or its minimum recovery
//!    point when it was a standby), and so whether it wrote anything past the divergence.
//! 3. What the rewound node replays to become consistent, and how far: the WAL written during
//!    the backup window a running source was copied in (from the window's start to where
//!    `pg_backup_stop` said it ends), or, from a shut-down source, its WAL from its last
//!    checkpoint's redo pointer to where its WAL ends. That end becomes the target's
//!    `minRecoveryPoint`, so it does not open before it has replayed that far.
//! 4. What a resumed rewind from a running source must copy again: what the earlier run
//!    recorded as done is the source's as of the earlier window; the source may have changed it
//!    since ([`forget_stale`]).
//! 5. Whether a target is a finished rewind not yet started ([`already_rewound`]).
//!
//! Nothing here reads a file or a clock: the shells in the client feed control files and
//! answers in and act on the results, and these functions are tested in microseconds.

use std::collections::BTreeMap;

use crate::changes::Changes;
use crate::control::{ControlFileData, DBState};
use crate::journal::RangeSet;
use crate::lsn::{Lsn, TimeLineId, XLogSegNo};

/// Why two clusters cannot be rewound into each other (pg_rewind's `sanityChecks`, plus the
/// geometry a block copy depends on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error(
        "clusters are not compatible: source is PostgreSQL {source_major} (catalog \
         {source_catalog}), target is PostgreSQL {target_major} (catalog {target_catalog}); a \
         rewind only works between clusters of the same version"
    )]
    Version {
        source_major: crate::PgMajor,
        source_catalog: u32,
        target_major: crate::PgMajor,
        target_catalog: u32,
    },
    #[error(
        "source and target clusters are from different systems (source system identifier \
         {source_id}, target {target_id}); a rewind only works between a primary and its former \
         standby"
    )]
    System { source_id: u64, target_id: u64 },
    #[error(
        "clusters have different block or WAL segment sizes (source {source_block}/{source_segment}, \
         target {target_block}/{target_segment})"
    )]
    Geometry {
        source_block: u32,
        source_segment: u32,
        target_block: u32,
        target_segment: u32,
    },
    #[error(
        "target server needs to use either data checksums or \"wal_log_hints = on\"; without \
         them, hint-bit changes are not in the WAL and the rewind could miss changed blocks"
    )]
    HintBits,
    #[error("target server must be shut down cleanly (its state is \"{0}\")")]
    TargetNotShutDown(DBState),
    #[error(
        "source data directory must be shut down cleanly (its state is \"{0}\"); stop the source \
         server, or serve it with `failbackd --pg-conn` to rewind from it running"
    )]
    SourceNotShutDown(DBState),
}

/// Whether `source` and `target` can be rewound into each other. The versions are compared
/// first: clusters of two versions are also two systems, and the version is the more useful
/// thing to be told. A live source is not expected to be shut down; the target's own state is
/// [`check_target_state`]'s, as it may still go through crash recovery.
pub fn check_pair(
    source: &ControlFileData,
    target: &ControlFileData,
    source_live: bool,
) -> Result<(), Incompatible> {
    if source.major != target.major || source.catalog_version_no != target.catalog_version_no {
        return Err(Incompatible::Version {
            source_major: source.major,
            source_catalog: source.catalog_version_no,
            target_major: target.major,
            target_catalog: target.catalog_version_no,
        });
    }
    if source.system_identifier != target.system_identifier {
        return Err(Incompatible::System {
            source_id: source.system_identifier,
            target_id: target.system_identifier,
        });
    }
    if source.blcksz != target.blcksz || source.xlog_seg_size != target.xlog_seg_size {
        return Err(Incompatible::Geometry {
            source_block: source.blcksz,
            source_segment: source.xlog_seg_size,
            target_block: target.blcksz,
            target_segment: target.xlog_seg_size,
        });
    }
    if !target.hint_bits_logged() {
        return Err(Incompatible::HintBits);
    }
    if !source_live && !source.state.is_shut_down_cleanly() {
        return Err(Incompatible::SourceNotShutDown(source.state));
    }
    Ok(())
}

/// The target must have been shut down cleanly before anything is planned from its WAL.
pub fn check_target_state(target: &ControlFileData) -> Result<(), Incompatible> {
    if target.state.is_shut_down_cleanly() {
        Ok(())
    } else {
        Err(Incompatible::TargetNotShutDown(target.state))
    }
}

/// Where the WAL of a shut-down cluster ends, and on which timeline: its last checkpoint, or,
/// for a standby shut down past its last restartpoint, its minimum recovery point (its data
/// files may hold changes up to there).
pub fn shut_down_end(control: &ControlFileData) -> (Lsn, TimeLineId) {
    if control.state == DBState::ShutdownedInRecovery
        && control.minRecoveryPoint > control.checkPoint
    {
        (control.minRecoveryPoint, control.minRecoveryPointTLI)
    } else {
        (control.checkPoint, control.checkPointCopy.ThisTimeLineID)
    }
}

/// Where the target's WAL ends: the end of its last checkpoint record, or its minimum recovery
/// point if it was a standby that got further. A rewind is needed only when this lies past the
/// divergence point.
pub fn target_wal_end(checkpoint_record_end: Lsn, target: &ControlFileData) -> Lsn {
    checkpoint_record_end.max(target.minRecoveryPoint)
}

/// The WAL segments (first and last, inclusive) a node replays from `start` to `end`: the
/// bytes `[start, end)`. An `end` on a segment boundary (where an `XLOG_SWITCH` record ends,
/// as `pg_backup_stop`'s does) needs nothing of the segment it begins, which may not exist yet
/// on an idle server.
pub fn wal_segments(start: Lsn, end: Lsn, seg_size: u32) -> (XLogSegNo, XLogSegNo) {
    let first = start.segment_number(seg_size);
    let last_byte = Lsn(end.0.saturating_sub(1));
    (first, last_byte.segment_number(seg_size).max(first))
}

/// Whether the commit must fetch segment `segno` of a window's WAL, or the target holds it
/// already: whole (`whole_on_target`) and either copied with the plan (`planned`, a segment of
/// the source's WAL since the divergence complete when the window opened) or wholly before the
/// `divergence` (the same bytes on both sides; a window opened at the last common checkpoint
/// starts among them).
pub fn window_segment_needed(
    segno: XLogSegNo,
    divergence: Lsn,
    seg_size: u32,
    whole_on_target: bool,
    planned: bool,
) -> bool {
    let shared = divergence != NO_DIVERGENCE && segno < divergence.segment_number(seg_size);
    !(whole_on_target && (planned || shared))
}

/// How much of window segment `segno` the commit fetches: all of it, but for the segment the
/// window's WAL ends in (at `end`), only to the end of the page `end` lies in. What follows in
/// that segment is zeros, a recycled segment's stale pages, or WAL the source wrote after the
/// window, none of which recovery to `end` reads; the rest of the file is allocated as zeros,
/// as a new segment's is (`wal_init_zero`), and a standby that streams on from the source writes
/// over it from the segment's start.
pub fn window_segment_fetch(segno: XLogSegNo, end: Lsn, seg_size: u32, page_size: u32) -> u64 {
    let seg = u64::from(seg_size);
    let last_byte = Lsn(end.0.saturating_sub(1));
    if last_byte.segment_number(seg_size) != segno {
        return seg;
    }
    let in_segment = end.0 - segno * seg;
    in_segment.next_multiple_of(u64::from(page_size)).min(seg)
}

/// The WAL a copy of a shut-down source replays to become consistent: from its last checkpoint's
/// redo pointer to where its WAL ends ([`shut_down_end`]; for a primary, the checkpoint itself).
pub fn shut_down_replay(source: &ControlFileData) -> (Lsn, Lsn) {
    (source.checkPointCopy.redo, shut_down_end(source).0)
}

/// The rewound target's `minRecoveryPoint` and its timeline: where the backup window's WAL ends
/// (`pg_backup_stop`'s answer), else where the shut-down source's WAL ends.
pub fn min_recovery_point(
    source_after: &ControlFileData,
    window_end: Option<(Lsn, TimeLineId)>,
) -> (Lsn, TimeLineId) {
    window_end.unwrap_or_else(|| shut_down_end(source_after))
}

/// The first segment number the target's recycled WAL segments ([`crate::plan::Reason::Recycled`])
/// are renamed to: past every segment in its `pg_wal` (`present`, of any timeline, partial ones
/// too) and past `last_replayed`, the last the rewound node replays. A segment's pages name
/// the place in WAL they were written for (`xlp_pageaddr`), never past the segment's own
/// name (PostgreSQL recycles only to later names); under a name past every segment there is,
/// they can never pass for the WAL that name will hold. Recovery that reaches such a segment
/// finds a page address it did not expect and takes it for the end of WAL
/// (`XLogReaderValidatePageHeader`, `src/backend/access/transam/xlogreader.c`), and the server
/// writes over it when its WAL gets there, as over the segments it recycles itself.
pub fn first_recycled_segment(
    present: impl IntoIterator<Item = XLogSegNo>,
    last_replayed: XLogSegNo,
) -> XLogSegNo {
    present.into_iter().fold(last_replayed, XLogSegNo::max) + 1
}

/// What a resumed rewind from a running source must copy again. The earlier run copied under a
/// backup window that has ended; replay from the new window's start repairs only what changes
/// after it. So what the earlier run recorded as done (`done`, per path) is kept only where the
/// source has not changed it since the earlier window began: relation blocks its WAL does not
/// name in `since_then` (everything of relation files when that is unknown), and nothing of
/// other files (an SLRU page written meanwhile, say, which replay from the new start would not
/// repeat). `relation` says whether a path is a relation's main-fork segment.
pub fn forget_stale(
    done: &mut BTreeMap<String, RangeSet>,
    since_then: Option<&Changes>,
    block_size: u32,
    relation: &dyn Fn(&str) -> Option<crate::relpath::RelFileLocator>,
) {
    let bs = u64::from(block_size);
    done.retain(|path, ranges| {
        let (Some(changes), Some(locator)) = (since_then, relation(path)) else {
            return false;
        };
        if changes.copies_whole(locator) {
            return false;
        }
        if let Some(blocks) = changes.page_map.files.get(path) {
            for b in blocks.iter() {
                ranges.remove(u64::from(b) * bs, bs);
            }
        }
        ranges.bytes() > 0
    });
}

/// The divergence of a resync whose target is on the source's own timeline: there is none,
/// so no WAL of the target's lies past it.
pub const NO_DIVERGENCE: Lsn = Lsn(u64::MAX);

/// The label failback gives the backup windows it copies in (`LABEL:` of the backup label),
/// whether the server opened the window or failback made it from a control file.
pub const WINDOW_LABEL: &str = "failback rewind";

/// Whether a target is what a finished rewind leaves before its first start: a control file
/// "in archive recovery" and a `backup_label` a rewind wrote (failback's window label, or
/// pg_rewind's `BACKUP METHOD: pg_rewind`). Crash recovery in single-user mode would fail on
/// it, and a second rewind has nothing to do.
pub fn already_rewound(target: &ControlFileData, backup_label: Option<&str>) -> bool {
    let ours = format!("LABEL: {WINDOW_LABEL}");
    target.state == DBState::InArchiveRecovery
        && backup_label.is_some_and(|l| {
            l.lines()
                .any(|l| l.trim() == "BACKUP METHOD: pg_rewind" || l.trim() == ours)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PgMajor;
    use crate::control::PG_CONTROL_FILE_SIZE;
    use crate::relpath::RelFileLocator;

    /// Whole segments but the last, which is fetched to the end of the page the window ends in.
    #[test]
    fn the_window_segment_it_ends_in_is_fetched_to_its_page() {
        let seg = 16u32 << 20;
        let s = u64::from(seg);
        let end = Lsn(7 * s + 3 * 8192 + 40);
        assert_eq!(window_segment_fetch(6, end, seg, 8192), s);
        assert_eq!(window_segment_fetch(7, end, seg, 8192), 4 * 8192);
        // On a page boundary: that page holds none of it.
        assert_eq!(window_segment_fetch(7, Lsn(7 * s + 8192), seg, 8192), 8192);
        // On the segment's end: the whole segment.
        assert_eq!(window_segment_fetch(7, Lsn(8 * s), seg, 8192), s);
        assert_eq!(window_segment_fetch(7, Lsn(8 * s - 100), seg, 8192), s);
    }

    /// Past every segment present, of any timeline, and past the last one replayed.
    #[test]
    fn recycled_segments_are_named_past_every_segment_there_is() {
        assert_eq!(first_recycled_segment([3, 9, 4], 5), 10);
        assert_eq!(first_recycled_segment([3, 4], 7), 8);
        assert_eq!(first_recycled_segment([], 7), 8);
    }

    #[test]
    fn window_wal_the_target_holds_whole_is_not_fetched_again() {
        let seg = 16u32 << 20;
        // The histories part in segment 5.
        let divergence = Lsn(5 * (16u64 << 20) + 0x40);
        let needed =
            |segno, whole, planned| window_segment_needed(segno, divergence, seg, whole, planned);
        // Wholly before the divergence, on the target whole: the same bytes, kept.
        assert!(!needed(4, true, false));
        // The segment of the divergence differs; the target's own is not the source's.
        assert!(needed(5, true, false));
        // Copied with the plan.
        assert!(!needed(6, true, true));
        // Anything the target lacks, or holds cut short, is fetched.
        assert!(needed(4, false, false));
        assert!(needed(6, false, true));
        assert!(needed(7, true, false));
        // Nothing lies before a divergence that is not there (a resync on one timeline).
        assert!(window_segment_needed(4, NO_DIVERGENCE, seg, true, false));
    }

    /// A PostgreSQL 16 control file with the fields these decisions read.
    fn control(state: DBState, checkpoint: u64, redo: u64, tli: u32) -> ControlFileData {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/control/pg16/pg_control.shutdown"
        ));
        let mut c = match bytes {
            Ok(b) if b.len() == PG_CONTROL_FILE_SIZE => ControlFileData::parse(&b).unwrap(),
            _ => panic!("the PostgreSQL 16 control file fixture is missing"),
        };
        c.state = state;
        c.checkPoint = Lsn(checkpoint);
        c.checkPointCopy.redo = Lsn(redo);
        c.checkPointCopy.ThisTimeLineID = tli;
        c.minRecoveryPoint = Lsn(0);
        c.minRecoveryPointTLI = 0;
        c
    }

    #[test]
    fn where_wal_ends_and_what_is_replayed() {
        let primary = control(DBState::Shutdowned, 0x500_0028, 0x500_0028, 2);
        assert_eq!(shut_down_end(&primary), (Lsn(0x500_0028), 2));
        assert_eq!(
            shut_down_replay(&primary),
            (Lsn(0x500_0028), Lsn(0x500_0028))
        );
        assert_eq!(min_recovery_point(&primary, None), (Lsn(0x500_0028), 2));
        assert_eq!(
            min_recovery_point(&primary, Some((Lsn(0x600_0000), 3))),
            (Lsn(0x600_0000), 3)
        );
        // A standby shut down past its last restartpoint ends at its minimum recovery point, and
        // a copy of it replays from the restartpoint's redo to there.
        let mut standby = control(DBState::ShutdownedInRecovery, 0x500_0100, 0x4f0_0028, 2);
        standby.minRecoveryPoint = Lsn(0x580_0000);
        standby.minRecoveryPointTLI = 2;
        assert_eq!(shut_down_end(&standby), (Lsn(0x580_0000), 2));
        assert_eq!(
            shut_down_replay(&standby),
            (Lsn(0x4f0_0028), Lsn(0x580_0000))
        );
        assert_eq!(target_wal_end(Lsn(0x500_0100), &standby), Lsn(0x580_0000));
        assert_eq!(target_wal_end(Lsn(0x590_0000), &standby), Lsn(0x590_0000));
        let seg = 16 << 20;
        assert_eq!(wal_segments(Lsn(0x4f0_0028), Lsn(0x580_0000), seg), (4, 5));
        assert_eq!(wal_segments(Lsn(0x500_0028), Lsn(0x500_0028), seg), (5, 5));
        // Ending on a boundary: the next segment holds none of it.
        assert_eq!(wal_segments(Lsn(0x700_0028), Lsn(0x800_0000), seg), (7, 7));
        assert_eq!(wal_segments(Lsn(0x700_0028), Lsn(0x800_0001), seg), (7, 8));
    }

    #[test]
    fn pairs_are_checked_version_first() {
        let src = control(DBState::Shutdowned, 0, 0, 2);
        let mut tgt = src.clone();
        assert_eq!(check_pair(&src, &tgt, false), Ok(()));
        tgt.system_identifier += 1;
        tgt.catalog_version_no += 1;
        assert!(matches!(
            check_pair(&src, &tgt, false),
            Err(Incompatible::Version { .. })
        ));
        tgt.catalog_version_no -= 1;
        assert!(matches!(
            check_pair(&src, &tgt, false),
            Err(Incompatible::System { .. })
        ));
        let mut tgt = src.clone();
        tgt.xlog_seg_size *= 2;
        assert!(matches!(
            check_pair(&src, &tgt, false),
            Err(Incompatible::Geometry { .. })
        ));
        let mut tgt = src.clone();
        tgt.data_checksum_version = 0;
        tgt.wal_log_hints = false;
        assert_eq!(check_pair(&src, &tgt, false), Err(Incompatible::HintBits));
        let running = control(DBState::InProduction, 0, 0, 2);
        assert_eq!(
            check_pair(&running, &src, false),
            Err(Incompatible::SourceNotShutDown(DBState::InProduction))
        );
        assert_eq!(check_pair(&running, &src, true), Ok(()));
        assert_eq!(
            check_target_state(&running),
            Err(Incompatible::TargetNotShutDown(DBState::InProduction))
        );
        assert_eq!(check_target_state(&src), Ok(()));
    }

    #[test]
    fn a_resume_forgets_what_the_source_changed_since() {
        let relation = |p: &str| crate::relpath::is_rel_data_file(p, PgMajor::V16).map(|(l, _)| l);
        let done = || {
            let mut d = BTreeMap::new();
            for p in [
                "base/5/16384",
                "base/5/16385",
                "base/5/16386",
                "pg_xact/0000",
            ] {
                let mut r = RangeSet::default();
                r.insert(0, 4 * 8192);
                d.insert(p.to_string(), r);
            }
            d
        };
        let mut since = Changes::default();
        since.page_map.insert("base/5/16384", 1);
        since.page_map.insert("base/5/16384", 3);
        since.created.insert(RelFileLocator::new(1663, 5, 16385));
        let mut d = done();
        forget_stale(&mut d, Some(&since), 8192, &relation);
        // Blocks 1 and 3 changed; a relation made anew; other files always copied again.
        assert_eq!(
            d["base/5/16384"].missing(0, 4 * 8192),
            [(8192, 8192), (3 * 8192, 8192)]
        );
        assert!(!d.contains_key("base/5/16385"));
        assert!(d["base/5/16386"].covers(0, 4 * 8192));
        assert!(!d.contains_key("pg_xact/0000"));
        // Without the source's changes since, nothing can be trusted.
        let mut d = done();
        forget_stale(&mut d, None, 8192, &relation);
        assert!(d.is_empty());
    }

    #[test]
    fn a_rewound_target_is_known_by_its_label() {
        let mut c = control(DBState::InArchiveRecovery, 0, 0, 2);
        let window = "START WAL LOCATION: 0/3000028 (file 000000020000000000000003)\n\
                      CHECKPOINT LOCATION: 0/3000060\nBACKUP METHOD: streamed\n\
                      BACKUP FROM: primary\nLABEL: failback rewind\n";
        let pg_rewind = "START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n\
                         CHECKPOINT LOCATION: 0/3000060\nBACKUP METHOD: pg_rewind\n";
        assert!(already_rewound(&c, Some(window)));
        assert!(already_rewound(&c, Some(pg_rewind)));
        assert!(!already_rewound(&c, None));
        assert!(!already_rewound(
            &c,
            Some("BACKUP METHOD: streamed\nLABEL: nightly\n")
        ));
        c.state = DBState::Shutdowned;
        assert!(!already_rewound(&c, Some(window)));
    }
}
