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
//! (whose claim may be stale) fails that write and answers `Fenced`. A
//! claim waits for the writes under way at most [`CLAIM_WAIT`] (a commit
//! that never ends, on a disk that hangs, would hold it for good) and is
//! answered `Busy` then, which the client asks again; who holds the claim
//! is read from a copy that never waits for that lock, so the connections'
//! own checks (a stage from the writer only) go on meanwhile.
//!
//! A claim is refused while the session holding it is **alive**: it has a
//! connection open here on which a frame arrived within the writer lease
//! (its client sends one at least every `keepalive_ms`), or the server
//! opened the volume less than a lease ago and that session has not
//! connected since (a restarted server gives its writer a lease to come
//! back). A writer whose connections all closed is gone at once: its
//! daemon exited, was killed, or let the volume go (a migration source).
//! [`Request::TakeOver`] claims anyway.
//!
//! [`Request::Claim`]: crate::net::proto::msg::Request::Claim
//! [`Request::TakeOver`]: crate::net::proto::msg::Request::TakeOver

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use parking_lot::RwLock;
use std::time::{Duration, Instant};

use crate::store::engine::holder::{now_secs, utc};

use tracing::{info, warn};

use crate::net::proto::msg::{ErrorCode, Response};
use crate::ratelimit::{limited, PEER_LINES_SUPPRESSED};
use crate::store::{OnceStore, StoreError, WriterClaim};

/// The default writer lease (`pohmelfs store --writer-lease-ms`).
pub const WRITER_LEASE: Duration = Duration::from_secs(15);

/// How long a claim waits for the writes under way to end.
pub const CLAIM_WAIT: Duration = Duration::from_secs(10);

/// A session's connections to this volume, as the lease sees them.
struct Presence {
    /// Connections open now.
    conns: u32,
    /// When a frame of the session last arrived.
    last_seen: Instant,
    /// The peer of its latest connection, and its session on the wire.
    peer: SocketAddr,
    wire: u64,
}

/// A volume as the server serves it: the store and its writer claim.
pub struct Served {
    pub store: Arc<dyn OnceStore>,
    /// Writes hold it shared, a claim exclusive.
    writer: RwLock<Option<WriterClaim>>,
    /// The claim, as [`Served::writer`] reads it without waiting: set
    /// with `writer` held exclusive.
    current: Mutex<Option<WriterClaim>>,
    /// How long a claim waits for the writes under way ([`CLAIM_WAIT`]).
    claim_wait: Duration,
    /// The sessions with a connection open, and the writer's even once
    /// its connections closed (then it is gone, not one never seen).
    presence: Mutex<HashMap<u64, Presence>>,
    /// When the current claim was granted here (None: recorded before
    /// this server opened the volume).
    claimed_at: Mutex<Option<u64>>,
    opened: Instant,
    lease: Duration,
}

/// An open connection of a session to a volume; dropped when it closes.
pub struct Present {
    served: Arc<Served>,
    session: u64,
}

impl Present {
    /// A frame of the session arrived: it is alive.
    pub fn seen(&self) {
        if let Some(p) = self.served.presence().get_mut(&self.session) {
            p.last_seen = Instant::now();
        }
    }
}

impl Drop for Present {
    fn drop(&mut self) {
        let writer = self.served.writer().map(|c| c.session);
        let mut presence = self.served.presence();
        if let Some(p) = presence.get_mut(&self.session) {
            p.conns = p.conns.saturating_sub(1);
            if p.conns == 0 && writer != Some(self.session) {
                presence.remove(&self.session);
            }
        }
    }
}

/// What a claim came to.
#[derive(Debug)]
pub enum Claimed {
    /// Granted: the claim's number.
    Granted(u64),
    /// Refused: the claim's session is alive, as `why` says; `away`: it is
    /// only given a lease to reconnect to this server, which just opened
    /// the volume.
    Refused { why: String, away: bool },
    /// Writes under way did not end within the claim's wait: ask again.
    Busy(String),
}

