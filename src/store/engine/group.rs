//! Group commit: many committers waiting for durability share one WAL flush.
//!
//! Commits are written to the engine's in-memory WAL one after another (the
//! caller serializes them) and only then wait for durability, outside any
//! lock, so the waits of concurrent commits overlap. In
//! [`CommitMode::Flush`] the first waiter becomes the leader and calls
//! `Db::flush`, which makes every write appended so far durable; the others
//! wait for the leader and find themselves covered, or lead the next flush.
//! In [`CommitMode::Interval`] each waiter awaits its own write handle and the
//! engine's `flush_interval` timer does the flushing. [`CommitMode::Adaptive`]
//! flushes explicitly when a commit is the only one in flight (nothing to
//! group with, so waiting for the timer is pure latency) and leaves grouping
//! to the timer otherwise.
//!
//! This module owns the durable watermark. It must never report a sequence
//! number durable before a flush that covers it has returned.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use slatedb::{Db, WriteHandle};

/// How commits wait for durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitMode {
    /// Explicit `Db::flush` calls, one leader at a time, shared by all
    /// writes appended before it starts.
    Flush,
    /// `WriteHandle::await_durable`, with the engine flushing its WAL every
    /// `flush_interval`.
    Interval,
    /// `Flush` for a commit that is alone in flight, `Interval` otherwise.
    Adaptive,
}

impl CommitMode {
    pub fn name(self) -> &'static str {
        match self {
            CommitMode::Flush => "flush",
            CommitMode::Interval => "interval",
            CommitMode::Adaptive => "adaptive",
        }
    }
}

/// The durable watermark of one engine instance.
pub struct GroupCommit {
    mode: CommitMode,
    /// The highest sequence number whose write has returned. Writes return
    /// in sequence order (the engine has one writer task), so every write
    /// at or below it is in the WAL.
    written: AtomicU64,
    /// Every write at or below this is durable.
    durable: AtomicU64,
    /// Held by the one committer running a flush.
    leader: tokio::sync::Mutex<()>,
    /// How many WAL flushes this instance asked for, for tests and logs.
    flushes: AtomicU64,
    /// Commits between [`GroupCommit::begin`] and the end of their wait.
    in_flight: AtomicUsize,
}

/// A commit in flight; see [`GroupCommit::begin`].
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl GroupCommit {
    pub fn new(mode: CommitMode) -> GroupCommit {
        GroupCommit {
            mode,
            written: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            leader: tokio::sync::Mutex::new(()),
            flushes: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Count a commit as in flight until the guard drops (after its wait).
    /// Taken before the commit queues for the commit lock, so commits
    /// waiting for it count too.
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.in_flight)
    }

    /// Record that the write `handle` names has returned.
    pub fn written(&self, handle: &WriteHandle) {
        self.written.fetch_max(handle.seqnum(), Ordering::AcqRel);
    }

    /// Wait until the write `handle` names is durable.
    pub async fn wait(&self, db: &Db, handle: &WriteHandle) -> Result<(), slatedb::Error> {
        match self.mode {
            CommitMode::Interval => {
                handle.await_durable().await?;
                self.durable.fetch_max(handle.seqnum(), Ordering::AcqRel);
                Ok(())
            }
            CommitMode::Flush => self.wait_seq(db, handle.seqnum()).await,
            CommitMode::Adaptive => {
                if self.in_flight.load(Ordering::Acquire) <= 1 {
                    self.wait_seq(db, handle.seqnum()).await
                } else {
                    handle.await_durable().await?;
                    self.durable.fetch_max(handle.seqnum(), Ordering::AcqRel);
                    Ok(())
                }
            }
        }
    }

    /// Wait until every write that has returned so far is durable.
    pub async fn wait_all(&self, db: &Db) -> Result<(), slatedb::Error> {
        let seq = self.written.load(Ordering::Acquire);
        self.wait_seq(db, seq).await
    }

    async fn wait_seq(&self, db: &Db, seq: u64) -> Result<(), slatedb::Error> {
        if self.durable.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let _leader = self.leader.lock().await;
        if self.durable.load(Ordering::Acquire) >= seq {
            // The flush we waited behind covered us.
            return Ok(());
        }
        // Read the target before flushing: the flush freezes the WAL after
        // this point, so it holds every write that returned before it.
        let target = self.written.load(Ordering::Acquire).max(seq);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        db.flush().await?;
        self.durable.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// How many flushes this instance has asked the engine for.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}
