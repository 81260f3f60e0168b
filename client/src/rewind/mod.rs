//! The rewind: pg_rewind's sequence (`src/bin/pg_rewind/pg_rewind.c`, `main`), in phases whose
//! inputs and outputs are types.
//!
//! 1. [`check`] — *what has been checked* ([`check::Checked`]): both control files read, the
//!    clusters found to belong together (one system, version and geometry, hint bits WAL-logged
//!    on the target), the target shut down cleanly (a crashed one is first taken through crash
//!    recovery in single-user mode), a live source's end of WAL known, and whether an earlier
//!    run left the target unfinished.
//! 2. [`plan`] — *the plan* ([`plan::Planned`]): where the histories diverged, whether the
//!    target wrote past that point at all, what each side changed since (from its own WAL, or
//!    by comparing chunk hashes where that WAL is gone), a backup window on a running source,
//!    both file lists, and the plan made of them. A running source whose changes only its WAL
//!    could name over the link (plain libpq without WAL summaries) is rewound pg_rewind's way
//!    instead: its window opens at the last common checkpoint, and the rewound node replays its
//!    WAL from there, copied rather than read to name blocks. A resumed run takes the plan
//!    from the journal instead (the copy may already have replaced the target's WAL), and
//!    makes it again, with what it kept, when the source ran meanwhile.
//! 3. [`Journaled`] — *a journaled plan*: the plan durable in the target, and the target
//!    marked so that PostgreSQL will not start on it. Fresh and resumed runs meet here and go
//!    through the same code from here on.
//! 4. [`copy`](crate::copy) — *a copied target* ([`Copied`]): every range fetched, verified and
//!    written, what the source lacks removed.
//! 5. [`commit`] — the backup window closed and the WAL from its start fetched, as far as the
//!    target lacks it (a running source), everything synced, then `backup_label`,
//!    `pg_control` and the configuration, in the order [`crate::target`] explains.
//!
//! Every check happens before the first change to the target; a refusal leaves it as it was.
//! An error after the first change says the target is unfinished ([`RewindError::Unfinished`]).
//! The decisions inside the phases are pure functions in [`failback_common::rewind`].

mod check;
mod commit;
mod plan;

use std::path::PathBuf;
use std::time::Instant;

use failback_common::TimeLineId;
use failback_common::journal::{JournalHeader, JournalState};
use failback_common::plan::{ActionTotals, Plan};
use serde::Serialize;

use crate::copy::{self, CopyStats};
use crate::error::{Doing, RewindError};
use crate::fsutil::SyncMethod;
use crate::progress::Progress;
use crate::source::{RetryCounts, RetryLog, Source};
use crate::target::Target;

pub use crate::error::{Kind, exit};

/// How each side's changes since the divergence are found (`--mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// From each side's own WAL where it has it from the divergence on, else by comparing
    /// chunk hashes of the relation files.
    #[default]
    Auto,
    /// From both sides' WAL only: refuse when either lacks it.
    Wal,
    /// By comparing chunk hashes of every relation file both sides have, whatever the WAL.
    Delta,
}

/// What the caller asked for (pg_rewind's flags, and failback's).
#[derive(Clone, Debug, Default)]
pub struct RewindOptions {
    /// `--mode`.
    pub mode: Mode,
    /// `failback resync`: bring the target in line with the source whatever its state (behind,
    /// restored from an old backup, damaged), comparing every relation file with the source's;
    /// no divergence is needed, and a target on the source's own timeline is resynced too.
    pub resync: bool,
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

/// Time spent in each phase, in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseTimes {
    pub checks: f64,
    pub wal_scan: f64,
    /// A running source's side, beside the target's WAL scan: opening its backup window and
    /// finding what it changed since the divergence (its WAL summaries, or its WAL read and
    /// decoded), or only opening a window at the last common checkpoint.
    pub source_changes: f64,
    pub file_lists: f64,
    pub copy: f64,
    pub sync_and_commit: f64,
}

