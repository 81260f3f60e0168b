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
//! - `pg_waldump --stats` (PostgreSQL 15), which reads, checks and decodes every record the same
//!   way and prints only totals.
//!
//! Each is run `--runs` times (best and median shown); the output is MB/s (10^6 bytes of WAL
//! per second) of each and the ratios. Nothing is asserted: the numbers are the result.

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
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        gb: 1.0,
        runs: 3,
        regenerate: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--gb" => args.gb = it.next().context("--gb needs a number")?.parse()?,
            "--runs" => args.runs = it.next().context("--runs needs a number")?.parse()?,
            "--regenerate" => args.regenerate = true,
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                println!("wal_decode [--gb GB_OF_WAL] [--runs N] [--regenerate]");
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
    let options = ClusterOptions::default()
        .setting("wal_keep_size", "'100GB'")
        .setting("max_wal_size", "'100GB'")
        .setting("checkpoint_timeout", "'30s'")
        .setting("shared_buffers", "'128MB'");
    let mut c = Cluster::start_new_with(PgMajor::V15, "walbench", options);
    let start = c.current_lsn();
    let t = Instant::now();
    c.pgbench_init(50);
    eprintln!(
        "wal_decode: pgbench -i -s 50: {} MB of WAL in {:.0?}",
        (c.current_lsn().0 - start.0) / 1_000_000,
        t.elapsed()
    );
    while c.current_lsn().0 - start.0 < want {
        // A checkpoint before each round: the first change of every page after it carries a
        // full-page image.
        c.execute("CHECKPOINT");
        c.pgbench(&["-c", "4", "-j", "2", "-T", "15", "-n"]);
        eprintln!(
            "wal_decode: {} MB of WAL after {:.0?}",
            (c.current_lsn().0 - start.0) / 1_000_000,
            t.elapsed()
        );
    }
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
    let dir = cache_root().join(RECIPE);
    let set = match load(&dir)? {
        Some(set) if !args.regenerate && set.bytes() as f64 >= args.gb * 1e9 => set,
        _ => generate(&dir, args.gb)?,
    };
    // Warm the page cache so both sides read from memory.
    for s in &set.segments {
        fs::read(set.dir.join(s))?;
    }

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
         time; goal: >= 1000 MB/s and >= 3x",
        ours / theirs,
        mb_per_s(bytes, cbest) / theirs
    );
    Ok(())
}
