//! Transactions and the tagged page cache: the heart of POHMELFS, in the
//! daemon. [`WritebackStore`] sits between the filesystem layer and a store
//! and is itself a [`Store`], so the filesystem layer does not know it is
//! there.
//!
//! * A guest WRITE's bytes become 4 KiB daemon pages (the filesystem layer
//!   reads them from the guest once, into page-aligned buffers that the
//!   cache adopts as pages) and it completes then (write-back). Every dirty page is tagged with the transaction
//!   that carries it; a page can carry two tags while one version is in
//!   flight and a newer one is queued.
//! * A transaction is formed as soon as pages get dirty (one per write, or
//!   merged into the inode's queued transaction up to `max_txn_bytes`), so
//!   acks usually arrive before anyone waits for them. Metadata changes
//!   (create, unlink, rename, setattr, xattrs, ...) travel in transactions
//!   too, ordered with the data of the same inodes: a transaction is sent
//!   only when it is the oldest unacknowledged one of every inode it
//!   touches, so the store never applies an older version of a byte after
//!   a newer one, across resends and failover. Metadata changes are
//!   write-back like data (reads see them at once through an overlay);
//!   a new metadata transaction lingers `meta_linger` past the newest
//!   change that joined it (bounded from its forming) so that the changes
//!   after it, and the first write of a file it creates, join it: a burst
//!   of creates (with their first writes and closes) or unlinks in one
//!   directory is one commit. Truncates and punched holes are
//!   write-back too: the ranges they zero read as zeros (the `Holes`
//!   overlay) until their ack, and the pages a truncate drops leave the
//!   older transactions that carried them. Only writes in another shape
//!   than the filesystem layer's wait for their ack.
//! * When sent, a transaction pins the page buffers it carries, by
//!   reference: its `Op::Write`s are lists of those buffers, built outside
//!   the state lock, and every resend carries the same ones. A guest write
//!   to a pinned page either waits for the ack (`wait`, the original
//!   POHMELFS choice) or gives the page a new buffer (`cow`).
//! * A transaction stays in memory until the store acknowledges it
//!   durable. On a timeout it is resent (same id: the store applies it
//!   once), after `attempts_per_server` timeouts or an error that says "go
//!   elsewhere" it moves to the next server, and when an ack carries a new
//!   durability epoch everything unacknowledged is resent. It is never
//!   dropped: fsync reports EIO after `fsync_timeout`, and that error stays
//!   until the inode's data is durable. A transaction the store refuses for
//!   lack of space loses its page data instead (`ack.rs`): the inode's next
//!   fsync, flush or syncfs reports ENOSPC, and new writes get ENOSPC until
//!   space is freed.
//! * `sync` (fsync, fdatasync, fsyncdir, syncfs, disconnect, SIGTERM)
//!   finds the transactions that refer to the inode's pages (or all), sends
//!   what is queued at once, resends what stalled, and waits for the acks.
//!   A close (FLUSH, RELEASE) returns at once, reporting only errors
//!   already known, and leaves a lingering transaction to its linger (the
//!   next file of the burst joins it); with `sync_on_close` it waits as
//!   fsync does.
//!
//! * Every transaction fits one wire frame (bounds in `queue.rs`, checked
//!   at compile time); the bytes of metadata changes count toward
//!   `dirty_max_bytes` like pages; no wait outlasts `fsync_timeout`.
//!
//! It must never report success for data that was not stored, and never
//! lose a transaction without a log line. When its own state contradicts
//! itself it aborts the daemon rather than go on.
//!
//! # Layout
//! * `mod.rs`: settings, the layer's state, shutting down; `open.rs`:
//!   opening a volume of any kind behind it;
//! * `reads.rs`: the layer as a [`Store`]: reads through the cache and the
//!   overlay (answered by reference), the rest handed on; `ahead.rs`:
//!   parallel read-ahead where every store read is a round trip;
//!   `listing.rs`: directory listings read ahead there;
//! * `write.rs`: the write path (pages and their tags) and the metadata path;
//! * `queue.rs`: unacknowledged transactions in their per-inode order;
//! * `sender.rs`: sends what may go; `ack.rs`: what an attempt's end does;
//! * `sync.rs`: waiting for acks (fsync, syncfs) and closing (flush);
//! * `overlay.rs`: the namespace overlay and what is known without the store;
//!   `names.rs`: directory entries known without the store;
//! * `cache.rs`: the tagged pages; `partial.rs`: the bytes a page written
//!   in part holds, where the store has the rest;
//! * `budget.rs`: how `--cache-size` is split between pages, metadata
//!   caches and the embedded engine;
//! * `slot.rs`: the layer as `serve` holds it, open or not (a live
//!   migration's hand-over of the volume).
//!
//! The layer sends through a [`Sink`] (`store/sink.rs`), which the stores
//! implement: imports point one way, from here to the store.

