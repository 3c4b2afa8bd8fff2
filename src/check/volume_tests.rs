//! Tests of the volume checker: a healthy volume built through the engine
//! is clean, and each kind of damage — made with inconsistent ops through
//! `Store::commit`, or with raw engine writes for what no op can express —
//! is reported as its own problem, naming the inodes and names involved.

use super::*;
use crate::store::engine::{SlateStore, VolumeReader};
use crate::store::{Dirent, Op, Store, Timestamp, Txn};

const D: u64 = 20; // directory "d" in the root
const F: u64 = 21; // file "f" in the root, hard-linked as "d/g"
const S: u64 = 22; // symlink "d/s" -> "../f"
const E: u64 = 23; // empty directory "d/e"
const O: u64 = 24; // orphan: unlinked file still stored
const F_SIZE: u64 = 100_000;
const F_COOKIE: u64 = 101;

fn inode(ino: u64, kind: FileKind, nlink: u32, size: u64, parent: u64) -> Inode {
    Inode {
        ino,
        kind,
        perm: 0o755,
        uid: 0,
        gid: 0,
        nlink,
        size,
        rdev: 0,
        atime: Timestamp::default(),
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        parent,
    }
}

fn entry(parent: u64, name: &str, ino: u64, kind: FileKind, cookie: u64) -> Op {
    Op::PutDirent {
        parent,
        dirent: Dirent {
            name: name.as_bytes().to_vec(),
            ino,
            kind,
            cookie,
        },
    }
}

fn commit(s: &SlateStore, ops: Vec<Op>) {
    s.commit(Txn { ops }).expect("commit");
}

struct Volume {
    store: SlateStore,
    dir: tempfile::TempDir,
}

impl Volume {
    fn url(&self) -> String {
        format!("file://{}/vol", self.dir.path().display())
    }
}

/// A small consistent volume: a directory, a hard-linked file with data and
/// an xattr, a symlink, an empty subdirectory and an orphan.
fn healthy() -> Volume {
    let dir = tempfile::tempdir().unwrap();
    let store = SlateStore::open(&format!("file://{}/vol", dir.path().display())).unwrap();
    // Move next_id past every number the tests use.
    store.reserve_ids(10_000).unwrap();
    use FileKind::*;
    commit(
        &store,
        vec![
            Op::PutInode(inode(ROOT_INO, Directory, 3, 0, ROOT_INO)),
            Op::PutInode(inode(D, Directory, 3, 0, ROOT_INO)),
            entry(ROOT_INO, "d", D, Directory, 100),
            Op::PutInode(inode(F, Regular, 2, F_SIZE, 0)),
            entry(ROOT_INO, "f", F, Regular, F_COOKIE),
            entry(D, "g", F, Regular, 102),
            Op::Write {
                ino: F,
                offset: 0,
                data: vec![7; F_SIZE as usize].into(),
            },
            Op::SetXattr {
                ino: F,
                name: b"user.x".to_vec(),
                value: b"1".to_vec(),
            },
            Op::PutInode(inode(S, Symlink, 1, 4, 0)),
            Op::SetSymlink {
                ino: S,
                target: b"../f".to_vec(),
            },
            entry(D, "s", S, Symlink, 103),
            Op::PutInode(inode(E, Directory, 2, 0, D)),
            entry(D, "e", E, Directory, 104),
            Op::PutInode(inode(O, Regular, 0, 10, 0)),
            Op::Write {
                ino: O,
                offset: 0,
                data: vec![1; 10].into(),
            },
        ],
    );
    Volume { store, dir }
}

#[test]
fn a_healthy_volume_is_clean_with_its_orphan_as_a_warning() {
    let v = healthy();
    let r = check_volume(&v.store).unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(
        r.warnings,
        vec![Warning::Orphan {
            ino: O,
            kind: FileKind::Regular,
            size: 10,
            blocks: 1
        }]
    );
    assert_eq!((r.inodes, r.entries, r.blocks), (6, 5, 3));
    assert_eq!(
        r.summary(),
        "check: 6 inodes, 5 entries, 3 blocks, 0 problems, 1 warnings"
    );
    assert!(r.lines()[0].starts_with("warning: orphan: Regular inode 24"));
}

#[test]
fn a_volume_never_served_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/vol", dir.path().display());
    SlateStore::format(&url, None).unwrap();
    let reader = VolumeReader::open(&url).unwrap();
    let r = check_volume(&reader).unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(r.inodes, 0);
}

#[test]
fn a_closed_volume_reads_the_same_read_only_and_is_not_written() {
    let v = healthy();
    let url = v.url();
    v.store.close().unwrap();
    drop(v.store);
    let reader = VolumeReader::open(&url).unwrap();
    let info = reader.volume_info().unwrap();
    let r = check_volume(&reader).unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!((r.inodes, r.entries, r.blocks), (6, 5, 3));
    drop(reader);
    // A second read-only open sees the same epoch: nothing was written.
    let again = VolumeReader::open(&url).unwrap();
    assert_eq!(again.volume_info().unwrap().open_count, info.open_count);
}

