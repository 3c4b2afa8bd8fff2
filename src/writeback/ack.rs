//! What happens when an attempt at sending a transaction ends: a durable
//! ack completes it (untags its pages, retires its overlay entries, wakes
//! the waiters), an ack under a new durability epoch resends everything
//! unacknowledged, a failure schedules the resend (backoff, failover), and a
//! refusal for lack of space drops the transaction's page data.
//!
//! The invariants checked here, where state changes hands: an ack is for
//! the oldest unacknowledged transaction of each inode it touches, the pages
//! it untags carry its tag, and the bytes it returns were counted. A
//! violation is fatal ([`invariant_violated`]): the layer could no longer
//! tell stored data from unstored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::overlay::NameOverlay;
use super::queue::{TxnEntry, TxnState};
use super::{Shared, State};
use crate::store::sink::{Ack, SendError};
use crate::store::Op;

/// How long a transaction the store refused waits before it is sent again
/// (unless a sync or freed space sends it sooner).
const REFUSED_RETRY: Duration = Duration::from_secs(1);

/// The layer's state contradicts itself. Log it and abort the daemon: a
/// panic would be lost inside the sender's task (tokio drops it), and going
/// on could answer a guest's fsync for data that is not stored.
#[cold]
pub(super) fn invariant_violated(what: std::fmt::Arguments<'_>) -> ! {
    error!(invariant = %what, "transaction layer invariant violated: aborting");
    std::process::abort()
}

fn poisoned() -> ! {
    invariant_violated(format_args!(
        "state lock poisoned: a panic interrupted a change of the layer's state"
    ))
}

/// The layer's state behind its lock, counting the lockers that found it
/// held and how long they waited: the measure of whether the lock is worth
/// sharding (see [`WritebackStore::state_lock_contention`](super::WritebackStore::state_lock_contention)).
pub(super) struct StateLock {
    m: Mutex<State>,
    locked: AtomicU64,
    contended: AtomicU64,
    waited_ns: AtomicU64,
}

impl StateLock {
    pub(super) fn new(st: State) -> StateLock {
        StateLock {
            m: Mutex::new(st),
            locked: AtomicU64::new(0),
            contended: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        }
    }

    /// Locks taken, those that had to wait, and their total wait.
    pub(super) fn contention(&self) -> (u64, u64, Duration) {
        (
            self.locked.load(Ordering::Relaxed),
            self.contended.load(Ordering::Relaxed),
            Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed)),
        )
    }
}

/// Lock the layer's state. A poisoned lock is fatal, never recovered. The
/// uncontended path is one `try_lock`, as cheap as `lock`, and a relaxed
/// increment; only a locker that must wait reads the clock.
pub(super) fn lock(l: &StateLock) -> MutexGuard<'_, State> {
    l.locked.fetch_add(1, Ordering::Relaxed);
    match l.m.try_lock() {
        Ok(st) => st,
        Err(TryLockError::WouldBlock) => {
            let start = std::time::Instant::now();
            let st = l.m.lock().unwrap_or_else(|_| poisoned());
            let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            l.contended.fetch_add(1, Ordering::Relaxed);
            l.waited_ns.fetch_add(waited, Ordering::Relaxed);
            st
        }
        Err(TryLockError::Poisoned(_)) => poisoned(),
    }
}

/// Wait on `cv` with the state locked (see [`lock`]), for at most
/// `timeout`. There is no unbounded wait in the layer: every waiter has a
/// deadline after which it answers an error.
pub(super) fn wait_timeout<'a>(
    cv: &Condvar,
    st: MutexGuard<'a, State>,
    timeout: Duration,
) -> MutexGuard<'a, State> {
    cv.wait_timeout(st, timeout)
        .unwrap_or_else(|_| poisoned())
        .0
}

/// An acknowledged attempt's commit latency, from its send.
fn time_commit(shared: &Shared, st: &State, id: u64, acked: bool) {
    if let Some(sent) = st.txns.get(&id).and_then(|t| t.sent_at).filter(|_| acked) {
        shared.metrics.levels.commit_latency.observe(sent.elapsed());
    }
}

