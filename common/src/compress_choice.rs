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
//! then one compressed, each of up to 4 MiB within one file, from the middle of the copy on
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
//! but the writer, and compressing only spends CPU. The choice holds until the copy's delivery
//! says the link or the data changed (below).
//!
//! Only a fetch of at least [`Measuring::min_fetch`] bytes probes: two requests sent one after
//! the other cost a few round trips, nothing next to a large copy but a good part of a small
//! one, where compressing (at most a few hundred milliseconds of CPU) is the safe choice. Until
//! probed, requests compress. A fetch begun ahead of its plan (the source's changed blocks,
//! asked for while the target's WAL is still being read) counts those it leaves for the plan
//! as still to ask for: a large one probes before its first request, so that on a fast link
//! its tens of megabytes are not compressed for nothing while the CPU is needed by the scan.
//!
//! Probes made while other work takes the CPUs (the target's WAL scan, beside a fetch begun
//! ahead of its plan) measure that moment: over QUIC on a fast link each stored datagram costs
//! both ends CPU, so compressing, with fewer of them, came out ahead by a quarter with the scan
//! running and then cost the copy a third of its time once the scan was over. When the caller
//! says the other work has ended ([`CompressionChoice::cpus_freed`]), a choice to compress
//! made by less than [`Measuring::close`] times is measured again: a choice to send stored, or
//! to compress by more, stands (freeing the CPUs does not make a compressor that lost, or a
//! link that it won on, any different). Under the scan, QUIC on loopback chose to compress by
//! 1.25 to 1.47 times; through the benchmarks' WAN, of 200 Mbit/s at 50 ms, the same pages
//! compressed by 1.7 to 2.4 times, the probes' round trips weighing on the compressed one,
//! and measuring again there cost 4 % of the rewind for the same choice.
//!
//! The choice is watched for the rest of the run: links change under a long copy (a shared WAN
//! link fills up or frees, a VPN reroutes, the copy moves from pages that compress ten to one to
//! pages that barely do). Every [`Measuring::window`] the raw bytes the copy delivered are
//! averaged; the first full window after a choice (the one after the pipeline refilled) is the
//! reference. When [`Measuring::sustain`] windows in a row deliver more than
//! [`Measuring::drift`] times the reference, or less than its [`Measuring::drift`]th, what made
//! the choice has changed, and the next large enough request measures again: the two probes,
//! alone, as at first. A window without deliveries (the copy waiting on its writer, or between
//! two fetches) is idleness, not a slow link, and is not counted.
//!
//! A pure state machine; time is a parameter. The caller asks whether its next request is a
//! probe ([`CompressionChoice::wants_probe`]: then it waits until nothing else is in flight,
//! sends it alone and tells what it delivered in how long, [`CompressionChoice::probed`]), or
//! else what an ordinary request uses ([`CompressionChoice::next_request`]); and tells what the
//! copy delivers as it arrives ([`CompressionChoice::delivered`]).

use std::time::{Duration, Instant};

use crate::wire::Compression;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CompressPolicy {
    /// Always this.
    Fixed(Compression),
    /// zstd at `level` or stored, whichever delivers more raw bytes per second, measured as
    /// `measuring` says.
    Auto { level: i32, measuring: Measuring },
}

impl CompressPolicy {
    /// failback's default: `auto`.
    pub const DEFAULT: CompressPolicy = CompressPolicy::AUTO;
    /// `--compress auto`: zstd at level 1 or stored, whichever the probes say delivers more.
    pub const AUTO: CompressPolicy = CompressPolicy::Auto {
        level: Compression::DEFAULT.level(),
        measuring: Measuring::DEFAULT,
    };
}

/// When `auto` probes, and when it probes again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measuring {
    /// The smallest fetch that probes (and the least left of one that probes again); smaller
    /// ones compress.
    pub min_fetch: u64,
    /// The span over which the copy's delivery is averaged.
    pub window: Duration,
    /// How many times more (or less) than the reference a window must deliver to count as off.
    pub drift: u32,
    /// How many windows in a row must be off before the probes run again.
    pub sustain: u32,
    /// The least time from one choice to the next round of probes where the copy went faster
    /// (one that went slower is probed again as soon as the windows say so).
    pub min_interval: Duration,
    /// A choice to compress made by less than this many times the stored probe's rate, while
    /// other work shared the CPUs, is measured again when that work ends (see the module
    /// header).
    pub close: f64,
}

