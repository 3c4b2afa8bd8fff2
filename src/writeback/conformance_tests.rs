//! The store conformance suite (`store::engine::conformance`) run through
//! the write-back layer ([`WritebackStore`]) over its fault-injecting test
//! sink (errors, dropped connections, two servers), for both overwrite
//! policies, seen two ways:
//!
//! * [`Synced`]: every read first syncs the layer, then asks the layer and
//!   the store behind it, which must agree: what the layer acknowledged is
//!   what the store holds. The sink also loses and reorders acks.
//! * [`Unsynced`]: metadata transactions linger until a sync, so the layer
//!   answers from its overlays and page cache what the store does not have
//!   yet; after the differential run one sync must bring the store to the
//!   same state.

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::testkit::faulty_layer;
use super::{OverwritePolicy, WritebackStore};
use crate::store::engine::conformance::{assert_same, contract, differential, snapshot};
use crate::store::mem::MemStore;
use crate::store::{Dirent, Inode, Op, Store, StoreError, StoreStats, Txn};

/// The layer as the contract sees it: commits through the layer, reads
/// after a sync, checked against the store the layer writes to.
struct Synced {
    layer: WritebackStore,
    store: Arc<MemStore>,
    /// A commit since the last sync.
    unsynced: AtomicBool,
}

impl Synced {
    fn new(policy: OverwritePolicy, seed: u64) -> Synced {
        let (layer, store) = faulty_layer(policy, seed, false);
        Synced {
            layer,
            store,
            unsynced: AtomicBool::new(false),
        }
    }

    /// `read` after a sync, through the layer and from the store: they must
    /// agree, and the store's answer is returned.
    fn checked<T: PartialEq + Debug>(
        &self,
        what: &str,
        read: impl Fn(&dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.unsynced.swap(false, Ordering::SeqCst) {
            self.layer.sync(None)?;
        }
        let through = read(&self.layer)?;
        let stored = read(&*self.store)?;
        if through != stored {
            let (through, stored) = difference(&through, &stored);
            panic!("{what}: after a sync the layer answers {through}, its store {stored}");
        }
        Ok(stored)
    }
}

/// Where two values' `Debug` forms first differ, with some context: reads
/// can be megabytes.
fn difference(a: &impl Debug, b: &impl Debug) -> (String, String) {
    let a: Vec<char> = format!("{a:?}").chars().collect();
    let b: Vec<char> = format!("{b:?}").chars().collect();
    let at = a
        .iter()
        .zip(&b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let window = |s: &[char]| {
        let from = at.saturating_sub(80).min(s.len());
        let to = (at + 160).min(s.len());
        let part: String = s[from..to].iter().collect();
        format!("...{part}... (char {at} of {})", s.len())
    };
    (window(&a), window(&b))
}

impl Store for Synced {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.checked("get_inode", |s| s.get_inode(ino))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        self.checked("lookup", |s| s.lookup(parent, name))
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        self.checked("readdir", |s| s.readdir(parent, after, max))
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        // Each read starts from the caller's buffer, so a read that fills
        // nothing shows.
        let got = self.checked("read", |s| {
            let mut b = buf.to_vec();
            s.read(ino, offset, &mut b).map(|()| b)
        })?;
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        self.checked("next_data", |s| s.next_data(ino, offset))
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.checked("next_hole", |s| s.next_hole(ino, offset))
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.checked("readlink", |s| s.readlink(ino))
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.checked("get_xattr", |s| s.get_xattr(ino, name))
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.checked("list_xattr", |s| s.list_xattr(ino))
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.checked("statfs", |s| s.statfs())
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        self.layer.reserve_ids(count)
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.unsynced.store(true, Ordering::SeqCst);
        self.layer.commit(txn)
    }

    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.layer.sync(ino)
    }

    fn describe(&self) -> String {
        format!("{}, read after a sync", self.layer.describe())
    }
}

/// The layer read without a sync, its metadata transactions lingering.
/// Three things are left to the store:
///
/// * space: statfs is read after a sync;
/// * a commit that waits for its ack (a write in a metadata transaction)
///   is preceded by a sync, since its ack would wait for the lingering
///   transactions of its inodes (truncates and punched holes do not wait:
///   the layer answers for the ranges they zeroed);
/// * a removed inode: a commit that removes one is followed by a sync. The
///   layer drops what it knows of the inode (pages, symlink target,
///   extended attributes) and answers from the store, which has them until
///   the removal is acknowledged; the filesystem never reads an inode it
///   removed.
struct Unsynced {
    layer: WritebackStore,
    store: Arc<MemStore>,
}

impl Unsynced {
    fn new(policy: OverwritePolicy, seed: u64) -> Unsynced {
        let (layer, store) = faulty_layer(policy, seed, true);
        Unsynced { layer, store }
    }
}

impl Store for Unsynced {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.layer.get_inode(ino)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        self.layer.lookup(parent, name)
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        self.layer.readdir(parent, after, max)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.layer.read(ino, offset, buf)
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        self.layer.next_data(ino, offset)
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.layer.next_hole(ino, offset)
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.layer.readlink(ino)
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.layer.get_xattr(ino, name)
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.layer.list_xattr(ino)
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.layer.sync(None)?;
        self.layer.statfs()
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        self.layer.reserve_ids(count)
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        let fs_write =
            matches!(&txn.ops[..], [Op::Write { ino, .. }, Op::PutInode(i)] if i.ino == *ino);
        let waits = !fs_write && txn.ops.iter().any(|op| matches!(op, Op::Write { .. }));
        let removes = txn
            .ops
            .iter()
            .any(|op| matches!(op, Op::RemoveInode { .. }));
        if waits {
            self.layer.sync(None)?;
        }
        self.layer.commit(txn)?;
        if removes {
            self.layer.sync(None)?;
        }
        Ok(())
    }

    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.layer.sync(ino)
    }

    fn describe(&self) -> String {
        format!("{}, read without a sync", self.layer.describe())
    }
}

#[test]
fn writeback_keeps_the_store_contract() {
    for policy in [OverwritePolicy::Cow, OverwritePolicy::Wait] {
        contract(&Synced::new(policy, 0xC0FF_EE00));
        let unsynced = Unsynced::new(policy, 0xC0FF_EE01);
        contract(&unsynced);
        unsynced.layer.sync(None).expect("final sync");
    }
}

#[test]
fn mem_and_writeback_agree_on_random_transactions() {
    for (policy, seed) in [
        (OverwritePolicy::Cow, 0x0DD5_EED1),
        (OverwritePolicy::Wait, 0x0DD5_EED2),
    ] {
        let mem = MemStore::new(1 << 30);
        differential(&mem, &Synced::new(policy, seed), seed, 150);
        let mem = MemStore::new(1 << 30);
        let layer = Unsynced::new(policy, seed);
        differential(&mem, &layer, seed, 150);
        layer.layer.sync(None).expect("final sync");
        assert_same(&snapshot(&mem), &snapshot(&*layer.store), &"the final sync");
    }
}
