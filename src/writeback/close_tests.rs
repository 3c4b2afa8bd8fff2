//! A close does not wait, and truncates and punched holes do not either:
//! with acks held by the sink's latch ([`super::testkit::Gate`]), FLUSH and
//! RELEASE return while their transaction is unacknowledged, which goes
//! within its linger or with the next fsync (under `sync_on_close` they
//! wait for it); a known error is still reported at
//! close; truncates and punched holes over pages whose writes are in flight
//! return at once, and reads through the layer, then the store after a
//! sync, hold exactly what a model says, under both overwrite policies; a
//! store read that overlaps the ack of a hole is not cached.

use std::ffi::CString;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::testkit::{cfg, content, create, eventually, layer_with, write, FaultSink, GuestBytes};
use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::{Dirent, Inode, Op, Store, StoreError, StoreStats, Txn, ROOT_INO};

type Layer = (
    Arc<WritebackStore>,
    Arc<FaultSink>,
    Arc<MemStore>,
    Arc<Metrics>,
);

/// A layer for held acks (real clock, no ack timeout reached) whose
/// metadata transactions linger until something sends them: whatever
/// leaves, a close or a sync sent.
fn held(policy: OverwritePolicy, sync_on_close: bool, seed: u64) -> Layer {
    let config = TxnConfig {
        meta_linger: Duration::from_secs(600),
        ack_timeout: Duration::from_secs(3600),
        sync_on_close,
        ..cfg(policy)
    };
    let (wb, sink, store, m) = layer_with(config, 1, seed, false);
    (Arc::new(wb), sink, store, m)
}

