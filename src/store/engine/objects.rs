//! Data objects: where an `s3://` volume keeps file data, outside the LSM
//! tree.
//!
//! A commit packs the bytes of its writes into immutable objects
//! `<volume>/data/<id>.obj` of about [`OBJECT_BYTES_TARGET`] (the id as 16
//! hex digits: the open's epoch, which every open raises durably, above a
//! counter of this open, so an id is never used twice, not even by a fenced
//! writer),
//! uploads them in parallel (at most [`UPLOADS_IN_FLIGHT`] at a time) and
//! only then builds its batch, whose extents name `(object, offset)`
//! exactly as a `file://` volume's name `(segment, offset)`: data is
//! durable before the metadata that references it. Bytes are packed
//! tightly (no page padding: nothing is punched in an object); the
//! per-page checksums of an extent are taken on the object's 4 KiB pages,
//! as for segments.
//!
//! An object is pinned from its upload until its commit's batch is
//! written or abandoned: a pinned object is never deleted. Objects are
//! deleted only once a durable batch dropped their last live byte (or, at
//! open, when no record names them: the uploads of a commit that never
//! became durable); rewriting mostly dead ones is `object_gc.rs`.
//!
//! This module owns the objects' names and bytes; it never reads the
//! engine and never decides what is live.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use super::extent::{pages_of, Piece, PAGE};
use super::lineage::Lineage;
use super::segment::Placed;
use crate::store::StoreError;

/// A commit starts a new object once the current one holds this many
/// bytes (a single write larger than this gets an object of its own size).
pub const OBJECT_BYTES_TARGET: u64 = 4 << 20;

/// Uploads one commit (or one garbage collection pass) runs at once.
pub const UPLOADS_IN_FLIGHT: usize = 8;

/// The most objects one open creates: ids are `epoch << 32 | n`.
const IDS_PER_OPEN: u64 = 1 << 32;

/// The folder of data objects inside the volume's path.
pub const DIR_NAME: &str = "data";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain counters behind it: still true after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The file name of object `id`.
pub fn file_name(id: u64) -> String {
    format!("{id:016x}.obj")
}

/// The id of an object file name, if it is one.
pub fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".obj")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// One object to upload: its id and its bytes, in order.
#[derive(Debug, Default)]
pub struct Pack {
    pub id: u64,
    pub parts: Vec<Bytes>,
    pub len: u64,
}

/// Lay out writes of the given lengths into packs: where each one goes
/// (in order), and how many objects that takes. Ids are `first..`.
pub fn plan(lens: &[u64], first: u64) -> (Vec<Placed>, u64) {
    let mut out = Vec::with_capacity(lens.len());
    let (mut id, mut at, mut used) = (first, 0u64, false);
    for &len in lens {
        if used && at + len > OBJECT_BYTES_TARGET {
            id += 1;
            at = 0;
        }
        out.push(Placed {
            seg: id,
            seg_off: at,
            len,
        });
        at += len;
        used = true;
    }
    (out, if used { id - first + 1 } else { 0 })
}

/// How many objects [`plan`] needs for writes of these lengths.
pub fn objects_needed(lens: &[u64]) -> u64 {
    plan(lens, 0).1
}

/// The data objects of one volume.
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    dir: ObjectPath,
    /// The volume's prefix in the store.
    db_path: String,
    /// Where inherited objects live (`lineage.rs`); empty for a volume of
    /// its own.
    lineage: Lineage,
    /// Objects below this id may be referenced by a snapshot or clone:
    /// only a sweep that read their records deletes them (`lineage.rs`).
    shared_below: AtomicU64,
    /// The open's epoch, the high half of every id it hands out.
    epoch: u64,
    /// The next id's low half.
    next: AtomicU64,
    /// Objects uploaded for a batch not written yet.
    pins: Mutex<HashMap<u64, usize>>,
    puts: AtomicU64,
    gets: AtomicU64,
    deletes: AtomicU64,
    /// Tests: fail this many of the next uploads.
    #[cfg(test)]
    pub fail_puts: AtomicU64,
    /// Tests: the next pass signals the first and waits for the second
    /// between its uploads and its moves.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub gc_gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    /// Tests: stop the next commit after its uploads, as a kill would.
    #[cfg(test)]
    pub stop_after_upload: std::sync::atomic::AtomicBool,
}

