//! Turning one [`Txn`] into one engine write batch.
//!
//! A [`TxnView`] is the volume as the transaction being built sees it: the
//! engine's committed state with this transaction's earlier ops laid over
//! it, so a write after a truncate in the same transaction sees the
//! truncated chunk. [`apply`] translates each [`Op`] into puts and deletes
//! on the view: a write adds one extent per chunk it touches (its bytes are
//! already in a segment, or go inline), trimming what it overlaps; truncate,
//! punch-hole and remove trim or drop extents. The view notes which segment
//! pages died and how each segment's live bytes moved;
//! [`TxnView::settle_segments`] puts the segment records and
//! [`TxnView::finish`] hands back the batch and how the space counters move.
//!
//! This module owns the meaning of ops in terms of keys. It never writes to
//! the engine (the caller does, once, with the whole batch), never punches
//! or deletes segment bytes (the caller does, once the batch is durable),
//! and it must be called with commits serialized: it reads what earlier
//! transactions left, in the engine or still queued for the commit log
//! (`log_queue.rs`).

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use slatedb::{Db, WriteBatch};

use super::chunk_cache::ChunkCache;
pub use super::chunk_read::{read_chunk, Files};
use super::codec::{self, Counters};
use super::extent::{self, Data, Extent, Piece, MAX_EXTENTS};
use super::keys::{self, tag};
use super::log_queue::LogQueue;
use super::map_engine_error;
use super::objects::{self, Objects};
use super::segment::{Placed, Segments};
use crate::store::{FileKind, Op, StoreError, BLOCK_SIZE};

/// A batch as a list: the key, and its new value or `None` to delete it.
pub type Puts = Vec<(Vec<u8>, Option<Bytes>)>;

/// The engine batch of `puts`.
pub fn to_batch(puts: &Puts) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for (k, v) in puts {
        match v {
            Some(v) => batch.put_bytes(Bytes::copy_from_slice(k), v.clone()),
            None => batch.delete(k),
        }
    }
    batch
}

/// One key this transaction has read or written.
struct Entry {
    /// The length of the key's value in the engine before this
    /// transaction (`None`: absent). Only kept exact for the keys the
    /// counters follow (see [`counted`]).
    base_len: Option<usize>,
    /// The key's value as the transaction sees it now.
    value: Option<Bytes>,
    /// Whether the transaction wrote the key.
    dirty: bool,
}

/// The engine's state as seen by one transaction being built.
pub struct TxnView<'a> {
    db: &'a Db,
    /// Batches built before this one and not yet in the engine (the
    /// commit log's queue): read before the engine.
    queued: Option<&'a LogQueue>,
    entries: BTreeMap<Vec<u8>, Entry>,
    /// The volume's segments (`file://`); `None` keeps data inline,
    /// unless the volume has data objects.
    pub segments: Option<&'a Segments>,
    /// The volume's data objects (`s3://`).
    pub objects: Option<&'a Objects>,
    /// Where a chunk rewrite's object ids come from (with `objects`).
    pub object_ids: Option<&'a (dyn Fn() -> Result<u64, StoreError> + Sync)>,
    /// The volume's chunk cache: chunk records read through it.
    pub chunks: Option<&'a ChunkCache>,
    /// Segment pages no extent refers to once this batch is durable.
    pub dead: BTreeMap<u64, Vec<Range<u64>>>,
    /// How the live bytes of each segment move.
    pub live_delta: BTreeMap<u64, i128>,
    /// Bytes appended while applying (chunk rewrites), to be made durable
    /// before the batch is written, or punched if it never is.
    pub appended: Vec<Placed>,
    /// Segments whose last live byte this batch drops: deleted once it is
    /// durable.
    pub emptied: Vec<u64>,
}

/// Whether the counters follow keys of this record type: blocks and
/// inodes by count, and every metadata record by its bytes.
fn counted(key: &[u8]) -> bool {
    key.first().is_some_and(|&t| t == tag::BLOCK || metered(t))
}

