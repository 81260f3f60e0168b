//! Resource managers and record type names.
//!
//! Every WAL record names the *resource manager* (rmgr) that wrote it and will replay it
//! (`xl_rmid`, `access/rmgrlist.h`, the same 22 built-in ids in 13–18; 15+ also allows custom
//! rmgrs with ids 128–255). The high nibble of `xl_info` is the rmgr's own record type; each
//! rmgr's `*_identify` function (`access/rmgrdesc/*desc.c`) turns it into the name pg_waldump
//! prints after `desc:`. Names here follow those functions version by version.

use crate::PgMajor;

pub const RM_XLOG_ID: u8 = 0;
pub const RM_XACT_ID: u8 = 1;
pub const RM_SMGR_ID: u8 = 2;
pub const RM_CLOG_ID: u8 = 3;
pub const RM_DBASE_ID: u8 = 4;
pub const RM_TBLSPC_ID: u8 = 5;
pub const RM_MULTIXACT_ID: u8 = 6;
pub const RM_RELMAP_ID: u8 = 7;
pub const RM_STANDBY_ID: u8 = 8;
pub const RM_HEAP2_ID: u8 = 9;
pub const RM_HEAP_ID: u8 = 10;
pub const RM_BTREE_ID: u8 = 11;
pub const RM_HASH_ID: u8 = 12;
pub const RM_GIN_ID: u8 = 13;
pub const RM_GIST_ID: u8 = 14;
pub const RM_SEQ_ID: u8 = 15;
pub const RM_SPGIST_ID: u8 = 16;
pub const RM_BRIN_ID: u8 = 17;
pub const RM_COMMIT_TS_ID: u8 = 18;
pub const RM_REPLORIGIN_ID: u8 = 19;
pub const RM_GENERIC_ID: u8 = 20;
pub const RM_LOGICALMSG_ID: u8 = 21;
/// `RM_MAX_BUILTIN_ID` (`RM_MAX_ID` before 15).
pub const RM_MAX_BUILTIN_ID: u8 = RM_LOGICALMSG_ID;
/// `RM_MIN_CUSTOM_ID` (15+).
pub const RM_MIN_CUSTOM_ID: u8 = 128;

/// The built-in rmgr names as pg_waldump prints them (`rmgrlist.h` `PG_RMGR` names).
const BUILTIN_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// `RmgrIdIsValid`: built-in ids always, custom ids (128–255) from 15 on.
pub fn rmgr_id_is_valid(major: PgMajor, rmid: u8) -> bool {
    rmid <= RM_MAX_BUILTIN_ID || (major >= PgMajor::V15 && rmid >= RM_MIN_CUSTOM_ID)
}

/// The rmgr's name as pg_waldump prints it; custom rmgrs print as `custom###` (pg_waldump's
/// name for a custom rmgr it has not loaded); ids that are neither print as `UNKNOWN`.
pub fn rmgr_name(rmid: u8) -> &'static str {
    if let Some(n) = BUILTIN_NAMES.get(usize::from(rmid)) {
        return n;
    }
    if rmid >= RM_MIN_CUSTOM_ID {
        return custom_name(rmid);
    }
    "UNKNOWN"
}

fn custom_name(rmid: u8) -> &'static str {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| (128..=255u32).map(|i| format!("custom{i:03}")).collect());
    names
        .get(usize::from(rmid).wrapping_sub(128))
        .map(String::as_str)
        .unwrap_or("UNKNOWN")
}

// XLOG (catalog/pg_control.h)
pub const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
pub const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
pub const XLOG_NOOP: u8 = 0x20;
pub const XLOG_NEXTOID: u8 = 0x30;
pub const XLOG_SWITCH: u8 = 0x40;
pub const XLOG_BACKUP_END: u8 = 0x50;
pub const XLOG_PARAMETER_CHANGE: u8 = 0x60;
pub const XLOG_RESTORE_POINT: u8 = 0x70;
pub const XLOG_FPW_CHANGE: u8 = 0x80;
pub const XLOG_END_OF_RECOVERY: u8 = 0x90;
pub const XLOG_FPI_FOR_HINT: u8 = 0xA0;
pub const XLOG_FPI: u8 = 0xB0;
pub const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;
/// 17+.
pub const XLOG_CHECKPOINT_REDO: u8 = 0xE0;

