//! The ordering queue: every unacknowledged transaction ([`TxnEntry`]),
//! queued behind the older transactions of each inode it touches, so that
//! it is sent only when it is the oldest of all of them. Transactions are
//! formed and joined by the write path (`write.rs`), sent by the sender
//! (`sender.rs`) and retired by their ack (`ack.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::cache;
use super::{Shared, State};
use crate::store::Op;

/// Where a transaction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TxnState {
    /// Formed, not sent (or waiting to be resent after `not_before`).
    Queued,
    /// An attempt is on its way; `attempt` numbers it.
    InFlight { attempt: u64 },
}

/// One unacknowledged transaction.
pub(super) struct TxnEntry {
    pub(super) id: u64,
    /// Metadata ops, in order; data transactions end with the inode's
    /// PutInode. Shared with the attempts in flight (fixed once sent).
    pub(super) ops: Arc<Vec<Op>>,
    /// The pages it carries, by inode (its tags on those pages).
    pub(super) pages: BTreeMap<u64, BTreeSet<u64>>,
    /// Page buffers pinned when first sent; resends carry exactly these.
    pub(super) pinned: Option<Arc<[cache::Pinned]>>,
    /// Every inode it touches, for ordering.
    pub(super) inodes: BTreeSet<u64>,
    /// Page bytes it carries (whole pages, as counted against
    /// `dirty_max_bytes`).
    pub(super) data_bytes: u64,
    /// Bytes of its operations as the wire encodes them, at most
    /// ([`op_wire_bytes`]): bounded by `TXN_META_BYTES_MAX`.
    pub(super) meta_bytes: u64,
    /// Bytes held against `dirty_max_bytes` for its operations of metadata
    /// changes ([`held_bytes`]: wire bytes and memory). The attributes a
    /// write carries with its pages are not counted (its pages are).
    pub(super) dirty_meta_bytes: u64,
    /// Only data of one inode: later writes may merge into it until sent.
    pub(super) mergeable: bool,
    pub(super) state: TxnState,
    pub(super) server: usize,
    pub(super) attempts_here: u32,
    pub(super) attempts: u32,
    pub(super) not_before: Option<Instant>,
    pub(super) last_error: Option<String>,
    pub(super) formed: Instant,
    /// When the attempt in flight went out (for the commit latency).
    pub(super) sent_at: Option<std::time::Instant>,
    /// The store refused it for lack of space and it had no page data to
    /// drop: it is retried, and a sync of its inodes fails with ENOSPC.
    pub(super) waits_for_space: bool,
}

impl TxnEntry {
    /// Whether later metadata may join this transaction: it must be
    /// unsent (its content is fixed from the first attempt on, since a
    /// resend must be the same transaction) and not a write's own
    /// transaction (`mergeable`: data of one inode, merged with its later
    /// writes). A metadata transaction that writes have joined (the create
    /// of a small file, its first write) still takes more: the next create
    /// in the directory joins it, so a burst of small files is one commit.
    /// Its data goes on the wire before its operations, and what joins
    /// after the data is newer than it, so the order holds; a write never
    /// joins after an operation it must follow ([`Self::data_may_join`]).
    pub(super) fn metadata_may_join(&self) -> bool {
        self.is_unsent() && !self.mergeable
    }

    /// A change joined it: if it lingers (never sent, `not_before` set
    /// at its forming), it lingers `linger` from `now`, within
    /// [`META_LINGER_SPAN_MAX`] lingers of its forming. A sync has cut its
    /// linger (`not_before` cleared) for good: that stays.
    pub(super) fn linger_on(&mut self, now: Instant, linger: std::time::Duration) {
        if self.attempts != 0 {
            return;
        }
        if let Some(nb) = self.not_before {
            let span_end = self.formed + linger * META_LINGER_SPAN_MAX;
            self.not_before = Some((now + linger).min(span_end).max(nb));
        }
    }

    /// Queued and never sent: its content may still change.
    fn is_unsent(&self) -> bool {
        self.state == TxnState::Queued && self.attempts == 0 && self.pinned.is_none()
    }

