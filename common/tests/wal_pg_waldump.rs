//! The decoder against PostgreSQL's own reader: pg_waldump 15 on the PG15 fixture must print,
//! record for record, the same LSNs, prev-links, xids, rmgrs, lengths, record types and block
//! references (relation, fork, block, full-page image with its hole and compression method) as
//! the decoder returns; and its descriptions of the records that change relation files must
//! agree with what the decoder parsed from them.

mod wal_support;

use std::path::PathBuf;
use std::process::Command;

use failback_common::Lsn;
use failback_common::wal::{ImageCompression, RecordKind, WalRecord, fork_name};
use wal_support::*;

const PG_WALDUMP: &str = "/usr/lib/postgresql/15/bin/pg_waldump";

#[derive(Debug)]
struct DumpBlock {
    id: u8,
    rel: String,
    fork: String,
    blk: u32,
    /// (applied, hole offset, hole length, compression method) for a full-page image.
    fpw: Option<(bool, u32, u32, Option<String>)>,
}

#[derive(Debug)]
struct DumpRec {
    rmgr: String,
    rec_len: u32,
    tot_len: u32,
    xid: u32,
    lsn: Lsn,
    prev: Lsn,
    desc: String,
    blocks: Vec<DumpBlock>,
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let i = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"))
        + key.len();
    line[i..].trim_start()
}

fn num(s: &str) -> u32 {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end]
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {s}"))
}

fn lsn(s: &str) -> Lsn {
    let end = s.find([',', ' ']).unwrap_or(s.len());
    s[..end].parse().unwrap()
}

