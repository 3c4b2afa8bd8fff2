//! One body of store tests, generic over `&dyn Store`, run against every
//! store so that they provably agree: the contract checks below, and a
//! differential run that applies the same pseudo-random transactions to
//! `mem:` and the store under test and compares everything readable after
//! each. The stores:
//!
//! * `mem:` and the SlateDB engine (`file://`), here; the engine on S3 in
//!   `s3_tests`;
//! * the remote store (`pohmel://`) over a `pohmelfs store` server running
//!   in the test process on loopback, in `net/conformance_tests.rs`;
//! * the write-back layer ([`crate::writeback::WritebackStore`]) over its
//!   fault-injecting test sink, checked after a sync, in the layer's own
//!   `writeback/conformance_tests.rs`.
//!
//! Imports point from those layers to this suite, never back.
//!
//! Test-only. Each check uses its own inode numbers, so all of them can run
//! on one volume.

use crate::check::torture::rng::Rng;
use crate::store::mem::MemStore;
use crate::store::{
    Dirent, FileKind, Inode, OnceStore, Op, Store, StoreError, Timestamp, Txn, BLOCK_SIZE,
};

use super::SlateStore;

const BS: usize = BLOCK_SIZE as usize;

pub fn inode(ino: u64, kind: FileKind) -> Inode {
    Inode {
        ino,
        kind,
        perm: 0o644,
        uid: 1,
        gid: 2,
        nlink: 1,
        size: 0,
        rdev: 0,
        atime: Timestamp { sec: 1, nsec: 2 },
        mtime: Timestamp { sec: 3, nsec: 4 },
        ctime: Timestamp { sec: 5, nsec: 6 },
        parent: 0,
    }
}

pub fn dirent(name: &str, ino: u64, cookie: u64) -> Dirent {
    Dirent {
        name: name.as_bytes().to_vec(),
        ino,
        kind: FileKind::Regular,
        cookie,
    }
}

pub fn commit(s: &dyn Store, ops: Vec<Op>) {
    s.commit(Txn { ops }).expect("commit");
}

pub fn write_op(ino: u64, offset: u64, data: &[u8]) -> Op {
    Op::Write {
        ino,
        offset,
        data: data.to_vec().into(),
    }
}

pub fn read(s: &dyn Store, ino: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len];
    s.read(ino, offset, &mut buf).expect("read");
    buf
}

/// Every op kind, applied and read back.
pub fn every_op_round_trips(s: &dyn Store) {
    let mut dir = inode(100, FileKind::Directory);
    dir.parent = 1;
    let link = inode(101, FileKind::Symlink);
    commit(
        s,
        vec![
            Op::PutInode(dir.clone()),
            Op::PutInode(link.clone()),
            Op::SetSymlink {
                ino: 101,
                target: b"/some/where".to_vec(),
            },
            Op::PutDirent {
                parent: 100,
                dirent: dirent("l", 101, 1000),
            },
            Op::SetXattr {
                ino: 101,
                name: b"user.a".to_vec(),
                value: b"1".to_vec(),
            },
            Op::SetXattr {
                ino: 101,
                name: b"user.b".to_vec(),
                value: vec![],
            },
            write_op(102, 0, b"hello"),
        ],
    );
    assert_eq!(s.get_inode(100).unwrap(), Some(dir));
    assert_eq!(s.get_inode(101).unwrap(), Some(link));
    assert_eq!(s.readlink(101).unwrap(), Some(b"/some/where".to_vec()));
    assert_eq!(s.lookup(100, b"l").unwrap(), Some(dirent("l", 101, 1000)));
    assert_eq!(s.lookup(100, b"m").unwrap(), None);
    assert_eq!(s.get_xattr(101, b"user.a").unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.get_xattr(101, b"user.b").unwrap(), Some(vec![]));
    assert_eq!(
        s.list_xattr(101).unwrap(),
        vec![b"user.a".to_vec(), b"user.b".to_vec()]
    );
    assert_eq!(read(s, 102, 0, 8), b"hello\0\0\0");

    // Replacing an entry moves it to its new cookie.
    commit(
        s,
        vec![Op::PutDirent {
            parent: 100,
            dirent: dirent("l", 101, 1001),
        }],
    );
    let all = s.readdir(100, 0, 10).unwrap();
    assert_eq!(all, vec![dirent("l", 101, 1001)]);

    commit(
        s,
        vec![
            Op::RemoveXattr {
                ino: 101,
                name: b"user.a".to_vec(),
            },
            Op::RemoveDirent {
                parent: 100,
                name: b"l".to_vec(),
            },
            Op::Truncate { ino: 102, size: 2 },
            Op::PunchHole {
                ino: 102,
                offset: 0,
                len: 1,
            },
            // Ops on things that do not exist are no-ops.
            Op::RemoveDirent {
                parent: 100,
                name: b"nothing".to_vec(),
            },
            Op::RemoveInode { ino: 999_999 },
            Op::Truncate {
                ino: 999_999,
                size: 0,
            },
        ],
    );
    assert_eq!(s.get_xattr(101, b"user.a").unwrap(), None);
    assert_eq!(s.list_xattr(101).unwrap(), vec![b"user.b".to_vec()]);
    assert_eq!(s.lookup(100, b"l").unwrap(), None);
    assert!(s.readdir(100, 0, 10).unwrap().is_empty());
    assert_eq!(read(s, 102, 0, 4), b"\0e\0\0");
    commit(s, vec![Op::RemoveInode { ino: 101 }]);
    assert_eq!(s.get_inode(101).unwrap(), None);
    assert_eq!(s.readlink(101).unwrap(), None);
    assert!(s.list_xattr(101).unwrap().is_empty());
}

