//! The sender: a task on the layer's own runtime that sends every
//! transaction that may go (the oldest of each of its inodes, within the
//! in-flight and wire bounds, past its backoff), pinning its pages on the
//! first send so that every resend carries the same bytes. Each attempt
//! ends in `ack.rs`.
//!
//! The state lock is held only to choose what goes and to take references
//! to what it carries (the pinned page buffers, the operations); the
//! transaction each attempt sends is built after the lock is released, and
//! its writes are lists of those same page buffers, never copies.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::ack::{invariant_violated, lock, on_result};
use super::cache::{Pinned, PAGE_SIZE};
use super::queue::{TxnState, MAX_QUEUED_TXNS};
use super::{Shared, State};
use crate::store::sink::{OnDone, SendError};
use crate::store::{Op, Txn, WriteData};

/// The sender: picks transactions that may go (oldest of all their inodes,
/// within the in-flight bound, past their backoff), pins their pages and
/// sends them; resends on timeouts.
pub(super) async fn pump(shared: Arc<Shared>) {
    loop {
        let (wake_at, attempts) = {
            let mut st = lock(&shared.state);
            if st.shutdown {
                return;
            }
            shared.metrics.sender_wakes.inc();
            st.pump_nudged = false;
            let (next_wake, attempts) = dispatch(&shared, &mut st);
            let now = Instant::now();
            let wake_at = next_wake
                .unwrap_or(now + IDLE_WAKE)
                .max(now + Duration::from_millis(1));
            st.pump_wakes_at = Some(wake_at);
            (wake_at, attempts)
        };
        for a in attempts {
            launch(&shared, a);
        }
        let _ = tokio::time::timeout_at(wake_at, shared.pump.notified()).await;
    }
}

/// How long the sender sleeps with nothing due.
const IDLE_WAKE: Duration = Duration::from_millis(100);

/// Whether lingering transactions go at once: near the dirty bound (or a
/// full queue) lingering would hold writers back instead.
pub(super) fn hurry(shared: &Shared, st: &State) -> bool {
    st.dirty_bytes >= shared.cfg.dirty_max_bytes / 4 * 3 || st.txns.len() >= MAX_QUEUED_TXNS / 4 * 3
}

/// One attempt, chosen under the state lock: references to what it
/// carries. Its transaction is built outside the lock ([`wire_txn`]).
struct Attempt {
    id: u64,
    attempt: u64,
    server: usize,
    low_water: u64,
    pinned: Option<Arc<[Pinned]>>,
    ops: Arc<Vec<Op>>,
}

/// Build an attempt's transaction and send it; its end goes to `ack.rs`.
/// A sink that runs attempts on threads of its own (the embedded engine)
/// reports there: the ack completes the transaction and wakes the fsync
/// waiting for it without a hop back to this runtime.
fn launch(shared: &Arc<Shared>, a: Attempt) {
    let wire = wire_txn(a.pinned.as_deref().unwrap_or_default(), &a.ops);
    drop(a.ops);
    let Attempt {
        id,
        attempt,
        server,
        low_water,
        ..
    } = a;
    let sh = Arc::clone(shared);
    // Its clock (tests pause it) and its tasks are this runtime's.
    let rt = tokio::runtime::Handle::current();
    let done: OnDone = Box::new(move |result| {
        let _rt = rt.enter();
        on_result(&sh, id, attempt, server, result);
    });
    let Err((wire, _)) = shared.sink.send_then(server, id, low_water, wire, done) else {
        return;
    };
    let sh = Arc::clone(shared);
    tokio::spawn(async move {
        let result = match tokio::time::timeout(
            sh.cfg.ack_timeout,
            sh.sink.send(server, id, low_water, wire),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(SendError::Retry(format!(
                "no ack within {:?}",
                sh.cfg.ack_timeout
            ))),
        };
        on_result(&sh, id, attempt, server, result);
    });
}

