//! A virtqueue that knows the descriptor chains it has handed out and not
//! returned yet, so that stopping it waits for them.
//!
//! QEMU stops a queue with `GET_VRING_BASE` (vm stop, reset, and the stop
//! of a live migration), takes the used index from guest memory right
//! after the reply, and stops the dirty log after the last queue: a chain
//! returned later writes a used-ring entry QEMU never sees and, under a
//! migration, one the destination's guest never gets (its request hangs
//! there for good; the destination's queue starts past it). virtiofsd
//! serves a queue's chains under the queue's lock, so the stop waits for
//! them; here chains run on the pool and on the queue thread with the lock
//! released, so [`TrackedVring::set_queue_ready`]`(false)` waits, bounded
//! by [`STOP_WAIT`], until every chain taken from the queue is back. The
//! queue thread counts a chain ([`TrackedVring::take`]) before it lets the
//! queue's lock go, and the stop takes that lock first: no chain popped
//! before the stop escapes its count.
//!
//! The rings of one connection also tell the device when the last of them
//! stopped and when one starts again ([`RingWatch`]): a live migration's
//! source lets its volume go while QEMU finishes the migration's last pass
//! (`migrate.rs`). `VhostUserDaemon::new` builds the rings through
//! [`VringT::new`], which takes no argument of ours, so the watch reaches
//! them through [`watched`].

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};
use vm_memory::GuestAddressSpace;

use super::outstanding::Outstanding;

/// How long stopping a queue waits for its chains still being served (a
/// WRITE waiting for room in the write-back layer, an fsync for the
/// store): past it the queue stops anyway and says how many it left.
pub const STOP_WAIT: Duration = Duration::from_secs(30);

/// One chain taken from a [`TrackedVring`]: held until its reply is in the
/// used ring and the guest is signalled, then dropped.
pub struct Taken(Arc<Outstanding>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.done();
    }
}

/// What the rings of a connection tell its device ([`RingWatch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingChange {
    /// A ring is about to start (before it takes a chain).
    Starting,
    /// The last running ring stopped, every chain taken from it back.
    AllStopped,
}

/// The rings of one connection, counted as they start and stop, and what
/// to do when one starts or the last one stops.
pub struct RingWatch {
    running: Mutex<usize>,
    on_change: Box<dyn Fn(RingChange) + Send + Sync>,
}

impl RingWatch {
    /// A watch calling `on_change` (on the thread that starts or stops the
    /// ring: the vhost-user message loop, which waits for it).
    pub fn new(on_change: impl Fn(RingChange) + Send + Sync + 'static) -> Arc<RingWatch> {
        Arc::new(RingWatch {
            running: Mutex::new(0),
            on_change: Box::new(on_change),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, usize> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn starting(&self) {
        (self.on_change)(RingChange::Starting);
        *self.running() += 1;
    }

    fn stopped(&self) {
        let last = {
            let mut n = self.running();
            *n = n.saturating_sub(1);
            *n == 0
        };
        if last {
            (self.on_change)(RingChange::AllStopped);
        }
    }
}

thread_local! {
    /// The watch of the rings being built on this thread ([`watched`]).
    static BUILDING: RefCell<Option<Arc<RingWatch>>> = const { RefCell::new(None) };
}

/// Run `build` with the rings it builds ([`VringT::new`]) reporting to
/// `watch`: `VhostUserDaemon::new`, which builds a connection's rings.
pub fn watched<T>(watch: &Arc<RingWatch>, build: impl FnOnce() -> T) -> T {
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            BUILDING.with(|b| b.borrow_mut().take());
        }
    }
    BUILDING.with(|b| *b.borrow_mut() = Some(Arc::clone(watch)));
    let _unset = Unset;
    build()
}

/// [`VringRwLock`], plus the count of chains taken from it and not back,
/// and the watch it reports its starts and stops to.
pub struct TrackedVring<M: GuestAddressSpace> {
    inner: VringRwLock<M>,
    out: Arc<Outstanding>,
    watch: Option<Arc<RingWatch>>,
}

impl<M: GuestAddressSpace> Clone for TrackedVring<M> {
    fn clone(&self) -> Self {
        TrackedVring {
            inner: self.inner.clone(),
            out: Arc::clone(&self.out),
            watch: self.watch.clone(),
        }
    }
}

impl<M: GuestAddressSpace> TrackedVring<M> {
    /// Count one chain just taken from the queue; drop the token once it
    /// is returned (or given up).
    pub fn take(&self) -> Taken {
        self.out.add();
        Taken(Arc::clone(&self.out))
    }

