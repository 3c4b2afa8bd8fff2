//! A local read cache for remote volumes (`--cache-dir DIR
//! --cache-dir-size SIZE`, `pohmel://` and `s3://`): file data read from
//! the store, and data the store acknowledged durable, kept in local files
//! so that reading them again costs no round trip, even after the daemon's
//! own page cache dropped them and across daemon restarts.
//!
//! It sits between the write-back layer and the remote store as two
//! wrappers of the store's seams ([`CachedStore`] over the reads,
//! [`CachedSink`] over the acknowledged sends), so neither the filesystem
//! nor the write-back layer knows it is there. Data not yet acknowledged
//! never enters it: the write-back layer's pages serve that.
//!
//! # What it must never do
//! Serve a byte the volume does not hold. So:
//! * The header names the volume (`VolumeIdentity`): a cache directory
//!   opened for another volume, another format, or a volume another writer
//!   opened since (its generation moved further than this daemon's own
//!   open), is emptied before use.
//! * Every block file carries a CRC-32C over its header and data, and the
//!   cache's random instance id: a corrupt, truncated, missing or stale
//!   file is detected when read, counted (`read_cache_corrupt`), logged
//!   (rate limited), dropped and fetched from the store again.
//! * Before a transaction that changes a file's data is sent, the blocks
//!   it touches leave the cache (their files unlinked), and blocks read of
//!   that file are not cached until the store acknowledges it: a daemon
//!   that dies with the transaction in flight, which the store may have
//!   applied, leaves no older copy behind. The acknowledged data then goes
//!   in (write-through at ack). A read that fetched a block while a
//!   transaction of its file was sent or acknowledged does not cache it
//!   (`FillTicket`).
//!
//! One writer per volume (fencing) means nothing else changes the data
//! while the daemon runs, so nothing is invalidated from outside.
//!
//! # Bounds
//! The files' bytes plus a fixed charge per entry for the index in memory
//! stay within `--cache-dir-size`; the least recently used blocks go
//! first. At open the index is rebuilt by listing the block files (one
//! directory entry per cached block, ordered by modification time); their
//! checksums are checked when they are read.
//!
//! # Layout
//! * `mod.rs`: the index, its bound, opening and resetting the directory;
//! * `file.rs`: the header and block file formats;
//! * `layer.rs`: the wrappers of the store and the sink.

mod file;
mod layer;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use thiserror::Error;
use tracing::info;

use crate::metrics::Metrics;
use crate::ratelimit::limited;
use crate::store::sink::Sink;
use crate::store::{Store, BLOCK_SIZE};
pub use file::CACHE_FORMAT;
use file::{Header, BLOCK_HEADER_BYTES};
pub use layer::{CachedSink, CachedStore};

/// What the index charges per cached block for its own memory (two map
/// entries and their keys), on top of the block file's bytes.
pub const ENTRY_OVERHEAD_BYTES: u64 = 128;

/// Fill tickets are kept per stripe of inode numbers.
const STRIPES: usize = 256;

/// Where the cache lives and how large it may grow.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes of block files plus [`ENTRY_OVERHEAD_BYTES`] per block, at most.
    pub size_bytes: u64,
}

/// How the generation of a volume moves between two opens by the same
/// daemon, with no other writer between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continuity {
    /// It stays (a store server's epoch: it moves when the server reopens
    /// the volume, not when a client reconnects).
    Same,
    /// It goes up by one (the embedded engine's open count, `s3://`).
    Next,
}

/// Which volume the cache holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeIdentity {
    /// Names the volume and its format.
    pub key: String,
    /// The volume's generation now.
    pub generation: u64,
    pub continuity: Continuity,
}

impl VolumeIdentity {
    /// Whether a cache last opened as `header` may serve this volume now.
    fn continues(&self, header: &Header) -> bool {
        header.key == self.key
            && match self.continuity {
                Continuity::Same => header.generation == self.generation,
                Continuity::Next => header.generation.checked_add(1) == Some(self.generation),
            }
    }
}

