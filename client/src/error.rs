//! Why a rewind stopped, in the kinds a caller acts on, and the exit status that says so.
//!
//! An orchestrator (Patroni, repmgr, a script) must know from the status alone whether to run
//! failback again: a rewind that stopped after its first change to the target left it marked
//! unfinished, and PostgreSQL will not start on it until a run finishes it; one that stopped
//! before left the target as it was, and running it again helps only once the cause is gone (a
//! source that may come back; a refusal that needs something fixed).

use std::path::PathBuf;

use failback_common::rewind::Incompatible;

use crate::source::SourceError;
use crate::target::{TargetError, TargetFull};
use failback_datadir::wal::WalReadError;

/// The exit statuses of `failback rewind` (and `failback status`, which shares 0 and 3).
pub mod exit {
    /// Done, or nothing to do (no rewind needed; already rewound and not started since).
    pub const DONE: u8 = 0;
    /// Something other than a rewind failed (reading a file for `inspect`, writing the report).
    pub const FAILED: u8 = 1;
    /// The command line is wrong; nothing was looked at or changed.
    pub const USAGE: u8 = 2;
    /// The rewind stopped after its first change: the target is marked unfinished and
    /// PostgreSQL will not start on it. Run `failback rewind` again (once what the message
    /// names is fixed) to finish it.
    pub const UNFINISHED: u8 = 3;
    /// Refused, the target untouched: the rewind cannot be done as things are (a running
    /// target, clusters that do not belong together, missing WAL, a full or read-only disk…).
    /// Fix what the message says, or clone the node anew.
    pub const REFUSED: u8 = 4;
    /// The source did not answer, or made no progress within `--timeout`, before anything
    /// changed: the target is untouched, and a later run may succeed.
    pub const SOURCE_UNAVAILABLE: u8 = 5;
}

/// What a caller can do about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The request itself is wrong.
    Usage,
    /// Refused with the target untouched; something must be fixed first.
    Refused,
    /// The source failed in a way that may heal; the target is untouched.
    SourceUnavailable,
    /// The target's file system is full, met before the first change: the target is untouched;
    /// free space on it and run again. (Met after the first change, the rewind is
    /// [`Kind::Unfinished`], and [`RewindError::target_full`] still finds it.)
    TargetFull,
    /// Stopped after the first change; running again resumes.
    Unfinished,
}

impl Kind {
    /// The exit status that says this kind ([`exit`]).
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Usage => exit::USAGE,
            Kind::Refused | Kind::TargetFull => exit::REFUSED,
            Kind::SourceUnavailable => exit::SOURCE_UNAVAILABLE,
            Kind::Unfinished => exit::UNFINISHED,
        }
    }
}

/// Why a rewind stopped.
#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    /// Options that do not make a rewind.
    #[error("{0}")]
    Usage(String),
    /// The two clusters cannot be rewound into each other.
    #[error(transparent)]
    Incompatible(#[from] Incompatible),
    /// PostgreSQL runs on the target.
    #[error(
        "target server is running (postmaster PID {pid}); stop it cleanly with `pg_ctl stop -D \
         {}` and run failback again — nothing was changed",
        target.display()
    )]
    TargetRunning { pid: i32, target: PathBuf },
    /// Any other refusal, in words.
    #[error("{message}")]
    Refused {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The source could not answer `doing`.
    #[error("{doing}")]
    Source {
        doing: String,
        #[source]
        source: SourceError,
    },
    /// The target's WAL could not be read (the cause names the LSN).
    #[error("{doing}")]
    Wal {
        doing: String,
        #[source]
        source: WalReadError,
    },
    /// Reading or changing the target failed (the cause names the path and offset).
    #[error("{doing}")]
    Target {
        doing: String,
        #[source]
        source: TargetError,
    },
    /// The rewind stopped after its first change to the target.
    #[error(
        "the rewind of {} stopped before it finished; PostgreSQL will not start on it until it \
         is: run failback rewind again, from the same new primary, to resume where it stopped",
        target.display()
    )]
    Unfinished {
        target: PathBuf,
        #[source]
        cause: Box<RewindError>,
    },
}