mod ack;
mod ahead;
#[cfg(test)]
mod ahead_tests;
mod budget;
#[cfg(test)]
mod burst_tests;
mod cache;
#[cfg(test)]
mod close_tests;
#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod conformance_tests;
#[cfg(test)]
mod copy_tests;
#[cfg(test)]
mod differential_tests;
#[cfg(test)]
mod drain_tests;
#[cfg(test)]
mod jam_tests;
#[cfg(test)]
mod linger_tests;
mod listing;
#[cfg(test)]
mod metadata_tests;
mod names;
#[cfg(test)]
mod no_space_tests;
#[cfg(test)]
mod offline_tests;
mod open;
mod overlay;
mod partial;
mod queue;
mod reads;
mod sender;
pub mod slot;
pub mod standby;
mod sync;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::error;

use crate::metrics::Metrics;
use crate::store::sink::Sink;
use crate::store::{Dirent, Store, StoreError};
use ack::{lock, StateLock};
use budget::MetaShares;
pub use budget::{CacheUsage, MemoryBudget};
use cache::PageCache;
use names::KnownNames;
pub use open::{open, open_as, open_from, open_sparing, open_standby, open_with_cache};
use overlay::{CompleteDirs, Holes, KnownXattrs, NameOverlay, Overlay};
use queue::TxnEntry;
use sender::pump;

/// A sync whose inode's unsent write transaction holds at most this many
/// bytes (two pages) counts as a sync after about one write (`sync.rs`).
pub(crate) const EAGER_SYNC_BYTES: u64 = 8192;
/// Inodes remembered as synced after about one write, at most (~40 KiB);
/// past it the set starts again empty.
pub(crate) const EAGER_SYNC_MAX: usize = 4096;

/// What a guest write does to a page an in-flight transaction carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OverwritePolicy {
    /// Wait until the transaction is acknowledged, then write in place.
    Wait,
    /// Copy the page into a new buffer; the old one stays with the
    /// transaction until its ack.
    Cow,
}

