//! `pohmelfs serve` and `pohmelfs store` under systemd's `Type=notify`
//! (`src/systemd.rs`): real processes with `NOTIFY_SOCKET` pointing at a
//! datagram socket the test binds, as systemd's is. `READY=1` must come
//! only once the daemon can serve (its socket bound, its volume open), and
//! `STOPPING=1` when SIGTERM begins the shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use pohmelfs_testkit::{ChildGuard, ScratchDir};

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
/// Bound on every wait for a datagram or an exit.
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

/// The datagram socket systemd would listen on.
fn notify_socket(dir: &ScratchDir) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    (sock, path)
}

/// The next datagram, as text.
fn next_state(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let len = sock
        .recv(&mut buf)
        .expect("no notification within the timeout");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

fn sigterm(child: &ChildGuard) {
    // SAFETY: kill(2) on the pid of a child this test owns and has not reaped.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
}

fn wait_exit(child: &mut ChildGuard) -> std::process::ExitStatus {
    pohmelfs_testkit::wait_until(TIMEOUT, POLL, || child.exited())
        .expect("the daemon did not exit after SIGTERM")
}

#[test]
fn serve_says_ready_once_its_socket_is_bound_and_stopping_at_sigterm() {
    let dir = ScratchDir::new("systemd-serve").unwrap();
    let (notify, notify_path) = notify_socket(&dir);
    let socket = dir.path().join("vhost.sock");
    let mut child = ChildGuard(
        Command::new(POHMELFS)
            .args(["serve", "--store", "mem:", "--socket-path"])
            .arg(&socket)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ready = next_state(&notify);
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first notification: {ready:?}"
    );
    assert!(
        ready.contains("STATUS=serving"),
        "no status line: {ready:?}"
    );
    // Ready means a VMM can connect now, and the control socket answers.
    UnixStream::connect(&socket).expect("READY=1 before the vhost-user socket listens");
    let status = Command::new(POHMELFS)
        .args(["status", "--socket-path"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "status failed after READY=1: {status:?}"
    );
    assert!(child.exited().is_none(), "the daemon exited after READY=1");

    sigterm(&child);
    assert_eq!(next_state(&notify), "STOPPING=1");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn store_says_ready_once_it_listens() {
    let dir = ScratchDir::new("systemd-store").unwrap();
    let (notify, notify_path) = notify_socket(&dir);
    let mut child = ChildGuard(
        Command::new(POHMELFS)
            .args(["store", "--listen", "127.0.0.1:0", "--data", "mem:"])
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ready = next_state(&notify);
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first notification: {ready:?}"
    );
    let addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .unwrap_or_else(|| panic!("no listening address in {ready:?}"));
    TcpStream::connect(addr).expect("READY=1 before the store listens");

    sigterm(&child);
    assert_eq!(next_state(&notify), "STOPPING=1");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn a_relative_notify_socket_is_refused_at_start() {
    let dir = ScratchDir::new("systemd-bad").unwrap();
    let out = Command::new(POHMELFS)
        .args(["serve", "--store", "mem:", "--socket-path"])
        .arg(dir.path().join("vhost.sock"))
        .env("NOTIFY_SOCKET", "relative/notify")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NOTIFY_SOCKET=\"relative/notify\" is neither an absolute path nor @name"),
        "{err}"
    );
}

#[test]
fn lines_carry_syslog_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let dir = ScratchDir::new("systemd-journal").unwrap();
    let (notify, notify_path) = notify_socket(&dir);
    let log_path = dir.path().join("stderr");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let mut child = ChildGuard(
        Command::new(POHMELFS)
            .args(["store", "--listen", "127.0.0.1:0", "--data", "mem:"])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    assert!(next_state(&notify).contains("READY=1"));
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6> INFO") && l.contains("store server listening")),
        "no info line with its priority:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("<4> WARN")),
        "no warning line with its priority:\n{text}"
    );
    assert!(
        text.lines().all(|l| l.starts_with('<')),
        "a line without a priority:\n{text}"
    );
}

/// `serve` under socket activation, started by systemd's own
/// `systemd-socket-activate` (which binds the socket and passes it as
/// `LISTEN_FDS`, as a `.socket` unit does): it serves on that socket,
/// says READY=1, and leaves the socket file to systemd at exit.
#[test]
fn serve_takes_the_socket_systemd_passed_and_leaves_it_at_exit() {
    let dir = ScratchDir::new("systemd-activate").unwrap();
    let (notify, notify_path) = notify_socket(&dir);
    let socket = dir.path().join("vhost.sock");
    let mut child = ChildGuard(
        Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(&socket)
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
            .args([POHMELFS, "serve", "--store", "mem:", "--socket-path"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run systemd-socket-activate (apt-get install systemd)"),
    );
    // It may wait for a first connection before it starts the daemon.
    pohmelfs_testkit::wait_until(TIMEOUT, POLL, || {
        UnixStream::connect(&socket).ok().map(drop)
    })
    .expect("systemd-socket-activate never listened");
    let ready = next_state(&notify);
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first notification: {ready:?}"
    );
    let want = format!("on {}", socket.display());
    assert!(ready.contains(&want), "{ready:?} does not name {want}");
    let status = Command::new(POHMELFS)
        .args(["status", "--socket-path"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(status.status.success(), "status: {status:?}");

    sigterm(&child);
    assert_eq!(next_state(&notify), "STOPPING=1");
    assert!(wait_exit(&mut child).success());
    assert!(
        std::fs::symlink_metadata(&socket).is_ok(),
        "the daemon removed the socket systemd owns"
    );
    assert!(
        std::fs::symlink_metadata(pohmelfs::control::control_path(&socket)).is_err(),
        "the control socket was left behind"
    );
}

/// A socket systemd passed that is bound elsewhere than `--socket-path`
/// is refused before the volume opens: the unit and its socket disagree.
#[test]
fn an_activated_socket_at_another_path_is_refused() {
    let dir = ScratchDir::new("systemd-activate-other").unwrap();
    let socket = dir.path().join("passed.sock");
    let named = dir.path().join("named.sock");
    let child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&socket)
        .args([POHMELFS, "serve", "--store", "mem:", "--socket-path"])
        .arg(&named)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run systemd-socket-activate (apt-get install systemd)");
    let mut child = ChildGuard(child);
    pohmelfs_testkit::wait_until(TIMEOUT, POLL, || {
        UnixStream::connect(&socket).ok().map(drop)
    })
    .expect("systemd-socket-activate never listened");
    let status = wait_exit(&mut child);
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    let want = format!(
        "systemd passed a socket bound to {}, not --socket-path {}",
        socket.display(),
        named.display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(!named.exists(), "bound --socket-path anyway");
}
