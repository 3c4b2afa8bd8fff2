//! Tests of file data in segments: overwrites against a model, no
//! read-modify-write, crash consistency, what the checker finds, hole
//! punching, and the inline placement `s3://` uses.

use std::path::PathBuf;

use super::conformance::{self, commit, read, write_op};
use super::segment::SegmentFiles;
use super::{codec, keys, OpenVolumeError, Placement, SlateStore, VolumeReader};
use crate::check::torture::rng::Rng;
use crate::check::volume::{check_volume, Problem, Report, Warning};
use crate::store::mem::MemStore;
use crate::store::{FileKind, Inode, Op, Store, StoreError, Txn};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn url(dir: &tempfile::TempDir) -> String {
    format!("file://{}/vol", dir.path().display())
}

fn vol_dir(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vol")
}

pub(super) fn files(dir: &tempfile::TempDir) -> SegmentFiles {
    SegmentFiles::of_volume(&vol_dir(dir))
}

/// Bytes in segment files, by length.
fn segment_len(dir: &tempfile::TempDir) -> u64 {
    files(dir).list().unwrap().iter().map(|(_, len)| len).sum()
}

/// Bytes of segment `seg` the filesystem holds (not holes).
pub(super) fn allocated(dir: &tempfile::TempDir, seg: u64) -> u64 {
    files(dir)
        .allocated(seg)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum()
}

pub(super) fn check(dir: &tempfile::TempDir) -> Report {
    let reader = VolumeReader::open(&url(dir)).unwrap();
    check_volume(&reader).unwrap()
}

/// `pohmelfs check` of the volume in `dir` finds nothing: no problem,
/// no warning (leaked space is one).
pub(super) fn assert_checks_clean(dir: &tempfile::TempDir) {
    let report = check(dir);
    assert!(
        report.is_clean() && report.warnings.is_empty(),
        "{report:#?}"
    );
}

/// A volume whose ids are reserved past every number the tests use.
fn volume(dir: &tempfile::TempDir, placement: Placement) -> SlateStore {
    let s = SlateStore::open_for_test(&url(dir), placement);
    s.reserve_ids(1000).unwrap();
    s
}

pub(super) fn file(ino: u64, size: u64) -> Op {
    Op::PutInode(Inode::regular(ino, size))
}

/// A root directory holding files `inos`, so the checker finds them
/// reachable.
pub(super) fn root_with(inos: &[u64]) -> Vec<Op> {
    let mut root = Inode::regular(crate::store::ROOT_INO, 0);
    root.kind = FileKind::Directory;
    root.nlink = 2;
    root.parent = crate::store::ROOT_INO;
    let mut ops = vec![Op::PutInode(root)];
    for (i, &ino) in inos.iter().enumerate() {
        ops.push(Op::PutDirent {
            parent: crate::store::ROOT_INO,
            dirent: crate::store::Dirent {
                name: format!("f{i}").into_bytes(),
                ino,
                kind: FileKind::Regular,
                cookie: 100 + i as u64,
            },
        });
    }
    ops
}

/// Random overwrites, punches and truncates of one file, each checked
/// against a model; then reopen, and the checker finds the volume clean
/// with no leaked space (every dead page was punched).
fn overwrites_match_a_model(placement: Placement, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, placement);
    let ino = 50;
    let mut ops = root_with(&[ino]);
    ops.push(file(ino, 0));
    commit(&s, ops);
    let mut model: Vec<u8> = Vec::new();
    let mut r = Rng::new(seed);
    for step in 0..300 {
        let offset = if r.percent(70) {
            r.below(256) * 4 * KIB
        } else {
            r.below(MIB)
        };
        let op = match r.below(10) {
            0 => {
                let size = r.below(MIB + 5);
                model.resize(size as usize, 0);
                Op::Truncate { ino, size }
            }
            1 => {
                let len = r.below(200 * KIB) + 1;
                let end = ((offset + len) as usize).min(model.len());
                if (offset as usize) < end {
                    model[offset as usize..end].fill(0);
                }
                Op::PunchHole { ino, offset, len }
            }
            _ => {
                let len = if r.percent(70) {
                    4 * KIB
                } else {
                    r.below(100 * KIB) + 1
                };
                let mut data = vec![0u8; len as usize];
                r.fill(&mut data);
                let end = (offset + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
                write_op(ino, offset, &data)
            }
        };
        commit(&s, vec![op, file(ino, model.len() as u64)]);
        if step % 25 == 0 {
            assert_eq!(read(&s, ino, 0, model.len()), model, "step {step}");
        }
    }
    assert_eq!(read(&s, ino, 0, model.len() + 10)[..model.len()], model);
    s.close().unwrap();
    drop(s);
    let report = check(&dir);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
    let s = SlateStore::open_for_test(&url(&dir), placement);
    assert_eq!(read(&s, ino, 0, model.len()), model);
}

