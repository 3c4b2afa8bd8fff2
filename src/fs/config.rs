//! The filesystem layer's settings (`serve`'s and `mount`'s options).

use std::time::Duration;

/// How long the guest may cache attributes and entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CachePolicy {
    /// No caching: every access asks the daemon (direct I/O).
    Never,
    /// Cache attributes and entries for one second (virtiofsd's default).
    Auto,
    /// Cache for a day and keep page cache across opens: the daemon is the
    /// only writer of the volume.
    Always,
}

/// Settings of the filesystem layer.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub cache: CachePolicy,
    /// Let the guest cache writes and send them later (FUSE writeback cache).
    pub writeback_cache: bool,
    /// Allow mknod of character and block devices.
    pub allow_device_nodes: bool,
    /// The most files and directories open at once.
    pub max_handles: usize,
    /// The most distinct inodes the guest may hold references to (FUSE
    /// lookup counts; `refs.rs`): past it, a lookup, create or link of an
    /// inode the guest does not hold yet is answered ENFILE, and a
    /// readdirplus ends its reply early. A Linux guest keeps an inode in
    /// memory for each, so it reaches the bound only by holding millions.
    pub max_referenced_inodes: usize,
    /// Serve the volume read-only (`--readonly`): every request that would
    /// change it is answered EROFS before the store is asked anything.
    pub read_only: bool,
}

impl Default for FsConfig {
    fn default() -> FsConfig {
        FsConfig {
            cache: CachePolicy::Auto,
            writeback_cache: false,
            allow_device_nodes: false,
            max_handles: 65_536,
            max_referenced_inodes: 1 << 22,
            read_only: false,
        }
    }
}

impl FsConfig {
    pub(super) fn timeout(&self) -> Duration {
        match self.cache {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86_400),
        }
    }
}
