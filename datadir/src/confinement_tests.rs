//! How [`DataDir`] keeps to the data directory: the links PostgreSQL makes are followed, no
//! other, and none to a directory of another owner; a link swapped in while it reads is not
//! followed (with the component walk here; `tests/confinement_race.rs` races `openat2`); and
//! [`check_data_directory`].

use crate::*;
use std::fs;
use std::os::unix::fs::symlink;

/// Runs `f` with `openat2`, then with the component-by-component walk that replaces it where
/// the kernel lacks it.
pub(crate) fn both(f: impl Fn()) {
    for walk in [false, true] {
        beneath::force_walk(walk);
        f();
    }
    beneath::force_walk(false);
}

fn refused<T: std::fmt::Debug>(r: Result<T, DataDirError>) -> bool {
    matches!(r, Err(DataDirError::PathNotAllowed(_)))
}

fn paths(list: &[FileEntry]) -> Vec<(&str, FileType)> {
    list.iter()
        .map(|e| (e.path.as_str(), e.file_type))
        .collect()
}

/// A data directory with its WAL and one tablespace elsewhere, linked as initdb --waldir and
/// CREATE TABLESPACE link them; (the temporary directory, the data directory).
fn cluster() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("data");
    fs::create_dir_all(root.join("base/1")).unwrap();
    fs::create_dir_all(root.join("pg_tblspc")).unwrap();
    fs::write(root.join("base/1/1234"), b"inside").unwrap();
    let wal = t.path().join("wal");
    fs::create_dir_all(wal.join("archive_status")).unwrap();
    fs::write(wal.join("000000010000000000000001"), b"segment").unwrap();
    symlink(&wal, root.join("pg_wal")).unwrap();
    let ts = t.path().join("ts");
    fs::create_dir_all(ts.join("PG_16_202307071/1")).unwrap();
    fs::write(ts.join("PG_16_202307071/1/5678"), b"tablespace").unwrap();
    // Relative, as a moved tablespace can be.
    symlink("../../ts", root.join("pg_tblspc/16400")).unwrap();
    fs::create_dir_all(t.path().join("outside")).unwrap();
    fs::write(t.path().join("outside/1234"), b"secret").unwrap();
    fs::write(t.path().join("outside/only_outside"), b"secret").unwrap();
    (t, root)
}

#[test]
fn pg_wal_and_tablespace_links_are_followed() {
    let (_t, root) = cluster();
    both(|| {
        let dd = DataDir::new(&root);
        assert_eq!(
            dd.read_file("pg_wal/000000010000000000000001").unwrap(),
            Some(b"segment".to_vec())
        );
        assert_eq!(
            dd.read_file("pg_tblspc/16400/PG_16_202307071/1/5678")
                .unwrap(),
            Some(b"tablespace".to_vec())
        );
        let mut names = dd.names("pg_wal").unwrap();
        names.sort();
        assert_eq!(names, ["000000010000000000000001", "archive_status"]);
        assert!(dd.resolve("pg_wal/archive_status").is_ok());
        let list = dd.list().unwrap();
        let p = paths(&list);
        assert!(p.contains(&("pg_wal", FileType::Directory)));
        assert!(p.contains(&("pg_wal/archive_status", FileType::Directory)));
        assert!(p.contains(&("pg_wal/000000010000000000000001", FileType::Regular)));
        assert!(p.contains(&("pg_tblspc/16400", FileType::Symlink)));
        assert!(p.contains(&("pg_tblspc/16400/PG_16_202307071/1/5678", FileType::Regular)));
        let link = list.iter().find(|e| e.path == "pg_tblspc/16400").unwrap();
        assert_eq!(link.link_target.as_deref(), Some("../../ts"));
    });
}

