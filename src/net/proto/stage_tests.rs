//! Staged writes on the wire: a stage written with vectored writes is the
//! same bytes as its encoded frame, a staged transaction carries stage ids
//! instead of bytes, and every malformed reference is refused.

use super::msg::{Request, Stage, StageRef};
use super::*;
use crate::store::{Op, Txn, WriteData};

/// A staged transaction as a server decodes it: its staged writes (one
/// per id, ops 1, 2, …) without data, after a truncate.
pub(super) fn staged_txn(ids: &[u64]) -> Request {
    let mut txn = Txn::new();
    txn.push(Op::Truncate { ino: 42, size: 0 });
    let mut staged = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        txn.push(Op::Write {
            ino: 42,
            offset: i as u64 * 65536,
            data: WriteData::new(),
        });
        staged.push(StageRef {
            op: i as u32 + 1,
            stage_id: *id,
        });
    }
    Request::StagedTxn {
        txn_id: 9,
        low_water: 4,
        txn,
        staged,
    }
}

#[tokio::test]
async fn a_stage_written_vectored_is_its_frame() {
    // Parts of several sizes, as the write-back layer's pages are.
    let parts: Vec<bytes::Bytes> = (0..300u32)
        .map(|i| bytes::Bytes::from(vec![i as u8; 1 + (i as usize * 37) % 4096]))
        .collect();
    let stage = Stage {
        stage_id: 11,
        ino: 42,
        offset: 4096,
        data: WriteData::from_parts(parts),
    };
    let mut out = Vec::new();
    write_stage(&mut out, 77, &stage).await.unwrap();
    let framed = Request::Stage(stage.clone()).to_frame(77).encode();
    assert_eq!(out, framed);
    let f = Frame::decode(&out, MAX_PAYLOAD).unwrap();
    assert_eq!(
        Request::from_frame(&f).unwrap(),
        Request::Stage(stage.clone())
    );
    // As the server takes it: the data stays in the frame's buffer.
    assert_eq!(Request::from_owned_frame(f).unwrap(), Request::Stage(stage));
}

/// A server reads a stage with its data on a page boundary (so that its
/// engine appends it `O_DIRECT`), the same stage as the frame's decode;
/// other requests and a stage whose checksum is wrong read as before.
#[tokio::test]
async fn a_server_reads_a_stage_with_its_data_page_aligned() {
    let stage = Stage {
        stage_id: 5,
        ino: 42,
        offset: 1 << 20,
        data: WriteData::from_parts([bytes::Bytes::from(vec![7u8; 256 << 10])]),
    };
    let mut wire = Vec::new();
    write_stage(&mut wire, 31, &stage).await.unwrap();
    let other = Request::GetInode { ino: 9 }.to_frame(32).encode();
    wire.extend_from_slice(&other);
    let mut r = &wire[..];
    for _ in 0..20 {
        let (id, req) = read_request(&mut &wire[..], MAX_PAYLOAD)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((id, &req), (31, &Request::Stage(stage.clone())));
        let Request::Stage(got) = req else {
            unreachable!()
        };
        let data = got.data.slices().next().unwrap();
        assert_eq!(data.as_ptr() as usize % 4096, 0, "stage data not aligned");
    }
    assert!(read_request(&mut r, MAX_PAYLOAD).await.unwrap().is_some());
    let (id, req) = read_request(&mut r, MAX_PAYLOAD).await.unwrap().unwrap();
    assert_eq!((id, req), (32, Request::GetInode { ino: 9 }));
    assert!(read_request(&mut r, MAX_PAYLOAD).await.unwrap().is_none());
    let last = wire.len() - other.len() - 1;
    wire[last] ^= 1;
    assert!(matches!(
        read_request(&mut &wire[..], MAX_PAYLOAD).await,
        Err(ProtoError::BadChecksum)
    ));
}

