//! Snapshots and clones of an `s3://` volume: SlateDB clones for the
//! metadata, shared data objects, registrations for their accounting.
//!
//! **Snapshot** `NAME` of the volume at prefix `V` is a SlateDB clone at
//! `V/snapshots/NAME` that nothing opens for writing (its lineage says
//! `kind snapshot`). The process that holds `V` takes it, under the
//! commit lock (between two transactions): the engine's memtable is
//! flushed into a table and its manifest (SlateDB's clone copies only the
//! WAL objects a manifest has seen), so every acknowledged commit is
//! there; the bound (the next
//! data object id: every object the snapshot refers to was allocated
//! before) is registered with `V` and with every origin of `V`
//! (`lineage.rs`), and kept in memory, so from then on the deleter keeps
//! every object below it; then SlateDB's clone pins `V`'s tables by a
//! checkpoint in `V`'s manifest and copies only the WAL objects not yet
//! in a table. Then, with commits going on, a checkpoint of the
//! snapshot's own engine is pinned for its clones, and last the lineage
//! object (naming that checkpoint) is written: the snapshot is complete.
//! Commits wait only for the flush, the registrations and SlateDB's clone
//! (a few PUTs); no data object is copied.
//!
//! **Clone** `DST` of a snapshot: the lineage (`kind clone`, so a crash
//! from here on leaves a clone `clone --delete` removes), registrations
//! with every origin of the snapshot (and with the snapshot, bound 0),
//! the marker that makes its first open draw a volume id of its own,
//! then SlateDB's clone of the snapshot's engine from its pinned
//! checkpoint. Its own objects go to `DST/data/`, with ids from
//! its first open's epoch on, above every bound of its lineage.
//!
//! **Crashes.** A snapshot or clone is complete once it has both its
//! lineage and its engine's manifest; an owner's sweep reads a complete
//! holder's records and keeps everything below an incomplete one's
//! bound. An open of `V` removes its own incomplete snapshots (only its
//! holder takes them); an incomplete clone stays until `clone --delete`.
//!
//! **Deleting** a snapshot (refused while clones of it exist) or a clone
//! (refused while it has snapshots): its registrations are removed first,
//! then SlateDB deletes its engine (and strips the checkpoint it pinned in
//! its source) and every object under its prefix, its own data objects
//! with them. What no one else names is then deleted by the owners'
//! sweeps: at once for an owner no daemon holds (the command opens it),
//! else at the owner's next open.

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use slatedb::admin::{AdminBuilder, CloneSourceSpec};

use super::lineage::{self, Kind, Lineage, LineageError, Origin};
use super::s3_lock;
use super::snapshot::{check_name, SnapshotError, BUSY_WAIT, SNAPSHOTS_DIR};
use super::{config, holder, map_engine_error, SlateStore};

/// The most folders a deletion walks after SlateDB's own.
const DELETE_DIRS_MAX: usize = 1024;

fn store_err(e: LineageError) -> SnapshotError {
    SnapshotError::Object(e.to_string())
}

