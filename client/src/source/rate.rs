//! `--max-rate`: any source, held to an average rate.
//!
//! The limit sits between the source and the writer: every piece a fetch delivers is paid for
//! in a [`TokenBucket`] before the sink sees it, and the fetch waits when the bucket is in
//! debt. A remote source's read-ahead is bounded (a few pieces per stream), so holding back
//! the sink holds back the link too, whatever the transport (gRPC, QUIC) or the source. The
//! bytes counted are the raw file bytes; compressed bytes on the wire are fewer, never more
//! (but for framing).

use std::time::{Duration, Instant};

use failback_common::ratelimit::TokenBucket;
use failback_common::{TimeLineId, filemap::FileEntry};

use super::{FetchRange, Fetched, FileHashes, Source, SourceEnd, SourceError};

pub struct RateLimited<S> {
    inner: S,
    bucket: TokenBucket,
    origin: Instant,
    waited: Duration,
}

impl<S: Source> RateLimited<S> {
    /// `rate` in bytes per second (at least 1), with [`TokenBucket::default_burst`].
    pub fn new(inner: S, rate: u64) -> Option<RateLimited<S>> {
        Some(RateLimited {
            inner,
            bucket: TokenBucket::new(rate, TokenBucket::default_burst(rate), 0)?,
            origin: Instant::now(),
            waited: Duration::ZERO,
        })
    }

    /// How long fetches were held back so far.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl<S: Source> Source for RateLimited<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn control_file(&mut self) -> Result<Vec<u8>, SourceError> {
        self.inner.control_file()
    }

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        self.inner.read_file(path)
    }

    fn list_files(&mut self) -> Result<Vec<FileEntry>, SourceError> {
        self.inner.list_files()
    }

    fn fetch(
        &mut self,
        ranges: &[FetchRange],
        sink: &mut dyn FnMut(Fetched<'_>) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        let RateLimited {
            inner,
            bucket,
            origin,
            waited,
        } = self;
        let origin = *origin;
        let now = || u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        inner.fetch(ranges, &mut |piece| {
            if let Fetched::Data { data, .. } = &piece {
                let wait = bucket.take(data.len() as u64, now());
                if wait > 0 {
                    let d = Duration::from_nanos(wait);
                    std::thread::sleep(d);
                    *waited += d;
                }
            }
            sink(piece)
        })
    }

    fn is_live(&self) -> bool {
        self.inner.is_live()
    }

    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError> {
        self.inner.end_of_wal()
    }

    fn current_timeline(&mut self) -> Result<Option<TimeLineId>, SourceError> {
        self.inner.current_timeline()
    }

    fn chunk_hashes(
        &mut self,
        paths: &[String],
        chunk_size: u64,
    ) -> Result<Option<Vec<FileHashes>>, SourceError> {
        self.inner.chunk_hashes(paths, chunk_size)
    }
}
