//! The store server as a real process on 127.0.0.1: durable acks across
//! `kill -9`, exactly-once apply of resent transactions, authentication,
//! and failover from a fenced server, driven through the real client
//! (`pohmel://`) and through raw protocol frames.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpStream;

use pohmelfs::net::proto::msg::{ErrorCode, Request, Response};
use pohmelfs::store::{Inode, Op, Store, Txn};
use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{ScratchDir, StoreServer};
use raw::Raw;

#[path = "support/raw.rs"]
mod raw;

const SECRET: &str = "test-secret-123";
const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");

fn workdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("it-{name}")).expect("scratch directory")
}

/// A `pohmelfs store` process named `name` with the secret, killed on drop.
fn start_server(dir: &ScratchDir, name: &str, data_url: &str) -> StoreServer {
    StoreServer::start(POHMELFS, dir.path(), name, data_url, Some(SECRET)).expect("start store")
}

fn remote(dir: &ScratchDir, servers: &[&str], volume: &str) -> std::sync::Arc<dyn Store> {
    let url = format!(
        "pohmel://{}/{volume}?secret_file={}&timeout_ms=2000&give_up_ms=30000",
        servers.join(","),
        secret_file(dir.path()).display()
    );
    pohmelfs::net::open(&url).expect("open remote volume")
}

/// Claim the volume for the connection's session, as a daemon does before
/// it writes; taken over, as the test's sessions follow one another while
/// the earlier ones live.
fn claim(raw: &mut Raw) -> u64 {
    match raw.call(&Request::TakeOver) {
        Response::Claimed { claim } => claim,
        r => panic!("claim refused: {r:?}"),
    }
}

/// `raw`, its session the volume's claimed writer.
fn claimed(mut raw: Raw) -> Raw {
    claim(&mut raw);
    raw
}

fn write_txn(ino: u64, data: &[u8]) -> Txn {
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, data.len() as u64)));
    t.push(Op::Write {
        ino,
        offset: 0,
        data: data.to_vec().into(),
    });
    t
}

fn read_all(s: &dyn Store, ino: u64) -> Vec<u8> {
    let size = s.get_inode(ino).unwrap().expect("inode exists").size;
    let mut buf = vec![0u8; size as usize];
    s.read(ino, 0, &mut buf).unwrap();
    buf
}

#[test]
fn acked_transactions_survive_kill_9() {
    let dir = workdir("kill9");
    // No checkpoint and no engine WAL flush of its own before the kill:
    // every acknowledged commit is in the commit log only, and comes back
    // through its replay.
    let opts = "?checkpoint_ms=0&flush_interval_ms=600000";
    let data = format!("file://{}/volumes{opts}", dir.path().display());
    let mut server = start_server(&dir, "a", &data);
    let s = remote(&dir, &[server.addr()], "vol");
    let mut expected = Vec::new();
    for i in 0..50u64 {
        let body: Vec<u8> = (0..(1000 + i * 3000)).map(|b| (b * 7 + i) as u8).collect();
        s.commit(write_txn(100 + i, &body)).unwrap();
        expected.push(body);
    }
    server.kill9();
    drop(s);
    let server = start_server(&dir, "b", &data);
    // A reader: the restarted server keeps the volume for the killed
    // writer's session for a lease (`docs/protocol.md`, "Writer claim").
    let url = format!(
        "pohmel://{}/vol?secret_file={}&timeout_ms=2000&give_up_ms=30000",
        server.addr(),
        secret_file(dir.path()).display()
    );
    let s = pohmelfs::net::open_reader(&url).expect("open a reader");
    for (i, body) in expected.iter().enumerate() {
        assert_eq!(
            &read_all(&*s, 100 + i as u64),
            body,
            "file {i} after kill -9"
        );
    }
    assert!(
        server.log_text().contains("replayed the commit log"),
        "{}",
        server.log_text()
    );
}

