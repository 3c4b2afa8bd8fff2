//! The write-back layer's test kit: a fault-injecting sink whose latch
//! holds acks until a test lets them go ([`Gate`]), layers built over it
//! and `mem:`, and helpers that write, create and read through a layer.
//! Shared by every test file of the layer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pohmelfs_testkit::wait_until;
pub(super) use pohmelfs_testkit::GuestBytes;

use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::check::torture::rng::Rng;
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::sink::{Ack, SendError, SendFuture, Sink};
use crate::store::{Dirent, FileKind, Inode, OnceStore, Op, Store, Txn};

/// Bound and poll interval of [`eventually`].
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(1);

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
    pub(super) epoch: AtomicU64,
    /// Sends seen (their faults are decided when they are seen).
    pub(super) sends: AtomicU64,
    per_server: Mutex<HashMap<usize, u64>>,
    pub(super) gate: Gate,
    /// The largest transaction seen, in bytes as the wire protocol encodes
    /// it (without the frame header).
    pub(super) largest_txn_bytes: AtomicU64,
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
            largest_txn_bytes: AtomicU64::new(0),
        }
    }
    pub(super) fn set(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }
    pub(super) fn sent_to(&self, server: usize) -> u64 {
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
        let mut enc = crate::net::proto::codec::Enc::default();
        enc.u64(txn_id).u64(0).txn(&txn);
        self.largest_txn_bytes
            .fetch_max(enc.buf.len() as u64, Ordering::SeqCst);
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
        // Writes go at once: the tests count and hold their sends.
        data_linger: Duration::ZERO,
        // Small, so that tests cross the cap.
        max_txn_ops: 16,
        sync_on_close: false,
        forget_clean_pages: true,
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
pub(super) fn lingering_layer(
    seed: u64,
) -> (WritebackStore, Arc<FaultSink>, Arc<MemStore>, Arc<Metrics>) {
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

/// Wait with the kit's bounded [`wait_until`] (real time) until `cond`
/// holds; fail the test, naming `what`, at the bound.
pub(super) fn eventually(what: &str, cond: impl FnMut() -> bool) {
    let held = wait_until(WAIT, POLL, cond).is_some();
    assert!(held, "timed out waiting for {what} ({WAIT:?})");
}

/// The entry `name` in `parent` for the regular file `ino`.
pub(super) fn put_entry(parent: u64, name: &str, ino: u64) -> Op {
    Op::PutDirent {
        parent,
        dirent: Dirent {
            name: name.as_bytes().to_vec(),
            ino,
            kind: FileKind::Regular,
            cookie: ino,
        },
    }
}

pub(super) fn create_in(s: &dyn Store, parent: u64, ino: u64, name: &str) {
    let mut t = Txn::new();
    t.push(Op::PutInode(Inode::regular(ino, 0)));
    t.push(put_entry(parent, name, ino));
    s.commit(t).unwrap();
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
    // Odd seeds run the layer as over a remote store (clean pages kept,
    // parallel read-ahead, listings read ahead), even ones as over a
    // local one.
    let base = TxnConfig {
        forget_clean_pages: seed % 2 == 0,
        ..cfg(policy)
    };
    let (wb, sink, store, _) = if lingering {
        let config = TxnConfig {
            meta_linger: Duration::from_secs(600),
            ..base
        };
        layer_with(config, 2, seed, false)
    } else {
        layer_with(base, 2, seed, true)
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
