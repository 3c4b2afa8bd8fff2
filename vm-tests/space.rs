//! A full volume (pohmelfs only: virtiofsd's shared directory has the host's capacity): a guest
//! writes past the capacity of a small embedded volume and must get ENOSPC, at the write or at
//! the fsync, promptly; not EIO after the fsync timeout, and not a write that waits forever.
//! Once the file is removed (and `sync` has waited for the removal to be stored) the volume
//! takes new data again.

use std::time::Duration;

use crate::harness::{Guest, Result, VmTest};

/// The volume's capacity in MiB; the guest writes twice that.
const CAPACITY_MIB: u32 = 8;
/// Bound on the whole guest. The daemon's fsync timeout is longer, so an EIO after that
/// timeout cannot pass for the answer, and a volume that never says ENOSPC fails here.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
/// The daemon's fsync timeout, beyond [`GUEST_TIMEOUT`].
const FSYNC_TIMEOUT_MS: u64 = 600_000;

/// The guest fills an 8 MiB volume with 16 MiB and expects ENOSPC from `dd` (its write or its
/// fsync); after removing the file and a `sync` it writes and fsyncs a small one.
pub fn full_volume_says_enospc(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &["--capacity", &format!("{CAPACITY_MIB}M")])?;
    let daemon = vm
        .daemon()
        .store(&url)
        .arg("--fsync-timeout-ms")
        .arg(FSYNC_TIMEOUT_MS.to_string())
        .start()?;
    let count = 2 * CAPACITY_MIB;
    Guest::new(&daemon)
        .timeout(GUEST_TIMEOUT)
        .script(&format!(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write {count} MiB with fsync into {CAPACITY_MIB} MiB"
if dd if=/dev/urandom of=/mnt/big bs=1M count={count} iflag=fullblock conv=fsync 2>/tmp/err; then
    fail "dd of {count} MiB into a {CAPACITY_MIB} MiB volume succeeded"
fi
cat /tmp/err
grep -q "No space left on device" /tmp/err || fail "expected ENOSPC from dd, got: $(cat /tmp/err)"
step "the volume takes data again once the file is gone"
rm /mnt/big
# A write may get ENOSPC until the daemon has stored the removal: sync waits for it.
sync
head -c 100000 /dev/urandom > /tmp/small
dd if=/tmp/small of=/mnt/small bs=65536 conv=fsync 2>/tmp/err || fail "dd of a small file after rm and sync: $(cat /tmp/err)"
expect_eq "$(sha256sum < /mnt/small | cut -d' ' -f1)" "$(sha256sum < /tmp/small | cut -d' ' -f1)" "sha256 of the small file"
umount /mnt
"#
        ))
        .run()?
        .expect_success()?;
    Ok(())
}
