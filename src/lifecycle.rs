//! A volume's life cycle on the command line: `pohmelfs format`, the one
//! line a missing or held volume gets, and opening a volume without the
//! capabilities startup keeps.
//!
//! Only `format` creates a volume. `serve`, `mount` and `store` open
//! volumes that exist and refuse the rest with one line ("no volume at
//! URL; create it with pohmelfs format URL"), so a typo never makes a new
//! empty volume (docs/operations.md, "Volumes").

use anyhow::{bail, Context as _, Result};
use pohmelfs::confine;
use pohmelfs::store::OpenError;

/// `pohmelfs format` arguments.
#[derive(clap::Args)]
pub struct FormatArgs {
    /// The new volume: file:///DIR or s3://BUCKET/PREFIX?... (a store
    /// server's volume NAME: its --data URL followed by /NAME).
    url: String,
    /// The volume's capacity (statfs and ENOSPC), e.g. 100G; a URL's own
    /// capacity= overrides it when the volume is opened. Default: 1T.
    #[arg(long, value_parser = super::parse_bytes)]
    capacity: Option<u64>,
}

/// Create the volume `args.url` names; refuse one that exists.
pub fn format(args: FormatArgs) -> Result<()> {
    super::init_logging("warn")?;
    confine::refuse_secret_in_url(&args.url).context("URL")?;
    if args.url.starts_with("pohmel:") {
        bail!(
            "a store server's volume is formatted where the server keeps it: \
             pohmelfs format DATA/NAME, DATA being the server's --data URL"
        );
    }
    if args.url.starts_with("mem:") {
        bail!("mem: volumes live in one daemon's memory and need no format");
    }
    if !(args.url.starts_with("file:") || args.url.starts_with("s3:")) {
        bail!(
            "format creates file:///DIR and s3://BUCKET/PREFIX volumes, not {:?}",
            args.url
        );
    }
    let id = pohmelfs::store::engine::SlateStore::format(&args.url, args.capacity)
        .map_err(|e| OpenError::volume(&args.url, e))
        .context("format volume")?;
    println!(
        "formatted {}: volume {}, format version {}",
        args.url,
        id.id_hex(),
        id.format_version
    );
    Ok(())
}

/// Refuse a store server's `file://` data directory that does not exist.
pub fn check_data_dir(data: &str) -> Result<()> {
    let Some(path) = data.strip_prefix("file://") else {
        return Ok(());
    };
    let dir = path.split_once('?').map_or(path, |(p, _)| p);
    if !std::path::Path::new(dir).is_dir() {
        bail!(
            "no data directory at {data}; create it (mkdir -p {dir}) and its volumes \
             (pohmelfs format file://{dir}/NAME)"
        );
    }
    Ok(())
}

/// The error as one line: a missing, existing or held volume as its own
/// sentence, anything else as the whole chain.
pub fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .filter_map(|c| c.downcast_ref::<OpenError>())
        .find(|oe| oe.is_one_line())
        .map_or_else(|| format!("{e:#}"), ToString::to_string)
}

/// Run `open` on a thread of its own that first gives up every capability:
/// threads the engine starts inherit that thread's (empty) set, while the
/// caller keeps what it still needs to set up the socket.
pub fn open_without_capabilities<T: Send>(open: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("pohmelfs-open".into())
            .spawn_scoped(scope, || {
                confine::drop_all_capabilities().context("drop capabilities")?;
                open()
            })
            .context("start the thread that opens the volume")?
            .join()
            .unwrap_or_else(|_| bail!("opening the volume panicked"))
    })
}
