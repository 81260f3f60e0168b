//! A token bucket for `--max-rate`, as a state machine that is told the time.
//!
//! The bucket holds up to `burst` bytes of credit and refills at `rate` bytes per second.
//! Taking `n` bytes spends `n` of credit, possibly into debt; the caller must then wait until
//! the debt is paid off before it hands the bytes on. So at every moment a byte is released,
//! the bytes released since the start are at most `burst + rate × elapsed`: the average is
//! honoured over any window, and no burst is larger than `burst` (plus the piece that caused
//! the wait, which was itself waited for). The clock is a parameter (nanoseconds from any
//! origin that never goes back), so the arithmetic is tested with a fake clock.
//!
//! Credit is kept in units of bytes × 10⁹ so that nanosecond refills are exact integers.

const NANOS: u128 = 1_000_000_000;

/// Why a rate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error(
        "rate {0:?} is not a number of bytes per second with an optional unit (K, M, G, or kbit, Mbit, Gbit)"
    )]
    Syntax(String),
    #[error("rate {0:?} must be at least 1 byte per second")]
    Zero(String),
    #[error("rate {0:?} is too large")]
    Overflow(String),
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u128,
    burst: u128,
    /// Credit in bytes × 10⁹; negative is debt.
    credit: i128,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket at time `now_ns`; `None` when `rate` is zero.
    pub fn new(rate: u64, burst: u64, now_ns: u64) -> Option<TokenBucket> {
        if rate == 0 {
            return None;
        }
        let burst = u128::from(burst) * NANOS;
        Some(TokenBucket {
            rate: u128::from(rate),
            burst,
            credit: burst as i128,
            last_ns: now_ns,
        })
    }

    /// The burst a rate gets by default: a tenth of a second of it, at least 64 KiB, so that
    /// the link can be kept full with pieces of any size without exceeding the average.
    pub fn default_burst(rate: u64) -> u64 {
        (rate / 10).max(64 << 10)
    }

    fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let gained = u128::from(elapsed).saturating_mul(self.rate);
        let credit = self
            .credit
            .saturating_add(gained.min(i128::MAX as u128) as i128);
        self.credit = credit.min(self.burst as i128);
    }

    /// Spends `n` bytes at `now_ns`; returns how many nanoseconds to wait before releasing
    /// them (0 when the bucket had the credit).
    pub fn take(&mut self, n: u64, now_ns: u64) -> u64 {
        self.refill(now_ns);
        self.credit = self
            .credit
            .saturating_sub((u128::from(n) * NANOS).min(i128::MAX as u128) as i128);
        if self.credit >= 0 {
            return 0;
        }
        let debt = self.credit.unsigned_abs();
        let wait = debt.div_ceil(self.rate);
        u64::try_from(wait).unwrap_or(u64::MAX)
    }
}

/// Whether a log line may be written now: the lines a flood of refused clients causes are
/// capped at `burst` at once and `per_second` on average, so that the log says what happens
/// without filling the disk; the lines held back are counted and told with the next one.
#[derive(Debug, Clone)]
pub struct LineLimiter {
    bucket: TokenBucket,
    held_back: u64,
}

impl LineLimiter {
    /// At most `burst` lines at once and `per_second` lines a second (at least 1).
    pub fn new(per_second: u64, burst: u64, now_ns: u64) -> LineLimiter {
        LineLimiter {
            bucket: TokenBucket::new(per_second.max(1), burst.max(1), now_ns)
                .expect("a rate of at least one line a second"),
            held_back: 0,
        }
    }

    /// `Some(n)`: write the line, after saying that `n` lines were held back since the last
    /// one written; `None`: hold this one back.
    pub fn admit(&mut self, now_ns: u64) -> Option<u64> {
        self.bucket.refill(now_ns);
        if self.bucket.credit < NANOS as i128 {
            self.held_back += 1;
            return None;
        }
        self.bucket.credit -= NANOS as i128;
        Some(std::mem::take(&mut self.held_back))
    }

