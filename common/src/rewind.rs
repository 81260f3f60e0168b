//! The decisions of a rewind, as pure functions of what the two clusters say.
//!
//! pg_rewind (`src/bin/pg_rewind/pg_rewind.c`) decides, in order:
//!
//! 1. whether the two clusters can be rewound into each other at all (`sanityChecks`): one
//!    system, one version and geometry, hint-bit changes WAL-logged on the target, both shut
//!    down cleanly unless the source is served live;
//! 2. where the target's WAL ends (its last checkpoint record's end, or its minimum recovery
//!    point when it was a standby), and so whether it wrote anything past the divergence;
//! 3. the *last common checkpoint*: walking the target's WAL backwards from the divergence point
//!    (`findLastCheckpoint`), the first checkpoint record that starts before it. Replay of the
//!    rewound target starts at that checkpoint's redo pointer;
//! 4. where the source's WAL ends when the plan is made, and again after the copy: the
//!    rewound target must replay at least that far before it calls itself consistent
//!    (`minRecoveryPoint` in its new control file).
//!
//! failback adds two decisions of its own: a standby source whose restartpoint lags behind the
//! common checkpoint makes replay start at the source's own checkpoint, and source WAL segments
//! the plan left out because they lay past the source's end of WAL are fetched after the copy
//! when a live source's end has reached them.
//!
//! Nothing here reads a file or a clock: the shells in the client feed records and control
//! files in and act on the answers, and these functions are tested in microseconds.

use crate::control::{CheckPoint, ControlFileData, ControlFileError, DBState};
use crate::filemap::FileAction;
use crate::lsn::{Lsn, TimeLineId};
use crate::plan::{Plan, PlanEntry, Reason, wal_segment_past};
use crate::wal::page::{SIZE_OF_XLOG_LONG_PHD, SIZE_OF_XLOG_SHORT_PHD};
use crate::wal::record::XLR_RMGR_INFO_MASK;
use crate::wal::rmgr::{RM_XLOG_ID, XLOG_CHECKPOINT_ONLINE, XLOG_CHECKPOINT_SHUTDOWN};

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

/// Where the source's WAL ends when the plan is made: a live source's insert (or replay)
/// position, else where its shut-down WAL ends.
pub fn source_wal_end(source: &ControlFileData, live_end: Option<Lsn>) -> Lsn {
    live_end.unwrap_or_else(|| shut_down_end(source).0)
}

/// Where the target's WAL ends: the end of its last checkpoint record, or its minimum recovery
/// point if it was a standby that got further. A rewind is needed only when this lies past the
/// divergence point.
pub fn target_wal_end(checkpoint_record_end: Lsn, target: &ControlFileData) -> Lsn {
    checkpoint_record_end.max(target.minRecoveryPoint)
}

/// The last checkpoint both histories share: replay of the rewound target starts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonCheckpoint {
    /// Where the checkpoint record starts (`CHECKPOINT LOCATION` of the backup label).
    pub lsn: Lsn,
    /// Its redo pointer (`START WAL LOCATION`).
    pub redo: Lsn,
    /// The timeline it was written on.
    pub tli: TimeLineId,
}

/// Why the walk back to the last common checkpoint failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SearchError {
    #[error(
        "could not find a checkpoint before the divergence point {divergence} in the target's WAL"
    )]
    NoCheckpoint { divergence: Lsn },
    #[error("checkpoint record at {lsn} is unreadable")]
    Checkpoint {
        lsn: Lsn,
        #[source]
        source: ControlFileError,
    },
}

/// What the search asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The record starting at this position.
    Read(Lsn),
    /// The search is over.
    Found(CommonCheckpoint),
}

/// The walk back from the divergence point to the last common checkpoint, as a state machine:
/// ask it which record to read ([`CheckpointSearch::next`]), hand it that record
/// ([`CheckpointSearch::record`]), and follow each record's `xl_prev` until a checkpoint
/// record that starts before the divergence.
#[derive(Clone, Debug)]
pub struct CheckpointSearch {
    major: crate::PgMajor,
    divergence: Lsn,
    /// The first position the walk reads: the divergence point, or, when it is a page
    /// boundary, the first record on that page.
    fork: Lsn,
    next: Lsn,
}

