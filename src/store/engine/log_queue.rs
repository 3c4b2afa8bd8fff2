//! Group commit in the commit log: commits built while a record is being
//! written go into the next record together.
//!
//! A commit builds its batch under the commit lock and queues it here
//! with the bytes of its small writes (`push`), then leaves the lock and
//! waits for its turn (`turn`). The first waiter that finds no record
//! being written leads: it takes every queued commit from the front, up to
//! [`GROUP_COUNT_MAX`] commits and the byte bound it is given, writes them
//! as one record (one write, one `fdatasync`), hands the merged batch to
//! the engine, and reports the group done (`finish`). The others find
//! themselves covered, or lead the next group. So a group is made of the
//! commits that arrived while the record before it was written, and its
//! record is atomic: none of them was acknowledged before it was durable.
//!
//! A commit is acknowledged once its record is durable ([`Need::Durable`]),
//! not once the engine has its batch: the leader reports the group durable
//! (`durable`), hands the engine write to a task of its own, and that task
//! reports the group applied (`finish`), which frees the next leader (the
//! engine takes the groups in log order). Between the two, readers outside
//! a commit find the group's values in the unapplied overlay
//! ([`LogQueue::unapplied`], [`LogQueue::unapplied_range`]), which holds
//! durable values only; a writer that must follow the engine's order (a
//! batch written to the engine directly, a close) waits for
//! [`Need::Applied`].
//!
//! A batch queued here is not yet in the engine, and the commits built
//! after it must see it: the view a commit builds on (`apply.rs`) reads
//! the newest queued value of a key before the engine's ([`LogQueue::get`],
//! [`LogQueue::range`]). A key leaves that overlay only once the group
//! that wrote it is in the engine, so a reader that misses it in the
//! overlay finds it in the engine.
//!
//! This module owns the queue, the overlay and who leads. It never writes
//! the log or the engine (`commit.rs` does, as the leader) and must never
//! report a commit done before the group holding it is durable and in the
//! engine.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Bound, Range};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use super::apply::Puts;
use super::reclaim::Reclaim;
use super::segment::Placed;
use crate::store::{StoreError, WriteData};

/// The most commits one record carries.
pub const GROUP_COUNT_MAX: usize = 64;

/// One commit's batch, built and waiting for its record.
pub struct Queued {
    pub seq: u64,
    pub puts: Puts,
    /// Its small writes: where they went in a segment, and their bytes.
    pub writes: Vec<(Placed, WriteData)>,
    /// What it freed, held until the log's tail passes its record.
    pub reclaim: Reclaim,
    /// About how many payload bytes it adds to a record.
    pub bytes: usize,
}

/// Why a group failed, kept for every commit queued from it on.
#[derive(Clone, Debug)]
enum Failure {
    Fenced,
    Other(String),
}

impl Failure {
    fn of(e: &StoreError) -> Failure {
        match e {
            StoreError::Fenced => Failure::Fenced,
            e => Failure::Other(crate::ErrorChain(e).to_string()),
        }
    }

    fn to_error(&self) -> StoreError {
        match self {
            Failure::Fenced => StoreError::Fenced,
            Failure::Other(m) => StoreError::Io(std::io::Error::other(format!(
                "an earlier commit log group failed: {m}"
            ))),
        }
    }
}

/// Values by key, each with the seq that set it (`None`: deleted).
type Values = BTreeMap<Vec<u8>, (u64, Option<Bytes>)>;

struct State {
    queue: VecDeque<Queued>,
    /// The newest queued value of each key (`None`: deleted), with the
    /// seq of the commit that queued it.
    overlay: Values,
    /// The newest durable value of each key of the groups durable but not
    /// yet in the engine, with the last seq of its group: what readers
    /// outside a commit lay over the engine.
    unapplied: Values,
    next_seq: u64,
    /// Every commit up to this seq is durable in the log.
    durable: u64,
    /// Every commit up to this seq is durable and in the engine.
    done: u64,
    /// A leader has taken a group and not finished it.
    leading: bool,
    /// The first seq of the group that failed: it and every later commit
    /// fail.
    failed: Option<(u64, Failure)>,
}

