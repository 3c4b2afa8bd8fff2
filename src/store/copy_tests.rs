//! `copy` and `verify` between in-memory volumes: everything a volume
//! holds arrives (holes stay holes), an interrupted copy is finished by a
//! rerun, a volume with other files is refused, and a changed byte is
//! found.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::store::hooked::Hooked;
use crate::store::mem::MemStore;
use crate::store::{Timestamp, BLOCK_SIZE};

const MIB: u64 = 1 << 20;

fn dir(ino: u64, parent: u64) -> Inode {
    Inode {
        kind: FileKind::Directory,
        perm: 0o755,
        nlink: 2,
        parent,
        ..Inode::regular(ino, 0)
    }
}

fn entry(name: &str, ino: u64, kind: FileKind, cookie: u64) -> Dirent {
    Dirent {
        name: name.into(),
        ino,
        kind,
        cookie,
    }
}

fn commit(s: &dyn Store, ops: Vec<Op>) {
    s.commit(Txn { ops }).unwrap();
}

/// A volume with a directory, a sparse file of two extents linked twice,
/// a symlink, a fifo, extended attributes and a file of many chunks.
fn source() -> MemStore {
    let s = MemStore::new(1 << 30);
    let big: Vec<u8> = (0..5 * MIB).map(|i| (i % 251) as u8).collect();
    let mut file = Inode::regular(20, 3 * MIB + 5);
    file.nlink = 2;
    file.uid = 1000;
    file.mtime = Timestamp { sec: 7, nsec: 9 };
    commit(
        &s,
        vec![
            Op::PutInode(dir(ROOT_INO, ROOT_INO)),
            Op::PutInode(dir(10, ROOT_INO)),
            Op::PutDirent {
                parent: ROOT_INO,
                dirent: entry("d", 10, FileKind::Directory, 100),
            },
            Op::PutInode(file),
            Op::Write {
                ino: 20,
                offset: 0,
                data: vec![1u8; 4096].into(),
            },
            Op::Write {
                ino: 20,
                offset: 3 * MIB,
                data: vec![2u8; 5].into(),
            },
            Op::PutDirent {
                parent: 10,
                dirent: entry("f", 20, FileKind::Regular, 101),
            },
            Op::PutDirent {
                parent: ROOT_INO,
                dirent: entry("hard", 20, FileKind::Regular, 102),
            },
            Op::SetXattr {
                ino: 20,
                name: b"user.k".to_vec(),
                value: b"v".to_vec(),
            },
            Op::PutInode(Inode {
                kind: FileKind::Symlink,
                size: 3,
                ..Inode::regular(30, 3)
            }),
            Op::SetSymlink {
                ino: 30,
                target: b"d/f".to_vec(),
            },
            Op::PutDirent {
                parent: 10,
                dirent: entry("link", 30, FileKind::Symlink, 103),
            },
            Op::PutInode(Inode {
                kind: FileKind::Fifo,
                ..Inode::regular(40, 0)
            }),
            Op::PutDirent {
                parent: ROOT_INO,
                dirent: entry("fifo", 40, FileKind::Fifo, 104),
            },
        ],
    );
    commit(
        &s,
        vec![
            Op::PutInode(Inode::regular(50, big.len() as u64)),
            Op::Write {
                ino: 50,
                offset: 0,
                data: big.into(),
            },
            Op::PutDirent {
                parent: 10,
                dirent: entry("big", 50, FileKind::Regular, 105),
            },
        ],
    );
    s
}

fn quiet(_: Progress) {}

#[test]
fn a_copy_holds_everything_and_verifies() {
    let (src, dst) = (source(), MemStore::new(1 << 30));
    let mut last = Progress::default();
    let copied = copy(&src, &dst, &mut |p| last = p).unwrap();
    assert_eq!(
        copied.inodes, 6,
        "root, d, f (once for two links), link, fifo, big"
    );
    // Whole blocks of data (the first is one block), never the hole.
    assert_eq!(
        copied.bytes,
        BLOCK_SIZE + 5 + 5 * MIB,
        "only the data, not the hole"
    );
    assert!(!copied.resumed);
    assert!(copied.txns >= 3, "5 MiB does not fit one transaction");
    assert_eq!(last.inodes, 6);
    let checked = verify(&src, &dst, &mut quiet).unwrap();
    assert_eq!(checked.inodes, 6);
    // The hole is one on the copy too.
    assert_eq!(dst.next_hole(20, 0).unwrap(), BLOCK_SIZE.max(4096));
    assert_eq!(dst.get_xattr(ROOT_INO, COPYING_XATTR).unwrap(), None);
    // New inodes and cookies on the copy do not collide with copied ones.
    assert!(dst.reserve_ids(1).unwrap() > 105);
}

