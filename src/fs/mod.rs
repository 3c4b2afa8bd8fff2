//! The filesystem layer: a read-write `FileSystem` (`fuse.rs`) served to the guest,
//! built on the [`Store`] seam (never a passthrough of a host directory).
//!
//! It owns what only the daemon can know: the guest's lookup counts, open
//! handles, and the POSIX decisions (names, permissions, link counts,
//! emptiness, rename rules). Every mutation is computed and committed to the
//! store holding the locks of the inodes it involves (`locks.rs`), so two
//! requests never interleave their read-check-write steps on one inode and
//! requests on other inodes go on. Reads take no lock.
//!
//! It must never trust a guest-supplied size or name before checking it, and
//! never panic on guest input: a failed request is an errno reply, a counter
//! and (for unexpected failures) a log line.
//!
//! Lookup-count contract (the FUSE one, as virtiofsd documents it): every
//! reply that hands the guest an inode (lookup, create, mknod, mkdir,
//! symlink, link, each readdirplus entry) adds one reference; forget and
//! batch_forget drop them. An unlinked inode stays in the store, with
//! `nlink == 0`, until the guest has forgotten it (`refs.rs`).

mod attr;
#[cfg(test)]
mod concurrency_tests;
mod config;
mod data;
pub mod error;
mod fuse;
mod guest_bytes;
mod handles;
mod handover;
mod locks;
mod namespace;
#[cfg(test)]
mod orphan_tests;
mod refs;
mod rename;
mod session;
mod xattr;
#[cfg(test)]
mod zero_copy_tests;

pub use config::{CachePolicy, FsConfig};
pub use data::MAX_IO_BYTES;
pub use handles::OpenFile;
pub use session::{SessionError, SessionState};

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::filesystem::Entry;
use tracing::{trace, warn};

use crate::metrics::Metrics;
use crate::ratelimit::{limited, Capped};
use crate::store::{FileKind, Inode, Store, Timestamp, Txn, ROOT_INO};
use error::{errno, FsError, FsResult};
use handles::HandleTable;

/// Orphans removed per transaction at the end of a session.
const ORPHANS_PER_TXN: usize = 1024;

/// How many ids to reserve from the store at a time (a create takes two:
/// the inode and its entry's cookie): 32,768 creates between reservations,
/// and as many that go on while the store is unreachable once the next
/// range is reserved ahead. Ids are 64 bits: those a daemon leaves unused
/// when it stops cost nothing.
const ID_BATCH: u64 = 1 << 16;

/// The ids `first..first + ID_BATCH` a store reserved, refused when they
/// would run past the end of the id space (a store that answered so is
/// broken or hostile: wrapped ids would name the root and reserved
/// inodes).
fn id_range(first: u64) -> Result<(u64, u64), crate::store::StoreError> {
    first
        .checked_add(ID_BATCH)
        .map(|end| (first, end))
        .ok_or_else(|| {
            crate::store::StoreError::Corrupt(format!(
                "the store reserved ids from {first}, past the end of the id space"
            ))
        })
}

/// Guest references to inodes, and the unlinked inodes they keep alive.
#[derive(Default)]
struct Refs {
    lookups: HashMap<u64, u64>,
    orphans: HashSet<u64>,
}

/// A range of reserved ids not handed out yet.
#[derive(Default)]
struct IdRange {
    next: u64,
    end: u64,
    /// The next range, reserved ahead (first, end).
    spare: Option<(u64, u64)>,
    ahead: Ahead,
}

/// The reservation ahead of the range in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Ahead {
    #[default]
    Idle,
    Running,
    /// It failed: the next one is tried when this range runs out, on the
    /// request path, and only after that succeeded does one go ahead again
    /// (no thread per create while the store is unreachable).
    Failed,
}

/// The filesystem served to the guest.
pub struct PohmelFs {
    store: Arc<dyn Store>,
    /// The same volume as `store`, when `serve` may open it late or let
    /// it go (a live migration's hand-over, `handover.rs`).
    volume: Option<Arc<crate::writeback::slot::VolumeSlot>>,
    cfg: FsConfig,
    metrics: Arc<Metrics>,
    /// The inodes a mutation holds while it is computed and committed.
    locks: locks::InodeLocks,
    /// Taken first by renames that move a directory: see `locks.rs`.
    rename_lock: Mutex<()>,
    refs: Mutex<Refs>,
    ids: Arc<Mutex<IdRange>>,
    handles: Mutex<HandleTable>,
    /// The options the guest's INIT negotiated; `None` outside a session.
    negotiated: Mutex<Option<FsOptions>>,
}

