//! Transactions and the tagged page cache: the heart of POHMELFS, in the
//! daemon. [`WritebackStore`] sits between the filesystem layer and a store
//! and is itself a [`Store`], so the filesystem layer does not know it is
//! there.
//!
//! * A guest WRITE is copied into 4 KiB daemon pages and completes once
//!   copied (write-back). Every dirty page is tagged with the transaction
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
//!   a new metadata transaction lingers `meta_linger` so that the changes
//!   after it, and the first write of a file it creates, join it: a burst
//!   of creates or unlinks is one commit. Truncate, punch-hole and writes
//!   in another shape than the filesystem layer's wait for their ack.
//! * When sent, a transaction pins the page buffers it carries. A guest
//!   write to a pinned page either waits for the ack (`wait`, the original
//!   POHMELFS choice) or copies the page into a new buffer (`cow`).
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
//! * `sync` (fsync, flush, fsyncdir, release, syncfs, disconnect, SIGTERM)
//!   finds the transactions that refer to the inode's pages (or all), sends
//!   what is queued at once, resends what stalled, and waits for the acks.
//!
//! It must never report success for data that was not stored, and never
//! lose a transaction without a log line. When its own state contradicts
//! itself it aborts the daemon rather than go on.

mod ack;
mod cache;
#[cfg(test)]
mod differential_tests;
#[cfg(test)]
mod no_space_tests;
pub mod sink;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;
use tracing::{debug, error, warn};

use crate::metrics::Metrics;
use crate::store::{Dirent, FileKind, Inode, Op, Store, StoreError, StoreStats, Txn};
use ack::{invariant_violated, lock, on_result, wait, wait_timeout};
use cache::{PageCache, PAGE_SIZE};
use sink::{SendError, Sink};

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
    /// All page memory, clean and dirty.
    pub cache_bytes: u64,
    /// Dirty plus in-flight bytes; writes beyond wait for acks.
    pub dirty_max_bytes: u64,
    /// Transactions in flight at once.
    pub max_in_flight: usize,
    /// Data bytes one transaction carries at most.
    pub max_txn_bytes: u64,
    /// How long an attempt waits for its ack before the transaction is resent.
    pub ack_timeout: Duration,
    /// Timed-out attempts on one server before moving to the next.
    pub attempts_per_server: u32,
    /// How long fsync waits before answering EIO.
    pub fsync_timeout: Duration,
    /// Bytes read ahead of a sequential reader.
    pub read_ahead_bytes: u64,
    /// How long a metadata transaction waits before it is sent, unless a
    /// sync asks for it sooner: later metadata changes join it (one
    /// commit for a burst of creates or unlinks), and so does the first
    /// write of a file it creates (one commit for create, write, close).
    pub meta_linger: Duration,
    /// Operations one metadata transaction carries at most.
    pub max_txn_ops: usize,
}

impl Default for TxnConfig {
    fn default() -> TxnConfig {
        TxnConfig {
            overwrite: OverwritePolicy::Cow,
            cache_bytes: 256 << 20,
            dirty_max_bytes: 128 << 20,
            max_in_flight: 64,
            max_txn_bytes: 4 << 20,
            ack_timeout: Duration::from_secs(5),
            attempts_per_server: 3,
            fsync_timeout: Duration::from_secs(60),
            read_ahead_bytes: 1 << 20,
            meta_linger: Duration::from_millis(2),
            max_txn_ops: 1024,
        }
    }
}

/// Where a transaction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxnState {
    /// Formed, not sent (or waiting to be resent after `not_before`).
    Queued,
    /// An attempt is on its way; `attempt` numbers it.
    InFlight { attempt: u64 },
}

/// One unacknowledged transaction.
struct TxnEntry {
    id: u64,
    /// Metadata ops, in order; data transactions end with the inode's
    /// PutInode.
    ops: Vec<Op>,
    /// The pages it carries, by inode (its tags on those pages).
    pages: BTreeMap<u64, BTreeSet<u64>>,
    /// Page buffers pinned when first sent; resends carry exactly these.
    pinned: Option<Vec<cache::Pinned>>,
    /// Every inode it touches, for ordering.
    inodes: BTreeSet<u64>,
    /// Bytes it holds against `dirty_max_bytes`.
    data_bytes: u64,
    /// Only data of one inode: later writes may merge into it until sent.
    mergeable: bool,
    state: TxnState,
    server: usize,
    attempts_here: u32,
    attempts: u32,
    not_before: Option<Instant>,
    last_error: Option<String>,
    formed: Instant,
    /// The store refused it for lack of space and it had no page data to
    /// drop: it is retried, and a sync of its inodes fails with ENOSPC.
    waits_for_space: bool,
}

impl TxnEntry {
    /// Metadata that was never sent: later metadata may join it (its
    /// content is fixed from the first attempt on, since a resend must be
    /// the same transaction).
    fn is_unsent_metadata(&self) -> bool {
        self.is_unsent() && !self.mergeable && self.pages.is_empty()
    }

    /// Queued and never sent: its content may still change.
    fn is_unsent(&self) -> bool {
        self.state == TxnState::Queued && self.attempts == 0 && self.pinned.is_none()
    }

    /// Whether a write of `ino` may join this queued transaction: it must
    /// be unsent, and its data goes on the wire before its operations, so
    /// none of them may be one that the data must follow (a truncate,
    /// punch-hole, removal or write of the same inode).
    fn data_may_join(&self, ino: u64) -> bool {
        if !self.is_unsent() {
            return false;
        }
        self.mergeable
            || !self.ops.iter().any(|op| match op {
                Op::Truncate { ino: i, .. }
                | Op::PunchHole { ino: i, .. }
                | Op::RemoveInode { ino: i }
                | Op::Write { ino: i, .. } => *i == ino,
                _ => false,
            })
    }
}

/// The newest attributes of an inode: set by transactions the store may
/// not have yet, or read from the store (`txn == 0`).
#[derive(Clone, Debug)]
struct Overlay {
    /// `None`: removed.
    inode: Option<Inode>,
    /// The newest transaction that set it (0: read from the store).
    txn: u64,
}

