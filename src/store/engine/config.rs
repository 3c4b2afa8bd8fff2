//! From a volume URL to an object store, a path inside it and engine
//! settings.
//!
//! * `file:///abs/path/volume[?opts]` — a directory on the local filesystem
//!   (created if missing), written with fsync so a durable commit survives a
//!   power loss.
//! * `s3://bucket/prefix[?opts]` — an S3-compatible bucket. Credentials and
//!   the usual settings come from `AWS_*` environment variables; query
//!   options (`endpoint=`, `region=`, `allow_http=true`, any key
//!   `AmazonS3ConfigKey` knows) override them.
//!
//! Options for both: `capacity=SIZE` (statfs and ENOSPC), `inodes=N`,
//! `commit=adaptive|flush|interval` (see [`CommitMode`]),
//! `flush_interval_ms=N`, `memory=SIZE` (the engine's memtables and block
//! caches, see [`EngineMemory`]; the daemon sets it to the engine's share
//! of `--cache-size`). For `file://` only: `log_size=SIZE` (the commit
//! log's ring, created at this size; default 16M), `checkpoint_ms=N`
//! (how often the log's tail is moved; default 1000, 0: only when the ring
//! is half full and at close) and `log=off` (commit
//! through the engine's WAL instead: segment sync, WAL flush; for
//! comparison).
//!
//! This module owns URL parsing and engine configuration. It never opens the
//! engine and never reads or writes the volume.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::ObjectStore;
use slatedb::config::{
    CompactionWorkerOptions, CompactorOptions, GarbageCollectorOptions, Settings,
};

use super::group::CommitMode;
use super::OpenVolumeError;

/// The capacity of a volume whose URL names none.
pub const DEFAULT_CAPACITY_BYTES: u64 = 1 << 40;

/// The inode capacity of a volume whose URL names none.
pub const DEFAULT_CAPACITY_INODES: u64 = 1 << 32;

/// The group-commit mode of a volume whose URL names none: measured on
/// `file://`, the timer groups 8 concurrent committers best, and an explicit
/// flush serves a lone committer best; adaptive does both (see
/// docs/store-layout.md).
pub const DEFAULT_COMMIT_MODE: CommitMode = CommitMode::Adaptive;

/// The WAL flush timer in [`CommitMode::Interval`] and
/// [`CommitMode::Adaptive`], where it sets the latency of grouped commits.
const DEFAULT_INTERVAL_FLUSH_MS: u64 = 1;

/// The WAL flush timer in [`CommitMode::Flush`], where commits flush
/// explicitly and the timer only sweeps up stray writes.
const DEFAULT_BACKGROUND_FLUSH_MS: u64 = 100;

/// The WAL flush timer behind the commit log, where commits are durable
/// in the log and every checkpoint flushes the WAL itself: the timer only
/// bounds what the engine holds unflushed between checkpoints. Each flush
/// is a new file and its `fsync`; every 100 ms they cost more CPU than a
/// trickle of commits did.
const DEFAULT_LOGGED_FLUSH_MS: u64 = super::recover::CHECKPOINT_INTERVAL_MS;

/// Everything needed to open one volume.
pub struct VolumeConfig {
    pub object_store: Arc<dyn ObjectStore>,
    /// Where the holder record is written (`holder.rs`): `object_store`,
    /// but on `file://` without `fsync`, as the record speaks only of a
    /// running process, which a crash of the host ends.
    pub record_store: Arc<dyn ObjectStore>,
    /// The volume's path inside the object store.
    pub db_path: String,
    pub settings: Settings,
    pub capacity_bytes: u64,
    /// The URL named `capacity=` (which then overrides what `format`
    /// recorded in the volume).
    pub capacity_named: bool,
    pub capacity_inodes: u64,
    pub commit_mode: CommitMode,
    /// For logs: where the volume lives, without credentials.
    pub describe: String,
    /// The volume's local directory (`file://`), where segment files live;
    /// `None` keeps file data inline in the engine (`s3://`).
    pub local_dir: Option<PathBuf>,
    /// What the engine may hold in memory.
    pub memory: EngineMemory,
    /// The commit log's size, on a `file://` volume that has one.
    pub log_bytes: Option<u64>,
    /// How often the commit log is checkpointed (0: only when needed).
    pub checkpoint_ms: u64,
}