/// The filesystem layer over `wb`, its root created and durable: the
/// transactions that follow are the test's.
fn fs_over(wb: &Arc<WritebackStore>) -> Arc<PohmelFs> {
    let fs = PohmelFs::new(
        Arc::clone(wb) as Arc<dyn Store>,
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    wb.sync(None).unwrap();
    Arc::new(fs)
}

/// A file `f` created and written through `fs` (its create and its write
/// in one lingering transaction); its inode and handle.
fn file_with_data(fs: &PohmelFs) -> (u64, u64) {
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let ctx = Context::new();
    let (e, h, ..) = fs
        .create(&ctx, ROOT_INO, &CString::new("f").unwrap(), args)
        .unwrap();
    let fh = h.unwrap();
    let data = b"closed, not synced\n".to_vec();
    let len = data.len() as u32;
    let mut r = GuestBytes::new(data);
    fs.write(&ctx, e.inode, fh, &mut r, len, 0, None, false, 0, 0)
        .unwrap();
    (e.inode, fh)
}

#[test]
fn a_close_returns_before_the_ack_and_fsync_waits() {
    for policy in [OverwritePolicy::Cow, OverwritePolicy::Wait] {
        let (wb, sink, store, m) = held(policy, false, 41);
        let fs = fs_over(&wb);
        let (ino, fh) = file_with_data(&fs);
        sink.gate.close();
        let sent = m.txn_sent.get();
        let close = {
            let fs = Arc::clone(&fs);
            std::thread::spawn(move || {
                let ctx = Context::new();
                fs.flush(&ctx, ino, fh, 0)?;
                fs.release(&ctx, ino, 0, fh, true, false, None)
            })
        };
        eventually("the close to return", || close.is_finished());
        close.join().unwrap().unwrap();
        // It left the transaction lingering (for the next files of a
        // burst to join) and returned with nothing acknowledged.
        assert!(
            super::ack::lock(&wb.shared.state)
                .txns
                .values()
                .all(|t| t.attempts == 0 && t.not_before.is_some()),
            "{policy:?}: the close cut the linger short"
        );
        assert_eq!(m.txn_sent.get(), sent, "{policy:?}");
        assert!(wb.unacked() >= 1, "{policy:?}: acknowledged already?");
        assert_eq!(store.get_inode(ino).unwrap(), None, "{policy:?}");
        assert_eq!(m.fsync_calls.get(), 1, "{policy:?}: only the settle waited");
        // fsync is what waits: it sends the transaction and waits for the
        // ack the latch holds.
        let fsync = {
            let fs = Arc::clone(&fs);
            std::thread::spawn(move || fs.fsync(&Context::new(), ino, false, 0))
        };
        eventually("the fsync's transaction at the latch", || {
            sink.gate.held() >= 1
        });
        assert_eq!(m.txn_sent.get(), sent + 1, "{policy:?}");
        assert!(!fsync.is_finished(), "{policy:?}: fsync before the ack");
        sink.gate.open();
        fsync.join().unwrap().unwrap();
        assert_eq!(content(&*store, ino), b"closed, not synced\n");
    }
}

#[test]
fn a_closed_files_transaction_goes_on_its_own_within_the_linger() {
    let config = TxnConfig {
        meta_linger: Duration::from_millis(2),
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, m) = layer_with(config, 1, 44, false);
    let wb = Arc::new(wb);
    let fs = fs_over(&wb);
    sink.gate.close();
    let (ino, fh) = file_with_data(&fs);
    let ctx = Context::new();
    fs.flush(&ctx, ino, fh, 0).unwrap();
    fs.release(&ctx, ino, 0, fh, true, false, None).unwrap();
    // Nobody syncs: the linger ends and the transaction leaves, to wait
    // at the latch.
    eventually("the closed file's transaction at the latch", || {
        sink.gate.held() >= 1
    });
    assert_eq!(m.fsync_calls.get(), 1, "only the settle synced");
    assert_eq!(store.get_inode(ino).unwrap(), None);
    sink.gate.open();
    eventually("its ack", || wb.unacked() == 0);
    assert_eq!(content(&*store, ino), b"closed, not synced\n");
}

#[test]
fn with_sync_on_close_a_close_waits_for_the_ack() {
    for policy in [OverwritePolicy::Cow, OverwritePolicy::Wait] {
        let (wb, sink, store, _) = held(policy, true, 42);
        let fs = fs_over(&wb);
        let (ino, fh) = file_with_data(&fs);
        sink.gate.close();
        let close = {
            let fs = Arc::clone(&fs);
            std::thread::spawn(move || fs.flush(&Context::new(), ino, fh, 0))
        };
        eventually("the close's transaction at the latch", || {
            sink.gate.held() >= 1
        });
        assert!(
            !close.is_finished(),
            "{policy:?}: the close returned before the ack"
        );
        sink.gate.open();
        close.join().unwrap().unwrap();
        assert_eq!(
            content(&*store, ino),
            b"closed, not synced\n",
            "{policy:?}: the close returned: the store has it"
        );
        assert_eq!(wb.unacked(), 0);
        // A close with nothing written since has nothing to wait for.
        sink.gate.close();
        let release =
            std::thread::spawn(move || fs.release(&Context::new(), ino, 0, fh, true, false, None));
        eventually("the last close to return", || release.is_finished());
        release.join().unwrap().unwrap();
        sink.gate.open();
    }
}

#[test]
fn a_close_reports_a_known_fsync_failure_without_waiting() {
    let config = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        fsync_timeout: Duration::from_millis(50),
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, _) = layer_with(config, 1, 43, false);
    create(&wb, 20);
    wb.sync(None).unwrap();
    sink.gate.close();
    write(&wb, 20, 0, b"late", 4);
    // The fsync deadline passes with the ack held: EIO, and it sticks.
    assert!(matches!(wb.sync(Some(20)), Err(StoreError::Io(_))));
    // The close knows it: it says so, the ack still held.
    match wb.flush(20) {
        Err(StoreError::Io(e)) => assert!(
            e.to_string().contains("earlier fsync failed"),
            "not the sticky error: {e}"
        ),
        other => panic!("a close after a failed fsync answered {other:?}"),
    }
    // Not acknowledged: held at the gate (once the sender, which a loaded
    // machine may not have run yet within the 50 ms, has sent it).
    eventually("the transaction held at the gate", || sink.gate.held() >= 1);
    assert!(wb.unacked() >= 1, "acknowledged through a closed gate");
    sink.gate.open();
    eventually("the held transaction to be acknowledged", || {
        wb.unacked() == 0
    });
    wb.sync(Some(20)).unwrap();
    wb.flush(20).unwrap();
    assert_eq!(content(&*store, 20), b"late");
}

