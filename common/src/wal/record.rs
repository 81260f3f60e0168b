//! WAL record layout (`access/xlogrecord.h`) and body decoding (`xlogreader.c`
//! `DecodeXLogRecord`).
//!
//! A record is a 24-byte header, then a run of fragment headers, then their payloads:
//!
//! ```text
//! XLogRecord (24)            xl_tot_len u32, xl_xid u32, xl_prev u64, xl_info u8, xl_rmid u8,
//!                            2 pad, xl_crc u32
//! XLogRecordBlockHeader*     id 0..=32 (strictly increasing), fork_flags u8, data_length u16,
//!   [XLogRecordBlockImageHeader]   if BKPBLOCK_HAS_IMAGE: length u16, hole_offset u16,
//!                                  bimg_info u8, [hole_length u16 if compressed with a hole]
//!   [RelFileLocator (12)]          unless BKPBLOCK_SAME_REL
//!   BlockNumber u32
//! [ORIGIN 253 u16] [TOPLEVEL_XID 252 u32 (14+)]
//! [DATA_SHORT 255 u8 len | DATA_LONG 254 u32 len]   the main data header, always last
//! payload: for each block in order its image then its data, then the main data
//! ```
//!
//! The header run ends when the bytes left equal the payload lengths announced so far; if the
//! two do not meet exactly the record is "with invalid length". The CRC-32C covers the bytes
//! after the header first, then the header up to `xl_crc`.
//!
//! The image header's `bimg_info` changed in 15, when LZ4 and zstd joined pglz:
//! 13/14 have HAS_HOLE 0x01, IS_COMPRESSED 0x02 (pglz), APPLY 0x04; 15+ have HAS_HOLE 0x01,
//! APPLY 0x02, COMPRESS_PGLZ 0x04, COMPRESS_LZ4 0x08, COMPRESS_ZSTD 0x10.

use std::ops::Range;

use super::error::WalError;
use super::page::{le_u16, le_u32, le_u64};
use crate::{Lsn, PgMajor};

/// `SizeOfXLogRecord`.
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// Offset of `xl_crc`: the CRC covers the header up to here.
pub const XL_CRC_OFFSET: usize = 20;
/// `XLogRecordMaxSize` (16+; applied to every version here): 1020 MiB.
pub const XLOG_RECORD_MAX_SIZE: u32 = 1020 * 1024 * 1024;

/// The low nibble of `xl_info` is for the WAL machinery, the high nibble for the rmgr.
pub const XLR_INFO_MASK: u8 = 0x0F;
pub const XLR_RMGR_INFO_MASK: u8 = 0xF0;
/// The record changes relation files in a way its block references do not describe.
pub const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;
/// Full-page images were added for `wal_consistency_checking`.
pub const XLR_CHECK_CONSISTENCY: u8 = 0x02;

pub const XLR_MAX_BLOCK_ID: u8 = 32;
pub const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
pub const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
pub const XLR_BLOCK_ID_ORIGIN: u8 = 253;
/// 14+.
pub const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

pub const BKPBLOCK_FORK_MASK: u8 = 0x0F;
pub const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
pub const BKPBLOCK_HAS_DATA: u8 = 0x20;
pub const BKPBLOCK_WILL_INIT: u8 = 0x40;
pub const BKPBLOCK_SAME_REL: u8 = 0x80;

pub const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// 13/14.
pub const BKPIMAGE_IS_COMPRESSED_V13: u8 = 0x02;
/// 13/14.
pub const BKPIMAGE_APPLY_V13: u8 = 0x04;
/// 15+.
pub const BKPIMAGE_APPLY: u8 = 0x02;
/// 15+.
pub const BKPIMAGE_COMPRESS_PGLZ: u8 = 0x04;
/// 15+.
pub const BKPIMAGE_COMPRESS_LZ4: u8 = 0x08;
/// 15+.
pub const BKPIMAGE_COMPRESS_ZSTD: u8 = 0x10;

/// `ForkNumber` values.
pub const MAIN_FORKNUM: u8 = 0;
pub const FSM_FORKNUM: u8 = 1;
pub const VISIBILITYMAP_FORKNUM: u8 = 2;
pub const INIT_FORKNUM: u8 = 3;

