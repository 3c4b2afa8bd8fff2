//! Unit tests of the filesystem layer, continued: attributes, extended
//! attributes, holes, fallocate, special nodes, append and O_TRUNC, a
//! full volume, session reset and statfs.

use super::*;

#[test]
fn setattr_truncates_chmods_and_sets_times() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    write(&fs, e.inode, h, 0, &[9u8; 1000]).unwrap();
    let mut st = attr_of(&fs, e.inode);
    st.st_size = 10;
    st.st_mode = 0o600;
    st.st_mtime = 1_000_000;
    st.st_mtime_nsec = 5;
    let valid = SetattrValid::SIZE | SetattrValid::MODE | SetattrValid::MTIME;
    let (after, _) = fs.setattr(&root(), e.inode, st, None, valid).unwrap();
    assert_eq!(after.st_size, 10);
    assert_eq!(after.st_mode & 0o7777, 0o600);
    assert_eq!((after.st_mtime, after.st_mtime_nsec), (1_000_000, 5));
    // Growing again reads zeros, not the old bytes.
    st.st_size = 20;
    fs.setattr(&root(), e.inode, st, None, SetattrValid::SIZE)
        .unwrap();
    let got = read(&fs, e.inode, 0, 20);
    assert_eq!(&got[..10], &[9u8; 10]);
    assert_eq!(&got[10..], &[0u8; 10]);
}

#[test]
fn xattrs_follow_the_linux_protocol() {
    let (fs, _) = new_fs();
    let (e, _) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    fs.setxattr(&root(), e.inode, &c("user.a"), b"hello", 0)
        .unwrap();
    assert_eq!(
        errno(fs.setxattr(&root(), e.inode, &c("user.a"), b"x", 1)),
        libc::EEXIST
    );
    assert_eq!(
        errno(fs.setxattr(&root(), e.inode, &c("user.b"), b"x", 2)),
        libc::ENODATA
    );
    assert!(matches!(
        fs.getxattr(&root(), e.inode, &c("user.a"), 0).unwrap(),
        GetxattrReply::Count(5)
    ));
    assert_eq!(
        errno(fs.getxattr(&root(), e.inode, &c("user.a"), 2)),
        libc::ERANGE
    );
    match fs.getxattr(&root(), e.inode, &c("user.a"), 100).unwrap() {
        GetxattrReply::Value(v) => assert_eq!(v, b"hello"),
        GetxattrReply::Count(_) => panic!("expected a value"),
    }
    assert_eq!(
        errno(fs.getxattr(&root(), e.inode, &c("security.selinux"), 100)),
        libc::ENODATA
    );
    match fs.listxattr(&root(), e.inode, 100).unwrap() {
        ListxattrReply::Names(n) => assert_eq!(n, b"user.a\0"),
        ListxattrReply::Count(_) => panic!("expected names"),
    }
    assert_eq!(
        errno(fs.setxattr(&root(), e.inode, &c("user.big"), &vec![0u8; 65_537], 0)),
        libc::E2BIG
    );
    assert_eq!(
        errno(fs.setxattr(&user(5), e.inode, &c("trusted.x"), b"1", 0)),
        libc::EPERM
    );
    assert_eq!(
        errno(fs.setxattr(&root(), e.inode, &c("system.posix_acl_access"), b"1", 0)),
        libc::EOPNOTSUPP
    );
    fs.removexattr(&root(), e.inode, &c("user.a")).unwrap();
    assert_eq!(
        errno(fs.removexattr(&root(), e.inode, &c("user.a"))),
        libc::ENODATA
    );
}

#[test]
fn lseek_finds_data_and_holes() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "sparse", 0o644);
    let bs = crate::store::BLOCK_SIZE;
    write(&fs, e.inode, h, 3 * bs, b"data").unwrap();
    assert_eq!(
        fs.lseek(&root(), e.inode, h, 0, libc::SEEK_DATA as u32)
            .unwrap(),
        3 * bs
    );
    assert_eq!(
        fs.lseek(&root(), e.inode, h, 0, libc::SEEK_HOLE as u32)
            .unwrap(),
        0
    );
    assert_eq!(
        fs.lseek(&root(), e.inode, h, 3 * bs + 1, libc::SEEK_HOLE as u32)
            .unwrap(),
        3 * bs + 4
    );
    assert_eq!(
        errno(fs.lseek(&root(), e.inode, h, 3 * bs + 4, libc::SEEK_DATA as u32)),
        libc::ENXIO
    );
}

