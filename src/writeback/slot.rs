//! The volume as the filesystem layer of `pohmelfs serve` sees it: a
//! [`Store`] that is open, or not open yet, or let go — what a live
//! migration's hand-over needs (`docs/migration.md`).
//!
//! * A daemon started with `--incoming` serves the vhost-user protocol
//!   before it opens the volume: the slot is [`Phase::Incoming`] until the
//!   migration state arrives, and then opens it ([`VolumeSlot::acquire`]),
//!   sparing the unlinked inodes the incoming session holds. On `file://`
//!   it opens the volume on standby as soon as the source lets it go,
//!   before the state (`standby.rs`), and the state's arrival finishes
//!   that open. A state that arrives while that open is under way, past
//!   its claim of the volume, is answered without waiting for it: the
//!   slot is [`Phase::Opening`] until the open ends, and guest requests
//!   wait for it ([`VolumeSlot::acquire_for_state`]).
//! * A migration's source lets the volume go once its state is out
//!   ([`VolumeSlot::release`]: everything written is stored, the engine
//!   closed and its holder record removed); the slot is then
//!   [`Phase::Released`], and opens the volume again only when asked to
//!   (a failed migration: the guest goes on here).
//!
//! An open waits while another live daemon holds the volume, polling its
//! holder record, for at most the slot's bound, and never takes the
//! volume over: only a holder that released it, exited, or (on another
//! host) let its lease run out gives way. The engine's writer epoch fences
//! an older writer in any case, so two daemons never both commit.
//!
//! While not open, every call fails (the filesystem answers EIO) except
//! `sync` and `flush`, which have nothing to wait for: nothing can be
//! committed through a slot that is not open.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{error, info};

use super::standby::{Progress, Standby, StandbyOpener};
use super::WritebackStore;
use crate::store::engine::SlateStore;
use crate::store::{
    Demand, Dirent, Inode, OpenError, ReadData, Store, StoreError, StoreStats, Txn, WriteData,
};

/// How long a waiting open first waits before it reads the holder record
/// again: a migration's source lets the volume go about when the
/// destination asks, and every millisecond here is downtime.
const HOLDER_POLL_FIRST: Duration = Duration::from_millis(2);
/// How long it waits at most between two reads (on `s3://` each is a
/// request).
const HOLDER_POLL: Duration = Duration::from_millis(20);
/// How long a migration's state waits for a standby open under way to
/// claim the volume (a millisecond or two) before it waits for the whole
/// open instead.
const CLAIM_WAIT: Duration = Duration::from_millis(500);

/// Opens the volume; the arguments: the orphans to spare, and the engine
/// a standby open made ready (`standby.rs`), if any.
pub type Opener =
    Box<dyn Fn(&[u64], Option<SlateStore>) -> Result<Arc<WritebackStore>, OpenError> + Send + Sync>;

/// Where the slot's volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Open: calls go to it.
    Open = 0,
    /// Not opened yet: waiting for a migration's state (`--incoming`).
    Incoming = 1,
    /// Let go after a migration's state went out.
    Released = 2,
    /// A migration's state is in and answered; the open it needs is
    /// still under way, its claim of the volume made.
    Opening = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Open,
            1 => Phase::Incoming,
            3 => Phase::Opening,
            _ => Phase::Released,
        }
    }
}

/// Why the slot could not open or release its volume.
#[derive(Debug, Error)]
pub enum SlotError {
    #[error("open the volume")]
    Open(#[source] OpenError),
    #[error(
        "the volume is still held by {holder} after waiting {waited_secs} s \
         (--incoming-timeout): the other daemon did not let it go"
    )]
    StillHeld { holder: String, waited_secs: u64 },
    #[error("store what the guest wrote before letting the volume go")]
    Close(#[source] StoreError),
    #[error("an open after the volume was let go gave up; the next frontend tries again")]
    GaveUp,
}

/// The volume of `pohmelfs serve`, open or not.
pub struct VolumeSlot {
    current: RwLock<Option<Arc<WritebackStore>>>,
    phase: AtomicU8,
    /// Set when an open after a release gave up; cleared by
    /// [`VolumeSlot::retry`] (a new frontend).
    gave_up: AtomicBool,
    /// Taken by opens and releases, one at a time.
    turn: Mutex<()>,
    opener: Opener,
    /// How long an open waits for another daemon's release.
    wait: Duration,
    /// The volume's URL, for logs while it is not open.
    url: String,
    /// A destination's watch for the source's release, with the engine it
    /// opened on standby ([`VolumeSlot::open_on_standby`]).
    standby: Mutex<Option<Standby>>,
    /// Opened for a migration's state, and no guest request served since
    /// ([`VolumeSlot::confirm`]).
    unconfirmed: AtomicBool,
    /// The thread finishing an open behind a migration's state
    /// ([`VolumeSlot::acquire_for_state`]). Never taken with `turn` held.
    behind: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why calls fail, in a phase other than [`Phase::Open`].
fn why_not_open(phase: Phase) -> &'static str {
    match phase {
        Phase::Incoming => "not open yet: waiting for the migration state (--incoming)",
        Phase::Opening => "still opening: the migration state is in",
        _ => "let go: a live migration handed it to another daemon",
    }
}

