//! The records that matter beyond their block references.
//!
//! pg_rewind learns which blocks changed from block references, but some records change
//! relation files wholesale: creating a relation fork (SMGR CREATE), truncating one (SMGR
//! TRUNCATE), creating or dropping a database (DBASE), and committing or aborting a transaction
//! that drops relations (XACT, whose "dropped rels" are unlinked at commit or abort). The
//! backend flags the ones it considers special with `XLR_SPECIAL_REL_UPDATE`; a flagged record
//! of any other type is something pg_rewind refuses to guess about (`parsexlog.c`
//! `extractPageInfo`). Checkpoints, timeline switches and segment switches matter for finding
//! where histories diverge. This module parses all of these main-data layouts, version by
//! version:
//!
//! - SMGR (`catalog/storage_xlog.h`): CREATE {RelFileLocator, forkNum i32};
//!   TRUNCATE {blkno u32, RelFileLocator, flags i32}.
//! - DBASE (`commands/dbcommands_xlog.h`): 13/14 CREATE 0x00 and DROP 0x10; 15+
//!   CREATE_FILE_COPY 0x00, CREATE_WAL_LOG 0x10, DROP 0x20. Create {db_id, tablespace_id,
//!   src_db_id, src_tablespace_id}, create-wal-log {db_id, tablespace_id}, drop {db_id,
//!   ntablespaces i32, tablespace_ids[]}.
//! - XACT commit and abort (`access/xact.h`, `rmgrdesc/xactdesc.c` `ParseCommitRecord`,
//!   `ParseAbortRecord`): xact_time i64, then, if `XLOG_XACT_HAS_INFO`, xinfo u32 and the parts
//!   it announces in this order: dbinfo {dbId, tsId}; subxacts {n, xids}; dropped relations {n,
//!   `RelFileLocator[n]`}; dropped stats {n, items} (15+; 12-byte items {kind, dboid, objoid} in
//!   15–17, 16-byte {kind, dboid, objid_lo, objid_hi} in 18); invalidations {n, 16-byte
//!   messages} (commit only); two-phase {xid, then a NUL-terminated gid if XACT_XINFO_HAS_GID};
//!   origin {lsn, timestamp}, unaligned.
//! - XACT PREPARE (`ParsePrepareRecord`): the two-phase state file header `xl_xact_prepare`
//!   (64 bytes in 13/14, 72 in 15+ which added ncommitstats/nabortstats), then MAXALIGNed: gid,
//!   subxacts, commit rels, abort rels, (15+) commit stats, abort stats, invalidations, followed
//!   by the two-phase rmgr records.
//! - RELMAP UPDATE (`utils/relmapper.h`): {dbid (0 = shared catalogs), tsid, nbytes i32, data}.
//! - XLOG CHECKPOINT_SHUTDOWN / CHECKPOINT_ONLINE: a `CheckPoint` (88 bytes) whose first fields
//!   are redo (u64) and ThisTimeLineID (u32); END_OF_RECOVERY {end_time i64, ThisTimeLineID,
//!   PrevTimeLineID, (17+) wal_level}; OVERWRITE_CONTRECORD {overwritten_lsn, overwrite_time};
//!   SWITCH (no data).

use super::error::WalError;
use super::page::{le_u32, le_u64};
use super::record::{RelFileLocator, XLR_RMGR_INFO_MASK, XLR_SPECIAL_REL_UPDATE};
use super::rmgr::*;
use crate::{Lsn, PgMajor, TimeLineId};

/// `sizeof(CheckPoint)`, the same 88 bytes in 13–18 (17 put wal_level in former padding).
pub const SIZE_OF_CHECKPOINT: usize = 88;

