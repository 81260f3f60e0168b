//! The control file, `global/pg_control` (`catalog/pg_control.h`).
//!
//! PostgreSQL keeps the state it needs before it can read anything else in one fixed-size file:
//! the cluster's identity (`system_identifier`), the format versions (`pg_control_version`,
//! `catalog_version_no`), whether it was shut down cleanly (`state`), where recovery must start
//! (`checkPoint` and a copy of that checkpoint record's body, `checkPointCopy`), how far a
//! standby or an interrupted recovery must replay before it is consistent (`minRecoveryPoint`,
//! `minRecoveryPointTLI`), and compile-time constants of the server that wrote it (`blcksz`,
//! `xlog_seg_size`, ...). The struct `ControlFileData` is written at the front of an 8192-byte
//! file (`PG_CONTROL_FILE_SIZE`), zero padded, followed by nothing; its last member is a CRC-32C
//! of every byte before it. The file is in the server's native byte order; failback reads
//! little-endian clusters (x86-64, aarch64).
//!
//! The layout is that of a C struct, so it is given here as byte offsets per version:
//!
//! * 13–16 (`PG_CONTROL_VERSION` 1300) share one layout;
//! * 17 (1700) adds `checkPointCopy.wal_level` in what used to be padding (absolute offset 60);
//! * 18 (1800) adds `default_char_signedness` at 256, which pushes
//!   `mock_authentication_nonce` to 257 and `crc` from 288 to 292.
//!
//! The version is recognised by the pair (`pg_control_version`, `catalog_version_no`); both
//! must match a supported major ([`PgMajor::from_control`]).
//!
//! pg_rewind rewrites the target's control file at the end of a rewind (`update_controlfile`):
//! it changes a handful of fields and recomputes the CRC. [`ControlFileData::to_bytes`] does the
//! same: it starts from the exact 8192 bytes that were parsed, writes only the fields whose
//! value changed, and recomputes the CRC, so bytes this code does not model survive untouched.
//!
//! The checkpoint record body ([`CheckPoint`], 88 bytes) is shared with the WAL: it is the main
//! data of XLOG `CHECKPOINT_SHUTDOWN` / `CHECKPOINT_ONLINE` records, which pg_rewind reads to
//! find the last common checkpoint.

use serde::{Serialize, Serializer};

use crate::lsn::is_valid_wal_seg_size;
use crate::{Lsn, PgMajor, TimeLineId};

/// `PG_CONTROL_FILE_SIZE`: the physical size of `global/pg_control`, in every version.
pub const PG_CONTROL_FILE_SIZE: usize = 8192;

/// `sizeof(CheckPoint)` on 64-bit platforms, in every supported version.
pub const CHECKPOINT_SIZE: usize = 88;

/// `MOCK_AUTH_NONCE_LEN`.
pub const MOCK_AUTH_NONCE_LEN: usize = 32;

/// `FLOATFORMAT_VALUE`: what `floatFormat` holds when the writer's doubles are IEEE 754 like ours.
pub const FLOATFORMAT_VALUE: f64 = 1234567.0;

/// `PG_DATA_CHECKSUM_VERSION`: `data_checksum_version` of a cluster with data checksums.
pub const PG_DATA_CHECKSUM_VERSION: u32 = 1;

/// What is wrong with a control file or a checkpoint record body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlFileError {
    #[error("unexpected control file size {size}, expected {PG_CONTROL_FILE_SIZE}")]
    WrongSize { size: usize },

    #[error(
        "unsupported control file: pg_control_version {pg_control_version} with \
         catalog_version_no {catalog_version_no} is not a supported PostgreSQL version \
         (supported: {}){hint}",
        supported_versions()
    )]
    UnknownVersion {
        pg_control_version: u32,
        catalog_version_no: u32,
        /// Extra explanation when the numbers suggest why (corruption, byte order).
        hint: String,
    },

    #[error(
        "unexpected control file CRC: stored 0x{stored:08X} at offset {offset}, computed \
         0x{computed:08X} over bytes 0..{offset} (PostgreSQL {major} layout); the file is corrupt"
    )]
    CrcMismatch {
        stored: u32,
        computed: u32,
        offset: usize,
        major: PgMajor,
    },

    #[error(
        "invalid WAL segment size in control file: xlog_seg_size = {size} bytes; it must be a \
         power of two between 1 MB and 1 GB"
    )]
    InvalidWalSegSize { size: u32 },

    #[error("CheckPoint record body too short: {len} bytes, expected {CHECKPOINT_SIZE}")]
    CheckPointTooShort { len: usize },

    #[error(
        "cannot write control file: pg_control_version {pg_control_version} with \
         catalog_version_no {catalog_version_no} does not describe PostgreSQL {major}, whose \
         layout the file was parsed with"
    )]
    VersionChanged {
        pg_control_version: u32,
        catalog_version_no: u32,
        major: PgMajor,
    },
}

