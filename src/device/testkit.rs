//! Test kit for the device layer: guest memory, a split queue in it, and
//! descriptor chains posted the way a guest driver posts them, including
//! the ways a hostile one could.

use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::request::{Chain, Requests};
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;

type Mem = GuestMemoryMmap<()>;

pub const MEM_BYTES: u64 = 4 << 20;
/// Room for [`QUEUE_SIZE`] descriptors of 16 bytes.
const DESC_TABLE: u64 = 0x10000;
const AVAIL_RING: u64 = 0x20000;
const USED_RING: u64 = 0x28000;
/// Longer than any chain the device accepts.
pub const QUEUE_SIZE: u16 = 2048;
/// Where tests put a request (header and arguments).
pub const REQUEST: u64 = 0x40000;
/// Where tests put the reply buffer.
pub const REPLY: u64 = 0x50000;
/// A 1 MiB region that hostile chains point many descriptors at.
pub const BULK: u64 = 0x100000;
pub const BULK_LEN: u32 = 1 << 20;
/// Past the end of guest memory: a buffer there does not map.
pub const NOWHERE: u64 = MEM_BYTES + 0x10000;
pub const OUT_LEN: u32 = std::mem::size_of::<OutHeader>() as u32;

pub fn guest_memory() -> GuestMemoryAtomic<Mem> {
    GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap(),
    )
}

/// The chain of buffers `(address, length, device-writable)` as a guest
/// posts it on a fresh split queue.
pub fn post(mem: &GuestMemoryAtomic<Mem>, bufs: &[(u64, u32, bool)]) -> Chain {
    assert!(bufs.len() <= usize::from(QUEUE_SIZE));
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
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    q.pop_descriptor_chain(mem.memory()).unwrap()
}

/// A request header: `len`, `opcode`, `unique`, on the root (node 1), as
/// root.
pub fn header(len: usize, opcode: u32, unique: u64) -> InHeader {
    InHeader {
        len: u32::try_from(len).unwrap(),
        opcode,
        unique,
        nodeid: 1,
        ..InHeader::default()
    }
}

/// Write `h` and then `body` at [`REQUEST`]; the bytes written.
pub fn write_request(mem: &GuestMemoryAtomic<Mem>, h: InHeader, body: &[u8]) -> u32 {
    let m = mem.memory();
    m.write_obj(h, GuestAddress(REQUEST)).unwrap();
    m.write_slice(body, GuestAddress(REQUEST + h.as_slice().len() as u64))
        .unwrap();
    u32::try_from(h.as_slice().len() + body.len()).unwrap()
}

/// The reply header at [`REPLY`].
pub fn reply(mem: &GuestMemoryAtomic<Mem>) -> OutHeader {
    mem.memory().read_obj(GuestAddress(REPLY)).unwrap()
}

/// A daemon over an in-memory store, and its counters.
pub fn served_fs() -> (Requests, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let fs = PohmelFs::new(
        Arc::new(MemStore::new(64 << 20)),
        FsConfig::default(),
        Arc::clone(&metrics),
    )
    .unwrap();
    (Requests::new(Arc::new(fs), Arc::clone(&metrics)), metrics)
}
