//! Tests of snapshots and clones: a snapshot keeps its bytes while the
//! source overwrites and deletes (the reclaimer defers shared pages),
//! clones and their source do not see each other's writes, deleting them
//! gives the space back, a clone costs a few new bytes, and a snapshot is
//! never opened for writing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::conformance::{commit, read, write_op};
use super::segment::SegmentFiles;
use super::segment_tests::{file, root_with};
use super::snapshot::{self, SnapshotError};
use super::{codec, keys, OpenVolumeError, Placement, SlateStore, VolumeReader};
use crate::check::volume::{check_volume, Report};
use crate::store::{Op, Store};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn url_of(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn check(dir: &Path) -> Report {
    let reader = VolumeReader::open(&url_of(dir)).unwrap();
    check_volume(&reader).unwrap()
}

fn assert_clean(what: &str, dir: &Path) -> Report {
    let r = check(dir);
    assert!(r.is_clean(), "{what}: {:#?}", r.problems);
    assert!(r.warnings.is_empty(), "{what}: {:#?}", r.warnings);
    r
}

/// A volume with file 100 (1 MiB of 1s) and file 101 (512 KiB of 3s),
/// segments sealed at 1 MiB so the two land in separate segments.
fn golden(dir: &Path) -> SlateStore {
    let s = SlateStore::open_for_test(&url_of(dir), Placement::SegmentsOf(MIB));
    s.reserve_ids(1000).unwrap();
    commit(&s, root_with(&[100, 101]));
    commit(
        &s,
        vec![file(100, MIB), write_op(100, 0, &vec![1u8; MIB as usize])],
    );
    commit(
        &s,
        vec![
            file(101, 512 * KIB),
            write_op(101, 0, &vec![3u8; 512 * KIB as usize]),
        ],
    );
    s
}

/// A scratch directory with [`golden`] as its volume `vol`.
fn scratch_golden() -> (tempfile::TempDir, PathBuf, SlateStore) {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    let s = golden(&vol);
    (tmp, vol, s)
}

/// Bytes the filesystem holds for the segments of the volume in `dir`.
fn segment_blocks(dir: &Path) -> u64 {
    let f = SegmentFiles::of_volume(dir);
    f.list()
        .unwrap()
        .iter()
        .map(|(id, _)| {
            f.allocated(*id)
                .unwrap()
                .iter()
                .map(|r| r.end - r.start)
                .sum::<u64>()
        })
        .sum()
}

/// Bytes of the regular files under `dir` that no other name links.
fn unshared_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            total += unshared_bytes(&e.path());
        } else if m.nlink() == 1 {
            total += m.len();
        }
    }
    total
}

fn volume_id(s: &SlateStore) -> [u8; 16] {
    codec::decode_superblock(&s.raw_get_for_test(&keys::superblock()))
        .unwrap()
        .volume_id
}

fn open(dir: &Path) -> SlateStore {
    SlateStore::open_for_test(&url_of(dir), Placement::SegmentsOf(MIB))
}

#[test]
fn a_snapshot_keeps_its_bytes_while_the_source_overwrites_and_deletes() {
    let (tmp, vol, s) = scratch_golden();
    let snap = s.take_snapshot("s1").unwrap();
    assert_eq!(snap, vol.join("snapshots/s1"));
    let shared_before = segment_blocks(&vol);
    // Overwrite half of file 100 and remove file 101; let the reclaimer
    // run: it must defer every page the snapshot shares.
    commit(&s, vec![write_op(100, 0, &vec![2u8; 512 * KIB as usize])]);
    commit(
        &s,
        vec![
            Op::RemoveDirent {
                parent: crate::store::ROOT_INO,
                name: b"f1".to_vec(),
            },
            Op::RemoveInode { ino: 101 },
        ],
    );
    s.reclaimed();
    assert_eq!(read(&s, 100, 0, 4)[..], [2u8; 4]);
    assert_eq!(read(&s, 100, MIB - 4, 4)[..], [1u8; 4]);
    // Nothing shared was punched.
    let snap_files = SegmentFiles::of_volume(&snap);
    let snap_blocks: u64 = snap_files
        .list()
        .unwrap()
        .iter()
        .map(|(id, _)| {
            snap_files
                .allocated(*id)
                .unwrap()
                .iter()
                .map(|r| r.end - r.start)
                .sum::<u64>()
        })
        .sum();
    assert!(
        snap_blocks >= MIB + 512 * KIB,
        "{snap_blocks} < {shared_before}"
    );
    s.close().unwrap();
    drop(s);
    assert_clean("source", &vol);
    let report = assert_clean("snapshot", &snap);
    assert!(
        !report.shared.is_empty(),
        "the snapshot shares its segments"
    );
    // The snapshot's bytes, through a clone of it.
    let clone = tmp.path().join("clone");
    snapshot::clone_from(&snap, &clone).unwrap();
    let c = open(&clone);
    assert_eq!(read(&c, 100, 0, MIB as usize), vec![1u8; MIB as usize]);
    assert_eq!(
        read(&c, 101, 0, 512 * KIB as usize),
        vec![3u8; 512 * KIB as usize]
    );
    c.close().unwrap();
    drop(c);
    assert_clean("clone", &clone);
}

