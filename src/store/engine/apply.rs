//! Turning one [`Txn`] into one engine write batch.
//!
//! A [`TxnView`] is the volume as the transaction being built sees it: the
//! engine's committed state with this transaction's earlier ops laid over
//! it, so a partial-block write after a truncate in the same transaction
//! reads the truncated block. [`apply`] translates each [`Op`] into puts and
//! deletes on the view; [`TxnView::finish`] hands back the batch and how the
//! space counters move.
//!
//! This module owns the meaning of ops in terms of keys. It never writes to
//! the engine (the caller does, once, with the whole batch), and it must be
//! called with commits serialized: it reads what earlier transactions left.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use slatedb::{Db, WriteBatch};

use super::codec::{self, Counters};
use super::keys::{self, tag};
use super::map_engine_error;
use crate::store::{Op, StoreError, BLOCK_SIZE};

/// One key this transaction has read or written.
struct Entry {
    /// Whether the key exists in the engine, before this transaction. Only
    /// kept exact for the keys the counters follow (inodes and blocks).
    base_exists: bool,
    /// The key's value as the transaction sees it now.
    value: Option<Bytes>,
    /// Whether the transaction wrote the key.
    dirty: bool,
}

/// The engine's state as seen by one transaction being built.
pub struct TxnView<'a> {
    db: &'a Db,
    entries: BTreeMap<Vec<u8>, Entry>,
}

/// Whether the counters follow keys of this record type.
fn counted(key: &[u8]) -> bool {
    matches!(key.first(), Some(&tag::INODE) | Some(&tag::BLOCK))
}