#[test]
fn links_anywhere_else_are_refused() {
    let (t, root) = cluster();
    let outside = t.path().join("outside");
    symlink(&outside, root.join("base/lnk")).unwrap();
    symlink(outside.join("1234"), root.join("base/1/evil")).unwrap();
    symlink(&outside, t.path().join("ts/PG_16_202307071/lnk")).unwrap();
    symlink(
        outside.join("1234"),
        t.path().join("wal/000000010000000000000002"),
    )
    .unwrap();
    fs::write(root.join("base/1/file"), b"").unwrap();
    both(|| {
        let dd = DataDir::new(&root);
        let mut buf = Vec::new();
        for bad in [
            "base/lnk/1234",
            "base/lnk",
            "base/1/evil",
            "pg_tblspc/16400/PG_16_202307071/lnk/1234",
            "pg_wal/000000010000000000000002",
        ] {
            assert!(refused(dd.open(bad)), "{bad}");
            assert!(refused(dd.read_file(bad)), "{bad}");
            assert!(refused(dd.read_range(bad, 0, 6, &mut buf)), "{bad}");
            assert!(refused(dd.resolve(bad)), "{bad}");
        }
        assert!(refused(dd.names("base/lnk")));
        // A file on the way is no link: an error, not a refusal.
        assert!(matches!(
            dd.read_file("base/1/file/x"),
            Err(DataDirError::Io { .. })
        ));
        assert!(dd.resolve("base/1/nope/x").is_ok());
        assert_eq!(dd.read_file("base/1/nope").unwrap(), None);

        let list = dd.list().unwrap();
        let p = paths(&list);
        assert!(p.contains(&("base/lnk", FileType::Symlink)));
        assert!(p.contains(&("base/1/evil", FileType::Symlink)));
        assert!(p.contains(&("pg_tblspc/16400/PG_16_202307071/lnk", FileType::Symlink)));
        assert!(p.contains(&("pg_wal/000000010000000000000002", FileType::Symlink)));
        assert!(!p.iter().any(|(p, _)| p.contains("lnk/")), "{p:?}");
    });
    // pg_tblspc itself is never a link, nor is pg_wal below the top.
    fs::rename(root.join("pg_tblspc"), t.path().join("tblspc")).unwrap();
    symlink(t.path().join("tblspc"), root.join("pg_tblspc")).unwrap();
    symlink(t.path().join("wal"), root.join("base/pg_wal")).unwrap();
    both(|| {
        let dd = DataDir::new(&root);
        assert!(refused(
            dd.read_file("pg_tblspc/16400/PG_16_202307071/1/5678")
        ));
        assert!(refused(
            dd.read_file("base/pg_wal/000000010000000000000001")
        ));
        let list = dd.list().unwrap();
        let p = paths(&list);
        assert!(p.contains(&("pg_tblspc", FileType::Symlink)));
        assert!(p.contains(&("base/pg_wal", FileType::Symlink)));
        assert!(!p.iter().any(|(p, _)| p.starts_with("pg_tblspc/")));
        assert!(!p.iter().any(|(p, _)| p.starts_with("base/pg_wal/")));
    });
}

#[test]
fn links_to_a_directory_of_another_owner_are_refused() {
    let (t, root) = cluster();
    let nobody = 65534;
    // Run as root, the data directory is root's; as anyone else, a directory cannot be
    // given away, and the test cannot be made.
    for dir in ["ts", "wal"] {
        if let Err(e) = rustix::fs::chown(
            t.path().join(dir),
            Some(rustix::fs::Uid::from_raw(nobody)),
            None,
        ) {
            eprintln!("skipped: cannot give a directory to uid {nobody} ({e})");
            return;
        }
    }
    both(|| {
        let dd = DataDir::new(&root);
        assert!(refused(
            dd.read_file("pg_tblspc/16400/PG_16_202307071/1/5678")
        ));
        assert!(refused(dd.read_file("pg_wal/000000010000000000000001")));
        assert!(refused(dd.names("pg_wal")));
        assert!(refused(dd.resolve("pg_wal")));
        assert!(refused(dd.list()));
        // The link itself is reported; only what is behind it is refused.
        fs::remove_file(root.join("pg_wal")).unwrap();
        let list = dd.list();
        assert!(refused(list), "the tablespace is still there");
        symlink(t.path().join("wal"), root.join("pg_wal")).unwrap();
    });
    // A real directory in its place is beneath the data directory, whoever owns it.
    fs::remove_file(root.join("pg_wal")).unwrap();
    fs::rename(t.path().join("wal"), root.join("pg_wal")).unwrap();
    fs::remove_file(root.join("pg_tblspc/16400")).unwrap();
    both(|| {
        let dd = DataDir::new(&root);
        assert_eq!(
            dd.read_file("pg_wal/000000010000000000000001").unwrap(),
            Some(b"segment".to_vec())
        );
        assert!(dd.list().is_ok());
    });
}

#[test]
fn a_fifo_is_neither_listed_nor_opened() {
    let (_t, root) = cluster();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("base/1/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    both(|| {
        let dd = DataDir::new(&root);
        assert!(matches!(
            dd.open("base/1/fifo"),
            Err(DataDirError::Io { .. })
        ));
        let mut buf = Vec::new();
        assert!(dd.read_range("base/1/fifo", 0, 1, &mut buf).is_err());
        assert!(!dd.list().unwrap().iter().any(|e| e.path == "base/1/fifo"));
    });
}