fn supported_versions() -> String {
    PgMajor::ALL
        .iter()
        .map(|m| {
            format!(
                "{} = {}/{}",
                m.number(),
                m.pg_control_version(),
                m.catalog_version_no()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `DBState`: what the server was doing when it last wrote the control file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DBState {
    /// `DB_STARTUP`
    Startup,
    /// `DB_SHUTDOWNED`: a primary shut down cleanly.
    Shutdowned,
    /// `DB_SHUTDOWNED_IN_RECOVERY`: a standby shut down cleanly.
    ShutdownedInRecovery,
    /// `DB_SHUTDOWNING`
    Shutdowning,
    /// `DB_IN_CRASH_RECOVERY`
    InCrashRecovery,
    /// `DB_IN_ARCHIVE_RECOVERY`: a standby, or a rewound cluster that has not finished replay.
    InArchiveRecovery,
    /// `DB_IN_PRODUCTION`: a running primary, or one that crashed.
    InProduction,
    /// A value no supported version writes; kept so that the file can still be shown.
    Unknown(u32),
}

impl DBState {
    pub fn from_u32(v: u32) -> DBState {
        match v {
            0 => DBState::Startup,
            1 => DBState::Shutdowned,
            2 => DBState::ShutdownedInRecovery,
            3 => DBState::Shutdowning,
            4 => DBState::InCrashRecovery,
            5 => DBState::InArchiveRecovery,
            6 => DBState::InProduction,
            other => DBState::Unknown(other),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            DBState::Startup => 0,
            DBState::Shutdowned => 1,
            DBState::ShutdownedInRecovery => 2,
            DBState::Shutdowning => 3,
            DBState::InCrashRecovery => 4,
            DBState::InArchiveRecovery => 5,
            DBState::InProduction => 6,
            DBState::Unknown(v) => v,
        }
    }

    /// Whether the cluster was shut down cleanly (pg_rewind's "target server must be shut down
    /// cleanly" check accepts exactly these two states).
    pub fn is_shut_down_cleanly(self) -> bool {
        matches!(self, DBState::Shutdowned | DBState::ShutdownedInRecovery)
    }

    /// The wording `pg_controldata` uses ("Database cluster state: ...").
    pub fn description(self) -> String {
        match self {
            DBState::Startup => "starting up".into(),
            DBState::Shutdowned => "shut down".into(),
            DBState::ShutdownedInRecovery => "shut down in recovery".into(),
            DBState::Shutdowning => "shutting down".into(),
            DBState::InCrashRecovery => "in crash recovery".into(),
            DBState::InArchiveRecovery => "in archive recovery".into(),
            DBState::InProduction => "in production".into(),
            DBState::Unknown(v) => format!("unrecognized status code {v}"),
        }
    }
}

impl std::fmt::Display for DBState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description())
    }
}

impl Serialize for DBState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.description())
    }
}

/// `WalLevel` (`access/xlog.h`): `WAL_LEVEL_MINIMAL` 0, `WAL_LEVEL_REPLICA` 1,
/// `WAL_LEVEL_LOGICAL` 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalLevel {
    Minimal,
    Replica,
    Logical,
    Unknown(i32),
}

impl WalLevel {
    pub fn from_i32(v: i32) -> WalLevel {
        match v {
            0 => WalLevel::Minimal,
            1 => WalLevel::Replica,
            2 => WalLevel::Logical,
            other => WalLevel::Unknown(other),
        }
    }

    pub fn to_i32(self) -> i32 {
        match self {
            WalLevel::Minimal => 0,
            WalLevel::Replica => 1,
            WalLevel::Logical => 2,
            WalLevel::Unknown(v) => v,
        }
    }

    /// The `wal_level` setting's spelling.
    pub fn name(self) -> String {
        match self {
            WalLevel::Minimal => "minimal".into(),
            WalLevel::Replica => "replica".into(),
            WalLevel::Logical => "logical".into(),
            WalLevel::Unknown(v) => format!("unrecognized wal_level {v}"),
        }
    }
}

impl std::fmt::Display for WalLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for WalLevel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// Serializes an [`Lsn`] the way PostgreSQL prints it, `X/X`.
pub(crate) fn serialize_lsn<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(lsn)
}

/// A `FullTransactionId` printed as `pg_controldata` does: `epoch:xid`.
fn serialize_full_xid<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{}:{}", v >> 32, *v as u32))
}

fn serialize_hex<S: Serializer>(v: &[u8; MOCK_AUTH_NONCE_LEN], s: S) -> Result<S::Ok, S::Error> {
    let mut out = String::with_capacity(2 * MOCK_AUTH_NONCE_LEN);
    for b in v {
        out.push_str(&format!("{b:02x}"));
    }
    s.serialize_str(&out)
}

// ---------------------------------------------------------------------------------------------
// Little-endian field access with every range checked.

fn get<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}
fn get_u32(b: &[u8], off: usize) -> Option<u32> {
    get::<4>(b, off).map(u32::from_le_bytes)
}
fn get_i32(b: &[u8], off: usize) -> Option<i32> {
    get::<4>(b, off).map(i32::from_le_bytes)
}
fn get_u64(b: &[u8], off: usize) -> Option<u64> {
    get::<8>(b, off).map(u64::from_le_bytes)
}
fn get_i64(b: &[u8], off: usize) -> Option<i64> {
    get::<8>(b, off).map(i64::from_le_bytes)
}
fn get_bool(b: &[u8], off: usize) -> Option<bool> {
    b.get(off).map(|&v| v != 0)
}
fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(dst) = off.checked_add(v.len()).and_then(|end| b.get_mut(off..end)) {
        dst.copy_from_slice(v);
    }
}

/// Writes `new` at `off` only if it differs from `old`: the bytes of fields nobody changed stay
/// exactly as the server wrote them (a C `bool` holding 2 stays 2).
fn put_if<T: PartialEq>(b: &mut [u8], off: usize, new: &T, old: &T, enc: impl Fn(&T) -> Vec<u8>) {
    if new != old {
        put(b, off, &enc(new));
    }
}

// ---------------------------------------------------------------------------------------------
// CheckPoint

