//! Data objects (`objects.rs`, `object_gc.rs`) on a local directory's
//! object store (`Placement::Objects`: the `s3://` path without a
//! server): packing, ranged reads, the rewriting pass, deletion of dead
//! objects, a failed upload, a stop between upload and commit, and what
//! the checker finds. `s3_tests.rs` runs the same path against moto.

use std::path::PathBuf;

use super::conformance::{self, commit, read, write_op};
use super::objects::{self, OBJECT_BYTES_TARGET};
use super::{Placement, SlateStore};
use crate::check::volume::{check_volume, Problem, Report, Warning};
use crate::store::{Op, Store, StoreError, Txn};

const KIB: usize = 1024;

fn url(dir: &tempfile::TempDir) -> String {
    format!("file://{}/vol", dir.path().display())
}

fn volume(dir: &tempfile::TempDir) -> SlateStore {
    SlateStore::open_for_test(&url(dir), Placement::Objects)
}

/// The data objects on disk, as `(id, size)`.
fn listed(dir: &tempfile::TempDir) -> Vec<(u64, u64)> {
    let d: PathBuf = dir.path().join("vol").join(objects::DIR_NAME);
    let mut out: Vec<(u64, u64)> = std::fs::read_dir(&d)
        .map(|it| {
            it.filter_map(|e| {
                let e = e.ok()?;
                let id = objects::parse_name(e.file_name().to_str()?)?;
                Some((id, e.metadata().ok()?.len()))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The problems about file data (the tests write data without inodes).
fn data_problems(r: &Report) -> Vec<&Problem> {
    r.problems
        .iter()
        .filter(|p| {
            matches!(
                p,
                Problem::MissingSegment { .. }
                    | Problem::ExtentChecksum { .. }
                    | Problem::ExtentPastSegment { .. }
                    | Problem::SegmentLive { .. }
                    | Problem::Unreadable(_)
            )
        })
        .collect()
}

fn leaked(r: &Report) -> Vec<u64> {
    r.warnings
        .iter()
        .filter_map(|w| match w {
            Warning::LeakedObject { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn gc_barrier(s: &SlateStore) {
    s.object_gc.as_ref().expect("data objects").barrier();
}

#[test]
fn small_commits_stay_inline_and_large_ones_go_to_objects() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    commit(&s, vec![write_op(5, 0, &pattern(1, 64 * KIB))]);
    assert_eq!(s.object_counts().0, 0, "a 64 KiB commit uploaded");
    assert!(listed(&dir).is_empty());
    commit(&s, vec![write_op(5, 0, &pattern(2, 64 * KIB + 1))]);
    assert_eq!(s.object_counts().0, 1);
    assert_eq!(read(&s, 5, 0, 64 * KIB + 1), pattern(2, 64 * KIB + 1));
}

#[test]
fn the_contract_holds_with_data_in_objects() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    conformance::contract(&s);
    conformance::once_contract(&s);
    commit(&s, vec![write_op(600, 0, &pattern(3, 100 * KIB))]);
    assert!(s.object_counts().0 > 0, "no object was uploaded");
    drop(s);
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    conformance::differential(&crate::store::mem::MemStore::new(1 << 30), &s, 21, 150);
}

#[test]
fn small_writes_of_a_commit_share_one_object_and_read_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    let ops: Vec<Op> = (0..40u64)
        .map(|i| write_op(100 + i, i * 7, &pattern(i as u8, 3000)))
        .collect();
    commit(&s, ops);
    assert_eq!(listed(&dir).len(), 1, "{:?}", listed(&dir));
    assert_eq!(listed(&dir)[0].1, 40 * 3000, "packed without padding");
    // A commit larger than the target takes more than one object.
    let big = pattern(9, 6 << 20);
    commit(&s, vec![write_op(200, 0, &big)]);
    drop(s);
    let s = volume(&dir);
    for i in 0..40u64 {
        assert_eq!(read(&s, 100 + i, i * 7, 3000), pattern(i as u8, 3000));
    }
    assert_eq!(read(&s, 200, 0, big.len()), big);
    assert_eq!(read(&s, 200, 4_000_000, 10), big[4_000_000..4_000_010]);
    let r = check_volume(&s).unwrap();
    assert!(data_problems(&r).is_empty(), "{r:?}");
    assert!(leaked(&r).is_empty(), "{r:?}");
}

#[test]
fn a_dead_object_is_deleted_and_a_sparse_one_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    let chunk = 512 * KIB;
    // One object of 8 files; a second one overwritten whole.
    let files: Vec<Vec<u8>> = (0..8u8).map(|i| pattern(i, chunk)).collect();
    let ops = (0..8u64).map(|i| write_op(10 + i, 0, &files[i as usize]));
    commit(&s, ops.collect());
    commit(&s, vec![write_op(30, 0, &pattern(77, 100 * KIB))]);
    let before = listed(&dir);
    assert_eq!(before.len(), 2);
    commit(&s, vec![write_op(30, 0, &pattern(78, 100 * KIB))]);
    gc_barrier(&s);
    let after = listed(&dir);
    assert!(
        !after.contains(&before[1]),
        "the dead object stays: {after:?}"
    );
    // Six of the eight files overwritten: a quarter of the object lives.
    let new: Vec<Op> = (2..8u64)
        .map(|i| write_op(10 + i, 0, &pattern(100 + i as u8, chunk)))
        .collect();
    commit(&s, new);
    let stats = s.collect_objects().unwrap();
    assert_eq!(stats.candidates, 1, "{stats:?}");
    assert_eq!(stats.copied, 2 * chunk as u64, "{stats:?}");
    assert_eq!(stats.deleted, 1, "{stats:?}");
    gc_barrier(&s);
    let now = listed(&dir);
    assert!(
        !now.contains(&before[0]),
        "the sparse object stays: {now:?}"
    );
    assert_eq!(read(&s, 10, 0, chunk), files[0]);
    assert_eq!(read(&s, 11, 0, chunk), files[1]);
    for i in 2..8u64 {
        assert_eq!(read(&s, 10 + i, 0, chunk), pattern(100 + i as u8, chunk));
    }
    let r = check_volume(&s).unwrap();
    assert!(data_problems(&r).is_empty(), "{r:?}");
    assert!(leaked(&r).is_empty(), "{r:?}");
    // Nothing left to do: a second pass moves nothing.
    assert_eq!(s.collect_objects().unwrap().candidates, 0);
    drop(s);
    let s = volume(&dir);
    assert_eq!(read(&s, 11, 0, chunk), files[1]);
}

#[test]
fn a_pass_does_not_move_what_a_commit_changed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    let chunk = 256 * KIB;
    let ops = (0..4u64).map(|i| write_op(10 + i, 0, &pattern(i as u8, chunk)));
    commit(&s, ops.collect());
    let ops = (1..4u64).map(|i| write_op(10 + i, 0, &pattern(50, chunk)));
    commit(&s, ops.collect());
    // The pass is held after its uploads, before it moves extents; a
    // commit then overwrites part of file 10 and drops file 11. Moving
    // only extents that still name the copied bytes keeps both.
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    *s.objects.as_ref().unwrap().gc_gate.lock().unwrap() = Some((reached_tx, go_rx));
    let stats = std::thread::scope(|scope| {
        let pass = scope.spawn(|| s.collect_objects());
        reached.recv().expect("the pass reaches its gate");
        commit(
            &s,
            vec![
                write_op(10, 1000, b"newer"),
                Op::Truncate {
                    ino: 10 + 1,
                    size: 0,
                },
            ],
        );
        go.send(()).unwrap();
        pass.join().unwrap().expect("pass")
    });
    assert_eq!(stats.candidates, 1);
    gc_barrier(&s);
    assert_eq!(read(&s, 11, 0, 10), vec![0u8; 10]);
    let mut want = pattern(0, chunk);
    want[1000..1005].copy_from_slice(b"newer");
    assert_eq!(read(&s, 10, 0, chunk), want);
    let r = check_volume(&s).unwrap();
    assert!(data_problems(&r).is_empty(), "{r:?}");
}

#[test]
fn a_failed_upload_commits_nothing_and_leaves_no_object() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    commit(&s, vec![write_op(5, 0, b"kept")]);
    let before = listed(&dir);
    let objects = s.objects.as_ref().unwrap();
    objects
        .fail_puts
        .store(1, std::sync::atomic::Ordering::Release);
    let big = pattern(3, OBJECT_BYTES_TARGET as usize + 1000);
    let r = s.commit(Txn {
        ops: vec![write_op(5, 0, b"lost"), write_op(6, 0, &big)],
    });
    assert!(matches!(r, Err(StoreError::Io(_))), "{r:?}");
    gc_barrier(&s);
    assert_eq!(
        listed(&dir),
        before,
        "an upload of the failed commit stayed"
    );
    assert_eq!(read(&s, 5, 0, 4), b"kept");
    // The volume goes on.
    commit(&s, vec![write_op(5, 0, b"next")]);
    assert_eq!(read(&s, 5, 0, 4), b"next");
}

#[test]
fn a_stop_between_upload_and_commit_leaves_an_orphan_the_next_open_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    commit(&s, vec![write_op(5, 0, &pattern(1, 100 * KIB))]);
    let objects = s.objects.as_ref().unwrap();
    objects
        .stop_after_upload
        .store(true, std::sync::atomic::Ordering::Release);
    let r = s.commit(Txn {
        ops: vec![write_op(5, 0, &pattern(2, 100 * KIB))],
    });
    assert!(r.is_err(), "{r:?}");
    assert_eq!(listed(&dir).len(), 2, "the upload is there");
    let report = check_volume(&s).unwrap();
    assert_eq!(leaked(&report).len(), 1, "{report:?}");
    assert!(data_problems(&report).is_empty(), "{report:?}");
    s.crash();
    let s = volume(&dir);
    gc_barrier(&s);
    assert_eq!(
        listed(&dir).len(),
        1,
        "the orphan stays: {:?}",
        listed(&dir)
    );
    assert_eq!(read(&s, 5, 0, 100 * KIB), pattern(1, 100 * KIB));
    let report = check_volume(&s).unwrap();
    assert!(leaked(&report).is_empty(), "{report:?}");
}

#[test]
fn a_damaged_object_reads_as_an_error_and_the_checker_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir);
    commit(&s, vec![write_op(5, 0, &pattern(1, 100_000))]);
    let (id, _) = listed(&dir)[0];
    let path = dir
        .path()
        .join("vol")
        .join(objects::DIR_NAME)
        .join(objects::file_name(id));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[9000] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let mut buf = vec![0u8; 100];
    let r = s.read(5, 8950, &mut buf);
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    assert_eq!(
        read(&s, 5, 0, 100),
        pattern(1, 100),
        "other pages still read"
    );
    let report = check_volume(&s).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::ExtentChecksum { offset: 8192, .. })),
        "{report:?}"
    );
}

#[test]
fn a_version_3_volume_with_data_objects_is_upgraded_and_reads_them() {
    // Builds of version 3 wrote data objects too; an open of this build
    // keeps them and raises the version, so a build before data objects
    // refuses the volume by its number instead of misreading it.
    let dir = tempfile::tempdir().unwrap();
    let big = pattern(3, 200_000);
    {
        let s = volume(&dir);
        commit(&s, vec![write_op(7, 0, &big)]);
        let mut sb = s.superblock.clone();
        sb.format_version = 3;
        s.raw_put(
            &super::keys::superblock(),
            &super::codec::encode_superblock(&sb),
        );
        s.close().unwrap();
    }
    assert_eq!(listed(&dir).len(), 1, "{:?}", listed(&dir));
    let s = volume(&dir);
    assert_eq!(s.superblock.format_version, 4);
    assert_eq!(read(&s, 7, 0, big.len()), big);
    s.close().unwrap();
    let s = volume(&dir);
    assert_eq!(s.superblock.format_version, 4);
    let r = check_volume(&s).unwrap();
    assert!(data_problems(&r).is_empty(), "{r:?}");
    assert!(leaked(&r).is_empty(), "{r:?}");
}