#[test]
fn a_resent_transaction_applies_once_and_gets_the_same_ack() {
    let dir = workdir("once");
    let server = start_server(
        &dir,
        "a",
        &format!("file://{}/volumes", dir.path().display()),
    );
    let mut raw = claimed(Raw::connect(server.addr(), SECRET, "vol").unwrap());
    let session = raw.session;
    let first = raw.call(&Request::Txn {
        txn_id: 5,
        low_water: 5,
        txn: write_txn(200, b"AAAA"),
    });
    assert!(
        matches!(
            first,
            Response::TxnAck {
                txn_id: 5,
                duplicate: false,
                ..
            }
        ),
        "{first:?}"
    );
    let second = raw.call(&Request::Txn {
        txn_id: 6,
        low_water: 5,
        txn: write_txn(200, b"BBBB"),
    });
    assert!(
        matches!(
            second,
            Response::TxnAck {
                txn_id: 6,
                duplicate: false,
                ..
            }
        ),
        "{second:?}"
    );
    // Resend 5 (as after a lost ack): it must not overwrite BBBB again.
    let again = raw.call(&Request::Txn {
        txn_id: 5,
        low_water: 5,
        txn: write_txn(200, b"AAAA"),
    });
    assert!(
        matches!(
            again,
            Response::TxnAck {
                txn_id: 5,
                duplicate: true,
                ..
            }
        ),
        "{again:?}"
    );
    let Response::Data(d) = raw.call(&Request::Read {
        ino: 200,
        offset: 0,
        len: 4,
    }) else {
        panic!()
    };
    assert_eq!(d.as_ref(), b"BBBB");
    // A resend on a new connection of the same session is a duplicate too.
    drop(raw);
    let mut raw = Raw::resume(server.addr(), "default", SECRET, session, "vol").unwrap();
    assert_eq!(raw.session.0, session.0, "the session was resumed");
    let again = raw.call(&Request::Txn {
        txn_id: 6,
        low_water: 5,
        txn: write_txn(200, b"BBBB"),
    });
    assert!(
        matches!(
            again,
            Response::TxnAck {
                duplicate: true,
                ..
            }
        ),
        "{again:?}"
    );
    // Another session's id 5 is a different transaction.
    let mut other = Raw::connect(server.addr(), SECRET, "vol").unwrap();
    claim(&mut other);
    assert_ne!(other.session.0, session.0, "a new session");
    let r = other.call(&Request::Txn {
        txn_id: 5,
        low_water: 5,
        txn: write_txn(201, b"C"),
    });
    assert!(
        matches!(
            r,
            Response::TxnAck {
                duplicate: false,
                ..
            }
        ),
        "{r:?}"
    );
}

#[test]
fn clients_without_the_secret_are_refused() {
    let dir = workdir("auth");
    let server = start_server(&dir, "a", "mem:");
    let err = Raw::connect(server.addr(), "wrong", "vol")
        .err()
        .expect("refused");
    assert_eq!(err.0, ErrorCode::AuthFailed);
    let url = format!("pohmel://{}/vol?give_up_ms=0", server.addr());
    assert!(
        pohmelfs::net::open(&url).is_err(),
        "a client without the secret must not connect"
    );
}

#[test]
fn malformed_frames_get_an_error_and_the_server_lives_on() {
    let dir = workdir("malformed");
    let server = start_server(&dir, "a", "mem:");
    let mut raw = Raw::connect(server.addr(), SECRET, "vol").unwrap();
    let mut bad = Request::GetInode { ino: 1 }.to_frame(3).encode();
    let last = bad.len() - 1;
    bad[last] ^= 0xff; // checksum no longer matches
    raw.send_bytes(&bad);
    match raw.recv() {
        Some(Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }) => {}
        other => panic!("expected BadRequest, got {other:?}"),
    }
    // An oversize length claim, garbage, then a clean client still works.
    let mut raw = Raw::connect(server.addr(), SECRET, "vol").unwrap();
    let mut huge = Request::Statfs.to_frame(1).encode();
    huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    raw.send_bytes(&huge);
    assert!(matches!(
        raw.recv(),
        Some(Response::Error {
            code: ErrorCode::BadRequest,
            ..
        })
    ));
    let mut garbage = TcpStream::connect(server.addr()).unwrap();
    garbage.write_all(&[0xAB; 4096]).unwrap();
    let mut raw = Raw::connect(server.addr(), SECRET, "vol").unwrap();
    assert!(matches!(raw.call(&Request::Statfs), Response::Stats(_)));
}

