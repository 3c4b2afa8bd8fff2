//! The page cache: 4 KiB pages per inode, each tagged with the transactions
//! that carry it. A page with tags is dirty and never evicted; a page
//! without tags is clean and sits in the LRU list, from which it is evicted
//! to stay within the cache size. A page buffer that a transaction has
//! pinned (sent) is never written in place: the caller waits, or the cache
//! copies it (copy-on-write).
//!
//! Page buffers are shared ([`Bytes`]): a transaction pins a page by
//! taking a reference, a read hands out references, and a write of a whole
//! page from the filesystem layer becomes the page's buffer as it is
//! ([`PageCache::adopt`]). A buffer anyone else holds is never written in
//! place, whether a sent transaction or a read holds it; only a sent
//! transaction's hold counts as pinned for the overwrite policy.
//!
//! A page a write covered only in part, where the store has older bytes
//! the daemon never read, holds only the bytes written ([`Known`],
//! `partial.rs`): it is no answer to a read until the store's bytes are
//! merged in ([`PageCache::insert_clean`]); clean, it stays partial (the
//! store has the rest) until a read merges it or it is evicted.
//!
//! It counts acks per bucket of inodes ([`PageCache::acks_of`]), and the
//! other changes of the store's bytes the layer makes: a store read that
//! one of them overtook may predate it, and its bytes are not kept.
//!
//! It never talks to the store and never blocks: the transaction layer
//! holds it under its lock.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use super::partial::Known;
use crate::store::WriteData;

/// Bytes per page.
pub use crate::store::PAGE_SIZE;

/// A page buffer pinned by a sent transaction: (inode, page index, buffer,
/// the ranges it holds when only some: only those are sent).
pub type Pinned = (u64, u64, Bytes, Option<Known>);

/// A page's tags (see [`Page`]).
pub type Tags = SmallVec<[u64; 2]>;

struct Page {
    buf: Bytes,
    /// Transactions carrying this page, oldest first: inline up to two
    /// (one, and a second while the first is in flight), so tagging a page
    /// allocates nothing.
    tags: Tags,
    /// Position in the LRU list while clean.
    stamp: Option<u64>,
    /// The sent transaction that holds this buffer, until its ack or
    /// until the page gets a buffer of its own.
    pinned_by: Option<u64>,
    /// The bytes the page holds when not all: the rest are the store's.
    known: Option<Known>,
}

impl Page {
    fn new(buf: Bytes) -> Page {
        debug_assert_eq!(buf.len() as u64, PAGE_SIZE);
        Page {
            buf,
            tags: Tags::new(),
            stamp: None,
            pinned_by: None,
            known: None,
        }
    }

    /// `range` of the page now holds the newest bytes.
    fn learn(&mut self, range: std::ops::Range<usize>) {
        if let Some(k) = &mut self.known {
            k.add(range);
            if k.is_whole() {
                self.known = None;
            }
        }
    }

    /// Change the buffer with `f`: in place when nothing else holds it,
    /// otherwise in a fresh copy that replaces it (the old one stays with
    /// whoever holds it, and the page is no longer pinned). A recycled
    /// buffer (`store::pages`) never changes in place: it is copied once,
    /// and goes back to its free list when no one holds it.
    fn modify(&mut self, f: impl FnOnce(&mut [u8])) {
        let mut buf = match std::mem::take(&mut self.buf).try_into_mut() {
            Ok(unique) => unique,
            Err(shared) => {
                self.pinned_by = None;
                BytesMut::from(&shared[..])
            }
        };
        f(&mut buf);
        self.buf = buf.freeze();
    }
}

/// The keys of `ino`'s pages `first..=last`.
fn span(ino: u64, first: u64, last: u64) -> RangeInclusive<(u64, u64)> {
    (ino, first)..=(ino, last)
}

/// The pages of all inodes.
pub struct PageCache {
    /// Keyed by (inode, page index): one B-tree for all inodes, whose
    /// nodes stay full however few pages each inode has (a map per inode
    /// cost a whole node, ~1.4 KiB, for a one-page file).
    pages: BTreeMap<(u64, u64), Page>,
    /// Clean pages by last use.
    lru: BTreeMap<u64, (u64, u64)>,
    clock: u64,
    count: u64,
    max_pages: u64,
    /// Acks of pages, per bucket of inodes.
    acks: [u64; ACK_BUCKETS],
}

/// Buckets of inodes whose page acks are counted apart.
const ACK_BUCKETS: usize = 64;

