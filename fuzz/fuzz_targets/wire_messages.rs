//! Fuzzes what a hostile peer sends over the wire: QUIC requests as failbackd reads them,
//! QUIC replies as failback reads them, and the payloads inside replies (chunks, chunk hashes,
//! block bitmaps, paths).
//!
//! Input: byte 0 chooses the mode (`% 5`); the rest is that mode's input.
//!
//! - **0, request**: the rest is what a client wrote on a QUIC stream; read as failbackd's
//!   `decode_request` reads it (a length-delimited `QuicRequest` that must fill the stream),
//!   and with `failback_transport::frame::read_frame`.
//! - **1, replies**: the rest is what failbackd wrote on a stream: length-delimited `QuicReply`
//!   frames read with `read_frame` (at most `MAX_REPLY` each) and decoded as the client does;
//!   each reply's payload is then checked as the client checks it: a handshake's `max_chunk`
//!   becomes the chunk limit, chunks are decoded with `wire::decode_into` into one reused
//!   buffer, chunk hashes go through `chunkdiff::ranges_to_fetch`, block bitmaps through
//!   `BlockBitmap::from_le_bytes`, paths through `relpath::parse_relation_path`, control files
//!   and histories through their parsers.
//! - **2, chunk** (offsets within the rest): byte 0 the codec (`% 4`: stored, zstd, two
//!   unknown; bit 7 sets the high 32 bits of the claimed length), bytes 1–4 the claimed raw
//!   length (u32 LE), byte 5 the limit (`% 4`: 4 KiB, `DEFAULT_MAX_CHUNK`, `MAX_MAX_CHUNK`, the
//!   claimed length up to 64 MiB), byte 6 bit 0: the hash is made right (the blake3 of what
//!   zstd makes of the data within the claimed length) rather than bytes 7–38, bit 1: the
//!   hash is cut to `byte 39 % 40` bytes; from byte 40 on, the data. Decoded into an empty
//!   buffer and into one that kept another chunk's room.
//! - **3, encode**: byte 0 the level (`% 32 - 7`, so -7..=24: 0 is stored, 23 and 24 are out
//!   of range), bytes 1–2 a bit to flip (in the hash, then the data), byte 3 how far a claimed
//!   length is off (and which bit), byte 4 bit 0: *bomb* (levels 1–9), the raw bytes are the
//!   rest repeated to `(bytes 5–6 as u16 LE % 16384 + 1) * 16` bytes (up to 256 KiB); from byte 7 on,
//!   the raw bytes.
//! - **4, chunk diff**: byte 0 the chunk size (`% 64 + 1`), byte 1 how the source's hash list
//!   is tampered with (`% 4`: not, one dropped, one added, the size claimed a chunk bigger),
//!   bytes 2–3 where the rest splits into the source's and the target's file; the ranges
//!   fetched and applied to the target must give the source.
//!
//! Checked besides "no panic": a decoded message encodes to `encoded_len` bytes and decodes
//! back to itself; a request that failbackd's framing accepts is one `read_frame` frame; a
//! decoded chunk is exactly its claimed `raw_length`, within the limit, with the blake3 it
//! carries, and a refused one leaves the buffer empty; `wire::decode_shared` (the client's
//! path, stored bytes verified where they lie) accepts and refuses the same chunks and gives
//! the same bytes; `wire::encode` then `decode` gives the same bytes at every level (and
//! `wire::encode_owned` the same chunk), a wrong claimed length or limit or hash is an error,
//! a flipped data bit is an error or the same bytes, a zstd frame claiming fewer bytes than it
//! holds is refused; chunk-diff ranges are ordered, merged and within the source, and skip only
//! chunks both sides hold identically.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use failback_common::chunkdiff::{ByteRange, ChunkList, chunk_count, ranges_to_fetch};
use failback_common::plan::BlockBitmap;
use failback_common::relpath::parse_relation_path;
use failback_common::wire::{self, Codec, Compression, WireError};
use failback_common::{ControlFileData, PgMajor, TimeLineHistory};
use failback_proto::limits::{
    DEFAULT_MAX_CHUNK, MAX_BLOCK_BITMAP, MAX_MAX_CHUNK, MAX_REPLY, MAX_REQUEST,
};
use failback_proto::v1::{QuicReply, QuicRequest, quic_reply::Reply};
use failback_transport::frame::{FrameError, read_frame, reply_status};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    match mode % 5 {
        0 => request(rest),
        1 => replies(rest),
        2 => chunk(rest),
        3 => encode(rest),
        _ => chunk_diff(rest),
    }
});

