//! What a volume says about itself outside the engine: whether it exists,
//! the settings `pohmelfs format` gave it, and who holds it for writing.
//!
//! Three objects beside SlateDB's, in the same object store (the volume
//! directory of `file://`, the prefix of `s3://`):
//!
//! * `manifest/…` — SlateDB's manifests: a volume exists once one does
//!   (`pohmelfs format` wrote it, or a store server started with
//!   `--create-volumes` at a client's first open). Nothing else creates
//!   one: an open that finds none refuses, so a typo in a URL never makes
//!   a new empty volume.
//! * `volume.settings` — `capacity_bytes=N` lines written by `format`; a
//!   URL's own `capacity=` overrides them.
//! * `volume.holder` — the writer holding the volume: `host`, `pid`,
//!   `since` (unix seconds), `renewed` (unix seconds), `open` (which open
//!   of that process) and, for a migration's destination that opened it
//!   ahead of the guest's state, `standby=1`; renewed every [`RENEW_SECS`]
//!   while it is open and removed at a clean close. An opener that finds
//!   a live holder refuses, naming it, unless told to take the volume
//!   over or the holder is on standby (and the opener is not). Live
//!   means: on this host, a process with that pid exists and started no
//!   later than the record's `since` (a crashed holder is seen at once,
//!   also when its pid was reused since); on another host, the record was
//!   renewed within [`LEASE_SECS`].
//!
//! A taker's claim and the holder's renewal never interleave: the renewal
//! reads the record, checks it is still its own and writes it back as one
//! step ([`renew`]), under an exclusive `flock` of `volume.holder.lock` on
//! `file://` (which every write of the record takes) and as a conditional
//! put (If-Match the record it read) on `s3://`. Otherwise a renewal could
//! write over a takeover it had not seen, and the fenced instance would
//! go on naming itself the holder.
//!
//! The record is advisory: what keeps two writers from both committing is
//! SlateDB's writer epoch and the commit log's lock, which fence the older
//! writer whatever this record says. The record only lets the second one
//! say whom it would cut off. This module never touches the engine.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutPayload, UpdateVersion};
use std::os::fd::AsRawFd as _;
use std::path::Path;

/// How often an open volume renews its holder record.
pub const RENEW_SECS: u64 = 10;

/// [`RENEW_SECS`]; shorter in tests, which watch renewals happen.
pub fn renew_period() -> std::time::Duration {
    if cfg!(test) {
        std::time::Duration::from_millis(20)
    } else {
        std::time::Duration::from_secs(RENEW_SECS)
    }
}
/// A record from another host not renewed for this long is stale.
pub const LEASE_SECS: u64 = 3 * RENEW_SECS;

/// The holder record's object, beside the engine's files (never copied into a
/// snapshot or clone: the copy has no holder until it is opened).
pub(crate) const HOLDER: &str = "volume.holder";
/// The file `flock`ed around every write of the record on `file://`
/// (never linked into a snapshot or clone either: a shared inode would
/// share the lock).
pub(crate) const HOLDER_LOCK: &str = "volume.holder.lock";
const SETTINGS: &str = "volume.settings";
/// The longest a write of the record waits for its lock: a holder keeps it
/// for one read and one write.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How many times a renewal on `s3://` starts over after its conditional
/// put lost to another write.
const RENEW_TRIES: usize = 5;