impl CheckpointSearch {
    /// A search from `divergence` in WAL of `major` with segments of `seg_size` bytes and pages
    /// of `page_size` bytes. A divergence point at a page boundary names the page, not a
    /// record: the first record on it starts after the page header (long at a segment start).
    pub fn new(
        divergence: Lsn,
        major: crate::PgMajor,
        seg_size: u32,
        page_size: u32,
    ) -> CheckpointSearch {
        let mut fork = divergence;
        if fork.page_offset(page_size) == 0 {
            let header = if fork.segment_offset(seg_size) == 0 {
                SIZE_OF_XLOG_LONG_PHD
            } else {
                SIZE_OF_XLOG_SHORT_PHD
            };
            fork = Lsn(fork.0.saturating_add(header as u64));
        }
        CheckpointSearch {
            major,
            divergence,
            fork,
            next: fork,
        }
    }

    /// The record to read next.
    pub fn next(&self) -> Lsn {
        self.next
    }

    /// The record at [`CheckpointSearch::next`]: its resource manager and info bits, main data
    /// and `xl_prev`. Either the common checkpoint, or where to read next.
    pub fn record(
        &mut self,
        rmid: u8,
        info: u8,
        main_data: &[u8],
        xl_prev: Lsn,
    ) -> Result<Step, SearchError> {
        let at = self.next;
        let is_checkpoint = rmid == RM_XLOG_ID
            && matches!(
                info & XLR_RMGR_INFO_MASK,
                XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE
            );
        if is_checkpoint && at < self.fork {
            let cp = CheckPoint::parse(main_data, self.major)
                .map_err(|source| SearchError::Checkpoint { lsn: at, source })?;
            return Ok(Step::Found(CommonCheckpoint {
                lsn: at,
                redo: cp.redo,
                tli: cp.ThisTimeLineID,
            }));
        }
        if !xl_prev.is_valid() || xl_prev >= at {
            return Err(SearchError::NoCheckpoint {
                divergence: self.divergence,
            });
        }
        self.next = xl_prev;
        Ok(Step::Read(xl_prev))
    }
}

/// Where the rewound target's replay starts: the common checkpoint, unless the source is a
/// standby whose last restartpoint lies before it. Then the source's data files may predate
/// the common checkpoint's redo, and replay must start at the source's own checkpoint.
pub fn replay_start(
    common: CommonCheckpoint,
    source_at_start: &ControlFileData,
) -> CommonCheckpoint {
    if source_at_start.checkPointCopy.redo < common.redo {
        CommonCheckpoint {
            lsn: source_at_start.checkPoint,
            redo: source_at_start.checkPointCopy.redo,
            tli: source_at_start.checkPointCopy.ThisTimeLineID,
        }
    } else {
        common
    }
}

/// The rewound target's `minRecoveryPoint` and its timeline: a live source's end of WAL asked
/// after the copy (every change the copy may have seen is before it), else where the shut-down
/// source's WAL ends.
pub fn min_recovery_point(
    source_after: &ControlFileData,
    live_end: Option<(Lsn, TimeLineId)>,
) -> (Lsn, TimeLineId) {
    live_end.unwrap_or_else(|| shut_down_end(source_after))
}

/// The WAL segments to fetch once the copy is done: those the plan left out because they lay
/// past the source's end of WAL ([`Reason::PastSourceEnd`]), and that the source's end of WAL
/// after the copy (`end`) has reached — a live source wrote into them meanwhile, and the
/// target's replay needs them. As whole-file copies.
pub fn catch_up_segments(plan: &Plan, end: Lsn, seg_size: u32) -> Vec<PlanEntry> {
    plan.entries
        .iter()
        .filter(|e| {
            e.reason == Some(Reason::PastSourceEnd) && !wal_segment_past(&e.path, end, seg_size)
        })
        .map(|e| PlanEntry {
            action: FileAction::Copy,
            reason: None,
            ..e.clone()
        })
        .collect()
}

