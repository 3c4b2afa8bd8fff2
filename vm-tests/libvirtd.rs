//! pohmelfs under a real libvirtd (Debian bookworm's libvirt 9.0, `libvirt-daemon-system`): a
//! domain of type `qemu` (TCG, direct kernel boot) whose `<filesystem>` names pohmelfs as its
//! `<binary>` and a formatted volume as its `<source dir>`. libvirtd itself starts the daemon
//! (its socket, `--fd=N`, its own command line), starts QEMU as `libvirt-qemu`, and stops the
//! daemon with SIGTERM when the guest powers off. A first guest writes files, a second (a
//! second domain, a new daemon) reads them back; the daemon's log, which libvirt keeps in
//! `/var/log/libvirt/qemu/`, must show that the stop drained everything.
//!
//! libvirtd and virtlogd run as children of the test when none runs already (CI machines have
//! no service manager), and are stopped at the end. libvirt drives the system QEMU
//! (`/usr/bin/qemu-system-x86_64`, 7.2 on bookworm) whatever `$QEMU` says: that is the QEMU
//! libvirt 9.0 is packaged with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::image::guest_image;
use crate::harness::initrd::write_initrd;
use crate::harness::qemu::{guest_script, parse_exit_status};
use crate::harness::{log_tail, wait_until, Failure, Result, VmTest};

const VIRSH_URI: &str = "qemu:///system";
const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
const TAG: &str = "pohmelfs";
/// Where libvirt keeps the logs of a domain's QEMU and filesystem daemon.
const LOG_DIR: &str = "/var/log/libvirt/qemu";
/// Bound on libvirtd's start and on one guest's life, boot to power-off, under TCG.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(200);

const WRITE: &str = r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write and sync"
mkdir -p /mnt/lv
head -c 2000000 /dev/urandom > /mnt/lv/a
printf 'written under libvirtd\n' > /mnt/lv/b
sync
echo "SUMS=$(cat /mnt/lv/a /mnt/lv/b | sha256sum | cut -d' ' -f1)"
umount /mnt
"#;

fn check_script(sums: &str) -> String {
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "read back"
expect_eq "$(cat /mnt/lv/a /mnt/lv/b | sha256sum | cut -d' ' -f1)" "{sums}" "sha256 of the files"
expect_eq "$(cat /mnt/lv/b)" "written under libvirtd" "content of b"
umount /mnt
"#
    )
}

