//! Read plans: where the bytes of a file range are, so the filesystem layer
//! can serve a READ with `preadv` from segment files straight into the
//! guest's buffers (`ZeroCopyWriter::write_from`) instead of copying
//! through a buffer of ours.
//!
//! A [`ReadPlan`] lists [`ReadPiece`]s in file order: zeros (holes), bytes
//! already in memory (inline extents, and the windows of `s3://` data
//! objects, fetched with parallel ranged GETs), or a range of an
//! open segment file. Neighbouring pieces of one file are merged, so a
//! sequentially written range is one piece. No page a plan names is punched
//! while the plan (or a piece made from it) lives: the read entered an
//! epoch of the reclaimer's grace periods before its lookups (`pins.rs`).
//!
//! This module only reads; it never copies file data.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;

use super::extent::{self, DataView};
use super::pins::Entered;
use super::SlateStore;
use crate::store::{StoreError, BLOCK_SIZE};

/// One run of a read plan.
#[derive(Clone, Debug)]
pub enum ReadPiece {
    /// `n` zero bytes (a hole, or past what was written).
    Zeros(usize),
    /// Bytes in memory.
    Bytes(Bytes),
    /// `len` bytes of `file` from `offset`.
    File {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
}

impl ReadPiece {
    pub fn len(&self) -> usize {
        match self {
            ReadPiece::Zeros(n) => *n,
            ReadPiece::Bytes(b) => b.len(),
            ReadPiece::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the bytes of one file range are; see the module documentation.
pub struct ReadPlan {
    pub pieces: Vec<ReadPiece>,
    /// The read's place in the reclaimer's grace periods (`pins.rs`).
    pub(super) entered: Entered,
}

/// Append `p` to `out`, merging it into the last piece when they continue
/// each other.
fn push(out: &mut Vec<ReadPiece>, p: ReadPiece) {
    if p.is_empty() {
        return;
    }
    match (out.last_mut(), &p) {
        (Some(ReadPiece::Zeros(n)), ReadPiece::Zeros(m)) => *n += m,
        (
            Some(ReadPiece::File { file, offset, len }),
            ReadPiece::File {
                file: f2,
                offset: o2,
                len: l2,
            },
        ) if Arc::ptr_eq(file, f2) && *offset + *len as u64 == *o2 => *len += l2,
        _ => out.push(p),
    }
}

/// The part of one chunk a range covers: chunk `index`, bytes `from..to`.
struct Span {
    index: u64,
    from: u32,
    to: u32,
}

/// The chunk spans of `len` bytes from `offset`, in file order, and how
/// many bytes lie past the largest offset (read as zeros).
fn spans(offset: u64, len: usize) -> (Vec<Span>, usize) {
    let mut out = Vec::with_capacity(len.div_ceil(BLOCK_SIZE as usize) + 1);
    let mut pos = offset;
    let mut done = 0usize;
    while done < len {
        let from = (pos % BLOCK_SIZE) as u32;
        let n = (len - done).min(BLOCK_SIZE as usize - from as usize);
        out.push(Span {
            index: pos / BLOCK_SIZE,
            from,
            to: from + n as u32,
        });
        done += n;
        pos = match pos.checked_add(n as u64) {
            Some(p) => p,
            None => return (out, len - done),
        };
    }
    (out, 0)
}

/// Object windows a plan still has to fetch (`s3://`), each with its slot
/// in the plan's pieces.
type Fetches = Vec<(usize, extent::Piece, std::ops::Range<u32>)>;

impl SlateStore {
    /// The plan for reading `len` bytes of `ino` from `offset`; the pieces'
    /// lengths add up to `len`. The pages it names stay unpunched while it
    /// (or its `entered`) lives: drop it once read.
    ///
    /// When every chunk record of the range is in the record cache and the
    /// volume keeps its data in segment files, the plan is made on the
    /// caller's thread, without a trip through the engine's runtime.
    pub fn read_plan(&self, ino: u64, offset: u64, len: usize) -> Result<ReadPlan, StoreError> {
        let entered = self.readers.enter();
        let (spans, tail) = spans(offset, len);
        if self.objects.is_none() {
            let cached: Option<Vec<Option<Bytes>>> = spans
                .iter()
                .map(|s| self.known_record(ino, s.index))
                .collect();
            if let Some(records) = cached {
                let (pieces, _) = self.layout(ino, &spans, tail, &records)?;
                return Ok(ReadPlan { pieces, entered });
            }
        }
        let pieces = self.bounded_read(self.plan_inner(ino, offset, len))?;
        Ok(ReadPlan { pieces, entered })
    }

    /// Fill `buf` from one plan: every object window of the range is
    /// fetched at once (`s3://`).
    pub(super) async fn read_through_plan(
        &self,
        ino: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        // One plan fetches every object window of the range at once.
        let mut at = 0usize;
        for piece in self.plan_inner(ino, offset, buf.len()).await? {
            let n = piece.len();
            if at + n > buf.len() {
                return Err(StoreError::Corrupt("read plan longer than the read".into()));
            }
            match piece {
                ReadPiece::Bytes(b) => buf[at..at + n].copy_from_slice(&b),
                ReadPiece::Zeros(_) => buf[at..at + n].fill(0),
                ReadPiece::File { .. } => {
                    return Err(StoreError::Corrupt("segment extent on s3://".into()))
                }
            }
            at += n;
        }
        Ok(())
    }

    pub(super) async fn plan_inner(
        &self,
        ino: u64,
        offset: u64,
        len: usize,
    ) -> Result<Vec<ReadPiece>, StoreError> {
        let (spans, tail) = spans(offset, len);
        let mut records = Vec::with_capacity(spans.len());
        for s in &spans {
            records.push(self.chunk_record(ino, s.index).await?);
        }
        let (mut out, fetch) = self.layout(ino, &spans, tail, &records)?;
        if let (Some(objects), false) = (&self.objects, fetch.is_empty()) {
            let (slots, windows): (Vec<usize>, Vec<_>) =
                fetch.into_iter().map(|(slot, p, r)| (slot, (p, r))).unzip();
            for (slot, bytes) in slots.into_iter().zip(objects.read_many(&windows).await?) {
                out[slot] = ReadPiece::Bytes(bytes);
            }
        }
        Ok(out)
    }

    /// Lay out the pieces of `spans` from their chunk records (one per
    /// span), `tail` zero bytes after them. Object windows are left as
    /// empty placeholders and returned for the caller to fetch.
    fn layout(
        &self,
        ino: u64,
        spans: &[Span],
        tail: usize,
        records: &[Option<Bytes>],
    ) -> Result<(Vec<ReadPiece>, Fetches), StoreError> {
        let mut out = Vec::new();
        let mut fetch = Fetches::new();
        for (span, record) in spans.iter().zip(records) {
            let (index, from, to) = (span.index, span.from, span.to);
            let in_chunk = |e| match e {
                StoreError::Corrupt(m) => {
                    StoreError::Corrupt(format!("block {index} of inode {ino}: {m}"))
                }
                other => other,
            };
            // Read in place: a read needs no checksum lists.
            let views = match record {
                Some(v) => Some(extent::views(v).map_err(in_chunk)?),
                None => None,
            };
            let mut at = from;
            for e in views.into_iter().flatten() {
                let e = e.map_err(in_chunk)?;
                let (s, t) = (e.start.max(at), e.end().min(to));
                if s >= t {
                    continue;
                }
                push(&mut out, ReadPiece::Zeros((s - at) as usize));
                match &e.data {
                    DataView::Inline(b) => push(
                        &mut out,
                        ReadPiece::Bytes(b.slice((s - e.start) as usize..(t - e.start) as usize)),
                    ),
                    DataView::Segment(p) if self.objects.is_some() => {
                        // A placeholder; the caller fetches them all together.
                        fetch.push((out.len(), p.to_piece(), s..t));
                        out.push(ReadPiece::Bytes(Bytes::new()));
                    }
                    DataView::Segment(p) => {
                        let segs = self.segments.as_ref().ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "extent in segment {} on a volume without segments",
                                p.seg
                            ))
                        })?;
                        let file = segs.handle(p.seg).map_err(StoreError::Io)?;
                        push(
                            &mut out,
                            ReadPiece::File {
                                file,
                                offset: p.seg_at(s),
                                len: (t - s) as usize,
                            },
                        );
                    }
                }
                at = t;
            }
            push(&mut out, ReadPiece::Zeros((to - at) as usize));
        }
        push(&mut out, ReadPiece::Zeros(tail));
        Ok((out, fetch))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::super::conformance::{commit, read, temp_volume, write_op};
    use super::super::record_cache::Slot;
    use super::super::{Placement, SlateStore};
    use super::ReadPiece;
    use crate::store::Op;

