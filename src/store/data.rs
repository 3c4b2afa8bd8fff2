//! File data in flight between the layers, by reference: [`WriteData`],
//! what an [`Op::Write`](super::Op::Write) carries, and [`ReadData`], what
//! a read hands back. Both are lists of shared, reference-counted buffers
//! ([`Bytes`]), so that a page the write-back layer holds reaches a store,
//! a segment file or a socket without being copied into a buffer of the
//! whole write first, and a read reaches the guest from whatever buffers
//! the layers below already hold.
//!
//! Nothing here knows about pages, stores or guests: the filesystem layer
//! reads a guest write into [`PAGE_SIZE`]-aligned parts
//! ([`WriteData::read_aligned`]), which the write-back layer adopts as its
//! page buffers as they are.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

/// The unit file data is split in on its way down: a part of a
/// [`WriteData`] read from the guest covers at most one aligned page of
/// this size, and the write-back layer's pages are this size.
pub const PAGE_SIZE: u64 = 4096;

/// The bytes one write carries: a scatter list of shared buffers, in file
/// order. Cloning it clones references, never bytes. Two are equal when
/// their bytes are, however they are split.
#[derive(Clone, Default)]
pub struct WriteData {
    parts: Vec<Bytes>,
    len: usize,
}

impl WriteData {
    /// No bytes.
    pub fn new() -> WriteData {
        WriteData::default()
    }

    /// The parts, in order; empty parts are left out.
    pub fn from_parts(parts: impl IntoIterator<Item = Bytes>) -> WriteData {
        let mut data = WriteData::new();
        for p in parts {
            data.push(p);
        }
        data
    }

    /// Append `part` (by reference).
    pub fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// Read `len` bytes from `src` (a guest's buffers) for a write at file
    /// offset `offset`, into parts that each cover at most one
    /// [`PAGE_SIZE`]-aligned page of the file: every whole page the write
    /// covers becomes one buffer of its own, which the write-back layer
    /// keeps as its page (in a recycled buffer, `super::pages`). Each byte
    /// is copied once, from `src` into its part; no buffer is larger than a
    /// page.
    pub fn read_aligned(src: &mut dyn io::Read, len: usize, offset: u64) -> io::Result<WriteData> {
        let mut data = WriteData {
            parts: Vec::with_capacity(len.div_ceil(PAGE_SIZE as usize) + 1),
            len: 0,
        };
        let page = PAGE_SIZE as usize;
        // Up to the first page boundary, the whole pages, what is left.
        let head = ((page - (offset % PAGE_SIZE) as usize) % page).min(len);
        let whole = (len - head) / page;
        let tail = len - head - whole * page;
        data.read_partial(src, head)?;
        for p in super::pages::read_pages(src, whole)? {
            data.push(p);
        }
        data.read_partial(src, tail)?;
        Ok(data)
    }

    /// Read `n` bytes of part of a page from `src` into a part of their
    /// own (none for 0).
    fn read_partial(&mut self, src: &mut dyn io::Read, n: usize) -> io::Result<()> {
        if n > 0 {
            let mut buf = vec![0u8; n];
            src.read_exact(&mut buf)?;
            self.push(Bytes::from(buf));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The shared buffers, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The bytes, part by part.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(|p| &p[..])
    }

    /// The parts as an I/O vector, for `pwritev` and `write_vectored`.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.parts.iter().map(|p| IoSlice::new(p)).collect()
    }

