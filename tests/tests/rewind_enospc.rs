//! A full disk stops a rewind with a clear error and loses nothing: once space is freed, the
//! rewind run again resumes and completes.
//!
//! The old primary's data directory is moved onto a tmpfs of its own (bind-mounted back on its
//! path), sized for the whole rewind, then a ballast file beside it leaves only [`FREE`] bytes
//! free: less than the rewind must add (a ~35 MB relation and the WAL that made it), more than
//! the 16 MiB after which the journal records a first batch of pieces as done. On every major
//! version 13–18: `failback rewind` fails with exit status 1 and says that the target's file
//! system is full, while writing which file, and that running it again after freeing space
//! resumes; the target is left unfinished (`failback status` exits 3, PostgreSQL refuses to
//! start on it); the ballast is deleted; `failback rewind` run again resumes from the journal,
//! skips what it records as done, and completes; the old primary then rejoins as a standby of
//! the new one and holds the same data (fingerprints compared).

use std::time::Instant;

use failback_tests::rewind::{
    assert_resumed, assert_stopped_unfinished, assert_tens_of_mb_rewound, assert_unfinished,
    diverged_with_tens_of_mb, rejoin, rewind, rewind_ok, status, stop_for_rewind,
};
use failback_tests::tmpfs::Tmpfs;
use failback_tests::{StopMode, pg_test};

/// What the ballast leaves free on the target's file system.
const FREE: u64 = 24 << 20;

/// Bytes a directory takes on its file system (`du -s -B1`).
fn disk_usage(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-s", "-B1"])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("could not run du: {e}"));
    assert!(out.status.success(), "du {}: {:?}", dir.display(), out);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du printed {:?}", String::from_utf8_lossy(&out.stdout)))
}

pg_test!(full_disk_then_freed_then_resumed, |major| {
    let t0 = Instant::now();
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    // Shut down cleanly: crash recovery would be PostgreSQL writing, before failback's first
    // change; the full disk is to be met by failback's copy.
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);

    let plan = rewind(&old, &new, &["-n"]);
    assert!(plan.success(), "the dry run failed:\n{}", plan.show());
    let to_fetch = plan.report()["bytes_to_fetch"].as_u64().unwrap_or(0);
    assert!(
        to_fetch > FREE + (16 << 20),
        "the rewind must need more than the {FREE} bytes left free, or the disk never fills:\n{}",
        plan.show()
    );
    let size = disk_usage(&old.data_dir()) + to_fetch + (64 << 20);
    let disk = Tmpfs::with_data_dir_of(&mut old, size).unwrap_or_else(|e| {
        panic!(
            "this test needs the target's data directory on a small tmpfs of its own, and could \
             not make one: {e}"
        )
    });
    let ballast = disk.fill_leaving("ballast", FREE);

    let full = rewind(&old, &new, &[]);
    assert_stopped_unfinished(
        &full,
        &[
            "the target's file system is full while writing",
            &format!("\"{}/", old.data_dir().display()),
            "free space on it, then run failback rewind again: it resumes where this run stopped",
        ],
        &[&old, &new],
    );
    assert_unfinished(&mut old);

    std::fs::remove_file(&ballast).unwrap_or_else(|e| panic!("{}: {e}", ballast.display()));
    let run = rewind_ok(&old, &new, &[]);
    let done = assert_resumed(&run, 1);
    let st = status(&old);
    assert_eq!(st.status.code(), Some(0), "{}", st.show());
    assert!(
        !old.data_dir().join("failback.journal").exists(),
        "the journal outlived the rewind"
    );

    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
    // Unmount with the server stopped, before the cluster removes its directory.
    old.stop(StopMode::Fast);
    drop(disk);
    eprintln!(
        "PostgreSQL {major}: full disk, resumed and rejoined in {:.1?} ({} of {} bytes already \
         done)",
        t0.elapsed(),
        done,
        to_fetch
    );
});