/// Per inode (a directory, or the owner of extended attributes), per name:
/// the newest value (`None`: removed) and the transaction that set it.
type NameOverlay<V> = HashMap<u64, BTreeMap<Vec<u8>, (Option<V>, u64)>>;

/// Unacknowledged transactions at most; metadata operations beyond wait.
const MAX_QUEUED_TXNS: usize = 65_536;

/// Inode attributes kept at most (beyond those of unacknowledged
/// transactions, which are always kept).
const ATTR_CACHE_MAX: usize = 100_000;

struct State {
    cache: PageCache,
    txns: BTreeMap<u64, TxnEntry>,
    /// Unacknowledged transaction ids per inode, oldest first.
    by_inode: HashMap<u64, VecDeque<u64>>,
    attrs: HashMap<u64, Overlay>,
    next_id: u64,
    next_attempt: u64,
    in_flight: usize,
    dirty_bytes: u64,
    /// The store's durability epoch as last acknowledged.
    epoch: u64,
    /// Inodes whose fsync failed; cleared when their data is durable.
    sticky: HashMap<u64, String>,
    /// Inodes whose page data the store refused for lack of space and was
    /// dropped; the next fsync, flush or syncfs reports ENOSPC and clears it.
    no_space: HashSet<u64>,
    /// The store refused data for lack of space: writes get ENOSPC until a
    /// transaction that frees space is acknowledged.
    full: bool,
    /// Where each inode's last read ended, to spot sequential readers.
    last_read_end: HashMap<u64, u64>,
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
    /// Extended attributes known without the store (see `KnownXattrs`).
    known_xattrs: KnownXattrs,
    /// Every name of each directory created in this session, so that a
    /// lookup of a new name (before every create) needs no store round
    /// trip: ids come from `reserve_ids` and are never reused, so such a
    /// directory holds exactly the entries put through here.
    complete_dirs: CompleteDirs,
}

impl State {
    /// Make `op`, carried by the unacknowledged transaction `txn`, visible
    /// to reads at once: in the page cache and the namespace overlay.
    fn reflect(&mut self, op: &Op, txn: u64) {
        if let Some(ino) = self.complete_dirs.apply(op) {
            self.known_xattrs.created(ino);
        }
        match op {
            Op::PutInode(i) => {
                self.attrs.insert(
                    i.ino,
                    Overlay {
                        inode: Some(i.clone()),
                        txn,
                    },
                );
            }
            Op::RemoveInode { ino } => {
                self.attrs.insert(*ino, Overlay { inode: None, txn });
                self.cache.remove_inode(*ino);
                self.symlinks.remove(ino);
                // Its attributes are gone with it: the store drops them.
                self.xattrs.remove(ino);
                self.known_xattrs.forget(*ino);
                // And so is the data it lost to a full volume.
                self.no_space.remove(ino);
            }
            Op::PutDirent { parent, dirent } => {
                self.dirents
                    .entry(*parent)
                    .or_default()
                    .insert(dirent.name.clone(), (Some(dirent.clone()), txn));
            }
            Op::RemoveDirent { parent, name } => {
                self.dirents
                    .entry(*parent)
                    .or_default()
                    .insert(name.clone(), (None, txn));
            }
            Op::SetSymlink { ino, target } => {
                self.symlinks.insert(*ino, (target.clone(), txn));
            }
            Op::SetXattr { ino, name, value } => {
                self.known_xattrs.forget(*ino);
                self.xattrs
                    .entry(*ino)
                    .or_default()
                    .insert(name.clone(), (Some(value.clone()), txn));
            }
            Op::RemoveXattr { ino, name } => {
                self.known_xattrs.forget(*ino);
                self.xattrs
                    .entry(*ino)
                    .or_default()
                    .insert(name.clone(), (None, txn));
            }
            Op::Truncate { ino, size } => self.cache.truncate(*ino, *size),
            Op::PunchHole { ino, offset, len } => self.cache.zero(*ino, *offset, *len),
            Op::Write { ino, offset, data } => self.cache.overwrite(*ino, *offset, data),
        }
    }
}

/// Extended attributes known without asking the store, so that the
/// kernel's question for `security.capability` before a write costs no
/// round trip: values read from the store (`None`: absent), and inodes
/// created in this session whose attributes never changed (they have none).
/// Any change of an inode's attributes forgets what is known of it.
#[derive(Default)]
struct KnownXattrs {
    read: HashMap<u64, HashMap<Vec<u8>, Option<Vec<u8>>>>,
    read_len: usize,
    none: HashSet<u64>,
    /// Bumped by every change: a store read that raced with one is not kept.
    generation: u64,
}

/// Extended attributes (names and absences) and created inodes that
/// `KnownXattrs` remembers at most, each; values up to
/// `KNOWN_XATTR_VALUE_MAX` bytes.
const KNOWN_XATTRS_MAX: usize = 65_536;
const KNOWN_XATTR_VALUE_MAX: usize = 256;

impl KnownXattrs {
    /// `Some(value)` when known (`Some(None)`: absent); `None`: ask the store.
    fn get(&self, ino: u64, name: &[u8]) -> Option<Option<Vec<u8>>> {
        if let Some(v) = self.read.get(&ino).and_then(|m| m.get(name)) {
            return Some(v.clone());
        }
        self.none.contains(&ino).then_some(None)
    }

    /// Keep what the store answered, unless something changed since
    /// `generation` was taken (before the read).
    fn remember(&mut self, generation: u64, ino: u64, name: &[u8], value: &Option<Vec<u8>>) {
        if generation != self.generation
            || value
                .as_ref()
                .is_some_and(|v| v.len() > KNOWN_XATTR_VALUE_MAX)
        {
            return;
        }
        if self.read_len >= KNOWN_XATTRS_MAX {
            self.read.clear();
            self.read_len = 0;
        }
        let added = self
            .read
            .entry(ino)
            .or_default()
            .insert(name.to_vec(), value.clone())
            .is_none();
        self.read_len += usize::from(added);
    }

    /// `ino` was created in this session: it has no extended attributes.
    fn created(&mut self, ino: u64) {
        if self.none.len() >= KNOWN_XATTRS_MAX {
            self.none.clear();
        }
        self.none.insert(ino);
    }

