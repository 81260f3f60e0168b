//! Where the rewind reads the new primary's files from.
//!
//! pg_rewind has two sources: a shut-down data directory on the same machine
//! (`--source-pgdata`) and a running server reached over libpq (`--source-server`). failback
//! adds failbackd (`--source grpc://…`, `quic://…`). The rewind engine sees them all through
//! [`Source`]: the control file, timeline history files, the file list, ranges of files at
//! 64-bit offsets, and — for a live source — where its WAL ends once the copy is done.
//!
//! Fetching takes a whole batch of ranges and hands back a [`Fetch`] from which the engine
//! pulls each piece as it arrives, so a remote source can keep many requests in flight on a
//! long link while the engine writes sequentially, and the engine's own errors stay its own. A
//! source never writes anything.

pub mod grpc;
pub mod libpq;
pub mod local;
pub mod quic;
pub mod rate;
pub mod remote;

use failback_common::chunkdiff::{ByteRange, ChunkHash};
use failback_common::filemap::FileEntry;
use failback_common::journal::RangeSet;
pub use failback_common::retries::{RetryCause, RetryCounts, RetryOp};
use failback_common::{Lsn, TimeLineId};
use failback_datadir::wal::CheckpointAt;
use std::collections::BTreeMap;

/// A range of a source file to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRange {
    pub path: String,
    pub offset: u64,
    pub length: u64,
}

impl FetchRange {
    /// Its first `n` bytes (all of it if it is no longer), and the rest if any.
    pub fn cut(self, n: u64) -> (FetchRange, Option<FetchRange>) {
        if self.length <= n {
            return (self, None);
        }
        let rest = FetchRange {
            path: self.path.clone(),
            offset: self.offset.saturating_add(n),
            length: self.length - n,
        };
        (FetchRange { length: n, ..self }, Some(rest))
    }
}

/// The bytes `ranges` cover, as a set per path.
pub fn range_sets(ranges: &[FetchRange]) -> BTreeMap<String, RangeSet> {
    let mut sets: BTreeMap<String, RangeSet> = BTreeMap::new();
    for r in ranges {
        sets.entry(r.path.clone())
            .or_default()
            .insert(r.offset, r.length);
    }
    sets
}

/// `ranges` without the bytes `have` holds of their files, and how many bytes that left out.
pub fn without(
    ranges: Vec<FetchRange>,
    have: &BTreeMap<String, RangeSet>,
) -> (Vec<FetchRange>, u64) {
    let mut left = Vec::with_capacity(ranges.len());
    let mut held = 0;
    for r in ranges {
        let Some(set) = have.get(&r.path) else {
            left.push(r);
            continue;
        };
        let missing = set.missing(r.offset, r.length);
        held += r.length - missing.iter().map(|(_, l)| l).sum::<u64>();
        left.extend(missing.into_iter().map(|(offset, length)| FetchRange {
            path: r.path.clone(),
            offset,
            length,
        }));
    }
    (left, held)
}

