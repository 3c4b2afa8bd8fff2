//! The `pohmelfs` command: parse arguments, call into the library.

mod allocator;
mod compat;
mod copy;
mod endpoint;
mod lifecycle;
mod mount;
mod serve;
mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use pohmelfs::fs::{CachePolicy, FsConfig, PohmelFs};
use pohmelfs::metrics::Metrics;
use pohmelfs::writeback::{MemoryBudget, OverwritePolicy, TxnConfig};
use pohmelfs::{confine, systemd};
use tracing::{info, warn};

/// The daemon's allocator: mimalloc for small blocks, glibc for large
/// ones (`allocator.rs`).
#[global_allocator]
static ALLOCATOR: allocator::Split = allocator::Split;

#[derive(Parser)]
#[command(
    name = "pohmelfs",
    version,
    about = "virtio-fs backend whose files live on a transactional store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a volume (file:// or s3://); refuses to overwrite one.
    Format(lifecycle::FormatArgs),
    /// Copy a whole volume into another (any two stores), then verify it.
    Copy(copy::CopyArgs),
    /// Import a host directory tree (a root filesystem) into a new volume.
    Import(copy::ImportArgs),
    /// Run the vhost-user-fs device daemon for a QEMU or cloud-hypervisor guest.
    Serve(serve::ServeArgs),
    /// Run a store server: serve volumes to daemons over the pohmelfs protocol.
    Store(StoreArgs),
    /// Measure transaction commit latency and throughput against a store.
    BenchStore(BenchStoreArgs),
    /// Print a running daemon's counters (through its control socket).
    Status(StatusArgs),
    /// Mount a volume on this host through /dev/fuse (for POSIX test suites).
    Mount(mount::MountArgs),
    /// Check a volume's consistency, read-only (no daemon or server may have it open).
    Check(CheckArgs),
    /// Run seeded random file operations in a directory against an in-memory model.
    Torture(TortureArgs),
    /// Create, list or delete read-only snapshots of a volume (file:// or s3://).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Make a new writable volume sharing all data with a snapshot:
    /// `pohmelfs clone file:///SRC@SNAPSHOT file:///DST`.
    Clone(snapshot::CloneArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The daemon's vhost-user socket (the control socket is PATH.ctl).
    #[arg(long)]
    socket_path: PathBuf,
    /// Print in the Prometheus text format.
    #[arg(long)]
    prometheus: bool,
}

