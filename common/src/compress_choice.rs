//! Whether to compress what the source sends, chosen by what compressing buys.
//!
//! zstd trades the source's CPU for bytes on the link. Through a thin link (a WAN) the link is
//! the bottleneck, and every byte saved is time saved. Through a fast one (loopback, a LAN)
//! the compressor is: compressing pages that barely compress (real tables' pages shrink two to
//! three times, pgbench's blank ones more than ten) only slows the copy down, and the
//! decompressor costs the client CPU as well. Which holds depends on the link, the machines
//! and the data, none known in advance, so `--compress auto` measures it.
//!
//! It measures with two requests sent *alone*, before the copy's others: one answered stored,
//! then one compressed, each of up to 16 MiB within one file, from the middle of the copy on
//! (its first requests are mostly catalogs and small files, which compress unlike the bulk and
//! deliver less than they ask), each measured by the bytes it delivered. Alone, a request has the link, both CPUs and
//! the writer to itself, so its raw bytes per second are what that kind can deliver. Measured
//! among the copy's other requests instead, a request's rate says more about its place in the
//! queue than about its kind: over one HTTP/2 connection the first requests' replies go out
//! ahead of the rest, so a request answered while the link was still idle runs ten times
//! faster than one sharing it sixteen ways, whichever its kind (issue 13's benchmark: chosen
//! that way, stored won on such a stale sample and the copy sent half again level 1's bytes
//! through the 200 Mbit/s link). Compression is chosen when it delivers at least [`MARGIN`]
//! times more: where both deliver alike, the bottleneck is neither the link nor the compressor
//! but the writer, and compressing only spends CPU. The choice then holds for the run.
//!
//! Only a fetch of at least [`PROBE_MIN_FETCH`] bytes probes: two requests sent one after the
//! other cost a few round trips, nothing next to a large copy but a good part of a small one,
//! where compressing (at most a few hundred milliseconds of CPU) is the safe choice. Until
//! probed, requests compress.
//!
//! A pure state machine: the caller asks what the next request uses
//! ([`CompressionChoice::next_request`]), whether a fetch should start with the probes
//! ([`CompressionChoice::wants_probes`]), and tells what each probe delivered in how long
//! ([`CompressionChoice::probed`]).

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
    /// failback's default: `auto`.
    pub const DEFAULT: CompressPolicy = CompressPolicy::AUTO;
    /// `--compress auto`: zstd at level 1 or stored, whichever the probes say delivers more.
    pub const AUTO: CompressPolicy = CompressPolicy::Auto {
        level: Compression::DEFAULT.level(),
    };
}

/// How much faster the compressed probe must deliver for compression to be chosen. Where the
/// two are level the bottleneck is neither the link nor the compressor but the writer, and the
/// CPU compression takes on both ends is better left to the rest of the copy (on one machine,
/// or two small ones, it is the same CPU).
pub const MARGIN: f64 = 1.25;
/// The smallest fetch that probes; smaller ones compress.
pub const PROBE_MIN_FETCH: u64 = 256 << 20;
/// A probe that delivered less than this (a file shorter than listed) measured nothing.
const MIN_SAMPLE_BYTES: u64 = 1 << 20;

/// The two kinds a probe measures: compressed, stored.
const ZSTD: usize = 0;
const STORED: usize = 1;

/// The probes' rates and the choice they make.
#[derive(Clone, Debug)]
pub struct CompressionChoice {
    policy: CompressPolicy,
    /// Raw bytes per second each probe delivered: compressed, stored.
    rate: [Option<f64>; 2],
    /// What every request uses once probed.
    decided: Option<Compression>,
}

impl CompressionChoice {
    pub fn new(policy: CompressPolicy) -> CompressionChoice {
        CompressionChoice {
            policy,
            rate: [None, None],
            decided: None,
        }
    }

    /// The compression of a request that is not a probe.
    pub fn next_request(&self) -> Compression {
        match (self.policy, self.decided) {
            (CompressPolicy::Fixed(c), _) => c,
            (CompressPolicy::Auto { .. }, Some(c)) => c,
            (CompressPolicy::Auto { level }, None) => Compression::Zstd(level),
        }
    }

    /// Whether a fetch of `fetch_bytes` in all should start with the probes: `auto`, not yet
    /// probed, and large enough.
    pub fn wants_probes(&self, fetch_bytes: u64) -> bool {
        matches!(self.policy, CompressPolicy::Auto { .. })
            && self.decided.is_none()
            && fetch_bytes >= PROBE_MIN_FETCH
    }

