//! Durability: data survives the page cache, an unmount, a reboot of the guest, and a daemon
//! killed with SIGKILL after a plain `sync`, or (pohmelfs with `--sync-on-close`) after a
//! plain close.
//!
//! Every reference checksum is taken from an independent copy of the data in the guest (its
//! `/tmp`, or the stream as it was written), never by reading the file back through the daemon
//! under test.

use std::time::Duration;

use crate::harness::qemu::GuestOutput;
use crate::harness::{DaemonKind, Failure, Guest, Result, VmTest};

/// The guest's bound in [`big_file_fsync`]: its own CPU work (256 MiB from
/// `/dev/urandom`, checksummed twice) took 280 s of the default 300 under
/// TCG on a slower machine, whichever daemon served it, and 576-586 s
/// with two such guests at once beside a build.
const BIG_FILE_TIMEOUT: Duration = Duration::from_secs(1200);

/// 256 MiB written with fsync, caches dropped, read back with the checksum of what was written.
pub fn big_file_fsync(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    Guest::new(&daemon)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write 256 MiB with fsync"
# The stream is checksummed on its way to the file, through a FIFO.
mkfifo /tmp/stream
sha256sum < /tmp/stream | cut -d' ' -f1 > /tmp/written &
dd if=/dev/urandom bs=1M count=256 iflag=fullblock 2>/dev/null | tee /tmp/stream \
    | dd of=/mnt/big bs=1M iflag=fullblock conv=fsync
wait
expect_eq "$(stat -c %s /mnt/big)" 268435456 "size"
written=$(cat /tmp/written)
expect_eq "${#written}" 64 "length of the checksum of the stream"
step "drop caches and read back"
echo 3 > /proc/sys/vm/drop_caches
read_back=$(sha256sum /mnt/big | cut -d' ' -f1)
expect_eq "$read_back" "$written" "sha256 after dropping caches"
rm /mnt/big
umount /mnt
"#,
        )
        .timeout(BIG_FILE_TIMEOUT)
        .run()?
        .expect_success()?;
    Ok(())
}

/// Data written before an unmount is there after mounting again.
pub fn remount(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    Guest::new(&daemon)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step write
mkdir /mnt/keep
head -c 8388608 /dev/urandom > /tmp/data
cp /tmp/data /mnt/keep/data
printf 'small file\n' > /mnt/keep/small
ln -s data /mnt/keep/link
chmod 604 /mnt/keep/small
sum=$(sha256sum /tmp/data | cut -d' ' -f1)
step umount
umount /mnt
grep -q " /mnt " /proc/mounts && fail "/mnt still mounted"
step "mount again"
mount -t virtiofs "$TAG" /mnt
expect_eq "$(sha256sum /mnt/keep/data | cut -d' ' -f1)" "$sum" "sha256 of data"
expect_eq "$(cat /mnt/keep/small)" "small file" "content of small"
expect_eq "$(stat -c %a /mnt/keep/small)" 604 "mode of small"
expect_eq "$(readlink /mnt/keep/link)" "data" "link target"
umount /mnt
"#,
        )
        .run()?
        .expect_success()?;
    Ok(())
}

/// A guest writes and powers off; a second guest on the same daemon sees the data.
pub fn reboot(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    let first = Guest::new(&daemon)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step write
mkdir /mnt/boot1
head -c 16777216 /dev/urandom > /tmp/data
cp /tmp/data /mnt/boot1/data
printf 'written by the first guest\n' > /mnt/boot1/note
echo "DATA-SHA256=$(sha256sum /tmp/data | cut -d' ' -f1)"
# No umount: init syncs and powers off, as a guest shutting down would.
"#,
        )
        .run()?
        .expect_success()?;
    let sum = first
        .value("DATA-SHA256")
        .filter(|sum| sum.len() == 64)
        .ok_or_else(|| Failure::new("the first guest printed no DATA-SHA256=<sha256> line"))?;
    Guest::new(&daemon)
        .script(&format!(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "read what the first guest wrote"
expect_eq "$(cat /mnt/boot1/note)" "written by the first guest" "content of note"
expect_eq "$(sha256sum /mnt/boot1/data | cut -d' ' -f1)" "{sum}" "sha256 of data"
rm -r /mnt/boot1
umount /mnt
"#
        ))
        .run()?
        .expect_success()?;
    Ok(())
}

/// The console line at which the host kills the daemon.
const SYNCED: &str = "POHMELFS-MARK=synced";
/// Bytes the guest writes through its held descriptor.
const SYNC_BYTES: u32 = 100_000;

