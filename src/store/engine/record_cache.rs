//! Recently read and written records of the kinds every commit or READ
//! looks up, in memory: chunk records, inode records and segment records.
//!
//! Every READ of a `file://` volume looks up the chunk record of each
//! 64 KiB chunk it touches (`read_plan.rs`), and every commit that writes a
//! chunk reads its record first (`apply.rs`), as it reads the record of the
//! inode it changes and of each segment whose live bytes move (a put reads
//! the value it replaces, for the space counters). Through the engine that
//! is a walk of the memtables, the L0 tables' filters and the sorted runs,
//! with a block cache lookup at each: measured, 20 µs of a cold 4 KiB
//! READ's 30 µs of service, and a third of the commit thread's time over
//! 4 KiB appends with an fsync each. This cache answers those lookups with
//! one hash probe.
//!
//! **Coherence.** The cache holds what the engine holds. Every batch that
//! writes records of these kinds goes through [`RecordCache::written`]
//! right after the engine took it, in the engine's write order (under the
//! commit lock or the commit log's, see `SlateStore::write_puts`), which
//! replaces the cached records it names. A reader that missed fills the
//! cache with what it read from the engine only if no batch touched the
//! record's shard since before its read ([`RecordCache::stamp`]): a record
//! read before a batch and offered after it is dropped, never kept.
//!
//! **Bounds.** The cache holds at most its bytes (values copied out of the
//! engine's blocks, plus a fixed cost per entry), split over shards; a
//! shard past its share evicts with the CLOCK policy (an entry read since
//! the hand last passed gets a second chance).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use slatedb::{Db, WriteHandle};

use super::apply::{to_batch, Puts};
use super::{keys, SlateStore};
use crate::store::StoreError;

/// Shards: readers of different chunks rarely meet on one lock.
const SHARDS: usize = 16;

/// What an entry costs beyond its value: its key, its place in the map and
/// in the CLOCK queue.
const ENTRY_OVERHEAD: usize = 96;

/// A record: its value in the engine, `None` for no record.
type Record = Option<Bytes>;

/// Which record an entry holds: the key's type and the one or two numbers
/// after it (the second is 0 for keys with one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot {
    tag: u8,
    a: u64,
    b: u64,
}

impl Slot {
    /// The record of chunk `index` of `ino`.
    pub fn chunk(ino: u64, index: u64) -> Slot {
        Slot {
            tag: keys::tag::BLOCK,
            a: ino,
            b: index,
        }
    }

    /// The slot of `key` when the cache keeps records of its kind.
    pub fn of(key: &[u8]) -> Option<Slot> {
        let (&tag, rest) = key.split_first()?;
        let num = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
        match tag {
            keys::tag::BLOCK if rest.len() == 16 => Some(Slot {
                tag,
                a: num(&rest[..8])?,
                b: num(&rest[8..])?,
            }),
            keys::tag::INODE | keys::tag::SEGMENT if rest.len() == 8 => Some(Slot {
                tag,
                a: num(rest)?,
                b: 0,
            }),
            _ => None,
        }
    }
}

struct Entry {
    record: Record,
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    /// Bumped by every batch that writes a record of this shard.
    generation: u64,
    map: KeyMap,
    /// Keys in insertion order, for the CLOCK hand; may hold keys since
    /// removed from `map` (skipped), at most twice the map's length.
    clock: VecDeque<Slot>,
    bytes: usize,
}

/// The bytes an entry of `record` counts.
fn cost(record: &Record) -> usize {
    ENTRY_OVERHEAD + record.as_ref().map_or(0, Bytes::len)
}

impl Shard {
    fn remove(&mut self, key: Slot) {
        if let Some(e) = self.map.remove(&key) {
            self.bytes -= cost(&e.record);
        }
    }

    fn insert(&mut self, key: Slot, record: Record, max_bytes: usize) {
        let c = cost(&record);
        match self.map.get_mut(&key) {
            // In place: the key keeps its place under the hand.
            Some(e) => {
                let old = std::mem::replace(&mut e.record, record);
                self.bytes = self.bytes - cost(&old) + c;
            }
            None => {
                self.bytes += c;
                self.map.insert(
                    key,
                    Entry {
                        record,
                        referenced: false,
                    },
                );
                self.clock.push_back(key);
            }
        }
        while self.bytes > max_bytes {
            let Some(k) = self.clock.pop_front() else {
                break;
            };
            match self.map.get_mut(&k) {
                Some(e) if e.referenced => {
                    e.referenced = false;
                    self.clock.push_back(k);
                }
                Some(_) => self.remove(k),
                None => {}
            }
        }
        // Keys removed (or removed and inserted again) leave places behind:
        // once they outnumber the entries, the queue is rebuilt, amortized
        // over as many inserts.
        if self.clock.len() > 2 * self.map.len() + 64 {
            self.clock = self.map.keys().copied().collect();
        }
    }
}

/// A hasher for [`Slot`]s: a multiply-and-mix of a tag and two integers
/// the guest does not choose freely (inode numbers are the daemon's),
/// instead of SipHash, which costs more than the lookup it guards.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type KeyMap = HashMap<Slot, Entry, std::hash::BuildHasherDefault<KeyHasher>>;

