//! Phase 2: the plan — what differs between the two clusters, found from each side's own WAL
//! since the divergence, or by comparing chunk hashes where a side's WAL is gone; or, when an
//! earlier run left the target unfinished, the plan its journal holds (made again, from a
//! running source, with what it changed since).
//!
//! A running source is copied inside a backup window, opened here, before its changes are
//! asked for: the changes up to the window's start are copied, and everything after it is
//! replayed by the rewound node from the window's WAL.

use std::time::Instant;

use failback_common::changes::Changes;
use failback_common::filemap::FileEntry;
use failback_common::journal::{JournalHeader, JournalState};
use failback_common::lsn::history_file_name;
use failback_common::plan::{self, Plan, PlanInput};
use failback_common::relpath::{self, RelFileLocator};
use failback_common::rewind::{
    NO_DIVERGENCE, WINDOW_LABEL, forget_stale, shut_down_replay, target_wal_end, wal_segments,
};
use failback_common::timeline::{TimeLineHistory, find_common_ancestor, segment_file_name};
use failback_common::wal::WalParams;
use failback_common::{Lsn, PgMajor, TimeLineId, XLogSegNo};
use failback_datadir::DataDir;
use failback_datadir::wal::{CheckpointAt, WalReadError, WalReader, cores};
use serde::Serialize;

use super::check::Checked;
use super::{Mode, RewindOptions, RewindReport};
use crate::copy;
use crate::error::{Doing, RewindError};
use crate::fault::{self, Point};
use crate::progress::Progress;
use crate::source::{ChangesAnswer, Source, WindowStart};

/// How one side's changes since the divergence were found, for the report.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SideReport {
    /// `wal`: its own WAL named them; `hashes`: its relation files are compared chunk by chunk
    /// with the other side's.
    pub found_by: String,
    /// Why not from its WAL, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// Main-fork blocks its WAL named.
    pub changed_blocks: u64,
    /// WAL segments whose changes failbackd took from its WAL summaries instead of decoding
    /// them.
    #[serde(skip_serializing_if = "is_zero")]
    pub summarized_segments: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a side's WAL said: its changes, or why it could not say.
type Found = Result<Changes, String>;

