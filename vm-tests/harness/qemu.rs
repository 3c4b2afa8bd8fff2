//! One guest boot under QEMU: the [`Guest`] builder and what it returns, [`GuestOutput`].
//!
//! A guest gets the test's shell script as `/test.sh` (a newc archive appended to the base
//! initramfs), mounts nothing by itself (unless it boots with its root on the daemon's volume,
//! [`Guest::root_boot`]), and reports the script's status on its serial console
//! as `POHMELFS-EXIT=<status>` before powering off. QEMU uses KVM only when a probe boot showed
//! that KVM really runs this guest, and TCG otherwise. QEMU is killed when the run times out
//! and in `Drop`, so a failing test never leaves a guest behind.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::daemon::{self, Daemon};
use super::image::{guest_image, GuestImage};
use super::initrd::{guest_pohmelfs, root_init, write_initrd, ExtraFile};
use super::{log_tail, target_dir, wait_until, Failure, Result};

/// Default bound on one guest run, boot to power-off, under TCG.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_MEMORY_MB: u32 = 512;
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Console lines quoted in failure messages.
const CONSOLE_TAIL_LINES: usize = 60;
const EXIT_MARKER: &str = "POHMELFS-EXIT=";
/// Bound on the KVM probe boot. A working KVM boots this guest in about a second and TCG in
/// about three; a KVM slower than this is not worth using.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shell prelude of every guest script: `$TAG`, `step`, `fail`, `expect_eq`, `set -e`, and a
/// trap that names the step that failed.
pub(super) const PRELUDE: &str = r#"#!/bin/sh
STEP=start
step() { STEP="$*"; echo "== $*"; }
fail() { echo "FAIL: $*"; exit 1; }
expect_eq() { [ "$1" = "$2" ] || fail "$3: expected '$2', got '$1'"; }
trap 'status=$?; [ $status = 0 ] || echo "FAIL: status $status in step: $STEP"' EXIT
set -e
"#;

/// The guest's `/test.sh`: the prelude, `$TAG`, then `body`.
pub fn guest_script(tag: &str, body: &str) -> String {
    format!("{PRELUDE}TAG='{tag}'\n{body}\n")
}

/// Something the harness does while the guest runs, once the console shows a marker line.
type ConsoleAction<'a> = (String, Box<dyn FnOnce() -> Result<()> + 'a>);

/// A guest run being configured.
pub struct Guest<'a> {
    daemon: &'a Daemon,
    memory_mb: u32,
    timeout: Duration,
    script: String,
    fio: bool,
    pjdfstest: bool,
    pohmelfs: bool,
    root: bool,
    actions: Vec<ConsoleAction<'a>>,
    power_cut_at: Option<String>,
}

/// What a guest run left behind.
#[derive(Debug)]
pub struct GuestOutput {
    /// Exit status of `/test.sh`, from the console marker; `None` when the guest never printed
    /// it (kernel panic, script killed, ...).
    pub exit_status: Option<i32>,
    /// The whole serial console.
    pub console: String,
    /// What to quote when the run counts as failed: console tail, QEMU log, daemon log.
    report: String,
}

impl GuestOutput {
    /// What a run the harness drove itself left (`migration.rs`).
    pub(super) fn new(exit_status: Option<i32>, console: String, report: String) -> GuestOutput {
        GuestOutput {
            exit_status,
            console,
            report,
        }
    }

    /// Fails unless the guest script exited with status 0.
    pub fn expect_success(self) -> Result<GuestOutput> {
        if self.exit_status == Some(0) {
            Ok(self)
        } else {
            let status = self
                .exit_status
                .map_or_else(|| "no exit marker".to_owned(), |s| format!("status {s}"));
            Err(Failure::new(format!(
                "guest script failed ({status}); expected status 0\n{}",
                self.report
            )))
        }
    }

    /// The value of the last console line `KEY=value`, for results a script reports.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.console.lines().rev().find_map(|line| {
            line.trim_end_matches('\r')
                .strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}

impl<'a> Guest<'a> {
    /// A guest with the defaults: 512 MiB, 300 s, an empty script, no fio.
    pub fn new(daemon: &'a Daemon) -> Self {
        Guest {
            daemon,
            memory_mb: DEFAULT_MEMORY_MB,
            timeout: DEFAULT_TIMEOUT,
            script: String::new(),
            fio: false,
            pjdfstest: false,
            pohmelfs: false,
            root: false,
            actions: Vec::new(),
            power_cut_at: None,
        }
    }

