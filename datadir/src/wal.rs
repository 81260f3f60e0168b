//! Reading a data directory's WAL from its files: the target's, by the client, and the
//! source's, by failbackd beside it.
//!
//! WAL lives in `pg_wal/` as segment files named by timeline and segment number. After timeline
//! switches, the same segment number can exist under several timelines; the one to read is
//! chosen from the timeline history, as recovery and pg_rewind choose it (a segment holding a
//! switch point is read from the newer timeline's file). A segment that has been archived and
//! removed can be brought back with the target's `restore_command` (`-c`), exactly as recovery
//! would: `%f` is the file name, `%p` the path to restore it to.
//!
//! The segment files are read through a [`SegmentSource`]: a data directory's own `pg_wal`
//! ([`DirSegments`], the target's and failbackd's), or another way of reading a segment file
//! by name — the client's libpq source reads a running server's `pg_wal` over SQL, a piece at a
//! time, without writing it anywhere.
//!
//! A directory's segments are read with `pread`, a piece at a time into the decoder's own
//! buffer, not mapped with `mmap`. Measured on segments in the page cache (the bench tool
//! `wal_read_cost`), reading through a mapping and checking the CRC costs 1.3 to 2 times the
//! CPU of the copy: the kernel copies through its own large-page map of memory, while each
//! 4 KiB page of a mapping is a TLB miss and stops the hardware prefetcher, so the CRC waits on
//! memory. A mapping would also be wrong for a live server's `pg_wal` (a recycled segment is
//! renamed and overwritten in place, and bytes changing between the CRC and the decoding would
//! go unnoticed), and would turn a disk error into SIGBUS instead of an error.
//!
//! This is the IO shell around the pure decoder in `failback_common::wal`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use failback_common::changes::WalChanges;
use failback_common::summary::Piece;
use failback_common::timeline::{TimeLineHistory, segment_file_name, timeline_for_segment};
use failback_common::wal::{Decoded, RecordKind, WalDecoder, WalError, WalParams, WalRecord};
use failback_common::{Lsn, TimeLineId, XLogSegNo};

use crate::DataDir;

/// The threads a scan of much WAL may use: the machine's cores.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Bytes read from a segment per feed while scanning forward. Small enough that the buffer they
/// are read into stays in the core's cache while the decoder reads them: copying out of the
/// page cache into a buffer of a mebibyte or more misses the cache on every line and costs
/// more than decoding (measured on 16 MiB segments in the page cache: 64 KiB reads ran at three
/// times the rate of 1 MiB reads). Half the cache of a core (512 KiB on the benchmarks' AMD
/// EPYC) is not too much: 128 KiB reads took 1.5 % less of a rewind's scan than 64 KiB (fewer
/// calls into the kernel), 256 KiB no less, 32 KiB 4 % more.
const SCAN_CHUNK: u64 = 128 << 10;
/// Bytes read at a time, aligned, for single records (most records fit in a page; a walk back
/// along `xl_prev` finds many records in one read).
const RECORD_CHUNK: u64 = 64 << 10;

/// The WAL bytes [`WalReader::read_record_from`] read last: `bytes` from `start`.
#[derive(Default)]
struct Chunk {
    start: Lsn,
    bytes: Vec<u8>,
}

impl Chunk {
    fn holds(&self, lsn: Lsn) -> bool {
        lsn >= self.start && lsn.0 < self.start.0 + self.bytes.len() as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalReadError {
    #[error(
        "could not find WAL segment {name} (needed to read WAL at {lsn}) in {dir}: it may have been \
         archived and removed; run again with -c/--restore-target-wal to fetch it with the \
         target's restore_command, or copy it back into pg_wal"
    )]
    MissingSegment {
        name: String,
        lsn: Lsn,
        dir: PathBuf,
    },
    #[error("could not restore WAL segment {name} with restore_command {command:?}: {reason}")]
    RestoreFailed {
        name: String,
        command: String,
        reason: String,
    },
    #[error("could not read WAL segment {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not read WAL record at {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: WalError,
    },
    #[error("WAL parameters of the target are unusable")]
    Params(#[from] failback_common::wal::WalParamsError),
    #[error("end pointer {got} is not a valid end point; expected {expected}")]
    Overshoot { got: Lsn, expected: Lsn },
    #[error("the WAL ends at {lsn}, before {until}: {why}")]
    EndedEarly { lsn: Lsn, until: Lsn, why: String },
}