fn side_report(found: &Found) -> SideReport {
    match found {
        Ok(c) => SideReport {
            found_by: "wal".into(),
            why: None,
            changed_blocks: c.block_count() as u64,
            summarized_segments: 0,
        },
        Err(why) => SideReport {
            found_by: "hashes".into(),
            why: Some(why.clone()),
            changed_blocks: 0,
            summarized_segments: 0,
        },
    }
}

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
    let target = &checked.target_control;
    let dir = checked.target.dir();
    // Timelines and the divergence.
    let src_tli = source_timeline(source, checked, progress)?;
    let tgt_tli = target.timeline_for_rewind();
    report.source_timeline = src_tli;
    report.target_timeline = tgt_tli;
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
    if src_tli == tgt_tli && !opts.resync {
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
    // Where the histories part; a resync of a target on the source's own timeline has none.
    let (divergence, divergence_tli) = if src_tli == tgt_tli {
        progress.info("source and target cluster are on the same timeline");
        (NO_DIVERGENCE, tgt_tli)
    } else {
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
        (ca.divergerec, ca.tli)
    };

    let t_scan = Instant::now();
    let mut replay_from = None;
    let mut recycle_past = None;
    // The target's changes: none to read for a resync, else from its own WAL, read while the
    // source opens its window and says what it changed (two machines, or two cores, at once).
    let target_side = if opts.resync {
        report.rewind_needed = true;
        report.seconds.checks = (t_scan - t0).as_secs_f64();
        TargetSide::Known(Err(by_choice(opts.mode, true)
            .unwrap_or_default()
            .to_string()))
    } else {
        // Did the target write anything past the divergence? Its WAL ends at the end of its
        // last checkpoint record, or at its minimum recovery point if it was a standby.
        let params = WalParams::new(target.major, target.xlog_seg_size)
            .with_system_identifier(target.system_identifier);
        let mut wal = WalReader::new(dir, &target_history, params, checked.restore.clone());
        let end_of_target_wal = if target.checkPoint > divergence {
            // Past the divergence already; the record's end only matters for the scan's end.
            target_wal_end(target.checkPoint, target)
        } else {
            let chkpt = wal
                .read_record(target.checkPoint)
                .doing("could not read the target's latest checkpoint record")?;
            target_wal_end(chkpt.end_lsn, target)
        };
        if end_of_target_wal <= divergence {
            report.seconds.checks = t0.elapsed().as_secs_f64();
            return Ok(Planned::NothingToRewind);
        }
        report.rewind_needed = true;
        report.seconds.checks = (t_scan - t0).as_secs_f64();
        recycle_past = Some(end_of_target_wal);
        replay_from = common_checkpoint(opts.mode, source, &mut wal, divergence, progress)?;
        progress.phase("reading WAL in target");
        TargetSide::Scan(wal, end_of_target_wal)
    };
    let (target_changes, source_part) = std::thread::scope(|scope| {
        let scan = match target_side {
            TargetSide::Known(found) => Err(found),
            TargetSide::Scan(mut wal, end) => Ok(scope.spawn(move || {
                let found = side_changes(opts.mode, "target", || {
                    wal.changes_in_parallel(divergence, end, target.relseg_size, cores(), || {
                        fault::passed(Point::Scan, 1)
                    })
                    .map(|c| c.finish(target.major))
                });
                fault::scan_ended();
                (found, t_scan.elapsed())
            })),
        };
        // A running source: the window its copy is made in, then its changes up to the window.
        let t_source = Instant::now();
        let source_part = match replay_from {
            // Its changes are what replay from the checkpoint redoes: none to copy.
            Some(checkpoint) => source
                .open_window_at(checkpoint)
                .doing("could not open a window on the running source")
                .map(|(window, flushed)| {
                    let replay = Replay {
                        checkpoint,
                        flushed,
                    };
                    (Some(window), (Ok(Changes::default()), 0), Some(replay))
                }),
            None => own_window(opts.mode, opts.resync, source, divergence)
                .map(|(window, changes)| (window, changes, None)),
        };
        report.seconds.source_changes = t_source.elapsed().as_secs_f64();
        // The plan fetches the source's changed blocks whatever the target's WAL says (but in
        // files gone since): a remote source may start on them while that WAL is read and the
        // plan made and journaled.
        if let Ok((_, (Ok(changes), _), None)) = &source_part
            && !opts.dry_run
        {
            source.fetch_ahead(copy::changed_ranges(&changes.page_map, target.blcksz));
        }
        let target_changes = match scan {
            Ok(handle) => {
                let (found, took) = handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                report.seconds.wal_scan = took.as_secs_f64();
                found
            }
            Err(known) => Ok(known),
        };
        (target_changes, source_part)
    });
    // The target's failure first: it is the one the user can act on before the source's.
    let target_changes = target_changes?;
    let (window, (source_changes, source_summarized), replay) = source_part?;
    if replay.is_none() {
        say_window(window, progress);
    }
    plan_with(
        opts,
        checked,
        source,
        progress,
        report,
        Replan {
            resync: opts.resync,
            divergence,
            divergence_tli,
            src_tli,
            source_history: &source_history,
            window,
            target_changes,
            source_changes,
            source_summarized,
            replay,
            target_wal_end: recycle_past,
        },
    )
    .map(|h| Planned::Plan(Box::new(h)))
}

/// A backup window of the source's own (`None` for a shut-down source), and the source's
/// changes up to its start.
fn own_window(
    mode: Mode,
    resync: bool,
    source: &mut dyn Source,
    divergence: Lsn,
) -> Result<(Option<WindowStart>, (Found, u64)), RewindError> {
    let window = source
        .open_window(WINDOW_LABEL)
        .doing("could not open a backup window on the running source")?;
    let changes = source_side(mode, resync, source, divergence, window)?;
    Ok((window, changes))
}

fn say_window(window: Option<WindowStart>, progress: &mut dyn Progress) {
    if let Some(w) = window {
        progress.info(&format!(
            "copying inside a backup window of the source starting at {} on timeline {}",
            w.start, w.tli
        ));
    }
}

/// A window opened at the last common checkpoint: the rewound node replays the source's WAL
/// from there, and the source's changes are not copied.
#[derive(Clone, Copy, Debug)]
struct Replay {
    checkpoint: CheckpointAt,
    /// The source's flush position when the window opened: its segments wholly before this are
    /// final and copied with the plan; the rest once the window closes.
    flushed: Lsn,
}

