//! Where `serve` listens: a socket it binds at `--socket-path`, or one it
//! inherits (`--fd N`, as libvirt passes it), and the single-instance guard
//! beside it.
//!
//! The guard is `SOCKET.pid`, locked (`flock`) for the daemon's life and
//! holding its pid: a second daemon on the same socket path is refused by
//! the lock, naming the first, without connecting to its socket (a probe
//! connection would be served as a frontend).

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use vhost::vhost_user::Listener;

/// The guard's path for a socket path.
pub fn pid_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".pid");
    PathBuf::from(p)
}

/// The locked pid file; the lock lasts as long as this lives, and the file
/// is removed when it is dropped (a failed start, an orderly exit; the
/// signal handler's exit removes it itself).
pub struct PidGuard {
    _file: File,
    path: PathBuf,
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl PidGuard {
    /// Lock `SOCKET.pid` and write this process's pid into it; refuse
    /// when another daemon holds it.
    pub fn lock(socket: &Path) -> Result<PidGuard> {
        let path = pid_path(socket);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: flock only reads its integer arguments; the fd is open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "socket {} is served by pohmelfs pid {} ({} is locked)",
                socket.display(),
                holder.trim(),
                path.display()
            );
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("write {}", path.display()))?;
        Ok(PidGuard { _file: file, path })
    }
}

/// The listening socket inherited as `fd` (checked: a listening unix
/// stream socket) and the path it is bound to, if it has one.
pub fn inherited(fd: RawFd) -> Result<(Listener, Option<PathBuf>)> {
    if fd < 3 {
        bail!("--fd {fd}: not an inherited socket (0-2 are stdio)");
    }
    let int_opt = |opt| -> Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len are valid for writes of the sizes given;
        // getsockopt fails (EBADF, ENOTSOCK) on anything but a socket.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                std::ptr::addr_of_mut!(value).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("--fd {fd}: not a socket"));
        }
        Ok(value)
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX || int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        bail!("--fd {fd}: not a unix stream socket");
    }
    if int_opt(libc::SO_ACCEPTCONN)? == 0 {
        bail!("--fd {fd}: the socket is not listening");
    }
    // SAFETY: fd is an open listening unix socket (checked above) that
    // nothing else in this process owns: it was inherited for us.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // Inherited descriptors may be non-blocking (libvirt sets them so).
    listener
        .set_nonblocking(false)
        .with_context(|| format!("--fd {fd}: make blocking"))?;
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    Ok((Listener::from(listener), path))
}
