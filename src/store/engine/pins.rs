//! Reads by file range: [`SlateStore`]'s `read_data` hands segment extents
//! back as [`ReadPiece::File`] ranges, which the filesystem layer reads
//! with `preadv` straight into the guest's buffers (a sequential reader's
//! next ranges are the host kernel's read-ahead of the segment file).
//!
//! Reads and reclamation meet through grace periods, not a lock: a read
//! enters the current epoch before it looks up an extent and leaves it
//! when the last file piece it handed out is dropped (the pieces carry
//! its [`ReadPin`]). The reclaimer is only told about pages once the batch
//! that freed them is in the engine, so a read that enters after that
//! names only live extents; before punching, the reclaimer opens a new
//! epoch and waits, on its own thread and bounded, until every read of the
//! older epochs has left. A read never waits for a punch and never
//! punches: the queue thread that serves a READ is never held by
//! reclamation, however much of it there is. Deleting an emptied segment
//! needs no grace period: an open handle keeps its bytes readable.
//!
//! Checksums: extents are verified against their checksums by `pohmelfs
//! check` (and by the engine's own reads where it decodes them), not on
//! this path. A hot read goes from the host page cache to the guest
//! without the daemon touching the bytes, which is what makes it cheap;
//! verifying would mean reading every byte into the daemon first. Segment
//! pages are written once and only ever punched, and data is durable
//! before the metadata that references it, so a live extent's bytes only
//! change through media corruption, which `check` reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{ReadPiece as PlanPiece, SlateStore};
use crate::store::{ReadData, ReadPiece, ReadPin, StoreError};

/// The reads in flight per epoch; see the module documentation.
#[derive(Default)]
pub(super) struct Readers {
    state: Mutex<Epochs>,
    left: Condvar,
}

#[derive(Default)]
struct Epochs {
    current: u64,
    /// Reads still in flight, by the epoch they entered; no zero counts.
    live: BTreeMap<u64, usize>,
}

fn lock(m: &Mutex<Epochs>) -> std::sync::MutexGuard<'_, Epochs> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One read in flight, from before its extent lookups until its last file
/// piece is dropped.
pub(super) struct Entered {
    readers: Arc<Readers>,
    epoch: u64,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut st = lock(&self.readers.state);
        if let Some(n) = st.live.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                st.live.remove(&self.epoch);
                if self.epoch < st.current {
                    self.readers.left.notify_all();
                }
            }
        }
    }
}

impl Readers {
    /// Enter the current epoch: call before looking up extents.
    pub(super) fn enter(self: &Arc<Self>) -> Entered {
        let mut st = lock(&self.state);
        let epoch = st.current;
        *st.live.entry(epoch).or_insert(0) += 1;
        Entered {
            readers: self.clone(),
            epoch,
        }
    }

    /// Open a new epoch and wait until every read that entered an older
    /// one has left, for at most `bound`. True when they have: from then
    /// on no read names a page that was dead when the call began.
    pub(super) fn grace(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        let mut st = lock(&self.state);
        st.current += 1;
        let target = st.current;
        loop {
            if st.live.range(..target).next().is_none() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .left
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The current epoch: how many grace periods have begun (tests).
    #[cfg(test)]
    pub(super) fn epoch(&self) -> u64 {
        lock(&self.state).current
    }
}

impl SlateStore {
    /// `len` bytes of `ino` at `offset`: segment extents as pinned file
    /// ranges, inline extents as shared buffers, holes as zeros.
    pub(super) fn read_pinned(
        &self,
        ino: u64,
        offset: u64,
        len: usize,
    ) -> Result<ReadData, StoreError> {
        let plan = self.read_plan(ino, offset, len)?;
        let mut out = ReadData::new();
        // The read stays in its epoch while any of its file pieces lives.
        let pin = ReadPin::new(Arc::new(plan.entered));
        for p in plan.pieces {
            out.push(match p {
                PlanPiece::Zeros(n) => ReadPiece::Zeros(n),
                PlanPiece::Bytes(b) => ReadPiece::Bytes(b),
                PlanPiece::File { file, offset, len } => ReadPiece::File {
                    file,
                    offset,
                    len,
                    pin: pin.clone(),
                },
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Readers;

    #[test]
    fn a_grace_period_waits_for_older_reads_only() {
        let r = Arc::new(Readers::default());
        assert!(r.grace(Duration::ZERO), "no read in flight");
        let old = r.enter();
        assert!(!r.grace(Duration::ZERO), "an older read is in flight");
        drop(old);
        assert!(r.grace(Duration::ZERO));
    }

    #[test]
    fn a_waiting_grace_period_ends_when_the_last_older_read_leaves() {
        let r = Arc::new(Readers::default());
        let old = r.enter();
        let waiter = {
            let r = r.clone();
            std::thread::spawn(move || r.grace(Duration::from_secs(60)))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while r.epoch() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no grace period began"
            );
            std::thread::yield_now();
        }
        // A read that enters after the grace period began does not hold it.
        let new = r.enter();
        drop(old);
        assert!(waiter.join().unwrap());
        drop(new);
    }
}
