//! The holder record an open volume writes (`holder.rs`): the claim
//! before the engine opens, checked against the open's mode, and the
//! lease that renews the record until the volume closes.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::open::OpenMode;
use super::{config, holder, OpenVolumeError};

/// The holder record this instance wrote, renewed until close.
pub(super) struct Lease {
    pub(super) record: holder::Holder,
    object_store: Arc<dyn object_store::ObjectStore>,
    db_path: String,
    /// The volume's directory on `file://`, where the record's lock is.
    local_dir: Option<std::path::PathBuf>,
    stop: Arc<AtomicBool>,
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
        !self.stop.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The task that renews the record until [`Lease::release`].
    pub(super) fn renewal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        renew(
            self.object_store.clone(),
            self.db_path.clone(),
            self.local_dir.clone(),
            self.record.clone(),
            self.stop.clone(),
            self.turn.clone(),
        )
    }

    /// Stop renewing and remove the record (if still ours).
    pub(super) async fn release(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
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
pub(super) async fn claim(
    cfg: &mut config::VolumeConfig,
    mode: OpenMode,
) -> Result<Lease, OpenVolumeError> {
    let store = cfg.object_store.clone();
    let rec = OpenVolumeError::Holder;
    let exists = holder::exists(&*store, &cfg.db_path).await.map_err(rec)?;
    match mode {
        OpenMode::Existing { .. } if !exists => return Err(OpenVolumeError::NoVolume),
        OpenMode::Format { .. } if exists => return Err(OpenVolumeError::Exists),
        OpenMode::Format {
            capacity_bytes: Some(bytes),
        } => holder::write_capacity(&*store, &cfg.db_path, bytes)
            .await
            .map_err(rec)?,
        _ => {}
    }
    if !cfg.capacity_named {
        if let Some(bytes) = holder::read_capacity(&*store, &cfg.db_path)
            .await
            .map_err(rec)?
        {
            cfg.capacity_bytes = bytes;
        }
    }
    let take_over = !matches!(mode, OpenMode::Existing { take_over: false });
    let me = holder::Holder::this_process();
    if let Some(h) = holder::read_holder(&*store, &cfg.db_path)
        .await
        .map_err(rec)?
    {
        if h.is_live(&me.host, me.since) {
            if !take_over {
                return Err(OpenVolumeError::Held(h));
            }
            tracing::warn!(volume = %cfg.describe, holder = %h, "taking the volume over: its holder is fenced");
        }
    }
    holder::write_holder(&*store, &cfg.db_path, cfg.local_dir.as_deref(), &me)
        .await
        .map_err(rec)?;
    Ok(Lease {
        record: me,
        object_store: store,
        db_path: cfg.db_path.clone(),
        local_dir: cfg.local_dir.clone(),
        stop: Arc::default(),
        turn: Arc::default(),
    })
}

/// Renew the holder record every [`holder::RENEW_SECS`] until released.
async fn renew(
    object_store: Arc<dyn object_store::ObjectStore>,
    db_path: String,
    local_dir: Option<std::path::PathBuf>,
    mut record: holder::Holder,
    stop: Arc<AtomicBool>,
    turn: Arc<tokio::sync::Mutex<()>>,
) {
    loop {
        tokio::time::sleep(holder::renew_period()).await;
        let _turn = turn.lock().await;
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        // Another opener took the volume over (this instance is fenced):
        // its record stays, and this one renews no more.
        match holder::renew(&*object_store, &db_path, local_dir.as_deref(), &mut record).await {
            Ok(holder::Renewal::Renewed) => {}
            Ok(holder::Renewal::TakenOver(h)) => {
                tracing::warn!(holder = %h, "the volume was taken over; its holder record is no longer renewed here");
                stop.store(true, std::sync::atomic::Ordering::Release);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the volume's holder record"),
        }
    }
}
