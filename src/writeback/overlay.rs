//! The namespace overlay: what reads must see before the store has it —
//! inode attributes ([`Overlay`]), directory entries, symlink targets and
//! extended attributes set by unacknowledged transactions — and what the
//! layer knows without asking the store: extended attributes
//! ([`KnownXattrs`]) and every entry of the directories created in this
//! session ([`CompleteDirs`]); and the byte ranges that unacknowledged
//! truncates and punched holes zeroed ([`Holes`]), which the page cache
//! alone cannot show once it no longer holds their pages. Overlay entries
//! retire with the ack of the transaction that set them (`ack.rs`).
//!
//! What is kept beyond unacknowledged changes is a cache: each part holds
//! to its share of the metadata budget (`budget.rs`), in accounted bytes
//! and so in entries, evicting what the store has when over it, and an
//! inode the guest forgets loses its clean pages where the store reads
//! from local files (`State::forget_cached`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::mem::size_of;

use super::ack::lock;
use super::budget::{
    name_heap_bytes, table_bytes, ATTR_ENTRY_BYTES, DIR_ENTRY_BYTES, NAME_ENTRY_BYTES,
    NO_XATTR_ENTRY_BYTES, READ_POS_ENTRY_BYTES,
};
use super::cache::PAGE_SIZE;
use super::queue::TxnEntry;
use super::{Shared, State};
use crate::store::{Dirent, FileKind, Inode, Op, StoreError};

/// The newest attributes of an inode: set by transactions the store may
/// not have yet, or read from the store (`txn == 0`).
#[derive(Clone, Debug)]
pub(super) struct Overlay {
    /// `None`: removed.
    pub(super) inode: Option<Inode>,
    /// The newest transaction that set it (0: read from the store).
    pub(super) txn: u64,
}

/// Per inode (a directory, or the owner of extended attributes), per name:
/// the newest value (`None`: removed) and the transaction that set it.
pub(super) type NameOverlay<V> = HashMap<u64, BTreeMap<Vec<u8>, (Option<V>, u64)>>;

impl State {
    /// Make `op`, carried by the unacknowledged transaction `txn`, visible
    /// to reads at once: in the page cache and the namespace overlay.
    pub(super) fn reflect(&mut self, op: &Op, txn: u64) {
        if let Some(ino) = self.complete_dirs.apply(op) {
            self.known_xattrs.created(ino);
        }
        self.known_names.apply(op);
        self.listings.apply(op);
        match op {
            Op::PutInode(i) => {
                self.remember_attrs(
                    i.ino,
                    Overlay {
                        inode: Some(i.clone()),
                        txn,
                    },
                );
            }
            Op::RemoveInode { ino } => {
                self.remember_attrs(*ino, Overlay { inode: None, txn });
                self.cache.remove_inode(*ino);
                self.symlinks.remove(ino);
                // Its attributes are gone with it: the store drops them.
                self.xattrs.remove(ino);
                self.known_xattrs.forget(*ino);
                // And so is the data it lost to a full volume.
                self.no_space.remove(ino);
            }
            Op::PutDirent { parent, dirent } => {
                self.dirents
                    .entry(*parent)
                    .or_default()
                    .insert(dirent.name.clone(), (Some(dirent.clone()), txn));
            }
            Op::RemoveDirent { parent, name } => {
                self.dirents
                    .entry(*parent)
                    .or_default()
                    .insert(name.clone(), (None, txn));
            }
            Op::SetSymlink { ino, target } => {
                self.symlinks.insert(*ino, (target.clone(), txn));
            }
            Op::SetXattr { ino, name, value } => {
                self.known_xattrs.forget(*ino);
                self.xattrs
                    .entry(*ino)
                    .or_default()
                    .insert(name.clone(), (Some(value.clone()), txn));
            }
            Op::RemoveXattr { ino, name } => {
                self.known_xattrs.forget(*ino);
                self.xattrs
                    .entry(*ino)
                    .or_default()
                    .insert(name.clone(), (None, txn));
            }
            Op::Truncate { ino, size } => {
                self.untag_cut(*ino, size.div_ceil(PAGE_SIZE));
                self.cache.truncate(*ino, *size);
                self.holes.cut(*ino, *size, u64::MAX, txn);
            }
            Op::PunchHole { ino, offset, len } => {
                self.cache.zero(*ino, *offset, *len);
                self.holes
                    .cut(*ino, *offset, offset.saturating_add(*len), txn);
            }
            Op::Write { ino, offset, data } => self.cache.overwrite(*ino, *offset, data),
        }
    }