impl VolumeConfig {
    /// Whether commits go through a commit log (`file://` with one).
    pub fn logged(&self) -> bool {
        self.local_dir.is_some() && self.log_bytes.is_some()
    }
}

fn bad(url: &str, reason: impl Into<String>) -> OpenVolumeError {
    OpenVolumeError::BadUrl {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// Undo `%XX` escapes in a query value.
fn percent_decode(url: &str, s: &str) -> Result<String, OpenVolumeError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(url, format!("bad %-escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(url, format!("{s:?} is not UTF-8")))
}

/// The options every scheme knows, with the pairs left for the scheme.
struct CommonOptions {
    capacity_bytes: u64,
    capacity_named: bool,
    capacity_inodes: u64,
    commit_mode: CommitMode,
    flush_interval_ms: Option<u64>,
    memory_bytes: u64,
    log_bytes: u64,
    log: bool,
    checkpoint_ms: u64,
    rest: Vec<(String, String)>,
}

fn common_options(url: &str, query: &str) -> Result<CommonOptions, OpenVolumeError> {
    let mut o = CommonOptions {
        capacity_bytes: DEFAULT_CAPACITY_BYTES,
        capacity_named: false,
        capacity_inodes: DEFAULT_CAPACITY_INODES,
        commit_mode: DEFAULT_COMMIT_MODE,
        flush_interval_ms: None,
        memory_bytes: DEFAULT_MEMORY_BYTES,
        log_bytes: super::log::LOG_BYTES_DEFAULT,
        log: true,
        checkpoint_ms: super::recover::CHECKPOINT_INTERVAL_MS,
        rest: Vec::new(),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad(url, format!("option {pair:?} has no value")))?;
        let v = percent_decode(url, v)?;
        let bad_value = || bad(url, format!("bad value for option {k:?}: {v:?}"));
        match k {
            "capacity" => {
                o.capacity_bytes = crate::store::parse_size(&v).ok_or_else(bad_value)?;
                o.capacity_named = true;
            }
            "inodes" => o.capacity_inodes = v.parse().map_err(|_| bad_value())?,
            "memory" => {
                o.memory_bytes = crate::store::parse_size(&v)
                    .filter(|b| *b >= MIN_MEMORY_BYTES)
                    .ok_or_else(bad_value)?
            }
            "commit" => {
                o.commit_mode = match v.as_str() {
                    "flush" => CommitMode::Flush,
                    "interval" => CommitMode::Interval,
                    "adaptive" => CommitMode::Adaptive,
                    _ => return Err(bad_value()),
                }
            }
            "log_size" => {
                o.log_bytes = crate::store::parse_size(&v)
                    .filter(|b| *b >= super::log::LOG_BYTES_MIN)
                    .ok_or_else(bad_value)?
            }
            "checkpoint_ms" => o.checkpoint_ms = v.parse().map_err(|_| bad_value())?,
            "log" => {
                o.log = match v.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad_value()),
                }
            }
            "flush_interval_ms" => {
                let ms: u64 = v.parse().map_err(|_| bad_value())?;
                if ms == 0 {
                    return Err(bad_value());
                }
                o.flush_interval_ms = Some(ms);
            }
            _ => o.rest.push((k.to_string(), v)),
        }
    }
    Ok(o)
}

/// The engine's memory when the URL names none: a quarter of the daemon's
/// default `--cache-size`, which is the share the daemon gives it.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;

