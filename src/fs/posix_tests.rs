//! POSIX behaviour pjdfstest found wrong through `pohmelfs mount`, one test
//! per fix, on the helpers of the parent test module. See docs/posix.md.

use fuse_backend_rs::abi::fuse_abi::SetattrValid;
use fuse_backend_rs::api::filesystem::FileSystem;

use super::{attr_of, c, create, errno, root, user};
use crate::store::ROOT_INO;

/// A user who does not own the file: utimensat(UTIME_NOW, UTIME_NOW) needs
/// write access and is EACCES without it (not EPERM); an explicit time, or
/// one time set to now with the other omitted, is EPERM with or without
/// write access (vfs_utimes). pjdfstest utimensat::utime_now_nobody and
/// utimensat::nobody.
#[test]
fn times_by_non_owners_follow_vfs_utimes() {
    let (fs, _) = super::new_fs();
    let (e, _) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    let mut st = attr_of(&fs, e.inode);
    st.st_atime = 1_000;
    st.st_mtime = 2_000;
    let now = SetattrValid::ATIME
        | SetattrValid::ATIME_NOW
        | SetattrValid::MTIME
        | SetattrValid::MTIME_NOW;
    let explicit = SetattrValid::ATIME | SetattrValid::MTIME;
    let atime_now_only = SetattrValid::ATIME | SetattrValid::ATIME_NOW;
    let nobody = user(65534);
    assert_eq!(
        errno(fs.setattr(&nobody, e.inode, st, None, now)),
        libc::EACCES
    );
    for valid in [explicit, atime_now_only, SetattrValid::MTIME] {
        assert_eq!(
            errno(fs.setattr(&nobody, e.inode, st, None, valid)),
            libc::EPERM
        );
    }

    st.st_mode = 0o666;
    fs.setattr(&root(), e.inode, st, None, SetattrValid::MODE)
        .unwrap();
    fs.setattr(&nobody, e.inode, st, None, now).unwrap();
    for valid in [explicit, atime_now_only] {
        assert_eq!(
            errno(fs.setattr(&nobody, e.inode, st, None, valid)),
            libc::EPERM
        );
    }
    // With the writeback cache the kernel sends a touch as atime "now" and
    // its own mtime, equal to the ctime it sends along: still a touch.
    let kernel_touch =
        SetattrValid::ATIME | SetattrValid::ATIME_NOW | SetattrValid::MTIME | SetattrValid::CTIME;
    (st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec) = (5_000, 7, 5_000, 7);
    let (after, _) = fs
        .setattr(&nobody, e.inode, st, None, kernel_touch)
        .unwrap();
    assert_eq!((after.st_mtime, after.st_mtime_nsec), (5_000, 7));
    // The same shape with an mtime of the caller's choosing is not.
    st.st_mtime = 6_000;
    assert_eq!(
        errno(fs.setattr(&nobody, e.inode, st, None, kernel_touch)),
        libc::EPERM
    );

    // The owner may set any time, with or without write access.
    let public = fs.mkdir(&root(), ROOT_INO, &c("pub"), 0o777, 0).unwrap();
    let owner = create(&fs, &user(1000), public.inode, "mine", 0o444).0;
    let mut mine = attr_of(&fs, owner.inode);
    mine.st_mtime = 3_000;
    let (after, _) = fs
        .setattr(&user(1000), owner.inode, mine, None, SetattrValid::MTIME)
        .unwrap();
    assert_eq!(after.st_mtime, 3_000);
}

/// The 65,000th link of a file is refused with EMLINK. pjdfstest skips its
/// link::link_count_max on a FUSE mount (the C library reports the Linux
/// default LINK_MAX, 127, for a file system it does not know), so the limit
/// is checked here, from an inode brought next to it.
#[test]
fn link_count_stops_at_link_max() {
    use crate::store::{Op, Store, Txn};
    let (fs, store) = super::new_fs();
    let (e, _) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    let mut inode = store.get_inode(e.inode).unwrap().unwrap();
    inode.nlink = 64_999;
    let mut txn = Txn::new();
    txn.push(Op::PutInode(inode));
    store.commit(txn).unwrap();
    let linked = fs.link(&root(), e.inode, ROOT_INO, &c("last")).unwrap();
    assert_eq!(linked.attr.st_nlink, 65_000);
    assert_eq!(
        errno(fs.link(&root(), e.inode, ROOT_INO, &c("one_too_many"))),
        libc::EMLINK
    );
}
