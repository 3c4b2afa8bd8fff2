//! Tests of the transaction layer with a fault-injecting sink on tokio's
//! paused clock: latency, lost acks, duplicated and reordered acks, error
//! replies, dropped connections, a fenced server, a store restart (epoch
//! change); and a seeded property test of random writes, overwrites,
//! truncates and fsyncs under random faults, for both overwrite policies,
//! against a simple model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::sink::{Ack, SendError, SendFuture, Sink};
use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::{Dirent, FileKind, Inode, OnceStore, Op, Store, Timestamp, Txn};

/// A tiny seeded generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the fault sink does to the sends it sees.
#[derive(Clone, Debug, Default)]
struct Faults {
    /// Added to every send.
    latency: Duration,
    /// Random extra latency up to this (reorders acks across inodes).
    jitter: Duration,
    /// Percent of sends applied but whose ack is lost (never answered).
    lose_ack: u64,
    /// Percent of sends refused with a retryable error before applying.
    error: u64,
    /// Percent of sends applied and then the connection drops.
    drop_after_apply: u64,
    /// Servers that answer every send with "fenced".
    fenced: Vec<usize>,
    /// Sends answered with an error until this many have been seen.
    fail_first: u64,
}

/// A sink over a MemStore that injects faults; with several "servers"
/// sharing one store, as servers on one bucket do.
struct FaultSink {
    store: Arc<MemStore>,
    faults: Mutex<Faults>,
    rng: Mutex<Rng>,
    servers: usize,
    epoch: std::sync::atomic::AtomicU64,
    sends: std::sync::atomic::AtomicU64,
    per_server: Mutex<HashMap<usize, u64>>,
    /// While set, sends wait before they reach the store.
    held: std::sync::atomic::AtomicBool,
}

