//! The device's side of a live migration (vhost-user `DEVICE_STATE`): on
//! the source, once QEMU has stopped the queues, drain the requests still
//! running, write back everything the guest wrote (the downtime includes
//! this drain; a failure fails the migration, the guest keeps running here
//! with nothing lost) and stream the guest session out; on the destination,
//! read it in and take the session over. QEMU moves the bytes through a
//! pipe it reads only after the reply to `SET_DEVICE_STATE_FD`, so each
//! direction runs on a thread of its own, and `CHECK_DEVICE_STATE` joins it
//! and reports what went wrong (`docs/migration.md`).
//!
//! The volume changes hands there too: the source lets it go once the
//! state is out, and the destination opens it when it takes the state
//! (waiting, bounded, for the source's release). With dirty logging on
//! (a migration under way) the source lets it go earlier, as soon as QEMU
//! has stopped the last queue ([`Transfer::let_go_early`]): QEMU spends
//! the next milliseconds on the last pass over guest memory and the other
//! devices, and the volume's close (3-6 ms) no longer adds to the
//! downtime. A guest that runs on here after all (the migration failed,
//! or the stop was a pause) has the volume opened again at its next
//! request, as after a migration that failed past the state.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

use super::pool::WorkerPool;
use super::state::{self, StateError};
use crate::fs::{PohmelFs, SessionState};

/// How long the source waits for the requests still running.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a transfer thread hands back: the state read (destination), or
/// nothing (source).
type Outcome = Result<Option<SessionState>, String>;

/// One connection's state transfer.
#[derive(Default)]
pub struct Transfer {
    running: Mutex<Option<JoinHandle<Outcome>>>,
    /// The session went out whole: at disconnect, forget it without
    /// removing the unlinked inodes it holds (the destination holds them).
    handed_off: AtomicBool,
    /// The thread letting the volume go ahead of the state, if one runs.
    early: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Transfer {
    /// `SET_DEVICE_STATE_FD`: start saving to or loading from `file`.
    pub fn start(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
        fs: &Arc<PohmelFs>,
        pool: &WorkerPool,
    ) -> io::Result<()> {
        self.settle_early();
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "device state moves only while the device is stopped",
            ));
        }
        let mut running = lock(&self.running);
        if running.is_some() {
            return Err(io::Error::other(
                "a device state transfer is already running",
            ));
        }
        let thread = match direction {
            VhostTransferStateDirection::SAVE => {
                let bytes = save(fs, pool).map_err(|e| {
                    warn!(error = %e, "migration: the device state cannot be saved; the guest stays here");
                    io::Error::other(e)
                })?;
                std::thread::Builder::new()
                    .name("pohmelfs-state-out".into())
                    .spawn(move || {
                        state::write(file, &bytes)
                            .map(|()| None)
                            .map_err(|e| e.to_string())
                    })?
            }
            VhostTransferStateDirection::LOAD => std::thread::Builder::new()
                .name("pohmelfs-state-in".into())
                .spawn(move || {
                    let mut file = file;
                    state::read(&mut file).map(Some).map_err(|e| e.to_string())
                })?,
        };
        *running = Some(thread);
        Ok(())
    }

    /// `CHECK_DEVICE_STATE`: the outcome of the transfer started last; a
    /// loaded state is taken over by `fs` here.
    pub fn check(&self, fs: &PohmelFs) -> io::Result<()> {
        let thread = lock(&self.running)
            .take()
            .ok_or_else(|| io::Error::other("no device state transfer was started"))?;
        let outcome = thread
            .join()
            .unwrap_or_else(|_| Err("the transfer thread panicked".into()));
        match outcome {
            Ok(None) => {
                // Everything the guest wrote is stored (`save`): let the
                // volume go, so the destination may open it. Should that
                // fail the volume stays here, and so does the guest.
                fs.release_volume().map_err(|e| {
                    warn!(error = %crate::ErrorChain(&e), "migration: could not let the volume go; the guest stays here");
                    io::Error::other(format!("could not let the volume go: {e}"))
                })?;
                self.handed_off.store(true, Ordering::SeqCst);
                info!("migration: device state sent; the guest session is the destination's now");
                Ok(())
            }
            Ok(Some(session)) => {
                let (inodes, handles) = (session.lookups.len(), session.handles.len());
                if session == SessionState::default() {
                    fs.acquire_volume(&[]).map_err(|e| {
                        warn!(error = %crate::ErrorChain(&e), "migration: cannot open the volume");
                        io::Error::other(format!("cannot open the volume: {e}"))
                    })?;
                    info!("migration: device state received: the guest had not mounted");
                    return Ok(());
                }
                fs.import_session(session).map_err(|e| {
                    warn!(error = %e, "migration: refused the device state");
                    io::Error::other(format!("refused the device state: {e}"))
                })?;
                info!(inodes, handles, "migration: guest session taken over");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "migration: device state transfer failed");
                Err(io::Error::other(e))
            }
        }
    }

    /// Whether this connection's session went to another daemon (it may
    /// have come back since: [`PohmelFs::volume_held`]).
    pub fn handed_off(&self) -> bool {
        self.handed_off.load(Ordering::SeqCst)
    }

    /// QEMU stopped the last queue with dirty logging on: the migration's
    /// stop. Write back what the guest wrote and let the volume go now, on
    /// a thread of its own, while QEMU makes its last pass over guest
    /// memory; the state's save and a queue's start wait for it
    /// ([`Transfer::settle_early`]). Should it fail, the volume stays open
    /// here and the save tries again (and fails the migration cleanly).
    pub fn let_go_early(&self, fs: &Arc<PohmelFs>, pool: &Arc<WorkerPool>) {
        self.settle_early();
        if fs.volume_held() != Some(true) {
            return;
        }
        let (fs, pool) = (Arc::clone(fs), Arc::clone(pool));
        let spawned = std::thread::Builder::new()
            .name("pohmelfs-let-go-early".into())
            .spawn(move || {
                if let Err(e) = let_go(&fs, &pool) {
                    warn!(error = %e, "migration: could not let the volume go at the stop; the state's save tries again");
                }
            });
        match spawned {
            Ok(thread) => *lock(&self.early) = Some(thread),
            Err(e) => {
                warn!(error = %e, "migration: no thread to let the volume go early in; it goes with the state")
            }
        }
    }

    /// Wait for the early let-go, if one runs: before the state is saved,
    /// and before a queue starts again (its requests then find the volume
    /// let go and open it again).
    pub fn settle_early(&self) {
        let thread = lock(&self.early).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                warn!("migration: the early let-go panicked; the state's save tries again");
            }
        }
    }
}

