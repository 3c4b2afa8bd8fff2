//! Staged writes (protocol version 4) against a real `pohmelfs store`
//! process: the server is killed with SIGKILL while the stage frames of an
//! uncommitted transaction are in flight, restarted, and the client's
//! resend stages the data again; every acknowledged byte is there exactly
//! once, and the volume checks clean.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pohmelfs::net::client::{RemoteConfig, RemoteStore};
use pohmelfs::store::sink::{Ack, SendError};
use pohmelfs::store::{Dirent, FileKind, Inode, Op, Store, Txn, ROOT_INO};
use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{wait_until, ScratchDir, StoreServer};

const SECRET: &str = "test-secret-123";
const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const MIB: usize = 1 << 20;

fn body(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 131 + seed * 7 + (i as u64 >> 12)) as u8)
        .collect()
}

/// A new file `ino` in the root directory holding `data`, in writes of
/// 1 MiB (each staged).
fn file_txn(ino: u64, data: &[u8]) -> Txn {
    let mut t = Txn::new();
    let mut inode = Inode::regular(ino, data.len() as u64);
    inode.parent = ROOT_INO;
    t.push(Op::PutInode(inode));
    t.push(Op::PutDirent {
        parent: ROOT_INO,
        dirent: Dirent {
            name: format!("f{ino}").into_bytes(),
            ino,
            kind: FileKind::Regular,
            cookie: ino,
        },
    });
    for (i, chunk) in data.chunks(MIB).enumerate() {
        t.push(Op::Write {
            ino,
            offset: (i * MIB) as u64,
            data: chunk.to_vec().into(),
        });
    }
    t
}

/// Bytes that arrived on the server's end of its client connections and
/// that it has not read (`rx_queue` of the established sockets on `port`
/// in /proc/net/tcp; the test and the server share the namespace).
fn unread_at_server(port: u16) -> u64 {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .sum()
}

fn signal(server: &StoreServer, sig: libc::c_int) {
    let pid = server.pid().expect("server running") as libc::pid_t;
    // SAFETY: kill(2) with the pid of a child this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// A store server on a new volume `vol` in the scratch directory `name`,
/// and a client of it, with `timeouts` in its URL, that claimed the
/// volume; the server's data URL.
fn serve_volume(
    name: &str,
    timeouts: &str,
) -> (ScratchDir, StoreServer, std::sync::Arc<RemoteStore>, String) {
    let dir = ScratchDir::new(name).unwrap();
    let data = format!("file://{}/volumes", dir.path().display());
    std::fs::create_dir_all(dir.path().join("volumes")).unwrap();
    pohmelfs_testkit::format_volume(POHMELFS, &format!("{data}/vol"), &[]).unwrap();
    let server =
        StoreServer::start(POHMELFS, dir.path(), "a", &data, Some(SECRET)).expect("start store");
    let url = format!(
        "pohmel://{}/vol?secret_file={}&{timeouts}",
        server.addr(),
        secret_file(dir.path()).display()
    );
    let store =
        std::sync::Arc::new(RemoteStore::connect(RemoteConfig::from_url(&url).unwrap()).unwrap());
    store.claim(false).unwrap();
    (dir, server, store, data)
}

fn send(store: &RemoteStore, txn_id: u64, low_water: u64, txn: Txn) -> Result<Ack, SendError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.send_txn(0, txn_id, low_water, txn))
}

