//! An error and its causes, as both programs print them.
//!
//! A library error says what failed and keeps why as its source; the chain is the whole story.
//! Both `failback` and `failbackd` print it the same way, outermost first, never as a debug dump
//! (whatever `RUST_BACKTRACE` says):
//!
//! ```text
//! failback: error: could not read the source's control file
//!   caused by: source did not answer in time: ...
//! ```

use std::error::Error;

/// `e`, then each of its causes in turn.
pub fn causes<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(e), |e: &&'a (dyn Error + 'static)| (*e).source())
}

/// What `program` prints for `e`: `PROGRAM: error: …`, then a `  caused by: …` line per cause.
pub fn error_message(program: &str, e: &(dyn Error + 'static)) -> String {
    let mut lines = causes(e);
    let mut out = format!(
        "{program}: error: {}",
        lines.next().map(ToString::to_string).unwrap_or_default()
    );
    for cause in lines {
        out.push_str(&format!("\n  caused by: {cause}"));
    }
    out
}

/// `e` and its causes on one line, joined by `: ` (for messages that embed another error).
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    causes(e)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("could not read the control file")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_is_printed_outermost_first() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(
            error_message("failback", &e),
            "failback: error: could not read the control file\n  caused by: disk on fire"
        );
        assert_eq!(
            one_line(&e),
            "could not read the control file: disk on fire"
        );
        assert_eq!(causes(&e).count(), 2);
    }
}