/// Lock a mutex, treating poisoning as harmless: every critical section here
/// leaves its data consistent before it can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PohmelFs {
    /// Serve the volume in `store`, creating its root directory if the volume
    /// is new.
    pub fn new(store: Arc<dyn Store>, cfg: FsConfig, metrics: Arc<Metrics>) -> FsResult<PohmelFs> {
        let fs = PohmelFs::unopened(store, None, cfg, metrics);
        fs.ensure_root()?;
        Ok(fs)
    }

    /// The filesystem, not touching the volume yet.
    fn unopened(
        store: Arc<dyn Store>,
        volume: Option<Arc<crate::writeback::slot::VolumeSlot>>,
        cfg: FsConfig,
        metrics: Arc<Metrics>,
    ) -> PohmelFs {
        PohmelFs {
            store,
            volume,
            handles: Mutex::new(HandleTable::new(cfg.max_handles)),
            cfg,
            metrics,
            locks: locks::InodeLocks::default(),
            rename_lock: Mutex::new(()),
            refs: Mutex::new(Refs::default()),
            ids: Arc::new(Mutex::new(IdRange::default())),
            negotiated: Mutex::new(None),
        }
    }

    /// Create the root directory if the volume is new.
    fn ensure_root(&self) -> FsResult<()> {
        if self.store.get_inode(ROOT_INO)?.is_none() {
            if self.cfg.read_only {
                return Err(FsError::NoRoot);
            }
            let now = Timestamp::now();
            let root = Inode {
                kind: FileKind::Directory,
                perm: 0o755,
                nlink: 2,
                atime: now,
                mtime: now,
                ctime: now,
                parent: ROOT_INO,
                ..Inode::regular(ROOT_INO, 0)
            };
            let mut txn = Txn::new();
            txn.push(crate::store::Op::PutInode(root));
            self.commit(txn)?;
        }
        Ok(())
    }

    /// Where a WRITE of `ino` through `handle` at `offset` lands, when
    /// that is known before the inode is locked: not for an append
    /// handle, which writes at the size it finds then (`do_write`).
    pub fn write_offset(&self, ino: u64, handle: u64, offset: u64) -> Option<u64> {
        let append = lock(&self.handles)
            .get(handle)
            .is_some_and(|h| h.append && h.ino == ino);
        (!append).then_some(offset)
    }

    /// The store this filesystem serves.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Forget everything a guest session held (lookup counts, handles) and
    /// remove the unlinked inodes only it kept alive. Called when a new FUSE
    /// session starts and when the frontend disconnects.
    pub fn reset_session(&self) {
        let (held, orphans): (Vec<u64>, Vec<u64>) = {
            let mut refs = lock(&self.refs);
            let held = refs.lookups.drain().map(|(ino, _)| ino).collect();
            (held, refs.orphans.drain().collect())
        };
        // Never lock the handle table and an inode together.
        lock(&self.handles).clear();
        *lock(&self.negotiated) = None;
        for ino in held {
            self.store.forgotten(ino);
        }
        // In batches: one transaction carries a bounded number of ops.
        for batch in orphans.chunks(ORPHANS_PER_TXN) {
            let _held = self.locks.lock(batch);
            let mut txn = Txn::new();
            for ino in batch {
                txn.push(crate::store::Op::RemoveInode { ino: *ino });
            }
            if let Err(e) = self.commit(txn) {
                warn!(count = batch.len(), error = %e, "could not remove unlinked inodes at session end");
            }
        }
    }

    /// Make everything committed so far durable.
    pub fn sync_all(&self) -> FsResult<()> {
        Ok(self.store.sync(None)?)
    }

    /// Bytes of file data the daemon holds dirty or in flight.
    pub fn dirty_bytes(&self) -> u64 {
        self.metrics.levels.dirty_bytes.get()
    }

    /// FUSE_SYNCFS (answered by the device layer: the FUSE server does not
    /// know it): [`sync_all`](Self::sync_all) as a guest request, counted
    /// and logged like any other.
    pub fn syncfs(&self) -> io::Result<()> {
        self.reply("syncfs", ROOT_INO, self.sync_all())
    }

    fn commit(&self, txn: Txn) -> FsResult<()> {
        self.writable()?;
        self.store.commit(txn)?;
        self.metrics.store_commits.inc();
        Ok(())
    }

    /// The inode `ino`, or ENOENT.
    fn inode(&self, ino: u64) -> FsResult<Inode> {
        self.store
            .get_inode(ino)?
            .ok_or(FsError::Errno(libc::ENOENT))
    }

    /// The directory `ino`, or ENOENT / ENOTDIR.
    fn dir(&self, ino: u64) -> FsResult<Inode> {
        let inode = self.inode(ino)?;
        if inode.kind != FileKind::Directory {
            return errno!(ENOTDIR);
        }
        Ok(inode)
    }

    /// A fresh id from the volume's id space. Ids increase: each range the
    /// store reserves lies above every earlier one. Once half of the range
    /// in use is handed out, the next is reserved on a thread of its own,
    /// so that a create does not wait for the store when the range runs
    /// out (a durable commit of the volume's id limit, or a round trip),
    /// nor fail while the store is briefly unreachable.
    fn alloc_id(&self) -> FsResult<u64> {
        let mut ids = lock(&self.ids);
        if ids.next == ids.end {
            let (first, end) = match ids.spare.take() {
                Some(spare) => spare,
                None => {
                    let range = id_range(self.store.reserve_ids(ID_BATCH)?)?;
                    if ids.ahead == Ahead::Failed {
                        ids.ahead = Ahead::Idle;
                    }
                    range
                }
            };
            ids.next = first;
            ids.end = end;
        }
        let id = ids.next;
        ids.next += 1;
        if ids.spare.is_none() && ids.ahead == Ahead::Idle && ids.end - ids.next < ID_BATCH / 2 {
            self.reserve_ahead(&mut ids);
        }
        Ok(id)
    }

    /// Reserve the range after the one in use on a thread of its own. A
    /// range it brings back that lies below the one in use by then (the
    /// request path reserved one meanwhile) is dropped: its ids are never
    /// handed out.
    fn reserve_ahead(&self, ids: &mut IdRange) {
        let store = Arc::clone(&self.store);
        let shared = Arc::clone(&self.ids);
        let spawned = std::thread::Builder::new()
            .name("pohmelfs-ids".into())
            .spawn(move || {
                let reserved = store.reserve_ids(ID_BATCH).and_then(id_range);
                let mut ids = lock(&shared);
                match reserved {
                    Ok((first, end)) => {
                        ids.ahead = Ahead::Idle;
                        if first >= ids.end {
                            ids.spare = Some((first, end));
                        }
                    }
                    Err(e) => {
                        ids.ahead = Ahead::Failed;
                        tracing::warn!(error = %crate::ErrorChain(&e), "could not reserve inode ids ahead; the next create that needs them asks the store");
                    }
                }
            });
        ids.ahead = match spawned {
            Ok(_) => Ahead::Running,
            Err(_) => Ahead::Failed,
        };
    }

    /// The reply entry for `inode`; the caller adds the lookup reference.
    fn entry(&self, inode: &Inode) -> Entry {
        Entry {
            inode: inode.ino,
            generation: 0,
            attr: attr::to_stat(inode),
            attr_flags: 0,
            attr_timeout: self.cfg.timeout(),
            entry_timeout: self.cfg.timeout(),
        }
    }

    /// Turn an operation's result into a reply, counting and logging errors
    /// (a guest can repeat a failing request at will, so the warning goes
    /// through the per-call-site limit).
    fn reply<T>(&self, op: &'static str, ino: u64, r: FsResult<T>) -> io::Result<T> {
        r.map_err(|e| {
            self.metrics.fs_errors.inc();
            if e.is_routine() {
                trace!(op, ino, errno = e.errno(), "request failed");
            } else {
                self.metrics.fs_internal_errors.inc();
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    op,
                    ino,
                    errno = e.errno(),
                    error = %Capped(crate::ErrorChain(&e)),
                    "request failed"
                );
            }
            e.into()
        })
    }
}

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod tests;
