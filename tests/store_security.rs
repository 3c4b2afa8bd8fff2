//! The store server's defences (issue 13 point 2, `docs/security.md`), each against a real
//! `pohmelfs store` process on loopback: no start without authentication off loopback, wrong
//! and missing secrets, per-volume credentials, TLS with a CA file or a pinned certificate,
//! server-issued sessions, handshake frame size, old protocol versions, and the connection,
//! handshake, volume and idle limits.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use pohmelfs::net::proto::msg::{ErrorCode, Request, Response};
use pohmelfs::net::proto::{Frame, HEADER_LEN, VERSION};
use pohmelfs::store::{Inode, Op, Txn};
use pohmelfs_testkit::{wait_until, ChildGuard, ScratchDir, StoreServer};
use raw::Raw;
use sha2::{Digest, Sha256};

#[path = "support/raw.rs"]
mod raw;

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const ALICE: &str = "alice-secret-0123456789";
const BOB: &str = "bob-secret-0123456789ab";
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

fn workdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("sec-{name}")).expect("scratch directory")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A server with the credentials alice (volume `a`) and bob (volume `b`), and `extra` options.
fn server_with(dir: &ScratchDir, name: &str, extra: &[&str]) -> StoreServer {
    let creds = write(
        dir.path(),
        "credentials",
        &format!("# name volumes secret\nalice a {ALICE}\nbob b,shared {BOB}\n"),
    );
    let mut args = vec!["--credentials-file", &creds];
    args.extend_from_slice(extra);
    StoreServer::start_with(POHMELFS, dir.path(), name, "mem:", None, &args).unwrap()
}

/// `pohmel://ADDR/VOLUME?credential=..&secret_file=..` plus `query`.
fn url(dir: &ScratchDir, addr: &str, volume: &str, who: &str, secret: &str, query: &str) -> String {
    let file = write(dir.path(), &format!("{who}.secret"), secret);
    format!(
        "pohmel://{addr}/{volume}?credential={who}&secret_file={file}&timeout_ms=5000\
         &give_up_ms=0{query}"
    )
}

fn open_err(url: &str) -> String {
    match pohmelfs::net::open(url) {
        Ok(_) => panic!("{url}: opened, expected a refusal"),
        Err(e) => pohmelfs::ErrorChain(&e).to_string(),
    }
}

fn txn(ino: u64) -> Txn {
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, 0)));
    t
}

#[test]
fn a_server_without_credentials_refuses_to_listen_beyond_loopback() {
    let dir = workdir("noauth");
    let addr_file = dir.path().join("addr");
    let child = Command::new(POHMELFS)
        .args([
            "store",
            "--listen",
            "0.0.0.0:0",
            "--data",
            "mem:",
            "--addr-file",
        ])
        .arg(&addr_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let status = wait_until(WAIT, POLL, || child.0.try_wait().unwrap()).expect("the server exits");
    assert!(!status.success());
    assert!(!addr_file.exists(), "it listened");
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("without authentication"), "{err}");
    // On loopback it starts, and says that anyone local can use it.
    let server = StoreServer::start(POHMELFS, dir.path(), "lo", "mem:", None).unwrap();
    let url = format!("pohmel://{}/v?give_up_ms=0", server.addr());
    pohmelfs::net::open(&url).unwrap().commit(txn(100)).unwrap();
    assert!(server.log_text().contains("no credentials"));
}

#[test]
fn missing_and_wrong_secrets_and_ungranted_volumes_are_refused() {
    let dir = workdir("creds");
    let server = server_with(&dir, "s", &[]);
    let addr = server.addr();
    // No secret at all.
    let e = open_err(&format!("pohmel://{addr}/a?give_up_ms=0"));
    assert!(e.contains("AuthFailed"), "{e}");
    // alice's name with bob's secret, and a name the server does not know.
    let e = open_err(&url(&dir, addr, "a", "alice", BOB, ""));
    assert!(
        e.contains("AuthFailed") && e.contains("authentication failed"),
        "{e}"
    );
    let e = open_err(&url(&dir, addr, "a", "mallory", ALICE, ""));
    assert!(e.contains("authentication failed"), "{e}");
    // The right secret opens only the volumes it grants.
    let e = open_err(&url(&dir, addr, "b", "alice", ALICE, ""));
    assert!(e.contains("does not grant volume b"), "{e}");
    let a = pohmelfs::net::open(&url(&dir, addr, "a", "alice", ALICE, "")).unwrap();
    a.commit(txn(100)).unwrap();
    let b = pohmelfs::net::open(&url(&dir, addr, "shared", "bob", BOB, "")).unwrap();
    b.commit(txn(101)).unwrap();
    let log = server.log_text();
    for secret in [ALICE, BOB] {
        assert!(!log.contains(secret), "a secret in the log:\n{log}");
    }
}

