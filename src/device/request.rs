//! One descriptor chain in, one FUSE reply out: checks the chain and the
//! request in it (`validate`), answers FUSE_SYNCFS itself (fuse-backend-rs
//! 0.14 does not know opcode 50 and would answer ENOSYS, which Linux takes
//! as "nothing to sync"), and hands every other request to the
//! fuse-backend-rs [`Server`].
//!
//! Whatever the guest puts in a chain, the request is answered where a reply
//! can be written: a malformed chain or request gets EINVAL (ENOSYS for an
//! opcode the daemon does not serve), a chain whose buffers do not map or a
//! request the server cannot decode gets EIO, each in the chain's first
//! writable buffer when the request header can be read. Only a chain with
//! no usable header or no writable buffer of a reply header's size (FORGET
//! needs none) goes back unanswered. Every such fault is counted, and
//! logged through the per-call-site limit of [`crate::ratelimit`].

use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemoryLoadGuard, GuestMemoryMmap};

use super::validate::{self, Invalid};
use crate::fs::PohmelFs;
use crate::metrics::Metrics;
use crate::ratelimit::{limited, Capped};
use crate::store::Demand;

/// FUSE_SYNCFS (Linux 5.14): make the whole filesystem durable. Its body is
/// `struct fuse_syncfs_in { u64 padding; }`, its reply a bare header.
pub const FUSE_SYNCFS: u32 = 50;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_READLINK: u32 = 5;
const FUSE_SYMLINK: u32 = 6;
const FUSE_MKNOD: u32 = 8;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_RENAME: u32 = 12;
const FUSE_LINK: u32 = 13;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_SETXATTR: u32 = 21;
const FUSE_GETXATTR: u32 = 22;
const FUSE_LISTXATTR: u32 = 23;
const FUSE_REMOVEXATTR: u32 = 24;
const FUSE_FLUSH: u32 = 25;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_ACCESS: u32 = 34;
const FUSE_CREATE: u32 = 35;
const FUSE_BATCH_FORGET: u32 = 42;
const FUSE_READDIRPLUS: u32 = 44;
const FUSE_RENAME2: u32 = 45;

/// The length of `struct fuse_syncfs_in`.
pub(super) const SYNCFS_IN_LEN: usize = 8;

/// Guest memory as the device maps it: each region carries the dirty-page
/// log of a live migration (`VHOST_F_LOG_ALL`, `LOG_SHMFD`), which is
/// empty until the frontend sends `SET_LOG_BASE`; every write into guest
/// memory (replies, `write_from` of file data, the used ring) marks the
/// pages it touches while it is set.
pub type Mem = GuestMemoryMmap<DirtyLog>;
/// The per-region dirty-page log (vhost-user-backend's bitmap over the
/// frontend's shared log).
pub type DirtyLog = vhost_user_backend::bitmap::BitmapMmapRegion;
pub type Chain = DescriptorChain<GuestMemoryLoadGuard<Mem>>;

/// Answers the requests of every connection of one daemon.
pub struct Requests {
    server: Server<Arc<PohmelFs>>,
    fs: Arc<PohmelFs>,
    metrics: Arc<Metrics>,
}

impl Requests {
    pub fn new(fs: Arc<PohmelFs>, metrics: Arc<Metrics>) -> Requests {
        Requests {
            server: Server::new(Arc::clone(&fs)),
            fs,
            metrics,
        }
    }

    /// The filesystem the requests go to.
    pub fn fs(&self) -> &Arc<PohmelFs> {
        &self.fs
    }

