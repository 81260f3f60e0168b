//! WAL summaries: what each WAL segment changed, worked out once, beside the server, while the
//! WAL is written, so that a rewind reads a summary instead of decoding the WAL again.
//!
//! PostgreSQL 17 has the same idea (`summarize_wal`, the WAL summarizer process writing
//! `pg_wal/summaries/*.summary`, read by incremental backup through
//! `pg_wal_summary_contents`): the set of blocks a stretch of WAL modified is small next to the
//! WAL that says so. A busy primary rewriting the same pages through many checkpoints writes
//! gigabytes of WAL full of full-page images of a few thousand blocks; the rewind needs the
//! blocks, not the images. failbackd keeps one summary per completed segment file of the
//! source: the changes ([`WalChanges`](crate::changes::WalChanges)) of the records that
//! *start* in it, so that the summaries of consecutive segments partition the records with no
//! record counted twice or missed.
//!
//! A summary is keyed by the segment's file name (timeline and segment number): a completed
//! segment file never changes until it is recycled under a later name, and after a promotion the
//! segment holding the switch point exists under both timelines' names with different contents
//! past the switch. Reading along a timeline history picks one name per segment number, and the
//! summary of exactly that file is what stands in for decoding it.
//!
//! A segment is complete once the next one has begun: PostgreSQL writes WAL in order, so the
//! next segment's first page carrying its own address (`xlp_pageaddr`) means every byte of this
//! one was written before it ([`segment_begun`]). A recycled file still carries an old address.
//!
//! What a stretch `[from, until)` changed is then summaries for the whole segments inside it and
//! decoding for the rest ([`pieces`]): the partial segments at its two ends, and any segment not
//! summarized (yet).

use crate::wal::page::XLogPageHeader;
use crate::{Lsn, XLogSegNo};

/// One part of a stretch of WAL: a whole segment's summary, or WAL to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// The records starting in segment `segno`: its summary.
    Summary(XLogSegNo),
    /// The records starting in `[from, until)`: decoded from the WAL.
    Decode { from: Lsn, until: Lsn },
}

/// The pieces of `[from, until)` in order, given which segments have a summary. A segment is
/// taken from its summary only when the stretch holds all of it; consecutive segments to
/// decode are one piece, so one decoder runs through them.
pub fn pieces(
    from: Lsn,
    until: Lsn,
    seg_size: u32,
    summarized: impl Fn(XLogSegNo) -> bool,
) -> Vec<Piece> {
    let mut out = Vec::new();
    if from >= until {
        return out;
    }
    let seg = u64::from(seg_size);
    let mut decode_from: Option<Lsn> = None;
    let mut at = from;
    while at < until {
        let segno = at.0 / seg;
        let seg_start = Lsn(segno * seg);
        let seg_end = Lsn(seg_start.0 + seg);
        let whole = at == seg_start && seg_end <= until;
        if whole && summarized(segno) {
            if let Some(f) = decode_from.take() {
                out.push(Piece::Decode {
                    from: f,
                    until: seg_start,
                });
            }
            out.push(Piece::Summary(segno));
        } else if decode_from.is_none() {
            decode_from = Some(at);
        }
        at = seg_end.min(until);
    }
    if let Some(f) = decode_from {
        out.push(Piece::Decode { from: f, until });
    }
    out
}

/// Whether `first_page`, the start of the file of the segment beginning at `seg_start`, shows
/// that segment begun: a long page header carrying its own address. A file recycled from an
/// older segment, or not yet written, does not.
pub fn segment_begun(first_page: &[u8], seg_start: Lsn) -> bool {
    XLogPageHeader::parse(first_page)
        .is_some_and(|h| h.long.is_some() && h.xlp_pageaddr == seg_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = 16 << 20;
    const S: u64 = SEG as u64;

    fn lsn(segno: u64, off: u64) -> Lsn {
        Lsn(segno * S + off)
    }

    #[test]
    fn whole_summarized_segments_stand_in_for_decoding() {
        // From the middle of segment 2 to the middle of segment 6; 3, 4 and 6 summarized.
        let p = pieces(lsn(2, 100), lsn(6, 40), SEG, |s| matches!(s, 3 | 4 | 6));
        assert_eq!(
            p,
            [
                Piece::Decode {
                    from: lsn(2, 100),
                    until: lsn(3, 0)
                },
                Piece::Summary(3),
                Piece::Summary(4),
                // 5 has no summary; 6 is not whole inside the stretch.
                Piece::Decode {
                    from: lsn(5, 0),
                    until: lsn(6, 40)
                },
            ]
        );
    }

    #[test]
    fn a_stretch_on_segment_boundaries_is_all_summaries() {
        let p = pieces(lsn(2, 0), lsn(5, 0), SEG, |_| true);
        assert_eq!(p, [Piece::Summary(2), Piece::Summary(3), Piece::Summary(4)]);
    }

    #[test]
    fn without_summaries_one_piece_decodes_it_all() {
        let p = pieces(lsn(2, 8192), lsn(9, 5), SEG, |_| false);
        assert_eq!(
            p,
            [Piece::Decode {
                from: lsn(2, 8192),
                until: lsn(9, 5)
            }]
        );
        assert_eq!(pieces(lsn(3, 0), lsn(3, 0), SEG, |_| true), []);
        // Within one segment, a summary of it is of no use.
        assert_eq!(
            pieces(lsn(3, 0), lsn(3, 77), SEG, |_| true),
            [Piece::Decode {
                from: lsn(3, 0),
                until: lsn(3, 77)
            }]
        );
    }

    #[test]
    fn pieces_cover_the_stretch_exactly_once() {
        // Every segment pattern over a stretch of a few segments: decoded pieces and summaries
        // tile [from, until) in order, with no gap and no overlap.
        for mask in 0u32..64 {
            for (from, until) in [
                (lsn(1, 0), lsn(7, 0)),
                (lsn(1, 5), lsn(6, 9)),
                (lsn(1, S - 1), lsn(2, 1)),
            ] {
                let p = pieces(from, until, SEG, |s| mask & (1 << (s % 6)) != 0);
                let mut at = from;
                for piece in &p {
                    let (a, b) = match *piece {
                        Piece::Summary(s) => (lsn(s, 0), lsn(s + 1, 0)),
                        Piece::Decode { from, until } => (from, until),
                    };
                    assert_eq!(a, at, "{p:?}");
                    assert!(b > a, "{p:?}");
                    at = b;
                }
                assert_eq!(at, until, "{p:?}");
                assert!(
                    p.windows(2)
                        .all(|w| !matches!(w, [Piece::Decode { .. }, Piece::Decode { .. }])),
                    "{p:?}"
                );
            }
        }
    }

    #[test]
    fn a_segment_has_begun_when_its_first_page_names_it() {
        let mut page = vec![0u8; 64];
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page[2..4].copy_from_slice(&0x0002u16.to_le_bytes()); // XLP_LONG_HEADER
        page[4..8].copy_from_slice(&1u32.to_le_bytes());
        page[8..16].copy_from_slice(&lsn(5, 0).0.to_le_bytes());
        assert!(segment_begun(&page, lsn(5, 0)));
        // Recycled: an older segment's address.
        assert!(!segment_begun(&page, lsn(9, 0)));
        // Not yet written.
        assert!(!segment_begun(&[0u8; 64], lsn(5, 0)));
        assert!(!segment_begun(&[], lsn(5, 0)));
    }
}
