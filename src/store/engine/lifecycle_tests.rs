//! Tests of a volume's life cycle at open: only `format` creates a volume,
//! an open refuses a missing one, and a live holder is named instead of
//! being fenced unless the open takes the volume over (`holder.rs`).

use super::holder::Holder;
use super::{OpenMode, OpenVolumeError, SlateStore};
use crate::store::Store;

const EXISTING: OpenMode = OpenMode::Existing { take_over: false };

fn url(dir: &tempfile::TempDir) -> String {
    format!("file://{}/vol", dir.path().display())
}

/// A process of this host that lives until dropped.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start() -> Sleeper {
        Sleeper(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_holder(dir: &tempfile::TempDir, pid: u32) -> Holder {
    let h = Holder {
        pid,
        ..Holder::this_process()
    };
    put_record(dir, &h);
    h
}

/// Write `h` as the volume's holder record, as a claim does (under the
/// record's lock, so never between a renewal's check and its write).
fn put_record(dir: &tempfile::TempDir, h: &Holder) {
    let vol = dir.path().join("vol");
    let fs = object_store::local::LocalFileSystem::new_with_prefix(&vol).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(super::holder::write_holder(&fs, "", Some(&vol), h))
        .unwrap();
}

fn holder_file(dir: &tempfile::TempDir) -> Option<Holder> {
    let text = std::fs::read_to_string(dir.path().join("vol/volume.holder")).ok()?;
    Holder::parse(&text)
}

#[test]
fn an_open_refuses_a_missing_volume_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = SlateStore::open_as(&url(&dir), EXISTING);
    assert!(matches!(r, Err(OpenVolumeError::NoVolume)), "{:?}", r.err());
    assert!(
        !dir.path().join("vol").exists(),
        "the open made a directory"
    );
    // An empty directory is no volume either.
    std::fs::create_dir(dir.path().join("vol")).unwrap();
    let r = SlateStore::open_as(&url(&dir), EXISTING);
    assert!(matches!(r, Err(OpenVolumeError::NoVolume)), "{:?}", r.err());
}

#[test]
fn format_creates_once_and_records_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let id = SlateStore::format(&url(&dir), Some(3 << 30)).unwrap();
    assert_eq!(id.epoch, 1);
    let again = SlateStore::format(&url(&dir), None);
    assert!(
        matches!(again, Err(OpenVolumeError::Exists)),
        "{:?}",
        again.err()
    );
    let s = SlateStore::open_as(&url(&dir), EXISTING).unwrap();
    assert_eq!(s.identity().volume_id, id.volume_id);
    assert_eq!(s.identity().epoch, 2);
    assert_eq!(s.statfs().unwrap().capacity_bytes, 3 << 30);
    s.close().unwrap();
    // The URL's own capacity= wins over the recorded one.
    let s = SlateStore::open_as(&format!("{}?capacity=1G", url(&dir)), EXISTING).unwrap();
    assert_eq!(s.statfs().unwrap().capacity_bytes, 1 << 30);
}

#[test]
fn a_live_holder_is_named_unless_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    SlateStore::format(&url(&dir), None).unwrap();
    let other = Sleeper::start();
    let held = write_holder(&dir, other.0.id());
    match SlateStore::open_as(&url(&dir), EXISTING) {
        Err(OpenVolumeError::Held(h)) => assert_eq!(h, held),
        r => panic!("expected the holder, got {:?}", r.err()),
    }
    assert_eq!(
        holder_file(&dir),
        Some(held),
        "a refused open wrote its record"
    );
    let s = SlateStore::open_as(&url(&dir), OpenMode::Existing { take_over: true }).unwrap();
    let mine = s.identity().holder.unwrap();
    assert_eq!(mine.pid, std::process::id());
    assert_eq!(holder_file(&dir), Some(mine));
    s.close().unwrap();
    assert_eq!(holder_file(&dir), None, "a clean close leaves its record");
}

