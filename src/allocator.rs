//! The daemon's allocator: mimalloc for small blocks, glibc's malloc for
//! large ones.
//!
//! With glibc's allocator alone, allocation took 8-15% of the daemon's CPU
//! in every bench workload (`_int_malloc`, `malloc_consolidate`,
//! `_int_free`): the engine's iterators and records and the write-back
//! layer's transactions are many small, short-lived allocations, often
//! freed on another thread than the one that made them. mimalloc 2 (the
//! `v2` feature) serves them from per-thread pages: in the bench
//! (docs/benchmarks.md) the daemon used about a fifth less CPU and created
//! files 1.5 times as fast. mimalloc 3 did worse than glibc in the same
//! A/B (nearly twice the CPU creating files), so it stays on 2. `no_thp`:
//! with transparent huge pages each thread's first pages came in 2 MiB
//! pieces (54 MiB anonymous at start, against 8 MiB without).
//!
//! Large blocks (wire frames, read buffers, request buffers, tables being
//! built) are few and are what made mimalloc keep memory: it held the
//! freed ones of other threads until their owner allocated again. With
//! mimalloc for everything, `pohmelfs store` peaked at 495-549 MiB
//! anonymous writing 1 GiB (glibc: 17 MiB) and a daemon with
//! `--cache-size 16M` on a remote volume at 157 MiB (glibc: 23 MiB). So
//! blocks of [`LARGE`] bytes and more go to glibc, whose mmap threshold is
//! fixed at the same size ([`tune_glibc`]): each is its own mapping,
//! returned to the system when freed.

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// Blocks of at least this many bytes come from glibc (and are mapped on
/// their own); smaller ones from mimalloc.
pub const LARGE: usize = 128 << 10;

/// See the module documentation.
pub struct Split;

fn large(size: usize) -> bool {
    size >= LARGE
}

// SAFETY: every block is freed (or resized) by the allocator that made it:
// which one is decided by the block's size, and `dealloc` and `realloc`
// are given the size the block was allocated with (GlobalAlloc's
// contract). A resize that crosses `LARGE` moves the block.
unsafe impl GlobalAlloc for Split {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout is passed on unchanged.
        unsafe {
            if large(layout.size()) {
                System.alloc(layout)
            } else {
                MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if large(layout.size()) {
                System.alloc_zeroed(layout)
            } else {
                MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `layout` is the one `ptr` was allocated with, so its size
        // names the allocator that made it.
        unsafe {
            if large(layout.size()) {
                System.dealloc(ptr, layout)
            } else {
                MiMalloc.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (large(layout.size()), large(new_size)) {
            // SAFETY: the block stays with the allocator that made it.
            (true, true) => unsafe { System.realloc(ptr, layout, new_size) },
            // SAFETY: as above.
            (false, false) => unsafe { MiMalloc.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: `new_size` is non-zero and, rounded up to the
                // alignment, does not overflow (realloc's contract), so the
                // layout is valid; the new block does not overlap the old
                // one, and both hold at least the bytes copied.
                unsafe {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

/// Keep glibc's heap from holding freed memory: blocks from [`LARGE`] up
/// are mapped on their own (glibc would otherwise raise its threshold
/// after each large free, and serve them from arenas it never gives back),
/// at most two arenas for what C code allocates, and trimming past 128 KiB
/// of free space at the heap's top. Call before any other thread exists,
/// as glibc asks.
pub fn tune_glibc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters, and no other
    // thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
    }
}

#[cfg(test)]
mod tests {
    use super::{Split, LARGE};
    use std::alloc::{GlobalAlloc, Layout};

    /// Bytes survive resizes within either allocator and across `LARGE`
    /// both ways.
    #[test]
    fn a_block_keeps_its_bytes_across_both_allocators() {
        let a = Split;
        let sizes = [64, LARGE - 1, LARGE, 3 * LARGE, LARGE - 8, 100, 2 * LARGE];
        let layout = Layout::from_size_align(sizes[0], 16).unwrap();
        // SAFETY: each block is used within its size and freed with the
        // layout of its last resize.
        unsafe {
            let mut p = a.alloc(layout);
            assert!(!p.is_null());
            let mut size = sizes[0];
            for i in 0..size {
                *p.add(i) = (i % 251) as u8;
            }
            for &next in &sizes[1..] {
                p = a.realloc(p, Layout::from_size_align(size, 16).unwrap(), next);
                assert!(!p.is_null());
                assert_eq!(p as usize % 16, 0, "alignment kept at {next}");
                for i in 0..size.min(next) {
                    assert_eq!(
                        *p.add(i),
                        (i % 251) as u8,
                        "byte {i} after {size} -> {next}"
                    );
                }
                for i in size.min(next)..next {
                    *p.add(i) = (i % 251) as u8;
                }
                size = next;
            }
            a.dealloc(p, Layout::from_size_align(size, 16).unwrap());
            let z = a.alloc_zeroed(Layout::from_size_align(2 * LARGE, 8).unwrap());
            assert!((0..2 * LARGE).all(|i| *z.add(i) == 0));
            a.dealloc(z, Layout::from_size_align(2 * LARGE, 8).unwrap());
        }
    }
}