/// What a record means, for the records this decoder interprets. Everything else is `Other`,
/// as are the records of the resource managers a decoder was told to leave uninterpreted
/// ([`super::WalDecoder::interpret_only`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind<'a> {
    Other,
    /// XLOG CHECKPOINT_SHUTDOWN (`shutdown`) or CHECKPOINT_ONLINE. `data` is the whole
    /// `CheckPoint` struct for a full parser.
    Checkpoint {
        shutdown: bool,
        redo: Lsn,
        this_timeline_id: TimeLineId,
        data: &'a [u8],
    },
    /// XLOG SWITCH: the rest of the segment is unused; the next record starts the next segment.
    Switch,
    /// XLOG END_OF_RECOVERY, written by a promotion that starts a new timeline.
    EndOfRecovery {
        end_time: i64,
        this_timeline_id: TimeLineId,
        prev_timeline_id: TimeLineId,
    },
    /// XLOG OVERWRITE_CONTRECORD: the record that started at `overwritten_lsn` was never
    /// finished and has been abandoned.
    OverwriteContrecord {
        overwritten_lsn: Lsn,
        overwrite_time: i64,
    },
    /// SMGR CREATE: a fork file was created.
    SmgrCreate {
        locator: RelFileLocator,
        fork: u32,
    },
    /// SMGR TRUNCATE: the relation was cut to `blkno` blocks; `flags` says which forks
    /// (`SMGR_TRUNCATE_HEAP` 1, `_VM` 2, `_FSM` 4).
    SmgrTruncate {
        blkno: u32,
        locator: RelFileLocator,
        flags: u32,
    },
    /// DBASE CREATE (13/14) / CREATE_FILE_COPY (15+): a database directory copied from another.
    DbaseCreateFileCopy {
        db_id: u32,
        tablespace_id: u32,
        src_db_id: u32,
        src_tablespace_id: u32,
    },
    /// DBASE CREATE_WAL_LOG (15+): a database directory created empty; its contents follow as
    /// ordinary records.
    DbaseCreateWalLog {
        db_id: u32,
        tablespace_id: u32,
    },
    /// DBASE DROP: the database's directories in these tablespaces were removed.
    DbaseDrop {
        db_id: u32,
        tablespace_ids: OidList<'a>,
    },
    /// XACT COMMIT, ABORT, COMMIT_PREPARED or ABORT_PREPARED.
    XactFinish(XactFinish<'a>),
    /// XACT PREPARE.
    XactPrepare(XactPrepare<'a>),
    /// RELMAP UPDATE: `pg_filenode.map` of database `db_id` (0 = shared) was rewritten.
    RelmapUpdate {
        db_id: u32,
        tsid: u32,
        nbytes: u32,
    },
}

impl RecordKind<'_> {
    /// What the record acts on, in words close to pg_waldump's description (`redo 0/3000028;
    /// tli 1`, `rel 1663/5/16384 to 0 blocks flags 7`, `rels: 1663/5/16384`); `None` for kinds
    /// with nothing to add to their type name.
    pub fn detail(&self) -> Option<String> {
        let rel = |l: RelFileLocator| format!("{}/{}/{}", l.spcOid, l.dbOid, l.relNumber);
        Some(match self {
            RecordKind::Checkpoint {
                redo,
                this_timeline_id,
                ..
            } => format!("redo {redo}; tli {this_timeline_id}"),
            RecordKind::SmgrCreate { locator, fork } => {
                format!("rel {} fork {fork}", rel(*locator))
            }
            RecordKind::SmgrTruncate {
                blkno,
                locator,
                flags,
            } => format!("rel {} to {blkno} blocks flags {flags}", rel(*locator)),
            RecordKind::DbaseCreateFileCopy {
                db_id,
                tablespace_id,
                src_db_id,
                src_tablespace_id,
            } => format!("copy dir {src_tablespace_id}/{src_db_id} to {tablespace_id}/{db_id}"),
            RecordKind::DbaseCreateWalLog {
                db_id,
                tablespace_id,
            } => format!("create dir {tablespace_id}/{db_id}"),
            RecordKind::DbaseDrop {
                db_id,
                tablespace_ids,
            } => {
                let dirs: Vec<String> = tablespace_ids
                    .iter()
                    .map(|t| format!("{t}/{db_id}"))
                    .collect();
                format!("dir {}", dirs.join(" "))
            }
            RecordKind::XactFinish(x) if !x.rels.is_empty() => {
                let rels: Vec<String> = x.rels.iter().map(rel).collect();
                format!("rels: {}", rels.join(" "))
            }
            RecordKind::EndOfRecovery {
                this_timeline_id,
                prev_timeline_id,
                ..
            } => format!("tli {this_timeline_id}; prev tli {prev_timeline_id}"),
            RecordKind::RelmapUpdate {
                db_id,
                tsid,
                nbytes,
            } => format!("database {db_id} tablespace {tsid} size {nbytes}"),
            _ => return None,
        })
    }

    /// Whether pg_rewind knows how to handle this kind when it is flagged
    /// `XLR_SPECIAL_REL_UPDATE` (`extractPageInfo`).
    pub fn is_known_rel_update(&self) -> bool {
        matches!(
            self,
            RecordKind::SmgrCreate { .. }
                | RecordKind::SmgrTruncate { .. }
                | RecordKind::DbaseCreateFileCopy { .. }
                | RecordKind::DbaseCreateWalLog { .. }
                | RecordKind::DbaseDrop { .. }
                | RecordKind::XactFinish(_)
        )
    }

    /// The relations whose files this record removes (a commit's or abort's dropped rels).
    pub fn dropped_relations(&self) -> RelFileLocatorList<'_> {
        match self {
            RecordKind::XactFinish(x) => x.rels,
            _ => RelFileLocatorList::default(),
        }
    }
}

