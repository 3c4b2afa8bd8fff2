//! Read-ahead where every store read is a round trip (`pohmel://`,
//! `s3://`): a sequential reader gets the window after its read fetched
//! into the cache as clean pages, by several requests at once (chunks of
//! [`AHEAD_CHUNK_PAGES`], each on a read-ahead thread), so that a window of
//! at least twice the bandwidth-delay product is in flight, not one
//! request per round trip. A guest read of pages a chunk is fetching waits
//! for that chunk instead of asking the store again.
//!
//! Bounded: at most [`AHEAD_CHUNKS_MAX`] chunks in flight in the whole
//! layer (their bytes), as many threads at most ([`AheadWorkers`]: started
//! when chunks need them, reused by the next chunks, ended after
//! [`AHEAD_IDLE`] without work), and no page is asked for while a chunk
//! fetches it or the cache holds it.
//!
//! Cheap per READ: each reader's window is walked from where the last walk
//! stopped (a mark per inode, for the last [`AHEAD_MARKS_MAX`] inodes), not
//! from its start, so a reader that moves by a page does not look up the
//! thousand pages before it that are cached or in flight already.
//! It never holds the layer's lock across a store read, and never reads in
//! a guest's READ: the chunks run beside it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tracing::debug;

use super::ack::lock;
use super::cache::PAGE_SIZE;
use super::Shared;
use crate::store::StoreError;

/// Pages one read-ahead request fetches (512 KiB).
pub(super) const AHEAD_CHUNK_PAGES: u64 = 128;
/// Chunks in flight at most, in the whole layer (8 MiB).
pub(super) const AHEAD_CHUNKS_MAX: usize = 16;
/// The window a sequential reader gets at least, in bytes: twice the
/// bandwidth-delay product of 400 MiB/s at 5 ms.
pub(super) const AHEAD_WINDOW_MIN_BYTES: u64 = 4 << 20;

/// Inodes whose walk mark is remembered (the newest).
const AHEAD_MARKS_MAX: usize = 64;
/// How long a read-ahead thread waits for another chunk before it ends.
pub(super) const AHEAD_IDLE: Duration = Duration::from_secs(2);

/// A chunk to fetch: the layer (not kept alive by a waiting chunk), the
/// inode, its pages.
type Job = (Weak<Shared>, u64, Range<u64>);

/// The threads that fetch read-ahead chunks: a sequential reader's chunks
/// reuse them instead of starting a thread each (a thread start and end
/// per 512 KiB cost more than the chunk's own bookkeeping).
#[derive(Default)]
pub(super) struct AheadWorkers {
    queue: Mutex<WorkQueue>,
    work: Condvar,
}

#[derive(Default)]
struct WorkQueue {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    /// Threads started, ever.
    started: u64,
}

