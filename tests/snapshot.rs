//! `pohmelfs snapshot` and `pohmelfs clone` as real processes: a snapshot
//! killed with SIGKILL half way leaves the volume usable and `check`
//! clean, a volume another process holds is refused rather than fenced,
//! and a snapshot taken through a daemon's control socket, while a writer
//! goes on, holds every commit acknowledged before it.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pohmelfs::store::engine::SlateStore;
use pohmelfs::store::{Dirent, FileKind, Inode, Op, Store, Txn, ROOT_INO};
use pohmelfs_testkit::{ChildGuard, ScratchDir, Steps};

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// A root directory with file `f` (ino 100) holding `len` bytes of `byte`.
fn fill(s: &SlateStore, byte: u8, len: usize) {
    let mut root = Inode::regular(ROOT_INO, 0);
    root.kind = FileKind::Directory;
    root.nlink = 2;
    root.parent = ROOT_INO;
    s.reserve_ids(1000).unwrap();
    let ops = vec![
        Op::PutInode(root),
        Op::PutInode(Inode::regular(100, len as u64)),
        Op::PutDirent {
            parent: ROOT_INO,
            dirent: Dirent {
                name: b"f".to_vec(),
                ino: 100,
                kind: FileKind::Regular,
                cookie: 100,
            },
        },
        Op::Write {
            ino: 100,
            offset: 0,
            data: vec![byte; len].into(),
        },
    ];
    s.commit(Txn { ops }).unwrap();
}

fn pohmelfs(args: &[&str]) -> std::process::Output {
    Command::new(POHMELFS).args(args).output().unwrap()
}

/// `pohmelfs check` of `dir`: clean, no warnings; its output.
fn check_clean(dir: &Path) -> String {
    let out = pohmelfs(&["check", "--store", &url(dir)]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "check {}: {text}", dir.display());
    assert!(text.contains(" 0 problems, 0 warnings"), "{text}");
    text
}

fn read_byte(s: &SlateStore, offset: u64) -> u8 {
    let mut b = [0u8; 1];
    s.read(100, offset, &mut b).unwrap();
    b[0]
}

