//! The target data directory, and every change a rewind makes to it.
//!
//! A rewind overwrites an old primary's files with the new primary's. PostgreSQL trusts what is
//! on disk after a crash only if it was fsynced, and it starts on whatever directory it is given:
//! a rewind that stops half-way must neither lose its way nor leave a directory PostgreSQL would
//! start on. Every change to the target goes through [`Target`], so the argument that it is
//! crash-safe reads top to bottom here:
//!
//! 1. Before the first change, [`Target::begin`] makes the plan durable in the journal
//!    ([`failback_common::journal`], `failback.journal`), then adds to `postgresql.auto.conf` a
//!    setting PostgreSQL does not know ([`MARKER`]): a postmaster refuses to start on an unknown
//!    setting ("unrecognized configuration parameter "failback_unfinished_rewind""), so from
//!    here on the target can neither be started by mistake nor lose its plan. When either
//!    cannot be written, the target is left as it was.
//! 2. The copy ([`Target::write`] and the other changes the plan names) notes each piece it
//!    writes; every [`FLUSH_BYTES`] the files those pieces went to are fsynced and only then the
//!    pieces are recorded in the journal as done. A resumed rewind skips what the journal
//!    records, and a piece is never recorded before it is durable.
//! 3. [`Target::sync`] flushes everything the run changed; the journal then says "copied".
//! 4. The commit: `backup_label` and `global/pg_control` are replaced, each through a temporary
//!    file and a durable rename (so a crash or a full disk never leaves half of one); the
//!    journal says "committed"; `standby.signal` with `-R`; then [`Target::finish`] replaces
//!    `postgresql.auto.conf` (the source's, with `-R`'s `primary_conninfo`) in one durable
//!    rename, which removes the marker, and the journal goes.
//!
//! Killed at any point before the last step, the target keeps the marker; run again, failback
//! finds the journal and resumes ([`Target::take_up`]). A full file system (`ENOSPC`, or
//! `EDQUOT` for a quota) is one error, [`TargetFull`], wherever it is met.
//!
//! The target belongs to the OS user that runs PostgreSQL: run as root, failback leaves every
//! file it creates owned by that user with the directory's modes ([`Ownership`]).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use failback_common::filemap::{FileAction, FileType};
use failback_common::journal::{self, JOURNAL_FILE, JournalHeader, JournalState, Phase, Record};
use failback_common::lsn::{TimeLineId, XLogSegNo, parse_wal_file_name, wal_file_name};
use failback_common::plan::{Plan, Reason};
use failback_common::recovery;
use failback_common::rewind::first_recycled_segment;
use failback_datadir::read_full_at;

use crate::fault::{self, Point};
use crate::fsutil::{self, Ownership, SyncMethod};

/// The setting that keeps PostgreSQL from starting while a rewind is unfinished.
pub const MARKER: &str = "failback_unfinished_rewind";

const MARKER_VALUE: &str = "this data directory is being rewound by failback: run failback rewind \
                            again to finish (failback status -D says how far it got)";

/// Bytes written between two flushes of the journal's done records: large enough that the
/// fsyncs cost little, small enough that a resume re-fetches little.
pub const FLUSH_BYTES: u64 = 16 << 20;

/// Open write handles kept at once by the copy.
const OPEN_FILES: usize = 64;

/// The target's file system has no room left (`ENOSPC`), or the quota of the user writing is
/// used up (`EDQUOT`). Trying the same write again cannot help, so nothing retries it: the
/// rewind stops, and once space is freed, running it again resumes from the journal — what
/// was written and recorded as done is not fetched again.
#[derive(Debug, thiserror::Error)]
#[error(
    "the target's file system is full while writing \"{}\"{}{}",
    path.display(),
    still_needed.map_or(String::new(), |n| format!(
        " (the rest of the rewind writes up to {} MB)",
        n.div_ceil(1_000_000)
    )),
    if *nothing_changed {
        "; nothing was changed in the target: free space on it, then run failback rewind again"
    } else {
        ": free space on it, then run failback rewind again: it resumes where this run stopped"
    }
)]
pub struct TargetFull {
    /// The file being written (for an atomic rewrite, the name it replaces).
    pub path: PathBuf,
    /// Bytes the rest of the plan may still write, when known: an upper bound, as pieces
    /// found identical on the target are not written, and rewrites in place take no new room.
    pub still_needed: Option<u64>,
    /// It happened before the journal existed: the target is as it was before this run.
    pub nothing_changed: bool,
    #[source]
    pub source: io::Error,
}

impl TargetFull {
    /// Whether `err` says the file system is full or the quota used up.
    pub fn is_full(err: &io::Error) -> bool {
        matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            || matches!(
                err.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            )
    }
}

/// Why a change to the target failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The file system filled up: the one error for it, wherever it was met.
    #[error(transparent)]
    Full(#[from] TargetFull),
    #[error("could not {op} \"{}\"{}", path.display(), offset.map_or(String::new(), |o| format!(" at offset {o}")))]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: Option<u64>,
        #[source]
        source: io::Error,
    },
    #[error(
        "the rewind must change \"{}\" in the target data directory, but it cannot be written \
         (check its permissions, its owner, `lsattr` for the immutable flag, and whether the file \
         system is mounted read-only); the plan was not started",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is damaged, so the unfinished rewind it describes cannot be resumed; restore the \
         data directory from a backup or clone it anew",
        path.display()
    )]
    Damaged {
        path: PathBuf,
        #[source]
        source: journal::JournalError,
    },
}

impl TargetError {
    /// The one mapping of an I/O error on `path`: a full file system becomes [`TargetFull`].
    pub(crate) fn io(
        op: &'static str,
        path: &Path,
        offset: Option<u64>,
        source: io::Error,
    ) -> TargetError {
        if TargetFull::is_full(&source) {
            TargetError::Full(TargetFull {
                path: path.to_path_buf(),
                still_needed: None,
                nothing_changed: false,
                source,
            })
        } else {
            TargetError::Io {
                op,
                path: path.to_path_buf(),
                offset,
                source,
            }
        }
    }

