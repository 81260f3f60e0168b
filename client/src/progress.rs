//! Progress reporting as a trait, so the rewind engine never depends on a terminal.

use std::time::Duration;

/// Receives what the engine is doing. Implementations decide how (and whether) to show it.
pub trait Progress {
    /// A new phase begins (`reading WAL in target`, `copying`, ...).
    fn phase(&mut self, name: &str);
    /// The total number of bytes the copy phase will fetch, once known.
    fn total(&mut self, bytes: u64);
    /// `bytes` more were fetched.
    fn advance(&mut self, bytes: u64);
    /// A message for the operator (`servers diverged at ...`).
    fn info(&mut self, line: &str);
    /// A detail line for `--debug`.
    fn debug(&mut self, line: &str);
    /// The source has retried `total` times so far, the latest for `cause` (in words): a
    /// flaky link, shown beside the progress.
    fn retried(&mut self, total: u64, cause: &str) {
        let _ = (total, cause);
    }
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {
    fn phase(&mut self, _: &str) {}
    fn total(&mut self, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn info(&mut self, _: &str) {}
    fn debug(&mut self, _: &str) {}
}

/// Progress for a person: messages on stderr; with `-P`, a progress line redrawn in place on a
/// terminal (bytes, rate, time left) or a plain line at most every few seconds otherwise.
pub struct Terminal {
    pub show_progress: bool,
    pub show_debug: bool,
    is_tty: bool,
    total: u64,
    done: u64,
    started: std::time::Instant,
    last: Option<std::time::Instant>,
    /// The source's retries so far, and the latest one's cause.
    retries: u64,
    last_cause: String,
}

/// The `-P` line: bytes copied of the total, the rate and time left at `elapsed` into the copy,
/// and once the source has retried, how often and why the latest time.
pub fn progress_line(
    done: u64,
    total: u64,
    elapsed: Duration,
    retries: u64,
    last_cause: &str,
) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = done as f64 / secs;
    let left = if rate > 0.0 {
        total.saturating_sub(done) as f64 / rate
    } else {
        0.0
    };
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    let mut line = format!(
        "{}/{} kB ({pct}%) copied, {:.1} MB/s, {:.0} s left",
        done / 1024,
        total / 1024,
        rate / 1e6,
        left
    );
    if retries > 0 {
        line.push_str(&format!(", retries {retries}"));
        if !last_cause.is_empty() {
            line.push_str(&format!(" (last: {last_cause})"));
        }
    }
    line
}

impl Terminal {
    pub fn new(show_progress: bool, show_debug: bool) -> Self {
        use std::io::IsTerminal;
        Terminal {
            show_progress,
            show_debug,
            is_tty: std::io::stderr().is_terminal(),
            total: 0,
            done: 0,
            started: std::time::Instant::now(),
            last: None,
            retries: 0,
            last_cause: String::new(),
        }
    }

    fn draw(&mut self, force: bool) {
        let now = std::time::Instant::now();
        let every = if self.is_tty { 0.2 } else { 5.0 };
        if !force && self.last.is_some_and(|l| (now - l).as_secs_f64() < every) {
            return;
        }
        self.last = Some(now);
        let line = progress_line(
            self.done,
            self.total,
            now - self.started,
            self.retries,
            &self.last_cause,
        );
        if self.is_tty {
            eprint!("\r{line}\x1b[K");
            if force {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
    }
}

impl Progress for Terminal {
    fn phase(&mut self, name: &str) {
        if self.show_progress {
            if self.total > 0 && self.last.is_some() {
                self.draw(true);
                self.total = 0;
            }
            eprintln!("failback: {name}");
        }
    }
    fn total(&mut self, bytes: u64) {
        self.total = bytes;
        self.done = 0;
        self.started = std::time::Instant::now();
    }
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.show_progress {
            self.draw(false);
        }
    }
    fn info(&mut self, line: &str) {
        eprintln!("failback: {line}");
    }
    fn debug(&mut self, line: &str) {
        if self.show_debug {
            eprintln!("failback: {line}");
        }
    }
    fn retried(&mut self, total: u64, cause: &str) {
        self.retries = total;
        self.last_cause = cause.to_string();
        // Only while the copy's line is up: elsewhere the warnings say it.
        if self.show_progress && self.total > 0 && self.last.is_some() {
            self.draw(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_retries_once_there_are_any() {
        let s = Duration::from_secs;
        assert_eq!(
            progress_line(4 << 20, 8 << 20, s(2), 0, ""),
            "4096/8192 kB (50%) copied, 2.1 MB/s, 2 s left"
        );
        assert_eq!(
            progress_line(4 << 20, 8 << 20, s(2), 3, "connection lost"),
            "4096/8192 kB (50%) copied, 2.1 MB/s, 2 s left, retries 3 (last: connection lost)"
        );
        // Nothing to copy is all copied; no time yet is no rate.
        assert_eq!(
            progress_line(0, 0, Duration::ZERO, 1, ""),
            "0/0 kB (100%) copied, 0.0 MB/s, 0 s left, retries 1"
        );
    }
}
