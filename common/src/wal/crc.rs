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
//!
//! Where the CPU has AVX2 and `vpclmulqdq` (carry-less multiplication of two pairs of 64-bit
//! lanes at once), the long rounds do two kinds of work side by side, on execution units
//! that do not compete: the round's first part is *folded* — 128 bytes at a time, four 32-byte
//! registers each multiplied forward by the distance to the next 128 bytes and added to them,
//! so that the register stays congruent, modulo the polynomial, to everything folded in — while
//! its last part goes through the three `crc32` streams. A round is 7 parts of 32 bytes per
//! 224: the rate at which the folding keeps pace with the streams. Per piece this is about 1.5
//! times the streams alone on the AMD EPYC (family 25) the benchmarks ran on (8168-byte pieces,
//! and pieces of a page cut in two at random; folding alone was 1.2 times; an earlier trial of
//! 16-byte `pclmulqdq` folding, alone or beside the streams, was slower than the streams). In
//! a rewind's scan, where a piece comes straight from the kernel's copy of the page cache, the
//! CRC's time fell by about an eighth (perf, against the decoder's own time in the same runs):
//! some 3 % of the scan's CPU.
//! Without SSE 4.2 the crate's portable code is used.
//!
//! Folding works on the bit-reflected order PostgreSQL's CRC uses: the first byte's lowest bit
//! is the highest power of x. A 16-byte lane loaded little-endian holds its first 8 bytes (`H`)
//! in the low half and the next 8 (`L`) in the high half, and stands for `H·x^64 + L`; moved
//! forward by `d` bits, it is `H·x^(d+64) + L·x^d`, congruent to `H·(x^(d+64) mod P) +
//! L·(x^d mod P)`: two products of at most 95 bits, which fit the lane `d` bits on. A
//! carry-less product of two reflected 64-bit values comes out one bit low, so each constant
//! is `x^(n-1) mod P` rather than `x^n mod P` ([`fold_constant`]). What is left at the end, one
//! lane, is congruent to the data folded in: its CRC, from zero, is theirs.

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
        if data.len() >= WIDE_ROUND * 2
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
        {
            // SAFETY: the CPU has every feature `folded_and_streamed` is compiled for.
            return unsafe { folded_and_streamed(crc, data) };
        }
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

/// Bytes per iteration of a long round with folding: 128 folded, 32 for each of three streams.
#[cfg(target_arch = "x86_64")]
const WIDE_ROUND: usize = 224;

/// The Castagnoli polynomial in normal order, without its `x^32` term.
#[cfg(target_arch = "x86_64")]
const POLY_NORMAL: u64 = 0x1EDC_6F41;

/// The constant that multiplies 64 bits of a lane by `x^bits` modulo P: `x^(bits-1) mod P`
/// (the module header says why one less), bit-reflected, in the high half of a 64-bit lane.
#[cfg(target_arch = "x86_64")]
const fn fold_constant(bits: u32) -> i64 {
    let mut r: u64 = 1;
    let mut i = 0;
    while i < bits - 1 {
        r <<= 1;
        if r & (1 << 32) != 0 {
            r ^= (1 << 32) | POLY_NORMAL;
        }
        i += 1;
    }
    ((r as u32).reverse_bits() as u64).cast_signed() << 32
}

/// A piece in rounds that fold 128 bytes an iteration beside three `crc32` streams of 32 (see
/// the module header), then [`three_streams`] for the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2,pclmulqdq,avx2,vpclmulqdq")]
fn folded_and_streamed(crc: u32, mut data: &[u8]) -> u32 {
    let mut r = !crc;
    // Each round's length a constant, so that its loops are laid out whole.
    macro_rules! rounds {
        ($($iterations:literal, $table:literal);*) => {$(
            while let Some((round, rest)) = data.split_at_checked(WIDE_ROUND * $iterations) {
                r = wide_round::<$iterations>(r, round, &ADVANCE[$table]);
                data = rest;
            }
        )*};
    }
    // Each stream's length in a round (32 bytes an iteration) is one of [`STREAMS`], whose
    // [`ADVANCE`] tables join the round's CRCs.
    rounds!(32, 0; 8, 1; 2, 2);
    three_streams(!r, data)
}

