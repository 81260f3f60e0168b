//! WAL decoding throughput on real WAL: the committed fixtures of every major version, and, if
//! `FAILBACK_BENCH_WAL_DIR` names a pg_wal directory (with `FAILBACK_BENCH_WAL_START`, an LSN
//! where a record starts, and optionally `FAILBACK_BENCH_WAL_SEGSIZE`, default 16 MiB), the WAL
//! there. The decoder is fed 128 KiB at a time, as a reader of segment files would, and every
//! record's block references are visited.

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use failback_common::lsn::{parse_wal_file_name, segment_start};
use failback_common::wal::{Decoded, WalDecoder, WalParams};
use failback_common::{Lsn, PgMajor};

struct Wal {
    name: String,
    base: Lsn,
    start: Lsn,
    bytes: Vec<u8>,
    params: WalParams,
}

fn fixture(major: u32) -> Wal {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/wal/pg{major}"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("fixture.json")).unwrap()).unwrap();
    let seg_size = json["seg_size"].as_u64().unwrap() as u32;
    let mut bytes = Vec::new();
    let mut base = None;
    for name in json["segments"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let z = std::fs::read(dir.join(format!("{name}.zst"))).unwrap();
        let (_, segno) = parse_wal_file_name(name, seg_size).unwrap();
        base.get_or_insert(segment_start(segno, seg_size));
        bytes.extend(zstd::decode_all(&z[..]).unwrap());
    }
    Wal {
        name: format!("pg{major}"),
        base: base.unwrap(),
        start: json["start_lsn"].as_str().unwrap().parse().unwrap(),
        bytes,
        params: WalParams::new(PgMajor::from_number(major).unwrap(), seg_size),
    }
}

fn external() -> Option<Wal> {
    let dir = std::env::var("FAILBACK_BENCH_WAL_DIR").ok()?;
    let start: Lsn = std::env::var("FAILBACK_BENCH_WAL_START")
        .expect("FAILBACK_BENCH_WAL_START")
        .parse()
        .unwrap();
    let seg_size: u32 = std::env::var("FAILBACK_BENCH_WAL_SEGSIZE")
        .map(|s| s.parse().unwrap())
        .unwrap_or(16 << 20);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| parse_wal_file_name(n, seg_size).is_some())
        .collect();
    names.sort();
    let first = start.segment_number(seg_size);
    let mut bytes = Vec::new();
    let mut base = None;
    for n in names {
        let (_, segno) = parse_wal_file_name(&n, seg_size).unwrap();
        if segno < first
            || (base.is_some()
                && segment_start(segno, seg_size).0
                    != base.map_or(0, |b: Lsn| b.0) + bytes.len() as u64)
        {
            continue;
        }
        base.get_or_insert(segment_start(segno, seg_size));
        bytes.extend(std::fs::read(Path::new(&dir).join(&n)).unwrap());
    }
    Some(Wal {
        name: "external".into(),
        base: base?,
        start,
        bytes,
        params: WalParams::detect(seg_size),
    })
}

/// Decodes everything from `start`; returns (records, block references, bytes decoded).
fn decode(w: &Wal) -> (u64, u64, u64) {
    let mut dec = WalDecoder::new(w.start, w.params).unwrap();
    let (mut n, mut blocks, mut last_end) = (0u64, 0u64, w.start);
    loop {
        match dec.poll() {
            Ok(Decoded::Record(r)) => {
                n += 1;
                for b in r.blocks {
                    blocks += u64::from(b.blkno & 1);
                }
                last_end = r.end_lsn;
            }
            Ok(Decoded::NeedMore { from }) => {
                let off = (from.0 - w.base.0) as usize;
                if off >= w.bytes.len() {
                    break;
                }
                dec.feed(&w.bytes[off..(off + (128 << 10)).min(w.bytes.len())]);
            }
            Err(_) => break,
        }
    }
    (n, blocks, last_end.0 - w.start.0)
}

fn bench(c: &mut Criterion) {
    let mut wals: Vec<Wal> = [13, 14, 15, 16, 17, 18].into_iter().map(fixture).collect();
    wals.extend(external());
    let mut g = c.benchmark_group("wal_decode");
    for w in &wals {
        let (n, _, bytes) = decode(w);
        eprintln!("{}: {n} records, {bytes} bytes of WAL", w.name);
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&w.name, |b| b.iter(|| decode(w)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
