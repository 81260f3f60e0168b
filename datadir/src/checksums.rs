//! Every page checksum of a shut-down data directory, as `pg_checksums --check` verifies them.
//!
//! `pg_checksums` reads every segment file of every fork of every permanent relation (under
//! `global/`, `base/` and the tablespaces), skips pages never initialised, and compares each
//! page's stored checksum with the one computed for its block number within the fork
//! ([`failback_common::page`]). It ships only with some PostgreSQL packages; this is the same
//! check for any version 13–18, used to show that a rewound or resynced node holds no damaged
//! page and to find the damaged pages of a node before it is repaired.

use std::io::Read;

use failback_common::PgMajor;
use failback_common::filemap::FileType;
use failback_common::page::{PageCheck, check_page};
use failback_common::relpath::{absolute_block, parse_relation_path};

use crate::{DataDir, DataDirError};

/// A page whose checksum does not match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadPage {
    /// The segment file, relative to the data directory.
    pub path: String,
    /// The page's block number within its fork.
    pub blkno: u32,
    pub stored: u16,
    pub computed: u16,
}

/// What a scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChecksumScan {
    /// Relation segment files read.
    pub files: u64,
    /// Pages checked.
    pub pages: u64,
    /// Pages never initialised, which carry no checksum (`pg_checksums` counts them among the
    /// blocks it scanned).
    pub new_pages: u64,
    pub bad: Vec<BadPage>,
    /// Files whose size is not a whole number of pages, with their sizes.
    pub torn: Vec<(String, u64)>,
}

impl ChecksumScan {
    /// Whether every page checked out and no file was torn.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.torn.is_empty()
    }
}

/// Checks every page of every relation fork in `dir`, a cluster of `major` with pages of
/// `blcksz` bytes and segments of `relseg_size` pages (its control file says both). The
/// cluster must be shut down: a running server's pages may be half-written on disk.
pub fn verify(
    dir: &DataDir,
    major: PgMajor,
    blcksz: u32,
    relseg_size: u32,
) -> Result<ChecksumScan, DataDirError> {
    let mut scan = ChecksumScan::default();
    let mut page = vec![0u8; blcksz as usize];
    for entry in dir.list()? {
        if entry.file_type != FileType::Regular {
            continue;
        }
        let Some(seg) = parse_relation_path(&entry.path, major) else {
            continue;
        };
        let Some(file) = dir.open(&entry.path)? else {
            continue;
        };
        scan.files += 1;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut in_segment = 0u32;
        loop {
            let got =
                read_page(&mut reader, &mut page).map_err(|e| DataDirError::io(&entry.path, e))?;
            if got == 0 {
                break;
            }
            if got < page.len() {
                scan.torn.push((
                    entry.path.clone(),
                    u64::from(in_segment) * u64::from(blcksz) + got as u64,
                ));
                break;
            }
            let blkno = absolute_block(seg.segno, in_segment, relseg_size).unwrap_or(u32::MAX);
            match check_page(&page, blkno) {
                PageCheck::New => scan.new_pages += 1,
                PageCheck::Valid => scan.pages += 1,
                PageCheck::Mismatch { stored, computed } => {
                    scan.pages += 1;
                    scan.bad.push(BadPage {
                        path: entry.path.clone(),
                        blkno,
                        stored,
                        computed,
                    });
                }
            }
            in_segment += 1;
        }
    }
    Ok(scan)
}

/// Fills `page` from `r`; the bytes read, short only at the end of the file.
fn read_page(r: &mut impl Read, page: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < page.len() {
        match r.read(&mut page[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