/// One round of [`folded_and_streamed`] of `N` iterations (`data` is `N` x 224 bytes long):
/// the CRC register `r` advanced over it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2,pclmulqdq,avx2,vpclmulqdq")]
#[inline]
fn wide_round<const N: usize>(r: u32, data: &[u8], advance: &[[u32; 256]; 4]) -> u32 {
    use std::arch::x86_64::{
        __m256i, _mm_clmulepi64_si128, _mm_crc32_u64, _mm_cvtsi128_si64, _mm_extract_epi64,
        _mm_set_epi64x, _mm_xor_si128, _mm256_castsi256_si128, _mm256_clmulepi64_epi128,
        _mm256_extracti128_si256, _mm256_loadu_si256, _mm256_set_epi64x, _mm256_xor_si256,
    };
    // Each lane's constants: its first 8 bytes move `d + 64` bits, its next 8 `d`; computed
    // when compiling (a call at run time would be a loop of a thousand steps).
    const FAR: [i64; 2] = [fold_constant(1024 + 64), fold_constant(1024)];
    const NEAR: [i64; 2] = [fold_constant(256 + 64), fold_constant(256)];
    const LAST: [i64; 2] = [fold_constant(128 + 64), fold_constant(128)];
    // Four registers of two lanes: the next 128 bytes are 1024 bits on, the next register 256.
    let next_128 = _mm256_set_epi64x(FAR[1], FAR[0], FAR[1], FAR[0]);
    let next_32 = _mm256_set_epi64x(NEAR[1], NEAR[0], NEAR[1], NEAR[0]);
    let next_16 = _mm_set_epi64x(LAST[1], LAST[0]);
    let fold = |x: __m256i, k: __m256i, onto: __m256i| {
        let first = _mm256_clmulepi64_epi128(x, k, 0x00);
        let second = _mm256_clmulepi64_epi128(x, k, 0x11);
        _mm256_xor_si256(_mm256_xor_si256(first, second), onto)
    };
    let load = |b: &[u8; 32]| {
        // SAFETY: an unaligned load of exactly the 32 bytes of `b`.
        unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
    };
    // An iteration's 128 bytes to fold, and 32 bytes of each stream.
    let (blocks, streams) = data.as_chunks::<32>().0.split_at(4 * N);
    let blocks = blocks.as_chunks::<4>().0;
    let (a, rest) = streams.split_at(N);
    let (b, c) = rest.split_at(N);
    // The CRC so far goes into the first 4 bytes: it stands for them as they were before,
    // advanced over everything after.
    let mut x = blocks[0].map(|b| load(&b));
    x[0] = _mm256_xor_si256(x[0], _mm256_set_epi64x(0, 0, 0, i64::from(r)));
    let (mut ra, mut rb, mut rc) = (0u64, 0u64, 0u64);
    for (i, ((a, b), c)) in a.iter().zip(b).zip(c).enumerate() {
        if i > 0 {
            for (x, block) in x.iter_mut().zip(&blocks[i]) {
                *x = fold(*x, next_128, load(block));
            }
        }
        let word = |s: &[u8; 32], w: usize| {
            u64::from_le_bytes(s[8 * w..8 * w + 8].try_into().expect("8 bytes"))
        };
        for w in 0..4 {
            ra = _mm_crc32_u64(ra, word(a, w));
            rb = _mm_crc32_u64(rb, word(b, w));
            rc = _mm_crc32_u64(rc, word(c, w));
        }
    }
    let one = fold(
        fold(fold(x[0], next_32, x[1]), next_32, x[2]),
        next_32,
        x[3],
    );
    let first = _mm256_castsi256_si128(one);
    let lane = _mm_xor_si128(
        _mm_xor_si128(
            _mm_clmulepi64_si128(first, next_16, 0x00),
            _mm_clmulepi64_si128(first, next_16, 0x11),
        ),
        _mm256_extracti128_si256(one, 1),
    );
    let low = _mm_cvtsi128_si64(lane).cast_unsigned();
    let high = _mm_extract_epi64(lane, 1).cast_unsigned();
    let rf = _mm_crc32_u64(_mm_crc32_u64(0, low), high) as u32;
    let advance = |r: u32| {
        advance[0][(r & 0xff) as usize]
            ^ advance[1][((r >> 8) & 0xff) as usize]
            ^ advance[2][((r >> 16) & 0xff) as usize]
            ^ advance[3][(r >> 24) as usize]
    };
    advance(advance(advance(rf) ^ ra as u32) ^ rb as u32) ^ rc as u32
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
        // Every length to a few rounds with folding, then a page's and longer.
        let lengths = (0..4000).chain((4000..16_000).step_by(7));
        for len in lengths.chain([7168, 7392, 8152, 8168, 8192, 12_000, 19_990]) {
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

    /// Both x86 paths, whichever the dispatch would take on this CPU.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn folding_and_the_streams_agree_with_the_crate() {
        let bytes: Vec<u8> = (0..40_000u32)
            .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 11) as u8)
            .collect();
        let has = |f: &str| match f {
            "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "vpclmulqdq" => std::arch::is_x86_feature_detected!("vpclmulqdq"),
            _ => std::arch::is_x86_feature_detected!("pclmulqdq"),
        };
        if !has("sse4.2") {
            eprintln!("skipped: no SSE 4.2");
            return;
        }
        let folding = ["avx2", "vpclmulqdq", "pclmulqdq"].into_iter().all(has);
        if !folding {
            eprintln!("folding not checked: no AVX2 and VPCLMULQDQ here");
        }
        for len in (0..600)
            .chain((1700..20_000).step_by(13))
            .chain([32 * 224, 40 * 224])
        {
            for start in [0, 3] {
                let d = &bytes[start..start + len];
                for init in [0, 0xFFFF_FFFF, 0x89AB_CDEF] {
                    let want = crc32c::crc32c_append(init, d);
                    // SAFETY: SSE 4.2 was found above.
                    assert_eq!(
                        unsafe { three_streams(init, d) },
                        want,
                        "streams, len {len}"
                    );
                    if folding {
                        // SAFETY: every feature it is compiled for was found above.
                        let got = unsafe { folded_and_streamed(init, d) };
                        assert_eq!(got, want, "folded, len {len} start {start}");
                    }
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
