//! What the harness reads of a running daemon: a counter in its `status`
//! answer, and the sessions its log says ended since its last start.

use std::fs;
use std::path::Path;

use super::daemon::{SESSION_ENDED, START_MARKER};

/// The value of counter `name` in a `status` answer (`name  value  doc` per line).
pub(crate) fn status_value(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(name))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// How many sessions the daemon process started last in `log` has ended.
pub(crate) fn sessions_ended(log: &Path) -> u32 {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let since_start = text.rfind(START_MARKER).map_or(&text[..], |i| &text[i..]);
    let ended = since_start
        .lines()
        .filter(|l| l.contains(SESSION_ENDED))
        .count();
    u32::try_from(ended).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::{sessions_ended, status_value, START_MARKER};

    #[test]
    fn counters_are_read_from_the_status_answer() {
        let status = "fs_errors                   3  Filesystem operations ...\n\
                      fs_internal_errors          0  Filesystem operations that failed ...\n";
        assert_eq!(status_value(status, "fs_internal_errors"), Some(0));
        assert_eq!(status_value(status, "fs_errors"), Some(3));
        assert_eq!(status_value(status, "fs"), None);
    }

    #[test]
    fn sessions_are_counted_since_the_last_start() {
        let dir = std::env::temp_dir().join(format!("pohmelfs-vm-sessions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("pohmelfs.log");
        std::fs::write(
            &log,
            format!(
                "{START_MARKER}1: serve\nINFO session ended counters=x\nINFO session ended\n\
                 {START_MARKER}2: serve\nINFO frontend connected\nINFO session ended\n"
            ),
        )
        .unwrap();
        assert_eq!(sessions_ended(&log), 1);
        assert_eq!(sessions_ended(&dir.join("missing.log")), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
