//! Opening a volume: its holder record claimed (`lease.rs`), the engine
//! on its object store, the superblock (and its format version), the
//! segment files with their reclaimer, the commit log and its replay
//! (`recover.rs`), and the sweep of segments nothing refers to.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use slatedb::Db;

use super::lease::claim;
use super::log::CommitLog;
use super::object_gc;
use super::objects::Objects;
use super::record_cache::RecordCache;
use super::threads::EngineThreads;
use super::{
    born, codec, config, group, keys, map_engine_error, pins, reclaim, recover, segment, Counters,
    IdRange, OpenVolumeError, Placement, Segments, SlateStore, Superblock, FORMAT_VERSION,
    UPGRADES_FROM,
};
use crate::store::{StoreError, FIRST_FREE_ID};

/// A volume's segment files and their reclaimer, or neither.
type SegmentsAndReclaimer = (Option<Arc<Segments>>, Option<Arc<reclaim::Reclaimer>>);

/// The volume for logs: where, which, which open, how commits are made
/// durable.
fn describe(cfg: &config::VolumeConfig, sb: &Superblock) -> String {
    let commit = match (&cfg.local_dir, cfg.log_bytes) {
        (Some(_), Some(_)) => "log",
        _ => cfg.commit_mode.name(),
    };
    format!(
        "{} (slatedb, volume {}, epoch {}, commit={commit})",
        cfg.describe,
        sb.volume_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        sb.open_count,
    )
}

fn random_volume_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id));
    if from_os.is_err() {
        // Not secret, only distinct: time and pid will do.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        id.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    id
}

