//! The vhost-user-fs daemon a guest talks to: pohmelfs itself, or virtiofsd as the reference.
//!
//! A [`Daemon`] owns its child process, socket and log file inside the test's directory. It is
//! started by [`DaemonBuilder::start`] and (re)started before each guest by
//! [`Daemon::ensure_running`]: pohmelfs keeps serving after a frontend disconnects and must still
//! be alive, while virtiofsd exits after each connection and is restarted on the same shared
//! directory. The child is killed in `Drop`; this module never touches anything outside the test
//! directory.
//!
//! After every guest the harness calls [`Daemon::check_health`], so every test ends with it: the
//! daemon log holds no panic, and pohmelfs (unless the test stopped it on purpose) has ended the
//! guest's session, is still running, and its counters in [`MUST_STAY_ZERO`] read 0.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::daemon_log::{sessions_ended, status_value};
use super::{log_tail, target_dir, wait_until, Failure, Result};

/// How long a daemon may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long virtiofsd may take to exit after its guest went away.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// `sun_path` holds 108 bytes including the NUL.
const SOCKET_PATH_MAX: usize = 107;
/// Lines of the daemon log quoted in failure messages.
pub const LOG_TAIL_LINES: usize = 40;
/// How long pohmelfs may take to end a session (drain, sync) after its guest went away.
const SESSION_END_TIMEOUT: Duration = Duration::from_secs(120);
/// The line pohmelfs logs when it has ended a guest's session.
pub(crate) const SESSION_ENDED: &str = "session ended";
/// The line this harness writes into the log before each start of a daemon process.
pub(crate) const START_MARKER: &str = "=== harness: start #";
/// What the Rust runtime prints when a thread panics, caught or not.
const PANIC_MARKER: &str = " panicked at ";
/// The counters a failure report shows of a running pohmelfs daemon.
const REPORT_COUNTERS: [&str; 6] = [
    "connections",
    "chains",
    "fs_internal_errors",
    "dirty_bytes",
    "in_flight_txns",
    "fsync_calls",
];
/// The descriptor an inherited socket reaches the daemon at ([`DaemonBuilder::inherited_socket`]).
pub const INHERITED_FD: i32 = 40;

/// pohmelfs counters that must read 0 after every guest. (A broken invariant of the
/// transaction layer aborts the daemon, which the check finds dead.)
pub const MUST_STAY_ZERO: &[&str] = &["fs_internal_errors"];

/// Which daemon serves the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonKind {
    /// `pohmelfs serve`, the daemon under test (built by cargo for this test binary).
    Pohmelfs,
    /// The reference virtiofsd (`target/tools/bin/virtiofsd` or `$VIRTIOFSD`), sharing a
    /// directory of the test.
    Virtiofsd,
}

impl DaemonKind {
    /// Whether the daemon exits once its frontend disconnects (and is restarted for the next).
    fn exits_after_disconnect(self) -> bool {
        self == DaemonKind::Virtiofsd
    }
}

impl fmt::Display for DaemonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DaemonKind::Pohmelfs => "pohmelfs",
            DaemonKind::Virtiofsd => "virtiofsd",
        })
    }
}

/// Arguments of a daemon before it starts.
pub struct DaemonBuilder {
    kind: DaemonKind,
    dir: PathBuf,
    tag: String,
    store: String,
    /// virtiofsd's shared directory, when not `shared/` in the daemon's directory.
    shared_dir: Option<PathBuf>,
    extra_args: Vec<OsString>,
    /// libvirt's way: the whole command line after the binary, and a socket the harness binds.
    inherited: Option<Vec<OsString>>,
    /// The network namespace the daemon runs in (`None`: the test's own).
    netns: Option<String>,
    /// More environment variables (an S3 volume's credentials).
    envs: Vec<(OsString, OsString)>,
    guest_numbers: Arc<AtomicU32>,
}

