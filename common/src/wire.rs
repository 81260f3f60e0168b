//! The payload format both transports (gRPC, QUIC) carry for file bytes.
//!
//! A chunk of a source file travels as `(codec, data, hash, raw_length)`: `data` is either the
//! raw bytes (`Stored`) or one zstd frame of them (`Zstd`), `hash` is the blake3 of the raw
//! bytes, and `raw_length` their length. The receiver trusts none of it: it refuses a
//! `raw_length` above its own limit before allocating anything, decompresses into room for
//! `raw_length` bytes (so a frame that expands further is refused, not followed), and
//! compares the blake3 of what it got with `hash`. Compression is done by the application, not
//! the transport, so the same bytes are hashed and verified whatever carries them.

/// How `data` encodes the raw bytes; the numbers are the wire values of `Chunk.codec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Stored,
    Zstd,
}

impl Codec {
    pub fn to_u32(self) -> u32 {
        match self {
            Codec::Stored => 0,
            Codec::Zstd => 1,
        }
    }

    pub fn from_u32(v: u32) -> Result<Codec, WireError> {
        match v {
            0 => Ok(Codec::Stored),
            1 => Ok(Codec::Zstd),
            other => Err(WireError::UnknownCodec(other)),
        }
    }
}

/// What the sender asks for: no compression, or zstd at a level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd(i32),
}

impl Compression {
    /// What failback asks for unless told otherwise (and the level `--compress auto` uses when
    /// it compresses, `compress_choice`): on
    /// PostgreSQL's pages and WAL level 1 compresses about a third faster than level 3 (some
    /// 330 MB/s of raw bytes per core against 240) for some 6 % more bytes; a thin link pays
    /// for higher levels: `--compress 3` or more.
    pub const DEFAULT: Compression = Compression::Zstd(1);

    /// The wire form of `ReadRangesRequest.compression_level`: 0 = none, else a zstd level.
    pub fn from_level(level: i32) -> Compression {
        if level == 0 {
            Compression::None
        } else {
            Compression::Zstd(level)
        }
    }

    pub const fn level(self) -> i32 {
        match self {
            Compression::None => 0,
            Compression::Zstd(l) => l,
        }
    }
}

/// A chunk ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub codec: Codec,
    pub data: Vec<u8>,
    pub hash: [u8; 32],
    pub raw_length: u64,
}

/// Why a received chunk was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unknown chunk codec {0} (0 = stored and 1 = zstd are known)")]
    UnknownCodec(u32),
    #[error("zstd level {0} is out of range ({min}..={max})", min = zstd_min(), max = zstd_max())]
    BadLevel(i32),
    #[error("chunk claims {raw_length} raw bytes, over the limit of {limit}")]
    TooLong { raw_length: u64, limit: u64 },
    #[error("stored chunk carries {got} bytes but claims {raw_length}")]
    StoredLength { got: u64, raw_length: u64 },
    #[error("zstd chunk decompresses to more than its claimed {raw_length} bytes")]
    Expands { raw_length: u64 },
    #[error("zstd chunk decompresses to {got} bytes, not its claimed {raw_length}")]
    ZstdLength { got: u64, raw_length: u64 },
    #[error("zstd chunk is corrupt: {0}")]
    ZstdCorrupt(String),
    #[error("chunk hash is {got} bytes long, not 32")]
    HashLength { got: usize },
    #[error("blake3 of the chunk's {raw_length} raw bytes does not match the hash it carries")]
    HashMismatch { raw_length: u64 },
    #[error("zstd compression failed: {0}")]
    Compress(String),
}

fn zstd_min() -> i32 {
    *zstd::compression_level_range().start()
}

fn zstd_max() -> i32 {
    *zstd::compression_level_range().end()
}