    /// The target's file system is full, if that is what this error says.
    pub fn full(&self) -> Option<&TargetFull> {
        match self {
            TargetError::Full(f) => Some(f),
            _ => None,
        }
    }

    /// Says, of a full file system, how much the rest of the plan may still write (unless that
    /// is already said).
    pub fn needing(mut self, bytes: u64) -> TargetError {
        if let TargetError::Full(f) = &mut self {
            f.still_needed.get_or_insert(bytes);
        }
        self
    }

    /// Marks a full file system as met before the rewind's first change.
    fn before_first_change(mut self) -> TargetError {
        if let TargetError::Full(f) = &mut self {
            f.nothing_changed = true;
        }
        self
    }
}

/// What [`Target::write`] did with a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The bytes were written.
    Written,
    /// The target held these very bytes already; nothing was written.
    Identical,
    /// The bytes were all zeros: the range was allocated as zeros instead ([`zero_range`]),
    /// with no data written.
    Zeroed,
}

/// The journal of a rewind in progress, and the pieces written since it was last flushed.
struct Journal {
    path: PathBuf,
    file: File,
    pending: Vec<(String, u64, u64)>,
    pending_bytes: u64,
    files: BTreeSet<PathBuf>,
}

/// The data directory being rewound, and the one way to change it.
pub struct Target {
    dir: PathBuf,
    own: Ownership,
    /// Open once the rewind has begun (or been taken up again); the copy's pieces are recorded
    /// in it.
    journal: Option<Journal>,
    /// The copy's open write handles, by path.
    files: HashMap<String, File>,
    compare: Vec<u8>,
    /// Every regular file whose bytes or length this run changed: what the sync makes durable.
    changed: BTreeSet<String>,
    /// Where the source said each file ended, the shortest of what it said this run.
    ended: HashMap<String, u64>,
}