#[derive(clap::Args)]
struct BenchStoreArgs {
    /// The store: file://, s3://, pohmel:// or mem: (as for serve).
    #[arg(long)]
    store: String,
    /// Transaction sizes to measure, comma separated (4k,64k,1m).
    #[arg(long, default_value = "4k,64k,1m")]
    sizes: String,
    /// Transactions per size.
    #[arg(long, default_value_t = 500)]
    count: usize,
    /// Committing threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// A label for the printed rows.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(clap::Args)]
struct StoreArgs {
    /// Address to listen on, e.g. 127.0.0.1:7000 (port 0 picks a free one;
    /// the bound address is logged).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Where the volumes live: file:///DIR, s3://BUCKET/PREFIX?endpoint=...,
    /// or mem: (tests). Volume NAME is kept at DATA/NAME, made by
    /// `pohmelfs format DATA/NAME`; a file:// DIR must exist.
    #[arg(long)]
    data: String,
    /// Create a volume a client names that does not exist yet (scratch
    /// servers and tests); without it the client is refused.
    #[arg(long)]
    create_volumes: bool,
    /// File holding one secret that opens every volume (the credential
    /// `default`). Without it and --credentials-file the server listens on
    /// loopback only.
    #[arg(long)]
    secret_file: Option<String>,
    /// File of named credentials, one a line: NAME VOLUMES SECRET (VOLUMES
    /// `*` or a comma-separated list).
    #[arg(long)]
    credentials_file: Option<String>,
    /// TLS: the server's certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<String>,
    /// TLS: the server's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<String>,
    /// Authenticated client connections at most.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Connections from one IP address at most (handshaking or not).
    #[arg(long, default_value_t = 64)]
    max_connections_per_peer: usize,
    /// Connections still in their handshake at most.
    #[arg(long, default_value_t = 64)]
    max_handshakes: usize,
    /// Volumes open at most.
    #[arg(long, default_value_t = 64)]
    max_volumes: usize,
    /// Seconds an authenticated connection may send nothing, or read none
    /// of its replies, before it is closed.
    #[arg(long, default_value_t = 600)]
    idle_timeout_secs: u64,
    /// Seconds a connection has to finish its TLS and protocol handshakes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    handshake_timeout_secs: u64,
    /// Milliseconds a volume's writer may go unheard (its connections
    /// open) before another daemon's claim is granted; also how long a
    /// writer recorded in a volume has to reconnect after this server
    /// opened it. Clients send a frame every `keepalive_ms` (5000).
    #[arg(long, default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    writer_lease_ms: u64,
    /// Requests in flight per connection at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_in_flight: u32,
    /// Staged write data not yet committed, across all connections, at
    /// most (each connection also at most 64M; docs/protocol.md).
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    max_staged_bytes: u64,
    /// Write the bound address to this file once listening (for scripts).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, default_value = "info")]
    log_level: String,
    #[command(flatten)]
    seccomp: confine::SeccompArgs,
}

/// The volume and how the daemon caches it: shared by `serve` and `mount`.
#[derive(clap::Args)]
struct VolumeArgs {
    /// The volume: file:///DIR (embedded engine on a local directory),
    /// s3://BUCKET/PREFIX?endpoint=URL&region=R&allow_http=true (embedded
    /// engine on object storage), pohmel://HOST:PORT[,HOST:PORT...]/VOLUME
    /// (store servers, failover in order), or mem: (daemon memory; does not
    /// persist). A file:// or s3:// volume must exist (`pohmelfs format`).
    #[arg(long)]
    store: String,
    /// Open the volume even though another live daemon holds it: that
    /// daemon is fenced (its writes fail from then on).
    #[arg(long)]
    take_over: bool,
    /// Serve the volume read-only: every change is refused (EROFS), and
    /// opening a file:// or s3:// volume writes nothing to it (no holder
    /// record; a writing daemon may hold it, and this one sees it as of
    /// its open). A snapshot, file:///DIR@NAME or
    /// file:///DIR/snapshots/NAME, is served only so.
    #[arg(long, conflicts_with = "take_over")]
    readonly: bool,
    /// Guest (or kernel) caching of attributes, entries and data.
    #[arg(long, value_enum, default_value_t = CachePolicy::Auto)]
    cache: CachePolicy,
    /// Let the guest cache writes and send them later (FUSE writeback cache).
    #[arg(long)]
    writeback_cache: bool,
    /// Allow root to create character and block device nodes.
    #[arg(long)]
    allow_device_nodes: bool,
    /// Open files and directories at most.
    #[arg(long, default_value_t = 65_536)]
    max_handles: usize,
    /// What a write does to a page whose transaction is in flight: wait for
    /// its ack, or copy the page (copy-on-write).
    #[arg(long, value_enum, default_value_t = OverwritePolicy::Cow)]
    overwrite: OverwritePolicy,
    /// Memory for caches at most, e.g. 256M: pages (clean and dirty), the
    /// metadata caches, and the embedded engine's memtables and block
    /// caches (docs/operations.md gives the split).
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    cache_size: u64,
    /// Dirty plus in-flight bytes at most; writes beyond wait for acks.
    /// Part of the page share of --cache-size (default: 128M, or the whole
    /// page share if smaller).
    #[arg(long, value_parser = parse_bytes)]
    dirty_max: Option<u64>,
    /// Transactions in flight to the store at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_in_flight: u32,
    /// Milliseconds to wait for an ack before resending a transaction.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..))]
    ack_timeout_ms: u64,
    /// Milliseconds fsync (and the drain at shutdown) waits before giving up
    /// with EIO.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(10..))]
    fsync_timeout_ms: u64,
    /// Microseconds a new metadata transaction (and a write's own
    /// transaction) waits for more changes (writes) to join it before it is
    /// sent, counted from the newest that joined (8 times this from its
    /// forming at most; a sync, or dirty bytes past three quarters of
    /// --dirty-max, sends it at once); 0 sends at once.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    meta_linger_us: u64,
    /// Make every close wait until the file's data is durable, as fsync
    /// does. Without it a close returns at once (the data goes to the store
    /// on its own, a new file's within --meta-linger-us): only
    /// fsync, fdatasync, syncfs and shutdown wait, so a daemon crash
    /// (kill -9) loses what was written but never fsynced, as a local
    /// disk's page cache would (docs/operations.md).
    #[arg(long)]
    sync_on_close: bool,
    /// Keep file data of a pohmel:// or s3:// volume in local files in
    /// this directory (a read cache that survives restarts; needs
    /// --cache-dir-size).
    #[arg(long, requires = "cache_dir_size")]
    cache_dir: Option<PathBuf>,
    /// Bytes the read cache may take, e.g. 4G: its files plus its index.
    #[arg(long, requires = "cache_dir", value_parser = parse_bytes)]
    cache_dir_size: Option<u64>,
}

impl VolumeArgs {
    /// How `--cache-size` is split: the engine's share only when it runs
    /// in this process.
    fn budget(&self) -> MemoryBudget {
        let embedded = self.store.starts_with("file:") || self.store.starts_with("s3:");
        MemoryBudget::split(self.cache_size, embedded)
    }

