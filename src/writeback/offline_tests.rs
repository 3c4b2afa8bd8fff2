//! The guest does not wait for the network: with the store unreachable
//! (every read refused, every ack held at the sink's latch), lookups of
//! names the daemon saw, writes through a handle opened before — to part of a page the daemon never
//! read, a whole page, an append to a page the store holds in part — and
//! the create of a file in a directory of this session all return, with no
//! store read; a sync waits. Once the store is back, a read merges the
//! partial pages over the store's bytes, and the acks bring the store the
//! written ranges only, around which it keeps its own bytes.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::cache::{PageCache, PAGE_SIZE};
use super::testkit::{cfg, content, eventually, FaultSink, GuestBytes};
use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::fs::{FsConfig, PohmelFs};
use crate::store::mem::MemStore;
use crate::store::{Dirent, FileKind, Inode, Op, Store, StoreError, StoreStats, Txn, ROOT_INO};

const PAGE: usize = PAGE_SIZE as usize;

/// The layer's reads from a store that, while `offline`, refuses every
/// read and counts it: a read the write path makes fails the write.
struct Unreachable {
    store: Arc<MemStore>,
    offline: AtomicBool,
    refused: AtomicU64,
}

impl Unreachable {
    fn reach(&self) -> Result<(), StoreError> {
        if self.offline.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Io(std::io::Error::other("store unreachable")));
        }
        Ok(())
    }
}

impl Store for Unreachable {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.reach()?;
        self.store.get_inode(ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        self.reach()?;
        self.store.lookup(parent, name)
    }
    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        self.reach()?;
        self.store.readdir(parent, after, max)
    }
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.reach()?;
        self.store.read(ino, offset, buf)
    }
    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        self.reach()?;
        self.store.next_data(ino, offset)
    }
    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.reach()?;
        self.store.next_hole(ino, offset)
    }
    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.reach()?;
        self.store.readlink(ino)
    }
    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.reach()?;
        self.store.get_xattr(ino, name)
    }
    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.reach()?;
        self.store.list_xattr(ino)
    }
    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.reach()?;
        self.store.statfs()
    }
    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        self.reach()?;
        self.store.reserve_ids(count)
    }
    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.reach()?;
        self.store.commit(txn)
    }
    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.store.sync(ino)
    }
    fn describe(&self) -> String {
        "mem: that can be unreachable".into()
    }
}

/// The bytes of the file the store holds before the test: 3 pages and
/// 1000 bytes.
fn old_bytes() -> Vec<u8> {
    (0..3 * PAGE + 1000).map(|i| (i % 251) as u8).collect()
}

/// Fails naming the first byte where `got` and `want` differ.
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    let first = got.iter().zip(want).position(|(g, w)| g != w);
    assert!(
        first.is_none() && got.len() == want.len(),
        "{what}: {} bytes, {} wanted; first difference at {first:?}",
        got.len(),
        want.len()
    );
}

fn write(fs: &PohmelFs, ino: u64, h: u64, offset: u64, data: &[u8]) {
    let mut r = GuestBytes::new(data.to_vec());
    let n = fs
        .write(
            &Context::new(),
            ino,
            h,
            &mut r,
            data.len() as u32,
            offset,
            None,
            false,
            0,
            0,
        )
        .unwrap();
    assert_eq!(n, data.len());
}

