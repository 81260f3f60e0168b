//! Phase 5: from a copied target to one that starts as the new primary's standby.
//!
//! A running source's backup window is closed: `pg_backup_stop` says where the WAL the copy
//! needs ends, and gives the copy's `backup_label`; that WAL, from the window's start, is
//! fetched now where the target lacks it (failbackd's session keeps it reserved until the
//! rewind is done; a window opened at the last common checkpoint had its complete segments
//! copied with the plan, and starts in WAL both sides share), so the rewound node needs
//! nothing from anywhere to become consistent. The last segment is fetched to the end of the
//! page the window ends in and the rest allocated as zeros (`window_segment_fetch`). A
//! shut-down source must not have changed; its WAL from its last checkpoint was copied with the
//! rest, and the node starts from that checkpoint, with no `backup_label`. The target's WAL segments past the end of its own
//! WAL are then renamed past all that WAL (the plan's `Reason::Recycled`, see
//! [`failback_common::plan`]). Then everything is synced, and the commit's files
//! are written in [`crate::target`]'s order: `backup_label`, `pg_control` (recovery must reach
//! the end of that WAL before the server opens), and last the configuration, which removes the
//! marker.

use std::collections::HashSet;
use std::time::Instant;

use failback_common::control::{ControlFileData, DBState};
use failback_common::filemap::{FileAction, FileEntry};
use failback_common::journal::Phase;
use failback_common::plan::{AUTO_CONF, Plan, PlanEntry, Reason};
use failback_common::recovery;
use failback_common::rewind::{
    min_recovery_point, wal_segments, window_segment_fetch, window_segment_needed,
};
use failback_common::timeline::segment_file_name;

use super::{Copied, Outcome, RewindOptions, RewindReport};
use crate::copy;
use crate::error::{Doing, RewindError};
use crate::fsutil::SyncMethod;
use crate::progress::Progress;
use crate::source::{Ask, Source};

