//! One descriptor chain in, one FUSE reply out: maps the chain's buffers,
//! answers FUSE_SYNCFS itself (fuse-backend-rs 0.14 does not know opcode 50
//! and would answer ENOSYS, which Linux takes as "nothing to sync"), and
//! hands every other request to the fuse-backend-rs [`Server`].
//!
//! Whatever the guest puts in a chain, the request is answered where a reply
//! can be written: a chain whose buffers do not map, or a request the server
//! cannot decode, gets an EIO reply in its first writable buffer when the
//! request header can be read. Only a chain with no usable header or no
//! writable buffer of a reply header's size (FORGET needs none) goes back
//! unanswered. Guest faults are counted and logged at most once per
//! [`FAULT_LOG_INTERVAL`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use tracing::warn;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryLoadGuard, GuestMemoryMmap};

use crate::fs::PohmelFs;
use crate::metrics::Metrics;

/// FUSE_SYNCFS (Linux 5.14): make the whole filesystem durable. Its body is
/// `struct fuse_syncfs_in { u64 padding; }`, its reply a bare header.
pub const FUSE_SYNCFS: u32 = 50;

/// The length of `struct fuse_syncfs_in`.
const SYNCFS_IN_LEN: usize = 8;

/// At most one log line per kind of guest fault in this interval; the lines
/// in between are counted and reported with the next one.
pub const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(1);

type Mem = GuestMemoryMmap<()>;
pub type Chain = DescriptorChain<GuestMemoryLoadGuard<Mem>>;

/// Answers the requests of every connection of one daemon.
pub struct Requests {
    server: Server<Arc<PohmelFs>>,
    fs: Arc<PohmelFs>,
    metrics: Arc<Metrics>,
    unmappable_log: LogLimit,
    undecodable_log: LogLimit,
}

impl Requests {
    pub fn new(fs: Arc<PohmelFs>, metrics: Arc<Metrics>) -> Requests {
        Requests {
            server: Server::new(Arc::clone(&fs)),
            fs,
            metrics,
            unmappable_log: LogLimit::default(),
            undecodable_log: LogLimit::default(),
        }
    }

    /// Decode and answer the FUSE request in `chain`; the number of bytes
    /// written into the guest's buffers.
    pub fn serve(&self, chain: &Chain, queue: usize) -> u32 {
        let mem = chain.memory();
        let mapped = Reader::from_descriptor_chain(mem, chain.clone())
            .and_then(|r| Ok((r, VirtioFsWriter::new(mem, chain.clone())?)));
        let (reader, writer) = match mapped {
            Ok(rw) => rw,
            Err(e) => {
                self.metrics.chains_malformed.inc();
                let header = first_header(chain);
                let used = header.map_or(0, |h| reply_in_place(chain, h.unique, libc::EIO));
                if let Some(suppressed) = self.unmappable_log.allow() {
                    warn!(
                        queue,
                        opcode = header.map(|h| h.opcode),
                        answered = used > 0,
                        suppressed,
                        error = %e,
                        "descriptor chain does not map; answered EIO where a reply fits"
                    );
                }
                return used;
            }
        };
        let header = peek_in_header(chain);
        if let Some(h) = header.filter(|h| h.opcode == FUSE_SYNCFS) {
            return self.syncfs(reader, writer, h);
        }
        // Where the reply header lands, to tell afterwards whether the server
        // replied at all.
        let reply_addr = chain.clone().writable().next().map(|d| d.addr());
        match self
            .server
            .handle_message(reader, writer.into(), None, None)
        {
            Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
            Err(e) => {
                self.metrics.fuse_decode_errors.inc();
                if let Some(suppressed) = self.undecodable_log.allow() {
                    warn!(queue, opcode = header.map(|h| h.opcode), suppressed, error = %e, "could not serve FUSE request");
                }
                let (Some(h), Some(addr)) = (header, reply_addr) else {
                    return 0;
                };
                match mem.read_obj::<OutHeader>(addr) {
                    // The server answered before it failed: keep its answer.
                    Ok(out) if out.unique == h.unique && h.unique != 0 => out.len,
                    // Otherwise answer EIO, so the guest's request completes.
                    _ => reply_in_place(chain, h.unique, libc::EIO),
                }
            }
        }
    }

