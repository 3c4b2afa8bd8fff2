//! Giving segment space back, off the commit path.
//!
//! A commit whose batch is durable hands what it freed (segment pages no
//! extent refers to any more, sealed segments with no live byte) to the
//! reclaimer thread and returns: its acknowledgement never waits for a
//! punch. The thread takes whatever has queued up, coalesces the ranges,
//! and punches them (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) and deletes the
//! emptied segments while holding the engine's reclaim lock exclusively,
//! so no read is between looking up an extent and reading its bytes.
//!
//! A segment file with more than one link is shared with a snapshot or a
//! clone (`snapshot.rs`): its dead pages are not punched but noted as
//! deferred (`shared.rs`), and reclaimed once the file is this volume's
//! alone again. Deleting an emptied segment only drops this volume's name.
//!
//! This module never decides what is dead; it is told, and only ever
//! after the batch that made it dead is durable. A failure leaks space
//! (reported by `pohmelfs check`), never data, so it is logged. Closing
//! the volume drains the queue.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use super::pins::Pins;
use super::segment::Segments;
use super::shared::Deferred;

/// What one or more durable batches freed.
#[derive(Debug, Default)]
pub struct Reclaim {
    /// Segment pages no extent refers to, per segment.
    pub dead: BTreeMap<u64, Vec<Range<u64>>>,
    /// Sealed segments with no live byte left.
    pub emptied: Vec<u64>,
}

impl Reclaim {
    pub fn is_empty(&self) -> bool {
        self.dead.is_empty() && self.emptied.is_empty()
    }

    fn absorb(&mut self, other: Reclaim) {
        for (seg, ranges) in other.dead {
            self.dead.entry(seg).or_default().extend(ranges);
        }
        self.emptied.extend(other.emptied);
    }
}

enum Job {
    Free(Reclaim),
    /// Answered once every job sent before it is done.
    #[cfg_attr(not(test), allow(dead_code))]
    Barrier(mpsc::Sender<()>),
}

/// The reclaimer thread of one volume.
pub struct Reclaimer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sorted, with touching and overlapping ranges joined.
fn coalesce(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The engine's reclaim lock, which readers hold shared, and the pins of
/// file pieces handed out by reads, which outlive it.
struct Readers {
    exclusive: Arc<RwLock<()>>,
    pins: Arc<Pins>,
}

fn free(segs: &Segments, readers: &Readers, r: Reclaim, deferred: &mut Deferred, volume: &str) {
    let _no_readers = readers.exclusive.write().unwrap_or_else(|e| e.into_inner());
    for (seg, ranges) in r.dead {
        if r.emptied.contains(&seg) {
            continue;
        }
        // A snapshot or clone that shares the file may still refer to
        // these pages: never punch a file with another link. Its pages
        // are reclaimed once it is ours alone again (`shared.rs`).
        match segs.links(seg) {
            Ok(1) => deferred.remove(seg),
            Ok(_) => {
                deferred.insert(seg);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                deferred.remove(seg);
                continue;
            }
            Err(e) => {
                tracing::warn!(volume, segment = seg, error = %e, "reading a segment's link count failed; its dead pages stay");
                continue;
            }
        }
        // A read's file piece may still name these pages: the punch waits
        // for the last pin (`pins.rs`). A deleted segment needs no wait:
        // an open handle keeps its bytes readable.
        let punched = segs
            .handle(seg)
            .map(|f| readers.pins.punch_or_defer(f, &coalesce(ranges)));
        if let Err(e) = punched {
            tracing::warn!(volume, segment = seg, error = %e, "punching dead segment pages failed");
        }
    }
    for seg in r.emptied {
        // Unlinking only drops this volume's name: a snapshot or clone
        // that shares the file keeps it.
        deferred.remove(seg);
        if let Err(e) = segs.remove(seg) {
            tracing::warn!(volume, segment = seg, error = %e, "deleting an emptied segment failed");
        }
    }
}

fn run(rx: mpsc::Receiver<Job>, segs: Arc<Segments>, readers: Readers, volume: String) {
    let mut deferred = Deferred::load(segs.dir(), &volume);
    while let Ok(first) = rx.recv() {
        let mut batch = Reclaim::default();
        let mut barriers = Vec::new();
        let mut next = Some(first);
        // Take whatever else has queued: one lock, one punch per range.
        while let Some(job) = next {
            match job {
                Job::Free(r) => batch.absorb(r),
                Job::Barrier(done) => barriers.push(done),
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            free(&segs, &readers, batch, &mut deferred, &volume);
            deferred.save(&volume);
        }
        for done in barriers {
            let _ = done.send(());
        }
    }
}

impl Reclaimer {
    /// Start the thread for the segments `segs`, whose readers hold
    /// `exclusive` shared and `pins` on the file pieces they hand out.
    pub fn start(
        segs: Arc<Segments>,
        exclusive: Arc<RwLock<()>>,
        pins: Arc<Pins>,
        volume: String,
    ) -> std::io::Result<Reclaimer> {
        let (tx, rx) = mpsc::channel();
        let readers = Readers { exclusive, pins };
        let thread = std::thread::Builder::new()
            .name("pohmelfs-reclaim".into())
            .spawn(move || run(rx, segs, readers, volume))?;
        Ok(Reclaimer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queue what a durable batch freed.
    pub fn send(&self, r: Reclaim) {
        if r.is_empty() {
            return;
        }
        if let Some(tx) = lock(&self.tx).as_ref() {
            // The thread only ends once the sender is dropped.
            let _ = tx.send(Job::Free(r));
        }
    }

    /// Return once everything queued before the call is done.
    #[cfg(test)]
    pub fn barrier(&self) {
        let (done, wait) = mpsc::channel();
        let sent = lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(Job::Barrier(done)).is_ok());
        if sent {
            let _ = wait.recv();
        }
    }

    /// Finish what is queued and end the thread.
    pub fn stop(&self) {
        drop(lock(&self.tx).take());
        if let Some(t) = lock(&self.thread).take() {
            if t.join().is_err() {
                tracing::warn!("the segment reclaimer panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::coalesce;

    #[test]
    fn ranges_coalesce() {
        assert_eq!(
            coalesce(vec![8..12, 0..4, 4..6, 10..16, 20..24]),
            vec![0..6, 8..16, 20..24]
        );
    }
}