impl FaultSink {
    fn new(store: Arc<MemStore>, servers: usize, seed: u64) -> FaultSink {
        FaultSink {
            store,
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(Rng(seed | 1)),
            servers,
            epoch: std::sync::atomic::AtomicU64::new(1),
            sends: std::sync::atomic::AtomicU64::new(0),
            per_server: Mutex::new(HashMap::new()),
            held: std::sync::atomic::AtomicBool::new(false),
        }
    }
    fn set(&self, f: Faults) {
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
        use std::sync::atomic::Ordering;
        let n = self.sends.fetch_add(1, Ordering::SeqCst);
        *self.per_server.lock().unwrap().entry(server).or_default() += 1;
        let f = self.faults.lock().unwrap().clone();
        let (delay, lose, error, drop_conn) = {
            let mut r = self.rng.lock().unwrap();
            let jitter = if f.jitter.is_zero() {
                0
            } else {
                r.below(f.jitter.as_micros() as u64)
            };
            (
                f.latency + Duration::from_micros(jitter),
                r.chance(f.lose_ack),
                r.chance(f.error),
                r.chance(f.drop_after_apply),
            )
        };
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            while self.held.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if f.fenced.contains(&server) {
                return Err(SendError::Elsewhere("fenced".into()));
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

fn cfg(policy: OverwritePolicy) -> TxnConfig {
    TxnConfig {
        overwrite: policy,
        cache_bytes: 8 << 20,
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
    }
}

fn layer(
    policy: OverwritePolicy,
    servers: usize,
    seed: u64,
) -> (WritebackStore, Arc<FaultSink>, Arc<MemStore>, Arc<Metrics>) {
    layer_with(cfg(policy), servers, seed, true)
}

/// A layer whose metadata transactions linger long enough that none leaves
/// on its own, however slow this machine is: tests that count transactions
/// see only the sends that a sync asked for. Its clock is real: a paused
/// clock jumps to the end of the linger whenever the sender idles.
fn lingering_layer(seed: u64) -> (WritebackStore, Arc<FaultSink>, Arc<MemStore>, Arc<Metrics>) {
    let config = TxnConfig {
        meta_linger: Duration::from_secs(600),
        ..cfg(OverwritePolicy::Cow)
    };
    layer_with(config, 1, seed, false)
}

fn layer_with(
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

fn inode(ino: u64, size: u64) -> Inode {
    Inode {
        ino,
        kind: FileKind::Regular,
        perm: 0o644,
        uid: 0,
        gid: 0,
        nlink: 1,
        size,
        rdev: 0,
        atime: Timestamp::default(),
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        parent: 0,
    }
}

/// The filesystem layer's write, as it commits it.
fn write(s: &dyn Store, ino: u64, offset: u64, data: &[u8], size: u64) {
    let mut t = Txn::new();
    t.push(Op::Write {
        ino,
        offset,
        data: data.to_vec(),
    });
    t.push(Op::PutInode(inode(ino, size)));
    s.commit(t).unwrap();
}

fn create(s: &dyn Store, ino: u64) {
    let mut t = Txn::new();
    t.push(Op::PutInode(inode(ino, 0)));
    s.commit(t).unwrap();
}

fn content(s: &dyn Store, ino: u64) -> Vec<u8> {
    let size = s.get_inode(ino).unwrap().map_or(0, |i| i.size);
    let mut buf = vec![0u8; size as usize];
    s.read(ino, 0, &mut buf).unwrap();
    buf
}

#[test]
fn writes_complete_before_the_ack_and_fsync_waits_for_it() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 1);
    sink.set(Faults {
        latency: Duration::from_millis(150),
        ..Faults::default()
    });
    create(&wb, 20);
    write(&wb, 20, 0, b"hello world", 11);
    // The guest reads its write back at once, from the cache.
    assert_eq!(content(&wb, 20), b"hello world");
    wb.sync(Some(20)).unwrap();
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
    // Let a few timeouts pass, then let acks through.
    while m.txn_resent.get() < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
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
    while m.txn_failovers.get() < 1 {
        std::thread::sleep(Duration::from_millis(1));
    }
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
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 7);
    create(&wb, 20);
    create(&wb, 21);
    wb.sync(None).unwrap();
    // One transaction's ack is lost; another is acked under a new epoch
    // (the store restarted): the first must be resent at once.
    sink.set(Faults {
        lose_ack: 100,
        ..Faults::default()
    });
    write(&wb, 20, 0, b"a", 1);
    while m.txn_sent.get() < 3 {
        std::thread::sleep(Duration::from_millis(1));
    }
    sink.epoch.store(2, std::sync::atomic::Ordering::SeqCst);
    sink.set(Faults::default());
    write(&wb, 21, 0, b"b", 1);
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), b"a");
    assert_eq!(content(&*store, 21), b"b");
}

#[test]
fn fsync_fails_after_its_deadline_and_stays_failed_until_durable() {
    let store = Arc::new(MemStore::new(1 << 30));
    let sink = Arc::new(FaultSink::new(Arc::clone(&store), 1, 8));
    let mut c = cfg(OverwritePolicy::Cow);
    c.fsync_timeout = Duration::from_millis(300);
    let m = Arc::new(Metrics::default());
    let wb = WritebackStore::with_clock(c, store.clone(), sink.clone(), m.clone(), true).unwrap();
    create(&wb, 20);
    wb.sync(None).unwrap();
    sink.set(Faults {
        error: 100,
        ..Faults::default()
    });
    write(&wb, 20, 0, b"data", 4);
    assert!(
        wb.sync(Some(20)).is_err(),
        "no server answers: EIO after the deadline"
    );
    assert!(wb.sync(Some(20)).is_err(), "the error is sticky");
    assert_eq!(wb.unacked(), 1, "the transaction is kept, not dropped");
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    wb.sync(Some(20)).unwrap();
    assert_eq!(content(&*store, 20), b"data");
    assert!(m.fsync_errors.get() >= 2);
}

