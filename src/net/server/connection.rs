//! One authenticated connection's requests: read in frame order, served
//! on blocking threads, answered through one writer task.
//!
//! Every reply holds its request's permits (the connection's in-flight
//! bound and its share of the server's) until it is written, so the
//! reply channel never holds more than its capacity and a request's
//! thread hands its reply over without ever waiting: a peer that stops
//! reading holds its own permits and socket, never a thread. A peer that
//! reads no reply for `idle_timeout` is closed, its queued replies
//! dropped with their permits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use super::handshake::Session;
use super::staging::{Staging, Step};
use super::{answer, next_request, ConnError, Shared};
use crate::net::proto::msg::{ErrorCode, Request, Response};
use crate::net::proto::{write_frame, Frame};
use crate::net::tls::BoxIo;

/// A reply on its way to the connection's writer, with the permits of
/// the request it answers: they go once it is written, so a connection's
/// replies queued and requests in service together stay within its
/// in-flight bound (and its share of the server's), whatever the peer
/// reads.
struct Outgoing {
    frame: Frame,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// Serve the requests of `session` on this connection until the peer
/// closes it, goes idle or stops reading.
pub(super) async fn serve_requests(
    mut rd: ReadHalf<BoxIo>,
    wr: WriteHalf<BoxIo>,
    session: Session,
    shared: &Shared,
    peer: SocketAddr,
) -> Result<(), ConnError> {
    let stored = session.stored;
    let cfg = &shared.cfg;
    // The session is alive while this connection is open and sends frames
    // (the writer lease, `writer.rs`).
    let present = session.volume.connected(stored, session.session, peer);

    let (tx, rx) = mpsc::channel::<Outgoing>(cfg.max_in_flight as usize);
    let writer = tokio::spawn(write_replies(wr, rx, cfg.idle_timeout));
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight as usize));
    // An answer the loop gives itself takes a permit as a request does.
    let answer_now = |frame: Frame| {
        let (tx, in_flight) = (tx.clone(), Arc::clone(&in_flight));
        async move {
            let permit = in_flight.acquire_owned().await.ok()?;
            tx.send(Outgoing {
                frame,
                _permits: (permit, None),
            })
            .await
            .ok()
        }
    };
    let mut staging = Staging::new(Arc::clone(&shared.staged_bytes));
    let mut pruned = 0u64;
    let result = loop {
        // A timeout here abandons a frame half read: the connection closes
        // either way (the replies still in flight go out first). So does
        // a writer that gave up on the peer.
        let next = tokio::select! {
            n = tokio::time::timeout(cfg.idle_timeout, next_request(&mut rd)) => n,
            () = tx.closed() => break Ok(()),
        };
        let next = match next {
            Err(_) => break Err(ConnError::Idle(cfg.idle_timeout)),
            Ok(n) => n,
        };
        let (id, req) = match next {
            Ok(Some(r)) => {
                present.seen();
                r
            }
            Ok(None) => break Ok(()),
            Err(e) => {
                // Tell the peer why before closing: a desynchronised stream
                // cannot be trusted further.
                let _ =
                    answer_now(Response::error(ErrorCode::BadRequest, e.to_string()).to_frame(0))
                        .await;
                break Err(e.into());
            }
        };
        // Stages are taken here, in frame order, before the next frame is
        // read: a transaction finds every stage its client sent before it.
        let req = match staging.step(req, || session.volume.is_writer(stored)) {
            Step::Serve(req) => req,
            Step::Answer(resp) => {
                if answer_now(resp.to_frame(id)).await.is_none() {
                    break Ok(());
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break Ok(());
        };
        let Ok(global) = Arc::clone(&shared.requests).acquire_owned().await else {
            break Ok(());
        };
        let prune_below = match &req {
            Request::Txn { low_water, .. } if *low_water >= pruned + 64 => {
                pruned = *low_water;
                Some(*low_water)
            }
            _ => None,
        };
        let (volume, tx) = (Arc::clone(&session.volume), tx.clone());
        let permits = (permit, Some(global));
        let _detached = tokio::task::spawn_blocking(move || {
            serve_one(&volume, stored, prune_below, id, req, permits, &tx);
        });
    };
    // The session's connection is gone from the lease before the client
    // sees the stream end (`Conn::close` waits for that).
    drop((tx, present));
    let written = writer.await.unwrap_or(Ok(()));
    drop(session);
    result.and(written)
}

/// The connection's writer: replies in the order they were queued, whole
/// frames; ends when the loop is done, the peer is gone, or a reply could
/// not be written within `timeout` (a peer that reads nothing).
async fn write_replies(
    mut wr: WriteHalf<BoxIo>,
    mut rx: mpsc::Receiver<Outgoing>,
    timeout: Duration,
) -> Result<(), ConnError> {
    while let Some(out) = rx.recv().await {
        match tokio::time::timeout(timeout, write_frame(&mut wr, &out.frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Ok(()),
            Err(_) => return Err(ConnError::NotReading(timeout)),
        }
        // A Read answer's payload is a pooled buffer: the next one writes
        // over it (`net/buffers.rs`).
        crate::net::buffers::give(out.frame.payload);
    }
    Ok(())
}

/// Serve one request on a blocking thread, which queues the answer
/// itself: no task waits for it only to pass it on (a wake-up fewer per
/// request, most of a small read's cost on these machines).
fn serve_one(
    volume: &super::Served,
    stored: u64,
    prune_below: Option<u64>,
    id: u64,
    req: Request,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    tx: &mpsc::Sender<Outgoing>,
) {
    if let Some(below) = prune_below {
        if let Err(e) = volume.store.prune_applied(stored, below) {
            warn!(error = %crate::ErrorChain(&e), "could not prune applied records");
        }
    }
    let served = std::panic::AssertUnwindSafe(|| answer(volume, stored, req, id));
    let resp = std::panic::catch_unwind(served).unwrap_or_else(|_| {
        Response::error(ErrorCode::Io, "request task failed: it panicked").to_frame(id)
    });
    // Never waits: the permits this reply holds are one of the channel's
    // slots. A closed channel (the peer is gone) drops it.
    let out = Outgoing {
        frame: resp,
        _permits: permits,
    };
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(out) {
        warn!("a reply found its connection's queue full; dropped (a bug)");
    }
}