/// `read_frame` over bytes in memory: a slice is always ready, so one poll finishes it.
fn frame(r: &mut &[u8], max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut fut = pin!(read_frame(r, max));
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("read_frame waits on a slice"),
    }
}

/// Encodes `m` and decodes it back: the same message, `encoded_len` bytes.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len(), "encoded_len of {m:?}");
    let back = M::decode(&bytes[..]).unwrap_or_else(|e| panic!("{m:?} encodes to what fails: {e}"));
    assert_eq!(&back, m, "encode then decode");
    let delimited = m.encode_length_delimited_to_vec();
    assert_eq!(&M::decode_length_delimited(&delimited[..]).unwrap(), m);
}

/// Mode 0: failbackd's `decode_request` (server/src/quic.rs), copied here because it is
/// private: the length prefix must announce exactly the bytes that follow.
fn request(bytes: &[u8]) {
    let decoded = (|| {
        let mut rest = bytes;
        let len = prost::decode_length_delimiter(&mut rest).ok()?;
        (rest.len() == len).then_some(())?;
        QuicRequest::decode(rest).ok()
    })();
    // The same bytes through the QUIC frame reader, as a reply would be read.
    let mut r = bytes;
    let first = frame(&mut r, MAX_REQUEST);
    let Some(req) = decoded else {
        return;
    };
    let _ = format!("{req:?}");
    round_trip(&req);
    if bytes.len() <= MAX_REQUEST {
        let body = first
            .unwrap_or_else(|e| panic!("read_frame refuses a request failbackd accepts: {e}"))
            .expect("a frame");
        assert_eq!(QuicRequest::decode(&body[..]).unwrap(), req);
        assert!(
            matches!(frame(&mut r, MAX_REQUEST), Ok(None)),
            "one frame only"
        );
    }
    assert_eq!(
        QuicRequest::decode_length_delimited(bytes).unwrap(),
        req,
        "prost's own length-delimited decoding agrees"
    );
}

