//! failbackd's WAL summaries of the directory it serves (the idea, and why a summary is keyed by
//! segment file name, are in [`failback_common::summary`]).
//!
//! [`WalSummaries::refresh`] summarizes every completed segment of the directory's current
//! timeline history that has no summary yet and forgets the summaries of segment files that are
//! gone; failbackd calls it in a loop on a thread of its own. [`crate::wal::source_changes`]
//! takes the summaries it finds and decodes the rest, so a summary missing, late or dropped
//! costs time and never correctness.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use failback_common::changes::WalChanges;
use failback_common::control::ControlFileData;
use failback_common::lsn::parse_wal_file_name;
use failback_common::summary::segment_begun;
use failback_common::timeline::{segment_file_name, timeline_for_segment};
use failback_common::wal::WalParams;
use failback_common::{Lsn, XLogSegNo};

use crate::DataDir;
use crate::history::{HistoryReadError, files_timeline, history_files, history_of};
use crate::wal::{WalEnd, WalReadError, WalReader};

/// The summaries of one data directory's WAL segments, by segment file name.
#[derive(Debug, Default)]
pub struct WalSummaries {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    by_name: HashMap<String, Arc<WalChanges>>,
    /// Segments whose WAL could not be decoded although complete: not tried again (a rewind
    /// decoding them says what is wrong).
    unreadable: HashSet<String>,
}

/// What one [`WalSummaries::refresh`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refresh {
    /// Segments summarized by this call.
    pub summarized: usize,
    /// Summaries held after it.
    pub held: usize,
    /// Where the newest summarized segment ends, if any is held on the current history.
    pub until: Option<Lsn>,
    /// WAL bytes decoded by this call.
    pub decoded_bytes: u64,
}

/// Why a refresh could not look at the WAL at all.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error("global/pg_control: {0}")]
    Control(String),
    #[error("could not read the timeline history")]
    History(#[from] HistoryReadError),
    #[error(transparent)]
    DataDir(#[from] crate::DataDirError),
    #[error("could not list pg_wal")]
    List(#[source] std::io::Error),
    #[error(transparent)]
    Wal(#[from] WalReadError),
}

impl WalSummaries {
    pub fn new() -> Self {
        WalSummaries::default()
    }

    /// The summary of the segment file `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Arc<WalChanges>> {
        self.lock().by_name.get(name).cloned()
    }

    /// Summaries held.
    pub fn len(&self) -> usize {
        self.lock().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a map that is still whole: use it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Summarizes the completed segments of `dir`'s current history that have none yet, and
    /// drops the summaries of segment files no longer in `pg_wal`.
    pub fn refresh(&self, dir: &DataDir) -> Result<Refresh, SummaryError> {
        let control = read_control(dir)?;
        let newest = history_files(dir)?.last().map(|(t, _)| *t);
        let history = history_of(dir, files_timeline(&control, newest))?;
        let seg_size = control.xlog_seg_size;
        let present: HashSet<String> = dir
            .names("pg_wal")
            .map_err(|e| match e {
                crate::DataDirError::Io { source, .. } => SummaryError::List(source),
                refused => refused.into(),
            })?
            .into_iter()
            .filter(|n| parse_wal_file_name(n, seg_size).is_some())
            .collect();
        // The segments this history reads from files present, oldest first.
        let on_history: BTreeSet<XLogSegNo> = present
            .iter()
            .filter_map(|n| {
                let (tli, segno) = parse_wal_file_name(n, seg_size)?;
                (timeline_for_segment(&history, segno, seg_size) == tli).then_some(segno)
            })
            .collect();
        {
            let mut s = self.lock();
            s.by_name.retain(|name, _| present.contains(name));
            s.unreadable.retain(|name| present.contains(name));
        }
        let params = WalParams::new(control.major, seg_size)
            .with_system_identifier(control.system_identifier);
        let mut reader = WalReader::for_dir(dir, &history, params, None);
        let mut out = Refresh::default();
        for &segno in &on_history {
            let name = segment_file_name(&history, segno, seg_size);
            {
                let s = self.lock();
                if s.by_name.contains_key(&name) || s.unreadable.contains(&name) {
                    continue;
                }
            }
            let next = segment_file_name(&history, segno + 1, seg_size);
            let next_start = Lsn((segno + 1) * u64::from(seg_size));
            if !present.contains(&next) || !first_page_begun(dir, &next, next_start) {
                continue;
            }
            match summarize_segment(&mut reader, segno, control.relseg_size, || {}) {
                Ok(Some(changes)) => {
                    out.summarized += 1;
                    out.decoded_bytes += u64::from(seg_size);
                    self.lock().by_name.insert(name, Arc::new(changes));
                }
                // The record crossing into the next segment is not all written yet.
                Ok(None) => {}
                Err(WalReadError::Decode { .. }) => {
                    self.lock().unreadable.insert(name);
                }
                // Recycled or removed while being read: next time, or never.
                Err(WalReadError::MissingSegment { .. } | WalReadError::Io { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let s = self.lock();
        out.held = s.by_name.len();
        out.until = on_history
            .iter()
            .rev()
            .find(|&&segno| {
                s.by_name
                    .contains_key(&segment_file_name(&history, segno, seg_size))
            })
            .map(|&segno| Lsn((segno + 1) * u64::from(seg_size)));
        Ok(out)
    }
}

fn read_control(dir: &DataDir) -> Result<ControlFileData, SummaryError> {
    let bytes = dir
        .read_file("global/pg_control")
        .map_err(|e| SummaryError::Control(e.to_string()))?
        .ok_or_else(|| SummaryError::Control("does not exist".into()))?;
    ControlFileData::parse(&bytes).map_err(|e| SummaryError::Control(e.to_string()))
}

/// Whether the segment file `pg_wal/<name>` has begun (its first page names it).
fn first_page_begun(dir: &DataDir, name: &str, seg_start: Lsn) -> bool {
    let head = failback_common::wal::page::SIZE_OF_XLOG_LONG_PHD as u64;
    let mut buf = Vec::new();
    matches!(
        dir.read_range(&format!("pg_wal/{name}"), 0, head, &mut buf),
        Ok(crate::ReadStatus::Complete)
    ) && segment_begun(&buf, seg_start)
}

/// The changes of the records starting in segment `segno`, or `None` when the WAL ends before
/// the first record starting after it (the segment, or the record crossing out of it, is not
/// complete yet). `each` is called once a record.
pub fn summarize_segment(
    reader: &mut WalReader<'_>,
    segno: XLogSegNo,
    relseg_size: u32,
    each: impl Fn(),
) -> Result<Option<WalChanges>, WalReadError> {
    let seg = u64::from(reader.seg_size());
    let (start, end) = (Lsn(segno * seg), Lsn((segno + 1) * seg));
    match reader.walk_changes(start, true, end, relseg_size, each)? {
        (WalEnd::Reached(_), changes) => Ok(Some(changes)),
        (WalEnd::EndOfWal { .. } | WalEnd::NoMoreSegments { .. }, _) => Ok(None),
    }
}