thread_local! {
    /// This thread's zstd compression context and the level it is set to. A context costs about
    /// a megabyte of tables at level 3: made once per thread, not once per chunk, and reused
    /// across frames, zstd does not rebuild and clear them for every chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Encodes raw bytes. A zstd frame that is not smaller than the raw bytes is sent stored, so
/// incompressible data costs nothing extra. Each thread keeps its own zstd context.
pub fn encode(raw: &[u8], compression: Compression) -> Result<Encoded, WireError> {
    let (hash, frame) = hash_and_compress(raw, compression)?;
    Ok(Encoded::new(
        hash,
        raw.len(),
        frame.ok_or_else(|| raw.to_vec()),
    ))
}

/// [`encode`] of bytes the caller gives up: sent stored, they become the chunk's data as they
/// are, not copied (on a fast link most chunks go stored, and a copy of each costs the sender
/// a third of what hashing it does).
pub fn encode_owned(raw: Vec<u8>, compression: Compression) -> Result<Encoded, WireError> {
    let (hash, frame) = hash_and_compress(&raw, compression)?;
    Ok(Encoded::new(hash, raw.len(), frame.ok_or(raw)))
}

impl Encoded {
    /// `data`: a zstd frame (`Ok`), or the raw bytes themselves, stored (`Err`).
    fn new(hash: [u8; 32], raw_length: usize, data: Result<Vec<u8>, Vec<u8>>) -> Encoded {
        let (codec, data) = match data {
            Ok(frame) => (Codec::Zstd, frame),
            Err(raw) => (Codec::Stored, raw),
        };
        Encoded {
            codec,
            data,
            hash,
            raw_length: raw_length as u64,
        }
    }
}

/// The raw bytes' hash, and their zstd frame when `compression` asks for one and it comes out
/// smaller than they are.
fn hash_and_compress(
    raw: &[u8],
    compression: Compression,
) -> Result<([u8; 32], Option<Vec<u8>>), WireError> {
    let hash = *blake3::hash(raw).as_bytes();
    let Compression::Zstd(level) = compression else {
        return Ok((hash, None));
    };
    if !zstd::compression_level_range().contains(&level) {
        return Err(WireError::BadLevel(level));
    }
    let frame = COMPRESSOR
        .with(|cell| -> std::io::Result<Vec<u8>> {
            let mut slot = cell.borrow_mut();
            let c = match &mut *slot {
                Some((l, c)) if *l == level => c,
                Some((l, c)) => {
                    c.set_compression_level(level)?;
                    *l = level;
                    c
                }
                None => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
            };
            // Room for the frame without zeroing it: zstd writes into the spare capacity.
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
            c.compress_to_buffer(raw, &mut out)?;
            Ok(out)
        })
        .map_err(|e| WireError::Compress(e.to_string()))?;
    Ok((hash, (frame.len() < raw.len()).then_some(frame)))
}

thread_local! {
    /// This thread's zstd decompression context: made once, not once per chunk.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// What a received chunk says of itself, checked before any of its bytes are looked at.
struct Header {
    codec: Codec,
    expected: [u8; 32],
    /// Its raw length, within the receiver's limit.
    len: usize,
}

fn header(codec: u32, hash: &[u8], raw_length: u64, limit: u64) -> Result<Header, WireError> {
    let codec = Codec::from_u32(codec)?;
    if raw_length > limit {
        return Err(WireError::TooLong { raw_length, limit });
    }
    let expected: [u8; 32] = hash
        .try_into()
        .map_err(|_| WireError::HashLength { got: hash.len() })?;
    // raw_length <= limit, and the limit is something this process chose to hold in memory.
    let len = usize::try_from(raw_length).map_err(|_| WireError::TooLong { raw_length, limit })?;
    Ok(Header {
        codec,
        expected,
        len,
    })
}

/// A stored chunk's bytes, checked: as long as it says, and hashing to what it says.
fn check_stored(data: &[u8], h: &Header) -> Result<(), WireError> {
    let raw_length = h.len as u64;
    if data.len() != h.len {
        return Err(WireError::StoredLength {
            got: data.len() as u64,
            raw_length,
        });
    }
    if blake3::hash(data).as_bytes() != &h.expected {
        return Err(WireError::HashMismatch { raw_length });
    }
    Ok(())
}

/// Decodes a received chunk held in shared bytes (`bytes::Bytes`, which the protocol's
/// messages carry) and verifies its hash, as [`decode_into`] does: a stored chunk is checked
/// where it lies and handed back as it came, not copied (on a fast link most chunks are
/// stored, and copying each costs the receiver as much as hashing it); a compressed one is
/// inflated into a new buffer.
pub fn decode_shared<B: AsRef<[u8]> + From<Vec<u8>>>(
    codec: u32,
    data: B,
    hash: &[u8],
    raw_length: u64,
    limit: u64,
) -> Result<B, WireError> {
    let h = header(codec, hash, raw_length, limit)?;
    if h.codec == Codec::Stored {
        check_stored(data.as_ref(), &h)?;
        return Ok(data);
    }
    let mut out = Vec::new();
    inflate(data.as_ref(), &h, &mut out)?;
    Ok(B::from(out))
}

/// Decodes a received chunk into `out` (cleared first) and verifies its hash. `limit` is the
/// largest `raw_length` this receiver accepts; nothing larger is ever allocated.
pub fn decode_into(
    codec: u32,
    data: &[u8],
    hash: &[u8],
    raw_length: u64,
    limit: u64,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    out.clear();
    let h = header(codec, hash, raw_length, limit)?;
    match h.codec {
        Codec::Stored => {
            check_stored(data, &h)?;
            out.extend_from_slice(data);
            Ok(())
        }
        Codec::Zstd => inflate(data, &h, out).inspect_err(|_| out.clear()),
    }
}

/// A zstd chunk's frame inflated into `out` (empty), checked: exactly as long as it says, and
/// hashing to what it says.
fn inflate(data: &[u8], h: &Header, out: &mut Vec<u8>) -> Result<(), WireError> {
    let (len, raw_length) = (h.len, h.len as u64);
    // Room for `len` bytes, not zeroed: zstd writes into the spare capacity, and the Vec's
    // length covers only what it wrote. A buffer reused from a larger chunk may have more room;
    // a frame that fills it past `len` is refused below all the same.
    out.reserve_exact(len);
    let got = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match &mut *slot {
            Some(d) => d,
            None => slot.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| WireError::ZstdCorrupt(e.to_string()))?,
            ),
        };
        d.decompress_to_buffer(data, out).map_err(|e| {
            // zstd says "Destination buffer is too small" when the frame expands past the
            // space given; anything else is a damaged frame.
            let msg = e.to_string();
            if msg.contains("too small") {
                WireError::Expands { raw_length }
            } else {
                WireError::ZstdCorrupt(msg)
            }
        })
    })?;
    if got != len {
        return Err(WireError::ZstdLength {
            got: got as u64,
            raw_length,
        });
    }
    if blake3::hash(out).as_bytes() != &h.expected {
        return Err(WireError::HashMismatch { raw_length });
    }
    Ok(())
}