    /// The bytes a plan names, read the way the filesystem layer would.
    fn materialize(pieces: &[ReadPiece]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            match p {
                ReadPiece::Zeros(n) => out.resize(out.len() + n, 0),
                ReadPiece::Bytes(b) => out.extend_from_slice(b),
                ReadPiece::File { file, offset, len } => {
                    let mut buf = vec![0u8; *len];
                    file.read_exact_at(&mut buf, *offset).unwrap();
                    out.extend_from_slice(&buf);
                }
            }
        }
        out
    }

    fn plans_match_reads(s: &SlateStore) {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8 + 1).collect();
        commit(
            s,
            vec![
                write_op(7, 1000, &big),
                write_op(7, 70_000, b"patch"),
                Op::PunchHole {
                    ino: 7,
                    offset: 150_000,
                    len: 9_000,
                },
                write_op(7, 500_000, b"far"),
            ],
        );
        for (off, len) in [(0, 600_000), (999, 3), (65_530, 20), (140_000, 30_000)] {
            let expected = read(s, 7, off, len);
            let plan = s.read_plan(7, off, len).unwrap();
            assert_eq!(plan.pieces.iter().map(ReadPiece::len).sum::<usize>(), len);
            assert_eq!(materialize(&plan.pieces), expected, "at {off}+{len}");
        }
    }

    #[test]
    fn a_plan_names_the_bytes_a_read_returns() {
        let dir = tempfile::tempdir().unwrap();
        let s = temp_volume(&dir, "");
        plans_match_reads(&s);
        // A sequential write is one file piece, however many chunks.
        let plan = s.read_plan(7, 1000, 68_000).unwrap();
        assert!(
            matches!(plan.pieces[..], [ReadPiece::File { len: 68_000, .. }]),
            "{:?}",
            plan.pieces
        );
        // Reopened, the cache knows no record: the plan goes through the
        // engine's runtime and must name the same bytes.
        drop(plan);
        s.close().unwrap();
        drop(s);
        let s = temp_volume(&dir, "");
        assert_eq!(
            s.records.get(Slot::chunk(7, 0)),
            None,
            "a reopened volume's cache is cold"
        );
        let cold = materialize(&s.read_plan(7, 0, 600_000).unwrap().pieces);
        assert!(
            s.records.get(Slot::chunk(7, 0)).is_some(),
            "the plan fills the cache"
        );
        let warm = materialize(&s.read_plan(7, 0, 600_000).unwrap().pieces);
        assert_eq!(cold, warm);
        assert_eq!(cold, read(&s, 7, 0, 600_000));
        let dir = tempfile::tempdir().unwrap();
        plans_match_reads(&SlateStore::open_for_test(
            &format!("file://{}/vol", dir.path().display()),
            Placement::Inline,
        ));
    }
}