/// Mode 1: a stream of replies as the client reads them.
fn replies(bytes: &[u8]) {
    let mut r = bytes;
    let mut limit = DEFAULT_MAX_CHUNK;
    let mut buf = Vec::new();
    loop {
        let before = r.len();
        let f = match frame(&mut r, MAX_REPLY) {
            Ok(Some(f)) => f,
            Ok(None) => {
                assert_eq!(before, 0, "the stream ends only where it is empty");
                return;
            }
            Err(_) => return,
        };
        assert!(f.len() <= MAX_REPLY);
        assert!(r.len() < before, "a frame consumes bytes");
        let Ok(reply) = QuicReply::decode(&f[..]) else {
            return;
        };
        round_trip(&reply);
        let _ = format!("{reply:?}");
        match reply.reply {
            None => return,
            Some(Reply::Error(s)) => {
                let st = reply_status(s.clone());
                let _ = format!("{st:?}");
                assert_eq!(st.message(), s.message);
                return;
            }
            Some(Reply::Handshake(h)) => {
                // The client refuses any other announced chunk size.
                if (1..=MAX_MAX_CHUNK).contains(&h.max_chunk) {
                    limit = h.max_chunk;
                }
            }
            Some(Reply::ControlFile(c)) => {
                let _ = ControlFileData::parse(&c.data);
            }
            Some(Reply::Timelines(t)) => {
                for h in &t.histories {
                    let _ = TimeLineHistory::parse(&h.data, h.timeline, "hostile.history");
                }
            }
            Some(Reply::FileEntry(e)) => {
                check_path(&e.path);
                let _ = failback_common::filemap::is_excluded(&e.path);
            }
            Some(Reply::Chunk(c)) => {
                check_path(&c.path);
                check_decode(c.codec, &c.data, &c.hash, c.raw_length, limit, &mut buf);
            }
            Some(Reply::FileHashes(h)) => {
                check_path(&h.path);
                // As the client takes them (client/src/source/remote.rs): every hash 32 bytes.
                let Ok(hashes) = h
                    .hashes
                    .iter()
                    .map(|b| <[u8; 32]>::try_from(b.as_ref()))
                    .collect::<Result<Vec<_>, _>>()
                else {
                    continue;
                };
                // The target's own list: the source's reversed, over the same size.
                let mine: Vec<[u8; 32]> = hashes.iter().rev().copied().collect();
                let src = ChunkList {
                    size: h.size,
                    hashes: &hashes,
                };
                let tgt = ChunkList {
                    size: h.size,
                    hashes: &mine,
                };
                check_ranges(h.chunk_size, &src, &tgt);
            }
            Some(Reply::Changes(c)) => {
                for f in &c.files {
                    check_path(&f.path);
                    if f.block_bitmap.len() <= MAX_BLOCK_BITMAP {
                        check_bitmap(&f.block_bitmap);
                    }
                }
            }
            Some(_) => {}
        }
    }
}

/// A path from the peer that parses as a relation file stays inside the data directory.
fn check_path(path: &str) {
    for major in PgMajor::ALL {
        if parse_relation_path(path, major).is_some() {
            assert!(
                !path.starts_with('/')
                    && path
                        .split('/')
                        .all(|c| !c.is_empty() && c != ".." && c != "."),
                "{path:?} parses as a relation path"
            );
        }
    }
}

/// A block bitmap from the wire: whole words or refused; what it holds reads back.
fn check_bitmap(bytes: &[u8]) {
    let Some(b) = BlockBitmap::from_le_bytes(bytes) else {
        assert!(!bytes.len().is_multiple_of(8));
        return;
    };
    let mut trimmed = bytes;
    while let [head @ .., 0, 0, 0, 0, 0, 0, 0, 0] = trimmed {
        trimmed = head;
    }
    assert_eq!(
        b.to_le_bytes(),
        trimmed,
        "a bitmap writes back without its zero tail"
    );
    let blocks: Vec<u32> = b.iter().collect();
    assert_eq!(blocks.len(), b.len());
    assert_eq!(b.is_empty(), blocks.is_empty());
    assert!(blocks.windows(2).all(|w| w[0] < w[1]), "blocks ascend");
    let ones: u32 = bytes.iter().map(|x| x.count_ones()).sum();
    assert_eq!(blocks.len(), ones as usize);
    for &blk in &blocks {
        assert!(b.contains(blk));
        let (byte, bit) = (blk as usize / 8, blk % 8);
        assert!(
            bytes[byte] & (1 << bit) != 0,
            "block {blk} is bit {bit} of byte {byte}"
        );
    }
    let mut u = b.clone();
    u.union_with(&b);
    assert_eq!(u, b, "a union with itself");
}

/// Refusals of a zstd frame's content (as against its header's claims).
fn frame_error(e: &WireError) -> bool {
    matches!(
        e,
        WireError::ZstdCorrupt(_) | WireError::Expands { .. } | WireError::ZstdLength { .. }
    )
}