#[test]
fn a_server_killed_with_stages_in_flight_loses_no_acked_byte() {
    let (_dir, mut server, store, data) =
        serve_volume("it-staged-kill9", "timeout_ms=30000&give_up_ms=60000");
    let port: u16 = server.addr().rsplit(':').next().unwrap().parse().unwrap();
    // Transaction 1 also makes the root directory, as a daemon does on a
    // new volume.
    let mut root = Inode::regular(ROOT_INO, 0);
    root.kind = FileKind::Directory;
    root.nlink = 2;
    root.parent = ROOT_INO;
    let txn1 = |ino, data: &[u8]| {
        let mut t = file_txn(ino, data);
        t.ops.insert(0, Op::PutInode(root.clone()));
        t
    };
    let first_ino = store.reserve_ids(2).unwrap();
    let (ino1, ino2) = (first_ino, first_ino + 1);

    // Transaction 1: staged and acknowledged before the kill.
    let first = body(1, 2 * MIB);
    let ack = send(&store, 1, 1, txn1(ino1, &first)).unwrap();
    assert!(!ack.duplicate);

    // Transaction 2: its stages leave the client while the server is
    // stopped, so they sit unread in the server's socket, and the
    // transaction's own frame (behind 8 MiB of stages) has not arrived.
    let second = body(2, 8 * MIB);
    signal(&server, libc::SIGSTOP);
    let attempt = {
        let (store, txn) = (std::sync::Arc::clone(&store), file_txn(ino2, &second));
        std::thread::spawn(move || send(&store, 2, 2, txn))
    };
    let arrived = wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
        unread_at_server(port) >= 64 << 10
    });
    assert!(
        arrived.is_some(),
        "no stage data reached the stopped server"
    );
    server.kill9();
    let failed = attempt.join().unwrap();
    assert!(
        matches!(failed, Err(SendError::Retry(_))),
        "the attempt cut by the kill: {failed:?}"
    );
    server.restart().expect("restart the store");

    // The resend stages everything again on the new connection, under
    // the same transaction id; the one acked before answers duplicate.
    let ack = send(&store, 2, 1, file_txn(ino2, &second)).unwrap();
    assert!(!ack.duplicate, "transaction 2 was never applied");
    let ack = send(&store, 1, 1, txn1(ino1, &first)).unwrap();
    assert!(ack.duplicate, "transaction 1 was applied before the kill");
    let ack = send(&store, 2, 1, file_txn(ino2, &second)).unwrap();
    assert!(ack.duplicate, "transaction 2 applies once");

    for (ino, want) in [(ino1, &first), (ino2, &second)] {
        let size = store.get_inode(ino).unwrap().expect("file exists").size;
        assert_eq!(size, want.len() as u64, "size of {ino}");
        let mut got = vec![0u8; want.len()];
        store.read(ino, 0, &mut got).unwrap();
        assert!(&got == want, "contents of {ino}");
    }
    drop(store);
    server.kill9();
    let out = std::process::Command::new(POHMELFS)
        .args(["check", "--store", &format!("{data}/vol")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check: {text}");
    assert!(text.contains(" 0 problems, 0 warnings"), "{text}");
}

/// A server stops reading (SIGSTOP) while a transaction of many small
/// writes, each staged, is on its way: the socket fills, then the
/// client's queue to it, and the send still fails within its timeout
/// instead of waiting for the server. Continued, the server takes the
/// resend on a new connection.
#[test]
fn a_send_to_a_server_that_reads_nothing_fails_within_its_timeout() {
    let (_dir, mut server, store, _) =
        serve_volume("it-staged-stopped", "timeout_ms=2000&give_up_ms=4000");
    let ino = store.reserve_ids(1).unwrap();
    // 1,600 writes of 32 KiB (the smallest staged): within the staging
    // room, and far more frames than the socket and the queue hold.
    let chunk = 32 << 10;
    let txn = || {
        let mut t = file_txn(ino, &[]);
        for i in 0..1600u64 {
            t.push(Op::Write {
                ino,
                offset: i * chunk as u64,
                data: body(i, chunk).into(),
            });
        }
        t
    };

    signal(&server, libc::SIGSTOP);
    let (done, returned) = std::sync::mpsc::channel();
    {
        let (store, txn) = (std::sync::Arc::clone(&store), txn());
        std::thread::spawn(move || done.send(send(&store, 1, 1, txn)));
    }
    let failed = returned.recv_timeout(Duration::from_secs(60));
    signal(&server, libc::SIGCONT);
    let failed = failed.expect("the send to the stopped server returned");
    assert!(
        matches!(failed, Err(SendError::Retry(_))),
        "the send to the stopped server: {failed:?}"
    );
    let ack = send(&store, 1, 1, txn()).expect("the resend after SIGCONT");
    assert!(!ack.duplicate, "nothing was applied while stopped");
    drop(store);
    server.kill9();
}