/// What a waiter waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Its record is durable: enough to acknowledge a commit.
    Durable,
    /// Its batch is in the engine too: before writing to the engine
    /// directly, or closing it.
    Applied,
}

/// What a waiting commit does next.
pub enum Turn {
    /// Its group is finished.
    Done(Result<(), StoreError>),
    /// Write these commits as one record, then [`LogQueue::finish`].
    Lead(Vec<Queued>),
}

/// The commits built but not yet in the log, in build order.
pub struct LogQueue {
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    /// Run by a leader just before it writes its record (tests hold it
    /// there with a latch).
    #[cfg(test)]
    pub(super) before_write: Mutex<Option<std::sync::Arc<dyn Fn() + Send + Sync>>>,
    /// Taken (a permit each) by a group's engine write before it starts
    /// (tests hold it there by giving none).
    #[cfg(test)]
    pub(super) before_apply: Mutex<Option<std::sync::Arc<tokio::sync::Semaphore>>>,
}

impl Default for LogQueue {
    fn default() -> Self {
        LogQueue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                overlay: BTreeMap::new(),
                unapplied: BTreeMap::new(),
                next_seq: 1,
                durable: 0,
                done: 0,
                leading: false,
                failed: None,
            }),
            wake: tokio::sync::Notify::new(),
            #[cfg(test)]
            before_write: Mutex::new(None),
            #[cfg(test)]
            before_apply: Mutex::new(None),
        }
    }
}

