//! `pohmelfs serve`: its arguments and its life, from the volume's open to
//! the drain at SIGTERM.
//!
//! Start-up order: confine, take the pid-file guard beside the socket (and
//! an inherited `--fd` socket), open the volume (before the socket is
//! bound, so a missing or held volume fails before a VMM can connect;
//! with `--incoming` only once a live migration's state arrives),
//! bind the socket at `--socket-path` (or take the one systemd passed:
//! socket activation, `LISTEN_FDS`), drop the last capabilities, tell
//! systemd the daemon is ready (`READY=1`, under `Type=notify`), then
//! serve. SIGTERM and
//! SIGINT drain the write-back layer for at most `--shutdown-timeout`, log
//! each transaction not stored, let the volume go when everything was, and
//! exit (docs/operations.md, "Stopping").

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use pohmelfs::device::{self, DeviceConfig, ServeConfig};
use pohmelfs::metrics::Metrics;
use pohmelfs::store::Store as _;
use pohmelfs::writeback::slot::{Opener, VolumeSlot};
use pohmelfs::{confine, systemd};
use tracing::{error, info};

use super::{endpoint, lifecycle, VolumeArgs};

/// The default of `--shutdown-timeout`: below libvirt's escalation (it
/// sends SIGKILL 10 s after SIGTERM), with room to exit.
pub const SHUTDOWN_TIMEOUT_DEFAULT_SECS: u64 = 8;

/// The default of `--incoming-timeout`: past the 30 s lease of a holder
/// on another host that hung (`store/engine/holder.rs`), so that its
/// lease runs out within the wait.
pub const INCOMING_TIMEOUT_DEFAULT_SECS: u64 = 60;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("listen").args(["socket_path", "fd"]))]
pub struct ServeArgs {
    /// The vhost-user socket the VMM connects to. Under systemd socket
    /// activation (`LISTEN_FDS`), the socket systemd passed, which must be
    /// bound to this path.
    #[arg(long)]
    socket_path: Option<PathBuf>,
    /// A listening vhost-user socket inherited as descriptor N (the
    /// vhost-user backend conventions; libvirt passes it), instead of
    /// --socket-path.
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// The mount tag, served through the device config space to a frontend
    /// that reads it from the backend (QEMU and cloud-hypervisor take it
    /// from their own `tag=`).
    #[arg(long)]
    tag: Option<String>,
    #[command(flatten)]
    volume: VolumeArgs,
    /// Worker threads serving requests.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    thread_pool_size: u16,
    /// Request queues offered to the guest (besides the hiprio queue).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    request_queues: u16,
    /// Descriptors per virtqueue at most.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(64..=32768))]
    queue_size: u16,
    /// Exit when the frontend disconnects instead of waiting for the next one.
    #[arg(long)]
    once: bool,
    /// Seconds SIGTERM or SIGINT waits for the store to acknowledge what
    /// the guest wrote before the daemon exits; what is still not stored
    /// then is logged, transaction by transaction, and lost.
    #[arg(long, default_value_t = SHUTDOWN_TIMEOUT_DEFAULT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    shutdown_timeout: u64,
    /// Be a live migration's destination (QEMU started with -incoming):
    /// serve the socket, but open the volume only when the guest's state
    /// arrives, once the source daemon has let it go (docs/migration.md).
    #[arg(long, conflicts_with = "take_over")]
    incoming: bool,
    /// Seconds an open of the volume after a migration (the
    /// destination's, or a source's whose migration failed) waits for the
    /// other daemon to let it go before it fails.
    #[arg(long, default_value_t = INCOMING_TIMEOUT_DEFAULT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    incoming_timeout: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, default_value = "info")]
    log_level: String,
    #[command(flatten)]
    socket_access: confine::SocketAccessArgs,
    #[command(flatten)]
    seccomp: confine::SeccompArgs,
}

/// Whether `e` is a refusal to create a file (permissions, a read-only
/// directory), not a held lock.
fn denied(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            io.kind() == std::io::ErrorKind::PermissionDenied
                || io.raw_os_error() == Some(libc::EROFS)
        })
}

/// Where the daemon listens, and what it removes at exit.
struct Socket {
    /// Inherited at once; bound by [`Socket::listen`] otherwise.
    listener: Option<vhost::vhost_user::Listener>,
    /// The socket's path (to bind, or learnt from the inherited socket).
    path: Option<PathBuf>,
    /// Bound by the manager that started us (`--fd`, socket activation).
    inherited: bool,
    /// Passed by systemd: it keeps the socket file, to activate the next
    /// daemon through it.
    activated: bool,
    guard: Option<endpoint::PidGuard>,
}