    /// Adds this build's `pohmelfs` binary (stripped) as `/usr/bin/pohmelfs`, with the shared
    /// libraries it links, from this host (where the base image's libc comes from too).
    #[allow(dead_code)] // for the crash and torture tests
    pub fn with_pohmelfs(mut self) -> Self {
        self.pohmelfs = true;
        self
    }

    /// Boots with the daemon's volume as the root file system (`images/root-init` as `/init`,
    /// `root=TAG rootfstype=virtiofs`): the script runs in the switched root, under its own
    /// `/bin/sh`, instead of in the initramfs.
    pub fn root_boot(mut self) -> Self {
        self.root = true;
        self
    }

    /// Runs `action` once the console shows the line `marker`, while the guest goes on (it does
    /// not wait for the action). Actions run in the order they were added; a failing action
    /// ends the run with its failure.
    #[allow(dead_code)] // for the crash tests
    pub fn on_console(mut self, marker: &str, action: impl FnOnce() -> Result<()> + 'a) -> Self {
        self.actions.push((marker.to_owned(), Box::new(action)));
        self
    }

    /// Kills QEMU once the console shows the line `marker`, after the actions due by then: a
    /// power cut, with nothing synced. The output then has no exit status.
    #[allow(dead_code)] // for the crash tests
    pub fn power_cut_at(mut self, marker: &str) -> Self {
        self.power_cut_at = Some(marker.to_owned());
        self
    }

    #[allow(dead_code)] // all current workloads fit the default
    pub fn memory_mb(mut self, memory_mb: u32) -> Self {
        self.memory_mb = memory_mb;
        self
    }

    /// Bound on the whole run; QEMU is killed past it.
    #[allow(dead_code)] // all current workloads fit the default
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The workload: busybox `sh` run after the [`PRELUDE`]. `$TAG` holds the virtio-fs tag.
    pub fn script(mut self, script: &str) -> Self {
        self.script = script.to_owned();
        self
    }

    /// Adds fio (and its ~80 MiB of libraries) to this guest.
    pub fn with_fio(mut self) -> Self {
        self.fio = true;
        self
    }

    /// Adds pjdfstest (its binary, libraries, users and /etc/pjdfstest.toml).
    pub fn with_pjdfstest(mut self) -> Self {
        self.pjdfstest = true;
        self
    }

    /// Boots the guest, waits for it to power off, and returns its console and exit status.
    ///
    /// Errors are failures of the run itself (no QEMU, no image, timeout, QEMU error); a
    /// script that fails is reported in [`GuestOutput::exit_status`].
    pub fn run(mut self) -> Result<GuestOutput> {
        let qemu = qemu_binary()?;
        let image = guest_image()?;
        let accel = accelerator()?;
        let number = self.daemon.ensure_running()?;
        let files = RunFiles::new(self.daemon.dir(), number);
        self.build_initrd(image, &files.initrd)?;
        let mut command = self.qemu_command(&qemu, accel, image, &files)?;
        let started = Instant::now();
        let mut qemu_process = KillOnDrop::spawn(&mut command, &qemu)?;
        let watched = self.watch(&mut qemu_process, &files.console);
        let elapsed = started.elapsed();
        let _ = fs::remove_file(&files.initrd);
        let run = RunSummary {
            number,
            accel,
            elapsed,
        };
        self.conclude(&files, &run, watched, &mut qemu_process)
    }

    /// Writes the initrd: the base image, the optional images this guest asked for, and an
    /// archive with `/test.sh` (and the `pohmelfs` binary when asked for).
    fn build_initrd(&self, image: &GuestImage, initrd: &Path) -> Result<()> {
        let script = guest_script(self.daemon.tag(), &self.script);
        let mut extra: Vec<&ExtraFile> = Vec::new();
        if self.pohmelfs {
            extra.extend(guest_pohmelfs()?);
        }
        let init = if self.root { Some(root_init()?) } else { None };
        extra.extend(&init);
        let mut images = Vec::new();
        if self.fio {
            images.push(image.fio.as_path());
        }
        if self.pjdfstest {
            if !image.pjdfstest.is_file() {
                return Err(Failure::new(format!(
                    "{} is missing: the guest image carries pjdfstest only when it is installed \
                     before the image is built (scripts/test does both; or scripts/pjdfstest, then \
                     images/build-guest)",
                    image.pjdfstest.display()
                )));
            }
            images.push(image.pjdfstest.as_path());
        }
        write_initrd(initrd, image, &images, &script, &extra)
    }