#[test]
fn fallocate_extends_punches_and_refuses_unknown_modes() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    fs.fallocate(&root(), e.inode, h, 0, 0, 100_000).unwrap();
    assert_eq!(attr_of(&fs, e.inode).st_size, 100_000);
    write(&fs, e.inode, h, 0, &[1u8; 100]).unwrap();
    fs.fallocate(&root(), e.inode, h, 0x03, 10, 20).unwrap();
    let got = read(&fs, e.inode, 0, 100);
    assert_eq!(&got[..10], &[1u8; 10]);
    assert_eq!(&got[10..30], &[0u8; 20]);
    assert_eq!(&got[30..], &[1u8; 70]);
    assert_eq!(attr_of(&fs, e.inode).st_size, 100_000);
    assert_eq!(
        errno(fs.fallocate(&root(), e.inode, h, 0x08, 0, 10)),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno(fs.fallocate(&root(), e.inode, h, 0, 0, 0)),
        libc::EINVAL
    );
}

#[test]
fn symlinks_and_special_nodes() {
    let (fs, _) = new_fs();
    let s = fs
        .symlink(&root(), &c("/some/target"), ROOT_INO, &c("l"))
        .unwrap();
    assert_eq!(fs.readlink(&root(), s.inode).unwrap(), b"/some/target");
    assert_eq!(s.attr.st_size, 12);
    let fifo = fs
        .mknod(&root(), ROOT_INO, &c("p"), libc::S_IFIFO | 0o644, 0, 0)
        .unwrap();
    assert_eq!(fifo.attr.st_mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(
        errno(fs.mknod(
            &root(),
            ROOT_INO,
            &c("dev"),
            libc::S_IFCHR | 0o644,
            0x0101,
            0
        )),
        libc::EPERM
    );
    let long: String = "t".repeat(4096);
    assert_eq!(
        errno(fs.symlink(&root(), &c(&long), ROOT_INO, &c("l2"))),
        libc::ENAMETOOLONG
    );
}

#[test]
fn append_handles_write_at_the_end() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "log", 0o644);
    write(&fs, e.inode, h, 0, b"first,").unwrap();
    let (ah, _, _) = fs
        .open(
            &root(),
            e.inode,
            (libc::O_WRONLY | libc::O_APPEND) as u32,
            0,
        )
        .unwrap();
    let ah = ah.unwrap();
    // Where a write lands is known before the inode is locked only for a
    // handle that does not append (the device's inline check).
    assert_eq!(fs.write_offset(e.inode, h, 0), Some(0));
    assert_eq!(fs.write_offset(e.inode, ah, 0), None);
    write(&fs, e.inode, ah, 0, b"second").unwrap();
    assert_eq!(read(&fs, e.inode, 0, 100), b"first,second");
}

#[test]
fn open_with_o_trunc_empties_the_file() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    write(&fs, e.inode, h, 0, b"content").unwrap();
    fs.open(&root(), e.inode, (libc::O_WRONLY | libc::O_TRUNC) as u32, 0)
        .unwrap();
    assert_eq!(attr_of(&fs, e.inode).st_size, 0);
}

#[test]
fn a_full_volume_answers_enospc_and_keeps_old_data() {
    let store = Arc::new(MemStore::new(crate::store::BLOCK_SIZE));
    let fs = PohmelFs::new(store, FsConfig::default(), Arc::new(Metrics::default())).unwrap();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    write(&fs, e.inode, h, 0, b"kept").unwrap();
    let big = vec![1u8; 2 * crate::store::BLOCK_SIZE as usize];
    assert_eq!(errno(write(&fs, e.inode, h, 0, &big)), libc::ENOSPC);
    assert_eq!(read(&fs, e.inode, 0, 10), b"kept");
    assert_eq!(attr_of(&fs, e.inode).st_size, 4);
}

#[test]
fn session_reset_frees_orphans() {
    let (fs, store) = new_fs();
    let (e, _) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    fs.unlink(&root(), ROOT_INO, &c("f")).unwrap();
    assert!(store.get_inode(e.inode).unwrap().is_some());
    fs.reset_session();
    assert!(store.get_inode(e.inode).unwrap().is_none());
}

#[test]
fn statfs_reports_capacity_and_use() {
    let (fs, _) = new_fs();
    let (e, h) = create(&fs, &root(), ROOT_INO, "f", 0o644);
    write(&fs, e.inode, h, 0, &[1u8; 10]).unwrap();
    let st = fs.statfs(&root(), ROOT_INO).unwrap();
    assert_eq!(st.f_blocks, (64 << 20) / 4096);
    assert_eq!(st.f_bfree, st.f_blocks - crate::store::BLOCK_SIZE / 4096);
    assert_eq!(st.f_namemax, 255);
}
