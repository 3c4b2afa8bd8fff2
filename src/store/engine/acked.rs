//! Reads as of every acknowledged commit: the engine, with the groups of
//! the commit log that are durable (so acknowledged) but not yet in the
//! engine laid over it (`log_queue.rs`, [`LogQueue::unapplied`]). A key
//! leaves that overlay only once the engine has it, so a read that misses
//! it there finds it in the engine.
//!
//! [`LogQueue::unapplied`]: super::log_queue::LogQueue::unapplied

use slatedb::config::ScanOptions;

use super::identity::map_engine_error;
use super::{keys, SlateStore};
use crate::store::{StoreError, BLOCK_SIZE};

impl SlateStore {
    /// The value of `key` as of every acknowledged commit: a group durable
    /// in the commit log but not yet in the engine decides first (a key
    /// leaves that overlay only once the engine has it).
    pub(super) async fn get(&self, key: Vec<u8>) -> Result<Option<bytes::Bytes>, StoreError> {
        #[cfg(test)]
        let _gate = self.read_gate.read().await;
        if let Some(v) = self.log_queue.unapplied(&key) {
            return Ok(v);
        }
        self.db.get(key).await.map_err(map_engine_error)
    }

    /// Collect up to `max` key-value pairs of `range`.
    pub(super) async fn scan(
        &self,
        range: std::ops::Range<Vec<u8>>,
        max: usize,
    ) -> Result<Vec<(bytes::Bytes, bytes::Bytes)>, StoreError> {
        let mut out = Vec::new();
        if max == 0 || range.is_empty() {
            return Ok(out);
        }
        self.scan_each(range, |k, v| {
            out.push((k, v));
            out.len() < max
        })
        .await?;
        Ok(out)
    }

    /// Visit the key-value pairs of `range` in key order, as of every
    /// acknowledged commit (as [`SlateStore::get`]), while `visit` says to
    /// go on.
    pub(super) async fn scan_each(
        &self,
        range: std::ops::Range<Vec<u8>>,
        mut visit: impl FnMut(bytes::Bytes, bytes::Bytes) -> bool,
    ) -> Result<(), StoreError> {
        // Before the scan: a key that leaves the overlay meanwhile is in
        // the engine by then.
        let mut over = self
            .log_queue
            .unapplied_range(&range)
            .into_iter()
            .peekable();
        let mut iter = self
            .db
            .scan_with_options(range, &ScanOptions::default())
            .await
            .map_err(map_engine_error)?;
        loop {
            let next = iter.next().await.map_err(map_engine_error)?;
            // The overlay's keys before the engine's next one.
            while let Some((k, _)) = over.peek() {
                if next
                    .as_ref()
                    .is_some_and(|kv| kv.key.as_ref() <= k.as_slice())
                {
                    break;
                }
                if let Some((k, Some(v))) = over.next() {
                    if !visit(k.into(), v) {
                        return Ok(());
                    }
                }
            }
            let Some(kv) = next else { return Ok(()) };
            let decided = match over.peek() {
                Some((k, _)) if k.as_slice() == kv.key.as_ref() => over.next().map(|(_, v)| v),
                _ => None,
            };
            let go_on = match decided {
                // Deleted by a group not yet in the engine.
                Some(None) => true,
                Some(Some(v)) => visit(kv.key, v),
                None => visit(kv.key, kv.value),
            };
            if !go_on {
                return Ok(());
            }
        }
    }

    /// Where the first hole at or after `offset` of `ino` starts, in
    /// whole chunks.
    pub(super) async fn next_hole_inner(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        let mut want = offset / BLOCK_SIZE;
        let mut failed = None;
        let mut past_end = false;
        self.scan_each(keys::blocks_from(ino, want), |k, _| {
            match keys::decode_block(&k) {
                Ok((_, index)) if index == want => match want.checked_add(1) {
                    Some(w) => {
                        want = w;
                        return true;
                    }
                    None => past_end = true,
                },
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
            false
        })
        .await?;
        if let Some(e) = failed {
            return Err(e);
        }
        if past_end {
            return Ok(u64::MAX);
        }
        Ok(want.saturating_mul(BLOCK_SIZE).max(offset))
    }
}
