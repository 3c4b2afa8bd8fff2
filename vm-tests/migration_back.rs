//! Live migrations between hosts on `pohmel://` beyond the one hop of
//! [`crate::migration_hosts`]: the guest moves to the other host and back to a third daemon on
//! the first, and a guest moves while its store server is killed with SIGKILL and started
//! again. Through both the guest appends to a log, fsyncing each line, keeps a file open for
//! reading and writing and holds one it unlinked while open, and leaves a file written but
//! not fsynced when it moves (the source's drain must store it); at the end every fsynced
//! line is in the log exactly once, and the guest saw no error.
//!
//! Needs root (`ip netns`); without it the tests say they skip. QEMU 10 only, as
//! [`crate::migration`].

use std::fs;

use pohmelfs_testkit::Network;

use crate::harness::migration::{expect_handed_over, expect_taken_over, Migration, MIGRATE_MARKER};
use crate::harness::{Daemon, Failure, Result, VmTest};
use crate::migration_hosts::{handed_over_in_turn, netns_possible, store_server_with};

/// The store server's writer lease in these tests (`--writer-lease-ms`): short, so a
/// restarted server that waits a lease for its writer does not stretch the test.
const LEASE_MS: &str = "2000";

/// The guest's workload across `hops` migrations (1 or 2).
fn script(hops: usize) -> String {
    let back = if hops == 2 {
        format!(
            r#"
step "at the destination: move again"
echo {MIGRATE_MARKER}
step "wait for the harness's line after the way back"
read -r go <&4
expect_eq "$go" "go" "the harness's second line"
echo 3 > /proc/sys/vm/drop_caches
append 41 60
printf BACK >&3
"#
        )
    } else {
        String::new()
    };
    let tail = if hops == 2 { "AFTERBACK" } else { "AFTER" };
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "files before the migration"
head -c 300000 /dev/urandom > /tmp/kept
cp /tmp/kept /mnt/kept
exec 3<>/mnt/kept
head -c 100000 /dev/urandom > /tmp/gone
cp /tmp/gone /mnt/gone
exec 5</mnt/gone
rm /mnt/gone
: > /tmp/log
append() {{
    for i in $(seq "$1" "$2"); do
        echo "line $i" >> /tmp/log
        echo "line $i" >> /mnt/log || fail "append line $i"
        dd if=/dev/null of=/mnt/log conv=notrunc,fsync 2>/dev/null || fail "fsync line $i"
    done
}}
append 1 20
sync
step "written, not fsynced: the source's drain stores it"
head -c 200000 /dev/urandom > /tmp/dirty
cp /tmp/dirty /mnt/dirty
exec 4</dev/ttyS1
echo {MIGRATE_MARKER}
step "wait for the harness's line after the migration"
read -r go <&4
expect_eq "$go" "go" "the harness's line"
echo 3 > /proc/sys/vm/drop_caches
expect_eq "$(sha256sum < /mnt/dirty)" "$(sha256sum < /tmp/dirty)" "the file written, not fsynced, before the migration"
append 21 40
expect_eq "$(cat <&3 | sha256sum)" "$(sha256sum < /tmp/kept)" "kept, read through its descriptor"
printf AFTER >&3
{back}
exec 3>&-
step "the files as written, every fsynced line once"
expect_eq "$(cat <&5 | sha256sum)" "$(sha256sum < /tmp/gone)" "the unlinked file through its descriptor"
exec 5<&-
sync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "$(sha256sum < /mnt/log)" "$(sha256sum < /tmp/log)" "the fsynced lines, each once"
expect_eq "$(cat /mnt/kept | sha256sum)" "$( (cat /tmp/kept; printf {tail}) | sha256sum)" "kept as written through its descriptor"
umount /mnt
"#
    )
}

