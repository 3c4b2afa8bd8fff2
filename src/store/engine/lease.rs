//! The holder record an open volume writes (`holder.rs`): the claim
//! before the engine opens, checked against the open's mode, and the
//! lease that renews the record until the volume closes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::open::OpenMode;
use super::{config, holder, OpenVolumeError};

/// The holder record this instance wrote, renewed until close (a clone
/// shares its state).
#[derive(Clone)]
pub(super) struct Lease {
    pub(super) record: holder::Holder,
    object_store: Arc<dyn object_store::ObjectStore>,
    db_path: String,
    /// The volume's directory on `file://`, where the record's lock is.
    local_dir: Option<std::path::PathBuf>,
    stop: Arc<AtomicBool>,
    /// The record says standby (`OpenMode::Standby`) until
    /// [`Lease::promote`]; renewals write what it says.
    standby: Arc<AtomicBool>,
    /// Held by a renewal from its check of `stop` to its write, and by
    /// the release: a renewal under way when the lease is released
    /// finishes before the record is removed, so none writes it again
    /// after (a stale record would keep a migration's destination out).
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Lease {
    /// Whether the record is still renewed (not released, not taken over).
    #[cfg(test)]
    pub(super) fn renewing(&self) -> bool {
        !self.stop.load(Ordering::Acquire)
    }

    /// The task that renews the record until [`Lease::release`].
    pub(super) fn renewal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        renew(
            self.object_store.clone(),
            self.db_path.clone(),
            self.local_dir.clone(),
            self.record.clone(),
            self.stop.clone(),
            self.standby.clone(),
            self.turn.clone(),
        )
    }

    /// Whether the record still says standby.
    pub(super) fn on_standby(&self) -> bool {
        self.standby.load(Ordering::Acquire)
    }

