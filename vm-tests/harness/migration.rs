//! A live migration of one guest between two QEMU processes on this host: the source boots
//! the guest against one daemon, the destination waits (`-incoming defer`, then QMP
//! `migrate-incoming unix:…`) against another, and the harness moves the guest with QMP
//! `migrate` once the source's console shows a marker line. Both sides use the return path,
//! so a destination that fails to load the guest fails the migration at the source, which
//! resumes the guest ([`Migration::refused`] expects that).
//!
//! The guest cannot tell where it runs, so it waits for a line on its second serial port
//! (`/dev/ttyS1`, a socket chardev on each QEMU): the harness writes `go` to the
//! destination's once QMP reports the migration completed (to the source's once it resumed
//! the guest after a failed one). The guest's output after that is on that side's console. QEMU processes are killed in `Drop`.
//!
//! [`Migration::back`] moves the guest once more, from the destination to a third QEMU
//! against a third daemon, at the guest's second marker; [`Migration::at_switchover`] holds
//! the first migration at QEMU's `pre-switchover` (the guest stopped at the source, its
//! device state not sent yet) while the test acts.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::daemon::Daemon;
use super::image::guest_image;
use super::initrd::write_initrd;
use super::qemu::{
    accelerator, base_command, has_line, parse_exit_status, qemu_binary, Accel, GuestOutput,
    KillOnDrop, DEFAULT_TIMEOUT, POLL_INTERVAL, PRELUDE,
};
use super::{log_tail, wait_until, Failure, Result};

/// The console line after which the harness migrates the guest.
pub const MIGRATE_MARKER: &str = "MIGRATE-NOW";
/// Bound on the migration itself, `migrate` to `completed`.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on QEMU creating its sockets, and on one QMP answer.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
const MEMORY: &str = "512M";
/// Console lines quoted in failure messages.
const TAIL_LINES: usize = 40;

/// What QMP `query-migrate` reported at the end.
pub struct Migrated {
    /// The guest's run, its console from where it ended (the destination's, or the
    /// source's after a refused migration).
    pub output: GuestOutput,
    /// Milliseconds the guest was stopped (QMP `downtime`; 0 for a refused migration).
    pub downtime_ms: u64,
    /// Milliseconds from `migrate` to completion (QMP `total-time`).
    pub total_ms: u64,
    /// The second migration's downtime ([`Migration::back`]).
    pub back_downtime_ms: Option<u64>,
}

/// One side's QEMU files and process.
struct Side {
    name: &'static str,
    console: PathBuf,
    qemu_log: PathBuf,
    qmp: PathBuf,
    serial: PathBuf,
    process: Option<KillOnDrop>,
}

impl Side {
    fn new(dir: &Path, name: &'static str) -> Side {
        Side {
            name,
            console: dir.join(format!("{name}.console.log")),
            qemu_log: dir.join(format!("{name}.qemu.log")),
            qmp: dir.join(format!("{name}.qmp")),
            serial: dir.join(format!("{name}.ttyS1")),
            process: None,
        }
    }

    fn console_text(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(KillOnDrop::try_wait)
    }

    fn report(&self) -> String {
        format!(
            "--- {} console, last {TAIL_LINES} lines ({}) ---\n{}\n--- {} QEMU log ---\n{}",
            self.name,
            self.console.display(),
            log_tail(&self.console, TAIL_LINES),
            self.name,
            log_tail(&self.qemu_log, 20),
        )
    }
}

/// What the test does while QEMU holds the migration before its switchover.
type SwitchoverAction<'a> = Box<dyn FnMut() -> Result<()> + 'a>;

/// A migration being configured: the guest's script runs on `source`'s guest and, after
/// the marker, on `destination`'s.
pub struct Migration<'a> {
    dir: &'a Path,
    source: &'a Daemon,
    destination: &'a Daemon,
    back: Option<&'a Daemon>,
    at_switchover: Option<SwitchoverAction<'a>>,
    script: String,
    refused: bool,
}

/// How QEMU says the migration ended.
enum Ended {
    Completed {
        downtime: u64,
        total: u64,
    },
    /// `query-migrate`'s answer.
    Failed(String),
}

/// QMP: use the return path, so that a destination that fails to load the guest fails the
/// migration at the source, which then resumes the guest. Set on both sides.
const RETURN_PATH: &str = r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "return-path", "state": true}]}}"#;

