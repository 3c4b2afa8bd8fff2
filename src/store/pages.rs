//! Whole-page buffers, recycled: a guest WRITE of 1 MiB becomes 256 page
//! buffers that the write-back layer keeps until they are acked and
//! evicted, so pages are allocated and freed all the time. With glibc's
//! allocator each 4 KiB buffer was a zeroed `calloc` and a `free` that
//! consolidates bins: with the rest of the allocator, 18–19 % of the
//! daemon's CPU samples on a sequential write (`docs/benchmarks.md`, "Page
//! buffers and the allocator"). A freed page buffer goes back to a small
//! free list instead, and the next whole page read from the guest is
//! written over it: no allocation, no zeroing.
//!
//! The free list holds at most [`FREE_PAGES_MAX`] buffers (4 MiB), part of
//! the daemon's fixed overhead beside `--cache-size`. A page handed out is
//! a [`Bytes`] that owns its buffer: cloning it clones a reference, and
//! the last reference to go returns the buffer.

use std::io;
use std::sync::Mutex;

use bytes::Bytes;

use super::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// Free page buffers kept for reuse at most (4 MiB).
pub const FREE_PAGES_MAX: usize = 1024;

/// A page buffer, page-aligned: a segment append of whole pages may then
/// go `O_DIRECT` straight from these buffers (`store/engine/segment.rs`).
#[repr(C, align(4096))]
struct PageBuf([u8; PAGE]);
const _: () = assert!(PAGE == 4096, "PageBuf's alignment is one page");

type Buffer = Box<PageBuf>;

/// Buffers kept for reuse, up to a bound.
struct FreeList {
    free: Mutex<Vec<Buffer>>,
    max: usize,
}

/// The daemon's free list.
static FREE: FreeList = FreeList::new(FREE_PAGES_MAX);

