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

use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set by the release: no renewal writes the record after it.
    stop: Arc<AtomicBool>,
    /// Held by a renewal from its check of `stop` to the end of its write,
    /// and by the release: a renewal under way when the lock is released
    /// finishes before the record is deleted. (Aborting the task is not
    /// enough: its request may already be on the wire, and a server that
    /// takes it after the delete, or ignores `If-Match` on a missing
    /// object, writes the record again: a lock this process holds for
    /// good.)
    turn: Arc<tokio::sync::Mutex<()>>,
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
                        let text = holder::small_body(got).await.map_err(object_err)?;
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
            let (stop, turn) = (Arc::default(), Arc::default());
            let renewal = tokio::spawn(renew(
                store.clone(),
                path.clone(),
                me,
                UpdateVersion {
                    e_tag: r.e_tag,
                    version: r.version,
                },
                Arc::clone(&stop),
                Arc::clone(&turn),
            ));
            return Ok(S3Lock {
                store: store.clone(),
                path,
                renewal,
                stop,
                turn,
            });
        }
        if Instant::now() >= deadline {
            return Err(SnapshotError::Busy(path.to_string().into()));
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Renew the record until stopped; a renewal that finds another record
/// (this command stalled past the lease) stops and says so.
async fn renew(
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    mut me: Holder,
    mut version: UpdateVersion,
    stop: Arc<AtomicBool>,
    turn: Arc<tokio::sync::Mutex<()>>,
) {
    loop {
        tokio::time::sleep(holder::renew_period()).await;
        let _turn = turn.lock().await;
        if stop.load(Ordering::Acquire) {
            return;
        }
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
        self.stop.store(true, Ordering::Release);
        {
            // A renewal under way ends its write first.
            let _turn = self.turn.lock().await;
        }
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

#[cfg(test)]
mod tests {
    //! The release against a renewal already on the wire.

    use std::fmt;
    use std::ops::Range;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use bytes::Bytes;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutResult, Result,
    };

    use super::*;

    /// An S3 server as far as the lock can tell, whose renewals (updates)
    /// are held at a latch once [`Wire::hold`] is set, as a request on
    /// the wire is: dropping the caller does not take them back. It
    /// takes them as plain writes, as a server that ignores `If-Match`
    /// on a missing object does.
    #[derive(Debug, Default)]
    struct Wire {
        inner: InMemory,
        hold: AtomicBool,
        held: AtomicUsize,
        latch: tokio::sync::Notify,
        /// Whether a delete came while a held update was still out.
        deleted_under: Mutex<Option<bool>>,
    }

    impl fmt::Display for Wire {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "wire")
        }
    }

    #[async_trait]
    impl ObjectStore for Wire {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> Result<PutResult> {
            if !matches!(opts.mode, PutMode::Update(_)) || !self.hold.load(Ordering::SeqCst) {
                return self.inner.put_opts(location, payload, opts).await;
            }
            self.held.fetch_add(1, Ordering::SeqCst);
            self.latch.notified().await;
            let r = self
                .inner
                .put_opts(location, payload, put_opts(PutMode::Overwrite))
                .await;
            self.held.fetch_sub(1, Ordering::SeqCst);
            r
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        async fn get_ranges(
            &self,
            location: &ObjectPath,
            ranges: &[Range<u64>],
        ) -> Result<Vec<Bytes>> {
            self.inner.get_ranges(location, ranges).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<ObjectPath>>,
        ) -> BoxStream<'static, Result<ObjectPath>> {
            let under = self.held.load(Ordering::SeqCst) > 0;
            *self.deleted_under.lock().unwrap() = Some(under);
            self.inner.delete_stream(locations)
        }

        fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: CopyOptions,
        ) -> Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A renewal on the wire when the lock is released: the delete waits
    /// for it, so the record does not come back (before, the release
    /// aborted the renewal's task and deleted at once, and the renewal's
    /// write landed after: a lock held for good, every later command of
    /// this process Busy).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_waits_for_a_renewal_on_the_wire() {
        let wire = Arc::new(Wire::default());
        let store: Arc<dyn ObjectStore> = wire.clone();
        let lock = acquire(&store, "vol", Duration::ZERO).await.unwrap();
        wire.hold.store(true, Ordering::SeqCst);
        // The renewal (every 20 ms in tests) reaches the latch.
        let bound = Instant::now() + Duration::from_secs(30);
        while wire.held.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < bound, "no renewal in 30 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let release = tokio::spawn(lock.release());
        // A delete would come at once before; give it 300 ms to show.
        let bound = Instant::now() + Duration::from_millis(300);
        while wire.deleted_under.lock().unwrap().is_none() && Instant::now() < bound {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wire.latch.notify_waiters();
        release.await.unwrap();
        assert_eq!(
            *wire.deleted_under.lock().unwrap(),
            Some(false),
            "the delete went out with the renewal still on the wire"
        );
        let path = ObjectPath::from(format!("vol/{LOCK_NAME}"));
        assert!(
            matches!(
                store.head(&path).await,
                Err(object_store::Error::NotFound { .. })
            ),
            "the released lock is there again"
        );
        // The next command takes it at once.
        acquire(&store, "vol", Duration::ZERO)
            .await
            .unwrap()
            .release()
            .await;
    }
}