/// The target's restore_command, and how to run it as the data directory's owner.
#[derive(Clone, Debug)]
pub struct RestoreCommand {
    pub command: String,
    /// Run as this uid/gid (when we are root and PostgreSQL's user owns the directory).
    pub run_as: Option<(u32, u32)>,
}

/// The part of a record the rewind keeps beyond the scan: small, owned.
#[derive(Clone, Debug)]
pub struct RecordSummary {
    pub lsn: Lsn,
    pub end_lsn: Lsn,
    pub xl_prev: Lsn,
    pub rmid: u8,
    pub info: u8,
    pub main_data: Vec<u8>,
    /// When the record is a checkpoint (`CHECKPOINT_SHUTDOWN` or `CHECKPOINT_ONLINE`): its
    /// redo pointer and `ThisTimeLineID`.
    pub checkpoint: Option<(Lsn, TimeLineId)>,
}

/// A checkpoint record: where it is, where replay from it begins (`redo`), and its timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointAt {
    pub lsn: Lsn,
    pub redo: Lsn,
    pub tli: TimeLineId,
}

/// Where a [`WalReader`] finds the bytes of WAL segment files: a data directory's `pg_wal`
/// ([`DirSegments`]), or anything else that can read a segment file by name (a running
/// server's files read over SQL, by the client's libpq source).
pub trait SegmentSource {
    /// Reads up to `buf.len()` bytes of segment file `name` (segment `segno`) at `offset` into
    /// `buf`, as many as the file has there (fewer at its end): `Ok(None)` when there is no such
    /// file. `lsn` is the position being read, for messages.
    fn read_segment(
        &mut self,
        name: &str,
        segno: XLogSegNo,
        offset: u64,
        buf: &mut [u8],
        lsn: Lsn,
    ) -> Result<Option<usize>, WalReadError>;

    /// Where the segments are, for messages (`pg_wal` of a directory, or of a server).
    fn location(&self) -> PathBuf;
}

/// The segment files of a data directory's `pg_wal`, opened through the directory's
/// confinement ([`crate::beneath`]): a segment name swapped for a link to a file elsewhere is
/// refused, not read. A missing segment is restored with the restore command when one is
/// given.
pub struct DirSegments {
    data: DataDir,
    /// `pg_wal` (for messages, and the `%p` of the restore command).
    dir: PathBuf,
    restore: Option<RestoreCommand>,
    seg_size: u32,
    /// The segment file read last, kept open: a scan reads each segment in many pieces.
    open: Option<(String, File)>,
}

impl DirSegments {
    pub fn new(data: &DataDir, seg_size: u32, restore: Option<RestoreCommand>) -> Self {
        DirSegments {
            data: data.clone(),
            dir: data.root().join("pg_wal"),
            restore,
            seg_size,
            open: None,
        }
    }

    /// Opens `pg_wal/<name>` through the data directory's confinement; `None` if it is missing.
    fn open_confined(&self, name: &str) -> Result<Option<File>, WalReadError> {
        self.data
            .open(&format!("pg_wal/{name}"))
            .map_err(|e| WalReadError::Io {
                path: self.dir.join(name),
                source: match e {
                    crate::DataDirError::Io { source, .. } => source,
                    refused => io::Error::new(io::ErrorKind::PermissionDenied, refused),
                },
            })
    }

    /// Opens segment file `name`, restoring it from the archive if allowed; `None` if it is
    /// missing and cannot be restored.
    fn open_segment(&mut self, name: &str) -> Result<Option<File>, WalReadError> {
        let file = match self.open_confined(name)? {
            Some(f) => f,
            None => match self.restore.clone() {
                None => return Ok(None),
                Some(restore) => self.restore_segment(&restore, name)?,
            },
        };
        Ok(Some(file))
    }

