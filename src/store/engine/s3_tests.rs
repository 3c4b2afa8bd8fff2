//! The engine against a real S3-compatible server on loopback: `moto_server`
//! (`pip install 'moto[server]'`, or `scripts/setup`), which enforces the
//! conditional puts SlateDB relies on for fencing; a read-only open reads a
//! closed volume and a held one without fencing its writer. The test starts
//! the server itself on a free port and kills it when done, pass or fail (the
//! test kit's [`Moto`]). Without `moto_server` the test fails, unless
//! `POHMELFS_SKIP_S3_TESTS=1`, which it reports as a skip.

use pohmelfs_testkit::{skip_requested, Moto, ScratchDir};

use super::conformance::{self, commit, read, write_op};
use super::{ReadOnlyVolume, SlateStore};
use crate::store::{OnceStore, Store, StoreError, Txn};

const BUCKET: &str = "pohmelfs-test";

#[test]
fn s3_volume_round_trip_and_fencing() {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the engine's S3 test") {
        return;
    }
    let dir = ScratchDir::new("s3-engine").expect("scratch directory");
    let moto = Moto::start(dir.path(), BUCKET).expect("start moto_server");

    // Round trip: the whole contract, then a reopen.
    let url = moto.url("volumes/a");
    {
        let s = SlateStore::open(&url).expect("open s3 volume");
        conformance::contract(&s);
        conformance::once_contract(&s);
        commit(&s, vec![write_op(500, 7, b"in the bucket")]);
        s.close().unwrap();
    }
    let s = SlateStore::open(&url).expect("reopen s3 volume");
    assert_eq!(read(&s, 500, 7, 13), b"in the bucket");
    assert!(s.commit_once(1, 5, Txn::new()).unwrap().duplicate);
    drop(s);
    // Read-only (`serve --readonly`): SlateDB's reader, nothing written.
    let ro = ReadOnlyVolume::open(&url).expect("open s3 volume read-only");
    assert_eq!(read(&ro, 500, 7, 13), b"in the bucket");
    assert!(matches!(ro.commit(Txn::new()), Err(StoreError::ReadOnly)));
    drop(ro);

    // Two writers on one prefix of the same bucket: the second fences the
    // first.
    let url = moto.url("volumes/b");
    let first = SlateStore::open(&url).expect("open first writer");
    commit(&first, vec![write_op(501, 0, b"first")]);
    let second = SlateStore::open(&url).expect("open second writer");
    let r = first.commit(Txn {
        ops: vec![write_op(501, 0, b"stale")],
    });
    assert!(matches!(r, Err(StoreError::Fenced)), "{r:?}");
    assert!(matches!(first.commit(Txn::new()), Err(StoreError::Fenced)));
    assert_eq!(read(&second, 501, 0, 5), b"first");
    commit(&second, vec![write_op(501, 0, b"owner")]);
    assert_eq!(read(&second, 501, 0, 5), b"owner");
    // A read-only open beside the writer fences nobody.
    let ro = ReadOnlyVolume::open(&url).expect("open held s3 volume read-only");
    assert_eq!(read(&ro, 501, 0, 5), b"owner");
    commit(&second, vec![write_op(501, 0, b"still")]);
    assert_eq!(read(&second, 501, 0, 5), b"still");
}
