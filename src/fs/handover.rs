//! The volume's side of a live migration, for a filesystem on a
//! [`VolumeSlot`] (`pohmelfs serve`): the source lets the volume go once
//! the guest session is out, the destination opens it when the session
//! arrives (sparing the unlinked inodes the session holds), and a source
//! whose migration failed opens it again before it serves the guest again
//! (`docs/migration.md`). A filesystem built on a plain store
//! ([`PohmelFs::new`]) holds its volume for good: these are no-ops there.

use std::sync::Arc;

use tracing::{error, info};

use super::error::FsResult;
use super::{lock, FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::ratelimit::limited;
use crate::writeback::slot::{Phase, SlotError, VolumeSlot};

impl PohmelFs {
    /// Serve the volume in `slot`. A slot that is not open yet
    /// (`--incoming`) is not touched until [`PohmelFs::acquire_volume`];
    /// an open one gets its root directory if it is new.
    pub fn on_slot(slot: Arc<VolumeSlot>, cfg: FsConfig, metrics: Arc<Metrics>) -> FsResult<Self> {
        let open = slot.phase() == Phase::Open;
        let fs = PohmelFs::unopened(Arc::clone(&slot) as _, Some(slot), cfg, metrics);
        if open {
            fs.ensure_root()?;
        }
        Ok(fs)
    }

    /// Open the volume (a migration's destination, as the state arrives),
    /// sparing the orphans in `spare` (the unlinked inodes the incoming
    /// session holds): waits for the source to let it go, at most the
    /// slot's bound.
    pub fn acquire_volume(&self, spare: &[u64]) -> Result<(), SlotError> {
        let Some(slot) = &self.volume else {
            return Ok(());
        };
        if slot.phase() == Phase::Open {
            return Ok(());
        }
        slot.acquire(spare)?;
        // A volume never served has no root yet.
        if let Err(e) = self.ensure_root() {
            error!(error = %e, "could not create the root directory of the volume");
        }
        Ok(())
    }

    /// Open the volume for a migration's state, sparing the orphans in
    /// `spare`: as [`PohmelFs::acquire_volume`], except that a standby
    /// open under way that has claimed the volume finishes behind the
    /// answer (`VolumeSlot::acquire_for_state`); the guest's requests
    /// wait for it.
    pub fn acquire_volume_for_state(&self, spare: &[u64]) -> Result<(), SlotError> {
        match &self.volume {
            Some(slot) if slot.phase() == Phase::Incoming => slot.acquire_for_state(spare),
            _ => self.acquire_volume(spare),
        }
    }

    /// A live migration began: the volume will be let go at its stop, so
    /// start on the work that release waits for (`VolumeSlot::prepare_release`).
    pub fn prepare_release(&self) {
        if let Some(slot) = &self.volume {
            slot.prepare_release();
        }
    }

    /// Let the volume go (a migration's source, once the session is out):
    /// everything the guest wrote is stored and the engine closed, so the
    /// destination may open it. On an error the volume stays open here.
    pub fn release_volume(&self) -> Result<(), SlotError> {
        match &self.volume {
            Some(slot) => slot.release(),
            None => Ok(()),
        }
    }

    /// Whether this daemon took a migration's state and its guest never
    /// ran here (no request since): if the frontend goes now, the
    /// migration failed after the state and the source may resume it.
    pub fn state_taken_unserved(&self) -> bool {
        self.volume.as_ref().is_some_and(|s| match s.phase() {
            Phase::Open => s.unconfirmed(),
            Phase::Opening => true,
            _ => false,
        })
    }

    /// Whether this daemon holds the volume: `None` for a filesystem on a
    /// plain store, which cannot let it go.
    pub fn volume_held(&self) -> Option<bool> {
        self.volume.as_ref().map(|s| s.phase() == Phase::Open)
    }

    /// A new frontend connected: an open that gave up after a release
    /// may be tried again.
    pub fn new_frontend(&self) {
        if let Some(slot) = &self.volume {
            slot.retry();
        }
    }

    /// Whether a guest request may be served: the volume is open, or was
    /// let go and opens again now (a migration that failed after the
    /// source let the volume go: QEMU resumes the guest here). A daemon
    /// still waiting for a migration's state does not open it (the
    /// destination must not open the volume before the source let it go):
    /// requests are answered EIO, as they are after an open that gave up
    /// (until the next frontend connects), with a log line. One whose
    /// open finishes behind the state waits for it.
    pub fn volume_ready(&self) -> bool {
        let Some(slot) = &self.volume else {
            return true;
        };
        if slot.phase() == Phase::Opening {
            slot.settle_behind();
        }
        match slot.phase() {
            Phase::Open => {
                slot.confirm();
                true
            }
            Phase::Incoming => {
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    "a guest request before the migration state arrived (--incoming): answered EIO"
                );
                false
            }
            Phase::Opening => {
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    "a guest request while the volume's open behind the migration state had not ended: answered EIO"
                );
                false
            }
            Phase::Released if slot.gave_up() => {
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    "the volume went to another daemon and could not be opened again: answered EIO"
                );
                false
            }
            Phase::Released => {
                let spare: Vec<u64> = lock(&self.refs).orphans.iter().copied().collect();
                info!(
                    orphans = spare.len(),
                    "a guest request after the volume was let go (the migration failed?): opening it again"
                );
                match self.acquire_volume(&spare) {
                    Ok(()) => true,
                    Err(e) => {
                        error!(error = %crate::ErrorChain(&e), "could not open the volume again: guest requests are answered EIO until the next frontend connects");
                        false
                    }
                }
            }
        }
    }
}
