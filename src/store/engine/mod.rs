//! The durable volume engine: a [`Store`] on SlateDB, an LSM tree whose WAL
//! and tables live in an object store (a local directory or an S3 bucket).
//!
//! One [`Txn`] becomes one SlateDB write batch, so it is atomic. On a
//! `file://` volume the bytes of its writes go first to an append-only
//! segment file (`segment.rs`). SlateDB holds metadata only: inodes,
//! entries, xattrs, and per-chunk extent lists (`extent.rs`); `s3://`
//! volumes keep the bytes inline in the extents. Commits are serialized
//! while their batch is built (building reads what earlier commits left,
//! see `apply.rs`).
//!
//! On `file://` a commit is durable once its record is in the commit log
//! (`log.rs`): its batch and the bytes of its small writes, one `pwrite`
//! and one `fdatasync` of a preallocated file, shared by the commits that
//! queued while the record before was written (`log_queue.rs`). It is
//! acknowledged then; its batch goes to SlateDB's memtable behind it, in
//! log order (reads lay the groups not yet there over the engine), and
//! SlateDB's WAL follows on its timer; larger writes are synced in their segment before the record. Opening replays the log
//! and checkpoints move its tail (`recover.rs`). On `s3://` (and with
//! `log=off`) the batch goes to SlateDB once the segment bytes are
//! durable, and commits wait for its WAL together, sharing flushes
//! (`group.rs`). Either way, the segment pages a commit stopped referring
//! to are punched, and segments it emptied deleted, by a thread of their
//! own (`reclaim.rs`), only once no replay can write them again.
//!
//! The key layout is in `keys.rs`, value encodings in `codec.rs` and
//! `extent.rs`; all are described in `docs/store-layout.md`.
//!
//! A volume served read-only (`serve --readonly`) is not opened here but
//! by `readonly.rs`, through SlateDB's reader: it writes nothing.
//!
//! This module owns the engine instance, its tokio runtime, the superblock,
//! the id counter and the exactly-once records (opening them is
//! `open.rs`). The sync [`Store`] methods
//! block on the runtime, so they must never be called from a thread that
//! drives async tasks (a worker of this or any runtime); plain threads and
//! `spawn_blocking` are fine, and dropping is fine anywhere. It never
//! interprets POSIX semantics: ops are applied blind.
//!
//! Reads see every commit that has returned `Ok`; without the commit log
//! they may also see a commit that has been appended to the WAL but is
//! still waiting for durability. Should that wait fail (the volume was
//! fenced by another writer, or the engine closed), or the commit log's
//! write or sync fail, the commit returns `Err` and the instance is
//! unusable.

mod acked;
mod apply;
mod born;
mod chunk_read;
mod close;
mod codec;
mod commit;
mod compactor;
mod config;
mod extent;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz;
mod group;
pub mod holder;
mod identity;
mod keys;
mod lease;
pub mod lineage;
mod log;
mod log_queue;
mod log_record;
mod object_gc;
mod objects;
mod once;
mod open;
mod orphans;
mod overlay;
mod pins;
mod read_plan;
mod reader;
mod readonly;
mod reclaim;
mod record_cache;
mod recover;
mod s3_lock;
pub mod s3_snapshot;
mod scan;
mod segment;
mod shared;
pub mod snapshot;
#[cfg(test)]
mod test_hooks;
mod threads;
mod view;
mod writer;

#[cfg(test)]
mod apply_behind_tests;
#[cfg(test)]
mod born_tests;
#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod log_group_tests;
#[cfg(test)]
mod log_tests;
#[cfg(test)]
mod object_tests;
#[cfg(test)]
mod readonly_tests;
#[cfg(test)]
mod recover_tests;
#[cfg(test)]
mod s3_snapshot_tests;
#[cfg(test)]
mod s3_tests;
#[cfg(test)]
mod segment_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use slatedb::Db;

