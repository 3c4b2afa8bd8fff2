//! Inode ids reserved ahead: a create finds the next range ready when its
//! range runs out, ids keep increasing, and a store that cannot reserve
//! costs one attempt ahead, not one per create; a range past the end of
//! the id space is refused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pohmelfs_testkit::wait_until;

use super::super::{lock, Ahead, FsConfig, PohmelFs, ID_BATCH};
use crate::metrics::Metrics;
use crate::store::hooked::Hooked;
use crate::store::mem::MemStore;
use crate::store::StoreError;

#[test]
fn ids_are_reserved_ahead_and_keep_increasing() {
    let calls = Arc::new(AtomicU64::new(0));
    let refuse = Arc::new(AtomicBool::new(false));
    let store = {
        let (calls, refuse) = (Arc::clone(&calls), Arc::clone(&refuse));
        Hooked::new(Arc::new(MemStore::new(64 << 20)), "reserving").before_reserve(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            if refuse.load(Ordering::SeqCst) {
                return Err(StoreError::Io(std::io::Error::other("store unreachable")));
            }
            Ok(())
        })
    };
    let fs = PohmelFs::new(
        Arc::new(store),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let mut last = 0;
    let take = |n: u64, last: &mut u64| {
        for _ in 0..n {
            let id = fs.alloc_id().unwrap();
            assert!(id > *last, "id {id} after {}", *last);
            *last = id;
        }
    };
    // The first range is reserved on the request path; past its half, the
    // next one goes ahead.
    take(ID_BATCH, &mut last);
    let ready = wait_until(Duration::from_secs(30), Duration::from_millis(1), || {
        lock(&fs.ids).spare.is_some()
    });
    assert!(ready.is_some(), "the next range was never reserved ahead");
    let before = calls.load(Ordering::SeqCst);
    assert_eq!(before, 2, "one reservation for the range, one ahead");

    // The store stops reserving: the whole next range is still handed out,
    // from the range reserved ahead.
    refuse.store(true, Ordering::SeqCst);
    take(ID_BATCH, &mut last);
    let failed = wait_until(Duration::from_secs(30), Duration::from_millis(1), || {
        lock(&fs.ids).ahead == Ahead::Failed
    });
    assert!(failed.is_some(), "the reservation ahead never ended");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 1,
        "one attempt ahead"
    );

    // Now a create needs the store, and fails while it refuses; the
    // failed attempt ahead is not repeated for every id.
    for _ in 0..3 {
        assert!(fs.alloc_id().is_err());
    }
    assert_eq!(calls.load(Ordering::SeqCst), before + 4);
    refuse.store(false, Ordering::SeqCst);
    take(1, &mut last);
    assert_eq!(
        lock(&fs.ids).ahead,
        Ahead::Idle,
        "reservations ahead resume"
    );
}

/// A store that reserves ids at the very end of the id space, as no honest
/// one does.
struct EndOfIdSpace(MemStore);

impl crate::store::Store for EndOfIdSpace {
    crate::store::delegate::delegate_store!(0: metadata_reads, read, commit, sync);

    fn describe(&self) -> String {
        "end of the id space".into()
    }

    fn reserve_ids(&self, _count: u64) -> Result<u64, StoreError> {
        Ok(u64::MAX - 100)
    }
}

/// A reserved range that would run past the end of the id space (a broken
/// or hostile store server's answer) fails the create that needed it: its
/// ids would wrap round to the root's and the reserved ones.
#[test]
fn a_range_past_the_end_of_the_id_space_is_refused() {
    let fs = PohmelFs::new(
        Arc::new(EndOfIdSpace(MemStore::new(64 << 20))),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    for _ in 0..3 {
        let e = fs.alloc_id().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e:?}");
        let why = crate::ErrorChain(&e).to_string();
        assert!(why.contains("past the end of the id space"), "{why}");
    }
}
