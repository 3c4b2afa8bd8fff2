//! The transaction layer ([`pohmelfs::writeback::WritebackStore`]) against real
//! `pohmelfs store` processes on 127.0.0.1, driven as the filesystem layer
//! drives it (one `[Write, PutInode]` transaction per guest write, fsync per
//! inode) while a server dies under it:
//!
//! * a server on `file://` is killed with SIGKILL mid-workload and restarted
//!   on the same port and data; while it is down the volume is opened
//!   directly to check what a crash left behind;
//! * two servers share one S3 bucket (`moto_server`); the primary is killed
//!   and the layer fails over to the second, which takes the volume over;
//! * a server's volume is full: its NoSpace reaches the layer as ENOSPC.
//!
//! Every byte a successful fsync covered must be in the store, and after a
//! final sync the volume must equal a model of the workload. Child
//! processes are killed on drop, pass or fail.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pohmelfs::metrics::Metrics;
use pohmelfs::store::{self, Inode, Op, Store, Txn};
use pohmelfs::writeback::TxnConfig;
use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{skip_requested, wait_until, Moto, ScratchDir, StoreServer};

const SECRET: &str = "failover-secret";
const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
fn workdir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("failover-{name}")).expect("scratch directory")
}

/// A `pohmelfs store` process named `name` with the secret, killed on drop.
fn start_server(dir: &ScratchDir, name: &str, data_url: &str) -> StoreServer {
    StoreServer::start(POHMELFS, dir.path(), name, data_url, Some(SECRET)).expect("start store")
}

/// The client URL of volume `vol` on `servers`, in failover order.
fn pohmel_url(dir: &ScratchDir, servers: &[&str]) -> String {
    format!(
        "pohmel://{}/vol?secret_file={}&timeout_ms=2000&give_up_ms=90000",
        servers.join(","),
        secret_file(dir.path()).display()
    )
}

#[path = "support/failover_workload.rs"]
mod workload;
use workload::*;

fn layer_config(ack_timeout: Duration) -> TxnConfig {
    TxnConfig {
        cache_bytes: 64 << 20,
        dirty_max_bytes: 32 << 20,
        ack_timeout,
        fsync_timeout: Duration::from_secs(90),
        ..TxnConfig::default()
    }
}

/// The workload's slow calls that `keep` selects, for the test output.
fn slow_calls(p: &Progress, keep: impl Fn(&SlowCall) -> bool) -> Vec<String> {
    p.slow
        .lock()
        .unwrap()
        .iter()
        .filter(|c| keep(c))
        .map(|c| format!("{} waited {:?}", c.what, c.end - c.start))
        .collect()
}

/// The epoch a server's log says it opened the volume at.
fn opened_epoch(log: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("volume open"))
        .filter_map(|l| l.split("epoch=").nth(1))
        .filter_map(|e| e.split_whitespace().next()?.parse().ok())
        .next_back()
}

