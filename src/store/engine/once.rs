//! Exactly-once without an engine read per commit: which transactions of
//! each session this engine instance applied, in memory.
//!
//! A commit named `(session, txn_id)` first asks whether it was applied
//! before, that is whether its applied record (`0x50 session txn_id`) is
//! queued for the commit log or in the engine: a point read of a key that,
//! for a new transaction, no one wrote (a tenth of the commit thread's
//! samples over 4 KiB appends with an fsync each). For a session whose
//! records all come from this instance, memory knows the answer. The first
//! commit of a session here looks for any record of it (one short scan,
//! under the commit lock); if there is none the session is *fresh*: from
//! then on every record it gets is built here, under the commit lock, and
//! noted in its set ([`Applied::built`]), so "was it applied?" is a set
//! lookup. A prune of a fresh session takes the ids below its mark out of
//! the set and hands their records' keys to the next batch built, which
//! deletes them ([`Applied::take_pruned`]): no scan, no engine write of its
//! own, no wait for durability (a delete lost in a crash leaves a record
//! of a transaction no one resends, as a crash before a prune does).
//!
//! Sessions with records from before this instance (a store server's
//! client after the server restarted) are asked of the engine, as are all
//! sessions once memory's bounds are reached, and a session whose batch
//! may or may not have reached the engine (its write failed): memory no
//! longer knows, the engine does.
//!
//! **Bounds.** At most [`SESSIONS_MAX`] sessions are known (later ones
//! are asked of the engine), and the sets and the deletes waiting for a
//! batch hold at most [`IDS_MAX`] ids together (a session that would pass
//! it is asked of the engine from then on, its set dropped).
//!
//! The engine's side is here too: the resend check a commit makes under
//! the commit lock (`SlateStore::applied_before`) and the prune
//! (`SlateStore::prune_inner`), in memory or in the engine.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use slatedb::WriteBatch;

use super::apply::TxnView;
use super::{keys, SlateStore};
use crate::store::StoreError;

/// The most sessions known at once: one per daemon that ever wrote
/// through this instance.
pub const SESSIONS_MAX: usize = 4096;

/// The most ids in all sets and pending deletes together (about 48 bytes
/// each): a daemon prunes below its oldest unacknowledged transaction
/// every 256 commits, so its set holds about that many.
pub const IDS_MAX: usize = 1 << 16;

/// What memory says about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Its record exists: a resend.
    Applied,
    /// No record: a new transaction.
    New,
    /// Memory does not know: read the engine.
    Ask,
    /// The session was never seen here: look for any record of it, and
    /// say what was found with [`Applied::seen`].
    Unseen,
}

enum Known {
    /// Every record of the session was built here: these are the ones not
    /// pruned.
    Fresh(BTreeSet<u64>),
    /// The engine knows.
    Engine,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<u64, Known>,
    /// Ids in the fresh sets and in `pruned`.
    ids: usize,
    /// Applied records pruned and not yet deleted: the next batch built
    /// deletes them.
    pruned: Vec<Vec<u8>>,
}

/// See the module documentation.
#[derive(Default)]
pub struct Applied {
    inner: Mutex<Inner>,
}

impl Applied {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `txn_id` of `session` was applied, as far as memory knows.
    pub fn check(&self, session: u64, txn_id: u64) -> Answer {
        let inner = self.lock();
        match inner.sessions.get(&session) {
            Some(Known::Fresh(ids)) if ids.contains(&txn_id) => Answer::Applied,
            Some(Known::Fresh(_)) => Answer::New,
            Some(Known::Engine) => Answer::Ask,
            None if inner.sessions.len() >= SESSIONS_MAX => Answer::Ask,
            None => Answer::Unseen,
        }
    }

    /// What the look for records of an unseen `session` found: none
    /// (`fresh`), or some. Called under the commit lock, as every call
    /// that adds a record.
    pub fn seen(&self, session: u64, fresh: bool) {
        let mut inner = self.lock();
        if inner.sessions.len() < SESSIONS_MAX {
            let known = if fresh {
                Known::Fresh(BTreeSet::new())
            } else {
                Known::Engine
            };
            inner.sessions.entry(session).or_insert(known);
        }
    }

    /// The record of `txn_id` of `session` is in a batch queued for the
    /// commit log or written to the engine.
    pub fn built(&self, session: u64, txn_id: u64) {
        let mut inner = self.lock();
        let full = inner.ids >= IDS_MAX;
        let Some(Known::Fresh(ids)) = inner.sessions.get_mut(&session) else {
            return;
        };
        if ids.contains(&txn_id) {
            return;
        }
        if full {
            let n = ids.len();
            inner.sessions.insert(session, Known::Engine);
            inner.ids -= n;
            return;
        }
        ids.insert(txn_id);
        inner.ids += 1;
    }

    /// A batch of `session`'s may or may not have reached the engine (its
    /// write failed): the engine knows from now on.
    pub fn unsure(&self, session: u64) {
        let mut inner = self.lock();
        if let Some(Known::Fresh(ids)) = inner.sessions.get(&session) {
            let n = ids.len();
            inner.sessions.insert(session, Known::Engine);
            inner.ids -= n;
        }
    }

    /// Prune the records of `session` below `below` in memory: `true` when
    /// the session is fresh (the next batch deletes them), `false` when the
    /// engine must be pruned.
    pub fn prune(&self, session: u64, below: u64) -> bool {
        let mut inner = self.lock();
        let Some(Known::Fresh(ids)) = inner.sessions.get_mut(&session) else {
            return false;
        };
        let kept = ids.split_off(&below);
        let gone = std::mem::replace(ids, kept);
        inner
            .pruned
            .extend(gone.into_iter().map(|id| keys::applied(session, id)));
        true
    }

