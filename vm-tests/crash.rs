//! Crashes: the guest loses power, the store server or the daemon is killed with SIGKILL,
//! while files are fsynced and others are dirty. Afterwards every byte a successful fsync
//! covered must be there — a new guest compares each file with the checksum the first guest
//! printed of its own copy in `/tmp` right after its fsync — and `pohmelfs check` must find the
//! volume consistent. A last test runs `pohmelfs torture` in the guest and verifies its saved
//! model after the store server and the daemon restarted.
//!
//! The power cut and the daemon kill run against virtiofsd too (on its shared directory, with
//! no volume to check); the store server and torture tests need a `pohmel://` volume.
//!
//! What is not fsynced may be lost (docs/correctness.md); these tests only require that the
//! volume stays consistent around it.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use pohmelfs_testkit::ChildGuard;

use crate::harness::daemon::Daemon;
use crate::harness::qemu::GuestOutput;
use crate::harness::store::StoreServer;
use crate::harness::{log_tail, wait_until, DaemonKind, Failure, Guest, Result, VmTest};

/// The console line at which the host strikes.
const CRASH: &str = "POHMELFS-MARK=crash";
/// The console line after the workload's second half (store server test).
const DONE: &str = "POHMELFS-MARK=done";
/// Bound on `pohmelfs check`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);
/// Bound on the store server's outage in the store server test.
const OUTAGE_MAX: Duration = Duration::from_secs(60);
/// Guest memory: the initramfs carries the pohmelfs binary.
const GUEST_MB: u32 = 1024;

/// Sizes of the fsynced files: around pages (4 KiB) and store blocks (64 KiB), and larger.
const SIZES: [u32; 8] = [1, 4095, 4096, 65535, 65536, 65537, 300_000, 2_097_152];

/// Shell that writes file `$1` of `$2` random bytes, fsyncs it and prints the checksum of its
/// copy, `/tmp/c/$1`.
const FSYNC_FN: &str = r#"
mkdir -p /tmp/c
fsynced() {
    head -c "$2" /dev/urandom > "/tmp/c/$1"
    dd if="/tmp/c/$1" of="/mnt/c/$1" bs=65536 conv=fsync 2>/dev/null || fail "dd of $1"
    echo "FSYNCED $1 $(sha256sum < "/tmp/c/$1" | cut -d' ' -f1)"
}
"#;