    /// Whether a write of `ino` may join this queued transaction: it must
    /// be unsent, and its data goes on the wire before its operations, so
    /// none of them may be one that the data must follow (a truncate,
    /// punch-hole, removal or write of the same inode).
    pub(super) fn data_may_join(&self, ino: u64) -> bool {
        if !self.is_unsent() {
            return false;
        }
        self.mergeable
            || !self.ops.iter().any(|op| match op {
                Op::Truncate { ino: i, .. }
                | Op::PunchHole { ino: i, .. }
                | Op::RemoveInode { ino: i }
                | Op::Write { ino: i, .. } => *i == ino,
                _ => false,
            })
    }
}

/// A lingering transaction lingers `meta_linger` past the newest change
/// that joined it, but never longer than this many times `meta_linger`
/// past its forming: a burst whose changes come a little slower than one
/// per linger (a TCG guest creates a small file every ~3 ms) still
/// gathers into one commit, and no transaction lingers unbounded.
pub(super) const META_LINGER_SPAN_MAX: u32 = 8;

/// Unacknowledged transactions at most; metadata operations beyond wait.
pub(super) const MAX_QUEUED_TXNS: usize = 65_536;

/// Page bytes one transaction carries at most, whatever `max_txn_bytes`
/// says (a single write, at most 1 MiB over 257 pages, fits).
pub(super) const TXN_DATA_BYTES_MAX: u64 = 4 << 20;

/// Bytes of operations one transaction carries at most ([`op_wire_bytes`]):
/// sixteen 64 KiB extended attributes, or thousands of creates.
pub(super) const TXN_META_BYTES_MAX: u64 = 1 << 20;

/// Operations one transaction carries at most, whatever `max_txn_ops` says.
pub(super) const TXN_OPS_MAX: usize = 16_384;

/// Bytes an operation's fixed fields take on the wire at most (a
/// `PutInode` takes 82: tag, ten integers, three timestamps).
const OP_FIXED_WIRE_BYTES: u64 = 96;

/// Bytes a metadata operation holds in daemon memory while its transaction
/// is unacknowledged beyond its wire bytes: its slot in the transaction's
/// list (`size_of::<Op>()`, over 100), its entries in the queue per inode,
/// the transaction's set of inodes and the namespace overlay. Measured on
/// the host (`pohmelfs mount` on `pohmel://`, the store server stopped):
/// 20,000 creates held grew the daemon by 22.6 MiB, ~1.2 KiB each, of
/// which the metadata caches' shares hold ~0.4 KiB; the rest, ~0.7 KiB,
/// is three operations (two inodes' attributes and an entry) of ~0.1 KiB
/// on the wire each.
pub(super) const OP_HELD_BYTES: u64 = 256;

/// Bytes of a transaction's frame besides its operations (its id, low
/// water mark and op count), rounded up.
const TXN_FRAME_BYTES: u64 = 64;

// Every transaction the layer forms fits one frame of the wire protocol,
// so none is refused for its size and retried forever. Its data goes as
// one `Write` per run of pages (one per page at most); a write that joins
// a metadata transaction adds its inode's `PutInode` (within
// `TXN_META_BYTES_MAX`, but beyond `TXN_OPS_MAX`: one per inode the
// transaction touches, so at most one per operation).
const _: () = {
    use crate::net::proto::{MAX_OPS, MAX_PAYLOAD};
    let pages = TXN_DATA_BYTES_MAX / cache::PAGE_SIZE;
    assert!(
        TXN_DATA_BYTES_MAX + pages * OP_FIXED_WIRE_BYTES + TXN_META_BYTES_MAX + TXN_FRAME_BYTES
            <= MAX_PAYLOAD as u64
    );
    assert!(2 * TXN_OPS_MAX + pages as usize <= MAX_OPS);
};

/// Bytes `op` takes on the wire, at most.
pub(super) fn op_wire_bytes(op: &Op) -> u64 {
    let var = match op {
        Op::PutDirent { dirent, .. } => dirent.name.len(),
        Op::RemoveDirent { name, .. } | Op::RemoveXattr { name, .. } => name.len(),
        Op::SetSymlink { target, .. } => target.len(),
        Op::SetXattr { name, value, .. } => name.len() + value.len(),
        Op::Write { data, .. } => data.len(),
        Op::PutInode(_) | Op::RemoveInode { .. } | Op::Truncate { .. } | Op::PunchHole { .. } => 0,
    };
    OP_FIXED_WIRE_BYTES + var as u64
}