/// Settings of the transaction layer.
#[derive(Clone, Debug)]
pub struct TxnConfig {
    pub overwrite: OverwritePolicy,
    /// All page memory, clean and dirty (the page share of `--cache-size`,
    /// see [`MemoryBudget`]).
    pub cache_bytes: u64,
    /// The metadata caches: inode attributes, names of directories created
    /// in this session, extended attributes, read positions (the metadata
    /// share of `--cache-size`).
    pub meta_cache_bytes: u64,
    /// The embedded engine's memtables and block caches (`file://`,
    /// `s3://`), unless the URL names its own `memory=`; 0 leaves the
    /// engine's default.
    pub engine_cache_bytes: u64,
    /// Dirty plus in-flight bytes; writes beyond wait for acks.
    pub dirty_max_bytes: u64,
    /// Transactions in flight at once.
    pub max_in_flight: usize,
    /// Data bytes one transaction carries at most (never more than
    /// `queue::TXN_DATA_BYTES_MAX`, so that it fits a wire frame).
    pub max_txn_bytes: u64,
    /// How long an attempt waits for its ack before the transaction is resent.
    pub ack_timeout: Duration,
    /// Timed-out attempts on one server before moving to the next.
    pub attempts_per_server: u32,
    /// How long fsync waits before answering EIO, and every other wait
    /// of the layer (backpressure, pinned pages, the queue bound, a
    /// write-through commit) before the request fails with EIO.
    pub fsync_timeout: Duration,
    /// Bytes read ahead of a sequential reader.
    pub read_ahead_bytes: u64,
    /// How long a metadata transaction waits before it is sent, after the
    /// newest change that joined it (at most `queue::META_LINGER_SPAN_MAX`
    /// times this after its forming), unless a
    /// sync asks for it sooner: later metadata changes join it (one
    /// commit for a burst of creates or unlinks), and so does the first
    /// write of a file it creates (one commit for create, write, close).
    /// The default, 20 ms, outlasts the gap between the files a slow
    /// guest creates (~11 ms under TCG), so a burst is a commit every
    /// `META_LINGER_SPAN_MAX` × 20 ms, not one per file: each commit costs
    /// the daemon about a millisecond of CPU however little it carries.
    /// Dirty bytes past three quarters of `dirty_max_bytes` (or a queue
    /// three quarters full) send lingering transactions at once: a writer
    /// never waits for room behind a linger.
    pub meta_linger: Duration,
    /// How long a write's own transaction (data of one inode) waits for the
    /// inode's next writes before it is sent, counted the same way; a sync
    /// sends it at once, and so does a write that finds it full. Writes
    /// between two fsyncs then travel as one commit, not one each: the
    /// commit, not the write, is what costs the daemon its CPU.
    pub data_linger: Duration,
    /// Operations one metadata transaction carries at most (never more
    /// than `queue::TXN_OPS_MAX`; its bytes are bounded by
    /// `queue::TXN_META_BYTES_MAX`).
    pub max_txn_ops: usize,
    /// FLUSH and RELEASE (every close) wait until the inode's data is
    /// durable, as fsync does. Off by default: a close returns at once (its
    /// inode's transactions go on their own, within `meta_linger` for one
    /// that lingers), and only fsync, fdatasync,
    /// fsyncdir, syncfs and shutdown wait (what POSIX and a local disk
    /// promise).
    pub sync_on_close: bool,
    /// Drop an inode's clean pages when the guest forgets it. Right where
    /// the store reads from local files (`file://`: the host's page cache
    /// holds what is hot, and cold reads are not copied into pages); where
    /// every read is a round trip (`pohmel://`, `s3://`) the clean pages are
    /// the only local copy, so they stay until the page share evicts them.
    /// [`open`] decides from the URL.
    pub forget_clean_pages: bool,
}

impl Default for TxnConfig {
    fn default() -> TxnConfig {
        TxnConfig {
            overwrite: OverwritePolicy::Cow,
            cache_bytes: 160 << 20,
            meta_cache_bytes: 32 << 20,
            engine_cache_bytes: 0,
            dirty_max_bytes: 128 << 20,
            max_in_flight: 64,
            max_txn_bytes: 4 << 20,
            ack_timeout: Duration::from_secs(5),
            attempts_per_server: 3,
            fsync_timeout: Duration::from_secs(60),
            read_ahead_bytes: 1 << 20,
            meta_linger: Duration::from_millis(20),
            data_linger: Duration::from_millis(20),
            max_txn_ops: 1024,
            sync_on_close: false,
            forget_clean_pages: true,
        }
    }
}