    /// The probes, in the order they are sent, one after the other: stored first, so that
    /// what the first request of a connection pays (a congestion window still opening) is
    /// paid by the kind that loses by it the bytes compression would save.
    pub fn probes(&self) -> [Compression; 2] {
        let level = match self.policy {
            CompressPolicy::Auto { level } => level,
            CompressPolicy::Fixed(c) => return [c, c],
        };
        [Compression::None, Compression::Zstd(level)]
    }

    /// A probe asking for `used` delivered `raw_bytes` in `took`; after the second, the choice
    /// is made.
    pub fn probed(&mut self, used: Compression, raw_bytes: u64, took: Duration) {
        let CompressPolicy::Auto { level } = self.policy else {
            return;
        };
        let slot = match used {
            Compression::Zstd(_) => ZSTD,
            Compression::None => STORED,
        };
        self.rate[slot] = (raw_bytes >= MIN_SAMPLE_BYTES && !took.is_zero())
            .then(|| raw_bytes as f64 / took.as_secs_f64());
        if slot == ZSTD {
            self.decided = Some(match self.rate {
                [Some(z), Some(s)] if z < MARGIN * s => Compression::None,
                // Compressing wins, or a probe measured nothing: compress, safe on a link of
                // unknown width.
                _ => Compression::Zstd(level),
            });
        }
    }

    /// A probe failed: the choice falls to compressing.
    pub fn probe_failed(&mut self) {
        if let CompressPolicy::Auto { level } = self.policy {
            self.decided = Some(Compression::Zstd(level));
        }
    }

    /// What was chosen and why: each probe's rate in MB/s of raw bytes.
    pub fn summary(&self) -> String {
        let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.0}", r / 1e6));
        match (self.policy, self.decided) {
            (CompressPolicy::Fixed(c), _) => format!("compression fixed at {c:?}"),
            (CompressPolicy::Auto { .. }, None) => "compression auto: not probed yet".into(),
            (CompressPolicy::Auto { .. }, Some(c)) => format!(
                "compression auto: {c:?} (probes: stored {} MB/s, compressed {} MB/s of raw bytes)",
                rate(self.rate[STORED]),
                rate(self.rate[ZSTD])
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// The probes answered at `stored` and `zstd` MB/s; returns what the rest then use.
    fn probed(stored: f64, zstd: f64) -> Compression {
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        assert!(c.wants_probes(PROBE_MIN_FETCH));
        let [a, b] = c.probes();
        assert_eq!((a, b), (Compression::None, Compression::Zstd(1)));
        c.probed(a, 4 * MB, Duration::from_secs_f64(4.0 / stored));
        assert_eq!(
            c.next_request(),
            Compression::Zstd(1),
            "undecided after one"
        );
        c.probed(b, 4 * MB, Duration::from_secs_f64(4.0 / zstd));
        assert!(!c.wants_probes(u64::MAX), "probed once");
        c.next_request()
    }

    #[test]
    fn a_thin_link_compresses() {
        // 200 Mbit/s and 50 ms: 4 MiB stored in 220 ms, compressed 2.5 to one in 120 ms.
        assert_eq!(probed(19.0, 35.0), Compression::Zstd(1));
    }

    #[test]
    fn a_fast_link_sends_stored() {
        // Loopback: the compressor (300 MB/s) is slower than sending the pages as they are.
        assert_eq!(probed(900.0, 300.0), Compression::None);
    }

    #[test]
    fn level_rates_mean_stored() {
        // The client's writer is the bottleneck: both kinds deliver alike.
        assert_eq!(probed(200.0, 210.0), Compression::None);
        assert_eq!(probed(200.0, 260.0), Compression::Zstd(1));
    }

    #[test]
    fn small_fetches_and_failed_probes_compress() {
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        assert!(!c.wants_probes(PROBE_MIN_FETCH - 1));
        assert_eq!(c.next_request(), Compression::Zstd(1));
        // A probe that delivered almost nothing (a file shorter than listed) measures nothing.
        c.probed(Compression::None, 4096, Duration::from_micros(1));
        c.probed(Compression::Zstd(1), 4 * MB, Duration::from_secs(1));
        assert_eq!(c.next_request(), Compression::Zstd(1));
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        c.probe_failed();
        assert_eq!(c.next_request(), Compression::Zstd(1));
        assert!(!c.wants_probes(u64::MAX));
    }

    #[test]
    fn fixed_is_fixed() {
        let mut c = CompressionChoice::new(CompressPolicy::Fixed(Compression::Zstd(3)));
        assert!(!c.wants_probes(u64::MAX));
        c.probed(Compression::None, 4 * MB, Duration::from_millis(1));
        assert_eq!(c.next_request(), Compression::Zstd(3));
        assert!(c.summary().contains("fixed"), "{}", c.summary());
    }
}
