//! The engine's state as one transaction being built sees it.
//!
//! A [`TxnView`] is the engine's committed state (and the batches queued
//! for the commit log before it) with this transaction's earlier ops laid
//! over it. It keeps what the space counters need (the length each key had
//! before), what segment pages died and how each segment's live bytes
//! moved, and hands back the transaction's batch with [`TxnView::finish`].
//! What ops mean in keys is `apply.rs`'s business.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use slatedb::{Db, WriteBatch};

use super::born::{Born, Taken};
use super::codec::{self, Counters};
use super::keys::{self, tag};
use super::log_queue::LogQueue;
use super::map_engine_error;
use super::objects::Objects;
use super::record_cache::{RecordCache, Slot};
use super::segment::{Placed, Segments};
use crate::store::StoreError;

/// A batch as a list: the key, and its new value or `None` to delete it.
pub type Puts = Vec<(Vec<u8>, Option<Bytes>)>;

/// The engine batch of `puts`.
pub fn to_batch(puts: &Puts) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for (k, v) in puts {
        match v {
            Some(v) => batch.put_bytes(Bytes::copy_from_slice(k), v.clone()),
            None => batch.delete(k),
        }
    }
    batch
}

/// One key this transaction has read or written.
struct Entry {
    /// The length of the key's value in the engine before this
    /// transaction (`None`: absent). Only kept exact for the keys the
    /// counters follow (see [`counted`]).
    base_len: Option<usize>,
    /// The key's value as the transaction sees it now.
    value: Option<Bytes>,
    /// Whether the transaction wrote the key.
    dirty: bool,
}

/// The engine's state as seen by one transaction being built.
pub struct TxnView<'a> {
    db: &'a Db,
    /// Batches built before this one and not yet in the engine (the
    /// commit log's queue): read before the engine.
    queued: Option<&'a LogQueue>,
    entries: BTreeMap<Vec<u8>, Entry>,
    /// The volume's segments (`file://`); `None` keeps data inline,
    /// unless the volume has data objects.
    pub segments: Option<&'a Segments>,
    /// The volume's data objects (`s3://`).
    pub objects: Option<&'a Objects>,
    /// Where a chunk rewrite's object ids come from (with `objects`).
    pub object_ids: Option<&'a (dyn Fn() -> Result<u64, StoreError> + Sync)>,
    /// The volume's record cache: the records it keeps are read through
    /// it.
    pub records: Option<&'a RecordCache>,
    /// The inodes born since the engine opened (`born.rs`): what their
    /// writes created is noted as they are applied.
    pub born: Option<&'a Born>,
    /// The notes of the born inodes this transaction removes, put back if
    /// it is never built.
    pub removed: Taken<'a>,
    /// Segment pages no extent refers to once this batch is durable.
    pub dead: BTreeMap<u64, Vec<Range<u64>>>,
    /// How the live bytes of each segment move.
    pub live_delta: BTreeMap<u64, i128>,
    /// Bytes appended while applying (chunk rewrites), to be made durable
    /// before the batch is written, or punched if it never is.
    pub appended: Vec<Placed>,
    /// Segments whose last live byte this batch drops: deleted once it is
    /// durable.
    pub emptied: Vec<u64>,
}

/// Whether the counters follow keys of this record type: blocks and
/// inodes by count, and every metadata record by its bytes.
fn counted(key: &[u8]) -> bool {
    key.first().is_some_and(|&t| t == tag::BLOCK || metered(t))
}

/// Whether records of this type count in the metadata bytes: what the
/// guest's namespace costs (chunk, segment and applied records are not
/// counted; a chunk is charged a whole block instead).
fn metered(t: u8) -> bool {
    matches!(
        t,
        tag::INODE | tag::SYMLINK | tag::DIRENT_BY_NAME | tag::DIRENT_BY_COOKIE | tag::XATTR
    )
}

/// The bytes a record of `key` with a value of `len` bytes counts.
fn record_bytes(key: &[u8], len: Option<usize>) -> i128 {
    len.map_or(0, |l| (key.len() + l) as i128)
}

