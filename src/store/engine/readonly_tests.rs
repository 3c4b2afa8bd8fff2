//! Tests of a volume opened read-only (`readonly.rs`): a snapshot serves
//! its point in time while the source volume goes on changing (and
//! reclaiming), a live volume is served as of the open without fencing
//! its writer (and what the writer reclaims under it reads as an error,
//! not zeros), every write is refused, and nothing in the volume's
//! directory changes, not even an older format's superblock.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::conformance::{commit, read, write_op};
use super::reader::OpenReaderError;
use super::scan::VolumeScan;
use super::segment::SegmentFiles;
use super::segment_tests::{file, root_with};
use super::snapshot::SnapshotError;
use super::{codec, keys, log, FORMAT_VERSION};
use super::{snapshot, OpenMode, OpenVolumeError, ReadOnlyVolume, SlateStore, VolumeReader};
use crate::store::{Dirent, FileKind, Op, Store, StoreError, Txn, ROOT_INO};

const KIB: usize = 1024;

/// Every file under `dir`: size, mtime and contents (not its link count,
/// which falls when the source deletes its own link).
fn listing(dir: &Path) -> BTreeMap<String, (u64, i64, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let bytes = if m.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                todo.push(path.clone());
                Vec::new()
            };
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            out.insert(name, (m.len(), m.mtime(), m.mtime_nsec(), bytes));
        }
    }
    out
}

fn second_file() -> Vec<Op> {
    vec![
        file(101, 4096),
        write_op(101, 0, &[9u8; 4096]),
        Op::PutDirent {
            parent: ROOT_INO,
            dirent: Dirent {
                name: b"g".to_vec(),
                ino: 101,
                kind: FileKind::Regular,
                cookie: 200,
            },
        },
    ]
}

/// A scratch directory holding volume `vol` at `file://VOL{query}`, open,
/// with ids reserved and a root directory naming `children` (`f0`, ...).
fn scratch_volume(
    query: &str,
    children: &[u64],
) -> (tempfile::TempDir, PathBuf, String, SlateStore) {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol");
    let url = format!("file://{}{query}", vol.display());
    let s = SlateStore::open(&url).unwrap();
    s.reserve_ids(1000).unwrap();
    commit(&s, root_with(children));
    (dir, vol, url, s)
}

fn refuses_writes(v: &ReadOnlyVolume) {
    let r = v.commit(Txn {
        ops: vec![write_op(100, 0, b"x")],
    });
    assert!(matches!(r, Err(StoreError::ReadOnly)), "{r:?}");
    assert!(matches!(v.reserve_ids(1), Err(StoreError::ReadOnly)));
    v.sync(None).unwrap();
}