/// QMP: stop before the switchover (the guest stopped, device state not sent yet) until
/// `migrate-continue`; set on the source only.
const PAUSE_BEFORE_SWITCHOVER: &str = r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "pause-before-switchover", "state": true}]}}"#;
const CONTINUE: &str =
    r#"{"execute": "migrate-continue", "arguments": {"state": "pre-switchover"}}"#;

impl<'a> Migration<'a> {
    /// Files go to `dir`.
    pub fn new(dir: &'a Path, source: &'a Daemon, destination: &'a Daemon) -> Self {
        Migration {
            dir,
            source,
            destination,
            back: None,
            at_switchover: None,
            script: String::new(),
            refused: false,
        }
    }

    /// Once at the destination, the guest moves on to a third QEMU against `daemon` at its
    /// second [`MIGRATE_MARKER`] (written after the harness's first `go`), and goes on there
    /// after a second `go`.
    #[allow(dead_code)] // for the migration back
    pub fn back(mut self, daemon: &'a Daemon) -> Self {
        self.back = Some(daemon);
        self
    }

    /// Holds the (first) migration at QEMU's `pre-switchover` state, runs `action`, then lets
    /// it go on (`migrate-continue`).
    #[allow(dead_code)] // for the store server restarted during a migration
    pub fn at_switchover(mut self, action: impl FnMut() -> Result<()> + 'a) -> Self {
        self.at_switchover = Some(Box::new(action));
        self
    }

    /// The workload (after the harness's prelude); it prints [`MIGRATE_MARKER`] when the
    /// guest may move, then waits for the harness's line on `/dev/ttyS1`.
    pub fn script(mut self, script: &str) -> Self {
        self.script = script.to_owned();
        self
    }

    /// Boots the guest at the source and migrates it at the marker. When the migration
    /// completes (as [`Migration::refused`] does not expect), the guest goes on at the
    /// destination until it powers off; when the destination refuses it, QEMU resumes it at
    /// the source, where it goes on.
    pub fn run(mut self) -> Result<Migrated> {
        let qemu = qemu_binary()?;
        let image = guest_image()?;
        let accel = accelerator()?;
        for daemon in self.daemons() {
            daemon.ensure_running()?;
        }
        let initrd = self.dir.join("migration.initrd");
        let script = format!("{PRELUDE}TAG='{}'\n{}\n", self.source.tag(), self.script);
        write_initrd(&initrd, image, &[], &script, &[])?;
        let incoming = self.dir.join("migration.sock");
        let mut src = Side::new(self.dir, "source");
        let mut dst = Side::new(self.dir, "destination");
        let command = |side: &Side, daemon: &Daemon| -> Result<Command> {
            let mut c = base_command(
                &qemu,
                accel,
                image,
                (&initrd, ""),
                &side.console,
                &side.qemu_log,
            )?;
            add_devices(&mut c, side, daemon);
            Ok(c)
        };
        let dst_command = command(&dst, self.destination)?;
        start_incoming(&mut dst, dst_command, &qemu, &incoming)?;
        src.process = Some(KillOnDrop::spawn(&mut command(&src, self.source)?, &qemu)?);
        let mut at_switchover = self.at_switchover.take();
        let mut outcome = self.migrate(&mut src, &incoming, at_switchover.as_mut());
        let mut back_downtime_ms = None;
        let completed = matches!(outcome, Ok(Ended::Completed { .. }));
        if let (true, Some(back)) = (completed, self.back) {
            // The guest goes on at the destination until its second marker, then moves to a
            // third QEMU against `back`: the way back.
            let mut third = Side::new(self.dir, "back");
            let incoming = self.dir.join("migration-back.sock");
            let third_command = command(&third, back)?;
            start_incoming(&mut third, third_command, &qemu, &incoming)?;
            if let Some(p) = src.process.as_mut() {
                p.kill();
            }
            let serial = go(&dst)?;
            match self.migrate(&mut dst, &incoming, None) {
                Ok(Ended::Completed { downtime, .. }) => back_downtime_ms = Some(downtime),
                other => outcome = other,
            }
            drop(serial);
            // From here on the destination's QEMU is the one the guest left (or, should
            // the way back fail, the one it stays at).
            src = std::mem::replace(&mut dst, third);
        }
        let _ = fs::remove_file(&initrd);
        let ended = outcome.map_err(|f| {
            Failure::new(format!(
                "{f}\n{}\n{}\n{}",
                src.report(),
                dst.report(),
                self.daemon_reports()
            ))
        })?;
        let (downtime_ms, total_ms) = match &ended {
            Ended::Completed { downtime, total } => (Some(*downtime), *total),
            Ended::Failed(_) => (None, 0),
        };
        let failed = matches!(ended, Ended::Failed(_));
        if failed != self.refused {
            let what = match &ended {
                Ended::Failed(answer) => format!("failed: {answer}"),
                Ended::Completed { .. } => "completed".to_owned(),
            };
            return Err(Failure::new(format!(
                "the migration {what}, expected it to {}\n{}\n{}\n{}",
                if self.refused { "fail" } else { "complete" },
                src.report(),
                dst.report(),
                self.daemon_reports()
            )));
        }
        // Where the guest runs now, and the QEMU whose guest has gone (after a migration
        // the source stays paused; after a refused one the destination exits by itself).
        let (running, gone) = if failed {
            (&mut src, &mut dst)
        } else {
            (&mut dst, &mut src)
        };
        let mut migrated = self.go_on(running, gone, failed, (downtime_ms, total_ms), accel)?;
        migrated.back_downtime_ms = back_downtime_ms;
        Ok(migrated)
    }

