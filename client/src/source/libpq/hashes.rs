//! Chunk hashes of a running server's files, computed by the server itself in SQL.
//!
//! PostgreSQL can read any file of its data directory for a role granted
//! `pg_read_binary_file(text, bigint, bigint, boolean)` (one of pg_rewind's four grants), and
//! it has `sha256(bytea)` (PostgreSQL 11 and later), a built-in function every role may call.
//! So `sha256(pg_read_binary_file(path, offset, length, true))` hashes a chunk where the file
//! lies: 32 bytes cross the link instead of the chunk. The target hashes its own chunks with
//! SHA-256 too ([`ChunkHash::Sha256`]) and fetches only those that differ, as with failbackd's
//! blake3 hashes (see [`failback_common::chunkdiff`]).
//!
//! A file's size comes from `pg_stat_file(path, true)`, which gives NULL for a file that is
//! gone: such a file is marked vanished, and so is one that disappears between the size and
//! its chunks. Many chunks go in one query (`unnest` over arrays of files and ranges,
//! `generate_series` over each range's offsets), and the queries are spread over every
//! connection the source has, each on a thread of its own, so that the server's reading and
//! hashing runs on several of its cores while the round trips overlap.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use failback_common::chunkdiff::{ChunkHash, chunk_count};
use failback_sql::libpq::{Conn, Format, PqError, Rows};

use crate::source::{FileHashes, SourceError};

/// Chunks hashed by one query: a 64 KiB chunk size makes that 256 MiB of reading on the
/// server, a few seconds on a slow disk, and 160 KiB of answer.
const CHUNKS_PER_QUERY: u64 = 4096;

/// One query's share: chunks `[first, first + count)` of file `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    file: usize,
    first: u64,
    count: u64,
}

