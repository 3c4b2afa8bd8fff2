//! Issue 13 point 5, in the filesystem layer: names never go into a
//! removed directory, fallocate drops privileges like a write, and the
//! guest's references are bounded. See docs/security.md.

use std::sync::Arc;

use fuse_backend_rs::api::filesystem::{DirEntry, Entry, FileSystem};

use super::{attr_of, c, create, errno, root, user, write};
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::{Store, ROOT_INO};

/// A directory the guest still holds after rmdir takes no new names: a
/// link or rename there would leave the inode alive with no path to it.
#[test]
fn link_and_rename_into_a_removed_directory_are_enoent() {
    let (fs, store) = super::new_fs();
    let d = fs.mkdir(&root(), ROOT_INO, &c("d"), 0o755, 0).unwrap();
    let (f, _) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    fs.rmdir(&root(), ROOT_INO, &c("d")).unwrap();
    assert_eq!(
        errno(fs.link(&root(), f.inode, d.inode, &c("l"))),
        libc::ENOENT
    );
    assert_eq!(
        errno(fs.rename(&root(), ROOT_INO, &c("f"), d.inode, &c("g"), 0)),
        libc::ENOENT
    );
    // Nothing changed: the file keeps its one name and link count.
    assert_eq!(attr_of(&fs, f.inode).st_nlink, 1);
    assert!(store.lookup(ROOT_INO, b"f").unwrap().is_some());
    assert!(store.readdir(d.inode, 0, 16).unwrap().is_empty());
}

/// fallocate is a modification like a write: an unprivileged caller's
/// fallocate clears setuid/setgid, and any fallocate drops the file
/// capability (FUSE_HANDLE_KILLPRIV_V2 leaves both to the daemon).
#[test]
fn fallocate_drops_setuid_setgid_and_the_capability() {
    let (fs, _) = super::new_fs();
    let owner = user(1000);
    let dir = fs.mkdir(&root(), ROOT_INO, &c("d"), 0o777, 0).unwrap();
    let (e, h) = create(&fs, &owner, dir.inode, "f", 0o6755);
    assert_eq!(attr_of(&fs, e.inode).st_mode & 0o7777, 0o6755);
    fs.setxattr(&root(), e.inode, &c("security.capability"), b"cap", 0)
        .unwrap();
    fs.fallocate(&owner, e.inode, h, 0, 0, 8192).unwrap();
    assert_eq!(attr_of(&fs, e.inode).st_mode & 0o7777, 0o755);
    assert_eq!(
        errno(fs.getxattr(&root(), e.inode, &c("security.capability"), 64)),
        libc::ENODATA
    );
    // Root keeps setuid (CAP_FSETID), but the capability still goes.
    let (r, rh) = create(&fs, &root(), ROOT_INO, "r", 0o4755);
    fs.setxattr(&root(), r.inode, &c("security.capability"), b"cap", 0)
        .unwrap();
    fs.fallocate(&root(), r.inode, rh, 0, 0, 4096).unwrap();
    assert_eq!(attr_of(&fs, r.inode).st_mode & 0o7777, 0o4755);
    assert_eq!(
        errno(fs.getxattr(&root(), r.inode, &c("security.capability"), 64)),
        libc::ENODATA
    );
    write(&fs, r.inode, rh, 0, b"x").unwrap();
}

/// The lookup-count map is bounded: past `max_referenced_inodes` inodes,
/// references to new ones are refused (ENFILE) while those already held
/// still work, and a readdirplus ends its reply early.
#[test]
fn the_guest_holds_at_most_max_referenced_inodes() {
    let store = Arc::new(MemStore::new(64 << 20));
    let cfg = FsConfig {
        max_referenced_inodes: 3,
        ..FsConfig::default()
    };
    let fs = PohmelFs::new(store, cfg, Arc::new(Metrics::default())).unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(create(&fs, &root(), ROOT_INO, &format!("f{i}"), 0o644).0);
    }
    let args = fuse_backend_rs::abi::fuse_abi::CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert_eq!(
        errno(fs.create(&root(), ROOT_INO, &c("new"), args)),
        libc::ENFILE
    );
    assert_eq!(
        errno(fs.mkdir(&root(), ROOT_INO, &c("d"), 0o755, 0)),
        libc::ENFILE
    );
    // An inode the guest holds may be looked up and linked again.
    fs.lookup(&root(), ROOT_INO, &c("f0")).unwrap();
    fs.link(&root(), held[1].inode, ROOT_INO, &c("f1b"))
        .unwrap();
    // Forget one: a new inode fits again, and the next does not.
    fs.forget(&root(), held[2].inode, 1);
    fs.mkdir(&root(), ROOT_INO, &c("x"), 0o755, 0).unwrap();
    assert_eq!(errno(fs.lookup(&root(), ROOT_INO, &c("f2"))), libc::ENFILE);
    // readdirplus: the held inodes come back, the first one that is not
    // (f2) ends the reply; a reply that could hold nothing is ENFILE.
    let mut listed = Vec::new();
    fs.readdirplus(
        &root(),
        ROOT_INO,
        0,
        4096,
        0,
        &mut |d: DirEntry, _e: Entry| {
            listed.push((String::from_utf8_lossy(d.name).into_owned(), d.offset));
            Ok(1)
        },
    )
    .unwrap();
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [".", "..", "f0", "f1"]);
    let from = listed.last().unwrap().1;
    let r = fs.readdirplus(&root(), ROOT_INO, 0, 4096, from, &mut |_, _| Ok(1));
    assert_eq!(errno(r), libc::ENFILE);
}

