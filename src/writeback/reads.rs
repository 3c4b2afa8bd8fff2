//! The layer as a [`Store`]: reads are answered from the page cache and the
//! namespace overlay before the store beneath; `commit` hands the
//! filesystem layer's write to the write path and any other transaction to
//! the metadata path (`write.rs`); `sync` waits for acks and `flush` (a
//! close) reports what is known and returns (`sync.rs`).

use std::collections::BTreeSet;
use std::sync::MutexGuard;

use bytes::Bytes;
use tracing::debug;

use super::ack::lock;
use super::ahead::AHEAD_WINDOW_MIN_BYTES;
use super::budget::{release_free_memory, TRIM_AFTER_FREED_BYTES};
use super::cache::PAGE_SIZE;
use super::listing::Pending;
use super::partial::Known;
use super::{Shared, State, WritebackStore};
use crate::store::{
    Dirent, Inode, Op, ReadData, ReadPiece, Store, StoreError, StoreStats, Txn, WriteData,
};

impl Shared {
    /// Read `len` bytes at `offset` of `ino` from the store, with the ranges
    /// cut by unacknowledged truncates and punched holes zeroed; returns
    /// them with the state, locked, and whether they may be kept (no ack of
    /// the inode's pages overtook the read: the bytes may predate it, and a
    /// reader may answer with them but not keep them). `None` when a cut
    /// retired during the read: the store may have applied it after the
    /// read, so the bytes may predate it (the caller reads again, or does not
    /// keep them).
    pub(super) fn read_store(
        &self,
        ino: u64,
        offset: u64,
        len: usize,
    ) -> Result<Option<(ReadData, MutexGuard<'_, State>, bool)>, StoreError> {
        let (retired, acks) = {
            let st = lock(&self.state);
            (st.holes.retired, st.cache.acks_of(ino))
        };
        let asked = std::time::Instant::now();
        let data = self.store.read_data(ino, offset, len)?;
        self.metrics
            .levels
            .store_read_latency
            .observe(asked.elapsed());
        let st = lock(&self.state);
        if st.holes.retired != retired {
            return Ok(None);
        }
        let keep = st.cache.acks_of(ino) == acks;
        if !st.holes.touches(ino, offset, len) {
            return Ok(Some((data, st, keep)));
        }
        // Rare (a truncate or punch not yet acknowledged): the bytes are
        // read into a buffer to zero the cut ranges.
        let mut bytes = data.to_vec().map_err(StoreError::Io)?;
        st.holes.zero(ino, offset, &mut bytes);
        Ok(Some((ReadData::from(bytes), st, keep)))
    }
}

