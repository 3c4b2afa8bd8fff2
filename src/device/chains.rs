//! Guest memory with a split virtqueue in it, and descriptor chains posted
//! there the way a guest driver posts them, including the ways a hostile
//! one could (overlapping buffers, buffers that do not map, any flags and
//! `next` links). Shared by the device's tests (`testkit`) and the FUSE
//! fuzz target (`device::fuzz`); compiled for those only.
//!
//! Nothing here reads guest input: every address it writes is one of its
//! own fixed places in a memory it created, so its errors are the kit's
//! own, returned as `None`.

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::request::{Chain, Requests};
use crate::fs::error::FsResult;
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;

pub use super::request::Mem;

pub const MEM_BYTES: u64 = 4 << 20;
/// Room for [`QUEUE_SIZE`] descriptors of 16 bytes.
pub const DESC_TABLE: u64 = 0x10000;
const AVAIL_RING: u64 = 0x20000;
const USED_RING: u64 = 0x28000;
/// Longer than any chain the device accepts.
pub const QUEUE_SIZE: u16 = 2048;
/// Where requests go (header and arguments), up to [`REPLY`].
pub const REQUEST: u64 = 0x40000;
/// Where reply buffers go.
pub const REPLY: u64 = 0x50000;
/// A 1 MiB region that hostile chains point many descriptors at.
pub const BULK: u64 = 0x100000;
/// Past the end of guest memory: a buffer there does not map.
pub const NOWHERE: u64 = MEM_BYTES + 0x10000;

/// 4 MiB of guest memory at guest address 0.
pub fn guest_memory() -> Option<GuestMemoryAtomic<Mem>> {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).ok()?;
    Some(GuestMemoryAtomic::new(m))
}

/// The descriptors of a chain of buffers `(address, length,
/// device-writable)`, each linked to the next.
pub fn linked(bufs: &[(u64, u32, bool)]) -> Vec<Descriptor> {
    bufs.iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            Descriptor::new(addr, len, flags as u16, (i + 1) as u16)
        })
        .collect()
}

/// Write `table` as the descriptor table of a fresh split queue whose
/// available ring holds head 0, and pop that chain (`None` when more than
/// [`QUEUE_SIZE`] descriptors are given).
pub fn post_descriptors(mem: &GuestMemoryAtomic<Mem>, table: &[Descriptor]) -> Option<Chain> {
    if table.len() > usize::from(QUEUE_SIZE) {
        return None;
    }
    let m = mem.memory();
    for (i, desc) in table.iter().enumerate() {
        m.write_obj(*desc, GuestAddress(DESC_TABLE + 16 * i as u64))
            .ok()?;
    }
    // avail ring: flags, idx = 1, ring[0] = head 0.
    m.write_obj(0u16, GuestAddress(AVAIL_RING)).ok()?;
    m.write_obj(1u16, GuestAddress(AVAIL_RING + 2)).ok()?;
    m.write_obj(0u16, GuestAddress(AVAIL_RING + 4)).ok()?;
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    q.pop_descriptor_chain(mem.memory())
}

/// A daemon over an in-memory store of `capacity` bytes, and its counters.
pub fn served_fs(capacity: u64) -> FsResult<(Requests, Arc<Metrics>)> {
    let metrics = Arc::new(Metrics::default());
    let fs = PohmelFs::new(
        Arc::new(MemStore::new(capacity)),
        FsConfig::default(),
        Arc::clone(&metrics),
    )?;
    Ok((Requests::new(Arc::new(fs), Arc::clone(&metrics)), metrics))
}