#[test]
fn a_dead_holder_does_not_stop_an_open() {
    let dir = tempfile::tempdir().unwrap();
    SlateStore::format(&url(&dir), None).unwrap();
    let pid = {
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        pid
    };
    write_holder(&dir, pid);
    let s = SlateStore::open_as(&url(&dir), EXISTING).unwrap();
    assert_eq!(s.identity().holder.map(|h| h.pid), Some(std::process::id()));
}

#[test]
fn the_record_is_renewed_until_another_opener_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    SlateStore::format(&url(&dir), None).unwrap();
    let s = SlateStore::open_as(&url(&dir), EXISTING).unwrap();
    // Renewed: a record set back to the epoch is written again.
    let mine = holder_file(&dir).unwrap();
    put_record(
        &dir,
        &Holder {
            renewed: 0,
            ..mine.clone()
        },
    );
    let renewed =
        pohmelfs_testkit::wait_until(WAIT, POLL, || holder_file(&dir).filter(|h| h.renewed > 0));
    assert!(renewed.is_some_and(|h| h.same_holder(&mine)), "not renewed");
    // Another opener's record: the fenced instance stops renewing and
    // leaves it alone.
    let taker = Holder {
        host: "elsewhere".into(),
        ..mine
    };
    put_record(&dir, &taker);
    let stopped =
        pohmelfs_testkit::wait_until(WAIT, POLL, || (!s.renews_its_holder_record()).then_some(()));
    assert!(stopped.is_some(), "still renewing over the taker's record");
    assert_eq!(holder_file(&dir), Some(taker.clone()));
    s.close().unwrap();
    assert_eq!(
        holder_file(&dir),
        Some(taker),
        "close removed the taker's record"
    );
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// A migration's destination on standby (`OpenMode::Standby`) takes the
/// volume from no live holder, standby or not, and any other writable
/// open takes it from a live standby holder (the source whose guest ran
/// on); once promoted its record says standby no more.
#[test]
fn a_standby_open_takes_over_nobody_and_yields_to_any_writer() {
    let dir = tempfile::tempdir().unwrap();
    SlateStore::format(&url(&dir), None).unwrap();
    let other = Sleeper::start();
    // A live holder, on standby or not: a standby open is refused.
    for standby in [false, true] {
        let held = Holder {
            pid: other.0.id(),
            standby,
            ..Holder::this_process()
        };
        put_record(&dir, &held);
        match SlateStore::open_as(&url(&dir), OpenMode::Standby) {
            Err(OpenVolumeError::Held(h)) => assert_eq!(h, held),
            r => panic!("standby={standby}: expected the holder, got {:?}", r.err()),
        }
    }
    // A live standby holder: an open that takes nobody over takes it.
    let s = SlateStore::open_as(&url(&dir), EXISTING).unwrap();
    let mine = holder_file(&dir).unwrap();
    assert_eq!(mine.pid, std::process::id());
    assert!(!mine.standby && !s.on_standby());
    s.close().unwrap();

    // Free: a standby open takes it, its record says so until promoted.
    let standby = SlateStore::open_as(&url(&dir), OpenMode::Standby).unwrap();
    let record = holder_file(&dir).unwrap();
    assert!(record.standby && standby.on_standby(), "{record:?}");
    assert!(standby.still_held());
    standby.promote();
    let promoted =
        pohmelfs_testkit::wait_until(WAIT, POLL, || holder_file(&dir).filter(|h| !h.standby));
    assert!(
        promoted.is_some_and(|h| h.same_holder(&record)),
        "the record still says standby"
    );
    assert!(!standby.on_standby() && standby.still_held());
    // Taken over (here by an open of this process, which no record
    // stops): no longer the volume's.
    let taker = SlateStore::open_as(&url(&dir), OpenMode::Existing { take_over: true }).unwrap();
    assert!(
        !standby.still_held(),
        "a standby open taken over still holds"
    );
    assert!(taker.still_held());
    drop(standby);
    taker.close().unwrap();
    drop(other);
}

