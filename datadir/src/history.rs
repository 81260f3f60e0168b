//! A data directory's timelines: its timeline history files (`pg_wal/NNNNNNNN.history`) and the
//! timeline it is on.
//!
//! A promotion writes the new timeline's history file before anything else, while
//! `pg_control`'s `checkPointCopy.ThisTimeLineID` names the old timeline until the first
//! checkpoint on the new one completes. Without asking the running server, the newest history
//! file is therefore the current timeline when it is newer than the control file's.

use failback_common::TimeLineId;
use failback_common::control::ControlFileData;
use failback_common::lsn::history_file_name;
use failback_common::timeline::{HistoryError, TimeLineHistory};

use crate::{DataDir, DataDirError};

/// Why a data directory's history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryReadError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("pg_wal/{name} does not exist")]
    Missing { name: String },
    #[error(transparent)]
    Parse(#[from] HistoryError),
}

/// Every timeline history file in `pg_wal`, by timeline, in timeline order.
pub fn history_files(dir: &DataDir) -> Result<Vec<(TimeLineId, Vec<u8>)>, DataDirError> {
    // Only pg_wal is looked at (through the same confinement as every read), not the whole
    // directory: a large cluster has many files, and histories live in one place.
    let names = dir.names("pg_wal")?;
    let mut out = Vec::new();
    for name in names {
        let Some(tli) = history_timeline(&name) else {
            continue;
        };
        if let Some(data) = dir.read_file(&format!("pg_wal/{name}"))? {
            out.push((tli, data));
        }
    }
    out.sort_by_key(|(tli, _)| *tli);
    Ok(out)
}

/// The timeline a history file is named for (`%08X.history`).
fn history_timeline(name: &str) -> Option<TimeLineId> {
    let hex = name.strip_suffix(".history")?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// The timeline the files say the directory is on: the control file's, or the newest history
/// file's when that is newer (a promotion whose checkpoint has not finished).
pub fn files_timeline(control: &ControlFileData, newest_history: Option<TimeLineId>) -> TimeLineId {
    control
        .timeline_for_rewind()
        .max(newest_history.unwrap_or(0))
}

/// The history of timeline `tli` of the directory (timeline 1 has no file).
pub fn history_of(dir: &DataDir, tli: TimeLineId) -> Result<TimeLineHistory, HistoryReadError> {
    if tli == 1 {
        return Ok(TimeLineHistory::single(1));
    }
    let name = history_file_name(tli);
    let bytes = dir
        .read_file(&format!("pg_wal/{name}"))?
        .ok_or(HistoryReadError::Missing { name: name.clone() })?;
    Ok(TimeLineHistory::parse(
        &bytes,
        tli,
        &format!("pg_wal/{name}"),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_files_are_named_by_their_timeline() {
        assert_eq!(history_timeline("00000002.history"), Some(2));
        assert_eq!(history_timeline("0000001A.history"), Some(26));
        assert_eq!(history_timeline("0000002.history"), None);
        assert_eq!(history_timeline("000000020000000000000003"), None);
        assert_eq!(history_timeline("0000000G.history"), None);
    }
}
