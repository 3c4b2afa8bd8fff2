//! Harness of the VM tests: boots a guest under QEMU against a vhost-user-fs daemon.
//!
//! # Layout
//! - [`image`]: builds the guest kernel and initramfs once per test process (`images/build-guest`).
//! - [`daemon`]: the daemon under test, [`DaemonKind::Pohmelfs`] or the reference
//!   [`DaemonKind::Virtiofsd`], started on a socket in the test's own directory.
//! - [`qemu`]: the [`Guest`] builder: runs one guest with a shell script as its workload and
//!   returns its console and exit status, after checking the daemon
//!   ([`Daemon::check_health`]: no panic in its log; pohmelfs alive with `fs_internal_errors`
//!   at 0). Every test so ends with that check after its last guest.
//! - [`initrd`]: the guest's initrd: base image, optional images, and the script (and, when
//!   asked for, the `pohmelfs` binary, or `images/root-init` as `/init` to boot the volume as
//!   the root) in a newc archive written by [`cpio`].
//! - [`migration`]: a live migration of one guest between two QEMU processes and two daemons
//!   (QMP `migrate`, the downtime QEMU reports).
//! - [`store`]: a `pohmelfs store` server for `pohmel://` volumes. The daemon's counters are
//!   read by [`Daemon::counter`]. Waiting, log tails and processes come from the test kit (`pohmelfs_testkit`).
//!
//! Every test gets a [`VmTest`]: its own directory under `target/vm-tests/`, removed when the test
//! passes and kept (with the daemon, QEMU and console logs) when it fails. Child processes are
//! killed in `Drop`, so a failing or panicking test leaves nothing running.
//!
//! Environment: `POHMELFS_SKIP_VM_TESTS=1` skips every VM test, `POHMELFS_SKIP_VIRTIOFSD=1` skips
//! the reference runs, `POHMELFS_KEEP_VM_LOGS=1` keeps the directories of passed tests too,
//! `VIRTIOFSD` and `QEMU` name the binaries, `POHMELFS_VM_ACCEL=kvm|tcg` bypasses the KVM probe.

pub mod cpio;
pub mod daemon;
mod daemon_log;
pub mod image;
pub mod initrd;
pub mod migration;
pub mod qemu;
pub mod store;

use std::cell::Cell;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

pub use daemon::{Daemon, DaemonKind};
pub use pohmelfs_testkit::{log_tail, wait_until};
pub use qemu::Guest;

/// Why a VM test failed: a message meant to be read as is, with log tails and the fix.
///
/// `Debug` prints the message verbatim, so a test returning `Err(Failure)` shows it unquoted.
pub struct Failure(String);

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Failure(message.into())
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

/// The repository root (where `Cargo.toml` is).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/` of the repository: everything the tests create lives below it.
pub fn target_dir() -> PathBuf {
    repo_root().join("target")
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|value| !value.is_empty() && value != "0")
}

/// One VM test run against one daemon: its name, daemon kind and scratch directory.
///
/// The directory is `target/vm-tests/<daemon>-<test>-<pid>/`; it is removed on drop once
/// [`VmTest::pass`] was called (unless `POHMELFS_KEEP_VM_LOGS` is set), and kept for
/// inspection otherwise.
pub struct VmTest {
    kind: DaemonKind,
    name: String,
    dir: PathBuf,
    passed: Cell<bool>,
    guest_numbers: Arc<AtomicU32>,
}

impl VmTest {
    /// Prepares the test, or returns `None` (after saying so) when the environment asks to skip it.
    pub fn setup(kind: DaemonKind, name: &str) -> Result<Option<VmTest>> {
        if env_flag("POHMELFS_SKIP_VM_TESTS") {
            eprintln!("SKIPPED: {kind}::{name}: POHMELFS_SKIP_VM_TESTS is set");
            return Ok(None);
        }
        if kind == DaemonKind::Virtiofsd && env_flag("POHMELFS_SKIP_VIRTIOFSD") {
            eprintln!("SKIPPED: {kind}::{name}: POHMELFS_SKIP_VIRTIOFSD is set");
            return Ok(None);
        }
        let dir = target_dir()
            .join("vm-tests")
            .join(format!("{kind}-{name}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .map_err(|e| Failure::new(format!("remove stale {}: {e}", dir.display())))?;
        }
        fs::create_dir_all(&dir)
            .map_err(|e| Failure::new(format!("create {}: {e}", dir.display())))?;
        Ok(Some(VmTest {
            kind,
            name: name.to_owned(),
            dir,
            passed: Cell::new(false),
            guest_numbers: Arc::default(),
        }))
    }

    /// The daemon this run tests.
    pub fn kind(&self) -> DaemonKind {
        self.kind
    }

    /// The test's scratch directory (e.g. for a `file://` store).
    #[allow(dead_code)] // for tests of persistent stores
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new `file://` volume named `name` in the test's directory, made by `pohmelfs format`
    /// with `args` (e.g. `--capacity 8M`), as an operator makes one: the daemon opens only
    /// volumes that exist. Its URL.
    #[allow(dead_code)] // for tests of persistent stores
    pub fn new_volume(&self, name: &str, args: &[&str]) -> Result<String> {
        let url = format!("file://{}/{name}", self.dir.display());
        pohmelfs_testkit::format_volume(env!("CARGO_BIN_EXE_pohmelfs"), &url, args)?;
        Ok(url)
    }

    /// A builder for this test's daemon, with the default arguments for its kind.
    pub fn daemon(&self) -> daemon::DaemonBuilder {
        Daemon::builder(self.kind, &self.dir, Arc::clone(&self.guest_numbers))
    }

    /// A builder for another daemon of this test, whose files (socket, log, virtiofsd's
    /// shared directory) go to the subdirectory `name`: two daemons at once.
    #[allow(dead_code)] // for the migration test
    pub fn daemon_in(&self, name: &str) -> Result<daemon::DaemonBuilder> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir)
            .map_err(|e| Failure::new(format!("create {}: {e}", dir.display())))?;
        Ok(Daemon::builder(
            self.kind,
            &dir,
            Arc::clone(&self.guest_numbers),
        ))
    }

    /// Marks the test as passed: its directory is removed on drop.
    pub fn pass(&self) {
        self.passed.set(true);
    }
}

impl Drop for VmTest {
    fn drop(&mut self) {
        if self.passed.get() && !std::thread::panicking() && !env_flag("POHMELFS_KEEP_VM_LOGS") {
            if let Err(error) = fs::remove_dir_all(&self.dir) {
                eprintln!("cannot remove {}: {error}", self.dir.display());
            }
        } else {
            eprintln!(
                "{}::{}: logs kept in {}",
                self.kind,
                self.name,
                self.dir.display()
            );
        }
    }
}
