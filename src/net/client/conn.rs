//! One authenticated connection to a store server: a task writes every
//! request's frame, a task reads the answers and hands each to its waiter.
//!
//! Every wait is bounded by the request's timeout: a request queues, and
//! is answered, within it, and a frame that the server does not take
//! within the write bound (a server that stopped reading) ends the
//! connection, its socket closed and the frames queued behind it
//! dropped; the requests waiting on it are resent on another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::net::proto::msg::{Request, Response, Stage};
use crate::net::proto::{read_frame, write_frame, write_stage, Frame, MAX_PAYLOAD};
use crate::net::tls::BoxIo;
use crate::ratelimit::{limited, Capped, PEER_LINES_SUPPRESSED};
use crate::store::StoreError;

/// Why one attempt at a request failed.
pub(super) enum Attempt {
    /// Try again, here or elsewhere.
    Retry(String),
    /// A final answer for the caller.
    Fail(StoreError),
}

/// What the writer task sends: an encoded frame, or a stage whose data
/// goes out with vectored writes, never copied into a frame.
pub(super) enum Outgoing {
    Frame(Frame),
    Stage(u64, Stage),
}

/// A request written to the connection, its answer still to come.
pub(super) struct Submitted<'a> {
    pub(super) id: u64,
    rx: oneshot::Receiver<Response>,
    _slot: Option<tokio::sync::SemaphorePermit<'a>>,
}

/// One authenticated connection to a server.
pub(super) struct Conn {
    pub(super) server: String,
    pub(super) tx: mpsc::Sender<Outgoing>,
    pub(super) pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>,
    pub(super) next_id: AtomicU64,
    pub(super) alive: Arc<AtomicBool>,
    pub(super) slots: tokio::sync::Semaphore,
    /// Stage ids of this connection (the server holds stages per
    /// connection).
    pub(super) next_stage: AtomicU64,
    /// Bytes of staged data the server may hold for this connection, a
    /// permit each: a staged transaction takes its bytes' worth before it
    /// stages anything, so the server's bound is never met.
    pub(super) staging: tokio::sync::Semaphore,
    /// Tells the writer task to end the stream ([`Conn::close`]).
    closing: Arc<tokio::sync::Notify>,
    /// Ends when the server closed the connection.
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What the writer task shares with the connection and its reader.
struct Ends {
    server: String,
    alive: Arc<AtomicBool>,
    /// [`Conn::close`]: end the stream.
    closing: Arc<tokio::sync::Notify>,
    /// Told when the writer gave up on a server that takes no data.
    dead: Arc<tokio::sync::Notify>,
}

/// The writer task: every frame queued on `rx`, in order, each within
/// `bound`; then the end of the stream.
async fn write_out(
    ends: Ends,
    mut rx: mpsc::Receiver<Outgoing>,
    mut wr: WriteHalf<BoxIo>,
    bound: Duration,
) {
    let mut stalled = false;
    loop {
        let out = tokio::select! {
            out = rx.recv() => out,
            () = ends.closing.notified() => None,
        };
        let Some(out) = out else { break };
        let written = tokio::time::timeout(bound, async {
            match &out {
                Outgoing::Frame(f) => write_frame(&mut wr, f).await,
                Outgoing::Stage(id, stage) => write_stage(&mut wr, *id, stage).await,
            }
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    ends.alive.store(false, Ordering::Release);
    // Frames queued behind are dropped with `rx`, here.
    drop(rx);
    if stalled {
        limited!(
            PEER_LINES_SUPPRESSED,
            WARN,
            server = %ends.server,
            bound = ?bound,
            "the store took no data for a frame within the bound; reconnecting"
        );
        ends.dead.notify_one();
        return;
    }
    // The end of the stream: the server answers it by closing. A server
    // that reads nothing cannot hold this up for long.
    if tokio::time::timeout(bound, wr.shutdown()).await.is_err() {
        ends.dead.notify_one();
    }
}

impl Conn {
    /// A connection over a stream that passed the handshake: one task
    /// writes the frames of every request, one reads the answers and hands
    /// each to its waiter; `slots` requests may be in flight. A frame not
    /// written within `write_bound` ends the connection.
    pub(super) fn start(
        server: &str,
        mut rd: ReadHalf<BoxIo>,
        wr: WriteHalf<BoxIo>,
        slots: usize,
        write_bound: Duration,
    ) -> Conn {
        let alive = Arc::new(AtomicBool::new(true));
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>> = Arc::default();
        let (tx, rx) = mpsc::channel::<Outgoing>(256);
        let closing = Arc::new(tokio::sync::Notify::new());
        // Tells the reader that the writer gave up: the socket closes.
        let dead = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(write_out(
            Ends {
                server: server.to_string(),
                alive: Arc::clone(&alive),
                closing: Arc::clone(&closing),
                dead: Arc::clone(&dead),
            },
            rx,
            wr,
            write_bound,
        ));
        let (reader_alive, reader_pending, name) =
            (Arc::clone(&alive), Arc::clone(&pending), server.to_string());
        let reader = tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    frame = read_frame(&mut rd, MAX_PAYLOAD) => frame,
                    // The writer gave up: drop the read half, and with it
                    // (the write half gone already) the socket.
                    () = dead.notified() => break,
                };
                match frame {
                    Ok(Some(f)) => match (f.request_id, Response::from_owned_frame(f)) {
                        (request_id, Ok(r)) => {
                            let waiter = reader_pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&request_id);
                            if let Some(w) = waiter {
                                let _ = w.send(r);
                            }
                        }
                        (_, Err(e)) => {
                            limited!(
                                PEER_LINES_SUPPRESSED,
                                WARN,
                                server = %name,
                                error = %Capped(crate::ErrorChain(&e)),
                                "bad frame from store; reconnecting"
                            );
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        limited!(
                            PEER_LINES_SUPPRESSED,
                            WARN,
                            server = %name,
                            error = %Capped(crate::ErrorChain(&e)),
                            "store connection failed"
                        );
                        break;
                    }
                }
            }
            reader_alive.store(false, Ordering::Release);
            // Dropping the waiters tells every pending request to resend.
            reader_pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        });
        Conn {
            server: server.to_string(),
            tx,
            pending,
            next_id: AtomicU64::new(1),
            alive,
            slots: tokio::sync::Semaphore::new(slots),
            next_stage: AtomicU64::new(1),
            staging: tokio::sync::Semaphore::new(crate::net::proto::STAGED_BYTES_MAX as usize),
            closing,
            reader: Mutex::new(Some(reader)),
        }
    }