#[test]
fn a_snapshot_serves_its_point_in_time_while_the_source_changes() {
    let (_dir, vol, url, s) = scratch_volume("", &[100]);
    commit(
        &s,
        vec![file(100, 256 * 1024), write_op(100, 0, &[1u8; 256 * KIB])],
    );
    commit(
        &s,
        vec![Op::SetXattr {
            ino: 100,
            name: b"user.k".to_vec(),
            value: b"v".to_vec(),
        }],
    );
    s.take_snapshot("monday").unwrap();
    let snap = vol.join("snapshots/monday");
    let before = listing(&snap);

    // Served by both names, while the source overwrites, grows, and
    // drops its xattr.
    commit(&s, vec![write_op(100, 0, &[2u8; 256 * KIB])]);
    commit(&s, second_file());
    commit(
        &s,
        vec![Op::RemoveXattr {
            ino: 100,
            name: b"user.k".to_vec(),
        }],
    );
    for url in [
        format!("{url}@monday"),
        format!("file://{}", snap.display()),
    ] {
        let v = ReadOnlyVolume::open(&url).unwrap();
        assert_eq!(read(&v, 100, 0, 256 * KIB), vec![1u8; 256 * KIB], "{url}");
        assert_eq!(v.get_xattr(100, b"user.k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(v.list_xattr(100).unwrap(), [b"user.k".to_vec()]);
        assert_eq!(v.lookup(ROOT_INO, b"g").unwrap(), None);
        let names: Vec<_> = v.readdir(ROOT_INO, 0, 100).unwrap();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(v.get_inode(100).unwrap().map(|i| i.size), Some(256 * 1024));
        assert_eq!(v.next_data(100, 0).unwrap(), Some(0));
        assert_eq!(v.next_hole(100, 0).unwrap(), 256 * 1024);
        assert!(v.identity().unwrap().holder.is_none());
        refuses_writes(&v);
    }

    // The source deletes the file and reclaims what it freed: the
    // snapshot's links keep its pages.
    let v = ReadOnlyVolume::open(&format!("{url}@monday")).unwrap();
    commit(
        &s,
        vec![
            Op::RemoveDirent {
                parent: ROOT_INO,
                name: b"f0".to_vec(),
            },
            Op::RemoveInode { ino: 100 },
        ],
    );
    s.reclaimed();
    assert_eq!(read(&v, 100, 0, 256 * KIB), vec![1u8; 256 * KIB]);
    drop(v);
    assert_eq!(s.get_inode(100).unwrap(), None);
    assert!(
        s.renews_its_holder_record(),
        "the source's daemon was fenced"
    );
    assert!(
        listing(&snap) == before,
        "serving the snapshot changed its files"
    );
}

#[test]
fn a_live_volume_is_served_as_of_its_open_without_fencing_its_writer() {
    // No checkpoint on a timer: the commits stay in the commit log, and
    // the reader has to lay them over the engine's state.
    let (_dir, vol, url, s) = scratch_volume("?checkpoint_ms=0", &[100]);
    commit(&s, vec![file(100, 8192), write_op(100, 0, &[2u8; 8192])]);
    let holder = || {
        let text = std::fs::read_to_string(vol.join(super::holder::HOLDER)).unwrap();
        super::holder::Holder::parse(&text).unwrap()
    };
    let writer = holder();

    let v = ReadOnlyVolume::open(&url).unwrap();
    assert_eq!(read(&v, 100, 0, 8192), vec![2u8; 8192]);
    commit(&s, vec![write_op(100, 0, &[3u8; 8192])]);
    commit(&s, second_file());
    assert_eq!(read(&s, 100, 0, 8192), vec![3u8; 8192]);
    // As of the open.
    assert_eq!(read(&v, 100, 0, 8192), vec![2u8; 8192]);
    assert_eq!(v.lookup(ROOT_INO, b"g").unwrap(), None);
    refuses_writes(&v);
    drop(v);
    // Renewed by the writer all along, never replaced.
    assert!(holder().same_holder(&writer), "the reader took the record");
    assert!(s.renews_its_holder_record());
    commit(&s, vec![write_op(100, 0, &[4u8; 8192])]);
}

#[test]
fn a_snapshot_is_opened_for_writing_by_neither_name() {
    let (_dir, vol, url, s) = scratch_volume("", &[]);
    s.take_snapshot("monday").unwrap();
    s.close().unwrap();
    let snap = vol.join("snapshots/monday");
    for url in [
        format!("{url}@monday"),
        format!("file://{}", snap.display()),
    ] {
        let mode = OpenMode::Existing { take_over: false };
        match SlateStore::open_as(&url, mode) {
            Err(e @ OpenVolumeError::Snapshot(_)) => {
                assert!(e.to_string().contains("--readonly"), "{e}");
            }
            Err(e) => panic!("{url}: {e}"),
            Ok(_) => panic!("{url}: a snapshot opened for writing"),
        }
    }
    match ReadOnlyVolume::open(&format!("{url}@tuesday")) {
        Err(OpenReaderError::Snapshot(SnapshotError::NoSuchSnapshot(name))) => {
            assert_eq!(name, "tuesday");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened snapshot tuesday, which there is none of"),
    }
}

#[test]
fn snapshot_urls_resolve_to_their_directories() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::create_dir_all(dir.path().join("vol/snapshots/mon")).unwrap();
    assert_eq!(
        snapshot::resolve_url(&format!("file://{d}/vol@mon?memory=8M")).unwrap(),
        format!("file://{d}/vol/snapshots/mon?memory=8M")
    );
    let plain = format!("file://{d}/vol");
    assert_eq!(snapshot::resolve_url(&plain).unwrap(), plain);
    assert_eq!(
        snapshot::resolve_url("s3://b/p@x?region=r").unwrap(),
        "s3://b/p/snapshots/x?region=r"
    );
    assert_eq!(snapshot::resolve_url("s3://b/p").unwrap(), "s3://b/p");
    // A directory named with an `@` is itself.
    std::fs::create_dir(dir.path().join("a@b")).unwrap();
    let literal = format!("file://{d}/a@b");
    assert_eq!(snapshot::resolve_url(&literal).unwrap(), literal);
    assert!(snapshot::resolve_url(&format!("file://{d}/vol@.hidden")).is_err());
}

#[test]
fn a_page_the_writer_reclaimed_reads_as_an_error_never_as_zeros() {
    let (_dir, vol, url, s) = scratch_volume("", &[100]);
    commit(
        &s,
        vec![file(100, 256 * 1024), write_op(100, 0, &[5u8; 256 * KIB])],
    );
    s.reclaimed();
    let v = ReadOnlyVolume::open(&url).unwrap();
    assert_eq!(read(&v, 100, 0, 256 * KIB), vec![5u8; 256 * KIB]);
    let (seg, window) = {
        let checker = VolumeReader::open(&url).unwrap();
        let block = checker.scan_blocks().unwrap().next().unwrap().unwrap();
        block.extents[0].seg_window().unwrap()
    };

    // The writer overwrites the file and punches the pages it freed.
    commit(&s, vec![write_op(100, 0, &[6u8; 256 * KIB])]);
    s.reclaimed();
    let held = SegmentFiles::of_volume(&vol).allocated(seg).unwrap();
    assert!(
        !held
            .iter()
            .any(|r| r.start < window.end && window.start < r.end),
        "the old pages were not punched: {held:?} against {window:?}"
    );
    let mut buf = vec![0xAAu8; 64 * KIB];
    match v.read(100, 0, &mut buf) {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("checksum"), "{m}"),
        other => panic!("read of a punched page: {other:?}, first byte {}", buf[0]),
    }
}

#[test]
fn a_volume_of_an_older_format_is_served_as_it_is_and_not_upgraded() {
    for version in [2, 3] {
        let (_dir, vol, url, s) = scratch_volume("", &[100]);
        commit(&s, vec![file(100, 8192), write_op(100, 0, &[7u8; 8192])]);
        let mut sb = s.superblock.clone();
        sb.format_version = version;
        s.raw_put(&keys::superblock(), &codec::encode_superblock(&sb));
        s.close().unwrap();
        if version == 2 {
            // Version 2 had no commit log; the close checkpointed this one.
            std::fs::remove_dir_all(vol.join(log::DIR_NAME)).unwrap();
        }
        let before = listing(&vol);

        let v = ReadOnlyVolume::open(&url).unwrap();
        let id = v.identity().unwrap();
        assert_eq!(id.format_version, version);
        assert_eq!(id.epoch, sb.open_count, "the open was counted");
        assert_eq!(read(&v, 100, 0, 8192), vec![7u8; 8192]);
        refuses_writes(&v);
        drop(v);
        assert!(
            listing(&vol) == before,
            "a read-only open of format {version} changed the volume's files"
        );

        // The first writing open upgrades it, and keeps its files.
        let s = SlateStore::open(&url).unwrap();
        assert_eq!(s.identity().format_version, FORMAT_VERSION);
        assert_eq!(read(&s, 100, 0, 8192), vec![7u8; 8192]);
        s.close().unwrap();
        let v = ReadOnlyVolume::open(&url).unwrap();
        assert_eq!(v.identity().unwrap().format_version, FORMAT_VERSION);
        assert_eq!(read(&v, 100, 0, 8192), vec![7u8; 8192]);
    }
}
