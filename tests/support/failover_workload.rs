//! The failover tests' workload: writes and fsyncs driven through the
//! transaction layer as the filesystem layer drives it, a model of what
//! each inode must hold, and the checks of a store against that model.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pohmelfs::check::torture::rng::Rng;
use pohmelfs::store::{Inode, Op, Store, Txn};
use pohmelfs::writeback::WritebackStore;
use pohmelfs_testkit::wait_until;

/// The inodes the workload writes, round robin.
pub const INODES: [u64; 4] = [1001, 1002, 1003, 1004];
/// Consecutive writes to one inode, as a guest writing a file in chunks.
pub const WRITES_PER_BURST: u64 = 3;
/// Writes between two fsyncs.
pub const WRITES_PER_SYNC: u64 = 6;
/// Files stop growing here; later writes overwrite.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The workload pauses for the kill after this many writes: in the middle
/// of a burst, after four fsyncs.
pub const PAUSE_AT_WRITE: u64 = 4 * WRITES_PER_SYNC + 1;
/// Fsyncs the workload completes after the fault before it stops.
pub const SYNCS_AFTER_FAULT: u64 = 4;
/// Bound on every wait for the workload or a process.
pub const WAIT: Duration = Duration::from_secs(120);

/// How often a wait polls its condition.
pub const POLL: Duration = Duration::from_millis(5);

/// One guest write.
#[derive(Clone)]
pub struct Write {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What the workload did to one inode, in order.
#[derive(Clone, Default)]
pub struct History {
    pub writes: Vec<Write>,
    /// How many of `writes` a successful fsync covered.
    pub synced: usize,
}

/// The content `writes` leave behind, as a POSIX file would hold it.
pub fn apply(content: &mut Vec<u8>, w: &Write) {
    let end = (w.offset as usize) + w.data.len();
    if content.len() < end {
        content.resize(end, 0);
    }
    content[w.offset as usize..end].copy_from_slice(&w.data);
}

/// A store call of the workload that took long (it waited for a server).
pub struct SlowCall {
    pub what: &'static str,
    pub start: Instant,
    pub end: Instant,
}

/// What the workload thread shares with the test.
#[derive(Default)]
pub struct Progress {
    pub histories: Mutex<BTreeMap<u64, History>>,
    pub writes: AtomicU64,
    pub syncs: AtomicU64,
    pub stop: AtomicBool,
    pub done: AtomicBool,
    /// Completion times of the fsyncs.
    pub sync_ends: Mutex<Vec<Instant>>,
    /// The store call the workload is in, and since when.
    pub current: Mutex<Option<(&'static str, Instant)>>,
    pub slow: Mutex<Vec<SlowCall>>,
    pub error: Mutex<Option<String>>,
}

impl Progress {
    pub fn begin(&self, what: &'static str) -> Instant {
        let start = Instant::now();
        *self.current.lock().unwrap() = Some((what, start));
        start
    }

    pub fn note(&self, what: &'static str, start: Instant) {
        *self.current.lock().unwrap() = None;
        let end = Instant::now();
        if end - start >= Duration::from_millis(100) {
            self.slow
                .lock()
                .unwrap()
                .push(SlowCall { what, start, end });
        }
    }

    /// Waits until the workload completed `syncs` fsyncs; panics if it failed
    /// or stalled.
    pub fn wait_for_syncs(&self, syncs: u64, why: &str) {
        let ok = wait_until(WAIT, POLL, || {
            self.syncs.load(Ordering::SeqCst) >= syncs || self.done.load(Ordering::SeqCst)
        })
        .is_some();
        if let Some(e) = self.error.lock().unwrap().as_ref() {
            panic!("the workload failed ({why}): {e}");
        }
        assert!(
            ok && self.syncs.load(Ordering::SeqCst) >= syncs,
            "the workload did not reach {syncs} fsyncs within {WAIT:?} ({why}); it has {}",
            self.syncs.load(Ordering::SeqCst)
        );
    }

    /// Waits until the workload has been stuck for `stuck` since `since` in
    /// one store call; returns which call.
    pub fn wait_until_stuck(&self, since: Instant, stuck: Duration) -> &'static str {
        let mut call = None;
        let ok = wait_until(WAIT, POLL, || {
            call = self
                .current
                .lock()
                .unwrap()
                .filter(|(_, start)| (*start).max(since).elapsed() >= stuck)
                .map(|(what, _)| what);
            call.is_some() || self.done.load(Ordering::SeqCst)
        })
        .is_some();
        if let Some(e) = self.error.lock().unwrap().as_ref() {
            panic!("the workload failed while the store was down: {e}");
        }
        match call {
            Some(what) if ok => what,
            _ => panic!("the workload never waited {stuck:?} for the dead store within {WAIT:?}"),
        }
    }

