//! A full host disk under a `file://` volume, on a tmpfs of the test's own.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pohmelfs_testkit::skipped;

use super::{detach, have_fuse, is_mounted, pattern, Mounted};

/// A tmpfs of `bytes` mounted at `path` for the test, detached at drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        Self::call(path, &format!("size={bytes}"), 0);
        Tmpfs(path.to_path_buf())
    }

    /// Give the file system `bytes` in all.
    fn resize(&self, bytes: u64) {
        Self::call(&self.0, &format!("size={bytes}"), libc::MS_REMOUNT);
    }

    fn call(path: &Path, opts: &str, flags: libc::c_ulong) {
        // The source and the file system type are both "tmpfs".
        let tmpfs = CString::new("tmpfs").unwrap();
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let data = CString::new(opts).unwrap();
        // SAFETY: every pointer is a NUL-terminated string alive across
        // the call.
        let rc = unsafe {
            libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount tmpfs {opts} at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        detach(&self.0);
    }
}

/// A full host disk under a `file://` volume (a small tmpfs here): the
/// writes that find no room fail with ENOSPC at once (they failed with
/// EIO after a minute of retries), SIGTERM still ends the daemon within
/// its bounds (the engine cannot flush, so its close is cut at 30 s; the
/// daemon exits rather than hanging or aborting), and with room again the
/// volume checks clean and holds what was fsynced.
#[test]
fn a_full_host_disk_answers_enospc_and_the_daemon_still_stops() {
    if !have_fuse() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skipped("needs root to mount a tmpfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), 48 << 20);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let store = format!("file://{}", small.0.join("volume").display());
    pohmelfs_testkit::format_volume(env!("CARGO_BIN_EXE_pohmelfs"), &store, &[]).unwrap();
    let kept = pattern(100_000, 21);
    let daemon = Mounted::start(&store, &mnt, &dir.path().join("full.log"));
    let mut f = File::create(daemon.mountpoint.join("kept")).unwrap();
    f.write_all(&kept).unwrap();
    f.sync_all().unwrap();
    drop(f);

    // 1 MiB files, each fsynced, until the disk is full: far fewer than
    // 100 fit in 48 MiB.
    let piece = pattern(1 << 20, 22);
    let mut refused = None;
    for i in 0..100 {
        let started = std::time::Instant::now();
        let written = File::create(daemon.mountpoint.join(format!("f{i}")))
            .and_then(|mut f| f.write_all(&piece).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            refused = Some((i, e, started.elapsed()));
            break;
        }
    }
    let (at, e, took) = refused.expect("100 MiB went into a 48 MiB disk");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "file {at}: {e}: {}",
        daemon.log_text()
    );
    assert!(took < Duration::from_secs(20), "ENOSPC after {took:?}");

    // What the refused file left free, taken too: the disk is full for
    // the close as well, whatever room that file's refusal left.
    let mut filler = File::create(small.0.join("filler")).unwrap();
    let block = vec![0u8; 64 << 10];
    let full = (0..1024).find_map(|_| filler.write_all(&block).err());
    assert_eq!(full.and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
    drop(filler);

    let mut daemon = daemon;
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit();
    assert!(status.code().is_some(), "{status}: {}", daemon.log_text());
    assert!(
        daemon
            .log_text()
            .contains("the engine's close did not finish"),
        "the disk was full, yet the close finished: {}",
        daemon.log_text()
    );
    assert!(!is_mounted(&daemon.mountpoint), "still mounted after exit");
    drop(daemon);

    fs::remove_file(small.0.join("filler")).unwrap();
    small.resize(256 << 20);
    let checked = Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
        .args(["check", "--store", &store])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout).into_owned()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(
        checked.status.success() && said.contains(" 0 problems"),
        "{said}"
    );
    let again = Mounted::start(&store, &mnt, &dir.path().join("again.log"));
    assert_eq!(fs::read(again.mountpoint.join("kept")).unwrap(), kept);
    for i in 0..at {
        let got = fs::read(again.mountpoint.join(format!("f{i}"))).unwrap();
        assert!(
            got == piece,
            "fsynced file f{i} of {at} differs ({} bytes)",
            got.len()
        );
    }
    again.stop();
}