impl Socket {
    /// The single-instance guard, and an inherited socket: before the
    /// volume opens, so a second daemon on the socket fences nobody.
    fn guard(args: &ServeArgs) -> Result<Socket> {
        let activated = match args.fd {
            Some(_) => Vec::new(),
            None => systemd::take_listen_fds().context("socket activation")?,
        };
        let (listener, path, activated) = match (&args.socket_path, args.fd, activated.len()) {
            (None, Some(fd), _) => {
                let (listener, path) = endpoint::inherited(fd)?;
                (Some(listener), path, false)
            }
            (path, None, 1) => {
                let fd = activated
                    .into_iter()
                    .next()
                    .map(std::os::fd::IntoRawFd::into_raw_fd);
                let (listener, bound) = endpoint::inherited(fd.unwrap_or(-1))
                    .context("the socket systemd passed (LISTEN_FDS)")?;
                if let (Some(want), got) = (path, &bound) {
                    if got.as_deref() != Some(want.as_path()) {
                        bail!(
                            "systemd passed a socket bound to {}, not --socket-path {}",
                            got.as_deref()
                                .map_or_else(|| "no path".into(), |p| p.display().to_string()),
                            want.display()
                        );
                    }
                }
                (Some(listener), bound, true)
            }
            (Some(path), None, 0) => (None, Some(path.clone()), false),
            (None, None, 0) => {
                bail!("give --socket-path or --fd (or start under systemd socket activation)")
            }
            (_, None, n) => bail!("systemd passed {n} sockets (LISTEN_FDS); serve listens on one"),
            (Some(_), Some(_), _) => bail!("give exactly one of --socket-path and --fd"),
        };
        let guard = match (path.as_deref(), &listener) {
            (None, _) => None,
            (Some(p), None) => Some(endpoint::PidGuard::lock(p)?),
            // A socket a manager bound (libvirt's --fd, systemd's) may lie
            // in a directory the confined daemon cannot write (libvirt's
            // domain directory is its qemu user's): there the manager, which
            // gives the socket to one daemon, is the only guard.
            (Some(p), Some(_)) => match endpoint::PidGuard::lock(p) {
                Ok(g) => Some(g),
                Err(e) if denied(&e) => {
                    tracing::warn!(error = %format!("{e:#}"), "no pid file beside the inherited socket");
                    None
                }
                Err(e) => return Err(e),
            },
        };
        Ok(Socket {
            inherited: listener.is_some(),
            listener,
            path,
            activated,
            guard,
        })
    }

    /// Bind the socket (unless inherited) and give it its owner and mode.
    fn listen(&mut self, args: &ServeArgs) -> Result<vhost::vhost_user::Listener> {
        let listener = match (self.listener.take(), &self.path) {
            (Some(l), _) => l,
            (None, Some(path)) => device::bind(path).context("bind vhost-user socket")?,
            (None, None) => bail!("no socket to listen on"),
        };
        if let Some(path) = &self.path {
            args.socket_access
                .apply(path)
                .context("set socket access")?;
        }
        Ok(listener)
    }

    /// The files to remove at an orderly exit.
    fn leftovers(&self) -> Leftovers {
        Leftovers {
            socket: self.path.clone(),
            keep_socket: self.activated,
            pid_file: self.guard.is_some(),
        }
    }
}

/// What an exit removes: the socket, its control socket and pid file.
#[derive(Clone)]
struct Leftovers {
    socket: Option<PathBuf>,
    /// The socket file is systemd's (socket activation).
    keep_socket: bool,
    pid_file: bool,
}

impl Leftovers {
    fn remove(&self) {
        if let Some(socket) = &self.socket {
            if !self.keep_socket {
                let _ = std::fs::remove_file(socket);
            }
            let _ = std::fs::remove_file(pohmelfs::control::control_path(socket));
            if self.pid_file {
                let _ = std::fs::remove_file(endpoint::pid_path(socket));
            }
        }
    }
}

