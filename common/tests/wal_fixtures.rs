//! The decoder on WAL that real clusters of every supported major version wrote
//! (common/tests/data/wal/pg<major>/, see generate.sh there): it decodes from the first record
//! of the workload to the insert position the server reported without an error, and finds the
//! blocks of the known tables and the records that create, truncate and drop relations and
//! databases, end transactions that drop relations, switch segments and rewrite relmaps.

mod wal_support;

use std::collections::BTreeSet;

use failback_common::changes::WalChanges;
use failback_common::wal::{
    Decoded, RecordKind, RelFileLocator, WalDecoder, WalParams, XactOp, identify_major,
};
use failback_common::{Lsn, PgMajor};
use wal_support::*;

#[derive(Default)]
struct Seen {
    records: usize,
    /// (spc, db, rel, fork) of every block reference.
    blocks: BTreeSet<(u32, u32, u32, u8)>,
    smgr_create: Vec<(RelFileLocator, u32)>,
    smgr_truncate: Vec<(RelFileLocator, u32, u32)>,
    dbase_create_copy: Vec<(u32, u32, u32, u32)>,
    dbase_create_wal_log: Vec<(u32, u32)>,
    dbase_drop: Vec<(u32, Vec<u32>)>,
    /// (op, dropped rels, flagged SPECIAL_REL_UPDATE)
    xact: Vec<(XactOp, Vec<RelFileLocator>, bool)>,
    prepare: Vec<(String, Vec<RelFileLocator>, Vec<RelFileLocator>)>,
    relmap: Vec<(u32, u32, u32)>,
    checkpoints: Vec<(Lsn, Lsn, u32)>,
    switches: Vec<(Lsn, Lsn)>,
    /// Records whose 24-byte header straddles a page boundary, records crossing a segment.
    split_headers: usize,
    cross_segment: usize,
    max_tot_len: u32,
    ends: BTreeSet<Lsn>,
    /// Full-page images by compression method.
    images: std::collections::BTreeMap<&'static str, usize>,
}

fn survey(fx: &Fixture) -> (Seen, Outcome) {
    let mut s = Seen::default();
    let dec = WalDecoder::new(fx.lsn("start_lsn"), fx.params()).unwrap();
    let page = 8192u64;
    let outcome = run(&fx.wal, fx.base, dec, 64 << 10, |r| {
        s.records += 1;
        s.ends.insert(r.end_lsn);
        s.max_tot_len = s.max_tot_len.max(r.tot_len());
        if r.lsn.0 % page > page - 24 {
            s.split_headers += 1;
        }
        let seg = u64::from(fx.seg_size);
        if r.lsn.0 / seg != (r.lsn.0 + u64::from(r.tot_len()) - 1) / seg {
            s.cross_segment += 1;
        }
        for b in r.blocks {
            let l = b.locator;
            s.blocks.insert((l.spcOid, l.dbOid, l.relNumber, b.fork()));
            if let Some(img) = b.image {
                *s.images.entry(img.compression.name()).or_default() += 1;
                assert_eq!(r.block_image(&img).len(), usize::from(img.length));
            }
        }
        let flagged = r.is_special_rel_update();
        match r.kind {
            RecordKind::SmgrCreate { locator, fork } => s.smgr_create.push((locator, fork)),
            RecordKind::SmgrTruncate {
                blkno,
                locator,
                flags,
            } => s.smgr_truncate.push((locator, blkno, flags)),
            RecordKind::DbaseCreateFileCopy {
                db_id,
                tablespace_id,
                src_db_id,
                src_tablespace_id,
            } => s
                .dbase_create_copy
                .push((db_id, tablespace_id, src_db_id, src_tablespace_id)),
            RecordKind::DbaseCreateWalLog {
                db_id,
                tablespace_id,
            } => s.dbase_create_wal_log.push((db_id, tablespace_id)),
            RecordKind::DbaseDrop {
                db_id,
                tablespace_ids,
            } => s.dbase_drop.push((db_id, tablespace_ids.iter().collect())),
            RecordKind::XactFinish(x) => {
                // Every part the xinfo announced was parsed and nothing is left over: the
                // layout (stats item size, part order) is right for this version.
                assert_eq!(x.parsed_len, r.main_data.len(), "xact record at {}", r.lsn);
                s.xact.push((x.op, x.rels.iter().collect(), flagged));
            }
            RecordKind::XactPrepare(p) => s.prepare.push((
                String::from_utf8_lossy(p.gid).into_owned(),
                p.commit_rels.iter().collect(),
                p.abort_rels.iter().collect(),
            )),
            RecordKind::RelmapUpdate {
                db_id,
                tsid,
                nbytes,
            } => s.relmap.push((db_id, tsid, nbytes)),
            RecordKind::Checkpoint {
                redo,
                this_timeline_id,
                ..
            } => s.checkpoints.push((r.lsn, redo, this_timeline_id)),
            RecordKind::Switch => s.switches.push((r.lsn, r.end_lsn)),
            _ => {}
        }
        if flagged {
            assert!(r.kind.is_known_rel_update(), "{}", r.lsn);
        }
    });
    (s, outcome)
}

