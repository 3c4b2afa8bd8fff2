//! The control socket beside the vhost-user socket (`SOCKET.ctl`) and the
//! optional Prometheus endpoint. The control socket answers one line
//! command per connection: `status` (every counter with its value and what
//! it counts), `prometheus` (the text exposition format) or, when the
//! daemon serves a volume that has them, `snapshot NAME` (take a snapshot
//! through the daemon, which holds the volume: `ok PATH` or `error: ...`).
//! The HTTP endpoint serves `GET /metrics`, and only reads counters. Each
//! answers at most 8 connections at a time (`CONNECTIONS_MAX`), each
//! within 2 s (`CONNECTION_DEADLINE`; a snapshot's answer within
//! `SNAPSHOT_DEADLINE`), so a slow or idle client cannot hold them up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::ratelimit::{limited, StaticCounter};

use crate::metrics::Metrics;
use crate::store::Store;

/// The control socket's path for a vhost-user socket path.
pub fn control_path(socket_path: &Path) -> PathBuf {
    let mut p = socket_path.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// The human-readable status: counters, gauges, fsync latency buckets.
pub fn status_text(m: &Metrics) -> String {
    let mut out = String::new();
    for (name, value, doc) in m.snapshot() {
        out.push_str(&format!("{name:<22} {value:>14}  {doc}\n"));
    }
    let l = &m.levels;
    out.push_str(&format!(
        "{:<22} {:>14}  bytes of dirty and in-flight data\n",
        "dirty_bytes",
        l.dirty_bytes.get()
    ));
    out.push_str(&format!(
        "{:<22} {:>14}  transactions in flight\n",
        "in_flight_txns",
        l.in_flight_txns.get()
    ));
    out.push_str(&format!(
        "{:<22} {:>14}  bytes of page data in flight\n",
        "in_flight_bytes",
        l.in_flight_bytes.get()
    ));
    out.push_str(&format!(
        "{:<22} {:>14}  bytes of page cache\n",
        "cache_bytes",
        l.cache_bytes.get()
    ));
    out.push_str(&format!(
        "{:<22} {:>14}  accounted bytes of the metadata caches\n",
        "meta_cache_bytes",
        l.meta_cache_bytes.get()
    ));
    histogram_line(&mut out, "fsync latency", &l.fsync_latency);
    histogram_line(&mut out, "commit latency", &l.commit_latency);
    histogram_line(&mut out, "store read latency", &l.store_read_latency);
    for (opcode, h) in l.requests.served() {
        histogram_line(&mut out, &format!("{opcode} service time"), h);
    }
    out
}

/// One histogram as a line: its mean and its cumulative buckets.
fn histogram_line(out: &mut String, what: &str, h: &crate::metrics::Histogram) {
    let n = h.count();
    if n == 0 && what != "fsync latency" {
        return;
    }
    out.push_str(&format!(
        "{what} (mean {}us, cumulative):",
        h.sum_us().checked_div(n).unwrap_or(0)
    ));
    for (bound, count) in h.cumulative() {
        match bound {
            Some(us) => out.push_str(&format!(" <={us}us:{count}")),
            None => out.push_str(&format!(" all:{count}")),
        }
    }
    out.push('\n');
}

/// Connections answered at once on each endpoint; one more is closed
/// unanswered, so slow clients cannot queue up work or threads.
const CONNECTIONS_MAX: usize = 8;
/// How long one connection may take in all, its request read and its
/// answer written: a client that trickles its request or never reads the
/// answer holds its slot no longer than this.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(2);

/// How long a `snapshot` command may take to answer: the daemon sends its
/// held-back writes first.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(120);

/// The limits of an endpoint: the defaults above, shorter in tests.
#[derive(Clone, Copy)]
struct Limits {
    connections: usize,
    deadline: Duration,
}

const LIMITS: Limits = Limits {
    connections: CONNECTIONS_MAX,
    deadline: CONNECTION_DEADLINE,
};

/// A stream whose every read and write is bounded by one deadline.
trait Timed: Read + Write + Send + 'static {
    fn read_timeout(&self, t: Duration) -> std::io::Result<()>;
    fn write_timeout(&self, t: Duration) -> std::io::Result<()>;
}

impl Timed for UnixStream {
    fn read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
    fn write_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(t))
    }
}

impl Timed for TcpStream {
    fn read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
    fn write_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(t))
    }
}

/// `conn` until `deadline`: each call gets the time left, and none is left
/// after it.
struct Deadlined<S> {
    conn: S,
    deadline: Instant,
}

impl<S: Timed> Deadlined<S> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection deadline passed",
            ));
        }
        Ok(left)
    }
}

impl<S: Timed> Read for Deadlined<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.read_timeout(left)?;
        self.conn.read(buf)
    }
}

