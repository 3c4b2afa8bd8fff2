//! Frame and message tests: round trips, and every way a hostile peer can
//! break a frame (truncation, bad magic, version, checksum, oversize lengths,
//! lying counts) answered with an error, never a panic.

use super::msg::{ErrorCode, Request, Response};
use super::*;
use crate::store::{Dirent, FileKind, Inode, Op, StoreStats, Timestamp, Txn};

fn inode() -> Inode {
    Inode {
        ino: 42,
        kind: FileKind::Regular,
        perm: 0o644,
        uid: 1,
        gid: 2,
        nlink: 1,
        size: 10,
        rdev: 0,
        atime: Timestamp { sec: 1, nsec: 2 },
        mtime: Timestamp { sec: 3, nsec: 4 },
        ctime: Timestamp { sec: 5, nsec: 6 },
        parent: 0,
    }
}

fn sample_txn() -> Txn {
    let mut t = Txn::new();
    t.push(Op::PutInode(inode()));
    t.push(Op::PutDirent {
        parent: 1,
        dirent: Dirent {
            name: b"f".to_vec(),
            ino: 42,
            kind: FileKind::Regular,
            cookie: 99,
        },
    });
    t.push(Op::Write {
        ino: 42,
        offset: 0,
        data: vec![7; 100].into(),
    });
    t.push(Op::Truncate { ino: 42, size: 5 });
    t.push(Op::PunchHole {
        ino: 42,
        offset: 1,
        len: 2,
    });
    t.push(Op::SetSymlink {
        ino: 43,
        target: b"/x".to_vec(),
    });
    t.push(Op::SetXattr {
        ino: 42,
        name: b"user.a".to_vec(),
        value: b"v".to_vec(),
    });
    t.push(Op::RemoveXattr {
        ino: 42,
        name: b"user.a".to_vec(),
    });
    t.push(Op::RemoveDirent {
        parent: 1,
        name: b"f".to_vec(),
    });
    t.push(Op::RemoveInode { ino: 42 });
    t
}

fn requests() -> Vec<Request> {
    vec![
        Request::Hello {
            version: VERSION,
            credential: "alice".into(),
            session: 9,
            ticket: [5; 32],
            volume: "vol-1".into(),
            client_nonce: [3; 32],
            max_payload: MAX_PAYLOAD,
            max_in_flight: 64,
        },
        Request::Auth { proof: [4; 32] },
        Request::Txn {
            txn_id: 5,
            low_water: 3,
            txn: sample_txn(),
        },
        Request::GetInode { ino: 1 },
        Request::Lookup {
            parent: 1,
            name: b"name".to_vec(),
        },
        Request::Readdir {
            parent: 1,
            after: 0,
            max: 128,
        },
        Request::Read {
            ino: 42,
            offset: 4096,
            len: 65536,
        },
        Request::NextData { ino: 42, offset: 0 },
        Request::NextHole { ino: 42, offset: 0 },
        Request::Readlink { ino: 43 },
        Request::GetXattr {
            ino: 42,
            name: b"user.a".to_vec(),
        },
        Request::ListXattr { ino: 42 },
        Request::Statfs,
        Request::ReserveIds { count: 4096 },
        Request::ReclaimOrphans {
            spare: vec![17, 1 << 40],
        },
        Request::ReclaimOrphans { spare: vec![] },
        Request::Claim,
        Request::Stage(super::msg::Stage {
            stage_id: 3,
            ino: 42,
            offset: 8192,
            data: vec![9u8; 5000].into(),
        }),
        super::stage_tests::staged_txn(&[7, 8]),
        Request::TakeOver,
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response::Challenge {
            server_nonce: [1; 32],
        },
        Response::Welcome {
            proof: [2; 32],
            session: 0x1234,
            ticket: [6; 32],
            epoch: 77,
            max_payload: MAX_PAYLOAD,
            max_in_flight: 16,
        },
        Response::error(ErrorCode::Fenced, "fenced"),
        Response::TxnAck {
            txn_id: 5,
            duplicate: true,
            epoch: 77,
        },
        Response::Inode(Some(inode())),
        Response::Inode(None),
        Response::Dirent(Some(Dirent {
            name: b"x".to_vec(),
            ino: 3,
            kind: FileKind::Directory,
            cookie: 17,
        })),
        Response::Dirents(vec![Dirent {
            name: b"x".to_vec(),
            ino: 3,
            kind: FileKind::Symlink,
            cookie: 17,
        }]),
        Response::Data(vec![1, 2, 3].into()),
        Response::Offset(Some(5)),
        Response::Offset(None),
        Response::Bytes(Some(b"abc".to_vec())),
        Response::Names(vec![b"user.a".to_vec(), b"user.b".to_vec()]),
        Response::Stats(StoreStats {
            capacity_bytes: 1,
            used_bytes: 2,
            capacity_inodes: 3,
            used_inodes: 4,
        }),
        Response::Ids { first: 4096 },
        Response::Removed { count: 3 },
        Response::Claimed { claim: 2 },
        Response::error(ErrorCode::NotWriter, "claimed by another session"),
        Response::Staged { stage_id: 3 },
        Response::error(ErrorCode::Unstaged, "stage 3 is not held"),
        Response::error(ErrorCode::WriterAlive, "session 1 from 10.0.0.1:7 is alive"),
        Response::error(ErrorCode::WriterAway, "the writer has 900 ms to reconnect"),
    ]
}

