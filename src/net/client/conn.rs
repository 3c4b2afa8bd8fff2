//! One authenticated connection to a store server: a task writes every
//! request's frame, a task reads the answers and hands each to its waiter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::net::proto::msg::{Request, Response};
use crate::net::proto::{read_frame, write_frame, Frame, MAX_PAYLOAD};
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

/// One authenticated connection to a server.
pub(super) struct Conn {
    pub(super) server: String,
    pub(super) tx: mpsc::Sender<Frame>,
    pub(super) pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>,
    pub(super) next_id: AtomicU64,
    pub(super) alive: Arc<AtomicBool>,
    pub(super) slots: tokio::sync::Semaphore,
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
        let (tx, mut rx) = mpsc::channel::<Frame>(256);
        let writer_alive = Arc::clone(&alive);
        let closing = Arc::new(tokio::sync::Notify::new());
        let close = Arc::clone(&closing);
        tokio::spawn(async move {
            loop {
                let f = tokio::select! {
                    f = rx.recv() => f,
                    () = close.notified() => None,
                };
                let Some(f) = f else { break };
                if write_frame(&mut wr, &f).await.is_err() {
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
                    Ok(Some(f)) => match Response::from_frame(&f) {
                        Ok(r) => {
                            let waiter = reader_pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&f.request_id);
                            if let Some(w) = waiter {
                                let _ = w.send(r);
                            }
                        }
                        Err(e) => {
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
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Attempt::Retry("connection closed".into()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let frame = req.to_frame(id);
        if frame.payload.len() > MAX_PAYLOAD as usize {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(Attempt::Fail(StoreError::Io(std::io::Error::other(
                "request larger than the protocol allows",
            ))));
        }
        if self.tx.send(frame).await.is_err() {
            return Err(Attempt::Retry(format!(
                "connection to {} closed",
                self.server
            )));
        }
        match tokio::time::timeout(timeout, rx).await {
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
