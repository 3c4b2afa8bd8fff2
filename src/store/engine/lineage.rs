//! The family of an `s3://` volume: where the data objects it inherited
//! live, and which snapshots and clones still refer to its own.
//!
//! A snapshot or clone copies no data object: its extents name the
//! objects of the volume it came from by id. Its **lineage** object
//! (`<prefix>/lineage`) says where each id lives: a list of origins
//! `(bound, prefix)`, ids below the first bound in the first prefix's
//! `data/`, ids from there below the second in the second's, and so on;
//! ids at or above the last bound are the volume's own. A bound is the
//! source's next object id when the snapshot was taken (every object the
//! snapshot refers to was allocated before), and a clone's own ids start
//! at its first open's epoch, above the snapshot's superblock's
//! `open_count`, so at or above every bound of its lineage.
//!
//! An owner knows who refers to its objects by **registrations**
//! (`<owner>/holders/<hex of the holder's prefix>`, holding the bound): a
//! snapshot registers with its volume and with every origin of that
//! volume, a clone with every origin of its snapshot (and with the
//! snapshot itself, bound 0: it keeps no object there, but the snapshot's
//! deletion waits for it). The owner's
//! collector keeps every object below the highest bound registered (while
//! it runs) and, when it sweeps, every object a holder's records
//! (`0x48`) still name below that holder's bound; a holder without its
//! lineage (created or deleted half-way, by a crash) keeps everything
//! below its bound. Holders only ever drop references to inherited
//! objects, never gain them, so a stale read of their records keeps more,
//! never less.
//!
//! This module owns those small objects; it never deletes a data object.

use std::collections::BTreeSet;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use slatedb::config::DbReaderOptions;
use slatedb::{DbReader, DbReaderMode};
use thiserror::Error;

use super::{codec, keys, map_engine_error};
use crate::store::StoreError;

/// The lineage object's name inside a volume's prefix.
pub const LINEAGE: &str = "lineage";

/// The folder of registrations inside an owner's prefix.
pub const HOLDERS_DIR: &str = "holders";

/// The marker of a clone not yet opened: its first open draws a new
/// volume id and removes it (as `snapshot::CLONE_FILE` on `file://`).
pub const CLONED: &str = "CLONED";

/// The most origins a lineage holds (clones of clones of ...).
pub const ORIGINS_MAX: usize = 64;

/// The most registrations an owner reads.
pub const HOLDERS_MAX: usize = 10_000;

/// What a prefix holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// A volume made by `format` (no lineage object).
    #[default]
    Volume,
    /// A read-only point of a volume.
    Snapshot,
    /// A writable volume made from a snapshot.
    Clone,
}

/// Where a range of inherited object ids lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Ids below this (and at or above the previous origin's bound).
    pub bound: u64,
    /// The owner's prefix in the bucket.
    pub prefix: String,
}

/// A volume's lineage (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    pub kind: Kind,
    pub origins: Vec<Origin>,
    /// Unix seconds of the snapshot or clone.
    pub created: u64,
    /// A clone's snapshot (registered there with bound 0: it names no
    /// object of it, but the snapshot's deletion waits for it).
    pub source: Option<String>,
    /// A snapshot's engine checkpoint that its clones start from (taken
    /// with the snapshot, kept until its deletion): a clone then pins it
    /// instead of writing a checkpoint of its own first.
    pub checkpoint: Option<uuid::Uuid>,
}

/// Why a lineage or registration could not be read or written.
#[derive(Debug, Error)]
pub enum LineageError {
    #[error("object store: {0}")]
    Store(#[source] object_store::Error),
    #[error("malformed lineage object at {0}")]
    Malformed(String),
    #[error("read the records of {prefix}")]
    Holder {
        prefix: String,
        #[source]
        source: StoreError,
    },
}

impl From<LineageError> for StoreError {
    fn from(e: LineageError) -> StoreError {
        match e {
            LineageError::Holder { source, .. } => source,
            e => StoreError::Io(std::io::Error::other(e.to_string())),
        }
    }
}

impl Lineage {
    /// The first id this volume allocates itself: the last bound, or 0.
    pub fn own_from(&self) -> u64 {
        self.origins.last().map_or(0, |o| o.bound)
    }

    /// The prefix of the origin holding object `id`; `None`: our own.
    pub fn origin_of(&self, id: u64) -> Option<&str> {
        self.origins
            .iter()
            .find(|o| id < o.bound)
            .map(|o| o.prefix.as_str())
    }

    pub fn encode(&self) -> String {
        let kind = match self.kind {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::Clone => "clone",
        };
        let mut s = format!(
            "pohmelfs lineage v1\nkind {kind}\ncreated {}\n",
            self.created
        );
        if let Some(src) = &self.source {
            s.push_str(&format!("source {src}\n"));
        }
        if let Some(id) = &self.checkpoint {
            s.push_str(&format!("checkpoint {id}\n"));
        }
        for o in &self.origins {
            s.push_str(&format!("origin {:016x} {}\n", o.bound, o.prefix));
        }
        s
    }

