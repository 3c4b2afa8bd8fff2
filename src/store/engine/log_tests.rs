//! Tests of the commit log's file and format (`log.rs`): what replay reads
//! back after a crash, a torn record, a wrap and a stale lap.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::log::{
    encode_payload, record_bytes, CommitLog, LogError, Record, SegWrite, DIR_NAME, FILE_NAME,
    LOG_BYTES_MIN, PAGE, RECORD_HEADER,
};

/// A record of `n`: one put, one delete and one segment write of `len`
/// bytes of `n`.
fn payload(n: u64, len: usize) -> (Vec<u8>, Record) {
    let puts = vec![
        (
            format!("key{n}").into_bytes(),
            Some(Bytes::from(vec![n as u8; 3])),
        ),
        (b"gone".to_vec(), None),
    ];
    let bytes = vec![n as u8; len];
    let buf = encode_payload(&puts, [(7, n * 8192, vec![&bytes[..]])]);
    let want = Record {
        lsn: 0,
        puts: puts.into_iter().map(|(k, v)| (Bytes::from(k), v)).collect(),
        writes: vec![SegWrite {
            seg: 7,
            off: n * 8192,
            bytes,
        }],
    };
    (buf, want)
}

/// Append records `from..to`, each with `len` bytes; what replay should
/// find for them.
fn append(log: &CommitLog, from: u64, to: u64, len: usize) -> Vec<Record> {
    (from..to)
        .map(|n| {
            let (mut buf, mut want) = payload(n, len);
            want.lsn = log.append(&mut buf).expect("append");
            want
        })
        .collect()
}

fn open(dir: &tempfile::TempDir) -> (Arc<CommitLog>, Vec<Record>) {
    CommitLog::open(dir.path(), LOG_BYTES_MIN, 1).expect("open log")
}

fn file(dir: &tempfile::TempDir) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join(DIR_NAME).join(FILE_NAME))
        .unwrap()
}

#[test]
fn a_reopened_log_gives_back_every_record_since_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (log, found) = open(&dir);
    assert!(found.is_empty());
    let want = append(&log, 1, 4, 100);
    assert_eq!(want.iter().map(|r| r.lsn).collect::<Vec<_>>(), [1, 2, 3]);
    drop(log);
    let (log, found) = open(&dir);
    assert_eq!(found, want);
    // Reading is not consuming: without a checkpoint they come back again.
    drop(log);
    assert_eq!(open(&dir).1, want);
}

#[test]
fn a_checkpoint_drops_what_it_passed() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&dir);
    append(&log, 1, 3, 10);
    log.applied_all();
    log.advance_tail(log.applied()).unwrap();
    let want = append(&log, 3, 5, 10);
    drop(log);
    let (log, found) = open(&dir);
    assert_eq!(found, want);
    // Numbering goes on after a reopen.
    assert_eq!(log.next_lsn(), 5);
}

#[test]
fn a_torn_record_ends_replay_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&dir);
    let want = append(&log, 1, 5, 100);
    drop(log);
    // Flip one payload byte of record 3: records 1 and 2 stay, and record
    // 4 after it was never acknowledged (its group's sync never returned).
    let at = PAGE * 3 + RECORD_HEADER as u64 + 10;
    let f = file(&dir);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    let (log, found) = open(&dir);
    assert_eq!(found, want[..2]);
    // The next record takes the torn one's place and number; the old
    // record 4 behind it does not chain on and is not replayed.
    let (mut buf, _) = payload(30, 100);
    assert_eq!(log.append(&mut buf).unwrap(), 3);
    drop(log);
    let (_, found) = open(&dir);
    assert_eq!(found.len(), 3);
    assert_eq!(found[2].puts[0].0, Bytes::from_static(b"key30"));
}

#[test]
fn records_wrap_around_the_ring_and_stale_laps_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&dir);
    // 15 ring pages; records of 4 pages each, so laps do not divide
    // evenly and a record that would cross the end is preceded by a wrap
    // record.
    let len = 3 * PAGE as usize;
    assert_eq!(record_bytes(len + 100), 4 * PAGE);
    let mut lsn = 1;
    for _ in 0..3 {
        append(&log, lsn, lsn + 2, len);
        lsn += 2;
        log.applied_all();
        log.advance_tail(log.applied()).unwrap();
    }
    // Pages 1-8; 9-12, a wrap record at 13, 1-4; 5-12 and the tail at 13:
    // the next two records are a wrap record at 13, then 1-4 and 5-8.
    let want = append(&log, lsn, lsn + 2, len);
    drop(log);
    let (log, found) = open(&dir);
    assert_eq!(found, want);
    // Everything a lap earlier is still in the file, with lower numbers.
    assert_eq!(log.next_lsn(), lsn + 2);
}

#[test]
fn a_full_ring_refuses_until_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(&dir);
    let len = 2 * PAGE as usize;
    // 15 pages hold four 3-page records; a fifth would fill the ring.
    append(&log, 1, 5, len);
    let (mut buf, _) = payload(9, len);
    assert!(matches!(log.append(&mut buf), Err(LogError::Full)));
    log.applied_all();
    log.advance_tail(log.applied()).unwrap();
    assert_eq!(log.append(&mut buf).unwrap(), 5);
}

#[test]
fn a_second_open_in_the_process_fences_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = open(&dir);
    let want = append(&first, 1, 3, 10);
    let (second, found) = open(&dir);
    assert_eq!(found, want);
    let (mut buf, _) = payload(5, 10);
    assert!(matches!(first.append(&mut buf), Err(LogError::Fenced)));
    assert!(matches!(first.check(), Err(LogError::Fenced)));
    assert_eq!(second.append(&mut buf).unwrap(), 3);
}

#[test]
fn an_open_reads_records_that_span_its_read_chunks_and_the_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let open = || CommitLog::open(dir.path(), size, 1).expect("open log");
    let (log, _) = open();
    // Records of 6 pages: the open reads the ring 64 pages at a time, so
    // every fourth record or so crosses from one read into the next.
    let len = 5 * PAGE as usize + 100;
    assert_eq!(record_bytes(len + 100), 6 * PAGE);
    let mut want = append(&log, 1, 31, len);
    drop(log);
    let (log, found) = open();
    assert_eq!(found, want);
    // Past the tail moved near the ring's end, the records wrap.
    log.applied_all();
    log.advance_tail(log.applied()).unwrap();
    want = append(&log, 31, 61, len);
    drop(log);
    assert_eq!(open().1, want);
}
