//! Unit tests of the filesystem layer on the `mem:` store, driven through the
//! `FileSystem` trait the way the FUSE server drives it.

use std::ffi::CString;
use std::io::{self, Write};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn, SetattrValid};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter,
};
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use pohmelfs_testkit::GuestBytes;

use super::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::{Store, ROOT_INO};

struct BufWriter {
    data: Vec<u8>,
    cap: usize,
}

impl Write for BufWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.cap - self.data.len());
        self.data.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for BufWriter {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _count: usize,
        _off: u64,
    ) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn available_bytes(&self) -> usize {
        self.cap - self.data.len()
    }
}

fn new_fs() -> (PohmelFs, Arc<MemStore>) {
    let store = Arc::new(MemStore::new(64 << 20));
    let fs = PohmelFs::new(
        store.clone(),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    (fs, store)
}

fn root() -> Context {
    Context::new()
}

fn user(uid: u32) -> Context {
    let mut c = Context::new();
    c.uid = uid;
    c.gid = uid;
    c
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn errno<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().unwrap(),
    }
}

fn create(fs: &PohmelFs, ctx: &Context, parent: u64, name: &str, mode: u32) -> (Entry, u64) {
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | mode,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, _, _) = fs.create(ctx, parent, &c(name), args).unwrap();
    (e, h.unwrap())
}

fn write(fs: &PohmelFs, ino: u64, h: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
    let mut r = GuestBytes::new(data.to_vec());
    fs.write(
        &root(),
        ino,
        h,
        &mut r,
        data.len() as u32,
        offset,
        None,
        false,
        0,
        0,
    )
}

fn read(fs: &PohmelFs, ino: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut w = BufWriter {
        data: Vec::new(),
        cap: 4 << 20,
    };
    fs.read(&root(), ino, 0, &mut w, size, offset, None, 0)
        .unwrap();
    w.data
}

fn names(fs: &PohmelFs, dir: u64) -> Vec<String> {
    let mut out = Vec::new();
    fs.readdir(&root(), dir, 0, 4096, 0, &mut |d: DirEntry| {
        out.push(String::from_utf8_lossy(d.name).into_owned());
        Ok(1)
    })
    .unwrap();
    out
}

fn attr_of(fs: &PohmelFs, ino: u64) -> stat64 {
    fs.getattr(&root(), ino, None).unwrap().0
}

#[test]
fn write_read_round_trip_across_blocks() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for (i, chunk) in data.chunks(100_000).enumerate() {
        assert_eq!(
            write(&fs, e.inode, h, (i * 100_000) as u64, chunk).unwrap(),
            chunk.len()
        );
    }
    assert_eq!(attr_of(&fs, e.inode).st_size, 300_000);
    let mut got = Vec::new();
    while got.len() < data.len() {
        let part = read(&fs, e.inode, got.len() as u64, 65_536);
        assert!(!part.is_empty());
        got.extend(part);
    }
    assert_eq!(got, data);
    // Reads are clipped at the end of the file.
    assert_eq!(read(&fs, e.inode, 299_990, 100).len(), 10);
    assert!(read(&fs, e.inode, 400_000, 100).is_empty());
}

#[test]
fn a_write_larger_than_its_message_is_refused() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    let mut r = GuestBytes::new(vec![1u8; 10]);
    let res = fs.write(&root(), e.inode, h, &mut r, 4096, 0, None, false, 0, 0);
    assert_eq!(errno(res), libc::EINVAL);
    let mut r = GuestBytes::new(vec![]);
    let res = fs.write(&root(), e.inode, h, &mut r, u32::MAX, 0, None, false, 0, 0);
    assert_eq!(errno(res), libc::EINVAL);
    assert_eq!(attr_of(&fs, e.inode).st_size, 0);
}

#[test]
fn names_are_validated() {
    let (fs, _) = new_fs();
    let long = "x".repeat(256);
    assert_eq!(
        errno(fs.mkdir(&root(), ROOT_INO, &c(&long), 0o755, 0)),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs.mkdir(&root(), ROOT_INO, &c("a/b"), 0o755, 0)),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs.lookup(&root(), ROOT_INO, &c(&long))),
        libc::ENAMETOOLONG
    );
    fs.mkdir(&root(), ROOT_INO, &c(&"y".repeat(255)), 0o755, 0)
        .unwrap();
}

