//! The file map: what to do with every path of the two data directories.
//!
//! pg_rewind lists every entry of the source and the target data directory and decides, path by
//! path, whether to create, copy, copy the tail of, truncate, remove, or leave it
//! (`src/bin/pg_rewind/filemap.c`, `decide_file_action`). Some paths are never copied because
//! they only make sense on the server that wrote them (`excludeDirContents`, `excludeFiles`):
//! the contents of `pg_stat_tmp/`, `pg_replslot/`, `pg_dynshmem/`, `pg_notify/`, `pg_serial/`,
//! `pg_snapshots/` and `pg_subtrans/`; `postmaster.pid`, `backup_label`, `pg_internal.init*` and
//! a few more by name; anything under a `pgsql_tmp` directory; macOS `.DS_Store` files.
//!
//! Relation files (main fork only) are not copied whole: they are compared by size and the
//! blocks that the target's WAL touched after the fork are fetched. Everything else that exists
//! on both sides is copied whole (failback refines this with hashes; see the planner).
//!
//! This module is pure: entries come in as values, actions go out as values.

use serde::Serialize;

/// The kind of a directory entry, as `lstat` sees it (symlinks under `pg_tblspc/` and a
/// symlinked `pg_wal` are followed by the lister, not here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
}

/// One entry of a data directory listing, with its path relative to the data directory and
/// separated by `/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    pub path: String,
    pub file_type: FileType,
    /// Size in bytes of a regular file; 0 otherwise. 64-bit: relation segments and stray files
    /// can be larger than 4 GiB.
    pub size: u64,
    /// Where a symlink points (a tablespace location); `None` for other types.
    pub link_target: Option<String>,
}

impl FileEntry {
    /// A regular file of `size` bytes.
    pub fn regular(path: impl Into<String>, size: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            file_type: FileType::Regular,
            size,
            link_target: None,
        }
    }
}

/// What to do with a path; the order is the order of execution (pg_rewind's `file_action_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileAction {
    /// Create a directory or symlink that only the source has.
    Create,
    /// Copy the whole file from the source.
    Copy,
    /// Copy the bytes past the target's size, `[target size, source size)`.
    CopyTail,
    /// Leave the file alone (changed blocks may still be fetched).
    None,
    /// Cut the target file down to the source's size.
    Truncate,
    /// Remove a path that the source does not have, or that must not survive a rewind.
    Remove,
}

impl FileAction {
    pub fn name(self) -> &'static str {
        match self {
            FileAction::Create => "CREATE",
            FileAction::Copy => "COPY",
            FileAction::CopyTail => "COPY_TAIL",
            FileAction::None => "NONE",
            FileAction::Truncate => "TRUNCATE",
            FileAction::Remove => "REMOVE",
        }
    }
}

/// Directories whose contents are never copied (the directory itself is kept).
const EXCLUDED_DIR_CONTENTS: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files never copied, matched by their last path component in any directory.
const EXCLUDED_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
    // failback's own journal of an unfinished rewind (crate::journal): never copied from a
    // source, never removed from a target by the plan.
    crate::journal::JOURNAL_FILE,
];

/// Files never copied, matched by a prefix of their last path component.
const EXCLUDED_FILE_PREFIXES: &[&str] = &["pg_internal.init"];

/// Whether pg_rewind's exclusion lists leave this path out of the copy (`check_file_excluded`).
/// A `.DS_Store` is handled separately: it is never touched at all.
pub fn is_excluded(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or(path);
    if EXCLUDED_FILES.contains(&last) || EXCLUDED_FILE_PREFIXES.iter().any(|p| last.starts_with(p))
    {
        return true;
    }
    if path.contains("/pgsql_tmp") || path.starts_with("pgsql_tmp") {
        return true;
    }
    // The contents of the directory, not the directory itself.
    EXCLUDED_DIR_CONTENTS.iter().any(|dir| {
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
    })
}

/// Whether the last component is a macOS `.DS_Store`, which is neither copied nor removed.
pub fn is_ds_store(path: &str) -> bool {
    path.rsplit('/').next() == Some(".DS_Store")
}

/// Why the two directories cannot be reconciled path by path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileMapError {
    #[error(
        "file \"{path}\" is of different type in source and target ({source_type:?} vs {target_type:?}); remove it from the target or fix the source, then run again"
    )]
    TypeMismatch {
        path: String,
        source_type: FileType,
        target_type: FileType,
    },
    #[error("data file \"{path}\" in source is not a regular file")]
    RelationNotRegular { path: String },
}

