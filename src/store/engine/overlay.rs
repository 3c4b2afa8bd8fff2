//! What the volume checker sees of commits durable in the commit log but
//! not yet in the engine: a crashed writer leaves them for its next open
//! to replay (`recover.rs`), and the checker, which writes nothing, lays
//! them over what it reads instead: their puts and deletes over the
//! engine's records, their small writes' bytes over the segment files.
//!
//! This module never writes; it only answers reads.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;

use bytes::Bytes;

use super::log::{self, LogError, Record, SegWrite};

/// The unreplayed part of a volume's commit log.
#[derive(Debug, Default)]
pub struct Overlay {
    puts: BTreeMap<Bytes, Option<Bytes>>,
    writes: Vec<SegWrite>,
}

impl Overlay {
    /// The unreplayed records of the log of the volume in `volume_dir`,
    /// read before the engine is: see [`Overlay::of`].
    pub fn read_log(volume_dir: &Path) -> Result<Vec<Record>, LogError> {
        log::read_unreplayed(volume_dir)
    }

    /// The overlay of `records` (read by [`Overlay::read_log`]) over an
    /// engine that has the batches up to lsn `applied`. The log must be
    /// read first: a checkpoint moves the log's tail only past batches the
    /// engine has, so every commit is then in the records or in an engine
    /// view taken later, while a log read after the engine could have lost
    /// records the engine view lacks.
    pub fn of(records: Vec<Record>, applied: u64) -> Overlay {
        let mut o = Overlay::default();
        for r in records {
            if r.lsn > applied {
                o.puts.extend(r.puts);
            }
            o.writes.extend(r.writes);
        }
        o
    }

    /// `Some(value)` when the log decides the key (`Some(None)`: deleted).
    pub fn get(&self, key: &[u8]) -> Option<Option<Bytes>> {
        self.puts.get(key).cloned()
    }

    /// The log's puts and deletes from `start` up to `end`, in key order.
    pub fn range(&self, start: &[u8], end: Option<&[u8]>) -> Vec<(Bytes, Option<Bytes>)> {
        let hi = end.map_or(Bound::Unbounded, Bound::Excluded);
        self.puts
            .range::<[u8], _>((Bound::Included(start), hi))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The log's bytes of segment `seg`, laid over `buf` read at `off`.
    pub fn patch(&self, seg: u64, off: u64, buf: &mut [u8]) {
        let end = off + buf.len() as u64;
        for w in self.writes.iter().filter(|w| w.seg == seg) {
            let (from, to) = (w.off.max(off), (w.off + w.bytes.len() as u64).min(end));
            if from < to {
                buf[(from - off) as usize..(to - off) as usize]
                    .copy_from_slice(&w.bytes[(from - w.off) as usize..(to - w.off) as usize]);
            }
        }
    }
}
