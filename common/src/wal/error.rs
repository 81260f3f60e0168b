//! What can go wrong while decoding WAL, and where.
//!
//! PostgreSQL's reader (`xlogreader.c`) reports every problem as a message naming the LSN, and
//! recovery treats *any* of them as "end of WAL". A rewind tool has to be more careful: WAL that
//! simply stops (zeroed pages, a recycled segment whose pages still carry old addresses, a last
//! record torn by a crash) is normal, while a CRC-valid record whose structure is wrong, or a
//! record that changes relation files in a way nobody understands, must stop the rewind. So every
//! error carries its LSN, PostgreSQL's wording where PostgreSQL has one, and
//! [`WalError::is_end_of_wal`] tells the two families apart.

use crate::Lsn;

/// An error found while decoding WAL. Every variant names the LSN it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    // ---- page headers (XLogReaderValidatePageHeader) ----
    /// The page header's `xlp_magic` is not this version's `XLOG_PAGE_MAGIC`. Zero means the
    /// page was never written (end of WAL).
    #[error("invalid magic number {magic:04X} in WAL page at {page} (expected {expected})")]
    InvalidMagic {
        page: Lsn,
        magic: u16,
        expected: MagicExpectation,
    },
    #[error("invalid info bits {info:04X} in WAL page at {page}")]
    InvalidInfoBits { page: Lsn, info: u16 },
    /// The first page of a segment must carry the long header (`XLP_LONG_HEADER`).
    #[error(
        "invalid info bits {info:04X} in WAL page at {page}: the first page of a segment lacks XLP_LONG_HEADER"
    )]
    MissingLongHeader { page: Lsn, info: u16 },
    #[error(
        "WAL file is from different database system: incorrect segment size {got} in page header at {page}, expected {expected}"
    )]
    WrongSegmentSize { page: Lsn, got: u32, expected: u32 },
    #[error(
        "WAL file is from different database system: incorrect XLOG_BLCKSZ {got} in page header at {page}, expected {expected}"
    )]
    WrongPageSize { page: Lsn, got: u32, expected: u32 },
    #[error(
        "WAL file is from different database system: WAL file database system identifier is {got}, expected {expected} (page at {page})"
    )]
    WrongSystemIdentifier { page: Lsn, got: u64, expected: u64 },
    /// `xlp_pageaddr` is not the page's own position: typically a recycled segment whose pages
    /// have not been overwritten yet (end of WAL).
    #[error("unexpected pageaddr {pageaddr} in WAL page at {page}")]
    UnexpectedPageAddr { page: Lsn, pageaddr: Lsn },
    #[error("out-of-sequence timeline ID {tli} (after {prev_tli}) in WAL page at {page}")]
    TimelineWentBackwards { page: Lsn, tli: u32, prev_tli: u32 },

    // ---- record framing (XLogDecodeNextRecord, ValidXLogRecordHeader, ValidXLogRecord) ----
    #[error("invalid record offset at {lsn}: expected at least {expected}, got {got}")]
    InvalidRecordOffset { lsn: Lsn, expected: u32, got: u32 },
    /// Positions this close to 2^64 leave no room for a record and what follows it.
    #[error("WAL position {lsn} is too close to the end of the 64-bit LSN space")]
    LsnOutOfRange { lsn: Lsn },
    /// The start position is not where a record can begin (records are 8-byte aligned).
    #[error("invalid start position {lsn}: WAL records start at 8-byte aligned positions")]
    MisalignedStart { lsn: Lsn },
    #[error("contrecord is requested by {lsn}")]
    ContrecordRequested { lsn: Lsn },
    /// `xl_tot_len` smaller than a record header; zero where WAL ends in a zeroed page.
    #[error("invalid record length at {lsn}: wanted 24, got {got}")]
    InvalidRecordLength { lsn: Lsn, got: u32 },
    #[error("record length {len} at {lsn} too long")]
    RecordTooLong { lsn: Lsn, len: u32 },
    #[error("invalid resource manager ID {rmid} at {lsn}")]
    InvalidRmgrId { lsn: Lsn, rmid: u8 },
    #[error("record with incorrect prev-link {prev} at {lsn}")]
    IncorrectPrevLink { lsn: Lsn, prev: Lsn },
    #[error("there is no contrecord flag at {page} (record at {lsn})")]
    NoContrecordFlag { lsn: Lsn, page: Lsn },
    #[error(
        "invalid contrecord length {rem_len} (expected {expected}) at {page} (record at {lsn})"
    )]
    InvalidContrecordLength {
        lsn: Lsn,
        page: Lsn,
        rem_len: u32,
        expected: u64,
    },
    #[error("incorrect resource manager data checksum in record at {lsn}")]
    CrcMismatch {
        lsn: Lsn,
        stored: u32,
        computed: u32,
    },
    /// A page said the record before it was abandoned (`XLP_FIRST_IS_OVERWRITE_CONTRECORD`) but
    /// the record found there is not the XLOG OVERWRITE_CONTRECORD that must follow.
    #[error(
        "record at {lsn} follows a page flagged XLP_FIRST_IS_OVERWRITE_CONTRECORD but is not an OVERWRITE_CONTRECORD record for the abandoned record at {aborted}"
    )]
    BadOverwriteContrecord { lsn: Lsn, aborted: Lsn },

    // ---- record body (DecodeXLogRecord) ----
    #[error("record with invalid length at {lsn}")]
    InvalidLength { lsn: Lsn },
    #[error("out-of-order block_id {block_id} at {lsn}")]
    OutOfOrderBlockId { lsn: Lsn, block_id: u8 },
    #[error("invalid block_id {block_id} at {lsn}")]
    InvalidBlockId { lsn: Lsn, block_id: u8 },
    #[error("BKPBLOCK_HAS_DATA set, but no data included at {lsn}")]
    HasDataWithoutData { lsn: Lsn },
    #[error("BKPBLOCK_HAS_DATA not set, but data length is {len} at {lsn}")]
    DataWithoutHasData { lsn: Lsn, len: u16 },
    #[error(
        "BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length {hole_length} block image length {bimg_len} at {lsn}"
    )]
    ImageHoleInvalid {
        lsn: Lsn,
        hole_offset: u16,
        hole_length: u16,
        bimg_len: u16,
    },
    #[error(
        "BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset} length {hole_length} at {lsn}"
    )]
    ImageNoHoleInvalid {
        lsn: Lsn,
        hole_offset: u16,
        hole_length: u16,
    },
    #[error("BKPIMAGE_COMPRESSED set, but block image length {bimg_len} at {lsn}")]
    ImageCompressedFullLength { lsn: Lsn, bimg_len: u16 },
    #[error(
        "neither BKPIMAGE_HAS_HOLE nor BKPIMAGE_COMPRESSED set, but block image length is {bimg_len} at {lsn}"
    )]
    ImageWrongLength { lsn: Lsn, bimg_len: u16 },
    #[error("BKPBLOCK_SAME_REL set but no previous rel at {lsn}")]
    SameRelWithoutPrevious { lsn: Lsn },
    /// The main data of a record this decoder interprets (checkpoint, storage, database,
    /// transaction, relmap) does not have the layout its type requires.
    #[error("malformed {rmgr} {record_type} record at {lsn}: {what}")]
    MalformedRecord {
        lsn: Lsn,
        rmgr: &'static str,
        record_type: &'static str,
        what: String,
    },

    // ---- meaning ----
    /// pg_rewind's rule: a record flagged `XLR_SPECIAL_REL_UPDATE` changes relation files in a
    /// way block references do not describe; one whose type is not known cannot be handled.
    /// Unlike the other errors this one does not stop the decoder: polling again continues
    /// after the record.
    #[error(
        "WAL record modifies a relation, but record type is not recognized: lsn: {lsn}, rmid: {rmid}, rmgr: {rmgr}, info: {info:02X}"
    )]
    UnrecognizedRelUpdate {
        lsn: Lsn,
        rmid: u8,
        rmgr: &'static str,
        info: u8,
    },
}

