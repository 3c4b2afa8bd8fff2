//! Confinement is process-wide (umask, no_new_privs, the seccomp filter),
//! so each check runs in a child: this test binary again, told by
//! [`CHILD_ENV`] which step to take before calling what it must not.

use super::*;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Output};

/// Set in a child to the case it runs (see [`child_case`]).
const CHILD_ENV: &str = "POHMELFS_CONFINE_CHILD";
/// Where a child may create files.
const CHILD_DIR_ENV: &str = "POHMELFS_CONFINE_DIR";
/// Printed by a child once the allowed calls went through.
const ALLOWED_OK: &str = "confine-child: allowed calls ran";

/// Run `child_case` in a fresh copy of this test binary with `case`.
fn run_child(case: &str, dir: &Path) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "confine::tests::child_case", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, case)
        .env(CHILD_DIR_ENV, dir)
        .output()
        .unwrap()
}

/// The child's side; does nothing in a normal test run.
#[test]
fn child_case() {
    let Some(case) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var_os(CHILD_DIR_ENV).unwrap());
    restrict(&[]).unwrap();
    let action = match case.to_str().unwrap() {
        "restrict" => {
            // SAFETY: prctl with integer arguments only.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            assert_eq!(nnp, 1, "no_new_privs");
            assert!(!has_effective_capabilities().unwrap());
            std::fs::create_dir(dir.join("d")).unwrap();
            std::fs::write(dir.join("f"), b"x").unwrap();
            std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
            eprintln!("{ALLOWED_OK}");
            return;
        }
        "ioctl" => {
            seccomp::install(SeccompAction::Trap).unwrap();
            // isatty (TCGETS) is on the list; TIOCSTI (typing into a
            // terminal) is not. Its argument is a byte that goes nowhere:
            // the call is stopped before it runs.
            // SAFETY: isatty only queries the descriptor.
            unsafe { libc::isatty(2) };
            eprintln!("{ALLOWED_OK}");
            let byte = 0u8;
            // SAFETY: TIOCSTI reads one byte from a live local.
            let rc = unsafe { libc::ioctl(-1, libc::TIOCSTI, &byte) };
            eprintln!("confine-child: TIOCSTI returned {rc}");
            return;
        }
        "trap" => SeccompAction::Trap,
        "kill" => SeccompAction::Kill,
        "log" => SeccompAction::Log,
        other => panic!("unknown case {other}"),
    };
    // A thread started before the filter must be filtered too (TSYNC).
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let early = std::thread::spawn(move || {
        rx.recv().unwrap();
        forbidden_call()
    });
    seccomp::install(action).unwrap();
    // Calls on the list still work: files, threads, time, randomness.
    std::fs::write(dir.join("allowed"), b"x").unwrap();
    std::thread::spawn(std::time::Instant::now).join().unwrap();
    let mut buf = [0u8; 8];
    getrandom::fill(&mut buf).unwrap();
    eprintln!("{ALLOWED_OK}");
    tx.send(()).unwrap();
    let rc = early.join().unwrap();
    // Only --seccomp log lets the call through (it fails: no such process).
    eprintln!("confine-child: forbidden call returned {rc}");
}