    /// The QEMU command line: the common part, this guest's memory (shared, as vhost-user
    /// needs) and the vhost-user-fs device on the daemon's socket.
    fn qemu_command(
        &self,
        qemu: &Path,
        accel: Accel,
        image: &GuestImage,
        files: &RunFiles,
    ) -> Result<Command> {
        let memory = format!("{}M", self.memory_mb);
        let root_args = format!("root={} rootfstype=virtiofs", self.daemon.tag());
        let mut command = base_command(
            qemu,
            accel,
            image,
            (&files.initrd, if self.root { &root_args } else { "" }),
            &files.console,
            &files.qemu_log,
        )?;
        command
            .args(["-m", &memory])
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={memory},share=on"
            ))
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=char0,path={}",
                self.daemon.socket().display()
            ))
            .arg("-device")
            .arg(format!(
                "vhost-user-fs-pci,queue-size=1024,chardev=char0,tag={}",
                self.daemon.tag()
            ));
        Ok(command)
    }

    /// Waits for QEMU to exit, within the run's bound, running the console actions as their
    /// markers appear and cutting the power at the power-cut marker.
    fn watch(&mut self, qemu_process: &mut KillOnDrop, console: &Path) -> Watched {
        let mut actions = std::mem::take(&mut self.actions);
        let mut action_failure = None;
        let mut power_cut = false;
        let status = wait_until(self.timeout, POLL_INTERVAL, || {
            if !actions.is_empty() || (self.power_cut_at.is_some() && !power_cut) {
                let text = fs::read(console)
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .unwrap_or_default();
                while actions
                    .first()
                    .is_some_and(|(marker, _)| has_line(&text, marker))
                {
                    let (marker, action) = actions.remove(0);
                    if let Err(failure) = action() {
                        action_failure = Some((marker, failure));
                        qemu_process.kill();
                        break;
                    }
                }
                if action_failure.is_none()
                    && self
                        .power_cut_at
                        .as_deref()
                        .is_some_and(|marker| has_line(&text, marker))
                {
                    qemu_process.kill();
                    power_cut = true;
                }
            }
            qemu_process.try_wait()
        });
        Watched {
            status,
            action_failure,
            power_cut,
        }
    }

    /// Judges a finished run: a failed action, a timeout or a QEMU failure is an error, and so
    /// is a daemon that is unhealthy after it; otherwise the guest's console and exit status.
    fn conclude(
        &self,
        files: &RunFiles,
        run: &RunSummary,
        watched: Watched,
        qemu_process: &mut KillOnDrop,
    ) -> Result<GuestOutput> {
        let RunSummary {
            number,
            accel,
            elapsed,
        } = *run;
        let console_text = fs::read(&files.console)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let exit_status = parse_exit_status(&console_text);
        let report = |headline: String| self.report(files, &headline);
        if let Some((marker, failure)) = watched.action_failure {
            return Err(Failure::new(report(format!(
                "the harness's action at console line {marker:?} failed: {failure}"
            ))));
        }
        let Some(status) = watched.status else {
            qemu_process.kill();
            return Err(Failure::new(report(format!(
                "guest #{number} did not power off within {:?} ({accel:?}); QEMU killed",
                self.timeout
            ))));
        };
        if watched.power_cut {
            eprintln!(
                "{}: guest #{number} power cut after {elapsed:.1?} ({accel:?})",
                self.daemon.kind()
            );
        } else if !status.success() && exit_status.is_none() {
            return Err(Failure::new(report(format!(
                "QEMU failed ({status}) after {elapsed:.1?}"
            ))));
        }
        // Every test's closing check, after each of its guests (see `Daemon::check_health`).
        self.daemon
            .check_health()
            .map_err(|f| Failure::new(report(format!("after guest #{number}: {f}"))))?;
        eprintln!(
            "{}: guest #{number} ran {elapsed:.1?} ({accel:?}), status {exit_status:?}",
            self.daemon.kind()
        );
        let report = report(format!("guest #{number} ran {elapsed:.1?} ({accel:?})"));
        Ok(GuestOutput {
            exit_status,
            console: console_text,
            report,
        })
    }

    /// What to quote about a run: `headline`, the console tail, the QEMU log, the daemon's
    /// state and log.
    fn report(&self, files: &RunFiles, headline: &str) -> String {
        let daemon_state = match self.daemon.exit_status() {
            None => "still running".to_owned(),
            Some(status) => format!("exited: {status}"),
        };
        format!(
            "{headline}\n\
             --- guest console, last {CONSOLE_TAIL_LINES} lines ({}) ---\n{}\n\
             --- QEMU log ({}) ---\n{}\n\
             --- daemon: {daemon_state} ---\n{}",
            files.console.display(),
            log_tail(&files.console, CONSOLE_TAIL_LINES),
            files.qemu_log.display(),
            log_tail(&files.qemu_log, 20),
            self.daemon.log_report()
        )
    }
}

