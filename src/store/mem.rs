//! `mem:` — a volume held in daemon memory. It does not persist: it exists
//! for unit tests and for trying the device without a store. Its capacity is
//! bounded (`mem:?capacity=8G`, default [`DEFAULT_CAPACITY`]) so a guest
//! cannot grow the daemon without limit.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::RwLock;

use super::{
    Dirent, Inode, Op, OpenError, Store, StoreError, StoreStats, Txn, BLOCK_SIZE, FIRST_FREE_ID,
};

/// The capacity of a `mem:` volume when the URL names none.
pub const DEFAULT_CAPACITY: u64 = 8 << 30;

/// The most inodes a `mem:` volume holds.
pub const MAX_INODES: u64 = 16 << 20;

#[derive(Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    /// (parent, name) -> entry
    dirents: BTreeMap<(u64, Vec<u8>), Dirent>,
    /// (parent, cookie) -> name, for readdir in cookie order
    by_cookie: BTreeMap<(u64, u64), Vec<u8>>,
    /// (ino, block index) -> block of BLOCK_SIZE bytes
    blocks: BTreeMap<(u64, u64), Box<[u8]>>,
    symlinks: HashMap<u64, Vec<u8>>,
    xattrs: BTreeMap<(u64, Vec<u8>), Vec<u8>>,
    next_id: u64,
}

/// An in-memory volume.
pub struct MemStore {
    state: RwLock<State>,
    capacity_bytes: u64,
}

impl MemStore {
    /// An empty volume holding at most `capacity_bytes` of file data.
    pub fn new(capacity_bytes: u64) -> MemStore {
        MemStore {
            state: RwLock::new(State {
                next_id: FIRST_FREE_ID,
                ..State::default()
            }),
            capacity_bytes,
        }
    }