/// Whether records of this type count in the metadata bytes: what the
/// guest's namespace costs (chunk, segment and applied records are not
/// counted; a chunk is charged a whole block instead).
fn metered(t: u8) -> bool {
    matches!(
        t,
        tag::INODE | tag::SYMLINK | tag::DIRENT_BY_NAME | tag::DIRENT_BY_COOKIE | tag::XATTR
    )
}

/// The bytes a record of `key` with a value of `len` bytes counts.
fn record_bytes(key: &[u8], len: Option<usize>) -> i128 {
    len.map_or(0, |l| (key.len() + l) as i128)
}

impl<'a> TxnView<'a> {
    pub fn new(
        db: &'a Db,
        queued: Option<&'a LogQueue>,
        segments: Option<&'a Segments>,
    ) -> TxnView<'a> {
        TxnView {
            db,
            queued,
            entries: BTreeMap::new(),
            segments,
            objects: None,
            object_ids: None,
            chunks: None,
            dead: BTreeMap::new(),
            live_delta: BTreeMap::new(),
            appended: Vec::new(),
            emptied: Vec::new(),
        }
    }

    /// Put the segment records whose live bytes moved. A sealed segment
    /// that no extent refers to any more (and no append waits on) loses its
    /// record, and its file is deleted once the batch is durable.
    pub async fn settle_segments(&mut self) -> Result<(), StoreError> {
        let deltas: Vec<(u64, i128)> = std::mem::take(&mut self.live_delta)
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .collect();
        for (seg, delta) in deltas {
            let key = keys::segment(seg);
            let old = match self.get(&key).await? {
                Some(v) => codec::decode_segment(&v)?,
                None => 0,
            };
            let live = u64::try_from(i128::from(old) + delta).map_err(|_| {
                StoreError::Corrupt(format!(
                    "live bytes of segment {seg} went to {}",
                    i128::from(old) + delta
                ))
            })?;
            let deletable = self.segments.is_some_and(|s| s.deletable(seg))
                || self.objects.is_some_and(|o| o.deletable(seg));
            if live == 0 && deletable {
                self.delete(key).await?;
                self.emptied.push(seg);
                self.dead.remove(&seg);
            } else {
                self.put(key, codec::encode_segment(live)).await?;
            }
        }
        Ok(())
    }

    /// The value of `key` as this transaction sees it.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if let Some(e) = self.entries.get(key) {
            return Ok(e.value.clone());
        }
        let value = self.base(key).await?;
        self.entries.insert(
            key.to_vec(),
            Entry {
                base_len: value.as_ref().map(Bytes::len),
                value: value.clone(),
                dirty: false,
            },
        );
        Ok(value)
    }

    /// The value of `key` before this transaction: queued, else in the
    /// engine. The queue is read first: a key leaves it only once the
    /// engine has it.
    async fn base(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if let Some(v) = self.queued.and_then(|q| q.get(key)) {
            return Ok(v);
        }
        let Some((cache, (ino, index))) = self.chunks.zip(keys::as_block(key)) else {
            return self.db.get(key).await.map_err(map_engine_error);
        };
        if let Some(record) = cache.get(ino, index) {
            return Ok(record);
        }
        let stamp = cache.stamp(ino, index);
        let record = self.db.get(key).await.map_err(map_engine_error)?;
        cache.offer(ino, index, stamp, record.clone());
        Ok(record)
    }

    /// Set `key` to `value` (or delete it, for `None`) in this transaction.
    async fn set(&mut self, key: Vec<u8>, value: Option<Bytes>) -> Result<(), StoreError> {
        if let Some(e) = self.entries.get_mut(&key) {
            e.value = value;
            e.dirty = true;
            return Ok(());
        }
        let base_len = if counted(&key) {
            let base = self.base(&key).await?;
            base.as_ref().map(Bytes::len)
        } else {
            None
        };
        self.entries.insert(
            key,
            Entry {
                base_len,
                value,
                dirty: true,
            },
        );
        Ok(())
    }

    pub async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.set(key, Some(Bytes::from(value))).await
    }

    pub async fn delete(&mut self, key: Vec<u8>) -> Result<(), StoreError> {
        self.set(key, None).await
    }

    /// The records in `range` as this transaction sees them, in order.
    pub async fn records_in(
        &mut self,
        range: Range<Vec<u8>>,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StoreError> {
        // Before the scan: a key that leaves the queue meanwhile is in
        // the engine by then.
        let queued = self.queued.map(|q| q.range(&range)).unwrap_or_default();
        let mut found = BTreeMap::new();
        let mut iter = self
            .db
            .scan(range.clone())
            .await
            .map_err(map_engine_error)?;
        while let Some(kv) = iter.next().await.map_err(map_engine_error)? {
            found.insert(kv.key.to_vec(), kv.value);
        }
        for (key, value) in queued {
            match value {
                Some(v) => found.insert(key, v),
                None => found.remove(&key),
            };
        }
        for (key, e) in self.entries.range(range) {
            match &e.value {
                Some(v) => found.insert(key.clone(), v.clone()),
                None => found.remove(key),
            };
        }
        Ok(found.into_iter().collect())
    }

    /// Delete every key in `range`.
    pub async fn delete_range(&mut self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        for (key, value) in self.records_in(range).await? {
            self.delete_found(key, value.len());
        }
        Ok(())
    }

    /// Delete `key`, which [`TxnView::records_in`] found with a value of
    /// `len` bytes.
    fn delete_found(&mut self, key: Vec<u8>, len: usize) {
        match self.entries.get_mut(&key) {
            Some(e) => {
                e.value = None;
                e.dirty = true;
            }
            // Found by the scan and not among this transaction's keys:
            // it came from the queue or the engine, so it exists there.
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        base_len: Some(len),
                        value: None,
                        dirty: true,
                    },
                );
            }
        }
    }

    /// The puts (`Some`) and deletes (`None`) this transaction writes, and
    /// the counters after it.
    pub fn finish(self, before: Counters) -> Result<(Puts, Counters), StoreError> {
        let mut batch = Puts::new();
        let (mut blocks, mut inodes) = (before.blocks as i128, before.inodes as i128);
        let mut meta = before.meta_bytes as i128;
        for (key, e) in self.entries {
            if !e.dirty {
                continue;
            }
            let delta = i128::from(e.value.is_some()) - i128::from(e.base_len.is_some());
            let t = key.first().copied().unwrap_or(0);
            match t {
                tag::BLOCK => blocks += delta,
                tag::INODE => inodes += delta,
                _ => {}
            }
            if metered(t) {
                meta += record_bytes(&key, e.value.as_ref().map(Bytes::len))
                    - record_bytes(&key, e.base_len);
            }
            batch.push((key, e.value));
        }
        let after = Counters {
            blocks: u64::try_from(blocks)
                .map_err(|_| StoreError::Corrupt(format!("block count went to {blocks}")))?,
            inodes: u64::try_from(inodes)
                .map_err(|_| StoreError::Corrupt(format!("inode count went to {inodes}")))?,
            meta_bytes: u64::try_from(meta)
                .map_err(|_| StoreError::Corrupt(format!("metadata bytes went to {meta}")))?,
        };
        if after != before {
            batch.push((keys::stats(), Some(codec::encode_counters(&after).into())));
        }
        Ok((batch, after))
    }
}