#[tokio::test]
async fn vectored_writes_go_on_after_a_short_write() {
    // A pipe of 1000 bytes takes a few slices at a time.
    let (mut a, mut b) = tokio::io::duplex(1000);
    let stage = Stage {
        stage_id: 1,
        ino: 42,
        offset: 0,
        data: WriteData::from_parts((0..64u8).map(|i| bytes::Bytes::from(vec![i; 333]))),
    };
    let expect = Request::Stage(stage.clone()).to_frame(5).encode();
    let writer = async move { write_stage(&mut a, 5, &stage).await.unwrap() };
    let reader = async move {
        let mut got = vec![0u8; expect.len()];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut got)
            .await
            .unwrap();
        assert_eq!(got, expect);
    };
    tokio::join!(writer, reader);
}

#[test]
fn a_staged_transaction_carries_ids_not_bytes() {
    let Request::StagedTxn {
        txn_id,
        low_water,
        mut txn,
        staged,
    } = staged_txn(&[5])
    else {
        unreachable!()
    };
    // The client's copy still holds the bytes; they stay off the wire.
    txn.ops[1] = Op::Write {
        ino: 42,
        offset: 0,
        data: vec![1u8; 100_000].into(),
    };
    let f = Request::StagedTxn {
        txn_id,
        low_water,
        txn,
        staged,
    }
    .to_frame(1);
    assert!(f.payload.len() < 100, "{} bytes", f.payload.len());
    let Request::StagedTxn { txn, staged, .. } = Request::from_frame(&f).unwrap() else {
        panic!("not a staged transaction")
    };
    assert_eq!(staged, vec![StageRef { op: 1, stage_id: 5 }]);
    assert!(matches!(&txn.ops[1], Op::Write { data, .. } if data.is_empty()));
}

#[test]
fn malformed_stages_and_references_are_refused() {
    let mut bad = vec![
        // The same stage twice.
        staged_txn(&[5, 5]),
        // No staged write at all: that is a plain transaction.
        staged_txn(&[]),
        // No data.
        Request::Stage(Stage {
            stage_id: 1,
            ino: 42,
            offset: 0,
            data: WriteData::new(),
        }),
        // Beyond the largest file offset.
        Request::Stage(Stage {
            stage_id: 1,
            ino: 42,
            offset: i64::MAX as u64,
            data: vec![1u8; 2].into(),
        }),
    ];
    // A reference to an op that is no write.
    let mut no_write = staged_txn(&[5]);
    if let Request::StagedTxn { staged, .. } = &mut no_write {
        staged[0].op = 0;
    }
    bad.push(no_write);
    for r in bad {
        let f = r.to_frame(1);
        assert!(Request::from_frame(&f).is_err(), "{r:?}");
    }
    // A stage that claims more bytes than its frame holds.
    let mut f = Request::Stage(Stage {
        stage_id: 1,
        ino: 42,
        offset: 0,
        data: vec![1u8; 10].into(),
    })
    .to_frame(1);
    let mut longer = f.clone();
    longer.payload.push(0);
    f.payload.truncate(f.payload.len() - 1);
    assert!(Request::from_frame(&f).is_err());
    assert!(Request::from_owned_frame(f).is_err());
    assert!(Request::from_frame(&longer).is_err());
    assert!(Request::from_owned_frame(longer).is_err());
    // Validation runs on the owned path too.
    let empty = Request::Stage(Stage {
        stage_id: 1,
        ino: 42,
        offset: 0,
        data: WriteData::new(),
    })
    .to_frame(1);
    assert!(matches!(
        Request::from_owned_frame(empty),
        Err(ProtoError::Invalid(_))
    ));
}

#[test]
fn a_frame_of_version_3_names_both_versions() {
    let f = Request::Statfs.to_frame(1).encode_as(3);
    let err = Frame::decode(&f, MAX_PAYLOAD).unwrap_err();
    assert!(matches!(err, ProtoError::BadVersion(3)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("version 3") && text.contains("version 4"),
        "{text}"
    );
}
