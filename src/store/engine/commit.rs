//! The commit path: a transaction's bytes to segments, made durable, then
//! its batch built under the commit lock and handed to the engine, then
//! (once durable) the segment space it freed given back. See the module
//! documentation of the engine for the order and why.
//!
//! This module owns that order. It never interprets POSIX semantics
//! (`apply.rs` turns ops into records) and never decides what is live
//! (`extent.rs` does).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::Ordering;

use slatedb::{WriteBatch, WriteHandle};

use super::segment::{self, Placed};
use super::{apply, codec, keys, map_engine_error, SlateStore, SEGMENT_PAGE};
use crate::store::{CommitOutcome, Op, StoreError, Txn, BLOCK_SIZE};

/// What a commit's batch frees once it is durable.
struct Reclaim {
    /// Segment pages no extent refers to, per segment.
    dead: BTreeMap<u64, Vec<Range<u64>>>,
    /// Sealed segments with no live byte left.
    emptied: Vec<u64>,
}

/// The outcome of building a commit's batch.
enum Built {
    /// The named transaction was applied before: nothing was written.
    Duplicate,
    /// The batch was written (`None`: it was empty).
    Batch(Option<WriteHandle>, Reclaim),
}

impl SlateStore {
    /// Delete the sealed segments nothing refers to: those whose record
    /// counts no live byte, and files without a record (a segment gets
    /// its record in the batch of its first extent, so no durable extent
    /// refers to those: their bytes were written for batches that never
    /// became durable). Runs at open, before any commit.
    pub(super) async fn sweep_segments(&self) -> Result<(), StoreError> {
        let Some(segs) = &self.segments else {
            return Ok(());
        };
        let active = segs.active_id();
        let mut recorded = std::collections::BTreeSet::new();
        let mut batch = WriteBatch::new();
        let mut doomed = Vec::new();
        for (k, v) in self.scan(keys::segments_all(), usize::MAX).await? {
            let id = keys::decode_segment(&k)?;
            recorded.insert(id);
            if codec::decode_segment(&v)? == 0 && id < active {
                batch.delete(&k);
                doomed.push(id);
            }
        }
        for (id, _) in segment::list(segs.dir()).map_err(StoreError::Io)? {
            if id < active && !recorded.contains(&id) {
                doomed.push(id);
            }
        }
        if !batch.is_empty() {
            self.db.write(batch).await.map_err(map_engine_error)?;
            self.db.flush().await.map_err(map_engine_error)?;
        }
        for id in doomed {
            segs.remove(id).map_err(StoreError::Io)?;
        }
        Ok(())
    }

