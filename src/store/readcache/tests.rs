//! The read cache against a `mem:` volume behind a counter of the reads
//! that reach it (each one a round trip on a remote volume).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::store::delegate::delegate_store;
use crate::store::hooked::Hooked;
use crate::store::mem::MemStore;
use crate::store::sink::{EngineSink, SendError};
use crate::store::{Inode, Op, StoreError, Txn, WriteData};

const BS: usize = BLOCK_SIZE as usize;

/// A store that counts the reads that reach it.
type Counting = Hooked<MemStore>;

const INO: u64 = 100;

/// Bytes that differ at every offset (mod 251) and are never zero.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed | 1)
        .collect::<Vec<u8>>()
}

fn volume(key: &str, generation: u64, continuity: Continuity) -> VolumeIdentity {
    VolumeIdentity {
        key: key.into(),
        generation,
        continuity,
    }
}

fn open(dir: &Path, size_bytes: u64, id: &VolumeIdentity) -> (Arc<ReadCache>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let cfg = CacheConfig {
        dir: dir.to_owned(),
        size_bytes,
    };
    let cache = ReadCache::open(&cfg, id, Arc::clone(&metrics)).expect("open cache");
    (Arc::new(cache), metrics)
}

/// A `mem:` volume holding `data` as file `INO`, behind a read counter.
fn backing(data: &[u8]) -> Arc<Counting> {
    let mem = MemStore::new(1 << 30);
    let mut txn = Txn::new();
    txn.push(Op::Write {
        ino: INO,
        offset: 0,
        data: WriteData::from(data.to_vec()),
    });
    txn.push(Op::PutInode(Inode::regular(INO, data.len() as u64)));
    mem.commit(txn).expect("commit");
    Arc::new(Hooked::new(Arc::new(mem), "counting mem"))
}

fn read(store: &CachedStore, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    store.read(INO, offset, &mut buf).expect("read");
    buf
}

fn block_file(dir: &Path, block: u64) -> std::path::PathBuf {
    dir.join("blocks")
        .join(format!("{:02x}", stripe_of(INO)))
        .join(file::block_name(INO, block))
}

const BIG: u64 = 1 << 30;

#[test]
fn stays_within_its_bound_in_bytes_and_evicts_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let per_block = BLOCK_HEADER_BYTES + BLOCK_SIZE + ENTRY_OVERHEAD_BYTES;
    let (cache, metrics) = open(dir.path(), 3 * per_block, &volume("v", 1, Continuity::Same));
    let ticket = cache.ticket(INO);
    for b in 0..3 {
        cache.fill(&ticket, b, &pattern(BS, b as u8));
    }
    assert_eq!(cache.used_bytes(), 3 * per_block);
    // Block 0 is used again, so block 1 is the least recently used.
    assert!(cache.get(INO, 0).is_some());
    for b in 3..5 {
        cache.fill(&ticket, b, &pattern(BS, b as u8));
        assert!(cache.used_bytes() <= 3 * per_block);
    }
    assert_eq!(cache.blocks(), 3);
    assert_eq!(metrics.read_cache_evictions.get(), 2);
    assert!(cache.get(INO, 1).is_none() && cache.get(INO, 2).is_none());
    assert_eq!(cache.get(INO, 0).as_deref(), Some(&pattern(BS, 0)[..]));
    assert!(
        !block_file(dir.path(), 1).exists(),
        "evicted file left behind"
    );
    assert_eq!(metrics.read_cache_corrupt.get(), 0);
}

#[test]
fn a_second_read_makes_no_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 * BS + 100, 7);
    let inner = backing(&data);
    let (cache, metrics) = open(dir.path(), BIG, &volume("v", 1, Continuity::Same));
    let store = CachedStore::new(inner.clone(), cache);
    assert_eq!(read(&store, 10, data.len() - 10), data[10..]);
    let fetched = inner.reads.load(Ordering::Relaxed);
    assert_eq!(fetched, 1, "one run of missing blocks, one fetch");
    assert_eq!(read(&store, 0, data.len()), data);
    assert_eq!(read(&store, BLOCK_SIZE + 5, 7), data[BS + 5..BS + 12]);
    assert_eq!(inner.reads.load(Ordering::Relaxed), fetched);
    assert_eq!(metrics.read_cache_hits.get(), 5);
}

/// A cached block is kept up to its last non-zero byte: a read from the
/// cache gives the zeros after it as well, whatever the reader's buffer
/// held, across block boundaries and at the end of the file.
#[test]
fn cached_blocks_read_their_trailing_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = pattern(BS / 2, 5);
    data.resize(BS, 0);
    data.extend(pattern(BS + 300, 9));
    data.resize(2 * BS + 1000, 0);
    let inner = backing(&data);
    let (cache, metrics) = open(dir.path(), BIG, &volume("v", 1, Continuity::Same));
    let store = CachedStore::new(inner.clone(), cache);
    assert_eq!(read(&store, 0, data.len()), data);
    let fetched = inner.reads.load(Ordering::Relaxed);
    for (offset, len) in [
        (BS / 4, BS),
        (0, data.len()),
        (2 * BS + 100, 900),
        (BS - 1, 2),
    ] {
        let mut buf = vec![0xffu8; len];
        store.read(INO, offset as u64, &mut buf).unwrap();
        assert!(
            buf == data[offset..offset + len],
            "read of {len} at {offset}"
        );
        let pieces = store.read_data(INO, offset as u64, len).unwrap();
        assert_eq!(pieces.to_vec().unwrap(), data[offset..offset + len]);
    }
    assert_eq!(
        inner.reads.load(Ordering::Relaxed),
        fetched,
        "all from the cache"
    );
    assert_eq!(metrics.read_cache_corrupt.get(), 0);
}

