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

#[cfg(test)]
mod tests {
    use super::*;
    use failback_common::Lsn;
    use failback_common::plan::Plan;
    use failback_tests::tmpfs::Tmpfs;

    fn header() -> JournalHeader {
        JournalHeader {
            system_identifier: 7,
            pg_major: 16,
            divergence: Lsn(0x4000000),
            divergence_tli: 1,
            checkpoint: Lsn(0x3000060),
            checkpoint_redo: Lsn(0x3000028),
            checkpoint_tli: 1,
            source_tli: 2,
            plan: Plan {
                entries: Vec::new(),
                block_size: 8192,
            },
        }
    }

    fn small_disk(base: &tempfile::TempDir) -> Tmpfs {
        Tmpfs::mount(&base.path().join("disk"), 1 << 20).unwrap_or_else(|e| panic!("{e}"))
    }

    fn full_error(e: UnfinishedError) -> fsutil::TargetFull {
        match e {
            UnfinishedError::TargetFull(f) => f,
            e => panic!("not a full disk: {e}"),
        }
    }

    // The journal or the marker cannot be written: the target is left as it was, and the
    // error says so.
    #[test]
    fn a_disk_too_full_to_begin_changes_nothing() {
        // No room for the journal; then room for the journal, not for the marker.
        for free in [0, 4096] {
            let base = tempfile::tempdir().unwrap();
            let disk = small_disk(&base);
            let own = Ownership::of_data_dir(disk.path()).unwrap();
            let auto = disk.path().join("postgresql.auto.conf");
            std::fs::write(&auto, "# Do not edit this file manually!\n").unwrap();
            disk.fill_leaving("ballast", free);
            let full = full_error(begin(disk.path(), header(), &own).unwrap_err());
            assert!(full.nothing_changed, "{free}: {full}");
            assert!(full.to_string().contains("nothing was changed"), "{full}");
            let mut names: Vec<String> = std::fs::read_dir(disk.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names, ["ballast", "postgresql.auto.conf"], "{free}");
            assert_eq!(
                std::fs::read_to_string(&auto).unwrap(),
                "# Do not edit this file manually!\n"
            );
        }
    }

    // An append cut short by a full disk leaves a torn frame: replay drops it and keeps what
    // the journal said before; a resumed run cuts it off, and what it appends is read again.
    #[test]
    fn a_journal_append_torn_by_a_full_disk_is_dropped_then_cut_off() {
        let base = tempfile::tempdir().unwrap();
        let disk = small_disk(&base);
        let target = disk.path();
        let own = Ownership::of_data_dir(target).unwrap();
        begin(target, header(), &own).unwrap();
        let data = target.join("16384");
        std::fs::write(&data, [0u8; 8192]).unwrap();
        let mut rec = Recorder::open(target).unwrap();
        rec.note("base/5/16384", &data, 0, 8192).unwrap();
        rec.flush().unwrap();
        let before = load(target).unwrap().unwrap();
        assert_eq!(before.done_bytes(), 8192);

        // Far more frames than the journal's last page holds, with no page left to grow into.
        let ballast = disk.fill_leaving("ballast", 0);
        for i in 1..400u64 {
            rec.note("base/5/16384", &data, i * 8192, 8192).unwrap();
        }
        let full = match rec.flush().unwrap_err() {
            UnfinishedError::TargetFull(f) => f,
            e => panic!("not a full disk: {e}"),
        };
        assert!(full.path.ends_with(JOURNAL_FILE), "{full}");
        let torn = load(target).unwrap().unwrap();
        assert!(torn.torn_tail, "the append was not cut short");
        assert!(torn.done_bytes() >= before.done_bytes());
        assert_eq!(torn.phase, Phase::Copying);

        std::fs::remove_file(ballast).unwrap();
        drop_torn_tail(target, &torn).unwrap();
        let mut rec = Recorder::open(target).unwrap();
        rec.note("base/5/16384", &data, 1 << 30, 8192).unwrap();
        rec.flush().unwrap();
        record(target, Phase::Copied).unwrap();
        let after = load(target).unwrap().unwrap();
        assert!(!after.torn_tail);
        assert_eq!(after.phase, Phase::Copied);
        assert!(after.is_done("base/5/16384", 1 << 30, 8192));
        assert_eq!(after.done_bytes(), torn.done_bytes() + 8192);
    }
}
