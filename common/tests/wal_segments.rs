//! What a scan spread over threads relies on, on WAL real clusters wrote (13–18,
//! common/tests/data/wal/pg<major>/):
//!
//! - a decoder started at any page (as each thread starts at its own segment, skipping the
//!   tail of the record continued onto it, `xlp_rem_len` with `XLP_FIRST_IS_CONTRECORD`) finds
//!   exactly the records a decoder run from the first record finds from there on, and, started
//!   at a segment, ends where it ends;
//! - leaving image bytes out of records that span pages changes nothing but those bytes: the
//!   same records, block references, block data, main data and kinds, the same end; and an
//!   image byte that is wrong still fails the record's CRC;
//! - WAL read straight into the decoder ([`WalDecoder::feed_in_place`]) decodes as WAL fed.

mod wal_support;

use failback_common::Lsn;
use failback_common::wal::{
    BlockImage, BlockRef, Decoded, IMAGE_BYTES_LEFT_OUT, WalDecoder, WalError, WalRecord,
};
use wal_support::*;

const PAGE: u64 = 8192;
const MAJORS: [u32; 6] = [13, 14, 15, 16, 17, 18];

/// The positions no record covers because an XLOG SWITCH skipped them: `(record end, next
/// segment)` of each switch.
fn switched_out(fx: &Fixture, all: &[Rec]) -> Vec<(u64, u64)> {
    all.iter()
        .filter(|r| r.end.0 % u64::from(fx.seg_size) == 0)
        .map(|r| (r.lsn.0 + u64::from(r.tot_len), r.end.0))
        .filter(|(real_end, next)| real_end < next)
        .collect()
}

#[test]
fn a_decoder_started_at_any_page_finds_the_records_that_follow() {
    for major in MAJORS {
        let fx = load(major);
        let (all, outcome) = decode_all(&fx, fx.lsn("start_lsn"), 64 << 10);
        let last = all.last().unwrap().lsn.0;
        let skipped = switched_out(&fx, &all);
        let seg = u64::from(fx.seg_size);
        let first_page = fx.lsn("start_lsn").0.next_multiple_of(PAGE);
        let mut checked = 0;
        for page in (first_page..last).step_by(PAGE as usize) {
            // A page an XLOG SWITCH skipped holds no records; reading it is not reading WAL.
            if skipped.iter().any(|&(s, e)| page + PAGE > s && page < e) {
                continue;
            }
            let from = all.partition_point(|r| r.lsn.0 < page);
            let whole = page.is_multiple_of(seg);
            // From a segment start to the end; elsewhere, far enough to leave the page behind.
            let want = if whole { usize::MAX } else { 40 };
            let mut got = Vec::new();
            let dec = WalDecoder::new_at_page(Lsn(page), fx.params()).unwrap();
            let end = run_until(&fx, dec, 64 << 10, want, |r| got.push(Rec::from(r)));
            let n = got.len();
            assert_eq!(
                got[..],
                all[from..from + n],
                "pg{major}: started at the page at {}",
                Lsn(page)
            );
            assert_eq!(n, want.min(all.len() - from), "pg{major} at {}", Lsn(page));
            if whole {
                assert_eq!(end, Some(outcome.clone()), "pg{major} at {}", Lsn(page));
            }
            checked += 1;
        }
        assert!(checked > 100, "pg{major}: only {checked} pages");
    }
}

