//! `WalReader::changes_in_parallel` (each whole segment decoded on a thread of its own, from the
//! first record starting in it) against `WalReader::changes` (one decoder from the first record
//! on), on WAL real clusters wrote, 13–18 (common/tests/data/wal/pg<major>/): the same blocks,
//! relations and databases from every start; and where the WAL ends before the end asked for —
//! in a recycled segment (a file still holding an older segment's pages), or torn in the
//! middle of a segment another thread decodes — the same error at the same position.

use failback_common::Lsn;
use failback_common::timeline::TimeLineHistory;
use failback_common::wal::{Decoded, WalDecoder};
use failback_datadir::wal::{WalEnd, WalReader};

const RELSEG_SIZE: u32 = 131072;

mod fixture;
use fixture::{Fixture, fixture};

impl Fixture {
    fn reader<'h>(&self, history: &'h TimeLineHistory) -> WalReader<'h> {
        WalReader::new(self.dir.path(), history, self.params, None)
    }

    /// Every record start from `start`, and where valid WAL ends.
    fn records(&self) -> (Vec<Lsn>, Lsn) {
        let history = TimeLineHistory::single(1);
        let mut starts = Vec::new();
        let mut last_end = self.start;
        let end = self
            .reader(&history)
            .walk(self.start, false, None, |r| {
                starts.push(r.lsn);
                last_end = r.end_lsn;
            })
            .unwrap();
        assert!(
            matches!(end, WalEnd::EndOfWal { .. } | WalEnd::NoMoreSegments { .. }),
            "{end:?}"
        );
        (starts, last_end)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join("pg_wal").join(name), bytes).unwrap();
    }
}

/// `changes`, as `Debug` text of the finished changes (or of the error) with the records
/// counted, once `changes_in_parallel` on 2 and 3 threads said the same.
fn alike(f: &Fixture, from: Lsn, until: Lsn) -> String {
    let history = TimeLineHistory::single(1);
    let show = |r: Result<failback_common::changes::WalChanges, _>| match r {
        Ok(c) => format!("{} records: {:?}", c.records(), c.finish(f.major)),
        Err(e) => format!("error: {e}"),
    };
    let one = show(f.reader(&history).changes(from, until, RELSEG_SIZE, || {}));
    let two = show(
        f.reader(&history)
            .changes_in_parallel(from, until, RELSEG_SIZE, 2, || {}),
    );
    let three = show(
        f.reader(&history)
            .changes_in_parallel(from, until, RELSEG_SIZE, 3, || {}),
    );
    assert_eq!(one, two, "{:?} from {from} to {until}", f.major);
    assert_eq!(one, three, "{:?} from {from} to {until}", f.major);
    one
}

#[test]
fn in_parallel_as_in_one_pass_from_every_start() {
    for major in 13..=18 {
        let f = fixture(major);
        let (starts, end) = f.records();
        let seg = u64::from(f.params.seg_size);
        assert!(
            end.0 / seg > f.start.0 / seg,
            "pg{major}: the WAL must reach a second segment"
        );
        // Starts near the beginning, in the middle, and just before a segment boundary.
        let mut picks: Vec<Lsn> = starts.iter().step_by(97).copied().collect();
        for w in starts.windows(2) {
            if w[0].0 / seg != w[1].0 / seg {
                picks.push(w[0]);
            }
        }
        for from in picks {
            let one = alike(&f, from, end);
            assert!(one.contains("records"), "pg{major} from {from}: {one}");
        }
    }
}

#[test]
fn wal_ending_in_a_recycled_segment_ends_alike() {
    for major in 13..=18 {
        let f = fixture(major);
        let (_, end) = f.records();
        // The segment after the last one present, as a recycled file: the first segment's
        // bytes, whose pages carry their old addresses.
        let seg = u64::from(f.params.seg_size);
        let (last, _) = f.segments.last().unwrap();
        let (tli, segno) =
            failback_common::lsn::parse_wal_file_name(last, f.params.seg_size).unwrap();
        let next = failback_common::lsn::wal_file_name(tli, segno + 1, f.params.seg_size);
        f.write(&next, &f.segments[0].1);
        let past = Lsn((segno + 1) * seg + 4096);
        let one = alike(&f, f.start, past);
        assert!(one.starts_with("error"), "pg{major}: {one}");
        // Up to where the WAL really ends, the recycled file changes nothing.
        let one = alike(&f, f.start, end);
        assert!(one.contains("records"), "pg{major}: {one}");
    }
}

#[test]
fn wal_torn_in_a_middle_segment_fails_alike() {
    for major in 13..=18 {
        let f = fixture(major);
        let (starts, end) = f.records();
        let seg = u64::from(f.params.seg_size);
        // A record in the middle of the second segment, which a thread of its own decodes.
        let second = (f.start.0 / seg + 1) * seg;
        let torn = *starts
            .iter()
            .find(|l| l.0 > second + seg / 3)
            .filter(|l| l.0 < end.0)
            .unwrap_or_else(|| panic!("pg{major}: no record in the second segment"));
        let (name, bytes) = &f.segments[(second / seg - f.start.0 / seg) as usize];
        let mut bytes = bytes.clone();
        // Its xl_tot_len, zeroed: how WAL looks where a crash cut it.
        let off = (torn.0 % seg) as usize;
        bytes[off..off + 4].fill(0);
        f.write(name, &bytes);
        let one = alike(&f, f.start, end);
        assert!(
            one.starts_with("error") && one.contains(&torn.to_string()),
            "pg{major}: {one}"
        );
        // And a decoder reading the files says the WAL ends there.
        let history = TimeLineHistory::single(1);
        match f
            .reader(&history)
            .walk(f.start, false, None, |_| {})
            .unwrap()
        {
            WalEnd::EndOfWal { lsn, .. } => assert_eq!(lsn, torn, "pg{major}"),
            other => panic!("pg{major}: {other:?}"),
        }
        // The bytes before the tear decode the same with the image bytes kept.
        let wal: Vec<u8> = f.segments.iter().flat_map(|(_, b)| b.clone()).collect();
        let base = failback_common::lsn::segment_start(f.start.0 / seg, f.params.seg_size);
        let mut dec = WalDecoder::new(f.start, f.params).unwrap();
        let mut n = 0;
        loop {
            match dec.poll() {
                Ok(Decoded::Record(r)) if r.lsn < torn => n += 1,
                Ok(Decoded::Record(_)) => break,
                Ok(Decoded::NeedMore { from }) => {
                    dec.feed(&wal[(from.0 - base.0) as usize..]);
                }
                Err(e) => panic!("pg{major}: {e}"),
            }
        }
        assert_eq!(n, starts.iter().filter(|l| **l < torn).count());
    }
}
