//! Every line failbackd prints, in one of two formats (`--log-format`).
//!
//! `text` is for a person at a terminal or journald: `failbackd: ...`, with `warning: ` or
//! `error: ` after the name where a line is one. `json` is for a log pipeline: one object per
//! line with the time (RFC 3339, UTC), the level (`info`, `warning`, `error`), the message,
//! and fields where a line has natural ones (the audit log's `event` and `peer`, the shutdown's
//! `in_flight`), so that nothing downstream parses English.
//!
//! The format is chosen once, at start-up, before the first line; until then (and in the
//! library's tests) lines are text. A line is written with one `write` to standard error, so
//! lines of several threads never interleave.

use std::io::Write;
use std::sync::OnceLock;
use std::time::SystemTime;

use serde_json::Value;

/// How lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `failbackd: ...`, as a person reads it.
    #[default]
    Text,
    /// One JSON object a line: `ts`, `level`, `msg` and fields.
    Json,
}

/// How much a line matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Chooses the format of every line from now on; the first choice stays.
pub fn set_format(format: Format) {
    let _ = FORMAT.set(format);
}

fn format() -> Format {
    FORMAT.get().copied().unwrap_or_default()
}

/// A line saying how failbackd is doing.
pub fn info(msg: &str) {
    write(&render(
        format(),
        Level::Info,
        true,
        msg,
        &[],
        SystemTime::now(),
    ));
}

/// A line about something the operator should fix (`failbackd: warning: ...` in text).
pub fn warning(msg: &str) {
    write(&render(
        format(),
        Level::Warning,
        true,
        msg,
        &[],
        SystemTime::now(),
    ));
}

/// A line of a part of failbackd that speaks for itself (the audit log, the WAL summarizer):
/// in text `failbackd: MSG` whatever its level, as these lines always read; `level` and
/// `fields` are for JSON.
pub fn event(level: Level, msg: &str, fields: &[(&str, Value)]) {
    write(&render(
        format(),
        level,
        false,
        msg,
        fields,
        SystemTime::now(),
    ));
}

/// The error failbackd exits with: in text the chain as failback prints its own (the error,
/// then a `caused by:` line for each cause), in JSON one line with the chain joined.
pub fn exit_error(e: &(dyn std::error::Error + 'static)) {
    let line = match format() {
        Format::Text => failback_common::errors::error_message("failbackd", e),
        Format::Json => render(
            Format::Json,
            Level::Error,
            true,
            &failback_common::errors::one_line(e),
            &[],
            SystemTime::now(),
        ),
    };
    write(&line);
}

fn write(line: &str) {
    let mut out = String::with_capacity(line.len() + 1);
    out.push_str(line);
    out.push('\n');
    // Nowhere to tell of a standard error that cannot be written.
    let _ = std::io::stderr().lock().write_all(out.as_bytes());
}

/// One line as `format` writes it; `labelled`: the level is named in text (`warning: `,
/// `error: `).
fn render(
    format: Format,
    level: Level,
    labelled: bool,
    msg: &str,
    fields: &[(&str, Value)],
    now: SystemTime,
) -> String {
    match format {
        Format::Text => match (labelled, level) {
            (true, Level::Warning | Level::Error) => {
                format!("failbackd: {}: {msg}", level.name())
            }
            _ => format!("failbackd: {msg}"),
        },
        Format::Json => {
            // In this order, whatever serde_json's maps keep: what a person scanning the
            // lines looks for first.
            let mut line = format!(
                "{{\"ts\":\"{}\",\"level\":\"{}\",\"msg\":{}",
                rfc3339(now),
                level.name(),
                Value::from(msg)
            );
            for (k, v) in fields {
                line.push_str(&format!(",{}:{v}", Value::from(*k)));
            }
            line.push('}');
            line
        }
    }
}

/// `t` as RFC 3339 in UTC, to the millisecond: `2026-12-01T18:25:49.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let c = failback_common::civil::from_unix(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        c.second,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, millis: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn text_lines_read_as_they_always_did() {
        let t = at(0, 0);
        let r = |level, labelled, msg| render(Format::Text, level, labelled, msg, &[], t);
        assert_eq!(
            r(Level::Info, true, "serving /d on 1"),
            "failbackd: serving /d on 1"
        );
        assert_eq!(
            r(Level::Warning, true, "serving without TLS"),
            "failbackd: warning: serving without TLS"
        );
        assert_eq!(r(Level::Error, true, "no"), "failbackd: error: no");
        // The audit log's and the summarizer's lines carry no label.
        assert_eq!(
            r(Level::Warning, false, "refused a QUIC request from x: y"),
            "failbackd: refused a QUIC request from x: y"
        );
    }

    #[test]
    fn json_lines_are_objects_with_time_level_message_and_fields() {
        let line = render(
            Format::Json,
            Level::Warning,
            false,
            "refused \"x\"",
            &[("event", "refused".into()), ("in_flight", 3.into())],
            at(1_796_149_549, 123),
        );
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("{\"ts\":\"2026-12-01T18:25:49.123Z\",\"level\""),
            "{line}"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ts"], "2026-12-01T18:25:49.123Z");
        assert_eq!(v["level"], "warning");
        assert_eq!(v["msg"], "refused \"x\"");
        assert_eq!(v["event"], "refused");
        assert_eq!(v["in_flight"], 3);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(at(0, 7)), "1970-01-01T00:00:00.007Z");
        assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00.000Z");
    }
}
