//! Directory entries known without asking the store: what a lookup read
//! from it (absences too), and every entry this daemon set or removed
//! since. The daemon is the volume's only writer and every change passes
//! through the layer, so what it knows stays true until it changes it
//! itself: the guest's revalidation of a name it looked up (after its
//! entry timeout) needs no store round trip, nor a reachable store.
//!
//! Bounded by its share of the metadata budget; over it, everything is
//! forgotten (lookups go to the store again and refill it). It never
//! talks to the store: the layer holds it under its lock.

use std::collections::HashMap;

use super::budget::NAME_ENTRY_BYTES;
use crate::store::{Dirent, Op};

/// Entries remembered at most.
const KNOWN_NAMES_MAX: usize = 1 << 18;

/// What is known of each (directory, name).
#[derive(Default)]
pub(super) struct KnownNames {
    names: HashMap<(u64, Vec<u8>), Option<Dirent>>,
    /// Bumped by every change of an entry: a store lookup that raced with
    /// one is not kept.
    pub(super) generation: u64,
    bytes: u64,
    max_bytes: u64,
}

/// Accounted bytes of one remembered entry.
fn cost(name: &[u8]) -> u64 {
    NAME_ENTRY_BYTES + 2 * name.len() as u64
}

impl KnownNames {
    pub(super) fn new(max_bytes: u64) -> KnownNames {
        KnownNames {
            max_bytes,
            ..KnownNames::default()
        }
    }

    /// Accounted bytes and entries.
    pub(super) fn size(&self) -> (u64, u64) {
        (self.bytes, self.names.len() as u64)
    }

    /// `Some(entry)` when known (`Some(None)`: absent); `None`: ask the store.
    pub(super) fn get(&self, parent: u64, name: &[u8]) -> Option<Option<Dirent>> {
        self.names.get(&(parent, name.to_vec())).cloned()
    }

    /// Keep what the store answered, unless an entry changed since
    /// `generation` was taken (before the lookup).
    pub(super) fn remember(
        &mut self,
        generation: u64,
        parent: u64,
        name: &[u8],
        entry: &Option<Dirent>,
    ) {
        if generation == self.generation {
            self.put(parent, name, entry.clone());
        }
    }

    /// Follow one metadata op, in order: the entries it sets or removes
    /// are known from now on.
    pub(super) fn apply(&mut self, op: &Op) {
        match op {
            Op::PutDirent { parent, dirent } => {
                self.generation += 1;
                self.put(*parent, &dirent.name, Some(dirent.clone()));
            }
            Op::RemoveDirent { parent, name } => {
                self.generation += 1;
                self.put(*parent, name, None);
            }
            _ => {}
        }
    }

    fn put(&mut self, parent: u64, name: &[u8], entry: Option<Dirent>) {
        let c = cost(name);
        if self.names.len() >= KNOWN_NAMES_MAX || self.bytes + c > self.max_bytes {
            self.names = HashMap::new();
            self.bytes = 0;
        }
        if c > self.max_bytes {
            return;
        }
        if self.names.insert((parent, name.to_vec()), entry).is_none() {
            self.bytes += c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileKind;

    fn dirent(name: &str, ino: u64) -> Dirent {
        Dirent {
            name: name.as_bytes().to_vec(),
            ino,
            kind: FileKind::Regular,
            cookie: ino,
        }
    }

    #[test]
    fn changes_win_over_lookups_that_raced_with_them() {
        let mut k = KnownNames::new(1 << 20);
        assert_eq!(k.get(1, b"a"), None, "unknown: ask the store");
        let g = k.generation;
        k.remember(g, 1, b"a", &None);
        assert_eq!(k.get(1, b"a"), Some(None), "a known absence");
        let g = k.generation;
        k.apply(&Op::PutDirent {
            parent: 1,
            dirent: dirent("a", 7),
        });
        // A lookup that started before the create answered "absent".
        k.remember(g, 1, b"a", &None);
        assert_eq!(k.get(1, b"a"), Some(Some(dirent("a", 7))));
        k.apply(&Op::RemoveDirent {
            parent: 1,
            name: b"a".to_vec(),
        });
        assert_eq!(k.get(1, b"a"), Some(None));
    }

    #[test]
    fn over_its_share_everything_is_forgotten() {
        let mut k = KnownNames::new(3 * cost(b"n0"));
        for i in 0..3 {
            let g = k.generation;
            k.remember(g, 1, format!("n{i}").as_bytes(), &None);
        }
        assert_eq!(k.size().1, 3);
        let g = k.generation;
        k.remember(g, 1, b"n3", &None);
        assert_eq!(k.size(), (cost(b"n3"), 1));
        assert_eq!(k.get(1, b"n0"), None);
    }
}
