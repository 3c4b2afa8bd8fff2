//! [`GuestBytes`]: the guest's side of a FUSE WRITE, for tests that call a
//! `FileSystem` directly.

use std::io::{self, Read};

use fuse_backend_rs::api::filesystem::ZeroCopyReader;
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use vm_memory::VolatileSlice;

/// A write's bytes in guest buffers of given sizes (the last one takes the
/// rest), handed over as the device's reader does: all of them in one
/// `read_to` call, or through `io::Read`.
pub struct GuestBytes {
    bytes: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
}

impl GuestBytes {
    /// The bytes in one buffer.
    pub fn new(bytes: impl Into<Vec<u8>>) -> GuestBytes {
        GuestBytes::split(bytes, &[])
    }

    /// The bytes in buffers of `sizes`, then one buffer of the rest.
    pub fn split(bytes: impl Into<Vec<u8>>, sizes: &[usize]) -> GuestBytes {
        GuestBytes {
            bytes: bytes.into(),
            pos: 0,
            sizes: sizes.to_vec(),
        }
    }

    /// Hand the same bytes over again, from the start.
    pub fn rewind(&mut self) {
        self.pos = 0;
    }
}

impl Read for GuestBytes {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&self.bytes[self.pos..]).read(buf)?;
        self.pos += n;
        Ok(n)
    }
}

impl ZeroCopyReader for GuestBytes {
    fn read_to(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        let end = self.bytes.len().min(self.pos.saturating_add(count));
        let whole = VolatileSlice::from(&mut self.bytes[self.pos..end]);
        let mut slices = Vec::new();
        let mut at = 0;
        for &size in self.sizes.iter().chain(std::iter::once(&usize::MAX)) {
            let n = size.min(whole.len() - at);
            if n == 0 {
                break;
            }
            let part = whole.subslice(at, n).map_err(io::Error::other)?;
            slices.push(FileVolatileSlice::from_volatile_slice(&part));
            at += n;
        }
        let n = f.write_vectored_at_volatile(&slices, off)?;
        self.pos += n;
        Ok(n)
    }
}