impl AheadWorkers {
    fn queue(&self) -> MutexGuard<'_, WorkQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a chunk; start a thread for it when no idle one will take it
    /// (at most [`AHEAD_CHUNKS_MAX`], the bound on chunks in flight). The
    /// jobs no thread can run are handed back, to be marked done.
    fn submit(self: &Arc<Self>, job: Job) -> Vec<Job> {
        let mut q = self.queue();
        q.jobs.push_back(job);
        self.work.notify_one();
        if q.jobs.len() <= q.idle || q.threads >= AHEAD_CHUNKS_MAX {
            return Vec::new();
        }
        q.threads += 1;
        q.started += 1;
        drop(q);
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("pohmelfs-ahead".into())
            .spawn(move || me.run());
        match spawned {
            Ok(_) => Vec::new(),
            Err(e) => {
                debug!(error = %e, "read-ahead thread not started");
                let mut q = self.queue();
                q.threads -= 1;
                // With no thread left, nothing would ever take them.
                if q.threads == 0 {
                    q.jobs.drain(..).collect()
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// A worker: fetch chunks until none came for [`AHEAD_IDLE`].
    fn run(&self) {
        let mut q = self.queue();
        loop {
            if let Some((shared, ino, pages)) = q.jobs.pop_front() {
                drop(q);
                if let Some(shared) = shared.upgrade() {
                    shared.fetch_chunk(ino, pages);
                }
                q = self.queue();
                continue;
            }
            q.idle += 1;
            let (guard, waited) = self
                .work
                .wait_timeout(q, AHEAD_IDLE)
                .unwrap_or_else(|e| e.into_inner());
            q = guard;
            q.idle -= 1;
            if waited.timed_out() && q.jobs.is_empty() {
                q.threads -= 1;
                return;
            }
        }
    }

    /// Threads running now, and started ever (tests).
    #[cfg(test)]
    pub(super) fn threads(&self) -> (usize, u64) {
        let q = self.queue();
        (q.threads, q.started)
    }
}

/// The chunks in flight, and where each reader's last walk stopped.
#[derive(Default)]
pub(super) struct Ahead {
    in_flight: Vec<(u64, Range<u64>)>,
    /// `(ino, page)`: when the inode's window was last walked, every page
    /// before `page` (down to that window's start) was cached or in
    /// flight. Newest last, at most [`AHEAD_MARKS_MAX`].
    marks: Vec<(u64, u64)>,
}

impl Ahead {
    /// The chunk in flight that covers a page of `pages` of `ino`.
    fn covering(&self, ino: u64, pages: &Range<u64>) -> Option<&Range<u64>> {
        self.in_flight
            .iter()
            .find(|(i, r)| *i == ino && r.start < pages.end && pages.start < r.end)
            .map(|(_, r)| r)
    }

    /// True when a chunk in flight covers a page of `pages` of `ino`.
    pub(super) fn overlaps(&self, ino: u64, pages: &Range<u64>) -> bool {
        self.covering(ino, pages).is_some()
    }

    /// Chunks of `window` to fetch now: the runs of pages neither `cached`
    /// nor in flight, cut into chunks, within the global bound. A last run
    /// shorter than a chunk waits, unless the window ends at the end of the
    /// file (`to_eof`): as the reader moves on, requests stay a chunk long.
    /// The walk starts at the inode's mark where the window holds it (a
    /// page evicted behind the mark is read by the guest's READ itself).
    fn take(
        &mut self,
        ino: u64,
        window: Range<u64>,
        cached: impl Fn(u64) -> bool,
        to_eof: bool,
    ) -> Vec<Range<u64>> {
        let mut chunks = Vec::new();
        let mark = self.marks.iter().position(|(i, _)| *i == ino);
        let mut p = match mark.map(|at| self.marks.remove(at).1) {
            Some(m) if (window.start..=window.end).contains(&m) => m,
            _ => window.start,
        };
        while p < window.end && self.in_flight.len() < AHEAD_CHUNKS_MAX {
            if let Some(r) = self.covering(ino, &(p..p + 1)) {
                p = r.end;
                continue;
            }
            if cached(p) {
                p += 1;
                continue;
            }
            let mut end = p + 1;
            while end < window.end
                && end - p < AHEAD_CHUNK_PAGES
                && !cached(end)
                && !self.overlaps(ino, &(end..end + 1))
            {
                end += 1;
            }
            if end == window.end && end - p < AHEAD_CHUNK_PAGES && !to_eof {
                break;
            }
            self.in_flight.push((ino, p..end));
            chunks.push(p..end);
            p = end;
        }
        if self.marks.len() == AHEAD_MARKS_MAX {
            self.marks.remove(0);
        }
        self.marks.push((ino, p));
        chunks
    }

    fn done(&mut self, ino: u64, pages: &Range<u64>) {
        if let Some(at) = self
            .in_flight
            .iter()
            .position(|(i, r)| *i == ino && r == pages)
        {
            self.in_flight.swap_remove(at);
        }
    }
}

impl Shared {
    /// Fetch the pages of `window` of `ino` the cache lacks, in chunks on
    /// the read-ahead threads; returns at once.
    pub(super) fn fetch_ahead(shared: &Arc<Shared>, ino: u64, window: Range<u64>, to_eof: bool) {
        let chunks = {
            let mut st = lock(&shared.state);
            let st = &mut *st;
            let cache = &st.cache;
            st.ahead
                .take(ino, window, |i| cache.contains(ino, i), to_eof)
        };
        for pages in chunks {
            let left = shared
                .ahead_workers
                .submit((Arc::downgrade(shared), ino, pages));
            if !left.is_empty() {
                let mut st = lock(&shared.state);
                for (_, ino, pages) in &left {
                    st.ahead.done(*ino, pages);
                }
                drop(st);
                shared.changed.notify_all();
            }
        }
    }

    /// One chunk: read it from the store and keep it as clean pages (where
    /// absent; partial pages take the bytes they lack). A failure is only
    /// logged: the guest's read asks the store again.
    fn fetch_chunk(&self, ino: u64, pages: Range<u64>) {
        // Nothing past the end of the file: a reader whose size the layer
        // does not remember (its attributes trimmed, or never asked) would
        // otherwise fetch a window of zeros. Asked here, off the guest's
        // path; the answer is remembered for the next chunks.
        let size = match self.current_inode(ino) {
            Ok(inode) => inode.map_or(0, |i| i.size),
            Err(e) => {
                debug!(ino, error = %e, "read-ahead: no size");
                0
            }
        };
        let end = pages.end.min(size.div_ceil(PAGE_SIZE));
        if end <= pages.start {
            lock(&self.state).ahead.done(ino, &pages);
            self.changed.notify_all();
            return;
        }
        let base = pages.start * PAGE_SIZE;
        let n = ((end - pages.start) * PAGE_SIZE) as usize;
        // Done in the same hold of the lock that keeps the pages: a reader
        // waiting for the chunk finds them.
        let kept = match self.read_store(ino, base, n) {
            Ok(Some((fetched, mut st, keep))) => {
                let kept = if keep {
                    self.keep_fetched(&mut st, ino, pages.start, &fetched)
                } else {
                    Ok(())
                };
                st.ahead.done(ino, &pages);
                kept
            }
            Ok(None) => {
                lock(&self.state).ahead.done(ino, &pages);
                Ok(())
            }
            Err(e) => {
                lock(&self.state).ahead.done(ino, &pages);
                Err(e)
            }
        };
        if let Err(e) = kept {
            debug!(ino, first = pages.start, error = %e, "read-ahead failed");
        }
        self.changed.notify_all();
    }

    /// Wait until no read-ahead chunk covers `pages` of `ino` (bounded by
    /// `fsync_timeout`, as every wait of the layer).
    pub(super) fn wait_for_ahead(&self, ino: u64, pages: Range<u64>) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        if !st.ahead.overlaps(ino, &pages) {
            return Ok(());
        }
        // The clock only for a read that waits: most never do.
        let started = std::time::Instant::now();
        let deadline = started + self.cfg.fsync_timeout;
        self.metrics.read_ahead_waits.inc();
        let _count = Elapsed(started, &self.metrics.read_ahead_wait_us);
        while st.ahead.overlaps(ino, &pages) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("read-ahead not done within {:?}", self.cfg.fsync_timeout),
                )));
            }
            st = super::ack::wait_timeout(&self.changed, st, left);
        }
        Ok(())
    }
}

