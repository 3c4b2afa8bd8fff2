//! Test kit for the device layer: guest memory, a split queue in it, and
//! descriptor chains posted the way a guest driver posts them, including
//! the ways a hostile one could. The memory and queue layout are
//! `chains.rs`'s, shared with the FUSE fuzz target.

use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::chains::{self, Mem};
use super::request::{Chain, Requests};
use crate::metrics::Metrics;

pub use super::chains::{BULK, NOWHERE, REPLY, REQUEST};

/// The length of the region at [`BULK`].
pub const BULK_LEN: u32 = 1 << 20;

pub const OUT_LEN: u32 = std::mem::size_of::<OutHeader>() as u32;

pub fn guest_memory() -> GuestMemoryAtomic<Mem> {
    chains::guest_memory().unwrap()
}

/// The chain of buffers `(address, length, device-writable)` as a guest
/// posts it on a fresh split queue.
pub fn post(mem: &GuestMemoryAtomic<Mem>, bufs: &[(u64, u32, bool)]) -> Chain {
    chains::post_descriptors(mem, &chains::linked(bufs)).unwrap()
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
    chains::served_fs(64 << 20).unwrap()
}
