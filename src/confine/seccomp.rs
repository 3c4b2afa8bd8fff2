//! The seccomp filter of `serve` and `store`: the system calls the daemons
//! make, and nothing else. The list was derived from `strace -f` of the
//! test suite, the VM tests and the benchmark (both daemons; `file://`,
//! `mem:`, `s3://` against moto, `pohmel://`) and then widened by the calls
//! glibc, the Rust standard library, tokio, SlateDB and object_store
//! (reqwest, DNS through glibc's resolver) make on paths the tests rarely
//! take: thread start (clone3 falling back to clone, rseq), allocation and
//! trimming (madvise), timers, randomness, file syncing, flock, fallocate.
//!
//! Left out on purpose: starting programs (execve), tracing and reading
//! other processes (ptrace, process_vm_*), mounts and namespaces,
//! changing identity or capabilities, chown and chmod of host files (guest
//! ownership lives in the volume), kernel modules, keyrings, bpf,
//! perf_event_open, userfaultfd, and every 32-bit or x32 call (the filter
//! checks the architecture first).
//!
//! The filter is a plain list of compares (classic BPF, the kernel's JIT
//! makes it cheap); it must never allow by default.

use super::ConfineError;

/// What a system call outside the list does (`--seccomp`, virtiofsd's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompAction {
    /// No filter.
    None,
    /// Allow the call; the kernel logs it (audit or kernel log). For finding
    /// a missing call without stopping the daemon.
    Log,
    /// Stop the call; a SIGSYS handler prints one line naming it and aborts
    /// the process (the default).
    Trap,
    /// Stop the call and kill the process at once (the kernel's audit log
    /// names the call, if auditing is on).
    Kill,
}

impl std::fmt::Display for SeccompAction {
    /// The value `--seccomp` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompAction::None => "none",
            SeccompAction::Log => "log",
            SeccompAction::Trap => "trap",
            SeccompAction::Kill => "kill",
        })
    }
}

/// Install the filter on every thread of the process (TSYNC). Threads
/// started later inherit it. Needs no_new_privs (set by
/// [`super::restrict`]) or CAP_SYS_ADMIN.
pub fn install(action: SeccompAction) -> Result<(), ConfineError> {
    let ret = match action {
        SeccompAction::None => return Ok(()),
        SeccompAction::Log => libc::SECCOMP_RET_LOG,
        SeccompAction::Trap => {
            install_sigsys_handler()?;
            libc::SECCOMP_RET_TRAP
        }
        SeccompAction::Kill => libc::SECCOMP_RET_KILL_PROCESS,
    };
    let program = filter(ret);
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).unwrap_or(u16::MAX),
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prog points at `program`, which lives across the call; the
    // kernel copies the filter and keeps no pointer to it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        // With TSYNC a positive return names a thread that could not be
        // synchronised; it cannot happen to threads that share no filter.
        let e = if rc > 0 {
            std::io::Error::other(format!("thread {rc} could not take the filter"))
        } else {
            std::io::Error::last_os_error()
        };
        return Err(ConfineError::Seccomp(e));
    }
    Ok(())
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// `struct seccomp_data`: the call number, then the architecture.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// `struct seccomp_data`: the call's arguments, 8 bytes each (the low
/// word first on the little-endian architectures this builds for).
const OFFSET_ARGS: u32 = 16;

/// A call allowed only with one of a few values in one argument.
struct ArgRule {
    nr: libc::c_long,
    arg: u32,
    values: Vec<u32>,
}

/// ioctl: only the requests the standard library and tokio make (is a
/// terminal, window size, non-blocking, close-on-exec, bytes readable);
/// never TIOCSTI and the like. tgkill: only this process's own threads
/// (abort), never another process.
fn arg_rules() -> Vec<ArgRule> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    let requests = [
        libc::TCGETS,
        libc::TIOCGWINSZ,
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::FIONCLEX,
        libc::FIONREAD,
    ];
    vec![
        ArgRule {
            nr: libc::SYS_ioctl,
            arg: 1,
            values: requests.iter().map(|r| *r as u32).collect(),
        },
        ArgRule {
            nr: libc::SYS_tgkill,
            arg: 0,
            values: vec![pid],
        },
    ]
}

