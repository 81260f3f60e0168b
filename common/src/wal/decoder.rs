//! The push decoder: bytes in, records out, no IO.
//!
//! This follows `xlogreader.c` `XLogDecodeNextRecord` step by step, turned inside out so that
//! the caller does the reading: the decoder says which LSN it needs bytes from
//! ([`WalDecoder::needed_lsn`]), the caller hands over WAL starting there
//! ([`WalDecoder::feed`]), and [`WalDecoder::poll`] returns the next record, "need more", or an
//! error naming its LSN.
//!
//! How PostgreSQL reads a record, and so how this does:
//!
//! 1. The record starts at `EndRecPtr` of the previous one (pg's "end pointer"). If that is a
//!    page boundary, the record starts after the page's header (24 or 40 bytes).
//! 2. Every page's header is checked once, when the reader first touches the page: magic, flags,
//!    long header on a segment's first page (segment size, page size, system identifier),
//!    `xlp_pageaddr` equal to the page's position, and a timeline that never goes down.
//! 3. `xl_tot_len` is always on the record's first page (records are 8-byte aligned). If the
//!    whole 24-byte header is there too it is validated at once (length ≥ 24, a valid rmgr,
//!    `xl_prev` equal to the previous record's start, or below the record's own LSN for the
//!    first record read); otherwise only the length is checked until the rest arrives.
//! 4. A record longer than what is left of its page continues on the next pages, after each
//!    page's header. Those pages must say `XLP_FIRST_IS_CONTRECORD` with `xlp_rem_len` equal to
//!    the bytes still missing. A page flagged `XLP_FIRST_IS_OVERWRITE_CONTRECORD` instead means
//!    the record was abandoned (its end was lost in a crash and recovery wrote past it): reading
//!    restarts at that page, whose first record is an XLOG OVERWRITE_CONTRECORD naming the
//!    abandoned record.
//! 5. The whole record's CRC-32C must match; the next record starts at the MAXALIGNed end,
//!    or at the next segment after an XLOG SWITCH.
//!
//! Records lying whole within one page are decoded where they lie in the fed bytes (which a
//! reader can read straight into the decoder's buffer, [`WalDecoder::feed_in_place`]); records
//! spanning pages are assembled into a buffer that grows only as their pieces arrive (after
//! each piece's page header vouched for the remaining length), so a garbage `xl_tot_len` never
//! causes a large allocation. Each piece goes into the record's CRC as it arrives, so an
//! assembled record is not read again to check it. Block references go into a reused vector;
//! nothing is allocated per record once buffers have reached their working size.
//!
//! Most WAL bytes are full-page images, and most records carrying one span pages. A reader that
//! needs block references but not the pages themselves (the scan for changed blocks) can ask
//! the decoder to leave image bytes out of assembled records
//! ([`WalDecoder::leave_out_image_bytes`]): they are still covered by the CRC, but once the
//! fragment headers have arrived (they come first) the bytes of each image are skipped instead
//! of copied. Such a reader may also name the few resource managers whose record kinds it reads
//! ([`WalDecoder::interpret_only`]): the main data of the others (a commit record's parts, a
//! checkpoint) is then not parsed, as PostgreSQL's own decoding (`DecodeXLogRecord`) leaves
//! main data to the resource manager that reads it.

use super::error::{MagicExpectation, WalError, WalParamsError};
use super::kinds::{RecordKind, check_rel_update, parse_kind, rmgr_has_kinds};
use super::page::{
    DEFAULT_XLOG_BLCKSZ, SIZE_OF_XLOG_SHORT_PHD, XLP_ALL_FLAGS, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLogPageHeader, le_u32,
};
use super::record::{
    BlockImage, BlockRef, Headers, SIZE_OF_XLOG_RECORD, XL_CRC_OFFSET, XLOG_RECORD_MAX_SIZE,
    XLR_RMGR_INFO_MASK, XLR_SPECIAL_REL_UPDATE, XLogRecordHeader, decode_body, image_ranges,
    lay_out, record_crc,
};
use super::rmgr::{RM_XLOG_ID, XLOG_SWITCH, record_type_name, rmgr_id_is_valid, rmgr_name};
use crate::lsn::is_valid_wal_seg_size;
use crate::{Lsn, PgMajor, TimeLineId};

/// What the decoder needs to know about the WAL it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalParams {
    /// The major version that wrote the WAL, or `None` to take it from the first page's
    /// `xlp_magic` (every later page must then carry the same magic).
    pub major: Option<PgMajor>,
    /// `wal_segment_size`.
    pub seg_size: u32,
    /// `XLOG_BLCKSZ`, the WAL page size (8192 unless PostgreSQL was built otherwise).
    pub page_size: u32,
    /// `BLCKSZ`, the data page size full-page images restore (8192 unless built otherwise).
    pub block_size: u32,
    /// When known (from pg_control), long page headers must carry this system identifier.
    pub system_identifier: Option<u64>,
}

impl WalParams {
    /// WAL of a known major version with the default page sizes.
    pub fn new(major: PgMajor, seg_size: u32) -> WalParams {
        WalParams {
            major: Some(major),
            seg_size,
            page_size: DEFAULT_XLOG_BLCKSZ,
            block_size: DEFAULT_XLOG_BLCKSZ,
            system_identifier: None,
        }
    }

