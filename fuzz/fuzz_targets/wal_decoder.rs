//! Fuzzes `WalDecoder`: arbitrary bytes as the WAL of one of PostgreSQL 13–18, from the start
//! of a segment, fed in arbitrary splits.
//!
//! Input layout (all choices come from the input, so every crash reproduces from its file):
//!
//! ```text
//! byte 0   bits 0-2: major version (PgMajor::ALL[n % 6]); bit 3: raw mode, stamp valid page
//!          headers; bit 4: detect the version from the first page's magic instead of knowing
//!          it; bit 6: 1 MB segments (else 16 MB); bit 7: forged mode (see below)
//! byte 1   bit 0: start at the page (skipping a continued record, as pg_waldump does) rather
//!          than at the first record after the long page header; bits 1-7: the segment number
//!          the WAL starts at (at least 1), so that real WAL keeps its own addresses
//! byte 2-3 seed of the feeding splits
//! rest     the WAL (raw mode) or the records (forged mode)
//! ```
//!
//! - **Raw mode**: the rest is the WAL itself, with each page's `xlp_magic` set to the
//!   version's magic so the decoder gets past it; with bit 3, the page addresses, timeline and
//!   long-header fields are made valid as well, so mutations reach records.
//! - **Forged mode**: the rest is a list of records, each `rmid, info, len (u16 LE), len bytes`
//!   of what follows the 24-byte record header (block headers, data); the target writes the
//!   header with the right `xl_tot_len`, `xl_prev` and CRC and lays the records out in pages
//!   as PostgreSQL does (page headers, continuation records, 8-byte alignment), so that the
//!   fuzzer explores block references, images and the special records rather than the CRC.
//!
//! Checked besides "no panic": the decoder is driven twice, feeding everything at once and in
//! pseudo-random pieces (1 byte to several pages), and both runs must return the same records
//! and end the same way; records move forward; `NeedMore` asks for exactly the next byte; an
//! error repeats on the next poll (except the documented `UnrecognizedRelUpdate`); the loop
//! ends. A third run interprets only the kinds a scan for changes reads
//! (`interpret_only(&WalChanges::KINDS_FROM)`): the same records, each kind the same or, for a
//! record of another rmgr that is not flagged `XLR_SPECIAL_REL_UPDATE`, `Other`; it ends the
//! same way unless the whole run stopped at a record that only its interpretation found
//! malformed.

#![no_main]

use failback_common::changes::WalChanges;
use failback_common::wal::record::record_crc;
use failback_common::wal::{Decoded, WalDecoder, WalError, WalParams, WalRecord};
use failback_common::{Lsn, PgMajor};
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 8192;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;

fuzz_target!(|data: &[u8]| {
    let [flags, start_mode, s0, s1, rest @ ..] = data else {
        return;
    };
    let major = PgMajor::ALL[usize::from(flags & 7) % PgMajor::ALL.len()];
    let seg_size: u32 = if flags & 0x40 != 0 { 1 << 20 } else { 16 << 20 };
    let segno = u64::from((start_mode >> 1).max(1));
    let base = segno * u64::from(seg_size);
    let wal = if flags & 0x80 != 0 {
        forge(major, seg_size, base, rest)
    } else {
        raw(major, seg_size, base, rest, flags & 0x08 != 0)
    };
    let params = if flags & 0x10 != 0 {
        WalParams::detect(seg_size)
    } else {
        WalParams::new(major, seg_size)
    };
    let at_page = start_mode & 1 != 0;
    let seed = u64::from(*s0) | u64::from(*s1) << 8;
    let whole = drive(&wal, base, params, at_page, None, false);
    let split = drive(&wal, base, params, at_page, Some(seed), false);
    assert_eq!(whole, split, "feeding in pieces changed the outcome");
    let narrow = drive(&wal, base, params, at_page, None, true);
    assert!(
        narrow.records.len() >= whole.records.len(),
        "interpreting less lost records"
    );
    for (w, n) in whole.records.iter().zip(&narrow.records) {
        assert_eq!(w.record, n.record, "interpreting less changed a record");
        let must_interpret = WalChanges::KINDS_FROM.contains(&w.rmid) || w.flagged;
        assert!(
            n.kind == w.kind || (!must_interpret && n.kind == "Other"),
            "interpreting less gave {} where all gave {}",
            n.kind,
            w.kind
        );
    }
    if !whole.malformed_kind {
        assert_eq!(whole.end, narrow.end, "interpreting less ended otherwise");
        assert_eq!(whole.records.len(), narrow.records.len());
    }
});