    /// The daemon's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether `chain` holds a request that is answered from memory or a
    /// local read or write and does not wait for the write-back layer
    /// (read from the header, and a write's size; `serve` checks it
    /// whole): what only reads (lookups, attributes, directories, xattrs,
    /// links, statfs), a WRITE the layer has room for now (under
    /// `--overwrite wait`, where no page it covers is pinned), a metadata
    /// change while the layer has room for it, a close that does not
    /// wait. Never a sync (FSYNC, FSYNCDIR, SYNCFS), a lock that may block
    /// (SETLKW), INIT or DESTROY, nor what is rare (FALLOCATE, LSEEK,
    /// COPY_FILE_RANGE, and the opcodes we refuse).
    ///
    /// On a volume that is not `local` (every store read a round trip),
    /// only what the write-back layer answers from memory: a lookup in,
    /// or a create or removal of an entry of, a directory whose every
    /// entry it holds; attributes it holds; the extended attributes of an
    /// inode it knows has none; a read of cached pages or of blocks the
    /// local read cache holds; a write, a forget or a close as above. A
    /// request that still reaches the store (a child's attributes trimmed
    /// since) holds up its queue for a round trip, never longer than the
    /// layer's bounded waits.
    pub fn is_cheap(&self, chain: &Chain, local: bool) -> bool {
        let store = self.fs.store();
        let Some(h) = first_header(chain) else {
            return false;
        };
        let known = |ino| store.would_not_wait(Demand::Attributes { ino });
        let listed = |dir| known(dir) && store.would_not_wait(Demand::Entries { dir });
        match h.opcode {
            FUSE_LOOKUP => local || listed(h.nodeid),
            FUSE_GETATTR => local || known(h.nodeid),
            FUSE_READ => {
                local
                    || write_args(chain).is_some_and(|r| {
                        r.size <= READ_FROM_MEMORY_MAX
                            && store.would_not_wait(Demand::Read {
                                ino: h.nodeid,
                                offset: r.offset,
                                len: u64::from(r.size),
                            })
                    })
            }
            // The kernel asks for `security.capability` before a write
            // that may have to drop it: answered from memory for a file
            // created in this session.
            FUSE_GETXATTR | FUSE_LISTXATTR => {
                local || (known(h.nodeid) && store.would_not_wait(Demand::Xattrs { ino: h.nodeid }))
            }
            FUSE_READLINK | FUSE_STATFS | FUSE_OPENDIR | FUSE_READDIR | FUSE_READDIRPLUS
            | FUSE_RELEASEDIR | FUSE_ACCESS => local,
            FUSE_WRITE => {
                (local || known(h.nodeid))
                    && write_args(chain).is_some_and(|w| {
                        store.would_not_wait(Demand::Write {
                            ino: h.nodeid,
                            offset: self.fs.write_offset(h.nodeid, w.fh, w.offset),
                            len: u64::from(w.size),
                        })
                    })
            }
            FUSE_SYMLINK | FUSE_MKNOD | FUSE_MKDIR | FUSE_UNLINK | FUSE_RMDIR | FUSE_CREATE => {
                (local || listed(h.nodeid)) && store.would_not_wait(Demand::Metadata)
            }
            // The last FORGET of an unlinked inode removes it.
            FUSE_FORGET | FUSE_BATCH_FORGET => store.would_not_wait(Demand::Metadata),
            // OPEN may truncate.
            FUSE_SETATTR | FUSE_RENAME | FUSE_RENAME2 | FUSE_LINK | FUSE_OPEN | FUSE_SETXATTR
            | FUSE_REMOVEXATTR => local && store.would_not_wait(Demand::Metadata),
            FUSE_FLUSH | FUSE_RELEASE => store.would_not_wait(Demand::Close),
            _ => false,
        }
    }

    /// Check, decode and answer the FUSE request in `chain`; the number of
    /// bytes written into the guest's buffers. Timed per opcode (the
    /// Prometheus endpoint's request histograms).
    pub fn serve(&self, chain: &Chain, queue: usize) -> u32 {
        let start = std::time::Instant::now();
        let (used, opcode) = self.serve_untimed(chain, queue);
        if let Some(opcode) = opcode {
            self.metrics
                .levels
                .requests
                .observe(opcode, start.elapsed());
        }
        used
    }

