//! The writer claim as a client makes it (`docs/protocol.md`, "Writer
//! claim"): the claim itself, the keepalive that keeps a claimed client
//! heard within the server's writer lease, and the close that lets the
//! server see the writer leave before the store is dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::Attempt;
use super::{unexpected, Inner, RemoteStore};
use crate::net::proto::msg::{ErrorCode, Request, Response};
use crate::ratelimit::{limited, Capped, PEER_LINES_SUPPRESSED};
use crate::store::StoreError;

/// How often a claim the server refused for its last writer's lease
/// (`ErrorCode::WriterAway`) is asked again.
const AWAY_POLL: Duration = Duration::from_millis(100);

/// How long a claim refused for a live writer (`ErrorCode::WriterAlive`)
/// is asked again before the refusal stands: a writer that is leaving has
/// closed its connection, but the server may not have read the close yet
/// (a proxy or relay between them answers the leaving client's close
/// before the server has seen it). A writer still alive after this is one.
const LEAVING_GRACE: Duration = Duration::from_secs(1);

/// Why a claim failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The session holding the claim is alive (`ErrorCode::WriterAlive`);
    /// the server's message names it.
    #[error("{0}")]
    WriterAlive(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RemoteStore {
    /// Make this client's session the volume's one writer
    /// (`Request::Claim`): from now on the server refuses every write of
    /// any other session, and of this one once another claims the volume.
    /// What a daemon does when it opens the volume for writing; the claim's
    /// number. Refused while another session holds the claim and is alive,
    /// unless `take_over` (`docs/protocol.md`, "Writer claim"). Once
    /// granted, this client keeps itself heard: a frame at least every
    /// `keepalive_ms`, on a task of its runtime, until it is dropped.
    pub fn claim(&self, take_over: bool) -> Result<u64, ClaimError> {
        let req = if take_over {
            Request::TakeOver
        } else {
            Request::Claim
        };
        // A server that just opened the volume keeps it a lease for the
        // writer it recorded: ask again until that lease ends (the server
        // says so), bounded by the client's `give_up_ms`.
        let started = Instant::now();
        let deadline = started + self.inner.cfg.give_up_after;
        let leaving = started + LEAVING_GRACE.min(self.inner.cfg.give_up_after);
        let mut told = false;
        let claim = loop {
            match self.call(req.clone())? {
                Response::Claimed { claim } => break claim,
                Response::Error {
                    code: ErrorCode::WriterAlive,
                    ..
                } if Instant::now() < leaving => std::thread::sleep(AWAY_POLL),
                Response::Error {
                    code: ErrorCode::WriterAlive,
                    message,
                } => return Err(ClaimError::WriterAlive(message)),
                Response::Error {
                    code: ErrorCode::WriterAway,
                    message,
                } if Instant::now() < deadline => {
                    if !told {
                        tracing::info!(reason = %Capped(&message), "the store server keeps the volume a while for its last writer; waiting");
                        told = true;
                    }
                    std::thread::sleep(AWAY_POLL);
                }
                Response::Error {
                    code: ErrorCode::WriterAway,
                    message,
                } => return Err(ClaimError::WriterAlive(message)),
                r => return Err(unexpected(r).into()),
            }
        };
        if !self.inner.keeping_alive.swap(true, Ordering::AcqRel) {
            let inner = Arc::downgrade(&self.inner);
            let every = self.inner.cfg.keepalive;
            let task = self.rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(inner) = inner.upgrade() else { break };
                    if inner.superseded.load(Ordering::Acquire) {
                        break;
                    }
                    inner.keepalive().await;
                }
            });
            *self
                .inner
                .keepalive_task
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        Ok(claim)
    }
}

impl RemoteStore {
    /// Close the connection and wait (at most the request timeout) until
    /// the server closed it too: a daemon that lets the volume go (a
    /// migration source) is then no longer its live writer, and makes no
    /// new connection (a request after this fails). Once; dropping the
    /// store closes it too.
    pub fn close(&self) {
        // `call` blocks on the runtime too: never inside another runtime.
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        if self.inner.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let bound = self.inner.cfg.request_timeout;
        let keepalive = inner
            .keepalive_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.rt.block_on(async move {
            // No keepalive reconnects behind the close.
            if let Some(task) = keepalive {
                task.abort();
                let _ = task.await;
            }
            // A writer whose connection broke (a server restarted since)
            // is heard once more before it leaves: otherwise the server
            // keeps the volume for it for a lease after its restart.
            let live = inner
                .conn
                .lock()
                .await
                .as_ref()
                .is_some_and(|c| c.alive.load(Ordering::Acquire));
            if !live
                && inner.keeping_alive.load(Ordering::Acquire)
                && !inner.superseded.load(Ordering::Acquire)
            {
                let _ = tokio::time::timeout(bound, inner.keepalive()).await;
            }
            // Marked under the connection's lock: no request reconnects
            // once the connection is taken.
            let taken = {
                let mut conn = inner.conn.lock().await;
                inner.closed.store(true, Ordering::Release);
                conn.take()
            };
            if let Some(conn) = taken {
                conn.close(bound).await;
            }
        });
    }
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    /// One cheap request, to be heard by the server's writer lease (and to
    /// reconnect to a restarted server); bounded by the request timeout.
    async fn keepalive(&self) {
        let req = Request::GetInode {
            ino: crate::store::ROOT_INO,
        };
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(why) => {
                limited!(PEER_LINES_SUPPRESSED, WARN, reason = %Capped(&why), "keepalive: store unreachable");
                return;
            }
        };
        if let Err(Attempt::Retry(why)) = conn.request(&req, self.cfg.request_timeout).await {
            conn.alive.store(false, Ordering::Release);
            limited!(PEER_LINES_SUPPRESSED, WARN, reason = %Capped(&why), "keepalive failed");
        }
    }
}