fn zero_page() -> Bytes {
    Bytes::from(vec![0u8; PAGE_SIZE as usize])
}

impl PageCache {
    pub fn new(max_bytes: u64) -> PageCache {
        PageCache {
            pages: BTreeMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            count: 0,
            max_pages: (max_bytes / PAGE_SIZE).max(16),
            acks: [0; ACK_BUCKETS],
        }
    }

    /// Bytes held in pages (not counting buffers only transactions pin).
    pub fn bytes(&self) -> u64 {
        self.count * PAGE_SIZE
    }

    pub fn contains(&self, ino: u64, idx: u64) -> bool {
        self.pages.contains_key(&(ino, idx))
    }

    /// Acks of pages of `ino` and other changes of its bytes in the store
    /// (writes carried in operations, when applied and when acked), with
    /// the other inodes of its bucket, so far: a store read during which it
    /// changed may predate one.
    pub fn acks_of(&self, ino: u64) -> u64 {
        self.acks[(ino % ACK_BUCKETS as u64) as usize]
    }

    /// The store's bytes of `ino` change (or changed) other than by an ack
    /// of its pages: counted with the acks.
    pub fn note_store_change(&mut self, ino: u64) {
        self.acks[(ino % ACK_BUCKETS as u64) as usize] += 1;
    }

    /// True when the page holds only some of its bytes (the rest are the
    /// store's).
    pub fn is_partial(&self, ino: u64, idx: u64) -> bool {
        self.pages
            .get(&(ino, idx))
            .is_some_and(|p| p.known.is_some())
    }

    /// A partial page's buffer and which of its bytes it holds, as they are
    /// now: what a read that goes to the store lays over the store's bytes
    /// even if the page leaves the cache before the store answers.
    pub fn known_part(&self, ino: u64, idx: u64) -> Option<(Bytes, Known)> {
        let page = self.pages.get(&(ino, idx))?;
        page.known.clone().map(|k| (page.buf.clone(), k))
    }

    /// Copy the bytes a partial page holds over `out`, the store's bytes of
    /// the same page; a whole or absent page leaves `out` alone.
    pub fn copy_known(&self, ino: u64, idx: u64, out: &mut [u8]) {
        if let Some(page) = self.pages.get(&(ino, idx)) {
            if let Some(k) = &page.known {
                k.copy_over(&page.buf, out);
            }
        }
    }

    /// Whether any cached page `first..=last` of `ino` is pinned (a range
    /// query: it costs the pages cached there, not the span).
    pub fn any_pinned(&self, ino: u64, first: u64, last: u64) -> bool {
        first <= last
            && self
                .pages
                .range((ino, first)..=(ino, last))
                .any(|(_, p)| p.pinned_by.is_some())
    }

    /// True when a sent transaction holds this page's buffer.
    pub fn is_pinned(&self, ino: u64, idx: u64) -> bool {
        self.pages
            .get(&(ino, idx))
            .is_some_and(|p| p.pinned_by.is_some())
    }

    fn touch(&mut self, ino: u64, idx: u64) {
        let Some(page) = self.pages.get_mut(&(ino, idx)) else {
            return;
        };
        if let Some(old) = page.stamp.take() {
            self.lru.remove(&old);
        }
        if page.tags.is_empty() {
            self.clock += 1;
            page.stamp = Some(self.clock);
            self.lru.insert(self.clock, (ino, idx));
        }
    }

    /// The page `idx` of `ino`, created (zeros) when absent.
    fn page_mut(&mut self, ino: u64, idx: u64) -> &mut Page {
        self.pages.entry((ino, idx)).or_insert_with(|| {
            self.count += 1;
            Page::new(zero_page())
        })
    }

    /// Dirty a page with `txn`; true when it was not tagged with it before.
    fn tag(&mut self, ino: u64, idx: u64, txn: u64) -> bool {
        let Some(page) = self.pages.get_mut(&(ino, idx)) else {
            return false;
        };
        if let Some(old) = page.stamp.take() {
            self.lru.remove(&old);
        }
        if page.tags.last() == Some(&txn) {
            false
        } else {
            page.tags.push(txn);
            true
        }
    }

    /// Write `data` at `offset` in page `idx` and tag it with `txn`; an
    /// absent page starts as zeros. Returns true when the page was not
    /// tagged with `txn` before.
    pub fn write(&mut self, ino: u64, idx: u64, offset: usize, data: &[u8], txn: u64) -> bool {
        let page = self.page_mut(ino, idx);
        page.modify(|b| b[offset..offset + data.len()].copy_from_slice(data));
        page.learn(offset..offset + data.len());
        self.tag(ino, idx, txn)
    }