#[test]
fn a_snapshot_killed_half_way_leaves_the_volume_usable_and_clean() {
    let scratch = ScratchDir::new("it-snapshot-kill9").unwrap();
    let vol = scratch.join("vol");
    let s = SlateStore::open(&url(&vol)).unwrap();
    fill(&s, 1, 1 << 20);
    s.close().unwrap();
    drop(s);

    let paused = scratch.join("paused");
    let log = scratch.join("snapshot.log");
    let mut child = ChildGuard(
        Command::new(POHMELFS)
            .args(["snapshot", "create", &url(&vol), "s1"])
            .env("POHMELFS_TEST_SNAPSHOT_PAUSE", &paused)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    child
        .wait_ready(
            "snapshot create",
            &log,
            Duration::from_secs(60),
            Duration::from_millis(20),
            || paused.exists().then_some(()),
        )
        .unwrap();
    // Everything is linked, not yet renamed into place: crash there.
    child.kill();
    assert!(vol.join("snapshots/.tmp-s1/segments").is_dir());
    let listed = pohmelfs(&["snapshot", "list", &url(&vol)]);
    assert!(listed.status.success());
    assert!(listed.stdout.is_empty(), "{listed:?}");

    // The next open removes the leftover; the volume writes on, and its
    // dead pages are punched (nothing shares them any more).
    let s = SlateStore::open(&url(&vol)).unwrap();
    assert!(!vol.join("snapshots/.tmp-s1").exists());
    fill(&s, 2, 1 << 20);
    s.close().unwrap();
    drop(s);
    let text = check_clean(&vol);
    assert!(!text.contains("is shared"), "{text}");

    // And a snapshot taken again works, its clone has the bytes.
    let out = pohmelfs(&["snapshot", "create", &url(&vol), "s1"]);
    assert!(out.status.success(), "{out:?}");
    let clone = scratch.join("clone");
    let out = pohmelfs(&["clone", &format!("{}@s1", url(&vol)), &url(&clone)]);
    assert!(out.status.success(), "{out:?}");
    let c = SlateStore::open(&url(&clone)).unwrap();
    assert_eq!(read_byte(&c, 0), 2);
    c.close().unwrap();
    drop(c);
    for dir in [&vol, &vol.join("snapshots/s1"), &clone] {
        check_clean(dir);
    }
}

#[test]
fn a_volume_another_process_holds_is_refused_not_fenced() {
    let scratch = ScratchDir::new("it-snapshot-held").unwrap();
    let vol = scratch.join("vol");
    let s = SlateStore::open(&url(&vol)).unwrap();
    fill(&s, 3, 64 << 10);
    let out = pohmelfs(&["snapshot", "create", &url(&vol), "s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open in another process"), "{err}");
    // Still ours: the refused command fenced nothing.
    fill(&s, 4, 64 << 10);
    assert_eq!(read_byte(&s, 0), 4);
    s.close().unwrap();
    drop(s);
}

/// File `i` of the writer below: ino 200 + i, named `w{i}`, 8 KiB of `i`.
fn writer_txn(i: u64) -> Txn {
    let ino = 200 + i;
    Txn {
        ops: vec![
            Op::PutInode(Inode::regular(ino, 8192)),
            Op::PutDirent {
                parent: ROOT_INO,
                dirent: Dirent {
                    name: format!("w{i}").into_bytes(),
                    ino,
                    kind: FileKind::Regular,
                    cookie: 1000 + i,
                },
            },
            Op::Write {
                ino,
                offset: 0,
                data: vec![i as u8; 8192].into(),
            },
        ],
    }
}

#[test]
fn a_snapshot_through_the_control_socket_holds_every_acknowledged_commit() {
    let scratch = ScratchDir::new("it-snapshot-online").unwrap();
    let vol = scratch.join("vol");
    let engine = SlateStore::open(&url(&vol)).unwrap();
    fill(&engine, 1, 4096);
    engine.close().unwrap();
    drop(engine);
    // The daemon's stack: the transaction layer over the engine, and the
    // control socket serving it.
    let metrics = Arc::new(pohmelfs::metrics::Metrics::default());
    // No checkpoint and no WAL flush of the engine's own: acknowledged
    // commits are in the commit log only, until the snapshot's checkpoint.
    let store: Arc<dyn Store> = pohmelfs::writeback::open(
        &format!("{}?checkpoint_ms=0&flush_interval_ms=600000", url(&vol)),
        pohmelfs::writeback::TxnConfig::default(),
        Arc::clone(&metrics),
    )
    .unwrap();
    let sock = scratch.join("vhost.sock");
    pohmelfs::control::spawn_control_socket(
        &pohmelfs::control::control_path(&sock),
        metrics,
        Some(Arc::clone(&store)),
    )
    .unwrap();
    let writer = {
        let store = Arc::clone(&store);
        Steps::spawn(250, move |i| store.commit(writer_txn(i)).unwrap())
    };
    assert!(
        writer.reach(20, Duration::from_secs(60)),
        "the writer started"
    );
    let before = writer.done();
    let out = pohmelfs(&[
        "snapshot",
        "create",
        &url(&vol),
        "live",
        "--socket-path",
        sock.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    // The writer was not stopped by it.
    let after = writer.done();
    assert!(
        writer.reach(after + 20, Duration::from_secs(60)) || after >= 250,
        "the writer went on"
    );
    writer.finish();
    store.sync(None).unwrap();
    drop(store);

    let clone = scratch.join("clone");
    snapshot_clone(&vol, "live", &clone);
    let c = SlateStore::open(&url(&clone)).unwrap();
    for i in 0..before {
        let mut buf = vec![0u8; 8192];
        c.read(200 + i, 0, &mut buf).unwrap();
        assert_eq!(
            buf,
            vec![i as u8; 8192],
            "file w{i}, written before the snapshot"
        );
    }
    c.close().unwrap();
    drop(c);
    for dir in [&vol, &vol.join("snapshots/live"), &clone] {
        check_clean(dir);
    }
}

fn snapshot_clone(vol: &Path, name: &str, clone: &Path) {
    let out = pohmelfs(&["clone", &format!("{}@{name}", url(vol)), &url(clone)]);
    assert!(out.status.success(), "{out:?}");
}