/// The fork's name as PostgreSQL spells it (`forkNames`), or `None` for a number that is not a
/// fork.
pub fn fork_name(fork: u8) -> Option<&'static str> {
    match fork {
        MAIN_FORKNUM => Some("main"),
        FSM_FORKNUM => Some("fsm"),
        VISIBILITYMAP_FORKNUM => Some("vm"),
        INIT_FORKNUM => Some("init"),
        _ => None,
    }
}

/// The fixed record header (`XLogRecord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XLogRecordHeader {
    /// Length of the whole record, this header included.
    pub xl_tot_len: u32,
    pub xl_xid: u32,
    /// Start of the previous record.
    pub xl_prev: Lsn,
    pub xl_info: u8,
    pub xl_rmid: u8,
    pub xl_crc: u32,
}

impl XLogRecordHeader {
    /// Reads the header from the first 24 bytes of `b` (`None` if shorter).
    pub fn parse(b: &[u8]) -> Option<XLogRecordHeader> {
        let h = b.get(..SIZE_OF_XLOG_RECORD)?;
        Some(XLogRecordHeader {
            xl_tot_len: le_u32(h, 0),
            xl_xid: le_u32(h, 4),
            xl_prev: Lsn(le_u64(h, 8)),
            xl_info: h[16],
            xl_rmid: h[17],
            xl_crc: le_u32(h, 20),
        })
    }
}

/// CRC-32C of a whole record as PostgreSQL computes it: the bytes after the header, then the
/// header up to `xl_crc`. `rec` must be the whole record (`xl_tot_len` bytes).
pub fn record_crc(rec: &[u8]) -> u32 {
    let body = rec.get(SIZE_OF_XLOG_RECORD..).unwrap_or(&[]);
    let head = rec.get(..XL_CRC_OFFSET).unwrap_or(rec);
    super::crc::crc32c_append(super::crc::crc32c(body), head)
}

/// A relation's identity on disk, as block references and drop records carry it.
pub use crate::relpath::RelFileLocator;

/// How a full-page image is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageCompression {
    None,
    Pglz,
    Lz4,
    Zstd,
}

impl ImageCompression {
    /// The name pg_waldump prints (`method:`).
    pub fn name(self) -> &'static str {
        match self {
            ImageCompression::None => "none",
            ImageCompression::Pglz => "pglz",
            ImageCompression::Lz4 => "lz4",
            ImageCompression::Zstd => "zstd",
        }
    }
}

/// A full-page image attached to a block reference (`XLogRecordBlockImageHeader` plus where its
/// bytes are). The image is stored without its hole (the unused middle of the page), and possibly
/// compressed; restoring it means decompressing `length` bytes at `offset` of the record into
/// `BLCKSZ - hole_length` bytes and re-inserting `hole_length` zero bytes at `hole_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockImage {
    /// `bimg_len`: bytes stored in the record.
    pub length: u16,
    pub hole_offset: u16,
    pub hole_length: u16,
    /// The raw `bimg_info` byte (its bits differ between 13/14 and 15+).
    pub bimg_info: u8,
    pub compression: ImageCompression,
    /// Whether redo restores this image (`BKPIMAGE_APPLY`); images taken only for
    /// `wal_consistency_checking` are not applied.
    pub apply: bool,
    /// Offset of the stored image bytes within the record's `raw` bytes, or
    /// [`IMAGE_BYTES_LEFT_OUT`] when the decoder was asked to leave image bytes out and did (see
    /// [`crate::wal::WalDecoder::leave_out_image_bytes`]).
    pub offset: u32,
}

/// [`BlockImage::offset`] of an image whose bytes the decoder checked but did not keep.
pub const IMAGE_BYTES_LEFT_OUT: u32 = u32::MAX;

impl BlockImage {
    pub fn has_hole(&self) -> bool {
        self.bimg_info & BKPIMAGE_HAS_HOLE != 0
    }
}

/// A block reference (`DecodedBkpBlock`): which page of which relation fork the record
/// touches, and what it carries for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    /// The block id (0..=32), unique and increasing within a record.
    pub id: u8,
    /// The raw `fork_flags` byte: fork number in the low nibble, `BKPBLOCK_*` flags above.
    pub fork_flags: u8,
    pub locator: RelFileLocator,
    pub blkno: u32,
    /// Length of the block's data (0 if none).
    pub data_len: u16,
    /// Offset of that data within the record.
    pub data_offset: u32,
    pub image: Option<BlockImage>,
}

