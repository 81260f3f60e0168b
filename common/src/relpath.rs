//! Where relation data lives in a data directory (`common/relpath.c`, pg_rewind's
//! `filemap.c` `isRelDataFile`).
//!
//! A relation's storage is named by a `RelFileLocator` (`RelFileNode` in 13–15): the tablespace
//! OID, the database OID (0 for shared relations) and the relation's file number. Its data is
//! split into *forks* — the main data, the free-space map, the visibility map and the init fork
//! of unlogged relations — each stored in files of at most `relseg_size` blocks (1 GiB by
//! default), the first one without suffix and the following ones as `.1`, `.2`, ...:
//!
//! ```text
//! global/<rel>[_fork][.N]                                   shared (tablespace 1664)
//! base/<db>/<rel>[_fork][.N]                                default tablespace (1663)
//! pg_tblspc/<spc>/PG_<major>_<catversion>/<db>/<rel>[_fork][.N]   any other tablespace
//! ```
//!
//! pg_rewind copies changed blocks only for files it recognises as relation data; everything
//! else is copied whole. It recognises a path only if it is a *main-fork* path that it would
//! have generated itself: the path parsed into (locator, segment) and printed back must give the
//! same string. So `base/1/0123`, `base/1/123.0`, `base/1/t3_123` (a temporary relation) and
//! `base/1/123_fsm` are not relation data files for it ([`is_rel_data_file`]).

use serde::Serialize;

use crate::PgMajor;

/// `GLOBALTABLESPACE_OID`: the tablespace of shared relations (`global/`).
pub const GLOBALTABLESPACE_OID: u32 = 1664;
/// `DEFAULTTABLESPACE_OID`: the default tablespace (`base/`).
pub const DEFAULTTABLESPACE_OID: u32 = 1663;
/// `BLCKSZ` of a default build.
pub const DEFAULT_BLCKSZ: u32 = 8192;
/// `RELSEG_SIZE` of a default build: blocks per segment file (1 GiB of 8 KiB blocks).
pub const DEFAULT_RELSEG_SIZE: u32 = 131072;

/// `RelFileLocator` (`RelFileNode` before 16, the same 12 bytes in WAL): which files hold a
/// relation.
#[allow(non_snake_case)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RelFileLocator {
    pub spcOid: u32,
    /// 0 for shared relations.
    pub dbOid: u32,
    pub relNumber: u32,
}

impl RelFileLocator {
    #[allow(non_snake_case)]
    pub fn new(spcOid: u32, dbOid: u32, relNumber: u32) -> RelFileLocator {
        RelFileLocator {
            spcOid,
            dbOid,
            relNumber,
        }
    }

    /// Reads the 12 bytes at the start of `b` as WAL stores them (`None` if shorter).
    pub fn parse(b: &[u8]) -> Option<RelFileLocator> {
        let word = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
        };
        Some(RelFileLocator::new(word(0)?, word(4)?, word(8)?))
    }
}

impl std::fmt::Display for RelFileLocator {
    /// `spc/db/rel`, as pg_waldump prints block references.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.spcOid, self.dbOid, self.relNumber)
    }
}

/// `ForkNumber`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ForkNumber {
    /// `MAIN_FORKNUM` (0)
    Main,
    /// `FSM_FORKNUM` (1)
    Fsm,
    /// `VISIBILITYMAP_FORKNUM` (2)
    VisibilityMap,
    /// `INIT_FORKNUM` (3)
    Init,
}

impl ForkNumber {
    pub const ALL: [ForkNumber; 4] = [
        ForkNumber::Main,
        ForkNumber::Fsm,
        ForkNumber::VisibilityMap,
        ForkNumber::Init,
    ];

    /// The fork number as WAL block references carry it; other values are not forks.
    pub fn from_i32(v: i32) -> Option<ForkNumber> {
        match v {
            0 => Some(ForkNumber::Main),
            1 => Some(ForkNumber::Fsm),
            2 => Some(ForkNumber::VisibilityMap),
            3 => Some(ForkNumber::Init),
            _ => None,
        }
    }

    pub fn to_i32(self) -> i32 {
        match self {
            ForkNumber::Main => 0,
            ForkNumber::Fsm => 1,
            ForkNumber::VisibilityMap => 2,
            ForkNumber::Init => 3,
        }
    }