fn io(e: object_store::Error) -> std::io::Error {
    match e {
        object_store::Error::NotFound { .. } => {
            std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string())
        }
        e => std::io::Error::other(e.to_string()),
    }
}

impl Objects {
    pub fn new(store: Arc<dyn ObjectStore>, db_path: &str, epoch: u64) -> Objects {
        Objects {
            store,
            dir: ObjectPath::from(db_path).join(DIR_NAME),
            db_path: db_path.to_string(),
            lineage: Lineage::default(),
            shared_below: AtomicU64::new(0),
            epoch,
            next: AtomicU64::new(0),
            pins: Mutex::new(HashMap::new()),
            puts: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            #[cfg(test)]
            fail_puts: AtomicU64::new(0),
            #[cfg(test)]
            stop_after_upload: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            gc_gate: Mutex::new(None),
        }
    }

    /// These objects with the inherited ones where `lineage` says, and
    /// the ones below `shared_below` kept for the holders registered.
    pub fn with_lineage(mut self, lineage: Lineage, shared_below: u64) -> Objects {
        self.lineage = lineage;
        self.shared_below = AtomicU64::new(shared_below.max(self.lineage.own_from()));
        self
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The volume's prefix in the store.
    pub fn db_path(&self) -> &str {
        &self.db_path
    }

    pub fn lineage(&self) -> &Lineage {
        &self.lineage
    }

    /// Ids below this may be referenced by a snapshot or clone.
    pub fn shared_below(&self) -> u64 {
        self.shared_below.load(Ordering::Acquire)
    }

    /// Keep every object below `bound` from now on (a snapshot was taken).
    pub fn share_below(&self, bound: u64) {
        self.shared_below.fetch_max(bound, Ordering::AcqRel);
    }

    /// The id the next allocation returns: above every id allocated so far.
    pub fn next_unallocated(&self) -> u64 {
        self.epoch << 32 | self.next.load(Ordering::Acquire)
    }

    /// `n` fresh ids, the first returned; an open that used up its
    /// [`IDS_PER_OPEN`] must reopen.
    pub fn next_ids(&self, n: u64) -> Result<u64, StoreError> {
        let low = self.next.fetch_add(n, Ordering::Relaxed);
        if self.epoch >= IDS_PER_OPEN || low.saturating_add(n) > IDS_PER_OPEN {
            return Err(StoreError::Io(std::io::Error::other(
                "data object ids of this open used up; reopen the volume",
            )));
        }
        Ok(self.epoch << 32 | low)
    }

    /// Lay out writes of the lengths `lens` into fresh objects: where each
    /// write goes (in order), the first id, and one empty [`Pack`] per
    /// object, in id order.
    pub fn packs_for(&self, lens: &[u64]) -> Result<(Vec<Placed>, u64, Vec<Pack>), StoreError> {
        let first = self.next_ids(objects_needed(lens))?;
        let (placed, n) = plan(lens, first);
        let packs = (first..first + n)
            .map(|id| Pack {
                id,
                ..Pack::default()
            })
            .collect();
        Ok((placed, first, packs))
    }

    /// Tests: hold at the gate a test set, if any.
    #[cfg(test)]
    pub fn wait_at_gc_gate(&self) {
        if let Some((reached, go)) = lock(&self.gc_gate).take() {
            let _ = reached.send(());
            let _ = go.recv();
        }
    }

    /// Where object `id` lives: in the origin the lineage names for it,
    /// else in this volume's own folder.
    pub fn path(&self, id: u64) -> ObjectPath {
        match self.lineage.origin_of(id) {
            Some(prefix) => ObjectPath::from(prefix).join(DIR_NAME).join(file_name(id)),
            None => self.dir.clone().join(file_name(id)),
        }
    }

    /// How many uploads, ranged reads and deletes this instance made.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.puts.load(Ordering::Relaxed),
            self.gets.load(Ordering::Relaxed),
            self.deletes.load(Ordering::Relaxed),
        )
    }

    /// Pin `id` until [`Objects::unpin`]: it is not deleted meanwhile.
    pub fn pin(&self, id: u64) {
        *lock(&self.pins).entry(id).or_insert(0) += 1;
    }

    pub fn unpin(&self, id: u64) {
        let mut pins = lock(&self.pins);
        if let Some(n) = pins.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&id);
            }
        }
    }

    /// Whether `id` may be deleted once nothing refers to it.
    pub fn deletable(&self, id: u64) -> bool {
        !lock(&self.pins).contains_key(&id)
    }

    /// Upload `packs` in parallel, at most [`UPLOADS_IN_FLIGHT`] at once;
    /// `Ok` once every one is stored. On failure the ones stored are
    /// deleted again (best effort: a leftover is an orphan the next open
    /// removes).
    pub async fn upload(&self, packs: Vec<Pack>) -> std::io::Result<()> {
        let ids: Vec<u64> = packs.iter().map(|p| p.id).collect();
        let mut set = tokio::task::JoinSet::new();
        let mut failed = None;
        for p in packs {
            while set.len() >= UPLOADS_IN_FLIGHT {
                if let Some(r) = set.join_next().await {
                    failed = failed.or(joined(r).err());
                }
            }
            #[cfg(test)]
            if self
                .fail_puts
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                failed = failed.or(Some(std::io::Error::other("injected upload failure")));
                continue;
            }
            let store = self.store.clone();
            let path = self.path(p.id);
            self.puts.fetch_add(1, Ordering::Relaxed);
            set.spawn(async move {
                store
                    .put(&path, PutPayload::from_iter(p.parts))
                    .await
                    .map(|_| ())
                    .map_err(io)
            });
        }
        while let Some(r) = set.join_next().await {
            failed = failed.or(joined(r).err());
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                self.delete(&ids).await;
                Err(e)
            }
        }
    }

    /// Bytes `r` of object `id`, with one ranged GET.
    pub async fn read(&self, id: u64, r: Range<u64>) -> std::io::Result<Bytes> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let want = r.end - r.start;
        let got = self
            .store
            .get_range(&self.path(id), r.clone())
            .await
            .map_err(io)?;
        if got.len() as u64 != want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "object {id}: {} bytes at {} where {want} were asked",
                    got.len(),
                    r.start
                ),
            ));
        }
        Ok(got)
    }

    /// The bytes of chunk window `w` of `p`, checked: the piece's bytes in
    /// every page the window touches are read and compared with their
    /// checksums, so a damaged object is an error, never data.
    pub async fn read_piece(&self, p: &Piece, w: Range<u32>) -> Result<Bytes, StoreError> {
        let mut out = self.read_many(&[(p.clone(), w)]).await?;
        out.pop()
            .ok_or_else(|| StoreError::Corrupt("object read returned nothing".into()))
    }

    /// The bytes of every window, as [`Objects::read_piece`] checks them;
    /// the reads of one object that touch are merged into one ranged GET,
    /// and the GETs run in parallel (at most [`UPLOADS_IN_FLIGHT`]).
    pub async fn read_many(&self, want: &[(Piece, Range<u32>)]) -> Result<Vec<Bytes>, StoreError> {
        // The object range each window needs: the piece's bytes in every
        // page the window touches, so each page can be checked.
        let needs: Vec<(u64, Range<u64>)> = want
            .iter()
            .map(|(p, w)| (p.seg, checked_range(p, w.clone())))
            .collect();
        let mut order: Vec<usize> = (0..needs.len()).collect();
        order.sort_by_key(|&i| (needs[i].0, needs[i].1.start));
        // Merged GETs: (object, range), and which GET serves each window.
        let mut gets: Vec<(u64, Range<u64>)> = Vec::new();
        let mut served_by = vec![0usize; needs.len()];
        for i in order {
            let (id, r) = &needs[i];
            match gets.last_mut() {
                Some((gid, gr)) if gid == id && r.start <= gr.end => gr.end = gr.end.max(r.end),
                _ => gets.push((*id, r.clone())),
            }
            served_by[i] = gets.len() - 1;
        }
        let fetched = self.fetch(&gets).await?;
        let mut out = Vec::with_capacity(want.len());
        for (i, (p, w)) in want.iter().enumerate() {
            let g = served_by[i];
            let (base, bytes) = (gets[g].1.start, &fetched[g]);
            let r = &needs[i].1;
            let got = bytes.slice((r.start - base) as usize..(r.end - base) as usize);
            check_pages(p, r.clone(), &got)?;
            let from = (p.seg_at(w.start) - r.start) as usize;
            out.push(got.slice(from..from + (w.end - w.start) as usize));
        }
        Ok(out)
    }

    /// Run `gets` in parallel, bounded; their bytes in order.
    async fn fetch(&self, gets: &[(u64, Range<u64>)]) -> Result<Vec<Bytes>, StoreError> {
        let map = |id: u64, e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt(format!("extent past the end of object {id}"))
            } else {
                StoreError::Io(e)
            }
        };
        if let [(id, r)] = gets {
            return Ok(vec![self
                .read(*id, r.clone())
                .await
                .map_err(|e| map(*id, e))?]);
        }
        let mut out: Vec<Option<Bytes>> = vec![None; gets.len()];
        let mut set = tokio::task::JoinSet::new();
        let mut next = 0usize;
        while next < gets.len() || !set.is_empty() {
            while next < gets.len() && set.len() < UPLOADS_IN_FLIGHT {
                let (id, r) = (gets[next].0, gets[next].1.clone());
                let (store, path, i) = (self.store.clone(), self.path(id), next);
                self.gets.fetch_add(1, Ordering::Relaxed);
                set.spawn(async move {
                    let want = r.end - r.start;
                    let got = store.get_range(&path, r).await.map_err(io);
                    let got = got.and_then(|b| {
                        if b.len() as u64 == want {
                            Ok(b)
                        } else {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "short",
                            ))
                        }
                    });
                    (i, got.map_err(|e| map(id, e)))
                });
                next += 1;
            }
            if let Some(done) = set.join_next().await {
                let (i, got) = done.map_err(|e| {
                    StoreError::Io(std::io::Error::other(format!("object read task: {e}")))
                })?;
                out[i] = Some(got?);
            }
        }
        out.into_iter()
            .map(|b| b.ok_or_else(|| StoreError::Corrupt("object read lost".into())))
            .collect()
    }

    /// Delete objects `ids`; a failure is logged (the space leaks until
    /// the next open's sweep), never returned: nothing refers to them.
    pub async fn delete(&self, ids: &[u64]) {
        for id in ids {
            if self.lineage.origin_of(*id).is_some() {
                // Inherited: its owner's sweep decides.
                continue;
            }
            self.deletes.fetch_add(1, Ordering::Relaxed);
            match self.store.delete(&self.path(*id)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(object = id, error = %e, "deleting a dead data object failed; it stays until the next open");
                }
            }
        }
    }

    /// Every data object of this volume's own folder, as `(id, size)`, by
    /// id.
    pub async fn list(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.dir))
            .await
            .map_err(io)?;
        let mut out: Vec<(u64, u64)> = listed
            .objects
            .iter()
            .filter_map(|m| Some((m.location.filename().and_then(parse_name)?, m.size)))
            .collect();
        out.sort_unstable();
        Ok(out)
    }
}