#[test]
fn store_killed_mid_workload_keeps_every_fsynced_byte() {
    let dir = workdir("kill9");
    let data = format!("file://{}/volumes", dir.path().display());
    let mut server = start_server(&dir, "store", &data);
    let metrics = Arc::new(Metrics::default());
    let wb = pohmelfs::writeback::open(
        &pohmel_url(&dir, &[server.addr()]),
        layer_config(Duration::from_millis(300)),
        Arc::clone(&metrics),
    )
    .expect("open the volume through the transaction layer");
    let progress = Arc::new(Progress::default());
    let worker = Worker::spawn(
        Arc::clone(&wb),
        Arc::clone(&progress),
        0x5eed_0001,
        48 << 10,
    );

    // Kill in the middle of a burst, right after a write: its transaction
    // most likely dies in flight, and the burst's next writes find the
    // inode's attributes in the layer.
    worker.wait_paused(&progress);
    server.kill9();
    let killed = Instant::now();
    let unacked_at_kill = wb.unacked();
    worker.resume();
    let writes_at_kill = progress.writes.load(Ordering::SeqCst);
    let syncs_at_kill = progress.syncs.load(Ordering::SeqCst);
    // The outage lasts until the workload waits for the store, through
    // several ack timeouts.
    let stuck_in = progress.wait_until_stuck(killed, Duration::from_secs(1));

    // While the server is down, what did the crash leave on the volume?
    // Opening it directly takes it over; the restarted server takes it back.
    let histories = progress.snapshot();
    let prefixes = {
        let engine =
            pohmelfs::net::open(&format!("{data}/vol")).expect("open the volume after the crash");
        check_crash_state(&*engine, &histories)
    };
    let writes_in_outage = progress.writes.load(Ordering::SeqCst) - writes_at_kill;
    server.restart().expect("restart the store");
    let restarted = Instant::now();
    let outage = restarted - killed;

    progress.wait_for_syncs(
        progress.syncs.load(Ordering::SeqCst) + SYNCS_AFTER_FAULT,
        "after the restart",
    );
    worker.finish(&progress);
    wb.sync(None).expect("final sync");
    assert_eq!(wb.unacked(), 0, "unacknowledged after the final sync");

    let first_sync_after = progress
        .sync_ends
        .lock()
        .unwrap()
        .iter()
        .find(|&&t| t > restarted)
        .map(|&t| t - restarted);
    let waited = slow_calls(&progress, |c| c.start <= restarted && c.end >= restarted);
    eprintln!(
        "outage {outage:?} (kill -9 to restart, {unacked_at_kill} transactions unacknowledged \
         at the kill); {writes_in_outage} writes completed into the cache meanwhile, then the \
         workload waited in {stuck_in}; first fsync completed {first_sync_after:?} after the \
         restart; calls that waited across the restart: {waited:?}; at the crash the store \
         held write prefixes {prefixes:?}; {} writes and {} fsyncs before the kill, {} and {} \
         in all; resent {}, duplicate acks {}",
        writes_at_kill,
        syncs_at_kill,
        progress.writes.load(Ordering::SeqCst),
        progress.syncs.load(Ordering::SeqCst),
        metrics.txn_resent.get(),
        metrics.txn_duplicate_acks.get()
    );
    assert!(
        !waited.is_empty(),
        "no workload call waited across the outage: the kill did not hit the workload"
    );
    assert_eq!(metrics.fsync_errors.get(), 0, "fsyncs answered EIO");

    // Through a fresh client on a fresh server process.
    let final_histories = progress.snapshot();
    drop(wb);
    server.restart().expect("restart the store");
    // A reader: the restarted server keeps the volume for its writer's
    // session for a lease (`docs/protocol.md`, "Writer claim").
    let fresh = pohmelfs::net::open_reader(&pohmel_url(&dir, &[server.addr()]))
        .expect("open a fresh client");
    check_final(&*fresh, &final_histories);
    drop((fresh, server));
}

/// A store server on a volume of eight blocks: its NoSpace reaches the
/// layer as such, so an fsync of more than fits answers ENOSPC instead of
/// EIO at its deadline, and the layer shows what the volume holds.
#[test]
fn a_full_volume_on_a_store_server_answers_enospc() {
    let dir = workdir("full");
    let data = format!("file://{}/volumes?capacity=512K", dir.path().display());
    let server = start_server(&dir, "store", &data);
    let metrics = Arc::new(Metrics::default());
    let url = pohmel_url(&dir, &[server.addr()]);
    let wb = pohmelfs::writeback::open(
        &url,
        layer_config(Duration::from_secs(60)),
        Arc::clone(&metrics),
    )
    .expect("open the volume through the transaction layer");
    let ino = INODES[0];
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, 0)));
    wb.commit(t).expect("create");
    // Four times what the volume holds, as the filesystem layer writes it.
    const CHUNK: u64 = 64 << 10;
    let mut refused_at_write = 0;
    for i in 0..32u64 {
        let mut t = Txn::new();
        t.push(Op::Write {
            ino,
            offset: i * CHUNK,
            data: vec![i as u8 + 1; CHUNK as usize].into(),
        });
        t.push(Op::PutInode(Inode::regular(ino, (i + 1) * CHUNK)));
        match wb.commit(t) {
            Ok(()) => {}
            Err(store::StoreError::NoSpace) => refused_at_write += 1,
            Err(e) => panic!("write {i}: {}", pohmelfs::ErrorChain(&e)),
        }
    }
    let fsync = wb.sync(Some(ino));
    assert!(
        matches!(fsync, Err(store::StoreError::NoSpace)),
        "fsync of 2 MiB written to a 512 KiB volume: {fsync:?}"
    );
    assert!(metrics.txn_no_space.get() >= 1);
    // A reader: the layer is the volume's live writer.
    let fresh = pohmelfs::net::open_reader(&url).expect("open a fresh client");
    assert_eq!(
        content(&*wb, ino),
        content(&*fresh, ino),
        "the layer shows bytes the volume does not hold"
    );
    eprintln!(
        "{refused_at_write} of 32 writes refused at once; the server refused {} transactions",
        metrics.txn_no_space.get()
    );
    drop((fresh, wb, server));
}

