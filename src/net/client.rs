//! `pohmel://host:port[,host:port...]/volume`: a volume served by one of a
//! list of `pohmelfs store` servers, reached over the wire protocol.
//!
//! Every transaction carries this client's session and a transaction id
//! that is monotonic per session and never wraps. Until its durable ack
//! arrives the transaction is kept, and on a timeout, a lost connection or
//! an error that says "go elsewhere" (fenced, busy, shutting down) it is
//! resent — with the same id, so the store applies it exactly once — to the
//! same server or the next one in the list. A transaction is never dropped
//! silently: after `give_up_after` the caller gets an error and decides.
//!
//! Requests from many threads share one connection; the store batches their
//! commits (group commit).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::net::proto::auth::{self, Side, Transcript};
use crate::net::proto::msg::{ErrorCode, Request, Response, TICKET_LEN};
use crate::net::proto::{read_frame, write_frame, MAX_PAYLOAD, MAX_READ, MAX_READDIR, VERSION};
use crate::net::tls::BoxIo;
use crate::ratelimit::{limited, Capped, PEER_LINES_SUPPRESSED};
use crate::store::sink::{Ack, SendError};
use crate::store::{Dirent, Inode, ReadData, ReadPiece, Store, StoreError, StoreStats, Txn};

mod claim;
mod config;
mod conn;
mod staged;

use conn::{Attempt, Conn};

pub use claim::ClaimError;
pub use config::RemoteConfig;

struct Inner {
    cfg: RemoteConfig,
    /// The session the first server issued (0 until then) and its ticket:
    /// every later connection resumes it, so resent transactions keep
    /// their identity across reconnects and failover.
    session: Mutex<(u64, [u8; TICKET_LEN])>,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    server_index: AtomicUsize,
    next_txn: AtomicU64,
    /// Transactions sent and not yet acknowledged: the smallest is the
    /// low-water mark the store may prune below.
    outstanding: Mutex<BTreeSet<u64>>,
    epoch: AtomicU64,
    /// Another session claimed the volume for writing (`NotWriter`): final,
    /// so later transactions fail here without going to a server.
    superseded: std::sync::atomic::AtomicBool,
    /// The keepalive task runs (started by the first granted claim).
    keeping_alive: std::sync::atomic::AtomicBool,
    /// That task, ended before the store is dropped.
    keepalive_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// [`RemoteStore::close`] began (it runs once).
    closing: std::sync::atomic::AtomicBool,
    /// Closed ([`RemoteStore::close`]): no new connection is made, so
    /// nothing reaches the server after this daemon let the volume go.
    closed: std::sync::atomic::AtomicBool,
}

/// A volume on remote store servers.
pub struct RemoteStore {
    rt: tokio::runtime::Runtime,
    inner: Arc<Inner>,
}

impl RemoteStore {
    /// Connect to the first server that answers and authenticate.
    pub fn connect(cfg: RemoteConfig) -> Result<RemoteStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pohmelfs-remote")
            .enable_all()
            .build()
            .map_err(StoreError::Io)?;
        let inner = Arc::new(Inner {
            cfg,
            session: Mutex::new((0, [0; TICKET_LEN])),
            conn: tokio::sync::Mutex::new(None),
            server_index: AtomicUsize::new(0),
            next_txn: AtomicU64::new(1),
            outstanding: Mutex::new(BTreeSet::new()),
            epoch: AtomicU64::new(0),
            superseded: std::sync::atomic::AtomicBool::new(false),
            keeping_alive: std::sync::atomic::AtomicBool::new(false),
            keepalive_task: Mutex::new(None),
            closing: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        // Fail fast at start-up when no server is reachable at all.
        let first = Arc::clone(&inner);
        rt.block_on(async move {
            let mut last = String::new();
            for _ in 0..first.cfg.servers.len() {
                match first.connection().await {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        last = e;
                        first.next_server();
                    }
                }
            }
            Err(StoreError::Io(std::io::Error::other(format!(
                "no store server answered: {last}"
            ))))
        })?;
        Ok(RemoteStore { rt, inner })
    }

