//! `wal_decode`: how fast failback's WAL decoder reads real WAL, next to `pg_waldump --stats`.
//!
//! ```text
//! cargo run --release -p failback-bench --bin wal_decode [-- --gb 1.0 --runs 3 --regenerate]
//! ```
//!
//! The WAL is made once by a PostgreSQL 15 cluster of the test bed and cached under the cargo
//! target directory (`<target>/bench-wal/`, or `FAILBACK_BENCH_WAL`): `pgbench -i` at scale 50
//! (bulk loads, index builds), then rounds of 15 s of `pgbench`, each after a CHECKPOINT (and
//! with `wal_log_hints`), until at least `--gb` of WAL exist, so that full-page images are
//! common; `wal_keep_size` keeps every segment. Later runs reuse the cache.
//!
//! Then, in one run, over the same segments and the same LSN range:
//!
//! - the decoder, single-threaded: each segment read from the (warm) page cache into one reused
//!   buffer and fed whole, every record polled, records, block references and full-page images
//!   counted; and the same with every segment already in memory (the decoder alone);
//! - the decoder reading the files 1 MB at a time (as `failback` itself reads WAL), which keeps
//!   the buffers in the CPU caches;
//! - the scan a rewind does, through `failback_datadir::wal::WalReader` (the code `failback
//!   rewind` runs on the target's WAL): segments read 128 KiB at a time straight into the
//!   decoder, image bytes of records spanning pages checked but not copied, the blocks
//!   collected as changed blocks; on one thread (`changes`) and on every core
//!   (`changes_in_parallel`, each segment decoded on its own), over a data directory whose
//!   `pg_wal` is a link to the cached segments;
//! - `pg_waldump --stats` (PostgreSQL 15), which reads, checks and decodes every record the same
//!   way and prints only totals.
//!
//! Each is run `--runs` times (best and median shown); the output is MB/s (10^6 bytes of WAL
//! per second) of each and the ratios, and a markdown table of the medians. The machine's
//! load average is printed before and after. Nothing is asserted: the numbers are the result.
//!
//! `--rewind` measures a rewind's own scan instead: see below.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use failback_common::wal::{Decoded, WalDecoder, WalParams};
use failback_common::{Lsn, PgMajor};
use failback_tests::{Cluster, ClusterOptions, StopMode, binaries};

/// Version of the cached WAL's recipe: bump it when the workload changes.
const RECIPE: &str = "pg15-s50-v1";
const SEG_SIZE: u32 = 16 << 20;

struct Args {
    gb: f64,
    runs: usize,
    regenerate: bool,
    /// Time a rewind's own scan (the whole `failback rewind -n` process) instead.
    rewind: bool,
    /// With `--rewind`: another build's `failback`, run beside this one's in every round.
    baseline: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        gb: 1.0,
        runs: 3,
        regenerate: false,
        rewind: false,
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--gb" => args.gb = it.next().context("--gb needs a number")?.parse()?,
            "--runs" => args.runs = it.next().context("--runs needs a number")?.parse()?,
            "--regenerate" => args.regenerate = true,
            "--rewind" => args.rewind = true,
            "--baseline" => {
                args.baseline = Some(
                    it.next()
                        .context("--baseline needs a failback binary")?
                        .into(),
                )
            }
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "wal_decode [--gb GB_OF_WAL] [--runs N] [--regenerate] [--rewind [--baseline FAILBACK]]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(args.runs >= 1, "--runs must be at least 1");
    Ok(args)
}

/// `FAILBACK_BENCH_WAL`, or `bench-wal/` in the cargo target directory this binary was built
/// in (the directory marked with CACHEDIR.TAG above the binary).
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FAILBACK_BENCH_WAL") {
        return PathBuf::from(dir);
    }
    failback_tests::binaries::target_dir().join("bench-wal")
}