/// The least `memory=` accepts: below, memtables flush every few commits.
const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// How the engine spends its memory: three eighths on writes not yet in a
/// table (WAL buffers and memtables; writers wait beyond it), an eighth as
/// the memtable size that starts a flush to an L0 table (part of the
/// three eighths), an eighth on the cache of data blocks, a quarter on the
/// cache of chunk, inode and segment records (`record_cache.rs`) and a
/// quarter on the cache of indexes and bloom filters. With file data in
/// segment files, the LSM holds metadata only, and these are
/// metadata-sized. The chunk records get a large share: a READ whose record
/// is not cached walks the engine's tables. The records of a 1 GiB file
/// after `scripts/bench`'s random writes do not fit in 8 MiB: its cold
/// random reads then cost the daemon 3.2-4.4 CPU-s, against 2.2 with 16
/// MiB or 64 MiB (`docs/benchmarks.md`, session 45). The indexes and
/// filters grow with the volume's records: once they no longer fit their
/// cache, every lookup of a name not there yet (each create makes one)
/// reads and decodes them again. With an eighth (8 MiB) and 4 KiB blocks
/// that began at ~600,000 one-byte files: creating fell from ~9,600 to
/// ~1,600 files/s and the daemon's memory rose from ~270 to ~440 MiB;
/// with a quarter and [`sst_block_size`]'s blocks, 1,300,000 files went at
/// an even rate (session 50).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineMemory {
    pub max_unflushed_bytes: u64,
    pub l0_sst_size_bytes: u64,
    pub block_cache_bytes: u64,
    pub record_cache_bytes: u64,
    pub meta_cache_bytes: u64,
}

impl EngineMemory {
    pub fn of(bytes: u64) -> EngineMemory {
        EngineMemory {
            max_unflushed_bytes: bytes / 8 * 3,
            l0_sst_size_bytes: bytes / 8,
            block_cache_bytes: bytes / 8,
            record_cache_bytes: bytes / 4,
            meta_cache_bytes: bytes / 4,
        }
    }
}

/// The size of the engine's table blocks: 16 KiB. With SlateDB's default
/// of 4 KiB a table's index (one entry per block) is the most of what its
/// lookups need cached; 16 KiB blocks quarter it. A block read costs
/// little more: the tables hold metadata only, and the record cache
/// answers most point reads before them.
pub fn sst_block_size() -> slatedb::config::SstBlockSize {
    slatedb::config::SstBlockSize::Block16Kib
}

/// The engine's block cache: bounded, split between data and metadata so
/// that a stream of data blocks cannot evict the indexes.
pub fn db_cache(memory: EngineMemory) -> Arc<dyn slatedb::db_cache::DbCache> {
    use slatedb::db_cache::moka::{MokaCache, MokaCacheOptions};
    use slatedb::db_cache::SplitCache;
    let moka = |bytes| {
        Arc::new(MokaCache::new_with_opts(MokaCacheOptions {
            max_capacity: bytes,
            ..MokaCacheOptions::default()
        })) as Arc<dyn slatedb::db_cache::DbCache>
    };
    Arc::new(
        SplitCache::new()
            .with_block_cache(Some(moka(memory.block_cache_bytes)))
            .with_meta_cache(Some(moka(memory.meta_cache_bytes)))
            .build(),
    )
}

/// Which blocks a memtable flush puts into the cache: indexes and filters
/// only. SlateDB's default also inserts every data block just written, so a
/// long sequential write fills the cache with data nobody reads back (the
/// daemon's page cache has it): measured, 1.56 GiB → 0.73 GiB peak for a
/// 4 GiB write on the embedded store.
pub fn block_cache_policy() -> slatedb::BlockCachePolicy {
    use slatedb::CacheTarget;
    slatedb::BlockCachePolicy::default()
        .with_flush_targets(&[CacheTarget::Index, CacheTarget::Filters])
}

/// The engine's settings; `remote`: its objects are on S3 (where the
/// garbage collector's boundary files work, and a read is a request).
fn settings(o: &CommonOptions, remote: bool, logged: bool) -> Settings {
    let m = EngineMemory::of(o.memory_bytes);
    let flush_ms = o.flush_interval_ms.unwrap_or(match o.commit_mode {
        // Commits are durable in the commit log: the WAL's timer only
        // bounds how much the log must replay.
        _ if logged => DEFAULT_LOGGED_FLUSH_MS,
        CommitMode::Interval | CommitMode::Adaptive => DEFAULT_INTERVAL_FLUSH_MS,
        CommitMode::Flush => DEFAULT_BACKGROUND_FLUSH_MS,
    });
    Settings {
        flush_interval: Some(Duration::from_millis(flush_ms)),
        // SlateDB's defaults (512 MiB unflushed, 64 MiB memtables) would
        // dwarf the daemon's --cache-size; the engine gets its share.
        max_unflushed_bytes: m.max_unflushed_bytes as usize,
        l0_sst_size_bytes: m.l0_sst_size_bytes as usize,
        garbage_collector_options: Some(GarbageCollectorOptions {
            boundary_files_enabled: remote,
            // The zero-byte WAL fences (one per open) stay, as SlateDB's
            // default dry run keeps them too: deleting a fence is only safe
            // past the longest pause of any writer. Without the dry run,
            // its advice to change this setting is not logged every GC
            // pass to an operator who cannot act on it.
            wal_fence_options: None,
            ..GarbageCollectorOptions::default()
        }),
        compactor_options: Some(compactor_options(remote)),
        ..Settings::default()
    }
}