    /// The first read of a segment just opened: from the page cache if its first bytes are
    /// there (a segment written or read lately usually is whole), else from the disk, having
    /// asked the kernel to read the whole segment now, while what was read before is decoded,
    /// rather than a readahead window at a time. Asking for a segment already cached is not
    /// free: the kernel looks up every one of its pages (4 % of a scan of cached WAL).
    fn first_read(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut slices = [io::IoSliceMut::new(buf)];
        // Reads only what is cached, failing (or reading less) rather than waiting for the disk.
        match rustix::io::preadv2(
            file,
            &mut slices,
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(n) if n == buf.len() => return Ok(n),
            // Fewer bytes are also what a read at the end of a shorter file gives: read again.
            Ok(_) | Err(_) => {}
        }
        let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::WillNeed);
        crate::read_full_at(file, buf, offset)
    }

    /// Restores segment `name` with the restore command and opens what it restored.
    fn restore_segment(&self, restore: &RestoreCommand, name: &str) -> Result<File, WalReadError> {
        let fail = |reason: String| WalReadError::RestoreFailed {
            name: name.to_string(),
            command: restore.command.clone(),
            reason,
        };
        if restore.command.contains("%r") {
            return Err(fail(
                "the %r placeholder cannot be used outside recovery".into(),
            ));
        }
        let path = self.dir.join(name);
        let cmd = restore
            .command
            .replace("%f", name)
            .replace("%p", &path.display().to_string())
            .replace("%%", "%");
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(&cmd);
        if let Some((uid, gid)) = restore.run_as {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        let status = c.status().map_err(|e| fail(e.to_string()))?;
        if !status.success() {
            return Err(fail(format!("it exited with {status}")));
        }
        let file = self.open_confined(name)?;
        let len = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        match file {
            Some(f) if len == u64::from(self.seg_size) => Ok(f),
            _ => Err(fail(format!(
                "the restored file has {len} bytes, expected {}",
                self.seg_size
            ))),
        }
    }
}

impl SegmentSource for DirSegments {
    fn read_segment(
        &mut self,
        name: &str,
        _segno: XLogSegNo,
        offset: u64,
        buf: &mut [u8],
        _lsn: Lsn,
    ) -> Result<Option<usize>, WalReadError> {
        let mut first = false;
        if self.open.as_ref().is_none_or(|(n, _)| n != name) {
            self.open = None;
            let Some(f) = self.open_segment(name)? else {
                return Ok(None);
            };
            self.open = Some((name.to_string(), f));
            first = true;
        }
        let Some((_, f)) = &self.open else {
            return Ok(None);
        };
        let read = if first {
            Self::first_read(f, buf, offset)
        } else {
            crate::read_full_at(f, buf, offset)
        };
        read.map(Some).map_err(|source| WalReadError::Io {
            path: self.dir.join(name),
            source,
        })
    }

    fn location(&self) -> PathBuf {
        self.dir.clone()
    }
}

/// The WAL of one cluster, read along one timeline history, from the segment files `S` finds:
/// by default a data directory's own ([`DirSegments`]).
pub struct WalReader<'h, S: SegmentSource = DirSegments> {
    segments: S,
    history: &'h TimeLineHistory,
    params: WalParams,
    /// Every segment file opened, by name (pg_rewind's keepwal: recovery may need them).
    pub opened: BTreeSet<String>,
    buf: Vec<u8>,
    /// The segment read last and its file name (taken from the history once a segment).
    name_of: Option<(XLogSegNo, String)>,
}

impl<'h> WalReader<'h, DirSegments> {
    pub fn new(
        pgdata: &Path,
        history: &'h TimeLineHistory,
        params: WalParams,
        restore: Option<RestoreCommand>,
    ) -> Self {
        WalReader::for_dir(&DataDir::new(pgdata), history, params, restore)
    }

    /// [`Self::new`] for a data directory already opened.
    pub fn for_dir(
        dir: &DataDir,
        history: &'h TimeLineHistory,
        params: WalParams,
        restore: Option<RestoreCommand>,
    ) -> Self {
        WalReader::with_segments(
            DirSegments::new(dir, params.seg_size, restore),
            history,
            params,
        )
    }
}

impl<'h, S: SegmentSource> WalReader<'h, S> {
    /// A reader of the WAL `segments` holds.
    pub fn with_segments(segments: S, history: &'h TimeLineHistory, params: WalParams) -> Self {
        WalReader {
            segments,
            history,
            params,
            opened: BTreeSet::new(),
            buf: Vec::new(),
            name_of: None,
        }
    }

    /// Where the segments come from.
    pub fn segments(&self) -> &S {
        &self.segments
    }