/// Writes within, across and between blocks; later ops of a transaction see
/// earlier ones.
pub fn partial_block_writes(s: &dyn Store) {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    commit(s, vec![write_op(110, 100_000, &data)]);
    assert_eq!(read(s, 110, 100_000, data.len()), data);
    assert_eq!(read(s, 110, 0, 10), vec![0; 10]);
    // Overwrite the middle of a block: its neighbours survive.
    commit(s, vec![write_op(110, 100_010, b"XY")]);
    let got = read(s, 110, 100_000, 20);
    assert_eq!(&got[..10], &data[..10]);
    assert_eq!(&got[10..12], b"XY");
    assert_eq!(&got[12..], &data[12..20]);
    // One transaction writing the same block twice, then truncating in it.
    commit(
        s,
        vec![
            write_op(111, 10, b"abc"),
            write_op(111, 12, b"Z"),
            write_op(111, BLOCK_SIZE - 1, b"12"),
            Op::Truncate {
                ino: 111,
                size: BLOCK_SIZE,
            },
        ],
    );
    assert_eq!(read(s, 111, 10, 3), b"abZ");
    assert_eq!(read(s, 111, BLOCK_SIZE - 1, 2), b"1\0");
    // A read straddling the stored end of a block reads zeros after it.
    commit(s, vec![write_op(112, 0, b"short")]);
    assert_eq!(read(s, 112, 3, BS + 10)[..4], *b"rt\0\0");
}

/// Truncating then growing reads zeros, never the old bytes.
pub fn truncate_then_grow_reads_zeros(s: &dyn Store) {
    commit(s, vec![write_op(120, 0, &vec![7u8; 3 * BS])]);
    commit(s, vec![Op::Truncate { ino: 120, size: 10 }]);
    let got = read(s, 120, 0, 3 * BS);
    assert_eq!(&got[..10], &[7u8; 10]);
    assert!(got[10..].iter().all(|&b| b == 0));
    assert_eq!(s.next_data(120, 0).unwrap(), Some(0));
    assert_eq!(s.next_data(120, 1).unwrap(), Some(1));
    assert_eq!(s.next_data(120, BLOCK_SIZE).unwrap(), None);
    commit(s, vec![write_op(120, 2 * BLOCK_SIZE, b"x")]);
    assert_eq!(read(s, 120, 10, 5), vec![0; 5]);
    assert_eq!(read(s, 120, BLOCK_SIZE, 5), vec![0; 5]);
    commit(s, vec![Op::Truncate { ino: 120, size: 0 }]);
    assert_eq!(s.next_data(120, 0).unwrap(), None);
}