    /// FUSE_SYNCFS: wait until everything written so far is durable; an
    /// error becomes the reply's errno.
    fn syncfs(
        &self,
        mut reader: Reader<'_, ()>,
        mut writer: VirtioFsWriter<'_, ()>,
        h: InHeader,
    ) -> u32 {
        let body_ok = reader.read_obj::<InHeader>().is_ok()
            && h.len as usize >= std::mem::size_of::<InHeader>() + SYNCFS_IN_LEN
            && reader.read_obj::<u64>().is_ok();
        let errno = if body_ok {
            match self.fs.syncfs() {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
            }
        } else {
            self.metrics.fuse_decode_errors.inc();
            libc::EINVAL
        };
        let out = out_header(h.unique, errno);
        match writer.write_obj(out) {
            Ok(()) => out.len,
            Err(e) => {
                warn!(error = %e, "could not write the SYNCFS reply");
                0
            }
        }
    }
}

/// The FUSE header at the start of the chain's readable buffers, if whole.
fn peek_in_header(chain: &Chain) -> Option<InHeader> {
    let mut r = Reader::from_descriptor_chain(chain.memory(), chain.clone()).ok()?;
    r.read_obj::<InHeader>().ok()
}

/// The FUSE header read straight from the first readable descriptor, for a
/// chain whose other buffers may not map (Linux puts the header in a
/// descriptor of its own).
fn first_header(chain: &Chain) -> Option<InHeader> {
    let desc = chain.clone().readable().next()?;
    if (desc.len() as usize) < std::mem::size_of::<InHeader>() {
        return None;
    }
    chain.memory().read_obj::<InHeader>(desc.addr()).ok()
}

fn out_header(unique: u64, errno: i32) -> OutHeader {
    OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    }
}

/// Write a bare error reply straight into the chain's first writable
/// descriptor, when it maps and a header fits; the bytes written.
fn reply_in_place(chain: &Chain, unique: u64, errno: i32) -> u32 {
    let Some(desc) = chain.clone().writable().next() else {
        return 0;
    };
    let out = out_header(unique, errno);
    if desc.len() < out.len {
        return 0;
    }
    match chain.memory().write_obj(out, desc.addr()) {
        Ok(()) => out.len,
        Err(_) => 0,
    }
}

