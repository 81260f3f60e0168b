//! How flaky a run's source was: the retries it rode out, by cause and by what was being done.
//!
//! A source retries what can heal (see [`crate::patience`]) and says so in a warning line, which
//! scrolls away. An operator who reruns a rewind across a bad link wants the tally: how many
//! retries, why (connections lost, a server that was away or shutting down, silence, chunks
//! that failed their checksum), during what (listing, hashing, fetching…), and the longest
//! stall the run waited out. [`RetryCounts`] is that tally, kept by the source as retries
//! happen and put in the rewind's report; it is plain data, so the counting is tested without
//! a network.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Why an attempt was made again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetryCause {
    /// The connection broke under a call (reset, closed, a stream that ended early).
    ConnectionLost,
    /// Nothing came back in time (a silent peer, a hung server, keep-alives unanswered).
    Timeout,
    /// The server could not be reached, or said it cannot serve now (refusing connections,
    /// shutting down, restarting, its disk failing).
    Unavailable,
    /// Any other failure of the link that may heal.
    Transport,
    /// A chunk failed its checksum on arrival and was fetched again.
    Checksum,
}

impl RetryCause {
    pub const ALL: [RetryCause; 5] = [
        RetryCause::ConnectionLost,
        RetryCause::Timeout,
        RetryCause::Unavailable,
        RetryCause::Transport,
        RetryCause::Checksum,
    ];

    /// The report's key.
    pub fn key(self) -> &'static str {
        match self {
            RetryCause::ConnectionLost => "connection_lost",
            RetryCause::Timeout => "timeout",
            RetryCause::Unavailable => "unavailable",
            RetryCause::Transport => "transport",
            RetryCause::Checksum => "checksum",
        }
    }

    /// In words, for a person.
    pub fn words(self) -> &'static str {
        match self {
            RetryCause::ConnectionLost => "connection lost",
            RetryCause::Timeout => "timeout",
            RetryCause::Unavailable => "server unavailable",
            RetryCause::Transport => "transport error",
            RetryCause::Checksum => "checksum mismatch",
        }
    }
}

/// What the source was doing when the attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetryOp {
    /// Reading `global/pg_control`.
    ControlFile,
    /// Asking for the timelines and their history files.
    Timelines,
    /// Asking where the source's WAL ends.
    EndOfWal,
    /// Listing the data directory.
    List,
    /// Reading a small file whole (a timeline history file).
    ReadFile,
    /// Hashing chunks of files on the source.
    Hash,
    /// Fetching ranges of files (the copy).
    Fetch,
    /// Reading what the source's WAL says it changed.
    Changes,
    /// Opening or closing a backup window.
    Window,
    /// Anything else asked of the source (a setting, the role's privileges).
    Other,
}

impl RetryOp {
    /// The report's key.
    pub fn key(self) -> &'static str {
        match self {
            RetryOp::ControlFile => "control_file",
            RetryOp::Timelines => "timelines",
            RetryOp::EndOfWal => "end_of_wal",
            RetryOp::List => "list",
            RetryOp::ReadFile => "read_file",
            RetryOp::Hash => "hash",
            RetryOp::Fetch => "fetch",
            RetryOp::Changes => "changes",
            RetryOp::Window => "window",
            RetryOp::Other => "other",
        }
    }
}

/// The retries of one run. Serialized for the report as `total`, `by_cause` and
/// `by_operation` (only what happened, by key) and `longest_stall_seconds`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetryCounts {
    pub total: u64,
    pub by_cause: BTreeMap<RetryCause, u64>,
    pub by_operation: BTreeMap<RetryOp, u64>,
    /// The longest time a call or batch went without progress and then went on.
    pub longest_stall: Duration,
    /// The cause of the latest retry.
    pub last: Option<RetryCause>,
}

impl RetryCounts {
    /// One more retry, for `cause`, while doing `op`.
    pub fn retried(&mut self, cause: RetryCause, op: RetryOp) {
        self.total += 1;
        *self.by_cause.entry(cause).or_default() += 1;
        *self.by_operation.entry(op).or_default() += 1;
        self.last = Some(cause);
    }