impl DaemonBuilder {
    /// Start pohmelfs as libvirt does (`src/qemu/qemu_virtiofs.c`): the harness binds the
    /// vhost-user socket and passes it as descriptor [`INHERITED_FD`]; `args` is the whole
    /// command line after the binary (libvirt's, e.g. `--fd=40 -o source=DIR`). Replaces the
    /// default arguments, the store and [`DaemonBuilder::arg`]s.
    #[allow(dead_code)] // for tests of the backend conventions
    pub fn inherited_socket(mut self, args: &[&str]) -> Self {
        self.inherited = Some(args.iter().map(OsString::from).collect());
        self
    }

    /// The store URL passed to pohmelfs (`mem:` unless set); ignored by virtiofsd.
    #[allow(dead_code)] // for tests of persistent stores (`file:///...`)
    pub fn store(mut self, url: impl Into<String>) -> Self {
        self.store = url.into();
        self
    }

    /// virtiofsd's shared directory (`shared/` in the daemon's directory unless set): two
    /// daemons on one directory.
    #[allow(dead_code)] // for the migration test
    pub fn shared_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shared_dir = Some(dir.into());
        self
    }

    /// Runs the daemon in network namespace `netns` (`ip netns exec`, which execs it: the
    /// child is the daemon), as on a host of its own; its sockets are files, which QEMU
    /// reaches from anywhere.
    #[allow(dead_code)] // for the migration tests between hosts
    pub fn in_netns(mut self, netns: &pohmelfs_testkit::Netns) -> Self {
        self.netns = Some(netns.name().to_owned());
        self
    }

    /// Sets an environment variable of the daemon (an S3 volume's credentials, which a
    /// command line must not carry).
    #[allow(dead_code)] // for tests of s3:// volumes
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Appends one argument to the daemon's command line.
    #[allow(dead_code)] // for tests of daemon options
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Starts the daemon and waits for its socket.
    pub fn start(self) -> Result<Daemon> {
        let socket = self.dir.join("daemon.sock");
        let socket_len = socket.as_os_str().len();
        if socket_len > SOCKET_PATH_MAX {
            return Err(Failure::new(format!(
                "socket path {} is {socket_len} bytes, more than a unix socket allows \
                 ({SOCKET_PATH_MAX}): move the checkout to a shorter path",
                socket.display()
            )));
        }
        let inherited = self.inherited.is_some();
        let (program, mut args): (PathBuf, Vec<OsString>) = match self.kind {
            DaemonKind::Pohmelfs if inherited => (
                PathBuf::from(env!("CARGO_BIN_EXE_pohmelfs")),
                self.inherited.unwrap_or_default(),
            ),
            DaemonKind::Pohmelfs => (
                PathBuf::from(env!("CARGO_BIN_EXE_pohmelfs")),
                vec![
                    "serve".into(),
                    "--socket-path".into(),
                    socket.clone().into(),
                    "--tag".into(),
                    self.tag.clone().into(),
                    "--store".into(),
                    self.store.into(),
                ],
            ),
            DaemonKind::Virtiofsd => {
                let shared = self.shared_dir.unwrap_or_else(|| self.dir.join("shared"));
                fs::create_dir_all(&shared)
                    .map_err(|e| Failure::new(format!("create {}: {e}", shared.display())))?;
                (
                    virtiofsd_binary()?,
                    vec![
                        "--socket-path".into(),
                        socket.clone().into(),
                        "--shared-dir".into(),
                        shared.into(),
                        "--cache=auto".into(),
                        "--sandbox=none".into(),
                        "--xattr".into(),
                    ],
                )
            }
        };
        if !inherited {
            args.extend(self.extra_args);
        }
        let (program, args) = match self.netns {
            Some(netns) => (
                PathBuf::from("ip"),
                ["netns".into(), "exec".into(), netns.into(), program.into()]
                    .into_iter()
                    .chain(args)
                    .collect(),
            ),
            None => (program, args),
        };
        let daemon = Daemon {
            inherited,
            kind: self.kind,
            dir: self.dir.clone(),
            program,
            args,
            envs: self.envs,
            socket,
            tag: self.tag,
            log: self.dir.join(format!("{}.log", self.kind)),
            guest_numbers: self.guest_numbers,
            state: Mutex::new(State::default()),
        };
        daemon.spawn(&mut daemon.state())?;
        Ok(daemon)
    }
}