    pub fn segments_mut(&mut self) -> &mut S {
        &mut self.segments
    }

    pub fn seg_size(&self) -> u32 {
        self.params.seg_size
    }

    fn segment_name(&self, segno: XLogSegNo) -> String {
        segment_file_name(self.history, segno, self.seg_size())
    }

    /// Reads up to `max` bytes of WAL starting at `from`, within one segment.
    fn read_at(&mut self, from: Lsn, max: u64) -> Result<usize, WalReadError> {
        let mut buf = std::mem::take(&mut self.buf);
        let len = max.min(u64::from(self.seg_size()) - from.segment_offset(self.seg_size()));
        buf.resize(len as usize, 0);
        let done = self.read_into(from, &mut buf);
        buf.truncate(*done.as_ref().unwrap_or(&0));
        self.buf = buf;
        done
    }

    /// Reads WAL starting at `from` into `buf`, as much as fits and the segment of `from`
    /// holds from there (fewer bytes at the end of a shorter file).
    fn read_into(&mut self, from: Lsn, buf: &mut [u8]) -> Result<usize, WalReadError> {
        let segno = from.segment_number(self.seg_size());
        let off = from.segment_offset(self.seg_size());
        let len = buf.len().min((u64::from(self.seg_size()) - off) as usize);
        if self.name_of.as_ref().is_none_or(|(s, _)| *s != segno) {
            self.name_of = Some((segno, self.segment_name(segno)));
        }
        let Some((_, name)) = &self.name_of else {
            unreachable!("just set");
        };
        let Some(done) = self
            .segments
            .read_segment(name, segno, off, &mut buf[..len], from)?
        else {
            return Err(WalReadError::MissingSegment {
                name: name.clone(),
                lsn: from,
                dir: self.segments.location(),
            });
        };
        if !self.opened.contains(name) {
            self.opened.insert(name.clone());
        }
        Ok(done.min(len))
    }

    /// Feeds `dec` the WAL it needs next, up to [`SCAN_CHUNK`] bytes, read straight into its
    /// buffer; returns how many bytes (0 at the end of a shorter segment file).
    fn feed_next(&mut self, dec: &mut WalDecoder) -> Result<usize, WalReadError> {
        let from = dec.needed_lsn();
        dec.feed_in_place(SCAN_CHUNK as usize, |room| self.read_into(from, room))
    }

    /// Reads the one record that starts at `lsn`.
    pub fn read_record(&mut self, lsn: Lsn) -> Result<RecordSummary, WalReadError> {
        self.read_record_from(lsn, &mut Chunk::default())
    }

    /// [`Self::read_record`], reading the WAL an aligned [`RECORD_CHUNK`] at a time through
    /// `chunk`, which keeps the last one read: records read one after another nearby (a walk
    /// back along `xl_prev`) mostly need no read at all.
    fn read_record_from(
        &mut self,
        lsn: Lsn,
        chunk: &mut Chunk,
    ) -> Result<RecordSummary, WalReadError> {
        let mut dec = WalDecoder::new(lsn, self.params)?.leave_out_image_bytes();
        loop {
            match dec.poll() {
                Ok(Decoded::Record(r)) => {
                    return Ok(RecordSummary {
                        lsn: r.lsn,
                        end_lsn: r.end_lsn,
                        xl_prev: r.xl_prev(),
                        rmid: r.rmid(),
                        info: r.info(),
                        main_data: r.main_data.to_vec(),
                        checkpoint: match r.kind {
                            RecordKind::Checkpoint {
                                redo,
                                this_timeline_id,
                                ..
                            } => Some((redo, this_timeline_id)),
                            _ => None,
                        },
                    });
                }
                Ok(Decoded::NeedMore { from }) => {
                    if !chunk.holds(from) {
                        let start = Lsn(from.0 / RECORD_CHUNK * RECORD_CHUNK);
                        self.read_at(start, RECORD_CHUNK)?;
                        chunk.start = start;
                        std::mem::swap(&mut chunk.bytes, &mut self.buf);
                    }
                    let at = (from.0 - chunk.start.0) as usize;
                    if at >= chunk.bytes.len() {
                        return Err(WalReadError::MissingSegment {
                            name: self.segment_name(from.segment_number(self.seg_size())),
                            lsn: from,
                            dir: self.segments.location(),
                        });
                    }
                    dec.feed(&chunk.bytes[at..]);
                }
                Err(source) => return Err(WalReadError::Decode { lsn, source }),
            }
        }
    }