/// The `.sst` tables the engine wrote under `vol/compacted`.
fn tables(dir: &tempfile::TempDir) -> usize {
    std::fs::read_dir(dir.path().join("vol/compacted"))
        .map(|d| d.filter_map(Result::ok).count())
        .unwrap_or(0)
}

#[test]
fn a_close_prepared_ahead_flushes_in_the_background_and_loses_nothing() {
    use super::conformance::{commit, inode};
    use crate::store::{FileKind, Op};
    let dir = tempfile::tempdir().unwrap();
    SlateStore::format(&url(&dir), None).unwrap();
    let s = SlateStore::open_as(&url(&dir), EXISTING).unwrap();
    let (checkpoints, before) = (s.checkpoints(), tables(&dir));
    let first = s.reserve_ids(100).unwrap();
    for ino in first..first + 100 {
        commit(&s, vec![Op::PutInode(inode(ino, FileKind::Regular))]);
    }
    s.prepare_close();
    // A checkpoint, then the memtable as a table of its own, without a
    // close.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.checkpoints() == checkpoints || tables(&dir) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint and table after 30 s: {} checkpoints, {} tables",
            s.checkpoints(),
            tables(&dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    s.close().unwrap();
    drop(s);
    let s = SlateStore::open_as(&url(&dir), EXISTING).unwrap();
    for ino in first..first + 100 {
        assert!(s.get_inode(ino).unwrap().is_some(), "inode {ino} lost");
    }
}

/// A live migration's hand-over leaves the dead segment pages still to
/// punch to the next open, whose reclaimer frees them: the source's
/// close does not punch them with the guest stopped, and nothing leaks.
#[test]
fn a_hand_over_leaves_its_dead_pages_to_the_next_open() {
    use super::conformance::{commit, read, write_op};
    use super::segment_tests::{allocated, assert_checks_clean, file, files, root_with};
    use super::Placement;
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    // No background checkpoint: what the overwrite frees stays held
    // until the hand-over's own.
    let logged = format!("{}?checkpoint_ms=0", url(&dir));
    let s = SlateStore::open_for_test(&logged, Placement::SegmentsOf(MIB));
    s.reserve_ids(1000).unwrap();
    commit(&s, root_with(&[100]));
    commit(
        &s,
        vec![file(100, MIB), write_op(100, 0, &vec![1u8; MIB as usize])],
    );
    let first = files(&dir).list().unwrap()[0].0;
    commit(&s, vec![write_op(100, 0, &vec![2u8; 256 << 10])]);
    s.hand_over().unwrap();
    drop(s);
    let handed = dir
        .path()
        .join("vol/segments")
        .join(super::reclaim::HANDED_FILE);
    assert!(handed.exists(), "nothing handed over");
    assert_eq!(allocated(&dir, first), MIB, "punched at the hand-over");
    // Pages to punch at the next open are not leaked.
    assert_checks_clean(&dir);

    let s = SlateStore::open_for_test(&logged, Placement::SegmentsOf(MIB));
    s.reclaimer_barrier();
    assert_eq!(allocated(&dir, first), MIB - (256 << 10));
    assert!(!handed.exists(), "the list outlived its pages");
    assert_eq!(read(&s, 100, 0, 4096), vec![2u8; 4096]);
    assert_eq!(read(&s, 100, MIB - 4096, 4096), vec![1u8; 4096]);
    s.close().unwrap();
    drop(s);
    assert_checks_clean(&dir);
}

/// A live migration's hand-over lets the volume go (holder record, commit
/// log) before its engine's own close, which the drop does: the next
/// open takes the volume while that engine is still open, and its late
/// close (the memtable of everything committed, flushed into a table)
/// neither loses nor undoes anything of the new writer's.
#[test]
fn a_hand_over_lets_the_volume_go_before_the_engine_closes() {
    // With the commit log, and without it (no final checkpoint flushes
    // the WAL's buffer there; nor does its timer within ten minutes).
    for query in ["", "?log=off&commit=flush&flush_interval_ms=600000"] {
        hand_over_before_the_engine_closes(query);
    }
}

fn hand_over_before_the_engine_closes(query: &str) {
    use super::conformance::{commit, inode};
    use crate::store::{FileKind, Op};
    let dir = tempfile::tempdir().unwrap();
    let vol = format!("{}{query}", url(&dir));
    SlateStore::format(&vol, None).unwrap();
    let source = SlateStore::open_as(&vol, EXISTING).unwrap();
    let first = source.reserve_ids(200).unwrap();
    for ino in first..first + 100 {
        commit(&source, vec![Op::PutInode(inode(ino, FileKind::Regular))]);
    }
    // A write nothing awaited, still in the WAL's buffer: durable before
    // the volume goes, as the destination fences the buffer's flush.
    let unawaited = source.block_on(source.raw_db().put_with_options(
        b"unawaited",
        b"1",
        &slatedb::config::PutOptions::default(),
        &slatedb::config::WriteOptions::default(),
    ));
    assert!(unawaited.is_ok(), "{:?}", unawaited.err());
    source.hand_over().unwrap();
    assert!(
        holder_file(&dir).is_none(),
        "the holder record outlived the hand-over"
    );
    let engine_answers = source.block_on(source.raw_db().get(b"x"));
    assert!(
        engine_answers.is_ok(),
        "the engine closed before the volume went: {engine_answers:?}"
    );

    let dest = SlateStore::open_as(&vol, EXISTING).unwrap();
    let found = dest.block_on(dest.raw_db().get(b"unawaited"));
    assert_eq!(
        found.ok().flatten().as_deref(),
        Some(&b"1"[..]),
        "a write in the WAL's buffer was lost at the hand-over ({query:?})"
    );
    for ino in first..first + 100 {
        assert!(
            dest.get_inode(ino).unwrap().is_some(),
            "inode {ino} lost at the hand-over"
        );
    }
    for ino in first + 100..first + 200 {
        commit(&dest, vec![Op::PutInode(inode(ino, FileKind::Regular))]);
    }
    // The source's engine closes now, behind the new writer.
    drop(source);
    for ino in first + 100..first + 200 {
        commit(&dest, vec![Op::PutInode(inode(ino, FileKind::Directory))]);
    }
    dest.close().unwrap();
    drop(dest);
    let s = SlateStore::open_as(&vol, EXISTING).unwrap();
    for ino in first..first + 200 {
        let kind = s.get_inode(ino).unwrap().map(|i| i.kind);
        let want = if ino < first + 100 {
            FileKind::Regular
        } else {
            FileKind::Directory
        };
        assert_eq!(kind, Some(want), "inode {ino}");
    }
    s.close().unwrap();
}

/// SlateDB's compactor, which starts once the volume is open rather than
/// within the engine's own open (`open.rs`), merges the tables that
/// memtable flushes leave in L0 into a sorted run.
#[test]
fn the_compactor_started_after_the_open_compacts() {
    use super::conformance::{commit, inode};
    use crate::store::{FileKind, Op};
    let dir = tempfile::tempdir().unwrap();
    SlateStore::format(&url(&dir), None).unwrap();
    let s = SlateStore::open_as(&url(&dir), EXISTING).unwrap();
    let first = s.reserve_ids(100).unwrap();
    for ino in first..first + 8 {
        commit(&s, vec![Op::PutInode(inode(ino, FileKind::Regular))]);
        let flushed = s.block_on(
            s.raw_db()
                .flush_with_options(slatedb::config::FlushOptions {
                    flush_type: slatedb::config::FlushType::MemTable,
                }),
        );
        assert!(flushed.is_ok(), "{:?}", flushed.err());
    }
    let runs = pohmelfs_testkit::wait_until(std::time::Duration::from_secs(60), POLL, || {
        let m = s.raw_db().manifest();
        (!m.compacted().is_empty()).then_some(m.l0().len())
    });
    assert!(
        runs.is_some(),
        "no sorted run within 60 s: the compactor does not run"
    );
    for ino in first..first + 8 {
        assert!(s.get_inode(ino).unwrap().is_some(), "inode {ino}");
    }
    s.close().unwrap();
}