/// The control socket beside the vhost-user socket, the Prometheus
/// endpoint, and the volume's info series.
fn spawn_endpoints(
    args: &ServeArgs,
    socket: &Socket,
    metrics: &Arc<Metrics>,
    slot: &Arc<VolumeSlot>,
) -> Result<()> {
    match &socket.path {
        Some(path) => {
            let control = pohmelfs::control::control_path(path);
            let bound = pohmelfs::control::spawn_control_socket(
                &control,
                Arc::clone(metrics),
                Some(Arc::clone(slot) as Arc<dyn pohmelfs::store::Store>),
            );
            match bound {
                Ok(()) => {}
                // Beside an inherited socket, in its manager's directory,
                // the control socket is a convenience: serve goes on.
                Err(e) if socket.inherited => tracing::warn!(
                    path = %control.display(),
                    error = %e,
                    "no control socket beside the inherited socket"
                ),
                Err(e) => return Err(e).context("bind control socket"),
            }
        }
        None => tracing::warn!("the inherited socket has no path: no control socket"),
    }
    if let Some(addr) = args.metrics_listen {
        pohmelfs::control::spawn_prometheus(addr, Arc::clone(metrics))
            .context("bind metrics endpoint")?;
    }
    if args.incoming {
        info!(store = %slot.describe(), "waiting for a live migration's state before opening the volume");
    } else {
        info!(store = %slot.describe(), "volume open");
    }
    let _ = metrics.levels.volume.set(pohmelfs::metrics::VolumeInfo {
        url: args
            .volume
            .store
            .split_once('?')
            .map_or(args.volume.store.as_str(), |(url, _)| url)
            .to_string(),
        id: slot.identity().map(|i| i.id_hex()).unwrap_or_default(),
    });
    Ok(())
}

pub fn serve(args: ServeArgs) -> Result<()> {
    // Before any thread: capabilities are per thread (src/confine).
    confine::restrict(args.socket_access.startup_capabilities()).context("confine")?;
    let notifier = systemd::Notifier::from_env()
        .context("systemd notify socket")?
        .map(Arc::new);
    // fuse-backend-rs's own lines are off: see `device::log_filter`.
    pohmelfs::logging::init(&args.log_level, device::log_filter).context("install logger")?;
    pohmelfs::ratelimit::limit_panic_messages();
    if let Some(tag) = &args.tag {
        if tag.is_empty() || tag.len() > device::TAG_MAX {
            bail!("tag {tag:?} must be 1 to {} bytes", device::TAG_MAX);
        }
    }
    args.volume.check()?;
    if args.incoming && args.volume.store.starts_with("mem:") {
        bail!(
            "--incoming needs a volume both daemons reach (file://, s3:// or pohmel://), not mem:"
        );
    }
    let metrics = Arc::new(Metrics::default());
    // The volume first: a missing or held volume (or unreachable store)
    // fails before a VMM can connect. Opened in a thread without
    // capabilities, as the engine's threads inherit its set.
    let mut socket = Socket::guard(&args)?;
    let slot = Arc::new(open_slot(&args, &metrics)?);
    let fs = Arc::new(
        pohmelfs::fs::PohmelFs::on_slot(
            Arc::clone(&slot),
            args.volume.fs_config(),
            Arc::clone(&metrics),
        )
        .context("open volume")?,
    );
    let listener = socket.listen(&args)?;
    confine::drop_all_capabilities().context("drop capabilities")?;
    open_on_standby(&args, &slot);
    spawn_endpoints(&args, &socket, &metrics, &slot)?;
    let leftovers = socket.leftovers();
    let shutdown_timeout = Duration::from_secs(args.shutdown_timeout);
    install_signal_handlers(
        Arc::clone(&slot),
        shutdown_timeout,
        leftovers.clone(),
        notifier.clone(),
    )?;
    confine::seccomp::install(args.seccomp.seccomp).context("install seccomp filter")?;
    info!(seccomp = %args.seccomp.seccomp, "confined: umask 077, no capabilities, no_new_privs");
    let cfg = ServeConfig {
        socket_path: socket
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("fd {}", args.fd.unwrap_or(-1)))),
        device: DeviceConfig {
            tag: args.tag,
            request_queues: args.request_queues.into(),
            queue_size: args.queue_size.into(),
            // Local volumes: their reads never wait on a network.
            local_volume: args.volume.store.starts_with("file://")
                || args.volume.store.starts_with("mem:"),
        },
        threads: args.thread_pool_size.into(),
        queue_depth: usize::from(args.queue_size) * 2,
        once: args.once,
    };
    let _guard = socket.guard;
    // The volume is open and the socket bound: a VMM may connect now.
    if let Some(n) = &notifier {
        n.notify(&format!(
            "READY=1\nSTATUS=serving {} on {}",
            slot.describe(),
            cfg.socket_path.display()
        ))
        .context("notify systemd")?;
    }
    device::serve(&cfg, listener, Arc::clone(&fs), metrics).context("serve frontend")?;
    let drained = drain(&slot, shutdown_timeout);
    leftovers.remove();
    drained.context("drain the volume")
}

