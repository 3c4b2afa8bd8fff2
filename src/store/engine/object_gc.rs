//! Reclaiming data objects (`s3://`): deleting dead ones, rewriting
//! mostly dead (or small) ones.
//!
//! **Deleting.** A durable batch that dropped an object's last live byte
//! hands the object to the deleter thread, which deletes it after a grace
//! period (`pins.rs`): every read that began before, and so could still
//! name the object, has left; reads never wait for the deleter. A read that
//! outlasts [`DELETE_GRACE_MAX`] leaves the object to the next open's sweep
//! of dead objects. The acknowledgement never waits.
//!
//! **Rewriting** (a pass: every [`PASS_INTERVAL`] in the background, or
//! [`SlateStore::collect_objects`]). Objects whose live bytes (their `0x48`
//! record) are below [`LIVE_PERCENT_MIN`] of their size, and objects
//! smaller than [`SMALL_BYTES`] once they add up to half a target object,
//! are candidates, at most [`PASS_BYTES_MAX`] live bytes a pass. The pass
//! finds the extents naming them (one scan of the chunk records), reads
//! their windows with ranged GETs, packs them into new objects and uploads
//! those, all without the commit lock. Then, under the lock, it re-reads
//! each chunk it touches and moves an extent to the new copy only if it
//! still names the bytes copied (a commit since may have dropped it);
//! what moved is one batch, flushed before the old objects, now without
//! a live byte, go to the deleter. A crash before that batch is durable
//! leaves the new objects unreferenced: the next open deletes them. So
//! an object is deleted only when no durable record refers to it, and the
//! guest waits for no upload: its commits queue behind the pass only
//! while the pass builds one batch of at most [`PASS_BYTES_MAX`] bytes of
//! moves, from records in memory.
//!
//! **Shared objects** (`lineage.rs`): objects below the highest bound a
//! snapshot or clone registered may still be named by it. The deleter
//! skips them, a pass does not rewrite them, and only the sweep at open
//! deletes one, once neither this volume's records nor any holder's name
//! it. Inherited objects (in an origin's folder) are never deleted here.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use slatedb::Db;

use super::apply::{self, TxnView};
use super::codec::{self, Counters};
use super::extent::{self, Data, Extent, Piece};
use super::objects::{Objects, OBJECT_BYTES_TARGET};
use super::pins::Readers;
use super::record_cache::RecordCache;
use super::{keys, lineage, map_engine_error, objects as objs, SlateStore};
use crate::store::StoreError;

/// An object with fewer live bytes than this share of its size is
/// rewritten.
pub const LIVE_PERCENT_MIN: u64 = 50;

/// Objects smaller than this are merged, once enough of them are found.
pub const SMALL_BYTES: u64 = OBJECT_BYTES_TARGET / 8;

/// The most live bytes one pass copies (and holds in memory).
pub const PASS_BYTES_MAX: u64 = 32 << 20;

/// How often the background pass runs.
pub const PASS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Objects chosen for rewriting.
    pub candidates: u64,
    /// Objects uploaded with the copies.
    pub written: u64,
    /// Live bytes copied.
    pub copied: u64,
    /// Old objects handed to the deleter.
    pub deleted: u64,
}

enum Job {
    Delete(Vec<u64>),
    #[cfg_attr(not(test), allow(dead_code))]
    Barrier(mpsc::Sender<()>),
}

/// The deleter thread of one volume.
pub struct ObjectGc {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set at close: the background passes end.
    stopped: AtomicBool,
    /// Whose `shared_below` the deletions respect.
    objects: Arc<Objects>,
}

/// What a pass works on: the engine, the commit lock (moves are serialized
/// with commits), the objects and their deleter.
#[derive(Clone)]
pub struct Pass {
    pub db: Db,
    pub commit_lock: Arc<tokio::sync::Mutex<Counters>>,
    pub objects: Arc<Objects>,
    pub gc: Arc<ObjectGc>,
    pub records: Arc<RecordCache>,
}