/// The first guest writes through a descriptor a process keeps open (no close, so no FLUSH),
/// calls plain `sync` (no fsync) and prints [`SYNCED`]; the host then kills the daemon with
/// SIGKILL and cuts the guest's power. A new daemon on the same volume serves the data with the checksum of
/// the guest's copy in `/tmp`.
///
/// pohmelfs runs with the longest metadata linger it allows (1 s), so the new file's
/// transaction stays in the daemon unless `sync` sends it: without SYNCFS handling the data is
/// lost. virtiofsd writes through to its shared directory, where a SIGKILL loses nothing.
pub fn plain_sync_survives_daemon_kill9(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &[])?;
    let mut first = vm.daemon().store(&url);
    if vm.kind() == DaemonKind::Pohmelfs {
        first = first.arg("--meta-linger-us").arg("1000000");
    }
    let daemon = first.start()?;
    let out = Guest::new(&daemon)
        .script(&format!(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write through a held descriptor"
head -c {SYNC_BYTES} /dev/urandom > /tmp/data
echo "SUM=$(sha256sum < /tmp/data | cut -d' ' -f1)"
# dd opens the file itself and, its input never ending, never closes it: every close of a
# descriptor (a shell's `>&3` included) would send FLUSH, which writes the inode back.
(cat /tmp/data; sleep 100000) | dd of=/mnt/synced bs=1M 2>/dev/null &
i=0
until [ "$(stat -c %s /mnt/synced 2>/dev/null)" = {SYNC_BYTES} ]; do
    i=$((i + 1))
    [ $i -le 6000 ] || fail "dd did not write {SYNC_BYTES} bytes within 300 s"
    sleep 0.05
done
step "plain sync, the descriptor still open"
sync
echo {SYNCED}
step "wait for the host"
while true; do sleep 1; done
"#
        ))
        .on_console(SYNCED, || {
            daemon.stop();
            Ok(())
        })
        .power_cut_at(SYNCED)
        .run()?;
    let sum = sum_before_mark(&out, SYNCED, "reached its sync")?;
    drop(daemon);
    expect_whole_after_restart(vm, &url, "synced", SYNC_BYTES, &sum)
}

/// The console line at which the host kills the daemon after the close.
const CLOSED: &str = "POHMELFS-MARK=closed";
/// Bytes of the closed file.
const CLOSE_BYTES: u32 = 300_000;

/// pohmelfs runs with `--sync-on-close`: the first guest writes a file, closes it (no fsync,
/// no sync) and prints [`CLOSED`]; the host then kills the daemon with SIGKILL and cuts the
/// guest's power. A new daemon on the same volume serves the file with the checksum of the
/// guest's copy in `/tmp`: the close waited until it was durable. (Without the flag a close
/// does not wait, and a crash may lose what was only closed, as a local disk's page cache
/// would: `docs/operations.md`.) virtiofsd writes through to its shared directory, where a
/// SIGKILL loses nothing.
pub fn sync_on_close_survives_daemon_kill9(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &[])?;
    let mut first = vm.daemon().store(&url);
    if vm.kind() == DaemonKind::Pohmelfs {
        first = first.arg("--sync-on-close");
    }
    let daemon = first.start()?;
    let out = Guest::new(&daemon)
        .script(&format!(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write and close"
head -c {CLOSE_BYTES} /dev/urandom > /tmp/data
echo "SUM=$(sha256sum < /tmp/data | cut -d' ' -f1)"
dd if=/tmp/data of=/mnt/closed bs=64k 2>/dev/null || fail "dd of closed"
echo {CLOSED}
step "wait for the host"
while true; do sleep 1; done
"#
        ))
        .on_console(CLOSED, || {
            daemon.stop();
            Ok(())
        })
        .power_cut_at(CLOSED)
        .run()?;
    let sum = sum_before_mark(&out, CLOSED, "closed its file")?;
    drop(daemon);
    expect_whole_after_restart(vm, &url, "closed", CLOSE_BYTES, &sum)
}

/// The `SUM=<sha256>` a first guest printed of the data it wrote, once it
/// has shown it reached `mark` (what it did there: `did`).
fn sum_before_mark(out: &GuestOutput, mark: &str, did: &str) -> Result<String> {
    let sum = out
        .value("SUM")
        .filter(|sum| sum.len() == 64)
        .map(str::to_owned)
        .ok_or_else(|| {
            Failure::new(format!(
                "the first guest printed no SUM=<sha256> line:\n{}",
                out.console
            ))
        })?;
    if !out.console.lines().any(|l| l.trim_end() == mark) {
        return Err(Failure::new(format!(
            "the first guest never {did}:\n{}",
            out.console
        )));
    }
    Ok(sum)
}

/// A new daemon on `url` serves `/mnt/NAME` with `bytes` bytes whose sha256
/// is `sum`: what the first guest wrote survived the daemon's SIGKILL.
fn expect_whole_after_restart(
    vm: &VmTest,
    url: &str,
    name: &str,
    bytes: u32,
    sum: &str,
) -> Result<()> {
    let daemon = vm.daemon().store(url).start()?;
    Guest::new(&daemon)
        .script(&format!(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "the {name} file is whole"
[ -e /mnt/{name} ] || fail "/mnt/{name} is missing after the daemon's SIGKILL"
expect_eq "$(stat -c %s /mnt/{name})" {bytes} "size of the {name} file"
expect_eq "$(sha256sum < /mnt/{name} | cut -d' ' -f1)" "{sum}" "sha256 of the {name} file"
umount /mnt
"#
        ))
        .run()?
        .expect_success()?;
    Ok(())
}