/// The in-process compactor, with its read-ahead bounded. SlateDB's
/// defaults read 2 MiB ahead four times over for every input table, in up
/// to four sub-compactions of each of four compactions at once: past
/// 600,000 one-byte files the daemon's anonymous memory jumped from ~270
/// MiB to ~850 MiB and stayed there; with one compaction at a time,
/// unsplit, 256 KiB ahead per table, 800,000 files left it at ~410 MiB,
/// created as fast (`docs/benchmarks.md`, session 49). On S3, where each
/// read is a request of its own, a table is read 2 MiB at a time.
fn compactor_options(remote: bool) -> CompactorOptions {
    let worker = CompactionWorkerOptions {
        max_concurrent_compactions: 1,
        max_subcompactions: 1,
        max_fetch_tasks: 1,
        bytes_to_fetch: if remote { 2 << 20 } else { 256 << 10 },
        max_sst_size: 64 << 20,
        ..CompactionWorkerOptions::default()
    };
    CompactorOptions {
        max_concurrent_compactions: 1,
        worker: Some(worker),
        ..CompactorOptions::default()
    }
}

/// Parse a volume URL (`file://...` or `s3://...`); a missing `file://`
/// directory is created only when `create` is set, and is
/// [`OpenVolumeError::NoVolume`] otherwise.
pub fn parse_with(url: &str, create: bool) -> Result<VolumeConfig, OpenVolumeError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    if let Some(path) = base.strip_prefix("file://") {
        file(url, path, query, create)
    } else if let Some(rest) = base.strip_prefix("s3://") {
        s3(url, rest, query)
    } else {
        Err(bad(url, "expected file:///path or s3://bucket/prefix"))
    }
}

fn file(url: &str, path: &str, query: &str, create: bool) -> Result<VolumeConfig, OpenVolumeError> {
    if !path.starts_with('/') {
        return Err(bad(
            url,
            "file:// needs an absolute path (file:///abs/path)",
        ));
    }
    let o = common_options(url, query)?;
    if let Some((k, _)) = o.rest.first() {
        return Err(bad(url, format!("unknown option {k:?} for file://")));
    }
    let dir = PathBuf::from(path);
    if !create && !dir.is_dir() {
        return Err(OpenVolumeError::NoVolume);
    }
    // 0700 whatever the umask: the volume is its owner's alone.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .map_err(|e| OpenVolumeError::CreateDir(dir.clone(), e))?;
    // fsync: without it a "durable" write sits in the page cache, and a
    // power loss can leave a manifest naming a table that never reached
    // the disk.
    let fs = LocalFileSystem::new_with_prefix(&dir)
        .map_err(OpenVolumeError::ObjectStore)?
        .with_fsync(true);
    let records = LocalFileSystem::new_with_prefix(&dir).map_err(OpenVolumeError::ObjectStore)?;
    Ok(VolumeConfig {
        object_store: Arc::new(fs),
        record_store: Arc::new(records),
        db_path: String::new(),
        // LocalFileSystem has no conditional overwrite (If-Match), which
        // the garbage collector's boundary files need.
        settings: settings(&o, false, o.log),
        capacity_bytes: o.capacity_bytes,
        capacity_named: o.capacity_named,
        capacity_inodes: o.capacity_inodes,
        commit_mode: o.commit_mode,
        describe: format!("file://{}", dir.display()),
        local_dir: Some(dir),
        memory: EngineMemory::of(o.memory_bytes),
        log_bytes: o.log.then_some(o.log_bytes),
        checkpoint_ms: o.checkpoint_ms,
    })
}

