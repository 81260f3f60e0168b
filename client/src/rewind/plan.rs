//! Phase 2: the plan, from both clusters' histories, the target's WAL and both file lists; or,
//! when an earlier run left the target unfinished, the plan its journal holds.

use std::time::Instant;

use failback_common::TimeLineId;
use failback_common::changes::WalChanges;
use failback_common::journal::{JournalHeader, JournalState};
use failback_common::lsn::history_file_name;
use failback_common::plan::{self, PlanInput};
use failback_common::relpath;
use failback_common::rewind::{CheckpointSearch, Step, source_wal_end, target_wal_end};
use failback_common::timeline::{TimeLineHistory, find_common_ancestor};
use failback_common::wal::WalParams;
use failback_datadir::DataDir;

use super::check::Checked;
use super::{RewindOptions, RewindReport};
use crate::error::{Doing, RewindError};
use crate::fault::{self, Point};
use crate::progress::Progress;
use crate::source::Source;
use failback_datadir::wal::WalReader;

pub(crate) enum Planned {
    /// The target wrote nothing past the divergence, or both are on one timeline.
    NothingToRewind,
    /// The plan, with everything the commit needs, as the journal will hold it.
    Plan(Box<JournalHeader>),
}

pub(crate) fn plan(
    opts: &RewindOptions,
    checked: &Checked,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
    report: &mut RewindReport,
    t0: Instant,
) -> Result<Planned, RewindError> {
    let (src, target) = (&checked.source_control, &checked.target_control);
    let dir = checked.target.dir();
    // Timelines and the divergence.
    let src_tli = source_timeline(source, checked)?;
    let tgt_tli = target.timeline_for_rewind();
    report.source_timeline = src_tli;
    report.target_timeline = tgt_tli;
    let params = WalParams::new(target.major, target.xlog_seg_size)
        .with_system_identifier(target.system_identifier);
    let target_history = if tgt_tli == 1 {
        TimeLineHistory::single(1)
    } else {
        let name = history_file_name(tgt_tli);
        let bytes =
            std::fs::read(dir.join("pg_wal").join(&name)).map_err(|e| RewindError::Refused {
                message: format!("could not read target timeline history file pg_wal/{name}"),
                source: Some(Box::new(e)),
            })?;
        TimeLineHistory::parse(&bytes, tgt_tli, &format!("target pg_wal/{name}")).map_err(|e| {
            RewindError::Refused {
                message: "target timeline history".into(),
                source: Some(Box::new(e)),
            }
        })?
    };
    if src_tli == tgt_tli {
        progress.info("source and target cluster are on the same timeline");
        report.seconds.checks = t0.elapsed().as_secs_f64();
        return Ok(Planned::NothingToRewind);
    }
    let source_history = source_history(source, src_tli)?;
    for (side, h) in [("Source", &source_history), ("Target", &target_history)] {
        progress.debug(&format!("{side} timeline history:"));
        for e in h.entries() {
            let end = e.end.map_or("(current)".to_string(), |l| l.to_string());
            progress.debug(&format!("{}: {} - {}", e.tli, e.begin, end));
        }
    }
    let ca = find_common_ancestor(&source_history, &target_history).map_err(|e| {
        RewindError::Refused {
            message: "could not find where source and target diverged".into(),
            source: Some(Box::new(e)),
        }
    })?;
    progress.info(&format!(
        "servers diverged at WAL location {} on timeline {}",
        ca.divergerec, ca.tli
    ));
    report.divergence_lsn = Some(ca.divergerec.to_string());
    report.divergence_timeline = Some(ca.tli);

    // Did the target write anything past the divergence?
    let mut wal = WalReader::new(dir, &target_history, params, checked.restore.clone());
    let chkpt = wal
        .read_record(target.checkPoint)
        .doing("could not read the target's latest checkpoint record")?;
    if target_wal_end(chkpt.end_lsn, target) <= ca.divergerec {
        report.seconds.checks = t0.elapsed().as_secs_f64();
        return Ok(Planned::NothingToRewind);
    }
    let end_of_target_wal = target_wal_end(chkpt.end_lsn, target);
    report.rewind_needed = true;

    // The last common checkpoint, walking back from the divergence.
    let t_scan = Instant::now();
    report.seconds.checks = (t_scan - t0).as_secs_f64();
    let mut wal = WalReader::new(dir, &target_history, params, checked.restore.clone());
    let mut search = CheckpointSearch::new(
        ca.divergerec,
        target.major,
        target.xlog_seg_size,
        params.page_size,
    );
    let common = loop {
        let at = search.next();
        let r = wal.read_record(at).doing(format!(
            "could not find previous WAL record at {at} while looking for the last common \
             checkpoint"
        ))?;
        match search
            .record(r.rmid, r.info, &r.main_data, r.xl_prev)
            .map_err(RewindError::LastCheckpoint)?
        {
            Step::Read(_) => continue,
            Step::Found(c) => break c,
        }
    };
    let keep_wal: std::collections::BTreeSet<String> =
        wal.opened.iter().map(|n| format!("pg_wal/{n}")).collect();
    progress.info(&format!(
        "rewinding from last common checkpoint at {} on timeline {}",
        common.lsn, common.tli
    ));
    report.checkpoint_lsn = Some(common.lsn.to_string());
    report.checkpoint_redo = Some(common.redo.to_string());
    report.checkpoint_timeline = Some(common.tli);

    // Every block the target touched since then.
    progress.phase("reading WAL in target");
    let mut changed = WalChanges::default();
    let (relseg, blcksz, major) = (target.relseg_size, target.blcksz, target.major);
    wal.scan(common.lsn, end_of_target_wal, |rec| {
        fault::passed(Point::Scan, 1);
        changed.record(rec, relseg);
        Ok(())
    })
    .doing("could not read the target's WAL")?;
    let page_map = changed.finish(major).page_map;
    report.changed_blocks = page_map.block_count() as u64;
    report.seconds.wal_scan = t_scan.elapsed().as_secs_f64();

    // Both file lists, the plan.
    let t_lists = Instant::now();
    progress.phase("reading source file list");
    let source_files = source
        .list_files()
        .doing("could not list the source's files")?;
    progress.phase("reading target file list");
    let target_files = DataDir::new(dir).list().map_err(|e| RewindError::Refused {
        message: "could not list the target's files".into(),
        source: Some(Box::new(e)),
    })?;
    let is_rel = |p: &str| relpath::is_rel_data_file(p, major).is_some();
    let the_plan = plan::make_plan(&PlanInput {
        source: &source_files,
        target: &target_files,
        page_map: &page_map,
        keep_wal: &keep_wal,
        is_relation_file: &is_rel,
        block_size: blcksz,
        wal_segment_size: target.xlog_seg_size,
        oldest_needed_wal_segment: Some(common.redo.segment_number(target.xlog_seg_size)),
        divergence: Some(ca.divergerec),
        source_wal_end: Some(source_wal_end(src, checked.live_start.map(|e| e.lsn))),
    })
    .map_err(|e| RewindError::Refused {
        message: "could not plan the rewind".into(),
        source: Some(Box::new(e)),
    })?;
    let header = JournalHeader {
        system_identifier: target.system_identifier,
        pg_major: target.major.number(),
        divergence: ca.divergerec,
        divergence_tli: ca.tli,
        checkpoint: common.lsn,
        checkpoint_redo: common.redo,
        checkpoint_tli: common.tli,
        source_tli: src_tli,
        plan: the_plan,
    };
    report.planned(&header);
    report.seconds.file_lists = t_lists.elapsed().as_secs_f64();
    let total_size: u64 = source_files.iter().map(|f| f.size).sum();
    progress.info(&format!(
        "need to copy {} MB (total source directory size is {} MB)",
        report.bytes_to_fetch / 1_000_000,
        total_size / 1_000_000
    ));
    if opts.debug {
        for e in &header.plan.entries {
            let note = e.reason.map(|n| format!(" -- {n}")).unwrap_or_default();
            progress.debug(&format!("{} ({}){note}", e.path, e.action.name()));
            for b in e.blocks.iter() {
                progress.debug(&format!("  block {b}"));
            }
        }
    }
    Ok(Planned::Plan(Box::new(header)))
}

