//! The sender: a task on the layer's own runtime that sends every
//! transaction that may go (the oldest of each of its inodes, within the
//! in-flight and wire bounds, past its backoff), pinning its pages on the
//! first send so that every resend carries the same bytes. Each attempt
//! ends in `ack.rs`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::ack::{invariant_violated, lock, on_result};
use super::cache::PAGE_SIZE;
use super::queue::{TxnEntry, TxnState};
use super::{Shared, State};
use crate::store::sink::SendError;
use crate::store::{Op, Txn};

/// The sender: picks transactions that may go (oldest of all their inodes,
/// within the in-flight bound, past their backoff), pins their pages and
/// sends them; resends on timeouts.
pub(super) async fn pump(shared: Arc<Shared>) {
    loop {
        let next_wake = {
            let mut st = lock(&shared.state);
            if st.shutdown {
                return;
            }
            dispatch(&shared, &mut st)
        };
        let wait = next_wake.map_or(Duration::from_millis(100), |t| {
            t.saturating_duration_since(Instant::now())
        });
        let _ =
            tokio::time::timeout(wait.max(Duration::from_millis(1)), shared.pump.notified()).await;
    }
}

/// Send every transaction that may go now; returns when to look again.
fn dispatch(shared: &Arc<Shared>, st: &mut State) -> Option<Instant> {
    let now = Instant::now();
    let mut wake: Option<Instant> = None;
    let low_water = st.txns.keys().next().copied().unwrap_or(st.next_id);
    let mut in_flight_bytes: u64 = st
        .txns
        .values()
        .filter(|t| matches!(t.state, TxnState::InFlight { .. }))
        .map(|t| t.data_bytes)
        .sum();
    let candidates: Vec<u64> = st
        .txns
        .values()
        .filter(|t| t.state == TxnState::Queued)
        .map(|t| t.id)
        .collect();
    for id in candidates {
        if st.in_flight >= shared.cfg.max_in_flight {
            break;
        }
        let Some(t) = st.txns.get(&id) else { continue };
        if let Some(nb) = t.not_before {
            if nb > now {
                wake = Some(wake.map_or(nb, |w| w.min(nb)));
                continue;
            }
        }
        // Bytes on the wire are copied once per attempt (the frame): keep
        // them to a quarter of the dirty bound, but never block the only one.
        let wire_cap = shared.cfg.dirty_max_bytes / 4;
        if st.in_flight > 0 && in_flight_bytes + t.data_bytes > wire_cap {
            continue;
        }
        let oldest_everywhere = t
            .inodes
            .iter()
            .all(|ino| st.by_inode.get(ino).and_then(|q| q.front()) == Some(&id));
        if !oldest_everywhere {
            continue;
        }
        // Pin the pages on the first send; resends carry the same buffers.
        if t.pinned.is_none() {
            let pages = t.pages.clone();
            let pinned = st.cache.pin(&pages);
            if let Some(t) = st.txns.get_mut(&id) {
                t.pinned = Some(pinned);
            }
        }
        let attempt = st.next_attempt;
        st.next_attempt += 1;
        st.in_flight += 1;
        in_flight_bytes += st.txns.get(&id).map_or(0, |t| t.data_bytes);
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
        t.attempts += 1;
        if t.attempts > 1 {
            shared.metrics.txn_resent.inc();
        }
        shared.metrics.txn_sent.inc();
        let wire = wire_txn(t);
        let server = t.server;
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
    shared.publish(st);
    wake
}

/// The transaction as the store applies it: its metadata ops with the data
/// extents (runs of contiguous pinned pages, clipped to the inode's size)
/// before its attributes.
fn wire_txn(t: &TxnEntry) -> Txn {
    let mut ops = Vec::new();
    if let Some(pinned) = &t.pinned {
        let size_of = |ino: u64| {
            t.ops.iter().rev().find_map(|op| match op {
                Op::PutInode(i) if i.ino == ino => Some(i.size),
                _ => None,
            })
        };
        let mut i = 0;
        while i < pinned.len() {
            let (ino, start_idx, _) = pinned[i];
            let mut j = i;
            while j + 1 < pinned.len()
                && pinned[j + 1].0 == ino
                && pinned[j + 1].1 == pinned[j].1 + 1
            {
                j += 1;
            }
            let offset = start_idx * PAGE_SIZE;
            let mut data = Vec::with_capacity((j - i + 1) * PAGE_SIZE as usize);
            for (_, _, buf) in &pinned[i..=j] {
                data.extend_from_slice(buf);
            }
            if let Some(size) = size_of(ino) {
                data.truncate(size.saturating_sub(offset).min(data.len() as u64) as usize);
            }
            if !data.is_empty() {
                ops.push(Op::Write { ino, offset, data });
            }
            i = j + 1;
        }
    }
    ops.extend(t.ops.iter().cloned());
    Txn { ops }
}
