//! A snapshot served read-only (pohmelfs only: virtiofsd has no volumes or snapshots): a
//! guest writes files, the daemon takes a snapshot through its control socket, a second
//! guest changes the files; then `pohmelfs serve --readonly` of `file:///VOL@NAME` serves
//! the snapshot's point in time to a third guest, whose every change fails with "Read-only
//! file system".

use std::process::Command;

use crate::harness::{Daemon, Failure, Guest, Result, VmTest};

/// The first guest's files, and the sum of their bytes.
const WRITE: &str = r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write"
mkdir -p /mnt/r/dir
head -c 3000000 /dev/urandom > /mnt/r/big
printf 'small\n' > /mnt/r/dir/small
ln -s dir/small /mnt/r/link
sync
echo "SUMS=$(cat /mnt/r/big /mnt/r/dir/small | sha256sum | cut -d' ' -f1)"
umount /mnt
"#;

/// The second guest changes what the snapshot holds.
const CHANGE: &str = r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "change after the snapshot"
head -c 1000000 /dev/urandom > /mnt/r/big
rm /mnt/r/dir/small
touch /mnt/r/later
sync
umount /mnt
"#;

/// The third guest reads the snapshot and tries to change it.
fn check_script(sums: &str) -> String {
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "read the snapshot"
expect_eq "$(cd /mnt/r && cat big dir/small | sha256sum | cut -d' ' -f1)" "{sums}" "sha256 of the files"
expect_eq "$(readlink /mnt/r/link)" "dir/small" "symlink target"
expect_eq "$(ls /mnt/r)" "$(printf 'big\ndir\nlink')" "the snapshot's names"
step "every change fails: read-only"
refused() {{
    if "$@" 2>/tmp/err; then fail "$* succeeded on a read-only volume"; fi
    grep -q "Read-only file system" /tmp/err || fail "$*: expected EROFS, got: $(cat /tmp/err)"
}}
refused touch /mnt/r/new
refused touch /mnt/r/big
refused mkdir /mnt/r/newdir
refused rm /mnt/r/dir/small
refused mv /mnt/r/big /mnt/r/big2
refused ln -s big /mnt/r/link2
refused chmod 600 /mnt/r/big
refused truncate -s 0 /mnt/r/big
refused sh -c 'echo x >> /mnt/r/big'
expect_eq "$(cd /mnt/r && cat big dir/small | sha256sum | cut -d' ' -f1)" "{sums}" "sha256 after the refusals"
umount /mnt
"#
    )
}

/// `pohmelfs snapshot create VOLUME NAME --socket-path` through the serving daemon.
fn snapshot_through(daemon: &Daemon, url: &str, name: &str) -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
        .args(["snapshot", "create", url, name, "--socket-path"])
        .arg(daemon.socket())
        .output()
        .map_err(|e| Failure::new(format!("run pohmelfs snapshot: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "pohmelfs snapshot create: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// See the module documentation.
pub fn readonly_snapshot_refuses_changes(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &[])?;
    let daemon = vm.daemon().store(&url).start()?;
    let out = Guest::new(&daemon).script(WRITE).run()?.expect_success()?;
    let sums = out
        .value("SUMS")
        .filter(|s| s.len() == 64)
        .map(str::to_owned)
        .ok_or_else(|| Failure::new("the first guest printed no SUMS=<sha256> line"))?;
    snapshot_through(&daemon, &url, "monday")?;
    Guest::new(&daemon).script(CHANGE).run()?.expect_success()?;
    daemon.terminate()?;
    drop(daemon);
    let daemon = vm
        .daemon()
        .store(format!("{url}@monday"))
        .arg("--readonly")
        .start()?;
    Guest::new(&daemon)
        .script(&check_script(&sums))
        .run()?
        .expect_success()?;
    Ok(())
}
