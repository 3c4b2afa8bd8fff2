//! The layer as a [`Store`]: reads are answered from the page cache and the
//! namespace overlay before the store beneath; `commit` hands the
//! filesystem layer's write to the write path and any other transaction to
//! the metadata path (`write.rs`); `sync` and `flush` wait for acks
//! (`sync.rs`).

use std::collections::BTreeSet;

use tracing::debug;

use super::ack::lock;
use super::budget::{release_free_memory, TRIM_AFTER_FREED_BYTES};
use super::cache::PAGE_SIZE;
use super::WritebackStore;
use crate::store::{Dirent, Inode, Op, Store, StoreError, StoreStats, Txn};

impl Store for WritebackStore {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.shared.current_inode(ino)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        {
            let st = lock(&self.shared.state);
            if let Some((d, _)) = st.dirents.get(&parent).and_then(|m| m.get(name)) {
                return Ok(d.clone());
            }
            if let Some(known) = st.complete_dirs.lookup(parent, name) {
                return Ok(known);
            }
        }
        self.shared.store.lookup(parent, name)
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        let overlay: Vec<(Vec<u8>, Option<Dirent>)> =
            match lock(&self.shared.state).dirents.get(&parent) {
                None => return self.shared.store.readdir(parent, after, max),
                Some(m) => m.iter().map(|(n, (d, _))| (n.clone(), d.clone())).collect(),
            };
        // Ask the store for enough that, with the overlay's names filtered
        // out, a full batch remains whenever the store has more.
        let fetch = max.saturating_add(overlay.len());
        let stored = self.shared.store.readdir(parent, after, fetch)?;
        let exhausted = stored.len() < fetch;
        let last = stored.last().map(|d| d.cookie);
        let shadowed: std::collections::HashSet<&[u8]> =
            overlay.iter().map(|(n, _)| n.as_slice()).collect();
        let mut out: Vec<Dirent> = stored
            .into_iter()
            .filter(|d| !shadowed.contains(d.name.as_slice()))
            .collect();
        // Overlay entries past the last stored cookie wait for the next
        // batch unless the store has nothing more: cookies stay in order.
        out.extend(
            overlay
                .into_iter()
                .filter_map(|(_, d)| d)
                .filter(|d| d.cookie > after && (exhausted || last.is_some_and(|l| d.cookie <= l))),
        );
        out.sort_by_key(|d| d.cookie);
        out.truncate(max);
        Ok(out)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let sh = &self.shared;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / PAGE_SIZE;
        let last = (offset + buf.len() as u64 - 1) / PAGE_SIZE;
        // Pages missing from the cache, and how far to read ahead.
        let (missing, sequential, size) = {
            let mut st = lock(&sh.state);
            let missing: Vec<u64> = (first..=last)
                .filter(|i| !st.cache.contains(ino, *i))
                .collect();
            let sequential = st.last_read_end.get(&ino) == Some(&offset);
            if st.last_read_end.len() > 4096 {
                st.last_read_end.clear();
            }
            st.last_read_end.insert(ino, offset + buf.len() as u64);
            let size = st
                .attrs
                .get(&ino)
                .and_then(|o| o.inode.as_ref())
                .map(|i| i.size);
            (missing, sequential, size)
        };
        sh.metrics
            .cache_hits
            .add((last - first + 1) - missing.len() as u64);
        sh.metrics.cache_misses.add(missing.len() as u64);
        if let (Some(&lo), Some(&hi)) = (missing.first(), missing.last()) {
            let mut count = hi - lo + 1;
            if sequential {
                let ahead = sh.cfg.read_ahead_bytes / PAGE_SIZE;
                let limit = size.map_or(u64::MAX, |s| s.div_ceil(PAGE_SIZE));
                count = (count + ahead)
                    .min(limit.saturating_sub(lo))
                    .max(hi - lo + 1);
            }
            sh.load_pages(ino, lo, count)?;
        }
        // Copy from the cache: it holds the newest bytes. A page evicted
        // between loading and copying was clean, so the store has it.
        let mut evicted = Vec::new();
        {
            let st = lock(&sh.state);
            let mut pos = offset;
            let mut done = 0usize;
            while done < buf.len() {
                let idx = pos / PAGE_SIZE;
                let in_page = (pos % PAGE_SIZE) as usize;
                let n = (buf.len() - done).min(PAGE_SIZE as usize - in_page);
                if !st.cache.read(ino, idx, in_page, &mut buf[done..done + n]) {
                    evicted.push((pos, done, n));
                }
                done += n;
                pos += n as u64;
            }
        }
        for (pos, done, n) in evicted {
            sh.store.read(ino, pos, &mut buf[done..done + n])?;
        }
        Ok(())
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        // The store must know every dirty page before it can say where data is.
        self.shared.sync(Some(ino))?;
        self.shared.store.next_data(ino, offset)
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        self.shared.sync(Some(ino))?;
        self.shared.store.next_hole(ino, offset)
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some((t, _)) = lock(&self.shared.state).symlinks.get(&ino) {
            return Ok(Some(t.clone()));
        }
        self.shared.store.readlink(ino)
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let generation = {
            let st = lock(&self.shared.state);
            if let Some((v, _)) = st.xattrs.get(&ino).and_then(|m| m.get(name)) {
                return Ok(v.clone());
            }
            if let Some(known) = st.known_xattrs.get(ino, name) {
                return Ok(known);
            }
            st.known_xattrs.generation
        };
        let value = self.shared.store.get_xattr(ino, name)?;
        lock(&self.shared.state)
            .known_xattrs
            .remember(generation, ino, name, &value);
        Ok(value)
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let overlay: Vec<(Vec<u8>, bool)> = match lock(&self.shared.state).xattrs.get(&ino) {
            None => return self.shared.store.list_xattr(ino),
            Some(m) => m
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.is_some()))
                .collect(),
        };
        let mut names: BTreeSet<Vec<u8>> = self.shared.store.list_xattr(ino)?.into_iter().collect();
        for (name, present) in overlay {
            if present {
                names.insert(name);
            } else {
                names.remove(&name);
            }
        }
        Ok(names.into_iter().collect())
    }

    fn forgotten(&self, ino: u64) {
        let sh = &self.shared;
        let trim = {
            let mut st = lock(&sh.state);
            let pages = st.forget_cached(ino);
            sh.metrics.cache_evictions.add(pages);
            sh.publish(&st);
            st.freed_since_trim += pages * PAGE_SIZE;
            let trim = st.freed_since_trim >= TRIM_AFTER_FREED_BYTES;
            if trim {
                st.freed_since_trim = 0;
            }
            trim
        };
        if trim {
            release_free_memory();
        }
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        self.shared.store.statfs()
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        let first = self.shared.store.reserve_ids(count)?;
        lock(&self.shared.state)
            .complete_dirs
            .reserved(first, count);
        Ok(first)
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        // The filesystem layer's write: one Write and the inode's attributes.
        if let [Op::Write { ino, offset, data }, Op::PutInode(inode)] = &txn.ops[..] {
            if inode.ino == *ino {
                return self.shared.write(*ino, *offset, data, inode.clone());
            }
        }
        if txn.ops.iter().any(|op| matches!(op, Op::Write { .. })) {
            // Writes in any other shape travel in the operations, ordered
            // like metadata, and are waited for (write-through).
            debug!("transaction with data in another shape: sent write-through");
        }
        self.shared.commit_metadata(txn)
    }

    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError> {
        self.shared.sync(ino)
    }

    fn flush(&self, ino: u64) -> Result<(), StoreError> {
        // The transactions that refer to the inode's pages; when there are
        // any, everything of the inode before them goes too (its order).
        let has_data = {
            let st = lock(&self.shared.state);
            st.by_inode.get(&ino).is_some_and(|q| {
                q.iter()
                    .any(|id| st.txns.get(id).is_some_and(|t| t.pages.contains_key(&ino)))
            }) || st.sticky.contains_key(&ino)
                || st.no_space.contains(&ino)
        };
        if has_data {
            self.shared.sync(Some(ino))
        } else {
            Ok(())
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} through the transaction layer ({:?} overwrites, cache {} MiB, dirty max {} MiB)",
            self.shared.store.describe(),
            self.shared.cfg.overwrite,
            self.shared.cfg.cache_bytes >> 20,
            self.shared.cfg.dirty_max_bytes >> 20
        )
    }
}
