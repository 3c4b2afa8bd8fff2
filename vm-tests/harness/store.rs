//! A `pohmelfs store` server process for tests of `pohmel://` volumes: started
//! on a loopback port, killed with SIGKILL on demand and on drop, restartable on
//! the same port and data so a daemon's URL stays valid.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{log_tail, wait_until, Failure, Result};

/// How long a store server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running store server.
pub struct StoreServer {
    child: Option<Child>,
    data_url: String,
    port: u16,
    log: PathBuf,
    starts: u32,
}

impl StoreServer {
    /// Start a server keeping its volumes under `data_url`, on a free port.
    pub fn start(dir: &Path, data_url: &str) -> Result<StoreServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Failure::new(format!("find a free port: {e}")))?
            .port();
        let mut s = StoreServer {
            child: None,
            data_url: data_url.to_owned(),
            port,
            log: dir.join("store.log"),
            starts: 0,
        };
        s.spawn()?;
        Ok(s)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's log, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Failure::new(format!("open {}: {e}", self.log.display())))?;
        let addr_file = self.log.with_extension(format!("addr{}", self.starts));
        let child = Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
            .args(["store", "--listen", &self.addr(), "--data", &self.data_url])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Failure::new(format!("start pohmelfs store: {e}")))?;
        self.child = Some(child);
        let listening = wait_until(START_TIMEOUT, Duration::from_millis(20), || {
            if addr_file.exists() {
                return Some(Ok(()));
            }
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(Err(format!("exited with {status}"))),
                _ => None,
            }
        });
        match listening {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(Failure::new(format!(
                "store server {why}:\n{}",
                log_tail(&self.log, 30)
            ))),
            None => Err(Failure::new(format!(
                "store server did not listen within {START_TIMEOUT:?}:\n{}",
                log_tail(&self.log, 30)
            ))),
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
