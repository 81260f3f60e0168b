//! What it costs to bring cached WAL segments into a process and check it, by each way of
//! reading the files: the floor under any WAL scan, decoding aside.
//!
//! A WAL scan must check the CRC-32C of every record, so every byte of the WAL passes through
//! the CPU once. Segment files in the page cache can get there by `pread` into a small buffer
//! (the kernel copies them; the scan in `failback_datadir::wal` reads 128 KiB at a time, a
//! buffer that stays in the core's cache while it is decoded) or by mapping the file with
//! `mmap` and reading the page cache's own pages (no copy, but every 4 KiB page of the mapping
//! is a page-table entry to fill and a TLB entry to miss). This tool times each way over every
//! whole segment of a `pg_wal` directory, checking a CRC over each page after its header (as
//! the decoder does), and prints CPU time and wall time:
//!
//! ```sh
//! wal_read_cost <pg_wal> pread|mmap|mmap-populate|mmap-populate-copy
//! ```
//!
//! - `pread`: 64 KiB reads into one reused buffer, the CRC from that buffer;
//! - `mmap`: the segment mapped, its pages faulted in as the CRC reaches them;
//! - `mmap-populate`: mapped with `MAP_POPULATE`, so every page is mapped before the CRC runs;
//! - `mmap-populate-copy`: mapped with `MAP_POPULATE`, copied 64 KiB at a time into a buffer
//!   that the CRC then reads (a copy in user space instead of the kernel's).
//!
//! Run it after reading the segments once, so that they are in the page cache.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail, ensure};
use failback_common::wal::crc::crc32c_append;

/// The WAL page size, and the short page header the CRC skips on each page.
const PAGE: usize = 8192;
const PAGE_HEADER: usize = 24;
/// Bytes read or copied at a time: what the scan reads per feed.
const CHUNK: usize = 64 << 10;

/// This process's CPU time (user and system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// The CRC of each page of `bytes` after its header, folded into one value so that the work
/// cannot be skipped.
fn check_pages(bytes: &[u8]) -> u32 {
    bytes
        .chunks(PAGE)
        .map(|p| crc32c_append(0, p.get(PAGE_HEADER..).unwrap_or(&[])))
        .fold(0, |a, c| a ^ c)
}

/// A read-only mapping of a whole file, unmapped when dropped.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &std::fs::File, len: usize, populate: bool) -> Result<Mapping> {
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a new read-only mapping of an open file; nothing else is mapped there.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        ensure!(
            addr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Ok(Mapping { addr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes are mapped readable at `addr` until drop; the files measured are
        // segments of a shut-down cluster, which nothing writes or truncates meanwhile.
        unsafe { std::slice::from_raw_parts(self.addr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(mode)) = (args.next(), args.next()) else {
        bail!("usage: wal_read_cost <pg_wal> pread|mmap|mmap-populate|mmap-populate-copy");
    };
    // Whole segments only (24 hexadecimal digits, all of the same size).
    let mut files: Vec<(std::path::PathBuf, u64)> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let len = e.metadata().ok()?.len();
            (name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                .then_some((e.path(), len))
        })
        .collect();
    files.sort();
    let Some(&(_, seg_size)) = files.first() else {
        bail!("no WAL segments in {dir}");
    };
    files.retain(|(_, len)| *len == seg_size);
    let len = usize::try_from(seg_size)?;
    let (wall, cpu) = (std::time::Instant::now(), cpu_seconds());
    let mut folded = 0u32;
    let mut buf = vec![0u8; CHUNK];
    for (path, _) in &files {
        let file = std::fs::File::open(path)?;
        match mode.as_str() {
            "pread" => {
                for off in (0..len).step_by(CHUNK) {
                    let n = CHUNK.min(len - off);
                    file.read_exact_at(&mut buf[..n], off as u64)?;
                    folded ^= check_pages(&buf[..n]);
                }
            }
            "mmap" | "mmap-populate" => {
                let m = Mapping::new(&file, len, mode == "mmap-populate")?;
                folded ^= check_pages(m.bytes());
            }
            "mmap-populate-copy" => {
                let m = Mapping::new(&file, len, true)?;
                for piece in m.bytes().chunks(CHUNK) {
                    buf[..piece.len()].copy_from_slice(piece);
                    folded ^= check_pages(&buf[..piece.len()]);
                }
            }
            other => bail!("unknown mode {other}"),
        }
    }
    let (wall, cpu) = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let mb = files.len() as f64 * seg_size as f64 / 1e6;
    println!(
        "{mode:>18}: {} segments, {mb:.0} MB: wall {wall:.3} s, cpu {cpu:.3} s ({:.0} MB/s of CPU) [{folded:08x}]",
        files.len(),
        mb / cpu
    );
    Ok(())
}