// XACT (access/xact.h)
pub const XLOG_XACT_COMMIT: u8 = 0x00;
pub const XLOG_XACT_PREPARE: u8 = 0x10;
pub const XLOG_XACT_ABORT: u8 = 0x20;
pub const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
pub const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
pub const XLOG_XACT_ASSIGNMENT: u8 = 0x50;
/// 14+.
pub const XLOG_XACT_INVALIDATIONS: u8 = 0x60;
pub const XLOG_XACT_OPMASK: u8 = 0x70;
pub const XLOG_XACT_HAS_INFO: u8 = 0x80;

// SMGR (catalog/storage_xlog.h)
pub const XLOG_SMGR_CREATE: u8 = 0x10;
pub const XLOG_SMGR_TRUNCATE: u8 = 0x20;

// DBASE (commands/dbcommands_xlog.h)
/// 13/14 `XLOG_DBASE_CREATE`, 15+ `XLOG_DBASE_CREATE_FILE_COPY`.
pub const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
/// 15+.
pub const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
/// `XLOG_DBASE_DROP` in 13/14.
pub const XLOG_DBASE_DROP_OLD: u8 = 0x10;
/// `XLOG_DBASE_DROP` in 15+.
pub const XLOG_DBASE_DROP: u8 = 0x20;

// RELMAP (utils/relmapper.h)
pub const XLOG_RELMAP_UPDATE: u8 = 0x00;

// Heap (access/heapam_xlog.h)
pub const XLOG_HEAP_OPMASK: u8 = 0x70;
pub const XLOG_HEAP_INIT_PAGE: u8 = 0x80;

/// The record type name pg_waldump prints after `desc:` (the rmgr's `identify` function), or
/// `"UNKNOWN"` where that function returns NULL or this crate does not name the rmgr's types
/// (Hash, Gin, Gist, SPGist, BRIN and custom rmgrs).
pub fn record_type_name(major: PgMajor, rmid: u8, xl_info: u8) -> &'static str {
    let info = xl_info & 0xF0;
    let name = match rmid {
        RM_XLOG_ID => xlog_identify(major, info),
        RM_XACT_ID => xact_identify(major, info),
        RM_SMGR_ID => match info {
            XLOG_SMGR_CREATE => Some("CREATE"),
            XLOG_SMGR_TRUNCATE => Some("TRUNCATE"),
            _ => None,
        },
        RM_CLOG_ID => match info {
            0x00 => Some("ZEROPAGE"),
            0x10 => Some("TRUNCATE"),
            _ => None,
        },
        RM_DBASE_ID => dbase_identify(major, info),
        RM_TBLSPC_ID => match info {
            0x00 => Some("CREATE"),
            0x10 => Some("DROP"),
            _ => None,
        },
        RM_MULTIXACT_ID => match info {
            0x00 => Some("ZERO_OFF_PAGE"),
            0x10 => Some("ZERO_MEM_PAGE"),
            0x20 => Some("CREATE_ID"),
            0x30 => Some("TRUNCATE_ID"),
            _ => None,
        },
        RM_RELMAP_ID => match info {
            XLOG_RELMAP_UPDATE => Some("UPDATE"),
            _ => None,
        },
        RM_STANDBY_ID => match info {
            0x00 => Some("LOCK"),
            0x10 => Some("RUNNING_XACTS"),
            0x20 => Some("INVALIDATIONS"),
            _ => None,
        },
        RM_HEAP2_ID => heap2_identify(major, info),
        RM_HEAP_ID => heap_identify(info),
        RM_BTREE_ID => btree_identify(info),
        RM_SEQ_ID => match info {
            0x00 => Some("LOG"),
            _ => None,
        },
        RM_COMMIT_TS_ID => match info {
            0x00 => Some("ZEROPAGE"),
            0x10 => Some("TRUNCATE"),
            _ => None,
        },
        RM_REPLORIGIN_ID => match info {
            0x00 => Some("SET"),
            0x10 => Some("DROP"),
            _ => None,
        },
        RM_GENERIC_ID => Some("Generic"),
        RM_LOGICALMSG_ID => match info {
            0x00 => Some("MESSAGE"),
            _ => None,
        },
        _ => None,
    };
    name.unwrap_or("UNKNOWN")
}