/// The program: a foreign architecture is killed; the calls with argument
/// rules are checked first; an allowed call number jumps to ALLOW;
/// anything else falls through to `ret`.
pub(super) fn filter(ret: u32) -> Vec<libc::sock_filter> {
    let allowed = allowed();
    let mut p = Vec::with_capacity(allowed.len() + 32);
    p.push(stmt(BPF_LD_W_ABS, OFFSET_ARCH));
    p.push(jeq(AUDIT_ARCH, 1, 0));
    p.push(stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS));
    p.push(stmt(BPF_LD_W_ABS, OFFSET_NR));
    for rule in arg_rules() {
        // [jeq nr] [ld arg] [jeq v1..vk] [ret default] [ret allow]; a
        // different call skips the block with the number still loaded.
        let k = rule.values.len();
        let (Ok(skip), Ok(nr)) = (u8::try_from(k + 3), u32::try_from(rule.nr)) else {
            continue; // never: a handful of values; a rule left out denies
        };
        p.push(jeq(nr, 0, skip));
        p.push(stmt(BPF_LD_W_ABS, OFFSET_ARGS + 8 * rule.arg));
        for (i, v) in rule.values.iter().enumerate() {
            p.push(jeq(*v, u8::try_from(k - i).unwrap_or(0), 0));
        }
        p.push(stmt(BPF_RET_K, ret));
        p.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
    }
    let n = allowed.len();
    for (i, nr) in allowed.iter().enumerate() {
        // Skip the compares after this one and the default return. The
        // list is shorter than 255 (checked below at compile time); were
        // it not, 0 would fall through to the next compare: deny, not allow.
        let jt = u8::try_from(n - i).unwrap_or(0);
        p.push(jeq(*nr, jt, 0));
    }
    p.push(stmt(BPF_RET_K, ret));
    p.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
    p
}

// A jump's offset is 8 bits: the list must stay below 255 calls.
const _: () = assert!(ALLOWED.len() + ALLOWED_ARCH.len() < 255);

/// The allowed call numbers, sorted, deduplicated.
pub(super) fn allowed() -> Vec<u32> {
    let mut v: Vec<u32> = ALLOWED
        .iter()
        .chain(ALLOWED_ARCH)
        .filter_map(|(_, nr)| u32::try_from(*nr).ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), paste_sys!($name))),*]
    };
}
macro_rules! paste_sys {
    ($name:ident) => {
        sys::$name
    };
}