/// Why the cache could not be opened.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache size {size} is too small: one block needs {need} bytes")]
    TooSmall { size: u64, need: u64 },
    #[error("a read cache serves pohmel:// and s3:// volumes only")]
    NotRemote,
    #[error("volume key is longer than {} bytes", file::KEY_MAX)]
    KeyTooLong,
    #[error("draw the cache's instance id")]
    Random(#[source] io::Error),
    #[error("prepare cache directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write cache header {path}")]
    Header {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The identity of a volume on store servers, given the epoch the first
/// handshake reported. The protocol names no volume id: the key is the
/// volume's name and its servers, and the server's epoch (which moves
/// when it reopens the volume) must match.
pub fn remote_identity(servers: &[String], volume: &str) -> impl FnOnce(u64) -> VolumeIdentity {
    let mut servers = servers.to_vec();
    servers.sort();
    let key = format!("pohmel:{}/{volume}", servers.join(","));
    move |epoch| VolumeIdentity {
        key,
        generation: epoch,
        continuity: Continuity::Same,
    }
}

/// The identity of a volume the embedded engine opened (`s3://`): its
/// random id and format; its open count, which this daemon's open moved
/// by one.
pub fn engine_identity(engine: &crate::store::engine::SlateStore) -> VolumeIdentity {
    use crate::store::OnceStore as _;
    let id: String = engine
        .volume_id()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    VolumeIdentity {
        key: format!("engine:{id}:format{}", crate::store::engine::FORMAT_VERSION),
        generation: engine.epoch(),
        continuity: Continuity::Next,
    }
}

/// A store's reads and its sink, with the cache in front.
pub type Layers = (Arc<dyn Store>, Arc<dyn Sink>);

/// Put the cache `cfg` of `volume` (`None`: not a remote volume, refused)
/// over a store's reads and its sink.
pub fn wrap(
    cfg: &CacheConfig,
    volume: Option<VolumeIdentity>,
    reads: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    metrics: &Arc<Metrics>,
) -> Result<Layers, CacheError> {
    let volume = volume.ok_or(CacheError::NotRemote)?;
    let cache = Arc::new(ReadCache::open(cfg, &volume, Arc::clone(metrics))?);
    Ok((
        Arc::new(CachedStore::new(reads, Arc::clone(&cache))),
        Arc::new(CachedSink::new(sink, cache)),
    ))
}

type Key = (u64, u64);

struct Entry {
    tick: u64,
    charge: u64,
}

struct Index {
    entries: BTreeMap<Key, Entry>,
    lru: BTreeMap<u64, Key>,
    next_tick: u64,
    used_bytes: u64,
    /// Transactions sent and not yet settled, by inode: reads of those
    /// inodes are not cached.
    unsettled: HashMap<u64, HashSet<u64>>,
    /// Bumped whenever a transaction of an inode of the stripe is sent or
    /// settled.
    stripes: Vec<u64>,
}

/// Permission to cache what a read is about to fetch, if nothing changes
/// the file meanwhile. Taken before the fetch.
pub struct FillTicket {
    ino: u64,
    stripe: u64,
}

/// The cache: its directory and its index.
pub struct ReadCache {
    blocks: PathBuf,
    tmp: PathBuf,
    size_bytes: u64,
    instance: [u8; 16],
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
    metrics: Arc<Metrics>,
}

fn stripe_of(ino: u64) -> usize {
    (ino.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as usize % STRIPES
}

impl ReadCache {
    /// Open the cache in `cfg.dir` for the volume `id`: keep its blocks if
    /// it was last opened for this volume with no other writer since,
    /// else empty it; then record `id` in the header.
    pub fn open(
        cfg: &CacheConfig,
        id: &VolumeIdentity,
        metrics: Arc<Metrics>,
    ) -> Result<ReadCache, CacheError> {
        let need = BLOCK_HEADER_BYTES + BLOCK_SIZE + ENTRY_OVERHEAD_BYTES;
        if cfg.size_bytes < need {
            return Err(CacheError::TooSmall {
                size: cfg.size_bytes,
                need,
            });
        }
        if id.key.len() > file::KEY_MAX {
            return Err(CacheError::KeyTooLong);
        }
        let dir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CacheError::Dir { path, source }
        };
        fs::create_dir_all(&cfg.dir).map_err(dir_err(&cfg.dir))?;
        let header_path = cfg.dir.join("header");
        let old = fs::read(&header_path)
            .ok()
            .and_then(|b| file::decode_header(&b));
        let blocks = cfg.dir.join("blocks");
        let tmp = cfg.dir.join("tmp");
        let kept = old.filter(|h| id.continues(h));
        let instance = match &kept {
            Some(h) => h.instance,
            None => {
                // The header goes first: a reset cut short leaves no
                // header, so the next open resets again.
                remove_if_present(&header_path).map_err(dir_err(&header_path))?;
                remove_dir_if_present(&blocks).map_err(dir_err(&blocks))?;
                let mut instance = [0u8; 16];
                getrandom::fill(&mut instance)
                    .map_err(|e| CacheError::Random(io::Error::other(e.to_string())))?;
                instance
            }
        };
        remove_dir_if_present(&tmp).map_err(dir_err(&tmp))?;
        fs::create_dir_all(&tmp).map_err(dir_err(&tmp))?;
        for s in 0..STRIPES {
            let sub = blocks.join(format!("{s:02x}"));
            fs::create_dir_all(&sub).map_err(dir_err(&sub))?;
        }
        let cache = ReadCache {
            blocks,
            tmp,
            size_bytes: cfg.size_bytes,
            instance,
            index: Mutex::new(Index {
                entries: BTreeMap::new(),
                lru: BTreeMap::new(),
                next_tick: 0,
                used_bytes: 0,
                unsettled: HashMap::new(),
                stripes: vec![0; STRIPES],
            }),
            tmp_seq: AtomicU64::new(0),
            metrics,
        };
        if kept.is_some() {
            cache.scan().map_err(dir_err(&cache.blocks))?;
        }
        let header = Header {
            instance,
            key: id.key.clone(),
            generation: id.generation,
        };
        file::write_atomic(
            &cache.tmp.join("header"),
            &header_path,
            &file::encode_header(&header),
            true,
        )
        .map_err(|source| CacheError::Header {
            path: header_path.clone(),
            source,
        })?;
        let idx = cache.lock();
        info!(
            dir = %cfg.dir.display(),
            kept = kept.is_some(),
            blocks = idx.entries.len(),
            used_bytes = idx.used_bytes,
            size_bytes = cfg.size_bytes,
            "read cache open"
        );
        drop(idx);
        Ok(cache)
    }

    /// Rebuild the index from the block files, oldest first; files that
    /// cannot be the cache's go.
    fn scan(&self) -> io::Result<()> {
        let mut found = Vec::new();
        for s in 0..STRIPES {
            let sub = self.blocks.join(format!("{s:02x}"));
            let list = match fs::read_dir(&sub) {
                Ok(list) => list,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in list {
                let entry = entry?;
                let meta = entry.metadata()?;
                let key = entry
                    .file_name()
                    .to_str()
                    .and_then(file::parse_block_name)
                    .filter(|&(ino, _)| stripe_of(ino) == s);
                let len = meta.len();
                match key {
                    Some(key)
                        if meta.is_file()
                            && (BLOCK_HEADER_BYTES..=BLOCK_HEADER_BYTES + BLOCK_SIZE)
                                .contains(&len) =>
                    {
                        let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                        found.push((mtime, key, len));
                    }
                    _ => remove_if_present(&entry.path())?,
                }
            }
        }
        found.sort();
        let mut idx = self.lock();
        let mut victims = Vec::new();
        for (_, key, len) in found {
            self.insert_entry(&mut idx, key, len, &mut victims);
        }
        drop(idx);
        self.unlink(victims);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, (ino, block): Key) -> PathBuf {
        self.blocks
            .join(format!("{:02x}", stripe_of(ino)))
            .join(file::block_name(ino, block))
    }

    /// Block `block` of `ino`, if cached and intact: its bytes up to the
    /// last non-zero one (the rest of the block reads as zeros), in the
    /// buffer the file was read into. A file that fails its check is
    /// dropped, counted and logged, and `None` returned.
    pub fn get(&self, ino: u64, block: u64) -> Option<Bytes> {
        let key = (ino, block);
        if !self.lock().entries.contains_key(&key) {
            return None;
        }
        let path = self.path(key);
        let problem = match fs::read(&path) {
            Ok(bytes) => match file::decode_block(&self.instance, ino, block, bytes) {
                Some(data) => {
                    let mut idx = self.lock();
                    let tick = idx.next_tick;
                    if let Some(e) = idx.entries.get_mut(&key) {
                        let old = std::mem::replace(&mut e.tick, tick);
                        idx.lru.remove(&old);
                        idx.lru.insert(tick, key);
                        idx.next_tick += 1;
                    }
                    return Some(data);
                }
                None => "checksum or header mismatch".to_string(),
            },
            Err(e) => format!("unreadable: {e}"),
        };
        // Dropped meanwhile (evicted, invalidated): an ordinary miss.
        let mut idx = self.lock();
        if !self.remove_entry(&mut idx, key) {
            return None;
        }
        drop(idx);
        self.metrics.read_cache_corrupt.inc();
        limited!(
            self.metrics.log_lines_suppressed,
            WARN,
            path = %path.display(),
            problem,
            "read cache block failed its check; fetching it from the store"
        );
        let _ = remove_if_present(&path);
        None
    }

    /// A ticket for caching blocks of `ino` that a read is about to fetch.
    pub fn ticket(&self, ino: u64) -> FillTicket {
        let idx = self.lock();
        FillTicket {
            ino,
            stripe: idx.stripes[stripe_of(ino)],
        }
    }

    /// Cache a block a read fetched (the whole block), unless a
    /// transaction of its file was sent or settled since `ticket`.
    pub fn fill(&self, ticket: &FillTicket, block: u64, data: &[u8]) {
        self.put((ticket.ino, block), data, Some(ticket));
    }

    /// Cache a block as the store now holds it (acknowledged).
    fn put_acked(&self, ino: u64, block: u64, data: &[u8]) {
        self.put((ino, block), data, None);
    }

    fn put(&self, key: Key, data: &[u8], ticket: Option<&FillTicket>) {
        debug_assert_eq!(data.len() as u64, BLOCK_SIZE);
        let bytes = file::encode_block(&self.instance, key.0, key.1, data);
        let tmp = self
            .tmp
            .join(self.tmp_seq.fetch_add(1, Ordering::Relaxed).to_string());
        let path = self.path(key);
        let written = fs::write(&tmp, &bytes);
        let mut idx = self.lock();
        let allowed = ticket.is_none_or(|t| {
            idx.stripes[stripe_of(t.ino)] == t.stripe && !idx.unsettled.contains_key(&t.ino)
        });
        // Renamed under the lock, so an invalidation either sees the new
        // file in the index or runs after it and removes it.
        let result = match written {
            Ok(()) if allowed => fs::rename(&tmp, &path),
            Ok(()) => Ok(()),
            Err(e) => Err(e),
        };
        let mut victims = Vec::new();
        match result {
            Ok(()) if allowed => {
                self.remove_entry(&mut idx, key);
                self.insert_entry(&mut idx, key, bytes.len() as u64, &mut victims);
                self.metrics.read_cache_bytes_stored.add(data.len() as u64);
            }
            Ok(()) => victims.push(tmp),
            Err(e) => {
                self.remove_entry(&mut idx, key);
                victims.push(tmp);
                victims.push(path);
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    error = %e,
                    "write read cache block"
                );
            }
        }
        drop(idx);
        self.unlink(victims);
    }

    /// Add `key` (its file already in place) and evict beyond the bound;
    /// the files of the evicted blocks are pushed to `victims`.
    fn insert_entry(&self, idx: &mut Index, key: Key, file_bytes: u64, victims: &mut Vec<PathBuf>) {
        let charge = file_bytes + ENTRY_OVERHEAD_BYTES;
        let tick = idx.next_tick;
        idx.next_tick += 1;
        idx.entries.insert(key, Entry { tick, charge });
        idx.lru.insert(tick, key);
        idx.used_bytes += charge;
        while idx.used_bytes > self.size_bytes {
            let Some((_, old)) = idx.lru.pop_first() else {
                break;
            };
            if let Some(e) = idx.entries.remove(&old) {
                idx.used_bytes -= e.charge;
            }
            self.metrics.read_cache_evictions.inc();
            victims.push(self.path(old));
        }
        debug_assert!(idx.used_bytes <= self.size_bytes);
    }

    /// Drop `key` from the index (not its file); whether it was there.
    fn remove_entry(&self, idx: &mut Index, key: Key) -> bool {
        match idx.entries.remove(&key) {
            Some(e) => {
                idx.lru.remove(&e.tick);
                idx.used_bytes -= e.charge;
                true
            }
            None => false,
        }
    }

    /// Drop the blocks `blocks` of `ino` and their files.
    fn invalidate(&self, ino: u64, blocks: std::ops::RangeInclusive<u64>) {
        let mut idx = self.lock();
        let keys: Vec<Key> = idx
            .entries
            .range((ino, *blocks.start())..=(ino, *blocks.end()))
            .map(|(k, _)| *k)
            .collect();
        let victims: Vec<PathBuf> = keys
            .into_iter()
            .filter(|&k| self.remove_entry(&mut idx, k))
            .map(|k| self.path(k))
            .collect();
        drop(idx);
        self.unlink(victims);
    }

    /// Transaction `txn_id` of `inos` is about to be sent: reads of those
    /// inodes stop being cached until it settles.
    fn begin(&self, txn_id: u64, inos: &[u64]) {
        let mut idx = self.lock();
        for &ino in inos {
            idx.stripes[stripe_of(ino)] += 1;
            idx.unsettled.entry(ino).or_default().insert(txn_id);
        }
    }

    /// Transaction `txn_id` of `inos` is durable, or was refused with
    /// nothing applied.
    fn settle(&self, txn_id: u64, inos: &[u64]) {
        let mut idx = self.lock();
        for &ino in inos {
            idx.stripes[stripe_of(ino)] += 1;
            if let Some(set) = idx.unsettled.get_mut(&ino) {
                set.remove(&txn_id);
                if set.is_empty() {
                    idx.unsettled.remove(&ino);
                }
            }
        }
    }

    fn unlink(&self, paths: Vec<PathBuf>) {
        for p in paths {
            if let Err(e) = remove_if_present(&p) {
                limited!(
                    self.metrics.log_lines_suppressed,
                    WARN,
                    path = %p.display(),
                    error = %e,
                    "remove read cache file"
                );
            }
        }
    }

    /// Bytes charged against the bound now (files plus index).
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }

    /// Blocks cached now.
    pub fn blocks(&self) -> usize {
        self.lock().entries.len()
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_dir_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
