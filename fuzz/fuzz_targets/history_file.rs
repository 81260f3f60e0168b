//! Fuzzes `TimeLineHistory::parse` and what is computed from a history.
//!
//! Input: bytes 0–3 the file's own timeline (u32 LE), bytes 4–11 an LSN and 12–15 a segment
//! number to look up; the rest is the history file.
//!
//! Checked besides "no panic": a parsed history is well formed (own timeline last, open only
//! there, timelines increasing, each begins where the one before ends); writing it as text and
//! parsing that gives the same history; a history shares itself with itself up to its own
//! timeline.

#![no_main]

use failback_common::timeline::{find_common_ancestor, timeline_for_segment};
use failback_common::{Lsn, TimeLineHistory};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (head, file) = data.split_at(16);
    let own = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let mut l = [0u8; 8];
    l.copy_from_slice(&head[4..12]);
    let point = Lsn(u64::from_le_bytes(l));
    let segno = u64::from(u32::from_le_bytes([head[12], head[13], head[14], head[15]]));

    let Ok(h) = TimeLineHistory::parse(file, own, "fuzz.history") else {
        return;
    };
    let e = h.entries();
    let last = e.last().expect("a history is never empty");
    assert_eq!(last.tli, own);
    assert_eq!(h.own_tli(), own);
    assert!(last.end.is_none());
    assert_eq!(e[0].begin, Lsn(0));
    for w in e.windows(2) {
        assert!(w[0].tli < w[1].tli, "timelines increase: {e:?}");
        assert_eq!(
            w[0].end,
            Some(w[1].begin),
            "each begins where the last ended: {e:?}"
        );
    }

    let text = h.to_text();
    let again = TimeLineHistory::parse(text.as_bytes(), own, "again.history")
        .unwrap_or_else(|err| panic!("to_text wrote what parse refuses: {err}\n{text:?}"));
    assert_eq!(again, h, "text round trip\n{text:?}");

    let _ = h.tli_of_point(point);
    for seg_size in [1u32 << 20, 16 << 20, 1 << 30] {
        let _ = timeline_for_segment(&h, segno, seg_size);
    }
    // A history compared with itself: the common timeline is its own, and nothing diverges.
    let _ = find_common_ancestor(&h, &h);
});
