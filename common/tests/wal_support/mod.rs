//! Shared helpers for the WAL decoder tests: loading the fixtures that real clusters wrote
//! (common/tests/data/wal/pg<major>/, made by generate.sh there) and driving the decoder over
//! them.
#![allow(dead_code)]

use std::path::PathBuf;

use failback_common::wal::{BlockRef, Decoded, WalDecoder, WalError, WalParams, WalRecord};
use failback_common::{Lsn, PgMajor};

pub struct Fixture {
    pub major: PgMajor,
    pub dir: PathBuf,
    pub json: serde_json::Value,
    pub seg_size: u32,
    /// (file name, decompressed segment) in order.
    pub segments: Vec<(String, Vec<u8>)>,
    /// LSN of the first byte of the first segment.
    pub base: Lsn,
    /// The segments back to back.
    pub wal: Vec<u8>,
}

impl Fixture {
    pub fn lsn(&self, key: &str) -> Lsn {
        self.json[key]
            .as_str()
            .unwrap_or_else(|| panic!("fixture.json has no {key}"))
            .parse()
            .unwrap()
    }
    pub fn oid(&self, key: &str) -> u32 {
        self.json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key}")) as u32
    }
    /// (spc, db, relfilenode) of a known table.
    pub fn table(&self, name: &str) -> (u32, u32, u32) {
        let t = &self.json["tables"][name];
        let g = |k: &str| {
            t[k].as_u64()
                .unwrap_or_else(|| panic!("table {name} lacks {k}")) as u32
        };
        (g("spc"), g("db"), g("relfilenode"))
    }
    pub fn params(&self) -> WalParams {
        WalParams::new(self.major, self.seg_size)
    }
    pub fn end(&self) -> Lsn {
        Lsn(self.base.0 + self.wal.len() as u64)
    }
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/wal")
}

pub fn load(major: u32) -> Fixture {
    load_dir(&format!("pg{major}"))
}

/// Loads the fixture in `tests/data/wal/<name>/`.
pub fn load_dir(name: &str) -> Fixture {
    let dir = data_dir().join(name);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("fixture.json")).unwrap()).unwrap();
    let seg_size = json["seg_size"].as_u64().unwrap() as u32;
    let mut segments = Vec::new();
    let mut wal = Vec::new();
    let mut base = None;
    for name in json["segments"].as_array().unwrap() {
        let name = name.as_str().unwrap().to_string();
        let z = std::fs::read(dir.join(format!("{name}.zst"))).unwrap();
        let seg = zstd::decode_all(&z[..]).unwrap();
        assert_eq!(seg.len(), seg_size as usize, "{name}");
        let (_, segno) = failback_common::lsn::parse_wal_file_name(&name, seg_size).unwrap();
        let start = failback_common::lsn::segment_start(segno, seg_size);
        match base {
            None => base = Some(start),
            Some(b) => assert_eq!(start.0, b.0 + wal.len() as u64, "segments are contiguous"),
        }
        wal.extend_from_slice(&seg);
        segments.push((name, seg));
    }
    let major = json["major"].as_u64().unwrap() as u32;
    Fixture {
        major: PgMajor::from_number(major).unwrap(),
        dir,
        json,
        seg_size,
        segments,
        base: base.unwrap(),
        wal,
    }
}

/// A record copied out of the decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub lsn: Lsn,
    pub end: Lsn,
    pub prev: Lsn,
    pub xid: u32,
    pub rmid: u8,
    pub info: u8,
    pub tot_len: u32,
    pub rmgr: &'static str,
    pub type_name: &'static str,
    pub blocks: Vec<BlockRef>,
    pub main_data: Vec<u8>,
    pub kind: String,
    pub fpi_len: u32,
}