/// `wire::decode_into` on a received chunk, with the invariants of a result either way.
fn check_decode(
    codec: u32,
    data: &[u8],
    hash: &[u8],
    raw_length: u64,
    limit: u64,
    out: &mut Vec<u8>,
) {
    let cap = out.capacity();
    let into = wire::decode_into(codec, data, hash, raw_length, limit, out);
    // The receiver's own path (stored bytes checked where they lie) agrees with it exactly.
    let shared = wire::decode_shared(codec, data.to_vec(), hash, raw_length, limit);
    match (&into, &shared) {
        (Ok(()), Ok(got)) => assert_eq!(got, out, "decode_shared gave other bytes"),
        // A damaged frame may be found out one way or another depending on the room zstd
        // was given (a reused buffer has more): refused either way.
        (Err(a), Err(b)) if frame_error(a) && frame_error(b) => {}
        (Err(a), Err(b)) => assert_eq!(a, b, "decode_shared refused otherwise"),
        _ => panic!(
            "decode_into {into:?}, decode_shared {:?}",
            shared.map(|v| v.len())
        ),
    }
    match into {
        Ok(()) => {
            assert!(raw_length <= limit, "a chunk over the limit passed");
            assert_eq!(
                out.len() as u64,
                raw_length,
                "a chunk of another length passed"
            );
            assert_eq!(
                blake3::hash(out).as_bytes()[..],
                hash[..],
                "a chunk with a wrong hash passed"
            );
            if codec == 0 {
                assert_eq!(&out[..], data);
            }
        }
        Err(e) => {
            assert!(
                out.is_empty(),
                "a refused chunk left {} bytes: {e}",
                out.len()
            );
            if raw_length > limit {
                assert!(
                    matches!(e, WireError::TooLong { .. } | WireError::UnknownCodec(_)),
                    "{e}"
                );
            }
        }
    }
    // Room for the chunk's claimed length (within the limit), and no more: a zstd frame gets
    // exactly that room, whatever it expands to; stored bytes are appended, so a buffer kept
    // from a smaller chunk may grow as a Vec grows (to twice what it had).
    let bound = usize::try_from(raw_length.min(limit)).unwrap_or(usize::MAX);
    let room = if codec == 1 {
        bound
    } else {
        bound.saturating_mul(2)
    };
    assert!(
        out.capacity() <= cap.max(room).max(64),
        "the buffer grew from {cap} to {} for a chunk of at most {bound}",
        out.capacity()
    );
}

/// Mode 2: one hostile chunk.
fn chunk(bytes: &[u8]) {
    if bytes.len() < 40 {
        return;
    }
    let (head, data) = bytes.split_at(40);
    let codec = u32::from(head[0] % 4);
    let mut raw_length = u64::from(u32::from_le_bytes([head[1], head[2], head[3], head[4]]));
    if head[0] & 0x80 != 0 {
        raw_length |= 0xFFFF_FFFF_0000_0000;
    }
    let limit = match head[5] % 4 {
        0 => 4096,
        1 => DEFAULT_MAX_CHUNK,
        2 => MAX_MAX_CHUNK,
        // A limit is what the receiver chose to hold in memory: never past 64 MiB.
        _ => raw_length.min(64 << 20),
    };
    let mut hash = head[7..39].to_vec();
    if head[6] & 1 != 0 && raw_length <= MAX_MAX_CHUNK {
        // The hash of what the data really is, so the fuzzer gets past the blake3 check.
        let raw = match codec {
            1 => zstd::bulk::decompress(data, raw_length as usize).unwrap_or_default(),
            _ => data.to_vec(),
        };
        hash = blake3::hash(&raw).as_bytes().to_vec();
    }
    if head[6] & 2 != 0 {
        hash.truncate(usize::from(head[39] % 40));
    }
    let mut out = Vec::new();
    check_decode(codec, data, &hash, raw_length, limit, &mut out);
    // And into a buffer that kept a larger chunk's room.
    let mut roomy = Vec::with_capacity(1 << 16);
    roomy.extend_from_slice(&[0xAA; 100]);
    check_decode(codec, data, &hash, raw_length, limit, &mut roomy);
    assert_eq!(out, roomy, "the buffer's history changed the result");
}