fn not_open(phase: Phase) -> StoreError {
    StoreError::Io(std::io::Error::other(format!(
        "the volume is {}",
        why_not_open(phase)
    )))
}

impl VolumeSlot {
    /// A slot holding the volume `store`, open already.
    pub fn holding(store: Arc<WritebackStore>, url: &str, opener: Opener, wait: Duration) -> Self {
        let slot = VolumeSlot::incoming(url, opener, wait);
        *slot.current.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
        slot.phase.store(Phase::Open as u8, Ordering::Release);
        slot
    }

    /// A slot that opens its volume only when a migration's state arrives.
    pub fn incoming(url: &str, opener: Opener, wait: Duration) -> Self {
        VolumeSlot {
            current: RwLock::new(None),
            phase: AtomicU8::new(Phase::Incoming as u8),
            gave_up: AtomicBool::new(false),
            turn: Mutex::new(()),
            opener,
            wait,
            url: url.to_string(),
            standby: Mutex::new(None),
            unconfirmed: AtomicBool::new(false),
            behind: Mutex::new(None),
        }
    }

    /// A guest request is served here: if the volume was opened for a
    /// migration's state, the migration is over and its guest runs here,
    /// so the volume is this daemon's for good (a standby open's record
    /// stops saying standby). Cheap once done.
    pub fn confirm(&self) {
        if self.unconfirmed.load(Ordering::Acquire)
            && self.unconfirmed.swap(false, Ordering::AcqRel)
        {
            if let Some(store) = self.read().as_deref() {
                store.promote_engine();
            }
            info!("migration: the guest runs here; the volume is this daemon's");
        }
    }

    /// Whether the volume was opened for a migration's state and no guest
    /// request was served since (the migration failed if the frontend
    /// goes now).
    pub fn unconfirmed(&self) -> bool {
        self.unconfirmed.load(Ordering::Acquire)
    }

    /// A destination (`--incoming`, a `file://` volume whose holder record
    /// is at `record`): open the volume on standby with `open` as soon as
    /// its holder lets it go, so that the state's arrival finds it open
    /// (`standby.rs`). A slot that is not waiting for a state ignores it.
    pub fn open_on_standby(&self, record: std::path::PathBuf, open: StandbyOpener) {
        let _turn = lock(&self.turn);
        if self.phase() != Phase::Incoming {
            return;
        }
        match Standby::watch(record, open) {
            Ok(standby) => *lock(&self.standby) = Some(standby),
            Err(e) => {
                tracing::warn!(error = %e, "no thread to watch for the volume's release in; it opens when the state arrives");
            }
        }
    }

    /// The daemon stops: stop watching, and close an engine open on
    /// standby (its holder record goes with it).
    pub fn end_standby(&self) {
        self.settle_behind();
        let standby = lock(&self.standby).take();
        if let Some(engine) = standby.and_then(|s| s.take()) {
            if let Err(e) = engine.close() {
                tracing::warn!(error = %crate::ErrorChain(&e), "the volume opened on standby did not close cleanly");
            }
        }
    }

    /// Whether an engine is open on standby (tests wait for it).
    #[cfg(test)]
    pub fn standby_ready(&self) -> bool {
        lock(&self.standby).as_ref().is_some_and(Standby::is_ready)
    }

