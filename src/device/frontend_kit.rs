//! Test kit: a vhost-user frontend in the test process, speaking the real
//! protocol to [`super::serve`] over its socket, as QEMU does. Guest memory
//! is a memfd both sides map; one request queue is set up in it with the
//! layout of `chains.rs`; requests are posted, kicked and waited for through
//! the queue's eventfds. The dirty-page log (`SET_LOG_BASE`) is a second
//! memfd the test reads.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, InHeader, InitIn, Opcode, OpenOut, OutHeader, ReadIn, WriteIn, WriteOut,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    ByteValued, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap,
    VolatileMemory,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chains::{self, BULK, DESC_TABLE, MEM_BYTES, REPLY, REQUEST};
use super::testkit::{header, OUT_LEN};
use super::{bind, serve, DeviceConfig, ServeConfig};
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::Store;

/// The request queue the kit drives (queue 0 is hiprio).
pub(super) const QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
const AVAIL_RING: u64 = 0x20000;
pub const USED_RING: u64 = 0x28000;
/// Bytes of log per byte of guest memory: one bit per 4 KiB page.
const LOG_BYTES: u64 = MEM_BYTES / 4096 / 8;
/// A FUSE request header's length.
const IN_HEADER_LEN: usize = 40;
/// The reply header's length, as an address offset.
const OUT: u64 = OUT_LEN as u64;
/// Bound on waiting for one reply.
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// An anonymous memory file of `len` bytes.
fn memfd(name: &str, len: u64) -> File {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string; the call only
    // creates a file descriptor.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// Take the features the backend offers that the kit uses, asserting that
/// dirty logging (LOG_ALL, LOG_SHMFD) is among them.
fn negotiate(frontend: &mut Frontend) {
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_ne!(offered & log_all, 0, "LOG_ALL not offered: {offered:#x}");
    frontend
        .set_features(
            (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | log_all,
        )
        .unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(
        protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD not offered: {protocol:?}"
    );
    assert!(
        protocol.contains(VhostUserProtocolFeatures::DEVICE_STATE),
        "DEVICE_STATE not offered: {protocol:?}"
    );
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::DEVICE_STATE,
        )
        .unwrap();
}

/// Set up and enable the request queue in the layout of `chains.rs`;
/// `host` maps a guest address to the frontend's address of it. The kick
/// and call eventfds.
fn set_up_queue(frontend: &mut Frontend, host: impl Fn(u64) -> u64) -> (EventFd, EventFd) {
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    frontend.set_vring_num(QUEUE, QUEUE_SIZE).unwrap();
    frontend
        .set_vring_addr(
            QUEUE,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host(DESC_TABLE),
                used_ring_addr: host(USED_RING),
                avail_ring_addr: host(AVAIL_RING),
                log_addr: None,
            },
        )
        .unwrap();
    frontend.set_vring_base(QUEUE, 0).unwrap();
    frontend.set_vring_call(QUEUE, &call).unwrap();
    frontend.set_vring_kick(QUEUE, &kick).unwrap();
    frontend.set_vring_enable(QUEUE, true).unwrap();
    (kick, call)
}

