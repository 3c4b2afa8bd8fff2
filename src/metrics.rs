//! Every counter the daemon keeps, in one place, each with the line that
//! says what it counts, and the gauges and histograms beside them
//! ([`Levels`]). Counters only go up. They are read by the log line at the
//! end of each frontend session (`Metrics::summary`) and through
//! `crate::control`: the control socket answers `pohmelfs status` with every
//! value and its doc line, and serves the Prometheus text format
//! (`Metrics::prometheus`), as does the optional HTTP endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])+ $name:ident ),* $(,)?) => {
        /// The daemon's counters, gauges and histograms.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])+ pub $name: Counter, )*
            /// Gauges and histograms.
            pub levels: Levels,
        }

        impl Metrics {
            /// `(name, value, doc)` of every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64, &'static str)> {
                vec![ $( (stringify!($name), self.$name.get(), concat!($($doc),+).trim()) ),* ]
            }
        }
    };
}

counters! {
    /// Frontend (VMM) connections accepted on the vhost-user socket.
    connections,
    /// Descriptor chains taken from the request and hiprio queues.
    chains,
    /// Requests served on the queue thread instead of the worker pool
    /// (what does not wait for the write-back layer; on a remote volume,
    /// only what it answers from memory: `Requests::is_cheap`).
    requests_inline,
    /// Descriptor chains that could not be mapped (bad addresses or lengths).
    chains_malformed,
    /// FUSE requests that fuse-backend-rs could not decode or answer.
    fuse_decode_errors,
    /// FUSE requests whose handler panicked (answered EIO; each one is
    /// also logged, through the per-call-site limit).
    request_panics,
    /// FUSE requests the device refused before decoding: lengths that
    /// disagree with the chain, oversized chains, short arguments, names
    /// without a NUL (answered EINVAL or EPROTO where a reply fits).
    requests_rejected,
    /// FUSE requests answered ENOSYS by the device for an opcode the daemon
    /// does not serve (IOCTL, POLL, BMAP, DAX mappings, locks, unknown).
    requests_unsupported,
    /// Log lines about guest requests held back by the per-call-site limit
    /// (`src/ratelimit.rs`).
    log_lines_suppressed,
    /// Filesystem operations answered with an errno.
    fs_errors,
    /// Filesystem operations that failed for a reason other than a routine
    /// POSIX answer (store failures, EIO); each one is also logged.
    fs_internal_errors,
    /// Bytes of file data the guest wrote.
    bytes_written,
    /// Bytes of file data the guest read.
    bytes_read,
    /// Store transactions committed.
    store_commits,
    /// Transactions formed by the transaction layer (data and metadata).
    txn_formed,
    /// Metadata changes that joined a queued, unsent transaction instead
    /// of forming one (group commit in the daemon).
    txn_joined,
    /// Times the transaction sender woke to choose what goes (told to, or
    /// at the end of a linger or backoff it was waiting for).
    sender_wakes,
    /// Times a change woke the transaction sender (one that may go now,
    /// an ack with more to send, a sync); a change that may go only after
    /// the sender's own next wake does not.
    sender_nudges,
    /// Attempts at sending a transaction (first sends and resends).
    txn_sent,
    /// Transactions acknowledged durable.
    txn_acked,
    /// Resends after a timeout, an error or a store epoch change.
    txn_resent,
    /// Moves of a transaction to the next store server.
    txn_failovers,
    /// Attempts the store refused for lack of space: the transaction's page
    /// data is dropped and its inodes' next fsync reports ENOSPC.
    txn_no_space,
    /// Metadata transactions refused because they could never be sent (too
    /// many operations or bytes for one wire frame); the request that made
    /// each fails with EIO.
    txn_oversized,
    /// Write-back waits (room under `--dirty-max`, an ack of pinned pages,
    /// room in the transaction queue) that gave up after `--fsync-timeout`;
    /// the request that waited fails with EIO.
    writeback_wait_timeouts,
    /// Acknowledgements that said the store had applied the transaction before.
    txn_duplicate_acks,
    /// Guest writes that waited for an in-flight transaction's ack
    /// (`--overwrite wait`).
    overwrite_waits,
    /// Guest writes to a page pinned by an in-flight transaction that gave
    /// the page a new buffer, leaving the pinned one to the transaction
    /// (`--overwrite cow`).
    overwrite_copies,
    /// Guest writes that waited because dirty and in-flight bytes reached
    /// `--dirty-max`.
    backpressure_waits,
    /// Page reads served from the daemon's cache.
    cache_hits,
    /// Page reads that went to the store.
    cache_misses,
    /// Read-ahead windows a sequential reader of a remote volume started
    /// fetching in the background (`file://` volumes are read ahead by
    /// the host kernel).
    read_ahead,
    /// Guest reads that waited for a read-ahead chunk fetching their
    /// pages (remote volumes): the window was not far enough ahead.
    read_ahead_waits,
    /// Microseconds guest reads spent waiting for read-ahead chunks.
    read_ahead_wait_us,
    /// Clean pages evicted to stay within `--cache-size`.
    cache_evictions,
    /// Blocks read from the local read cache (`--cache-dir`), intact.
    read_cache_hits,
    /// Blocks the local read cache did not hold, fetched from the store.
    read_cache_misses,
    /// Bytes of file data served from the local read cache.
    read_cache_bytes_served,
    /// Bytes of file data written into the local read cache (read from
    /// the store, or acknowledged by it).
    read_cache_bytes_stored,
    /// Blocks evicted from the local read cache to stay within
    /// `--cache-dir-size`.
    read_cache_evictions,
    /// Local read cache files that failed their check (checksum, header,
    /// missing, unreadable): dropped and fetched from the store again.
    read_cache_corrupt,
    /// fsync (and flush, fsyncdir, syncfs) requests that reached the store layer.
    fsync_calls,
    /// FLUSH requests (a close of a guest descriptor). A close does not
    /// wait for the store; under `--sync-on-close` those with data to
    /// write back wait, and also count in `fsync_calls`.
    flush_calls,
    /// fsyncs answered EIO because the data was not acknowledged in time.
    fsync_errors,
}

