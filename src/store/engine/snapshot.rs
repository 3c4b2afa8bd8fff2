//! Snapshots and clones of a `file://` volume, by hard links.
//!
//! Every file a volume keeps besides its commit log is immutable once
//! written: the engine's objects (WAL tables, compacted tables, manifests,
//! compaction states; `LocalFileSystem` writes each under a staging name
//! and renames it into place) and the sealed segment files. So a
//! **snapshot** `DIR/snapshots/NAME/` is a directory of hard links to
//! them, plus a marker file `SNAPSHOT` that makes it read-only; a
//! **clone** is the same links in a directory of its own, with a marker
//! `CLONED` that makes its first open draw a new volume id. Neither copies
//! data or writes the engine: their cost is one link per file, however
//! large the volume.
//!
//! **Consistency point.** A snapshot is taken under the commit lock: no
//! batch is built while it links. It checkpoints the commit log first
//! (every acknowledged commit is then durable in the engine's own files,
//! and the segments synced), seals the active segment (so no later append
//! goes into a shared file), then links the engine's files and every
//! segment below the new active one. The engine's background tasks
//! (memtable flushes, compaction, garbage collection) may still write and
//! delete while it links: the newest manifest is read before and after,
//! and the whole linking is redone (at most [`LINK_ATTEMPTS`] times) if it
//! changed or a listed file vanished. With the manifest unchanged, every
//! table and WAL object it needs was there throughout, since the collector
//! deletes only what the current manifest no longer names.
//!
//! **Reference counts** are the files' link counts: the reclaimer never
//! punches a segment with more than one link (`reclaim.rs`,
//! `shared.rs`). Deleting a snapshot or clone removes its links; what no
//! one else links is freed by the filesystem, and the pages a volume
//! deferred are punched once it holds the only link (at open, or by the
//! checkpoint task's pass while it is served).
//!
//! **Crashes.** A snapshot is linked into `snapshots/.tmp-NAME` and renamed
//! into place once complete; a clone into `.NAME.clone-tmp` beside its
//! destination. What a crash leaves under those names holds only links:
//! an open of the volume removes the snapshot leftovers, a new clone to
//! the same destination removes its own.
//!
//! **One command at a time.** Creating or deleting a snapshot holds an
//! exclusive `flock` of the volume's `snapshots` directory, cloning one a
//! shared lock (clones of one snapshot go side by side), whichever process
//! runs them (the CLI, or a daemon serving the volume through its control
//! socket): two creates of one name never share a staging directory, and a
//! delete never runs under a clone. A command waits for another at most
//! [`BUSY_WAIT`]. An open removes leftovers only when no command runs.
//!
//! `s3://` volumes have snapshots and clones of their own kind
//! (`s3_snapshot.rs`); this module names both.
//!
//! This module owns the links and the names. It never changes a record
//! of the source volume, and writes no record of a clone.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{map_engine_error, segment, SlateStore};
use crate::store::StoreError;

/// The directory of a volume's snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// The file that marks a directory as a snapshot: read-only, never opened
/// for writing.
pub const MARKER_FILE: &str = "SNAPSHOT";

/// The file that marks a clone not yet opened: its first open draws a new
/// volume id (so a clone costs no engine write) and removes it.
pub const CLONE_FILE: &str = "CLONED";

/// How long a snapshot command waits while another one runs on the same
/// volume.
pub const BUSY_WAIT: Duration = Duration::from_secs(30);

/// How many times linking is redone while the engine's manifest moves.
pub const LINK_ATTEMPTS: usize = 20;

/// What is not linked: the commit log (a snapshot's is empty: the
/// checkpoint emptied it), the segments (linked by id), the snapshots,
/// the holder record.
const NOT_LINKED: [&str; 5] = [
    "log",
    segment::DIR_NAME,
    SNAPSHOTS_DIR,
    super::holder::HOLDER,
    super::holder::HOLDER_LOCK,
];