/// Wait (real time, bounded) until `cond` holds.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn overwrite_policies_differ_only_in_waiting() {
    use std::sync::atomic::Ordering;
    for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
        let (wb, sink, store, m) = layer(policy, 1, 9);
        let wb = Arc::new(wb);
        create(&*wb, 20);
        wb.sync(None).unwrap();
        // Hold the first version in flight (pinned) while the guest
        // overwrites it.
        sink.held.store(true, Ordering::SeqCst);
        write(&*wb, 20, 0, &[1u8; 8192], 8192);
        wait_until("the first version to be sent", || m.txn_sent.get() >= 2);
        let writer = {
            let wb = Arc::clone(&wb);
            std::thread::spawn(move || write(&*wb, 20, 0, &[2u8; 8192], 8192))
        };
        match policy {
            OverwritePolicy::Wait => {
                wait_until("the overwrite to wait", || m.overwrite_waits.get() >= 1);
                assert!(
                    !writer.is_finished(),
                    "wait: the overwrite waits for the ack"
                );
            }
            OverwritePolicy::Cow => {
                wait_until("the overwrite to copy", || m.overwrite_copies.get() >= 1);
                wait_until("the overwrite to finish", || writer.is_finished());
                assert_eq!(
                    content(&*wb, 20),
                    vec![2u8; 8192],
                    "cow: the guest sees its new bytes at once"
                );
            }
        }
        sink.held.store(false, Ordering::SeqCst);
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
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 10);
    sink.set(Faults {
        latency: Duration::from_millis(20),
        ..Faults::default()
    });
    create(&wb, 20);
    let chunk = vec![7u8; 256 << 10];
    let mut peak = 0;
    for i in 0..64u64 {
        write(
            &wb,
            20,
            i * chunk.len() as u64,
            &chunk,
            (i + 1) * chunk.len() as u64,
        );
        peak = peak.max(m.levels.dirty_bytes.get());
    }
    wb.sync(None).unwrap();
    assert!(peak <= 4 << 20, "dirty bytes peaked at {peak}");
    assert!(m.backpressure_waits.get() > 0);
    assert_eq!(content(&*store, 20).len(), 64 * chunk.len());
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
    t.push(Op::PutInode(inode(20, 100)));
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

fn create_in(s: &dyn Store, parent: u64, ino: u64, name: &str) {
    let mut t = Txn::new();
    t.push(Op::PutInode(inode(ino, 0)));
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
    let (wb, sink, store, m) = lingering_layer(13);
    sink.set(Faults {
        latency: Duration::from_millis(5),
        ..Faults::default()
    });
    create_in(&wb, 1, 30, "a");
    write(&wb, 30, 0, b"0\n", 2);
    // FLUSH at close: sends the lingering transaction at once.
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
    let (wb, sink, store, m) = lingering_layer(18);
    sink.set(Faults {
        latency: Duration::from_millis(5),
        ..Faults::default()
    });
    create_in(&wb, 1, 31, "b");
    wb.flush(31).unwrap();
    assert_eq!(m.txn_sent.get(), 0, "no data to write back: nothing sent");
    write(&wb, 31, 0, b"1\n", 2);
    wb.flush(31).unwrap();
    assert_eq!(m.txn_sent.get(), 1, "create and write in one commit");
    assert_eq!(content(&*store, 31), b"1\n");
    // fsync, unlike FLUSH, makes the metadata durable too.
    create_in(&wb, 1, 32, "c");
    wb.sync(Some(32)).unwrap();
    assert!(store.lookup(1, b"c").unwrap().is_some());
}

