//! `pohmelfs store`: serves volumes to daemons over the wire protocol
//! (`crate::net::proto`). A volume is opened on the first connection that names
//! it, under the server's data URL (`file:///srv/pohmelfs` holds volume `v`
//! at `file:///srv/pohmelfs/v`). Opening a volume on shared storage fences
//! any other server that had it: a server takes a volume over only when a
//! client asks it to.
//!
//! Transactions are applied exactly once (`OnceStore::commit_once`) and
//! acknowledged only once durable; concurrent transactions from all clients
//! share the engine's group commit. Connections and requests in flight per
//! connection are bounded. On shutdown it stops accepting, lets requests in
//! flight finish (bounded), and closes the volumes.
//!
//! Security (`docs/security.md`): without credentials it serves loopback
//! only; with them a client must prove the secret of a credential that
//! grants the volume it names; sessions are issued here and bound to the
//! credential; TLS when given a certificate. Unauthenticated peers are
//! held to `max_handshakes` and handshake frames of a few KiB; every
//! address to `max_connections_per_peer`; idle connections close.
//!
//! It must never panic or allocate on a peer's say-so: frames are capped and
//! validated in `crate::net::proto` before they reach a volume.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::net::credentials::Credentials;
use crate::net::proto::msg::{ErrorCode, Request, Response, OP_DATA};
use crate::net::proto::{read_request, write_frame, Frame, ProtoError, MAX_PAYLOAD};
use crate::net::tls::BoxIo;
use crate::ratelimit::{limited, Capped, LogLimit, PEER_LINES_SUPPRESSED};
use crate::store::StoreError;
pub use writer::WRITER_LEASE;
use writer::{Claimed, Served};

mod connection;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz;
mod handshake;
mod staging;
mod volumes;
mod writer;

use volumes::Volumes;

/// How long a new connection may take to finish its TLS and protocol
/// handshakes.
/// How long a refusal (an error frame to a peer over a limit) may take.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Refusals sent at once; beyond, a refused peer is just disconnected.
const REFUSALS_MAX: usize = 16;
/// How long shutdown waits for requests in flight.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);
/// How long shutdown waits for the volumes' syncs, all of them: what was
/// acknowledged is durable already, and a sync on a disk that hangs must
/// not keep the server from exiting.
const SHUTDOWN_SYNC: Duration = Duration::from_secs(30);

/// Settings of the store server.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where volumes live: `file:///dir`, `s3://bucket/prefix?...`, `mem:`.
    pub data_url: String,
    /// Who may open which volume; none means no authentication, which
    /// [`Server::bind`] allows on a loopback address only.
    pub credentials: Credentials,
    /// TLS: the certificate and key the server presents. `None` is plain
    /// TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Authenticated connections at most.
    pub max_connections: usize,
    /// Connections (authenticated or not) from one IP address at most.
    pub max_connections_per_peer: usize,
    /// Connections still in their handshake at most: unauthenticated peers
    /// never hold the slots of `max_connections`.
    pub max_handshakes: usize,
    /// Volumes open at most.
    pub max_volumes: usize,
    /// Requests one connection may have in flight.
    pub max_in_flight: u32,
    /// Staged write data not yet committed, in bytes, across all
    /// connections (each also at most `proto::STAGED_BYTES_MAX`).
    pub max_staged_bytes: u64,
    /// An authenticated connection that sends nothing for this long is
    /// closed (its client reconnects on its next request).
    pub idle_timeout: Duration,
    /// A connection must finish its TLS and protocol handshakes within this
    /// (it holds one of `max_handshakes` slots until then).
    pub handshake_timeout: Duration,
    /// How long a writer that sends nothing, or a writer recorded in a
    /// volume this server just opened, keeps its claim against another
    /// session's (`docs/protocol.md`, "Writer claim"): its clients send a
    /// frame at least every `keepalive_ms` (5 s by default).
    pub writer_lease: Duration,
    /// Create a `file://` or `s3://` volume a client names that does not
    /// exist yet. Without it such a client is refused: volumes are made by
    /// `pohmelfs format DATA/NAME`. A volume held by another server is
    /// taken over either way (failover is what several servers are for),
    /// its holder logged.
    pub create_volumes: bool,
}