    /// Where the volume is.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Whether an open after a release gave up (until [`Self::retry`]).
    pub fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
    }

    /// Let the next request try the open again (a new frontend).
    pub fn retry(&self) {
        self.gave_up.store(false, Ordering::Release);
    }

    /// The open volume's transaction layer, for the drain at shutdown.
    pub fn current(&self) -> Option<Arc<WritebackStore>> {
        self.read().clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, Option<Arc<WritebackStore>>> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the open volume, or fail.
    fn with<T>(
        &self,
        f: impl FnOnce(&WritebackStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self.read().as_deref() {
            Some(store) => f(store),
            None => Err(not_open(self.phase())),
        }
    }

    /// Open the volume unless it is open, sparing the orphans in `spare`
    /// from reclamation. While another live daemon holds it, wait for its
    /// release, at most the slot's bound. A failure after a release marks
    /// the slot [given up](Self::gave_up).
    pub fn acquire(&self, spare: &[u64]) -> Result<(), SlotError> {
        let _turn = lock(&self.turn);
        if self.read().is_some() {
            return Ok(());
        }
        // Requests that queued behind an open that gave up do not wait again.
        if self.phase() == Phase::Released && self.gave_up() {
            return Err(SlotError::GaveUp);
        }
        let started = Instant::now();
        let for_state = matches!(self.phase(), Phase::Incoming | Phase::Opening);
        let mut ready = lock(&self.standby).take().and_then(|s| s.take());
        let on_standby = ready.is_some();
        let mut told = false;
        let mut poll = HOLDER_POLL_FIRST;
        let opened = loop {
            let holder = match (self.opener)(spare, ready.take()) {
                Err(OpenError::Held { holder, .. }) => holder.to_string(),
                // A `pohmel://` volume's live writer (its claim), as the
                // store server names it.
                Err(OpenError::Claimed { writer, .. }) => writer
                    .strip_prefix(crate::net::WRITER_ALIVE)
                    .map_or(writer.clone(), str::to_owned),
                other => break other.map_err(SlotError::Open),
            };
            let waited = started.elapsed();
            if waited >= self.wait {
                break Err(SlotError::StillHeld {
                    holder,
                    waited_secs: waited.as_secs(),
                });
            }
            if !told {
                info!(%holder, wait_secs = self.wait.as_secs(), "waiting for the volume's holder to let it go");
                told = true;
            }
            std::thread::sleep(poll.min(self.wait - waited));
            poll = (poll * 2).min(HOLDER_POLL);
        };
        match opened {
            Ok(store) => {
                info!(store = %store.describe(), waited_ms = started.elapsed().as_millis() as u64, spared = spare.len(), on_standby, "volume open");
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
                self.unconfirmed.store(for_state, Ordering::Release);
                self.phase.store(Phase::Open as u8, Ordering::Release);
                self.gave_up.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                if self.phase() == Phase::Released {
                    self.gave_up.store(true, Ordering::Release);
                }
                Err(e)
            }
        }
    }

    /// Open the volume for a migration's state (`--incoming`), sparing
    /// the orphans in `spare`. A standby open under way that has claimed
    /// the volume (its record written and locked: no other daemon opens it
    /// now, and the source let it go with everything stored) is not waited
    /// for: it finishes on a thread of its own, the slot
    /// [`Phase::Opening`] until then, and guest requests wait for it
    /// ([`Self::settle_behind`]). QEMU's answer to the state, and the
    /// guest's start, need not wait for the engine's open (`docs/migration.md`).
    /// Otherwise as [`Self::acquire`].
    pub fn acquire_for_state(self: &Arc<Self>, spare: &[u64]) -> Result<(), SlotError> {
        let finisher = {
            let _turn = lock(&self.turn);
            let claimed = self.phase() == Phase::Incoming
                && lock(&self.standby)
                    .as_ref()
                    .is_some_and(|s| s.progress(CLAIM_WAIT) == Progress::Claimed);
            if claimed {
                let (slot, spare) = (Arc::clone(self), spare.to_vec());
                let spawned = std::thread::Builder::new()
                    .name("pohmelfs-open-behind".into())
                    .spawn(move || slot.finish_behind(&spare));
                match spawned {
                    Ok(thread) => {
                        self.phase.store(Phase::Opening as u8, Ordering::Release);
                        Some(thread)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no thread to finish the open in; the state waits for it");
                        None
                    }
                }
            } else {
                None
            }
        };
        match finisher {
            Some(thread) => {
                *lock(&self.behind) = Some(thread);
                info!("migration: the state is in; the volume's open, claimed, finishes behind it");
                Ok(())
            }
            None => self.acquire(spare),
        }
    }

    /// The open behind a migration's state: as [`Self::acquire`]; should
    /// it fail, guest requests try again, as after a migration that failed
    /// past the state ([`Phase::Released`]).
    fn finish_behind(&self, spare: &[u64]) {
        if let Err(e) = self.acquire(spare) {
            self.phase.store(Phase::Released as u8, Ordering::Release);
            error!(error = %crate::ErrorChain(&e), "migration: the volume's open behind the state failed; guest requests try it again");
        }
    }

    /// Wait for an open behind a migration's state, if one runs (bounded
    /// as the open is). Never called with `turn` held.
    pub fn settle_behind(&self) {
        let mut behind = lock(&self.behind);
        if let Some(thread) = behind.take() {
            if thread.join().is_err() {
                self.phase.store(Phase::Released as u8, Ordering::Release);
                error!("migration: the volume's open behind the state panicked; guest requests try it again");
            }
        }
    }

    /// A live migration began: get ahead of [`release`](Self::release)
    /// (`WritebackStore::prepare_close`). Nothing waits for it.
    pub fn prepare_release(&self) {
        if let Some(store) = self.read().as_deref() {
            store.prepare_close();
        }
    }

    /// Let the volume go: store everything written (bounded by the
    /// layer's `fsync_timeout`), close the engine (its holder record goes)
    /// and drop the layer. On an error the volume stays open here.
    pub fn release(&self) -> Result<(), SlotError> {
        self.settle_behind();
        let _turn = lock(&self.turn);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let Some(store) = current.as_ref() else {
            return Ok(());
        };
        store.close().map_err(SlotError::Close)?;
        let store = current.take();
        self.unconfirmed.store(false, Ordering::Release);
        self.phase.store(Phase::Released as u8, Ordering::Release);
        drop(current);
        info!(volume = %self.url, "volume let go: another daemon may open it");
        // The close let the volume go (the engine closed and its holder
        // record gone, or the store server's connection closed); ending
        // the layer's threads (2-3 ms) need not hold up the hand-over,
        // whose downtime runs until this returns.
        if let Some(store) = store {
            drop_aside(store, "pohmelfs-let-go");
        }
        Ok(())
    }
}

/// Drop `what` on a thread of its own named `name` (its threads' ends or
/// an engine's close need not hold the caller up), or here if no thread
/// can be had.
pub(super) fn drop_aside<T: Send + 'static>(what: T, name: &str) {
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || drop(what));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, thread = name, "no thread to drop in; dropping here");
    }
}