/// Mode 3: `encode` then `decode`, and what a lying sender does to it.
fn encode(bytes: &[u8]) {
    if bytes.len() < 7 {
        return;
    }
    let (head, payload) = bytes.split_at(7);
    let level = i32::from(head[0] % 32) - 7;
    let flip = usize::from(u16::from_le_bytes([head[1], head[2]]));
    let off = u64::from(head[3]) + 1;
    // The bomb at levels 1..=9 only: the high levels take too long on a quarter mebibyte.
    let bomb = head[4] & 1 != 0 && (1..=9).contains(&level) && !payload.is_empty();
    let raw: Vec<u8> = if bomb {
        let n = (usize::from(u16::from_le_bytes([head[5], head[6]]) % 16384) + 1) * 16;
        payload.iter().copied().cycle().take(n).collect()
    } else {
        payload.to_vec()
    };
    let len = raw.len() as u64;
    let e = match wire::encode(&raw, Compression::from_level(level)) {
        Ok(e) => e,
        Err(WireError::BadLevel(l)) => {
            assert_eq!(l, level);
            assert!(level > 22, "level {level} refused");
            return;
        }
        Err(e) => panic!("encode at level {level}: {e}"),
    };
    // failbackd's path, which hands its read buffer over: the very same chunk.
    let owned = wire::encode_owned(raw.clone(), Compression::from_level(level));
    assert_eq!(owned.as_ref(), Ok(&e), "encode_owned at level {level}");
    assert!(level != 0 || e.codec == Codec::Stored);
    assert_eq!(e.raw_length, len);
    assert_eq!(&e.hash, blake3::hash(&raw).as_bytes());
    match e.codec {
        Codec::Stored => assert_eq!(e.data, raw),
        Codec::Zstd => assert!(e.data.len() < raw.len(), "a zstd frame no smaller was sent"),
    }
    let dec = |codec: u32, data: &[u8], hash: &[u8], raw_length: u64, limit: u64| {
        let mut out = Vec::new();
        check_decode(codec, data, hash, raw_length, limit, &mut out);
        wire::decode(codec, data, hash, raw_length, limit)
    };
    let c = e.codec.to_u32();
    assert_eq!(
        dec(c, &e.data, &e.hash, len, len).as_deref(),
        Ok(&raw[..]),
        "level {level}"
    );
    if bomb {
        // A small frame that expands far: a receiver told fewer bytes holds no more than that.
        let short = (u64::from(head[3]) * 64).min(len.saturating_sub(1));
        assert!(
            dec(c, &e.data, &e.hash, short, short).is_err(),
            "claims {short} of {len}"
        );
        return;
    }
    assert_eq!(
        dec(c, &e.data, &e.hash, len, MAX_MAX_CHUNK.max(len)).as_deref(),
        Ok(&raw[..])
    );
    if len > 0 {
        assert_eq!(
            dec(c, &e.data, &e.hash, len, len - 1),
            Err(WireError::TooLong {
                raw_length: len,
                limit: len - 1
            })
        );
        // A claimed length short of the real one: refused, whatever the codec, and the frame
        // is not followed past it.
        let short = len.saturating_sub(off);
        assert!(
            dec(c, &e.data, &e.hash, short, len).is_err(),
            "claims {short} of {len}"
        );
        let mut roomy = Vec::with_capacity(raw.len() + 4096);
        assert!(wire::decode_into(c, &e.data, &e.hash, short, len, &mut roomy).is_err());
        assert!(roomy.is_empty());
    }
    assert!(
        dec(c, &e.data, &e.hash, len + off, len + off).is_err(),
        "claims {off} more"
    );
    // The other codec.
    let other = 1 - c;
    if let Ok(v) = dec(other, &e.data, &e.hash, len, len) {
        assert_eq!(v, raw);
    }
    // A flipped bit of the hash is a mismatch, of the data an error or the same bytes.
    let at = flip % (32 + e.data.len());
    let bit = 1u8 << (head[3] % 8);
    if at < 32 {
        let mut h = e.hash;
        h[at] ^= bit;
        assert_eq!(
            dec(c, &e.data, &h, len, len),
            Err(WireError::HashMismatch { raw_length: len })
        );
    } else {
        let mut d = e.data.clone();
        d[at - 32] ^= bit;
        if let Ok(v) = dec(c, &d, &e.hash, len, len) {
            assert_eq!(e.codec, Codec::Zstd, "a flipped stored byte passed");
            assert_eq!(v, raw, "a flipped bit gave other bytes that passed");
        }
    }
}