    /// The bytes in one buffer: borrowed when there is one part, else
    /// copied. For code that needs a contiguous view; the data path uses
    /// the parts.
    pub fn contiguous(&self) -> Cow<'_, [u8]> {
        match &self.parts[..] {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(&one[..]),
            _ => Cow::Owned(self.to_vec()),
        }
    }

    /// The bytes in a new vector (tests, and stores that keep copies).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for s in self.slices() {
            out.extend_from_slice(s);
        }
        out
    }

    /// Keep the first `len` bytes (by reference).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let mut kept = 0;
        let mut keep_parts = 0;
        for p in &mut self.parts {
            if kept == len {
                break;
            }
            let n = p.len().min(len - kept);
            p.truncate(n);
            kept += n;
            keep_parts += 1;
        }
        self.parts.truncate(keep_parts);
        self.len = len;
    }

    /// Each part with the offset of its first byte within the data.
    pub fn parts_at(&self) -> impl Iterator<Item = (usize, &Bytes)> {
        self.parts.iter().scan(0usize, |at, p| {
            let here = *at;
            *at += p.len();
            Some((here, p))
        })
    }
}

impl From<Vec<u8>> for WriteData {
    fn from(v: Vec<u8>) -> WriteData {
        WriteData::from_parts([Bytes::from(v)])
    }
}

impl From<&[u8]> for WriteData {
    fn from(v: &[u8]) -> WriteData {
        WriteData::from(v.to_vec())
    }
}

impl From<Bytes> for WriteData {
    fn from(b: Bytes) -> WriteData {
        WriteData::from_parts([b])
    }
}

impl PartialEq for WriteData {
    fn eq(&self, other: &WriteData) -> bool {
        if self.len != other.len {
            return false;
        }
        let (mut a, mut b) = (self.slices(), other.slices());
        let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
        loop {
            if x.is_empty() {
                x = a.next().unwrap_or_default();
            }
            if y.is_empty() {
                y = b.next().unwrap_or_default();
            }
            if x.is_empty() || y.is_empty() {
                return x.is_empty() && y.is_empty();
            }
            let n = x.len().min(y.len());
            if x[..n] != y[..n] {
                return false;
            }
            x = &x[n..];
            y = &y[n..];
        }
    }
}

impl Eq for WriteData {}

impl fmt::Debug for WriteData {
    // A log line must not carry a megabyte of file contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteData")
            .field("len", &self.len)
            .field("parts", &self.parts.len())
            .finish()
    }
}

/// Keeps what a [`ReadPiece::File`] names readable while the piece lives:
/// a store that reclaims file ranges (punches segment pages no extent
/// refers to any more) punches a range only once every pin handed out
/// before the range died is dropped, so a read planned before an
/// overwrite's commit still finds the old bytes. Opaque; dropping the last
/// clone lets reclamation proceed.
#[derive(Clone)]
pub struct ReadPin(#[allow(dead_code)] Arc<dyn Send + Sync>);

impl ReadPin {
    pub fn new(hold: Arc<dyn Send + Sync>) -> ReadPin {
        ReadPin(hold)
    }
}

/// One piece of a read's answer.
#[derive(Clone)]
pub enum ReadPiece {
    /// This many zero bytes (a hole, or past the stored blocks).
    Zeros(usize),
    /// Bytes a layer holds (a cached page, a store's buffer), shared.
    Bytes(Bytes),
    /// `len` bytes of an open file (a segment) from `offset`: the
    /// filesystem layer reads them with `preadv` straight into the guest's
    /// buffers; the host page cache keeps hot ranges. `pin` keeps the range
    /// from being reclaimed while the piece lives.
    File {
        file: Arc<File>,
        offset: u64,
        len: usize,
        pin: ReadPin,
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

impl ReadPiece {
    /// Write the piece's bytes to `out`: zeros from a static page, a file
    /// range through a page-sized buffer (the filesystem layer hands file
    /// ranges to the guest with `write_from` instead, copying nothing).
    pub fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()> {
        match self {
            ReadPiece::Bytes(b) => out.write_all(b),
            ReadPiece::File {
                file, offset, len, ..
            } => {
                let mut buf = [0u8; PAGE_SIZE as usize];
                let mut done = 0;
                while done < *len {
                    let k = (*len - done).min(buf.len());
                    file.read_exact_at(&mut buf[..k], offset + done as u64)?;
                    out.write_all(&buf[..k])?;
                    done += k;
                }
                Ok(())
            }
            ReadPiece::Zeros(n) => {
                let mut left = *n;
                while left > 0 {
                    let k = left.min(ZEROS.len());
                    out.write_all(&ZEROS[..k])?;
                    left -= k;
                }
                Ok(())
            }
        }
    }
}

impl PartialEq for ReadPiece {
    // File pieces are equal when they name the same range of the same open
    // file; compare bytes with `ReadData::to_vec`.
    fn eq(&self, other: &ReadPiece) -> bool {
        match (self, other) {
            (ReadPiece::Zeros(a), ReadPiece::Zeros(b)) => a == b,
            (ReadPiece::Bytes(a), ReadPiece::Bytes(b)) => a == b,
            (
                ReadPiece::File {
                    file, offset, len, ..
                },
                ReadPiece::File {
                    file: f2,
                    offset: o2,
                    len: l2,
                    ..
                },
            ) => Arc::ptr_eq(file, f2) && offset == o2 && len == l2,
            _ => false,
        }
    }
}

impl Eq for ReadPiece {}

impl fmt::Debug for ReadPiece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadPiece::Zeros(n) => write!(f, "Zeros({n})"),
            ReadPiece::Bytes(b) => write!(f, "Bytes({})", b.len()),
            ReadPiece::File { offset, len, .. } => write!(f, "File({offset}+{len})"),
        }
    }
}