/// The guest moves from host 1 to host 2 and back to a third daemon on host 1, through the
/// same descriptors; the store server sees the three daemons in turn, each connecting only
/// once the one before let the volume go, on one epoch of the volume.
pub fn migration_there_and_back_pohmel(vm: &VmTest) -> Result<()> {
    if !netns_possible() {
        return Ok(());
    }
    // Declared first, dropped last: the processes in its namespaces go first.
    let net = Network::new(2)?;
    let (server, url) = store_server_with(vm, &net, &["--writer-lease-ms", LEASE_MS])?;
    let daemon = |name: &str, host: usize| -> Result<_> {
        Ok(vm.daemon_in(name)?.in_netns(net.host(host)).store(&url))
    };
    let source = daemon("src", 1)?.start()?;
    let destination = daemon("dst", 2)?.arg("--incoming").start()?;
    let back = daemon("back", 1)?.arg("--incoming").start()?;
    let migrated = Migration::new(vm.dir(), &source, &destination)
        .back(&back)
        .script(&script(2))
        .run()?;
    eprintln!(
        "there and back: live migration downtime {} ms, back {:?} ms",
        migrated.downtime_ms, migrated.back_downtime_ms
    );
    migrated.output.expect_success()?;
    expect_handed_over(&source, "source")?;
    expect_taken_over(&destination, "destination")?;
    expect_handed_over(&destination, "destination")?;
    expect_taken_over(&back, "way back")?;
    let log = fs::read_to_string(server.log_path()).unwrap_or_default();
    let (a, b) = (Network::host_addr(1), Network::host_addr(2));
    match handed_over_in_turn(&log, &[a, b, a]) {
        Ok(epochs) if epochs.len() == 1 => Ok(()),
        Ok(epochs) => Err(format!(
            "the store server opened the volume at epochs {epochs:?}"
        )),
        Err(e) => Err(e),
    }
    .map_err(|f| store_failure(&f, &server, &[&source, &destination, &back]))
}

/// The store server is killed with SIGKILL and started again while QEMU holds the migration
/// before its switchover (the guest stopped at the source, which holds the volume and has not
/// drained yet): the source drains to the restarted server, lets the volume go, and the
/// destination takes it; the migration completes with nothing lost.
pub fn store_restart_during_migration_pohmel(vm: &VmTest) -> Result<()> {
    if !netns_possible() {
        return Ok(());
    }
    let net = Network::new(2)?;
    let (mut server, url) = store_server_with(vm, &net, &["--writer-lease-ms", LEASE_MS])?;
    let daemon = |name: &str, host: usize| -> Result<_> {
        Ok(vm.daemon_in(name)?.in_netns(net.host(host)).store(&url))
    };
    let source = daemon("src", 1)?.start()?;
    let destination = daemon("dst", 2)?.arg("--incoming").start()?;
    let mut restarts = 0;
    let migrated = Migration::new(vm.dir(), &source, &destination)
        .at_switchover(|| {
            restarts += 1;
            server.kill9();
            server.restart()
        })
        .script(&script(1))
        .run()?;
    eprintln!(
        "store restarted during the migration: downtime {} ms, total {} ms",
        migrated.downtime_ms, migrated.total_ms
    );
    migrated.output.expect_success()?;
    if restarts != 1 {
        return Err(Failure::new(format!(
            "the store server was restarted {restarts} times, not once"
        )));
    }
    expect_handed_over(&source, "source")?;
    expect_taken_over(&destination, "destination")?;
    let log = fs::read_to_string(server.log_path()).unwrap_or_default();
    let (a, b) = (Network::host_addr(1), Network::host_addr(2));
    match handed_over_in_turn(&log, &[a, b]) {
        Ok(epochs) if epochs.len() == 2 => Ok(()),
        Ok(epochs) => Err(format!(
            "the store server opened the volume at epochs {epochs:?}, not twice (a restart)"
        )),
        Err(e) => Err(e),
    }
    .map_err(|f| store_failure(&f, &server, &[&source, &destination]))
}

fn store_failure(
    why: &str,
    server: &crate::harness::store::StoreServer,
    daemons: &[&Daemon],
) -> Failure {
    let mut report = format!(
        "{why}\n--- store server log ({}) ---\n{}",
        server.log_path().display(),
        crate::harness::log_tail(server.log_path(), 80)
    );
    for d in daemons {
        report.push('\n');
        report.push_str(&d.log_report());
    }
    Failure::new(report)
}
