//! A `pohmelfs store` server process on loopback, for tests of `pohmel://` volumes: killed with
//! SIGKILL on demand and on drop, restartable on the same port and data so that clients' URLs
//! stay valid across a crash.
//!
//! The first start listens on `127.0.0.1:0` and learns its port from `--addr-file` (written
//! once listening, by rename), so no port is guessed; a restart binds that port again.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{log_tail, wait_until, ChildGuard, Error, Result};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the start is polled.
const POLL: Duration = Duration::from_millis(10);
/// Lines of the log a failure message shows.
const TAIL_LINES: usize = 40;

/// How to start a [`StoreServer`]; see [`StoreServer::builder`].
pub struct StoreServerBuilder {
    exe: PathBuf,
    dir: PathBuf,
    data_url: String,
    name: String,
    secret_file: Option<PathBuf>,
    log_level: Option<String>,
    env: Vec<(OsString, OsString)>,
}

impl StoreServerBuilder {
    /// Names the server's files in the directory: `<name>.log` (appended across restarts) and
    /// `<name>.addrN`. Default `store`.
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    /// The shared secret clients must prove (`--secret-file`); default none.
    pub fn secret_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.secret_file = Some(path.into());
        self
    }

    /// `--log-level`; default the server's own.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.to_owned());
        self
    }

    /// An environment variable of the server process.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the server and waits until it listens.
    pub fn start(self) -> Result<StoreServer> {
        let log = self.dir.join(format!("{}.log", self.name));
        let mut server = StoreServer {
            builder: self,
            child: None,
            listen: "127.0.0.1:0".to_owned(),
            log,
            starts: 0,
        };
        server.spawn()?;
        Ok(server)
    }
}

/// A running `pohmelfs store` process.
pub struct StoreServer {
    builder: StoreServerBuilder,
    child: Option<ChildGuard>,
    /// What `--listen` gets: port 0 until the first start has bound one.
    listen: String,
    log: PathBuf,
    starts: u32,
}

impl StoreServer {
    /// A server of the `pohmelfs` binary `exe` keeping its volumes under `data_url`, with its
    /// files in `dir`.
    pub fn builder(
        exe: impl Into<PathBuf>,
        dir: impl Into<PathBuf>,
        data_url: &str,
    ) -> StoreServerBuilder {
        StoreServerBuilder {
            exe: exe.into(),
            dir: dir.into(),
            data_url: data_url.to_owned(),
            name: "store".to_owned(),
            secret_file: None,
            log_level: None,
            env: Vec::new(),
        }
    }

    /// `127.0.0.1:PORT`, the same across restarts.
    pub fn addr(&self) -> &str {
        &self.listen
    }

    /// The server's log, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log, across restarts (empty if unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash; a no-op when not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts again on the same port and data (after a kill, or killing it first).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let b = &self.builder;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(Error::io(format!("open {}", self.log.display())))?;
        let addr_file = b.dir.join(format!("{}.addr{}", b.name, self.starts));
        let mut cmd = Command::new(&b.exe);
        cmd.args(["store", "--listen", &self.listen, "--data", &b.data_url])
            .arg("--addr-file")
            .arg(&addr_file)
            .envs(b.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(secret) = &b.secret_file {
            cmd.arg("--secret-file").arg(secret);
        }
        if let Some(level) = &b.log_level {
            cmd.args(["--log-level", level]);
        }
        let what = format!("store server {} (try {})", b.name, self.starts);
        let child = ChildGuard(
            cmd.spawn()
                .map_err(Error::io(format!("start {}", b.exe.display())))?,
        );
        let child = self.child.insert(child);
        // The server writes the file by rename once it listens: it is whole when it exists.
        let outcome = wait_until(START_TIMEOUT, POLL, || {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                return Some(Ok(addr));
            }
            child.exited().map(Err)
        });
        match outcome {
            Some(Ok(addr)) => {
                self.listen = addr.trim().to_owned();
                Ok(())
            }
            Some(Err(status)) => Err(Error::Exited {
                what,
                status,
                log: self.log.clone(),
                tail: log_tail(&self.log, TAIL_LINES),
            }),
            None => Err(Error::NotReady {
                what,
                timeout: START_TIMEOUT,
                log: self.log.clone(),
                tail: log_tail(&self.log, TAIL_LINES),
            }),
        }
    }
}
