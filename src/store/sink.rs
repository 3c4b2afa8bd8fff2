//! Where transactions go: the seam between the transaction layer and a
//! store. A [`Sink`] takes one attempt at delivering one transaction to one
//! server and reports the durable ack or why it failed; the transaction layer
//! decides about resending, backoff and failover.
//!
//! Contract: `send` resolves `Ok` only once the transaction is durable on
//! that server, and a transaction sent again with the same `(session,
//! txn_id)` is applied at most once (the store's exactly-once records). A
//! sink never retries on its own.
//!
//! A sink whose attempts run on threads of its own may also offer
//! [`Sink::send_then`]: the thread that finishes the attempt reports it
//! itself, so the ack reaches the transaction layer (and the fsync waiting
//! for it) without a hop through the layer's runtime. [`EngineSink`] does:
//! its commits run on `pohmelfs-commit` threads.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use thiserror::Error;

use super::{OnceStore, StoreError, Txn};

/// A durable acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The server's durability epoch when it acknowledged.
    pub epoch: u64,
    /// The transaction had been applied before (a resend).
    pub duplicate: bool,
}

/// Why one attempt failed, and so what to do next.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SendError {
    /// Try the same server again (after a backoff).
    #[error("retry: {0}")]
    Retry(String),
    /// This server cannot take it (fenced, shutting down, unreachable): go to
    /// the next one.
    #[error("go elsewhere: {0}")]
    Elsewhere(String),
    /// The store refused the transaction itself (corrupt volume): resending
    /// elsewhere will not help soon; keep it and report.
    #[error("refused: {0}")]
    Refused(String),
    /// The volume has no room for the transaction; none of it was applied.
    #[error("no space: {0}")]
    NoSpace(String),
    /// Another daemon claimed the volume for writing (a `pohmel://` writer
    /// claim): nothing of this sender's will be applied again. Final.
    #[error("superseded: {0}")]
    Superseded(String),
}

/// A boxed future, for the dyn-compatible trait.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Ack, SendError>> + Send + 'a>>;

/// Where [`Sink::send_then`] reports an attempt, on the thread that
/// finished it.
pub type OnDone = Box<dyn FnOnce(Result<Ack, SendError>) + Send>;

/// One attempt at delivering a transaction. See the module contract.
pub trait Sink: Send + Sync + 'static {
    /// How many servers there are to fail over between (at least 1).
    fn servers(&self) -> usize;
    /// A name for logs.
    fn server_name(&self, server: usize) -> String;
    /// The client session transaction ids belong to.
    fn session(&self) -> u64;
    /// Deliver `txn` to `server`.
    fn send(&self, server: usize, txn_id: u64, low_water: u64, txn: Txn) -> SendFuture<'_>;

    /// Deliver `txn` to `server` on a thread of the sink's own, which
    /// calls `done` with the result (the contract of `send`, and no
    /// timeout: the attempt ends when the store answers). A sink without
    /// such threads hands both back, and the caller uses `send`.
    #[allow(clippy::type_complexity)]
    fn send_then(
        &self,
        server: usize,
        txn_id: u64,
        low_water: u64,
        txn: Txn,
        done: OnDone,
    ) -> Result<(), (Txn, OnDone)> {
        let _ = (server, txn_id, low_water);
        Err((txn, done))
    }
}

fn classify(e: &StoreError) -> SendError {
    let msg = crate::ErrorChain(e).to_string();
    match e {
        // The medium's own ENOSPC too: retrying at once would only spin.
        StoreError::NoSpace => SendError::NoSpace(msg),
        StoreError::Io(_) if e.is_no_space() => SendError::NoSpace(msg),
        StoreError::Corrupt(_) | StoreError::ReadOnly => SendError::Refused(msg),
        StoreError::Fenced => SendError::Elsewhere(msg),
        StoreError::Io(_) => SendError::Retry(msg),
    }
}

/// The embedded engine (or `mem:`) as a sink: the ack is the engine's
/// durable commit. Commits run on `pohmelfs-commit` threads, which report
/// each attempt themselves ([`Sink::send_then`]): a thread per commit in
/// flight (up to [`COMMIT_THREADS_MAX`]), so that concurrent commits
/// share the commit log's records.
pub struct EngineSink {
    store: Arc<dyn OnceStore>,
    session: u64,
    committers: Committers,
}

