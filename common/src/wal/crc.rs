//! CRC-32C of WAL records, computed piece by piece as the pieces arrive.
//!
//! Every WAL record carries a CRC-32C (`xl_crc`, the Castagnoli polynomial) over its bytes
//! after the header, then the header up to the CRC field (`COMP_CRC32C` in `xlog.c`). Most of
//! the WAL's bytes are full-page images, and a record holding one spans pages: the decoder
//! checks it one page's piece at a time, so the CRC runs over pieces of at most a page (8168
//! bytes after a short page header), not over long buffers.
//!
//! The `crc32c` crate uses the SSE 4.2 `crc32` instruction (detected at run time), three
//! streams at a time to hide the instruction's latency, in rounds of 3 x 8192 or 3 x 256 bytes
//! and one stream for the rest: a page's piece (8168 bytes) never reaches the long rounds, and
//! its last 488 bytes go through at a third of the speed. Here a piece is split into three
//! streams of 1024, then 256, then 64 bytes, leaving fewer than 192 bytes to one stream; the
//! three partial CRCs are joined with tables that advance a CRC over that many zero bytes.
//! Folding with carry-less multiplication (`pclmulqdq`), alone or beside the `crc32` streams,
//! was measured too: slower on the AMD EPYC the benchmarks ran on. Without SSE 4.2 the crate's
//! portable code is used.

/// The Castagnoli polynomial, bit-reversed (as the `crc32` instruction and PostgreSQL use it).
#[cfg(target_arch = "x86_64")]
const POLY: u32 = 0x82F6_3B78;

/// Each stream's length per round, longest first.
#[cfg(target_arch = "x86_64")]
const STREAMS: [usize; 3] = [1024, 256, 64];

/// For each stream length: `T[j][v]` is the CRC register holding `v << 8j` advanced over that
/// many zero bytes, so that a register is advanced with four lookups.
#[cfg(target_arch = "x86_64")]
static ADVANCE: [[[u32; 256]; 4]; 3] = [
    advance_tables(STREAMS[0]),
    advance_tables(STREAMS[1]),
    advance_tables(STREAMS[2]),
];

/// The tables advancing a CRC register over `bytes` zero bytes (see [`ADVANCE`]).
#[cfg(target_arch = "x86_64")]
const fn advance_tables(bytes: usize) -> [[u32; 256]; 4] {
    // Where each single bit of the register ends up; the register is linear in its bits.
    let mut bit = [0u32; 32];
    let mut i = 0;
    while i < 32 {
        let mut r = 1u32 << i;
        let mut n = 0;
        while n < bytes * 8 {
            r = if r & 1 != 0 { (r >> 1) ^ POLY } else { r >> 1 };
            n += 1;
        }
        bit[i] = r;
        i += 1;
    }
    let mut t = [[0u32; 256]; 4];
    let mut j = 0;
    while j < 4 {
        let mut v = 0;
        while v < 256 {
            let mut r = 0;
            let mut b = 0;
            while b < 8 {
                if v & (1 << b) != 0 {
                    r ^= bit[8 * j + b];
                }
                b += 1;
            }
            t[j][v] = r;
            v += 1;
        }
        j += 1;
    }
    t
}

/// CRC-32C of `data` continued from `crc` (a CRC of the bytes before it, 0 for none): what
/// `crc32c::crc32c_append` returns.
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2, the only feature `three_streams` is compiled for.
        return unsafe { three_streams(crc, data) };
    }
    crc32c::crc32c_append(crc, data)
}

/// CRC-32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn three_streams(crc: u32, mut data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u32, _mm_crc32_u64};
    // Taken as arrays of 8 bytes, the words are plain loads and the three streams one indexed
    // loop (slices of `chunks_exact` cost twice the instructions of the CRC itself).
    fn words(b: &[u8]) -> &[[u8; 8]] {
        b.as_chunks::<8>().0
    }
    let mut r = u64::from(!crc);
    // Most records are a few dozen bytes (and each record's header is 20): too short for any
    // round, so the rounds' set-up is skipped for them.
    let rounds = if data.len() >= 3 * STREAMS[STREAMS.len() - 1] {
        &STREAMS[..]
    } else {
        &[]
    };
    for (&len, t) in rounds.iter().zip(&ADVANCE) {
        while data.len() >= 3 * len {
            let (a, rest) = data.split_at(len);
            let (b, rest) = rest.split_at(len);
            let (c, rest) = rest.split_at(len);
            let (mut rb, mut rc) = (0u64, 0u64);
            for ((a, b), c) in words(a).iter().zip(words(b)).zip(words(c)) {
                r = _mm_crc32_u64(r, u64::from_le_bytes(*a));
                rb = _mm_crc32_u64(rb, u64::from_le_bytes(*b));
                rc = _mm_crc32_u64(rc, u64::from_le_bytes(*c));
            }
            // The CRC of a stream followed by the next is the first advanced over the next's
            // length, plus the next's CRC from zero.
            let advance = |r: u32| {
                t[0][(r & 0xff) as usize]
                    ^ t[1][((r >> 8) & 0xff) as usize]
                    ^ t[2][((r >> 16) & 0xff) as usize]
                    ^ t[3][(r >> 24) as usize]
            };
            let ab = advance(r as u32) ^ rb as u32;
            r = u64::from(advance(ab) ^ rc as u32);
            data = rest;
        }
    }
    let (whole, mut rest) = data.as_chunks::<8>();
    for w in whole {
        r = _mm_crc32_u64(r, u64::from_le_bytes(*w));
    }
    let mut r = r as u32;
    // A record's header up to its CRC is 20 bytes: 4 left after the words, taken at once.
    if let Some((four, tail)) = rest.split_first_chunk::<4>() {
        r = _mm_crc32_u32(r, u32::from_le_bytes(*four));
        rest = tail;
    }
    for &b in rest {
        r = _mm_crc32_u8(r, b);
    }
    !r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_as_the_crate_at_every_length_and_alignment() {
        let bytes: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..4000).chain([8152, 8168, 8192, 12_000, 19_990]) {
            for start in [0, 1, 5] {
                let d = &bytes[start..start + len];
                for init in [0, 0x1234_5678] {
                    assert_eq!(
                        crc32c_append(init, d),
                        crc32c::crc32c_append(init, d),
                        "len {len} start {start}"
                    );
                }
            }
        }
    }

    #[test]
    fn pieces_append_to_the_whole() {
        let bytes: Vec<u8> = (0..9000u32).map(|i| (i * 31 + (i >> 7)) as u8).collect();
        let (a, b) = bytes.split_at(3001);
        assert_eq!(crc32c_append(crc32c(a), b), crc32c::crc32c(&bytes));
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
