//! Removing inodes by what the engine noted of them (`born.rs`): whether
//! read by key or scanned, nothing of a removed inode stays behind.

use super::conformance::{commit, inode, temp_volume, write_op};
use super::{SlateStore, VolumeReader};
use crate::check::volume::check_volume;
use crate::store::{FileKind, Op, Store, BLOCK_SIZE};

fn url(dir: &tempfile::TempDir) -> String {
    format!("file://{}/vol", dir.path().display())
}

fn xattr(ino: u64, name: &str) -> Op {
    Op::SetXattr {
        ino,
        name: name.as_bytes().to_vec(),
        value: b"v".to_vec(),
    }
}

fn file(ino: u64, size: u64) -> Op {
    let mut i = inode(ino, FileKind::Regular);
    i.size = size;
    Op::PutInode(i)
}

/// The volume holds nothing, and its checker agrees.
fn assert_empty(s: SlateStore, dir: &tempfile::TempDir) {
    let st = s.statfs().unwrap();
    assert_eq!((st.used_bytes, st.used_inodes), (0, 0), "{st:?}");
    s.close().unwrap();
    drop(s);
    let reader = VolumeReader::open(&url(dir)).unwrap();
    let report = check_volume(&reader).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

/// Files of every shape this instance saw born: no chunk, a few (read by
/// key), more than the point reads cover (scanned), attributes, a symlink,
/// and a write that came before the inode's first record.
fn born_files(s: &SlateStore, first: u64) -> Vec<u64> {
    let bs = BLOCK_SIZE;
    commit(s, vec![file(first, 0)]);
    commit(
        s,
        vec![
            file(first + 1, 3 * bs + 10),
            write_op(first + 1, 0, b"head"),
            write_op(first + 1, 3 * bs + 6, b"tail"),
            xattr(first + 1, "user.a"),
            xattr(first + 1, "user.b"),
        ],
    );
    let many: Vec<Op> = (0..20).map(|i| write_op(first + 2, i * bs, b"x")).collect();
    commit(s, many);
    commit(s, vec![file(first + 2, 19 * bs + 1)]);
    let mut link = inode(first + 3, FileKind::Symlink);
    link.size = 6;
    commit(
        s,
        vec![
            Op::PutInode(link),
            Op::SetSymlink {
                ino: first + 3,
                target: b"target".to_vec(),
            },
            xattr(first + 3, "user.l"),
        ],
    );
    commit(s, vec![write_op(first + 4, bs, b"early")]);
    commit(s, vec![file(first + 4, bs + 5)]);
    (first..first + 5).collect()
}

#[test]
fn removing_born_inodes_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = temp_volume(&dir, "");
    let first = s.reserve_ids(100).unwrap();
    let inos = born_files(&s, first);
    // One removal per transaction, and two in one.
    for &ino in &inos[..3] {
        commit(&s, vec![Op::RemoveInode { ino }]);
    }
    commit(
        &s,
        inos[3..]
            .iter()
            .map(|&ino| Op::RemoveInode { ino })
            .collect(),
    );
    assert_empty(s, &dir);
}

#[test]
fn inodes_born_before_a_reopen_are_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let s = temp_volume(&dir, "");
    let first = s.reserve_ids(100).unwrap();
    let inos = born_files(&s, first);
    s.close().unwrap();
    drop(s);
    let s = temp_volume(&dir, "");
    // Ids reserved now are born in this instance; the old ones are not.
    let next = s.reserve_ids(100).unwrap();
    assert!(next > first + 100);
    commit(&s, vec![file(next, 1), write_op(next, 0, b"y")]);
    let mut ops: Vec<Op> = inos.iter().map(|&ino| Op::RemoveInode { ino }).collect();
    ops.push(Op::RemoveInode { ino: next });
    commit(&s, ops);
    assert_empty(s, &dir);
}

#[test]
fn a_removed_inode_written_again_in_its_transaction_keeps_nothing() {
    // Not what a filesystem sends, but the engine must not lose track:
    // the write's chunk is noted after the removal read its notes.
    let dir = tempfile::tempdir().unwrap();
    let s = temp_volume(&dir, "");
    let first = s.reserve_ids(10).unwrap();
    commit(&s, vec![file(first, 4), write_op(first, 0, b"data")]);
    commit(
        &s,
        vec![
            Op::RemoveInode { ino: first },
            write_op(first, 2 * BLOCK_SIZE, b"late"),
        ],
    );
    commit(&s, vec![Op::RemoveInode { ino: first }]);
    assert_empty(s, &dir);
}
