//! The memory budget end to end: many one-byte files created through the
//! filesystem layer, over the write-back layer and the embedded engine on a
//! temporary directory, with a small `--cache-size`. The caches' own
//! accounting must stay within their shares while the guest holds every
//! inode, and an inode the guest forgot must leave them: what stays per
//! inode is the lookup count of the inodes the guest still holds.

use std::ffi::CString;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::{lock, FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::{Store, ROOT_INO};
use crate::writeback::{self, MemoryBudget, TxnConfig, WritebackStore};
use pohmelfs_testkit::GuestBytes;

/// Files per directory, as the bench's files workload makes them.
const PER_DIR: usize = 100;
const DIRS: usize = 30;

/// Create `DIRS * PER_DIR` one-byte files, holding every inode (the guest
/// did not forget any); check the caches against `budget` after each
/// directory. Returns the inodes created, directories first of each batch.
fn create_files(fs: &PohmelFs, wb: &WritebackStore, budget: &MemoryBudget) -> Vec<u64> {
    let ctx = Context::new();
    let mut inodes = Vec::new();
    for d in 0..DIRS {
        let dir = fs
            .mkdir(
                &ctx,
                ROOT_INO,
                &CString::new(format!("d{d}")).unwrap(),
                0o755,
                0,
            )
            .unwrap()
            .inode;
        inodes.push(dir);
        for f in 0..PER_DIR {
            let args = CreateIn {
                flags: libc::O_RDWR as u32,
                mode: libc::S_IFREG | 0o644,
                umask: 0,
                fuse_flags: 0,
            };
            let name = CString::new(format!("f{f}")).unwrap();
            // A shell's `printf x > f`: look the name up, create, write, close.
            assert!(fs.lookup(&ctx, dir, &name).is_err());
            let (e, h, _, _) = fs.create(&ctx, dir, &name, args).unwrap();
            let h = h.unwrap();
            let mut r = GuestBytes::new(b"x".to_vec());
            fs.write(&ctx, e.inode, h, &mut r, 1, 0, None, false, 0, 0)
                .unwrap();
            fs.flush(&ctx, e.inode, h, 0).unwrap();
            fs.release(&ctx, e.inode, 0, h, false, false, None).unwrap();
            inodes.push(e.inode);
        }
        // Once acknowledged, what the caches hold is theirs to evict.
        fs.store().sync(None).unwrap();
        let u = wb.cache_usage();
        assert!(
            u.meta_bytes <= budget.meta_bytes,
            "after {} files the metadata caches hold {u:?}, over {} bytes",
            inodes.len(),
            budget.meta_bytes
        );
        assert!(u.page_bytes <= budget.page_bytes, "{u:?}");
    }
    inodes
}

#[test]
fn caches_stay_within_the_budget_and_forgotten_inodes_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/vol", dir.path().display());
    // Small enough that 3,000 files overflow every metadata share: 64 KiB
    // of metadata caches hold a few hundred attributes.
    let budget = MemoryBudget::split(512 << 10, true);
    let cfg = TxnConfig {
        cache_bytes: budget.page_bytes,
        meta_cache_bytes: budget.meta_bytes,
        engine_cache_bytes: budget.engine_bytes,
        dirty_max_bytes: budget.page_bytes / 2,
        ..TxnConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let wb = writeback::open(&url, cfg, metrics.clone()).unwrap();
    let fs = PohmelFs::new(wb.clone(), FsConfig::default(), metrics).unwrap();

    let inodes = create_files(&fs, &wb, &budget);
    let held = lock(&fs.refs).lookups.len();
    assert_eq!(held, inodes.len(), "one lookup count per inode held");
    let u = wb.cache_usage();
    assert!(
        u.attrs < inodes.len() as u64 / 4,
        "attributes were evicted to fit: {u:?}"
    );

    // The guest drops its caches: every inode is forgotten.
    let ctx = Context::new();
    fs.batch_forget(&ctx, inodes.iter().map(|&ino| (ino, 1)).collect());
    assert!(lock(&fs.refs).lookups.is_empty());
    let u = wb.cache_usage();
    assert_eq!(u.page_bytes, 0, "no clean page of a forgotten file: {u:?}");
    // Names and attributes stay, for a stat after the guest dropped its
    // caches, but within their share: forgetting adds nothing.
    assert!(
        u.meta_bytes <= budget.meta_bytes,
        "metadata caches within their share: {u:?} after {} files",
        inodes.len()
    );
    assert!(
        u.attrs < inodes.len() as u64 / 4,
        "attributes still evicted to fit: {u:?}"
    );

    // Everything is still there, read back from the store.
    let name = CString::new(format!("f{}", PER_DIR - 1)).unwrap();
    let last_dir = fs
        .lookup(
            &ctx,
            ROOT_INO,
            &CString::new(format!("d{}", DIRS - 1)).unwrap(),
        )
        .unwrap();
    let e = fs.lookup(&ctx, last_dir.inode, &name).unwrap();
    assert_eq!(e.attr.st_size, 1);
    drop(fs);
    wb.sync(None).unwrap();
}
