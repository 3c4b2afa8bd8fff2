//! Where the commands' log lines go and in what form: tracing to stderr,
//! filtered by `--log-level` or, when set, `RUST_LOG` (as tracing users
//! expect). Under systemd, when stderr is the journal (`JOURNAL_STREAM`
//! names it), each line starts with its syslog priority (`<3>` error ..
//! `<7>` debug, as sd-daemon(3) describes) and carries no timestamp or
//! colours: the journal records the level and the time itself, so
//! `journalctl -p warning -u pohmelfs-serve@vm1` works.

use std::fmt;
use std::os::unix::fs::MetadataExt;

use thiserror::Error;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Error)]
pub enum LoggingError {
    #[error("log filter {0:?} is not valid")]
    Filter(String, #[source] tracing_subscriber::filter::ParseError),
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// The filter to use: `RUST_LOG` when it is set and not empty, else the
/// command's `--log-level`, each passed through `adjust` (which `serve`
/// uses to keep fuse-backend-rs's own lines off).
pub fn filter_text(flag: &str, rust_log: Option<&str>, adjust: impl Fn(&str) -> String) -> String {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        Some(env) => adjust(env),
        None => adjust(flag),
    }
}

/// Whether stderr is the journal: `JOURNAL_STREAM` is `DEV:INODE` of the
/// stream systemd connected, compared with stderr's own.
pub fn stderr_is_journal(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let (Some(v), Some((dev, ino))) = (journal_stream, stderr) else {
        return false;
    };
    let Some((d, i)) = v.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    let meta = std::fs::metadata("/proc/self/fd/2").ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Install the logger for a command whose `--log-level` is `flag`.
pub fn init(flag: &str, adjust: impl Fn(&str) -> String) -> Result<(), LoggingError> {
    let text = filter_text(flag, std::env::var("RUST_LOG").ok().as_deref(), adjust);
    let filter = tracing_subscriber::EnvFilter::try_new(&text)
        .map_err(|e| LoggingError::Filter(text.clone(), e))?;
    let journal = stderr_is_journal(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_dev_ino(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if journal {
        builder
            .with_ansi(false)
            .event_format(Priority(tracing_subscriber::fmt::format().without_time()))
            .try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
    installed.map_err(|e| LoggingError::Install(e.to_string()))
}

/// The syslog priority of a tracing level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// A line format with the syslog priority in front, for the journal.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn rust_log_wins_over_the_flag_and_is_adjusted_too() {
        let off = |f: &str| format!("{f},fuse_backend_rs=off");
        assert_eq!(filter_text("info", None, off), "info,fuse_backend_rs=off");
        assert_eq!(
            filter_text("info", Some(""), off),
            "info,fuse_backend_rs=off"
        );
        assert_eq!(
            filter_text("info", Some("pohmelfs::writeback=trace"), off),
            "pohmelfs::writeback=trace,fuse_backend_rs=off"
        );
    }

    #[test]
    fn the_journal_is_recognised_by_device_and_inode() {
        assert!(stderr_is_journal(Some("8:12345"), Some((8, 12345))));
        assert!(!stderr_is_journal(Some("8:12345"), Some((8, 12346))));
        assert!(!stderr_is_journal(Some("junk"), Some((8, 12345))));
        assert!(!stderr_is_journal(None, Some((8, 12345))));
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_start_with_their_priority() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .event_format(Priority(tracing_subscriber::fmt::format().without_time()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!("volume nearly full");
            tracing::error!("store gone");
            tracing::info!("volume open");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("<4> WARN") && lines[0].ends_with("volume nearly full"));
        assert!(lines[1].starts_with("<3>ERROR"), "{}", lines[1]);
        assert!(lines[2].starts_with("<6> INFO"), "{}", lines[2]);
    }
}
