//! Checks every descriptor chain and FUSE request before fuse-backend-rs
//! sees it. The guest writes every byte of a request and lays out every
//! descriptor, and fuse-backend-rs 0.14 trusts more of that than it should
//! (`docs/security.md`): its IOCTL path allocates whatever `in_size` the
//! guest names, up to the chain's readable bytes, and descriptors may
//! overlap, so a chain of a few pages can claim gigabytes.
//!
//! What a request must be to reach the server:
//! * a chain of at most [`CHAIN_DESCRIPTORS_MAX`] descriptors with at most
//!   [`REQUEST_BYTES_MAX`] readable bytes ([`check_chain`], before anything
//!   is mapped);
//! * a whole FUSE header whose `len` is at least a header, at most
//!   [`REQUEST_BYTES_MAX`] and at most the readable bytes; the reader is then
//!   cut to `len`, so nothing past the request is ever read;
//! * an opcode the daemon serves (others are answered ENOSYS here), with
//!   its fixed argument whole, its names NUL-terminated, a WRITE of at most
//!   the negotiated max write carrying exactly the `size` it names, a
//!   BATCH_FORGET the entries it counts, an INIT of FUSE 7 or later.
//!
//! Checking allocates nothing sized by the guest: the body is scanned
//! through a small stack buffer.
//!
//! The guest can change its memory while a request is served, so the
//! server reads the header and body again after these checks (a double
//! fetch). What holds regardless is what the reader allows: it is cut to a
//! length of at most [`REQUEST_BYTES_MAX`] before the server gets it, so
//! no rewrite (of the opcode to IOCTL, of a length, of a name) makes the
//! server read or allocate more than that.

use std::io::Read as _;
use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, BatchForgetIn, CreateIn, FallocateIn, FlushIn, ForgetIn, ForgetOne, FsyncIn,
    GetattrIn, GetxattrIn, InHeader, InitIn, InterruptIn, LinkIn, LseekIn, MkdirIn, MknodIn,
    Opcode, OpenIn, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn, SetxattrIn, WriteIn,
    KERNEL_VERSION,
};
use fuse_backend_rs::api::server::MAX_BUFFER_SIZE;
use fuse_backend_rs::transport::Reader;
use thiserror::Error;

use super::request::{Chain, DirtyLog, FUSE_SYNCFS, SYNCFS_IN_LEN};
use crate::fs::MAX_IO_BYTES;

/// The length of a FUSE request header.
pub const IN_HEADER_LEN: usize = size_of::<InHeader>();

/// The most descriptors a chain may have. Linux puts a request of the
/// largest write (256 pages) in about 260; 1,024 is also the usual queue
/// size, the longest chain possible without indirect descriptors.
pub const CHAIN_DESCRIPTORS_MAX: usize = 1024;

/// How a served opcode's body is laid out after the header.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// A fixed argument of this many bytes (more may follow).
    Fixed(usize),
    /// A fixed argument, then `names` NUL-terminated strings (SETXATTR's
    /// value follows its name).
    Named { fixed: usize, names: usize },
    /// WRITE: `WriteIn`, then exactly its `size` bytes of data.
    Write,
    /// BATCH_FORGET: `BatchForgetIn`, then its `count` entries.
    BatchForget,
    /// INIT: `InitIn` (the kernel's `InitIn2` follows when it sets
    /// INIT_EXT; fuse-backend-rs checks that one).
    Init,
}

impl Shape {
    const fn fixed(self) -> usize {
        match self {
            Shape::Fixed(n) | Shape::Named { fixed: n, .. } => n,
            Shape::Write => size_of::<WriteIn>(),
            Shape::BatchForget => size_of::<BatchForgetIn>(),
            Shape::Init => size_of::<InitIn>(),
        }
    }
}

const fn named(fixed: usize, names: usize) -> Shape {
    Shape::Named { fixed, names }
}

