//! The vhost-user-fs backend of one frontend connection: features, device
//! config (the tag), guest memory, and the virtqueue event loop that hands
//! descriptor chains to the worker pool.
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT); queues 1.. are request
//! queues, as many as the frontend enables (MQ). With EVENT_IDX the queue is
//! drained with the disable / process / enable loop so no kick is missed.
//!
//! It must never return an error from `handle_event` for anything a guest
//! can cause: vhost-user-backend stops the queue thread on error. What a
//! guest or VMM can repeat at will (kicks, ring faults) is logged through
//! the per-call-site limit of [`crate::ratelimit`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::migrate::Transfer;
use super::pool::WorkerPool;
use super::request::{Chain, DirtyLog, Mem, Requests};
use super::vring::{RingChange, RingWatch, Taken, TrackedVring};
use crate::metrics::Metrics;
use crate::ratelimit::limited;

/// The longest tag virtio-fs carries in its config space.
pub const TAG_MAX: usize = 36;

/// Index of the hiprio queue.
const HIPRIO_QUEUE: usize = 0;

/// Counts the chains it hands out, so that a stop waits for them (`vring.rs`).
type Vring = TrackedVring<GuestMemoryAtomic<Mem>>;

/// Settings of the device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The mount tag, served through the device config space.
    pub tag: Option<String>,
    /// Request queues offered (in addition to the hiprio queue).
    pub request_queues: usize,
    /// Descriptors per queue at most.
    pub queue_size: usize,
    /// The volume's reads never wait on a network (`file://`, `mem:`).
    /// What does not wait is served on the queue thread, as virtiofsd
    /// serves everything, instead of being handed to the pool: a hand-off
    /// costs more than such a request (`device::inline_bench`). On a local
    /// volume that is every read, lookup, and write, metadata change and
    /// close while the layer would not make it wait; on another, only what
    /// the layer answers from memory (`Requests::is_cheap`), since a read
    /// that waits for the network would stall its queue.
    pub local_volume: bool,
}

/// The backend of one frontend connection.
pub struct FsBackend {
    cfg: DeviceConfig,
    requests: Arc<Requests>,
    pool: Arc<WorkerPool>,
    metrics: Arc<Metrics>,
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    event_idx: AtomicBool,
    /// Whether the frontend has dirty logging on (`VHOST_F_LOG_ALL`):
    /// QEMU turns it on when a live migration begins.
    logging: Arc<AtomicBool>,
    /// A live migration's device state transfer (`migrate.rs`).
    transfer: Arc<Transfer>,
    /// The connection's rings: the last one's stop with logging on is the
    /// migration's, and lets the volume go early.
    rings: Arc<RingWatch>,
}

impl FsBackend {
    pub fn new(
        cfg: DeviceConfig,
        requests: Arc<Requests>,
        pool: Arc<WorkerPool>,
        metrics: Arc<Metrics>,
    ) -> FsBackend {
        let logging = Arc::new(AtomicBool::new(false));
        let transfer = Arc::new(Transfer::default());
        let rings = RingWatch::new({
            let (logging, transfer) = (Arc::clone(&logging), Arc::clone(&transfer));
            let (fs, pool) = (Arc::clone(requests.fs()), Arc::clone(&pool));
            move |change| match change {
                RingChange::AllStopped if logging.load(Ordering::Acquire) => {
                    transfer.let_go_early(&fs, &pool)
                }
                RingChange::AllStopped => {}
                RingChange::Starting => transfer.settle_early(),
            }
        });
        FsBackend {
            cfg,
            requests,
            pool,
            metrics,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            logging,
            transfer,
            rings,
        }
    }

    /// The watch the connection's rings report to: build them under
    /// `vring::watched` with it.
    pub fn rings(&self) -> &Arc<RingWatch> {
        &self.rings
    }

    /// Whether a migration took this connection's guest session to
    /// another daemon (its state went out whole).
    pub fn handed_off(&self) -> bool {
        self.transfer.handed_off()
    }