/// Offsets inside `CheckPoint` (identical 13–18 except `wal_level`, present from 17).
mod cp {
    pub const REDO: usize = 0;
    pub const THIS_TLI: usize = 8;
    pub const PREV_TLI: usize = 12;
    pub const FULL_PAGE_WRITES: usize = 16;
    pub const WAL_LEVEL: usize = 20; // 17+
    pub const NEXT_XID: usize = 24;
    pub const NEXT_OID: usize = 32;
    pub const NEXT_MULTI: usize = 36;
    pub const NEXT_MULTI_OFFSET: usize = 40;
    pub const OLDEST_XID: usize = 44;
    pub const OLDEST_XID_DB: usize = 48;
    pub const OLDEST_MULTI: usize = 52;
    pub const OLDEST_MULTI_DB: usize = 56;
    pub const TIME: usize = 64;
    pub const OLDEST_COMMIT_TS_XID: usize = 72;
    pub const NEWEST_COMMIT_TS_XID: usize = 76;
    pub const OLDEST_ACTIVE_XID: usize = 80;
}

/// `CheckPoint`: the body of a checkpoint record, and the copy of the latest one kept in
/// `pg_control` as `checkPointCopy`.
#[allow(non_snake_case)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckPoint {
    /// Where replay must start for this checkpoint (the REDO point).
    #[serde(serialize_with = "serialize_lsn")]
    pub redo: Lsn,
    /// The timeline the checkpoint was written on.
    pub ThisTimeLineID: TimeLineId,
    /// The previous timeline, when this checkpoint is the first after a timeline switch;
    /// otherwise equal to `ThisTimeLineID`.
    pub PrevTimeLineID: TimeLineId,
    pub fullPageWrites: bool,
    /// `wal_level` at the time of the checkpoint; only recorded from PostgreSQL 17 on.
    pub wal_level: Option<WalLevel>,
    /// `FullTransactionId`: epoch in the high 32 bits, xid in the low 32.
    #[serde(serialize_with = "serialize_full_xid")]
    pub nextXid: u64,
    pub nextOid: u32,
    pub nextMulti: u32,
    pub nextMultiOffset: u32,
    pub oldestXid: u32,
    pub oldestXidDB: u32,
    pub oldestMulti: u32,
    pub oldestMultiDB: u32,
    /// `pg_time_t`: seconds since the Unix epoch.
    pub time: i64,
    pub oldestCommitTsXid: u32,
    pub newestCommitTsXid: u32,
    pub oldestActiveXid: u32,
}

impl CheckPoint {
    /// Parses the first 88 bytes of `bytes` as the `CheckPoint` struct of `major`. Longer input
    /// is accepted (the rest is ignored); shorter input is an error.
    pub fn parse(bytes: &[u8], major: PgMajor) -> Result<CheckPoint, ControlFileError> {
        let short = || ControlFileError::CheckPointTooShort { len: bytes.len() };
        let b = bytes.get(..CHECKPOINT_SIZE).ok_or_else(short)?;
        let u32_at = |off| get_u32(b, off).ok_or_else(short);
        Ok(CheckPoint {
            redo: Lsn(get_u64(b, cp::REDO).ok_or_else(short)?),
            ThisTimeLineID: u32_at(cp::THIS_TLI)?,
            PrevTimeLineID: u32_at(cp::PREV_TLI)?,
            fullPageWrites: get_bool(b, cp::FULL_PAGE_WRITES).ok_or_else(short)?,
            wal_level: if has_checkpoint_wal_level(major) {
                Some(WalLevel::from_i32(
                    get_i32(b, cp::WAL_LEVEL).ok_or_else(short)?,
                ))
            } else {
                None
            },
            nextXid: get_u64(b, cp::NEXT_XID).ok_or_else(short)?,
            nextOid: u32_at(cp::NEXT_OID)?,
            nextMulti: u32_at(cp::NEXT_MULTI)?,
            nextMultiOffset: u32_at(cp::NEXT_MULTI_OFFSET)?,
            oldestXid: u32_at(cp::OLDEST_XID)?,
            oldestXidDB: u32_at(cp::OLDEST_XID_DB)?,
            oldestMulti: u32_at(cp::OLDEST_MULTI)?,
            oldestMultiDB: u32_at(cp::OLDEST_MULTI_DB)?,
            time: get_i64(b, cp::TIME).ok_or_else(short)?,
            oldestCommitTsXid: u32_at(cp::OLDEST_COMMIT_TS_XID)?,
            newestCommitTsXid: u32_at(cp::NEWEST_COMMIT_TS_XID)?,
            oldestActiveXid: u32_at(cp::OLDEST_ACTIVE_XID)?,
        })
    }

    /// The 88 bytes of this checkpoint as `major` lays them out, padding zeroed.
    pub fn to_bytes(&self, major: PgMajor) -> [u8; CHECKPOINT_SIZE] {
        let mut b = [0u8; CHECKPOINT_SIZE];
        let zero = CheckPoint::parse(&[0u8; CHECKPOINT_SIZE], major);
        // Writing against an all-zero "old" value writes every non-zero field.
        if let Ok(zero) = zero {
            self.write_changes(&zero, &mut b, 0, major);
        }
        b
    }

    /// The epoch half of `nextXid`.
    pub fn next_xid_epoch(&self) -> u32 {
        (self.nextXid >> 32) as u32
    }

    /// The 32-bit xid half of `nextXid`.
    pub fn next_xid_xid(&self) -> u32 {
        self.nextXid as u32
    }