impl Store for WritebackStore {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.shared.current_inode(ino)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        let generation = {
            let st = lock(&self.shared.state);
            if let Some((d, _)) = st.dirents.get(&parent).and_then(|m| m.get(name)) {
                return Ok(d.clone());
            }
            if let Some(known) = st.complete_dirs.lookup(parent, name) {
                return Ok(known);
            }
            if let Some(known) = st.known_names.get(parent, name) {
                return Ok(known);
            }
            st.known_names.generation
        };
        let entry = self.shared.store.lookup(parent, name)?;
        lock(&self.shared.state)
            .known_names
            .remember(generation, parent, name, &entry);
        Ok(entry)
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        let (overlay, generation): (Vec<Pending>, u64) = {
            let st = lock(&self.shared.state);
            // A directory created in this session is listed from memory:
            // no store round trip per guest buffer of entries (`rm -r` of
            // what a build wrote, on a remote volume).
            if let Some(listed) = st.complete_dirs.readdir(parent, after, max) {
                return Ok(listed);
            }
            let overlay = st.dirents.get(&parent).map_or_else(Vec::new, |m| {
                m.iter().map(|(n, (d, _))| (n.clone(), d.clone())).collect()
            });
            (overlay, st.listings.generation)
        };
        // Ask the store for enough that, with the overlay's names filtered
        // out, a full batch remains whenever the store has more.
        let fetch = max.saturating_add(overlay.len());
        let stored = self
            .shared
            .stored_entries(parent, after, fetch, &overlay, generation)?;
        if overlay.is_empty() {
            return Ok(stored);
        }
        let exhausted = stored.len() < fetch;
        let last = stored.last().map(|d| d.cookie);
        let shadowed: std::collections::HashSet<&[u8]> =
            overlay.iter().map(|(n, _)| n.as_slice()).collect();
        let mut out: Vec<Dirent> = stored
            .into_iter()
            .filter(|d| !shadowed.contains(d.name.as_slice()))
            .collect();
        // Overlay entries past the last stored cookie wait for the next
        // batch unless the store has nothing more: cookies stay in order.
        out.extend(
            overlay
                .into_iter()
                .filter_map(|(_, d)| d)
                .filter(|d| d.cookie > after && (exhausted || last.is_some_and(|l| d.cookie <= l))),
        );
        out.sort_by_key(|d| d.cookie);
        out.truncate(max);
        Ok(out)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let data = self.read_data(ino, offset, buf.len())?;
        data.copy_to(0, buf).map_err(StoreError::Io)
    }

    fn read_data(&self, ino: u64, offset: u64, len: usize) -> Result<ReadData, StoreError> {
        let sh = &self.shared;
        if len == 0 {
            return Ok(ReadData::new());
        }
        let end = offset + len as u64;
        let (first, last) = (offset / PAGE_SIZE, (end - 1) / PAGE_SIZE);
        // Pages a read-ahead chunk is fetching: wait for it, not the store.
        sh.wait_for_ahead(ino, first..last + 1)?;
        let plan = sh.plan_read(ino, offset, end);
        sh.metrics
            .cache_hits
            .add((last - first + 1) - plan.missing_pages);
        sh.metrics.cache_misses.add(plan.missing_pages);
        let mut out = ReadData::new();
        for seg in plan.segs {
            match seg {
                Seg::Cached(b) => out.push(ReadPiece::Bytes(b)),
                // Pages evicted or never cached: the store has their newest
                // bytes (the cache never drops a dirty page). The pieces go
                // to the guest as the store gave them (file ranges
                // included).
                Seg::Missing { pages, known } => {
                    let base = pages.start * PAGE_SIZE;
                    let n = ((pages.end - pages.start) * PAGE_SIZE) as usize;
                    // A remote volume's blocks in the local read cache are
                    // read from there each time, like segment files.
                    let local =
                        !sh.cfg.forget_clean_pages && sh.store.reads_locally(ino, base, n as u64);
                    // A cut that retired during the read may postdate its
                    // bytes: read again.
                    let (mut fetched, mut st, keep) = loop {
                        if let Some(got) = sh.read_store(ino, base, n)? {
                            break got;
                        }
                    };
                    // Pages written in part (`partial.rs`): their bytes
                    // over the store's, and kept whole. First as they were
                    // when the read was planned: the store may have read
                    // them before it applied the transaction whose ack
                    // then took the page out of the cache (an eviction of
                    // the clean page, or a write's new partial page, in
                    // the meantime). Then as they are now: newer bytes win.
                    let partial =
                        !known.is_empty() || pages.clone().any(|i| st.cache.is_partial(ino, i));
                    if partial {
                        let mut bytes = fetched.to_vec().map_err(StoreError::Io)?;
                        // Past the end of the file the store has zeros.
                        bytes.resize(n, 0);
                        for (i, idx) in pages.clone().enumerate() {
                            let at = i * PAGE_SIZE as usize;
                            if let Some(page) = bytes.get_mut(at..at + PAGE_SIZE as usize) {
                                for (_, buf, k) in known.iter().filter(|(j, ..)| *j == idx) {
                                    k.copy_over(buf, page);
                                }
                                st.cache.copy_known(ino, idx, page);
                            }
                        }
                        fetched = ReadData::from(bytes);
                    }
                    // Bytes in memory (remote and `mem:` stores) are kept
                    // as clean pages. Segment ranges and the read cache's
                    // blocks are not: the host page cache keeps them hot,
                    // and keeping them would cost page bookkeeping and
                    // evictions per cold read, for no round trip saved.
                    if keep && (partial || !(local || fetched.has_file_pieces())) {
                        sh.keep_fetched(&mut st, ino, pages.start, &fetched)?;
                    }
                    drop(st);
                    let (from, to) = (offset.max(base), end.min(pages.end * PAGE_SIZE));
                    out.extend(fetched.slice((from - base) as usize, (to - from) as usize));
                }
            }
        }
        // A sequential reader of a remote volume: what comes next is
        // fetched in parallel in the background (`ahead.rs`), never inside
        // this READ; a window the local read cache holds whole is not.
        // Segment files (`file://`) are read ahead by the host kernel's own
        // read-ahead of the segment file, as virtiofsd's files are.
        if let Some(a) = plan.read_ahead {
            let (from, len) = (a.start * PAGE_SIZE, (a.end - a.start) * PAGE_SIZE);
            if !sh.store.reads_locally(ino, from, len) {
                sh.metrics.read_ahead.add(1);
                Shared::fetch_ahead(sh, ino, a, plan.read_ahead_to_eof);
            }
        }
        Ok(out)
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        // The store must know every dirty page before it can say where data is.
        self.shared.sync(Some(ino))?;
        self.shared.store.next_data(ino, offset)
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.shared.sync(Some(ino))?;
        self.shared.store.next_hole(ino, offset)
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some((t, _)) = lock(&self.shared.state).symlinks.get(&ino) {
            return Ok(Some(t.clone()));
        }
        self.shared.store.readlink(ino)
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let generation = {
            let st = lock(&self.shared.state);
            if let Some((v, _)) = st.xattrs.get(&ino).and_then(|m| m.get(name)) {
                return Ok(v.clone());
            }
            if let Some(known) = st.known_xattrs.get(ino, name) {
                return Ok(known);
            }
            st.known_xattrs.generation
        };
        let value = self.shared.store.get_xattr(ino, name)?;
        lock(&self.shared.state)
            .known_xattrs
            .remember(generation, ino, name, &value);
        Ok(value)
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        // The lock is let go before the store is asked.
        let overlay: Option<Vec<(Vec<u8>, bool)>> = {
            let st = lock(&self.shared.state);
            match st.xattrs.get(&ino) {
                // Known to have none: only a change would have given it one.
                None if st.known_xattrs.has_none(ino) => return Ok(Vec::new()),
                None => None,
                Some(m) => Some(
                    m.iter()
                        .map(|(n, (v, _))| (n.clone(), v.is_some()))
                        .collect(),
                ),
            }
        };
        let Some(overlay) = overlay else {
            return self.shared.store.list_xattr(ino);
        };
        let mut names: BTreeSet<Vec<u8>> = self.shared.store.list_xattr(ino)?.into_iter().collect();
        for (name, present) in overlay {
            if present {
                names.insert(name);
            } else {
                names.remove(&name);
            }
        }
        Ok(names.into_iter().collect())
    }

    fn forgotten(&self, ino: u64) {
        let sh = &self.shared;
        let trim = {
            let mut st = lock(&sh.state);
            let pages = st.forget_cached(ino, sh.cfg.forget_clean_pages);
            sh.metrics.cache_evictions.add(pages);
            sh.publish(&st);
            st.freed_since_trim += pages * PAGE_SIZE;
            let trim = st.freed_since_trim >= TRIM_AFTER_FREED_BYTES;
            if trim {
                st.freed_since_trim = 0;
            }
            trim
        };
        if trim {
            release_free_memory();
        }
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.shared.store.statfs()
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        let first = self.shared.store.reserve_ids(count)?;
        lock(&self.shared.state)
            .complete_dirs
            .reserved(first, count);
        Ok(first)
    }

    fn write(
        &self,
        ino: u64,
        offset: u64,
        data: WriteData,
        inode: Inode,
    ) -> Result<(), StoreError> {
        if inode.ino != ino {
            let mut txn = Txn::new();
            txn.push(Op::Write { ino, offset, data });
            txn.push(Op::PutInode(inode));
            return self.shared.commit_metadata(txn);
        }
        self.shared.write(ino, offset, &data, inode)
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        // A write in the filesystem layer's shape: one Write and the
        // inode's attributes (the filesystem layer calls `write`).
        if let [Op::Write { ino, offset, data }, Op::PutInode(inode)] = &txn.ops[..] {
            if inode.ino == *ino {
                return self.shared.write(*ino, *offset, data, inode.clone());
            }
        }
        if txn.ops.iter().any(|op| matches!(op, Op::Write { .. })) {
            // Writes in any other shape travel in the operations, ordered
            // like metadata, and are waited for (write-through).
            debug!("transaction with data in another shape: sent write-through");
        }
        self.shared.commit_metadata(txn)
    }

    fn wait_for_room(&self, bytes: u64) -> Result<(), StoreError> {
        self.shared.wait_for_room(bytes)
    }

    fn would_not_wait(&self, demand: crate::store::Demand) -> bool {
        self.shared.would_not_wait(demand)
    }

    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.shared.sync(ino)
    }

    fn flush(&self, ino: u64) -> Result<(), StoreError> {
        self.shared.close(ino)
    }

    fn snapshot(&self, name: &str) -> Result<String, StoreError> {
        // Written but unsent pages are sent first: the snapshot holds
        // every write made before it was asked for.
        self.shared.sync(None)?;
        self.shared.store.snapshot(name)
    }

    fn identity(&self) -> Option<crate::store::engine::VolumeIdentity> {
        self.shared.store.identity()
    }

    fn describe(&self) -> String {
        let cfg = &self.shared.cfg;
        format!(
            "{} through the transaction layer ({:?} overwrites, cache {} MiB, dirty max {} MiB, {})",
            self.shared.store.describe(),
            cfg.overwrite,
            cfg.cache_bytes >> 20,
            cfg.dirty_max_bytes >> 20,
            if cfg.sync_on_close {
                "sync on close"
            } else {
                "durable at fsync"
            }
        )
    }
}

