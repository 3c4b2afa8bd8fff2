//! Opening a volume behind the transaction layer: the one place that
//! knows every kind of store URL and picks the reads and the sink for it
//! (`pohmel://` through the store servers' client, `file://` and `s3://`
//! through the embedded engine, `mem:` in memory), with the local read
//! cache between when asked.

use std::sync::Arc;

use super::{budget, TxnConfig, WritebackStore};
use crate::metrics::Metrics;
use crate::net::sink::RemoteSink;
use crate::store::readcache;
use crate::store::sink::{EngineSink, Sink};
use crate::store::{Store, StoreError};

/// Open the store named by `url` behind the transaction layer: `pohmel://`
/// servers through their wire protocol (the ack is the server's durable
/// commit), `file://` and `s3://` through the embedded engine (the ack is
/// its durable commit), `mem:` in daemon memory (the ack is its commit,
/// which nothing makes durable).
pub fn open(
    url: &str,
    cfg: TxnConfig,
    metrics: Arc<Metrics>,
) -> Result<Arc<WritebackStore>, crate::store::OpenError> {
    open_as(url, cfg, None, metrics, crate::store::engine::OpenMode::Any)
}

/// As [`open`], with a local read cache (`--cache-dir`,
/// `crate::store::readcache`) between the layer and a `pohmel://` or
/// `s3://` volume.
pub fn open_with_cache(
    url: &str,
    cfg: TxnConfig,
    read_cache: Option<&readcache::CacheConfig>,
    metrics: Arc<Metrics>,
) -> Result<Arc<WritebackStore>, crate::store::OpenError> {
    open_as(
        url,
        cfg,
        read_cache,
        metrics,
        crate::store::engine::OpenMode::Any,
    )
}

/// As [`open_with_cache`], a `file://` or `s3://` volume opened as `mode`
/// says (the daemon's: it must exist, and a live holder is refused unless
/// taken over).
pub fn open_as(
    url: &str,
    cfg: TxnConfig,
    read_cache: Option<&readcache::CacheConfig>,
    metrics: Arc<Metrics>,
    mode: crate::store::engine::OpenMode,
) -> Result<Arc<WritebackStore>, crate::store::OpenError> {
    open_sparing(url, cfg, read_cache, metrics, mode, &[])
}

/// As [`open_as`]; the orphans in `spare` are not reclaimed at open: the
/// unlinked inodes a migrated guest session holds (`slot.rs`).
pub fn open_sparing(
    url: &str,
    cfg: TxnConfig,
    read_cache: Option<&readcache::CacheConfig>,
    metrics: Arc<Metrics>,
    mode: crate::store::engine::OpenMode,
    spare: &[u64],
) -> Result<Arc<WritebackStore>, crate::store::OpenError> {
    open_from(url, cfg, read_cache, metrics, mode, spare, None)
}

/// Open the engine of the `file://` or `s3://` volume at `url` on standby
/// (`OpenMode::Standby`): a migration's destination, ahead of the guest's
/// state; `claimed` is called once the volume is claimed for it, before
/// the engine opens. [`open_from`] finishes the open once the state is in.
pub fn open_standby(
    url: &str,
    cfg: &TxnConfig,
    claimed: &dyn Fn(),
) -> Result<crate::store::engine::SlateStore, crate::store::OpenError> {
    let engine_url = budget::with_engine_memory(url, cfg.engine_cache_bytes);
    crate::store::engine::SlateStore::open_standby(&engine_url, claimed)
        .map_err(|e| crate::store::OpenError::volume(url, e))
}