    /// `forkNames[]`: "main", "fsm", "vm", "init".
    pub fn name(self) -> &'static str {
        match self {
            ForkNumber::Main => "main",
            ForkNumber::Fsm => "fsm",
            ForkNumber::VisibilityMap => "vm",
            ForkNumber::Init => "init",
        }
    }

    /// The file-name suffix: none for the main fork, `_<name>` for the others.
    pub fn suffix(self) -> &'static str {
        match self {
            ForkNumber::Main => "",
            ForkNumber::Fsm => "_fsm",
            ForkNumber::VisibilityMap => "_vm",
            ForkNumber::Init => "_init",
        }
    }
}

/// One file of a relation: a fork's segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RelFileSegment {
    pub locator: RelFileLocator,
    pub fork: ForkNumber,
    /// 0 for the first file (no `.N` suffix).
    pub segno: u32,
}

/// `relpathperm(locator, fork)` for a server of `major`: the data-directory-relative path of
/// the fork's first segment.
///
/// Built without `format!`: a WAL scan asks for the path of every block reference, hundreds of
/// thousands of times, and the formatting machinery was a tenth of the client's CPU.
pub fn relation_path(locator: RelFileLocator, fork: ForkNumber, major: PgMajor) -> String {
    let mut out = String::with_capacity(48);
    match locator.spcOid {
        GLOBALTABLESPACE_OID => out.push_str("global/"),
        DEFAULTTABLESPACE_OID => {
            out.push_str("base/");
            push_u32(&mut out, locator.dbOid);
            out.push('/');
        }
        spc => {
            out.push_str("pg_tblspc/");
            push_u32(&mut out, spc);
            out.push('/');
            out.push_str(&major.tablespace_version_directory());
            out.push('/');
            push_u32(&mut out, locator.dbOid);
            out.push('/');
        }
    }
    push_u32(&mut out, locator.relNumber);
    out.push_str(fork.suffix());
    out
}

/// Appends `v` in decimal, as `%u` prints it.
fn push_u32(out: &mut String, v: u32) {
    let mut div = 1_000_000_000u32;
    let mut started = false;
    while div > 0 {
        // (v / div) % 10 < 10: one digit.
        let d = ((v / div) % 10) as u8;
        if d != 0 || started || div == 1 {
            out.push(char::from(b'0' + d));
            started = true;
        }
        div /= 10;
    }
}

/// The path of segment `segno` of a fork (pg_rewind's `datasegpath`): `.N` is appended for
/// N ≥ 1.
pub fn segment_path(
    locator: RelFileLocator,
    fork: ForkNumber,
    segno: u32,
    major: PgMajor,
) -> String {
    let mut path = relation_path(locator, fork, major);
    if segno != 0 {
        path.push('.');
        push_u32(&mut path, segno);
    }
    path
}

