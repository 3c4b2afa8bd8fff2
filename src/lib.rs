//! # pohmelfs
//!
//! A virtio-fs backend for virtual machines whose files live on a
//! transactional store, after POHMELFS. A QEMU or cloud-hypervisor guest
//! mounts it with `mount -t virtiofs TAG /mnt`.
//!
//! # Layout
//!
//! The modules follow a guest write from the virtqueue to the store:
//!
//! * [`device`] — the vhost-user-fs device: the frontend connection, the
//!   virtqueues, descriptor chains handed to a worker pool and decoded as
//!   FUSE requests by `fuse-backend-rs`.
//! * [`fs`] — the filesystem the guest sees: inodes, lookup counts, handles,
//!   directories, attributes, permissions, extended attributes.
//! * [`store`] — the store seam (a trait with its contract) and its
//!   implementations: `mem:` for now; the durable engine, the store server
//!   and the transaction layer with its tagged page cache slot in behind the
//!   same trait.
//! * [`metrics`] — every counter the daemon keeps.
//! * [`check`] — correctness instruments from the outside: the volume
//!   checker (`pohmelfs check`) and the model-based torture (`pohmelfs torture`).

pub mod check;
pub mod control;
pub mod device;
pub mod fs;
pub mod metrics;
pub mod proto;
pub mod store;
pub mod txn;

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