/// What the source had for (part of) a requested range.
#[derive(Debug)]
pub enum Fetched<'a> {
    /// Bytes at `offset` of `path`, verified when the transport carries a hash.
    Data {
        path: &'a str,
        offset: u64,
        data: &'a [u8],
    },
    /// The file ended at `size` before the requested range did (it shrank, or the source is
    /// live and the listing is older than the read).
    Short { path: &'a str, size: u64 },
    /// The file is gone from the source.
    Vanished { path: &'a str },
}

/// The pieces of one fetch, pulled one at a time.
pub trait Fetch {
    /// The next piece; `None` once every range has been answered. The piece borrows from the
    /// fetch, so it is used before the next one is asked for.
    fn next(&mut self) -> Result<Option<Fetched<'_>>, SourceError>;
}

/// Every piece of one range, concatenated (small files, tests): `None` when the file vanished.
pub fn fetch_whole(
    source: &mut dyn Source,
    range: FetchRange,
) -> Result<Option<Vec<u8>>, SourceError> {
    let mut out = Vec::new();
    let mut fetch = source.fetch(vec![range])?;
    while let Some(piece) = fetch.next()? {
        match piece {
            Fetched::Data { data, .. } => out.extend_from_slice(data),
            Fetched::Short { .. } => {}
            Fetched::Vanished { .. } => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// The source's end of WAL once the copy is done: where the rewound target must replay to
/// before it is consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceEnd {
    pub lsn: Lsn,
    pub tli: TimeLineId,
}

/// Hashes of fixed-size chunks of one source file (see [`failback_common::chunkdiff`]), as
/// the source read it just now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHashes {
    pub path: String,
    /// The size hashed: a live source's file may have changed since it was listed.
    pub size: u64,
    pub hashes: Vec<[u8; 32]>,
    /// The file no longer exists on the source.
    pub vanished: bool,
    /// The function the hashes were made with (failbackd: blake3; a server over libpq:
    /// SHA-256): the target hashes its chunks with the same.
    pub algorithm: ChunkHash,
}

/// What a source says it changed since the divergence ([`Source::changes`]).
#[derive(Debug)]
pub enum ChangesAnswer {
    /// Its own WAL says.
    Found(SourceChanges),
    /// It cannot say, and why (its WAL since then is gone; it cannot read WAL): the changes
    /// are then found by comparing the two sides' chunk hashes.
    Unknown { why: String },
}

pub use failback_datadir::wal::SourceChanges;

/// A backup window on a running source, as it opened ([`Source::open_window`]): replaying the
/// source's WAL from `start` makes what is copied inside the window consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowStart {
    pub start: Lsn,
    pub tli: TimeLineId,
}

/// What closing a backup window says ([`Source::close_window`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowEnd {
    /// Replay of the copy must reach this far before it is consistent.
    pub stop: Lsn,
    pub tli: TimeLineId,
    /// The copy's `backup_label`. The backup's `tablespace_map` is left out on purpose: it
    /// names the *source's* tablespace directories, and PostgreSQL, starting on a label with
    /// a map beside it, re-points every `pg_tblspc` link at the map's directory. A rewound
    /// target keeps its own links, as pg_rewind leaves them; on one host the map would have
    /// made the target write into the source's tablespaces.
    pub backup_label: String,
}

/// A question the engine is about to ask (see [`Source::ask_ahead`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    ControlFile,
    /// The end of the backup window [`Source::open_window`] opened ([`Source::close_window`]):
    /// asked beside the commit's reads of the source, so that over a long link closing the
    /// window costs no round trip of its own.
    CloseWindow,
    EndOfWal,
}

/// Why the source could not answer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source refused {what}: {reason}")]
    Refused { what: String, reason: String },
    #[error("source I/O error on {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("source did not answer in time: {0}")]
    Timeout(String),
    #[error("source transport error: {0}")]
    Transport(String),
    /// The connection broke under a call (reset, closed, a reply stream cut short).
    #[error("source connection lost: {0}")]
    Lost(String),
    /// The source could not be reached, or said it cannot serve now (refusing connections,
    /// shutting down, restarting).
    #[error("source unavailable: {0}")]
    Unavailable(String),
    /// failbackd answered against the protocol (a chunk nobody asked for, data that failed its
    /// hash twice): asking again would not help.
    #[error("source broke the protocol: {0}")]
    Protocol(String),
    /// Failures that could heal did not within `--timeout`.
    #[error(
        "source made no progress for {:.1} s ({attempts} attempts, --timeout {} s)",
        stalled.as_secs_f64(),
        timeout.as_secs()
    )]
    Stalled {
        stalled: std::time::Duration,
        attempts: u32,
        timeout: std::time::Duration,
        #[source]
        last: Box<SourceError>,
    },
    /// A file of a shut-down source changed between the listing and the copy: something is
    /// writing into a data directory that should be still.
    #[error(
        "size of source file \"{path}\" changed concurrently (listed with {listed} bytes, now \
         {now}): something is writing into the source data directory; make sure no server runs \
         on it, then run failback again"
    )]
    ChangedConcurrently { path: String, listed: u64, now: u64 },
}

impl SourceError {
    /// Whether trying again can help (a stalled or broken link can heal; a refusal will not).
    pub fn is_retryable(&self) -> bool {
        self.retry_cause().is_some()
    }