#[test]
fn writes_return_without_the_store_and_only_sync_waits() {
    let (ino, size) = (20, old_bytes().len() as u64);
    let store = Arc::new(MemStore::new(1 << 30));
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, size)));
    t.push(Op::PutDirent {
        parent: ROOT_INO,
        dirent: Dirent {
            name: b"f".to_vec(),
            ino,
            kind: FileKind::Regular,
            cookie: ino,
        },
    });
    t.push(Op::Write {
        ino,
        offset: 0,
        data: old_bytes().into(),
    });
    store.commit(t).unwrap();
    let reads = Arc::new(Unreachable {
        store: Arc::clone(&store),
        offline: AtomicBool::new(false),
        refused: AtomicU64::new(0),
    });
    let sink = Arc::new(FaultSink::new(Arc::clone(&store), 1, 70));
    let config = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let wb =
        Arc::new(WritebackStore::new(config, reads.clone(), sink.clone(), Arc::default()).unwrap());
    let fs = PohmelFs::new(wb.clone(), FsConfig::default(), Arc::default()).unwrap();
    let ctx = Context::new();
    // Before the store goes away: the guest looks the file up and opens
    // it, and makes a directory.
    let name = CString::new("f").unwrap();
    assert_eq!(fs.lookup(&ctx, ROOT_INO, &name).unwrap().inode, ino);
    let (h, _, _) = fs.open(&ctx, ino, libc::O_RDWR as u32, 0).unwrap();
    let h = h.unwrap();
    let dir = fs
        .mkdir(&ctx, ROOT_INO, &CString::new("d").unwrap(), 0o755, 0)
        .unwrap()
        .inode;

    // Everything so far acknowledged: nothing is left in the overlay.
    wb.sync(None).unwrap();

    sink.gate.close();
    reads.offline.store(true, Ordering::SeqCst);
    // The guest revalidates the names it looked up and made.
    assert_eq!(fs.lookup(&ctx, ROOT_INO, &name).unwrap().inode, ino);
    let d = CString::new("d").unwrap();
    assert_eq!(fs.lookup(&ctx, ROOT_INO, &d).unwrap().inode, dir);
    let mut model = old_bytes();
    // Part of page 1, which the daemon never read.
    write(&fs, ino, h, 5000, &[0xaa; 100]);
    model[5000..5100].fill(0xaa);
    // All of page 2.
    write(&fs, ino, h, 2 * PAGE_SIZE, &[0xbb; PAGE]);
    model[2 * PAGE..3 * PAGE].fill(0xbb);
    // An append to page 3, which the store holds in part.
    write(&fs, ino, h, size, &[0xcc; 500]);
    model.extend([0xcc; 500]);
    // A new file in the directory of this session.
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, nh, _, _) = fs
        .create(&ctx, dir, &CString::new("new").unwrap(), args)
        .unwrap();
    write(&fs, e.inode, nh.unwrap(), 0, b"hello");
    assert_eq!(reads.refused.load(Ordering::SeqCst), 0, "a store read");

    // A sync waits for the acks the latch holds.
    let syncing = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || wb.sync(None))
    };
    eventually("a send held at the latch", || sink.gate.held() >= 1);
    assert!(!syncing.is_finished(), "sync returned without an ack");

    // The store is back: a read merges the partial pages over its bytes,
    // before any ack.
    reads.offline.store(false, Ordering::SeqCst);
    assert_bytes(&content(&*wb, ino), &model, "read before the acks");
    sink.gate.open();
    syncing.join().unwrap().unwrap();
    assert_bytes(&content(&*store, ino), &model, "the store after the acks");
    assert_eq!(content(&*store, e.inode), b"hello");
}

#[test]
fn partial_pages_hold_the_bytes_written_until_merged() {
    let mut c = PageCache::new(1 << 20);
    assert!(c.write_over_store(1, 0, 10, b"abc", 7));
    assert!(c.is_partial(1, 0));
    assert!(c.page(1, 0).is_none(), "no answer to a read alone");
    c.write_over_store(1, 0, 20, b"de", 7);
    let pinned = c.pin(&[(1, [0].into())].into(), 7);
    let known = pinned[0].3.as_ref().unwrap();
    assert_eq!(known.ranges().collect::<Vec<_>>(), [10..13, 20..22]);
    // A read merges the store's bytes in: whole from then on, and the
    // pinned buffer keeps what was sent.
    c.insert_clean(1, 0, Bytes::from(vec![1u8; PAGE]));
    assert!(!c.is_partial(1, 0));
    let page = c.page(1, 0).unwrap();
    assert_eq!(&page[8..14], &[1, 1, b'a', b'b', b'c', 1]);
    assert_eq!(&page[20..23], b"de\x01");
    assert!(c.untag(1, 0, 7));
    assert!(c.contains(1, 0), "a whole page stays, clean");
    // Clean, a partial page stays partial; a whole-page write, or writes
    // that cover it, make it whole.
    let acks = c.acks_of(1);
    c.write_over_store(1, 1, 0, b"x", 8);
    assert!(c.untag(1, 1, 8));
    assert!(c.is_partial(1, 1) && c.page(1, 1).is_none());
    assert!(c.acks_of(1) > acks, "acks are counted");
    c.write_over_store(1, 2, 0, &[2; PAGE / 2], 9);
    c.write_over_store(1, 2, PAGE / 2, &[3; PAGE / 2], 9);
    assert!(!c.is_partial(1, 2));
    c.write_over_store(1, 3, 5, b"y", 9);
    c.adopt(1, 3, Bytes::from(vec![4u8; PAGE]), 9);
    assert!(!c.is_partial(1, 3));
    // A truncate's zeros are known bytes too.
    c.write_over_store(1, 4, 0, &[5; 100], 9);
    c.truncate(1, 4 * PAGE_SIZE + 100);
    assert!(!c.is_partial(1, 4));
}