    /// The last checkpoint record written before `fork`, where two histories part: pg_rewind's
    /// *last common checkpoint*, from which replay of the other history's WAL rebuilds every
    /// page either side changed since. Found as pg_rewind finds it, walking back along
    /// `xl_prev` from the record that starts at `fork` (the first one this WAL wrote after the
    /// fork, so it must exist), one record at a time: the cost is the WAL between that
    /// checkpoint and the fork, at most a checkpoint interval.
    pub fn checkpoint_before(&mut self, fork: Lsn) -> Result<CheckpointAt, WalReadError> {
        let mut chunk = Chunk::default();
        let mut rec = self.read_record_from(fork, &mut chunk)?;
        loop {
            if rec.xl_prev.0 == 0 || rec.xl_prev >= rec.lsn {
                return Err(WalReadError::EndedEarly {
                    lsn: rec.lsn,
                    until: fork,
                    why: "no checkpoint record precedes it".into(),
                });
            }
            rec = self.read_record_from(rec.xl_prev, &mut chunk)?;
            if let Some((redo, tli)) = rec.checkpoint {
                return Ok(CheckpointAt {
                    lsn: rec.lsn,
                    redo,
                    tli,
                });
            }
        }
    }

    /// That every segment holding WAL from `from` to `to` is there, its first bytes readable:
    /// what replay from a checkpoint's redo pointer up to the checkpoint record needs, read by
    /// no one until recovery.
    pub fn require(&mut self, from: Lsn, to: Lsn) -> Result<(), WalReadError> {
        let seg = self.seg_size();
        for segno in from.segment_number(seg)..=to.segment_number(seg) {
            let at = failback_common::lsn::segment_start(segno, seg).max(from);
            if self.read_at(at, 1)? == 0 {
                return Err(WalReadError::MissingSegment {
                    name: self.segment_name(segno),
                    lsn: at,
                    dir: self.segments.location(),
                });
            }
        }
        Ok(())
    }

    /// Reads every record from `start` until one ends exactly at `end`, calling `each` for
    /// every record. A record that ends past `end` means `end` is not a record boundary.
    /// Records that span pages come without their image bytes (checked, not kept: see
    /// [`WalDecoder::leave_out_image_bytes`]); every reader here needs the block references only.
    pub fn scan(
        &mut self,
        start: Lsn,
        end: Lsn,
        mut each: impl FnMut(&WalRecord<'_>) -> Result<(), WalReadError>,
    ) -> Result<(), WalReadError> {
        let mut dec = self.decoder(start, false)?;
        loop {
            match dec.poll() {
                // By reference, as in `walk`.
                Ok(Decoded::Record(ref r)) => {
                    each(r)?;
                    if r.end_lsn >= end {
                        return if r.end_lsn == end {
                            Ok(())
                        } else {
                            Err(WalReadError::Overshoot {
                                got: r.end_lsn,
                                expected: end,
                            })
                        };
                    }
                }
                Ok(Decoded::NeedMore { from }) => {
                    if self.feed_next(&mut dec)? == 0 {
                        return Err(WalReadError::MissingSegment {
                            name: self.segment_name(from.segment_number(self.seg_size())),
                            lsn: from,
                            dir: self.segments.location(),
                        });
                    }
                }
                Err(source) => {
                    return Err(WalReadError::Decode {
                        lsn: source.lsn(),
                        source,
                    });
                }
            }
        }
    }
}

/// Why a walk to the end of WAL stopped.
#[derive(Debug)]
pub enum WalEnd {
    /// The requested end position was reached.
    Reached(Lsn),
    /// Valid WAL ends here (zeroed or recycled page, torn record): how WAL normally ends.
    EndOfWal { lsn: Lsn, error: WalError },
    /// The next segment file does not exist.
    NoMoreSegments { lsn: Lsn, name: String },
}

impl<S: SegmentSource> WalReader<'_, S> {
    /// What the records starting in `[from, until)` change (see [`WalChanges`]), with relation
    /// segments of `relseg_size` blocks. `from` is a record start, or a page boundary (where a
    /// timeline begins, the first record follows the page header). WAL that ends before
    /// `until` (a segment gone, or valid WAL ending) is an error: the changes would be
    /// incomplete. `each` is called once a record (progress, the crash tests' hook).
    pub fn changes(
        &mut self,
        from: Lsn,
        until: Lsn,
        relseg_size: u32,
        each: impl FnMut(),
    ) -> Result<WalChanges, WalReadError> {
        if from >= until {
            return Ok(WalChanges::default());
        }
        let at_page = from.page_offset(self.params.page_size) == 0;
        let (end, changes) = self.walk_changes(from, at_page, until, relseg_size, each)?;
        match end {
            // Valid WAL that ends exactly at `until` (nothing written after it yet) was read
            // to the end too.
            WalEnd::Reached(_) => Ok(changes),
            WalEnd::EndOfWal { lsn, .. } | WalEnd::NoMoreSegments { lsn, .. } if lsn >= until => {
                Ok(changes)
            }
            WalEnd::EndOfWal { lsn, error } => Err(WalReadError::EndedEarly {
                lsn,
                until,
                why: error.to_string(),
            }),
            WalEnd::NoMoreSegments { lsn, name } => Err(WalReadError::MissingSegment {
                name,
                lsn,
                dir: self.segments.location(),
            }),
        }
    }

