//! Whether to compress what the source sends, chosen by what compressing buys.
//!
//! zstd trades the source's CPU for bytes on the link. Through a thin link (a WAN) the link is
//! the bottleneck, and every byte saved is time saved. Through a fast one (loopback, a LAN)
//! the compressor is: compressing pages that barely compress (real tables' pages shrink two to
//! three times, pgbench's blank ones more than ten) only slows the copy down, and the
//! decompressor costs the client CPU as well. Which holds depends on the link, the machines
//! and the data, none known in advance, so `--compress auto` measures it.
//!
//! Each request for a batch of ranges is answered either compressed or stored. Requests run
//! several at a time, so the two kinds share the link and both machines' CPU while they are
//! measured: a batch's raw bytes over the time it took is what that kind delivers under the
//! load of the moment. Compression is chosen only when it delivers clearly more ([`MARGIN`]):
//! when both deliver alike, the writer is the bottleneck and compressing only spends CPU. The first two requests probe one kind each, and the rest compress until
//! both have been answered (the safe choice on a link of unknown width); from then on the kind
//! that delivered more raw bytes per second is asked for, and now and then a request tries the
//! other, so a link that fills up or data that compresses differently further on is noticed:
//! one in [`EXPLORE_EVERY`] tries compressing, and one in four to eight times as many tries
//! stored, which through a thin link costs every byte compression would have saved.
//!
//! A pure state machine: the caller says when a request is made ([`CompressionChoice::next_request`])
//! and what it delivered in how long ([`CompressionChoice::finished`]).

use std::time::Duration;

use crate::wire::Compression;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressPolicy {
    /// Always this.
    Fixed(Compression),
    /// zstd at `level` or stored, whichever delivers more raw bytes per second.
    Auto { level: i32 },
}

impl CompressPolicy {
    /// failback's default: zstd at level 1 always. `auto` is asked for by name: measured on
    /// issue 13's benchmark it sends stored on loopback, where compressing only costs CPU, but
    /// through the 50 ms / 200 Mbit/s link it sent half again the bytes of level 1 on barely
    /// compressible pages (per-request rates under 16 requests in flight misjudge the link).
    pub const DEFAULT: CompressPolicy = CompressPolicy::Fixed(Compression::DEFAULT);
    /// `--compress auto`: zstd at level 1 or stored, whichever delivers more.
    pub const AUTO: CompressPolicy = CompressPolicy::Auto {
        level: Compression::DEFAULT.level(),
    };
}

/// One request in this many tries compressing while stored is winning (stored is tried four
/// to eight times more rarely).
pub const EXPLORE_EVERY: u64 = 8;
/// How much faster compressed requests must deliver for compression to be chosen. Where the
/// two are level the bottleneck is neither the link nor the compressor but the writer, and the
/// CPU compression takes on both ends is better left to the rest of the copy (on one machine,
/// or two small ones, it is the same CPU).
const MARGIN: f64 = 1.25;
/// The weight of the newest batch in a kind's rate (an exponentially weighted mean).
const WEIGHT: f64 = 0.3;
/// Batches smaller than this are mostly round trip: they say little about either kind.
const MIN_SAMPLE_BYTES: u64 = 1 << 20;

/// The rates measured so far and the choice they make.
#[derive(Clone, Debug)]
pub struct CompressionChoice {
    policy: CompressPolicy,
    /// Raw bytes per second delivered: compressed, stored.
    rate: [Option<f64>; 2],
    /// Requests made so far.
    issued: u64,
    /// Requests answered so far: compressed, stored.
    answered: [u64; 2],
}

impl CompressionChoice {
    pub fn new(policy: CompressPolicy) -> CompressionChoice {
        CompressionChoice {
            policy,
            rate: [None, None],
            issued: 0,
            answered: [0, 0],
        }
    }

    /// The compression to ask for in the next request.
    pub fn next_request(&mut self) -> Compression {
        let level = match self.policy {
            CompressPolicy::Fixed(c) => return c,
            CompressPolicy::Auto { level } => level,
        };
        let n = self.issued;
        self.issued += 1;
        let compress = match self.rate {
            [Some(z), Some(s)] => {
                let compressing_wins = z >= MARGIN * s;
                // Trying stored through a thin link costs every byte compression saves, so
                // the longer compression has been winning, and the wider, the rarer the try.
                let every = match (compressing_wins, z >= 2.0 * s) {
                    (false, _) => EXPLORE_EVERY,
                    (true, false) => 4 * EXPLORE_EVERY,
                    (true, true) => 8 * EXPLORE_EVERY,
                };
                compressing_wins != (n % every == every - 1)
            }
            // The first request of each kind is the probe; until both have been answered the
            // rest compress, safe on a link of unknown width.
            _ => n != 1,
        };
        if compress {
            Compression::Zstd(level)
        } else {
            Compression::None
        }
    }

