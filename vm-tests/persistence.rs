//! Persistence: what a guest wrote and fsynced is there after the daemon is killed with
//! SIGKILL (pohmelfs on its embedded store, virtiofsd on its shared directory), and, for
//! pohmelfs only, after both the daemon and a store server are killed and restarted, on a
//! `pohmel://` volume.
//!
//! The first guest keeps a copy of every file in its `/tmp` and prints the checksum of that
//! copy, not of the files read back through the daemon.

use crate::harness::store::StoreServer;
use crate::harness::{Failure, Guest, Result, VmTest};

/// The first guest's workload: files of several sizes, fsynced; prints their sums.
const WRITE: &str = r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write and fsync"
mkdir -p /mnt/p/dir
dd if=/dev/urandom of=/tmp/big bs=1M count=24 iflag=fullblock 2>/dev/null
dd if=/tmp/big of=/mnt/p/big bs=1M conv=fsync
printf 'small\n' > /tmp/small
cp /tmp/small /mnt/p/dir/small
head -c 70000 /dev/urandom > /tmp/odd
cp /tmp/odd /mnt/p/dir/odd
ln -s dir/small /mnt/p/link
sync
echo "SUMS=$(cat /tmp/big /tmp/small /tmp/odd | sha256sum | cut -d' ' -f1)"
umount /mnt
"#;

/// The second guest's check against the first guest's sums.
fn check_script(sums: &str) -> String {
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "read back"
expect_eq "$(cd /mnt/p && cat big dir/small dir/odd | sha256sum | cut -d' ' -f1)" "{sums}" "sha256 of the files"
expect_eq "$(readlink /mnt/p/link)" "dir/small" "symlink target"
expect_eq "$(stat -c %s /mnt/p/big)" 25165824 "size of big"
umount /mnt
"#
    )
}

fn sums_of(out: &crate::harness::qemu::GuestOutput) -> Result<String> {
    out.value("SUMS")
        .filter(|s| s.len() == 64)
        .map(str::to_owned)
        .ok_or_else(|| Failure::new("the first guest printed no SUMS=<sha256> line"))
}

/// The daemon is killed with SIGKILL after the guest fsynced; a new daemon on the same
/// volume (pohmelfs: the embedded store, `file://`; virtiofsd: the shared directory) serves
/// the same bytes.
pub fn fsynced_data_survives_daemon_kill(vm: &VmTest) -> Result<()> {
    let store = vm.new_volume("volume", &[])?;
    let daemon = vm.daemon().store(&store).start()?;
    let out = Guest::new(&daemon).script(WRITE).run()?.expect_success()?;
    let sums = sums_of(&out)?;
    daemon.stop();
    drop(daemon);
    let daemon = vm.daemon().store(&store).start()?;
    Guest::new(&daemon)
        .script(&check_script(&sums))
        .run()?
        .expect_success()?;
    Ok(())
}

/// Store server (`pohmel://`): after the guest fsynced, the store server is killed
/// with SIGKILL and the daemon too; both restart and a new guest reads the same bytes.
pub fn store_server_restart(vm: &VmTest) -> Result<()> {
    let mut server = StoreServer::start(vm.dir(), &format!("file://{}/store", vm.dir().display()))?;
    let url = format!("pohmel://{}/vol", server.addr());
    let daemon = vm.daemon().store(&url).start()?;
    let out = Guest::new(&daemon).script(WRITE).run()?.expect_success()?;
    let sums = sums_of(&out)?;
    server.kill9();
    daemon.stop();
    drop(daemon);
    server.restart()?;
    let daemon = vm.daemon().store(&url).start()?;
    Guest::new(&daemon)
        .script(&check_script(&sums))
        .run()?
        .expect_success()?;
    Ok(())
}