/// Where the rewound node replays the source's WAL from, when it should: for a source whose
/// changes only its WAL could name over the link ([`Source::replays_own_wal`]), the last
/// checkpoint before the divergence in the target's WAL, pg_rewind's *last common checkpoint*.
/// Reading that WAL to name the blocks would cost what copying it for replay costs, and
/// copying those blocks on top of it more. `None` when the source's changes are found
/// otherwise, or asked by hashes (`--mode delta`), or when the target's WAL no longer holds
/// that checkpoint and the WAL after its redo pointer.
fn common_checkpoint(
    mode: Mode,
    source: &mut dyn Source,
    wal: &mut WalReader<'_>,
    divergence: Lsn,
    progress: &mut dyn Progress,
) -> Result<Option<CheckpointAt>, RewindError> {
    if by_choice(mode, false).is_some()
        || !source
            .replays_own_wal()
            .doing("could not ask how the source's changes can be found")?
    {
        return Ok(None);
    }
    match wal
        .checkpoint_before(divergence)
        .and_then(|c| wal.require(c.redo, c.lsn).map(|()| c))
    {
        Ok(c) => {
            // pg_rewind's words, which operators and orchestrators' logs know.
            progress.info(&format!(
                "rewinding from last common checkpoint at {} on timeline {}",
                c.lsn, c.tli
            ));
            Ok(Some(c))
        }
        Err(e) => {
            progress.info(&format!(
                "the target's WAL no longer holds the last checkpoint before the divergence \
                 ({}): the source's changes are found from its WAL instead of replayed from there",
                failback_common::errors::one_line(&e)
            ));
            Ok(None)
        }
    }
}

/// The target's side of a plan: known without reading (a resync), or its WAL to read.
enum TargetSide<'h> {
    Known(Found),
    Scan(WalReader<'h>, Lsn),
}

/// What a side's changes are, by `mode`: from its WAL (`scan`), or compared by hashes when
/// that WAL is gone (`auto`) or by choice (`delta`); `wal` refuses without the WAL.
fn side_changes(
    mode: Mode,
    side: &str,
    scan: impl FnOnce() -> Result<Changes, WalReadError>,
) -> Result<Found, RewindError> {
    if let Some(why) = by_choice(mode, false) {
        return Ok(Err(why.into()));
    }
    match scan() {
        Ok(c) => Ok(Ok(c)),
        Err(e @ (WalReadError::MissingSegment { .. } | WalReadError::EndedEarly { .. })) => {
            let why = failback_common::errors::one_line(&e);
            if mode == Mode::Wal {
                return Err(RewindError::Wal {
                    doing: format!(
                        "the {side}'s WAL since the divergence is not all there, and --mode wal \
                         finds changes by WAL only (--mode auto compares chunk hashes instead)"
                    ),
                    source: e,
                });
            }
            Ok(Err(why))
        }
        Err(e) => Err(RewindError::Wal {
            doing: format!("could not read the {side}'s WAL"),
            source: e,
        }),
    }
}

/// Why a side's changes are compared by hashes whatever its WAL holds, when they are: a resync
/// compares every relation file, and so does `--mode delta`.
fn by_choice(mode: Mode, resync: bool) -> Option<&'static str> {
    if resync {
        Some("a resync compares every relation file with the source's")
    } else if mode == Mode::Delta {
        Some("--mode delta")
    } else {
        None
    }
}

/// The source's changes since the divergence, up to the window's start when there is one,
/// and how many WAL segments of them came from the source's WAL summaries.
fn source_side(
    mode: Mode,
    resync: bool,
    source: &mut dyn Source,
    divergence: Lsn,
    window: Option<WindowStart>,
) -> Result<(Found, u64), RewindError> {
    if let Some(why) = by_choice(mode, resync) {
        return Ok((Err(why.into()), 0));
    }
    match source
        .changes(divergence, window.map(|w| w.start))
        .doing("could not ask the source for its changes since the divergence")?
    {
        ChangesAnswer::Found(f) => Ok((Ok(f.changes), f.summarized_segments)),
        ChangesAnswer::Unknown { why } if mode == Mode::Wal => Err(RewindError::refused(format!(
            "the source cannot say what it changed since the divergence ({why}), and --mode wal \
             finds changes by WAL only (--mode auto compares chunk hashes instead)"
        ))),
        ChangesAnswer::Unknown { why } => Ok((Err(why), 0)),
    }
}