/// A value that goes up and down (bytes held, transactions in flight).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram with fixed bucket bounds in microseconds.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    /// One count per bound, plus one for "above the last bound".
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

/// Bucket bounds for fsync latency: 100 µs to 10 s.
pub const LATENCY_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    10_000_000,
];

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::with_bounds(LATENCY_BOUNDS_US)
    }
}

impl Histogram {
    /// A histogram with buckets up to each of `bounds_us` (ascending).
    pub fn with_bounds(bounds_us: &'static [u64]) -> Histogram {
        Histogram {
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn observe(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = self
            .bounds_us
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(self.bounds_us.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// `(upper bound in µs or None for +Inf, cumulative count)` per bucket.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut total = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                total += c.load(Ordering::Relaxed);
                (self.bounds_us.get(i).copied(), total)
            })
            .collect()
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }
}

/// Bucket bounds for one request's service time: 10 µs to 10 s.
pub const REQUEST_BOUNDS_US: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
];

/// FUSE opcodes by number (Linux `include/uapi/linux/fuse.h`); a gap is
/// a number Linux never sends.
const OPCODE_NAMES: [&str; 53] = [
    "",
    "LOOKUP",
    "FORGET",
    "GETATTR",
    "SETATTR",
    "READLINK",
    "SYMLINK",
    "",
    "MKNOD",
    "MKDIR",
    "UNLINK",
    "RMDIR",
    "RENAME",
    "LINK",
    "OPEN",
    "READ",
    "WRITE",
    "STATFS",
    "RELEASE",
    "",
    "FSYNC",
    "SETXATTR",
    "GETXATTR",
    "LISTXATTR",
    "REMOVEXATTR",
    "FLUSH",
    "INIT",
    "OPENDIR",
    "READDIR",
    "RELEASEDIR",
    "FSYNCDIR",
    "GETLK",
    "SETLK",
    "SETLKW",
    "ACCESS",
    "CREATE",
    "INTERRUPT",
    "BMAP",
    "DESTROY",
    "IOCTL",
    "POLL",
    "NOTIFY_REPLY",
    "BATCH_FORGET",
    "FALLOCATE",
    "READDIRPLUS",
    "RENAME2",
    "LSEEK",
    "COPY_FILE_RANGE",
    "SETUPMAPPING",
    "REMOVEMAPPING",
    "SYNCFS",
    "TMPFILE",
    "STATX",
];

/// Requests served per FUSE opcode, with their service time (from the
/// chain taken off the queue to the reply written), for the Prometheus
/// endpoint. Opcodes Linux does not define share one `OTHER` series.
#[derive(Debug)]
pub struct RequestStats {
    /// One histogram per entry of [`OPCODE_NAMES`], then `OTHER`.
    by_opcode: Vec<Histogram>,
}

impl Default for RequestStats {
    fn default() -> RequestStats {
        RequestStats {
            by_opcode: (0..=OPCODE_NAMES.len())
                .map(|_| Histogram::with_bounds(REQUEST_BOUNDS_US))
                .collect(),
        }
    }
}

impl RequestStats {
    fn slot(opcode: u32) -> usize {
        match OPCODE_NAMES.get(opcode as usize) {
            Some(name) if !name.is_empty() => opcode as usize,
            _ => OPCODE_NAMES.len(),
        }
    }

