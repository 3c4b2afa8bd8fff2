//! Tests of the transaction layer with a fault-injecting sink: lost acks,
//! duplicated and reordered acks, error replies, dropped connections, a
//! fenced server, a store restart (epoch change), a full volume; and a
//! seeded property test of random writes, overwrites, truncates and fsyncs
//! under random faults, for both overwrite policies, against a simple model.
//!
//! A test that needs an ack to come late holds it with the sink's latch
//! ([`Gate`]) and lets it go itself, on a real clock with an ack timeout
//! no test reaches: a timed latency on tokio's paused clock proves nothing,
//! since the clock jumps whenever the sender idles. The paused clock serves
//! the tests of timeouts and backoff, which take no real time on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pohmelfs_testkit::wait_until;

use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::check::torture::rng::Rng;
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::sink::{Ack, SendError, SendFuture, Sink};
use crate::store::{Dirent, FileKind, Inode, OnceStore, Op, Store, Txn};

/// Bound and poll interval of [`eventually`].
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(1);

/// Guest data handed to a FUSE write.
pub(super) struct Bytes(pub(super) std::io::Cursor<Vec<u8>>);

impl std::io::Read for Bytes {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl fuse_backend_rs::api::filesystem::ZeroCopyReader for Bytes {
    fn read_to(
        &mut self,
        _f: &mut dyn fuse_backend_rs::common::file_traits::FileReadWriteVolatile,
        _c: usize,
        _o: u64,
    ) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// What the fault sink does to the sends it sees.
#[derive(Clone, Debug, Default)]
pub(super) struct Faults {
    /// Random latency up to this (reorders acks across inodes).
    pub(super) jitter: Duration,
    /// Percent of sends applied but whose ack is lost (never answered).
    pub(super) lose_ack: u64,
    /// Percent of sends refused with a retryable error before applying.
    pub(super) error: u64,
    /// Percent of sends applied and then the connection drops.
    pub(super) drop_after_apply: u64,
    /// Servers that answer every send with "fenced".
    pub(super) fenced: Vec<usize>,
    /// Sends answered with an error until this many have been seen.
    pub(super) fail_first: u64,
    /// Every send that passes the gate is refused for lack of space.
    pub(super) no_space: bool,
}

/// A latch on the sink: while closed, every send waits before it reaches
/// the store, until the test opens it.
pub(super) struct Gate {
    open: tokio::sync::watch::Sender<bool>,
    held: AtomicU64,
}

/// Counts a send as held while it waits at the gate.
struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    fn new() -> Gate {
        Gate {
            open: tokio::sync::watch::channel(true).0,
            held: AtomicU64::new(0),
        }
    }

    pub(super) fn close(&self) {
        self.open.send_replace(false);
    }

    pub(super) fn open(&self) {
        self.open.send_replace(true);
    }

