//! Issue 13 point 3 in the transaction layer: nothing a guest does can
//! make a transaction that the wire cannot carry, metadata counts against
//! `dirty_max_bytes` (its memory too), and no wait outlasts `fsync_timeout`.

use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::queue::{op_wire_bytes, TXN_META_BYTES_MAX, TXN_OPS_MAX};
use super::testkit::{cfg, create, eventually, held_layer, layer_with, write};
use super::{OverwritePolicy, TxnConfig};
use crate::net::proto::codec::Enc;
use crate::net::proto::MAX_PAYLOAD;
use crate::store::{
    Dirent, FileKind, Inode, Op, Store, Txn, NAME_MAX, SYMLINK_MAX, XATTR_NAME_MAX, XATTR_VALUE_MAX,
};

fn setxattr(ino: u64, i: usize) -> Txn {
    let mut t = Txn::new();
    t.push(Op::SetXattr {
        ino,
        name: format!("user.x{i:04}").into_bytes(),
        value: vec![i as u8; XATTR_VALUE_MAX],
    });
    t
}

/// With acks held (the sink's gate closed after 20 files were made
/// durable), `commits` on a thread of their own, until they meet
/// backpressure: the thread, to join once the gate opens.
fn until_backpressure(
    wb: &Arc<super::WritebackStore>,
    sink: &super::testkit::FaultSink,
    m: &crate::metrics::Metrics,
    commits: impl FnOnce(&super::WritebackStore) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    create(&**wb, 20);
    wb.sync(None).unwrap();
    sink.gate.close();
    let thread = {
        let wb = Arc::clone(wb);
        std::thread::spawn(move || commits(&wb))
    };
    eventually("the commits to meet backpressure", || {
        m.backpressure_waits.get() >= 1
    });
    thread
}

/// `op_wire_bytes` is an upper bound of what the codec writes, for every
/// op at its largest: the compile-time check against the frame limit
/// (`queue.rs`) rests on it.
#[test]
fn op_wire_bytes_bounds_every_op_encoding() {
    let name = vec![b'n'; NAME_MAX.max(XATTR_NAME_MAX)];
    let ops = [
        Op::PutInode(Inode::regular(u64::MAX, u64::MAX)),
        Op::RemoveInode { ino: u64::MAX },
        Op::PutDirent {
            parent: 1,
            dirent: Dirent {
                name: name.clone(),
                ino: 2,
                kind: FileKind::Regular,
                cookie: 3,
            },
        },
        Op::RemoveDirent {
            parent: 1,
            name: name.clone(),
        },
        Op::Write {
            ino: 1,
            offset: 2,
            data: vec![0u8; 4096].into(),
        },
        Op::Truncate { ino: 1, size: 2 },
        Op::PunchHole {
            ino: 1,
            offset: 2,
            len: 3,
        },
        Op::SetSymlink {
            ino: 1,
            target: vec![b't'; SYMLINK_MAX],
        },
        Op::SetXattr {
            ino: 1,
            name: name.clone(),
            value: vec![0u8; XATTR_VALUE_MAX],
        },
        Op::RemoveXattr { ino: 1, name },
    ];
    for op in &ops {
        let mut e = Enc::default();
        e.op(op);
        assert!(
            e.buf.len() as u64 <= op_wire_bytes(op),
            "{op:?}: {} bytes encoded, {} estimated",
            e.buf.len(),
            op_wire_bytes(op)
        );
    }
}

/// The jam of issue 13: 200 extended attributes of 64 KiB on one inode,
/// lingering so that they join, would have made one transaction of
/// 12.8 MiB (1,024 ops allowed), which no frame carries. They split at
/// `TXN_META_BYTES_MAX` instead, and all arrive.
#[test]
fn metadata_transactions_are_bounded_in_bytes() {
    let config = TxnConfig {
        max_txn_ops: 1024,
        dirty_max_bytes: 64 << 20,
        meta_linger: Duration::from_secs(600),
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, m) = layer_with(config, 1, 61, false);
    create(&wb, 20);
    for i in 0..200 {
        wb.commit(setxattr(20, i)).unwrap();
    }
    wb.sync(None).unwrap();
    let largest = sink.largest_txn_bytes.load(Ordering::SeqCst);
    assert!(
        largest <= TXN_META_BYTES_MAX + 64 && largest < u64::from(MAX_PAYLOAD),
        "a transaction of {largest} bytes"
    );
    assert!(m.txn_sent.get() >= 200 * XATTR_VALUE_MAX as u64 / TXN_META_BYTES_MAX);
    for i in [0, 199] {
        let got = store.get_xattr(20, format!("user.x{i:04}").as_bytes());
        assert_eq!(got.unwrap().map(|v| v.len()), Some(XATTR_VALUE_MAX));
    }
}

