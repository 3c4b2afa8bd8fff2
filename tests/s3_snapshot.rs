//! `pohmelfs snapshot` and `pohmelfs clone` on `s3://` (moto) as real
//! processes: a snapshot killed with SIGKILL half way leaves nothing that
//! breaks the next open (which removes it), a held volume is refused
//! rather than fenced, the commands take a snapshot, clone it, list and
//! delete them again, giving the bucket back to what the volume alone
//! needs, and a snapshot taken through a serving daemon's control socket
//! holds every commit acknowledged before it.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pohmelfs::store::engine::SlateStore;
use pohmelfs::store::{Dirent, FileKind, Inode, Op, Store, Txn, ROOT_INO};
use pohmelfs_testkit::{skip_requested, ChildGuard, Moto, ScratchDir, Steps};

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");

fn pohmelfs(args: &[&str]) -> Output {
    Command::new(POHMELFS)
        .args(args)
        .envs(Moto::CLI_ENV)
        .output()
        .unwrap()
}

/// A root directory with file `f` (ino 100) holding 256 KiB of `byte`
/// (over the 64 KiB a commit keeps inline: a data object).
fn write(s: &SlateStore, ino: u64, byte: u8) {
    let len = 256 * 1024;
    let mut root = Inode::regular(ROOT_INO, 0);
    root.kind = FileKind::Directory;
    root.nlink = 2;
    root.parent = ROOT_INO;
    s.reserve_ids(1000).unwrap();
    let ops = vec![
        Op::PutInode(root),
        Op::PutInode(Inode::regular(ino, len as u64)),
        Op::PutDirent {
            parent: ROOT_INO,
            dirent: Dirent {
                name: b"f".to_vec(),
                ino,
                kind: FileKind::Regular,
                cookie: ino,
            },
        },
        Op::Write {
            ino,
            offset: 0,
            data: vec![byte; len].into(),
        },
    ];
    s.commit(Txn { ops }).unwrap();
}

fn read_byte(s: &SlateStore, ino: u64) -> u8 {
    let mut b = [0u8; 1];
    s.read(ino, 4096, &mut b).unwrap();
    b[0]
}

