//! PostgreSQL major versions and the constants that tell them apart on disk.
//!
//! A data directory does not record its major version as a number in `pg_control`; it records
//! `pg_control_version` (`PG_CONTROL_VERSION`, bumped when the control file layout changes) and
//! `catalog_version_no` (`CATALOG_VERSION_NO`, a date stamp bumped with every catalog change,
//! fixed within a stable branch). WAL pages carry `XLOG_PAGE_MAGIC`, bumped whenever the WAL
//! format changes. Together they identify the major version (`catalog/pg_control.h`,
//! `catalog/catversion.h`, `access/xlog_internal.h`).

use std::fmt;

/// A supported PostgreSQL major version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PgMajor {
    V13,
    V14,
    V15,
    V16,
    V17,
    V18,
}

impl PgMajor {
    pub const ALL: [PgMajor; 6] = [
        PgMajor::V13,
        PgMajor::V14,
        PgMajor::V15,
        PgMajor::V16,
        PgMajor::V17,
        PgMajor::V18,
    ];

    pub fn number(self) -> u32 {
        match self {
            PgMajor::V13 => 13,
            PgMajor::V14 => 14,
            PgMajor::V15 => 15,
            PgMajor::V16 => 16,
            PgMajor::V17 => 17,
            PgMajor::V18 => 18,
        }
    }

    pub fn from_number(n: u32) -> Option<PgMajor> {
        PgMajor::ALL.into_iter().find(|m| m.number() == n)
    }

    /// `XLOG_PAGE_MAGIC`.
    pub fn xlog_page_magic(self) -> u16 {
        match self {
            PgMajor::V13 => 0xD106,
            PgMajor::V14 => 0xD10D,
            PgMajor::V15 => 0xD110,
            PgMajor::V16 => 0xD113,
            PgMajor::V17 => 0xD116,
            PgMajor::V18 => 0xD118,
        }
    }

    /// `PG_CONTROL_VERSION`.
    pub fn pg_control_version(self) -> u32 {
        match self {
            PgMajor::V13 | PgMajor::V14 | PgMajor::V15 | PgMajor::V16 => 1300,
            PgMajor::V17 => 1700,
            PgMajor::V18 => 1800,
        }
    }

    /// `CATALOG_VERSION_NO` of the stable branch.
    pub fn catalog_version_no(self) -> u32 {
        match self {
            PgMajor::V13 => 202007201,
            PgMajor::V14 => 202107181,
            PgMajor::V15 => 202209061,
            PgMajor::V16 => 202307071,
            PgMajor::V17 => 202406281,
            PgMajor::V18 => 202506291,
        }
    }

    /// The version that writes WAL pages with this magic.
    pub fn from_xlog_page_magic(magic: u16) -> Option<PgMajor> {
        PgMajor::ALL
            .into_iter()
            .find(|m| m.xlog_page_magic() == magic)
    }

    /// The version whose control file carries these two numbers; both must match.
    pub fn from_control(pg_control_version: u32, catalog_version_no: u32) -> Option<PgMajor> {
        PgMajor::ALL.into_iter().find(|m| {
            m.pg_control_version() == pg_control_version
                && m.catalog_version_no() == catalog_version_no
        })
    }

    /// `TABLESPACE_VERSION_DIRECTORY`: the directory inside a tablespace that this version owns,
    /// `PG_<major>_<catversion>`.
    pub fn tablespace_version_directory(self) -> String {
        format!("PG_{}_{}", self.number(), self.catalog_version_no())
    }
}

impl fmt::Display for PgMajor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_identify_each_version_uniquely() {
        for m in PgMajor::ALL {
            assert_eq!(PgMajor::from_xlog_page_magic(m.xlog_page_magic()), Some(m));
            assert_eq!(
                PgMajor::from_control(m.pg_control_version(), m.catalog_version_no()),
                Some(m)
            );
            assert_eq!(PgMajor::from_number(m.number()), Some(m));
        }
        assert_eq!(PgMajor::from_control(1300, 202406281), None);
        assert_eq!(
            PgMajor::V15.tablespace_version_directory(),
            "PG_15_202209061"
        );
    }
}
