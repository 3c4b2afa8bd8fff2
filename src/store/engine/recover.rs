//! Replaying the commit log at open, and checkpoints that let it go.
//!
//! A commit on a `file://` volume is durable once its record is in the
//! commit log (`log.rs`); its batch reaches the engine's memtable after
//! that, and the engine's own WAL becomes durable later, on its timer. The
//! bytes of small writes reach their segment files unsynced. So after a
//! crash, the engine may lack batches the log has, and segments may lack
//! bytes the log has.
//!
//! **Replay** (at open, before anything else writes): every record from the
//! tail has its small writes rewritten to their segment places (the pages
//! are still allocated: reclaim waits for the tail, below) and the segments
//! synced; then the batches of the records with an lsn above the engine's
//! `log` key (the last batch the engine has made durable, written in each
//! batch) are written in order, and the engine flushed. Rewriting bytes and
//! writing puts and deletes are idempotent, so a crash during replay
//! replays the same again.
//!
//! **Checkpoint** (a background task, at close, and when the ring is half
//! full): note the last record whose batch the engine has, sync the
//! segments, flush the engine, then move the log's tail past that record.
//! Segment space freed by a commit is handed to the reclaimer only after
//! the tail has passed the commit: a page punched while a record naming it
//! can still be replayed would be written again by replay.
//!
//! The background task also hands back, every few seconds, the pages of
//! segments that a deleted snapshot or clone no longer shares
//! (`shared.rs`).
//!
//! This module owns that order. It never builds batches (`commit.rs`) and
//! never reads the log file itself (`log.rs`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use slatedb::{Db, WriteBatch};

use super::log::{CommitLog, LogError, Record};
use super::reclaim::{Reclaim, Reclaimer};
use super::segment::Segments;
use super::{keys, map_engine_error};
use crate::store::StoreError;

/// How often the background task checkpoints when the URL names nothing.
/// Each checkpoint syncs the segments, flushes the engine's WAL (a new
/// file and its `fsync`) and rewrites the log's header: on a trickle of
/// commits (a guest creating a file every 10 ms) checkpoints every 100 ms
/// were half the daemon's CPU (`bench/host-cpu.sh`, docs/benchmarks.md),
/// while the ring (16 MiB, checkpointed when half full) holds far more
/// than a second of commits.
pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;

/// How often the background task looks for another process asking for
/// the log, and for segment pages to hand back.
const TICK_MS: u64 = 100;

/// A log error as the store reports it.
pub fn map_log_error(e: LogError) -> StoreError {
    match e {
        LogError::Fenced => StoreError::Fenced,
        LogError::Io(e) => StoreError::Io(e),
        other => StoreError::Io(std::io::Error::other(other)),
    }
}

/// The value of the engine's `log` key: the lsn of the last logged batch.
pub fn encode_lsn(lsn: u64) -> Vec<u8> {
    lsn.to_be_bytes().to_vec()
}

pub fn decode_lsn(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("log key of {} bytes", v.len())))?;
    Ok(u64::from_be_bytes(b))
}

/// The lsn of the last commit-log record whose batch the engine holds (0
/// for none).
pub async fn applied_lsn(db: &Db) -> Result<u64, StoreError> {
    match db.get(keys::log()).await.map_err(map_engine_error)? {
        Some(v) => decode_lsn(&v),
        None => Ok(0),
    }
}

/// Replay `records` (read from the log's tail) into the segments and the
/// engine, whose batches up to lsn `applied` ([`applied_lsn`]) it holds
/// already; how many batches the engine lacked.
pub async fn replay(
    db: &Db,
    segs: Option<&Segments>,
    records: &[Record],
    applied: u64,
) -> Result<usize, StoreError> {
    let mut touched = BTreeSet::new();
    for r in records {
        for w in &r.writes {
            let segs = segs.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "log record {} writes to segment {} of a volume without segments",
                    r.lsn, w.seg
                ))
            })?;
            segs.rewrite(w.seg, w.off, &w.bytes)
                .map_err(StoreError::Io)?;
            touched.insert(w.seg);
        }
    }
    if let Some(segs) = segs {
        for seg in touched {
            segs.sync_segment(seg).map_err(StoreError::Io)?;
        }
    }
    let mut written = 0;
    for r in records.iter().filter(|r| r.lsn > applied) {
        let mut batch = WriteBatch::new();
        for (k, v) in &r.puts {
            match v {
                Some(v) => batch.put_bytes(k.clone(), v.clone()),
                None => batch.delete(k),
            }
        }
        db.write(batch).await.map_err(map_engine_error)?;
        written += 1;
    }
    // Always, even with nothing replayed: the open's superblock write
    // (its open count) is made durable here too (`open.rs`).
    db.flush().await.map_err(map_engine_error)?;
    Ok(written)
}