    /// Every daemon of the migration.
    fn daemons(&self) -> Vec<&'a Daemon> {
        let mut all = vec![self.source, self.destination];
        all.extend(self.back);
        all
    }

    /// After QEMU's verdict: lets the guest go on where it runs and waits for it to power off
    /// and for the other QEMU to exit; then checks both daemons.
    fn go_on(
        &self,
        running: &mut Side,
        gone: &mut Side,
        failed: bool,
        (downtime_ms, total_ms): (Option<u64>, u64),
        accel: Accel,
    ) -> Result<Migrated> {
        if failed {
            wait_running(&running.qmp)?;
        } else if let Some(p) = gone.process.as_mut() {
            p.kill();
        }
        // The guest may go on.
        let serial = go(running)?;
        let finished = wait_until(DEFAULT_TIMEOUT, POLL_INTERVAL, || running.exited());
        let gone_exited = wait_until(SOCKET_TIMEOUT, POLL_INTERVAL, || gone.exited());
        drop(serial);
        let console = running.console_text();
        let report = format!(
            "migration {}, downtime {downtime_ms:?} ms, total {total_ms} ms ({accel:?})\n{}\n{}\n{}",
            if failed { "refused" } else { "completed" },
            running.report(),
            gone.report(),
            self.daemon_reports()
        );
        if finished.is_none() {
            return Err(Failure::new(format!(
                "the guest did not power off at the {} within {DEFAULT_TIMEOUT:?}\n{report}",
                running.name
            )));
        }
        if gone_exited.is_none() {
            return Err(Failure::new(format!(
                "the {} QEMU did not exit\n{report}",
                gone.name
            )));
        }
        for daemon in self.daemons() {
            daemon
                .check_health()
                .map_err(|f| Failure::new(format!("after the migration: {f}\n{report}")))?;
        }
        Ok(Migrated {
            output: GuestOutput::new(parse_exit_status(&console), console, report),
            downtime_ms: downtime_ms.unwrap_or(0),
            total_ms,
            back_downtime_ms: None,
        })
    }

    /// The destination refuses the guest: the migration is to fail and the guest go on at
    /// the source.
    pub fn refused(mut self) -> Self {
        self.refused = true;
        self
    }

    /// Runs a migration the destination refuses ([`Migration::refused`]) of a pohmelfs guest
    /// holding a file it unlinked while open, and checks it ended as it should: the guest
    /// went on at the source without an error, the destination refused the state, and the
    /// source let the volume go, then opened it again at the guest's next request, sparing
    /// that file.
    pub fn run_refused(self) -> Result<()> {
        let (source, destination) = (self.source, self.destination);
        let migrated = self.refused().run()?;
        migrated.output.expect_success()?;
        expect_logged(destination, "destination", "refused the device state")?;
        expect_handed_over(source, "source")?;
        expect_logged(source, "source", "opening it again")?;
        expect_logged(source, "source", "spared=1")
    }

    /// Waits for the marker, migrates, and waits for QEMU's verdict.
    fn migrate(
        &self,
        src: &mut Side,
        incoming: &Path,
        mut at_switchover: Option<&mut SwitchoverAction<'a>>,
    ) -> Result<Ended> {
        let marked = wait_until(DEFAULT_TIMEOUT, POLL_INTERVAL, || {
            if has_line(&src.console_text(), MIGRATE_MARKER) {
                return Some(Ok(()));
            }
            src.exited().map(Err)
        });
        match marked {
            Some(Ok(())) => {}
            Some(Err(status)) => {
                return Err(Failure::new(format!(
                    "the source QEMU exited ({status}) before {MIGRATE_MARKER}"
                )))
            }
            None => {
                return Err(Failure::new(format!(
                    "the guest did not print {MIGRATE_MARKER} within {DEFAULT_TIMEOUT:?}"
                )))
            }
        }
        let mut qmp = Qmp::connect(&src.qmp)?;
        qmp.execute(RETURN_PATH)?;
        if at_switchover.is_some() {
            qmp.execute(PAUSE_BEFORE_SWITCHOVER)?;
        }
        qmp.execute(&format!(
            r#"{{"execute": "migrate", "arguments": {{"uri": "unix:{}"}}}}"#,
            incoming.display()
        ))?;
        let answer = wait_until(MIGRATION_TIMEOUT, Duration::from_millis(100), || match qmp
            .execute(r#"{"execute": "query-migrate"}"#)
        {
            Ok(answer) => match field_str(&answer, "status").as_deref() {
                Some("completed" | "failed" | "cancelled") => Some(Ok(answer)),
                Some("pre-switchover") => {
                    let acted = at_switchover.take().map_or(Ok(()), |action| action());
                    match acted.and_then(|()| qmp.execute(CONTINUE)) {
                        Ok(_) => None,
                        Err(f) => Some(Err(f)),
                    }
                }
                _ => None,
            },
            Err(f) => Some(Err(f)),
        })
        .ok_or_else(|| {
            Failure::new(format!(
                "the migration did not end within {MIGRATION_TIMEOUT:?}"
            ))
        })??;
        if field_str(&answer, "status").as_deref() != Some("completed") {
            return Ok(Ended::Failed(answer));
        }
        let downtime = field_u64(&answer, "downtime")
            .ok_or_else(|| Failure::new(format!("query-migrate gave no downtime: {answer}")))?;
        let total = field_u64(&answer, "total-time").unwrap_or(0);
        Ok(Ended::Completed { downtime, total })
    }

    fn daemon_reports(&self) -> String {
        let mut report = format!(
            "source daemon:\n{}\ndestination daemon:\n{}",
            self.source.log_report(),
            self.destination.log_report()
        );
        if let Some(back) = self.back {
            report.push_str(&format!("\nback daemon:\n{}", back.log_report()));
        }
        report
    }
}

