//! A full volume through the transaction layer: the filesystem layer
//! (`PohmelFs`) over a [`WritebackStore`] over a small `mem:` volume, whose
//! commits fail with `NoSpace` once its blocks are used up. The guest must
//! see ENOSPC at the write or at the next fsync or close, at once, and the
//! layer must never show bytes the volume does not hold.

use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::testkit::{self as layer_tests, create_in, eventually, held_layer, Faults, GuestBytes};
use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::sink::EngineSink;
use crate::store::{Op, Store, StoreError, Txn, BLOCK_SIZE, ROOT_INO};

/// The daemon's stack over a `mem:` volume of `capacity` bytes, its acks
/// the volume's commits (as `pohmelfs serve --store mem:?capacity=SIZE`).
struct Stack {
    fs: PohmelFs,
    wb: Arc<WritebackStore>,
    volume: Arc<MemStore>,
    metrics: Arc<Metrics>,
}

fn stack(capacity: u64, policy: OverwritePolicy) -> Stack {
    stack_with(capacity, policy, false)
}

/// As [`stack`]; `sync_on_close`: every close waits as fsync does.
fn stack_with(capacity: u64, policy: OverwritePolicy, sync_on_close: bool) -> Stack {
    let volume = Arc::new(MemStore::new(capacity));
    let sink = Arc::new(EngineSink::new(volume.clone()).unwrap());
    let metrics = Arc::new(Metrics::default());
    let cfg = TxnConfig {
        overwrite: policy,
        // Two blocks per transaction: the volume fills mid-file.
        max_txn_bytes: 2 * BLOCK_SIZE,
        // Long enough that an answer before it is never a timeout.
        fsync_timeout: Duration::from_secs(60),
        ack_timeout: Duration::from_secs(60),
        sync_on_close,
        ..TxnConfig::default()
    };
    let wb = Arc::new(WritebackStore::new(cfg, volume.clone(), sink, metrics.clone()).unwrap());
    let fs = PohmelFs::new(wb.clone(), FsConfig::default(), metrics.clone()).unwrap();
    Stack {
        fs,
        wb,
        volume,
        metrics,
    }
}

fn name(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Create `file` in the root; its inode and handle.
fn create(fs: &PohmelFs, file: &str) -> (u64, u64) {
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, ..) = fs
        .create(&Context::new(), ROOT_INO, &name(file), args)
        .unwrap();
    (e.inode, h.unwrap_or(0))
}

fn write(fs: &PohmelFs, ino: u64, handle: u64, offset: u64, data: &[u8]) -> Result<(), i32> {
    let mut r = GuestBytes::new(data.to_vec());
    let ctx = Context::new();
    match fs.write(
        &ctx,
        ino,
        handle,
        &mut r,
        data.len() as u32,
        offset,
        None,
        false,
        0,
        0,
    ) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(n) => panic!("short write of {n} bytes"),
        Err(e) => Err(e.raw_os_error().unwrap_or(0)),
    }
}

fn errno(r: std::io::Result<()>) -> Result<(), i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(0))
}

/// The bytes of `ino` as `s` shows them.
fn content(s: &dyn Store, ino: u64) -> Vec<u8> {
    let size = s.get_inode(ino).unwrap().map_or(0, |i| i.size);
    let mut buf = vec![0u8; size as usize];
    s.read(ino, 0, &mut buf).unwrap();
    buf
}

/// Writes `total` bytes to `ino` in chunks; which of them the layer
/// refused with ENOSPC (every other errno fails the test).
fn fill(fs: &PohmelFs, ino: u64, handle: u64, total: u64, byte: u8) -> Vec<u64> {
    let chunk = vec![byte; BLOCK_SIZE as usize];
    let mut refused = Vec::new();
    for offset in (0..total).step_by(chunk.len()) {
        match write(fs, ino, handle, offset, &chunk) {
            Ok(()) => {}
            Err(libc::ENOSPC) => refused.push(offset),
            Err(e) => panic!("write at {offset}: errno {e}, expected success or ENOSPC"),
        }
    }
    refused
}

#[test]
fn a_full_volume_says_enospc_at_the_write_or_the_fsync() {
    for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
        let s = stack(8 * BLOCK_SIZE, policy);
        let ctx = Context::new();
        let (f, fh) = create(&s.fs, "f");
        // Twice what the volume holds: writes land in the cache until the
        // layer learns that the volume is full.
        fill(&s.fs, f, fh, 16 * BLOCK_SIZE, 1);
        assert_eq!(
            errno(s.fs.fsync(&ctx, f, false, fh)),
            Err(libc::ENOSPC),
            "{policy:?}: fsync of data the volume could not take"
        );
        assert_eq!(
            write(&s.fs, f, fh, 0, &[2u8; 4096]),
            Err(libc::ENOSPC),
            "{policy:?}: the layer knows the volume is full: new writes are refused"
        );
        // What the layer shows is what the volume holds: no byte of the
        // refused transactions is left in the cache as if it were stored.
        assert_eq!(
            content(&*s.wb, f),
            content(&*s.volume, f),
            "{policy:?}: the layer shows bytes the volume does not hold"
        );
        assert_eq!(
            errno(s.fs.fsync(&ctx, f, false, fh)),
            Ok(()),
            "{policy:?}: the error was reported once, and nothing else is pending"
        );
        assert!(s.metrics.txn_no_space.get() >= 1, "{policy:?}");
        // Freeing space lets writes in again (once the removal is
        // acknowledged), and they are stored.
        s.fs.release(&ctx, f, 0, fh, true, false, None).unwrap();
        s.fs.unlink(&ctx, ROOT_INO, &name("f")).unwrap();
        s.fs.forget(&ctx, f, 1);
        s.fs.sync_all().unwrap();
        assert!(s.volume.get_inode(f).unwrap().is_none(), "f is removed");
        let (g, gh) = create(&s.fs, "g");
        let data: Vec<u8> = (0..3 * BLOCK_SIZE).map(|i| (i % 251) as u8).collect();
        write(&s.fs, g, gh, 0, &data).expect("space was freed");
        assert_eq!(errno(s.fs.fsync(&ctx, g, false, gh)), Ok(()));
        assert_eq!(content(&*s.volume, g), data, "{policy:?}: g is stored");
        assert_eq!(s.wb.unacked(), 0);
        assert_eq!(
            s.metrics.fs_internal_errors.get(),
            0,
            "ENOSPC is no internal error"
        );
    }
}

