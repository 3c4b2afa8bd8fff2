//! Waiting for acks: fsync, fsyncdir and syncfs send at once what their
//! inode (or everyone) has queued and wait for it, up to `fsync_timeout`.
//! A failure stays (sticky) until the inode's data is durable; data dropped
//! for lack of space is reported once, as ENOSPC.
//!
//! A close (FLUSH, RELEASE) does not wait: its inode's transactions go
//! on their own (within `meta_linger`), and it reports only the errors
//! already known. Under `sync_on_close` it waits as fsync does.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, warn};

use super::ack::{lock, wait_timeout};
use super::queue::{describe, TxnEntry, TxnState};
use super::{Shared, State, EAGER_SYNC_BYTES, EAGER_SYNC_MAX};
use crate::store::{Op, StoreError};

impl Shared {
    /// Wait until every transaction in `ids` is acknowledged, or `timeout`
    /// (there is no unbounded wait).
    /// Returns the ids still unacknowledged on timeout as an error, or
    /// `NoSpace` when one of them waits for space (at once if
    /// `fail_on_no_space`, else at the timeout).
    pub(super) fn wait_for(
        &self,
        ids: &[u64],
        timeout: Duration,
        fail_on_no_space: bool,
    ) -> Result<(), StoreError> {
        // Real time: a guest's fsync deadline is wall-clock time.
        let deadline = std::time::Instant::now() + timeout;
        let mut st = lock(&self.state);
        // `ids[..first]` are acknowledged. An acknowledged id never comes
        // back, and acks retire transactions mostly oldest first, so each
        // wake (every ack) skips what left the front and stops at the first
        // id still pending instead of looking at them all: a syncfs behind
        // thousands of transactions was quadratic in them.
        let mut first = 0;
        loop {
            while ids.get(first).is_some_and(|id| !st.txns.contains_key(id)) {
                first += 1;
            }
            if first == ids.len() {
                return Ok(());
            }
            let pending = || {
                ids[first..]
                    .iter()
                    .copied()
                    .filter(|id| st.txns.contains_key(id))
            };
            let waits_for_space =
                || pending().any(|id| st.txns.get(&id).is_some_and(|t| t.waits_for_space));
            if fail_on_no_space && waits_for_space() {
                return Err(StoreError::NoSpace);
            }
            if st.shutdown {
                return Err(StoreError::Io(std::io::Error::other(
                    "transaction layer shut down",
                )));
            }
            if let Some(why) = &st.superseded {
                return Err(StoreError::Io(std::io::Error::other(format!(
                    "not stored: {why}"
                ))));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() && waits_for_space() {
                return Err(StoreError::NoSpace);
            }
            if left.is_zero() {
                let described: Vec<String> = pending()
                    .filter_map(|id| st.txns.get(&id))
                    .map(describe)
                    .collect();
                return Err(StoreError::Io(std::io::Error::other(format!(
                    "{} transaction(s) not acknowledged within {timeout:?}: {}",
                    described.len(),
                    described.join("; ")
                ))));
            }
            st = wait_timeout(&self.changed, st, left);
        }
    }

    /// A close of `ino` (FLUSH, RELEASE): return without waiting for the
    /// acks of its transactions; the next fsync waits. They are on their
    /// way already: one that lingers (a write's own, or the create of a
    /// small file, which its first writes joined) goes `data_linger` or
    /// `meta_linger` after the last change that joined it (within a
    /// bound from its forming, `queue::META_LINGER_SPAN_MAX`), carrying the files
    /// created after it in the burst. An error already known is reported:
    /// a sticky fsync failure (the data is still not durable), data dropped
    /// for lack of space (reported once, as by fsync), data waiting for
    /// space. Under `sync_on_close` a close with data waiting (pages, a
    /// truncate or a punched hole) is an fsync.
    pub(super) fn close(&self, ino: u64) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        let ids: Vec<u64> = st
            .by_inode
            .get(&ino)
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default();
        let data_waiting = ids
            .iter()
            .any(|id| st.txns.get(id).is_some_and(|t| changes_data(t, ino)));
        if !data_waiting && !st.sticky.contains_key(&ino) && !st.no_space.contains(&ino) {
            return Ok(());
        }
        if self.cfg.sync_on_close {
            drop(st);
            return self.sync(Some(ino));
        }
        if let Some(why) = st.sticky.get(&ino).filter(|_| !ids.is_empty()) {
            self.metrics.fsync_errors.inc();
            return Err(StoreError::Io(std::io::Error::other(format!(
                "earlier fsync failed and the data is still not durable: {why}"
            ))));
        }
        if st.no_space.remove(&ino) || waits_for_space(&st, &ids) {
            warn!(ino, "close failed: the volume is full");
            return Err(StoreError::NoSpace);
        }
        // Nothing to send sooner: a transaction that lingers goes when its
        // `meta_linger` (counted from the newest change that joined it) is over, so the
        // next files of a burst in the same directory join it and the burst
        // is one commit instead of one per file. Nobody waits for it: a
        // close never did, and fsync, which does, sends it at once.
        Ok(())
    }

