//! Decoding PostgreSQL's write-ahead log (13–18).
//!
//! WAL is a sequence of records, each describing a change: the rmgr that wrote it, its type,
//! the pages it touches (block references, optionally with a full-page image), and rmgr-specific
//! main data. Records are packed back to back at 8-byte aligned positions into pages of
//! `XLOG_BLCKSZ` bytes, crossing page and segment boundaries freely; every page starts with a
//! header that says whether its first bytes continue a record from the page before.
//!
//! [`WalDecoder`] is a push decoder over that stream: no IO, no clock. The caller feeds the bytes
//! the decoder asks for and polls for records:
//!
//! ```no_run
//! # use failback_common::{Lsn, PgMajor};
//! # use failback_common::wal::{Decoded, WalDecoder, WalParams};
//! # fn read_wal(_: Lsn) -> Vec<u8> { unimplemented!() }
//! let mut dec = WalDecoder::new(Lsn(0x0100_0028), WalParams::new(PgMajor::V15, 16 << 20)).unwrap();
//! loop {
//!     match dec.poll() {
//!         Ok(Decoded::Record(rec)) => {
//!             for b in rec.blocks {
//!                 println!("{} {} blk {}", rec.lsn, b.locator, b.blkno);
//!             }
//!         }
//!         Ok(Decoded::NeedMore { from }) => {
//!             let bytes = read_wal(from); // from a segment file, at offset from % seg_size
//!             if bytes.is_empty() { break; }
//!             dec.feed(&bytes);
//!         }
//!         Err(e) if e.is_end_of_wal() => { println!("WAL ends: {e}"); break; }
//!         Err(e) => panic!("{e}"),
//!     }
//! }
//! ```
//!
//! Each [`WalRecord`] borrows from the decoder until the next `poll`/`feed`: its header fields,
//! `end_lsn` (PostgreSQL's end pointer), block references ([`BlockRef`]: locator, fork, block,
//! flags, [`BlockImage`] with hole and compression), main data, the raw bytes (without the
//! image bytes of records spanning pages when asked, [`WalDecoder::leave_out_image_bytes`]), and a
//! [`RecordKind`] for the records that change relation files wholesale or mark checkpoints,
//! switches and timeline changes. A record flagged `XLR_SPECIAL_REL_UPDATE` whose kind is not
//! known is reported as [`WalError::UnrecognizedRelUpdate`] (decoding can continue past it).
//! Errors carry their LSN; [`WalError::is_end_of_wal`] separates WAL that simply ends (zeroed
//! page, recycled segment, torn last record) from damage or a wrong configuration.
//!
//! - [`page`]: page headers. [`record`]: the record header, block references and images.
//! - [`rmgr`]: rmgr ids, names and record type names as pg_waldump prints them.
//! - [`kinds`]: the records that create, truncate or drop relation files and databases, end
//!   transactions that drop relations, and mark checkpoints and switches.
//! - [`crc`]: the records' CRC-32C, over page-sized pieces.
//! - [`decoder`]: the state machine. [`error`]: what can go wrong, with the LSN.

pub mod crc;
pub mod decoder;
pub mod error;
pub mod kinds;
pub mod page;
pub mod record;
pub mod rmgr;

pub use decoder::{Decoded, FeedGap, WalDecoder, WalParams, WalRecord, WaldumpLine};
pub use error::{MagicExpectation, WalError, WalParamsError};
pub use kinds::{OidList, RecordKind, RelFileLocatorList, XactFinish, XactOp, XactPrepare};
pub use page::{XLogLongPageHeader, XLogPageHeader, identify_major};
pub use record::{
    BlockImage, BlockRef, IMAGE_BYTES_LEFT_OUT, ImageCompression, RelFileLocator, XLogRecordHeader,
    fork_name,
};
pub use rmgr::{record_type_name, rmgr_name};