/// Chunk-diff ranges: ordered, merged, within the source; a list that does not match its size
/// means the whole file.
fn check_ranges(chunk_size: u64, src: &ChunkList, tgt: &ChunkList) -> Vec<ByteRange> {
    let ranges = ranges_to_fetch(chunk_size, src, tgt);
    let mut end = None::<u64>;
    for r in &ranges {
        assert!(r.length > 0, "an empty range: {ranges:?}");
        let stop = r.offset.checked_add(r.length).expect("a range past u64");
        assert!(
            stop <= src.size,
            "{r:?} past the source's {} bytes",
            src.size
        );
        if let Some(e) = end {
            assert!(
                r.offset > e,
                "ranges out of order or not merged: {ranges:?}"
            );
        }
        end = Some(stop);
    }
    let whole = src.size == 0 && ranges.is_empty()
        || ranges
            == [ByteRange {
                offset: 0,
                length: src.size,
            }];
    let valid = chunk_count(src.size, chunk_size) == Some(src.hashes.len() as u64)
        && chunk_count(tgt.size, chunk_size) == Some(tgt.hashes.len() as u64);
    if !valid {
        assert!(whole, "a list that does not match its size: {ranges:?}");
    } else {
        // Every chunk not fetched is one both sides hold at the same extent with the same hash.
        let mut next = ranges.iter().peekable();
        for (i, h) in src.hashes.iter().enumerate() {
            let start = (i as u64).saturating_mul(chunk_size);
            while next.peek().is_some_and(|r| r.offset + r.length <= start) {
                next.next();
            }
            let fetched = next.peek().is_some_and(|r| r.offset <= start);
            if !fetched {
                assert_eq!(
                    tgt.hashes.get(i),
                    Some(h),
                    "chunk {i} skipped with another hash"
                );
                let end = |size: u64| size.min(start.saturating_add(chunk_size));
                assert_eq!(
                    end(src.size),
                    end(tgt.size),
                    "chunk {i} skipped at another extent"
                );
            }
        }
    }
    ranges
}

/// Mode 4: two files, their chunk hashes, the ranges fetched: applied, they give the source.
fn chunk_diff(bytes: &[u8]) {
    if bytes.len() < 4 {
        return;
    }
    let (head, files) = bytes.split_at(4);
    let cs = usize::from(head[0] % 64) + 1;
    let split = usize::from(u16::from_le_bytes([head[2], head[3]])) % (files.len() + 1);
    let (src, tgt) = files.split_at(split);
    let hashes =
        |f: &[u8]| -> Vec<[u8; 32]> { f.chunks(cs).map(|c| *blake3::hash(c).as_bytes()).collect() };
    let (mut hs, ht) = (hashes(src), hashes(tgt));
    let mut size = src.len() as u64;
    let tampered = match head[1] % 4 {
        0 => false,
        1 => hs.pop().is_some(),
        2 => {
            hs.push([7; 32]);
            true
        }
        _ => {
            size += cs as u64;
            true
        }
    };
    let source = ChunkList { size, hashes: &hs };
    let target = ChunkList {
        size: tgt.len() as u64,
        hashes: &ht,
    };
    let ranges = check_ranges(cs as u64, &source, &target);
    if tampered {
        return;
    }
    let mut out = tgt.to_vec();
    out.resize(src.len(), 0xAA);
    for r in &ranges {
        let (o, l) = (r.offset as usize, r.length as usize);
        out[o..o + l].copy_from_slice(&src[o..o + l]);
    }
    assert_eq!(
        out, src,
        "the target with the fetched ranges is not the source"
    );
}
