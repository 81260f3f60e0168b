//! The rewind: pg_rewind's sequence, step by step (`src/bin/pg_rewind/pg_rewind.c`, `main`).
//!
//! 1. Read both control files and check that the clusters can be rewound into each other: same
//!    system, same version and geometry, hint bits WAL-logged on the target, both shut down
//!    cleanly (a crashed target is first taken through crash recovery in single-user mode).
//! 2. Find where the histories diverged, and whether the target wrote WAL past that point at
//!    all; if not, there is nothing to rewind.
//! 3. Walk the target's WAL back from the divergence to the last checkpoint both share: replay
//!    will start there.
//! 4. Read the target's WAL forward from that checkpoint and note every block it touched.
//! 5. Compare both file lists, plan, and carry the plan out.
//! 6. Write `backup_label` (start replay at the common checkpoint) and a control file that
//!    demands replay up to the source's end of WAL before the server opens.
//!
//! Every check happens before the first change to the target; a refusal leaves it as it was.

use std::path::{Path, PathBuf};
use std::time::Instant;

use failback_common::control::{ControlFileData, DBState};
use failback_common::filemap::FileAction;
use failback_common::lsn::history_file_name;
use failback_common::plan::{self, ChangedBlocks, Plan, PlanInput};
use failback_common::recovery;
use failback_common::relpath::{self, ForkNumber};
use failback_common::timeline::{TimeLineHistory, find_common_ancestor};
use failback_common::wal::WalParams;
use failback_common::{Lsn, TimeLineId};
use failback_datadir::DataDir;
use serde::Serialize;

use crate::execute::{self, ExecuteStats};
use crate::fault::{self, Point};
use crate::fsutil::{self, Ownership, SyncMethod};
use crate::pgbin;
use crate::progress::Progress;
use crate::source::{Ask, Source};
use crate::unfinished;
use crate::walread::{RestoreCommand, WalReader};
use failback_common::journal::{JournalHeader, JournalState, Phase};

/// XLOG rmgr id and its checkpoint record types (`catalog/pg_control.h`).
const RM_XLOG_ID: u8 = 0;
const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
/// `SizeOfXLogLongPHD` and `SizeOfXLogShortPHD`.
const SIZE_OF_LONG_PHD: u64 = 40;
const SIZE_OF_SHORT_PHD: u64 = 24;

/// What the caller asked for (pg_rewind's flags, and failback's).
#[derive(Clone, Debug, Default)]
pub struct RewindOptions {
    pub target: PathBuf,
    /// `-R`: write standby.signal and primary_conninfo.
    pub write_recovery_conf: bool,
    pub primary_conninfo: Option<String>,
    /// `-n`: change nothing, print what would be done.
    pub dry_run: bool,
    /// `-N`: do not fsync the target at the end.
    pub no_sync: bool,
    /// `-c`: fetch missing target WAL with the target's restore_command.
    pub restore_target_wal: bool,
    /// `--config-file`: passed to the target's postgres as `-c config_file=`.
    pub config_file: Option<PathBuf>,
    /// `--no-ensure-shutdown`: refuse a target that was not shut down cleanly.
    pub no_ensure_shutdown: bool,
    pub sync_method: Option<SyncMethod>,
    /// `--debug`: the plan, a line per file and its blocks.
    pub debug: bool,
    /// Where the target version's `postgres` binary lives (for crash recovery and `-c`).
    pub pg_bindir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RewindError {
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

fn fail(message: impl Into<String>) -> RewindError {
    RewindError {
        message: message.into(),
        source: None,
    }
}

impl RewindError {
    /// The target's file system is full (or the quota used up), if that is why the rewind
    /// stopped: the one error for it, wherever on the target it was met.
    pub fn target_full(&self) -> Option<&fsutil::TargetFull> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match &self.source {
            Some(b) => Some(b.as_ref()),
            None => None,
        };
        while let Some(e) = cause {
            let found = e
                .downcast_ref::<fsutil::TargetFull>()
                .or_else(|| e.downcast_ref::<execute::ExecuteError>()?.target_full())
                .or_else(|| match e.downcast_ref::<unfinished::UnfinishedError>()? {
                    unfinished::UnfinishedError::TargetFull(f) => Some(f),
                    _ => None,
                });
            if found.is_some() {
                return found;
            }
            cause = e.source();
        }
        None
    }
}

/// [`wrap`] for an I/O error while writing `path` in the target, which says a full file
/// system as [`fsutil::TargetFull`].
fn wrap_write(
    message: impl Into<String>,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> RewindError {
    let message = message.into();
    let path = path.to_path_buf();
    move |e| RewindError {
        message,
        source: Some(fsutil::target_error(&path, e, |e| e.into())),
    }
}

fn wrap<E: std::error::Error + Send + Sync + 'static>(
    message: impl Into<String>,
) -> impl FnOnce(E) -> RewindError {
    let message = message.into();
    move |e| RewindError {
        message,
        source: Some(Box::new(e)),
    }
}

/// Time spent in each phase, in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseTimes {
    pub checks: f64,
    pub wal_scan: f64,
    pub file_lists: f64,
    pub copy: f64,
    pub sync_and_commit: f64,
}