/// What a plan is made of beyond the two file lists.
struct Replan<'h> {
    resync: bool,
    divergence: Lsn,
    divergence_tli: TimeLineId,
    src_tli: TimeLineId,
    source_history: &'h TimeLineHistory,
    window: Option<WindowStart>,
    target_changes: Found,
    source_changes: Found,
    source_summarized: u64,
    replay: Option<Replay>,
    /// Where the target's WAL ends (the plan recycles the target's segments past it), when
    /// it was read from an untouched target.
    target_wal_end: Option<Lsn>,
}

/// Both file lists, and the plan made of them with both sides' changes.
fn plan_with(
    opts: &RewindOptions,
    checked: &Checked,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
    report: &mut RewindReport,
    mut r: Replan<'_>,
) -> Result<JournalHeader, RewindError> {
    let target = &checked.target_control;
    let seg = target.xlog_seg_size;
    let t_lists = Instant::now();
    progress.phase("reading source file list");
    let mut source_files = source
        .list_files()
        .doing("could not list the source's files")?;
    // Replay from the last common checkpoint needs all the source's WAL since the divergence.
    if let Some(replay) = r.replay
        && let Some(name) = first_missing_segment(
            &source_files,
            r.source_history,
            wal_segments(r.divergence, replay.flushed, seg),
            seg,
        )
    {
        progress.info(&format!(
            "the source no longer has WAL segment {name}, which replay from the last common \
             checkpoint needs: its changes are found another way"
        ));
        let (window, (changes, summarized)) =
            own_window(opts.mode, r.resync, source, r.divergence)?;
        (r.window, r.source_changes, r.source_summarized, r.replay) =
            (window, changes, summarized, None);
        say_window(window, progress);
        source_files = source
            .list_files()
            .doing("could not list the source's files")?;
    }
    progress.phase("reading target file list");
    let target_files =
        DataDir::new(checked.target.dir())
            .list()
            .map_err(|e| RewindError::Refused {
                message: "could not list the target's files".into(),
                source: Some(Box::new(e)),
            })?;
    let major = target.major;
    // A shut-down source's copy replays its own WAL from its last checkpoint: it must all be
    // there, or the rewound node could never become consistent. Said before anything changes.
    let replay_wal = match r.window {
        // From the last common checkpoint: the source's complete segments since the divergence
        // are copied with the rest (the one being written, and later ones, at the commit).
        Some(_) => match r.replay {
            None => None,
            Some(replay) => {
                let first = r.divergence.segment_number(seg);
                let complete = replay.flushed.segment_number(seg);
                report.replay = Some(ReplayReport {
                    from: replay.checkpoint.redo.to_string(),
                    to: replay.flushed.to_string(),
                    bytes: complete.saturating_sub(first) * u64::from(seg),
                });
                (complete > first).then(|| (first, complete - 1))
            }
        },
        None => {
            let (from, to) = shut_down_replay(&checked.source_control);
            let (first, last) = wal_segments(from, to, seg);
            if let Some(name) =
                first_missing_segment(&source_files, r.source_history, (first, last), seg)
            {
                return Err(RewindError::refused(format!(
                    "the source lacks WAL segment {name}, which the rewound node must replay \
                     (from {from} to {to}) to become consistent; restore it into the \
                     source's pg_wal from its archive, or start the source so that it is \
                     copied inside a backup window"
                )));
            }
            // Where pg_rewind says it rewinds from the last common checkpoint: failback's
            // rewound node replays from the source's own checkpoint instead, only the WAL the
            // copy needs.
            progress.info(&format!(
                "rewinding from the source's checkpoint at {} on timeline {}, not from the last \
                 common checkpoint: the rewound node replays only the source's WAL from {from}",
                checked.source_control.checkPoint,
                checked.source_control.checkPointCopy.ThisTimeLineID
            ));
            report.replay = Some(ReplayReport {
                from: from.to_string(),
                to: to.to_string(),
                bytes: (last - first + 1) * u64::from(seg),
            });
            Some((first, last))
        }
    };
    report.target_changes = side_report(&r.target_changes);
    report.source_changes = side_report(&r.source_changes);
    report.source_changes.summarized_segments = r.source_summarized;
    let mut sides = vec![("target", &r.target_changes)];
    match r.replay {
        Some(replay) => {
            report.source_changes = SideReport {
                found_by: "replay".into(),
                why: Some(format!(
                    "the rewound node replays its WAL from the last common checkpoint at {}",
                    replay.checkpoint.lsn
                )),
                ..SideReport::default()
            };
        }
        None => sides.push(("source", &r.source_changes)),
    }
    for (side, found) in sides {
        match found {
            Ok(c) => progress.info(&format!(
                "the {side}'s WAL names {} changed blocks since the divergence",
                c.block_count()
            )),
            Err(why) => progress.info(&format!(
                "the {side}'s changes are found by comparing chunk hashes: {why}"
            )),
        }
    }
    let changes = match (&r.target_changes, &r.source_changes) {
        (Ok(t), Ok(s)) => {
            let mut all = t.clone();
            all.merge(s.clone());
            Some(all)
        }
        _ => None,
    };
    report.changed_blocks = changes.as_ref().map_or(0, |c| c.block_count() as u64);
    let relation_of = |p: &str| relation_of(p, major);
    let the_plan = plan::make_plan(&PlanInput {
        source: &source_files,
        target: &target_files,
        changes: changes.as_ref(),
        relation_of: &relation_of,
        block_size: target.blcksz,
        wal_segment_size: seg,
        divergence: r.divergence,
        replay_wal,
        target_wal_end: r.target_wal_end,
    })
    .map_err(|e| RewindError::Refused {
        message: "could not plan the rewind".into(),
        source: Some(Box::new(e)),
    })?;
    let header = JournalHeader {
        system_identifier: target.system_identifier,
        pg_major: major.number(),
        divergence: r.divergence,
        divergence_tli: r.divergence_tli,
        source_tli: r.src_tli,
        window_start: r.window.map(|w| w.start),
        target_changes: r.target_changes.ok(),
        resync: r.resync,
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
        show_plan(&header.plan, progress);
    }
    Ok(header)
}

