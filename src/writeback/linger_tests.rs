//! Lingering: a write's own transaction waits `data_linger` for the
//! inode's next writes, so the writes between two syncs are one commit; a
//! sync after each write stops it; near the dirty bound it gives way.

use std::time::Duration;

use super::testkit::*;
use super::{OverwritePolicy, TxnConfig};
use crate::store::Store;

/// Writes linger ten minutes unless something ends it, and acks never
/// time out: what a test sees go was sent for a reason of its own.
fn lingering() -> TxnConfig {
    TxnConfig {
        data_linger: Duration::from_secs(600),
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    }
}

/// A write's own transaction lingers `data_linger` for the inode's next
/// writes: the writes between two syncs are one commit. A write that does
/// not fit ends the linger of the full one, which goes on its own.
#[test]
fn writes_between_syncs_linger_into_one_commit() {
    let config = lingering();
    let max = config.max_txn_bytes;
    let (wb, _sink, store, m) = layer_with(config, 1, 29, false);
    create(&wb, 40);
    wb.sync(None).unwrap();
    let sent = m.txn_sent.get();
    for i in 0..8u64 {
        write(&wb, 40, i * 4096, &[i as u8; 4096], (i + 1) * 4096);
    }
    assert_eq!(m.txn_sent.get(), sent, "the writes linger");
    assert_eq!(wb.unacked(), 1, "the writes joined one transaction");
    wb.sync(Some(40)).unwrap();
    assert_eq!(m.txn_sent.get(), sent + 1, "one commit for the eight");
    let expect: Vec<u8> = (0..8u8).flat_map(|i| [i; 4096]).collect();
    assert_eq!(content(&*store, 40), expect);
    // A full transaction: the next write starts another, and the full one
    // goes without a sync; the new one lingers.
    write(&wb, 40, 0, &vec![9u8; max as usize], max);
    write(&wb, 40, max, &[7u8; 4096], max + 4096);
    eventually("the full transaction to go on its own", || {
        m.txn_acked.get() == sent + 2
    });
    assert_eq!(wb.unacked(), 1, "the newer one lingers");
    wb.sync(Some(40)).unwrap();
    assert_eq!(content(&*store, 40).len() as u64, max + 4096);
}

/// Lingering gives way near the dirty bound: past three quarters of
/// `dirty_max_bytes` lingering transactions go at once, so a writer that
/// needs room waits for acks, not for a linger of ten minutes.
#[test]
fn lingering_gives_way_near_the_dirty_bound() {
    let config = TxnConfig {
        meta_linger: Duration::from_secs(600),
        ..lingering()
    };
    let dirty_max = config.dirty_max_bytes;
    let (wb, _sink, store, m) = layer_with(config, 1, 34, false);
    let files = 16u64;
    let each = dirty_max / files;
    for ino in 60..60 + files {
        create(&wb, ino);
    }
    wb.sync(None).unwrap();
    let sent = m.txn_sent.get();
    // Half the bound: every file's transaction lingers.
    for ino in 60..60 + files / 2 {
        write(&wb, ino, 0, &vec![ino as u8; each as usize], each);
    }
    assert_eq!(m.txn_sent.get(), sent, "below the mark they linger");
    // Past three quarters they go without a sync (until the dirty bytes
    // are below the mark again), and a write that needs more room than is
    // left gets it from their acks; with the linger it would fail after
    // `fsync_timeout`.
    for ino in 60 + files / 2..60 + files {
        write(&wb, ino, 0, &vec![ino as u8; each as usize], each);
    }
    write(&wb, 60, each, &vec![1u8; each as usize], 2 * each);
    assert!(m.txn_acked.get() > sent, "acks made the room");
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 61), vec![61u8; each as usize]);
}

/// A sync after each write (a log's append + fsync) stops the inode's
/// writes from lingering: the next one goes without waiting for the
/// fsync, so its commit runs while the guest is on its way to it. A sync
/// after many writes keeps them lingering into one commit.
#[test]
fn a_sync_after_each_write_stops_the_lingering() {
    let config = lingering();
    let (wb, _sink, _store, m) = layer_with(config, 1, 34, false);
    let eager = |ino| super::ack::lock(&wb.shared.state).eager_sync.contains(&ino);
    create(&wb, 40);
    create(&wb, 41);
    wb.sync(None).unwrap();
    let sent = m.txn_sent.get();
    write(&wb, 40, 0, &[1u8; 4096], 4096);
    assert_eq!(m.txn_sent.get(), sent, "the first write lingers");
    wb.sync(Some(40)).unwrap();
    assert!(eager(40));
    write(&wb, 40, 4096, &[2u8; 4096], 8192);
    eventually("the next write to go without a sync", || {
        m.txn_acked.get() == sent + 2
    });
    // Many writes before the sync: they linger, and the inode is not
    // taken for a log.
    let sent = m.txn_sent.get();
    for i in 0..8u64 {
        write(&wb, 41, i * 4096, &[3u8; 4096], (i + 1) * 4096);
    }
    assert_eq!(m.txn_sent.get(), sent, "the writes linger");
    wb.sync(Some(41)).unwrap();
    assert_eq!(m.txn_sent.get(), sent + 1, "one commit for the eight");
    assert!(!eager(41));
}

/// A burst of lingering changes does not wake the sender once per change:
/// each may go only when the linger ends, after the sender wakes by itself
/// anyway. Before that rule, every create of a directory's burst woke the
/// sender thread only for it to go back to sleep (a thread wake-up per
/// guest request, most of a slow guest's per-file CPU).
#[test]
fn a_burst_of_lingering_changes_does_not_wake_the_sender_per_change() {
    let config = TxnConfig {
        meta_linger: Duration::from_secs(600),
        max_txn_ops: 1024,
        ..lingering()
    };
    let (wb, _sink, store, m) = layer_with(config, 1, 35, false);
    wb.sync(None).unwrap();
    let creates = 64u64;
    let nudges = m.sender_nudges.get();
    for i in 0..creates {
        create_in(&wb, 1, 200 + i, &format!("f{i}"));
    }
    // The first create's transaction may go before the sender's next
    // wake (it slept with nothing to do): one nudge at most.
    let nudged = m.sender_nudges.get() - nudges;
    assert!(
        nudged <= 1,
        "{nudged} wake-ups for {creates} lingering creates"
    );
    assert_eq!(wb.unacked(), 1, "they linger in one transaction");
    wb.sync(None).unwrap();
    assert_eq!(
        store.lookup(1, b"f63").unwrap().map(|d| d.ino),
        Some(200 + creates - 1)
    );
}
