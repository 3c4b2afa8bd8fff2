//! Child processes of a test: killed when their handle drops, so a failing or panicking test
//! leaves nothing running; waiting for one to become ready; the tail of their logs for failure
//! messages.

use std::fs;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use crate::{wait_until, Error, Result};

/// Lines of a log a failure message shows.
const TAIL_LINES: usize = 40;

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Kills the process now (SIGKILL, as a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// The exit status, once the process has exited on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }

    /// Polls `ready` every `interval` until it yields a value; fails when the process exits
    /// first or `timeout` passes, with the tail of its `log`. `what` names it in the error.
    pub fn wait_ready<T>(
        &mut self,
        what: &str,
        log: &Path,
        timeout: Duration,
        interval: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let outcome = wait_until(timeout, interval, || {
            if let Some(status) = self.exited() {
                return Some(Err(status));
            }
            ready().map(Ok)
        });
        match outcome {
            Some(Ok(value)) => Ok(value),
            Some(Err(status)) => Err(Error::Exited {
                what: what.to_owned(),
                status,
                log: log.to_owned(),
                tail: log_tail(log, TAIL_LINES),
            }),
            None => Err(Error::NotReady {
                what: what.to_owned(),
                timeout,
                log: log.to_owned(),
                tail: log_tail(log, TAIL_LINES),
            }),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut tail = all[start..].join("\n");
            tail.retain(|c| c != '\r');
            tail
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}