#[test]
fn random_overwrites_in_segments_read_back_like_a_model() {
    overwrites_match_a_model(Placement::Default, 11);
    // Small segments: writes seal them often, overwrites empty them.
    overwrites_match_a_model(Placement::SegmentsOf(256 * KIB), 12);
}

#[test]
fn random_overwrites_inline_read_back_like_a_model() {
    overwrites_match_a_model(Placement::Inline, 13);
}

#[test]
fn inline_placement_keeps_the_store_contract_and_agrees_with_mem() {
    let dir = tempfile::tempdir().unwrap();
    let s = SlateStore::open_for_test(&url(&dir), Placement::Inline);
    conformance::contract(&s);
    conformance::once_contract(&s);
    let dir = tempfile::tempdir().unwrap();
    let s = SlateStore::open_for_test(&url(&dir), Placement::Inline);
    conformance::differential(&MemStore::new(1 << 30), &s, 0x5EED, 100);
    // No byte went to a segment.
    assert_eq!(segment_len(&dir), 0);
}

#[test]
fn a_4k_overwrite_of_a_1m_extent_appends_4k() {
    let dir = tempfile::tempdir().unwrap();
    // No timed checkpoint: one would sync the segment too (it ran between
    // the commits when the machine was loaded).
    let s = conformance::temp_volume(&dir, super::recover_tests::NO_CHECKPOINTS);
    let big: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    commit(&s, vec![write_op(60, 0, &big)]);
    let before = segment_len(&dir);
    assert_eq!(before, MIB);
    commit(&s, vec![write_op(60, 256 * KIB, &[9u8; 4096])]);
    assert_eq!(segment_len(&dir) - before, 4 * KIB);
    // An unaligned small write costs its bytes and part of one page.
    let before = segment_len(&dir);
    commit(&s, vec![write_op(60, 5000, b"tiny")]);
    assert!(segment_len(&dir) - before < 4 * KIB + 4);
    let mut want = big;
    want[256 * KIB as usize..256 * KIB as usize + 4096].fill(9);
    want[5000..5004].copy_from_slice(b"tiny");
    assert_eq!(read(&s, 60, 0, MIB as usize), want);
    // The 1 MiB commit made its bytes durable in its segment; the small
    // ones carried theirs in their commit-log records.
    assert_eq!(s.segment_syncs(), 1);
}

#[test]
fn segment_bytes_without_a_batch_are_leaked_space_and_invisible() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, Placement::Default);
    commit(&s, root_with(&[70]));
    commit(&s, vec![file(70, 8192), write_op(70, 0, &[1u8; 8192])]);
    // A commit's first step, its bytes appended and durable; then the
    // daemon dies before the batch that refers to them is written.
    let segs = s.segments();
    let p = segs.append(0, &[&[0x55u8; 4096]]).unwrap();
    segs.sync_to(p.seg, p.seg_off + p.len).unwrap();
    s.crash();
    let report = check(&dir);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(
        report.warnings,
        vec![Warning::LeakedSpace {
            seg: p.seg,
            bytes: 4096
        }]
    );
    assert!(report.lines().iter().any(|l| l.contains("leaked space")));
    let s = conformance::temp_volume(&dir, "");
    assert_eq!(read(&s, 70, 0, 8192), vec![1u8; 8192]);
}