fn check_version(major: u32) {
    let fx = load(major);
    let m = fx.major;
    assert_eq!(identify_major(&fx.wal), Some(m));
    let (s, outcome) = survey(&fx);
    let end = fx.lsn("end_lsn");
    let page = 8192u64;

    // The insert position the server reported is where a record ended (or, when that was a
    // page boundary, right after the next page's header).
    let at_boundary = Lsn(end.0 - end.0 % page);
    assert!(
        s.ends.contains(&end) || (end.0 % page <= 40 && s.ends.contains(&at_boundary)),
        "no record ends at the insert position {end}"
    );
    assert!(s.records > 5_000, "{} records", s.records);
    assert!(s.split_headers > 0, "no record header straddles a page");
    assert!(s.cross_segment > 0, "no record crosses a segment boundary");
    assert!(s.max_tot_len > 8192, "no record spans pages");
    // wal_compression runs: pglz in every version (bimg_info 0x02 in 13/14, 0x04 from 15).
    assert!(
        s.images.get("none").copied().unwrap_or(0) > 100,
        "{:?}",
        s.images
    );
    assert!(
        s.images.get("pglz").copied().unwrap_or(0) > 10,
        "{:?}",
        s.images
    );

    // pg_switch_wal() right after: its record ends at the next segment start.
    let switch_end = fx.lsn("switch_lsn");
    let (sw_lsn, sw_end) = *s.switches.first().expect("no SWITCH record");
    assert!(sw_lsn >= end, "SWITCH at {sw_lsn} before {end}");
    assert_eq!(sw_end.0 % u64::from(fx.seg_size), 0);
    assert!(sw_end >= switch_end);

    if m >= PgMajor::V15 {
        // The segment after the switch holds CREATE DATABASE ... STRATEGY wal_log; decoding
        // runs on to the end of that segment.
        assert_eq!(
            s.dbase_create_wal_log,
            vec![(fx.oid("db_wl_oid"), 1663)],
            "CREATE_WAL_LOG"
        );
        // ... which writes the new database's relmap.
        assert!(
            s.relmap
                .iter()
                .any(|&(db, ts, _)| db == fx.oid("db_wl_oid") && ts == 1663),
            "{:?}",
            s.relmap
        );
        assert_eq!(outcome, Outcome::NeedMore(fx.end()));
    } else {
        // Nothing after the switch: the decoder asks for the next segment.
        assert_eq!(outcome, Outcome::NeedMore(sw_end));
        assert_eq!(sw_end, fx.end());
    }

    // Blocks of the known tables, main fork, each in its own tablespace and database.
    for t in ["t1", "t1_pkey", "t1_v", "t2", "t3", "t5"] {
        let (spc, db, rel) = fx.table(t);
        assert!(s.blocks.contains(&(spc, db, rel, 0)), "no block of {t}");
    }
    let (t5_spc, _, _) = fx.table("t5");
    assert_eq!(t5_spc, fx.oid("tablespace_oid"));
    // VACUUM wrote visibility map and free space map blocks of t1.
    let (spc, db, rel) = fx.table("t1");
    assert!(s.blocks.contains(&(spc, db, rel, 2)), "no vm block of t1");

    // SMGR CREATE of every table's main fork; SMGR TRUNCATE of t3 by VACUUM.
    for t in ["t1", "t1_pkey", "t2", "t3", "t5"] {
        let (spc, db, rel) = fx.table(t);
        let l = RelFileLocator::new(spc, db, rel);
        assert!(s.smgr_create.contains(&(l, 0)), "no SMGR CREATE of {t}");
    }
    let (spc, db, rel) = fx.table("t3");
    let t3 = RelFileLocator::new(spc, db, rel);
    assert!(
        s.smgr_truncate
            .iter()
            .any(|&(l, blkno, flags)| l == t3 && blkno == 1 && flags & 1 != 0),
        "no SMGR TRUNCATE of t3: {:?}",
        s.smgr_truncate
    );

    // CREATE DATABASE by file copy (db_fc, dropped again, and db_keep) from template1.
    let keep = fx.oid("db_keep_oid");
    assert!(
        s.dbase_create_copy.contains(&(keep, 1663, 1, 1663)),
        "{:?}",
        s.dbase_create_copy
    );
    assert_eq!(s.dbase_create_copy.len(), 2);
    assert_eq!(s.dbase_drop.len(), 1);
    let (dropped, ref ts) = s.dbase_drop[0];
    assert!(s.dbase_create_copy.iter().any(|c| c.0 == dropped));
    assert_eq!(ts, &vec![1663]);

    // Transactions that dropped relations: TRUNCATE t2, DROP TABLE t4 (commits), ROLLBACK of
    // t8 (abort), ROLLBACK PREPARED p2 (abort prepared), COMMIT PREPARED p3 dropping t6.
    let with_rels = |op: XactOp| s.xact.iter().filter(move |x| x.0 == op && !x.1.is_empty());
    assert!(with_rels(XactOp::Commit).count() >= 2);
    assert!(with_rels(XactOp::Abort).count() >= 1);
    assert_eq!(with_rels(XactOp::AbortPrepared).count(), 1);
    assert_eq!(with_rels(XactOp::CommitPrepared).count(), 1);
    // 14+ flags them XLR_SPECIAL_REL_UPDATE; 13 does not.
    for (op, rels, flagged) in &s.xact {
        assert_eq!(
            *flagged,
            !rels.is_empty() && m >= PgMajor::V14,
            "{op:?} {rels:?}"
        );
    }
    // The dropped t6 of p3 is the relation p1 created.
    let gids: Vec<&str> = s.prepare.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(gids, ["p1", "p2", "p3"]);
    assert!(s.prepare[0].1.is_empty() && s.prepare[0].2.len() == 1);
    assert!(s.prepare[1].1.is_empty() && s.prepare[1].2.len() == 1);
    assert_eq!(s.prepare[2].1, s.prepare[0].2, "p3 drops what p1 created");
    let cp = with_rels(XactOp::CommitPrepared).next().unwrap();
    assert_eq!(cp.1, s.prepare[2].1);
    let ap = with_rels(XactOp::AbortPrepared).next().unwrap();
    assert_eq!(ap.1, s.prepare[1].2);

    // VACUUM FULL pg_database rewrote the shared relmap (pg_filenode.map: 512 bytes before 16,
    // 524 from 16 on).
    let map_size = if m >= PgMajor::V16 { 524 } else { 512 };
    assert!(
        s.relmap
            .iter()
            .any(|&(db, ts, n)| db == 0 && ts == 1664 && n == map_size),
        "{:?}",
        s.relmap
    );
    // Checkpoints: the explicit ones and those of CREATE DATABASE, on timeline 1.
    assert!(s.checkpoints.len() >= 3);
    for (lsn, redo, tli) in &s.checkpoints {
        assert!(redo <= lsn && *tli == 1, "checkpoint at {lsn}");
    }
}