    /// End the stream and wait, at most `bound`, until the server closed
    /// it too: by then it no longer counts this connection (its writer
    /// lease, `net::server::writer`), so another daemon may claim the
    /// volume at once.
    pub(super) async fn close(&self, bound: Duration) {
        self.alive.store(false, Ordering::Release);
        self.closing.notify_one();
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reader) = reader {
            let _ = tokio::time::timeout(bound, reader).await;
        }
    }

    pub(super) async fn request(
        &self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, Attempt> {
        self.request_frame(req.to_frame(0), timeout).await
    }

    /// As [`Conn::request`], the request already encoded (its id is set
    /// here). Queued and answered within `timeout`.
    pub(super) async fn request_frame(
        &self,
        frame: Frame,
        timeout: Duration,
    ) -> Result<Response, Attempt> {
        let deadline = Instant::now() + timeout;
        let sent = self
            .submit(deadline, |id| {
                Outgoing::Frame(Frame {
                    request_id: id,
                    ..frame
                })
            })
            .await?;
        let left = deadline.saturating_duration_since(Instant::now());
        self.answer(sent, left).await
    }

    /// Take a slot and queue the request `make` builds for its id, in
    /// order after every request submitted before, by `deadline`; its
    /// answer is [`Conn::answer`].
    pub(super) async fn submit(
        &self,
        deadline: Instant,
        make: impl FnOnce(u64) -> Outgoing,
    ) -> Result<Submitted<'_>, Attempt> {
        let slot = tokio::time::timeout_at(deadline.into(), self.slots.acquire())
            .await
            .map_err(|_| self.not_queued())?
            .map_err(|_| Attempt::Retry("connection closed".into()))?;
        let mut sent = self.submit_unslotted(deadline, make).await?;
        sent._slot = Some(slot);
        Ok(sent)
    }

    /// Why a request did not queue by its deadline: every slot taken, or
    /// the writer stalled behind a server that reads nothing.
    fn not_queued(&self) -> Attempt {
        Attempt::Retry(format!(
            "{} took no request within the timeout",
            self.server
        ))
    }

    /// As [`Conn::submit`], without a request slot: for requests bounded
    /// otherwise (stages, by the staging room).
    pub(super) async fn submit_unslotted(
        &self,
        deadline: Instant,
        make: impl FnOnce(u64) -> Outgoing,
    ) -> Result<Submitted<'_>, Attempt> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let out = make(id);
        if let Outgoing::Frame(frame) = &out {
            if frame.payload.len() > MAX_PAYLOAD as usize {
                return Err(Attempt::Fail(StoreError::Io(std::io::Error::other(
                    "request larger than the protocol allows",
                ))));
            }
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let queued = tokio::time::timeout_at(deadline.into(), self.tx.send(out)).await;
        if !matches!(queued, Ok(Ok(()))) {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(match queued {
                Err(_) => self.not_queued(),
                Ok(_) => Attempt::Retry(format!("connection to {} closed", self.server)),
            });
        }
        Ok(Submitted {
            id,
            rx,
            _slot: None,
        })
    }

    /// Wait for the answer to a submitted request, at most `timeout`.
    pub(super) async fn answer(
        &self,
        sent: Submitted<'_>,
        timeout: Duration,
    ) -> Result<Response, Attempt> {
        let id = sent.id;
        match tokio::time::timeout(timeout, sent.rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Attempt::Retry(format!(
                "connection to {} lost",
                self.server
            ))),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(Attempt::Retry(format!(
                    "no answer from {} in {timeout:?}",
                    self.server
                )))
            }
        }
    }
}