/// `virsh -c qemu:///system ARGS`; its stdout, or a failure with its stderr.
fn virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .args(["-c", VIRSH_URI])
        .args(args)
        .output()
        .map_err(|e| {
            Failure::new(format!(
                "run virsh: {e} (apt-get install libvirt-clients; scripts/setup installs it)"
            ))
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Failure::new(format!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The libvirt daemons this test started (none when they ran already); killed on drop.
struct Daemons(Vec<Child>);

impl Daemons {
    fn ensure(dir: &Path) -> Result<Daemons> {
        if virsh(&["version"]).is_ok() {
            return Ok(Daemons(Vec::new()));
        }
        let mut children = Daemons(Vec::new());
        for (binary, pid_flag) in [("virtlogd", "-p"), ("libvirtd", "--pid-file")] {
            let log = std::fs::File::create(dir.join(format!("{binary}.log")))
                .map_err(|e| Failure::new(format!("create {binary}.log: {e}")))?;
            let pid = dir.join(format!("{binary}.pid"));
            let child = Command::new(format!("/usr/sbin/{binary}"))
                .arg(pid_flag)
                .arg(&pid)
                .stdin(Stdio::null())
                .stdout(
                    log.try_clone()
                        .map_err(|e| Failure::new(format!("{binary}.log: {e}")))?,
                )
                .stderr(log)
                .spawn()
                .map_err(|e| {
                    Failure::new(format!(
                        "start {binary}: {e} (apt-get install libvirt-daemon-system; \
                         scripts/setup installs it)"
                    ))
                })?;
            children.0.push(child);
        }
        wait_until(START_TIMEOUT, POLL, || virsh(&["version"]).is_ok()).ok_or_else(|| {
            Failure::new(format!(
                "libvirtd did not answer within {START_TIMEOUT:?}:\n{}",
                log_tail(&dir.join("libvirtd.log"), 20)
            ))
        })?;
        Ok(children)
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A transient domain; destroyed on drop if it still runs.
struct Domain {
    name: String,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

/// The domain's XML: shared memfd memory (vhost-user needs it), direct kernel boot, the
/// pohmelfs `<filesystem>`, and the serial console in a file.
fn domain_xml(name: &str, files: &Path, volume_dir: &str) -> String {
    let path = |f: &str| files.join(f).display().to_string();
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 no_timer_check</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      <binary path='{binary}'/>
      <source dir='{volume_dir}'/>
      <target dir='{TAG}'/>
    </filesystem>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        kernel = path("vmlinuz"),
        initrd = path("initrd.img"),
        binary = env!("CARGO_BIN_EXE_pohmelfs"),
        console = path("console.log"),
    )
}

/// Boots one transient domain running `body` and waits for it to power off; the console.
fn boot(files: &Path, name: &str, volume_dir: &str, body: &str) -> Result<String> {
    let image = guest_image()?;
    write_initrd(
        &files.join("initrd.img"),
        image,
        &[],
        &guest_script(TAG, body),
        &[],
    )?;
    let console = files.join("console.log");
    let _ = std::fs::remove_file(&console);
    let xml = files.join(format!("{name}.xml"));
    std::fs::write(&xml, domain_xml(name, files, volume_dir))
        .map_err(|e| Failure::new(format!("write {}: {e}", xml.display())))?;
    virsh(&["create", &xml.display().to_string()])?;
    let domain = Domain {
        name: name.to_owned(),
    };
    // A transient domain is gone once the guest powered off (on_poweroff: destroy): it is
    // no longer among the running ones. A virsh that fails says nothing of the domain.
    let mut last_error = None;
    wait_until(GUEST_TIMEOUT, POLL, || match virsh(&["list", "--name"]) {
        Ok(running) => !running.lines().any(|l| l.trim() == domain.name),
        Err(e) => {
            last_error = Some(e);
            false
        }
    })
    .ok_or_else(|| {
        Failure::new(format!(
            "domain {name} still runs after {GUEST_TIMEOUT:?} (last virsh error: {last_error:?}); \
             console:\n{}",
            log_tail(&console, 40)
        ))
    })?;
    let text = std::fs::read_to_string(&console)
        .map_err(|e| Failure::new(format!("read {}: {e}", console.display())))?;
    match parse_exit_status(&text) {
        Some(0) => Ok(text),
        status => Err(Failure::new(format!(
            "guest of {name} ended with {status:?}; console:\n{}",
            log_tail(&console, 40)
        ))),
    }
}

/// The log libvirt keeps of the filesystem daemon of domain `name`.
fn daemon_log(name: &str) -> PathBuf {
    Path::new(LOG_DIR).join(format!("{name}-fs0-virtiofsd.log"))
}

pub fn libvirtd_starts_pohmelfs_for_a_domain(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("vm1", &[])?;
    let volume_dir = url.trim_start_matches("file://").to_owned();
    // QEMU runs as libvirt-qemu: the kernel and initrd it opens must be readable by it.
    let files = vm.dir().join("libvirt");
    std::fs::create_dir_all(&files)
        .map_err(|e| Failure::new(format!("create {}: {e}", files.display())))?;
    std::fs::copy(&guest_image()?.kernel, files.join("vmlinuz"))
        .map_err(|e| Failure::new(format!("copy the guest kernel: {e}")))?;
    let _daemons = Daemons::ensure(vm.dir())?;
    let stamp = std::process::id();
    let (first, second) = (
        format!("pohmelfs-vm-write-{stamp}"),
        format!("pohmelfs-vm-read-{stamp}"),
    );
    write_and_read_back(&files, &volume_dir, &first, &second).map_err(|e| {
        // What libvirtd, and the QEMUs and daemons it started, said beside the failure.
        let mut message = format!(
            "{e}\nlibvirtd's log:\n{}",
            log_tail(&vm.dir().join("libvirtd.log"), 10)
        );
        for name in [&first, &second] {
            let qemu_log = Path::new(LOG_DIR).join(format!("{name}.log"));
            message += &format!(
                "\n{name}'s QEMU log:\n{}\n{name}'s daemon log:\n{}",
                log_tail(&qemu_log, 10),
                log_tail(&daemon_log(name), 10)
            );
        }
        Failure::new(message)
    })
}

/// The first domain writes, its daemon drains at libvirt's SIGTERM, the second domain reads.
fn write_and_read_back(files: &Path, volume_dir: &str, first: &str, second: &str) -> Result<()> {
    let console = boot(files, first, volume_dir, WRITE)?;
    let sums = console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("SUMS="))
        .ok_or_else(|| Failure::new("the writing guest printed no SUMS"))?
        .to_owned();
    // libvirt stopped the daemon when the domain ended: with SIGTERM, and it drained.
    let log = daemon_log(first);
    wait_until(START_TIMEOUT, POLL, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("drained: everything written is stored"))
    })
    .ok_or_else(|| {
        Failure::new(format!(
            "the daemon libvirt started did not drain at its stop:\n{}",
            log_tail(&log, 20)
        ))
    })?;
    boot(files, second, volume_dir, &check_script(&sums))?;
    Ok(())
}
