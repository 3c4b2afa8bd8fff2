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
//! It must never panic or allocate on a peer's say-so: frames are capped and
//! validated in `crate::net::proto` before they reach a volume.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use crate::net::proto::auth::{self, Side, Transcript};
use crate::net::proto::msg::{ErrorCode, Request, Response};
use crate::net::proto::{read_frame, write_frame, Frame, ProtoError, MAX_PAYLOAD, VERSION};
use crate::store::{OnceStore, StoreError};

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz;

/// How long a new connection may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shutdown waits for requests in flight.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);

/// Settings of the store server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where volumes live: `file:///dir`, `s3://bucket/prefix?...`, `mem:`.
    pub data_url: String,
    /// The shared secret clients must prove; empty means none (logged).
    pub secret: Vec<u8>,
    pub max_connections: usize,
    /// Requests one connection may have in flight.
    pub max_in_flight: u32,
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// The volumes this server has open, by name.
struct Volumes {
    base: String,
    open: Mutex<HashMap<String, Arc<dyn OnceStore>>>,
}

impl Volumes {
    /// The URL of volume `name` under the base URL, keeping its query.
    fn url(&self, name: &str) -> String {
        if self.base.starts_with("mem:") {
            return self.base.clone();
        }
        let (path, query) = match self.base.split_once('?') {
            Some((p, q)) => (p, format!("?{q}")),
            None => (self.base.as_str(), String::new()),
        };
        format!("{}/{name}{query}", path.trim_end_matches('/'))
    }

    async fn get(self: &Arc<Self>, name: &str) -> Result<Arc<dyn OnceStore>, String> {
        if let Some(v) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(Arc::clone(v));
        }
        let this = Arc::clone(self);
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let mut open = this.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = open.get(&name) {
                return Ok(Arc::clone(v));
            }
            let url = this.url(&name);
            let v = crate::store::open_once(&url).map_err(|e| crate::ErrorChain(&e).to_string())?;
            info!(volume = %name, url = %url, epoch = v.epoch(), "volume open");
            open.insert(name, Arc::clone(&v));
            Ok(v)
        })
        .await
        .map_err(|e| format!("open task failed: {e}"))?
    }

    fn all(&self) -> Vec<(String, Arc<dyn OnceStore>)> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, v)| (n.clone(), Arc::clone(v)))
            .collect()
    }
}

/// A bound server, ready to run.
pub struct Server {
    cfg: ServerConfig,
    listener: TcpListener,
    volumes: Arc<Volumes>,
}

