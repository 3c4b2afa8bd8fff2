//! The control socket beside the vhost-user socket (`SOCKET.ctl`) and the
//! optional Prometheus endpoint. The control socket answers one line
//! command per connection: `status` (every counter with its value and what
//! it counts) or `prometheus` (the text exposition format). The HTTP
//! endpoint serves `GET /metrics`. Both only read counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::metrics::Metrics;

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
        "{:<22} {:>14}  bytes of page cache\n",
        "cache_bytes",
        l.cache_bytes.get()
    ));
    out.push_str(&format!(
        "{:<22} {:>14}  accounted bytes of the metadata caches\n",
        "meta_cache_bytes",
        l.meta_cache_bytes.get()
    ));
    out.push_str("fsync latency (cumulative):");
    for (bound, count) in l.fsync_latency.cumulative() {
        match bound {
            Some(us) => out.push_str(&format!(" <={us}us:{count}")),
            None => out.push_str(&format!(" all:{count}")),
        }
    }
    out.push('\n');
    out
}

fn answer(mut conn: UnixStream, metrics: &Metrics) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(256)).read_line(&mut line)?;
    let reply = match line.trim() {
        "status" | "" => status_text(metrics),
        "prometheus" => metrics.prometheus(),
        other => format!("unknown command {other:?} (status, prometheus)\n"),
    };
    conn.write_all(reply.as_bytes())
}

/// Serve the control socket on a thread. A stale socket file is replaced.
pub fn spawn_control_socket(path: &Path, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    info!(path = %path.display(), "control socket listening");
    std::thread::Builder::new()
        .name("pohmelfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(c, &metrics) {
                            warn!(error = %e, "control socket request failed");
                        }
                    }
                    Err(e) => warn!(error = %e, "control socket accept failed"),
                }
            }
        })?;
    Ok(())
}

/// Ask a running daemon's control socket; returns its answer.
pub fn query(socket_path: &Path, command: &str) -> std::io::Result<String> {
    let mut conn = UnixStream::connect(control_path(socket_path))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
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
    std::thread::Builder::new().name("pohmelfs-metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = String::new();
            if BufReader::new((&conn).take(8192)).read_line(&mut request).is_err() {
                continue;
            }
            let (status, body) = if request.starts_with("GET /metrics") {
                ("200 OK", metrics.prometheus())
            } else {
                ("404 Not Found", "see /metrics\n".to_string())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
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
        spawn_control_socket(&control_path(&sock), Arc::clone(&m)).unwrap();
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
}
