//! What the engine knows of the inodes born since it opened, so that
//! removing one needs no range scan, and neither the first write of one of
//! its chunks nor the first put of its inode record (or of a new entry's
//! by-cookie record) a read.
//!
//! Removing an inode must drop its chunk records and its extended
//! attributes, and in general only a range scan finds them: a scan builds an
//! iterator over every memtable and table whose range overlaps, the most
//! expensive read the engine has. But inode numbers come from
//! `reserve_ids`, which never hands out the same id twice: an id this
//! instance reserved was never given to anyone before, so nothing of it can
//! be in the engine that this instance did not apply. For those inodes the
//! engine notes which chunks writes created and whether an extended
//! attribute was set; `RemoveInode` then reads exactly those keys (or
//! none), and a write to a chunk no write reached before finds it empty
//! without asking the engine ([`BornChunks`]), as does the first put of
//! the inode's record ([`Born::first_inode_put`]) and of a new directory
//! entry's by-cookie record ([`Born::first_cookie_put`]: cookies are
//! reserved as inode numbers are). A put reads the value it
//! replaces, to count the bytes the volume holds: for a key that cannot
//! exist yet, that read walked every memtable and table for nothing.
//!
//! An op on an id no one reserved (no filesystem sends one) is noted too,
//! but such an id is not born: it is scanned.
//!
//! Bounded: at most [`TRACKED_MAX`] ids (inodes and cookies) are noted
//! (about 40 bytes each).
//! When the table is full the engine forgets it and every id handed out so
//! far, which then scans as before; ids reserved afterwards are born.
//! Noting more than happened costs reads, never correctness; noting less
//! would leave records behind, so every chunk a write creates is noted
//! before the write is applied.

use std::collections::HashMap;
use std::sync::Mutex;

/// Inodes noted at most.
pub const TRACKED_MAX: usize = 65_536;

/// Chunks of an inode removed by point reads at most; more are scanned.
pub const POINT_READS_MAX: u32 = 16;

/// What an inode born in this instance has in the engine besides its
/// inode record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Noted {
    /// Bit `i` set: a write created or changed chunk `i` (for `i < 64`).
    chunks: u64,
    /// One past the highest chunk a write reached from chunk 64 on (0:
    /// none): chunks from 64 on are noted by their highest, so that a
    /// file written in order never has its next chunk read.
    far_end: u64,
    /// An extended attribute was set.
    xattrs: bool,
    /// Its inode record was put.
    inode: bool,
    /// The id is a directory entry's cookie, and its by-cookie record was
    /// put (cookies come from the same reservations as inode numbers).
    cookie: bool,
}

/// The chunks a born inode may have records of: every chunk a write
/// reached. No other op creates a chunk record, so a chunk no write
/// reached has none, and its first write needs no engine read (after
/// `scripts/bench`'s random writes left tables to search, that read was a
/// good part of creating a small file).
#[derive(Clone, Copy, Debug)]
pub struct BornChunks(Noted);

impl BornChunks {
    /// Whether chunk `index` may have a record.
    pub fn may_have(&self, index: u64) -> bool {
        if index < 64 {
            self.0.chunks & (1 << index) != 0
        } else {
            index < self.0.far_end
        }
    }
}

/// What removing an inode must look for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftovers {
    /// Not born here: scan its chunks and extended attributes.
    Unknown,
    /// Born here: these chunks (if any) and, if `xattrs`, its extended
    /// attributes.
    Known { chunks: Vec<u64>, xattrs: bool },
}

struct Table {
    /// Ids in `born_from..handed_out` are born here; ids from `born_from`
    /// on are noted.
    born_from: u64,
    /// The end of the ids this instance reserved.
    handed_out: u64,
    noted: HashMap<u64, Noted>,
}

/// Notes that removals in a transaction being built took: put back when
/// it is dropped, unless [`Taken::built`].
#[derive(Default)]
pub struct Taken<'a> {
    born: Option<&'a Born>,
    notes: Vec<(u64, Noted)>,
}

impl Taken<'_> {
    /// The transaction is in the engine's order: its removals stand.
    pub fn built(mut self) {
        self.notes.clear();
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(born) = self.born {
            for &(ino, n) in &self.notes {
                born.note(ino, |m| {
                    m.chunks |= n.chunks;
                    m.far_end = m.far_end.max(n.far_end);
                    m.xattrs |= n.xattrs;
                    m.inode |= n.inode;
                    m.cookie |= n.cookie;
                });
            }
        }
    }
}

/// The engine's table of born inodes.
pub struct Born {
    table: Mutex<Table>,
}