    /// Build from what follows `mem:` in a store URL: nothing, or
    /// `?capacity=SIZE`.
    pub fn from_url_rest(rest: &str) -> Result<MemStore, OpenError> {
        let mut capacity = DEFAULT_CAPACITY;
        let query = rest.trim_start_matches("//").trim_start_matches('?');
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("capacity", v)) => {
                    capacity = super::parse_size(v)
                        .ok_or_else(|| OpenError::BadOption(pair.to_string()))?
                }
                _ => return Err(OpenError::BadOption(pair.to_string())),
            }
        }
        Ok(MemStore::new(capacity))
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied
        // transaction (see `commit`), so a poisoned lock is still consistent.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn used_bytes(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK_SIZE
    }

    /// Blocks a transaction would add, counted before applying it so a full
    /// volume refuses the whole transaction.
    fn new_blocks(&self, txn: &Txn) -> u64 {
        let mut added = std::collections::HashSet::new();
        for op in &txn.ops {
            if let Op::Write { ino, offset, data } = op {
                if data.is_empty() {
                    continue;
                }
                let first = offset / BLOCK_SIZE;
                let last = offset.saturating_add(data.len() as u64 - 1) / BLOCK_SIZE;
                for b in first..=last {
                    if !self.blocks.contains_key(&(*ino, b)) {
                        added.insert((*ino, b));
                    }
                }
            }
        }
        added.len() as u64
    }

    fn remove_blocks_from(&mut self, ino: u64, first_block: u64) {
        let doomed: Vec<_> = self
            .blocks
            .range((ino, first_block)..=(ino, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in doomed {
            self.blocks.remove(&k);
        }
    }

    fn zero_range(&mut self, ino: u64, offset: u64, len: u64) {
        // Visit only the blocks that exist: a hole may be as long as the
        // whole offset space.
        let end = offset.saturating_add(len);
        let (first, last) = (offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        let present: Vec<u64> = self
            .blocks
            .range((ino, first)..(ino, last))
            .map(|((_, b), _)| *b)
            .collect();
        for b in present {
            let start = b * BLOCK_SIZE;
            let from = offset.max(start) - start;
            let to = end.min(start + BLOCK_SIZE) - start;
            if from == 0 && to == BLOCK_SIZE {
                self.blocks.remove(&(ino, b));
            } else if let Some(block) = self.blocks.get_mut(&(ino, b)) {
                block[from as usize..to as usize].fill(0);
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::PutInode(inode) => {
                self.inodes.insert(inode.ino, inode);
            }
            Op::RemoveInode { ino } => {
                self.inodes.remove(&ino);
                self.symlinks.remove(&ino);
                self.remove_blocks_from(ino, 0);
                let names: Vec<_> = self
                    .xattrs
                    .range((ino, Vec::new())..)
                    .take_while(|((i, _), _)| *i == ino)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in names {
                    self.xattrs.remove(&k);
                }
            }
            Op::PutDirent { parent, dirent } => {
                let key = (parent, dirent.name.clone());
                if let Some(old) = self.dirents.remove(&key) {
                    self.by_cookie.remove(&(parent, old.cookie));
                }
                self.by_cookie
                    .insert((parent, dirent.cookie), dirent.name.clone());
                self.dirents.insert(key, dirent);
            }
            Op::RemoveDirent { parent, name } => {
                if let Some(old) = self.dirents.remove(&(parent, name)) {
                    self.by_cookie.remove(&(parent, old.cookie));
                }
            }
            Op::Write { ino, offset, data } => {
                let mut pos = offset;
                for mut rest in data.slices() {
                    while !rest.is_empty() {
                        let b = pos / BLOCK_SIZE;
                        let in_block = (pos % BLOCK_SIZE) as usize;
                        let n = rest.len().min(BLOCK_SIZE as usize - in_block);
                        let block = self
                            .blocks
                            .entry((ino, b))
                            .or_insert_with(|| vec![0u8; BLOCK_SIZE as usize].into_boxed_slice());
                        block[in_block..in_block + n].copy_from_slice(&rest[..n]);
                        rest = &rest[n..];
                        pos += n as u64;
                    }
                }
            }
            Op::Truncate { ino, size } => {
                self.remove_blocks_from(ino, size.div_ceil(BLOCK_SIZE));
                let tail = (size % BLOCK_SIZE) as usize;
                if tail != 0 {
                    if let Some(block) = self.blocks.get_mut(&(ino, size / BLOCK_SIZE)) {
                        block[tail..].fill(0);
                    }
                }
            }
            Op::PunchHole { ino, offset, len } => self.zero_range(ino, offset, len),
            Op::SetSymlink { ino, target } => {
                self.symlinks.insert(ino, target);
            }
            Op::SetXattr { ino, name, value } => {
                self.xattrs.insert((ino, name), value);
            }
            Op::RemoveXattr { ino, name } => {
                self.xattrs.remove(&(ino, name));
            }
        }
    }
}

impl Store for MemStore {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        Ok(self.read_state().inodes.get(&ino).cloned())
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        Ok(self
            .read_state()
            .dirents
            .get(&(parent, name.to_vec()))
            .cloned())
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        let st = self.read_state();
        let range = (
            Bound::Excluded((parent, after)),
            Bound::Included((parent, u64::MAX)),
        );
        Ok(st
            .by_cookie
            .range(range)
            .take(max)
            .filter_map(|((p, _), name)| st.dirents.get(&(*p, name.clone())).cloned())
            .collect())
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let st = self.read_state();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let b = pos / BLOCK_SIZE;
            let in_block = (pos % BLOCK_SIZE) as usize;
            let n = (buf.len() - done).min(BLOCK_SIZE as usize - in_block);
            match st.blocks.get(&(ino, b)) {
                Some(block) => buf[done..done + n].copy_from_slice(&block[in_block..in_block + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        let st = self.read_state();
        let first = offset / BLOCK_SIZE;
        Ok(st
            .blocks
            .range((ino, first)..=(ino, u64::MAX))
            .next()
            .map(|((_, b), _)| (b * BLOCK_SIZE).max(offset)))
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        let st = self.read_state();
        let mut b = offset / BLOCK_SIZE;
        for ((_, stored), _) in st.blocks.range((ino, b)..=(ino, u64::MAX)) {
            if *stored != b {
                break;
            }
            b += 1;
        }
        Ok((b * BLOCK_SIZE).max(offset))
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read_state().symlinks.get(&ino).cloned())
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read_state().xattrs.get(&(ino, name.to_vec())).cloned())
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .read_state()
            .xattrs
            .range((ino, Vec::new())..)
            .take_while(|((i, _), _)| *i == ino)
            .map(|((_, name), _)| name.clone())
            .collect())
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        let st = self.read_state();
        Ok(StoreStats {
            capacity_bytes: self.capacity_bytes,
            used_bytes: st.used_bytes(),
            capacity_inodes: MAX_INODES,
            used_inodes: st.inodes.len() as u64,
        })
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        let mut st = self.write_state();
        let first = st.next_id;
        st.next_id = first
            .checked_add(count)
            .ok_or_else(|| StoreError::Corrupt("id space exhausted".into()))?;
        Ok(first)
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        // Data past the largest file offset cannot be stored (and would
        // overflow block arithmetic).
        let past_end = txn.ops.iter().any(|op| {
            matches!(op, Op::Write { offset, data, .. } if offset.checked_add(data.len() as u64).is_none_or(|e| e > i64::MAX as u64))
        });
        if past_end {
            return Err(StoreError::Io(std::io::Error::other(
                "write beyond the largest file offset",
            )));
        }
        let mut st = self.write_state();
        // Check the whole transaction before applying any of it: all or
        // nothing. Nothing below can fail or panic once we start applying.
        let new_bytes = st.new_blocks(&txn) * BLOCK_SIZE;
        if new_bytes > 0 && st.used_bytes() + new_bytes > self.capacity_bytes {
            return Err(StoreError::NoSpace);
        }
        let new_inodes = txn
            .ops
            .iter()
            .filter(|op| matches!(op, Op::PutInode(i) if !st.inodes.contains_key(&i.ino)))
            .count() as u64;
        if new_inodes > 0 && st.inodes.len() as u64 + new_inodes > MAX_INODES {
            return Err(StoreError::NoSpace);
        }
        for op in txn.ops {
            st.apply(op);
        }
        Ok(())
    }

    fn sync(&self, _ino: Option<u64>) -> Result<(), StoreError> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "mem: (in daemon memory, capacity {} MiB; does not persist)",
            self.capacity_bytes >> 20
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileKind;

    fn write(s: &MemStore, ino: u64, offset: u64, data: &[u8]) {
        let mut t = Txn::new();
        t.push(Op::Write {
            ino,
            offset,
            data: data.to_vec().into(),
        });
        s.commit(t).unwrap();
    }

    fn read(s: &MemStore, ino: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAAu8; len];
        s.read(ino, offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn writes_span_blocks_and_holes_read_as_zero() {
        let s = MemStore::new(1 << 30);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        write(&s, 20, 100_000, &data);
        assert_eq!(read(&s, 20, 100_000, data.len()), data);
        assert_eq!(read(&s, 20, 0, 10), vec![0; 10]);
        assert_eq!(s.next_data(20, 0).unwrap(), Some(BLOCK_SIZE));
        assert_eq!(s.next_hole(20, 0).unwrap(), 0);
        assert_eq!(s.next_hole(20, BLOCK_SIZE + 5).unwrap(), 5 * BLOCK_SIZE);
    }

    #[test]
    fn truncate_zeroes_the_tail_of_the_last_block() {
        let s = MemStore::new(1 << 30);
        write(&s, 20, 0, &[7u8; 100]);
        let mut t = Txn::new();
        t.push(Op::Truncate { ino: 20, size: 10 });
        s.commit(t).unwrap();
        // Growing again must not resurrect the old bytes.
        let got = read(&s, 20, 0, 100);
        assert_eq!(&got[..10], &[7u8; 10]);
        assert_eq!(&got[10..], &[0u8; 90]);
    }

    #[test]
    fn punch_hole_frees_whole_blocks_and_zeroes_partial_ones() {
        let s = MemStore::new(1 << 30);
        write(&s, 20, 0, &vec![1u8; 3 * BLOCK_SIZE as usize]);
        let mut t = Txn::new();
        t.push(Op::PunchHole {
            ino: 20,
            offset: 10,
            len: 2 * BLOCK_SIZE,
        });
        s.commit(t).unwrap();
        assert_eq!(s.next_hole(20, 0).unwrap(), BLOCK_SIZE);
        let got = read(&s, 20, 0, 3 * BLOCK_SIZE as usize);
        assert!(got[..10].iter().all(|&b| b == 1));
        assert!(got[10..2 * BLOCK_SIZE as usize + 10]
            .iter()
            .all(|&b| b == 0));
        assert!(got[2 * BLOCK_SIZE as usize + 10..].iter().all(|&b| b == 1));
    }

    #[test]
    fn full_volume_refuses_the_whole_transaction() {
        let s = MemStore::new(2 * BLOCK_SIZE);
        let mut t = Txn::new();
        t.push(Op::PutInode(Inode::regular(20, 0)));
        t.push(Op::Write {
            ino: 20,
            offset: 0,
            data: vec![1; 3 * BLOCK_SIZE as usize].into(),
        });
        assert!(matches!(s.commit(t), Err(StoreError::NoSpace)));
        assert_eq!(s.get_inode(20).unwrap(), None);
        assert_eq!(s.statfs().unwrap().used_bytes, 0);
    }

    #[test]
    fn readdir_resumes_after_a_cookie_while_entries_change() {
        let s = MemStore::new(1 << 30);
        let mut t = Txn::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            t.push(Op::PutDirent {
                parent: 1,
                dirent: Dirent {
                    name: name.as_bytes().to_vec(),
                    ino: 30 + i as u64,
                    kind: FileKind::Regular,
                    cookie: 100 + i as u64,
                },
            });
        }
        s.commit(t).unwrap();
        let first = s.readdir(1, 0, 1).unwrap();
        assert_eq!(first[0].name, b"a");
        let mut t = Txn::new();
        t.push(Op::RemoveDirent {
            parent: 1,
            name: b"b".to_vec(),
        });
        s.commit(t).unwrap();
        let rest = s.readdir(1, first[0].cookie, 10).unwrap();
        let names: Vec<_> = rest.iter().map(|d| d.name.clone()).collect();
        assert_eq!(names, vec![b"c".to_vec()]);
    }

    #[test]
    fn remove_inode_drops_data_and_xattrs() {
        let s = MemStore::new(1 << 30);
        let mut t = Txn::new();
        t.push(Op::PutInode(Inode::regular(20, 0)));
        t.push(Op::SetXattr {
            ino: 20,
            name: b"user.a".to_vec(),
            value: b"1".to_vec(),
        });
        t.push(Op::Write {
            ino: 20,
            offset: 0,
            data: vec![1; 10].into(),
        });
        s.commit(t).unwrap();
        let mut t = Txn::new();
        t.push(Op::RemoveInode { ino: 20 });
        s.commit(t).unwrap();
        assert_eq!(s.list_xattr(20).unwrap().len(), 0);
        assert_eq!(s.statfs().unwrap().used_bytes, 0);
        assert_eq!(s.get_inode(20).unwrap(), None);
    }

    #[test]
    fn huge_holes_and_offsets_neither_hang_nor_panic() {
        let s = MemStore::new(1 << 30);
        write(&s, 20, 0, &[1u8; 100]);
        let mut t = Txn::new();
        t.push(Op::PunchHole {
            ino: 20,
            offset: 50,
            len: u64::MAX,
        });
        s.commit(t).unwrap();
        assert_eq!(
            &read(&s, 20, 0, 100)[..],
            &[&[1u8; 50][..], &[0u8; 50][..]].concat()[..]
        );
        let mut t = Txn::new();
        t.push(Op::Write {
            ino: 20,
            offset: u64::MAX - 1,
            data: vec![1; 10].into(),
        });
        assert!(s.commit(t).is_err());
    }

    #[test]
    fn ids_are_never_reused() {
        let s = MemStore::new(1 << 30);
        let a = s.reserve_ids(10).unwrap();
        let b = s.reserve_ids(10).unwrap();
        assert!(a >= FIRST_FREE_ID);
        assert_eq!(b, a + 10);
    }
}