/// Adds the microseconds since its start to a counter when dropped.
struct Elapsed<'a>(std::time::Instant, &'a crate::metrics::Counter);

impl Drop for Elapsed<'_> {
    fn drop(&mut self) {
        let us = self.0.elapsed().as_micros();
        self.1.add(u64::try_from(us).unwrap_or(u64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_bounded_and_never_asked_twice() {
        let mut a = Ahead::default();
        let window = 10..10 + 3 * AHEAD_CHUNK_PAGES;
        let chunks = a.take(1, window.clone(), |i| i < 12, true);
        assert_eq!(
            chunks.first().map(|r| r.start),
            Some(12),
            "cached pages skipped"
        );
        assert_eq!(chunks.last().map(|r| r.end), Some(window.end));
        assert!(a.overlaps(1, &(20..21)) && !a.overlaps(2, &(20..21)));
        assert!(
            a.take(1, window.clone(), |i| i < 12, true).is_empty(),
            "in flight already"
        );
        for r in &chunks {
            a.done(1, r);
        }
        assert!(!a.overlaps(1, &window));
        let many = a.take(2, 0..1000 * AHEAD_CHUNK_PAGES, |_| false, false);
        assert_eq!(many.len(), AHEAD_CHUNKS_MAX, "the global bound");
        for r in &many {
            a.done(2, r);
        }
        // Short of the end of the file, a run shorter than a chunk waits
        // until the window has moved on by a chunk.
        let short = 0..AHEAD_CHUNK_PAGES - 1;
        assert!(a.take(3, short.clone(), |_| false, false).is_empty());
        assert_eq!(a.take(3, short, |_| false, true).len(), 1);
    }

    #[test]
    fn a_moving_reader_is_walked_from_its_mark() {
        use std::cell::Cell;
        let mut a = Ahead::default();
        let looked = Cell::new(0u64);
        let window = |start: u64| start..start + 8 * AHEAD_CHUNK_PAGES;
        let first = a.take(
            1,
            window(0),
            |_| {
                looked.set(looked.get() + 1);
                false
            },
            false,
        );
        assert_eq!(first.len(), 8);
        for r in &first {
            a.done(1, r);
        }
        // The reader moved on by a chunk; everything behind the mark is
        // cached now, and only the new chunk is looked at.
        looked.set(0);
        let next = a.take(
            1,
            window(AHEAD_CHUNK_PAGES),
            |i| {
                looked.set(looked.get() + 1);
                i < 8 * AHEAD_CHUNK_PAGES
            },
            false,
        );
        assert_eq!(next, vec![8 * AHEAD_CHUNK_PAGES..9 * AHEAD_CHUNK_PAGES]);
        assert_eq!(looked.get(), AHEAD_CHUNK_PAGES, "no cached page looked up");
        // A reader that went back to the start is walked from its window's
        // start again: nothing it lacks is skipped.
        let back = a.take(1, window(0), |i| i >= 4, false);
        assert_eq!(back, vec![0..4]);
        // Marks are bounded.
        for ino in 100..100 + 2 * AHEAD_MARKS_MAX as u64 {
            a.take(ino, 0..1, |_| true, true);
        }
        assert_eq!(a.marks.len(), AHEAD_MARKS_MAX);
    }
}