    /// As [`PageCache::write`], where the store may hold older bytes of
    /// the page: an absent page holds only `data` (partial), and no store
    /// read is needed.
    pub fn write_over_store(
        &mut self,
        ino: u64,
        idx: u64,
        offset: usize,
        data: &[u8],
        txn: u64,
    ) -> bool {
        let range = offset..offset + data.len();
        if !self.contains(ino, idx) && range != (0..PAGE_SIZE as usize) {
            self.page_mut(ino, idx).known = Some(Known::new(range.clone()));
        }
        self.write(ino, idx, offset, data, txn)
    }

    /// Make `buf` (a whole page) page `idx`'s buffer and tag it with
    /// `txn`: the write's own buffer becomes the page, no byte is copied.
    /// A buffer the page had stays with whoever holds it. Returns true as
    /// [`PageCache::write`] does.
    pub fn adopt(&mut self, ino: u64, idx: u64, buf: Bytes, txn: u64) -> bool {
        debug_assert_eq!(buf.len() as u64, PAGE_SIZE);
        let page = self.page_mut(ino, idx);
        page.buf = buf;
        page.pinned_by = None;
        page.known = None;
        self.tag(ino, idx, txn)
    }

    /// Insert a clean page read from the store, unless one is there already
    /// (a newer write wins over what the store had); a partial page takes
    /// the bytes it lacks from `buf` and is whole from then on.
    pub fn insert_clean(&mut self, ino: u64, idx: u64, buf: Bytes) {
        if let Some(page) = self.pages.get_mut(&(ino, idx)) {
            if let Some(k) = page.known.take() {
                page.modify(|b| {
                    let mut merged = buf.to_vec();
                    k.copy_over(b, &mut merged);
                    b.copy_from_slice(&merged);
                });
            }
            self.touch(ino, idx);
            return;
        }
        self.pages.insert((ino, idx), Page::new(buf));
        self.count += 1;
        self.touch(ino, idx);
    }

    /// Page `idx`'s buffer, shared (a read copies from it outside the
    /// lock; a later write to the page then copies it first); `None` for a
    /// partial page, which a read must merge with the store's bytes first.
    pub fn page(&self, ino: u64, idx: u64) -> Option<Bytes> {
        self.pages
            .get(&(ino, idx))
            .filter(|p| p.known.is_none())
            .map(|p| p.buf.clone())
    }

    /// Copy from page `idx` at `offset` into `out`; false when the page is
    /// not cached.
    #[cfg(test)]
    pub fn read(&self, ino: u64, idx: u64, offset: usize, out: &mut [u8]) -> bool {
        match self.pages.get(&(ino, idx)) {
            Some(page) => {
                out.copy_from_slice(&page.buf[offset..offset + out.len()]);
                true
            }
            None => false,
        }
    }

    /// Pin the buffers of `pages` for sending `txn`, in (inode, page)
    /// order: references, not copies. Pages gone since (truncated,
    /// removed) are skipped: a later transaction of the same inode says so
    /// to the store.
    pub fn pin(&mut self, pages: &BTreeMap<u64, BTreeSet<u64>>, txn: u64) -> Vec<Pinned> {
        let mut out = Vec::new();
        for (ino, idxs) in pages {
            for idx in idxs {
                if let Some(page) = self.pages.get_mut(&(*ino, *idx)) {
                    page.pinned_by = Some(txn);
                    out.push((*ino, *idx, page.buf.clone(), page.known.clone()));
                }
            }
        }
        out
    }

    /// Remove `txn`'s tag from a page: its ack arrived. False when the
    /// page is cached without that tag (a page dropped since, by a truncate
    /// or a removal, has nothing to untag).
    pub fn untag(&mut self, ino: u64, idx: u64, txn: u64) -> bool {
        self.acks[(ino % ACK_BUCKETS as u64) as usize] += 1;
        let Some(page) = self.pages.get_mut(&(ino, idx)) else {
            return true;
        };
        let before = page.tags.len();
        page.tags.retain(|t| *t != txn);
        if page.pinned_by == Some(txn) {
            page.pinned_by = None;
        }
        let (tagged, clean) = (before == page.tags.len() + 1, page.tags.is_empty());
        if clean {
            self.touch(ino, idx);
        }
        tagged
    }

