//! Reader slots: what one client may hold of failbackd, and when it loses it.
//!
//! A streaming answer (ReadRanges, ChunkHashes, Changes) runs on a thread of the blocking pool
//! that reads the data directory and hands its replies to the transport through a small
//! channel. Each holds a reader slot while it runs: [`MAX_READERS`] over all clients, so the
//! threads, the open files and the replies buffered are bounded whatever clients open, and
//! [`MAX_READERS_PER_CONNECTION`] for one connection, so that one client, however many
//! requests it sends, leaves slots for another's rewind.
//!
//! Answers whose work is out of proportion to their request or reply (ChunkHashes hashes
//! whole files for a list of paths, Changes decodes WAL) also hold a worker slot, of which
//! there are only a few ([`max_workers`], [`MAX_WORKERS_PER_CONNECTION`]).
//!
//! An answer of many small replies (ChunkHashes of a cluster's small relation files: one path
//! and one hash each) hands them on in batches ([`Unbatched`]): one reply at a time cost a
//! wake-up of the transport's task and a write to the socket each, more than reading and
//! hashing the file took.
//!
//! A client that asks and never reads would keep its slots forever: its replies fill the
//! channel and the reader waits. Such a stream is ended once it has been unable to hand on a
//! reply for the stall timeout *while another request waits for a slot*: a slow client on a
//! thin link, alone, keeps its slots however long each reply takes to leave.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::audit::{Audit, Peer};
use crate::lock;
use crate::metrics::Refusal;

/// Streaming answers read at once, over all clients.
pub const MAX_READERS: usize = 64;
/// Streaming answers one connection may have read at once; its further requests wait.
pub const MAX_READERS_PER_CONNECTION: usize = MAX_READERS / 2;
/// Answers that cost CPU out of proportion to their replies (hashing whole files, decoding
/// WAL) one connection may have computed at once: failback asks two ChunkHashes at a time
/// (one hashed while the answer to the other crosses the link).
pub const MAX_WORKERS_PER_CONNECTION: usize = 2;

/// Such answers computed at once over all clients: a few more than the cores, so that they
/// never take every core from the readers and PostgreSQL.
pub fn max_workers() -> usize {
    (2 * failback_datadir::wal::cores()).max(4)
}
/// How long a reply may wait for its client to read before the stream is ended, when other
/// requests wait for a reader slot.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a waiting reader looks whether it is stalled and others wait.
const STALL_CHECK: Duration = Duration::from_millis(250);

/// The reader slots of one failbackd.
#[derive(Debug)]
pub struct Readers {
    all: Arc<Semaphore>,
    per_connection: usize,
    held: Mutex<HashMap<Peer, usize>>,
    freed: Notify,
    /// Requests waiting for one of the `all` slots (not for their own connection's).
    waiting: AtomicUsize,
    stall_timeout: Duration,
}

/// One reader slot, given back when dropped.
#[derive(Debug)]
pub struct ReaderSlot {
    _all: OwnedSemaphorePermit,
    readers: Arc<Readers>,
    peer: Peer,
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        let mut held = lock(&self.readers.held);
        if let Some(n) = held.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.peer);
            }
        }
        drop(held);
        self.readers.freed.notify_waiters();
    }
}

/// Decrements a counter when dropped (a waiter cancelled by its client going away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Readers {
    pub fn new(all: usize, per_connection: usize, stall_timeout: Duration) -> Arc<Readers> {
        Arc::new(Readers {
            all: Arc::new(Semaphore::new(all)),
            per_connection: per_connection.max(1),
            held: Mutex::default(),
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
            stall_timeout,
        })
    }

    /// A slot for `peer`, once its connection holds fewer than its share and one is free.
    pub async fn acquire(self: &Arc<Self>, peer: Peer) -> Result<ReaderSlot, Status> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a slot freed in between still wakes this waiter.
            freed.as_mut().enable();
            {
                let mut held = lock(&self.held);
                let n = held.entry(peer).or_insert(0);
                if *n < self.per_connection {
                    *n += 1;
                    break;
                }
            }
            freed.await;
        }
        // The connection's share is counted from here: handed back by the slot, or below.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(&self.waiting);
        let all = self.all.clone().acquire_owned().await;
        drop(waiting);
        match all {
            Ok(permit) => Ok(ReaderSlot {
                _all: permit,
                readers: self.clone(),
                peer,
            }),
            Err(_) => {
                let mut held = lock(&self.held);
                if let Some(n) = held.get_mut(&peer) {
                    *n -= 1;
                }
                Err(Status::unavailable("failbackd is shutting down"))
            }
        }
    }

    /// Whether a request waits for a slot held by someone.
    fn contended(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }
}

/// How handing a reply on ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Delivered,
    /// The client went away.
    Gone,
    /// The client read nothing for the stall timeout while others waited: the stream ends.
    Stalled,
}

/// The sending end of a streaming answer, for its reader thread: replies wait for the client
/// as long as nobody else needs the slot.
pub struct Outbox<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    /// The reader slot, then any other slot the answer holds.
    slots: Vec<ReaderSlot>,
    rt: tokio::runtime::Handle,
    audit: Arc<Audit>,
    call: &'static str,
}

impl<T> Outbox<T> {
    pub fn new(
        tx: mpsc::Sender<Result<T, Status>>,
        slots: Vec<ReaderSlot>,
        audit: Arc<Audit>,
        call: &'static str,
    ) -> Self {
        assert!(!slots.is_empty(), "an answer holds a reader slot");
        Outbox {
            tx,
            slots,
            rt: tokio::runtime::Handle::current(),
            audit,
            call,
        }
    }