/// A piece of a read as planned under the lock.
enum Seg {
    /// The part of a cached page the read covers (a shared reference).
    Cached(Bytes),
    /// A run of pages the cache does not hold whole, with the bytes it
    /// holds of those it has in part (page, buffer, which bytes).
    Missing {
        pages: std::ops::Range<u64>,
        known: Vec<(u64, Bytes, Known)>,
    },
}

/// What a read takes from the cache, what it asks the store for, and what
/// it reads ahead.
struct ReadPlan {
    segs: Vec<Seg>,
    missing_pages: u64,
    /// Pages to load into the cache after the read, for a sequential reader.
    read_ahead: Option<std::ops::Range<u64>>,
    /// The read-ahead ends at the end of the file.
    read_ahead_to_eof: bool,
}

impl Shared {
    /// Under the lock: take references to the cached pages of
    /// `offset..end`, note the runs the cache lacks, and decide the read
    /// ahead. Nothing is copied here: the guest copies from the pages.
    fn plan_read(&self, ino: u64, offset: u64, end: u64) -> ReadPlan {
        let mut st = lock(&self.state);
        // Only a remote volume's reader is read ahead here (below).
        let remote = !self.cfg.forget_clean_pages;
        let sequential = remote && st.last_read_end.get(&ino) == Some(&offset);
        if remote {
            if st.last_read_end.len() > 4096 {
                st.last_read_end.clear();
            }
            st.last_read_end.insert(ino, end);
        }
        let size = st
            .attrs
            .get(&ino)
            .and_then(|o| o.inode.as_ref())
            .map(|i| i.size);
        let mut segs = Vec::new();
        let mut missing_pages = 0;
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE_SIZE;
            let page_end = ((idx + 1) * PAGE_SIZE).min(end);
            match st.cache.page(ino, idx) {
                Some(buf) => {
                    let at = (pos % PAGE_SIZE) as usize;
                    segs.push(Seg::Cached(buf.slice(at..at + (page_end - pos) as usize)));
                }
                None => {
                    missing_pages += 1;
                    let part = st.cache.known_part(ino, idx).map(|(b, k)| (idx, b, k));
                    match segs.last_mut() {
                        Some(Seg::Missing { pages, known }) if pages.end == idx => {
                            pages.end = idx + 1;
                            known.extend(part);
                        }
                        _ => segs.push(Seg::Missing {
                            pages: idx..idx + 1,
                            known: part.into_iter().collect(),
                        }),
                    }
                }
            }
            pos = page_end;
        }
        // A sequential reader of a remote volume (every read a round trip,
        // clean pages kept), whether it missed or not, gets a window of at
        // least `AHEAD_WINDOW_MIN_BYTES` after its read fetched, up to the
        // file's size, so that it keeps running ahead of the reader. On
        // `file://` the host's read-ahead of the segment files does it
        // (the kernel reads ahead into large folios; advising each window
        // cost extent lookups per READ and filled the page cache with
        // single-page folios, `docs/benchmarks.md`, session 45).
        let next = end.div_ceil(PAGE_SIZE);
        let limit = size.map_or(u64::MAX, |s| s.div_ceil(PAGE_SIZE));
        let window = self.cfg.read_ahead_bytes.max(AHEAD_WINDOW_MIN_BYTES);
        let ahead_end = (next + window / PAGE_SIZE).min(limit);
        let read_ahead = (sequential && ahead_end > next)
            .then_some(next..ahead_end)
            // From the end: a window the reader moves into lacks its tail.
            .filter(|r| !(r.start..r.end).rev().all(|i| st.cache.contains(ino, i)));
        ReadPlan {
            segs,
            missing_pages,
            read_ahead,
            read_ahead_to_eof: ahead_end == limit,
        }
    }
}
