//! Segments shared with snapshots and clones, and their deferred space.
//!
//! A snapshot or clone shares a segment file by a hard link
//! (`snapshot.rs`), so the file's link count is its reference count. The
//! reclaimer never punches a file with more than one link: pages dead in
//! this volume may be live in another. It notes the segment in
//! `DIR/segments/deferred` instead (one id a line, 16 hex digits, replaced
//! whole by rename). Once the others let go (a snapshot or clone deleted),
//! [`reclaim_unshared`] (at open, and every few seconds while the volume
//! is served) recomputes those
//! segments' live pages from the extent maps and hands every other
//! allocated page to the reclaimer, which checks the link count again.
//!
//! Losing the list loses no data: the pages stay allocated, and `pohmelfs
//! check` reports them as leaked space once the file is unshared.
//!
//! This module never punches (the reclaimer does) and never writes the
//! engine.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::extent::{self, PAGE};
use slatedb::Db;

use super::reclaim::{Reclaim, Reclaimer};
use super::segment::{self, Segments};
use super::{keys, map_engine_error, SlateStore};
use crate::store::StoreError;

/// The deferred list's name inside the segment directory.
pub const DEFERRED_FILE: &str = "deferred";

/// The segments whose dead pages were not punched because another link
/// shared them.
pub struct Deferred {
    path: PathBuf,
    ids: BTreeSet<u64>,
    dirty: bool,
}

/// The ids listed in the deferred file of the segment directory `dir`.
pub fn read_list(dir: &Path) -> std::io::Result<BTreeSet<u64>> {
    let text = match std::fs::read_to_string(dir.join(DEFERRED_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
        .collect())
}

impl Deferred {
    /// The list of the segment directory `dir` (empty if unreadable: the
    /// pages then stay until `check` reports them).
    pub fn load(dir: &Path, volume: &str) -> Deferred {
        let ids = read_list(dir).unwrap_or_else(|e| {
            tracing::warn!(volume, error = %e, "reading the deferred segment list failed");
            BTreeSet::new()
        });
        Deferred {
            path: dir.join(DEFERRED_FILE),
            ids,
            dirty: false,
        }
    }

    pub fn insert(&mut self, seg: u64) {
        self.dirty |= self.ids.insert(seg);
    }

    pub fn remove(&mut self, seg: u64) {
        self.dirty |= self.ids.remove(&seg);
    }

    /// Write the list if it changed (a new file, synced, renamed over).
    pub fn save(&mut self, volume: &str) {
        if !self.dirty {
            return;
        }
        let text: String = self.ids.iter().map(|id| format!("{id:016x}\n")).collect();
        let tmp = self.path.with_extension("tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => self.dirty = false,
            Err(e) => {
                tracing::warn!(volume, error = %e, "writing the deferred segment list failed")
            }
        }
    }
}

/// The page ranges of `allocated` that no range of `live` (sorted,
/// page-aligned) covers.
fn dead_pages(allocated: &[Range<u64>], live: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for a in allocated {
        let mut pos = a.start / PAGE * PAGE;
        let end = a.end.div_ceil(PAGE) * PAGE;
        for l in live {
            if l.end <= pos || l.start >= end {
                continue;
            }
            if l.start > pos {
                out.push(pos..l.start);
            }
            pos = pos.max(l.end);
        }
        if pos < end {
            out.push(pos..end);
        }
    }
    out
}

impl SlateStore {
    /// `shared::reclaim_unshared` of this volume (run at open): give back
    /// the deferred pages of segments no snapshot or clone shares any more.
    pub(super) async fn reclaim_unshared(&self) -> Result<Vec<u64>, StoreError> {
        match (&self.segments, &self.reclaimer) {
            (Some(segs), Some(reclaimer)) => reclaim_unshared(&self.db, segs, reclaimer).await,
            _ => Ok(Vec::new()),
        }
    }
}

/// Reclaim the deferred pages of segments no snapshot or clone shares any
/// more: their live pages from the extent maps, every other allocated
/// page to the reclaimer. Returns the segments handed over. Pages of a
/// sealed segment only ever die, so a page this scan finds dead stays
/// dead; segments with appends in flight are left alone. Run at open and
/// by the checkpoint task every [`UNSHARED_PASS_MS`], so space comes back
/// while a daemon serves the volume too.
pub async fn reclaim_unshared(
    db: &Db,
    segs: &Segments,
    reclaimer: &Reclaimer,
) -> Result<Vec<u64>, StoreError> {
    let listed = read_list(segs.dir()).map_err(StoreError::Io)?;
    let mut live: BTreeMap<u64, Vec<Range<u64>>> = BTreeMap::new();
    for seg in listed {
        match segs.links(seg) {
            Ok(1) if segs.deletable(seg) => {
                live.insert(seg, Vec::new());
            }
            // Still shared, or in use: next time.
            Ok(_) => {}
            // Gone (deleted as emptied): the reclaimer forgets it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                live.insert(seg, Vec::new());
            }
            Err(e) => return Err(StoreError::Io(e)),
        }
    }
    if live.is_empty() {
        return Ok(Vec::new());
    }
    let mut iter = db
        .scan(keys::blocks_all())
        .await
        .map_err(map_engine_error)?;
    while let Some(kv) = iter.next().await.map_err(map_engine_error)? {
        for e in extent::decode(&kv.value)? {
            if let Some((seg, w)) = e.seg_window() {
                if let Some(ranges) = live.get_mut(&seg) {
                    let pages = extent::pages_of(w);
                    ranges.push(pages.start * PAGE..pages.end * PAGE);
                }
            }
        }
    }
    let mut reclaim = Reclaim::default();
    for (seg, mut ranges) in live {
        ranges.sort_unstable_by_key(|r| r.start);
        let allocated = match segs.handle(seg) {
            Ok(f) => segment::allocated(&f).map_err(StoreError::Io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StoreError::Io(e)),
        };
        // An entry even with nothing to punch: the reclaimer then takes
        // the segment off the list.
        reclaim.dead.insert(seg, dead_pages(&allocated, &ranges));
    }
    let handed: Vec<u64> = reclaim.dead.keys().copied().collect();
    reclaimer.send(reclaim);
    Ok(handed)
}

/// How often a volume that a daemon serves looks for deferred segments
/// no one shares any more.
pub const UNSHARED_PASS_MS: u64 = 2000;

#[cfg(test)]
mod tests {
    use super::dead_pages;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one range of pages, not a Vec of numbers
    fn dead_pages_are_the_gaps_between_live_ones() {
        let p = super::PAGE;
        let all = vec![0..4 * p];
        assert_eq!(dead_pages(&all, &[]), all);
        assert_eq!(
            dead_pages(&all, &[p..2 * p, p..3 * p]),
            vec![0..p, 3 * p..4 * p]
        );
        assert_eq!(dead_pages(&all, &all), vec![]);
    }
}
