//! Closing a volume: the final checkpoint of the commit log, the engine's
//! own close and the holder record's release, each bounded (a full disk
//! must not hang a daemon's exit); the hand-over's variant for a live
//! migration, and the work a migration can do ahead of it.

use std::sync::atomic::Ordering;

use super::identity::map_engine_error;
use super::{durable_wait, open, reclaim, SlateStore};
use crate::store::StoreError;

/// How long a close waits, in all, for the groups acknowledged but still
/// on their way to the engine (`commit.rs`), the final checkpoint and the
/// engine's own close, in seconds ([`durable_wait`]): milliseconds
/// normally, but a daemon asked to stop must stop. What a close cut short
/// did not make durable is in the commit log, which the next open
/// replays.
const CLOSE_WAIT_SECS: u64 = 30;

impl SlateStore {
    /// Close the engine, flushing what it holds in memory. Later calls of
    /// any method fail.
    pub fn close(&self) -> Result<(), StoreError> {
        self.close_as(false)
    }

    /// Let the volume go for a live migration's hand-over, whose
    /// destination opens it at once while the guest is stopped: as
    /// [`close`](Self::close) up to the final checkpoint, but the dead
    /// segment pages still to punch (2-9 ms of the downtime after a fast
    /// writer) are handed to the destination's reclaimer (`reclaim.rs`),
    /// the engine's WAL is flushed, and the volume goes (commit log lock
    /// and holder record) *before* the engine's own close, which the drop
    /// does. Everything the engine holds is durable by then, in its WAL
    /// (the destination replays what no table has) or in the commit log;
    /// that close writes nothing (its memtable is not flushed) and only
    /// stops the engine's tasks (2-8 ms, seconds while a compaction runs),
    /// at the lowest priority. Later calls of any method fail.
    pub fn hand_over(&self) -> Result<(), StoreError> {
        self.close_as(true)
    }