/// Raw mode: the bytes as WAL, with valid magic (and, if `stamp`, valid headers) on each page.
fn raw(major: PgMajor, seg_size: u32, base: u64, bytes: &[u8], stamp: bool) -> Vec<u8> {
    let mut wal = bytes.to_vec();
    let mut page = 0;
    while page < wal.len() {
        put(&mut wal, page, &major.xlog_page_magic().to_le_bytes());
        if stamp {
            let addr = base + page as u64;
            let long = addr.is_multiple_of(u64::from(seg_size));
            let mut info = get_u16(&wal, page + 2) & 0x000D;
            if long {
                info |= XLP_LONG_HEADER;
            }
            put(&mut wal, page + 2, &info.to_le_bytes());
            put(&mut wal, page + 4, &1u32.to_le_bytes());
            put(&mut wal, page + 8, &addr.to_le_bytes());
            if long {
                put(&mut wal, page + 32, &seg_size.to_le_bytes());
                put(&mut wal, page + 36, &(PAGE as u32).to_le_bytes());
            }
        }
        page += PAGE;
    }
    wal
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        if let Some(slot) = buf.get_mut(at + i) {
            *slot = *b;
        }
    }
}

fn get_u16(buf: &[u8], at: usize) -> u16 {
    let lo = buf.get(at).copied().unwrap_or(0);
    let hi = buf.get(at + 1).copied().unwrap_or(0);
    u16::from_le_bytes([lo, hi])
}

/// Forged mode: records with correct headers and CRCs, laid out in pages.
fn forge(major: PgMajor, seg_size: u32, base: u64, mut spec: &[u8]) -> Vec<u8> {
    let mut w = Layout {
        major,
        seg_size,
        base,
        out: Vec::new(),
    };
    let mut prev = base.saturating_sub(0x100);
    while let [rmid, info, l0, l1, more @ ..] = spec {
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(more.len());
        let (body, next) = more.split_at(len);
        spec = next;
        let tot = 24 + body.len();
        let mut rec = Vec::with_capacity(tot);
        rec.extend_from_slice(&(tot as u32).to_le_bytes());
        rec.extend_from_slice(&1u32.to_le_bytes()); // xl_xid
        rec.extend_from_slice(&prev.to_le_bytes());
        rec.push(*info);
        rec.push(*rmid);
        rec.extend_from_slice(&[0; 6]); // padding, xl_crc
        rec.extend_from_slice(body);
        let crc = record_crc(&rec);
        rec[20..24].copy_from_slice(&crc.to_le_bytes());
        prev = w.write(&rec);
    }
    w.out
}

struct Layout {
    major: PgMajor,
    seg_size: u32,
    base: u64,
    out: Vec<u8>,
}

impl Layout {
    fn pos(&self) -> u64 {
        self.base + self.out.len() as u64
    }

    fn page_header(&mut self, rem_len: u32) {
        let pos = self.pos();
        let long = pos.is_multiple_of(u64::from(self.seg_size));
        let mut info = 0u16;
        if rem_len > 0 {
            info |= XLP_FIRST_IS_CONTRECORD;
        }
        if long {
            info |= XLP_LONG_HEADER;
        }
        let o = &mut self.out;
        o.extend_from_slice(&self.major.xlog_page_magic().to_le_bytes());
        o.extend_from_slice(&info.to_le_bytes());
        o.extend_from_slice(&1u32.to_le_bytes());
        o.extend_from_slice(&pos.to_le_bytes());
        o.extend_from_slice(&rem_len.to_le_bytes());
        o.extend_from_slice(&[0; 4]);
        if long {
            o.extend_from_slice(&7u64.to_le_bytes());
            o.extend_from_slice(&self.seg_size.to_le_bytes());
            o.extend_from_slice(&(PAGE as u32).to_le_bytes());
        }
    }

    /// Writes `rec` at the current position (page headers where pages start), pads to 8 bytes;
    /// returns where it starts.
    fn write(&mut self, rec: &[u8]) -> u64 {
        if self.pos().is_multiple_of(PAGE as u64) {
            self.page_header(0);
        }
        let lsn = self.pos();
        let mut i = 0;
        while i < rec.len() {
            if self.pos().is_multiple_of(PAGE as u64) {
                self.page_header((rec.len() - i) as u32);
            }
            let space = PAGE - (self.pos() % PAGE as u64) as usize;
            let take = space.min(rec.len() - i);
            self.out.extend_from_slice(&rec[i..i + take]);
            i += take;
        }
        while !self.out.len().is_multiple_of(8) {
            self.out.push(0);
        }
        lsn
    }
}

/// What a run produced: a summary of each record, and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    records: Vec<Summary>,
    end: String,
    /// It ended at a record whose main data its kind's parser refused.
    malformed_kind: bool,
}