/// Lets one log line through per [`FAULT_LOG_INTERVAL`] and counts the rest.
struct LogLimit {
    start: Instant,
    /// When the next line may go, in milliseconds since `start`.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> LogLimit {
        LogLimit {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl LogLimit {
    /// `Some(lines suppressed since the last one)` when a line may be logged.
    fn allow(&self) -> Option<u64> {
        let now_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next_ms = self.next_ms.load(Ordering::Relaxed);
        let interval_ms = FAULT_LOG_INTERVAL.as_millis() as u64;
        if now_ms < next_ms
            || self
                .next_ms
                .compare_exchange(
                    next_ms,
                    now_ms + interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::FsConfig;
    use crate::store::mem::MemStore;
    use crate::store::sink::{EngineSink, SendError, SendFuture, Sink};
    use crate::store::{Store, Txn, ROOT_INO};
    use crate::txn::{TxnConfig, WritebackStore};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

    const MEM_BYTES: u64 = 1 << 20;
    const DESC_TABLE: u64 = 0x1000;
    const AVAIL_RING: u64 = 0x2000;
    const USED_RING: u64 = 0x3000;
    const REQUEST: u64 = 0x10000;
    const REPLY: u64 = 0x20000;
    /// Past the end of guest memory: a buffer there does not map.
    const NOWHERE: u64 = MEM_BYTES + 0x10000;
    const OUT_LEN: u32 = std::mem::size_of::<OutHeader>() as u32;

    fn guest_memory() -> GuestMemoryAtomic<Mem> {
        GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap(),
        )
    }

    /// The chain of buffers `(address, length, device-writable)` as a guest
    /// posts it on a fresh split queue.
    fn post(mem: &GuestMemoryAtomic<Mem>, bufs: &[(u64, u32, bool)]) -> Chain {
        let m = mem.memory();
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = Descriptor::new(addr, len, flags as u16, (i + 1) as u16);
            m.write_obj(desc, GuestAddress(DESC_TABLE + 16 * i as u64))
                .unwrap();
        }
        // avail ring: flags, idx = 1, ring[0] = head 0.
        m.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
        m.write_obj(1u16, GuestAddress(AVAIL_RING + 2)).unwrap();
        m.write_obj(0u16, GuestAddress(AVAIL_RING + 4)).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        q.pop_descriptor_chain(mem.memory()).unwrap()
    }

    /// A SYNCFS request at [`REQUEST`] (header and body) with `unique`.
    fn write_syncfs(mem: &GuestMemoryAtomic<Mem>, unique: u64) -> u32 {
        let len = (std::mem::size_of::<InHeader>() + SYNCFS_IN_LEN) as u32;
        let h = InHeader {
            len,
            opcode: FUSE_SYNCFS,
            unique,
            nodeid: ROOT_INO,
            ..InHeader::default()
        };
        mem.memory().write_obj(h, GuestAddress(REQUEST)).unwrap();
        mem.memory()
            .write_obj(0u64, GuestAddress(REQUEST + 40))
            .unwrap();
        len
    }

    fn reply(mem: &GuestMemoryAtomic<Mem>) -> OutHeader {
        mem.memory().read_obj(GuestAddress(REPLY)).unwrap()
    }

    /// A filesystem over the write-back layer with `sink`; metadata lingers
    /// for an hour unless something syncs it.
    fn lingering_fs(store: Arc<MemStore>, sink: Arc<dyn Sink>, cfg: TxnConfig) -> Requests {
        let metrics = Arc::new(Metrics::default());
        let cfg = TxnConfig {
            meta_linger: Duration::from_secs(3600),
            ..cfg
        };
        let wb = WritebackStore::new(cfg, store, sink, Arc::clone(&metrics)).unwrap();
        let fs = PohmelFs::new(Arc::new(wb), FsConfig::default(), Arc::clone(&metrics)).unwrap();
        Requests::new(Arc::new(fs), metrics)
    }

    #[test]
    fn syncfs_makes_every_pending_transaction_durable() {
        let store = Arc::new(MemStore::new(1 << 20));
        let sink = Arc::new(EngineSink::new(store.clone()).unwrap());
        let requests = lingering_fs(store.clone(), sink, TxnConfig::default());
        // The root directory's creation waits in the layer.
        assert!(store.get_inode(ROOT_INO).unwrap().is_none());

        let mem = guest_memory();
        let len = write_syncfs(&mem, 7);
        let chain = post(&mem, &[(REQUEST, len, false), (REPLY, OUT_LEN, true)]);
        assert_eq!(requests.serve(&chain, 1), OUT_LEN);
        let out = reply(&mem);
        assert_eq!((out.len, out.error, out.unique), (OUT_LEN, 0, 7));
        assert!(store.get_inode(ROOT_INO).unwrap().is_some());
        assert_eq!(requests.metrics.fsync_calls.get(), 1);
    }

    /// A store that never acknowledges anything.
    struct Unreachable;

    impl Sink for Unreachable {
        fn servers(&self) -> usize {
            1
        }
        fn server_name(&self, _server: usize) -> String {
            "unreachable".into()
        }
        fn session(&self) -> u64 {
            1
        }
        fn send(&self, _server: usize, _id: u64, _low: u64, _txn: Txn) -> SendFuture<'_> {
            Box::pin(async { Err(SendError::Retry("unreachable".into())) })
        }
    }

    #[test]
    fn a_failed_syncfs_is_an_errno_reply() {
        let cfg = TxnConfig {
            fsync_timeout: Duration::from_millis(50),
            ..TxnConfig::default()
        };
        let requests = lingering_fs(Arc::new(MemStore::new(1 << 20)), Arc::new(Unreachable), cfg);
        let mem = guest_memory();
        let len = write_syncfs(&mem, 8);
        let chain = post(&mem, &[(REQUEST, len, false), (REPLY, OUT_LEN, true)]);
        assert_eq!(requests.serve(&chain, 1), OUT_LEN);
        let out = reply(&mem);
        assert_eq!((out.error, out.unique), (-libc::EIO, 8));
        assert_eq!(requests.metrics.fs_internal_errors.get(), 1);
    }

    #[test]
    fn a_short_syncfs_is_einval() {
        let store = Arc::new(MemStore::new(1 << 20));
        let sink = Arc::new(EngineSink::new(store.clone()).unwrap());
        let requests = lingering_fs(store.clone(), sink, TxnConfig::default());
        let mem = guest_memory();
        write_syncfs(&mem, 9);
        let header_only = std::mem::size_of::<InHeader>() as u32;
        let chain = post(
            &mem,
            &[(REQUEST, header_only, false), (REPLY, OUT_LEN, true)],
        );
        assert_eq!(requests.serve(&chain, 1), OUT_LEN);
        assert_eq!(reply(&mem).error, -libc::EINVAL);
        assert!(store.get_inode(ROOT_INO).unwrap().is_none());
    }

    fn plain_fs() -> Requests {
        let metrics = Arc::new(Metrics::default());
        let fs = PohmelFs::new(
            Arc::new(MemStore::new(1 << 20)),
            FsConfig::default(),
            Arc::clone(&metrics),
        )
        .unwrap();
        Requests::new(Arc::new(fs), metrics)
    }

    #[test]
    fn an_unmappable_chain_is_answered_eio_where_a_reply_fits() {
        let requests = plain_fs();
        let mem = guest_memory();
        let len = write_syncfs(&mem, 11);
        // The header maps, the rest of the request does not.
        let chain = post(
            &mem,
            &[
                (REQUEST, 40, false),
                (NOWHERE, len - 40, false),
                (REPLY, OUT_LEN, true),
            ],
        );
        assert_eq!(requests.serve(&chain, 1), OUT_LEN);
        let out = reply(&mem);
        assert_eq!((out.len, out.error, out.unique), (OUT_LEN, -libc::EIO, 11));
        assert_eq!(requests.metrics.chains_malformed.get(), 1);

        // The reply buffer does not map: nothing can be written.
        let chain = post(&mem, &[(REQUEST, len, false), (NOWHERE, OUT_LEN, true)]);
        assert_eq!(requests.serve(&chain, 1), 0);
        // No header to answer: returned unanswered.
        mem.memory()
            .write_obj(OutHeader::default(), GuestAddress(REPLY))
            .unwrap();
        let chain = post(&mem, &[(NOWHERE, len, false), (REPLY, OUT_LEN, true)]);
        assert_eq!(requests.serve(&chain, 1), 0);
        assert_eq!(reply(&mem).unique, 0);
        // A reply buffer too small for a header.
        let chain = post(
            &mem,
            &[(REQUEST, 40, false), (NOWHERE, 8, false), (REPLY, 8, true)],
        );
        assert_eq!(requests.serve(&chain, 1), 0);
        assert_eq!(requests.metrics.chains_malformed.get(), 4);
    }

    #[test]
    fn fault_log_lines_are_limited_and_counted() {
        let limit = LogLimit::default();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        limit.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limit.allow(), Some(2));
    }
}