fn engine_err(what: &'static str) -> impl FnOnce(slatedb::Error) -> SnapshotError {
    move |e| SnapshotError::Object(format!("{what}: {}", map_engine_error(e)))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The prefix of snapshot `name` of the volume at `volume`.
pub fn snapshot_prefix(volume: &str, name: &str) -> Result<String, SnapshotError> {
    check_name(name)?;
    Ok(format!("{volume}/{SNAPSHOTS_DIR}/{name}"))
}

/// Whether the snapshot or clone at `prefix` is complete: its lineage and
/// its engine's manifest are there.
async fn complete(store: &dyn ObjectStore, prefix: &str) -> Result<Option<Lineage>, SnapshotError> {
    // One round trip: the two reads do not depend on each other.
    let (l, engine) = tokio::join!(lineage::read(store, prefix), holder::exists(store, prefix));
    let l = l.map_err(store_err)?;
    let engine = engine.map_err(|e| SnapshotError::Object(e.to_string()))?;
    Ok(l.filter(|_| engine))
}

/// Copy the capacity `format` recorded, if any.
async fn copy_settings(store: &dyn ObjectStore, from: &str, to: &str) -> Result<(), SnapshotError> {
    let map = |e: object_store::Error| SnapshotError::Object(e.to_string());
    if let Some(bytes) = holder::read_capacity(store, from).await.map_err(map)? {
        holder::write_capacity(store, to, bytes)
            .await
            .map_err(map)?;
    }
    Ok(())
}

/// The name of the checkpoint a snapshot's clones start from.
const CLONES_CHECKPOINT: &str = "pohmelfs-clones";

/// Pin the engine of the snapshot at `snap` for its clones: a checkpoint
/// with no expiry (it goes with the snapshot). A clone started from a
/// named checkpoint reads it where SlateDB would otherwise first write a
/// checkpoint of the snapshot's latest state (two requests in a row
/// saved per clone: the write and its boundary reads, less the boundary
/// check of the older manifest read instead; and no short-lived
/// checkpoint piling up in the snapshot's manifest).
async fn pin_for_clones(
    store: &Arc<dyn ObjectStore>,
    snap: &str,
) -> Result<uuid::Uuid, SnapshotError> {
    let options = slatedb::config::CheckpointOptions {
        lifetime: None,
        source: None,
        name: Some(CLONES_CHECKPOINT.to_string()),
    };
    let pinned = AdminBuilder::new(snap.to_string(), store.clone())
        .build()
        .create_detached_checkpoint(&options)
        .await
        .map_err(engine_err("pin the snapshot for its clones"))?;
    Ok(pinned.id)
}

/// Delete the engine and every object under `prefix` (its own data
/// objects with them), stripping the checkpoint it pinned in its source.
async fn delete_prefix(store: &Arc<dyn ObjectStore>, prefix: &str) -> Result<(), SnapshotError> {
    let admin = AdminBuilder::new(prefix.to_string(), store.clone()).build();
    if holder::exists(&**store, prefix)
        .await
        .map_err(|e| SnapshotError::Object(e.to_string()))?
    {
        admin
            .delete_db(true)
            .await
            .map_err(engine_err("delete the engine"))?;
    }
    // What delete_db leaves (no manifest: a crash before the clone), a
    // few levels deep (lineage, markers, settings, holders/).
    let mut dirs = vec![ObjectPath::from(prefix)];
    let mut seen = 0usize;
    while let Some(dir) = dirs.pop() {
        seen += 1;
        if seen > DELETE_DIRS_MAX {
            return Err(SnapshotError::Object(format!(
                "more than {DELETE_DIRS_MAX} folders under {prefix}"
            )));
        }
        let listed = store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|e| SnapshotError::Object(e.to_string()))?;
        for m in listed.objects {
            lineage::remove(&**store, &m.location)
                .await
                .map_err(store_err)?;
        }
        dirs.extend(listed.common_prefixes);
    }
    Ok(())
}

/// Remove the snapshot or clone at `holder`: its registrations with
/// `origins`, then everything under its prefix.
async fn remove_holder(
    store: &Arc<dyn ObjectStore>,
    holder: &str,
    origins: &[Origin],
) -> Result<(), SnapshotError> {
    for o in origins {
        lineage::unregister(&**store, &o.prefix, holder)
            .await
            .map_err(store_err)?;
    }
    delete_prefix(store, holder).await
}

/// Remove what interrupted snapshots of the volume at `volume` left: an
/// open does this once it holds the volume (nobody else snapshots it).
pub async fn remove_leftovers(
    store: &Arc<dyn ObjectStore>,
    volume: &str,
    own: &Lineage,
) -> Result<usize, SnapshotError> {
    // A snapshot command running now is not interrupted: leave its work.
    let lock = match s3_lock::acquire(store, volume, std::time::Duration::ZERO).await {
        Ok(lock) => lock,
        Err(SnapshotError::Busy(_)) => return Ok(0),
        Err(e) => return Err(e),
    };
    let removed = remove_leftovers_locked(store, volume, own).await;
    lock.release().await;
    removed
}

