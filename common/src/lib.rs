//! failback-common: everything failback knows about PostgreSQL, as pure code over bytes.
//!
//! Nothing here opens a socket, reads a clock or touches a file on its own: callers hand in
//! bytes and get back values, "need more", or an error that says what is wrong and where.
//! That is what lets the decoder, the planner and the journal be tested in microseconds and
//! fed hostile input by property tests and fuzzers.

pub mod build_info;
pub mod changes;
pub mod chunkdiff;
pub mod errors;
pub mod lsn;
pub mod page;
pub mod patience;
pub mod plan;
pub mod ratelimit;
pub mod recovery;
pub mod retries;
pub mod version;

pub use lsn::{Lsn, TimeLineId, XLogSegNo};
pub use version::PgMajor;
pub mod civil;
pub mod compress_choice;
pub mod control;
pub mod filemap;
pub mod journal;
pub mod relpath;
pub mod rewind;
pub mod summary;
pub mod timeline;
pub mod wal;
pub mod wire;
pub use control::{CheckPoint, ControlFileData, ControlFileError, DBState, WalLevel};
pub use relpath::{ForkNumber, RelFileLocator, RelFileSegment};
pub use timeline::{CommonAncestor, HistoryError, TimeLineHistory, TimeLineHistoryEntry};
