//! `serve --readonly` end to end below the guest: a real `file://` volume
//! opened read-only (`store/engine/readonly.rs`) behind the write-back
//! layer, served by the device over the real vhost-user protocol
//! (`frontend_kit.rs`). Every request that would change the volume is
//! answered EROFS, reads answer as before, and the volume's directory is
//! byte for byte what it was: no holder record, no superblock update, no
//! log, no segment touched. copy_file_range is not served (ENOSYS).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    CopyFileRangeIn, EntryOut, FallocateIn, GetxattrIn, LinkIn, MkdirIn, MknodIn, OpenIn, OpenOut,
    ReadIn, Rename2In, RenameIn, SetattrIn, SetxattrIn, WriteIn,
};
use fuse_backend_rs::abi::fuse_abi::{CreateIn, Opcode};
use vm_memory::ByteValued;

use super::frontend_kit::Kit;
use crate::fs::FsConfig;
use crate::metrics::Metrics;
use crate::store::engine::{OpenMode, SlateStore};
use crate::store::{Dirent, FileKind, Inode, Op, Store, Txn, ROOT_INO};
use crate::writeback::{self, TxnConfig};

const F: u64 = 100;
const D: u64 = 101;
const L: u64 = 102;
const E: u64 = 104;
const F_BYTES: usize = 300 * 1024;

fn pattern() -> Vec<u8> {
    (0..F_BYTES).map(|i| (i * 7 % 251) as u8).collect()
}

fn dirent(name: &str, ino: u64, kind: FileKind) -> Op {
    Op::PutDirent {
        parent: ROOT_INO,
        dirent: Dirent {
            name: name.as_bytes().to_vec(),
            ino,
            kind,
            cookie: ino,
        },
    }
}

fn dir_inode(ino: u64) -> Inode {
    let mut i = Inode::regular(ino, 0);
    i.kind = FileKind::Directory;
    i.perm = 0o755;
    i.nlink = 2;
    i.parent = ROOT_INO;
    i
}

/// A volume at `url`: file `f` (300 KiB, xattr `user.k`), empty
/// directories `d` and `e`, symlink `l` to `f`; closed again.
fn populate(url: &str) {
    let s = SlateStore::open(url).unwrap();
    s.reserve_ids(1000).unwrap();
    let mut root = dir_inode(ROOT_INO);
    root.nlink = 4;
    let mut link = Inode::regular(L, 1);
    link.kind = FileKind::Symlink;
    let ops = vec![
        Op::PutInode(root),
        Op::PutInode(Inode::regular(F, F_BYTES as u64)),
        Op::PutInode(dir_inode(D)),
        Op::PutInode(dir_inode(E)),
        Op::PutInode(link),
        dirent("f", F, FileKind::Regular),
        dirent("d", D, FileKind::Directory),
        dirent("e", E, FileKind::Directory),
        dirent("l", L, FileKind::Symlink),
        Op::SetSymlink {
            ino: L,
            target: b"f".to_vec(),
        },
        Op::Write {
            ino: F,
            offset: 0,
            data: pattern().into(),
        },
        Op::SetXattr {
            ino: F,
            name: b"user.k".to_vec(),
            value: b"v".to_vec(),
        },
    ];
    s.commit(Txn { ops }).unwrap();
    s.close().unwrap();
}

/// Every file and directory under `dir`: size, mtime, inode, links, and
/// the contents' checksum.
fn listing(dir: &Path) -> BTreeMap<String, (u64, i64, i64, u64, u64, u32)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let crc = if m.is_file() {
                crate::checksum::crc32c(&std::fs::read(&path).unwrap())
            } else {
                todo.push(path.clone());
                0
            };
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            out.insert(
                name,
                (m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.nlink(), crc),
            );
        }
    }
    out
}

fn named(fixed: &[u8], names: &[&str]) -> Vec<u8> {
    let mut body = fixed.to_vec();
    for n in names {
        body.extend_from_slice(n.as_bytes());
        body.push(0);
    }
    body
}

