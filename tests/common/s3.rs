//! S3-compatible servers on loopback, both of which enforce the conditional puts
//! (`If-None-Match`, `If-Match`) SlateDB relies on for fencing: `moto_server` (`pip install
//! 'moto[server]'`, or `scripts/setup`, which installs it in `target/venv`), and `s3s-fs`, an
//! independent implementation in Rust over a directory (`scripts/setup` builds it in
//! `target/s3s` with a patch that makes its conditional puts atomic, as S3's are; the
//! published 0.14.1 checks, then writes, and the engine's s3s-fs tests fail on it). One bucket, fixed
//! credentials; killed on drop. Moto may also run in a network
//! namespace of a [`crate::Network`], as a service on another host ([`Moto::start_in`]).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::netns::{command_in, Netns};
use crate::{log_tail, ChildGuard, Error, Result};

/// How long moto may take to answer HTTP.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the start is polled.
const POLL: Duration = Duration::from_millis(50);
/// Ports tried: a free port found by binding can be taken by another process before moto binds
/// it, and then moto exits at once.
const PORT_TRIES: u32 = 3;

/// A running `moto_server` with one bucket.
pub struct Moto {
    _child: ChildGuard,
    host: Ipv4Addr,
    port: u16,
    bucket: String,
    log: PathBuf,
}

/// `moto_server` from PATH, or from `target/venv/bin` where `scripts/setup` installs it.
fn find_moto() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/venv/bin");
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::iter::once(venv))
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
}

fn free_port(host: Ipv4Addr) -> Result<u16> {
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(Error::io("find a free port"))
}

/// One HTTP/1.1 request without a body; the status code of the answer.
fn http(host: Ipv4Addr, port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut conn = TcpStream::connect((host, port))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:.200}")))
}

impl Moto {
    /// Starts moto with its log in `dir` and creates `bucket`. A missing `moto_server` is an
    /// error that says how to install it.
    pub fn start(dir: &Path, bucket: &str) -> Result<Moto> {
        Moto::start_at(dir, bucket, None)
    }

    /// As [`Moto::start`], in network namespace `netns` on address `host`: an S3 service on
    /// another host ([`crate::Network`]).
    pub fn start_in(dir: &Path, bucket: &str, netns: &Netns, host: Ipv4Addr) -> Result<Moto> {
        Moto::start_at(dir, bucket, Some((netns, host)))
    }

    fn start_at(dir: &Path, bucket: &str, at: Option<(&Netns, Ipv4Addr)>) -> Result<Moto> {
        let exe = find_moto().ok_or_else(|| Error::Missing {
            program: "moto_server".into(),
            fix: "neither on PATH nor in target/venv/bin; install it with `scripts/setup` or \
                  `pip install 'moto[server]'` (or set POHMELFS_SKIP_S3_TESTS=1 to skip the S3 \
                  tests)"
                .into(),
        })?;
        let log = dir.join("moto.log");
        let mut tries = 0;
        loop {
            tries += 1;
            match Moto::spawn(&exe, &log, bucket, at) {
                Err(Error::Exited { .. }) if tries < PORT_TRIES => continue,
                outcome => return outcome,
            }
        }
    }

    fn spawn(exe: &Path, log: &Path, bucket: &str, at: Option<(&Netns, Ipv4Addr)>) -> Result<Moto> {
        let host = at.map_or(Ipv4Addr::LOCALHOST, |(_, host)| host);
        // Sockets to a moto in a namespace are made in that namespace.
        let netns = at.map(|(ns, _)| ns);
        let within = |f: &(dyn Fn() -> Result<u16> + Sync)| match netns {
            Some(ns) => ns.run(f)?,
            None => f(),
        };
        let port = within(&|| free_port(host))?;
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io(format!("open {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(Error::io(format!("open {}", log.display())))?;
        let mut child = ChildGuard(
            command_in(netns.map(Netns::name), exe)
                .args(["-H", &host.to_string(), "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(Error::io(format!("start {}", exe.display())))?,
        );
        child.wait_ready(
            &format!("moto_server on port {port}"),
            log,
            START_TIMEOUT,
            POLL,
            || {
                within(&|| http(host, port, "GET", "/").map_err(Error::io("probe moto")))
                    .is_ok_and(|code| code < 500)
                    .then_some(())
            },
        )?;
        let code = within(&|| {
            http(host, port, "PUT", &format!("/{bucket}"))
                .map_err(Error::io(format!("create bucket {bucket}")))
        })?;
        if code != 200 {
            return Err(Error::Unexpected(format!(
                "creating bucket {bucket} answered {code}:\n{}",
                log_tail(log, 30)
            )));
        }
        Ok(Moto {
            _child: child,
            host,
            port,
            bucket: bucket.to_owned(),
            log: log.to_owned(),
        })
    }

    /// The `s3://` URL of `prefix` in the bucket, with the endpoint and (dummy) credentials.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint=http://{}:{}&region=us-east-1&allow_http=true\
             &access_key_id=test&secret_access_key=test",
            self.bucket, self.host, self.port
        )
    }

    /// The same URL without credentials, as a command line takes it: the
    /// command gets them from [`Moto::CLI_ENV`] in its environment.
    pub fn cli_url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint=http://{}:{}&region=us-east-1&allow_http=true",
            self.bucket, self.host, self.port
        )
    }

