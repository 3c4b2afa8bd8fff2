//! Turning one [`Txn`](crate::store::Txn) into one engine write batch.
//!
//! [`apply`] translates each [`Op`] into puts and deletes on a [`TxnView`]
//! (`view.rs`): a write adds one extent per chunk it touches (its bytes are
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

use std::ops::Range;

use bytes::Bytes;

use super::born::Leftovers;
pub use super::chunk_read::{read_chunk, Files};
use super::codec;
use super::extent::{self, Data, Extent, Piece, MAX_EXTENTS};
use super::keys;
use super::objects;
use super::segment::Placed;
pub use super::view::{to_batch, Puts, TxnView};
use crate::store::{FileKind, Op, StoreError, BLOCK_SIZE};

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
    // Asked before this write is noted: chunks no earlier write reached.
    let reached = view.born.and_then(|b| b.chunks_of(ino));
    if let (Some(born), true) = (view.born, total > 0) {
        born.wrote(
            ino,
            offset / BLOCK_SIZE,
            (offset + total as u64 - 1) / BLOCK_SIZE,
        );
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
        let old = if reached.is_some_and(|r| !r.may_have(index)) {
            // Nor does putting the new record read it.
            view.known_absent(&keys::block(ino, index));
            Vec::new()
        } else {
            chunk(view, ino, index).await?.unwrap_or_default()
        };
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

/// Remove inode `ino` and everything it owns.
async fn remove_inode(view: &mut TxnView<'_>, ino: u64) -> Result<(), StoreError> {
    // Only a symlink has a target and only a file has chunks: one engine
    // read or scan fewer (a record already gone gets both).
    let kind = match view.get(&keys::inode(ino)).await? {
        Some(v) => Some(codec::decode_inode(ino, &v)?.kind),
        None => None,
    };
    view.delete(keys::orphan(ino)).await?;
    view.delete(keys::inode(ino)).await?;
    if matches!(kind, None | Some(FileKind::Symlink)) {
        view.delete(keys::symlink(ino)).await?;
    }
    let left = match view.born {
        Some(born) => born.take(ino, &mut view.removed),
        None => Leftovers::Unknown,
    };
    match left {
        // Born since the engine opened: what its writes and attributes
        // created is known, and read by key (`born.rs`).
        Leftovers::Known { chunks, xattrs } => {
            for index in chunks {
                if let Some(old) = chunk(view, ino, index).await? {
                    account(view, &old, &[]);
                    view.delete(keys::block(ino, index)).await?;
                }
            }
            if xattrs {
                view.delete_range(keys::xattrs_of(ino)).await?;
            }
            Ok(())
        }
        Leftovers::Unknown => {
            if matches!(kind, None | Some(FileKind::Regular)) {
                drop_chunks(view, keys::blocks_from(ino, 0)).await?;
            }
            view.delete_range(keys::xattrs_of(ino)).await
        }
    }
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
            let key = keys::inode(inode.ino);
            if view.born.is_some_and(|b| b.first_inode_put(inode.ino)) {
                view.known_absent(&key);
            }
            view.put(key, codec::encode_inode(&inode)).await
        }
        Op::RemoveInode { ino } => remove_inode(view, ino).await,
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
            let by_cookie = keys::dirent_by_cookie(parent, dirent.cookie);
            if view.born.is_some_and(|b| b.first_cookie_put(dirent.cookie)) {
                view.known_absent(&by_cookie);
            }
            view.put(by_cookie, codec::encode_dirent_by_cookie(&dirent))
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
            if let Some(born) = view.born {
                born.set_xattr(ino);
            }
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
