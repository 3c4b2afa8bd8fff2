//! Live migration: a guest moves between two QEMU 10 processes on this host while it keeps
//! files open on the virtio-fs mount, and goes on reading and writing them through the same
//! descriptors at the destination. pohmelfs: two daemons on one `file://` volume, the
//! destination started with `--incoming`; the guest also holds a file it unlinked while it
//! was open. virtiofsd: two daemons on one shared directory (virtiofsd's `find-paths`
//! migration cannot carry an unlinked file, so its guest holds none). Prints the downtime
//! QEMU reports, to compare the two daemons. And a migration the destination refuses: the
//! guest goes on at the source, which opens the volume again.
//!
//! Between hosts: the two daemons run in two network namespaces of their own
//! ([`pohmelfs_testkit::Network`]) and reach one `pohmelfs store` server, or one S3 service
//! (moto), in a third; the store server's log shows the destination's daemon connecting only
//! once every connection of the source's had closed, on one epoch of the volume.
//!
//! QEMU 7.2 cannot migrate a vhost-user-fs device (its `migrate` answers "State blocked by
//! non-migratable device"): `scripts/test` runs these in its QEMU 10 pass only
//! (`QEMU=target/qemu10/qemu-system-x86_64 cargo test --test vm migration`).

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;

use pohmelfs_testkit::{Moto, Network};

use crate::harness::migration::{Migration, MIGRATE_MARKER};
use crate::harness::store::StoreServer;
use crate::harness::{Daemon, DaemonKind, Failure, Result, VmTest};

/// The store server's secret: a server off loopback needs one.
const SECRET: &str = "migration-between-hosts";

/// The guest's workload; `unlinked` adds the file unlinked while open.
fn script(unlinked: bool) -> String {
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
        expect_logged(
            &source,
            "source",
            "volume let go: another daemon may open it",
        )?;
        expect_logged(&destination, "destination", "spared=1")?;
        expect_logged(
            &destination,
            "destination",
            "migration: guest session taken over",
        )?;
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
    let migrated = Migration::new(vm.dir(), &source, &destination)
        .script(&script(true))
        .refused()
        .run()?;
    migrated.output.expect_success()?;
    expect_logged(&destination, "destination", "refused the device state")?;
    expect_logged(
        &source,
        "source",
        "volume let go: another daemon may open it",
    )?;
    expect_logged(&source, "source", "opening it again")?;
    expect_logged(&source, "source", "spared=1")?;
    Ok(())
}

/// The guest moves between two hosts (network namespaces) whose daemons reach one store
/// server in a third: the destination connects to it only once the source let the volume go.
pub fn migration_between_hosts_pohmel(vm: &VmTest) -> Result<()> {
    if !netns_possible() {
        return Ok(());
    }
    // Declared first, dropped last: the processes in its namespaces go first.
    let net = Network::new(2)?;
    let data = format!("file://{}/store", vm.dir().display());
    let server =
        StoreServer::start_in(vm.dir(), &data, SECRET, net.hub(), Network::SERVICE.into())?;
    let url = format!(
        "pohmel://{}/vol?secret_file={}",
        server.addr(),
        StoreServer::secret_file(vm.dir()).display()
    );
    let (source, destination) = migrate_between_hosts(vm, &net, &url, &[])?;
    let log = fs::read_to_string(server.log_path()).unwrap_or_default();
    let report = || {
        format!(
            "--- store server log ({}) ---\n{}\n{}\n{}",
            server.log_path().display(),
            crate::harness::log_tail(server.log_path(), 60),
            source.log_report(),
            destination.log_report()
        )
    };
    let epoch = handed_over_at_the_store(&log, Network::host_addr(1), Network::host_addr(2))
        .map_err(|f| Failure::new(format!("{f}\n{}", report())))?;
    eprintln!("pohmel://: the store server opened the volume once, epoch {epoch}");
    for (daemon, which) in [(&source, "source"), (&destination, "destination")] {
        let text = fs::read_to_string(daemon.log_path()).unwrap_or_default();
        if text.contains("store durability epoch changed") {
            return Err(Failure::new(format!(
                "the {which} daemon saw the volume's epoch change\n{}",
                report()
            )));
        }
    }
    Ok(())
}

