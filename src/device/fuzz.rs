//! The harness of the `fuse_stream` fuzz target: a stream of FUSE requests,
//! each in a descriptor chain whose layout the input chooses, served by
//! [`Requests::serve`] over a fresh filesystem on the in-memory store, as
//! a hostile guest would post them. Requests build state on one another:
//! node ids and file handles from earlier replies are offered to later
//! requests, so a stream can create, write, read, rename and remove.
//!
//! The input is a sequence of steps, each:
//!
//! ```text
//! ctl: u8       bits 0-1: layout (0 request + reply buffer, 1 request split
//!               in two, 2 descriptors from the input, 3 reply buffer of
//!               the input's length); 2: header len from the input;
//!               3: node id from the input; 4: the body's first 8 bytes
//!               become a known file handle; 5: not root (uid/gid 1000);
//!               6: the body's first 8 bytes become a known node id (the
//!               new directory of RENAME, the node of LINK)
//! opcode: u8    the FUSE opcode
//! pick: u8      which known node id (and handle) the request names
//! [nodeid: u64] with bit 3
//! body_len: u16, then the body (at most what fits before the reply area)
//! [len: u32]    with bit 2
//! layout 1: split: u16; layout 3: reply_len: u16
//! layout 2: count: u8 (1-16 descriptors), each place: u8, offset: u16,
//!           len: u32, kind: u8 (bit 0 writable; bit 1 then flags: u16,
//!           next: u16 taken as they are)
//! ```
//!
//! A step the input ends in the middle of is dropped. What it checks:
//! nothing panics, and no request counts as an internal error of the
//! filesystem (`fs_internal_errors`: the in-memory store never fails).

use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, OpenOut, OutHeader};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::chains::{
    guest_memory, linked, post_descriptors, served_fs, Mem, BULK, DESC_TABLE, MEM_BYTES, NOWHERE,
    REPLY, REQUEST,
};
use crate::store::ROOT_INO;

mod seeds;
pub use seeds::seeds;

/// The store's capacity: small enough that a stream can fill it.
const CAPACITY_BYTES: u64 = 16 << 20;
/// The most node ids and handles remembered.
const KNOWN_MAX: usize = 64;
/// The most descriptors of a chain laid out by the input.
const CHAIN_MAX: u8 = 16;
/// The reply buffer of the fixed layouts.
const REPLY_LEN: u32 = 0x10000;
const IN_HEADER_LEN: usize = size_of::<InHeader>();
const OUT_HEADER_LEN: u64 = size_of::<OutHeader>() as u64;
/// Where a descriptor laid out by the input may point (plus an offset).
const PLACES: [u64; 7] = [
    REQUEST,
    REPLY,
    BULK,
    0,
    DESC_TABLE,
    NOWHERE,
    MEM_BYTES - 0x1000,
];

const LAYOUT_SPLIT: u8 = 1;
const LAYOUT_FROM_INPUT: u8 = 2;
const LAYOUT_SHORT_REPLY: u8 = 3;
const RAW_LEN: u8 = 1 << 2;
const RAW_NODE: u8 = 1 << 3;
const KNOWN_HANDLE: u8 = 1 << 4;
const NOT_ROOT: u8 = 1 << 5;
const KNOWN_NODE: u8 = 1 << 6;

const FUSE_LOOKUP: u32 = 1;
const FUSE_SYMLINK: u32 = 6;
const FUSE_MKNOD: u32 = 8;
const FUSE_MKDIR: u32 = 9;
const FUSE_LINK: u32 = 13;
const FUSE_OPEN: u32 = 14;
const FUSE_OPENDIR: u32 = 27;
const FUSE_CREATE: u32 = 35;

/// The bytes of a fuzz input, read front to back.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
}

/// Node ids and file handles the replies handed out so far.
struct Known {
    nodes: Vec<u64>,
    handles: Vec<u64>,
}

impl Known {
    fn pick(list: &[u64], pick: u8) -> Option<u64> {
        list.get(usize::from(pick) % list.len().max(1)).copied()
    }

    fn remember(list: &mut Vec<u64>, v: u64) {
        if list.len() < KNOWN_MAX {
            list.push(v);
        } else {
            // Keep the list bounded; which one goes depends on the value.
            list[(v as usize) % KNOWN_MAX] = v;
        }
    }
}

/// Serve the steps of `data` against a fresh filesystem.
pub fn fuse_stream(data: &[u8]) {
    run(data);
}

/// Serve the steps of `data`; the opcode and errno of every reply that
/// landed at [`REPLY`] with the request's `unique`.
fn run(data: &[u8]) -> Vec<(u32, i32)> {
    let mut answers = Vec::new();
    let (Some(mem), Ok((requests, metrics))) = (guest_memory(), served_fs(CAPACITY_BYTES)) else {
        return answers;
    };
    let mut input = Input(data);
    let mut known = Known {
        nodes: vec![ROOT_INO],
        handles: Vec::new(),
    };
    let mut unique = 0u64;
    while let Some((table, h, reply_at_fixed_place)) = step(&mut input, &mem, &known, unique + 1) {
        unique = h.unique;
        let Some(chain) = post_descriptors(&mem, &table) else {
            continue;
        };
        requests.serve(&chain, 0);
        let answer = reply_at_fixed_place
            .then(|| harvest(&mem, h, &mut known))
            .flatten();
        answers.extend(answer);
        let internal = metrics.fs_internal_errors.get();
        assert_eq!(internal, 0, "internal error on {h:?}, answered {answer:?}");
    }
    answers
}