    /// As [`Requests::serve`], with the request's opcode where its header
    /// could be read. Each walk of the descriptor chain reads every
    /// descriptor from guest memory again: the chain is walked to check it
    /// and to map it, and once more only when something failed.
    fn serve_untimed(&self, chain: &Chain, queue: usize) -> (u32, Option<u32>) {
        if let Err(why) = validate::check_chain(chain) {
            let header = first_header(chain);
            return (
                self.refuse(chain, header, why, queue),
                header.map(|h| h.opcode),
            );
        }
        let mem = chain.memory();
        let mapped = Reader::from_descriptor_chain(mem, chain.clone())
            .and_then(|r| Ok((r, VirtioFsWriter::new(mem, chain.clone())?)));
        let (mut reader, writer) = match mapped {
            Ok(rw) => rw,
            Err(e) => {
                self.metrics.chains_malformed.inc();
                let header = first_header(chain);
                let used = header.map_or(0, |h| reply_in_place(chain, h.unique, libc::EIO));
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    queue,
                    opcode = header.map(|h| h.opcode),
                    answered = used > 0,
                    error = %Capped(&e),
                    "descriptor chain does not map; answered EIO where a reply fits"
                );
                return (used, header.map(|h| h.opcode));
            }
        };
        let h = match validate::check_request(&mut reader) {
            Ok(h) => h,
            Err((header, why)) => {
                return (
                    self.refuse(chain, header, why, queue),
                    header.map(|h| h.opcode),
                )
            }
        };
        (self.answer(chain, reader, writer, h, queue), Some(h.opcode))
    }

    /// Answer a checked request.
    fn answer(
        &self,
        chain: &Chain,
        reader: Reader<'_, DirtyLog>,
        writer: VirtioFsWriter<'_, DirtyLog>,
        h: InHeader,
        queue: usize,
    ) -> u32 {
        if !self.fs.volume_ready() {
            // Not open here (a migration's destination before its state,
            // or a source that could not take the volume back): logged
            // by the filesystem.
            return reply_in_place(chain, h.unique, libc::EIO);
        }
        // A handler that panics (a bug) must neither take the thread
        // serving the queue down (a chain served inline runs on it) nor
        // leave the guest's request unanswered: caught here, it is a
        // counter, a limited log line and EIO, as any failed request.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if h.opcode == FUSE_SYNCFS {
                return Ok(self.syncfs(writer, h));
            }
            self.server
                .handle_message(reader, writer.into(), None, None)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        }));
        match served {
            Ok(Ok(used)) => used,
            Ok(Err(e)) => {
                self.metrics.fuse_decode_errors.inc();
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    queue,
                    opcode = h.opcode,
                    error = %Capped(&e),
                    "could not serve FUSE request"
                );
                answered_or_eio(chain, h)
            }
            Err(_) => {
                self.metrics.request_panics.inc();
                limited!(
                    self.metrics.log_lines_suppressed,
                    ERROR,
                    queue,
                    opcode = h.opcode,
                    "a FUSE request handler panicked; answered EIO where no reply was written"
                );
                answered_or_eio(chain, h)
            }
        }
    }

    /// Answer a chain or request the checks refused: its errno where a reply
    /// fits, a counter, a limited log line.
    fn refuse(&self, chain: &Chain, header: Option<InHeader>, why: Invalid, queue: usize) -> u32 {
        let used = header.map_or(0, |h| reply_in_place(chain, h.unique, why.errno()));
        let opcode = header.map(|h| h.opcode);
        if let Invalid::Unsupported(_) = why {
            // Routine: Linux tries COPY_FILE_RANGE or TMPFILE once and falls
            // back when told ENOSYS.
            self.metrics.requests_unsupported.inc();
            limited!(
                self.metrics.log_lines_suppressed,
                DEBUG,
                queue,
                opcode,
                "answered ENOSYS to an opcode the daemon does not serve"
            );
        } else {
            self.metrics.requests_rejected.inc();
            limited!(
                self.metrics.log_lines_suppressed,
                WARN,
                queue,
                opcode,
                answered = used > 0,
                reason = %why,
                "refused a malformed FUSE request"
            );
        }
        used
    }

    /// FUSE_SYNCFS (already checked whole): wait until everything written so
    /// far is durable; an error becomes the reply's errno.
    fn syncfs(&self, mut writer: VirtioFsWriter<'_, DirtyLog>, h: InHeader) -> u32 {
        let errno = match self.fs.syncfs() {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
        };
        let out = out_header(h.unique, errno);
        match writer.write_obj(out) {
            Ok(()) => out.len,
            Err(e) => {
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    error = %e,
                    "could not write the SYNCFS reply"
                );
                0
            }
        }
    }
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

/// The head of a WRITE's `fuse_write_in`.
struct WriteArgs {
    fh: u64,
    offset: u64,
    size: u32,
}