/// Which transaction-ending record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XactOp {
    Commit,
    Abort,
    CommitPrepared,
    AbortPrepared,
}

impl XactOp {
    pub fn is_commit(self) -> bool {
        matches!(self, XactOp::Commit | XactOp::CommitPrepared)
    }
}

/// A parsed commit or abort record (`xl_xact_parsed_commit` / `xl_xact_parsed_abort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactFinish<'a> {
    pub op: XactOp,
    pub xact_time: i64,
    pub xinfo: u32,
    /// `(dbId, tsId)` when `XACT_XINFO_HAS_DBINFO`.
    pub dbinfo: Option<(u32, u32)>,
    pub subxacts: OidList<'a>,
    /// Relations dropped by this commit (or, for an abort, created by the aborted transaction).
    pub rels: RelFileLocatorList<'a>,
    /// Number of dropped statistics entries (15+).
    pub nstats: u32,
    /// Number of invalidation messages (commit only).
    pub nmsgs: u32,
    /// The prepared transaction's xid, for COMMIT_PREPARED / ABORT_PREPARED.
    pub twophase_xid: Option<u32>,
    /// The prepared transaction's gid (without its NUL), when logged.
    pub twophase_gid: Option<&'a [u8]>,
    /// `(origin_lsn, origin_timestamp)` when `XACT_XINFO_HAS_ORIGIN`.
    pub origin: Option<(Lsn, i64)>,
    /// How many bytes of the main data the parts above occupy (they should be all of it).
    pub parsed_len: usize,
}

/// A parsed PREPARE record (`xl_xact_parsed_prepare`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactPrepare<'a> {
    pub xid: u32,
    pub database: u32,
    pub prepared_at: i64,
    pub gid: &'a [u8],
    pub subxacts: OidList<'a>,
    /// Relations to drop if the prepared transaction commits.
    pub commit_rels: RelFileLocatorList<'a>,
    /// Relations to drop if it aborts.
    pub abort_rels: RelFileLocatorList<'a>,
    pub ncommitstats: u32,
    pub nabortstats: u32,
    pub ninvalmsgs: u32,
    pub origin_lsn: Lsn,
    pub origin_timestamp: i64,
}