/// What a file of `size` bytes reads as through `s`, and the model's.
fn assert_reads(s: &dyn Store, ino: u64, want: &[u8], what: &str) {
    let size = s.get_inode(ino).unwrap().map_or(0, |i| i.size);
    assert_eq!(size, want.len() as u64, "{what}: size");
    let got = content(s, ino);
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {at} is {} instead of {}", got[at], want[at]);
    }
}

fn commit(s: &dyn Store, ops: Vec<Op>) {
    let mut t = Txn::new();
    for op in ops {
        t.push(op);
    }
    s.commit(t).unwrap();
}

const PAGES: usize = 6;
const PAGE: usize = 4096;

#[test]
fn truncate_and_punch_hole_over_writes_in_flight_do_not_wait() {
    for policy in [OverwritePolicy::Cow, OverwritePolicy::Wait] {
        let (wb, sink, store, m) = held(policy, false, 44);
        let ino = 20;
        create(&*wb, ino);
        let mut model = vec![1u8; PAGES * PAGE];
        write(&*wb, ino, 0, &model, model.len() as u64);
        wb.sync(None).unwrap();
        // New bytes for every page, sent and held at the latch: the
        // store has the old ones, and will have these before what follows.
        sink.gate.close();
        model.fill(2);
        write(&*wb, ino, 0, &model, model.len() as u64);
        eventually("the write at the latch", || sink.gate.held() >= 1);
        let acked = m.txn_acked.get();
        // Everything below returns with that ack held: none of it waits.
        let steps = {
            let wb = Arc::clone(&wb);
            std::thread::spawn(move || {
                let grown = (PAGES * PAGE) as u64;
                // Cut inside page 0, then grow again: pages 1.. are gone
                // from the cache and the store still has bytes there.
                commit(
                    &*wb,
                    vec![
                        Op::Truncate { ino, size: 100 },
                        Op::PutInode(Inode::regular(ino, 100)),
                    ],
                );
                commit(
                    &*wb,
                    vec![
                        Op::Truncate { ino, size: grown },
                        Op::PutInode(Inode::regular(ino, grown)),
                    ],
                );
                // A hole across pages 0 and 1.
                commit(
                    &*wb,
                    vec![
                        Op::PunchHole {
                            ino,
                            offset: 50,
                            len: PAGE as u64,
                        },
                        Op::PutInode(Inode::regular(ino, grown)),
                    ],
                );
                // A partial write into a page the cache lost: it loads the
                // store's bytes under the cut ranges.
                write(&*wb, ino, 3 * PAGE as u64 + 10, b"xyz", grown);
            })
        };
        eventually("truncates, hole and write to return", || {
            steps.is_finished()
        });
        steps.join().unwrap();
        // Cut from byte 100 on, punched from byte 50 on into page 1.
        model[50..].fill(0);
        model[3 * PAGE + 10..3 * PAGE + 13].copy_from_slice(b"xyz");
        assert_eq!(m.txn_acked.get(), acked, "{policy:?}: an ack got through");
        assert_reads(&*wb, ino, &model, &format!("{policy:?}, acks held"));
        sink.gate.open();
        wb.sync(Some(ino)).unwrap();
        assert_reads(&*wb, ino, &model, &format!("{policy:?}, after fsync"));
        assert_reads(&*store, ino, &model, &format!("{policy:?}, the store"));
        assert_eq!(wb.unacked(), 0);
    }
}