    /// Sends waiting at the gate now.
    pub(super) fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    async fn pass(&self) {
        let mut open = self.open.subscribe();
        if *open.borrow_and_update() {
            return;
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.held);
        // The sender lives as long as the gate, which outlives the send.
        let _ = open.wait_for(|open| *open).await;
    }
}

/// A sink over a MemStore that injects faults; with several "servers"
/// sharing one store, as servers on one bucket do.
pub(super) struct FaultSink {
    store: Arc<MemStore>,
    faults: Mutex<Faults>,
    rng: Mutex<Rng>,
    servers: usize,
    epoch: AtomicU64,
    /// Sends seen (their faults are decided when they are seen).
    sends: AtomicU64,
    per_server: Mutex<HashMap<usize, u64>>,
    pub(super) gate: Gate,
}

impl FaultSink {
    pub(super) fn new(store: Arc<MemStore>, servers: usize, seed: u64) -> FaultSink {
        FaultSink {
            store,
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(Rng::new(seed)),
            servers,
            epoch: AtomicU64::new(1),
            sends: AtomicU64::new(0),
            per_server: Mutex::new(HashMap::new()),
            gate: Gate::new(),
        }
    }
    pub(super) fn set(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }
    fn sent_to(&self, server: usize) -> u64 {
        self.per_server
            .lock()
            .unwrap()
            .get(&server)
            .copied()
            .unwrap_or(0)
    }
}

impl Sink for FaultSink {
    fn servers(&self) -> usize {
        self.servers
    }
    fn server_name(&self, server: usize) -> String {
        format!("fault-{server}")
    }
    fn session(&self) -> u64 {
        77
    }
    fn send(&self, server: usize, txn_id: u64, _low_water: u64, txn: Txn) -> SendFuture<'_> {
        let n = self.sends.fetch_add(1, Ordering::SeqCst);
        *self.per_server.lock().unwrap().entry(server).or_default() += 1;
        let f = self.faults.lock().unwrap().clone();
        let (delay, lose, error, drop_conn) = {
            let mut r = self.rng.lock().unwrap();
            let jitter = if f.jitter.is_zero() {
                0
            } else {
                r.below((f.jitter.as_micros() as u64).max(1))
            };
            (
                Duration::from_micros(jitter),
                r.percent(f.lose_ack),
                r.percent(f.error),
                r.percent(f.drop_after_apply),
            )
        };
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.gate.pass().await;
            if f.fenced.contains(&server) {
                return Err(SendError::Elsewhere("fenced".into()));
            }
            // Decided past the gate: a held send meets the volume as it is
            // when the test lets it go.
            if self.faults.lock().unwrap().no_space {
                return Err(SendError::NoSpace("injected: volume full".into()));
            }
            if n < f.fail_first || error {
                return Err(SendError::Retry("injected error".into()));
            }
            let outcome = self
                .store
                .commit_once(77, txn_id, txn)
                .map_err(|e| SendError::Retry(e.to_string()))?;
            if lose {
                // Applied, but the ack never comes: the layer must time out.
                std::future::pending::<()>().await;
            }
            if drop_conn {
                return Err(SendError::Retry("connection dropped".into()));
            }
            Ok(Ack {
                epoch: self.epoch.load(Ordering::SeqCst),
                duplicate: outcome.duplicate,
            })
        })
    }
}

pub(super) fn cfg(policy: OverwritePolicy) -> TxnConfig {
    TxnConfig {
        overwrite: policy,
        cache_bytes: 8 << 20,
        meta_cache_bytes: 1 << 20,
        engine_cache_bytes: 0,
        dirty_max_bytes: 4 << 20,
        max_in_flight: 8,
        max_txn_bytes: 256 << 10,
        ack_timeout: Duration::from_millis(200),
        attempts_per_server: 2,
        fsync_timeout: Duration::from_secs(30),
        read_ahead_bytes: 64 << 10,
        meta_linger: Duration::from_millis(2),
        // Small, so that tests cross the cap.
        max_txn_ops: 16,
        sync_on_close: false,
    }
}

pub(super) fn layer(
    policy: OverwritePolicy,
    servers: usize,
    seed: u64,
) -> (WritebackStore, Arc<FaultSink>, Arc<MemStore>, Arc<Metrics>) {
    layer_with(cfg(policy), servers, seed, true)
}

/// A layer whose metadata transactions linger long enough that none leaves
/// on its own, however slow this machine is: tests that count transactions
/// see only the sends that a sync asked for, and no ack timeout resends
/// one. Its clock is real: a paused clock jumps to the end of the linger
/// whenever the sender idles.
fn lingering_layer(seed: u64) -> (WritebackStore, Arc<FaultSink>, Arc<MemStore>, Arc<Metrics>) {
    let config = TxnConfig {
        meta_linger: Duration::from_secs(600),
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    layer_with(config, 1, seed, false)
}

/// A layer for tests that hold acks with the sink's [`Gate`]: on a real
/// clock, with an ack timeout no test reaches, so nothing is resent while
/// the test holds it and everything it sees happens because it let it.
pub(super) fn held_layer(
    policy: OverwritePolicy,
    seed: u64,
) -> (WritebackStore, Arc<FaultSink>, Arc<MemStore>, Arc<Metrics>) {
    let config = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        ..cfg(policy)
    };
    layer_with(config, 1, seed, false)
}

pub(super) fn layer_with(
    config: TxnConfig,
    servers: usize,
    seed: u64,
    paused_clock: bool,
) -> (WritebackStore, Arc<FaultSink>, Arc<MemStore>, Arc<Metrics>) {
    let store = Arc::new(MemStore::new(1 << 30));
    let sink = Arc::new(FaultSink::new(Arc::clone(&store), servers, seed));
    let metrics = Arc::new(Metrics::default());
    let wb = WritebackStore::with_clock(
        config,
        store.clone(),
        sink.clone(),
        Arc::clone(&metrics),
        paused_clock,
    )
    .unwrap();
    (wb, sink, store, metrics)
}

