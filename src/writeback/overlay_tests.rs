//! Unit tests of `overlay.rs`: tracked directories and remembered
//! extended attributes within their bytes.

use super::*;
use crate::store::Timestamp;
use crate::writeback::testkit::put_entry;

fn created_dir(ino: u64) -> Op {
    Op::PutInode(Inode {
        ino,
        kind: FileKind::Directory,
        perm: 0o755,
        uid: 0,
        gid: 0,
        nlink: 2,
        size: 0,
        rdev: 0,
        atime: Timestamp::default(),
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        parent: 1,
    })
}

#[test]
fn complete_dirs_count_their_names_and_drop_the_oldest_over_budget() {
    let names = |dir: u64| (0..10).map(move |i| format!("name-{dir}-{i}"));
    // What one directory of ten names allocates: its table, as big as
    // the same inserts make it, and the names.
    let mut table = HashMap::new();
    for n in names(100) {
        table.insert(n, ());
    }
    let one_dir = DIR_ENTRY_BYTES
        + dir_table_bytes(table.capacity())
        + names(100)
            .map(|n| name_heap_bytes(n.as_bytes()))
            .sum::<u64>();
    let mut c = CompleteDirs::new(one_dir * 2);
    c.reserved(100, 1000);
    for dir in [100, 101] {
        c.apply(&created_dir(dir));
        for (i, n) in names(dir).enumerate() {
            c.apply(&put_entry(dir, &n, 200 + dir * 20 + i as u64));
        }
    }
    assert_eq!(c.bytes, 2 * one_dir);
    assert_eq!(c.size(), (2, 20));
    assert!(c.lookup(100, b"missing").is_some(), "100 is known complete");
    // A third directory crosses the bound: the oldest goes, for good.
    c.apply(&created_dir(102));
    assert_eq!(c.size(), (2, 10));
    assert!(c.lookup(100, b"missing").is_none(), "ask the store now");
    c.apply(&put_entry(100, "again", 999));
    assert!(c.lookup(100, b"again").is_none(), "never tracked again");
    // Removing names and directories gives their bytes back exactly.
    c.apply(&Op::RemoveDirent {
        parent: 101,
        name: b"name-101-0".to_vec(),
    });
    c.drop_dir(101);
    c.apply(&Op::RemoveInode { ino: 102 });
    assert_eq!((c.bytes, c.size()), (0, (0, 0)));
}

#[test]
fn known_xattrs_stay_within_their_bytes() {
    let value = Some(vec![7u8; 10]);
    let cost = xattr_cost(b"user.a", &value);
    let mut k = KnownXattrs::new(cost * 3);
    for ino in 0..3 {
        k.remember(0, ino, b"user.a", &value);
    }
    assert_eq!(k.bytes, 3 * cost);
    k.remember(0, 3, b"user.a", &value);
    assert!(k.bytes <= 3 * cost, "over its bound: {}", k.bytes);
    assert_eq!(k.get(3, b"user.a"), Some(value.clone()));
    k.drop_inode(3);
    k.created(9);
    assert_eq!(k.bytes, NO_XATTR_ENTRY_BYTES);
    k.forget(9);
    assert_eq!((k.bytes, k.entries()), (0, 0));
}

/// Directories created, filled, emptied and removed in a random order (a
/// fixed seed): every byte counted comes back. Removals leave tombstones
/// in a table, so its `capacity()` moves without its allocation moving;
/// counting a directory's table by `capacity()` at its drop once took more
/// than had been counted (a guest's `rmdir` aborted the daemon).
#[test]
fn tracked_directories_give_back_every_byte_they_counted() {
    let mut c = CompleteDirs::new(1 << 30);
    c.reserved(100, 1 << 30);
    let mut x: u64 = 12345;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut next_dir = 100;
    let mut live: Vec<u64> = Vec::new();
    for step in 0..200_000u64 {
        let r = rnd() % 100;
        if r < 3 || live.is_empty() {
            c.apply(&created_dir(next_dir));
            live.push(next_dir);
            next_dir += 1;
        } else if r < 5 {
            let d = live.swap_remove((rnd() % live.len() as u64) as usize);
            c.apply(&Op::RemoveInode { ino: d });
        } else if r < 60 {
            let d = live[(rnd() % live.len() as u64) as usize];
            c.apply(&put_entry(d, &format!("n{}", rnd() % 64), 1 << 20 | step));
        } else {
            let d = live[(rnd() % live.len() as u64) as usize];
            c.apply(&Op::RemoveDirent {
                parent: d,
                name: format!("n{}", rnd() % 64).into_bytes(),
            });
        }
    }
    for d in live {
        c.apply(&Op::RemoveInode { ino: d });
    }
    assert_eq!(c.bytes, 0);
}