/// [`run`] until `want` records were seen: the outcome if decoding ended first.
fn run_until(
    fx: &Fixture,
    mut dec: WalDecoder,
    chunk: usize,
    want: usize,
    mut f: impl FnMut(&WalRecord<'_>),
) -> Option<Outcome> {
    let mut seen = 0;
    loop {
        if seen == want {
            return None;
        }
        match dec.poll() {
            Ok(Decoded::Record(r)) => {
                seen += 1;
                f(&r);
            }
            Ok(Decoded::NeedMore { from }) => {
                let off = (from.0 - fx.base.0) as usize;
                if off >= fx.wal.len() {
                    return Some(Outcome::NeedMore(from));
                }
                dec.feed(&fx.wal[off..(off + chunk).min(fx.wal.len())]);
            }
            Err(e) => return Some(Outcome::Error(e)),
        }
    }
}

/// A record as the decoder gave it, with its block data, but not where payloads lie in the
/// record's bytes.
#[derive(Debug, PartialEq, Eq)]
struct Content {
    rec: Rec,
    block_data: Vec<Vec<u8>>,
}

fn content(r: &WalRecord<'_>) -> Content {
    let mut rec = Rec::from(r);
    let unplaced = |b: &BlockRef| BlockRef {
        data_offset: 0,
        image: b.image.map(|i| BlockImage { offset: 0, ..i }),
        ..*b
    };
    rec.blocks = r.blocks.iter().map(unplaced).collect();
    Content {
        rec,
        block_data: r.blocks.iter().map(|b| r.block_data(b).to_vec()).collect(),
    }
}

#[test]
fn image_bytes_left_out_change_nothing_else() {
    for major in MAJORS {
        let fx = load(major);
        let start = fx.lsn("start_lsn");
        for chunk in [8192, 64 << 10, 1 << 20] {
            let mut kept = Vec::new();
            let o1 = run(
                &fx.wal,
                fx.base,
                WalDecoder::new(start, fx.params()).unwrap(),
                chunk,
                |r| {
                    assert!(!r.images_left_out);
                    assert_eq!(r.raw.len(), r.tot_len() as usize);
                    kept.push(content(r));
                },
            );
            let (mut without, mut left_out) = (Vec::new(), 0);
            let o2 = run(
                &fx.wal,
                fx.base,
                WalDecoder::new(start, fx.params())
                    .unwrap()
                    .leave_out_image_bytes(),
                chunk,
                |r| {
                    let spans = r.lsn.0 % PAGE + u64::from(r.tot_len()) > PAGE;
                    let images: usize = r
                        .blocks
                        .iter()
                        .filter_map(|b| b.image)
                        .map(|i| usize::from(i.length))
                        .sum();
                    // Left out only where the record spans pages and has image bytes (and
                    // not when its fragment headers arrived only with its last piece).
                    assert!(!r.images_left_out || (spans && images > 0), "at {}", r.lsn);
                    if r.images_left_out {
                        left_out += 1;
                        assert_eq!(r.raw.len(), r.tot_len() as usize - images);
                        for b in r.blocks.iter().filter_map(|b| b.image) {
                            assert_eq!(b.offset, IMAGE_BYTES_LEFT_OUT);
                            assert!(r.block_image(&b).is_empty());
                        }
                    } else {
                        assert_eq!(r.raw.len(), r.tot_len() as usize);
                    }
                    without.push(content(r));
                },
            );
            assert_eq!(o1, o2, "pg{major}, chunk {chunk}");
            assert_eq!(kept.len(), without.len(), "pg{major}");
            for (a, b) in kept.iter().zip(&without) {
                assert_eq!(a, b, "pg{major}, chunk {chunk}");
            }
            assert!(
                left_out > 50,
                "pg{major}: {left_out} records left images out"
            );
        }
    }
}

#[test]
fn a_wrong_image_byte_still_fails_the_crc() {
    for major in MAJORS {
        let mut fx = load(major);
        let start = fx.lsn("start_lsn");
        // A record spanning pages with an image, and a byte in the middle of that image.
        let mut target = None;
        run(
            &fx.wal,
            fx.base,
            WalDecoder::new(start, fx.params()).unwrap(),
            1 << 20,
            |r| {
                let spans = r.lsn.0 % PAGE + u64::from(r.tot_len()) > PAGE;
                if target.is_none()
                    && spans
                    && let Some(img) = r.blocks.iter().find_map(|b| b.image)
                {
                    // The image's position in the record, then in the WAL (past page headers).
                    let mut at = r.lsn.0;
                    let mut left = u64::from(img.offset + u32::from(img.length) / 2);
                    while left > 0 {
                        let room = PAGE - at % PAGE;
                        if left < room {
                            at += left;
                            break;
                        }
                        left -= room;
                        at += room;
                        at += if at.is_multiple_of(u64::from(fx.seg_size)) {
                            40
                        } else {
                            24
                        };
                    }
                    target = Some((r.lsn, at));
                }
            },
        );
        let (rec, byte) = target.unwrap_or_else(|| panic!("pg{major}: no image spans pages"));
        // The record's image bytes are ones a decoder leaving them out does not copy.
        let mut left_out = None;
        run(
            &fx.wal,
            fx.base,
            WalDecoder::new(start, fx.params())
                .unwrap()
                .leave_out_image_bytes(),
            1 << 20,
            |r| {
                if r.lsn == rec {
                    left_out = Some(r.images_left_out);
                }
            },
        );
        assert_eq!(left_out, Some(true), "pg{major} at {rec}");
        fx.wal[(byte - fx.base.0) as usize] ^= 0x40;
        for leave_out in [false, true] {
            let mut dec = WalDecoder::new(start, fx.params()).unwrap();
            if leave_out {
                dec = dec.leave_out_image_bytes();
            }
            let o = run(&fx.wal, fx.base, dec, 64 << 10, |_| {});
            assert!(
                matches!(o, Outcome::Error(WalError::CrcMismatch { lsn, .. }) if lsn == rec),
                "pg{major}, leaving out {leave_out}: {o:?}"
            );
        }
    }
}

#[test]
fn wal_read_into_the_decoder_decodes_as_wal_fed() {
    for major in [13, 15, 18] {
        let fx = load(major);
        let start = fx.lsn("start_lsn");
        let (fed, o1) = decode_all(&fx, start, 64 << 10);
        for chunk in [1, 13, 8192, 64 << 10, 3 << 20] {
            let mut dec = WalDecoder::new(start, fx.params()).unwrap();
            let mut got = Vec::new();
            let o2 = loop {
                match dec.poll() {
                    Ok(Decoded::Record(r)) => got.push(Rec::from(&r)),
                    Ok(Decoded::NeedMore { from }) => {
                        let off = (from.0 - fx.base.0) as usize;
                        let wal = &fx.wal;
                        let n = dec
                            .feed_in_place(chunk, |room| {
                                let n = room.len().min(wal.len().saturating_sub(off));
                                room[..n].copy_from_slice(&wal[off..off + n]);
                                Ok::<_, ()>(n)
                            })
                            .unwrap();
                        if n == 0 {
                            break Outcome::NeedMore(from);
                        }
                    }
                    Err(e) => break Outcome::Error(e),
                }
            };
            assert_eq!(o1, o2, "pg{major}, chunk {chunk}");
            assert_eq!(fed, got, "pg{major}, chunk {chunk}");
        }
        // A failed read feeds nothing.
        let mut dec = WalDecoder::new(start, fx.params()).unwrap();
        let needed = dec.needed_lsn();
        assert_eq!(dec.feed_in_place(100, |_| Err("no")), Err("no"));
        assert_eq!(dec.needed_lsn(), needed);
        assert_eq!(dec.buffered(), 0);
    }
}