    /// An extended attribute of `ino` changed (or `ino` was removed).
    fn forget(&mut self, ino: u64) {
        self.generation += 1;
        self.none.remove(&ino);
        if let Some(m) = self.read.remove(&ino) {
            self.read_len -= m.len();
        }
    }
}

/// What this session created (see `State::complete_dirs`).
#[derive(Default)]
struct CompleteDirs {
    /// Id ranges reserved in this session, newest last (bounded).
    reserved: VecDeque<(u64, u64)>,
    /// Every entry of each directory created in this session.
    entries: HashMap<u64, HashMap<Vec<u8>, Dirent>>,
    count: usize,
    /// Set for good once the entry bound was reached: a directory no longer
    /// tracked can never be known complete again.
    off: bool,
    /// The highest inode created in this session: a PutInode of a reserved
    /// id above it is a creation (ids are handed out in increasing order).
    max_created: u64,
}

/// Entries remembered in `CompleteDirs` at most.
const COMPLETE_DIR_ENTRIES_MAX: usize = 1 << 18;
/// Reserved id ranges remembered at most.
const RESERVED_RANGES_MAX: usize = 1024;

impl CompleteDirs {
    fn reserved(&mut self, first: u64, count: u64) {
        if self.reserved.len() >= RESERVED_RANGES_MAX {
            self.reserved.pop_front();
        }
        self.reserved
            .push_back((first, first.saturating_add(count)));
    }

    fn is_fresh(&self, ino: u64) -> bool {
        self.reserved.iter().any(|&(a, b)| a <= ino && ino < b)
    }

    /// Follow one op; called for every metadata op, in order. Returns the
    /// inode this op creates, if it is a creation.
    fn apply(&mut self, op: &Op) -> Option<u64> {
        let mut created = None;
        if let Op::PutInode(i) = op {
            if i.ino > self.max_created && self.is_fresh(i.ino) {
                self.max_created = i.ino;
                created = Some(i.ino);
            }
        }
        if self.off {
            return created;
        }
        match op {
            Op::PutInode(i) if created.is_some() && i.kind == FileKind::Directory => {
                self.entries.insert(i.ino, HashMap::new());
            }
            Op::PutDirent { parent, dirent } => {
                if let Some(dir) = self.entries.get_mut(parent) {
                    if dir.insert(dirent.name.clone(), dirent.clone()).is_none() {
                        self.count += 1;
                    }
                }
                if self.count > COMPLETE_DIR_ENTRIES_MAX {
                    self.off = true;
                    self.entries.clear();
                    self.count = 0;
                }
            }
            Op::RemoveDirent { parent, name } => {
                if let Some(dir) = self.entries.get_mut(parent) {
                    if dir.remove(name).is_some() {
                        self.count -= 1;
                    }
                }
            }
            Op::RemoveInode { ino } => {
                if let Some(dir) = self.entries.remove(ino) {
                    self.count -= dir.len();
                }
            }
            _ => {}
        }
        created
    }

    /// The entry `name` of `parent` when `parent` is a directory created in
    /// this session: `Some(None)` is known absent; `None` is "ask the store".
    fn lookup(&self, parent: u64, name: &[u8]) -> Option<Option<Dirent>> {
        self.entries.get(&parent).map(|dir| dir.get(name).cloned())
    }
}

/// The pages a write covers.
struct PageSpan {
    first: u64,
    last: u64,
    /// The first and last page where the write covers them only in part
    /// and the file has bytes there before it.
    partial: Vec<u64>,
    /// Bytes of all its pages, as counted against `dirty_max_bytes`.
    bytes: u64,
}

struct Shared {
    cfg: TxnConfig,
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Signalled on every ack and every change a waiter may care about.
    changed: Condvar,
    /// Wakes the pump.
    pump: Notify,
}

/// The transaction layer over a store.
pub struct WritebackStore {
    shared: Arc<Shared>,
    /// The thread driving the sender's runtime; it ends at shutdown.
    driver: Option<std::thread::JoinHandle<()>>,
}

/// Every inode an op touches.
fn op_inodes(op: &Op, out: &mut BTreeSet<u64>) {
    match op {
        Op::PutInode(i) => {
            out.insert(i.ino);
        }
        Op::RemoveInode { ino }
        | Op::Write { ino, .. }
        | Op::Truncate { ino, .. }
        | Op::PunchHole { ino, .. }
        | Op::SetSymlink { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. } => {
            out.insert(*ino);
        }
        Op::PutDirent { parent, dirent } => {
            out.insert(*parent);
            out.insert(dirent.ino);
        }
        Op::RemoveDirent { parent, .. } => {
            out.insert(*parent);
        }
    }
}

/// Open the store named by `url` behind the transaction layer: `pohmel://`
/// servers through their wire protocol (the ack is the server's durable
/// commit), `file://` and `s3://` through the embedded engine (the ack is
/// its durable commit), `mem:` in daemon memory (the ack is its commit,
/// which nothing makes durable).
pub fn open(
    url: &str,
    cfg: TxnConfig,
    metrics: Arc<Metrics>,
) -> Result<Arc<WritebackStore>, crate::store::OpenError> {
    let io = |e: std::io::Error| crate::store::OpenError::Connect {
        url: url.to_string(),
        source: StoreError::Io(e),
    };
    let (reads, sink): (Arc<dyn Store>, Arc<dyn Sink>) = if url.starts_with("pohmel://") {
        let cfg = crate::store::remote::RemoteConfig::from_url(url)?;
        let remote = Arc::new(crate::store::remote::RemoteStore::connect(cfg).map_err(
            |source| crate::store::OpenError::Connect {
                url: url.to_string(),
                source,
            },
        )?);
        (remote.clone(), Arc::new(sink::RemoteSink::new(remote)))
    } else {
        let engine = crate::store::open_once(url)?;
        (
            engine.clone(),
            Arc::new(sink::EngineSink::new(engine).map_err(io)?),
        )
    };
    WritebackStore::new(cfg, reads, sink, metrics)
        .map(Arc::new)
        .map_err(io)
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cache: PageCache::new(cfg.cache_bytes),
                txns: BTreeMap::new(),
                by_inode: HashMap::new(),
                attrs: HashMap::new(),
                next_id: 1,
                next_attempt: 1,
                in_flight: 0,
                dirty_bytes: 0,
                epoch: 0,
                sticky: HashMap::new(),
                no_space: HashSet::new(),
                full: false,
                last_read_end: HashMap::new(),
                shutdown: false,
                preferred_server: 0,
                dirents: HashMap::new(),
                symlinks: HashMap::new(),
                xattrs: HashMap::new(),
                known_xattrs: KnownXattrs::default(),
                complete_dirs: CompleteDirs::default(),
            }),
            cfg,
            store,
            sink,
            metrics,
            changed: Condvar::new(),
            pump: Notify::new(),
        });
        let pumped = Arc::clone(&shared);
        let driver = std::thread::Builder::new()
            .name("pohmelfs-txn".into())
            .spawn(move || rt.block_on(pump(pumped)))?;
        Ok(WritebackStore {
            shared,
            driver: Some(driver),
        })
    }

    /// Transactions not yet acknowledged (for tests and status).
    pub fn unacked(&self) -> usize {
        lock(&self.shared.state).txns.len()
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
        self.shared.pump.notify_one();
        self.shared.changed.notify_all();
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
    }
}