fn parse_header(line: &str) -> DumpRec {
    let rmgr = field(line, "rmgr: ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let lens = field(line, "len (rec/tot): ");
    let (rec, tot) = lens.split_once('/').unwrap();
    DumpRec {
        rmgr,
        rec_len: num(rec.trim()),
        tot_len: num(tot.trim_start()),
        xid: num(field(line, "tx: ")),
        lsn: lsn(field(line, "lsn: ")),
        prev: lsn(field(line, "prev ")),
        desc: field(line, "desc: ").to_string(),
        blocks: Vec::new(),
    }
}

fn parse_block(line: &str) -> DumpBlock {
    // "\tblkref #0: rel 1663/5/16384 fork main blk 0 (FPW); hole: offset: 452, length: 4,
    //  compression saved: 6193, method: lz4"
    let id = num(field(line, "blkref #")) as u8;
    let rel = field(line, "rel ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let fork = field(line, " fork ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let blk = num(field(line, " blk "));
    let fpw = line.contains("(FPW").then(|| {
        let applied = !line.contains("for WAL verification");
        let off = num(field(line, "hole: offset: "));
        let len = num(field(line, ", length: "));
        let method = line
            .find("method: ")
            .map(|_| field(line, "method: ").trim().to_string());
        (applied, off, len, method)
    });
    DumpBlock {
        id,
        rel,
        fork,
        blk,
        fpw,
    }
}

fn waldump(dir: &std::path::Path, start: Lsn, tli: u32) -> Vec<DumpRec> {
    let out = Command::new(PG_WALDUMP)
        .arg("-b")
        .arg("-p")
        .arg(dir)
        .arg("-t")
        .arg(tli.to_string())
        .arg("-s")
        .arg(start.to_string())
        .output()
        .expect("run pg_waldump");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut recs: Vec<DumpRec> = Vec::new();
    for line in stdout.lines() {
        if line.starts_with("rmgr: ") {
            recs.push(parse_header(line));
        } else if line.starts_with("\tblkref #") {
            recs.last_mut().unwrap().blocks.push(parse_block(line));
        } else if !line.trim().is_empty() {
            panic!("unexpected pg_waldump line: {line}");
        }
    }
    recs
}

/// The `; label: a b c` part of a description, as a list.
fn desc_list(desc: &str, label: &str) -> Vec<String> {
    let key = format!("; {label}: ");
    match desc.find(&key) {
        None => Vec::new(),
        Some(i) => {
            let rest = &desc[i + key.len()..];
            let end = rest.find(';').unwrap_or(rest.len());
            rest[..end].split_whitespace().map(str::to_string).collect()
        }
    }
}

/// Checks what the decoder parsed from the records that change relation files, and from
/// checkpoints, against pg_waldump's description of them.
fn check_kind(fx: &Fixture, r: &WalRecord<'_>, d: &DumpRec) -> bool {
    let m = fx.major;
    let path = |l: failback_common::wal::RelFileLocator, fork: u8| {
        relpath(m, l.spcOid, l.dbOid, l.relNumber, fork)
    };
    let paths = |it: &mut dyn Iterator<Item = failback_common::wal::RelFileLocator>| {
        it.map(|l| path(l, 0)).collect::<Vec<_>>()
    };
    let desc = d.desc.trim_end();
    match &r.kind {
        RecordKind::Other => return false,
        RecordKind::Checkpoint {
            redo,
            this_timeline_id,
            ..
        } => {
            assert!(
                desc.contains(&format!("redo {redo}; tli {this_timeline_id};")),
                "{desc}"
            );
        }
        RecordKind::Switch => assert_eq!(desc, "SWITCH"),
        RecordKind::SmgrCreate { locator, fork } => {
            assert_eq!(desc, format!("CREATE {}", path(*locator, *fork as u8)));
        }
        RecordKind::SmgrTruncate {
            blkno,
            locator,
            flags,
        } => {
            assert_eq!(
                desc,
                format!(
                    "TRUNCATE {} to {blkno} blocks flags {flags}",
                    path(*locator, 0)
                )
            );
        }
        RecordKind::DbaseCreateFileCopy {
            db_id,
            tablespace_id,
            src_db_id,
            src_tablespace_id,
        } => {
            assert_eq!(
                desc,
                format!(
                    "CREATE_FILE_COPY copy dir {src_tablespace_id}/{src_db_id} to {tablespace_id}/{db_id}"
                )
            );
        }
        RecordKind::DbaseCreateWalLog {
            db_id,
            tablespace_id,
        } => {
            assert_eq!(
                desc,
                format!("CREATE_WAL_LOG create dir {tablespace_id}/{db_id}")
            );
        }
        RecordKind::DbaseDrop {
            db_id,
            tablespace_ids,
        } => {
            let dirs: String = tablespace_ids
                .iter()
                .map(|t| format!(" {t}/{db_id}"))
                .collect();
            assert_eq!(desc, format!("DROP dir{dirs}"));
        }
        RecordKind::XactFinish(x) => {
            assert_eq!(desc_list(desc, "rels"), paths(&mut x.rels.iter()), "{desc}");
            assert_eq!(
                desc_list(desc, "dropped stats").len(),
                x.nstats as usize,
                "{desc}"
            );
            if let Some(xid) = x.twophase_xid {
                assert!(desc.contains(&format!("_PREPARED {xid}: ")), "{desc}");
            }
            // Every part the xinfo announces was parsed, and nothing is left over.
            assert_eq!(x.parsed_len, r.main_data.len(), "{desc}");
        }
        RecordKind::XactPrepare(p) => {
            let gid = String::from_utf8_lossy(p.gid);
            assert!(desc.starts_with(&format!("PREPARE gid {gid}: ")), "{desc}");
            assert_eq!(
                desc_list(desc, "rels(commit)"),
                paths(&mut p.commit_rels.iter()),
                "{desc}"
            );
            assert_eq!(
                desc_list(desc, "rels(abort)"),
                paths(&mut p.abort_rels.iter()),
                "{desc}"
            );
            assert_eq!(
                desc_list(desc, "commit dropped stats").len(),
                p.ncommitstats as usize
            );
            assert_eq!(
                desc_list(desc, "abort dropped stats").len(),
                p.nabortstats as usize
            );
        }
        RecordKind::RelmapUpdate {
            db_id,
            tsid,
            nbytes,
        } => {
            assert_eq!(
                desc,
                format!("UPDATE database {db_id} tablespace {tsid} size {nbytes}")
            );
        }
        RecordKind::EndOfRecovery {
            this_timeline_id,
            prev_timeline_id,
            ..
        } => {
            assert!(
                desc.starts_with(&format!(
                    "END_OF_RECOVERY tli {this_timeline_id}; prev tli {prev_timeline_id};"
                )),
                "{desc}"
            );
        }
        RecordKind::OverwriteContrecord {
            overwritten_lsn, ..
        } => {
            assert!(desc.contains(&format!("lsn {overwritten_lsn}")), "{desc}");
        }
    }
    true
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("failback-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Compared {
    records: usize,
    outcome: Outcome,
    kinds_checked: usize,
    compression: std::collections::BTreeSet<&'static str>,
    /// (lsn, page timeline) of every record.
    tlis: Vec<(Lsn, u32)>,
    /// (lsn, ThisTimeLineID, PrevTimeLineID) of END_OF_RECOVERY records.
    end_of_recovery: Vec<(Lsn, u32, u32)>,
}

/// Runs pg_waldump and the decoder over the fixture from `start` (a record, or a page where
/// decoding starts at the first record beginning on it) and compares them record for record.
fn compare_with_waldump(fx: &Fixture, start: Lsn, tli: u32) -> Compared {
    let dir = temp_dir(&format!(
        "waldump-{}",
        fx.dir.file_name().unwrap().to_string_lossy()
    ));
    for (name, seg) in &fx.segments {
        std::fs::write(dir.join(name), seg).unwrap();
    }
    let dump = waldump(&dir, start, tli);
    std::fs::remove_dir_all(&dir).unwrap();

    let mut c = Compared {
        records: 0,
        outcome: Outcome::NeedMore(Lsn(0)),
        kinds_checked: 0,
        compression: Default::default(),
        tlis: Vec::new(),
        end_of_recovery: Vec::new(),
    };
    let dec = if start.0.is_multiple_of(8192) {
        failback_common::wal::WalDecoder::new_at_page(start, fx.params()).unwrap()
    } else {
        failback_common::wal::WalDecoder::new(start, fx.params()).unwrap()
    };
    let mut n = 0;
    c.outcome = run(&fx.wal, fx.base, dec, 1 << 20, |r| {
        let d = dump.get(n).unwrap_or_else(|| {
            panic!(
                "decoder returned a record at {} past pg_waldump's last",
                r.lsn
            )
        });
        let ctx = format!("record #{n} at {}", r.lsn);
        assert_eq!(r.lsn, d.lsn, "{ctx}");
        assert_eq!(r.xl_prev(), d.prev, "{ctx}");
        assert_eq!(r.xid(), d.xid, "{ctx}");
        assert_eq!(r.rmgr_name(), d.rmgr, "{ctx}");
        assert_eq!(r.tot_len(), d.tot_len, "{ctx}");
        assert_eq!(r.tot_len() - r.fpi_len(), d.rec_len, "{ctx}");
        let ty = r.record_type();
        let dump_ty = d.desc.split_whitespace().next().unwrap_or("");
        // The rmgrs whose type names the decoder must know; for the others it may say UNKNOWN.
        let required = matches!(r.rmid(), 0..=2 | 4 | 7..=11);
        if required || ty != "UNKNOWN" {
            assert_eq!(ty, dump_ty, "{ctx}: {}", d.desc);
        }
        assert_eq!(r.blocks.len(), d.blocks.len(), "{ctx}: block count");
        for (b, db) in r.blocks.iter().zip(&d.blocks) {
            assert_eq!(b.id, db.id, "{ctx}");
            assert_eq!(b.locator.to_string(), db.rel, "{ctx}");
            assert_eq!(fork_name(b.fork()).unwrap(), db.fork, "{ctx}");
            assert_eq!(b.blkno, db.blk, "{ctx}");
            match (&b.image, &db.fpw) {
                (None, None) => {}
                (Some(img), Some((applied, off, len, method))) => {
                    assert_eq!(img.apply, *applied, "{ctx}");
                    assert_eq!(u32::from(img.hole_offset), *off, "{ctx}");
                    assert_eq!(u32::from(img.hole_length), *len, "{ctx}");
                    let ours = (img.compression != ImageCompression::None)
                        .then(|| img.compression.name().to_string());
                    assert_eq!(&ours, method, "{ctx}");
                    c.compression.insert(img.compression.name());
                    assert_eq!(r.block_image(img).len(), usize::from(img.length));
                }
                (a, b) => panic!("{ctx}: image {a:?} vs pg_waldump {b:?}"),
            }
        }
        if check_kind(fx, r, d) {
            c.kinds_checked += 1;
        }
        c.tlis.push((r.lsn, r.page_tli));
        if let RecordKind::EndOfRecovery {
            this_timeline_id,
            prev_timeline_id,
            ..
        } = r.kind
        {
            c.end_of_recovery
                .push((r.lsn, this_timeline_id, prev_timeline_id));
        }
        n += 1;
    });
    assert_eq!(
        n,
        dump.len(),
        "pg_waldump printed more records than the decoder returned"
    );
    c.records = n;
    c
}

fn have_waldump() -> bool {
    let ok = std::path::Path::new(PG_WALDUMP).exists();
    if !ok {
        eprintln!("{PG_WALDUMP} not installed; skipping the comparison with PostgreSQL");
    }
    ok
}

#[test]
fn pg15_fixture_matches_pg_waldump_record_for_record() {
    if !have_waldump() {
        return;
    }
    let fx = load(15);
    let c = compare_with_waldump(&fx, fx.lsn("start_lsn"), 1);
    assert!(c.records > 10_000, "{} records", c.records);
    // pg_waldump stopped because the next segment file is missing; the decoder asks for it.
    let last = fx.segments.last().unwrap();
    let (_, segno) = failback_common::lsn::parse_wal_file_name(&last.0, fx.seg_size).unwrap();
    assert_eq!(
        c.outcome,
        Outcome::NeedMore(failback_common::lsn::segment_start(segno + 1, fx.seg_size))
    );
    assert!(
        c.kinds_checked > 50,
        "only {} special records compared",
        c.kinds_checked
    );
    // The wal_compression runs of the fixture produced every kind of image.
    for m in ["none", "pglz", "lz4", "zstd"] {
        assert!(c.compression.contains(m), "no {m} image in the fixture");
    }
}

#[test]
fn waldump_lines_match_pg_waldump_up_to_the_rmgr_specific_description() {
    if !have_waldump() {
        return;
    }
    let fx = load(15);
    let dir = temp_dir("waldump-lines");
    for (name, seg) in &fx.segments {
        std::fs::write(dir.join(name), seg).unwrap();
    }
    let start = fx.lsn("start_lsn");
    let out = Command::new(PG_WALDUMP)
        .arg("-p")
        .arg(&dir)
        .arg("-s")
        .arg(start.to_string())
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let dec = failback_common::wal::WalDecoder::new(start, fx.params()).unwrap();
    let mut n = 0;
    run(&fx.wal, fx.base, dec, 1 << 20, |r| {
        let ours = r.waldump_line().to_string();
        let theirs = lines[n];
        // Ours is "<header> desc: TYPE [detail]<blkrefs>"; pg_waldump's has the rmgr's own
        // description between TYPE and the blkrefs.
        let desc_at = ours.find("desc: ").unwrap();
        let head_end = desc_at + ours[desc_at..].find(' ').unwrap() + 1;
        let head_end = head_end + ours[head_end..].find(' ').unwrap() + 1;
        let head = &ours[..head_end];
        let blkrefs = ours.find(", blkref #").map_or("", |i| &ours[i..]);
        if matches!(r.rmid(), 0..=2 | 4 | 7..=11) {
            assert!(theirs.starts_with(head), "\n{ours}\n{theirs}");
        } else {
            assert!(theirs.starts_with(&head[..desc_at]), "\n{ours}\n{theirs}");
        }
        assert!(theirs.ends_with(blkrefs), "\n{ours}\n{theirs}");
        n += 1;
    });
    assert!(n > 10_000);
}

#[test]
fn promoted_standby_segment_matches_pg_waldump_across_the_timeline_switch() {
    if !have_waldump() {
        return;
    }
    let fx = load_dir("pg15_promote");
    let switch = fx.lsn("switch_lsn");
    let end = fx.lsn("end_lsn");
    // From the segment's first page, skipping the record continued from the segment before.
    let c = compare_with_waldump(&fx, fx.base, 2);
    assert!(c.records > 1000, "{} records", c.records);
    // The timeline history says timeline 1 ends at the switch point: the records before it
    // sit on pages of timeline 1 (copied from the old timeline's segment), the ones from it on
    // pages of timeline 2, and the first of those is END_OF_RECOVERY.
    for (lsn, tli) in &c.tlis {
        let page = Lsn(lsn.0 & !8191);
        let expected = if page.0 + 8192 <= switch.0 || *lsn < switch {
            1
        } else {
            2
        };
        if (page.0..page.0 + 8192).contains(&switch.0) {
            continue; // the page holding the switch point was rewritten on timeline 2
        }
        assert_eq!(*tli, expected, "record at {lsn}");
    }
    assert!(c.tlis.iter().any(|t| t.1 == 1) && c.tlis.iter().any(|t| t.1 == 2));
    assert_eq!(c.end_of_recovery, vec![(switch, 2, 1)]);
    // The server's insert position after the writes on timeline 2 is where the next record
    // (the shutdown checkpoint) starts; WAL then ends in zeros.
    assert!(c.tlis.iter().any(|t| t.0 == end), "no record at {end}");
    assert!(
        matches!(
            c.outcome,
            Outcome::Error(failback_common::wal::WalError::InvalidRecordLength { lsn, got: 0 })
                if lsn > end
        ),
        "{:?}",
        c.outcome
    );
}