/// A decimal OID or segment number exactly as PostgreSQL prints it (`%u`): digits only, no
/// leading zero unless it is "0", fits in 32 bits. Anything else cannot round-trip.
fn parse_u32_canonical(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Parses a data-directory-relative path of any fork of a permanent relation back into
/// (locator, fork, segment), accepting only paths that [`segment_path`] would produce for
/// `major` (round trip exact). Temporary relations (`t<backend>_<rel>`), other versions'
/// tablespace directories and stray names give `None`.
pub fn parse_relation_path(path: &str, major: PgMajor) -> Option<RelFileSegment> {
    let parts: Vec<&str> = path.split('/').collect();
    let (spc, db, file) = match parts.as_slice() {
        ["global", file] => (GLOBALTABLESPACE_OID, 0, *file),
        ["base", db, file] => (DEFAULTTABLESPACE_OID, parse_u32_canonical(db)?, *file),
        ["pg_tblspc", spc, verdir, db, file] => {
            if *verdir != major.tablespace_version_directory() {
                return None;
            }
            (parse_u32_canonical(spc)?, parse_u32_canonical(db)?, *file)
        }
        _ => return None,
    };
    let (stem, segno) = match file.split_once('.') {
        Some((stem, seg)) => (stem, parse_u32_canonical(seg)?),
        None => (file, 0),
    };
    let (rel, fork) = match stem.split_once('_') {
        Some((rel, fork_name)) => {
            let fork = ForkNumber::ALL
                .into_iter()
                .find(|f| *f != ForkNumber::Main && f.name() == fork_name)?;
            (rel, fork)
        }
        None => (stem, ForkNumber::Main),
    };
    let seg = RelFileSegment {
        locator: RelFileLocator {
            spcOid: spc,
            dbOid: db,
            relNumber: parse_u32_canonical(rel)?,
        },
        fork,
        segno,
    };
    // The final word is the round trip, as in pg_rewind: it rejects what the pieces above let
    // through (".0" segments, a pg_tblspc path naming 1663 or 1664, ...).
    (segment_path(seg.locator, seg.fork, seg.segno, major) == path).then_some(seg)
}

/// pg_rewind's `isRelDataFile`: whether `path` is a main-fork segment of a permanent relation,
/// the only files whose changed blocks pg_rewind copies one by one. Returns the locator and
/// segment number.
pub fn is_rel_data_file(path: &str, major: PgMajor) -> Option<(RelFileLocator, u32)> {
    parse_relation_path(path, major)
        .filter(|s| s.fork == ForkNumber::Main)
        .map(|s| (s.locator, s.segno))
}

/// Where block `blkno` of a fork lives: (segment number, byte offset inside that segment file),
/// for a cluster with `relseg_size` blocks of `blcksz` bytes per segment. All arithmetic is in
/// 64 bits, so offsets past 2 GiB and relations past 4 GiB are exact. `None` if either size is 0.
pub fn block_location(blkno: u32, relseg_size: u32, blcksz: u32) -> Option<(u32, u64)> {
    if blcksz == 0 {
        return None;
    }
    let (segno, in_seg) = block_segment(blkno, relseg_size)?;
    Some((segno, u64::from(in_seg) * u64::from(blcksz)))
}

/// Block `blkno` of a fork as (segment number, block number inside that segment file), in
/// segments of `relseg_size` blocks. `None` if `relseg_size` is 0.
pub fn block_segment(blkno: u32, relseg_size: u32) -> Option<(u32, u32)> {
    (relseg_size != 0).then(|| (blkno / relseg_size, blkno % relseg_size))
}

/// The file holding block `blkno` of a fork and the byte offset of the block in it: what a
/// WAL block reference (locator, fork, blkno) means on disk. `None` if either size is 0.
pub fn block_path(
    locator: RelFileLocator,
    fork: ForkNumber,
    blkno: u32,
    relseg_size: u32,
    blcksz: u32,
    major: PgMajor,
) -> Option<(String, u64)> {
    let (segno, offset) = block_location(blkno, relseg_size, blcksz)?;
    Some((segment_path(locator, fork, segno, major), offset))
}

/// The inverse of [`block_location`]: the fork-wide block number of block `block_in_segment`
/// of segment `segno`. `None` if it does not fit in a `BlockNumber` (u32).
pub fn absolute_block(segno: u32, block_in_segment: u32, relseg_size: u32) -> Option<u32> {
    let abs = u64::from(segno) * u64::from(relseg_size) + u64::from(block_in_segment);
    u32::try_from(abs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits_are_printed_as_percent_u() {
        for v in [0u32, 7, 10, 99, 100, 16384, 1_000_000_000, u32::MAX] {
            let mut s = String::from("x");
            push_u32(&mut s, v);
            assert_eq!(s, format!("x{v}"));
        }
    }

    const V15: PgMajor = PgMajor::V15;

    fn loc(spc: u32, db: u32, rel: u32) -> RelFileLocator {
        RelFileLocator {
            spcOid: spc,
            dbOid: db,
            relNumber: rel,
        }
    }

    #[test]
    fn builds_paths_like_postgres() {
        assert_eq!(
            relation_path(loc(1664, 0, 1262), ForkNumber::Main, V15),
            "global/1262"
        );
        assert_eq!(
            segment_path(loc(1663, 5, 16384), ForkNumber::Fsm, 0, V15),
            "base/5/16384_fsm"
        );
        assert_eq!(
            segment_path(loc(1663, 5, 16384), ForkNumber::Main, 3, V15),
            "base/5/16384.3"
        );
        assert_eq!(
            segment_path(
                loc(16400, 5, 16401),
                ForkNumber::VisibilityMap,
                1,
                PgMajor::V18
            ),
            "pg_tblspc/16400/PG_18_202506291/5/16401_vm.1"
        );
        assert_eq!(
            segment_path(loc(16400, 5, 16401), ForkNumber::Init, 0, PgMajor::V13),
            "pg_tblspc/16400/PG_13_202007201/5/16401_init"
        );
    }

    #[test]
    fn parses_only_what_round_trips() {
        let ok = [
            ("global/1262", loc(1664, 0, 1262), ForkNumber::Main, 0),
            ("global/1262.2", loc(1664, 0, 1262), ForkNumber::Main, 2),
            ("base/1/0", loc(1663, 1, 0), ForkNumber::Main, 0),
            (
                "base/5/16384_vm",
                loc(1663, 5, 16384),
                ForkNumber::VisibilityMap,
                0,
            ),
            (
                "base/5/16384_init.7",
                loc(1663, 5, 16384),
                ForkNumber::Init,
                7,
            ),
            (
                "pg_tblspc/16400/PG_15_202209061/5/4294967295.1",
                loc(16400, 5, u32::MAX),
                ForkNumber::Main,
                1,
            ),
        ];
        for (p, l, f, s) in ok {
            let got = parse_relation_path(p, V15).unwrap_or_else(|| panic!("{p}"));
            assert_eq!((got.locator, got.fork, got.segno), (l, f, s), "{p}");
        }
        let bad = [
            "base/1/0123",
            "base/01/123",
            "base/1/123.0",
            "base/1/123.01",
            "base/1/t3_16384",
            "base/1/16384_main",
            "base/1/16384_fsm_vm",
            "base/1/16384.",
            "base/1/.1",
            "base/1/16384 ",
            "base/1/+16384",
            "base/1/4294967296",
            "base/1/pg_filenode.map",
            "base/1/PG_VERSION",
            "base/1",
            "base//123",
            "global/pg_control",
            "global/1262/1",
            "pg_tblspc/1663/PG_15_202209061/5/123",
            "pg_tblspc/1664/PG_15_202209061/0/123",
            "pg_tblspc/16400/PG_14_202107181/5/123",
            "pg_tblspc/16400/PG_15_202209061/5",
            "/base/1/123",
            "./base/1/123",
            "pg_wal/000000010000000000000001",
            "",
        ];
        for p in bad {
            assert_eq!(parse_relation_path(p, V15), None, "{p}");
        }
    }

    #[test]
    fn only_main_fork_counts_for_rewind() {
        assert_eq!(
            is_rel_data_file("base/5/16384.4", V15),
            Some((loc(1663, 5, 16384), 4))
        );
        assert_eq!(is_rel_data_file("base/5/16384_fsm", V15), None);
        assert_eq!(is_rel_data_file("base/5/16384_vm", V15), None);
        assert_eq!(is_rel_data_file("base/5/16384_init", V15), None);
    }

    #[test]
    fn block_math_is_64_bit() {
        assert_eq!(block_location(0, 131072, 8192), Some((0, 0)));
        assert_eq!(
            block_location(131071, 131072, 8192),
            Some((0, 131071 * 8192))
        );
        assert_eq!(block_location(131072, 131072, 8192), Some((1, 0)));
        // A relation built with a huge segment size: offsets past 4 GiB in one file.
        let (seg, off) = block_location(u32::MAX, u32::MAX, 32768).unwrap();
        assert_eq!(seg, 1);
        assert_eq!(off, 0);
        let (seg, off) = block_location(u32::MAX - 1, u32::MAX, 32768).unwrap();
        assert_eq!(seg, 0);
        assert_eq!(off, u64::from(u32::MAX - 1) * 32768);
        assert!(off > 1 << 32);
        assert_eq!(block_location(5, 0, 8192), None);
        assert_eq!(block_location(5, 10, 0), None);
        assert_eq!(
            block_path(
                loc(1663, 5, 16384),
                ForkNumber::Main,
                262145,
                131072,
                8192,
                V15
            ),
            Some(("base/5/16384.2".to_string(), 8192))
        );
        assert_eq!(absolute_block(1, 5, 131072), Some(131077));
        assert_eq!(absolute_block(u32::MAX, 1, 131072), None);
    }
}
