//! Tests of replaying the commit log after a crash, and of checkpoints
//! and the reclaimer (`recover.rs`, `commit.rs`).
//!
//! The volumes here checkpoint only when they must (`checkpoint_ms=0`) and
//! flush the engine's WAL almost never, so a crash leaves every commit in
//! the log alone, and what the tests read after reopening came through
//! replay.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::conformance::{commit, read, write_op};
use super::log::{self, PAGE, RECORD_HEADER};
use super::segment::SegmentFiles;
use super::segment_tests::{assert_checks_clean, check, file, root_with};
use super::SlateStore;
use crate::store::{OnceStore, Store, Txn};

/// Checkpoints only when the ring is half full; the WAL flushed on its
/// own only after 10 minutes.
pub(super) const NO_CHECKPOINTS: &str = "?checkpoint_ms=0&flush_interval_ms=600000";

fn url(dir: &tempfile::TempDir, opts: &str) -> String {
    format!("file://{}/vol{opts}", dir.path().display())
}

pub(super) fn vol(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vol")
}

pub(super) fn open(dir: &tempfile::TempDir, opts: &str) -> SlateStore {
    let s = SlateStore::open(&url(dir, opts)).expect("open volume");
    s.reserve_ids(1000).unwrap();
    s
}

/// What a power cut does to bytes written but never synced: every
/// segment file keeps its length and loses its contents.
pub(super) fn lose_segment_bytes(dir: &tempfile::TempDir) {
    let files = SegmentFiles::of_volume(&vol(dir));
    for (id, len) in files.list().unwrap() {
        let path = vol(dir)
            .join("segments")
            .join(super::segment::file_name(id));
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&vec![0u8; len as usize], 0).unwrap();
    }
}

pub(super) fn body(n: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i * 7 + n) as u8).collect()
}

/// Files 40..44 in the root, each written in small commits.
fn small_commits(s: &SlateStore) {
    let inos = [40, 41, 42, 43];
    let mut ops = root_with(&inos);
    ops.extend(inos.iter().map(|&i| file(i, 4 * 4096)));
    commit(s, ops);
    for n in 0..4 {
        for &ino in &inos {
            commit(s, vec![write_op(ino, n * 4096, &body(ino + n))]);
        }
    }
}

fn assert_small_commits(s: &SlateStore) {
    for ino in [40, 41, 42, 43] {
        for n in 0..4 {
            assert_eq!(
                read(s, ino, n * 4096, 4096),
                body(ino + n),
                "inode {ino} block {n}"
            );
        }
    }
}

#[test]
fn acknowledged_commits_come_back_from_the_log_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, NO_CHECKPOINTS);
    small_commits(&s);
    assert_eq!(s.segment_syncs(), 0, "small writes are durable in the log");
    s.crash();
    // The checker, which writes nothing, reads the log's records too.
    let report = check(&dir);
    assert!(report.is_clean(), "{:#?}", report.problems);
    lose_segment_bytes(&dir);
    let s = open(&dir, NO_CHECKPOINTS);
    assert_small_commits(&s);
    drop(s);
    let report = check(&dir);
    assert!(report.is_clean(), "{:#?}", report.problems);
}

/// The offset of the record with the highest lsn in the log file.
fn last_record(dir: &tempfile::TempDir) -> u64 {
    let ring = std::fs::read(vol(dir).join(log::DIR_NAME).join(log::FILE_NAME)).unwrap();
    let mut best = (0, 0);
    for off in (PAGE as usize..ring.len()).step_by(PAGE as usize) {
        let magic = u32::from_le_bytes(ring[off..off + 4].try_into().unwrap());
        let lsn = u64::from_le_bytes(ring[off + 8..off + 16].try_into().unwrap());
        if magic == 0x4352_4c50 && lsn > best.1 {
            best = (off as u64, lsn);
        }
    }
    assert!(best.1 > 0, "no record in the log");
    best.0
}

#[test]
fn a_torn_record_at_the_head_ends_replay_there() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, NO_CHECKPOINTS);
    let mut ops = root_with(&[40, 41]);
    ops.push(file(40, 4096));
    commit(&s, ops);
    commit(&s, vec![write_op(40, 0, &body(1))]);
    commit(&s, vec![file(41, 4096), write_op(41, 0, &body(2))]);
    s.crash();
    // The last record's write never completed: one byte of it is wrong.
    let at = last_record(&dir) + RECORD_HEADER as u64 + 40;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vol(&dir).join(log::DIR_NAME).join(log::FILE_NAME))
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
    let s = open(&dir, NO_CHECKPOINTS);
    assert_eq!(read(&s, 40, 0, 4096), body(1));
    assert_eq!(s.get_inode(41).unwrap(), None);
    drop(s);
    // Its entry names an inode that never came: the root of this test
    // holds it, so the checker must see the file missing, and nothing
    // else wrong.
    let report = check(&dir);
    assert!(
        report
            .problems
            .iter()
            .all(|p| format!("{p:?}").contains("41")),
        "{:#?}",
        report.problems
    );
}

