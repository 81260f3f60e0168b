//! Timeline history files from a real chain of promotions on PG15 (see tests/data/gen.sh):
//! A on timeline 1, standby B promoted to 2, standby C of B promoted to 3, standby D of C
//! promoted to 4.

use std::path::PathBuf;

use failback_common::lsn::{history_file_name, parse_wal_file_name, wal_file_name};
use failback_common::timeline::{find_common_ancestor, timeline_for_segment};
use failback_common::{HistoryError, Lsn, TimeLineHistory, TimeLineId};
use serde_json::Value;

const SEG: u32 = 16 << 20;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/history")
}

fn raw(tli: TimeLineId) -> Vec<u8> {
    std::fs::read(dir().join(history_file_name(tli))).unwrap()
}

fn history(tli: TimeLineId) -> TimeLineHistory {
    if tli == 1 {
        return TimeLineHistory::single(1);
    }
    TimeLineHistory::parse(&raw(tli), tli, &history_file_name(tli)).unwrap()
}

/// (node, new tli, parent tli, switchpoint) of each promotion, as the servers reported them.
fn promotions() -> Vec<(String, TimeLineId, TimeLineId, Lsn)> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(dir().join("promotions.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node"].as_str().unwrap().to_string(),
                p["new_tli"].as_u64().unwrap() as TimeLineId,
                p["parent_tli"].as_u64().unwrap() as TimeLineId,
                p["replay_end_lsn_before_promote"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn real_history_files_parse_to_the_promotion_chain() {
    let promotions = promotions();
    assert_eq!(promotions.len(), 3);
    for (node, tli, parent, switchpoint) in &promotions {
        let h = history(*tli);
        let e = h.entries();
        // One entry per ancestor, then the timeline itself.
        assert_eq!(e.len(), *tli as usize, "{node}");
        assert_eq!(h.own_tli(), *tli);
        assert_eq!(e.last().unwrap().end, None);
        let parent_entry = h.entry(*parent).unwrap();
        assert_eq!(parent_entry.end, Some(*switchpoint), "{node}");
        assert_eq!(parent_entry.reason, "no recovery target specified");
        assert_eq!(e.last().unwrap().begin, *switchpoint, "{node}");
        // Every ancestor's switchpoint is the one its own promotion recorded.
        for (_, t, p, sp) in promotions.iter().filter(|p| p.1 <= *tli) {
            assert_eq!(h.entry(*p).unwrap().end, Some(*sp));
            assert_eq!(h.entry(*t).unwrap().begin, *sp);
        }
        // Text round trip is byte-exact, blank separator lines included.
        assert_eq!(h.to_text().into_bytes(), raw(*tli), "{node}");
    }
    let h4 = history(4);
    let tlis: Vec<_> = h4.entries().iter().map(|e| e.tli).collect();
    assert_eq!(tlis, [1, 2, 3, 4]);
    assert_eq!(h4.entries()[0].begin, Lsn(0));
    // Each file is its parent's file plus one line.
    let h3 = history(3);
    assert_eq!(&h4.entries()[..2], &h3.entries()[..2]);
}

#[test]
fn old_primary_against_the_chain() {
    // A stayed on timeline 1 (as if it kept running after B's promotion): the fork is at B's
    // switchpoint, whichever later timeline the source is on.
    let (_, _, _, b_switch) = promotions()[0].clone();
    let a = TimeLineHistory::single(1);
    for tli in [2, 3, 4] {
        let c = find_common_ancestor(&history(tli), &a).unwrap();
        assert_eq!((c.divergerec, c.tli, c.index), (b_switch, 1, 0));
    }
}

#[test]
fn target_that_switched_timelines_after_the_fork() {
    // Source B (still on 2), target D (went on to 3 and 4 through C): they share timeline 2
    // until C's promotion.
    let p = promotions();
    let c_switch = p[1].3;
    let c = find_common_ancestor(&history(2), &history(4)).unwrap();
    assert_eq!((c.divergerec, c.tli, c.index), (c_switch, 2, 1));
    // Source C (on 3) against target D (on 4): they part at D's promotion.
    let c = find_common_ancestor(&history(3), &history(4)).unwrap();
    assert_eq!((c.divergerec, c.tli, c.index), (p[2].3, 3, 2));
    assert_eq!(
        find_common_ancestor(&history(4), &history(4)),
        Err(HistoryError::SameTimeline { tli: 4 })
    );
}

#[test]
fn switch_segment_is_read_from_the_file_the_server_wrote() {
    // Right after each promotion, the segment that holds the switchpoint exists under the new
    // timeline's name (and the parent's), and later segments only under the new one.
    for (node, tli, parent, switchpoint) in promotions() {
        let listing = std::fs::read_to_string(dir().join(format!("{node}.pg_wal.txt"))).unwrap();
        let files: Vec<(TimeLineId, u64)> = listing
            .lines()
            .filter_map(|n| parse_wal_file_name(n, SEG))
            .collect();
        let h = history(tli);
        let seg = switchpoint.segment_number(SEG);
        assert_eq!(timeline_for_segment(&h, seg, SEG), tli, "{node}");
        assert!(
            files.contains(&(tli, seg)),
            "{node}: {}",
            wal_file_name(tli, seg, SEG)
        );
        assert_eq!(timeline_for_segment(&h, seg - 1, SEG), parent, "{node}");
        // Every new-timeline segment on disk is one the history says to read from it.
        for &(t, s) in files.iter().filter(|f| f.0 == tli) {
            assert_eq!(timeline_for_segment(&h, s, SEG), t, "{node} segment {s}");
        }
    }
}

#[test]
fn serialized_as_json_with_open_end() {
    let v = serde_json::to_value(history(3)).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a[0]["tli"], 1);
    assert_eq!(a[0]["begin"], "0/0");
    assert_eq!(a[1]["begin"], a[0]["end"]);
    assert_eq!(a[2]["end"], Value::Null);
}