    /// Remove `txn`'s tag from a page whose data the store refused: a page
    /// no other transaction carries leaves the cache, since it holds bytes
    /// the store does not have. False as for [`PageCache::untag`].
    pub fn discard(&mut self, ino: u64, idx: u64, txn: u64) -> bool {
        self.acks[(ino % ACK_BUCKETS as u64) as usize] += 1;
        let Some(page) = self.pages.get_mut(&(ino, idx)) else {
            return true;
        };
        let before = page.tags.len();
        page.tags.retain(|t| *t != txn);
        if page.pinned_by == Some(txn) {
            page.pinned_by = None;
        }
        let tagged = before == page.tags.len() + 1;
        if page.tags.is_empty() {
            self.drop_page(ino, idx);
        }
        tagged
    }

    /// Copy `data` at `offset` of `ino` into the pages the cache holds (a
    /// write carried in a transaction's operations), leaving their tags;
    /// pinned buffers are copied first.
    pub fn overwrite(&mut self, ino: u64, offset: u64, data: &WriteData) {
        self.note_store_change(ino);
        for (at, part) in data.parts_at() {
            let part_offset = offset.saturating_add(at as u64);
            let end = part_offset.saturating_add(part.len() as u64);
            if end == part_offset {
                continue;
            }
            let pages = span(ino, part_offset / PAGE_SIZE, (end - 1) / PAGE_SIZE);
            for (&(_, idx), page) in self.pages.range_mut(pages) {
                let start = idx * PAGE_SIZE;
                let from = part_offset.max(start);
                let to = end.min(start + PAGE_SIZE);
                let src = &part[(from - part_offset) as usize..(to - part_offset) as usize];
                let range = (from - start) as usize..(to - start) as usize;
                page.modify(|b| b[range.clone()].copy_from_slice(src));
                page.learn(range);
            }
        }
    }

    fn drop_page(&mut self, ino: u64, idx: u64) {
        if let Some(page) = self.pages.remove(&(ino, idx)) {
            if let Some(s) = page.stamp {
                self.lru.remove(&s);
            }
            self.count -= 1;
        }
    }

    /// Forget every page of a removed inode.
    pub fn remove_inode(&mut self, ino: u64) {
        let idxs: Vec<u64> = self
            .pages
            .range(span(ino, 0, u64::MAX))
            .map(|(&(_, idx), _)| idx)
            .collect();
        for idx in idxs {
            self.drop_page(ino, idx);
        }
    }

    /// The tagged pages of `ino` from page `first` on, with their tags:
    /// what a truncate to `first * PAGE_SIZE` or less drops of what
    /// transactions carry.
    pub fn tagged_from(&self, ino: u64, first: u64) -> Vec<(u64, Tags)> {
        self.pages
            .range(span(ino, first, u64::MAX))
            .filter(|(_, page)| !page.tags.is_empty())
            .map(|(&(_, idx), page)| (idx, page.tags.clone()))
            .collect()
    }

    /// Drop pages past `size` and zero the tail of the page holding it.
    pub fn truncate(&mut self, ino: u64, size: u64) {
        let keep = size.div_ceil(PAGE_SIZE);
        let doomed: Vec<u64> = self
            .pages
            .range(span(ino, keep, u64::MAX))
            .map(|(&(_, idx), _)| idx)
            .collect();
        for idx in doomed {
            self.drop_page(ino, idx);
        }
        let tail = (size % PAGE_SIZE) as usize;
        if tail != 0 {
            if let Some(page) = self.pages.get_mut(&(ino, size / PAGE_SIZE)) {
                page.modify(|b| b[tail..].fill(0));
                page.learn(tail..PAGE_SIZE as usize);
            }
        }
    }

    /// Zero `len` bytes at `offset` in cached pages (a punched hole).
    pub fn zero(&mut self, ino: u64, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if end == offset {
            return;
        }
        let pages = span(ino, offset / PAGE_SIZE, (end - 1) / PAGE_SIZE);
        for (&(_, idx), page) in self.pages.range_mut(pages) {
            let start = idx * PAGE_SIZE;
            let from = offset.max(start) - start;
            let to = end.min(start + PAGE_SIZE) - start;
            page.modify(|b| b[from as usize..to as usize].fill(0));
            page.learn(from as usize..to as usize);
        }
    }