    /// Logs that this answer's request is refused for `reason` as it is read (a path found
    /// outside the data directory), and gives the status it ends with.
    pub fn refused(&self, reason: Refusal, s: Status) -> Status {
        self.audit
            .refused(&self.slots[0].peer, self.call, reason, s.message());
        s
    }

    /// Hands `item` to the transport, from a blocking thread.
    pub fn send(&self, item: Result<T, Status>) -> Sent {
        let stall_timeout = self.slots[0].readers.stall_timeout;
        let contended = || self.slots.iter().any(|s| s.readers.contended());
        let sent = self.rt.block_on(async {
            let since = Instant::now();
            loop {
                match tokio::time::timeout(STALL_CHECK, self.tx.reserve()).await {
                    Ok(Ok(permit)) => return Ok(permit),
                    Ok(Err(_)) => return Err(Sent::Gone),
                    Err(_) if since.elapsed() >= stall_timeout && contended() => {
                        return Err(Sent::Stalled);
                    }
                    Err(_) => {}
                }
            }
        });
        match sent {
            Ok(permit) => {
                permit.send(item);
                Sent::Delivered
            }
            Err(Sent::Stalled) => {
                self.audit.cut_off(
                    &self.slots[0].peer,
                    self.call,
                    Refusal::Stalled,
                    &format!(
                        "it read nothing for {} s while other requests waited for its slot",
                        stall_timeout.as_secs_f64()
                    ),
                );
                Sent::Stalled
            }
            Err(other) => other,
        }
    }
}

/// The replies an [`Outbox`] of batches (`Vec<T>`) handed on, one by one again, as the
/// transport sends them: it encodes every reply that is ready into one write.
pub struct Unbatched<T> {
    rx: ReceiverStream<Result<Vec<T>, Status>>,
    ready: std::vec::IntoIter<T>,
}

impl<T> Unbatched<T> {
    pub fn new(rx: ReceiverStream<Result<Vec<T>, Status>>) -> Self {
        Unbatched {
            rx,
            ready: Vec::new().into_iter(),
        }
    }
}

impl<T: Unpin> tokio_stream::Stream for Unbatched<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if let Some(reply) = self.ready.next() {
                return Poll::Ready(Some(Ok(reply)));
            }
            match std::pin::Pin::new(&mut self.rx).poll_next(cx) {
                Poll::Ready(Some(Ok(batch))) => self.ready = batch.into_iter(),
                Poll::Ready(Some(Err(s))) => return Poll::Ready(Some(Err(s))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> Peer {
        Peer::tcp(Some(([127, 0, 0, 1], port).into()))
    }

    #[tokio::test]
    async fn one_connection_holds_its_share_and_leaves_the_rest() {
        let r = Readers::new(4, 2, DEFAULT_STALL_TIMEOUT);
        let a1 = r.acquire(peer(1)).await.unwrap();
        let _a2 = r.acquire(peer(1)).await.unwrap();
        // A third for the same connection waits, while another connection gets its slots.
        let r2 = r.clone();
        let third = tokio::spawn(async move { r2.acquire(peer(1)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished());
        let _b1 = r.acquire(peer(2)).await.unwrap();
        let _b2 = r.acquire(peer(2)).await.unwrap();
        drop(a1);
        let _a3 = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("a freed slot goes to the waiting request")
            .unwrap()
            .unwrap();
        assert_eq!(r.held.lock().unwrap().get(&peer(1)), Some(&2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_stream_is_ended_only_when_others_wait() {
        let r = Readers::new(1, 1, Duration::from_millis(300));
        let audit = Arc::new(Audit::to(|_| {}));
        let slot = r.acquire(peer(1)).await.unwrap();
        let (tx, _rx) = mpsc::channel::<Result<u32, Status>>(1);
        let outbox = Outbox::new(tx, vec![slot], audit, "ReadRanges");
        // Nobody waits: the full channel is waited on past the stall timeout.
        let first = tokio::task::spawn_blocking(move || {
            assert_eq!(outbox.send(Ok(1)), Sent::Delivered);
            let started = Instant::now();
            let s = outbox.send(Ok(2));
            (s, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!first.is_finished(), "ended with nobody waiting");
        // Another connection asks: the stalled stream gives its slot up.
        let other = tokio::time::timeout(Duration::from_secs(5), r.acquire(peer(2)))
            .await
            .expect("the stalled stream's slot is freed")
            .unwrap();
        let (s, waited) = first.await.unwrap();
        assert_eq!(s, Sent::Stalled);
        assert!(waited >= Duration::from_millis(300));
        drop(other);
    }

    #[tokio::test]
    async fn batches_go_out_one_reply_at_a_time_and_an_error_after_them() {
        use tokio_stream::StreamExt;
        let (tx, rx) = mpsc::channel::<Result<Vec<u32>, Status>>(4);
        tx.send(Ok(vec![1, 2])).await.unwrap();
        tx.send(Ok(vec![])).await.unwrap();
        tx.send(Ok(vec![3])).await.unwrap();
        tx.send(Err(Status::permission_denied("no"))).await.unwrap();
        drop(tx);
        let got: Vec<Result<u32, Status>> = Unbatched::new(ReceiverStream::new(rx)).collect().await;
        let ok: Vec<u32> = got
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(ok, vec![1, 2, 3]);
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[3].as_ref().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
}