/// A run of little-endian u32s (oids or xids) inside a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OidList<'a>(&'a [u8]);

impl<'a> OidList<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn get(&self, i: usize) -> Option<u32> {
        let off = i.checked_mul(4)?;
        self.0.get(off..off + 4).map(|s| le_u32(s, 0))
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.0.chunks_exact(4).map(|c| le_u32(c, 0))
    }
}

/// A run of 12-byte `RelFileLocator`s inside a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelFileLocatorList<'a>(&'a [u8]);

impl<'a> RelFileLocatorList<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 12
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn get(&self, i: usize) -> Option<RelFileLocator> {
        let off = i.checked_mul(12)?;
        self.0.get(off..).and_then(RelFileLocator::parse)
    }
    pub fn iter(&self) -> impl Iterator<Item = RelFileLocator> + 'a {
        self.0.chunks_exact(12).filter_map(RelFileLocator::parse)
    }
}

// xinfo bits (access/xact.h)
pub const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
pub const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
pub const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;
pub const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
pub const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
pub const XACT_XINFO_HAS_ORIGIN: u32 = 1 << 5;
pub const XACT_XINFO_HAS_AE_LOCKS: u32 = 1 << 6;
pub const XACT_XINFO_HAS_GID: u32 = 1 << 7;
/// 15+.
pub const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

/// `sizeof(xl_xact_stats_item)`.
fn stats_item_size(major: PgMajor) -> usize {
    if major >= PgMajor::V18 { 16 } else { 12 }
}

/// `sizeof(SharedInvalidationMessage)`.
const SIZE_OF_INVAL_MSG: usize = 16;

/// A bounds-checked reader over a record's main data that names what was being read when the
/// data ran out.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    lsn: Lsn,
    rmgr: &'static str,
    record_type: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, what: String) -> WalError {
        WalError::MalformedRecord {
            lsn: self.lsn,
            rmgr: self.rmgr,
            record_type: self.record_type,
            what,
        }
    }
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], WalError> {
        if n == 0 {
            // Alignment may have carried `pos` past the end; an empty part is still fine.
            return Ok(&[]);
        }
        let end = self.pos.checked_add(n);
        match end.and_then(|e| self.data.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.err(format!(
                "main data is {} bytes, {what} needs {n} at offset {}",
                self.data.len(),
                self.pos
            ))),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32, WalError> {
        Ok(le_u32(self.bytes(4, what)?, 0))
    }
    fn u64(&mut self, what: &str) -> Result<u64, WalError> {
        Ok(le_u64(self.bytes(8, what)?, 0))
    }
    /// An i32 count that must not be negative, times an element size, as a byte length.
    fn count(&mut self, what: &str, elem: usize) -> Result<(u32, usize), WalError> {
        let n = self.u32(what)?;
        if n > i32::MAX as u32 {
            return Err(self.err(format!("{what} is negative ({})", n as i32)));
        }
        let len = (n as usize)
            .checked_mul(elem)
            .ok_or_else(|| self.err(format!("{what} {n} is too large")))?;
        Ok((n, len))
    }
    fn align(&mut self) {
        self.pos = (self.pos + 7) & !7;
    }
}

