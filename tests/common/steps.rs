//! A thread that takes numbered steps until told to stop: what a test runs while something
//! else happens (a writer committing while a snapshot is taken), with a count of the steps done
//! that the test waits on instead of sleeping.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::wait_until;

/// Steps taken on a thread of their own; see [`Steps::spawn`].
pub struct Steps {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Steps {
    /// Call `step(0)`, `step(1)`, … on a thread of its own until `max` steps are done or the
    /// steps are stopped ([`Steps::finish`], or dropping them).
    pub fn spawn(max: u64, mut step: impl FnMut(u64) + Send + 'static) -> Steps {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Acquire) && i < max {
                    step(i);
                    i += 1;
                    done.store(i, Ordering::Release);
                }
            })
        };
        Steps {
            done,
            stop,
            thread: Some(thread),
        }
    }

    /// The steps done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Whether `n` steps were done within `timeout`; `false` at once when the thread ended short
    /// of them (its last step, or a step that panicked).
    pub fn reach(&self, n: u64, timeout: Duration) -> bool {
        let ended = || self.thread.as_ref().is_none_or(JoinHandle::is_finished);
        wait_until(timeout, Duration::from_millis(5), || {
            self.done() >= n || ended()
        });
        self.done() >= n
    }

    /// Stop after the step under way and return the steps done; a step's panic goes on here.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        self.done()
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            // A test that failed before finish: its own panic is the one to report.
            let _ = thread.join();
        }
    }
}
