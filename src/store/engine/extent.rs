//! Extent maps: where the bytes of one file chunk live.
//!
//! A file is cut into chunks of [`BLOCK_SIZE`] bytes. The record of a chunk
//! that holds data is a list of [`Extent`]s, sorted and disjoint, each a
//! window of chunk offsets whose bytes are either inline in the record
//! (`s3://` volumes, which have no local directory) or a piece of an
//! append-only segment file (`file://`, see `segment.rs`). Bytes of the
//! chunk that no extent covers read as zeros. A newer write trims or splits
//! the extents it overlaps (newest wins); no data is copied.
//!
//! A segment piece keeps the CRC32C of every segment page it touches, each
//! taken over the piece's bytes in that page, as written. Trimming a
//! window cuts its piece to the pages the window still touches, with their
//! checksums, which stay valid because each covers one page's bytes of the
//! piece: a page that still holds a byte of a window is never punched (see
//! `segment_pages_dead`), so every page a window touches can be verified,
//! and a record after random overwrites does not carry the checksums of
//! pages its windows left.
//!
//! Segment offsets are congruent to file offsets modulo [`PAGE`] and every
//! write starts on a fresh segment page, so a segment page belongs to
//! exactly one chunk of one file: comparing a chunk's extents before and
//! after a change tells exactly which segment pages died.
//!
//! This module owns only bytes and arithmetic: it never reads the engine or
//! a segment, and decoding never panics.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;

use crate::store::{StoreError, BLOCK_SIZE};

/// The page size segment space is managed in: placement, checksums and
/// hole punching.
pub const PAGE: u64 = 4096;

/// A chunk whose list grows past this many extents is rewritten as one
/// extent (a bounded copy of at most one chunk, amortized over the writes
/// that fragmented it).
pub const MAX_EXTENTS: usize = 32;

/// The version byte of a chunk record.
const V1: u8 = 1;
const KIND_INLINE: u8 = 1;
const KIND_SEGMENT: u8 = 2;

/// A piece of a segment file, as one write put it there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The segment's id (its file is `segments/<id as 16 hex digits>.seg`).
    pub seg: u64,
    /// The segment offset of the piece's first byte.
    pub seg_off: u64,
    /// The chunk offset of the piece's first byte.
    pub start: u32,
    /// The piece's length as written.
    pub len: u32,
    /// CRC32C of the piece's bytes in each segment page it touches, in
    /// page order.
    pub crcs: Vec<u32>,
}

impl Piece {
    /// The segment offset of chunk offset `x` (which must lie in the piece).
    pub fn seg_at(&self, x: u32) -> u64 {
        self.seg_off + u64::from(x - self.start)
    }

    /// The segment byte range of chunk range `r` (inside the piece).
    pub fn seg_range(&self, r: Range<u32>) -> Range<u64> {
        self.seg_at(r.start)..self.seg_at(r.end)
    }

    /// The segment pages the piece touches.
    pub fn pages(&self) -> Range<u64> {
        pages_of(self.seg_off..self.seg_off + u64::from(self.len))
    }

    /// The part of the piece in the segment pages chunk range `w` (inside
    /// the piece) touches, with those pages' checksums: each still covers
    /// exactly the piece's bytes in its page, so a window kept after an
    /// overwrite carries only the checksums it can be verified with.
    fn trimmed(&self, w: Range<u32>) -> Piece {
        let end = self.seg_off + u64::from(self.len);
        let pages = pages_of(self.seg_range(w));
        let from = (pages.start * PAGE).max(self.seg_off);
        let to = (pages.end * PAGE).min(end);
        let skip = (pages.start - self.pages().start) as usize;
        let n = (pages.end - pages.start) as usize;
        // A piece built with fewer checksums than pages fails its check
        // later, as it would untrimmed; trimming does not panic on it.
        let crcs = self.crcs.get(skip..skip + n).unwrap_or(&[]).to_vec();
        Piece {
            seg: self.seg,
            seg_off: from,
            // Within the piece: both fit the chunk's u32 offsets.
            start: self.start + (from - self.seg_off) as u32,
            len: (to - from) as u32,
            crcs,
        }
    }
}

/// The pages a non-empty byte range touches.
pub fn pages_of(r: Range<u64>) -> Range<u64> {
    if r.is_empty() {
        return r.start / PAGE..r.start / PAGE;
    }
    r.start / PAGE..(r.end - 1) / PAGE + 1
}

/// Where an extent's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// Exactly the window's bytes.
    Inline(Bytes),
    /// A piece of a segment; the window lies inside it.
    Segment(Piece),
}

