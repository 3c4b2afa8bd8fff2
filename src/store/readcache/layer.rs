//! The read cache as wrappers of the two seams the write-back layer uses:
//! [`CachedStore`] answers reads from the cache and fills it from the
//! store; [`CachedSink`] takes the blocks a transaction changes out of the
//! cache before it is sent, and puts the acknowledged data in.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Key, ReadCache};
use crate::store::delegate::delegate_store;
use crate::store::sink::{Ack, SendError, SendFuture, Sink};
use bytes::Bytes;

use crate::store::{Op, ReadData, ReadPiece, Store, StoreError, Txn, WriteData, BLOCK_SIZE};

/// The most blocks [`CachedStore::reads_locally`] looks up (64 MiB).
const LOCAL_CHECK_BLOCKS_MAX: u64 = 1024;

/// The blocks of `[offset, offset + len)` (cut at 2^64), first and last;
/// `None` when empty.
fn blocks_of(offset: u64, len: u64) -> Option<(u64, u64)> {
    let last_byte = offset.saturating_add(len.checked_sub(1)?);
    Some((offset / BLOCK_SIZE, last_byte / BLOCK_SIZE))
}

/// The inodes whose data `txn` changes, and the blocks of each it may
/// change.
fn data_changes(txn: &Txn) -> Vec<(u64, u64, u64)> {
    txn.ops
        .iter()
        .filter_map(|op| match op {
            Op::Write { ino, offset, data } => {
                blocks_of(*offset, data.len() as u64).map(|(f, l)| (*ino, f, l))
            }
            Op::Truncate { ino, size } => Some((*ino, size / BLOCK_SIZE, u64::MAX)),
            Op::PunchHole { ino, offset, len } => {
                blocks_of(*offset, *len).map(|(f, l)| (*ino, f, l))
            }
            Op::RemoveInode { ino } => Some((*ino, 0, u64::MAX)),
            _ => None,
        })
        .collect()
}

fn inos_of(changes: &[(u64, u64, u64)]) -> Vec<u64> {
    let mut inos: Vec<u64> = changes.iter().map(|c| c.0).collect();
    inos.sort_unstable();
    inos.dedup();
    inos
}

/// What a transaction's send took out of the cache that its ack may put
/// back changed: the cached blocks its writes cover only in part.
type Bases = HashMap<Key, Vec<u8>>;

impl ReadCache {
    /// Before `txn` is sent: stop caching reads of its inodes, keep the
    /// cached blocks its writes cover in part (to patch at ack), and drop
    /// every block it may change, files included.
    fn prepare(&self, txn_id: u64, txn: &Txn, changes: &[(u64, u64, u64)]) -> Bases {
        self.begin(txn_id, &inos_of(changes));
        let mut bases = Bases::new();
        for op in &txn.ops {
            if let Op::Write { ino, offset, data } = op {
                let Some((first, last)) = blocks_of(*offset, data.len() as u64) else {
                    continue;
                };
                let end = offset.saturating_add(data.len() as u64);
                for b in [first, last] {
                    let whole =
                        b * BLOCK_SIZE >= *offset && (b + 1).saturating_mul(BLOCK_SIZE) <= end;
                    if !whole && !bases.contains_key(&(*ino, b)) {
                        if let Some(block) = self.get(*ino, b) {
                            let mut whole = vec![0u8; BLOCK_SIZE as usize];
                            whole[..block.len()].copy_from_slice(&block);
                            bases.insert((*ino, b), whole);
                        }
                    }
                }
            }
        }
        for &(ino, first, last) in changes {
            self.invalidate(ino, first..=last);
        }
        bases
    }

    /// After `txn` is durable: put the blocks its writes leave known in
    /// whole (patched bases, blocks written from their start to the end
    /// of the block or of the file), then let reads of its inodes be
    /// cached again.
    fn complete(&self, txn_id: u64, txn: &Txn, changes: &[(u64, u64, u64)], mut work: Bases) {
        let mut size_after: HashMap<u64, u64> = HashMap::new();
        for op in &txn.ops {
            if let Op::PutInode(inode) = op {
                size_after.insert(inode.ino, inode.size);
            }
        }
        for op in &txn.ops {
            match op {
                Op::Write { ino, offset, data } => {
                    let limit = size_after.get(ino).copied().unwrap_or(u64::MAX);
                    apply_write(&mut work, *ino, *offset, data, limit);
                }
                Op::Truncate { ino, size } => {
                    work.retain(|&(i, b), block| {
                        if i != *ino || b < size / BLOCK_SIZE {
                            return true;
                        }
                        let keep = (size % BLOCK_SIZE) as usize;
                        if b == size / BLOCK_SIZE && keep > 0 {
                            block[keep..].fill(0);
                            return true;
                        }
                        false
                    });
                }
                Op::PunchHole { ino, offset, len } => {
                    // Zero what is known; the rest was dropped at send.
                    let end = offset.saturating_add(*len);
                    for (&(i, b), block) in work.iter_mut() {
                        let start = b * BLOCK_SIZE;
                        if i == *ino && start < end && start.saturating_add(BLOCK_SIZE) > *offset {
                            let from = offset.saturating_sub(start) as usize;
                            let to = ((end - start).min(BLOCK_SIZE)) as usize;
                            block[from..to].fill(0);
                        }
                    }
                }
                Op::RemoveInode { ino } => work.retain(|&(i, _), _| i != *ino),
                _ => {}
            }
        }
        for ((ino, b), block) in work {
            self.put_acked(ino, b, &block);
        }
        self.settle(txn_id, &inos_of(changes));
    }
}

