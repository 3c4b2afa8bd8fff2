//! Orphans left by a crash. An inode unlinked while the guest held it
//! stays, without a name, until the daemon drops its last reference; the
//! engine marks it (`tag::ORPHAN`) when its link count reaches zero and
//! drops the mark with the inode. A daemon that dies first never removes
//! it, so the mark outlives it: [`SlateStore::reclaim_orphans`] removes
//! every marked inode, and is called when a daemon opens the volume
//! (`writeback::open`), before any guest can hold one. A store server does
//! not call it: it cannot tell a crashed daemon from one still serving the
//! orphan. A daemon that opens the volume to take over a migrated guest
//! session spares the orphans that session holds
//! ([`SlateStore::reclaim_orphans_except`], `docs/migration.md`).

use tracing::{info, warn};

use super::scan::VolumeScan;
use super::SlateStore;
use crate::store::{Op, Store, StoreError, Txn};

/// Orphans removed per transaction.
const ORPHANS_PER_TXN: usize = 1024;

impl SlateStore {
    /// Remove every orphan, with its data, attributes and extended
    /// attributes; returns how many. A mark on an inode that has links
    /// (which nothing writes) is left alone, with a warning.
    pub fn reclaim_orphans(&self) -> Result<u64, StoreError> {
        self.reclaim_orphans_except(&[])
    }

    /// [`SlateStore::reclaim_orphans`], leaving the inodes in `spare`
    /// alone: unlinked inodes a guest session taken over from another
    /// daemon still holds open.
    pub fn reclaim_orphans_except(&self, spare: &[u64]) -> Result<u64, StoreError> {
        let spare: std::collections::HashSet<u64> = spare.iter().copied().collect();
        let marked: Vec<u64> = self
            .scan_orphans()?
            .filter(|r| r.as_ref().map_or(true, |ino| !spare.contains(ino)))
            .collect::<Result<_, _>>()?;
        let mut removed = 0;
        for batch in marked.chunks(ORPHANS_PER_TXN) {
            let mut txn = Txn::new();
            for &ino in batch {
                match self.get_inode(ino)? {
                    Some(i) if i.nlink > 0 => {
                        warn!(volume = %self.describe, ino, nlink = i.nlink, "orphan mark on a linked inode: kept");
                        continue;
                    }
                    _ => {
                        txn.push(Op::RemoveInode { ino });
                    }
                }
            }
            removed += txn.ops.len() as u64;
            if !txn.ops.is_empty() {
                self.commit(txn)?;
            }
        }
        if removed > 0 {
            info!(volume = %self.describe, removed, "removed inodes unlinked while open before a crash");
        }
        Ok(removed)
    }
}
