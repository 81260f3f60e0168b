//! How long to wait for a source that stopped answering.
//!
//! A rewind across a continent meets stalls: a router reboots, failbackd is restarted, a NAT
//! forgets the flow, the new primary's disk hangs for a while. A rewind should ride them out
//! and never hang: a call that fails for a reason that can heal is tried again after a delay
//! that doubles from [`FIRST_DELAY`] up to [`MAX_DELAY`], and once the source has made no
//! progress for the whole `--timeout` the failure is reported (the journal lets the next run
//! resume where this one stopped).
//!
//! [`Stall`] is the state machine of one stream of work (a call, a batch of ranges): progress
//! resets it; each failure asks it how long to wait, and it answers "give up" when the time
//! since the last progress has used up the timeout. Time is a parameter, so the schedule is
//! tested without sleeping.

use std::time::{Duration, Instant};

/// The first delay after a failed attempt: long enough not to hammer a restarting server.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(8);

/// The caller's limit: how long the source may go without progress before the rewind stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patience {
    pub timeout: Duration,
}

impl Patience {
    pub const DEFAULT: Patience = Patience {
        timeout: Duration::from_secs(60),
    };

    /// How long a connection may stay silent (no answer to its keep-alives) before it is taken
    /// for dead and replaced: a third of the timeout, so that about three attempts fit in it,
    /// but at least a second (a keep-alive needs a round trip) and at most a minute.
    pub fn liveness(&self) -> Duration {
        (self.timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Default for Patience {
    fn default() -> Self {
        Patience::DEFAULT
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then try again.
    RetryAfter(Duration),
    /// The source made no progress for `stalled` (at least the timeout) over `attempts` tries.
    GiveUp { stalled: Duration, attempts: u32 },
}

/// The failures of one stream of work since its last progress.
#[derive(Clone, Debug)]
pub struct Stall {
    patience: Patience,
    last_progress: Instant,
    failures: u32,
}

impl Stall {
    /// Work that starts at `now` (starting counts as progress).
    pub fn new(patience: Patience, now: Instant) -> Stall {
        Stall {
            patience,
            last_progress: now,
            failures: 0,
        }
    }

    /// Something arrived at `now`: the clock and the failure count start over.
    pub fn progress(&mut self, now: Instant) {
        self.last_progress = now;
        self.failures = 0;
    }

    /// How long the attempt starting at `now` may wait for its next answer before it counts as
    /// failed: what is left of the timeout (never zero, so an attempt always gets sent).
    pub fn budget(&self, now: Instant) -> Duration {
        let stalled = now.saturating_duration_since(self.last_progress);
        self.patience
            .timeout
            .saturating_sub(stalled)
            .max(Duration::from_millis(1))
    }

    /// An attempt failed at `now`.
    pub fn failed(&mut self, now: Instant) -> Next {
        self.failures = self.failures.saturating_add(1);
        let stalled = now.saturating_duration_since(self.last_progress);
        let Some(left) = self
            .patience
            .timeout
            .checked_sub(stalled)
            .filter(|l| !l.is_zero())
        else {
            return Next::GiveUp {
                stalled,
                attempts: self.failures,
            };
        };
        let doublings = (self.failures - 1).min(16);
        let delay = FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY);
        Next::RetryAfter(delay.min(left))
    }

    /// The stall ridden out when progress comes at `now`: how long the work had gone without
    /// any, if an attempt failed meanwhile (`None` when none did: no stall, just work).
    pub fn ridden_out(&self, now: Instant) -> Option<Duration> {
        (self.failures > 0).then(|| now.saturating_duration_since(self.last_progress))
    }

    pub fn patience(&self) -> Patience {
        self.patience
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn delays_double_up_to_the_cap_and_stop_at_the_timeout() {
        let t0 = Instant::now();
        let mut st = Stall::new(Patience { timeout: S(30) }, t0);
        let mut now = t0;
        let mut delays = Vec::new();
        loop {
            match st.failed(now) {
                Next::RetryAfter(d) => {
                    delays.push(d);
                    now += d;
                }
                Next::GiveUp { stalled, attempts } => {
                    assert_eq!(stalled, S(30));
                    assert_eq!(attempts as usize, delays.len() + 1);
                    break;
                }
            }
        }
        assert_eq!(
            delays,
            [
                MS(250),
                MS(500),
                S(1),
                S(2),
                S(4),
                S(8),
                S(8),
                // Cut to what was left of the 30 s.
                MS(6250)
            ]
        );
    }

    #[test]
    fn progress_starts_the_clock_and_the_delays_over() {
        let t0 = Instant::now();
        let mut st = Stall::new(Patience { timeout: S(10) }, t0);
        assert_eq!(st.failed(t0 + S(9)), Next::RetryAfter(MS(250)));
        assert_eq!(st.failed(t0 + S(9)), Next::RetryAfter(MS(500)));
        assert_eq!(st.ridden_out(t0 + S(9)), Some(S(9)));
        st.progress(t0 + S(9));
        assert_eq!(st.failures(), 0);
        assert_eq!(st.ridden_out(t0 + S(10)), None);
        assert_eq!(st.budget(t0 + S(12)), S(7));
        assert_eq!(st.failed(t0 + S(12)), Next::RetryAfter(MS(250)));
        assert_eq!(
            st.failed(t0 + S(19)),
            Next::GiveUp {
                stalled: S(10),
                attempts: 2
            }
        );
    }

    #[test]
    fn budgets_and_liveness_are_never_zero() {
        let t0 = Instant::now();
        let st = Stall::new(Patience { timeout: S(5) }, t0);
        assert_eq!(st.budget(t0), S(5));
        assert_eq!(st.budget(t0 + S(60)), MS(1));
        // A clock read before the last progress (another thread's) counts as no time.
        assert_eq!(st.budget(t0.checked_sub(S(1)).unwrap_or(t0)), S(5));
        assert_eq!(Patience { timeout: MS(10) }.liveness(), S(1));
        assert_eq!(Patience { timeout: S(30) }.liveness(), S(10));
        assert_eq!(Patience { timeout: S(3600) }.liveness(), S(60));
        assert_eq!(
            Patience {
                timeout: Duration::ZERO
            }
            .liveness(),
            S(1)
        );
    }

    #[test]
    fn a_zero_timeout_gives_up_at_the_first_failure() {
        let t0 = Instant::now();
        let mut st = Stall::new(
            Patience {
                timeout: Duration::ZERO,
            },
            t0,
        );
        assert!(matches!(st.failed(t0), Next::GiveUp { attempts: 1, .. }));
    }
}
