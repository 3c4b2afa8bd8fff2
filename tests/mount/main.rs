//! `pohmelfs mount` as a real process: a `file://` volume mounted through
//! /dev/fuse, driven with ordinary system calls (std::fs and libc), stopped
//! with SIGTERM (clean exit, mount gone), mounted again to find every byte
//! and attribute; a snapshot mounted `--readonly`; an outside umount; and
//! the one-line errors on bad input; a full host disk (`full_disk.rs`).
//!
//! Needs /dev/fuse and the right to mount (root); skipped, with the line
//! `SKIPPED: <test>: <reason>` on stderr, only when /dev/fuse is missing.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use pohmelfs::check::torture::rng::Rng;
use pohmelfs_testkit::{skipped, wait_until};

mod full_disk;

/// How long a mount may take to appear, and a daemon to exit.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How often those waits poll.
const POLL: Duration = Duration::from_millis(10);

/// The size of the big file, written in 1 MiB pieces.
const BIG_BYTES: usize = 20 << 20;

fn have_fuse() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    skipped("/dev/fuse is missing; the mount tests need the FUSE device");
    false
}

/// True when `path` is a mount point in this mount namespace.
fn is_mounted(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let want = path.as_os_str().as_bytes();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mount_path(m) == want)
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A `pohmelfs mount` process. Drop kills it (if still running) and detaches
/// whatever mount it left, so a failing test leaves nothing behind.
struct Mounted {
    child: Child,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl Mounted {
    fn start(store: &str, mountpoint: &Path, log: &Path) -> Mounted {
        Self::start_with(store, mountpoint, log, &[])
    }

    /// As [`Mounted::start`], with more daemon arguments.
    fn start_with(store: &str, mountpoint: &Path, log: &Path, args: &[&str]) -> Mounted {
        let child = Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
            .arg("mount")
            .args(["--store", store, "--threads", "3", "--log-level", "debug"])
            .args(args)
            .arg(mountpoint)
            .stdout(Stdio::null())
            .stderr(File::create(log).expect("create log"))
            .spawn()
            .expect("start pohmelfs mount");
        let mut m = Mounted {
            child,
            mountpoint: mountpoint.canonicalize().expect("canonical mountpoint"),
            log: log.to_path_buf(),
        };
        let mut exited = None;
        let up = wait_until(TIMEOUT, POLL, || {
            exited = m.child.try_wait().expect("poll child");
            exited.is_some() || is_mounted(&m.mountpoint)
        });
        assert!(
            up.is_some() && exited.is_none(),
            "not mounted (exit: {exited:?}): {}",
            m.log_text()
        );
        m
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill only sends a signal to our own child, which has not
        // been reaped yet, so the pid cannot name another process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Wait for the process to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let status = wait_until(TIMEOUT, POLL, || self.child.try_wait().expect("poll child"));
        status.unwrap_or_else(|| panic!("did not exit: {}", self.log_text()))
    }

    /// SIGKILL, as a crash: no drain. The dead mount is detached.
    fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        // Drop detaches the mount the dead daemon left.
    }

    /// SIGTERM, then check the exit is clean and the mount is gone.
    fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit();
        assert!(status.success(), "exit {status}: {}", self.log_text());
        assert!(
            !is_mounted(&self.mountpoint),
            "still mounted after exit: {}",
            self.log_text()
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mountpoint) {
            detach(&self.mountpoint);
        }
    }
}

/// Detach whatever is mounted at `path` (a failing test's leftovers).
fn detach(path: &Path) {
    let path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: `path` is a NUL-terminated string alive across the call.
    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
}

/// A deterministic pseudo-random byte stream, so a corrupted or shifted
/// block cannot match by accident.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0; len];
    Rng::new(seed).fill(&mut out);
    out
}

fn setxattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and `value` is a live slice of
    // the length passed.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name}: {}",
        std::io::Error::last_os_error()
    );
}

fn getxattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for the
    // length passed.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