impl FreeList {
    const fn new(max: usize) -> FreeList {
        FreeList {
            free: Mutex::new(Vec::new()),
            max,
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Buffer>> {
        // A panic while the list was held leaves it a valid list.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer from the list, else a new (zeroed) one.
    fn take(&self) -> Buffer {
        self.list().pop().unwrap_or_else(new_buffer)
    }

    /// `count` buffers, as many as it has from the list under one lock,
    /// the rest new: one lock per WRITE, not one per page, on a list the
    /// commit thread locks too to give buffers back.
    fn take_many(&self, count: usize) -> Vec<Buffer> {
        let mut out = Vec::with_capacity(count);
        // A write within one page takes none: no lock.
        if count > 0 {
            let mut free = self.list();
            let from = free.len().saturating_sub(count);
            out.extend(free.drain(from..));
        }
        out.resize_with(count, new_buffer);
        out
    }

    /// `buf` as the bytes of a page, back here when they are dropped.
    fn own(&'static self, buf: Buffer) -> Bytes {
        Bytes::from_owner(Recycled {
            buf: Some(buf),
            home: self,
        })
    }

    fn give_back(&self, buf: Buffer) {
        let mut free = self.list();
        if free.len() < self.max {
            free.push(buf);
        }
    }

    fn fill_page(
        &'static self,
        fill: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<Bytes> {
        let mut buf = self.take();
        if let Err(e) = fill(&mut buf.0[..]) {
            self.give_back(buf);
            return Err(e);
        }
        Ok(self.own(buf))
    }

    fn read_pages(&'static self, src: &mut dyn io::Read, count: usize) -> io::Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(count);
        let mut bufs = self.take_many(count).into_iter();
        while let Some(mut buf) = bufs.next() {
            if let Err(e) = src.read_exact(&mut buf.0[..]) {
                // The pages read so far go back as `out` drops.
                for buf in std::iter::once(buf).chain(bufs) {
                    self.give_back(buf);
                }
                return Err(e);
            }
            out.push(self.own(buf));
        }
        Ok(out)
    }
}

/// A new buffer, zeroed (the allocator's zeroing, no copy).
fn new_buffer() -> Buffer {
    Box::new(PageBuf([0u8; PAGE]))
}

/// A page buffer owned by a [`Bytes`]; it goes back to its free list when
/// the last reference drops.
struct Recycled {
    buf: Option<Buffer>,
    home: &'static FreeList,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        match &self.buf {
            Some(buf) => &buf.0[..],
            None => &[],
        }
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.home.give_back(buf);
        }
    }
}

/// `count` whole pages read one after another from `src`, in recycled
/// buffers taken at once (`count` is the caller's bound: a WRITE's pages,
/// at most 256). On an error every buffer goes back to the free list, and
/// what they held is never seen.
pub fn read_pages(src: &mut dyn io::Read, count: usize) -> io::Result<Vec<Bytes>> {
    FREE.read_pages(src, count)
}

/// One whole page that `fill` writes (every byte of it), in a recycled
/// buffer; on an error the buffer goes back, as with [`read_pages`].
pub fn fill_page(fill: impl FnOnce(&mut [u8]) -> io::Result<()>) -> io::Result<Bytes> {
    FREE.fill_page(fill)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free list of its own (the daemon's is shared by parallel tests).
    fn list(max: usize) -> &'static FreeList {
        Box::leak(Box::new(FreeList::new(max)))
    }

    impl FreeList {
        fn read_page(&'static self, mut src: &[u8]) -> io::Result<Bytes> {
            self.fill_page(|buf| io::Read::read_exact(&mut src, buf))
        }
    }

    #[test]
    fn a_page_returns_to_the_list_when_its_last_reference_drops() {
        let free = list(8);
        let a = free.read_page(&[7u8; PAGE][..]).unwrap();
        assert_eq!(&a[..], &[7u8; PAGE][..]);
        let at = a.as_ptr();
        let clone = a.clone();
        drop(a);
        assert_eq!(free.list().len(), 0, "a clone still holds the buffer");
        assert_eq!(&clone[..], &[7u8; PAGE][..]);
        drop(clone);
        assert_eq!(free.list().len(), 1);
        let b = free.read_page(&[9u8; PAGE][..]).unwrap();
        assert_eq!(b.as_ptr(), at, "the buffer is reused");
        assert_eq!(&b[..], &[9u8; PAGE][..]);
        assert_eq!(free.list().len(), 0);
    }

    #[test]
    fn a_short_source_is_an_error_and_the_buffer_goes_back() {
        let free = list(8);
        let err = free.read_page(&[1u8; 100][..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(free.list().len(), 1);
    }

    /// Pages read together take their buffers at once, the list's first;
    /// a source that runs short gives every buffer back.
    #[test]
    fn pages_read_together_reuse_buffers_and_give_them_back() {
        let free = list(8);
        drop(free.read_page(&[1u8; PAGE][..]).unwrap());
        drop(free.read_page(&[1u8; PAGE][..]).unwrap());
        assert_eq!(free.list().len(), 1, "one buffer, reused");
        let bytes: Vec<u8> = (0..3 * PAGE).map(|i| (i / PAGE) as u8 + 5).collect();
        let pages = free.read_pages(&mut &bytes[..], 3).unwrap();
        assert_eq!(free.list().len(), 0);
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(&p[..], &bytes[i * PAGE..(i + 1) * PAGE]);
        }
        drop(pages);
        assert_eq!(free.list().len(), 3);
        let err = free
            .read_pages(&mut &bytes[..2 * PAGE + 10], 5)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(free.list().len(), 5, "the two pages read and the three not");
    }

    #[test]
    fn the_free_list_is_bounded() {
        let free = list(16);
        let pages: Vec<Bytes> = (0..40)
            .map(|_| free.read_page(&[0u8; PAGE][..]).unwrap())
            .collect();
        drop(pages);
        assert_eq!(free.list().len(), 16);
    }
}