/// The filesystem layer's write, as it commits it.
pub(super) fn write(s: &dyn Store, ino: u64, offset: u64, data: &[u8], size: u64) {
    let mut t = Txn::new();
    t.push(Op::Write {
        ino,
        offset,
        data: data.to_vec().into(),
    });
    t.push(Op::PutInode(Inode::regular(ino, size)));
    s.commit(t).unwrap();
}

pub(super) fn create(s: &dyn Store, ino: u64) {
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, 0)));
    s.commit(t).unwrap();
}

pub(super) fn content(s: &dyn Store, ino: u64) -> Vec<u8> {
    let size = s.get_inode(ino).unwrap().map_or(0, |i| i.size);
    let mut buf = vec![0u8; size as usize];
    s.read(ino, 0, &mut buf).unwrap();
    buf
}

#[test]
fn writes_complete_before_the_ack_and_fsync_waits_for_it() {
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 1);
    let wb = Arc::new(wb);
    sink.gate.close();
    create(&*wb, 20);
    write(&*wb, 20, 0, b"hello world", 11);
    // The write completed with no ack: the guest reads it back from the
    // cache, and the store does not have it.
    assert_eq!(content(&*wb, 20), b"hello world");
    assert_eq!(store.get_inode(20).unwrap(), None);
    assert_eq!(m.txn_acked.get(), 0);
    let fsync = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || wb.sync(Some(20)))
    };
    eventually("the fsync to send the transaction", || {
        sink.gate.held() >= 1
    });
    assert!(!fsync.is_finished(), "fsync returned before any ack");
    sink.gate.open();
    fsync.join().unwrap().unwrap();
    assert_eq!(
        content(&*store, 20),
        b"hello world",
        "fsync returned: the store has it"
    );
    assert_eq!(wb.unacked(), 0);
    assert!(m.txn_acked.get() >= 1);
    assert_eq!(m.levels.dirty_bytes.get(), 0);
}

#[test]
fn lost_acks_are_resent_and_applied_once() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 2);
    create(&wb, 20);
    sink.set(Faults {
        lose_ack: 100,
        ..Faults::default()
    });
    write(&wb, 20, 0, b"first", 5);
    // Let a few timeouts pass (on the paused clock), then let acks through.
    eventually("two resends", || m.txn_resent.get() >= 2);
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), b"first");
    assert!(
        m.txn_duplicate_acks.get() >= 1,
        "the resend found the first copy applied"
    );
}

#[test]
fn errors_and_dropped_connections_are_retried() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 3);
    sink.set(Faults {
        fail_first: 5,
        drop_after_apply: 30,
        ..Faults::default()
    });
    create(&wb, 20);
    for i in 0..20u64 {
        write(&wb, 20, i * 4096, &[i as u8; 4096], (i + 1) * 4096);
    }
    wb.sync(None).unwrap();
    let got = content(&*store, 20);
    for i in 0..20usize {
        assert!(
            got[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "page {i}"
        );
    }
    assert!(m.txn_resent.get() >= 5);
}

#[test]
fn a_fenced_server_sends_transactions_to_the_next() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 2, 4);
    sink.set(Faults {
        fenced: vec![0],
        ..Faults::default()
    });
    create(&wb, 20);
    write(&wb, 20, 0, b"elsewhere", 9);
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), b"elsewhere");
    assert!(m.txn_failovers.get() >= 1);
    assert!(sink.sent_to(1) >= 1);
}

#[test]
fn timeouts_move_to_the_next_server_after_the_attempt_bound() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 2, 5);
    // Server 0 swallows acks forever; server 1 works.
    create(&wb, 21);
    sink.set(Faults {
        lose_ack: 100,
        ..Faults::default()
    });
    write(&wb, 21, 0, b"x", 1);
    eventually("a failover", || m.txn_failovers.get() >= 1);
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 21), b"x");
}

#[test]
fn reordered_acks_keep_each_inode_in_order() {
    let (wb, sink, store, _) = layer(OverwritePolicy::Cow, 1, 6);
    sink.set(Faults {
        jitter: Duration::from_millis(50),
        ..Faults::default()
    });
    for ino in 20..30u64 {
        create(&wb, ino);
    }
    for round in 0..20u8 {
        for ino in 20..30u64 {
            write(&wb, ino, 0, &[round; 100], 100);
        }
    }
    wb.sync(None).unwrap();
    for ino in 20..30u64 {
        assert_eq!(
            content(&*store, ino),
            vec![19u8; 100],
            "inode {ino} ends with the newest version"
        );
    }
}

