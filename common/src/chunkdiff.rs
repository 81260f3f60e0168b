//! Which parts of a file to fetch, given hashes of fixed-size chunks on both sides.
//!
//! pg_rewind copies every non-relation file whole: all of `pg_wal`, SLRUs, configuration
//! files. Most of those bytes are already on the target (WAL from before the fork, SLRU pages
//! nobody touched). failbackd hashes the source's chunks (`ChunkHashes`), the client hashes its
//! own, and only the chunks that differ cross the link. A chunk is skipped only when both sides
//! have it at the same extent (the same start and the same length: the last chunk of a file is
//! short) with the same hash; everything else is fetched, so a doubtful answer costs bytes,
//! never correctness.
//!
//! failbackd hashes with blake3. A plain PostgreSQL server reached over libpq has no blake3, but
//! it has `sha256(bytea)` (PostgreSQL 11+), which any role may call: its chunks come hashed
//! with SHA-256, and the target then hashes its own with the same function ([`ChunkHash`]), as
//! hashes of two different functions never compare equal.

use serde::Serialize;
use sha2::Digest;

/// The function a side's chunk hashes were made with; both sides of a comparison must use the
/// same one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum ChunkHash {
    /// failbackd's, and the target's own: the fastest on the CPU.
    #[default]
    Blake3,
    /// What PostgreSQL computes in SQL (`sha256(bytea)`), for a source reached over libpq.
    Sha256,
}

impl ChunkHash {
    /// The 32-byte hash of `data`.
    pub fn hash(self, data: &[u8]) -> [u8; 32] {
        match self {
            ChunkHash::Blake3 => *blake3::hash(data).as_bytes(),
            ChunkHash::Sha256 => sha2::Sha256::digest(data).into(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::Blake3 => "blake3",
            ChunkHash::Sha256 => "sha256",
        }
    }
}

/// Hashes of the chunks of one file (both lists of a comparison by the same [`ChunkHash`]), in
/// order: chunk `i` covers
/// `[i*chunk_size, min((i+1)*chunk_size, size))`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkList<'a> {
    pub size: u64,
    pub hashes: &'a [[u8; 32]],
}

/// A byte range of a file to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

/// A whole file, whatever its size, as a range: a file hashed in one range from its start.
pub const WHOLE_FILE: ByteRange = ByteRange {
    offset: 0,
    length: u64::MAX,
};

/// How many chunks of `chunk_size` cover `size` bytes; `None` for a zero chunk size.
pub fn chunk_count(size: u64, chunk_size: u64) -> Option<u64> {
    if chunk_size == 0 {
        return None;
    }
    Some(size / chunk_size + u64::from(!size.is_multiple_of(chunk_size)))
}

/// The ranges of the source file that the target lacks, merged where adjacent, covering
/// `[0, source.size)` except the chunks both sides hold identically.
///
/// A hash list whose length does not match its size (a hostile or confused peer) makes the
/// whole source file be fetched.
pub fn ranges_to_fetch(chunk_size: u64, source: &ChunkList, target: &ChunkList) -> Vec<ByteRange> {
    let whole = || {
        if source.size == 0 {
            Vec::new()
        } else {
            vec![ByteRange {
                offset: 0,
                length: source.size,
            }]
        }
    };
    let (Some(n_src), Some(n_tgt)) = (
        chunk_count(source.size, chunk_size),
        chunk_count(target.size, chunk_size),
    ) else {
        return whole();
    };
    if n_src != source.hashes.len() as u64 || n_tgt != target.hashes.len() as u64 {
        return whole();
    }
    let extent = |i: u64, size: u64| {
        let start = i.saturating_mul(chunk_size);
        (start, size.min(start.saturating_add(chunk_size)))
    };
    let mut out: Vec<ByteRange> = Vec::new();
    for (i, h) in source.hashes.iter().enumerate() {
        let i = i as u64;
        let (start, end) = extent(i, source.size);
        let same = target
            .hashes
            .get(i as usize)
            .is_some_and(|t| t == h && extent(i, target.size) == (start, end));
        if same {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.offset.saturating_add(r.length) == start => r.length += end - start,
            _ => out.push(ByteRange {
                offset: start,
                length: end - start,
            }),
        }
    }
    out
}