    fn write_changes(&self, old: &CheckPoint, b: &mut [u8], base: usize, major: PgMajor) {
        let u32le = |v: &u32| v.to_le_bytes().to_vec();
        put_if(b, base + cp::REDO, &self.redo, &old.redo, |v| {
            v.0.to_le_bytes().to_vec()
        });
        put_if(
            b,
            base + cp::THIS_TLI,
            &self.ThisTimeLineID,
            &old.ThisTimeLineID,
            u32le,
        );
        put_if(
            b,
            base + cp::PREV_TLI,
            &self.PrevTimeLineID,
            &old.PrevTimeLineID,
            u32le,
        );
        put_if(
            b,
            base + cp::FULL_PAGE_WRITES,
            &self.fullPageWrites,
            &old.fullPageWrites,
            |v| vec![u8::from(*v)],
        );
        if has_checkpoint_wal_level(major)
            && let (Some(new), Some(old)) = (self.wal_level, old.wal_level)
        {
            put_if(b, base + cp::WAL_LEVEL, &new, &old, |v| {
                v.to_i32().to_le_bytes().to_vec()
            });
        }
        put_if(b, base + cp::NEXT_XID, &self.nextXid, &old.nextXid, |v| {
            v.to_le_bytes().to_vec()
        });
        let fields32: [(usize, u32, u32); 10] = [
            (cp::NEXT_OID, self.nextOid, old.nextOid),
            (cp::NEXT_MULTI, self.nextMulti, old.nextMulti),
            (
                cp::NEXT_MULTI_OFFSET,
                self.nextMultiOffset,
                old.nextMultiOffset,
            ),
            (cp::OLDEST_XID, self.oldestXid, old.oldestXid),
            (cp::OLDEST_XID_DB, self.oldestXidDB, old.oldestXidDB),
            (cp::OLDEST_MULTI, self.oldestMulti, old.oldestMulti),
            (cp::OLDEST_MULTI_DB, self.oldestMultiDB, old.oldestMultiDB),
            (
                cp::OLDEST_COMMIT_TS_XID,
                self.oldestCommitTsXid,
                old.oldestCommitTsXid,
            ),
            (
                cp::NEWEST_COMMIT_TS_XID,
                self.newestCommitTsXid,
                old.newestCommitTsXid,
            ),
            (
                cp::OLDEST_ACTIVE_XID,
                self.oldestActiveXid,
                old.oldestActiveXid,
            ),
        ];
        for (off, new, old) in fields32 {
            put_if(b, base + off, &new, &old, u32le);
        }
        put_if(b, base + cp::TIME, &self.time, &old.time, |v| {
            v.to_le_bytes().to_vec()
        });
    }
}

fn has_checkpoint_wal_level(major: PgMajor) -> bool {
    major >= PgMajor::V17
}

// ---------------------------------------------------------------------------------------------
// ControlFileData

/// Offsets inside `ControlFileData` that are the same in 13–18.
mod off {
    pub const SYSTEM_IDENTIFIER: usize = 0;
    pub const PG_CONTROL_VERSION: usize = 8;
    pub const CATALOG_VERSION_NO: usize = 12;
    pub const STATE: usize = 16;
    pub const TIME: usize = 24;
    pub const CHECKPOINT: usize = 32;
    pub const CHECKPOINT_COPY: usize = 40;
    pub const UNLOGGED_LSN: usize = 128;
    pub const MIN_RECOVERY_POINT: usize = 136;
    pub const MIN_RECOVERY_POINT_TLI: usize = 144;
    pub const BACKUP_START_POINT: usize = 152;
    pub const BACKUP_END_POINT: usize = 160;
    pub const BACKUP_END_REQUIRED: usize = 168;
    pub const WAL_LEVEL: usize = 172;
    pub const WAL_LOG_HINTS: usize = 176;
    pub const MAX_CONNECTIONS: usize = 180;
    pub const MAX_WORKER_PROCESSES: usize = 184;
    pub const MAX_WAL_SENDERS: usize = 188;
    pub const MAX_PREPARED_XACTS: usize = 192;
    pub const MAX_LOCKS_PER_XACT: usize = 196;
    pub const TRACK_COMMIT_TIMESTAMP: usize = 200;
    pub const MAX_ALIGN: usize = 204;
    pub const FLOAT_FORMAT: usize = 208;
    pub const BLCKSZ: usize = 216;
    pub const RELSEG_SIZE: usize = 220;
    pub const XLOG_BLCKSZ: usize = 224;
    pub const XLOG_SEG_SIZE: usize = 228;
    pub const NAME_DATA_LEN: usize = 232;
    pub const INDEX_MAX_KEYS: usize = 236;
    pub const TOAST_MAX_CHUNK_SIZE: usize = 240;
    pub const LOBLKSIZE: usize = 244;
    pub const FLOAT8_BY_VAL: usize = 248;
    pub const DATA_CHECKSUM_VERSION: usize = 252;
}

/// The offsets that move between versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlFileLayout {
    /// `default_char_signedness` (18+).
    pub default_char_signedness: Option<usize>,
    pub mock_authentication_nonce: usize,
    /// Offset of `crc`; the CRC covers bytes `0..crc`.
    pub crc: usize,
}

impl ControlFileLayout {
    pub fn of(major: PgMajor) -> ControlFileLayout {
        if major >= PgMajor::V18 {
            ControlFileLayout {
                default_char_signedness: Some(256),
                mock_authentication_nonce: 257,
                crc: 292,
            }
        } else {
            ControlFileLayout {
                default_char_signedness: None,
                mock_authentication_nonce: 256,
                crc: 288,
            }
        }
    }
}

/// The bytes a [`ControlFileData`] was parsed from, kept so that writing it back preserves
/// everything this module does not model.
#[derive(Clone, PartialEq, Eq)]
struct Original(Box<[u8]>);