#[test]
fn an_epoch_change_resends_everything_unacknowledged() {
    // No ack timeout fires in this test: only the epoch change can resend.
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 7);
    create(&wb, 20);
    create(&wb, 21);
    wb.sync(None).unwrap();
    // One transaction's ack is lost; another is acked under a new epoch
    // (the store restarted): the first must be resent at once.
    sink.set(Faults {
        lose_ack: 100,
        ..Faults::default()
    });
    let seen = sink.sends.load(Ordering::SeqCst);
    write(&wb, 20, 0, b"a", 1);
    eventually("the sink to take the write", || {
        sink.sends.load(Ordering::SeqCst) > seen
    });
    assert_eq!(m.txn_resent.get(), 0);
    sink.epoch.store(2, Ordering::SeqCst);
    sink.set(Faults::default());
    write(&wb, 21, 0, b"b", 1);
    eventually("the epoch change to resend the lost one", || {
        m.txn_resent.get() >= 1
    });
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), b"a");
    assert_eq!(content(&*store, 21), b"b");
    assert_eq!(wb.unacked(), 0);
}

#[test]
fn fsync_fails_after_its_deadline_and_stays_failed_until_durable() {
    let fsync_timeout = Duration::from_secs(2);
    let config = TxnConfig {
        fsync_timeout,
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, m) = layer_with(config, 1, 8, false);
    create(&wb, 20);
    wb.sync(None).unwrap();
    sink.gate.close();
    write(&wb, 20, 0, b"data", 4);
    assert!(
        wb.sync(Some(20)).is_err(),
        "no ack comes: EIO after the deadline"
    );
    // The ack is still held, so a sync that waited would fail only at its
    // deadline: failing sooner, it failed on the sticky error.
    let again = std::time::Instant::now();
    assert!(wb.sync(Some(20)).is_err(), "the error is sticky");
    assert!(
        again.elapsed() < fsync_timeout,
        "the second fsync waited {:?}: it did not fail at once",
        again.elapsed()
    );
    assert_eq!(wb.unacked(), 1, "the transaction is kept, not dropped");
    sink.gate.open();
    eventually("the held transaction to be acknowledged", || {
        wb.unacked() == 0
    });
    wb.sync(Some(20)).unwrap();
    assert_eq!(content(&*store, 20), b"data");
    assert_eq!(m.fsync_errors.get(), 2);
}

/// Wait with the kit's bounded [`wait_until`] (real time) until `cond`
/// holds; fail the test, naming `what`, at the bound.
pub(super) fn eventually(what: &str, cond: impl FnMut() -> bool) {
    let held = wait_until(WAIT, POLL, cond).is_some();
    assert!(held, "timed out waiting for {what} ({WAIT:?})");
}

#[test]
fn overwrite_policies_differ_only_in_waiting() {
    for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
        let (wb, sink, store, m) = held_layer(policy, 9);
        let wb = Arc::new(wb);
        create(&*wb, 20);
        wb.sync(None).unwrap();
        // Hold the first version in flight (pinned) while the guest
        // overwrites it.
        sink.gate.close();
        write(&*wb, 20, 0, &[1u8; 8192], 8192);
        eventually("the first version to be sent", || sink.gate.held() >= 1);
        let writer = {
            let wb = Arc::clone(&wb);
            std::thread::spawn(move || write(&*wb, 20, 0, &[2u8; 8192], 8192))
        };
        match policy {
            OverwritePolicy::Wait => {
                eventually("the overwrite to wait", || m.overwrite_waits.get() >= 1);
                assert!(
                    !writer.is_finished(),
                    "wait: the overwrite waits for the ack"
                );
            }
            OverwritePolicy::Cow => {
                eventually("the overwrite to copy", || m.overwrite_copies.get() >= 1);
                eventually("the overwrite to finish", || writer.is_finished());
                assert_eq!(
                    content(&*wb, 20),
                    vec![2u8; 8192],
                    "cow: the guest sees its new bytes at once"
                );
            }
        }
        sink.gate.open();
        writer.join().unwrap();
        wb.sync(None).unwrap();
        assert_eq!(content(&*store, 20), vec![2u8; 8192], "{policy:?}");
        match policy {
            OverwritePolicy::Wait => assert_eq!(m.overwrite_copies.get(), 0),
            OverwritePolicy::Cow => assert_eq!(m.overwrite_waits.get(), 0),
        }
    }
}