/// Metadata bytes count against `dirty_max_bytes`: with acks held, a
/// stream of 64 KiB extended attributes stops at the bound, as writes do,
/// and goes on once acks come.
#[test]
fn metadata_bytes_count_toward_dirty_max() {
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 62);
    let wb = Arc::new(wb);
    let dirty_max = cfg(OverwritePolicy::Cow).dirty_max_bytes;
    let count = (2 * dirty_max / XATTR_VALUE_MAX as u64) as usize;
    let setter = until_backpressure(&wb, &sink, &m, move |wb| {
        for i in 0..count {
            wb.commit(setxattr(20, i)).unwrap();
        }
    });
    let dirty = m.levels.dirty_bytes.get();
    assert!(
        dirty <= dirty_max && dirty > dirty_max - 2 * XATTR_VALUE_MAX as u64,
        "{dirty} dirty bytes, bound {dirty_max}"
    );
    assert!(!setter.is_finished(), "the setxattrs went past the bound");
    sink.gate.open();
    setter.join().unwrap();
    wb.sync(None).unwrap();
    assert_eq!(m.levels.dirty_bytes.get(), 0, "every byte returned");
    let last = format!("user.x{:04}", count - 1);
    assert!(store.get_xattr(20, last.as_bytes()).unwrap().is_some());
}

/// Small metadata changes count what they hold in memory, not only their
/// wire bytes: with acks held, a stream of attribute changes of new inodes
/// (100 bytes on the wire each) meets backpressure before the memory of
/// their operations alone could pass the bound.
#[test]
fn small_metadata_changes_count_their_memory_toward_dirty_max() {
    let (wb, sink, _store, m) = held_layer(OverwritePolicy::Cow, 64);
    let wb = Arc::new(wb);
    let dirty_max = cfg(OverwritePolicy::Cow).dirty_max_bytes;
    // As many as wire bytes alone would let in, and more.
    let wire = op_wire_bytes(&Op::PutInode(Inode::regular(1, 0)));
    let count = dirty_max / wire + 1;
    let accepted = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&accepted);
    let setter = until_backpressure(&wb, &sink, &m, move |wb| {
        for i in 0..count {
            create(wb, 1000 + i);
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let held = accepted.load(Ordering::SeqCst);
    let memory = held * (size_of::<Op>() as u64 + wire);
    assert!(
        memory <= dirty_max,
        "{held} changes let in, their operations alone hold {memory} bytes, bound {dirty_max}"
    );
    assert!(m.levels.dirty_bytes.get() <= dirty_max);
    sink.gate.open();
    setter.join().unwrap();
    wb.sync(None).unwrap();
    assert_eq!(m.levels.dirty_bytes.get(), 0, "every byte returned");
}

/// A transaction that no frame could carry is an error for the request
/// that made it, counted, and never queued (so never retried).
#[test]
fn a_transaction_too_large_to_send_is_refused_at_once() {
    let (wb, _sink, _store, m) = held_layer(OverwritePolicy::Cow, 63);
    create(&wb, 20);
    wb.sync(None).unwrap();
    let mut many = Txn::new();
    for _ in 0..=TXN_OPS_MAX {
        many.push(Op::RemoveXattr {
            ino: 20,
            name: b"user.x".to_vec(),
        });
    }
    assert!(wb.commit(many).is_err());
    let mut big = Txn::new();
    for i in 0..=(TXN_META_BYTES_MAX as usize / XATTR_VALUE_MAX) {
        big.ops.extend(setxattr(20, i).ops);
    }
    assert!(wb.commit(big).is_err());
    assert_eq!(m.txn_oversized.get(), 2);
    assert_eq!(wb.unacked(), 0, "nothing queued");
    // The layer goes on.
    wb.commit(setxattr(20, 1)).unwrap();
    wb.sync(None).unwrap();
}

/// Run `f` on a thread of its own and return its result; fail the test if
/// it has not returned within `limit` (a wait that never gives up).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still waiting after {limit:?}: the wait is not bounded"))
}

/// With acks held, every wait of the layer gives up after `fsync_timeout`
/// with an error: a write held by backpressure, a metadata change held by
/// it, and a write in another shape waiting for its ack.
#[test]
fn every_wait_gives_up_after_fsync_timeout() {
    let config = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        fsync_timeout: Duration::from_millis(300),
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, _store, m) = layer_with(config.clone(), 1, 64, false);
    let wb = Arc::new(wb);
    let bound = Duration::from_secs(20);
    create(&*wb, 20);
    wb.sync(None).unwrap();
    sink.gate.close();
    let fill = config.dirty_max_bytes as usize;
    write(&*wb, 20, 0, &vec![1u8; fill], fill as u64);
    let w = wb.clone();
    assert!(within(bound, move || w.wait_for_room(4096)).is_err());
    let size = fill as u64 + 4096;
    let w = wb.clone();
    let more = within(bound, move || {
        w.write(
            20,
            fill as u64,
            vec![2u8; 4096].into(),
            Inode::regular(20, size),
        )
    });
    assert!(more.is_err());
    let w = wb.clone();
    assert!(within(bound, move || w.commit(setxattr(20, 0))).is_err());
    assert_eq!(m.writeback_wait_timeouts.get(), 3);
    sink.gate.open();
    wb.sync(None).unwrap();
    // With room again, a write in another shape waits for its ack, and
    // gives up when the ack does not come.
    sink.gate.close();
    let mut other = Txn::new();
    other.push(Op::Write {
        ino: 20,
        offset: 0,
        data: vec![3u8; 10].into(),
    });
    let w = wb.clone();
    assert!(within(bound, move || w.commit(other)).is_err());
    sink.gate.open();
    wb.sync(None).unwrap();
}