/// Read once, damage the cached file with `damage`, read again: the
/// right bytes, fetched again, the damage counted.
fn detects(damage: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(BS, 3);
    let inner = backing(&data);
    let (cache, metrics) = open(dir.path(), BIG, &volume("v", 1, Continuity::Same));
    let store = CachedStore::new(inner.clone(), cache);
    assert_eq!(read(&store, 0, BS), data);
    damage(&block_file(dir.path(), 0));
    assert_eq!(read(&store, 0, BS), data);
    assert_eq!(metrics.read_cache_corrupt.get(), 1);
    assert_eq!(inner.reads.load(Ordering::Relaxed), 2, "refetched");
    // Cached again, intact.
    assert_eq!(read(&store, 0, BS), data);
    assert_eq!(inner.reads.load(Ordering::Relaxed), 2);
}

#[test]
fn a_flipped_byte_is_refetched_not_served() {
    detects(|path| {
        let mut bytes = std::fs::read(path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    });
}

#[test]
fn a_truncated_or_missing_file_is_refetched() {
    detects(|path| {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(BLOCK_HEADER_BYTES + 10).unwrap();
    });
    detects(|path| std::fs::remove_file(path).unwrap());
}

#[test]
fn a_cache_of_another_volume_is_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let a = volume("volume-a", 4, Continuity::Same);
    let (cache, _) = open(dir.path(), BIG, &a);
    cache.fill(&cache.ticket(INO), 0, &pattern(BS, 1));
    drop(cache);
    let (cache, _) = open(dir.path(), BIG, &volume("volume-b", 4, Continuity::Same));
    assert_eq!(cache.blocks(), 0);
    assert!(!block_file(dir.path(), 0).exists());
    drop(cache);
    // Volume a's blocks are gone for good: the header now names b.
    let (cache, _) = open(dir.path(), BIG, &a);
    assert_eq!(cache.blocks(), 0);
}

#[test]
fn another_epoch_empties_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = open(dir.path(), BIG, &volume("v", 4, Continuity::Same));
    cache.fill(&cache.ticket(INO), 0, &pattern(BS, 1));
    drop(cache);
    let (cache, _) = open(dir.path(), BIG, &volume("v", 5, Continuity::Same));
    assert_eq!(cache.blocks(), 0, "the server reopened the volume");
    cache.fill(&cache.ticket(INO), 0, &pattern(BS, 1));
    drop(cache);
    // The engine's open count: this daemon's open moves it by one...
    let (cache, _) = open(dir.path(), BIG, &volume("v", 6, Continuity::Next));
    assert_eq!(cache.blocks(), 1);
    drop(cache);
    // ...and another writer's open in between by more.
    let (cache, _) = open(dir.path(), BIG, &volume("v", 8, Continuity::Next));
    assert_eq!(cache.blocks(), 0, "another writer opened the volume");
}

#[test]
fn a_restart_keeps_the_cached_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 * BS, 9);
    let inner = backing(&data);
    let id = volume("v", 4, Continuity::Same);
    let (cache, _) = open(dir.path(), BIG, &id);
    let store = CachedStore::new(inner.clone(), cache);
    assert_eq!(read(&store, 0, data.len()), data);
    drop(store);
    let (cache, metrics) = open(dir.path(), BIG, &id);
    assert_eq!(cache.blocks(), 2);
    let store = CachedStore::new(inner.clone(), cache);
    assert_eq!(read(&store, 0, data.len()), data);
    assert_eq!(
        inner.reads.load(Ordering::Relaxed),
        1,
        "no fetch after restart"
    );
    assert_eq!(metrics.read_cache_hits.get(), 2);
}

fn sink_over(inner: &Arc<Counting>, cache: &Arc<ReadCache>) -> CachedSink {
    let engine = EngineSink::new(Arc::new(SharedMem(Arc::clone(inner)))).unwrap();
    CachedSink::new(Arc::new(engine), Arc::clone(cache))
}

/// The counted volume as a `OnceStore`, for the engine sink.
struct SharedMem(Arc<Counting>);

impl Store for SharedMem {
    delegate_store!(0: metadata, read, commit, sync);
    fn describe(&self) -> String {
        "shared mem".into()
    }
}

