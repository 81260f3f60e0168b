//! What a rewound directory needs to start as a standby: `backup_label` and recovery settings.
//!
//! After the files are copied, the target is a mix of blocks from before and after the fork;
//! only WAL replay from the last common checkpoint makes it consistent. pg_rewind writes a
//! `backup_label` naming that checkpoint (`createBackupLabel` in `pg_rewind.c`), so recovery
//! starts there instead of at the control file's checkpoint, and sets the control file's
//! `minRecoveryPoint` to the source's end of WAL, so the server refuses connections until it has
//! replayed that far (`BACKUP FROM: standby`). PostgreSQL reads the label in
//! `read_backup_label` (`access/transam/xlogrecovery.c`): the first two lines are required, the
//! rest optional and in a fixed order.
//!
//! To follow the new primary the target also needs `standby.signal` and `primary_conninfo`
//! (`fe_utils/recovery_gen.c`). pg_rewind appends a second `primary_conninfo` line to
//! `postgresql.auto.conf`; failback replaces an existing one instead, so the file says one thing.

use crate::lsn::{Lsn, TimeLineId, wal_file_name};
use crate::rewind::WINDOW_LABEL;

/// The `backup_label` text pg_rewind writes, for a rewind starting at checkpoint `checkpoint`
/// whose redo pointer is `redo` on timeline `tli`, plus a `LABEL:` line naming failback (the
/// line pg_basebackup's labels have after `START TIME`, which `read_backup_label` reads there)
/// so that an operator, or an orchestrator's log, can tell which tool wrote it. `start_time` is
/// informational (`%Y-%m-%d %H:%M:%S %Z`); the caller supplies it because this module reads no
/// clock.
pub fn backup_label(
    redo: Lsn,
    tli: TimeLineId,
    checkpoint: Lsn,
    wal_segment_size: u32,
    start_time: &str,
) -> String {
    let file = wal_file_name(tli, redo.segment_number(wal_segment_size), wal_segment_size);
    format!(
        "START WAL LOCATION: {redo} (file {file})\n\
         CHECKPOINT LOCATION: {checkpoint}\n\
         BACKUP METHOD: pg_rewind\n\
         BACKUP FROM: standby\n\
         START TIME: {start_time}\n\
         LABEL: {WINDOW_LABEL}\n"
    )
}

/// The parts of a `backup_label` recovery acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupLabel {
    pub redo: Lsn,
    pub tli: TimeLineId,
    pub checkpoint: Lsn,
}

/// Reads the two required lines of a `backup_label` back (for `failback status` and tests).
pub fn parse_backup_label(text: &str) -> Option<BackupLabel> {
    let mut lines = text.lines();
    let first = lines.next()?.strip_prefix("START WAL LOCATION: ")?;
    let (lsn, rest) = first.split_once(' ')?;
    let file = rest.strip_prefix("(file ")?.strip_suffix(')')?;
    let tli = u32::from_str_radix(file.get(0..8)?, 16).ok()?;
    let checkpoint = lines.next()?.strip_prefix("CHECKPOINT LOCATION: ")?;
    Some(BackupLabel {
        redo: lsn.parse().ok()?,
        tli,
        checkpoint: checkpoint.trim().parse().ok()?,
    })
}

/// Quotes a libpq connection-string value: bare when it is only `[A-Za-z0-9_.]`, otherwise in
/// single quotes with `'` and `\` escaped by a backslash (`recovery_gen.c`).
pub fn quote_conninfo_value(v: &str) -> String {
    if !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return v.to_string();
    }
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// Quotes a value for a `postgresql.conf` line: single quotes, with `'` and `\` doubled.
pub fn quote_guc_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push(c);
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// `postgresql.auto.conf` with `setting = 'value'` set once: every existing line for the
/// setting is dropped and one line appended, so the file never holds two that disagree.
pub fn set_auto_conf(auto_conf: &str, setting: &str, value: &str) -> String {
    let mut out = drop_auto_conf(auto_conf, setting);
    out.push_str(setting);
    out.push_str(" = ");
    out.push_str(&quote_guc_value(value));
    out.push('\n');
    out
}

/// `postgresql.auto.conf` without any line for `setting`.
pub fn drop_auto_conf(auto_conf: &str, setting: &str) -> String {
    let mut out = String::with_capacity(auto_conf.len() + 64);
    for line in auto_conf.lines() {
        let name = line
            .trim_start()
            .split(['=', ' ', '\t'])
            .next()
            .unwrap_or("");
        if name.eq_ignore_ascii_case(setting) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_round_trips_and_matches_pg_rewind_layout() {
        let l = backup_label(
            Lsn(0x30033D8),
            1,
            Lsn(0x3003410),
            16 << 20,
            "2026-11-23 21:00:00 UTC",
        );
        assert_eq!(
            l.lines().next().unwrap(),
            "START WAL LOCATION: 0/30033D8 (file 000000010000000000000003)"
        );
        assert!(l.contains("\nCHECKPOINT LOCATION: 0/3003410\n"));
        assert!(l.contains("\nBACKUP METHOD: pg_rewind\nBACKUP FROM: standby\n"));
        assert!(l.ends_with("\nLABEL: failback rewind\n"), "{l}");
        assert_eq!(
            parse_backup_label(&l),
            Some(BackupLabel {
                redo: Lsn(0x30033D8),
                tli: 1,
                checkpoint: Lsn(0x3003410)
            })
        );
        assert_eq!(parse_backup_label("garbage"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_conninfo_value("localhost"), "localhost");
        assert_eq!(quote_conninfo_value("/tmp/x y"), "'/tmp/x y'");
        assert_eq!(quote_conninfo_value("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(quote_conninfo_value(""), "''");
        assert_eq!(quote_guc_value("user='x'"), "'user=''x'''");
    }

    #[test]
    fn auto_conf_holds_one_primary_conninfo() {
        let before = "# Do not edit this file manually!\nprimary_conninfo = 'host=old'\nwork_mem = '4MB'\nPRIMARY_CONNINFO='host=older'\n";
        let after = set_auto_conf(before, "primary_conninfo", "host=new port=5433");
        assert_eq!(
            after,
            "# Do not edit this file manually!\nwork_mem = '4MB'\nprimary_conninfo = 'host=new port=5433'\n"
        );
        assert_eq!(after.matches("primary_conninfo").count(), 1);
        // A setting whose name merely starts the same is kept.
        let s = set_auto_conf("primary_conninfo_x = 1\n", "primary_conninfo", "a");
        assert!(s.starts_with("primary_conninfo_x = 1\n"));
    }
}
