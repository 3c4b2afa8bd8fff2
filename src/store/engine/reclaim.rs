//! Giving segment space back, off the commit path.
//!
//! A commit whose batch is durable hands what it freed (segment pages no
//! extent refers to any more, sealed segments with no live byte) to the
//! reclaimer thread and returns: its acknowledgement never waits for a
//! punch. The thread takes whatever has queued up, coalesces the ranges,
//! waits for a grace period (every read that began before it has left,
//! `pins.rs`: no read in flight can still name a page it punches), then
//! punches them (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) and deletes the
//! emptied segments. Reads never wait for any of this: a grace period that
//! does not end within [`GRACE_MAX`] (a read holding its pieces that long)
//! sets the batch aside for the next round.
//!
//! A segment file with more than one link is shared with a snapshot or a
//! clone (`snapshot.rs`): its dead pages are not punched but noted as
//! deferred (`shared.rs`), and reclaimed once the file is this volume's
//! alone again. Deleting an emptied segment only drops this volume's name.
//!
//! This module never decides what is dead; it is told, and only ever
//! after the batch that made it dead is durable. A failure leaks space
//! (reported by `pohmelfs check`), never data, so it is logged. Closing
//! the volume drains the queue, except when a live migration hands the
//! volume over: with the guest stopped, punching a second's worth of a
//! fast writer's dead pages took 2-9 ms of the downtime, so the source
//! writes what is queued to [`HANDED_FILE`] instead, and the next open's
//! reclaimer frees it about a second later, off the hand-over.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::pins::Readers;
use super::segment::{self, Segments};
use super::shared::Deferred;

/// How long one round waits for the reads that began before it.
const GRACE_MAX: Duration = Duration::from_secs(5);
/// How soon a batch set aside (its grace period did not end) is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The queue a hand-over left (in the segment directory): `d SEG START
/// END` and `e SEG` lines, in hex. Written without a sync: a crash loses
/// at most pages to punch, which `check` then reports as leaked, as after
/// any crash.
pub const HANDED_FILE: &str = "handed";

/// The most a handed-over queue may hold: a second of a fast writer's
/// frees is a few thousand lines; anything larger is not ours.
const HANDED_MAX_BYTES: u64 = 16 << 20;

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

    /// The [`HANDED_FILE`] text of `self`.
    fn encode(&self) -> String {
        let mut out = String::new();
        for (seg, ranges) in &self.dead {
            for r in ranges {
                out.push_str(&format!("d {seg:x} {:x} {:x}\n", r.start, r.end));
            }
        }
        for seg in &self.emptied {
            out.push_str(&format!("e {seg:x}\n"));
        }
        out
    }

    /// Parse [`HANDED_FILE`] text; `Err` names the first line that is not
    /// one of ours.
    fn decode(text: &str) -> Result<Reclaim, String> {
        let hex = |f: Option<&str>| f.and_then(|f| u64::from_str_radix(f, 16).ok());
        let mut r = Reclaim::default();
        for (n, line) in text.lines().enumerate() {
            let mut f = line.split(' ');
            match (
                f.next(),
                hex(f.next()),
                hex(f.next()),
                hex(f.next()),
                f.next(),
            ) {
                (Some("d"), Some(seg), Some(start), Some(end), None) if start < end => {
                    r.dead.entry(seg).or_default().push(start..end);
                }
                (Some("e"), Some(seg), None, None, None) => r.emptied.push(seg),
                _ => return Err(format!("line {}: {line:?}", n + 1)),
            }
        }
        Ok(r)
    }

    pub fn absorb(&mut self, other: Reclaim) {
        for (seg, ranges) in other.dead {
            self.dead.entry(seg).or_default().extend(ranges);
        }
        self.emptied.extend(other.emptied);
    }
}

enum Job {
    Free(Reclaim),
    /// Write what is queued, and this, to [`HANDED_FILE`] instead of
    /// freeing it, and end.
    HandOver(Reclaim),
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

/// Reclaim `r` once no read in flight can name its pages; `Err(r)` when
/// the grace period did not end within [`GRACE_MAX`] (nothing done).
fn free(
    segs: &Segments,
    readers: &Readers,
    r: Reclaim,
    deferred: &mut Deferred,
    volume: &str,
) -> Result<(), Reclaim> {
    if !readers.grace(GRACE_MAX) {
        return Err(r);
    }
    let mut work = Vec::new();
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
        match segs.handle(seg) {
            Ok(f) => work.push((f, coalesce(ranges))),
            Err(e) => {
                tracing::warn!(volume, segment = seg, error = %e, "punching dead segment pages failed");
            }
        }
    }
    punch_all(&work);
    for seg in r.emptied {
        // Unlinking only drops this volume's name: a snapshot or clone
        // that shares the file keeps it.
        deferred.remove(seg);
        if let Err(e) = segs.remove(seg) {
            tracing::warn!(volume, segment = seg, error = %e, "deleting an emptied segment failed");
        }
    }
    Ok(())
}