/// A destination over `inner` whose commits fail after `left` transactions.
fn fail_after(inner: &Arc<MemStore>, left: usize) -> Hooked<MemStore> {
    let left = AtomicUsize::new(left);
    Hooked::new(Arc::clone(inner), "interrupted").before_commit(move |_| {
        left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map(|_| ())
            .map_err(|_| StoreError::Io(std::io::Error::other("interrupted")))
    })
}

#[test]
fn an_interrupted_copy_is_finished_by_a_rerun() {
    let src = source();
    let inner = Arc::new(MemStore::new(1 << 30));
    let failing = fail_after(&inner, 2);
    assert!(matches!(
        copy(&src, &failing, &mut quiet),
        Err(CopyError::Destination(_))
    ));
    assert!(
        verify(&src, &*inner, &mut quiet).is_err(),
        "the first run stopped half way"
    );
    let again = copy(&src, &*inner, &mut quiet).unwrap();
    assert!(again.resumed);
    verify(&src, &*inner, &mut quiet).unwrap();
    // Once more after it finished: it is a copy already, nothing written.
    let once_more = copy(&src, &*inner, &mut quiet).unwrap();
    assert!(once_more.already && once_more.txns == 0);
}

#[test]
fn a_volume_with_other_files_is_refused_and_a_changed_byte_is_found() {
    let src = source();
    let other = source();
    // Equal to the source, it would count as a finished copy.
    commit(
        &other,
        vec![Op::PutInode(Inode {
            perm: 0o600,
            ..Inode::regular(40, 0)
        })],
    );
    assert!(matches!(
        copy(&src, &other, &mut quiet),
        Err(CopyError::NotEmpty(_))
    ));
    let dst = MemStore::new(1 << 30);
    copy(&src, &dst, &mut quiet).unwrap();
    commit(
        &dst,
        vec![Op::Write {
            ino: 50,
            offset: 3 * MIB + 7,
            data: vec![0xee].into(),
        }],
    );
    let err = verify(&src, &dst, &mut quiet).unwrap_err().to_string();
    assert!(err.contains("inode 50: data in 3145728..4194304"), "{err}");
}

/// A file of nearly 2^63 bytes, nearly all hole (a guest's `truncate -s`),
/// copies and verifies by its data alone, in moments; data the copy has
/// where the source has a hole is found all the same.
#[test]
fn a_huge_sparse_file_copies_and_verifies_by_its_data() {
    let huge = i64::MAX as u64;
    let src = Arc::new(MemStore::new(1 << 30));
    commit(
        &*src,
        vec![
            Op::PutInode(dir(ROOT_INO, ROOT_INO)),
            Op::PutInode(Inode::regular(60, huge)),
            Op::Write {
                ino: 60,
                offset: MIB,
                data: vec![3u8; 5].into(),
            },
            Op::Write {
                ino: 60,
                offset: huge - 10,
                data: vec![4u8; 10].into(),
            },
            Op::PutDirent {
                parent: ROOT_INO,
                dirent: entry("huge", 60, FileKind::Regular, 106),
            },
        ],
    );
    let dst = Arc::new(MemStore::new(1 << 30));
    copy(&*src, &*dst, &mut quiet).unwrap();
    // Bounded: reading the whole size would take years.
    let verified = |dst: Arc<MemStore>| {
        let src = Arc::clone(&src);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(verify(&*src, &*dst, &mut quiet).map_err(|e| e.to_string()));
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("verification of a sparse file did not end within 60 s")
    };
    let checked = verified(Arc::clone(&dst)).unwrap();
    assert!(checked.bytes < 3 * MIB, "{checked:?}");
    commit(
        &*dst,
        vec![Op::Write {
            ino: 60,
            offset: 1 << 40,
            data: vec![0xee].into(),
        }],
    );
    let err = verified(dst).unwrap_err();
    assert!(err.contains("inode 60: data in 1099511627776.."), "{err}");
}
