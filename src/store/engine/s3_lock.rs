//! One snapshot command at a time on an `s3://` volume, as the `flock` of
//! its `snapshots` folder gives a `file://` one (`snapshot.rs`): without
//! it, a clone could register with a snapshot that a concurrent delete had
//! just found without clones, and the delete would remove what the clone
//! stands on.
//!
//! The lock is the object `VOLUME/snapshots.lock`, created only where none
//! exists (`If-None-Match`, which SlateDB's fencing needs of the S3 server
//! anyway) and holding a holder record (`holder.rs`) that its taker renews
//! every [`holder::RENEW_SECS`] (`If-Match` on its own version). A record
//! whose holder no longer runs (this host) or was not renewed within
//! [`holder::LEASE_SECS`] (another host) is replaced, again only if it is
//! still the one read. Every command takes it exclusively (clones too: on
//! `s3://` they take a few requests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::holder::{self, Holder};
use super::snapshot::SnapshotError;

/// The lock's name under the volume's prefix.
pub const LOCK_NAME: &str = "snapshots.lock";

/// How long a waiting command sleeps between two attempts.
const RETRY: Duration = Duration::from_millis(50);

fn object_err(e: object_store::Error) -> SnapshotError {
    SnapshotError::Object(e.to_string())
}

/// The lock of the volume at `volume`, held until [`S3Lock::release`].
pub struct S3Lock {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    renewal: tokio::task::JoinHandle<()>,
}

/// Whether `h` (a record read from the lock) still holds it.
fn holds(h: &Holder, me: &Holder) -> bool {
    // Another lock of this process (its own test, or a command it runs)
    // holds it; `Holder::is_live` calls this process's records stale.
    (h.host == me.host && h.pid == me.pid) || h.is_live(&me.host, holder::now_secs())
}

fn put_opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        ..PutOptions::default()
    }
}

/// Take the snapshot lock of the volume at `volume`, waiting at most
/// `wait` for another command's release: [`SnapshotError::Busy`] then.
pub async fn acquire(
    store: &Arc<dyn ObjectStore>,
    volume: &str,
    wait: Duration,
) -> Result<S3Lock, SnapshotError> {
    let path = ObjectPath::from(format!("{volume}/{LOCK_NAME}"));
    let me = Holder::this_process();
    let record = || PutPayload::from(me.encode().into_bytes());
    let deadline = Instant::now() + wait;
    loop {
        let taken = match store
            .put_opts(&path, record(), put_opts(PutMode::Create))
            .await
        {
            Ok(r) => Some(r),
            Err(object_store::Error::AlreadyExists { .. }) => {
                match store.get(&path).await {
                    Ok(got) => {
                        let version = UpdateVersion {
                            e_tag: got.meta.e_tag.clone(),
                            version: got.meta.version.clone(),
                        };
                        let text = got.bytes().await.map_err(object_err)?;
                        let held = std::str::from_utf8(&text)
                            .ok()
                            .and_then(Holder::parse)
                            .is_some_and(|h| holds(&h, &me));
                        if held {
                            None
                        } else {
                            // Stale (or not a record): replace it, unless
                            // another command replaced it first.
                            match store
                                .put_opts(&path, record(), put_opts(PutMode::Update(version)))
                                .await
                            {
                                Ok(r) => Some(r),
                                Err(object_store::Error::Precondition { .. }) => None,
                                Err(e) => return Err(object_err(e)),
                            }
                        }
                    }
                    // Released between the two requests: try again.
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => return Err(object_err(e)),
                }
            }
            Err(e) => return Err(object_err(e)),
        };
        if let Some(r) = taken {
            let renewal = tokio::spawn(renew(
                store.clone(),
                path.clone(),
                me,
                UpdateVersion {
                    e_tag: r.e_tag,
                    version: r.version,
                },
            ));
            return Ok(S3Lock {
                store: store.clone(),
                path,
                renewal,
            });
        }
        if Instant::now() >= deadline {
            return Err(SnapshotError::Busy(path.to_string().into()));
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Renew the record until aborted; a renewal that finds another record
/// (this command stalled past the lease) stops and says so.
async fn renew(
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    mut me: Holder,
    mut version: UpdateVersion,
) {
    loop {
        tokio::time::sleep(holder::renew_period()).await;
        me.renewed = holder::now_secs();
        let payload = PutPayload::from(me.encode().into_bytes());
        match store
            .put_opts(&path, payload, put_opts(PutMode::Update(version.clone())))
            .await
        {
            Ok(r) => {
                version = UpdateVersion {
                    e_tag: r.e_tag,
                    version: r.version,
                }
            }
            Err(e) => {
                tracing::warn!(lock = %path, error = %e, "the snapshot lock could not be renewed; another command may take it");
                return;
            }
        }
    }
}

impl S3Lock {
    /// Let the lock go: the next command may take it at once. A failed
    /// delete leaves a record that goes stale with this process.
    pub async fn release(self) {
        self.renewal.abort();
        // Deleting a clone removes its prefix, this lock with it.
        let deleted = match self.store.delete(&self.path).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        };
        if let Err(e) = deleted {
            tracing::warn!(lock = %self.path, error = %e, "could not remove the snapshot lock; it goes stale once this process ends");
        }
    }
}