impl Target {
    /// The data directory `dir`, with its owner and modes.
    pub fn open(dir: &Path) -> Result<Target, TargetError> {
        let own =
            Ownership::of_data_dir(dir).map_err(|e| TargetError::io("access", dir, None, e))?;
        Ok(Target {
            dir: dir.to_path_buf(),
            own,
            journal: None,
            files: HashMap::new(),
            compare: Vec::new(),
            changed: BTreeSet::new(),
            ended: HashMap::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ownership(&self) -> &Ownership {
        &self.own
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The journal of an unfinished rewind of `dir`, if there is one. Reads only.
    pub fn unfinished(dir: &Path) -> Result<Option<JournalState>, TargetError> {
        let path = dir.join(JOURNAL_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TargetError::io("read", &path, None, e)),
        };
        journal::replay(&bytes)
            .map(Some)
            .map_err(|source| TargetError::Damaged { path, source })
    }

    /// Checks, before anything is changed, that every file the plan writes and every directory
    /// it creates or removes entries in can be written (`access(W_OK)`, which also sees the
    /// immutable flag and read-only mounts, even for root). A rewind that stopped half-way on
    /// an unwritable file would leave the target neither old nor new.
    ///
    /// One `access` a path, a missing one skipped by its answer: a resync's plan names every
    /// relation file of the cluster. The plan names each file once, so only directories need
    /// their duplicates dropped.
    pub fn preflight(&self, plan: &Plan) -> Result<(), TargetError> {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
        // The commit writes backup_label and global/pg_control through temporary files.
        dirs.insert(self.dir.clone());
        dirs.insert(self.path("global"));
        for e in &plan.entries {
            let path = self.path(&e.path);
            let parent = path.parent().unwrap_or(&self.dir).to_path_buf();
            let writes_in_place = !e.blocks.is_empty()
                || match e.action {
                    FileAction::Copy => e.target.is_some(),
                    FileAction::CopyTail | FileAction::Truncate => true,
                    _ => false,
                };
            if writes_in_place {
                files.push(path);
            }
            if matches!(e.action, FileAction::Create | FileAction::Remove)
                || (e.action == FileAction::Copy && e.target.is_none())
            {
                dirs.insert(parent);
            }
        }
        // A directory the plan creates does not exist yet; its parent is checked instead.
        for p in files.iter().chain(dirs.iter()) {
            let not_writable = |source| TargetError::NotWritable {
                path: p.clone(),
                source,
            };
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
                not_writable(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "path holds a NUL byte",
                ))
            })?;
            // SAFETY: `c` is a NUL-terminated path that lives across the call.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
                let e = io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) {
                    return Err(not_writable(e));
                }
            }
        }
        Ok(())
    }

    // ---- the point of no return ----

    /// Makes the journal durable, then the marker: from here on the target is "being
    /// rewound". When either cannot be written, the target is left as it was: a journal
    /// without the marker is removed again, so that the next run starts afresh instead of
    /// resuming unmarked.
    pub fn begin(&mut self, header: JournalHeader) -> Result<(), TargetError> {
        let plan_bytes = header.plan.fetch_bytes();
        let path = self.path(JOURNAL_FILE);
        let mut bytes = journal::magic().to_vec();
        bytes.extend(journal::encode(&Record::Begin(Box::new(header))));
        fsutil::durable_write(&path, &bytes, &self.own)
            .map_err(|e| TargetError::io("write", &path, None, e))
            .map_err(|e| e.before_first_change().needing(plan_bytes))?;
        if let Err(e) = self.mark() {
            return Err(match fsutil::durable_remove(&path) {
                Ok(()) => e.before_first_change().needing(plan_bytes),
                // The journal stays: the next run resumes, and marks the target first.
                Err(_) => e,
            });
        }
        self.open_journal()
    }

    /// Takes up the unfinished rewind `state` describes: cuts off the torn last frame an
    /// interrupted append left (replay stops at the first bad frame, so records appended after
    /// it would never be read), and marks the target again (an earlier run may have stopped
    /// between the journal and the marker).
    pub fn take_up(&mut self, state: &JournalState) -> Result<(), TargetError> {
        if state.torn_tail {
            let path = self.path(JOURNAL_FILE);
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| TargetError::io("open", &path, None, e))?;
            f.set_len(state.valid_len)
                .and_then(|()| f.sync_all())
                .map_err(|e| TargetError::io("truncate", &path, None, e))?;
        }
        self.mark()?;
        self.open_journal()
    }

    /// Takes up an unfinished rewind with a new plan: the journal is written anew, in one
    /// durable rename, holding `header` and, as done, what of the earlier run still stands
    /// (`done`); the target stays marked.
    pub fn restart(
        &mut self,
        header: JournalHeader,
        done: &std::collections::BTreeMap<String, journal::RangeSet>,
    ) -> Result<(), TargetError> {
        let path = self.path(JOURNAL_FILE);
        let mut bytes = journal::magic().to_vec();
        bytes.extend(journal::encode(&Record::Begin(Box::new(header))));
        for (p, ranges) in done {
            for (offset, length) in ranges.ranges() {
                bytes.extend(journal::encode(&Record::Done {
                    path: p.clone(),
                    offset,
                    length,
                }));
            }
        }
        self.durable_write(&path, &bytes)?;
        self.mark()?;
        self.open_journal()
    }

    /// Adds the marker to `postgresql.auto.conf`, unless it is there already.
    fn mark(&self) -> Result<(), TargetError> {
        let auto = self.path("postgresql.auto.conf");
        let text = match fs::read_to_string(&auto) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TargetError::io("read", &auto, None, e)),
        };
        let marked = recovery::set_auto_conf(&text, MARKER, MARKER_VALUE);
        if marked == text {
            return Ok(());
        }
        self.durable_write(&auto, marked.as_bytes())
    }

    fn open_journal(&mut self) -> Result<(), TargetError> {
        let path = self.path(JOURNAL_FILE);
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TargetError::io("open", &path, None, e))?;
        self.journal = Some(Journal {
            path,
            file,
            pending: Vec::new(),
            pending_bytes: 0,
            files: BTreeSet::new(),
        });
        Ok(())
    }

    // ---- the copy ----

    /// Creates a directory of the plan (an existing one is fine).
    pub fn create_dir(&mut self, rel: &str) -> Result<(), TargetError> {
        let path = self.path(rel);
        self.own
            .create_dir(&path)
            .map_err(|e| TargetError::io("create directory", &path, None, e))
    }

    /// Creates a symlink of the plan (a tablespace link) pointing at `to`.
    pub fn create_symlink(&mut self, rel: &str, to: &str) -> Result<(), TargetError> {
        let path = self.path(rel);
        match std::os::unix::fs::symlink(to, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(TargetError::io("create symlink", &path, None, e)),
        }
        if self.own.chown {
            std::os::unix::fs::lchown(&path, Some(self.own.uid), Some(self.own.gid))
                .map_err(|e| TargetError::io("chown", &path, None, e))?;
        }
        Ok(())
    }

    /// `rel` opened for writing anew, its cached handle dropped: for a change to its length.
    fn reopen(&mut self, rel: &str) -> Result<(PathBuf, File), TargetError> {
        let path = self.path(rel);
        self.files.remove(rel);
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| TargetError::io("open", &path, None, e))?;
        Ok((path, f))
    }

    /// Cuts a file down to `len` bytes, if it is longer.
    pub fn truncate(&mut self, rel: &str, len: u64) -> Result<(), TargetError> {
        let (path, f) = self.reopen(rel)?;
        let now = f
            .metadata()
            .map_err(|e| TargetError::io("stat", &path, None, e))?
            .len();
        if len < now {
            f.set_len(len)
                .map_err(|e| TargetError::io("truncate", &path, Some(len), e))?;
            self.changed.insert(rel.to_string());
        }
        Ok(())
    }

    /// Makes `rel` `len` bytes long, its bytes from `from` zeros, allocated rather than
    /// written where the file system can ([`zero_range`]): the part of a window's last WAL
    /// segment past the page its WAL ends in, which was not fetched.
    pub fn zero_fill(&mut self, rel: &str, from: u64, len: u64) -> Result<(), TargetError> {
        let (path, f) = self.reopen(rel)?;
        if from < len
            && !zero_range(&f, from, len - from)
                .map_err(|e| TargetError::io("allocate", &path, Some(from), e))?
        {
            let zeros = vec![0u8; 1 << 20];
            let mut at = from;
            while at < len {
                let n = (len - at).min(zeros.len() as u64);
                f.write_all_at(&zeros[..n as usize], at)
                    .map_err(|e| TargetError::io("write", &path, Some(at), e))?;
                at += n;
            }
        }
        self.changed.insert(rel.to_string());
        Ok(())
    }

    /// Creates a file the plan copies whole; an existing one is emptied unless `keep` (a
    /// resumed run keeps the part an interrupted run wrote).
    pub fn create_file(&mut self, rel: &str, keep: bool) -> Result<(), TargetError> {
        let path = self.path(rel);
        self.own
            .open_for_write(&path, !keep)
            .map_err(|e| TargetError::io("create", &path, None, e))?;
        self.changed.insert(rel.to_string());
        Ok(())
    }

    /// Writes `data` at `offset` of `rel`; with `compare`, only when the target does not hold
    /// these very bytes already (a whole-file copy of a file that is mostly the same). The piece
    /// is noted for the journal either way: it is on the target.
    pub fn write(
        &mut self,
        rel: &str,
        offset: u64,
        data: &[u8],
        compare: bool,
    ) -> Result<Written, TargetError> {
        if !self.files.contains_key(rel) {
            if self.files.len() >= OPEN_FILES {
                self.files.clear();
            }
            let path = self.path(rel);
            // Created owned and moded if need be; reading back the target's bytes needs a
            // readable handle.
            self.own
                .open_for_write(&path, false)
                .and_then(|_| fs::OpenOptions::new().read(true).write(true).open(&path))
                .map(|f| self.files.insert(rel.to_string(), f))
                .map_err(|e| TargetError::io("open", &path, None, e))?;
        }
        let f = &self.files[rel];
        let len = data.len() as u64;
        let written = if compare && {
            self.compare.resize(data.len(), 0);
            read_full_at(f, &mut self.compare, offset).is_ok_and(|n| n == data.len())
                && self.compare == data
        } {
            Written::Identical
        } else {
            let zeroed = all_zeros(data)
                && zero_range(f, offset, len)
                    .map_err(|e| TargetError::io("zero", &self.dir.join(rel), Some(offset), e))?;
            if !zeroed {
                f.write_all_at(data, offset)
                    .map_err(|e| TargetError::io("write", &self.dir.join(rel), Some(offset), e))?;
                start_writeback(f, offset, len);
            }
            if !self.changed.contains(rel) {
                self.changed.insert(rel.to_string());
            }
            if zeroed {
                Written::Zeroed
            } else {
                Written::Written
            }
        };
        self.note_done(rel, offset, len)?;
        if written != Written::Identical {
            fault::passed(Point::Bytes, len);
        }
        Ok(written)
    }

    /// The source's file ended at `size`: so must the copy (WAL replay recreates whatever a
    /// live source appended or cut meanwhile). A file not on the target is left alone. The
    /// requests for one file are answered in any order, and each that began past the file's
    /// end says it ends where that request began: the shortest end said this run holds, and a
    /// longer one said after it would only stretch the file with zeros.
    pub fn cut_short(&mut self, rel: &str, size: u64) -> Result<(), TargetError> {
        match self.ended.get_mut(rel) {
            Some(shortest) if *shortest <= size => return Ok(()),
            Some(shortest) => *shortest = size,
            None => {
                self.ended.insert(rel.to_string(), size);
            }
        }
        self.files.remove(rel);
        let path = self.path(rel);
        if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
            f.set_len(size)
                .map_err(|e| TargetError::io("truncate", &path, Some(size), e))?;
            self.changed.insert(rel.to_string());
        }
        Ok(())
    }

    /// The source no longer has `rel`: neither does the target.
    pub fn remove_vanished(&mut self, rel: &str) -> Result<(), TargetError> {
        self.files.remove(rel);
        remove(&self.path(rel), FileType::Regular)
    }

    /// Starts removing, on a thread of its own, every path `plan` removes (what the source
    /// lacks), deepest first (the plan's order), while the copy writes and the commit asks the
    /// source for what it needs. Unlinking a 16 MiB WAL segment whose pages are cached costs
    /// the kernel some 5 ms (every cached page is dropped), and a diverged old primary has
    /// dozens of them: removing the 772 MB of WAL a stock pgbench target wrote past the
    /// divergence took 0.23-0.26 s, longer than fetching and writing its 1 % of changed blocks
    /// (0.11-0.16 s). No path removed is written by the copy: the plan removes only what the
    /// source lacks. [`Removing::wait`] before the sync, which makes the removals durable.
    pub fn start_removing(&self, plan: &Plan) -> Removing {
        let entries: Vec<(PathBuf, FileType)> = plan
            .entries
            .iter()
            .filter(|e| e.action == FileAction::Remove)
            .map(|e| {
                let t = e.target.as_ref().map_or(FileType::Regular, |t| t.file_type);
                (self.path(&e.path), t)
            })
            .collect();
        let paths = entries.iter().map(|(p, _)| p.clone()).collect();
        let remove_all = move || remove_all(&entries);
        let (handle, done) = match std::thread::Builder::new()
            .name("failback-remove".into())
            .spawn(remove_all.clone())
        {
            Ok(h) => (Some(h), None),
            // No thread to be had: removed here and now, as before the copy.
            Err(_) => (None, Some(remove_all())),
        };
        Removing {
            handle,
            done,
            paths,
        }
    }

    /// Renames the plan's recycled WAL segments ([`Reason::Recycled`]) to the next free
    /// segments of timeline `tli` past every segment in `pg_wal` and past `last_replayed`
    /// ([`first_recycled_segment`]), as PostgreSQL recycles a segment; says how many. One
    /// gone already (renamed by an interrupted run) is skipped. The renames are made durable
    /// by [`Target::sync`], which syncs `pg_wal`.
    pub fn recycle_wal(
        &mut self,
        plan: &Plan,
        tli: TimeLineId,
        last_replayed: XLogSegNo,
        seg_size: u32,
    ) -> Result<u64, TargetError> {
        let recycled: Vec<&str> = plan
            .entries
            .iter()
            .filter(|e| e.reason == Some(Reason::Recycled))
            .map(|e| e.path.as_str())
            .collect();
        if recycled.is_empty() {
            return Ok(0);
        }
        let wal = self.path("pg_wal");
        let listed = fs::read_dir(&wal).map_err(|e| TargetError::io("list", &wal, None, e))?;
        let mut present = Vec::new();
        for entry in listed {
            let entry = entry.map_err(|e| TargetError::io("list", &wal, None, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let name = name.strip_suffix(".partial").unwrap_or(&name);
            present.extend(parse_wal_file_name(name, seg_size).map(|(_, segno)| segno));
        }
        let mut next = first_recycled_segment(present, last_replayed);
        let mut renamed = 0;
        for path in recycled {
            let from = self.path(path);
            let to = wal.join(wal_file_name(tli, next, seg_size));
            match fs::rename(&from, &to) {
                Ok(()) => {
                    next += 1;
                    renamed += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(TargetError::io("rename", &from, None, e)),
            }
        }
        Ok(renamed)
    }

    /// `len` bytes of `rel` from `offset` are on the target; when enough are, they are made
    /// durable and recorded as done.
    fn note_done(&mut self, rel: &str, offset: u64, len: u64) -> Result<(), TargetError> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        j.pending.push((rel.to_string(), offset, len));
        j.pending_bytes += len;
        let full = self.dir.join(rel);
        if !j.files.contains(&full) {
            j.files.insert(full);
        }
        if j.pending_bytes >= FLUSH_BYTES {
            self.record_done()?;
        }
        Ok(())
    }

    /// Makes the pieces written since the last time durable, then records them as done. A file
    /// removed since (it vanished on the source) is skipped: nothing of it is recorded that a
    /// resume could trust wrongly, as it will be fetched and found gone again. fsync, not
    /// fdatasync: the sync at the end of the rewind fsyncs these files again, and finds nothing
    /// left to write.
    pub fn record_done(&mut self) -> Result<(), TargetError> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        let files: Vec<PathBuf> = std::mem::take(&mut j.files).into_iter().collect();
        fsutil::fsync_files(&files)
            .map_err(|(path, e)| TargetError::io("fsync", &path, None, e))?;
        let mut frames = Vec::new();
        for (path, offset, length) in j.pending.drain(..) {
            frames.extend(journal::encode(&Record::Done {
                path,
                offset,
                length,
            }));
        }
        j.pending_bytes = 0;
        if frames.is_empty() {
            return Ok(());
        }
        j.file
            .write_all(&frames)
            .and_then(|()| j.file.sync_data())
            .map_err(|e| TargetError::io("append to", &j.path, None, e))
    }

    /// Every regular file whose bytes or length this run changed.
    pub fn changed(&self) -> &BTreeSet<String> {
        &self.changed
    }

    /// Makes durable what carrying out `plan` changed: every file this run changed, every file
    /// in `also` (what an interrupted run wrote, which may not have reached the disk), every
    /// directory where an entry was created or removed, and, when segments were restored from
    /// the archive (`wal_restored`), `pg_wal`. The rest of the target was durable before the
    /// rewind began (it was shut down cleanly, or crash recovery ended with a checkpoint) —
    /// including whole copies found identical, which were not written — so unlike pg_rewind
    /// this does not flush the whole data directory. `syncfs` flushes each file system whole
    /// instead.
    pub fn sync(
        &mut self,
        plan: &Plan,
        also: impl IntoIterator<Item = String>,
        wal_restored: bool,
        method: SyncMethod,
    ) -> Result<(), TargetError> {
        self.files.clear();
        let failed = |e| TargetError::io("sync", &self.dir, None, e);
        if method == SyncMethod::Syncfs {
            return fsutil::sync_data_dir(&self.dir, method).map_err(failed);
        }
        let mut changed = self.changed.clone();
        changed.extend(also);
        let files: Vec<PathBuf> = changed.iter().map(|p| self.path(p)).collect();
        let mut dirs = BTreeSet::new();
        for e in &plan.entries {
            if matches!(e.action, FileAction::Create | FileAction::Remove)
                || (e.action == FileAction::Copy && e.target.is_none())
                || e.reason == Some(Reason::Recycled)
            {
                dirs.extend(self.path(&e.path).parent().map(Path::to_path_buf));
            }
        }
        // A file removed meanwhile because the source no longer had it has nothing to flush.
        fsutil::fsync_files(&files)
            .map_err(|(path, e)| TargetError::io("fsync", &path, None, e))?;
        for d in &dirs {
            if d.is_dir() {
                fsutil::fsync_dir(d).map_err(|e| TargetError::io("fsync", d, None, e))?;
            }
        }
        // Segments restored from the archive under -c are not in the plan, and recovery
        // needs them.
        let wal = self.path("pg_wal");
        if wal_restored && wal.is_dir() {
            fsutil::sync_data_dir(&wal, SyncMethod::Fsync)
                .map_err(|e| TargetError::io("fsync", &wal, None, e))?;
        }
        Ok(())
    }

    // ---- the commit ----

    /// Appends a phase to the journal, durably.
    pub fn record(&mut self, phase: Phase) -> Result<(), TargetError> {
        self.record_done()?;
        let path = self.path(JOURNAL_FILE);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TargetError::io("open", &path, None, e))?;
        f.write_all(&journal::encode(&Record::Phase(phase)))
            .and_then(|()| f.sync_all())
            .map_err(|e| TargetError::io("append to", &path, None, e))?;
        fault::passed(Point::Commit, 1);
        Ok(())
    }

    /// Replaces `backup_label` (replay starts where it says); or, with `None`, makes sure there
    /// is none: a copy of a shut-down source starts from its control file's checkpoint. Never a
    /// `tablespace_map`, and none is left: PostgreSQL would re-point the target's tablespace
    /// links at the directories it names ([`crate::source::WindowEnd`]).
    pub fn write_backup_label(&mut self, label: Option<&str>) -> Result<(), TargetError> {
        let (label_path, map_path) = (self.path("backup_label"), self.path("tablespace_map"));
        self.durable_remove(&map_path)?;
        match label {
            Some(label) => self.durable_write(&label_path, label.as_bytes())?,
            None => self.durable_remove(&label_path)?,
        }
        fault::passed(Point::Commit, 1);
        Ok(())
    }

    /// Replaces `global/pg_control`.
    pub fn write_control(&mut self, control: &[u8]) -> Result<(), TargetError> {
        self.durable_write(&self.path("global/pg_control"), control)?;
        fault::passed(Point::Commit, 1);
        Ok(())
    }

    /// Writes `standby.signal`: the target starts as a standby.
    pub fn write_standby_signal(&mut self) -> Result<(), TargetError> {
        self.durable_write(&self.path("standby.signal"), b"")?;
        fault::passed(Point::Commit, 1);
        Ok(())
    }

    /// The end of the commit: `postgresql.auto.conf` becomes `auto_conf` (no marker) in one
    /// durable rename, then the journal is removed.
    pub fn finish(&mut self, auto_conf: &str) -> Result<(), TargetError> {
        let clean = recovery::drop_auto_conf(auto_conf, MARKER);
        self.durable_write(&self.path("postgresql.auto.conf"), clean.as_bytes())?;
        fault::passed(Point::Commit, 1);
        let path = self.path(JOURNAL_FILE);
        self.journal = None;
        fsutil::durable_remove(&path).map_err(|e| TargetError::io("remove", &path, None, e))?;
        fault::passed(Point::Commit, 1);
        Ok(())
    }

    /// `-R` on a target that needs no rewind: `standby.signal`, and one `primary_conninfo` in
    /// `postgresql.auto.conf`.
    pub fn write_recovery_conf(&mut self, conninfo: &str) -> Result<(), TargetError> {
        self.durable_write(&self.path("standby.signal"), b"")?;
        let auto = self.path("postgresql.auto.conf");
        let text = fs::read_to_string(&auto).unwrap_or_default();
        let new = recovery::set_auto_conf(&text, "primary_conninfo", conninfo);
        self.durable_write(&auto, new.as_bytes())
    }

    fn durable_remove(&self, path: &Path) -> Result<(), TargetError> {
        fsutil::durable_remove(path).map_err(|e| TargetError::io("remove", path, None, e))
    }

    /// Writes `data` to `path` durably and atomically (a temporary file, then a durable
    /// rename): a crash or a full disk leaves the old content or the new, never a mix.
    fn durable_write(&self, path: &Path, data: &[u8]) -> Result<(), TargetError> {
        fsutil::durable_write(path, data, &self.own)
            .map_err(|e| TargetError::io("write", path, None, e))
    }
}