    /// The pruned records' keys, for the batch being built to delete;
    /// [`Applied::put_back`] if it is never built.
    pub fn take_pruned(&self) -> Vec<Vec<u8>> {
        let mut inner = self.lock();
        let keys = std::mem::take(&mut inner.pruned);
        inner.ids -= keys.len();
        keys
    }

    /// The batch that was to delete `keys` was not built.
    pub fn put_back(&self, keys: Vec<Vec<u8>>) {
        let mut inner = self.lock();
        inner.ids += keys.len();
        inner.pruned.extend(keys);
    }

    /// Ids held in sets and pending deletes.
    #[cfg(test)]
    pub fn ids(&self) -> usize {
        self.lock().ids
    }
}

/// The most applied-transaction records one prune batch deletes.
const PRUNE_BATCH_MAX: usize = 16 * 1024;

impl SlateStore {
    /// Whether `txn_id` of `session` was applied before: from memory for a
    /// fresh session (`once.rs`), else its record in the view.
    pub(super) async fn applied_before(
        &self,
        view: &mut TxnView<'_>,
        session: u64,
        txn_id: u64,
    ) -> Result<bool, StoreError> {
        match self.applied.check(session, txn_id) {
            Answer::Applied => return Ok(true),
            Answer::New => return Ok(false),
            Answer::Unseen => {
                let range = keys::applied_of(session);
                let fresh = self.log_queue.range(&range).is_empty()
                    && self.scan(range, 1).await?.is_empty();
                self.applied.seen(session, fresh);
                if fresh {
                    return Ok(false);
                }
            }
            Answer::Ask => {}
        }
        Ok(view.get(&keys::applied(session, txn_id)).await?.is_some())
    }

    /// Prune the applied records of `session` below `below`: in memory
    /// for a fresh session, else in the engine.
    pub(super) async fn prune_inner(&self, session: u64, below: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        // A fresh session's records go with the next batch (`once.rs`).
        if self.applied.prune(session, below) {
            return Ok(());
        }
        loop {
            let serial = self.commit_lock.lock().await;
            // This writes to the engine directly: every batch built before
            // it goes first, as the log's records are in engine order.
            self.await_applied().await?;
            let doomed = self
                .scan(keys::applied_below(session, below), PRUNE_BATCH_MAX)
                .await?;
            if doomed.is_empty() {
                return Ok(());
            }
            let mut batch = WriteBatch::new();
            for (key, _) in &doomed {
                keys::decode_applied(key)?;
                batch.delete(key);
            }
            self.write_behind_queue(serial, batch).await?;
            if doomed.len() < PRUNE_BATCH_MAX {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Answer, Applied, IDS_MAX, SESSIONS_MAX};
    use crate::store::engine::keys;

    #[test]
    fn a_fresh_session_is_answered_from_memory() {
        let a = Applied::default();
        assert_eq!(a.check(7, 1), Answer::Unseen);
        a.seen(7, true);
        assert_eq!(a.check(7, 1), Answer::New);
        a.built(7, 1);
        a.built(7, 2);
        a.built(7, 2);
        assert_eq!(a.check(7, 1), Answer::Applied);
        assert_eq!(a.check(7, 3), Answer::New);
        assert_eq!(a.ids(), 2);
        // A session with records from before asks the engine.
        a.seen(8, false);
        a.built(8, 1);
        assert_eq!(a.check(8, 1), Answer::Ask);
        assert_eq!(a.ids(), 2);
    }

    #[test]
    fn a_prune_forgets_below_its_mark_and_hands_the_keys_to_a_batch() {
        let a = Applied::default();
        a.seen(7, true);
        for t in 1..=5 {
            a.built(7, t);
        }
        assert!(a.prune(7, 4));
        assert!(!a.prune(8, 4), "an unseen session is pruned in the engine");
        assert_eq!(a.check(7, 3), Answer::New);
        assert_eq!(a.check(7, 4), Answer::Applied);
        let keys = a.take_pruned();
        assert_eq!(
            keys,
            (1..4).map(|t| keys::applied(7, t)).collect::<Vec<_>>()
        );
        assert_eq!(a.ids(), 2);
        // A batch that is never built gives them back.
        a.put_back(keys);
        assert_eq!(a.ids(), 5);
        assert_eq!(a.take_pruned().len(), 3);
        assert!(a.take_pruned().is_empty());
    }

    #[test]
    fn a_failed_write_hands_the_session_to_the_engine() {
        let a = Applied::default();
        a.seen(7, true);
        a.built(7, 1);
        a.unsure(7);
        assert_eq!(a.check(7, 1), Answer::Ask);
        assert_eq!(a.check(7, 2), Answer::Ask);
        assert_eq!(a.ids(), 0);
        assert!(!a.prune(7, 2));
    }

    #[test]
    fn memory_stays_within_its_bounds() {
        let a = Applied::default();
        a.seen(1, true);
        for t in 0..IDS_MAX as u64 {
            a.built(1, t);
        }
        assert_eq!(a.ids(), IDS_MAX);
        a.seen(2, true);
        a.built(2, 1);
        assert_eq!(a.check(2, 1), Answer::Ask, "past the bound, the engine");
        assert_eq!(a.ids(), IDS_MAX);
        // The first session goes on from memory.
        assert_eq!(a.check(1, 5), Answer::Applied);
        for s in 3..SESSIONS_MAX as u64 + 10 {
            a.seen(s, true);
        }
        assert_eq!(a.check(u64::MAX, 1), Answer::Ask, "too many sessions");
        assert_eq!(a.check(SESSIONS_MAX as u64 - 1, 1), Answer::New);
    }
}