/// As [`open_sparing`], on the engine a standby open made ready, when
/// given (`file://` and `s3://`).
pub fn open_from(
    url: &str,
    cfg: TxnConfig,
    read_cache: Option<&readcache::CacheConfig>,
    metrics: Arc<Metrics>,
    mode: crate::store::engine::OpenMode,
    spare: &[u64],
    standby: Option<crate::store::engine::SlateStore>,
) -> Result<Arc<WritebackStore>, crate::store::OpenError> {
    let cfg = TxnConfig {
        forget_clean_pages: url.starts_with("file:") || url.starts_with("mem:"),
        ..cfg
    };
    let io = |e: std::io::Error| crate::store::OpenError::Connect {
        url: url.to_string(),
        source: StoreError::Io(e),
    };
    let mut opened_engine = None;
    let mut opened_remote = None;
    let (reads, sink, volume): (Arc<dyn Store>, Arc<dyn Sink>, _) = if url.starts_with("pohmel://")
    {
        let cfg = crate::net::client::RemoteConfig::from_url(url)?;
        let volume = readcache::remote_identity(&cfg.servers, &cfg.volume);
        let remote = Arc::new(
            crate::net::client::RemoteStore::connect(cfg).map_err(|source| {
                crate::store::OpenError::Connect {
                    url: url.to_string(),
                    source,
                }
            })?,
        );
        // As for the embedded engine below: this daemon is the
        // volume's only writer (one daemon per volume), so the server
        // removes what a crashed one left unlinked but open. A failure
        // leaks their space, never data (a server older than the
        // request refuses it): the daemon goes on.
        // A read-only daemon writes nothing. One that writes claims the
        // volume first: the server then refuses every other daemon's
        // writes (a migration source that hung, one taken over).
        if mode != crate::store::engine::OpenMode::ReadOnly {
            let take_over = matches!(
                mode,
                crate::store::engine::OpenMode::Existing { take_over: true }
            );
            let claim = remote
                .claim(take_over)
                .map_err(|e| crate::net::claim_error(url, e))?;
            tracing::info!(claim, "claimed the volume for writing");
        }
        let reclaimed = match mode {
            crate::store::engine::OpenMode::ReadOnly => Ok(0),
            _ => remote.reclaim_orphans_except(spare),
        };
        if let Err(e) = reclaimed {
            tracing::warn!(error = %crate::ErrorChain(&e), "the store server did not remove the orphans a crashed daemon left");
        }
        let volume = Some(volume(remote.epoch()));
        opened_remote = Some(Arc::clone(&remote));
        (remote.clone(), Arc::new(RemoteSink::new(remote)), volume)
    } else if (url.starts_with("file:") || url.starts_with("s3:"))
        && mode == crate::store::engine::OpenMode::ReadOnly
    {
        // Writes nothing: no holder, no orphan reclaim
        // (`store/engine/readonly.rs`).
        let engine_url = budget::with_engine_memory(url, cfg.engine_cache_bytes);
        let volume = crate::store::engine::ReadOnlyVolume::open(&engine_url)
            .map_err(|e| crate::store::OpenError::read_only(url, e))?;
        let volume = Arc::new(volume);
        (
            volume.clone(),
            Arc::new(EngineSink::new(volume).map_err(io)?),
            None,
        )
    } else if url.starts_with("file:") || url.starts_with("s3:") {
        let engine = open_engine(url, &cfg, mode, spare, standby)?;
        let volume = url
            .starts_with("s3:")
            .then(|| readcache::engine_identity(&engine));
        opened_engine = Some(Arc::clone(&engine));
        (
            engine.clone(),
            Arc::new(EngineSink::new(engine).map_err(io)?),
            volume,
        )
    } else {
        let engine =
            crate::store::open_once(&budget::with_engine_memory(url, cfg.engine_cache_bytes))?;
        (
            engine.clone(),
            Arc::new(EngineSink::new(engine).map_err(io)?),
            None,
        )
    };
    let (reads, sink) = match read_cache {
        Some(cache) => readcache::wrap(cache, volume, reads, sink, &metrics).map_err(|source| {
            crate::store::OpenError::ReadCache {
                url: url.to_string(),
                source,
            }
        })?,
        None => (reads, sink),
    };
    let mut layer = WritebackStore::new(cfg, reads, sink, metrics).map_err(io)?;
    layer.engine = opened_engine;
    layer.remote = opened_remote;
    Ok(Arc::new(layer))
}

/// The embedded engine of a `file://` or `s3://` volume: the one a standby
/// open made ready (promoted once the guest runs here,
/// `VolumeSlot::confirm`), or opened as `mode` says; the orphans
/// a crashed daemon left reclaimed, except those in `spare`.
fn open_engine(
    url: &str,
    cfg: &TxnConfig,
    mode: crate::store::engine::OpenMode,
    spare: &[u64],
    standby: Option<crate::store::engine::SlateStore>,
) -> Result<Arc<crate::store::engine::SlateStore>, crate::store::OpenError> {
    let engine = match standby {
        Some(engine) => engine,
        None => {
            let engine_url = budget::with_engine_memory(url, cfg.engine_cache_bytes);
            crate::store::engine::SlateStore::open_as(&engine_url, mode)
                .map_err(|e| crate::store::OpenError::volume(url, e))?
        }
    };
    // This daemon is the volume's only writer now: orphans a crashed
    // one left behind are nobody's (`store/engine/orphans.rs`), except
    // those a migrated session holds.
    engine
        .reclaim_orphans_except(spare)
        .map_err(|source| crate::store::OpenError::Connect {
            url: url.to_string(),
            source,
        })?;
    Ok(Arc::new(engine))
}