/// The removals [`Target::start_removing`] started. Dropped unwaited (the rewind failed), it
/// still waits for them: nothing of the run goes on changing the target after it returns.
pub struct Removing {
    handle: Option<std::thread::JoinHandle<Result<(), TargetError>>>,
    /// The answer of removals made without a thread.
    done: Option<Result<(), TargetError>>,
    paths: BTreeSet<PathBuf>,
}

impl Removing {
    /// Waits until every removal is done, and says whether all were.
    pub fn wait(mut self) -> Result<(), TargetError> {
        match self.handle.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => self.done.take().unwrap_or(Ok(())),
        }
    }

    /// Whether `path` is one of the paths being removed.
    pub fn removes(&self, path: &Path) -> bool {
        self.paths.contains(path)
    }
}

impl Drop for Removing {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Threads that unlink files at once: an unlink waits on the file system as much as it works,
/// and several overlap (46 cached WAL segments went in 0.13 s with four, 0.19 s with one).
const REMOVERS: usize = 4;

/// Removes `entries`: the files on [`REMOVERS`] threads, then the directories in their order
/// (deepest first), once what they held is gone.
fn remove_all(entries: &[(PathBuf, FileType)]) -> Result<(), TargetError> {
    let files: Vec<&(PathBuf, FileType)> = entries
        .iter()
        .filter(|(_, t)| *t != FileType::Directory)
        .collect();
    let per = files.len().div_ceil(REMOVERS).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = files
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().try_for_each(|(p, t)| remove(p, *t))))
            .collect();
        parts.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })?;
    entries
        .iter()
        .filter(|(_, t)| *t == FileType::Directory)
        .try_for_each(|(p, t)| remove(p, *t))
}