    /// `Some(n)`: write a line saying that `n` lines were held back, because none has been
    /// written since to carry the count (the flood ended); called on a timer, so a count is
    /// never lost with the last lines of a flood. It spends a line's credit like any other.
    pub fn flush(&mut self, now_ns: u64) -> Option<u64> {
        if self.held_back == 0 {
            return None;
        }
        self.bucket.refill(now_ns);
        if self.bucket.credit < NANOS as i128 {
            return None;
        }
        self.bucket.credit -= NANOS as i128;
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Parses a rate in bytes per second: a plain number, or with `K`/`M`/`G` (powers of 1024,
/// optionally followed by `B`, `iB` or `/s`), or in bits with `kbit`/`Mbit`/`Gbit` (powers of
/// 1000, as links are sold).
pub fn parse_rate(text: &str) -> Result<u64, RateError> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let digits = t.bytes().take_while(|b| b.is_ascii_digit()).count();
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(RateError::Syntax(text.to_string()));
    }
    let n: u128 = num
        .parse()
        .map_err(|_| RateError::Overflow(text.to_string()))?;
    let (mul, div): (u128, u128) = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => (1, 1),
        "k" | "kb" | "kib" => (1 << 10, 1),
        "m" | "mb" | "mib" => (1 << 20, 1),
        "g" | "gb" | "gib" => (1 << 30, 1),
        "bit" => (1, 8),
        "kbit" => (1_000, 8),
        "mbit" => (1_000_000, 8),
        "gbit" => (1_000_000_000, 8),
        _ => return Err(RateError::Syntax(text.to_string())),
    };
    let v = n
        .checked_mul(mul)
        .ok_or_else(|| RateError::Overflow(text.to_string()))?
        / div;
    let v = u64::try_from(v).map_err(|_| RateError::Overflow(text.to_string()))?;
    if v == 0 {
        return Err(RateError::Zero(text.to_string()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Releases `pieces` as fast as the bucket allows on a fake clock; returns the release
    /// time of each piece.
    fn run(rate: u64, burst: u64, pieces: &[u64]) -> Vec<u64> {
        let mut now = 5 * S; // any origin
        let start = now;
        let mut b = TokenBucket::new(rate, burst, now).unwrap();
        pieces
            .iter()
            .map(|&n| {
                now += b.take(n, now);
                now - start
            })
            .collect()
    }

    #[test]
    fn the_average_is_honoured_and_bursts_are_bounded() {
        let rate = 1_000_000;
        let burst = 100_000;
        for piece in [1u64, 4096, 65_536, 1 << 20, 3_000_001] {
            let pieces = vec![piece; (8_000_000 / piece).max(3) as usize];
            let times = run(rate, burst, &pieces);
            let mut released = 0u64;
            for (t, n) in times.iter().zip(&pieces) {
                released += n;
                // Never more than burst + rate × elapsed at any release.
                assert!(
                    u128::from(released) * u128::from(S)
                        <= (u128::from(burst) * u128::from(S)) + u128::from(rate) * u128::from(*t),
                    "piece {piece}: {released} bytes by {t} ns"
                );
            }
            // And the average is the rate (within one nanosecond per piece of rounding).
            let total: u64 = pieces.iter().sum();
            let last = *times.last().unwrap();
            let ideal = (total - burst) as u128 * u128::from(S) / u128::from(rate);
            assert!(u128::from(last) >= ideal, "piece {piece}: too fast");
            assert!(
                u128::from(last) <= ideal + pieces.len() as u128,
                "piece {piece}: {last} ns, ideal {ideal}"
            );
        }
    }

    #[test]
    fn credit_refills_up_to_the_burst_only() {
        let mut b = TokenBucket::new(1000, 500, 0).unwrap();
        assert_eq!(b.take(500, 0), 0);
        assert_eq!(b.take(1, 0), 1_000_000); // one byte at 1000 B/s: 1 ms
        // A long idle period refills only up to the burst.
        assert_eq!(b.take(500, 1000 * S), 0);
        assert_eq!(b.take(100, 1000 * S), 100 * 1_000_000);
    }

    #[test]
    fn hostile_values_do_not_overflow_or_panic() {
        assert!(TokenBucket::new(0, 10, 0).is_none());
        let mut b = TokenBucket::new(1, u64::MAX, u64::MAX).unwrap();
        assert_eq!(b.take(u64::MAX, u64::MAX), 0);
        assert!(b.take(u64::MAX, 0) > 0); // clock going back: no refill, no panic
        let mut b = TokenBucket::new(u64::MAX, 0, 0).unwrap();
        assert_eq!(b.take(0, u64::MAX), 0);
        let mut b = TokenBucket::new(1, 0, 0).unwrap();
        assert_eq!(b.take(u64::MAX, 0), u64::MAX);
    }

    #[test]
    fn log_lines_are_capped_and_the_held_back_ones_counted() {
        let mut l = LineLimiter::new(2, 5, 7 * S);
        // A flood at one instant: the burst, then nothing.
        let first: Vec<_> = (0..8).map(|_| l.admit(7 * S)).collect();
        assert_eq!(first[..5], [Some(0); 5]);
        assert_eq!(first[5..], [None; 3]);
        // Half a second later one line's credit is back; it tells of the three held back.
        assert_eq!(l.admit(7 * S + S / 2), Some(3));
        assert_eq!(l.admit(7 * S + S / 2), None);
        // A long quiet spell refills only up to the burst.
        let later: Vec<_> = (0..7).map(|_| l.admit(100 * S)).collect();
        assert_eq!(later[0], Some(1));
        assert_eq!(later.iter().filter(|a| a.is_some()).count(), 5);
    }

    #[test]
    fn the_count_held_back_at_the_end_of_a_flood_is_flushed() {
        let mut l = LineLimiter::new(2, 5, 0);
        assert_eq!(l.flush(0), None, "nothing held back, nothing to say");
        for _ in 0..9 {
            l.admit(0);
        }
        // No credit yet: the count waits rather than exceed the rate.
        assert_eq!(l.flush(S / 4), None);
        assert_eq!(l.flush(S / 2), Some(4));
        assert_eq!(l.flush(10 * S), None, "told once");
        // A flush spends a line's credit: the burst after it is one short.
        let mut l = LineLimiter::new(1, 2, 0);
        for _ in 0..3 {
            l.admit(0);
        }
        assert_eq!(l.flush(2 * S), Some(1));
        assert_eq!(l.admit(2 * S), Some(0));
        assert_eq!(l.admit(2 * S), None);
    }

    #[test]
    fn rates_parse_with_units() {
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("10K"), Ok(10 << 10));
        assert_eq!(parse_rate("10M"), Ok(10 << 20));
        assert_eq!(parse_rate("2G"), Ok(2 << 30));
        assert_eq!(parse_rate("5MB/s"), Ok(5 << 20));
        assert_eq!(parse_rate("5MiB"), Ok(5 << 20));
        assert_eq!(parse_rate("200Mbit"), Ok(25_000_000));
        assert_eq!(parse_rate("1Gbit/s"), Ok(125_000_000));
        assert_eq!(parse_rate(" 64 k "), Ok(64 << 10));
        assert!(matches!(parse_rate("0"), Err(RateError::Zero(_))));
        assert!(matches!(parse_rate("1bit"), Err(RateError::Zero(_))));
        assert!(matches!(parse_rate("fast"), Err(RateError::Syntax(_))));
        assert!(matches!(parse_rate("10X"), Err(RateError::Syntax(_))));
        assert!(matches!(parse_rate(""), Err(RateError::Syntax(_))));
        assert!(matches!(parse_rate("-5"), Err(RateError::Syntax(_))));
        assert!(matches!(
            parse_rate("99999999999999999999G"),
            Err(RateError::Overflow(_))
        ));
        assert!(matches!(
            parse_rate("999999999999999999999999999999999999999999"),
            Err(RateError::Overflow(_))
        ));
    }
}