    /// Why a retry of what failed this way is made, for the retry counts; `None` when it is
    /// not retried. A stall reports its last failure's cause.
    pub fn retry_cause(&self) -> Option<RetryCause> {
        match self {
            SourceError::Timeout(_) => Some(RetryCause::Timeout),
            SourceError::Transport(_) => Some(RetryCause::Transport),
            SourceError::Lost(_) => Some(RetryCause::ConnectionLost),
            SourceError::Unavailable(_) => Some(RetryCause::Unavailable),
            SourceError::Stalled { last, .. } => {
                Some(last.retry_cause().unwrap_or(RetryCause::Transport))
            }
            _ => None,
        }
    }
}

/// A source's retries so far ([`RetryCounts`]), shared by the threads and tasks that retry and
/// whoever reports them: the engine reads it while a fetch is running.
#[derive(Clone, Debug, Default)]
pub struct RetryLog(std::sync::Arc<std::sync::Mutex<RetryCounts>>);

impl RetryLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, RetryCounts> {
        // Counting never panics half-way; a poisoned lock still holds whole counts.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more retry, for `cause`, while doing `op`.
    pub fn retried(&self, cause: RetryCause, op: RetryOp) {
        self.lock().retried(cause, op);
    }

    /// A call or batch went on after `stalled` without progress.
    pub fn recovered(&self, stalled: std::time::Duration) {
        self.lock().recovered(stalled);
    }

    /// The counts now.
    pub fn snapshot(&self) -> RetryCounts {
        self.lock().clone()
    }

    /// The number of retries now (cheaper than a snapshot).
    pub fn total(&self) -> u64 {
        self.lock().total
    }
}

/// A place to rewind from.
pub trait Source {
    /// A short description for messages: the directory or URL.
    fn describe(&self) -> String;

    /// `global/pg_control`, 8192 bytes.
    fn control_file(&mut self) -> Result<Vec<u8>, SourceError>;

    /// A small file in whole (timeline history files); `None` when it does not exist.
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, SourceError>;

    /// Every entry of the data directory and its tablespaces.
    fn list_files(&mut self) -> Result<Vec<FileEntry>, SourceError>;

    /// Starts fetching every range; the pieces are pulled from the [`Fetch`] as they arrive
    /// (pieces of one range in order; ranges may interleave). Dropping it stops the fetch.
    fn fetch(&mut self, ranges: Vec<FetchRange>) -> Result<Box<dyn Fetch + '_>, SourceError>;

    /// Ranges the next [`fetch`](Source::fetch) will most likely ask for, known before it can
    /// be made: the source's changed blocks, known while the target's WAL is still being read.
    /// A remote source may start asking for them now, so that the link works while the target's
    /// disk is read. The next fetch then hands over what came of them as far as its own ranges
    /// hold it (a piece the plan turned out not to want is dropped) and asks only for the rest.
    /// Nothing is written anywhere until that fetch.
    fn fetch_ahead(&mut self, ranges: Vec<FetchRange>) {
        let _ = ranges;
    }

    /// Bytes fetched ahead that had arrived when the fetch that took them up began.
    fn fetched_ahead(&self) -> u64 {
        0
    }

    /// Whether a PostgreSQL server is running on the source (its files change under us).
    fn is_live(&self) -> bool;

    /// How the source's replies are compressed, and why (`--compress auto`'s probes), for the
    /// report; `None` where nothing is compressed.
    fn compression(&self) -> Option<String> {
        None
    }

    /// The retries this source rode out so far, kept as they happen (a source that never
    /// retries keeps none).
    fn retries(&self) -> RetryLog {
        RetryLog::default()
    }

    /// For a live source, the server's current end of WAL (insert position on a primary,
    /// replay position on a standby). `None` for a shut-down data directory, whose end is its
    /// control file's checkpoint.
    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError>;

    /// How a standby of the source reaches it (libpq keywords), when the source knows: what
    /// `-R` writes unless `--primary-conninfo` is given.
    fn primary_conninfo(&self) -> Option<String> {
        None
    }

    /// The source's current timeline when it knows better than its control file (right after
    /// a promotion, `checkPointCopy.ThisTimeLineID` names the old timeline until the first
    /// checkpoint); `None` to go by the control file.
    fn current_timeline(&mut self) -> Result<Option<TimeLineId>, SourceError> {
        Ok(None)
    }

    /// The engine will ask these next, in some order, with other calls in between: a remote
    /// source may send them now, all together, so that they cost one round trip.
    fn ask_ahead(&mut self, asks: &[Ask]) {
        let _ = asks;
    }