/// Who holds a volume for writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Unix seconds when it opened the volume.
    pub since: u64,
    /// Unix seconds when it last renewed the record.
    pub renewed: u64,
    /// A migration's destination that opened the volume ahead of the
    /// guest's state (`docs/migration.md`): any writable open that is
    /// not itself on standby takes the volume over from it.
    pub standby: bool,
    /// Tells this open from another of the same process in the same
    /// second: the clock's nanoseconds at the open (0 in the records of
    /// builds before it).
    pub open_id: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host {} pid {} since {}",
            self.host,
            self.pid,
            utc(self.since)
        )
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This host's name (the kernel's), or `unknown`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Holder {
    /// This process, holding from now.
    pub fn this_process() -> Holder {
        let now = now_secs();
        Holder {
            host: host_name(),
            pid: std::process::id(),
            since: now,
            renewed: now,
            standby: false,
            open_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        }
    }

    pub(crate) fn encode(&self) -> String {
        let standby = if self.standby { "standby=1\n" } else { "" };
        format!(
            "host={}\npid={}\nsince={}\nrenewed={}\nopen={}\n{standby}",
            self.host, self.pid, self.since, self.renewed, self.open_id
        )
    }

    /// Whether `other` is the same open (host, pid, since and open id
    /// agree).
    pub fn same_holder(&self, other: &Holder) -> bool {
        self.host == other.host
            && self.pid == other.pid
            && self.since == other.since
            && self.open_id == other.open_id
    }

    /// The record, or `None` when it is not one (treated as no holder).
    pub fn parse(text: &str) -> Option<Holder> {
        let mut h = Holder {
            host: String::new(),
            pid: 0,
            since: 0,
            renewed: 0,
            standby: false,
            open_id: 0,
        };
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "host" => h.host = v.to_owned(),
                "pid" => h.pid = v.parse().ok()?,
                "since" => h.since = v.parse().ok()?,
                "renewed" => h.renewed = v.parse().ok()?,
                "standby" => h.standby = v == "1",
                "open" => h.open_id = v.parse().ok()?,
                _ => {}
            }
        }
        (!h.host.is_empty() && h.pid != 0).then_some(h)
    }

    /// Whether the holder may still be writing: see the module doc.
    pub fn is_live(&self, my_host: &str, now: u64) -> bool {
        if self.host == my_host {
            if self.pid == std::process::id() {
                // This process: an earlier open of its own (tests), or a
                // record left by a former process with our pid.
                return false;
            }
            return process_runs(self.pid) && !started_after(self.pid, self.since);
        }
        now.saturating_sub(self.renewed) < LEASE_SECS
    }
}

/// Slack on comparing a process's start with a record's `since`: both are
/// whole seconds, off clocks that round differently.
const START_SLACK_SECS: u64 = 2;

/// Whether process `pid` started after `since` (unix seconds, give or take
/// [`START_SLACK_SECS`]): it cannot have written a record made then, so
/// its pid is a crashed holder's, reused (pids wrap at 32768 on many
/// hosts). `false` when the start cannot be read: a holder is never taken
/// for gone on a guess.
fn started_after(pid: u32, since: u64) -> bool {
    process_start_secs(pid).is_some_and(|start| start > since.saturating_add(START_SLACK_SECS))
}

/// When process `pid` started, in unix seconds: its start in clock ticks
/// after boot (`/proc/PID/stat`, field 22) plus the boot time
/// (`/proc/stat`, `btime`, which follows the wall clock's steps).
fn process_start_secs(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, the 20th after the command name.
    let ticks: u64 = fields_after_name(&stat)?.nth(19)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(boot + ticks / hz)
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be
/// reaped), read from `/proc`: a file read is all a store server's seccomp
/// filter allows once it runs (no `kill(pid, 0)`). Without `/proc` the
/// holder counts as running.
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name.
        Ok(stat) => fields_after_name(&stat)
            .and_then(|mut fields| fields.next())
            .is_some_and(|state| state != "Z"),
        Err(_) => !std::path::Path::new("/proc/self/stat").exists(),
    }
}

/// The fields of a `/proc/PID/stat` line after the command name (field 2,
/// in parentheses, which may itself hold spaces or parentheses): field 3
/// first.
fn fields_after_name(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    let end = stat.rfind(')')?;
    Some(stat[end + 1..].split_whitespace())
}

fn child(db_path: &str, name: &str) -> ObjectPath {
    ObjectPath::from(db_path).join(name)
}

/// Where the holder record of the `file://` volume at `url` is, for a
/// cheap look (a `stat`) at whether anyone holds it; `None` for other
/// stores and URLs that name no volume directory.
pub fn record_file(url: &str) -> Option<std::path::PathBuf> {
    let cfg = super::config::parse_with(url, false).ok()?;
    cfg.local_dir.map(|dir| dir.join(HOLDER))
}

/// Whether a volume exists at `db_path`: SlateDB wrote a manifest there.
pub async fn exists(store: &dyn ObjectStore, db_path: &str) -> object_store::Result<bool> {
    let manifests = child(db_path, "manifest");
    let listed = store.list_with_delimiter(Some(&manifests)).await?;
    Ok(!listed.objects.is_empty())
}