/// The plan of a resumed rewind: the journal's, once the source is checked to be still on the
/// history the plan was made from.
pub(crate) fn resumed(
    checked: &Checked,
    state: &JournalState,
    source: &mut dyn Source,
    report: &mut RewindReport,
) -> Result<JournalHeader, RewindError> {
    let h = &state.header;
    let src_tli = source_timeline(source, checked)?;
    let history = source_history(source, src_tli)?;
    let still = history
        .entries()
        .iter()
        .any(|e| e.tli == h.divergence_tli && e.end.is_none_or(|end| end >= h.divergence));
    if src_tli == h.divergence_tli || !still {
        return Err(RewindError::refused(format!(
            "the source is no longer on the history the unfinished rewind was planned from (it \
             forked from timeline {} at {}); the target cannot be finished from it",
            h.divergence_tli, h.divergence
        )));
    }
    report.planned(h);
    report.source_timeline = src_tli;
    Ok(h.clone())
}

/// The source's timeline. A live source may have been promoted moments ago: its control file
/// names the old timeline until the first checkpoint on the new one, so the server's own
/// answer wins (pg_rewind 13-15 wrongly said "no rewind required" then).
fn source_timeline(source: &mut dyn Source, checked: &Checked) -> Result<TimeLineId, RewindError> {
    let mut tli = checked.source_control.timeline_for_rewind();
    if let Some(end) = checked.live_start {
        let current = source
            .current_timeline()
            .doing("could not read the source's current timeline")?
            .unwrap_or(0);
        tli = tli.max(current).max(end.tli);
    }
    Ok(tli)
}

/// The source's timeline history, through the source.
fn source_history(
    source: &mut dyn Source,
    src_tli: TimeLineId,
) -> Result<TimeLineHistory, RewindError> {
    if src_tli == 1 {
        return Ok(TimeLineHistory::single(1));
    }
    let name = history_file_name(src_tli);
    let bytes = source
        .read_file(&format!("pg_wal/{name}"))
        .doing("could not read the source's timeline history")?
        .ok_or_else(|| {
            RewindError::refused(format!("source has no timeline history file pg_wal/{name}"))
        })?;
    TimeLineHistory::parse(&bytes, src_tli, &format!("source pg_wal/{name}")).map_err(|e| {
        RewindError::Refused {
            message: "source timeline history".into(),
            source: Some(Box::new(e)),
        }
    })
}