    pub fn snapshot(&self) -> BTreeMap<u64, History> {
        self.histories.lock().unwrap().clone()
    }
}

/// The filesystem layer's write: read the attributes, then one transaction
/// with the data and the new attributes.
pub fn fs_write(s: &dyn Store, ino: u64, w: &Write) -> Result<(), String> {
    let mut inode = s
        .get_inode(ino)
        .map_err(|e| format!("get_inode {ino}: {}", pohmelfs::ErrorChain(&e)))?
        .ok_or_else(|| format!("inode {ino} vanished"))?;
    inode.size = inode.size.max(w.offset + w.data.len() as u64);
    let mut t = Txn::new();
    t.push(Op::Write {
        ino,
        offset: w.offset,
        data: w.data.clone().into(),
    });
    t.push(Op::PutInode(inode));
    s.commit(t).map_err(|e| {
        format!(
            "write {} bytes at {} of {ino}: {}",
            w.data.len(),
            w.offset,
            pohmelfs::ErrorChain(&e)
        )
    })
}

/// Where the workload stops for the test to break something.
pub struct Pause {
    /// After this many writes.
    pub at: u64,
    pub paused: mpsc::Sender<()>,
    pub resume: mpsc::Receiver<()>,
}

/// Writes (mostly appends of odd lengths, some overwrites) in bursts of
/// [`WRITES_PER_BURST`], round robin over [`INODES`], with an fsync of the
/// inode just written every [`WRITES_PER_SYNC`] writes, until told to stop.
/// It waits once at `pause` until the test lets it go on.
pub fn workload(
    s: &dyn Store,
    p: &Progress,
    seed: u64,
    max_write: u64,
    pause: Pause,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    for ino in INODES {
        let mut t = Txn::new();
        t.push(Op::PutInode(Inode::regular(ino, 0)));
        s.commit(t)
            .map_err(|e| format!("create {ino}: {}", pohmelfs::ErrorChain(&e)))?;
        p.histories.lock().unwrap().insert(ino, History::default());
    }
    let mut sizes: BTreeMap<u64, u64> = INODES.iter().map(|&i| (i, 0)).collect();
    let mut n = 0u64;
    while !p.stop.load(Ordering::SeqCst) {
        let ino = INODES[((n / WRITES_PER_BURST) % INODES.len() as u64) as usize];
        let size = sizes[&ino];
        let len = 1 + rng.below(max_write);
        let offset = if size + len > MAX_FILE_BYTES || (size > 0 && rng.below(4) == 0) {
            rng.below(size.saturating_sub(len).max(1))
        } else {
            size
        };
        let data: Vec<u8> = (0..len)
            .map(|i| (n.wrapping_mul(131) ^ i.wrapping_mul(7) ^ ino) as u8)
            .collect();
        let w = Write { offset, data };
        // Recorded before the commit: a check allows any prefix of the
        // history, and a write not yet committed is simply not in the store.
        p.histories
            .lock()
            .unwrap()
            .get_mut(&ino)
            .expect("history")
            .writes
            .push(w.clone());
        let start = p.begin("write");
        fs_write(s, ino, &w)?;
        p.note("write", start);
        sizes.insert(ino, size.max(offset + len));
        p.writes.fetch_add(1, Ordering::SeqCst);
        n += 1;
        if n == pause.at {
            pause
                .paused
                .send(())
                .map_err(|_| "the test went away".to_string())?;
            pause
                .resume
                .recv_timeout(WAIT)
                .map_err(|e| format!("not resumed after the pause: {e}"))?;
        }
        if n % WRITES_PER_SYNC == 0 {
            let covered = p.histories.lock().unwrap()[&ino].writes.len();
            let start = p.begin("fsync");
            s.sync(Some(ino))
                .map_err(|e| format!("fsync {ino}: {}", pohmelfs::ErrorChain(&e)))?;
            p.note("fsync", start);
            p.sync_ends.lock().unwrap().push(Instant::now());
            if let Some(h) = p.histories.lock().unwrap().get_mut(&ino) {
                h.synced = h.synced.max(covered);
            }
            p.syncs.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// The workload on its thread, and the handles to pause it.
pub struct Worker {
    pub thread: std::thread::JoinHandle<()>,
    pub paused: mpsc::Receiver<()>,
    pub resume: mpsc::Sender<()>,
}

impl Worker {
    /// Runs [`workload`] on a thread, recording its error and its end.
    pub fn spawn(wb: Arc<WritebackStore>, p: Arc<Progress>, seed: u64, max_write: u64) -> Worker {
        let (paused_tx, paused) = mpsc::channel();
        let (resume, resume_rx) = mpsc::channel();
        let pause = Pause {
            at: PAUSE_AT_WRITE,
            paused: paused_tx,
            resume: resume_rx,
        };
        let thread = std::thread::spawn(move || {
            if let Err(e) = workload(&*wb, &p, seed, max_write, pause) {
                *p.error.lock().unwrap() = Some(e);
            }
            p.done.store(true, Ordering::SeqCst);
        });
        Worker {
            thread,
            paused,
            resume,
        }
    }

    /// Waits until the workload reached its pause.
    pub fn wait_paused(&self, p: &Progress) {
        if let Err(e) = self.paused.recv_timeout(WAIT) {
            panic!(
                "the workload did not reach its pause ({e}); error: {:?}",
                p.error.lock().unwrap()
            );
        }
    }

    pub fn resume(&self) {
        self.resume.send(()).expect("resume the workload");
    }

    /// Stops the workload and fails the test if it failed.
    pub fn finish(self, p: &Progress) {
        p.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("workload thread");
        if let Some(e) = p.error.lock().unwrap().as_ref() {
            panic!("the workload failed: {e}");
        }
    }
}

/// The content of `ino` in `s`.
pub fn content(s: &dyn Store, ino: u64) -> Vec<u8> {
    let size = s
        .get_inode(ino)
        .unwrap_or_else(|e| panic!("get_inode {ino}: {}", pohmelfs::ErrorChain(&e)))
        .unwrap_or_else(|| panic!("inode {ino} is not in the store"))
        .size;
    let mut buf = vec![0u8; size as usize];
    s.read(ino, 0, &mut buf)
        .unwrap_or_else(|e| panic!("read {ino}: {}", pohmelfs::ErrorChain(&e)));
    buf
}

/// What a crash may leave: for each inode, the effect of a prefix of its
/// writes (transactions apply whole and in order) at least as long as what
/// fsync covered. Returns, per inode, the length of the prefix found.
pub fn check_crash_state(s: &dyn Store, histories: &BTreeMap<u64, History>) -> Vec<(u64, usize)> {
    let mut found = Vec::new();
    for (&ino, h) in histories {
        let got = content(s, ino);
        let mut model = Vec::new();
        let mut matched = None;
        for k in 0..=h.writes.len() {
            if k > 0 {
                apply(&mut model, &h.writes[k - 1]);
            }
            if k >= h.synced && model == got {
                matched = Some(k);
                break;
            }
        }
        let Some(k) = matched else {
            let mut synced_model = Vec::new();
            for w in &h.writes[..h.synced] {
                apply(&mut synced_model, w);
            }
            let first_diff = got
                .iter()
                .zip(&synced_model)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(synced_model.len()));
            panic!(
                "inode {ino}: the store's {} bytes are no prefix of the {} writes at or past the \
                 {} an fsync covered (fsynced content has {} bytes; first difference at byte \
                 {first_diff})",
                got.len(),
                h.writes.len(),
                h.synced,
                synced_model.len()
            );
        };
        found.push((ino, k));
    }
    found
}

/// The final check: every inode equals its whole history.
pub fn check_final(s: &dyn Store, histories: &BTreeMap<u64, History>) {
    for (&ino, h) in histories {
        let mut model = Vec::new();
        for w in &h.writes {
            apply(&mut model, w);
        }
        let got = content(s, ino);
        assert_eq!(
            got.len(),
            model.len(),
            "inode {ino}: size after {} writes",
            h.writes.len()
        );
        if let Some(at) = got.iter().zip(&model).position(|(a, b)| a != b) {
            panic!(
                "inode {ino}: content differs from the model at byte {at} (of {}) after {} writes",
                model.len(),
                h.writes.len()
            );
        }
    }
}
