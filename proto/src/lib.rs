//! The failback wire protocol, `failback.v1`: its messages and service, its limits and its
//! capability names.
//!
//! gRPC (tonic) and QUIC (quinn) carry the same prost messages; see `failback.proto`. Both ends
//! use the constants below rather than their own copies, so that what failbackd refuses and
//! what failback asks for cannot drift apart.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("failback.v1");
}

/// The protocol version this build speaks; a handshake with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// The ALPN protocol name of QUIC connections: another protocol on the same port is refused
/// during the TLS handshake.
pub const ALPN: &[u8] = b"failback/1";

/// What one request or reply may hold. failbackd refuses requests past these, and failback
/// never asks for more.
pub mod limits {
    /// The default and the largest chunk of file data failbackd sends, in raw bytes.
    pub const DEFAULT_MAX_CHUNK: u64 = 1 << 20;
    pub const MAX_MAX_CHUNK: u64 = 16 << 20;
    /// The largest reply message: a chunk and its framing.
    pub const MAX_REPLY: usize = (MAX_MAX_CHUNK + (1 << 16)) as usize;
    /// The largest request, on either transport: requests are lists of ranges or paths.
    /// Decoding multiplies a request's size (an empty range takes 2 bytes on the wire and 40
    /// in memory), so it is kept to what failback sends: its batches stay under half of it.
    pub const MAX_REQUEST: usize = 1 << 20;
    /// The highest zstd level failbackd compresses at: a client asking for more is served at
    /// this level (each level past it costs many times the CPU per chunk for a few percent
    /// fewer bytes, and the CPU is the server's).
    pub const MAX_ZSTD_LEVEL: i32 = 9;
    /// The most ranges one ReadRanges request may carry.
    pub const MAX_RANGES_PER_REQUEST: usize = 65_536;
    /// The longest path a request may name (PostgreSQL's MAXPGPATH is 1024).
    pub const MAX_PATH_LEN: usize = 4096;
    /// The smallest and largest chunk ChunkHashes hashes: smaller chunks would make the hash
    /// lists larger than the bytes they save, larger ones skip too little.
    pub const MIN_HASH_CHUNK: u64 = 4096;
    pub const MAX_HASH_CHUNK: u64 = 16 << 20;
    /// The most paths one ChunkHashes request may name.
    pub const MAX_HASH_PATHS: usize = 4096;
    /// The most hashes one file may get (8 MiB of hashes): a larger file needs larger chunks.
    pub const MAX_HASHES_PER_FILE: u64 = 1 << 18;
    /// The most byte ranges one ChunkHashes request may name over all its paths (a ReadRanges
    /// request's limit: the ranges of a finer round are ranges to fetch in waiting).
    pub const MAX_HASH_RANGES: usize = MAX_RANGES_PER_REQUEST;
    /// The most changed files one ChangesReply carries.
    pub const MAX_CHANGED_FILES_PER_REPLY: usize = 1024;
    /// The longest block bitmap of one changed file: a segment of 2^24 blocks (128 GiB of
    /// 8 KiB blocks), far past PostgreSQL's largest `RELSEG_SIZE`.
    pub const MAX_BLOCK_BITMAP: usize = (1 << 24) / 8;
}

/// The capabilities a handshake announces (`HandshakeResponse.capabilities`).
pub mod capability {
    /// Chunks may be zstd frames.
    pub const ZSTD: &str = "zstd";
    /// Chunks carry the blake3 hash of their raw bytes.
    pub const BLAKE3: &str = "blake3";
    /// ChunkHashes is served.
    pub const CHUNK_HASHES: &str = "chunk-hashes";
    /// ChunkHashes hashes the chunks within byte ranges (`ChunkHashesRequest.ranges`).
    pub const HASH_RANGES: &str = "hash-ranges";
    /// failbackd can tell the end of WAL of the server running on the data directory
    /// (`--pg-conn`).
    pub const LIVE: &str = "live";
    /// PostgreSQL runs on the data directory (`postmaster.pid` names a live process), with or
    /// without `--pg-conn`.
    pub const RUNNING: &str = "running";
    /// Changes is served: the source's changed blocks from its own WAL.
    pub const CHANGES: &str = "changes";
    /// BackupWindow and EndBackupWindow are served (a live source, `--pg-conn`).
    pub const BACKUP_WINDOW: &str = "backup-window";
}
