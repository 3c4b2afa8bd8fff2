//! Reads by file range: [`SlateStore`]'s `read_data` hands segment extents
//! back as [`ReadPiece::File`] ranges, which the filesystem layer reads
//! with `preadv` straight into the guest's buffers, and `advise` starts the
//! host's read-ahead of the segment ranges a sequential reader will want.
//!
//! A file piece outlives the read plan (and its shared hold on the reclaim
//! lock) that named it, so each carries a pin: while any pin is alive,
//! reclamation does not punch segment pages but defers them, and the last
//! pin to drop punches what was deferred. Pins are counted under the
//! reclaim lock's shared side and checked under its exclusive side, so a
//! range a pinned piece names is never punched under it; a plan built
//! after a reclamation names only live extents. Deleting an emptied
//! segment needs no deferral: an open handle keeps its bytes readable.
//!
//! Checksums: extents are verified against their checksums by `pohmelfs
//! check` (and by the engine's own reads where it decodes them), not on
//! this path. A hot read goes from the host page cache to the guest
//! without the daemon touching the bytes, which is what makes it cheap;
//! verifying would mean reading every byte into the daemon first. Segment
//! pages are written once and only ever punched, and data is durable
//! before the metadata that references it, so a live extent's bytes only
//! change through media corruption, which `check` reports.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{segment, ReadPiece as PlanPiece, SlateStore};
use crate::store::{ReadData, ReadPiece, ReadPin, StoreError};

/// Pins handed out and punches waiting for them.
#[derive(Default)]
pub(super) struct Pins {
    state: Mutex<PinState>,
    /// `posix_fadvise(WILLNEED)` calls made for read-ahead (tests).
    pub(super) advised: AtomicU64,
}

#[derive(Default)]
struct PinState {
    live: usize,
    deferred: Vec<(Arc<File>, Vec<Range<u64>>)>,
}

fn lock(m: &Mutex<PinState>) -> std::sync::MutexGuard<'_, PinState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One pin; see the module documentation.
struct Pin(Arc<Pins>);

impl Drop for Pin {
    fn drop(&mut self) {
        let deferred = {
            let mut st = lock(&self.0.state);
            st.live -= 1;
            if st.live > 0 {
                return;
            }
            std::mem::take(&mut st.deferred)
        };
        punch_all(&deferred);
    }
}

fn punch_all(work: &[(Arc<File>, Vec<Range<u64>>)]) {
    for (file, ranges) in work {
        for r in ranges {
            match segment::punch(file, r.clone()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "punching dead segment pages failed");
                }
            }
        }
    }
}

impl Pins {
    /// Punch `ranges` of `file` now, or when the last live pin drops. The
    /// caller holds the reclaim lock exclusively.
    pub(super) fn punch_or_defer(&self, file: Arc<File>, ranges: &[Range<u64>]) {
        let work = [(file, ranges.to_vec())];
        {
            let mut st = lock(&self.state);
            if st.live > 0 {
                st.deferred.extend(work);
                return;
            }
        }
        punch_all(&work);
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
        let mut pin: Option<ReadPin> = None;
        for p in plan.pieces.iter() {
            out.push(match p {
                PlanPiece::Zeros(n) => ReadPiece::Zeros(*n),
                PlanPiece::Bytes(b) => ReadPiece::Bytes(b.clone()),
                PlanPiece::File { file, offset, len } => {
                    // Taken while the plan holds the reclaim lock shared.
                    let pin = pin.get_or_insert_with(|| {
                        lock(&self.pins.state).live += 1;
                        ReadPin::new(Arc::new(Pin(self.pins.clone())))
                    });
                    ReadPiece::File {
                        file: file.clone(),
                        offset: *offset,
                        len: *len,
                        pin: pin.clone(),
                    }
                }
            });
        }
        drop(plan);
        Ok(out)
    }

    /// Ask the host to read the segment ranges behind `len` bytes of `ino`
    /// at `offset` into its page cache in the background
    /// (`posix_fadvise(WILLNEED)`, which returns without waiting for the
    /// I/O). Costs the extent-map lookups, never a data read.
    pub(super) fn advise_ranges(
        &self,
        ino: u64,
        offset: u64,
        len: usize,
    ) -> Result<(), StoreError> {
        let plan = self.read_plan(ino, offset, len)?;
        for p in plan.pieces.iter() {
            if let PlanPiece::File { file, offset, len } = p {
                let (Ok(off), Ok(n)) =
                    (libc::off_t::try_from(*offset), libc::off_t::try_from(*len))
                else {
                    continue;
                };
                // SAFETY: posix_fadvise only reads its integer arguments;
                // the fd is open while `file` is.
                let rc = unsafe {
                    libc::posix_fadvise(file.as_raw_fd(), off, n, libc::POSIX_FADV_WILLNEED)
                };
                if rc != 0 {
                    tracing::debug!(error = rc, "posix_fadvise(WILLNEED) failed");
                }
                self.pins.advised.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// How many read-ahead advice calls this store made.
    pub fn advised(&self) -> u64 {
        self.pins.advised.load(Ordering::Relaxed)
    }
}
