//! The benchmarks' command lines: `--name VALUE` and `--flag`.
//!
//! A benchmark reads what it takes with [`arg`] and [`flag`], then calls [`done`] before its
//! first minute of work: an argument it did not read (a misspelled flag, `--help`) stops it
//! there with the list of what it does read, rather than being ignored while a pair is built
//! with the defaults; a value that does not parse stops it too, rather than falling back to the
//! default.

use std::fmt::Display;
use std::str::FromStr;
use std::sync::Mutex;

/// What the benchmark has read so far: each name, with its default when it takes a value.
static READ: Mutex<Vec<(&'static str, Option<String>)>> = Mutex::new(Vec::new());

fn note(name: &'static str, default: Option<String>) {
    let mut read = READ.lock().unwrap_or_else(|e| e.into_inner());
    if !read.iter().any(|(n, _)| *n == name) {
        read.push((name, default));
    }
}

fn argv() -> Vec<String> {
    std::env::args().skip(1).collect()
}

/// The value after `name` on the command line, or `default`. A value that does not parse ends
/// the process with a message.
pub fn arg<T: FromStr + Display>(name: &'static str, default: T) -> T {
    note(name, Some(default.to_string()));
    let argv = argv();
    let Some(i) = argv.iter().position(|a| a == name) else {
        return default;
    };
    match argv.get(i + 1) {
        Some(v) => v.parse().unwrap_or_else(|_| {
            stop(&format!(
                "{name} {v:?}: not a valid value (the default is {default})"
            ))
        }),
        None => stop(&format!("{name} needs a value (the default is {default})")),
    }
}

/// `--out FILE`, where a benchmark writes its table: by default `bench/results/NAME`.
pub fn out_file(name: &str) -> std::path::PathBuf {
    let default = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(name);
    arg("--out", default.display().to_string()).into()
}

/// Whether `name` is on the command line.
pub fn flag(name: &'static str) -> bool {
    note(name, None);
    argv().iter().any(|a| a == name)
}

/// Checks that every argument was read by [`arg`] or [`flag`] (cargo bench's own `--bench`
/// aside). `--help` prints what the benchmark reads and ends the process; anything else
/// unread ends it with an error and the same list.
pub fn done() {
    let read = READ.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match unread(&read, &argv()) {
        None => {}
        Some(Unread::Help) => {
            println!("{}", usage(&read));
            std::process::exit(0);
        }
        Some(Unread::Unknown(a)) => stop(&format!("unknown argument {a:?}")),
    }
}

#[derive(Debug, PartialEq)]
enum Unread {
    Help,
    Unknown(String),
}

/// The first argument of `argv` that none of `read` takes (a value's name takes the argument
/// after it too).
fn unread(read: &[(&'static str, Option<String>)], argv: &[String]) -> Option<Unread> {
    let mut i = 0;
    while i < argv.len() {
        let a = argv[i].as_str();
        match read.iter().find(|(n, _)| *n == a) {
            Some((_, Some(_))) => i += 2,
            Some((_, None)) => i += 1,
            None if a == "--bench" => i += 1,
            None if a == "-h" || a == "--help" => return Some(Unread::Help),
            None => return Some(Unread::Unknown(a.to_owned())),
        }
    }
    None
}

fn usage(read: &[(&'static str, Option<String>)]) -> String {
    let program = std::env::args().next().unwrap_or_default();
    let program = program.rsplit('/').next().unwrap_or_default();
    let mut s = format!("{program} reads:");
    for (name, default) in read {
        match default {
            Some(d) if d.is_empty() => s.push_str(&format!("\n  {name} VALUE")),
            Some(d) => s.push_str(&format!("\n  {name} VALUE  (default {d})")),
            None => s.push_str(&format!("\n  {name}")),
        }
    }
    s
}

fn stop(why: &str) -> ! {
    let read = READ.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!("error: {why}\n{}", usage(&read));
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn every_argument_must_be_one_the_benchmark_reads() {
        let read = [("--scale", Some("100".to_owned())), ("--skip-wan", None)];
        let unread = |args: &[&str]| unread(&read, &argv(args));
        assert_eq!(unread(&[]), None);
        assert_eq!(unread(&["--scale", "10", "--skip-wan", "--bench"]), None);
        // A value is taken whatever it looks like.
        assert_eq!(unread(&["--scale", "--skip-wan"]), None);
        assert_eq!(
            unread(&["--skip-wan", "--sclae", "10"]),
            Some(Unread::Unknown("--sclae".into()))
        );
        assert_eq!(
            unread(&["--scale", "10", "10"]),
            Some(Unread::Unknown("10".into()))
        );
        assert_eq!(unread(&["--help"]), Some(Unread::Help));
        assert_eq!(unread(&["--skip-wan", "-h"]), Some(Unread::Help));
    }

    #[test]
    fn the_usage_lists_every_name_with_its_default() {
        let u = usage(&[
            ("--scale", Some("100".to_owned())),
            ("--out", Some(String::new())),
            ("--skip-wan", None),
        ]);
        assert!(u.contains("\n  --scale VALUE  (default 100)"), "{u}");
        assert!(u.contains("\n  --out VALUE\n"), "{u}");
        assert!(u.ends_with("\n  --skip-wan"), "{u}");
    }
}
