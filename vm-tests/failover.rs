//! A store server restarted under a writing guest (pohmelfs only): the guest
//! writes and fsyncs file after file while the host kills the `pohmelfs store`
//! process with SIGKILL and starts it again on the same port and data. No
//! write or fsync may fail, and every file must read back with its checksum
//! after a remount, and from a second guest once the daemon itself restarted
//! on the same store.

use std::path::Path;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use crate::harness::qemu::GuestOutput;
use crate::harness::status::counter;
use crate::harness::store::StoreServer;
use crate::harness::{log_tail, wait_until, Daemon, Failure, Guest, Result, VmTest};

/// Files of 1 MiB the guest writes.
const FILES: u32 = 40;
/// The store dies once the guest has written this much through the daemon.
const KILL_AFTER_BYTES: u64 = 4 << 20;
/// The store stays down until the daemon has logged this many resends.
const RESENDS_BEFORE_RESTART: usize = 4;
/// Bound on each host-side wait for the guest or the daemon.
const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);
/// Polls for unacknowledged data, which lasts milliseconds per transaction.
const KILL_POLL: Duration = Duration::from_millis(2);

/// The first guest: write and fsync every file, keeping the checksum of what
/// it wrote in guest memory; then remount and check them all.
fn write_script() -> String {
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
mkdir -p /mnt/f
: > /tmp/sums
step "write and fsync {FILES} files"
i=1
while [ $i -le {FILES} ]; do
    dd if=/dev/urandom of=/tmp/src bs=1M count=1 iflag=fullblock 2>/dev/null
    dd if=/tmp/src of=/mnt/f/$i bs=1M conv=fsync 2>/dev/null || fail "dd of file $i"
    echo "$(sha256sum < /tmp/src | cut -d' ' -f1)  $i" >> /tmp/sums
    echo "WROTE=$i"
    i=$((i + 1))
done
step "remount and check every file"
umount /mnt
mount -t virtiofs "$TAG" /mnt
cd /mnt/f
if ! sha256sum -c /tmp/sums > /tmp/check 2>&1; then
    grep -v ': OK$' /tmp/check || true
    fail "checksums after remount"
fi
cd /
echo "ALL=$(sha256sum < /tmp/sums | cut -d' ' -f1)"
umount /mnt
"#
    )
}

/// The second guest: the same list of checksums, computed from the volume.
fn check_script(all: &str) -> String {
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "checksums of every file"
cd /mnt/f
: > /tmp/sums
i=1
while [ $i -le {FILES} ]; do
    echo "$(sha256sum < $i | cut -d' ' -f1)  $i" >> /tmp/sums
    i=$((i + 1))
done
cd /
expect_eq "$(sha256sum < /tmp/sums | cut -d' ' -f1)" "{all}" "sha256 of the list of checksums"
umount /mnt
"#
    )
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// What the host did to the store while the guest ran.
struct Restart {
    /// Bytes the daemon held unacknowledged just after the kill.
    dirty_at_kill: u64,
    /// From SIGKILL until the new process listened.
    outage: Duration,
    /// From the new process listening until the daemon's next acknowledged
    /// transaction.
    recovery: Duration,
    /// The first resend the daemon logged.
    first_resend: String,
}

