//! The WAL summarizer: a thread beside the service that keeps the data directory's
//! [`WalSummaries`] up to date, so that a rewind asking what the source changed since the
//! divergence is answered from summaries of whole segments, and decodes only the partial ones
//! at the two ends (what a summary is: [`failback_common::summary`]).
//!
//! It looks at `pg_wal` every `interval`, summarizes the segments completed since, and drops
//! the summaries of segments PostgreSQL removed or recycled. The decoder reads several hundred
//! MB of WAL a second on one core, more than a primary sharing the machine writes; when the
//! summarizer lags (start-up, a burst), the segments it has not reached are decoded by the
//! request instead, as they would be without it.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use failback_datadir::DataDir;
use failback_datadir::summaries::WalSummaries;

use crate::log::Level;

/// How often `pg_wal` is looked at.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// The running summarizer; dropping it stops the thread (after the pass under way).
pub struct Summarizer {
    _stop: mpsc::Sender<()>,
}

/// Starts summarizing `dir`'s WAL into `summaries` every `interval`, telling `log` (one line
/// each) when the WAL present at start-up has been summarized (`Info`) and when a pass fails
/// for a new reason (`Warning`).
pub fn spawn(
    dir: DataDir,
    summaries: Arc<WalSummaries>,
    interval: Duration,
    log: impl Fn(Level, &str) + Send + 'static,
) -> Summarizer {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("wal-summarizer".into())
        .spawn(move || {
            let started = Instant::now();
            let mut caught_up = false;
            let mut last_error: Option<String> = None;
            let mut summarized = 0usize;
            loop {
                match summaries.refresh(&dir) {
                    Ok(r) => {
                        summarized += r.summarized;
                        last_error = None;
                        // The first pass summarized every segment completed when it began.
                        if !caught_up {
                            caught_up = true;
                            log(
                                Level::Info,
                                &format!(
                                    "WAL summaries: caught up with pg_wal ({summarized} segments \
                                 summarized in {:.1} s{}); summarizing each segment as it \
                                 completes",
                                    started.elapsed().as_secs_f64(),
                                    r.until.map(|u| format!(", up to {u}")).unwrap_or_default()
                                ),
                            );
                        }
                    }
                    Err(e) => {
                        let msg = failback_common::errors::one_line(&e);
                        if last_error.as_deref() != Some(msg.as_str()) {
                            log(
                                Level::Warning,
                                &format!("WAL summaries: {msg} (rewinds decode the WAL instead)"),
                            );
                            last_error = Some(msg);
                        }
                    }
                }
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        })
        .expect("spawning a thread");
    Summarizer { _stop: stop }
}