impl Rec {
    pub fn from(r: &WalRecord<'_>) -> Rec {
        Rec {
            lsn: r.lsn,
            end: r.end_lsn,
            prev: r.xl_prev(),
            xid: r.xid(),
            rmid: r.rmid(),
            info: r.info(),
            tot_len: r.tot_len(),
            rmgr: r.rmgr_name(),
            type_name: r.record_type(),
            blocks: r.blocks.to_vec(),
            main_data: r.main_data.to_vec(),
            kind: format!("{:?}", r.kind),
            fpi_len: r.fpi_len(),
        }
    }
}

/// How a decoding run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The decoder wanted bytes past the end of the given WAL.
    NeedMore(Lsn),
    Error(WalError),
}

/// Decodes `wal` (starting at LSN `base`) from `start`, feeding at most `chunk` bytes at a time,
/// calling `f` on every record. Stops at the first error or when bytes past the end are needed.
pub fn run(
    wal: &[u8],
    base: Lsn,
    mut dec: WalDecoder,
    chunk: usize,
    mut f: impl FnMut(&WalRecord<'_>),
) -> Outcome {
    loop {
        match dec.poll() {
            Ok(Decoded::Record(r)) => f(&r),
            Ok(Decoded::NeedMore { from }) => {
                let off = from
                    .0
                    .checked_sub(base.0)
                    .expect("needs bytes before the WAL given") as usize;
                if off >= wal.len() {
                    return Outcome::NeedMore(from);
                }
                let end = (off + chunk).min(wal.len());
                dec.feed(&wal[off..end]);
            }
            Err(e) => return Outcome::Error(e),
        }
    }
}

pub fn decode_all(fx: &Fixture, start: Lsn, chunk: usize) -> (Vec<Rec>, Outcome) {
    let mut out = Vec::new();
    let dec = WalDecoder::new(start, fx.params()).unwrap();
    let o = run(&fx.wal, fx.base, dec, chunk, |r| out.push(Rec::from(r)));
    (out, o)
}

/// PostgreSQL's path of a relation fork (relpath.c), for comparing with pg_waldump's output.
pub fn relpath(major: PgMajor, spc: u32, db: u32, rel: u32, fork: u8) -> String {
    let base = if spc == 1664 {
        format!("global/{rel}")
    } else if spc == 1663 {
        format!("base/{db}/{rel}")
    } else {
        format!(
            "pg_tblspc/{spc}/{}/{db}/{rel}",
            major.tablespace_version_directory()
        )
    };
    match fork {
        0 => base,
        1 => format!("{base}_fsm"),
        2 => format!("{base}_vm"),
        3 => format!("{base}_init"),
        f => format!("{base}_fork{f}"),
    }
}

/// Lays records out into WAL pages the way PostgreSQL's `CopyXLogRecordToWAL` does, for tests
/// of situations real fixtures cannot be made to show on demand (abandoned continuation
/// records, timeline changes, chosen split points). Every byte layout it produces is checked
/// against real WAL by the fixture tests; it exists to place records, not to define formats.
pub struct WalBuilder {
    pub major: PgMajor,
    pub seg_size: u32,
    pub page_size: u32,
    pub tli: u32,
    pub sysid: u64,
    /// LSN of out[0]; a segment boundary.
    pub base: Lsn,
    pub out: Vec<u8>,
    /// Start of the last record written.
    pub prev: Lsn,
    /// Extra xlp_info bits for the next page header written.
    pub next_page_flags: u16,
}

pub struct Built {
    pub lsn: Lsn,
    pub end: Lsn,
    pub bytes: Vec<u8>,
}

impl WalBuilder {
    pub fn new(major: PgMajor, seg_size: u32, base: Lsn) -> WalBuilder {
        WalBuilder {
            major,
            seg_size,
            page_size: 8192,
            tli: 1,
            sysid: 7_000_000_000_000_000_001,
            base,
            out: Vec::new(),
            prev: Lsn(base.0.saturating_sub(0x100)),
            next_page_flags: 0,
        }
    }

    pub fn pos(&self) -> Lsn {
        Lsn(self.base.0 + self.out.len() as u64)
    }

    fn page_header(&mut self, rem_len: u32) {
        let pos = self.pos().0;
        let long = pos.is_multiple_of(u64::from(self.seg_size));
        let mut info = self.next_page_flags;
        self.next_page_flags = 0;
        if rem_len > 0 {
            info |= 0x0001;
        }
        if long {
            info |= 0x0002;
        }
        let o = &mut self.out;
        o.extend_from_slice(&self.major.xlog_page_magic().to_le_bytes());
        o.extend_from_slice(&info.to_le_bytes());
        o.extend_from_slice(&self.tli.to_le_bytes());
        o.extend_from_slice(&pos.to_le_bytes());
        o.extend_from_slice(&rem_len.to_le_bytes());
        o.extend_from_slice(&[0; 4]);
        if long {
            o.extend_from_slice(&self.sysid.to_le_bytes());
            o.extend_from_slice(&self.seg_size.to_le_bytes());
            o.extend_from_slice(&self.page_size.to_le_bytes());
        }
    }

    /// A complete record with a correct CRC: header fields, then `after` (the block headers,
    /// main data header and payloads). `xl_prev` is the last record written.
    pub fn record(&self, rmid: u8, info: u8, xid: u32, after: &[u8]) -> Vec<u8> {
        let tot = (24 + after.len()) as u32;
        let mut r = Vec::with_capacity(tot as usize);
        r.extend_from_slice(&tot.to_le_bytes());
        r.extend_from_slice(&xid.to_le_bytes());
        r.extend_from_slice(&self.prev.0.to_le_bytes());
        r.push(info);
        r.push(rmid);
        r.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        r.extend_from_slice(after);
        let crc = failback_common::wal::record::record_crc(&r);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }

    /// Writes `limit` bytes (all by default) of `rec` at the current position, with page
    /// headers where pages start, then pads to 8 bytes if the record was written whole.
    pub fn write(&mut self, rec: &[u8], limit: Option<usize>) -> Built {
        let ps = u64::from(self.page_size);
        if self.pos().0.is_multiple_of(ps) {
            self.page_header(0);
        }
        let lsn = self.pos();
        let n = limit.unwrap_or(rec.len()).min(rec.len());
        let mut i = 0;
        while i < n {
            if self.pos().0.is_multiple_of(ps) {
                self.page_header((rec.len() - i) as u32);
            }
            let space = (ps - self.pos().0 % ps) as usize;
            let take = space.min(n - i);
            self.out.extend_from_slice(&rec[i..i + take]);
            i += take;
        }
        if n == rec.len() {
            while !self.out.len().is_multiple_of(8) {
                self.out.push(0);
            }
            self.prev = lsn;
        }
        Built {
            lsn,
            end: self.pos(),
            bytes: rec.to_vec(),
        }
    }

    /// A record with `main` as its main data and no block references.
    pub fn push_main(&mut self, rmid: u8, info: u8, main: &[u8]) -> Built {
        let rec = self.record(rmid, info, 1, &main_data_header(main));
        self.write(&rec, None)
    }

    /// Zeros up to the next page boundary (what PostgreSQL leaves after the insert position).
    pub fn pad_to_page(&mut self) {
        let ps = self.page_size as usize;
        while !self.out.len().is_multiple_of(ps) {
            self.out.push(0);
        }
    }

    /// Writes an XLOG SWITCH record and zeros to the end of its segment.
    pub fn push_switch(&mut self) -> Built {
        let rec = self.record(0, 0x40, 0, &[]);
        let b = self.write(&rec, None);
        let seg = self.seg_size as usize;
        while !(self.base.0 as usize + self.out.len()).is_multiple_of(seg) {
            self.out.push(0);
        }
        b
    }
}

/// `DATA_SHORT` / `DATA_LONG` header followed by the data itself.
pub fn main_data_header(main: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    if main.is_empty() {
        return v;
    }
    if main.len() < 256 {
        v.extend_from_slice(&[255, main.len() as u8]);
    } else {
        v.push(254);
        v.extend_from_slice(&(main.len() as u32).to_le_bytes());
    }
    v.extend_from_slice(main);
    v
}