impl Served {
    /// Serve `store` under the claim it recorded, with writer lease `lease`.
    pub fn new(store: Arc<dyn OnceStore>, lease: Duration) -> Result<Served, StoreError> {
        let writer = store.writer_claim()?;
        Ok(Served {
            store,
            writer: RwLock::new(writer),
            current: Mutex::new(writer),
            claim_wait: CLAIM_WAIT,
            presence: Mutex::new(HashMap::new()),
            claimed_at: Mutex::new(None),
            opened: Instant::now(),
            lease,
        })
    }

    fn presence(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Presence>> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection of `session` (stored; `wire` as the client knows it)
    /// from `peer` is open, until the returned guard drops.
    pub fn connected(self: &Arc<Self>, session: u64, wire: u64, peer: SocketAddr) -> Present {
        let mut presence = self.presence();
        let p = presence.entry(session).or_insert(Presence {
            conns: 0,
            last_seen: Instant::now(),
            peer,
            wire,
        });
        p.conns = p.conns.saturating_add(1);
        p.last_seen = Instant::now();
        p.peer = peer;
        drop(presence);
        Present {
            served: Arc::clone(self),
            session,
        }
    }

    /// Why `writer` counts as alive (`away`: it has not connected since
    /// this server opened the volume, less than a lease ago), or None when
    /// it does not.
    fn alive(&self, writer: u64) -> Option<(String, bool)> {
        let lease = self.lease;
        let since = match *self.claimed_at.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(t) => format!("claimed {}", utc(t)),
            None => "claimed before this server opened the volume".to_owned(),
        };
        match self.presence().get(&writer) {
            Some(p) if p.conns > 0 && p.last_seen.elapsed() < lease => Some((
                format!(
                    "session {:016x} from {} ({since}, last heard {} ms ago, writer lease {} ms)",
                    p.wire,
                    p.peer,
                    p.last_seen.elapsed().as_millis(),
                    lease.as_millis()
                ),
                false,
            )),
            Some(_) => None,
            None if self.opened.elapsed() < lease => Some((
                format!(
                    "the session that holds its claim ({since}; it has {} ms left to reconnect \
                     to this server, which opened the volume {} ms ago)",
                    (lease - self.opened.elapsed()).as_millis(),
                    self.opened.elapsed().as_millis()
                ),
                true,
            )),
            None => None,
        }
    }