    pub fn parse(text: &str) -> Option<Lineage> {
        let mut lines = text.lines();
        if lines.next()? != "pohmelfs lineage v1" {
            return None;
        }
        let mut out = Lineage::default();
        for line in lines {
            let (k, v) = line.split_once(' ')?;
            match k {
                "kind" => {
                    out.kind = match v {
                        "volume" => Kind::Volume,
                        "snapshot" => Kind::Snapshot,
                        "clone" => Kind::Clone,
                        _ => return None,
                    }
                }
                "created" => out.created = v.parse().ok()?,
                "source" => out.source = Some(v.to_string()),
                "checkpoint" => out.checkpoint = Some(v.parse().ok()?),
                "origin" => {
                    let (bound, prefix) = v.split_once(' ')?;
                    let bound = u64::from_str_radix(bound, 16).ok()?;
                    if prefix.is_empty()
                        || out.origins.len() >= ORIGINS_MAX
                        || out.origins.last().is_some_and(|o| o.bound > bound)
                    {
                        return None;
                    }
                    out.origins.push(Origin {
                        bound,
                        prefix: prefix.to_string(),
                    });
                }
                _ => return None,
            }
        }
        Some(out)
    }
}

fn child(prefix: &str, name: &str) -> ObjectPath {
    ObjectPath::from(prefix).join(name)
}

fn registration(owner: &str, holder: &str) -> ObjectPath {
    let name: String = holder.bytes().map(|b| format!("{b:02x}")).collect();
    ObjectPath::from(owner).join(HOLDERS_DIR).join(name)
}

async fn get_text(
    store: &dyn ObjectStore,
    path: &ObjectPath,
) -> Result<Option<String>, LineageError> {
    match store.get(path).await {
        Ok(got) => {
            let bytes = super::holder::small_body(got)
                .await
                .map_err(LineageError::Store)?;
            Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(LineageError::Store(e)),
    }
}

async fn put_text(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    text: String,
) -> Result<(), LineageError> {
    store
        .put(path, PutPayload::from(text.into_bytes()))
        .await
        .map(|_| ())
        .map_err(LineageError::Store)
}

/// Delete `path`; absent is fine.
pub async fn remove(store: &dyn ObjectStore, path: &ObjectPath) -> Result<(), LineageError> {
    match store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(LineageError::Store(e)),
    }
}

/// The lineage of the volume at `prefix`; a plain volume has none.
pub async fn read(store: &dyn ObjectStore, prefix: &str) -> Result<Option<Lineage>, LineageError> {
    match get_text(store, &child(prefix, LINEAGE)).await? {
        None => Ok(None),
        Some(t) => Lineage::parse(&t)
            .map(Some)
            .ok_or_else(|| LineageError::Malformed(prefix.to_string())),
    }
}

/// Write the lineage of the volume at `prefix`: the last step of a
/// snapshot or clone, which makes it complete.
pub async fn write(
    store: &dyn ObjectStore,
    prefix: &str,
    lineage: &Lineage,
) -> Result<(), LineageError> {
    put_text(store, &child(prefix, LINEAGE), lineage.encode()).await
}

/// Whether the clone at `prefix` has not been opened yet.
pub async fn is_unopened_clone(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<bool, LineageError> {
    Ok(get_text(store, &child(prefix, CLONED)).await?.is_some())
}

/// Mark the clone at `prefix` as not opened yet.
pub async fn mark_cloned(
    store: &dyn ObjectStore,
    prefix: &str,
    from: &str,
) -> Result<(), LineageError> {
    put_text(store, &child(prefix, CLONED), format!("clone of {from}\n")).await
}

/// Remove the clone marker once its first open has its own volume id.
pub async fn unmark_cloned(store: &dyn ObjectStore, prefix: &str) -> Result<(), LineageError> {
    remove(store, &child(prefix, CLONED)).await
}

/// Record that `holder` may refer to objects of `owner` below `bound`.
pub async fn register(
    store: &dyn ObjectStore,
    owner: &str,
    holder: &str,
    bound: u64,
) -> Result<(), LineageError> {
    let text = format!("holder {holder}\nbound {bound:016x}\n");
    put_text(store, &registration(owner, holder), text).await
}

/// Drop `holder`'s registration with `owner`.
pub async fn unregister(
    store: &dyn ObjectStore,
    owner: &str,
    holder: &str,
) -> Result<(), LineageError> {
    remove(store, &registration(owner, holder)).await
}

/// One registration: a holder's prefix and its bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub holder: String,
    pub bound: u64,
}

/// The registrations with `owner`, at most [`HOLDERS_MAX`].
pub async fn registrations(
    store: &dyn ObjectStore,
    owner: &str,
) -> Result<Vec<Registration>, LineageError> {
    let dir = child(owner, HOLDERS_DIR);
    let listed = store
        .list_with_delimiter(Some(&dir))
        .await
        .map_err(LineageError::Store)?;
    let mut out = Vec::new();
    for m in listed.objects.iter().take(HOLDERS_MAX) {
        let Some(text) = get_text(store, &m.location).await? else {
            continue;
        };
        let mut holder = None;
        let mut bound = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("holder", h)) => holder = Some(h.to_string()),
                Some(("bound", b)) => bound = u64::from_str_radix(b, 16).ok(),
                _ => {}
            }
        }
        match (holder, bound) {
            (Some(holder), Some(bound)) => out.push(Registration { holder, bound }),
            _ => return Err(LineageError::Malformed(m.location.to_string())),
        }
    }
    out.sort_by(|a, b| a.holder.cmp(&b.holder));
    Ok(out)
}

