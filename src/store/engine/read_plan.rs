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

use super::extent::{self, Data};
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

impl SlateStore {
    /// The plan for reading `len` bytes of `ino` from `offset`; the pieces'
    /// lengths add up to `len`. The pages it names stay unpunched while it
    /// (or its `entered`) lives: drop it once read.
    pub fn read_plan(&self, ino: u64, offset: u64, len: usize) -> Result<ReadPlan, StoreError> {
        let entered = self.readers.enter();
        let pieces = self.rt()?.block_on(self.plan_inner(ino, offset, len))?;
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
        let mut out = Vec::new();
        // Object windows to fetch, and the place of each in `out`.
        let mut fetch: Vec<(extent::Piece, std::ops::Range<u32>)> = Vec::new();
        let mut slots = Vec::new();
        let mut pos = offset;
        let mut done = 0usize;
        while done < len {
            let index = pos / BLOCK_SIZE;
            let from = (pos % BLOCK_SIZE) as u32;
            let n = (len - done).min(BLOCK_SIZE as usize - from as usize);
            let to = from + n as u32;
            let list = match self.chunk_record(ino, index).await? {
                Some(v) => extent::decode(&v).map_err(|e| match e {
                    StoreError::Corrupt(m) => {
                        StoreError::Corrupt(format!("block {index} of inode {ino}: {m}"))
                    }
                    other => other,
                })?,
                None => Vec::new(),
            };
            let mut at = from;
            for e in &list {
                let (s, t) = (e.start.max(at), e.end().min(to));
                if s >= t {
                    continue;
                }
                push(&mut out, ReadPiece::Zeros((s - at) as usize));
                match &e.data {
                    Data::Inline(b) => push(
                        &mut out,
                        ReadPiece::Bytes(b.slice((s - e.start) as usize..(t - e.start) as usize)),
                    ),
                    Data::Segment(p) if self.objects.is_some() => {
                        // Filled in below, all fetched together.
                        slots.push(out.len());
                        out.push(ReadPiece::Bytes(Bytes::new()));
                        fetch.push((p.clone(), s..t));
                    }
                    Data::Segment(p) => {
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
            done += n;
            pos = match pos.checked_add(n as u64) {
                Some(p) => p,
                None => {
                    push(&mut out, ReadPiece::Zeros(len - done));
                    break;
                }
            };
        }
        if let (Some(objects), false) = (&self.objects, fetch.is_empty()) {
            for (slot, bytes) in slots.into_iter().zip(objects.read_many(&fetch).await?) {
                out[slot] = ReadPiece::Bytes(bytes);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::super::conformance::{commit, read, temp_volume, write_op};
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
        let dir = tempfile::tempdir().unwrap();
        plans_match_reads(&SlateStore::open_for_test(
            &format!("file://{}/vol", dir.path().display()),
            Placement::Inline,
        ));
    }
}