/// The name of the first of the source's WAL segments `first..=last` (along `history`) that
/// its file list lacks.
fn first_missing_segment(
    source_files: &[FileEntry],
    history: &TimeLineHistory,
    (first, last): (XLogSegNo, XLogSegNo),
    seg_size: u32,
) -> Option<String> {
    (first..=last)
        .map(|segno| segment_file_name(history, segno, seg_size))
        .find(|name| {
            let path = format!("pg_wal/{name}");
            !source_files.iter().any(|f| f.path == path)
        })
}

/// `--debug`: a line per file and its blocks.
fn show_plan(plan: &Plan, progress: &mut dyn Progress) {
    for e in &plan.entries {
        let note = e.reason.map(|n| format!(" -- {n}")).unwrap_or_default();
        progress.debug(&format!("{} ({}){note}", e.path, e.action.name()));
        for b in e.blocks.iter() {
            progress.debug(&format!("  block {b}"));
        }
    }
}

/// The relation a path is a main-fork segment of.
fn relation_of(path: &str, major: PgMajor) -> Option<RelFileLocator> {
    relpath::is_rel_data_file(path, major).map(|(l, _)| l)
}

/// The WAL copied with the plan for the rewound node to replay, for the report: a shut-down
/// source's from its last checkpoint, or a running source's from the last common checkpoint.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    pub from: String,
    /// Where the source's WAL ended when the plan was made (a running source's replay goes on
    /// to its window's end, with WAL fetched at the commit).
    pub to: String,
    /// Bytes of WAL segments copied for it with the plan.
    pub bytes: u64,
}