/// Apply one acknowledged write to the known blocks in `work`, adding the
/// blocks it writes from their start up to the end of the block or to
/// `size` (the file's size after the transaction: bytes beyond read as
/// zeros).
fn apply_write(work: &mut Bases, ino: u64, offset: u64, data: &WriteData, size: u64) {
    let Some((first, last)) = blocks_of(offset, data.len() as u64) else {
        return;
    };
    // A write past 2^64 is refused above (EFBIG); it is not cached.
    let Some(end) = offset.checked_add(data.len() as u64) else {
        return;
    };
    for b in first..=last {
        let start = b * BLOCK_SIZE;
        let block_end = start.saturating_add(BLOCK_SIZE);
        let known = work.contains_key(&(ino, b));
        let covered = offset <= start && end >= block_end.min(size);
        if !(known || covered) {
            continue;
        }
        let block = work
            .entry((ino, b))
            .or_insert_with(|| vec![0u8; BLOCK_SIZE as usize]);
        // Copy the part of the write inside this block, part by part.
        let from = offset.max(start);
        let to = end.min(block_end);
        let mut pos = offset;
        for part in data.slices() {
            let part_end = pos + part.len() as u64;
            let (lo, hi) = (pos.max(from), part_end.min(to));
            if lo < hi {
                block[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&part[(lo - pos) as usize..(hi - pos) as usize]);
            }
            pos = part_end;
        }
    }
}

/// The store's reads through the cache.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    cache: Arc<ReadCache>,
}

impl CachedStore {
    pub fn new(inner: Arc<dyn Store>, cache: Arc<ReadCache>) -> CachedStore {
        CachedStore { inner, cache }
    }
}