/// The reference virtiofsd: `$VIRTIOFSD`, else the one scripts/test installs under target/tools.
fn virtiofsd_binary() -> Result<PathBuf> {
    let path = std::env::var_os("VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("tools/bin/virtiofsd"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Failure::new(format!(
            "virtiofsd not found at {}: run scripts/test, or \
             `cargo install --locked --root target/tools virtiofsd` (needs apt packages \
             libseccomp-dev libcap-ng-dev), or set VIRTIOFSD=/path/to/virtiofsd; \
             set POHMELFS_SKIP_VIRTIOFSD=1 to skip the reference runs",
            path.display()
        )))
    }
}

#[derive(Default)]
struct State {
    child: Option<Child>,
    /// Guests started against this daemon so far (each one session of pohmelfs).
    guests: u32,
    /// Processes spawned so far (virtiofsd is respawned per guest).
    spawns: u32,
    /// The test stopped the process on purpose ([`Daemon::stop`]).
    stopped: bool,
}

/// A running daemon; killed on drop.
pub struct Daemon {
    /// The harness binds the socket and the daemon inherits it (libvirt's way).
    inherited: bool,
    kind: DaemonKind,
    dir: PathBuf,
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    socket: PathBuf,
    tag: String,
    log: PathBuf,
    /// Numbers the guests of the whole test, across daemons, for their file names.
    guest_numbers: Arc<AtomicU32>,
    state: Mutex<State>,
}

impl Daemon {
    /// A builder with the default arguments of `kind`; files go to `dir`, guests are numbered
    /// from `guest_numbers` (shared by the daemons of one test).
    pub fn builder(kind: DaemonKind, dir: &Path, guest_numbers: Arc<AtomicU32>) -> DaemonBuilder {
        DaemonBuilder {
            kind,
            dir: dir.to_path_buf(),
            guest_numbers,
            tag: "testfs".to_owned(),
            store: "mem:".to_owned(),
            shared_dir: None,
            extra_args: Vec::new(),
            inherited: None,
            netns: None,
            envs: Vec::new(),
        }
    }

    pub fn kind(&self) -> DaemonKind {
        self.kind
    }