/// A window of chunk offsets and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The chunk offset of the window's first byte.
    pub start: u32,
    /// The window's length (never 0).
    pub len: u32,
    pub data: Data,
}

impl Extent {
    pub fn end(&self) -> u32 {
        self.start + self.len
    }

    /// The part of this extent inside `r`, if any.
    fn clip(&self, r: Range<u32>) -> Option<Extent> {
        let (s, e) = (self.start.max(r.start), self.end().min(r.end));
        if s >= e {
            return None;
        }
        let data = match &self.data {
            Data::Inline(b) => {
                Data::Inline(b.slice((s - self.start) as usize..(e - self.start) as usize))
            }
            Data::Segment(p) => Data::Segment(p.trimmed(s..e)),
        };
        Some(Extent {
            start: s,
            len: e - s,
            data,
        })
    }

    /// The segment bytes of the window, for segment extents.
    pub fn seg_window(&self) -> Option<(u64, Range<u64>)> {
        match &self.data {
            Data::Segment(p) => Some((p.seg, p.seg_range(self.start..self.end()))),
            Data::Inline(_) => None,
        }
    }
}

/// `list` with `r` cut out: extents inside it go, extents across its edges
/// are trimmed or split.
pub fn remove_range(list: &[Extent], r: Range<u32>) -> Vec<Extent> {
    let mut out = Vec::with_capacity(list.len() + 1);
    for e in list {
        if e.end() <= r.start || e.start >= r.end {
            out.push(e.clone());
            continue;
        }
        out.extend(e.clip(e.start..r.start));
        out.extend(e.clip(r.end..e.end()));
    }
    out
}

/// `list` with `new` laid over it: newest wins. A new segment extent that
/// continues its left neighbour in the file and in the segment, from a
/// page boundary, is merged into it (sequential writes stay one extent).
pub fn insert(list: &[Extent], new: Extent) -> Vec<Extent> {
    let mut out = remove_range(list, new.start..new.end());
    let at = out.partition_point(|e| e.start < new.start);
    if let Some(merged) = at.checked_sub(1).and_then(|left| merge(&out[left], &new)) {
        out[at - 1] = merged;
    } else {
        out.insert(at, new);
    }
    out
}

/// `a` and `b` as one extent, when `b` continues `a` exactly: both whole
/// pieces of one segment, adjacent in the chunk and in the segment, `b`
/// starting on a page (so their per-page checksums simply concatenate).
fn merge(a: &Extent, b: &Extent) -> Option<Extent> {
    let (Data::Segment(p), Data::Segment(q)) = (&a.data, &b.data) else {
        return None;
    };
    let whole = |e: &Extent, p: &Piece| e.start == p.start && e.len == p.len;
    let adjacent = p.seg == q.seg
        && a.end() == b.start
        && p.seg_off + u64::from(p.len) == q.seg_off
        && q.seg_off % PAGE == 0;
    if !(whole(a, p) && whole(b, q) && adjacent) {
        return None;
    }
    let mut crcs = p.crcs.clone();
    crcs.extend_from_slice(&q.crcs);
    Some(Extent {
        start: a.start,
        len: a.len + b.len,
        data: Data::Segment(Piece {
            seg: p.seg,
            seg_off: p.seg_off,
            start: p.start,
            len: p.len + q.len,
            crcs,
        }),
    })
}

/// Live window bytes per segment.
pub fn live_bytes(list: &[Extent]) -> BTreeMap<u64, u64> {
    let mut live = BTreeMap::new();
    for e in list {
        if let Some((seg, r)) = e.seg_window() {
            *live.entry(seg).or_insert(0) += r.end - r.start;
        }
    }
    live
}

/// The segment pages windows of `list` touch, as runs of page numbers:
/// sorted by segment and page, disjoint, adjacent runs merged. Runs, not
/// single pages: comparing a chunk before and after each write is on
/// every commit's path.
fn touched_runs(list: &[Extent]) -> Vec<(u64, Range<u64>)> {
    let mut runs: Vec<(u64, Range<u64>)> = list
        .iter()
        .filter_map(Extent::seg_window)
        .map(|(seg, r)| (seg, pages_of(r)))
        .filter(|(_, pages)| !pages.is_empty())
        .collect();
    runs.sort_unstable_by_key(|(seg, pages)| (*seg, pages.start));
    let mut out: Vec<(u64, Range<u64>)> = Vec::with_capacity(runs.len());
    for (seg, pages) in runs {
        match out.last_mut() {
            Some((s, last)) if *s == seg && pages.start <= last.end => {
                last.end = last.end.max(pages.end);
            }
            _ => out.push((seg, pages)),
        }
    }
    out
}

