//! pohmelfs started as VMM managers start a virtio-fs backend (QEMU's
//! vhost-user backend conventions, virtiofsd's command line as libvirt
//! generates it): `--print-capabilities`, a listening socket inherited
//! with `--fd`, the shared directory naming a volume, passthrough-only
//! options accepted with one warning line, `--readonly` (a snapshot served
//! read-only), the pid-file guard, and the stop contract (SIGTERM leaves
//! nothing behind).
//!
//! The argv are libvirt's own (src/qemu/qemu_virtiofs.c,
//! `qemuVirtioFSBuildCommandLine`): 9.0 (Debian bookworm) puts every
//! option in `-o`; current libvirt, once `--print-capabilities` lists
//! `separate-options`, passes `--shared-dir`, `--cache`, `--sandbox`,
//! `--xattr` and `--rlimit-nofile` separately.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use pohmelfs_testkit::{format_volume, wait_until, ChildGuard, ScratchDir};

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
/// The descriptor number the child gets the socket at.
const CHILD_FD: i32 = 40;

/// Start pohmelfs with `args` (libvirt's, after the binary), the listening
/// socket `listener` at descriptor [`CHILD_FD`] as libvirt passes it, and
/// wait until it serves.
fn start_with_fd(dir: &ScratchDir, listener: &UnixListener, args: &[String]) -> ChildGuard {
    let log = dir.join("daemon.log");
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(POHMELFS);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap());
    // SAFETY: dup2 is async-signal-safe; it gives the child the socket at
    // CHILD_FD without close-on-exec, and touches nothing else.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = ChildGuard(cmd.spawn().unwrap());
    child
        .wait_ready("pohmelfs (libvirt argv)", &log, TIMEOUT, POLL, || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("waiting for a frontend")
                .then_some(())
        })
        .unwrap();
    child
}

fn status(sock: &Path) -> String {
    let out = Command::new(POHMELFS)
        .args(["status", "--socket-path"])
        .arg(sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// SIGTERM, then the exit status; nothing of the daemon's is left beside
/// the socket but the socket libvirt made.
fn stop(mut child: ChildGuard, sock: &Path) -> std::process::ExitStatus {
    // SAFETY: kill only sends a signal to the child we started.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = wait_until(TIMEOUT, POLL, || child.0.try_wait().unwrap()).expect("exit");
    for leftover in [".ctl", ".pid"] {
        let mut p = sock.as_os_str().to_owned();
        p.push(leftover);
        assert!(
            !Path::new(&p).exists(),
            "{} left behind",
            Path::new(&p).display()
        );
    }
    status
}

#[test]
fn print_capabilities_follows_the_convention() {
    for args in [
        &["--print-capabilities"][..],
        &["--fd=3", "--print-capabilities"],
    ] {
        let out = Command::new(POHMELFS).args(args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("\"type\": \"fs\""), "{text}");
        assert!(text.contains("\"separate-options\""), "{text}");
        assert!(!text.contains("migrate"), "no migration: {text}");
    }
    let descriptor = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/60-pohmelfs.json"),
    )
    .unwrap();
    assert!(descriptor.contains("\"type\": \"fs\""), "{descriptor}");
}

#[test]
fn libvirt_9_argv_serves_a_file_volume_on_an_inherited_socket() {
    let dir = ScratchDir::new("conv-libvirt9").unwrap();
    let vol = dir.join("vm1");
    format_volume(POHMELFS, &format!("file://{}", vol.display()), &[]).unwrap();
    let sock = dir.join("fs0-fs.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let args = vec![
        format!("--fd={CHILD_FD}"),
        "-o".into(),
        format!(
            "source={},cache=always,sandbox=chroot,xattr,flock,no_posix_lock",
            vol.display()
        ),
        "--thread-pool-size=4".into(),
    ];
    let child = start_with_fd(&dir, &listener, &args);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    let warnings: Vec<_> = log
        .lines()
        .filter(|l| l.contains("warning: ignoring"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("-o sandbox=chroot, -o xattr, -o flock, -o no_posix_lock"));
    let st = status(&sock);
    assert!(st.contains(&format!("file://{}", vol.display())), "{st}");
    assert!(
        st.contains(&format!(" pid {} since ", child.0.id())),
        "{st}"
    );

    // A second daemon on the same socket is refused by the pid file, before
    // it opens (and so fences) the volume.
    let out = Command::new(POHMELFS)
        .args(["serve", "--socket-path"])
        .arg(&sock)
        .arg("--store")
        .arg(format!("file://{}", vol.display()))
        .arg("--take-over")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("is served by pohmelfs pid {}", child.0.id())),
        "{err}"
    );
    assert!(!err.contains("taking the volume over"), "{err}");
    assert!(st.contains("epoch                  2"), "{st}");
    assert!(status(&sock).contains("epoch                  2"));

    // The stop lets the volume go: no holder record says it is held (on
    // `s3://` another host's opener would wait for the record's lease).
    let record = vol.join("volume.holder");
    assert!(record.exists(), "no holder record while served");
    assert!(stop(child, &sock).success());
    assert!(
        !record.exists(),
        "the stopped daemon's holder record stayed"
    );
}