#[test]
fn with_sync_on_close_close_reports_enospc_once() {
    let s = stack_with(2 * BLOCK_SIZE, OverwritePolicy::Cow, true);
    let ctx = Context::new();
    let (f, fh) = create(&s.fs, "f");
    fill(&s.fs, f, fh, 6 * BLOCK_SIZE, 3);
    // close(2): FLUSH waits for the inode's data and reports what was lost.
    assert_eq!(errno(s.fs.flush(&ctx, f, fh, 0)), Err(libc::ENOSPC));
    assert_eq!(errno(s.fs.flush(&ctx, f, fh, 0)), Ok(()), "reported once");
    assert_eq!(content(&*s.wb, f), content(&*s.volume, f));
    assert_eq!(s.wb.unacked(), 0, "nothing waits: the refused data is gone");
}

#[test]
fn close_reports_a_known_enospc_once() {
    let s = stack(2 * BLOCK_SIZE, OverwritePolicy::Cow);
    let ctx = Context::new();
    let (f, fh) = create(&s.fs, "f");
    fill(&s.fs, f, fh, 6 * BLOCK_SIZE, 3);
    // A close does not wait for the store: once the refusal has come
    // back, the next close reports it, once, as fsync would.
    eventually("the volume to refuse the data", || {
        s.metrics.txn_no_space.get() >= 1 && s.wb.unacked() == 0
    });
    assert_eq!(errno(s.fs.flush(&ctx, f, fh, 0)), Err(libc::ENOSPC));
    assert_eq!(errno(s.fs.flush(&ctx, f, fh, 0)), Ok(()), "reported once");
    assert_eq!(
        errno(s.fs.fsync(&ctx, f, false, fh)),
        Ok(()),
        "reported once"
    );
    assert_eq!(content(&*s.wb, f), content(&*s.volume, f));
}

#[test]
fn metadata_without_room_fails_each_fsync_at_once_until_stored() {
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 31);
    // No inode left, say: the store refuses the create itself.
    sink.set(Faults {
        no_space: true,
        ..Faults::default()
    });
    create_in(&wb, ROOT_INO, 40, "x");
    let deadline = super::testkit::cfg(OverwritePolicy::Cow).fsync_timeout;
    for attempt in 1..=2 {
        let start = std::time::Instant::now();
        assert!(
            matches!(wb.sync(Some(40)), Err(StoreError::NoSpace)),
            "fsync {attempt} of a create the volume has no room for"
        );
        assert!(
            start.elapsed() < deadline,
            "fsync {attempt} answered at its deadline, not at once"
        );
    }
    // Nothing to drop: the create is kept, visible, and retried.
    assert_eq!(wb.unacked(), 1);
    assert!(wb.lookup(ROOT_INO, b"x").unwrap().is_some());
    assert!(m.txn_no_space.get() >= 1);
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    wb.sync(Some(40)).unwrap();
    assert!(store.lookup(ROOT_INO, b"x").unwrap().is_some());
}

#[test]
fn a_removed_inode_takes_its_enospc_with_it() {
    let (wb, sink, _store, m) = held_layer(OverwritePolicy::Cow, 32);
    let remove = |ino: u64| {
        let mut t = Txn::new();
        t.push(Op::RemoveInode { ino });
        wb.commit(t).unwrap();
    };
    let no_space = |on: bool| {
        sink.set(Faults {
            no_space: on,
            ..Faults::default()
        })
    };
    layer_tests::create(&wb, 20);
    layer_tests::create(&wb, 21);
    wb.sync(None).unwrap();
    // Removed after its data was refused.
    no_space(true);
    layer_tests::write(&wb, 20, 0, &[1u8; 4096], 4096);
    eventually("the refusal", || m.txn_no_space.get() >= 1);
    no_space(false);
    eventually("the attributes to be stored", || wb.unacked() == 0);
    remove(20);
    wb.sync(Some(20))
        .expect("the inode that lost data is gone, and its error with it");
    // Removed while its data is in flight, then refused.
    sink.gate.close();
    layer_tests::write(&wb, 21, 0, &[1u8; 4096], 4096);
    eventually("the write to be sent", || sink.gate.held() >= 1);
    remove(21);
    no_space(true);
    let refused = m.txn_no_space.get();
    sink.gate.open();
    eventually("the refusal", || m.txn_no_space.get() > refused);
    no_space(false);
    wb.sync(None)
        .expect("the inodes that lost data are gone, and their errors with them");
    assert_eq!(wb.unacked(), 0);
}
