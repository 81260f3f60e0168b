//! The WAL decoder over the committed PostgreSQL 15 fixture (three 1 MB segments that a real
//! cluster wrote under pgbench and DDL; `common/tests/data/wal/pg15/`), in memory: how many
//! bytes of WAL per second one core decodes, fed whole or in 8 KB pages.
//!
//! `cargo bench -p failback-bench --bench decode_fixture`

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use failback_common::wal::{Decoded, WalDecoder, WalParams};
use failback_common::{Lsn, PgMajor};

struct Fixture {
    base: Lsn,
    seg_size: u32,
    wal: Vec<u8>,
}

fn load() -> Fixture {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/tests/data/wal/pg15");
    let json: String = std::fs::read_to_string(dir.join("fixture.json")).expect("fixture.json");
    // The segment names and size, without a JSON parser: "segments": ["...", ...].
    let seg_size: u32 = json
        .split("\"seg_size\":")
        .nth(1)
        .and_then(|s| s.trim_start().split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("seg_size in fixture.json");
    let names: Vec<&str> = json
        .split("\"segments\":")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("segments in fixture.json")
        .split('"')
        .filter(|s| s.len() == 24)
        .collect();
    let mut wal = Vec::new();
    for name in &names {
        let z = std::fs::read(dir.join(format!("{name}.zst"))).expect("segment");
        wal.extend(zstd::decode_all(&z[..]).expect("zstd"));
    }
    let (_, segno) =
        failback_common::lsn::parse_wal_file_name(names[0], seg_size).expect("a segment name");
    Fixture {
        base: failback_common::lsn::segment_start(segno, seg_size),
        seg_size,
        wal,
    }
}

/// Decodes all of `fx`, feeding `chunk` bytes at a time; returns (records, block refs).
fn decode(fx: &Fixture, chunk: usize) -> (u64, u64) {
    let params = WalParams::new(PgMajor::V15, fx.seg_size);
    let mut dec = WalDecoder::new_at_page(fx.base, params).expect("valid parameters");
    let (mut records, mut blocks) = (0, 0);
    let mut off = 0;
    loop {
        match dec.poll() {
            Ok(Decoded::Record(r)) => {
                records += 1;
                blocks += r.blocks.len() as u64;
            }
            Ok(Decoded::NeedMore { .. }) => {
                if off >= fx.wal.len() {
                    break;
                }
                let end = (off + chunk).min(fx.wal.len());
                dec.feed(&fx.wal[off..end]);
                off = end;
            }
            Err(_) => break,
        }
    }
    (records, blocks)
}

fn bench(c: &mut Criterion) {
    let fx = load();
    let (records, _) = decode(&fx, fx.wal.len());
    assert!(records > 10_000, "only {records} records in the fixture");
    let mut g = c.benchmark_group("decode_pg15_fixture");
    g.throughput(Throughput::Bytes(fx.wal.len() as u64));
    g.sample_size(20);
    g.bench_function("whole_segments", |b| {
        b.iter(|| decode(&fx, fx.seg_size as usize))
    });
    g.bench_function("8k_pages", |b| b.iter(|| decode(&fx, 8192)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