impl Store for VolumeSlot {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.with(|s| s.get_inode(ino))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        self.with(|s| s.lookup(parent, name))
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        self.with(|s| s.readdir(parent, after, max))
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.with(|s| s.read(ino, offset, buf))
    }

    fn read_data(&self, ino: u64, offset: u64, len: usize) -> Result<ReadData, StoreError> {
        self.with(|s| s.read_data(ino, offset, len))
    }

    /// The open volume's answer; a volume not open (yet, or any more)
    /// would make a request wait for it.
    fn would_not_wait(&self, demand: Demand) -> bool {
        self.read()
            .as_deref()
            .is_some_and(|s| s.would_not_wait(demand))
    }

    fn reads_locally(&self, ino: u64, offset: u64, len: u64) -> bool {
        self.read()
            .as_deref()
            .is_some_and(|s| s.reads_locally(ino, offset, len))
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        self.with(|s| s.next_data(ino, offset))
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.with(|s| s.next_hole(ino, offset))
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|s| s.readlink(ino))
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|s| s.get_xattr(ino, name))
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.with(|s| s.list_xattr(ino))
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.with(|s| s.statfs())
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        self.with(|s| s.reserve_ids(count))
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.with(|s| s.commit(txn))
    }

    fn write(
        &self,
        ino: u64,
        offset: u64,
        data: WriteData,
        inode: Inode,
    ) -> Result<(), StoreError> {
        self.with(|s| s.write(ino, offset, data, inode))
    }

    fn wait_for_room(&self, bytes: u64) -> Result<(), StoreError> {
        self.with(|s| s.wait_for_room(bytes))
    }

    /// Nothing is committed through a slot that is not open: nothing to
    /// wait for.
    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        match self.read().as_deref() {
            Some(s) => s.sync(ino),
            None => Ok(()),
        }
    }

    fn flush(&self, ino: u64) -> Result<(), StoreError> {
        match self.read().as_deref() {
            Some(s) => s.flush(ino),
            None => Ok(()),
        }
    }

    fn forgotten(&self, ino: u64) {
        if let Some(s) = self.read().as_deref() {
            s.forgotten(ino);
        }
    }

    fn describe(&self) -> String {
        match self.read().as_deref() {
            Some(s) => s.describe(),
            None => format!("{} ({})", self.url, why_not_open(self.phase())),
        }
    }

    fn snapshot(&self, name: &str) -> Result<String, StoreError> {
        self.with(|s| s.snapshot(name))
    }

    fn identity(&self) -> Option<crate::store::engine::VolumeIdentity> {
        self.read().as_deref().and_then(Store::identity)
    }
}
