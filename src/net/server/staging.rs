//! One connection's staged write data (protocol version 4): the bytes of
//! [`Request::Stage`] frames, held until a [`Request::StagedTxn`] of the
//! same connection references them, which turns it into an ordinary
//! transaction for the volume.
//!
//! Stages are taken in the order their frames arrive, before the next
//! frame is read, so a transaction always finds the stages its client
//! sent before it. They live only as long as the connection: a client
//! that reconnects or fails over stages its data again
//! (`docs/protocol.md`, "Staged writes"). Bounded per connection
//! ([`STAGES_MAX`], [`STAGED_BYTES_MAX`]), across the server (the
//! `staged_bytes` semaphore) and in age ([`STAGE_LIFETIME`]): a stage no
//! transaction took in that time is dropped when room is needed.
//!
//! It never touches a volume and never blocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::net::proto::msg::{ErrorCode, Request, Response, Stage, StageRef};
use crate::net::proto::{STAGED_BYTES_MAX, STAGES_MAX};
use crate::store::{Op, Txn, WriteData};

/// How long an unreferenced stage is kept when room is needed.
pub(super) const STAGE_LIFETIME: Duration = Duration::from_secs(60);

/// A stage held for the connection.
struct Held {
    ino: u64,
    offset: u64,
    data: WriteData,
    at: Instant,
    /// Its bytes' share of the server-wide bound, given back on drop.
    _permit: OwnedSemaphorePermit,
}

/// What to do with a request after staging saw it.
pub(super) enum Step {
    /// Serve it as any request (a staged transaction comes back as a
    /// [`Request::Txn`] carrying its bytes).
    Serve(Request),
    /// Send this answer; nothing else to do.
    Answer(Response),
}

/// The stages of one connection.
pub(super) struct Staging {
    held: HashMap<u64, Held>,
    bytes: u64,
    /// Bytes staged across the server, one permit a byte.
    total: Arc<Semaphore>,
}

impl Staging {
    pub(super) fn new(total: Arc<Semaphore>) -> Staging {
        Staging {
            held: HashMap::new(),
            bytes: 0,
            total,
        }
    }

    /// Take a stage (only from the volume's writer, as `is_writer` says),
    /// resolve a staged transaction, or pass any other request on.
    pub(super) fn step(&mut self, req: Request, is_writer: impl FnOnce() -> bool) -> Step {
        match req {
            // A superseded session's bytes would sit in the staging room
            // until they expired; its transaction is refused anyway.
            Request::Stage(_) if !is_writer() => Step::Answer(Response::error(
                ErrorCode::NotWriter,
                "this session does not hold the volume's writer claim: it may not stage",
            )),
            Request::Stage(stage) => Step::Answer(self.stage(stage)),
            Request::StagedTxn {
                txn_id,
                low_water,
                txn,
                staged,
            } => match self.resolve(txn, &staged) {
                Ok(txn) => Step::Serve(Request::Txn {
                    txn_id,
                    low_water,
                    txn,
                }),
                Err(answer) => Step::Answer(answer),
            },
            req => Step::Serve(req),
        }
    }

    fn stage(&mut self, stage: Stage) -> Response {
        let len = stage.data.len() as u64;
        if self.held.contains_key(&stage.stage_id) {
            return Response::error(ErrorCode::BadRequest, "stage id already held");
        }
        if !self.fits(len) {
            self.drop_expired();
        }
        if !self.fits(len) {
            return Response::error(
                ErrorCode::Busy,
                format!(
                    "connection holds {} stages of {} bytes (at most {STAGES_MAX} and \
                     {STAGED_BYTES_MAX} bytes)",
                    self.held.len(),
                    self.bytes
                ),
            );
        }
        // Bounded by MAX_STAGE on receive, so it fits a u32.
        let Ok(permits) = u32::try_from(len) else {
            return Response::error(ErrorCode::BadRequest, "stage too large");
        };
        let Ok(permit) = Arc::clone(&self.total).try_acquire_many_owned(permits) else {
            return Response::error(ErrorCode::Busy, "server holds its most staged bytes");
        };
        self.bytes += len;
        self.held.insert(
            stage.stage_id,
            Held {
                ino: stage.ino,
                offset: stage.offset,
                data: stage.data,
                at: Instant::now(),
                _permit: permit,
            },
        );
        Response::Staged {
            stage_id: stage.stage_id,
        }
    }

    fn fits(&self, len: u64) -> bool {
        self.held.len() < STAGES_MAX && self.bytes + len <= STAGED_BYTES_MAX
    }