impl Server {
    /// Bind the listening socket.
    pub async fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| ServerError::Bind(cfg.listen, e))?;
        if cfg.secret.is_empty() {
            warn!("no shared secret configured: any client can use the volumes");
        }
        let volumes = Arc::new(Volumes {
            base: cfg.data_url.clone(),
            open: Mutex::new(HashMap::new()),
        });
        Ok(Server {
            cfg,
            listener,
            volumes,
        })
    }

    /// The address actually bound (for `--listen 127.0.0.1:0`).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `shutdown` resolves, then drain and close the volumes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let connections = Arc::new(Semaphore::new(self.cfg.max_connections));
        let cfg = Arc::new(self.cfg);
        // Requests in flight across all connections; shutdown drains them by
        // taking every permit.
        let total = (cfg
            .max_connections
            .saturating_mul(cfg.max_in_flight as usize))
        .clamp(1, 1 << 20) as u32;
        let requests = Arc::new(Semaphore::new(total as usize));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                warn!(%peer, "connection limit reached; refusing");
                tokio::spawn(refuse(stream, ErrorCode::Busy, "connection limit reached"));
                continue;
            };
            let (cfg, volumes, requests) = (
                Arc::clone(&cfg),
                Arc::clone(&self.volumes),
                Arc::clone(&requests),
            );
            tokio::spawn(async move {
                match serve_connection(stream, &cfg, &volumes, &requests).await {
                    Ok(()) => debug!(%peer, "connection closed"),
                    Err(e) => info!(%peer, error = %crate::ErrorChain(&e), "connection ended"),
                }
                drop(permit);
            });
        }
        info!("shutting down: draining requests in flight");
        // Every request holds one permit of `requests` while it runs.
        let drained = tokio::time::timeout(SHUTDOWN_DRAIN, requests.acquire_many(total)).await;
        if drained.is_err() {
            warn!("requests still running after the drain timeout");
        }
        for (name, volume) in self.volumes.all() {
            match tokio::task::spawn_blocking(move || volume.sync(None)).await {
                Ok(Ok(())) => info!(volume = %name, "volume synced"),
                Ok(Err(e)) => {
                    warn!(volume = %name, error = %crate::ErrorChain(&e), "volume sync failed")
                }
                Err(e) => warn!(volume = %name, error = %e, "volume sync task failed"),
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, code: ErrorCode, message: &str) {
    let _ = write_frame(&mut stream, &Response::error(code, message).to_frame(0)).await;
}

/// Why one connection ended abnormally.
#[derive(Debug, Error)]
enum ConnError {
    #[error("protocol error")]
    Proto(#[from] ProtoError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("handshake: {0}")]
    Handshake(String),
}

async fn next_request<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(u64, Request)>, ProtoError> {
    match read_frame(r, MAX_PAYLOAD).await? {
        None => Ok(None),
        Some(f) => Ok(Some((f.request_id, Request::from_frame(&f)?))),
    }
}

async fn serve_connection(
    stream: TcpStream,
    cfg: &ServerConfig,
    volumes: &Arc<Volumes>,
    requests: &Arc<Semaphore>,
) -> Result<(), ConnError> {
    let (mut rd, mut wr) = stream.into_split();
    let (session, volume) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, cfg, volumes))
            .await
        {
            Err(_) => return Err(ConnError::HandshakeTimeout),
            Ok(r) => r?,
        };

    // Replies go through one writer task so concurrent requests interleave
    // whole frames.
    let (tx, mut rx) = mpsc::channel::<Frame>(cfg.max_in_flight as usize);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if write_frame(&mut wr, &f).await.is_err() {
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight as usize));
    let mut pruned = 0u64;
    let result = loop {
        let (id, req) = match next_request(&mut rd).await {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => {
                // Tell the peer why before closing: a desynchronised stream
                // cannot be trusted further.
                let _ = tx
                    .send(Response::error(ErrorCode::BadRequest, e.to_string()).to_frame(0))
                    .await;
                break Err(e.into());
            }
        };
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break Ok(());
        };
        let Ok(global) = Arc::clone(requests).acquire_owned().await else {
            break Ok(());
        };
        let prune_below = match &req {
            Request::Txn { low_water, .. } if *low_water >= pruned + 64 => {
                pruned = *low_water;
                Some(*low_water)
            }
            _ => None,
        };
        let (volume, tx) = (Arc::clone(&volume), tx.clone());
        tokio::spawn(async move {
            let resp = tokio::task::spawn_blocking(move || {
                if let Some(below) = prune_below {
                    if let Err(e) = volume.prune_applied(session, below) {
                        warn!(session, error = %crate::ErrorChain(&e), "could not prune applied records");
                    }
                }
                handle(&*volume, session, req)
            })
            .await
            .unwrap_or_else(|e| Response::error(ErrorCode::Io, format!("request task failed: {e}")));
            let _ = tx.send(resp.to_frame(id)).await;
            drop((permit, global));
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}

/// Hello → Challenge → Auth → Welcome. Returns the client's session and its
/// volume.
async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    cfg: &ServerConfig,
    volumes: &Arc<Volumes>,
) -> Result<(u64, Arc<dyn OnceStore>), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some((id, hello)) = next_request(rd).await? else {
        return Err(ConnError::Handshake("closed before hello".into()));
    };
    let Request::Hello {
        version,
        session,
        volume,
        client_nonce,
        ..
    } = hello
    else {
        write_frame(
            wr,
            &Response::error(ErrorCode::BadRequest, "expected hello").to_frame(id),
        )
        .await?;
        return Err(ConnError::Handshake("first frame was not hello".into()));
    };
    if version != VERSION {
        let msg = format!("server speaks version {VERSION}, client {version}");
        write_frame(
            wr,
            &Response::error(ErrorCode::Version, msg.clone()).to_frame(id),
        )
        .await?;
        return Err(ConnError::Handshake(msg));
    }
    let server_nonce = auth::nonce().map_err(ProtoError::Io)?;
    write_frame(wr, &Response::Challenge { server_nonce }.to_frame(id)).await?;
    let Some((id, Request::Auth { proof })) = next_request(rd).await? else {
        return Err(ConnError::Handshake("expected auth".into()));
    };
    let t = Transcript {
        client_nonce: &client_nonce,
        server_nonce: &server_nonce,
        session,
        volume: &volume,
    };
    if !auth::verify(&cfg.secret, Side::Client, &t, &proof) {
        write_frame(
            wr,
            &Response::error(ErrorCode::AuthFailed, "authentication failed").to_frame(id),
        )
        .await?;
        return Err(ConnError::Handshake(format!(
            "client of session {session} failed authentication"
        )));
    }
    let store = match volumes.get(&volume).await {
        Ok(s) => s,
        Err(e) => {
            write_frame(
                wr,
                &Response::error(ErrorCode::NoSuchVolume, e.clone()).to_frame(id),
            )
            .await?;
            return Err(ConnError::Handshake(e));
        }
    };
    let welcome = Response::Welcome {
        proof: auth::prove(&cfg.secret, Side::Server, &t),
        epoch: store.epoch(),
        max_payload: MAX_PAYLOAD,
        max_in_flight: cfg.max_in_flight,
    };
    write_frame(wr, &welcome.to_frame(id)).await?;
    info!(session, volume = %volume, "client authenticated");
    Ok((session, store))
}

fn store_error(e: &StoreError) -> Response {
    let code = match e {
        StoreError::Fenced => ErrorCode::Fenced,
        StoreError::NoSpace => ErrorCode::NoSpace,
        StoreError::Corrupt(_) => ErrorCode::Corrupt,
        _ => ErrorCode::Io,
    };
    Response::error(code, crate::ErrorChain(e).to_string())
}

/// Serve one validated request against a volume.
fn handle(v: &dyn OnceStore, session: u64, req: Request) -> Response {
    let r: Result<Response, StoreError> = (|| {
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
                Response::Data(buf)
            }
            Request::NextData { ino, offset } => Response::Offset(v.next_data(ino, offset)?),
            Request::NextHole { ino, offset } => Response::Offset(Some(v.next_hole(ino, offset)?)),
            Request::Readlink { ino } => Response::Bytes(v.readlink(ino)?),
            Request::GetXattr { ino, name } => Response::Bytes(v.get_xattr(ino, &name)?),
            Request::ListXattr { ino } => Response::Names(v.list_xattr(ino)?),
            Request::Statfs => Response::Stats(v.statfs()?),
            Request::ReserveIds { count } => Response::Ids {
                first: v.reserve_ids(count)?,
            },
            Request::Hello { .. } | Request::Auth { .. } => {
                Response::error(ErrorCode::BadRequest, "handshake already done")
            }
        })
    })();
    r.unwrap_or_else(|e| {
        if !matches!(e, StoreError::Fenced) {
            warn!(error = %crate::ErrorChain(&e), "store request failed");
        }
        store_error(&e)
    })
}