/// Why a snapshot or clone could not be made, listed or deleted.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("this volume keeps no files a snapshot could share (a test's inline placement)")]
    NotSupported,
    #[error("object store: {0}")]
    Object(String),
    #[error("snapshot {0:?} has {1} clone(s): delete them first (`pohmelfs clone --delete`)")]
    HasClones(String, usize),
    #[error("{0} has {1} snapshot(s) or clone(s) of its own: delete them first")]
    HasSnapshots(String, usize),
    #[error("{0}: a clone must be in the bucket of its snapshot")]
    OtherBucket(String),
    #[error("{0} is not a clone")]
    NotAClone(String),
    #[error("{0} is open in another process; stop it first")]
    Held(String),
    #[error("another snapshot command runs on {0}; try again once it is done")]
    Busy(PathBuf),
    #[error("bad URL {0:?}: expected file:///abs/path")]
    BadUrl(String),
    #[error("bad snapshot name {0:?}: 1 to 128 of A-Z a-z 0-9 . _ - , not starting with .")]
    BadName(String),
    #[error("snapshot {0:?} exists")]
    Exists(String),
    #[error("no snapshot {0:?}")]
    NoSuchSnapshot(String),
    #[error("{0} exists and is not empty")]
    DestinationExists(PathBuf),
    #[error("{0} is not on the same filesystem as the snapshot (clones are hard links)")]
    CrossDevice(PathBuf),
    #[error("the engine's manifest kept changing while linking; try again")]
    Unsettled,
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("make the volume's commits durable")]
    Checkpoint(#[source] StoreError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// The local directory of a `file://` URL (options after `?` dropped).
pub fn local_dir(url: &str) -> Result<PathBuf, SnapshotError> {
    if url.starts_with("s3://") {
        return Err(SnapshotError::NotSupported);
    }
    let path = url
        .strip_prefix("file://")
        .map(|p| p.split_once('?').map_or(p, |(p, _)| p))
        .filter(|p| p.starts_with('/'))
        .ok_or_else(|| SnapshotError::BadUrl(url.to_string()))?;
    Ok(PathBuf::from(path))
}

/// The URL of the snapshot a `file:///DIR@NAME[?opts]` URL names:
/// `file:///DIR/snapshots/NAME[?opts]` (as `pohmelfs clone` names its
/// source), which must exist. Any other URL, and a directory whose own
/// name holds an `@`, comes back as it was.
pub fn resolve_url(url: &str) -> Result<String, SnapshotError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    if let Some(path) = base.strip_prefix("s3://") {
        // `s3://BUCKET/VOL@NAME` is `s3://BUCKET/VOL/snapshots/NAME`.
        let Some((vol, name)) = path.rsplit_once('@').filter(|(_, n)| !n.contains('/')) else {
            return Ok(url.to_string());
        };
        check_name(name)?;
        let query = query.map_or_else(String::new, |q| format!("?{q}"));
        return Ok(format!("s3://{vol}/{SNAPSHOTS_DIR}/{name}{query}"));
    }
    let Some(path) = base.strip_prefix("file://") else {
        return Ok(url.to_string());
    };
    let Some((dir, name)) = path.rsplit_once('@') else {
        return Ok(url.to_string());
    };
    if name.contains('/') || Path::new(path).exists() {
        return Ok(url.to_string());
    }
    let snap = snapshot_dir(Path::new(dir), name)?;
    if !snap.is_dir() {
        return Err(SnapshotError::NoSuchSnapshot(name.to_string()));
    }
    let query = query.map_or_else(String::new, |q| format!("?{q}"));
    Ok(format!("file://{}{query}", snap.display()))
}

/// Check a snapshot name: it becomes a directory name.
pub fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_string()))
    }
}

/// The directory of snapshot `name` of the volume in `dir`.
pub fn snapshot_dir(dir: &Path, name: &str) -> Result<PathBuf, SnapshotError> {
    check_name(name)?;
    Ok(dir.join(SNAPSHOTS_DIR).join(name))
}

/// Whether `dir` is a snapshot (never to be opened for writing).
pub fn is_snapshot(dir: &Path) -> bool {
    dir.join(MARKER_FILE).exists()
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io("sync directory", dir))
}