    /// The guest no longer holds `ino`: drop its read position and, when
    /// `pages`, its clean pages; returns how many pages went. Remembered
    /// attributes, extended attributes and the names of a directory
    /// created in this session stay: their shares of the budget bound them
    /// (`trim_meta`), and they are what answers a `stat` after the guest
    /// dropped its caches without a store round trip, which on a remote
    /// volume is the difference between microseconds and an RTT per file.
    pub(super) fn forget_cached(&mut self, ino: u64, pages: bool) -> u64 {
        self.last_read_end.remove(&ino);
        self.eager_sync.remove(&ino);
        if pages {
            self.cache.forget_clean(ino)
        } else {
            0
        }
    }

    /// Remember the attributes of `ino` (`State::attrs`). The table is
    /// held to its share by what it allocates, not by what it holds: when
    /// it is full and growing would take it past the share, clean
    /// attributes (the store has them) go first, a quarter of it, so that
    /// it never doubles for them.
    pub(super) fn remember_attrs(&mut self, ino: u64, overlay: Overlay) {
        let cap = self.attrs.capacity();
        if self.attrs.len() >= cap
            && !self.attrs.contains_key(&ino)
            && (cap.max(4) * 2) as u64 * ATTR_ENTRY_BYTES > self.meta_shares.attrs
        {
            let txns = &self.txns;
            evict_clean_attrs(&mut self.attrs, txns, cap / 4 + 1);
        }
        self.attrs.insert(ino, overlay);
    }

    /// Hold the remembered attributes and read positions to their shares.
    /// A table of attributes that grew past its share (it holds those of
    /// unacknowledged transactions, which cannot go) keeps at most half
    /// of what a table of the share's size holds, of the clean ones, and
    /// shrinks, so that its allocation fits the share again.
    pub(super) fn trim_meta(&mut self) {
        let State {
            attrs,
            txns,
            meta_shares,
            last_read_end,
            ..
        } = self;
        if attrs.capacity() as u64 * ATTR_ENTRY_BYTES > meta_shares.attrs {
            let keep = (meta_shares.attrs / ATTR_ENTRY_BYTES / 2) as usize;
            evict_clean_attrs(attrs, txns, attrs.len().saturating_sub(keep));
            attrs.shrink_to(attrs.len());
        }
        if last_read_end.len() as u64 * READ_POS_ENTRY_BYTES > meta_shares.reads {
            last_read_end.clear();
        }
    }

    /// What the metadata caches hold: accounted bytes and entries.
    pub(super) fn meta_usage(&self) -> (u64, u64) {
        let bytes = self.attrs.capacity() as u64 * ATTR_ENTRY_BYTES
            + self.last_read_end.len() as u64 * READ_POS_ENTRY_BYTES
            + self.known_xattrs.bytes
            + self.complete_dirs.bytes
            + self.known_names.size().0;
        let entries = (self.attrs.len() + self.last_read_end.len()) as u64
            + self.known_xattrs.entries()
            + self.complete_dirs.entries()
            + self.known_names.size().1;
        (bytes, entries)
    }
}

/// Forget up to `count` remembered attribute sets that no unacknowledged
/// transaction set, in no particular order.
fn evict_clean_attrs(
    attrs: &mut HashMap<u64, Overlay>,
    txns: &BTreeMap<u64, TxnEntry>,
    count: usize,
) {
    let mut excess = count;
    attrs.retain(|_, o| {
        if excess == 0 || txns.contains_key(&o.txn) {
            return true;
        }
        excess -= 1;
        false
    });
}