    /// One request of `opcode` served in `d`.
    pub fn observe(&self, opcode: u32, d: std::time::Duration) {
        self.by_opcode[Self::slot(opcode)].observe(d);
    }

    /// `(opcode name, histogram)` of every opcode served at least once.
    pub fn served(&self) -> impl Iterator<Item = (&'static str, &Histogram)> {
        self.by_opcode
            .iter()
            .enumerate()
            .filter(|(_, h)| h.count() > 0)
            .map(|(i, h)| (OPCODE_NAMES.get(i).copied().unwrap_or("OTHER"), h))
    }
}

/// The gauges and histograms, beside the counters.
#[derive(Debug, Default)]
pub struct Levels {
    /// Bytes of dirty and in-flight file data held by the daemon.
    pub dirty_bytes: Gauge,
    /// Transactions sent and not yet acknowledged.
    pub in_flight_txns: Gauge,
    /// Page bytes those transactions carry (part of `dirty_bytes`).
    pub in_flight_bytes: Gauge,
    /// Bytes of page cache held (clean and dirty).
    pub cache_bytes: Gauge,
    /// Accounted bytes of the metadata caches (attributes, names, xattrs).
    pub meta_cache_bytes: Gauge,
    /// Latency of fsync-like requests as the guest sees it.
    pub fsync_latency: Histogram,
    /// From a transaction's attempt leaving the layer to the store's
    /// acknowledgement of it (durable): the store's commit latency.
    pub commit_latency: Histogram,
    /// A data read the layer sends to the store, from asking to the bytes
    /// (a round trip on remote stores).
    pub store_read_latency: Histogram,
    /// The volume served, for the `pohmelfs_volume_info` series: set once
    /// the volume is open.
    pub volume: std::sync::OnceLock<VolumeInfo>,
    /// Requests and their service time, per FUSE opcode.
    pub requests: RequestStats,
}

/// What `pohmelfs_volume_info` names: the volume's URL (without its
/// query, which may name secret files) and id.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub url: String,
    /// Hex, or empty where the store keeps no id (`mem:`, store servers).
    pub id: String,
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metrics {
    /// The counters as one log-friendly line: `name=value name=value ...`.
    pub fn summary(&self) -> String {
        self.snapshot()
            .iter()
            .map(|(n, v, _)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Everything in the Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, value, doc) in self.snapshot() {
            out.push_str(&format!("# HELP pohmelfs_{name}_total {doc}\n# TYPE pohmelfs_{name}_total counter\npohmelfs_{name}_total {value}\n"));
        }
        let l = &self.levels;
        for (name, value, doc) in [
            (
                "dirty_bytes",
                l.dirty_bytes.get(),
                "Bytes of dirty and in-flight file data held by the daemon.",
            ),
            (
                "in_flight_txns",
                l.in_flight_txns.get(),
                "Transactions sent and not yet acknowledged.",
            ),
            (
                "in_flight_bytes",
                l.in_flight_bytes.get(),
                "Page bytes of the transactions in flight (part of dirty_bytes).",
            ),
            (
                "cache_bytes",
                l.cache_bytes.get(),
                "Bytes of page cache held.",
            ),
            (
                "meta_cache_bytes",
                l.meta_cache_bytes.get(),
                "Accounted bytes of the metadata caches (attributes, names, xattrs).",
            ),
        ] {
            out.push_str(&format!("# HELP pohmelfs_{name} {doc}\n# TYPE pohmelfs_{name} gauge\npohmelfs_{name} {value}\n"));
        }
        if let Some(rss) = resident_bytes() {
            out.push_str(&format!("# HELP pohmelfs_resident_bytes The daemon's resident memory (RSS).\n# TYPE pohmelfs_resident_bytes gauge\npohmelfs_resident_bytes {rss}\n"));
        }
        out.push_str("# HELP pohmelfs_fsync_latency_seconds Latency of fsync-like requests.\n# TYPE pohmelfs_fsync_latency_seconds histogram\n");
        render_histogram(
            &mut out,
            "pohmelfs_fsync_latency_seconds",
            "",
            &l.fsync_latency,
        );
        out.push_str("# HELP pohmelfs_commit_latency_seconds From a transaction sent to the store to its durable acknowledgement.\n# TYPE pohmelfs_commit_latency_seconds histogram\n");
        render_histogram(
            &mut out,
            "pohmelfs_commit_latency_seconds",
            "",
            &l.commit_latency,
        );
        out.push_str("# HELP pohmelfs_store_read_seconds Data reads sent to the store, from asking to the bytes (a round trip on remote stores).\n# TYPE pohmelfs_store_read_seconds histogram\n");
        render_histogram(
            &mut out,
            "pohmelfs_store_read_seconds",
            "",
            &l.store_read_latency,
        );
        if let Some(v) = l.volume.get() {
            out.push_str(&format!(
                "# HELP pohmelfs_volume_info The volume this daemon serves.\n# TYPE pohmelfs_volume_info gauge\npohmelfs_volume_info{{url=\"{}\",volume_id=\"{}\"}} 1\n",
                label_value(&v.url),
                label_value(&v.id)
            ));
        }
        out.push_str("# HELP pohmelfs_request_duration_seconds FUSE requests served and their service time, by opcode.\n# TYPE pohmelfs_request_duration_seconds histogram\n");
        for (opcode, h) in l.requests.served() {
            render_histogram(
                &mut out,
                "pohmelfs_request_duration_seconds",
                &format!("opcode=\"{opcode}\","),
                h,
            );
        }
        out
    }
}