#[test]
fn a_punched_hole_reads_as_zeros_after_its_clean_pages_are_evicted() {
    // A cache of 16 pages: reading a larger file evicts what it read.
    let config = TxnConfig {
        cache_bytes: 16 * PAGE as u64,
        dirty_max_bytes: 8 * PAGE as u64,
        meta_linger: Duration::ZERO,
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, _) = layer_with(config, 1, 45, false);
    let ino = 20;
    let size = 64 * PAGE;
    create(&wb, ino);
    for i in 0..64 {
        write(
            &wb,
            ino,
            (i * PAGE) as u64,
            &[7u8; PAGE],
            ((i + 1) * PAGE) as u64,
        );
    }
    wb.sync(None).unwrap();
    sink.gate.close();
    commit(
        &wb,
        vec![
            Op::PunchHole {
                ino,
                offset: PAGE as u64,
                len: 40 * PAGE as u64,
            },
            Op::PutInode(Inode::regular(ino, size as u64)),
        ],
    );
    let mut model = vec![7u8; size];
    model[PAGE..41 * PAGE].fill(0);
    // Twice: the first read loads and evicts, the second reads the store.
    for pass in 0..2 {
        assert_reads(&wb, ino, &model, &format!("pass {pass}, the hole held"));
    }
    sink.gate.open();
    wb.sync(None).unwrap();
    assert_reads(&*store, ino, &model, "the store");
}

/// The layer's reads from a store, one of which, once armed, says it has
/// read and then returns what it read only when the test lets it go: a
/// store read that starts before a change is applied and ends after.
struct SlowRead {
    store: Arc<MemStore>,
    armed: std::sync::Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl Store for SlowRead {
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
        self.store.read(ino, offset, buf)?;
        let armed = self.armed.lock().unwrap().take();
        if let Some((read, go)) = armed {
            read.send(()).unwrap();
            go.recv().unwrap();
        }
        Ok(())
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
        "mem: with a slow read".into()
    }
}

#[test]
fn a_store_read_that_overlaps_the_ack_of_a_hole_is_not_cached() {
    let store = Arc::new(MemStore::new(1 << 30));
    let reads = Arc::new(SlowRead {
        store: Arc::clone(&store),
        armed: std::sync::Mutex::new(None),
    });
    let sink = Arc::new(FaultSink::new(Arc::clone(&store), 1, 46));
    let config = TxnConfig {
        cache_bytes: 16 * PAGE as u64,
        dirty_max_bytes: 8 * PAGE as u64,
        meta_linger: Duration::ZERO,
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let wb =
        Arc::new(WritebackStore::new(config, reads.clone(), sink.clone(), Arc::default()).unwrap());
    let ino = 20;
    let size = 64 * PAGE as u64;
    create(&*wb, ino);
    for i in 0..64u64 {
        write(
            &*wb,
            ino,
            i * PAGE as u64,
            &[7u8; PAGE],
            (i + 1) * PAGE as u64,
        );
    }
    wb.sync(None).unwrap();
    // A hole over pages 1 to 40, held at the latch: the store has 7s.
    sink.gate.close();
    commit(
        &*wb,
        vec![
            Op::PunchHole {
                ino,
                offset: PAGE as u64,
                len: 40 * PAGE as u64,
            },
            Op::PutInode(Inode::regular(ino, size)),
        ],
    );
    eventually("the hole at the latch", || sink.gate.held() >= 1);
    // A read of page 30 (evicted long ago) reads the store's 7s, then
    // stalls while the hole is applied and acknowledged.
    let (read_tx, read_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *reads.armed.lock().unwrap() = Some((read_tx, go_rx));
    let reader = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || {
            let mut buf = vec![1u8; PAGE];
            wb.read(ino, 30 * PAGE as u64, &mut buf).map(|()| buf)
        })
    };
    read_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the read reached the store");
    sink.gate.open();
    eventually("the hole to be acknowledged", || wb.unacked() == 0);
    go_tx.send(()).unwrap();
    let got = reader.join().unwrap().unwrap();
    assert!(got.iter().all(|&b| b == 0), "the read returned old bytes");
    assert_reads(
        &*wb,
        ino,
        &{
            let mut m = vec![7u8; size as usize];
            m[PAGE..41 * PAGE].fill(0);
            m
        },
        "after the ack: nothing stale was cached",
    );
}
