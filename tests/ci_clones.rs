//! The CI recipe's space promise, on the host without guests: a golden
//! volume and its snapshot, then 100 jobs that each clone the snapshot,
//! open the clone as a daemon would, overwrite a shared file, delete
//! another, write a new one, close it, and delete the clone. Afterwards the
//! golden volume's `statfs`, its `pohmelfs check` report (shared-segment
//! notes included), the allocated blocks of everything left on disk and
//! every byte of the golden and snapshot files are what they were before
//! the first job.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use pohmelfs::store::engine::{snapshot, ReadOnlyVolume, SlateStore};
use pohmelfs::store::{Dirent, FileKind, Inode, Op, Store, StoreStats, Txn, ROOT_INO};
use pohmelfs_testkit::ScratchDir;

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const JOBS: u32 = 100;
/// The golden volume's files (inodes 100..): bytes each.
const GOLDEN_FILES: u64 = 4;
const FILE_BYTES: usize = 512 << 10;
/// A job's own new file: bytes.
const NEW_FILE_BYTES: usize = 256 << 10;

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn entry(name: &str, ino: u64) -> Op {
    Op::PutDirent {
        parent: ROOT_INO,
        dirent: Dirent {
            name: name.as_bytes().to_vec(),
            ino,
            kind: FileKind::Regular,
            cookie: ino,
        },
    }
}

/// File `name` (inode `ino`) holding `len` bytes of `byte`.
fn file_ops(name: &str, ino: u64, byte: u8, len: usize) -> Vec<Op> {
    vec![
        Op::PutInode(Inode::regular(ino, len as u64)),
        entry(name, ino),
        Op::Write {
            ino,
            offset: 0,
            data: vec![byte; len].into(),
        },
    ]
}

/// The golden volume: a root and [`GOLDEN_FILES`] files, one transaction each.
fn fill_golden(s: &SlateStore) {
    let mut root = Inode::regular(ROOT_INO, 0);
    root.kind = FileKind::Directory;
    root.nlink = 2;
    root.parent = ROOT_INO;
    s.reserve_ids(10_000).unwrap();
    s.commit(Txn {
        ops: vec![Op::PutInode(root)],
    })
    .unwrap();
    for i in 0..GOLDEN_FILES {
        let ops = file_ops(&format!("f{i}"), 100 + i, b'a' + i as u8, FILE_BYTES);
        s.commit(Txn { ops }).unwrap();
    }
    s.sync(None).unwrap();
}

/// One job's writes in its clone: overwrite half of the shared `f0`,
/// delete `f1` (its pages are the golden's too), write a new file.
fn job_writes(s: &SlateStore, job: u32) {
    s.commit(Txn {
        ops: vec![Op::Write {
            ino: 100,
            offset: 0,
            data: vec![b'z'; FILE_BYTES / 2].into(),
        }],
    })
    .unwrap();
    s.commit(Txn {
        ops: vec![
            Op::RemoveDirent {
                parent: ROOT_INO,
                name: b"f1".to_vec(),
            },
            Op::RemoveInode { ino: 101 },
        ],
    })
    .unwrap();
    let ops = file_ops(
        &format!("job-{job}"),
        5000 + u64::from(job),
        7,
        NEW_FILE_BYTES,
    );
    s.commit(Txn { ops }).unwrap();
    s.sync(None).unwrap();
}

/// What the golden volume's space looks like from outside.
#[derive(Debug, PartialEq)]
struct Space {
    statfs: (u64, u64, u64, u64),
    /// `pohmelfs check`'s findings and summary (its timing line left out).
    check: Vec<String>,
    /// Allocated bytes of every file below the scratch directory, each
    /// inode counted once.
    allocated_bytes: u64,
}

fn space(golden: &Path, root: &Path) -> Space {
    let StoreStats {
        capacity_bytes,
        used_bytes,
        capacity_inodes,
        used_inodes,
    } = ReadOnlyVolume::open(&url(golden))
        .unwrap()
        .statfs()
        .unwrap();
    let out = Command::new(POHMELFS)
        .args(["check", "--store", &url(golden)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "check: {text}");
    assert!(text.contains(" 0 problems, 0 warnings"), "{text}");
    let check = text
        .lines()
        .filter(|l| !l.starts_with("check: read "))
        .map(str::to_owned)
        .collect();
    Space {
        statfs: (capacity_bytes, used_bytes, capacity_inodes, used_inodes),
        check,
        allocated_bytes: allocated(root),
    }
}

fn walk(dir: &Path, each: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let m = std::fs::symlink_metadata(&path).unwrap();
        if m.is_dir() {
            walk(&path, each);
        } else {
            each(&path, &m);
        }
    }
}

fn allocated(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut bytes = 0;
    walk(dir, &mut |_, m| {
        if seen.insert((m.dev(), m.ino())) {
            bytes += m.blocks() * 512;
        }
    });
    bytes
}

fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    walk(dir, &mut |path, _| {
        out.insert(path.to_owned(), std::fs::read(path).unwrap());
    });
    out
}

#[test]
fn a_hundred_ci_jobs_give_the_golden_volume_its_space_back() {
    let scratch = ScratchDir::new("it-ci-clones").unwrap();
    let golden = scratch.join("golden");
    let out = Command::new(POHMELFS)
        .args(["format", &url(&golden)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = SlateStore::open(&url(&golden)).unwrap();
    fill_golden(&s);
    s.take_snapshot("base").unwrap();
    s.close().unwrap();
    drop(s);
    let snap = snapshot::snapshot_dir(&golden, "base").unwrap();
    let jobs = scratch.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();

    let before = space(&golden, scratch.path());
    let bytes_before = contents(&golden);
    let (_, used_before, _, inodes_before) = before.statfs;
    assert!(
        before.check.iter().any(|l| l.contains("is shared")),
        "the golden volume shares its segments with its snapshot: {:?}",
        before.check
    );
    for job in 1..=JOBS {
        let clone = jobs.join(format!("job-{job}"));
        snapshot::clone_from(&snap, &clone).unwrap();
        let c = SlateStore::open(&format!("{}?log_size=64K", url(&clone))).unwrap();
        job_writes(&c, job);
        let stats = c.statfs().unwrap();
        assert_eq!(
            stats.used_inodes, inodes_before,
            "job {job}: one file less, one more"
        );
        assert_eq!(
            stats.used_bytes,
            used_before - FILE_BYTES as u64 + NEW_FILE_BYTES as u64,
            "job {job}: f1 deleted, its own file written"
        );
        c.close().unwrap();
        drop(c);
        std::fs::remove_dir_all(&clone).unwrap();
    }
    let after = space(&golden, scratch.path());
    assert_eq!(after, before, "the golden volume's space after {JOBS} jobs");
    assert!(
        contents(&golden) == bytes_before,
        "the golden volume's files changed under its clones"
    );
}