/// The whole-path decision for one path (pg_rewind's `decide_file_action`), before blocks.
///
/// `is_relation_file` says whether the path is a main-fork relation segment that round-trips
/// through the relation path rules (only those get block-level treatment).
pub fn decide_file_action(
    path: &str,
    source: Option<&FileEntry>,
    target: Option<&FileEntry>,
    is_relation_file: bool,
) -> Result<FileAction, FileMapError> {
    if path == "global/pg_control" || path == crate::journal::JOURNAL_FILE || is_ds_store(path) {
        // pg_control is written last, by the commit; the journal of the rewind under way (a
        // resumed run plans again with it in the target's list) is the commit's to remove.
        return Ok(FileAction::None);
    }
    if is_excluded(path) {
        return Ok(if target.is_some() {
            FileAction::Remove
        } else {
            FileAction::None
        });
    }
    match (source, target) {
        (None, None) => Ok(FileAction::None),
        (Some(s), None) => match s.file_type {
            FileType::Directory | FileType::Symlink => Ok(FileAction::Create),
            FileType::Regular => Ok(FileAction::Copy),
        },
        (None, Some(_)) => Ok(FileAction::Remove),
        (Some(s), Some(t)) => {
            if s.file_type != t.file_type {
                return Err(FileMapError::TypeMismatch {
                    path: path.to_string(),
                    source_type: s.file_type,
                    target_type: t.file_type,
                });
            }
            if path.ends_with("PG_VERSION") {
                return Ok(FileAction::None);
            }
            match s.file_type {
                FileType::Directory | FileType::Symlink => Ok(FileAction::None),
                FileType::Regular if !is_relation_file => Ok(FileAction::Copy),
                FileType::Regular => Ok(match t.size.cmp(&s.size) {
                    std::cmp::Ordering::Less => FileAction::CopyTail,
                    std::cmp::Ordering::Greater => FileAction::Truncate,
                    std::cmp::Ordering::Equal => FileAction::None,
                }),
            }
        }
    }
}

/// pg_rewind's execution order: by action, then by path; removals deepest first (reverse path
/// order) so that a directory is emptied before it is removed.
pub fn execution_order(a: (&str, FileAction), b: (&str, FileAction)) -> std::cmp::Ordering {
    a.1.cmp(&b.1).then_with(|| {
        if a.1 == FileAction::Remove {
            b.0.cmp(a.0)
        } else {
            a.0.cmp(b.0)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(path: &str, size: u64) -> FileEntry {
        FileEntry::regular(path, size)
    }

    fn dir(path: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            file_type: FileType::Directory,
            size: 0,
            link_target: None,
        }
    }

    #[test]
    fn exclusions_follow_pg_rewind() {
        for p in [
            "postmaster.pid",
            "backup_label",
            "base/1/pg_internal.init",
            "global/pg_internal.init.123",
            "base/pgsql_tmp",
            "base/pgsql_tmp/pgsql_tmp123.0",
            "pg_tblspc/16384/PG_15_202209061/pgsql_tmp/x",
            "pg_subtrans/0000",
            "pg_replslot/slot/state",
            "pg_stat_tmp/global.stat",
        ] {
            assert!(is_excluded(p), "{p}");
        }
        for p in [
            "pg_subtrans",
            "pg_stat_tmp",
            "backup_label.old",
            "pg_stat/pgstat.stat",
            "base/1/1259",
            "pg_wal/000000010000000000000001",
            "pg_subtransx/1",
        ] {
            assert!(!is_excluded(p), "{p}");
        }
    }

    #[test]
    fn decisions() {
        let d = |p: &str, s: Option<FileEntry>, t: Option<FileEntry>, rel| {
            decide_file_action(p, s.as_ref(), t.as_ref(), rel).unwrap()
        };
        let r = |size| Some(reg("x", size));
        assert_eq!(
            d("global/pg_control", r(8192), r(8192), false),
            FileAction::None
        );
        assert_eq!(d("postmaster.pid", None, r(1), false), FileAction::Remove);
        assert_eq!(d("postmaster.pid", r(1), None, false), FileAction::None);
        // The journal of a resumed run, which plans again with it in the target's list.
        assert_eq!(d("failback.journal", None, r(1), false), FileAction::None);
        assert_eq!(d("base/5/16384", r(8192), None, true), FileAction::Copy);
        assert_eq!(
            d("base/7", Some(dir("base/7")), None, false),
            FileAction::Create
        );
        assert_eq!(d("base/5/16384", None, r(8192), true), FileAction::Remove);
        assert_eq!(
            d("base/5/16384", r(16384), r(8192), true),
            FileAction::CopyTail
        );
        assert_eq!(
            d("base/5/16384", r(8192), r(16384), true),
            FileAction::Truncate
        );
        assert_eq!(d("base/5/16384", r(8192), r(8192), true), FileAction::None);
        assert_eq!(
            d("base/5/16384_vm", r(8192), r(8192), false),
            FileAction::Copy
        );
        assert_eq!(d("base/5/PG_VERSION", r(3), r(3), false), FileAction::None);
        assert_eq!(d("x/.DS_Store", r(3), None, false), FileAction::None);
        assert!(decide_file_action("base/5", Some(&dir("a")), Some(&reg("a", 1)), false).is_err());
    }

    #[test]
    fn order_removes_deepest_first() {
        let mut v = vec![
            ("base/pgsql_tmp", FileAction::Remove),
            ("base/pgsql_tmp/f", FileAction::Remove),
            ("b", FileAction::Copy),
            ("a", FileAction::Copy),
            ("d", FileAction::Create),
        ];
        v.sort_by(|a, b| execution_order(*a, *b));
        assert_eq!(
            v,
            vec![
                ("d", FileAction::Create),
                ("a", FileAction::Copy),
                ("b", FileAction::Copy),
                ("base/pgsql_tmp/f", FileAction::Remove),
                ("base/pgsql_tmp", FileAction::Remove),
            ]
        );
    }
}
