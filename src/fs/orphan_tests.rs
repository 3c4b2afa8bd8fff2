//! Orphans across a crash, on a real `file://` volume: a file unlinked
//! while the guest held it, when the daemon dies before the guest lets go
//! (no FORGET, no DESTROY), is removed when a daemon next opens the volume,
//! and the volume checks clean.

use std::ffi::CString;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{CreateIn, FsOptions};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::{FsConfig, PohmelFs};
use crate::check::volume::check_volume;
use crate::metrics::Metrics;
use crate::store::engine::VolumeReader;
use crate::store::ROOT_INO;
use crate::writeback::TxnConfig;

fn open(url: &str) -> PohmelFs {
    let metrics = Arc::new(Metrics::default());
    let wb = crate::writeback::open(url, TxnConfig::default(), metrics.clone()).unwrap();
    let fs = PohmelFs::new(wb, FsConfig::default(), metrics).unwrap();
    fs.init(FsOptions::empty()).unwrap();
    fs
}

#[test]
fn orphans_left_by_a_crash_are_reclaimed_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/vol", dir.path().display());
    let ctx = Context::new();
    let fs = open(&url);
    fs.sync_all().unwrap();
    let empty = fs.store().statfs().unwrap();
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, _, _, _) = fs
        .create(&ctx, ROOT_INO, &CString::new("f").unwrap(), args)
        .unwrap();
    let data = crate::store::WriteData::from(vec![7u8; 1 << 20]);
    let mut inode = fs.store().get_inode(e.inode).unwrap().unwrap();
    inode.size = 1 << 20;
    fs.store().write(e.inode, 0, data, inode).unwrap();
    fs.unlink(&ctx, ROOT_INO, &CString::new("f").unwrap())
        .unwrap();
    // Durable, still held: the orphan is in the volume, with its data.
    fs.sync_all().unwrap();
    let held = fs.store().statfs().unwrap();
    assert!(held.used_bytes >= empty.used_bytes + (1 << 20));
    assert_eq!(held.used_inodes, empty.used_inodes + 1);
    // The daemon goes away without the guest letting go: no FORGET, no
    // DESTROY (dropped as a crash would leave it).
    drop(fs);
    let report = check_volume(&VolumeReader::open(&url).unwrap()).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert_eq!(
        report.warnings.len(),
        1,
        "the orphan: {:#?}",
        report.warnings
    );

    let fs = open(&url);
    assert!(fs.store().get_inode(e.inode).unwrap().is_none());
    let after = fs.store().statfs().unwrap();
    assert_eq!(after.used_bytes, empty.used_bytes, "its space is back");
    assert_eq!(after.used_inodes, empty.used_inodes);
    drop(fs);
    let report = check_volume(&VolumeReader::open(&url).unwrap()).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}