impl Shared {
    /// Queue a transaction; returns its id. Called with the state locked.
    fn enqueue(&self, st: &mut State, entry: TxnEntry) -> u64 {
        let id = entry.id;
        for ino in &entry.inodes {
            st.by_inode.entry(*ino).or_default().push_back(id);
        }
        st.dirty_bytes += entry.data_bytes;
        st.txns.insert(id, entry);
        self.metrics.txn_formed.inc();
        self.publish(st);
        self.pump.notify_one();
        id
    }

    fn new_entry(st: &mut State, ops: Vec<Op>, mergeable: bool) -> TxnEntry {
        let id = st.next_id;
        st.next_id += 1;
        let mut inodes = BTreeSet::new();
        for op in &ops {
            op_inodes(op, &mut inodes);
        }
        TxnEntry {
            id,
            ops,
            pages: BTreeMap::new(),
            pinned: None,
            inodes,
            data_bytes: 0,
            mergeable,
            state: TxnState::Queued,
            server: st.preferred_server,
            attempts_here: 0,
            attempts: 0,
            not_before: None,
            last_error: None,
            formed: Instant::now(),
            waits_for_space: false,
        }
    }

    fn publish(&self, st: &State) {
        let l = &self.metrics.levels;
        l.dirty_bytes.set(st.dirty_bytes);
        l.in_flight_txns.set(st.in_flight as u64);
        l.cache_bytes.set(st.cache.bytes());
    }