/// The highest bound registered with `owner` (0: nobody refers to its
/// objects).
pub async fn shared_below(store: &dyn ObjectStore, owner: &str) -> Result<u64, LineageError> {
    Ok(registrations(store, owner)
        .await?
        .iter()
        .map(|r| r.bound)
        .max()
        .unwrap_or(0))
}

/// The ids of data objects the records (`0x48`) of the volume at
/// `prefix` name.
pub async fn object_records(
    store: Arc<dyn ObjectStore>,
    prefix: &str,
) -> Result<BTreeSet<u64>, StoreError> {
    let options = DbReaderOptions {
        object_store_max_retries: Some(3),
        ..DbReaderOptions::default()
    };
    let reader = DbReader::open(
        prefix.to_string(),
        store,
        DbReaderMode::FollowLatest,
        options,
    )
    .await
    .map_err(map_engine_error)?;
    let mut out = BTreeSet::new();
    let scanned = async {
        let mut iter = reader
            .scan(keys::segments_all())
            .await
            .map_err(map_engine_error)?;
        while let Some(kv) = iter.next().await.map_err(map_engine_error)? {
            if codec::decode_segment(&kv.value)? > 0 {
                out.insert(keys::decode_segment(&kv.key)?);
            }
        }
        Ok::<(), StoreError>(())
    }
    .await;
    let _ = reader.close().await;
    scanned.map(|()| out)
}

/// A registration and what its holder keeps: `None` (an incomplete
/// holder: everything below its bound) or the ids its records name below
/// its bound.
pub type Held = (Registration, Option<BTreeSet<u64>>);

/// What the holders of `owner` keep.
pub async fn held(store: &Arc<dyn ObjectStore>, owner: &str) -> Result<Vec<Held>, LineageError> {
    let mut out = Vec::new();
    for r in registrations(&**store, owner).await? {
        if r.bound == 0 {
            // A clone registered with its snapshot: it names none of its
            // objects (a snapshot has none of its own).
            out.push((r, Some(BTreeSet::new())));
            continue;
        }
        let engine = super::holder::exists(&**store, &r.holder)
            .await
            .map_err(LineageError::Store)?;
        let complete = engine && read(&**store, &r.holder).await?.is_some();
        let ids = if complete {
            let ids = object_records(store.clone(), &r.holder)
                .await
                .map_err(|source| LineageError::Holder {
                    prefix: r.holder.clone(),
                    source,
                })?;
            Some(ids.into_iter().filter(|id| *id < r.bound).collect())
        } else {
            None
        };
        out.push((r, ids));
    }
    Ok(out)
}

/// Whether object `id` of the owner is kept by one of `held`.
pub fn is_held(held: &[Held], id: u64) -> bool {
    held.iter()
        .any(|(r, ids)| id < r.bound && ids.as_ref().is_none_or(|ids| ids.contains(&id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_round_trips_and_maps_ids() {
        let l = Lineage {
            kind: Kind::Clone,
            created: 7,
            source: Some("vols/c1/snapshots/s".into()),
            checkpoint: Some(uuid::Uuid::from_u128(0x1234_5678_9abc_def0)),
            origins: vec![
                Origin {
                    bound: 5 << 32,
                    prefix: "vols/root".into(),
                },
                Origin {
                    bound: 9 << 32 | 3,
                    prefix: "vols/c1".into(),
                },
            ],
        };
        assert_eq!(Lineage::parse(&l.encode()), Some(l.clone()));
        assert_eq!(l.origin_of(1), Some("vols/root"));
        assert_eq!(l.origin_of(5 << 32), Some("vols/c1"));
        assert_eq!(l.origin_of(9 << 32 | 3), None);
        assert_eq!(l.own_from(), 9 << 32 | 3);
        assert_eq!(
            Lineage::parse("pohmelfs lineage v1\norigin 2 a\norigin 1 b\n"),
            None
        );
        assert_eq!(Lineage::parse("lineage"), None);
        assert_eq!(
            Lineage::parse("pohmelfs lineage v1\ncheckpoint not-a-uuid\n"),
            None
        );
    }
}
