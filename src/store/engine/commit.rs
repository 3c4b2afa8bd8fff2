//! The commit path: a transaction's bytes to segments (made durable there
//! unless its commit-log record carries them), then its batch built under
//! the commit lock and queued for the commit log; a leader writes the
//! queued batches as one record, durable with one `fdatasync` (which
//! acknowledges them), and a task of their own hands them to the engine
//! (`log_queue.rs`). Without the log the batch is
//! handed to the engine and waited for (`group.rs`). The segment space a
//! commit freed goes to the reclaimer once no replay can write it again.
//! See the module documentation of the engine for the order and why.
//!
//! This module owns that order. It never interprets POSIX semantics
//! (`apply.rs` turns ops into records) and never decides what is live
//! (`extent.rs` does).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use slatedb::{WriteBatch, WriteHandle};

use super::apply::Puts;
use super::log::{self, LogError};
use super::log_queue::{self, Need, Queued, Turn};
use super::once::Applied;
use super::reclaim::Reclaim;
use super::recover::{self, Checkpoint};
use super::segment::{self, Placed};
use super::{apply, codec, keys, map_engine_error, SlateStore, SEGMENT_PAGE};
use crate::store::{CommitOutcome, Op, StoreError, Txn, WriteData, BLOCK_SIZE};

/// Writes of at most this many bytes in all go into their commit's log
/// record, and unsynced into their segment; larger ones are synced in
/// their segment before the record, so no byte is written twice.
const LOG_INLINE_BYTES: u64 = 64 << 10;

/// On `s3://`, commits of at most this many bytes of writes keep them
/// inline in their extents (in the WAL object that makes the commit
/// durable); larger ones upload data objects first (`objects.rs`).
pub(super) const OBJECT_INLINE_BYTES: u64 = LOG_INLINE_BYTES;

/// A group's record holds at most about this many payload bytes (unless
/// its first commit alone is larger): a commit that queued behind a large
/// group does not wait for an even larger one.
const GROUP_BYTES_MAX: usize = 1 << 20;

/// The outcome of building a commit's batch.
enum Built {
    /// The named transaction was applied before: nothing was written. It
    /// may still be queued for the log, at most at this seq.
    Duplicate(u64),
    /// Without the log: the batch was written (`None`: it was empty).
    Batch(Option<WriteHandle>, Reclaim),
    /// The batch is queued for the commit log at this seq (or was empty:
    /// the last seq queued before it).
    Queued(u64),
    /// The batch, too large for the log, is durable in the engine; what
    /// it freed may be named by records up to this lsn.
    Direct(u64, Reclaim),
}

/// Applied records pruned in memory (`once.rs`) that a batch being built
/// deletes: handed back unless the batch is built.
struct Pruned<'a>(&'a Applied, Vec<Vec<u8>>);

impl Pruned<'_> {
    fn built(mut self) {
        self.1.clear();
    }
}

