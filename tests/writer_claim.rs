//! The writer claim of a `pohmel://` volume (`docs/protocol.md`, "Writer
//! claim") against a real `pohmelfs store` process on 127.0.0.1: once a
//! second client claims the volume, the first one's writes, new ones and
//! resends of its old transactions alike, are refused with `NotWriter`
//! and not applied; the second's succeed; a server killed with SIGKILL and
//! restarted keeps the claim. A claim is refused while the writer it would
//! supersede is connected and heard from; `TakeOver` claims anyway.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pohmelfs::net::client::{RemoteConfig, RemoteStore};
use pohmelfs::net::proto::msg::{ErrorCode, Request, Response, Stage};
use pohmelfs::store::{Inode, Op, Store, Txn};
use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{ScratchDir, StoreServer};
use raw::Raw;

#[path = "support/raw.rs"]
mod raw;

const SECRET: &str = "claim-secret-123";
const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");

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

/// The real client of `vol` on `server`, claimed for writing as
/// `serve --take-over` claims it when it opens the volume.
fn writer(dir: &ScratchDir, server: &StoreServer) -> RemoteStore {
    let client = connect(dir, server);
    client.claim(true).expect("claim the volume");
    client
}

fn connect(dir: &ScratchDir, server: &StoreServer) -> RemoteStore {
    let url = format!(
        "pohmel://{}/vol?secret_file={}&timeout_ms=2000&give_up_ms=20000",
        server.addr(),
        secret_file(dir.path()).display()
    );
    RemoteStore::connect(RemoteConfig::from_url(&url).unwrap()).unwrap()
}

fn txn(raw: &mut Raw, txn_id: u64, ino: u64, data: &[u8]) -> Response {
    raw.call(&Request::Txn {
        txn_id,
        low_water: 1,
        txn: write_txn(ino, data),
    })
}

fn assert_not_writer(r: &Response) {
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::NotWriter,
                ..
            }
        ),
        "expected NotWriter, got {r:?}"
    );
}

#[test]
fn a_later_claim_fences_the_earlier_writer_across_a_restart() {
    let dir = ScratchDir::new("it-claim").unwrap();
    let data = format!("file://{}/volumes", dir.path().display());
    let mut server = StoreServer::start(POHMELFS, dir.path(), "s", &data, Some(SECRET)).unwrap();

    // The first writer, on raw frames so its transaction ids are ours.
    let mut first = Raw::connect(server.addr(), SECRET, "vol").unwrap();
    let first_session = first.session;
    // Before any claim, a write is refused: the claim is mandatory.
    assert_not_writer(&txn(&mut first, 1, 100, b"unclaimed"));
    assert!(matches!(
        first.call(&Request::Claim),
        Response::Claimed { claim: 1 }
    ));
    let ack = txn(&mut first, 1, 100, b"first");
    assert!(
        matches!(
            ack,
            Response::TxnAck {
                duplicate: false,
                ..
            }
        ),
        "{ack:?}"
    );

    // The second writer, the real client, may not claim the volume while
    // the first is connected and heard from: the refusal names it ...
    let refused = connect(&dir, &server).claim(false);
    let why = match refused {
        Err(pohmelfs::net::client::ClaimError::WriterAlive(why)) => why,
        other => panic!("expected WriterAlive, got {other:?}"),
    };
    assert!(
        why.contains(&format!("session {:016x} from 127.0.0.1:", first_session.0)),
        "{why}"
    );
    // ... and takes it over when told to.
    let second = writer(&dir, &server);
    second.commit(write_txn(200, b"second")).unwrap();

    // The first one's next transaction is refused and not applied ...
    assert_not_writer(&txn(&mut first, 2, 101, b"too late"));
    assert_eq!(
        second.get_inode(101).unwrap(),
        None,
        "a refused write was applied"
    );
    // ... and so is the exactly-once resend of its applied transaction.
    assert_not_writer(&txn(&mut first, 1, 100, b"first"));
    // Nor may it stage the bytes of large writes (protocol 4).
    assert_not_writer(&first.call(&Request::Stage(Stage {
        stage_id: 1,
        ino: 102,
        offset: 0,
        data: vec![7u8; 256 << 10].into(),
    })));
    // Reads go on: a superseded session is a reader.
    assert!(matches!(first.call(&Request::Statfs), Response::Stats(_)));

    // The first client's claim fails it as a writer through the real
    // client too: a third claim supersedes the second.
    let third = writer(&dir, &server);
    let refused = second.commit(write_txn(201, b"superseded"));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| pohmelfs::ErrorChain(e).to_string().contains("NotWriter")),
        "{refused:?}"
    );
    assert_eq!(third.get_inode(201).unwrap(), None);
    third.commit(write_txn(300, b"third")).unwrap();

    // Killed and restarted, the server reads the claim back from the volume.
    server.kill9();
    server.restart().unwrap();
    let mut again = Raw::resume(server.addr(), "default", SECRET, first_session, "vol").unwrap();
    assert_not_writer(&txn(&mut again, 3, 102, b"after restart"));
    third.commit(write_txn(301, b"still the writer")).unwrap();
    let mut buf = [0u8; 16];
    third.read(301, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"still the writer");
    assert_eq!(third.get_inode(102).unwrap(), None);
    drop((again, first));
    let log = server.log_text();
    assert!(log.contains("volume claimed for writing"), "{log}");
}

