//! WAL page headers (`XLogPageHeaderData`, `XLogLongPageHeaderData`, `access/xlog_internal.h`).
//!
//! WAL is written in pages of `XLOG_BLCKSZ` bytes (8192 unless PostgreSQL was built otherwise).
//! Every page starts with a header: 24 bytes normally, 40 on the first page of each segment,
//! whose long form repeats the system identifier, segment size and page size so that a segment
//! file can be recognised on its own.
//!
//! ```text
//! off  size  field
//!   0     2  xlp_magic        XLOG_PAGE_MAGIC, bumped whenever the WAL format changes
//!   2     2  xlp_info         XLP_* flags below
//!   4     4  xlp_tli          timeline of the first record on the page
//!   8     8  xlp_pageaddr     the page's own LSN (a recycled segment still carries old ones)
//!  16     4  xlp_rem_len      bytes of a record continued from the previous page
//!  20     4  (padding)        -> SizeOfXLogShortPHD = 24
//!  24     8  xlp_sysid        long header only
//!  32     4  xlp_seg_size
//!  36     4  xlp_xlog_blcksz  -> SizeOfXLogLongPHD = 40
//! ```
//!
//! `XLP_FIRST_IS_OVERWRITE_CONTRECORD` appeared in 14 and was back-patched to 13.5 without a
//! magic change, so the set of valid flags is the same (0x000F) for every supported version.

use crate::Lsn;

/// `SizeOfXLogShortPHD`.
pub const SIZE_OF_XLOG_SHORT_PHD: usize = 24;
/// `SizeOfXLogLongPHD`.
pub const SIZE_OF_XLOG_LONG_PHD: usize = 40;

/// The first record on the page continues one from the previous page.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// This page has the long header (first page of a segment).
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Backup blocks on this page may be removed (archive compression tools; unused since 9.5).
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// A record continued onto this page was abandoned; the page starts a new record instead.
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// `XLP_ALL_FLAGS`.
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// The default `XLOG_BLCKSZ` (and `BLCKSZ`).
pub const DEFAULT_XLOG_BLCKSZ: u32 = 8192;

/// A decoded page header. `long` is present when `xlp_info` has `XLP_LONG_HEADER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XLogPageHeader {
    pub xlp_magic: u16,
    pub xlp_info: u16,
    pub xlp_tli: u32,
    pub xlp_pageaddr: Lsn,
    pub xlp_rem_len: u32,
    pub long: Option<XLogLongPageHeader>,
}

/// The fields only the long header has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XLogLongPageHeader {
    pub xlp_sysid: u64,
    pub xlp_seg_size: u32,
    pub xlp_xlog_blcksz: u32,
}

impl XLogPageHeader {
    /// Size of the header a page with these flags has (`XLogPageHeaderSize`).
    pub fn size_for_info(xlp_info: u16) -> usize {
        if xlp_info & XLP_LONG_HEADER != 0 {
            SIZE_OF_XLOG_LONG_PHD
        } else {
            SIZE_OF_XLOG_SHORT_PHD
        }
    }

    /// This header's size in bytes: 24 or 40.
    pub fn size(&self) -> usize {
        Self::size_for_info(self.xlp_info)
    }

    /// Parses the header at the start of `page`. `None` when fewer bytes than the header needs
    /// (24, or 40 once the flags say long) are given.
    pub fn parse(page: &[u8]) -> Option<XLogPageHeader> {
        let short = page.get(..SIZE_OF_XLOG_SHORT_PHD)?;
        let xlp_info = le_u16(short, 2);
        let long = if xlp_info & XLP_LONG_HEADER != 0 {
            let l = page.get(SIZE_OF_XLOG_SHORT_PHD..SIZE_OF_XLOG_LONG_PHD)?;
            Some(XLogLongPageHeader {
                xlp_sysid: le_u64(l, 0),
                xlp_seg_size: le_u32(l, 8),
                xlp_xlog_blcksz: le_u32(l, 12),
            })
        } else {
            None
        };
        Some(XLogPageHeader {
            xlp_magic: le_u16(short, 0),
            xlp_info,
            xlp_tli: le_u32(short, 4),
            xlp_pageaddr: Lsn(le_u64(short, 8)),
            xlp_rem_len: le_u32(short, 16),
            long,
        })
    }

    pub fn is_contrecord(&self) -> bool {
        self.xlp_info & XLP_FIRST_IS_CONTRECORD != 0
    }

    pub fn is_overwrite_contrecord(&self) -> bool {
        self.xlp_info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0
    }
}

/// The PostgreSQL major version whose `XLOG_PAGE_MAGIC` starts this page, if any supported one
/// does. Any page of a segment works; `page` needs at least 2 bytes.
pub fn identify_major(page: &[u8]) -> Option<crate::PgMajor> {
    let b = page.get(..2)?;
    crate::PgMajor::from_xlog_page_magic(u16::from_le_bytes([b[0], b[1]]))
}

// Little-endian readers over slices whose length the caller has already checked; they fall back
// to zero rather than panic if that promise is ever broken.
pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    match b
        .get(off..off + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
    {
        Some(a) => u32::from_le_bytes(a),
        None => 0,
    }
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    match b
        .get(off..off + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
    {
        Some(a) => u64::from_le_bytes(a),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_pg15_long_header_from_the_reference() {
        // 10d1 0200 01000000 00000001 00000000 00000000 00000000 <sysid> 00000001 00200000
        let mut b = vec![
            0x10, 0xd1, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0,
        ];
        b.extend_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
        b.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        b.extend_from_slice(&0x2000u32.to_le_bytes());
        let h = XLogPageHeader::parse(&b).unwrap();
        assert_eq!(h.xlp_magic, 0xD110);
        assert_eq!(h.xlp_tli, 1);
        assert_eq!(h.xlp_pageaddr, Lsn(0x0100_0000));
        assert_eq!(h.size(), 40);
        assert_eq!(h.long.unwrap().xlp_seg_size, 16 << 20);
        assert_eq!(h.long.unwrap().xlp_xlog_blcksz, 8192);
        assert_eq!(identify_major(&b), Some(crate::PgMajor::V15));
        // A long header cut short is not a header.
        assert_eq!(XLogPageHeader::parse(&b[..30]), None);
        assert_eq!(XLogPageHeader::parse(&b[..23]), None);
    }
}