impl<S: Timed> Write for Deadlined<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.write_timeout(left)?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// Answer each connection of `incoming` on a thread of its own, at most
/// `limits.connections` at a time, each within `limits.deadline`.
fn serve<S: Timed>(
    name: &'static str,
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    limits: Limits,
    answer: impl Fn(&mut Deadlined<S>) -> std::io::Result<()> + Send + Sync + 'static,
) -> std::io::Result<()> {
    let answer = Arc::new(answer);
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            loop {
                let conn = match accept() {
                    Ok(c) => c,
                    Err(e) => {
                        limited!(CONTROL_LINES_SUPPRESSED, WARN, error = %e, "{name}: accept failed");
                        // Out of descriptors, say: back off instead of spinning.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if busy.fetch_add(1, Ordering::AcqRel) >= limits.connections {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    limited!(
                        CONTROL_LINES_SUPPRESSED,
                        WARN,
                        limit = limits.connections,
                        "{name}: too many connections; closing one unanswered"
                    );
                    continue;
                }
                let (answer, busy) = (Arc::clone(&answer), Arc::clone(&busy));
                let mut conn = Deadlined {
                    conn,
                    deadline: Instant::now() + limits.deadline,
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("{name}-conn"))
                    .spawn(move || {
                        if let Err(e) = answer(&mut conn) {
                            limited!(CONTROL_LINES_SUPPRESSED, WARN, error = %e, "{name}: request failed");
                        }
                        busy.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    limited!(CONTROL_LINES_SUPPRESSED, WARN, error = %e, "{name}: cannot start a thread");
                }
            }
        })?;
    Ok(())
}

/// Lines of these endpoints held back by the rate limit (any local process,
/// or anyone who reaches the Prometheus address, decides how often they
/// happen).
static CONTROL_LINES_SUPPRESSED: StaticCounter = StaticCounter::new();

/// An error with its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

fn answer_control(
    conn: &mut Deadlined<UnixStream>,
    metrics: &Metrics,
    store: Option<&dyn Store>,
) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new((&mut *conn).take(256)).read_line(&mut line)?;
    let reply = match (line.trim(), store) {
        // The volume's lines as they are now: a live migration opens the
        // volume after start (`--incoming`) or lets it go.
        ("status" | "", _) => format!(
            "{}{}",
            store.map_or_else(String::new, |s| volume_text(
                &s.describe(),
                s.identity().as_ref()
            )),
            status_text(metrics)
        ),
        ("prometheus", _) => metrics.prometheus(),
        (cmd, Some(store)) if cmd.starts_with("snapshot ") => {
            let name = cmd["snapshot ".len()..].trim();
            conn.deadline = Instant::now() + SNAPSHOT_DEADLINE;
            match store.snapshot(name) {
                Ok(path) => {
                    info!(snapshot = name, %path, "snapshot taken through the control socket");
                    format!("ok {path}\n")
                }
                Err(e) => {
                    let chain = chain(&e);
                    limited!(CONTROL_LINES_SUPPRESSED, WARN, snapshot = name, error = %chain, "snapshot failed");
                    format!("error: {chain}\n")
                }
            }
        }
        (other, _) => format!("unknown command {other:?} (status, prometheus, snapshot NAME)\n"),
    };
    conn.write_all(reply.as_bytes())
}