/// Punching frees whole blocks and zeroes partial ones.
pub fn punch_hole_frees_and_zeroes(s: &dyn Store) {
    commit(s, vec![write_op(130, 0, &vec![1u8; 3 * BS])]);
    commit(
        s,
        vec![Op::PunchHole {
            ino: 130,
            offset: 10,
            len: 2 * BLOCK_SIZE,
        }],
    );
    assert_eq!(s.next_hole(130, 0).unwrap(), BLOCK_SIZE);
    let got = read(s, 130, 0, 3 * BS);
    assert!(got[..10].iter().all(|&b| b == 1));
    assert!(got[10..2 * BS + 10].iter().all(|&b| b == 0));
    assert!(got[2 * BS + 10..].iter().all(|&b| b == 1));
    // A hole running far past the data.
    commit(
        s,
        vec![Op::PunchHole {
            ino: 130,
            offset: 5,
            len: 64 * BLOCK_SIZE,
        }],
    );
    assert_eq!(s.next_data(130, 0).unwrap(), Some(0));
    assert_eq!(s.next_data(130, 1).unwrap(), Some(1));
    assert_eq!(s.next_data(130, BLOCK_SIZE).unwrap(), None);
    assert_eq!(read(s, 130, 0, 10), [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
}

/// RemoveInode drops the data blocks and extended attributes.
pub fn remove_inode_drops_blocks_and_xattrs(s: &dyn Store) {
    let before = s.statfs().unwrap();
    let mut ops = vec![Op::PutInode(inode(140, FileKind::Regular))];
    for i in 0..5 {
        ops.push(Op::SetXattr {
            ino: 140,
            name: format!("user.{i}").into_bytes(),
            value: vec![i; 10],
        });
    }
    ops.push(write_op(140, 0, &vec![3u8; 4 * BS + 1]));
    // A neighbour whose keys sort right after: it must survive.
    ops.push(Op::PutInode(inode(141, FileKind::Regular)));
    ops.push(write_op(141, 0, b"keep"));
    ops.push(Op::SetXattr {
        ino: 141,
        name: b"user.keep".to_vec(),
        value: b"1".to_vec(),
    });
    commit(s, ops);
    let mid = s.statfs().unwrap();
    assert_eq!(mid.used_bytes, before.used_bytes + 6 * BLOCK_SIZE);
    assert_eq!(mid.used_inodes, before.used_inodes + 2);
    commit(s, vec![Op::RemoveInode { ino: 140 }]);
    assert_eq!(s.get_inode(140).unwrap(), None);
    assert!(s.list_xattr(140).unwrap().is_empty());
    assert_eq!(s.next_data(140, 0).unwrap(), None);
    let after = s.statfs().unwrap();
    assert_eq!(after.used_bytes, before.used_bytes + BLOCK_SIZE);
    assert_eq!(after.used_inodes, before.used_inodes + 1);
    assert_eq!(read(s, 141, 0, 4), b"keep");
    assert_eq!(s.list_xattr(141).unwrap(), vec![b"user.keep".to_vec()]);
}

/// readdir pages by cookie and resumes while entries come and go.
pub fn readdir_resumes_by_cookie(s: &dyn Store) {
    let mut ops = Vec::new();
    for i in 0..10u64 {
        ops.push(Op::PutDirent {
            parent: 150,
            dirent: dirent(&format!("e{i}"), 200 + i, 500 + 10 * i),
        });
    }
    // Entries of the neighbouring directories must not leak in.
    ops.push(Op::PutDirent {
        parent: 149,
        dirent: dirent("other", 1, 1),
    });
    ops.push(Op::PutDirent {
        parent: 151,
        dirent: dirent("other", 1, 1),
    });
    commit(s, ops);
    let page = s.readdir(150, 0, 3).unwrap();
    let names: Vec<_> = page.iter().map(|d| d.name.clone()).collect();
    assert_eq!(names, vec![b"e0".to_vec(), b"e1".to_vec(), b"e2".to_vec()]);
    commit(
        s,
        vec![
            Op::RemoveDirent {
                parent: 150,
                name: b"e3".to_vec(),
            },
            Op::PutDirent {
                parent: 150,
                dirent: dirent("late", 300, 10_000),
            },
        ],
    );
    let rest = s.readdir(150, page[2].cookie, 100).unwrap();
    let names: Vec<_> = rest.iter().map(|d| d.name.clone()).collect();
    let mut want: Vec<Vec<u8>> = (4..10).map(|i| format!("e{i}").into_bytes()).collect();
    want.push(b"late".to_vec());
    assert_eq!(names, want);
    assert!(s.readdir(150, 10_000, 10).unwrap().is_empty());
    assert!(s.readdir(150, u64::MAX, 10).unwrap().is_empty());
    assert!(s.readdir(150, 0, 0).unwrap().is_empty());
}

/// next_data and next_hole walk stored blocks.
pub fn data_and_holes(s: &dyn Store) {
    commit(
        s,
        vec![
            write_op(160, BLOCK_SIZE, &vec![1u8; BS]),
            write_op(160, 2 * BLOCK_SIZE, b"x"),
            write_op(160, 5 * BLOCK_SIZE + 7, b"y"),
        ],
    );
    assert_eq!(s.next_data(160, 0).unwrap(), Some(BLOCK_SIZE));
    assert_eq!(
        s.next_data(160, BLOCK_SIZE + 9).unwrap(),
        Some(BLOCK_SIZE + 9)
    );
    assert_eq!(
        s.next_data(160, 3 * BLOCK_SIZE).unwrap(),
        Some(5 * BLOCK_SIZE)
    );
    assert_eq!(s.next_data(160, 6 * BLOCK_SIZE).unwrap(), None);
    assert_eq!(s.next_hole(160, 0).unwrap(), 0);
    assert_eq!(s.next_hole(160, BLOCK_SIZE + 5).unwrap(), 3 * BLOCK_SIZE);
    assert_eq!(s.next_hole(160, 5 * BLOCK_SIZE).unwrap(), 6 * BLOCK_SIZE);
    assert_eq!(s.next_hole(161, 77).unwrap(), 77);
    assert_eq!(s.next_data(161, 0).unwrap(), None);
}

/// reserve_ids hands out disjoint ranges at or above FIRST_FREE_ID.
pub fn ids_do_not_repeat(s: &dyn Store) {
    let a = s.reserve_ids(10).unwrap();
    let b = s.reserve_ids(10_000).unwrap();
    let c = s.reserve_ids(1).unwrap();
    assert!(a >= crate::store::FIRST_FREE_ID);
    assert!(b >= a + 10);
    assert!(c >= b + 10_000);
}

/// Every contract check above, on one volume.
pub fn contract(s: &dyn Store) {
    every_op_round_trips(s);
    partial_block_writes(s);
    truncate_then_grow_reads_zeros(s);
    punch_hole_frees_and_zeroes(s);
    remove_inode_drops_blocks_and_xattrs(s);
    readdir_resumes_by_cookie(s);
    data_and_holes(s);
    ids_do_not_repeat(s);
}

fn once(s: &dyn OnceStore, session: u64, txn_id: u64, data: &[u8]) -> bool {
    s.commit_once(
        session,
        txn_id,
        Txn {
            ops: vec![write_op(180 + session, txn_id * 10, data)],
        },
    )
    .expect("commit_once")
    .duplicate
}

/// A resent transaction applies nothing; pruning forgets exactly the
/// records below the mark, of that session only.
pub fn once_contract(s: &dyn OnceStore) {
    assert!(!once(s, 1, 1, b"first"));
    assert!(once(s, 1, 1, b"SECOND"), "a resend must be a duplicate");
    assert_eq!(
        read(s, 181, 10, 5),
        b"first",
        "a duplicate must apply nothing"
    );
    for t in 2..6 {
        assert!(!once(s, 1, t, b"x"));
    }
    assert!(!once(s, 2, 1, b"other session"));
    s.prune_applied(1, 4).unwrap();
    // Below the mark the records are gone (a client never resends those,
    // so a "resend" applies as new); at and above it they remain.
    assert!(!once(s, 1, 1, b"again"));
    assert_eq!(read(s, 181, 10, 5), b"again");
    assert!(!once(s, 1, 3, b"y"));
    assert!(once(s, 1, 4, b"z"));
    assert!(once(s, 1, 5, b"z"));
    assert!(once(s, 2, 1, b"z"), "prune must not touch other sessions");
    s.prune_applied(1, 0).unwrap();
    s.prune_applied(9, u64::MAX).unwrap();
    // An empty transaction is still recorded.
    assert!(!s.commit_once(3, 1, Txn::new()).unwrap().duplicate);
    assert!(s.commit_once(3, 1, Txn::new()).unwrap().duplicate);
}

/// A volume of two blocks refuses a transaction that needs three, whole.
pub fn full_volume_refuses_whole_txn(s: &dyn Store) {
    let t = vec![
        Op::PutInode(inode(170, FileKind::Regular)),
        write_op(170, 0, &vec![1; 3 * BS]),
    ];
    assert!(matches!(s.commit(Txn { ops: t }), Err(StoreError::NoSpace)));
    assert_eq!(s.get_inode(170).unwrap(), None);
    assert_eq!(s.statfs().unwrap().used_bytes, 0);
    commit(s, vec![write_op(170, 0, &vec![1; 2 * BS])]);
    assert_eq!(s.statfs().unwrap().used_bytes, 2 * BLOCK_SIZE);
    // Rewriting stored blocks needs no new space.
    commit(s, vec![write_op(170, 5, b"again")]);
}

fn random_op(r: &mut Rng, cookie: &mut u64) -> Op {
    let ino = 400 + r.below(4);
    let name = format!("n{}", r.below(6)).into_bytes();
    // Offsets cluster around block boundaries, where bugs live.
    let base = r.below(4) * BLOCK_SIZE + r.below(3) * (BLOCK_SIZE / 2);
    let offset = (base + r.below(5)).saturating_sub(2);
    match r.below(10) {
        0 => Op::PutInode(Inode {
            size: r.below(1 << 20),
            ..inode(ino, FileKind::Regular)
        }),
        1 => Op::RemoveInode { ino },
        2 => {
            *cookie += 1;
            Op::PutDirent {
                parent: 400,
                dirent: Dirent {
                    name,
                    ino,
                    kind: FileKind::Regular,
                    cookie: *cookie,
                },
            }
        }
        3 => Op::RemoveDirent { parent: 400, name },
        4 | 5 => {
            let len = [1, 100, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 3][r.below(5) as usize];
            let byte = r.below(255) as u8 + 1;
            Op::Write {
                ino,
                offset,
                data: vec![byte; len as usize].into(),
            }
        }
        6 => Op::Truncate { ino, size: offset },
        7 => Op::PunchHole {
            ino,
            offset,
            len: [1, BLOCK_SIZE, 2 * BLOCK_SIZE + 1, 20 * BLOCK_SIZE][r.below(4) as usize],
        },
        8 => Op::SetXattr {
            ino,
            name,
            value: vec![r.below(256) as u8; r.below(4) as usize],
        },
        _ => Op::RemoveXattr { ino, name },
    }
}

/// Everything a client could read of the differential test's inodes.
pub(crate) struct Snapshot {
    /// Entries, attributes, extended attributes, data and holes, space.
    facts: Vec<String>,
    /// The bytes of each inode's first nine blocks.
    data: Vec<(u64, Vec<u8>)>,
}

pub(crate) fn snapshot(s: &dyn Store) -> Snapshot {
    let mut facts = vec![format!("{:?}", s.readdir(400, 0, 1000).unwrap())];
    let mut data = Vec::new();
    for ino in 400..404 {
        facts.push(format!("{:?}", s.get_inode(ino).unwrap()));
        facts.push(format!("{:?}", s.list_xattr(ino).unwrap()));
        for n in 0..6 {
            let name = format!("n{n}").into_bytes();
            facts.push(format!("{:?}", s.get_xattr(ino, &name).unwrap()));
        }
        data.push((ino, read(s, ino, 0, 9 * BS)));
        for off in [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, 3 * BLOCK_SIZE + 2] {
            facts.push(format!(
                "data {:?} hole {}",
                s.next_data(ino, off).unwrap(),
                s.next_hole(ino, off).unwrap()
            ));
        }
    }
    let st = s.statfs().unwrap();
    facts.push(format!("used {} {}", st.used_bytes, st.used_inodes));
    Snapshot { facts, data }
}

/// Fails unless the snapshots taken `after` something are equal, byte for
/// byte.
pub(crate) fn assert_same(a: &Snapshot, b: &Snapshot, after: &dyn std::fmt::Display) {
    assert_eq!(a.facts.len(), b.facts.len());
    for (x, y) in a.facts.iter().zip(&b.facts) {
        assert_eq!(x, y, "stores disagree after {after}");
    }
    for ((ino, x), (_, y)) in a.data.iter().zip(&b.data) {
        if x != y {
            let at = x
                .iter()
                .zip(y)
                .position(|(p, q)| p != q)
                .unwrap_or(x.len().min(y.len()));
            let (x, y) = (
                &x[at..(at + 16).min(x.len())],
                &y[at..(at + 16).min(y.len())],
            );
            panic!(
                "stores disagree on the bytes of inode {ino} from offset {at} after {after}: \
                 {x:?} against {y:?}"
            );
        }
    }
}

/// The filesystem layer's write: the data, then the inode's new attributes
/// (the shape the write-back layer takes through its page cache).
fn random_fs_write(r: &mut Rng) -> Vec<Op> {
    let ino = 400 + r.below(4);
    let offset = r.below(4) * BLOCK_SIZE + r.below(3) * (BLOCK_SIZE / 2) + r.below(5);
    let len = [1, 100, BLOCK_SIZE - 1, BLOCK_SIZE + 3][r.below(4) as usize];
    let data = vec![r.below(255) as u8 + 1; len as usize];
    vec![
        write_op(ino, offset, &data),
        Op::PutInode(Inode {
            size: offset + len,
            ..inode(ino, FileKind::Regular)
        }),
    ]
}

/// Apply the same pseudo-random transactions to both stores; after each,
/// everything readable must be equal.
pub fn differential(a: &dyn Store, b: &dyn Store, seed: u64, txns: usize) {
    let mut r = Rng::new(seed);
    let mut cookie = 0;
    for t in 0..txns {
        let ops: Vec<Op> = if r.percent(30) {
            random_fs_write(&mut r)
        } else {
            (0..1 + r.below(4))
                .map(|_| random_op(&mut r, &mut cookie))
                .collect()
        };
        a.commit(Txn { ops: ops.clone() }).unwrap();
        b.commit(Txn { ops: ops.clone() }).unwrap();
        assert_same(
            &snapshot(a),
            &snapshot(b),
            &format_args!("txn {t}: {ops:?}"),
        );
    }
}

pub fn temp_volume(dir: &tempfile::TempDir, opts: &str) -> SlateStore {
    let url = format!("file://{}/vol{opts}", dir.path().display());
    SlateStore::open(&url).expect("open volume")
}

#[test]
fn mem_keeps_the_store_contract() {
    contract(&MemStore::new(1 << 30));
}

#[test]
fn slate_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(&temp_volume(&dir, ""));
}

#[test]
fn mem_applies_each_named_transaction_once() {
    once_contract(&MemStore::new(1 << 30));
}

#[test]
fn slate_applies_each_named_transaction_once() {
    let dir = tempfile::tempdir().unwrap();
    once_contract(&temp_volume(&dir, ""));
}

#[test]
fn mem_refuses_a_transaction_that_does_not_fit() {
    full_volume_refuses_whole_txn(&MemStore::new(2 * BLOCK_SIZE));
}

#[test]
fn slate_refuses_a_transaction_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    full_volume_refuses_whole_txn(&temp_volume(&dir, "?capacity=128K"));
}

#[test]
fn mem_and_slate_agree_on_random_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let slate = temp_volume(&dir, "");
    let mem = MemStore::new(1 << 30);
    differential(&mem, &slate, 0x9E37_79B9_7F4A_7C15, 150);
}