/// Kills the store once the guest is writing and the daemon holds data the
/// store has not acknowledged, keeps it down until the daemon has resent
/// [`RESENDS_BEFORE_RESTART`] times, and starts it again; returns the timings.
fn restart_under_guest(
    daemon: &Daemon,
    server: &mut StoreServer,
    guest: &ScopedJoinHandle<'_, Result<GuestOutput>>,
) -> Result<Restart> {
    let writing = wait_until(WAIT, KILL_POLL, || {
        if guest.is_finished() {
            return Some(false);
        }
        let written = counter(daemon, "bytes_written")?;
        let dirty = counter(daemon, "dirty_bytes")?;
        (written >= KILL_AFTER_BYTES && dirty > 0).then_some(true)
    });
    match writing {
        Some(true) => {}
        Some(false) => {
            return Err(Failure::new(
                "the guest ended before the store could be killed under it",
            ))
        }
        None => {
            return Err(Failure::new(format!(
                "the daemon never held unacknowledged data after {KILL_AFTER_BYTES} bytes \
                 written, within {WAIT:?}\n{}",
                daemon.log_report()
            )))
        }
    }
    let log_before = file_len(daemon.log_path());
    server.kill9();
    let killed = Instant::now();
    let dirty_at_kill = counter(daemon, "dirty_bytes").unwrap_or(0);
    let resends = wait_until(WAIT, POLL, || {
        let log = std::fs::read(daemon.log_path()).unwrap_or_default();
        let new = String::from_utf8_lossy(log.get(log_before as usize..).unwrap_or_default());
        let resends: Vec<&str> = new.lines().filter(|l| l.contains("resend")).collect();
        if resends.len() >= RESENDS_BEFORE_RESTART {
            return Some(resends[0].trim().to_owned());
        }
        guest.is_finished().then(String::new)
    });
    let first_resend = match resends {
        Some(line) if !line.is_empty() => line,
        _ => {
            return Err(Failure::new(format!(
                "the daemon did not log {RESENDS_BEFORE_RESTART} resends to the dead store \
                 within {WAIT:?} (or the guest ended)\n{}",
                daemon.log_report()
            )))
        }
    };
    let acked_before = counter(daemon, "txn_acked").unwrap_or(0);
    server.restart()?;
    let restarted = Instant::now();
    let acked = wait_until(WAIT, POLL, || {
        counter(daemon, "txn_acked").filter(|&n| n > acked_before)
    });
    if acked.is_none() {
        return Err(Failure::new(format!(
            "no transaction acknowledged within {WAIT:?} of the store's restart\n{}\n\
             --- store log ---\n{}",
            daemon.log_report(),
            log_tail(server.log_path(), 30)
        )));
    }
    Ok(Restart {
        dirty_at_kill,
        outage: restarted - killed,
        recovery: restarted.elapsed(),
        first_resend,
    })
}

/// The guest writes and fsyncs 40 files of 1 MiB while the store server is
/// killed and restarted; every dd succeeds and every checksum matches, after a
/// remount and in a second guest on a restarted daemon.
pub fn failover_store_restart_under_guest_fsyncs(vm: &VmTest) -> Result<()> {
    let mut server = StoreServer::start(vm.dir(), &format!("file://{}/store", vm.dir().display()))?;
    let url = format!("pohmel://{}/vol", server.addr());
    let daemon = vm
        .daemon()
        .store(&url)
        .arg("--ack-timeout-ms")
        .arg("500")
        .arg("--fsync-timeout-ms")
        .arg("60000")
        .start()?;
    let script = write_script();
    let (restart, out) = std::thread::scope(|scope| {
        let guest = scope.spawn(|| Guest::new(&daemon).script(&script).run());
        let restart = restart_under_guest(&daemon, &mut server, &guest);
        let out = guest
            .join()
            .unwrap_or_else(|_| Err(Failure::new("the guest thread panicked")));
        (restart, out)
    });
    let out = out?.expect_success()?;
    let restart = restart?;
    let wrote = out.value("WROTE").unwrap_or("none");
    if wrote != FILES.to_string() {
        return Err(Failure::new(format!(
            "the guest wrote {wrote} files of {FILES}"
        )));
    }
    let all = out
        .value("ALL")
        .filter(|s| s.len() == 64)
        .map(str::to_owned)
        .ok_or_else(|| Failure::new("the first guest printed no ALL=<sha256> line"))?;
    let count = |name| counter(&daemon, name).unwrap_or(0);
    eprintln!(
        "store restart under the guest: {} bytes unacknowledged at the kill; outage {:.2?} \
         (kill -9 until listening again); first ack {:.2?} after the restart; the daemon's \
         first resend: {}; txn acked {}, resent {}, duplicate acks {}, fsync calls {}, fsync \
         errors {}",
        restart.dirty_at_kill,
        restart.outage,
        restart.recovery,
        restart.first_resend,
        count("txn_acked"),
        count("txn_resent"),
        count("txn_duplicate_acks"),
        count("fsync_calls"),
        count("fsync_errors")
    );
    if count("fsync_errors") != 0 {
        return Err(Failure::new(format!(
            "the daemon answered {} fsyncs with EIO\n{}",
            count("fsync_errors"),
            daemon.log_report()
        )));
    }

    daemon.stop();
    drop(daemon);
    let daemon = vm.daemon().store(&url).start()?;
    Guest::new(&daemon)
        .script(&check_script(&all))
        .run()?
        .expect_success()?;
    Ok(())
}