    /// The volume's durability epoch as the last handshake or ack
    /// reported it: it moves when a server reopens the volume.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    fn call(&self, req: Request) -> Result<Response, StoreError> {
        self.rt.block_on(self.inner.call(req))
    }

    /// Have the server remove the inodes unlinked while open before a
    /// crash, except `spare` (`Request::ReclaimOrphans`): what a daemon
    /// does when it opens the volume as its only writer. How many went.
    pub fn reclaim_orphans_except(&self, spare: &[u64]) -> Result<u64, StoreError> {
        if spare.len() > crate::net::proto::msg::MAX_SPARE {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} unlinked open inodes to spare, more than the protocol's {}",
                    spare.len(),
                    crate::net::proto::msg::MAX_SPARE
                ),
            )));
        }
        let spare = spare.to_vec();
        match self.call(Request::ReclaimOrphans { spare })? {
            Response::Removed { count } => Ok(count),
            r => Err(unexpected(r)),
        }
    }

    /// The servers, in failover order.
    pub fn servers(&self) -> &[String] {
        &self.inner.cfg.servers
    }

    /// This client's session id, as the server issued it.
    pub fn session(&self) -> u64 {
        self.inner.session().0
    }

    /// One attempt at delivering a transaction to `server` (an index into
    /// [`RemoteStore::servers`]), for the transaction layer, which owns the
    /// transaction ids and decides about resends. Runs on this store's
    /// runtime; the returned future may be awaited anywhere.
    pub fn send_txn(
        &self,
        server: usize,
        txn_id: u64,
        low_water: u64,
        txn: Txn,
    ) -> impl std::future::Future<Output = Result<Ack, SendError>> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        let task = self
            .rt
            .spawn(async move { inner.try_txn(server, txn_id, low_water, txn).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(SendError::Retry(format!("send task failed: {e}"))))
        }
    }
}

impl Inner {
    fn session(&self) -> (u64, [u8; TICKET_LEN]) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_server(&self) {
        self.server_index.fetch_add(1, Ordering::Relaxed);
    }

    fn current_server(&self) -> String {
        let i = self.server_index.load(Ordering::Relaxed) % self.cfg.servers.len();
        self.cfg.servers[i].clone()
    }

