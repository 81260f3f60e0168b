//! Page checksums read from files real clusters wrote: every page of a fresh cluster checks
//! out on every version, a flipped bit is found at its block, and PostgreSQL 15's own
//! `pg_checksums --check` finds the same damaged pages.

use std::os::unix::fs::FileExt;

use failback_tests::verify::checksums;
use failback_tests::{Cluster, StopMode, binaries, pg_test, user};

/// Flips one bit of block `blkno` (within its fork) of `rel`'s main fork in the shut-down
/// `cluster`, at byte `at` of the page. Returns the segment file's path.
fn flip(cluster: &Cluster, relpath: &str, blkno: u64, at: u64) -> String {
    let relseg = 131072u64;
    let seg = blkno / relseg;
    let path = if seg == 0 {
        relpath.to_string()
    } else {
        format!("{relpath}.{seg}")
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cluster.data_dir().join(&path))
        .unwrap();
    let off = (blkno % relseg) * 8192 + at;
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, off).unwrap();
    path
}

pg_test!(
    real_pages_check_out_and_a_flipped_bit_is_found_at_its_block,
    |major| {
        let mut c = Cluster::start_new(major, "checked");
        c.pgbench_init(1);
        let rel = c.query_one("SELECT pg_relation_filepath('pgbench_accounts')");
        c.stop(StopMode::Fast);
        let clean = checksums(&mut c);
        assert!(clean.is_clean(), "{clean:?}");
        assert!(clean.pages > 1000, "{clean:?}");
        assert!(clean.files > 100, "{clean:?}");

        let path = flip(&c, &rel, 7, 4000);
        let damaged = checksums(&mut c);
        assert_eq!(damaged.pages, clean.pages);
        assert_eq!(damaged.bad.len(), 1, "{damaged:?}");
        assert_eq!(damaged.bad[0].path, path);
        assert_eq!(damaged.bad[0].blkno, 7);
        assert_ne!(damaged.bad[0].stored, damaged.bad[0].computed);
    }
);

#[test]
fn the_same_damage_as_pg_checksums_finds() {
    let mut c = Cluster::start_new(failback_tests::PgMajor::V15, "checked");
    c.pgbench_init(1);
    let rel = c.query_one("SELECT pg_relation_filepath('pgbench_accounts')");
    c.stop(StopMode::Fast);
    for blkno in [0, 3, 1500] {
        flip(&c, &rel, blkno, 100 + blkno);
    }
    let ours = checksums(&mut c);
    let mut cmd = user::command(binaries::pg15_tool("pg_checksums"));
    cmd.args(["--check", "-D"]).arg(c.data_dir());
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "pg_checksums found nothing:\n{text}");
    let theirs: Vec<u32> = text
        .lines()
        .filter(|l| l.contains("checksum verification failed"))
        // "checksum verification failed in file \"…\", block N: calculated …" (N within the
        // segment file; these are all in the first).
        .filter_map(|l| {
            l.split(", block ")
                .nth(1)?
                .split(':')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    let mine: Vec<u32> = ours.bad.iter().map(|b| b.blkno).collect();
    assert_eq!(mine, theirs, "pg_checksums said:\n{text}");
    assert_eq!(mine, [0, 3, 1500]);
    let checked = text
        .lines()
        .find_map(|l| l.strip_prefix("Blocks scanned:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no block count:\n{text}"));
    assert_eq!(
        ours.pages + ours.new_pages,
        checked,
        "pg_checksums said:\n{text}"
    );
}
