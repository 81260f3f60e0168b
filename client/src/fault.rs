//! Fault injection for the crash tests.
//!
//! `FAILBACK_FAULT=kill-at=POINT:N` makes failback kill itself with SIGKILL — as a crash, an
//! OOM kill or a lost machine would stop it, with no chance to clean up — when it passes POINT
//! for the N-th time:
//!
//! - `scan`: a record of the target's WAL decoded (before anything is changed);
//! - `bytes`: N bytes written to the target's files (the copy; `kill-after-bytes=N` is the
//!   same);
//! - `sync`: a file flushed to disk (by the copy's periodic flushes or the final sync);
//! - `commit`: a step of the commit made durable, in order: 1 the journal says "copied",
//!   2 `backup_label`, 3 `global/pg_control`, 4 the journal says "committed", 5
//!   `standby.signal` (with `-R`), 6 `postgresql.auto.conf` without the marker, 7 the journal
//!   removed.
//!
//! `FAILBACK_FAULT=slow-scan=MS` instead holds the end of the target's WAL scan back MS
//! milliseconds, as a slow disk would: the tests of what overlaps the scan see it overlap.
//!
//! The variable is read once; without it every call is one relaxed load. The hook is test-only
//! code: it is compiled in with the `fault-injection` feature, which the test bed turns on for the
//! binaries cargo builds for the tests, and a shipped `failback` (`cargo build --release -p
//! failback-client`) has no such feature, so [`passed`] does nothing there.

/// A place where a crash is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    Scan,
    Bytes,
    Sync,
    Commit,
}

#[cfg(feature = "fault-injection")]
impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::Scan => "scan",
            Point::Bytes => "bytes",
            Point::Sync => "sync",
            Point::Commit => "commit",
        }
    }
}

#[cfg(feature = "fault-injection")]
fn armed() -> Option<(&'static str, u64)> {
    use std::sync::OnceLock;
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    AT.get_or_init(|| {
        let v = std::env::var("FAILBACK_FAULT").ok()?;
        if let Some(ms) = v.strip_prefix("slow-scan=") {
            return Some(("slow-scan".to_string(), ms.parse().ok()?));
        }
        if let Some(n) = v.strip_prefix("kill-after-bytes=") {
            return Some(("bytes".to_string(), n.parse().ok()?));
        }
        let (point, n) = v.strip_prefix("kill-at=")?.split_once(':')?;
        Some((point.to_string(), n.parse().ok()?))
    })
    .as_ref()
    .map(|(p, n)| (p.as_str(), *n))
}

/// How often each point was passed, in [`Point`]'s order.
#[cfg(feature = "fault-injection")]
static COUNTS: [std::sync::atomic::AtomicU64; 4] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4];

/// `point` was passed `times` more times (bytes: `times` more bytes written).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn passed(_point: Point, _times: u64) {}

/// `point` was passed `times` more times (bytes: `times` more bytes written).
#[cfg(feature = "fault-injection")]
pub fn passed(point: Point, times: u64) {
    use std::sync::atomic::Ordering;
    let Some((name, at)) = armed() else {
        return;
    };
    if name != point.name() {
        return;
    }
    let total = COUNTS[point as usize].fetch_add(times, Ordering::Relaxed) + times;
    if total >= at {
        // SAFETY: raising a signal on our own process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// The target's WAL scan has ended: held back here under `slow-scan=MS`.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn scan_ended() {}

/// The target's WAL scan has ended: held back here under `slow-scan=MS`.
#[cfg(feature = "fault-injection")]
pub fn scan_ended() {
    if let Some(("slow-scan", ms)) = armed() {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
