//! Phase 5: from a copied target to one that starts as the new primary's standby.
//!
//! The source is asked once more for its control file and its end of WAL (after the copy: every
//! change the copy may have seen lies before it). A live source may have written into WAL
//! segments the plan left out; they are fetched now. Then everything is synced, and the
//! commit's files are written in [`crate::target`]'s order: `backup_label` (replay starts at
//! the last common checkpoint), `pg_control` (recovery must reach the source's end of WAL
//! before the server opens), and last the configuration, which removes the marker.

use std::time::Instant;

use failback_common::control::{ControlFileData, DBState};
use failback_common::journal::Phase;
use failback_common::plan::{AUTO_CONF, Plan};
use failback_common::recovery;
use failback_common::rewind::{
    CommonCheckpoint, catch_up_segments, min_recovery_point, replay_start,
};

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
    let mut target = checked.target;
    let seg_size = checked.target_control.xlog_seg_size;
    // What the commit needs from the source, asked together: over a long link one round trip
    // instead of three. postgresql.auto.conf is read now rather than at the end of the commit;
    // either is after the copy.
    source.ask_ahead(&[Ask::ControlFile, Ask::EndOfWal]);
    let source_auto_conf = source
        .read_file(AUTO_CONF)
        .doing("could not read the source's postgresql.auto.conf")?;
    let after_bytes = source
        .control_file()
        .doing("could not read the source's control file again")?;
    if !source.is_live() && after_bytes != checked.source_control_bytes {
        return Err(RewindError::refused(
            "source system was modified while failback was running; make sure the source is \
             shut down, then run failback again",
        ));
    }
    let after = ControlFileData::parse(&after_bytes).map_err(|e| RewindError::Refused {
        message: "source control file".into(),
        source: Some(Box::new(e)),
    })?;
    let end = source
        .end_of_wal()
        .doing("could not read the source's end of WAL after the copy")?;
    if source.is_live() && end.is_none() {
        return Err(RewindError::refused(
            "the source is live but did not say where its WAL ends after the copy",
        ));
    }
    // A live source wrote on during the copy: segments that were past its end of WAL when the
    // plan was made, and that its end has reached since, hold WAL recovery replays.
    if let Some(end) = end {
        let reached = catch_up_segments(&header.plan, end.lsn, seg_size);
        if !reached.is_empty() {
            progress.debug(&format!(
                "{} WAL segment(s) the source wrote into during the copy",
                reached.len()
            ));
            let more = Plan {
                entries: reached,
                block_size: header.plan.block_size,
            };
            let extra = copy::copy(&more, &mut target, source, progress, None)
                .doing("could not copy the WAL the source wrote during the copy")?;
            if let Some(x) = report.execution.as_mut() {
                x.add(&extra);
            }
        }
    }
    let (min_point, min_tli) = min_recovery_point(&after, end.map(|e| (e.lsn, e.tli)));
    report.min_recovery_point = Some(min_point.to_string());

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
    let start = replay_start(
        CommonCheckpoint {
            lsn: header.checkpoint,
            redo: header.checkpoint_redo,
            tli: header.checkpoint_tli,
        },
        &checked.source_control,
    );
    let label = recovery::backup_label(start.redo, start.tli, start.lsn, seg_size, &now_utc());
    target
        .write_backup_label(&label)
        .doing("could not write backup_label")?;
    let mut new_control = after;
    new_control.minRecoveryPoint = min_point;
    new_control.minRecoveryPointTLI = min_tli;
    new_control.state = DBState::InArchiveRecovery;
    let bytes = new_control.to_bytes().map_err(|e| RewindError::Refused {
        message: "could not build the new control file".into(),
        source: Some(Box::new(e)),
    })?;
    target
        .write_control(&bytes)
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
    use failback_common::filemap::FileAction;
    plan.entries
        .iter()
        .filter(|e| {
            matches!(
                e.action,
                FileAction::Copy | FileAction::CopyTail | FileAction::Truncate
            ) || !e.blocks.is_empty()
                || e.zero_from.is_some()
        })
        .map(|e| e.path.clone())
}

/// `YYYY-MM-DD HH:MM:SS UTC` (the label's START TIME is informational).
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    failback_common::civil::from_unix(secs as i64).to_string()
}