impl State {
    /// A truncate drops the pages of `ino` from `first` on: they leave the
    /// transactions that carry them, which send what they pinned, if sent,
    /// and nothing of those pages if not. A later write may bring such a
    /// page back under a newer tag; an older transaction must neither send
    /// that page nor untag it at its ack.
    fn untag_cut(&mut self, ino: u64, first: u64) {
        for (idx, tags) in self.cache.tagged_from(ino, first) {
            for tag in tags {
                let Some(pages) = self.txns.get_mut(&tag).map(|t| &mut t.pages) else {
                    continue;
                };
                if let Some(idxs) = pages.get_mut(&ino) {
                    idxs.remove(&idx);
                    if idxs.is_empty() {
                        pages.remove(&ino);
                    }
                }
            }
        }
    }
}

/// The byte ranges that unacknowledged truncates (from the new size on)
/// and punched holes zeroed, per inode. Until the transaction that cut a
/// range is acknowledged, the store may still hold the old bytes there, so
/// whatever is read from the store goes through [`Holes::zero`] before a
/// reader or the page cache sees it. Newer bytes in a range (a later write)
/// sit in dirty pages, which the cache never evicts before their ack, and
/// an inode's transactions are acknowledged in order: by the time a later
/// write's page is clean, every range cut before it has retired.
#[derive(Default)]
pub(super) struct Holes {
    by_inode: HashMap<u64, Vec<Hole>>,
    /// Bumped whenever a range retires: a store read that started before
    /// may predate the cut and must not be kept (`read_store`).
    pub(super) retired: u64,
}

struct Hole {
    start: u64,
    end: u64,
    /// The transaction that cut it.
    txn: u64,
}

impl Holes {
    fn cut(&mut self, ino: u64, start: u64, end: u64, txn: u64) {
        if start < end {
            self.by_inode
                .entry(ino)
                .or_default()
                .push(Hole { start, end, txn });
        }
    }

    /// Zero the bytes of `buf`, read from the store at `offset` of `ino`,
    /// that lie in a range cut by an unacknowledged transaction.
    pub(super) fn zero(&self, ino: u64, offset: u64, buf: &mut [u8]) {
        let Some(holes) = self.by_inode.get(&ino) else {
            return;
        };
        let end = offset.saturating_add(buf.len() as u64);
        for h in holes {
            let (from, to) = (h.start.max(offset), h.end.min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize].fill(0);
            }
        }
    }

    /// Whether a range cut by an unacknowledged transaction overlaps `len`
    /// bytes at `offset` of `ino`.
    pub(super) fn touches(&self, ino: u64, offset: u64, len: usize) -> bool {
        let end = offset.saturating_add(len as u64);
        self.by_inode
            .get(&ino)
            .is_some_and(|holes| holes.iter().any(|h| h.start < end && offset < h.end))
    }

    /// Transaction `txn`, which touched `ino`, is acknowledged: the store
    /// has the zeros it cut.
    pub(super) fn retire(&mut self, ino: u64, txn: u64) {
        let Some(holes) = self.by_inode.get_mut(&ino) else {
            return;
        };
        let before = holes.len();
        holes.retain(|h| h.txn != txn);
        if holes.len() != before {
            self.retired += 1;
        }
        if holes.is_empty() {
            self.by_inode.remove(&ino);
        }
    }
}

/// Extended attributes known without asking the store, so that the
/// kernel's question for `security.capability` before a write costs no
/// round trip: values read from the store (`None`: absent), and inodes
/// created in this session whose attributes never changed (they have none).
/// Any change of an inode's attributes forgets what is known of it.
#[derive(Default)]
pub(super) struct KnownXattrs {
    read: HashMap<u64, HashMap<Vec<u8>, Option<Vec<u8>>>>,
    read_len: usize,
    none: HashSet<u64>,
    /// Bumped by every change: a store read that raced with one is not kept.
    pub(super) generation: u64,
    /// Accounted bytes of `read` and `none`, and the most they may take:
    /// over it, all of `read` (or `none`) is forgotten.
    bytes: u64,
    max_bytes: u64,
}

