//! The daemon's memory budget: how `--cache-size` is split between the
//! page cache, the metadata caches of the write-back layer (inode
//! attributes, names of directories created in this session, extended
//! attributes, read positions) and the embedded engine's memtables and
//! block caches, and what each metadata cache costs per entry.
//!
//! It only computes numbers; the caches enforce them (`cache.rs`,
//! `overlay.rs`) and the engine is configured with its share
//! (`store/engine/config.rs`, the `memory=` URL option).

use std::collections::HashMap;
use std::mem::size_of;

use super::cache::PAGE_SIZE;
use super::overlay::Overlay;
use crate::store::Dirent;

/// The smallest page cache share, whatever `--cache-size` says.
const MIN_PAGE_BYTES: u64 = 1 << 20;

/// The smallest engine share (the least its `memory=` option takes).
const MIN_ENGINE_BYTES: u64 = 1 << 20;

/// How `--cache-size` is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Clean and dirty pages (`--dirty-max` is part of it).
    pub page_bytes: u64,
    /// Inode attributes, directory names, extended attributes and read
    /// positions kept beyond what unacknowledged transactions need.
    pub meta_bytes: u64,
    /// The embedded engine's memtables and block caches (`file://`,
    /// `s3://`); 0 when the engine is not in this process (`pohmel://`,
    /// `mem:`), and the page cache has its share.
    pub engine_bytes: u64,
}

impl MemoryBudget {
    /// Split `total` bytes: an eighth for the metadata caches, a quarter for
    /// the engine when it runs in the daemon (`embedded`), the rest for
    /// pages. Pages and engine get 1 MiB each at least, so a tiny total is
    /// exceeded.
    pub fn split(total: u64, embedded: bool) -> MemoryBudget {
        let meta_bytes = total / 8;
        let engine_bytes = if embedded {
            (total / 4).max(MIN_ENGINE_BYTES)
        } else {
            0
        };
        MemoryBudget {
            page_bytes: (total - meta_bytes)
                .saturating_sub(engine_bytes)
                .max(MIN_PAGE_BYTES),
            meta_bytes,
            engine_bytes,
        }
    }

    /// Everything the budget covers.
    pub fn total(&self) -> u64 {
        self.page_bytes + self.meta_bytes + self.engine_bytes
    }
}

/// The metadata caches' share split between them: three eighths for inode
/// attributes, a quarter for the names of directories created in this
/// session, an eighth each for other known names, extended attributes and
/// read positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MetaShares {
    pub(super) attrs: u64,
    pub(super) dirs: u64,
    pub(super) names: u64,
    pub(super) xattrs: u64,
    pub(super) reads: u64,
}

impl MetaShares {
    pub(super) fn of(meta_bytes: u64) -> MetaShares {
        MetaShares {
            attrs: meta_bytes / 8 * 3,
            dirs: meta_bytes / 4,
            names: meta_bytes / 8,
            xattrs: meta_bytes / 8,
            reads: meta_bytes / 8,
        }
    }
}

/// `url` with the engine's share of the budget as its `memory=` option,
/// unless it names one (or is not an engine URL, or the share is 0).
pub(super) fn with_engine_memory(url: &str, bytes: u64) -> String {
    let engine = url.starts_with("file:") || url.starts_with("s3:");
    let (_, query) = url.split_once('?').unwrap_or((url, ""));
    let named = query.split('&').any(|kv| kv.starts_with("memory="));
    if !engine || named || bytes == 0 {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}memory={bytes}")
}

/// Bytes a cached page costs besides its 4 KiB: the buffer's allocation
/// header, its key and `Page` record in the page map (one B-tree for all
/// inodes, nodes about two-thirds full: ~200) and its LRU entry (~40);
/// rounded up, since a page map per inode once cost a whole node (~1.4
/// KiB) for a one-page file.
const PAGE_OVERHEAD_BYTES: u64 = 512;

/// The bytes of page buffers that fit in `share` bytes once each page's
/// bookkeeping is counted too: what the page cache is sized with.
pub(super) fn page_buffers_within(share: u64) -> u64 {
    share / (PAGE_SIZE + PAGE_OVERHEAD_BYTES) * PAGE_SIZE
}

/// Bytes a hash map entry costs beyond its key and value: hashbrown keeps
/// one control byte per bucket and at most 7 of 8 buckets full; rounded up.
const HASH_OVERHEAD: u64 = 8;

/// Bytes a hash table that holds up to `capacity` entries of `entry` bytes
/// has allocated: hashbrown keeps a power of two of slots, at most 7 of 8
/// full, each with a control byte.
pub(super) fn table_bytes(capacity: usize, entry: u64) -> u64 {
    if capacity == 0 {
        return 0;
    }
    (capacity as u64 * 8 / 7).next_power_of_two() * (entry + 1)
}

