//! A `pohmelfs store` server process for tests of `pohmel://` volumes: the test kit's
//! [`pohmelfs_testkit::StoreServer`] with its files in the test's directory and its failures as
//! [`Failure`]s. Started on a loopback port, killed with SIGKILL on demand and on drop,
//! restartable on the same port and data so a daemon's URL stays valid, and paused
//! (SIGSTOP) and resumed (SIGCONT) as a server the network cannot reach.

use std::path::Path;

use super::{Failure, Result};

impl From<pohmelfs_testkit::Error> for Failure {
    fn from(error: pohmelfs_testkit::Error) -> Failure {
        Failure::new(format!("{error:?}"))
    }
}

/// A running store server.
pub struct StoreServer(pohmelfs_testkit::StoreServer);

impl StoreServer {
    /// Start a server keeping its volumes under `data_url`, its log in `dir/store.log`.
    pub fn start(dir: &Path, data_url: &str) -> Result<StoreServer> {
        let exe = env!("CARGO_BIN_EXE_pohmelfs");
        let server = pohmelfs_testkit::StoreServer::start(exe, dir, "store", data_url, None)?;
        Ok(StoreServer(server))
    }

    /// Start a server as [`StoreServer::start`] does, in network namespace `netns` on
    /// address `ip`, with `secret` (a server off loopback needs one; clients name
    /// [`StoreServer::secret_file`]) and more `pohmelfs store` options `extra`.
    #[allow(dead_code)] // for the migration tests between hosts
    pub fn start_in(
        dir: &Path,
        data_url: &str,
        secret: &str,
        netns: &pohmelfs_testkit::Netns,
        ip: std::net::IpAddr,
        extra: &[&str],
    ) -> Result<StoreServer> {
        let exe = env!("CARGO_BIN_EXE_pohmelfs");
        let server = pohmelfs_testkit::StoreServer::start_in_with(
            exe,
            dir,
            "store",
            data_url,
            Some(secret),
            (netns, ip),
            extra,
        )?;
        Ok(StoreServer(server))
    }

    /// The file holding the secret of a server started with one, for clients'
    /// `secret_file=`.
    #[allow(dead_code)] // for the migration tests between hosts
    pub fn secret_file(dir: &Path) -> std::path::PathBuf {
        pohmelfs_testkit::store::secret_file(dir)
    }

    /// `127.0.0.1:PORT`, the same across restarts.
    pub fn addr(&self) -> &str {
        self.0.addr()
    }

    /// The server's log, across restarts.
    pub fn log_path(&self) -> &Path {
        self.0.log_path()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.0.kill9();
    }

    /// SIGSTOP: the server keeps its connections and answers nothing, as an unreachable
    /// one; [`StoreServer::resume`] lets it go on.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP, "SIGSTOP")
    }

    /// SIGCONT after [`StoreServer::pause`]; harmless when running.
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT, "SIGCONT")
    }

    fn signal(&self, signal: libc::c_int, name: &str) -> Result<()> {
        let pid = self
            .0
            .pid()
            .and_then(|p| libc::pid_t::try_from(p).ok())
            .ok_or_else(|| Failure::new(format!("{name}: the store server is not running")))?;
        // SAFETY: kill(2) with the pid of our own child, which the test kit has not reaped
        // (it still holds the `Child`): no other process can have that pid.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(Failure::new(format!(
                "{name} to the store server: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        Ok(self.0.restart()?)
    }
}