/// A daemon serving one frontend on a socket, and the frontend.
pub struct Kit {
    /// `None` once dropped (the disconnect).
    frontend: Option<Frontend>,
    /// The test's own mapping of guest memory.
    pub mem: GuestMemoryMmap<()>,
    log: MmapRegion<()>,
    _log_file: File,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    pub metrics: Arc<Metrics>,
    /// The daemon's filesystem.
    pub fs: Arc<PohmelFs>,
    daemon: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl Kit {
    /// Start `serve` over an empty in-memory volume, connect, negotiate
    /// the features the backend offers (LOG_ALL and LOG_SHMFD among them,
    /// which this asserts), hand over guest memory and the dirty log, and
    /// set up and enable the request queue.
    pub fn start(name: &str) -> Kit {
        Kit::start_on(name, Arc::new(MemStore::new(64 << 20)))
    }

    /// [`Kit::start`] on the volume in `store` (two daemons on one volume,
    /// as a migration's source and destination).
    pub fn start_on(name: &str, store: Arc<dyn Store>) -> Kit {
        Kit::start_configured(name, store, FsConfig::default())
    }

    /// [`Kit::start_on`] with the filesystem settings `fs_cfg`.
    pub fn start_configured(name: &str, store: Arc<dyn Store>, fs_cfg: FsConfig) -> Kit {
        let metrics = Arc::new(Metrics::default());
        let fs = Arc::new(PohmelFs::new(store, fs_cfg, Arc::clone(&metrics)).unwrap());
        Kit::start_with(name, fs, metrics)
    }

    /// [`Kit::start`] serving `fs` (built on a volume slot: a daemon that
    /// may open its volume late or let it go), counting in `metrics`.
    pub fn start_with(name: &str, fs: Arc<PohmelFs>, metrics: Arc<Metrics>) -> Kit {
        Kit::start_serving(name, fs, metrics, false)
    }

    /// [`Kit::start_with`]; `local_volume` as `serve` sets it for a
    /// `file://` or `mem:` volume (cheap requests served on the queue
    /// thread).
    pub fn start_serving(
        name: &str,
        fs: Arc<PohmelFs>,
        metrics: Arc<Metrics>,
        local_volume: bool,
    ) -> Kit {
        let dir = std::env::temp_dir().join(format!("pohmelfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vhost.sock");
        let cfg = ServeConfig {
            socket_path: socket.clone(),
            device: DeviceConfig {
                tag: None,
                request_queues: 1,
                queue_size: usize::from(QUEUE_SIZE),
                local_volume,
            },
            threads: 1,
            queue_depth: 64,
            once: true,
        };
        let listener = bind(&socket).unwrap();
        let served = Arc::clone(&metrics);
        let served_fs = Arc::clone(&fs);
        let daemon = std::thread::spawn(move || serve(&cfg, listener, served_fs, served).unwrap());

        let mut frontend = Frontend::connect(&socket, 2).unwrap();
        negotiate(&mut frontend);

        let mem_file = memfd("guest", MEM_BYTES);
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(mem_file.try_clone().unwrap(), 0),
            MEM_BYTES as usize,
        )
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        let host = |gpa: u64| mem.iter().next().unwrap().as_ptr() as u64 + gpa;
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_BYTES,
                userspace_addr: host(0),
                mmap_offset: 0,
                mmap_handle: mem_file.as_raw_fd(),
            }])
            .unwrap();

        let log_file = memfd("dirty-log", LOG_BYTES);
        frontend
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: LOG_BYTES,
                    mmap_offset: 0,
                    mmap_handle: log_file.as_raw_fd(),
                }),
            )
            .unwrap();
        let log = MmapRegion::<()>::from_file(
            FileOffset::new(log_file.try_clone().unwrap(), 0),
            LOG_BYTES as usize,
        )
        .unwrap();

        let (kick, call) = set_up_queue(&mut frontend, host);
        Kit {
            frontend: Some(frontend),
            mem,
            log,
            _log_file: log_file,
            kick,
            call,
            avail_idx: 0,
            metrics,
            fs,
            daemon: Some(daemon),
            dir,
        }
    }

    /// Post `h` and `body` at [`REQUEST`] with the buffers `bufs` after it
    /// (`(address, length, device-writable)`), kick, and wait for the
    /// used ring to return it; the reply header at the first writable
    /// buffer.
    pub fn request(&mut self, h: InHeader, body: &[u8], bufs: &[(u64, u32, bool)]) -> OutHeader {
        let idx = self.post(h, body, bufs);
        self.wait_used(idx);
        let reply = bufs.iter().find(|b| b.2).map(|b| b.0).unwrap();
        self.mem.read_obj(GuestAddress(reply)).unwrap()
    }

    /// Post and kick as [`Kit::request`] does, without waiting: the avail
    /// index the used ring reaches once the request is returned.
    pub fn post(&mut self, h: InHeader, body: &[u8], bufs: &[(u64, u32, bool)]) -> u16 {
        self.mem.write_obj(h, GuestAddress(REQUEST)).unwrap();
        self.mem
            .write_slice(body, GuestAddress(REQUEST + h.as_slice().len() as u64))
            .unwrap();
        let len = u32::try_from(h.as_slice().len() + body.len()).unwrap();
        let mut all = vec![(REQUEST, len, false)];
        all.extend_from_slice(bufs);
        for (i, desc) in chains::linked(&all).iter().enumerate() {
            self.mem
                .write_obj(*desc, GuestAddress(DESC_TABLE + 16 * i as u64))
                .unwrap();
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        self.kick.write(1).unwrap();
        self.avail_idx
    }

    /// The used ring's index, as the guest reads it.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// Wait until the used ring's index reaches `idx`, woken by the call
    /// eventfd, for at most [`REPLY_WAIT`].
    fn wait_used(&self, idx: u16) {
        let deadline = Instant::now() + REPLY_WAIT;
        loop {
            if self.used_idx() == idx {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no reply within {REPLY_WAIT:?}");
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            // SAFETY: one valid pollfd, for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.call.read();
        }
    }

    /// Stop the request queue as QEMU does (`GET_VRING_BASE`): where it
    /// stopped.
    pub fn stop_queue(&self) -> u16 {
        let base = self.frontend().get_vring_base(QUEUE).unwrap();
        u16::try_from(base).expect("a queue index is 16 bits")
    }

    /// Start the request queue again at `base`, as QEMU does when the
    /// guest runs on (its `call` and `kick` again: the stop took them).
    pub fn restart_queue(&self, base: u16) {
        let frontend = self.frontend();
        frontend.set_vring_base(QUEUE, base).unwrap();
        frontend.set_vring_call(QUEUE, &self.call).unwrap();
        frontend.set_vring_kick(QUEUE, &self.kick).unwrap();
        // A message with a reply: the daemon handled those before it.
        frontend.get_features().unwrap();
    }

    /// FUSE INIT as Linux 5.x sends it (7.31).
    pub fn init(&mut self) {
        let init = InitIn {
            major: 7,
            minor: 31,
            ..InitIn::default()
        };
        let h = header(IN_HEADER_LEN + size_of::<InitIn>(), Opcode::Init as u32, 1);
        let out = self.request(h, init.as_slice(), &[(REPLY, 4096, true)]);
        assert_eq!(out.error, 0, "INIT");
    }

    /// CREATE `name` in the root, read and write; its node id and handle.
    pub fn create(&mut self, name: &str) -> (u64, u64) {
        let mut body = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: libc::S_IFREG | 0o644,
            ..CreateIn::default()
        }
        .as_slice()
        .to_vec();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        let h = header(IN_HEADER_LEN + body.len(), Opcode::Create as u32, 2);
        let out = self.request(h, &body, &[(REPLY, 4096, true)]);
        assert_eq!(out.error, 0, "CREATE {name}");
        let entry: EntryOut = self.mem.read_obj(GuestAddress(REPLY + OUT)).unwrap();
        let open: OpenOut = self
            .mem
            .read_obj(GuestAddress(REPLY + OUT + size_of::<EntryOut>() as u64))
            .unwrap();
        (entry.nodeid, open.fh)
    }

    /// WRITE `data` (at most [`BULK`]'s megabyte) at offset 0 through `fh`.
    pub fn write(&mut self, nodeid: u64, fh: u64, data: &[u8]) {
        self.write_at(nodeid, fh, 0, data);
    }

    /// [`Kit::write`] at `offset`.
    pub fn write_at(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) {
        let idx = self.post_write_at(nodeid, fh, offset, data);
        self.wait_used(idx);
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!(out.error, 0, "WRITE");
        let written: WriteOut = self.mem.read_obj(GuestAddress(REPLY + OUT)).unwrap();
        assert_eq!(written.size as usize, data.len());
    }

    /// Post [`Kit::write`]'s WRITE without waiting for it ([`Kit::post`]).
    pub fn post_write(&mut self, nodeid: u64, fh: u64, data: &[u8]) -> u16 {
        self.post_write_at(nodeid, fh, 0, data)
    }

    /// [`Kit::post_write`] at `offset`.
    fn post_write_at(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> u16 {
        self.mem.write_slice(data, GuestAddress(BULK)).unwrap();
        let size = u32::try_from(data.len()).unwrap();
        let write = WriteIn {
            fh,
            offset,
            size,
            ..WriteIn::default()
        };
        let mut h = header(
            IN_HEADER_LEN + size_of::<WriteIn>() + data.len(),
            Opcode::Write as u32,
            3,
        );
        h.nodeid = nodeid;
        self.post(
            h,
            write.as_slice(),
            &[(BULK, size, false), (REPLY, 4096, true)],
        )
    }

    /// READ `len` bytes at offset 0 through `fh` into `buf` (a guest
    /// address apart from the reply header's); the reply's error and the
    /// bytes.
    pub fn read(&mut self, nodeid: u64, fh: u64, buf: u64, len: u32) -> (i32, Vec<u8>) {
        self.read_at(nodeid, fh, 0, buf, len)
    }

    /// [`Kit::read`] at `offset`.
    pub fn read_at(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        buf: u64,
        len: u32,
    ) -> (i32, Vec<u8>) {
        let read = ReadIn {
            fh,
            offset,
            size: len,
            ..ReadIn::default()
        };
        let mut h = header(IN_HEADER_LEN + size_of::<ReadIn>(), Opcode::Read as u32, 4);
        h.nodeid = nodeid;
        let out = self.request(
            h,
            read.as_slice(),
            &[(REPLY, OUT_LEN, true), (buf, len, true)],
        );
        let got = (out.len as usize).saturating_sub(OUT_LEN as usize);
        let mut back = vec![0u8; got];
        self.mem.read_slice(&mut back, GuestAddress(buf)).unwrap();
        (out.error, back)
    }

    /// Send request `opcode` on `nodeid` with `body` (one readable
    /// descriptor) and a 4 KiB reply buffer; the reply's errno (0: done)
    /// and what follows its header.
    pub fn call(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        let mut h = header(IN_HEADER_LEN + body.len(), opcode as u32, 5);
        h.nodeid = nodeid;
        let out = self.request(h, body, &[(REPLY, 4096, true)]);
        let got = (out.len as usize).saturating_sub(OUT_LEN as usize);
        let mut back = vec![0u8; got];
        self.mem
            .read_slice(&mut back, GuestAddress(REPLY + OUT))
            .unwrap();
        (-out.error, back)
    }

    /// The vhost-user connection, for messages the kit does not wrap.
    pub fn frontend(&self) -> &Frontend {
        self.frontend.as_ref().unwrap()
    }

    /// The guest pages (4 KiB) the log marks dirty.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut bytes = vec![0u8; LOG_BYTES as usize];
        self.log.as_volatile_slice().copy_to(&mut bytes[..]);
        (0..MEM_BYTES / 4096)
            .filter(|&p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }

    /// Clear the log, as a frontend does after it has read it.
    pub fn clear_log(&self) {
        let zeros = vec![0u8; LOG_BYTES as usize];
        self.log.as_volatile_slice().copy_from(&zeros[..]);
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        // Disconnecting ends the daemon's `once` session.
        drop(self.frontend.take());
        if let Some(daemon) = self.daemon.take() {
            let _ = daemon.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