    /// The (dummy) credentials of [`Moto::cli_url`], for a command's environment.
    pub const CLI_ENV: [(&'static str, &'static str); 2] = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];

    /// The keys in the bucket under `prefix` (one unsigned ListObjectsV2 page: moto takes
    /// any credentials and none).
    pub fn keys(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            conn,
            "GET /{}?list-type=2&prefix={prefix} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
             Connection: close\r\n\r\n",
            self.bucket, self.port
        )?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        Ok(answer
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next().map(str::to_owned))
            .collect())
    }

    /// The last lines of moto's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 30)
    }
}

/// A running `s3s-fs` with one bucket (a directory of its root).
pub struct S3sFs {
    _child: ChildGuard,
    port: u16,
    bucket: String,
    log: PathBuf,
}

/// `s3s-fs` from `target/s3s/bin`, where `scripts/setup` builds it patched, or else from
/// PATH.
fn find_s3s_fs() -> Option<PathBuf> {
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/s3s/bin");
    let path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    std::iter::once(installed)
        .chain(path)
        .map(|dir| dir.join("s3s-fs"))
        .find(|p| p.is_file())
}

impl S3sFs {
    /// Starts `s3s-fs` over `dir/s3s-root` with its log in `dir` and the bucket `bucket`. A
    /// missing `s3s-fs` is an error that says how to install it.
    pub fn start(dir: &Path, bucket: &str) -> Result<S3sFs> {
        let exe = find_s3s_fs().ok_or_else(|| Error::Missing {
            program: "s3s-fs".into(),
            fix: "neither in target/s3s/bin nor on PATH; build it with `scripts/setup` (which \
                  patches its conditional puts to be atomic), or set POHMELFS_SKIP_S3_TESTS=1 \
                  to skip the S3 tests"
                .into(),
        })?;
        let root = dir.join("s3s-root");
        // A bucket of s3s-fs is a directory of its root.
        std::fs::create_dir_all(root.join(bucket))
            .map_err(Error::io(format!("create {}", root.display())))?;
        let log = dir.join("s3s-fs.log");
        let mut tries = 0;
        loop {
            tries += 1;
            match S3sFs::spawn(&exe, &root, &log, bucket) {
                Err(Error::Exited { .. }) if tries < PORT_TRIES => continue,
                outcome => return outcome,
            }
        }
    }

    fn spawn(exe: &Path, root: &Path, log: &Path, bucket: &str) -> Result<S3sFs> {
        let port = free_port(Ipv4Addr::LOCALHOST)?;
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io(format!("open {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(Error::io(format!("open {}", log.display())))?;
        let mut child = ChildGuard(
            std::process::Command::new(exe)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", "test", "--secret-key", "test"])
                .arg(root)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(Error::io(format!("start {}", exe.display())))?,
        );
        child.wait_ready(
            &format!("s3s-fs on port {port}"),
            log,
            START_TIMEOUT,
            POLL,
            || {
                http(Ipv4Addr::LOCALHOST, port, "GET", "/")
                    .is_ok_and(|code| code < 500)
                    .then_some(())
            },
        )?;
        Ok(S3sFs {
            _child: child,
            port,
            bucket: bucket.to_owned(),
            log: log.to_owned(),
        })
    }

    /// The `s3://` URL of `prefix` in the bucket, with the endpoint and credentials.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&allow_http=true\
             &access_key_id=test&secret_access_key=test",
            self.bucket, self.port
        )
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 30)
    }
}