impl crate::store::OnceStore for SharedMem {
    fn commit_once(
        &self,
        session: u64,
        txn_id: u64,
        txn: Txn,
    ) -> Result<crate::store::CommitOutcome, StoreError> {
        self.0.inner.commit_once(session, txn_id, txn)
    }
    fn prune_applied(&self, session: u64, below: u64) -> Result<(), StoreError> {
        self.0.inner.prune_applied(session, below)
    }
    fn epoch(&self) -> u64 {
        1
    }
}

fn write_txn(offset: u64, data: &[u8], size: u64) -> Txn {
    let mut txn = Txn::new();
    txn.push(Op::Write {
        ino: INO,
        offset,
        data: WriteData::from(data.to_vec()),
    });
    txn.push(Op::PutInode(Inode::regular(INO, size)));
    txn
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn acknowledged_writes_are_read_back_without_a_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let inner = backing(&[]);
    let (cache, metrics) = open(dir.path(), BIG, &volume("v", 1, Continuity::Same));
    let sink = sink_over(&inner, &cache);
    let store = CachedStore::new(inner.clone(), Arc::clone(&cache));
    let rt = runtime();
    // A file of a block and a half, then appended to: the half block is
    // patched at the second ack.
    let first = pattern(BS + BS / 2, 5);
    let more = pattern(BS, 6);
    rt.block_on(sink.send(0, 1, 0, write_txn(0, &first, first.len() as u64)))
        .expect("ack");
    let end = (first.len() + more.len()) as u64;
    rt.block_on(sink.send(0, 2, 0, write_txn(first.len() as u64, &more, end)))
        .expect("ack");
    let mut want = first.clone();
    want.extend_from_slice(&more);
    assert_eq!(read(&store, 0, want.len()), want);
    assert_eq!(inner.reads.load(Ordering::Relaxed), 0, "no round trip");
    assert!(metrics.read_cache_bytes_stored.get() > 0);
}

/// A sink whose store never answers: the transaction stays unsettled.
struct Unreachable;

impl Sink for Unreachable {
    fn servers(&self) -> usize {
        1
    }
    fn server_name(&self, _: usize) -> String {
        "unreachable".into()
    }
    fn session(&self) -> u64 {
        1
    }
    fn send(&self, _: usize, _: u64, _: u64, _: Txn) -> crate::store::sink::SendFuture<'_> {
        Box::pin(async { Err(SendError::Retry("timed out".into())) })
    }
}

#[test]
fn a_block_of_an_unsettled_transaction_is_neither_served_nor_cached() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(BS, 2);
    let inner = backing(&data);
    let (cache, _) = open(dir.path(), BIG, &volume("v", 1, Continuity::Same));
    let store = CachedStore::new(inner.clone(), Arc::clone(&cache));
    assert_eq!(read(&store, 0, BS), data);
    assert_eq!(cache.blocks(), 1);
    let sink = CachedSink::new(Arc::new(Unreachable), Arc::clone(&cache));
    let sent = runtime().block_on(sink.send(0, 1, 0, write_txn(0, &pattern(BS, 8), BLOCK_SIZE)));
    assert!(sent.is_err());
    // The store may have applied it: the old copy is gone, on disk too,
    // and what a read fetches now is not kept.
    assert_eq!(cache.blocks(), 0);
    assert!(!block_file(dir.path(), 0).exists());
    read(&store, 0, BS);
    assert_eq!(cache.blocks(), 0);
}

#[test]
fn a_fill_that_raced_an_ack_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let inner = backing(&[]);
    let (cache, _) = open(dir.path(), BIG, &volume("v", 1, Continuity::Same));
    let ticket = cache.ticket(INO);
    let sink = sink_over(&inner, &cache);
    runtime()
        .block_on(sink.send(0, 1, 0, write_txn(0, &pattern(10, 1), 10)))
        .expect("ack");
    // What the read fetched before the ack is older than the ack's data.
    cache.fill(&ticket, 0, &[0u8; BS]);
    assert_eq!(
        cache.get(INO, 0).map(|b| b[..10].to_vec()),
        Some(pattern(10, 1))
    );
}

#[test]
fn a_truncate_or_removal_drops_what_it_cut() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 * BS, 4);
    let inner = backing(&data);
    let (cache, _) = open(dir.path(), BIG, &volume("v", 1, Continuity::Same));
    let store = CachedStore::new(inner.clone(), Arc::clone(&cache));
    let sink = sink_over(&inner, &cache);
    let rt = runtime();
    assert_eq!(read(&store, 0, 2 * BS), data);
    let mut txn = Txn::new();
    txn.push(Op::Truncate { ino: INO, size: 10 });
    txn.push(Op::PutInode(Inode::regular(INO, 10)));
    rt.block_on(sink.send(0, 1, 0, txn)).expect("ack");
    let mut want = data[..10].to_vec();
    want.resize(2 * BS, 0);
    assert_eq!(read(&store, 0, 2 * BS), want, "no byte past the truncate");
    let mut txn = Txn::new();
    txn.push(Op::RemoveInode { ino: INO });
    rt.block_on(sink.send(0, 2, 0, txn)).expect("ack");
    assert_eq!(cache.blocks(), 0);
}