#[test]
fn a_refused_commit_gives_its_segment_bytes_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = SlateStore::open(&format!("{}?capacity=128K", url(&dir))).unwrap();
    s.reserve_ids(1000).unwrap();
    commit(&s, root_with(&[80]));
    commit(&s, vec![file(80, 100), write_op(80, 0, &[3u8; 100])]);
    let t = Txn {
        ops: vec![
            write_op(80, 0, &[1u8; 3 * 64 * 1024]),
            file(80, 3 * 64 * 1024),
        ],
    };
    assert!(matches!(s.commit(t), Err(StoreError::NoSpace)));
    assert_eq!(read(&s, 80, 0, 100), vec![3u8; 100]);
    s.close().unwrap();
    drop(s);
    let report = check(&dir);
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}

#[test]
fn check_finds_corrupt_short_and_miscounted_segments() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, Placement::Default);
    commit(&s, root_with(&[90, 91]));
    commit(
        &s,
        vec![
            file(90, 3 * 4096),
            write_op(90, 0, &[7u8; 3 * 4096]),
            file(91, 4096),
            write_op(91, 0, &[8u8; 4096]),
        ],
    );
    s.close().unwrap();
    drop(s);
    assert!(check(&dir).is_clean());
    let (seg, len) = files(&dir).list().unwrap()[0];
    assert_eq!(len, 4 * 4096);
    let path = vol_dir(&dir)
        .join("segments")
        .join(super::segment::file_name(seg));
    // Flip one byte of file 90's second page.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 17] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let report = check(&dir);
    assert_eq!(
        report.problems,
        vec![Problem::ExtentChecksum {
            ino: 90,
            index: 0,
            seg,
            offset: 4096
        }]
    );
    // Cut file 91's page off the end.
    std::fs::write(&path, &bytes[..3 * 4096]).unwrap();
    let report = check(&dir);
    assert!(report.problems.contains(&Problem::ExtentPastSegment {
        ino: 91,
        index: 0,
        seg,
        end: 4 * 4096,
        seg_len: 3 * 4096,
    }));
    // A segment record that miscounts its live bytes.
    std::fs::write(&path, &bytes).unwrap();
    let s = conformance::temp_volume(&dir, "");
    s.raw_put(&keys::segment(seg), &codec::encode_segment(5));
    s.close().unwrap();
    drop(s);
    let report = check(&dir);
    assert!(report.problems.contains(&Problem::SegmentLive {
        seg,
        counted: 5,
        found: 4 * 4096,
    }));
}

#[test]
fn dead_pages_are_punched_and_empty_segments_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, Placement::SegmentsOf(MIB));
    commit(&s, root_with(&[100]));
    commit(
        &s,
        vec![file(100, MIB), write_op(100, 0, &vec![1u8; MIB as usize])],
    );
    let first = files(&dir).list().unwrap()[0].0;
    assert_eq!(allocated(&dir, first), MIB);
    // The overwrite goes to a new segment; the old pages under it die.
    commit(
        &s,
        vec![write_op(100, 256 * KIB, &vec![2u8; 256 * KIB as usize])],
    );
    s.reclaimed();
    let segs = files(&dir).list().unwrap();
    assert_eq!(segs.len(), 2);
    assert_eq!(allocated(&dir, first), 768 * KIB);
    let second = segs[1].0;
    assert_eq!(allocated(&dir, second), 256 * KIB);
    // Truncating frees the tail; removing the file empties both segments:
    // the sealed one is deleted, the active one punched to nothing.
    commit(
        &s,
        vec![
            Op::Truncate {
                ino: 100,
                size: 300 * KIB,
            },
            file(100, 300 * KIB),
        ],
    );
    s.reclaimed();
    assert_eq!(allocated(&dir, first), 256 * KIB);
    assert_eq!(allocated(&dir, second), 44 * KIB);
    commit(&s, vec![Op::RemoveInode { ino: 100 }]);
    s.reclaimed();
    let segs = files(&dir).list().unwrap();
    assert_eq!(
        segs.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![second]
    );
    assert_eq!(allocated(&dir, second), 0);
    s.close().unwrap();
    drop(s);
    let report = check(&dir);
    // The root's entry names the removed file: only that is wrong.
    assert!(report
        .problems
        .iter()
        .all(|p| matches!(p, Problem::DanglingEntry { ino: 100, .. })));
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}