/// An attempt finished.
pub(super) fn on_result(
    shared: &Arc<Shared>,
    id: u64,
    attempt: u64,
    server: usize,
    result: Result<Ack, SendError>,
) {
    let mut st = lock(&shared.state);
    let (current, bytes) = st
        .txns
        .get(&id)
        .map_or((None, 0), |t| (Some(t.state), t.data_bytes));
    if current == Some(TxnState::InFlight { attempt }) {
        landed(&mut st, id, bytes);
        time_commit(shared, &st, id, result.is_ok());
    }
    match result {
        Ok(ack) => {
            if current.is_none() {
                // Acked already by an earlier attempt: a duplicate ack.
                shared.metrics.txn_duplicate_acks.inc();
                return;
            }
            if ack.duplicate {
                shared.metrics.txn_duplicate_acks.inc();
            }
            if st.epoch != 0 && ack.epoch != st.epoch {
                // The NFS write-verifier rule: the store restarted or failed
                // over; whatever was sent before may be gone. Resend it all.
                warn!(
                    old = st.epoch,
                    new = ack.epoch,
                    "store epoch changed: resending every unacknowledged transaction"
                );
                let ids: Vec<u64> = st.txns.keys().copied().filter(|t| *t != id).collect();
                for other in ids {
                    let Some(t) = st.txns.get_mut(&other) else {
                        continue;
                    };
                    if let TxnState::InFlight { .. } = t.state {
                        t.state = TxnState::Queued;
                        t.not_before = None;
                        let bytes = t.data_bytes;
                        landed(&mut st, other, bytes);
                        st.ready.insert(other);
                    }
                }
            }
            if let Some(TxnState::InFlight { attempt: newer }) = current {
                if newer != attempt {
                    // An earlier attempt (sent before an epoch change
                    // queued it again) is acknowledged while a newer one
                    // is in flight: the newer one's slot is free now, as
                    // its own ack will find the transaction gone.
                    landed(&mut st, id, bytes);
                }
            }
            st.epoch = ack.epoch;
            st.preferred_server = server;
            complete(shared, &mut st, id);
        }
        Err(e) => {
            // A failure of a superseded attempt says nothing new.
            if current != Some(TxnState::InFlight { attempt }) {
                return;
            }
            let servers = shared.sink.servers().max(1);
            let Some(t) = st.txns.get_mut(&id) else {
                return;
            };
            t.state = TxnState::Queued;
            t.last_error = Some(e.to_string());
            st.ready.insert(id);
            superseded(&mut st, &e);
            let Some(t) = st.txns.get_mut(&id) else {
                return;
            };
            let now = Instant::now();
            match &e {
                SendError::Retry(_) => {
                    t.attempts_here += 1;
                    if t.attempts_here >= shared.cfg.attempts_per_server && servers > 1 {
                        t.server = (server + 1) % servers;
                        t.attempts_here = 0;
                        shared.metrics.txn_failovers.inc();
                        t.not_before = None;
                    } else {
                        t.not_before = Some(now + backoff(t.attempts_here));
                    }
                }
                SendError::Elsewhere(_) => {
                    t.server = (server + 1) % servers;
                    t.attempts_here = 0;
                    if servers > 1 {
                        shared.metrics.txn_failovers.inc();
                    }
                    t.not_before =
                        elsewhere_wait(t.attempts, servers as u32).map(|wait| now + wait);
                }
                SendError::Refused(_) => {
                    t.not_before = Some(now + REFUSED_RETRY);
                }
                // The sender sends nothing more (`State::superseded`).
                SendError::Superseded(_) => t.not_before = None,
                SendError::NoSpace(_) => {
                    shared.metrics.txn_no_space.inc();
                    refused_for_space(&mut st, id);
                }
            }
            let next = st.txns.get(&id).map_or(server, |t| t.server);
            warn!(txn = id, server = %shared.sink.server_name(server), error = %e, next = %shared.sink.server_name(next), "transaction not acknowledged; will resend");
            shared.publish(&st);
            shared.changed.notify_all();
            shared.wake_sender();
        }
    }
}

/// Another daemon claimed the volume for writing (`e` is
/// [`SendError::Superseded`]): final, logged once.
fn superseded(st: &mut State, e: &SendError) {
    if let SendError::Superseded(why) = e {
        if st.superseded.is_none() {
            error!(reason = %why, "another daemon writes to the volume now: nothing more is sent, every fsync fails with EIO");
        }
        st.superseded = Some(why.clone());
    }
}