/// The cached WAL: segment files in LSN order, all of timeline 1.
struct WalSet {
    dir: PathBuf,
    segments: Vec<String>,
}

impl WalSet {
    fn bytes(&self) -> u64 {
        self.segments.len() as u64 * u64::from(SEG_SIZE)
    }

    fn first_lsn(&self) -> Result<Lsn> {
        let first = self.segments.first().context("no segments")?;
        let (_, segno) = failback_common::lsn::parse_wal_file_name(first, SEG_SIZE)
            .with_context(|| format!("{first} is not a WAL file name"))?;
        Ok(failback_common::lsn::segment_start(segno, SEG_SIZE))
    }
}

fn load(dir: &Path) -> Result<Option<WalSet>> {
    let Ok(list) = fs::read_to_string(dir.join("SEGMENTS")) else {
        return Ok(None);
    };
    let segments: Vec<String> = list.lines().map(str::to_string).collect();
    for s in &segments {
        let len = fs::metadata(dir.join(s))
            .with_context(|| format!("cached segment {s} in {}", dir.display()))?
            .len();
        ensure!(
            len == u64::from(SEG_SIZE),
            "cached segment {s} has {len} bytes"
        );
    }
    Ok(Some(WalSet {
        dir: dir.to_path_buf(),
        segments,
    }))
}

/// Makes at least `gb` GB of WAL with a PostgreSQL 15 cluster and copies its segments to `dir`.
fn generate(dir: &Path, gb: f64) -> Result<WalSet> {
    let want = (gb * 1e9) as u64;
    eprintln!(
        "wal_decode: generating {gb} GB of WAL with PostgreSQL 15 into {} (once; minutes)",
        dir.display()
    );
    let mut c = Cluster::start_new_with(PgMajor::V15, "walbench", keeping_all_wal());
    let start = c.current_lsn();
    let t = Instant::now();
    c.pgbench_init(50);
    eprintln!(
        "wal_decode: pgbench -i -s 50: {} MB of WAL in {:.0?}",
        (c.current_lsn().0 - start.0) / 1_000_000,
        t.elapsed()
    );
    pgbench_until(&c, start, want, t);
    c.stop(StopMode::Fast);

    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let pg_wal = c.data_dir().join("pg_wal");
    let mut segments: Vec<String> = fs::read_dir(&pg_wal)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| failback_common::lsn::parse_wal_file_name(n, SEG_SIZE).is_some())
        .collect();
    segments.sort();
    // Contiguous, timeline 1: the first segment initdb wrote onward, every one kept.
    for w in segments.windows(2) {
        let a = failback_common::lsn::parse_wal_file_name(&w[0], SEG_SIZE).unwrap_or((0, 0));
        let b = failback_common::lsn::parse_wal_file_name(&w[1], SEG_SIZE).unwrap_or((0, 0));
        ensure!(
            a.0 == 1 && b.0 == 1 && b.1 == a.1 + 1,
            "pg_wal is not one run of segments: {} then {}",
            w[0],
            w[1]
        );
    }
    for s in &segments {
        fs::copy(pg_wal.join(s), tmp.join(s)).with_context(|| format!("copying {s}"))?;
    }
    fs::write(tmp.join("SEGMENTS"), segments.join("\n") + "\n")?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&tmp, dir)?;
    load(dir)?.context("the cache just written cannot be read")
}

#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    records: u64,
    blocks: u64,
    images: u64,
    first: Lsn,
    /// Where the last record ends.
    end: Lsn,
}

/// Where the decoder's input comes from.
enum Source<'a> {
    /// The segment files (from the page cache), read `chunk` bytes at a time into one reused
    /// buffer: a whole segment, or less.
    Files { chunk: usize },
    /// The segments already in memory, fed whole.
    Memory(&'a [Vec<u8>]),
}