async fn remove_leftovers_locked(
    store: &Arc<dyn ObjectStore>,
    volume: &str,
    own: &Lineage,
) -> Result<usize, SnapshotError> {
    let mine = format!("{volume}/{SNAPSHOTS_DIR}/");
    let mut removed = 0;
    for r in lineage::registrations(&**store, volume)
        .await
        .map_err(store_err)?
    {
        if !r.holder.starts_with(&mine) || complete(&**store, &r.holder).await?.is_some() {
            continue;
        }
        let mut origins = own.origins.clone();
        origins.push(Origin {
            bound: r.bound,
            prefix: volume.to_string(),
        });
        remove_holder(store, &r.holder, &origins).await?;
        removed += 1;
    }
    Ok(removed)
}

impl SlateStore {
    /// Take snapshot `name` of this volume, of its kind: on `s3://` (data
    /// objects, no segments) here, else by hard links (`snapshot.rs`);
    /// where it is.
    pub fn take_any_snapshot(&self, name: &str) -> Result<String, SnapshotError> {
        if self.segments.is_none() && self.objects.is_some() {
            self.take_object_snapshot(name)
        } else {
            self.take_snapshot(name).map(|p| p.display().to_string())
        }
    }

    /// Take snapshot `name` of this `s3://` volume (see the module
    /// documentation); its prefix in the bucket.
    pub fn take_object_snapshot(&self, name: &str) -> Result<String, SnapshotError> {
        let objects = self.objects.as_ref().ok_or(SnapshotError::NotSupported)?;
        let store = objects.store().clone();
        let volume = objects.db_path().to_string();
        let snap = snapshot_prefix(&volume, name)?;
        let rt = self.rt().map_err(SnapshotError::Checkpoint)?;
        rt.block_on(locked(&store, &volume, async {
            if lineage::read(&*store, &snap)
                .await
                .map_err(store_err)?
                .is_some()
            {
                return Err(SnapshotError::Exists(name.to_string()));
            }
            let serial = self.commit_lock.lock().await;
            // Into a table: SlateDB's clone copies only the WAL objects
            // its source's manifest has seen.
            self.db
                .flush_with_options(slatedb::config::FlushOptions {
                    flush_type: slatedb::config::FlushType::MemTable,
                })
                .await
                .map_err(|e| SnapshotError::Checkpoint(map_engine_error(e)))?;
            let bound = objects.next_unallocated();
            objects.share_below(bound);
            let mut origins = objects.lineage().origins.clone();
            origins.push(Origin {
                bound,
                prefix: volume.clone(),
            });
            for o in &origins {
                lineage::register(&*store, &o.prefix, &snap, o.bound)
                    .await
                    .map_err(store_err)?;
            }
            AdminBuilder::new(snap.clone(), store.clone())
                .build()
                .create_clone_builder_from_source(CloneSourceSpec::new(volume.clone()))
                .build()
                .await
                .map_err(engine_err("clone the engine"))?;
            drop(serial);
            let (pin, ()) = tokio::try_join!(
                pin_for_clones(&store, &snap),
                copy_settings(&*store, &volume, &snap)
            )?;
            super::snapshot::pause_for_crash_test();
            let l = Lineage {
                kind: Kind::Snapshot,
                origins,
                created: now_secs(),
                source: None,
                checkpoint: Some(pin),
            };
            lineage::write(&*store, &snap, &l).await.map_err(store_err)
        }))?;
        tracing::info!(volume = %self.describe, snapshot = name, "snapshot taken");
        Ok(snap)
    }
}

/// A volume URL's object store and prefix, and its bucket.
fn open_config(url: &str) -> Result<(config::VolumeConfig, String), SnapshotError> {
    let bucket = url
        .strip_prefix("s3://")
        .and_then(|r| r.split(['/', '?']).next())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| SnapshotError::BadUrl(url.to_string()))?
        .to_string();
    let cfg = config::parse_with(url, false).map_err(|e| SnapshotError::Object(e.to_string()))?;
    Ok((cfg, bucket))
}

