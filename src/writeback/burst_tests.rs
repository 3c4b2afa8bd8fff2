//! Bursts of small files in one directory, through the filesystem layer:
//! creates (create, a write of a few bytes, close) and unlinks are grouped
//! into a bounded number of commits, not one each, while a close still
//! returns without waiting (acks held by the sink's latch,
//! [`super::testkit::Gate`]), an fsync or fsyncdir after the grouped
//! closes waits for every one of them, and what a crash can lose is
//! unchanged: what was fsynced is in the store, what was not may be
//! missing.

use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::testkit::{cfg, content, eventually, layer_with, FaultSink, GuestBytes};
use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::{Store, ROOT_INO};

/// Files in a burst.
const FILES: usize = 100;

/// Operations per transaction: the daemon's default, so that a burst of
/// `FILES` fits one transaction.
const MAX_TXN_OPS: usize = 1024;

/// Page bytes per transaction: a small file's bytes take a page, so that
/// a burst of `FILES` fits one transaction.
const MAX_TXN_BYTES: u64 = 1 << 20;

struct Burst {
    wb: Arc<WritebackStore>,
    sink: Arc<FaultSink>,
    store: Arc<MemStore>,
    metrics: Arc<Metrics>,
    fs: Arc<PohmelFs>,
}

/// The filesystem layer over a layer whose acks the test may hold: real
/// clock, no ack timeout reached, metadata transactions lingering
/// `linger`; the root created and durable, so that the transactions that
/// follow are the test's.
fn burst(policy: OverwritePolicy, linger: Duration, seed: u64) -> Burst {
    let config = TxnConfig {
        meta_linger: linger,
        ack_timeout: Duration::from_secs(3600),
        max_txn_ops: MAX_TXN_OPS,
        max_txn_bytes: MAX_TXN_BYTES,
        ..cfg(policy)
    };
    let (wb, sink, store, metrics) = layer_with(config, 1, seed, false);
    let wb = Arc::new(wb);
    let fs = PohmelFs::new(
        Arc::clone(&wb) as Arc<dyn Store>,
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    wb.sync(None).unwrap();
    Burst {
        wb,
        sink,
        store,
        metrics,
        fs: Arc::new(fs),
    }
}

fn data_of(name: &str) -> Vec<u8> {
    format!("{name}\n").into_bytes()
}

/// What `echo name > name` does: create, write a few bytes, close (FLUSH
/// and RELEASE). Returns the file's inode.
fn small_file(fs: &PohmelFs, name: &str) -> u64 {
    let ctx = Context::new();
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, ..) = fs
        .create(&ctx, ROOT_INO, &CString::new(name).unwrap(), args)
        .unwrap();
    let fh = h.unwrap();
    let data = data_of(name);
    let len = data.len() as u32;
    let mut r = GuestBytes::new(data);
    fs.write(&ctx, e.inode, fh, &mut r, len, 0, None, false, 0, 0)
        .unwrap();
    fs.flush(&ctx, e.inode, fh, 0).unwrap();
    fs.release(&ctx, e.inode, 0, fh, true, false, None).unwrap();
    e.inode
}

/// Whether every transaction of the layer is queued, never sent and
/// lingering (a close did not cut its linger short).
fn all_lingering(wb: &WritebackStore) -> bool {
    let st = super::ack::lock(&wb.shared.state);
    st.txns
        .values()
        .all(|t| t.attempts == 0 && t.not_before.is_some())
}

fn fsyncdir(fs: &PohmelFs) -> std::io::Result<()> {
    fs.fsyncdir(&Context::new(), ROOT_INO, false, 0)
}

/// Every file of `names` is in the store: its entry and its bytes.
fn assert_stored(store: &MemStore, files: &[(String, u64)], what: &str) {
    for (name, ino) in files {
        let d = store.lookup(ROOT_INO, name.as_bytes()).unwrap();
        assert_eq!(d.map(|d| d.ino), Some(*ino), "{what}: entry of {name}");
        assert_eq!(
            content(store, *ino),
            data_of(name),
            "{what}: data of {name}"
        );
    }
}