/// [`decode_into`] into a new buffer.
pub fn decode(
    codec: u32,
    data: &[u8],
    hash: &[u8],
    raw_length: u64,
    limit: u64,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    decode_into(codec, data, hash, raw_length, limit, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: u64 = 1 << 20;

    fn page_like(n: usize) -> Vec<u8> {
        (0..n).map(|i| ((i / 64) % 7) as u8).collect()
    }

    fn dec(e: &Encoded) -> Result<Vec<u8>, WireError> {
        decode(e.codec.to_u32(), &e.data, &e.hash, e.raw_length, LIMIT)
    }

    #[test]
    fn compressible_data_is_zstd_and_round_trips() {
        let raw = page_like(8192);
        let e = encode(&raw, Compression::Zstd(3)).unwrap();
        assert_eq!(e.codec, Codec::Zstd);
        assert!(e.data.len() < raw.len() / 4);
        assert_eq!(dec(&e).unwrap(), raw);
        // The thread's one context moves between levels, frame after frame.
        for level in [19, 1, 19, 3] {
            let e = encode(&raw, Compression::Zstd(level)).unwrap();
            assert_eq!(e.codec, Codec::Zstd, "level {level}");
            assert_eq!(dec(&e).unwrap(), raw, "level {level}");
        }
        assert_eq!(
            encode(&raw, Compression::Zstd(99)).unwrap_err(),
            WireError::BadLevel(99)
        );
    }

    #[test]
    fn incompressible_or_none_is_stored() {
        let raw: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let e = encode(&raw, Compression::None).unwrap();
        assert_eq!(e.codec, Codec::Stored);
        assert_eq!(dec(&e).unwrap(), raw);
        let empty = encode(&[], Compression::Zstd(1)).unwrap();
        assert_eq!(empty.codec, Codec::Stored);
        assert_eq!(dec(&empty).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn flipped_byte_is_caught() {
        let raw = page_like(8192);
        for comp in [Compression::None, Compression::Zstd(3)] {
            let e = encode(&raw, comp).unwrap();
            for at in [0, e.data.len() / 2, e.data.len() - 1] {
                let mut bad = e.clone();
                bad.data[at] ^= 0x40;
                assert!(dec(&bad).is_err(), "flip at {at} with {comp:?} not caught");
            }
            let mut bad = e.clone();
            bad.hash[5] ^= 1;
            assert_eq!(
                dec(&bad),
                Err(WireError::HashMismatch {
                    raw_length: raw.len() as u64
                })
            );
        }
    }

    #[test]
    fn owned_bytes_sent_stored_are_not_copied() {
        let raw = page_like(8192);
        for comp in [Compression::None, Compression::Zstd(1)] {
            let mine = raw.clone();
            let at = mine.as_ptr();
            let owned = encode_owned(mine, comp).unwrap();
            assert_eq!(owned, encode(&raw, comp).unwrap(), "{comp:?}");
            assert_eq!(
                owned.data.as_ptr() == at,
                comp == Compression::None,
                "{comp:?}"
            );
        }
        // Incompressible bytes asked to be compressed go stored, as they came.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let at = noise.as_ptr();
        let e = encode_owned(noise, Compression::Zstd(1)).unwrap();
        assert_eq!((e.codec, e.data.as_ptr()), (Codec::Stored, at));
        assert_eq!(
            encode_owned(raw, Compression::Zstd(1000)),
            Err(WireError::BadLevel(1000))
        );
    }

    #[test]
    fn stored_bytes_are_verified_where_they_lie() {
        let raw = page_like(8192);
        let e = encode(&raw, Compression::None).unwrap();
        let (codec, len) = (e.codec.to_u32(), e.raw_length);
        let sent = e.data.clone();
        let at = sent.as_ptr();
        let got = decode_shared(codec, sent, &e.hash, len, LIMIT).unwrap();
        assert_eq!(got, raw);
        assert_eq!(got.as_ptr(), at, "the stored bytes were copied");
        let mut bad = e.data.clone();
        bad[4000] ^= 1;
        assert_eq!(
            decode_shared(codec, bad, &e.hash, len, LIMIT),
            Err(WireError::HashMismatch { raw_length: len })
        );
        assert_eq!(
            decode_shared(codec, e.data.clone(), &e.hash, len - 1, LIMIT),
            Err(WireError::StoredLength {
                got: len,
                raw_length: len - 1
            })
        );
        assert_eq!(
            decode_shared(codec, e.data.clone(), &e.hash, len, 4096),
            Err(WireError::TooLong {
                raw_length: len,
                limit: 4096
            })
        );
        // A compressed chunk is inflated, into a buffer of its own.
        let z = encode(&raw, Compression::Zstd(1)).unwrap();
        assert_eq!(z.codec, Codec::Zstd);
        let got = decode_shared(z.codec.to_u32(), z.data.clone(), &z.hash, len, LIMIT);
        assert_eq!(got.unwrap(), raw);
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocation() {
        let raw = page_like(8192);
        let e = encode(&raw, Compression::Zstd(3)).unwrap();
        assert_eq!(
            decode(1, &e.data, &e.hash, u64::MAX, LIMIT),
            Err(WireError::TooLong {
                raw_length: u64::MAX,
                limit: LIMIT
            })
        );
        // Claims fewer bytes than the frame holds: refused, not followed.
        assert_eq!(
            decode(1, &e.data, &e.hash, 100, LIMIT),
            Err(WireError::Expands { raw_length: 100 })
        );
        // The same into a buffer that kept a larger chunk's room: refused all the same, and
        // nothing of it is left in the buffer.
        let mut roomy = Vec::with_capacity(1 << 20);
        assert!(matches!(
            decode_into(1, &e.data, &e.hash, 100, LIMIT, &mut roomy),
            Err(WireError::ZstdLength {
                got: 8192,
                raw_length: 100
            })
        ));
        assert!(roomy.is_empty());
        // Claims more than the frame holds.
        assert!(matches!(
            decode(1, &e.data, &e.hash, 9000, LIMIT),
            Err(WireError::ZstdLength { got: 8192, .. })
        ));
        assert_eq!(
            decode(0, &raw, &e.hash, 8191, LIMIT),
            Err(WireError::StoredLength {
                got: 8192,
                raw_length: 8191
            })
        );
        assert_eq!(
            decode(7, &raw, &e.hash, 8192, LIMIT),
            Err(WireError::UnknownCodec(7))
        );
        assert_eq!(
            decode(0, &raw, &e.hash[..31], 8192, LIMIT),
            Err(WireError::HashLength { got: 31 })
        );
        assert!(matches!(
            decode(1, b"not a zstd frame", &e.hash, 8192, LIMIT),
            Err(WireError::ZstdCorrupt(_))
        ));
        assert_eq!(
            encode(&raw, Compression::Zstd(1000)),
            Err(WireError::BadLevel(1000))
        );
    }

    proptest! {
        #[test]
        fn round_trip(raw in proptest::collection::vec(any::<u8>(), 0..20000),
                      level in prop_oneof![Just(0), 1..6i32]) {
            let e = encode(&raw, Compression::from_level(level)).unwrap();
            prop_assert_eq!(dec(&e).unwrap(), raw);
        }

        #[test]
        fn corruption_never_passes(raw in proptest::collection::vec(0u8..4, 1..20000),
                                   level in prop_oneof![Just(0), 1..6i32],
                                   pos in any::<prop::sample::Index>(),
                                   bit in 0u8..8) {
            let e = encode(&raw, Compression::from_level(level)).unwrap();
            let mut bad = e.clone();
            let at = pos.index(bad.data.len());
            bad.data[at] ^= 1 << bit;
            // A flip in a zstd frame's header bits that do not affect the content (the
            // content-size or window fields) may still yield the same bytes; what must never
            // happen is other bytes passing the check.
            if let Ok(v) = dec(&bad) {
                prop_assert_eq!(e.codec, Codec::Zstd);
                prop_assert_eq!(v, raw);
            }
        }

        #[test]
        fn garbage_never_panics(codec in 0u32..3, data in proptest::collection::vec(any::<u8>(), 0..512),
                                hash in proptest::collection::vec(any::<u8>(), 0..40),
                                raw_length in any::<u64>()) {
            let _ = decode(codec, &data, &hash, raw_length, 4096);
        }
    }
}