/// The names in a READDIR reply (`fuse_dirent`s: ino, off, namelen,
/// type, the name padded to 8 bytes).
fn names(mut buf: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while buf.len() >= 24 {
        let len = u32::from_le_bytes(buf[16..20].try_into().unwrap()) as usize;
        out.push(String::from_utf8_lossy(&buf[24..24 + len]).into_owned());
        buf = &buf[((24 + len + 7) & !7).min(buf.len())..];
    }
    out
}

fn open(kit: &mut Kit, ino: u64, flags: i32) -> (i32, u64) {
    let body = OpenIn {
        flags: flags as u32,
        fuse_flags: 0,
    };
    let (err, reply) = kit.call(Opcode::Open, ino, body.as_slice());
    let fh = match err {
        0 => {
            OpenOut::from_slice(&reply[..std::mem::size_of::<OpenOut>()])
                .unwrap()
                .fh
        }
        _ => 0,
    };
    (err, fh)
}

/// A request: what it does, its opcode, node and body.
type Request = (&'static str, Opcode, u64, Vec<u8>);

/// Every request that would change the root directory.
fn namespace_requests() -> Vec<Request> {
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let mknod = MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..MknodIn::default()
    };
    let create = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o644,
        ..CreateIn::default()
    };
    let link = LinkIn { oldnodeid: F };
    let rename = RenameIn { newdir: D };
    let exchange = Rename2In {
        newdir: ROOT_INO,
        flags: libc::RENAME_EXCHANGE,
        padding: 0,
    };
    [
        ("mkdir", Opcode::Mkdir, named(mkdir.as_slice(), &["x"])),
        ("mknod", Opcode::Mknod, named(mknod.as_slice(), &["p"])),
        ("symlink", Opcode::Symlink, named(&[], &["s", "f"])),
        ("link", Opcode::Link, named(link.as_slice(), &["f2"])),
        ("unlink", Opcode::Unlink, named(&[], &["f"])),
        ("rmdir", Opcode::Rmdir, named(&[], &["e"])),
        (
            "rename",
            Opcode::Rename,
            named(rename.as_slice(), &["f", "g"]),
        ),
        (
            "exchange",
            Opcode::Rename2,
            named(exchange.as_slice(), &["f", "l"]),
        ),
        ("create", Opcode::Create, named(create.as_slice(), &["new"])),
    ]
    .into_iter()
    .map(|(what, op, body)| (what, op, ROOT_INO, body))
    .collect()
}

/// Every request that would change file `f` (`fh`: a handle of it open
/// for reading).
fn file_requests(fh: u64) -> Vec<Request> {
    let chmod = SetattrIn {
        valid: 1, // FATTR_MODE
        mode: libc::S_IFREG | 0o600,
        ..SetattrIn::default()
    };
    let truncate = SetattrIn {
        valid: 1 << 3, // FATTR_SIZE
        ..SetattrIn::default()
    };
    let write = WriteIn {
        fh,
        size: 5,
        ..WriteIn::default()
    };
    let fallocate = FallocateIn {
        fh,
        length: 4096,
        ..FallocateIn::default()
    };
    let setxattr = SetxattrIn { size: 1, flags: 0 };
    let setxattr = [&named(setxattr.as_slice(), &["user.k2"])[..], b"w"].concat();
    [
        ("chmod", Opcode::Setattr, chmod.as_slice().to_vec()),
        ("truncate", Opcode::Setattr, truncate.as_slice().to_vec()),
        (
            "write",
            Opcode::Write,
            [write.as_slice(), b"hello"].concat(),
        ),
        (
            "fallocate",
            Opcode::Fallocate,
            fallocate.as_slice().to_vec(),
        ),
        ("setxattr", Opcode::Setxattr, setxattr),
        ("removexattr", Opcode::Removexattr, named(&[], &["user.k"])),
    ]
    .into_iter()
    .map(|(what, op, body)| (what, op, F, body))
    .collect()
}