    /// The live connection, or a new one to the current server.
    async fn connection(&self) -> Result<Arc<Conn>, String> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(Arc::clone(c));
            }
        }
        *guard = None;
        if self.closed.load(Ordering::Acquire) {
            return Err("the store is closed: this daemon let the volume go".into());
        }
        let server = self.current_server();
        let conn = tokio::time::timeout(self.cfg.request_timeout, self.open(&server))
            .await
            .map_err(|_| format!("{server}: connect timed out"))??;
        let conn = Arc::new(conn);
        *guard = Some(Arc::clone(&conn));
        Ok(conn)
    }

    async fn open(&self, server: &str) -> Result<Conn, String> {
        let stream = TcpStream::connect(server)
            .await
            .map_err(|e| format!("{server}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let io: BoxIo = match &self.cfg.tls {
            Some(tls) => tls
                .connect(server, stream)
                .await
                .map_err(|e| format!("{server}: TLS handshake failed: {e}"))?,
            None => Box::new(stream),
        };
        let (mut rd, mut wr) = tokio::io::split(io);
        let (epoch, max_in_flight) = self.handshake(server, &mut rd, &mut wr).await?;
        let old = self.epoch.swap(epoch, Ordering::AcqRel);
        if old != 0 && old != epoch {
            limited!(
                PEER_LINES_SUPPRESSED,
                WARN,
                server,
                old,
                new = epoch,
                "store durability epoch changed: the store restarted or failed over"
            );
        }
        limited!(
            PEER_LINES_SUPPRESSED,
            INFO,
            server,
            volume = %self.cfg.volume,
            session = format_args!("{:016x}", self.session().0),
            epoch,
            "connected to store"
        );
        let slots = max_in_flight.min(self.cfg.max_in_flight) as usize;
        Ok(Conn::start(server, rd, wr, slots, self.cfg.request_timeout))
    }

    /// Hello, challenge, proof, welcome: the server's durability epoch and
    /// how many requests it lets in flight.
    async fn handshake(
        &self,
        server: &str,
        rd: &mut ReadHalf<BoxIo>,
        wr: &mut WriteHalf<BoxIo>,
    ) -> Result<(u64, u32), String> {
        let client_nonce = auth::nonce().map_err(|e| e.to_string())?;
        let volume = self.cfg.volume.clone();
        let (session, ticket) = self.session();
        let credential = self.cfg.credential.clone();
        let hello = Request::Hello {
            version: VERSION,
            credential: credential.clone(),
            session,
            ticket,
            volume: volume.clone(),
            client_nonce,
            max_payload: MAX_PAYLOAD,
            max_in_flight: self.cfg.max_in_flight,
        };
        let proto = |e: crate::net::proto::ProtoError| match e {
            crate::net::proto::ProtoError::Io(e)
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                format!(
                    "{server}: closed the connection during the handshake (a TLS server to a \
                     plaintext client, or a server of protocol version 1 to this version \
                     {VERSION} client, does that)"
                )
            }
            e => format!("{server}: {}", crate::ErrorChain(&e)),
        };
        write_frame(wr, &hello.to_frame(0)).await.map_err(proto)?;
        let server_nonce = match read_response(rd).await.map_err(proto)? {
            Response::Challenge { server_nonce } => server_nonce,
            Response::Error { code, message } => {
                return Err(format!("{server}: refused ({code:?}): {message}"))
            }
            other => {
                return Err(format!(
                    "{server}: unexpected {other:?} instead of a challenge"
                ))
            }
        };
        let t = Transcript {
            client_nonce: &client_nonce,
            server_nonce: &server_nonce,
            credential: &credential,
            volume: &volume,
            session,
            ticket: &ticket,
        };
        let secret = self.cfg.secret.expose();
        let auth = Request::Auth {
            proof: auth::prove(secret, Side::Client, &t),
        };
        write_frame(wr, &auth.to_frame(0)).await.map_err(proto)?;
        match read_response(rd).await.map_err(proto)? {
            Response::Welcome {
                proof,
                session: issued,
                ticket: issued_ticket,
                epoch,
                max_in_flight,
                ..
            } => {
                let t = Transcript {
                    session: issued,
                    ticket: &issued_ticket,
                    ..t
                };
                if !auth::verify(secret, Side::Server, &t, &proof) {
                    return Err(format!(
                        "{server}: the server could not prove the shared secret"
                    ));
                }
                if session != 0 && issued != session {
                    return Err(format!(
                        "{server}: the server did not resume session {session:016x}"
                    ));
                }
                *self.session.lock().unwrap_or_else(|e| e.into_inner()) = (issued, issued_ticket);
                Ok((epoch, max_in_flight))
            }
            Response::Error { code, message } => {
                Err(format!("{server}: refused ({code:?}): {message}"))
            }
            other => Err(format!("{server}: unexpected {other:?} instead of welcome")),
        }
    }

    /// Point the connection at `server`, dropping one to another server.
    async fn use_server(&self, server: usize) {
        let server = server % self.cfg.servers.len();
        if self.server_index.load(Ordering::Relaxed) % self.cfg.servers.len() != server {
            self.server_index.store(server, Ordering::Relaxed);
            if let Some(c) = self.conn.lock().await.take() {
                c.alive.store(false, Ordering::Release);
            }
        }
    }

    /// One attempt at a transaction on `server`.
    async fn try_txn(
        &self,
        server: usize,
        txn_id: u64,
        low_water: u64,
        txn: Txn,
    ) -> Result<Ack, SendError> {
        if self.superseded.load(Ordering::Acquire) {
            return Err(SendError::Superseded(format!(
                "volume {}: another daemon claimed it for writing",
                self.cfg.volume
            )));
        }
        self.use_server(server).await;
        let conn = self.connection().await.map_err(SendError::Elsewhere)?;
        let req = Request::Txn {
            txn_id,
            low_water,
            txn,
        };
        match self.exchange(&conn, &req).await {
            Ok(Response::TxnAck {
                txn_id: acked,
                duplicate,
                epoch,
            }) if acked == txn_id => {
                let old = self.epoch.swap(epoch, Ordering::AcqRel);
                if old != 0 && old != epoch {
                    limited!(
                        PEER_LINES_SUPPRESSED,
                        WARN,
                        server = %conn.server,
                        old,
                        new = epoch,
                        "store durability epoch changed"
                    );
                }
                Ok(Ack { epoch, duplicate })
            }
            Ok(Response::Error { code, message }) => {
                let why = format!("{}: {code:?}: {message}", conn.server);
                match code {
                    ErrorCode::Fenced | ErrorCode::Busy | ErrorCode::ShuttingDown => {
                        conn.alive.store(false, Ordering::Release);
                        Err(SendError::Elsewhere(why))
                    }
                    ErrorCode::NoSpace => Err(SendError::NoSpace(why)),
                    ErrorCode::Corrupt => Err(SendError::Refused(why)),
                    // Final: another daemon writes to the volume now.
                    ErrorCode::NotWriter => {
                        if !self.superseded.swap(true, Ordering::AcqRel) {
                            tracing::error!(
                                server = %conn.server,
                                volume = %self.cfg.volume,
                                txn_id,
                                reason = %Capped(&message),
                                "another daemon claimed the volume for writing: every write of \
                                 this daemon fails from now on (fsync reports EIO)"
                            );
                        }
                        Err(SendError::Superseded(why))
                    }
                    _ => Err(SendError::Retry(why)),
                }
            }
            Ok(other) => Err(SendError::Retry(format!(
                "{}: unexpected answer {other:?}",
                conn.server
            ))),
            Err(Attempt::Fail(e)) => Err(SendError::Refused(crate::ErrorChain(&e).to_string())),
            Err(Attempt::Retry(why)) => {
                conn.alive.store(false, Ordering::Release);
                Err(SendError::Retry(why))
            }
        }
    }

    /// One attempt at `req` on `conn`: a transaction with large writes
    /// stages them first (`staged.rs`), anything else is one frame.
    async fn exchange(&self, conn: &Conn, req: &Request) -> Result<Response, Attempt> {
        let timeout = self.cfg.request_timeout;
        match req {
            Request::Txn {
                txn_id,
                low_water,
                txn,
            } => match staged::plan(txn) {
                // A clone of the ops shares the data's buffers.
                Some(ops) => {
                    let staged =
                        staged::send(conn, *txn_id, *low_water, txn.clone(), &ops, timeout).await?;
                    match staged {
                        // A stage was refused (the server's staging is
                        // full) and nothing applied: at once inline, if it
                        // fits a frame, rather than staging again.
                        Response::Error {
                            code: ErrorCode::Unstaged,
                            message,
                        } => match staged::inline_frame(req) {
                            Some(frame) => conn.request_frame(frame, timeout).await,
                            None => Ok(Response::Error {
                                code: ErrorCode::Unstaged,
                                message,
                            }),
                        },
                        answer => Ok(answer),
                    }
                }
                None => conn.request(req, timeout).await,
            },
            req => conn.request(req, timeout).await,
        }
    }

    /// Send `req` until it is answered, failing over between servers.
    async fn call(&self, req: Request) -> Result<Response, StoreError> {
        let deadline = Instant::now() + self.cfg.give_up_after;
        let mut backoff = Duration::from_millis(20);
        loop {
            let failure = match self.connection().await {
                Err(e) => e,
                Ok(conn) => match self.exchange(&conn, &req).await {
                    Ok(Response::Error { code, message }) => match code {
                        ErrorCode::Fenced | ErrorCode::Busy | ErrorCode::ShuttingDown => {
                            conn.alive.store(false, Ordering::Release);
                            format!("{}: {code:?}: {message}", conn.server)
                        }
                        // Its stages were refused or lost: stage them again.
                        ErrorCode::Unstaged => format!("{}: {code:?}: {message}", conn.server),
                        ErrorCode::NoSpace => return Err(StoreError::NoSpace),
                        ErrorCode::Corrupt => return Err(StoreError::Corrupt(message)),
                        // The caller's to read (`claim`).
                        ErrorCode::WriterAlive | ErrorCode::WriterAway => {
                            return Ok(Response::Error { code, message })
                        }
                        _ => {
                            return Err(StoreError::Io(std::io::Error::other(format!(
                                "{}: {code:?}: {message}",
                                conn.server
                            ))))
                        }
                    },
                    Ok(r) => return Ok(r),
                    Err(Attempt::Fail(e)) => return Err(e),
                    Err(Attempt::Retry(why)) => {
                        conn.alive.store(false, Ordering::Release);
                        why
                    }
                },
            };
            if Instant::now() >= deadline {
                return Err(StoreError::Io(std::io::Error::other(format!(
                    "store unreachable for {:?}: {failure}",
                    self.cfg.give_up_after
                ))));
            }
            self.next_server();
            limited!(
                PEER_LINES_SUPPRESSED,
                WARN,
                reason = %Capped(&failure),
                next = %self.current_server(),
                "store request failed; resending"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<Response, crate::net::proto::ProtoError> {
    match read_frame(rd, MAX_PAYLOAD).await? {
        Some(f) => Response::from_frame(&f),
        None => Err(crate::net::proto::ProtoError::Io(
            std::io::ErrorKind::UnexpectedEof.into(),
        )),
    }
}

fn unexpected(r: Response) -> StoreError {
    StoreError::Io(std::io::Error::other(format!(
        "unexpected answer from store: {r:?}"
    )))
}

impl Store for RemoteStore {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        match self.call(Request::GetInode { ino })? {
            Response::Inode(i) => Ok(i),
            r => Err(unexpected(r)),
        }
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        match self.call(Request::Lookup {
            parent,
            name: name.to_vec(),
        })? {
            Response::Dirent(d) => Ok(d),
            r => Err(unexpected(r)),
        }
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let max = max.min(MAX_READDIR as usize) as u32;
        match self.call(Request::Readdir { parent, after, max })? {
            Response::Dirents(d) => Ok(d),
            r => Err(unexpected(r)),
        }
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.read_data(ino, offset, buf.len())?
            .copy_to(0, buf)
            .map_err(StoreError::Io)
    }

    /// The bytes as the frames brought them: each answer's payload is
    /// handed on, not copied into one buffer.
    fn read_data(&self, ino: u64, offset: u64, len: usize) -> Result<ReadData, StoreError> {
        let mut out = ReadData::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_READ as usize);
            match self.call(Request::Read {
                ino,
                offset: offset + done as u64,
                len: n as u32,
            })? {
                Response::Data(d) if d.len() == n => out.push(ReadPiece::Bytes(d)),
                r => return Err(unexpected(r)),
            }
            done += n;
        }
        Ok(out)
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        match self.call(Request::NextData { ino, offset })? {
            Response::Offset(o) => Ok(o),
            r => Err(unexpected(r)),
        }
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        match self.call(Request::NextHole { ino, offset })? {
            Response::Offset(Some(o)) => Ok(o),
            r => Err(unexpected(r)),
        }
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(Request::Readlink { ino })? {
            Response::Bytes(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(Request::GetXattr {
            ino,
            name: name.to_vec(),
        })? {
            Response::Bytes(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        match self.call(Request::ListXattr { ino })? {
            Response::Names(n) => Ok(n),
            r => Err(unexpected(r)),
        }
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        match self.call(Request::Statfs)? {
            Response::Stats(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        match self.call(Request::ReserveIds { count })? {
            Response::Ids { first } => Ok(first),
            r => Err(unexpected(r)),
        }
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        let inner = &self.inner;
        let txn_id = inner.next_txn.fetch_add(1, Ordering::Relaxed);
        let low_water = {
            let mut out = inner.outstanding.lock().unwrap_or_else(|e| e.into_inner());
            out.insert(txn_id);
            out.first().copied().unwrap_or(txn_id)
        };
        let result = self.call(Request::Txn {
            txn_id,
            low_water,
            txn,
        });
        inner
            .outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&txn_id);
        match result? {
            Response::TxnAck { txn_id: acked, .. } if acked == txn_id => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    fn sync(&self, _ino: Option<u64>) -> Result<(), StoreError> {
        // Every commit returned only after its durable ack.
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "pohmel://{}/{} (session {:016x})",
            self.inner.cfg.servers.join(","),
            self.inner.cfg.volume,
            self.inner.session().0
        )
    }
}