/// Moves the log's tail, and holds freed segment space until it has.
pub struct Checkpoint {
    db: Db,
    segments: Option<Arc<Segments>>,
    pub log: Arc<CommitLog>,
    reclaimer: Option<Arc<Reclaimer>>,
    /// One checkpoint at a time.
    pub(super) running: tokio::sync::Mutex<()>,
    /// What commits freed, with the last lsn a record naming it may have.
    held: Mutex<Vec<(u64, Reclaim)>>,
    stop: tokio::sync::Notify,
    /// How many checkpoints moved the tail, for tests and logs.
    count: std::sync::atomic::AtomicU64,
}

impl Checkpoint {
    pub fn new(
        db: Db,
        segments: Option<Arc<Segments>>,
        log: Arc<CommitLog>,
        reclaimer: Option<Arc<Reclaimer>>,
    ) -> Checkpoint {
        Checkpoint {
            db,
            segments,
            log,
            reclaimer,
            running: tokio::sync::Mutex::new(()),
            held: Mutex::new(Vec::new()),
            stop: tokio::sync::Notify::new(),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Hold what a commit freed until the tail passes `lsn` (the last
    /// record that may name it).
    pub fn hold(&self, lsn: u64, r: Reclaim) {
        if r.is_empty() {
            return;
        }
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((lsn, r));
    }

    /// Move the tail past every record whose batch the engine has, then
    /// hand the space those records freed to the reclaimer.
    pub async fn run(&self) -> Result<(), StoreError> {
        let freed = self.run_keeping().await?;
        if let Some(r) = &self.reclaimer {
            r.send(freed);
        }
        Ok(())
    }

    /// [`run`](Self::run), but return what the records freed instead of
    /// handing it to the reclaimer (a live migration's hand-over passes
    /// it on to the next open: `reclaim.rs`).
    pub async fn run_keeping(&self) -> Result<Reclaim, StoreError> {
        let _one = self.running.lock().await;
        let to = self.log.applied();
        if to != self.log.tail() {
            if let Some(segs) = &self.segments {
                segs.sync_all().map_err(StoreError::Io)?;
            }
            // Every batch written before the call is durable after it.
            self.db.flush().await.map_err(map_engine_error)?;
            self.log.advance_tail(to).map_err(map_log_error)?;
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let passed = self.log.tail().lsn;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut *held)
            .into_iter()
            .partition(|(lsn, _)| *lsn < passed);
        *held = later;
        let mut freed = Reclaim::default();
        for (_, r) in now {
            freed.absorb(r);
        }
        Ok(freed)
    }

    /// Until [`Checkpoint::stop`]: checkpoint every `every_ms` (never for
    /// 0), and give the log up when another process asks for it.
    pub async fn background(self: Arc<Self>, every_ms: u64, describe: String) {
        let tick = if every_ms == 0 {
            TICK_MS
        } else {
            every_ms.min(TICK_MS)
        };
        let mut since_ms = 0;
        let mut since_unshared_ms = 0;
        loop {
            tokio::select! {
                () = self.stop.notified() => return,
                () = tokio::time::sleep(std::time::Duration::from_millis(tick)) => {}
            }
            if self.log.yield_if_asked() {
                tracing::error!(volume = %describe, "another writer opened the volume; this instance is fenced");
                return;
            }
            since_ms += tick;
            since_unshared_ms += tick;
            if since_unshared_ms >= super::shared::UNSHARED_PASS_MS {
                since_unshared_ms = 0;
                self.reclaim_unshared(&describe).await;
            }
            if every_ms == 0 || since_ms < every_ms {
                continue;
            }
            since_ms = 0;
            match self.run().await {
                Ok(()) => {}
                Err(StoreError::Fenced) => {
                    self.log.yield_to_successor();
                    tracing::error!(volume = %describe, "another writer opened the volume; this instance is fenced");
                    return;
                }
                Err(e) => {
                    tracing::warn!(volume = %describe, error = %e, "commit log checkpoint failed");
                }
            }
        }
    }

    /// Hand the deferred pages of segments a deleted snapshot or clone
    /// no longer shares to the reclaimer (`shared.rs`).
    async fn reclaim_unshared(&self, describe: &str) {
        if let (Some(segs), Some(r)) = (&self.segments, &self.reclaimer) {
            if let Err(e) = super::shared::reclaim_unshared(&self.db, segs, r).await {
                tracing::warn!(volume = %describe, error = %e, "reclaiming segments no snapshot shares any more failed");
            }
        }
    }

    /// End the background task.
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    /// How many checkpoints moved the tail.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}