    /// The writeback contract: everything unacknowledged that touches `ino`
    /// (or everything), sent now and waited for.
    pub(super) fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.sync_within(ino, self.cfg.fsync_timeout)
    }

    /// Remember whether a sync of `ino` came after about one write (its
    /// newest transaction, among `ids`, a write's own that was never sent,
    /// holds at most [`EAGER_SYNC_BYTES`]) or after many. The first kind
    /// (a log's append + fsync) loses more to a linger than it gains: the
    /// commit would start only at the fsync instead of during the guest's
    /// round trip to it. So its next writes go at once; the second kind
    /// (writes between fsyncs) keeps lingering into one commit.
    fn note_sync_pattern(st: &mut State, ino: u64, ids: &[u64]) {
        let Some(t) = ids.iter().max().and_then(|id| st.txns.get(id)) else {
            return;
        };
        if !t.mergeable || t.state != TxnState::Queued || t.attempts != 0 {
            return;
        }
        if t.data_bytes <= EAGER_SYNC_BYTES {
            if st.eager_sync.len() >= EAGER_SYNC_MAX {
                st.eager_sync.clear();
            }
            st.eager_sync.insert(ino);
        } else {
            st.eager_sync.remove(&ino);
        }
    }

    /// As [`Shared::sync`], waiting at most `timeout`; on a timeout of a
    /// sync of everything, each transaction not stored is logged.
    pub(super) fn sync_within(
        &self,
        ino: Option<u64>,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let start = std::time::Instant::now();
        self.metrics.fsync_calls.inc();
        let ids: Vec<u64> = {
            let mut st = lock(&self.state);
            let ids: Vec<u64> = match ino {
                Some(i) => st
                    .by_inode
                    .get(&i)
                    .map(|q| q.iter().copied().collect())
                    .unwrap_or_default(),
                None => st.txns.keys().copied().collect(),
            };
            if let Some(i) = ino {
                if let Some(why) = st.sticky.get(&i) {
                    if !ids.is_empty() {
                        self.metrics.fsync_errors.inc();
                        return Err(StoreError::Io(std::io::Error::other(format!(
                            "earlier fsync failed and the data is still not durable: {why}"
                        ))));
                    }
                }
            }
            if let Some(i) = ino {
                Self::note_sync_pattern(&mut st, i, &ids);
            }
            // Resend at once whatever waits for a backoff.
            let now = Instant::now();
            for id in &ids {
                if let Some(t) = st.txns.get_mut(id) {
                    if t.state == TxnState::Queued && t.not_before.is_some_and(|nb| nb > now) {
                        t.not_before = None;
                    }
                }
            }
            // And whatever older still lingers: one of them may be ahead of
            // ours on a directory (a create queued behind a burst that a
            // write's transaction cut off), and ours goes only after it.
            if let Some(&newest) = ids.iter().max() {
                for t in st.txns.range_mut(..newest).map(|(_, t)| t) {
                    if t.state == TxnState::Queued && t.attempts == 0 {
                        t.not_before = None;
                    }
                }
            }
            ids
        };
        self.wake_sender();
        // A sync of one inode answers ENOSPC as soon as its data waits for
        // space; a sync of everything (syncfs, shutdown) still waits for
        // whatever else can be stored.
        let result = self.wait_for(&ids, timeout, ino.is_some());
        self.metrics.levels.fsync_latency.observe(start.elapsed());
        let mut st = lock(&self.state);
        match result {
            Ok(()) | Err(StoreError::NoSpace) => {
                // Data dropped for lack of space is reported once.
                let dropped = match ino {
                    Some(i) => st.no_space.remove(&i),
                    None => !std::mem::take(&mut st.no_space).is_empty(),
                };
                if dropped || result.is_err() {
                    warn!(ino, "fsync failed: the volume is full");
                    return Err(StoreError::NoSpace);
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.fsync_errors.inc();
                let why = crate::ErrorChain(&e).to_string();
                warn!(ino, error = %why, "fsync failed: data not acknowledged by the store in time");
                match ino {
                    Some(i) => {
                        st.sticky.insert(i, why);
                    }
                    None => {
                        for t in st.txns.values() {
                            error!(txn = %describe(t), "not stored");
                        }
                    }
                }
                Err(e)
            }
        }
    }
}

/// Whether `t` changes the data of `ino`: carries its pages, or truncates,
/// punches or writes it.
fn changes_data(t: &TxnEntry, ino: u64) -> bool {
    t.pages.contains_key(&ino)
        || t.ops.iter().any(|op| match op {
            Op::Truncate { ino: i, .. }
            | Op::PunchHole { ino: i, .. }
            | Op::Write { ino: i, .. } => *i == ino,
            _ => false,
        })
}

/// Whether one of `ids` waits for space (the store refused it and it had
/// no page data to drop).
fn waits_for_space(st: &State, ids: &[u64]) -> bool {
    ids.iter()
        .any(|id| st.txns.get(id).is_some_and(|t| t.waits_for_space))
}