/// Choose every transaction that may go now and mark it in flight;
/// returns when to look again and the attempts to launch once the lock is
/// released. It looks only at the transactions in `ready` (oldest first),
/// not at every unacknowledged one: with a long queue behind one inode (a
/// directory's creates, a file's writes) a scan of them all at every wake
/// was most of the daemon's CPU.
fn dispatch(shared: &Arc<Shared>, st: &mut State) -> (Option<Instant>, Vec<Attempt>) {
    let now = Instant::now();
    let mut attempts = Vec::new();
    let mut wake: Option<Instant> = None;
    // Another daemon writes to the volume: final, nothing goes.
    if st.superseded.is_some() {
        return (None, attempts);
    }
    let low_water = st.txns.keys().next().copied().unwrap_or(st.next_id);
    // Bytes on the wire may be copied once per attempt (a remote store's
    // frame): keep them to a quarter of the dirty bound, but never block
    // the only one.
    let wire_cap = shared.cfg.dirty_max_bytes / 4;
    // Lingering gathers changes into fewer commits; near the dirty bound
    // (or a full queue) it would hold writers back instead: send at once.
    let hurry = hurry(shared, st);
    let mut next = 0;
    while st.in_flight < shared.cfg.max_in_flight {
        let Some(&id) = st.ready.range(next..).next() else {
            break;
        };
        next = id + 1;
        let Some(t) = st.txns.get(&id).filter(|t| t.state == TxnState::Queued) else {
            st.ready.remove(&id);
            continue;
        };
        let oldest_everywhere = t
            .inodes
            .iter()
            .all(|ino| st.by_inode.get(ino).and_then(|q| q.front()) == Some(&id));
        if !oldest_everywhere {
            // Back in `ready` when the older transaction is acknowledged.
            st.ready.remove(&id);
            continue;
        }
        if let Some(nb) = t.not_before {
            let lingers = t.attempts == 0 && !t.waits_for_space;
            if nb > now && !(hurry && lingers) {
                wake = Some(wake.map_or(nb, |w| w.min(nb)));
                continue;
            }
        }
        if st.in_flight > 0 && st.in_flight_bytes + t.data_bytes > wire_cap {
            continue;
        }
        // Pin the pages on the first send; resends carry the same buffers.
        if t.pinned.is_none() {
            let pages = t.pages.clone();
            let pinned = st.cache.pin(&pages, id);
            if let Some(t) = st.txns.get_mut(&id) {
                t.pinned = Some(pinned.into());
            }
        }
        st.ready.remove(&id);
        let attempt = st.next_attempt;
        st.next_attempt += 1;
        st.in_flight += 1;
        st.in_flight_bytes += st.txns.get(&id).map_or(0, |t| t.data_bytes);
        if st.in_flight > shared.cfg.max_in_flight {
            invariant_violated(format_args!(
                "{} transactions in flight, bound {}",
                st.in_flight, shared.cfg.max_in_flight
            ));
        }
        let Some(t) = st.txns.get_mut(&id) else {
            continue;
        };
        t.state = TxnState::InFlight { attempt };
        t.sent_at = Some(std::time::Instant::now());
        t.attempts += 1;
        if t.attempts > 1 {
            shared.metrics.txn_resent.inc();
        }
        shared.metrics.txn_sent.inc();
        attempts.push(Attempt {
            id,
            attempt,
            server: t.server,
            low_water,
            pinned: t.pinned.clone(),
            ops: Arc::clone(&t.ops),
        });
    }
    debug_assert_ready(st);
    shared.publish(st);
    (wake, attempts)
}

/// Debug builds: no queued transaction outside `ready` could go now (it
/// is behind an older one of one of its inodes), and the in-flight
/// counts add up. A transaction missed here would never be sent.
fn debug_assert_ready(st: &State) {
    if !cfg!(debug_assertions) {
        return;
    }
    let mut in_flight = (0, 0);
    for t in st.txns.values() {
        match t.state {
            TxnState::InFlight { .. } => {
                in_flight.0 += 1;
                in_flight.1 += t.data_bytes;
            }
            TxnState::Queued if !st.ready.contains(&t.id) => {
                let oldest_everywhere = t
                    .inodes
                    .iter()
                    .all(|ino| st.by_inode.get(ino).and_then(|q| q.front()) == Some(&t.id));
                assert!(
                    !oldest_everywhere,
                    "txn {} could go but the sender does not look at it",
                    t.id
                );
            }
            TxnState::Queued => {}
        }
    }
    assert_eq!(in_flight, (st.in_flight, st.in_flight_bytes));
}

/// The transaction as the store applies it: its metadata ops with the data
/// extents (runs of contiguous pinned pages, clipped to the inode's size)
/// before its attributes. Each extent is a list of the pinned buffers
/// themselves: building it copies no byte. A partial page (`partial.rs`)
/// is an extent of its own per range it holds: the store keeps the rest.
fn wire_txn(pinned: &[Pinned], t_ops: &[Op]) -> Txn {
    let mut ops = Vec::new();
    let size_of = |ino: u64| {
        t_ops.iter().rev().find_map(|op| match op {
            Op::PutInode(i) if i.ino == ino => Some(i.size),
            _ => None,
        })
    };
    let mut push = |ino: u64, offset: u64, mut data: WriteData| {
        if let Some(size) = size_of(ino) {
            data.truncate(size.saturating_sub(offset).min(data.len() as u64) as usize);
        }
        if !data.is_empty() {
            ops.push(Op::Write { ino, offset, data });
        }
    };
    let mut i = 0;
    while i < pinned.len() {
        let (ino, start_idx, ref buf, ref known) = pinned[i];
        if let Some(known) = known {
            for r in known.ranges() {
                let offset = start_idx * PAGE_SIZE + r.start as u64;
                push(ino, offset, WriteData::from_parts([buf.slice(r)]));
            }
            i += 1;
            continue;
        }
        let mut j = i;
        while j + 1 < pinned.len()
            && pinned[j + 1].0 == ino
            && pinned[j + 1].1 == pinned[j].1 + 1
            && pinned[j + 1].3.is_none()
        {
            j += 1;
        }
        let offset = start_idx * PAGE_SIZE;
        push(
            ino,
            offset,
            WriteData::from_parts(pinned[i..=j].iter().map(|(_, _, buf, _)| buf.clone())),
        );
        i = j + 1;
    }
    ops.extend(t_ops.iter().cloned());
    Txn { ops }
}