/// The first guest: fsynced files around dirty ones, an fsynced overwrite, then `CRASH`
/// and more dirty data until the host strikes (or, with `second_half`, more fsynced files and
/// `DONE`).
fn write_script(second_half: bool) -> String {
    let mut s = String::from(FSYNC_FN);
    s.push_str(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
mkdir -p /mnt/c
step "dirty file u1, not fsynced"
head -c 3000000 /dev/urandom > /mnt/c/u1
step "fsynced files"
"#,
    );
    for (i, size) in SIZES.iter().enumerate() {
        s.push_str(&format!("fsynced s{i} {size}\n"));
    }
    s.push_str(
        r#"
step "fsynced overwrite in the middle of s6"
head -c 5000 /dev/urandom > /tmp/patch
dd if=/tmp/patch of=/tmp/c/s6 bs=1000 seek=70 conv=notrunc 2>/dev/null
dd if=/tmp/patch of=/mnt/c/s6 bs=1000 seek=70 conv=notrunc,fsync 2>/dev/null || fail "dd into s6"
echo "FSYNCED s6 $(sha256sum < /tmp/c/s6 | cut -d' ' -f1)"
step "dirty overwrite of s7 (4 KiB blocks 5 to 7), not fsynced"
echo "FSYNCED-RANGE s7 0 5 $(dd if=/tmp/c/s7 bs=4096 count=5 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "FSYNCED-RANGE s7 8 504 $(dd if=/tmp/c/s7 bs=4096 skip=8 count=504 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "DIRTIED s7"
dd if=/dev/urandom of=/mnt/c/s7 bs=4096 count=3 seek=5 conv=notrunc 2>/dev/null
head -c 500000 /dev/urandom > /mnt/c/u2
"#,
    );
    s.push_str(&format!("echo {CRASH}\n"));
    if second_half {
        s.push_str("step \"fsynced files after the strike\"\n");
        for (i, size) in SIZES.iter().enumerate() {
            s.push_str(&format!("fsynced t{i} {size}\n"));
        }
        s.push_str(&format!("echo {DONE}\n"));
    }
    s.push_str(
        r#"
step "dirty data until the host strikes"
n=0
while true; do
    head -c 1048576 /dev/urandom > /mnt/c/u3
    n=$((n + 1))
done
"#,
    );
    s
}

/// What the first guest's fsyncs covered: `name -> checksum` of whole files (the last
/// `FSYNCED name sum` line of each, unless a later `DIRTIED name` line says it changed since),
/// and `"name skip count" -> checksum` of 4 KiB-block ranges (`FSYNCED-RANGE` lines).
fn fsynced_sums(out: &GuestOutput) -> BTreeMap<String, String> {
    let mut sums = BTreeMap::new();
    for line in out.console.lines() {
        let words: Vec<&str> = line.trim_end_matches('\r').split(' ').collect();
        match words.as_slice() {
            ["FSYNCED", name, sum] if sum.len() == 64 => {
                sums.insert((*name).to_owned(), (*sum).to_owned());
            }
            ["FSYNCED-RANGE", name, skip, count, sum] if sum.len() == 64 => {
                sums.insert(format!("{name} {skip} {count}"), (*sum).to_owned());
            }
            ["DIRTIED", name] => {
                sums.remove(*name);
            }
            _ => {}
        }
    }
    sums
}

/// The second guest: every fsynced file has its checksum; the dirty ones are reported.
fn verify_script(sums: &BTreeMap<String, String>) -> String {
    let mut s = String::from(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "fsynced files have their checksums"
bad=0
check() {
    got=$(sha256sum < "/mnt/c/$1" 2>/dev/null | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "LOST $1: expected $2, got '${got:-missing}' ($(stat -c %s "/mnt/c/$1" 2>&1))"
        bad=$((bad + 1))
    fi
}
check_range() {
    got=$(dd if="/mnt/c/$1" bs=4096 skip="$2" count="$3" 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$4" ]; then
        echo "LOST $1 blocks $2+$3: expected $4, got $got ($(stat -c %s "/mnt/c/$1" 2>&1))"
        bad=$((bad + 1))
    fi
}
"#,
    );
    for (name, sum) in sums {
        if name.contains(' ') {
            s.push_str(&format!("check_range {name} {sum}\n"));
        } else {
            s.push_str(&format!("check {name} {sum}\n"));
        }
    }
    s.push_str(
        r#"
step "what became of the dirty files"
for f in u1 u2 u3; do echo "DIRTY $f: $(stat -c %s /mnt/c/$f 2>&1)"; done
[ $bad = 0 ] || fail "$bad fsynced files lost bytes"
umount /mnt
"#,
    );
    s
}

/// Runs `pohmelfs check` on the volume at `url` (nothing may have it open) and fails unless
/// it finds no problem; returns its output.
fn check_volume(vm: &VmTest, url: &str) -> Result<String> {
    let log = vm.dir().join("check.log");
    let file =
        File::create(&log).map_err(|e| Failure::new(format!("create {}: {e}", log.display())))?;
    let err = file
        .try_clone()
        .map_err(|e| Failure::new(format!("duplicate {}: {e}", log.display())))?;
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
            .args(["check", "--store", url])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| Failure::new(format!("start pohmelfs check: {e}")))?,
    );
    let status = wait_until(CHECK_TIMEOUT, POLL, || child.0.try_wait().ok().flatten());
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Some(s) if s.success() && output.contains(", 0 problems,") => {
            eprintln!("pohmelfs check {url}:\n{}", output.trim_end());
            Ok(output)
        }
        Some(s) => Err(Failure::new(format!(
            "pohmelfs check {url} found the volume inconsistent ({s}):\n{}",
            log_tail(&log, 60)
        ))),
        None => Err(Failure::new(format!(
            "pohmelfs check {url} did not finish within {CHECK_TIMEOUT:?}:\n{}",
            log_tail(&log, 20)
        ))),
    }
}

/// Boots the first guest with `strike` at [`CRASH`] and a power cut at `cut`; returns the
/// checksums it printed after its fsyncs.
fn first_guest<'a>(
    daemon: &'a Daemon,
    second_half: bool,
    cut: &str,
    strike: impl FnOnce() -> Result<()> + 'a,
) -> Result<BTreeMap<String, String>> {
    let out = Guest::new(daemon)
        .memory_mb(GUEST_MB)
        .script(&write_script(second_half))
        .on_console(CRASH, strike)
        .power_cut_at(cut)
        .run()?;
    if let Some(status) = out.exit_status {
        return Err(Failure::new(format!(
            "the first guest exited ({status}) before the power cut:\n{}",
            out.console
        )));
    }
    let sums = fsynced_sums(&out);
    // Every file but the dirtied s7, whose two fsynced ranges count instead.
    let expected = SIZES.len() * if second_half { 2 } else { 1 } + 1;
    if sums.len() != expected {
        return Err(Failure::new(format!(
            "the first guest printed {} FSYNCED lines of {expected}:\n{}",
            sums.len(),
            out.console
        )));
    }
    Ok(sums)
}

/// The verifying guest.
fn verify_guest(daemon: &Daemon, sums: &BTreeMap<String, String>) -> Result<()> {
    let out = Guest::new(daemon)
        .script(&verify_script(sums))
        .run()?
        .expect_success()?;
    let dirty: Vec<&str> = out
        .console
        .lines()
        .filter(|l| l.starts_with("DIRTY "))
        .collect();
    eprintln!("after the crash: {}", dirty.join("; ").replace('\r', ""));
    Ok(())
}

