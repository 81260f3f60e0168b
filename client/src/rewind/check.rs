//! Phase 1: everything checked before anything is planned or changed.
//!
//! Everything that does not depend on the target's state is checked before crash recovery,
//! which is the first thing that may change the target (PostgreSQL's own recovery, which leaves
//! it shut down cleanly); everything else before the journal, the first change of failback's.

use std::path::{Path, PathBuf};

use failback_common::control::ControlFileData;
use failback_common::journal::JournalState;
use failback_common::rewind::{already_rewound, check_pair, check_target_state};
use failback_datadir::postmaster::running_postmaster;

use super::RewindOptions;
use crate::error::{Doing, RewindError};
use crate::pgbin::PgBin;
use crate::progress::Progress;
use crate::source::{Source, SourceEnd};
use crate::target::Target;
use failback_datadir::wal::RestoreCommand;

/// What the checks found: the two clusters, and how to go on.
pub(crate) struct Checked {
    pub target: Target,
    pub target_control: ControlFileData,
    pub source_control: ControlFileData,
    /// The source's control file as read now: a shut-down source must not change.
    pub source_control_bytes: Vec<u8>,
    /// A live source's end of WAL when the run began.
    pub live_start: Option<SourceEnd>,
    /// `-R`'s `primary_conninfo`, when `-R` is given.
    pub conninfo: Option<String>,
    /// `-c`: the target's restore_command.
    pub restore: Option<RestoreCommand>,
    /// The journal of an unfinished rewind this run resumes.
    pub resume: Option<JournalState>,
}

pub(crate) enum Checks {
    Checked(Box<Checked>),
    /// A finished rewind not started since: there is nothing to do.
    AlreadyRewound(PathBuf),
}

pub(crate) fn check(
    opts: &RewindOptions,
    source: &mut dyn Source,
    progress: &mut dyn Progress,
) -> Result<Checks, RewindError> {
    let dir = &opts.target;
    // -R's conninfo, before anything is read: given, or what the source says (failbackd knows
    // where its server listens).
    let conninfo = match (opts.write_recovery_conf, &opts.primary_conninfo) {
        (false, _) => None,
        (true, Some(c)) => Some(c.clone()),
        (true, None) => Some(source.primary_conninfo().ok_or_else(|| {
            RewindError::Usage(
                "-R needs --primary-conninfo: a local source does not say how the target \
                 reaches the new primary"
                    .into(),
            )
        })?),
    };
    let target = Target::open(dir).doing(format!(
        "could not access target data directory \"{}\"",
        dir.display()
    ))?;
    // A target with a live postmaster must not be touched: its files change under us, and it
    // would overwrite what we write.
    if let Some(pid) = running_postmaster(dir) {
        return Err(RewindError::TargetRunning {
            pid,
            target: dir.clone(),
        });
    }
    let own = *target.ownership();
    let pg = PgBin::new(
        opts.pg_bindir.clone(),
        own.chown.then_some((own.uid, own.gid)),
    );
    let restore = if opts.restore_target_wal {
        Some(RestoreCommand {
            command: pg.restore_command(dir, opts.config_file.as_deref())?,
            run_as: own.chown.then_some((own.uid, own.gid)),
        })
    } else {
        None
    };

    let mut target_control = read_target_control(dir)?;
    let source_control_bytes = source
        .control_file()
        .doing("could not read the source's control file")?;
    let source_control =
        ControlFileData::parse(&source_control_bytes).map_err(|e| RewindError::Refused {
            message: format!("source control file ({})", source.describe()),
            source: Some(Box::new(e)),
        })?;
    check_pair(&source_control, &target_control, source.is_live())?;
    // A live source must be able to say where its WAL ends, or the rewound target could call
    // itself consistent before it has replayed what the copy saw: ask now, before anything
    // changes, so a source that cannot answer is refused with the target untouched.
    let live_start = if source.is_live() {
        let end = source
            .end_of_wal()
            .doing(
                "could not learn where the running source server's WAL ends, which a rewind \
                 from a running server needs (failbackd serves one only with --pg-conn)",
            )?
            .ok_or_else(|| {
                RewindError::refused(
                    "the source server is running, but the source does not say where its WAL \
                     ends",
                )
            })?;
        progress.debug(&format!(
            "source is live: its WAL ends at {} on timeline {}",
            end.lsn, end.tli
        ));
        Some(end)
    } else {
        None
    };
    // An earlier run that stopped half-way left its journal: finish what it planned.
    let resume = Target::unfinished(dir)
        .doing("an earlier rewind of this data directory was left unfinished")?;
    if let Some(st) = &resume {
        if st.header.system_identifier != source_control.system_identifier {
            return Err(RewindError::refused(format!(
                "an unfinished rewind of this data directory came from database system {}, but \
                 the source is system {}: resume it from the same new primary",
                st.header.system_identifier, source_control.system_identifier
            )));
        }
        progress.info(&format!(
            "resuming an unfinished rewind (it got as far as: {})",
            st.phase.name()
        ));
    } else {
        // A copy of a shut-down source carries its control file as it is; one made in a
        // backup window, the window's label.
        let label = std::fs::read_to_string(dir.join("backup_label")).ok();
        let same_control =
            std::fs::read(dir.join("global/pg_control")).is_ok_and(|b| b == source_control_bytes);
        // A resync is asked for because the target is not what it should be: always done.
        if !opts.resync && (same_control || already_rewound(&target_control, label.as_deref())) {
            return Ok(Checks::AlreadyRewound(dir.clone()));
        }
        if !target_control.state.is_shut_down_cleanly() {
            if opts.no_ensure_shutdown {
                return Err(RewindError::refused(format!(
                    "target server must be shut down cleanly (its state is \"{}\"); start and \
                     stop it cleanly, or run again without --no-ensure-shutdown to let failback \
                     run crash recovery",
                    target_control.state
                )));
            }
            // Found (and said) before anything runs, in a dry run too, as pg_rewind does.
            let postgres = pg.find(dir, Some(target_control.major), "crash recovery")?;
            progress.info(&format!(
                "executing \"{}\" for target server to complete crash recovery",
                postgres.display()
            ));
            if !opts.dry_run {
                pg.single_user_recovery(&postgres, dir, opts.config_file.as_deref())?;
                target_control = read_target_control(dir)?;
            }
        }
        check_pair(&source_control, &target_control, source.is_live())?;
        // A dry run skipped crash recovery: the state is what it was.
        if !opts.dry_run {
            check_target_state(&target_control)?;
        }
    }
    Ok(Checks::Checked(Box::new(Checked {
        target,
        target_control,
        source_control,
        source_control_bytes,
        live_start,
        conninfo,
        restore,
        resume,
    })))
}

fn read_target_control(dir: &Path) -> Result<ControlFileData, RewindError> {
    let path = dir.join("global/pg_control");
    let bytes = std::fs::read(&path).map_err(|e| RewindError::Refused {
        message: format!("could not read target control file {}", path.display()),
        source: Some(Box::new(e)),
    })?;
    ControlFileData::parse(&bytes).map_err(|e| RewindError::Refused {
        message: format!("target control file {}", path.display()),
        source: Some(Box::new(e)),
    })
}
