//! A file's bytes in the model: a size and the 4 KiB pages written, holes
//! (zeros) elsewhere, so sparse files of any size cost only what was
//! written.

use std::collections::BTreeMap;

/// Bytes per page of a file's sparse content.
pub const PAGE: u64 = 4096;

/// A file's bytes: a size and the pages written, holes elsewhere.
#[derive(Clone, Debug, Default)]
pub struct Content {
    pub size: u64,
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
}

impl Content {
    /// The bytes `offset..offset + len` clipped to the size.
    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - offset) as usize];
        for (&index, page) in self.pages.range(offset / PAGE..=(end - 1) / PAGE) {
            let page_start = index * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
        out
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = rest.len().min(PAGE as usize - in_page);
            let page = self
                .pages
                .entry(index)
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            page[in_page..in_page + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            pos += n as u64;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    /// Zero `offset..offset + len` (within the size only).
    pub fn zero(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let first = offset / PAGE;
        let last = (end - 1) / PAGE;
        let indexes: Vec<u64> = self.pages.range(first..=last).map(|(i, _)| *i).collect();
        for index in indexes {
            let page_start = index * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            if from == page_start && to == page_start + PAGE {
                self.pages.remove(&index);
            } else if let Some(page) = self.pages.get_mut(&index) {
                page[(from - page_start) as usize..(to - page_start) as usize].fill(0);
            }
        }
    }

    pub fn set_size(&mut self, size: u64) {
        if size < self.size {
            let old = self.size;
            self.zero(size, old - size);
            let keep = size.div_ceil(PAGE);
            self.pages.split_off(&keep);
        }
        self.size = size;
    }

    /// Bytes held in pages (for the memory bound).
    pub fn stored_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_reads_what_was_written_with_holes_as_zeros() {
        let mut c = Content::default();
        c.write(5000, b"abc");
        assert_eq!(c.size, 5003);
        assert_eq!(c.read(4998, 10), [0, 0, b'a', b'b', b'c']);
        c.set_size(5001);
        c.set_size(9000);
        assert_eq!(c.read(5000, 3), [b'a', 0, 0]);
        c.write(0, &[9; 10000]);
        c.zero(4096, 4096);
        assert_eq!(c.read(4095, 2), [9, 0]);
        assert_eq!(c.read(8191, 2), [0, 9]);
        assert_eq!(c.pages.len(), 2, "the whole page in the hole is dropped");
        c.write(20000, &[]);
        assert_eq!(c.size, 10000, "an empty write does not extend");
    }
}