impl ServerConfig {
    /// The defaults of `pohmelfs store`, without credentials or TLS.
    pub fn new(listen: SocketAddr, data_url: &str) -> ServerConfig {
        ServerConfig {
            listen,
            data_url: data_url.to_owned(),
            credentials: Credentials::none(),
            tls: None,
            max_connections: 256,
            max_connections_per_peer: 64,
            max_handshakes: 64,
            max_volumes: 64,
            max_in_flight: 64,
            max_staged_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            writer_lease: WRITER_LEASE,
            create_volumes: true,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("data_url", &crate::net::redact_url(&self.data_url))
            .field("credentials", &self.credentials)
            .field("tls", &self.tls.is_some())
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field("max_handshakes", &self.max_handshakes)
            .field("max_volumes", &self.max_volumes)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_staged_bytes", &self.max_staged_bytes)
            .field("idle_timeout", &self.idle_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("writer_lease", &self.writer_lease)
            .finish()
    }
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error(
        "refusing to serve {0} without authentication: give --secret-file or \
         --credentials-file, or listen on a loopback address (127.0.0.1, ::1)"
    )]
    Unauthenticated(SocketAddr),
}

/// What every connection task shares.
struct Shared {
    cfg: ServerConfig,
    volumes: Arc<Volumes>,
    /// Slots of authenticated connections.
    connections: Arc<Semaphore>,
    /// Requests in flight across all connections; shutdown drains them by
    /// taking every permit.
    requests: Arc<Semaphore>,
    /// Bytes of staged write data across all connections, a permit each.
    staged_bytes: Arc<Semaphore>,
}

/// Connections per peer address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in [`Peers`], given back on drop.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<Peers>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut map = peers.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: Arc::clone(peers),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A bound server, ready to run.
pub struct Server {
    cfg: ServerConfig,
    listener: TcpListener,
}

impl Server {
    /// Bind the listening socket. A server without credentials binds only
    /// a loopback address.
    pub async fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        let loopback = cfg.listen.ip().is_loopback();
        if cfg.credentials.is_open() {
            if !loopback {
                return Err(ServerError::Unauthenticated(cfg.listen));
            }
            warn!(
                listen = %cfg.listen,
                "no credentials: any local process can use the volumes (loopback only)"
            );
        }
        if cfg.tls.is_none() && !loopback {
            warn!(listen = %cfg.listen, "no TLS: volume data crosses the network in the clear");
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| ServerError::Bind(cfg.listen, e))?;
        Ok(Server { cfg, listener })
    }

    /// The address actually bound (for `--listen 127.0.0.1:0`).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `shutdown` resolves, then drain and close the volumes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let cfg = self.cfg;
        let total = (cfg
            .max_connections
            .saturating_mul(cfg.max_in_flight as usize))
        .clamp(1, 1 << 20) as u32;
        let shared = Arc::new(Shared {
            volumes: Arc::new(Volumes::new(
                cfg.data_url.clone(),
                cfg.max_volumes,
                cfg.create_volumes,
                cfg.writer_lease,
            )),
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            requests: Arc::new(Semaphore::new(total as usize)),
            staged_bytes: staged_bytes_semaphore(cfg.max_staged_bytes),
            cfg,
        });
        let handshakes = Arc::new(Semaphore::new(shared.cfg.max_handshakes));
        let refusals = Arc::new(Semaphore::new(REFUSALS_MAX));
        let peers = Arc::new(Peers::default());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        limited!(PEER_LINES_SUPPRESSED, WARN, error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let max_peer = shared.cfg.max_connections_per_peer;
            let Some(peer_slot) = PeerSlot::take(&peers, peer.ip(), max_peer) else {
                let why = format!(
                    "connection limit of {max_peer} per address reached (--max-connections-per-peer)"
                );
                over_limit(stream, peer, &shared, &refusals, why);
                continue;
            };
            let Ok(handshaking) = Arc::clone(&handshakes).try_acquire_owned() else {
                let why = "too many handshakes in progress (--max-handshakes)".to_owned();
                over_limit(stream, peer, &shared, &refusals, why);
                continue;
            };
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                match serve_connection(stream, peer, &shared, handshaking).await {
                    Ok(()) => debug!(%peer, "connection closed"),
                    Err(e) => {
                        // A stranger decides how often this happens.
                        static LIMIT: LogLimit = LogLimit::new();
                        if let Some(suppressed) = LIMIT.allow() {
                            let error = crate::ratelimit::Capped(crate::ErrorChain(&e));
                            info!(%peer, suppressed, %error, "connection ended");
                        }
                    }
                }
                drop(peer_slot);
            });
        }
        info!("shutting down: draining requests in flight");
        let drained =
            tokio::time::timeout(SHUTDOWN_DRAIN, shared.requests.acquire_many(total)).await;
        if drained.is_err() {
            warn!("requests still running after the drain timeout");
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_SYNC;
        for (name, volume) in shared.volumes.all() {
            let sync = tokio::task::spawn_blocking(move || volume.store.sync(None));
            match tokio::time::timeout_at(deadline, sync).await {
                Ok(Ok(Ok(()))) => info!(volume = %name, "volume synced"),
                Ok(Ok(Err(e))) => {
                    warn!(volume = %name, error = %crate::ErrorChain(&e), "volume sync failed")
                }
                Ok(Err(e)) => warn!(volume = %name, error = %e, "volume sync task failed"),
                Err(_) => warn!(
                    volume = %name,
                    bound = ?SHUTDOWN_SYNC,
                    "volume syncs did not end within the bound (a disk that hangs?): exiting \
                     without them; what was acknowledged is durable"
                ),
            }
        }
    }
}

