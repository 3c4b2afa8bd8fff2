//! Every counter the daemon keeps, in one place, each with the line that
//! says what it counts. Counters only go up; they are read as a snapshot
//! (`Metrics::snapshot`) for logs and, later, the status socket.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])+ $name:ident ),* $(,)?) => {
        /// The daemon's counters.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])+ pub $name: Counter, )*
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
    /// Descriptor chains that could not be mapped (bad addresses or lengths).
    chains_malformed,
    /// FUSE requests that fuse-backend-rs could not decode or answer.
    fuse_decode_errors,
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
}