/// A store whose listing never moves on: every batch is the same entry,
/// of an inode it does not have (a damaged volume, a hostile server).
struct StuckListing(MemStore);

impl Store for StuckListing {
    crate::store::delegate::delegate_store!(
        0: get_inode,
        lookup,
        next_data,
        next_hole,
        readlink,
        get_xattr,
        list_xattr,
        statfs,
        reserve_ids,
        read,
        commit,
        sync,
    );

    fn readdir(
        &self,
        _parent: u64,
        _after: u64,
        _max: usize,
    ) -> Result<Vec<crate::store::Dirent>, crate::store::StoreError> {
        Ok(vec![crate::store::Dirent {
            name: b"ghost".to_vec(),
            ino: 999,
            kind: crate::store::FileKind::Regular,
            cookie: 100,
        }])
    }

    fn describe(&self) -> String {
        "stuck listing".into()
    }
}

/// A listing whose cookies do not grow ends in EIO instead of asking the
/// store again for ever (readdirplus skips the missing inode and would
/// never fill its reply).
#[test]
fn a_listing_that_does_not_move_on_is_eio() {
    let fs = Arc::new(
        PohmelFs::new(
            Arc::new(StuckListing(MemStore::new(1 << 20))),
            FsConfig::default(),
            Arc::new(Metrics::default()),
        )
        .unwrap(),
    );
    for plus in [true, false] {
        let fs = Arc::clone(&fs);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut add = |_: DirEntry, _: Entry| Ok(1);
            let r = if plus {
                fs.readdirplus(&root(), ROOT_INO, 0, 4096, 2, &mut add)
            } else {
                fs.readdir(&root(), ROOT_INO, 0, 4096, 2, &mut |d| {
                    add(d, Entry::default())
                })
            };
            let _ = tx.send(errno(r));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the listing never ended");
        assert_eq!(got, libc::EIO, "readdirplus: {plus}");
    }
}

/// A guest may nest directories deeper than any fixed bound: a rename
/// into the deepest one works (the ancestor walk has no depth limit).
/// A parent chain that loops (a damaged volume) is EIO, not a hang.
#[test]
fn renames_know_deep_trees_from_loops() {
    let (fs, store) = super::new_fs();
    let mut dir = ROOT_INO;
    for _ in 0..5000 {
        dir = fs.mkdir(&root(), dir, &c("d"), 0o755, 0).unwrap().inode;
    }
    let x = fs.mkdir(&root(), ROOT_INO, &c("x"), 0o755, 0).unwrap();
    fs.rename(&root(), ROOT_INO, &c("x"), dir, &c("x"), 0)
        .unwrap();
    assert_eq!(fs.lookup(&root(), dir, &c("x")).unwrap().inode, x.inode);

    let a = fs.mkdir(&root(), ROOT_INO, &c("a"), 0o755, 0).unwrap();
    let b = fs.mkdir(&root(), a.inode, &c("b"), 0o755, 0).unwrap();
    fs.mkdir(&root(), ROOT_INO, &c("m"), 0o755, 0).unwrap();
    let mut looped = store.get_inode(a.inode).unwrap().unwrap();
    looped.parent = b.inode;
    store
        .commit(crate::store::Txn {
            ops: vec![crate::store::Op::PutInode(looped)],
        })
        .unwrap();
    // The daemon's cached attributes would hide the damage: a fresh one.
    let fs = PohmelFs::new(store, FsConfig::default(), Arc::new(Metrics::default())).unwrap();
    assert_eq!(
        errno(fs.rename(&root(), ROOT_INO, &c("m"), b.inode, &c("m"), 0)),
        libc::EIO
    );
}