/// As [`migration_between_hosts_pohmel`], on an `s3://` volume in an S3 service (moto) the
/// two hosts reach: the destination opens the volume after the source let it go (its holder
/// record gone), one writer epoch later, which fences the source.
pub fn migration_between_hosts_s3(vm: &VmTest) -> Result<()> {
    if !netns_possible() {
        return Ok(());
    }
    let net = Network::new(2)?;
    let moto = Moto::start_in(vm.dir(), "pohmelfs-migration", net.hub(), Network::SERVICE)?;
    let url = moto.cli_url("vol");
    let mut format = net.host(1).command(env!("CARGO_BIN_EXE_pohmelfs"));
    format.envs(Moto::CLI_ENV);
    pohmelfs_testkit::format_volume_by(format, &url, &[])?;
    let (source, destination) = migrate_between_hosts(vm, &net, &url, &Moto::CLI_ENV)
        .map_err(|f| Failure::new(format!("{f}\n--- moto log ---\n{}", moto.log_tail())))?;
    // The engine's writer epoch: the destination's open fences the source's, after it let go.
    let line = |daemon: &Daemon, what: &str| {
        let log = fs::read_to_string(daemon.log_path()).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| l.contains(what))
            .map(str::to_owned)
    };
    let (opened_src, released, opened_dst) = (
        line(&source, "opened volume"),
        // SlateDB logs its close before the engine removes its holder record, which the
        // destination's open waits for: a strict order in time.
        line(&source, "db closed"),
        line(&destination, "opened volume"),
    );
    let fenced = match (&opened_src, &released, &opened_dst) {
        (Some(src), Some(released), Some(dst)) => {
            // Both logs start with an RFC 3339 UTC time of this host's clock.
            let at = |l: &str| l.split_whitespace().next().unwrap_or_default().to_owned();
            match (engine_epoch(src), engine_epoch(dst)) {
                (Some(a), Some(b)) if b == a + 1 && at(released) < at(dst) => Some((a, b)),
                _ => None,
            }
        }
        _ => None,
    };
    let Some((a, b)) = fenced else {
        return Err(Failure::new(format!(
            "expected the destination to open the volume after the source closed it, one \
             writer epoch later: source opened {opened_src:?}, closed {released:?}; \
             destination opened {opened_dst:?}\n{}\n{}",
            source.log_report(),
            destination.log_report()
        )));
    };
    eprintln!("s3://: writer epoch {a} at the source, {b} at the destination");
    Ok(())
}