    fn dirty_max(&self) -> u64 {
        self.dirty_max
            .unwrap_or_else(|| DEFAULT_DIRTY_MAX.min(self.budget().page_bytes))
    }

    /// Refuse settings that contradict each other.
    fn check(&self) -> Result<()> {
        confine::refuse_secret_in_url(&self.store).context("--store")?;
        if self.readonly && self.store.starts_with("mem:") {
            bail!("--readonly: a mem: volume starts empty; there is nothing to serve");
        }
        if self.readonly && self.cache_dir.is_some() {
            bail!("--readonly with --cache-dir is not supported yet");
        }
        let pages = self.budget().page_bytes;
        if self.dirty_max() > pages {
            bail!(
                "--dirty-max ({}) must not exceed the page share of --cache-size ({} of {})",
                self.dirty_max(),
                pages,
                self.cache_size
            );
        }
        Ok(())
    }

    fn txn_config(&self) -> TxnConfig {
        let budget = self.budget();
        TxnConfig {
            overwrite: self.overwrite,
            cache_bytes: budget.page_bytes,
            meta_cache_bytes: budget.meta_bytes,
            engine_cache_bytes: budget.engine_bytes,
            dirty_max_bytes: self.dirty_max(),
            max_in_flight: self.max_in_flight as usize,
            ack_timeout: std::time::Duration::from_millis(self.ack_timeout_ms),
            fsync_timeout: std::time::Duration::from_millis(self.fsync_timeout_ms),
            meta_linger: std::time::Duration::from_micros(self.meta_linger_us),
            data_linger: std::time::Duration::from_micros(self.meta_linger_us),
            sync_on_close: self.sync_on_close,
            ..TxnConfig::default()
        }
    }

    fn read_cache(&self) -> Option<pohmelfs::store::readcache::CacheConfig> {
        let (dir, size_bytes) = self.cache_dir.clone().zip(self.cache_dir_size)?;
        Some(pohmelfs::store::readcache::CacheConfig { dir, size_bytes })
    }

    fn fs_config(&self) -> FsConfig {
        FsConfig {
            cache: self.cache,
            writeback_cache: self.writeback_cache,
            allow_device_nodes: self.allow_device_nodes,
            max_handles: self.max_handles,
            read_only: self.readonly,
            ..FsConfig::default()
        }
    }

    /// How the volume opens: read-only, or as its only writer (taking it
    /// over from a live holder only with --take-over).
    fn open_mode(&self) -> pohmelfs::store::engine::OpenMode {
        if self.readonly {
            pohmelfs::store::engine::OpenMode::ReadOnly
        } else {
            pohmelfs::store::engine::OpenMode::Existing {
                take_over: self.take_over,
            }
        }
    }