/// Write format `version` into the superblock of the volume in `dir`.
fn set_format_version(dir: &tempfile::TempDir, version: u32) {
    let s = SlateStore::open(&url(dir)).unwrap();
    let mut sb = s.superblock.clone();
    sb.format_version = version;
    s.raw_put(&keys::superblock(), &codec::encode_superblock(&sb));
    s.close().unwrap();
}

#[test]
fn a_volume_of_another_format_is_refused_naming_both_versions() {
    // Version 1 (before segments) and one newer than this build knows.
    for version in [1, super::FORMAT_VERSION + 1] {
        let dir = tempfile::tempdir().unwrap();
        conformance::temp_volume(&dir, "").close().unwrap();
        set_format_version(&dir, version);
        for _ in 0..2 {
            // Refused again the second time: nothing was rewritten.
            match SlateStore::open(&url(&dir)) {
                Err(e @ OpenVolumeError::FormatVersion { found, expected: 4 }) => {
                    assert_eq!(found, version);
                    assert_eq!(
                        e.to_string(),
                        format!("volume has format version {version}; this build reads version 4")
                    );
                }
                Err(e) => panic!("unexpected error: {e}"),
                Ok(_) => panic!("opened a volume of format {version}"),
            }
        }
        // The checker reads it anyway and says why it is not served.
        let report = check(&dir);
        let p = &report.problems[0];
        assert!(
            matches!(p, Problem::FormatVersion(v) if *v == version),
            "{p:?}"
        );
        assert_eq!(
            p.to_string(),
            format!("superblock has format version {version}; this build reads version 4")
        );
    }
}

#[test]
fn volumes_of_formats_2_and_3_are_upgraded_in_place_keeping_their_files() {
    for version in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = conformance::temp_volume(&dir, "");
            commit(&s, root_with(&[110]));
            commit(&s, vec![file(110, 0), write_op(110, 0, b"kept")]);
            s.close().unwrap();
        }
        set_format_version(&dir, version);
        // Read-only opens leave it as it is: `readonly_tests.rs`.
        let s = SlateStore::open(&url(&dir)).unwrap();
        assert_eq!(s.superblock.format_version, super::FORMAT_VERSION);
        assert_eq!(read(&s, 110, 0, 4), b"kept");
        s.close().unwrap();
        let s = SlateStore::open(&url(&dir)).unwrap();
        assert_eq!(s.superblock.format_version, super::FORMAT_VERSION);
        s.close().unwrap();
        let report = check(&dir);
        assert!(
            !report
                .problems
                .iter()
                .any(|p| matches!(p, Problem::FormatVersion(_))),
            "{:#?}",
            report.problems
        );
    }
}

#[test]
fn a_fragmented_chunk_is_rewritten_as_one_extent() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, Placement::Default);
    commit(&s, root_with(&[110]));
    commit(&s, vec![file(110, 64 * KIB)]);
    let mut want = vec![0u8; 64 * KIB as usize];
    for i in 0..(super::extent::MAX_EXTENTS as u64 + 8) {
        let at = i * 1000 + 7;
        commit(&s, vec![write_op(110, at, &[i as u8 + 1])]);
        want[at as usize] = i as u8 + 1;
        let record = s.raw_get_for_test(&keys::block(110, 0));
        let extents = super::extent::decode(&record).unwrap();
        assert!(
            extents.len() <= super::extent::MAX_EXTENTS,
            "{}",
            extents.len()
        );
    }
    assert_eq!(read(&s, 110, 0, want.len()), want);
    s.close().unwrap();
    drop(s);
    let report = check(&dir);
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}