/// Every request that would change the volume, each answered EROFS.
fn refused_requests(kit: &mut Kit, fh: u64) {
    let erofs = libc::EROFS;
    for (what, opcode, ino, body) in namespace_requests().into_iter().chain(file_requests(fh)) {
        assert_eq!(kit.call(opcode, ino, &body).0, erofs, "{what}");
    }
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(open(kit, F, flags).0, erofs, "open with flags {flags:#o}");
    }
    // Not served at all: the guest falls back to reading and writing,
    // and its open for writing is refused above.
    let copy = CopyFileRangeIn {
        fh_in: fh,
        nodeid_out: F,
        fh_out: fh,
        offset_out: 4096,
        len: 4096,
        ..CopyFileRangeIn::default()
    };
    let (err, _) = kit.call(Opcode::CopyFileRange, F, copy.as_slice());
    assert_eq!(err, libc::ENOSYS, "copy_file_range");
}

/// What the guest reads: the same as before the volume was served
/// read-only.
fn reads_answer(kit: &mut Kit, fh: u64) {
    let (err, reply) = kit.call(Opcode::Lookup, ROOT_INO, &named(&[], &["f"]));
    assert_eq!(err, 0, "lookup");
    let entry = EntryOut::from_slice(&reply[..std::mem::size_of::<EntryOut>()]).unwrap();
    assert_eq!((entry.nodeid, entry.attr.size), (F, F_BYTES as u64));
    let (err, back) = kit.read(F, fh, 0x200000, 128 * 1024);
    assert_eq!(err, 0, "read");
    assert_eq!(back, pattern()[..128 * 1024]);
    let getxattr = GetxattrIn {
        size: 64,
        padding: 0,
    };
    let (err, value) = kit.call(
        Opcode::Getxattr,
        F,
        &named(getxattr.as_slice(), &["user.k"]),
    );
    assert_eq!((err, &value[..]), (0, &b"v"[..]), "getxattr");
    assert_eq!(kit.call(Opcode::Readlink, L, &[]), (0, b"f".to_vec()));
    let (err, dh) = {
        let (err, reply) = kit.call(Opcode::Opendir, ROOT_INO, OpenIn::default().as_slice());
        let fh = OpenOut::from_slice(&reply[..std::mem::size_of::<OpenOut>()]).map(|o| o.fh);
        (err, fh.unwrap_or(0))
    };
    assert_eq!(err, 0, "opendir");
    let readdir = ReadIn {
        fh: dh,
        size: 4096,
        ..ReadIn::default()
    };
    let (err, entries) = kit.call(Opcode::Readdir, ROOT_INO, readdir.as_slice());
    assert_eq!(err, 0, "readdir");
    // In cookie order: the order they were made in.
    assert_eq!(names(&entries), [".", "..", "f", "d", "l", "e"]);
    assert_eq!(kit.call(Opcode::Statfs, ROOT_INO, &[]).0, 0, "statfs");
    // Nothing to make durable: fsync and syncfs answer at once.
    let fsync = [0u8; 16];
    assert_eq!(kit.call(Opcode::Fsync, F, &fsync).0, 0, "fsync");
}

#[test]
fn a_read_only_daemon_refuses_every_change_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol");
    let url = format!("file://{}", vol.display());
    populate(&url);
    let before = listing(&vol);
    let store = writeback::open_as(
        &url,
        TxnConfig::default(),
        None,
        Arc::new(Metrics::default()),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let cfg = FsConfig {
        read_only: true,
        ..FsConfig::default()
    };
    let mut kit = Kit::start_configured("readonly", store.clone(), cfg);
    kit.init();
    let (err, fh) = open(&mut kit, F, libc::O_RDONLY);
    assert_eq!(err, 0, "open for reading");
    refused_requests(&mut kit, fh);
    reads_answer(&mut kit, fh);
    assert_eq!(store.unacked(), 0, "nothing was queued for the store");
    // The disconnect ends the session (the daemon's sync, its reset).
    drop(kit);
    drop(store);
    assert_eq!(listing(&vol), before, "the volume's files changed");
    assert!(!vol.join(crate::store::engine::holder::HOLDER).exists());
}