    /// The virtio-fs config space: the tag, NUL-padded to 36 bytes, then the
    /// number of request queues (little endian).
    fn config_space(&self) -> [u8; TAG_MAX + 4] {
        let mut cfg = [0u8; TAG_MAX + 4];
        if let Some(tag) = &self.cfg.tag {
            let n = tag.len().min(TAG_MAX);
            cfg[..n].copy_from_slice(&tag.as_bytes()[..n]);
        }
        let queues = u32::try_from(self.cfg.request_queues).unwrap_or(u32::MAX);
        cfg[TAG_MAX..].copy_from_slice(&queues.to_le_bytes());
        cfg
    }

    /// Take every available chain off `vring` and hand it to the pool.
    fn process_queue(&self, queue: usize, vring: &Vring) {
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            limited!(
                self.metrics.log_lines_suppressed,
                WARN,
                queue,
                "kick before the guest memory table; ignored"
            );
            return;
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    limited!(
                        self.metrics.log_lines_suppressed,
                        WARN,
                        queue,
                        error = %e,
                        "could not disable queue notifications"
                    );
                }
            }
            loop {
                let (chain, taken) = {
                    let mut state = vring.get_mut();
                    let q = state.get_queue_mut();
                    if !q.ready() {
                        // Stopped (`GET_VRING_BASE`): what is left stays
                        // in the ring for the next start.
                        return;
                    }
                    match q.pop_descriptor_chain(mem.memory()) {
                        // Counted before the queue's lock goes, so a stop,
                        // which takes the lock, always sees it.
                        Some(chain) => (chain, vring.take()),
                        None => break,
                    }
                };
                self.metrics.chains.inc();
                let requests = Arc::clone(&self.requests);
                let vring = vring.clone();
                let inline = self.requests.is_cheap(&chain, self.cfg.local_volume);
                self.route(inline, move || {
                    complete(&requests, &vring, chain, queue, event_idx, taken)
                });
            }
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                // More chains arrived while notifications were off.
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    limited!(
                        self.metrics.log_lines_suppressed,
                        WARN,
                        queue,
                        error = %e,
                        "could not enable queue notifications"
                    );
                    break;
                }
            }
        }
    }
}

impl FsBackend {
    /// Run a chain's service here (`inline`) or on the pool.
    fn route(&self, inline: bool, serve: impl FnOnce() + Send + 'static) {
        if inline {
            self.metrics.requests_inline.inc();
            serve();
        } else {
            self.pool.submit(serve);
        }
    }
}