/// The segment byte ranges (whole pages) that `old` touched and `new` no
/// longer does: nothing references them once `new` is durable. Exact
/// because a segment page belongs to one chunk (see the module docs).
/// Sorted by segment and offset, adjacent ranges merged.
pub fn segment_pages_dead(old: &[Extent], new: &[Extent]) -> Vec<(u64, Range<u64>)> {
    let still = touched_runs(new);
    let mut out: Vec<(u64, Range<u64>)> = Vec::new();
    let mut dead = |seg: u64, pages: Range<u64>| {
        let r = pages.start * PAGE..pages.end * PAGE;
        match out.last_mut() {
            Some((s, last)) if *s == seg && last.end == r.start => last.end = r.end,
            _ => out.push((seg, r)),
        }
    };
    // Runs of `still` wholly before the current old run are behind us.
    let mut first = 0;
    for (seg, mut pages) in touched_runs(old) {
        while still
            .get(first)
            .is_some_and(|(s, r)| (*s, r.end) <= (seg, pages.start))
        {
            first += 1;
        }
        for (s, r) in &still[first..] {
            if *s != seg || r.start >= pages.end {
                break;
            }
            if r.start > pages.start {
                dead(seg, pages.start..r.start);
            }
            pages.start = pages.start.max(r.end);
        }
        if pages.start < pages.end {
            dead(seg, pages);
        }
    }
    out
}

/// One past the last byte an extent covers (0 for an empty list).
pub fn covered_end(list: &[Extent]) -> u32 {
    list.last().map_or(0, Extent::end)
}

fn corrupt(m: impl Into<String>) -> StoreError {
    StoreError::Corrupt(format!("chunk record: {}", m.into()))
}

pub fn encode(list: &[Extent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + list.len() * 48);
    v.push(V1);
    v.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for e in list {
        v.extend_from_slice(&e.start.to_le_bytes());
        v.extend_from_slice(&e.len.to_le_bytes());
        match &e.data {
            Data::Inline(b) => {
                v.push(KIND_INLINE);
                v.extend_from_slice(b);
            }
            Data::Segment(p) => {
                v.push(KIND_SEGMENT);
                v.extend_from_slice(&p.seg.to_le_bytes());
                v.extend_from_slice(&p.seg_off.to_le_bytes());
                v.extend_from_slice(&p.start.to_le_bytes());
                v.extend_from_slice(&p.len.to_le_bytes());
                for c in &p.crcs {
                    v.extend_from_slice(&c.to_le_bytes());
                }
            }
        }
    }
    v
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt("truncated"));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decode a chunk record, checking every invariant the code relies on:
/// windows inside the chunk and inside their pieces, sorted, disjoint,
/// non-empty, one checksum per page.
pub fn decode(bytes: &Bytes) -> Result<Vec<Extent>, StoreError> {
    let views = views(bytes)?;
    let mut out = Vec::with_capacity(views.left);
    for v in views {
        out.push(v?.to_extent());
    }
    Ok(out)
}

/// A segment piece as its record holds it: the checksums still encoded.
#[derive(Clone, Copy, Debug)]
pub struct PieceView<'a> {
    pub seg: u64,
    pub seg_off: u64,
    pub start: u32,
    pub len: u32,
    /// Little-endian CRC32Cs, one per page the piece touches.
    crcs: &'a [u8],
}

impl PieceView<'_> {
    /// As [`Piece::seg_at`].
    pub fn seg_at(&self, x: u32) -> u64 {
        self.seg_off + u64::from(x - self.start)
    }

    pub fn to_piece(self) -> Piece {
        let crcs = self.crcs.chunks_exact(4);
        Piece {
            seg: self.seg,
            seg_off: self.seg_off,
            start: self.start,
            len: self.len,
            crcs: crcs
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
}

/// Where a [`View`]'s bytes are.
#[derive(Clone, Debug)]
pub enum DataView<'a> {
    Inline(Bytes),
    Segment(PieceView<'a>),
}

/// One extent of a record, read in place: what a read plan needs, without
/// the allocations of [`decode`]'s checksum lists.
#[derive(Clone, Debug)]
pub struct View<'a> {
    pub start: u32,
    pub len: u32,
    pub data: DataView<'a>,
}

impl View<'_> {
    pub fn end(&self) -> u32 {
        self.start + self.len
    }

    pub fn to_extent(&self) -> Extent {
        Extent {
            start: self.start,
            len: self.len,
            data: match &self.data {
                DataView::Inline(b) => Data::Inline(b.clone()),
                DataView::Segment(p) => Data::Segment(p.to_piece()),
            },
        }
    }
}