    /// Open the store behind the transaction layer, and the filesystem on it.
    fn open(
        &self,
        metrics: &Arc<Metrics>,
    ) -> Result<(Arc<pohmelfs::writeback::WritebackStore>, Arc<PohmelFs>)> {
        let mode = self.open_mode();
        let store = pohmelfs::writeback::open_as(
            &self.store,
            self.txn_config(),
            self.read_cache().as_ref(),
            Arc::clone(metrics),
            mode,
        )
        .context("open store")?;
        let fs = PohmelFs::new(
            Arc::clone(&store) as Arc<dyn pohmelfs::store::Store>,
            self.fs_config(),
            Arc::clone(metrics),
        )
        .context("open volume")?;
        Ok((store, Arc::new(fs)))
    }
}

fn main() {
    allocator::tune_glibc();
    // `pohmelfs --fd=N --shared-dir DIR …`, as libvirt starts a virtio-fs
    // backend, means `pohmelfs serve …` (src/compat.rs).
    let args = match compat::rewrite(std::env::args_os().collect()) {
        Ok(Some(args)) => args,
        Ok(None) => return,
        Err(e) => {
            eprintln!("pohmelfs: {e:#}");
            std::process::exit(1);
        }
    };
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Format(args) => lifecycle::format(args),
        Command::Copy(args) => copy::run(args),
        Command::Import(args) => copy::import(args),
        Command::Serve(args) => serve::serve(args),
        Command::Store(args) => store(args),
        Command::BenchStore(args) => bench_store(args),
        Command::Status(args) => status(args),
        Command::Mount(args) => mount::run(args),
        Command::Check(args) => check(args),
        Command::Torture(args) => torture(args),
        Command::Snapshot(cmd) => init_logging("warn").and_then(|()| snapshot::run(cmd)),
        Command::Clone(args) => init_logging("warn").and_then(|()| snapshot::clone(args)),
    };
    if let Err(e) = result {
        // One line: what failed and why, the whole chain (or the one
        // sentence that says it all: a missing or held volume).
        eprintln!("pohmelfs: {}", lifecycle::one_line(&e));
        std::process::exit(1);
    }
}

/// The logger for `--log-level LEVEL` (or `RUST_LOG`: `src/logging.rs`).
fn init_logging(level: &str) -> Result<()> {
    pohmelfs::logging::init(level, str::to_string).context("install logger")
}

/// `--dirty-max` unless given (or the page share is smaller).
const DEFAULT_DIRTY_MAX: u64 = 128 << 20;

fn parse_bytes(s: &str) -> Result<u64, String> {
    pohmelfs::store::parse_size(s)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 512M, 2G)"))
}

fn status(args: StatusArgs) -> Result<()> {
    let command = if args.prometheus {
        "prometheus"
    } else {
        "status"
    };
    let text = pohmelfs::control::query(&args.socket_path, command).with_context(|| {
        format!(
            "ask {}",
            pohmelfs::control::control_path(&args.socket_path).display()
        )
    })?;
    print!("{text}");
    Ok(())
}