/// The decoder over every segment; stops at the end of valid WAL.
fn decode(set: &WalSet, source: Source<'_>) -> Result<Counts> {
    let params = WalParams::new(PgMajor::V15, SEG_SIZE);
    let mut dec = WalDecoder::new_at_page(set.first_lsn()?, params)?;
    let mut n = Counts::default();
    let seg = SEG_SIZE as usize;
    let chunk = match source {
        Source::Files { chunk } => chunk.clamp(1, seg),
        Source::Memory(_) => seg,
    };
    let mut buf = vec![0u8; chunk];
    // The segment being read, and how much of it was fed.
    let mut next = 0;
    let mut file: Option<fs::File> = None;
    let mut done = seg;
    loop {
        match dec.poll() {
            Ok(Decoded::Record(r)) => {
                if n.records == 0 {
                    n.first = r.lsn;
                }
                n.records += 1;
                n.blocks += r.blocks.len() as u64;
                n.images += r.blocks.iter().filter(|b| b.image.is_some()).count() as u64;
                n.end = r.end_lsn;
            }
            Ok(Decoded::NeedMore { .. }) => {
                if done == seg {
                    let Some(name) = set.segments.get(next) else {
                        break;
                    };
                    if let Source::Memory(segments) = &source {
                        dec.feed(&segments[next]);
                        next += 1;
                        continue;
                    }
                    let path = set.dir.join(name);
                    file =
                        Some(fs::File::open(&path).with_context(|| format!("{}", path.display()))?);
                    next += 1;
                    done = 0;
                }
                let f = file.as_ref().context("a segment is open")?;
                f.read_exact_at(&mut buf, done as u64)
                    .with_context(|| format!("reading segment {}", next - 1))?;
                dec.feed(&buf);
                done += chunk;
            }
            Err(e) if e.is_end_of_wal() => break,
            Err(e) => bail!("decoding failed: {e}"),
        }
    }
    Ok(n)
}

/// Settings that keep every segment written, with few checkpoints.
fn keeping_all_wal() -> ClusterOptions {
    ClusterOptions::default()
        .setting("wal_keep_size", "'100GB'")
        .setting("max_wal_size", "'100GB'")
        .setting("checkpoint_timeout", "'30s'")
        .setting("shared_buffers", "'128MB'")
}

/// Rounds of a CHECKPOINT and 15 s of pgbench on `c` until it has written `want` bytes of WAL
/// since `start`.
fn pgbench_until(c: &Cluster, start: Lsn, want: u64, t: Instant) {
    while c.current_lsn().0 - start.0 < want {
        // A checkpoint before each round: the first change of every page after it carries a
        // full-page image, as in any busy cluster.
        c.execute("CHECKPOINT");
        c.pgbench(&["-c", "4", "-j", "2", "-T", "15", "-n"]);
        eprintln!(
            "wal_decode: {} MB of WAL since {start}, {:.0?}",
            (c.current_lsn().0 - start.0) / 1_000_000,
            t.elapsed()
        );
    }
}