    /// Evict clean pages, least recently used first, until within the
    /// bound. Returns how many went.
    pub fn evict(&mut self) -> u64 {
        let mut evicted = 0;
        while self.count > self.max_pages {
            let Some((&stamp, &(ino, idx))) = self.lru.iter().next() else {
                break;
            };
            self.lru.remove(&stamp);
            if let Some(p) = self.pages.get_mut(&(ino, idx)) {
                p.stamp = None;
            }
            self.drop_page(ino, idx);
            evicted += 1;
        }
        evicted
    }

    /// Drop the clean pages of `ino` (the guest forgot it); dirty pages
    /// stay until their acks. Returns how many went.
    pub fn forget_clean(&mut self, ino: u64) -> u64 {
        let clean: Vec<u64> = self
            .pages
            .range(span(ino, 0, u64::MAX))
            .filter(|(_, page)| page.tags.is_empty())
            .map(|(&(_, idx), _)| idx)
            .collect();
        for idx in &clean {
            self.drop_page(ino, *idx);
        }
        clean.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(byte: u8) -> Bytes {
        Bytes::from(vec![byte; PAGE_SIZE as usize])
    }

    #[test]
    fn whole_pages_are_adopted_and_pins_end_with_their_ack() {
        let mut c = PageCache::new(1 << 20);
        let buf = page_of(3);
        assert!(c.adopt(1, 0, buf.clone(), 7));
        let page = c.page(1, 0).unwrap();
        assert_eq!(
            page.as_ptr(),
            buf.as_ptr(),
            "the write's buffer is the page"
        );
        drop((buf, page));
        let pinned = c.pin(&BTreeMap::from([(1, BTreeSet::from([0]))]), 7);
        assert_eq!(pinned[0].2.as_ptr(), c.page(1, 0).unwrap().as_ptr());
        assert!(c.is_pinned(1, 0));
        // A whole-page write to a pinned page: the new buffer becomes the
        // page, the pinned one stays with the transaction, unchanged.
        assert!(c.adopt(1, 0, page_of(4), 8));
        assert!(!c.is_pinned(1, 0));
        assert!(pinned[0].2.iter().all(|&b| b == 3));
        assert!(c.page(1, 0).unwrap().iter().all(|&b| b == 4));
        assert!(c.untag(1, 0, 7));
        // A pin ends with its transaction's ack, however long a read
        // holds the buffer: a reader's reference is not a pin.
        let pinned = c.pin(&BTreeMap::from([(1, BTreeSet::from([0]))]), 8);
        let reader = c.page(1, 0).unwrap();
        assert!(c.untag(1, 0, 8));
        drop(pinned);
        assert!(!c.is_pinned(1, 0), "acked: the pin is gone");
        // ...but a buffer a reader holds is still never written in place.
        c.write(1, 0, 0, b"x", 9);
        assert!(reader.iter().all(|&b| b == 4), "the reader's bytes stay");
        assert_eq!(c.page(1, 0).unwrap()[0], b'x');
    }

    #[test]
    fn unshared_pages_are_written_in_place() {
        let mut c = PageCache::new(1 << 20);
        c.write(1, 0, 0, b"a", 1);
        let before = c.page(1, 0).unwrap().as_ptr();
        c.write(1, 0, 1, b"b", 1);
        assert_eq!(c.page(1, 0).unwrap().as_ptr(), before, "no copy");
        assert_eq!(&c.page(1, 0).unwrap()[..2], b"ab");
    }

    #[test]
    fn tags_make_pages_dirty_and_acks_make_them_clean() {
        let mut c = PageCache::new(1 << 20);
        assert!(c.write(1, 0, 10, b"abc", 7));
        assert!(!c.write(1, 0, 20, b"d", 7), "same txn tags once");
        assert!(c.write(1, 0, 0, b"x", 8));
        let mut out = [0u8; 3];
        assert!(c.read(1, 0, 10, &mut out));
        assert_eq!(&out, b"abc");
        assert!(c.untag(1, 0, 7));
        assert!(c.untag(1, 0, 8));
        assert!(!c.untag(1, 0, 8), "the tag is gone");
        assert_eq!(c.lru.len(), 1);
    }

    #[test]
    fn pinned_buffers_are_copied_not_overwritten() {
        let mut c = PageCache::new(1 << 20);
        c.write(1, 0, 0, b"old", 1);
        let pages = BTreeMap::from([(1, BTreeSet::from([0]))]);
        let pinned = c.pin(&pages, 1);
        assert!(c.is_pinned(1, 0));
        c.write(1, 0, 0, b"new", 2);
        assert_eq!(&pinned[0].2[..3], b"old");
        let mut out = [0u8; 3];
        c.read(1, 0, 0, &mut out);
        assert_eq!(&out, b"new");
        assert!(!c.is_pinned(1, 0), "the page has a buffer of its own now");
    }

    #[test]
    fn only_clean_pages_are_evicted_oldest_first() {
        let mut c = PageCache::new(16 * PAGE_SIZE);
        for i in 0..16 {
            c.insert_clean(1, i, page_of(1));
        }
        c.write(2, 0, 0, b"dirty", 9);
        assert_eq!(c.evict(), 1);
        assert!(!c.contains(1, 0), "the least recently used clean page goes");
        assert!(c.contains(2, 0), "dirty pages stay");
        c.insert_clean(1, 100, page_of(0));
        c.touch(1, 1);
        assert_eq!(c.evict(), 1);
        assert!(!c.contains(1, 2));
        assert!(c.contains(1, 1));
    }

    #[test]
    fn forgetting_an_inode_drops_its_clean_pages_only() {
        let mut c = PageCache::new(1 << 20);
        c.insert_clean(1, 0, Bytes::from(vec![1u8; PAGE_SIZE as usize]));
        c.write(1, 1, 0, b"dirty", 9);
        c.insert_clean(2, 0, Bytes::from(vec![2u8; PAGE_SIZE as usize]));
        assert_eq!(c.forget_clean(1), 1);
        assert!(!c.contains(1, 0));
        assert!(c.contains(1, 1), "a dirty page waits for its ack");
        assert!(c.contains(2, 0), "other inodes keep theirs");
        assert_eq!(c.bytes(), 2 * PAGE_SIZE);
        assert_eq!(c.lru.len(), 1, "the dropped page left the LRU list");
    }

    #[test]
    fn discarded_pages_leave_unless_a_newer_transaction_carries_them() {
        let mut c = PageCache::new(1 << 20);
        c.write(1, 0, 0, b"refused", 7);
        c.write(1, 1, 0, b"refused", 7);
        c.write(1, 1, 0, b"newer", 8);
        assert!(c.discard(1, 0, 7));
        assert!(!c.contains(1, 0), "only the refused transaction had it");
        assert!(c.discard(1, 1, 7));
        assert!(c.contains(1, 1), "a newer transaction carries it");
        assert!(!c.discard(1, 1, 7), "the tag is gone");
        assert!(c.discard(1, 5, 7), "an absent page has nothing to discard");
    }

    #[test]
    fn overwrite_reaches_cached_pages_only_and_copies_pinned_ones() {
        let mut c = PageCache::new(1 << 20);
        c.insert_clean(1, 0, page_of(1));
        c.write(1, 2, 0, &[1u8; PAGE_SIZE as usize], 9);
        let pinned = c.pin(&BTreeMap::from([(1, BTreeSet::from([2]))]), 9);
        // From the end of page 0 to the start of page 2, page 1 not cached.
        c.overwrite(1, PAGE_SIZE - 2, &vec![7u8; PAGE_SIZE as usize + 4].into());
        let mut out = [0u8; 4];
        c.read(1, 0, PAGE_SIZE as usize - 4, &mut out);
        assert_eq!(out, [1, 1, 7, 7]);
        assert!(!c.contains(1, 1));
        c.read(1, 2, 0, &mut out);
        assert_eq!(out, [7, 7, 1, 1]);
        assert!(
            pinned[0].2.iter().all(|&b| b == 1),
            "the pinned copy is kept"
        );
    }

    #[test]
    fn truncate_and_zero_respect_pins() {
        let mut c = PageCache::new(1 << 20);
        c.write(1, 0, 0, &[5u8; 4096], 1);
        c.write(1, 1, 0, &[5u8; 4096], 1);
        let pinned = c.pin(&BTreeMap::from([(1, BTreeSet::from([0, 1]))]), 1);
        c.truncate(1, 100);
        assert!(!c.contains(1, 1));
        let mut out = [9u8; 4096];
        c.read(1, 0, 0, &mut out);
        assert!(out[..100].iter().all(|&b| b == 5) && out[100..].iter().all(|&b| b == 0));
        assert!(
            pinned[0].2.iter().all(|&b| b == 5),
            "the pinned copy keeps what was sent"
        );
        c.zero(1, 10, 20);
        c.read(1, 0, 0, &mut out);
        assert!(out[10..30].iter().all(|&b| b == 0) && out[..10].iter().all(|&b| b == 5));
    }
}