/// The files of one guest run, beside the daemon's.
struct RunFiles {
    console: PathBuf,
    qemu_log: PathBuf,
    initrd: PathBuf,
}

impl RunFiles {
    /// The files of guest `number` in `dir`.
    fn new(dir: &Path, number: u32) -> RunFiles {
        let prefix = dir.join(format!("guest-{number}"));
        RunFiles {
            console: prefix.with_extension("console.log"),
            qemu_log: prefix.with_extension("qemu.log"),
            initrd: prefix.with_extension("initrd"),
        }
    }
}

/// Which guest ran, how, and for how long: for the messages about it.
#[derive(Clone, Copy)]
struct RunSummary {
    number: u32,
    accel: Accel,
    elapsed: Duration,
}

/// How the wait for QEMU ended.
struct Watched {
    /// QEMU's exit status; `None` when it still ran at the run's bound.
    status: Option<std::process::ExitStatus>,
    /// The console action that failed, with its marker (QEMU was killed).
    action_failure: Option<(String, Failure)>,
    /// QEMU was killed at the power-cut marker.
    power_cut: bool,
}

/// QEMU arguments shared by test guests and the KVM probe; the caller adds memory and devices.
/// `boot` is the initrd and what to add to the kernel command line.
pub(super) fn base_command(
    qemu: &Path,
    accel: Accel,
    image: &GuestImage,
    boot: (&Path, &str),
    console: &Path,
    qemu_log: &Path,
) -> Result<Command> {
    let log = File::create(qemu_log)
        .map_err(|e| Failure::new(format!("create {}: {e}", qemu_log.display())))?;
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let mut command = Command::new(qemu);
    command
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-machine", "q35", "-accel", accel_name, "-cpu", cpu])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(boot.0)
        // no_timer_check: under TCG on a loaded host the kernel's boot-time
        // check of the IO-APIC timer can miss its ticks and panic ("IO-APIC
        // + timer doesn't work!"); a virtual machine's timer needs no check.
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 no_timer_check {}", boot.1).trim_end())
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Failure::new(format!("duplicate {}: {e}", qemu_log.display())))?,
        )
        .stderr(log);
    Ok(command)
}

/// Whether `console` has the line `marker` (a whole line, `\r` ignored).
pub(super) fn has_line(console: &str, marker: &str) -> bool {
    console
        .lines()
        .any(|line| line.trim_end_matches('\r') == marker)
}

/// The status the guest script reported on `console` (`POHMELFS-EXIT=N`).
pub fn parse_exit_status(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix(EXIT_MARKER))
        .and_then(|status| status.parse().ok())
}

/// QEMU: `$QEMU`, else `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("QEMU").map(PathBuf::from) {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Failure::new(format!(
                "QEMU={} is not a file: point it at qemu-system-x86_64, or unset it",
                path.display()
            )))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            Failure::new(
                "qemu-system-x86_64 not found: run scripts/test, or apt-get install \
                 qemu-system-x86 (or set QEMU=/path/to/qemu-system-x86_64); set \
                 POHMELFS_SKIP_VM_TESTS=1 to skip the VM tests",
            )
        })
}

/// The first line `qemu --version` prints (scripts/test checks it names the QEMU it
/// chose), or why there is none.
fn qemu_version() -> String {
    let Ok(qemu) = qemu_binary() else {
        return "no QEMU".into();
    };
    match Command::new(&qemu).arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map_or_else(
                || format!("{} (no version printed)", qemu.display()),
                |l| format!("{l} ({})", qemu.display()),
            ),
        Err(e) => format!("{} (--version failed: {e})", qemu.display()),
    }
}

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// The accelerator for this process: `$POHMELFS_VM_ACCEL`, else KVM if a probe guest boots
/// under it, else TCG. Probed once per process.
pub fn accelerator() -> Result<Accel> {
    static ACCEL: OnceLock<std::result::Result<Accel, String>> = OnceLock::new();
    let choose = || match std::env::var("POHMELFS_VM_ACCEL").as_deref() {
        Ok("kvm") => Ok(Accel::Kvm),
        Ok("tcg") => Ok(Accel::Tcg),
        Ok(other) => Err(format!("POHMELFS_VM_ACCEL={other}: expected kvm or tcg")),
        Err(_) => {
            let (accel, why) = cached_probe().map_err(|failure| failure.to_string())?;
            eprintln!("VM tests run under {accel:?} on {}: {why}", qemu_version());
            Ok(accel)
        }
    };
    ACCEL.get_or_init(choose).clone().map_err(Failure::new)
}

