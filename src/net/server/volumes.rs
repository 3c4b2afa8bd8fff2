//! The volumes a store server has open, by name, and the cap on how many.
//!
//! The map is locked only to find or insert a volume's cell, never while a
//! volume opens (a slow SlateDB open on object storage): each volume opens
//! once, in a task of its own, and every connection that names it waits on
//! the same cell.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::writer::Served;
use crate::store::engine::OpenMode;

type Cell = Arc<OnceCell<Arc<Served>>>;

/// Why a volume could not be had.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("this server serves at most {0} volumes")]
    Limit(usize),
    #[error("volume {0} cannot be opened (the server's log says why)")]
    Open(String),
    #[error("no volume {0} on this server; create it with pohmelfs format DATA/{0} where the server keeps its volumes")]
    Missing(String),
}

pub struct Volumes {
    base: String,
    max: usize,
    /// Create volumes that do not exist (`ServerConfig::create_volumes`).
    create: bool,
    /// The writer lease of every volume (`ServerConfig::writer_lease`).
    lease: std::time::Duration,
    open: Mutex<HashMap<String, Cell>>,
}

impl Volumes {
    pub fn new(base: String, max: usize, create: bool, lease: std::time::Duration) -> Volumes {
        Volumes {
            base,
            max,
            create,
            lease,
            open: Mutex::new(HashMap::new()),
        }
    }

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

    /// The open volume `name`, opening it on first use.
    pub async fn get(self: &Arc<Self>, name: &str) -> Result<Arc<Served>, VolumeError> {
        let cell = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            match open.get(name) {
                Some(c) => Arc::clone(c),
                None => {
                    if open.len() >= self.max {
                        return Err(VolumeError::Limit(self.max));
                    }
                    let c: Cell = Arc::default();
                    open.insert(name.to_owned(), Arc::clone(&c));
                    c
                }
            }
        };
        if let Some(v) = cell.get() {
            return Ok(Arc::clone(v));
        }
        // The open runs in a task of its own: a waiter that gives up (its
        // handshake timed out) does not abandon an open half done.
        let (this, name_owned, task_cell) = (Arc::clone(self), name.to_owned(), Arc::clone(&cell));
        let opened = tokio::spawn(async move {
            task_cell
                .get_or_try_init(|| this.open_volume(name_owned))
                .await
                .map(Arc::clone)
        })
        .await
        .unwrap_or(Err(false));
        opened.map_err(|missing| {
            // Forget the failed cell, so the count holds only open volumes
            // and a later connection tries again.
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if open
                .get(name)
                .is_some_and(|c| Arc::ptr_eq(c, &cell) && c.get().is_none())
            {
                open.remove(name);
            }
            if missing {
                VolumeError::Missing(name.to_owned())
            } else {
                VolumeError::Open(name.to_owned())
            }
        })
    }

    /// The open volume, or `Err(true)` when it does not exist (and may not
    /// be created), `Err(false)` when it failed otherwise.
    async fn open_volume(self: Arc<Self>, name: String) -> Result<Arc<Served>, bool> {
        let url = self.url(&name);
        let shown = super::super::redact_url(&url);
        let mode = if self.create {
            OpenMode::Any
        } else {
            OpenMode::Existing { take_over: true }
        };
        let lease = self.lease;
        let opened = tokio::task::spawn_blocking({
            let url = url.clone();
            move || {
                let store = crate::store::open_once_as(&url, mode).map_err(|e| {
                    let missing = matches!(e, crate::store::OpenError::NoVolume { .. });
                    (missing, crate::ErrorChain(&e).to_string())
                })?;
                // The writer claim recorded in the volume, if any.
                Served::new(store, lease)
                    .map(Arc::new)
                    .map_err(|e| (false, crate::ErrorChain(&e).to_string()))
            }
        })
        .await
        .unwrap_or_else(|e| Err((false, format!("open task failed: {e}"))));
        match opened {
            Ok(v) => {
                let claim = v.writer().map(|c| c.claim);
                info!(volume = %name, url = %shown, epoch = v.store.epoch(), ?claim, "volume open");
                Ok(v)
            }
            Err((missing, e)) => {
                warn!(volume = %name, error = %e.replace(&url, &shown), "cannot open volume");
                Err(missing)
            }
        }
    }

    /// Every open volume, for shutdown.
    pub fn all(&self) -> Vec<(String, Arc<Served>)> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(n, c)| c.get().map(|v| (n.clone(), Arc::clone(v))))
            .collect()
    }
}
