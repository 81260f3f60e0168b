//! What a stretch of WAL changed in the relation files: the set a rewind copies.
//!
//! Almost every change to a relation's main fork is a WAL record with a block reference to the
//! block it changes (`XLogRegisterBuffer`), so the blocks those references name are the blocks
//! that may differ from another cluster's that did not replay that WAL (pg_rewind's
//! `extractPageInfo`). A few records change files without naming blocks:
//!
//! - `SMGR CREATE` makes a relation file; its contents follow as block references, but a file
//!   of the same relfilenode made by the *other* cluster after the divergence holds other
//!   contents at the same offsets. Such a file is copied whole.
//! - `DBASE CREATE` (13/14) and `DBASE CREATE_FILE_COPY` (15+) copy a whole database directory
//!   from a template, file by file, outside WAL. The database's files are copied whole.
//! - `SMGR TRUNCATE`, dropped relations (`XACT` commit/abort), `DBASE DROP`: a file shorter or
//!   gone, which comparing the two file lists finds; blocks written again after a truncation
//!   are named by their own records.
//!
//! pg_rewind can ignore the first two because it replays all of the source's WAL since the
//! divergence; a rewind that copies the pages that differ instead must copy them.
//!
//! [`WalChanges`] is fed records one at a time ([`WalChanges::record`]) and turned into
//! [`Changes`]: file paths and block numbers, what the planner and the wire speak.

use std::collections::{BTreeSet, HashSet};

use crate::PgMajor;
use crate::plan::{ChangedBlocks, PageMap};
use crate::relpath::{ForkNumber, RelFileLocator};
use crate::wal::rmgr::{RM_DBASE_ID, RM_SMGR_ID};
use crate::wal::{RecordKind, WalRecord};

/// The changes of a stretch of WAL, gathered as its records name them.
#[derive(Clone, Debug, Default)]
pub struct WalChanges {
    blocks: ChangedBlocks,
    created: HashSet<RelFileLocator, rustc_hash::FxBuildHasher>,
    databases: BTreeSet<(u32, u32)>,
    records: u64,
}

impl WalChanges {
    /// The resource managers whose record kinds [`WalChanges::record`] looks at: a decoder
    /// feeding it need interpret no others ([`crate::wal::WalDecoder::interpret_only`]).
    pub const KINDS_FROM: [u8; 2] = [RM_SMGR_ID, RM_DBASE_ID];

    /// Takes one record in: its main-fork block references in segments of `relseg_size`
    /// blocks (`RELSEG_SIZE`), and the files it makes without naming blocks.
    pub fn record(&mut self, rec: &WalRecord<'_>, relseg_size: u32) {
        self.records += 1;
        for b in rec.blocks {
            if i32::from(b.fork()) == ForkNumber::Main.to_i32() {
                self.blocks.insert(b.locator, b.blkno, relseg_size);
            }
        }
        match rec.kind {
            RecordKind::SmgrCreate { locator, fork }
                if fork == ForkNumber::Main.to_i32() as u32 =>
            {
                self.created.insert(locator);
            }
            RecordKind::DbaseCreateFileCopy {
                db_id,
                tablespace_id,
                ..
            } => {
                self.databases.insert((tablespace_id, db_id));
            }
            _ => {}
        }
    }

    /// Adds the changes of another stretch of WAL (a WAL summary of one segment).
    pub fn absorb(&mut self, other: &WalChanges) {
        self.blocks.union_with(&other.blocks);
        self.created.extend(other.created.iter().copied());
        self.databases.extend(other.databases.iter().copied());
        self.records += other.records;
    }

    /// Records taken in so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The changes, with the paths of a server of `major`.
    pub fn finish(self, major: PgMajor) -> Changes {
        Changes {
            page_map: self.blocks.into_page_map(major),
            created: self.created.into_iter().collect(),
            databases: self.databases,
        }
    }
}

/// Relation files and blocks that may differ: what one side's WAL says it changed, or the union
/// of both sides'.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Main-fork blocks, by segment file path.
    pub page_map: PageMap,
    /// Relations whose main fork was created: copied whole where both sides have them.
    pub created: BTreeSet<RelFileLocator>,
    /// Databases copied from a template outside WAL, as (tablespace, database): copied whole.
    pub databases: BTreeSet<(u32, u32)>,
}

impl Changes {
    /// Adds another side's (or another stretch's) changes.
    pub fn merge(&mut self, other: Changes) {
        for (path, blocks) in other.page_map.files {
            match self.page_map.files.get_mut(&path) {
                Some(mine) => mine.union_with(&blocks),
                None => {
                    self.page_map.files.insert(path, blocks);
                }
            }
        }
        self.created.extend(other.created);
        self.databases.extend(other.databases);
    }

    /// Whether the relation `locator` must be copied whole rather than block by block.
    pub fn copies_whole(&self, locator: RelFileLocator) -> bool {
        self.created.contains(&locator) || self.databases.contains(&(locator.spcOid, locator.dbOid))
    }

    /// Changed blocks in all.
    pub fn block_count(&self) -> usize {
        self.page_map.block_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_merge_and_created_files_are_whole() {
        let loc = |rel| RelFileLocator::new(1663, 5, rel);
        let mut a = Changes::default();
        a.page_map.insert("base/5/16384", 1);
        a.page_map.insert("base/5/16384", 7);
        a.created.insert(loc(16390));
        let mut b = Changes::default();
        b.page_map.insert("base/5/16384", 2);
        b.page_map.insert("base/5/16385", 0);
        b.databases.insert((1663, 16400));
        a.merge(b);
        assert_eq!(
            a.page_map.files["base/5/16384"].iter().collect::<Vec<_>>(),
            [1, 2, 7]
        );
        assert_eq!(a.block_count(), 4);
        assert!(a.copies_whole(loc(16390)));
        assert!(!a.copies_whole(loc(16384)));
        assert!(a.copies_whole(RelFileLocator::new(1663, 16400, 1259)));
        assert!(!a.copies_whole(RelFileLocator::new(16500, 16400, 1259)));
    }
}