#[test]
fn pg13() {
    check_version(13);
}
#[test]
fn pg14() {
    check_version(14);
}
#[test]
fn pg15() {
    check_version(15);
}
#[test]
fn pg16() {
    check_version(16);
}
#[test]
fn pg17() {
    check_version(17);
}
#[test]
fn pg18() {
    check_version(18);
}

/// A decoder told to interpret only what [`WalChanges`] reads gives the same records, the
/// same kinds for those rmgrs and for flagged records, `Other` for the rest (commit records
/// among them), and so the same changes.
#[test]
fn interpreting_only_what_the_changes_need() {
    for major in 13..=18 {
        let fx = load(major);
        let decode = |dec: WalDecoder| {
            let (mut kinds, mut changes) = (Vec::new(), WalChanges::default());
            let outcome = run(&fx.wal, fx.base, dec, 64 << 10, |r| {
                kinds.push((
                    r.lsn,
                    r.rmid(),
                    r.is_special_rel_update(),
                    format!("{:?}", r.kind),
                ));
                changes.record(r, 131_072);
            });
            assert!(
                matches!(outcome, Outcome::NeedMore(_)),
                "pg{major}: {outcome:?}"
            );
            (kinds, changes.finish(fx.major))
        };
        let all = decode(WalDecoder::new(fx.lsn("start_lsn"), fx.params()).unwrap());
        let few = decode(
            WalDecoder::new(fx.lsn("start_lsn"), fx.params())
                .unwrap()
                .interpret_only(&WalChanges::KINDS_FROM),
        );
        assert_eq!(all.0.len(), few.0.len(), "pg{major}");
        let mut commits_left_out = 0;
        for (a, f) in all.0.iter().zip(&few.0) {
            let (lsn, rmid, flagged, kind) = a;
            assert_eq!((lsn, rmid), (&f.0, &f.1), "pg{major}");
            if WalChanges::KINDS_FROM.contains(rmid) || *flagged {
                assert_eq!(kind, &f.3, "pg{major} at {lsn}");
            } else {
                assert_eq!(f.3, "Other", "pg{major} at {lsn}");
                commits_left_out += usize::from(kind.starts_with("XactFinish"));
            }
        }
        assert!(
            commits_left_out > 0,
            "pg{major}: no commit record left uninterpreted"
        );
        assert!(!all.1.created.is_empty(), "pg{major}: no relation created");
        assert_eq!(all.1, few.1, "pg{major}");
    }
}