    /// The claim now; never waits for the writes under way.
    pub fn writer(&self) -> Option<WriterClaim> {
        *self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `session` holds the writer claim now.
    pub fn is_writer(&self, session: u64) -> bool {
        self.writer().is_some_and(|c| c.session == session)
    }

    /// Make `session` the volume's writer, unless another session holds
    /// the claim and is alive (and not `take_over`).
    pub fn claim(&self, session: u64, take_over: bool) -> Result<Claimed, StoreError> {
        let Some(mut writer) = self.writer.try_write_for(self.claim_wait) else {
            let why = format!(
                "the volume's writes under way did not end within {} ms: ask again",
                self.claim_wait.as_millis()
            );
            limited!(
                PEER_LINES_SUPPRESSED,
                WARN,
                session = format_args!("{session:016x}"),
                why = %why,
                "claim not made"
            );
            return Ok(Claimed::Busy(why));
        };
        let before = *writer;
        let other = before.map(|b| b.session).filter(|&b| b != session);
        if let Some((why, away)) = other.and_then(|b| self.alive(b)) {
            if !take_over {
                let why = format!("{}{why}", crate::net::WRITER_ALIVE);
                limited!(
                    PEER_LINES_SUPPRESSED,
                    WARN,
                    session = format_args!("{session:016x}"),
                    why = %why,
                    "claim refused"
                );
                return Ok(Claimed::Refused { why, away });
            }
            warn!(
                session = format_args!("{session:016x}"),
                writer = %why,
                "volume taken over from a live writer"
            );
        }
        let claim = WriterClaim {
            claim: before.map_or(1, |c| c.claim.saturating_add(1)),
            session,
        };
        self.store.set_writer_claim(claim)?;
        *writer = Some(claim);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(claim);
        *self.claimed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(now_secs());
        if let Some(b) = other {
            let mut presence = self.presence();
            if presence.get(&b).is_some_and(|p| p.conns == 0) {
                presence.remove(&b);
            }
        }
        info!(
            claim = claim.claim,
            session = format_args!("{session:016x}"),
            superseded = ?before.filter(|b| b.session != session).map(|b| format!("{:016x}", b.session)),
            take_over,
            "volume claimed for writing"
        );
        Ok(Claimed::Granted(claim.claim))
    }

    /// Run the write `apply` for `session` if it holds the claim, under the
    /// claim's read lock; otherwise refuse it with `NotWriter`.
    pub fn write(
        &self,
        session: u64,
        apply: impl FnOnce(&dyn OnceStore) -> Result<Response, StoreError>,
    ) -> Result<Response, StoreError> {
        let writer = self.writer.read();
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::thread::JoinHandle;

    use super::*;
    use crate::store::mem::MemStore;

    const BOUND: Duration = Duration::from_secs(30);

    /// A volume whose writer is session 1, and a claim that waits
    /// `claim_wait` for the writes under way.
    fn served(claim_wait: Duration) -> Arc<Served> {
        let mut s = Served::new(Arc::new(MemStore::new(1 << 20)), WRITER_LEASE).unwrap();
        s.claim_wait = claim_wait;
        let s = Arc::new(s);
        assert!(matches!(s.claim(1, false), Ok(Claimed::Granted(1))));
        s
    }

    type Write = JoinHandle<Result<Response, StoreError>>;

    /// A write of session 1 that does not end until the sender says so;
    /// returned once it is under way.
    fn held_write(served: &Arc<Served>) -> (Write, Sender<()>) {
        let (inside, writing) = channel();
        let (go, held) = channel::<()>();
        let served = Arc::clone(served);
        let write = std::thread::spawn(move || {
            served.write(1, |_| {
                inside.send(()).unwrap();
                held.recv_timeout(BOUND)
                    .expect("the test let the write end");
                Ok(Response::error(ErrorCode::Io, "done"))
            })
        });
        writing.recv_timeout(BOUND).unwrap();
        (write, go)
    }

    /// Session 2 takes the volume over, on a thread: its outcome.
    fn take_over(served: &Arc<Served>) -> Receiver<Result<Claimed, StoreError>> {
        let (done, claimed) = channel();
        let served = Arc::clone(served);
        std::thread::spawn(move || done.send(served.claim(2, true)));
        claimed
    }

    /// A write that does not end (a commit on a disk that hangs) holds a
    /// claim up for the claim's wait only: it is answered busy, and made
    /// once the write ends.
    #[test]
    fn a_write_that_does_not_end_holds_a_claim_up_for_a_bounded_time() {
        let served = served(Duration::from_millis(100));
        let (write, go) = held_write(&served);
        let busy = take_over(&served).recv_timeout(BOUND);
        assert!(
            matches!(busy, Ok(Ok(Claimed::Busy(_)))),
            "a claim behind a write that does not end: {busy:?}"
        );
        assert!(served.is_writer(1));
        go.send(()).unwrap();
        assert!(write.join().unwrap().is_ok());
        let granted = take_over(&served).recv_timeout(BOUND);
        assert!(
            matches!(granted, Ok(Ok(Claimed::Granted(2)))),
            "{granted:?}"
        );
        assert!(served.is_writer(2));
    }

    /// While a claim waits for a write under way, who holds the claim is
    /// read at once (a connection's check of a stage): it does not queue
    /// behind the waiting claim.
    #[test]
    fn the_claim_is_read_while_a_claim_waits_for_a_write() {
        let served = served(BOUND);
        let (write, go) = held_write(&served);
        let claimed = take_over(&served);
        let waiting = pohmelfs_testkit::wait_until(BOUND, Duration::from_millis(1), || {
            served.writer.try_read().is_none().then_some(())
        });
        assert!(waiting.is_some(), "the claim never waited for the write");
        let (done, read) = channel();
        {
            let served = Arc::clone(&served);
            std::thread::spawn(move || done.send(served.writer()));
        }
        let holder = read
            .recv_timeout(BOUND)
            .expect("the claim was read while a claim waits");
        assert_eq!(holder.map(|c| c.session), Some(1));
        go.send(()).unwrap();
        assert!(write.join().unwrap().is_ok());
        let granted = claimed.recv_timeout(BOUND);
        assert!(
            matches!(granted, Ok(Ok(Claimed::Granted(2)))),
            "{granted:?}"
        );
    }
}
