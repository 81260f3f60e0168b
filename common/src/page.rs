//! Data page checksums, as PostgreSQL computes them (`src/include/storage/checksum_impl.h`) and
//! `pg_checksums --check` verifies them (`src/bin/pg_checksums/pg_checksums.c`).
//!
//! With data checksums on (`initdb -k`), every page of every relation fork carries a 16-bit
//! checksum in its header (`pd_checksum`, bytes 8..10 of `PageHeaderData`), set when the page
//! is written out and checked when it is read in. The checksum covers the whole page with
//! `pd_checksum` taken as zero, and the page's block number within its fork (not within its
//! segment file), so a page written at the wrong place fails too. A page never initialised
//! (`PageIsNew`: `pd_upper` is zero) has no checksum.
//!
//! The algorithm is FNV-1a-like: the page is read as rows of 32 native-endian 32-bit words;
//! 32 running sums, each started from its own base offset, fold in one column each
//! (`sum = (sum ^ w) * FNV_PRIME ^ ((sum ^ w) >> 17)`), then two rounds of zeroes; the sums
//! are xor-folded, xor'd with the block number, and reduced to `sum % 65535 + 1` (modulo
//! 2^16 - 1, as every release 13–18 does), so no page ever carries a checksum of zero. The
//! 32-way parallelism is part of the algorithm.

/// Number of sums computed side by side (`N_SUMS`).
const N_SUMS: usize = 32;
/// FNV-1a's 32-bit prime (`FNV_PRIME`).
const FNV_PRIME: u32 = 16_777_619;
/// Each sum's starting value (`checksumBaseOffsets`).
const CHECKSUM_BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// Where `pd_checksum` lies in the page header (after the 8-byte `pd_lsn`).
const PD_CHECKSUM: usize = 8;
/// Where `pd_upper` lies (after `pd_checksum`, `pd_flags` and `pd_lower`).
const PD_UPPER: usize = 14;

/// One round of the sum (`CHECKSUM_COMP`).
#[inline(always)]
fn comp(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// Whether the page was never initialised (`PageIsNew`): such pages carry no checksum.
#[allow(non_snake_case)]
pub fn PageIsNew(page: &[u8]) -> bool {
    page.len() > PD_UPPER + 1 && u16::from_le_bytes([page[PD_UPPER], page[PD_UPPER + 1]]) == 0
}

/// The checksum the page's header carries.
pub fn pd_checksum(page: &[u8]) -> u16 {
    u16::from_le_bytes([page[PD_CHECKSUM], page[PD_CHECKSUM + 1]])
}

/// `pg_checksum_page`: the checksum of a page that is block `blkno` of its fork. `page` is a
/// whole page (`BLCKSZ` bytes, a multiple of 128); its own `pd_checksum` is taken as zero.
pub fn pg_checksum_page(page: &[u8], blkno: u32) -> u16 {
    assert!(
        page.len() >= 128 && page.len().is_multiple_of(4 * N_SUMS),
        "a page is a multiple of 128 bytes"
    );
    let mut sums = CHECKSUM_BASE_OFFSETS;
    for (r, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, word) in row.chunks_exact(4).enumerate() {
            let mut w = u32::from_ne_bytes(word.try_into().expect("four bytes"));
            // pd_checksum is the low half (on little-endian machines) of the third word.
            if r == 0 && j == PD_CHECKSUM / 4 {
                w &= if cfg!(target_endian = "little") {
                    0xFFFF_0000
                } else {
                    0x0000_FFFF
                };
            }
            sums[j] = comp(sums[j], w);
        }
    }
    for _ in 0..2 {
        for s in sums.iter_mut() {
            *s = comp(*s, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    ((folded % 65535) + 1) as u16
}

/// What one page says of itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageCheck {
    /// Never initialised: nothing to check.
    New,
    /// Its checksum matches.
    Valid,
    /// Its checksum does not match: the page is damaged (or was written at another place).
    Mismatch { stored: u16, computed: u16 },
}

/// Checks one page that is block `blkno` of its fork, as `pg_checksums --check` does.
pub fn check_page(page: &[u8], blkno: u32) -> PageCheck {
    if PageIsNew(page) {
        return PageCheck::New;
    }
    let (stored, computed) = (pd_checksum(page), pg_checksum_page(page, blkno));
    if stored == computed {
        PageCheck::Valid
    } else {
        PageCheck::Mismatch { stored, computed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page with a header whose `pd_upper` is set and some contents, its checksum written.
    fn page(seed: u8, blkno: u32) -> Vec<u8> {
        let mut p: Vec<u8> = (0..8192u32)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(i as u8 >> 3))
            .collect();
        p[PD_UPPER..PD_UPPER + 2].copy_from_slice(&4000u16.to_le_bytes());
        let c = pg_checksum_page(&p, blkno);
        p[PD_CHECKSUM..PD_CHECKSUM + 2].copy_from_slice(&c.to_le_bytes());
        p
    }

    #[test]
    fn a_page_checks_at_its_own_block_only() {
        let p = page(7, 42);
        assert_eq!(check_page(&p, 42), PageCheck::Valid);
        assert!(matches!(check_page(&p, 43), PageCheck::Mismatch { .. }));
    }

    #[test]
    fn the_stored_checksum_does_not_feed_the_sum() {
        let mut p = page(3, 0);
        let want = pg_checksum_page(&p, 0);
        p[PD_CHECKSUM..PD_CHECKSUM + 2].copy_from_slice(&[0xAB, 0xCD]);
        assert_eq!(pg_checksum_page(&p, 0), want);
    }

    #[test]
    fn any_flipped_bit_outside_the_checksum_is_caught() {
        let p = page(11, 9);
        for byte in [0usize, 7, 10, 14, 100, 4096, 8191] {
            for bit in [0u8, 5] {
                let mut q = p.clone();
                q[byte] ^= 1 << bit;
                if PageIsNew(&q) {
                    continue;
                }
                assert!(
                    matches!(check_page(&q, 9), PageCheck::Mismatch { .. }),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn new_pages_and_checksums_of_zero() {
        assert_eq!(check_page(&[0u8; 8192], 5), PageCheck::New);
        // The result is offset by one: never zero.
        for seed in 0..64u8 {
            assert_ne!(pg_checksum_page(&page(seed, 1), u32::from(seed)), 0);
        }
    }
}
