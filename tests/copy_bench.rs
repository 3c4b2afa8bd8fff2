//! Host microbenchmark of the data path, ignored by default (run it in
//! release): `cargo test --release --test copy_bench -- --ignored
//! --nocapture`. It writes 1 GiB in 1 MiB guest writes through PohmelFs
//! and the write-back layer into `mem:` (16 passes over a 64 MiB file, so
//! the store stays small), then reads it back with a cache too small to
//! hold the file (cold reads), and prints MiB/s and the process's CPU
//! seconds for each. Figures go in the report, never in assertions.

// A test binary: its helpers may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use pohmelfs::fs::{FsConfig, PohmelFs};
use pohmelfs::metrics::Metrics;
use pohmelfs::store::mem::MemStore;
use pohmelfs::store::sink::EngineSink;
use pohmelfs::store::{Store, ROOT_INO};
use pohmelfs::writeback::{TxnConfig, WritebackStore};
use pohmelfs_testkit::GuestBytes;

const IO: usize = 1 << 20;
const FILE: u64 = 64 << 20;
const TOTAL: u64 = 1 << 30;

/// Guest buffers of one read.
struct Sink<'a>(&'a mut Vec<u8>);

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Sink<'_> {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _count: usize,
        _off: u64,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn available_bytes(&self) -> usize {
        IO - self.0.len()
    }
}

fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given; all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn layer(store: &Arc<MemStore>, cache_bytes: u64) -> (Arc<WritebackStore>, PohmelFs) {
    let cfg = TxnConfig {
        cache_bytes,
        ..TxnConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let sink = Arc::new(EngineSink::new(store.clone()).unwrap());
    let wb = Arc::new(WritebackStore::new(cfg, store.clone(), sink, Arc::clone(&metrics)).unwrap());
    let fs = PohmelFs::new(wb.clone(), FsConfig::default(), metrics).unwrap();
    (wb, fs)
}

fn report(what: &str, t0: Instant, c0: Duration) {
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu() - c0).as_secs_f64();
    println!(
        "{what}: {:.0} MiB/s, {secs:.2} s wall, {cpu:.2} s CPU",
        (TOTAL >> 20) as f64 / secs
    );
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn write_then_cold_read_1_gib_through_the_write_back_layer() {
    let store = Arc::new(MemStore::new(1 << 30));
    let ctx = Context::new();
    let ino;
    {
        let (wb, fs) = layer(&store, 256 << 20);
        let args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let (entry, handle, _, _) = fs
            .create(&ctx, ROOT_INO, &CString::new("f").unwrap(), args)
            .unwrap();
        ino = entry.inode;
        let handle = handle.unwrap();
        let data: Vec<u8> = (0..IO).map(|i| (i % 251) as u8).collect();
        // The guest's page cache hands over a write in pages.
        let mut guest = GuestBytes::split(data, &[4096; IO / 4096]);
        let (t0, c0) = (Instant::now(), cpu());
        let mut offset = 0;
        for _ in 0..TOTAL / IO as u64 {
            let n = fs
                .write(
                    &ctx,
                    ino,
                    handle,
                    {
                        guest.rewind();
                        &mut guest
                    },
                    IO as u32,
                    offset,
                    None,
                    false,
                    0,
                    0,
                )
                .unwrap();
            assert_eq!(n, IO);
            offset = (offset + IO as u64) % FILE;
        }
        wb.sync(None).unwrap();
        report("write", t0, c0);
    }
    let (_wb, fs) = layer(&store, 8 << 20);
    let mut buf = Vec::with_capacity(IO);
    let (t0, c0) = (Instant::now(), cpu());
    let mut offset = 0;
    for _ in 0..TOTAL / IO as u64 {
        buf.clear();
        let n = fs
            .read(
                &ctx,
                ino,
                0,
                &mut Sink(&mut buf),
                IO as u32,
                offset,
                None,
                0,
            )
            .unwrap();
        assert_eq!(n, IO);
        offset = (offset + IO as u64) % FILE;
    }
    report("cold read", t0, c0);
}
