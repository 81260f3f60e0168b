//! An unfinished rewind, on disk: the journal and the marker.
//!
//! Before its first change to the target, failback writes the plan and what the commit needs to
//! the journal ([`failback_common::journal`], `failback.journal` in the data directory) and adds
//! to `postgresql.auto.conf` a setting PostgreSQL does not know, [`MARKER`]. A postmaster refuses
//! to start on an unknown setting in its configuration ("unrecognized configuration parameter
//! "failback_unfinished_rewind" in file ".../postgresql.auto.conf""), so a half-rewound target
//! cannot be started by mistake, and the message names what to run. The plan leaves
//! `postgresql.auto.conf` alone during the copy; its final content (the source's, with `-R`'s
//! `primary_conninfo`) replaces it in one durable rename at the end of the commit, which is what
//! removes the marker; then the journal goes.
//!
//! Run again on such a target, failback finds the journal and resumes: the plan comes from the
//! journal, not from the target's WAL, which the copy may already have replaced.

use std::io::Write;
use std::path::Path;

use failback_common::journal::{self, JOURNAL_FILE, JournalHeader, JournalState, Phase, Record};
use failback_common::recovery;

use crate::fault::{self, Point};
use crate::fsutil::{self, Ownership};

/// The setting that keeps PostgreSQL from starting while a rewind is unfinished.
pub const MARKER: &str = "failback_unfinished_rewind";

const MARKER_VALUE: &str = "this data directory is being rewound by failback: run failback rewind \
                            again to finish (failback status -D says how far it got)";

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum UnfinishedError {
    /// The target's file system filled up while the journal or the marker was written.
    #[error(transparent)]
    TargetFull(#[from] fsutil::TargetFull),
    #[error("could not {what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is damaged, so the unfinished rewind it describes cannot be resumed; restore the \
         data directory from a backup or clone it anew",
        path.display()
    )]
    Damaged {
        path: std::path::PathBuf,
        #[source]
        source: journal::JournalError,
    },
}

impl UnfinishedError {
    /// A full file system met before the rewind's first change: the target is as it was.
    fn before_first_change(self, plan_bytes: u64) -> UnfinishedError {
        match self {
            UnfinishedError::TargetFull(f) => {
                UnfinishedError::TargetFull(f.before_first_change().needing(plan_bytes))
            }
            e => e,
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UnfinishedError {
    let path = path.to_path_buf();
    move |source| {
        fsutil::target_error(&path, source, |source| UnfinishedError::Io {
            what,
            path: path.clone(),
            source,
        })
    }
}

/// The journal of an unfinished rewind of `target`, if there is one.
pub fn load(target: &Path) -> Result<Option<JournalState>, UnfinishedError> {
    let path = target.join(JOURNAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &path)(e)),
    };
    journal::replay(&bytes)
        .map(Some)
        .map_err(|source| UnfinishedError::Damaged { path, source })
}

/// Makes the journal durable, then the marker: from here on the target is "being rewound".
/// When either cannot be written, the target is left as it was: a journal without the marker
/// is removed again, so that the next run starts afresh instead of resuming unmarked.
pub fn begin(target: &Path, header: JournalHeader, own: &Ownership) -> Result<(), UnfinishedError> {
    let plan_bytes = header.plan.fetch_bytes();
    let path = target.join(JOURNAL_FILE);
    let mut bytes = journal::magic().to_vec();
    bytes.extend(journal::encode(&Record::Begin(Box::new(header))));
    fsutil::durable_write(&path, &bytes, own)
        .map_err(io("write", &path))
        .map_err(|e| e.before_first_change(plan_bytes))?;
    mark(target, own).map_err(|e| match fsutil::durable_remove(&path) {
        Ok(()) => e.before_first_change(plan_bytes),
        // The journal stays: the next run resumes, and marks the target first.
        Err(_) => e,
    })
}

/// Adds the marker to `postgresql.auto.conf`, unless it is there already. A resumed run calls
/// it too: an earlier run may have stopped between the journal and the marker.
pub fn mark(target: &Path, own: &Ownership) -> Result<(), UnfinishedError> {
    let auto = target.join("postgresql.auto.conf");
    let text = match std::fs::read_to_string(&auto) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io("read", &auto)(e)),
    };
    let marked = recovery::set_auto_conf(&text, MARKER, MARKER_VALUE);
    if marked == text {
        return Ok(());
    }
    fsutil::durable_write(&auto, marked.as_bytes(), own).map_err(io("write", &auto))
}