use crate::store::{
    CommitOutcome, Dirent, Inode, OnceStore, ReadData, Store, StoreError, StoreStats, Txn,
    WriterClaim, BLOCK_SIZE,
};
pub use codec::{reads_format, FORMAT_VERSION, UPGRADES_FROM};
use codec::{Counters, Superblock};
pub use extent::{Data as ExtentData, Extent, Piece as ExtentPiece, PAGE as SEGMENT_PAGE};
pub use group::CommitMode;
use identity::map_engine_error;
pub use identity::{OpenVolumeError, VolumeIdentity};
pub use objects::ObjectFiles;
pub use open::OpenMode;
pub use read_plan::{ReadPiece, ReadPlan};
pub use reader::{OpenReaderError, VolumeReader};
pub use readonly::ReadOnlyVolume;
pub use scan::{
    BlockRecord, DirentRecord, KeyRange, RawScan, Scan, VolumeInfo, VolumeScan, XattrRecord,
};
pub use segment::SegmentFiles;
use segment::Segments;

/// Ids are reserved durably this many at a time beyond what a caller asks
/// for, so most `reserve_ids` calls touch no disk. A restart skips the
/// unused rest.
const ID_CHUNK: u64 = 4096;

/// Where file data goes; only tests choose.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Placement {
    /// Segments on `file://`, inline on `s3://`.
    Default,
    /// Inline, even on `file://`.
    Inline,
    /// Segments sealed at this many bytes.
    SegmentsOf(u64),
    /// Data objects in the volume's directory, as on `s3://` (no
    /// segments, no commit log).
    Objects,
}

/// What `reserve_ids` hands out from.
struct IdRange {
    /// The next id to hand out.
    next: u64,
    /// The superblock's durable high-water mark: ids below it may be handed
    /// out without writing.
    limit: u64,
}

/// A volume on SlateDB.
pub struct SlateStore {
    db: Db,
    superblock: Superblock,
    capacity_bytes: u64,
    capacity_inodes: u64,
    describe: String,
    /// Held while a commit reads, builds and appends its batch: commits
    /// apply in this order. Holds the space counters as of the last append.
    commit_lock: Arc<tokio::sync::Mutex<Counters>>,
    /// Copies of the counters for statfs, which must not wait behind a
    /// commit.
    used_blocks: AtomicU64,
    used_inodes: AtomicU64,
    used_meta_bytes: AtomicU64,
    ids: tokio::sync::Mutex<IdRange>,
    group: group::GroupCommit,
    /// The segment files of a `file://` volume; `None` on `s3://`.
    segments: Option<Arc<Segments>>,
    /// The data objects of an `s3://` volume (`objects.rs`).
    objects: Option<Arc<objects::Objects>>,
    /// Deletes dead data objects and rewrites mostly dead ones
    /// (`object_gc.rs`), with `objects`.
    object_gc: Option<Arc<object_gc::ObjectGc>>,
    /// Punches and deletes what durable batches freed (`file://` only).
    reclaimer: Option<Arc<reclaim::Reclaimer>>,
    /// The commit log and its checkpoints (`file://` only): commits are
    /// durable once logged.
    checkpoint: Option<Arc<recover::Checkpoint>>,
    /// Batches built and waiting for their commit-log record (`file://`
    /// with the log only).
    log_queue: Arc<log_queue::LogQueue>,
    /// Recently read and written chunk, inode and segment records
    /// (`record_cache.rs`): what the engine holds, without its lookup.
    records: Arc<record_cache::RecordCache>,
    /// The inodes born since this instance opened, and what they own
    /// (`born.rs`): removing one needs no range scan.
    born: born::Born,
    /// The transactions of each fresh session applied here (`once.rs`).
    applied: once::Applied,
    /// Reads in flight by epoch (`pins.rs`): the reclaimer punches a page
    /// only after every read that could name it has left.
    readers: Arc<pins::Readers>,
    /// Set once the engine reports that another writer fenced this one.
    fenced: AtomicBool,
    closed: AtomicBool,
    /// Set by a hand-over that let the volume go with the engine still
    /// open: the drop closes it (`close.rs`).
    handed: AtomicBool,
    /// SlateDB's compactor, started once the volume is open (`compactor.rs`).
    compactor: std::sync::OnceLock<Arc<compactor::Compactor>>,
    /// The runtime's threads (`threads.rs`).
    threads: Arc<threads::EngineThreads>,
    /// The holder record this instance wrote (`holder.rs`), removed at
    /// close.
    lease: Option<lease::Lease>,
    /// Held for writing by a test to stall every engine read.
    #[cfg(test)]
    read_gate: Arc<tokio::sync::RwLock<()>>,
    /// Declared last: dropped after the engine, which spawned its tasks here.
    /// `None` only inside `drop`.
    runtime: Option<tokio::runtime::Runtime>,
}

