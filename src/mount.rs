//! `pohmelfs mount`: the filesystem `serve` gives a guest, mounted on this
//! host through the kernel's FUSE device instead of a guest's virtqueues, so
//! host tools (pjdfstest, `tests/mount/`) exercise the very code a guest
//! talks to.
//!
//! It owns the life of one mount: mount(2) with its own options (no
//! `default_permissions` unless asked: pohmelfs decides permissions itself,
//! which is what the tools should test), one FUSE channel per worker thread,
//! and the way out. On SIGTERM or SIGINT, or when someone else unmounts it, it
//! unmounts, stops the workers, drops what the kernel session held, makes the
//! volume durable and exits 0. It must never leave a dead mount behind on an
//! orderly exit, and never decide anything about files itself: every request
//! goes to [`PohmelFs`] through the same `fuse-backend-rs` server as a guest's.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use anyhow::{anyhow, bail, Context as _, Result};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};
use pohmelfs::fs::PohmelFs;
use pohmelfs::metrics::Metrics;
use tracing::{debug, info, warn};

/// The character device the kernel serves FUSE mounts through.
const FUSE_DEVICE: &str = "/dev/fuse";

/// `pohmelfs mount` arguments.
#[derive(clap::Args)]
pub struct MountArgs {
    /// Where to mount: an existing directory.
    mountpoint: PathBuf,
    #[command(flatten)]
    volume: super::VolumeArgs,
    /// Worker threads serving requests, each reading its own FUSE channel.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Let users other than the one mounting use the mount (pjdfstest
    /// switches users). pohmelfs still checks every request's permissions.
    #[arg(long)]
    allow_other: bool,
    /// Let the kernel check permissions too, as a virtio-fs guest does,
    /// instead of relying on pohmelfs's checks alone.
    #[arg(long)]
    default_permissions: bool,
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// What ends the mount.
enum Event {
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// A worker saw the mount go away (unmounted from outside).
    Unmounted,
    /// A worker could not read its channel.
    WorkerFailed(String),
}

type FuseServer = Server<Arc<PohmelFs>>;

/// Mount the volume and serve it until a signal or an outside umount.
pub fn run(args: MountArgs) -> Result<()> {
    // The volume's host files are the owner's alone; mounting needs root's
    // capabilities, so this is the only confinement step (src/confine).
    pohmelfs::confine::set_umask();
    super::init_logging(&args.log_level)?;
    args.volume.check()?;
    // Check what the mount needs before opening the volume.
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    let fuse_dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
        .with_context(|| format!("open {FUSE_DEVICE}"))?;
    // Signals are ours before the mount exists, so none can kill the process
    // and leave the mount behind.
    let (events, next_event) = mpsc::channel();
    watch_signals(events.clone())?;

    let metrics = Arc::new(Metrics::default());
    let (_, fs) = args.volume.open(&metrics)?;
    let server = Arc::new(Server::new(Arc::clone(&fs)));

    let mut session = FuseSession::new(&mountpoint, "pohmelfs", "pohmelfs", false)
        .map_err(|e| anyhow!("{e}"))
        .context("prepare FUSE session")?;
    let opts = MountOptions {
        allow_other: args.allow_other,
        default_permissions: args.default_permissions,
        read_only: args.volume.readonly,
        max_read: session.bufsize(),
    };
    mount(&mountpoint, &fuse_dev, &opts)
        .with_context(|| format!("mount {}", mountpoint.display()))?;
    // From here on the session unmounts when dropped, even on an error path.
    session.set_fuse_file(fuse_dev);
    info!(mountpoint = %mountpoint.display(), store = %fs.store().describe(), threads = args.threads, "mounted");

    let mut workers = Vec::new();
    let mut failed = None;
    for i in 0..args.threads {
        let started = session
            .new_channel()
            .map_err(|e| anyhow!("{e}"))
            .context("open FUSE channel")
            .and_then(|channel| {
                let server = Arc::clone(&server);
                let events = events.clone();
                std::thread::Builder::new()
                    .name(format!("pohmelfs-fuse-{i}"))
                    .spawn(move || serve_channel(channel, &server, &events))
                    .context("start worker thread")
            });
        match started {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(events);

    if failed.is_none() {
        match next_event.recv() {
            Ok(Event::Signal(sig)) => info!(signal = sig, "unmounting"),
            Ok(Event::Unmounted) => info!("unmounted from outside; shutting down"),
            // An outside umount shows up as an epoll error on the channels.
            Ok(Event::WorkerFailed(_)) if connection_gone(&session) => {
                info!("unmounted from outside; shutting down")
            }
            Ok(Event::WorkerFailed(e)) => failed = Some(anyhow!(e).context("serve FUSE channel")),
            // Unreachable while the signal thread lives; treat it as a stop.
            Err(mpsc::RecvError) => warn!("no more events; unmounting"),
        }
    }
    let unmounted = session
        .umount()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("unmount {}", mountpoint.display()));
    if let Err(e) = session.wake() {
        warn!(error = %e, "could not wake the workers");
    }
    for w in workers {
        if w.join().is_err() {
            warn!("a worker thread panicked");
        }
    }
    // The kernel session is gone: forget its references and handles, and
    // remove the unlinked files only it kept alive.
    fs.destroy();
    fs.sync_all().context("sync volume")?;
    info!(counters = %metrics.summary(), "session ended");
    unmounted?;
    match failed {
        Some(e) => Err(e),
        None => {
            info!("volume durable; exiting");
            Ok(())
        }
    }
}

/// The canonical path of `path`, which must be an existing directory.
fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).with_context(|| format!("mountpoint {}", path.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", path.display());
    }
    path.canonicalize()
        .with_context(|| format!("resolve mountpoint {}", path.display()))
}

/// Send SIGTERM and SIGINT to `events` from a thread of their own.
fn watch_signals(events: mpsc::Sender<Event>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("install signal handlers")?;
    std::thread::Builder::new()
        .name("pohmelfs-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if events.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .context("start signal thread")?;
    Ok(())
}

/// Options of the FUSE mount.
struct MountOptions {
    allow_other: bool,
    default_permissions: bool,
    /// `--readonly`: a read-only mount (the host kernel refuses changes
    /// too).
    read_only: bool,
    /// The largest read the kernel may ask for: what a channel buffer holds.
    max_read: usize,
}

/// mount(2) a FUSE filesystem served through `fuse_dev` at `mountpoint`.
/// Done here rather than by `FuseSession::mount`, which always adds
/// `default_permissions`.
fn mount(mountpoint: &Path, fuse_dev: &File, opts: &MountOptions) -> Result<()> {
    // SAFETY: getuid and getgid only read the caller's credentials.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid},max_read={}",
        fuse_dev.as_raw_fd(),
        libc::S_IFDIR,
        opts.max_read
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    if opts.default_permissions {
        data.push_str(",default_permissions");
    }
    debug!(options = %data, "mount options");
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if opts.read_only {
        flags |= libc::MS_RDONLY;
    }
    let target = CString::new(mountpoint.as_os_str().as_bytes()).context("mountpoint has a NUL")?;
    let data = CString::new(data).context("mount options have a NUL")?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call (the kernel copies them); `fuse_dev` stays open across it, so the
    // `fd=` option names a live /dev/fuse descriptor.
    let rc = unsafe {
        libc::mount(
            c"pohmelfs".as_ptr(),
            target.as_ptr(),
            c"fuse.pohmelfs".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // Every worker polls a duplicate of this descriptor and all wake for one
    // request: the losers must see EAGAIN, not block in read.
    set_nonblocking(fuse_dev).context("make /dev/fuse non-blocking")
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor `file` keeps open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// True when the kernel has ended the FUSE connection (the filesystem was
/// unmounted or the connection aborted): its descriptor polls POLLERR.
fn connection_gone(session: &FuseSession) -> bool {
    let Some(file) = session.get_fuse_file() else {
        return true;
    };
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call, and a
    // zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLERR != 0
}

/// One worker: read requests from `channel` and answer them until the
/// session is woken for exit or the mount goes away.
fn serve_channel(mut channel: FuseChannel, server: &FuseServer, events: &mpsc::Sender<Event>) {
    loop {
        match channel.get_request() {
            Ok(Some((reader, writer))) => {
                if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
                    if is_interrupted_reply(&e) {
                        // The kernel gave up on the request before our reply
                        // (the caller was interrupted): routine.
                        debug!(error = %e, "reply to an abandoned request");
                    } else {
                        warn!(error = %e, "could not handle a FUSE request");
                    }
                }
            }
            Ok(None) => {
                // Woken for exit (the main thread already knows), or the
                // filesystem was unmounted (it may not).
                let _ = events.send(Event::Unmounted);
                return;
            }
            Err(e) => {
                let _ = events.send(Event::WorkerFailed(e.to_string()));
                return;
            }
        }
    }
}

/// True when writing a reply failed with ENOENT: the request was interrupted
/// and the kernel no longer waits for it.
fn is_interrupted_reply(e: &fuse_backend_rs::Error) -> bool {
    use fuse_backend_rs::Error::{EncodeMessage, FailedToWrite};
    matches!(e, EncodeMessage(io) | FailedToWrite(io) if io.raw_os_error() == Some(libc::ENOENT))
}