/// An attempt at `id`, carrying `bytes` of data, is no longer in flight.
fn landed(st: &mut State, id: u64, bytes: u64) {
    if st.in_flight == 0 || st.in_flight_bytes < bytes {
        invariant_violated(format_args!(
            "txn {id} ({bytes} bytes) in flight, {} counted ({} bytes)",
            st.in_flight, st.in_flight_bytes
        ));
    }
    st.in_flight -= 1;
    st.in_flight_bytes -= bytes;
}

/// The wait before resending after `attempts` failed attempts: 20 ms,
/// doubling up to 1.28 s from the sixth attempt on.
pub(super) fn backoff(attempts: u32) -> Duration {
    Duration::from_millis(20 << attempts.min(6))
}

/// The wait before a transaction told "go elsewhere" after `attempts`
/// attempts goes to the next of `servers`: none while it has not tried
/// as many times as there are servers (the next one may take it at
/// once), else a backoff, so that a transaction every server refuses
/// does not spin.
fn elsewhere_wait(attempts: u32, servers: u32) -> Option<Duration> {
    let servers = servers.max(1);
    (attempts >= servers).then(|| backoff(attempts / servers))
}

/// The store refused transaction `id` for lack of space, so none of it was
/// applied. Its page data is dropped: the pages it alone tagged leave the
/// cache (reads show what the store holds), their bytes no longer count as
/// dirty, its inodes' next fsync, flush or syncfs reports ENOSPC, and new
/// writes get ENOSPC until a transaction that frees space is acknowledged.
/// Its operations go again at once, without the data. A transaction with
/// nothing to drop (operations alone, or writes in its operations) waits for
/// space instead: it is retried, and a sync of its inodes fails with ENOSPC
/// while it waits.
fn refused_for_space(st: &mut State, id: u64) {
    let Some(t) = st.txns.get_mut(&id) else {
        return;
    };
    let writes_in_ops = t.ops.iter().any(|op| matches!(op, Op::Write { .. }));
    if t.pages.is_empty() || writes_in_ops {
        st.full |= writes_in_ops || !t.pages.is_empty();
        t.waits_for_space = true;
        t.not_before = Some(Instant::now() + REFUSED_RETRY);
        return;
    }
    let pages: BTreeMap<u64, _> = std::mem::take(&mut t.pages);
    let bytes = std::mem::take(&mut t.data_bytes);
    t.pinned = None;
    t.mergeable = false;
    t.not_before = None;
    warn!(
        txn = id,
        inodes = ?pages.keys().collect::<Vec<_>>(),
        bytes,
        "volume full: dropping the transaction's data; fsync will report ENOSPC"
    );
    for (ino, idxs) in pages {
        for idx in idxs {
            if !st.cache.discard(ino, idx, id) {
                invariant_violated(format_args!("page {ino}:{idx} lacks refused txn {id}"));
            }
        }
        // A removal queued behind it takes the error with the inode.
        let removed = st.attrs.get(&ino).is_some_and(|o| o.inode.is_none());
        if !removed {
            st.no_space.insert(ino);
        }
    }
    if st.dirty_bytes < bytes {
        invariant_violated(format_args!(
            "txn {id} returns {bytes} dirty bytes of {}",
            st.dirty_bytes
        ));
    }
    st.dirty_bytes -= bytes;
    st.full = true;
}

/// A transaction that frees space (a removal, truncate or punched hole) was
/// acknowledged: writes may try again, and so may what waits for space.
fn space_freed(st: &mut State) {
    st.full = false;
    for t in st.txns.values_mut() {
        if t.waits_for_space && t.state == TxnState::Queued {
            t.not_before = None;
        }
    }
}