#[test]
fn current_libvirt_argv_takes_the_store_from_pohmelfs_conf() {
    let dir = ScratchDir::new("conv-libvirt").unwrap();
    let vol = format!("file://{}", dir.join("volumes/vm2").display());
    std::fs::create_dir(dir.join("volumes")).unwrap();
    format_volume(POHMELFS, &vol, &[]).unwrap();
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(
        shared.join("pohmelfs.conf"),
        format!(
            "# the volume behind <source dir='{}'/>\nstore = {vol}\ncache_size = 64M\n",
            shared.display()
        ),
    )
    .unwrap();
    let sock = dir.join("fs1-fs.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let args: Vec<String> = [
        &format!("--fd={CHILD_FD}"),
        "--shared-dir",
        shared.to_str().unwrap(),
        "--cache",
        "never",
        "--sandbox",
        "chroot",
        "--xattr",
        "--thread-pool-size=0",
        "--rlimit-nofile=4096",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let child = start_with_fd(&dir, &listener, &args);
    let st = status(&sock);
    assert!(st.contains(&vol), "{st}");
    assert!(
        st.contains("cache 40 MiB"),
        "cache_size 64M (pages: 5/8 of it) from the conf file: {st}"
    );
    assert!(stop(child, &sock).success());
}

/// `<readonly/>`: libvirt adds `--readonly`, and the snapshot its
/// pohmelfs.conf names is served read-only (holder `-`: not claimed).
#[test]
fn libvirt_readonly_serves_a_snapshot() {
    let dir = ScratchDir::new("conv-readonly").unwrap();
    let vol = format!("file://{}", dir.join("vm3").display());
    format_volume(POHMELFS, &vol, &[]).unwrap();
    // A daemon makes the root directory; the snapshot, through it, holds it.
    let first = dir.join("first.sock");
    let args = vec![
        format!("--fd={CHILD_FD}"),
        format!("--shared-dir={}", dir.join("vm3").display()),
    ];
    let listener = UnixListener::bind(&first).unwrap();
    let child = start_with_fd(&dir, &listener, &args);
    let out = Command::new(POHMELFS)
        .args(["snapshot", "create", &vol, "mon", "--socket-path"])
        .arg(&first)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(stop(child, &first).success());

    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("pohmelfs.conf"), format!("store = {vol}@mon\n")).unwrap();
    let sock = dir.join("fs2-fs.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let args = vec![
        format!("--fd={CHILD_FD}"),
        "--shared-dir".into(),
        shared.display().to_string(),
        "--readonly".into(),
    ];
    let child = start_with_fd(&dir, &listener, &args);
    let st = status(&sock);
    assert!(st.contains(&format!("{vol}/snapshots/mon")), "{st}");
    assert!(st.contains("read-only"), "{st}");
    assert!(
        st.lines()
            .any(|l| l.starts_with("holder") && l.ends_with(" -")),
        "{st}"
    );
    assert!(stop(child, &sock).success());
}

#[test]
fn a_shared_dir_without_a_volume_is_one_line() {
    let dir = ScratchDir::new("conv-novol").unwrap();
    let shared = dir.join("plain");
    std::fs::create_dir(&shared).unwrap();
    let sock = dir.join("s.sock");
    let out = Command::new(POHMELFS)
        .args(["--socket-path", sock.to_str().unwrap(), "--shared-dir"])
        .arg(&shared)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let url = format!("file://{}", shared.canonicalize().unwrap().display());
    assert!(
        err.contains(&format!(
            "no volume at {url}; create it with pohmelfs format {url}"
        )),
        "{err}"
    );
    assert!(!sock.exists());
}