#[test]
fn a_clone_and_its_source_do_not_see_each_others_writes() {
    let (tmp, vol, s) = scratch_golden();
    let snap = s.take_snapshot("base").unwrap();
    let (c1_dir, c2_dir) = (tmp.path().join("c1"), tmp.path().join("c2"));
    snapshot::clone_from(&snap, &c1_dir).unwrap();
    snapshot::clone_from(&snap, &c2_dir).unwrap();
    let c1 = open(&c1_dir);
    assert_ne!(volume_id(&c1), volume_id(&s), "a clone is a new volume");
    commit(&s, vec![write_op(100, 0, &vec![6u8; 64 * KIB as usize])]);
    commit(&c1, vec![write_op(100, 0, &vec![5u8; 128 * KIB as usize])]);
    commit(&c1, vec![Op::Truncate { ino: 101, size: 0 }, file(101, 0)]);
    s.reclaimed();
    c1.reclaimed();
    assert_eq!(read(&s, 100, 0, 2), [6, 6]);
    assert_eq!(read(&s, 100, 64 * KIB, 2), [1, 1]);
    assert_eq!(read(&s, 101, 0, 2), [3, 3]);
    assert_eq!(read(&c1, 100, 64 * KIB, 2), [5, 5]);
    assert_eq!(read(&c1, 100, 128 * KIB, 2), [1, 1]);
    // The other clone still has the snapshot's bytes.
    let c2 = open(&c2_dir);
    assert_ne!(volume_id(&c2), volume_id(&c1));
    assert_eq!(read(&c2, 100, 0, MIB as usize), vec![1u8; MIB as usize]);
    assert_eq!(
        read(&c2, 101, 0, 512 * KIB as usize),
        vec![3u8; 512 * KIB as usize]
    );
    for (what, st, dir) in [
        ("source", s, &vol),
        ("c1", c1, &c1_dir),
        ("c2", c2, &c2_dir),
    ] {
        st.close().unwrap();
        drop(st);
        assert_clean(what, dir);
    }
    assert_clean("snapshot", &snap);
}

#[test]
fn deleting_the_snapshot_and_its_clone_gives_the_space_back() {
    let (tmp, vol, s) = scratch_golden();
    let snap = s.take_snapshot("s").unwrap();
    let clone = tmp.path().join("clone");
    snapshot::clone_from(&snap, &clone).unwrap();
    // Overwrite half of file 100 and remove 101: those old pages are dead
    // here, and kept for the snapshot and the clone.
    commit(&s, vec![write_op(100, 0, &vec![9u8; 512 * KIB as usize])]);
    commit(
        &s,
        vec![
            Op::RemoveDirent {
                parent: crate::store::ROOT_INO,
                name: b"f1".to_vec(),
            },
            Op::RemoveInode { ino: 101 },
        ],
    );
    s.reclaimed();
    s.close().unwrap();
    drop(s);
    // File 100's old MiB (half of it dead here, deferred) and its new
    // half; 101's segment is no longer the source's.
    assert_eq!(segment_blocks(&vol), MIB + 512 * KIB);
    assert_eq!(segment_blocks(&snap), MIB + 512 * KIB);
    std::fs::remove_dir_all(&clone).unwrap();
    let ours: Vec<u64> = SegmentFiles::of_volume(&vol)
        .list()
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    let snap_files = SegmentFiles::of_volume(&snap);
    for (id, _) in snap_files.list().unwrap() {
        // The snapshot holds the last link of what the source let go.
        let want = if ours.contains(&id) { 2 } else { 1 };
        assert_eq!(snap_files.links(id).unwrap(), want, "segment {id}");
    }
    snapshot::delete(&vol, "s").unwrap();
    assert!(snapshot::list(&vol).unwrap().is_empty());
    // The next open punches what was deferred.
    let s = open(&vol);
    s.reclaimed();
    assert_eq!(segment_blocks(&vol), MIB, "file 100's live MiB is left");
    assert_eq!(read(&s, 100, 0, 2), [9, 9]);
    assert_eq!(read(&s, 100, MIB - 2, 2), [1, 1]);
    s.close().unwrap();
    drop(s);
    let report = assert_clean("source", &vol);
    assert!(report.shared.is_empty(), "{:?}", report.shared);
    assert!(super::shared::read_list(&vol.join("segments"))
        .unwrap()
        .is_empty());
}

#[test]
fn a_clone_costs_a_few_new_bytes_whatever_the_volume_holds() {
    let (tmp, _vol, s) = scratch_golden();
    for i in 0..16u64 {
        commit(
            &s,
            vec![write_op(100, MIB + i * MIB, &vec![7u8; MIB as usize])],
        );
    }
    let snap = s.take_snapshot("big").unwrap();
    let clone = tmp.path().join("clone");
    snapshot::clone_from(&snap, &clone).unwrap();
    let new = unshared_bytes(&clone);
    assert!(new < 256 * KIB, "a clone wrote {new} bytes of its own");
    assert!(segment_blocks(&clone) >= 17 * MIB);
    s.close().unwrap();
}

