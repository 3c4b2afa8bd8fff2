//! Per-inode locks: what the filesystem layer holds while it computes and
//! commits a mutation, so that two requests never interleave their
//! read-check-write steps on the same inode, while requests on other
//! inodes go on.
//!
//! # The rules
//! * A mutation locks every inode whose attributes, names or link count it
//!   reads to decide and then changes: a write, setattr, fallocate or xattr
//!   change its inode; a create, mknod, mkdir or symlink the parent
//!   directory (the new inode is invisible until committed); unlink and
//!   rmdir the parent and the child; link the inode and the new parent;
//!   rename the old and new directories, the source and the target (up to
//!   four).
//! * The inodes of one mutation are locked in one call, in ascending inode
//!   number, and released together: any two mutations take their common
//!   inodes in the same order, so they cannot deadlock.
//! * Names are looked up before the lock (the lock set depends on them)
//!   and looked up again under it; when a name changed meanwhile the
//!   mutation releases everything and starts over.
//! * A rename that moves a directory to another parent (or exchanges
//!   across parents with a directory on either side) first takes the
//!   rename lock, as Linux's `s_vfs_rename_mutex`: its "not below itself"
//!   walk reads the parents of directories it does not lock, and only such
//!   renames change them. It is the one lock wider than an inode; writes,
//!   creates and same-directory renames never take it.
//!
//! The table holds an entry only for an inode someone holds, so it is
//! bounded by the requests in service.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The inodes locked now.
#[derive(Default)]
pub(super) struct InodeLocks {
    held: Mutex<HashSet<u64>>,
    released: Condvar,
    /// Lockers waiting now (tests arrange interleavings with it).
    #[cfg(test)]
    waiting: std::sync::atomic::AtomicUsize,
}

/// Inodes held by one mutation; released when dropped.
pub(super) struct Held<'a> {
    table: &'a InodeLocks,
    inos: Vec<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl InodeLocks {
    /// Lock `inos` (in any order, repeats allowed): in ascending order,
    /// waiting for each that another mutation holds.
    pub(super) fn lock(&self, inos: &[u64]) -> Held<'_> {
        let mut sorted = inos.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut held = lock(&self.held);
        for &ino in &sorted {
            while held.contains(&ino) {
                #[cfg(test)]
                self.waiting
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
                #[cfg(test)]
                self.waiting
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
            held.insert(ino);
        }
        Held {
            table: self,
            inos: sorted,
        }
    }

    /// Inodes locked now (for tests).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        lock(&self.held).len()
    }

    /// Lockers waiting for an inode now (for tests).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.table.held);
        for ino in &self.inos {
            held.remove(ino);
        }
        drop(held);
        self.table.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn disjoint_sets_do_not_wait_and_shared_inodes_do() {
        let t = Arc::new(InodeLocks::default());
        let a = t.lock(&[5, 3, 5]);
        assert_eq!(t.held(), 2);
        // Disjoint: taken at once, on this thread.
        let b = t.lock(&[4, 6]);
        assert_eq!(t.held(), 4);
        drop(b);
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (t, got) = (t.clone(), got.clone());
            std::thread::spawn(move || {
                let _h = t.lock(&[1, 3]);
                got.store(true, Ordering::SeqCst);
            })
        };
        // The waiter holds 1 and waits for 3.
        pohmelfs_testkit::wait_until(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(1),
            || t.held() == 3,
        )
        .expect("the waiter to take inode 1");
        assert!(!got.load(Ordering::SeqCst), "took an inode held by another");
        drop(a);
        waiter.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert_eq!(t.held(), 0, "every inode released");
    }
}
