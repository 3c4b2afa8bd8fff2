//! systemd integration without libsystemd, as the protocols are documented
//! in sd_notify(3) and sd_listen_fds(3):
//!
//! * **Readiness.** Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a
//!   path, or `@name` in the abstract namespace); the daemon sends one
//!   datagram `READY=1` once it can serve (its volume open and its socket
//!   bound), `STATUS=...` lines as it likes, and `STOPPING=1` when it begins
//!   to shut down. The socket is made when [`Notifier::from_env`] runs, so
//!   that later sends need only `sendto`, which the seccomp filter allows.
//! * **Socket activation.** With `LISTEN_PID` equal to the daemon's pid,
//!   `LISTEN_FDS=N` listening sockets are inherited from descriptor 3 on
//!   ([`take_listen_fds`]).
//!
//! Without those variables every call here does nothing, so the same
//! command line runs under systemd and by hand.

use std::ffi::OsStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// Inherited sockets taken at most: a unit with more is refused, not
/// half-used.
pub const LISTEN_FDS_MAX: usize = 16;

#[derive(Debug, Error)]
pub enum SystemdError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor @name")]
    BadNotifySocket(String),
    #[error("cannot reach the notify socket {0:?}")]
    Notify(String, #[source] std::io::Error),
    #[error("LISTEN_{0}={1:?} is not a number")]
    BadListenVar(&'static str, String),
    #[error("LISTEN_FDS={0} passes more than {LISTEN_FDS_MAX} sockets")]
    TooManyFds(usize),
    #[error("the inherited descriptors were taken already")]
    AlreadyTaken,
}

/// Where `READY=1` and the rest go: `None` when not run by systemd.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    shown: String,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names, with its socket made now.
    pub fn from_env() -> Result<Option<Notifier>, SystemdError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::to(&v).map(Some),
        }
    }

    /// A notifier sending to `value` (a `NOTIFY_SOCKET` value).
    pub fn to(value: &OsStr) -> Result<Notifier, SystemdError> {
        let shown = value.to_string_lossy().into_owned();
        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(value),
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            _ => return Err(SystemdError::BadNotifySocket(shown)),
        }
        .map_err(|e| SystemdError::Notify(shown.clone(), e))?;
        let sock = UnixDatagram::unbound().map_err(|e| SystemdError::Notify(shown.clone(), e))?;
        Ok(Notifier { sock, addr, shown })
    }

    /// Send `state` (newline-separated `KEY=VALUE` lines) in one datagram.
    pub fn notify(&self, state: &str) -> Result<(), SystemdError> {
        self.sock
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|e| SystemdError::Notify(self.shown.clone(), e))
    }
}

/// How many sockets systemd passed this process: `LISTEN_FDS` when
/// `LISTEN_PID` is `pid`, else none.
pub fn listen_fds_for(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<usize, SystemdError> {
    let (Some(for_pid), Some(count)) = (listen_pid, listen_fds) else {
        return Ok(0);
    };
    let for_pid: u32 = for_pid
        .parse()
        .map_err(|_| SystemdError::BadListenVar("PID", for_pid.to_string()))?;
    if for_pid != pid {
        return Ok(0);
    }
    let n: usize = count
        .parse()
        .map_err(|_| SystemdError::BadListenVar("FDS", count.to_string()))?;
    if n > LISTEN_FDS_MAX {
        return Err(SystemdError::TooManyFds(n));
    }
    Ok(n)
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening sockets systemd passed (socket activation), owned from
/// now on and closed on exec; empty when there are none. Callable once.
pub fn take_listen_fds() -> Result<Vec<OwnedFd>, SystemdError> {
    let var = |k: &str| std::env::var(k).ok();
    let n = listen_fds_for(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        std::process::id(),
    )?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(SystemdError::AlreadyTaken);
    }
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        // `n` is at most LISTEN_FDS_MAX, so this cannot overflow.
        let fd = LISTEN_FDS_START + i as RawFd;
        // SAFETY: systemd passed descriptors 3..3+n to this process for it
        // to own (sd_listen_fds(3)); TAKEN makes this the only place that
        // wraps them, once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is open (owned above); F_SETFD only sets a flag.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        fds.push(owned);
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_real_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.as_os_str()).unwrap();
        n.notify("READY=1\nSTATUS=volume open").unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=volume open");
    }

    #[test]
    fn an_abstract_notify_socket_is_reached() {
        let name = format!("pohmelfs-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::to(OsStr::new(&format!("@{name}"))).unwrap();
        n.notify("STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn a_relative_notify_socket_is_refused() {
        assert!(matches!(
            Notifier::to(OsStr::new("run/notify")),
            Err(SystemdError::BadNotifySocket(_))
        ));
    }

    #[test]
    fn listen_fds_are_for_the_named_pid_only() {
        assert_eq!(listen_fds_for(None, None, 7).unwrap(), 0);
        assert_eq!(listen_fds_for(Some("8"), Some("1"), 7).unwrap(), 0);
        assert_eq!(listen_fds_for(Some("7"), Some("2"), 7).unwrap(), 2);
        assert!(matches!(
            listen_fds_for(Some("7"), Some("x"), 7),
            Err(SystemdError::BadListenVar("FDS", _))
        ));
        assert!(matches!(
            listen_fds_for(Some("7"), Some("17"), 7),
            Err(SystemdError::TooManyFds(17))
        ));
    }
}
