//! Positions in the write-ahead log.
//!
//! PostgreSQL addresses WAL by a 64-bit byte position, the *log sequence number* (`XLogRecPtr`),
//! printed as two unpadded upper-case hex halves, `%X/%X` (`0/17414F8`). WAL is stored in
//! *segments* of `wal_segment_size` bytes (a power of two, 1 MiB–1 GiB); segment number `segno`
//! = lsn / size lives in a file named by timeline and segment number, `%08X%08X%08X` = (TLI,
//! segno / segments-per-4-GiB, segno % segments-per-4-GiB) (`access/xlog_internal.h`).

use std::fmt;
use std::str::FromStr;

/// A timeline id (`TimeLineID`). Timeline 1 is the one initdb creates; each promotion starts
/// a new one.
pub type TimeLineId = u32;

/// A WAL segment number (`XLogSegNo`): lsn / wal_segment_size.
pub type XLogSegNo = u64;

/// The smallest and largest `wal_segment_size` PostgreSQL accepts (`IsValidWalSegSize`).
pub const WAL_SEG_SIZE_MIN: u32 = 1 << 20;
pub const WAL_SEG_SIZE_MAX: u32 = 1 << 30;

/// Whether `size` is a valid `wal_segment_size`: a power of two from 1 MiB to 1 GiB.
pub fn is_valid_wal_seg_size(size: u32) -> bool {
    size.is_power_of_two() && (WAL_SEG_SIZE_MIN..=WAL_SEG_SIZE_MAX).contains(&size)
}

/// A log sequence number (`XLogRecPtr`), shown as PostgreSQL shows it: `X/X`.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`.
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// The segment holding the byte at this position (`XLByteToSeg`).
    pub fn segment_number(self, seg_size: u32) -> XLogSegNo {
        self.0 / u64::from(seg_size)
    }

    /// The segment a record *ending* here belongs to (`XLByteToPrevSeg`): a position exactly at a
    /// segment boundary belongs to the segment before it.
    pub fn prev_segment_number(self, seg_size: u32) -> XLogSegNo {
        self.0.saturating_sub(1) / u64::from(seg_size)
    }

    /// Offset of this position inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg_size: u32) -> u64 {
        self.0 & (u64::from(seg_size) - 1)
    }

    /// Offset of this position inside its WAL page.
    pub fn page_offset(self, page_size: u32) -> u64 {
        self.0 & (u64::from(page_size) - 1)
    }

    /// The start of the page holding this position.
    pub fn page_start(self, page_size: u32) -> Lsn {
        Lsn(self.0 & !(u64::from(page_size) - 1))
    }

    /// Rounded up to a multiple of 8 (`MAXALIGN`), where every WAL record starts.
    pub fn align(self) -> Lsn {
        Lsn(self.0.saturating_add(7) & !7)
    }

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }

    pub fn saturating_sub(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 as u32)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(v: Lsn) -> Self {
        v.0
    }
}

/// An `X/X` string that is not a log sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid LSN {0:?}: expected two hex numbers of at most 8 digits separated by '/', like 0/17414F8"
)]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(h, 16).ok()
        };
        let hi = half(hi).ok_or_else(err)?;
        let lo = half(lo).ok_or_else(err)?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Segments per 4 GiB of WAL (`XLogSegmentsPerXLogId`).
fn segments_per_xlog_id(seg_size: u32) -> u64 {
    0x1_0000_0000 / u64::from(seg_size)
}

/// The file name of a WAL segment (`XLogFileName`): 24 upper-case hex digits.
pub fn wal_file_name(tli: TimeLineId, segno: XLogSegNo, seg_size: u32) -> String {
    let per = segments_per_xlog_id(seg_size);
    format!("{:08X}{:08X}{:08X}", tli, segno / per, segno % per)
}

/// Parses a WAL segment file name back into (timeline, segment number) (`XLogFromFileName`).
/// Only the plain 24-hex-digit form is accepted; `.partial`, `.backup` and `.history` are not
/// segments.
pub fn parse_wal_file_name(name: &str, seg_size: u32) -> Option<(TimeLineId, XLogSegNo)> {
    let tli = wal_file_timeline(name)?;
    let log = u64::from(u32::from_str_radix(&name[8..16], 16).ok()?);
    let seg = u64::from(u32::from_str_radix(&name[16..24], 16).ok()?);
    let per = segments_per_xlog_id(seg_size);
    if seg >= per {
        return None;
    }
    Some((tli, log * per + seg))
}

/// The timeline of a WAL segment file name: its first eight of 24 hex digits (timeline 0 is
/// none).
pub fn wal_file_timeline(name: &str) -> Option<TimeLineId> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(&name[0..8], 16)
        .ok()
        .filter(|tli| *tli != 0)
}

/// The name of a timeline history file (`TLHistoryFileName`).
pub fn history_file_name(tli: TimeLineId) -> String {
    format!("{tli:08X}.history")
}

/// The position of the first byte of segment `segno` (`XLogSegNoOffsetToRecPtr`).
pub fn segment_start(segno: XLogSegNo, seg_size: u32) -> Lsn {
    Lsn(segno.saturating_mul(u64::from(seg_size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timelines_of_wal_file_names() {
        assert_eq!(wal_file_timeline("000000020000000000000003"), Some(2));
        assert_eq!(wal_file_timeline("0000001A00000001000000FF"), Some(26));
        assert_eq!(wal_file_timeline("000000000000000000000003"), None);
        assert_eq!(wal_file_timeline("00000002000000000000003"), None);
        assert_eq!(wal_file_timeline("00000002.history"), None);
        assert_eq!(wal_file_timeline(""), None);
        assert_eq!(wal_file_timeline("é0000002000000000000003"), None);
    }

    #[test]
    fn display_and_parse_round_trip() {
        for v in [0u64, 1, 0x17414F8, 0x1_0000_0000, u64::MAX] {
            let l = Lsn(v);
            assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
        }
        assert_eq!(Lsn(0x17414F8).to_string(), "0/17414F8");
        assert_eq!(Lsn(0x2_0000_00A0).to_string(), "2/A0");
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in ["", "/", "0/", "/0", "0/123456789", "x/1", "1-2", "0/1/2"] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn file_names() {
        let seg = 16 << 20;
        let segno = Lsn(0x17414F8).segment_number(seg);
        assert_eq!(wal_file_name(1, segno, seg), "000000010000000000000001");
        assert_eq!(
            parse_wal_file_name("000000010000000000000001", seg),
            Some((1, 1))
        );
        let segno = Lsn(0x1_2300_0000).segment_number(seg);
        let name = wal_file_name(3, segno, seg);
        assert_eq!(name, "000000030000000100000023");
        assert_eq!(parse_wal_file_name(&name, seg), Some((3, segno)));
        // 1 GiB segments: 4 per xlog id; a segment part of 4 cannot exist.
        assert_eq!(
            parse_wal_file_name("000000010000000000000004", 1 << 30),
            None
        );
        assert_eq!(history_file_name(10), "0000000A.history");
    }

    #[test]
    fn boundaries() {
        let seg = 1 << 20;
        assert_eq!(Lsn(2 << 20).prev_segment_number(seg), 1);
        assert_eq!(Lsn(2 << 20).segment_number(seg), 2);
        assert_eq!(Lsn(13).align(), Lsn(16));
        assert!(is_valid_wal_seg_size(16 << 20));
        assert!(!is_valid_wal_seg_size(3 << 20));
        assert!(!is_valid_wal_seg_size(1 << 31));
    }
}