#[test]
fn dirty_bytes_are_bounded_by_backpressure() {
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 10);
    let wb = Arc::new(wb);
    let dirty_max = cfg(OverwritePolicy::Cow).dirty_max_bytes;
    const CHUNK: u64 = 256 << 10;
    const CHUNKS: u64 = 64;
    create(&*wb, 20);
    wb.sync(None).unwrap();
    // No ack comes until the test opens the gate: the writer must stop
    // once dirty and in-flight bytes reach the bound.
    sink.gate.close();
    let written = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let writer = {
        let (wb, m, written, peak) = (wb.clone(), m.clone(), written.clone(), peak.clone());
        std::thread::spawn(move || {
            for i in 0..CHUNKS {
                write(&*wb, 20, i * CHUNK, &[7u8; CHUNK as usize], (i + 1) * CHUNK);
                written.fetch_add(1, Ordering::SeqCst);
                peak.fetch_max(m.levels.dirty_bytes.get(), Ordering::SeqCst);
            }
        })
    };
    eventually("the writer to meet backpressure", || {
        m.backpressure_waits.get() >= 1
    });
    assert_eq!(
        written.load(Ordering::SeqCst),
        dirty_max / CHUNK,
        "the writer stopped exactly at the bound"
    );
    assert!(
        !writer.is_finished(),
        "no ack came, yet the writer finished"
    );
    assert_eq!(m.txn_acked.get(), 1, "only the create was acknowledged");
    sink.gate.open();
    writer.join().unwrap();
    wb.sync(None).unwrap();
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= dirty_max, "dirty bytes peaked at {peak}");
    assert_eq!(content(&*store, 20), vec![7u8; (CHUNKS * CHUNK) as usize]);
}

#[test]
fn reads_see_the_newest_bytes_across_cache_and_store() {
    let (wb, _sink, store, _) = layer(OverwritePolicy::Cow, 1, 11);
    create(&wb, 20);
    write(&wb, 20, 0, &[1u8; 20_000], 20_000);
    wb.sync(None).unwrap();
    // A partial overwrite of a page the cache may not hold: the untouched
    // bytes come from the store.
    write(&wb, 20, 5000, b"XYZ", 20_000);
    let got = content(&wb, 20);
    assert_eq!(&got[4999..5004], &[1, b'X', b'Y', b'Z', 1]);
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), got);
}

#[test]
fn truncate_is_ordered_after_the_data_it_cuts() {
    let (wb, sink, store, _) = layer(OverwritePolicy::Cow, 1, 12);
    sink.set(Faults {
        jitter: Duration::from_millis(30),
        ..Faults::default()
    });
    create(&wb, 20);
    write(&wb, 20, 0, &[3u8; 10_000], 10_000);
    let mut t = Txn::new();
    t.push(Op::Truncate { ino: 20, size: 100 });
    t.push(Op::PutInode(Inode::regular(20, 100)));
    wb.commit(t).unwrap();
    write(&wb, 20, 8000, b"end", 8003);
    wb.sync(None).unwrap();
    let got = content(&*store, 20);
    assert_eq!(got.len(), 8003);
    assert!(got[..100].iter().all(|&b| b == 3));
    assert!(
        got[100..8000].iter().all(|&b| b == 0),
        "truncated bytes must not come back"
    );
    assert_eq!(&got[8000..], b"end");
}

pub(super) fn create_in(s: &dyn Store, parent: u64, ino: u64, name: &str) {
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, 0)));
    t.push(Op::PutDirent {
        parent,
        dirent: Dirent {
            name: name.as_bytes().to_vec(),
            ino,
            kind: FileKind::Regular,
            cookie: ino,
        },
    });
    s.commit(t).unwrap();
}

#[test]
fn create_write_close_is_one_commit() {
    let (wb, _sink, store, m) = lingering_layer(13);
    create_in(&wb, 1, 30, "a");
    write(&wb, 30, 0, b"0\n", 2);
    // fsync (like a close) sends the lingering transaction at once.
    wb.sync(Some(30)).unwrap();
    assert_eq!(
        m.txn_sent.get(),
        1,
        "create and its first write travel together"
    );
    assert_eq!(content(&*store, 30), b"0\n");
    assert!(store.lookup(1, b"a").unwrap().is_some());
}