/// How many `chunk`-byte chunks the source hashes of `ranges` in a file of `size` bytes:
/// each range's chunks start at its offset and are cut at its end and at `size`, so a range
/// past the end of the file has none. `None` for a zero chunk size.
pub fn chunks_within(ranges: &[ByteRange], chunk: u64, size: u64) -> Option<u64> {
    ranges.iter().try_fold(0u64, |n, r| {
        let end = r.offset.saturating_add(r.length).min(size);
        Some(n + chunk_count(end.saturating_sub(r.offset), chunk)?)
    })
}

/// [`ranges_to_fetch`] inside `ranges` only: the second, finer round of a comparison whose
/// first round, in coarse chunks, found these ranges different (a mebibyte of relation file
/// of which one page changed need not cross whole). Both lists hold the hashes of the chunks
/// [`chunks_within`] counts, range after range, each side cut at its own size.
///
/// The result covers every part of `ranges` not proven identical: a chunk is skipped only
/// when both sides hashed it whole to the same extent with the same hash. A part of a range
/// past the source's size is fetched too: the source's file shrank since the coarse round
/// (a live source), and the fetch says how it ends now; a part past both sides' ends is not.
/// A list of the wrong length makes the whole of `ranges` be fetched.
pub fn ranges_to_fetch_within(
    chunk: u64,
    ranges: &[ByteRange],
    source: &ChunkList,
    target: &ChunkList,
) -> Vec<ByteRange> {
    let counts_fit = |side: &ChunkList| {
        chunks_within(ranges, chunk, side.size) == Some(side.hashes.len() as u64)
    };
    if !counts_fit(source) || !counts_fit(target) {
        return ranges.iter().filter(|r| r.length > 0).copied().collect();
    }
    let mut sides = [(source, 0usize), (target, 0usize)];
    let mut out: Vec<ByteRange> = Vec::new();
    // Past both sides' ends there is nothing to compare or fetch (and a range may be
    // [`WHOLE_FILE`]).
    let last = source.size.max(target.size);
    for r in ranges {
        let end = r.offset.saturating_add(r.length).min(last);
        let mut start = r.offset;
        while start < end {
            let stop = start.saturating_add(chunk).min(end);
            // Each side's hash of this chunk, if it has one, and whether it covers the whole
            // chunk (a side whose file ends inside it hashed less).
            let [s, t] = sides.each_mut().map(|(side, next)| {
                (start < side.size).then(|| {
                    *next += 1;
                    (side.hashes[*next - 1], stop.min(side.size) == stop)
                })
            });
            let same = matches!((s, t), (Some((hs, true)), Some((ht, true))) if hs == ht);
            if !same {
                match out.last_mut() {
                    Some(o) if o.offset.saturating_add(o.length) == start => {
                        o.length += stop - start
                    }
                    _ => out.push(ByteRange {
                        offset: start,
                        length: stop - start,
                    }),
                }
            }
            start = stop;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(data: &[u8], cs: usize) -> Vec<[u8; 32]> {
        data.chunks(cs)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect()
    }

    fn diff(src: &[u8], tgt: &[u8], cs: usize) -> Vec<(u64, u64)> {
        let (hs, ht) = (hashes(src, cs), hashes(tgt, cs));
        ranges_to_fetch(
            cs as u64,
            &ChunkList {
                size: src.len() as u64,
                hashes: &hs,
            },
            &ChunkList {
                size: tgt.len() as u64,
                hashes: &ht,
            },
        )
        .iter()
        .map(|r| (r.offset, r.length))
        .collect()
    }

    /// Applying the fetched ranges to the target, cut or grown to the source's size, must give
    /// the source: the property that makes skipping safe.
    fn apply(src: &[u8], tgt: &[u8], cs: usize) -> Vec<u8> {
        let mut out = tgt.to_vec();
        out.resize(src.len(), 0xAA);
        for (o, l) in diff(src, tgt, cs) {
            let (o, l) = (o as usize, l as usize);
            out[o..o + l].copy_from_slice(&src[o..o + l]);
        }
        out
    }

    #[test]
    fn sha256_is_the_standard_function() {
        // FIPS 180-2's example "abc", as PostgreSQL's sha256('abc') gives it.
        let h = ChunkHash::Sha256.hash(b"abc");
        assert_eq!(
            h[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "sha256('abc') = ba7816bf…"
        );
        assert_eq!(h[28..], [0xf2, 0x00, 0x15, 0xad]);
        assert_eq!(
            ChunkHash::Blake3.hash(b"abc"),
            *blake3::hash(b"abc").as_bytes()
        );
        assert_eq!(ChunkHash::default(), ChunkHash::Blake3);
    }

    /// How fast the target hashes its chunks in each function, per core (run by hand:
    /// `cargo test -p failback-common --lib hash_speed -- --ignored --nocapture`); the
    /// hashing crates are built optimized even in test builds. Both the time the thread ran
    /// and the wall time are shown: on a loaded machine the first is the one to compare.
    #[test]
    #[ignore]
    fn hash_speed() {
        // This thread's CPU time in seconds, from /proc (utime + stime, in clock ticks of
        // 1/100 s on Linux).
        fn cpu() -> f64 {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
            let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
            let f: Vec<f64> = after
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0.0))
                .collect();
            (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
        }
        let data: Vec<u8> = (0..64u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for algorithm in [ChunkHash::Blake3, ChunkHash::Sha256] {
            for chunk in [8192, 65536] {
                let (t, c) = (std::time::Instant::now(), cpu());
                let mut x = 0u8;
                for _ in 0..4 {
                    for piece in data.chunks(chunk) {
                        x ^= algorithm.hash(piece)[0];
                    }
                }
                let (secs, cpu_secs) = (t.elapsed().as_secs_f64(), cpu() - c);
                let bytes = 4.0 * data.len() as f64;
                println!(
                    "{} in {chunk}-byte chunks: {:.2} GB/s of CPU time, {:.2} GB/s wall ({x})",
                    algorithm.name(),
                    bytes / cpu_secs.max(0.01) / 1e9,
                    bytes / secs / 1e9
                );
            }
        }
    }

    #[test]
    fn identical_files_fetch_nothing() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(diff(&a, &a, 1024), vec![]);
        assert_eq!(diff(&[], &[], 1024), vec![]);
    }

    #[test]
    fn changed_chunks_are_fetched_and_merged() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut b = a.clone();
        b[1500] ^= 1; // chunk 1
        b[2100] ^= 1; // chunk 2, adjacent: merged
        b[9000] ^= 1; // chunk 8
        assert_eq!(diff(&a, &b, 1024), vec![(1024, 2048), (8192, 1024)]);
        assert_eq!(apply(&a, &b, 1024), a);
    }

    #[test]
    fn size_changes_fetch_the_tail_and_the_partial_chunk() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // Target shorter, ending inside chunk 4: chunks 4.. differ in extent.
        assert_eq!(diff(&a, &a[..4500], 1024), vec![(4096, 10_000 - 4096)]);
        assert_eq!(apply(&a, &a[..4500], 1024), a);
        // Target longer: the source's last (short) chunk is compared at its own extent.
        let mut longer = a.clone();
        longer.extend_from_slice(&[7; 3000]);
        assert_eq!(diff(&a, &longer, 1024), vec![(9216, 10_000 - 9216)]);
        assert_eq!(apply(&a, &longer, 1024), a);
        // An empty target fetches everything, an empty source nothing.
        assert_eq!(diff(&a, &[], 1024), vec![(0, 10_000)]);
        assert_eq!(diff(&[], &a, 1024), vec![]);
    }

    #[test]
    fn inconsistent_hash_lists_fetch_the_whole_file() {
        let h = [[0u8; 32]; 3];
        let src = ChunkList {
            size: 5000,
            hashes: &h[..2],
        };
        let tgt = ChunkList {
            size: 5000,
            hashes: &h[..2],
        };
        // 5000 bytes in chunks of 1024 is 5 chunks, not 2.
        let whole = vec![ByteRange {
            offset: 0,
            length: 5000,
        }];
        assert_eq!(ranges_to_fetch(1024, &src, &tgt), whole);
        assert_eq!(ranges_to_fetch(0, &src, &tgt), whole);
        let src = ChunkList {
            size: u64::MAX,
            hashes: &h,
        };
        assert_eq!(ranges_to_fetch(u64::MAX / 2, &src, &tgt).len(), 1);
        // Huge sizes whose counts match do not overflow.
        let tgt = ChunkList {
            size: u64::MAX,
            hashes: &h,
        };
        assert_eq!(ranges_to_fetch(u64::MAX / 2, &src, &tgt), vec![]);
    }

    /// The hashes of `data`'s chunks within `ranges`, as [`chunks_within`] counts them.
    fn hashes_within(data: &[u8], ranges: &[ByteRange], cs: u64) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        for r in ranges {
            let end = (r.offset + r.length).min(data.len() as u64);
            let mut start = r.offset;
            while start < end {
                let stop = (start + cs).min(end);
                out.push(*blake3::hash(&data[start as usize..stop as usize]).as_bytes());
                start = stop;
            }
        }
        out
    }

    /// Two rounds as the client runs them: coarse chunks over the whole file, then fine ones
    /// within the coarse ranges that differ; applying what the second round fetches to the
    /// target must give the source.
    fn two_rounds(src: &[u8], tgt: &[u8], coarse: usize, fine: u64) -> (Vec<ByteRange>, Vec<u8>) {
        let (hs, ht) = (hashes(src, coarse), hashes(tgt, coarse));
        let list = |size: usize, hashes| ChunkList {
            size: size as u64,
            hashes,
        };
        let differ = ranges_to_fetch(coarse as u64, &list(src.len(), &hs), &list(tgt.len(), &ht));
        let (fs, ft) = (
            hashes_within(src, &differ, fine),
            hashes_within(tgt, &differ, fine),
        );
        assert_eq!(
            chunks_within(&differ, fine, src.len() as u64),
            Some(fs.len() as u64)
        );
        let fetch =
            ranges_to_fetch_within(fine, &differ, &list(src.len(), &fs), &list(tgt.len(), &ft));
        let mut out = tgt.to_vec();
        out.resize(src.len(), 0xAA);
        for r in &fetch {
            let (o, e) = (r.offset as usize, (r.offset + r.length) as usize);
            out[o..e].copy_from_slice(&src[o..e]);
        }
        (fetch, out)
    }

    #[test]
    fn a_second_round_fetches_only_the_fine_chunks_that_differ() {
        let src: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut tgt = src.clone();
        tgt[5000] ^= 1; // one fine chunk of the first coarse chunk
        tgt[17_000] ^= 1; // and one of the third
        let (fetch, out) = two_rounds(&src, &tgt, 8192, 1024);
        assert_eq!(out, src);
        assert_eq!(
            fetch,
            vec![
                ByteRange {
                    offset: 4096,
                    length: 1024
                },
                ByteRange {
                    offset: 16_384,
                    length: 1024
                },
            ]
        );
    }

    #[test]
    fn second_rounds_rebuild_the_source_whatever_the_sizes() {
        let base: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 241) as u8).collect();
        for (src_len, tgt_len, flips) in [
            (30_000, 30_000, vec![0usize, 29_999]),
            (30_000, 25_000, vec![100]),
            (25_000, 30_000, vec![24_999]),
            (30_000, 1_000, vec![]),
            (8_192, 30_000, vec![8_191]),
            (20_480, 20_480, (0..20_480).step_by(3000).collect()),
        ] {
            let src = base[..src_len].to_vec();
            let mut tgt = base[..tgt_len].to_vec();
            for f in flips {
                if let Some(b) = tgt.get_mut(f) {
                    *b ^= 0xFF;
                }
            }
            for (coarse, fine) in [(8192, 1024), (4096, 4096), (10_000, 3000)] {
                let (_, out) = two_rounds(&src, &tgt, coarse, fine);
                assert_eq!(out, src, "{src_len} {tgt_len} {coarse} {fine}");
            }
        }
    }

    #[test]
    fn second_rounds_fetch_what_a_shrunk_source_or_a_wrong_list_leaves_in_doubt() {
        let r = |offset, length| ByteRange { offset, length };
        let ranges = [r(0, 4096), r(8192, 4096)];
        let h = [[7u8; 32]; 8];
        let list = |size, n: usize| ChunkList {
            size,
            hashes: &h[..n],
        };
        // Identical on both sides: nothing.
        assert_eq!(
            ranges_to_fetch_within(1024, &ranges, &list(12_288, 8), &list(12_288, 8)),
            vec![]
        );
        // The source now ends inside the second range: its tail is fetched (the fetch will say
        // the file is shorter), the first range is not.
        assert_eq!(
            ranges_to_fetch_within(1024, &ranges, &list(9000, 5), &list(12_288, 8)),
            vec![r(8192, 4096)]
        );
        // A list of the wrong length: both ranges whole.
        assert_eq!(
            ranges_to_fetch_within(1024, &ranges, &list(12_288, 7), &list(12_288, 8)),
            ranges.to_vec()
        );
        // The whole file as one range ends at the longer side's end.
        let whole = ranges_to_fetch_within(1024, &[WHOLE_FILE], &list(3000, 3), &list(5000, 5));
        assert_eq!(whole, vec![r(2048, 2952)]);
        assert_eq!(chunks_within(&ranges, 0, 1), None);
        assert_eq!(
            chunks_within(&[r(u64::MAX - 1, 10)], 4096, u64::MAX),
            Some(1)
        );
    }
}
