//! The daemon's counters, read through its control socket's `status` answer (one
//! `name value` line per counter, as `pohmelfs::control::status_text` writes it).

use super::Daemon;

/// One counter of the daemon's `status` answer; `None` when the daemon does not answer or has
/// no such counter.
pub fn counter(daemon: &Daemon, name: &str) -> Option<u64> {
    let status = pohmelfs::control::query(daemon.socket(), "status").ok()?;
    status.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(name))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}