/// A daemon's write-back layer whose claim another client took fails every
/// fsync at once (not at `fsync_timeout`) and sends nothing more; what it
/// accepted after the claim is not applied.
#[test]
fn a_superseded_daemon_fails_its_fsync_at_once() {
    let dir = ScratchDir::new("it-claim-daemon").unwrap();
    let data = format!("file://{}/volumes", dir.path().display());
    let server = StoreServer::start(POHMELFS, dir.path(), "s", &data, Some(SECRET)).unwrap();
    let url = format!(
        "pohmel://{}/vol?secret_file={}&timeout_ms=2000&give_up_ms=20000",
        server.addr(),
        secret_file(dir.path()).display()
    );
    let fsync_timeout = std::time::Duration::from_secs(120);
    let cfg = pohmelfs::writeback::TxnConfig {
        fsync_timeout,
        ..Default::default()
    };
    let metrics = std::sync::Arc::new(pohmelfs::metrics::Metrics::default());
    // The layer's open claims the volume, as the daemon's does.
    let daemon = pohmelfs::writeback::open(&url, cfg, metrics).unwrap();
    daemon.commit(write_txn(400, b"durable")).unwrap();
    daemon.sync(None).unwrap();

    let other = writer(&dir, &server);
    // A metadata transaction waits for its ack (a write's would wait in
    // the fsync): either way the error comes at once.
    let started = std::time::Instant::now();
    let failed = daemon
        .commit(write_txn(401, b"after the claim"))
        .and_then(|()| daemon.sync(None));
    let why = pohmelfs::ErrorChain(failed.as_ref().unwrap_err()).to_string();
    assert!(why.contains("NotWriter"), "{why}");
    assert!(
        started.elapsed() < fsync_timeout / 2,
        "the fsync waited for its timeout: {:?}",
        started.elapsed()
    );
    // Final: a write accepted now fails its fsync, and nothing was applied.
    let mut write = Txn::new();
    write.push(Op::Write {
        ino: 400,
        offset: 0,
        data: b"late".to_vec().into(),
    });
    write.push(Op::PutInode(Inode::regular(400, 7)));
    daemon.commit(write).unwrap();
    assert!(daemon.sync(None).is_err());
    assert!(started.elapsed() < fsync_timeout / 2);
    assert_eq!(other.get_inode(401).unwrap(), None);
    let mut buf = [0u8; 7];
    other.read(400, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"durable");
    drop(daemon);
}
