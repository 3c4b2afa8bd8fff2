//! Durability: data survives the page cache, an unmount, and a reboot of the guest.

use crate::harness::{Failure, Guest, Result, VmTest};

/// 256 MiB written with fsync, caches dropped, read back with the same checksum.
pub fn big_file_fsync(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    Guest::new(&daemon)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write 256 MiB with fsync"
dd if=/dev/urandom of=/mnt/big bs=1M count=256 iflag=fullblock conv=fsync
expect_eq "$(stat -c %s /mnt/big)" 268435456 "size"
written=$(sha256sum /mnt/big | cut -d' ' -f1)
step "drop caches and read back"
echo 3 > /proc/sys/vm/drop_caches
read_back=$(sha256sum /mnt/big | cut -d' ' -f1)
expect_eq "$read_back" "$written" "sha256 after dropping caches"
rm /mnt/big
umount /mnt
"#,
        )
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
head -c 8388608 /dev/urandom > /mnt/keep/data
printf 'small file\n' > /mnt/keep/small
ln -s data /mnt/keep/link
chmod 604 /mnt/keep/small
sum=$(sha256sum /mnt/keep/data | cut -d' ' -f1)
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
head -c 16777216 /dev/urandom > /mnt/boot1/data
printf 'written by the first guest\n' > /mnt/boot1/note
echo "DATA-SHA256=$(sha256sum /mnt/boot1/data | cut -d' ' -f1)"
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