/// Claim the volume and send transaction 1 of the connection's session (creating inode `ino`)
/// and require its ack, as a first apply or as a `duplicate`.
fn send_txn_1(raw: &mut Raw, ino: u64, duplicate: bool) {
    // The session writes as the volume's claimed writer (taken over: the
    // test's sessions follow one another while the earlier ones live).
    let claimed = raw.call(&Request::TakeOver);
    assert!(matches!(claimed, Response::Claimed { .. }), "{claimed:?}");
    let ack = raw.call(&Request::Txn {
        txn_id: 1,
        low_water: 1,
        txn: txn(ino),
    });
    assert!(
        matches!(ack, Response::TxnAck { duplicate: d, .. } if d == duplicate),
        "{ack:?}"
    );
}

#[test]
fn a_session_is_resumed_only_with_its_own_ticket() {
    let dir = workdir("sessions");
    let server = server_with(&dir, "s", &[]);
    let addr = server.addr();
    let mut first = Raw::resume(addr, "bob", BOB, (0, [0; 32]), "shared").unwrap();
    let mine = first.session;
    assert_ne!(mine.0, 0, "the server issued a session");
    send_txn_1(&mut first, 200, false);
    // Another client of the same credential, naming that session without its ticket.
    let (code, why) = Raw::resume(addr, "bob", BOB, (mine.0, [0; 32]), "shared")
        .err()
        .expect("a session resumed without its ticket");
    assert_eq!(code, ErrorCode::AuthFailed);
    assert!(why.contains("ticket not valid"), "{why}");
    // The ticket is for bob's session on `shared`: not for another volume.
    let e = Raw::resume(addr, "alice", ALICE, mine, "a")
        .err()
        .expect("refused");
    assert!(e.1.contains("ticket not valid"), "{e:?}");
    // With its ticket, on a new connection, the session is the same: a resend is a duplicate.
    drop(first);
    let mut again = Raw::resume(addr, "bob", BOB, mine, "shared").unwrap();
    assert_eq!(again.session.0, mine.0);
    send_txn_1(&mut again, 200, true);
    // A new session's id 1 is another transaction.
    let mut other = Raw::resume(addr, "bob", BOB, (0, [0; 32]), "shared").unwrap();
    assert_ne!(other.session.0, mine.0);
    send_txn_1(&mut other, 201, false);
}

