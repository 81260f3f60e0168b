//! `--max-rate`: any source, held to an average rate.
//!
//! The limit sits between the source and the writer: every piece a fetch delivers is paid for
//! in a [`TokenBucket`] before the sink sees it, and the fetch waits when the bucket is in
//! debt. A remote source's read-ahead is bounded (a few pieces per stream), so holding back
//! the sink holds back the link too, whatever the transport (gRPC, QUIC) or the source. The
//! bytes counted are the raw file bytes; compressed bytes on the wire are fewer, never more
//! (but for framing). A fetch begun ahead of the plan ([`Source::fetch_ahead`]) is not passed
//! on: what it brings would arrive unpaced, before the sink could pay for it.

use std::time::{Duration, Instant};

use failback_common::ratelimit::TokenBucket;
use failback_common::{TimeLineId, filemap::FileEntry};

use super::{Fetch, FetchRange, Fetched, FileHashes, Source, SourceEnd, SourceError};

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

    fn compression(&self) -> Option<String> {
        self.inner.compression()
    }

    fn retries(&self) -> super::RetryLog {
        self.inner.retries()
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

    fn fetch(&mut self, ranges: Vec<FetchRange>) -> Result<Box<dyn Fetch + '_>, SourceError> {
        let RateLimited {
            inner,
            bucket,
            origin,
            waited,
        } = self;
        Ok(Box::new(RateFetch {
            inner: inner.fetch(ranges)?,
            bucket,
            origin: *origin,
            waited,
        }))
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

    fn primary_conninfo(&self) -> Option<String> {
        self.inner.primary_conninfo()
    }

    fn ask_ahead(&mut self, asks: &[super::Ask]) {
        self.inner.ask_ahead(asks)
    }

    fn chunk_hash_algorithm(&self) -> failback_common::chunkdiff::ChunkHash {
        self.inner.chunk_hash_algorithm()
    }

    fn chunk_hashes(
        &mut self,
        paths: &[String],
        chunk_size: u64,
    ) -> Result<Option<Vec<FileHashes>>, SourceError> {
        self.inner.chunk_hashes(paths, chunk_size)
    }

    fn hashes_ranges(&self) -> bool {
        self.inner.hashes_ranges()
    }

    fn range_hashes(
        &mut self,
        asks: &[(String, Vec<failback_common::chunkdiff::ByteRange>)],
        chunk_size: u64,
    ) -> Result<Option<Vec<FileHashes>>, SourceError> {
        self.inner.range_hashes(asks, chunk_size)
    }

    fn changes(
        &mut self,
        since: failback_common::Lsn,
        until: Option<failback_common::Lsn>,
    ) -> Result<super::ChangesAnswer, SourceError> {
        self.inner.changes(since, until)
    }

    fn open_window(&mut self, label: &str) -> Result<Option<super::WindowStart>, SourceError> {
        self.inner.open_window(label)
    }

    fn close_window(&mut self) -> Result<super::WindowEnd, SourceError> {
        self.inner.close_window()
    }

    fn replays_own_wal(&mut self) -> Result<bool, SourceError> {
        self.inner.replays_own_wal()
    }

    fn open_window_at(
        &mut self,
        from: failback_datadir::wal::CheckpointAt,
    ) -> Result<(super::WindowStart, failback_common::Lsn), SourceError> {
        self.inner.open_window_at(from)
    }
}

/// A fetch whose pieces are each paid for before they are handed on.
struct RateFetch<'s> {
    inner: Box<dyn Fetch + 's>,
    bucket: &'s mut TokenBucket,
    origin: Instant,
    waited: &'s mut Duration,
}

impl Fetch for RateFetch<'_> {
    fn next(&mut self) -> Result<Option<Fetched<'_>>, SourceError> {
        let RateFetch {
            inner,
            bucket,
            origin,
            waited,
        } = self;
        let piece = inner.next()?;
        if let Some(Fetched::Data { data, .. }) = &piece {
            let now = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let wait = bucket.take(data.len() as u64, now);
            if wait > 0 {
                let d = Duration::from_nanos(wait);
                std::thread::sleep(d);
                **waited += d;
            }
        }
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::local::LocalSource;

    /// The limit holds for a source that is not a network one at all: a local directory, read
    /// at memory speed, delivered no faster than the rate allows.
    #[test]
    fn a_local_source_is_held_to_the_rate() {
        let dir = std::env::temp_dir().join(format!("fb-rate-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("global")).unwrap();
        let size: u64 = 3 << 20;
        std::fs::write(dir.join("global/big"), vec![7u8; size as usize]).unwrap();
        let rate = 4 << 20;
        let mut src = RateLimited::new(LocalSource::new(&dir), rate).unwrap();
        let t0 = Instant::now();
        let got = crate::source::fetch_whole(
            &mut src,
            FetchRange {
                path: "global/big".into(),
                offset: 0,
                length: size,
            },
        )
        .unwrap()
        .unwrap()
        .len() as u64;
        let elapsed = t0.elapsed().as_secs_f64();
        assert_eq!(got, size);
        let floor = (size - TokenBucket::default_burst(rate)) as f64 / rate as f64;
        assert!(
            elapsed >= floor,
            "{size} bytes in {elapsed:.3} s at {rate} B/s"
        );
        assert!(src.waited() > Duration::ZERO);
        assert!(RateLimited::new(LocalSource::new(&dir), 0).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
