//! The commit path: a transaction's bytes to segments (made durable there
//! unless its commit-log record carries them), then its batch built under
//! the commit lock, made durable in the commit log and handed to the
//! engine (or, without the log, handed to the engine and waited for), then
//! the segment space it freed handed to the reclaimer once no replay can
//! write it again. See the module documentation of the engine for the
//! order and why.
//!
//! This module owns that order. It never interprets POSIX semantics
//! (`apply.rs` turns ops into records) and never decides what is live
//! (`extent.rs` does).

use std::sync::atomic::Ordering;

use slatedb::{WriteBatch, WriteHandle};

use super::apply::Puts;
use super::log::{self, LogError};
use super::reclaim::Reclaim;
use super::recover::{self, Checkpoint};
use super::segment::{self, Placed};
use super::{apply, codec, keys, map_engine_error, SlateStore, SEGMENT_PAGE};
use crate::store::{CommitOutcome, Op, StoreError, Txn, WriteData, BLOCK_SIZE};

/// Writes of at most this many bytes in all go into their commit's log
/// record, and unsynced into their segment; larger ones are synced in
/// their segment before the record, so no byte is written twice.
const LOG_INLINE_BYTES: u64 = 64 << 10;

/// The outcome of building a commit's batch.
enum Built {
    /// The named transaction was applied before: nothing was written.
    Duplicate,
    /// The batch was written (`None`: it was empty).
    Batch(Option<WriteHandle>, Reclaim),
    /// The batch is durable (in the commit log, or empty); what it freed
    /// may be named by records up to this lsn.
    Logged(u64, Reclaim),
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

    /// Append the bytes of every write of `txn` to a segment; where each
    /// op's bytes went (`None` for every op on a volume without segments,
    /// and for ops that carry none). They are made durable here unless
    /// `logged`: then their commit-log record carries them.
    fn place(&self, txn: &Txn, logged: bool) -> Result<Vec<Option<Placed>>, StoreError> {
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
        if logged {
            return Ok(out);
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
        let logged = self.checkpoint.is_some() && txn.data_bytes() <= LOG_INLINE_BYTES;
        let placed = self.place(&txn, logged)?;
        // The record carries the bytes (`WriteData` clones share them).
        let writes: Vec<(Placed, WriteData)> = txn
            .ops
            .iter()
            .zip(&placed)
            .filter_map(|(op, p)| match (op, p) {
                (Op::Write { data, .. }, Some(p)) if logged => Some((*p, data.clone())),
                _ => None,
            })
            .collect();
        let mut appended: Vec<Placed> = placed.iter().flatten().copied().collect();
        let mut written = false;
        let built = self
            .build(once, txn, placed, &writes, &mut appended, &mut written)
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
                // acknowledge the duplicate only once it has arrived. A
                // logged copy is in the engine only once durable.
                if self.checkpoint.is_none() {
                    self.group
                        .wait_all(&self.db)
                        .await
                        .map_err(map_engine_error)?;
                }
                return Ok(CommitOutcome { duplicate: true });
            }
            Built::Logged(lsn, reclaim) => {
                if let Some(cp) = &self.checkpoint {
                    cp.hold(lsn, reclaim);
                }
                return Ok(CommitOutcome { duplicate: false });
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
        if let Some(r) = &self.reclaimer {
            // Off the commit path: the acknowledgement does not wait.
            r.send(reclaim);
        }
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
        writes: &[(Placed, WriteData)],
        appended: &mut Vec<Placed>,
        written: &mut bool,
    ) -> Result<Built, StoreError> {
        let mut counters = self.commit_lock.lock().await;
        let mut view = apply::TxnView::new(&self.db, self.segments.as_deref());
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
        let (puts, after) = view.finish(*counters)?;
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
            if !writes.iter().any(|(p, _)| p == last) {
                segs.sync_to(last.seg, last.seg_off + last.len)
                    .map_err(StoreError::Io)?;
            }
        }
        let built = if puts.is_empty() {
            match &self.checkpoint {
                Some(cp) => Built::Logged(cp.log.next_lsn().saturating_sub(1), reclaim),
                None => Built::Batch(None, reclaim),
            }
        } else {
            *written = true;
            match &self.checkpoint {
                Some(cp) => Built::Logged(self.log_commit(cp, puts, writes).await?, reclaim),
                None => {
                    let handle = self
                        .db
                        .write(apply::to_batch(&puts))
                        .await
                        .map_err(map_engine_error)?;
                    self.group.written(&handle);
                    Built::Batch(Some(handle), reclaim)
                }
            }
        };
        *counters = after;
        self.used_blocks.store(after.blocks, Ordering::Release);
        self.used_inodes.store(after.inodes, Ordering::Release);
        self.used_meta_bytes
            .store(after.meta_bytes, Ordering::Release);
        Ok(built)
    }

    /// Make `puts` durable through the commit log, with the bytes of
    /// `writes`, then hand them to the engine (called under the commit
    /// lock, so records and engine writes are in the same order); the
    /// last lsn a record naming what it freed may have.
    async fn log_commit(
        &self,
        cp: &Checkpoint,
        mut puts: Puts,
        writes: &[(Placed, WriteData)],
    ) -> Result<u64, StoreError> {
        let log = &cp.log;
        let lsn = log.next_lsn();
        puts.push((keys::log(), Some(recover::encode_lsn(lsn).into())));
        let mut buf = log::encode_payload(
            &puts,
            writes
                .iter()
                .map(|(p, d)| (p.seg, p.seg_off, d.slices().collect())),
        );
        if log::record_bytes(buf.len() - log::RECORD_HEADER) > log.record_max() {
            // Too large for the ring: durable in the engine before the
            // acknowledgement, with every segment byte before it, still
            // under the commit lock so no later record overtakes it.
            puts.pop();
            if let Some(segs) = &self.segments {
                segs.sync_all().map_err(StoreError::Io)?;
            }
            let handle = self
                .db
                .write(apply::to_batch(&puts))
                .await
                .map_err(map_engine_error)?;
            self.group.written(&handle);
            self.group
                .wait(&self.db, &handle)
                .await
                .map_err(map_engine_error)?;
            return Ok(lsn.saturating_sub(1));
        }
        if log.half_full() {
            cp.run().await?;
        }
        loop {
            match log.append(&mut buf) {
                Ok(_) => break,
                Err(LogError::Full) => cp.run().await?,
                Err(e) => return Err(recover::map_log_error(e)),
            }
        }
        if let Err(e) = self.db.write(apply::to_batch(&puts)).await {
            // Durable in the log but not in this instance's engine: what
            // reads see no longer says what is durable. Only a reopen,
            // which replays the record, may go on.
            log.fail();
            return Err(map_engine_error(e));
        }
        log.applied_all();
        Ok(lsn)
    }
}
