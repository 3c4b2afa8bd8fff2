//! The drain at shutdown (`WritebackStore::drain`): bounded by its own
//! timeout, whatever `--fsync-timeout-ms` says, and saying what it could
//! not store. Acks are held with the sink's latch, never a latency.

use std::time::{Duration, Instant};

use super::testkit::{create, eventually, held_layer, write};
use super::OverwritePolicy;
use crate::store::Store;

#[test]
fn a_drain_gives_up_at_its_timeout_and_says_what_is_lost() {
    let (wb, sink, store, _m) = held_layer(OverwritePolicy::Cow, 50);
    create(&wb, 10);
    wb.sync(None).unwrap();
    sink.gate.close();
    write(&wb, 10, 0, b"never acked", 11);
    eventually("the write's send waits at the latch", || {
        sink.gate.held() > 0
    });

    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let e = wb.drain(timeout).unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= timeout, "gave up early: {waited:?}");
    // The default fsync timeout (60 s) is not what bounds it.
    assert!(waited < Duration::from_secs(30), "waited {waited:?}");
    let why = crate::ErrorChain(&e).to_string();
    assert!(
        why.contains("not stored within 300ms") && why.contains(" data bytes)"),
        "{why}"
    );
    assert!(wb.unacked() > 0);
    assert_eq!(store.get_inode(10).unwrap().map(|i| i.size), Some(0));

    // Let the acks go: the next drain stores everything.
    sink.gate.open();
    wb.drain(Duration::from_secs(60)).unwrap();
    assert_eq!(wb.unacked(), 0);
    assert_eq!(store.get_inode(10).unwrap().map(|i| i.size), Some(11));
}