    /// WAL written with this `XLOG_PAGE_MAGIC` (`None` for a magic no supported version uses).
    pub fn for_magic(xlp_magic: u16, seg_size: u32) -> Option<WalParams> {
        PgMajor::from_xlog_page_magic(xlp_magic).map(|m| WalParams::new(m, seg_size))
    }

    /// WAL whose version is taken from the magic of the first page read.
    pub fn detect(seg_size: u32) -> WalParams {
        WalParams {
            major: None,
            ..WalParams::new(PgMajor::V18, seg_size)
        }
    }

    pub fn with_system_identifier(mut self, sysid: u64) -> WalParams {
        self.system_identifier = Some(sysid);
        self
    }

    fn validate(&self) -> Result<(), WalParamsError> {
        if !is_valid_wal_seg_size(self.seg_size) {
            return Err(WalParamsError::SegmentSize(self.seg_size));
        }
        if !self.page_size.is_power_of_two() || !(1024..=65536).contains(&self.page_size) {
            return Err(WalParamsError::PageSize(self.page_size));
        }
        if !self.block_size.is_power_of_two() || !(1024..=32768).contains(&self.block_size) {
            return Err(WalParamsError::BlockSize(self.block_size));
        }
        Ok(())
    }
}

/// The result of a poll.
// Boxing the record would allocate per record, which is what the borrowed view avoids.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decoded<'a> {
    /// The next record.
    Record(WalRecord<'a>),
    /// No complete record in what was fed so far: feed WAL starting at `from`.
    NeedMore { from: Lsn },
}

/// A decoded record, borrowed from the decoder until the next `poll` or `feed`.
#[derive(Debug, Clone, Copy)]
pub struct WalRecord<'a> {
    /// Where the record starts.
    pub lsn: Lsn,
    /// Where the next record starts (PostgreSQL's `EndRecPtr`): the MAXALIGNed end of this one,
    /// possibly exactly a page boundary, or the next segment's start after an XLOG SWITCH.
    pub end_lsn: Lsn,
    pub header: XLogRecordHeader,
    pub major: PgMajor,
    /// The timeline in the header of the page where the record starts.
    pub page_tli: TimeLineId,
    /// `XLR_BLOCK_ID_ORIGIN`: the replication origin that wrote the record.
    pub origin: Option<u16>,
    /// `XLR_BLOCK_ID_TOPLEVEL_XID` (14+): the top-level xid of a subtransaction's record.
    pub toplevel_xid: Option<u32>,
    /// Block references in block id order.
    pub blocks: &'a [BlockRef],
    pub main_data: &'a [u8],
    /// The whole record, header included (`xl_tot_len` bytes); or, when `images_left_out`, the
    /// record without the stored bytes of its images. Offsets in [`BlockRef`] and
    /// [`BlockImage`] index into it.
    pub raw: &'a [u8],
    /// The image bytes were checked (CRC) but not kept: [`WalRecord::block_image`] is empty.
    pub images_left_out: bool,
    /// What the record means, for the records the decoder interprets.
    pub kind: RecordKind<'a>,
}

impl<'a> WalRecord<'a> {
    pub fn rmid(&self) -> u8 {
        self.header.xl_rmid
    }
    /// The whole `xl_info` byte.
    pub fn info(&self) -> u8 {
        self.header.xl_info
    }
    /// The rmgr's part of `xl_info` (the record type).
    pub fn rmgr_info(&self) -> u8 {
        self.header.xl_info & XLR_RMGR_INFO_MASK
    }
    pub fn xid(&self) -> u32 {
        self.header.xl_xid
    }
    pub fn tot_len(&self) -> u32 {
        self.header.xl_tot_len
    }
    pub fn xl_prev(&self) -> Lsn {
        self.header.xl_prev
    }
    /// The rmgr name as pg_waldump prints it.
    pub fn rmgr_name(&self) -> &'static str {
        rmgr_name(self.header.xl_rmid)
    }
    /// The record type as pg_waldump prints it after `desc:` (`"UNKNOWN"` if unnamed).
    pub fn record_type(&self) -> &'static str {
        record_type_name(self.major, self.header.xl_rmid, self.header.xl_info)
    }
    /// Flagged `XLR_SPECIAL_REL_UPDATE`.
    pub fn is_special_rel_update(&self) -> bool {
        self.header.xl_info & XLR_SPECIAL_REL_UPDATE != 0
    }
    /// Total bytes of full-page images (pg_waldump's "FPI size").
    pub fn fpi_len(&self) -> u32 {
        self.blocks
            .iter()
            .filter_map(|b| b.image)
            .map(|i| u32::from(i.length))
            .sum()
    }
    /// The stored (possibly compressed, hole removed) bytes of a block's image.
    pub fn block_image(&self, image: &BlockImage) -> &'a [u8] {
        let start = image.offset as usize;
        self.raw
            .get(start..start + usize::from(image.length))
            .unwrap_or(&[])
    }
    /// A block's data.
    pub fn block_data(&self, block: &BlockRef) -> &'a [u8] {
        let start = block.data_offset as usize;
        self.raw
            .get(start..start + usize::from(block.data_len))
            .unwrap_or(&[])
    }
}

/// A record printed the way pg_waldump prints it without `-b`; of the rmgr-specific description
/// only what [`RecordKind::detail`] says about the records that act on files is reproduced:
/// `rmgr: Heap        len (rec/tot):     54/  1958, tx:        724, lsn: 0/009000A8, prev 0/00900078, desc: INSERT , blkref #0: rel 1663/5/1247 blk 14 FPW`.
pub struct WaldumpLine<'r, 'a>(&'r WalRecord<'a>);

