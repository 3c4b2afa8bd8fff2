//! Opening a store from its URL (`mem:`, `file:`, `s3:`), and why an
//! open failed ([`OpenError`]).

use thiserror::Error;

use super::{engine, mem, readcache, OnceStore, Store, StoreError};

/// Open the local store named by `url`: `mem:`, `file:` or `s3:`. Store
/// servers (`pohmel:`) are reached through [`crate::net::open`], which
/// sits above this module. The daemon does not use this directly: it opens
/// its store through [`crate::writeback::open`], which puts the write-back
/// layer in front.
pub fn open(url: &str) -> Result<std::sync::Arc<dyn Store>, OpenError> {
    let (scheme, rest) = url
        .split_once(':')
        .ok_or_else(|| OpenError::BadUrl(url.to_string()))?;
    match scheme {
        "mem" => Ok(std::sync::Arc::new(mem::MemStore::from_url_rest(rest)?)),
        "file" | "s3" => Ok(std::sync::Arc::new(open_volume(url)?)),
        other => Err(OpenError::UnknownScheme(other.to_string())),
    }
}

/// Open the store named by `url` for exactly-once commits: `mem:`, `file:`
/// and `s3:`, the stores that keep applied records themselves. `pohmel:` is
/// an error here: its client names every transaction with its own session
/// and id, and the store server applies each once.
pub fn open_once(url: &str) -> Result<std::sync::Arc<dyn OnceStore>, OpenError> {
    open_once_as(url, engine::OpenMode::Any)
}

/// As [`open_once`], a `file:` or `s3:` volume opened as `mode` says.
pub fn open_once_as(
    url: &str,
    mode: engine::OpenMode,
) -> Result<std::sync::Arc<dyn OnceStore>, OpenError> {
    let (scheme, rest) = url
        .split_once(':')
        .ok_or_else(|| OpenError::BadUrl(url.to_string()))?;
    match scheme {
        "mem" => Ok(std::sync::Arc::new(mem::MemStore::from_url_rest(rest)?)),
        "file" | "s3" if mode == engine::OpenMode::ReadOnly => Ok(std::sync::Arc::new(
            engine::ReadOnlyVolume::open(url).map_err(|e| OpenError::read_only(url, e))?,
        )),
        "file" | "s3" => Ok(std::sync::Arc::new(
            engine::SlateStore::open_as(url, mode).map_err(|e| OpenError::volume(url, e))?,
        )),
        other => Err(OpenError::UnknownScheme(other.to_string())),
    }
}

fn open_volume(url: &str) -> Result<engine::SlateStore, OpenError> {
    engine::SlateStore::open(url).map_err(|e| OpenError::volume(url, e))
}

/// Why a store could not be opened from its URL.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("store URL {0:?} has no scheme (expected e.g. mem:)")]
    BadUrl(String),
    #[error("unknown store URL scheme {0:?} (known: mem, file, s3, pohmel)")]
    UnknownScheme(String),
    #[error("bad store option {0:?}")]
    BadOption(String),
    #[error("connect to store {url:?}")]
    Connect {
        url: String,
        #[source]
        source: StoreError,
    },
    #[error("open the read cache of {url:?}")]
    ReadCache {
        url: String,
        #[source]
        source: readcache::CacheError,
    },
    #[error("open volume {url:?}")]
    Volume {
        url: String,
        #[source]
        source: engine::OpenVolumeError,
    },
    #[error("open volume {url:?} read-only")]
    ReadOnly {
        url: String,
        #[source]
        source: engine::OpenReaderError,
    },
    #[error("no volume at {url}; create it with pohmelfs format {url}")]
    NoVolume { url: String },
    #[error("a volume exists at {url} already; refusing to overwrite it")]
    Exists { url: String },
    #[error("volume {url} is held by {holder}; stop that daemon, or pass --take-over to fence it")]
    Held {
        url: String,
        holder: engine::holder::Holder,
    },
    /// A `pohmel://` volume whose writer claim another live daemon holds
    /// (`docs/protocol.md`, "Writer claim"): the store server's words.
    #[error("volume {url}: {writer}; stop that daemon, or pass --take-over to fence it")]
    Claimed { url: String, writer: String },
}

impl OpenError {
    /// A volume's open error: a missing, existing or held volume as its
    /// own one-line variant, the rest as [`OpenError::Volume`]. `url` is
    /// shown as given: command lines carry no secrets
    /// (`confine::refuse_secret_in_url`).
    pub fn volume(url: &str, source: engine::OpenVolumeError) -> OpenError {
        let shown = || url.to_string();
        match source {
            engine::OpenVolumeError::NoVolume => OpenError::NoVolume { url: shown() },
            engine::OpenVolumeError::Exists => OpenError::Exists { url: shown() },
            engine::OpenVolumeError::Held(holder) => OpenError::Held {
                url: shown(),
                holder,
            },
            source => OpenError::Volume {
                url: url.to_string(),
                source,
            },
        }
    }

    /// A read-only open's error: a missing volume as its own one-line
    /// variant, the rest as [`OpenError::ReadOnly`].
    pub fn read_only(url: &str, source: engine::OpenReaderError) -> OpenError {
        match source {
            engine::OpenReaderError::NoVolume | engine::OpenReaderError::Missing(_) => {
                OpenError::NoVolume {
                    url: url.to_string(),
                }
            }
            source => OpenError::ReadOnly {
                url: url.to_string(),
                source,
            },
        }
    }

    /// Whether this error is a whole sentence to show alone (no context
    /// around it).
    pub fn is_one_line(&self) -> bool {
        matches!(
            self,
            OpenError::NoVolume { .. }
                | OpenError::Exists { .. }
                | OpenError::Held { .. }
                | OpenError::Claimed { .. }
        )
    }
}
