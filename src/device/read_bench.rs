//! A host microbenchmark of the embedded read path without a guest: a
//! daemon serving a `file://` volume through the vhost-user frontend kit
//! (queue, FUSE decoding, fs, write-back layer, extent map, `preadv` into
//! guest memory), one 4 KiB READ at a time at random offsets of a file
//! written before and acknowledged, as fio's psync random reads issue
//! them, after random 4 KiB overwrites of the file with an fsync every 32
//! (`scripts/bench`'s randwrite, which fragments the chunks' extent
//! lists before its randread). Prints the process's CPU and the wall time
//! per READ; to see where the CPU goes, run the test binary under `perf
//! record`. Ignored by default (it measures, asserts only that every read
//! returned the bytes written); run it alone, release:
//!
//! ```text
//! cargo test --release --lib device::read_bench -- --ignored --nocapture --test-threads=1
//! ```

use std::sync::Arc;
use std::time::Instant;

use fuse_backend_rs::abi::fuse_abi::Opcode;

use super::chains::BULK;
use super::frontend_kit::Kit;
use crate::check::torture::rng::Rng;
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::writeback::{self, TxnConfig};

/// The file: four times the page cache below, so most reads go to the
/// segments as in `scripts/bench`'s random read after its 1 GiB write.
const FILE_MIB: u64 = 256;
const CACHE_BYTES: u64 = 64 << 20;
const READS: u32 = 200_000;
/// As dense in the file as the guest's 20 s of randwrite before its
/// randread (about 50,000 writes in 1 GiB).
const OVERWRITES: u32 = 12_500;
const PAGE: u64 = 4096;

/// The byte at `offset` of the file.
fn pattern(offset: u64) -> u8 {
    (offset / PAGE % 251) as u8 ^ (offset % 7) as u8
}

/// `n` page numbers below `of`, spread as fio's random map spreads them;
/// each `seed` its own sequence.
fn pages(n: u32, of: u64, seed: u64) -> impl Iterator<Item = u64> {
    let mut rng = Rng::new(seed);
    (0..n).map(move |_| rng.below(of))
}

#[test]
#[ignore = "a measurement: run it alone with --ignored --nocapture"]
fn random_4k_reads_of_acknowledged_data() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("vol").display());
    let metrics = Arc::new(Metrics::default());
    let cfg = TxnConfig {
        cache_bytes: CACHE_BYTES,
        ..TxnConfig::default()
    };
    let store = writeback::open_as(
        &url,
        cfg,
        None,
        Arc::clone(&metrics),
        crate::store::engine::OpenMode::Any,
    )
    .unwrap();
    let fs = Arc::new(PohmelFs::new(store, FsConfig::default(), Arc::clone(&metrics)).unwrap());
    let mut kit = Kit::start_serving("read-bench", fs, metrics, true);
    kit.init();
    let (ino, fh) = kit.create("f");
    for m in 0..FILE_MIB {
        let base = m << 20;
        let data: Vec<u8> = (0..1 << 20).map(|i| pattern(base + i)).collect();
        kit.write_at(ino, fh, base, &data);
    }
    let fsync = [0u8; 16];
    assert_eq!(kit.call(Opcode::Fsync, ino, &fsync).0, 0, "fsync");
    // The same bytes again, in new extents.
    for (i, page) in pages(OVERWRITES, FILE_MIB << 20 >> 12, 1).enumerate() {
        let offset = page * PAGE;
        let data: Vec<u8> = (0..PAGE).map(|i| pattern(offset + i)).collect();
        kit.write_at(ino, fh, offset, &data);
        if i % 32 == 31 {
            assert_eq!(kit.call(Opcode::Fsync, ino, &fsync).0, 0, "fsync");
        }
    }
    assert_eq!(kit.call(Opcode::Fsync, ino, &fsync).0, 0, "fsync");

    let buf = BULK;
    let (c0, w0) = (super::inline_bench::cpu(), Instant::now());
    for page in pages(READS, FILE_MIB << 20 >> 12, 2) {
        let offset = page * PAGE;
        let (err, got) = kit.read_at(ino, fh, offset, buf, PAGE as u32);
        assert_eq!(err, 0, "read at {offset}");
        assert_eq!(got.len() as u64, PAGE);
        assert_eq!(got[100], pattern(offset + 100), "bytes at {offset}");
    }
    let (c, w) = (super::inline_bench::cpu() - c0, w0.elapsed());
    eprintln!(
        "random 4 KiB reads of a {FILE_MIB} MiB file, {CACHE_BYTES} B page cache: \
         {:.2} µs CPU, {:.2} µs wall per READ (the kit's own work included)",
        c.as_secs_f64() * 1e6 / f64::from(READS),
        w.as_secs_f64() * 1e6 / f64::from(READS)
    );
}