#[test]
fn a_missing_volume_is_an_error_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none");
    let url = format!("file://{}", path.display());
    assert!(VolumeReader::open(&url).is_err());
    assert!(!path.exists());
}

#[test]
fn a_crashed_writer_leaves_a_volume_the_reader_checks() {
    let v = healthy();
    // Durable commits, then the engine dropped without a clean close.
    commit(
        &v.store,
        vec![
            Op::PutInode(inode(30, FileKind::Regular, 1, 3, 0)),
            entry(D, "late", 30, FileKind::Regular, 105),
            Op::PutInode(inode(D, FileKind::Directory, 3, 0, ROOT_INO)),
        ],
    );
    let url = v.url();
    v.store.crash_for_test();
    let reader = VolumeReader::open(&url).unwrap();
    let r = check_volume(&reader).unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(r.entries, 6);
}

/// Damage a healthy volume with `damage`, check it, and require a problem
/// matching `want` whose text contains every one of `names`.
fn assert_found(
    what: &str,
    damage: impl FnOnce(&SlateStore),
    want: impl Fn(&Problem) -> bool,
    names: &[&str],
) {
    let v = healthy();
    damage(&v.store);
    let r = check_volume(&v.store).unwrap();
    let found = r.problems.iter().find(|p| want(p));
    let Some(found) = found else {
        panic!("{what}: not found among {:#?}", r.problems);
    };
    let text = found.to_string();
    for n in names {
        assert!(text.contains(n), "{what}: {text:?} does not name {n:?}");
    }
    assert!(!r.is_clean());
    assert!(r
        .summary()
        .contains(&format!("{} problems", r.problems.len())));
}

#[test]
fn dangling_entries_and_wrong_kinds_are_named() {
    assert_found(
        "dangling entry",
        |s| commit(s, vec![entry(D, "ghost", 999, FileKind::Regular, 110)]),
        |p| {
            matches!(
                p,
                Problem::DanglingEntry {
                    parent: D,
                    ino: 999,
                    ..
                }
            )
        },
        &["\"ghost\"", "20", "999"],
    );
    assert_found(
        "entry kind",
        |s| {
            commit(
                s,
                vec![entry(ROOT_INO, "f", F, FileKind::Directory, F_COOKIE)],
            )
        },
        |p| matches!(p, Problem::EntryKind { ino: F, .. }),
        &["\"f\"", "21", "Directory", "Regular"],
    );
    assert_found(
        "entry outside a directory",
        |s| commit(s, vec![entry(F, "inside", E, FileKind::Directory, 111)]),
        |p| matches!(p, Problem::EntryOutsideDirectory { parent: F, .. }),
        &["\"inside\"", "21", "not a directory"],
    );
    assert_found(
        "bad name",
        |s| commit(s, vec![entry(D, "a/b", F, FileKind::Regular, 112)]),
        |p| matches!(p, Problem::BadName { parent: D, .. }),
        &["\"a/b\""],
    );
    assert_found(
        "root named",
        |s| commit(s, vec![entry(D, "up", ROOT_INO, FileKind::Directory, 113)]),
        |p| matches!(p, Problem::RootNamed { parent: D, .. }),
        &["\"up\"", "root"],
    );
}

#[test]
fn disagreeing_indexes_are_named() {
    assert_found(
        "by-cookie record missing",
        |s| s.raw_delete_cookie_entry(ROOT_INO, F_COOKIE),
        |p| {
            matches!(
                p,
                Problem::MissingCookieIndex {
                    parent: ROOT_INO,
                    cookie: F_COOKIE,
                    ..
                }
            )
        },
        &["\"f\"", "101", "readdir"],
    );
    assert_found(
        "by-name record missing",
        |s| {
            s.raw_put_cookie_entry(
                D,
                &Dirent {
                    name: b"phantom".to_vec(),
                    ino: F,
                    kind: FileKind::Regular,
                    cookie: 120,
                },
            )
        },
        |p| {
            matches!(
                p,
                Problem::MissingNameIndex {
                    parent: D,
                    cookie: 120,
                    ..
                }
            )
        },
        &["\"phantom\"", "lookup"],
    );
    assert_found(
        "indexes disagree",
        |s| {
            s.raw_put_cookie_entry(
                ROOT_INO,
                &Dirent {
                    name: b"f".to_vec(),
                    ino: S,
                    kind: FileKind::Symlink,
                    cookie: F_COOKIE,
                },
            )
        },
        |p| {
            matches!(
                p,
                Problem::IndexMismatch {
                    parent: ROOT_INO,
                    cookie: F_COOKIE,
                    ..
                }
            )
        },
        &["\"f\"", "inode 21", "inode 22"],
    );
    assert_found(
        "duplicate cookie",
        |s| {
            commit(
                s,
                vec![
                    entry(E, "twin", F, FileKind::Regular, 102),
                    Op::PutInode(inode(F, FileKind::Regular, 3, F_SIZE, 0)),
                ],
            )
        },
        |p| matches!(p, Problem::DuplicateCookie { cookie: 102, .. }),
        &["102", "\"twin\"", "\"g\""],
    );
    assert_found(
        "reserved cookie",
        |s| {
            commit(
                s,
                vec![
                    entry(E, "early", F, FileKind::Regular, 3),
                    Op::PutInode(inode(F, FileKind::Regular, 3, F_SIZE, 0)),
                ],
            )
        },
        |p| matches!(p, Problem::ReservedCookie { cookie: 3, .. }),
        &["\"early\"", "23"],
    );
}