#[test]
fn flush_before_the_first_write_sends_nothing_and_the_write_joins_the_create() {
    // A shell's `echo > f`: open (create), close of the original descriptor
    // (FLUSH), write through the duplicate, close again (FLUSH).
    let (wb, _sink, store, m) = lingering_layer(18);
    create_in(&wb, 1, 31, "b");
    wb.flush(31).unwrap();
    assert_eq!(m.txn_sent.get(), 0, "no data to write back: nothing sent");
    write(&wb, 31, 0, b"1\n", 2);
    // FLUSH with data: sent at once, not waited for; fsync waits.
    wb.flush(31).unwrap();
    eventually("the close to send the create and the write", || {
        m.txn_sent.get() == 1
    });
    wb.sync(Some(31)).unwrap();
    assert_eq!(m.txn_sent.get(), 1, "create and write in one commit");
    assert_eq!(content(&*store, 31), b"1\n");
    // fsync, unlike FLUSH, makes the metadata durable too.
    create_in(&wb, 1, 32, "c");
    wb.sync(Some(32)).unwrap();
    assert!(store.lookup(1, b"c").unwrap().is_some());
}

#[test]
fn a_burst_of_metadata_joins_one_transaction_up_to_the_op_bound() {
    let (wb, _sink, store, m) = lingering_layer(14);
    // 40 creates of two ops each: 16 ops per transaction at most.
    for i in 0..40 {
        create_in(&wb, 1, 100 + i, &format!("f{i}"));
    }
    // Reads see them before any ack.
    assert_eq!(wb.lookup(1, b"f39").unwrap().map(|d| d.ino), Some(139));
    wb.sync(None).unwrap();
    assert_eq!(
        m.txn_formed.get(),
        5,
        "40 creates × 2 ops in transactions of 16 ops"
    );
    assert_eq!(m.txn_joined.get(), 35);
    for i in 0..40 {
        let d = store.lookup(1, format!("f{i}").as_bytes()).unwrap();
        assert_eq!(d.map(|d| d.ino), Some(100 + i));
    }
    assert_eq!(wb.unacked(), 0);
}

#[test]
fn metadata_never_joins_a_transaction_already_sent() {
    let (wb, sink, store, m) = lingering_layer(15);
    let wb = Arc::new(wb);
    sink.gate.close();
    create_in(&*wb, 1, 40, "x");
    // A truncate joins the lingering create; an fsync sends both at once,
    // then waits for their ack, which the gate holds.
    let mut t = Txn::new();
    t.push(Op::Truncate { ino: 40, size: 0 });
    wb.commit(t).unwrap();
    let fsync = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || wb.sync(Some(40)))
    };
    eventually("the create and truncate to be sent", || {
        sink.gate.held() >= 1
    });
    let (formed, joined) = (m.txn_formed.get(), m.txn_joined.get());
    assert_eq!((formed, joined), (1, 1), "the truncate joined the create");
    create_in(&*wb, 1, 41, "y");
    assert_eq!(
        (m.txn_formed.get(), m.txn_joined.get()),
        (formed + 1, joined),
        "the later create is its own transaction"
    );
    sink.gate.open();
    fsync.join().unwrap().unwrap();
    wb.sync(None).unwrap();
    assert!(store.lookup(1, b"x").unwrap().is_some());
    assert!(store.lookup(1, b"y").unwrap().is_some());
}

#[test]
fn remembered_xattrs_never_go_stale() {
    let (wb, _, store, _) = layer(OverwritePolicy::Cow, 1, 16);
    create(&wb, 50);
    wb.sync(None).unwrap();
    let name = b"user.k".as_slice();
    // Absent, and remembered as absent.
    assert_eq!(wb.get_xattr(50, name).unwrap(), None);
    let set = |v: &[u8]| {
        let mut t = Txn::new();
        t.push(Op::SetXattr {
            ino: 50,
            name: name.to_vec(),
            value: v.to_vec(),
        });
        wb.commit(t).unwrap();
    };
    set(b"one");
    assert_eq!(
        wb.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"one"[..])
    );
    // Acked: the overlay retires, and what is remembered must not be the
    // absence read before the change.
    wb.sync(None).unwrap();
    assert_eq!(
        wb.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"one"[..])
    );
    set(b"two");
    wb.sync(None).unwrap();
    assert_eq!(
        wb.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        store.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"two"[..])
    );
    let mut t = Txn::new();
    t.push(Op::RemoveXattr {
        ino: 50,
        name: name.to_vec(),
    });
    wb.commit(t).unwrap();
    wb.sync(None).unwrap();
    assert_eq!(wb.get_xattr(50, name).unwrap(), None);
}