/// The store now has what `t` changed: drop the overlay entries it was the
/// newest to set, and the ranges it zeroed.
fn retire_overlay(st: &mut State, t: &TxnEntry) {
    for op in t.ops.iter() {
        match op {
            Op::PutDirent { parent, dirent } => {
                retire(&mut st.dirents, *parent, &dirent.name, t.id)
            }
            Op::RemoveDirent { parent, name } => retire(&mut st.dirents, *parent, name, t.id),
            Op::SetXattr { ino, name, .. } | Op::RemoveXattr { ino, name } => {
                retire(&mut st.xattrs, *ino, name, t.id)
            }
            Op::SetSymlink { ino, .. }
                if st.symlinks.get(ino).is_some_and(|(_, id)| *id == t.id) =>
            {
                st.symlinks.remove(ino);
            }
            Op::Truncate { ino, .. } | Op::PunchHole { ino, .. } => st.holes.retire(*ino, t.id),
            // The store's bytes changed: a read of them that this ack
            // overtook is not kept.
            Op::Write { ino, .. } => st.cache.note_store_change(*ino),
            _ => {}
        }
    }
}

fn retire<V>(map: &mut NameOverlay<V>, key: u64, name: &[u8], txn: u64) {
    let Some(inner) = map.get_mut(&key) else {
        return;
    };
    if inner.get(name).is_some_and(|(_, id)| *id == txn) {
        inner.remove(name);
    }
    if inner.is_empty() {
        map.remove(&key);
    }
}

/// A durable ack: untag the pages, free the transaction, wake the waiters.
fn complete(shared: &Arc<Shared>, st: &mut State, id: u64) {
    let Some(t) = st.txns.remove(&id) else { return };
    st.ready.remove(&id);
    shared.metrics.txn_acked.inc();
    for (ino, pages) in &t.pages {
        for idx in pages {
            if !st.cache.untag(*ino, *idx, id) {
                invariant_violated(format_args!("page {ino}:{idx} lacks acked txn {id}"));
            }
        }
    }
    retire_overlay(st, &t);
    // What it set is clean now: the caches may hold it only within budget.
    st.trim_meta();
    drop(t.pinned);
    for ino in &t.inodes {
        let now_empty = match st.by_inode.get_mut(ino) {
            Some(q) => {
                // Transactions of one inode are acknowledged in order.
                if q.front() != Some(&id) {
                    invariant_violated(format_args!(
                        "ack of txn {id} out of order for inode {ino} (oldest: {:?})",
                        q.front()
                    ));
                }
                q.pop_front();
                // The next one may be able to go now.
                if let Some(&next) = q.front() {
                    st.ready.insert(next);
                }
                q.is_empty()
            }
            None => false,
        };
        if now_empty {
            st.by_inode.remove(ino);
            st.sticky.remove(ino);
        }
    }
    let held = t.data_bytes + t.dirty_meta_bytes;
    if st.dirty_bytes < held {
        invariant_violated(format_args!(
            "txn {id} returns {held} dirty bytes of {}",
            st.dirty_bytes
        ));
    }
    st.dirty_bytes -= held;
    let frees = t.ops.iter().any(|op| {
        matches!(
            op,
            Op::RemoveInode { .. } | Op::Truncate { .. } | Op::PunchHole { .. }
        )
    });
    if frees {
        space_freed(st);
    }
    let evicted = st.cache.evict();
    shared.metrics.cache_evictions.add(evicted);
    shared.publish(st);
    shared.changed.notify_all();
    // The sender chooses only among `ready`: with it empty, this ack
    // (the slot it frees, what it unblocked) gives it nothing to send.
    if !st.ready.is_empty() {
        shared.nudge(st, None);
    }
    debug!(txn = id, age = ?t.formed.elapsed(), "transaction acknowledged");
}

#[cfg(test)]
mod wait_tests {
    use super::*;

    #[test]
    fn go_elsewhere_moves_at_once_until_every_server_said_no() {
        // Two servers: the first refusal moves on at once; from the
        // second on (both said no) the backoff doubles as before.
        assert_eq!(elsewhere_wait(1, 2), None);
        assert_eq!(elsewhere_wait(2, 2), Some(backoff(1)));
        assert_eq!(elsewhere_wait(3, 2), Some(backoff(1)));
        assert_eq!(elsewhere_wait(4, 2), Some(backoff(2)));
        // One server: every refusal waits.
        assert_eq!(elsewhere_wait(1, 1), Some(backoff(1)));
        assert_eq!(elsewhere_wait(0, 0), None);
    }
}