struct State {
    cache: PageCache,
    txns: BTreeMap<u64, TxnEntry>,
    /// Unacknowledged transaction ids per inode, oldest first.
    by_inode: HashMap<u64, VecDeque<u64>>,
    attrs: HashMap<u64, Overlay>,
    next_id: u64,
    next_attempt: u64,
    in_flight: usize,
    /// Data bytes of the transactions in flight (their `data_bytes`, which
    /// does not change while they are in flight).
    in_flight_bytes: u64,
    /// Queued transactions the sender must look at: every one that may be
    /// able to go. A queued transaction leaves it when the sender finds it
    /// behind an older transaction of one of its inodes, and comes back
    /// when it becomes the oldest of that inode (an ack) or is queued
    /// again (a failed attempt), so a dispatch looks at what changed, not
    /// at every unacknowledged transaction.
    ready: BTreeSet<u64>,
    dirty_bytes: u64,
    /// The store's durability epoch as last acknowledged.
    epoch: u64,
    /// Inodes whose fsync failed; cleared when their data is durable.
    sticky: HashMap<u64, String>,
    /// Inodes whose page data the store refused for lack of space and was
    /// dropped; the next fsync, close or syncfs reports ENOSPC and clears it.
    no_space: HashSet<u64>,
    /// The store refused data for lack of space: writes get ENOSPC until a
    /// transaction that frees space is acknowledged.
    full: bool,
    /// Another daemon claimed the volume for writing
    /// ([`SendError::Superseded`]): nothing is sent any more, and every
    /// fsync fails with this reason.
    superseded: Option<String>,
    /// Where each inode's last read ended, to spot sequential readers.
    last_read_end: HashMap<u64, u64>,
    /// Inodes synced after about one write each (`sync.rs`): their writes'
    /// transactions do not linger, so that the commit runs while the guest
    /// is on its way to the fsync. At most [`EAGER_SYNC_MAX`] inodes.
    eager_sync: std::collections::HashSet<u64>,
    /// Read-ahead chunks in flight (remote stores).
    ahead: ahead::Ahead,
    shutdown: bool,
    /// The server that acknowledged last: new transactions start there, so
    /// after a failover they do not knock on a dead server first.
    preferred_server: usize,
    /// Namespace changes the store may not have yet: entries by directory
    /// and name (`None`: removed), symlink targets, extended attributes.
    /// Each remembers the newest transaction that set it and retires with
    /// that transaction's ack.
    dirents: NameOverlay<Dirent>,
    symlinks: HashMap<u64, (Vec<u8>, u64)>,
    xattrs: NameOverlay<Vec<u8>>,
    /// Byte ranges cut by unacknowledged truncates and punched holes: they
    /// read as zeros whatever the store still holds there.
    holes: Holes,
    /// Extended attributes known without the store (see `KnownXattrs`).
    known_xattrs: KnownXattrs,
    /// Every name of each directory created in this session, so that a
    /// lookup of a new name (before every create) needs no store round
    /// trip: ids come from `reserve_ids` and are never reused, so such a
    /// directory holds exactly the entries put through here.
    complete_dirs: CompleteDirs,
    /// Entries of other directories known without the store (see
    /// `KnownNames`).
    known_names: KnownNames,
    /// Listings read ahead (remote stores; `listing.rs`).
    listings: listing::Listings,
    /// How the metadata caches split `meta_cache_bytes`.
    meta_shares: MetaShares,
    /// Page bytes dropped for forgotten inodes since the allocator last
    /// gave free memory back (`budget::release_free_memory`).
    freed_since_trim: u64,
    /// When the sender wakes by itself next (set under this lock as it
    /// goes to sleep): a change that may go only later needs no wake-up
    /// ([`Shared::nudge`]).
    pump_wakes_at: Option<tokio::time::Instant>,
    /// The sender was woken and has not chosen since: it will see every
    /// change made before it takes this lock, so none needs to wake it.
    pump_nudged: bool,
}

struct Shared {
    cfg: TxnConfig,
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    state: StateLock,
    /// Signalled on every ack and every change a waiter may care about.
    changed: Condvar,
    /// Wakes the pump.
    pump: Notify,
    /// The threads that fetch read-ahead chunks (remote stores).
    ahead_workers: Arc<ahead::AheadWorkers>,
}

