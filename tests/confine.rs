//! The `pohmelfs` binary confines itself (`src/confine/`): `serve` and
//! `store` run with the seccomp filter on in every thread by default, no
//! capabilities, no_new_privs, and sockets and volumes only their owner
//! may open. Read from `/proc/PID/status` of the real processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use pohmelfs_testkit::{ChildGuard, ScratchDir, StoreServer};

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The `Name:` lines of `/proc/PID/status` this test reads, one per
/// thread of the process: (Seccomp, NoNewPrivs, CapEff, CapPrm).
fn confinement(pid: u32) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // a thread that just ended
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        out.push((
            field("Seccomp:"),
            field("NoNewPrivs:"),
            field("CapEff:"),
            field("CapPrm:"),
        ));
    }
    out
}

fn assert_confined(pid: u32, what: &str) {
    let threads = confinement(pid);
    assert!(threads.len() > 1, "{what}: {threads:?}");
    for t in &threads {
        // 2: a seccomp filter is installed.
        assert_eq!(t.0, "2", "{what}: seccomp off in a thread: {threads:?}");
        assert_eq!(t.1, "1", "{what}: no_new_privs off: {threads:?}");
        assert_eq!(
            t.2, "0000000000000000",
            "{what}: effective caps: {threads:?}"
        );
        assert_eq!(
            t.3, "0000000000000000",
            "{what}: permitted caps: {threads:?}"
        );
    }
}

/// Start `pohmelfs serve` with `args` on a file:// volume and wait for its
/// socket and control socket.
fn serve(dir: &ScratchDir, args: &[&str]) -> ChildGuard {
    let sock = dir.join("s.sock");
    let log = dir.join("serve.log");
    let vol = format!("file://{}", dir.join("vol").display());
    if !dir.join("vol").exists() {
        pohmelfs_testkit::format_volume(POHMELFS, &vol, &[]).unwrap();
    }
    let mut child = ChildGuard(
        Command::new(POHMELFS)
            .args(["serve", "--socket-path"])
            .arg(&sock)
            .arg("--store")
            .arg(&vol)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    child
        .wait_ready("pohmelfs serve", &log, TIMEOUT, POLL, || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("waiting for a frontend")
                .then_some(())
        })
        .unwrap();
    child
}

#[test]
fn serve_runs_confined_by_default() {
    let dir = ScratchDir::new("confine-serve").unwrap();
    let child = serve(&dir, &[]);
    assert_confined(child.0.id(), "serve");
    assert_eq!(mode(&dir.join("s.sock")), 0o700);
    assert_eq!(mode(&dir.join("s.sock.ctl")), 0o700);
    assert_eq!(mode(&dir.join("vol")), 0o700);
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(
        log.contains("confined") && log.contains("seccomp=trap"),
        "{log}"
    );
}

#[test]
fn serve_gives_its_socket_to_a_group_and_a_mode() {
    let dir = ScratchDir::new("confine-group").unwrap();
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let _child = serve(&dir, &["--socket-group", &gid.to_string()]);
    let sock = dir.join("s.sock");
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&sock).unwrap()),
        gid
    );
    drop(_child);
    let _child = serve(&dir, &["--socket-mode", "0640"]);
    assert_eq!(mode(&sock), 0o640);
}

#[test]
fn seccomp_none_installs_no_filter() {
    let dir = ScratchDir::new("confine-none").unwrap();
    let child = serve(&dir, &["--seccomp", "none"]);
    for t in confinement(child.0.id()) {
        assert_eq!(t.0, "0", "a filter with --seccomp none");
    }
}

#[test]
fn store_runs_confined_by_default() {
    let dir = ScratchDir::new("confine-store").unwrap();
    let data = format!("file://{}", dir.join("data").display());
    let server = StoreServer::start(POHMELFS, dir.path(), "s", &data, Some("secret")).unwrap();
    assert_confined(server.pid().unwrap(), "store");
}