#[test]
fn an_s3_snapshot_killed_half_way_leaves_the_volume_usable() {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the S3 snapshot kill test") {
        return;
    }
    let dir = ScratchDir::new("s3-snapshot-kill").unwrap();
    let moto = Moto::start(dir.path(), "pohmelfs-snap").expect("start moto_server");
    let vol = moto.url("golden");
    let cli = moto.cli_url("golden");
    let s = SlateStore::open(&vol).unwrap();
    write(&s, 100, 1);
    // Held by this process: the command refuses rather than fence it.
    let out = pohmelfs(&["snapshot", "create", &cli, "s0"]);
    assert!(!out.status.success(), "{out:?}");
    write(&s, 100, 1);
    s.close().unwrap();
    drop(s);
    let objects = moto.keys("golden/data/").unwrap();

    let paused = dir.join("paused");
    let log = dir.join("snapshot.log");
    let mut child = ChildGuard(
        Command::new(POHMELFS)
            .args(["snapshot", "create", &cli, "s1"])
            .envs(Moto::CLI_ENV)
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
    // Registered and cloned, its lineage not written: crash there.
    child.kill();
    assert!(!moto.keys("golden/holders/").unwrap().is_empty());
    let listed = pohmelfs(&["snapshot", "list", &cli]);
    assert!(listed.status.success(), "{listed:?}");
    assert!(listed.stdout.is_empty(), "{listed:?}");

    // The next open removes the leftover; the volume writes on and its
    // dead objects go (nothing else names them).
    let s = SlateStore::open(&vol).unwrap();
    assert!(moto.keys("golden/holders/").unwrap().is_empty());
    assert!(moto.keys("golden/snapshots/").unwrap().is_empty());
    write(&s, 100, 2);
    s.close().unwrap();
    drop(s);
    // Closing finishes the deletions the open's sweep queued.
    SlateStore::open(&vol).unwrap().close().unwrap();
    let now = moto.keys("golden/data/").unwrap();
    assert!(
        objects.iter().all(|k| !now.contains(k)),
        "{objects:?} {now:?}"
    );

    // The commands end to end: snapshot, clone, write the clone, delete.
    let out = pohmelfs(&["snapshot", "create", &cli, "s1"]);
    assert!(out.status.success(), "{out:?}");
    let clone = moto.cli_url("job");
    let out = pohmelfs(&[
        "clone",
        &format!(
            "{}@s1{}",
            cli.split_once('?').unwrap().0,
            &cli[cli.find('?').unwrap()..]
        ),
        &clone,
    ]);
    assert!(out.status.success(), "{out:?}");
    let c = SlateStore::open(&moto.url("job")).unwrap();
    assert_eq!(read_byte(&c, 100), 2);
    write(&c, 100, 3);
    c.close().unwrap();
    drop(c);
    for url in [&cli, &clone] {
        let out = pohmelfs(&["check", "--store", url]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "check {url}: {text} {out:?}");
        assert!(text.contains(" 0 problems, 0 warnings"), "{text}");
    }
    let out = pohmelfs(&["snapshot", "delete", &cli, "s1"]);
    assert!(
        !out.status.success(),
        "a snapshot with a clone deleted: {out:?}"
    );
    let out = pohmelfs(&["clone", "--delete", &clone]);
    assert!(out.status.success(), "{out:?}");
    let out = pohmelfs(&["snapshot", "delete", &cli, "s1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(moto.keys("job/").unwrap().is_empty());
    assert!(moto.keys("golden/snapshots/").unwrap().is_empty());
    let s = SlateStore::open(&vol).unwrap();
    assert_eq!(read_byte(&s, 100), 2);
    s.close().unwrap();
    assert_eq!(moto.keys("golden/data/").unwrap().len(), 1);
}

/// File `i` of the writer below: ino 200 + i, named `w{i}`, 96 KiB of `i`
/// (a data object each).
fn writer_txn(i: u64) -> Txn {
    let ino = 200 + i;
    Txn {
        ops: vec![
            Op::PutInode(Inode::regular(ino, 96 << 10)),
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
                data: vec![i as u8; 96 << 10].into(),
            },
        ],
    }
}

#[test]
fn an_s3_snapshot_through_the_control_socket_holds_every_acknowledged_commit() {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the S3 online snapshot test") {
        return;
    }
    let dir = ScratchDir::new("s3-snapshot-online").unwrap();
    let moto = Moto::start(dir.path(), "pohmelfs-snap").expect("start moto_server");
    let vol = moto.url("served");
    let engine = SlateStore::open(&vol).unwrap();
    write(&engine, 100, 1);
    engine.close().unwrap();
    drop(engine);
    // The daemon's stack: the transaction layer over the engine, and the
    // control socket serving it.
    let metrics = Arc::new(pohmelfs::metrics::Metrics::default());
    let store: Arc<dyn Store> = pohmelfs::writeback::open(
        &vol,
        pohmelfs::writeback::TxnConfig::default(),
        Arc::clone(&metrics),
    )
    .unwrap();
    let sock = dir.join("vhost.sock");
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
        writer.reach(10, Duration::from_secs(60)),
        "the writer started"
    );
    let before = writer.done();
    let out = pohmelfs(&[
        "snapshot",
        "create",
        &moto.cli_url("served"),
        "live",
        "--socket-path",
        sock.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let after = writer.done();
    assert!(
        writer.reach(after + 10, Duration::from_secs(60)) || after >= 250,
        "the writer went on"
    );
    writer.finish();
    store.sync(None).unwrap();
    drop(store);

    // Served read-only by its name, as `serve --readonly` opens it.
    let snap = pohmelfs::store::engine::ReadOnlyVolume::open(&format!(
        "s3://pohmelfs-snap/served@live{}",
        &vol[vol.find('?').unwrap()..]
    ))
    .unwrap();
    for i in 0..before {
        let mut buf = vec![0u8; 96 << 10];
        snap.read(200 + i, 0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|b| *b == i as u8),
            "file w{i}, written before the snapshot"
        );
    }
    drop(snap);
    let out = pohmelfs(&["check", "--store", &moto.cli_url("served/snapshots/live")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text} {out:?}");
    assert!(text.contains(" 0 problems, 0 warnings"), "{text}");
}