/// (a) Power cut: QEMU is killed (nothing synced) after fsyncs, with dirty files in the guest
/// and in the daemon. A second guest on the same daemon finds every fsynced byte; the volume
/// checks clean after the daemon is killed too (pohmelfs).
pub fn crash_guest_power_cut(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &[])?;
    let daemon = vm.daemon().store(&url).start()?;
    let sums = first_guest(&daemon, false, CRASH, || Ok(()))?;
    verify_guest(&daemon, &sums)?;
    daemon.stop();
    drop(daemon);
    if vm.kind() == DaemonKind::Pohmelfs {
        check_volume(vm, &url)?;
    }
    Ok(())
}

/// (b) The store server is killed with SIGKILL while the guest goes on fsyncing; it is started
/// again once the daemon has had to resend, and the guest's fsyncs complete; then the guest
/// loses power. Every
/// fsync before and after the kill holds, in a second guest and after the daemon restarted;
/// the volume checks clean.
pub fn crash_store_server_kill9(vm: &VmTest) -> Result<()> {
    let data = format!("file://{}/store", vm.dir().display());
    let server = std::cell::RefCell::new(StoreServer::start(vm.dir(), &data)?);
    let url = format!("pohmel://{}/vol", server.borrow().addr());
    let daemon = vm
        .daemon()
        .store(&url)
        .arg("--ack-timeout-ms")
        .arg("500")
        .start()?;
    // The server stays dead until the daemon has logged a resend: the guest's next fsyncs are
    // then in flight to nobody.
    let strike = || {
        let mut server = server.borrow_mut();
        let log_before = std::fs::metadata(daemon.log_path()).map_or(0, |m| m.len()) as usize;
        server.kill9();
        let resent = wait_until(OUTAGE_MAX, POLL, || {
            let log = std::fs::read(daemon.log_path()).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(log_before..).unwrap_or_default());
            new.lines().any(|l| l.contains("resend")).then_some(())
        });
        if resent.is_none() {
            return Err(Failure::new(format!(
                "the daemon logged no resend within {OUTAGE_MAX:?} of the store server's death\n{}",
                daemon.log_report()
            )));
        }
        server.restart()
    };
    let sums = first_guest(&daemon, true, DONE, strike)?;
    let log = std::fs::read_to_string(daemon.log_path()).unwrap_or_default();
    eprintln!(
        "store server killed under the guest: {} resend lines in the daemon log, {} fsyncs",
        log.lines().filter(|l| l.contains("resend")).count(),
        daemon.counter("fsync_calls").unwrap_or(0)
    );
    verify_guest(&daemon, &sums)?;
    daemon.stop();
    drop(daemon);
    let daemon = vm.daemon().store(&url).start()?;
    verify_guest(&daemon, &sums)?;
    daemon.stop();
    server.borrow_mut().kill9();
    check_volume(vm, &format!("{data}/vol"))?;
    Ok(())
}

/// (c) The daemon (pohmelfs with its embedded store) is killed with SIGKILL while the guest
/// writes, then the guest loses power. A new daemon on the volume serves every fsynced byte;
/// the volume checks clean (pohmelfs).
pub fn crash_daemon_kill9(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &[])?;
    let daemon = vm.daemon().store(&url).start()?;
    let sums = first_guest(&daemon, false, CRASH, || {
        daemon.stop();
        Ok(())
    })?;
    drop(daemon);
    let daemon = vm.daemon().store(&url).start()?;
    verify_guest(&daemon, &sums)?;
    daemon.stop();
    drop(daemon);
    if vm.kind() == DaemonKind::Pohmelfs {
        check_volume(vm, &url)?;
    }
    Ok(())
}

/// The torture in the guest, on a `pohmel://` volume: a seeded run saves its model, the store
/// server and the daemon restart, and a second guest verifies the tree against the model; the
/// volume checks clean.
pub fn crash_torture_across_restarts(vm: &VmTest) -> Result<()> {
    let data = format!("file://{}/store", vm.dir().display());
    let mut server = StoreServer::start(vm.dir(), &data)?;
    let url = format!("pohmel://{}/vol", server.addr());
    let daemon = vm.daemon().store(&url).start()?;
    let out = Guest::new(&daemon)
        .with_pohmelfs()
        .memory_mb(GUEST_MB)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
mkdir /mnt/t
step torture
pohmelfs torture --dir /mnt/t --seed 7 --ops 1500 --full-every 500 --save-model /mnt/model
umount /mnt
"#,
        )
        .run()?
        .expect_success()?;
    let summary = out
        .console
        .lines()
        .filter(|l| l.starts_with("torture: "))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("torture in the guest:\n{}", summary.replace('\r', ""));
    daemon.stop();
    drop(daemon);
    server.restart()?;
    let daemon = vm.daemon().store(&url).start()?;
    Guest::new(&daemon)
        .with_pohmelfs()
        .memory_mb(GUEST_MB)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "verify the saved model"
pohmelfs torture --verify /mnt/model
umount /mnt
"#,
        )
        .run()?
        .expect_success()?;
    daemon.stop();
    server.kill9();
    check_volume(vm, &format!("{data}/vol"))?;
    Ok(())
}
