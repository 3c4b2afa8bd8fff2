//! One authenticated connection to a store server: a task writes every
//! request's frame, a task reads the answers and hands each to its waiter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

impl Conn {
    /// A connection over a stream that passed the handshake: one task
    /// writes the frames of every request, one reads the answers and hands
    /// each to its waiter; `slots` requests may be in flight.
    pub(super) fn start(
        server: &str,
        mut rd: ReadHalf<BoxIo>,
        mut wr: WriteHalf<BoxIo>,
        slots: usize,
    ) -> Conn {
        let alive = Arc::new(AtomicBool::new(true));
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>> = Arc::default();
        let (tx, mut rx) = mpsc::channel::<Outgoing>(256);
        let writer_alive = Arc::clone(&alive);
        let closing = Arc::new(tokio::sync::Notify::new());
        let close = Arc::clone(&closing);
        tokio::spawn(async move {
            loop {
                let out = tokio::select! {
                    out = rx.recv() => out,
                    () = close.notified() => None,
                };
                let Some(out) = out else { break };
                let written = match &out {
                    Outgoing::Frame(f) => write_frame(&mut wr, f).await,
                    Outgoing::Stage(id, stage) => write_stage(&mut wr, *id, stage).await,
                };
                if written.is_err() {
                    break;
                }
            }
            writer_alive.store(false, Ordering::Release);
            // The end of the stream: the server answers it by closing.
            let _ = wr.shutdown().await;
        });
        let (reader_alive, reader_pending, name) =
            (Arc::clone(&alive), Arc::clone(&pending), server.to_string());
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut rd, MAX_PAYLOAD).await {
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
    /// here).
    pub(super) async fn request_frame(
        &self,
        frame: Frame,
        timeout: Duration,
    ) -> Result<Response, Attempt> {
        let sent = self
            .submit(|id| {
                Outgoing::Frame(Frame {
                    request_id: id,
                    ..frame
                })
            })
            .await?;
        self.answer(sent, timeout).await
    }

    /// Take a slot and queue the request `make` builds for its id, in
    /// order after every request submitted before; its answer is
    /// [`Conn::answer`].
    pub(super) async fn submit(
        &self,
        make: impl FnOnce(u64) -> Outgoing,
    ) -> Result<Submitted<'_>, Attempt> {
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Attempt::Retry("connection closed".into()))?;
        let mut sent = self.submit_unslotted(make).await?;
        sent._slot = Some(slot);
        Ok(sent)
    }

    /// As [`Conn::submit`], without a request slot: for requests bounded
    /// otherwise (stages, by the staging room).
    pub(super) async fn submit_unslotted(
        &self,
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
        if self.tx.send(out).await.is_err() {
            return Err(Attempt::Retry(format!(
                "connection to {} closed",
                self.server
            )));
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
