//! A cold read of acknowledged data on a `file://` volume reaches the guest
//! as file ranges (`write_from`), with no buffer of the read's size.

use std::ffi::CString;
use std::io::{self, Write};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;

use super::{FsConfig, PohmelFs};
use crate::device::alloc_probe::largest_allocation;
use crate::metrics::Metrics;
use crate::store::engine::conformance::{commit, read, temp_volume, write_op};
use crate::store::{Store, ROOT_INO};
use pohmelfs_testkit::GuestBytes;

/// A guest writer that records `write_from` calls and byte writes.
#[derive(Default)]
struct Recording {
    from_file: Vec<(usize, u64)>,
    bytes: usize,
    cap: usize,
}

impl Write for Recording {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Recording {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        self.from_file.push((count, off));
        Ok(count)
    }
    fn available_bytes(&self) -> usize {
        self.cap - self.bytes - self.from_file.iter().map(|f| f.0).sum::<usize>()
    }
}

#[test]
fn a_cold_read_reaches_the_guest_as_file_ranges() {
    const LEN: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(temp_volume(&dir, ""));
    let fs = PohmelFs::new(
        store.clone(),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let ctx = Context::new();
    let (entry, handle, _, _) = fs
        .create(&ctx, ROOT_INO, &CString::new("f").unwrap(), args)
        .unwrap();
    let (ino, handle) = (entry.inode, handle.unwrap());
    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let written = fs.write(
        &ctx,
        ino,
        handle,
        &mut GuestBytes::new(data.clone()),
        LEN as u32,
        0,
        None,
        false,
        0,
        0,
    );
    assert_eq!(written.unwrap(), LEN);
    assert_eq!(read(&*store, ino, 0, LEN), data);

    let mut w = Recording {
        cap: LEN,
        ..Recording::default()
    };
    let (n, largest) =
        largest_allocation(|| fs.read(&ctx, ino, handle, &mut w, LEN as u32, 0, None, 0));
    assert_eq!(n.unwrap(), LEN);
    assert!(
        largest < 64 << 10,
        "the read allocated {largest} bytes at once"
    );
    assert_eq!(w.bytes, 0, "no byte went through a buffer of the daemon");
    assert_eq!(w.from_file.iter().map(|f| f.0).sum::<usize>(), LEN);
}

#[test]
fn a_file_piece_keeps_its_bytes_while_an_overwrite_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = temp_volume(&dir, "");
    commit(&store, vec![write_op(9, 0, &[5u8; 256 << 10])]);
    let held = store.read_data(9, 0, 256 << 10).unwrap();
    assert!(held.has_file_pieces());
    // The overwrite makes the held range dead; its punch must wait.
    commit(&store, vec![write_op(9, 0, &[6u8; 256 << 10])]);
    assert_eq!(held.to_vec().unwrap(), vec![5u8; 256 << 10]);
    drop(held);
    assert_eq!(read(&store, 9, 0, 256 << 10), vec![6u8; 256 << 10]);
}

/// On `file://` the host kernel reads a sequential reader's segment files
/// ahead: the layer starts no read-ahead of its own and keeps no copy.
#[test]
fn a_sequential_read_of_segments_leaves_read_ahead_to_the_host() {
    use crate::store::sink::EngineSink;
    use crate::writeback::{TxnConfig, WritebackStore};

    const LEN: usize = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(temp_volume(&dir, ""));
    commit(&*store, vec![write_op(9, 0, &vec![3u8; LEN])]);
    let mut inode = crate::store::Inode::regular(9, LEN as u64);
    inode.nlink = 1;
    let mut t = crate::store::Txn::new();
    t.push(crate::store::Op::PutInode(inode));
    store.commit(t).unwrap();
    let metrics = Arc::new(Metrics::default());
    let sink = Arc::new(EngineSink::new(store.clone()).unwrap());
    let cfg = TxnConfig {
        forget_clean_pages: true,
        ..TxnConfig::default()
    };
    let wb = WritebackStore::new(cfg, store.clone(), sink, metrics.clone()).unwrap();
    let first = wb.read_data(9, 0, 1 << 20).unwrap();
    let second = wb.read_data(9, 1 << 20, 1 << 20).unwrap();
    let third = wb.read_data(9, 2 << 20, 1 << 20).unwrap();
    assert_eq!(metrics.read_ahead.get(), 0, "the layer read ahead");
    assert!(first.has_file_pieces() && second.has_file_pieces());
    assert!(third.has_file_pieces(), "the next range was fetched");
    // Nor did the cold reads copy segment bytes into clean pages: a read
    // again goes to the segments (the host page cache keeps them hot).
    let again = wb.read_data(9, 0, 1 << 20).unwrap();
    assert!(
        again
            .pieces()
            .iter()
            .all(|p| matches!(p, crate::store::ReadPiece::File { .. })),
        "clean segment bytes were cached: {:?}",
        again.pieces()
    );
    assert_eq!(again.to_vec().unwrap(), vec![3u8; 1 << 20]);
}
