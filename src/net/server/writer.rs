//! The writer claim of a served volume (`docs/protocol.md`, "Writer
//! claim"): the one client session that may write to it. A daemon claims
//! the volume when it opens it for writing ([`Request::Claim`]); from then
//! on every write of every other session (a migration source that hung, a
//! daemon that was taken over) is refused with [`ErrorCode::NotWriter`],
//! and never applied. The claim is recorded in the volume
//! ([`OnceStore::set_writer_claim`]) before it is answered, so a restarted
//! server, or another server that takes the volume over, keeps it.
//!
//! Writes run under a read lock of the claim and a claim takes it for
//! writing: once a claim is answered, no write of the session it superseded
//! is still being applied. A write is refused only after the claim was
//! written again: a server that another one took the volume over from
//! (whose claim may be stale) fails that write and answers `Fenced`.
//!
//! [`Request::Claim`]: crate::net::proto::msg::Request::Claim

use std::sync::{Arc, RwLock};

use tracing::info;

use crate::net::proto::msg::{ErrorCode, Response};
use crate::ratelimit::{limited, PEER_LINES_SUPPRESSED};
use crate::store::{OnceStore, StoreError, WriterClaim};

/// A volume as the server serves it: the store and its writer claim.
pub struct Served {
    pub store: Arc<dyn OnceStore>,
    writer: RwLock<Option<WriterClaim>>,
}

impl Served {
    /// Serve `store` under the claim it recorded.
    pub fn new(store: Arc<dyn OnceStore>) -> Result<Served, StoreError> {
        let writer = store.writer_claim()?;
        Ok(Served {
            store,
            writer: RwLock::new(writer),
        })
    }

    /// The claim now (logs, tests).
    pub fn writer(&self) -> Option<WriterClaim> {
        *self.writer.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Make `session` the volume's writer; the new claim's number.
    pub fn claim(&self, session: u64) -> Result<u64, StoreError> {
        let mut writer = self.writer.write().unwrap_or_else(|e| e.into_inner());
        let before = *writer;
        let claim = WriterClaim {
            claim: before.map_or(1, |c| c.claim.saturating_add(1)),
            session,
        };
        self.store.set_writer_claim(claim)?;
        *writer = Some(claim);
        info!(
            claim = claim.claim,
            session = format_args!("{session:016x}"),
            superseded = ?before.filter(|b| b.session != session).map(|b| format!("{:016x}", b.session)),
            "volume claimed for writing"
        );
        Ok(claim.claim)
    }

    /// Run the write `apply` for `session` if it holds the claim, under the
    /// claim's read lock; otherwise refuse it with `NotWriter`.
    pub fn write(
        &self,
        session: u64,
        apply: impl FnOnce(&dyn OnceStore) -> Result<Response, StoreError>,
    ) -> Result<Response, StoreError> {
        let writer = self.writer.read().unwrap_or_else(|e| e.into_inner());
        match *writer {
            Some(c) if c.session == session => apply(&*self.store),
            held => {
                // Refuse only as the volume's server: write the claim
                // again (the same, or "none" as claim 0), which fails with
                // `Fenced` on a server another one took the volume from,
                // whose claim may be stale; the client then goes there.
                self.store.set_writer_claim(held.unwrap_or(WriterClaim {
                    claim: 0,
                    session: 0,
                }))?;
                let why = match held {
                    Some(c) => format!(
                        "volume claimed for writing by another session (claim {}): this session \
                         may not write to it any more",
                        c.claim
                    ),
                    None => "no writer claimed the volume: send Claim before writing \
                             (protocol version 3)"
                        .to_owned(),
                };
                limited!(
                    PEER_LINES_SUPPRESSED,
                    WARN,
                    session = format_args!("{session:016x}"),
                    why = %why,
                    "write refused"
                );
                Ok(Response::error(ErrorCode::NotWriter, why))
            }
        }
    }
}