impl Measuring {
    /// failback's: probes for copies of 256 MiB or more; again after three 2-second windows in
    /// a row at less than half the reference, or at more than twice it 20 s after the last
    /// choice at the soonest; again when the CPUs are freed, after a choice to compress by
    /// less than 1.5 times.
    pub const DEFAULT: Measuring = Measuring {
        min_fetch: 256 << 20,
        window: Duration::from_secs(2),
        drift: 2,
        sustain: 3,
        min_interval: Duration::from_secs(20),
        close: 1.5,
    };
}

/// How much faster the compressed probe must deliver for compression to be chosen. Where the
/// two are level the bottleneck is neither the link nor the compressor but the writer, and the
/// CPU compression takes on both ends is better left to the rest of the copy (on one machine,
/// or two small ones, it is the same CPU).
pub const MARGIN: f64 = 1.25;
/// How many seconds of the copy's delivery [`CompressionChoice::in_flight_budget`] allows in
/// flight: several round trips of the longest links, a few windows of the watch.
pub const IN_FLIGHT_SECONDS: f64 = 4.0;
/// The least it allows: two requests of a fetch's usual size.
pub const MIN_IN_FLIGHT: u64 = 32 << 20;
/// A probe that delivered less than this (a file shorter than listed) measured nothing.
const MIN_SAMPLE_BYTES: u64 = 1 << 20;

/// The two kinds a probe measures: compressed, stored.
const ZSTD: usize = 0;
const STORED: usize = 1;

/// One round of probes and what it chose.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Choice {
    /// Raw bytes per second each probe delivered: compressed, stored.
    rate: [Option<f64>; 2],
    chose: Compression,
    /// Why the round was run.
    why: Why,
}

impl Choice {
    /// Compressing, chosen by less than `close` times.
    fn close(&self, close: f64) -> bool {
        matches!(self.chose, Compression::Zstd(_))
            && matches!(self.rate, [Some(z), Some(s)] if z < close * s)
    }
}

/// Why a round of probes was run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Why {
    /// The fetch's first.
    #[default]
    First,
    /// The copy's delivery moved away from what the last choice was made on.
    Moved,
    /// The last choice was close, and made while other work shared the CPUs.
    Freed,
}

/// The probes' rates, the choices they made, and the watch on the copy's delivery since.
#[derive(Clone, Debug)]
pub struct CompressionChoice {
    policy: CompressPolicy,
    /// The round under way: the rates measured so far, and why it runs.
    round: Option<([Option<f64>; 2], Why)>,
    /// The CPUs were freed since the last round began ([`CompressionChoice::cpus_freed`]).
    freed: bool,
    /// Every round's choice, oldest first; the last one holds.
    choices: Vec<Choice>,
    watch: Watch,
    /// Raw bytes per second of the copy's last whole window, settling or not.
    last_rate: Option<f64>,
}

/// The copy's delivery since the last choice, window by window.
#[derive(Clone, Debug, Default)]
struct Watch {
    /// When the last choice was made.
    chosen_at: Option<Instant>,
    /// The window being filled: when its first delivery came, and the bytes since.
    window: Option<(Instant, u64)>,
    /// The last delivery.
    last: Option<Instant>,
    /// Windows still to pass before the reference is taken (the pipeline refilling).
    settling: u32,
    /// Raw bytes per second of the first settled window.
    reference: Option<f64>,
    /// Windows in a row off the reference by more than the drift.
    off: u32,
    /// Whether the last of them delivered less than the reference (the link narrowed).
    fell: bool,
}

impl CompressionChoice {
    pub fn new(policy: CompressPolicy) -> CompressionChoice {
        CompressionChoice {
            policy,
            round: None,
            freed: false,
            choices: Vec::new(),
            watch: Watch::default(),
            last_rate: None,
        }
    }

    /// What holds now, once a round has chosen.
    fn chosen(&self) -> Option<Compression> {
        self.choices.last().map(|c| c.chose)
    }