/// What a rewind found and did: the report (`--report`) and the test oracle.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RewindReport {
    pub rewind_needed: bool,
    pub dry_run: bool,
    pub source_timeline: TimeLineId,
    pub target_timeline: TimeLineId,
    pub divergence_lsn: Option<String>,
    pub divergence_timeline: Option<TimeLineId>,
    pub checkpoint_lsn: Option<String>,
    pub checkpoint_redo: Option<String>,
    pub checkpoint_timeline: Option<TimeLineId>,
    pub min_recovery_point: Option<String>,
    pub changed_blocks: u64,
    pub actions: std::collections::BTreeMap<String, plan::ActionTotals>,
    pub bytes_to_fetch: u64,
    pub execution: Option<ExecuteStats>,
    pub seconds: PhaseTimes,
    /// The run finished a rewind an earlier run had started (its journal was found).
    pub resumed: bool,
}

/// Runs a rewind of `opts.target` from `source`.
pub fn rewind(
    opts: &RewindOptions,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
) -> Result<(RewindReport, Option<Plan>), RewindError> {
    let mut report = RewindReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let t0 = Instant::now();
    let target_dir = &opts.target;
    let own = Ownership::of_data_dir(target_dir).map_err(wrap(format!(
        "could not access target data directory \"{}\"",
        target_dir.display()
    )))?;
    refuse_running_target(target_dir)?;

    let pg = pgbin::PgBin::new(
        opts.pg_bindir.clone(),
        own.chown.then_some((own.uid, own.gid)),
    );
    let restore = if opts.restore_target_wal {
        let cmd = pg.restore_command(target_dir, opts.config_file.as_deref())?;
        Some(RestoreCommand {
            command: cmd,
            run_as: own.chown.then_some((own.uid, own.gid)),
        })
    } else {
        None
    };

    // Step 1: both control files, and the checks. Everything that does not depend on the
    // target's state is checked before crash recovery, the first change to the target.
    let mut target = read_target_control(target_dir)?;
    let source_bytes = source
        .control_file()
        .map_err(wrap("could not read the source's control file"))?;
    let src = ControlFileData::parse(&source_bytes)
        .map_err(wrap(format!("source control file ({})", source.describe())))?;
    sanity_checks(&src, &target, source.is_live(), false)?;
    // -R's conninfo: given, or what the source says (failbackd knows where its server listens).
    let conninfo = match (opts.write_recovery_conf, &opts.primary_conninfo) {
        (false, _) => None,
        (true, Some(c)) => Some(c.clone()),
        (true, None) => Some(source.primary_conninfo().ok_or_else(|| {
            fail(
                "-R needs --primary-conninfo: a local source does not say how the target \
                 reaches the new primary",
            )
        })?),
    };
    // A live source must be able to say where its WAL ends, or the rewound target could call
    // itself consistent before it has replayed what the copy saw: ask now, before anything
    // changes, so a source that cannot answer is refused with the target untouched.
    let live_start = if source.is_live() {
        let end = source
            .end_of_wal()
            .map_err(wrap(
                "could not learn where the running source server's WAL ends, which a rewind \
                 from a running server needs (failbackd serves one only with --pg-conn)",
            ))?
            .ok_or_else(|| {
                fail("the source server is running, but the source does not say where its WAL ends")
            })?;
        progress.debug(&format!(
            "source is live: its WAL ends at {} on timeline {}",
            end.lsn, end.tli
        ));
        Some(end)
    } else {
        None
    };
    // An earlier run that stopped half-way left its journal: finish what it planned. Its
    // plan stands in for the target's WAL, which the copy may already have replaced.
    let resume = unfinished::load(target_dir).map_err(wrap(
        "an earlier rewind of this data directory was left unfinished",
    ))?;
    if let Some(st) = &resume {
        if st.header.system_identifier != src.system_identifier {
            return Err(fail(format!(
                "an unfinished rewind of this data directory came from database system {}, but \
                 the source is system {}: resume it from the same new primary",
                st.header.system_identifier, src.system_identifier
            )));
        }
        progress.info(&format!(
            "resuming an unfinished rewind (it got as far as: {})",
            st.phase.name()
        ));
        report.resumed = true;
    }
    if resume.is_none() && already_rewound(target_dir, &target) {
        return Err(fail(format!(
            "{} was already rewound and has not been started since (its control file says \
             \"{}\" and its backup_label was written by a rewind): there is nothing to rewind; \
             start it as a standby of the new primary",
            target_dir.display(),
            target.state
        )));
    }
    if !target.state.is_shut_down_cleanly() && resume.is_none() {
        if opts.no_ensure_shutdown {
            return Err(fail(format!(
                "target server must be shut down cleanly (its state is \"{}\"); start and stop it \
                 cleanly, or run again without --no-ensure-shutdown to let failback run crash \
                 recovery",
                target.state
            )));
        }
        progress.info(
            "target server was not shut down cleanly; running crash recovery in single-user mode",
        );
        if !opts.dry_run {
            pg.single_user_recovery(target_dir, target.major, opts.config_file.as_deref())?;
            target = read_target_control(target_dir)?;
        }
    }
    sanity_checks(
        &src,
        &target,
        source.is_live(),
        !opts.dry_run && resume.is_none(),
    )?;

    let (the_plan, header, t_scan) = if let Some(st) = &resume {
        resumed_plan(st, source, &src, live_start, &mut report)?
    } else {
        // Step 2: timelines and the divergence.
        let src_tli = source_timeline(source, &src, live_start)?;
        let tgt_tli = target.timeline_for_rewind();
        report.source_timeline = src_tli;
        report.target_timeline = tgt_tli;
        let params = WalParams::new(target.major, target.xlog_seg_size)
            .with_system_identifier(target.system_identifier);
        let target_history = if tgt_tli == 1 {
            TimeLineHistory::single(1)
        } else {
            let name = history_file_name(tgt_tli);
            let bytes = std::fs::read(target_dir.join("pg_wal").join(&name)).map_err(wrap(
                format!("could not read target timeline history file pg_wal/{name}"),
            ))?;
            TimeLineHistory::parse(&bytes, tgt_tli, &format!("target pg_wal/{name}"))
                .map_err(wrap("target timeline history"))?
        };

        let rewind_needed;
        let mut divergence = None;
        if src_tli == tgt_tli {
            progress.info("source and target cluster are on the same timeline");
            rewind_needed = false;
        } else {
            let source_history = source_history(source, src_tli)?;
            for (side, h) in [("Source", &source_history), ("Target", &target_history)] {
                progress.debug(&format!("{side} timeline history:"));
                for e in h.entries() {
                    let end = e.end.map_or("(current)".to_string(), |l| l.to_string());
                    progress.debug(&format!("{}: {} - {}", e.tli, e.begin, end));
                }
            }
            let ca = find_common_ancestor(&source_history, &target_history)
                .map_err(wrap("could not find where source and target diverged"))?;
            progress.info(&format!(
                "servers diverged at WAL location {} on timeline {}",
                ca.divergerec, ca.tli
            ));
            report.divergence_lsn = Some(ca.divergerec.to_string());
            report.divergence_timeline = Some(ca.tli);

            // Did the target write anything past the divergence? Its WAL ends at the end of its
            // last checkpoint record, or at its minimum recovery point if it was a standby.
            let mut wal = WalReader::new(target_dir, &target_history, params, restore.clone());
            let chkpt = wal
                .read_record(target.checkPoint)
                .map_err(wrap("could not read the target's latest checkpoint record"))?;
            let target_wal_end = chkpt.end_lsn.max(target.minRecoveryPoint);
            rewind_needed = target_wal_end > ca.divergerec;
            divergence = Some((ca, target_wal_end));
        }

        if !rewind_needed {
            progress.info("no rewind required");
            if opts.write_recovery_conf && !opts.dry_run {
                write_recovery_conf(target_dir, conninfo.as_deref(), &own)?;
            }
            report.seconds.checks = t0.elapsed().as_secs_f64();
            return Ok((report, None));
        }
        let (ca, target_wal_end) = divergence.expect("a rewind is needed only after a divergence");
        report.rewind_needed = true;

        // Step 3: the last common checkpoint, walking back from the divergence.
        let t_scan = Instant::now();
        let mut wal = WalReader::new(target_dir, &target_history, params, restore.clone());
        let mut search = ca.divergerec;
        if search.page_offset(params.page_size) == 0 {
            search = Lsn(search.0
                + if search.segment_offset(target.xlog_seg_size) == 0 {
                    SIZE_OF_LONG_PHD
                } else {
                    SIZE_OF_SHORT_PHD
                });
        }
        let fork = search;
        let (chkpt_rec, chkpt_redo, chkpt_tli) = loop {
            let r = wal.read_record(search).map_err(wrap(format!(
            "could not find previous WAL record at {search} while looking for the last common checkpoint"
        )))?;
            if r.rmid == RM_XLOG_ID
                && matches!(
                    r.info & 0xF0,
                    XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE
                )
                && search < fork
            {
                let cp = failback_common::control::CheckPoint::parse(&r.main_data, target.major)
                    .map_err(wrap(format!("checkpoint record at {search}")))?;
                break (search, cp.redo, cp.ThisTimeLineID);
            }
            if !r.xl_prev.is_valid() || r.xl_prev >= search {
                return Err(fail(format!(
                    "could not find a checkpoint before the divergence point {} in the target's WAL",
                    ca.divergerec
                )));
            }
            search = r.xl_prev;
        };
        let keep_wal: std::collections::BTreeSet<String> =
            wal.opened.iter().map(|n| format!("pg_wal/{n}")).collect();
        progress.info(&format!(
            "rewinding from last common checkpoint at {chkpt_rec} on timeline {chkpt_tli}"
        ));
        report.checkpoint_lsn = Some(chkpt_rec.to_string());
        report.checkpoint_redo = Some(chkpt_redo.to_string());
        report.checkpoint_timeline = Some(chkpt_tli);

        // Step 4: every block the target touched since then.
        progress.phase("reading WAL in target");
        let mut changed = ChangedBlocks::default();
        let (relseg, blcksz, major) = (target.relseg_size, target.blcksz, target.major);
        wal.scan(chkpt_rec, target_wal_end, |rec| {
            fault::passed(Point::Scan, 1);
            for b in rec.blocks {
                if i32::from(b.fork()) != ForkNumber::Main.to_i32() {
                    continue;
                }
                changed.insert(b.locator, b.blkno, relseg);
            }
            Ok(())
        })
        .map_err(wrap("could not read the target's WAL"))?;
        let page_map = changed.into_page_map(major);
        report.changed_blocks = page_map.block_count() as u64;
        report.seconds.wal_scan = t_scan.elapsed().as_secs_f64();

        // Step 5: both file lists, the plan.
        let t_lists = Instant::now();
        progress.phase("reading source file list");
        let source_files = source
            .list_files()
            .map_err(wrap("could not list the source's files"))?;
        progress.phase("reading target file list");
        let target_files = DataDir::new(target_dir)
            .list()
            .map_err(wrap("could not list the target's files"))?;
        let is_rel = |p: &str| relpath::is_rel_data_file(p, major).is_some();
        let the_plan = plan::make_plan(&PlanInput {
            source: &source_files,
            target: &target_files,
            page_map: &page_map,
            keep_wal: &keep_wal,
            is_relation_file: &is_rel,
            block_size: blcksz,
            wal_segment_size: target.xlog_seg_size,
            oldest_needed_wal_segment: Some(chkpt_redo.segment_number(target.xlog_seg_size)),
            divergence: Some(ca.divergerec),
            source_wal_end: Some(match live_start {
                Some(end) => end.lsn,
                None if src.state == DBState::ShutdownedInRecovery
                    && src.minRecoveryPoint > src.checkPoint =>
                {
                    src.minRecoveryPoint
                }
                None => src.checkPoint,
            }),
        })
        .map_err(wrap("could not plan the rewind"))?;
        let mut the_plan = the_plan;
        hold_auto_conf(&mut the_plan);
        report.actions = the_plan
            .totals()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        report.bytes_to_fetch = the_plan.fetch_bytes();
        report.seconds.file_lists = t_lists.elapsed().as_secs_f64();
        let total_size: u64 = source_files.iter().map(|f| f.size).sum();
        progress.info(&format!(
            "need to copy {} MB (total source directory size is {} MB)",
            report.bytes_to_fetch / 1_000_000,
            total_size / 1_000_000
        ));
        if opts.debug {
            for e in &the_plan.entries {
                let note = e.reason.map(|n| format!(" -- {n}")).unwrap_or_default();
                progress.debug(&format!("{} ({}){note}", e.path, e.action.name()));
                for b in e.blocks.iter() {
                    progress.debug(&format!("  block {b}"));
                }
            }
        }
        let header = JournalHeader {
            system_identifier: target.system_identifier,
            pg_major: target.major.number(),
            divergence: ca.divergerec,
            divergence_tli: ca.tli,
            checkpoint: chkpt_rec,
            checkpoint_redo: chkpt_redo,
            checkpoint_tli: chkpt_tli,
            source_tli: src_tli,
            plan: the_plan,
        };
        (header.plan.clone(), header, t_scan)
    };
    let (chkpt_rec, chkpt_redo, chkpt_tli) = (
        header.checkpoint,
        header.checkpoint_redo,
        header.checkpoint_tli,
    );
    execute::preflight(&the_plan, target_dir).map_err(wrap(
        "the target data directory cannot be changed as the rewind needs",
    ))?;
    if opts.dry_run {
        progress.info("dry run: the target was not changed");
        return Ok((report, Some(the_plan)));
    }

    // Step 6: the point of no return. First the journal and the marker, so that from the
    // first change on, the target can neither be started nor lose its plan.
    if resume.is_none() {
        unfinished::begin(target_dir, header, &own)
            .map_err(wrap("could not record the rewind's plan in the target"))?;
    }
    if let Some(st) = &resume {
        unfinished::drop_torn_tail(target_dir, st)
            .and_then(|()| unfinished::mark(target_dir, &own))
            .map_err(wrap("could not take up the unfinished rewind's journal"))?;
    }
    let t_copy = Instant::now();
    progress.phase("copying");
    let mut recorder = unfinished::Recorder::open(target_dir)
        .map_err(wrap("could not open the rewind's journal"))?;
    let stats = execute::execute_journaled(
        &the_plan,
        target_dir,
        &own,
        source,
        progress,
        resume.as_ref(),
        Some(&mut recorder),
    )
    .map_err(wrap("could not carry out the rewind plan"))?;
    report.execution = Some(stats);
    report.seconds.copy = t_copy.elapsed().as_secs_f64();

    let t_commit = Instant::now();
    // What the commit needs from the source, asked together: over a long link one round trip
    // instead of three. postgresql.auto.conf is read now rather than at the end of the commit;
    // either is after the copy.
    source.ask_ahead(&[Ask::ControlFile, Ask::EndOfWal]);
    let source_auto_conf = source
        .read_file("postgresql.auto.conf")
        .map_err(wrap("could not read the source's postgresql.auto.conf"))?;
    let after_bytes = source
        .control_file()
        .map_err(wrap("could not read the source's control file again"))?;
    if !source.is_live() && after_bytes != source_bytes {
        return Err(fail(
            "source system was modified while failback was running; make sure the source is \
             shut down, then run failback again",
        ));
    }
    let after = ControlFileData::parse(&after_bytes).map_err(wrap("source control file"))?;
    let (mut redo, mut tli, mut ckpt) = (chkpt_redo, chkpt_tli, chkpt_rec);
    if src.checkPointCopy.redo < chkpt_redo {
        // A standby source whose restartpoint lags: start from its own checkpoint.
        redo = src.checkPointCopy.redo;
        tli = src.checkPointCopy.ThisTimeLineID;
        ckpt = src.checkPoint;
    }
    // A live source's end of WAL is asked for after the copy (pg_rewind's libpq source does
    // the same): every change the copy may have seen is before it.
    let end = source.end_of_wal().map_err(wrap(
        "could not read the source's end of WAL after the copy",
    ))?;
    if source.is_live() && end.is_none() {
        return Err(fail(
            "the source is live but did not say where its WAL ends after the copy",
        ));
    }
    // A live source wrote on during the copy: segments that were past its end of WAL when
    // the plan was made, and that its end has reached since, hold WAL recovery replays.
    if let Some(end) = end {
        let reached: Vec<_> = the_plan
            .entries
            .iter()
            .filter(|e| {
                e.reason == Some(plan::Reason::PastSourceEnd)
                    && !plan::wal_segment_past(&e.path, end.lsn, target.xlog_seg_size)
            })
            .map(|e| plan::PlanEntry {
                action: FileAction::Copy,
                reason: None,
                ..e.clone()
            })
            .collect();
        if !reached.is_empty() {
            progress.debug(&format!(
                "{} WAL segment(s) the source wrote into during the copy",
                reached.len()
            ));
            let more = Plan {
                entries: reached,
                block_size: the_plan.block_size,
            };
            let extra = execute::execute(&more, target_dir, &own, source, progress).map_err(
                wrap("could not copy the WAL the source wrote during the copy"),
            )?;
            if let Some(x) = report.execution.as_mut() {
                x.bytes_fetched += extra.bytes_fetched;
                x.bytes_written += extra.bytes_written;
                x.changed.extend(extra.changed);
            }
        }
    }
    let (min_point, min_tli) = match end {
        Some(end) => (end.lsn, end.tli),
        // A shut-down standby's data files may hold changes up to its minRecoveryPoint, past
        // its last restartpoint (pg_rewind takes the checkpoint alone, and a target rewound
        // from a standby could then call itself consistent too early).
        None if after.state == DBState::ShutdownedInRecovery
            && after.minRecoveryPoint > after.checkPoint =>
        {
            (after.minRecoveryPoint, after.minRecoveryPointTLI)
        }
        None => (after.checkPoint, after.checkPointCopy.ThisTimeLineID),
    };
    report.min_recovery_point = Some(min_point.to_string());

    if !opts.no_sync {
        progress.phase("syncing target data directory");
        let mut changed = report
            .execution
            .as_ref()
            .map(|x| x.changed.clone())
            .unwrap_or_default();
        if report.resumed {
            // What the interrupted run wrote may not have reached the disk.
            changed.extend(written_by(&the_plan));
        }
        fsutil::sync_plan(
            target_dir,
            &the_plan,
            &changed,
            restore.is_some(),
            opts.sync_method.unwrap_or(SyncMethod::Fsync),
        )
        .map_err(wrap_write(
            "could not sync the target data directory",
            target_dir,
        ))?;
    }
    unfinished::record(target_dir, Phase::Copied).map_err(wrap("could not update the journal"))?;
    fault::passed(Point::Commit, 1);
    progress.phase("creating backup label and updating control file");
    let label = recovery::backup_label(redo, tli, ckpt, target.xlog_seg_size, &now_utc());
    let label_path = target_dir.join("backup_label");
    fsutil::durable_write(&label_path, label.as_bytes(), &own)
        .map_err(wrap_write("could not write backup_label", &label_path))?;
    fault::passed(Point::Commit, 1);
    let mut new_control = after.clone();
    new_control.minRecoveryPoint = min_point;
    new_control.minRecoveryPointTLI = min_tli;
    new_control.state = DBState::InArchiveRecovery;
    let bytes = new_control
        .to_bytes()
        .map_err(wrap("could not build the new control file"))?;
    let control_path = target_dir.join("global/pg_control");
    fsutil::durable_write(&control_path, &bytes, &own).map_err(wrap_write(
        "could not write the target's control file",
        &control_path,
    ))?;
    fault::passed(Point::Commit, 1);
    unfinished::record(target_dir, Phase::Committed)
        .map_err(wrap("could not update the journal"))?;
    fault::passed(Point::Commit, 1);
    // Last, the configuration: the source's postgresql.auto.conf (held back by the plan), with
    // -R's primary_conninfo. Writing it removes the marker, so PostgreSQL can start.
    let mut auto_conf = source_auto_conf
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if opts.write_recovery_conf {
        let signal = target_dir.join("standby.signal");
        fsutil::durable_write(&signal, b"", &own)
            .map_err(wrap_write("could not write standby.signal", &signal))?;
        fault::passed(Point::Commit, 1);
        let conninfo = conninfo.as_deref().ok_or_else(|| {
            fail("-R needs --primary-conninfo to know how the target reaches the new primary")
        })?;
        auto_conf = recovery::set_auto_conf(&auto_conf, "primary_conninfo", conninfo);
    }
    unfinished::finish(target_dir, &auto_conf, &own)
        .map_err(wrap("could not write the target's postgresql.auto.conf"))?;
    report.seconds.sync_and_commit = t_commit.elapsed().as_secs_f64();
    report.seconds.checks = (t_scan - t0).as_secs_f64();
    progress.info("Done!");
    Ok((report, Some(the_plan)))
}