/// `pg_waldump --stats` over `[first, end)`; returns its record count.
fn waldump(set: &WalSet, n: &Counts) -> Result<u64> {
    let out = Command::new(binaries::pg_waldump())
        .arg("--stats")
        .arg("-p")
        .arg(&set.dir)
        .args(["-s", &n.first.to_string(), "-e", &n.end.to_string()])
        .output()
        .context("running pg_waldump")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pg_waldump failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // "Total    <count>    ..." is the last line of the statistics.
    stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("Total"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no Total line in pg_waldump's output:\n{stdout}"))
}

/// Runs `f` `runs` times; returns (best, median) and the last result.
fn timed<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<(Duration, Duration, T)> {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed());
    }
    times.sort();
    Ok((times[0], times[times.len() / 2], last.context("no run")?))
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.rewind {
        return rewind_scan(&args);
    }
    let dir = cache_root().join(RECIPE);
    let set = match load(&dir)? {
        Some(set) if !args.regenerate && set.bytes() as f64 >= args.gb * 1e9 => set,
        _ => generate(&dir, args.gb)?,
    };
    // Warm the page cache so both sides read from memory.
    for s in &set.segments {
        fs::read(set.dir.join(s))?;
    }
    println!("load average before: {}", load_average());

    let (best, median, n) = timed(args.runs, || {
        decode(
            &set,
            Source::Files {
                chunk: SEG_SIZE as usize,
            },
        )
    })?;
    let bytes = n.end.0 - n.first.0;
    println!(
        "WAL: {} segments of PostgreSQL 15 in {}, {:.2} GB from {} to {}",
        set.segments.len(),
        set.dir.display(),
        bytes as f64 / 1e9,
        n.first,
        n.end
    );
    println!(
        "     {} records, {} block references, {} full-page images",
        n.records, n.blocks, n.images
    );
    let ours = mb_per_s(bytes, best);
    println!(
        "failback decoder (1 thread, reading the files): best {best:.2?} = {ours:.0} MB/s, median \
         {median:.2?} = {:.0} MB/s",
        mb_per_s(bytes, median)
    );
    let in_memory: Vec<Vec<u8>> = set
        .segments
        .iter()
        .map(|s| fs::read(set.dir.join(s)))
        .collect::<Result<_, _>>()?;
    let (mbest, mmedian, _) = timed(args.runs, || decode(&set, Source::Memory(&in_memory)))?;
    println!(
        "failback decoder (1 thread, WAL in memory):     best {mbest:.2?} = {:.0} MB/s, median \
         {mmedian:.2?} = {:.0} MB/s",
        mb_per_s(bytes, mbest),
        mb_per_s(bytes, mmedian)
    );
    drop(in_memory);
    let (cbest, cmedian, _) = timed(args.runs, || decode(&set, Source::Files { chunk: 1 << 20 }))?;
    println!(
        "failback decoder (1 thread, files read 1 MB at a time): best {cbest:.2?} = {:.0} MB/s, \
         median {cmedian:.2?} = {:.0} MB/s",
        mb_per_s(bytes, cbest),
        mb_per_s(bytes, cmedian)
    );
    let view = datadir_view(&set)?;
    let history = failback_common::timeline::TimeLineHistory::single(1);
    let scan = |threads: usize| -> Result<u64> {
        let params = WalParams::new(PgMajor::V15, SEG_SIZE);
        let mut reader = failback_datadir::wal::WalReader::new(&view, &history, params, None);
        let changes = if threads == 1 {
            reader.changes(n.first, n.end, 131072, || {})
        } else {
            reader.changes_in_parallel(n.first, n.end, 131072, threads, || {})
        }?;
        Ok(changes.records())
    };
    let (s1best, s1median, s1records) = timed(args.runs, || scan(1))?;
    let threads = failback_datadir::wal::cores();
    let (spbest, spmedian, sprecords) = timed(args.runs, || scan(threads))?;
    ensure!(
        s1records == sprecords,
        "the scans counted {s1records} and {sprecords} records"
    );
    println!(
        "failback rewind's scan (1 thread):                best {s1best:.2?} = {:.0} MB/s, median \
         {s1median:.2?} = {:.0} MB/s",
        mb_per_s(bytes, s1best),
        mb_per_s(bytes, s1median)
    );
    println!(
        "failback rewind's scan ({threads} threads):               best {spbest:.2?} = {:.0} MB/s, median \
         {spmedian:.2?} = {:.0} MB/s",
        mb_per_s(bytes, spbest),
        mb_per_s(bytes, spmedian)
    );
    let (wbest, wmedian, count) = timed(args.runs, || waldump(&set, &n))?;
    let theirs = mb_per_s(bytes, wbest);
    println!(
        "pg_waldump --stats (reading the files):          best {wbest:.2?} = {theirs:.0} MB/s, \
         median {wmedian:.2?} = {:.0} MB/s",
        mb_per_s(bytes, wmedian)
    );
    if count != n.records {
        println!(
            "note: pg_waldump counted {count} records, the decoder {}",
            n.records
        );
    }
    println!(
        "ratio (best, both reading the files): {:.2}x pg_waldump whole segments, {:.2}x 1 MB at a \
         time, {:.2}x the rewind's scan on 1 thread, {:.2}x on {threads}; goal: >= 3x",
        ours / theirs,
        mb_per_s(bytes, cbest) / theirs,
        mb_per_s(bytes, s1best) / theirs,
        mb_per_s(bytes, spbest) / theirs
    );
    if s1records != n.records {
        println!(
            "note: the rewind's scan counted {s1records} records, the decoder {}",
            n.records
        );
    }
    let wm = mb_per_s(bytes, wmedian);
    println!();
    println!(
        "| medians of {} runs, {:.2} GB of WAL | MB/s | vs pg_waldump --stats |",
        args.runs,
        bytes as f64 / 1e9
    );
    println!("|---|---:|---:|");
    for (name, d) in [
        ("decoder, 1 thread, whole segments read", median),
        ("decoder, 1 thread, WAL in memory", mmedian),
        ("decoder, 1 thread, files read 1 MB at a time", cmedian),
        ("rewind's scan (datadir `changes`), 1 thread", s1median),
        (
            "rewind's scan (datadir `changes_in_parallel`), all cores",
            spmedian,
        ),
        ("`pg_waldump --stats`", wmedian),
    ] {
        let m = mb_per_s(bytes, d);
        println!("| {name} | {m:.0} | {:.2}x |", m / wm);
    }
    println!("load average after: {}", load_average());
    Ok(())
}

