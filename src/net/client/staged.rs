//! Sending a transaction with staged writes (protocol version 4): the
//! bytes of its large writes go ahead as [`Request::Stage`] frames,
//! written without a copy, and the [`Request::StagedTxn`] after them
//! references the stages by id. Every frame of one attempt goes out on one
//! connection, in order, without waiting for an answer in between; the
//! stages' answers and the transaction's are awaited together.
//!
//! A resend is a new attempt: it stages everything again, under fresh
//! stage ids, on whichever connection it uses (the server holds stages
//! per connection and drops them with it), and resends the transaction
//! under its transaction id, so it still applies once.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::conn::{Attempt, Conn, Outgoing};
use crate::net::proto::msg::{Request, Response, Stage, StageRef};
use crate::net::proto::{Frame, MAX_PAYLOAD, MAX_STAGE, STAGED_BYTES_MAX};
use crate::store::{Op, Txn};

/// Writes of at least this many bytes are staged; smaller ones ride in
/// their transaction's frame.
pub(super) const STAGE_MIN_BYTES: usize = 32 << 10;

/// The ops of `txn` to stage, or `None` when it goes inline: it has no
/// large write, or more staged bytes than the server holds for a
/// connection.
pub(super) fn plan(txn: &Txn) -> Option<Vec<u32>> {
    let mut ops = Vec::new();
    let mut bytes = 0u64;
    for (i, op) in txn.ops.iter().enumerate() {
        if let Op::Write { data, .. } = op {
            if data.len() >= STAGE_MIN_BYTES && data.len() <= MAX_STAGE as usize {
                ops.push(u32::try_from(i).ok()?);
                bytes += data.len() as u64;
            }
        }
    }
    let fits = bytes <= STAGED_BYTES_MAX && ops.len() <= crate::net::proto::MAX_STAGED_REFS;
    (!ops.is_empty() && fits).then_some(ops)
}

/// `req`'s frame with its data inline, when that fits one frame: what
/// the client sends when the server has no room for its stages.
pub(super) fn inline_frame(req: &Request) -> Option<Frame> {
    // More data than a payload holds: not worth encoding.
    if let Request::Txn { txn, .. } = req {
        if txn.data_bytes() >= u64::from(MAX_PAYLOAD) {
            return None;
        }
    }
    let frame = req.to_frame(0);
    (frame.payload.len() <= MAX_PAYLOAD as usize).then_some(frame)
}

/// One attempt at `txn` on `conn`, staging the writes at `ops` (from
/// [`plan`]): the answer to the transaction, or why the attempt failed.
pub(super) async fn send(
    conn: &Conn,
    txn_id: u64,
    low_water: u64,
    txn: Txn,
    ops: &[u32],
    timeout: Duration,
) -> Result<Response, Attempt> {
    let deadline = Instant::now() + timeout;
    let bytes: u64 = ops
        .iter()
        .filter_map(|&i| match txn.ops.get(i as usize) {
            Some(Op::Write { data, .. }) => Some(data.len() as u64),
            _ => None,
        })
        .sum();
    // Within STAGED_BYTES_MAX (plan), so it fits a u32.
    let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
    let _room = tokio::time::timeout_at(deadline.into(), conn.staging.acquire_many(permits))
        .await
        .map_err(|_| Attempt::Retry(format!("no staging room on {} in {timeout:?}", conn.server)))?
        .map_err(|_| Attempt::Retry("connection closed".into()))?;
    let mut stages = Vec::with_capacity(ops.len());
    let mut staged = Vec::with_capacity(ops.len());
    for &i in ops {
        let Some(Op::Write { ino, offset, data }) = txn.ops.get(i as usize) else {
            continue;
        };
        let stage_id = conn.next_stage.fetch_add(1, Ordering::Relaxed);
        let stage = Stage {
            stage_id,
            ino: *ino,
            offset: *offset,
            data: data.clone(),
        };
        // Stages take no request slot: the server answers them as it
        // reads them, and the staging room above bounds them.
        stages.push(
            conn.submit_unslotted(deadline, |id| Outgoing::Stage(id, stage))
                .await?,
        );
        staged.push(StageRef { op: i, stage_id });
    }
    let req = Request::StagedTxn {
        txn_id,
        low_water,
        txn,
        staged,
    };
    let committed = conn
        .submit(deadline, |id| Outgoing::Frame(req.to_frame(id)))
        .await?;
    // A refused stage (the server's bound) makes the transaction's answer
    // `Unstaged`, which says what to do; the stage's own answer says why.
    let mut refused = None;
    for s in stages {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.answer(s, left).await? {
            Response::Staged { .. } => {}
            Response::Error { code, message } => {
                refused.get_or_insert(format!("{}: stage {code:?}: {message}", conn.server));
            }
            other => {
                return Err(Attempt::Retry(format!(
                    "{}: unexpected answer to a stage: {other:?}",
                    conn.server
                )))
            }
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    match (conn.answer(committed, left).await?, refused) {
        (Response::Error { code, message }, Some(why)) => Ok(Response::Error {
            code,
            message: format!("{message} ({why})"),
        }),
        (r, _) => Ok(r),
    }
}
