//! An attacker who can write into the data directory swaps links in for a file, a directory and
//! a tablespace's link, over and over, while the data directory is read: no read may ever
//! return a byte of anything outside it, and no listing an entry from outside.
//!
//! Each swap is one `renameat2(RENAME_EXCHANGE)` of a prepared entry with the real one, so at
//! every instant the path is either the real entry or the link, and it flips as fast as the
//! kernel can rename. Checking each component with `lstat` and then opening the path by name
//! (what `DataDir` did before it opened everything beneath a descriptor of the directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`) read `secret` here within milliseconds.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use failback_datadir::{DataDir, DataDirError, ReadStatus, hash_buffer, hash_chunks};

const INSIDE: &[u8] = b"inside";
const SECRET: &[u8] = b"secret";
const TABLESPACE: &[u8] = b"tblspc";
/// A name only the directories outside hold.
const MARKER: &str = "only_outside";
const RACE: Duration = Duration::from_secs(2);

/// Exchanges `a` in the directory `dir` with `b` in `dir_b` until `stop`, counting.
fn swap(dir: &File, a: &str, dir_b: &File, b: &str, stop: &AtomicBool, count: &AtomicU64) {
    let (a, b) = (CString::new(a).unwrap(), CString::new(b).unwrap());
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: both names are NUL-terminated and both directories are open.
        let r = unsafe {
            libc::renameat2(
                dir.as_raw_fd(),
                a.as_ptr(),
                dir_b.as_raw_fd(),
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sets `stop` however the reading ends (a failed assertion included), so the swappers end.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the reads saw.
#[derive(Default, Debug)]
struct Seen {
    read: u64,
    refused: u64,
    listed: u64,
    list_failed: u64,
}

impl Seen {
    /// A read's outcome: the real bytes, or refused.
    fn bytes(&mut self, what: &str, r: Result<Option<Vec<u8>>, DataDirError>, want: &[u8]) {
        match r {
            Ok(Some(b)) => {
                assert_ne!(b, SECRET, "{what} read a file outside the data directory");
                assert_eq!(b, want, "{what}");
                self.read += 1;
            }
            Err(DataDirError::PathNotAllowed(_)) => self.refused += 1,
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn links_swapped_in_while_reading_never_lead_out() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("data");
    let outside = t.path().join("outside");
    fs::create_dir_all(root.join("base/1")).unwrap();
    fs::create_dir_all(root.join("pg_tblspc")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(root.join("base/1/1234"), INSIDE).unwrap();
    fs::write(root.join("base/1/other"), INSIDE).unwrap();
    fs::write(outside.join("1234"), SECRET).unwrap();
    fs::write(outside.join(MARKER), SECRET).unwrap();
    // The file, and the directory holding it, each with a link to the outside beside it.
    symlink(outside.join("1234"), root.join("base/1/.evil")).unwrap();
    symlink(&outside, root.join("base/.evil")).unwrap();

    // A tablespace: a link PostgreSQL follows, to a directory of the data directory's owner,
    // and a link to a directory of another owner (root's, as `/` or `/etc` are) beside it.
    // Only when this test may give directories away (it runs as root).
    let ts = t.path().join("ts");
    let ts_outside = t.path().join("ts_outside");
    let ts_file = "PG_16_202307071/1/5678";
    for (dir, bytes) in [(&ts, TABLESPACE), (&ts_outside, SECRET)] {
        fs::create_dir_all(dir.join("PG_16_202307071/1")).unwrap();
        fs::write(dir.join(ts_file), bytes).unwrap();
    }
    fs::write(ts_outside.join(MARKER), SECRET).unwrap();
    symlink(&ts, root.join("pg_tblspc/16400")).unwrap();
    // Beside the data directory's other files, not in pg_tblspc: a listing meets it as a link
    // it does not follow, and only the tablespace's own link leads out half of the time.
    symlink(&ts_outside, root.join(".evil_tablespace")).unwrap();
    let nobody = 65534;
    let tablespace = std::os::unix::fs::chown(&root, Some(nobody), None)
        .and_then(|()| std::os::unix::fs::chown(&ts, Some(nobody), None));
    if let Err(e) = &tablespace {
        eprintln!(
            "the tablespace link is not swapped: cannot give a directory to uid {nobody} ({e})"
        );
    }

    let opened = |p: &Path| File::open(p).unwrap();
    let (top, base, base_1, tblspc) = (
        opened(&root),
        opened(&root.join("base")),
        opened(&root.join("base/1")),
        opened(&root.join("pg_tblspc")),
    );
    let stop = AtomicBool::new(false);
    let swaps = AtomicU64::new(0);
    let dd = DataDir::new(&root);
    let mut seen = Seen::default();
    std::thread::scope(|s| {
        s.spawn(|| swap(&base_1, "1234", &base_1, ".evil", &stop, &swaps));
        s.spawn(|| swap(&base, "1", &base, ".evil", &stop, &swaps));
        if tablespace.is_ok() {
            s.spawn(|| swap(&tblspc, "16400", &top, ".evil_tablespace", &stop, &swaps));
        }
        let _stop = Stop(&stop);
        let ts_path = format!("pg_tblspc/16400/{ts_file}");
        let mut buf = Vec::new();
        let mut hash_buf = hash_buffer(4096);
        let mut ranges = dd.range_reader();
        let until = Instant::now() + RACE;
        while Instant::now() < until {
            let range = |r: Result<ReadStatus, DataDirError>, buf: &[u8]| {
                r.map(|status| {
                    assert_eq!(status, ReadStatus::Complete);
                    Some(buf.to_vec())
                })
            };
            let r = dd.read_range("base/1/1234", 0, 6, &mut buf);
            seen.bytes("read_range", range(r, &buf), INSIDE);
            // Two paths in turn, so that the reader opens each anew.
            for (path, want) in [("base/1/1234", INSIDE), ("base/1/other", INSIDE)] {
                let r = ranges.read(path, 0, 6, &mut buf);
                seen.bytes("RangeReader::read", range(r, &buf), want);
            }
            let r = dd.read_file("base/1/1234");
            seen.bytes("read_file", r, INSIDE);
            let r = dd.open("base/1/1234").map(|f| {
                f.map(|mut f| {
                    let mut b = Vec::new();
                    f.read_to_end(&mut b).unwrap();
                    b
                })
            });
            seen.bytes("open", r, INSIDE);
            // ChunkHashes: the size and hash of what was opened.
            match dd.open("base/1/1234") {
                Ok(Some(f)) => {
                    let (size, hashes) = hash_chunks(&f, 4096, &mut hash_buf, 1).unwrap();
                    assert_eq!(size, INSIDE.len() as u64);
                    assert_eq!(hashes, [*blake3::hash(INSIDE).as_bytes()]);
                    seen.read += 1;
                }
                Err(DataDirError::PathNotAllowed(_)) => seen.refused += 1,
                other => panic!("open to hash: {other:?}"),
            }
            if tablespace.is_ok() {
                let r = dd.read_file(&ts_path);
                seen.bytes("read_file in a tablespace", r, TABLESPACE);
            }
            match dd.list() {
                Ok(list) => {
                    for e in &list {
                        assert!(
                            !e.path.ends_with(MARKER),
                            "list() shows {} from outside the data directory",
                            e.path
                        );
                    }
                    seen.listed += 1;
                }
                // The tablespace's link leads to another owner's directory, or something was
                // swapped between looking at an entry and opening it.
                Err(_) => seen.list_failed += 1,
            }
            match dd.names("base/1") {
                Ok(names) => assert!(!names.iter().any(|n| n == MARKER)),
                Err(DataDirError::PathNotAllowed(_)) => {}
                Err(e) => panic!("names: {e}"),
            }
        }
    });
    eprintln!("{seen:?}, {} swaps", swaps.load(Ordering::Relaxed));
    // The race was run: the real files were read, and the links met.
    assert!(seen.read > 100 && seen.refused > 100, "{seen:?}");
    assert!(seen.listed > 0, "{seen:?}");
}