/// Extended attributes (names and absences) and created inodes that
/// `KnownXattrs` remembers at most, each; values up to
/// `KNOWN_XATTR_VALUE_MAX` bytes.
const KNOWN_XATTRS_MAX: usize = 65_536;
const KNOWN_XATTR_VALUE_MAX: usize = 256;

/// Accounted bytes of one remembered extended attribute.
fn xattr_cost(name: &[u8], value: &Option<Vec<u8>>) -> u64 {
    NAME_ENTRY_BYTES + (name.len() + value.as_ref().map_or(0, Vec::len)) as u64
}

impl KnownXattrs {
    pub(super) fn new(max_bytes: u64) -> KnownXattrs {
        KnownXattrs {
            max_bytes,
            ..KnownXattrs::default()
        }
    }

    fn entries(&self) -> u64 {
        (self.read_len + self.none.len()) as u64
    }

    fn none_bytes(&self) -> u64 {
        self.none.len() as u64 * NO_XATTR_ENTRY_BYTES
    }

    fn clear_read(&mut self) {
        self.bytes = self.none_bytes();
        self.read = HashMap::new();
        self.read_len = 0;
    }

    /// Forget what is known of `ino` without counting it as a change (the
    /// guest forgot the inode; nothing about it changed).
    fn drop_inode(&mut self, ino: u64) {
        if self.none.remove(&ino) {
            self.bytes -= NO_XATTR_ENTRY_BYTES;
        }
        if let Some(m) = self.read.remove(&ino) {
            self.read_len -= m.len();
            self.bytes -= m.iter().map(|(n, v)| xattr_cost(n, v)).sum::<u64>();
        }
    }

    /// `Some(value)` when known (`Some(None)`: absent); `None`: ask the store.
    pub(super) fn get(&self, ino: u64, name: &[u8]) -> Option<Option<Vec<u8>>> {
        if let Some(v) = self.read.get(&ino).and_then(|m| m.get(name)) {
            return Some(v.clone());
        }
        self.none.contains(&ino).then_some(None)
    }

    /// Whether `ino` is known to have no extended attribute at all.
    pub(super) fn has_none(&self, ino: u64) -> bool {
        self.none.contains(&ino)
    }

    /// Keep what the store answered, unless something changed since
    /// `generation` was taken (before the read).
    pub(super) fn remember(
        &mut self,
        generation: u64,
        ino: u64,
        name: &[u8],
        value: &Option<Vec<u8>>,
    ) {
        if generation != self.generation
            || value
                .as_ref()
                .is_some_and(|v| v.len() > KNOWN_XATTR_VALUE_MAX)
        {
            return;
        }
        let cost = xattr_cost(name, value);
        if self.read_len >= KNOWN_XATTRS_MAX || self.bytes + cost > self.max_bytes {
            self.clear_read();
        }
        if self.bytes + cost > self.max_bytes {
            return;
        }
        let old = self
            .read
            .entry(ino)
            .or_default()
            .insert(name.to_vec(), value.clone());
        match old {
            None => self.read_len += 1,
            Some(old) => self.bytes -= xattr_cost(name, &old),
        }
        self.bytes += cost;
    }

    /// `ino` was created in this session: it has no extended attributes.
    fn created(&mut self, ino: u64) {
        if self.none.len() >= KNOWN_XATTRS_MAX || self.bytes + NO_XATTR_ENTRY_BYTES > self.max_bytes
        {
            self.bytes -= self.none_bytes();
            self.none = HashSet::new();
        }
        if self.bytes + NO_XATTR_ENTRY_BYTES <= self.max_bytes && self.none.insert(ino) {
            self.bytes += NO_XATTR_ENTRY_BYTES;
        }
    }

    /// An extended attribute of `ino` changed (or `ino` was removed).
    fn forget(&mut self, ino: u64) {
        self.generation += 1;
        self.drop_inode(ino);
    }
}