/// The volume in a slot: opened now, or (`--incoming`) only when a
/// migration's state arrives. Later opens (the destination's at the
/// state, a source's after a failed migration) wait for another holder to
/// let it go and never take it over.
fn open_slot(args: &ServeArgs, metrics: &Arc<Metrics>) -> Result<VolumeSlot> {
    let vol = &args.volume;
    let wait = Duration::from_secs(args.incoming_timeout);
    let (url, cfg, cache, m, reopen) = (
        vol.store.clone(),
        vol.txn_config(),
        vol.read_cache(),
        Arc::clone(metrics),
        match vol.open_mode() {
            pohmelfs::store::engine::OpenMode::ReadOnly => {
                pohmelfs::store::engine::OpenMode::ReadOnly
            }
            _ => pohmelfs::store::engine::OpenMode::Existing { take_over: false },
        },
    );
    let opener: Opener = Box::new(move |spare, standby| {
        pohmelfs::writeback::open_from(
            &url,
            cfg.clone(),
            cache.as_ref(),
            Arc::clone(&m),
            reopen,
            spare,
            standby,
        )
    });
    if args.incoming {
        return Ok(VolumeSlot::incoming(&vol.store, opener, wait));
    }
    let mode = vol.open_mode();
    // Opened in a thread without capabilities, as the engine's threads
    // inherit its set.
    let store = lifecycle::open_without_capabilities(|| {
        pohmelfs::writeback::open_as(
            &vol.store,
            vol.txn_config(),
            vol.read_cache().as_ref(),
            Arc::clone(metrics),
            mode,
        )
        .context("open store")
    })?;
    Ok(VolumeSlot::holding(store, &vol.store, opener, wait))
}

/// A destination (`--incoming`) of a writable `file://` volume opens it as
/// soon as the source lets it go (`writeback/standby.rs`). Started once
/// this thread has no capabilities left: the watcher's thread, and the
/// engine's threads after it, inherit its set.
fn open_on_standby(args: &ServeArgs, slot: &VolumeSlot) {
    let vol = &args.volume;
    if !args.incoming || vol.open_mode() == pohmelfs::store::engine::OpenMode::ReadOnly {
        return;
    }
    let Some(record) = pohmelfs::store::engine::holder::record_file(&vol.store) else {
        return;
    };
    let (url, cfg) = (vol.store.clone(), vol.txn_config());
    slot.open_on_standby(
        record,
        Box::new(move |claimed| pohmelfs::writeback::open_standby(&url, &cfg, claimed)),
    );
}

/// Drain the volume for at most `timeout`, then let it go (its holder
/// record removed, so that the next opener, here or on another host, need
/// not wait for its lease), if it is open here; or close it, if a
/// destination opened it on standby only.
fn drain(slot: &VolumeSlot, timeout: Duration) -> Result<(), pohmelfs::store::StoreError> {
    slot.end_standby();
    let Some(store) = slot.current() else {
        return Ok(());
    };
    store.drain(timeout)?;
    // Everything is stored: what fails now only keeps the volume held.
    if let Err(e) = store.let_go() {
        tracing::warn!(error = %pohmelfs::ErrorChain(&e), "could not let the volume go: its holder record stays (an opener on another host waits for its lease to run out)");
    }
    Ok(())
}

/// SIGTERM and SIGINT: drain for at most `timeout` (each transaction not
/// stored by then is logged) and let the volume go, remove the socket,
/// exit 0 (1 when something was not stored).
fn install_signal_handlers(
    store: Arc<VolumeSlot>,
    timeout: Duration,
    leftovers: Leftovers,
    notifier: Option<Arc<systemd::Notifier>>,
) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("install signal handlers")?;
    std::thread::Builder::new()
        .name("pohmelfs-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!(signal = sig, timeout_secs = timeout.as_secs(), "shutting down: draining");
                if let Some(n) = &notifier {
                    if let Err(e) = n.notify("STOPPING=1") {
                        tracing::warn!(error = %pohmelfs::ErrorChain(&e), "could not tell systemd");
                    }
                }
                let code = match drain(&store, timeout) {
                    Ok(()) => {
                        info!("drained: everything written is stored");
                        0
                    }
                    Err(e) => {
                        error!(error = %pohmelfs::ErrorChain(&e), "exiting with writes not stored (each is logged above)");
                        1
                    }
                };
                leftovers.remove();
                std::process::exit(code);
            }
        })
        .context("start signal thread")?;
    Ok(())
}