/// `/proc/loadavg`'s three averages: the machine is shared.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A data directory whose `pg_wal` is a link to the cached segments, for the scan a rewind
/// does (which reads a data directory's WAL).
fn datadir_view(set: &WalSet) -> Result<PathBuf> {
    let view = set.dir.with_extension("datadir");
    let link = view.join("pg_wal");
    if fs::read_link(&link).ok().as_deref() != Some(set.dir.as_path()) {
        let _ = fs::remove_dir_all(&view);
        fs::create_dir_all(&view)?;
        std::os::unix::fs::symlink(&set.dir, &link)?;
    }
    Ok(view)
}

// ---- A rewind's own scan ----
//
// `--rewind`: a diverged PostgreSQL 15 pair of the test bed (a primary and a streaming standby
// of it, the standby promoted, then rounds of a CHECKPOINT and 15 s of pgbench on the old
// primary until it has written at least `--gb` of WAL since the divergence, both shut down),
// cached as two data directories under `<target>/bench-wal/`. Then, in turns, `--runs` times:
// the whole process `failback rewind -n -D old --source-pgdata new` (a dry run, which reads
// and decodes the target's WAL from the divergence on as a real rewind does, and plans), and
// `pg_waldump --stats` over the same range of the target's WAL (from the divergence to the end
// of its last checkpoint record). Medians are compared; failback's report gives the time of
// its scan alone (`seconds.wal_scan`) beside the whole process. `--baseline FAILBACK` runs
// another build's failback too in every round (each round runs every tool once, so all share
// the machine's load of the moment), to show what a change gained.

/// Version of the cached pair's recipe: bump it when the workload changes.
const PAIR_RECIPE: &str = "pg15-rewind-s10-v1";

/// The cached pair: `old/` (the target) and `new/` (the source), shut down.
struct PairSet {
    dir: PathBuf,
    /// Where the histories part (the new primary's timeline 2 begins).
    divergence: Lsn,
    /// The end of the target's last checkpoint record: where its WAL ends.
    end: Lsn,
}

