//! Issue 13 point 3 against a real `pohmelfs store` on 127.0.0.1: a guest
//! that sets 200 extended attributes of 64 KiB on one file, in one burst,
//! cannot jam the volume. Before the byte bound they joined one metadata
//! transaction of 12.8 MiB, which no frame (8.25 MiB) carries: the client
//! refused to send it, the layer retried it every second forever, and
//! everything later on that inode queued behind it. Now they split into
//! transactions that fit, and the daemon keeps serving.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use pohmelfs::fs::{FsConfig, PohmelFs};
use pohmelfs::metrics::Metrics;
use pohmelfs::store::{ROOT_INO, XATTR_VALUE_MAX};
use pohmelfs::writeback::TxnConfig;
use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{ScratchDir, StoreServer};

const SECRET: &str = "no-jam-secret";
const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
/// More than one frame's worth of 64 KiB values.
const XATTRS: usize = 200;

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn create(fs: &PohmelFs, name: &str) -> u64 {
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    fs.create(&Context::new(), ROOT_INO, &c(name), args)
        .unwrap()
        .0
        .inode
}

#[test]
fn a_burst_of_large_xattrs_does_not_jam_a_remote_volume() {
    let dir = ScratchDir::new("no-jam").expect("scratch directory");
    let data = format!("file://{}/volumes", dir.path().display());
    let server = StoreServer::start(POHMELFS, dir.path(), "store", &data, Some(SECRET))
        .expect("start store");
    let url = format!(
        "pohmel://{}/vol?secret_file={}&timeout_ms=2000&give_up_ms=30000",
        server.addr(),
        secret_file(dir.path()).display()
    );
    // The default op bound (1,024), and a linger no burst outlasts: every
    // setxattr joins the open transaction while it has room.
    let cfg = TxnConfig {
        meta_linger: Duration::from_secs(600),
        fsync_timeout: Duration::from_secs(30),
        ..TxnConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let wb = pohmelfs::writeback::open(&url, cfg, Arc::clone(&metrics)).expect("open volume");
    let fs = PohmelFs::new(wb.clone(), FsConfig::default(), Arc::clone(&metrics)).unwrap();
    fs.init(fuse_backend_rs::abi::fuse_abi::FsOptions::empty())
        .unwrap();
    let ino = create(&fs, "f");
    let ctx = Context::new();
    for i in 0..XATTRS {
        let value = vec![i as u8; XATTR_VALUE_MAX];
        fs.setxattr(&ctx, ino, &c(&format!("user.x{i:03}")), &value, 0)
            .unwrap();
    }
    // Everything reaches the server: fsync of the inode, then of all.
    fs.fsync(&ctx, ino, false, 0).unwrap();
    fs.syncfs().unwrap();
    assert_eq!(wb.unacked(), 0, "transactions left unacknowledged");
    assert_eq!(metrics.txn_oversized.get(), 0);
    // The daemon keeps serving the inode and the volume.
    let other = create(&fs, "g");
    fs.setxattr(&ctx, ino, &c("user.after"), b"1", 0).unwrap();
    fs.fsync(&ctx, other, false, 0).unwrap();
    fs.fsync(&ctx, ino, false, 0).unwrap();
    drop(fs);
    drop(wb);

    // What the server holds, through a fresh client.
    let store = pohmelfs::net::open(&url).expect("open the volume again");
    for i in [0, XATTRS / 2, XATTRS - 1] {
        let got = store
            .get_xattr(ino, format!("user.x{i:03}").as_bytes())
            .unwrap();
        assert_eq!(got, Some(vec![i as u8; XATTR_VALUE_MAX]), "xattr {i}");
    }
    assert_eq!(
        store.get_xattr(ino, b"user.after").unwrap(),
        Some(b"1".to_vec())
    );
    assert!(store.lookup(ROOT_INO, b"g").unwrap().is_some());
}