/// What a drain at the stop did: when its phases ended, and the bytes of
/// file data the daemon held when it began.
struct Drained {
    requests: Duration,
    written_back: Duration,
    dirty: u64,
}

/// The drain at the stop (since `started`): the requests still running
/// (the queues are stopped: nothing new arrives), then the write-back of
/// what the daemon held.
fn drain(fs: &PohmelFs, pool: &WorkerPool, started: Instant) -> Result<Drained, String> {
    let stuck = pool.drain(DRAIN_TIMEOUT);
    if stuck > 0 {
        return Err(format!(
            "{stuck} requests still running after {DRAIN_TIMEOUT:?}"
        ));
    }
    let requests = started.elapsed();
    let dirty = fs.dirty_bytes();
    fs.sync_all()
        .map_err(|e| format!("could not write back what the guest wrote: {e}"))?;
    Ok(Drained {
        requests,
        written_back: started.elapsed(),
        dirty,
    })
}

/// The early let-go's work: the drain, then the volume's close. Its share
/// of the stop is logged (`migration: let the volume go at the stop`).
fn let_go(fs: &PohmelFs, pool: &WorkerPool) -> Result<(), String> {
    let started = Instant::now();
    let d = drain(fs, pool, started)?;
    fs.release_volume()
        .map_err(|e| format!("could not let the volume go: {}", crate::ErrorChain(&e)))?;
    info!(
        requests_ms = %ms(d.requests),
        write_back_ms = %ms(d.written_back - d.requests),
        let_go_ms = %ms(started.elapsed() - d.written_back),
        dirty_bytes = d.dirty,
        "migration: let the volume go at the stop, ahead of the state"
    );
    Ok(())
}

/// Milliseconds with a tenth, for the log lines of the stop.
fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// The source's half before the bytes move: drain, write back, export.
/// The downtime's share of it is logged (`migration: drained`): the
/// requests' drain, the write-back of what the daemon held, the export.
fn save(fs: &PohmelFs, pool: &WorkerPool) -> Result<Vec<u8>, String> {
    let started = Instant::now();
    let d = drain(fs, pool, started)?;
    let session = match fs.export_session() {
        Ok(s) => s,
        // A guest that never mounted the device has no session to carry.
        Err(crate::fs::SessionError::NoSession) => SessionState::default(),
        Err(e) => return Err(e.to_string()),
    };
    let bytes = state::encode(&session).map_err(|e: StateError| e.to_string())?;
    info!(
        requests_ms = %ms(d.requests),
        write_back_ms = %ms(d.written_back - d.requests),
        total_ms = %ms(started.elapsed()),
        dirty_bytes = d.dirty,
        state_bytes = bytes.len(),
        let_go_early = fs.volume_held() == Some(false),
        "migration: drained and wrote back; the state is ready"
    );
    Ok(bytes)
}