/// A record as a caller sees it: all but its kind, its kind (with what the kind names), and
/// what decides whether the kind must be interpreted.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    record: String,
    kind: String,
    rmid: u8,
    flagged: bool,
}

/// Decodes `wal` (whose first byte is at `base`) to its end or the first error, feeding it
/// whole (`seed` None) or in pseudo-random pieces, interpreting every kind or, if `narrow`,
/// only those a scan for changes reads.
fn drive(
    wal: &[u8],
    base: u64,
    params: WalParams,
    at_page: bool,
    seed: Option<u64>,
    narrow: bool,
) -> Run {
    let dec = if at_page {
        WalDecoder::new_at_page(Lsn(base), params)
    } else {
        WalDecoder::new(Lsn(base + 40), params)
    };
    let mut dec = dec.expect("the target's own parameters are valid");
    if narrow {
        dec = dec.interpret_only(&WalChanges::KINDS_FROM);
    }
    let mut malformed_kind = false;
    let mut rng = seed.map(|s| s.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut records = Vec::new();
    let mut last: Option<Lsn> = None;
    let mut polls = 0usize;
    let end = loop {
        polls += 1;
        assert!(
            polls <= 4 * wal.len() + 64,
            "the decoder does not make progress"
        );
        match dec.poll() {
            Ok(Decoded::Record(r)) => {
                assert!(
                    r.end_lsn > r.lsn,
                    "record at {} ends at {}",
                    r.lsn,
                    r.end_lsn
                );
                if let Some(l) = last {
                    assert!(r.lsn > l, "record at {} after one at {l}", r.lsn);
                }
                last = Some(r.lsn);
                records.push(summary(&r));
            }
            Ok(Decoded::NeedMore { from }) => {
                assert_eq!(
                    from,
                    dec.needed_lsn(),
                    "NeedMore asks for other bytes than needed_lsn"
                );
                let off = from
                    .0
                    .checked_sub(base)
                    .unwrap_or_else(|| panic!("asks for {from}, before the WAL given"));
                let Some(left) = usize::try_from(off).ok().and_then(|o| wal.get(o..)) else {
                    break format!("need more at {from}");
                };
                if left.is_empty() {
                    break format!("need more at {from}");
                }
                let n = match &mut rng {
                    None => left.len(),
                    Some(x) => {
                        *x ^= *x << 13;
                        *x ^= *x >> 7;
                        *x ^= *x << 17;
                        let cap = [1, 3, 24, 100, 4096, PAGE + 5, 3 * PAGE][(*x % 7) as usize];
                        1 + (*x >> 8) as usize % cap
                    }
                };
                dec.feed(&left[..n.min(left.len())]);
            }
            Err(e) => {
                malformed_kind = matches!(e, WalError::MalformedRecord { .. });
                let shown = format!("{e} (at {}, end of WAL: {})", e.lsn(), e.is_end_of_wal());
                if !matches!(e, WalError::UnrecognizedRelUpdate { .. }) {
                    assert_eq!(dec.poll().err(), Some(e), "an error does not repeat");
                }
                break shown;
            }
        }
    };
    Run {
        records,
        end,
        malformed_kind,
    }
}

/// Everything a caller can read of a record, touched and summarised.
fn summary(r: &WalRecord<'_>) -> Summary {
    let mut kind = format!("{:?}", r.kind);
    for rel in r.kind.dropped_relations().iter() {
        kind.push_str(&format!(" drop {rel:?}"));
    }
    let mut s = format!(
        "{} {} {} {} {}/{} tli {} xid {} tot {} fpi {} main {} origin {:?} top {:?} special {}",
        r.lsn,
        r.end_lsn,
        r.xl_prev(),
        r.major,
        r.rmgr_name(),
        r.record_type(),
        r.page_tli,
        r.xid(),
        r.tot_len(),
        r.fpi_len(),
        r.main_data.len(),
        r.origin,
        r.toplevel_xid,
        r.is_special_rel_update(),
    );
    assert_eq!(r.raw.len(), r.tot_len() as usize, "raw is the whole record");
    for b in r.blocks {
        let data = r.block_data(b);
        assert_eq!(
            data.len(),
            usize::from(b.data_len),
            "block data within the record"
        );
        s.push_str(&format!(" [{b:?} data {}", data.len()));
        if let Some(img) = &b.image {
            let bytes = r.block_image(img);
            assert_eq!(
                bytes.len(),
                usize::from(img.length),
                "image within the record"
            );
            s.push_str(&format!(
                " image {} {}",
                bytes.len(),
                img.compression.name()
            ));
        }
        s.push(']');
    }
    Summary {
        record: s,
        kind,
        rmid: r.rmid(),
        flagged: r.is_special_rel_update(),
    }
}