#[test]
fn handshake_frames_are_capped_before_they_are_read() {
    let dir = workdir("bigframe");
    let server = server_with(&dir, "s", &[]);
    // A hello claiming 1 MiB of payload (well under the 8.25 MiB of requests): the header
    // alone is refused, without waiting for the payload that never comes.
    let mut frame = Request::Statfs.to_frame(1).encode();
    frame[5] = 1; // Hello
    frame[16..20].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let mut raw = Raw::open(server.addr());
    raw.send_bytes(&frame[..HEADER_LEN]);
    match raw.recv() {
        Some(Response::Error {
            code: ErrorCode::BadRequest,
            message,
        }) => assert!(message.contains("limit of 4096"), "{message}"),
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

#[test]
fn a_peer_of_protocol_version_1_is_told_both_versions() {
    told_both_versions("oldpeer", 1);
}

/// Version 4 staged writes: a version-3 client (no stages) is refused at
/// its hello, told both versions.
#[test]
fn a_peer_of_protocol_version_3_is_told_both_versions() {
    told_both_versions("v3peer", 3);
}

/// A hello framed as protocol `version` is answered `Error(Version)` in a
/// frame of that version, naming both versions.
fn told_both_versions(name: &str, version: u8) {
    let dir = workdir(name);
    let server = server_with(&dir, "s", &[]);
    let mut hello = Request::Statfs.to_frame(1);
    hello.opcode = 1;
    hello.payload = vec![1; 40];
    let mut raw = Raw::open(server.addr());
    raw.send_bytes(&hello.encode_as(version));
    let mut header = [0u8; HEADER_LEN];
    raw.stream.read_exact(&mut header).unwrap();
    assert_eq!(
        header[4], version,
        "the answer is framed as the peer's version"
    );
    let len = u32::from_le_bytes(header[16..20].try_into().unwrap()) as usize;
    let mut payload = vec![0; len];
    raw.stream.read_exact(&mut payload).unwrap();
    let err = Response::from_frame(&Frame {
        opcode: header[5],
        flags: 0,
        request_id: 0,
        payload,
    })
    .unwrap();
    let Response::Error {
        code: ErrorCode::Version,
        message,
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(
        message.contains(&format!("version {version}"))
            && message.contains(&format!("version {VERSION}")),
        "{message}"
    );
}

/// A CA, a server certificate it signed for 127.0.0.1, and another CA: PEM files in `dir`.
struct Pki {
    ca: String,
    other_ca: String,
    cert: String,
    key: String,
    cert_sha256: String,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca_cert, ca_key) = ca("pohmelfs test CA");
    let (other, _) = ca("another CA");
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let hex: String = Sha256::digest(cert.der())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Pki {
        ca: write(dir, "ca.pem", &ca_cert.pem()),
        other_ca: write(dir, "other-ca.pem", &other.pem()),
        cert: write(dir, "server.pem", &cert.pem()),
        key: write(dir, "server.key", &key.serialize_pem()),
        cert_sha256: format!("sha256:{hex}"),
    }
}

#[test]
fn tls_clients_verify_the_server_by_ca_or_pin() {
    let dir = workdir("tls");
    let pki = pki(dir.path());
    let server = server_with(&dir, "s", &["--tls-cert", &pki.cert, "--tls-key", &pki.key]);
    let addr = server.addr();
    let with = |q: &str| url(&dir, addr, "a", "alice", ALICE, q);
    // The right CA and the right pin both connect: the first commits (the
    // volume's writer), the second reads what it wrote.
    let s = pohmelfs::net::open(&with(&format!("&tls_ca={}", pki.ca))).unwrap();
    s.commit(txn(100)).unwrap();
    let r = pohmelfs::net::open_reader(&with(&format!("&tls_pin={}", pki.cert_sha256))).unwrap();
    assert!(r.get_inode(100).unwrap().is_some());
    // Another CA, another pin, or a name the certificate does not carry: refused.
    let e = open_err(&with(&format!("&tls_ca={}", pki.other_ca)));
    assert!(e.contains("TLS handshake failed"), "{e}");
    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let e = open_err(&with(&format!("&tls_pin={wrong_pin}")));
    assert!(e.contains("TLS handshake failed"), "{e}");
    let e = open_err(&with(&format!("&tls_ca={}&tls_name=store.example", pki.ca)));
    assert!(e.contains("TLS handshake failed"), "{e}");
    // A plaintext client is told the server wants TLS.
    let e = open_err(&with(""));
    assert!(e.contains("requires TLS"), "{e}");
    // A TLS client of a plaintext server fails cleanly too.
    let plain = server_with(&dir, "plain", &[]);
    let e = open_err(&url(
        &dir,
        plain.addr(),
        "a",
        "alice",
        ALICE,
        &format!("&tls_ca={}", pki.ca),
    ));
    assert!(e.contains("TLS handshake failed"), "{e}");
}

#[test]
fn connection_and_volume_limits_give_clear_errors() {
    let dir = workdir("limits");
    let creds_all = write(dir.path(), "all", &format!("ops * {ALICE}\n"));
    let server = StoreServer::start_with(
        POHMELFS,
        dir.path(),
        "s",
        "mem:",
        None,
        &[
            "--credentials-file",
            &creds_all,
            "--max-volumes",
            "1",
            "--max-connections",
            "2",
            "--max-handshakes",
            "4",
            "--max-connections-per-peer",
            "32",
            // The idle peers below must hold their handshake slots however
            // slowly a loaded machine runs this test.
            "--handshake-timeout-secs",
            "3600",
        ],
    )
    .unwrap();
    let addr = server.addr();
    let ops = |volume: &str| Raw::resume(addr, "ops", ALICE, (0, [0; 32]), volume);
    let _one = ops("v1").unwrap();
    // One volume at most.
    let e = ops("v2").err().expect("a second volume");
    assert_eq!(e.0, ErrorCode::NoSuchVolume);
    assert!(e.1.contains("at most 1 volumes"), "{e:?}");
    // Three peers that never authenticate hold handshake slots, not connection slots.
    // A refused attempt's handshake slot comes back when the server's task
    // for it ends, which may be after the client read the refusal: an
    // attempt that meets such a lingering slot is tried again. Its refusal
    // may also be lost: the server closes a refused connection whose hello
    // it never read, and the reset can overtake the refusal frame.
    let lingering = |e: &(ErrorCode, String)| {
        e.1.contains("handshakes in progress") || e.1.contains("closed without answering")
    };
    let idle: Vec<Raw> = (0..3).map(|_| Raw::open(addr)).collect();
    let _two = wait_until(WAIT, POLL, || match ops("v1") {
        Ok(raw) => Some(raw),
        Err(e) if lingering(&e) => None,
        Err(e) => panic!("{e:?}"),
    })
    .expect("a second connection");
    // Two authenticated connections at most.
    let e = wait_until(WAIT, POLL, || {
        let e = ops("v1").err().expect("a third connection");
        (!lingering(&e)).then_some(e)
    })
    .expect("a refusal that is not about handshakes");
    assert_eq!(e.0, ErrorCode::Busy);
    assert!(e.1.contains("connection limit of 2"), "{e:?}");
    // Handshake slots: three idle peers and a fourth that is answered a
    // challenge fill the four; a fifth is refused.
    let _fourth = wait_until(WAIT, POLL, || {
        let mut raw = Raw::open(addr);
        let hello = raw::hello("ops", (0, [0; 32]), "v1");
        matches!(raw.try_call(&hello), Some(Response::Challenge { .. })).then_some(raw)
    })
    .expect("a fourth handshake under way");
    let mut fifth = Raw::open(addr);
    match fifth.recv() {
        Some(Response::Error {
            code: ErrorCode::Busy,
            message,
        }) => assert!(message.contains("handshakes in progress"), "{message}"),
        other => panic!("{other:?}"),
    }
    drop((idle, _fourth, fifth));
}

#[test]
fn connections_per_peer_are_limited() {
    let dir = workdir("perpeer");
    let server = server_with(&dir, "s", &["--max-connections-per-peer", "2"]);
    let addr = server.addr();
    let _a = Raw::resume(addr, "alice", ALICE, (0, [0; 32]), "a").unwrap();
    let _b = Raw::open(addr);
    let mut c = Raw::open(addr);
    match c.recv() {
        Some(Response::Error {
            code: ErrorCode::Busy,
            message,
        }) => assert!(message.contains("per address"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Slots come back when connections close.
    drop((_a, _b, c));
    wait_until(WAIT, POLL, || {
        Raw::resume(addr, "alice", ALICE, (0, [0; 32]), "a")
            .ok()
            .map(|_| ())
    })
    .expect("a slot again");
}

#[test]
fn idle_connections_close_and_the_client_reconnects() {
    let dir = workdir("idle");
    let server = server_with(&dir, "s", &["--idle-timeout-secs", "1"]);
    let addr = server.addr();
    let mut raw = Raw::resume(addr, "alice", ALICE, (0, [0; 32]), "a").unwrap();
    // The server closes the idle connection: end of stream, no answer.
    let closed = std::time::Instant::now();
    assert!(raw.recv().is_none(), "the idle connection was closed");
    assert!(
        closed.elapsed() < Duration::from_secs(10),
        "closed by the idle timeout of 1 s, not the test's read timeout"
    );
    wait_until(WAIT, POLL, || server.log_text().contains("idle for"))
        .expect("the server logs why it closed");
    // The real client reconnects (resuming its session) on its next request.
    let s =
        pohmelfs::net::open(&url(&dir, addr, "a", "alice", ALICE, "&give_up_ms=30000")).unwrap();
    s.commit(txn(300)).unwrap();
    wait_until(WAIT, POLL, || {
        server.log_text().matches("idle for").count() >= 2
    })
    .expect("the client's connection went idle too");
    s.commit(txn(301)).unwrap();
    assert!(s.get_inode(301).unwrap().is_some());
}