fn answer_http(conn: &mut Deadlined<TcpStream>, metrics: &Metrics) -> std::io::Result<()> {
    let mut request = String::new();
    BufReader::new((&mut *conn).take(8192)).read_line(&mut request)?;
    let (status, body) = if request.starts_with("GET /metrics") {
        ("200 OK", metrics.prometheus())
    } else {
        ("404 Not Found", "see /metrics\n".to_string())
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serve the control socket on a thread. A stale socket file is replaced.
/// With `volume`, `status` starts with its lines ([`volume_text`]) and
/// the socket takes snapshots of it.
pub fn spawn_control_socket(
    path: &Path,
    metrics: Arc<Metrics>,
    volume: Option<Arc<dyn Store>>,
) -> std::io::Result<()> {
    spawn_control_socket_with(path, metrics, volume, LIMITS)
}

/// The volume's lines of `status`: what it is, and who holds it.
pub fn volume_text(describe: &str, id: Option<&crate::store::engine::VolumeIdentity>) -> String {
    let mut out = format!("{:<22} {describe}\n", "volume");
    match id {
        Some(id) => {
            out.push_str(&format!("{:<22} {}\n", "volume_id", id.id_hex()));
            out.push_str(&format!("{:<22} {}\n", "format_version", id.format_version));
            out.push_str(&format!("{:<22} {}\n", "epoch", id.epoch));
            let holder = id
                .holder
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string);
            out.push_str(&format!("{:<22} {holder}\n", "holder"));
        }
        None => out.push_str(&format!(
            "{:<22} - (kept by the store server, or not persistent)\n",
            "volume_id"
        )),
    }
    out
}

fn spawn_control_socket_with(
    path: &Path,
    metrics: Arc<Metrics>,
    volume: Option<Arc<dyn Store>>,
    limits: Limits,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    info!(path = %path.display(), "control socket listening");
    serve(
        "pohmelfs-control",
        move || Ok(listener.accept()?.0),
        limits,
        move |c| answer_control(c, &metrics, volume.as_deref()),
    )
}

/// Ask a running daemon's control socket; returns its answer.
pub fn query(socket_path: &Path, command: &str) -> std::io::Result<String> {
    query_within(socket_path, command, Duration::from_secs(10))
}

/// Ask a running daemon's control socket to take snapshot `name`; the
/// snapshot's path.
pub fn snapshot(socket_path: &Path, name: &str) -> std::io::Result<String> {
    let answer = query_within(
        socket_path,
        &format!("snapshot {name}"),
        SNAPSHOT_DEADLINE + Duration::from_secs(5),
    )?;
    match answer.trim_end().strip_prefix("ok ") {
        Some(path) => Ok(path.to_string()),
        None => Err(std::io::Error::other(format!(
            "the daemon answered: {}",
            answer.trim_end()
        ))),
    }
}

fn query_within(socket_path: &Path, command: &str, timeout: Duration) -> std::io::Result<String> {
    let mut conn = UnixStream::connect(control_path(socket_path))?;
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(format!("{command}\n").as_bytes())?;
    let mut out = String::new();
    conn.read_to_string(&mut out)?;
    Ok(out)
}

/// Serve `GET /metrics` for Prometheus on a thread.
pub fn spawn_prometheus(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    info!(%bound, "Prometheus metrics at /metrics");
    serve(
        "pohmelfs-metrics",
        move || Ok(listener.accept()?.0),
        LIMITS,
        move |c| answer_http(c, &metrics),
    )?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_socket_and_prometheus_endpoint_answer() {
        let dir = std::env::temp_dir().join(format!("pohmelfs-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vhost.sock");
        let m = Arc::new(Metrics::default());
        m.txn_acked.add(42);
        spawn_control_socket(&control_path(&sock), Arc::clone(&m), None).unwrap();
        let status = query(&sock, "status").unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("txn_acked") && l.contains(" 42 ")),
            "{status}"
        );
        assert!(query(&sock, "prometheus")
            .unwrap()
            .contains("pohmelfs_txn_acked_total 42"));
        let addr = spawn_prometheus("127.0.0.1:0".parse().unwrap(), m).unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        assert!(
            body.starts_with("HTTP/1.1 200 OK") && body.contains("pohmelfs_txn_acked_total 42")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn control_socket(name: &str, limits: Limits) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("pohmelfs-ctl-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vhost.sock");
        spawn_control_socket_with(
            &control_path(&sock),
            Arc::new(Metrics::default()),
            None,
            limits,
        )
        .unwrap();
        (dir, sock)
    }

    #[test]
    fn an_idle_client_does_not_hold_up_the_next() {
        let limits = Limits {
            connections: 8,
            deadline: Duration::from_secs(60),
        };
        let (dir, sock) = control_socket("idle", limits);
        let idle = UnixStream::connect(control_path(&sock)).unwrap();
        // Answered while the idle connection still holds its slot (a
        // server answering one connection at a time would wait 60 s for it,
        // past query's 10 s timeout).
        assert!(query(&sock, "status").unwrap().contains("txn_acked"));
        idle.set_nonblocking(true).unwrap();
        let err = (&idle).read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_trickling_client_is_cut_off_at_the_deadline() {
        let limits = Limits {
            connections: 8,
            deadline: Duration::from_millis(300),
        };
        let (dir, sock) = control_socket("trickle", limits);
        let mut slow = UnixStream::connect(control_path(&sock)).unwrap();
        // One byte of a request line every 50 ms, for up to 10 s: each
        // read is quick, only the connection's deadline ends it.
        let mut cut_off = false;
        for _ in 0..200 {
            if slow.write_all(b"s").is_err() {
                cut_off = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(cut_off, "a trickling client kept its connection for 10 s");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_connection_past_the_limit_is_closed_unanswered() {
        let limits = Limits {
            connections: 1,
            deadline: Duration::from_secs(60),
        };
        let (dir, sock) = control_socket("limit", limits);
        let idle = UnixStream::connect(control_path(&sock)).unwrap();
        // The idle connection holds the only slot; the next is closed
        // without an answer.
        match query(&sock, "status") {
            Ok(answer) => assert_eq!(answer, ""),
            // Closed before the request was written, or while it was.
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            ),
        }
        drop(idle);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
