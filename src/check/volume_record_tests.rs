//! Tests of the volume checker, continued: records of missing or wrong
//! inodes, data past the size, ids, counters, foreign records and
//! exactly-once records, each reported as its own problem.

use super::*;

#[test]
#[allow(clippy::too_many_lines)] // independent cases, one wrong record each
fn records_of_missing_or_wrong_inodes_are_named() {
    for (what, op, name) in [
        (
            "xattr",
            Op::SetXattr {
                ino: 777,
                name: b"user.lost".to_vec(),
                value: vec![],
            },
            "\"user.lost\"",
        ),
        (
            "symlink",
            Op::SetSymlink {
                ino: 778,
                target: b"x".to_vec(),
            },
            "symlink target",
        ),
        (
            "block",
            Op::Write {
                ino: 779,
                offset: BLOCK_SIZE * 2,
                data: b"x".to_vec().into(),
            },
            "data block 2",
        ),
    ] {
        let ino = match &op {
            Op::SetXattr { ino, .. } | Op::SetSymlink { ino, .. } | Op::Write { ino, .. } => *ino,
            _ => unreachable!(),
        };
        assert_found(
            what,
            |s| commit(s, vec![op]),
            |p| matches!(p, Problem::RecordOfMissingInode { ino: i, .. } if *i == ino),
            &[name, &ino.to_string()],
        );
    }
    assert_found(
        "symlink without target",
        |s| {
            commit(
                s,
                vec![
                    Op::PutInode(inode(60, FileKind::Symlink, 1, 3, 0)),
                    entry(E, "bare", 60, FileKind::Symlink, 116),
                ],
            )
        },
        |p| matches!(p, Problem::SymlinkWithoutTarget { ino: 60 }),
        &["symlink 60"],
    );
    assert_found(
        "target of a file",
        |s| {
            commit(
                s,
                vec![Op::SetSymlink {
                    ino: F,
                    target: b"t".to_vec(),
                }],
            )
        },
        |p| matches!(p, Problem::TargetOfNonSymlink { ino: F, .. }),
        &["inode 21"],
    );
    assert_found(
        "symlink size",
        |s| commit(s, vec![Op::PutInode(inode(S, FileKind::Symlink, 1, 99, 0))]),
        |p| {
            matches!(
                p,
                Problem::SymlinkSize {
                    ino: S,
                    size: 99,
                    target_len: 4
                }
            )
        },
        &["symlink 22", "99", "4 bytes"],
    );
    assert_found(
        "block of a directory",
        |s| {
            commit(
                s,
                vec![Op::Write {
                    ino: D,
                    offset: 0,
                    data: b"x".to_vec().into(),
                }],
            )
        },
        |p| {
            matches!(
                p,
                Problem::BlockOfNonFile {
                    ino: D,
                    index: 0,
                    ..
                }
            )
        },
        &["inode 20", "block 0"],
    );
}

#[test]
fn data_past_the_size_is_named() {
    assert_found(
        "block past size",
        |s| {
            commit(
                s,
                vec![Op::Write {
                    ino: F,
                    offset: 3 * BLOCK_SIZE,
                    data: b"late".to_vec().into(),
                }],
            )
        },
        |p| {
            matches!(
                p,
                Problem::BlockPastSize {
                    ino: F,
                    index: 3,
                    size: F_SIZE
                }
            )
        },
        &["file 21", "block 3", "100000"],
    );
    assert_found(
        "nonzero bytes past size",
        |s| {
            commit(
                s,
                vec![Op::Write {
                    ino: F,
                    offset: F_SIZE + 10,
                    data: b"xy".to_vec().into(),
                }],
            )
        },
        |p| {
            matches!(
                p,
                Problem::BytesPastSize {
                    ino: F,
                    index: 1,
                    stored_to: 100_012,
                    ..
                }
            )
        },
        &["file 21", "100012", "block 1"],
    );
    // Zeros past the size are harmless: growing the file reads zeros.
    let v = healthy();
    commit(
        &v.store,
        vec![Op::Write {
            ino: F,
            offset: F_SIZE,
            data: vec![0; 100].into(),
        }],
    );
    let r = check_volume(&v.store).unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
}

#[test]
fn ids_counters_and_foreign_records_are_named() {
    assert_found(
        "inode beyond next id",
        |s| {
            commit(
                s,
                vec![
                    Op::PutInode(inode(1 << 40, FileKind::Regular, 1, 0, 0)),
                    entry(E, "future", 1 << 40, FileKind::Regular, 117),
                ],
            )
        },
        |p| matches!(p, Problem::IdNotReserved { what: "inode", id, .. } if *id == 1 << 40),
        &["inode 1099511627776", "next id"],
    );
    assert_found(
        "reserved inode",
        |s| {
            commit(
                s,
                vec![
                    Op::PutInode(inode(5, FileKind::Regular, 1, 0, 0)),
                    entry(E, "five", 5, FileKind::Regular, 118),
                ],
            )
        },
        |p| matches!(p, Problem::ReservedInode(5)),
        &["inode 5"],
    );
    assert_found(
        "metadata bytes",
        |s| s.raw_put_counters(3, 6, 7),
        |p| {
            matches!(
                p,
                Problem::Counter {
                    what: "metadata bytes",
                    counted: 7,
                    ..
                }
            )
        },
        &["7 metadata bytes"],
    );
    assert_found(
        "counters",
        |s| s.raw_put_counters(0, 6, 0),
        |p| {
            matches!(
                p,
                Problem::Counter {
                    what: "blocks",
                    counted: 0,
                    found: 3
                }
            )
        },
        &["0 blocks", "holds 3"],
    );
    assert_found(
        "unknown record",
        |s| s.raw_put(&[0x99, 1, 2], b"x"),
        |p| matches!(p, Problem::UnknownRecord(k) if k == &[0x99, 1, 2]),
        &["99"],
    );
    assert_found(
        "undecodable inode",
        |s| s.raw_put(&SlateStore::inode_key(70), b"\x01garbage"),
        |p| matches!(p, Problem::Unreadable(m) if m.contains("inode 70")),
        &["inode 70"],
    );
}

#[test]
fn applied_records_are_counted_per_session() {
    let v = healthy();
    for txn in [3, 4, 9] {
        v.store.raw_put_applied(0xabc, txn);
    }
    v.store.raw_put_applied(0xdef, 1);
    let r = check_volume(&v.store).unwrap();
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(
        r.sessions,
        vec![
            SessionRecords {
                session: 0xabc,
                count: 3,
                lowest: 3,
                highest: 9
            },
            SessionRecords {
                session: 0xdef,
                count: 1,
                lowest: 1,
                highest: 1
            },
        ]
    );
    assert!(r
        .lines()
        .iter()
        .any(|l| l.contains("0000000000000abc has 3 applied-transaction records")));
}