/// Parses the record kinds this decoder interprets. `main` is the record's main data.
pub(crate) fn parse_kind<'a>(
    major: PgMajor,
    lsn: Lsn,
    rmid: u8,
    xl_info: u8,
    main: &'a [u8],
) -> Result<RecordKind<'a>, WalError> {
    let info = xl_info & XLR_RMGR_INFO_MASK;
    let mut r = Reader {
        data: main,
        pos: 0,
        lsn,
        rmgr: rmgr_name(rmid),
        record_type: record_type_name(major, rmid, xl_info),
    };
    let kind = match rmid {
        RM_XLOG_ID => match info {
            XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE => {
                let data = r.bytes(SIZE_OF_CHECKPOINT, "a CheckPoint")?;
                RecordKind::Checkpoint {
                    shutdown: info == XLOG_CHECKPOINT_SHUTDOWN,
                    redo: Lsn(le_u64(data, 0)),
                    this_timeline_id: le_u32(data, 8),
                    data,
                }
            }
            XLOG_SWITCH => RecordKind::Switch,
            XLOG_END_OF_RECOVERY => {
                let end_time = r.u64("end_time")? as i64;
                let this_timeline_id = r.u32("ThisTimeLineID")?;
                let prev_timeline_id = r.u32("PrevTimeLineID")?;
                RecordKind::EndOfRecovery {
                    end_time,
                    this_timeline_id,
                    prev_timeline_id,
                }
            }
            XLOG_OVERWRITE_CONTRECORD => RecordKind::OverwriteContrecord {
                overwritten_lsn: Lsn(r.u64("overwritten_lsn")?),
                overwrite_time: r.u64("overwrite_time")? as i64,
            },
            _ => RecordKind::Other,
        },
        RM_SMGR_ID => match info {
            XLOG_SMGR_CREATE => {
                let locator = locator(&mut r)?;
                RecordKind::SmgrCreate {
                    locator,
                    fork: r.u32("forkNum")?,
                }
            }
            XLOG_SMGR_TRUNCATE => {
                let blkno = r.u32("blkno")?;
                let locator = locator(&mut r)?;
                RecordKind::SmgrTruncate {
                    blkno,
                    locator,
                    flags: r.u32("flags")?,
                }
            }
            _ => RecordKind::Other,
        },
        RM_DBASE_ID => {
            let drop = if major >= PgMajor::V15 {
                XLOG_DBASE_DROP
            } else {
                XLOG_DBASE_DROP_OLD
            };
            if info == XLOG_DBASE_CREATE_FILE_COPY {
                RecordKind::DbaseCreateFileCopy {
                    db_id: r.u32("db_id")?,
                    tablespace_id: r.u32("tablespace_id")?,
                    src_db_id: r.u32("src_db_id")?,
                    src_tablespace_id: r.u32("src_tablespace_id")?,
                }
            } else if info == drop {
                let db_id = r.u32("db_id")?;
                let (_, len) = r.count("ntablespaces", 4)?;
                RecordKind::DbaseDrop {
                    db_id,
                    tablespace_ids: OidList(r.bytes(len, "tablespace_ids")?),
                }
            } else if major >= PgMajor::V15 && info == XLOG_DBASE_CREATE_WAL_LOG {
                RecordKind::DbaseCreateWalLog {
                    db_id: r.u32("db_id")?,
                    tablespace_id: r.u32("tablespace_id")?,
                }
            } else {
                RecordKind::Other
            }
        }
        RM_XACT_ID => match info & XLOG_XACT_OPMASK {
            XLOG_XACT_COMMIT => {
                RecordKind::XactFinish(parse_xact(major, &mut r, XactOp::Commit, xl_info)?)
            }
            XLOG_XACT_ABORT => {
                RecordKind::XactFinish(parse_xact(major, &mut r, XactOp::Abort, xl_info)?)
            }
            XLOG_XACT_COMMIT_PREPARED => {
                RecordKind::XactFinish(parse_xact(major, &mut r, XactOp::CommitPrepared, xl_info)?)
            }
            XLOG_XACT_ABORT_PREPARED => {
                RecordKind::XactFinish(parse_xact(major, &mut r, XactOp::AbortPrepared, xl_info)?)
            }
            XLOG_XACT_PREPARE => RecordKind::XactPrepare(parse_prepare(major, &mut r)?),
            _ => RecordKind::Other,
        },
        RM_RELMAP_ID if info == XLOG_RELMAP_UPDATE => {
            let db_id = r.u32("dbid")?;
            let tsid = r.u32("tsid")?;
            let (nbytes, len) = r.count("nbytes", 1)?;
            r.bytes(len, "the map")?;
            RecordKind::RelmapUpdate {
                db_id,
                tsid,
                nbytes,
            }
        }
        _ => RecordKind::Other,
    };
    Ok(kind)
}

