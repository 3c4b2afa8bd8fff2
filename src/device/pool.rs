//! A fixed pool of worker threads with a bounded job queue. The virtqueue
//! thread hands each descriptor chain to the pool, so a request that blocks
//! (an fsync waiting for the store) stalls neither its queue nor the other
//! requests. When the job queue is full, `submit` blocks: the guest's
//! virtqueue fills up and the guest waits, which is the backpressure we want.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::outstanding::Outstanding;
use crate::metrics::Metrics;
use crate::ratelimit::limited;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The worker pool.
pub struct WorkerPool {
    tx: Option<SyncSender<Job>>,
    workers: Vec<thread::JoinHandle<()>>,
    /// Jobs submitted and not yet finished.
    in_flight: Arc<Outstanding>,
}

impl WorkerPool {
    /// Start `threads` workers sharing a queue of at most `queue_depth`
    /// jobs. `metrics` counts the log lines about panics held back.
    pub fn new(
        threads: usize,
        queue_depth: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<WorkerPool> {
        let (tx, rx) = sync_channel::<Job>(queue_depth);
        let rx = Arc::new(Mutex::new(rx));
        let in_flight = Arc::new(Outstanding::default());
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let in_flight = Arc::clone(&in_flight);
            let metrics = Arc::clone(&metrics);
            workers.push(
                thread::Builder::new()
                    .name(format!("pohmelfs-worker-{i}"))
                    .spawn(move || worker(&rx, &in_flight, &metrics))?,
            );
        }
        Ok(WorkerPool {
            tx: Some(tx),
            workers,
            in_flight,
        })
    }

    /// Queue a job, waiting while the queue is full.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let Some(tx) = &self.tx else { return };
        self.in_flight.add();
        if tx.send(Box::new(job)).is_err() {
            // Only possible when every worker died, which `worker` prevents.
            self.in_flight.done();
        }
    }

    /// Wait until every submitted job has finished, at most `timeout`.
    /// Returns the number of jobs still running when it gave up.
    pub fn drain(&self, timeout: Duration) -> usize {
        self.in_flight.wait_zero(timeout)
    }
}

fn worker(rx: &Mutex<Receiver<Job>>, in_flight: &Outstanding, metrics: &Metrics) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        // A panicking request must not take the worker (and with it the
        // queue's progress) down: catch it, log it, keep serving. A guest
        // that found a panic can repeat it: the line is limited.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            limited!(
                metrics.log_lines_suppressed,
                ERROR,
                "a request handler panicked; the worker continues"
            );
        }
        in_flight.done();
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::channel;

    #[test]
    fn a_blocked_job_does_not_stall_the_others() {
        let pool = WorkerPool::new(2, 8, Arc::default()).unwrap();
        let (release_tx, release_rx) = channel::<()>();
        let (done_tx, done_rx) = channel::<u32>();
        pool.submit(move || {
            release_rx.recv().unwrap();
        });
        for i in 0..5 {
            let done_tx = done_tx.clone();
            pool.submit(move || done_tx.send(i).unwrap());
        }
        let mut got: Vec<u32> = (0..5)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(pool.drain(Duration::from_millis(10)), 1);
        release_tx.send(()).unwrap();
        assert_eq!(pool.drain(Duration::from_secs(10)), 0);
    }

    #[test]
    fn a_panicking_job_does_not_kill_the_pool() {
        let metrics = Arc::new(Metrics::default());
        let pool = WorkerPool::new(1, 4, Arc::clone(&metrics)).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        // More panics than one window's lines: the rest are counted, not
        // logged (at least one window sees more than its share unless the
        // panics take longer than PANICS / LINES_PER_WINDOW windows).
        const PANICS: u32 = 100;
        for _ in 0..PANICS {
            pool.submit(|| std::panic::resume_unwind(Box::new("boom")));
        }
        let r = Arc::clone(&ran);
        pool.submit(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(pool.drain(Duration::from_secs(10)), 0);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(metrics.log_lines_suppressed.get() > 0);
    }
}