#[test]
fn a_directory_created_here_answers_lookups_of_new_names_itself() {
    let (wb, sink, store, _) = layer(OverwritePolicy::Cow, 1, 17);
    let dir = wb.reserve_ids(16).unwrap();
    let mut d = Inode::regular(dir, 0);
    d.kind = FileKind::Directory;
    let mut t = Txn::new();
    t.push(Op::PutInode(d));
    wb.commit(t).unwrap();
    create_in(&wb, dir, dir + 1, "a");
    wb.sync(None).unwrap();
    // Whatever the store says behind the layer's back, the layer answers
    // for what it created: entries of its directories (present and
    // absent) and the extended attributes of its inodes (none).
    let mut t = Txn::new();
    t.push(Op::PutDirent {
        parent: dir,
        dirent: Dirent {
            name: b"nope".to_vec(),
            ino: 98,
            kind: FileKind::Regular,
            cookie: 98,
        },
    });
    t.push(Op::SetXattr {
        ino: dir + 1,
        name: b"user.x".to_vec(),
        value: b"v".to_vec(),
    });
    store.commit(t).unwrap();
    assert!(wb.lookup(dir, b"nope").unwrap().is_none());
    assert_eq!(wb.lookup(dir, b"a").unwrap().map(|d| d.ino), Some(dir + 1));
    assert_eq!(wb.get_xattr(dir + 1, b"user.x").unwrap(), None);
    // A change of its attributes sends reads to the store again.
    let mut t = Txn::new();
    t.push(Op::SetXattr {
        ino: dir + 1,
        name: b"user.y".to_vec(),
        value: b"w".to_vec(),
    });
    wb.commit(t).unwrap();
    wb.sync(None).unwrap();
    assert_eq!(
        wb.get_xattr(dir + 1, b"user.x").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    // An entry the layer never saw in a directory it did not create is the
    // store's to answer.
    let mut t = Txn::new();
    t.push(Op::PutDirent {
        parent: 1,
        dirent: Dirent {
            name: b"old".to_vec(),
            ino: 99,
            kind: FileKind::Regular,
            cookie: 99,
        },
    });
    store.commit(t).unwrap();
    assert_eq!(wb.lookup(1, b"old").unwrap().map(|d| d.ino), Some(99));
    // Removed, then absent again.
    let mut t = Txn::new();
    t.push(Op::RemoveDirent {
        parent: dir,
        name: b"a".to_vec(),
    });
    wb.commit(t).unwrap();
    wb.sync(None).unwrap();
    assert!(wb.lookup(dir, b"a").unwrap().is_none());
    drop(sink);
}

/// Random writes, overwrites, truncates and fsyncs under random faults,
/// for both policies. After every successful fsync the store holds exactly
/// the model's bytes for that inode; at the end, for every inode.
#[test]
fn random_operations_under_faults_match_the_model() {
    let seeds: u64 = std::env::var("POHMELFS_PROPTEST_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 1..=seeds {
        for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
            run_model(seed, policy);
        }
    }
}

