//! The vhost-user-fs device: listens on the vhost-user socket, serves one
//! frontend (QEMU, cloud-hypervisor) at a time, and by default waits for the
//! next one when it disconnects, so a guest can reboot or a VMM restart.
//!
//! On disconnect it drains the requests in flight, makes the store durable
//! (`Store::sync`) and forgets the guest session; it never drops what the
//! filesystem holds.

#[cfg(test)]
pub(crate) mod alloc_probe;
mod backend;
#[cfg(any(test, feature = "fuzzing"))]
mod chains;
#[cfg(test)]
mod dirty_log_tests;
#[cfg(test)]
mod frontend_kit;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz;
#[cfg(test)]
mod handover_tests;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod inline_bench;
mod migrate;
#[cfg(test)]
mod migrate_tests;
mod outstanding;
mod pool;
#[cfg(test)]
mod read_bench;
#[cfg(test)]
mod readonly_tests;
mod request;
#[cfg(test)]
mod standby_tests;
pub mod state;
#[cfg(test)]
mod stop_tests;
#[cfg(test)]
mod testkit;
mod validate;
mod vring;

pub use backend::{DeviceConfig, FsBackend, TAG_MAX};
pub use pool::WorkerPool;

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::fs::PohmelFs;
use crate::metrics::Metrics;
use request::Requests;

/// How long a disconnect waits for requests in flight to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the device could not start or keep serving.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("socket path {0} is in use by a running process")]
    SocketInUse(PathBuf),
    #[error("socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot remove stale socket {0}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    #[error("tag {0:?} is longer than {TAG_MAX} bytes or empty")]
    BadTag(String),
    #[error("cannot start the worker pool")]
    Pool(#[source] std::io::Error),
    // vhost_user_backend::Error implements Display but not Error, so it is
    // carried as text.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot accept a frontend connection: {0}")]
    Accept(String),
}

/// How the device runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub socket_path: PathBuf,
    pub device: DeviceConfig,
    pub threads: usize,
    /// Jobs queued for the workers at most.
    pub queue_depth: usize,
    /// Exit after the first frontend disconnects.
    pub once: bool,
}

/// The tracing filter `serve` installs for the log level `level`: the
/// given one, with fuse-backend-rs's own lines turned off unless `level`
/// names that crate. Every line it logs on the virtio-fs path is about a
/// guest request the device already counts and logs through its limit;
/// its own lines are unthrottled, one per bad request at error level, and
/// some echo the whole request body (up to 1 MiB, `{:?}`-formatted) when
/// a name has no NUL (`docs/security.md`). `--log-level
/// info,fuse_backend_rs=info` brings them back for debugging.
pub fn log_filter(level: &str) -> String {
    if level.contains("fuse_backend_rs") {
        level.to_string()
    } else {
        format!("{level},fuse_backend_rs=off")
    }
}

/// Check the socket path before binding: refuse one a live process listens
/// on, remove a stale one, refuse anything that is not a socket.
pub fn prepare_socket_path(path: &Path) -> Result<(), DeviceError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DeviceError::RemoveStale(path.to_path_buf(), e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(DeviceError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(DeviceError::SocketInUse(path.to_path_buf())),
            Err(_) => std::fs::remove_file(path)
                .map_err(|e| DeviceError::RemoveStale(path.to_path_buf(), e)),
        },
    }
}

/// Bind the vhost-user socket. Done before anything slow so that a bad path
/// fails at once and a VMM can connect as soon as the command returns.
pub fn bind(path: &Path) -> Result<Listener, DeviceError> {
    prepare_socket_path(path)?;
    Listener::new(path, false).map_err(|e| DeviceError::Listen(path.to_path_buf(), e))
}

