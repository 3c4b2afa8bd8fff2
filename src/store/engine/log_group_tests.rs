//! Tests of group commit in the commit log (`log_queue.rs`, `commit.rs`):
//! commits that queue while a record is written share the next record,
//! which replays whole after a crash and, torn, not at all.
//!
//! The first record's write is held with a latch until every other
//! committer has queued behind it, so the grouping does not depend on
//! timing.

use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::conformance::{commit, read, write_op};
use super::log::{self, PAGE};
use super::recover_tests::{body, lose_segment_bytes, open, vol, NO_CHECKPOINTS};
use super::segment_tests::check;
use super::segment_tests::{file, root_with};
use super::SlateStore;

const BOUND: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(2);

/// The file the first commit writes, and those that queue behind it.
const FIRST: u64 = 40;
const QUEUED: [u64; 6] = [41, 42, 43, 44, 45, 46];

/// Hold the next record's write until the returned sender is used; the
/// receiver hears when a leader has reached it.
fn hold_next_write(s: &SlateStore) -> (Receiver<()>, Sender<()>) {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let once = Mutex::new(Some((entered_tx, release_rx)));
    *s.log_queue.before_write.lock().unwrap() = Some(Arc::new(move || {
        let taken = once.lock().unwrap().take();
        if let Some((entered, release)) = taken {
            entered.send(()).unwrap();
            release
                .recv_timeout(BOUND)
                .expect("the test to release the record");
        }
    }));
    (entered_rx, release_tx)
}

/// The files exist (durable); then one commit's record is held while six
/// more commits queue behind it, and released. Returns the store and how
/// many records the seven commits took.
fn group_behind_a_held_record(dir: &tempfile::TempDir) -> (SlateStore, u64) {
    let s = Arc::new(open(dir, NO_CHECKPOINTS));
    let all: Vec<u64> = std::iter::once(FIRST).chain(QUEUED).collect();
    let mut ops = root_with(&all);
    ops.extend(all.iter().map(|&i| file(i, 4096)));
    commit(&*s, ops);
    let cp = s.checkpoint.as_ref().expect("a commit log");
    let synced = cp.log.synced();
    let (entered, release) = hold_next_write(&s);
    let first = {
        let s = s.clone();
        std::thread::spawn(move || commit(&*s, vec![write_op(FIRST, 0, &body(FIRST))]))
    };
    entered
        .recv_timeout(BOUND)
        .expect("the first commit to reach its record");
    let queued: Vec<_> = QUEUED
        .iter()
        .map(|&ino| {
            let s = s.clone();
            std::thread::spawn(move || commit(&*s, vec![write_op(ino, 0, &body(ino))]))
        })
        .collect();
    pohmelfs_testkit::wait_until(BOUND, POLL, || s.log_queue.waiting() == QUEUED.len())
        .expect("every other commit to queue behind the held record");
    release.send(()).unwrap();
    first.join().unwrap();
    for t in queued {
        t.join().unwrap();
    }
    let records = cp.log.synced() - synced;
    let s = Arc::into_inner(s).expect("the committers are done");
    (s, records)
}

#[test]
fn commits_queued_behind_a_record_share_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (s, records) = group_behind_a_held_record(&dir);
    // The held record, and exactly one more for the six behind it: two
    // writes, two fdatasyncs.
    assert_eq!(records, 2, "records (and log fdatasyncs) for seven commits");
    for ino in std::iter::once(FIRST).chain(QUEUED) {
        assert!(read(&s, ino, 0, 4096) == body(ino), "inode {ino}");
    }
}

#[test]
fn a_grouped_record_comes_back_whole_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (s, records) = group_behind_a_held_record(&dir);
    assert_eq!(records, 2);
    s.crash();
    // Their bytes reach the segments only through the log's records.
    lose_segment_bytes(&dir);
    let report = check(&dir);
    assert!(report.is_clean(), "{:#?}", report.problems);
    let s = open(&dir, NO_CHECKPOINTS);
    for ino in std::iter::once(FIRST).chain(QUEUED) {
        assert!(read(&s, ino, 0, 4096) == body(ino), "inode {ino}");
    }
    drop(s);
    let report = check(&dir);
    assert!(report.is_clean(), "{:#?}", report.problems);
}