/// Chunk hashes of `paths` (paths relative to the data directory) in chunks of `chunk_size`
/// bytes, computed by the server with SHA-256 over the connections `conns` in parallel, in
/// the order asked. `None` when the server cannot hash: the role may not read files, or the
/// server is older than PostgreSQL 11 (no `sha256`). Errors say whether retrying can help
/// ([`SourceError::is_retryable`]).
pub fn chunk_hashes(
    conns: &mut [Conn],
    paths: &[String],
    chunk_size: u64,
) -> Result<Option<Vec<FileHashes>>, SourceError> {
    if chunk_size == 0 || conns.is_empty() {
        return Ok(None);
    }
    if paths.is_empty() {
        return Ok(Some(Vec::new()));
    }
    if conns.iter().any(|c| c.server_major() < 11) {
        return Ok(None);
    }
    let sizes = match file_sizes(&mut conns[0], paths) {
        Ok(s) => s,
        Err(e) if e.is_permission_denied() => return Ok(None),
        Err(e) => return Err(query_error("the sizes of files to hash", e)),
    };
    let mut out: Vec<FileHashes> = paths
        .iter()
        .zip(&sizes)
        .map(|(path, size)| FileHashes {
            path: path.clone(),
            size: size.unwrap_or(0),
            hashes: vec![
                [0; 32];
                size.and_then(|s| chunk_count(s, chunk_size)).unwrap_or(0) as usize
            ],
            vanished: size.is_none(),
            algorithm: ChunkHash::Sha256,
        })
        .collect();
    let queries = plan_queries(&sizes, chunk_size, CHUNKS_PER_QUERY);
    let next = AtomicUsize::new(0);
    let answers: Mutex<Vec<(usize, Vec<Hashed>)>> = Mutex::new(Vec::new());
    let failed: Mutex<Option<PqError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for conn in conns.iter_mut().take(queries.len()) {
            let (next, queries, answers, failed) = (&next, &queries, &answers, &failed);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(pieces) = queries.get(i) else { return };
                    if lock(failed).is_some() {
                        return;
                    }
                    match hash_pieces(conn, paths, pieces, chunk_size) {
                        Ok(hashed) => lock(answers).push((i, hashed)),
                        Err(e) => {
                            lock(failed).get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = lock(&failed).take() {
        if e.is_permission_denied() {
            return Ok(None);
        }
        return Err(query_error("chunk hashes", e));
    }
    let answers = std::mem::take(&mut *lock(&answers));
    apply(&mut out, answers, chunk_size);
    Ok(Some(out))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking worker is re-raised by the scope; what it left is still whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failed query in the rewind's terms: a silent or lost server may answer on a new
/// connection; a refusal will not change.
pub(super) fn query_error(what: &str, e: PqError) -> SourceError {
    super::healable(what, &e).unwrap_or_else(|| SourceError::Refused {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// Each path's size now, `None` where it does not exist (or is not a regular file).
fn file_sizes(conn: &mut Conn, paths: &[String]) -> Result<Vec<Option<u64>>, PqError> {
    let rows = conn.query(
        "SELECT u.i, s.size, s.isdir \
         FROM unnest($1::text[]) WITH ORDINALITY AS u(path, i) \
         LEFT JOIN LATERAL pg_catalog.pg_stat_file(u.path, true) AS s ON true",
        &[&text_array(paths.iter().map(String::as_str))],
        Format::Text,
    )?;
    let mut sizes = vec![None; paths.len()];
    for r in 0..rows.len() {
        let i: Option<usize> = rows.text(r, 0).and_then(|t| t.parse().ok());
        let size: Option<u64> = rows.text(r, 1).and_then(|t| t.parse().ok());
        let dir = rows.text(r, 2).as_deref() == Some("t");
        if let (Some(i), Some(size)) = (i, size)
            && !dir
            && let Some(slot) = i.checked_sub(1).and_then(|i| sizes.get_mut(i))
        {
            *slot = Some(size);
        }
    }
    Ok(sizes)
}

/// The chunks of every file that exists, cut into queries of at most `per_query` chunks
/// (a large file spans several queries; small files share one).
fn plan_queries(sizes: &[Option<u64>], chunk_size: u64, per_query: u64) -> Vec<Vec<Piece>> {
    let per_query = per_query.max(1);
    let mut queries: Vec<Vec<Piece>> = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    let mut room = per_query;
    for (file, size) in sizes.iter().enumerate() {
        let Some(n) = size.and_then(|s| chunk_count(s, chunk_size)) else {
            continue;
        };
        let mut first = 0;
        while first < n {
            let count = (n - first).min(room);
            current.push(Piece { file, first, count });
            first += count;
            room -= count;
            if room == 0 {
                queries.push(std::mem::take(&mut current));
                room = per_query;
            }
        }
    }
    if !current.is_empty() {
        queries.push(current);
    }
    queries
}

/// One chunk's answer: its file, its index, and its hash and length (`None` when the file
/// was gone when read).
#[derive(Debug)]
struct Hashed {
    file: usize,
    chunk: u64,
    hash: Option<([u8; 32], u64)>,
}

/// Hashes the chunks of `pieces` in one query.
fn hash_pieces(
    conn: &mut Conn,
    paths: &[String],
    pieces: &[Piece],
    chunk_size: u64,
) -> Result<Vec<Hashed>, PqError> {
    let files = text_array(pieces.iter().map(|p| paths[p.file].as_str()));
    let ids = int_array(pieces.iter().map(|p| p.file as u64));
    let from = int_array(pieces.iter().map(|p| p.first * chunk_size));
    let to = int_array(pieces.iter().map(|p| (p.first + p.count - 1) * chunk_size));
    let chunk = chunk_size.to_string();
    // The read is in a subquery of its own so that it is done once for both the hash and the
    // length (a volatile function keeps the subquery from being merged into the outer one).
    let rows = conn.query(
        "SELECT r.id, r.off, pg_catalog.sha256(r.data), \
                pg_catalog.octet_length(r.data)::int8 \
         FROM (SELECT u.id, g.off, \
                      pg_catalog.pg_read_binary_file(u.path, g.off, $5::int8, true) AS data \
               FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
                    AS u(path, id, lo, hi), \
                    LATERAL pg_catalog.generate_series(u.lo, u.hi, $5::int8) AS g(off)) r",
        &[&files, &ids, &from, &to, &chunk],
        Format::Binary,
    )?;
    read_hashes(&rows, chunk_size)
}

/// The rows of [`hash_pieces`]' query.
fn read_hashes(rows: &Rows, chunk_size: u64) -> Result<Vec<Hashed>, PqError> {
    let bad = |what: &str| PqError::Query {
        sqlstate: None,
        message: format!("unexpected chunk hash row: {what}"),
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in 0..rows.len() {
        let file = rows.int8(r, 0).ok_or_else(|| bad("no file"))?;
        let off = rows.int8(r, 1).ok_or_else(|| bad("no offset"))?;
        let hash = match (rows.get(r, 2), rows.int8(r, 3)) {
            (Some(h), Some(len)) => Some((
                <[u8; 32]>::try_from(h).map_err(|_| bad("a hash that is not 32 bytes"))?,
                u64::try_from(len).map_err(|_| bad("a negative length"))?,
            )),
            _ => None,
        };
        out.push(Hashed {
            file: usize::try_from(file).map_err(|_| bad("a negative file"))?,
            chunk: u64::try_from(off).map_err(|_| bad("a negative offset"))? / chunk_size,
            hash,
        });
    }
    Ok(out)
}

/// Puts the answers in place. A file the server found gone is marked vanished; a chunk read
/// shorter than its extent (the file shrank since its size was taken) ends the file there,
/// so that the size and the hashes describe the same bytes.
fn apply(out: &mut [FileHashes], answers: Vec<(usize, Vec<Hashed>)>, chunk_size: u64) {
    // Where each file was found to end early: (chunk index, bytes).
    let mut ends: Vec<Option<(u64, u64)>> = vec![None; out.len()];
    for (_, hashed) in answers {
        for h in hashed {
            let Some(f) = out.get_mut(h.file) else {
                continue;
            };
            let Some((hash, len)) = h.hash else {
                f.vanished = true;
                continue;
            };
            let Some(slot) = f.hashes.get_mut(h.chunk as usize) else {
                continue;
            };
            *slot = hash;
            let start = h.chunk * chunk_size;
            let expected = f.size.min(start + chunk_size) - start;
            if len < expected {
                let end = start + len;
                let e = &mut ends[h.file];
                if e.is_none_or(|(_, b)| end < b) {
                    *e = Some((h.chunk, end));
                }
            }
        }
    }
    for (f, end) in out.iter_mut().zip(ends) {
        if f.vanished {
            f.size = 0;
            f.hashes.clear();
        } else if let Some((chunk, bytes)) = end {
            // The short chunk's hash is of its `bytes - start` bytes: it stays, the last one.
            f.size = bytes;
            f.hashes
                .truncate(chunk as usize + usize::from(bytes > chunk * chunk_size));
        }
    }
}

/// A text array literal (`{"a","b"}`), every element quoted so that PostgreSQL reads commas,
/// braces, quotes and backslashes in paths as themselves.
pub(super) fn text_array<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (i, s) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// An int8 array literal.
pub(super) fn int_array(items: impl Iterator<Item = u64>) -> String {
    let mut out = String::from("{");
    for (i, n) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&n.to_string());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_hold_at_most_so_many_chunks_and_skip_missing_files() {
        // 10 chunks, gone, 3 chunks, empty, 1 chunk (short).
        let sizes = [Some(10 * 64), None, Some(3 * 64), Some(0), Some(5)];
        let q = plan_queries(&sizes, 64, 4);
        let p = |file, first, count| Piece { file, first, count };
        assert_eq!(
            q,
            vec![
                vec![p(0, 0, 4)],
                vec![p(0, 4, 4)],
                vec![p(0, 8, 2), p(2, 0, 2)],
                vec![p(2, 2, 1), p(4, 0, 1)],
            ]
        );
        assert!(plan_queries(&[None, Some(0)], 64, 4).is_empty());
    }

    fn file(size: u64, chunks: usize) -> FileHashes {
        FileHashes {
            path: "f".into(),
            size,
            hashes: vec![[0; 32]; chunks],
            vanished: false,
            algorithm: ChunkHash::Sha256,
        }
    }

    #[test]
    fn answers_land_in_place_and_shrunk_or_gone_files_say_so() {
        let mut out = vec![file(250, 3), file(300, 3), file(100, 1)];
        let h = |file, chunk, b: u8, len| Hashed {
            file,
            chunk,
            hash: Some(([b; 32], len)),
        };
        let answers = vec![
            (1, vec![h(0, 2, 3, 50), h(1, 0, 4, 100), h(1, 1, 5, 30)]),
            (
                0,
                vec![
                    h(0, 0, 1, 100),
                    h(0, 1, 2, 100),
                    Hashed {
                        file: 2,
                        chunk: 0,
                        hash: None,
                    },
                ],
            ),
        ];
        // Chunk 2 of file 1 was read empty: the file ends at 130 bytes, in chunk 1.
        let mut answers = answers;
        answers[0].1.push(h(1, 2, 6, 0));
        apply(&mut out, answers, 100);
        assert_eq!(out[0].hashes, vec![[1; 32], [2; 32], [3; 32]]);
        assert_eq!((out[0].size, out[0].vanished), (250, false));
        assert_eq!(out[1].size, 130);
        assert_eq!(out[1].hashes, vec![[4; 32], [5; 32]]);
        assert!(out[2].vanished && out[2].hashes.is_empty());
        // A file that ends exactly at a chunk boundary keeps no empty chunk.
        let mut out = vec![file(300, 3)];
        apply(
            &mut out,
            vec![(0, vec![h(0, 1, 7, 100), h(0, 2, 8, 0)])],
            100,
        );
        assert_eq!((out[0].size, out[0].hashes.len()), (200, 2));
    }

    #[test]
    fn array_literals_quote_what_postgresql_would_misread() {
        assert_eq!(
            text_array(["base/1/2", "a\"b", "c\\d", "e,f}"].into_iter()),
            r#"{"base/1/2","a\"b","c\\d","e,f}"}"#
        );
        assert_eq!(text_array(std::iter::empty()), "{}");
        assert_eq!(
            int_array([0, 65536, u64::MAX].into_iter()),
            "{0,65536,18446744073709551615}"
        );
    }
}