/// Run `f` holding the snapshot lock of the volume at `volume`
/// (`s3_lock.rs`), waiting at most [`BUSY_WAIT`] for it.
async fn locked<T>(
    store: &Arc<dyn ObjectStore>,
    volume: &str,
    f: impl std::future::Future<Output = Result<T, SnapshotError>>,
) -> Result<T, SnapshotError> {
    let lock = s3_lock::acquire(store, volume, BUSY_WAIT).await?;
    let out = f.await;
    lock.release().await;
    out
}

fn block_on<T>(
    f: impl std::future::Future<Output = Result<T, SnapshotError>>,
) -> Result<T, SnapshotError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SnapshotError::Object(e.to_string()))?
        .block_on(f)
}

/// The complete snapshots of the volume at `url`: name and creation time
/// (unix seconds).
pub fn list(url: &str) -> Result<Vec<(String, u64)>, SnapshotError> {
    let (cfg, _) = open_config(url)?;
    block_on(async {
        let dir = ObjectPath::from(cfg.db_path.as_str()).join(SNAPSHOTS_DIR);
        let listed = cfg
            .object_store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|e| SnapshotError::Object(e.to_string()))?;
        let mut out = Vec::new();
        for p in listed.common_prefixes {
            let Some(name) = p.filename().map(str::to_string) else {
                continue;
            };
            let prefix = snapshot_prefix(&cfg.db_path, &name)?;
            if let Some(l) = complete(&*cfg.object_store, &prefix).await? {
                if l.kind == Kind::Snapshot {
                    out.push((name, l.created));
                }
            }
        }
        out.sort();
        Ok(out)
    })
}

/// The owners a snapshot or clone's deletion may free objects of.
pub type Owners = Vec<String>;

/// Delete snapshot `name` of the volume at `url`; the owners whose sweep
/// frees what it alone kept.
pub fn delete(url: &str, name: &str) -> Result<Owners, SnapshotError> {
    let (cfg, _) = open_config(url)?;
    let store = cfg.object_store.clone();
    let snap = snapshot_prefix(&cfg.db_path, name)?;
    block_on(locked(&store, &cfg.db_path, async {
        let l = lineage::read(&*store, &snap)
            .await
            .map_err(store_err)?
            .filter(|l| l.kind == Kind::Snapshot)
            .ok_or_else(|| SnapshotError::NoSuchSnapshot(name.to_string()))?;
        let clones = lineage::registrations(&*store, &snap)
            .await
            .map_err(store_err)?;
        if !clones.is_empty() {
            return Err(SnapshotError::HasClones(name.to_string(), clones.len()));
        }
        remove_holder(&store, &snap, &l.origins).await?;
        Ok(l.origins.into_iter().map(|o| o.prefix).collect())
    }))
}

