//! A host microbenchmark for serving cheap requests inline on the queue
//! thread, as virtiofsd does, instead of through the worker pool: the CPU
//! and the wall time per GETATTR of the root (answered from memory) when
//! the queue thread serves it itself, when it hands each to the pool and
//! waits for it (one request outstanding: a guest's `stat` loop), and when
//! it hands a burst to the pool. Ignored by default (it measures, asserts
//! only that every request was answered); run it alone:
//!
//! ```text
//! cargo test --lib device::inline_bench -- --ignored --nocapture --test-threads=1
//! ```

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestAddressSpace;

use super::pool::WorkerPool;
use super::request::Requests;
use super::testkit::{header, post, reply, served_fs, write_request, REPLY, REQUEST};

const REQUESTS: u32 = 20_000;
const FUSE_GETATTR: u32 = 3;

/// CPU time of the whole process (user and system).
pub(super) fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given; all-zero is a valid
    // rusage to start from.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0);
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn report(what: &str, f: impl FnOnce()) {
    let (c0, w0) = (cpu(), Instant::now());
    f();
    let (c, w) = (cpu() - c0, w0.elapsed());
    eprintln!(
        "{what:<28} {:>7.2} µs CPU, {:>7.2} µs wall per request",
        c.as_secs_f64() * 1e6 / f64::from(REQUESTS),
        w.as_secs_f64() * 1e6 / f64::from(REQUESTS)
    );
}

#[test]
#[ignore = "a measurement: run it alone with --ignored --nocapture"]
fn getattr_inline_versus_through_the_pool() {
    let (requests, _) = served_fs();
    let requests: Arc<Requests> = Arc::new(requests);
    let mem = super::testkit::guest_memory();
    let body = [0u8; 16]; // fuse_getattr_in
    let len = write_request(&mem, header(40 + body.len(), FUSE_GETATTR, 5), &body);
    let chain = post(&mem, &[(REQUEST, len, false), (REPLY, 256, true)]);
    assert!(requests.serve(&chain, 1) > 16);
    assert_eq!((reply(&mem).error, reply(&mem).unique), (0, 5));
    let _ = mem.memory();

    report("inline", || {
        for _ in 0..REQUESTS {
            assert!(requests.serve(&chain, 1) > 16);
        }
    });
    let pool = WorkerPool::new(8, 2048, Arc::default()).unwrap();
    report("pool, one outstanding", || {
        let (tx, rx) = channel();
        for _ in 0..REQUESTS {
            let (r, c, tx) = (requests.clone(), chain.clone(), tx.clone());
            pool.submit(move || tx.send(r.serve(&c, 1)).unwrap());
            assert!(rx.recv().unwrap() > 16);
        }
    });
    report("pool, burst of 64", || {
        for _ in 0..REQUESTS / 64 {
            for _ in 0..64 {
                let (r, c) = (requests.clone(), chain.clone());
                pool.submit(move || assert!(r.serve(&c, 1) > 16));
            }
            assert_eq!(pool.drain(Duration::from_secs(30)), 0);
        }
    });
}