#[test]
fn every_message_round_trips_through_a_frame() {
    for (i, r) in requests().into_iter().enumerate() {
        let bytes = r.to_frame(i as u64).encode();
        let f = Frame::decode(&bytes, MAX_PAYLOAD).unwrap();
        assert_eq!(f.request_id, i as u64);
        assert_eq!(Request::from_frame(&f).unwrap(), r);
    }
    for r in responses() {
        let f = Frame::decode(&r.to_frame(1).encode(), MAX_PAYLOAD).unwrap();
        assert_eq!(Response::from_frame(&f).unwrap(), r);
        assert_eq!(Response::from_owned_frame(f).unwrap(), r);
    }
}

/// A Data answer keeps its frame's payload; one whose byte string is
/// cut short, longer than its limit or followed by more is refused.
#[test]
fn a_data_answer_is_checked_before_it_is_kept() {
    let f = Response::Data(vec![5; 100].into()).to_frame(1);
    let mut short = f.clone();
    short.payload.truncate(50);
    let mut trailing = f.clone();
    trailing.payload.push(0);
    let mut huge = f.clone();
    huge.payload[..4].copy_from_slice(&(MAX_READ + 1).to_le_bytes());
    for bad in [short, trailing, huge] {
        assert!(Response::from_owned_frame(bad).is_err());
    }
    let Response::Data(d) = Response::from_owned_frame(f).unwrap() else {
        panic!("not data");
    };
    assert_eq!(d.as_ref(), &[5; 100][..]);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    for r in requests() {
        let bytes = r.to_frame(1).encode();
        for cut in 0..bytes.len() {
            assert!(
                Frame::decode(&bytes[..cut], MAX_PAYLOAD).is_err(),
                "{r:?} cut at {cut}"
            );
        }
        // A payload cut short but with a matching header and checksum still
        // fails to decode as a message.
        let f = r.to_frame(1);
        for cut in 0..f.payload.len() {
            let short = Frame {
                payload: f.payload[..cut].to_vec(),
                ..f.clone()
            };
            assert!(
                Request::from_frame(&short).is_err(),
                "{r:?} payload cut at {cut}"
            );
        }
    }
}

#[test]
fn corrupted_frames_are_refused() {
    let good = Request::GetInode { ino: 1 }.to_frame(7).encode();
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 1;
    assert!(matches!(
        Frame::decode(&bad_magic, MAX_PAYLOAD),
        Err(ProtoError::BadMagic(_))
    ));
    let mut bad_version = good.clone();
    bad_version[4] = 99;
    assert!(matches!(
        Frame::decode(&bad_version, MAX_PAYLOAD),
        Err(ProtoError::BadVersion(99))
    ));
    for i in [5, 8, 20, HEADER_LEN] {
        let mut flipped = good.clone();
        flipped[i] ^= 0x40;
        assert!(
            matches!(
                Frame::decode(&flipped, MAX_PAYLOAD),
                Err(ProtoError::BadChecksum)
            ),
            "byte {i}"
        );
    }
    let mut huge = good.clone();
    huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Frame::decode(&huge, MAX_PAYLOAD),
        Err(ProtoError::TooLarge(..))
    ));
}

#[test]
fn lying_lengths_and_counts_do_not_allocate() {
    // A readdir reply that claims four billion entries in a few bytes.
    let mut payload = u32::MAX.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0; 8]);
    let f = Frame {
        opcode: 162,
        flags: 0,
        request_id: 1,
        payload,
    };
    assert!(matches!(
        Response::from_frame(&f),
        Err(ProtoError::Malformed(_))
    ));
    // A lookup whose name claims a gigabyte.
    let mut payload = 1u64.to_le_bytes().to_vec();
    payload.extend_from_slice(&(1u32 << 30).to_le_bytes());
    let f = Frame {
        opcode: 33,
        flags: 0,
        request_id: 1,
        payload,
    };
    assert!(matches!(
        Request::from_frame(&f),
        Err(ProtoError::Malformed(_))
    ));
    // A transaction that claims more ops than its bytes can hold.
    let mut payload = 5u64.to_le_bytes().to_vec();
    payload.extend_from_slice(&0u64.to_le_bytes());
    payload.extend_from_slice(&1000u32.to_le_bytes());
    let f = Frame {
        opcode: 16,
        flags: 0,
        request_id: 1,
        payload,
    };
    assert!(matches!(
        Request::from_frame(&f),
        Err(ProtoError::Malformed(_))
    ));
}