#[test]
fn unlinked_open_file_lives_until_forgotten() {
    let (fs, store) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    write(&fs, e.inode, h, 0, b"still here").unwrap();
    fs.unlink(&root(), ROOT_INO, &c("f")).unwrap();
    assert_eq!(errno(fs.lookup(&root(), ROOT_INO, &c("f"))), libc::ENOENT);
    // The guest still holds the inode: its data must still read.
    assert_eq!(read(&fs, e.inode, 0, 100), b"still here");
    assert_eq!(attr_of(&fs, e.inode).st_nlink, 0);
    fs.forget(&root(), e.inode, 1);
    assert!(store.get_inode(e.inode).unwrap().is_none());
    assert_eq!(store.statfs().unwrap().used_bytes, 0);
}

#[test]
fn unlink_without_references_removes_at_once() {
    let (fs, store) = new_fs();
    let (e, _) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    fs.forget(&root(), e.inode, 1);
    fs.unlink(&root(), ROOT_INO, &c("f")).unwrap();
    assert!(store.get_inode(e.inode).unwrap().is_none());
}

#[test]
fn hard_links_count_and_survive_unlink_of_one_name() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "a", 0o644);
    write(&fs, e.inode, h, 0, b"data").unwrap();
    let l = fs.link(&root(), e.inode, ROOT_INO, &c("b")).unwrap();
    assert_eq!(l.inode, e.inode);
    assert_eq!(attr_of(&fs, e.inode).st_nlink, 2);
    fs.unlink(&root(), ROOT_INO, &c("a")).unwrap();
    let b = fs.lookup(&root(), ROOT_INO, &c("b")).unwrap();
    assert_eq!(b.attr.st_nlink, 1);
    assert_eq!(read(&fs, b.inode, 0, 10), b"data");
    assert_eq!(
        errno(fs.link(&root(), ROOT_INO, ROOT_INO, &c("d"))),
        libc::EPERM
    );
}

