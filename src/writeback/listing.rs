//! Directory listings read ahead, where every store read is a round trip
//! (`pohmel://`, `s3://`): the guest lists a directory one buffer of about
//! 25 entries at a time, so `ls` or `rm -r` of a directory of 10,000
//! entries at 5 ms of RTT waited 400 round trips. The layer asks the store
//! for [`LISTING_FETCH`] entries at once and serves the next buffers from
//! them.
//!
//! A listing is what the store will hold for its cookie range once it has
//! every transaction: the store's answer, with the entry changes still in
//! flight applied when it is kept, and every later change of the directory
//! applied as the layer reflects it (the daemon is the volume's only
//! writer, so nothing else changes it). An entry put with a cookie past
//! the range is left to the store's next answer. A store answer that raced
//! with a change of any entry is used once and not kept.
//!
//! Bounded: [`LISTINGS_MAX`] directories, each at most [`LISTING_FETCH`]
//! entries plus [`LISTING_GROWTH_MAX`] put into its range since (4,096
//! entries in all, about 1.2 MiB with names of 255 bytes), and served
//! entries are dropped as the reader moves on. Directories created in this session are listed from
//! `CompleteDirs` instead and never kept here.

use std::collections::VecDeque;

use super::ack::lock;
use super::Shared;
use crate::store::{Dirent, Op, StoreError};

/// An entry change in flight: the name, and its entry (`None`: removed).
pub(super) type Pending = (Vec<u8>, Option<Dirent>);

/// Entries asked of the store at once for a listing.
pub(super) const LISTING_FETCH: usize = 512;
/// Directories whose listing is kept at most (the newest).
const LISTINGS_MAX: usize = 4;
/// Entries put into a kept listing's range at most, beyond its fetch:
/// past it the listing is dropped (the store is asked again).
const LISTING_GROWTH_MAX: usize = 512;

/// The store's entries of one directory after cookie `after`.
struct Listing {
    dir: u64,
    after: u64,
    /// In cookie order, all past `after`.
    entries: VecDeque<Dirent>,
    /// The last cookie the store answered with; `None`: it had no more
    /// (the listing runs to the end of the directory).
    end: Option<u64>,
}

/// The listings kept, newest last.
#[derive(Default)]
pub(super) struct Listings {
    kept: Vec<Listing>,
    /// Bumped by every entry change: a store answer that raced with one
    /// is not kept.
    pub(super) generation: u64,
}

impl Listings {
    /// At most `max` entries of `dir` after `after` as the store will hold
    /// them, when a kept listing covers them all (or the directory's end).
    pub(super) fn serve(&mut self, dir: u64, after: u64, max: usize) -> Option<Vec<Dirent>> {
        let l = self.kept.iter_mut().find(|l| l.dir == dir)?;
        if after < l.after || l.end.is_some_and(|end| after >= end) {
            return None;
        }
        // The reader moved on: what it read is not asked for again.
        while l.entries.front().is_some_and(|d| d.cookie <= after) {
            l.entries.pop_front();
        }
        l.after = after;
        if l.entries.len() < max && l.end.is_some() {
            return None;
        }
        Some(l.entries.iter().take(max).cloned().collect())
    }

    /// Keep the store's answer of up to `asked` entries of `dir` after
    /// `after` (taken at `generation`), with the changes in flight
    /// (`pending`: name, entry or `None` removed) applied.
    pub(super) fn keep(
        &mut self,
        generation: u64,
        dir: u64,
        after: u64,
        asked: usize,
        stored: &[Dirent],
        pending: &[Pending],
    ) {
        if generation != self.generation {
            return;
        }
        self.kept.retain(|l| l.dir != dir);
        if self.kept.len() >= LISTINGS_MAX {
            self.kept.remove(0);
        }
        let end = if stored.len() < asked {
            None
        } else {
            stored.last().map(|d| d.cookie)
        };
        let mut l = Listing {
            dir,
            after,
            entries: stored.iter().cloned().collect(),
            end,
        };
        for (name, entry) in pending {
            l.set(name, entry.clone());
        }
        self.kept.push(l);
    }

    /// Follow one metadata op, in order.
    pub(super) fn apply(&mut self, op: &Op) {
        match op {
            Op::PutDirent { parent, dirent } => {
                self.generation += 1;
                self.change(*parent, &dirent.name, Some(dirent.clone()));
            }
            Op::RemoveDirent { parent, name } => {
                self.generation += 1;
                self.change(*parent, name, None);
            }
            Op::RemoveInode { ino } => self.kept.retain(|l| l.dir != *ino),
            _ => {}
        }
    }

    fn change(&mut self, dir: u64, name: &[u8], entry: Option<Dirent>) {
        let Some(at) = self.kept.iter().position(|l| l.dir == dir) else {
            return;
        };
        self.kept[at].set(name, entry);
        if self.kept[at].entries.len() > LISTING_FETCH + LISTING_GROWTH_MAX {
            self.kept.remove(at);
        }
    }