/// The line a rewind's `backup_label` carries (failback's and pg_rewind's alike).
const REWIND_METHOD: &str = "BACKUP METHOD: pg_rewind";

/// Whether a target is what a finished rewind leaves before its first start: a control file
/// "in archive recovery" and a `backup_label` a rewind wrote. Crash recovery in single-user
/// mode would fail on it, and a second rewind has nothing to do.
pub fn already_rewound(target: &ControlFileData, backup_label: Option<&str>) -> bool {
    target.state == DBState::InArchiveRecovery
        && backup_label.is_some_and(|l| l.lines().any(|l| l.trim() == REWIND_METHOD))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PgMajor;
    use crate::control::PG_CONTROL_FILE_SIZE;
    use crate::filemap::FileEntry;

    const SEG: u32 = 16 << 20;

    /// A PostgreSQL 16 checkpoint record's main data with `redo` on `tli`.
    fn checkpoint_data(redo: u64, tli: u32) -> Vec<u8> {
        let mut d = vec![0u8; crate::wal::kinds::SIZE_OF_CHECKPOINT];
        d[0..8].copy_from_slice(&redo.to_le_bytes());
        d[8..12].copy_from_slice(&tli.to_le_bytes());
        d[12..16].copy_from_slice(&tli.to_le_bytes());
        d
    }

    #[test]
    fn the_walk_starts_at_the_first_record_of_a_page_boundary() {
        let at = |div| CheckpointSearch::new(Lsn(div), PgMajor::V16, SEG, 8192).next();
        assert_eq!(at(0x300_1234), Lsn(0x300_1234));
        // A page start inside a segment: a short page header; a segment start: a long one.
        assert_eq!(at(0x300_2000), Lsn(0x300_2000 + 24));
        assert_eq!(at(0x300_0000), Lsn(0x300_0000 + 40));
    }

    #[test]
    fn the_walk_follows_xl_prev_to_a_checkpoint_before_the_fork() {
        let mut s = CheckpointSearch::new(Lsn(0x300_2000), PgMajor::V16, SEG, 8192);
        let fork = s.next();
        // A checkpoint record at the fork itself is not before it: walk on.
        let cp = checkpoint_data(0x300_0028, 1);
        assert_eq!(
            s.record(RM_XLOG_ID, XLOG_CHECKPOINT_ONLINE, &cp, Lsn(0x300_1f00)),
            Ok(Step::Read(Lsn(0x300_1f00)))
        );
        // Another record (heap, rmid 10): on to its predecessor.
        assert_eq!(
            s.record(10, 0, &[], Lsn(0x300_0100)),
            Ok(Step::Read(Lsn(0x300_0100)))
        );
        assert!(s.next() < fork);
        // The info bits below the rmgr mask (XLR_SPECIAL_REL_UPDATE...) do not matter.
        let found = s
            .record(
                RM_XLOG_ID,
                XLOG_CHECKPOINT_SHUTDOWN | 0x01,
                &cp,
                Lsn(0x300_0060),
            )
            .unwrap();
        assert_eq!(
            found,
            Step::Found(CommonCheckpoint {
                lsn: Lsn(0x300_0100),
                redo: Lsn(0x300_0028),
                tli: 1
            })
        );
    }

    #[test]
    fn a_walk_that_cannot_go_back_says_so() {
        let div = Lsn(0x300_1234);
        let mut s = CheckpointSearch::new(div, PgMajor::V16, SEG, 8192);
        // xl_prev must point backwards; zero or forwards is the start of WAL or corruption.
        for prev in [Lsn(0), Lsn(0x300_1234), Lsn(0x400_0000)] {
            assert_eq!(
                s.clone().record(10, 0, &[], prev),
                Err(SearchError::NoCheckpoint { divergence: div })
            );
        }
        s.record(10, 0, &[], Lsn(0x300_0100)).unwrap();
        assert!(matches!(
            s.record(RM_XLOG_ID, XLOG_CHECKPOINT_ONLINE, &[0; 4], Lsn(0x300_0060)),
            Err(SearchError::Checkpoint {
                lsn: Lsn(0x300_0100),
                ..
            })
        ));
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
    fn where_wal_ends_and_replay_starts() {
        let primary = control(DBState::Shutdowned, 0x500_0028, 0x500_0028, 2);
        assert_eq!(shut_down_end(&primary), (Lsn(0x500_0028), 2));
        assert_eq!(source_wal_end(&primary, None), Lsn(0x500_0028));
        assert_eq!(
            source_wal_end(&primary, Some(Lsn(0x600_0000))),
            Lsn(0x600_0000)
        );
        assert_eq!(
            min_recovery_point(&primary, Some((Lsn(0x600_0000), 3))),
            (Lsn(0x600_0000), 3)
        );
        // A standby shut down past its last restartpoint ends at its minimum recovery point.
        let mut standby = control(DBState::ShutdownedInRecovery, 0x500_0028, 0x500_0028, 2);
        standby.minRecoveryPoint = Lsn(0x580_0000);
        standby.minRecoveryPointTLI = 2;
        assert_eq!(shut_down_end(&standby), (Lsn(0x580_0000), 2));
        assert_eq!(min_recovery_point(&standby, None), (Lsn(0x580_0000), 2));
        assert_eq!(target_wal_end(Lsn(0x500_0100), &standby), Lsn(0x580_0000));
        assert_eq!(target_wal_end(Lsn(0x590_0000), &standby), Lsn(0x590_0000));

        let common = CommonCheckpoint {
            lsn: Lsn(0x300_0100),
            redo: Lsn(0x300_0028),
            tli: 1,
        };
        assert_eq!(replay_start(common, &primary), common);
        // A standby source that restarted last before the common checkpoint's redo.
        let lagging = control(DBState::ShutdownedInRecovery, 0x200_0100, 0x200_0028, 1);
        assert_eq!(
            replay_start(common, &lagging),
            CommonCheckpoint {
                lsn: Lsn(0x200_0100),
                redo: Lsn(0x200_0028),
                tli: 1
            }
        );
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
    fn segments_a_live_source_wrote_into_are_caught_up() {
        let name = |n: u64| format!("pg_wal/0000000200000000000000{n:02X}");
        let entry = |n: u64, reason| PlanEntry {
            reason,
            ..PlanEntry::new(
                &name(n),
                FileAction::None,
                Some(FileEntry::regular(name(n), u64::from(SEG))),
                None,
            )
        };
        let plan = Plan {
            entries: vec![
                entry(4, Some(Reason::OlderThanCheckpoint)),
                entry(7, Some(Reason::PastSourceEnd)),
                entry(8, Some(Reason::PastSourceEnd)),
            ],
            block_size: 8192,
        };
        let got = |end: u64| -> Vec<String> {
            catch_up_segments(&plan, Lsn(end), SEG)
                .into_iter()
                .inspect(|e| assert_eq!((e.action, e.reason), (FileAction::Copy, None)))
                .map(|e| e.path)
                .collect()
        };
        assert!(got(6 * u64::from(SEG) + 100).is_empty());
        assert_eq!(got(7 * u64::from(SEG) + 100), [name(7)]);
        assert_eq!(got(9 * u64::from(SEG)), [name(7), name(8)]);
    }

    #[test]
    fn a_rewound_target_is_known_by_its_label() {
        let mut c = control(DBState::InArchiveRecovery, 0, 0, 2);
        let label = "START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n\
                     CHECKPOINT LOCATION: 0/3000060\nBACKUP METHOD: pg_rewind\n";
        assert!(already_rewound(&c, Some(label)));
        assert!(!already_rewound(&c, None));
        assert!(!already_rewound(&c, Some("BACKUP METHOD: streamed\n")));
        c.state = DBState::Shutdowned;
        assert!(!already_rewound(&c, Some(label)));
    }
}
