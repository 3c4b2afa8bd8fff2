//! Seed inputs of the `fuse_stream` target: the streams a guest's `mkdir`,
//! `creat`, `write`, `read`, `mv`, `setfattr`, `ls`, `rm` send, and a few
//! hostile chain layouts, so the fuzzer starts from requests the filesystem
//! answers. The test below checks that each step of the first seed
//! succeeds: a change of the input format that breaks them fails it.

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, FlushIn, GetattrIn, GetxattrIn, InitIn, MkdirIn, OpenIn, ReadIn, ReleaseIn, RenameIn,
    SetxattrIn, WriteIn,
};
use vm_memory::ByteValued;

use super::{
    FUSE_CREATE, FUSE_LOOKUP, FUSE_MKDIR, FUSE_OPENDIR, KNOWN_HANDLE, KNOWN_NODE,
    LAYOUT_FROM_INPUT, LAYOUT_SHORT_REPLY, LAYOUT_SPLIT, NOT_ROOT,
};

const FUSE_GETATTR: u32 = 3;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_RENAME: u32 = 12;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_SETXATTR: u32 = 21;
const FUSE_LISTXATTR: u32 = 23;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_READDIR: u32 = 28;

/// One step: control byte, opcode, pick, body, then `extra` (the layout's
/// own fields).
fn step(ctl: u8, opcode: u32, pick: u8, body: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut v = vec![ctl, opcode as u8, pick];
    v.extend_from_slice(&(body.len() as u16).to_le_bytes());
    v.extend_from_slice(body);
    v.extend_from_slice(extra);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn init() -> Vec<u8> {
    let i = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 1 << 17,
        flags: 0,
    };
    step(0, FUSE_INIT, 0, i.as_slice(), &[])
}

/// The steps of the first seed and the opcodes that must succeed, in order.
/// Node ids: 0 the root, 1 `d`, 2 `d/f`; handle 0 is `f`'s, 1 `d`'s.
fn files() -> Vec<u8> {
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0o022,
    };
    let create = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: 0o100644,
        umask: 0o022,
        fuse_flags: 0,
    };
    let data = b"hello, fuzzer";
    let write = WriteIn {
        size: data.len() as u32,
        ..WriteIn::default()
    };
    let read = ReadIn {
        size: 4096,
        ..ReadIn::default()
    };
    let xattr = SetxattrIn { size: 3, flags: 0 };
    let list = GetxattrIn {
        size: 4096,
        padding: 0,
    };
    [
        init(),
        step(0, FUSE_MKDIR, 0, &cat(&[mkdir.as_slice(), b"d\0"]), &[]),
        step(0, FUSE_CREATE, 1, &cat(&[create.as_slice(), b"f\0"]), &[]),
        step(
            KNOWN_HANDLE,
            FUSE_WRITE,
            2,
            &cat(&[write.as_slice(), data]),
            &[],
        ),
        step(KNOWN_HANDLE, FUSE_READ, 2, read.as_slice(), &[]),
        step(
            KNOWN_HANDLE,
            FUSE_FLUSH,
            2,
            FlushIn::default().as_slice(),
            &[],
        ),
        step(
            KNOWN_HANDLE,
            FUSE_RELEASE,
            2,
            ReleaseIn::default().as_slice(),
            &[],
        ),
        step(
            KNOWN_NODE,
            FUSE_RENAME,
            1,
            &cat(&[RenameIn::default().as_slice(), b"f\0g\0"]),
            &[],
        ),
        step(0, FUSE_LOOKUP, 1, b"g\0", &[]),
        step(0, FUSE_GETATTR, 2, GetattrIn::default().as_slice(), &[]),
        step(
            0,
            FUSE_SETXATTR,
            2,
            &cat(&[xattr.as_slice(), b"user.a\0xyz"]),
            &[],
        ),
        step(0, FUSE_LISTXATTR, 2, list.as_slice(), &[]),
        step(0, FUSE_OPENDIR, 1, OpenIn::default().as_slice(), &[]),
        step(KNOWN_HANDLE, FUSE_READDIR, 1, read.as_slice(), &[]),
        step(0, FUSE_UNLINK, 1, b"g\0", &[]),
        step(0, FUSE_RMDIR, 0, b"d\0", &[]),
        step(0, FUSE_STATFS, 0, &[], &[]),
    ]
    .concat()
}

/// The same requests in chains a hostile guest lays out: a header split
/// across descriptors, a reply buffer too short, overlapping descriptors
/// over the request, the descriptor table and unmapped memory, a not-root
/// caller.
fn layouts() -> Vec<u8> {
    let mkdir = MkdirIn {
        mode: 0o700,
        umask: 0,
    };
    let body = cat(&[mkdir.as_slice(), b"x\0"]);
    let len = (40 + body.len()) as u32;
    let mut custom = vec![4u8];
    for (place, offset, len, kind) in [
        (0u8, 0u16, len, 0u8),
        (0, 8, len, 0),
        (4, 0, 64, 1),
        (5, 0, 16, 1),
        (1, 0, 4096, 1),
    ] {
        custom.extend_from_slice(&[place]);
        custom.extend_from_slice(&offset.to_le_bytes());
        custom.extend_from_slice(&len.to_le_bytes());
        custom.push(kind);
    }
    [
        init(),
        step(LAYOUT_SPLIT, FUSE_MKDIR, 0, &body, &20u16.to_le_bytes()),
        step(
            LAYOUT_SHORT_REPLY,
            FUSE_LOOKUP,
            0,
            b"x\0",
            &8u16.to_le_bytes(),
        ),
        step(LAYOUT_FROM_INPUT, FUSE_MKDIR, 0, &body, &custom),
        step(NOT_ROOT, FUSE_MKDIR, 1, &body, &[]),
    ]
    .concat()
}

/// The seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    vec![files(), layouts(), init()]
}

#[cfg(test)]
mod tests {
    use super::super::run;
    use super::*;

    /// The opcodes of [`files`], each of which succeeds.
    const FILES_OPCODES: [u32; 17] = [
        FUSE_INIT,
        FUSE_MKDIR,
        FUSE_CREATE,
        FUSE_WRITE,
        FUSE_READ,
        FUSE_FLUSH,
        FUSE_RELEASE,
        FUSE_RENAME,
        FUSE_LOOKUP,
        FUSE_GETATTR,
        FUSE_SETXATTR,
        FUSE_LISTXATTR,
        FUSE_OPENDIR,
        FUSE_READDIR,
        FUSE_UNLINK,
        FUSE_RMDIR,
        FUSE_STATFS,
    ];

    #[test]
    fn every_step_of_the_files_seed_succeeds() {
        let answers = run(&files());
        let expected: Vec<(u32, i32)> = FILES_OPCODES.iter().map(|&op| (op, 0)).collect();
        assert_eq!(answers, expected);
    }

    #[test]
    fn the_layouts_seed_is_served() {
        let answers = run(&layouts());
        // INIT, the split MKDIR, then the short reply buffer (a LOOKUP whose
        // entry does not fit has no reply at REPLY or an error), then the
        // not-root MKDIR in a root-owned 0755 directory.
        assert_eq!(answers.first(), Some(&(FUSE_INIT, 0)));
        assert_eq!(answers.get(1), Some(&(FUSE_MKDIR, 0)));
        assert_eq!(answers.last(), Some(&(FUSE_MKDIR, libc::EACCES)));
    }
}
