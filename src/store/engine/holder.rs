//! What a volume says about itself outside the engine: whether it exists,
//! the settings `pohmelfs format` gave it, and who holds it for writing.
//!
//! Three objects beside SlateDB's, in the same object store (the volume
//! directory of `file://`, the prefix of `s3://`):
//!
//! * `manifest/…` — SlateDB's manifests: a volume exists once one does
//!   (`pohmelfs format` wrote it). Nothing else creates one: an open that
//!   finds none refuses, so a typo in a URL never makes a new empty volume.
//! * `volume.settings` — `capacity_bytes=N` lines written by `format`; a
//!   URL's own `capacity=` overrides them.
//! * `volume.holder` — the writer holding the volume: `host`, `pid`,
//!   `since` (unix seconds) and `renewed` (unix seconds), renewed every
//!   [`RENEW_SECS`] while it is open and removed at a clean close. An
//!   opener that finds a live holder refuses, naming it, unless told to
//!   take the volume over. Live means: on this host, a process with that
//!   pid exists (a crashed holder is seen at once); on another host, the
//!   record was renewed within [`LEASE_SECS`].
//!
//! The record is advisory: what keeps two writers from both committing is
//! SlateDB's writer epoch and the commit log's lock, which fence the older
//! writer whatever this record says. The record only lets the second one
//! say whom it would cut off. This module never touches the engine.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

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
const SETTINGS: &str = "volume.settings";

/// Who holds a volume for writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Unix seconds when it opened the volume.
    pub since: u64,
    /// Unix seconds when it last renewed the record.
    pub renewed: u64,
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
        }
    }

    pub(crate) fn encode(&self) -> String {
        format!(
            "host={}\npid={}\nsince={}\nrenewed={}\n",
            self.host, self.pid, self.since, self.renewed
        )
    }

    /// Whether `other` is the same open (host, pid and since agree).
    pub fn same_holder(&self, other: &Holder) -> bool {
        self.host == other.host && self.pid == other.pid && self.since == other.since
    }

    /// The record, or `None` when it is not one (treated as no holder).
    pub fn parse(text: &str) -> Option<Holder> {
        let mut h = Holder {
            host: String::new(),
            pid: 0,
            since: 0,
            renewed: 0,
        };
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "host" => h.host = v.to_owned(),
                "pid" => h.pid = v.parse().ok()?,
                "since" => h.since = v.parse().ok()?,
                "renewed" => h.renewed = v.parse().ok()?,
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
            return process_runs(self.pid);
        }
        now.saturating_sub(self.renewed) < LEASE_SECS
    }
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be
/// reaped), read from `/proc`: a file read is all a store server's seccomp
/// filter allows once it runs (no `kill(pid, 0)`). Without `/proc` the
/// holder counts as running.
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself hold spaces or parentheses.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => !std::path::Path::new("/proc/self/stat").exists(),
    }
}

fn child(db_path: &str, name: &str) -> ObjectPath {
    ObjectPath::from(db_path).join(name)
}

/// Whether a volume exists at `db_path`: SlateDB wrote a manifest there.
pub async fn exists(store: &dyn ObjectStore, db_path: &str) -> object_store::Result<bool> {
    let manifests = child(db_path, "manifest");
    let listed = store.list_with_delimiter(Some(&manifests)).await?;
    Ok(!listed.objects.is_empty())
}

async fn read(store: &dyn ObjectStore, path: &ObjectPath) -> object_store::Result<Option<String>> {
    match store.get(path).await {
        Ok(got) => {
            let bytes = got.bytes().await?;
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

/// Write `holder` as the volume's holder record.
pub async fn write_holder(
    store: &dyn ObjectStore,
    db_path: &str,
    holder: &Holder,
) -> object_store::Result<()> {
    store
        .put(
            &child(db_path, HOLDER),
            PutPayload::from(holder.encode().into_bytes()),
        )
        .await
        .map(|_| ())
}

/// Remove the holder record if it is still `holder`'s (a taker-over's
/// record is left alone).
pub async fn release(
    store: &dyn ObjectStore,
    db_path: &str,
    holder: &Holder,
) -> object_store::Result<()> {
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
        let h = Holder {
            host: "h1".into(),
            pid: 42,
            since: 1_700_000_000,
            renewed: 1_700_000_010,
        };
        assert_eq!(Holder::parse(&h.encode()), Some(h));
        assert_eq!(Holder::parse("garbage"), None);
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
}