    /// Stop saying standby: write the record without it now, unless
    /// released or taken over meanwhile.
    pub(super) async fn promote(&self) {
        if !self.standby.swap(false, Ordering::AcqRel) {
            return;
        }
        let _turn = self.turn.lock().await;
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        let mut record = holder::Holder {
            standby: false,
            ..self.record.clone()
        };
        match holder::renew(
            &*self.object_store,
            &self.db_path,
            self.local_dir.as_deref(),
            &mut record,
        )
        .await
        {
            Ok(holder::Renewal::Renewed) => {}
            Ok(holder::Renewal::TakenOver(h)) => {
                tracing::warn!(holder = %h, "the volume was taken over before its standby open was promoted");
            }
            Ok(holder::Renewal::Gone) => {
                tracing::warn!(
                    "the volume was taken over and let go before its standby open was promoted"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write the volume's holder record; its next renewal will")
            }
        }
    }

    /// Whether the volume's holder record is still this open's.
    pub(super) async fn still_ours(&self) -> bool {
        if self.stop.load(Ordering::Acquire) {
            return false;
        }
        matches!(
            holder::read_holder(&*self.object_store, &self.db_path).await,
            Ok(Some(h)) if h.same_holder(&self.record)
        )
    }

    /// Stop renewing and remove the record (if still ours).
    pub(super) async fn release(&self) {
        self.stop.store(true, Ordering::Release);
        let _turn = self.turn.lock().await;
        if let Err(e) = holder::release(
            &*self.object_store,
            &self.db_path,
            self.local_dir.as_deref(),
            &self.record,
        )
        .await
        {
            tracing::warn!(error = %e, "could not remove the volume's holder record");
        }
    }
}

/// Check the volume against `mode`, claim it for this process, and read
/// the capacity `format` recorded (when the URL names none).
///
/// A standby open keeps the record's lock (`file://`) from its read of the
/// record until the caller drops the lock returned, at the end of its
/// open: an open that would take the volume back claims it only then, so
/// its engine's open fences the standby one and never the other way round.
pub(super) async fn claim(
    cfg: &mut config::VolumeConfig,
    mode: OpenMode,
) -> Result<(Lease, holder::RecordLock), OpenVolumeError> {
    let store = cfg.object_store.clone();
    let records = cfg.record_store.clone();
    let rec = OpenVolumeError::Holder;
    let (held, record_dir) = if mode == OpenMode::Standby {
        let lock = holder::RecordLock::take(cfg.local_dir.as_deref())
            .await
            .map_err(rec)?;
        (lock, None)
    } else {
        (holder::RecordLock::none(), cfg.local_dir.as_deref())
    };
    // The reads at once: each is a request, or a hop to a blocking thread.
    let (exists, recorded, found) = tokio::join!(
        holder::exists(&*store, &cfg.db_path),
        async {
            match cfg.capacity_named {
                true => Ok(None),
                false => holder::read_capacity(&*store, &cfg.db_path).await,
            }
        },
        holder::read_holder(&*records, &cfg.db_path)
    );
    let exists = exists.map_err(rec)?;
    match mode {
        OpenMode::Existing { .. } if !exists => return Err(OpenVolumeError::NoVolume),
        OpenMode::Format { .. } if exists => return Err(OpenVolumeError::Exists),
        OpenMode::Format {
            capacity_bytes: Some(bytes),
        } => {
            holder::write_capacity(&*store, &cfg.db_path, bytes)
                .await
                .map_err(rec)?;
            if !cfg.capacity_named {
                cfg.capacity_bytes = bytes;
            }
        }
        _ => {}
    }
    if let Some(bytes) = recorded.map_err(rec)? {
        cfg.capacity_bytes = bytes;
    }
    let standby = mode == OpenMode::Standby;
    let take_over = !matches!(
        mode,
        OpenMode::Existing { take_over: false } | OpenMode::Standby
    );
    let me = holder::Holder {
        standby,
        ..holder::Holder::this_process()
    };
    if let Some(h) = found.map_err(rec)? {
        if h.is_live(&me.host, me.since) {
            if h.standby && !standby {
                tracing::info!(volume = %cfg.describe, holder = %h, "taking the volume back from a migration destination on standby");
            } else if !take_over {
                return Err(OpenVolumeError::Held(h));
            } else {
                tracing::warn!(volume = %cfg.describe, holder = %h, "taking the volume over: its holder is fenced");
            }
        }
    }
    holder::write_holder(&*records, &cfg.db_path, record_dir, &me)
        .await
        .map_err(rec)?;
    let lease = Lease {
        record: me,
        object_store: records,
        db_path: cfg.db_path.clone(),
        local_dir: cfg.local_dir.clone(),
        stop: Arc::default(),
        standby: Arc::new(AtomicBool::new(standby)),
        turn: Arc::default(),
    };
    Ok((lease, held))
}

/// Renew the holder record every [`holder::RENEW_SECS`] until released.
async fn renew(
    object_store: Arc<dyn object_store::ObjectStore>,
    db_path: String,
    local_dir: Option<std::path::PathBuf>,
    mut record: holder::Holder,
    stop: Arc<AtomicBool>,
    standby: Arc<AtomicBool>,
    turn: Arc<tokio::sync::Mutex<()>>,
) {
    loop {
        tokio::time::sleep(holder::renew_period()).await;
        let _turn = turn.lock().await;
        if stop.load(Ordering::Acquire) {
            return;
        }
        record.standby = standby.load(Ordering::Acquire);
        // Another opener took the volume over (this instance is fenced):
        // its record stays, and this one renews no more.
        match holder::renew(&*object_store, &db_path, local_dir.as_deref(), &mut record).await {
            Ok(holder::Renewal::Renewed) => {}
            Ok(holder::Renewal::TakenOver(h)) => {
                tracing::warn!(holder = %h, "the volume was taken over; its holder record is no longer renewed here");
                stop.store(true, Ordering::Release);
                return;
            }
            Ok(holder::Renewal::Gone) => {
                tracing::warn!("the volume was taken over and let go since; its holder record is no longer renewed here");
                stop.store(true, Ordering::Release);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the volume's holder record"),
        }
    }
}

/// A migration's destination opens the volume on standby while it waits
/// for the guest's state (`OpenMode::Standby`, `docs/migration.md`).
impl super::SlateStore {
    /// Whether this open is on standby (not promoted yet).
    pub fn on_standby(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::on_standby)
    }

    /// Whether the volume is still this open's: its holder record is, and
    /// the engine has not seen another writer. A standby open taken over
    /// (by the source whose guest ran on) is not.
    pub fn still_held(&self) -> bool {
        let Some(lease) = &self.lease else {
            return false;
        };
        if self.fenced.load(Ordering::Acquire) {
            return false;
        }
        self.rt().is_ok_and(|rt| rt.block_on(lease.still_ours()))
    }

    /// The destination took the guest: the record stops saying standby,
    /// written behind the caller's back (a source that takes the volume
    /// back meanwhile can only be one whose migration failed, whose guest
    /// this destination will never run).
    pub fn promote(&self) {
        let (Some(lease), Ok(rt)) = (&self.lease, self.rt()) else {
            return;
        };
        if !lease.on_standby() {
            return;
        }
        let lease = lease.clone();
        rt.spawn(async move { lease.promote().await });
    }
}