    /// The compression of a request that is not a probe.
    pub fn next_request(&self) -> Compression {
        match self.policy {
            CompressPolicy::Fixed(c) => c,
            CompressPolicy::Auto { level, .. } => self.chosen().unwrap_or(Compression::Zstd(level)),
        }
    }

    /// Whether the next request, of a fetch with `fetch_left` bytes still to ask for, is a
    /// probe, and which: `auto`, enough left, and either never probed or the watch saw the
    /// copy's delivery move away from what the last choice was made on. The probe is to be
    /// sent alone, once every request in flight has been answered, and reported with
    /// [`CompressionChoice::probed`] (or [`CompressionChoice::probe_failed`]) before asking
    /// again. Stored goes first, so that what the first request of a connection pays (a
    /// congestion window still opening) is paid by the kind that loses by it the bytes
    /// compression would save.
    pub fn wants_probe(&mut self, now: Instant, fetch_left: u64) -> Option<Compression> {
        let CompressPolicy::Auto { level, measuring } = self.policy else {
            return None;
        };
        if let Some((round, _)) = self.round {
            return Some(if round[STORED].is_none() {
                Compression::None
            } else {
                Compression::Zstd(level)
            });
        }
        if fetch_left < measuring.min_fetch {
            return None;
        }
        // A close choice made while the CPUs were shared is measured again once they are not.
        let freed = std::mem::take(&mut self.freed)
            && self
                .choices
                .last()
                .is_some_and(|c| c.close(measuring.close));
        // A link that narrowed is measured again at once: every second on it with the wrong
        // choice costs more than probes. One that widened waits out the interval.
        let moved = self.watch.off >= measuring.sustain
            && (self.watch.fell
                || self
                    .watch
                    .chosen_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= measuring.min_interval));
        let why = match (self.choices.is_empty(), moved, freed) {
            (true, ..) => Why::First,
            (false, true, _) => Why::Moved,
            (false, false, true) => Why::Freed,
            (false, false, false) => return None,
        };
        self.round = Some(([None, None], why));
        Some(Compression::None)
    }

    /// A probe asking for `used` delivered `raw_bytes` in `took`, answered at `now`; after the
    /// round's second, the choice is made.
    pub fn probed(&mut self, used: Compression, raw_bytes: u64, took: Duration, now: Instant) {
        let CompressPolicy::Auto { level, .. } = self.policy else {
            return;
        };
        let Some((round, why)) = self.round.as_mut() else {
            return;
        };
        let why = *why;
        let slot = match used {
            Compression::Zstd(_) => ZSTD,
            Compression::None => STORED,
        };
        // A probe that measured nothing still counts as asked: its rate is 0 then, and the
        // choice below falls to compressing.
        round[slot] = Some(if raw_bytes >= MIN_SAMPLE_BYTES && !took.is_zero() {
            raw_bytes as f64 / took.as_secs_f64()
        } else {
            0.0
        });
        if let [Some(z), Some(s)] = *round {
            let rate = [Some(z).filter(|&r| r > 0.0), Some(s).filter(|&r| r > 0.0)];
            let chose = match rate {
                [Some(z), Some(s)] if z < MARGIN * s => Compression::None,
                // Compressing wins, or a probe measured nothing: compress, safe on a link of
                // unknown width.
                _ => Compression::Zstd(level),
            };
            self.choose(Choice { rate, chose, why }, now);
        }
    }

    /// A probe failed: the choice falls to compressing.
    pub fn probe_failed(&mut self, now: Instant) {
        if let CompressPolicy::Auto { level, .. } = self.policy {
            let (rate, why) = self.round.unwrap_or_default();
            self.choose(
                Choice {
                    rate,
                    chose: Compression::Zstd(level),
                    why,
                },
                now,
            );
        }
    }

    fn choose(&mut self, choice: Choice, now: Instant) {
        self.round = None;
        self.choices.push(choice);
        self.watch = Watch {
            chosen_at: Some(now),
            settling: 1,
            ..Watch::default()
        };
    }

    /// The work that shared the CPUs with the probes so far (the target's WAL scan, beside a
    /// fetch begun ahead of its plan) has ended: if the last choice (or the round under way)
    /// chooses to compress by less than [`Measuring::close`] times, the next request with
    /// enough left to ask for measures again. Before any round, nothing: the first is yet to
    /// come.
    pub fn cpus_freed(&mut self) {
        if self.round.is_some() || !self.choices.is_empty() {
            self.freed = true;
        }
    }

    /// The copy handed over `raw_bytes` of file data at `now` (a probe's too: they are not
    /// watched, their round is what measures them).
    pub fn delivered(&mut self, raw_bytes: u64, now: Instant) {
        let CompressPolicy::Auto { measuring, .. } = self.policy else {
            return;
        };
        if self.round.is_some() || self.choices.is_empty() {
            return;
        }
        let w = &mut self.watch;
        let idle = w
            .last
            .is_some_and(|last| now.saturating_duration_since(last) > measuring.window);
        w.last = Some(now);
        let (start, bytes) = match w.window {
            Some(open) if !idle => open,
            // A gap of a whole window: what was being filled measured idleness.
            _ => {
                w.window = Some((now, raw_bytes));
                return;
            }
        };
        let bytes = bytes + raw_bytes;
        let span = now.saturating_duration_since(start);
        if span < measuring.window {
            w.window = Some((start, bytes));
            return;
        }
        w.window = Some((now, 0));
        let rate = bytes as f64 / span.as_secs_f64();
        self.last_rate = Some(rate);
        if w.settling > 0 {
            w.settling -= 1;
            return;
        }
        let Some(reference) = w.reference else {
            w.reference = Some(rate);
            return;
        };
        let drift = f64::from(measuring.drift);
        let fell = rate * drift < reference;
        let off = rate > reference * drift || fell;
        w.off = if off { w.off + 1 } else { 0 };
        w.fell = fell;
    }

    /// The most raw bytes worth asking for and not yet delivered, under `auto` once the copy
    /// has delivered a whole window: [`IN_FLIGHT_SECONDS`] of its delivery, at least
    /// [`MIN_IN_FLIGHT`]. A choice made again applies only to requests not yet sent: what is
    /// in flight is delivered as it was asked, so on a link that narrows a deep pipeline of
    /// stored requests would take minutes to drain before the new choice shows (256 MiB is 43 s
    /// at 50 Mbit/s). On a fast link the bound is far above what `--jobs` requests hold.
    /// `None`: no bound but `--jobs`.
    pub fn in_flight_budget(&self) -> Option<u64> {
        let CompressPolicy::Auto { .. } = self.policy else {
            return None;
        };
        let rate = self.last_rate?;
        Some(((rate * IN_FLIGHT_SECONDS) as u64).max(MIN_IN_FLIGHT))
    }

    /// How many rounds of probes have chosen (the first and every one since).
    pub fn rounds(&self) -> usize {
        self.choices.len()
    }

    /// What was chosen and why: each round's choice and its probes' rates, in MB/s of raw
    /// bytes.
    pub fn summary(&self) -> String {
        let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.0}", r / 1e6));
        let round = |c: &Choice| {
            format!(
                "{:?} (probes: stored {} MB/s, compressed {} MB/s of raw bytes)",
                c.chose,
                rate(c.rate[STORED]),
                rate(c.rate[ZSTD])
            )
        };
        match self.policy {
            CompressPolicy::Fixed(c) => format!("compression fixed at {c:?}"),
            CompressPolicy::Auto { .. } => match self.choices.split_first() {
                None => "compression auto: not probed yet".into(),
                Some((first, rest)) => {
                    let mut s = format!("compression auto: {}", round(first));
                    for c in rest {
                        let why = match c.why {
                            Why::Freed => "the CPUs no longer shared",
                            Why::First | Why::Moved => "the copy's rate having moved",
                        };
                        s.push_str(&format!(", then, {why}, {}", round(c)));
                    }
                    s
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;
    const MIN: u64 = Measuring::DEFAULT.min_fetch;

    /// A round of probes at `stored` and `zstd` MB/s, at `now`.
    fn round(c: &mut CompressionChoice, now: Instant, stored: f64, zstd: f64) {
        let a = c.wants_probe(now, MIN).expect("a probe");
        assert_eq!(a, Compression::None, "stored first");
        assert_eq!(
            c.wants_probe(now, MIN),
            Some(a),
            "until answered, the same probe"
        );
        c.probed(a, 4 * MB, Duration::from_secs_f64(4.0 / stored), now);
        let undecided = c.next_request();
        let b = c.wants_probe(now, MIN).expect("the second probe");
        assert_eq!(b, Compression::Zstd(1));
        c.probed(b, 4 * MB, Duration::from_secs_f64(4.0 / zstd), now);
        assert_eq!(c.wants_probe(now, u64::MAX), None, "the round is over");
        if c.rounds() == 1 {
            assert_eq!(undecided, Compression::Zstd(1), "undecided after one");
        }
    }

    /// The first round's probes answered at `stored` and `zstd` MB/s; returns what the rest
    /// then use.
    fn probed(stored: f64, zstd: f64) -> Compression {
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, Instant::now(), stored, zstd);
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
        let t = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        assert_eq!(c.wants_probe(t, MIN - 1), None);
        assert_eq!(c.next_request(), Compression::Zstd(1));
        // A probe that delivered almost nothing (a file shorter than listed) measures nothing.
        let a = c.wants_probe(t, MIN).unwrap();
        c.probed(a, 4096, Duration::from_micros(1), t);
        let b = c.wants_probe(t, MIN).unwrap();
        c.probed(b, 4 * MB, Duration::from_secs(1), t);
        assert_eq!(c.next_request(), Compression::Zstd(1));
        assert!(c.summary().contains("stored - MB/s"), "{}", c.summary());
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        c.wants_probe(t, MIN).unwrap();
        c.probe_failed(t);
        assert_eq!(c.next_request(), Compression::Zstd(1));
        assert_eq!(c.wants_probe(t, u64::MAX), None);
    }

    #[test]
    fn fixed_is_fixed() {
        let t = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::Fixed(Compression::Zstd(3)));
        assert_eq!(c.wants_probe(t, u64::MAX), None);
        c.probed(Compression::None, 4 * MB, Duration::from_millis(1), t);
        c.delivered(u64::MAX / 2, t);
        assert_eq!(c.next_request(), Compression::Zstd(3));
        assert!(c.summary().contains("fixed"), "{}", c.summary());
    }

    /// Feeds `c` deliveries of 1 MiB at `mb_per_s` from `from` for `secs`; returns the time
    /// after the last.
    fn deliver(c: &mut CompressionChoice, from: Instant, mb_per_s: f64, secs: f64) -> Instant {
        let step = Duration::from_secs_f64(1.0 / mb_per_s);
        let mut t = from;
        while t.duration_since(from).as_secs_f64() < secs {
            t += step;
            c.delivered(MB, t);
        }
        t
    }

    /// Chosen stored on loopback (probes at 900 and 300 MB/s), the copy then delivering each
    /// `(MB/s, seconds)` of `then` in turn: the choice, the time at the end, and whether a
    /// probe is wanted then (asked, so a round has begun if it is).
    fn after_stored_choice(then: &[(f64, f64)]) -> (CompressionChoice, Instant, bool) {
        let t0 = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, t0, 900.0, 300.0);
        assert_eq!(c.next_request(), Compression::None);
        let mut t = t0;
        for &(rate, secs) in then {
            t = deliver(&mut c, t, rate, secs);
        }
        let wants = c.wants_probe(t, MIN).is_some();
        (c, t, wants)
    }

    #[test]
    fn a_steady_copy_is_not_probed_again() {
        let (c, _, wants) = after_stored_choice(&[(600.0, 120.0)]);
        assert!(!wants);
        assert_eq!(c.rounds(), 1);
        // Nor one that wavers within the drift: 600, then 350, then 1000 MB/s.
        let (_, _, wants) = after_stored_choice(&[(600.0, 30.0), (350.0, 30.0), (1000.0, 30.0)]);
        assert!(!wants);
    }

    #[test]
    fn a_link_that_narrows_is_probed_again_and_compresses() {
        // 600 MB/s, then the link falls to 25 MB/s (200 Mbit/s) for good.
        let (mut c, t, wants) = after_stored_choice(&[(600.0, 30.0), (25.0, 10.0)]);
        assert!(wants, "three slow windows in a row: probe again");
        // The round: stored alone now does 25 MB/s, compressed 2.7 to one 65.
        assert_eq!(c.next_request(), Compression::None, "until the round ends");
        c.probed(
            Compression::None,
            4 * MB,
            Duration::from_secs_f64(4.0 / 25.0),
            t,
        );
        assert_eq!(c.wants_probe(t, MIN), Some(Compression::Zstd(1)));
        c.probed(
            Compression::Zstd(1),
            4 * MB,
            Duration::from_secs_f64(4.0 / 65.0),
            t,
        );
        assert_eq!(c.next_request(), Compression::Zstd(1));
        assert_eq!(c.rounds(), 2);
        assert!(
            c.summary().contains("None (probes: stored 944 MB/s")
                && c.summary().contains("then, the copy's rate having moved, Zstd(1) (probes: stored 26 MB/s, compressed 68 MB/s"),
            "{}",
            c.summary()
        );
        // At the new rate the watch is quiet again.
        let t = deliver(&mut c, t, 65.0, 60.0);
        assert_eq!(c.wants_probe(t, MIN), None);
    }

    #[test]
    fn a_link_that_widens_is_probed_again() {
        // Compressing through 200 Mbit/s at 65 MB/s of raw bytes; then the link is lifted and
        // the compressor alone bounds the copy at 300 MB/s.
        let t0 = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, t0, 25.0, 65.0);
        let t = deliver(&mut c, t0, 65.0, 30.0);
        assert_eq!(c.wants_probe(t, MIN), None);
        let t = deliver(&mut c, t, 300.0, 10.0);
        assert!(c.wants_probe(t, MIN).is_some());
        round(&mut c, t, 900.0, 300.0);
        assert_eq!(c.next_request(), Compression::None);
    }

    #[test]
    fn a_blip_idleness_and_the_tail_do_not_probe_again() {
        // Slow for 2.5 s (at most two 2-second windows off), then back: not sustained.
        let (_, _, wants) = after_stored_choice(&[(600.0, 30.0), (25.0, 2.5), (600.0, 30.0)]);
        assert!(!wants);
        // Nothing delivered for a minute (a writer's fsync, or between fetches), then the same
        // rate again: idleness is not a slow link.
        let (mut c, t, _) = after_stored_choice(&[(600.0, 30.0)]);
        let t = deliver(&mut c, t + Duration::from_secs(60), 600.0, 30.0);
        assert_eq!(c.wants_probe(t, MIN), None);
        // Slow for good, but too little of the fetch left to be worth probing.
        let t0 = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, t0, 900.0, 300.0);
        let t = deliver(&mut c, t0, 600.0, 30.0);
        let t = deliver(&mut c, t, 25.0, 10.0);
        assert_eq!(c.wants_probe(t, MIN - 1), None);
        assert!(c.wants_probe(t, MIN).is_some());
    }

    #[test]
    fn a_narrowing_is_probed_at_once_a_widening_not_sooner_than_the_interval() {
        // A link that narrows 5 s after the choice: probed again as soon as three windows say
        // so, 20 s or not (each second stored on a thin link costs more than the probes).
        let t0 = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, t0, 900.0, 300.0);
        let t = deliver(&mut c, t0, 600.0, 5.0);
        let t = deliver(&mut c, t, 25.0, 8.0);
        assert!(t.duration_since(t0) < Measuring::DEFAULT.min_interval);
        assert!(c.wants_probe(t, MIN).is_some(), "narrowed: at once");
        // One that widens 5 s after a choice to compress waits out the 20 s.
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, t0, 25.0, 65.0);
        let t = deliver(&mut c, t0, 65.0, 5.0);
        let t = deliver(&mut c, t, 300.0, 8.0);
        assert!(t.duration_since(t0) < Measuring::DEFAULT.min_interval);
        assert_eq!(c.wants_probe(t, MIN), None, "too soon");
        let t = deliver(&mut c, t, 300.0, 10.0);
        assert!(c.wants_probe(t, MIN).is_some(), "still off, and 20 s on");
    }

    #[test]
    fn a_close_choice_to_compress_is_measured_again_once_the_cpus_are_freed() {
        let t = Instant::now();
        // QUIC on loopback with the target's WAL scan running: compressed 77 MB/s, stored 61.
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, t, 61.0, 77.0);
        assert_eq!(c.next_request(), Compression::Zstd(1));
        assert_eq!(c.wants_probe(t, MIN), None, "nothing has changed yet");
        c.cpus_freed();
        assert_eq!(
            c.wants_probe(t, MIN - 1),
            None,
            "too little left to be worth it"
        );
        // Measured again: stored now delivers three times as much.
        round(&mut c, t, 600.0, 250.0);
        assert_eq!(c.next_request(), Compression::None);
        assert_eq!(c.rounds(), 2);
        assert!(
            c.summary()
                .contains("then, the CPUs no longer shared, None (probes: stored 629 MB/s"),
            "{}",
            c.summary()
        );
        // Once only: the CPUs freed again is no reason to probe a choice to send stored.
        c.cpus_freed();
        assert_eq!(c.wants_probe(t, u64::MAX), None);
    }

    #[test]
    fn a_clear_choice_or_one_to_send_stored_stands_when_the_cpus_are_freed() {
        let t = Instant::now();
        // A thin link: compressing wins by the data's ratio, the scan or not; through the
        // benchmarks' WAN (200 Mbit/s, 50 ms) by 1.7 times, round trips weighing on it.
        for (stored, zstd) in [(25.0, 65.0), (19.0, 33.0)] {
            let mut c = CompressionChoice::new(CompressPolicy::AUTO);
            round(&mut c, t, stored, zstd);
            c.cpus_freed();
            assert_eq!(c.wants_probe(t, u64::MAX), None, "{stored} {zstd}");
        }
        // Stored, by however little: freed CPUs do not make the compressor that lost faster
        // than the link.
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        round(&mut c, t, 200.0, 240.0);
        assert_eq!(c.next_request(), Compression::None);
        c.cpus_freed();
        assert_eq!(c.wants_probe(t, u64::MAX), None);
        // Before any round there is nothing to measure again: the first round comes once.
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        c.cpus_freed();
        round(&mut c, t, 61.0, 77.0);
        assert_eq!(c.wants_probe(t, u64::MAX), None);
    }

    #[test]
    fn cpus_freed_during_a_round_measure_again_after_it() {
        let t = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        let a = c.wants_probe(t, MIN).unwrap();
        c.probed(a, 4 * MB, Duration::from_secs_f64(4.0 / 61.0), t);
        c.cpus_freed();
        let b = c.wants_probe(t, MIN).unwrap();
        assert_eq!(
            b,
            Compression::Zstd(1),
            "the round under way is finished first"
        );
        c.probed(b, 4 * MB, Duration::from_secs_f64(4.0 / 77.0), t);
        assert_eq!(
            c.wants_probe(t, MIN),
            Some(Compression::None),
            "then measured again"
        );
    }

    #[test]
    fn what_is_in_flight_follows_the_delivery() {
        let t0 = Instant::now();
        let mut c = CompressionChoice::new(CompressPolicy::AUTO);
        assert_eq!(c.in_flight_budget(), None, "nothing measured yet");
        round(&mut c, t0, 900.0, 300.0);
        assert_eq!(c.in_flight_budget(), None, "no window yet");
        // 100 MB/s: four seconds of it.
        let t = deliver(&mut c, t0, 100.0, 3.0);
        let b = c.in_flight_budget().unwrap();
        assert!((390 * MB..=410 * MB).contains(&b), "{b}");
        // A thin link: not below two requests' worth.
        deliver(&mut c, t, 2.0, 5.0);
        assert_eq!(c.in_flight_budget(), Some(MIN_IN_FLIGHT));
        let mut c = CompressionChoice::new(CompressPolicy::Fixed(Compression::None));
        c.delivered(100 * MB, t0);
        c.delivered(100 * MB, t0 + Duration::from_secs(3));
        assert_eq!(c.in_flight_budget(), None, "a fixed choice needs no bound");
    }
}
