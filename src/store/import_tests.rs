//! `import` of a real directory tree into an in-memory volume: kinds,
//! permission bits with setuid, owners, times, xattrs, hard links, holes
//! and a symlink arrive as the host has them.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use super::*;
use crate::store::mem::MemStore;

fn lookup(s: &dyn Store, parent: u64, name: &str) -> Inode {
    let d = s
        .lookup(parent, name.as_bytes())
        .unwrap()
        .unwrap_or_else(|| panic!("{name} not imported"));
    s.get_inode(d.ino).unwrap().unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> bool {
    let (p, n) = (
        CString::new(path.as_os_str().as_bytes()).unwrap(),
        CString::new(name).unwrap(),
    );
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        ) == 0
    }
}

#[test]
fn a_tree_arrives_with_what_a_root_filesystem_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir(root.join("etc")).unwrap();
    let tool = root.join("usr/bin/tool");
    std::fs::write(&tool, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::hard_link(&tool, root.join("usr/bin/alias")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    // 3 MiB with data only in the middle MiB.
    let sparse = root.join("etc/sparse");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 1 << 20], 1 << 20).unwrap();
    drop(f);
    let fifo = CString::new(root.join("etc/fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let has_xattrs = set_xattr(&tool, "user.pohmelfs-test", b"cap");

    let vol = MemStore::new(1 << 30);
    let mut seen = Progress::default();
    let done = import(&root, &vol, &mut |p| seen = p).unwrap();
    assert_eq!(done.entries, 8, "usr bin tool alias etc sparse fifo bin");
    assert_eq!(seen.entries, 8);
    assert_eq!(seen.total_entries, 8);

    let host = std::fs::metadata(&tool).unwrap();
    let usr = lookup(&vol, ROOT_INO, "usr");
    let bin = lookup(&vol, usr.ino, "bin");
    assert_eq!(bin.kind, FileKind::Directory);
    assert_eq!(bin.parent, usr.ino);
    let t = lookup(&vol, bin.ino, "tool");
    assert_eq!(t.perm, 0o4755, "setuid kept");
    assert_eq!((t.uid, t.gid), (host.uid(), host.gid()));
    assert_eq!(t.mtime.sec, host.mtime());
    assert_eq!(t.nlink, 2, "two names in the tree");
    assert_eq!(lookup(&vol, bin.ino, "alias").ino, t.ino, "one inode");
    let mut buf = vec![0u8; t.size as usize];
    vol.read(t.ino, 0, &mut buf).unwrap();
    assert_eq!(buf, b"#!/bin/sh\necho hi\n");
    if has_xattrs {
        assert_eq!(
            vol.get_xattr(t.ino, b"user.pohmelfs-test").unwrap(),
            Some(b"cap".to_vec())
        );
    }
    let link = lookup(&vol, ROOT_INO, "bin");
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(vol.readlink(link.ino).unwrap(), Some(b"usr/bin".to_vec()));
    let etc = lookup(&vol, ROOT_INO, "etc");
    let s = lookup(&vol, etc.ino, "sparse");
    assert_eq!(s.size, 3 << 20);
    assert_eq!(
        vol.next_data(s.ino, 0).unwrap(),
        Some(1 << 20),
        "the hole stays"
    );
    assert_eq!(lookup(&vol, etc.ino, "fifo").kind, FileKind::Fifo);
    let r = vol.get_inode(ROOT_INO).unwrap().unwrap();
    assert_eq!(r.nlink, 4, "root: . .. usr etc");
    // Ids the volume gives out later are new.
    assert!(vol.reserve_ids(1).unwrap() > t.ino);

    assert!(matches!(
        import(&root, &vol, &mut |_| {}),
        Err(ImportError::NotNew)
    ));
}

#[test]
fn device_numbers_are_encoded_as_fuse_carries_them() {
    assert_eq!(fuse_rdev(libc::makedev(1, 3)), 0x103);
    assert_eq!(fuse_rdev(libc::makedev(8, 0x1234)), 0x120_0834);
}
