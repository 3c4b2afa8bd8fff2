//! Open file and directory handles, bounded in number. A handle remembers
//! what the guest opened and how (append mode); handle numbers are never
//! reused within a session, so a stale handle from the guest finds nothing.

use std::collections::HashMap;

use super::error::{errno, FsResult};

/// What one handle refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFile {
    pub ino: u64,
    /// Writes go to the end of the file, whatever offset the guest sends.
    pub append: bool,
}

/// The table of open handles.
pub struct HandleTable {
    open: HashMap<u64, OpenFile>,
    next: u64,
    max: usize,
}

impl HandleTable {
    /// A table holding at most `max` open handles.
    pub fn new(max: usize) -> HandleTable {
        HandleTable {
            open: HashMap::new(),
            next: 1,
            max,
        }
    }

    /// Open a handle; ENFILE when the table is full.
    pub fn insert(&mut self, file: OpenFile) -> FsResult<u64> {
        if self.open.len() >= self.max {
            return errno!(ENFILE);
        }
        let h = self.next;
        self.next += 1;
        self.open.insert(h, file);
        Ok(h)
    }

    pub fn get(&self, handle: u64) -> Option<OpenFile> {
        self.open.get(&handle).copied()
    }

    pub fn remove(&mut self, handle: u64) {
        self.open.remove(&handle);
    }

    pub fn clear(&mut self) {
        self.open.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Every open handle, and the next handle number (a migration's
    /// source: `session.rs`).
    pub fn export(&self) -> (Vec<(u64, OpenFile)>, u64) {
        (self.open.iter().map(|(&h, &f)| (h, f)).collect(), self.next)
    }

    /// Take `open` and `next` over from another daemon (a migration's
    /// destination; `session.rs` checked them).
    pub fn import(&mut self, open: &[(u64, OpenFile)], next: u64) {
        self.open = open.iter().copied().collect();
        self.next = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_bounded_and_never_reuses_numbers() {
        let mut t = HandleTable::new(2);
        let f = OpenFile {
            ino: 5,
            append: false,
        };
        let a = t.insert(f).unwrap();
        let b = t.insert(f).unwrap();
        assert_eq!(t.insert(f).unwrap_err().errno(), libc::ENFILE);
        t.remove(a);
        let c = t.insert(f).unwrap();
        assert!(c != a && c != b);
        assert_eq!(t.get(a), None);
        assert_eq!(t.get(c), Some(f));
    }
}