/// Whether `parse_kind` has anything to say about records of this rmgr; the decoder skips the
/// call for the others.
pub(crate) fn rmgr_has_kinds(rmid: u8) -> bool {
    matches!(
        rmid,
        RM_XLOG_ID | RM_XACT_ID | RM_SMGR_ID | RM_DBASE_ID | RM_RELMAP_ID
    )
}

/// pg_rewind's rule for flagged records, as an error when it does not hold.
pub(crate) fn check_rel_update(
    lsn: Lsn,
    rmid: u8,
    xl_info: u8,
    kind: &RecordKind<'_>,
) -> Result<(), WalError> {
    if xl_info & XLR_SPECIAL_REL_UPDATE != 0 && !kind.is_known_rel_update() {
        return Err(WalError::UnrecognizedRelUpdate {
            lsn,
            rmid,
            rmgr: if rmid >= RM_MIN_CUSTOM_ID {
                "custom"
            } else {
                rmgr_name(rmid)
            },
            info: xl_info,
        });
    }
    Ok(())
}

fn locator(r: &mut Reader<'_>) -> Result<RelFileLocator, WalError> {
    let b = r.bytes(12, "a RelFileLocator")?;
    Ok(RelFileLocator::parse(b).unwrap_or_default())
}

fn parse_xact<'a>(
    major: PgMajor,
    r: &mut Reader<'a>,
    op: XactOp,
    xl_info: u8,
) -> Result<XactFinish<'a>, WalError> {
    let xact_time = r.u64("xact_time")? as i64;
    let xinfo = if xl_info & XLOG_XACT_HAS_INFO != 0 {
        r.u32("xinfo")?
    } else {
        0
    };
    let mut x = XactFinish {
        op,
        xact_time,
        xinfo,
        dbinfo: None,
        subxacts: OidList::default(),
        rels: RelFileLocatorList::default(),
        nstats: 0,
        nmsgs: 0,
        twophase_xid: None,
        twophase_gid: None,
        origin: None,
        parsed_len: 0,
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        x.dbinfo = Some((r.u32("dbId")?, r.u32("tsId")?));
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        let (_, len) = r.count("nsubxacts", 4)?;
        x.subxacts = OidList(r.bytes(len, "subxacts")?);
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        let (_, len) = r.count("nrels", 12)?;
        x.rels = RelFileLocatorList(r.bytes(len, "dropped relations")?);
    }
    if major >= PgMajor::V15 && xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        let (n, len) = r.count("nstats", stats_item_size(major))?;
        r.bytes(len, "dropped stats")?;
        x.nstats = n;
    }
    // Abort records never carry invalidations (ParseAbortRecord has no such part).
    if op.is_commit() && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        let (n, len) = r.count("nmsgs", SIZE_OF_INVAL_MSG)?;
        r.bytes(len, "invalidation messages")?;
        x.nmsgs = n;
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE != 0 {
        x.twophase_xid = Some(r.u32("twophase xid")?);
        if xinfo & XACT_XINFO_HAS_GID != 0 {
            let rest = &r.data[r.pos.min(r.data.len())..];
            let n = rest
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| r.err("the gid has no terminating NUL".to_string()))?;
            x.twophase_gid = Some(r.bytes(n, "gid")?);
            r.bytes(1, "the gid's NUL")?;
        }
    }
    if xinfo & XACT_XINFO_HAS_ORIGIN != 0 {
        let lsn = Lsn(r.u64("origin_lsn")?);
        let ts = r.u64("origin_timestamp")? as i64;
        x.origin = Some((lsn, ts));
    }
    x.parsed_len = r.pos;
    Ok(x)
}