/// What a rewind found and did: the report (`--report`) and the test oracle.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RewindReport {
    pub rewind_needed: bool,
    /// A resync (`failback resync`), not a rewind.
    pub resync: bool,
    /// The target had been rewound already and not started since: nothing was done.
    pub already_rewound: bool,
    pub dry_run: bool,
    pub source_timeline: TimeLineId,
    pub target_timeline: TimeLineId,
    pub divergence_lsn: Option<String>,
    pub divergence_timeline: Option<TimeLineId>,
    /// How the target's changes since the divergence were found, and why.
    pub target_changes: plan::SideReport,
    /// How the source's were.
    pub source_changes: plan::SideReport,
    /// Where the backup window a running source was copied in began.
    pub window_start: Option<String>,
    /// The WAL a copy of a shut-down source replays (a running source's window WAL is in
    /// `execution.window_wal_bytes`).
    pub replay: Option<plan::ReplayReport>,
    pub min_recovery_point: Option<String>,
    /// Blocks either side's WAL named (0 when a side's changes were compared by hashes).
    pub changed_blocks: u64,
    pub actions: std::collections::BTreeMap<String, ActionTotals>,
    pub bytes_to_fetch: u64,
    pub execution: Option<CopyStats>,
    /// How a remote source's replies were compressed, and why (`--compress auto`'s probes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    pub seconds: PhaseTimes,
    /// The run finished a rewind an earlier run had started (its journal was found).
    pub resumed: bool,
    /// What the source retried during the run: how flaky it was.
    pub retries: RetryCounts,
}

impl RewindReport {
    /// What the journal header says, for a fresh plan and a resumed one alike.
    fn planned(&mut self, h: &JournalHeader) {
        self.rewind_needed = true;
        self.resync = h.resync;
        self.source_timeline = h.source_tli;
        if h.divergence != failback_common::rewind::NO_DIVERGENCE {
            self.divergence_lsn = Some(h.divergence.to_string());
            self.divergence_timeline = Some(h.divergence_tli);
        }
        self.window_start = h.window_start.map(|l| l.to_string());
        self.actions = h
            .plan
            .totals()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        self.bytes_to_fetch = h.plan.fetch_bytes();
    }
}

/// What a finished run leaves: the report, and the plan when one was made.
#[derive(Debug)]
pub struct Outcome {
    pub report: RewindReport,
    pub plan: Option<Plan>,
}

/// Runs a rewind of `opts.target` from `source`.
pub fn rewind(
    opts: &RewindOptions,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
) -> Result<Outcome, RewindError> {
    let mut report = RewindReport {
        dry_run: opts.dry_run,
        resync: opts.resync,
        ..Default::default()
    };
    let t0 = Instant::now();
    let log = source.retries();
    let mut watched = Watched {
        inner: progress,
        log: log.clone(),
        seen: 0,
    };
    let done = run(opts, source, &mut watched, &mut report, t0);
    watched.catch_up();
    let retries = log.snapshot();
    if let Some(line) = retries.summary() {
        progress.info(&format!("the source needed {line}"));
    }
    done.map(|mut outcome| {
        outcome.report.retries = retries;
        outcome
    })
    .map_err(|e| {
        // Once the journal exists, the target is marked: PostgreSQL will not start on it, and
        // only a run that finishes the rewind makes it usable. Say so, whatever stopped it.
        match Target::unfinished(&opts.target) {
            Ok(Some(_)) if !matches!(e, RewindError::Unfinished { .. }) => {
                RewindError::Unfinished {
                    target: opts.target.clone(),
                    cause: Box::new(e),
                }
            }
            _ => e,
        }
    })
}

/// The caller's progress, told of the source's retries as they are counted: the source retries
/// on threads of its own, and every call the engine makes on its progress (each piece copied)
/// looks at the count first.
struct Watched<'p> {
    inner: &'p mut dyn Progress,
    log: RetryLog,
    seen: u64,
}

impl Watched<'_> {
    fn catch_up(&mut self) {
        let total = self.log.total();
        if total != self.seen {
            self.seen = total;
            let cause = self.log.snapshot().last.map_or("", |c| c.words());
            self.inner.retried(total, cause);
        }
    }
}

impl Progress for Watched<'_> {
    fn phase(&mut self, name: &str) {
        self.catch_up();
        self.inner.phase(name);
    }
    fn total(&mut self, bytes: u64) {
        self.inner.total(bytes);
        self.catch_up();
    }
    fn advance(&mut self, bytes: u64) {
        self.catch_up();
        self.inner.advance(bytes);
    }
    fn info(&mut self, line: &str) {
        self.catch_up();
        self.inner.info(line);
    }
    fn debug(&mut self, line: &str) {
        self.catch_up();
        self.inner.debug(line);
    }
    fn retried(&mut self, total: u64, cause: &str) {
        self.inner.retried(total, cause);
    }
}