/// The data objects of a volume for a caller without a runtime (the
/// checker, a read-only volume): blocking calls on the runtime of the
/// engine or reader that made it, from a thread that drives no tasks.
#[derive(Clone)]
pub struct ObjectFiles {
    objects: Arc<Objects>,
    rt: tokio::runtime::Handle,
}

impl ObjectFiles {
    pub(super) fn new(objects: Arc<Objects>, rt: tokio::runtime::Handle) -> ObjectFiles {
        ObjectFiles { objects, rt }
    }

    /// Every data object, as `(id, size)`, by id.
    pub fn list(&self) -> std::io::Result<Vec<(u64, u64)>> {
        self.rt.block_on(self.objects.list())
    }

    /// The registrations with this volume, each with the ids its holder
    /// names below its bound (`None`: an incomplete holder).
    pub fn held(&self) -> Result<Vec<super::lineage::Held>, super::lineage::LineageError> {
        self.rt.block_on(super::lineage::held(
            self.objects.store(),
            self.objects.db_path(),
        ))
    }

    /// The inherited objects (`lineage.rs`) that exist, as `(id, size)`:
    /// those of each origin's folder in the range the lineage gives it.
    pub fn list_inherited(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut from = 0;
        for o in &self.objects.lineage().origins {
            let dir = ObjectPath::from(o.prefix.as_str()).join(DIR_NAME);
            let listed = self
                .rt
                .block_on(self.objects.store.list_with_delimiter(Some(&dir)))
                .map_err(io)?;
            out.extend(listed.objects.iter().filter_map(|m| {
                let id = m.location.filename().and_then(parse_name)?;
                (from..o.bound).contains(&id).then_some((id, m.size))
            }));
            from = o.bound;
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The first id of this volume's own objects.
    pub fn own_from(&self) -> u64 {
        self.objects.lineage().own_from()
    }

    /// Fill `buf` from offset `off` of object `id`.
    pub fn read_at(&self, id: u64, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = off + buf.len() as u64;
        buf.copy_from_slice(&self.rt.block_on(self.objects.read(id, off..end))?);
        Ok(())
    }

    /// The checked bytes of every window, as the engine reads them.
    pub fn read_many(&self, want: &[(Piece, Range<u32>)]) -> Result<Vec<Bytes>, StoreError> {
        self.rt.block_on(self.objects.read_many(want))
    }
}

/// The object range holding the piece's bytes in every page window `w`
/// touches: what must be read to check the window.
fn checked_range(p: &Piece, w: Range<u32>) -> Range<u64> {
    let piece_end = p.seg_off + u64::from(p.len);
    let pages = pages_of(p.seg_range(w));
    (pages.start * PAGE).max(p.seg_off)..(pages.end * PAGE).min(piece_end)
}

/// Check `bytes`, the object's bytes `r` (a [`checked_range`] of `p`),
/// against the piece's page checksums.
pub fn check_pages(p: &Piece, r: Range<u64>, bytes: &[u8]) -> Result<(), StoreError> {
    let piece_end = p.seg_off + u64::from(p.len);
    let first = p.pages().start;
    for page in pages_of(r.clone()) {
        let s = (page * PAGE).max(p.seg_off);
        let e = ((page + 1) * PAGE).min(piece_end);
        let want = p.crcs.get((page - first) as usize).copied();
        let got = crate::checksum::crc32c(&bytes[(s - r.start) as usize..(e - r.start) as usize]);
        if want != Some(got) {
            return Err(StoreError::Corrupt(format!(
                "object {} page {page}: checksum {got:08x}, extent says {want:08x?}",
                p.seg
            )));
        }
    }
    Ok(())
}

fn joined(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    r.map_err(|e| std::io::Error::other(format!("upload task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pack_into_objects_of_the_target_size() {
        let mib = 1 << 20;
        let (placed, n) = plan(&[100, 200, 3 * mib, mib, 9 * mib, 5], 40);
        assert_eq!(n, 4);
        let at: Vec<(u64, u64)> = placed.iter().map(|p| (p.seg, p.seg_off)).collect();
        assert_eq!(
            at,
            vec![(40, 0), (40, 100), (40, 300), (41, 0), (42, 0), (43, 0)]
        );
        assert_eq!(plan(&[], 7).1, 0);
        assert_eq!(objects_needed(&[mib; 8]), 2);
        assert_eq!(parse_name(&file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_name("0abc.obj"), None);
    }
}