const BUCKET: &str = "pohmelfs-failover";

/// A `moto_server` with the bucket, or `None` when S3 tests are skipped.
fn start_moto(dir: &ScratchDir) -> Option<Moto> {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the S3 failover test") {
        return None;
    }
    Some(Moto::start(dir.path(), BUCKET).expect("start moto_server"))
}

#[test]
fn two_servers_on_one_s3_bucket_fail_over() {
    let dir = workdir("s3");
    let Some(moto) = start_moto(&dir) else {
        return;
    };
    let data = moto.url("volumes");
    let mut a = start_server(&dir, "a", &data);
    let b = start_server(&dir, "b", &data);
    let metrics = Arc::new(Metrics::default());
    let wb = pohmelfs::writeback::open(
        &pohmel_url(&dir, &[a.addr(), b.addr()]),
        layer_config(Duration::from_millis(500)),
        Arc::clone(&metrics),
    )
    .expect("open the volume through the transaction layer");
    let progress = Arc::new(Progress::default());
    let worker = Worker::spawn(
        Arc::clone(&wb),
        Arc::clone(&progress),
        0x5eed_0002,
        16 << 10,
    );

    worker.wait_paused(&progress);
    assert!(
        a.log_text().contains("volume open"),
        "the primary did not open the volume:\n{}",
        a.log_text()
    );
    a.kill9();
    let killed = Instant::now();
    let unacked_at_kill = wb.unacked();
    worker.resume();
    let syncs_at_kill = progress.syncs.load(Ordering::SeqCst);
    let acked_at_kill = metrics.txn_acked.get();
    let mut first_ack_after = None;
    let acked = wait_until(WAIT, POLL, || {
        let now = metrics.txn_acked.get() > acked_at_kill;
        if now {
            first_ack_after = Some(killed.elapsed());
        }
        now || progress.done.load(Ordering::SeqCst)
    })
    .is_some();
    assert!(
        acked && first_ack_after.is_some(),
        "no transaction was acknowledged within {WAIT:?} of the primary's death (error: {:?})\n\
         --- b log ---\n{}",
        progress.error.lock().unwrap(),
        b.log_text()
    );
    progress.wait_for_syncs(syncs_at_kill + SYNCS_AFTER_FAULT, "after the failover");
    worker.finish(&progress);
    wb.sync(None).expect("final sync");
    assert_eq!(wb.unacked(), 0, "unacknowledged after the final sync");

    let first_sync_after = progress
        .sync_ends
        .lock()
        .unwrap()
        .iter()
        .find(|&&t| t > killed)
        .map(|&t| t - killed);
    let waited = slow_calls(&progress, |c| c.end >= killed);
    let b_log = b.log_text();
    let (epoch_a, epoch_b) = (opened_epoch(&a.log_text()), opened_epoch(&b_log));
    let handshakes_b = b_log.matches("client authenticated").count();
    eprintln!(
        "failover: {unacked_at_kill} transactions unacknowledged at the kill of the primary; \
         first ack after it in {:?}, first fsync completed \
         {first_sync_after:?} after it; slow calls after the kill: {waited:?}; {} writes and \
         {} fsyncs in all; {} transactions formed, failovers {}, resent {}, duplicate acks {}; \
         volume opened at epoch {epoch_a:?} on the primary, {epoch_b:?} on the second, which \
         saw {handshakes_b} handshakes of the client",
        first_ack_after.unwrap_or_default(),
        progress.writes.load(Ordering::SeqCst),
        progress.syncs.load(Ordering::SeqCst),
        metrics.txn_formed.get(),
        metrics.txn_failovers.get(),
        metrics.txn_resent.get(),
        metrics.txn_duplicate_acks.get()
    );
    assert!(
        metrics.txn_failovers.get() >= 1,
        "no transaction moved to the second server"
    );
    assert_eq!(metrics.fsync_errors.get(), 0, "fsyncs answered EIO");
    match (epoch_a, epoch_b) {
        (Some(a), Some(b)) if b > a => {}
        _ => panic!(
            "the second server did not take the volume over (epochs {epoch_a:?} then \
             {epoch_b:?}):\n{b_log}"
        ),
    }

    // Through a fresh client of the second server.
    let histories = progress.snapshot();
    drop(wb);
    let fresh =
        pohmelfs::net::open_reader(&pohmel_url(&dir, &[b.addr()])).expect("open a fresh client");
    check_final(&*fresh, &histories);
    drop((fresh, a, b, moto));
}
