//! A migration's destination opens its `file://` volume on standby, ahead
//! of the guest's state (`docs/migration.md`).
//!
//! With dirty logging on, the source lets the volume go at the queues'
//! stop, while QEMU still makes its last pass over guest memory and the
//! other devices; the destination used to open it only when the state
//! arrived, and that open (its holder record, SlateDB's open with its
//! synced writes, the commit log's replay: 6-7 ms) was downtime. A
//! [`Standby`] watches the holder record (a `stat` every
//! [`POLL`]) and, once it is gone, opens the engine at once
//! (`OpenMode::Standby`): its record says standby, so any other writable
//! open takes the volume over from it, and the source whose guest runs
//! on after all (a failed or cancelled migration, a `stop` and `cont`)
//! gets its volume back without waiting. When the state arrives the slot
//! [takes](Standby::take) the engine if it is still the volume's
//! (record ours, engine not fenced) and finishes the open on it; the
//! record stops saying standby. Otherwise it opens as before.
//!
//! Before the open, nothing is written (the watcher only looks). The
//! standby engine serves nothing until the state is in. A state that
//! arrives while the open is under way need not wait for it once the
//! volume is claimed ([`Standby::progress`]): the slot answers the state
//! and the open finishes behind it (`slot.rs`). A standby open
//! and a source's open racing for the freed volume are ordered by the
//! holder record's lock, which the standby open keeps for the whole of
//! its open (`store/engine/lease.rs`): the source, coming second, takes
//! the volume from it, never the other way round.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::store::engine::SlateStore;
use crate::store::{OpenError, Store as _};

/// How often the watcher looks at the holder record: a `stat`, about 3
/// µs; the source's release is seen within this.
pub const POLL: Duration = Duration::from_millis(1);

/// Opens the volume on standby (`crate::writeback::open_standby`),
/// calling its argument once the volume is claimed for the open.
pub type StandbyOpener = Box<dyn Fn(&dyn Fn()) -> Result<SlateStore, OpenError> + Send + Sync>;

/// How far the standby open has got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Progress {
    /// The holder has not let the volume go (or the watch has ended
    /// without an open).
    #[default]
    Watching,
    /// The holder let it go; the open has not claimed it yet.
    Opening,
    /// The open claimed the volume (its record written and locked); the
    /// engine is still opening.
    Claimed,
    /// The engine is open on standby.
    Open,
}

/// What the watcher and the slot share.
#[derive(Default)]
struct Shared {
    /// The engine opened on standby; the watcher holds the lock for the
    /// whole of its open, so a [`Standby::take`] waits for an open under
    /// way instead of racing it.
    ready: Mutex<Option<SlateStore>>,
    stop: AtomicBool,
    progress: Mutex<Progress>,
    moved: Condvar,
}

impl Shared {
    fn set(&self, progress: Progress) {
        *lock(&self.progress) = progress;
        self.moved.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A destination's watch for the source's release, and the engine it
/// opened then.
pub struct Standby {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Standby {
    /// Watch the holder record at `record` (a `file://` volume's) and open
    /// the volume with `open` as soon as the record is gone.
    pub fn watch(record: PathBuf, open: StandbyOpener) -> std::io::Result<Standby> {
        let shared = Arc::new(Shared::default());
        let watcher = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pohmelfs-standby".into())
            .spawn(move || watch(&watcher, &record, &open))?;
        Ok(Standby {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stop watching; the engine opened on standby if it is still the
    /// volume's. One taken over since is closed on a thread of its own
    /// (the caller opens the volume anew meanwhile).
    pub fn take(&self) -> Option<SlateStore> {
        self.stop();
        let engine = lock(&self.shared.ready).take()?;
        if engine.still_held() {
            return Some(engine);
        }
        info!("the volume opened on standby was taken over meanwhile; opening it again");
        super::slot::drop_aside(engine, "pohmelfs-standby-end");
        None
    }

    /// How far the open has got, once it is past [`Progress::Opening`]
    /// or `bound` has passed: a claim takes a millisecond or two.
    pub fn progress(&self, bound: Duration) -> Progress {
        let deadline = Instant::now() + bound;
        let mut progress = lock(&self.shared.progress);
        while *progress == Progress::Opening {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            progress = self
                .shared
                .moved
                .wait_timeout(progress, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *progress
    }

    /// Whether an engine is open on standby (tests wait for it).
    #[cfg(test)]
    pub fn is_ready(&self) -> bool {
        self.shared
            .ready
            .try_lock()
            .is_ok_and(|ready| ready.is_some())
    }

    fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The watcher: until stopped or an engine is open on standby.
fn watch(shared: &Shared, record: &std::path::Path, open: &StandbyOpener) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = std::fs::symlink_metadata(record) {
            if e.kind() == std::io::ErrorKind::NotFound {
                let mut ready = lock(&shared.ready);
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let started = Instant::now();
                shared.set(Progress::Opening);
                match open(&|| shared.set(Progress::Claimed)) {
                    Ok(engine) => {
                        info!(
                            volume = %engine.describe(),
                            ms = started.elapsed().as_secs_f64() * 1e3,
                            "volume opened on standby: its holder let it go"
                        );
                        *ready = Some(engine);
                        shared.set(Progress::Open);
                        return;
                    }
                    // Another opener came first (its record is there again):
                    // wait for its release too.
                    Err(OpenError::Held { .. }) => shared.set(Progress::Watching),
                    Err(e) => {
                        shared.set(Progress::Watching);
                        warn!(error = %crate::ErrorChain(&e), "could not open the volume on standby; it opens when the guest's state arrives");
                        return;
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }
}