/// Cuts off the torn last frame an interrupted append left (a crash, or a full disk in the
/// middle of a write), before a resumed run appends: replay stops at the first bad frame, so
/// records appended after it would never be read.
pub fn drop_torn_tail(target: &Path, state: &JournalState) -> Result<(), UnfinishedError> {
    if !state.torn_tail {
        return Ok(());
    }
    let path = target.join(JOURNAL_FILE);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    f.set_len(state.valid_len)
        .and_then(|()| f.sync_all())
        .map_err(io("truncate", &path))
}

/// Appends a phase to the journal, durably.
pub fn record(target: &Path, phase: Phase) -> Result<(), UnfinishedError> {
    let path = target.join(JOURNAL_FILE);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io("open", &path))?;
    f.write_all(&journal::encode(&Record::Phase(phase)))
        .and_then(|()| f.sync_all())
        .map_err(io("append to", &path))
}

/// The end of the commit: `postgresql.auto.conf` becomes `auto_conf` (no marker) in one durable
/// rename, then the journal is removed.
pub fn finish(target: &Path, auto_conf: &str, own: &Ownership) -> Result<(), UnfinishedError> {
    let auto = target.join("postgresql.auto.conf");
    let clean = recovery::drop_auto_conf(auto_conf, MARKER);
    fsutil::durable_write(&auto, clean.as_bytes(), own).map_err(io("write", &auto))?;
    fault::passed(Point::Commit, 1);
    let path = target.join(JOURNAL_FILE);
    fsutil::durable_remove(&path).map_err(io("remove", &path))?;
    fault::passed(Point::Commit, 1);
    Ok(())
}

/// Records, as the copy goes, which bytes are on the target for good: pieces are noted as they
/// are written, and every [`Recorder::FLUSH_BYTES`] the files they went to are fsynced and then
/// the pieces appended to the journal as done. A resumed rewind skips what the journal says is
/// done; a piece is never recorded before it is durable.
pub struct Recorder {
    path: std::path::PathBuf,
    journal: std::fs::File,
    pending: Vec<(String, u64, u64)>,
    pending_bytes: u64,
    files: std::collections::BTreeSet<std::path::PathBuf>,
}

impl Recorder {
    /// Bytes written between two flushes: large enough that the fsyncs cost little, small
    /// enough that a resume re-fetches little.
    pub const FLUSH_BYTES: u64 = 16 << 20;

    pub fn open(target: &Path) -> Result<Recorder, UnfinishedError> {
        let path = target.join(JOURNAL_FILE);
        let journal = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        Ok(Recorder {
            path,
            journal,
            pending: Vec::new(),
            pending_bytes: 0,
            files: Default::default(),
        })
    }

    /// `len` bytes of `path` (at `full`) from `offset` are written; flushes when enough are.
    pub fn note(
        &mut self,
        path: &str,
        full: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), UnfinishedError> {
        self.pending.push((path.to_string(), offset, len));
        self.pending_bytes += len;
        if !self.files.contains(full) {
            self.files.insert(full.to_path_buf());
        }
        if self.pending_bytes >= Self::FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes the noted pieces durable, then records them as done.
    pub fn flush(&mut self) -> Result<(), UnfinishedError> {
        // A file removed since (it vanished on the source) is skipped: nothing of it is
        // recorded below that a resume could trust wrongly, as it will be fetched and found
        // gone again. fsync, not fdatasync: the sync at the end of the rewind fsyncs these
        // files again, and finds nothing left to write.
        let files: Vec<std::path::PathBuf> = std::mem::take(&mut self.files).into_iter().collect();
        fsutil::fsync_files(&files).map_err(|(path, e)| io("fsync", &path)(e))?;
        let mut frames = Vec::new();
        for (path, offset, length) in self.pending.drain(..) {
            frames.extend(journal::encode(&Record::Done {
                path,
                offset,
                length,
            }));
        }
        self.pending_bytes = 0;
        if frames.is_empty() {
            return Ok(());
        }
        self.journal
            .write_all(&frames)
            .and_then(|()| self.journal.sync_data())
            .map_err(io("append to", &self.path))
    }
}