/// What magic a page was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MagicExpectation {
    /// The configured major version's `XLOG_PAGE_MAGIC`.
    Magic(u16),
    /// Any supported version's (the decoder was asked to detect the version).
    AnySupported,
}

impl std::fmt::Display for MagicExpectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MagicExpectation::Magic(m) => write!(f, "{m:04X}"),
            MagicExpectation::AnySupported => f.write_str("the magic of PostgreSQL 13 to 18"),
        }
    }
}

impl WalError {
    /// The LSN the error is about: a page start for page-header errors, a record start otherwise.
    pub fn lsn(&self) -> Lsn {
        use WalError::*;
        match self {
            InvalidMagic { page, .. }
            | InvalidInfoBits { page, .. }
            | MissingLongHeader { page, .. }
            | WrongSegmentSize { page, .. }
            | WrongPageSize { page, .. }
            | WrongSystemIdentifier { page, .. }
            | UnexpectedPageAddr { page, .. }
            | TimelineWentBackwards { page, .. } => *page,
            InvalidRecordOffset { lsn, .. }
            | MisalignedStart { lsn }
            | LsnOutOfRange { lsn }
            | ContrecordRequested { lsn }
            | InvalidRecordLength { lsn, .. }
            | RecordTooLong { lsn, .. }
            | InvalidRmgrId { lsn, .. }
            | IncorrectPrevLink { lsn, .. }
            | NoContrecordFlag { lsn, .. }
            | InvalidContrecordLength { lsn, .. }
            | CrcMismatch { lsn, .. }
            | BadOverwriteContrecord { lsn, .. }
            | InvalidLength { lsn }
            | OutOfOrderBlockId { lsn, .. }
            | InvalidBlockId { lsn, .. }
            | HasDataWithoutData { lsn }
            | DataWithoutHasData { lsn, .. }
            | ImageHoleInvalid { lsn, .. }
            | ImageNoHoleInvalid { lsn, .. }
            | ImageCompressedFullLength { lsn, .. }
            | ImageWrongLength { lsn, .. }
            | SameRelWithoutPrevious { lsn }
            | MalformedRecord { lsn, .. }
            | UnrecognizedRelUpdate { lsn, .. } => *lsn,
        }
    }