    /// The test directory the daemon's files (and its guests' files) live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The vhost-user socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The virtio-fs tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The daemon's stdout and stderr, across restarts.
    #[allow(dead_code)] // for tests that check what the daemon logged
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The end of the daemon log, headed by its path, for failure messages; for a pohmelfs
    /// daemon still running, a few of its counters first (a guest stuck with a request out
    /// shows there: did the daemon take the chain, is anything still dirty or in flight).
    /// Its one query is bounded by the control socket's 10 s timeout.
    pub fn log_report(&self) -> String {
        // Not through `exit_status`: callers may hold the state lock. A daemon that is gone
        // refuses the connection at once.
        let counters = match self.kind {
            DaemonKind::Pohmelfs => pohmelfs::control::query(&self.socket, "status")
                .map(|status| {
                    REPORT_COUNTERS
                        .iter()
                        .filter_map(|name| Some(format!("{name}={}", status_value(&status, name)?)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
            DaemonKind::Virtiofsd => String::new(),
        };
        format!(
            "--- {} log, last {LOG_TAIL_LINES} lines ({}) ---\n{}{}",
            self.kind,
            self.log.display(),
            if counters.is_empty() {
                String::new()
            } else {
                format!("counters now: {counters}\n")
            },
            log_tail(&self.log, LOG_TAIL_LINES)
        )
    }

    /// Makes sure a daemon process is listening for the next guest; returns the guest's number
    /// in the test (1 for its first guest, whichever daemon served it).
    ///
    /// virtiofsd serves one connection per process: after a guest it is awaited and respawned
    /// on the same shared directory. pohmelfs must still be running: if it died, that is the
    /// failure reported, since restarting it would hide the crash (and lose a `mem:` store).
    pub fn ensure_running(&self) -> Result<u32> {
        let mut state = self.state();
        let served_before = state.guests > 0;
        state.guests += 1;
        let exited = match state.child.as_mut() {
            None => None,
            Some(child) => match child.try_wait() {
                Ok(status) => status,
                Err(e) => return Err(Failure::new(format!("wait for {}: {e}", self.kind))),
            },
        };
        let guest = self.guest_numbers.fetch_add(1, Ordering::Relaxed) + 1;
        match (state.child.is_some(), exited) {
            (true, None) if !(served_before && self.kind.exits_after_disconnect()) => Ok(guest),
            (true, None) => {
                self.await_exit(&mut state)?;
                self.spawn(&mut state).map(|()| guest)
            }
            (true, Some(_)) | (false, _) if self.kind.exits_after_disconnect() => {
                self.spawn(&mut state).map(|()| guest)
            }
            (_, status) => Err(Failure::new(format!(
                "{} is not running before guest #{} (exit status: {}): it must keep serving \
                 after a frontend disconnects\n{}",
                self.kind,
                state.guests,
                status.map_or_else(|| "none".to_owned(), |s| s.to_string()),
                self.log_report()
            ))),
        }
    }

    /// Whether the daemon process is alive, or how it ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut state = self.state();
        state
            .child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state usable: it is only a child handle.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for a one-connection daemon to exit after its guest, killing it past the timeout.
    fn await_exit(&self, state: &mut State) -> Result<()> {
        let Some(mut child) = state.child.take() else {
            return Ok(());
        };
        let exited = wait_until(EXIT_TIMEOUT, POLL_INTERVAL, || {
            child.try_wait().ok().flatten()
        });
        if exited.is_none() {
            kill(&mut child);
            return Err(Failure::new(format!(
                "{} did not exit within {EXIT_TIMEOUT:?} after its guest disconnected\n{}",
                self.kind,
                self.log_report()
            )));
        }
        Ok(())
    }

    /// Spawns a process and waits until its socket exists.
    fn spawn(&self, state: &mut State) -> Result<()> {
        if let Some(mut old) = state.child.take() {
            kill(&mut old);
        }
        match fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Failure::new(format!(
                    "remove stale socket {}: {e}",
                    self.socket.display()
                )))
            }
        }
        state.spawns += 1;
        state.stopped = false;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Failure::new(format!("open {}: {e}", self.log.display())))?;
        let command_line = std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(|arg| arg.as_os_str()))
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(log, "{START_MARKER}{}: {command_line}", state.spawns)
            .map_err(|e| Failure::new(format!("write {}: {e}", self.log.display())))?;
        let stderr = clone_log(&log, &self.log)?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        // libvirt's way: the socket exists before the daemon, which inherits it; the daemon
        // is ready once its control socket (made after the volume opened) exists.
        let listener = if self.inherited {
            let listener = std::os::unix::net::UnixListener::bind(&self.socket)
                .map_err(|e| Failure::new(format!("bind {}: {e}", self.socket.display())))?;
            let fd = std::os::unix::io::AsRawFd::as_raw_fd(&listener);
            // SAFETY: dup2 is async-signal-safe; in the child it puts the socket at
            // INHERITED_FD without close-on-exec and touches nothing else.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    if libc::dup2(fd, INHERITED_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(listener)
        } else {
            None
        };
        let mut child = command
            .spawn()
            .map_err(|e| Failure::new(format!("cannot start {}: {e}", self.program.display())))?;
        // The daemon has its own copy now.
        drop(listener);
        let ready_socket = if self.inherited {
            pohmelfs::control::control_path(&self.socket)
        } else {
            self.socket.clone()
        };
        let socket_ready = wait_until(SOCKET_TIMEOUT, POLL_INTERVAL, || {
            if is_socket(&ready_socket) {
                return Some(Ok(()));
            }
            match child.try_wait() {
                Ok(Some(status)) => Some(Err(status.to_string())),
                Ok(None) => None,
                Err(e) => Some(Err(e.to_string())),
            }
        });
        let problem = match socket_ready {
            Some(Ok(())) => {
                state.child = Some(child);
                return Ok(());
            }
            Some(Err(status)) => format!("exited before creating its socket ({status})"),
            None => {
                kill(&mut child);
                format!("created no socket within {SOCKET_TIMEOUT:?}")
            }
        };
        Err(Failure::new(format!(
            "{} {problem}: {command_line}\n{}",
            self.kind,
            self.log_report()
        )))
    }

    /// Kills the daemon now with SIGKILL, as a crash (also done on drop). The checks after the
    /// guests that follow no longer expect this process to be alive.
    pub fn stop(&self) {
        let mut state = self.state();
        state.stopped = true;
        if let Some(mut child) = state.child.take() {
            kill(&mut child);
        }
    }

    /// Stops the daemon with SIGTERM, as a VMM manager does, and returns its exit status
    /// (bounded by the harness's exit timeout, then SIGKILL and a failure).
    #[allow(dead_code)] // for tests of the stop contract
    pub fn terminate(&self) -> Result<ExitStatus> {
        let mut state = self.state();
        state.stopped = true;
        let Some(mut child) = state.child.take() else {
            return Err(Failure::new(format!("{} is not running", self.kind)));
        };
        let pid = libc::pid_t::try_from(child.id())
            .map_err(|_| Failure::new(format!("pid {} out of range", child.id())))?;
        // SAFETY: kill only sends SIGTERM to our own child, which is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        match wait_until(EXIT_TIMEOUT, POLL_INTERVAL, || {
            child.try_wait().ok().flatten()
        }) {
            Some(status) => Ok(status),
            None => {
                kill(&mut child);
                Err(Failure::new(format!(
                    "{} did not exit within {EXIT_TIMEOUT:?} of SIGTERM\n{}",
                    self.kind,
                    self.log_report()
                )))
            }
        }
    }

    /// One counter (or gauge) of pohmelfs's `status` answer on its control socket.
    pub fn counter(&self, name: &str) -> Option<u64> {
        let status = pohmelfs::control::query(&self.socket, "status").ok()?;
        status_value(&status, name)
    }

    /// The checks every test makes after each of its guests (and so after its last): see the
    /// module documentation. Fails with what was wrong; the caller adds the logs.
    pub fn check_health(&self) -> Result<()> {
        let log = fs::read(&self.log).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        let panics: Vec<&str> = log.lines().filter(|l| l.contains(PANIC_MARKER)).collect();
        if !panics.is_empty() {
            return Err(Failure::new(format!(
                "{} panicked ({} in its log):\n{}",
                self.kind,
                self.log.display(),
                panics.join("\n")
            )));
        }
        let guests = {
            let state = self.state();
            if self.kind != DaemonKind::Pohmelfs || state.stopped {
                return Ok(());
            }
            state.guests
        };
        let ended = wait_until(SESSION_END_TIMEOUT, POLL_INTERVAL, || {
            if let Some(status) = self.exit_status() {
                return Some(Err(status));
            }
            (sessions_ended(&self.log) >= guests).then_some(Ok(()))
        });
        match ended {
            Some(Ok(())) => {}
            Some(Err(status)) => {
                return Err(Failure::new(format!(
                    "{} died ({status}) after its guest: it must keep serving",
                    self.kind
                )))
            }
            None => {
                return Err(Failure::new(format!(
                    "{} did not log {SESSION_ENDED:?} {guests} times (once per guest) within \
                     {SESSION_END_TIMEOUT:?} of its last guest's power-off",
                    self.kind
                )))
            }
        }
        let status = pohmelfs::control::query(&self.socket, "status").map_err(|e| {
            Failure::new(format!(
                "{} does not answer on its control socket: {e}",
                self.kind
            ))
        })?;
        for &name in MUST_STAY_ZERO {
            match status_value(&status, name) {
                Some(0) => {}
                Some(n) => {
                    return Err(Failure::new(format!(
                        "{} counted {name} = {n} after its guest; it must stay 0",
                        self.kind
                    )))
                }
                None => {
                    return Err(Failure::new(format!(
                        "{}'s status has no counter {name}:\n{status}",
                        self.kind
                    )))
                }
            }
        }
        match self.exit_status() {
            None => Ok(()),
            Some(status) => Err(Failure::new(format!(
                "{} died ({status}) after its guest: it must keep serving",
                self.kind
            ))),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn clone_log(log: &File, path: &Path) -> Result<File> {
    log.try_clone()
        .map_err(|e| Failure::new(format!("duplicate {}: {e}", path.display())))
}

fn is_socket(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

/// Kills and reaps a child; errors only mean it is already gone.
pub(crate) fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