/// The extents of chunk `index` of `ino`, as the view sees them; `None`
/// when the chunk has no record.
async fn chunk(
    view: &mut TxnView<'_>,
    ino: u64,
    index: u64,
) -> Result<Option<Vec<Extent>>, StoreError> {
    match view.get(&keys::block(ino, index)).await? {
        Some(v) => Ok(Some(
            extent::decode(&v).map_err(|e| in_chunk(e, ino, index))?,
        )),
        None => Ok(None),
    }
}

fn in_chunk(e: StoreError, ino: u64, index: u64) -> StoreError {
    match e {
        StoreError::Corrupt(m) => StoreError::Corrupt(format!("block {index} of inode {ino}: {m}")),
        other => other,
    }
}

/// Note what replacing `old` by `new` does to segments: pages that died,
/// live bytes that moved.
fn account(view: &mut TxnView<'_>, old: &[Extent], new: &[Extent]) {
    for (seg, r) in extent::segment_pages_dead(old, new) {
        view.dead.entry(seg).or_default().push(r);
    }
    for (seg, n) in extent::live_bytes(old) {
        *view.live_delta.entry(seg).or_insert(0) -= n as i128;
    }
    for (seg, n) in extent::live_bytes(new) {
        *view.live_delta.entry(seg).or_insert(0) += n as i128;
    }
}

