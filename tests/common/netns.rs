//! Hosts of their own on one machine: network namespaces (`ip netns`) joined by veth pairs,
//! for tests where two daemons must reach a server as two hosts would (a live migration of a
//! `pohmel://` or `s3://` volume).
//!
//! A [`Network`] is a hub namespace, whose loopback carries the service address
//! [`Network::SERVICE`] (servers listen there), and one namespace per host, linked to the hub
//! by a veth pair: host `i` (from 1) is `10.99.i.2/24`, the hub's end `10.99.i.1`, the host's
//! default route through it. Everything lives in namespaces the network creates, so two
//! tests at once never share an address, and nothing touches the machine's own network.
//! Dropping the [`Network`] deletes its namespaces (and with them their links), pass or fail;
//! a namespace left by a killed test process is deleted by the next [`Network::new`].
//!
//! Processes enter a namespace by `ip netns exec` ([`Netns::command`]), which execs the
//! program, so the child's pid is the program's; the test process itself reaches a server in
//! one through [`Netns::run`] (a thread of its own that joins the namespace).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Error, Result};

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace the kit makes: `<prefix><pid>-<n>-<role>`.
const PREFIX: &str = "pohmt";
/// Hosts a network has at most (each gets its own `10.99.i.0/24`).
const HOSTS_MAX: usize = 16;

/// Numbers the networks of one test process.
static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// One network namespace.
pub struct Netns {
    name: String,
    /// Open for [`Netns::run`]'s `setns`.
    handle: File,
}

impl Netns {
    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` in this namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(Some(&self.name), program)
    }

    /// Runs `f` in this namespace, on a thread of its own (a thread may change its network
    /// namespace; the test's other threads stay where they are): sockets `f` opens are in
    /// the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.handle.as_raw_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns(2) on a descriptor this `Netns` holds open for the whole
                    // call; it changes only the calling thread's network namespace, and this
                    // thread ends with the scope.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(Error::Io {
                            what: format!("enter network namespace {}", self.name),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::Unexpected(format!(
                        "a thread in network namespace {} panicked",
                        self.name
                    )))
                })
        })
    }
}

/// A command running `program` in the namespace named `netns`, or where the test runs.
pub fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(name) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", name]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// A hub namespace and hosts linked to it.
pub struct Network {
    hub: Netns,
    hosts: Vec<Netns>,
}

impl Network {
    /// The hub's service address, reachable from every host.
    pub const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

    /// Makes the hub and `hosts` hosts (at most 16). Needs root and `ip` (iproute2).
    pub fn new(hosts: usize) -> Result<Network> {
        if hosts > HOSTS_MAX {
            return Err(Error::Unexpected(format!(
                "a test network has at most {HOSTS_MAX} hosts, not {hosts}"
            )));
        }
        remove_stale();
        let n = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        // Made one at a time, so a failure drops (deletes) those made so far.
        let mut network = Network {
            hub: add_netns(&format!("{base}-hub"))?,
            hosts: Vec::new(),
        };
        let hub = network.hub.name.clone();
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{}/32", Network::SERVICE),
            "dev",
            "lo",
        ])?;
        for i in 1..=hosts {
            let host = add_netns(&format!("{base}-h{i}"))?;
            let name = host.name.clone();
            network.hosts.push(host);
            let hub_end = format!("h{i}");
            ip(&[
                "-n", &hub, "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ])?;
            ip(&[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("10.99.{i}.1/24"),
                "dev",
                &hub_end,
            ])?;
            ip(&["-n", &hub, "link", "set", &hub_end, "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.99.{i}.2/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &name,
                "route",
                "add",
                "default",
                "via",
                &format!("10.99.{i}.1"),
            ])?;
        }
        Ok(network)
    }

    /// The hub, where servers listen on [`Network::SERVICE`].
    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    /// Host `i`, from 1.
    pub fn host(&self, i: usize) -> &Netns {
        &self.hosts[i - 1]
    }

    /// Host `i`'s address.
    pub fn host_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, u8::try_from(i).unwrap_or(0), 2)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its ends of the veth pairs, and so the pairs.
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "delete", &ns.name]);
        }
    }
}

/// Whether this process may make network namespaces: it runs as root (the owner of
/// `/proc/self`). A test that cannot says [`crate::skipped`] rather than fail.
pub fn can_make() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs `ip ARGS`; its stderr in the error.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing {
                program: "ip".into(),
                fix: "install iproute2 (`apt-get install iproute2`)".into(),
            },
            _ => Error::Io {
                what: format!("run ip {}", args.join(" ")),
                source: e,
            },
        })?;
    if !out.status.success() {
        return Err(Error::Unexpected(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `ip netns add NAME`, opened for [`Netns::run`].
fn add_netns(name: &str) -> Result<Netns> {
    ip(&["netns", "add", name])?;
    let path = format!("{NETNS_DIR}/{name}");
    match File::open(&path) {
        Ok(handle) => Ok(Netns {
            name: name.to_owned(),
            handle,
        }),
        Err(source) => {
            let _ = ip(&["netns", "delete", name]);
            Err(Error::Io {
                what: format!("open {path}"),
                source,
            })
        }
    }
}

/// Deletes the kit's namespaces whose test process is gone (killed before its drop ran).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}