#[test]
fn version_detection_from_the_magic() {
    for v in [13, 14, 15, 16, 17, 18] {
        let fx = load(v);
        let start = fx.lsn("start_lsn");
        let mut detect = WalDecoder::new(start, WalParams::detect(fx.seg_size)).unwrap();
        assert_eq!(detect.major(), None);
        let mut n = 0;
        let mut off = (detect.needed_lsn().0 - fx.base.0) as usize;
        loop {
            match detect.poll().unwrap() {
                Decoded::Record(_) => {
                    n += 1;
                    if n == 1000 {
                        break;
                    }
                }
                Decoded::NeedMore { .. } => {
                    detect.feed(&fx.wal[off..off + 8192]);
                    off += 8192;
                }
            }
        }
        assert_eq!(detect.major(), Some(fx.major));
        // A decoder configured for another version refuses the first page.
        let other = if v == 13 { PgMajor::V14 } else { PgMajor::V13 };
        let dec = WalDecoder::new(start, WalParams::new(other, fx.seg_size)).unwrap();
        let o = run(&fx.wal, fx.base, dec, 8192, |_| {
            panic!("decoded with the wrong version")
        });
        match o {
            Outcome::Error(e) => {
                assert!(!e.is_end_of_wal(), "{e}");
                assert!(e.to_string().contains("invalid magic number"), "{e}");
            }
            o => panic!("{o:?}"),
        }
    }
}

#[test]
fn starting_at_a_segment_skips_the_continued_record() {
    // pg_waldump started at a segment: the first record starting in it.
    for v in [13, 15, 18] {
        let fx = load(v);
        let (all, _) = decode_all(&fx, fx.lsn("start_lsn"), 1 << 20);
        let seg2 = Lsn(fx.base.0 + u64::from(fx.seg_size));
        let first_in_seg2 = all.iter().position(|r| r.lsn >= seg2).unwrap();
        let dec = WalDecoder::new_at_page(seg2, fx.params()).unwrap();
        let mut got = Vec::new();
        run(&fx.wal, fx.base, dec, 1 << 20, |r| got.push(Rec::from(r)));
        assert_eq!(got.len(), all.len() - first_in_seg2, "pg{v}");
        assert_eq!(got[..], all[first_in_seg2..], "pg{v}");
    }
}
