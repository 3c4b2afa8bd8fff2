//! What opening a volume reports: the volume's identity (id, format,
//! epoch, holder), or why it could not be opened.

use std::path::PathBuf;

use thiserror::Error;

use slatedb::{CloseReason, ErrorKind};

use super::{holder, log};
use crate::store::StoreError;

/// Why a volume could not be opened.
#[derive(Debug, Error)]
pub enum OpenVolumeError {
    #[error("bad volume URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("create volume directory {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("configure object store")]
    ObjectStore(#[source] object_store::Error),
    #[error("start engine runtime")]
    Runtime(#[source] std::io::Error),
    #[error("open engine")]
    Engine(#[source] slatedb::Error),
    #[error("volume has format version {found}; this build reads version {expected}")]
    FormatVersion { found: u32, expected: u32 },
    #[error("the store holds data but no pohmelfs superblock: not a pohmelfs volume")]
    NotAVolume,
    #[error("no volume there")]
    NoVolume,
    #[error("a volume exists there already")]
    Exists,
    #[error("the volume is held by {0}")]
    Held(holder::Holder),
    #[error("read or write the volume's holder record")]
    Holder(#[source] object_store::Error),
    #[error("read or write the superblock")]
    Superblock(#[source] StoreError),
    #[error("open segment files")]
    Segments(#[source] std::io::Error),
    #[error("open the commit log")]
    Log(#[source] log::LogError),
    #[error("replay the commit log")]
    Replay(#[source] StoreError),
    #[error("{0} is a snapshot: serve it with --readonly, or clone it to write")]
    Snapshot(PathBuf),
    #[error("a read-only open is ReadOnlyVolume's, not the writable engine's")]
    ReadOnlyMode,
    #[error("remove the clone marker after drawing the clone's volume id")]
    CloneMarker(#[source] std::io::Error),
}

/// What a volume is and who holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeIdentity {
    pub volume_id: [u8; 16],
    pub format_version: u32,
    /// Opens for writing so far, this one included.
    pub epoch: u64,
    pub holder: Option<holder::Holder>,
}

impl VolumeIdentity {
    /// The volume id in hex.
    pub fn id_hex(&self) -> String {
        self.volume_id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// An engine error as the store reports it: fencing is its own variant
/// (another writer owns the volume now), everything else is I/O.
pub(crate) fn map_engine_error(e: slatedb::Error) -> StoreError {
    if e.kind() == ErrorKind::Closed(CloseReason::Fenced) {
        StoreError::Fenced
    } else {
        StoreError::Io(std::io::Error::other(e))
    }
}