/// What this session created (see `State::complete_dirs`).
///
/// A directory is tracked from its creation on; once it is dropped (the
/// guest forgot it, or the entries outgrew their share) it is never
/// tracked again, since only a creation starts tracking.
#[derive(Default)]
pub(super) struct CompleteDirs {
    /// Id ranges reserved in this session, newest last (bounded).
    reserved: VecDeque<(u64, u64)>,
    /// Every entry of each directory created in this session.
    entries: HashMap<u64, TrackedDir>,
    count: usize,
    /// Accounted bytes of `entries`, and the most they may take: over it,
    /// the directories tracked longest are dropped until a quarter is free.
    bytes: u64,
    max_bytes: u64,
    /// Tracked directories, oldest first (some may be dropped already).
    order: VecDeque<u64>,
    /// The highest inode created in this session: a PutInode of a reserved
    /// id above it is a creation (ids are handed out in increasing order).
    max_created: u64,
}

/// Entries remembered in `CompleteDirs` at most.
const COMPLETE_DIR_ENTRIES_MAX: usize = 1 << 18;
/// Reserved id ranges remembered at most.
const RESERVED_RANGES_MAX: usize = 1024;

/// The entries of one directory created in this session.
#[derive(Default)]
struct TrackedDir {
    names: HashMap<Vec<u8>, Dirent>,
    /// Bytes its table was counted at: the most it allocated (a table
    /// never shrinks here, and `capacity()` dips while removed entries
    /// leave tombstones, so the figure is kept, not recomputed).
    table_bytes: u64,
}

/// Bytes of one entry of a tracked directory's table: key and value.
const DIRENT_ENTRY_BYTES: u64 = size_of::<(Vec<u8>, Dirent)>() as u64;

/// Bytes a tracked directory's table of `capacity` entries has allocated.
fn dir_table_bytes(capacity: usize) -> u64 {
    table_bytes(capacity, DIRENT_ENTRY_BYTES)
}

impl CompleteDirs {
    pub(super) fn new(max_bytes: u64) -> CompleteDirs {
        CompleteDirs {
            max_bytes,
            ..CompleteDirs::default()
        }
    }

    fn entries(&self) -> u64 {
        (self.entries.len() + self.count) as u64
    }

    /// Directories tracked, and their names.
    pub(super) fn size(&self) -> (u64, u64) {
        (self.entries.len() as u64, self.count as u64)
    }