#[test]
fn a_snapshot_is_never_opened_for_writing_and_names_are_checked() {
    let (tmp, vol, s) = scratch_golden();
    let snap = s.take_snapshot("ro").unwrap();
    assert!(matches!(
        s.take_snapshot("ro"),
        Err(SnapshotError::Exists(_))
    ));
    for bad in ["", ".hidden", "a/b", "..", "x y"] {
        assert!(
            matches!(s.take_snapshot(bad), Err(SnapshotError::BadName(_))),
            "{bad:?}"
        );
    }
    match SlateStore::open(&url_of(&snap)) {
        Err(OpenVolumeError::Snapshot(p)) => assert_eq!(p, snap),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a snapshot opened for writing"),
    }
    assert!(matches!(
        snapshot::local_dir("s3://bucket/prefix"),
        Err(SnapshotError::NotSupported)
    ));
    let listed = snapshot::list(&vol).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "ro");
    let clone: PathBuf = tmp.path().join("c");
    std::fs::create_dir(&clone).unwrap();
    std::fs::write(clone.join("x"), b"x").unwrap();
    assert!(matches!(
        snapshot::clone_from(&snap, &clone),
        Err(SnapshotError::DestinationExists(_))
    ));
    s.close().unwrap();
}

#[test]
fn space_comes_back_while_the_volume_stays_open() {
    let (_tmp, vol, s) = scratch_golden();
    s.take_snapshot("s").unwrap();
    commit(&s, vec![write_op(100, 0, &vec![9u8; 512 * KIB as usize])]);
    s.reclaimed();
    assert_eq!(segment_blocks(&vol), 2 * MIB, "half of file 100 deferred");
    snapshot::delete(&vol, "s").unwrap();
    // The checkpoint task's pass finds the segment unshared and punches
    // what it deferred, with no reopen.
    let back = pohmelfs_testkit::wait_until(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(50),
        || segment_blocks(&vol) == MIB + 512 * KIB,
    );
    assert!(back.is_some(), "{} bytes still held", segment_blocks(&vol));
    assert_eq!(read(&s, 100, MIB - 2, 2), [1, 1]);
    s.close().unwrap();
    drop(s);
    assert_clean("source", &vol);
}

#[test]
fn a_clone_keeps_what_it_acknowledged_across_a_crash_before_its_first_checkpoint() {
    // The clone's engine says which log records it holds (the source's
    // last lsn); its own new log must number its records above that, or
    // the replay after a crash skips them as held.
    let (tmp, _vol, s) = scratch_golden();
    let snap = s.take_snapshot("s1").unwrap();
    s.close().unwrap();
    drop(s);
    let clone = tmp.path().join("clone");
    snapshot::clone_from(&snap, &clone).unwrap();
    let c = open(&clone);
    commit(&c, vec![file(102, 5), write_op(102, 0, b"fresh")]);
    c.crash();
    let c = open(&clone);
    assert_eq!(read(&c, 102, 0, 5), b"fresh");
    assert_eq!(read(&c, 100, 0, 4)[..], [1u8; 4]);
}

#[test]
fn snapshot_commands_on_one_volume_run_one_at_a_time() {
    let (tmp, vol, s) = scratch_golden();
    let snap = s.take_snapshot("a").unwrap();
    let sdir = vol.join(snapshot::SNAPSHOTS_DIR);
    let now = std::time::Duration::ZERO;
    // A clone under way holds the lock shared: another clone goes beside
    // it, a create or delete does not.
    let cloning = snapshot::serial(&sdir, false, now).unwrap();
    snapshot::clone_from(&snap, &tmp.path().join("c1")).unwrap();
    assert!(matches!(
        snapshot::serial(&sdir, true, now),
        Err(SnapshotError::Busy(_))
    ));
    // What a crashed create left stays while a command runs.
    std::fs::create_dir(sdir.join(".tmp-b")).unwrap();
    snapshot::remove_leftovers(&vol).unwrap();
    assert!(sdir.join(".tmp-b").is_dir());
    drop(cloning);
    snapshot::remove_leftovers(&vol).unwrap();
    assert!(!sdir.join(".tmp-b").exists());
    // A create holds it alone.
    let creating = snapshot::serial(&sdir, true, now).unwrap();
    assert!(matches!(
        snapshot::serial(&sdir, false, now),
        Err(SnapshotError::Busy(_))
    ));
    drop(creating);
    snapshot::delete(&vol, "a").unwrap();
    assert!(snapshot::list(&vol).unwrap().is_empty());
    s.close().unwrap();
    drop(s);
    assert_clean("the clone", &tmp.path().join("c1"));
}
