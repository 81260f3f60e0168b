//! A fixed amount of decoding work for measuring the decoder outside criterion (for example
//! under `perf stat -e cycles:u`, which is not disturbed by other processes on a busy machine):
//! `cargo test --release -p failback-common --test wal_throughput -- --ignored --nocapture`.
//! Decodes every fixture `FAILBACK_THROUGHPUT_ROUNDS` times (default 20), or the pg_wal
//! directory named by `FAILBACK_BENCH_WAL_DIR` from `FAILBACK_BENCH_WAL_START` (16 MiB
//! segments unless `FAILBACK_BENCH_WAL_SEGSIZE` says otherwise). Prints bytes and wall time; it
//! asserts nothing about speed (timings belong in benchmarks).

mod wal_support;

use failback_common::Lsn;
use failback_common::lsn::{parse_wal_file_name, segment_start};
use failback_common::wal::{Decoded, WalDecoder, WalParams};

fn decode(wal: &[u8], base: Lsn, start: Lsn, params: WalParams) -> (u64, u64) {
    let mut dec = WalDecoder::new(start, params).unwrap();
    let (mut n, mut end) = (0u64, start);
    loop {
        match dec.poll() {
            Ok(Decoded::Record(r)) => {
                n += 1;
                end = r.end_lsn;
            }
            Ok(Decoded::NeedMore { from }) => {
                let off = (from.0 - base.0) as usize;
                if off >= wal.len() {
                    break;
                }
                dec.feed(&wal[off..(off + (128 << 10)).min(wal.len())]);
            }
            Err(_) => break,
        }
    }
    (n, end.0 - start.0)
}

#[test]
#[ignore]
fn decode_throughput() {
    let rounds: u32 = std::env::var("FAILBACK_THROUGHPUT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut inputs = Vec::new();
    if let Ok(dir) = std::env::var("FAILBACK_BENCH_WAL_DIR") {
        let start: Lsn = std::env::var("FAILBACK_BENCH_WAL_START")
            .unwrap()
            .parse()
            .unwrap();
        let seg: u32 = std::env::var("FAILBACK_BENCH_WAL_SEGSIZE")
            .map(|s| s.parse().unwrap())
            .unwrap_or(16 << 20);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                parse_wal_file_name(n, seg).is_some_and(|(_, s)| s >= start.segment_number(seg))
            })
            .collect();
        names.sort();
        let (_, first) = parse_wal_file_name(&names[0], seg).unwrap();
        let mut wal = Vec::new();
        for n in &names {
            wal.extend(std::fs::read(std::path::Path::new(&dir).join(n)).unwrap());
        }
        inputs.push((
            "external".to_string(),
            wal,
            segment_start(first, seg),
            start,
            WalParams::detect(seg),
        ));
    } else {
        for v in [13, 14, 15, 16, 17, 18] {
            let fx = wal_support::load(v);
            let start = fx.lsn("start_lsn");
            let params = fx.params();
            inputs.push((format!("pg{v}"), fx.wal, fx.base, start, params));
        }
    }
    let mut total_bytes = 0u64;
    let t = std::time::Instant::now();
    for _ in 0..rounds {
        for (_, wal, base, start, params) in &inputs {
            total_bytes += decode(wal, *base, *start, *params).1;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    for (name, wal, base, start, params) in &inputs {
        let (n, bytes) = decode(wal, *base, *start, *params);
        println!("{name}: {n} records, {bytes} bytes");
    }
    println!(
        "{total_bytes} bytes in {secs:.3} s wall: {:.0} MB/s",
        total_bytes as f64 / secs / 1e6
    );
}
