//! A guest WRITE's bytes, read out of guest memory in one pass.
//!
//! [`read_write_data`] hands the request's whole scatter list to the
//! filesystem layer at once (`ZeroCopyReader::read_to`) and copies it into
//! page-aligned parts ([`WriteData::read_aligned`]). Reading page by page
//! through `io::Read` instead made fuse-backend-rs build a list of every
//! remaining guest buffer for each page (a 1 MiB write: 256 lists of up to
//! 256 slices, a large allocation each) and walk its queue of buffers again.
//! Nothing here keeps a reference to guest memory past the call.

use std::io;

use fuse_backend_rs::api::filesystem::ZeroCopyReader;
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;

use crate::store::WriteData;

/// Read `len` bytes of a write at file offset `offset` from `src`, in
/// page-aligned parts. Fewer bytes than `len` in the request is an error
/// (`UnexpectedEof`), and then nothing is kept.
pub(super) fn read_write_data(
    src: &mut dyn ZeroCopyReader,
    len: usize,
    offset: u64,
) -> io::Result<WriteData> {
    if len == 0 {
        return Ok(WriteData::new());
    }
    let mut sink = PageSink {
        len,
        offset,
        data: None,
    };
    let n = src.read_to(&mut sink, len, 0)?;
    match sink.data {
        Some(data) if n == len => Ok(data),
        _ => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

/// The "file" `read_to` writes the guest's buffers into: it takes them all
/// in one call and keeps them as a [`WriteData`].
struct PageSink {
    len: usize,
    offset: u64,
    data: Option<WriteData>,
}

impl FileReadWriteVolatile for PageSink {
    fn write_vectored_at_volatile(
        &mut self,
        bufs: &[FileVolatileSlice],
        _offset: u64,
    ) -> io::Result<usize> {
        if self.data.is_some() {
            // One call takes the whole write; a second has nowhere to go.
            return Ok(0);
        }
        let mut src = Slices {
            bufs,
            at: 0,
            pos: 0,
        };
        // A short list fails here (UnexpectedEof) and is not consumed.
        self.data = Some(WriteData::read_aligned(&mut src, self.len, self.offset)?);
        Ok(self.len)
    }

    fn write_at_volatile(&mut self, slice: FileVolatileSlice, offset: u64) -> io::Result<usize> {
        self.write_vectored_at_volatile(&[slice], offset)
    }

    fn write_volatile(&mut self, slice: FileVolatileSlice) -> io::Result<usize> {
        self.write_vectored_at_volatile(&[slice], 0)
    }

    fn read_volatile(&mut self, _slice: FileVolatileSlice) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn read_at_volatile(&mut self, _slice: FileVolatileSlice, _offset: u64) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// A cursor over a list of guest buffers.
struct Slices<'a, 'b> {
    bufs: &'a [FileVolatileSlice<'b>],
    at: usize,
    pos: usize,
}

impl io::Read for Slices<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while let Some(slice) = self.bufs.get(self.at) {
            let slice = slice.as_volatile_slice();
            if self.pos < slice.len() {
                let rest = slice
                    .offset(self.pos)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let n = rest.copy_to(buf);
                self.pos += n;
                return Ok(n);
            }
            self.at += 1;
            self.pos = 0;
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pohmelfs_testkit::GuestBytes;

    #[test]
    fn a_write_over_many_buffers_is_read_into_page_parts() {
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        // Buffers of odd sizes, as a guest's scatter list may have.
        let mut src = GuestBytes::split(bytes.clone(), &[1, 4095, 3000, 7000, 5904]);
        let data = read_write_data(&mut src, bytes.len(), 100).unwrap();
        assert_eq!(data.to_vec(), bytes);
        let sizes: Vec<usize> = data.parts().iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [3996, 4096, 4096, 4096, 3716]);
    }

    #[test]
    fn a_request_shorter_than_its_header_says_is_an_error() {
        let mut src = GuestBytes::split(vec![1; 5000], &[4000, 1000]);
        let err = read_write_data(&mut src, 5001, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
