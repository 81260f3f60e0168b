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