#[test]
fn metadata_is_charged_against_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let s = SlateStore::open(&format!("{}?capacity=64K", url(&dir))).unwrap();
    let full = s.statfs().unwrap().capacity_bytes;
    assert_eq!(full, 64 * KIB);
    let xattr = |ino: u64, n: usize| Op::SetXattr {
        ino,
        name: b"user.big".to_vec(),
        value: vec![1u8; n],
    };
    commit(&s, vec![file(5, 0), xattr(5, 1000)]);
    let inode_bytes = keys::inode(5).len() + codec::encode_inode(&Inode::regular(5, 0)).len();
    let xattr_bytes = keys::xattr(5, b"user.big").len() + codec::encode_bytes(&[1u8; 1000]).len();
    let left = s.statfs().unwrap().capacity_bytes;
    assert_eq!(full - left, (inode_bytes + xattr_bytes) as u64);
    // Xattrs fill the volume: the one that does not fit is refused whole.
    let mut ino = 6;
    let refused = loop {
        match s.commit(Txn {
            ops: vec![file(ino, 0), xattr(ino, 8000)],
        }) {
            Ok(()) => ino += 1,
            Err(e) => break e,
        }
        assert!(ino < 20, "64 KiB took {} xattrs of 8000 bytes", ino - 6);
    };
    assert!(matches!(refused, StoreError::NoSpace), "{refused:?}");
    assert_eq!(s.get_inode(ino).unwrap(), None);
    assert!(s.statfs().unwrap().capacity_bytes < 8000);
    // Removing one gives its bytes back, exactly.
    let before = s.statfs().unwrap().capacity_bytes;
    commit(&s, vec![Op::RemoveInode { ino: 6 }]);
    let xattr_bytes = keys::xattr(6, b"user.big").len() + codec::encode_bytes(&[1u8; 8000]).len();
    assert_eq!(
        s.statfs().unwrap().capacity_bytes - before,
        (inode_bytes + xattr_bytes) as u64
    );
    commit(&s, vec![file(ino, 0), xattr(ino, 8000)]);
}

/// Entries and symlink targets count too (issue 13 point 5: capacity
/// counts every record a guest can make), and the orphan mark does not
/// leak: removing the orphan gives back every byte its records held.
#[test]
fn entries_symlinks_and_orphans_are_charged_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let s = SlateStore::open(&format!("{}?capacity=1M", url(&dir))).unwrap();
    let free = || s.statfs().unwrap().capacity_bytes;
    let start = free();
    let name = b"a-long-entry-name".to_vec();
    let dirent = crate::store::Dirent {
        name: name.clone(),
        ino: 5,
        kind: FileKind::Symlink,
        cookie: 9,
    };
    let mut link = Inode::regular(5, 6);
    link.kind = FileKind::Symlink;
    commit(
        &s,
        vec![
            Op::PutInode(link.clone()),
            Op::SetSymlink {
                ino: 5,
                target: b"target".to_vec(),
            },
            Op::PutDirent {
                parent: 1,
                dirent: dirent.clone(),
            },
        ],
    );
    let inode_bytes = keys::inode(5).len() + codec::encode_inode(&link).len();
    let symlink_bytes = keys::symlink(5).len() + codec::encode_bytes(b"target").len();
    let entry_bytes = keys::dirent_by_name(1, &name).len()
        + codec::encode_dirent_by_name(&dirent).len()
        + keys::dirent_by_cookie(1, 9).len()
        + codec::encode_dirent_by_cookie(&dirent).len();
    assert_eq!(
        start - free(),
        (inode_bytes + symlink_bytes + entry_bytes) as u64
    );
    // Unlinked while held: the entry's bytes come back, the inode stays.
    link.nlink = 0;
    commit(
        &s,
        vec![Op::RemoveDirent { parent: 1, name }, Op::PutInode(link)],
    );
    assert_eq!(start - free(), (inode_bytes + symlink_bytes) as u64);
    assert_eq!(s.reclaim_orphans().unwrap(), 1);
    assert_eq!(free(), start, "every byte given back");
    assert_eq!(s.reclaim_orphans().unwrap(), 0, "the mark went with it");
}