/// See the module documentation.
pub struct RecordCache {
    shards: Vec<Mutex<Shard>>,
    shard_bytes: usize,
}

/// A shard's generation, taken before an engine read (see
/// [`RecordCache::stamp`]).
#[derive(Clone, Copy)]
pub struct Stamp(u64);

fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RecordCache {
    /// A cache of at most `max_bytes`.
    pub fn new(max_bytes: u64) -> RecordCache {
        RecordCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_bytes: usize::try_from(max_bytes / SHARDS as u64).unwrap_or(usize::MAX),
        }
    }

    fn shard(&self, key: Slot) -> &Mutex<Shard> {
        // Neighbouring chunks of one file spread over the shards.
        let h = key
            .a
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(key.b)
            .wrapping_add(u64::from(key.tag));
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// The cached record of `key`: `Some(None)` when the engine has none,
    /// `None` when the cache does not know.
    pub fn get(&self, key: Slot) -> Option<Record> {
        let mut s = lock(self.shard(key));
        let e = s.map.get_mut(&key)?;
        e.referenced = true;
        Some(e.record.clone())
    }

    /// Take before reading the record of `key` from the engine, and hand
    /// to [`RecordCache::offer`] with what was read.
    pub fn stamp(&self, key: Slot) -> Stamp {
        Stamp(lock(self.shard(key)).generation)
    }

    /// Keep `record`, read from the engine after `stamp` was taken, unless
    /// a batch wrote to the shard since (the record may predate it).
    pub fn offer(&self, key: Slot, stamp: Stamp, record: Record) {
        let mut s = lock(self.shard(key));
        if s.generation == stamp.0 {
            // A copy: the engine's value may be a slice of a whole block.
            let record = record.map(|b| Bytes::copy_from_slice(&b));
            s.insert(key, record, self.shard_bytes);
        }
    }

    /// Hand `puts` to the engine `db` and the records it caches to this
    /// cache. Callers keep the engine's write order (they hold the commit
    /// lock or lead the commit log's group), which the cache follows.
    pub async fn write_through(&self, db: &Db, puts: &Puts) -> Result<WriteHandle, slatedb::Error> {
        match db.write(to_batch(puts)).await {
            Ok(handle) => {
                self.written(puts);
                Ok(handle)
            }
            Err(e) => {
                self.forget(puts);
                Err(e)
            }
        }
    }

    /// The engine has just taken `puts`: the records they name replace the
    /// cached ones (and stale every read in progress on their shards).
    pub fn written(&self, puts: &Puts) {
        for (key, value) in puts {
            let Some(slot) = Slot::of(key) else {
                continue;
            };
            let mut s = lock(self.shard(slot));
            s.generation += 1;
            match value {
                Some(v) => {
                    let v = Bytes::copy_from_slice(v);
                    s.insert(slot, Some(v), self.shard_bytes);
                }
                // No negative entry for a deleted record (mostly removed
                // files): a read that misses finds no record and may offer
                // one.
                None => s.remove(slot),
            }
        }
    }

    /// The engine may or may not have taken `puts` (its write failed):
    /// the records they name are forgotten, and reads in progress on their
    /// shards not kept.
    pub fn forget(&self, puts: &Puts) {
        for (key, _) in puts {
            if let Some(slot) = Slot::of(key) {
                let mut s = lock(self.shard(slot));
                s.generation += 1;
                s.remove(slot);
            }
        }
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(s).bytes).sum()
    }
}

impl SlateStore {
    /// Hand `puts` to the engine and the records it caches to the record
    /// cache, which follows the engine's write order: callers hold the
    /// commit lock or lead the commit log's group.
    pub(super) async fn write_puts(&self, puts: &Puts) -> Result<WriteHandle, slatedb::Error> {
        self.records.write_through(&self.db, puts).await
    }

    /// The record of chunk `index` of `ino` as far as memory knows it: a
    /// group durable in the commit log and not yet in the engine decides
    /// first (the engine write that ends that also refreshes the cache),
    /// then the record cache. `None`: ask the engine.
    pub(super) fn known_record(&self, ino: u64, index: u64) -> Option<Option<bytes::Bytes>> {
        if let Some(record) = self.log_queue.unapplied_at(|| keys::block(ino, index)) {
            return Some(record);
        }
        self.records.get(Slot::chunk(ino, index))
    }

