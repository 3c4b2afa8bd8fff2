//! `pohmelfs copy SRC DST`: a whole volume from one store to another, with
//! progress on stderr, then a verification (`pohmelfs::store::copy`); and
//! `pohmelfs import DIR URL`: a host tree into a new volume
//! (`pohmelfs::store::import`).

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use pohmelfs::confine;
use pohmelfs::store::copy::{self, Progress};
use pohmelfs::store::engine::OpenMode;
use pohmelfs::store::Store;

/// `pohmelfs copy` arguments.
#[derive(clap::Args)]
pub struct CopyArgs {
    /// The volume to copy: file:///DIR, s3://BUCKET/PREFIX?... or
    /// pohmel://HOST:PORT/NAME?secret_file=... (not served by a daemon
    /// meanwhile: a held volume is refused).
    src: String,
    /// The volume to copy into, of any kind, made first (pohmelfs format,
    /// or the store server's): new or empty, or an unfinished copy of the
    /// same source, which the copy finishes.
    dst: String,
    /// Skip the verification that reads both volumes whole afterwards.
    #[arg(long)]
    no_verify: bool,
}

/// Open a volume that exists, refusing one a daemon holds. A `pohmel://`
/// volume is claimed for writing when `write` (the destination), so a
/// daemon that had it can write no more; a source is only read. The
/// callers refused a secret in `url` first, as their errors name it.
fn open(url: &str, write: bool) -> Result<Arc<dyn Store>> {
    if url.starts_with("pohmel:") && write {
        return Ok(pohmelfs::net::open(url)?);
    }
    if url.starts_with("pohmel:") {
        return Ok(pohmelfs::net::open_reader(url)?);
    }
    let once = pohmelfs::store::open_once_as(url, OpenMode::Existing { take_over: false })?;
    Ok(once)
}

/// `pohmelfs import` arguments.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The directory tree to import (not followed across mount points).
    dir: std::path::PathBuf,
    /// The volume, made first (pohmelfs format) and never served.
    url: String,
}

/// Progress on stderr: one line rewritten in place on a terminal, else a
/// line every few seconds.
struct Shown {
    what: &'static str,
    items: &'static str,
    tty: bool,
    last: Option<Instant>,
}

impl Shown {
    fn new(what: &'static str, items: &'static str) -> Shown {
        Shown {
            what,
            items,
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, p: Progress, done: bool) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if !done && self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let line = format!(
            "{}: {}/{} {}, {:.1}/{:.1} MiB",
            self.what,
            p.inodes,
            p.total_inodes.max(p.inodes),
            self.items,
            mib(p.bytes),
            mib(p.total_bytes.max(p.bytes))
        );
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r{line}{}", if done { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
    }
}

pub fn run(args: CopyArgs) -> Result<()> {
    super::init_logging("warn")?;
    confine::refuse_secret_in_url(&args.src).context("SRC")?;
    confine::refuse_secret_in_url(&args.dst).context("DST")?;
    let src = open(&args.src, false).with_context(|| format!("open the source {}", args.src))?;
    let dst =
        open(&args.dst, true).with_context(|| format!("open the destination {}", args.dst))?;
    let started = Instant::now();
    let mut shown = Shown::new("copy", "inodes");
    let copied = copy::copy(&*src, &*dst, &mut |p| shown.show(p, false)).context("copy")?;
    if copied.already {
        println!(
            "{} is a verified copy of {} already ({} inodes, {:.1} MiB compared): nothing to do",
            args.dst,
            args.src,
            copied.inodes,
            copied.bytes as f64 / (1 << 20) as f64
        );
        return Ok(());
    }
    shown.show(
        Progress {
            inodes: copied.inodes,
            bytes: copied.bytes,
            ..Progress::default()
        },
        true,
    );
    println!(
        "copied {} inodes, {:.1} MiB of data in {} transactions, {:.1} s{}",
        copied.inodes,
        copied.bytes as f64 / (1 << 20) as f64,
        copied.txns,
        started.elapsed().as_secs_f64(),
        if copied.resumed {
            " (finished an interrupted copy)"
        } else {
            ""
        }
    );
    if args.no_verify {
        return Ok(());
    }
    let started = Instant::now();
    let mut shown = Shown::new("verify", "inodes");
    let checked = copy::verify(&*src, &*dst, &mut |p| shown.show(p, false)).context("verify")?;
    shown.show(checked, true);
    println!(
        "verified {} inodes, {:.1} MiB read from each volume, {:.1} s: the copy equals the source",
        checked.inodes,
        checked.bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn import(args: ImportArgs) -> Result<()> {
    use pohmelfs::store::import;
    super::init_logging("warn")?;
    confine::refuse_secret_in_url(&args.url).context("URL")?;
    let dst = open(&args.url, true).with_context(|| format!("open the volume {}", args.url))?;
    let started = Instant::now();
    let mut shown = Shown::new("import", "entries");
    let mut last = import::Progress::default();
    let done = import::import(&args.dir, &*dst, &mut |p| {
        last = p;
        shown.show(p.into(), false);
    })
    .with_context(|| format!("import {}", args.dir.display()))?;
    shown.show(last.into(), true);
    println!(
        "imported {} entries, {:.1} MiB of data in {} transactions, {:.1} s",
        done.entries,
        done.bytes as f64 / (1 << 20) as f64,
        done.txns,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