    /// Chains taken and not returned (tests, logs).
    pub fn outstanding(&self) -> usize {
        self.out.get()
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for TrackedVring<M> {
    type G = RwLockReadGuard<'a, VringState<M>>;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for TrackedVring<M> {
    type G = RwLockWriteGuard<'a, VringState<M>>;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for TrackedVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(TrackedVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            out: Arc::default(),
            watch: BUILDING.with(|b| b.borrow().clone()),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    /// Stopping (`ready` false) takes no more chains, then waits for those
    /// taken to be returned ([`STOP_WAIT`] at most), so that their replies
    /// are in the used ring, and in the dirty log, before the reply to
    /// `GET_VRING_BASE`. Starting and stopping are reported to the watch.
    fn set_queue_ready(&self, ready: bool) {
        let was = self.inner.get_ref().get_queue().ready();
        let watch = self.watch.as_deref().filter(|_| was != ready);
        if ready {
            if let Some(w) = watch {
                w.starting();
            }
            self.inner.set_queue_ready(true);
            return;
        }
        self.inner.set_queue_ready(false);
        let (out, started) = (self.outstanding(), Instant::now());
        let left = self.out.wait_zero(STOP_WAIT);
        if out > 0 && left == 0 {
            tracing::info!(
                chains = out,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "a queue stop waited for the requests still being served"
            );
        }
        if left > 0 {
            tracing::error!(
                chains = left,
                "a queue stopped with requests still being served after {STOP_WAIT:?}; their replies may never reach the guest"
            );
        }
        if let Some(w) = watch {
            w.stopped();
        }
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    fn vring() -> TrackedVring<GuestMemoryAtomic<GuestMemoryMmap>> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        TrackedVring::new(GuestMemoryAtomic::new(mem), 16).unwrap()
    }

    /// A stop waits for the chain still out, and returns once it is back.
    #[test]
    fn a_stop_waits_for_the_chains_still_out() {
        let v = vring();
        let taken = v.take();
        let stopper = v.clone();
        let (stopped_tx, stopped) = mpsc::channel();
        let t = std::thread::spawn(move || {
            stopper.set_queue_ready(false);
            stopped_tx.send(()).unwrap();
        });
        // The stop is held while the chain is out (a latch, not a delay:
        // it cannot return before the token is dropped below).
        assert!(stopped.recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(v.outstanding(), 1);
        drop(taken);
        stopped.recv_timeout(STOP_WAIT).expect("the stop returned");
        t.join().unwrap();
        assert_eq!(v.outstanding(), 0);
    }

    /// Rings built under [`watched`] report their starts, and the stop of
    /// the last one running, once each; rings built outside report nothing.
    #[test]
    fn the_watch_hears_of_starts_and_of_the_last_stop() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&heard);
        let watch = RingWatch::new(move |c| log.lock().unwrap().push(c));
        let (a, b) = watched(&watch, || (vring(), vring()));
        let outside = vring();
        let took = || std::mem::take(&mut *heard.lock().unwrap());
        use RingChange::{AllStopped, Starting};
        a.set_queue_ready(true);
        b.set_queue_ready(true);
        a.set_queue_ready(true);
        outside.set_queue_ready(true);
        assert_eq!(took(), [Starting, Starting]);
        a.set_queue_ready(false);
        assert_eq!(took(), [], "one ring still runs");
        b.set_queue_ready(false);
        b.set_queue_ready(false);
        outside.set_queue_ready(false);
        assert_eq!(took(), [AllStopped]);
        b.clone().set_queue_ready(true);
        b.set_queue_ready(false);
        assert_eq!(took(), [Starting, AllStopped]);
    }

    /// The wait is bounded: it gives up and reports what is still out.
    #[test]
    fn a_stop_gives_up_after_its_bound() {
        let v = vring();
        let _taken = v.take();
        assert_eq!(v.out.wait_zero(Duration::from_millis(20)), 1);
        let _second = v.take();
        assert_eq!(v.outstanding(), 2);
    }
}