/// Every opcode the daemon serves: those `PohmelFs` implements (its
/// `FileSystem` impl in `src/fs/mod.rs`), INIT, DESTROY and INTERRUPT
/// (which fuse-backend-rs handles itself) and SYNCFS (the device answers
/// it). Everything else is answered ENOSYS before it reaches the server:
/// GETLK/SETLK/SETLKW (the daemon offers no POSIX locks, so Linux keeps
/// locks local), BMAP, IOCTL, POLL, NOTIFY_REPLY, COPY_FILE_RANGE,
/// SETUPMAPPING, REMOVEMAPPING (no DAX window), TMPFILE, STATX, and any
/// number not in this table.
const SERVED: &[(u32, Shape)] = &[
    (Opcode::Lookup as u32, named(0, 1)),
    (Opcode::Forget as u32, Shape::Fixed(size_of::<ForgetIn>())),
    (Opcode::Getattr as u32, Shape::Fixed(size_of::<GetattrIn>())),
    (Opcode::Setattr as u32, Shape::Fixed(size_of::<SetattrIn>())),
    (Opcode::Readlink as u32, Shape::Fixed(0)),
    (Opcode::Symlink as u32, named(0, 2)),
    (Opcode::Mknod as u32, named(size_of::<MknodIn>(), 1)),
    (Opcode::Mkdir as u32, named(size_of::<MkdirIn>(), 1)),
    (Opcode::Unlink as u32, named(0, 1)),
    (Opcode::Rmdir as u32, named(0, 1)),
    (Opcode::Rename as u32, named(size_of::<RenameIn>(), 2)),
    (Opcode::Link as u32, named(size_of::<LinkIn>(), 1)),
    (Opcode::Open as u32, Shape::Fixed(size_of::<OpenIn>())),
    (Opcode::Read as u32, Shape::Fixed(size_of::<ReadIn>())),
    (Opcode::Write as u32, Shape::Write),
    (Opcode::Statfs as u32, Shape::Fixed(0)),
    (Opcode::Release as u32, Shape::Fixed(size_of::<ReleaseIn>())),
    (Opcode::Fsync as u32, Shape::Fixed(size_of::<FsyncIn>())),
    (Opcode::Setxattr as u32, named(size_of::<SetxattrIn>(), 1)),
    (Opcode::Getxattr as u32, named(size_of::<GetxattrIn>(), 1)),
    (
        Opcode::Listxattr as u32,
        Shape::Fixed(size_of::<GetxattrIn>()),
    ),
    (Opcode::Removexattr as u32, named(0, 1)),
    (Opcode::Flush as u32, Shape::Fixed(size_of::<FlushIn>())),
    (Opcode::Init as u32, Shape::Init),
    (Opcode::Opendir as u32, Shape::Fixed(size_of::<OpenIn>())),
    (Opcode::Readdir as u32, Shape::Fixed(size_of::<ReadIn>())),
    (
        Opcode::Releasedir as u32,
        Shape::Fixed(size_of::<ReleaseIn>()),
    ),
    (Opcode::Fsyncdir as u32, Shape::Fixed(size_of::<FsyncIn>())),
    (Opcode::Access as u32, Shape::Fixed(size_of::<AccessIn>())),
    (Opcode::Create as u32, named(size_of::<CreateIn>(), 1)),
    (
        Opcode::Interrupt as u32,
        Shape::Fixed(size_of::<InterruptIn>()),
    ),
    (Opcode::Destroy as u32, Shape::Fixed(0)),
    (Opcode::BatchForget as u32, Shape::BatchForget),
    (
        Opcode::Fallocate as u32,
        Shape::Fixed(size_of::<FallocateIn>()),
    ),
    (
        Opcode::Readdirplus as u32,
        Shape::Fixed(size_of::<ReadIn>()),
    ),
    (Opcode::Rename2 as u32, named(size_of::<Rename2In>(), 2)),
    (Opcode::Lseek as u32, Shape::Fixed(size_of::<LseekIn>())),
    (FUSE_SYNCFS, Shape::Fixed(SYNCFS_IN_LEN)),
];

/// The largest fixed argument of a served opcode (SETATTR's, 88 bytes).
pub const FIXED_ARG_MAX: usize = {
    let mut max = 0;
    let mut i = 0;
    while i < SERVED.len() {
        let n = SERVED[i].1.fixed();
        if n > max {
            max = n;
        }
        i += 1;
    }
    max
};

/// The longest request: the largest write the daemon negotiates
/// ([`MAX_IO_BYTES`], fuse-backend-rs's max_write with MAX_PAGES), its
/// header and the largest fixed argument. No chain may carry more readable
/// bytes.
pub const REQUEST_BYTES_MAX: usize = IN_HEADER_LEN + FIXED_ARG_MAX + MAX_IO_BYTES;

// The fixed arguments are skipped through a stack buffer of this size.
const SCRATCH_BYTES: usize = 512;
const _: () = assert!(FIXED_ARG_MAX <= SCRATCH_BYTES);
// The write bound the filesystem enforces is the one fuse-backend-rs
// negotiates (256 pages of 4 KiB).
const _: () = assert!(MAX_IO_BYTES == MAX_BUFFER_SIZE as usize);

