//! `WalReader::checkpoint_before` (pg_rewind's *last common checkpoint*, walked back along
//! `xl_prev`) on WAL real clusters wrote, 13–18 (common/tests/data/wal/pg<major>/): for every
//! record after the first checkpoint taken as the fork, the answer is the last checkpoint a
//! forward walk of the same WAL met before that record; without the checkpoint's segment the
//! walk says which segment is missing.

use std::path::PathBuf;

use failback_common::Lsn;
use failback_common::timeline::TimeLineHistory;
use failback_common::wal::RecordKind;
use failback_datadir::wal::{CheckpointAt, WalReadError, WalReader};

mod fixture;
use fixture::{Fixture, fixture};

fn pg_wal(f: &Fixture) -> PathBuf {
    f.dir.path().join("pg_wal")
}

#[test]
fn the_last_checkpoint_a_forward_walk_meets() {
    let history = TimeLineHistory::single(1);
    for major in 13..=18 {
        let f = fixture(major);
        // Every record, and each checkpoint, in order.
        let mut records = Vec::new();
        let mut checkpoints = Vec::new();
        let mut reader = WalReader::new(f.dir.path(), &history, f.params, None);
        reader
            .walk(f.start, false, Some(f.end), |r| {
                records.push(r.lsn);
                if let RecordKind::Checkpoint {
                    redo,
                    this_timeline_id,
                    ..
                } = r.kind
                {
                    checkpoints.push(CheckpointAt {
                        lsn: r.lsn,
                        redo,
                        tli: this_timeline_id,
                    });
                }
            })
            .unwrap();
        assert!(checkpoints.len() >= 2, "pg{major}: {checkpoints:?}");
        let after_first: Vec<Lsn> = records
            .iter()
            .copied()
            .filter(|l| *l > checkpoints[0].lsn)
            .collect();
        // A sample spread over the WAL, and the records right after each checkpoint.
        let step = (after_first.len() / 40).max(1);
        let mut forks: Vec<Lsn> = after_first.iter().copied().step_by(step).collect();
        for c in &checkpoints {
            forks.extend(after_first.iter().copied().find(|l| *l > c.lsn));
        }
        for fork in forks {
            let want = *checkpoints.iter().rev().find(|c| c.lsn < fork).unwrap();
            let got = reader.checkpoint_before(fork).unwrap();
            assert_eq!(got, want, "pg{major}: fork at {fork}");
            assert!(got.redo <= got.lsn && got.tli == 1, "pg{major}: {got:?}");
            reader.require(got.redo, got.lsn).unwrap();
        }
    }
}

#[test]
fn a_missing_segment_is_named() {
    let history = TimeLineHistory::single(1);
    let f = fixture(15);
    let seg_size = f.params.seg_size;
    let name =
        |l: Lsn| failback_common::lsn::wal_file_name(1, l.segment_number(seg_size), seg_size);
    let mut last = None;
    let mut reader = WalReader::new(f.dir.path(), &history, f.params, None);
    reader
        .walk(f.start, false, Some(f.end), |r| last = Some(r.lsn))
        .unwrap();
    let fork = last.unwrap();
    reader.checkpoint_before(fork).unwrap();
    reader.require(f.start, f.end).unwrap();
    // The segment of the fork gone, then the first one too.
    std::fs::remove_file(pg_wal(&f).join(name(fork))).unwrap();
    let mut reader = WalReader::new(f.dir.path(), &history, f.params, None);
    match reader.checkpoint_before(fork) {
        Err(WalReadError::MissingSegment { name: missing, .. }) => assert_eq!(missing, name(fork)),
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(pg_wal(&f).join(name(f.start))).unwrap();
    match reader.require(f.start, f.end) {
        Err(WalReadError::MissingSegment { name: missing, .. }) => {
            assert_eq!(missing, name(f.start))
        }
        other => panic!("{other:?}"),
    }
}
