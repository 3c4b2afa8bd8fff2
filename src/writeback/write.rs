//! The write path: a guest write's buffers become tagged pages, joining
//! the inode's queued transaction or opening one, once backpressure (and,
//! under `wait`, the pinned pages) let it; metadata operations are queued,
//! grouped into one transaction while it is unsent, and shown to reads at
//! once. Nothing here sends: the sender does (`sender.rs`).
//!
//! The filesystem layer reads a guest write into page-aligned buffers
//! (`WriteData::read_aligned`): a buffer that covers a whole page becomes
//! that page as it is ([`PageCache::adopt`](super::cache::PageCache::adopt)),
//! so those bytes are copied once in the daemon, from the guest; only the
//! bytes of a page the write covers in part are copied again, into the
//! page.

use std::collections::BTreeSet;
use std::sync::{Arc, MutexGuard};

use tokio::time::Instant;

use super::ack::{lock, wait_timeout};
use super::cache::PAGE_SIZE;
use super::overlay::Overlay;
use super::queue::{
    held_bytes, op_inodes, op_wire_bytes, MAX_QUEUED_TXNS, TXN_DATA_BYTES_MAX, TXN_META_BYTES_MAX,
    TXN_OPS_MAX,
};
use super::{OverwritePolicy, Shared, State};
use crate::ratelimit::limited;
use crate::store::{Demand, Inode, Op, ReadData, StoreError, Txn, WriteData};

/// What a metadata change is taken to add to the dirty bytes when the
/// device asks whether it would wait (`would_not_wait`): an xattr value's
/// bound (64 KiB) and its name and op, with room to spare.
const METADATA_DEMAND_BYTES: u64 = 128 << 10;

/// The pages a write covers.
struct PageSpan {
    first: u64,
    last: u64,
    /// The first and last page where the write covers them only in part
    /// and the file has bytes there before it: where absent from the cache,
    /// they hold only the bytes written (`partial.rs`), and the store keeps
    /// the rest. No write reads the store.
    partial: Vec<u64>,
    /// Bytes of all its pages, as counted against `dirty_max_bytes`.
    bytes: u64,
}

impl Shared {
    /// The write-back path: put `data` into pages and tag them.
    pub(super) fn write(
        &self,
        ino: u64,
        offset: u64,
        data: &WriteData,
        inode: Inode,
    ) -> Result<(), StoreError> {
        if data.is_empty() {
            self.put_attributes(ino, inode);
            return Ok(());
        }
        let span = self.span(ino, offset, data.len() as u64)?;
        let mut st = self.wait_to_write(ino, &span)?;
        let txn_id = self.data_txn(&mut st, ino, span.bytes, &inode);
        self.copy_into_pages(&mut st, ino, offset, data, txn_id, &span.partial);
        Self::carry_attributes(&mut st, ino, txn_id, inode);
        let evicted = st.cache.evict();
        self.metrics.cache_evictions.add(evicted);
        self.publish(&st);
        self.nudge_for(&mut st, txn_id);
        drop(st);
        Ok(())
    }

    /// A write of no bytes: only the attributes change, in a transaction
    /// of their own.
    fn put_attributes(&self, ino: u64, inode: Inode) {
        let mut st = lock(&self.state);
        let entry = Self::new_entry(&mut st, vec![Op::PutInode(inode.clone())], true);
        let id = self.enqueue(&mut st, entry);
        st.remember_attrs(
            ino,
            Overlay {
                inode: Some(inode),
                txn: id,
            },
        );
    }

    /// Wait until `bytes` more dirty bytes fit under `dirty_max_bytes` (or
    /// the layer shuts down or is full: the write then says why). Called
    /// before the filesystem layer locks the inode; `wait_to_write` checks
    /// again under the state lock. Fails after `fsync_timeout`.
    pub(super) fn wait_for_room(&self, bytes: u64) -> Result<(), StoreError> {
        let deadline = self.wait_deadline();
        let mut st = lock(&self.state);
        while !st.shutdown
            && !st.full
            && st.dirty_bytes > 0
            && st.dirty_bytes + bytes > self.cfg.dirty_max_bytes
        {
            self.metrics.backpressure_waits.inc();
            st = self.wait_until(st, deadline, "room under --dirty-max")?;
        }
        Ok(())
    }