/// Rewrite a fragmented chunk as one extent: a copy of at most one chunk.
async fn compact(
    view: &mut TxnView<'_>,
    index: u64,
    list: Vec<Extent>,
) -> Result<Vec<Extent>, StoreError> {
    let end = extent::covered_end(&list);
    let mut buf = vec![0u8; end as usize];
    let files = Files {
        segments: view.segments,
        objects: view.objects,
    };
    read_chunk(files, &list, 0, &mut buf).await?;
    let data = match (view.segments, view.objects, view.object_ids) {
        (_, Some(objects), Some(next_id)) => {
            // A rare, bounded upload under the commit lock: one object of
            // at most one chunk, amortized over the writes that
            // fragmented it.
            let id = next_id()?;
            objects.pin(id);
            view.appended.push(Placed {
                seg: id,
                seg_off: 0,
                len: u64::from(end),
            });
            let crcs = extent::page_crcs(0, &[&buf]);
            objects
                .upload(vec![objects::Pack {
                    id,
                    len: u64::from(end),
                    parts: vec![Bytes::from(buf)],
                }])
                .await
                .map_err(StoreError::Io)?;
            Data::Segment(Piece {
                seg: id,
                seg_off: 0,
                start: 0,
                len: end,
                crcs,
            })
        }
        (Some(segs), _, _) => {
            let p = segs
                .append(index.saturating_mul(BLOCK_SIZE), &[&buf])
                .map_err(StoreError::Io)?;
            view.appended.push(p);
            Data::Segment(Piece {
                seg: p.seg,
                seg_off: p.seg_off,
                start: 0,
                len: end,
                crcs: extent::page_crcs(p.seg_off, &[&buf]),
            })
        }
        _ => Data::Inline(Bytes::from(buf)),
    };
    Ok(vec![Extent {
        start: 0,
        len: end,
        data,
    }])
}

/// Replace chunk `index` of `ino`, whose extents were `old`, by `new`.
async fn put_chunk(
    view: &mut TxnView<'_>,
    ino: u64,
    index: u64,
    old: &[Extent],
    new: Vec<Extent>,
) -> Result<(), StoreError> {
    account(view, old, &new);
    let new = if new.len() > MAX_EXTENTS {
        // The rewrite replaces every extent, the newest write's included.
        let compacted = compact(view, index, new.clone()).await?;
        account(view, &new, &compacted);
        compacted
    } else {
        new
    };
    view.put(keys::block(ino, index), extent::encode(&new))
        .await
}

/// Replace the chunk record `key`, whose extents were `old`, by `new`
/// (same bytes elsewhere: a data object pass moving extents).
pub async fn replace_chunk(
    view: &mut TxnView<'_>,
    key: Vec<u8>,
    old: &[Extent],
    new: Vec<Extent>,
) -> Result<(), StoreError> {
    account(view, old, &new);
    view.put(key, extent::encode(&new)).await
}

/// Drop every chunk record in `range`, with its extents.
async fn drop_chunks(view: &mut TxnView<'_>, range: Range<Vec<u8>>) -> Result<(), StoreError> {
    for (key, value) in view.records_in(range).await? {
        let old = extent::decode(&value).map_err(|e| match keys::decode_block(&key) {
            Ok((ino, index)) => in_chunk(e, ino, index),
            Err(_) => e,
        })?;
        account(view, &old, &[]);
        view.delete_found(key, value.len());
    }
    Ok(())
}