/// Data in flight counts against `dirty_max_bytes` until its ack, and so
/// do the copies a write makes of its pinned pages (`cow`): with acks held
/// at the latch, a write past the bound waits, and goes on at the ack.
#[test]
fn in_flight_pages_and_their_copies_count_toward_dirty_max() {
    let (wb, sink, store, m) = super::testkit::held_layer(OverwritePolicy::Cow, 71);
    let wb = Arc::new(wb);
    let dirty_max = cfg(OverwritePolicy::Cow).dirty_max_bytes;
    // A quarter of the bound: as much as may be in flight at once.
    let sent = dirty_max / 4;
    super::testkit::create(&*wb, 20);
    super::testkit::create(&*wb, 21);
    wb.sync(None).unwrap();
    sink.gate.close();
    super::testkit::write(&*wb, 20, 0, &vec![1; sent as usize], sent);
    eventually("every transaction of the write in flight", || {
        m.levels.in_flight_txns.get() > 0 && wb.unacked() == m.levels.in_flight_txns.get() as usize
    });
    // The same bytes again: new buffers, the pinned ones stay in flight.
    super::testkit::write(&*wb, 20, 0, &vec![2; sent as usize], sent);
    assert_eq!(m.overwrite_copies.get(), sent / PAGE_SIZE);
    assert_eq!(m.levels.dirty_bytes.get(), 2 * sent, "both copies count");
    // Fill the bound exactly; one page more waits for an ack.
    let rest = dirty_max - 2 * sent;
    super::testkit::write(&*wb, 21, 0, &vec![3; rest as usize], rest);
    assert_eq!(m.backpressure_waits.get(), 0);
    let over = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || {
            super::testkit::write(&*wb, 21, rest, &[4; PAGE], rest + PAGE_SIZE)
        })
    };
    eventually("the write past the bound to wait", || {
        m.backpressure_waits.get() >= 1
    });
    assert!(!over.is_finished(), "a write went past --dirty-max");
    sink.gate.open();
    over.join().unwrap();
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), vec![2; sent as usize]);
    assert_eq!(m.levels.dirty_bytes.get(), 0);
}

/// The commit latency histogram counts acknowledged attempts only: none
/// while the acks are held at the latch, one per transaction after.
#[test]
fn commit_latency_counts_each_acknowledged_transaction() {
    let (wb, sink, _store, m) = super::testkit::held_layer(OverwritePolicy::Wait, 72);
    super::testkit::create(&wb, 30);
    wb.sync(None).unwrap();
    let before = m.levels.commit_latency.count();
    assert!(before >= 1, "the create's commit was not timed");
    sink.gate.close();
    super::testkit::write(&wb, 30, 0, &[7; PAGE], PAGE_SIZE);
    eventually("the write in flight", || m.levels.in_flight_txns.get() > 0);
    assert_eq!(
        m.levels.commit_latency.count(),
        before,
        "timed before its ack"
    );
    assert_eq!(
        m.levels.in_flight_bytes.get(),
        PAGE_SIZE,
        "its page in flight"
    );
    sink.gate.open();
    wb.sync(None).unwrap();
    assert!(m.levels.commit_latency.count() > before);
    assert_eq!(m.levels.in_flight_bytes.get(), 0);
}

/// A read the page cache cannot answer is timed as a store read; one it
/// answers is not.
#[test]
fn store_reads_are_timed_and_cache_hits_are_not() {
    let (wb, _sink, store, m) = super::testkit::held_layer(OverwritePolicy::Wait, 73);
    // Written behind the layer's back: only the store has it.
    super::testkit::write(&*store, 31, 0, &[9; PAGE], PAGE_SIZE);
    assert_eq!(m.levels.store_read_latency.count(), 0);
    assert_eq!(super::testkit::content(&wb, 31), vec![9; PAGE]);
    let asked = m.levels.store_read_latency.count();
    assert!(asked >= 1, "the cold read was not timed");
    assert_eq!(super::testkit::content(&wb, 31), vec![9; PAGE]);
    assert_eq!(
        m.levels.store_read_latency.count(),
        asked,
        "a cache hit timed as a store read"
    );
}
