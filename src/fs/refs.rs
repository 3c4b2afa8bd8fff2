//! The guest's references to inodes (FUSE lookup counts) and orphans: an
//! inode unlinked while the guest still holds it stays, without a name,
//! until its last reference goes. What the layers below cache of an inode
//! the guest lets go is dropped then (`Store::forgotten`).

use tracing::warn;

use super::error::{errno, FsResult};
use super::{lock, PohmelFs};
use crate::store::{Inode, Txn, ROOT_INO};

impl PohmelFs {
    /// Refuse (ENFILE) a reply that would hand the guest a reference to
    /// `ino` (`None`: an inode about to be created) when it already holds
    /// `max_referenced_inodes` distinct inodes and not this one: the
    /// lookup-count map is bounded. Checked before the request changes
    /// anything, so concurrent requests may each pass and the map may
    /// exceed the bound by at most the requests in service.
    pub(super) fn may_reference(&self, ino: Option<u64>) -> FsResult<()> {
        let refs = lock(&self.refs);
        let held = ino.is_some_and(|i| i == ROOT_INO || refs.lookups.contains_key(&i));
        if !held && refs.lookups.len() >= self.cfg.max_referenced_inodes {
            return errno!(ENFILE);
        }
        Ok(())
    }

    /// Add one guest reference to `ino`.
    pub(super) fn remember(&self, ino: u64) {
        if ino != ROOT_INO {
            *lock(&self.refs).lookups.entry(ino).or_insert(0) += 1;
        }
    }

    /// Drop `count` guest references to `ino`; remove it from the store if it
    /// was unlinked and this was the last reference.
    pub(super) fn drop_refs(&self, ino: u64, count: u64) {
        let orphan = {
            let mut refs = lock(&self.refs);
            match refs.lookups.get_mut(&ino) {
                Some(n) if *n > count => {
                    *n -= count;
                    return;
                }
                Some(_) => {
                    refs.lookups.remove(&ino);
                    // Give back the table once the guest let most go.
                    let cap = refs.lookups.capacity();
                    if cap > 4096 && refs.lookups.len() < cap / 4 {
                        let keep = refs.lookups.len() * 2;
                        refs.lookups.shrink_to(keep);
                    }
                    refs.orphans.contains(&ino)
                }
                None => return,
            }
        };
        if !orphan {
            // What is cached of an inode the guest no longer holds only
            // costs memory: the per-inode cost is the lookup count alone.
            self.store.forgotten(ino);
            return;
        }
        let _held = self.locks.lock(&[ino]);
        let still_orphan = {
            let mut refs = lock(&self.refs);
            !refs.lookups.contains_key(&ino) && refs.orphans.remove(&ino)
        };
        if still_orphan {
            let mut txn = Txn::new();
            txn.push(crate::store::Op::RemoveInode { ino });
            if let Err(e) = self.commit(txn) {
                warn!(ino, error = %e, "could not remove unlinked inode");
            }
        }
    }

    /// Called with the inode's lock held when `inode` lost its last link: remove it
    /// now, or keep it as an orphan while the guest still references it.
    pub(super) fn unlinked(&self, inode: &Inode, txn: &mut Txn) {
        let mut refs = lock(&self.refs);
        if refs.lookups.contains_key(&inode.ino) {
            refs.orphans.insert(inode.ino);
            txn.push(crate::store::Op::PutInode(inode.clone()));
        } else {
            txn.push(crate::store::Op::RemoveInode { ino: inode.ino });
        }
    }
}