fn store(args: StoreArgs) -> Result<()> {
    use pohmelfs::net::credentials::{read_secret, Credentials};
    use pohmelfs::net::server::{Server, ServerConfig};
    // Before any thread; a port below 1024 keeps CAP_NET_BIND_SERVICE
    // until it is bound (src/confine).
    let keep: &[u32] = match args.listen.port() {
        1..1024 => &[confine::CAP_NET_BIND_SERVICE],
        _ => &[],
    };
    confine::restrict(keep).context("confine")?;
    let notifier = systemd::Notifier::from_env().context("systemd notify socket")?;
    confine::refuse_secret_in_url(&args.data).context("--data")?;
    lifecycle::check_data_dir(&args.data)?;
    init_logging(&args.log_level)?;
    pohmelfs::ratelimit::limit_panic_messages();
    let mut credentials = Credentials::none();
    if let Some(path) = &args.secret_file {
        let secret = read_secret(path).context("read secret file")?;
        credentials = Credentials::single(secret);
    }
    if let Some(path) = &args.credentials_file {
        let named = Credentials::read_file(path).context("read credentials file")?;
        credentials = credentials.merge(named).context("read credentials file")?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(pohmelfs::net::tls::server_config(cert, key).context("load TLS certificate")?)
        }
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pohmelfs-store")
        .build()
        .context("start runtime")?;
    let served = rt.block_on(async move {
        let cfg = ServerConfig {
            credentials,
            tls,
            max_connections: args.max_connections,
            max_connections_per_peer: args.max_connections_per_peer,
            max_handshakes: args.max_handshakes,
            max_volumes: args.max_volumes,
            max_in_flight: args.max_in_flight,
            max_staged_bytes: args.max_staged_bytes,
            idle_timeout: std::time::Duration::from_secs(args.idle_timeout_secs.max(1)),
            handshake_timeout: std::time::Duration::from_secs(args.handshake_timeout_secs),
            writer_lease: std::time::Duration::from_millis(args.writer_lease_ms),
            create_volumes: args.create_volumes,
            ..ServerConfig::new(args.listen, &args.data)
        };
        let server = Server::bind(cfg).await.context("bind store server")?;
        let addr = server.local_addr().context("read bound address")?;
        let data = pohmelfs::net::redact_url(&args.data);
        info!(%addr, %data, "store server listening");
        if let Some(path) = &args.addr_file {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, addr.to_string()).context("write address file")?;
            std::fs::rename(&tmp, path).context("write address file")?;
        }
        confine::drop_all_capabilities().context("drop capabilities")?;
        confine::seccomp::install(args.seccomp.seccomp).context("install seccomp filter")?;
        info!(seccomp = %args.seccomp.seccomp, "confined: umask 077, no capabilities, no_new_privs");
        // Watch the signals before saying ready: a SIGTERM right after
        // READY=1 must find its handler.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (
            signal(SignalKind::terminate()).context("watch SIGTERM")?,
            signal(SignalKind::interrupt()).context("watch SIGINT")?,
        );
        if let Some(n) = &notifier {
            n.notify(&format!("READY=1\nSTATUS=listening on {addr}"))
                .context("notify systemd")?;
        }
        let shutdown = async {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
            if let Some(n) = &notifier {
                if let Err(e) = n.notify("STOPPING=1") {
                    warn!(error = %pohmelfs::ErrorChain(&e), "could not tell systemd");
                }
            }
        };
        server.run(shutdown).await;
        Ok::<(), anyhow::Error>(())
    });
    // A sync that outlived its bound (`Server::run`) runs on a blocking
    // thread, which a plain drop of the runtime would wait for.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    served
}

fn bench_store(args: BenchStoreArgs) -> Result<()> {
    init_logging("warn")?;
    confine::refuse_secret_in_url(&args.store).context("--store")?;
    let store = pohmelfs::net::open(&args.store).context("open store")?;
    let label = if args.label.is_empty() {
        args.store.clone()
    } else {
        args.label.clone()
    };
    println!(
        "| store | txn size | threads | commits | p50 ms | p99 ms | max ms | commits/s | MiB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut first_ino = 1 << 40;
    for size in args.sizes.split(',') {
        let bytes = pohmelfs::store::parse_size(size)
            .with_context(|| format!("parse size {size:?}"))? as usize;
        // Fewer big transactions: keep every run to a bounded amount of data.
        let count = args
            .count
            .min(((2u64 << 30) / bytes.max(1) as u64) as usize)
            .max(1);
        let f = pohmelfs::store::bench::commit_bench(
            std::sync::Arc::clone(&store),
            bytes,
            count,
            args.threads,
            first_ino,
        )
        .with_context(|| format!("run {size} transactions"))?;
        first_ino += count as u64;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {label} | {size} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.1} |",
            f.threads,
            f.commits,
            ms(f.p50),
            ms(f.p99),
            ms(f.max),
            f.commits_per_sec,
            f.mib_per_sec
        );
    }
    Ok(())
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The volume: file:///DIR or s3://BUCKET/PREFIX?... (a pohmel:// volume
    /// is DATA/NAME of its stopped store server).
    #[arg(long)]
    store: String,
}

