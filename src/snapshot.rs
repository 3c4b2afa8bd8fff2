//! `pohmelfs snapshot create|list|delete` and `pohmelfs clone`: the
//! command line over `store::engine::snapshot` (file:// volumes) and
//! `store::engine::s3_snapshot` (s3:// volumes; the endpoint and
//! credentials as the URL's options or `AWS_*` variables, as for every
//! s3:// command; a secret in a URL is refused, as everywhere on the
//! command line).
//!
//! A snapshot is taken by the process that holds the volume open. With
//! `--socket-path` that is the daemon serving it, asked through its
//! control socket; without, this command opens the volume itself, so it
//! refuses a volume another process holds (its commit log's `flock`):
//! opening it would fence that daemon.

use anyhow::{bail, Context as _, Result};
use pohmelfs::confine;
use pohmelfs::store::engine::{s3_snapshot, snapshot};
use pohmelfs::store::engine::{OpenMode, SlateStore};

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take snapshot NAME of the volume (DIR/snapshots/NAME).
    Create {
        /// The volume: file:///DIR or s3://BUCKET/PREFIX.
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
        /// The volume: file:///DIR or s3://BUCKET/PREFIX.
        url: String,
    },
    /// Delete snapshot NAME; the space no one else shares comes back (at
    /// once when no daemon holds the volume, else at its next open).
    Delete {
        /// The volume: file:///DIR or s3://BUCKET/PREFIX.
        url: String,
        name: String,
    },
}

#[derive(clap::Args)]
pub struct CloneArgs {
    /// The snapshot: file:///DIR@NAME or s3://BUCKET/PREFIX@NAME; with
    /// --delete, the s3:// clone to delete.
    source: String,
    /// The new volume: file:///DIR2 on the same filesystem, or
    /// s3://BUCKET/PREFIX2 in the same bucket; absent or empty.
    #[arg(required_unless_present = "delete")]
    destination: Option<String>,
    /// Delete the s3:// clone SOURCE (a file:// clone is deleted with
    /// `rm -r`); refused while a process holds it or it has snapshots.
    #[arg(long)]
    delete: bool,
}

fn is_s3(url: &str) -> bool {
    url.starts_with("s3://")
}

/// Let the sweep of each owner free what a deleted snapshot or clone
/// alone kept: at once for an owner no one holds, else at its next open.
fn sweep_owners(like: &str, owners: &[String]) -> Result<()> {
    for owner in owners {
        let url = s3_snapshot::url_of(like, owner);
        match SlateStore::open_as(&url, OpenMode::Existing { take_over: false }) {
            Ok(s) => s.close().context("close volume")?,
            Err(e) => println!("{owner}: not swept now ({e}); its next open frees the space"),
        }
    }
    Ok(())
}

/// Open the volume at `url` for a moment, refusing one a daemon holds.
fn open_offline(url: &str) -> Result<SlateStore> {
    if is_s3(url) {
        // The holder record says whether a daemon holds it.
        return SlateStore::open_as(url, OpenMode::Existing { take_over: false })
            .context("open volume");
    }
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
    let started = std::time::Instant::now();
    let path = pohmelfs::control::snapshot(socket, name)
        .with_context(|| format!("take snapshot through {}", socket.display()))?;
    let same = if is_s3(url) {
        let base = url.split_once('?').map_or(url, |(b, _)| b);
        base.strip_prefix("s3://")
            .and_then(|r| r.split_once('/'))
            .is_some_and(|(_, prefix)| {
                path.starts_with(&format!("{}/", prefix.trim_end_matches('/')))
            })
    } else {
        std::path::Path::new(&path).starts_with(snapshot::local_dir(url)?)
    };
    if !same {
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

impl SnapshotCommand {
    fn url(&self) -> &str {
        match self {
            SnapshotCommand::Create { url, .. }
            | SnapshotCommand::List { url }
            | SnapshotCommand::Delete { url, .. } => url,
        }
    }
}

pub fn run(cmd: SnapshotCommand) -> Result<()> {
    confine::refuse_secret_in_url(cmd.url()).context("URL")?;
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
            let path = store.take_any_snapshot(&name).context("take snapshot")?;
            let took = started.elapsed();
            store.close().context("close volume")?;
            println!(
                "snapshot {name}: {path} ({:.1} ms)",
                took.as_secs_f64() * 1e3
            );
        }
        SnapshotCommand::List { url } if is_s3(&url) => {
            for (name, created) in s3_snapshot::list(&url)? {
                println!("{name}\tcreated {created} (unix seconds)");
            }
        }
        SnapshotCommand::Delete { url, name } if is_s3(&url) => {
            let owners = s3_snapshot::delete(&url, &name)?;
            sweep_owners(&url, &owners)?;
            println!("deleted snapshot {name}");
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
    confine::refuse_secret_in_url(&args.source).context("SOURCE")?;
    if let Some(destination) = &args.destination {
        confine::refuse_secret_in_url(destination).context("DESTINATION")?;
    }
    if args.delete {
        if !is_s3(&args.source) || args.destination.is_some() {
            bail!("--delete takes one s3:// clone (a file:// clone is deleted with rm -r)");
        }
        let owners = s3_snapshot::delete_clone(&args.source)?;
        sweep_owners(&args.source, &owners)?;
        println!("deleted clone {}", args.source);
        return Ok(());
    }
    let destination = args.destination.unwrap_or_default();
    let (base, query) = match args.source.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (args.source.as_str(), None),
    };
    let Some((src, name)) = base.rsplit_once('@') else {
        bail!("{:?}: expected file:///DIR@SNAPSHOT", args.source);
    };
    if is_s3(src) {
        let src = query.map_or_else(|| src.to_string(), |q| format!("{src}?{q}"));
        let started = std::time::Instant::now();
        s3_snapshot::clone_from(&src, name, &destination).context("clone")?;
        println!(
            "clone {destination}: from {src}@{name} ({:.1} ms)",
            started.elapsed().as_secs_f64() * 1e3
        );
        return Ok(());
    }
    let src_dir = snapshot::local_dir(src)?;
    let dst_dir = snapshot::local_dir(&destination)?;
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