impl<'a> TxnView<'a> {
    pub fn new(
        db: &'a Db,
        queued: Option<&'a LogQueue>,
        segments: Option<&'a Segments>,
    ) -> TxnView<'a> {
        TxnView {
            db,
            queued,
            entries: BTreeMap::new(),
            segments,
            objects: None,
            object_ids: None,
            records: None,
            born: None,
            removed: Taken::default(),
            dead: BTreeMap::new(),
            live_delta: BTreeMap::new(),
            appended: Vec::new(),
            emptied: Vec::new(),
        }
    }

    /// Put the segment records whose live bytes moved. A sealed segment
    /// that no extent refers to any more (and no append waits on) loses its
    /// record, and its file is deleted once the batch is durable.
    pub async fn settle_segments(&mut self) -> Result<(), StoreError> {
        let deltas: Vec<(u64, i128)> = std::mem::take(&mut self.live_delta)
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .collect();
        for (seg, delta) in deltas {
            let key = keys::segment(seg);
            let old = match self.get(&key).await? {
                Some(v) => codec::decode_segment(&v)?,
                None => 0,
            };
            let live = u64::try_from(i128::from(old) + delta).map_err(|_| {
                StoreError::Corrupt(format!(
                    "live bytes of segment {seg} went to {}",
                    i128::from(old) + delta
                ))
            })?;
            let deletable = self.segments.is_some_and(|s| s.deletable(seg))
                || self.objects.is_some_and(|o| o.deletable(seg));
            if live == 0 && deletable {
                self.delete(key).await?;
                self.emptied.push(seg);
                self.dead.remove(&seg);
            } else {
                self.put(key, codec::encode_segment(live)).await?;
            }
        }
        Ok(())
    }

    /// The value of `key` as this transaction sees it.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if let Some(e) = self.entries.get(key) {
            return Ok(e.value.clone());
        }
        let value = self.base(key).await?;
        self.entries.insert(
            key.to_vec(),
            Entry {
                base_len: value.as_ref().map(Bytes::len),
                value: value.clone(),
                dirty: false,
            },
        );
        Ok(value)
    }

    /// `key` had no value before this transaction, as the caller knows
    /// without asking the engine (`born.rs`): reading or writing it in this
    /// transaction reads nothing. A key the transaction already holds
    /// keeps what it has.
    pub fn known_absent(&mut self, key: &[u8]) {
        if !self.entries.contains_key(key) {
            self.entries.insert(
                key.to_vec(),
                Entry {
                    base_len: None,
                    value: None,
                    dirty: false,
                },
            );
        }
    }

    /// The value of `key` before this transaction: queued, else in the
    /// engine. The queue is read first: a key leaves it only once the
    /// engine has it.
    async fn base(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if let Some(v) = self.queued.and_then(|q| q.get(key)) {
            return Ok(v);
        }
        let Some((cache, slot)) = self.records.zip(Slot::of(key)) else {
            return self.db.get(key).await.map_err(map_engine_error);
        };
        if let Some(record) = cache.get(slot) {
            return Ok(record);
        }
        let stamp = cache.stamp(slot);
        let record = self.db.get(key).await.map_err(map_engine_error)?;
        cache.offer(slot, stamp, record.clone());
        Ok(record)
    }

    /// Set `key` to `value` (or delete it, for `None`) in this transaction.
    async fn set(&mut self, key: Vec<u8>, value: Option<Bytes>) -> Result<(), StoreError> {
        if let Some(e) = self.entries.get_mut(&key) {
            e.value = value;
            e.dirty = true;
            return Ok(());
        }
        let base_len = if counted(&key) {
            let base = self.base(&key).await?;
            base.as_ref().map(Bytes::len)
        } else {
            None
        };
        self.entries.insert(
            key,
            Entry {
                base_len,
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

    /// The records in `range` as this transaction sees them, in order.
    pub async fn records_in(
        &mut self,
        range: Range<Vec<u8>>,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StoreError> {
        // Before the scan: a key that leaves the queue meanwhile is in
        // the engine by then.
        let queued = self.queued.map(|q| q.range(&range)).unwrap_or_default();
        let mut found = BTreeMap::new();
        let mut iter = self
            .db
            .scan(range.clone())
            .await
            .map_err(map_engine_error)?;
        while let Some(kv) = iter.next().await.map_err(map_engine_error)? {
            found.insert(kv.key.to_vec(), kv.value);
        }
        for (key, value) in queued {
            match value {
                Some(v) => found.insert(key, v),
                None => found.remove(&key),
            };
        }
        for (key, e) in self.entries.range(range) {
            match &e.value {
                Some(v) => found.insert(key.clone(), v.clone()),
                None => found.remove(key),
            };
        }
        Ok(found.into_iter().collect())
    }

    /// Delete every key in `range`.
    pub async fn delete_range(&mut self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        for (key, value) in self.records_in(range).await? {
            self.delete_found(key, value.len());
        }
        Ok(())
    }

    /// Delete `key`, which [`TxnView::records_in`] found with a value of
    /// `len` bytes.
    pub(super) fn delete_found(&mut self, key: Vec<u8>, len: usize) {
        match self.entries.get_mut(&key) {
            Some(e) => {
                e.value = None;
                e.dirty = true;
            }
            // Found by the scan and not among this transaction's keys:
            // it came from the queue or the engine, so it exists there.
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        base_len: Some(len),
                        value: None,
                        dirty: true,
                    },
                );
            }
        }
    }

    /// The puts (`Some`) and deletes (`None`) this transaction writes, and
    /// the counters after it.
    pub fn finish(self, before: Counters) -> Result<(Puts, Counters), StoreError> {
        let mut batch = Puts::new();
        let (mut blocks, mut inodes) = (before.blocks as i128, before.inodes as i128);
        let mut meta = before.meta_bytes as i128;
        for (key, e) in self.entries {
            if !e.dirty {
                continue;
            }
            let delta = i128::from(e.value.is_some()) - i128::from(e.base_len.is_some());
            let t = key.first().copied().unwrap_or(0);
            match t {
                tag::BLOCK => blocks += delta,
                tag::INODE => inodes += delta,
                _ => {}
            }
            if metered(t) {
                meta += record_bytes(&key, e.value.as_ref().map(Bytes::len))
                    - record_bytes(&key, e.base_len);
            }
            batch.push((key, e.value));
        }
        let after = Counters {
            blocks: u64::try_from(blocks)
                .map_err(|_| StoreError::Corrupt(format!("block count went to {blocks}")))?,
            inodes: u64::try_from(inodes)
                .map_err(|_| StoreError::Corrupt(format!("inode count went to {inodes}")))?,
            meta_bytes: u64::try_from(meta)
                .map_err(|_| StoreError::Corrupt(format!("metadata bytes went to {meta}")))?,
        };
        if after != before {
            batch.push((keys::stats(), Some(codec::encode_counters(&after).into())));
        }
        Ok((batch, after))
    }
}