/// The offset and length in pages of the record with the highest lsn.
fn last_record(dir: &tempfile::TempDir) -> (u64, u64) {
    let ring = std::fs::read(vol(dir).join(log::DIR_NAME).join(log::FILE_NAME)).unwrap();
    let mut best = (0, 0, 0);
    for off in (PAGE as usize..ring.len()).step_by(PAGE as usize) {
        let magic = u32::from_le_bytes(ring[off..off + 4].try_into().unwrap());
        let lsn = u64::from_le_bytes(ring[off + 8..off + 16].try_into().unwrap());
        let len = u32::from_le_bytes(ring[off + 20..off + 24].try_into().unwrap());
        if magic == 0x4352_4c50 && lsn > best.1 {
            best = (off as u64, lsn, log::record_bytes(len as usize) / PAGE);
        }
    }
    assert!(best.1 > 0, "no record in the log");
    (best.0, best.2)
}

#[test]
fn a_torn_grouped_record_ends_replay_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = group_behind_a_held_record(&dir);
    s.crash();
    // The grouped record spans pages (six 4 KiB writes); its last page
    // never reached the disk.
    let (at, pages) = last_record(&dir);
    assert!(pages > 1, "a grouped record of {pages} page");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(vol(&dir).join(log::DIR_NAME).join(log::FILE_NAME))
        .unwrap();
    f.write_all_at(&vec![0u8; PAGE as usize], at + (pages - 1) * PAGE)
        .unwrap();
    lose_segment_bytes(&dir);
    let s = open(&dir, NO_CHECKPOINTS);
    assert!(read(&s, FIRST, 0, 4096) == body(FIRST));
    // None of the group's commits, not some of them.
    for ino in QUEUED {
        assert!(read(&s, ino, 0, 4096) == vec![0u8; 4096], "inode {ino}");
    }
    // The log goes on after the record that ended replay.
    commit(&s, vec![write_op(QUEUED[0], 0, &body(1))]);
    s.crash();
    let s = open(&dir, NO_CHECKPOINTS);
    assert!(read(&s, FIRST, 0, 4096) == body(FIRST));
    assert!(read(&s, QUEUED[0], 0, 4096) == body(1));
    drop(s);
    let report = check(&dir);
    assert!(report.is_clean(), "{:#?}", report.problems);
}

/// Through the embedded sink, as the write-back layer sends: each attempt
/// gets a commit thread of its own, so attempts queue in the log behind a
/// held record instead of behind one another's threads, and the thread
/// that finishes an attempt reports it.
#[test]
fn the_engine_sink_commits_each_attempt_on_a_thread_that_reports_it() {
    use crate::store::sink::{EngineSink, Sink};
    use crate::store::{OnceStore, Txn};

    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(&dir, NO_CHECKPOINTS));
    let all: Vec<u64> = std::iter::once(FIRST).chain(QUEUED).collect();
    let mut ops = root_with(&all);
    ops.extend(all.iter().map(|&i| file(i, 4096)));
    commit(&*s, ops);
    let sink = EngineSink::new(s.clone() as Arc<dyn OnceStore>).unwrap();
    let (entered, release) = hold_next_write(&s);
    let (done_tx, done_rx) = mpsc::channel();
    let send = |txn_id: u64, ino: u64| {
        let done_tx = done_tx.clone();
        let txn = Txn {
            ops: vec![write_op(ino, 0, &body(ino))],
        };
        let sent = sink.send_then(
            0,
            txn_id,
            0,
            txn,
            Box::new(move |result| {
                let thread = std::thread::current().name().map(str::to_owned);
                done_tx.send((txn_id, thread, result)).unwrap();
            }),
        );
        assert!(sent.is_ok(), "the engine sink runs attempts itself");
    };
    send(1, FIRST);
    entered
        .recv_timeout(BOUND)
        .expect("the first attempt to reach its record");
    for (n, &ino) in QUEUED.iter().enumerate() {
        send(2 + n as u64, ino);
    }
    pohmelfs_testkit::wait_until(BOUND, POLL, || s.log_queue.waiting() == QUEUED.len())
        .expect("every other attempt to queue in the log, each on a thread of its own");
    release.send(()).unwrap();
    let mut acked = Vec::new();
    for _ in 0..=QUEUED.len() {
        let (id, thread, result) = done_rx.recv_timeout(BOUND).expect("every attempt to end");
        assert_eq!(thread.as_deref(), Some("pohmelfs-commit"), "attempt {id}");
        assert!(result.is_ok(), "attempt {id}: {result:?}");
        acked.push(id);
    }
    acked.sort();
    assert_eq!(acked, (1..=7).collect::<Vec<_>>());
    for ino in all {
        assert!(read(&*s, ino, 0, 4096) == body(ino), "inode {ino}");
    }
}
