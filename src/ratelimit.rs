//! Log hygiene for lines an outsider can cause. A guest decides how many
//! bad requests it sends, so a line per request would let it fill the
//! host's disk and drown every other line. Each call site that logs about
//! a request goes through `limited!`: at most [`LINES_PER_WINDOW`] lines
//! per [`WINDOW`] from that call site, the rest counted (in the counter the
//! call site names, `log_lines_suppressed` in practice) and reported as
//! `suppressed=K` on the next line that goes out. Fields that carry text
//! the guest or a peer shaped are wrapped in [`Capped`], so no single line
//! is longer than a few hundred bytes.
//!
//! This module must never allocate per call or block on anything but its
//! own short critical section: it runs on every rejected request.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines one call site may log per [`WINDOW`].
pub const LINES_PER_WINDOW: u32 = 5;

/// The window of the limit.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The most characters a [`Capped`] field prints.
pub const FIELD_CHARS_MAX: usize = 256;

/// A per-call-site limit of log lines. `const`-constructible, so
/// `limited!` keeps one in a `static` at each call site.
#[derive(Debug)]
pub struct LogLimit {
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current window began, in milliseconds since the first use of any limit.
    start_ms: u64,
    /// Lines let through in the current window.
    lines: u32,
    /// Lines held back since the last line let through.
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> LogLimit {
        LogLimit::new()
    }
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            state: Mutex::new(Window {
                start_ms: 0,
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines held back since the last one let through)` when a line
    /// may be logged now; `None` when it must be dropped (and is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    /// [`LogLimit::allow`] at `now_ms` milliseconds since the first use of any limit.
    pub fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let window_ms = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        if now_ms >= w.start_ms.saturating_add(window_ms) {
            w.start_ms = now_ms;
            w.lines = 0;
        }
        if w.lines < LINES_PER_WINDOW {
            w.lines += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Lines about store peers held back: the store client and server keep
/// no [`crate::metrics::Metrics`] of their own. The next line let through
/// says how many (`suppressed=K`).
pub static PEER_LINES_SUPPRESSED: StaticCounter = StaticCounter::new();

/// A counter that can live in a `static`.
#[derive(Debug, Default)]
pub struct StaticCounter(AtomicU64);

impl StaticCounter {
    pub const fn new() -> StaticCounter {
        StaticCounter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Print panic messages through a limit of their own. A guest or a peer
/// that found a panic can repeat it, and the default hook writes a message
/// (and maybe a backtrace) each time. The daemons install this at startup.
pub fn limit_panic_messages() {
    static LIMIT: LogLimit = LogLimit::new();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if LIMIT.allow().is_some() {
            default(info);
        }
    }));
}

/// The instant every [`LogLimit`] measures from: the first use.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Log an event through a limit of this call site's own:
/// `limited!(metrics.log_lines_suppressed, WARN, queue, error = %e, "message")`.
/// The line carries `suppressed = K`, the lines this call site held back
/// since its last one; each held-back line increments the counter. The
/// budget is spent and the counter kept whatever the log filter says, so
/// the counter tells how often the call site fired beyond its budget even
/// when its level is off (and does not depend on tracing's per-call-site
/// interest cache, which other threads' subscribers can change).
macro_rules! limited {
    ($counter:expr, $level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        match LIMIT.allow() {
            Some(suppressed) => ::tracing::event!(::tracing::Level::$level, suppressed, $($arg)+),
            None => $counter.inc(),
        }
    }};
}
pub(crate) use limited;

/// Displays its value cut to [`FIELD_CHARS_MAX`] characters, with `…`
/// where it was cut: for log fields whose text an outsider shaped.
pub struct Capped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Capped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut w = CapWriter {
            out: f,
            left: FIELD_CHARS_MAX,
            cut: false,
        };
        write!(w, "{}", self.0)?;
        if w.cut {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// Passes through the first `left` characters and drops the rest.
struct CapWriter<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    left: usize,
    cut: bool,
}

impl fmt::Write for CapWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.cut {
            return Ok(());
        }
        match s.char_indices().nth(self.left) {
            None => {
                self.left -= s.chars().count();
                self.out.write_str(s)
            }
            Some((end, _)) => {
                self.cut = true;
                self.left = 0;
                self.out.write_str(&s[..end])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_logs_a_bounded_number_of_lines_per_window() {
        let limit = LogLimit::new();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.allow_at(0), Some(0));
        }
        assert_eq!(limit.allow_at(1), None);
        assert_eq!(limit.allow_at(999), None);
        // The next window: the first line reports what was held back.
        assert_eq!(limit.allow_at(1000), Some(2));
        assert_eq!(limit.allow_at(1001), Some(0));
        // A quiet stretch starts a new window at the next line.
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.allow_at(50_000), Some(0));
        }
        assert_eq!(limit.allow_at(50_999), None);
    }

    #[test]
    fn capped_fields_are_cut_on_a_char_boundary() {
        let short = format!("{}", Capped("name"));
        assert_eq!(short, "name");
        let exact = "x".repeat(FIELD_CHARS_MAX);
        assert_eq!(format!("{}", Capped(&exact)), exact);
        // Multi-byte characters, written in pieces by a Display impl.
        let long = "é".repeat(FIELD_CHARS_MAX + 10);
        let shown = format!("{}", Capped(format_args!("{long}{long}")));
        assert_eq!(shown.chars().count(), FIELD_CHARS_MAX + 1);
        assert!(shown.ends_with("é…"));
    }
}