/// The data objects of a volume without segments (`s3://`, or a test's
/// [`Placement::Objects`]) and their deleter thread; `None` for the
/// others.
fn open_objects(
    cfg: &config::VolumeConfig,
    placement: Placement,
    epoch: u64,
    readers: &Arc<pins::Readers>,
    runtime: &tokio::runtime::Runtime,
) -> std::io::Result<Option<(Arc<Objects>, Arc<object_gc::ObjectGc>)>> {
    match (&cfg.local_dir, placement) {
        (_, Placement::Objects) | (None, Placement::Default) => {}
        _ => return Ok(None),
    }
    let (family, shared_below) = runtime
        .block_on(async {
            let l = super::lineage::read(&*cfg.object_store, &cfg.db_path).await?;
            let below = super::lineage::shared_below(&*cfg.object_store, &cfg.db_path).await?;
            Ok::<_, super::lineage::LineageError>((l.unwrap_or_default(), below))
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let objects = Arc::new(
        Objects::new(cfg.object_store.clone(), &cfg.db_path, epoch)
            .with_lineage(family, shared_below),
    );
    let gc =
        object_gc::ObjectGc::start(objects.clone(), readers.clone(), runtime.handle().clone())?;
    Ok(Some((objects, Arc::new(gc))))
}

/// Refuse an `s3://` snapshot (its lineage says so), as `file://`'s
/// marker does: it is never opened for writing.
fn refuse_s3_snapshot(
    runtime: &tokio::runtime::Runtime,
    cfg: &config::VolumeConfig,
    url: &str,
) -> Result<(), OpenVolumeError> {
    if cfg.local_dir.is_some() {
        return Ok(());
    }
    let family = runtime
        .block_on(super::lineage::read(&*cfg.object_store, &cfg.db_path))
        .map_err(|e| OpenVolumeError::BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    if family.is_some_and(|l| l.kind == super::lineage::Kind::Snapshot) {
        return Err(OpenVolumeError::Snapshot(cfg.describe.clone().into()));
    }
    Ok(())
}

/// How an open treats a missing volume and a live holder (`holder.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the volume if there is none and take it over from any
    /// holder: the tests' open, and a store server's with
    /// `--create-volumes`.
    Any,
    /// The volume must exist; a live holder is refused unless `take_over`
    /// or it is on standby (taken over then).
    Existing { take_over: bool },
    /// A migration's destination ahead of the guest's state: as
    /// `Existing` without take-over (a holder on standby is refused too),
    /// and the record says standby, so that any other writable open takes
    /// the volume over (the source whose guest runs on after all). See
    /// [`SlateStore::promote`].
    Standby,
    /// The volume must not exist yet (`pohmelfs format`); record its
    /// capacity when given.
    Format { capacity_bytes: Option<u64> },
    /// Write nothing: not the engine's writable open but
    /// [`super::ReadOnlyVolume`] (`serve --readonly`). The volume must
    /// exist; any holder stays as it is.
    ReadOnly,
}

impl Placement {
    /// Where the segments go (none: data inline or in objects) and the
    /// size that seals one, for a volume in `local_dir`.
    fn segments(self, local_dir: Option<&std::path::Path>) -> (Option<&std::path::Path>, u64) {
        match self {
            Placement::Inline | Placement::Objects => (None, segment::SEGMENT_BYTES_MAX),
            Placement::SegmentsOf(max) => (local_dir, max),
            Placement::Default => (local_dir, segment::SEGMENT_BYTES_MAX),
        }
    }
}

/// Where an open spent its time: each phase's end, in milliseconds since
/// the open began (for the log line an operator reads after a slow open).
pub(super) struct Phases {
    started: std::time::Instant,
    /// Each phase's end, in microseconds since the start.
    ends: Vec<(&'static str, u128)>,
}

impl Phases {
    /// Start timing now.
    pub(super) fn start() -> Phases {
        Phases {
            started: std::time::Instant::now(),
            ends: Vec::new(),
        }
    }

    /// `phase` ended now.
    pub(super) fn mark(&mut self, phase: &'static str) {
        self.ends.push((phase, self.started.elapsed().as_micros()));
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Milliseconds with a tenth: a hand-over's phases take one or two.
        for (i, (phase, us)) in self.ends.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{phase}@{}.{}", us / 1000, us % 1000 / 100)?;
        }
        Ok(())
    }
}

/// The runtime an engine's tasks run on: two workers of its own, and its
/// threads, known by id (`threads.rs`).
fn engine_runtime() -> Result<(tokio::runtime::Runtime, Arc<EngineThreads>), OpenVolumeError> {
    let threads = Arc::new(EngineThreads::default());
    let (start, stop) = (threads.clone(), threads.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pohmelfs-engine")
        .on_thread_start(move || start.started())
        .on_thread_stop(move || stop.stopped())
        .enable_all()
        .build()
        .map_err(OpenVolumeError::Runtime)?;
    Ok((runtime, threads))
}

/// The settings of the volume at `url`, to be opened as `mode` says: a
/// snapshot's directory is refused.
fn writable_config(url: &str, mode: OpenMode) -> Result<config::VolumeConfig, OpenVolumeError> {
    let create = !matches!(mode, OpenMode::Existing { .. } | OpenMode::Standby);
    let cfg = config::parse_with(url, create)?;
    match cfg.local_dir.as_deref() {
        Some(dir) if super::snapshot::is_snapshot(dir) => {
            Err(OpenVolumeError::Snapshot(dir.to_path_buf()))
        }
        _ => Ok(cfg),
    }
}

/// The engine on the volume's object store.
async fn build_db(cfg: &config::VolumeConfig) -> Result<Db, slatedb::Error> {
    let mut settings = cfg.settings.clone();
    // The compactor starts once the volume is open (`compactor.rs`):
    // its start fences the last one with two writes, each synced, which
    // need not hold the open up (2 ms of a migration's downtime).
    settings.compactor_options = None;
    Db::builder(cfg.db_path.clone(), cfg.object_store.clone())
        .with_settings(settings)
        .with_db_cache(config::db_cache(cfg.memory), 0)
        .with_block_cache_policy(config::block_cache_policy())
        .with_sst_block_size(config::sst_block_size())
        .build()
        .await
}

impl SlateStore {
    /// Open (creating if empty) the volume named by a `file://` or `s3://`
    /// URL, taking it over from any holder.
    pub fn open(url: &str) -> Result<SlateStore, OpenVolumeError> {
        Self::open_placing(url, Placement::Default, OpenMode::Any, &|| {})
    }

    /// Open the volume named by `url` as `mode` says.
    pub fn open_as(url: &str, mode: OpenMode) -> Result<SlateStore, OpenVolumeError> {
        Self::open_placing(url, Placement::Default, mode, &|| {})
    }

    /// Open the volume named by `url` on standby (`OpenMode::Standby`): a
    /// migration's destination, ahead of the guest's state. `claimed` is
    /// called once the volume is claimed for this open (its holder record
    /// written and locked), before the engine opens.
    pub fn open_standby(url: &str, claimed: &dyn Fn()) -> Result<SlateStore, OpenVolumeError> {
        Self::open_placing(url, Placement::Default, OpenMode::Standby, claimed)
    }

    /// Create the volume named by `url` (`pohmelfs format`): refused where
    /// one exists. Returns its identity; the volume is closed again.
    pub fn format(
        url: &str,
        capacity_bytes: Option<u64>,
    ) -> Result<super::VolumeIdentity, OpenVolumeError> {
        let store = Self::open_as(url, OpenMode::Format { capacity_bytes })?;
        let id = store.identity();
        store.close().map_err(OpenVolumeError::Superblock)?;
        Ok(id)
    }

    /// Open a `file://` volume that keeps file data inline (as on `s3://`)
    /// or seals segments at `max` bytes: the tests' way to reach those
    /// paths on a local directory.
    #[cfg(test)]
    pub(crate) fn open_for_test(url: &str, placement: Placement) -> SlateStore {
        let url = match placement {
            // As on s3://: no commit log.
            Placement::Objects if url.contains('?') => format!("{url}&log=off"),
            Placement::Objects => format!("{url}?log=off"),
            _ => url.to_string(),
        };
        Self::open_placing(&url, placement, OpenMode::Any, &|| {}).expect("open volume")
    }

    fn open_placing(
        url: &str,
        placement: Placement,
        mode: OpenMode,
        claimed: &dyn Fn(),
    ) -> Result<SlateStore, OpenVolumeError> {
        if mode == OpenMode::ReadOnly {
            return Err(OpenVolumeError::ReadOnlyMode);
        }
        // `file:///DIR@NAME` names a snapshot: refused here, as its
        // directory is.
        let url = &super::snapshot::resolve_url(url).map_err(|e| OpenVolumeError::BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let mut phases = Phases::start();
        let mut cfg = writable_config(url, mode)?;
        let (runtime, threads) = engine_runtime()?;
        refuse_s3_snapshot(&runtime, &cfg, url)?;
        // Before the engine opens: opening it fences any other writer.
        let (lease, claim_lock) = runtime.block_on(claim(&mut cfg, mode))?;
        phases.mark("claim");
        claimed();
        let (db, superblock) = match runtime.block_on(Self::open_engine(&cfg, &mut phases)) {
            Ok(v) => v,
            Err(e) => {
                runtime.block_on(lease.release());
                return Err(e);
            }
        };
        phases.mark("superblock");
        let (local_dir, max) = placement.segments(cfg.local_dir.as_deref());
        let readers: Arc<pins::Readers> = Arc::default();
        let files = open_objects(&cfg, placement, superblock.open_count, &readers, &runtime)
            .and_then(|objects| {
                let (segments, reclaimer) =
                    Self::open_segments(local_dir, max, &readers, &cfg.describe)?;
                Ok((segments, reclaimer, objects))
            });
        let (segments, reclaimer, objects) = match files {
            Ok(v) => v,
            Err(e) => {
                let _ = runtime.block_on(db.close());
                runtime.block_on(lease.release());
                return Err(OpenVolumeError::Segments(e));
            }
        };
        let (objects, object_gc) = objects.unzip();
        phases.mark("files");
        let recovered = runtime.block_on(Self::recover_counters(&db, &cfg, &segments, &reclaimer));
        let (checkpoint, counters) = match recovered {
            Ok(v) => v,
            Err(e) => {
                if let Some(r) = &reclaimer {
                    r.stop();
                }
                let _ = runtime.block_on(db.close());
                runtime.block_on(lease.release());
                return Err(e);
            }
        };
        phases.mark("recover");
        runtime.spawn(lease.renewal());
        let store = SlateStore {
            db,
            reclaimer,
            checkpoint,
            log_queue: Default::default(),
            segments,
            objects,
            object_gc,
            readers,
            records: Arc::new(RecordCache::new(cfg.memory.record_cache_bytes)),
            born: born::Born::new(superblock.next_id),
            applied: Default::default(),
            capacity_bytes: cfg.capacity_bytes,
            capacity_inodes: cfg.capacity_inodes,
            describe: describe(&cfg, &superblock),
            commit_lock: Arc::new(tokio::sync::Mutex::new(counters)),
            used_blocks: AtomicU64::new(counters.blocks),
            used_inodes: AtomicU64::new(counters.inodes),
            used_meta_bytes: AtomicU64::new(counters.meta_bytes),
            ids: tokio::sync::Mutex::new(IdRange {
                next: superblock.next_id,
                limit: superblock.next_id,
            }),
            superblock,
            group: group::GroupCommit::new(cfg.commit_mode),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            handed: AtomicBool::new(false),
            compactor: std::sync::OnceLock::new(),
            threads,
            lease: Some(lease),
            #[cfg(test)]
            read_gate: Arc::default(),
            runtime: Some(runtime),
        };
        store.tidy(cfg.local_dir.as_deref());
        phases.mark("tidy");
        // A standby open is whole: another open may claim the volume now.
        drop(claim_lock);
        store.start_background(&cfg);
        tracing::info!(volume = %store.describe, ms = %phases, "opened volume");
        Ok(store)
    }

    /// The engine of `cfg` and its superblock, counted for this open. A
    /// clone's first open gives it a volume id of its own
    /// (`snapshot.rs`).
    async fn open_engine(
        cfg: &config::VolumeConfig,
        phases: &mut Phases,
    ) -> Result<(Db, Superblock), OpenVolumeError> {
        let db = build_db(cfg).await.map_err(OpenVolumeError::Engine)?;
        phases.mark("engine");
        let cloned = cfg
            .local_dir
            .as_deref()
            .map(|d| d.join(super::snapshot::CLONE_FILE))
            .filter(|p| p.exists());
        let s3_clone = match &cfg.local_dir {
            Some(_) => Ok(false),
            None => super::lineage::is_unopened_clone(&*cfg.object_store, &cfg.db_path)
                .await
                .map_err(|e| OpenVolumeError::CloneMarker(std::io::Error::other(e.to_string()))),
        };
        let s3_marked = matches!(s3_clone, Ok(true));
        let opened = match s3_clone {
            Err(e) => Err(e),
            Ok(s3_clone) => {
                let new_id = cloned.is_some() || s3_clone;
                // With a commit log, the replay that follows ends in a
                // flush of the engine's WAL (`recover.rs`) before anything
                // is served: the open count need not be flushed twice (1-2
                // ms of a migration's downtime). A clone's new id must be
                // durable before its marker goes.
                let flush = new_id || !cfg.logged();
                Self::open_superblock(&db, new_id, flush)
                    .await
                    .and_then(|sb| match &cloned {
                        // The new id is durable: later opens keep it.
                        Some(marker) => super::snapshot::remove_clone_marker(marker)
                            .map(|()| sb)
                            .map_err(OpenVolumeError::CloneMarker),
                        None => Ok(sb),
                    })
            }
        };
        let opened = match opened {
            // The new id is durable: later opens keep it.
            Ok(sb) if s3_marked => super::lineage::unmark_cloned(&*cfg.object_store, &cfg.db_path)
                .await
                .map(|()| sb)
                .map_err(|e| OpenVolumeError::CloneMarker(std::io::Error::other(e.to_string()))),
            other => other,
        };
        match opened {
            Ok(sb) => Ok((db, sb)),
            Err(e) => {
                // Best effort: the error we report is the one that stopped
                // the open.
                let _ = db.close().await;
                Err(e)
            }
        }
    }

    /// Start the background tasks: SlateDB's compactor, the commit log's
    /// checkpoints, the data object passes.
    fn start_background(&self, cfg: &config::VolumeConfig) {
        let Ok(rt) = self.rt() else { return };
        if let Some(options) = cfg.settings.compactor_options.clone() {
            let compactor =
                super::compactor::Compactor::start(rt, cfg, options, self.describe.clone());
            let _ = self.compactor.set(Arc::new(compactor));
        }
        if let Some(cp) = &self.checkpoint {
            rt.spawn(
                cp.clone()
                    .background(cfg.checkpoint_ms, cfg.describe.clone()),
            );
        }
        if let Some(pass) = self.object_pass() {
            rt.spawn(pass.background(self.describe.clone()));
        }
    }

    /// What an open does once it holds the volume, before any commit:
    /// remove what an interrupted snapshot left, delete the segments
    /// nothing refers to, reclaim what shared segments deferred. Failures
    /// leak space, never data: they are logged.
    fn tidy(&self, local_dir: Option<&std::path::Path>) {
        if let Some(dir) = local_dir {
            // We hold the volume: nobody else is taking a snapshot of it.
            if let Err(e) = super::snapshot::remove_leftovers(dir) {
                tracing::warn!(volume = %self.describe, error = %e, "removing an interrupted snapshot failed; its segments stay shared");
            }
        }
        if let Err(e) = self.rt().and_then(|rt| rt.block_on(self.sweep_segments())) {
            tracing::warn!(volume = %self.describe, error = %e, "sweeping unreferenced segments failed; their space stays leaked");
        }
        if let Err(e) = self
            .rt()
            .and_then(|rt| rt.block_on(self.reclaim_unshared()))
        {
            tracing::warn!(volume = %self.describe, error = %e, "reclaiming segments no snapshot shares any more failed; their dead pages stay");
        }
        if let Some(objects) = self.objects.as_ref() {
            // We hold the volume: nobody else is taking a snapshot of it.
            let left = self
                .rt()
                .map_err(super::snapshot::SnapshotError::Checkpoint)
                .and_then(|rt| {
                    rt.block_on(super::s3_snapshot::remove_leftovers(
                        objects.store(),
                        objects.db_path(),
                        objects.lineage(),
                    ))
                });
            if let Err(e) = left {
                tracing::warn!(volume = %self.describe, error = %e, "removing an interrupted snapshot failed; the objects below its bound stay");
            }
        }
        if let Some(pass) = self.object_pass() {
            match self.rt().and_then(|rt| rt.block_on(pass.sweep())) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(volume = %self.describe, objects = n, "deleting data objects no record refers to");
                }
                Err(e) => {
                    tracing::warn!(volume = %self.describe, error = %e, "sweeping unreferenced data objects failed; they stay until the next open");
                }
            }
        }
    }

    /// Replay the commit log (on `file://`), then read the space counters
    /// it leaves.
    async fn recover_counters(
        db: &Db,
        cfg: &config::VolumeConfig,
        segments: &Option<Arc<Segments>>,
        reclaimer: &Option<Arc<reclaim::Reclaimer>>,
    ) -> Result<(Option<Arc<recover::Checkpoint>>, Counters), OpenVolumeError> {
        // When `cfg.logged()`: the replay ends in a flush, which makes the
        // open count durable (`open_superblock`).
        let checkpoint = match (&cfg.local_dir, cfg.log_bytes) {
            (Some(dir), Some(size)) => {
                Some(Self::recover(db, dir, size, segments, reclaimer, &cfg.describe).await?)
            }
            _ => None,
        };
        let counters = match db.get(keys::stats()).await {
            Ok(Some(bytes)) => {
                codec::decode_counters(&bytes).map_err(OpenVolumeError::Superblock)?
            }
            Ok(None) => Counters::default(),
            Err(e) => return Err(OpenVolumeError::Superblock(map_engine_error(e))),
        };
        Ok((checkpoint, counters))
    }

    /// Open the commit log of the volume in `dir` and replay it into the
    /// engine and the segments; the checkpoints that move its tail.
    async fn recover(
        db: &Db,
        dir: &std::path::Path,
        size: u64,
        segments: &Option<Arc<Segments>>,
        reclaimer: &Option<Arc<reclaim::Reclaimer>>,
        describe: &str,
    ) -> Result<Arc<recover::Checkpoint>, OpenVolumeError> {
        let applied = recover::applied_lsn(db)
            .await
            .map_err(OpenVolumeError::Replay)?;
        let (log, records) =
            CommitLog::open(dir, size, applied.saturating_add(1)).map_err(OpenVolumeError::Log)?;
        let replayed = recover::replay(db, segments.as_deref(), &records, applied)
            .await
            .map_err(OpenVolumeError::Replay)?;
        log.advance_tail(log.applied())
            .map_err(|e| OpenVolumeError::Replay(recover::map_log_error(e)))?;
        if !records.is_empty() {
            tracing::info!(
                volume = %describe,
                records = records.len(),
                batches = replayed,
                "replayed the commit log"
            );
        }
        Ok(Arc::new(recover::Checkpoint::new(
            db.clone(),
            segments.clone(),
            log,
            reclaimer.clone(),
        )))
    }

    /// The segment files under `dir` and their reclaimer thread, or neither
    /// (data inline in the engine: `s3://`, or a test's choice).
    fn open_segments(
        dir: Option<&std::path::Path>,
        max: u64,
        readers: &Arc<pins::Readers>,
        describe: &str,
    ) -> std::io::Result<SegmentsAndReclaimer> {
        let Some(dir) = dir else {
            return Ok((None, None));
        };
        let segs = Arc::new(Segments::open_with_max(dir, max)?);
        let reclaimer =
            reclaim::Reclaimer::start(segs.clone(), readers.clone(), describe.to_owned())?;
        Ok((Some(segs), Some(Arc::new(reclaimer))))
    }

    /// Read and check the superblock, or write the first one into an empty
    /// store; either way count this open in it, durably if `flush` (else
    /// the caller flushes before it serves). `new_id`: draw a new volume
    /// id (the first open of a clone).
    async fn open_superblock(
        db: &Db,
        new_id: bool,
        flush: bool,
    ) -> Result<Superblock, OpenVolumeError> {
        let sb_err = |e| OpenVolumeError::Superblock(map_engine_error(e));
        let superblock = match db.get(keys::superblock()).await.map_err(sb_err)? {
            Some(bytes) => {
                let mut sb =
                    codec::decode_superblock(&bytes).map_err(OpenVolumeError::Superblock)?;
                if UPGRADES_FROM.contains(&sb.format_version) {
                    tracing::info!(
                        from = sb.format_version,
                        to = FORMAT_VERSION,
                        "upgrading the volume's format version in place"
                    );
                    sb.format_version = FORMAT_VERSION;
                } else if sb.format_version != FORMAT_VERSION {
                    return Err(OpenVolumeError::FormatVersion {
                        found: sb.format_version,
                        expected: FORMAT_VERSION,
                    });
                }
                if new_id {
                    sb.volume_id = random_volume_id();
                }
                sb.open_count = sb.open_count.checked_add(1).ok_or_else(|| {
                    OpenVolumeError::Superblock(StoreError::Corrupt("open count overflow".into()))
                })?;
                sb
            }
            None => {
                let mut any = db.scan::<std::ops::RangeFull>(..).await.map_err(sb_err)?;
                if any.next().await.map_err(sb_err)?.is_some() {
                    return Err(OpenVolumeError::NotAVolume);
                }
                Superblock {
                    format_version: FORMAT_VERSION,
                    volume_id: random_volume_id(),
                    next_id: FIRST_FREE_ID,
                    open_count: 1,
                }
            }
        };
        db.put(keys::superblock(), codec::encode_superblock(&superblock))
            .await
            .map_err(sb_err)?;
        if flush {
            db.flush().await.map_err(sb_err)?;
        }
        Ok(superblock)
    }
}