impl Drop for Pruned<'_> {
    fn drop(&mut self) {
        if !self.1.is_empty() {
            self.0.put_back(std::mem::take(&mut self.1));
        }
    }
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
        let mut puts = apply::Puts::new();
        let mut doomed = Vec::new();
        for (k, v) in self.scan(keys::segments_all(), usize::MAX).await? {
            let id = keys::decode_segment(&k)?;
            recorded.insert(id);
            if codec::decode_segment(&v)? == 0 && id < active {
                puts.push((k.to_vec(), None));
                doomed.push(id);
            }
        }
        for (id, _) in segment::list(segs.dir()).map_err(StoreError::Io)? {
            if id < active && !recorded.contains(&id) {
                doomed.push(id);
            }
        }
        if !puts.is_empty() {
            self.write_puts(&puts).await.map_err(map_engine_error)?;
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

    /// Pack the bytes of every write of `txn` into data objects and upload
    /// them (`objects.rs`); where each op's bytes went. `Ok` only once
    /// every object is stored: the batch that refers to them comes after.
    async fn place_objects(&self, txn: &Txn) -> Result<Vec<Option<Placed>>, StoreError> {
        let Some(objects) = &self.objects else {
            return Ok(vec![None; txn.ops.len()]);
        };
        let data_of = |op: &Op| match op {
            Op::Write { offset, data, .. }
                if !data.is_empty() && offset.checked_add(data.len() as u64).is_some() =>
            {
                Some(data.clone())
            }
            _ => None,
        };
        let lens: Vec<u64> = txn
            .ops
            .iter()
            .filter_map(|op| data_of(op).map(|d| d.len() as u64))
            .collect();
        if lens.is_empty() {
            return Ok(vec![None; txn.ops.len()]);
        }
        let (placed, first, mut packs) = objects.packs_for(&lens)?;
        // `placed` has one entry per op that `data_of` keeps, in order.
        let mut next = placed.iter();
        let mut out = Vec::with_capacity(txn.ops.len());
        for op in &txn.ops {
            let p = match data_of(op) {
                Some(d) => next.next().map(|p| (d, *p)),
                None => None,
            };
            out.push(p.map(|(d, p)| {
                let pack = &mut packs[(p.seg - first) as usize];
                pack.parts.extend(d.parts().iter().cloned());
                pack.len += p.len;
                objects.pin(p.seg);
                p
            }));
        }
        if let Err(e) = objects.upload(packs).await {
            for p in &placed {
                objects.unpin(p.seg);
            }
            return Err(StoreError::Io(e));
        }
        #[cfg(test)]
        if objects.stop_after_upload.swap(false, Ordering::AcqRel) {
            // As if killed here: uploaded, pinned, never committed.
            return Err(StoreError::Io(std::io::Error::other(
                "stopped after upload",
            )));
        }
        Ok(out)
    }

    /// Give back appends whose batch was never written: nothing refers to
    /// their pages, which no other append shares.
    fn abandon(&self, placed: &[Placed]) {
        if let (Some(objects), Some(gc)) = (&self.objects, &self.object_gc) {
            let mut ids: Vec<u64> = placed.iter().map(|p| p.seg).collect();
            ids.sort_unstable();
            ids.dedup();
            for p in placed {
                objects.unpin(p.seg);
            }
            gc.delete(ids);
            return;
        }
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
        let placed = match &self.objects {
            Some(_) if txn.data_bytes() > OBJECT_INLINE_BYTES => self.place_objects(&txn).await?,
            // Small commits keep their bytes inline, in the WAL object
            // that makes them durable: one PUT, not two.
            Some(_) => vec![None; txn.ops.len()],
            None => self.place(&txn, logged)?,
        };
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
            .build(once, txn, placed, writes, &mut appended, &mut written)
            .await;
        if let (Err(_), true, Some((session, _))) = (&built, written, once) {
            // Its batch may or may not be in the engine: ask it from now on.
            self.applied.unsure(session);
        }
        if written {
            if let Some(segs) = &self.segments {
                for p in &appended {
                    segs.unpin(p.seg);
                }
            }
            if let Some(objects) = &self.objects {
                for p in &appended {
                    objects.unpin(p.seg);
                }
            }
        } else {
            self.abandon(&appended);
        }
        let (handle, reclaim) = match built? {
            Built::Duplicate(seq) => {
                // The first copy may still be on its way to the medium:
                // acknowledge the duplicate only once it has arrived.
                match &self.checkpoint {
                    Some(cp) => self.await_logged(cp, seq, Need::Durable).await?,
                    None => self
                        .group
                        .wait_all(&self.db)
                        .await
                        .map_err(map_engine_error)?,
                }
                return Ok(CommitOutcome { duplicate: true });
            }
            Built::Queued(seq) => {
                if let Some(cp) = &self.checkpoint {
                    self.await_logged(cp, seq, Need::Durable).await?;
                }
                return Ok(CommitOutcome { duplicate: false });
            }
            Built::Direct(lsn, reclaim) => {
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
        } else if let Some(gc) = &self.object_gc {
            gc.delete(reclaim.emptied);
        }
        Ok(CommitOutcome { duplicate: false })
    }

    /// Build the batch of `txn`, serialized with other commits, and queue
    /// it for the commit log (or, without the log, write it to the
    /// engine). `written` is set once the batch has been queued or handed
    /// to the engine (from then on its appends are referenced).
    async fn build(
        &self,
        once: Option<(u64, u64)>,
        txn: Txn,
        placed: Vec<Option<Placed>>,
        writes: Vec<(Placed, WriteData)>,
        appended: &mut Vec<Placed>,
        written: &mut bool,
    ) -> Result<Built, StoreError> {
        let mut counters = self.commit_lock.lock().await;
        let queued = self.checkpoint.as_ref().map(|_| &*self.log_queue);
        let next_object = || match &self.objects {
            Some(o) => o.next_ids(1),
            None => Err(StoreError::Corrupt("no data objects".into())),
        };
        let mut view = apply::TxnView::new(&self.db, queued, self.segments.as_deref());
        view.objects = self.objects.as_deref();
        view.records = Some(&self.records);
        view.born = Some(&self.born);
        view.object_ids = Some(&next_object);
        if let Some((session, txn_id)) = once {
            if self.applied_before(&mut view, session, txn_id).await? {
                return Ok(Built::Duplicate(self.log_queue.last_seq()));
            }
        }
        // The applied records pruned since the last batch go with this one
        // (`once.rs`), before its own record: a resend of a pruned
        // transaction puts its record back.
        let pruned = Pruned(&self.applied, self.applied.take_pruned());
        for key in &pruned.1 {
            view.delete(key.clone()).await?;
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
        let removed = std::mem::take(&mut view.removed);
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
        let built = match &self.checkpoint {
            // Nothing to log, but what this transaction saw may still be
            // queued: it waits for everything queued before it.
            Some(_) if puts.is_empty() && reclaim.is_empty() => {
                Built::Queued(self.log_queue.last_seq())
            }
            Some(cp) => {
                *written = true;
                if log_queue::payload_bytes(&puts, &writes) <= record_bytes_max(cp) {
                    Built::Queued(self.log_queue.push(puts, writes, reclaim))
                } else {
                    Built::Direct(self.write_direct(cp, puts).await?, reclaim)
                }
            }
            None if puts.is_empty() => Built::Batch(None, reclaim),
            None => {
                *written = true;
                let handle = self.write_puts(&puts).await.map_err(map_engine_error)?;
                self.group.written(&handle);
                Built::Batch(Some(handle), reclaim)
            }
        };
        *counters = after;
        removed.built();
        pruned.built();
        if let Some((session, txn_id)) = once {
            self.applied.built(session, txn_id);
        }
        self.used_blocks.store(after.blocks, Ordering::Release);
        self.used_inodes.store(after.inodes, Ordering::Release);
        self.used_meta_bytes
            .store(after.meta_bytes, Ordering::Release);
        Ok(built)
    }

    /// Make `puts` (a batch too large for the ring) durable in the engine
    /// before the acknowledgement, with every segment byte and every
    /// queued batch before it; called under the commit lock so no later
    /// record overtakes it. The last lsn a record naming what it freed may
    /// have.
    async fn write_direct(&self, cp: &Arc<Checkpoint>, puts: Puts) -> Result<u64, StoreError> {
        self.await_logged(cp, self.log_queue.last_seq(), Need::Applied)
            .await?;
        if let Some(segs) = &self.segments {
            segs.sync_all().map_err(StoreError::Io)?;
        }
        let handle = self.write_puts(&puts).await.map_err(map_engine_error)?;
        self.group.written(&handle);
        self.group
            .wait(&self.db, &handle)
            .await
            .map_err(map_engine_error)?;
        Ok(cp.log.next_lsn().saturating_sub(1))
    }

    /// Wait until the queued commit `seq` (and every one before it) is
    /// as far as `need` (durable in the commit log, or in the engine too),
    /// leading the groups this takes when no one else is writing one.
    pub(super) async fn await_logged(
        &self,
        cp: &Arc<Checkpoint>,
        seq: u64,
        need: Need,
    ) -> Result<(), StoreError> {
        loop {
            match self.log_queue.turn(seq, group_bytes_max(cp), need).await {
                Turn::Done(r) => return r,
                Turn::Lead(group) => {
                    let (first, last) = match (group.first(), group.last()) {
                        (Some(f), Some(l)) => (f.seq, l.seq),
                        _ => continue,
                    };
                    match self.log_group(cp, group).await {
                        Ok(Some(logged)) => self.apply_behind(cp, first, last, logged),
                        Ok(None) => self.log_queue.finish(first, last, Ok(())),
                        Err(e) => {
                            self.log_queue.finish(first, last, Err(&e));
                            if seq <= last {
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Write `group` (queued commits, in order) as one record of the
    /// commit log, durable with one `fdatasync`, and report it durable:
    /// its commits are acknowledged from here. What is left to do, its
    /// engine write, is returned for [`SlateStore::apply_behind`]
    /// (`None`: the group wrote nothing, and is done).
    async fn log_group(
        &self,
        cp: &Checkpoint,
        group: Vec<Queued>,
    ) -> Result<Option<Logged>, StoreError> {
        let log = &cp.log;
        let mut merged = BTreeMap::new();
        let mut writes = Vec::new();
        let mut freed = Vec::with_capacity(group.len());
        let last = group.last().map_or(0, |q| q.seq);
        for q in group {
            // Later commits' values win: the record is their union.
            merged.extend(q.puts);
            writes.extend(q.writes);
            freed.push(q.reclaim);
        }
        if merged.is_empty() {
            let lsn = log.next_lsn().saturating_sub(1);
            for r in freed {
                cp.hold(lsn, r);
            }
            return Ok(None);
        }
        if log.half_full() {
            cp.run().await?;
        }
        let lsn = log.next_lsn();
        merged.insert(keys::log(), Some(recover::encode_lsn(lsn).into()));
        let puts: Puts = merged.into_iter().collect();
        let mut buf = log::encode_payload(
            &puts,
            writes
                .iter()
                .map(|(p, d)| (p.seg, p.seg_off, d.slices().collect())),
        );
        self.log_queue.before_write();
        loop {
            match log.append(&mut buf) {
                Ok(_) => break,
                Err(LogError::Full) => cp.run().await?,
                Err(e) => return Err(recover::map_log_error(e)),
            }
        }
        self.log_queue.durable(last, &puts);
        Ok(Some(Logged { lsn, puts, freed }))
    }

    /// Hand a durable group's batch to the engine in a task of its own, so
    /// that its commits' acknowledgements do not wait for it; the task
    /// reports the group applied, which lets the next group's leader go
    /// on (the engine takes the groups in log order) and holds what the
    /// commits freed until the tail passes the record.
    fn apply_behind(&self, cp: &Arc<Checkpoint>, first: u64, last: u64, logged: Logged) {
        let (db, records, queue, cp) = (
            self.db.clone(),
            Arc::clone(&self.records),
            Arc::clone(&self.log_queue),
            Arc::clone(cp),
        );
        let apply = async move {
            let Logged { lsn, puts, freed } = logged;
            queue.before_apply().await;
            match records.write_through(&db, &puts).await {
                Ok(_) => {
                    cp.log.applied_all();
                    for r in freed {
                        cp.hold(lsn, r);
                    }
                    queue.finish(first, last, Ok(()));
                }
                Err(e) => {
                    // Durable in the log but not in this instance's
                    // engine: what the engine says is no longer what is
                    // durable. Only a reopen, which replays the record,
                    // may go on.
                    cp.log.fail();
                    queue.finish(first, last, Err(&map_engine_error(e)));
                }
            }
        };
        // The commit path runs on the engine's runtime (`Store::commit`
        // blocks on it), whose workers run the task.
        tokio::spawn(apply);
    }

    /// Wait until every batch queued so far is in the engine (bounded:
    /// one group's engine write at most, then the others queued meanwhile).
    pub(super) async fn await_applied(&self) -> Result<(), StoreError> {
        match &self.checkpoint {
            Some(cp) => {
                self.await_logged(cp, self.log_queue.last_seq(), Need::Applied)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Write `batch` to the engine directly, let the commit lock go and
    /// wait until the write is durable. The caller holds the lock
    /// (`serial`) and has awaited every queued batch (`await_applied`):
    /// nothing built before it lands after it, as the log's records are
    /// in engine order, and commits built after it queue meanwhile.
    pub(super) async fn write_behind_queue(
        &self,
        serial: tokio::sync::MutexGuard<'_, codec::Counters>,
        batch: WriteBatch,
    ) -> Result<(), StoreError> {
        let handle = self.db.write(batch).await.map_err(map_engine_error)?;
        self.group.written(&handle);
        drop(serial);
        self.group
            .wait(&self.db, &handle)
            .await
            .map_err(map_engine_error)
    }
}

/// A group durable in the log, its engine write still to do.
struct Logged {
    lsn: u64,
    puts: Puts,
    freed: Vec<Reclaim>,
}

/// The most payload bytes of queued commits one record takes: what keeps
/// it inside `CommitLog::record_max` (with room for the `log` key). A
/// commit larger than that bypasses the log (`SlateStore::write_direct`).
fn record_bytes_max(cp: &Checkpoint) -> usize {
    let ring = cp.log.record_max() / log::PAGE * log::PAGE;
    usize::try_from(ring)
        .unwrap_or(usize::MAX)
        .saturating_sub(log::RECORD_HEADER + 64)
}

/// The most payload bytes a group's commits add up to, beyond its first:
/// a commit larger than this goes in a record of its own.
fn group_bytes_max(cp: &Checkpoint) -> usize {
    record_bytes_max(cp).min(GROUP_BYTES_MAX)
}
