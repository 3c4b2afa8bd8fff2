//! The one test kit of pohmelfs, shared by the unit tests (as a dev-dependency), the integration
//! tests in `tests/` and the VM harness in `vm-tests/harness/`.
//!
//! # Layout
//! - [`wait`]: [`wait_until`], the only way a test waits: poll a condition, with a bound.
//! - [`scratch`]: [`ScratchDir`], a test's own directory, removed when the test passes and kept
//!   (with its logs) when it fails.
//! - [`process`]: [`ChildGuard`], a child process killed on drop that can be waited for until
//!   ready, and [`log_tail`] for failure messages.
//! - [`store`]: [`StoreServer`], a `pohmelfs store` process on loopback, restartable on the
//!   same port and data.
//! - [`s3`]: [`Moto`] and [`S3sFs`], two independent S3-compatible servers on loopback
//!   with one bucket each.
//! - [`guest`]: [`GuestBytes`], the guest's buffers of a FUSE WRITE, for tests that call a
//!   `FileSystem` directly.
//! - [`netns`]: [`Network`], hosts of their own on this machine (network namespaces joined by
//!   veth pairs), where servers and daemons run as on separate hosts.
//! - [`skip`]: [`skip_requested`] and [`skipped`], which print the `SKIPPED: <test>: <reason>`
//!   line `scripts/test` counts.
//! - [`steps`]: [`Steps`], numbered steps on a thread of their own (a writer that goes on while
//!   the test does something else), counted so that the test can wait for them.
//! - [`format_volume`]: `pohmelfs format URL`, how every test makes a `file://` or `s3://`
//!   volume.
//!
//! Every process the kit starts is killed when its handle drops, pass or fail. The kit knows
//! nothing of pohmelfs' types (it uses `std`, `thiserror`, and fuse-backend-rs and vm-memory for the guest's buffers), so the library's own unit tests
//! use it without a second copy of the library; the `pohmelfs` binary is passed in by the
//! caller (`env!("CARGO_BIN_EXE_pohmelfs")`). Its failures are [`Error`]s, for the caller to
//! turn into a panic or its own failure type.

pub mod guest;
pub mod netns;
pub mod process;
pub mod s3;
pub mod scratch;
pub mod skip;
pub mod steps;
pub mod store;
pub mod wait;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use guest::GuestBytes;
pub use netns::{Netns, Network};
pub use process::{log_tail, ChildGuard};
pub use s3::{Moto, S3sFs};
pub use scratch::ScratchDir;
pub use skip::{skip_requested, skipped};
pub use steps::Steps;
pub use store::StoreServer;
pub use wait::{wait_until, Ready};

/// Why a kit helper failed. `Debug` prints the message as `Display` does, log tails included,
/// so `expect` and `unwrap` on a kit result read well.
#[derive(thiserror::Error)]
pub enum Error {
    /// A file or socket operation failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A program the test needs is not installed.
    #[error("{program} is not installed: {fix}")]
    Missing { program: String, fix: String },
    /// A process ended while the test still needed it.
    #[error("{what} exited with {status}; {}:\n{tail}", log.display())]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    /// A process did not become ready in time.
    #[error("{what} not ready within {timeout:?}; {}:\n{tail}", log.display())]
    NotReady {
        what: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    /// A process answered, but not as it should.
    #[error("{0}")]
    Unexpected(String),
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Run `pohmelfs format URL` with the `pohmelfs` binary `exe` (plus `args`, e.g.
/// `--capacity 8M`): tests make their volumes as operators do, since `serve`, `mount` and
/// `store` open only volumes that exist.
pub fn format_volume(exe: impl AsRef<std::path::Path>, url: &str, args: &[&str]) -> Result<()> {
    format_volume_by(std::process::Command::new(exe.as_ref()), url, args)
}

/// As [`format_volume`], by `pohmelfs`, a command made ready to run the binary (in a network
/// namespace, [`Netns::command`]; with an S3 volume's credentials in its environment).
pub fn format_volume_by(
    mut pohmelfs: std::process::Command,
    url: &str,
    args: &[&str],
) -> Result<()> {
    let program = pohmelfs.get_program().to_string_lossy().into_owned();
    let out = pohmelfs
        .arg("format")
        .arg(url)
        .args(args)
        .output()
        .map_err(Error::io(format!("run {program} format")))?;
    if !out.status.success() {
        return Err(Error::Unexpected(format!(
            "pohmelfs format {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
