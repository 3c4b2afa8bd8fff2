//! The daemons confine themselves (`serve`, `store`; `mount` only sets the
//! umask). Three steps, in this order:
//!
//! 1. [`restrict`], first thing in `main`, before any thread exists:
//!    umask 077 (sockets come out 0700, volume directories 0700, volume
//!    files 0600), `no_new_privs`, the ambient and inheritable capability
//!    sets cleared, and every capability dropped from the bounding,
//!    permitted and effective sets except the few startup still needs
//!    (`CAP_CHOWN` to give the socket to `--socket-group`,
//!    `CAP_NET_BIND_SERVICE` for a store port below 1024). Capabilities are
//!    per thread, so this runs while `main` is the only thread: every thread
//!    started later inherits the reduced sets.
//! 2. [`drop_all_capabilities`] once the sockets are bound: `serve` opened
//!    its volume before, in a thread that dropped them first
//!    (`lifecycle::open_without_capabilities`, whose set the engine's
//!    threads inherit), so the daemon runs with no capability at all. A
//!    root daemon keeps uid 0, which owns its
//!    socket and its volume directory; ownership of guest files lives in
//!    the volume, never on the host, so `CAP_CHOWN`, `CAP_FOWNER` and
//!    `CAP_DAC_OVERRIDE` are not needed.
//! 3. [`seccomp::install`] once the volume is open: a filter of the system
//!    calls the daemons make, on every thread at once (TSYNC). A call
//!    outside it ends the process with one line naming it
//!    (`--seccomp trap`, the default), or as `--seccomp` says.
//!
//! This module must never widen anything: every step only removes.

#[cfg(target_arch = "x86_64")]
mod names;
pub mod seccomp;
#[cfg(test)]
mod tests;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

pub use seccomp::SeccompAction;

/// The failed steps of confinement.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("clear the ambient capabilities")]
    Ambient(#[source] std::io::Error),
    #[error("drop capability {0} from the bounding set")]
    Bounding(u32, #[source] std::io::Error),
    #[error("read the capability sets")]
    Capget(#[source] std::io::Error),
    #[error("set the capability sets")]
    Capset(#[source] std::io::Error),
    #[error("no group named {0:?}")]
    NoGroup(String),
    #[error("look up group {0:?}")]
    GroupLookup(String, #[source] std::io::Error),
    #[error("give socket {0} to group {1}")]
    Chown(PathBuf, u32, #[source] std::io::Error),
    #[error("set the mode of socket {0} to {1:o}")]
    Chmod(PathBuf, u32, #[source] std::io::Error),
    #[error("install the seccomp filter")]
    Seccomp(#[source] std::io::Error),
    #[error(
        "the URL carries {0}: pass it in the environment (AWS_SECRET_ACCESS_KEY, \
         AWS_SESSION_TOKEN), never on the command line, which every local user can read"
    )]
    SecretInArgv(&'static str),
    #[error("install the SIGSYS handler")]
    Sigaction(#[source] std::io::Error),
}

/// `--seccomp`, for `serve` and `store`.
#[derive(clap::Args, Clone, Debug)]
pub struct SeccompArgs {
    /// What a system call outside the daemon's seccomp filter does: none
    /// (no filter), log (allowed, logged by the kernel), trap (one line
    /// naming the call, then abort) or kill.
    #[arg(long, value_enum, default_value_t = SeccompAction::Trap)]
    pub seccomp: SeccompAction,
}

/// `--socket-group` and `--socket-mode`, for `serve` (virtiofsd's options).
#[derive(clap::Args, Clone, Debug)]
pub struct SocketAccessArgs {
    /// Give the vhost-user socket to this group (name or number) and make
    /// it 0660, for a VMM running as another user in that group.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// The vhost-user socket's mode, octal (default 0700, or 0660 with
    /// --socket-group).
    #[arg(long, value_parser = parse_mode)]
    pub socket_mode: Option<u32>,
}

impl SocketAccessArgs {
    /// The capabilities startup needs to apply these: CAP_CHOWN for a group.
    pub fn startup_capabilities(&self) -> &'static [u32] {
        if self.socket_group.is_some() {
            &[CAP_CHOWN]
        } else {
            &[]
        }
    }

    /// Apply them to the bound socket at `path`.
    pub fn apply(&self, path: &Path) -> Result<(), ConfineError> {
        set_socket_access(path, self.socket_group.as_deref(), self.socket_mode)
    }
}

/// `CAP_CHOWN`: needed at startup only to give the socket to `--socket-group`.
pub const CAP_CHOWN: u32 = 0;
/// `CAP_NET_BIND_SERVICE`: needed at startup only for a store port below 1024.
pub const CAP_NET_BIND_SERVICE: u32 = 10;

/// Step 1: umask 077, no_new_privs, and every capability dropped but
/// `keep`. Call it before any thread is started.
pub fn restrict(keep: &[u32]) -> Result<(), ConfineError> {
    set_umask();
    // SAFETY: prctl with integer arguments only; PR_SET_NO_NEW_PRIVS
    // cannot be undone and affects only this process and its children.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    // Ambient capabilities appeared in Linux 4.3; EINVAL before that means
    // there are none to clear.
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(ConfineError::Ambient(e));
        }
    }
    let mut sets = capget()?;
    for cap in 0..=last_cap() {
        if keep.contains(&cap) {
            continue;
        }
        if !in_bounding_set(cap) {
            continue;
        }
        // Without CAP_SETPCAP the bounding set cannot shrink (an
        // unprivileged process): its permitted set is empty anyway.
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(ConfineError::Bounding(cap, e));
            }
        }
    }
    for (word, set) in sets.iter_mut().enumerate() {
        let mut mask = 0u32;
        for cap in keep {
            if (*cap / 32) as usize == word {
                mask |= 1 << (cap % 32);
            }
        }
        set.permitted &= mask;
        set.effective &= mask;
        set.inheritable = 0;
    }
    capset(&sets)
}

/// umask 077: what the daemon creates is its owner's alone. `mount` uses
/// this step only.
pub fn set_umask() {
    // SAFETY: umask has no failure mode and touches only the process's mask.
    unsafe { libc::umask(0o077) };
}

/// Step 2: no capability left in this thread (and in threads it starts
/// after this).
pub fn drop_all_capabilities() -> Result<(), ConfineError> {
    capset(&[CapData::default(); 2])
}

/// Whether this thread holds any capability in its effective set.
pub fn has_effective_capabilities() -> Result<bool, ConfineError> {
    Ok(capget()?.iter().any(|s| s.effective != 0))
}

/// `--socket-group` and `--socket-mode` (virtiofsd's): give the socket to
/// `group` and set its mode. The socket is created 0700 by the umask; with
/// a group and no mode it becomes 0660, so the group's VMM may connect.
pub fn set_socket_access(
    path: &Path,
    group: Option<&str>,
    mode: Option<u32>,
) -> Result<(), ConfineError> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| ConfineError::Chmod(path.to_path_buf(), 0, std::io::Error::other(e)))?;
    if let Some(name) = group {
        let gid = group_id(name)?;
        // SAFETY: c_path is a valid NUL-terminated string; uid -1 keeps
        // the owner.
        if unsafe { libc::chown(c_path.as_ptr(), u32::MAX, gid) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(ConfineError::Chown(path.to_path_buf(), gid, e));
        }
    }
    let mode = match (mode, group) {
        (Some(m), _) => m,
        (None, Some(_)) => 0o660,
        (None, None) => return Ok(()),
    };
    // SAFETY: c_path is a valid NUL-terminated string.
    if unsafe { libc::chmod(c_path.as_ptr(), mode) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(ConfineError::Chmod(path.to_path_buf(), mode, e));
    }
    Ok(())
}