/// The writer epoch in an engine's `opened volume … (slatedb, volume …, epoch N, …)` line.
fn engine_epoch(line: &str) -> Option<u64> {
    let rest = &line[line.find("epoch ")? + "epoch ".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Whether this test process may make network namespaces; if not, the test says it skips.
fn netns_possible() -> bool {
    let possible = pohmelfs_testkit::netns::can_make();
    if !possible {
        pohmelfs_testkit::skipped("needs root to make network namespaces (ip netns)");
    }
    possible
}

/// Daemons on hosts 1 (source) and 2 (destination, `--incoming`) of `net` serve `url`
/// (`envs` in their environment); the guest moves from one to the other holding a file open
/// and one unlinked while open, and checks both after.
fn migrate_between_hosts(
    vm: &VmTest,
    net: &Network,
    url: &str,
    envs: &[(&str, &str)],
) -> Result<(Daemon, Daemon)> {
    let daemon = |name: &str, host: usize| -> Result<_> {
        let mut builder = vm.daemon_in(name)?.in_netns(net.host(host)).store(url);
        for (key, value) in envs {
            builder = builder.env(key, value);
        }
        Ok(builder)
    };
    let source = daemon("src", 1)?.start()?;
    let destination = daemon("dst", 2)?.arg("--incoming").start()?;
    let migrated = Migration::new(vm.dir(), &source, &destination)
        .script(&script(true))
        .run()?;
    eprintln!(
        "between hosts: live migration downtime {} ms, total {} ms",
        migrated.downtime_ms, migrated.total_ms
    );
    migrated.output.expect_success()?;
    expect_logged(
        &source,
        "source",
        "volume let go: another daemon may open it",
    )?;
    expect_logged(&destination, "destination", "spared=1")?;
    expect_logged(
        &destination,
        "destination",
        "migration: guest session taken over",
    )?;
    Ok((source, destination))
}

/// Reads a store server's log in order: the connections of `source` (host address) must all
/// have closed before the first of `destination` is authenticated, each side must have
/// connected, and the server must have opened the volume once (one epoch, no failover).
/// The volume's epoch.
fn handed_over_at_the_store(
    log: &str,
    source: Ipv4Addr,
    destination: Ipv4Addr,
) -> std::result::Result<u64, String> {
    let (source, destination) = (format!("peer={source}:"), format!("peer={destination}:"));
    let mut open: BTreeSet<&str> = BTreeSet::new();
    let (mut source_seen, mut destination_seen) = (false, false);
    let mut epochs = Vec::new();
    for line in log.lines() {
        if line.contains("volume open") {
            let epoch = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("epoch="))
                .and_then(|e| e.parse::<u64>().ok());
            epochs.push(epoch.ok_or_else(|| format!("no epoch in {line:?}"))?);
        }
        let Some(peer) = line.split_whitespace().find(|w| w.starts_with("peer=")) else {
            continue;
        };
        if line.contains("client authenticated") {
            if peer.starts_with(&source) {
                source_seen = true;
                open.insert(peer);
            } else if peer.starts_with(&destination) {
                if !open.is_empty() {
                    return Err(format!(
                        "the destination connected ({peer}) while the source still had \
                         connections open: {open:?}"
                    ));
                }
                destination_seen = true;
            }
        } else if line.contains("connection closed") || line.contains("connection ended") {
            open.remove(peer);
        }
    }
    match (source_seen, destination_seen, epochs.as_slice()) {
        (true, true, [epoch]) => Ok(*epoch),
        (true, true, epochs) => Err(format!(
            "the store server opened the volume {} times (epochs {epochs:?}), not once",
            epochs.len()
        )),
        _ => Err(format!(
            "the store server saw no connection from {}",
            if source_seen {
                "the destination"
            } else {
                "the source"
            }
        )),
    }
}

/// Fails unless `daemon` (the `which` one) logged `line`.
fn expect_logged(daemon: &Daemon, which: &str, line: &str) -> Result<()> {
    let log = fs::read_to_string(daemon.log_path()).unwrap_or_default();
    if log.contains(line) {
        return Ok(());
    }
    Err(Failure::new(format!(
        "the {which} daemon did not log {line:?}\n{}",
        daemon.log_report()
    )))
}

#[cfg(test)]
mod tests {
    use super::handed_over_at_the_store;
    use std::net::Ipv4Addr;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 99, 2, 2);

    #[test]
    fn the_store_log_shows_the_hand_over() {
        let log = "INFO volume open volume=vol url=x epoch=7\n\
                   INFO client authenticated peer=10.99.1.2:4000 credential=default\n\
                   INFO client authenticated peer=10.99.1.2:4001 credential=default\n\
                   DEBUG connection closed peer=10.99.1.2:4001\n\
                   INFO connection ended peer=10.99.1.2:4000 error=x\n\
                   INFO client authenticated peer=10.99.2.2:5000 credential=default\n";
        assert_eq!(handed_over_at_the_store(log, SRC, DST), Ok(7));
    }

    #[test]
    fn the_engine_epoch_is_read() {
        let line = "2026-12-01T17:42:11Z INFO opened volume volume=s3://b/vol at http://x \
                    (slatedb, volume fbc7, epoch 3, commit=adaptive)";
        assert_eq!(super::engine_epoch(line), Some(3));
        assert_eq!(super::engine_epoch("opened volume (slatedb)"), None);
    }

    #[test]
    fn an_overlap_or_a_second_open_fails() {
        let overlap = "INFO volume open volume=vol epoch=7\n\
                       INFO client authenticated peer=10.99.1.2:4000\n\
                       INFO client authenticated peer=10.99.2.2:5000\n";
        assert!(handed_over_at_the_store(overlap, SRC, DST)
            .unwrap_err()
            .contains("still had"));
        let reopened = "INFO volume open volume=vol epoch=7\n\
                        INFO client authenticated peer=10.99.1.2:4000\n\
                        DEBUG connection closed peer=10.99.1.2:4000\n\
                        INFO volume open volume=vol epoch=8\n\
                        INFO client authenticated peer=10.99.2.2:5000\n";
        assert!(handed_over_at_the_store(reopened, SRC, DST).is_err());
        let no_destination =
            "INFO volume open epoch=7\nINFO client authenticated peer=10.99.1.2:1\n";
        assert!(handed_over_at_the_store(no_destination, SRC, DST).is_err());
    }
}