fn xlog_identify(major: PgMajor, info: u8) -> Option<&'static str> {
    Some(match info {
        XLOG_CHECKPOINT_SHUTDOWN => "CHECKPOINT_SHUTDOWN",
        XLOG_CHECKPOINT_ONLINE => "CHECKPOINT_ONLINE",
        XLOG_NOOP => "NOOP",
        XLOG_NEXTOID => "NEXTOID",
        XLOG_SWITCH => "SWITCH",
        XLOG_BACKUP_END => "BACKUP_END",
        XLOG_PARAMETER_CHANGE => "PARAMETER_CHANGE",
        XLOG_RESTORE_POINT => "RESTORE_POINT",
        XLOG_FPW_CHANGE => "FPW_CHANGE",
        XLOG_END_OF_RECOVERY => "END_OF_RECOVERY",
        XLOG_FPI_FOR_HINT => "FPI_FOR_HINT",
        XLOG_FPI => "FPI",
        // Back-patched to 13.5 along with the page flag.
        XLOG_OVERWRITE_CONTRECORD => "OVERWRITE_CONTRECORD",
        XLOG_CHECKPOINT_REDO if major >= PgMajor::V17 => "CHECKPOINT_REDO",
        _ => return None,
    })
}

fn xact_identify(major: PgMajor, info: u8) -> Option<&'static str> {
    Some(match info & XLOG_XACT_OPMASK {
        XLOG_XACT_COMMIT => "COMMIT",
        XLOG_XACT_PREPARE => "PREPARE",
        XLOG_XACT_ABORT => "ABORT",
        XLOG_XACT_COMMIT_PREPARED => "COMMIT_PREPARED",
        XLOG_XACT_ABORT_PREPARED => "ABORT_PREPARED",
        XLOG_XACT_ASSIGNMENT => "ASSIGNMENT",
        XLOG_XACT_INVALIDATIONS if major >= PgMajor::V14 => "INVALIDATION",
        _ => return None,
    })
}

fn dbase_identify(major: PgMajor, info: u8) -> Option<&'static str> {
    if major >= PgMajor::V15 {
        match info {
            XLOG_DBASE_CREATE_FILE_COPY => Some("CREATE_FILE_COPY"),
            XLOG_DBASE_CREATE_WAL_LOG => Some("CREATE_WAL_LOG"),
            XLOG_DBASE_DROP => Some("DROP"),
            _ => None,
        }
    } else {
        match info {
            XLOG_DBASE_CREATE_FILE_COPY => Some("CREATE"),
            XLOG_DBASE_DROP_OLD => Some("DROP"),
            _ => None,
        }
    }
}

fn heap_identify(info: u8) -> Option<&'static str> {
    // The same in 13–18 (heapdesc.c): the INIT_PAGE bit is part of the name for the three
    // record types that can start a fresh page.
    Some(match info {
        0x00 => "INSERT",
        0x80 => "INSERT+INIT",
        0x10 => "DELETE",
        0x20 => "UPDATE",
        0xA0 => "UPDATE+INIT",
        0x30 => "TRUNCATE",
        0x40 => "HOT_UPDATE",
        0xC0 => "HOT_UPDATE+INIT",
        0x50 => "HEAP_CONFIRM",
        0x60 => "LOCK",
        0x70 => "INPLACE",
        _ => return None,
    })
}

