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

struct State {
    queue: VecDeque<Queued>,
    /// The newest queued value of each key (`None`: deleted), with the
    /// seq of the commit that queued it.
    overlay: BTreeMap<Vec<u8>, (u64, Option<Bytes>)>,
    next_seq: u64,
    /// Every commit up to this seq is durable and in the engine.
    done: u64,
    /// A leader has taken a group and not finished it.
    leading: bool,
    /// The first seq of the group that failed: it and every later commit
    /// fail.
    failed: Option<(u64, Failure)>,
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
}

impl Default for LogQueue {
    fn default() -> Self {
        LogQueue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                overlay: BTreeMap::new(),
                next_seq: 1,
                done: 0,
                leading: false,
                failed: None,
            }),
            wake: tokio::sync::Notify::new(),
            #[cfg(test)]
            before_write: Mutex::new(None),
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

    /// The queued puts and deletes in `range`, in key order.
    pub fn range(&self, range: &Range<Vec<u8>>) -> Vec<(Vec<u8>, Option<Bytes>)> {
        let s = self.lock();
        if s.overlay.is_empty() {
            return Vec::new();
        }
        s.overlay
            .range::<Vec<u8>, _>((Bound::Included(&range.start), Bound::Excluded(&range.end)))
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }

    /// Wait until the commit `seq` is done, or until it may lead a group
    /// (which then holds it or commits before it): the commits from the
    /// front, at most [`GROUP_COUNT_MAX`] and, beyond the first,
    /// `bytes_max` payload bytes.
    pub async fn turn(&self, seq: u64, bytes_max: usize) -> Turn {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            // Registered before looking, so a finish after the look wakes us.
            notified.as_mut().enable();
            {
                let mut s = self.lock();
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

    /// The leader's group up to `last` is durable and in the engine
    /// (`Ok`), or failed: wake everyone waiting.
    pub fn finish(&self, first: u64, last: u64, result: Result<(), &StoreError>) {
        let mut s = self.lock();
        debug_assert!(s.leading, "a group finished without a leader");
        s.leading = false;
        match result {
            Ok(()) => {
                debug_assert!(s.done < first && first <= last, "groups finish in order");
                s.done = last;
                s.overlay.retain(|_, (seq, _)| *seq > last);
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