/// A bound on a wait for the engine to make something durable: `secs` in
/// service, where on a full disk its flush retries for good and nothing
/// may hang with it; 10 s in tests, short, but not so short that a debug
/// build's flush on a loaded machine would hit it.
pub(super) fn durable_wait(secs: u64) -> std::time::Duration {
    std::time::Duration::from_secs(if cfg!(test) { 10 } else { secs })
}

/// How long a read of the engine (a record, a listing, file data) may take
/// before it fails with EIO, in seconds ([`durable_wait`]): SlateDB
/// retries a failing object store for good (expired S3 credentials, an
/// endpoint that stays down, a bad sector under `file://`), and a guest
/// request must end.
const READ_WAIT_SECS: u64 = 60;

/// How long an id reservation waits, for one under way and for the engine
/// to make its own durable, before it fails (the create that asked gets
/// EIO), in seconds ([`durable_wait`]).
const RESERVE_WAIT_SECS: u64 = 60;

impl SlateStore {
    /// Run the engine read `read` on the runtime, failing it (TimedOut)
    /// past [`READ_WAIT_SECS`].
    pub(super) fn bounded_read<T>(
        &self,
        read: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let wait = durable_wait(READ_WAIT_SECS);
        self.rt()?.block_on(async {
            tokio::time::timeout(wait, read).await.unwrap_or_else(|_| {
                Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{}: a read of the engine did not end within {wait:?}",
                        self.describe
                    ),
                )))
            })
        })
    }

    /// The volume's id, random at creation.
    pub fn volume_id(&self) -> [u8; 16] {
        self.superblock.volume_id
    }

    /// Whether this instance still renews its holder record (tests).
    #[cfg(test)]
    pub(crate) fn renews_its_holder_record(&self) -> bool {
        self.lease.as_ref().is_some_and(|l| l.renewing())
    }

    /// What the volume is and who holds it, for `pohmelfs status`.
    pub fn identity(&self) -> VolumeIdentity {
        VolumeIdentity {
            volume_id: self.superblock.volume_id,
            format_version: self.superblock.format_version,
            epoch: self.superblock.open_count,
            holder: self.lease.as_ref().map(|l| l.record.clone()),
        }
    }

    /// The engine's runtime; it lives until the store is dropped, so the
    /// error is only seen by a call that races the drop.
    fn rt(&self) -> Result<&tokio::runtime::Runtime, StoreError> {
        self.runtime
            .as_ref()
            .ok_or_else(|| StoreError::Io(std::io::Error::other("engine runtime stopped")))
    }

    /// How many WAL flushes commits have asked for (group commit shares
    /// them, so under load this stays well below the commit count).
    pub fn flushes(&self) -> u64 {
        self.group.flushes()
    }

    /// How many segment `fdatasync` calls commits asked for (shared among
    /// concurrent commits, like WAL flushes).
    pub fn segment_syncs(&self) -> u64 {
        self.segments.as_deref().map_or(0, Segments::syncs)
    }

    /// Where this volume's extents point.
    fn files(&self) -> apply::Files<'_> {
        apply::Files {
            segments: self.segments.as_deref(),
            objects: self.objects.as_deref(),
        }
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(StoreError::Fenced);
        }
        if let Some(cp) = &self.checkpoint {
            cp.log.check().map_err(recover::map_log_error)?;
        }
        Ok(())
    }

    /// Remember fencing so every later write fails fast.
    fn note<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Fenced) = r {
            if !self.fenced.swap(true, Ordering::AcqRel) {
                tracing::error!(volume = %self.describe, "another writer opened the volume; this instance is fenced");
            }
        }
        r
    }

    async fn reserve_ids_inner(&self, count: u64) -> Result<u64, StoreError> {
        let mut ids = self.ids.lock().await;
        let end = ids
            .next
            .checked_add(count)
            .ok_or_else(|| StoreError::Corrupt("id space exhausted".into()))?;
        if end > ids.limit {
            self.check_writable()?;
            let limit = end.saturating_add(ID_CHUNK);
            let sb = Superblock {
                next_id: limit,
                ..self.superblock.clone()
            };
            let handle = self
                .db
                .put(keys::superblock(), codec::encode_superblock(&sb))
                .await
                .map_err(map_engine_error)?;
            self.group.written(&handle);
            self.group
                .wait(&self.db, &handle)
                .await
                .map_err(map_engine_error)?;
            ids.limit = limit;
        }
        let first = ids.next;
        ids.next = end;
        self.born.reserved(end);
        Ok(first)
    }

    async fn read_inner(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        if self.objects.is_some() {
            return self.read_through_plan(ino, offset, buf).await;
        }
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let index = pos / BLOCK_SIZE;
            let in_chunk = (pos % BLOCK_SIZE) as u32;
            let n = (buf.len() - done).min(BLOCK_SIZE as usize - in_chunk as usize);
            let out = &mut buf[done..done + n];
            match self.chunk_record(ino, index).await? {
                Some(v) => {
                    let list = extent::decode(&v).map_err(|e| match e {
                        StoreError::Corrupt(m) => {
                            StoreError::Corrupt(format!("block {index} of inode {ino}: {m}"))
                        }
                        other => other,
                    })?;
                    apply::read_chunk(self.files(), &list, in_chunk, out).await?;
                }
                None => out.fill(0),
            }
            done += n;
            pos = match pos.checked_add(n as u64) {
                Some(p) => p,
                // Past the largest offset nothing is stored: zeros.
                None => break,
            };
        }
        Ok(())
    }
}