    /// A call or batch made progress again after `stalled` without any.
    pub fn recovered(&mut self, stalled: Duration) {
        self.longest_stall = self.longest_stall.max(stalled);
    }

    pub fn count(&self, cause: RetryCause) -> u64 {
        self.by_cause.get(&cause).copied().unwrap_or(0)
    }

    /// One line for a person, `None` when nothing was retried: `3 retries (connection lost 2,
    /// checksum mismatch 1), longest stall 1.5 s`.
    pub fn summary(&self) -> Option<String> {
        if self.total == 0 {
            return None;
        }
        let causes: Vec<String> = self
            .by_cause
            .iter()
            .map(|(c, n)| format!("{} {n}", c.words()))
            .collect();
        let mut line = format!(
            "{} {} ({})",
            self.total,
            if self.total == 1 { "retry" } else { "retries" },
            causes.join(", ")
        );
        if !self.longest_stall.is_zero() {
            line.push_str(&format!(
                ", longest stall {:.1} s",
                self.longest_stall.as_secs_f64()
            ));
        }
        Some(line)
    }
}

impl Serialize for RetryCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let by_cause: BTreeMap<&str, u64> =
            self.by_cause.iter().map(|(c, n)| (c.key(), *n)).collect();
        let by_operation: BTreeMap<&str, u64> = self
            .by_operation
            .iter()
            .map(|(o, n)| (o.key(), *n))
            .collect();
        let mut st = s.serialize_struct("RetryCounts", 4)?;
        st.serialize_field("total", &self.total)?;
        st.serialize_field("by_cause", &by_cause)?;
        st.serialize_field("by_operation", &by_operation)?;
        // Milliseconds are as fine as a stall is worth telling.
        let secs = (self.longest_stall.as_secs_f64() * 1000.0).round() / 1000.0;
        st.serialize_field("longest_stall_seconds", &secs)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_counted_by_cause_and_operation() {
        let mut c = RetryCounts::default();
        assert_eq!(c.summary(), None);
        c.retried(RetryCause::ConnectionLost, RetryOp::Fetch);
        c.retried(RetryCause::ConnectionLost, RetryOp::Fetch);
        c.retried(RetryCause::Unavailable, RetryOp::List);
        c.retried(RetryCause::Checksum, RetryOp::Fetch);
        assert_eq!(c.total, 4);
        assert_eq!(c.count(RetryCause::ConnectionLost), 2);
        assert_eq!(c.count(RetryCause::Timeout), 0);
        assert_eq!(c.by_operation[&RetryOp::Fetch], 3);
        assert_eq!(c.by_operation[&RetryOp::List], 1);
        assert_eq!(c.last, Some(RetryCause::Checksum));
        // The longest stall is kept, whatever the order.
        c.recovered(Duration::from_millis(1500));
        c.recovered(Duration::from_millis(300));
        assert_eq!(c.longest_stall, Duration::from_millis(1500));
        assert_eq!(
            c.summary().unwrap(),
            "4 retries (connection lost 2, server unavailable 1, checksum mismatch 1), \
             longest stall 1.5 s"
        );
        let mut one = RetryCounts::default();
        one.retried(RetryCause::Timeout, RetryOp::Hash);
        assert_eq!(one.summary().unwrap(), "1 retry (timeout 1)");
    }

    #[test]
    fn the_report_names_what_happened_by_key() {
        let mut c = RetryCounts::default();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({
                "total": 0, "by_cause": {}, "by_operation": {}, "longest_stall_seconds": 0.0
            })
        );
        c.retried(RetryCause::Timeout, RetryOp::EndOfWal);
        c.retried(RetryCause::Transport, RetryOp::Changes);
        c.recovered(Duration::from_micros(2_345_678));
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({
                "total": 2,
                "by_cause": {"timeout": 1, "transport": 1},
                "by_operation": {"end_of_wal": 1, "changes": 1},
                "longest_stall_seconds": 2.346
            })
        );
        // Every key is distinct.
        let keys: std::collections::BTreeSet<_> = RetryCause::ALL.iter().map(|c| c.key()).collect();
        assert_eq!(keys.len(), RetryCause::ALL.len());
    }
}