#[test]
fn directories_count_links_and_refuse_removal_when_not_empty() {
    let (fs, _) = new_fs();
    let d = fs.mkdir(&root(), ROOT_INO, &c("d"), 0o755, 0).unwrap();
    assert_eq!(attr_of(&fs, ROOT_INO).st_nlink, 3);
    assert_eq!(d.attr.st_nlink, 2);
    fs.mkdir(&root(), d.inode, &c("sub"), 0o755, 0).unwrap();
    assert_eq!(attr_of(&fs, d.inode).st_nlink, 3);
    assert_eq!(errno(fs.rmdir(&root(), ROOT_INO, &c("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs.unlink(&root(), ROOT_INO, &c("d"))), libc::EISDIR);
    fs.rmdir(&root(), d.inode, &c("sub")).unwrap();
    fs.rmdir(&root(), ROOT_INO, &c("d")).unwrap();
    assert_eq!(attr_of(&fs, ROOT_INO).st_nlink, 2);
    assert_eq!(
        errno(fs.mkdir(&root(), d.inode, &c("x"), 0o755, 0)),
        libc::ENOENT
    );
}

#[test]
fn rename_replaces_moves_and_refuses_cycles() {
    let (fs, _) = new_fs();
    let a = fs.mkdir(&root(), ROOT_INO, &c("a"), 0o755, 0).unwrap();
    let b = fs.mkdir(&root(), a.inode, &c("b"), 0o755, 0).unwrap();
    // A directory into its own subtree.
    assert_eq!(
        errno(fs.rename(&root(), ROOT_INO, &c("a"), b.inode, &c("a2"), 0)),
        libc::EINVAL
    );
    // Move b up: link counts follow.
    fs.rename(&root(), a.inode, &c("b"), ROOT_INO, &c("b"), 0)
        .unwrap();
    assert_eq!(attr_of(&fs, a.inode).st_nlink, 2);
    assert_eq!(attr_of(&fs, ROOT_INO).st_nlink, 4);
    let dotdot = fs.lookup(&root(), b.inode, &c("..")).unwrap();
    assert_eq!(dotdot.inode, ROOT_INO);
    // Replace a file with a file.
    let (f1, h1) = create(&fs, &root(), ROOT_INO, "f1", 0o644);
    write(&fs, f1.inode, h1, 0, b"one").unwrap();
    let (f2, _) = create(&fs, &root(), ROOT_INO, "f2", 0o644);
    fs.rename(&root(), ROOT_INO, &c("f1"), ROOT_INO, &c("f2"), 0)
        .unwrap();
    let now = fs.lookup(&root(), ROOT_INO, &c("f2")).unwrap();
    assert_eq!(now.inode, f1.inode);
    assert_eq!(attr_of(&fs, f2.inode).st_nlink, 0);
    // Type mismatches.
    assert_eq!(
        errno(fs.rename(&root(), ROOT_INO, &c("f2"), ROOT_INO, &c("a"), 0)),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs.rename(&root(), ROOT_INO, &c("a"), ROOT_INO, &c("f2"), 0)),
        libc::ENOTDIR
    );
    // A directory over a non-empty directory.
    fs.mkdir(&root(), b.inode, &c("x"), 0o755, 0).unwrap();
    assert_eq!(
        errno(fs.rename(&root(), ROOT_INO, &c("a"), ROOT_INO, &c("b"), 0)),
        libc::ENOTEMPTY
    );
    // A directory over an empty directory, same parent.
    fs.rename(&root(), ROOT_INO, &c("b"), ROOT_INO, &c("a"), 0)
        .unwrap();
    assert_eq!(attr_of(&fs, ROOT_INO).st_nlink, 3);
    assert_eq!(names(&fs, ROOT_INO), vec![".", "..", "f2", "a"]);
}

#[test]
fn rename_noreplace_and_exchange() {
    let (fs, _) = new_fs();
    let (x, _) = create(&fs, &root(), ROOT_INO, "x", 0o644);
    let d = fs.mkdir(&root(), ROOT_INO, &c("d"), 0o755, 0).unwrap();
    let sub = fs.mkdir(&root(), d.inode, &c("sub"), 0o755, 0).unwrap();
    assert_eq!(
        errno(fs.rename(
            &root(),
            ROOT_INO,
            &c("x"),
            ROOT_INO,
            &c("d"),
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    assert_eq!(
        errno(fs.rename(
            &root(),
            ROOT_INO,
            &c("x"),
            ROOT_INO,
            &c("nope"),
            libc::RENAME_EXCHANGE
        )),
        libc::ENOENT
    );
    // Exchange a file at the root with a directory inside d.
    fs.rename(
        &root(),
        ROOT_INO,
        &c("x"),
        d.inode,
        &c("sub"),
        libc::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(
        fs.lookup(&root(), ROOT_INO, &c("x")).unwrap().inode,
        sub.inode
    );
    assert_eq!(
        fs.lookup(&root(), d.inode, &c("sub")).unwrap().inode,
        x.inode
    );
    assert_eq!(
        fs.lookup(&root(), sub.inode, &c("..")).unwrap().inode,
        ROOT_INO
    );
    assert_eq!(attr_of(&fs, d.inode).st_nlink, 2);
    assert_eq!(attr_of(&fs, ROOT_INO).st_nlink, 4);
    assert_eq!(
        errno(fs.rename(&root(), ROOT_INO, &c("x"), ROOT_INO, &c("y"), 0x80)),
        libc::EINVAL
    );
}

#[test]
fn readdir_resumes_from_any_offset_and_plus_counts_lookups() {
    let (fs, store) = new_fs();
    for i in 0..300 {
        create(&fs, &root(), ROOT_INO, &format!("f{i:03}"), 0o644);
    }
    // Read two entries per call, resuming from the last offset.
    let mut offset = 0;
    let mut seen = Vec::new();
    loop {
        let mut batch = Vec::new();
        fs.readdir(&root(), ROOT_INO, 0, 4096, offset, &mut |d: DirEntry| {
            if batch.len() == 2 {
                return Ok(0);
            }
            batch.push((String::from_utf8_lossy(d.name).into_owned(), d.offset));
            Ok(1)
        })
        .unwrap();
        if batch.is_empty() {
            break;
        }
        offset = batch.last().unwrap().1;
        seen.extend(batch.into_iter().map(|(n, _)| n));
    }
    assert_eq!(seen.len(), 302);
    assert_eq!(&seen[..3], &[".", "..", "f000"]);
    // readdirplus hands out references: forgetting them frees unlinked files.
    let (e, _) = create(&fs, &root(), ROOT_INO, "zz", 0o644);
    fs.forget(&root(), e.inode, 1);
    let mut plus_seen = 0;
    fs.readdirplus(
        &root(),
        ROOT_INO,
        0,
        4096,
        0,
        &mut |d: DirEntry, _e: Entry| {
            if d.name == b"zz" {
                plus_seen += 1;
            }
            Ok(1)
        },
    )
    .unwrap();
    assert_eq!(plus_seen, 1);
    fs.unlink(&root(), ROOT_INO, &c("zz")).unwrap();
    assert!(
        store.get_inode(e.inode).unwrap().is_some(),
        "readdirplus reference keeps it"
    );
    fs.forget(&root(), e.inode, 1);
    assert!(store.get_inode(e.inode).unwrap().is_none());
}

#[test]
fn permissions_are_enforced_for_other_users() {
    let (fs, _) = new_fs();
    let d = fs
        .mkdir(&root(), ROOT_INO, &c("private"), 0o700, 0)
        .unwrap();
    assert_eq!(
        errno(fs.lookup(&user(1000), d.inode, &c("x"))),
        libc::EACCES
    );
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert_eq!(
        errno(fs.create(&user(1000), d.inode, &c("x"), args)),
        libc::EACCES
    );
    let (f, _) = create(&fs, &root(), ROOT_INO, "rootfile", 0o644);
    assert_eq!(
        errno(fs.open(&user(1000), f.inode, libc::O_WRONLY as u32, 0)),
        libc::EACCES
    );
    assert!(fs
        .open(&user(1000), f.inode, libc::O_RDONLY as u32, 0)
        .is_ok());
    // chmod by a non-owner is refused; chown to another user too.
    let mut st = attr_of(&fs, f.inode);
    st.st_mode = 0o777;
    assert_eq!(
        errno(fs.setattr(&user(1000), f.inode, st, None, SetattrValid::MODE)),
        libc::EPERM
    );
    let tmp = fs.mkdir(&root(), ROOT_INO, &c("tmp"), 0o1777, 0).unwrap();
    create(&fs, &user(1001), tmp.inode, "theirs", 0o644);
    assert_eq!(
        errno(fs.unlink(&user(1000), tmp.inode, &c("theirs"))),
        libc::EPERM
    );
    fs.unlink(&user(1001), tmp.inode, &c("theirs")).unwrap();
    assert_eq!(
        fs.access(&user(1000), d.inode, libc::R_OK as u32)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EACCES)
    );
    fs.access(&root(), d.inode, libc::R_OK as u32 | libc::W_OK as u32)
        .unwrap();
}

#[test]
fn root_dir_is_writable_by_root_only_at_first() {
    let (fs, _) = new_fs();
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert_eq!(
        errno(fs.create(&user(1000), ROOT_INO, &c("x"), args)),
        libc::EACCES
    );
}

/// Regressions found by pjdfstest through `pohmelfs mount` (docs/posix.md).
#[path = "posix_tests.rs"]
mod posix;

/// Issue 13 point 5's fixes in this layer.
#[path = "hardening_tests.rs"]
mod hardening;

/// Attributes, extended attributes, holes, fallocate, special nodes,
/// append and O_TRUNC, a full volume, session reset and statfs.
#[path = "file_tests.rs"]
mod files;

/// Inode ids reserved ahead of the creates that need them.
#[path = "ids_tests.rs"]
mod ids;