/// Removes one entry; one already gone is fine (a resumed run removes again what a killed one
/// removed, and a removal lost to a crash is done again).
fn remove(path: &Path, file_type: FileType) -> Result<(), TargetError> {
    let r = match file_type {
        FileType::Directory => fs::remove_dir(path),
        FileType::Regular | FileType::Symlink => fs::remove_file(path),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TargetError::io("remove", path, None, e)),
    }
}

/// Whether `data` is all zeros: compared a page at a time with zeros (`memcmp`, which runs
/// at memory speed), so that a piece of data stops being looked at on its first page.
fn all_zeros(data: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Makes `len` bytes of `f` from `offset` read as zeros without writing them
/// (`fallocate(FALLOC_FL_ZERO_RANGE)`), growing the file when they reach past its end; `false`
/// where the file system cannot (btrfs, ZFS, some network file systems): the caller writes the
/// zeros instead.
///
/// A segment of WAL that a backup window barely began is 16 MiB of zeros but for its first
/// pages (`pg_backup_start` switches to a new segment, and nothing is written after the
/// window's end in it), and writing those zeros was a quarter of what a small rewind wrote.
/// The range is allocated, not left as a hole: PostgreSQL zero-fills WAL segments
/// (`wal_init_zero`) and relation extensions so that a later write cannot fail for want of
/// space, and ext4 and XFS keep a zeroed range as allocated extents marked unwritten, which
/// is the same promise with no data written (PostgreSQL 16's `mdzeroextend` extends relations
/// the same way, by `posix_fallocate`). The fsync that makes a piece durable makes this
/// durable too.
fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(false);
    };
    // SAFETY: a descriptor we own, a range in a file we are writing.
    if unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, off, n) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