impl std::fmt::Debug for Original {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// `ControlFileData`: the parsed contents of `global/pg_control`.
///
/// Fields carry PostgreSQL's names. Change any public field and call [`Self::to_bytes`] to get
/// the file back with those fields rewritten and a fresh CRC.
#[allow(non_snake_case)]
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControlFileData {
    /// The major version, recognised from `pg_control_version` and `catalog_version_no`.
    #[serde(serialize_with = "serialize_major")]
    pub major: PgMajor,

    pub system_identifier: u64,
    pub pg_control_version: u32,
    pub catalog_version_no: u32,

    pub state: DBState,
    /// `pg_time_t` of the last update of this file.
    pub time: i64,
    /// The latest checkpoint record.
    #[serde(serialize_with = "serialize_lsn")]
    pub checkPoint: Lsn,
    /// The body of the checkpoint record at `checkPoint`.
    pub checkPointCopy: CheckPoint,
    /// The fake LSN counter of unlogged relations.
    #[serde(serialize_with = "serialize_lsn")]
    pub unloggedLSN: Lsn,

    /// Replay must reach this point (on `minRecoveryPointTLI`) before the cluster is
    /// consistent; 0/0 when there is no such requirement.
    #[serde(serialize_with = "serialize_lsn")]
    pub minRecoveryPoint: Lsn,
    pub minRecoveryPointTLI: TimeLineId,
    #[serde(serialize_with = "serialize_lsn")]
    pub backupStartPoint: Lsn,
    #[serde(serialize_with = "serialize_lsn")]
    pub backupEndPoint: Lsn,
    pub backupEndRequired: bool,

    pub wal_level: WalLevel,
    pub wal_log_hints: bool,
    pub MaxConnections: i32,
    pub max_worker_processes: i32,
    pub max_wal_senders: i32,
    pub max_prepared_xacts: i32,
    pub max_locks_per_xact: i32,
    pub track_commit_timestamp: bool,

    pub maxAlign: u32,
    pub floatFormat: f64,
    pub blcksz: u32,
    pub relseg_size: u32,
    pub xlog_blcksz: u32,
    pub xlog_seg_size: u32,
    pub nameDataLen: u32,
    pub indexMaxKeys: u32,
    pub toast_max_chunk_size: u32,
    pub loblksize: u32,
    pub float8ByVal: bool,
    /// 0 without data checksums, [`PG_DATA_CHECKSUM_VERSION`] with.
    pub data_checksum_version: u32,
    /// 18+ only.
    pub default_char_signedness: Option<bool>,
    #[serde(serialize_with = "serialize_hex")]
    pub mock_authentication_nonce: [u8; MOCK_AUTH_NONCE_LEN],
    /// The CRC stored in the file (which [`Self::parse`] verified).
    pub crc: u32,

    #[serde(skip)]
    original: Original,
}

fn serialize_major<S: Serializer>(m: &PgMajor, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(m.number())
}

/// CRC-32C of the bytes that precede `crc` in a control file of `major` (`INIT_CRC32C`,
/// `COMP_CRC32C`, `FIN_CRC32C` over `offsetof(ControlFileData, crc)` bytes). `None` if the
/// input is shorter than that.
pub fn control_file_crc(bytes: &[u8], major: PgMajor) -> Option<u32> {
    let end = ControlFileLayout::of(major).crc;
    bytes.get(..end).map(crc32c::crc32c)
}

impl ControlFileData {
    /// Parses and verifies the contents of `global/pg_control`: the size must be exactly 8192,
    /// the version known, the CRC right and `xlog_seg_size` valid (the checks pg_rewind's
    /// `digestControlFile` makes).
    pub fn parse(bytes: &[u8]) -> Result<ControlFileData, ControlFileError> {
        if bytes.len() != PG_CONTROL_FILE_SIZE {
            return Err(ControlFileError::WrongSize { size: bytes.len() });
        }
        let size_err = || ControlFileError::WrongSize { size: bytes.len() };
        let pg_control_version = get_u32(bytes, off::PG_CONTROL_VERSION).ok_or_else(size_err)?;
        let catalog_version_no = get_u32(bytes, off::CATALOG_VERSION_NO).ok_or_else(size_err)?;
        let major = PgMajor::from_control(pg_control_version, catalog_version_no)
            .ok_or_else(|| unknown_version(bytes, pg_control_version, catalog_version_no))?;
        let layout = ControlFileLayout::of(major);

        let stored = get_u32(bytes, layout.crc).ok_or_else(size_err)?;
        let computed = control_file_crc(bytes, major).ok_or_else(size_err)?;
        if stored != computed {
            return Err(ControlFileError::CrcMismatch {
                stored,
                computed,
                offset: layout.crc,
                major,
            });
        }

        let data = Self::decode(bytes, major)?;
        if !is_valid_wal_seg_size(data.xlog_seg_size) {
            return Err(ControlFileError::InvalidWalSegSize {
                size: data.xlog_seg_size,
            });
        }
        Ok(data)
    }