#[test]
fn opening_deletes_segments_nothing_refers_to() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, Placement::Default);
    commit(&s, root_with(&[]));
    // Bytes appended to a segment no batch ever named, then a crash.
    let segs = s.segments();
    let p = segs.append(0, &[&[0x55u8; 3000]]).unwrap();
    segs.sync_to(p.seg, p.seg_off + p.len).unwrap();
    s.crash();
    let report = check(&dir);
    assert_eq!(
        report.warnings,
        vec![Warning::LeakedSpace {
            seg: p.seg,
            bytes: 3000
        }]
    );
    let s = volume(&dir, Placement::Default);
    let ids: Vec<u64> = files(&dir).list().unwrap().iter().map(|f| f.0).collect();
    assert!(!ids.contains(&p.seg), "{ids:?}");
    s.close().unwrap();
    drop(s);
    assert_checks_clean(&dir);
}

#[test]
fn concurrent_appends_share_one_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, Placement::Default);
    let segs = s.segments();
    let a = segs.append(0, &[b"first"]).unwrap();
    let b = segs.append(0, &[b"second", b" in two slices"]).unwrap();
    // The second committer syncs first; its sync covers the first's bytes.
    segs.sync_to(b.seg, b.seg_off + b.len).unwrap();
    segs.sync_to(a.seg, a.seg_off + a.len).unwrap();
    assert_eq!(segs.syncs(), 1);
    let mut got = vec![0u8; b.len as usize];
    segs.read_at(b.seg, b.seg_off, &mut got).unwrap();
    assert_eq!(got, b"second in two slices");
    segs.unpin(a.seg);
    segs.unpin(b.seg);
}

#[test]
fn sequential_4k_writes_stay_one_extent_per_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let s = volume(&dir, Placement::Default);
    let mut want = Vec::new();
    for i in 0..20u64 {
        let page = vec![i as u8 + 1; 4096];
        commit(&s, vec![write_op(120, i * 4096, &page)]);
        want.extend_from_slice(&page);
    }
    for index in 0..2 {
        let record = s.raw_get_for_test(&keys::block(120, index));
        assert_eq!(
            super::extent::decode(&record).unwrap().len(),
            1,
            "chunk {index}"
        );
    }
    assert_eq!(read(&s, 120, 0, want.len()), want);
    assert_eq!(segment_len(&dir), 20 * 4096);
}

/// A read's file piece outlives a reclamation of the pages it names: the
/// reclaimer waits, on its own thread, for the read to leave; the read
/// never waits for it (and never punches).
#[test]
fn a_held_read_delays_the_punch_of_its_pages_not_itself() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(volume(&dir, Placement::SegmentsOf(MIB)));
    commit(&*s, root_with(&[100]));
    commit(
        &*s,
        vec![file(100, MIB), write_op(100, 0, &vec![1u8; MIB as usize])],
    );
    let first = files(&dir).list().unwrap()[0].0;
    let held = s.read_data(100, 0, 64 * KIB as usize).unwrap();
    assert!(held.has_file_pieces());
    // The overwrite kills the held pages; the reclaimer gets them and
    // waits for the held read.
    commit(&*s, vec![write_op(100, 0, &vec![2u8; 256 * KIB as usize])]);
    let before = s.readers.epoch();
    let reclaiming = {
        let s = s.clone();
        std::thread::spawn(move || s.reclaimed())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.readers.epoch() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no grace period began"
        );
        std::thread::yield_now();
    }
    // Reads go on meanwhile, in the new epoch.
    assert_eq!(read(&*s, 100, 0, 4096), vec![2u8; 4096]);
    assert_eq!(allocated(&dir, first), MIB, "punched under a held read");
    assert_eq!(held.to_vec().unwrap(), vec![1u8; 64 * KIB as usize]);
    drop(held);
    reclaiming.join().unwrap();
    assert_eq!(allocated(&dir, first), 768 * KIB);
}