/// The transaction layer over a store.
pub struct WritebackStore {
    shared: Arc<Shared>,
    /// The thread driving the sender's runtime; it ends at shutdown.
    driver: Option<std::thread::JoinHandle<()>>,
    /// The embedded engine this process opened (`file://`, `s3://`),
    /// closed by [`WritebackStore::close`].
    engine: Option<Arc<crate::store::engine::SlateStore>>,
    /// The store servers' client (`pohmel://`), whose connection
    /// [`WritebackStore::close`] closes.
    remote: Option<Arc<crate::net::client::RemoteStore>>,
}

impl WritebackStore {
    /// Put the transaction layer over `store` (reads) and `sink` (writes).
    pub fn new(
        cfg: TxnConfig,
        store: Arc<dyn Store>,
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<WritebackStore> {
        Self::with_clock(cfg, store, sink, metrics, false)
    }

    /// As [`WritebackStore::new`]; with `paused_clock` the sender's timers
    /// run on tokio's paused clock, which jumps ahead whenever the sender is
    /// idle (tests of timeouts and backoff take no real time).
    pub fn with_clock(
        cfg: TxnConfig,
        store: Arc<dyn Store>,
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
        paused_clock: bool,
    ) -> std::io::Result<WritebackStore> {
        // One thread drives the sender; sends are I/O (or blocking-pool
        // commits), so it needs no more.
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        if paused_clock {
            builder.start_paused(true);
        }
        let rt = builder.build()?;
        let meta_shares = MetaShares::of(cfg.meta_cache_bytes);
        let shared = Arc::new(Shared {
            state: StateLock::new(State {
                cache: PageCache::new(budget::page_buffers_within(cfg.cache_bytes)),
                txns: BTreeMap::new(),
                by_inode: HashMap::new(),
                attrs: HashMap::new(),
                next_id: 1,
                next_attempt: 1,
                in_flight: 0,
                in_flight_bytes: 0,
                ready: BTreeSet::new(),
                dirty_bytes: 0,
                epoch: 0,
                sticky: HashMap::new(),
                no_space: HashSet::new(),
                superseded: None,
                full: false,
                last_read_end: HashMap::new(),
                eager_sync: Default::default(),
                ahead: ahead::Ahead::default(),
                shutdown: false,
                preferred_server: 0,
                dirents: HashMap::new(),
                symlinks: HashMap::new(),
                xattrs: HashMap::new(),
                holes: Holes::default(),
                known_xattrs: KnownXattrs::new(meta_shares.xattrs),
                complete_dirs: CompleteDirs::new(meta_shares.dirs),
                known_names: KnownNames::new(meta_shares.names),
                listings: listing::Listings::default(),
                meta_shares,
                freed_since_trim: 0,
                pump_wakes_at: None,
                // Its first round runs without being told.
                pump_nudged: true,
            }),
            cfg,
            store,
            sink,
            metrics,
            changed: Condvar::new(),
            pump: Notify::new(),
            ahead_workers: Arc::default(),
        });
        let pumped = Arc::clone(&shared);
        let driver = std::thread::Builder::new()
            .name("pohmelfs-txn".into())
            .spawn(move || rt.block_on(pump(pumped)))?;
        Ok(WritebackStore {
            shared,
            driver: Some(driver),
            engine: None,
            remote: None,
        })
    }

    /// Transactions not yet acknowledged (for tests and status).
    pub fn unacked(&self) -> usize {
        lock(&self.shared.state).txns.len()
    }

    /// The drain at shutdown: send everything and wait at most `timeout`
    /// for the store's acks. On a timeout every transaction not stored is
    /// logged (its inodes, bytes and operations: what the exit loses) and
    /// the error says how many.
    pub fn drain(&self, timeout: Duration) -> Result<(), StoreError> {
        match self.shared.sync_within(None, timeout) {
            Err(StoreError::NoSpace) => Err(StoreError::NoSpace),
            Err(e) => {
                let st = lock(&self.shared.state);
                let bytes: u64 = st.txns.values().map(|t| t.data_bytes).sum();
                Err(StoreError::Io(std::io::Error::other(format!(
                    "{} transactions ({bytes} data bytes) not stored within {timeout:?}: {}",
                    st.txns.len(),
                    crate::ErrorChain(&e)
                ))))
            }
            Ok(()) => Ok(()),
        }
    }

    /// A migration's destination runs the guest now: its engine's holder
    /// record stops saying standby (`store/engine/lease.rs`).
    pub fn promote_engine(&self) {
        if let Some(engine) = &self.engine {
            engine.promote();
        }
    }

    /// Let the volume go: [`drain`](Self::drain) within `fsync_timeout`,
    /// then close the embedded engine for the hand-over
    /// (`SlateStore::hand_over`), which removes this process's holder
    /// record (`store/engine/holder.rs`), or the connection to the
    /// store servers, so that another daemon may open the volume; what
    /// the drop does after is this process's own. On a drain error
    /// nothing is closed. Every later call through the layer fails; drop
    /// it next.
    pub fn close(&self) -> Result<(), StoreError> {
        self.drain(self.shared.cfg.fsync_timeout)?;
        self.let_go()
    }

    /// The part of [`close`](Self::close) after the drain, for a daemon's
    /// stop (SIGTERM) after its own [`drain`](Self::drain): the next
    /// opener, on this host or another, finds the volume free at once (a
    /// holder record left behind says "held" on `s3://` until its lease
    /// runs out). The engine's own close may be left to the exit: what it
    /// holds is durable by then, in its WAL and the commit log.
    pub fn let_go(&self) -> Result<(), StoreError> {
        if let Some(remote) = &self.remote {
            // The server then no longer counts this daemon as the
            // volume's writer, and nothing reconnects behind the close.
            remote.close();
        }
        match &self.engine {
            Some(engine) => engine.hand_over(),
            None => Ok(()),
        }
    }

    /// A live migration began: let the embedded engine get ahead of the
    /// [`close`](Self::close) at the stop (`SlateStore::prepare_close`).
    pub fn prepare_close(&self) {
        if let Some(engine) = &self.engine {
            engine.prepare_close();
        }
    }

    /// How many times the state lock was taken, how many of those found
    /// it held, and how long they waited in all (for tests and benchmarks).
    pub fn state_lock_contention(&self) -> (u64, u64, Duration) {
        self.shared.state.contention()
    }

    /// What the caches hold now, by their own accounting.
    pub fn cache_usage(&self) -> CacheUsage {
        let st = lock(&self.shared.state);
        let (meta_bytes, meta_entries) = st.meta_usage();
        let (complete_dirs, complete_dir_names) = st.complete_dirs.size();
        CacheUsage {
            page_bytes: st.cache.bytes(),
            meta_bytes,
            meta_entries,
            attrs: st.attrs.len() as u64,
            complete_dirs,
            complete_dir_names,
        }
    }
}

impl Drop for WritebackStore {
    fn drop(&mut self) {
        let left = {
            let mut st = lock(&self.shared.state);
            st.shutdown = true;
            st.txns.len()
        };
        if left > 0 {
            error!(
                transactions = left,
                "transaction layer dropped with unacknowledged transactions"
            );
        }
        self.shared.wake_sender();
        self.shared.changed.notify_all();
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
    }
}

impl Shared {
    fn publish(&self, st: &State) {
        let l = &self.metrics.levels;
        l.dirty_bytes.set(st.dirty_bytes);
        l.in_flight_txns.set(st.in_flight as u64);
        l.in_flight_bytes.set(st.in_flight_bytes);
        l.cache_bytes.set(st.cache.bytes());
        l.meta_cache_bytes.set(st.meta_usage().0);
    }
}
