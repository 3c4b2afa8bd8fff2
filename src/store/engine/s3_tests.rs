//! The engine against a real S3-compatible server on loopback: `moto_server`
//! (`pip install 'moto[server]'`), which enforces the conditional puts
//! SlateDB relies on for fencing. The test starts the server itself on a
//! free port and kills it when done, pass or fail. Without `moto_server` on
//! PATH the test fails, unless `POHMELFS_SKIP_S3_TESTS=1`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::conformance::{self, commit, read, write_op};
use super::SlateStore;
use crate::store::{OnceStore, Store, StoreError, Txn};

const BUCKET: &str = "pohmelfs-test";

/// A moto server child process, killed on drop.
struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Wait until `cond` holds, for at most `timeout`.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// One HTTP/1.1 request; the status code of the answer.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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
    fn start() -> Option<Moto> {
        if std::env::var("POHMELFS_SKIP_S3_TESTS").as_deref() == Ok("1") {
            eprintln!("POHMELFS_SKIP_S3_TESTS=1: skipping the S3 test");
            return None;
        }
        let exe = find_on_path("moto_server").unwrap_or_else(|| {
            panic!(
                "moto_server is not on PATH; install it with `pip install 'moto[server]'` \
                 (or set POHMELFS_SKIP_S3_TESTS=1 to skip this test)"
            )
        });
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            port,
            log,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(60), || {
            http(port, "GET", "/").is_ok_and(|code| code < 500)
        });
        assert!(up, "moto_server did not come up: {}", moto.log_tail());
        let code = http(port, "PUT", &format!("/{BUCKET}")).expect("create bucket");
        assert!(
            code == 200,
            "creating the bucket answered {code}: {}",
            moto.log_tail()
        );
        Some(moto)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    }

    fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&allow_http=true\
             &access_key_id=test&secret_access_key=test",
            self.port
        )
    }
}

#[test]
fn s3_volume_round_trip_and_fencing() {
    let Some(moto) = Moto::start() else {
        return;
    };

    // Round trip: the whole contract, then a reopen.
    let url = moto.url("volumes/a");
    {
        let s = SlateStore::open(&url).expect("open s3 volume");
        conformance::contract(&s);
        conformance::once_contract(&s);
        commit(&s, vec![write_op(500, 7, b"in the bucket")]);
        s.close().unwrap();
    }
    let s = SlateStore::open(&url).expect("reopen s3 volume");
    assert_eq!(read(&s, 500, 7, 13), b"in the bucket");
    assert!(s.commit_once(1, 5, Txn::new()).unwrap().duplicate);
    drop(s);

    // Two writers on one prefix of the same bucket: the second fences the
    // first.
    let url = moto.url("volumes/b");
    let first = SlateStore::open(&url).expect("open first writer");
    commit(&first, vec![write_op(501, 0, b"first")]);
    let second = SlateStore::open(&url).expect("open second writer");
    let r = first.commit(Txn {
        ops: vec![write_op(501, 0, b"stale")],
    });
    assert!(matches!(r, Err(StoreError::Fenced)), "{r:?}");
    assert!(matches!(first.commit(Txn::new()), Err(StoreError::Fenced)));
    assert_eq!(read(&second, 501, 0, 5), b"first");
    commit(&second, vec![write_op(501, 0, b"owner")]);
    assert_eq!(read(&second, 501, 0, 5), b"owner");
}