/// The newest manifest's name in the engine directory `dir`.
fn newest_manifest(dir: &Path) -> Result<Option<String>, SnapshotError> {
    let mdir = dir.join("manifest");
    let mut newest = None;
    for e in std::fs::read_dir(&mdir).map_err(io("list", &mdir))? {
        let name = e.map_err(io("list", &mdir))?.file_name();
        if let Some(n) = name.to_str().filter(|n| n.ends_with(".manifest")) {
            if newest.as_deref().is_none_or(|m: &str| n > m) {
                newest = Some(n.to_string());
            }
        }
    }
    Ok(newest)
}

/// Link every file of `src` into `dst` (created), recursing into
/// directories, skipping `skip` at the top and staging names (`#`).
/// `Ok(false)`: a listed file vanished before it was linked.
fn link_tree(src: &Path, dst: &Path, skip: &[&str]) -> Result<bool, SnapshotError> {
    std::fs::create_dir_all(dst).map_err(io("create", dst))?;
    for e in std::fs::read_dir(src).map_err(io("list", src))? {
        let e = e.map_err(io("list", src))?;
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        if skip.contains(&n) || n.contains('#') {
            continue;
        }
        let (from, to) = (e.path(), dst.join(&name));
        let kind = match e.file_type() {
            Ok(k) => k,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(io("stat", &from)(err)),
        };
        if kind.is_dir() {
            if !link_tree(&from, &to, &[])? {
                return Ok(false);
            }
        } else if kind.is_file() {
            match std::fs::hard_link(&from, &to) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
                    return Err(SnapshotError::CrossDevice(dst.to_path_buf()))
                }
                Err(err) => return Err(io("link", &to)(err)),
            }
        }
    }
    sync_dir(dst)?;
    Ok(true)
}

/// Link the segments of `src` below `below` into `dst/segments`.
fn link_segments(src: &Path, dst: &Path, below: u64) -> Result<(), SnapshotError> {
    let (from, to) = (src.join(segment::DIR_NAME), dst.join(segment::DIR_NAME));
    std::fs::create_dir_all(&to).map_err(io("create", &to))?;
    for (id, _) in segment::list(&from).map_err(io("list", &from))? {
        if id < below {
            let name = segment::file_name(id);
            match std::fs::hard_link(from.join(&name), to.join(&name)) {
                // Emptied by a commit before the consistency point and
                // deleted since by the reclaimer: nothing here refers to it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other.map_err(io("link", &to))?,
            }
        }
    }
    sync_dir(&to)
}

/// Remove `path` and everything under it, if it exists.
/// A volume's snapshot commands, one at a time (see the module
/// documentation): a `flock` of its snapshots directory, released on drop.
pub struct Serial {
    _dir: std::fs::File,
}