/// Serve frontends on `listener` until `once` says stop.
pub fn serve(
    cfg: &ServeConfig,
    mut listener: Listener,
    fs: Arc<PohmelFs>,
    metrics: Arc<Metrics>,
) -> Result<(), DeviceError> {
    if let Some(tag) = &cfg.device.tag {
        if tag.is_empty() || tag.len() > TAG_MAX {
            return Err(DeviceError::BadTag(tag.clone()));
        }
    }
    let requests = Arc::new(Requests::new(Arc::clone(&fs), Arc::clone(&metrics)));
    let pool = Arc::new(
        WorkerPool::new(cfg.threads, cfg.queue_depth, Arc::clone(&metrics))
            .map_err(DeviceError::Pool)?,
    );
    info!(socket = %cfg.socket_path.display(), "waiting for a frontend");
    loop {
        let backend = Arc::new(FsBackend::new(
            cfg.device.clone(),
            Arc::clone(&requests),
            Arc::clone(&pool),
            Arc::clone(&metrics),
        ));
        let mut daemon = vring::watched(backend.rings(), || {
            VhostUserDaemon::new(
                "pohmelfs".to_string(),
                Arc::clone(&backend),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
        })
        .map_err(|e| DeviceError::Daemon(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| DeviceError::Accept(e.to_string()))?;
        metrics.connections.inc();
        fs.new_frontend();
        info!("frontend connected");
        if let Err(e) = daemon.wait() {
            // A VMM that exits mid-message is a disconnect like any other.
            info!(reason = %e, "frontend connection ended");
        } else {
            info!("frontend disconnected");
        }
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        let stuck = pool.drain(DRAIN_TIMEOUT);
        if stuck > 0 {
            warn!(
                stuck,
                "requests still running after the disconnect drain timeout"
            );
        }
        if let Err(e) = fs.sync_all() {
            warn!(error = %crate::ErrorChain(&e), "could not make the volume durable after disconnect");
        }
        if backend.handed_off() && fs.volume_held() != Some(true) {
            // Migrated: the destination holds the guest's references now,
            // and the unlinked inodes they keep alive stay. (A volume open
            // again here means the migration failed: the session is ours.)
            fs.hand_off_session();
        } else if fs.state_taken_unserved() {
            // A destination whose guest never ran here: the migration
            // failed after the state, and the source may resume the
            // guest, with its unlinked files, on the volume it needs back.
            warn!("migration: the frontend went before the guest ran here (the migration failed after the state): the session and the volume go back to the source");
            fs.hand_off_session();
            if let Err(e) = fs.release_volume() {
                warn!(error = %crate::ErrorChain(&e), "could not let the volume go after the failed migration");
            }
        } else {
            fs.reset_session();
        }
        info!(counters = %metrics.summary(), "session ended");
        if cfg.once {
            return Ok(());
        }
        info!(socket = %cfg.socket_path.display(), "waiting for the next frontend");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn socket_path_checks() {
        let dir = std::env::temp_dir().join(format!("pohmelfs-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let live = dir.join("live.sock");
        let _l = UnixListener::bind(&live).unwrap();
        assert!(matches!(
            prepare_socket_path(&live),
            Err(DeviceError::SocketInUse(_))
        ));

        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        prepare_socket_path(&stale).unwrap();
        assert!(!stale.exists());

        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_socket_path(&file),
            Err(DeviceError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn upstream_lines_are_off_unless_asked_for() {
        use tracing::subscriber::with_default;
        use tracing_subscriber::layer::SubscriberExt;

        assert_eq!(log_filter("info"), "info,fuse_backend_rs=off");
        let asked = "debug,fuse_backend_rs=info";
        assert_eq!(log_filter(asked), asked);
        // The filter parses and silences exactly the upstream crate's targets.
        let filter = tracing_subscriber::EnvFilter::try_new(log_filter("info")).unwrap();
        let subscriber = tracing_subscriber::registry().with(filter);
        with_default(subscriber, || {
            assert!(tracing::enabled!(target: "pohmelfs::device", tracing::Level::WARN));
            assert!(!tracing::enabled!(
                target: "fuse_backend_rs::api::server::sync_io",
                tracing::Level::ERROR
            ));
        });
    }
}