    /// Whether this is how WAL normally ends: a page never written (magic 0), a recycled segment
    /// (a page that carries another position), a record header that cannot be one (zeros where
    /// the next record would be, or stale bytes of a torn page), a record whose checksum does not
    /// hold (the last record torn by a crash), a continuation that never arrived, or a stale
    /// record whose prev-link does not match.
    ///
    /// Everything else is a different database system, a different version, or corruption in
    /// WAL that is otherwise intact.
    pub fn is_end_of_wal(&self) -> bool {
        use WalError::*;
        match self {
            InvalidMagic { magic, .. } => *magic == 0,
            UnexpectedPageAddr { .. }
            | InvalidRecordLength { .. }
            | RecordTooLong { .. }
            | InvalidRmgrId { .. }
            | CrcMismatch { .. }
            | NoContrecordFlag { .. }
            | InvalidContrecordLength { .. }
            | IncorrectPrevLink { .. } => true,
            _ => false,
        }
    }

    /// Whether the decoder stops at this error (every later poll returns it again). Only
    /// [`WalError::UnrecognizedRelUpdate`] lets decoding go on past the record.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, WalError::UnrecognizedRelUpdate { .. })
    }
}

/// Parameters a [`crate::wal::WalDecoder`] cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalParamsError {
    #[error("invalid WAL segment size {0}: must be a power of two from 1 MiB to 1 GiB")]
    SegmentSize(u32),
    #[error("invalid XLOG_BLCKSZ {0}: must be a power of two from 1 kB to 64 kB")]
    PageSize(u32),
    #[error("invalid BLCKSZ {0}: must be a power of two from 1 kB to 32 kB")]
    BlockSize(u32),
}