    fn drop_expired(&mut self) {
        let now = Instant::now();
        let mut freed = 0;
        self.held.retain(|_, h| {
            let keep = now.duration_since(h.at) < STAGE_LIFETIME;
            if !keep {
                freed += h.data.len() as u64;
            }
            keep
        });
        self.bytes -= freed;
    }

    /// Fill the staged writes of `txn` with their stages' bytes. Every
    /// stage it names is consumed, whatever the outcome: a resend stages
    /// again.
    fn resolve(&mut self, mut txn: Txn, staged: &[StageRef]) -> Result<Txn, Response> {
        let mut missing = None;
        let mut mismatch = false;
        for r in staged {
            let held = self.held.remove(&r.stage_id);
            if let Some(h) = &held {
                self.bytes -= h.data.len() as u64;
            }
            match (held, txn.ops.get_mut(r.op as usize)) {
                (Some(h), Some(Op::Write { ino, offset, data })) => {
                    if h.ino != *ino || h.offset != *offset {
                        mismatch = true;
                    }
                    *data = h.data;
                }
                (None, _) => missing = missing.or(Some(r.stage_id)),
                // Validation made every reference name a write.
                (Some(_), _) => mismatch = true,
            }
        }
        if mismatch {
            return Err(Response::error(
                ErrorCode::BadRequest,
                "a staged write names another inode or offset than its stage",
            ));
        }
        if let Some(id) = missing {
            return Err(Response::error(
                ErrorCode::Unstaged,
                format!("stage {id} is not held by this connection: stage it again"),
            ));
        }
        Ok(txn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Txn;

    fn stage(id: u64, len: usize) -> Request {
        Request::Stage(Stage {
            stage_id: id,
            ino: 20,
            offset: 0,
            data: vec![7u8; len].into(),
        })
    }

    fn staged_txn(ids: &[u64]) -> Request {
        let mut txn = Txn::new();
        let mut staged = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            txn.push(Op::Write {
                ino: 20,
                offset: 0,
                data: WriteData::new(),
            });
            staged.push(StageRef {
                op: i as u32,
                stage_id: *id,
            });
        }
        Request::StagedTxn {
            txn_id: 1,
            low_water: 1,
            txn,
            staged,
        }
    }

    /// The session holds the writer claim.
    fn writer() -> bool {
        true
    }

    #[test]
    fn a_session_without_the_writer_claim_stages_nothing() {
        let total = Arc::new(Semaphore::new(1 << 20));
        let mut s = Staging::new(Arc::clone(&total));
        let Step::Answer(Response::Error { code, .. }) = s.step(stage(1, 1000), || false) else {
            panic!("a reader staged")
        };
        assert_eq!(code, ErrorCode::NotWriter);
        assert_eq!(total.available_permits(), 1 << 20, "nothing held");
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn a_staged_transaction_takes_its_stages_bytes_and_frees_them() {
        let total = Arc::new(Semaphore::new(1 << 20));
        let mut s = Staging::new(Arc::clone(&total));
        assert!(matches!(
            s.step(stage(5, 1000), writer),
            Step::Answer(Response::Staged { stage_id: 5 })
        ));
        assert_eq!(total.available_permits(), (1 << 20) - 1000);
        let Step::Serve(Request::Txn { txn, .. }) = s.step(staged_txn(&[5]), writer) else {
            panic!("not served")
        };
        let Op::Write { data, .. } = &txn.ops[0] else {
            panic!()
        };
        assert_eq!(data.contiguous().as_ref(), &[7u8; 1000][..]);
        assert_eq!(total.available_permits(), 1 << 20);
        assert_eq!(s.bytes, 0);
        // Consumed: a second reference finds nothing.
        let Step::Answer(Response::Error { code, .. }) = s.step(staged_txn(&[5]), writer) else {
            panic!("served without its stage")
        };
        assert_eq!(code, ErrorCode::Unstaged);
    }

    #[test]
    fn stages_beyond_the_bounds_are_refused_and_dropping_gives_back() {
        let total = Arc::new(Semaphore::new(3000));
        let mut s = Staging::new(Arc::clone(&total));
        assert!(matches!(
            s.step(stage(1, 2000), writer),
            Step::Answer(Response::Staged { .. })
        ));
        let Step::Answer(Response::Error { code, .. }) = s.step(stage(2, 2000), writer) else {
            panic!("over the server-wide bound")
        };
        assert_eq!(code, ErrorCode::Busy);
        let Step::Answer(Response::Error { code, .. }) = s.step(stage(1, 10), writer) else {
            panic!("a stage id twice")
        };
        assert_eq!(code, ErrorCode::BadRequest);
        drop(s);
        assert_eq!(
            total.available_permits(),
            3000,
            "a closed connection frees its stages"
        );
    }
}