#[test]
fn a_burst_of_small_files_and_their_unlinks_are_a_few_commits() {
    for policy in [OverwritePolicy::Cow, OverwritePolicy::Wait] {
        // No linger ends on its own: what is sent, the fsyncdir sent.
        let b = burst(policy, Duration::from_secs(600), 51);
        let sent = b.metrics.txn_sent.get();
        let files: Vec<(String, u64)> = (0..FILES)
            .map(|i| {
                let name = format!("f{i}");
                let ino = small_file(&b.fs, &name);
                (name, ino)
            })
            .collect();
        assert_eq!(b.wb.unacked(), 1, "{policy:?}: one transaction");
        assert!(
            all_lingering(&b.wb),
            "{policy:?}: the closes left the burst lingering"
        );
        fsyncdir(&b.fs).unwrap();
        // Each file is a create (its inode, its entry, the directory's
        // attributes) and its write's attributes: a handful of operations,
        // so the burst fits one transaction of `MAX_TXN_OPS`.
        let commits = b.metrics.txn_sent.get() - sent;
        assert_eq!(commits, 1, "{policy:?}: {FILES} small files");
        assert_stored(&b.store, &files, "after the fsyncdir");
        let sent = b.metrics.txn_sent.get();
        for (name, _) in &files {
            b.fs.unlink(
                &Context::new(),
                ROOT_INO,
                &CString::new(name.as_str()).unwrap(),
            )
            .unwrap();
        }
        fsyncdir(&b.fs).unwrap();
        let commits = b.metrics.txn_sent.get() - sent;
        assert_eq!(commits, 1, "{policy:?}: {FILES} unlinks");
        for (name, _) in &files {
            assert!(b.store.lookup(ROOT_INO, name.as_bytes()).unwrap().is_none());
        }
        assert_eq!(b.wb.unacked(), 0);
    }
}

#[test]
fn files_created_while_a_commit_is_in_flight_join_one_transaction() {
    for policy in [OverwritePolicy::Cow, OverwritePolicy::Wait] {
        let b = burst(policy, Duration::from_secs(600), 52);
        b.sink.gate.close();
        // The first file's fsync sends its transaction, which the latch
        // holds: the directory has a commit in flight.
        let first = ("first".to_string(), small_file(&b.fs, "first"));
        let fsync = {
            let (fs, ino) = (Arc::clone(&b.fs), first.1);
            std::thread::spawn(move || fs.fsync(&Context::new(), ino, false, 0))
        };
        eventually("the first file's commit at the latch", || {
            b.sink.gate.held() == 1
        });
        let sent = b.metrics.txn_sent.get();
        // Every later file, data and all, joins one transaction queued
        // behind it: a file's data does not close the transaction to the
        // next file's create.
        let formed = b.metrics.txn_formed.get();
        let files: Vec<(String, u64)> = (0..FILES)
            .map(|i| {
                let name = format!("g{i}");
                let ino = small_file(&b.fs, &name);
                (name, ino)
            })
            .collect();
        assert_eq!(
            b.metrics.txn_formed.get() - formed,
            1,
            "{policy:?}: {FILES} files behind a commit in flight"
        );
        assert!(!fsync.is_finished(), "{policy:?}: fsync before its ack");
        // An fsyncdir waits for both: the commit held and the burst.
        let sync_dir = {
            let fs = Arc::clone(&b.fs);
            std::thread::spawn(move || fsyncdir(&fs))
        };
        assert_eq!(
            b.sink.gate.held(),
            1,
            "{policy:?}: the burst waits its turn"
        );
        assert!(
            !sync_dir.is_finished(),
            "{policy:?}: fsyncdir before the acks"
        );
        b.sink.gate.open();
        fsync.join().unwrap().unwrap();
        sync_dir.join().unwrap().unwrap();
        assert_eq!(
            b.metrics.txn_sent.get() - sent,
            1,
            "{policy:?}: one more commit"
        );
        assert_stored(&b.store, &[first], "after the fsync");
        assert_stored(&b.store, &files, "after the fsyncdir");
    }
}

