//! Large wire buffers, recycled: the payloads of frames that carry data
//! (a store server's Read answers and the Stage frames it receives, the
//! Data answers a client receives) are buffers of 128 KiB to 8 MiB. Blocks
//! that large come from glibc as mappings of their own (`allocator.rs`),
//! so each new one was faulted in and zeroed page by page by the kernel
//! and unmapped when freed: a fifth to a quarter of `pohmelfs store`'s CPU
//! on a sequential read or write, and a sixth of the daemon's on a read
//! (`docs/benchmarks.md`, "Wire buffers and direct server appends"). A
//! buffer given back goes to a small pool instead and is written over by
//! the next frame.
//!
//! Bounded: at most [`POOL_BYTES_MAX`] bytes of capacity and
//! [`POOL_BUFFERS_MAX`] buffers are kept per process (part of the fixed
//! overhead beside `--cache-size`); what does not fit is freed as before.
//! Buffers below [`POOLED_MIN`] bytes are never pooled.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

/// Buffers smaller than this are allocated and freed as usual (the
/// allocator's small blocks are cheap).
/// (the daemon's allocator's `LARGE`, `src/allocator.rs`).
pub const POOLED_MIN: usize = 128 << 10;
/// Capacity kept in the pool at most, in bytes.
pub const POOL_BYTES_MAX: usize = 16 << 20;
/// Buffers kept in the pool at most.
pub const POOL_BUFFERS_MAX: usize = 24;
/// Pooled capacities are rounded up to this, so that a buffer fits the
/// next request of about the same size.
const ROUND: usize = 256 << 10;

/// Free buffers, bounded.
struct Pool {
    free: Vec<Vec<u8>>,
    bytes: usize,
    max_bytes: usize,
    max_buffers: usize,
}

type Shared = Mutex<Pool>;

/// The process's pool.
static POOL: Shared = Pool::shared(POOL_BYTES_MAX, POOL_BUFFERS_MAX);

impl Pool {
    const fn shared(max_bytes: usize, max_buffers: usize) -> Shared {
        Mutex::new(Pool {
            free: Vec::new(),
            bytes: 0,
            max_bytes,
            max_buffers,
        })
    }

    fn lock(shared: &Shared) -> MutexGuard<'_, Pool> {
        // A panic while the pool was held leaves it a valid pool.
        shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(shared: &Shared, n: usize) -> Vec<u8> {
        if n < POOLED_MIN {
            return Vec::with_capacity(n);
        }
        {
            let mut p = Pool::lock(shared);
            // The smallest that fits: large ones stay for large frames.
            let best = p
                .free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= n)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let mut v = p.free.swap_remove(i);
                p.bytes -= v.capacity();
                v.clear();
                return v;
            }
        }
        Vec::with_capacity(n.div_ceil(ROUND) * ROUND)
    }

    fn give(shared: &Shared, v: Vec<u8>) {
        let cap = v.capacity();
        if cap < POOLED_MIN {
            return;
        }
        let mut p = Pool::lock(shared);
        if p.free.len() < p.max_buffers && p.bytes + cap <= p.max_bytes {
            p.bytes += cap;
            p.free.push(v);
        }
    }

    fn into_bytes(shared: &'static Shared, v: Vec<u8>) -> Bytes {
        if v.capacity() < POOLED_MIN {
            return Bytes::from(v);
        }
        Bytes::from_owner(Recycled(v, shared))
    }
}

/// An empty vector with room for `n` bytes: a recycled one when the pool
/// holds one large enough.
pub fn take(n: usize) -> Vec<u8> {
    Pool::take(&POOL, n)
}

/// Give a vector back: kept for [`take`] when it is large and the pool has
/// room, else freed.
pub fn give(v: Vec<u8>) {
    Pool::give(&POOL, v)
}

/// The vector's bytes, given back to the pool when the last reference to
/// them (slices included) is dropped.
pub fn into_bytes(v: Vec<u8>) -> Bytes {
    Pool::into_bytes(&POOL, v)
}

/// Owns a pooled buffer behind a [`Bytes`], and the pool it goes back to.
struct Recycled(Vec<u8>, &'static Shared);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        Pool::give(self.1, std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_buffer_comes_back_when_its_last_slice_goes() {
        let pool: &'static Shared = Box::leak(Box::new(Pool::shared(8 << 20, 4)));
        let mut v = Pool::take(pool, POOLED_MIN + 1);
        assert_eq!(v.capacity(), ROUND, "rounded up");
        v.extend_from_slice(&[7u8; 1000]);
        let addr = v.as_ptr() as usize;
        let b = Pool::into_bytes(pool, v).slice(10..20);
        assert_eq!(&b[..], &[7u8; 10]);
        let copy = b.clone();
        drop(b);
        assert_eq!(Pool::lock(pool).bytes, 0, "a slice still refers to it");
        drop(copy);
        let again = Pool::take(pool, POOLED_MIN + 1);
        assert_eq!(again.as_ptr() as usize, addr, "not recycled");
        assert!(again.is_empty(), "a recycled buffer comes back empty");
        // Too large for the pooled one: a new buffer, the pooled one stays.
        Pool::give(pool, again);
        let large = Pool::take(pool, 4 << 20);
        assert_ne!(large.as_ptr() as usize, addr);
        assert_eq!(Pool::lock(pool).free.len(), 1);
    }

    #[test]
    fn the_pool_is_bounded_in_bytes_and_buffers() {
        let pool: &'static Shared = Box::leak(Box::new(Pool::shared(8 << 20, 4)));
        for _ in 0..10 {
            Pool::give(pool, Vec::with_capacity(3 << 20));
        }
        assert_eq!(Pool::lock(pool).free.len(), 2, "8 MiB hold two of 3 MiB");
        for _ in 0..10 {
            Pool::give(pool, Vec::with_capacity(POOLED_MIN));
        }
        let p = Pool::lock(pool);
        assert_eq!(p.free.len(), 4);
        assert!(p.bytes <= 8 << 20);
        drop(p);
        Pool::give(pool, Vec::with_capacity(100));
        assert_eq!(
            Pool::lock(pool).free.len(),
            4,
            "small buffers are not pooled"
        );
        // The smallest that fits is taken.
        assert_eq!(Pool::take(pool, POOLED_MIN).capacity(), POOLED_MIN);
    }
}