    /// [`Self::changes`], taking whole segments from `summaries` where they have them and
    /// decoding the rest; also returns how many segments came from summaries.
    pub fn changes_summarized(
        &mut self,
        from: Lsn,
        until: Lsn,
        relseg_size: u32,
        summaries: &crate::summaries::WalSummaries,
    ) -> Result<(WalChanges, u64), WalReadError> {
        let seg = u64::from(self.seg_size());
        // Taken once, up front: a summary dropped meanwhile (its file recycled) is still the
        // summary of what that file held.
        let held: std::collections::HashMap<XLogSegNo, _> = (from.0 / seg..until.0.div_ceil(seg))
            .filter_map(|segno| Some((segno, summaries.get(&self.segment_name(segno))?)))
            .collect();
        let mut changes = WalChanges::default();
        let mut used = 0;
        for piece in failback_common::summary::pieces(from, until, self.seg_size(), |s| {
            held.contains_key(&s)
        }) {
            match piece {
                Piece::Summary(segno) => {
                    changes.absorb(&held[&segno]);
                    used += 1;
                }
                Piece::Decode { from, until } => {
                    changes.absorb(&self.changes(from, until, relseg_size, || {})?);
                }
            }
        }
        Ok((changes, used))
    }
}

impl WalReader<'_, DirSegments> {
    /// [`Self::changes`] on `threads` threads: the whole segments of the stretch each decoded
    /// on its own (the records starting in it, as failbackd's summaries are made: a segment's
    /// first page says how much of it continues the record before), the ends as
    /// [`Self::changes`] decodes them. A scan of a gigabyte of WAL is otherwise one core's
    /// work while the others wait. Where a segment would be restored from the archive, or a
    /// piece cannot be read (a segment missing, the WAL ending early), the stretch is decoded
    /// in one pass instead, which restores in order and says exactly what is wrong.
    pub fn changes_in_parallel(
        &mut self,
        from: Lsn,
        until: Lsn,
        relseg_size: u32,
        threads: usize,
        each: impl Fn() + Sync,
    ) -> Result<WalChanges, WalReadError> {
        let pieces = failback_common::summary::pieces(from, until, self.seg_size(), |_| true);
        if threads < 2 || self.segments.restore.is_some() || pieces.len() < 3 {
            return self.changes(from, until, relseg_size, each);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let this = &*self;
        let workers: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads.min(pieces.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut reader = WalReader::for_dir(
                            &this.segments.data,
                            this.history,
                            this.params,
                            None,
                        );
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&piece) = pieces.get(i) else {
                                return Some((done, reader.opened));
                            };
                            let changes = match piece {
                                Piece::Summary(segno) => crate::summaries::summarize_segment(
                                    &mut reader,
                                    segno,
                                    relseg_size,
                                    &each,
                                )
                                .ok()
                                .flatten()?,
                                Piece::Decode { from, until } => {
                                    reader.changes(from, until, relseg_size, &each).ok()?
                                }
                            };
                            done.push((i, changes));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let Some(workers) = workers.into_iter().collect::<Option<Vec<_>>>() else {
            return self.changes(from, until, relseg_size, each);
        };
        let mut found: Vec<(usize, WalChanges)> = Vec::with_capacity(pieces.len());
        for (done, opened) in workers {
            found.extend(done);
            self.opened.extend(opened);
        }
        found.sort_by_key(|(i, _)| *i);
        let mut changes = WalChanges::default();
        for (_, c) in &found {
            changes.absorb(c);
        }
        Ok(changes)
    }

    /// The first segment on disk that belongs to this history, as (segment number, file name).
    pub fn oldest_segment(&self) -> Option<XLogSegNo> {
        let names = self.segments.data.names("pg_wal").ok()?;
        names
            .iter()
            .filter_map(|name| {
                let (tli, segno) =
                    failback_common::lsn::parse_wal_file_name(name, self.seg_size())?;
                (timeline_for_segment(self.history, segno, self.seg_size()) == tli).then_some(segno)
            })
            .min()
    }
}

