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
use std::mem::size_of;

use super::budget::{name_heap_bytes as heap_cost, table_bytes as slots_bytes};
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
    /// Bytes the entries' names take on the heap ([`heap_cost`]); the
    /// table's own allocation is counted by its slots ([`table_bytes`]).
    heap_bytes: u64,
    max_bytes: u64,
}

/// Bytes of one entry of the table: key and value.
const ENTRY_BYTES: u64 = size_of::<((u64, Vec<u8>), Option<Dirent>)>() as u64;

/// Bytes the table has allocated when it holds up to `capacity` entries.
fn table_bytes(capacity: usize) -> u64 {
    slots_bytes(capacity, ENTRY_BYTES)
}

impl KnownNames {
    pub(super) fn new(max_bytes: u64) -> KnownNames {
        KnownNames {
            max_bytes,
            ..KnownNames::default()
        }
    }

    /// Accounted bytes (the table's slots and the names) and entries.
    pub(super) fn size(&self) -> (u64, u64) {
        (
            table_bytes(self.names.capacity()) + self.heap_bytes,
            self.names.len() as u64,
        )
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

    /// Over its share (counting the table as it would grow for a new
    /// entry), everything is forgotten first.
    fn put(&mut self, parent: u64, name: &[u8], entry: Option<Dirent>) {
        let key = (parent, name.to_vec());
        if let Some(known) = self.names.get_mut(&key) {
            *known = entry;
            return;
        }
        let c = heap_cost(name);
        let (len, capacity) = (self.names.len(), self.names.capacity());
        let slots_after = if len < capacity { capacity } else { len + 1 };
        if len >= KNOWN_NAMES_MAX || table_bytes(slots_after) + self.heap_bytes + c > self.max_bytes
        {
            self.names = HashMap::new();
            self.heap_bytes = 0;
        }
        if table_bytes(1) + c > self.max_bytes {
            return;
        }
        self.names.insert(key, entry);
        self.heap_bytes += c;
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
        // A table of three entries (four slots) and their names fit.
        let mut k = KnownNames::new(table_bytes(3) + 3 * heap_cost(b"n0"));
        for i in 0..3 {
            let g = k.generation;
            k.remember(g, 1, format!("n{i}").as_bytes(), &None);
        }
        assert_eq!(k.size().1, 3);
        // A fourth would double the table.
        let g = k.generation;
        k.remember(g, 1, b"n3", &None);
        assert_eq!(k.size(), (table_bytes(3) + heap_cost(b"n3"), 1));
        assert_eq!(k.get(1, b"n0"), None);
    }

    #[test]
    fn the_table_stays_within_its_share_by_what_it_allocates() {
        let max = 1 << 20;
        let mut k = KnownNames::new(max);
        let mut most = 0;
        for i in 0..100_000u64 {
            let g = k.generation;
            k.remember(g, 1, format!("name{i}").as_bytes(), &None);
            let slots = (k.names.capacity() as u64 * 8 / 7).next_power_of_two();
            let allocated = slots * size_of::<((u64, Vec<u8>), Option<Dirent>)>() as u64;
            assert!(
                allocated + k.heap_bytes <= max,
                "{} names in a table of {allocated} bytes",
                k.names.len()
            );
            most = most.max(k.names.len());
        }
        // Still a cache: at least a quarter of what the share holds.
        assert!(most as u64 > max / 4 / (ENTRY_BYTES + 1 + heap_cost(b"name99999")));
    }
}