/// Everything the first mount writes and the second one checks.
fn populate(mnt: &Path) {
    // create, write, read back
    fs::write(mnt.join("hello.txt"), b"hello, pohmelfs\n").unwrap();
    assert_eq!(
        fs::read(mnt.join("hello.txt")).unwrap(),
        b"hello, pohmelfs\n"
    );

    // mkdir (nested), rename across directories, unlink
    fs::create_dir_all(mnt.join("a/b/c")).unwrap();
    fs::write(mnt.join("a/tmp"), b"moved").unwrap();
    fs::rename(mnt.join("a/tmp"), mnt.join("a/b/c/moved")).unwrap();
    assert!(!mnt.join("a/tmp").exists());
    fs::write(mnt.join("gone"), b"x").unwrap();
    fs::remove_file(mnt.join("gone")).unwrap();
    assert_eq!(
        fs::metadata(mnt.join("gone")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert_eq!(fs::metadata(mnt.join("a")).unwrap().nlink(), 3);

    // rmdir of a non-empty directory fails, of an empty one succeeds
    assert!(fs::remove_dir(mnt.join("a/b")).is_err());
    fs::create_dir(mnt.join("empty")).unwrap();
    fs::remove_dir(mnt.join("empty")).unwrap();

    // symlink and hard link
    std::os::unix::fs::symlink("a/b/c/moved", mnt.join("link")).unwrap();
    assert_eq!(fs::read(mnt.join("link")).unwrap(), b"moved");
    fs::hard_link(mnt.join("hello.txt"), mnt.join("hello.hard")).unwrap();
    let (m1, m2) = (
        fs::metadata(mnt.join("hello.txt")).unwrap(),
        fs::metadata(mnt.join("hello.hard")).unwrap(),
    );
    assert_eq!((m1.ino(), m1.nlink()), (m2.ino(), 2));

    // xattr
    setxattr(&mnt.join("hello.txt"), "user.color", b"blue");
    assert_eq!(
        getxattr(&mnt.join("hello.txt"), "user.color").unwrap(),
        b"blue"
    );
    assert_eq!(
        getxattr(&mnt.join("hello.txt"), "user.none")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );

    // chmod
    fs::set_permissions(mnt.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(mnt.join("hello.txt")).unwrap().mode() & 0o7777,
        0o640
    );

    // truncate down and up (the grown part reads as zeros)
    fs::write(mnt.join("trunc"), pattern(10_000, 7)).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(mnt.join("trunc"))
        .unwrap();
    f.set_len(3000).unwrap();
    f.set_len(5000).unwrap();
    drop(f);
    let mut want = pattern(3000, 7);
    want.resize(5000, 0);
    assert_eq!(fs::read(mnt.join("trunc")).unwrap(), want);

    // an unlinked file stays readable through an open descriptor
    fs::write(mnt.join("orphan"), b"still here").unwrap();
    let mut orphan = File::open(mnt.join("orphan")).unwrap();
    fs::remove_file(mnt.join("orphan")).unwrap();
    let mut s = String::new();
    orphan.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    drop(orphan);

    // 20 MiB in 1 MiB writes, fsync, read back and compare checksums
    let data = pattern(BIG_BYTES, 42);
    let mut big = File::create(mnt.join("big")).unwrap();
    for piece in data.chunks(1 << 20) {
        big.write_all(piece).unwrap();
    }
    big.sync_all().unwrap();
    // A piece in the middle overwritten in place, then read at an offset.
    big.seek(SeekFrom::Start(5 << 20)).unwrap();
    big.write_all(&pattern(4096, 9)).unwrap();
    big.sync_all().unwrap();
    drop(big);
    assert_eq!(
        fs::metadata(mnt.join("big")).unwrap().len(),
        BIG_BYTES as u64
    );
    assert_eq!(
        pohmelfs::checksum::crc32c(&fs::read(mnt.join("big")).unwrap()),
        big_crc()
    );

    let mut names: Vec<_> = fs::read_dir(mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "big", "hello.hard", "hello.txt", "link", "trunc"]
    );

    // Last, changes no close or fsync makes durable: the drain at SIGTERM
    // must.
    fs::create_dir(mnt.join("last")).unwrap();
    setxattr(&mnt.join("last"), "user.last", b"1");
}

/// The checksum of the big file after its in-place overwrite.
fn big_crc() -> u32 {
    let mut data = pattern(BIG_BYTES, 42);
    data[5 << 20..(5 << 20) + 4096].copy_from_slice(&pattern(4096, 9));
    pohmelfs::checksum::crc32c(&data)
}

/// What the second mount must find.
fn check(mnt: &Path) {
    assert_eq!(
        fs::read(mnt.join("hello.txt")).unwrap(),
        b"hello, pohmelfs\n"
    );
    assert_eq!(fs::read(mnt.join("a/b/c/moved")).unwrap(), b"moved");
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("a/b/c/moved")
    );
    let m = fs::metadata(mnt.join("hello.txt")).unwrap();
    assert_eq!(m.nlink(), 2);
    assert_eq!(m.ino(), fs::metadata(mnt.join("hello.hard")).unwrap().ino());
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!(
        getxattr(&mnt.join("hello.txt"), "user.color").unwrap(),
        b"blue"
    );
    let mut want = pattern(3000, 7);
    want.resize(5000, 0);
    assert_eq!(fs::read(mnt.join("trunc")).unwrap(), want);
    assert_eq!(
        pohmelfs::checksum::crc32c(&fs::read(mnt.join("big")).unwrap()),
        big_crc()
    );
    assert_eq!(getxattr(&mnt.join("last"), "user.last").unwrap(), b"1");
    assert!(!mnt.join("orphan").exists());
    assert!(!mnt.join("gone").exists());
}