    /// The attributes of `ino` as the guest last set them. The daemon is
    /// the volume's only writer and every change passes through here, so
    /// attributes read from the store are kept (bounded) and a write needs
    /// no round trip for them — nor a reachable store.
    fn current_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        if let Some(o) = lock(&self.state).attrs.get(&ino) {
            return Ok(o.inode.clone());
        }
        let inode = self.store.get_inode(ino)?;
        let mut st = lock(&self.state);
        if st.attrs.len() >= ATTR_CACHE_MAX {
            // Forget what the store has; keep what it does not yet.
            let State { attrs, txns, .. } = &mut *st;
            attrs.retain(|_, o| txns.contains_key(&o.txn));
        }
        // A newer change that raced in wins over what the store said.
        let entry = st.attrs.entry(ino).or_insert(Overlay { inode, txn: 0 });
        Ok(entry.inode.clone())
    }

    /// The write-back path: copy `data` into pages and tag them.
    fn write(&self, ino: u64, offset: u64, data: &[u8], inode: Inode) -> Result<(), StoreError> {
        if data.is_empty() {
            self.put_attributes(ino, inode);
            return Ok(());
        }
        let span = self.span(ino, offset, data.len() as u64)?;
        let mut st = self.wait_to_write(ino, &span)?;
        let txn_id = self.data_txn(&mut st, ino, span.bytes, &inode);
        self.copy_into_pages(&mut st, ino, offset, data, txn_id);
        Self::carry_attributes(&mut st, ino, txn_id, inode);
        let evicted = st.cache.evict();
        self.metrics.cache_evictions.add(evicted);
        self.publish(&st);
        drop(st);
        self.pump.notify_one();
        Ok(())
    }

    /// A write of no bytes: only the attributes change, in a transaction
    /// of their own.
    fn put_attributes(&self, ino: u64, inode: Inode) {
        let mut st = lock(&self.state);
        let entry = Self::new_entry(&mut st, vec![Op::PutInode(inode.clone())], true);
        let id = self.enqueue(&mut st, entry);
        st.attrs.insert(
            ino,
            Overlay {
                inode: Some(inode),
                txn: id,
            },
        );
    }

    /// The pages a write of `len > 0` bytes at `offset` covers.
    fn span(&self, ino: u64, offset: u64, len: u64) -> Result<PageSpan, StoreError> {
        let size_before = self.current_inode(ino)?.map_or(0, |i| i.size);
        let first = offset / PAGE_SIZE;
        let end = offset + len;
        let last = (end - 1) / PAGE_SIZE;
        // Pages written only in part must hold their old bytes, where the
        // store may have any.
        let partial = [first, last]
            .into_iter()
            .filter(|&idx| {
                let start = idx * PAGE_SIZE;
                !(offset <= start && end >= start + PAGE_SIZE) && start < size_before
            })
            .collect();
        Ok(PageSpan {
            first,
            last,
            partial,
            bytes: (last - first + 1) * PAGE_SIZE,
        })
    }

    /// Lock the state once the write may touch its pages: the partial
    /// pages are loaded, backpressure lets it through and (under `wait`)
    /// none of its pages is pinned. Everything that makes a write wait
    /// happens here, before it touches a page, and after any wait it starts
    /// over: a transaction chosen before a wait may have been sent during it.
    fn wait_to_write(
        &self,
        ino: u64,
        span: &PageSpan,
    ) -> Result<MutexGuard<'_, State>, StoreError> {
        let mut st = lock(&self.state);
        loop {
            if st.shutdown {
                return Err(StoreError::Io(std::io::Error::other(
                    "transaction layer shut down",
                )));
            }
            if st.full {
                return Err(StoreError::NoSpace);
            }
            if let Some(&idx) = span.partial.iter().find(|&&i| !st.cache.contains(ino, i)) {
                drop(st);
                self.load_pages(ino, idx, 1)?;
                st = lock(&self.state);
                continue;
            }
            // Backpressure: dirty and in-flight bytes stay within their bound.
            if st.dirty_bytes > 0 && st.dirty_bytes + span.bytes > self.cfg.dirty_max_bytes {
                self.metrics.backpressure_waits.inc();
                st = wait(&self.changed, st);
                continue;
            }
            if self.cfg.overwrite == OverwritePolicy::Wait
                && (span.first..=span.last).any(|i| st.cache.is_pinned(ino, i))
            {
                self.metrics.overwrite_waits.inc();
                st = wait(&self.changed, st);
                continue;
            }
            return Ok(st);
        }
    }

    /// The transaction a write of `bytes` to `ino` joins: the inode's
    /// queued one if it can take more, else a new one.
    fn data_txn(&self, st: &mut State, ino: u64, bytes: u64, inode: &Inode) -> u64 {
        let tail = st
            .by_inode
            .get(&ino)
            .and_then(|q| q.back().copied())
            .filter(|id| {
                st.txns.get(id).is_some_and(|t| {
                    t.data_may_join(ino) && t.data_bytes + bytes <= self.cfg.max_txn_bytes
                })
            });
        let Some(id) = tail else {
            let entry = Self::new_entry(st, vec![Op::PutInode(inode.clone())], true);
            return self.enqueue(st, entry);
        };
        // Joining a metadata transaction (the create of this file): it must
        // carry the attributes the data is clipped to.
        if let Some(t) = st.txns.get_mut(&id) {
            if !t
                .ops
                .iter()
                .any(|op| matches!(op, Op::PutInode(i) if i.ino == ino))
            {
                t.ops.push(Op::PutInode(inode.clone()));
            }
        }
        id
    }

    /// Copy `data` into the pages of `ino` from `offset`, tagging each
    /// newly dirty page with `txn_id`.
    fn copy_into_pages(&self, st: &mut State, ino: u64, offset: u64, data: &[u8], txn_id: u64) {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = pos / PAGE_SIZE;
            let in_page = (pos % PAGE_SIZE) as usize;
            let n = rest.len().min(PAGE_SIZE as usize - in_page);
            if st.cache.is_pinned(ino, idx) {
                // Only under `cow`: `wait` waited before.
                self.metrics.overwrite_copies.inc();
            }
            if st.cache.write(ino, idx, in_page, &rest[..n], txn_id) {
                if let Some(t) = st.txns.get_mut(&txn_id) {
                    t.pages.entry(ino).or_default().insert(idx);
                    t.data_bytes += PAGE_SIZE;
                }
                st.dirty_bytes += PAGE_SIZE;
            }
            rest = &rest[n..];
            pos += n as u64;
        }
    }

    /// The written inode's newest attributes: carried by its transaction
    /// and seen by reads.
    fn carry_attributes(st: &mut State, ino: u64, txn_id: u64, inode: Inode) {
        if let Some(t) = st.txns.get_mut(&txn_id) {
            for op in &mut t.ops {
                if let Op::PutInode(i) = op {
                    if i.ino == ino {
                        *i = inode.clone();
                    }
                }
            }
        }
        st.attrs.insert(
            ino,
            Overlay {
                inode: Some(inode),
                txn: txn_id,
            },
        );
    }

    /// Read `count` pages from `first` into the cache as clean pages, where
    /// absent.
    fn load_pages(&self, ino: u64, first: u64, count: u64) -> Result<(), StoreError> {
        let mut buf = vec![0u8; (count * PAGE_SIZE) as usize];
        self.store.read(ino, first * PAGE_SIZE, &mut buf)?;
        let mut st = lock(&self.state);
        for (i, chunk) in buf.chunks(PAGE_SIZE as usize).enumerate() {
            st.cache.insert_clean(ino, first + i as u64, chunk);
        }
        let evicted = st.cache.evict();
        self.metrics.cache_evictions.add(evicted);
        self.publish(&st);
        Ok(())
    }

    /// A metadata transaction: apply its effects to the cache and the
    /// overlay (so reads see them at once), queue it, and return — the
    /// write-back contract: fsync and fsyncdir wait for it. Truncate,
    /// punch-hole and writes carried in the operations (any write in
    /// another shape than the filesystem layer's) wait for their ack: until
    /// the store has the new bytes, a read of a page the cache does not hold
    /// could return the old ones.
    ///
    /// The operations join the newest transaction when it is metadata that
    /// was never sent (group commit in the daemon: a burst of unlinks in one
    /// directory is one commit, not one round trip each). Being the newest,
    /// it is the last of every inode's queue, so appending keeps every
    /// inode's order. A new metadata transaction lingers `meta_linger`
    /// before it is sent, so that the burst can gather; a sync sends it at
    /// once.
    fn commit_metadata(&self, txn: Txn) -> Result<(), StoreError> {
        let wait_ack = txn.ops.iter().any(|op| {
            matches!(
                op,
                Op::Truncate { .. } | Op::PunchHole { .. } | Op::Write { .. }
            )
        });
        let id = {
            let mut st = lock(&self.state);
            // Bound the queue: metadata is small, but not free.
            while st.txns.len() >= MAX_QUEUED_TXNS && !st.shutdown {
                self.metrics.backpressure_waits.inc();
                st = wait(&self.changed, st);
            }
            let id = self.metadata_txn(&mut st, txn.ops.len(), wait_ack);
            self.append_ops(&mut st, id, &txn.ops, wait_ack);
            for op in &txn.ops {
                st.reflect(op, id);
            }
            self.publish(&st);
            drop(st);
            self.pump.notify_one();
            id
        };
        if wait_ack {
            self.wait_for(&[id], None, false)?;
        }
        Ok(())
    }

    /// The transaction `ops` more metadata operations go into: the newest
    /// when it is unsent metadata with room for them, else a new one (which
    /// lingers unless its ack is waited for).
    fn metadata_txn(&self, st: &mut State, ops: usize, wait_ack: bool) -> u64 {
        let join = st.txns.last_key_value().and_then(|(&id, t)| {
            (t.is_unsent_metadata() && t.ops.len() + ops <= self.cfg.max_txn_ops).then_some(id)
        });
        if let Some(id) = join {
            self.metrics.txn_joined.inc();
            return id;
        }
        let mut entry = Self::new_entry(st, Vec::new(), false);
        if !wait_ack && !self.cfg.meta_linger.is_zero() {
            entry.not_before = Some(Instant::now() + self.cfg.meta_linger);
        }
        self.enqueue(st, entry)
    }

    /// Append `ops` to the queued transaction `id`, and queue it behind
    /// every inode they touch that it did not touch yet.
    fn append_ops(&self, st: &mut State, id: u64, ops: &[Op], wait_ack: bool) {
        let mut inodes = BTreeSet::new();
        for op in ops {
            op_inodes(op, &mut inodes);
        }
        let State { txns, by_inode, .. } = st;
        if let Some(t) = txns.get_mut(&id) {
            for ino in inodes {
                if t.inodes.insert(ino) {
                    by_inode.entry(ino).or_default().push_back(id);
                }
            }
            t.ops.extend(ops.iter().cloned());
            // Full, or waited for: no reason to linger.
            if wait_ack || t.ops.len() >= self.cfg.max_txn_ops {
                t.not_before = None;
            }
        }
    }

    /// Wait until every transaction in `ids` is acknowledged, or `timeout`.
    /// Returns the ids still unacknowledged on timeout as an error, or
    /// `NoSpace` when one of them waits for space (at once if
    /// `fail_on_no_space`, else at the timeout).
    fn wait_for(
        &self,
        ids: &[u64],
        timeout: Option<Duration>,
        fail_on_no_space: bool,
    ) -> Result<(), StoreError> {
        // Real time: a guest's fsync deadline is wall-clock time.
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut st = lock(&self.state);
        loop {
            let pending: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| st.txns.contains_key(id))
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            let waits_for_space = || {
                pending
                    .iter()
                    .any(|id| st.txns.get(id).is_some_and(|t| t.waits_for_space))
            };
            if fail_on_no_space && waits_for_space() {
                return Err(StoreError::NoSpace);
            }
            if st.shutdown {
                return Err(StoreError::Io(std::io::Error::other(
                    "transaction layer shut down",
                )));
            }
            match deadline {
                None => st = wait(&self.changed, st),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() && waits_for_space() {
                        return Err(StoreError::NoSpace);
                    }
                    if left.is_zero() {
                        let described: Vec<String> = pending
                            .iter()
                            .filter_map(|id| st.txns.get(id))
                            .map(describe)
                            .collect();
                        return Err(StoreError::Io(std::io::Error::other(format!(
                            "{} transaction(s) not acknowledged within {:?}: {}",
                            pending.len(),
                            timeout.unwrap_or_default(),
                            described.join("; ")
                        ))));
                    }
                    st = wait_timeout(&self.changed, st, left);
                }
            }
        }
    }

    /// The writeback contract: everything unacknowledged that touches `ino`
    /// (or everything), sent now and waited for.
    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        let start = std::time::Instant::now();
        self.metrics.fsync_calls.inc();
        let ids: Vec<u64> = {
            let mut st = lock(&self.state);
            let ids: Vec<u64> = match ino {
                Some(i) => st
                    .by_inode
                    .get(&i)
                    .map(|q| q.iter().copied().collect())
                    .unwrap_or_default(),
                None => st.txns.keys().copied().collect(),
            };
            if let Some(i) = ino {
                if let Some(why) = st.sticky.get(&i) {
                    if !ids.is_empty() {
                        self.metrics.fsync_errors.inc();
                        return Err(StoreError::Io(std::io::Error::other(format!(
                            "earlier fsync failed and the data is still not durable: {why}"
                        ))));
                    }
                }
            }
            // Resend at once whatever waits for a backoff.
            let now = Instant::now();
            for id in &ids {
                if let Some(t) = st.txns.get_mut(id) {
                    if t.state == TxnState::Queued && t.not_before.is_some_and(|nb| nb > now) {
                        t.not_before = None;
                    }
                }
            }
            ids
        };
        self.pump.notify_one();
        // A sync of one inode answers ENOSPC as soon as its data waits for
        // space; a sync of everything (syncfs, shutdown) still waits for
        // whatever else can be stored.
        let result = self.wait_for(&ids, Some(self.cfg.fsync_timeout), ino.is_some());
        self.metrics.levels.fsync_latency.observe(start.elapsed());
        let mut st = lock(&self.state);
        match result {
            Ok(()) | Err(StoreError::NoSpace) => {
                // Data dropped for lack of space is reported once.
                let dropped = match ino {
                    Some(i) => st.no_space.remove(&i),
                    None => !std::mem::take(&mut st.no_space).is_empty(),
                };
                if dropped || result.is_err() {
                    warn!(ino, "fsync failed: the volume is full");
                    return Err(StoreError::NoSpace);
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.fsync_errors.inc();
                let why = crate::ErrorChain(&e).to_string();
                warn!(ino, error = %why, "fsync failed: data not acknowledged by the store in time");
                match ino {
                    Some(i) => {
                        st.sticky.insert(i, why);
                    }
                    None => {
                        for t in st.txns.values() {
                            error!(txn = %describe(t), "not stored");
                        }
                    }
                }
                Err(e)
            }
        }
    }
}