/// The server-wide bound of staged bytes as a semaphore (within the most
/// permits a semaphore takes).
fn staged_bytes_semaphore(max: u64) -> Arc<Semaphore> {
    let max = usize::try_from(max)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS);
    Arc::new(Semaphore::new(max))
}

/// Log a refused connection (limited) and answer it if a refusal slot is
/// free; otherwise just close it.
fn over_limit(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    refusals: &Arc<Semaphore>,
    why: String,
) {
    static LIMIT: LogLimit = LogLimit::new();
    if let Some(suppressed) = LIMIT.allow() {
        warn!(%peer, suppressed, why = %why, "refusing a connection");
    }
    if let Ok(p) = Arc::clone(refusals).try_acquire_owned() {
        let tls = shared.cfg.tls.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refuse(stream, tls, why)).await;
            drop(p);
        });
    }
}

/// Tell a peer over a limit why, in a frame it can read (over TLS on a TLS
/// server), then close.
async fn refuse(stream: TcpStream, tls: Option<Arc<rustls::ServerConfig>>, why: String) {
    let Ok(mut io) = accept_io(stream, tls).await else {
        return;
    };
    let _ = write_frame(&mut io, &Response::error(ErrorCode::Busy, why).to_frame(0)).await;
}

/// The connection's byte stream: TLS when the server has it. A peer that
/// speaks plain protocol frames to a TLS server is told so in plain text.
async fn accept_io(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<BoxIo, ConnError> {
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await.map_err(ProtoError::Io)?;
    // 0x16: a TLS handshake record; "P" starts a plaintext frame.
    if n == 1 && first[0] != 0x16 {
        let mut stream = stream;
        let why = "this server requires TLS: give the client tls_ca= or tls_pin=";
        let _ = write_frame(
            &mut stream,
            &Response::error(ErrorCode::BadRequest, why).to_frame(0),
        )
        .await;
        return Err(ConnError::Handshake(
            "a plaintext client on the TLS port".into(),
        ));
    }
    let io = tokio_rustls::TlsAcceptor::from(tls)
        .accept(stream)
        .await
        .map_err(ConnError::Tls)?;
    Ok(Box::new(io))
}

/// Why one connection ended abnormally.
#[derive(Debug, Error)]
enum ConnError {
    #[error("protocol error")]
    Proto(#[from] ProtoError),
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("idle for {0:?}: closed")]
    Idle(Duration),
    #[error("the peer read no reply for {0:?}: closed")]
    NotReading(Duration),
}

async fn next_request<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(u64, Request)>, ProtoError> {
    read_request(r, MAX_PAYLOAD).await
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    handshaking: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), ConnError> {
    let started = async {
        let io = accept_io(stream, shared.cfg.tls.clone()).await?;
        let (mut rd, mut wr) = tokio::io::split(io);
        let s = handshake::handshake(&mut rd, &mut wr, shared).await?;
        Ok::<_, ConnError>((rd, wr, s))
    };
    let (rd, wr, session) = match tokio::time::timeout(shared.cfg.handshake_timeout, started).await
    {
        Err(_) => return Err(ConnError::HandshakeTimeout),
        Ok(r) => r?,
    };
    drop(handshaking);
    info!(
        %peer,
        credential = %session.credential,
        volume = %session.volume_name,
        session = format_args!("{:016x}", session.session),
        "client authenticated"
    );
    connection::serve_requests(rd, wr, session, shared, peer).await
}

fn store_error(e: &StoreError) -> Response {
    let code = match e {
        StoreError::Fenced => ErrorCode::Fenced,
        e if e.is_no_space() => ErrorCode::NoSpace,
        StoreError::Corrupt(_) => ErrorCode::Corrupt,
        _ => ErrorCode::Io,
    };
    Response::error(code, crate::ErrorChain(e).to_string())
}

/// Serve one validated request against a volume: a write only for the
/// session that holds the volume's writer claim (`writer.rs`).
fn handle(served: &Served, session: u64, req: Request) -> Response {
    let r: Result<Response, StoreError> = match req {
        Request::Claim | Request::TakeOver => served
            .claim(session, matches!(req, Request::TakeOver))
            .map(|c| match c {
                Claimed::Granted(claim) => Response::Claimed { claim },
                Claimed::Refused { why, away: false } => {
                    Response::error(ErrorCode::WriterAlive, why)
                }
                Claimed::Refused { why, away: true } => Response::error(ErrorCode::WriterAway, why),
                Claimed::Busy(why) => Response::error(ErrorCode::Busy, why),
            }),
        req if req.is_write() => served.write(session, |v| apply(v, session, req)),
        req => apply(&*served.store, session, req),
    };
    r.unwrap_or_else(|e| failed(&e))
}

/// [`handle`], into the answer's frame (request `id`). Read data goes
/// straight into the frame's payload, which is written out from there: no
/// buffer of its own, no copy into the frame.
fn answer(served: &Served, session: u64, req: Request, id: u64) -> Frame {
    let Request::Read { ino, offset, len } = req else {
        return handle(served, session, req).to_frame(id);
    };
    // `len` is within MAX_READ (checked when the request was decoded).
    let mut payload = crate::net::buffers::take(4 + len as usize);
    payload.extend_from_slice(&len.to_le_bytes());
    payload.resize(4 + len as usize, 0);
    match served.store.read(ino, offset, &mut payload[4..]) {
        Ok(()) => Frame {
            opcode: OP_DATA,
            flags: 0,
            request_id: id,
            payload,
        },
        Err(e) => failed(&e).to_frame(id),
    }
}

/// A request that failed: logged (rate limited), and its error answer.
fn failed(e: &StoreError) -> Response {
    if !matches!(e, StoreError::Fenced) {
        limited!(
            PEER_LINES_SUPPRESSED,
            WARN,
            error = %Capped(crate::ErrorChain(e)),
            "store request failed"
        );
    }
    store_error(e)
}

/// Serve one validated request (a write already allowed) against a store.
fn apply(
    v: &dyn crate::store::OnceStore,
    session: u64,
    req: Request,
) -> Result<Response, StoreError> {
    Ok(match req {
        Request::Txn { txn_id, txn, .. } => {
            let outcome = v.commit_once(session, txn_id, txn)?;
            Response::TxnAck {
                txn_id,
                duplicate: outcome.duplicate,
                epoch: v.epoch(),
            }
        }
        Request::GetInode { ino } => Response::Inode(v.get_inode(ino)?),
        Request::Lookup { parent, name } => Response::Dirent(v.lookup(parent, &name)?),
        Request::Readdir { parent, after, max } => {
            Response::Dirents(v.readdir(parent, after, max as usize)?)
        }
        Request::Read { ino, offset, len } => {
            let mut buf = vec![0u8; len as usize];
            v.read(ino, offset, &mut buf)?;
            Response::Data(buf.into())
        }
        Request::NextData { ino, offset } => Response::Offset(v.next_data(ino, offset)?),
        Request::NextHole { ino, offset } => Response::Offset(Some(v.next_hole(ino, offset)?)),
        Request::Readlink { ino } => Response::Bytes(v.readlink(ino)?),
        Request::GetXattr { ino, name } => Response::Bytes(v.get_xattr(ino, &name)?),
        Request::ListXattr { ino } => Response::Names(v.list_xattr(ino)?),
        Request::Statfs => Response::Stats(v.statfs()?),
        Request::ReclaimOrphans { spare } => Response::Removed {
            count: v.reclaim_orphans_except(&spare)?,
        },
        Request::ReserveIds { count } => Response::Ids {
            first: v.reserve_ids(count)?,
        },
        Request::Hello { .. } | Request::Auth { .. } => {
            Response::error(ErrorCode::BadRequest, "handshake already done")
        }
        Request::Claim | Request::TakeOver => {
            Response::error(ErrorCode::BadRequest, "a claim is no write")
        }
        // The connection's staging takes these before a request is served.
        Request::Stage(_) | Request::StagedTxn { .. } => {
            Response::error(ErrorCode::BadRequest, "staged data outside a connection")
        }
    })
}