/// Why the device refused a chain or request without passing it on.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    #[error("chain has {0} descriptors, more than {CHAIN_DESCRIPTORS_MAX}")]
    TooManyDescriptors(usize),
    #[error("chain carries {0} readable bytes, more than {REQUEST_BYTES_MAX}")]
    ChainTooLong(u64),
    #[error("chain holds no whole request header")]
    NoHeader,
    #[error("header length {0} is shorter than a header or longer than {REQUEST_BYTES_MAX}")]
    BadLength(u32),
    #[error("header length {len} exceeds the chain's {readable} readable bytes")]
    Truncated { len: u32, readable: usize },
    #[error("opcode {0} is not served")]
    Unsupported(u32),
    #[error("opcode {opcode} needs a {need}-byte argument")]
    ShortArgument { opcode: u32, need: usize },
    #[error("opcode {0} carries a name without a terminating NUL")]
    Unterminated(u32),
    #[error("WRITE names {size} bytes and carries {carried}")]
    WriteSize { size: u32, carried: usize },
    #[error("WRITE of {0} bytes is larger than the negotiated {MAX_IO_BYTES}")]
    WriteTooLarge(u32),
    #[error("BATCH_FORGET counts {count} entries and carries room for {room}")]
    ForgetCount { count: u32, room: usize },
    #[error("FUSE major version {0} is older than {KERNEL_VERSION}")]
    OldMajor(u32),
}

impl Invalid {
    /// The errno of the reply.
    pub fn errno(self) -> i32 {
        match self {
            Invalid::Unsupported(_) => libc::ENOSYS,
            Invalid::OldMajor(_) => libc::EPROTO,
            _ => libc::EINVAL,
        }
    }
}

/// Check the chain's shape from its descriptors alone, before any buffer
/// is mapped: how many descriptors and how many readable bytes.
pub fn check_chain(chain: &Chain) -> Result<(), Invalid> {
    let mut descriptors = 0usize;
    let mut readable = 0u64;
    for desc in chain.clone() {
        descriptors += 1;
        if descriptors > CHAIN_DESCRIPTORS_MAX {
            return Err(Invalid::TooManyDescriptors(descriptors));
        }
        if !desc.is_write_only() {
            readable += u64::from(desc.len());
        }
    }
    if readable > REQUEST_BYTES_MAX as u64 {
        return Err(Invalid::ChainTooLong(readable));
    }
    Ok(())
}

/// Check the request `reader` holds and cut the reader to the header's
/// `len`. On success the header; on failure the header too when one could
/// be read (the reply needs its `unique`).
pub fn check_request(
    reader: &mut Reader<'_, DirtyLog>,
) -> Result<InHeader, (Option<InHeader>, Invalid)> {
    let readable = reader.available_bytes();
    let h: InHeader = reader
        .clone()
        .read_obj()
        .map_err(|_| (None, Invalid::NoHeader))?;
    let fail = |why| Err((Some(h), why));
    // Again after mapping: the guest may have rewritten its descriptor
    // table since `check_chain` read it.
    if readable > REQUEST_BYTES_MAX {
        return fail(Invalid::ChainTooLong(readable as u64));
    }
    let len = h.len as usize;
    if !(IN_HEADER_LEN..=REQUEST_BYTES_MAX).contains(&len) {
        return fail(Invalid::BadLength(h.len));
    }
    if len > readable {
        return fail(Invalid::Truncated {
            len: h.len,
            readable,
        });
    }
    let Some(&(_, shape)) = SERVED.iter().find(|(op, _)| *op == h.opcode) else {
        return fail(Invalid::Unsupported(h.opcode));
    };
    // Whatever follows the request is not the server's to read.
    if len < readable && reader.split_at(len).is_err() {
        return fail(Invalid::Truncated {
            len: h.len,
            readable,
        });
    }
    let mut body = reader.clone();
    if body.read_obj::<InHeader>().is_err() {
        return fail(Invalid::NoHeader);
    }
    match check_body(&mut body, h.opcode, len - IN_HEADER_LEN, shape) {
        Ok(()) => Ok(h),
        Err(why) => fail(why),
    }
}

/// Check the `body` bytes after the header against the opcode's shape.
fn check_body(
    r: &mut Reader<'_, DirtyLog>,
    opcode: u32,
    body: usize,
    shape: Shape,
) -> Result<(), Invalid> {
    let need = shape.fixed();
    let short = Invalid::ShortArgument { opcode, need };
    if body < need {
        return Err(short);
    }
    let rest = body - need;
    match shape {
        Shape::Fixed(_) => Ok(()),
        Shape::Named { fixed, names } => {
            skip(r, fixed).map_err(|()| short)?;
            if count_nuls(r, rest, names) < names {
                return Err(Invalid::Unterminated(opcode));
            }
            Ok(())
        }
        Shape::Write => {
            let w: WriteIn = r.read_obj().map_err(|_| short)?;
            if w.size as usize > MAX_IO_BYTES {
                return Err(Invalid::WriteTooLarge(w.size));
            }
            if w.size as usize != rest {
                return Err(Invalid::WriteSize {
                    size: w.size,
                    carried: rest,
                });
            }
            Ok(())
        }
        Shape::BatchForget => {
            let b: BatchForgetIn = r.read_obj().map_err(|_| short)?;
            let room = rest / size_of::<ForgetOne>();
            if b.count as usize > room {
                return Err(Invalid::ForgetCount {
                    count: b.count,
                    room,
                });
            }
            Ok(())
        }
        Shape::Init => {
            let init: InitIn = r.read_obj().map_err(|_| short)?;
            if init.major < KERNEL_VERSION {
                return Err(Invalid::OldMajor(init.major));
            }
            Ok(())
        }
    }
}

