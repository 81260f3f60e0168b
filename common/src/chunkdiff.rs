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
}
