//! Boot and mount: the guest finds the virtio-fs device and mounts it.

use crate::harness::{Guest, Result, VmTest};

/// Mounts the tag, checks `/mnt` is a virtiofs directory, and unmounts it.
pub fn boot_and_mount(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    Guest::new(&daemon)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "stat /mnt"
expect_eq "$(stat -c %F /mnt)" "directory" "type of /mnt"
step "/proc/mounts"
grep -q "^$TAG /mnt virtiofs " /proc/mounts || fail "no virtiofs on /mnt: $(cat /proc/mounts)"
step "df /mnt"
df /mnt
df /mnt | grep -q "^$TAG " || fail "df does not show $TAG"
step "readdir of the root"
ls -la /mnt
step umount
umount /mnt
grep -q " /mnt " /proc/mounts && fail "/mnt still mounted"
echo ok
"#,
        )
        .run()?
        .expect_success()?;
    Ok(())
}