/// A resumed rewind: the journal's plan, once the source is checked to be still on the history
/// the plan was made from. The plan stands as it is when the source was shut down and still is
/// (it cannot have changed); a running source — or one that ran since — is planned again, with
/// the target's changes the journal kept, and what the earlier run did is kept only where the
/// source has not changed it since ([`forget_stale`]).
pub(crate) fn resumed(
    opts: &RewindOptions,
    checked: &Checked,
    state: &mut JournalState,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
    report: &mut RewindReport,
) -> Result<(JournalHeader, bool), RewindError> {
    let h = state.header.clone();
    let src_tli = source_timeline(source, checked, progress)?;
    let history = source_history(source, src_tli)?;
    let still = history
        .entries()
        .iter()
        .any(|e| e.tli == h.divergence_tli && e.end.is_none_or(|end| end >= h.divergence));
    // A resync of a target on the source's own timeline has no divergence to look for.
    let same_timeline_resync = h.resync && h.divergence == NO_DIVERGENCE;
    if !same_timeline_resync && (src_tli == h.divergence_tli || !still) {
        return Err(RewindError::refused(format!(
            "the source is no longer on the history the unfinished rewind was planned from (it \
             forked from timeline {} at {}); the target cannot be finished from it",
            h.divergence_tli, h.divergence
        )));
    }
    report.rewind_needed = true;
    report.resync = h.resync;
    if !same_timeline_resync {
        report.divergence_lsn = Some(h.divergence.to_string());
        report.divergence_timeline = Some(h.divergence_tli);
    }
    if h.window_start.is_none() && !source.is_live() {
        report.planned(&h);
        report.source_timeline = src_tli;
        return Ok((h, false));
    }
    // The source ran since the plan was made: plan again inside a new window.
    let window = source
        .open_window(WINDOW_LABEL)
        .doing("could not open a backup window on the running source")?;
    let since_then = match h.window_start {
        // A window opened at the last common checkpoint began before the divergence; what
        // the earlier run copied was copied after it.
        Some(start) if by_choice(opts.mode, h.resync).is_none() => {
            match source
                .changes(copied_after(start, h.divergence), window.map(|w| w.start))
                .doing("could not ask the source for its changes since the earlier window")?
            {
                ChangesAnswer::Found(f) => Some(f.changes),
                ChangesAnswer::Unknown { .. } => None,
            }
        }
        _ => None,
    };
    let major = checked.target_control.major;
    forget_stale(
        &mut state.done,
        since_then.as_ref(),
        checked.target_control.blcksz,
        &|p| relation_of(p, major),
    );
    progress.info(&format!(
        "the source ran since the unfinished rewind was planned: planning again; {} MB of what \
         it copied still stands",
        state.done_bytes() / 1_000_000
    ));
    let (source_changes, source_summarized) =
        source_side(opts.mode, h.resync, source, h.divergence, window)?;
    let target_changes = match (by_choice(opts.mode, h.resync), &h.target_changes) {
        (Some(why), _) => Err(why.to_string()),
        (None, Some(c)) => Ok(c.clone()),
        (None, None) => Err("the unfinished rewind compared them by hashes".to_string()),
    };
    let header = plan_with(
        opts,
        checked,
        source,
        progress,
        report,
        Replan {
            resync: h.resync,
            divergence: h.divergence,
            divergence_tli: h.divergence_tli,
            src_tli,
            source_history: &history,
            window,
            target_changes,
            source_changes,
            source_summarized,
            replay: None,
            // The earlier run may have fetched and renamed WAL since the target's end was
            // read: what is past the divergence is removed, as before recycling existed.
            target_wal_end: None,
        },
    )?;
    Ok((header, true))
}

/// Where the source's changes may have made what an earlier run copied stale: its window's
/// start, or the divergence when the window began before it (at the last common checkpoint;
/// the copy was made after the divergence).
fn copied_after(window_start: Lsn, divergence: Lsn) -> Lsn {
    if divergence == NO_DIVERGENCE {
        window_start
    } else {
        window_start.max(divergence)
    }
}

/// The source's timeline. A live source may have been promoted moments ago: its control file
/// names the old timeline until the first checkpoint on the new one, so the server's own
/// answer wins (pg_rewind 13-15 wrongly said "no rewind required" then).
fn source_timeline(
    source: &mut dyn Source,
    checked: &Checked,
    progress: &mut dyn Progress,
) -> Result<TimeLineId, RewindError> {
    let control_tli = checked.source_control.timeline_for_rewind();
    let mut tli = control_tli;
    if let Some(end) = checked.live_start {
        let current = source
            .current_timeline()
            .doing("could not read the source's current timeline")?
            .unwrap_or(0);
        tli = tli.max(current).max(end.tli);
    }
    // Right after a promotion the control file lags until the promotion's checkpoint ends;
    // pg_rewind believes it and may say "no rewind required". Say why failback does not.
    if tli > control_tli {
        progress.info(&format!(
            "the source's control file still says timeline {control_tli} (its promotion's \
             checkpoint has not finished), but the source is on timeline {tli}"
        ));
    }
    Ok(tli)
}

/// The source's timeline history, through the source.
pub(crate) fn source_history(
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