#[test]
fn a_burst_of_metadata_joins_one_transaction_up_to_the_op_bound() {
    let (wb, sink, store, m) = lingering_layer(14);
    sink.set(Faults {
        latency: Duration::from_millis(5),
        ..Faults::default()
    });
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
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 15);
    sink.set(Faults {
        latency: Duration::from_millis(50),
        ..Faults::default()
    });
    create_in(&wb, 1, 40, "x");
    // Waiting for a truncate sends everything queued before it.
    let mut t = Txn::new();
    t.push(Op::Truncate { ino: 40, size: 0 });
    wb.commit(t).unwrap();
    let sent = m.txn_sent.get();
    create_in(&wb, 1, 41, "y");
    wb.sync(None).unwrap();
    assert_eq!(
        m.txn_sent.get(),
        sent + 1,
        "the later create is its own transaction"
    );
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
    let mut d = inode(dir, 0);
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
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
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
                let max = if rng.chance(20) { 40_000 } else { 5000 };
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
                t.push(Op::PutInode(inode(ino, size as u64)));
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

/// The filesystem layer over the transaction layer (write-back metadata
/// and data, acks delayed and reordered) behaves exactly like the
/// filesystem layer straight on a store: same answers, same tree after
/// every step, and the same durable volume after a sync.
#[test]
fn the_filesystem_over_the_layer_matches_the_filesystem_on_the_store() {
    use crate::fs::{FsConfig, PohmelFs};
    use fuse_backend_rs::abi::fuse_abi::CreateIn;
    use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyReader};
    use std::ffi::CString;

    struct Bytes(std::io::Cursor<Vec<u8>>);
    impl std::io::Read for Bytes {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl ZeroCopyReader for Bytes {
        fn read_to(
            &mut self,
            _f: &mut dyn fuse_backend_rs::common::file_traits::FileReadWriteVolatile,
            _c: usize,
            _o: u64,
        ) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
    }

    /// Every inode reachable from the root, as comparable text.
    fn tree(s: &dyn Store) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![(crate::store::ROOT_INO, "/".to_string())];
        while let Some((dir, path)) = dirs.pop() {
            let mut after = 0;
            loop {
                let batch = s.readdir(dir, after, 7).unwrap();
                if batch.is_empty() {
                    break;
                }
                for d in batch {
                    after = d.cookie;
                    let i = s
                        .get_inode(d.ino)
                        .unwrap()
                        .expect("entry names a live inode");
                    let name = format!("{path}{}", String::from_utf8_lossy(&d.name));
                    let mut line = format!(
                        "{name} ino={} {:?} nlink={} size={} mode={:o}",
                        i.ino, i.kind, i.nlink, i.size, i.perm
                    );
                    if i.kind == FileKind::Symlink {
                        line += &format!(" -> {:?}", s.readlink(i.ino).unwrap());
                    }
                    line += &format!(" xattrs={:?}", s.list_xattr(i.ino).unwrap());
                    if i.kind == FileKind::Regular {
                        let mut buf = vec![0u8; i.size as usize];
                        s.read(i.ino, 0, &mut buf).unwrap();
                        line += &format!(" sum={}", buf.iter().map(|&b| b as u64).sum::<u64>());
                    }
                    if i.kind == FileKind::Directory {
                        dirs.push((i.ino, format!("{name}/")));
                    }
                    out.push(line);
                }
            }
        }
        out.sort();
        out
    }

    let direct_store = Arc::new(MemStore::new(1 << 30));
    let direct = PohmelFs::new(
        direct_store.clone(),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let (wb, sink, durable, _) = layer(OverwritePolicy::Cow, 1, 21);
    sink.set(Faults {
        jitter: Duration::from_millis(20),
        lose_ack: 3,
        ..Faults::default()
    });
    let wb = Arc::new(wb);
    let layered = PohmelFs::new(
        wb.clone(),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let ctx = Context::new();
    let c = |s: &str| CString::new(s).unwrap();
    let mut rng = Rng(0xC0FFEE);
    let names = ["a", "b", "c", "d", "e"];
    let mut dirs = vec![crate::store::ROOT_INO];
    let mut succeeded = 0;
    for step in 0..1500 {
        let parent = dirs[rng.below(dirs.len() as u64) as usize];
        let name = c(names[rng.below(names.len() as u64) as usize]);
        let other = dirs[rng.below(dirs.len() as u64) as usize];
        let name2 = c(names[rng.below(names.len() as u64) as usize]);
        let op = rng.below(9);
        let data = vec![(step % 250) as u8 + 1; 1 + rng.below(9000) as usize];
        let offset = rng.below(20_000);
        let run = |fs: &PohmelFs| -> String {
            let r: std::io::Result<String> = match op {
                0 => fs
                    .create(
                        &ctx,
                        parent,
                        &name,
                        CreateIn {
                            flags: 2,
                            mode: libc::S_IFREG | 0o644,
                            umask: 0,
                            fuse_flags: 0,
                        },
                    )
                    .map(|(e, ..)| format!("ino {}", e.inode)),
                1 => fs
                    .mkdir(&ctx, parent, &name, 0o755, 0)
                    .map(|e| format!("ino {}", e.inode)),
                2 => fs.unlink(&ctx, parent, &name).map(|_| "ok".into()),
                3 => fs.rmdir(&ctx, parent, &name).map(|_| "ok".into()),
                4 => fs
                    .rename(&ctx, parent, &name, other, &name2, 0)
                    .map(|_| "ok".into()),
                5 => fs
                    .symlink(&ctx, &c("target"), parent, &name)
                    .map(|e| format!("ino {}", e.inode)),
                6 => match fs.lookup(&ctx, parent, &name) {
                    Ok(e) => fs
                        .setxattr(&ctx, e.inode, &c("user.k"), &data[..3], 0)
                        .map(|_| "ok".into()),
                    Err(e) => Err(e),
                },
                7 => match fs.lookup(&ctx, parent, &name) {
                    Ok(e) => fs
                        .link(&ctx, e.inode, other, &name2)
                        .map(|e| format!("ino {}", e.inode)),
                    Err(e) => Err(e),
                },
                _ => match fs.lookup(&ctx, parent, &name) {
                    Ok(e) => fs
                        .write(
                            &ctx,
                            e.inode,
                            0,
                            &mut Bytes(std::io::Cursor::new(data.clone())),
                            data.len() as u32,
                            offset,
                            None,
                            false,
                            0,
                            0,
                        )
                        .map(|n| format!("wrote {n}")),
                    Err(e) => Err(e),
                },
            };
            match r {
                Ok(s) => s,
                Err(e) => format!("errno {:?}", e.raw_os_error()),
            }
        };
        let a = run(&direct);
        let b = run(&layered);
        assert_eq!(a, b, "step {step}: op {op} answers differ");
        if !a.starts_with("errno") {
            succeeded += 1;
        }
        if op == 1 && a.starts_with("ino ") {
            dirs.push(a[4..].parse().unwrap());
        }
        dirs.retain(|d| {
            direct_store
                .get_inode(*d)
                .unwrap()
                .is_some_and(|i| i.nlink > 0)
        });
        if step % 20 == 0 {
            assert_eq!(
                tree(&*direct_store),
                tree(&*wb),
                "step {step}: trees differ"
            );
        }
    }
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    assert_eq!(tree(&*direct_store), tree(&*wb), "trees differ at the end");
    assert_eq!(
        tree(&*direct_store),
        tree(&*durable),
        "the durable volume differs after sync"
    );
    assert!(
        succeeded > 300,
        "only {succeeded} operations succeeded: the test exercises too little"
    );
    assert!(
        tree(&*durable).len() > 5,
        "the final tree is too small to mean much"
    );
}

/// The layer over a two-server [`FaultSink`] that fails and drops some
/// sends, and the store behind the sink: for the store conformance suite
/// (`store::engine::conformance`), which checks that the layer keeps the
/// store contract. With `lingering`, metadata transactions wait (600 s, on a
/// real clock) until a sync or a commit that waits sends them, so the layer
/// answers reads from its overlays; without, they leave at once, on the
/// paused clock, and the sink also loses and reorders acks.
pub(crate) fn faulty_layer(
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
