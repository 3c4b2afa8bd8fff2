//! `pohmelfs snapshot create|list|delete` and `pohmelfs clone`: the
//! command line over `store::engine::snapshot` (file:// volumes).
//!
//! A snapshot is taken by the process that holds the volume open. With
//! `--socket-path` that is the daemon serving it, asked through its
//! control socket; without, this command opens the volume itself, so it
//! refuses a volume another process holds (its commit log's `flock`):
//! opening it would fence that daemon.

use anyhow::{bail, Context as _, Result};
use pohmelfs::store::engine::snapshot;
use pohmelfs::store::engine::SlateStore;

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take snapshot NAME of the volume (DIR/snapshots/NAME).
    Create {
        /// The volume: file:///DIR.
        url: String,
        name: String,
        /// The vhost-user socket of the daemon serving the volume, if one
        /// does: the snapshot is then taken by the daemon, through its
        /// control socket (PATH.ctl), while it serves.
        #[arg(long)]
        socket_path: Option<std::path::PathBuf>,
    },
    /// List the volume's snapshots.
    List {
        /// The volume: file:///DIR.
        url: String,
    },
    /// Delete snapshot NAME; the space no one else shares comes back (at
    /// once when no daemon holds the volume, else at its next open).
    Delete {
        /// The volume: file:///DIR.
        url: String,
        name: String,
    },
}

#[derive(clap::Args)]
pub struct CloneArgs {
    /// The snapshot: file:///DIR@NAME.
    source: String,
    /// The new volume: file:///DIR2, on the same filesystem, absent or
    /// empty.
    destination: String,
}

/// Open the volume at `url` for a moment, refusing one a daemon holds.
fn open_offline(url: &str) -> Result<SlateStore> {
    let dir = snapshot::local_dir(url)?;
    if snapshot::held(&dir)? {
        bail!(
            "{} is open in another process; pass --socket-path of the daemon serving it \
             (a store server's volumes: stop it first)",
            dir.display()
        );
    }
    SlateStore::open(url).context("open volume")
}

/// Take snapshot `name` through the daemon whose vhost-user socket is
/// `socket`, which must serve the volume at `url`.
fn create_online(url: &str, name: &str, socket: &std::path::Path) -> Result<()> {
    let dir = snapshot::local_dir(url)?;
    let started = std::time::Instant::now();
    let path = pohmelfs::control::snapshot(socket, name)
        .with_context(|| format!("take snapshot through {}", socket.display()))?;
    if !std::path::Path::new(&path).starts_with(&dir) {
        bail!(
            "the daemon at {} serves another volume: it took {path}",
            socket.display()
        );
    }
    println!(
        "snapshot {name}: {path} ({:.1} ms, through the daemon)",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

pub fn run(cmd: SnapshotCommand) -> Result<()> {
    match cmd {
        SnapshotCommand::Create {
            url,
            name,
            socket_path: Some(socket),
        } => {
            snapshot::check_name(&name)?;
            create_online(&url, &name, &socket)?;
        }
        SnapshotCommand::Create {
            url,
            name,
            socket_path: None,
        } => {
            snapshot::check_name(&name)?;
            let store = open_offline(&url)?;
            let started = std::time::Instant::now();
            let path = store.take_snapshot(&name).context("take snapshot")?;
            let took = started.elapsed();
            store.close().context("close volume")?;
            println!(
                "snapshot {name}: {} ({:.1} ms)",
                path.display(),
                took.as_secs_f64() * 1e3
            );
        }
        SnapshotCommand::List { url } => {
            let dir = snapshot::local_dir(&url)?;
            for (name, marker) in snapshot::list(&dir)? {
                let created = marker
                    .lines()
                    .find_map(|l| l.strip_prefix("created "))
                    .unwrap_or("?");
                println!("{name}\tcreated {created} (unix seconds)");
            }
        }
        SnapshotCommand::Delete { url, name } => {
            let dir = snapshot::local_dir(&url)?;
            snapshot::delete(&dir, &name)?;
            if !snapshot::held(&dir)? {
                // Opening punches the pages only the snapshot kept.
                SlateStore::open(&url)
                    .context("open volume to reclaim")?
                    .close()
                    .context("close volume")?;
            }
            println!("deleted snapshot {name}");
        }
    }
    Ok(())
}

pub fn clone(args: CloneArgs) -> Result<()> {
    let Some((src, name)) = args.source.rsplit_once('@') else {
        bail!("{:?}: expected file:///DIR@SNAPSHOT", args.source);
    };
    let src_dir = snapshot::local_dir(src)?;
    let dst_dir = snapshot::local_dir(&args.destination)?;
    let snap = snapshot::snapshot_dir(&src_dir, name)?;
    let started = std::time::Instant::now();
    snapshot::clone_from(&snap, &dst_dir).context("clone")?;
    println!(
        "clone {}: from {} ({:.1} ms)",
        dst_dir.display(),
        snap.display(),
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