fn describe(t: &TxnEntry) -> String {
    format!(
        "txn {} (inodes {:?}, {} data bytes, {} ops, {:?}, {} attempts, server {}, age {:?}{})",
        t.id,
        t.inodes,
        t.data_bytes,
        t.ops.len(),
        t.state,
        t.attempts,
        t.server,
        t.formed.elapsed(),
        t.last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    )
}

/// The sender: picks transactions that may go (oldest of all their inodes,
/// within the in-flight bound, past their backoff), pins their pages and
/// sends them; resends on timeouts.
async fn pump(shared: Arc<Shared>) {
    loop {
        let next_wake = {
            let mut st = lock(&shared.state);
            if st.shutdown {
                return;
            }
            dispatch(&shared, &mut st)
        };
        let wait = next_wake.map_or(Duration::from_millis(100), |t| {
            t.saturating_duration_since(Instant::now())
        });
        let _ =
            tokio::time::timeout(wait.max(Duration::from_millis(1)), shared.pump.notified()).await;
    }
}

/// Send every transaction that may go now; returns when to look again.
fn dispatch(shared: &Arc<Shared>, st: &mut State) -> Option<Instant> {
    let now = Instant::now();
    let mut wake: Option<Instant> = None;
    let low_water = st.txns.keys().next().copied().unwrap_or(st.next_id);
    let mut in_flight_bytes: u64 = st
        .txns
        .values()
        .filter(|t| matches!(t.state, TxnState::InFlight { .. }))
        .map(|t| t.data_bytes)
        .sum();
    let candidates: Vec<u64> = st
        .txns
        .values()
        .filter(|t| t.state == TxnState::Queued)
        .map(|t| t.id)
        .collect();
    for id in candidates {
        if st.in_flight >= shared.cfg.max_in_flight {
            break;
        }
        let Some(t) = st.txns.get(&id) else { continue };
        if let Some(nb) = t.not_before {
            if nb > now {
                wake = Some(wake.map_or(nb, |w| w.min(nb)));
                continue;
            }
        }
        // Bytes on the wire are copied once per attempt (the frame): keep
        // them to a quarter of the dirty bound, but never block the only one.
        let wire_cap = shared.cfg.dirty_max_bytes / 4;
        if st.in_flight > 0 && in_flight_bytes + t.data_bytes > wire_cap {
            continue;
        }
        let oldest_everywhere = t
            .inodes
            .iter()
            .all(|ino| st.by_inode.get(ino).and_then(|q| q.front()) == Some(&id));
        if !oldest_everywhere {
            continue;
        }
        // Pin the pages on the first send; resends carry the same buffers.
        if t.pinned.is_none() {
            let pages = t.pages.clone();
            let pinned = st.cache.pin(&pages);
            if let Some(t) = st.txns.get_mut(&id) {
                t.pinned = Some(pinned);
            }
        }
        let attempt = st.next_attempt;
        st.next_attempt += 1;
        st.in_flight += 1;
        in_flight_bytes += st.txns.get(&id).map_or(0, |t| t.data_bytes);
        if st.in_flight > shared.cfg.max_in_flight {
            invariant_violated(format_args!(
                "{} transactions in flight, bound {}",
                st.in_flight, shared.cfg.max_in_flight
            ));
        }
        let Some(t) = st.txns.get_mut(&id) else {
            continue;
        };
        t.state = TxnState::InFlight { attempt };
        t.attempts += 1;
        if t.attempts > 1 {
            shared.metrics.txn_resent.inc();
        }
        shared.metrics.txn_sent.inc();
        let wire = wire_txn(t);
        let server = t.server;
        let sh = Arc::clone(shared);
        tokio::spawn(async move {
            let result = match tokio::time::timeout(
                sh.cfg.ack_timeout,
                sh.sink.send(server, id, low_water, wire),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(SendError::Retry(format!(
                    "no ack within {:?}",
                    sh.cfg.ack_timeout
                ))),
            };
            on_result(&sh, id, attempt, server, result);
        });
    }
    shared.publish(st);
    wake
}