#[test]
fn invalid_requests_are_refused_by_validation() {
    let bad = [
        Request::Hello {
            version: 1,
            credential: "default".into(),
            session: 1,
            ticket: [0; 32],
            volume: "../etc".into(),
            client_nonce: [0; 32],
            max_payload: MAX_PAYLOAD,
            max_in_flight: 1,
        },
        Request::Hello {
            version: 1,
            credential: "default".into(),
            session: 1,
            ticket: [0; 32],
            volume: "".into(),
            client_nonce: [0; 32],
            max_payload: MAX_PAYLOAD,
            max_in_flight: 1,
        },
        Request::Hello {
            version: 1,
            credential: "a/b".into(),
            session: 1,
            ticket: [0; 32],
            volume: "vol".into(),
            client_nonce: [0; 32],
            max_payload: MAX_PAYLOAD,
            max_in_flight: 1,
        },
        Request::Txn {
            txn_id: 0,
            low_water: 0,
            txn: sample_txn(),
        },
        Request::Txn {
            txn_id: 5,
            low_water: 6,
            txn: sample_txn(),
        },
        Request::Txn {
            txn_id: 5,
            low_water: 0,
            txn: Txn::new(),
        },
        Request::Lookup {
            parent: 1,
            name: b"a/b".to_vec(),
        },
        Request::Readdir {
            parent: 1,
            after: 0,
            max: 0,
        },
        Request::Read {
            ino: 1,
            offset: u64::MAX,
            len: 10,
        },
        Request::Read {
            ino: 1,
            offset: 0,
            len: MAX_READ + 1,
        },
        Request::ReserveIds { count: 0 },
        Request::ReclaimOrphans {
            spare: vec![1; crate::net::proto::msg::MAX_SPARE + 1],
        },
    ];
    for r in bad {
        let f = r.to_frame(1);
        assert!(
            matches!(Request::from_frame(&f), Err(ProtoError::Invalid(_))),
            "{r:?}"
        );
    }
    let mut t = Txn::new();
    t.push(Op::PutDirent {
        parent: 1,
        dirent: Dirent {
            name: b"..".to_vec(),
            ino: 2,
            kind: FileKind::Regular,
            cookie: 20,
        },
    });
    let f = Request::Txn {
        txn_id: 1,
        low_water: 0,
        txn: t,
    }
    .to_frame(1);
    assert!(Request::from_frame(&f).is_err());
}

#[test]
fn unknown_opcodes_and_trailing_bytes_are_refused() {
    let f = Frame {
        opcode: 250,
        flags: 0,
        request_id: 1,
        payload: vec![],
    };
    assert!(matches!(
        Request::from_frame(&f),
        Err(ProtoError::UnknownOpcode(250))
    ));
    let mut f = Request::GetInode { ino: 1 }.to_frame(1);
    f.payload.push(0);
    assert!(matches!(
        Request::from_frame(&f),
        Err(ProtoError::Malformed(_))
    ));
}

#[tokio::test]
async fn frames_stream_over_a_pipe() {
    let (mut a, mut b) = tokio::io::duplex(1 << 20);
    for r in requests() {
        write_frame(&mut a, &r.to_frame(3)).await.unwrap();
    }
    drop(a);
    let mut n = 0;
    while let Some(f) = read_frame(&mut b, MAX_PAYLOAD).await.unwrap() {
        Request::from_frame(&f).unwrap();
        n += 1;
    }
    assert_eq!(n, requests().len());
}

#[test]
fn write_data_in_parts_encodes_as_its_bytes() {
    use crate::store::WriteData;
    use bytes::Bytes;
    let whole: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let parts = WriteData::from_parts(whole.chunks(4096).map(Bytes::copy_from_slice));
    assert_eq!(parts.parts().len(), 3);
    let op = |data: WriteData| Op::Write {
        ino: 42,
        offset: 4096,
        data,
    };
    let mut split = codec::Enc::default();
    split.op(&op(parts.clone()));
    let mut joined = codec::Enc::default();
    joined.op(&op(whole.clone().into()));
    assert_eq!(split.buf, joined.buf, "the wire format does not change");
    let decoded = codec::Dec::new(&split.buf).op().unwrap();
    assert_eq!(decoded, op(parts));
}

/// A spare count larger than the payload holds is refused before
/// anything is allocated for it.
#[test]
fn a_spare_count_beyond_the_payload_is_refused() {
    let mut f = Request::ReclaimOrphans { spare: vec![] }.to_frame(1);
    f.payload = 60_000u32.to_le_bytes().to_vec();
    assert!(matches!(
        Request::from_frame(&f),
        Err(ProtoError::Invalid(_))
    ));
}