#[test]
fn file_volume_survives_sigterm_and_remount() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let store = format!("file://{}", dir.path().join("volume").display());
    pohmelfs_testkit::format_volume(env!("CARGO_BIN_EXE_pohmelfs"), &store, &[]).unwrap();

    let first = Mounted::start(&store, &mnt, &dir.path().join("first.log"));
    populate(&first.mountpoint);
    first.stop();
    // The mountpoint is an empty directory again.
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);

    let second = Mounted::start(&store, &mnt, &dir.path().join("second.log"));
    check(&second.mountpoint);
    second.stop();
}

/// `mount --readonly` of a snapshot (the writable mount changed the
/// volume after it): the snapshot's files, every change refused with
/// EROFS, and a clean exit.
#[test]
fn a_snapshot_mounts_read_only() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let store = format!("file://{}", dir.path().join("volume").display());
    let exe = env!("CARGO_BIN_EXE_pohmelfs");
    pohmelfs_testkit::format_volume(exe, &store, &[]).unwrap();
    let first = Mounted::start(&store, &mnt, &dir.path().join("first.log"));
    populate(&first.mountpoint);
    first.stop();
    let out = Command::new(exe)
        .args(["snapshot", "create", &store, "mon"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let later = Mounted::start(&store, &mnt, &dir.path().join("later.log"));
    fs::remove_file(later.mountpoint.join("hello.txt")).unwrap();
    later.stop();

    let snap = format!("{store}@mon");
    let ro = Mounted::start_with(&snap, &mnt, &dir.path().join("ro.log"), &["--readonly"]);
    check(&ro.mountpoint);
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    let m = &ro.mountpoint;
    erofs(fs::write(m.join("new"), b"x"), "create");
    erofs(fs::write(m.join("hello.txt"), b"x"), "overwrite");
    erofs(fs::remove_file(m.join("hello.txt")), "unlink");
    erofs(fs::create_dir(m.join("d")), "mkdir");
    erofs(fs::rename(m.join("big"), m.join("big2")), "rename");
    check(m);
    ro.stop();
}

/// The durability contract across a daemon crash (kill -9, no drain):
/// an fsynced file is there after it; under `--sync-on-close` a file that
/// was only closed is there too. (What was closed but never fsynced, by
/// default, may or may not be: nothing is asserted of it.)
#[test]
fn fsynced_and_with_sync_on_close_closed_files_survive_kill_9() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let store = format!("file://{}", dir.path().join("volume").display());
    pohmelfs_testkit::format_volume(env!("CARGO_BIN_EXE_pohmelfs"), &store, &[]).unwrap();
    let fsynced = pattern(100_000, 11);
    let closed = pattern(70_000, 12);

    let first = Mounted::start(&store, &mnt, &dir.path().join("first.log"));
    let mut f = File::create(first.mountpoint.join("fsynced")).unwrap();
    f.write_all(&fsynced).unwrap();
    f.sync_all().unwrap();
    drop(f);
    first.kill9();

    let second = Mounted::start_with(
        &store,
        &mnt,
        &dir.path().join("second.log"),
        &["--sync-on-close"],
    );
    let said = wait_until(TIMEOUT, POLL, || {
        second.log_text().contains("sync on close")
    });
    assert!(
        said.is_some(),
        "the flag did not reach the transaction layer: {}",
        second.log_text()
    );
    assert_eq!(
        fs::read(second.mountpoint.join("fsynced")).unwrap(),
        fsynced
    );
    // Written and closed, never fsynced: close waited for it.
    fs::write(second.mountpoint.join("closed"), &closed).unwrap();
    // Truncated and closed, never fsynced (O_TRUNC, then close).
    File::create(second.mountpoint.join("fsynced")).unwrap();
    second.kill9();

    let third = Mounted::start(&store, &mnt, &dir.path().join("third.log"));
    assert_eq!(fs::read(third.mountpoint.join("closed")).unwrap(), closed);
    assert_eq!(
        fs::metadata(third.mountpoint.join("fsynced"))
            .unwrap()
            .len(),
        0,
        "the truncate at open was closed: it is durable"
    );
    third.stop();
}