impl Store for SlateStore {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.bounded_read(async {
            match self.get(keys::inode(ino)).await? {
                Some(v) => Ok(Some(codec::decode_inode(ino, &v)?)),
                None => Ok(None),
            }
        })
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        self.bounded_read(async {
            match self.get(keys::dirent_by_name(parent, name)).await? {
                Some(v) => Ok(Some(codec::decode_dirent_by_name(name, &v)?)),
                None => Ok(None),
            }
        })
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        self.bounded_read(async {
            self.scan(keys::cookies_after(parent, after), max)
                .await?
                .iter()
                .map(|(k, v)| {
                    let (_, cookie) = keys::decode_dirent_by_cookie(k)?;
                    codec::decode_dirent_by_cookie(cookie, v)
                })
                .collect()
        })
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let _in = self.readers.enter();
        self.bounded_read(self.read_inner(ino, offset, buf))
    }

    fn read_data(&self, ino: u64, offset: u64, len: usize) -> Result<ReadData, StoreError> {
        self.read_pinned(ino, offset, len)
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        self.bounded_read(async {
            let first = self
                .scan(keys::blocks_from(ino, offset / BLOCK_SIZE), 1)
                .await?;
            match first.first() {
                Some((k, _)) => {
                    let (_, index) = keys::decode_block(k)?;
                    Ok(Some(index.saturating_mul(BLOCK_SIZE).max(offset)))
                }
                None => Ok(None),
            }
        })
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.bounded_read(self.next_hole_inner(ino, offset))
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.bounded_read(async {
            match self.get(keys::symlink(ino)).await? {
                Some(v) => Ok(Some(codec::decode_bytes("symlink", &v)?.to_vec())),
                None => Ok(None),
            }
        })
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.bounded_read(async {
            match self.get(keys::xattr(ino, name)).await? {
                Some(v) => Ok(Some(codec::decode_bytes("xattr", &v)?.to_vec())),
                None => Ok(None),
            }
        })
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        // Names only, values dropped as the scan passes them (each may be
        // 64 KiB), and no more names than a list may hold: a store
        // server's writer could set any number.
        self.bounded_read(async {
            let (mut names, mut listed, mut bad) = (Vec::new(), 0usize, None);
            self.scan_each(keys::xattrs_of(ino), |k, _| {
                match keys::decode_xattr(&k) {
                    Ok((_, name)) => {
                        listed += name.len() + 1;
                        names.push(name.to_vec());
                    }
                    Err(e) => bad = Some(e),
                }
                bad.is_none() && listed <= crate::store::XATTR_LIST_MAX
            })
            .await?;
            if let Some(e) = bad {
                return Err(e);
            }
            if listed > crate::store::XATTR_LIST_MAX {
                return Err(StoreError::Corrupt(format!(
                    "inode {ino}: more than {} bytes of extended attribute names",
                    crate::store::XATTR_LIST_MAX
                )));
            }
            Ok(names)
        })
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        // Metadata is charged against the capacity: what is reported is
        // what is left for file data, so free space is exact while
        // `used_bytes` means data blocks, as for every store.
        let meta = self.used_meta_bytes.load(Ordering::Acquire);
        Ok(StoreStats {
            capacity_bytes: self.capacity_bytes.saturating_sub(meta),
            used_bytes: self
                .used_blocks
                .load(Ordering::Acquire)
                .saturating_mul(BLOCK_SIZE),
            capacity_inodes: self.capacity_inodes,
            used_inodes: self.used_inodes.load(Ordering::Acquire),
        })
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        let bound = durable_wait(RESERVE_WAIT_SECS);
        let reserved = self
            .rt()?
            .block_on(async { tokio::time::timeout(bound, self.reserve_ids_inner(count)).await })
            .unwrap_or_else(|_| {
                Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the engine did not make an id reservation durable within {bound:?} (is its disk full?)"),
                )))
            });
        self.note(reserved)
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.note(self.rt()?.block_on(self.commit_inner(None, txn)))
            .map(|_| ())
    }

    fn sync(&self, _ino: Option<u64>) -> Result<(), StoreError> {
        // Every commit was durable before it returned.
        self.check_writable()
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn snapshot(&self, name: &str) -> Result<String, StoreError> {
        match self.take_any_snapshot(name) {
            Ok(path) => Ok(path),
            Err(e) => Err(StoreError::Io(std::io::Error::other(e))),
        }
    }

    fn identity(&self) -> Option<VolumeIdentity> {
        Some(SlateStore::identity(self))
    }
}

impl OnceStore for SlateStore {
    fn commit_once(
        &self,
        session: u64,
        txn_id: u64,
        txn: Txn,
    ) -> Result<CommitOutcome, StoreError> {
        self.note(
            self.rt()?
                .block_on(self.commit_inner(Some((session, txn_id)), txn)),
        )
    }

    fn prune_applied(&self, session: u64, below: u64) -> Result<(), StoreError> {
        self.note(self.rt()?.block_on(self.prune_inner(session, below)))
    }

    fn epoch(&self) -> u64 {
        self.superblock.open_count
    }

    fn reclaim_orphans_except(&self, spare: &[u64]) -> Result<u64, StoreError> {
        SlateStore::reclaim_orphans_except(self, spare)
    }

    fn writer_claim(&self) -> Result<Option<WriterClaim>, StoreError> {
        self.note(self.rt()?.block_on(self.writer_claim_inner()))
    }

    fn set_writer_claim(&self, claim: WriterClaim) -> Result<(), StoreError> {
        self.note(self.rt()?.block_on(self.set_writer_claim_inner(claim)))
    }
}
