//! Live migration: a guest moves between two QEMU 10 processes on this host while it keeps
//! files open on the virtio-fs mount, and goes on reading and writing them through the same
//! descriptors at the destination. pohmelfs: two daemons on one `file://` volume, the
//! destination started with `--incoming`; the guest also holds a file it unlinked while it
//! was open. virtiofsd: two daemons on one shared directory (virtiofsd's `find-paths`
//! migration cannot carry an unlinked file, so its guest holds none). Prints the downtime
//! QEMU reports, to compare the two daemons. And a migration the destination refuses: the
//! guest goes on at the source, which opens the volume again.
//! The same between hosts: [`crate::migration_hosts`].
//!
//! QEMU 7.2 cannot migrate a vhost-user-fs device (its `migrate` answers "State blocked by
//! non-migratable device"): `scripts/test` runs these in its QEMU 10 pass only
//! (`QEMU=target/qemu10/qemu-system-x86_64 cargo test --test vm migration`).

use crate::harness::migration::{expect_handed_over, expect_taken_over, Migration, MIGRATE_MARKER};
use crate::harness::{DaemonKind, Result, VmTest};

/// The guest's workload; `unlinked` adds the file unlinked while open.
pub(crate) fn script(unlinked: bool) -> String {
    let (before, after) = if unlinked {
        (
            r#"
head -c 100000 /dev/urandom > /tmp/gone
cp /tmp/gone /mnt/gone
exec 5</mnt/gone
rm /mnt/gone
"#,
            r#"
expect_eq "$(cat <&5 | sha256sum)" "$(sha256sum < /tmp/gone)" "the unlinked file through its descriptor"
[ ! -e /mnt/gone ] || fail "the unlinked file has a name again"
exec 5<&-
"#,
        )
    } else {
        ("", "")
    };
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "open files before the migration"
head -c 300000 /dev/urandom > /tmp/kept
cp /tmp/kept /mnt/kept
exec 3<>/mnt/kept
{before}
exec 4</dev/ttyS1
sync
echo {MIGRATE_MARKER}
step "wait for the harness's line after the migration"
read -r go <&4
expect_eq "$go" "go" "the harness's line"
step "drop the guest's caches: reads go to the daemon"
echo 3 > /proc/sys/vm/drop_caches
step "read and write through the descriptors opened before the migration"
expect_eq "$(cat <&3 | sha256sum)" "$(sha256sum < /tmp/kept)" "kept, read through its descriptor"
printf AFTER >&3
exec 3>&-
{after}
step "the file as written after the migration"
sync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "$(cat /mnt/kept | sha256sum)" "$( (cat /tmp/kept; printf AFTER) | sha256sum)" "kept after the write"
umount /mnt
"#
    )
}

/// The guest moves while it holds open files; the destination serves them.
pub fn live_migration_keeps_open_files(vm: &VmTest) -> Result<()> {
    let (source, destination, unlinked) = match vm.kind() {
        DaemonKind::Pohmelfs => {
            let url = vm.new_volume("volume", &[])?;
            let source = vm.daemon_in("src")?.store(&url).start()?;
            let destination = vm.daemon_in("dst")?.store(&url).arg("--incoming").start()?;
            (source, destination, true)
        }
        DaemonKind::Virtiofsd => {
            // One shared directory for both, as one volume for pohmelfs.
            let shared = vm.dir().join("shared");
            let source = vm.daemon_in("src")?.shared_dir(&shared).start()?;
            let destination = vm.daemon_in("dst")?.shared_dir(&shared).start()?;
            (source, destination, false)
        }
    };
    let migrated = Migration::new(vm.dir(), &source, &destination)
        .script(&script(unlinked))
        .run()?;
    let downtime = format!(
        "{}: live migration downtime {} ms, total {} ms",
        vm.kind(),
        migrated.downtime_ms,
        migrated.total_ms
    );
    eprintln!("{downtime}");
    migrated.output.expect_success()?;
    if vm.kind() == DaemonKind::Pohmelfs {
        expect_handed_over(&source, "source")?;
        expect_taken_over(&destination, "destination")?;
    }
    Ok(())
}

/// The destination refuses the guest (it negotiated the FUSE write-back cache, which the
/// destination does not offer): QEMU fails the migration and resumes the guest at the
/// source, whose volume was let go once the state was out. The source opens the volume
/// again at the guest's next request, sparing the file unlinked while open, and the guest
/// goes on there through the same descriptors.
pub fn refused_migration_resumes_at_the_source(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &[])?;
    let source = vm
        .daemon_in("src")?
        .store(&url)
        .arg("--writeback-cache")
        .start()?;
    let destination = vm.daemon_in("dst")?.store(&url).arg("--incoming").start()?;
    Migration::new(vm.dir(), &source, &destination)
        .script(&script(true))
        .run_refused()
}