/// `O_TRUNC` is checked before it cuts: an `open(O_RDONLY | O_TRUNC)` of
/// a file a process is executing is refused with ETXTBSY and changes
/// nothing (with FUSE's ATOMIC_O_TRUNC the kernel took the size to be 0
/// before that check, and the exec'ing process died of SIGBUS or SIGSEGV;
/// pjdfstest's `open::etxtbsy` failed about once in 60 runs); one that may
/// truncate does, with any access mode.
#[test]
fn o_trunc_truncates_only_what_may_be_written() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = Mounted::start("mem:", &mnt, &dir.path().join("mount.log"));
    let trunc = |path: &Path, access: i32| {
        OpenOptions::new()
            .read(access != libc::O_WRONLY)
            .write(access != libc::O_RDONLY)
            .custom_flags(libc::O_TRUNC)
            .open(path)
    };
    for access in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
        let f = m.mountpoint.join(format!("f{access}"));
        fs::write(&f, pattern(10_000, 1)).unwrap();
        drop(trunc(&f, access).unwrap());
        assert_eq!(fs::metadata(&f).unwrap().len(), 0, "access mode {access}");
        assert!(fs::read(&f).unwrap().is_empty(), "access mode {access}");
    }

    let exe = m.mountpoint.join("sleep");
    fs::copy("/usr/bin/sleep", &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let original = fs::read(&exe).unwrap();
    let mut child = Command::new(&exe).arg("600").spawn().unwrap();
    // The exec is complete (and the file denied to writers) once the
    // process's executable is the copy.
    let proc_exe = PathBuf::from(format!("/proc/{}/exe", child.id()));
    let running = wait_until(TIMEOUT, POLL, || {
        (fs::read_link(&proc_exe).ok().as_deref() == Some(exe.as_path())).then_some(())
    });
    assert!(running.is_some(), "{} never ran", exe.display());
    let err = trunc(&exe, libc::O_RDONLY).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
    assert_eq!(fs::read(&exe).unwrap(), original);
    assert!(child.try_wait().unwrap().is_none(), "the running copy died");
    child.kill().unwrap();
    child.wait().unwrap();
    m.stop();
}

#[test]
fn outside_umount_ends_the_daemon_cleanly() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start("mem:", &mnt, &dir.path().join("mount.log"));
    fs::write(m.mountpoint.join("f"), b"x").unwrap();
    let path = CString::new(m.mountpoint.as_os_str().as_bytes()).unwrap();
    // SAFETY: `path` is a NUL-terminated string alive across the call.
    let rc = unsafe { libc::umount2(path.as_ptr(), 0) };
    assert_eq!(rc, 0, "umount: {}", std::io::Error::last_os_error());
    let status = m.wait_exit();
    assert!(status.success(), "exit {status}: {}", m.log_text());
}

#[test]
fn bad_input_is_one_line_and_exit_1() {
    // Every case fails before /dev/fuse is opened: no skip without it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let cases = [
        (
            "mem:",
            dir.path().join("missing"),
            "No such file or directory",
        ),
        ("mem:", file, "is not a directory"),
        ("nowhere://x", mnt.clone(), "unknown store URL scheme"),
        ("no-scheme", mnt.clone(), "has no scheme"),
    ];
    for (store, mountpoint, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
            .args(["mount", "--store", store])
            .arg(&mountpoint)
            .output()
            .expect("run pohmelfs mount");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{store} {mountpoint:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("pohmelfs: ") && err.contains(want), "{err}");
        assert!(!is_mounted(&mountpoint));
    }
}
