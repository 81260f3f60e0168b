//! Backup windows: a running source copied as a base backup is.
//!
//! A running server's files change while they are copied. PostgreSQL makes such a copy usable
//! with a *backup*: `pg_backup_start` forces full-page writes and takes a checkpoint, whose redo
//! position is where WAL replay of the copy must start; `pg_backup_stop` says where that WAL must
//! reach and gives the `backup_label` the copy carries. Every block changed after the start is
//! rewritten whole by replay (its first change logged a full-page image), so a block copied
//! while it changed is repaired. The backup's `tablespace_map` is not passed on: it names this
//! server's tablespace directories, and a rewound target keeps its own. A non-exclusive backup
//! belongs to the session that started it and is abandoned when that session ends.
//!
//! failbackd holds that session for a client: a window opens with the client's `BackupWindow`
//! call and lives as long as the call; `EndBackupWindow` stops the backup, and the call's end
//! (the client done, or gone) ends the session. The WAL from the window's start is reserved for
//! as long, by a temporary physical replication slot of the same session, so the WAL written
//! during the window can still be fetched after it closes.

use std::collections::HashMap;
use std::sync::Mutex;

use failback_proto::v1::{BackupWindowReply, EndBackupWindowResponse};
use failback_sql::{LiveError, conninfo};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// Where a window's close is answered.
type Closing = oneshot::Sender<Result<EndBackupWindowResponse, Status>>;

/// The open windows, by id.
#[derive(Default)]
pub struct Windows {
    open: Mutex<HashMap<u64, oneshot::Sender<Closing>>>,
}

/// A window's id: random, so that one client cannot close another's.
fn window_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills the buffer we own, of the length we pass.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // The kernel's generator cannot fail for 8 bytes once booted; keep ids distinct anyway.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(b)
}

fn unavailable(e: LiveError) -> Status {
    Status::unavailable(e.to_string())
}

impl Windows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Closing>>> {
        crate::lock(&self.open)
    }

    /// Opens a window on the server `pg_conn` reaches and holds it, on a blocking thread, until
    /// the call whose replies go to `tx` ends: says where it starts on `tx`, waits to be closed
    /// ([`Windows::close`]) or for the call to end, and keeps the session (and its WAL
    /// reservation) until the call ends.
    pub fn hold(
        &self,
        rt: &tokio::runtime::Handle,
        pg_conn: &str,
        label: &str,
        tx: mpsc::Sender<Result<BackupWindowReply, Status>>,
    ) {
        let id = window_id();
        let opened = (|| {
            let mut client = conninfo::connect(pg_conn, "failbackd")
                .map_err(|e| LiveError::Connect(format!("--pg-conn: {e}")))?;
            let major = failback_sql::server_major(&client);
            let timeline = failback_sql::end_of_wal(&mut client)?.timeline;
            failback_sql::reserve_wal(&mut client, &format!("failback_{id:016x}"))?;
            let start = failback_sql::backup_start(&mut client, major, label)?;
            Ok::<_, LiveError>((client, major, start, timeline))
        })();
        let (mut client, major, start, timeline) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = tx.blocking_send(Err(unavailable(e)));
                return;
            }
        };
        let (close_tx, close_rx) = oneshot::channel::<Closing>();
        self.lock().insert(id, close_tx);
        let reply = BackupWindowReply {
            window_id: id,
            start_lsn: start.0,
            timeline,
        };
        let closing = if tx.blocking_send(Ok(reply)).is_ok() {
            rt.block_on(async {
                tokio::select! {
                    c = close_rx => c.ok(),
                    () = tx.closed() => None,
                }
            })
        } else {
            None
        };
        self.lock().remove(&id);
        // Gone before closing it: ending the session abandons the backup.
        let Some(answer) = closing else { return };
        let stopped = failback_sql::backup_stop(&mut client, major)
            .map(|s| EndBackupWindowResponse {
                stop_lsn: s.lsn.0,
                timeline,
                backup_label: s.backup_label,
            })
            .map_err(unavailable);
        let _ = answer.send(stopped);
        // The WAL written during the window stays reserved while the client fetches it.
        rt.block_on(tx.closed());
    }

    /// Closes window `id`: stops its backup and says what the copy made inside it needs.
    pub async fn close(&self, id: u64) -> Result<EndBackupWindowResponse, Status> {
        let gone = || {
            Status::not_found(format!(
                "no open backup window {id:016x}: it was never opened, was closed already, or \
                 ended with the call that opened it"
            ))
        };
        let close = self.lock().remove(&id).ok_or_else(gone)?;
        let (answer, answered) = oneshot::channel();
        close.send(answer).map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}