impl<'a> TxnView<'a> {
    pub fn new(db: &'a Db) -> TxnView<'a> {
        TxnView {
            db,
            entries: BTreeMap::new(),
        }
    }

    /// The value of `key` as this transaction sees it.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if let Some(e) = self.entries.get(key) {
            return Ok(e.value.clone());
        }
        let value = self.db.get(key).await.map_err(map_engine_error)?;
        self.entries.insert(
            key.to_vec(),
            Entry {
                base_exists: value.is_some(),
                value: value.clone(),
                dirty: false,
            },
        );
        Ok(value)
    }

    /// Set `key` to `value` (or delete it, for `None`) in this transaction.
    async fn set(&mut self, key: Vec<u8>, value: Option<Bytes>) -> Result<(), StoreError> {
        if let Some(e) = self.entries.get_mut(&key) {
            e.value = value;
            e.dirty = true;
            return Ok(());
        }
        let base_exists = if counted(&key) {
            self.db.get(&key).await.map_err(map_engine_error)?.is_some()
        } else {
            false
        };
        self.entries.insert(
            key,
            Entry {
                base_exists,
                value,
                dirty: true,
            },
        );
        Ok(())
    }

    pub async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.set(key, Some(Bytes::from(value))).await
    }

    pub async fn delete(&mut self, key: Vec<u8>) -> Result<(), StoreError> {
        self.set(key, None).await
    }

    /// The keys in `range` that exist as this transaction sees them, in
    /// order. Values are not kept: the scans that need them are few.
    pub async fn keys_in(&mut self, range: Range<Vec<u8>>) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut found = std::collections::BTreeSet::new();
        let mut iter = self
            .db
            .scan(range.clone())
            .await
            .map_err(map_engine_error)?;
        while let Some(kv) = iter.next().await.map_err(map_engine_error)? {
            found.insert(kv.key.to_vec());
        }
        for (key, e) in self.entries.range(range) {
            if e.value.is_some() {
                found.insert(key.clone());
            } else {
                found.remove(key);
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Delete every key in `range`.
    pub async fn delete_range(&mut self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        for key in self.keys_in(range).await? {
            match self.entries.get_mut(&key) {
                Some(e) => {
                    e.value = None;
                    e.dirty = true;
                }
                // Found by the scan and not in the overlay: it came from
                // the engine, so it exists there.
                None => {
                    self.entries.insert(
                        key,
                        Entry {
                            base_exists: true,
                            value: None,
                            dirty: true,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// The batch this transaction writes, and the counters after it.
    pub fn finish(self, before: Counters) -> Result<(WriteBatch, Counters), StoreError> {
        let mut batch = WriteBatch::new();
        let (mut blocks, mut inodes) = (before.blocks as i128, before.inodes as i128);
        for (key, e) in self.entries {
            if !e.dirty {
                continue;
            }
            let delta = i128::from(e.value.is_some()) - i128::from(e.base_exists);
            match key.first() {
                Some(&tag::BLOCK) => blocks += delta,
                Some(&tag::INODE) => inodes += delta,
                _ => {}
            }
            match e.value {
                Some(v) => batch.put_bytes(Bytes::from(key), v),
                None => batch.delete(&key),
            }
        }
        let after = Counters {
            blocks: u64::try_from(blocks)
                .map_err(|_| StoreError::Corrupt(format!("block count went to {blocks}")))?,
            inodes: u64::try_from(inodes)
                .map_err(|_| StoreError::Corrupt(format!("inode count went to {inodes}")))?,
        };
        if after != before {
            batch.put(keys::stats(), codec::encode_counters(&after));
        }
        Ok((batch, after))
    }
}

/// The stored bytes of block `index` of `ino`, as the view sees them.
async fn block_bytes(
    view: &mut TxnView<'_>,
    ino: u64,
    index: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    match view.get(&keys::block(ino, index)).await? {
        Some(v) => Ok(Some(codec::decode_block(&v)?.to_vec())),
        None => Ok(None),
    }
}

async fn put_block(
    view: &mut TxnView<'_>,
    ino: u64,
    index: u64,
    data: &[u8],
) -> Result<(), StoreError> {
    view.put(keys::block(ino, index), codec::encode_bytes(data))
        .await
}

/// Zero `range` (offsets within one block) of block `index`, keeping the
/// block. Bytes past the stored length already read as zeros, so a range
/// that reaches the end shortens the stored bytes instead.
async fn zero_in_block(
    view: &mut TxnView<'_>,
    ino: u64,
    index: u64,
    range: Range<usize>,
) -> Result<(), StoreError> {
    let Some(mut data) = block_bytes(view, ino, index).await? else {
        return Ok(());
    };
    if range.start >= data.len() {
        return Ok(());
    }
    if range.end >= data.len() {
        data.truncate(range.start);
    } else {
        data[range].fill(0);
    }
    put_block(view, ino, index, &data).await
}

async fn write(
    view: &mut TxnView<'_>,
    ino: u64,
    offset: u64,
    data: &[u8],
) -> Result<(), StoreError> {
    // A write that would run past the largest offset is not applied: the
    // filesystem layer never sends one, and no block could hold it.
    if offset.checked_add(data.len() as u64).is_none() {
        return Ok(());
    }
    let mut pos = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let index = pos / BLOCK_SIZE;
        let in_block = (pos % BLOCK_SIZE) as usize;
        let n = rest.len().min(BLOCK_SIZE as usize - in_block);
        if in_block == 0 && n as u64 == BLOCK_SIZE {
            put_block(view, ino, index, &rest[..n]).await?;
        } else {
            let mut block = block_bytes(view, ino, index).await?.unwrap_or_default();
            if block.len() < in_block + n {
                block.resize(in_block + n, 0);
            }
            block[in_block..in_block + n].copy_from_slice(&rest[..n]);
            put_block(view, ino, index, &block).await?;
        }
        rest = &rest[n..];
        pos += n as u64;
    }
    Ok(())
}

async fn truncate(view: &mut TxnView<'_>, ino: u64, size: u64) -> Result<(), StoreError> {
    view.delete_range(keys::blocks_from(ino, size.div_ceil(BLOCK_SIZE)))
        .await?;
    let tail = (size % BLOCK_SIZE) as usize;
    if tail != 0 {
        zero_in_block(view, ino, size / BLOCK_SIZE, tail..BLOCK_SIZE as usize).await?;
    }
    Ok(())
}

async fn punch_hole(
    view: &mut TxnView<'_>,
    ino: u64,
    offset: u64,
    len: u64,
) -> Result<(), StoreError> {
    let end = offset.saturating_add(len);
    if end <= offset {
        return Ok(());
    }
    let first = offset / BLOCK_SIZE;
    let last = (end - 1) / BLOCK_SIZE;
    let head = (offset % BLOCK_SIZE) as usize;
    let tail_end = ((end - 1) % BLOCK_SIZE) as usize + 1;
    if first == last {
        if head == 0 && tail_end == BLOCK_SIZE as usize {
            view.delete(keys::block(ino, first)).await?;
        } else {
            zero_in_block(view, ino, first, head..tail_end).await?;
        }
        return Ok(());
    }
    // Whole blocks go with one scan, however long the hole; the partial
    // blocks at either end are zeroed in place.
    let full_first = if head == 0 { first } else { first + 1 };
    let full_last = if tail_end == BLOCK_SIZE as usize {
        Some(last)
    } else {
        last.checked_sub(1)
    };
    if let Some(full_last) = full_last.filter(|l| *l >= full_first) {
        view.delete_range(keys::blocks_between(ino, full_first, full_last))
            .await?;
    }
    if head != 0 {
        zero_in_block(view, ino, first, head..BLOCK_SIZE as usize).await?;
    }
    if tail_end != BLOCK_SIZE as usize {
        zero_in_block(view, ino, last, 0..tail_end).await?;
    }
    Ok(())
}

/// Lay `op` over the view.
pub async fn apply(view: &mut TxnView<'_>, op: Op) -> Result<(), StoreError> {
    match op {
        Op::PutInode(inode) => {
            view.put(keys::inode(inode.ino), codec::encode_inode(&inode))
                .await
        }
        Op::RemoveInode { ino } => {
            view.delete(keys::inode(ino)).await?;
            view.delete(keys::symlink(ino)).await?;
            view.delete_range(keys::blocks_from(ino, 0)).await?;
            view.delete_range(keys::xattrs_of(ino)).await
        }
        Op::PutDirent { parent, dirent } => {
            let by_name = keys::dirent_by_name(parent, &dirent.name);
            if let Some(old) = view.get(&by_name).await? {
                let old = codec::decode_dirent_by_name(&dirent.name, &old)?;
                if old.cookie != dirent.cookie {
                    view.delete(keys::dirent_by_cookie(parent, old.cookie))
                        .await?;
                }
            }
            view.put(by_name, codec::encode_dirent_by_name(&dirent))
                .await?;
            view.put(
                keys::dirent_by_cookie(parent, dirent.cookie),
                codec::encode_dirent_by_cookie(&dirent),
            )
            .await
        }
        Op::RemoveDirent { parent, name } => {
            let by_name = keys::dirent_by_name(parent, &name);
            let Some(old) = view.get(&by_name).await? else {
                return Ok(());
            };
            let old = codec::decode_dirent_by_name(&name, &old)?;
            view.delete(by_name).await?;
            view.delete(keys::dirent_by_cookie(parent, old.cookie))
                .await
        }
        Op::Write { ino, offset, data } => write(view, ino, offset, &data.contiguous()).await,
        Op::Truncate { ino, size } => truncate(view, ino, size).await,
        Op::PunchHole { ino, offset, len } => punch_hole(view, ino, offset, len).await,
        Op::SetSymlink { ino, target } => {
            view.put(keys::symlink(ino), codec::encode_bytes(&target))
                .await
        }
        Op::SetXattr { ino, name, value } => {
            view.put(keys::xattr(ino, &name), codec::encode_bytes(&value))
                .await
        }
        Op::RemoveXattr { ino, name } => view.delete(keys::xattr(ino, &name)).await,
    }
}