pub(crate) fn commit(
    opts: &RewindOptions,
    copied: Copied,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
    report: &mut RewindReport,
) -> Result<Outcome, RewindError> {
    let t = Instant::now();
    let super::Journaled {
        checked,
        header,
        done,
    } = copied.journaled;
    let mut removing = Some(copied.removing);
    let mut target = checked.target;
    let seg_size = checked.target_control.xlog_seg_size;
    let page_size = checked.target_control.xlog_blcksz;
    // What the commit needs from the source, asked together: over a long link one round trip
    // instead of several. postgresql.auto.conf is read now rather than at the end of the
    // commit; either is after the copy. The window closes meanwhile: the control file is the
    // source's either side of its end, and what the copy takes of it (all but where recovery
    // must reach, which the window's end says) does not change with it.
    let mut asks = vec![Ask::ControlFile];
    if header.window_start.is_some() {
        asks.push(Ask::CloseWindow);
    }
    source.ask_ahead(&asks);
    let source_auto_conf = source
        .read_file(AUTO_CONF)
        .doing("could not read the source's postgresql.auto.conf")?;
    let after_bytes = source
        .control_file()
        .doing("could not read the source's control file again")?;
    let window = match header.window_start {
        Some(start) => {
            progress.phase("closing the backup window and fetching its WAL");
            let end = source
                .close_window()
                .doing("could not close the backup window on the source")?;
            // The WAL from the window's start: what makes the copy consistent, but for what
            // the target holds already.
            let history = super::plan::source_history(source, end.tli)?;
            let (first, last) = wal_segments(start, end.stop, seg_size);
            let planned: HashSet<&str> = header
                .plan
                .entries
                .iter()
                .filter(|e| e.reason == Some(Reason::Replayed))
                .map(|e| e.path.as_str())
                .collect();
            let entries: Vec<PlanEntry> = (first..=last)
                .filter_map(|segno| {
                    let path = format!("pg_wal/{}", segment_file_name(&history, segno, seg_size));
                    let on_target = std::fs::metadata(target.dir().join(&path))
                        .ok()
                        .map(|m| FileEntry::regular(&path, m.len()));
                    let whole = on_target
                        .as_ref()
                        .is_some_and(|f| f.size == u64::from(seg_size));
                    let planned = planned.contains(path.as_str());
                    if !window_segment_needed(segno, header.divergence, seg_size, whole, planned) {
                        return None;
                    }
                    let fetch = window_segment_fetch(segno, end.stop, seg_size, page_size);
                    Some(PlanEntry::new(
                        &path,
                        FileAction::Copy,
                        Some(FileEntry::regular(&path, fetch)),
                        on_target,
                    ))
                })
                .collect();
            let wal = Plan {
                entries,
                block_size: header.plan.block_size,
            };
            // A segment of the window's must not be written while a removal of the same
            // name may still run (a resumed run's plan removing what an earlier window left).
            if wal.entries.iter().any(|e| {
                removing
                    .as_ref()
                    .is_some_and(|r| r.removes(&target.dir().join(&e.path)))
            }) && let Some(r) = removing.take()
            {
                r.wait()
                    .doing("could not remove what the source does not have")?;
            }
            let fetched = copy::copy(&wal, &mut target, source, progress, None)
                .doing("could not copy the WAL the source wrote during the backup window")?;
            if fetched.files_vanished_on_source > 0 {
                return Err(RewindError::refused(format!(
                    "the source no longer has all the WAL the rewound node must replay \
                     ({} to {}): a checkpoint removed it; \
                     keep more WAL on the source (a larger wal_keep_size, or over \
                     --source-server a role allowed pg_backup_start and REPLICATION, whose \
                     window's slot keeps it), then run failback again",
                    start, end.stop
                )));
            }
            // The segment the window ends in was fetched only to its page: the rest is zeros.
            for e in &wal.entries {
                let fetched_to = e.source.as_ref().map_or(0, |s| s.size);
                if fetched_to < u64::from(seg_size) {
                    target
                        .zero_fill(&e.path, fetched_to, u64::from(seg_size))
                        .doing("could not complete a WAL segment of the backup window")?;
                }
            }
            if let Some(x) = report.execution.as_mut() {
                x.window_wal_bytes = fetched.bytes_fetched;
                x.add(&fetched);
            }
            Some(end)
        }
        None => {
            if after_bytes != checked.source_control_bytes {
                return Err(RewindError::refused(
                    "source system was modified while failback was running; make sure the \
                     source is shut down, then run failback again",
                ));
            }
            None
        }
    };
    let after = ControlFileData::parse(&after_bytes).map_err(|e| RewindError::Refused {
        message: "source control file".into(),
        source: Some(Box::new(e)),
    })?;
    let (min_point, min_tli) = min_recovery_point(&after, window.as_ref().map(|w| (w.stop, w.tli)));
    report.min_recovery_point = Some(min_point.to_string());
    // After the window's WAL is in: the recycled segments are named past it.
    let recycled = target
        .recycle_wal(
            &header.plan,
            min_tli,
            min_point.segment_number(seg_size),
            seg_size,
        )
        .doing("could not recycle the target's WAL segments past its end")?;
    if let Some(x) = report.execution.as_mut() {
        x.wal_segments_recycled = recycled;
    }

    if let Some(r) = removing.take() {
        r.wait()
            .doing("could not remove what the source does not have")?;
    }
    if !opts.no_sync {
        progress.phase("syncing target data directory");
        // What an interrupted run wrote may not have reached the disk.
        let interrupted = done.iter().flat_map(|_| written_by(&header.plan));
        target
            .sync(
                &header.plan,
                interrupted,
                checked.restore.is_some(),
                opts.sync_method.unwrap_or(SyncMethod::Fsync),
            )
            .doing("could not sync the target data directory")?;
    }
    target
        .record(Phase::Copied)
        .doing("could not update the journal")?;
    progress.phase("creating backup label and updating control file");
    target
        .write_backup_label(window.as_ref().map(|w| w.backup_label.as_str()))
        .doing("could not write backup_label")?;
    // A copy made in a window recovers as a base backup does, to the window's end before it
    // opens; a copy of a shut-down source is that source, shut down.
    let control = match &window {
        Some(_) => {
            let mut c = after;
            c.minRecoveryPoint = min_point;
            c.minRecoveryPointTLI = min_tli;
            c.state = DBState::InArchiveRecovery;
            c.to_bytes().map_err(|e| RewindError::Refused {
                message: "could not build the new control file".into(),
                source: Some(Box::new(e)),
            })?
        }
        None => after_bytes,
    };
    target
        .write_control(&control)
        .doing("could not write the target's control file")?;
    target
        .record(Phase::Committed)
        .doing("could not update the journal")?;
    // Last, the configuration: the source's postgresql.auto.conf (held back by the plan), with
    // -R's primary_conninfo. Writing it removes the marker, so PostgreSQL can start.
    let mut auto_conf = source_auto_conf
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if let Some(conninfo) = &checked.conninfo {
        target
            .write_standby_signal()
            .doing("could not write standby.signal")?;
        auto_conf = recovery::set_auto_conf(&auto_conf, "primary_conninfo", conninfo);
    }
    target
        .finish(&auto_conf)
        .doing("could not write the target's postgresql.auto.conf")?;
    report.seconds.sync_and_commit = t.elapsed().as_secs_f64();
    progress.info("Done!");
    Ok(Outcome {
        report: std::mem::take(report),
        plan: Some(header.plan),
    })
}

/// Every regular file the plan writes into.
fn written_by(plan: &Plan) -> impl Iterator<Item = String> + '_ {
    plan.entries
        .iter()
        .filter(|e| {
            matches!(
                e.action,
                FileAction::Copy | FileAction::CopyTail | FileAction::Truncate
            ) || !e.blocks.is_empty()
        })
        .map(|e| e.path.clone())
}
