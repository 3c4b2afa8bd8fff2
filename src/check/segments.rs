//! The checker's view of file data: every extent of every chunk checked
//! against the segment file it names (the file exists, the piece lies
//! inside it, every page the extent's window touches matches its
//! checksum), the segment records' live bytes against the windows found,
//! and the segment pages that hold data no extent refers to (leaked space;
//! in a segment shared with a snapshot or clone, a note instead: those
//! pages may be live there).
//!
//! On `s3://` the same checks run against the volume's data objects
//! (ranged reads instead of `pread`); an object that no record and no
//! extent names is reported as a leaked object (a commit's upload that
//! never became durable; the next open deletes it).
//!
//! This module only reads; it never repairs.

use std::collections::BTreeMap;
use std::ops::Range;

use super::problem::{Problem, Warning};
use crate::store::engine::{Extent, ExtentData, ObjectFiles, SegmentFiles, SEGMENT_PAGE};

/// A segment file another volume (a snapshot or clone) also links: its
/// pages this volume no longer refers to may be live there, so they are
/// not leaked space here, and no volume punches them while it is shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedSegment {
    pub seg: u64,
    /// The file's link count: this volume's name and the others'.
    pub links: u64,
    /// Allocated bytes no extent of this volume refers to.
    pub unreferenced_bytes: u64,
}

/// What the data pass learns about segments.
pub(super) struct SegmentCheck {
    files: Option<SegmentFiles>,
    /// The data objects, on `s3://` (their sizes are in `lens`).
    objects: Option<ObjectFiles>,
    /// Segment file lengths, by id.
    lens: BTreeMap<u64, u64>,
    /// Live window bytes found, by segment.
    live: BTreeMap<u64, u64>,
    /// Page-aligned byte ranges windows touch, by segment.
    touched: BTreeMap<u64, Vec<Range<u64>>>,
}

/// One past the last nonzero byte of `bytes`, if any.
fn nonzero_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().rposition(|&b| b != 0).map(|i| i + 1)
}

impl SegmentCheck {
    /// Start with the segment files of the volume, if it has any; a
    /// directory that cannot be listed is a problem, not the end.
    pub(super) fn new(
        files: Option<SegmentFiles>,
        objects: Option<ObjectFiles>,
        problems: &mut Vec<Problem>,
    ) -> SegmentCheck {
        let mut lens = BTreeMap::new();
        if let Some(f) = &files {
            match f.list() {
                Ok(l) => lens.extend(l),
                Err(e) => problems.push(Problem::Unreadable(format!("segment directory: {e}"))),
            }
        }
        if let Some(o) = &objects {
            match o.list().and_then(|mut l| {
                // Inherited from snapshots' sources: read, not accounted.
                l.extend(o.list_inherited()?);
                Ok(l)
            }) {
                Ok(l) => lens.extend(l),
                Err(e) => problems.push(Problem::Unreadable(format!("data objects: {e}"))),
            }
        }
        SegmentCheck {
            files,
            objects,
            lens,
            live: BTreeMap::new(),
            touched: BTreeMap::new(),
        }
    }

    /// Check the extents of chunk `index` of `ino`; one past the chunk
    /// offset of its last nonzero byte (0 if it holds only zeros).
    pub(super) fn chunk(
        &mut self,
        ino: u64,
        index: u64,
        extents: &[Extent],
        problems: &mut Vec<Problem>,
    ) -> u64 {
        let mut nonzero = 0u64;
        for e in extents {
            let end = match &e.data {
                ExtentData::Inline(b) => nonzero_end(b),
                ExtentData::Segment(_) => self.segment_extent(ino, index, e, problems),
            };
            if let Some(end) = end {
                nonzero = nonzero.max(u64::from(e.start) + end as u64);
            }
        }
        nonzero
    }

    /// One segment extent: bounds, checksums, live bytes; one past the
    /// window offset of its last nonzero byte.
    fn segment_extent(
        &mut self,
        ino: u64,
        index: u64,
        e: &Extent,
        problems: &mut Vec<Problem>,
    ) -> Option<usize> {
        let ExtentData::Segment(p) = &e.data else {
            return None;
        };
        let (seg, window) = e.seg_window()?;
        *self.live.entry(seg).or_insert(0) += window.end - window.start;
        let pages = p.pages();
        let first_touched = window.start / SEGMENT_PAGE;
        let last_touched = (window.end - 1) / SEGMENT_PAGE + 1;
        self.touched
            .entry(seg)
            .or_default()
            .push(first_touched * SEGMENT_PAGE..last_touched * SEGMENT_PAGE);
        let has_files = self.files.is_some() || self.objects.is_some();
        let (true, Some(&seg_len)) = (has_files, self.lens.get(&seg)) else {
            problems.push(Problem::MissingSegment { ino, index, seg });
            return None;
        };
        let piece_end = p.seg_off + u64::from(p.len);
        if piece_end > seg_len {
            problems.push(Problem::ExtentPastSegment {
                ino,
                index,
                seg,
                end: piece_end,
                seg_len,
            });
            return None;
        }
        // The piece's bytes in every page the window touches.
        let from = (first_touched * SEGMENT_PAGE).max(p.seg_off);
        let to = (last_touched * SEGMENT_PAGE).min(piece_end);
        let mut buf = vec![0u8; (to - from) as usize];
        let read = match (&self.objects, &self.files) {
            (Some(o), _) => o.read_at(seg, from, &mut buf),
            (None, Some(f)) => f.read_at(seg, from, &mut buf),
            (None, None) => Ok(()),
        };
        if let Err(err) = read {
            problems.push(Problem::Unreadable(format!(
                "segment {seg} at offset {from} for block {index} of file {ino}: {err}"
            )));
            return None;
        }
        for page in first_touched..last_touched {
            let s = (page * SEGMENT_PAGE).max(from);
            let t = ((page + 1) * SEGMENT_PAGE).min(to);
            let crc = crate::checksum::crc32c(&buf[(s - from) as usize..(t - from) as usize]);
            let want = p.crcs.get((page - pages.start) as usize).copied();
            if want != Some(crc) {
                problems.push(Problem::ExtentChecksum {
                    ino,
                    index,
                    seg,
                    offset: page * SEGMENT_PAGE,
                });
            }
        }
        let w = &buf[(window.start - from) as usize..(window.end - from) as usize];
        nonzero_end(w)
    }