fn parse_prepare<'a>(major: PgMajor, r: &mut Reader<'a>) -> Result<XactPrepare<'a>, WalError> {
    let v15 = major >= PgMajor::V15;
    // xl_xact_prepare: magic, total_len, xid, database, prepared_at (i64), owner, nsubxacts,
    // ncommitrels, nabortrels, [ncommitstats, nabortstats], ninvalmsgs, initfileinval (bool),
    // gidlen u16, origin_lsn, origin_timestamp.
    let _magic = r.u32("magic")?;
    let _total_len = r.u32("total_len")?;
    let xid = r.u32("xid")?;
    let database = r.u32("database")?;
    let prepared_at = r.u64("prepared_at")? as i64;
    let _owner = r.u32("owner")?;
    let (_, subxacts_len) = r.count("nsubxacts", 4)?;
    let (_, commit_len) = r.count("ncommitrels", 12)?;
    let (_, abort_len) = r.count("nabortrels", 12)?;
    let item = stats_item_size(major);
    let ((ncommitstats, commitstats_len), (nabortstats, abortstats_len)) = if v15 {
        (
            r.count("ncommitstats", item)?,
            r.count("nabortstats", item)?,
        )
    } else {
        ((0, 0), (0, 0))
    };
    let (ninvalmsgs, invals_len) = r.count("ninvalmsgs", SIZE_OF_INVAL_MSG)?;
    let b = r.bytes(4, "initfileinval and gidlen")?;
    let gidlen = usize::from(u16::from_le_bytes([b[2], b[3]]));
    let origin_lsn = Lsn(r.u64("origin_lsn")?);
    let origin_timestamp = r.u64("origin_timestamp")? as i64;
    r.align();
    let gid_raw = r.bytes(gidlen, "gid")?;
    // gidlen counts the NUL.
    let gid = match gid_raw.iter().position(|&b| b == 0) {
        Some(n) => &gid_raw[..n],
        None => gid_raw,
    };
    r.align();
    let subxacts = OidList(r.bytes(subxacts_len, "subxacts")?);
    r.align();
    let commit_rels = RelFileLocatorList(r.bytes(commit_len, "commit rels")?);
    r.align();
    let abort_rels = RelFileLocatorList(r.bytes(abort_len, "abort rels")?);
    r.align();
    r.bytes(commitstats_len, "commit stats")?;
    r.align();
    r.bytes(abortstats_len, "abort stats")?;
    r.align();
    r.bytes(invals_len, "invalidation messages")?;
    Ok(XactPrepare {
        xid,
        database,
        prepared_at,
        gid,
        subxacts,
        commit_rels,
        abort_rels,
        ncommitstats,
        nabortstats,
        ninvalmsgs,
        origin_lsn,
        origin_timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(vals: &[u32]) -> Vec<u8> {
        vals.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn end_of_recovery_and_overwrite_contrecord() {
        let mut d = 99i64.to_le_bytes().to_vec();
        d.extend(le(&[3, 2, 1])); // ThisTLI, PrevTLI, (17+) wal_level
        let k = parse_kind(PgMajor::V17, Lsn(8), RM_XLOG_ID, XLOG_END_OF_RECOVERY, &d).unwrap();
        assert_eq!(
            k,
            RecordKind::EndOfRecovery {
                end_time: 99,
                this_timeline_id: 3,
                prev_timeline_id: 2
            }
        );
        let mut d = 0x1234_5678u64.to_le_bytes().to_vec();
        d.extend(7i64.to_le_bytes());
        let k = parse_kind(
            PgMajor::V14,
            Lsn(8),
            RM_XLOG_ID,
            XLOG_OVERWRITE_CONTRECORD,
            &d,
        )
        .unwrap();
        assert_eq!(
            k,
            RecordKind::OverwriteContrecord {
                overwritten_lsn: Lsn(0x1234_5678),
                overwrite_time: 7
            }
        );
    }

    #[test]
    fn short_or_negative_main_data_is_malformed_not_a_panic() {
        // A checkpoint needs 88 bytes.
        let e = parse_kind(PgMajor::V15, Lsn(16), RM_XLOG_ID, 0x10, &[0; 87]).unwrap_err();
        assert!(
            matches!(
                e,
                WalError::MalformedRecord {
                    rmgr: "XLOG",
                    record_type: "CHECKPOINT_ONLINE",
                    ..
                }
            ),
            "{e}"
        );
        // DBASE DROP with a negative tablespace count.
        let d = le(&[5, u32::MAX]);
        let e = parse_kind(PgMajor::V15, Lsn(16), RM_DBASE_ID, XLOG_DBASE_DROP, &d).unwrap_err();
        assert!(
            e.to_string().contains("ntablespaces is negative (-1)"),
            "{e}"
        );
        // Commit announcing more dropped relations than it holds.
        let mut d = 0i64.to_le_bytes().to_vec();
        d.extend(le(&[XACT_XINFO_HAS_RELFILELOCATORS, 1_000_000]));
        let e = parse_kind(PgMajor::V16, Lsn(16), RM_XACT_ID, XLOG_XACT_HAS_INFO, &d).unwrap_err();
        assert!(
            e.to_string().contains("dropped relations needs 12000000"),
            "{e}"
        );
        // Every prefix of a valid record either parses or is malformed.
        let mut d = 0i64.to_le_bytes().to_vec();
        d.extend(le(&[
            XACT_XINFO_HAS_DBINFO
                | XACT_XINFO_HAS_SUBXACTS
                | XACT_XINFO_HAS_RELFILELOCATORS
                | XACT_XINFO_HAS_DROPPED_STATS
                | XACT_XINFO_HAS_INVALS
                | XACT_XINFO_HAS_TWOPHASE
                | XACT_XINFO_HAS_GID
                | XACT_XINFO_HAS_ORIGIN,
            5,
            1663, // dbinfo
            1,
            900, // subxacts
            2,
            1663,
            5,
            16384,
            1663,
            5,
            16385, // rels
            1,
            2,
            5,
            16384,
            0, // stats (18: 16 bytes)
            1,
            0,
            0,
            0,
            0,   // invals
            777, // twophase xid
        ]));
        d.extend(b"gid\0");
        d.extend(0x55u64.to_le_bytes());
        d.extend(66i64.to_le_bytes());
        let k = parse_kind(
            PgMajor::V18,
            Lsn(16),
            RM_XACT_ID,
            0x30 | XLOG_XACT_HAS_INFO,
            &d,
        )
        .unwrap();
        let RecordKind::XactFinish(x) = k else {
            panic!("{k:?}")
        };
        assert_eq!(x.op, XactOp::CommitPrepared);
        assert_eq!(x.dbinfo, Some((5, 1663)));
        assert_eq!(x.subxacts.iter().collect::<Vec<_>>(), [900]);
        assert_eq!(x.rels.len(), 2);
        assert_eq!(x.rels.get(1).unwrap().relNumber, 16385);
        assert_eq!((x.nstats, x.nmsgs), (1, 1));
        assert_eq!(x.twophase_xid, Some(777));
        assert_eq!(x.twophase_gid, Some(&b"gid"[..]));
        assert_eq!(x.origin, Some((Lsn(0x55), 66)));
        assert_eq!(x.parsed_len, d.len());
        assert!(k.is_known_rel_update());
        for n in 0..d.len() {
            let r = parse_kind(PgMajor::V18, Lsn(16), RM_XACT_ID, 0xB0, &d[..n]);
            assert!(
                matches!(r, Err(WalError::MalformedRecord { .. })),
                "prefix {n}"
            );
        }
    }
}