#[test]
fn wrong_link_counts_and_parents_are_named() {
    assert_found(
        "directory link count",
        |s| {
            commit(
                s,
                vec![Op::PutInode(inode(D, FileKind::Directory, 5, 0, ROOT_INO))],
            )
        },
        |p| {
            matches!(
                p,
                Problem::DirectoryLinks {
                    ino: D,
                    nlink: 5,
                    expected: 3
                }
            )
        },
        &["directory 20", "5", "3"],
    );
    assert_found(
        "file link count",
        |s| {
            commit(
                s,
                vec![Op::PutInode(inode(F, FileKind::Regular, 1, F_SIZE, 0))],
            )
        },
        |p| {
            matches!(
                p,
                Problem::FileLinks {
                    ino: F,
                    nlink: 1,
                    entries: 2,
                    ..
                }
            )
        },
        &["inode 21", "link count 1", "2 entries"],
    );
    assert_found(
        "directory parent",
        |s| {
            commit(
                s,
                vec![Op::PutInode(inode(E, FileKind::Directory, 2, 0, ROOT_INO))],
            )
        },
        |p| {
            matches!(
                p,
                Problem::DirectoryParent {
                    ino: E,
                    parent: ROOT_INO,
                    held_by: D
                }
            )
        },
        &["directory 23", "(..) is 1", "directory 20"],
    );
    assert_found(
        "directory hard link",
        |s| {
            commit(
                s,
                vec![
                    entry(ROOT_INO, "e2", E, FileKind::Directory, 114),
                    Op::PutInode(inode(ROOT_INO, FileKind::Directory, 4, 0, ROOT_INO)),
                ],
            )
        },
        |p| matches!(p, Problem::DirectoryHardLinked { ino: E, .. }),
        &["directory 23", "\"e\" in 20", "\"e2\" in 1"],
    );
    assert_found(
        "root parent",
        |s| {
            commit(
                s,
                vec![Op::PutInode(inode(ROOT_INO, FileKind::Directory, 3, 0, D))],
            )
        },
        |p| matches!(p, Problem::RootParent(D)),
        &["20"],
    );
}

#[test]
fn unreachable_inodes_and_a_missing_root_are_named() {
    assert_found(
        "detached subtree",
        |s| {
            commit(
                s,
                vec![
                    Op::PutInode(inode(50, FileKind::Directory, 2, 0, ROOT_INO)),
                    Op::PutInode(inode(51, FileKind::Regular, 1, 0, 0)),
                    entry(50, "lost", 51, FileKind::Regular, 115),
                ],
            )
        },
        |p| matches!(p, Problem::Unreachable { ino: 51, .. }),
        &["inode 51", "not reachable"],
    );
    assert_found(
        "unnamed live inode",
        |s| commit(s, vec![Op::PutInode(inode(52, FileKind::Regular, 1, 0, 0))]),
        |p| {
            matches!(
                p,
                Problem::Unreachable {
                    ino: 52,
                    nlink: 1,
                    ..
                }
            )
        },
        &["inode 52"],
    );
    assert_found(
        "no root",
        |s| commit(s, vec![Op::RemoveInode { ino: ROOT_INO }]),
        |p| matches!(p, Problem::NoRoot),
        &["root"],
    );
    assert_found(
        "root not a directory",
        |s| {
            commit(
                s,
                vec![Op::PutInode(inode(
                    ROOT_INO,
                    FileKind::Regular,
                    1,
                    0,
                    ROOT_INO,
                ))],
            )
        },
        |p| matches!(p, Problem::RootNotDirectory(FileKind::Regular)),
        &["Regular"],
    );
}

// The records the checker names by kind: xattrs, blocks and extents of
// missing or wrong inodes, data past the size, ids, counters, foreign
// records and exactly-once records.
#[path = "volume_record_tests.rs"]
mod records;