/// The transaction as the store applies it: its metadata ops with the data
/// extents (runs of contiguous pinned pages, clipped to the inode's size)
/// before its attributes.
fn wire_txn(t: &TxnEntry) -> Txn {
    let mut ops = Vec::new();
    if let Some(pinned) = &t.pinned {
        let size_of = |ino: u64| {
            t.ops.iter().rev().find_map(|op| match op {
                Op::PutInode(i) if i.ino == ino => Some(i.size),
                _ => None,
            })
        };
        let mut i = 0;
        while i < pinned.len() {
            let (ino, start_idx, _) = pinned[i];
            let mut j = i;
            while j + 1 < pinned.len()
                && pinned[j + 1].0 == ino
                && pinned[j + 1].1 == pinned[j].1 + 1
            {
                j += 1;
            }
            let offset = start_idx * PAGE_SIZE;
            let mut data = Vec::with_capacity((j - i + 1) * PAGE_SIZE as usize);
            for (_, _, buf) in &pinned[i..=j] {
                data.extend_from_slice(buf);
            }
            if let Some(size) = size_of(ino) {
                data.truncate(size.saturating_sub(offset).min(data.len() as u64) as usize);
            }
            if !data.is_empty() {
                ops.push(Op::Write { ino, offset, data });
            }
            i = j + 1;
        }
    }
    ops.extend(t.ops.iter().cloned());
    Txn { ops }
}