/// Whether `target` is what a finished rewind leaves before its first start: a control file
/// "in archive recovery" and a `backup_label` a rewind wrote (failback's and pg_rewind's say
/// `BACKUP METHOD: pg_rewind`). Crash recovery in single-user mode would fail on it, and a
/// second rewind has nothing to do.
fn already_rewound(target_dir: &Path, target: &ControlFileData) -> bool {
    target.state == DBState::InArchiveRecovery
        && std::fs::read_to_string(target_dir.join("backup_label"))
            .is_ok_and(|l| l.lines().any(|l| l.trim() == "BACKUP METHOD: pg_rewind"))
}

/// The plan of a resumed rewind: the journal's, once the source is checked to be the same
/// system still on the history the plan was made from.
fn resumed_plan(
    st: &JournalState,
    source: &mut dyn Source,
    src: &ControlFileData,
    live_start: Option<crate::source::SourceEnd>,
    report: &mut RewindReport,
) -> Result<(Plan, JournalHeader, Instant), RewindError> {
    let h = &st.header;
    let src_tli = source_timeline(source, src, live_start)?;
    let history = source_history(source, src_tli)?;
    let still = history
        .entries()
        .iter()
        .any(|e| e.tli == h.divergence_tli && e.end.is_none_or(|end| end >= h.divergence));
    if src_tli == h.divergence_tli || !still {
        return Err(fail(format!(
            "the source is no longer on the history the unfinished rewind was planned from (it \
             forked from timeline {} at {}); the target cannot be finished from it",
            h.divergence_tli, h.divergence
        )));
    }
    report.rewind_needed = true;
    report.source_timeline = src_tli;
    report.divergence_lsn = Some(h.divergence.to_string());
    report.divergence_timeline = Some(h.divergence_tli);
    report.checkpoint_lsn = Some(h.checkpoint.to_string());
    report.checkpoint_redo = Some(h.checkpoint_redo.to_string());
    report.checkpoint_timeline = Some(h.checkpoint_tli);
    report.actions = h
        .plan
        .totals()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    report.bytes_to_fetch = h.plan.fetch_bytes();
    Ok((h.plan.clone(), h.clone(), Instant::now()))
}

