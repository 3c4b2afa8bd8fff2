//! Parallel read-ahead where every store read is a round trip: a
//! sequential reader gets the window after its read fetched by several
//! store reads at once (held at a latch here, so the test sees them all
//! outstanding together), within the bound; a guest read of pages a chunk
//! is fetching waits for it rather than asking the store again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::ahead::{AHEAD_CHUNKS_MAX, AHEAD_CHUNK_PAGES, AHEAD_WINDOW_MIN_BYTES};
use super::cache::PAGE_SIZE;
use super::testkit::{cfg, eventually, write, FaultSink};
use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::store::mem::MemStore;
use crate::store::{Dirent, Inode, Op, Store, StoreError, StoreStats, Txn};

/// Reads of a store; those at or past `held_from` wait at a latch until
/// the test opens it, counted while they wait: before they read, or with
/// `read_first` after.
struct Latched {
    store: Arc<MemStore>,
    held_from: u64,
    read_first: bool,
    open: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicU64,
    held_reads: AtomicU64,
}

impl Store for Latched {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.store.get_inode(ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        self.store.lookup(parent, name)
    }
    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        self.store.readdir(parent, after, max)
    }
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        if self.read_first {
            self.store.read(ino, offset, buf)?;
        }
        if offset >= self.held_from {
            self.held_reads.fetch_add(1, Ordering::SeqCst);
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if self.read_first {
            return Ok(());
        }
        self.store.read(ino, offset, buf)
    }
    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        self.store.next_data(ino, offset)
    }
    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.store.next_hole(ino, offset)
    }
    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.readlink(ino)
    }
    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get_xattr(ino, name)
    }
    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.store.list_xattr(ino)
    }
    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.store.statfs()
    }
    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        self.store.reserve_ids(count)
    }
    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.store.commit(txn)
    }
    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.store.sync(ino)
    }
    fn describe(&self) -> String {
        "mem: with latched reads".into()
    }
}

fn read(s: &dyn Store, ino: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    s.read(ino, offset, &mut buf).unwrap();
    buf
}

#[test]
fn a_sequential_reader_keeps_several_chunks_in_flight() {
    const IO: u64 = 128 << 10;
    let (ino, size) = (20, 16u64 << 20);
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let store = Arc::new(MemStore::new(1 << 30));
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, size)));
    t.push(Op::Write {
        ino,
        offset: 0,
        data: data.clone().into(),
    });
    store.commit(t).unwrap();
    let reads = Arc::new(Latched {
        store: Arc::clone(&store),
        held_from: 2 * IO,
        read_first: false,
        open: Mutex::new(false),
        opened: Condvar::new(),
        waiting: AtomicU64::new(0),
        held_reads: AtomicU64::new(0),
    });
    let sink = Arc::new(FaultSink::new(Arc::clone(&store), 1, 80));
    let config = TxnConfig {
        // Where every read is a round trip: clean pages are kept.
        forget_clean_pages: false,
        cache_bytes: 64 << 20,
        ..cfg(OverwritePolicy::Cow)
    };
    let wb = Arc::new(WritebackStore::new(config, reads.clone(), sink, Arc::default()).unwrap());
    wb.get_inode(ino).unwrap();
    // Two reads: the second is sequential, and the window after it goes
    // to the store at once, in chunks.
    assert_eq!(read(&*wb, ino, 0, IO as usize), data[..IO as usize]);
    assert_eq!(
        read(&*wb, ino, IO, IO as usize),
        data[IO as usize..2 * IO as usize]
    );
    let chunks = (AHEAD_WINDOW_MIN_BYTES / PAGE_SIZE).div_ceil(AHEAD_CHUNK_PAGES);
    assert!(chunks >= 2 && chunks as usize <= AHEAD_CHUNKS_MAX);
    eventually("every chunk of the window outstanding at once", || {
        reads.waiting.load(Ordering::SeqCst) == chunks
    });
    // The next guest read waits for the chunk that fetches its pages.
    let next = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || read(&*wb, ino, 2 * IO, IO as usize))
    };
    eventually("the read to wait for its chunk, counted", || {
        wb.shared.metrics.read_ahead_waits.get() >= 1
    });
    *reads.open.lock().unwrap() = true;
    reads.opened.notify_all();
    assert_eq!(next.join().unwrap(), data[2 * IO as usize..3 * IO as usize]);
    assert!(wb.shared.metrics.read_ahead_wait_us.get() > 0);
    // The reader goes on through the window and beyond; every byte right.
    let mut at = 3 * IO;
    while at < 8 << 20 {
        assert_eq!(
            read(&*wb, ino, at, IO as usize),
            data[at as usize..(at + IO) as usize],
            "at {at}"
        );
        at += IO;
    }
    let fetched = reads.held_reads.load(Ordering::SeqCst);
    assert!(
        fetched <= (8 << 20) / (AHEAD_CHUNK_PAGES * PAGE_SIZE) + chunks,
        "pages asked for twice: {fetched} store reads"
    );
    // The chunks reused the read-ahead threads: never more than the bound,
    // fewer than the chunks, and none left once idle.
    let (_, started) = wb.shared.ahead_workers.threads();
    assert!(fetched > AHEAD_CHUNKS_MAX as u64, "{fetched} chunks");
    assert!(
        started as usize <= AHEAD_CHUNKS_MAX,
        "{started} threads for {fetched} chunks"
    );
    eventually("the idle read-ahead threads ended", || {
        wb.shared.ahead_workers.threads().0 == 0
    });
}

/// A store read that an ack of the inode's pages overtook may hold bytes
/// older than the acknowledged write: they are not kept, so a later read
/// (the page gone from the cache) finds the new ones.
#[test]
fn a_store_read_overtaken_by_an_ack_is_not_kept() {
    let (ino, size) = (20, 16 * PAGE_SIZE);
    let store = Arc::new(MemStore::new(1 << 30));
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, size)));
    t.push(Op::Write {
        ino,
        offset: 0,
        data: vec![1u8; size as usize].into(),
    });
    store.commit(t).unwrap();
    let reads = Arc::new(Latched {
        store: Arc::clone(&store),
        held_from: 0,
        read_first: true,
        open: Mutex::new(false),
        opened: Condvar::new(),
        waiting: AtomicU64::new(0),
        held_reads: AtomicU64::new(0),
    });
    let sink = Arc::new(FaultSink::new(Arc::clone(&store), 1, 81));
    let wb = Arc::new(
        WritebackStore::new(
            cfg(OverwritePolicy::Cow),
            reads.clone(),
            sink,
            Arc::default(),
        )
        .unwrap(),
    );
    wb.get_inode(ino).unwrap();
    // A read has the old bytes from the store and is held before it keeps
    // them; meanwhile a write of the page is acknowledged and the guest
    // forgets the inode (its clean pages go).
    let old = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || read(&*wb, ino, 0, PAGE_SIZE as usize))
    };
    eventually("the read held after reading the store", || {
        reads.waiting.load(Ordering::SeqCst) == 1
    });
    write(&*wb, ino, 0, &[2u8; PAGE_SIZE as usize], size);
    wb.sync(None).unwrap();
    wb.forgotten(ino);
    *reads.open.lock().unwrap() = true;
    reads.opened.notify_all();
    let first = old.join().unwrap();
    assert!(first == vec![1; PAGE_SIZE as usize] || first == vec![2; PAGE_SIZE as usize]);
    assert_eq!(
        read(&*wb, ino, 0, PAGE_SIZE as usize),
        vec![2; PAGE_SIZE as usize]
    );
}