    /// Reads every field at `major`'s offsets, without any verification.
    fn decode(b: &[u8], major: PgMajor) -> Result<ControlFileData, ControlFileError> {
        let size_err = || ControlFileError::WrongSize { size: b.len() };
        let layout = ControlFileLayout::of(major);
        let u32_at = |o| get_u32(b, o).ok_or_else(size_err);
        let i32_at = |o| get_i32(b, o).ok_or_else(size_err);
        let lsn_at = |o| get_u64(b, o).map(Lsn).ok_or_else(size_err);
        let bool_at = |o| get_bool(b, o).ok_or_else(size_err);
        let cp_bytes = b
            .get(off::CHECKPOINT_COPY..off::CHECKPOINT_COPY + CHECKPOINT_SIZE)
            .ok_or_else(size_err)?;
        Ok(ControlFileData {
            major,
            system_identifier: get_u64(b, off::SYSTEM_IDENTIFIER).ok_or_else(size_err)?,
            pg_control_version: u32_at(off::PG_CONTROL_VERSION)?,
            catalog_version_no: u32_at(off::CATALOG_VERSION_NO)?,
            state: DBState::from_u32(u32_at(off::STATE)?),
            time: get_i64(b, off::TIME).ok_or_else(size_err)?,
            checkPoint: lsn_at(off::CHECKPOINT)?,
            checkPointCopy: CheckPoint::parse(cp_bytes, major)?,
            unloggedLSN: lsn_at(off::UNLOGGED_LSN)?,
            minRecoveryPoint: lsn_at(off::MIN_RECOVERY_POINT)?,
            minRecoveryPointTLI: u32_at(off::MIN_RECOVERY_POINT_TLI)?,
            backupStartPoint: lsn_at(off::BACKUP_START_POINT)?,
            backupEndPoint: lsn_at(off::BACKUP_END_POINT)?,
            backupEndRequired: bool_at(off::BACKUP_END_REQUIRED)?,
            wal_level: WalLevel::from_i32(i32_at(off::WAL_LEVEL)?),
            wal_log_hints: bool_at(off::WAL_LOG_HINTS)?,
            MaxConnections: i32_at(off::MAX_CONNECTIONS)?,
            max_worker_processes: i32_at(off::MAX_WORKER_PROCESSES)?,
            max_wal_senders: i32_at(off::MAX_WAL_SENDERS)?,
            max_prepared_xacts: i32_at(off::MAX_PREPARED_XACTS)?,
            max_locks_per_xact: i32_at(off::MAX_LOCKS_PER_XACT)?,
            track_commit_timestamp: bool_at(off::TRACK_COMMIT_TIMESTAMP)?,
            maxAlign: u32_at(off::MAX_ALIGN)?,
            floatFormat: f64::from_bits(get_u64(b, off::FLOAT_FORMAT).ok_or_else(size_err)?),
            blcksz: u32_at(off::BLCKSZ)?,
            relseg_size: u32_at(off::RELSEG_SIZE)?,
            xlog_blcksz: u32_at(off::XLOG_BLCKSZ)?,
            xlog_seg_size: u32_at(off::XLOG_SEG_SIZE)?,
            nameDataLen: u32_at(off::NAME_DATA_LEN)?,
            indexMaxKeys: u32_at(off::INDEX_MAX_KEYS)?,
            toast_max_chunk_size: u32_at(off::TOAST_MAX_CHUNK_SIZE)?,
            loblksize: u32_at(off::LOBLKSIZE)?,
            float8ByVal: bool_at(off::FLOAT8_BY_VAL)?,
            data_checksum_version: u32_at(off::DATA_CHECKSUM_VERSION)?,
            default_char_signedness: match layout.default_char_signedness {
                Some(o) => Some(bool_at(o)?),
                None => None,
            },
            mock_authentication_nonce: get::<MOCK_AUTH_NONCE_LEN>(
                b,
                layout.mock_authentication_nonce,
            )
            .ok_or_else(size_err)?,
            crc: u32_at(layout.crc)?,
            original: Original(b.to_vec().into_boxed_slice()),
        })
    }

    /// The file to write back: the 8192 bytes this was parsed from, with every field whose
    /// value differs from what was parsed rewritten at its offset, and the CRC recomputed.
    ///
    /// Refuses to produce a file PostgreSQL (or [`Self::parse`]) would reject for its layout:
    /// the version numbers must still name `major`, and `xlog_seg_size` must be valid.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ControlFileError> {
        let major = self.major;
        if PgMajor::from_control(self.pg_control_version, self.catalog_version_no) != Some(major) {
            return Err(ControlFileError::VersionChanged {
                pg_control_version: self.pg_control_version,
                catalog_version_no: self.catalog_version_no,
                major,
            });
        }
        if !is_valid_wal_seg_size(self.xlog_seg_size) {
            return Err(ControlFileError::InvalidWalSegSize {
                size: self.xlog_seg_size,
            });
        }
        let mut b = self.original.0.to_vec();
        let old = Self::decode(&b, major)?;
        let layout = ControlFileLayout::of(major);

        let u32le = |v: &u32| v.to_le_bytes().to_vec();
        let i32le = |v: &i32| v.to_le_bytes().to_vec();
        let lsnle = |v: &Lsn| v.0.to_le_bytes().to_vec();
        let boolb = |v: &bool| vec![u8::from(*v)];

        put_if(
            &mut b,
            off::SYSTEM_IDENTIFIER,
            &self.system_identifier,
            &old.system_identifier,
            |v| v.to_le_bytes().to_vec(),
        );
        put_if(
            &mut b,
            off::STATE,
            &self.state.to_u32(),
            &old.state.to_u32(),
            u32le,
        );
        put_if(&mut b, off::TIME, &self.time, &old.time, |v| {
            v.to_le_bytes().to_vec()
        });
        self.checkPointCopy
            .write_changes(&old.checkPointCopy, &mut b, off::CHECKPOINT_COPY, major);

        let lsns: [(usize, Lsn, Lsn); 5] = [
            (off::CHECKPOINT, self.checkPoint, old.checkPoint),
            (off::UNLOGGED_LSN, self.unloggedLSN, old.unloggedLSN),
            (
                off::MIN_RECOVERY_POINT,
                self.minRecoveryPoint,
                old.minRecoveryPoint,
            ),
            (
                off::BACKUP_START_POINT,
                self.backupStartPoint,
                old.backupStartPoint,
            ),
            (
                off::BACKUP_END_POINT,
                self.backupEndPoint,
                old.backupEndPoint,
            ),
        ];
        for (o, new, old) in lsns {
            put_if(&mut b, o, &new, &old, lsnle);
        }