/// Serve one chain and return it to the guest with the bytes written;
/// `taken` goes once the guest has it (or it could not be returned).
fn complete(
    requests: &Requests,
    vring: &Vring,
    chain: Chain,
    queue: usize,
    event_idx: bool,
    // Dropped on return, after the used ring and the signal.
    _taken: Taken,
) {
    let head = chain.head_index();
    let used_len = requests.serve(&chain, queue);
    if let Err(e) = vring.add_used(head, used_len) {
        limited!(
            requests.metrics().log_lines_suppressed,
            WARN,
            queue,
            head,
            error = %e,
            "could not return a descriptor chain to the guest"
        );
        return;
    }
    let notify = !event_idx || vring.needs_notification().unwrap_or(true);
    if notify {
        if let Err(e) = vring.signal_used_queue() {
            limited!(
                requests.metrics().log_lines_suppressed,
                WARN,
                queue,
                error = %e,
                "could not signal the guest"
            );
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1 + self.cfg.request_queues
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty-page logging for live migration: the regions' bitmaps
            // (`request::DirtyLog`) mark every page the device writes once
            // the frontend has sent the log (LOG_SHMFD).
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE;
        // Offer the config space only with a tag to serve: QEMU brings its
        // own tag and warns about a CONFIG it does not use.
        if self.cfg.tag.is_some() {
            base | VhostUserProtocolFeatures::CONFIG
        } else {
            base
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// Dirty logging turned on means a live migration began: the volume
    /// will be let go at its stop, so the engine starts flushing now
    /// rather than with the guest stopped (`PohmelFs::prepare_release`).
    fn acked_features(&self, features: u64) {
        let on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if on && !self.logging.swap(true, Ordering::AcqRel) {
            info!("migration: dirty logging on; flushing the volume ahead of the hand-over");
            self.requests.fs().prepare_release();
        } else if !on {
            self.logging.store(false, Ordering::Release);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: std::fs::File,
    ) -> std::io::Result<Option<std::fs::File>> {
        self.transfer
            .start(direction, phase, file, self.requests.fs(), &self.pool)
            .map(|()| None)
    }

    fn check_device_state(&self) -> std::io::Result<()> {
        self.transfer.check(self.requests.fs())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> std::io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| warn!(error = %e, "could not create the queue thread's exit event"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            debug!(device_event, ?evset, "ignoring queue event");
            return Ok(());
        }
        let queue = device_event as usize;
        match vrings.get(queue) {
            Some(vring) => {
                if queue == HIPRIO_QUEUE {
                    debug!("hiprio kick");
                }
                self.process_queue(queue, vring);
            }
            None => limited!(
                self.metrics.log_lines_suppressed,
                WARN,
                queue,
                "event for a queue that does not exist"
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::request::READ_FROM_MEMORY_MAX;
    use crate::device::testkit::served_fs;
    use vm_memory::{Bytes, GuestAddress};

    fn backend(tag: Option<&str>) -> FsBackend {
        let (requests, metrics) = served_fs();
        FsBackend::new(
            DeviceConfig {
                tag: tag.map(str::to_string),
                request_queues: 2,
                queue_size: 1024,
                local_volume: true,
            },
            Arc::new(requests),
            Arc::new(WorkerPool::new(1, 4, Arc::clone(&metrics)).unwrap()),
            metrics,
        )
    }

    /// A GETATTR is answered while the pool's only worker is blocked (a
    /// READ, or a WRITE or metadata change with room, would be too); a sync
    /// waits for the worker.
    #[test]
    fn cheap_requests_are_served_on_the_queue_thread() {
        use crate::device::testkit::{
            guest_memory, header, post, reply, write_request, REPLY, REQUEST,
        };
        use std::sync::mpsc::channel;
        use std::time::Duration;
        let b = backend(None);
        let (release, blocked) = channel::<()>();
        b.pool.submit(move || {
            let _ = blocked.recv();
        });
        let mem = guest_memory();
        let getattr = |unique| {
            let len = write_request(&mem, header(56, 3, unique), &[0u8; 16]);
            post(&mem, &[(REQUEST, len, false), (REPLY, 256, true)])
        };
        let (done, answered) = channel();
        let chain = getattr(7);
        let cheap = b.requests.is_cheap(&chain, b.cfg.local_volume);
        let (requests, d) = (Arc::clone(&b.requests), done.clone());
        b.route(cheap, move || d.send(requests.serve(&chain, 1)).unwrap());
        let used = answered.recv_timeout(Duration::from_secs(30));
        assert!(used.is_ok_and(|n| n > 16), "GETATTR waited for the pool");
        assert_eq!((reply(&mem).error, reply(&mem).unique), (0, 7));
        assert_eq!(b.metrics.requests_inline.get(), 1);
        // A READ (15) is served here too, and so are a WRITE (16), a
        // RENAME (12) and a FLUSH (25) while the store would not make them
        // wait (a bare store never does; the write-back layer's side:
        // writeback::tests). FSYNC (20), SETLKW (33) and FALLOCATE (43)
        // are not.
        for (opcode, cheap) in [
            (15, true),
            (16, true),
            (12, true),
            (25, true),
            (20, false),
            (33, false),
            (43, false),
        ] {
            let len = write_request(&mem, header(80, opcode, 9), &[0u8; 40]);
            let chain = post(&mem, &[(REQUEST, len, false), (REPLY, 256, true)]);
            assert_eq!(b.requests.is_cheap(&chain, true), cheap, "opcode {opcode}");
        }
        // On a volume that is not local, only what the layer answers from
        // memory (a bare store says it holds everything): GETATTR (3),
        // LOOKUP (1), READ, WRITE, CREATE (35), FLUSH, GETXATTR (22),
        // LISTXATTR (23); not READDIRPLUS (44), RENAME, OPEN (14) nor a
        // READ larger than the bound.
        for (opcode, size, cheap) in [
            (3, 0, true),
            (1, 0, true),
            (22, 0, true),
            (23, 0, true),
            (15, 4096, true),
            (15, READ_FROM_MEMORY_MAX + 1, false),
            (16, 4096, true),
            (35, 0, true),
            (25, 0, true),
            (44, 0, false),
            (12, 0, false),
            (14, 0, false),
        ] {
            let mut args = [0u8; 40];
            args[16..20].copy_from_slice(&size.to_le_bytes());
            let len = write_request(&mem, header(80, opcode, 9), &args);
            let chain = post(&mem, &[(REQUEST, len, false), (REPLY, 256, true)]);
            assert_eq!(b.requests.is_cheap(&chain, false), cheap, "opcode {opcode}");
        }
        // A WRITE as Linux lays it out: the header, its fuse_write_in and
        // the data each in a descriptor of their own. Its handle, offset
        // and size are found there; where the chain cuts them apart, they
        // are not, and the WRITE goes to the pool.
        let m = mem.memory();
        let mut write_in = [0u8; 40];
        write_in[16..20].copy_from_slice(&4096u32.to_le_bytes());
        m.write_slice(&write_in, GuestAddress(REQUEST + 0x100))
            .unwrap();
        write_request(&mem, header(40 + 40 + 4096, 16, 10), &[]);
        let split = |cut: u32| {
            post(
                &mem,
                &[
                    (REQUEST, 40, false),
                    (REQUEST + 0x100, cut, false),
                    (REQUEST + 0x100 + u64::from(cut), 40 - cut, false),
                    (REQUEST + 0x1000, 4096, false),
                    (REPLY, 256, true),
                ],
            )
        };
        assert!(
            b.requests.is_cheap(&split(40 - 1), true),
            "the size in one piece"
        );
        assert!(
            !b.requests.is_cheap(&split(18), true),
            "the arguments cut apart"
        );
        // FSYNC (20) is not cheap: it goes to the pool, behind the block.
        let len = write_request(&mem, header(56, 20, 8), &[0u8; 16]);
        let chain = post(&mem, &[(REQUEST, len, false), (REPLY, 256, true)]);
        assert!(!b.requests.is_cheap(&chain, true));
        let requests = Arc::clone(&b.requests);
        b.route(false, move || done.send(requests.serve(&chain, 1)).unwrap());
        release.send(()).unwrap();
        let used = answered.recv_timeout(Duration::from_secs(30));
        assert_eq!(used.ok(), Some(16), "a bare reply header");
        assert_eq!((reply(&mem).error, reply(&mem).unique), (0, 8));
        assert_eq!(b.metrics.requests_inline.get(), 1);
    }

    #[test]
    fn config_space_carries_the_tag_and_queue_count() {
        let b = backend(Some("myfs"));
        let cfg = b.get_config(0, 40);
        assert_eq!(&cfg[..4], b"myfs");
        assert!(cfg[4..36].iter().all(|&c| c == 0));
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 2);
        // Reads past the end are clipped, never a panic.
        assert_eq!(b.get_config(38, 100).len(), 2);
        assert!(b.get_config(1000, 4).is_empty());
        assert_eq!(b.num_queues(), 3);
    }
}