/// Bytes `ops` operations of `wire_bytes` on the wire count against
/// `dirty_max_bytes` while their transaction is unacknowledged: their wire
/// bytes and what each holds in memory besides.
pub(super) fn held_bytes(wire_bytes: u64, ops: usize) -> u64 {
    wire_bytes + ops as u64 * OP_HELD_BYTES
}

/// Every inode an op touches.
pub(super) fn op_inodes(op: &Op, out: &mut BTreeSet<u64>) {
    match op {
        Op::PutInode(i) => {
            out.insert(i.ino);
        }
        Op::RemoveInode { ino }
        | Op::Write { ino, .. }
        | Op::Truncate { ino, .. }
        | Op::PunchHole { ino, .. }
        | Op::SetSymlink { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. } => {
            out.insert(*ino);
        }
        Op::PutDirent { parent, dirent } => {
            out.insert(*parent);
            out.insert(dirent.ino);
        }
        Op::RemoveDirent { parent, .. } => {
            out.insert(*parent);
        }
    }
}

impl Shared {
    /// Queue a transaction; returns its id. Called with the state locked.
    pub(super) fn enqueue(&self, st: &mut State, entry: TxnEntry) -> u64 {
        let id = entry.id;
        for ino in &entry.inodes {
            st.by_inode.entry(*ino).or_default().push_back(id);
        }
        st.dirty_bytes += entry.data_bytes + entry.dirty_meta_bytes;
        let goes_at = entry.not_before;
        st.txns.insert(id, entry);
        st.ready.insert(id);
        self.metrics.txn_formed.inc();
        self.publish(st);
        self.nudge(st, goes_at);
        id
    }

    /// Wake the sender for a change that may go at `goes_at` (`None`: at
    /// once), unless it wakes by then anyway or is already told to: a
    /// burst of lingering changes costs no thread wake-up each. Where a
    /// change may make something go earlier than the sender planned (a
    /// linger cut, an ack), it is woken outright instead.
    pub(super) fn nudge(&self, st: &mut State, goes_at: Option<Instant>) {
        if st.pump_nudged {
            return;
        }
        let in_time = st
            .pump_wakes_at
            .zip(goes_at)
            .is_some_and(|(wakes, goes)| wakes <= goes);
        if !in_time || super::sender::hurry(self, st) {
            st.pump_nudged = true;
            self.wake_sender();
        }
    }

    /// Wake the sender: something may go now.
    pub(super) fn wake_sender(&self) {
        self.metrics.sender_nudges.inc();
        self.pump.notify_one();
    }

    /// [`Self::nudge`] for the queued transaction `id` as it stands.
    pub(super) fn nudge_for(&self, st: &mut State, id: u64) {
        let goes_at = st
            .txns
            .get(&id)
            .filter(|t| t.state == TxnState::Queued)
            .and_then(|t| t.not_before);
        self.nudge(st, goes_at);
    }

    pub(super) fn new_entry(st: &mut State, ops: Vec<Op>, mergeable: bool) -> TxnEntry {
        let id = st.next_id;
        st.next_id += 1;
        let mut inodes = BTreeSet::new();
        for op in &ops {
            op_inodes(op, &mut inodes);
        }
        let meta_bytes = ops.iter().map(op_wire_bytes).sum();
        TxnEntry {
            id,
            ops: Arc::new(ops),
            pages: BTreeMap::new(),
            pinned: None,
            inodes,
            data_bytes: 0,
            meta_bytes,
            dirty_meta_bytes: 0,
            mergeable,
            state: TxnState::Queued,
            server: st.preferred_server,
            attempts_here: 0,
            attempts: 0,
            not_before: None,
            last_error: None,
            formed: Instant::now(),
            sent_at: None,
            waits_for_space: false,
        }
    }
}

pub(super) fn describe(t: &TxnEntry) -> String {
    format!(
        "txn {} (inodes {:?}, {} data bytes, {} ops of {} bytes, {:?}, {} attempts, server {}, age {:?}{})",
        t.id,
        t.inodes,
        t.data_bytes,
        t.ops.len(),
        t.meta_bytes,
        t.state,
        t.attempts,
        t.server,
        t.formed.elapsed(),
        t.last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    )
}
