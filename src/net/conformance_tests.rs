//! The contract through the wire protocol: the remote store (`pohmel://`,
//! [`RemoteStore`]) against a `pohmelfs store` server ([`Server`]) running
//! in this process on 127.0.0.1 and an ephemeral port, over the SlateDB
//! engine in a temporary directory. Every request and answer crosses a real
//! socket, encoded and validated as between machines.
//!
//! The exactly-once contract (`once_contract`) is the server's business,
//! not the client's (`RemoteStore` is no `OnceStore`): the integration test
//! `tests/store_server.rs` checks it with raw protocol frames.

use std::net::SocketAddr;
use std::time::Duration;

use crate::net::client::{RemoteConfig, RemoteStore};
use crate::net::credentials::{Credentials, Secret, DEFAULT_CREDENTIAL};
use crate::net::server::{Server, ServerConfig};
use crate::store::engine::conformance::{contract, differential, full_volume_refuses_whole_txn};
use crate::store::mem::MemStore;

const SECRET: &[u8] = b"conformance-secret";

/// A store server on a thread of its own, shut down (drained, volumes
/// closed) and joined on drop.
struct LoopbackServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackServer {
    /// Serves the volumes under `data_url` on `127.0.0.1:0`.
    fn start(data_url: &str) -> LoopbackServer {
        LoopbackServer::start_with(data_url, |_| {})
    }

    /// As [`LoopbackServer::start`], its settings changed by `tune`.
    fn start_with(data_url: &str, tune: impl FnOnce(&mut ServerConfig)) -> LoopbackServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        let mut cfg = ServerConfig {
            credentials: Credentials::single(Secret::new(SECRET.to_vec())),
            max_connections: 8,
            max_in_flight: 16,
            ..ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), data_url)
        };
        tune(&mut cfg);
        let server = rt.block_on(Server::bind(cfg)).expect("bind the server");
        let addr = server.local_addr().expect("bound address");
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(server.run(async {
                let _ = stop.await;
            }));
        });
        LoopbackServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// A client of volume `vol` on this server, its writer.
    fn client(&self) -> RemoteStore {
        let client = RemoteStore::connect(RemoteConfig {
            servers: vec![self.addr.to_string()],
            volume: "vol".into(),
            credential: DEFAULT_CREDENTIAL.into(),
            secret: Secret::new(SECRET.to_vec()),
            tls: None,
            request_timeout: Duration::from_secs(30),
            give_up_after: Duration::from_secs(60),
            max_in_flight: 16,
            keepalive: Duration::from_secs(5),
        })
        .expect("connect to the loopback server");
        // Taken over: the test's clients follow one another on the volume.
        client.claim(true).expect("claim the volume");
        client
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic of the server thread fails the test, unless one already does.
            if thread.join().is_err() && !std::thread::panicking() {
                panic!("the store server thread panicked");
            }
        }
    }
}

/// A server over a temporary directory of engine volumes, with `query`
/// (the volume options) on the data URL.
fn server(dir: &tempfile::TempDir, query: &str) -> LoopbackServer {
    LoopbackServer::start(&format!("file://{}{query}", dir.path().display()))
}

#[test]
fn remote_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, "");
    contract(&server.client());
}

#[test]
fn remote_refuses_a_transaction_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, "?capacity=128K");
    full_volume_refuses_whole_txn(&server.client());
}

#[test]
fn mem_and_remote_agree_on_random_transactions() {
    // `mem:` behind the server: this is about the protocol (the engine
    // agrees with `mem:` in its own differential run).
    let server = LoopbackServer::start("mem:");
    let mem = MemStore::new(1 << 30);
    differential(&mem, &server.client(), 0x5EED_0E0F_0BAD_CAFE, 150);
}

/// Large writes stream as stages ahead of their transaction (protocol
/// version 4): a transaction of 10 MiB of writes, more than one frame may
/// carry (`MAX_PAYLOAD`), commits, beside small inline writes, and reads
/// back whole; so do many staged transactions at once, more than the
/// server holds for a connection, which the client's staging room keeps
/// below the server's bound.
#[test]
fn large_writes_are_staged_and_read_back() {
    use crate::store::{Inode, Op, Store, Txn};
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, "");
    let client = std::sync::Arc::new(server.client());
    let body = |ino: u64, len: usize| -> Vec<u8> {
        (0..len).map(|i| (i as u64 * 31 + ino) as u8).collect()
    };
    let mut txn = Txn::new();
    txn.push(Op::PutInode(Inode::regular(100, 10 << 20)));
    txn.push(Op::Write {
        ino: 100,
        offset: 0,
        data: body(100, 5 << 20).into(),
    });
    txn.push(Op::Write {
        ino: 100,
        offset: 5 << 20,
        data: body(101, 5 << 20).into(),
    });
    txn.push(Op::PutInode(Inode::regular(101, 100)));
    txn.push(Op::Write {
        ino: 101,
        offset: 0,
        data: body(7, 100).into(),
    });
    assert!(txn.data_bytes() > u64::from(crate::net::proto::MAX_PAYLOAD));
    client.commit(txn).unwrap();
    let mut got = vec![0u8; 10 << 20];
    client.read(100, 0, &mut got).unwrap();
    assert!(got[..5 << 20] == body(100, 5 << 20)[..], "first half");
    assert!(got[5 << 20..] == body(101, 5 << 20)[..], "second half");
    let mut small = vec![0u8; 100];
    client.read(101, 0, &mut small).unwrap();
    assert_eq!(small, body(7, 100));

    // 24 threads × 4 MiB: 96 MiB staged at once at most, beyond the
    // 64 MiB a connection may hold.
    let threads: Vec<_> = (0..24u64)
        .map(|t| {
            let client = std::sync::Arc::clone(&client);
            std::thread::spawn(move || {
                let ino = 200 + t;
                let mut txn = Txn::new();
                txn.push(Op::PutInode(Inode::regular(ino, 4 << 20)));
                txn.push(Op::Write {
                    ino,
                    offset: 0,
                    data: body(ino, 4 << 20).into(),
                });
                client.commit(txn).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for ino in 200..224u64 {
        let mut got = vec![0u8; 4 << 20];
        client.read(ino, 0, &mut got).unwrap();
        assert!(got == body(ino, 4 << 20), "file {ino}");
    }
}

/// A server whose staging room (`max_staged_bytes`) is smaller than a
/// transaction's large write refuses the stage; the transaction is
/// answered `Unstaged` and the client sends it inline at once, instead of
/// staging it again until it gives up.
#[test]
fn a_server_out_of_staging_room_gets_the_transaction_inline() {
    use crate::store::{Inode, Op, Store, Txn};
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackServer::start_with(&format!("file://{}", dir.path().display()), |cfg| {
        cfg.max_staged_bytes = 256 << 10;
    });
    let client = server.client();
    let body: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7) as u8).collect();
    let mut txn = Txn::new();
    txn.push(Op::PutInode(Inode::regular(100, 1 << 20)));
    txn.push(Op::Write {
        ino: 100,
        offset: 0,
        data: body.clone().into(),
    });
    // Without the fallback every resend stages again, refused each time,
    // until the client gives up.
    client.commit(txn).unwrap();
    let mut got = vec![0u8; 1 << 20];
    client.read(100, 0, &mut got).unwrap();
    assert!(got == body);
}