    /// What the source's own WAL says it changed from `since` (where the two histories part) up
    /// to its end of WAL (a running source's end now; at most `until` when given).
    fn changes(&mut self, since: Lsn, until: Option<Lsn>) -> Result<ChangesAnswer, SourceError> {
        let _ = (since, until);
        Ok(ChangesAnswer::Unknown {
            why: "this source cannot read its WAL".into(),
        })
    }

    /// Opens a backup window on a running source (see failbackd's `window` module), labelled
    /// `label`; `None` for a shut-down source, which is consistent as it is. The window lasts
    /// until [`Source::close_window`], or until the source is dropped; the WAL written during it
    /// stays in the source's `pg_wal` until the source is dropped.
    fn open_window(&mut self, label: &str) -> Result<Option<WindowStart>, SourceError> {
        let _ = label;
        if self.is_live() {
            return Err(SourceError::Refused {
                what: "a backup window".into(),
                reason: "this source is running but cannot hold a backup window".into(),
            });
        }
        Ok(None)
    }

    /// Whether the rewound node should replay this source's WAL since the divergence, copied
    /// whole as pg_rewind has it replayed, rather than be given the blocks that WAL changed:
    /// so where naming those blocks would read that same WAL over the link first (a plain
    /// libpq server without WAL summaries). Sources that read their WAL beside it say no.
    fn replays_own_wal(&mut self) -> Result<bool, SourceError> {
        Ok(false)
    }

    /// For a source that [`Source::replays_own_wal`]: a window that starts at `from`, a
    /// checkpoint both histories share (the last before they part, read from the target's WAL),
    /// so that replay of the copy begins there and redoes everything the source wrote since.
    /// Also says how far the source's WAL is flushed now: the segments wholly before that are
    /// final, and are copied with the rest of the plan. Closed by [`Source::close_window`].
    fn open_window_at(&mut self, from: CheckpointAt) -> Result<(WindowStart, Lsn), SourceError> {
        let _ = from;
        Err(SourceError::Refused {
            what: "a backup window".into(),
            reason: "this source cannot replay its WAL from a shared checkpoint".into(),
        })
    }

    /// Closes the window [`Source::open_window`] opened.
    fn close_window(&mut self) -> Result<WindowEnd, SourceError> {
        Err(SourceError::Refused {
            what: "a backup window".into(),
            reason: "no backup window is open".into(),
        })
    }

    /// The function [`Source::chunk_hashes`] hashes with, known before asking, so that the
    /// target hashes its own chunks with it while the source hashes.
    fn chunk_hash_algorithm(&self) -> ChunkHash {
        ChunkHash::Blake3
    }

    /// Hashes of `chunk_size`-byte chunks of each path, in the order asked, so that only
    /// the chunks the target lacks are fetched; `None` when the source cannot hash (then whole
    /// files are fetched). Worth it only where reading costs less than sending.
    fn chunk_hashes(
        &mut self,
        paths: &[String],
        chunk_size: u64,
    ) -> Result<Option<Vec<FileHashes>>, SourceError> {
        let _ = (paths, chunk_size);
        Ok(None)
    }

    /// Whether [`Source::range_hashes`] answers: a comparison page by page then goes a
    /// mebibyte at a time first, and page by page only where those differ.
    fn hashes_ranges(&self) -> bool {
        false
    }

    /// [`Source::chunk_hashes`] of only the chunks within byte ranges, one list of ranges per
    /// path (a path may come more than once), each range's chunks starting at its offset and
    /// cut at its end and at the file's (as [`chunkdiff::chunks_within`] counts them); the
    /// answers in the order asked. `None` when the source cannot.
    ///
    /// [`chunkdiff::chunks_within`]: failback_common::chunkdiff::chunks_within
    fn range_hashes(
        &mut self,
        asks: &[(String, Vec<ByteRange>)],
        chunk_size: u64,
    ) -> Result<Option<Vec<FileHashes>>, SourceError> {
        let _ = (asks, chunk_size);
        Ok(None)
    }
}