/// A WRITE's handle, offset and size, when one of the chain's first
/// readable descriptors holds them whole. Linux puts the header in a
/// descriptor of its own and the arguments in the next; a chain cut finer
/// is served by the pool.
fn write_args(chain: &Chain) -> Option<WriteArgs> {
    const HEAD: u64 = 20;
    let mut at = std::mem::size_of::<InHeader>() as u64;
    for desc in chain.clone().readable().take(WRITE_ARGS_DESCRIPTORS) {
        let len = u64::from(desc.len());
        if at < len {
            if len - at < HEAD {
                return None;
            }
            let addr = desc.addr().checked_add(at)?;
            let mut head = [0u8; HEAD as usize];
            chain.memory().read_slice(&mut head, addr).ok()?;
            let u64_at = |i: usize| head.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
            return Some(WriteArgs {
                fh: u64_at(0)?,
                offset: u64_at(8)?,
                size: u32::from_le_bytes(head.get(16..20)?.try_into().ok()?),
            });
        }
        at -= len;
    }
    None
}

/// The largest READ [`Requests::is_cheap`] looks up in the cache on a
/// volume that is not local (the guest's size is not trusted).
pub(super) const READ_FROM_MEMORY_MAX: u32 = 1 << 20;

/// The readable descriptors [`write_args`] looks through at most.
const WRITE_ARGS_DESCRIPTORS: usize = 4;

fn out_header(unique: u64, errno: i32) -> OutHeader {
    OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    }
}

/// The reply of a request whose handler failed: the one it wrote, if it
/// wrote one before it failed (its header names the request), else EIO,
/// so the guest's request completes.
fn answered_or_eio(chain: &Chain, h: InHeader) -> u32 {
    // Where the reply header lands.
    let Some(addr) = chain.clone().writable().next().map(|d| d.addr()) else {
        return 0;
    };
    match chain.memory().read_obj::<OutHeader>(addr) {
        Ok(out) if out.unique == h.unique && h.unique != 0 => out.len,
        _ => reply_in_place(chain, h.unique, libc::EIO),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::FsConfig;
    use crate::store::mem::MemStore;
    use crate::store::sink::{EngineSink, SendError, SendFuture, Sink};
    use crate::store::{Store, Txn, ROOT_INO};
    use crate::writeback::{TxnConfig, WritebackStore};
    use std::time::Duration;
    use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

    use crate::device::testkit::{
        guest_memory, header, post, reply, served_fs, write_request, NOWHERE, OUT_LEN, REPLY,
        REQUEST,
    };

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

    /// A handler that panics (here, in the store's commit under MKDIR)
    /// leaves no request unanswered and nothing broken: EIO, a counter,
    /// and the next request on the same thread is served.
    #[test]
    fn a_panicking_handler_is_answered_eio() {
        use crate::store::hooked::Hooked;
        use std::sync::atomic::{AtomicBool, Ordering};
        let armed = Arc::new(AtomicBool::new(false));
        let trigger = Arc::clone(&armed);
        let store =
            Hooked::new(Arc::new(MemStore::new(1 << 20)), "panics").before_commit(move |_| {
                assert!(!trigger.load(Ordering::Relaxed), "a handler bug");
                Ok(())
            });
        let metrics = Arc::new(Metrics::default());
        let fs = PohmelFs::new(Arc::new(store), FsConfig::default(), Arc::clone(&metrics)).unwrap();
        let requests = Requests::new(Arc::new(fs), metrics);
        let mem = guest_memory();
        armed.store(true, Ordering::Relaxed);
        // fuse_mkdir_in (mode, umask), then the name.
        let mut body = 0o755u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(b"d\0");
        let len = write_request(&mem, header(40 + body.len(), FUSE_MKDIR, 12), &body);
        let chain = post(&mem, &[(REQUEST, len, false), (REPLY, 256, true)]);
        assert_eq!(requests.serve(&chain, 1), OUT_LEN);
        let out = reply(&mem);
        assert_eq!((out.error, out.unique), (-libc::EIO, 12));
        assert_eq!(requests.metrics.request_panics.get(), 1);

        armed.store(false, Ordering::Relaxed);
        let len = write_request(&mem, header(40 + 16, FUSE_GETATTR, 13), &[0; 16]);
        let chain = post(&mem, &[(REQUEST, len, false), (REPLY, 256, true)]);
        assert!(requests.serve(&chain, 1) > OUT_LEN);
        assert_eq!((reply(&mem).error, reply(&mem).unique), (0, 13));
        assert_eq!(requests.metrics.request_panics.get(), 1);
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

    #[test]
    fn an_unmappable_chain_is_answered_eio_where_a_reply_fits() {
        let requests = served_fs().0;
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
}