    /// Compare the segment records with what the extents said, and report
    /// the pages that hold data no extent refers to.
    pub(super) fn finish(
        self,
        records: &BTreeMap<u64, u64>,
        problems: &mut Vec<Problem>,
        warnings: &mut Vec<Warning>,
        shared: &mut Vec<SharedSegment>,
    ) {
        let mut ids: Vec<u64> = records.keys().chain(self.live.keys()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        for seg in ids {
            let counted = records.get(&seg).copied().unwrap_or(0);
            let found = self.live.get(&seg).copied().unwrap_or(0);
            if counted != found {
                problems.push(Problem::SegmentLive {
                    seg,
                    counted,
                    found,
                });
            }
        }
        if let Some(objects) = &self.objects {
            self.finish_objects(objects, records, problems, warnings, shared);
        }
        let Some(files) = &self.files else { return };
        // Pages a live migration's hand-over left to the next open to
        // punch are not leaked (`store/engine/reclaim.rs`); a list that is
        // not ours counts for nothing, as the next open treats it.
        let (handed, emptied) = files.handed().unwrap_or_default();
        for &seg in self.lens.keys() {
            if emptied.contains(&seg) {
                continue;
            }
            let allocated = match files.allocated(seg) {
                Ok(a) => a,
                Err(e) => {
                    problems.push(Problem::Unreadable(format!("segment {seg}: {e}")));
                    continue;
                }
            };
            let mut touched = self.touched.get(&seg).cloned().unwrap_or_default();
            touched.extend(handed.get(&seg).into_iter().flatten().cloned());
            touched.sort_unstable_by_key(|r| r.start);
            let bytes = uncovered(&allocated, &touched);
            let links = match files.links(seg) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(Problem::Unreadable(format!("segment {seg}: {e}")));
                    continue;
                }
            };
            if links > 1 {
                shared.push(SharedSegment {
                    seg,
                    links,
                    unreferenced_bytes: bytes,
                });
            } else if bytes > 0 {
                warnings.push(Warning::LeakedSpace { seg, bytes });
            }
        }
    }
}

impl SegmentCheck {
    /// The data objects' accounting across the volume's snapshots and
    /// clones (`lineage.rs`): every object a complete holder names is
    /// here; one that only holders name is kept for them (a note); one
    /// that no one names is leaked.
    fn finish_objects(
        &self,
        objects: &ObjectFiles,
        records: &BTreeMap<u64, u64>,
        problems: &mut Vec<Problem>,
        warnings: &mut Vec<Warning>,
        shared: &mut Vec<SharedSegment>,
    ) {
        let held = objects.held().unwrap_or_else(|e| {
            problems.push(Problem::Unreadable(format!(
                "the holders of the data objects: {e}"
            )));
            Vec::new()
        });
        let own_from = objects.own_from();
        for (r, ids) in &held {
            let Some(ids) = ids else {
                warnings.push(Warning::IncompleteHolder {
                    holder: r.holder.clone(),
                    bound: r.bound,
                });
                continue;
            };
            for &id in ids.range(own_from..) {
                if !self.lens.contains_key(&id) {
                    problems.push(Problem::HeldObjectMissing {
                        holder: r.holder.clone(),
                        id,
                    });
                }
            }
        }
        for (&id, &bytes) in self.lens.range(own_from..) {
            let mine = records.contains_key(&id) || self.live.contains_key(&id);
            let keepers = held
                .iter()
                .filter(|(r, ids)| id < r.bound && ids.as_ref().is_none_or(|s| s.contains(&id)))
                .count() as u64;
            if keepers > 0 {
                shared.push(SharedSegment {
                    seg: id,
                    links: keepers + u64::from(mine),
                    unreferenced_bytes: if mine { 0 } else { bytes },
                });
            } else if !mine {
                warnings.push(Warning::LeakedObject { id, bytes });
            }
        }
    }
}

/// How many bytes of `allocated` no range of `touched` (sorted by start)
/// covers.
fn uncovered(allocated: &[Range<u64>], touched: &[Range<u64>]) -> u64 {
    let mut total = 0;
    for a in allocated {
        let mut pos = a.start;
        for t in touched {
            if t.end <= pos || t.start >= a.end {
                continue;
            }
            if t.start > pos {
                total += t.start - pos;
            }
            pos = pos.max(t.end);
            if pos >= a.end {
                break;
            }
        }
        if pos < a.end {
            total += a.end - pos;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::uncovered;

    #[test]
    fn uncovered_counts_the_gaps() {
        let all = [0..100u64, 100..100];
        assert_eq!(uncovered(&all, &[]), 100);
        assert_eq!(uncovered(&all, &[10..20, 15..30, 90..200]), 10 + 60);
        let head = [0..25u64, 25..25];
        assert_eq!(uncovered(&[0..10, 20..30], &head), 5);
    }
}