impl std::fmt::Display for WaldumpLine<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.0;
        let lsn = |l: Lsn| (l.0 >> 32, l.0 as u32);
        let (lh, ll) = lsn(r.lsn);
        let (ph, pl) = lsn(r.xl_prev());
        write!(
            f,
            "rmgr: {:<11} len (rec/tot): {:>6}/{:>6}, tx: {:>10}, lsn: {lh:X}/{ll:08X}, prev {ph:X}/{pl:08X}, ",
            r.rmgr_name(),
            r.tot_len() - r.fpi_len(),
            r.tot_len(),
            r.xid(),
        )?;
        let ty = r.record_type();
        if ty == "UNKNOWN" {
            write!(f, "desc: UNKNOWN ({:x}) ", r.rmgr_info())?;
        } else {
            write!(f, "desc: {ty} ")?;
        }
        if let Some(detail) = r.kind.detail() {
            f.write_str(&detail)?;
        }
        for b in r.blocks {
            write!(f, ", blkref #{}: rel {}", b.id, b.locator)?;
            if b.fork() != 0 {
                match super::record::fork_name(b.fork()) {
                    Some(n) => write!(f, " fork {n}")?,
                    None => write!(f, " fork {}", b.fork())?,
                }
            }
            write!(f, " blk {}", b.blkno)?;
            if let Some(img) = &b.image {
                f.write_str(if img.apply {
                    " FPW"
                } else {
                    " FPW for WAL verification"
                })?;
            }
        }
        Ok(())
    }
}

impl<'a> WalRecord<'a> {
    /// The record as a pg_waldump line (see [`WaldumpLine`]).
    pub fn waldump_line(&self) -> WaldumpLine<'_, 'a> {
        WaldumpLine(self)
    }
}

/// Bytes fed at an LSN past the one the decoder needs: something in between is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("WAL fed from {given}, but the decoder needs bytes from {needed} first")]
pub struct FeedGap {
    pub needed: Lsn,
    pub given: Lsn,
}

/// The header of the last page whose header was validated.
#[derive(Debug, Clone, Copy)]
struct PageState {
    lsn: u64,
    hdr_len: u64,
    info: u16,
    rem_len: u32,
    tli: u32,
}

/// A record being put together from pieces on several pages.
#[derive(Debug, Clone, Copy)]
struct Assembly {
    rec_lsn: u64,
    tot_len: u32,
    got: u32,
    gotheader: bool,
    next_page: u64,
    start_tli: u32,
    /// CRC-32C of the record's bytes after its header, of the pieces received so far.
    crc: u32,
    images: ImageBytes,
}

/// What becomes of the image bytes of a record being assembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageBytes {
    /// Copied with the rest.
    Keep,
    /// To be left out once the fragment headers have all arrived.
    Await,
    /// Left out: `image_ranges` says where they are.
    LeaveOut,
}

/// Where a finished record's bytes are.
#[derive(Debug, Clone, Copy)]
enum Location {
    /// In `buf` at this index.
    Buf(usize),
    /// In `asm_buf`.
    Assembled,
}

#[derive(Debug, Clone)]
struct Done {
    lsn: u64,
    end: u64,
    header: XLogRecordHeader,
    loc: Location,
    tli: u32,
    body: super::record::BodyInfo,
    major: PgMajor,
    images_left_out: bool,
}

/// The push decoder. See the module documentation.
#[derive(Debug)]
pub struct WalDecoder {
    params: WalParams,
    major: Option<PgMajor>,
    /// Fed bytes; `buf[i]` is the byte at LSN `buf_lsn + i`, for `i < filled`. Bytes before
    /// `start` are consumed; bytes from `filled` on are room kept for the next feed, so that
    /// [`WalDecoder::feed_in_place`] neither allocates nor clears memory once warm.
    buf: Vec<u8>,
    filled: usize,
    buf_lsn: u64,
    start: usize,
    /// Where the next record starts (`EndRecPtr`).
    next_rec: u64,
    /// Start of the last record returned (`DecodeRecPtr`); `None` before the first, when
    /// `xl_prev` can only be checked to lie before the record.
    prev_rec: Option<u64>,
    /// Started at a page: skip a record continued onto it first (`XLogFindNextRecord`).
    seeking: bool,
    page: Option<PageState>,
    latest_page_ptr: u64,
    latest_page_tli: u32,
    asm: Option<Assembly>,
    asm_buf: Vec<u8>,
    /// Leave image bytes out of assembled records ([`WalDecoder::leave_out_image_bytes`]).
    leave_out_images: bool,
    /// The resource managers whose records' kinds are interpreted, bit `rmid` set for each
    /// ([`WalDecoder::interpret_only`]); all by default.
    interpreted: u64,
    /// Where the images of the record being assembled lie, once known (record offsets), and
    /// its fragment headers, decoded into `blocks` then (the same bytes decode the same way
    /// once the record is whole).
    image_ranges: Vec<std::ops::Range<u32>>,
    headers: Option<Headers>,
    /// The record abandoned at an `XLP_FIRST_IS_OVERWRITE_CONTRECORD` page, until the
    /// OVERWRITE_CONTRECORD record that must follow has been read.
    overwritten: Option<u64>,
    blocks: Vec<BlockRef>,
    failed: Option<WalError>,
}