fn check(args: CheckArgs) -> Result<()> {
    use pohmelfs::store::engine::VolumeReader;
    init_logging("warn")?;
    confine::refuse_secret_in_url(&args.store).context("--store")?;
    if args.store.starts_with("pohmel://") || args.store.starts_with("mem:") {
        bail!(
            "check reads a volume directly: stop the store server and pass file:///DATA/NAME \
             (or the s3:// URL) of the volume"
        );
    }
    let started = std::time::Instant::now();
    let reader = VolumeReader::open(&args.store).context("open volume read-only")?;
    let report = pohmelfs::check::volume::check_volume_reporting(&reader, &mut |name, items| {
        // Progress on stderr, one line per pass (stdout is the report).
        match items {
            Some(n) => eprintln!(
                "check: {name}: {n} ({:.1} s)",
                started.elapsed().as_secs_f64()
            ),
            None => eprintln!("check: {name} ({:.1} s)", started.elapsed().as_secs_f64()),
        }
    })
    .context("check volume")?;
    // The superblock was read at open and by the check; a volume whose
    // superblock is unreadable is a problem in the report, not here.
    let version = match pohmelfs::store::engine::VolumeScan::volume_info(&reader) {
        Ok(info) => info.format_version.to_string(),
        Err(_) => "unknown".to_owned(),
    };
    println!(
        "check: read {} (format version {version}) in {:.2}s",
        reader.describe(),
        started.elapsed().as_secs_f64()
    );
    for line in report.lines() {
        println!("{line}");
    }
    if !report.is_clean() {
        bail!("{} problems in the volume", report.problems.len());
    }
    Ok(())
}

#[derive(clap::Args)]
struct TortureArgs {
    /// The directory the run's own directory (seed-S) is made in; with
    /// --verify, where to find seed-S instead of the saved path.
    #[arg(long, required_unless_present = "verify")]
    dir: Option<PathBuf>,
    /// The seed: the same seed makes the same operations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Operations to run (default 10000, or 2000000 with --long).
    #[arg(long)]
    ops: Option<u64>,
    /// A long run: millions of operations, progress every 100000.
    #[arg(long)]
    long: bool,
    /// Operations between full comparisons, bytes included.
    #[arg(long)]
    full_every: Option<u64>,
    /// After the run, write the tree's expected state to FILE.
    #[arg(long, value_name = "FILE")]
    save_model: Option<PathBuf>,
    /// Run nothing: compare the tree a saved model names with it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["save_model", "long", "ops"])]
    verify: Option<PathBuf>,
    /// After a divergence, do not search for the shortest failing prefix.
    #[arg(long)]
    no_minimize: bool,
}

fn torture(args: TortureArgs) -> Result<()> {
    use pohmelfs::check::torture;
    let mut out = std::io::stdout().lock();
    if let Some(model) = &args.verify {
        let root = match &args.dir {
            Some(dir) => {
                let text = std::fs::read_to_string(model)
                    .with_context(|| format!("read {}", model.display()))?;
                let saved = torture::verify::Saved::parse(&text)
                    .map_err(|e| anyhow::anyhow!("parse {}: {e}", model.display()))?;
                Some(dir.join(format!("seed-{}", saved.seed)))
            }
            None => None,
        };
        let differences =
            torture::verify_saved(model, root.as_deref(), &mut out).context("verify the tree")?;
        if differences > 0 {
            bail!("{differences} differences from the saved model");
        }
        return Ok(());
    }
    let Some(dir) = args.dir else {
        bail!("--dir is required");
    };
    let default_ops = if args.long { torture::LONG_OPS } else { 10_000 };
    let mut cfg = torture::Config::new(dir, args.seed, args.ops.unwrap_or(default_ops));
    if args.long {
        cfg.full_every = 20_000;
        cfg.progress_every = 100_000;
    }
    if let Some(n) = args.full_every {
        cfg.full_every = n.max(1);
    }
    cfg.save_model = args.save_model;
    cfg.minimize = !args.no_minimize;
    let outcome = torture::run(&cfg, &mut out).context("run the torture")?;
    if outcome.divergence.is_some() {
        bail!(
            "the filesystem diverged from the model (seed {})",
            args.seed
        );
    }
    Ok(())
}
