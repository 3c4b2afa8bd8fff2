//! The namespace overlay: what reads must see before the store has it —
//! inode attributes ([`Overlay`]), directory entries, symlink targets and
//! extended attributes set by unacknowledged transactions — and what the
//! layer knows without asking the store: extended attributes
//! ([`KnownXattrs`]) and every entry of the directories created in this
//! session ([`CompleteDirs`]); and the byte ranges that unacknowledged
//! truncates and punched holes zeroed ([`Holes`]), which the page cache
//! alone cannot show once it no longer holds their pages. Overlay entries
//! retire with the ack of the transaction that set them (`ack.rs`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use super::ack::lock;
use super::cache::PAGE_SIZE;
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

/// Inode attributes kept at most (beyond those of unacknowledged
/// transactions, which are always kept).
const ATTR_CACHE_MAX: usize = 100_000;

impl State {
    /// Make `op`, carried by the unacknowledged transaction `txn`, visible
    /// to reads at once: in the page cache and the namespace overlay.
    pub(super) fn reflect(&mut self, op: &Op, txn: u64) {
        if let Some(ino) = self.complete_dirs.apply(op) {
            self.known_xattrs.created(ino);
        }
        match op {
            Op::PutInode(i) => {
                self.attrs.insert(
                    i.ino,
                    Overlay {
                        inode: Some(i.clone()),
                        txn,
                    },
                );
            }
            Op::RemoveInode { ino } => {
                self.attrs.insert(*ino, Overlay { inode: None, txn });
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
    /// may predate the cut and must not be kept (`load_pages`).
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
}

/// Extended attributes (names and absences) and created inodes that
/// `KnownXattrs` remembers at most, each; values up to
/// `KNOWN_XATTR_VALUE_MAX` bytes.
const KNOWN_XATTRS_MAX: usize = 65_536;
const KNOWN_XATTR_VALUE_MAX: usize = 256;

impl KnownXattrs {
    /// `Some(value)` when known (`Some(None)`: absent); `None`: ask the store.
    pub(super) fn get(&self, ino: u64, name: &[u8]) -> Option<Option<Vec<u8>>> {
        if let Some(v) = self.read.get(&ino).and_then(|m| m.get(name)) {
            return Some(v.clone());
        }
        self.none.contains(&ino).then_some(None)
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
        if self.read_len >= KNOWN_XATTRS_MAX {
            self.read.clear();
            self.read_len = 0;
        }
        let added = self
            .read
            .entry(ino)
            .or_default()
            .insert(name.to_vec(), value.clone())
            .is_none();
        self.read_len += usize::from(added);
    }

    /// `ino` was created in this session: it has no extended attributes.
    fn created(&mut self, ino: u64) {
        if self.none.len() >= KNOWN_XATTRS_MAX {
            self.none.clear();
        }
        self.none.insert(ino);
    }

    /// An extended attribute of `ino` changed (or `ino` was removed).
    fn forget(&mut self, ino: u64) {
        self.generation += 1;
        self.none.remove(&ino);
        if let Some(m) = self.read.remove(&ino) {
            self.read_len -= m.len();
        }
    }
}

/// What this session created (see `State::complete_dirs`).
#[derive(Default)]
pub(super) struct CompleteDirs {
    /// Id ranges reserved in this session, newest last (bounded).
    reserved: VecDeque<(u64, u64)>,
    /// Every entry of each directory created in this session.
    entries: HashMap<u64, HashMap<Vec<u8>, Dirent>>,
    count: usize,
    /// Set for good once the entry bound was reached: a directory no longer
    /// tracked can never be known complete again.
    off: bool,
    /// The highest inode created in this session: a PutInode of a reserved
    /// id above it is a creation (ids are handed out in increasing order).
    max_created: u64,
}

/// Entries remembered in `CompleteDirs` at most.
const COMPLETE_DIR_ENTRIES_MAX: usize = 1 << 18;
/// Reserved id ranges remembered at most.
const RESERVED_RANGES_MAX: usize = 1024;

impl CompleteDirs {
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
        if self.off {
            return created;
        }
        match op {
            Op::PutInode(i) if created.is_some() && i.kind == FileKind::Directory => {
                self.entries.insert(i.ino, HashMap::new());
            }
            Op::PutDirent { parent, dirent } => {
                if let Some(dir) = self.entries.get_mut(parent) {
                    if dir.insert(dirent.name.clone(), dirent.clone()).is_none() {
                        self.count += 1;
                    }
                }
                if self.count > COMPLETE_DIR_ENTRIES_MAX {
                    self.off = true;
                    self.entries.clear();
                    self.count = 0;
                }
            }
            Op::RemoveDirent { parent, name } => {
                if let Some(dir) = self.entries.get_mut(parent) {
                    if dir.remove(name).is_some() {
                        self.count -= 1;
                    }
                }
            }
            Op::RemoveInode { ino } => {
                if let Some(dir) = self.entries.remove(ino) {
                    self.count -= dir.len();
                }
            }
            _ => {}
        }
        created
    }

    /// The entry `name` of `parent` when `parent` is a directory created in
    /// this session: `Some(None)` is known absent; `None` is "ask the store".
    pub(super) fn lookup(&self, parent: u64, name: &[u8]) -> Option<Option<Dirent>> {
        self.entries.get(&parent).map(|dir| dir.get(name).cloned())
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
        if st.attrs.len() >= ATTR_CACHE_MAX {
            // Forget what the store has; keep what it does not yet.
            let State { attrs, txns, .. } = &mut *st;
            attrs.retain(|_, o| txns.contains_key(&o.txn));
        }
        // A newer change that raced in wins over what the store said.
        let entry = st.attrs.entry(ino).or_insert(Overlay { inode, txn: 0 });
        Ok(entry.inode.clone())
    }
}