fn run_model(seed: u64, policy: OverwritePolicy) {
    let (wb, sink, store, _) = layer(policy, 2, seed);
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    sink.set(Faults {
        jitter: Duration::from_millis(5),
        lose_ack: 5,
        error: 5,
        drop_after_apply: 5,
        ..Faults::default()
    });
    let inodes = [20u64, 21, 22];
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    for &ino in &inodes {
        create(&wb, ino);
        model.insert(ino, Vec::new());
    }
    for step in 0..300 {
        let ino = inodes[rng.below(3) as usize];
        let m = model.get_mut(&ino).unwrap();
        match rng.below(10) {
            0..=5 => {
                let offset = rng.below(64 << 10);
                let max = if rng.percent(20) { 40_000 } else { 5000 };
                let len = 1 + rng.below(max) as usize;
                let byte = (step % 251) as u8 + 1;
                let data = vec![byte; len];
                let end = offset as usize + len;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[offset as usize..end].copy_from_slice(&data);
                write(&wb, ino, offset, &data, m.len() as u64);
            }
            6 => {
                let size = rng.below(70 << 10) as usize;
                m.resize(size, 0);
                let mut t = Txn::new();
                t.push(Op::Truncate {
                    ino,
                    size: size as u64,
                });
                t.push(Op::PutInode(Inode::regular(ino, size as u64)));
                wb.commit(t).unwrap();
            }
            7 => {
                assert_eq!(
                    &content(&wb, ino),
                    m,
                    "seed {seed} {policy:?} step {step}: read through the layer"
                );
            }
            _ => {
                wb.sync(Some(ino)).unwrap();
                assert_eq!(
                    &content(&*store, ino),
                    m,
                    "seed {seed} {policy:?} step {step}: fsync returned but the store differs"
                );
            }
        }
    }
    wb.sync(None).unwrap();
    for &ino in &inodes {
        assert_eq!(
            &content(&*store, ino),
            &model[&ino],
            "seed {seed} {policy:?}: final content of {ino}"
        );
    }
}

#[test]
fn a_write_in_another_shape_is_read_back_at_once_and_written_through() {
    let (wb, _sink, store, _) = layer(OverwritePolicy::Cow, 1, 19);
    create(&wb, 20);
    write(&wb, 20, 0, &[1u8; 8192], 8192);
    wb.sync(None).unwrap();
    assert_eq!(content(&wb, 20), vec![1u8; 8192], "both pages are cached");
    // Two writes and the attributes in one transaction: not the shape the
    // filesystem layer commits.
    let mut t = Txn::new();
    for (offset, byte) in [(100u64, 2u8), (5000, 3)] {
        t.push(Op::Write {
            ino: 20,
            offset,
            data: vec![byte; 10].into(),
        });
    }
    t.push(Op::PutInode(Inode::regular(20, 8192)));
    wb.commit(t).unwrap();
    let mut want = vec![1u8; 8192];
    want[100..110].fill(2);
    want[5000..5010].fill(3);
    assert_eq!(content(&wb, 20), want, "reads see the write at once");
    assert_eq!(content(&*store, 20), want, "commit returned once stored");
}

/// A panic while the state is locked leaves it half changed: the next
/// lock stops the daemon with a log line instead of going on.
#[test]
fn a_poisoned_state_lock_aborts_the_daemon() {
    const CHILD: &str = "POHMELFS_TXN_POISONED_LOCK_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .try_init();
        let (wb, _, _, _) = layer(OverwritePolicy::Cow, 1, 23);
        let wb = Arc::new(wb);
        let poisoner = Arc::clone(&wb);
        let _ = std::thread::spawn(move || {
            let _state = super::ack::lock(&poisoner.shared.state);
            panic!("a change of the state was interrupted");
        })
        .join();
        let left = wb.unacked();
        println!("went on with {left} transactions unacknowledged");
        return;
    }
    let name = "writeback::tests::a_poisoned_state_lock_aborts_the_daemon";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "the child was not aborted ({:?}); stdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("invariant violated") && stderr.contains("poisoned"),
        "no log line says why:\n{stderr}"
    );
}

/// The layer over a two-server [`FaultSink`] that fails and drops some
/// sends, and the store behind the sink: for the store conformance suite
/// (`store::engine::conformance`), which checks that the layer keeps the
/// store contract. With `lingering`, metadata transactions wait (600 s, on a
/// real clock) until a sync or a commit that waits sends them, so the layer
/// answers reads from its overlays; without, they leave at once, on the
/// paused clock, and the sink also loses and reorders acks.
pub(super) fn faulty_layer(
    policy: OverwritePolicy,
    seed: u64,
    lingering: bool,
) -> (WritebackStore, Arc<MemStore>) {
    let faults = Faults {
        error: 5,
        drop_after_apply: 5,
        ..Faults::default()
    };
    let (wb, sink, store, _) = if lingering {
        let config = TxnConfig {
            meta_linger: Duration::from_secs(600),
            ..cfg(policy)
        };
        layer_with(config, 2, seed, false)
    } else {
        layer(policy, 2, seed)
    };
    sink.set(if lingering {
        faults
    } else {
        Faults {
            jitter: Duration::from_millis(5),
            lose_ack: 5,
            ..faults
        }
    });
    (wb, store)
}
