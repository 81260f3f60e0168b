//! Property tests: no parser panics on arbitrary input, and every writer's output reads back to
//! what was written.

use std::path::PathBuf;

use failback_common::control::{ControlFileLayout, control_file_crc};
use failback_common::relpath::{absolute_block, block_location, parse_relation_path, segment_path};
use failback_common::timeline::{
    find_common_ancestor, timeline_for_segment, timeline_index_for_segment,
};
use failback_common::{
    CheckPoint, ControlFileData, DBState, ForkNumber, Lsn, PgMajor, RelFileLocator,
    TimeLineHistory, TimeLineId,
};
use proptest::prelude::*;

fn real_control(major: PgMajor) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "tests/data/control/pg{}/pg_control.shutdown",
        major.number()
    ));
    std::fs::read(p).unwrap()
}

fn any_major() -> impl Strategy<Value = PgMajor> {
    prop::sample::select(PgMajor::ALL.to_vec())
}

fn fix_crc(b: &mut [u8], major: PgMajor) {
    let o = ControlFileLayout::of(major).crc;
    let crc = control_file_crc(b, major).unwrap();
    b[o..o + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The JSON form without `crc` (which `to_bytes` recomputes): everything else must survive.
fn fields(c: &ControlFileData) -> serde_json::Value {
    let mut v = serde_json::to_value(c).unwrap();
    v.as_object_mut().unwrap().remove("crc");
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn control_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..9000)) {
        let _ = ControlFileData::parse(&bytes);
    }

    /// Arbitrary contents behind a valid version header and CRC: parse must not panic, and
    /// whatever parses writes back byte for byte.
    #[test]
    fn control_with_valid_header_and_crc(
        major in any_major(),
        body in prop::collection::vec(any::<u8>(), 8192),
    ) {
        let mut b = body;
        b[8..12].copy_from_slice(&major.pg_control_version().to_le_bytes());
        b[12..16].copy_from_slice(&major.catalog_version_no().to_le_bytes());
        fix_crc(&mut b, major);
        if let Ok(c) = ControlFileData::parse(&b) {
            prop_assert_eq!(c.to_bytes().unwrap(), b.clone());
        }
        b[228..232].copy_from_slice(&(16u32 << 20).to_le_bytes());
        fix_crc(&mut b, major);
        let c = ControlFileData::parse(&b).unwrap();
        prop_assert_eq!(c.major, major);
        prop_assert_eq!(c.to_bytes().unwrap(), b);
    }

    #[test]
    fn checkpoint_parse_never_panics(
        major in any_major(),
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        match CheckPoint::parse(&bytes, major) {
            Ok(c) => {
                prop_assert!(bytes.len() >= 88);
                prop_assert_eq!(CheckPoint::parse(&c.to_bytes(major), major).unwrap(), c);
            }
            Err(_) => prop_assert!(bytes.len() < 88),
        }
    }

    /// Modify what pg_rewind modifies (and more) on a real file: it reads back as modified, and
    /// the bytes of untouched fields are unchanged.
    #[test]
    fn control_write_read_round_trip(
        major in any_major(),
        state in 0u32..10,
        min_recovery in any::<u64>(),
        min_tli in any::<u32>(),
        time in any::<i64>(),
        redo in any::<u64>(),
        this_tli in any::<u32>(),
        next_xid in any::<u64>(),
        backup_start in any::<u64>(),
        backup_end in any::<u64>(),
        backup_end_required in any::<bool>(),
        unlogged in any::<u64>(),
        seg_shift in 20u32..=30,
    ) {
        let orig = real_control(major);
        let mut c = ControlFileData::parse(&orig).unwrap();
        c.state = DBState::from_u32(state);
        c.minRecoveryPoint = Lsn(min_recovery);
        c.minRecoveryPointTLI = min_tli;
        c.time = time;
        c.checkPointCopy.redo = Lsn(redo);
        c.checkPointCopy.ThisTimeLineID = this_tli;
        c.checkPointCopy.nextXid = next_xid;
        c.backupStartPoint = Lsn(backup_start);
        c.backupEndPoint = Lsn(backup_end);
        c.backupEndRequired = backup_end_required;
        c.unloggedLSN = Lsn(unlogged);
        c.xlog_seg_size = 1 << seg_shift;
        let out = c.to_bytes().unwrap();
        let back = ControlFileData::parse(&out).unwrap();
        prop_assert_eq!(fields(&back), fields(&c));
        // Padding and the untouched tail are as the server wrote them.
        prop_assert_eq!(&out[296..], &orig[296..]);
        prop_assert_eq!(&out[..8], &orig[..8]);
    }

    #[test]
    fn history_parse_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        own in any::<u32>(),
    ) {
        let _ = TimeLineHistory::parse(&bytes, own, "fuzz.history");
    }

    #[test]
    fn history_parse_never_panics_on_plausible_text(
        lines in prop::collection::vec("[ \t#]{0,2}[0-9]{0,11}[ \t/]{0,2}[0-9A-Fa-f/]{0,20}[ \ta-z]{0,8}", 0..8),
        own in 0u32..20,
    ) {
        let text = lines.join("\n");
        if let Ok(h) = TimeLineHistory::parse(text.as_bytes(), own, "fuzz.history") {
            let again = TimeLineHistory::parse(h.to_text().as_bytes(), own, "again").unwrap();
            prop_assert_eq!(again.entries().iter().map(|e| (e.tli, e.begin, e.end)).collect::<Vec<_>>(),
                            h.entries().iter().map(|e| (e.tli, e.begin, e.end)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn history_text_round_trip(h in arb_history()) {
        let text = h.to_text();
        let back = TimeLineHistory::parse(text.as_bytes(), h.own_tli(), "x").unwrap();
        prop_assert_eq!(&back, &h);
        prop_assert_eq!(back.to_text(), text);
    }

    /// The segment rule: the chosen entry owns the segment's last byte or begins inside it;
    /// for monotone histories the start index does not matter.
    #[test]
    fn timeline_for_segment_rule(h in arb_history(), segno in 0u64..64, shift in 20u32..=24, start in 0usize..10) {
        let seg_size = 1u32 << shift;
        let seg_end = Lsn((segno + 1) * u64::from(seg_size));
        let e = h.entries();
        let i = timeline_index_for_segment(&h, 0, segno, seg_size);
        prop_assert_eq!(timeline_index_for_segment(&h, start, segno, seg_size), i);
        prop_assert_eq!(timeline_for_segment(&h, segno, seg_size), e[i].tli);
        prop_assert!(i + 1 == e.len() || e[i].end.unwrap() >= seg_end);
        prop_assert!(i == 0 || e[i].begin < seg_end);
    }

    #[test]
    fn divergence_is_symmetric_and_shared(a in arb_history(), b in arb_history()) {
        let ab = find_common_ancestor(&a, &b);
        let ba = find_common_ancestor(&b, &a);
        // Errors name source and target, so only the outcomes are compared.
        prop_assert_eq!(ab.as_ref().ok(), ba.as_ref().ok());
        prop_assert_eq!(std::mem::discriminant(&ab), std::mem::discriminant(&ba));
        if let Ok(c) = ab {
            let (ea, eb) = (&a.entries()[c.index], &b.entries()[c.index]);
            prop_assert_eq!((ea.tli, ea.begin), (eb.tli, eb.begin));
            prop_assert_eq!(ea.tli, c.tli);
            let ends: Vec<Lsn> = [ea.end, eb.end].into_iter().flatten().collect();
            prop_assert_eq!(Some(c.divergerec), ends.iter().copied().min());
        }
    }

    #[test]
    fn relpath_round_trip(
        spc in prop_oneof![Just(1663u32), Just(1664u32), any::<u32>()],
        db in any::<u32>(),
        rel in any::<u32>(),
        fork in prop::sample::select(ForkNumber::ALL.to_vec()),
        segno in prop_oneof![Just(0u32), any::<u32>()],
        major in any_major(),
    ) {
        let db = if spc == 1664 { 0 } else { db };
        let loc = RelFileLocator { spcOid: spc, dbOid: db, relNumber: rel };
        let path = segment_path(loc, fork, segno, major);
        let got = parse_relation_path(&path, major).unwrap();
        prop_assert_eq!((got.locator, got.fork, got.segno), (loc, fork, segno));
    }

    /// Whatever parses is exactly what the builder prints.
    #[test]
    fn relpath_parse_only_accepts_round_trips(
        path in "(global|base/[0-9]{1,3}|pg_tblspc/[0-9]{1,5}/PG_1[3-8]_2020072[0-9]{2}/[0-9]{1,3}|[a-z_]{1,8})/[0-9t_]{0,6}(_fsm|_vm|_init|_main|_x)?(\\.[0-9]{0,3})?",
        major in any_major(),
    ) {
        if let Some(s) = parse_relation_path(&path, major) {
            prop_assert_eq!(segment_path(s.locator, s.fork, s.segno, major), path);
        }
    }

    #[test]
    fn relpath_parse_never_panics(path in "\\PC{0,60}", major in any_major()) {
        let _ = parse_relation_path(&path, major);
    }

    #[test]
    fn block_location_inverts(blkno in any::<u32>(), relseg in 1u32..=u32::MAX, blcksz in prop::sample::select(vec![1024u32, 8192, 32768])) {
        let (seg, off) = block_location(blkno, relseg, blcksz).unwrap();
        prop_assert_eq!(off % u64::from(blcksz), 0);
        let in_seg = u32::try_from(off / u64::from(blcksz)).unwrap();
        prop_assert!(in_seg < relseg);
        prop_assert_eq!(absolute_block(seg, in_seg, relseg), Some(blkno));
    }
}

/// Histories as PostgreSQL produces them: increasing TLIs, non-decreasing non-zero switchpoints.
fn arb_history() -> impl Strategy<Value = TimeLineHistory> {
    (
        prop::collection::vec((1u32..4, 1u64..(1 << 28)), 0..5),
        1u32..4,
        "[a-z ]{0,12}",
    )
        .prop_map(|(steps, own_step, reason)| {
            let mut tli: TimeLineId = 0;
            let mut at = 0u64;
            let mut sw = Vec::new();
            for (dt, dl) in steps {
                tli += dt;
                at += dl;
                sw.push((tli, Lsn(at), reason.trim().to_string()));
            }
            let sw_ref: Vec<(TimeLineId, Lsn, &str)> =
                sw.iter().map(|(t, l, r)| (*t, *l, r.as_str())).collect();
            TimeLineHistory::from_switchpoints(tli + own_step, &sw_ref).unwrap()
        })
}