    /// Start tracking `dir`, just created (so not tracked yet).
    fn track(&mut self, dir: u64) {
        if self.entries.insert(dir, TrackedDir::default()).is_none() {
            self.bytes += DIR_ENTRY_BYTES;
        }
        // Directories dropped already linger in `order` until trimmed.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|d| entries.contains_key(d));
        }
        self.order.push_back(dir);
    }

    /// Stop tracking `dir`.
    fn drop_dir(&mut self, dir: u64) {
        if let Some(tracked) = self.entries.remove(&dir) {
            self.count -= tracked.names.len();
            self.bytes -= DIR_ENTRY_BYTES
                + tracked.table_bytes
                + tracked
                    .names
                    .keys()
                    .map(|n| name_heap_bytes(n))
                    .sum::<u64>();
        }
    }

    /// Drop the directories tracked longest until the entries are within
    /// three quarters of their bounds.
    fn trim(&mut self) {
        while (self.bytes > self.max_bytes * 3 / 4 || self.count > COMPLETE_DIR_ENTRIES_MAX * 3 / 4)
            && !self.entries.is_empty()
        {
            match self.order.pop_front() {
                Some(dir) => self.drop_dir(dir),
                None => break,
            }
        }
        if self.entries.is_empty() {
            self.order.clear();
        }
    }

    pub(super) fn reserved(&mut self, first: u64, count: u64) {
        if self.reserved.len() >= RESERVED_RANGES_MAX {
            self.reserved.pop_front();
        }
        self.reserved
            .push_back((first, first.saturating_add(count)));
    }

    fn is_fresh(&self, ino: u64) -> bool {
        self.reserved.iter().any(|&(a, b)| a <= ino && ino < b)
    }

    /// Follow one op; called for every metadata op, in order. Returns the
    /// inode this op creates, if it is a creation.
    fn apply(&mut self, op: &Op) -> Option<u64> {
        let mut created = None;
        if let Op::PutInode(i) = op {
            if i.ino > self.max_created && self.is_fresh(i.ino) {
                self.max_created = i.ino;
                created = Some(i.ino);
            }
        }
        match op {
            Op::PutInode(i) if created.is_some() && i.kind == FileKind::Directory => {
                self.track(i.ino)
            }
            Op::PutDirent { parent, dirent } => {
                if let Some(dir) = self.entries.get_mut(parent) {
                    if dir
                        .names
                        .insert(dirent.name.clone(), dirent.clone())
                        .is_none()
                    {
                        self.count += 1;
                        self.bytes += name_heap_bytes(&dirent.name);
                        let table = dir_table_bytes(dir.names.capacity());
                        if table > dir.table_bytes {
                            self.bytes += table - dir.table_bytes;
                            dir.table_bytes = table;
                        }
                    }
                }
            }
            Op::RemoveDirent { parent, name } => {
                if let Some(dir) = self.entries.get_mut(parent) {
                    if dir.names.remove(name).is_some() {
                        self.count -= 1;
                        self.bytes -= name_heap_bytes(name);
                    }
                }
            }
            Op::RemoveInode { ino } => self.drop_dir(*ino),
            _ => {}
        }
        if self.bytes > self.max_bytes || self.count > COMPLETE_DIR_ENTRIES_MAX {
            self.trim();
        }
        created
    }

    /// The entry `name` of `parent` when `parent` is a directory created in
    /// this session: `Some(None)` is known absent; `None` is "ask the store".
    pub(super) fn lookup(&self, parent: u64, name: &[u8]) -> Option<Option<Dirent>> {
        self.entries
            .get(&parent)
            .map(|dir| dir.names.get(name).cloned())
    }

    /// Whether every entry of `dir` is known (a directory created in this
    /// session, still tracked).
    pub(super) fn holds(&self, dir: u64) -> bool {
        self.entries.contains_key(&dir)
    }

    /// The entries of `parent` after cookie `after`, at most `max`, in
    /// cookie order, as the store will list them once it has every
    /// transaction: when `parent` is a directory created in this session.
    /// `None`: ask the store. Linear in the directory's size, not
    /// `n log n`: only the batch returned is sorted.
    pub(super) fn readdir(&self, parent: u64, after: u64, max: usize) -> Option<Vec<Dirent>> {
        let dir = &self.entries.get(&parent)?.names;
        let mut next: Vec<&Dirent> = dir.values().filter(|d| d.cookie > after).collect();
        if max < next.len() {
            if max == 0 {
                return Some(Vec::new());
            }
            next.select_nth_unstable_by_key(max - 1, |d| d.cookie);
            next.truncate(max);
        }
        next.sort_unstable_by_key(|d| d.cookie);
        Some(next.into_iter().cloned().collect())
    }
}

impl Shared {
    /// The attributes of `ino` as the guest last set them. The daemon is
    /// the volume's only writer and every change passes through here, so
    /// attributes read from the store are kept (bounded) and a write needs
    /// no round trip for them — nor a reachable store.
    pub(super) fn current_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        if let Some(o) = lock(&self.state).attrs.get(&ino) {
            return Ok(o.inode.clone());
        }
        let inode = self.store.get_inode(ino)?;
        let mut st = lock(&self.state);
        // A newer change that raced in wins over what the store said.
        if let Some(o) = st.attrs.get(&ino) {
            return Ok(o.inode.clone());
        }
        st.remember_attrs(
            ino,
            Overlay {
                inode: inode.clone(),
                txn: 0,
            },
        );
        st.trim_meta();
        Ok(inode)
    }
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;