/// How long the deleter waits for the reads that began before a deletion
/// (a ranged GET of an object it deletes may be among them).
const DELETE_GRACE_MAX: std::time::Duration = std::time::Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ObjectGc {
    pub fn start(
        objects: Arc<Objects>,
        readers: Arc<Readers>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<ObjectGc> {
        let (tx, rx) = mpsc::channel::<Job>();
        let kept = objects.clone();
        let thread = std::thread::Builder::new()
            .name("pohmelfs-objgc".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Delete(ids) => {
                            // No read that could still name these objects
                            // is in flight (`pins.rs`). A read that takes
                            // longer than the bound leaves them for the
                            // next open's sweep of dead objects.
                            if readers.grace(DELETE_GRACE_MAX) {
                                rt.block_on(objects.delete(&ids));
                            } else {
                                tracing::warn!(
                                    objects = ids.len(),
                                    "reads in flight past the grace bound; dead objects left for the next open"
                                );
                            }
                        }
                        Job::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(ObjectGc {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stopped: AtomicBool::new(false),
            objects: kept,
        })
    }

    /// Delete `ids` (objects no durable record of this volume refers to)
    /// off the caller's path; those a snapshot or clone may still refer to
    /// (below `shared_below`) stay for a sweep that reads their records.
    pub fn delete(&self, ids: Vec<u64>) {
        let ids: Vec<u64> = ids
            .into_iter()
            .filter(|id| *id >= self.objects.shared_below())
            .collect();
        self.delete_swept(ids);
    }

    /// Delete `ids`, which a sweep found referred to by no one.
    fn delete_swept(&self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(Job::Delete(ids));
        }
    }

    /// Wait until every deletion sent so far is done.
    #[cfg(test)]
    pub fn barrier(&self) {
        let (done, wait) = mpsc::channel();
        if let Some(tx) = lock(&self.tx).as_ref() {
            if tx.send(Job::Barrier(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// Finish the deletions queued and stop the thread.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        lock(&self.tx).take();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// One extent to move: where it is, and its window's bytes.
struct Copy {
    key: Vec<u8>,
    old: Piece,
    /// The window's object range in the old object.
    range: Range<u64>,
    bytes: Bytes,
    /// Where the copy went.
    new_id: u64,
    new_off: u64,
}

impl Pass {
    /// Delete the objects nothing refers to: those whose record counts no
    /// live byte, and those without a record (uploads of commits that
    /// never became durable). Runs at open, before any commit.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let (objects, gc) = (&self.objects, &self.gc);
        let live = self.object_records().await?;
        let listed = objects.list().await.map_err(StoreError::Io)?;
        // What snapshots and clones still name (`lineage.rs`): read only
        // when some object may be theirs.
        let held = if listed.iter().any(|(id, _)| *id < objects.shared_below()) {
            lineage::held(objects.store(), objects.db_path()).await?
        } else {
            Vec::new()
        };
        let mut puts = apply::Puts::new();
        let mut doomed = Vec::new();
        for (id, _) in listed {
            let unreferenced = match live.get(&id) {
                Some(0) => {
                    puts.push((keys::segment(id), None));
                    true
                }
                Some(_) => false,
                None => true,
            };
            if unreferenced && !lineage::is_held(&held, id) {
                doomed.push(id);
            }
        }
        if !puts.is_empty() {
            self.records
                .write_through(&self.db, &puts)
                .await
                .map_err(map_engine_error)?;
            self.db.flush().await.map_err(map_engine_error)?;
        }
        let n = doomed.len() as u64;
        gc.delete_swept(doomed);
        Ok(n)
    }

    /// The live bytes of every object, from their records.
    async fn object_records(&self) -> Result<BTreeMap<u64, u64>, StoreError> {
        let mut live = BTreeMap::new();
        let mut iter = self
            .db
            .scan(keys::segments_all())
            .await
            .map_err(map_engine_error)?;
        while let Some(kv) = iter.next().await.map_err(map_engine_error)? {
            live.insert(
                keys::decode_segment(&kv.key)?,
                codec::decode_segment(&kv.value)?,
            );
        }
        Ok(live)
    }

    /// Run passes every [`PASS_INTERVAL`] until the volume closes or is
    /// fenced; failures are logged (a pass moves or deletes nothing it has
    /// not finished).
    pub async fn background(self, describe: String) {
        loop {
            tokio::time::sleep(PASS_INTERVAL).await;
            if self.gc.stopped.load(Ordering::Acquire) {
                return;
            }
            match self.run().await {
                Ok(s) if s.candidates > 0 => {
                    tracing::debug!(volume = %describe, ?s, "data object pass");
                }
                Ok(_) => {}
                Err(StoreError::Fenced) => return,
                Err(e) => {
                    tracing::warn!(volume = %describe, error = %e, "data object pass failed; it runs again later");
                }
            }
        }
    }

    /// The objects a pass rewrites: below the liveness threshold, or
    /// small ones when they add up to half a target object; not pinned.
    async fn candidates(&self) -> Result<BTreeSet<u64>, StoreError> {
        let objects = &self.objects;
        let live = self.object_records().await?;
        let mut sparse = Vec::new();
        let mut small = Vec::new();
        for (id, size) in objects.list().await.map_err(StoreError::Io)? {
            let Some(&l) = live.get(&id) else { continue };
            // Shared objects stay as they are: a copy would not free them.
            if !objects.deletable(id) || size == 0 || id < objects.shared_below() {
                continue;
            }
            if l.saturating_mul(100) < size.saturating_mul(LIVE_PERCENT_MIN) {
                sparse.push((l, id));
            } else if size < SMALL_BYTES {
                small.push((l, id));
            }
        }
        sparse.sort_unstable();
        let mut out = BTreeSet::new();
        let mut budget = PASS_BYTES_MAX;
        for (l, id) in sparse {
            if l > budget {
                break;
            }
            budget -= l;
            out.insert(id);
        }
        let small_live: u64 = small.iter().map(|(l, _)| l).sum();
        if small.len() > 1 && small_live.min(budget) >= OBJECT_BYTES_TARGET / 2 {
            for (l, id) in small {
                if l > budget {
                    break;
                }
                budget -= l;
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// One rewriting pass (see the module documentation).
    pub async fn run(&self) -> Result<PassStats, StoreError> {
        let (objects, gc) = (&self.objects, &self.gc);
        let chosen = self.candidates().await?;
        let mut stats = PassStats {
            candidates: chosen.len() as u64,
            ..PassStats::default()
        };
        if chosen.is_empty() {
            return Ok(stats);
        }
        let mut copies = self.find_extents(&chosen).await?;
        // Read the windows (checked), pack them, upload the packs.
        let want: Vec<(Piece, Range<u32>)> = copies
            .iter()
            .map(|(c, e)| (c.old.clone(), e.start..e.end()))
            .collect();
        let bytes = match objects.read_many(&want).await {
            Ok(b) => b,
            // A commit emptied (and deleted) one meanwhile: next pass.
            Err(StoreError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(stats),
            Err(e) => return Err(e),
        };
        let lens: Vec<u64> = bytes.iter().map(|b| b.len() as u64).collect();
        let (placed, first, mut packs) = objects.packs_for(&lens)?;
        for (((c, _), b), p) in copies.iter_mut().zip(bytes).zip(&placed) {
            let pack = &mut packs[(p.seg - first) as usize];
            pack.parts.push(b.clone());
            pack.len += p.len;
            c.bytes = b;
            c.new_id = p.seg;
            c.new_off = p.seg_off;
        }
        let new_ids: Vec<u64> = packs.iter().map(|p| p.id).collect();
        for id in &new_ids {
            objects.pin(*id);
        }
        let moved = match objects.upload(packs).await {
            Ok(()) => {
                #[cfg(test)]
                self.objects.wait_at_gc_gate();
                self.move_extents(&copies).await
            }
            Err(e) => Err(StoreError::Io(e)),
        };
        for id in &new_ids {
            objects.unpin(*id);
        }
        let (emptied, used) = match moved {
            Ok(v) => v,
            Err(e) => {
                gc.delete(new_ids);
                return Err(e);
            }
        };
        // New objects nothing moved into: no durable record names them.
        gc.delete(
            new_ids
                .iter()
                .copied()
                .filter(|id| !used.contains(id))
                .collect(),
        );
        stats.written = used.len() as u64;
        stats.copied = copies.iter().map(|(c, _)| c.bytes.len() as u64).sum();
        stats.deleted = emptied.len() as u64;
        gc.delete(emptied);
        Ok(stats)
    }

    /// Every extent window that names one of `chosen`, with its chunk key.
    async fn find_extents(
        &self,
        chosen: &BTreeSet<u64>,
    ) -> Result<Vec<(Copy, Extent)>, StoreError> {
        let mut out = Vec::new();
        let mut iter = self
            .db
            .scan(keys::blocks_all())
            .await
            .map_err(map_engine_error)?;
        while let Some(kv) = iter.next().await.map_err(map_engine_error)? {
            for e in extent::decode(&kv.value)? {
                if let Data::Segment(p) = &e.data {
                    if chosen.contains(&p.seg) {
                        out.push((
                            Copy {
                                key: kv.key.to_vec(),
                                old: p.clone(),
                                range: p.seg_range(e.start..e.end()),
                                bytes: Bytes::new(),
                                new_id: 0,
                                new_off: 0,
                            },
                            e,
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Under the commit lock, point every extent that still names copied
    /// bytes at their copy; write that batch and make it durable. The old
    /// objects left without a live byte, and the new ones that got one.
    async fn move_extents(
        &self,
        copies: &[(Copy, Extent)],
    ) -> Result<(Vec<u64>, BTreeSet<u64>), StoreError> {
        let mut by_key: BTreeMap<&[u8], Vec<&Copy>> = BTreeMap::new();
        for (c, _) in copies {
            by_key.entry(&c.key).or_default().push(c);
        }
        let mut counters = self.commit_lock.lock().await;
        let mut view = TxnView::new(&self.db, None, None);
        view.objects = Some(&self.objects);
        view.records = Some(&self.records);
        for (key, moves) in by_key {
            let Some(value) = view.get(key).await? else {
                continue;
            };
            let old = extent::decode(&value)?;
            let new: Vec<Extent> = old.iter().map(|e| relocate(e, &moves)).collect();
            if new != old {
                apply::replace_chunk(&mut view, key.to_vec(), &old, new).await?;
            }
        }
        let deltas = view.live_delta.clone();
        view.settle_segments().await?;
        let emptied = std::mem::take(&mut view.emptied);
        let used: BTreeSet<u64> = deltas
            .iter()
            .filter(|(id, d)| **d > 0 && copies.iter().any(|(c, _)| c.new_id == **id))
            .map(|(id, _)| *id)
            .collect();
        let (puts, after): (apply::Puts, Counters) = view.finish(*counters)?;
        if puts.is_empty() {
            return Ok((emptied, used));
        }
        self.records
            .write_through(&self.db, &puts)
            .await
            .map_err(map_engine_error)?;
        *counters = after;
        drop(counters);
        self.db.flush().await.map_err(map_engine_error)?;
        Ok((emptied, used))
    }
}

impl SlateStore {
    /// What a data object pass works on (`s3://` volumes).
    pub(super) fn object_pass(&self) -> Option<Pass> {
        Some(Pass {
            db: self.db.clone(),
            commit_lock: self.commit_lock.clone(),
            objects: self.objects.clone()?,
            gc: self.object_gc.clone()?,
            records: self.records.clone(),
        })
    }

    /// Rewrite the data objects below the liveness threshold now, as the
    /// background pass does every 30 s (`object_gc.rs`); nothing to do
    /// without data objects.
    pub fn collect_objects(&self) -> Result<PassStats, StoreError> {
        self.check_writable()?;
        let Some(pass) = self.object_pass() else {
            return Ok(PassStats::default());
        };
        self.note(self.rt()?.block_on(pass.run()))
    }

    /// How many uploads, ranged reads and deletes of data objects this
    /// instance made.
    pub fn object_counts(&self) -> (u64, u64, u64) {
        self.objects
            .as_deref()
            .map_or((0, 0, 0), objs::Objects::counts)
    }
}

/// `e`, moved to its copy when one of `moves` holds all of its bytes.
fn relocate(e: &Extent, moves: &[&Copy]) -> Extent {
    let Data::Segment(p) = &e.data else {
        return e.clone();
    };
    let r = p.seg_range(e.start..e.end());
    let Some(c) = moves
        .iter()
        .find(|c| c.old.seg == p.seg && c.range.start <= r.start && r.end <= c.range.end)
    else {
        return e.clone();
    };
    let from = (r.start - c.range.start) as usize;
    let bytes = &c.bytes[from..from + (r.end - r.start) as usize];
    let seg_off = c.new_off + from as u64;
    Extent {
        start: e.start,
        len: e.len,
        data: Data::Segment(Piece {
            seg: c.new_id,
            seg_off,
            start: e.start,
            len: e.len,
            crcs: extent::page_crcs(seg_off, &[bytes]),
        }),
    }
}