/// A boxed source is a source (the CLI picks one at run time and may wrap it).
impl<S: Source + ?Sized> Source for Box<S> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn control_file(&mut self) -> Result<Vec<u8>, SourceError> {
        (**self).control_file()
    }
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        (**self).read_file(path)
    }
    fn list_files(&mut self) -> Result<Vec<FileEntry>, SourceError> {
        (**self).list_files()
    }
    fn fetch(&mut self, ranges: Vec<FetchRange>) -> Result<Box<dyn Fetch + '_>, SourceError> {
        (**self).fetch(ranges)
    }
    fn fetch_ahead(&mut self, ranges: Vec<FetchRange>) {
        (**self).fetch_ahead(ranges)
    }
    fn fetched_ahead(&self) -> u64 {
        (**self).fetched_ahead()
    }
    fn is_live(&self) -> bool {
        (**self).is_live()
    }
    fn compression(&self) -> Option<String> {
        (**self).compression()
    }
    fn retries(&self) -> RetryLog {
        (**self).retries()
    }
    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError> {
        (**self).end_of_wal()
    }
    fn current_timeline(&mut self) -> Result<Option<TimeLineId>, SourceError> {
        (**self).current_timeline()
    }
    fn primary_conninfo(&self) -> Option<String> {
        (**self).primary_conninfo()
    }
    fn ask_ahead(&mut self, asks: &[Ask]) {
        (**self).ask_ahead(asks)
    }
    fn chunk_hash_algorithm(&self) -> ChunkHash {
        (**self).chunk_hash_algorithm()
    }
    fn chunk_hashes(
        &mut self,
        paths: &[String],
        chunk_size: u64,
    ) -> Result<Option<Vec<FileHashes>>, SourceError> {
        (**self).chunk_hashes(paths, chunk_size)
    }
    fn hashes_ranges(&self) -> bool {
        (**self).hashes_ranges()
    }
    fn range_hashes(
        &mut self,
        asks: &[(String, Vec<ByteRange>)],
        chunk_size: u64,
    ) -> Result<Option<Vec<FileHashes>>, SourceError> {
        (**self).range_hashes(asks, chunk_size)
    }
    fn changes(&mut self, since: Lsn, until: Option<Lsn>) -> Result<ChangesAnswer, SourceError> {
        (**self).changes(since, until)
    }
    fn open_window(&mut self, label: &str) -> Result<Option<WindowStart>, SourceError> {
        (**self).open_window(label)
    }
    fn close_window(&mut self) -> Result<WindowEnd, SourceError> {
        (**self).close_window()
    }
    fn replays_own_wal(&mut self) -> Result<bool, SourceError> {
        (**self).replays_own_wal()
    }
    fn open_window_at(&mut self, from: CheckpointAt) -> Result<(WindowStart, Lsn), SourceError> {
        (**self).open_window_at(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_can_heal_is_retried_for_its_cause() {
        let cause = |e: SourceError| (e.is_retryable(), e.retry_cause());
        assert_eq!(
            cause(SourceError::Lost("x".into())),
            (true, Some(RetryCause::ConnectionLost))
        );
        assert_eq!(
            cause(SourceError::Unavailable("x".into())),
            (true, Some(RetryCause::Unavailable))
        );
        assert_eq!(
            cause(SourceError::Timeout("x".into())),
            (true, Some(RetryCause::Timeout))
        );
        assert_eq!(
            cause(SourceError::Transport("x".into())),
            (true, Some(RetryCause::Transport))
        );
        assert_eq!(
            cause(SourceError::Stalled {
                stalled: std::time::Duration::from_secs(9),
                attempts: 4,
                timeout: std::time::Duration::from_secs(8),
                last: Box::new(SourceError::Unavailable("x".into())),
            }),
            (true, Some(RetryCause::Unavailable))
        );
        assert_eq!(cause(SourceError::Protocol("x".into())), (false, None));
        assert_eq!(
            cause(SourceError::Refused {
                what: "x".into(),
                reason: "y".into()
            }),
            (false, None)
        );
    }

    #[test]
    fn a_log_is_shared_by_its_clones() {
        let log = RetryLog::default();
        let other = log.clone();
        other.retried(RetryCause::Checksum, RetryOp::Fetch);
        other.recovered(std::time::Duration::from_millis(20));
        assert_eq!(log.total(), 1);
        assert_eq!(log.snapshot().count(RetryCause::Checksum), 1);
        assert_eq!(
            log.snapshot().longest_stall,
            std::time::Duration::from_millis(20)
        );
    }
}