    /// A request asked for `used` and delivered `raw_bytes` in `took`.
    pub fn finished(&mut self, used: Compression, raw_bytes: u64, took: Duration) {
        let slot = match used {
            Compression::Zstd(_) => 0,
            Compression::None => 1,
        };
        self.answered[slot] += 1;
        if matches!(self.policy, CompressPolicy::Fixed(_))
            || raw_bytes < MIN_SAMPLE_BYTES
            || took.is_zero()
        {
            return;
        }
        let r = raw_bytes as f64 / took.as_secs_f64();
        self.rate[slot] = Some(match self.rate[slot] {
            None => r,
            Some(old) => old + WEIGHT * (r - old),
        });
    }

    /// What was chosen and why, for `--debug`: requests answered compressed and stored, and
    /// each kind's rate in MB/s of raw bytes.
    pub fn summary(&self) -> String {
        let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.0}", r / 1e6));
        match self.policy {
            CompressPolicy::Fixed(c) => format!("compression fixed at {c:?}"),
            CompressPolicy::Auto { level } => format!(
                "compression auto: {} requests zstd level {level} ({} MB/s of raw bytes), {} stored ({} MB/s)",
                self.answered[0],
                rate(self.rate[0]),
                self.answered[1],
                rate(self.rate[1])
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// Runs `n` requests, each of 16 MiB, delivered at `zstd` or `stored` MB/s, one at a
    /// time; returns how many were compressed.
    fn run(choice: &mut CompressionChoice, n: usize, zstd: f64, stored: f64) -> usize {
        let mut compressed = 0;
        for _ in 0..n {
            let c = choice.next_request();
            let rate = if c == Compression::None {
                stored
            } else {
                compressed += 1;
                zstd
            };
            choice.finished(c, 16 * MB, Duration::from_secs_f64(16.0 / rate));
        }
        compressed
    }

    #[test]
    fn a_thin_link_keeps_compressing() {
        // 200 Mbit/s and pages that compress 2.5 to one: stored 25 MB/s, compressed 60.
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        let compressed = run(&mut c, 80, 60.0, 25.0);
        // Two to learn, then all but one in EXPLORE_EVERY.
        assert!(
            compressed >= 80 * 7 / 8 - 1,
            "{compressed} of 80: {}",
            c.summary()
        );
        assert_eq!(c.next_request(), Compression::Zstd(1));
    }

    #[test]
    fn a_fast_link_stops_compressing() {
        // Loopback: the compressor (300 MB/s) is slower than sending the pages as they are.
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        let compressed = run(&mut c, 80, 300.0, 900.0);
        assert!(
            compressed <= 80 / 8 + 2,
            "{compressed} of 80: {}",
            c.summary()
        );
        assert_eq!(run(&mut c, 7, 300.0, 900.0), 0, "between two explorations");
    }

    #[test]
    fn level_rates_mean_stored() {
        // The client's writer is the bottleneck: both kinds deliver alike.
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        let compressed = run(&mut c, 80, 210.0, 200.0);
        assert!(
            compressed <= 80 / 8 + 2,
            "{compressed} of 80: {}",
            c.summary()
        );
    }

    #[test]
    fn a_link_that_fills_up_is_noticed() {
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        run(&mut c, 40, 300.0, 900.0);
        // Another tenant takes the link: stored now crawls; the explorations find it out.
        run(&mut c, 40, 280.0, 20.0);
        assert_eq!(run(&mut c, 7, 280.0, 20.0), 7, "{}", c.summary());
    }

    #[test]
    fn fixed_is_fixed_and_small_batches_teach_nothing() {
        let mut c = CompressionChoice::new(CompressPolicy::Fixed(Compression::Zstd(3)));
        assert_eq!(run(&mut c, 10, 1.0, 1000.0), 10);
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        let (a, b) = (c.next_request(), c.next_request());
        assert_eq!(
            (a, b),
            (Compression::Zstd(1), Compression::None),
            "the first two requests try both kinds"
        );
        c.finished(a, 4096, Duration::from_millis(1));
        c.finished(b, 4096, Duration::from_micros(1));
        // Nothing learnt from 4 KiB: the rest compress until both kinds are measured.
        assert_eq!(run(&mut c, 5, 1.0, 1000.0), 5);
        assert!(c.summary().contains("1 stored"), "{}", c.summary());
    }
}
