//! A volume's life cycle as an operator meets it, through the real binary:
//! only `pohmelfs format` creates a volume; `serve`, `mount` and `store`
//! refuse a missing one with one line and exit 1, before any socket is
//! bound; a second daemon on a held volume names the holder instead of
//! fencing it, unless `--take-over`; `pohmelfs status` shows the volume's
//! id, format version, epoch and holder; `serve --readonly` claims nothing
//! (a held volume, a snapshot), and a snapshot is served only so.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pohmelfs_testkit::{format_volume, ChildGuard, ScratchDir};

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

fn run(args: &[&str]) -> Output {
    Command::new(POHMELFS)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `pohmelfs serve` on `store` at `sock` (plus `args`), run to its exit:
/// for daemons that are to refuse.
fn run_serve(sock: &Path, store: &str, args: &[&str]) -> Output {
    let mut argv = vec![
        "serve",
        "--socket-path",
        sock.to_str().unwrap(),
        "--store",
        store,
    ];
    argv.extend_from_slice(args);
    run(&argv)
}

/// A scratch directory named `name` and the `file://` URL of volume `vol`
/// in it, not made yet.
fn scratch_volume(name: &str) -> (ScratchDir, String) {
    let dir = ScratchDir::new(name).unwrap();
    let url = format!("file://{}", dir.join("vol").display());
    (dir, url)
}

/// Exit 1 and exactly one line on stderr, `pohmelfs: ` then `want`.
fn assert_one_line(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_eq!(err.trim_end(), format!("pohmelfs: {want}"));
}

/// `pohmelfs serve` on `store`, waited for until it serves.
fn serve(dir: &ScratchDir, name: &str, store: &str, args: &[&str]) -> ChildGuard {
    let sock = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut child = ChildGuard(
        Command::new(POHMELFS)
            .args(["serve", "--socket-path"])
            .arg(&sock)
            .args(["--store", store])
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

fn status(sock: &Path) -> String {
    let out = run(&["status", "--socket-path", sock.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The value of `key` in `pohmelfs status` output.
fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).filter(|r| r.starts_with(' ')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in status:\n{status}"))
}

#[test]
fn a_missing_volume_is_one_line_and_no_socket() {
    let dir = ScratchDir::new("life-missing").unwrap();
    let url = format!("file://{}", dir.join("typo").display());
    let sock = dir.join("s.sock");
    let out = run_serve(&sock, &url, &[]);
    assert_one_line(
        &out,
        &format!("no volume at {url}; create it with pohmelfs format {url}"),
    );
    assert!(!sock.exists(), "the socket was bound");
    assert!(!dir.join("typo").exists(), "serve made a volume");
    // The volume is opened before the socket is bound: with a socket path
    // that cannot be bound the volume is still what the line names.
    let not_a_socket = dir.join("file");
    std::fs::write(&not_a_socket, b"").unwrap();
    let out = run_serve(&not_a_socket, &url, &[]);
    assert_one_line(
        &out,
        &format!("no volume at {url}; create it with pohmelfs format {url}"),
    );
    // No default store: `mem:` only when named.
    let out = run(&["serve", "--socket-path", sock.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--store"));
}

#[test]
fn format_refuses_an_existing_volume_and_pohmel_urls() {
    let (_dir, url) = scratch_volume("life-format");
    let out = run(&["format", &url, "--capacity", "64M"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("formatted {url}: volume ")));
    assert_one_line(
        &run(&["format", &url]),
        &format!("a volume exists at {url} already; refusing to overwrite it"),
    );
    let out = run(&["check", "--store", &url]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" (format version 4) in "), "{stdout}");
    let out = run(&["format", "pohmel://127.0.0.1:1/vol"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pohmelfs format DATA/NAME"));
}

#[test]
fn a_held_volume_names_its_holder_until_taken_over() {
    let (dir, url) = scratch_volume("life-held");
    format_volume(POHMELFS, &url, &[]).unwrap();
    let first = serve(&dir, "first", &url, &[]);
    let pid = first.0.id();

    let st = status(&dir.join("first.sock"));
    assert_eq!(field(&st, "volume_id").len(), 32, "{st}");
    assert_eq!(field(&st, "format_version"), "4");
    assert_eq!(field(&st, "epoch"), "2", "formatted (1), then this open");
    let holder = field(&st, "holder");
    assert!(holder.contains(&format!(" pid {pid} since ")), "{holder}");

    let second = dir.join("second.sock");
    let out = run_serve(&second, &url, &[]);
    assert_one_line(
        &out,
        &format!(
            "volume {url} is held by {holder}; stop that daemon, or pass --take-over to fence it"
        ),
    );
    assert!(!second.exists(), "the refused daemon bound its socket");

    let taker = serve(&dir, "taker", &url, &["--take-over"]);
    let st = status(&dir.join("taker.sock"));
    assert_eq!(field(&st, "epoch"), "3");
    let holder = field(&st, "holder");
    assert!(
        holder.contains(&format!(" pid {} since ", taker.0.id())),
        "{holder}"
    );
}

#[test]
fn a_store_server_serves_only_formatted_volumes() {
    let dir = ScratchDir::new("life-store").unwrap();
    let data = format!("file://{}", dir.join("data").display());
    let addr_file = dir.join("addr");
    let start = || {
        Command::new(POHMELFS)
            .args(["store", "--listen", "127.0.0.1:0", "--data", &data])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("store.log")).unwrap())
            .spawn()
            .unwrap()
    };
    let mut missing = ChildGuard(start());
    let exited = pohmelfs_testkit::wait_until(TIMEOUT, POLL, || missing.0.try_wait().unwrap())
        .expect("the server exits");
    assert_eq!(exited.code(), Some(1));
    let log = std::fs::read_to_string(dir.join("store.log")).unwrap();
    assert!(log.starts_with("pohmelfs: no data directory at "), "{log}");

    std::fs::create_dir(dir.join("data")).unwrap();
    let mut server = ChildGuard(start());
    let log = dir.join("store.log");
    let addr = server
        .wait_ready("pohmelfs store", &log, TIMEOUT, POLL, || {
            std::fs::read_to_string(&addr_file).ok()
        })
        .unwrap();
    let vol = format!("pohmel://{addr}/vol?give_up_ms=0");
    let refused = pohmelfs::net::open(&vol)
        .err()
        .expect("a missing volume opened");
    let why = format!("{:?}", anyhow::Error::from(refused));
    assert!(why.contains("no volume vol on this server"), "{why}");
    assert!(!dir.join("data/vol").exists(), "the server made the volume");

    format_volume(POHMELFS, &format!("{data}/vol"), &[]).unwrap();
    pohmelfs::net::open(&vol).expect("open the formatted volume");
}

#[test]
fn read_only_daemons_serve_a_held_volume_and_its_snapshot_without_claiming_them() {
    let (dir, url) = scratch_volume("life-readonly");
    format_volume(POHMELFS, &url, &[]).unwrap();
    // Formatted, never served: no root directory, and none can be made.
    let sock = dir.join("fresh.sock");
    let out = run_serve(&sock, &url, &["--readonly"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no root directory yet"), "{err}");
    assert!(!sock.exists(), "the refused daemon bound its socket");
    let first = serve(&dir, "first", &url, &[]);
    let first_sock = dir.join("first.sock");
    // Through the daemon: what it holds (the root directory) goes first.
    let out = run(&[
        "snapshot",
        "create",
        &url,
        "mon",
        "--socket-path",
        first_sock.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");

    // The held volume, read-only: not refused, and nobody is fenced.
    let _live = serve(&dir, "live", &url, &["--readonly"]);
    let st = status(&dir.join("live.sock"));
    assert_eq!(field(&st, "holder"), "-", "{st}");
    assert_eq!(
        field(&st, "epoch"),
        "2",
        "the read-only open is not counted"
    );
    let st = status(&first_sock);
    assert!(field(&st, "holder").contains(&format!(" pid {} since ", first.0.id())));

    // The snapshot: read-only only, by either name.
    let snap_dir = dir.join("vol/snapshots/mon");
    for store in [
        format!("{url}@mon"),
        format!("file://{}", snap_dir.display()),
    ] {
        let sock = dir.join("refused.sock");
        let out = run_serve(&sock, &store, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "{} is a snapshot: serve it with --readonly, or clone it to write",
                snap_dir.display()
            )),
            "{err}"
        );
        assert!(!sock.exists(), "the refused daemon bound its socket");
    }
    let _snap = serve(&dir, "snap", &format!("{url}@mon"), &["--readonly"]);
    assert_eq!(field(&status(&dir.join("snap.sock")), "holder"), "-");
    let out = run_serve(
        &dir.join("tue.sock"),
        &format!("{url}@tue"),
        &["--readonly"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no snapshot \"tue\""), "{err}");

    let sock = dir.join("mem.sock");
    let out = run_serve(&sock, "mem:", &["--readonly"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a mem: volume starts empty"));
    let out = run_serve(
        &sock,
        &url,
        &[
            "--readonly",
            "--cache-dir",
            dir.join("cache").to_str().unwrap(),
            "--cache-dir-size",
            "64M",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--readonly with --cache-dir"), "{err}");
}

/// Every command that takes a volume URL refuses one carrying a secret
/// (argv is readable by every local user), names the option, and never
/// echoes the secret.
#[test]
fn every_command_refuses_a_secret_in_a_url() {
    let dir = ScratchDir::new("secret-argv").unwrap();
    let sock = dir.join("fs.sock");
    let sock = sock.to_str().unwrap();
    let mnt = dir.path().to_str().unwrap();
    let url = "s3://bucket/vol?endpoint=http://127.0.0.1:9&secret_access_key=hunter2";
    let snap = "s3://bucket/vol@base?endpoint=http://127.0.0.1:9&secret_access_key=hunter2";
    let plain = "s3://bucket/other?endpoint=http://127.0.0.1:9";
    let commands: &[&[&str]] = &[
        &["format", url],
        &["copy", url, plain],
        &["copy", plain, url],
        &["import", mnt, url],
        &["serve", "--socket-path", sock, "--store", url],
        &["mount", "--store", url, mnt],
        &["check", "--store", url],
        &["bench-store", "--store", url],
        &["store", "--listen", "127.0.0.1:0", "--data", url],
        &["snapshot", "create", url, "base"],
        &["snapshot", "list", url],
        &["snapshot", "delete", url, "base"],
        &["clone", snap, plain],
        &[
            "clone",
            "s3://bucket/vol@base?endpoint=http://127.0.0.1:9",
            url,
        ],
        &["clone", "--delete", url],
    ];
    for argv in commands {
        let out = run(argv);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{argv:?}: {err}");
        assert!(err.contains("secret_access_key"), "{argv:?}: {err}");
        assert!(
            !err.contains("hunter2"),
            "{argv:?} echoed the secret: {err}"
        );
    }
}