impl Born {
    /// A table for an engine whose ids at open start at `next_id`.
    pub fn new(next_id: u64) -> Born {
        Born {
            table: Mutex::new(Table {
                born_from: next_id,
                handed_out: next_id,
                noted: HashMap::new(),
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table holds no invariant a panic could break half way: a
        // poisoned lock is as good as any.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids up to `end` were just reserved, before anyone could use them.
    pub fn reserved(&self, end: u64) {
        let mut t = self.table();
        t.handed_out = t.handed_out.max(end);
    }

    /// Note `f` for `ino`, if it was born here.
    fn note(&self, ino: u64, f: impl FnOnce(&mut Noted)) {
        let mut t = self.table();
        if ino < t.born_from {
            return;
        }
        // Noted even when not (yet) reserved: a reservation may come.
        if !t.noted.contains_key(&ino) && t.noted.len() >= TRACKED_MAX {
            // Forget every id handed out so far: they scan from now on.
            t.noted = HashMap::new();
            t.born_from = t.handed_out;
            if ino < t.born_from {
                return;
            }
        }
        f(t.noted.entry(ino).or_default());
    }

    /// A write reaches chunks `first..=last` of `ino`.
    pub fn wrote(&self, ino: u64, first: u64, last: u64) {
        self.note(ino, |n| {
            for i in first..=last.min(63) {
                n.chunks |= 1 << i;
            }
            if last >= 64 {
                n.far_end = n.far_end.max(last.saturating_add(1));
            }
        });
    }

    /// What the engine holds of `ino`'s chunks, when `ino` was born here:
    /// asked before a write notes the chunks it reaches.
    pub fn chunks_of(&self, ino: u64) -> Option<BornChunks> {
        let t = self.table();
        if ino < t.born_from || ino >= t.handed_out {
            return None;
        }
        Some(BornChunks(t.noted.get(&ino).copied().unwrap_or_default()))
    }

    /// The inode record of `ino` is being put: true when `ino` was born
    /// here and this is the first put, so that there is no record yet
    /// (nothing else creates one). Noted either way.
    pub fn first_inode_put(&self, ino: u64) -> bool {
        self.first_put(ino, |n| &mut n.inode)
    }

    /// As [`Born::first_inode_put`], for the by-cookie record of a
    /// directory entry whose cookie is `cookie`: every entry gets a fresh
    /// cookie, so its first put finds no record.
    pub fn first_cookie_put(&self, cookie: u64) -> bool {
        self.first_put(cookie, |n| &mut n.cookie)
    }

    fn first_put(&self, id: u64, flag: impl FnOnce(&mut Noted) -> &mut bool) -> bool {
        let born = {
            let t = self.table();
            id >= t.born_from && id < t.handed_out
        };
        let mut first = false;
        // A full table forgotten here leaves `id` unnoted and `first` false.
        self.note(id, |n| first = !std::mem::replace(flag(n), true));
        born && first
    }

    /// An extended attribute of `ino` was set.
    pub fn set_xattr(&self, ino: u64) {
        self.note(ino, |n| n.xattrs = true);
    }

    /// What `ino`, being removed, may have left. Its note moves to
    /// `taken`, which puts it back unless the transaction is built (a
    /// removal that fails is tried again).
    pub fn take<'a>(&'a self, ino: u64, taken: &mut Taken<'a>) -> Leftovers {
        let mut t = self.table();
        if ino < t.born_from || ino >= t.handed_out {
            return Leftovers::Unknown;
        }
        let n = t.noted.remove(&ino).unwrap_or_default();
        drop(t);
        if n != Noted::default() {
            taken.born = Some(self);
            taken.notes.push((ino, n));
        }
        if n.far_end > 0 || n.chunks.count_ones() > POINT_READS_MAX {
            return Leftovers::Unknown;
        }
        Leftovers::Known {
            chunks: (0..64).filter(|i| n.chunks & (1 << i) != 0).collect(),
            xattrs: n.xattrs,
        }
    }

    /// Inodes noted (tests).
    #[cfg(test)]
    pub fn noted(&self) -> usize {
        self.table().noted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(chunks: Vec<u64>, xattrs: bool) -> Leftovers {
        Leftovers::Known { chunks, xattrs }
    }

    /// What removing `ino` finds, its note put back.
    fn peek(b: &Born, ino: u64) -> Leftovers {
        b.take(ino, &mut Taken::default())
    }

    #[test]
    fn only_ids_reserved_by_this_instance_are_born() {
        let b = Born::new(100);
        b.reserved(200);
        b.wrote(99, 0, 0);
        assert_eq!(peek(&b, 99), Leftovers::Unknown);
        assert_eq!(b.noted(), 0);
        // Not reserved (yet): what it has may come from an earlier open.
        b.wrote(200, 0, 0);
        assert_eq!(peek(&b, 200), Leftovers::Unknown);
        // Reserved later: its note from before counts.
        b.reserved(300);
        assert_eq!(peek(&b, 200), known(vec![0], false));
    }

    #[test]
    fn a_born_inode_names_its_chunks_and_attributes() {
        let b = Born::new(100);
        b.reserved(200);
        assert_eq!(peek(&b, 100), known(vec![], false));
        b.wrote(101, 0, 1);
        b.wrote(101, 5, 5);
        b.set_xattr(101);
        let left = known(vec![0, 1, 5], true);
        assert_eq!(peek(&b, 101), left);
        // A removal that failed finds the same again.
        assert_eq!(peek(&b, 101), left);
        let mut taken = Taken::default();
        assert_eq!(b.take(101, &mut taken), left);
        assert_eq!(b.noted(), 0);
        // Written again after its removal, in the same transaction.
        b.wrote(101, 2, 2);
        taken.built();
        assert_eq!(peek(&b, 101), known(vec![2], false));
    }

    #[test]
    fn many_or_far_chunks_are_scanned() {
        let b = Born::new(1);
        b.reserved(100);
        b.wrote(5, 0, u64::from(POINT_READS_MAX));
        assert_eq!(peek(&b, 5), Leftovers::Unknown);
        b.wrote(6, 64, 64);
        assert_eq!(peek(&b, 6), Leftovers::Unknown);
        b.wrote(7, 0, u64::from(POINT_READS_MAX) - 1);
        assert_eq!(peek(&b, 7), known((0..16).collect(), false));
    }

    /// A chunk may have a record once a write reached it; an inode not
    /// born here may have any.
    #[test]
    fn chunks_no_write_reached_have_no_record() {
        let b = Born::new(100);
        b.reserved(200);
        assert!(b.chunks_of(99).is_none(), "born before this open");
        assert!(b.chunks_of(200).is_none(), "not reserved yet");
        let fresh = b.chunks_of(150).unwrap();
        assert!(!fresh.may_have(0) && !fresh.may_have(64));
        b.wrote(150, 2, 3);
        let c = b.chunks_of(150).unwrap();
        assert!(c.may_have(2) && c.may_have(3));
        assert!(!c.may_have(1) && !c.may_have(4) && !c.may_have(70));
        b.wrote(150, 70, 70);
        let c = b.chunks_of(150).unwrap();
        assert!(
            c.may_have(64) && c.may_have(70),
            "chunks from 64 on are noted up to the highest"
        );
        assert!(!c.may_have(71) && !c.may_have(1000));
        b.wrote(150, 1000, 1001);
        let c = b.chunks_of(150).unwrap();
        assert!(c.may_have(500) && c.may_have(1001) && !c.may_have(1002));
        // Removed: the records went with it, and its note with them.
        let mut taken = Taken::default();
        b.take(150, &mut taken);
        taken.built();
        assert!(!b.chunks_of(150).unwrap().may_have(2));
    }

    /// Only the first put of a born inode's record finds no record; a
    /// removal that was not built leaves the note as it was.
    #[test]
    fn the_first_put_of_a_born_inode_has_no_record_before_it() {
        let b = Born::new(100);
        b.reserved(200);
        assert!(!b.first_inode_put(99), "born before this open");
        assert!(!b.first_inode_put(250), "not reserved yet");
        b.reserved(300);
        assert!(!b.first_inode_put(250), "noted before its reservation");
        assert!(b.first_inode_put(150));
        assert!(!b.first_inode_put(150), "its record is there now");
        assert!(b.first_cookie_put(151));
        assert!(!b.first_cookie_put(151));
        assert!(b.first_inode_put(151), "a cookie's note is not an inode's");
        let mut taken = Taken::default();
        b.take(150, &mut taken);
        drop(taken);
        assert!(
            !b.first_inode_put(150),
            "the failed removal left the record"
        );
    }

    #[test]
    fn a_full_table_forgets_what_was_handed_out() {
        let first = 16;
        let b = Born::new(first);
        let end = first + TRACKED_MAX as u64;
        b.reserved(end);
        for ino in first..end {
            b.set_xattr(ino);
        }
        assert_eq!(b.noted(), TRACKED_MAX);
        // One more, not reserved yet: the table is forgotten, and noting
        // goes on above what was handed out.
        b.set_xattr(end);
        assert_eq!(b.noted(), 1);
        assert_eq!(peek(&b, first), Leftovers::Unknown);
        assert_eq!(peek(&b, end - 1), Leftovers::Unknown);
        b.reserved(end + 10);
        assert_eq!(peek(&b, end), known(vec![], true));
        assert_eq!(peek(&b, end + 1), known(vec![], false));
    }
}