    /// The record of chunk `index` of `ino`: from a group durable in the
    /// commit log and not yet in the engine (whose write refreshes the
    /// cache), else the record cache or the engine (which then fills the
    /// cache).
    pub(super) async fn chunk_record(
        &self,
        ino: u64,
        index: u64,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        if let Some(record) = self.known_record(ino, index) {
            return Ok(record);
        }
        let slot = Slot::chunk(ino, index);
        let stamp = self.records.stamp(slot);
        let record = self.get(keys::block(ino, index)).await?;
        self.records.offer(slot, stamp, record.clone());
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{RecordCache, Slot, ENTRY_OVERHEAD, SHARDS};
    use crate::store::engine::keys;

    fn put(ino: u64, index: u64, v: &[u8]) -> (Vec<u8>, Option<Bytes>) {
        (keys::block(ino, index), Some(Bytes::copy_from_slice(v)))
    }

    #[test]
    fn a_batch_replaces_what_it_writes_and_nothing_else() {
        let c = RecordCache::new(1 << 20);
        let s = c.stamp(Slot::chunk(1, 0));
        c.offer(Slot::chunk(1, 0), s, Some(Bytes::from_static(b"old")));
        let s = c.stamp(Slot::chunk(2, 0));
        c.offer(Slot::chunk(2, 0), s, None);
        assert_eq!(
            c.get(Slot::chunk(1, 0)),
            Some(Some(Bytes::from_static(b"old")))
        );
        assert_eq!(c.get(Slot::chunk(2, 0)), Some(None));
        assert_eq!(c.get(Slot::chunk(3, 0)), None);
        c.written(&vec![
            put(1, 0, b"new"),
            (keys::block(2, 0), None),
            (keys::inode(1), Some(Bytes::from_static(b"an inode"))),
            (keys::segment(1), Some(Bytes::from_static(b"a segment"))),
            (keys::applied(1, 0), Some(Bytes::new())),
            (
                keys::dirent_by_cookie(1, 0),
                Some(Bytes::from_static(b"entry")),
            ),
        ]);
        assert_eq!(
            c.get(Slot::chunk(1, 0)),
            Some(Some(Bytes::from_static(b"new")))
        );
        // A dropped record is forgotten, not cached as absent.
        assert_eq!(c.get(Slot::chunk(2, 0)), None);
        // Inode and segment records are kept apart from chunks of the same
        // numbers; other kinds are not kept.
        let inode = Slot::of(&keys::inode(1)).expect("inode records are cached");
        let segment = Slot::of(&keys::segment(1)).expect("segment records are cached");
        assert_eq!(c.get(inode), Some(Some(Bytes::from_static(b"an inode"))));
        assert_eq!(c.get(segment), Some(Some(Bytes::from_static(b"a segment"))));
        assert_eq!(Slot::of(&keys::applied(1, 0)), None);
        assert_eq!(Slot::of(&keys::dirent_by_cookie(1, 0)), None);
        assert_eq!(Slot::of(&keys::block(1, 0)), Some(Slot::chunk(1, 0)));
        // A malformed key is no slot.
        assert_eq!(Slot::of(&keys::block(1, 0)[..9]), None);
        c.forget(&vec![(keys::inode(1), None)]);
        assert_eq!(c.get(inode), None);
        assert_eq!(c.get(segment), Some(Some(Bytes::from_static(b"a segment"))));
    }

    #[test]
    fn a_record_read_before_a_batch_is_not_kept() {
        let c = RecordCache::new(1 << 20);
        // A reader takes its stamp and reads the old record from the
        // engine; a batch writes the chunk before the reader offers it.
        let s = c.stamp(Slot::chunk(7, 3));
        c.written(&vec![put(7, 3, b"newer")]);
        c.offer(Slot::chunk(7, 3), s, Some(Bytes::from_static(b"older")));
        assert_eq!(
            c.get(Slot::chunk(7, 3)),
            Some(Some(Bytes::from_static(b"newer")))
        );
        // Even when the batch's entry was evicted meanwhile.
        let c = RecordCache::new(1 << 20);
        let s = c.stamp(Slot::chunk(7, 3));
        c.written(&vec![put(7, 3, b"newer")]);
        lock_clear(&c);
        c.offer(Slot::chunk(7, 3), s, Some(Bytes::from_static(b"older")));
        assert_eq!(c.get(Slot::chunk(7, 3)), None);
    }

    fn lock_clear(c: &RecordCache) {
        for s in &c.shards {
            let mut s = super::lock(s);
            s.map.clear();
            s.bytes = 0;
        }
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_keeps_what_is_read() {
        let per_entry = ENTRY_OVERHEAD + 100;
        let max = (SHARDS * per_entry * 8) as u64;
        let c = RecordCache::new(max);
        let value = vec![7u8; 100];
        // The hot chunk is read between inserts; it survives the sweep.
        for i in 0..10_000u64 {
            let s = c.stamp(Slot::chunk(1, i));
            c.offer(Slot::chunk(1, i), s, Some(Bytes::copy_from_slice(&value)));
            assert!(c.get(Slot::chunk(9, 9)).is_some() || i == 0);
            if i == 0 {
                let s = c.stamp(Slot::chunk(9, 9));
                c.offer(Slot::chunk(9, 9), s, Some(Bytes::copy_from_slice(&value)));
            }
            assert!(c.bytes() as u64 <= max, "{} > {max}", c.bytes());
        }
        assert!(c.bytes() as u64 > max / 2);
        for s in &c.shards {
            let s = super::lock(s);
            assert!(s.clock.len() <= 2 * s.map.len() + 64);
        }
    }
}
