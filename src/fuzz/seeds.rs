//! Seed inputs of the wire and engine targets: well-formed messages and
//! records, so the fuzzer starts from bytes the decoders accept (the FUSE
//! target's are in `device/fuzz/seeds.rs`). `scripts/fuzz` writes them into
//! each target's corpus before a run.

use bytes::Bytes;

use crate::net::proto::msg::{Request, Response, Stage, StageRef, NONCE_LEN, TICKET_LEN};
use crate::net::proto::Frame;
use crate::store::engine::fuzz::record_seeds;
use crate::store::{Dirent, FileKind, Inode, Op, Timestamp, Txn, WriteData};

/// One frame item of the shared frame input format (`frames.rs`).
fn item(f: &Frame) -> Vec<u8> {
    let mut v = vec![0, f.opcode];
    v.extend_from_slice(&(f.payload.len() as u16).to_le_bytes());
    v.extend_from_slice(&f.payload);
    v
}

fn hello() -> Request {
    Request::Hello {
        version: crate::net::proto::VERSION,
        credential: crate::net::credentials::DEFAULT_CREDENTIAL.into(),
        // A new session: the server issues it.
        session: 0,
        ticket: [0; TICKET_LEN],
        volume: "v".into(),
        client_nonce: [1; NONCE_LEN],
        max_payload: 1 << 20,
        max_in_flight: 4,
    }
}

/// A transaction that creates a file with data, an entry and an xattr.
fn txn() -> Request {
    let ino = 1 << 20;
    let t = Timestamp { sec: 1, nsec: 2 };
    let inode = Inode {
        ino,
        kind: FileKind::Regular,
        perm: 0o644,
        uid: 0,
        gid: 0,
        nlink: 1,
        size: 5,
        rdev: 0,
        atime: t,
        mtime: t,
        ctime: t,
        parent: 1,
    };
    let mut txn = Txn::new();
    txn.push(Op::PutInode(inode))
        .push(Op::PutDirent {
            parent: 1,
            dirent: Dirent {
                name: b"f".to_vec(),
                ino,
                kind: FileKind::Regular,
                cookie: 3,
            },
        })
        .push(Op::Write {
            ino,
            offset: 0,
            data: WriteData::from_parts([Bytes::from_static(b"hello")]),
        })
        .push(Op::SetXattr {
            ino,
            name: b"user.a".to_vec(),
            value: b"b".to_vec(),
        });
    Request::Txn {
        txn_id: 1,
        low_water: 0,
        txn,
    }
}

/// A stage of five more bytes of the file, and the staged transaction
/// that appends them (protocol version 4).
fn staged() -> [Request; 2] {
    let (ino, offset) = (1 << 20, 5);
    let mut txn = Txn::new();
    txn.push(Op::Write {
        ino,
        offset,
        data: WriteData::new(),
    });
    [
        Request::Stage(Stage {
            stage_id: 1,
            ino,
            offset,
            data: WriteData::from_parts([Bytes::from_static(b"world")]),
        }),
        Request::StagedTxn {
            txn_id: 2,
            low_water: 1,
            txn,
            staged: vec![StageRef { op: 0, stage_id: 1 }],
        },
    ]
}

/// Requests after the handshake: the writer claim, a transaction and a
/// staged one, then reads of what they did.
fn requests() -> Vec<Request> {
    let [stage, staged_txn] = staged();
    vec![
        Request::Claim,
        txn(),
        stage,
        staged_txn,
        Request::Lookup {
            parent: 1,
            name: b"f".to_vec(),
        },
        Request::GetInode { ino: 1 << 20 },
        Request::Read {
            ino: 1 << 20,
            offset: 0,
            len: 4096,
        },
        Request::Readdir {
            parent: 1,
            after: 0,
            max: 16,
        },
        Request::ListXattr { ino: 1 << 20 },
        Request::Statfs,
        Request::ReserveIds { count: 16 },
    ]
}

/// Seeds of the `wire_frames` target: requests and responses.
pub fn wire_frames() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = std::iter::once(hello())
        .chain(requests())
        .map(|r| item(&r.to_frame(1)))
        .collect();
    let responses = [
        Response::Challenge {
            server_nonce: [2; NONCE_LEN],
        },
        Response::Welcome {
            proof: [3; 32],
            session: 7,
            ticket: [4; TICKET_LEN],
            epoch: 1,
            max_payload: 1 << 20,
            max_in_flight: 4,
        },
        Response::Data(b"hello".to_vec().into()),
        Response::Names(vec![b"user.a".to_vec()]),
    ];
    out.extend(responses.iter().map(|r| item(&r.to_frame(1))));
    out
}

/// Seeds of the `handshake` target: a hello answered with the right proof,
/// then requests.
pub fn handshake() -> Vec<Vec<u8>> {
    let mut full = vec![1 | 1 << 1];
    full.extend(item(&hello().to_frame(1)));
    for (i, r) in requests().iter().enumerate() {
        full.extend(item(&r.to_frame(i as u64 + 2)));
    }
    let mut unanswered = vec![0];
    unanswered.extend(item(&hello().to_frame(1)));
    vec![full, unanswered]
}

/// Seeds of the `engine_decode` target.
pub fn engine_decode() -> Vec<Vec<u8>> {
    record_seeds()
}