/// The call numbers by name, for this architecture.
#[allow(non_upper_case_globals)]
mod sys {
    pub use libc::{
        SYS_accept as accept, SYS_accept4 as accept4, SYS_bind as bind, SYS_brk as brk,
        SYS_clock_getres as clock_getres, SYS_clock_gettime as clock_gettime,
        SYS_clock_nanosleep as clock_nanosleep, SYS_clone as clone, SYS_clone3 as clone3,
        SYS_close as close, SYS_close_range as close_range, SYS_connect as connect,
        SYS_copy_file_range as copy_file_range, SYS_dup as dup, SYS_dup3 as dup3,
        SYS_epoll_create1 as epoll_create1, SYS_epoll_ctl as epoll_ctl,
        SYS_epoll_pwait as epoll_pwait, SYS_epoll_pwait2 as epoll_pwait2, SYS_eventfd2 as eventfd2,
        SYS_exit as exit, SYS_exit_group as exit_group, SYS_faccessat as faccessat,
        SYS_faccessat2 as faccessat2, SYS_fadvise64 as fadvise64, SYS_fallocate as fallocate,
        SYS_fcntl as fcntl, SYS_fdatasync as fdatasync, SYS_flock as flock, SYS_fstatfs as fstatfs,
        SYS_fsync as fsync, SYS_ftruncate as ftruncate, SYS_futex as futex, SYS_getcpu as getcpu,
        SYS_getcwd as getcwd, SYS_getdents64 as getdents64, SYS_getegid as getegid,
        SYS_geteuid as geteuid, SYS_getgid as getgid, SYS_getpeername as getpeername,
        SYS_getpid as getpid, SYS_getppid as getppid, SYS_getrandom as getrandom,
        SYS_getresgid as getresgid, SYS_getresuid as getresuid, SYS_getrusage as getrusage,
        SYS_getsockname as getsockname, SYS_getsockopt as getsockopt, SYS_gettid as gettid,
        SYS_gettimeofday as gettimeofday, SYS_getuid as getuid, SYS_linkat as linkat,
        SYS_listen as listen, SYS_lseek as lseek, SYS_madvise as madvise,
        SYS_membarrier as membarrier, SYS_memfd_create as memfd_create, SYS_mincore as mincore,
        SYS_mkdirat as mkdirat, SYS_mmap as mmap, SYS_mprotect as mprotect, SYS_mremap as mremap,
        SYS_msync as msync, SYS_munmap as munmap, SYS_nanosleep as nanosleep,
        SYS_newfstatat as newfstatat, SYS_openat as openat, SYS_pipe2 as pipe2, SYS_ppoll as ppoll,
        SYS_prctl as prctl, SYS_pread64 as pread64, SYS_preadv as preadv, SYS_preadv2 as preadv2,
        SYS_prlimit64 as prlimit64, SYS_pselect6 as pselect6, SYS_pwrite64 as pwrite64,
        SYS_pwritev as pwritev, SYS_pwritev2 as pwritev2, SYS_read as read,
        SYS_readahead as readahead, SYS_readlinkat as readlinkat, SYS_readv as readv,
        SYS_recvfrom as recvfrom, SYS_recvmmsg as recvmmsg, SYS_recvmsg as recvmsg,
        SYS_renameat as renameat, SYS_renameat2 as renameat2,
        SYS_restart_syscall as restart_syscall, SYS_rseq as rseq, SYS_rt_sigaction as rt_sigaction,
        SYS_rt_sigprocmask as rt_sigprocmask, SYS_rt_sigreturn as rt_sigreturn,
        SYS_rt_sigtimedwait as rt_sigtimedwait, SYS_sched_getaffinity as sched_getaffinity,
        SYS_sched_yield as sched_yield, SYS_sendfile as sendfile, SYS_sendmmsg as sendmmsg,
        SYS_sendmsg as sendmsg, SYS_sendto as sendto, SYS_set_robust_list as set_robust_list,
        SYS_set_tid_address as set_tid_address, SYS_setpriority as setpriority,
        SYS_setsockopt as setsockopt, SYS_shutdown as shutdown, SYS_sigaltstack as sigaltstack,
        SYS_socket as socket, SYS_socketpair as socketpair, SYS_splice as splice,
        SYS_statfs as statfs, SYS_statx as statx, SYS_sync_file_range as sync_file_range,
        SYS_syncfs as syncfs, SYS_sysinfo as sysinfo, SYS_timerfd_create as timerfd_create,
        SYS_timerfd_settime as timerfd_settime, SYS_uname as uname, SYS_unlinkat as unlinkat,
        SYS_write as write, SYS_writev as writev,
    };
    #[cfg(target_arch = "x86_64")]
    pub use libc::{
        SYS_access as access, SYS_arch_prctl as arch_prctl, SYS_dup2 as dup2,
        SYS_epoll_create as epoll_create, SYS_epoll_wait as epoll_wait, SYS_fstat as fstat,
        SYS_getrlimit as getrlimit, SYS_lstat as lstat, SYS_mkdir as mkdir, SYS_open as open,
        SYS_pipe as pipe, SYS_poll as poll, SYS_readlink as readlink, SYS_rename as rename,
        SYS_rmdir as rmdir, SYS_select as select, SYS_stat as stat, SYS_time as time,
        SYS_unlink as unlink,
    };
}