impl Store for CachedStore {
    // Metadata, waits and syncs go straight to the store; reads and
    // commits, below, pass the cache.
    delegate_store!(inner: metadata, wait_for_room, would_not_wait, sync, flush, forgotten);

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.read_data(ino, offset, buf.len())?
            .copy_to(0, buf)
            .map_err(StoreError::Io)
    }

    /// The blocks of the range from the cache where it has them (each the
    /// buffer its file was read into, no copy), the others fetched from the
    /// store a run of consecutive blocks at a time and cached.
    fn read_data(&self, ino: u64, offset: u64, len: usize) -> Result<ReadData, StoreError> {
        let Some((first, last)) = blocks_of(offset, len as u64) else {
            return Ok(ReadData::new());
        };
        // The read and its last block must end within u64 to be cached.
        let whole_end = last.checked_add(1).and_then(|n| n.checked_mul(BLOCK_SIZE));
        let Some(end) = whole_end.and(offset.checked_add(len as u64)) else {
            return self.inner.read_data(ino, offset, len);
        };
        let metrics = &self.cache.metrics;
        let mut blocks: Vec<(u64, Option<Bytes>)> = Vec::with_capacity((last - first + 1) as usize);
        for b in first..=last {
            let got = self.cache.get(ino, b);
            if got.is_some() {
                metrics.read_cache_hits.inc();
                let (lo, hi) = (
                    (b * BLOCK_SIZE).max(offset),
                    ((b + 1) * BLOCK_SIZE).min(end),
                );
                metrics.read_cache_bytes_served.add(hi - lo);
            }
            blocks.push((b, got));
        }
        let missing = blocks.iter().filter(|(_, d)| d.is_none()).count();
        if missing > 0 {
            metrics.read_cache_misses.add(missing as u64);
            let ticket = self.cache.ticket(ino);
            // One fetch per run of consecutive missing blocks.
            let mut i = 0;
            while i < blocks.len() {
                if blocks[i].1.is_some() {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j + 1 < blocks.len() && blocks[j + 1].1.is_none() {
                    j += 1;
                }
                let (run_first, count) = (blocks[i].0, (j - i + 1) as u64);
                let mut fetched = vec![0u8; (count * BLOCK_SIZE) as usize];
                self.inner.read(ino, run_first * BLOCK_SIZE, &mut fetched)?;
                let fetched = Bytes::from(fetched);
                for (k, (b, data)) in blocks[i..=j].iter_mut().enumerate() {
                    let at = k * BLOCK_SIZE as usize;
                    let block = fetched.slice(at..at + BLOCK_SIZE as usize);
                    self.cache.fill(&ticket, *b, &block);
                    *data = Some(block);
                }
                i = j + 1;
            }
        }
        let mut out = ReadData::new();
        for (b, data) in blocks {
            let data = data.unwrap_or_default();
            let start = b * BLOCK_SIZE;
            let (from, to) = (
                (start.max(offset) - start) as usize,
                (((b + 1) * BLOCK_SIZE).min(end) - start) as usize,
            );
            // Past what the block holds it reads as zeros.
            let held = data.len().clamp(from, to);
            if held > from {
                out.push(ReadPiece::Bytes(data.slice(from..held)));
            }
            out.push(ReadPiece::Zeros(to - held));
        }
        Ok(out)
    }

    /// Every block of the range is in the cache (or the inner store is
    /// local itself).
    fn reads_locally(&self, ino: u64, offset: u64, len: u64) -> bool {
        let all_cached = blocks_of(offset, len).is_some_and(|(first, last)| {
            // A range longer than any read or read-ahead window is not
            // looked up block by block under the lock.
            if last - first >= LOCAL_CHECK_BLOCKS_MAX {
                return false;
            }
            let idx = self.cache.lock();
            (first..=last).all(|b| idx.entries.contains_key(&(ino, b)))
        });
        all_cached || self.inner.reads_locally(ino, offset, len)
    }

    /// A commit that bypasses the sink: its blocks leave the cache before
    /// and stay out (nothing is put back).
    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        let changes = data_changes(&txn);
        let inos = inos_of(&changes);
        let id = u64::MAX
            - self
                .cache
                .tmp_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.cache.prepare(id, &txn, &changes);
        let result = self.inner.commit(txn);
        if result.is_ok() || matches!(result, Err(StoreError::NoSpace)) {
            self.cache.settle(id, &inos);
        }
        result
    }

    fn describe(&self) -> String {
        format!("{} (read cache)", self.inner.describe())
    }
}

/// The sink, keeping the cache in step with what the store acknowledged.
pub struct CachedSink {
    inner: Arc<dyn Sink>,
    cache: Arc<ReadCache>,
}

impl CachedSink {
    pub fn new(inner: Arc<dyn Sink>, cache: Arc<ReadCache>) -> CachedSink {
        CachedSink { inner, cache }
    }
}

impl Sink for CachedSink {
    fn servers(&self) -> usize {
        self.inner.servers()
    }

    fn server_name(&self, server: usize) -> String {
        self.inner.server_name(server)
    }

    fn session(&self) -> u64 {
        self.inner.session()
    }

    fn send(&self, server: usize, txn_id: u64, low_water: u64, txn: Txn) -> SendFuture<'_> {
        let changes = data_changes(&txn);
        if changes.is_empty() {
            return self.inner.send(server, txn_id, low_water, txn);
        }
        Box::pin(async move {
            // File I/O (reads of partly written blocks, unlinks, writes)
            // runs off the sender's thread.
            let (cache, sent, ch) = (Arc::clone(&self.cache), txn.clone(), changes.clone());
            let bases = tokio::task::spawn_blocking(move || cache.prepare(txn_id, &sent, &ch))
                .await
                .map_err(|e| SendError::Retry(format!("read cache task failed: {e}")))?;
            let result = self
                .inner
                .send(server, txn_id, low_water, txn.clone())
                .await;
            let cache = Arc::clone(&self.cache);
            match &result {
                Ok(Ack {
                    duplicate: false, ..
                }) => {
                    let done = tokio::task::spawn_blocking(move || {
                        cache.complete(txn_id, &txn, &changes, bases)
                    })
                    .await;
                    // A failed task leaves the transaction unsettled: its
                    // inodes' reads are not cached, which is safe.
                    drop(done);
                }
                // Applied by an earlier attempt (whose ack put its data in,
                // or was lost), or not applied at all.
                Ok(_) | Err(SendError::NoSpace(_)) => cache.settle(txn_id, &inos_of(&changes)),
                // Maybe applied: the blocks stay out until a later attempt
                // settles it.
                Err(_) => {}
            }
            result
        })
    }
}
