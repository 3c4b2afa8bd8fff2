//! Pages a guest write covers only in part while the store holds older
//! bytes of them that the daemon never read: the page keeps the bytes
//! written and which ranges they are ([`Known`]), so that the write needs
//! no store read. A read of such a page fetches it and merges the known
//! ranges over the store's bytes (the page is then whole); a transaction
//! sends the known ranges only, and the store keeps its bytes around them.
//!
//! It never talks to the store: the cache (`cache.rs`) holds one per
//! partial page, under the layer's lock.

use std::ops::Range;

use super::cache::PAGE_SIZE;

/// The byte ranges of a page the daemon holds: sorted, disjoint and not
/// touching (touching ranges are merged), each within the page. At most
/// `PAGE_SIZE / 2` of them, so a page's ranges are bounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known(Vec<Range<u16>>);

/// Bytes per page, as the ranges count them.
const PAGE: u16 = PAGE_SIZE as u16;
const _: () = assert!(PAGE_SIZE <= u16::MAX as u64);

impl Known {
    /// The bytes `range` of a page (clipped to the page).
    pub fn new(range: Range<usize>) -> Known {
        let mut k = Known(Vec::new());
        k.add(range);
        k
    }

    /// Know the bytes `range` too.
    pub fn add(&mut self, range: Range<usize>) {
        let start = range.start.min(PAGE as usize) as u16;
        let end = range.end.min(PAGE as usize) as u16;
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Absorb every range that overlaps or touches the new one.
        self.0.retain(|r| {
            if r.end < start || r.start > end {
                return true;
            }
            start = start.min(r.start);
            end = end.max(r.end);
            false
        });
        let at = self.0.partition_point(|r| r.start < start);
        self.0.insert(at, start..end);
    }

    /// True when every byte of the page is known.
    pub fn is_whole(&self) -> bool {
        self.0.first() == Some(&(0..PAGE))
    }

    /// The known ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.0.iter().map(|r| r.start as usize..r.end as usize)
    }

    /// Copy the known ranges of `page` into `out` (the store's bytes of the
    /// same page): `out` becomes the page's newest bytes.
    pub fn copy_over(&self, page: &[u8], out: &mut [u8]) {
        for r in self.ranges() {
            if let (Some(src), Some(dst)) = (page.get(r.clone()), out.get_mut(r)) {
                dst.copy_from_slice(src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_overlap_or_touch() {
        let mut k = Known::new(100..200);
        k.add(300..400);
        k.add(0..10);
        assert_eq!(k.ranges().collect::<Vec<_>>(), [0..10, 100..200, 300..400]);
        k.add(200..300);
        assert_eq!(k.ranges().collect::<Vec<_>>(), [0..10, 100..400]);
        k.add(5..150);
        assert!(k.ranges().eq(std::iter::once(0..400)));
        assert!(!k.is_whole());
        k.add(350..PAGE_SIZE as usize + 100);
        assert!(k.is_whole(), "clipped to the page, and whole");
        k.add(7..7);
        assert_eq!(k.ranges().count(), 1, "an empty range adds nothing");
    }

    #[test]
    fn known_bytes_are_copied_over_the_stores() {
        let k = {
            let mut k = Known::new(2..4);
            k.add(6..7);
            k
        };
        let page = [9u8; PAGE_SIZE as usize];
        let mut out = [1u8; PAGE_SIZE as usize];
        k.copy_over(&page, &mut out);
        assert_eq!(out[..8], [1, 1, 9, 9, 1, 1, 9, 1]);
        assert!(out[8..].iter().all(|&b| b == 1));
    }
}