/// The extents of a chunk record in order, each checked as [`decode`]
/// checks it; an error ends the iteration, and bytes after the last
/// extent are one.
pub struct Views<'a> {
    bytes: &'a Bytes,
    c: Cursor<'a>,
    /// Extents still to come.
    left: usize,
    /// The end of the last window.
    prev_end: u32,
    /// An error was returned, or the trailing bytes checked.
    done: bool,
}

/// Read `bytes`' header; its extents follow from the iterator.
pub fn views(bytes: &Bytes) -> Result<Views<'_>, StoreError> {
    let mut c = Cursor(bytes);
    let version = c.take(1)?[0];
    if version != V1 {
        return Err(corrupt(format!("unknown version {version}")));
    }
    let n = c.u32()? as usize;
    // Every extent takes at least 9 bytes: a count beyond that is garbage.
    if n > bytes.len() / 9 {
        return Err(corrupt(format!("claims {n} extents")));
    }
    Ok(Views {
        bytes,
        c,
        left: n,
        prev_end: 0,
        done: false,
    })
}

impl<'a> Views<'a> {
    fn extent(&mut self) -> Result<View<'a>, StoreError> {
        let c = &mut self.c;
        let start = c.u32()?;
        let len = c.u32()?;
        let end = start
            .checked_add(len)
            .filter(|e| u64::from(*e) <= BLOCK_SIZE);
        if len == 0 || end.is_none() {
            return Err(corrupt(format!("window {start}+{len} outside the chunk")));
        }
        if self.prev_end > start {
            return Err(corrupt("windows overlap or are out of order"));
        }
        let data = match c.take(1)?[0] {
            KIND_INLINE => {
                let at = self.bytes.len() - c.0.len();
                c.take(len as usize)?;
                DataView::Inline(self.bytes.slice(at..at + len as usize))
            }
            KIND_SEGMENT => {
                let (seg, seg_off) = (c.u64()?, c.u64()?);
                let (pstart, plen) = (c.u32()?, c.u32()?);
                let inside = start >= pstart
                    && pstart
                        .checked_add(plen)
                        .is_some_and(|pe| start + len <= pe && u64::from(pe) <= BLOCK_SIZE);
                if !inside {
                    return Err(corrupt(format!("window {start}+{len} outside its piece")));
                }
                // The code works in whole segment pages: the piece's last
                // page must end within u64.
                let pages = seg_off
                    .checked_add(u64::from(plen))
                    .map(|end| pages_of(seg_off..end))
                    .filter(|p| p.end.checked_mul(PAGE).is_some())
                    .ok_or_else(|| corrupt(format!("piece at segment offset {seg_off} too far")))?;
                // At most a chunk's pages (`inside`): no overflow.
                let crcs = c.take(4 * (pages.end - pages.start) as usize)?;
                DataView::Segment(PieceView {
                    seg,
                    seg_off,
                    start: pstart,
                    len: plen,
                    crcs,
                })
            }
            k => return Err(corrupt(format!("unknown extent kind {k}"))),
        };
        self.prev_end = start + len;
        Ok(View { start, len, data })
    }
}

impl<'a> Iterator for Views<'a> {
    type Item = Result<View<'a>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.left == 0 {
            self.done = true;
            return (!self.c.0.is_empty())
                .then(|| Err(corrupt(format!("{} trailing bytes", self.c.0.len()))));
        }
        self.left -= 1;
        let got = self.extent();
        self.done = got.is_err();
        Some(got)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            (0, Some(self.left + 1))
        }
    }
}

/// The checksums of a piece about to be written at segment offset
/// `seg_off`: one per segment page it touches, over the piece's bytes (the
/// concatenation of `parts`) in that page.
pub fn page_crcs(seg_off: u64, parts: &[&[u8]]) -> Vec<u32> {
    let mut crcs = Vec::new();
    let mut crc = 0u32;
    // Bytes still to go into the current page.
    let mut room = (PAGE - seg_off % PAGE) as usize;
    let mut fresh = true;
    for part in parts {
        let mut rest: &[u8] = part;
        while !rest.is_empty() {
            let n = room.min(rest.len());
            crc = crate::checksum::crc32c_append(crc, &rest[..n]);
            fresh = false;
            rest = &rest[n..];
            room -= n;
            if room == 0 {
                crcs.push(crc);
                crc = 0;
                room = PAGE as usize;
                fresh = true;
            }
        }
    }
    if !fresh {
        crcs.push(crc);
    }
    crcs
}

#[cfg(test)]
#[path = "extent_tests.rs"]
mod tests;