#[test]
fn replay_twice_gives_the_same_volume() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, NO_CHECKPOINTS);
    small_commits(&s);
    s.crash();
    let log_path = vol(&dir).join(log::DIR_NAME).join(log::FILE_NAME);
    let header = std::fs::read(&log_path).unwrap()[..PAGE as usize].to_vec();
    let s = open(&dir, NO_CHECKPOINTS);
    let stats = s.statfs().unwrap();
    s.crash();
    // A crash during that replay, before it moved the tail: the next open
    // replays the same records again, over what the first replay wrote.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&log_path)
        .unwrap();
    f.write_all_at(&header, 0).unwrap();
    lose_segment_bytes(&dir);
    let s = open(&dir, NO_CHECKPOINTS);
    assert_small_commits(&s);
    assert_eq!(s.statfs().unwrap(), stats);
    drop(s);
    assert!(check(&dir).is_clean());
}

#[test]
fn replay_skips_batches_the_engine_already_has() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, NO_CHECKPOINTS);
    commit(&s, root_with(&[]));
    // A session with a record from before this open is pruned in the
    // engine, not with the next batch (`once.rs`).
    s.raw_put_applied(7, 99);
    assert!(!s.commit_once(7, 1, Txn::new()).unwrap().duplicate);
    // Pruning writes to the engine directly and flushes it: the engine now
    // has the records so far, and no longer has transaction 1's marker.
    s.prune_applied(7, 2).unwrap();
    commit(&s, vec![file(40, 0)]);
    s.crash();
    let s = open(&dir, NO_CHECKPOINTS);
    assert!(s.get_inode(40).unwrap().is_some());
    // Replaying transaction 1's record again would bring its marker back.
    let markers: Vec<_> = super::scan::VolumeScan::scan_applied(&s)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(markers, vec![(7, 99)]);
}

fn markers(s: &SlateStore) -> Vec<(u64, u64)> {
    super::scan::VolumeScan::scan_applied(s)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_fresh_sessions_prune_goes_with_the_next_batch_and_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, NO_CHECKPOINTS);
    commit(&s, root_with(&[]));
    for t in 1..=3 {
        assert!(!s.commit_once(5, t, Txn::new()).unwrap().duplicate);
    }
    // The session is fresh: the prune only notes what to delete.
    s.prune_applied(5, 3).unwrap();
    assert_eq!(markers(&s), vec![(5, 1), (5, 2), (5, 3)]);
    commit(&s, vec![file(40, 0)]);
    assert_eq!(markers(&s), vec![(5, 3)]);
    s.crash();
    let s = open(&dir, NO_CHECKPOINTS);
    assert_eq!(markers(&s), vec![(5, 3)]);
    // Reopened, the session has a record from before: the engine answers.
    assert!(s.commit_once(5, 3, Txn::new()).unwrap().duplicate);
    assert!(!s.commit_once(5, 4, Txn::new()).unwrap().duplicate);
    s.prune_applied(5, 4).unwrap();
    assert_eq!(markers(&s), vec![(5, 4)]);
}

#[test]
fn freed_pages_are_punched_only_after_the_tail_passes_their_commit() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, NO_CHECKPOINTS);
    let mut ops = root_with(&[40]);
    ops.push(file(40, 4096));
    commit(&s, ops);
    commit(&s, vec![write_op(40, 0, &body(1))]);
    let seg = s.segments().active_id();
    let files = SegmentFiles::of_volume(&vol(&dir));
    let before = files.allocated(seg).unwrap();
    assert_eq!(before, vec![0..PAGE]);
    // The overwrite frees the first page; a record that names it can
    // still be replayed, so the reclaimer must not have it yet.
    commit(&s, vec![write_op(40, 0, &body(2))]);
    s.reclaimer_barrier();
    assert_eq!(files.allocated(seg).unwrap(), vec![0..2 * PAGE]);
    // A checkpoint moves the tail past both records: now it goes.
    s.reclaimed();
    assert!(s.checkpoints() > 0);
    assert_eq!(files.allocated(seg).unwrap(), vec![PAGE..2 * PAGE]);
    s.crash();
    let s = open(&dir, NO_CHECKPOINTS);
    assert_eq!(read(&s, 40, 0, 4096), body(2));
    drop(s);
    assert_checks_clean(&dir);
}

#[test]
fn a_ring_smaller_than_the_work_wraps_and_checkpoints_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let opts = "?checkpoint_ms=0&flush_interval_ms=600000&log_size=64K";
    let s = open(&dir, opts);
    // 17 commits of two pages each through a ring of 15 pages.
    small_commits(&s);
    assert!(s.checkpoints() >= 2, "{} checkpoints", s.checkpoints());
    s.crash();
    let s = open(&dir, opts);
    assert_small_commits(&s);
    drop(s);
    assert!(check(&dir).is_clean());
}