#[test]
fn the_root_is_opened_once() {
    let (t, root) = cluster();
    let dd = DataDir::new(&root);
    // The directory moved away and another put in its place: the one opened is served.
    fs::rename(&root, t.path().join("moved")).unwrap();
    fs::create_dir_all(root.join("base/1")).unwrap();
    fs::write(root.join("base/1/1234"), b"other!").unwrap();
    assert_eq!(
        dd.read_file("base/1/1234").unwrap(),
        Some(b"inside".to_vec())
    );
    // A data directory that does not exist yet is opened when it is first read.
    let later = t.path().join("later");
    let dd = DataDir::new(&later);
    assert_eq!(dd.read_file("PG_VERSION").unwrap(), None);
    assert!(dd.list().is_err());
    fs::create_dir_all(&later).unwrap();
    fs::write(later.join("PG_VERSION"), b"16\n").unwrap();
    assert_eq!(dd.read_file("PG_VERSION").unwrap(), Some(b"16\n".to_vec()));
}

/// A file and a directory swapped for links to the outside, over and over, while they are
/// read: with the component walk (datadir/tests/confinement_race.rs races `openat2`).
#[test]
fn the_walk_never_follows_a_link_swapped_in() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (t, root) = cluster();
    fs::write(root.join("base/1/1234"), b"inside").unwrap();
    symlink(t.path().join("outside/1234"), root.join("base/1/.evil")).unwrap();
    symlink(t.path().join("outside"), root.join("base/.evil")).unwrap();
    let stop = AtomicBool::new(false);
    // Each directory opened before any swapping, so that each swap is where it belongs.
    let opened = |p: &str| {
        rustix::fs::open(
            root.join(p),
            OFlags::PATH | OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap()
    };
    let (base, base_1) = (opened("base"), opened("base/1"));
    let swap = |dir: &OwnedFd, a: &str, b: &str| {
        while !stop.load(Ordering::Relaxed) {
            rustix::fs::renameat_with(dir, a, dir, b, rustix::fs::RenameFlags::EXCHANGE).unwrap();
        }
    };
    /// Stops the swapping however the reading ends (a failed assertion included).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        s.spawn(|| swap(&base_1, "1234", ".evil"));
        s.spawn(|| swap(&base, "1", ".evil"));
        let _stop = Stop(&stop);
        beneath::force_walk(true);
        let dd = DataDir::new(&root);
        let (mut read, mut refusals) = (0, 0);
        let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        while std::time::Instant::now() < until {
            match dd.read_file("base/1/1234") {
                Ok(Some(b)) => {
                    assert_eq!(b, b"inside");
                    read += 1;
                }
                Err(DataDirError::PathNotAllowed(_)) => refusals += 1,
                other => panic!("{other:?}"),
            }
            if let Ok(list) = dd.list() {
                assert!(!list.iter().any(|e| e.path.ends_with("only_outside")));
            }
        }
        beneath::force_walk(false);
        assert!(read > 0 && refusals > 0, "{read} read, {refusals} refused");
    });
}

const PG16_CONTROL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../common/tests/data/control/pg16/pg_control.shutdown"
);

#[test]
fn a_data_directory_is_recognised_and_anything_else_explained() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("data");
    let check = || check_data_directory(&root).map_err(|e| e.to_string());
    assert!(matches!(
        check_data_directory(&root),
        Err(NotADataDirectory::Missing { .. })
    ));
    fs::write(&root, b"").unwrap();
    assert!(check().unwrap_err().contains("is not a directory"));
    fs::remove_file(&root).unwrap();
    fs::create_dir_all(root.join("global")).unwrap();
    let e = check().unwrap_err();
    assert!(
        e.contains("has no PG_VERSION") && e.contains("give -D"),
        "{e}"
    );
    fs::write(root.join("PG_VERSION"), b"16\n").unwrap();
    assert!(
        check()
            .unwrap_err()
            .contains("global/pg_control cannot be read")
    );
    fs::write(root.join("global/pg_control"), vec![0u8; 100]).unwrap();
    assert!(check().unwrap_err().contains("is not a valid control file"));
    fs::copy(PG16_CONTROL, root.join("global/pg_control")).unwrap();
    check().unwrap();
    fs::write(root.join("PG_VERSION"), b"15\n").unwrap();
    let e = check().unwrap_err();
    assert!(
        e.contains("PG_VERSION says \"15\"") && e.contains("PostgreSQL 16"),
        "{e}"
    );
    // `/` is no data directory.
    assert!(matches!(
        check_data_directory(Path::new("/")),
        Err(NotADataDirectory::NoPgVersion { .. })
    ));
    // Nor is a directory whose PG_VERSION is a link to another's.
    fs::remove_file(root.join("PG_VERSION")).unwrap();
    let other = t.path().join("PG_VERSION");
    fs::write(&other, b"16\n").unwrap();
    symlink(&other, root.join("PG_VERSION")).unwrap();
    assert!(matches!(
        check_data_directory(&root),
        Err(NotADataDirectory::NoPgVersion { .. })
    ));
}