#[test]
fn a_close_in_a_burst_returns_and_its_transaction_goes_within_the_linger() {
    let b = burst(OverwritePolicy::Cow, Duration::from_millis(2), 53);
    b.sink.gate.close();
    // The closes return with nothing acknowledged.
    let files: Vec<(String, u64)> = (0..10)
        .map(|i| {
            let name = format!("h{i}");
            let ino = small_file(&b.fs, &name);
            (name, ino)
        })
        .collect();
    assert!(b.wb.unacked() >= 1);
    // Nobody syncs: the linger ends on its own and the burst leaves.
    eventually("the burst to leave on its own", || b.sink.gate.held() >= 1);
    assert_eq!(b.metrics.fsync_calls.get(), 1, "only the settle synced");
    for (name, _) in &files {
        assert!(b.store.lookup(ROOT_INO, name.as_bytes()).unwrap().is_none());
    }
    b.sink.gate.open();
    fsyncdir(&b.fs).unwrap();
    assert_stored(&b.store, &files, "after the fsyncdir");
}

#[test]
fn a_crash_after_a_grouped_burst_keeps_what_was_fsynced() {
    let b = burst(OverwritePolicy::Cow, Duration::from_secs(600), 54);
    let synced: Vec<(String, u64)> = (0..FILES / 2)
        .map(|i| {
            let name = format!("s{i}");
            let ino = small_file(&b.fs, &name);
            (name, ino)
        })
        .collect();
    fsyncdir(&b.fs).unwrap();
    b.sink.gate.close();
    let unsynced: Vec<(String, u64)> = (0..FILES / 2)
        .map(|i| {
            let name = format!("u{i}");
            let ino = small_file(&b.fs, &name);
            (name, ino)
        })
        .collect();
    // The daemon dies: the layer goes with whatever it had not stored.
    let Burst {
        wb,
        sink,
        store,
        fs,
        ..
    } = b;
    drop(fs);
    let wb = Arc::try_unwrap(wb).unwrap_or_else(|_| panic!("the layer is still shared"));
    drop(wb);
    sink.gate.open();
    assert_stored(&store, &synced, "fsynced before the crash");
    for (name, _) in &unsynced {
        assert!(
            store.lookup(ROOT_INO, name.as_bytes()).unwrap().is_none(),
            "{name}: never synced, never acknowledged, yet stored"
        );
    }
}

#[test]
fn an_fsync_sends_the_lingering_burst_ahead_of_it_on_the_directory() {
    let config = TxnConfig {
        meta_linger: Duration::from_secs(600),
        ack_timeout: Duration::from_secs(3600),
        // Long enough for any machine; a linger left alone outlasts it.
        fsync_timeout: Duration::from_secs(20),
        max_txn_ops: MAX_TXN_OPS,
        max_txn_bytes: MAX_TXN_BYTES,
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, _sink, store, _) = layer_with(config, 1, 55, false);
    let wb = Arc::new(wb);
    let fs = PohmelFs::new(
        Arc::clone(&wb) as Arc<dyn Store>,
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let old = small_file(&fs, "old");
    wb.sync(None).unwrap();
    // A burst lingers; a write to a file it does not touch is a
    // transaction of its own, so the next create starts another
    // transaction, queued behind the burst on the directory.
    let burst: Vec<(String, u64)> = (0..10)
        .map(|i| {
            let name = format!("b{i}");
            let ino = small_file(&fs, &name);
            (name, ino)
        })
        .collect();
    let ctx = Context::new();
    let fh = fs
        .open(&ctx, old, libc::O_WRONLY as u32, 0)
        .unwrap()
        .0
        .unwrap();
    let mut r = GuestBytes::new(b"new".to_vec());
    fs.write(&ctx, old, fh, &mut r, 3, 0, None, false, 0, 0)
        .unwrap();
    let last = ("last".to_string(), small_file(&fs, "last"));
    // The write may be acknowledged already, and then the last create
    // may have joined the burst; the burst itself lingers (600 s).
    assert!(wb.unacked() >= 1, "the burst lingers");
    // Its fsync sends the burst ahead of it too, rather than wait out the
    // burst's linger.
    fs.fsync(&ctx, last.1, false, 0).unwrap();
    assert_stored(&store, &[last], "after its fsync");
    assert_stored(&store, &burst, "ahead of it");
}
