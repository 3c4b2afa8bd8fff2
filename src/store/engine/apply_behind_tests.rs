//! Tests of the acknowledgement at durability (`log_queue.rs`,
//! `commit.rs`): a commit returns once its commit-log record is durable,
//! while its batch is still on its way to the engine, and every read in
//! between sees it; a crash in between loses nothing.
//!
//! The engine write is held at a gate (a semaphore without permits) for as
//! long as a test needs, so nothing depends on timing.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::conformance::{commit, read, write_op};
use super::recover_tests::{open, NO_CHECKPOINTS};
use super::segment_tests::{file, root_with};
use super::SlateStore;
use crate::store::{Dirent, FileKind, Op, Store, Txn, ROOT_INO};

const BOUND: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(2);

const INO: u64 = 40;
const NEW: u64 = 41;
const LEN: usize = 3 * 4096;
/// Where the second chunk of a file starts.
const CHUNK: u64 = crate::store::BLOCK_SIZE;

/// Hold every group's engine write from now on: the gate to open.
fn hold_applies(s: &SlateStore) -> Arc<Semaphore> {
    let gate = Arc::new(Semaphore::new(0));
    *s.log_queue.before_apply.lock().unwrap() = Some(Arc::clone(&gate));
    gate
}

/// Commit `ops` on another thread and wait, bounded, for it to return:
/// a commit that waited for its held engine write fails here.
fn commit_returns(s: &Arc<SlateStore>, ops: Vec<Op>) {
    let (tx, rx) = mpsc::channel();
    let s = Arc::clone(s);
    std::thread::spawn(move || {
        let committed = s.commit(Txn { ops });
        // Dropped before the answer: a caller that takes the store back
        // (`Arc::into_inner`) must find this clone gone.
        drop(s);
        let _ = tx.send(committed);
    });
    rx.recv_timeout(BOUND)
        .expect("the commit to return while its engine write is held")
        .expect("commit");
}

/// A volume with file `INO` of `LEN` bytes of 1s, durable and in the
/// engine; then, with engine writes held, a commit that overwrites its
/// middle with 2s, writes a page of 3s into its second chunk and links
/// `NEW` as "new".
/// Returns the store, the gate and what `INO` holds now.
fn acknowledged_not_applied(dir: &tempfile::TempDir) -> (Arc<SlateStore>, Arc<Semaphore>, Vec<u8>) {
    let s = Arc::new(open(dir, NO_CHECKPOINTS));
    let mut ops = root_with(&[INO]);
    ops.push(file(INO, LEN as u64));
    ops.push(write_op(INO, 0, &[1u8; LEN]));
    commit(&*s, ops);
    // That group's own engine write must not meet the gate.
    s.block_on(s.await_applied())
        .expect("the first commit in the engine");
    let gate = hold_applies(&s);
    let mut want = vec![1u8; LEN];
    want[4096..8192].fill(2);
    want.resize(CHUNK as usize, 0);
    want.extend_from_slice(&[3u8; 4096]);
    commit_returns(
        &s,
        vec![
            write_op(INO, 4096, &[2u8; 4096]),
            write_op(INO, CHUNK, &[3u8; 4096]),
            file(INO, want.len() as u64),
            file(NEW, 0),
            Op::PutDirent {
                parent: ROOT_INO,
                dirent: Dirent {
                    name: b"new".to_vec(),
                    ino: NEW,
                    kind: FileKind::Regular,
                    cookie: 1000,
                },
            },
        ],
    );
    assert!(
        s.log_queue.any_unapplied(),
        "the acknowledged group is still on its way to the engine"
    );
    (s, gate, want)
}

/// Every read path says what the acknowledged commit wrote.
fn reads_see_it(s: &SlateStore, want: &[u8]) {
    assert_eq!(read(s, INO, 0, want.len()), want, "read");
    let plan = s.read_data(INO, 0, want.len()).unwrap().to_vec().unwrap();
    assert_eq!(plan, want, "read plan");
    assert_eq!(
        s.get_inode(INO).unwrap().map(|i| i.size),
        Some(want.len() as u64),
        "inode"
    );
    assert_eq!(
        s.lookup(ROOT_INO, b"new").unwrap().map(|d| d.ino),
        Some(NEW),
        "lookup"
    );
    let names: Vec<Vec<u8>> = s
        .readdir(ROOT_INO, 0, 100)
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert!(names.contains(&b"new".to_vec()), "readdir: {names:?}");
    // The extending page is in a chunk of its own, known only to the
    // scans of chunk records.
    assert_eq!(s.next_data(INO, CHUNK).unwrap(), Some(CHUNK), "next data");
    assert_eq!(s.next_hole(INO, CHUNK).unwrap(), 2 * CHUNK, "next hole");
}

#[test]
fn a_commit_returns_before_its_engine_write_and_reads_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let (s, gate, want) = acknowledged_not_applied(&dir);
    reads_see_it(&s, &want);
    gate.add_permits(1);
    pohmelfs_testkit::wait_until(BOUND, POLL, || !s.log_queue.any_unapplied())
        .expect("the held engine write to finish once released");
    reads_see_it(&s, &want);
    // A commit after it builds on it and returns too.
    gate.add_permits(1);
    commit_returns(&s, vec![write_op(INO, 0, &[4u8; 4096])]);
    let mut after = want.clone();
    after[..4096].fill(4);
    assert_eq!(read(&*s, INO, 0, after.len()), after);
}

#[test]
fn a_crash_before_the_engine_write_loses_no_acknowledged_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _gate, want) = acknowledged_not_applied(&dir);
    let s = Arc::into_inner(s).expect("the committer is done");
    s.crash();
    let s = open(&dir, NO_CHECKPOINTS);
    reads_see_it(&s, &want);
}

#[test]
fn a_close_waits_for_the_engine_write() {
    let dir = tempfile::tempdir().unwrap();
    let (s, gate, want) = acknowledged_not_applied(&dir);
    let closer = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.close())
    };
    // The close is held behind the engine write; release it.
    gate.add_permits(1);
    closer.join().unwrap().expect("close");
    assert!(!s.log_queue.any_unapplied());
    drop(s);
    let s = open(&dir, NO_CHECKPOINTS);
    reads_see_it(&s, &want);
}
