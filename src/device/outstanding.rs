//! A count of things handed out and not back yet, with a bounded wait for
//! it to reach zero: the worker pool's jobs (`pool.rs`) and a queue's
//! chains (`vring.rs`).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Outstanding {
    count: Mutex<usize>,
    back: Condvar,
}

impl Outstanding {
    fn lock(&self) -> MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more out.
    pub fn add(&self) {
        *self.lock() += 1;
    }

    /// One back.
    pub fn done(&self) {
        let mut n = self.lock();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.back.notify_all();
        }
    }

    /// How many are out.
    pub fn get(&self) -> usize {
        *self.lock()
    }

    /// Wait until none is out, at most `bound`; how many still are.
    pub fn wait_zero(&self, bound: Duration) -> usize {
        let deadline = Instant::now() + bound;
        let mut n = self.lock();
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = self
                .back
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *n
    }
}