/// `ptrace(PTRACE_PEEKDATA, pid -1)`: not on the list, and harmless if it
/// ran (there is no such process).
fn forbidden_call() -> libc::c_long {
    // SAFETY: PEEKDATA of a nonexistent pid reads nothing; the pointers
    // are null and never dereferenced.
    unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_PEEKDATA,
            -1,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pohmelfs-confine-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_forbidden_call_aborts_with_a_line_naming_it() {
    let dir = scratch("trap");
    let out = run_child("trap", &dir);
    let err = stderr(&out);
    assert!(err.contains(ALLOWED_OK), "allowed calls failed: {err}");
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{err}");
    let line = format!(
        "pohmelfs: seccomp: system call {} (ptrace) is not allowed",
        libc::SYS_ptrace
    );
    assert!(err.contains(&line), "no audit line in: {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ioctl_is_limited_to_its_requests() {
    let dir = scratch("ioctl");
    let out = run_child("ioctl", &dir);
    let err = stderr(&out);
    assert!(err.contains(ALLOWED_OK), "allowed calls failed: {err}");
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{err}");
    assert!(err.contains("(ioctl) is not allowed"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn seccomp_kill_kills_the_process() {
    let dir = scratch("kill");
    let out = run_child("kill", &dir);
    let err = stderr(&out);
    assert!(err.contains(ALLOWED_OK), "allowed calls failed: {err}");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn seccomp_log_lets_the_call_through() {
    let dir = scratch("log");
    let out = run_child("log", &dir);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("forbidden call returned -1"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restrict_sets_umask_no_new_privs_and_drops_capabilities() {
    let dir = scratch("restrict");
    let out = run_child("restrict", &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("d"), 0o700);
    assert_eq!(mode("f"), 0o600);
    assert_eq!(mode("s"), 0o700);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_list_leaves_out_the_dangerous_calls() {
    let allowed = seccomp::allowed();
    for (name, nr) in [
        ("execve", libc::SYS_execve),
        ("execveat", libc::SYS_execveat),
        ("ptrace", libc::SYS_ptrace),
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("setuid", libc::SYS_setuid),
        ("capset", libc::SYS_capset),
        ("fchownat", libc::SYS_fchownat),
        ("bpf", libc::SYS_bpf),
        ("init_module", libc::SYS_init_module),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("seccomp", libc::SYS_seccomp),
    ] {
        let nr = u32::try_from(nr).unwrap();
        assert!(!allowed.contains(&nr), "{name} is allowed");
    }
    #[cfg(target_arch = "x86_64")]
    for (name, nr) in seccomp::ALLOWED.iter().chain(seccomp::ALLOWED_ARCH) {
        assert_eq!(seccomp::call_name(i64::from(*nr as i32)), Some(*name));
    }
}

#[test]
fn socket_access_follows_group_and_mode() {
    let dir = scratch("socket");
    let path = dir.join("s");
    let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() }.to_string();
    set_socket_access(&path, Some(&gid), None).unwrap();
    let mode = || std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(), 0o660);
    set_socket_access(&path, None, Some(0o600)).unwrap();
    assert_eq!(mode(), 0o600);
    assert!(matches!(
        set_socket_access(&path, Some("no-such-group-pohmelfs"), None),
        Err(ConfineError::NoGroup(_))
    ));
    assert_eq!(parse_mode("0660"), Ok(0o660));
    assert_eq!(parse_mode("750"), Ok(0o750));
    assert!(parse_mode("0999").is_err());
    assert!(parse_mode("01777").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_in_a_url_are_refused_and_not_echoed() {
    let url = "s3://b/p?endpoint=http://h:9&access_key_id=AKIA&Secret_Access_Key=hunter2";
    let err = refuse_secret_in_url(url).unwrap_err();
    let text = crate::ErrorChain(&err).to_string();
    assert!(text.contains("secret_access_key"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(refuse_secret_in_url("s3://b/p?token=x").is_err());
    refuse_secret_in_url("s3://b/p?endpoint=http://h:9&access_key_id=AKIA").unwrap();
    refuse_secret_in_url("pohmel://h:1/v?secret_file=/etc/pohmelfs/secret").unwrap();
    refuse_secret_in_url("file:///var/lib/pohmelfs/vol").unwrap();
}

#[test]
fn debug_of_the_remote_config_leaves_the_secret_out() {
    // (ServerConfig's credentials hold the same Secret type.)
    let mut remote = crate::net::client::RemoteConfig::from_url("pohmel://h:1/v").unwrap();
    remote.secret = crate::net::credentials::Secret::new(b"hunter2".to_vec());
    let text = format!("{remote:?}");
    assert!(
        !text.contains("104, 117") && !text.contains("hunter2"),
        "{text}"
    );
    assert!(text.contains("redacted>"), "{text}");
}