/// The KVM probe's verdict, remembered in `target/vm-tests/kvm-probe` for the current boot of
/// the host (KVM does not change under a running kernel) and the same QEMU.
fn cached_probe() -> Result<(Accel, String)> {
    let cache = target_dir().join("vm-tests/kvm-probe");
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let key = format!("{} {}", boot_id.trim(), qemu_binary()?.display());
    if let Ok(text) = fs::read_to_string(&cache) {
        let mut lines = text.lines();
        if lines.next() == Some(key.as_str()) {
            let accel = match lines.next() {
                Some("Kvm") => Some(Accel::Kvm),
                Some("Tcg") => Some(Accel::Tcg),
                _ => None,
            };
            if let Some(accel) = accel {
                let why = lines.next().unwrap_or_default();
                return Ok((accel, format!("{why} (cached in {})", cache.display())));
            }
        }
    }
    let (accel, why) = probe_kvm()?;
    // Without the cache the next process probes again: not worth failing a test for.
    let _ = fs::write(&cache, format!("{key}\n{accel:?}\n{why}\n"));
    Ok((accel, why))
}

/// Boots the guest once under KVM with an empty script. KVM that opens but cannot run a real
/// kernel (nested virtualization without support) fails with "KVM internal error" or hangs;
/// both mean TCG.
fn probe_kvm() -> Result<(Accel, String)> {
    if let Err(e) = File::options().read(true).write(true).open("/dev/kvm") {
        return Ok((Accel::Tcg, format!("cannot open /dev/kvm: {e}")));
    }
    let qemu = qemu_binary()?;
    let image = guest_image()?;
    let dir = target_dir()
        .join("vm-tests")
        .join(format!("kvm-probe-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| Failure::new(format!("create {}: {e}", dir.display())))?;
    let console = dir.join("console.log");
    let qemu_log = dir.join("qemu.log");
    let initrd = dir.join("initrd");
    write_initrd(&initrd, image, &[], "exit 0\n", &[])?;
    let mut command = base_command(&qemu, Accel::Kvm, image, (&initrd, ""), &console, &qemu_log)?;
    command.args(["-m", "256"]);
    let mut process = KillOnDrop::spawn(&mut command, &qemu)?;
    let outcome = wait_until(KVM_PROBE_TIMEOUT, POLL_INTERVAL, || {
        let console_text = fs::read_to_string(&console).unwrap_or_default();
        if parse_exit_status(&console_text) == Some(0) {
            return Some((Accel::Kvm, "a probe guest booted under KVM".to_owned()));
        }
        let log = fs::read_to_string(&qemu_log).unwrap_or_default();
        if log.contains("KVM internal error") || log.contains("failed to initialize kvm") {
            let first = log.lines().find(|l| l.contains("KVM")).unwrap_or_default();
            return Some((Accel::Tcg, format!("KVM probe failed: {}", first.trim())));
        }
        process
            .try_wait()
            .map(|status| (Accel::Tcg, format!("KVM probe QEMU exited: {status}")))
    })
    .unwrap_or_else(|| {
        (
            Accel::Tcg,
            format!("KVM probe guest did not boot within {KVM_PROBE_TIMEOUT:?}"),
        )
    });
    process.kill();
    let _ = fs::remove_dir_all(&dir);
    Ok(outcome)
}

/// A QEMU process that is killed when dropped.
pub(super) struct KillOnDrop(Child);

impl KillOnDrop {
    pub(super) fn spawn(command: &mut Command, qemu: &Path) -> Result<KillOnDrop> {
        command
            .spawn()
            .map(KillOnDrop)
            .map_err(|e| Failure::new(format!("cannot start {}: {e}", qemu.display())))
    }

    pub(super) fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }

    pub(super) fn kill(&mut self) {
        daemon::kill(&mut self.0);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_exit_status, GuestOutput};

    #[test]
    fn reported_values_are_read_from_the_console() {
        let output = GuestOutput {
            exit_status: Some(0),
            console: "== write\r\nSUM=1\r\nSUMMARY=x\r\nSUM=2\r\n".to_owned(),
            report: String::new(),
        };
        assert_eq!(output.value("SUM"), Some("2"));
        assert_eq!(output.value("SUMMARY"), Some("x"));
        assert_eq!(output.value("MISSING"), None);
    }

    #[test]
    fn exit_marker_is_parsed_from_the_console() {
        let console = "booting\r\nPOHMELFS-EXIT=3\r\n[    1.8] reboot: Power down\r\n";
        assert_eq!(parse_exit_status(console), Some(3));
        assert_eq!(parse_exit_status("panic\n"), None);
    }
}