impl PairSet {
    fn target(&self) -> PathBuf {
        self.dir.join("old")
    }
    fn source(&self) -> PathBuf {
        self.dir.join("new")
    }
    fn bytes(&self) -> u64 {
        self.end.0 - self.divergence.0
    }
}

fn load_pair(dir: &Path) -> Result<Option<PairSet>> {
    if !dir.join("READY").exists() {
        return Ok(None);
    }
    let history = fs::read_to_string(dir.join("new/pg_wal/00000002.history"))
        .context("the source's timeline history")?;
    let divergence: Lsn = history
        .lines()
        .find_map(|l| l.split_whitespace().nth(1))
        .context("an empty timeline history")?
        .parse()
        .map_err(|e| anyhow::anyhow!("a switch point in the history: {e:?}"))?;
    let control = failback_common::control::ControlFileData::parse(&fs::read(
        dir.join("old/global/pg_control"),
    )?)
    .map_err(|e| anyhow::anyhow!("the target's pg_control: {e}"))?;
    let end = record_end(
        &dir.join("old/pg_wal"),
        control.checkPoint,
        control.xlog_seg_size,
    )?;
    Ok(Some(PairSet {
        dir: dir.to_path_buf(),
        divergence,
        end,
    }))
}

/// Where the record at `lsn` in timeline 1's segments in `pg_wal` ends.
fn record_end(pg_wal: &Path, lsn: Lsn, seg_size: u32) -> Result<Lsn> {
    let mut dec = WalDecoder::new(lsn, WalParams::new(PgMajor::V15, seg_size))?;
    loop {
        match dec.poll() {
            Ok(Decoded::Record(r)) => return Ok(r.end_lsn),
            Ok(Decoded::NeedMore { from }) => {
                let segno = from.segment_number(seg_size);
                let name = failback_common::lsn::wal_file_name(1, segno, seg_size);
                let seg = fs::read(pg_wal.join(&name)).with_context(|| name.clone())?;
                let off = from.segment_offset(seg_size) as usize;
                dec.feed(seg.get(off..).unwrap_or(&[]));
            }
            Err(e) => bail!("reading the record at {lsn}: {e}"),
        }
    }
}