    fn close_as(&self, hand_over: bool) -> Result<(), StoreError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let rt = self.rt()?;
        let mut phases = open::Phases::start();
        let bound = durable_wait(CLOSE_WAIT_SECS);
        let deadline = tokio::time::Instant::now() + bound;
        let cut = |what: &str| {
            tracing::error!(volume = %self.describe, "{what} did not finish within {bound:?} (a full disk?); the next open replays the commit log");
        };
        // Whether every step finished: a close cut short leaves the
        // engine's tasks running until the runtime goes, so the holder
        // record stays, for its lease, rather than invite another opener.
        let mut whole = true;
        // What the final checkpoint let the reclaimer have.
        let mut freed = reclaim::Reclaim::default();
        if let Some(cp) = &self.checkpoint {
            // The groups acknowledged but still on their way to the engine
            // go first: the checkpoint moves the tail past what it has.
            match rt
                .block_on(async { tokio::time::timeout_at(deadline, self.await_applied()).await })
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if !matches!(e, StoreError::Fenced) {
                        tracing::warn!(volume = %self.describe, error = %e, "a commit log group did not reach the engine; the next open replays it");
                    }
                }
                Err(_) => {
                    whole = false;
                    cut("the commit log groups' way to the engine");
                }
            }
            phases.mark("applied");
            cp.stop();
            // The next open then replays nothing.
            match rt.block_on(async { tokio::time::timeout_at(deadline, cp.run_keeping()).await }) {
                Ok(Ok(r)) => freed = r,
                Ok(Err(StoreError::Fenced)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(volume = %self.describe, error = %e, "final commit log checkpoint failed");
                }
                Err(_) => {
                    whole = false;
                    cut("the final commit log checkpoint");
                }
            }
        }
        phases.mark("checkpoint");
        if let Some(r) = &self.reclaimer {
            if hand_over {
                r.hand_over(freed);
            } else {
                r.send(freed);
                r.stop();
            }
        }
        if let Some(gc) = &self.object_gc {
            gc.stop();
        }
        phases.mark("reclaim");
        if hand_over && whole && !self.fenced.load(Ordering::Acquire) {
            // Whatever the engine holds unflushed in its WAL's buffer (a
            // write nothing awaited) is durable before the volume goes:
            // the destination's open fences the buffer's later flush. An
            // empty buffer writes nothing.
            match rt.block_on(async { tokio::time::timeout_at(deadline, self.db.flush()).await }) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let e = map_engine_error(e);
                    if !matches!(e, StoreError::Fenced) {
                        tracing::warn!(volume = %self.describe, error = %e, "the engine's WAL flush at the hand-over failed; the engine's close flushes it");
                        whole = false;
                    }
                }
                Err(_) => {
                    whole = false;
                    cut("the engine's WAL flush");
                }
            }
            phases.mark("wal");
        }
        if hand_over && whole {
            if !self.fenced.load(Ordering::Acquire) {
                if let Some(cp) = &self.checkpoint {
                    // Appends nothing more; the destination's open takes
                    // the lock without asking for it.
                    cp.log.yield_to_successor();
                }
                if let Some(lease) = &self.lease {
                    rt.block_on(lease.release());
                }
            }
            self.handed.store(true, Ordering::Release);
            phases.mark("released");
            tracing::info!(volume = %self.describe, ms = %phases, "handed over volume; the engine closes behind");
            return Ok(());
        }
        self.close_engine(deadline, phases, whole)
    }

    /// The engine's own close (its memtable into a table, except behind a
    /// hand-over; its tasks and compactor stopped), then the holder
    /// record's release if the close was `whole`, nobody fenced this
    /// instance and no hand-over released it already.
    fn close_engine(
        &self,
        deadline: tokio::time::Instant,
        mut phases: open::Phases,
        whole: bool,
    ) -> Result<(), StoreError> {
        let rt = self.rt()?;
        let handed = self.handed.load(Ordering::Acquire);
        if handed {
            // Behind a hand-over: the destination's open on this host,
            // which the guest waits for, goes first.
            self.threads.lower_all();
        }
        // Behind a hand-over the memtable stays in the WAL, durable since
        // the hand-over flushed it, for the destination to replay: flushed
        // now, into a table, it would race the destination's open, which
        // fenced it in two runs of eight (and SlateDB logs that as errors).
        let options = slatedb::config::CloseOptions {
            flush_type: (!handed).then_some(slatedb::config::FlushType::MemTable),
        };
        let bound = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut whole = whole;
        let (db, compactor) = (self.db.clone(), self.compactor.get().cloned());
        let describe = self.describe.clone();
        // On the runtime's threads, whose priority a hand-over lowered,
        // not on the caller's.
        let closing = rt.spawn(async move {
            let compactor = async {
                if let Some(c) = compactor {
                    if let Err(e) = c.stop().await {
                        tracing::debug!(volume = %describe, error = %e, "stopping the compactor");
                    }
                }
            };
            tokio::join!(compactor, db.close_with_options(options)).1
        });
        let closed = match rt.block_on(async { tokio::time::timeout_at(deadline, closing).await }) {
            Ok(Ok(r)) => r.map_err(map_engine_error),
            Ok(Err(e)) => Err(StoreError::Io(std::io::Error::other(format!(
                "the engine's close failed: {e}"
            )))),
            Err(_) => {
                whole = false;
                tracing::error!(volume = %self.describe, "the engine's close did not finish within {bound:?} (a full disk?); the next open replays the commit log");
                Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the engine did not close within {bound:?}"),
                )))
            }
        };
        phases.mark("engine");
        if self.handed.load(Ordering::Acquire) {
            tracing::info!(volume = %self.describe, ms = %phases, "closed the engine of a volume handed over");
            return closed;
        }
        if let Some(lease) = &self.lease {
            if whole && !self.fenced.load(Ordering::Acquire) {
                rt.block_on(lease.release());
            }
        }
        phases.mark("released");
        tracing::info!(volume = %self.describe, ms = %phases, "closed volume");
        closed
    }

    /// A live migration began (the frontend turned dirty logging on): get
    /// ahead of [`close`](Self::close), which the hand-over waits for
    /// with the guest stopped. In the background, checkpoint the commit
    /// log and flush the engine's memtable into a table (a memtable of a
    /// few hundred files' metadata took the close 48 ms, of which the
    /// flush was most), so that the close at the stop flushes only what
    /// was written after this. Failures are logged: the close does it all
    /// again.
    pub fn prepare_close(&self) {
        let Ok(rt) = self.rt() else { return };
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let (db, checkpoint) = (self.db.clone(), self.checkpoint.clone());
        let describe = self.describe.clone();
        rt.spawn(async move {
            let started = std::time::Instant::now();
            if let Some(cp) = checkpoint {
                if let Err(e) = cp.run().await {
                    tracing::warn!(volume = %describe, error = %e, "checkpoint ahead of a hand-over failed");
                    return;
                }
            }
            let flushed = db
                .flush_with_options(slatedb::config::FlushOptions {
                    flush_type: slatedb::config::FlushType::MemTable,
                })
                .await;
            match flushed {
                Ok(()) => tracing::info!(volume = %describe, ms = started.elapsed().as_millis() as u64, "flushed ahead of a hand-over"),
                Err(e) => tracing::warn!(volume = %describe, error = %e, "memtable flush ahead of a hand-over failed"),
            }
        });
    }
}

impl Drop for SlateStore {
    fn drop(&mut self) {
        // Inside another runtime's worker this thread may not block on our
        // runtime nor wait for it to stop: close from a thread of our own,
        // then let the runtime's threads wind down in the background.
        let in_async = tokio::runtime::Handle::try_current().is_ok();
        // A volume handed over still has its engine open (`hand_over`).
        let close = || {
            if self.handed.load(Ordering::Acquire) {
                let deadline = tokio::time::Instant::now() + durable_wait(CLOSE_WAIT_SECS);
                self.close_engine(deadline, open::Phases::start(), true)
            } else {
                self.close()
            }
        };
        let closed = if in_async {
            std::thread::scope(|scope| scope.spawn(close).join())
                .unwrap_or_else(|_| Err(StoreError::Io(std::io::Error::other("close panicked"))))
        } else {
            close()
        };
        if let Err(e) = closed {
            if !matches!(e, StoreError::Fenced) {
                tracing::warn!(volume = %self.describe, error = %e, "closing volume failed");
            }
        }
        if in_async {
            if let Some(runtime) = self.runtime.take() {
                runtime.shutdown_background();
            }
        }
    }
}
