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
//! standby engine serves nothing until the state is in. A standby open
//! and a source's open racing for the freed volume are ordered by the
//! holder record's lock, which the standby open keeps for the whole of
//! its open (`store/engine/lease.rs`): the source, coming second, takes
//! the volume from it, never the other way round.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::store::engine::SlateStore;
use crate::store::{OpenError, Store as _};

/// How often the watcher looks at the holder record: a `stat`, about 3
/// µs; the source's release is seen within this.
pub const POLL: Duration = Duration::from_millis(1);

/// Opens the volume on standby (`crate::writeback::open_standby`).
pub type StandbyOpener = Box<dyn Fn() -> Result<SlateStore, OpenError> + Send + Sync>;

/// What the watcher and the slot share.
#[derive(Default)]
struct Shared {
    /// The engine opened on standby; the watcher holds the lock for the
    /// whole of its open, so a [`Standby::take`] waits for an open under
    /// way instead of racing it.
    ready: Mutex<Option<SlateStore>>,
    stop: AtomicBool,
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
                match open() {
                    Ok(engine) => {
                        info!(
                            volume = %engine.describe(),
                            ms = started.elapsed().as_secs_f64() * 1e3,
                            "volume opened on standby: its holder let it go; the guest's state is still to come"
                        );
                        *ready = Some(engine);
                        return;
                    }
                    // Another opener came first (its record is there again):
                    // wait for its release too.
                    Err(OpenError::Held { .. }) => {}
                    Err(e) => {
                        warn!(error = %crate::ErrorChain(&e), "could not open the volume on standby; it opens when the guest's state arrives");
                        return;
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }
}