/// What a read hands back: pieces in file order, which the filesystem
/// layer writes to the guest one by one (one copy each, none for the
/// layers between).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadData {
    pieces: Vec<ReadPiece>,
    len: usize,
}

/// A page of zeros to write holes from without allocating.
static ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

impl ReadData {
    pub fn new() -> ReadData {
        ReadData::default()
    }

    /// Append `piece`, merging runs of zeros.
    pub fn push(&mut self, piece: ReadPiece) {
        if piece.is_empty() {
            return;
        }
        self.len += piece.len();
        if let (Some(ReadPiece::Zeros(z)), ReadPiece::Zeros(n)) = (self.pieces.last_mut(), &piece) {
            *z += n;
            return;
        }
        self.pieces.push(piece);
    }

    /// Append every piece of `other`.
    pub fn extend(&mut self, other: ReadData) {
        for p in other.pieces {
            self.push(p);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> &[ReadPiece] {
        &self.pieces
    }

    /// Write every byte to `out`, zeros from a static page.
    pub fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()> {
        for piece in &self.pieces {
            piece.write_to(out)?;
        }
        Ok(())
    }

    /// The bytes at `from..from + len` (clipped to the end), by reference.
    pub fn slice(&self, from: usize, len: usize) -> ReadData {
        let mut out = ReadData::new();
        let to = from.saturating_add(len);
        let mut at = 0;
        for piece in &self.pieces {
            let end = at + piece.len();
            let (lo, hi) = (from.max(at), to.min(end));
            if lo < hi {
                out.push(match piece {
                    ReadPiece::Zeros(_) => ReadPiece::Zeros(hi - lo),
                    ReadPiece::Bytes(b) => ReadPiece::Bytes(b.slice(lo - at..hi - at)),
                    ReadPiece::File {
                        file, offset, pin, ..
                    } => ReadPiece::File {
                        file: file.clone(),
                        offset: offset + (lo - at) as u64,
                        len: hi - lo,
                        pin: pin.clone(),
                    },
                });
            }
            at = end;
        }
        out
    }

    /// Copy the bytes at `from..from + out.len()` into `out`; bytes past
    /// the end read as zeros. Fails only when a file piece cannot be read.
    pub fn copy_to(&self, from: usize, out: &mut [u8]) -> io::Result<()> {
        // Past the end: zeros. The rest is written piece by piece.
        let past = self.len.saturating_sub(from).min(out.len());
        out[past..].fill(0);
        let mut at = 0;
        for piece in &self.pieces {
            let end = at + piece.len();
            let lo = from.max(at);
            let hi = (from + out.len()).min(end);
            if lo < hi {
                let dst = &mut out[lo - from..hi - from];
                match piece {
                    ReadPiece::Zeros(_) => dst.fill(0),
                    ReadPiece::Bytes(b) => dst.copy_from_slice(&b[lo - at..hi - at]),
                    ReadPiece::File { file, offset, .. } => {
                        file.read_exact_at(dst, offset + (lo - at) as u64)?
                    }
                }
            }
            at = end;
        }
        Ok(())
    }

    /// The page at `from..from + PAGE_SIZE` (zeros past the end), in a
    /// recycled page buffer (`pages.rs`).
    pub fn page(&self, from: usize) -> io::Result<Bytes> {
        super::pages::fill_page(|buf| self.copy_to(from, buf))
    }

    /// Whether any piece is a file range (the bytes are not in memory).
    pub fn has_file_pieces(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, ReadPiece::File { .. }))
    }