/// The allow list, by name (the names are for the docs and the tests).
pub(super) const ALLOWED: &[(&str, libc::c_long)] = calls![
    // Memory: the allocator, thread stacks, guest memory mappings.
    brk,
    mmap,
    munmap,
    mremap,
    mprotect,
    madvise,
    mincore,
    msync,
    membarrier,
    // Threads, their exit and their synchronisation.
    clone,
    clone3,
    exit,
    exit_group,
    futex,
    set_robust_list,
    set_tid_address,
    rseq,
    gettid,
    getpid,
    getppid,
    sched_yield,
    sched_getaffinity,
    // Background threads lower their own priority (the reclaimer); without
    // CAP_SYS_NICE a thread can only lower it.
    setpriority,
    prctl,
    prlimit64,
    // Signals (signal-hook, SIGTERM drain, abort).
    rt_sigaction,
    rt_sigprocmask,
    rt_sigreturn,
    rt_sigtimedwait,
    sigaltstack,
    restart_syscall,
    // Time and randomness.
    clock_gettime,
    clock_getres,
    clock_nanosleep,
    nanosleep,
    gettimeofday,
    getrandom,
    timerfd_create,
    timerfd_settime,
    // Identity and host facts (read only).
    getuid,
    geteuid,
    getgid,
    getegid,
    getresuid,
    getresgid,
    uname,
    getrusage,
    getcwd,
    sysinfo,
    getcpu,
    // Files of the volume: segments, SlateDB's files, the commit log.
    openat,
    close,
    close_range,
    read,
    write,
    readv,
    writev,
    pread64,
    pwrite64,
    preadv,
    pwritev,
    preadv2,
    pwritev2,
    lseek,
    newfstatat,
    statx,
    fstatfs,
    faccessat,
    faccessat2,
    readlinkat,
    getdents64,
    mkdirat,
    unlinkat,
    renameat,
    renameat2,
    linkat,
    ftruncate,
    fallocate,
    fsync,
    fdatasync,
    sync_file_range,
    syncfs,
    flock,
    fcntl,
    fadvise64,
    readahead,
    statfs,
    copy_file_range,
    sendfile,
    splice,
    dup,
    dup3,
    pipe2,
    memfd_create,
    // Event loops: vhost-user's epoll, tokio's epoll and eventfd.
    epoll_create1,
    epoll_ctl,
    epoll_pwait,
    epoll_pwait2,
    eventfd2,
    ppoll,
    pselect6,
    // Sockets: vhost-user, the control socket, store servers, S3, DNS.
    socket,
    socketpair,
    bind,
    listen,
    accept,
    accept4,
    connect,
    getsockname,
    getpeername,
    setsockopt,
    getsockopt,
    shutdown,
    sendto,
    recvfrom,
    sendmsg,
    recvmsg,
    sendmmsg,
    recvmmsg,
];

/// Calls only x86_64 has (glibc or std may still use the old forms).
#[cfg(target_arch = "x86_64")]
pub(super) const ALLOWED_ARCH: &[(&str, libc::c_long)] = calls![
    access,
    arch_prctl,
    dup2,
    epoll_create,
    epoll_wait,
    fstat,
    getrlimit,
    lstat,
    mkdir,
    open,
    pipe,
    poll,
    readlink,
    rename,
    rmdir,
    select,
    stat,
    time,
    unlink,
];
#[cfg(not(target_arch = "x86_64"))]
pub(super) const ALLOWED_ARCH: &[(&str, libc::c_long)] = &[];

/// The name of call `nr` on this architecture, for the violation line.
pub fn call_name(nr: i64) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    return super::names::name(nr);
    #[cfg(not(target_arch = "x86_64"))]
    return ALLOWED
        .iter()
        .find(|(_, n)| i64::from(*n) == nr)
        .map(|(name, _)| *name);
}

fn install_sigsys_handler() -> Result<(), ConfineError> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa is a valid sigaction whose handler is async-signal-safe
    // (it formats into a stack buffer, writes and aborts).
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(ConfineError::Sigaction(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The SIGSYS part of `siginfo_t` (`_sigsys` in the kernel's union, after
/// the three ints and the union's 8-byte alignment).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A call outside the list: one line on stderr naming it, then abort.
/// Async-signal-safe: no allocation, no lock, only write(2) and abort(3).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO; for
        // SIGSYS from seccomp its union holds `_sigsys` as SigsysInfo lays out.
        i64::from(unsafe { (*info.cast::<SigsysInfo>()).syscall })
    };
    let mut line = LineBuf::default();
    line.push(b"pohmelfs: seccomp: system call ");
    line.push_number(nr);
    line.push(b" (");
    line.push(call_name(nr).unwrap_or("unknown").as_bytes());
    line.push(b") is not allowed; aborting (docs/security.md, --seccomp)\n");
    // SAFETY: writes line.len bytes of a live stack buffer to stderr.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    // SAFETY: abort has no preconditions; it does not return.
    unsafe { libc::abort() };
}

/// A fixed line buffer for the signal handler.
struct LineBuf {
    buf: [u8; 200],
    len: usize,
}

impl Default for LineBuf {
    fn default() -> LineBuf {
        LineBuf {
            buf: [0; 200],
            len: 0,
        }
    }
}

impl LineBuf {
    fn push(&mut self, bytes: &[u8]) {
        for b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = *b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}