/// The most threads an [`EngineSink`] commits on (the layer's default
/// bound of transactions in flight).
pub const COMMIT_THREADS_MAX: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run commits, started as commits find none idle; they end
/// once the sink is dropped and the jobs queued before are done.
struct Committers {
    jobs: mpsc::Sender<Job>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// Threads waiting for a job, and jobs no thread has taken yet.
    idle: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    threads: AtomicUsize,
}

impl Committers {
    fn new() -> Committers {
        let (jobs, queue) = mpsc::channel();
        Committers {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            idle: Arc::new(AtomicUsize::new(0)),
            queued: Arc::new(AtomicUsize::new(0)),
            threads: AtomicUsize::new(0),
        }
    }

    /// Whether a thread will take a job: one is idle and not yet spoken
    /// for, or was started now (false only when none runs and none could
    /// be started). A commit queued behind another waits for it to end,
    /// so each gets a thread of its own, up to the bound.
    fn ready(&self) -> bool {
        if self.idle.load(Ordering::Acquire) > self.queued.load(Ordering::Acquire)
            || self.threads.load(Ordering::Acquire) >= COMMIT_THREADS_MAX
        {
            return true;
        }
        let queue = Arc::clone(&self.queue);
        let (idle, queued) = (Arc::clone(&self.idle), Arc::clone(&self.queued));
        let started = std::thread::Builder::new()
            .name("pohmelfs-commit".into())
            .spawn(move || committer(&queue, &idle, &queued));
        match started {
            Ok(_) => {
                self.threads.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "starting a commit thread failed");
                // The threads there are take it, behind their commits.
                self.threads.load(Ordering::Acquire) > 0
            }
        }
    }

    /// Queue `job` for the committer threads (after [`Committers::ready`]).
    fn run(&self, job: Job) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        // The queue's receiver lives as long as `self`, so this cannot fail;
        // should it, the job still runs, on a thread of its own.
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            std::thread::spawn(job);
        }
    }
}

/// A committer thread: run jobs until the sink is dropped.
fn committer(queue: &Mutex<mpsc::Receiver<Job>>, idle: &AtomicUsize, queued: &AtomicUsize) {
    loop {
        idle.fetch_add(1, Ordering::AcqRel);
        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
        idle.fetch_sub(1, Ordering::AcqRel);
        match job {
            Ok(job) => {
                queued.fetch_sub(1, Ordering::AcqRel);
                job();
            }
            Err(_) => return,
        }
    }
}

impl EngineSink {
    /// A sink into `store` with a fresh random session.
    pub fn new(store: Arc<dyn OnceStore>) -> std::io::Result<EngineSink> {
        let mut session = [0u8; 8];
        getrandom::fill(&mut session).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(EngineSink {
            store,
            session: u64::from_le_bytes(session),
            committers: Committers::new(),
        })
    }
}

/// Commit `txn` once and prune now and then; blocks.
fn commit(
    store: &dyn OnceStore,
    session: u64,
    txn_id: u64,
    low_water: u64,
    txn: Txn,
) -> Result<Ack, SendError> {
    let done = (|| {
        let outcome = store.commit_once(session, txn_id, txn)?;
        if low_water > 0 && txn_id % 256 == 0 {
            store.prune_applied(session, low_water)?;
        }
        Ok::<_, StoreError>(Ack {
            epoch: store.epoch(),
            duplicate: outcome.duplicate,
        })
    })();
    done.map_err(|e| classify(&e))
}

impl Sink for EngineSink {
    fn servers(&self) -> usize {
        1
    }

    fn server_name(&self, _server: usize) -> String {
        self.store.describe()
    }

    fn session(&self) -> u64 {
        self.session
    }

    fn send(&self, _server: usize, txn_id: u64, low_water: u64, txn: Txn) -> SendFuture<'_> {
        let (store, session) = (Arc::clone(&self.store), self.session);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || commit(&*store, session, txn_id, low_water, txn))
                .await
                .map_err(|e| SendError::Retry(format!("commit task failed: {e}")))?
        })
    }

    fn send_then(
        &self,
        _server: usize,
        txn_id: u64,
        low_water: u64,
        txn: Txn,
        done: OnDone,
    ) -> Result<(), (Txn, OnDone)> {
        if !self.committers.ready() {
            return Err((txn, done));
        }
        let (store, session) = (Arc::clone(&self.store), self.session);
        self.committers.run(Box::new(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                commit(&*store, session, txn_id, low_water, txn)
            }))
            .unwrap_or_else(|_| Err(SendError::Retry("commit panicked".into())));
            done(result);
        }));
        Ok(())
    }
}
