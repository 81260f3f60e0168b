//! `failback inspect`: what failback sees in a data directory, as text or JSON.
//!
//! Text output uses the labels of PostgreSQL's own tools (`pg_controldata`, `pg_waldump`), so the
//! two can be compared line by line; `--json` is for programs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use failback_common::TimeLineId;
use failback_common::control::{ControlFileData, ControlFileError};
use failback_common::lsn::history_file_name;
use failback_common::timeline::{HistoryError, TimeLineHistory};

/// Why a file could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("could not read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control file {}", path.display())]
    Control {
        path: PathBuf,
        #[source]
        source: ControlFileError,
    },
    #[error("cannot tell the timeline of {0:?} from its name; pass --timeline")]
    UnnamedTimeline(String),
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// Reads and verifies `DIR/global/pg_control`.
pub fn read_control_file(pgdata: &Path) -> Result<ControlFileData, InspectError> {
    let path = pgdata.join("global/pg_control");
    let bytes = std::fs::read(&path).map_err(|source| InspectError::Read {
        what: "control file",
        path: path.clone(),
        source,
    })?;
    ControlFileData::parse(&bytes).map_err(|source| InspectError::Control { path, source })
}

/// The control file, labelled as `pg_controldata` labels it.
pub fn control_text(c: &ControlFileData) -> String {
    let cp = &c.checkPointCopy;
    let mut s = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(s, "{:<38}{}", format!("{label}:"), value);
    };
    line("PostgreSQL major version", c.major.to_string());
    line(
        "pg_control version number",
        c.pg_control_version.to_string(),
    );
    line("Catalog version number", c.catalog_version_no.to_string());
    line(
        "Database system identifier",
        c.system_identifier.to_string(),
    );
    line("Database cluster state", c.state.to_string());
    line("Latest checkpoint location", c.checkPoint.to_string());
    line("Latest checkpoint's REDO location", cp.redo.to_string());
    line(
        "Latest checkpoint's TimeLineID",
        cp.ThisTimeLineID.to_string(),
    );
    line(
        "Latest checkpoint's PrevTimeLineID",
        cp.PrevTimeLineID.to_string(),
    );
    line(
        "Latest checkpoint's full_page_writes",
        if cp.fullPageWrites { "on" } else { "off" }.into(),
    );
    line(
        "Latest checkpoint's NextXID",
        format!("{}:{}", cp.next_xid_epoch(), cp.next_xid_xid()),
    );
    line("Latest checkpoint's NextOID", cp.nextOid.to_string());
    line(
        "Minimum recovery ending location",
        c.minRecoveryPoint.to_string(),
    );
    line(
        "Min recovery ending loc's timeline",
        c.minRecoveryPointTLI.to_string(),
    );
    line("Backup start location", c.backupStartPoint.to_string());
    line("Backup end location", c.backupEndPoint.to_string());
    line("wal_level setting", c.wal_level.name());
    line(
        "wal_log_hints setting",
        if c.wal_log_hints { "on" } else { "off" }.into(),
    );
    line("Database block size", c.blcksz.to_string());
    line(
        "Blocks per segment of large relation",
        c.relseg_size.to_string(),
    );
    line("WAL block size", c.xlog_blcksz.to_string());
    line("Bytes per WAL segment", c.xlog_seg_size.to_string());
    line(
        "Data page checksum version",
        c.data_checksum_version.to_string(),
    );
    line("Timeline for rewind", c.timeline_for_rewind().to_string());
    s
}

/// Parses a history file; its own timeline comes from its name (`0000000A.history`) unless
/// given.
pub fn read_history(file: &Path, tli: Option<TimeLineId>) -> Result<TimeLineHistory, InspectError> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let own = match tli {
        Some(t) => t,
        None => name
            .strip_suffix(".history")
            .filter(|h| h.len() == 8)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| InspectError::UnnamedTimeline(name.to_string()))?,
    };
    let bytes = std::fs::read(file).map_err(|source| InspectError::Read {
        what: "history file",
        path: file.to_path_buf(),
        source,
    })?;
    Ok(TimeLineHistory::parse(
        &bytes,
        own,
        &file.display().to_string(),
    )?)
}

/// The history of timeline `tli` of a data directory (timeline 1 has no file).
pub fn history_of(pgdata: &Path, tli: TimeLineId) -> Result<TimeLineHistory, InspectError> {
    if tli == 1 {
        return Ok(TimeLineHistory::single(1));
    }
    read_history(
        &pgdata.join("pg_wal").join(history_file_name(tli)),
        Some(tli),
    )
}

/// One line per timeline, as pg_rewind's `--debug` prints histories: `tli: begin - end`.
pub fn history_text(h: &TimeLineHistory) -> String {
    let mut s = String::new();
    for e in h.entries() {
        let end = e
            .end
            .map_or_else(|| "(current)".to_string(), |l| l.to_string());
        let _ = writeln!(s, "{}: {} - {}  {}", e.tli, e.begin, end, e.reason);
    }
    s
}

/// One WAL record as a JSON object, for programs.
pub fn wal_record_json(r: &failback_common::wal::WalRecord<'_>) -> serde_json::Value {
    let blocks: Vec<serde_json::Value> = r
        .blocks
        .iter()
        .map(|b| {
            serde_json::json!({
                "id": b.id,
                "tablespace": b.locator.spcOid,
                "database": b.locator.dbOid,
                "relation": b.locator.relNumber,
                "fork": failback_common::wal::fork_name(b.fork()).unwrap_or("?"),
                "block": b.blkno,
                "full_page_image": b.image.is_some(),
                "image_compression": b.image.map(|i| i.compression.name()),
                "will_init": b.will_init(),
                "data_length": b.data_len,
            })
        })
        .collect();
    serde_json::json!({
        "lsn": r.lsn.to_string(),
        "end_lsn": r.end_lsn.to_string(),
        "prev": r.xl_prev().to_string(),
        "timeline": r.page_tli,
        "rmgr": r.rmgr_name(),
        "type": r.record_type(),
        "xid": r.xid(),
        "total_length": r.tot_len(),
        "fpi_length": r.fpi_len(),
        "blocks": blocks,
        "detail": r.kind.detail(),
    })
}