fn run(rx: mpsc::Receiver<Job>, segs: Arc<Segments>, readers: Arc<Readers>, volume: String) {
    let mut deferred = Deferred::load(segs.dir(), &volume);
    // A batch whose grace period did not end, and the barriers behind it.
    // What a hand-over left starts out set aside: it is freed on the
    // first round, within a second, not during the open that follows it.
    let mut waiting = load_handed(segs.dir(), &volume);
    // The file goes once its pages are freed: until then a crash leaves
    // it for the next open (freeing twice is harmless).
    let mut handed_file = !waiting.is_empty();
    let mut barriers = Vec::new();
    let mut handing_over = false;
    loop {
        let first = if waiting.is_empty() {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(RETRY_EVERY) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        let mut batch = std::mem::take(&mut waiting);
        let mut next = first;
        // Take whatever else has queued: one grace period, one punch per
        // range.
        while let Some(job) = next {
            match job {
                Job::Free(r) => batch.absorb(r),
                Job::HandOver(r) => {
                    batch.absorb(r);
                    handing_over = true;
                }
                Job::Barrier(done) => barriers.push(done),
            }
            next = rx.try_recv().ok();
        }
        if handing_over {
            // What cannot be handed over is freed here, as a close does.
            match save_handed(segs.dir(), &mut batch, &volume) {
                Ok(()) => return,
                Err(back) => {
                    waiting = back;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            match free(&segs, &readers, batch, &mut deferred, &volume) {
                Ok(()) => {
                    deferred.save(&volume);
                    if std::mem::take(&mut handed_file) {
                        remove_handed(segs.dir(), &volume);
                    }
                }
                Err(back) => waiting = back,
            }
        }
        if waiting.is_empty() {
            for done in barriers.drain(..) {
                let _ = done.send(());
            }
        }
    }
    // Closing: one last try for what was set aside.
    if !waiting.is_empty() {
        let n: usize = waiting.dead.values().map(Vec::len).sum();
        match free(&segs, &readers, waiting, &mut deferred, &volume) {
            Ok(()) => {
                deferred.save(&volume);
                if handed_file {
                    remove_handed(segs.dir(), &volume);
                }
            }
            Err(_) => tracing::warn!(
                volume,
                ranges = n,
                "reads still in flight at close; dead segment pages left unpunched (pohmelfs check reports them)"
            ),
        }
    }
}

/// Write `r`, its ranges coalesced, to [`HANDED_FILE`] in `dir` (a new
/// file renamed over any old one); `Err` gives it back when it is over
/// [`HANDED_MAX_BYTES`] or the write failed.
fn save_handed(dir: &Path, r: &mut Reclaim, volume: &str) -> Result<(), Reclaim> {
    if r.is_empty() {
        return Ok(());
    }
    for ranges in r.dead.values_mut() {
        *ranges = coalesce(std::mem::take(ranges));
    }
    let text = r.encode();
    if text.len() as u64 > HANDED_MAX_BYTES {
        tracing::info!(
            volume,
            bytes = text.len(),
            "too many dead segment pages to hand over; punching them now"
        );
        return Err(std::mem::take(r));
    }
    let path = dir.join(HANDED_FILE);
    let tmp = path.with_extension("tmp");
    match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
        Ok(()) => {
            let ranges: usize = r.dead.values().map(Vec::len).sum();
            tracing::info!(
                volume,
                ranges,
                emptied = r.emptied.len(),
                "dead segment pages handed to the next open"
            );
            Ok(())
        }
        Err(e) => {
            tracing::warn!(volume, error = %e, "handing dead segment pages over failed; punching them now");
            Err(std::mem::take(r))
        }
    }
}

/// The queue a hand-over left in `dir` ([`HANDED_FILE`]), if any; `Err`
/// says why the file is unreadable or not ours.
pub fn read_handed(dir: &Path) -> Result<Reclaim, String> {
    let read = std::fs::File::open(dir.join(HANDED_FILE)).and_then(|f| {
        let mut text = String::new();
        f.take(HANDED_MAX_BYTES + 1).read_to_string(&mut text)?;
        Ok(text)
    });
    match read {
        Ok(text) if text.len() as u64 > HANDED_MAX_BYTES => {
            Err(format!("over {HANDED_MAX_BYTES} bytes"))
        }
        Ok(text) => Reclaim::decode(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Reclaim::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// What a hand-over left in `dir`; a file that is not ours is removed
/// (its pages stay unpunched, as after a crash).
fn load_handed(dir: &Path, volume: &str) -> Reclaim {
    read_handed(dir).unwrap_or_else(|e| {
        tracing::warn!(volume, error = %e, "the list of handed-over dead pages is unreadable or not ours; they stay unpunched");
        remove_handed(dir, volume);
        Reclaim::default()
    })
}

fn remove_handed(dir: &Path, volume: &str) {
    match std::fs::remove_file(dir.join(HANDED_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(volume, error = %e, "removing the list of handed-over dead pages failed");
        }
        _ => {}
    }
}

impl Reclaimer {
    /// Start the thread for the segments `segs`, whose reads enter
    /// `readers`' epochs.
    pub fn start(
        segs: Arc<Segments>,
        readers: Arc<Readers>,
        volume: String,
    ) -> std::io::Result<Reclaimer> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pohmelfs-reclaim".into())
            .spawn(move || {
                // Nothing waits for it: a commit's ack never does, and its
                // backlog is bounded by what the commits it follows freed.
                super::threads::lower_priority(super::threads::current());
                run(rx, segs, readers, volume)
            })?;
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
        self.join();
    }

    /// A live migration's hand-over: write what is queued, and `last`
    /// (what the final checkpoint freed), to [`HANDED_FILE`] for the next
    /// open, and end the thread. Waits for a round under way, if any.
    pub fn hand_over(&self, last: Reclaim) {
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(Job::HandOver(last));
        }
        self.join();
    }

    fn join(&self) {
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

    /// The nice value of every thread of this process named `name`
    /// (`/proc/self/task/*/comm`, cut to 15 bytes as the kernel keeps it).
    fn nice_of(name: &str) -> Vec<i64> {
        let short = &name[..name.len().min(15)];
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != short {
                continue;
            }
            let tid = task.file_name().to_string_lossy().parse().unwrap();
            out.extend(super::super::threads::tests::nice_of(tid));
        }
        out
    }

    #[test]
    fn the_reclaimer_runs_at_the_lowest_priority() {
        let dir = tempfile::tempdir().unwrap();
        let segs =
            std::sync::Arc::new(super::Segments::open_with_max(dir.path(), 1 << 20).unwrap());
        let r = super::Reclaimer::start(segs, Default::default(), "test".into()).unwrap();
        // The thread sets its priority before it takes its first job.
        r.barrier();
        let nice = nice_of("pohmelfs-reclaim");
        assert!(!nice.is_empty(), "no reclaimer thread found");
        assert!(
            nice.iter()
                .all(|&n| n == i64::from(super::super::threads::BACKGROUND_NICE)),
            "{nice:?}"
        );
        r.stop();
    }

    #[test]
    fn a_handed_queue_reads_back_and_garbage_is_refused() {
        let mut r = super::Reclaim::default();
        r.dead.insert(3, vec![0..4096, 8192..16384]);
        r.dead
            .insert(0x1f, vec![4096..8192, 1 << 20..(1 << 20) + 4096]);
        r.emptied.push(2);
        let back = super::Reclaim::decode(&r.encode()).unwrap();
        assert_eq!(back.dead, r.dead);
        assert_eq!(back.emptied, r.emptied);
        for bad in [
            "d 3 10 10",
            "d 3 10",
            "e",
            "x 1",
            "d 3 0 10 7",
            "e zz",
            "d -1 0 10",
        ] {
            assert!(super::Reclaim::decode(bad).is_err(), "{bad:?}");
        }
        // A file that is not ours is dropped, and frees nothing.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(super::HANDED_FILE);
        std::fs::write(&path, "d 1 0 1000\nnonsense\n").unwrap();
        assert!(super::load_handed(dir.path(), "test").is_empty());
        assert!(!path.exists());
    }

    #[test]
    fn a_queue_too_large_to_hand_over_is_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = super::Reclaim::default();
        // A million separate pages: over the bound once written out.
        let pages: Vec<_> = (0..1u64 << 20)
            .map(|i| (i * 8192 + (1 << 32))..(i * 8192 + (1 << 32) + 4096))
            .collect();
        r.dead.insert(7, pages.clone());
        let back = super::save_handed(dir.path(), &mut r, "test").unwrap_err();
        assert_eq!(back.dead[&7], pages);
        assert!(!dir.path().join(super::HANDED_FILE).exists());
        // Touching ranges are written as one.
        let mut r = super::Reclaim::default();
        r.dead.insert(7, vec![8192..12288, 0..4096, 4096..8192]);
        super::save_handed(dir.path(), &mut r, "test").unwrap();
        let text = std::fs::read_to_string(dir.path().join(super::HANDED_FILE)).unwrap();
        assert_eq!(text, "d 7 0 3000\n");
    }

    #[test]
    fn ranges_coalesce() {
        assert_eq!(
            coalesce(vec![8..12, 0..4, 4..6, 10..16, 20..24]),
            vec![0..6, 8..16, 20..24]
        );
    }
}