impl BlockRef {
    /// The fork number (`ForkNumber`: 0 main, 1 fsm, 2 vm, 3 init).
    pub fn fork(&self) -> u8 {
        self.fork_flags & BKPBLOCK_FORK_MASK
    }
    pub fn has_image(&self) -> bool {
        self.fork_flags & BKPBLOCK_HAS_IMAGE != 0
    }
    pub fn has_data(&self) -> bool {
        self.fork_flags & BKPBLOCK_HAS_DATA != 0
    }
    /// Redo initialises the page from scratch rather than reading it.
    pub fn will_init(&self) -> bool {
        self.fork_flags & BKPBLOCK_WILL_INIT != 0
    }
    /// The header used the same-relation shorthand (the locator is the previous block's).
    pub fn same_rel(&self) -> bool {
        self.fork_flags & BKPBLOCK_SAME_REL != 0
    }
}

/// What `decode_body` found besides the block references.
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyInfo {
    pub main_data: Range<u32>,
    pub origin: Option<u16>,
    pub toplevel_xid: Option<u32>,
}

/// `DecodeXLogRecord`: parses the fragment headers of `rec` (a whole record of `tot_len` bytes,
/// `xl_tot_len`, whose header was already validated and whose CRC matched) into `blocks` and
/// the main data range. Every check PostgreSQL makes is made here, with every length computed
/// without overflow.
///
/// `rec` is either the whole record, or the record with the stored bytes of its full-page
/// images left out (what [`image_ranges`] named, taken out): then every image's offset is
/// [`IMAGE_BYTES_LEFT_OUT`] and the other payloads' offsets index the shortened bytes.
// Inlined, with the two halves below, into the decoder's step: returned through memory, the
// results were read back before they were written out (a stall per record), and the three
// calls took 5 % of a rewind's scan.
#[inline(always)]
pub(crate) fn decode_body(
    rec: &[u8],
    tot_len: usize,
    lsn: Lsn,
    major: PgMajor,
    blcksz: u32,
    blocks: &mut Vec<BlockRef>,
) -> Result<BodyInfo, WalError> {
    let headers = decode_headers(rec, tot_len, lsn, major, blcksz, blocks)?;
    lay_out(headers, rec.len(), tot_len, lsn, blocks)
}

/// What the fragment headers of a record say besides its block references.
#[derive(Debug, Clone, Default)]
pub(crate) struct Headers {
    info: BodyInfo,
    /// Where the payloads begin.
    pos: usize,
    main_len: u32,
}

/// The second half of [`decode_body`]: where each payload of the record lies in its `rec_len`
/// bytes (`tot_len` when whole), once its fragment headers were decoded into `blocks`.
#[inline(always)]
pub(crate) fn lay_out(
    headers: Headers,
    rec_len: usize,
    tot_len: usize,
    lsn: Lsn,
    blocks: &mut [BlockRef],
) -> Result<BodyInfo, WalError> {
    let Headers {
        mut info,
        pos,
        main_len,
    } = headers;
    let left_out = rec_len < tot_len;
    // Payloads follow in header order; their total was checked to be exactly what is left
    // after the headers, so every offset below stays within the record (and within u32:
    // xl_tot_len is one).
    let mut off = pos as u32;
    let mut images = 0usize;
    for b in blocks.iter_mut() {
        if let Some(img) = b.image.as_mut() {
            if left_out {
                img.offset = IMAGE_BYTES_LEFT_OUT;
                images += usize::from(img.length);
            } else {
                img.offset = off;
                off += u32::from(img.length);
            }
        }
        b.data_offset = off;
        off += u32::from(b.data_len);
    }
    if left_out && rec_len != tot_len - images {
        return Err(WalError::InvalidLength { lsn });
    }
    info.main_data = off..off + main_len;
    Ok(info)
}

/// Where the stored bytes of each full-page image lie in a record (offsets from its start), in
/// order, as the fragment headers in `prefix` say: `None` until `prefix`, the first bytes of a
/// record of `tot_len` bytes, holds all its fragment headers, or when they are not valid. The
/// headers are decoded into `blocks` and returned, for [`lay_out`] once the record is whole
/// and its CRC matched.
pub(crate) fn image_ranges(
    prefix: &[u8],
    tot_len: usize,
    major: PgMajor,
    blcksz: u32,
    blocks: &mut Vec<BlockRef>,
    ranges: &mut Vec<Range<u32>>,
) -> Option<Headers> {
    let headers = decode_headers(prefix, tot_len, Lsn(0), major, blcksz, blocks).ok()?;
    // Where the payloads lie in the whole record.
    lay_out(headers.clone(), tot_len, tot_len, Lsn(0), blocks).ok()?;
    ranges.clear();
    ranges.extend(
        blocks
            .iter()
            .filter_map(|b| b.image)
            .map(|i| i.offset..i.offset + u32::from(i.length)),
    );
    Some(headers)
}