/// Read one step, write its request into guest memory; its descriptor
/// table, its header, and whether the reply lands at [`REPLY`].
fn step(
    input: &mut Input<'_>,
    mem: &GuestMemoryAtomic<Mem>,
    known: &Known,
    unique: u64,
) -> Option<(Vec<Descriptor>, InHeader, bool)> {
    let ctl = input.u8()?;
    let opcode = u32::from(input.u8()?);
    let pick = input.u8()?;
    let nodeid = if ctl & RAW_NODE != 0 {
        input.u64()?
    } else {
        Known::pick(&known.nodes, pick)?
    };
    let room = (REPLY - REQUEST) as usize - IN_HEADER_LEN;
    let body_len = usize::from(input.u16()?).min(room).min(input.0.len());
    let mut body = input.take(body_len)?.to_vec();
    let patch = match ctl & (KNOWN_HANDLE | KNOWN_NODE) {
        0 => None,
        KNOWN_NODE => Known::pick(&known.nodes, pick),
        _ => Known::pick(&known.handles, pick),
    };
    if let (Some(v), Some(head)) = (patch, body.get_mut(..8)) {
        head.copy_from_slice(&v.to_le_bytes());
    }
    let total = (IN_HEADER_LEN + body.len()) as u32;
    let len = if ctl & RAW_LEN != 0 {
        input.u32()?
    } else {
        total
    };
    let id = if ctl & NOT_ROOT != 0 { 1000 } else { 0 };
    let h = InHeader {
        len,
        opcode,
        unique,
        nodeid,
        uid: id,
        gid: id,
        pid: 1,
        padding: 0,
    };
    let m = mem.memory();
    m.write_obj(h, GuestAddress(REQUEST)).ok()?;
    m.write_slice(&body, GuestAddress(REQUEST + IN_HEADER_LEN as u64))
        .ok()?;
    // No stale reply header may pass for this request's.
    m.write_obj(OutHeader::default(), GuestAddress(REPLY))
        .ok()?;
    let request = (REQUEST, total, false);
    let table = match ctl & 3 {
        LAYOUT_SPLIT => {
            let at = u32::from(input.u16()?) % (total + 1);
            linked(&[
                (REQUEST, at, false),
                (REQUEST + u64::from(at), total - at, false),
                (REPLY, REPLY_LEN, true),
            ])
        }
        LAYOUT_FROM_INPUT => return Some((descriptors(input)?, h, false)),
        LAYOUT_SHORT_REPLY => linked(&[request, (REPLY, u32::from(input.u16()?), true)]),
        _ => linked(&[request, (REPLY, REPLY_LEN, true)]),
    };
    Some((table, h, true))
}

/// A descriptor table laid out by the input.
fn descriptors(input: &mut Input<'_>) -> Option<Vec<Descriptor>> {
    let count = input.u8()? % CHAIN_MAX + 1;
    let mut bufs = Vec::with_capacity(usize::from(count));
    let mut raw = Vec::new();
    for i in 0..count {
        let place = PLACES[usize::from(input.u8()?) % PLACES.len()];
        let addr = place + u64::from(input.u16()?);
        let len = input.u32()?;
        let kind = input.u8()?;
        bufs.push((addr, len, kind & 1 != 0));
        if kind & 2 != 0 {
            raw.push((usize::from(i), input.u16()?, input.u16()?));
        }
    }
    let mut table = linked(&bufs);
    for (i, flags, next) in raw {
        let d = table.get_mut(i)?;
        *d = Descriptor::new(d.addr().0, d.len(), flags, next);
    }
    Some(table)
}

/// The opcode and errno of the reply at [`REPLY`], if it answers `h`;
/// remember the node ids and handles a successful one hands out.
fn harvest(mem: &GuestMemoryAtomic<Mem>, h: InHeader, known: &mut Known) -> Option<(u32, i32)> {
    let m = mem.memory();
    let out = m.read_obj::<OutHeader>(GuestAddress(REPLY)).ok()?;
    if out.unique != h.unique || out.len == 0 {
        return None;
    }
    if out.error != 0 {
        return Some((h.opcode, -out.error));
    }
    let body = GuestAddress(REPLY + OUT_HEADER_LEN);
    let entry = || m.read_obj::<EntryOut>(body).ok();
    match h.opcode {
        FUSE_LOOKUP | FUSE_SYMLINK | FUSE_MKNOD | FUSE_MKDIR | FUSE_LINK => {
            if let Some(e) = entry() {
                Known::remember(&mut known.nodes, e.nodeid);
            }
        }
        FUSE_CREATE => {
            if let Some(e) = entry() {
                Known::remember(&mut known.nodes, e.nodeid);
            }
            let at = GuestAddress(body.0 + EntryOut::default().as_slice().len() as u64);
            if let Ok(o) = m.read_obj::<OpenOut>(at) {
                Known::remember(&mut known.handles, o.fh);
            }
        }
        FUSE_OPEN | FUSE_OPENDIR => {
            if let Ok(o) = m.read_obj::<OpenOut>(body) {
                Known::remember(&mut known.handles, o.fh);
            }
        }
        _ => {}
    }
    Some((h.opcode, 0))
}
