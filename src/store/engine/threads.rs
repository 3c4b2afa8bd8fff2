//! The threads of an engine's runtime, by kernel thread id: a volume
//! handed over to a migration's destination closes its engine behind
//! (`close.rs`), and that close must not take the CPU from the
//! destination's open on the same host, which the guest waits for. The
//! reclaimer lowers its own thread's priority the same way (`reclaim.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The nice value of work nothing waits for: the reclaimer, an engine
/// closing behind a hand-over. It runs when the threads that serve a
/// guest (and, on a shared host, the guests' vCPUs) do not need the CPU.
pub const BACKGROUND_NICE: libc::c_int = 19;

/// Give thread `tid` of this process [`BACKGROUND_NICE`] (Linux keeps a
/// nice value per thread; raising it needs no privilege). A failure
/// costs nothing but priority, so it is logged.
pub fn lower_priority(tid: libc::pid_t) {
    // SAFETY: setpriority only reads its integer arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) };
    if rc != 0 {
        tracing::debug!(tid, error = %std::io::Error::last_os_error(), "lowering a thread's priority failed");
    }
}

/// The calling thread's kernel id.
pub fn current() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The threads a runtime runs, kept up to date by its start and stop
/// hooks ([`EngineThreads::started`], [`EngineThreads::stopped`]).
#[derive(Default)]
pub struct EngineThreads {
    ids: Mutex<Vec<libc::pid_t>>,
    /// Set by [`lower_all`](Self::lower_all): threads started later
    /// lower their own priority.
    lowered: AtomicBool,
}

impl EngineThreads {
    fn ids(&self) -> std::sync::MutexGuard<'_, Vec<libc::pid_t>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A thread of the runtime starts (on that thread).
    pub fn started(&self) {
        let tid = current();
        let mut ids = self.ids();
        if self.lowered.load(Ordering::Acquire) {
            lower_priority(tid);
        }
        ids.push(tid);
    }

    /// A thread of the runtime ends (on that thread): its id may be
    /// another thread's later.
    pub fn stopped(&self) {
        let tid = current();
        self.ids().retain(|&t| t != tid);
    }

    /// Give every thread of the runtime, and those to come,
    /// [`BACKGROUND_NICE`].
    pub fn lower_all(&self) {
        let ids = self.ids();
        self.lowered.store(true, Ordering::Release);
        for &tid in ids.iter() {
            lower_priority(tid);
        }
    }

    /// How many threads are known (tests).
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.ids().len()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::Arc;

    /// The nice value of thread `tid` of this process (field 19 of its
    /// `stat`, counted after the ")" that ends field 2).
    pub(in crate::store::engine) fn nice_of(tid: libc::pid_t) -> Option<i64> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        rest.split_whitespace().nth(16)?.parse().ok()
    }

    #[test]
    fn every_thread_of_a_lowered_runtime_runs_at_the_lowest_priority() {
        let threads = Arc::new(EngineThreads::default());
        let (start, stop) = (threads.clone(), threads.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(move || start.started())
            .on_thread_stop(move || stop.stopped())
            .build()
            .unwrap();
        // A worker and a blocking thread before, a blocking one after.
        let before = rt.block_on(async {
            let worker = tokio::spawn(async { current() }).await.unwrap();
            let blocking = tokio::task::spawn_blocking(current).await.unwrap();
            (worker, blocking)
        });
        assert!(threads.count() >= 3, "{} threads known", threads.count());
        assert_eq!(nice_of(before.0), Some(0));
        threads.lower_all();
        assert_eq!(nice_of(current()), Some(0), "the caller was lowered");
        // Two blocking tasks that wait for each other run on two threads
        // at once: at most one is the idle thread from before.
        let after = rt.block_on(async {
            let both = Arc::new(std::sync::Barrier::new(2));
            let tasks: Vec<_> = (0..2)
                .map(|_| {
                    let both = both.clone();
                    tokio::task::spawn_blocking(move || {
                        both.wait();
                        (current(), nice_of(current()))
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        for tid in [before.0, before.1] {
            assert_eq!(
                nice_of(tid),
                Some(i64::from(BACKGROUND_NICE)),
                "thread {tid}"
            );
        }
        assert!(
            after
                .iter()
                .any(|(tid, _)| ![before.0, before.1].contains(tid)),
            "no thread started after: {after:?}"
        );
        for (tid, nice) in &after {
            assert_eq!(*nice, Some(i64::from(BACKGROUND_NICE)), "thread {tid}");
        }
        drop(rt);
        assert_eq!(threads.count(), 0, "ended threads are still known");
    }
}