impl LogQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a built batch (called under the commit lock, so seqs are in
    /// build order); its seq.
    pub fn push(&self, puts: Puts, writes: Vec<(Placed, WriteData)>, reclaim: Reclaim) -> u64 {
        let bytes = payload_bytes(&puts, &writes);
        let mut s = self.lock();
        let seq = s.next_seq;
        s.next_seq += 1;
        for (k, v) in &puts {
            s.overlay.insert(k.clone(), (seq, v.clone()));
        }
        s.queue.push_back(Queued {
            seq,
            puts,
            writes,
            reclaim,
            bytes,
        });
        seq
    }

    /// The seq of the last commit queued (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// How many commits wait for a leader to take them.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    /// `Some(value)` when a queued batch decides `key` (`Some(None)`:
    /// deleted).
    pub fn get(&self, key: &[u8]) -> Option<Option<Bytes>> {
        self.lock().overlay.get(key).map(|(_, v)| v.clone())
    }

    /// `Some(value)` when a group durable but not yet in the engine
    /// decides `key` (`Some(None)`: deleted). Readers outside a commit
    /// look here before the engine: a key leaves only once the engine has
    /// it.
    pub fn unapplied(&self, key: &[u8]) -> Option<Option<Bytes>> {
        self.unapplied_at(|| key)
    }

    /// As [`LogQueue::unapplied`], the key built only when some group is
    /// on its way to the engine (one lock either way).
    pub fn unapplied_at<K: AsRef<[u8]>>(&self, key: impl FnOnce() -> K) -> Option<Option<Bytes>> {
        let s = self.lock();
        if s.unapplied.is_empty() {
            return None;
        }
        s.unapplied.get(key().as_ref()).map(|(_, v)| v.clone())
    }

    /// As [`LogQueue::unapplied`], for every key in `range`, in key order.
    pub fn unapplied_range(&self, range: &Range<Vec<u8>>) -> Vec<(Vec<u8>, Option<Bytes>)> {
        values_in(&self.lock().unapplied, range)
    }

    /// Whether some group is durable and not yet in the engine.
    #[cfg(test)]
    pub fn any_unapplied(&self) -> bool {
        !self.lock().unapplied.is_empty()
    }

    /// The queued puts and deletes in `range`, in key order.
    pub fn range(&self, range: &Range<Vec<u8>>) -> Vec<(Vec<u8>, Option<Bytes>)> {
        values_in(&self.lock().overlay, range)
    }

    /// Wait until the commit `seq` is as far as `need`, or until it may
    /// lead a group (which then holds it or commits before it): the
    /// commits from the front, at most [`GROUP_COUNT_MAX`] and, beyond the
    /// first, `bytes_max` payload bytes.
    pub async fn turn(&self, seq: u64, bytes_max: usize, need: Need) -> Turn {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            // Registered before looking, so a finish after the look wakes us.
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                // Durable before failed: a group whose engine write failed
                // after its record was durable stays acknowledged.
                if need == Need::Durable && s.durable >= seq {
                    return Turn::Done(Ok(()));
                }
                if let Some((from, f)) = &s.failed {
                    if seq >= *from {
                        return Turn::Done(Err(f.to_error()));
                    }
                }
                if s.done >= seq {
                    return Turn::Done(Ok(()));
                }
                if !s.leading && !s.queue.is_empty() {
                    s.leading = true;
                    let mut group = Vec::new();
                    let mut bytes = 0;
                    while let Some(q) = s.queue.front() {
                        let full = group.len() >= GROUP_COUNT_MAX
                            || (!group.is_empty() && bytes + q.bytes > bytes_max);
                        if full {
                            break;
                        }
                        bytes += q.bytes;
                        group.extend(s.queue.pop_front());
                    }
                    return Turn::Lead(group);
                }
            }
            notified.await;
        }
    }

    /// The leader's group up to `last`, whose merged batch is `puts`, is
    /// durable in the log: readers see its values from now on, and the
    /// commits waiting for [`Need::Durable`] are woken. Its engine write
    /// follows, then [`LogQueue::finish`].
    pub fn durable(&self, last: u64, puts: &[(Vec<u8>, Option<Bytes>)]) {
        let mut s = self.lock();
        debug_assert!(s.leading, "a group made durable without a leader");
        debug_assert!(s.durable < last, "groups are durable in order");
        s.durable = last;
        for (k, v) in puts {
            s.unapplied.insert(k.clone(), (last, v.clone()));
        }
        drop(s);
        self.wake.notify_waiters();
    }

    /// The leader's group up to `last` is durable and in the engine
    /// (`Ok`), or failed: wake everyone waiting. A group that failed after
    /// [`LogQueue::durable`] keeps its values visible to readers: its
    /// record is durable and the next open replays it.
    pub fn finish(&self, first: u64, last: u64, result: Result<(), &StoreError>) {
        let mut s = self.lock();
        debug_assert!(s.leading, "a group finished without a leader");
        s.leading = false;
        match result {
            Ok(()) => {
                debug_assert!(s.done < first && first <= last, "groups finish in order");
                s.done = last;
                s.durable = s.durable.max(last);
                s.overlay.retain(|_, (seq, _)| *seq > last);
                s.unapplied.retain(|_, (seq, _)| *seq > last);
            }
            Err(e) => {
                if s.failed.is_none() {
                    s.failed = Some((first, Failure::of(e)));
                }
            }
        }
        drop(s);
        self.wake.notify_waiters();
    }

    /// Wait at the test gate before a group's engine write.
    pub async fn before_apply(&self) {
        #[cfg(test)]
        {
            let gate = self
                .before_apply
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(gate) = gate {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
        }
    }

    /// Run the test hook before a record is written.
    pub fn before_write(&self) {
        #[cfg(test)]
        {
            let hook = self
                .before_write
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}

/// The values of `map` (an overlay: key to seq and value) in `range`, in
/// key order.
fn values_in(map: &Values, range: &Range<Vec<u8>>) -> Vec<(Vec<u8>, Option<Bytes>)> {
    if map.is_empty() {
        return Vec::new();
    }
    map.range::<Vec<u8>, _>((Bound::Included(&range.start), Bound::Excluded(&range.end)))
        .map(|(k, (_, v))| (k.clone(), v.clone()))
        .collect()
}

/// About how many payload bytes `puts` and `writes` take in a record
/// (`log_record::encode_payload`).
pub fn payload_bytes(puts: &Puts, writes: &[(Placed, WriteData)]) -> usize {
    let puts: usize = puts
        .iter()
        .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Bytes::len))
        .sum();
    let writes: usize = writes.iter().map(|(_, d)| 20 + d.len()).sum();
    8 + puts + writes
}