/// Asks the kernel to start writing these bytes to disk now, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the disk works while the next pieces cross the
/// network, and the final fsync finds little left to flush. Only a hint: durability is still
/// the sync's job.
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a hint on a descriptor we own, over a range we just wrote.
    unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use failback_common::Lsn;

    fn header() -> JournalHeader {
        JournalHeader {
            system_identifier: 7,
            pg_major: 16,
            divergence: Lsn(0x400_0000),
            divergence_tli: 1,
            window_start: None,
            target_changes: None,
            resync: false,
            source_tli: 2,
            plan: Plan {
                entries: Vec::new(),
                block_size: 8192,
            },
        }
    }

    // The whole life of a rewind on disk: begun (journal, then marker), pieces recorded only
    // once flushed, taken up again, committed, finished (marker gone, journal gone).
    #[test]
    fn a_rewind_is_journaled_marked_recorded_and_finished() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("global")).unwrap();
        let auto = dir.path().join("postgresql.auto.conf");
        fs::write(
            &auto,
            "# Do not edit this file manually!\nwork_mem = '8MB'\n",
        )
        .unwrap();
        let mut t = Target::open(dir.path()).unwrap();
        t.begin(header()).unwrap();
        assert!(fs::read_to_string(&auto).unwrap().contains(MARKER));
        let st = Target::unfinished(dir.path()).unwrap().unwrap();
        assert_eq!((st.phase, st.done_bytes()), (Phase::Copying, 0));

        assert_eq!(t.write("f", 0, b"abc", false).unwrap(), Written::Written);
        assert_eq!(t.write("f", 0, b"abc", true).unwrap(), Written::Identical);
        // Noted, not yet recorded: a crash now would fetch it again.
        assert_eq!(
            Target::unfinished(dir.path())
                .unwrap()
                .unwrap()
                .done_bytes(),
            0
        );
        t.record_done().unwrap();
        let st = Target::unfinished(dir.path()).unwrap().unwrap();
        assert!(st.is_done("f", 0, 3));
        assert_eq!(t.changed().iter().collect::<Vec<_>>(), ["f"]);

        // A second run takes it up: the marker stays, records go on.
        let mut again = Target::open(dir.path()).unwrap();
        again.take_up(&st).unwrap();
        again.write("g", 8, b"xyz", false).unwrap();
        again.record(Phase::Copied).unwrap();
        let st = Target::unfinished(dir.path()).unwrap().unwrap();
        assert!(st.is_done("g", 8, 3));
        assert_eq!(st.phase, Phase::Copied);
        assert_eq!(
            fs::read(dir.path().join("g")).unwrap(),
            b"\0\0\0\0\0\0\0\0xyz"
        );

        // A map left by anything before must go: it would re-point the tablespace links.
        fs::write(dir.path().join("tablespace_map"), "16384 /elsewhere\n").unwrap();
        again.write_backup_label(Some("label\n")).unwrap();
        assert!(!dir.path().join("tablespace_map").exists());
        again.write_control(b"control").unwrap();
        again.record(Phase::Committed).unwrap();
        again.finish("work_mem = '8MB'\n").unwrap();
        assert_eq!(fs::read_to_string(&auto).unwrap(), "work_mem = '8MB'\n");
        assert!(Target::unfinished(dir.path()).unwrap().is_none());
        assert_eq!(
            fs::read(dir.path().join("backup_label")).unwrap(),
            b"label\n"
        );
    }

    // What the sync flushes is what was changed: an identical whole copy is not written, so
    // it is not in `changed`; a different, a new and a cut-down file are.
    #[test]
    fn changed_holds_exactly_the_files_written_or_cut() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("same", &b"same"[..]),
            ("differs", b"old!"),
            ("shorter", b"abcdef"),
        ] {
            fs::write(dir.path().join(name), bytes).unwrap();
        }
        let mut t = Target::open(dir.path()).unwrap();
        t.write("same", 0, b"same", true).unwrap();
        t.write("differs", 0, b"new!", true).unwrap();
        t.create_file("new", false).unwrap();
        t.write("new", 0, b"n", true).unwrap();
        t.truncate("shorter", 3).unwrap();
        t.truncate("same", 10).unwrap();
        let changed: Vec<&str> = t.changed().iter().map(String::as_str).collect();
        assert_eq!(changed, ["differs", "new", "shorter"]);
        assert_eq!(fs::read(dir.path().join("shorter")).unwrap(), b"abc");
        t.sync(
            &Plan {
                entries: vec![],
                block_size: 8192,
            },
            [],
            false,
            SyncMethod::Fsync,
        )
        .unwrap();
    }

    /// The file grows to the length asked, zeros from `from` on, what it held before kept.
    #[test]
    fn a_segment_is_completed_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("seg"), vec![9u8; 8192]).unwrap();
        let mut t = Target::open(dir.path()).unwrap();
        t.zero_fill("seg", 8192, 3 << 20).unwrap();
        let got = fs::read(dir.path().join("seg")).unwrap();
        assert_eq!(got.len(), 3 << 20);
        assert!(got[..8192].iter().all(|b| *b == 9));
        assert!(got[8192..].iter().all(|b| *b == 0));
        assert!(t.changed.contains("seg"));
    }

    /// Recycled segments go past every segment in pg_wal (a partial one too) and past the last
    /// replayed, in the plan's order, on the given timeline; one gone already is skipped.
    #[test]
    fn recycled_segments_are_renamed_past_every_segment() {
        use failback_common::filemap::FileEntry;
        use failback_common::plan::PlanEntry;
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        fs::create_dir(&wal).unwrap();
        let seg = 16u32 << 20;
        let name = |tli, n| wal_file_name(tli, n, seg);
        for (tli, n) in [(1, 5), (1, 6), (1, 7), (2, 4)] {
            fs::write(wal.join(name(tli, n)), format!("{tli}/{n}")).unwrap();
        }
        fs::write(wal.join(format!("{}.partial", name(1, 9))), "partial").unwrap();
        let recycled = |n| {
            let path = format!("pg_wal/{}", name(1, n));
            let mut e = PlanEntry::new(
                &path,
                FileAction::None,
                None,
                Some(FileEntry::regular(&path, 0)),
            );
            e.reason = Some(Reason::Recycled);
            e
        };
        let plan = Plan {
            entries: vec![recycled(6), recycled(8), recycled(5)],
            block_size: 8192,
        };
        let mut t = Target::open(dir.path()).unwrap();
        assert_eq!(t.recycle_wal(&plan, 2, 4, seg).unwrap(), 2);
        let read = |tli, n| fs::read_to_string(wal.join(name(tli, n))).ok();
        assert_eq!(read(2, 10).as_deref(), Some("1/6"));
        assert_eq!(read(2, 11).as_deref(), Some("1/5"));
        assert_eq!(read(1, 5), None);
        assert_eq!(read(1, 6), None);
        assert_eq!(read(1, 7).as_deref(), Some("1/7"));
        // Past the last replayed when it is further than any file.
        fs::write(wal.join(name(1, 12)), "1/12").unwrap();
        let plan = Plan {
            entries: vec![recycled(12)],
            block_size: 8192,
        };
        assert_eq!(t.recycle_wal(&plan, 3, 20, seg).unwrap(), 1);
        assert_eq!(read(3, 21).as_deref(), Some("1/12"));
    }

    // Zeros are allocated, not written: past the end of a new file (the file grows to hold
    // them, and the space is taken), and over bytes a file held (they read as zeros after).
    // A piece with one byte set is written whole. (tempdir is on the machine's file system;
    // where it cannot zero a range, the zeros are written and this test says so.)
    #[test]
    fn pieces_of_zeros_are_allocated_as_zeros_not_written() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("old"), vec![7u8; 256 << 10]).unwrap();
        let mut t = Target::open(dir.path()).unwrap();
        t.create_file("seg", false).unwrap();
        let page = {
            let mut p = vec![0u8; 8192];
            p[0] = 0xd1;
            p
        };
        assert_eq!(t.write("seg", 0, &page, false).unwrap(), Written::Written);
        let zeros = vec![0u8; 1 << 20];
        let first = t.write("seg", 8192, &zeros, false).unwrap();
        assert_eq!(
            first,
            Written::Zeroed,
            "this file system cannot zero a range (FALLOC_FL_ZERO_RANGE)"
        );
        assert_eq!(
            t.write("old", 64 << 10, &zeros[..128 << 10], false)
                .unwrap(),
            Written::Zeroed
        );
        // A piece is checked to its end, not only at its start.
        let mut last_set = zeros.clone();
        *last_set.last_mut().unwrap() = 1;
        assert_eq!(
            t.write("seg", 8192 + (1 << 20), &last_set, false).unwrap(),
            Written::Written
        );

        let seg = fs::read(dir.path().join("seg")).unwrap();
        assert_eq!(seg.len(), 8192 + (2 << 20));
        assert_eq!(&seg[..8192], &page[..]);
        assert!(seg[8192..8192 + (1 << 20)].iter().all(|&b| b == 0));
        assert_eq!(&seg[8192 + (1 << 20)..], &last_set[..]);
        // Allocated, not a hole: the file's blocks cover every byte.
        let blocks = fs::metadata(dir.path().join("seg")).unwrap().blocks();
        assert!(
            blocks * 512 >= seg.len() as u64,
            "{blocks} blocks for {} bytes",
            seg.len()
        );

        let old = fs::read(dir.path().join("old")).unwrap();
        assert!(old[..64 << 10].iter().all(|&b| b == 7));
        assert!(old[64 << 10..192 << 10].iter().all(|&b| b == 0));
        assert!(old[192 << 10..].iter().all(|&b| b == 7));
        assert_eq!(t.changed().iter().collect::<Vec<_>>(), ["old", "seg"]);
    }

    // A file cut into several requests that ends early is said to end by each request from
    // there on, at its own start, in any order: the shortest holds, whatever came first.
    #[test]
    fn the_shortest_end_the_source_said_holds() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("rel"), vec![7u8; 100]).unwrap();
        let mut t = Target::open(dir.path()).unwrap();
        t.cut_short("rel", 64).unwrap();
        t.write("rel", 0, b"new", false).unwrap();
        t.cut_short("rel", 40).unwrap();
        t.cut_short("rel", 48).unwrap();
        t.cut_short("rel", 80).unwrap();
        let mut want = b"new".to_vec();
        want.extend([7u8; 37]);
        assert_eq!(fs::read(dir.path().join("rel")).unwrap(), want);
        assert_eq!(t.changed().iter().collect::<Vec<_>>(), ["rel"]);
    }

    #[test]
    fn a_full_file_system_is_one_error_saying_what_to_do() {
        let at = Path::new("/data/base/5/16384");
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = TargetError::io("write", at, Some(8192), io::Error::from_raw_os_error(errno));
            let full = e.full().expect("a full disk");
            assert_eq!(full.source.raw_os_error(), Some(errno));
        }
        let other = TargetError::io(
            "write",
            at,
            Some(8192),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(other.full().is_none());
        assert!(
            other
                .to_string()
                .ends_with("\"/data/base/5/16384\" at offset 8192"),
            "{other}"
        );
        let full = || {
            TargetError::io(
                "write",
                at,
                None,
                io::Error::from_raw_os_error(libc::ENOSPC),
            )
        };
        assert_eq!(
            full().needing(80_000_001).needing(5).to_string(),
            "the target's file system is full while writing \"/data/base/5/16384\" (the rest \
             of the rewind writes up to 81 MB): free space on it, then run failback rewind \
             again: it resumes where this run stopped"
        );
        assert_eq!(
            full().before_first_change().to_string(),
            "the target's file system is full while writing \"/data/base/5/16384\"; nothing \
             was changed in the target: free space on it, then run failback rewind again"
        );
    }
}