fn run(
    opts: &RewindOptions,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
    report: &mut RewindReport,
    t0: Instant,
) -> Result<Outcome, RewindError> {
    let checked = match check::check(opts, source, progress)? {
        check::Checks::AlreadyRewound(dir) => {
            progress.info(&format!(
                "{} was already rewound and has not been started since (its control file is the \
                 source's, or says \"in archive recovery\" beside a backup_label a rewind \
                 wrote): there is nothing to rewind; start it as a standby of the new primary",
                dir.display()
            ));
            report.already_rewound = true;
            report.seconds.checks = t0.elapsed().as_secs_f64();
            return Ok(Outcome {
                report: std::mem::take(report),
                plan: None,
            });
        }
        check::Checks::Checked(c) => *c,
    };
    let journaled = match checked.resume.clone() {
        Some(mut state) => {
            let (header, replanned) =
                plan::resumed(opts, &checked, &mut state, source, progress, report)?;
            report.resumed = true;
            report.seconds.checks = t0.elapsed().as_secs_f64();
            if opts.dry_run {
                checked
                    .target
                    .preflight(&header.plan)
                    .doing("the target data directory cannot be changed as the rewind needs")?;
                progress.info("dry run: the target was not changed");
                return Ok(Outcome {
                    report: std::mem::take(report),
                    plan: Some(header.plan),
                });
            }
            Journaled::take_up(checked, header, state, replanned)?
        }
        None => match plan::plan(opts, &checked, source, progress, report, t0)? {
            plan::Planned::NothingToRewind => {
                progress.info("no rewind required");
                let mut target = checked.target;
                if let Some(conninfo) = &checked.conninfo
                    && !opts.dry_run
                {
                    target
                        .write_recovery_conf(conninfo)
                        .doing("could not write the recovery configuration")?;
                }
                report.seconds.checks = t0.elapsed().as_secs_f64();
                return Ok(Outcome {
                    report: std::mem::take(report),
                    plan: None,
                });
            }
            plan::Planned::Plan(header) => {
                checked
                    .target
                    .preflight(&header.plan)
                    .doing("the target data directory cannot be changed as the rewind needs")?;
                if opts.dry_run {
                    progress.info("dry run: the target was not changed");
                    return Ok(Outcome {
                        report: std::mem::take(report),
                        plan: Some(header.plan),
                    });
                }
                Journaled::begin(checked, *header)?
            }
        },
    };
    let copied = journaled.copy(source, progress, report)?;
    commit::commit(opts, copied, source, progress, report)
}

/// A plan made durable in the target, which is marked unfinished until the commit's end.
pub(crate) struct Journaled {
    checked: check::Checked,
    header: JournalHeader,
    /// What an interrupted run recorded as done, when this run resumes it.
    done: Option<JournalState>,
}

impl Journaled {
    /// The point of no return of a fresh run: the journal and the marker, so that from the
    /// first change on, the target can neither be started nor lose its plan.
    fn begin(mut checked: check::Checked, header: JournalHeader) -> Result<Journaled, RewindError> {
        checked
            .target
            .begin(header.clone())
            .doing("could not record the rewind's plan in the target")?;
        Ok(Journaled {
            checked,
            header,
            done: None,
        })
    }

    /// An earlier run's journal, taken up where it stopped; with a plan made again
    /// (`replanned`), the journal is written anew: the new plan, and what still stands of what
    /// the earlier run recorded as done.
    fn take_up(
        mut checked: check::Checked,
        header: JournalHeader,
        state: JournalState,
        replanned: bool,
    ) -> Result<Journaled, RewindError> {
        if replanned {
            checked
                .target
                .restart(header.clone(), &state.done)
                .doing("could not record the rewind's new plan in the target")?;
        } else {
            checked
                .target
                .take_up(&state)
                .doing("could not take up the unfinished rewind's journal")?;
        }
        Ok(Journaled {
            checked,
            header,
            done: Some(state),
        })
    }

    /// Carries the plan out.
    fn copy(
        mut self,
        source: &mut dyn Source,
        progress: &mut dyn Progress,
        report: &mut RewindReport,
    ) -> Result<Copied, RewindError> {
        let t = Instant::now();
        progress.phase("copying");
        // What the source lacks goes meanwhile; the commit waits for it before it syncs.
        let removing = self.checked.target.start_removing(&self.header.plan);
        let stats = copy::copy(
            &self.header.plan,
            &mut self.checked.target,
            source,
            progress,
            self.done.as_ref(),
        )
        .doing("could not carry out the rewind plan")?;
        report.execution = Some(CopyStats {
            bytes_fetched_ahead: source.fetched_ahead(),
            ..stats
        });
        report.compression = source.compression();
        report.seconds.copy = t.elapsed().as_secs_f64();
        Ok(Copied {
            journaled: self,
            removing,
        })
    }
}

/// A target whose plan is carried out, not yet committed: but for the removals, which may
/// still be running.
pub(crate) struct Copied {
    journaled: Journaled,
    removing: crate::target::Removing,
}