    /// Whether a request asking `demand` would go in now without waiting.
    /// A write: room under `dirty_max_bytes` and copy-on-write overwrites
    /// (under `wait` a write may wait for the ack of a pinned page). A
    /// metadata change: room in the queue and for
    /// [`METADATA_DEMAND_BYTES`] under `dirty_max_bytes`, as
    /// `commit_metadata` waits for. A close waits only under
    /// `sync_on_close`.
    pub(super) fn would_not_wait(&self, demand: Demand) -> bool {
        let room = |st: &State, bytes: u64| {
            st.dirty_bytes == 0 || st.dirty_bytes + bytes <= self.cfg.dirty_max_bytes
        };
        match demand {
            Demand::Write { ino, offset, len } => {
                // The pages it may dirty: one more where it is unaligned.
                let bytes = len.div_ceil(PAGE_SIZE) * PAGE_SIZE + PAGE_SIZE;
                let st = lock(&self.state);
                // Under `wait` a write waits for the ack of a pinned page
                // it covers (`wait_to_write`): the pages of its span, or
                // for an append (its offset known only under the inode's
                // lock) any page of the inode, which only a transaction
                // already sent pins.
                let may_wait_for_ack = self.cfg.overwrite == OverwritePolicy::Wait
                    && match offset {
                        Some(offset) => {
                            let first = offset / PAGE_SIZE;
                            let last = offset.saturating_add(len.saturating_sub(1)) / PAGE_SIZE;
                            st.cache.any_pinned(ino, first, last)
                        }
                        None => st.by_inode.get(&ino).is_some_and(|q| {
                            q.iter()
                                .any(|id| st.txns.get(id).is_some_and(|t| t.pinned.is_some()))
                        }),
                    };
                !st.shutdown && !st.full && room(&st, bytes) && !may_wait_for_ack
            }
            Demand::Metadata => {
                let st = lock(&self.state);
                !st.shutdown
                    && st.txns.len() < MAX_QUEUED_TXNS
                    && (st.full || room(&st, METADATA_DEMAND_BYTES))
            }
            Demand::Close => !self.cfg.sync_on_close,
            Demand::Attributes { ino } => lock(&self.state).attrs.contains_key(&ino),
            Demand::Entries { dir } => lock(&self.state).complete_dirs.holds(dir),
            Demand::Xattrs { ino } => lock(&self.state).known_xattrs.has_none(ino),
            Demand::Read { ino, offset, len } => {
                let (first, end) = (offset / PAGE_SIZE, offset.saturating_add(len));
                let last = end.saturating_sub(1).max(offset) / PAGE_SIZE;
                let (ready, cached) = {
                    let st = lock(&self.state);
                    let ready =
                        st.attrs.contains_key(&ino) && !st.ahead.overlaps(ino, &(first..last + 1));
                    (
                        ready,
                        ready && (first..=last).all(|i| st.cache.contains(ino, i)),
                    )
                };
                // Pages the cache lacks may be on this machine still (the
                // read cache of a remote volume): asked outside the lock.
                ready && (cached || self.store.reads_locally(ino, offset, len))
            }
        }
    }

    /// When a wait that starts now gives up: every wait of the layer is
    /// bounded by `fsync_timeout`, as fsync is.
    fn wait_deadline(&self) -> std::time::Instant {
        std::time::Instant::now() + self.cfg.fsync_timeout
    }

