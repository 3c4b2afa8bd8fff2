//! # pohmelfs
//!
//! A virtio-fs backend for virtual machines whose files live on a
//! transactional store, after POHMELFS. A QEMU or cloud-hypervisor guest
//! mounts it with `mount -t virtiofs TAG /mnt`.
//!
//! # Layout
//!
//! The first five modules follow a guest write from the virtqueue to the
//! store:
//!
//! * [`device`] — the vhost-user-fs device: the frontend connection, the
//!   virtqueues, descriptor chains handed to a worker pool and decoded as
//!   FUSE requests by `fuse-backend-rs`.
//! * [`fs`] — the filesystem the guest sees: inodes, lookup counts, handles,
//!   directories, attributes, permissions, extended attributes. Every
//!   mutation becomes one transaction of blind ops on the [`store::Store`]
//!   seam.
//! * [`writeback`] — the transaction layer between the filesystem and a store:
//!   pages tagged with the transactions that carry them, write-back,
//!   ordering, resends and failover, fsync waiting for durable acks
//!   (`docs/design.md`). It is itself a [`store::Store`].
//! * [`store`] — the store seam (traits with their contract) and the local
//!   stores: `mem:` (daemon memory, for tests and trials) and the embedded
//!   SlateDB engine with its segment files (`file://`, `s3://`).
//! * [`net`] — volumes on store servers: the wire protocol (frames,
//!   messages, their validation, the authenticated handshake,
//!   `docs/protocol.md`), the `pohmel://` client and the store server
//!   itself (`pohmelfs store`). It depends on the store seam, never the
//!   other way round: `device → fs → writeback → store ← net`.
//!
//! Beside the data path:
//!
//! * [`checksum`] — CRC-32C, the checksum of everything written or sent.
//! * [`metrics`] — every counter the daemon keeps.
//! * [`logging`] — the commands' log lines: `--log-level` or `RUST_LOG`, and
//!   syslog priorities when stderr is the journal.
//! * [`ratelimit`] — log hygiene for lines a guest or peer can cause: a
//!   per-call-site limit and a length cap (`docs/security.md`).
//! * [`confine`] — what the daemons give up at startup: umask, capabilities,
//!   no_new_privs, and the seccomp filter of the system calls they use.
//! * [`control`] — the control socket that `pohmelfs status` reads, and the
//!   Prometheus endpoint.
//! * [`systemd`] — readiness notification (`Type=notify`) and socket
//!   activation, without libsystemd.
//! * [`check`] — correctness instruments from the outside: the volume
//!   checker (`pohmelfs check`) and the model-based torture (`pohmelfs torture`).
//! * `fuzz` (with the cargo feature `fuzzing`, and in tests) — the entry
//!   points of the fuzz targets in `fuzz/` (`scripts/fuzz`).
//!
//! The `pohmelfs` binary (`src/main.rs`) parses the command line and calls
//! into these; its `mount` module serves the same filesystem through the
//! host's `/dev/fuse` (`pohmelfs mount`, for POSIX test suites).

pub mod check;
pub mod checksum;
pub mod confine;
pub mod control;
pub mod device;
pub mod fs;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod store;
pub mod systemd;
pub mod writeback;

use std::fmt;

/// Display an error with its whole `source()` chain: `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
