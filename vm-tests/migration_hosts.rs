//! Live migration between hosts: the guest of [`crate::migration`] moves between two daemons
//! that run in two network namespaces of their own ([`pohmelfs_testkit::Network`]) and reach
//! one `pohmelfs store` server, or one S3 service (moto), in a third. On `pohmel://` the store
//! server's log shows the destination's daemon connecting only once every connection of the
//! source's had closed, on one epoch of the volume; on `s3://` the daemons' logs show the
//! destination opening the volume after the source closed it, one writer epoch later. And a
//! migration the destination refuses on `pohmel://`: the source connects again and the guest
//! goes on there, and the destination never connected.
//!
//! Needs root (`ip netns`); without it the tests say they skip. QEMU 10 only, as
//! [`crate::migration`].

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;

use pohmelfs_testkit::{Moto, Network};

use crate::harness::migration::{expect_handed_over, expect_taken_over, Migration};
use crate::harness::store::StoreServer;
use crate::harness::{Daemon, Failure, Result, VmTest};
use crate::migration::script;

/// The store server's secret: a server off loopback needs one.
const SECRET: &str = "migration-between-hosts";

/// The guest moves between two hosts (network namespaces) whose daemons reach one store
/// server in a third: the destination connects to it only once the source let the volume go.
pub fn migration_between_hosts_pohmel(vm: &VmTest) -> Result<()> {
    if !netns_possible() {
        return Ok(());
    }
    // Declared first, dropped last: the processes in its namespaces go first.
    let net = Network::new(2)?;
    let (server, url) = store_server(vm, &net)?;
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
        // The source logs its hand-over once its holder record is gone, and sends the state
        // only after that (its early let-go is joined first); an s3:// destination opens
        // when the state arrives. SlateDB's own close (`db closed`) runs behind the
        // hand-over at the lowest priority and may well end after the destination's open.
        line(&source, "handed over volume"),
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
            "expected the destination to open the volume after the source let it go, one \
             writer epoch later: source opened {opened_src:?}, let go {released:?}; \
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
pub(crate) fn netns_possible() -> bool {
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
    expect_handed_over(&source, "source")?;
    expect_taken_over(&destination, "destination")?;
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
    let epochs = handed_over_in_turn(log, &[source, destination])?;
    match epochs.as_slice() {
        [epoch] => Ok(*epoch),
        epochs => Err(format!(
            "the store server opened the volume {} times (epochs {epochs:?}), not once",
            epochs.len()
        )),
    }
}

/// Reads a store server's log in order: the volume's daemons connect in `turns` (host
/// addresses; a daemon that connects after the first's turn is the next one's): every
/// connection of one turn must have closed before the next turn's first is authenticated,
/// no other address may connect, and every turn must have come. The epochs of the volume's
/// opens.
pub(crate) fn handed_over_in_turn(
    log: &str,
    turns: &[Ipv4Addr],
) -> std::result::Result<Vec<u64>, String> {
    let names = ["source", "destination", "way back"];
    let name = |turn: usize| names.get(turn).copied().unwrap_or("later daemon");
    // The turn whose daemon connected last (None before the first connection).
    let mut turn: Option<usize> = None;
    let mut open: BTreeSet<&str> = BTreeSet::new();
    let mut epochs = Vec::new();
    for line in log.lines() {
        if line.contains("store server listening") {
            // Started (again): a killed server's connections are gone unlogged.
            open.clear();
        }
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
        let from = |t: usize| {
            turns
                .get(t)
                .is_some_and(|ip| peer.starts_with(&format!("peer={ip}:")))
        };
        if line.contains("client authenticated") {
            let next = turn.map_or(0, |t| t + 1);
            if turn.is_some_and(from) {
                open.insert(peer);
            } else if from(next) {
                if !open.is_empty() {
                    return Err(format!(
                        "the {} connected ({peer}) while the {} still had connections open: \
                         {open:?}",
                        name(next),
                        name(next.saturating_sub(1))
                    ));
                }
                turn = Some(next);
                open.insert(peer);
            } else {
                return Err(format!("a connection from {peer} out of turn"));
            }
        } else if line.contains("connection closed") || line.contains("connection ended") {
            open.remove(peer);
        }
    }
    let next = turn.map_or(0, |t| t + 1);
    if next < turns.len() {
        return Err(format!(
            "the store server saw no connection from the {}",
            name(next)
        ));
    }
    Ok(epochs)
}

/// The destination refuses the guest (the source offers the FUSE write-back cache, the
/// destination does not) on `pohmel://` between hosts: QEMU resumes the guest at the source,
/// whose next request connects to the store server again (sparing the file unlinked while
/// open), and the guest goes on there; the destination never connected.
pub fn refused_migration_between_hosts_pohmel(vm: &VmTest) -> Result<()> {
    if !netns_possible() {
        return Ok(());
    }
    let net = Network::new(2)?;
    let (server, url) = store_server(vm, &net)?;
    let daemon = |name: &str, host: usize| -> Result<_> {
        Ok(vm.daemon_in(name)?.in_netns(net.host(host)).store(&url))
    };
    let source = daemon("src", 1)?.arg("--writeback-cache").start()?;
    let destination = daemon("dst", 2)?.arg("--incoming").start()?;
    Migration::new(vm.dir(), &source, &destination)
        .script(&script(true))
        .run_refused()?;
    let log = fs::read_to_string(server.log_path()).unwrap_or_default();
    back_at_the_source(&log, Network::host_addr(1), Network::host_addr(2)).map_err(|f| {
        Failure::new(format!(
            "{f}\n--- store server log ({}) ---\n{}\n{}\n{}",
            server.log_path().display(),
            crate::harness::log_tail(server.log_path(), 60),
            source.log_report(),
            destination.log_report()
        ))
    })
}

/// A store server in `net`'s hub, with a secret; the URL of its volume `vol` for the daemons.
fn store_server(vm: &VmTest, net: &Network) -> Result<(StoreServer, String)> {
    store_server_with(vm, net, &[])
}

/// As [`store_server`], with more `pohmelfs store` options `extra`.
pub(crate) fn store_server_with(
    vm: &VmTest,
    net: &Network,
    extra: &[&str],
) -> Result<(StoreServer, String)> {
    let data = format!("file://{}/store", vm.dir().display());
    let server = StoreServer::start_in(
        vm.dir(),
        &data,
        SECRET,
        net.hub(),
        Network::SERVICE.into(),
        extra,
    )?;
    let url = format!(
        "pohmel://{}/vol?secret_file={}",
        server.addr(),
        StoreServer::secret_file(vm.dir()).display()
    );
    Ok((server, url))
}

/// Reads a store server's log in order after a refused migration: `source` (host address)
/// connected, all its connections closed (the release), then it connected again; nothing
/// ever came from `destination`.
fn back_at_the_source(
    log: &str,
    source: Ipv4Addr,
    destination: Ipv4Addr,
) -> std::result::Result<(), String> {
    let (source, destination) = (format!("peer={source}:"), format!("peer={destination}:"));
    if let Some(line) = log.lines().find(|l| l.contains(&destination)) {
        return Err(format!(
            "the destination reached the store server, though it refused the state: {line:?}"
        ));
    }
    let mut open: BTreeSet<&str> = BTreeSet::new();
    let (mut first, mut released, mut again) = (false, false, false);
    for line in log.lines() {
        let Some(peer) = line.split_whitespace().find(|w| w.starts_with(&source)) else {
            continue;
        };
        if line.contains("client authenticated") {
            if released {
                again = true;
            }
            first = true;
            open.insert(peer);
        } else if line.contains("connection closed") || line.contains("connection ended") {
            open.remove(peer);
            released |= first && open.is_empty();
        }
    }
    match (first, released, again) {
        (true, true, true) => Ok(()),
        (false, _, _) => Err("the source never connected to the store server".into()),
        (true, false, _) => Err("the source's connections never all closed (no release)".into()),
        (true, true, false) => {
            Err("the source did not connect again after it let the volume go".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{back_at_the_source, handed_over_at_the_store};
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

    #[test]
    fn the_store_log_shows_three_daemons_in_turn() {
        let log = "INFO volume open volume=vol url=x epoch=7\n\
                   INFO client authenticated peer=10.99.1.2:4000\n\
                   DEBUG connection closed peer=10.99.1.2:4000\n\
                   INFO client authenticated peer=10.99.2.2:5000\n\
                   INFO client authenticated peer=10.99.2.2:5001\n\
                   DEBUG connection closed peer=10.99.2.2:5000\n\
                   INFO connection ended peer=10.99.2.2:5001 error=x\n\
                   INFO client authenticated peer=10.99.1.2:4100\n";
        assert_eq!(
            super::handed_over_in_turn(log, &[SRC, DST, SRC]),
            Ok(vec![7])
        );
        // The way back while the destination still had a connection.
        let early = "INFO client authenticated peer=10.99.1.2:4000\n\
                     DEBUG connection closed peer=10.99.1.2:4000\n\
                     INFO client authenticated peer=10.99.2.2:5000\n\
                     INFO client authenticated peer=10.99.1.2:4100\n";
        assert!(super::handed_over_in_turn(early, &[SRC, DST, SRC])
            .unwrap_err()
            .contains("still had"));
        // A restart in between: the killed server's connections are gone.
        let restarted = "INFO store server listening addr=10.99.0.1:7000\n\
                         INFO volume open volume=vol epoch=1\n\
                         INFO client authenticated peer=10.99.1.2:4000\n\
                         INFO store server listening addr=10.99.0.1:7000\n\
                         INFO volume open volume=vol epoch=2\n\
                         INFO client authenticated peer=10.99.2.2:5000\n";
        assert_eq!(
            super::handed_over_in_turn(restarted, &[SRC, DST]),
            Ok(vec![1, 2])
        );
        // No way back at all.
        let two = "INFO client authenticated peer=10.99.1.2:4000\n\
                   DEBUG connection closed peer=10.99.1.2:4000\n\
                   INFO client authenticated peer=10.99.2.2:5000\n";
        assert!(super::handed_over_in_turn(two, &[SRC, DST, SRC]).is_err());
    }

    #[test]
    fn the_store_log_shows_the_source_back() {
        let back = "INFO client authenticated peer=10.99.1.2:4000\n\
                    DEBUG connection closed peer=10.99.1.2:4000\n\
                    INFO client authenticated peer=10.99.1.2:4100\n";
        assert_eq!(back_at_the_source(back, SRC, DST), Ok(()));
        let never_left = "INFO client authenticated peer=10.99.1.2:4000\n";
        assert!(back_at_the_source(never_left, SRC, DST).is_err());
        let not_back = "INFO client authenticated peer=10.99.1.2:4000\n\
                        DEBUG connection closed peer=10.99.1.2:4000\n";
        assert!(back_at_the_source(not_back, SRC, DST).is_err());
        let destination = format!("{back}INFO client authenticated peer=10.99.2.2:5000\n");
        assert!(back_at_the_source(&destination, SRC, DST).is_err());
    }
}