/// Read past `n` bytes (at most [`SCRATCH_BYTES`]).
fn skip(r: &mut Reader<'_, DirtyLog>, n: usize) -> Result<(), ()> {
    let mut scratch = [0u8; SCRATCH_BYTES];
    let buf = scratch.get_mut(..n).ok_or(())?;
    r.read_exact(buf).map_err(|_| ())
}

/// How many NULs the next `len` bytes of `r` hold, counting no further
/// than `want`.
fn count_nuls(r: &mut Reader<'_, DirtyLog>, mut len: usize, want: usize) -> usize {
    let mut scratch = [0u8; SCRATCH_BYTES];
    let mut found = 0;
    while len > 0 && found < want {
        let n = len.min(SCRATCH_BYTES);
        if r.read_exact(&mut scratch[..n]).is_err() {
            break;
        }
        found += scratch[..n].iter().filter(|&&b| b == 0).count();
        len -= n;
    }
    found
}

#[cfg(test)]
mod tests {
    use fuse_backend_rs::abi::fuse_abi::{ForgetOne, GetattrIn};
    use vm_memory::ByteValued;

    use super::*;
    use crate::device::testkit::{
        guest_memory, header, post, write_request, OUT_LEN, REPLY, REQUEST,
    };

    /// Check a request of `len` (header) carried in `carried` bytes.
    fn check(
        len: usize,
        opcode: u32,
        body: &[u8],
        carried: u32,
    ) -> (Result<InHeader, Invalid>, usize) {
        let mem = guest_memory();
        write_request(&mem, header(len, opcode, 1), body);
        let chain = post(&mem, &[(REQUEST, carried, false), (REPLY, OUT_LEN, true)]);
        let mut reader = Reader::from_descriptor_chain(chain.memory(), chain.clone()).unwrap();
        let r = check_request(&mut reader).map_err(|(_, why)| why);
        (r, reader.available_bytes())
    }

    #[test]
    fn the_bounds_follow_from_the_served_opcodes() {
        assert_eq!(FIXED_ARG_MAX, size_of::<SetattrIn>());
        assert_eq!(REQUEST_BYTES_MAX, 40 + 88 + (1 << 20));
    }

    #[test]
    fn a_header_shorter_than_a_header_is_refused() {
        let (r, _) = check(10, Opcode::Getattr as u32, &[], 64);
        assert_eq!(r.unwrap_err(), Invalid::BadLength(10));
    }

    #[test]
    fn the_reader_is_cut_to_the_request() {
        let len = IN_HEADER_LEN + size_of::<GetattrIn>();
        let body = [0u8; 100];
        let (r, left) = check(len, Opcode::Getattr as u32, &body, 140);
        assert_eq!(r.unwrap().len as usize, len);
        assert_eq!(left, len);
    }

    #[test]
    fn a_short_fixed_argument_is_refused() {
        let body = [0u8; 40];
        let len = IN_HEADER_LEN + body.len();
        let (r, _) = check(len, Opcode::Setattr as u32, &body, len as u32);
        let need = size_of::<SetattrIn>();
        assert_eq!(r.unwrap_err(), Invalid::ShortArgument { opcode: 4, need });
    }

    #[test]
    fn a_batch_forget_must_carry_what_it_counts() {
        let mut body = BatchForgetIn { count: 3, dummy: 0 }.as_slice().to_vec();
        for _ in 0..2 {
            body.extend_from_slice(ForgetOne::default().as_slice());
        }
        let len = IN_HEADER_LEN + body.len();
        let op = Opcode::BatchForget as u32;
        let (r, _) = check(len, op, &body, len as u32);
        assert_eq!(r.unwrap_err(), Invalid::ForgetCount { count: 3, room: 2 });
        body[..4].copy_from_slice(&2u32.to_ne_bytes());
        assert!(check(len, op, &body, len as u32).0.is_ok());
    }
}