impl Store for WritebackStore {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.shared.current_inode(ino)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        {
            let st = lock(&self.shared.state);
            if let Some((d, _)) = st.dirents.get(&parent).and_then(|m| m.get(name)) {
                return Ok(d.clone());
            }
            if let Some(known) = st.complete_dirs.lookup(parent, name) {
                return Ok(known);
            }
        }
        self.shared.store.lookup(parent, name)
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        let overlay: Vec<(Vec<u8>, Option<Dirent>)> =
            match lock(&self.shared.state).dirents.get(&parent) {
                None => return self.shared.store.readdir(parent, after, max),
                Some(m) => m.iter().map(|(n, (d, _))| (n.clone(), d.clone())).collect(),
            };
        // Ask the store for enough that, with the overlay's names filtered
        // out, a full batch remains whenever the store has more.
        let fetch = max.saturating_add(overlay.len());
        let stored = self.shared.store.readdir(parent, after, fetch)?;
        let exhausted = stored.len() < fetch;
        let last = stored.last().map(|d| d.cookie);
        let shadowed: std::collections::HashSet<&[u8]> =
            overlay.iter().map(|(n, _)| n.as_slice()).collect();
        let mut out: Vec<Dirent> = stored
            .into_iter()
            .filter(|d| !shadowed.contains(d.name.as_slice()))
            .collect();
        // Overlay entries past the last stored cookie wait for the next
        // batch unless the store has nothing more: cookies stay in order.
        out.extend(
            overlay
                .into_iter()
                .filter_map(|(_, d)| d)
                .filter(|d| d.cookie > after && (exhausted || last.is_some_and(|l| d.cookie <= l))),
        );
        out.sort_by_key(|d| d.cookie);
        out.truncate(max);
        Ok(out)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let sh = &self.shared;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / PAGE_SIZE;
        let last = (offset + buf.len() as u64 - 1) / PAGE_SIZE;
        // Pages missing from the cache, and how far to read ahead.
        let (missing, sequential, size) = {
            let mut st = lock(&sh.state);
            let missing: Vec<u64> = (first..=last)
                .filter(|i| !st.cache.contains(ino, *i))
                .collect();
            let sequential = st.last_read_end.get(&ino) == Some(&offset);
            if st.last_read_end.len() > 4096 {
                st.last_read_end.clear();
            }
            st.last_read_end.insert(ino, offset + buf.len() as u64);
            let size = st
                .attrs
                .get(&ino)
                .and_then(|o| o.inode.as_ref())
                .map(|i| i.size);
            (missing, sequential, size)
        };
        sh.metrics
            .cache_hits
            .add((last - first + 1) - missing.len() as u64);
        sh.metrics.cache_misses.add(missing.len() as u64);
        if let (Some(&lo), Some(&hi)) = (missing.first(), missing.last()) {
            let mut count = hi - lo + 1;
            if sequential {
                let ahead = sh.cfg.read_ahead_bytes / PAGE_SIZE;
                let limit = size.map_or(u64::MAX, |s| s.div_ceil(PAGE_SIZE));
                count = (count + ahead)
                    .min(limit.saturating_sub(lo))
                    .max(hi - lo + 1);
            }
            sh.load_pages(ino, lo, count)?;
        }
        // Copy from the cache: it holds the newest bytes. A page evicted
        // between loading and copying was clean, so the store has it.
        let mut evicted = Vec::new();
        {
            let st = lock(&sh.state);
            let mut pos = offset;
            let mut done = 0usize;
            while done < buf.len() {
                let idx = pos / PAGE_SIZE;
                let in_page = (pos % PAGE_SIZE) as usize;
                let n = (buf.len() - done).min(PAGE_SIZE as usize - in_page);
                if !st.cache.read(ino, idx, in_page, &mut buf[done..done + n]) {
                    evicted.push((pos, done, n));
                }
                done += n;
                pos += n as u64;
            }
        }
        for (pos, done, n) in evicted {
            sh.store.read(ino, pos, &mut buf[done..done + n])?;
        }
        Ok(())
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        // The store must know every dirty page before it can say where data is.
        self.shared.sync(Some(ino))?;
        self.shared.store.next_data(ino, offset)
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.shared.sync(Some(ino))?;
        self.shared.store.next_hole(ino, offset)
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some((t, _)) = lock(&self.shared.state).symlinks.get(&ino) {
            return Ok(Some(t.clone()));
        }
        self.shared.store.readlink(ino)
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let generation = {
            let st = lock(&self.shared.state);
            if let Some((v, _)) = st.xattrs.get(&ino).and_then(|m| m.get(name)) {
                return Ok(v.clone());
            }
            if let Some(known) = st.known_xattrs.get(ino, name) {
                return Ok(known);
            }
            st.known_xattrs.generation
        };
        let value = self.shared.store.get_xattr(ino, name)?;
        lock(&self.shared.state)
            .known_xattrs
            .remember(generation, ino, name, &value);
        Ok(value)
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let overlay: Vec<(Vec<u8>, bool)> = match lock(&self.shared.state).xattrs.get(&ino) {
            None => return self.shared.store.list_xattr(ino),
            Some(m) => m
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.is_some()))
                .collect(),
        };
        let mut names: BTreeSet<Vec<u8>> = self.shared.store.list_xattr(ino)?.into_iter().collect();
        for (name, present) in overlay {
            if present {
                names.insert(name);
            } else {
                names.remove(&name);
            }
        }
        Ok(names.into_iter().collect())
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.shared.store.statfs()
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        let first = self.shared.store.reserve_ids(count)?;
        lock(&self.shared.state)
            .complete_dirs
            .reserved(first, count);
        Ok(first)
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        // The filesystem layer's write: one Write and the inode's attributes.
        if let [Op::Write { ino, offset, data }, Op::PutInode(inode)] = &txn.ops[..] {
            if inode.ino == *ino {
                return self.shared.write(*ino, *offset, data, inode.clone());
            }
        }
        if txn.ops.iter().any(|op| matches!(op, Op::Write { .. })) {
            // Writes in any other shape travel in the operations, ordered
            // like metadata, and are waited for (write-through).
            debug!("transaction with data in another shape: sent write-through");
        }
        self.shared.commit_metadata(txn)
    }

    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.shared.sync(ino)
    }

    fn flush(&self, ino: u64) -> Result<(), StoreError> {
        // The transactions that refer to the inode's pages; when there are
        // any, everything of the inode before them goes too (its order).
        let has_data = {
            let st = lock(&self.shared.state);
            st.by_inode.get(&ino).is_some_and(|q| {
                q.iter()
                    .any(|id| st.txns.get(id).is_some_and(|t| t.pages.contains_key(&ino)))
            }) || st.sticky.contains_key(&ino)
                || st.no_space.contains(&ino)
        };
        if has_data {
            self.shared.sync(Some(ino))
        } else {
            Ok(())
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} through the transaction layer ({:?} overwrites, cache {} MiB, dirty max {} MiB)",
            self.shared.store.describe(),
            self.shared.cfg.overwrite,
            self.shared.cfg.cache_bytes >> 20,
            self.shared.cfg.dirty_max_bytes >> 20
        )
    }
}