/// Lock the snapshots directory `sdir` (created if missing), exclusively
/// or shared, waiting at most `wait` for a command that holds it.
pub(super) fn serial(
    sdir: &Path,
    exclusive: bool,
    wait: Duration,
) -> Result<Serial, SnapshotError> {
    std::fs::create_dir_all(sdir).map_err(io("create", sdir))?;
    let dir = std::fs::File::open(sdir).map_err(io("open", sdir))?;
    let how = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    let deadline = Instant::now() + wait;
    loop {
        if try_flock(&dir, how).map_err(io("lock", sdir))? {
            return Ok(Serial { _dir: dir });
        }
        if Instant::now() >= deadline {
            return Err(SnapshotError::Busy(sdir.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `flock(how)` of `f` without waiting: `false` when another open file
/// holds a conflicting lock.
fn try_flock(f: &std::fs::File, how: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock only reads its integer arguments; the fd is open while
    // `f` is.
    if unsafe { libc::flock(f.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn remove_tree(path: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Remove what an interrupted snapshot left in the volume at `dir`, unless
/// a snapshot command runs on it now. Only the process that holds the
/// volume open may run this.
pub fn remove_leftovers(dir: &Path) -> Result<(), SnapshotError> {
    let sdir = dir.join(SNAPSHOTS_DIR);
    if !sdir.exists() {
        return Ok(());
    }
    // A command running now owns what it staged: leave it, for the next
    // open.
    let _serial = match serial(&sdir, true, Duration::ZERO) {
        Ok(s) => s,
        Err(SnapshotError::Busy(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let entries = match std::fs::read_dir(&sdir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("list", &sdir)(e)),
    };
    for e in entries {
        let e = e.map_err(io("list", &sdir))?;
        if e.file_name().to_str().is_some_and(|n| n.starts_with('.')) {
            remove_tree(&e.path())?;
        }
    }
    Ok(())
}

/// A test seam for the crash test: with `POHMELFS_TEST_SNAPSHOT_PAUSE`
/// set to a path (debug builds only), a snapshot that has linked
/// everything writes that file and waits there for its `kill -9`.
pub(super) fn pause_for_crash_test() {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os("POHMELFS_TEST_SNAPSHOT_PAUSE") {
        let _ = std::fs::write(&path, b"linked\n");
        loop {
            std::thread::park();
        }
    }
}

impl SlateStore {
    /// Take snapshot `name` of this (`file://`) volume: see the module
    /// documentation for the consistency point. Commits wait while it
    /// links.
    pub fn take_snapshot(&self, name: &str) -> Result<PathBuf, SnapshotError> {
        let segs = self.segments.as_ref().ok_or(SnapshotError::NotSupported)?;
        let dir = segs
            .dir()
            .parent()
            .ok_or_else(|| SnapshotError::BadUrl(self.describe.clone()))?
            .to_path_buf();
        let target = snapshot_dir(&dir, name)?;
        let _serial = serial(&dir.join(SNAPSHOTS_DIR), true, BUSY_WAIT)?;
        if target.exists() {
            return Err(SnapshotError::Exists(name.to_string()));
        }
        let tmp = dir.join(SNAPSHOTS_DIR).join(format!(".tmp-{name}"));
        let rt = self.rt().map_err(SnapshotError::Checkpoint)?;
        rt.block_on(async {
            let _serial = self.commit_lock.lock().await;
            // Every acknowledged commit in the engine, then checkpointed.
            self.await_applied()
                .await
                .map_err(SnapshotError::Checkpoint)?;
            if let Some(cp) = &self.checkpoint {
                cp.run().await.map_err(SnapshotError::Checkpoint)?;
            }
            self.db
                .flush()
                .await
                .map_err(|e| SnapshotError::Checkpoint(map_engine_error(e)))?;
            let below = segs
                .seal()
                .map_err(io("seal the active segment", segs.dir()))?;
            for _ in 0..LINK_ATTEMPTS {
                remove_tree(&tmp)?;
                let before = newest_manifest(&dir)?;
                if !link_tree(&dir, &tmp, &NOT_LINKED)? {
                    continue;
                }
                link_segments(&dir, &tmp, below)?;
                if newest_manifest(&dir)? == before {
                    return Ok(());
                }
            }
            Err(SnapshotError::Unsettled)
        })?;
        let marker = format!(
            "snapshot of {}\ncreated {}\n",
            self.describe,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        );
        let mpath = tmp.join(MARKER_FILE);
        std::fs::write(&mpath, marker).map_err(io("write", &mpath))?;
        sync_dir(&tmp)?;
        pause_for_crash_test();
        std::fs::rename(&tmp, &target).map_err(io("rename into place", &target))?;
        sync_dir(&dir.join(SNAPSHOTS_DIR))?;
        tracing::info!(volume = %self.describe, snapshot = name, "snapshot taken");
        Ok(target)
    }
}

/// The snapshots of the volume in `dir`, by name, with their marker text.
pub fn list(dir: &Path) -> Result<Vec<(String, String)>, SnapshotError> {
    let sdir = dir.join(SNAPSHOTS_DIR);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&sdir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("list", &sdir)(e)),
    };
    for e in entries {
        let e = e.map_err(io("list", &sdir))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if check_name(&name).is_err() || !is_snapshot(&e.path()) {
            continue;
        }
        let mpath = e.path().join(MARKER_FILE);
        let text = std::fs::read_to_string(&mpath).map_err(io("read", &mpath))?;
        out.push((name, text));
    }
    out.sort();
    Ok(out)
}

/// Delete snapshot `name` of the volume in `dir`: renamed aside first, so
/// a crash never leaves half a snapshot under its name.
pub fn delete(dir: &Path, name: &str) -> Result<(), SnapshotError> {
    let target = snapshot_dir(dir, name)?;
    if !is_snapshot(&target) {
        return Err(SnapshotError::NoSuchSnapshot(name.to_string()));
    }
    let _serial = serial(&dir.join(SNAPSHOTS_DIR), true, BUSY_WAIT)?;
    // Gone while this waited: deleted by another command.
    if !is_snapshot(&target) {
        return Err(SnapshotError::NoSuchSnapshot(name.to_string()));
    }
    let aside = dir.join(SNAPSHOTS_DIR).join(format!(".deleting-{name}"));
    remove_tree(&aside)?;
    std::fs::rename(&target, &aside).map_err(io("rename aside", &target))?;
    sync_dir(&dir.join(SNAPSHOTS_DIR))?;
    remove_tree(&aside)
}

/// Make `dst` a new writable volume sharing every file of the snapshot in
/// `snap` (both local directories on one filesystem). It writes no data:
/// its only new file is the marker [`CLONE_FILE`], and its first open
/// draws its own volume id.
pub fn clone_from(snap: &Path, dst: &Path) -> Result<(), SnapshotError> {
    if !is_snapshot(snap) {
        return Err(SnapshotError::NoSuchSnapshot(snap.display().to_string()));
    }
    let sdir = snap
        .parent()
        .ok_or_else(|| SnapshotError::BadUrl(snap.display().to_string()))?;
    let _serial = serial(sdir, false, BUSY_WAIT)?;
    if !is_snapshot(snap) {
        return Err(SnapshotError::NoSuchSnapshot(snap.display().to_string()));
    }
    if let Ok(mut entries) = std::fs::read_dir(dst) {
        if entries.next().is_some() {
            return Err(SnapshotError::DestinationExists(dst.to_path_buf()));
        }
    }
    let (Some(parent), Some(base)) = (dst.parent(), dst.file_name()) else {
        return Err(SnapshotError::BadUrl(dst.display().to_string()));
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(base);
    tmp_name.push(".clone-tmp");
    let tmp = parent.join(tmp_name);
    remove_tree(&tmp)?;
    if !link_tree(
        snap,
        &tmp,
        &[
            MARKER_FILE,
            super::holder::HOLDER,
            super::holder::HOLDER_LOCK,
        ],
    )? {
        return Err(SnapshotError::NoSuchSnapshot(snap.display().to_string()));
    }
    let marker = tmp.join(CLONE_FILE);
    std::fs::write(&marker, format!("clone of {}\n", snap.display()))
        .map_err(io("write", &marker))?;
    sync_dir(&tmp)?;
    // An empty destination directory may exist (created by hand).
    if dst.exists() {
        std::fs::remove_dir(dst).map_err(io("replace", dst))?;
    }
    std::fs::rename(&tmp, dst).map_err(io("rename into place", dst))?;
    sync_dir(parent)
}

/// Remove a clone's marker once its first open has written its own
/// volume id.
pub fn remove_clone_marker(marker: &Path) -> std::io::Result<()> {
    std::fs::remove_file(marker)?;
    match marker.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Whether another process holds the volume in `dir` open for writing
/// (its commit log's `flock`): then a snapshot must go through it.
pub fn held(dir: &Path) -> Result<bool, SnapshotError> {
    let path = dir.join("log").join("commit.log");
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("open", &path)(e)),
    };
    // Dropping the file releases the probe's lock.
    let got = try_flock(&f, libc::LOCK_SH).map_err(io("lock", &path))?;
    Ok(!got)
}