/// Cut chunk offsets `r` out of chunk `index`, keeping its record.
async fn cut(
    view: &mut TxnView<'_>,
    ino: u64,
    index: u64,
    r: Range<u32>,
) -> Result<(), StoreError> {
    let Some(old) = chunk(view, ino, index).await? else {
        return Ok(());
    };
    let new = extent::remove_range(&old, r);
    if new != old {
        put_chunk(view, ino, index, &old, new).await?;
    }
    Ok(())
}

/// The parts of the scatter list `bufs` that make up its bytes `range`.
fn parts_in<'b>(bufs: &[&'b [u8]], range: Range<usize>) -> Vec<&'b [u8]> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for b in bufs {
        let (s, e) = (range.start.max(at), range.end.min(at + b.len()));
        if s < e {
            out.push(&b[s - at..e - at]);
        }
        at += b.len();
        if at >= range.end {
            break;
        }
    }
    out
}

/// Write the bytes of the scatter list `bufs` at `offset`: one extent per
/// chunk they touch, pointing where `placed` says they were appended, or
/// inline without segments.
async fn write(
    view: &mut TxnView<'_>,
    ino: u64,
    offset: u64,
    bufs: &[&[u8]],
    placed: Option<Placed>,
) -> Result<(), StoreError> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    // A write that would run past the largest offset is not applied: the
    // filesystem layer never sends one, and no chunk could hold it.
    if offset.checked_add(total as u64).is_none() {
        return Ok(());
    }
    let mut pos = offset;
    let mut at = 0usize;
    while at < total {
        let index = pos / BLOCK_SIZE;
        let start = (pos % BLOCK_SIZE) as u32;
        let n = (total - at).min((BLOCK_SIZE - u64::from(start)) as usize);
        let parts = parts_in(bufs, at..at + n);
        let new = Extent {
            start,
            len: n as u32,
            data: match placed {
                Some(p) => {
                    let seg_off = p.seg_off + at as u64;
                    Data::Segment(Piece {
                        seg: p.seg,
                        seg_off,
                        start,
                        len: n as u32,
                        crcs: extent::page_crcs(seg_off, &parts),
                    })
                }
                None => Data::Inline(Bytes::from(parts.concat())),
            },
        };
        let old = chunk(view, ino, index).await?.unwrap_or_default();
        let list = extent::insert(&old, new);
        put_chunk(view, ino, index, &old, list).await?;
        at += n;
        pos += n as u64;
    }
    Ok(())
}

async fn truncate(view: &mut TxnView<'_>, ino: u64, size: u64) -> Result<(), StoreError> {
    drop_chunks(view, keys::blocks_from(ino, size.div_ceil(BLOCK_SIZE))).await?;
    let tail = (size % BLOCK_SIZE) as u32;
    if tail != 0 {
        cut(view, ino, size / BLOCK_SIZE, tail..BLOCK_SIZE as u32).await?;
    }
    Ok(())
}

async fn punch_hole(
    view: &mut TxnView<'_>,
    ino: u64,
    offset: u64,
    len: u64,
) -> Result<(), StoreError> {
    let end = offset.saturating_add(len);
    if end <= offset {
        return Ok(());
    }
    let first = offset / BLOCK_SIZE;
    let last = (end - 1) / BLOCK_SIZE;
    let head = (offset % BLOCK_SIZE) as u32;
    let tail_end = ((end - 1) % BLOCK_SIZE) as u32 + 1;
    let bs = BLOCK_SIZE as u32;
    if first == last {
        if head == 0 && tail_end == bs {
            drop_chunks(view, keys::blocks_between(ino, first, first)).await?;
        } else {
            cut(view, ino, first, head..tail_end).await?;
        }
        return Ok(());
    }
    // Whole chunks go with one scan, however long the hole; the partial
    // chunks at either end are cut in place.
    let full_first = if head == 0 { first } else { first + 1 };
    let full_last = if tail_end == bs {
        Some(last)
    } else {
        last.checked_sub(1)
    };
    if let Some(full_last) = full_last.filter(|l| *l >= full_first) {
        drop_chunks(view, keys::blocks_between(ino, full_first, full_last)).await?;
    }
    if head != 0 {
        cut(view, ino, first, head..bs).await?;
    }
    if tail_end != bs {
        cut(view, ino, last, 0..tail_end).await?;
    }
    Ok(())
}