fn s3(url: &str, rest: &str, query: &str) -> Result<VolumeConfig, OpenVolumeError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad(url, "s3:// needs a bucket (s3://bucket/prefix)"));
    }
    let o = common_options(url, query)?;
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut endpoint = None;
    for (k, v) in &o.rest {
        let key: AmazonS3ConfigKey = k
            .parse()
            .map_err(|_| bad(url, format!("unknown option {k:?} for s3://")))?;
        if matches!(key, AmazonS3ConfigKey::Endpoint) {
            endpoint = Some(v.clone());
        }
        builder = builder.with_config(key, v);
    }
    let store: Arc<dyn ObjectStore> =
        Arc::new(builder.build().map_err(OpenVolumeError::ObjectStore)?);
    let prefix = prefix.trim_matches('/');
    Ok(VolumeConfig {
        object_store: store.clone(),
        record_store: store,
        db_path: prefix.to_string(),
        settings: settings(&o, true, false),
        capacity_bytes: o.capacity_bytes,
        capacity_named: o.capacity_named,
        capacity_inodes: o.capacity_inodes,
        commit_mode: o.commit_mode,
        describe: match endpoint {
            Some(e) => format!("s3://{bucket}/{prefix} at {e}"),
            None => format!("s3://{bucket}/{prefix}"),
        },
        local_dir: None,
        memory: EngineMemory::of(o.memory_bytes),
        log_bytes: None,
        checkpoint_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<VolumeConfig, OpenVolumeError> {
        parse_with(url, true)
    }

    #[test]
    fn urls_parse_or_say_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "file://{}/vol?capacity=1G&commit=interval&flush_interval_ms=5",
            dir.path().display()
        );
        let c = parse(&url).unwrap();
        assert_eq!(c.capacity_bytes, 1 << 30);
        assert_eq!(c.commit_mode, CommitMode::Interval);
        assert_eq!(c.settings.flush_interval, Some(Duration::from_millis(5)));
        assert_eq!(c.memory, EngineMemory::of(DEFAULT_MEMORY_BYTES));
        let gc = c.settings.garbage_collector_options.unwrap();
        assert!(!gc.boundary_files_enabled);
        assert!(
            gc.wal_fence_options.is_none(),
            "fences are kept, without a dry run's log"
        );
        assert!(dir.path().join("vol").is_dir());
        // The volume directory is its owner's alone, whatever the umask.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("vol"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);

        for bad_url in [
            "file://relative/path",
            "file:///tmp/x?nope=1",
            "file:///tmp/x?capacity=lots",
            "file:///tmp/x?commit",
            "file:///tmp/x?memory=512K",
            "s3:///prefix",
            "s3://b/p?no_such_key=1",
            "ftp://x",
        ] {
            match parse(bad_url) {
                Err(OpenVolumeError::BadUrl { url, .. }) => assert_eq!(url, bad_url),
                Err(e) => panic!("{bad_url}: unexpected error {e}"),
                Ok(_) => panic!("{bad_url}: parsed"),
            }
        }
    }

    #[test]
    fn memory_option_sizes_memtables_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/vol?memory=32M", dir.path().display());
        let c = parse(&url).unwrap();
        let m = c.memory;
        assert_eq!(m, EngineMemory::of(32 << 20));
        assert_eq!(c.settings.max_unflushed_bytes as u64, m.max_unflushed_bytes);
        assert_eq!(c.settings.l0_sst_size_bytes as u64, m.l0_sst_size_bytes);
        assert!(
            m.max_unflushed_bytes + m.block_cache_bytes + m.record_cache_bytes + m.meta_cache_bytes
                <= 32 << 20,
            "{m:?} exceeds its budget"
        );
    }

    #[test]
    fn s3_query_options_reach_the_builder() {
        let c = parse(
            "s3://bucket/some/prefix/?endpoint=http%3A//127.0.0.1:9&region=us-east-1&allow_http=true",
        )
        .unwrap();
        assert_eq!(c.db_path, "some/prefix");
        assert_eq!(c.commit_mode, CommitMode::Adaptive);
        assert_eq!(c.settings.flush_interval, Some(Duration::from_millis(1)));
        assert!(c.describe.contains("http://127.0.0.1:9"), "{}", c.describe);
        assert!(
            c.settings
                .garbage_collector_options
                .unwrap()
                .boundary_files_enabled
        );
    }
}