fn heap2_identify(major: PgMajor, info: u8) -> Option<&'static str> {
    Some(match info {
        0x00 => "REWRITE",
        // 13: CLEAN / FREEZE_PAGE / CLEANUP_INFO; 14–16: PRUNE / VACUUM / FREEZE_PAGE;
        // 17+: the three kinds of PRUNE that replaced them.
        0x10 => match major {
            PgMajor::V13 => "CLEAN",
            PgMajor::V14 | PgMajor::V15 | PgMajor::V16 => "PRUNE",
            _ => "PRUNE_ON_ACCESS",
        },
        0x20 => match major {
            PgMajor::V13 => "FREEZE_PAGE",
            PgMajor::V14 | PgMajor::V15 | PgMajor::V16 => "VACUUM",
            _ => "PRUNE_VACUUM_SCAN",
        },
        0x30 => match major {
            PgMajor::V13 => "CLEANUP_INFO",
            PgMajor::V14 | PgMajor::V15 | PgMajor::V16 => "FREEZE_PAGE",
            _ => "PRUNE_VACUUM_CLEANUP",
        },
        0x40 => "VISIBLE",
        0x50 => "MULTI_INSERT",
        0xD0 => "MULTI_INSERT+INIT",
        0x60 => "LOCK_UPDATED",
        0x70 => "NEW_CID",
        _ => return None,
    })
}

fn btree_identify(info: u8) -> Option<&'static str> {
    // nbtxlog.h, the same in 13–18.
    Some(match info {
        0x00 => "INSERT_LEAF",
        0x10 => "INSERT_UPPER",
        0x20 => "INSERT_META",
        0x30 => "SPLIT_L",
        0x40 => "SPLIT_R",
        0x50 => "INSERT_POST",
        0x60 => "DEDUP",
        0x70 => "DELETE",
        0x80 => "UNLINK_PAGE",
        0x90 => "UNLINK_PAGE_META",
        0xA0 => "NEWROOT",
        0xB0 => "MARK_PAGE_HALFDEAD",
        0xC0 => "VACUUM",
        0xD0 => "REUSE_PAGE",
        0xE0 => "META_CLEANUP",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(rmgr_name(0), "XLOG");
        assert_eq!(rmgr_name(21), "LogicalMessage");
        assert_eq!(rmgr_name(22), "UNKNOWN");
        assert_eq!(rmgr_name(128), "custom128");
        assert_eq!(rmgr_name(255), "custom255");
        assert!(!rmgr_id_is_valid(PgMajor::V14, 128));
        assert!(rmgr_id_is_valid(PgMajor::V15, 128));
        assert!(!rmgr_id_is_valid(PgMajor::V18, 22));
        assert_eq!(record_type_name(PgMajor::V14, RM_DBASE_ID, 0x10), "DROP");
        assert_eq!(
            record_type_name(PgMajor::V15, RM_DBASE_ID, 0x10),
            "CREATE_WAL_LOG"
        );
        assert_eq!(record_type_name(PgMajor::V13, RM_XACT_ID, 0x60), "UNKNOWN");
        assert_eq!(record_type_name(PgMajor::V16, RM_XLOG_ID, 0xE0), "UNKNOWN");
        assert_eq!(
            record_type_name(PgMajor::V17, RM_XLOG_ID, 0xE0),
            "CHECKPOINT_REDO"
        );
        assert_eq!(
            record_type_name(PgMajor::V17, RM_HEAP2_ID, 0x10),
            "PRUNE_ON_ACCESS"
        );
        // The generic low nibble (SPECIAL_REL_UPDATE, CHECK_CONSISTENCY) is not part of the name.
        assert_eq!(
            record_type_name(PgMajor::V15, RM_HEAP_ID, 0x8B),
            "INSERT+INIT"
        );
    }
}