/// Lay `op` over the view; `placed` is where a write's bytes were
/// appended, on a volume with segments.
pub async fn apply(
    view: &mut TxnView<'_>,
    op: Op,
    placed: Option<Placed>,
) -> Result<(), StoreError> {
    match op {
        Op::PutInode(inode) => {
            // An inode never gets a link back once it has none (link
            // refuses it), so its orphan mark goes only with the inode.
            if inode.nlink == 0 {
                view.put(keys::orphan(inode.ino), codec::encode_bytes(&[]))
                    .await?;
            }
            view.put(keys::inode(inode.ino), codec::encode_inode(&inode))
                .await
        }
        Op::RemoveInode { ino } => {
            // Only a symlink has a target and only a file has chunks: one
            // engine read or scan fewer (a record already gone gets both).
            let kind = match view.get(&keys::inode(ino)).await? {
                Some(v) => Some(codec::decode_inode(ino, &v)?.kind),
                None => None,
            };
            view.delete(keys::orphan(ino)).await?;
            view.delete(keys::inode(ino)).await?;
            if matches!(kind, None | Some(FileKind::Symlink)) {
                view.delete(keys::symlink(ino)).await?;
            }
            if matches!(kind, None | Some(FileKind::Regular)) {
                drop_chunks(view, keys::blocks_from(ino, 0)).await?;
            }
            view.delete_range(keys::xattrs_of(ino)).await
        }
        Op::PutDirent { parent, dirent } => {
            let by_name = keys::dirent_by_name(parent, &dirent.name);
            if let Some(old) = view.get(&by_name).await? {
                let old = codec::decode_dirent_by_name(&dirent.name, &old)?;
                if old.cookie != dirent.cookie {
                    view.delete(keys::dirent_by_cookie(parent, old.cookie))
                        .await?;
                }
            }
            view.put(by_name, codec::encode_dirent_by_name(&dirent))
                .await?;
            view.put(
                keys::dirent_by_cookie(parent, dirent.cookie),
                codec::encode_dirent_by_cookie(&dirent),
            )
            .await
        }
        Op::RemoveDirent { parent, name } => {
            let by_name = keys::dirent_by_name(parent, &name);
            let Some(old) = view.get(&by_name).await? else {
                return Ok(());
            };
            let old = codec::decode_dirent_by_name(&name, &old)?;
            view.delete(by_name).await?;
            view.delete(keys::dirent_by_cookie(parent, old.cookie))
                .await
        }
        Op::Write { ino, offset, data } => {
            let slices: Vec<&[u8]> = data.slices().collect();
            write(view, ino, offset, &slices, placed).await
        }
        Op::Truncate { ino, size } => truncate(view, ino, size).await,
        Op::PunchHole { ino, offset, len } => punch_hole(view, ino, offset, len).await,
        Op::SetSymlink { ino, target } => {
            view.put(keys::symlink(ino), codec::encode_bytes(&target))
                .await
        }
        Op::SetXattr { ino, name, value } => {
            view.put(keys::xattr(ino, &name), codec::encode_bytes(&value))
                .await
        }
        Op::RemoveXattr { ino, name } => view.delete(keys::xattr(ino, &name)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::parts_in;

    #[test]
    fn parts_of_a_scatter_list() {
        let bufs: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        assert_eq!(parts_in(&bufs, 0..8).concat(), b"abcdefgh");
        assert_eq!(parts_in(&bufs, 2..5), vec![&b"c"[..], &b"de"[..]]);
        assert_eq!(parts_in(&bufs, 4..4), Vec::<&[u8]>::new());
        assert_eq!(parts_in(&bufs, 3..8), vec![&b"defgh"[..]]);
    }
}