    /// Entries kept, in all listings.
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.kept.iter().map(|l| l.entries.len()).sum()
    }
}

impl Shared {
    /// At most `max` of the store's entries of `dir` after `after` (plus
    /// the changes in flight, which the caller merges again): from a kept
    /// listing where one covers them; otherwise asked of the store, and on
    /// a remote store [`LISTING_FETCH`] of them kept, with `pending` (the
    /// directory's entries in flight, read with `generation` under one
    /// hold of the lock) applied.
    pub(super) fn stored_entries(
        &self,
        dir: u64,
        after: u64,
        max: usize,
        pending: &[Pending],
        generation: u64,
    ) -> Result<Vec<Dirent>, StoreError> {
        if self.cfg.forget_clean_pages {
            return self.store.readdir(dir, after, max);
        }
        if let Some(kept) = lock(&self.state).listings.serve(dir, after, max) {
            return Ok(kept);
        }
        let asked = max.max(LISTING_FETCH);
        let mut stored = self.store.readdir(dir, after, asked)?;
        lock(&self.state)
            .listings
            .keep(generation, dir, after, asked, &stored, pending);
        stored.truncate(max);
        Ok(stored)
    }
}

impl Listing {
    /// `name` is now `entry` (`None`: removed).
    fn set(&mut self, name: &[u8], entry: Option<Dirent>) {
        self.entries.retain(|d| d.name != name);
        let Some(d) = entry else { return };
        let inside = d.cookie > self.after && self.end.is_none_or(|end| d.cookie <= end);
        if inside {
            let at = self.entries.partition_point(|e| e.cookie < d.cookie);
            self.entries.insert(at, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileKind;

    fn d(name: &str, cookie: u64) -> Dirent {
        Dirent {
            name: name.as_bytes().to_vec(),
            ino: cookie + 100,
            kind: FileKind::Regular,
            cookie,
        }
    }

    fn names(v: &[Dirent]) -> Vec<&str> {
        v.iter()
            .map(|d| std::str::from_utf8(&d.name).unwrap())
            .collect()
    }

    #[test]
    fn a_kept_listing_follows_the_layers_changes() {
        let mut l = Listings::default();
        let stored: Vec<Dirent> = (1..=10).map(|i| d(&format!("n{i}"), 10 * i)).collect();
        let g = l.generation;
        // Asked 10, got 10: the directory may hold more past cookie 100.
        l.keep(g, 7, 0, 10, &stored, &[(b"n2".to_vec(), None)]);
        assert_eq!(names(&l.serve(7, 0, 3).unwrap()), ["n1", "n3", "n4"]);
        l.apply(&Op::RemoveDirent {
            parent: 7,
            name: b"n4".to_vec(),
        });
        l.apply(&Op::PutDirent {
            parent: 7,
            dirent: d("new", 55),
        });
        l.apply(&Op::PutDirent {
            parent: 7,
            dirent: d("later", 110),
        });
        assert_eq!(
            names(&l.serve(7, 30, 4).unwrap()),
            ["n5", "new", "n6", "n7"]
        );
        // Fewer left than asked and the store may have more: ask it.
        assert!(l.serve(7, 30, 20).is_none());
        // Past the range, and before what was served: ask the store.
        assert!(l.serve(7, 100, 1).is_none());
        assert!(l.serve(7, 10, 1).is_none());
        // A listing that runs to the end answers short batches.
        let g = l.generation;
        l.keep(g, 8, 0, 10, &stored[..2], &[]);
        l.apply(&Op::PutDirent {
            parent: 8,
            dirent: d("tail", 500),
        });
        assert_eq!(names(&l.serve(8, 0, 10).unwrap()), ["n1", "n2", "tail"]);
        l.apply(&Op::RemoveInode { ino: 8 });
        assert!(l.serve(8, 0, 10).is_none());
    }

    #[test]
    fn an_answer_that_raced_with_a_change_is_not_kept_and_listings_are_bounded() {
        let mut l = Listings::default();
        let g = l.generation;
        l.apply(&Op::RemoveDirent {
            parent: 9,
            name: b"x".to_vec(),
        });
        l.keep(g, 7, 0, 10, &[d("x", 1)], &[]);
        assert!(l.serve(7, 0, 1).is_none());
        for dir in 0..2 * LISTINGS_MAX as u64 {
            let g = l.generation;
            l.keep(g, dir, 0, 1, &[d("a", 1)], &[]);
        }
        assert_eq!(l.kept.len(), LISTINGS_MAX);
        assert_eq!(l.entries(), LISTINGS_MAX);
        let g = l.generation;
        let dir = 100;
        l.keep(g, dir, 0, 10, &[], &[]);
        for i in 0..=LISTING_FETCH + LISTING_GROWTH_MAX {
            l.apply(&Op::PutDirent {
                parent: dir,
                dirent: d(&format!("g{i}"), i as u64 + 1),
            });
        }
        assert!(l.serve(dir, 0, 1).is_none(), "grown past its bound");
    }
}