#[test]
fn a_fenced_server_sends_the_client_elsewhere() {
    let dir = workdir("fence");
    let data = format!("file://{}/volumes", dir.path().display());
    let a = start_server(&dir, "a", &data);
    let b = start_server(&dir, "b", &data);
    let s = remote(&dir, &[a.addr(), b.addr()], "vol");
    s.commit(write_txn(300, b"before")).unwrap();
    // A reader opens the volume on b: b takes it over and fences a.
    let url = format!(
        "pohmel://{}/vol?secret_file={}&timeout_ms=2000&give_up_ms=30000",
        b.addr(),
        secret_file(dir.path()).display()
    );
    let other = pohmelfs::net::open_reader(&url).expect("open a reader on b");
    assert_eq!(read_all(&*other, 300), b"before");
    // The first client's next write is refused by a (fenced) and resent to
    // b, which read the writer claim from the volume: it is still s's.
    s.commit(write_txn(302, b"after")).unwrap();
    assert_eq!(read_all(&*other, 302), b"after");
    let refused = other.commit(write_txn(301, b"not the writer"));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:?}").contains("NotWriter")),
        "{refused:?}"
    );
    let log = a.log_text();
    assert!(
        log.contains("fenced") || log.contains("Fenced"),
        "server a did not report being fenced:\n{log}"
    );
}

/// Bytes received on `stream` and not read yet.
fn unread(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    usize::try_from(n).unwrap_or(0)
}

/// A new client of volume `fast` at `addr` claims it, commits `n` files of
/// 64 KiB and reads each back (Raw's reads give up after 30 s).
fn commits_and_reads(addr: &str, n: u64) {
    let mut fast = Raw::connect(addr, SECRET, "fast").unwrap();
    claim(&mut fast);
    for i in 0..n {
        let body = vec![i as u8; 64 << 10];
        let ack = fast.call(&Request::Txn {
            txn_id: i + 1,
            low_water: i + 1,
            txn: write_txn(400 + i, &body),
        });
        assert!(
            matches!(ack, Response::TxnAck { .. }),
            "commit {i}: {ack:?}"
        );
        let got = fast.call(&Request::Read {
            ino: 400 + i,
            offset: 0,
            len: 64 << 10,
        });
        assert!(
            matches!(&got, Response::Data(d) if *d == body),
            "read {i} did not return what was committed"
        );
    }
}

/// A client that sends requests and stops reading the replies (a daemon
/// stuck, or a hostile peer) fills its own connection and holds back no
/// other client: its requests wait on its own in-flight bound and its own
/// reply queue, while another daemon's commits and reads on the same
/// server are answered within the client's read timeout.
#[test]
fn a_client_that_stops_reading_holds_back_no_other() {
    const MIB: u32 = 1 << 20;
    let dir = workdir("slow-reader");
    let server = start_server(
        &dir,
        "a",
        &format!("file://{}/volumes", dir.path().display()),
    );
    let mut slow = Raw::connect(server.addr(), SECRET, "slow").unwrap();
    claim(&mut slow);
    let data = vec![0x5a; 4 * MIB as usize];
    let put = slow.call(&Request::Txn {
        txn_id: 1,
        low_water: 1,
        txn: write_txn(300, &data),
    });
    assert!(matches!(put, Response::TxnAck { .. }), "{put:?}");
    // Far more reply bytes than the socket buffers of both ends hold, and
    // more requests than the server's in-flight bound per connection (64).
    let reads = 256u32;
    let mut burst = Vec::new();
    for i in 0..reads {
        let req = Request::Read {
            ino: 300,
            offset: u64::from(i % 4) * u64::from(MIB),
            len: MIB,
        };
        burst.extend_from_slice(&req.to_frame(u64::from(i) + 10).encode());
    }
    slow.send_bytes(&burst);
    // Replies pile up unread (up to the receive window, which does not
    // grow while nobody reads): the server is writing to a peer that does
    // not read.
    let piled = 32 << 10;
    pohmelfs_testkit::wait_until(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(10),
        || unread(&slow.stream) >= piled,
    )
    .expect("the server never answered the slow client's reads");

    commits_and_reads(server.addr(), 20);
    // The slow client was never drained: its replies still wait.
    assert!(unread(&slow.stream) >= piled);
}