impl<S: SegmentSource> WalReader<'_, S> {
    /// Walks forward from `start` (a record start, or a page start when `at_page`, where a
    /// record continued from before is skipped) until `end` or the end of valid WAL, calling
    /// `each` for every record. Running out of WAL is an answer here, not an error. As with
    /// [`Self::scan`], image bytes are checked but not kept.
    pub fn walk(
        &mut self,
        start: Lsn,
        at_page: bool,
        end: Option<Lsn>,
        each: impl FnMut(&WalRecord<'_>),
    ) -> Result<WalEnd, WalReadError> {
        let dec = self.decoder(start, at_page)?;
        self.walk_with(dec, end, each)
    }

    /// What the records starting in `[start, end)` change ([`WalChanges`]), walked as
    /// [`Self::walk`] walks, with only the record kinds [`WalChanges`] looks at interpreted;
    /// and why the walk stopped. `each` is called once a record.
    pub fn walk_changes(
        &mut self,
        start: Lsn,
        at_page: bool,
        end: Lsn,
        relseg_size: u32,
        mut each: impl FnMut(),
    ) -> Result<(WalEnd, WalChanges), WalReadError> {
        let dec = self
            .decoder(start, at_page)?
            .interpret_only(&WalChanges::KINDS_FROM);
        let mut changes = WalChanges::default();
        let stop = self.walk_with(dec, Some(end), |r| {
            each();
            changes.record(r, relseg_size)
        })?;
        Ok((stop, changes))
    }

    /// A decoder from `start` (a page, skipping a record continued onto it, when `at_page`)
    /// that checks image bytes without keeping them.
    fn decoder(&self, start: Lsn, at_page: bool) -> Result<WalDecoder, WalReadError> {
        let dec = if at_page {
            WalDecoder::new_at_page(start, self.params)?
        } else {
            WalDecoder::new(start, self.params)?
        };
        Ok(dec.leave_out_image_bytes())
    }

    fn walk_with(
        &mut self,
        mut dec: WalDecoder,
        end: Option<Lsn>,
        mut each: impl FnMut(&WalRecord<'_>),
    ) -> Result<WalEnd, WalReadError> {
        loop {
            match dec.poll() {
                // By reference: a record is 240 bytes, and moving it out of the result was a
                // copy per record.
                Ok(Decoded::Record(ref r)) => {
                    if end.is_some_and(|e| r.lsn >= e) {
                        return Ok(WalEnd::Reached(r.lsn));
                    }
                    each(r);
                }
                Ok(Decoded::NeedMore { from }) => match self.feed_next(&mut dec) {
                    Ok(0) | Err(WalReadError::MissingSegment { .. }) => {
                        let name = self.segment_name(from.segment_number(self.seg_size()));
                        return Ok(WalEnd::NoMoreSegments { lsn: from, name });
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                },
                Err(error) if error.is_end_of_wal() => {
                    return Ok(WalEnd::EndOfWal {
                        lsn: error.lsn(),
                        error,
                    });
                }
                Err(source) => {
                    return Err(WalReadError::Decode {
                        lsn: source.lsn(),
                        source,
                    });
                }
            }
        }
    }
}

/// What a data directory's own WAL says changed since `since`, as [`source_changes`] found it.
#[derive(Debug)]
pub struct SourceChanges {
    pub changes: failback_common::changes::Changes,
    /// The first position the scan did not take.
    pub until: Lsn,
    /// Records read.
    pub records: u64,
    /// WAL segments whose changes came from failbackd's summaries instead of being decoded.
    pub summarized_segments: u64,
}

/// Why [`source_changes`] could not say.
#[derive(Debug, thiserror::Error)]
pub enum SourceChangesError {
    /// The WAL since `since` is no longer all there (recycled, removed, or torn): the changes
    /// must be found another way (comparing chunk hashes).
    #[error("the WAL from {since} to {until} is no longer complete in pg_wal")]
    Gone {
        since: Lsn,
        until: Lsn,
        #[source]
        source: WalReadError,
    },
    #[error("could not read the timeline history")]
    History(#[from] crate::history::HistoryReadError),
    #[error(transparent)]
    Wal(#[from] WalReadError),
}

/// What `dir`'s own WAL says changed from `since` (where its history and another cluster's
/// part) up to `end`: the position and timeline where its WAL ends when a running server said
/// so, else where the shut-down directory's WAL ends (its checkpoint, or its minimum recovery
/// point as a standby). The WAL is read along the history of `end`'s timeline, or of the
/// timeline the files say it is on. Whole segments `summaries` holds are taken from there.
pub fn source_changes(
    dir: &crate::DataDir,
    control: &failback_common::control::ControlFileData,
    since: Lsn,
    end: Option<(Lsn, failback_common::TimeLineId)>,
    summaries: Option<&crate::summaries::WalSummaries>,
) -> Result<SourceChanges, SourceChangesError> {
    let (until, tli) = match end {
        Some(e) => e,
        None => {
            let newest = crate::history::history_files(dir)
                .map_err(crate::history::HistoryReadError::from)?
                .last()
                .map(|(t, _)| *t);
            let (lsn, _) = failback_common::rewind::shut_down_end(control);
            (lsn, crate::history::files_timeline(control, newest))
        }
    };
    let history = crate::history::history_of(dir, tli)?;
    let params = WalParams::new(control.major, control.xlog_seg_size)
        .with_system_identifier(control.system_identifier);
    let mut reader = WalReader::for_dir(dir, &history, params, None);
    let found = match summaries {
        Some(s) => reader.changes_summarized(since, until, control.relseg_size, s),
        None => reader
            .changes_in_parallel(since, until, control.relseg_size, cores(), || {})
            .map(|c| (c, 0)),
    };
    let (changes, summarized_segments) = match found {
        Ok(c) => c,
        Err(
            e @ (WalReadError::MissingSegment { .. }
            | WalReadError::EndedEarly { .. }
            | WalReadError::Decode { .. }),
        ) => {
            return Err(SourceChangesError::Gone {
                since,
                until,
                source: e,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let records = changes.records();
    Ok(SourceChanges {
        changes: changes.finish(control.major),
        until,
        records,
        summarized_segments,
    })
}

#[cfg(test)]
mod tests {
    use super::DirSegments;
    use std::io::Write;

    /// The first read of a segment gives its bytes whether they are in the page cache or only
    /// on the disk (read then after asking for the whole segment), and at the end of a shorter
    /// file as many as it has.
    #[test]
    fn first_read_cached_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let bytes: Vec<u8> = (0..(256u32 << 10))
            .map(|i| (i * 7 + (i >> 11)) as u8)
            .collect();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let f = std::fs::File::open(&path).unwrap();
        for evict in [true, false] {
            if evict {
                // Clean pages of a synced file leave the page cache when asked (best effort:
                // either way the read must give the same bytes).
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            }
            let mut buf = vec![0u8; 64 << 10];
            let n = DirSegments::first_read(&f, &mut buf, 128 << 10).unwrap();
            assert_eq!(n, buf.len());
            assert_eq!(buf, bytes[128 << 10..192 << 10]);
            let mut tail = vec![0u8; 64 << 10];
            let n = DirSegments::first_read(&f, &mut tail, (256 << 10) - 1000).unwrap();
            assert_eq!(n, 1000);
            assert_eq!(tail[..n], bytes[bytes.len() - 1000..]);
        }
    }
}