/// Bytes a name costs on the heap, copied twice (a key, and the entry's
/// own copy), each with its allocation's header.
pub(super) fn name_heap_bytes(name: &[u8]) -> u64 {
    2 * (name.len() as u64 + 16)
}

/// Bytes one slot of the table of remembered inode attributes costs
/// (`State::attrs`), counted over its capacity, not its entries: a table
/// is allocated in powers of two and may be half empty.
pub(super) const ATTR_ENTRY_BYTES: u64 =
    (size_of::<(u64, Overlay)>() as u64) * 8 / 7 + HASH_OVERHEAD;

/// Bytes one read position costs (`State::last_read_end`).
pub(super) const READ_POS_ENTRY_BYTES: u64 =
    (size_of::<(u64, u64)>() as u64) * 8 / 7 + HASH_OVERHEAD;

/// Bytes a directory tracked by `CompleteDirs` costs before its entries.
pub(super) const DIR_ENTRY_BYTES: u64 =
    (size_of::<(u64, HashMap<Vec<u8>, Dirent>)>() as u64) * 8 / 7 + HASH_OVERHEAD;

/// Bytes a name entry costs besides the name's bytes (counted twice: the
/// key, and the entry's own copy), for `KnownXattrs`.
pub(super) const NAME_ENTRY_BYTES: u64 =
    (size_of::<(Vec<u8>, Dirent)>() as u64) * 8 / 7 + HASH_OVERHEAD + 2 * 16;

/// Bytes one inode known to have no extended attributes costs.
pub(super) const NO_XATTR_ENTRY_BYTES: u64 = (size_of::<u64>() as u64) * 8 / 7 + HASH_OVERHEAD;

/// Bytes freed by forgetting inodes after which the allocator is asked to
/// give free memory back to the system.
pub(super) const TRIM_AFTER_FREED_BYTES: u64 = 16 << 20;

/// Give the heap's free pages back to the system. glibc keeps memory freed
/// in the middle of its heap (the pages of forgotten files, among live
/// allocations) resident until asked: measured on the host, 20,000 files
/// created and forgotten left the daemon at 114 MiB anonymous, 53 MiB after
/// a `malloc_trim`. It walks the heap, so call it rarely. The daemon's
/// small allocations come from mimalloc, which purges free pages itself,
/// and its large ones are mapped one by one (`src/allocator.rs`); this
/// still returns what C code left in glibc's heap, and all of it where the
/// library runs on the system allocator (the tests).
pub(super) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the system; it
    // touches no memory the program holds and is safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the metadata caches hold now (`WritebackStore::cache_usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Bytes of pages, clean and dirty.
    pub page_bytes: u64,
    /// Accounted bytes of the metadata caches (their entries' estimated
    /// cost, from the constants above), unacknowledged changes included.
    pub meta_bytes: u64,
    /// Entries in the metadata caches.
    pub meta_entries: u64,
    /// Inodes whose attributes are remembered.
    pub attrs: u64,
    /// Directories tracked as complete, and their names.
    pub complete_dirs: u64,
    pub complete_dir_names: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_total_and_leaves_pages_the_rest() {
        let b = MemoryBudget::split(256 << 20, true);
        assert_eq!(b.meta_bytes, 32 << 20);
        assert_eq!(b.engine_bytes, 64 << 20);
        assert_eq!(b.page_bytes, 160 << 20);
        assert_eq!(b.total(), 256 << 20);
        let remote = MemoryBudget::split(256 << 20, false);
        assert_eq!(remote.engine_bytes, 0);
        assert_eq!(remote.page_bytes, 224 << 20);
        assert_eq!(remote.total(), 256 << 20);
        // A tiny budget still leaves the page cache something to work with.
        assert_eq!(
            MemoryBudget::split(1 << 10, true).page_bytes,
            MIN_PAGE_BYTES
        );
    }

    #[test]
    fn pages_and_their_bookkeeping_fit_the_page_share() {
        let share = 160 << 20;
        let buffers = page_buffers_within(share);
        let pages = buffers / PAGE_SIZE;
        assert!(pages * (PAGE_SIZE + PAGE_OVERHEAD_BYTES) <= share);
        assert!(buffers < share && buffers > share * 8 / 10);
    }

    #[test]
    fn the_engine_share_reaches_engine_urls_unless_they_name_one() {
        assert_eq!(
            with_engine_memory("file:///v", 64 << 20),
            "file:///v?memory=67108864"
        );
        assert_eq!(
            with_engine_memory("s3://b/p?region=x", 1 << 20),
            "s3://b/p?region=x&memory=1048576"
        );
        assert_eq!(
            with_engine_memory("file:///v?memory=8M", 1 << 20),
            "file:///v?memory=8M"
        );
        assert_eq!(with_engine_memory("mem:", 1 << 20), "mem:");
        assert_eq!(
            with_engine_memory("pohmel://h:1/v", 1 << 20),
            "pohmel://h:1/v"
        );
        assert_eq!(with_engine_memory("file:///v", 0), "file:///v");
    }
}
