//! Stopping a queue (`GET_VRING_BASE`) while a request is still being
//! served: the reply must be in the used ring before the stop's reply,
//! because QEMU reads the used index then and a live migration's
//! destination starts past what the source took (`vring.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pohmelfs_testkit::wait_until;

use vhost::VhostBackend;

use super::frontend_kit::{Kit, QUEUE};
use crate::store::hooked::Hooked;
use crate::store::mem::MemStore;

/// Commits wait while it is shut; the test opens it.
#[derive(Default)]
struct Latch {
    shut: Mutex<bool>,
    opened: Condvar,
}

impl Latch {
    fn wait(&self) {
        let shut = self.shut.lock().unwrap();
        // Bounded: a broken test ends rather than hangs.
        let _ = self
            .opened
            .wait_timeout_while(shut, Duration::from_secs(60), |s| *s)
            .unwrap();
    }

    fn set(&self, shut: bool) {
        *self.shut.lock().unwrap() = shut;
        self.opened.notify_all();
    }
}

#[test]
fn a_queue_stops_only_once_its_requests_are_returned() {
    let latch = Arc::new(Latch::default());
    let entered = Arc::new(AtomicUsize::new(0));
    let (held, seen) = (Arc::clone(&latch), Arc::clone(&entered));
    // Served over the store itself (no write-back layer): a WRITE commits
    // before its reply, so the latch holds it in the device.
    let store = Hooked::new(Arc::new(MemStore::new(64 << 20)), "held").before_commit(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        held.wait();
        Ok(())
    });
    let mut kit = Kit::start_on("stop-waits", Arc::new(store));
    kit.init();
    let (nodeid, fh) = kit.create("f");
    latch.set(true);
    let before = entered.load(Ordering::SeqCst);
    let idx = kit.post_write(nodeid, fh, b"held in the store's commit");
    let reached = wait_until(Duration::from_secs(30), Duration::from_millis(1), || {
        entered.load(Ordering::SeqCst) > before
    });
    assert!(
        reached.is_some(),
        "the WRITE's commit reached no store in 30 s"
    );
    assert_ne!(
        kit.used_idx(),
        idx,
        "the WRITE returned with its commit held"
    );

    let frontend = kit.frontend().clone();
    let (stopped_tx, stopped) = mpsc::channel();
    let stopper = std::thread::spawn(move || {
        let base = frontend.get_vring_base(QUEUE);
        stopped_tx.send(base.map_err(|e| e.to_string())).unwrap();
    });
    // The stop cannot answer before the latch opens below, whatever the
    // timing: the WRITE is still out.
    assert!(
        stopped.recv_timeout(Duration::from_millis(300)).is_err(),
        "GET_VRING_BASE answered with a request still being served"
    );
    latch.set(false);
    let base = stopped
        .recv_timeout(Duration::from_secs(30))
        .expect("GET_VRING_BASE answered once the request was back")
        .expect("GET_VRING_BASE");
    stopper.join().unwrap();
    assert_eq!(kit.used_idx(), idx, "the WRITE's reply is in the used ring");
    assert_eq!(base, u32::from(idx), "the queue stopped after the WRITE");
}
