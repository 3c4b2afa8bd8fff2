//! Host microbenchmark of reads on `file://`, ignored by default (run it in
//! release): `cargo test --release --test read_bench -- --ignored
//! --nocapture`. It writes a 256 MiB file through PohmelFs and the
//! write-back layer into a `file://` volume and syncs it (timed: the
//! guest's buffers are 4 KiB pages, as a guest's page cache hands them
//! over), then reads it in
//! 1 MiB guest reads twice: cold (the segment file dropped from the host
//! page cache with `posix_fadvise(DONTNEED)`, a layer cache far smaller
//! than the file) and hot (a fresh layer; the host page cache holds the
//! segments). The guest writer reads file ranges with `preadv` into its
//! buffer, as the virtio queue's writer does. Then the same two reads
//! through a read-only open (`serve --readonly`: SlateDB's reader, every
//! segment page checked against its checksum). Prints MiB/s and the
//! process's CPU seconds; figures go in the report, never in assertions.

// A test binary: its helpers may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use pohmelfs::fs::{FsConfig, PohmelFs};
use pohmelfs::metrics::Metrics;
use pohmelfs::store::engine::SlateStore;
use pohmelfs::store::sink::EngineSink;
use pohmelfs::store::{OnceStore, Store, ROOT_INO};
use pohmelfs::writeback::{TxnConfig, WritebackStore};
use pohmelfs_testkit::GuestBytes;

const IO: usize = 1 << 20;
const FILE: u64 = 256 << 20;

/// The guest's buffer of one read: bytes are copied in, file ranges read
/// in with `preadv`.
struct Buffer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Write for Buffer<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(self.buf.len() - self.at);
        self.buf[self.at..self.at + n].copy_from_slice(&b[..n]);
        self.at += n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Buffer<'_> {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        let n = count.min(self.buf.len() - self.at);
        let dst = &mut self.buf[self.at..self.at + n];
        // SAFETY: `dst` is a live, exclusively borrowed buffer for the
        // whole call.
        let slice = unsafe { FileVolatileSlice::from_mut_slice(dst) };
        let got = f.read_at_volatile(slice, off)?;
        self.at += got;
        Ok(got)
    }
    fn available_bytes(&self) -> usize {
        self.buf.len() - self.at
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

fn layer(store: &Arc<SlateStore>, cache_bytes: u64) -> (Arc<WritebackStore>, PohmelFs) {
    let cfg = TxnConfig {
        cache_bytes,
        ..TxnConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let once: Arc<dyn OnceStore> = store.clone();
    let sink = Arc::new(EngineSink::new(once).unwrap());
    let wb = Arc::new(WritebackStore::new(cfg, store.clone(), sink, Arc::clone(&metrics)).unwrap());
    let fs = PohmelFs::new(wb.clone(), FsConfig::default(), metrics).unwrap();
    (wb, fs)
}

/// Drop every file under `dir` from the host page cache.
fn drop_host_cache(dir: &std::path::Path) {
    for e in walk(dir) {
        if let Ok(f) = std::fs::File::open(&e) {
            // SAFETY: integer arguments only; the fd is open.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn read_all(fs: &PohmelFs, ino: u64, what: &str) {
    let ctx = Context::new();
    let mut buf = vec![0u8; IO];
    let (t0, c0) = (Instant::now(), cpu());
    let mut offset = 0;
    while offset < FILE {
        let mut w = Buffer {
            buf: &mut buf,
            at: 0,
        };
        let n = fs
            .read(&ctx, ino, 0, &mut w, IO as u32, offset, None, 0)
            .unwrap();
        assert_eq!(n, IO);
        assert_eq!(buf[IO - 1], ((IO - 1) % 251) as u8);
        offset += IO as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{what}: {:.0} MiB/s, {secs:.2} s wall, {:.2} s CPU",
        (FILE >> 20) as f64 / secs,
        (cpu() - c0).as_secs_f64()
    );
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn cold_and_hot_1_mib_reads_of_256_mib_on_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/vol", dir.path().display());
    let store = Arc::new(SlateStore::open(&url).unwrap());
    let ctx = Context::new();
    let ino = {
        let (wb, fs) = layer(&store, 64 << 20);
        let args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let (entry, handle, _, _) = fs
            .create(&ctx, ROOT_INO, &CString::new("f").unwrap(), args)
            .unwrap();
        let handle = handle.unwrap();
        let data: Vec<u8> = (0..IO).map(|i| (i % 251) as u8).collect();
        // The guest's page cache hands over a write in pages.
        let mut guest = GuestBytes::split(data, &[4096; IO / 4096]);
        let (t0, c0) = (Instant::now(), cpu());
        let mut offset = 0;
        while offset < FILE {
            fs.write(
                &ctx,
                entry.inode,
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
            offset += IO as u64;
        }
        wb.sync(None).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "1 MiB sequential writes and a sync: {:.0} MiB/s, {secs:.2} s wall, {:.2} s CPU",
            (FILE >> 20) as f64 / secs,
            (cpu() - c0).as_secs_f64()
        );
        entry.inode
    };
    drop_host_cache(dir.path());
    let (_wb, fs) = layer(&store, 16 << 20);
    read_all(&fs, ino, "cold 1 MiB sequential reads");
    let (_wb, fs) = layer(&store, 16 << 20);
    read_all(&fs, ino, "hot 1 MiB sequential reads");
    drop((_wb, fs));
    store.close().unwrap();
    drop(store);
    drop_host_cache(dir.path());
    let fs = read_only_layer(&url, 16 << 20);
    read_all(&fs, ino, "read-only: cold 1 MiB sequential reads");
    let fs = read_only_layer(&url, 16 << 20);
    read_all(&fs, ino, "read-only: hot 1 MiB sequential reads");
}

/// The filesystem as `serve --readonly` builds it.
fn read_only_layer(url: &str, cache_bytes: u64) -> PohmelFs {
    let cfg = TxnConfig {
        cache_bytes,
        ..TxnConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let wb = pohmelfs::writeback::open_as(
        url,
        cfg,
        None,
        Arc::clone(&metrics),
        pohmelfs::store::engine::OpenMode::ReadOnly,
    )
    .unwrap();
    let cfg = FsConfig {
        read_only: true,
        ..FsConfig::default()
    };
    PohmelFs::new(wb, cfg, metrics).unwrap()
}