/// The last position a record may start at. Everything the decoder adds to a record's
/// position (page headers, a record of at most 1020 MiB, rounding up to a segment of at most
/// 1 GiB) stays below 4 GiB, so no position arithmetic can overflow below this.
const MAX_RECORD_LSN: u64 = u64::MAX - (1 << 32);

/// Assembly buffer capacity kept between records; larger ones are released.
const ASM_BUF_KEEP: usize = 4 << 20;

fn maxalign(n: u64) -> u64 {
    (n + 7) & !7
}

impl WalDecoder {
    /// A decoder that reads the record starting at `start` and every record after it.
    /// `start` must be where a record starts (8-byte aligned), or a page boundary when a record
    /// starts right after that page's header. The first bytes it needs are those of `start`'s
    /// page, so that the page header can be checked.
    pub fn new(start: Lsn, params: WalParams) -> Result<WalDecoder, WalParamsError> {
        params.validate()?;
        let page = start.0 & !(u64::from(params.page_size) - 1);
        let mut d = WalDecoder {
            params,
            major: params.major,
            buf: Vec::new(),
            filled: 0,
            buf_lsn: page,
            start: 0,
            next_rec: start.0,
            prev_rec: None,
            seeking: false,
            page: None,
            latest_page_ptr: 0,
            latest_page_tli: 0,
            asm: None,
            asm_buf: Vec::new(),
            leave_out_images: false,
            interpreted: u64::MAX,
            image_ranges: Vec::new(),
            headers: None,
            overwritten: None,
            blocks: Vec::with_capacity(8),
            failed: None,
        };
        if !start.0.is_multiple_of(8) {
            d.failed = Some(WalError::MisalignedStart { lsn: start });
        }
        Ok(d)
    }

    /// A decoder that reads from the first record starting at or after the page at
    /// `page_lsn` (rounded down to a page boundary), skipping the tail of a record continued
    /// from earlier pages, as pg_waldump does when started at a segment.
    pub fn new_at_page(page_lsn: Lsn, params: WalParams) -> Result<WalDecoder, WalParamsError> {
        let page = page_lsn.0 & !(u64::from(params.page_size.max(1)) - 1);
        let mut d = WalDecoder::new(Lsn(page), params)?;
        d.seeking = true;
        Ok(d)
    }

    pub fn params(&self) -> &WalParams {
        &self.params
    }

    /// Leaves the stored bytes of full-page images out of records that span pages, for a
    /// reader that needs block references and not the pages: such records come with
    /// [`WalRecord::images_left_out`], their images' offsets [`IMAGE_BYTES_LEFT_OUT`]. Every
    /// byte is still checked by the record's CRC; only the copy is saved. Records within one
    /// page are not copied at all and keep their images.
    ///
    /// [`IMAGE_BYTES_LEFT_OUT`]: super::record::IMAGE_BYTES_LEFT_OUT
    pub fn leave_out_image_bytes(mut self) -> Self {
        self.leave_out_images = true;
        self
    }

    /// Interprets the [`RecordKind`] of the records of these resource managers (`RM_*_ID`)
    /// only; the others come as [`RecordKind::Other`]. For a reader that looks for a few
    /// kinds among millions of records: a scan for the files WAL changes needs the SMGR and
    /// DBASE records, and parsing every commit record (one in six of a pgbench run's) besides
    /// was 3 % of its time. The decoder's own checks still interpret what they need: a
    /// record flagged `XLR_SPECIAL_REL_UPDATE`, and the OVERWRITE_CONTRECORD that must follow
    /// an abandoned record.
    pub fn interpret_only(mut self, rmids: &[u8]) -> Self {
        self.interpreted = rmids
            .iter()
            .filter(|&&id| id < 64)
            .fold(0, |set, &id| set | 1 << id);
        self
    }

    /// The major version: configured, or detected from the first page read.
    pub fn major(&self) -> Option<PgMajor> {
        self.major
    }

    /// The LSN of the next byte to feed.
    pub fn needed_lsn(&self) -> Lsn {
        Lsn(self.buf_lsn.saturating_add(self.filled as u64))
    }

    /// Where the next record starts: after `poll` returned a record, that record's `end_lsn`.
    pub fn next_record_lsn(&self) -> Lsn {
        Lsn(self.next_rec)
    }

    /// The start of the last record returned, if any.
    pub fn last_record_lsn(&self) -> Option<Lsn> {
        self.prev_rec.map(Lsn)
    }