impl RewindError {
    pub fn refused(message: impl Into<String>) -> RewindError {
        RewindError::Refused {
            message: message.into(),
            source: None,
        }
    }

    /// What a caller can do about it.
    pub fn kind(&self) -> Kind {
        match self {
            RewindError::Usage(_) => Kind::Usage,
            RewindError::Unfinished { .. } => Kind::Unfinished,
            RewindError::Source { source, .. } if source.is_retryable() => Kind::SourceUnavailable,
            RewindError::Target { source, .. } if source.full().is_some() => Kind::TargetFull,
            _ => Kind::Refused,
        }
    }

    /// The target's file system is full (or the quota used up), if that is why the rewind
    /// stopped.
    pub fn target_full(&self) -> Option<&TargetFull> {
        match self {
            RewindError::Target { source, .. } => source.full(),
            RewindError::Unfinished { cause, .. } => cause.target_full(),
            _ => None,
        }
    }
}

/// `map_err` helpers that say what was being done.
pub(crate) trait Doing<T> {
    fn doing(self, what: impl Into<String>) -> Result<T, RewindError>;
}

impl<T> Doing<T> for Result<T, SourceError> {
    fn doing(self, what: impl Into<String>) -> Result<T, RewindError> {
        self.map_err(|source| RewindError::Source {
            doing: what.into(),
            source,
        })
    }
}

impl<T> Doing<T> for Result<T, TargetError> {
    fn doing(self, what: impl Into<String>) -> Result<T, RewindError> {
        self.map_err(|source| RewindError::Target {
            doing: what.into(),
            source,
        })
    }
}

impl<T> Doing<T> for Result<T, WalReadError> {
    fn doing(self, what: impl Into<String>) -> Result<T, RewindError> {
        self.map_err(|source| RewindError::Wal {
            doing: what.into(),
            source,
        })
    }
}

impl<T> Doing<T> for Result<T, crate::copy::CopyError> {
    fn doing(self, what: impl Into<String>) -> Result<T, RewindError> {
        match self {
            Ok(v) => Ok(v),
            Err(crate::copy::CopyError::Source(e)) => Err(e).doing(what),
            Err(crate::copy::CopyError::Target(e)) => Err(e).doing(what),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_say_whether_to_run_again() {
        let stalled = SourceError::Stalled {
            stalled: std::time::Duration::from_secs(60),
            attempts: 3,
            timeout: std::time::Duration::from_secs(60),
            last: Box::new(SourceError::Transport("reset".into())),
        };
        let e: Result<(), _> = Err(stalled);
        let e = e
            .doing("could not read the source's control file")
            .unwrap_err();
        assert_eq!(e.kind(), Kind::SourceUnavailable);
        let refused: Result<(), _> = Err(SourceError::Refused {
            what: "x".into(),
            reason: "missing or wrong bearer token".into(),
        });
        assert_eq!(refused.doing("x").unwrap_err().kind(), Kind::Refused);
        let unfinished = RewindError::Unfinished {
            target: "/data".into(),
            cause: Box::new(e),
        };
        assert_eq!(unfinished.kind(), Kind::Unfinished);
        assert_eq!(RewindError::Usage("x".into()).kind(), Kind::Usage);
        let full: Result<(), _> = Err(crate::target::TargetError::Full(TargetFull {
            path: "/data/failback.journal".into(),
            still_needed: Some(1),
            nothing_changed: true,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }));
        let full = full
            .doing("could not record the rewind's plan")
            .unwrap_err();
        assert_eq!(full.kind(), Kind::TargetFull);
        assert_eq!(full.kind().exit_code(), exit::REFUSED);
        assert!(full.target_full().is_some_and(|f| f.nothing_changed));
        let codes: Vec<u8> = [
            Kind::Usage,
            Kind::Unfinished,
            Kind::Refused,
            Kind::SourceUnavailable,
        ]
        .iter()
        .map(|k| k.exit_code())
        .collect();
        assert_eq!(codes, [2, 3, 4, 5]);
    }
}