/// Fails unless `daemon` (the `which` one) logged `line`.
pub fn expect_logged(daemon: &Daemon, which: &str, line: &str) -> Result<()> {
    let log = fs::read_to_string(daemon.log_path()).unwrap_or_default();
    if log.contains(line) {
        return Ok(());
    }
    Err(Failure::new(format!(
        "the {which} daemon did not log {line:?}\n{}",
        daemon.log_report()
    )))
}

/// The pohmelfs `daemon` let the volume go once the guest's state was out.
pub fn expect_handed_over(daemon: &Daemon, which: &str) -> Result<()> {
    expect_logged(daemon, which, "volume let go: another daemon may open it")
}

/// The pohmelfs `daemon` took the guest's session over, sparing the one file the guest
/// unlinked while open.
pub fn expect_taken_over(daemon: &Daemon, which: &str) -> Result<()> {
    expect_logged(daemon, which, "spared=1")?;
    expect_logged(daemon, which, "migration: guest session taken over")
}

/// Starts `side`'s QEMU (`command`) waiting for a migration on `incoming`: deferred, so the
/// return path is set on both sides before the stream starts.
fn start_incoming(
    side: &mut Side,
    mut command: Command,
    qemu: &Path,
    incoming: &Path,
) -> Result<()> {
    command.args(["-incoming", "defer"]);
    side.process = Some(KillOnDrop::spawn(&mut command, qemu)?);
    let qmp_path = side.qmp.clone();
    wait_for_socket(side, &qmp_path)?;
    let mut qmp = Qmp::connect(&side.qmp)?;
    qmp.execute(RETURN_PATH)?;
    qmp.execute(&format!(
        r#"{{"execute": "migrate-incoming", "arguments": {{"uri": "unix:{}"}}}}"#,
        incoming.display()
    ))?;
    Ok(())
}

/// Writes `go` to the guest's ttyS1 at `side`: the guest goes on. Keep the connection open
/// until the guest has read it (its next marker, or its end): QEMU drops what a closed socket
/// chardev has not handed to the UART yet.
fn go(side: &Side) -> Result<UnixStream> {
    let mut serial = UnixStream::connect(&side.serial)
        .map_err(|e| Failure::new(format!("connect {}: {e}", side.serial.display())))?;
    serial
        .write_all(b"go\n")
        .map_err(|e| Failure::new(format!("write to the guest's ttyS1: {e}")))?;
    Ok(serial)
}

