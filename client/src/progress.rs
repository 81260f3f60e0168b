//! Progress reporting as a trait, so the rewind engine never depends on a terminal.

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
        }
    }

    fn draw(&mut self, force: bool) {
        let now = std::time::Instant::now();
        let every = if self.is_tty { 0.2 } else { 5.0 };
        if !force && self.last.is_some_and(|l| (now - l).as_secs_f64() < every) {
            return;
        }
        self.last = Some(now);
        let secs = (now - self.started).as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let left = if rate > 0.0 {
            self.total.saturating_sub(self.done) as f64 / rate
        } else {
            0.0
        };
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let line = format!(
            "{}/{} kB ({pct}%) copied, {:.1} MB/s, {:.0} s left",
            self.done / 1024,
            self.total / 1024,
            rate / 1e6,
            left
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
}
