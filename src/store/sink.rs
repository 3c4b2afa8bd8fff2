//! Where transactions go: the seam between the transaction layer and a
//! store. A [`Sink`] takes one attempt at delivering one transaction to one
//! server and reports the durable ack or why it failed; the transaction layer
//! decides about resending, backoff and failover.
//!
//! Contract: `send` resolves `Ok` only once the transaction is durable on
//! that server, and a transaction sent again with the same `(session,
//! txn_id)` is applied at most once (the store's exactly-once records). A
//! sink never retries on its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

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
}

/// A boxed future, for the dyn-compatible trait.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Ack, SendError>> + Send + 'a>>;

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
}

fn classify(e: &StoreError) -> SendError {
    let msg = crate::ErrorChain(e).to_string();
    match e {
        StoreError::NoSpace => SendError::NoSpace(msg),
        StoreError::Corrupt(_) => SendError::Refused(msg),
        StoreError::Fenced => SendError::Elsewhere(msg),
        StoreError::Io(_) => SendError::Retry(msg),
    }
}

/// The embedded engine (or `mem:`) as a sink: the ack is the engine's
/// durable commit.
pub struct EngineSink {
    store: Arc<dyn OnceStore>,
    session: u64,
}

impl EngineSink {
    /// A sink into `store` with a fresh random session.
    pub fn new(store: Arc<dyn OnceStore>) -> std::io::Result<EngineSink> {
        let mut session = [0u8; 8];
        getrandom::fill(&mut session).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(EngineSink {
            store,
            session: u64::from_le_bytes(session),
        })
    }
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
            let result = tokio::task::spawn_blocking(move || {
                let outcome = store.commit_once(session, txn_id, txn)?;
                if low_water > 0 && txn_id % 256 == 0 {
                    store.prune_applied(session, low_water)?;
                }
                Ok::<_, StoreError>(Ack {
                    epoch: store.epoch(),
                    duplicate: outcome.duplicate,
                })
            })
            .await
            .map_err(|e| SendError::Retry(format!("commit task failed: {e}")))?;
            result.map_err(|e| classify(&e))
        })
    }
}