    /// Wait for a change until `deadline`; past it, count and answer an
    /// error (the request that waited fails with EIO): a store that stopped
    /// acknowledging holds up a request for `fsync_timeout`, not forever.
    fn wait_until<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: std::time::Instant,
        what: &str,
    ) -> Result<MutexGuard<'a, State>, StoreError> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            self.metrics.writeback_wait_timeouts.inc();
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no {what} within {:?}", self.cfg.fsync_timeout),
            )));
        }
        Ok(wait_timeout(&self.changed, st, left))
    }

    /// The pages a write of `len > 0` bytes at `offset` covers.
    fn span(&self, ino: u64, offset: u64, len: u64) -> Result<PageSpan, StoreError> {
        let size_before = self.current_inode(ino)?.map_or(0, |i| i.size);
        let first = offset / PAGE_SIZE;
        let end = offset + len;
        let last = (end - 1) / PAGE_SIZE;
        // Pages written only in part, where the store may have old bytes.
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

    /// Lock the state once the write may touch its pages: backpressure lets
    /// it through and (under `wait`) none of its pages is pinned; nothing
    /// here waits for the store. Everything that makes a write wait
    /// happens here, before it touches a page, and after any wait it starts
    /// over: a transaction chosen before a wait may have been sent during it.
    fn wait_to_write(
        &self,
        ino: u64,
        span: &PageSpan,
    ) -> Result<MutexGuard<'_, State>, StoreError> {
        let deadline = self.wait_deadline();
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
            // Backpressure: dirty and in-flight bytes stay within their bound.
            if st.dirty_bytes > 0 && st.dirty_bytes + span.bytes > self.cfg.dirty_max_bytes {
                self.metrics.backpressure_waits.inc();
                st = self.wait_until(st, deadline, "room under --dirty-max")?;
                continue;
            }
            if self.cfg.overwrite == OverwritePolicy::Wait
                && st.cache.any_pinned(ino, span.first, span.last)
            {
                self.metrics.overwrite_waits.inc();
                st = self.wait_until(st, deadline, "ack of the pinned pages")?;
                continue;
            }
            return Ok(st);
        }
    }

    /// The transaction a write of `bytes` to `ino` joins: the inode's
    /// queued one if it can take more, else a new one.
    fn data_txn(&self, st: &mut State, ino: u64, bytes: u64, inode: &Inode) -> u64 {
        let max_bytes = self.cfg.max_txn_bytes.min(TXN_DATA_BYTES_MAX);
        let put_inode = op_wire_bytes(&Op::PutInode(inode.clone()));
        let newest = st.by_inode.get(&ino).and_then(|q| q.back().copied());
        let tail = newest.filter(|id| {
            st.txns.get(id).is_some_and(|t| {
                t.data_may_join(ino)
                    && t.data_bytes + bytes <= max_bytes
                    && t.meta_bytes + put_inode <= TXN_META_BYTES_MAX
            })
        });
        let Some(id) = tail else {
            // A write's own transaction that this write does not fit in
            // has nothing more to wait for.
            if let Some(t) = newest.and_then(|n| st.txns.get_mut(&n)) {
                if t.mergeable && t.attempts == 0 && t.not_before.take().is_some() {
                    self.wake_sender();
                }
            }
            let mut entry = Self::new_entry(st, vec![Op::PutInode(inode.clone())], true);
            if !self.cfg.data_linger.is_zero() && !st.eager_sync.contains(&ino) {
                entry.not_before = Some(Instant::now() + self.cfg.data_linger);
            }
            return self.enqueue(st, entry);
        };
        // Joining: the transaction lingers on (a write's own, or the
        // create of this file with its burst); a metadata one must carry
        // the attributes the data is clipped to.
        if let Some(t) = st.txns.get_mut(&id) {
            let linger = if t.mergeable {
                self.cfg.data_linger
            } else {
                self.cfg.meta_linger
            };
            t.linger_on(Instant::now(), linger);
            if !t
                .ops
                .iter()
                .any(|op| matches!(op, Op::PutInode(i) if i.ino == ino))
            {
                Arc::make_mut(&mut t.ops).push(Op::PutInode(inode.clone()));
                t.meta_bytes += put_inode;
            }
        }
        id
    }

    /// Put `data` into the pages of `ino` from `offset`, tagging each
    /// newly dirty page with `txn_id`: a part that is exactly one aligned
    /// page becomes the page's buffer, any other bytes are copied in (into
    /// a partial page where `over_store` lists it and it is absent).
    fn copy_into_pages(
        &self,
        st: &mut State,
        ino: u64,
        offset: u64,
        data: &WriteData,
        txn_id: u64,
        over_store: &[u64],
    ) {
        for (at, part) in data.parts_at() {
            let mut pos = offset + at as u64;
            if pos % PAGE_SIZE == 0 && part.len() as u64 == PAGE_SIZE {
                let idx = pos / PAGE_SIZE;
                if st.cache.is_pinned(ino, idx) {
                    // Only under `cow`: `wait` waited before.
                    self.metrics.overwrite_copies.inc();
                }
                let newly = st.cache.adopt(ino, idx, part.clone(), txn_id);
                self.tagged(st, ino, idx, txn_id, newly);
                continue;
            }
            let mut rest = &part[..];
            while !rest.is_empty() {
                let idx = pos / PAGE_SIZE;
                let in_page = (pos % PAGE_SIZE) as usize;
                let n = rest.len().min(PAGE_SIZE as usize - in_page);
                if st.cache.is_pinned(ino, idx) {
                    self.metrics.overwrite_copies.inc();
                }
                let newly = if over_store.contains(&idx) {
                    st.cache
                        .write_over_store(ino, idx, in_page, &rest[..n], txn_id)
                } else {
                    st.cache.write(ino, idx, in_page, &rest[..n], txn_id)
                };
                self.tagged(st, ino, idx, txn_id, newly);
                rest = &rest[n..];
                pos += n as u64;
            }
        }
    }

    /// Count page `idx` into transaction `txn_id` when it was `newly`
    /// tagged with it.
    fn tagged(&self, st: &mut State, ino: u64, idx: u64, txn_id: u64, newly: bool) {
        if newly {
            if let Some(t) = st.txns.get_mut(&txn_id) {
                t.pages.entry(ino).or_default().insert(idx);
                t.data_bytes += PAGE_SIZE;
            }
            st.dirty_bytes += PAGE_SIZE;
        }
    }

    /// The written inode's newest attributes: carried by its transaction
    /// and seen by reads.
    fn carry_attributes(st: &mut State, ino: u64, txn_id: u64, inode: Inode) {
        if let Some(t) = st.txns.get_mut(&txn_id) {
            for op in Arc::make_mut(&mut t.ops) {
                if let Op::PutInode(i) = op {
                    if i.ino == ino {
                        *i = inode.clone();
                    }
                }
            }
        }
        st.remember_attrs(
            ino,
            Overlay {
                inode: Some(inode),
                txn: txn_id,
            },
        );
    }

    /// Keep pages fetched from the store at page `first` as clean pages,
    /// where absent (partial pages take the bytes they lack), with the state
    /// locked by the read that fetched them (so no cut can come between the
    /// read and the keeping). Each page is a buffer of its own (one copy per
    /// page; eviction frees it): a read of it needs no store round trip.
    pub(super) fn keep_fetched(
        &self,
        st: &mut MutexGuard<'_, State>,
        ino: u64,
        first: u64,
        fetched: &ReadData,
    ) -> Result<(), StoreError> {
        let count = fetched.len() / PAGE_SIZE as usize;
        for i in 0..count {
            let page = fetched
                .page(i * PAGE_SIZE as usize)
                .map_err(StoreError::Io)?;
            st.cache.insert_clean(ino, first + i as u64, page);
        }
        let evicted = st.cache.evict();
        self.metrics.cache_evictions.add(evicted);
        self.publish(st);
        Ok(())
    }

    /// A metadata transaction: apply its effects to the cache and the
    /// overlay (so reads see them at once), queue it, and return — the
    /// write-back contract: fsync and fsyncdir wait for it. Truncates and
    /// punched holes too: reads see the ranges they zeroed through the
    /// overlay (`Holes`). Writes carried in the operations (any write in
    /// another shape than the filesystem layer's) wait for their ack: until
    /// the store has the new bytes, a read of a page the cache does not hold
    /// could return the old ones.
    ///
    /// The operations join the newest transaction when it is metadata that
    /// was never sent (group commit in the daemon: a burst of unlinks in one
    /// directory is one commit, not one round trip each). Being the newest,
    /// it is the last of every inode's queue, so appending keeps every
    /// inode's order. A new metadata transaction lingers `meta_linger`
    /// past the newest change that joined it (within
    /// [`META_LINGER_SPAN_MAX`](super::queue::META_LINGER_SPAN_MAX) lingers
    /// of its forming) before it is sent,
    /// so that the burst can gather; a sync sends it at once.
    ///
    /// Metadata changes count against `dirty_max_bytes` like pages (their
    /// wire bytes and what they hold in memory, `held_bytes`): a change
    /// waits for room, unless the volume is full (the removal that would
    /// free space must not wait for acks that wait for space).
    /// A transaction too large for one wire frame (more than `TXN_OPS_MAX`
    /// operations or `TXN_META_BYTES_MAX` bytes; the filesystem layer never
    /// builds one) is refused at once: it could never be sent.
    pub(super) fn commit_metadata(&self, txn: Txn) -> Result<(), StoreError> {
        let wait_ack = txn.ops.iter().any(|op| matches!(op, Op::Write { .. }));
        let bytes: u64 = txn.ops.iter().map(op_wire_bytes).sum();
        let held = held_bytes(bytes, txn.ops.len());
        if txn.ops.len() > TXN_OPS_MAX || bytes > TXN_META_BYTES_MAX {
            self.metrics.txn_oversized.inc();
            limited!(
                self.metrics.log_lines_suppressed,
                WARN,
                ops = txn.ops.len(),
                bytes,
                "transaction too large for one frame: refused"
            );
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "transaction of {} operations and {bytes} bytes exceeds the bound of \
                     {TXN_OPS_MAX} operations and {TXN_META_BYTES_MAX} bytes",
                    txn.ops.len()
                ),
            )));
        }
        let id = {
            let deadline = self.wait_deadline();
            let mut st = lock(&self.state);
            // Bound the queue (metadata is small, but not free) and the
            // dirty bytes.
            loop {
                let queue_full = st.txns.len() >= MAX_QUEUED_TXNS;
                // A full volume waits for space, not acks: the removal
                // that would free it must not wait behind it.
                let no_room = !st.full
                    && st.dirty_bytes > 0
                    && st.dirty_bytes + held > self.cfg.dirty_max_bytes;
                if st.shutdown || !(queue_full || no_room) {
                    break;
                }
                self.metrics.backpressure_waits.inc();
                st = self.wait_until(st, deadline, "room for metadata")?;
            }
            let id = self.metadata_txn(&mut st, txn.ops.len(), bytes, wait_ack);
            self.append_ops(&mut st, id, &txn.ops, (bytes, held), wait_ack);
            for op in &txn.ops {
                st.reflect(op, id);
            }
            self.publish(&st);
            self.nudge_for(&mut st, id);
            drop(st);
            id
        };
        if wait_ack {
            self.wait_for(&[id], self.cfg.fsync_timeout, false)?;
        }
        Ok(())
    }

    /// The transaction `ops` more metadata operations go into: the newest
    /// when it is unsent metadata with room for them, else a new one (which
    /// lingers unless its ack is waited for).
    fn metadata_txn(&self, st: &mut State, ops: usize, bytes: u64, wait_ack: bool) -> u64 {
        let max_ops = self.cfg.max_txn_ops.min(TXN_OPS_MAX);
        let join = st.txns.last_key_value().and_then(|(&id, t)| {
            (t.metadata_may_join()
                && t.ops.len() + ops <= max_ops
                && t.meta_bytes + bytes <= TXN_META_BYTES_MAX)
                .then_some(id)
        });
        if let Some(id) = join {
            self.metrics.txn_joined.inc();
            if let Some(t) = st.txns.get_mut(&id) {
                t.linger_on(Instant::now(), self.cfg.meta_linger);
            }
            return id;
        }
        let mut entry = Self::new_entry(st, Vec::new(), false);
        if !wait_ack && !self.cfg.meta_linger.is_zero() {
            entry.not_before = Some(Instant::now() + self.cfg.meta_linger);
        }
        self.enqueue(st, entry)
    }

    /// Append `ops` (`sizes`: their wire bytes and their held bytes) to the
    /// queued transaction `id`, and queue it behind every inode they touch
    /// that it did not touch yet.
    fn append_ops(&self, st: &mut State, id: u64, ops: &[Op], sizes: (u64, u64), wait_ack: bool) {
        let (bytes, held) = sizes;
        let mut inodes = BTreeSet::new();
        for op in ops {
            op_inodes(op, &mut inodes);
        }
        let State {
            txns,
            by_inode,
            dirty_bytes,
            ..
        } = st;
        if let Some(t) = txns.get_mut(&id) {
            for ino in inodes {
                if t.inodes.insert(ino) {
                    by_inode.entry(ino).or_default().push_back(id);
                }
            }
            Arc::make_mut(&mut t.ops).extend(ops.iter().cloned());
            t.meta_bytes += bytes;
            t.dirty_meta_bytes += held;
            *dirty_bytes += held;
            // Full, or waited for: no reason to linger.
            if wait_ack
                || t.ops.len() >= self.cfg.max_txn_ops.min(TXN_OPS_MAX)
                || t.meta_bytes >= TXN_META_BYTES_MAX
            {
                t.not_before = None;
            }
        }
    }
}