/// Make `dst` a clone of snapshot `name` of the volume at `src` (one
/// bucket; `dst` empty). Writes a few small objects and the engine's
/// clone (its manifest and the WAL objects not yet in a table); no data
/// object.
pub fn clone_from(src: &str, name: &str, dst: &str) -> Result<(), SnapshotError> {
    let (scfg, sbucket) = open_config(src)?;
    let (dcfg, dbucket) = open_config(dst)?;
    if sbucket != dbucket {
        return Err(SnapshotError::OtherBucket(dst.to_string()));
    }
    let store = scfg.object_store.clone();
    let snap = snapshot_prefix(&scfg.db_path, name)?;
    let to = dcfg.db_path.clone();
    block_on(locked(&store, &scfg.db_path, async {
        // Independent requests go together: a clone's time is a few
        // round trips, whatever the volume holds.
        let (l, taken, named, capacity) = tokio::join!(
            complete(&*store, &snap),
            holder::exists(&*store, &to),
            lineage::read(&*store, &to),
            holder::read_capacity(&*store, &snap)
        );
        let l = l?
            .filter(|l| l.kind == Kind::Snapshot)
            .ok_or_else(|| SnapshotError::NoSuchSnapshot(name.to_string()))?;
        let taken = taken.map_err(|e| SnapshotError::Object(e.to_string()))?;
        if taken || named.map_err(store_err)?.is_some() {
            return Err(SnapshotError::DestinationExists(to.clone().into()));
        }
        // The lineage first: a crash after it leaves a clone that
        // `clone --delete` can remove (it names its origins).
        let mine = Lineage {
            kind: Kind::Clone,
            origins: l.origins.clone(),
            created: now_secs(),
            source: Some(snap.clone()),
            checkpoint: None,
        };
        lineage::write(&*store, &to, &mine)
            .await
            .map_err(store_err)?;
        let mut set = tokio::task::JoinSet::new();
        let regs = l
            .origins
            .iter()
            .map(|o| (o.prefix.clone(), o.bound))
            .chain(std::iter::once((snap.clone(), 0)));
        for (owner, bound) in regs {
            let (store, to) = (store.clone(), to.clone());
            set.spawn(async move { lineage::register(&*store, &owner, &to, bound).await });
        }
        {
            let (store, to, snap) = (store.clone(), to.clone(), snap.clone());
            set.spawn(async move { lineage::mark_cloned(&*store, &to, &snap).await });
        }
        // The capacity `format` recorded, if any, read with the checks.
        if let Some(bytes) = capacity.map_err(|e| SnapshotError::Object(e.to_string()))? {
            let (store, to) = (store.clone(), to.clone());
            set.spawn(async move {
                holder::write_capacity(&*store, &to, bytes)
                    .await
                    .map_err(lineage::LineageError::Store)
            });
        }
        let registered = async {
            while let Some(r) = set.join_next().await {
                r.map_err(|e| SnapshotError::Object(e.to_string()))?
                    .map_err(store_err)?;
            }
            Ok::<(), SnapshotError>(())
        };
        registered.await?;
        // Only now the engine's clone: a clone whose engine opens is
        // registered with everything it stands on, whenever a crash comes.
        // From the snapshot's pinned checkpoint (snapshots taken before
        // there was one: from its latest state, through a checkpoint
        // SlateDB writes first).
        let source = match l.checkpoint {
            Some(id) => CloneSourceSpec::with_checkpoint(snap.clone(), id),
            None => CloneSourceSpec::new(snap.clone()),
        };
        AdminBuilder::new(to.clone(), store.clone())
            .build()
            .create_clone_builder_from_source(source)
            .build()
            .await
            .map_err(engine_err("clone the engine"))
    }))
}

/// Delete the clone at `url` (refused while it has snapshots, or while a
/// process holds it); the owners whose sweep frees what it alone kept.
pub fn delete_clone(url: &str) -> Result<Owners, SnapshotError> {
    let (cfg, _) = open_config(url)?;
    let store = cfg.object_store.clone();
    let prefix = cfg.db_path.clone();
    block_on(locked(&store, &cfg.db_path, async {
        let l = lineage::read(&*store, &prefix)
            .await
            .map_err(store_err)?
            .filter(|l| l.kind == Kind::Clone)
            .ok_or_else(|| SnapshotError::NotAClone(prefix.clone()))?;
        let held = lineage::registrations(&*store, &prefix)
            .await
            .map_err(store_err)?;
        if !held.is_empty() {
            return Err(SnapshotError::HasSnapshots(prefix.clone(), held.len()));
        }
        let h = holder::read_holder(&*store, &prefix)
            .await
            .map_err(|e| SnapshotError::Object(e.to_string()))?;
        if h.is_some_and(|h| h.is_live(&holder::host_name(), holder::now_secs())) {
            return Err(SnapshotError::Held(prefix.clone()));
        }
        if let Some(src) = &l.source {
            lineage::unregister(&*store, src, &prefix)
                .await
                .map_err(store_err)?;
        }
        remove_holder(&store, &prefix, &l.origins).await?;
        Ok(l.origins.into_iter().map(|o| o.prefix).collect())
    }))
}

/// The URL of the volume at `prefix`, in the bucket and with the options
/// of `like` (an `s3://` URL).
pub fn url_of(like: &str, prefix: &str) -> String {
    let (base, query) = like
        .split_once('?')
        .map_or((like, None), |(b, q)| (b, Some(q)));
    let bucket = base
        .strip_prefix("s3://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    match query {
        Some(q) => format!("s3://{bucket}/{prefix}?{q}"),
        None => format!("s3://{bucket}/{prefix}"),
    }
}