        let bools: [(usize, bool, bool); 4] = [
            (
                off::BACKUP_END_REQUIRED,
                self.backupEndRequired,
                old.backupEndRequired,
            ),
            (off::WAL_LOG_HINTS, self.wal_log_hints, old.wal_log_hints),
            (
                off::TRACK_COMMIT_TIMESTAMP,
                self.track_commit_timestamp,
                old.track_commit_timestamp,
            ),
            (off::FLOAT8_BY_VAL, self.float8ByVal, old.float8ByVal),
        ];
        for (o, new, old) in bools {
            put_if(&mut b, o, &new, &old, boolb);
        }

        let i32s: [(usize, i32, i32); 6] = [
            (
                off::WAL_LEVEL,
                self.wal_level.to_i32(),
                old.wal_level.to_i32(),
            ),
            (
                off::MAX_CONNECTIONS,
                self.MaxConnections,
                old.MaxConnections,
            ),
            (
                off::MAX_WORKER_PROCESSES,
                self.max_worker_processes,
                old.max_worker_processes,
            ),
            (
                off::MAX_WAL_SENDERS,
                self.max_wal_senders,
                old.max_wal_senders,
            ),
            (
                off::MAX_PREPARED_XACTS,
                self.max_prepared_xacts,
                old.max_prepared_xacts,
            ),
            (
                off::MAX_LOCKS_PER_XACT,
                self.max_locks_per_xact,
                old.max_locks_per_xact,
            ),
        ];
        for (o, new, old) in i32s {
            put_if(&mut b, o, &new, &old, i32le);
        }

        let u32s: [(usize, u32, u32); 13] = [
            (
                off::PG_CONTROL_VERSION,
                self.pg_control_version,
                old.pg_control_version,
            ),
            (
                off::CATALOG_VERSION_NO,
                self.catalog_version_no,
                old.catalog_version_no,
            ),
            (
                off::MIN_RECOVERY_POINT_TLI,
                self.minRecoveryPointTLI,
                old.minRecoveryPointTLI,
            ),
            (off::MAX_ALIGN, self.maxAlign, old.maxAlign),
            (off::BLCKSZ, self.blcksz, old.blcksz),
            (off::RELSEG_SIZE, self.relseg_size, old.relseg_size),
            (off::XLOG_BLCKSZ, self.xlog_blcksz, old.xlog_blcksz),
            (off::XLOG_SEG_SIZE, self.xlog_seg_size, old.xlog_seg_size),
            (off::NAME_DATA_LEN, self.nameDataLen, old.nameDataLen),
            (off::INDEX_MAX_KEYS, self.indexMaxKeys, old.indexMaxKeys),
            (
                off::TOAST_MAX_CHUNK_SIZE,
                self.toast_max_chunk_size,
                old.toast_max_chunk_size,
            ),
            (off::LOBLKSIZE, self.loblksize, old.loblksize),
            (
                off::DATA_CHECKSUM_VERSION,
                self.data_checksum_version,
                old.data_checksum_version,
            ),
        ];
        for (o, new, old) in u32s {
            put_if(&mut b, o, &new, &old, u32le);
        }

        // Compare bit patterns: a NaN read from a damaged file must not count as "changed".
        put_if(
            &mut b,
            off::FLOAT_FORMAT,
            &self.floatFormat.to_bits(),
            &old.floatFormat.to_bits(),
            |v| v.to_le_bytes().to_vec(),
        );
        if let (Some(o), Some(new), Some(old)) = (
            layout.default_char_signedness,
            self.default_char_signedness,
            old.default_char_signedness,
        ) {
            put_if(&mut b, o, &new, &old, boolb);
        }
        put_if(
            &mut b,
            layout.mock_authentication_nonce,
            &self.mock_authentication_nonce,
            &old.mock_authentication_nonce,
            |v| v.to_vec(),
        );

        if let Some(crc) = control_file_crc(&b, major) {
            put(&mut b, layout.crc, &crc.to_le_bytes());
        }
        Ok(b)
    }

    /// The timeline pg_rewind considers this cluster to be on (step 7 of its main sequence),
    /// with the rule of this cluster's major version; see [`timeline_for_rewind`].
    pub fn timeline_for_rewind(&self) -> TimeLineId {
        timeline_for_rewind(
            self.major,
            self.checkPointCopy.ThisTimeLineID,
            self.minRecoveryPointTLI,
        )
    }

    /// Whether hint-bit changes are WAL-logged, which pg_rewind requires of the target
    /// (data checksums or `wal_log_hints`).
    pub fn hint_bits_logged(&self) -> bool {
        self.data_checksum_version == PG_DATA_CHECKSUM_VERSION || self.wal_log_hints
    }