    /// The bytes in a new vector (tests, and callers that want a buffer).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        self.copy_to(0, &mut out)?;
        Ok(out)
    }
}

impl From<Vec<u8>> for ReadData {
    fn from(v: Vec<u8>) -> ReadData {
        let mut d = ReadData::new();
        d.push(ReadPiece::Bytes(Bytes::from(v)));
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_from_the_guest_split_at_page_boundaries() {
        let src: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let data = WriteData::read_aligned(&mut &src[..], src.len(), 4000).unwrap();
        let lens: Vec<usize> = data.parts().iter().map(Bytes::len).collect();
        assert_eq!(lens, [96, 4096, 4096, 1712]);
        assert_eq!(data.to_vec(), src);
        assert!(WriteData::read_aligned(&mut &src[..10], 11, 0).is_err());
    }

    #[test]
    fn equality_ignores_how_the_bytes_are_split() {
        let whole = WriteData::from(b"abcdef".to_vec());
        let split = WriteData::from_parts([Bytes::from_static(b"ab"), Bytes::from_static(b"cdef")]);
        assert_eq!(whole, split);
        let other = WriteData::from_parts([Bytes::from_static(b"abc"), Bytes::from_static(b"dex")]);
        assert_ne!(whole, other);
        assert_ne!(whole, WriteData::from(b"abcde".to_vec()));
        let mut t = split.clone();
        t.truncate(3);
        assert_eq!(t.to_vec(), b"abc");
        assert_eq!(t.parts().len(), 2);
        assert_eq!(split.contiguous().as_ref(), b"abcdef");
    }

    #[test]
    fn read_data_merges_zeros_and_copies_ranges() {
        let mut d = ReadData::new();
        d.push(ReadPiece::Bytes(Bytes::from_static(b"ab")));
        d.push(ReadPiece::Zeros(3));
        d.push(ReadPiece::Zeros(2));
        d.push(ReadPiece::Bytes(Bytes::from_static(b"cd")));
        assert_eq!(d.pieces().len(), 3);
        assert_eq!(d.to_vec().unwrap(), b"ab\0\0\0\0\0cd");
        let mut out = [9u8; 4];
        d.copy_to(6, &mut out).unwrap();
        assert_eq!(out, *b"\0cd\0");
        let mut out = [9u8; 4];
        d.copy_to(20, &mut out).unwrap();
        assert_eq!(out, [0; 4], "wholly past the end");
        let page = d.page(0).unwrap();
        assert_eq!(&page[..9], b"ab\0\0\0\0\0cd");
        assert!(page[9..].iter().all(|&b| b == 0));
        let mut w = Vec::new();
        d.write_to(&mut w).unwrap();
        assert_eq!(w, d.to_vec().unwrap());
        assert_eq!(d.slice(1, 7).to_vec().unwrap(), b"b\0\0\0\0\0c");
        assert_eq!(d.slice(8, 100).to_vec().unwrap(), b"d");
    }
}