/// Many clients that stop reading (more than the server's blocking
/// threads could serve if each held its requests' threads: 10 × 64 >
/// 512) hold none of them: a reply waits for its connection's writer
/// without a thread, and another client is served as before.
#[test]
fn clients_that_stop_reading_hold_no_server_threads() {
    const KIB: u32 = 1 << 10;
    const SLOW: usize = 10;
    let dir = workdir("slow-readers");
    let server = start_server(
        &dir,
        "a",
        &format!("file://{}/volumes", dir.path().display()),
    );
    let mut first = Raw::connect(server.addr(), SECRET, "slow").unwrap();
    claim(&mut first);
    let data = vec![0x3c; 1 << 20];
    let put = first.call(&Request::Txn {
        txn_id: 1,
        low_water: 1,
        txn: write_txn(300, &data),
    });
    assert!(matches!(put, Response::TxnAck { .. }), "{put:?}");
    // Each slow client: more reads than its in-flight bound (64), more
    // reply bytes than both ends' socket buffers hold.
    let mut burst = Vec::new();
    for i in 0..160u32 {
        let req = Request::Read {
            ino: 300,
            offset: u64::from(i % 4) * 256 * u64::from(KIB),
            len: 256 * KIB,
        };
        burst.extend_from_slice(&req.to_frame(u64::from(i) + 10).encode());
    }
    let mut slow = vec![first];
    while slow.len() < SLOW {
        slow.push(Raw::connect(server.addr(), SECRET, "slow").unwrap());
    }
    for s in &mut slow {
        s.send_bytes(&burst);
    }
    for (i, s) in slow.iter().enumerate() {
        pohmelfs_testkit::wait_until(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_millis(10),
            || unread(&s.stream) >= 32 << 10,
        )
        .unwrap_or_else(|| panic!("slow client {i} was never answered"));
    }
    // Every slow connection's replies are queued now, and its requests
    // beyond them wait for its in-flight bound. (Raw's reads give up
    // after 30 s: a server out of threads fails the test, not hangs it.)
    commits_and_reads(server.addr(), 10);
    for s in &slow {
        assert!(unread(&s.stream) >= 32 << 10);
    }
}

/// A daemon that opens a `pohmel://` volume is its only writer: the server
/// removes the inodes a crashed daemon left unlinked but open (their
/// orphan marks), except those the opener says a migrated guest session
/// still holds.
#[test]
fn a_daemon_opening_a_remote_volume_has_its_orphans_reclaimed() {
    let dir = workdir("orphans");
    let server = start_server(
        &dir,
        "a",
        &format!("file://{}/volumes", dir.path().display()),
    );
    let url = format!(
        "pohmel://{}/vol?secret_file={}",
        server.addr(),
        secret_file(dir.path()).display()
    );
    {
        // A daemon that crashed with two files unlinked while open.
        let crashed = remote(&dir, &[server.addr()], "vol");
        let mut t = Txn::new();
        for ino in [500, 501] {
            let mut inode = Inode::regular(ino, 0);
            inode.nlink = 0;
            t.push(Op::PutInode(inode));
        }
        crashed.commit(t).unwrap();
    }
    let cfg = pohmelfs::net::client::RemoteConfig::from_url(&url).unwrap();
    let client = pohmelfs::net::client::RemoteStore::connect(cfg).unwrap();
    client.claim(false).unwrap();
    assert_eq!(client.reclaim_orphans_except(&[501]).unwrap(), 1);
    assert!(client.get_inode(500).unwrap().is_none(), "reclaimed");
    assert!(client.get_inode(501).unwrap().is_some(), "spared");
    drop(client);
    // The transaction layer's open (a daemon's) reclaims the rest.
    let metrics = std::sync::Arc::new(pohmelfs::metrics::Metrics::default());
    let daemon =
        pohmelfs::writeback::open(&url, pohmelfs::writeback::TxnConfig::default(), metrics)
            .unwrap();
    assert!(daemon.get_inode(501).unwrap().is_none());
}