/// The source's timeline. A live source may have been promoted moments ago: its control file
/// names the old timeline until the first checkpoint on the new one, so the server's own
/// answer wins (pg_rewind 13-15 wrongly said "no rewind required" then).
fn source_timeline(
    source: &mut dyn Source,
    src: &ControlFileData,
    live_start: Option<crate::source::SourceEnd>,
) -> Result<TimeLineId, RewindError> {
    let mut tli = src.timeline_for_rewind();
    if let Some(end) = live_start {
        let current = source
            .current_timeline()
            .map_err(wrap("could not read the source's current timeline"))?
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
        .map_err(wrap("could not read the source's timeline history"))?
        .ok_or_else(|| fail(format!("source has no timeline history file pg_wal/{name}")))?;
    TimeLineHistory::parse(&bytes, src_tli, &format!("source pg_wal/{name}"))
        .map_err(wrap("source timeline history"))
}

/// `postgresql.auto.conf` is written once, at the end of the commit (it carries the marker
/// of an unfinished rewind until then), not copied with the rest.
fn hold_auto_conf(plan: &mut Plan) {
    for e in &mut plan.entries {
        if e.path == "postgresql.auto.conf" && e.action != FileAction::None {
            e.action = FileAction::None;
            e.reason = Some(plan::Reason::WrittenAtCommit);
        }
    }
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

fn read_target_control(target: &Path) -> Result<ControlFileData, RewindError> {
    let path = target.join("global/pg_control");
    let bytes = std::fs::read(&path).map_err(wrap(format!(
        "could not read target control file {}",
        path.display()
    )))?;
    ControlFileData::parse(&bytes).map_err(wrap(format!("target control file {}", path.display())))
}

/// A target with a live postmaster must not be touched (its files change under us, and it
/// would overwrite what we write).
fn refuse_running_target(target: &Path) -> Result<(), RewindError> {
    let Ok(text) = std::fs::read_to_string(target.join("postmaster.pid")) else {
        return Ok(());
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return Ok(());
    };
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    if alive {
        return Err(fail(format!(
            "target server is running (postmaster PID {pid}); stop it cleanly with \
             `pg_ctl stop -D {}` and run failback again — nothing was changed",
            target.display()
        )));
    }
    Ok(())
}

/// pg_rewind's `sanityChecks`, plus the geometry a block copy depends on; the target's state
/// is checked only when `check_target_state` (not before crash recovery, nor in a dry run).
/// The versions are compared first: clusters of two versions are also two systems, and the
/// version is the more useful thing to be told.
fn sanity_checks(
    src: &ControlFileData,
    tgt: &ControlFileData,
    source_live: bool,
    check_target_state: bool,
) -> Result<(), RewindError> {
    if src.major != tgt.major || src.catalog_version_no != tgt.catalog_version_no {
        return Err(fail(format!(
            "clusters are not compatible: source is PostgreSQL {} (catalog {}), target is \
             PostgreSQL {} (catalog {}); a rewind only works between clusters of the same \
             version",
            src.major, src.catalog_version_no, tgt.major, tgt.catalog_version_no
        )));
    }
    if src.system_identifier != tgt.system_identifier {
        return Err(fail(format!(
            "source and target clusters are from different systems (source system identifier \
             {}, target {}); a rewind only works between a primary and its former standby",
            src.system_identifier, tgt.system_identifier
        )));
    }
    if src.blcksz != tgt.blcksz || src.xlog_seg_size != tgt.xlog_seg_size {
        return Err(fail(format!(
            "clusters have different block or WAL segment sizes (source {}/{}, target {}/{})",
            src.blcksz, src.xlog_seg_size, tgt.blcksz, tgt.xlog_seg_size
        )));
    }
    if tgt.data_checksum_version != 1 && !tgt.wal_log_hints {
        return Err(fail(
            "target server needs to use either data checksums or \"wal_log_hints = on\"; without \
             them, hint-bit changes are not in the WAL and the rewind could miss changed blocks",
        ));
    }
    if !tgt.state.is_shut_down_cleanly() && check_target_state {
        return Err(fail(format!(
            "target server must be shut down cleanly (its state is \"{}\")",
            tgt.state
        )));
    }
    if !source_live && !src.state.is_shut_down_cleanly() {
        return Err(fail(format!(
            "source data directory must be shut down cleanly (its state is \"{}\"); stop the \
             source server, or serve it with `failbackd --pg-conn` to rewind from it running",
            src.state
        )));
    }
    Ok(())
}

/// `-R`: `standby.signal`, and one `primary_conninfo` in `postgresql.auto.conf`.
fn write_recovery_conf(
    target: &Path,
    conninfo: Option<&str>,
    own: &Ownership,
) -> Result<(), RewindError> {
    let conninfo = conninfo.ok_or_else(|| {
        fail("-R needs --primary-conninfo to know how the target reaches the new primary")
    })?;
    let signal = target.join("standby.signal");
    fsutil::durable_write(&signal, b"", own)
        .map_err(wrap_write("could not write standby.signal", &signal))?;
    let auto = target.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).unwrap_or_default();
    let new = recovery::set_auto_conf(&text, "primary_conninfo", conninfo);
    fsutil::durable_write(&auto, new.as_bytes(), own)
        .map_err(wrap_write("could not write postgresql.auto.conf", &auto))?;
    Ok(())
}