/// `s` escaped for a Prometheus label value (backslash, quote, newline).
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `h` as the series of Prometheus histogram `name`, each with the labels
/// `labels` (empty, or `k="v",` pairs ending in a comma) first.
fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let buckets = h.cumulative();
    for (bound, count) in &buckets {
        let le = bound.map_or("+Inf".to_string(), |b| format!("{}", b as f64 / 1e6));
        out.push_str(&format!("{name}_bucket{{{labels}le=\"{le}\"}} {count}\n"));
    }
    let total = buckets.last().map_or(0, |b| b.1);
    let plain = labels.trim_end_matches(',');
    let braces = if plain.is_empty() {
        String::new()
    } else {
        format!("{{{plain}}}")
    };
    out.push_str(&format!(
        "{name}_sum{braces} {}\n{name}_count{braces} {total}\n",
        h.sum_us() as f64 / 1e6
    ));
}

/// This process's resident memory, from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_doc_line_and_counts() {
        let m = Metrics::default();
        m.chains.inc();
        m.bytes_read.add(10);
        let snap = m.snapshot();
        assert!(snap.iter().all(|(_, _, doc)| !doc.is_empty()));
        assert!(snap.contains(&(
            "chains",
            1,
            "Descriptor chains taken from the request and hiprio queues."
        )));
        assert!(m.summary().contains("bytes_read=10"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_prometheus_renders_them() {
        let m = Metrics::default();
        m.levels
            .fsync_latency
            .observe(std::time::Duration::from_micros(300));
        m.levels
            .fsync_latency
            .observe(std::time::Duration::from_secs(20));
        let c = m.levels.fsync_latency.cumulative();
        assert_eq!(c[1], (Some(250), 0));
        assert_eq!(c[2], (Some(500), 1));
        assert_eq!(c.last(), Some(&(None, 2)));
        let text = m.prometheus();
        assert!(text.contains("pohmelfs_fsync_latency_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("pohmelfs_fsync_latency_seconds_count 2"));
        assert!(text.contains("# TYPE pohmelfs_txn_acked_total counter"));
    }

    #[test]
    fn the_volume_is_named_in_an_info_series_with_escaped_labels() {
        let m = Metrics::default();
        assert!(!m.prometheus().contains("pohmelfs_volume_info"));
        m.levels
            .volume
            .set(VolumeInfo {
                url: "file:///v/a\"b".into(),
                id: "00ff".into(),
            })
            .unwrap();
        m.levels
            .commit_latency
            .observe(std::time::Duration::from_micros(700));
        let text = m.prometheus();
        assert!(
            text.contains("pohmelfs_volume_info{url=\"file:///v/a\\\"b\",volume_id=\"00ff\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pohmelfs_commit_latency_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn requests_are_rendered_by_opcode_with_unknown_ones_as_other() {
        let m = Metrics::default();
        let r = &m.levels.requests;
        r.observe(1, std::time::Duration::from_micros(20));
        r.observe(1, std::time::Duration::from_micros(700));
        r.observe(16, std::time::Duration::from_millis(3));
        r.observe(7, std::time::Duration::from_micros(5));
        r.observe(9999, std::time::Duration::from_micros(5));
        let text = m.prometheus();
        for line in [
            "pohmelfs_request_duration_seconds_bucket{opcode=\"LOOKUP\",le=\"0.000025\"} 1",
            "pohmelfs_request_duration_seconds_bucket{opcode=\"LOOKUP\",le=\"+Inf\"} 2",
            "pohmelfs_request_duration_seconds_count{opcode=\"LOOKUP\"} 2",
            "pohmelfs_request_duration_seconds_count{opcode=\"WRITE\"} 1",
            "pohmelfs_request_duration_seconds_count{opcode=\"OTHER\"} 2",
            "pohmelfs_fsync_latency_seconds_count 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("opcode=\"GETATTR\""),
            "an opcode never served is rendered"
        );
        assert!(text.contains("\npohmelfs_resident_bytes "));
    }
}