/// Memory (shared, as vhost-user needs), the vhost-user-fs device on `daemon`'s socket, the
/// second serial port and QMP.
fn add_devices(c: &mut Command, side: &Side, daemon: &Daemon) {
    c.args(["-m", MEMORY])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={MEMORY},share=on"
        ))
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=char0,path={}",
            daemon.socket().display()
        ))
        .arg("-device")
        .arg(format!(
            "vhost-user-fs-pci,queue-size=1024,chardev=char0,tag={}",
            daemon.tag()
        ))
        .arg("-chardev")
        .arg(format!(
            "socket,id=ctl,path={},server=on,wait=off",
            side.serial.display()
        ))
        .args(["-device", "isa-serial,chardev=ctl"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", side.qmp.display()));
}

/// Waits until QMP at `path` says the guest runs (QEMU resumes it after a failed
/// migration).
fn wait_running(path: &Path) -> Result<()> {
    let mut qmp = Qmp::connect(path)?;
    let running = wait_until(SOCKET_TIMEOUT, POLL_INTERVAL, || {
        match qmp.execute(r#"{"execute": "query-status"}"#) {
            Ok(answer) => {
                (field_str(&answer, "status").as_deref() == Some("running")).then_some(Ok(()))
            }
            Err(f) => Some(Err(f)),
        }
    });
    running.unwrap_or_else(|| {
        Err(Failure::new(format!(
            "QEMU did not resume the guest at the source within {SOCKET_TIMEOUT:?}"
        )))
    })
}

/// Waits until QEMU made `path`, or fails if it exited first.
fn wait_for_socket(side: &mut Side, path: &Path) -> Result<()> {
    let made = wait_until(SOCKET_TIMEOUT, POLL_INTERVAL, || {
        if path.exists() {
            return Some(Ok(()));
        }
        side.exited().map(Err)
    });
    match made {
        Some(Ok(())) => Ok(()),
        Some(Err(status)) => Err(Failure::new(format!(
            "the {} QEMU exited ({status}) before making {}\n{}",
            side.name,
            path.display(),
            side.report()
        ))),
        None => Err(Failure::new(format!(
            "the {} QEMU made no {} within {SOCKET_TIMEOUT:?}\n{}",
            side.name,
            path.display(),
            side.report()
        ))),
    }
}

/// A QMP connection: one JSON object a line each way.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .map_err(|e| Failure::new(format!("connect QMP {}: {e}", path.display())))?;
        stream
            .set_read_timeout(Some(SOCKET_TIMEOUT))
            .map_err(|e| Failure::new(format!("QMP read timeout: {e}")))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Failure::new(format!("clone QMP socket: {e}")))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(Failure::new(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute(r#"{"execute": "qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(Failure::new("QMP closed the connection")),
            Ok(_) => Ok(line),
            Err(e) => Err(Failure::new(format!("read QMP: {e}"))),
        }
    }

    /// Sends `command`; its answer (`{"return": …}`), skipping events. An error answer fails.
    fn execute(&mut self, command: &str) -> Result<String> {
        writeln!(self.writer, "{command}")
            .map_err(|e| Failure::new(format!("write QMP {command}: {e}")))?;
        loop {
            let line = self.line()?;
            if line.starts_with("{\"return\"") {
                return Ok(line);
            }
            if line.starts_with("{\"error\"") {
                return Err(Failure::new(format!("QMP {command}: {line}")));
            }
        }
    }
}

/// The string value of `"key": "…"` in a QMP answer.
fn field_str(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\": \""))? + key.len() + 5;
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_owned())
}

/// The number value of `"key": N` in a QMP answer.
fn field_u64(json: &str, key: &str) -> Option<u64> {
    let start = json.find(&format!("\"{key}\": "))? + key.len() + 4;
    let digits: String = json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{field_str, field_u64};

    #[test]
    fn query_migrate_fields_are_read() {
        let answer = r#"{"return": {"status": "completed", "setup-time": 3, "downtime": 41, "total-time": 1523, "ram": {"total": 1}}}"#;
        assert_eq!(field_str(answer, "status").as_deref(), Some("completed"));
        assert_eq!(field_u64(answer, "downtime"), Some(41));
        assert_eq!(field_u64(answer, "total-time"), Some(1523));
        assert_eq!(field_u64(answer, "missing"), None);
    }
}