fn generate_pair(dir: &Path, gb: f64) -> Result<PairSet> {
    let want = (gb * 1e9) as u64;
    eprintln!(
        "wal_decode: building a diverged PostgreSQL 15 pair with {gb} GB of the old primary's \
         WAL after the divergence into {} (once; minutes)",
        dir.display()
    );
    let mut old = Cluster::start_new_with(PgMajor::V15, "walbench-old", keeping_all_wal());
    ensure!(old.pgbench_init(10).status.success(), "pgbench -i failed");
    old.execute("CHECKPOINT");
    let mut new = old.create_standby("walbench-new");
    new.wait_for_catchup(&old);
    new.promote();
    new.stop(StopMode::Fast);
    pgbench_until(&old, old.current_lsn(), want, Instant::now());
    old.stop(StopMode::Fast);
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (from, to) in [(old.data_dir(), "old"), (new.data_dir(), "new")] {
        let st = Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(tmp.join(to))
            .status()?;
        ensure!(st.success(), "cp -a {} failed", from.display());
    }
    fs::write(tmp.join("READY"), "")?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&tmp, dir)?;
    load_pair(dir)?.context("the pair just cached cannot be read")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rewind_scan(args: &Args) -> Result<()> {
    let dir = cache_root().join(PAIR_RECIPE);
    let pair = match load_pair(&dir)? {
        Some(p) if !args.regenerate && p.bytes() as f64 >= args.gb * 1e9 => p,
        _ => generate_pair(&dir, args.gb)?,
    };
    let mut builds = vec![(
        "`failback rewind -n`",
        failback_bench::pair::workspace_binary("failback", None),
    )];
    if let Some(b) = &args.baseline {
        builds.push(("baseline `failback rewind -n`", b.clone()));
    }
    // Warm the page cache so every tool reads the WAL from memory.
    for e in fs::read_dir(pair.target().join("pg_wal"))?.flatten() {
        if e.path().is_file() {
            fs::read(e.path())?;
        }
    }
    let bytes = pair.bytes();
    println!(
        "target WAL from the divergence {} to the end of its last checkpoint record {}: {:.2} GB \
         (PostgreSQL 15, {})",
        pair.divergence,
        pair.end,
        bytes as f64 / 1e9,
        pair.dir.display()
    );
    println!("load average before: {}", load_average());
    let report =
        std::env::temp_dir().join(format!("wal_decode-report-{}.json", std::process::id()));
    // Per build: (wall, cpu, the scan's own seconds) of every run; then pg_waldump's.
    let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); builds.len() + 1];
    for run in 1..=args.runs {
        let mut line = format!("run {run}:");
        for (i, (name, bin)) in builds.iter().enumerate() {
            let c = failback_bench::measure::run(
                Command::new(bin)
                    .args(["rewind", "-n", "-D"])
                    .arg(pair.target())
                    .arg("--source-pgdata")
                    .arg(pair.source())
                    .arg("--report")
                    .arg(&report),
            );
            ensure!(c.exit_code == 0, "{name} failed:\n{}", c.stderr);
            let r: serde_json::Value = serde_json::from_slice(&fs::read(&report)?)?;
            ensure!(
                r["target_changes"]["found_by"] == "wal",
                "{name} did not read the target's WAL: {}",
                r["target_changes"]
            );
            let scan = r["seconds"]["wal_scan"].as_f64().unwrap_or(f64::NAN);
            let (wall, cpu) = (c.wall.as_secs_f64(), c.cpu.as_secs_f64());
            line += &format!(" {name} {wall:.3} s (cpu {cpu:.2} s, its scan {scan:.3} s),");
            runs[i].push((wall, cpu, scan));
        }
        let w = failback_bench::measure::run(
            Command::new(binaries::pg_waldump())
                .arg("--stats")
                .arg("-p")
                .arg(pair.target().join("pg_wal"))
                .args(["-s", &pair.divergence.to_string()])
                .args(["-e", &pair.end.to_string()]),
        );
        ensure!(w.exit_code == 0, "pg_waldump failed:\n{}", w.stderr);
        let (wall, cpu) = (w.wall.as_secs_f64(), w.cpu.as_secs_f64());
        println!("{line} pg_waldump --stats {wall:.3} s (cpu {cpu:.2} s)");
        runs[builds.len()].push((wall, cpu, f64::NAN));
    }
    let _ = fs::remove_file(&report);
    let mb = |s: f64| bytes as f64 / 1e6 / s;
    let med =
        |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| median(v.iter().map(f).collect());
    let t = med(&runs[builds.len()], |r| r.0);
    println!();
    println!(
        "| medians of {} runs, {:.2} GB of WAL | wall | MB/s | cpu | vs pg_waldump --stats |",
        args.runs,
        bytes as f64 / 1e9
    );
    println!("|---|---:|---:|---:|---:|");
    for (i, (name, _)) in builds.iter().enumerate() {
        let (o, c, s) = (
            med(&runs[i], |r| r.0),
            med(&runs[i], |r| r.1),
            med(&runs[i], |r| r.2),
        );
        println!(
            "| {name}, whole process | {o:.3} s | {:.0} | {c:.2} s | {:.2}x |",
            mb(o),
            t / o
        );
        println!(
            "| its WAL scan (report `seconds.wal_scan`) | {s:.3} s | {:.0} | | {:.2}x |",
            mb(s),
            t / s
        );
    }
    println!(
        "| `pg_waldump --stats`, same range | {t:.3} s | {:.0} | {:.2} s | 1.00x |",
        mb(t),
        med(&runs[builds.len()], |r| r.1)
    );
    println!("load average after: {}", load_average());
    Ok(())
}