    /// How many fed bytes are held and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.filled - self.start
    }

    /// Hands over WAL that starts at [`WalDecoder::needed_lsn`].
    pub fn feed(&mut self, bytes: &[u8]) {
        let room = self.make_room(bytes.len());
        room.copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Hands over up to `max` bytes of WAL that starts at [`WalDecoder::needed_lsn`], written by
    /// `read` straight into the decoder's buffer: a reader of segment files reads into it and
    /// nothing is copied again (records within a page are then decoded where they were read).
    /// `read` gets room for `max` bytes and returns how many it wrote; its error is returned
    /// and nothing is fed.
    pub fn feed_in_place<E>(
        &mut self,
        max: usize,
        read: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let n = read(self.make_room(max))?.min(max);
        self.filled += n;
        Ok(n)
    }

    /// The `n` bytes of `buf` after the fed ones, made room for.
    fn make_room(&mut self, n: usize) -> &mut [u8] {
        if self.start > 0 && self.start >= self.filled - self.start {
            // More consumed than kept: moving the rest down costs less than what was consumed,
            // so feeding stays linear overall.
            self.buf.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.buf_lsn += self.start as u64;
            self.start = 0;
        }
        let end = self.filled + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.filled..end]
    }

    /// Hands over WAL that starts at `lsn`, which may lie before [`WalDecoder::needed_lsn`]
    /// (the bytes already had are skipped) but not after it.
    pub fn feed_at(&mut self, lsn: Lsn, bytes: &[u8]) -> Result<(), FeedGap> {
        let needed = self.needed_lsn();
        if lsn > needed {
            return Err(FeedGap { needed, given: lsn });
        }
        let skip = needed.0 - lsn.0;
        if let Some(rest) = usize::try_from(skip).ok().and_then(|s| bytes.get(s..)) {
            self.feed(rest);
        }
        Ok(())
    }

    /// The next record, `NeedMore`, or an error. After an error other than
    /// [`WalError::UnrecognizedRelUpdate`], every later poll returns the same error.
    pub fn poll(&mut self) -> Result<Decoded<'_>, WalError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.asm.is_none() && self.asm_buf.capacity() > ASM_BUF_KEEP {
            // A huge record passed; do not hold its memory for the rest of the WAL.
            self.asm_buf = Vec::new();
        }
        let done = match self.step() {
            Ok(Some(d)) => d,
            Ok(None) => {
                return Ok(Decoded::NeedMore {
                    from: self.needed_lsn(),
                });
            }
            Err(e) => {
                self.failed = Some(e.clone());
                return Err(e);
            }
        };
        let tot = done.header.xl_tot_len as usize;
        let raw: &[u8] = match done.loc {
            Location::Buf(i) => self.buf[..self.filled].get(i..i + tot).unwrap_or(&[]),
            Location::Assembled => &self.asm_buf,
        };
        let r = done.body.main_data.start as usize..done.body.main_data.end as usize;
        let main_data = raw.get(r).unwrap_or(&[]);
        let lsn = Lsn(done.lsn);
        let rmid = done.header.xl_rmid;
        let info = done.header.xl_info;
        // rmgr_has_kinds holds for built-in rmgrs only, whose ids are below 64.
        let interpret = rmgr_has_kinds(rmid)
            && (self.interpreted & 1 << rmid != 0
                || info & XLR_SPECIAL_REL_UPDATE != 0
                || self.overwritten.is_some());
        let kind = if interpret {
            match parse_kind(done.major, lsn, rmid, info, main_data) {
                Ok(k) => k,
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        } else {
            RecordKind::Other
        };
        if let Some(aborted) = self.overwritten.take() {
            let ok = matches!(kind, RecordKind::OverwriteContrecord { overwritten_lsn, .. }
                if overwritten_lsn.0 == aborted);
            if !ok {
                let e = WalError::BadOverwriteContrecord {
                    lsn,
                    aborted: Lsn(aborted),
                };
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        // The decoder has already moved past the record, so this error leaves it usable.
        check_rel_update(lsn, rmid, info, &kind)?;
        Ok(Decoded::Record(WalRecord {
            lsn,
            end_lsn: Lsn(done.end),
            header: done.header,
            major: done.major,
            page_tli: done.tli,
            origin: done.body.origin,
            toplevel_xid: done.body.toplevel_xid,
            blocks: &self.blocks,
            main_data,
            raw,
            images_left_out: done.images_left_out,
            kind,
        }))
    }

    fn ps(&self) -> u64 {
        u64::from(self.params.page_size)
    }

    /// Where the fed bytes `[lsn, lsn + n)` are in `buf`, if all there.
    fn range(&self, lsn: u64, n: u64) -> Option<std::ops::Range<usize>> {
        let off = lsn.checked_sub(self.buf_lsn)?;
        if off < self.start as u64 {
            return None;
        }
        let end = off.checked_add(n)?;
        if end > self.filled as u64 {
            return None;
        }
        Some(usize::try_from(off).ok()?..usize::try_from(end).ok()?)
    }

    /// The fed bytes `[lsn, lsn + n)`, if all there.
    fn get(&self, lsn: u64, n: u64) -> Option<&[u8]> {
        self.range(lsn, n)
            .and_then(|r| self.buf[..self.filled].get(r))
    }

    /// Forgets fed bytes before `lsn`. Past the end of what was fed, the decoder then needs
    /// bytes from `lsn` (how an XLOG SWITCH skips the rest of its segment).
    fn discard_before(&mut self, lsn: u64) {
        let end = self.buf_lsn.saturating_add(self.filled as u64);
        if lsn >= end {
            self.filled = 0;
            self.buf_lsn = lsn;
            self.start = 0;
        } else if lsn > self.buf_lsn {
            // lsn < end, so the difference fits the buffer's length.
            self.start = self.start.max((lsn - self.buf_lsn) as usize);
        }
    }

    /// The header of the page at `page`, validated (`XLogReaderValidatePageHeader`) the first
    /// time it is read. `None` until enough bytes are fed.
    #[inline(always)]
    fn page_header(&mut self, page: u64) -> Result<Option<PageState>, WalError> {
        if let Some(p) = self.page
            && p.lsn == page
        {
            return Ok(Some(p));
        }
        self.read_page_header(page)
    }

    /// [`Self::page_header`] of a page not read yet: apart, so that the check every record
    /// makes (its page is the one read last) is not a call.
    #[inline(never)]
    fn read_page_header(&mut self, page: u64) -> Result<Option<PageState>, WalError> {
        let Some(short) = self.get(page, SIZE_OF_XLOG_SHORT_PHD as u64) else {
            return Ok(None);
        };
        let info = u16::from_le_bytes([short[2], short[3]]);
        let size = XLogPageHeader::size_for_info(info) as u64;
        let Some(hdr) = self.get(page, size).and_then(XLogPageHeader::parse) else {
            return Ok(None);
        };
        let at = Lsn(page);
        let expected = match self.major {
            Some(m) => m.xlog_page_magic(),
            None => match PgMajor::from_xlog_page_magic(hdr.xlp_magic) {
                Some(m) => {
                    self.major = Some(m);
                    hdr.xlp_magic
                }
                None => {
                    return Err(WalError::InvalidMagic {
                        page: at,
                        magic: hdr.xlp_magic,
                        expected: MagicExpectation::AnySupported,
                    });
                }
            },
        };
        if hdr.xlp_magic != expected {
            return Err(WalError::InvalidMagic {
                page: at,
                magic: hdr.xlp_magic,
                expected: MagicExpectation::Magic(expected),
            });
        }
        if hdr.xlp_info & !XLP_ALL_FLAGS != 0 {
            return Err(WalError::InvalidInfoBits {
                page: at,
                info: hdr.xlp_info,
            });
        }
        if let Some(long) = hdr.long {
            if let Some(sysid) = self.params.system_identifier
                && long.xlp_sysid != sysid
            {
                return Err(WalError::WrongSystemIdentifier {
                    page: at,
                    got: long.xlp_sysid,
                    expected: sysid,
                });
            }
            if long.xlp_seg_size != self.params.seg_size {
                return Err(WalError::WrongSegmentSize {
                    page: at,
                    got: long.xlp_seg_size,
                    expected: self.params.seg_size,
                });
            }
            if long.xlp_xlog_blcksz != self.params.page_size {
                return Err(WalError::WrongPageSize {
                    page: at,
                    got: long.xlp_xlog_blcksz,
                    expected: self.params.page_size,
                });
            }
        } else if page.is_multiple_of(u64::from(self.params.seg_size)) {
            return Err(WalError::MissingLongHeader {
                page: at,
                info: hdr.xlp_info,
            });
        }
        if hdr.xlp_pageaddr.0 != page {
            return Err(WalError::UnexpectedPageAddr {
                page: at,
                pageaddr: hdr.xlp_pageaddr,
            });
        }
        if page > self.latest_page_ptr && hdr.xlp_tli < self.latest_page_tli {
            return Err(WalError::TimelineWentBackwards {
                page: at,
                tli: hdr.xlp_tli,
                prev_tli: self.latest_page_tli,
            });
        }
        self.latest_page_ptr = page;
        self.latest_page_tli = hdr.xlp_tli;
        let st = PageState {
            lsn: page,
            hdr_len: size,
            info: hdr.xlp_info,
            rem_len: hdr.xlp_rem_len,
            tli: hdr.xlp_tli,
        };
        self.page = Some(st);
        Ok(Some(st))
    }

    /// `ValidXLogRecordHeader`, plus the maximum length.
    fn validate_header(&self, lsn: u64, h: &XLogRecordHeader) -> Result<(), WalError> {
        let at = Lsn(lsn);
        if (h.xl_tot_len as usize) < SIZE_OF_XLOG_RECORD {
            return Err(WalError::InvalidRecordLength {
                lsn: at,
                got: h.xl_tot_len,
            });
        }
        if h.xl_tot_len > XLOG_RECORD_MAX_SIZE {
            return Err(WalError::RecordTooLong {
                lsn: at,
                len: h.xl_tot_len,
            });
        }
        // The major is known once a page header was read, which precedes every record.
        let major = self.major.unwrap_or(PgMajor::V18);
        if !rmgr_id_is_valid(major, h.xl_rmid) {
            return Err(WalError::InvalidRmgrId {
                lsn: at,
                rmid: h.xl_rmid,
            });
        }
        let prev_ok = match self.prev_rec {
            Some(p) => h.xl_prev.0 == p,
            None => h.xl_prev.0 < lsn,
        };
        if !prev_ok {
            return Err(WalError::IncorrectPrevLink {
                lsn: at,
                prev: h.xl_prev,
            });
        }
        Ok(())
    }

    #[inline(always)]
    fn check_crc(&self, lsn: u64, raw: &[u8], h: &XLogRecordHeader) -> Result<(), WalError> {
        let computed = record_crc(raw);
        if computed != h.xl_crc {
            return Err(WalError::CrcMismatch {
                lsn: Lsn(lsn),
                stored: h.xl_crc,
                computed,
            });
        }
        Ok(())
    }

    /// Advances to the next complete record. `Ok(None)`: more bytes needed.
    #[inline(always)]
    fn step(&mut self) -> Result<Option<Done>, WalError> {
        let ps = self.ps();
        loop {
            if self.asm.is_some() {
                match self.continue_assembly()? {
                    Assembled::NeedMore => return Ok(None),
                    Assembled::Restart => continue,
                    Assembled::Done(d) => return Ok(Some(d)),
                }
            }
            let mut rec = self.next_rec;
            if rec > MAX_RECORD_LSN {
                return Err(WalError::LsnOutOfRange { lsn: Lsn(rec) });
            }
            let page = rec & !(ps - 1);
            let page_known = self.page.is_some_and(|p| p.lsn == page);
            self.discard_before(if page_known { rec } else { page });
            let Some(ph) = self.page_header(page)? else {
                return Ok(None);
            };
            let mut off = rec - page;
            if self.seeking {
                if off == 0 && ph.info & XLP_FIRST_IS_CONTRECORD != 0 {
                    let skip = maxalign(u64::from(ph.rem_len));
                    self.next_rec = if skip >= ps - ph.hdr_len {
                        page + ps
                    } else {
                        self.seeking = false;
                        page + ph.hdr_len + skip
                    };
                    continue;
                }
                self.seeking = false;
            }
            if off == 0 {
                rec += ph.hdr_len;
                off = ph.hdr_len;
            } else if off < ph.hdr_len {
                return Err(WalError::InvalidRecordOffset {
                    lsn: Lsn(rec),
                    expected: ph.hdr_len as u32,
                    got: off as u32,
                });
            }
            if ph.info & XLP_FIRST_IS_CONTRECORD != 0 && off == ph.hdr_len {
                return Err(WalError::ContrecordRequested { lsn: Lsn(rec) });
            }
            // xl_tot_len is the first field and records are MAXALIGNed, so it is on this page.
            let Some(b) = self.get(rec, 4) else {
                return Ok(None);
            };
            let tot_len = le_u32(b, 0);
            let header_on_page = off <= ps - SIZE_OF_XLOG_RECORD as u64;
            let header = if header_on_page {
                let Some(h) = self.get(rec, SIZE_OF_XLOG_RECORD as u64) else {
                    return Ok(None);
                };
                let h = XLogRecordHeader::parse(h).ok_or(WalError::InvalidRecordLength {
                    lsn: Lsn(rec),
                    got: tot_len,
                })?;
                self.validate_header(rec, &h)?;
                Some(h)
            } else {
                if (tot_len as usize) < SIZE_OF_XLOG_RECORD {
                    return Err(WalError::InvalidRecordLength {
                        lsn: Lsn(rec),
                        got: tot_len,
                    });
                }
                if tot_len > XLOG_RECORD_MAX_SIZE {
                    return Err(WalError::RecordTooLong {
                        lsn: Lsn(rec),
                        len: tot_len,
                    });
                }
                None
            };
            let space = ps - off;
            if let Some(h) = header
                && u64::from(tot_len) <= space
            {
                let Some(raw) = self.get(rec, u64::from(tot_len)) else {
                    return Ok(None);
                };
                self.check_crc(rec, raw, &h)?;
                let idx = (rec - self.buf_lsn) as usize;
                let end = rec + maxalign(u64::from(tot_len));
                return self
                    .finish(rec, end, h, Location::Buf(idx), ph.tli)
                    .map(Some);
            }
            // The record continues on the next page: keep its first piece and assemble.
            let Some(first) = self.range(rec, space) else {
                return Ok(None);
            };
            self.asm_buf.clear();
            self.headers = None;
            let mut a = Assembly {
                rec_lsn: rec,
                tot_len,
                got: 0,
                gotheader: header_on_page,
                next_page: page + ps,
                start_tli: ph.tli,
                crc: 0,
                images: if self.leave_out_images {
                    ImageBytes::Await
                } else {
                    ImageBytes::Keep
                },
            };
            self.absorb(&mut a, first);
            self.asm = Some(a);
            self.discard_before(page + ps);
        }
    }

    fn continue_assembly(&mut self) -> Result<Assembled, WalError> {
        let ps = self.ps();
        while let Some(mut a) = self.asm {
            let page = a.next_page;
            let Some(ph) = self.page_header(page)? else {
                return Ok(Assembled::NeedMore);
            };
            if ph.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                self.overwritten = Some(a.rec_lsn);
                self.asm = None;
                self.asm_buf.clear();
                self.next_rec = page;
                return Ok(Assembled::Restart);
            }
            if ph.info & XLP_FIRST_IS_CONTRECORD == 0 {
                return Err(WalError::NoContrecordFlag {
                    lsn: Lsn(a.rec_lsn),
                    page: Lsn(page),
                });
            }
            let missing = u64::from(a.tot_len - a.got);
            if ph.rem_len == 0 || u64::from(ph.rem_len) != missing {
                return Err(WalError::InvalidContrecordLength {
                    lsn: Lsn(a.rec_lsn),
                    page: Lsn(page),
                    rem_len: ph.rem_len,
                    expected: missing,
                });
            }
            let len = u64::from(ph.rem_len).min(ps - ph.hdr_len);
            let Some(piece) = self.range(page + ph.hdr_len, len) else {
                return Ok(Assembled::NeedMore);
            };
            self.absorb(&mut a, piece);
            a.next_page = page + ps;
            self.asm = Some(a);
            self.discard_before(page + ph.hdr_len + len);
            if !a.gotheader && a.got as usize >= SIZE_OF_XLOG_RECORD {
                let h = XLogRecordHeader::parse(&self.asm_buf).ok_or(
                    WalError::InvalidRecordLength {
                        lsn: Lsn(a.rec_lsn),
                        got: a.tot_len,
                    },
                )?;
                self.validate_header(a.rec_lsn, &h)?;
                a.gotheader = true;
                self.asm = Some(a);
            }
            if a.got == a.tot_len {
                self.asm = None;
                let h = XLogRecordHeader::parse(&self.asm_buf).ok_or(
                    WalError::InvalidRecordLength {
                        lsn: Lsn(a.rec_lsn),
                        got: a.tot_len,
                    },
                )?;
                let head = self.asm_buf.get(..XL_CRC_OFFSET).unwrap_or(&[]);
                let computed = super::crc::crc32c_append(a.crc, head);
                if computed != h.xl_crc {
                    return Err(WalError::CrcMismatch {
                        lsn: Lsn(a.rec_lsn),
                        stored: h.xl_crc,
                        computed,
                    });
                }
                let end = page + ph.hdr_len + maxalign(u64::from(ph.rem_len));
                return self
                    .finish(a.rec_lsn, end, h, Location::Assembled, a.start_tli)
                    .map(Assembled::Done);
            }
        }
        Ok(Assembled::Restart)
    }

    /// Decodes the body of a whole, CRC-checked record and moves past it.
    #[inline(always)]
    fn finish(
        &mut self,
        lsn: u64,
        end: u64,
        h: XLogRecordHeader,
        loc: Location,
        tli: u32,
    ) -> Result<Done, WalError> {
        let major = self.major.unwrap_or(PgMajor::V18);
        let tot = h.xl_tot_len as usize;
        let raw: &[u8] = match loc {
            Location::Buf(i) => self.buf[..self.filled].get(i..i + tot).unwrap_or(&[]),
            Location::Assembled => &self.asm_buf,
        };
        let images_left_out = raw.len() < tot;
        let headers = self.headers.take();
        let body = match headers {
            Some(headers) if images_left_out => {
                lay_out(headers, raw.len(), tot, Lsn(lsn), &mut self.blocks)?
            }
            _ => decode_body(
                raw,
                tot,
                Lsn(lsn),
                major,
                self.params.block_size,
                &mut self.blocks,
            )?,
        };
        let mut next = end;
        if h.xl_rmid == RM_XLOG_ID && h.xl_info & XLR_RMGR_INFO_MASK == XLOG_SWITCH {
            // Pretend the record extends to the end of its segment.
            let seg = u64::from(self.params.seg_size);
            next = (next + seg - 1) & !(seg - 1);
        }
        self.prev_rec = Some(lsn);
        self.next_rec = next;
        Ok(Done {
            lsn,
            end: next,
            header: h,
            loc,
            tli,
            body,
            major,
            images_left_out,
        })
    }

    /// Takes `piece` of the fed bytes as the next bytes of the record being assembled: into
    /// its CRC (past the record header, which the CRC takes last), and into `asm_buf` but for
    /// image bytes being left out.
    fn absorb(&mut self, a: &mut Assembly, piece: std::ops::Range<usize>) {
        let bytes = &self.buf[piece];
        let at = a.got as usize;
        let body = SIZE_OF_XLOG_RECORD.saturating_sub(at).min(bytes.len());
        a.crc = super::crc::crc32c_append(a.crc, &bytes[body..]);
        if a.images == ImageBytes::Await && at == 0 {
            // The fragment headers mostly come whole with the first piece: found there, no
            // image byte is copied at all.
            self.headers = image_ranges(
                bytes,
                a.tot_len as usize,
                self.major.unwrap_or(PgMajor::V18),
                self.params.block_size,
                &mut self.blocks,
                &mut self.image_ranges,
            );
            if self.headers.is_some() {
                a.images = if self.image_ranges.is_empty() {
                    ImageBytes::Keep
                } else {
                    ImageBytes::LeaveOut
                };
            }
        }
        if a.images == ImageBytes::LeaveOut {
            kept_parts(at, bytes.len(), &self.image_ranges, |from, to| {
                self.asm_buf.extend_from_slice(&bytes[from - at..to - at]);
            });
        } else {
            self.asm_buf.extend_from_slice(bytes);
        }
        a.got += bytes.len() as u32;
        if a.images == ImageBytes::Await && a.got < a.tot_len {
            self.find_images(a);
        }
    }

    /// Once the fragment headers of the record being assembled have all arrived, where its
    /// images are; the image bytes already copied are then taken out again.
    fn find_images(&mut self, a: &mut Assembly) {
        let major = self.major.unwrap_or(PgMajor::V18);
        let found = image_ranges(
            &self.asm_buf,
            a.tot_len as usize,
            major,
            self.params.block_size,
            &mut self.blocks,
            &mut self.image_ranges,
        );
        let Some(headers) = found else {
            // Not all there yet, or not valid: then the record will fail its checks whole.
            return;
        };
        if self.image_ranges.is_empty() {
            a.images = ImageBytes::Keep;
            return;
        }
        let got = self.asm_buf.len();
        let mut kept = 0;
        let (buf, ranges) = (&mut self.asm_buf, &self.image_ranges);
        kept_parts(0, got, ranges, |from, to| {
            buf.copy_within(from..to, kept);
            kept += to - from;
        });
        buf.truncate(kept);
        self.headers = Some(headers);
        a.images = ImageBytes::LeaveOut;
    }
}

/// Calls `f(from, to)` for each part of the record offsets `[at, at + len)` outside `skip`
/// (sorted, not overlapping), in order.
fn kept_parts(
    at: usize,
    len: usize,
    skip: &[std::ops::Range<u32>],
    mut f: impl FnMut(usize, usize),
) {
    let end = at + len;
    let mut pos = at;
    for r in skip {
        let (s, e) = (r.start as usize, r.end as usize);
        if e <= pos {
            continue;
        }
        if s >= end {
            break;
        }
        if s > pos {
            f(pos, s);
        }
        pos = e.min(end);
    }
    if pos < end {
        f(pos, end);
    }
}

enum Assembled {
    NeedMore,
    Restart,
    Done(Done),
}