/// Parse `--socket-mode`: octal, e.g. `0660` or `660`; at most 0777.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode up to 0777 (e.g. 0660)")),
    }
}

/// A group's id from its name, or the number itself.
fn group_id(name: &str) -> Result<u32, ConfineError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name = CString::new(name).map_err(|_| ConfineError::NoGroup(name.to_string()))?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: an all-zero `group` is a valid value of this plain C struct.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is
    // NUL-terminated, buf is writable for buf.len() bytes, grp and found
    // are live locals.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(ConfineError::GroupLookup(
            name.to_string(),
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    if found.is_null() {
        return Err(ConfineError::NoGroup(name.to_string()));
    }
    Ok(grp.gr_gid)
}

/// The query options of a volume URL that carry a secret (object_store's
/// names for the S3 secret key and session token).
const SECRET_OPTIONS: &[&str] = &[
    "aws_secret_access_key",
    "secret_access_key",
    "aws_session_token",
    "aws_token",
    "session_token",
    "token",
];

/// Refuse a volume URL given on the command line that carries a secret:
/// argv is readable by every local user (`/proc/PID/cmdline`, `ps`).
/// Shared secrets of store servers come from files (`--secret-file`,
/// `secret_file=`), S3 credentials from the environment.
pub fn refuse_secret_in_url(url: &str) -> Result<(), ConfineError> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    for pair in query.split('&') {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if let Some(secret) = SECRET_OPTIONS.iter().find(|s| s.eq_ignore_ascii_case(key)) {
            return Err(ConfineError::SecretInArgv(secret));
        }
    }
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> Result<[CapData; 2], ConfineError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are live, correctly laid out for version 3
    // (two data structs), and the kernel writes only within them.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(ConfineError::Capget(std::io::Error::last_os_error()));
    }
    Ok(data)
}

fn capset(data: &[CapData; 2]) -> Result<(), ConfineError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: header and data are live and laid out for version 3; the
    // kernel only reads data.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(ConfineError::Capset(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn in_bounding_set(cap: u32) -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) == 1 }
}

/// The highest capability the running kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}