    /// `mock_authentication_nonce` as 64 lower-case hex digits, as `pg_controldata` prints it.
    pub fn mock_authentication_nonce_hex(&self) -> String {
        self.mock_authentication_nonce
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The timeline pg_rewind considers a cluster to be on, given the checkpoint copy's
/// `ThisTimeLineID` and `minRecoveryPointTLI` from its control file.
///
/// From PostgreSQL 16 on it is `max(minRecoveryPointTLI, checkPointCopy.ThisTimeLineID)`: a
/// standby that was just promoted has replayed onto a new timeline (recorded in
/// `minRecoveryPointTLI`) before its first checkpoint on that timeline completes. Versions
/// 13–15 used `ThisTimeLineID` alone, and could then wrongly conclude "no rewind required"
/// (commit 009eeee74, not back-patched).
pub fn timeline_for_rewind(
    major: PgMajor,
    this_timeline_id: TimeLineId,
    min_recovery_point_tli: TimeLineId,
) -> TimeLineId {
    if major >= PgMajor::V16 {
        this_timeline_id.max(min_recovery_point_tli)
    } else {
        this_timeline_id
    }
}

fn unknown_version(
    bytes: &[u8],
    pg_control_version: u32,
    catalog_version_no: u32,
) -> ControlFileError {
    let mut hint = String::new();
    let swapped = (
        pg_control_version.swap_bytes(),
        catalog_version_no.swap_bytes(),
    );
    if PgMajor::from_control(swapped.0, swapped.1).is_some() {
        hint =
            "; the numbers are byte-swapped: the file was written by a big-endian machine".into();
    } else {
        // If no layout's CRC matches either, the version fields are as likely damaged as the
        // version is unsupported.
        let crc_ok = [PgMajor::V13, PgMajor::V18].iter().any(|&m| {
            let o = ControlFileLayout::of(m).crc;
            get_u32(bytes, o).is_some() && get_u32(bytes, o) == control_file_crc(bytes, m)
        });
        if !crc_ok {
            hint = "; no known layout's CRC matches either, so the file may be corrupt or not a \
                    control file"
                .into();
        }
    }
    ControlFileError::UnknownVersion {
        pg_control_version,
        catalog_version_no,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A structurally valid control file built in memory (the real ones are in tests/data).
    fn synthetic(major: PgMajor) -> Vec<u8> {
        let mut b = vec![0u8; PG_CONTROL_FILE_SIZE];
        put(&mut b, off::SYSTEM_IDENTIFIER, &42u64.to_le_bytes());
        put(
            &mut b,
            off::PG_CONTROL_VERSION,
            &major.pg_control_version().to_le_bytes(),
        );
        put(
            &mut b,
            off::CATALOG_VERSION_NO,
            &major.catalog_version_no().to_le_bytes(),
        );
        put(&mut b, off::STATE, &1u32.to_le_bytes());
        put(&mut b, off::XLOG_SEG_SIZE, &(16u32 << 20).to_le_bytes());
        put(&mut b, off::BLCKSZ, &8192u32.to_le_bytes());
        let crc = control_file_crc(&b, major).unwrap();
        put(&mut b, ControlFileLayout::of(major).crc, &crc.to_le_bytes());
        b
    }

    #[test]
    fn synthetic_files_parse_for_every_major() {
        for m in PgMajor::ALL {
            let c = ControlFileData::parse(&synthetic(m)).unwrap();
            assert_eq!(c.major, m);
            assert_eq!(c.state, DBState::Shutdowned);
            assert_eq!(c.checkPointCopy.wal_level.is_some(), m >= PgMajor::V17);
            assert_eq!(c.default_char_signedness.is_some(), m >= PgMajor::V18);
            assert_eq!(c.to_bytes().unwrap(), synthetic(m));
        }
    }

    #[test]
    fn size_is_checked_first() {
        let e = ControlFileData::parse(&[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected control file size 0, expected 8192"
        );
        let e = ControlFileData::parse(&[0u8; 8193]).unwrap_err();
        assert_eq!(e, ControlFileError::WrongSize { size: 8193 });
    }

    #[test]
    fn unknown_states_and_levels_are_kept() {
        let m = PgMajor::V15;
        let mut b = synthetic(m);
        put(&mut b, off::STATE, &77u32.to_le_bytes());
        put(&mut b, off::WAL_LEVEL, &(-3i32).to_le_bytes());
        let crc = control_file_crc(&b, m).unwrap();
        put(&mut b, 288, &crc.to_le_bytes());
        let c = ControlFileData::parse(&b).unwrap();
        assert_eq!(c.state, DBState::Unknown(77));
        assert_eq!(c.state.to_string(), "unrecognized status code 77");
        assert_eq!(c.wal_level, WalLevel::Unknown(-3));
        assert_eq!(c.to_bytes().unwrap(), b);
    }

    #[test]
    fn byte_swapped_versions_are_explained() {
        let mut b = vec![0u8; PG_CONTROL_FILE_SIZE];
        put(&mut b, off::PG_CONTROL_VERSION, &1300u32.to_be_bytes());
        put(&mut b, off::CATALOG_VERSION_NO, &202209061u32.to_be_bytes());
        let e = ControlFileData::parse(&b).unwrap_err().to_string();
        assert!(e.contains("big-endian"), "{e}");
    }

    #[test]
    fn rewind_timeline_rule_changed_in_16() {
        assert_eq!(timeline_for_rewind(PgMajor::V15, 1, 2), 1);
        assert_eq!(timeline_for_rewind(PgMajor::V16, 1, 2), 2);
        assert_eq!(timeline_for_rewind(PgMajor::V18, 3, 2), 3);
        assert_eq!(timeline_for_rewind(PgMajor::V13, 3, 0), 3);
    }

    #[test]
    fn checkpoint_round_trips_through_bytes() {
        for m in PgMajor::ALL {
            let mut raw = [0u8; CHECKPOINT_SIZE];
            for (i, b) in raw.iter_mut().enumerate() {
                *b = i as u8 + 1;
            }
            let c = CheckPoint::parse(&raw, m).unwrap();
            let back = c.to_bytes(m);
            assert_eq!(CheckPoint::parse(&back, m).unwrap(), c);
            // fullPageWrites is a C bool: 17 reads as true, and is written back as 1.
            assert!(c.fullPageWrites);
            assert_eq!(back[cp::FULL_PAGE_WRITES], 1);
        }
        assert_eq!(
            CheckPoint::parse(&[0u8; 87], PgMajor::V15).unwrap_err(),
            ControlFileError::CheckPointTooShort { len: 87 }
        );
    }
}