/// The most bytes of a small object this module and its neighbours read
/// whole (holder record, settings, lineage, registrations, the snapshot
/// lock): each is a few hundred bytes; a larger one is refused before it
/// is read, whoever could write the bucket or directory.
pub const SMALL_OBJECT_MAX: u64 = 1 << 20;

/// The body of a small object, refused when it is over
/// [`SMALL_OBJECT_MAX`].
pub(super) async fn small_body(got: object_store::GetResult) -> object_store::Result<bytes::Bytes> {
    if got.meta.size > SMALL_OBJECT_MAX {
        return Err(object_store::Error::Generic {
            store: "pohmelfs",
            source: format!(
                "{}: {} bytes, more than the {SMALL_OBJECT_MAX} such a record may have",
                got.meta.location, got.meta.size
            )
            .into(),
        });
    }
    got.bytes().await
}

async fn read(store: &dyn ObjectStore, path: &ObjectPath) -> object_store::Result<Option<String>> {
    match store.get(path).await {
        Ok(got) => {
            let bytes = small_body(got).await?;
            Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The holder record, if there is one that parses.
pub async fn read_holder(
    store: &dyn ObjectStore,
    db_path: &str,
) -> object_store::Result<Option<Holder>> {
    Ok(read(store, &child(db_path, HOLDER))
        .await?
        .as_deref()
        .and_then(Holder::parse))
}

/// The exclusive `flock` of [`HOLDER_LOCK`] in a `file://` volume's
/// directory, released on drop; nothing elsewhere.
pub(super) struct RecordLock {
    _file: Option<std::fs::File>,
}

impl RecordLock {
    /// No lock (a store that has none, or a caller that needs none).
    pub(super) fn none() -> RecordLock {
        RecordLock { _file: None }
    }

    /// Take the lock of the volume at `local_dir` (`None`: not `file://`),
    /// waiting at most [`LOCK_WAIT`].
    pub(super) async fn take(local_dir: Option<&Path>) -> object_store::Result<RecordLock> {
        let Some(dir) = local_dir else {
            return Ok(RecordLock { _file: None });
        };
        let path = dir.join(HOLDER_LOCK);
        let failed = |e: std::io::Error| lock_error(&path, e);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(failed)?;
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock only reads its integer arguments; the fd is open.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(RecordLock { _file: Some(file) });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(failed(e));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(failed(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("held by another writer for over {LOCK_WAIT:?}"),
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

fn lock_error(path: &Path, e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("lock {}: {e}", path.display()).into(),
    }
}

/// Write `holder` as the volume's holder record, whatever record is there
/// (a claim). `local_dir`: the volume's directory on `file://`.
pub async fn write_holder(
    store: &dyn ObjectStore,
    db_path: &str,
    local_dir: Option<&Path>,
    holder: &Holder,
) -> object_store::Result<()> {
    let _lock = RecordLock::take(local_dir).await?;
    put_holder(store, db_path, holder, PutMode::Overwrite).await
}

async fn put_holder(
    store: &dyn ObjectStore,
    db_path: &str,
    holder: &Holder,
    mode: PutMode,
) -> object_store::Result<()> {
    store
        .put_opts(
            &child(db_path, HOLDER),
            PutPayload::from(holder.encode().into_bytes()),
            mode.into(),
        )
        .await
        .map(|_| ())
}

/// What [`renew`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The record was this holder's (or gone) and is renewed.
    Renewed,
    /// Another opener's record replaced it: left as it is.
    TakenOver(Holder),
    /// The record is gone on `file://`, where only a release removes it,
    /// under the record's lock: another opener took the volume and let it
    /// go since. Left absent (written again, it would make a fenced
    /// instance look like the volume's holder).
    Gone,
}

/// Write `record` renewed now, unless another opener's record replaced
/// it; the check and the write are one step against a claim (see the
/// module documentation). An unreadable record is written again, and so
/// is a missing one on `s3://` (a release there may delete a claim that
/// landed between its check and its delete); a missing one on `file://`
/// is [`Renewal::Gone`].
pub async fn renew(
    store: &dyn ObjectStore,
    db_path: &str,
    local_dir: Option<&Path>,
    record: &mut Holder,
) -> object_store::Result<Renewal> {
    let path = child(db_path, HOLDER);
    for _ in 0..RENEW_TRIES {
        let _lock = RecordLock::take(local_dir).await?;
        let (found, version) = match store.get(&path).await {
            Ok(got) => {
                let version = UpdateVersion {
                    e_tag: got.meta.e_tag.clone(),
                    version: got.meta.version.clone(),
                };
                let bytes = small_body(got).await?;
                (
                    Holder::parse(&String::from_utf8_lossy(&bytes)),
                    Some(version),
                )
            }
            Err(object_store::Error::NotFound { .. }) if local_dir.is_some() => {
                return Ok(Renewal::Gone)
            }
            Err(object_store::Error::NotFound { .. }) => (None, None),
            Err(e) => return Err(e),
        };
        if let Some(h) = found.filter(|h| !h.same_holder(record)) {
            return Ok(Renewal::TakenOver(h));
        }
        record.renewed = now_secs();
        // file://: the lock orders this write after any claim, which
        // LocalFileSystem's put could not (it has no If-Match).
        let mode = match version {
            _ if local_dir.is_some() => PutMode::Overwrite,
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        match put_holder(store, db_path, record, mode).await {
            Ok(()) => return Ok(Renewal::Renewed),
            // Another write came between the read and this one: read again.
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(object_store::Error::Generic {
        store: "holder",
        source: format!("the record kept changing under {RENEW_TRIES} renewals").into(),
    })
}

/// Remove the holder record if it is still `holder`'s (a taker-over's
/// record is left alone; on `s3://`, which has no conditional delete, a
/// claim landing between the check and the delete loses its record until
/// the taker's next renewal writes it again).
pub async fn release(
    store: &dyn ObjectStore,
    db_path: &str,
    local_dir: Option<&Path>,
    holder: &Holder,
) -> object_store::Result<()> {
    let _lock = RecordLock::take(local_dir).await?;
    match read_holder(store, db_path).await? {
        Some(h) if h.same_holder(holder) => match store.delete(&child(db_path, HOLDER)).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        },
        _ => Ok(()),
    }
}

/// The capacity `format` recorded, if any.
pub async fn read_capacity(
    store: &dyn ObjectStore,
    db_path: &str,
) -> object_store::Result<Option<u64>> {
    let text = read(store, &child(db_path, SETTINGS)).await?;
    Ok(text.as_deref().and_then(|t| {
        t.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| *k == "capacity_bytes")
            .and_then(|(_, v)| v.parse().ok())
    }))
}

/// Record the volume's capacity (`format --capacity`).
pub async fn write_capacity(
    store: &dyn ObjectStore,
    db_path: &str,
    bytes: u64,
) -> object_store::Result<()> {
    store
        .put(
            &child(db_path, SETTINGS),
            PutPayload::from(format!("capacity_bytes={bytes}\n").into_bytes()),
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back() {
        let mut h = Holder {
            host: "h1".into(),
            pid: 42,
            since: 1_700_000_000,
            renewed: 1_700_000_010,
            standby: false,
            open_id: 7,
        };
        assert_eq!(Holder::parse(&h.encode()), Some(h.clone()));
        assert!(!h.encode().contains("standby"), "{}", h.encode());
        h.standby = true;
        assert_eq!(Holder::parse(&h.encode()), Some(h));
        assert_eq!(Holder::parse("garbage"), None);
    }

    /// A record far larger than any real one is refused before it is
    /// read, not read whole (each lease renewal reads the record again).
    #[test]
    fn an_oversized_record_is_refused_unread() {
        let store = object_store::memory::InMemory::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let huge = vec![b'x'; SMALL_OBJECT_MAX as usize + 1];
        rt.block_on(store.put(&child("v", HOLDER), PutPayload::from(huge)))
            .unwrap();
        let e = rt.block_on(read_holder(&store, "v")).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let fits = Holder::this_process().encode().into_bytes();
        rt.block_on(store.put(&child("v", HOLDER), PutPayload::from(fits)))
            .unwrap();
        assert!(rt.block_on(read_holder(&store, "v")).unwrap().is_some());
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn liveness_follows_the_pid_here_and_the_lease_elsewhere() {
        let me = host_name();
        let now = now_secs();
        let mut h = Holder {
            host: me.clone(),
            pid: 1, // init: always there
            since: now,
            renewed: 0,
            standby: false,
            open_id: 0,
        };
        assert!(h.is_live(&me, now), "a running process holds it");
        h.pid = std::process::id();
        assert!(!h.is_live(&me, now), "this process's own record is stale");
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        h.pid = exited.id();
        let zombie = pohmelfs_testkit::wait_until(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(5),
            || (!process_runs(h.pid)).then_some(()),
        );
        assert!(zombie.is_some(), "the child did not exit");
        assert!(!h.is_live(&me, now), "an exited process holds nothing");
        exited.wait().unwrap();
        h.host = "elsewhere".into();
        h.renewed = now - 1;
        assert!(h.is_live(&me, now), "renewed a second ago");
        h.renewed = now - LEASE_SECS;
        assert!(!h.is_live(&me, now), "lease run out");
    }

    #[test]
    fn a_reused_pid_holds_nothing() {
        let me = host_name();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let now = now_secs();
        let mut h = Holder {
            host: me.clone(),
            pid: child.id(),
            since: now,
            renewed: now,
            standby: false,
            open_id: 0,
        };
        assert!(h.is_live(&me, now), "the process that wrote the record");
        let start = process_start_secs(child.id()).unwrap();
        assert!(start.abs_diff(now) <= START_SLACK_SECS, "{start} vs {now}");
        // The record was written a minute before this process started: a
        // crashed holder's, whose pid came round again.
        h.since = now - 60;
        let reused = h.is_live(&me, now);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!reused, "a process started after its record holds nothing");
    }

    /// A claim racing a renewal, many times over: afterwards the record is
    /// the taker's and the next renewal says so, on `file://` (the lock)
    /// and on a store with conditional puts (If-Match).
    fn a_claim_is_never_renewed_over(store: std::sync::Arc<dyn ObjectStore>, local: Option<&Path>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let old = Holder {
            host: "old".into(),
            ..Holder::this_process()
        };
        let taker = Holder {
            host: "taker".into(),
            ..Holder::this_process()
        };
        let local = local.map(Path::to_path_buf);
        rt.block_on(async {
            for round in 0..200 {
                write_holder(&*store, "", local.as_deref(), &old)
                    .await
                    .unwrap();
                let (s, l, mut o) = (store.clone(), local.clone(), old.clone());
                let renewal =
                    tokio::spawn(async move { renew(&*s, "", l.as_deref(), &mut o).await });
                let (s, l, t) = (store.clone(), local.clone(), taker.clone());
                let claim =
                    tokio::spawn(async move { write_holder(&*s, "", l.as_deref(), &t).await });
                renewal.await.unwrap().unwrap();
                claim.await.unwrap().unwrap();
                let next = renew(&*store, "", local.as_deref(), &mut old.clone()).await;
                assert_eq!(
                    next.unwrap(),
                    Renewal::TakenOver(taker.clone()),
                    "round {round}: the renewal wrote over the claim"
                );
            }
        });
    }

    /// A record gone on `file://` (another opener took the volume and let
    /// it go) is not written again by the old holder's renewal; on a store
    /// like `s3://`, where a release may delete a claim that raced it, it is.
    #[test]
    fn a_record_gone_on_file_is_not_renewed_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let mut me = Holder::this_process();
        let renewed = rt.block_on(renew(&fs, "", Some(dir.path()), &mut me));
        assert_eq!(renewed.unwrap(), Renewal::Gone);
        assert!(rt.block_on(read_holder(&fs, "")).unwrap().is_none());
        let mem = object_store::memory::InMemory::new();
        let renewed = rt.block_on(renew(&mem, "", None, &mut me));
        assert_eq!(renewed.unwrap(), Renewal::Renewed);
        assert!(rt.block_on(read_holder(&mem, "")).unwrap().is_some());
    }

    #[test]
    fn a_claim_is_never_renewed_over_on_file() {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        a_claim_is_never_renewed_over(std::sync::Arc::new(fs), Some(dir.path()));
    }

    #[test]
    fn a_claim_is_never_renewed_over_with_conditional_puts() {
        let mem = object_store::memory::InMemory::new();
        a_claim_is_never_renewed_over(std::sync::Arc::new(mem), None);
    }
}
