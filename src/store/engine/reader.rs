//! [`VolumeReader`]: a volume opened read-only with SlateDB's `DbReader`
//! in `FollowLatest` mode, for the volume checker (`pohmelfs check`) and
//! for serving read-only (`readonly.rs`). It writes nothing to the object
//! store, so unlike opening a [`SlateStore`](super::SlateStore) it fences
//! no writer and leaves the volume exactly as it found it. On `file://` it
//! lays the commit log's records that the engine lacks over what it reads
//! (`overlay.rs`).
//!
//! This module never writes.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use slatedb::config::{DbReaderOptions, ScanOptions};
use slatedb::{DbReader, DbReaderMode};
use thiserror::Error;

use super::keys;
use super::objects::{ObjectFiles, Objects};
use super::overlay::Overlay;
use super::scan::{open_iters, scan_options, KeyRange, Laid, RawScan, VolumeScan};
use super::segment::SegmentFiles;
use super::{config, map_engine_error, recover, OpenVolumeError};
use crate::store::StoreError;

/// Why a volume could not be opened for reading.
#[derive(Debug, Error)]
pub enum OpenReaderError {
    #[error("no volume directory at {0}")]
    Missing(PathBuf),
    #[error("parse volume URL")]
    Url(#[source] OpenVolumeError),
    #[error("start engine runtime")]
    Runtime(#[source] std::io::Error),
    #[error("open engine read-only")]
    Engine(#[source] slatedb::Error),
    #[error("read the commit log")]
    Log(#[source] StoreError),
    #[error("name the snapshot")]
    Snapshot(#[source] super::snapshot::SnapshotError),
    #[error("look for the volume")]
    Holder(#[source] object_store::Error),
    #[error("read the volume's lineage")]
    Lineage(#[source] super::lineage::LineageError),
    #[error("no volume there")]
    NoVolume,
    #[error("read the superblock")]
    Superblock(#[source] StoreError),
    #[error("volume has format version {found}; this build reads version {expected}")]
    FormatVersion { found: u32, expected: u32 },
}

/// A volume opened read-only. See the module documentation.
pub struct VolumeReader {
    reader: DbReader,
    describe: String,
    local_dir: Option<PathBuf>,
    /// The commit log's records the engine lacks.
    overlay: Arc<Overlay>,
    /// The lsn of the last of those records (0: none).
    log_head: u64,
    /// Whether the records' puts and deletes still lay over the engine:
    /// until its view holds the batch of `log_head`. See
    /// [`VolumeReader::overlay_applies`].
    overlay_live: AtomicBool,
    /// The data objects of an `s3://` volume.
    objects: Option<Arc<Objects>>,
    /// Declared last: dropped after the reader, whose tasks run here.
    runtime: tokio::runtime::Runtime,
}

impl VolumeReader {
    /// Open the volume named by a `file://` or `s3://` URL without writing
    /// to it. A `file://` directory must exist (it is never created).
    pub fn open(url: &str) -> Result<VolumeReader, OpenReaderError> {
        let cfg = Self::config(url)?;
        // The checker reads once, soon after it opens: a slow poll is
        // enough.
        Self::with_config(&cfg, Duration::from_secs(60))
    }

    /// The configuration of `url`, whose `file://` directory must exist.
    pub(super) fn config(url: &str) -> Result<config::VolumeConfig, OpenReaderError> {
        if let Some(path) = url.strip_prefix("file://") {
            let path = PathBuf::from(path.split_once('?').map_or(path, |(p, _)| p));
            if !path.is_dir() {
                return Err(OpenReaderError::Missing(path));
            }
        }
        config::parse_with(url, false).map_err(OpenReaderError::Url)
    }

    /// Open the volume of `cfg`; the engine looks for a newer manifest
    /// every `poll` (the commit log is read once, now).
    pub(super) fn with_config(
        cfg: &config::VolumeConfig,
        poll: Duration,
    ) -> Result<VolumeReader, OpenReaderError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pohmelfs-reader")
            .enable_all()
            .build()
            .map_err(OpenReaderError::Runtime)?;
        // The commit log before the engine (see `Overlay::of`).
        let records = match &cfg.local_dir {
            Some(dir) => Overlay::read_log(dir)
                .map_err(|e| OpenReaderError::Log(recover::map_log_error(e)))?,
            None => Vec::new(),
        };
        let options = DbReaderOptions {
            manifest_poll_interval: poll,
            // A missing object must fail rather than retry on.
            object_store_max_retries: Some(3),
            ..DbReaderOptions::default()
        };
        let reader = runtime
            .block_on(DbReader::open(
                cfg.db_path.clone(),
                cfg.object_store.clone(),
                DbReaderMode::FollowLatest,
                options,
            ))
            .map_err(OpenReaderError::Engine)?;
        let log_head = records.iter().map(|r| r.lsn).max().unwrap_or(0);
        let applied = runtime
            .block_on(applied_lsn(&reader))
            .map_err(OpenReaderError::Log)?;
        Ok(VolumeReader {
            reader,
            describe: format!("{} (read-only)", cfg.describe),
            local_dir: cfg.local_dir.clone(),
            overlay: Arc::new(Overlay::of(records, applied)),
            log_head,
            overlay_live: AtomicBool::new(applied < log_head),
            objects: match cfg.local_dir {
                // Only read: its ids are never used.
                None => {
                    let family = runtime
                        .block_on(super::lineage::read(&*cfg.object_store, &cfg.db_path))
                        .map_err(OpenReaderError::Lineage)?
                        .unwrap_or_default();
                    Some(Arc::new(
                        Objects::new(cfg.object_store.clone(), &cfg.db_path, 0)
                            .with_lineage(family, 0),
                    ))
                }
                Some(_) => None,
            },
            runtime,
        })
    }

    /// Whether the commit log's records lay over what the engine reads.
    /// The reader's view moves on once after the open (SlateDB's poller
    /// looks at once for a newer manifest and WAL); once that view holds
    /// the last record's batch, the engine's values are as new as the
    /// records' or newer, and laying the records over them would show
    /// older values over newer ones. Checked before each read, and never
    /// again once false. (A read racing that one move, milliseconds after
    /// the open, may still take a record's value where the engine has
    /// just moved past it; no read after the move does.)
    fn overlay_applies(&self) -> Result<bool, StoreError> {
        if !self.overlay_live.load(Ordering::Acquire) {
            return Ok(false);
        }
        if self.runtime.block_on(applied_lsn(&self.reader))? >= self.log_head {
            self.overlay_live.store(false, Ordering::Release);
            return Ok(false);
        }
        Ok(true)
    }

    /// The records' puts and deletes laid over each of `ranges` (none
    /// once the engine has them all).
    fn laid(&self, ranges: &[KeyRange]) -> Result<Vec<Laid>, StoreError> {
        if !self.overlay_applies()? {
            return Ok(Vec::new());
        }
        Ok(ranges
            .iter()
            .map(|r| self.overlay.range(&r.start, r.end.as_deref()))
            .collect())
    }

    /// Where the volume lives, for messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The key-value pairs of `range` as [`VolumeScan::raw_scan`] gives
    /// them, read through the block cache: for serving, not for scanning
    /// the whole volume.
    pub(super) fn raw_range(&self, range: Range<Vec<u8>>) -> Result<RawScan<'_>, StoreError> {
        let ranges = vec![KeyRange::from(range)];
        let laid = self.laid(&ranges)?;
        let iters =
            self.runtime
                .block_on(open_iters(&self.reader, ranges, &ScanOptions::default()))?;
        Ok(RawScan::new(&self.runtime, iters, laid))
    }
}

/// The lsn of the last batch the engine's view holds (its `log` key,
/// written in every batch); 0 before any.
async fn applied_lsn(reader: &DbReader) -> Result<u64, StoreError> {
    let value = reader.get(keys::log()).await.map_err(map_engine_error)?;
    Ok(value
        .map(|v| recover::decode_lsn(&v))
        .transpose()?
        .unwrap_or(0))
}

impl Drop for VolumeReader {
    fn drop(&mut self) {
        // Nothing was written: a failed close loses nothing.
        if let Err(e) = self.runtime.block_on(self.reader.close()) {
            tracing::debug!(error = %e, "closing volume reader failed");
        }
    }
}

impl VolumeScan for VolumeReader {
    fn object_files(&self) -> Option<ObjectFiles> {
        Some(ObjectFiles::new(
            self.objects.clone()?,
            self.runtime.handle().clone(),
        ))
    }

    fn segment_files(&self) -> Option<SegmentFiles> {
        self.local_dir
            .as_deref()
            .map(|d| SegmentFiles::of_volume(d).with_overlay(self.overlay.clone()))
    }

    fn raw_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if self.overlay_applies()? {
            if let Some(v) = self.overlay.get(key) {
                return Ok(v);
            }
        }
        self.runtime
            .block_on(self.reader.get(key))
            .map_err(map_engine_error)
    }

    fn raw_scan(&self, ranges: Vec<KeyRange>) -> Result<RawScan<'_>, StoreError> {
        let laid = self.laid(&ranges)?;
        let iters = self
            .runtime
            .block_on(open_iters(&self.reader, ranges, &scan_options()))?;
        Ok(RawScan::new(&self.runtime, iters, laid))
    }
}