/// The fragment headers of a record of `tot_len` bytes whose first bytes are `rec`: the block
/// references, what else the headers say, where the payloads begin and the main data's length.
#[inline(always)]
fn decode_headers(
    rec: &[u8],
    tot_len: usize,
    lsn: Lsn,
    major: PgMajor,
    blcksz: u32,
    blocks: &mut Vec<BlockRef>,
) -> Result<Headers, WalError> {
    blocks.clear();
    let mut info = BodyInfo::default();
    let short = || WalError::InvalidLength { lsn };
    if tot_len < SIZE_OF_XLOG_RECORD || tot_len > XLOG_RECORD_MAX_SIZE as usize {
        return Err(short());
    }
    let mut pos = SIZE_OF_XLOG_RECORD;
    // Bytes after `pos`; header fields are taken from them until what is left equals the
    // payload announced by the headers read so far.
    let mut datatotal: u64 = 0;
    let mut main_len: u64 = 0;
    let mut max_block_id: i32 = -1;
    let mut prev_locator: Option<RelFileLocator> = None;
    let v15 = major >= PgMajor::V15;

    while ((tot_len - pos) as u64) > datatotal {
        let block_id = *rec.get(pos).ok_or_else(short)?;
        pos += 1;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                let b = rec.get(pos..pos + 1).ok_or_else(short)?;
                main_len = u64::from(b[0]);
                pos += 1;
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                let b = rec.get(pos..pos + 4).ok_or_else(short)?;
                main_len = u64::from(le_u32(b, 0));
                pos += 4;
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                let b = rec.get(pos..pos + 2).ok_or_else(short)?;
                info.origin = Some(le_u16(b, 0));
                pos += 2;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID if major >= PgMajor::V14 => {
                let b = rec.get(pos..pos + 4).ok_or_else(short)?;
                info.toplevel_xid = Some(le_u32(b, 0));
                pos += 4;
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                if i32::from(id) <= max_block_id {
                    return Err(WalError::OutOfOrderBlockId { lsn, block_id: id });
                }
                max_block_id = i32::from(id);
                let b = rec.get(pos..pos + 3).ok_or_else(short)?;
                let fork_flags = b[0];
                let data_len = le_u16(b, 1);
                pos += 3;
                let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
                if has_data && data_len == 0 {
                    return Err(WalError::HasDataWithoutData { lsn });
                }
                if !has_data && data_len != 0 {
                    return Err(WalError::DataWithoutHasData { lsn, len: data_len });
                }
                datatotal += u64::from(data_len);

                let image = if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let b = rec.get(pos..pos + 5).ok_or_else(short)?;
                    let length = le_u16(b, 0);
                    let hole_offset = le_u16(b, 2);
                    let bimg_info = b[4];
                    pos += 5;
                    let (compression, apply) = if v15 {
                        let c = if bimg_info & BKPIMAGE_COMPRESS_PGLZ != 0 {
                            ImageCompression::Pglz
                        } else if bimg_info & BKPIMAGE_COMPRESS_LZ4 != 0 {
                            ImageCompression::Lz4
                        } else if bimg_info & BKPIMAGE_COMPRESS_ZSTD != 0 {
                            ImageCompression::Zstd
                        } else {
                            ImageCompression::None
                        };
                        (c, bimg_info & BKPIMAGE_APPLY != 0)
                    } else {
                        let c = if bimg_info & BKPIMAGE_IS_COMPRESSED_V13 != 0 {
                            ImageCompression::Pglz
                        } else {
                            ImageCompression::None
                        };
                        (c, bimg_info & BKPIMAGE_APPLY_V13 != 0)
                    };
                    let compressed = compression != ImageCompression::None;
                    let has_hole = bimg_info & BKPIMAGE_HAS_HOLE != 0;
                    let hole_length = if compressed {
                        if has_hole {
                            let b = rec.get(pos..pos + 2).ok_or_else(short)?;
                            pos += 2;
                            le_u16(b, 0)
                        } else {
                            0
                        }
                    } else {
                        // An uncompressed image is the page minus its hole. PostgreSQL lets
                        // this wrap in a uint16 when length > BLCKSZ; such an image is refused
                        // below in every case, so saturating changes no verdict.
                        u16::try_from(blcksz.saturating_sub(u32::from(length))).unwrap_or(0)
                    };
                    datatotal += u64::from(length);

                    let full = u32::from(length) == blcksz;
                    if has_hole && (hole_offset == 0 || hole_length == 0 || full) {
                        return Err(WalError::ImageHoleInvalid {
                            lsn,
                            hole_offset,
                            hole_length,
                            bimg_len: length,
                        });
                    }
                    if !has_hole && (hole_offset != 0 || hole_length != 0) {
                        return Err(WalError::ImageNoHoleInvalid {
                            lsn,
                            hole_offset,
                            hole_length,
                        });
                    }
                    if compressed && full {
                        return Err(WalError::ImageCompressedFullLength {
                            lsn,
                            bimg_len: length,
                        });
                    }
                    if !has_hole && !compressed && !full {
                        return Err(WalError::ImageWrongLength {
                            lsn,
                            bimg_len: length,
                        });
                    }
                    // Stricter than PostgreSQL, which would wrap: an image can never be larger
                    // than a page, and a hole never reaches past its end.
                    if u32::from(length) > blcksz
                        || u32::from(hole_offset) + u32::from(hole_length) > blcksz
                    {
                        return Err(WalError::ImageHoleInvalid {
                            lsn,
                            hole_offset,
                            hole_length,
                            bimg_len: length,
                        });
                    }
                    Some(BlockImage {
                        length,
                        hole_offset,
                        hole_length,
                        bimg_info,
                        compression,
                        apply,
                        offset: 0,
                    })
                } else {
                    None
                };

                let locator = if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    let l = rec
                        .get(pos..pos + 12)
                        .and_then(RelFileLocator::parse)
                        .ok_or_else(short)?;
                    pos += 12;
                    prev_locator = Some(l);
                    l
                } else {
                    prev_locator.ok_or(WalError::SameRelWithoutPrevious { lsn })?
                };
                let b = rec.get(pos..pos + 4).ok_or_else(short)?;
                let blkno = le_u32(b, 0);
                pos += 4;
                blocks.push(BlockRef {
                    id,
                    fork_flags,
                    locator,
                    blkno,
                    data_len,
                    data_offset: 0,
                    image,
                });
            }
            id => return Err(WalError::InvalidBlockId { lsn, block_id: id }),
        }
    }
    if ((tot_len - pos) as u64) != datatotal {
        return Err(short());
    }
    // main_len <= datatotal == tot_len - pos, which fits u32.
    Ok(Headers {
        info,
        pos,
        main_len: main_len as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a record from a header's fields and the bytes after it, with a correct CRC.
    fn record(info: u8, rmid: u8, after: &[u8]) -> Vec<u8> {
        let tot = (SIZE_OF_XLOG_RECORD + after.len()) as u32;
        let mut r = Vec::new();
        r.extend_from_slice(&tot.to_le_bytes());
        r.extend_from_slice(&7u32.to_le_bytes());
        r.extend_from_slice(&0x100u64.to_le_bytes());
        r.push(info);
        r.push(rmid);
        r.extend_from_slice(&[0, 0]);
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(after);
        let crc = record_crc(&r);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }

    fn decode(major: PgMajor, after: &[u8]) -> Result<(Vec<BlockRef>, BodyInfo), WalError> {
        let r = record(0, 10, after);
        let mut blocks = Vec::new();
        let info = decode_body(&r, r.len(), Lsn(0x100), major, 8192, &mut blocks)?;
        Ok((blocks, info))
    }

    #[test]
    fn reference_heap_insert_with_image() {
        // The PG15 example of the reference: fork_flags 0x10, data_len 0, image length 3592,
        // hole_offset 416, bimg_info 0x03 (HAS_HOLE | APPLY), rel 1663/5/16384 blk 4, then
        // FF 03 and 3 bytes of main data.
        let mut a = vec![0u8, 0x10, 0, 0];
        a.extend_from_slice(&3592u16.to_le_bytes());
        a.extend_from_slice(&416u16.to_le_bytes());
        a.push(0x03);
        for v in [1663u32, 5, 16384, 4] {
            a.extend_from_slice(&v.to_le_bytes());
        }
        a.extend_from_slice(&[0xFF, 3]);
        a.extend(std::iter::repeat_n(0xAB, 3592));
        a.extend_from_slice(&[1, 2, 3]);
        let (blocks, info) = decode(PgMajor::V15, &a).unwrap();
        assert_eq!(24 + a.len(), 3646);
        assert_eq!(blocks.len(), 1);
        let b = blocks[0];
        assert_eq!(b.locator.to_string(), "1663/5/16384");
        assert_eq!(b.blkno, 4);
        let img = b.image.unwrap();
        assert_eq!(
            (img.length, img.hole_offset, img.hole_length),
            (3592, 416, 4600)
        );
        assert!(img.apply && img.has_hole());
        assert_eq!(img.compression, ImageCompression::None);
        assert_eq!(img.offset, 24 + 4 + 5 + 16 + 2);
        assert_eq!(info.main_data, 3643..3646);
        // The same bytes in 13/14 mean: hole, pglz-compressed (0x02), not applied; and a
        // compressed image with a hole carries hole_length, so the lengths no longer add up.
        assert!(decode(PgMajor::V14, &a).is_err());
    }

    #[test]
    fn lengths_must_add_up() {
        // Main data announced as 4 bytes, 3 present.
        assert_eq!(
            decode(PgMajor::V16, &[0xFF, 4, 1, 2, 3]).unwrap_err(),
            WalError::InvalidLength { lsn: Lsn(0x100) }
        );
        // Main data header cut short.
        assert!(matches!(
            decode(PgMajor::V16, &[0xFE, 4, 0]),
            Err(WalError::InvalidLength { .. })
        ));
        // No headers at all is fine (xl_tot_len 24, as for a SWITCH record).
        let (b, i) = decode(PgMajor::V16, &[]).unwrap();
        assert!(b.is_empty() && i.main_data.is_empty());
    }

    #[test]
    fn block_ids_and_flags() {
        let blk = |id: u8, flags: u8, len: u16| {
            let mut v = vec![id, flags];
            v.extend_from_slice(&len.to_le_bytes());
            if flags & BKPBLOCK_SAME_REL == 0 {
                v.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
            }
            v.extend_from_slice(&9u32.to_le_bytes());
            v
        };
        // Out of order ids.
        let mut a = blk(1, 0, 0);
        a.extend(blk(1, 0, 0));
        assert!(matches!(
            decode(PgMajor::V15, &a),
            Err(WalError::OutOfOrderBlockId { block_id: 1, .. })
        ));
        // SAME_REL on the first block.
        assert!(matches!(
            decode(PgMajor::V15, &blk(0, BKPBLOCK_SAME_REL, 0)),
            Err(WalError::SameRelWithoutPrevious { .. })
        ));
        // HAS_DATA without data and data without HAS_DATA.
        assert!(matches!(
            decode(PgMajor::V15, &blk(0, BKPBLOCK_HAS_DATA, 0)),
            Err(WalError::HasDataWithoutData { .. })
        ));
        assert!(matches!(
            decode(PgMajor::V15, &blk(0, 0, 2)),
            Err(WalError::DataWithoutHasData { len: 2, .. })
        ));
        // Block id 33.
        assert!(matches!(
            decode(PgMajor::V15, &blk(33, 0, 0)),
            Err(WalError::InvalidBlockId { block_id: 33, .. })
        ));
        // TOPLEVEL_XID exists from 14 on only.
        assert!(decode(PgMajor::V14, &[252, 1, 0, 0, 0]).is_ok());
        assert!(matches!(
            decode(PgMajor::V13, &[252, 1, 0, 0, 0]),
            Err(WalError::InvalidBlockId { block_id: 252, .. })
        ));
        // Two blocks, the second SAME_REL with data, then an origin and main data.
        let mut a = blk(0, 0, 0);
        a.extend(blk(3, BKPBLOCK_SAME_REL | BKPBLOCK_HAS_DATA | 1, 2));
        a.extend_from_slice(&[253, 5, 0, 0xFF, 1]);
        a.extend_from_slice(&[0xD1, 0xD2, 0xEE]);
        let (b, i) = decode(PgMajor::V15, &a).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].locator, b[0].locator);
        assert_eq!(b[1].fork(), 1);
        assert!(b[1].same_rel() && b[1].has_data());
        assert_eq!(i.origin, Some(5));
        let end = 24 + a.len() as u32;
        assert_eq!(b[1].data_offset, end - 3);
        assert_eq!(i.main_data, end - 1..end);
    }
}