    /// Append the bytes of every write of `txn` to a segment and make them
    /// durable; where each op's bytes went (`None` for every op on a volume
    /// without segments, and for ops that carry none).
    fn place(&self, txn: &Txn) -> Result<Vec<Option<Placed>>, StoreError> {
        let Some(segs) = &self.segments else {
            return Ok(vec![None; txn.ops.len()]);
        };
        let mut out = Vec::with_capacity(txn.ops.len());
        for op in &txn.ops {
            let p = match op {
                Op::Write { offset, data, .. }
                    if !data.is_empty() && offset.checked_add(data.len() as u64).is_some() =>
                {
                    match segs.append(*offset, &data.slices().collect::<Vec<_>>()) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            let placed: Vec<Placed> = out.iter().flatten().copied().collect();
                            self.abandon(&placed);
                            return Err(StoreError::Io(e));
                        }
                    }
                }
                _ => None,
            };
            out.push(p);
        }
        // Appends of one commit are in segment order: the last covers all.
        if let Some(last) = out.iter().flatten().last() {
            if let Err(e) = segs.sync_to(last.seg, last.seg_off + last.len) {
                let placed: Vec<Placed> = out.iter().flatten().copied().collect();
                self.abandon(&placed);
                return Err(StoreError::Io(e));
            }
        }
        Ok(out)
    }

    /// Give back appends whose batch was never written: nothing refers to
    /// their pages, which no other append shares.
    fn abandon(&self, placed: &[Placed]) {
        let Some(segs) = &self.segments else { return };
        for p in placed {
            let r = p.seg_off / SEGMENT_PAGE * SEGMENT_PAGE
                ..(p.seg_off + p.len).div_ceil(SEGMENT_PAGE) * SEGMENT_PAGE;
            if let Err(e) = segs.punch(p.seg, &[r]) {
                tracing::warn!(volume = %self.describe, segment = p.seg, error = %e, "punching abandoned segment bytes failed; the space leaks until the segment is deleted");
            }
            segs.unpin(p.seg);
        }
    }

    /// Apply `txn` (once, when `once` names it) and wait until durable.
    pub(super) async fn commit_inner(
        &self,
        once: Option<(u64, u64)>,
        txn: Txn,
    ) -> Result<CommitOutcome, StoreError> {
        self.check_writable()?;
        let _in_flight = self.group.begin();
        let placed = self.place(&txn)?;
        let mut appended: Vec<Placed> = placed.iter().flatten().copied().collect();
        let mut written = false;
        let built = self
            .build(once, txn, placed, &mut appended, &mut written)
            .await;
        if written {
            if let Some(segs) = &self.segments {
                for p in &appended {
                    segs.unpin(p.seg);
                }
            }
        } else {
            self.abandon(&appended);
        }
        let (handle, reclaim) = match built? {
            Built::Duplicate => {
                // The first copy may still be on its way to the medium:
                // acknowledge the duplicate only once it has arrived.
                self.group
                    .wait_all(&self.db)
                    .await
                    .map_err(map_engine_error)?;
                return Ok(CommitOutcome { duplicate: true });
            }
            Built::Batch(handle, reclaim) => (handle, reclaim),
        };
        match handle {
            Some(h) => self.group.wait(&self.db, &h).await,
            // Nothing to write, but what this transaction saw may still be
            // on its way to the medium.
            None => self.group.wait_all(&self.db).await,
        }
        .map_err(map_engine_error)?;
        self.reclaim_space(reclaim);
        Ok(CommitOutcome { duplicate: false })
    }

    /// Build the batch of `txn` and write it to the engine, serialized with
    /// other commits. `written` is set once the batch has been handed to
    /// the engine (from then on its appends are referenced).
    async fn build(
        &self,
        once: Option<(u64, u64)>,
        txn: Txn,
        placed: Vec<Option<Placed>>,
        appended: &mut Vec<Placed>,
        written: &mut bool,
    ) -> Result<Built, StoreError> {
        let mut counters = self.commit_lock.lock().await;
        let mut view = apply::TxnView::new(&self.db, self.segments.as_ref());
        if let Some((session, txn_id)) = once {
            if view.get(&keys::applied(session, txn_id)).await?.is_some() {
                return Ok(Built::Duplicate);
            }
        }
        for (op, p) in txn.ops.into_iter().zip(placed) {
            let r = apply::apply(&mut view, op, p).await;
            appended.append(&mut view.appended);
            r?;
        }
        if let Some((session, txn_id)) = once {
            view.put(keys::applied(session, txn_id), codec::encode_bytes(&[]))
                .await?;
        }
        view.settle_segments().await?;
        let reclaim = Reclaim {
            dead: std::mem::take(&mut view.dead),
            emptied: std::mem::take(&mut view.emptied),
        };
        let (batch, after) = view.finish(*counters)?;
        // Data blocks and metadata share the capacity; a transaction that
        // grows neither fits, however full the volume.
        let grows = after.blocks > counters.blocks || after.meta_bytes > counters.meta_bytes;
        let needs = after
            .blocks
            .saturating_mul(BLOCK_SIZE)
            .saturating_add(after.meta_bytes);
        if grows && needs > self.capacity_bytes {
            return Err(StoreError::NoSpace);
        }
        if after.inodes > counters.inodes && after.inodes > self.capacity_inodes {
            return Err(StoreError::NoSpace);
        }
        // Chunk rewrites appended while applying: durable before the batch.
        if let (Some(segs), Some(last)) = (&self.segments, appended.last()) {
            segs.sync_to(last.seg, last.seg_off + last.len)
                .map_err(StoreError::Io)?;
        }
        if batch.is_empty() {
            return Ok(Built::Batch(None, reclaim));
        }
        *written = true;
        let handle = self.db.write(batch).await.map_err(map_engine_error)?;
        self.group.written(&handle);
        *counters = after;
        self.used_blocks.store(after.blocks, Ordering::Release);
        self.used_inodes.store(after.inodes, Ordering::Release);
        self.used_meta_bytes
            .store(after.meta_bytes, Ordering::Release);
        Ok(Built::Batch(Some(handle), reclaim))
    }

    /// Punch the segment pages a durable batch stopped referring to and
    /// delete the segments it emptied. A failure leaks space (reported by
    /// `pohmelfs check`), never data, so it is logged, not returned.
    fn reclaim_space(&self, reclaim: Reclaim) {
        let Some(segs) = &self.segments else { return };
        if reclaim.dead.is_empty() && reclaim.emptied.is_empty() {
            return;
        }
        let _exclusive = self.reclaim.write().unwrap_or_else(|e| e.into_inner());
        for (seg, ranges) in &reclaim.dead {
            // A read's file piece may still name these pages: the punch
            // waits for the last pin (`pins.rs`).
            if let Err(e) = segs
                .handle(*seg)
                .map(|f| self.pins.punch_or_defer(f, ranges))
            {
                tracing::warn!(volume = %self.describe, segment = seg, error = %e, "punching dead segment pages failed");
            }
        }
        for seg in &reclaim.emptied {
            if let Err(e) = segs.remove(*seg) {
                tracing::warn!(volume = %self.describe, segment = seg, error = %e, "deleting an emptied segment failed");
            }
        }
    }
}
