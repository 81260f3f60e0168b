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

use crate::fsutil::{self, Ownership};

/// The setting that keeps PostgreSQL from starting while a rewind is unfinished.
pub const MARKER: &str = "failback_unfinished_rewind";

const MARKER_VALUE: &str = "this data directory is being rewound by failback: run failback rewind \
                            again to finish (failback status -D says how far it got)";

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum UnfinishedError {
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

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UnfinishedError {
    let path = path.to_path_buf();
    move |source| UnfinishedError::Io { what, path, source }
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
pub fn begin(target: &Path, header: JournalHeader, own: &Ownership) -> Result<(), UnfinishedError> {
    let path = target.join(JOURNAL_FILE);
    let mut bytes = journal::magic().to_vec();
    bytes.extend(journal::encode(&Record::Begin(Box::new(header))));
    fsutil::durable_write(&path, &bytes, own).map_err(io("write", &path))?;
    let auto = target.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).unwrap_or_default();
    let marked = recovery::set_auto_conf(&text, MARKER, MARKER_VALUE);
    fsutil::durable_write(&auto, marked.as_bytes(), own).map_err(io("write", &auto))
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
    let path = target.join(JOURNAL_FILE);
    fsutil::durable_remove(&path).map_err(io("remove", &path))
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
