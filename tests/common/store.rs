//! A `pohmelfs store` server process on loopback, for tests of `pohmel://` volumes: killed with
//! SIGKILL on demand and on drop, restartable on the same port and data so that clients' URLs
//! stay valid across a crash. It logs at debug level to `<dir>/<name>.log`, across restarts.
//!
//! The first start listens on `127.0.0.1:0` and learns its port from `--addr-file` (written
//! once listening, by rename), so no port is guessed; a restart binds that port again.
//!
//! As an operator would, the kit makes a `file://` data directory before the first start; it
//! runs the server with `--create-volumes`, so tests of the protocol and of failover need not
//! format each volume they name (`tests/store_server.rs` tests the server without it).

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::netns::Netns;
use crate::{ChildGuard, Error, Result};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the start is polled.
const POLL: Duration = Duration::from_millis(10);

/// Where servers started in `dir` with a secret find it, and so do their clients'
/// `secret_file=` options.
pub fn secret_file(dir: &Path) -> PathBuf {
    dir.join("secret")
}

/// A running `pohmelfs store` process.
pub struct StoreServer {
    exe: PathBuf,
    dir: PathBuf,
    name: String,
    data_url: String,
    secret: bool,
    /// More `pohmelfs store` options (credentials, TLS, limits), on every start.
    extra: Vec<String>,
    /// The network namespace the server runs in (`None`: the test's own).
    netns: Option<String>,
    child: Option<ChildGuard>,
    /// What `--listen` gets: port 0 until the first start has bound one.
    listen: String,
    log: PathBuf,
    starts: u32,
}

impl StoreServer {
    /// Starts the `pohmelfs` binary `exe` as a store server named `name` (its files in `dir`)
    /// keeping its volumes under `data_url`, and waits until it listens. With `secret`, clients
    /// must prove it; it is written to [`secret_file`]`(dir)`.
    pub fn start(
        exe: impl Into<PathBuf>,
        dir: &Path,
        name: &str,
        data_url: &str,
        secret: Option<&str>,
    ) -> Result<StoreServer> {
        StoreServer::start_with(exe, dir, name, data_url, secret, &[])
    }

    /// As [`StoreServer::start`], with more `pohmelfs store` options (`--tls-cert F`,
    /// `--credentials-file F`, limits), given again on every restart.
    pub fn start_with(
        exe: impl Into<PathBuf>,
        dir: &Path,
        name: &str,
        data_url: &str,
        secret: Option<&str>,
        extra: &[&str],
    ) -> Result<StoreServer> {
        StoreServer::start_at(exe, dir, name, data_url, secret, extra, None)
    }

    /// As [`StoreServer::start`], in network namespace `netns` on address `ip` (a port of
    /// its choosing), as a server on another host ([`crate::Network`]). A server off
    /// loopback refuses to run without credentials: give it a `secret`.
    pub fn start_in(
        exe: impl Into<PathBuf>,
        dir: &Path,
        name: &str,
        data_url: &str,
        secret: Option<&str>,
        (netns, ip): (&Netns, IpAddr),
    ) -> Result<StoreServer> {
        StoreServer::start_at(exe, dir, name, data_url, secret, &[], Some((netns, ip)))
    }

    /// As [`StoreServer::start_in`], with more `pohmelfs store` options, given again on
    /// every restart.
    pub fn start_in_with(
        exe: impl Into<PathBuf>,
        dir: &Path,
        name: &str,
        data_url: &str,
        secret: Option<&str>,
        (netns, ip): (&Netns, IpAddr),
        extra: &[&str],
    ) -> Result<StoreServer> {
        StoreServer::start_at(exe, dir, name, data_url, secret, extra, Some((netns, ip)))
    }

    fn start_at(
        exe: impl Into<PathBuf>,
        dir: &Path,
        name: &str,
        data_url: &str,
        secret: Option<&str>,
        extra: &[&str],
        at: Option<(&Netns, IpAddr)>,
    ) -> Result<StoreServer> {
        if let Some(path) = data_url.strip_prefix("file://") {
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            std::fs::create_dir_all(path).map_err(Error::io(format!("create {path}")))?;
        }
        if let Some(secret) = secret {
            let path = secret_file(dir);
            std::fs::write(&path, secret)
                .map_err(Error::io(format!("write {}", path.display())))?;
        }
        let mut server = StoreServer {
            exe: exe.into(),
            dir: dir.to_owned(),
            name: name.to_owned(),
            data_url: data_url.to_owned(),
            secret: secret.is_some(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            netns: at.map(|(ns, _)| ns.name().to_owned()),
            listen: match at {
                Some((_, ip)) => std::net::SocketAddr::new(ip, 0).to_string(),
                None => "127.0.0.1:0".to_owned(),
            },
            log: dir.join(format!("{name}.log")),
            starts: 0,
        };
        server.spawn()?;
        Ok(server)
    }

    /// `127.0.0.1:PORT` (or the address given to [`StoreServer::start_in`]), the same across
    /// restarts.
    pub fn addr(&self) -> &str {
        &self.listen
    }

    /// The running server's process id (`None` after a kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
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
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(Error::io(format!("open {}", self.log.display())))?;
        let addr_file = self.dir.join(format!("{}.addr{}", self.name, self.starts));
        let mut cmd = crate::netns::command_in(self.netns.as_deref(), &self.exe);
        // The command line refuses secrets (every local user can read it):
        // S3 credentials in the URL go to the server's environment instead.
        let (data_url, credentials) = credentials_to_env(&self.data_url);
        cmd.envs(credentials);
        cmd.args(["store", "--listen", &self.listen, "--data", &data_url])
            .args(["--create-volumes", "--log-level", "debug", "--addr-file"])
            .arg(&addr_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.secret {
            cmd.arg("--secret-file").arg(secret_file(&self.dir));
        }
        cmd.args(&self.extra);
        let child = cmd
            .spawn()
            .map_err(Error::io(format!("start {}", self.exe.display())))?;
        let what = format!("store server {} (start {})", self.name, self.starts);
        // The server writes the file by rename once it listens: it is whole when it exists.
        let addr = self.child.insert(ChildGuard(child)).wait_ready(
            &what,
            &self.log,
            START_TIMEOUT,
            POLL,
            || std::fs::read_to_string(&addr_file).ok(),
        )?;
        addr.trim().clone_into(&mut self.listen);
        Ok(())
    }
}

/// `url` without its `access_key_id=` and `secret_access_key=` options, and
/// those as the `AWS_*` variables the daemons read them from.
fn credentials_to_env(url: &str) -> (String, Vec<(&'static str, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let mut env = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("access_key_id", v)) => env.push(("AWS_ACCESS_KEY_ID", v.to_owned())),
            Some(("secret_access_key", v)) => env.push(("AWS_SECRET_ACCESS_KEY", v.to_owned())),
            _ => kept.push(pair),
        }
    }
    (format!("{base}?{}", kept.join("&")), env)
}
