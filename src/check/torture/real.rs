//! The directory under test: each operation as the system call it names,
//! and the observations the verifier compares with the model (lstat,
//! fstat, listings, symlink targets, extended attributes, file bytes).
//!
//! Every call returns the errno on failure, untranslated. Descriptors are
//! owned here and closed when the [`Real`] is dropped.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path as FsPath, PathBuf};

use super::model::Value;
use super::ops::{Data, Op, Path, SLOTS};

/// The last errno.
fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `Ok(r)` for a non-negative result, the errno otherwise.
fn check(r: libc::c_int) -> Result<libc::c_int, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn check_size(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

fn cstr(p: &FsPath) -> Result<CString, i32> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)
}

/// What lstat or fstat says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// `S_IFMT` bits.
    pub format: u32,
    pub perm: u32,
    pub nlink: u64,
    pub size: u64,
    pub ino: u64,
}

impl Stat {
    // `st_nlink` is u32 on some targets.
    #[allow(clippy::unnecessary_cast)]
    fn from(st: &libc::stat) -> Stat {
        Stat {
            format: st.st_mode & libc::S_IFMT,
            perm: st.st_mode & 0o777,
            nlink: st.st_nlink as u64,
            size: st.st_size as u64,
            ino: st.st_ino,
        }
    }
}

/// The directory tree under test, rooted at one directory.
pub struct Real {
    root: PathBuf,
    fds: [Option<libc::c_int>; SLOTS],
}

impl Drop for Real {
    fn drop(&mut self) {
        self.close_all();
    }
}

impl Real {
    pub fn new(root: PathBuf) -> Real {
        Real {
            root,
            fds: [None; SLOTS],
        }
    }

    pub fn root(&self) -> &FsPath {
        &self.root
    }

    pub fn path(&self, p: &Path) -> PathBuf {
        let mut out = self.root.clone();
        for c in p {
            out.push(c);
        }
        out
    }

    fn c(&self, p: &Path) -> Result<CString, i32> {
        cstr(&self.path(p))
    }

    fn fd(&self, slot: usize) -> Result<libc::c_int, i32> {
        self.fds[slot].ok_or(libc::EBADF)
    }

    pub fn close_all(&mut self) {
        for slot in self.fds.iter_mut() {
            if let Some(fd) = slot.take() {
                // SAFETY: `fd` was opened by this `Real` and is closed once.
                unsafe { libc::close(fd) };
            }
        }
    }

    /// Run `op`; its result in the model's terms.
    pub fn apply(&mut self, op: &Op) -> Result<Value, i32> {
        let unit = |r: Result<libc::c_int, i32>| r.map(|_| Value::Unit);
        match op {
            Op::Open {
                slot,
                path,
                create,
                excl,
                trunc,
                append,
                mode,
            } => {
                let mut flags = libc::O_RDWR | libc::O_CLOEXEC;
                for (on, f) in [
                    (create, libc::O_CREAT),
                    (excl, libc::O_EXCL),
                    (trunc, libc::O_TRUNC),
                    (append, libc::O_APPEND),
                ] {
                    if *on {
                        flags |= f;
                    }
                }
                self.open(*slot, path, flags, *mode)
            }
            Op::Close { slot } => {
                let fd = self.fds[*slot].take().ok_or(libc::EBADF)?;
                // SAFETY: `fd` is owned by this `Real` and leaves its table here.
                unit(check(unsafe { libc::close(fd) }))
            }
            Op::Write { slot, data } => self.write(*slot, None, data),
            Op::Pwrite { slot, offset, data } => self.write(*slot, Some(*offset), data),
            Op::Read { slot, offset, len } => {
                let fd = self.fd(*slot)?;
                self.pread_all(fd, *offset, *len).map(Value::Bytes)
            }
            Op::Truncate { path, size } => {
                let p = self.c(path)?;
                // SAFETY: `p` is a NUL-terminated path.
                unit(check(unsafe {
                    libc::truncate(p.as_ptr(), *size as libc::off_t)
                }))
            }
            Op::Ftruncate { slot, size } => {
                let fd = self.fd(*slot)?;
                // SAFETY: plain system call on an owned descriptor.
                unit(check(unsafe { libc::ftruncate(fd, *size as libc::off_t) }))
            }
            Op::Fallocate {
                slot,
                mode,
                offset,
                len,
            } => {
                let fd = self.fd(*slot)?;
                let (offset, len) = (*offset as libc::off_t, *len as libc::off_t);
                // SAFETY: plain system call on an owned descriptor.
                unit(check(unsafe {
                    libc::fallocate(fd, mode.flags(), offset, len)
                }))
            }
            Op::Rename { from, to } => {
                let (a, b) = (self.c(from)?, self.c(to)?);
                // SAFETY: both are NUL-terminated paths.
                unit(check(unsafe { libc::rename(a.as_ptr(), b.as_ptr()) }))
            }
            Op::Link { from, to } => self.link(from, to),
            Op::Unlink { path } => {
                let p = self.c(path)?;
                // SAFETY: `p` is a NUL-terminated path.
                unit(check(unsafe { libc::unlink(p.as_ptr()) }))
            }
            Op::Mkdir { path, mode } => {
                let p = self.c(path)?;
                // SAFETY: `p` is a NUL-terminated path.
                unit(check(unsafe {
                    libc::mkdir(p.as_ptr(), *mode as libc::mode_t)
                }))
            }
            Op::Rmdir { path } => {
                let p = self.c(path)?;
                // SAFETY: `p` is a NUL-terminated path.
                unit(check(unsafe { libc::rmdir(p.as_ptr()) }))
            }
            Op::Symlink { target, path } => {
                let t = CString::new(target.as_bytes()).map_err(|_| libc::EINVAL)?;
                let p = self.c(path)?;
                // SAFETY: both are NUL-terminated strings.
                unit(check(unsafe { libc::symlink(t.as_ptr(), p.as_ptr()) }))
            }
            Op::SetXattr { path, name, data } => self.setxattr(path, name, &data.bytes()),
            Op::RemoveXattr { path, name } => {
                let p = self.c(path)?;
                let n = CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)?;
                // SAFETY: both are NUL-terminated strings.
                unit(check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }))
            }
            Op::Chmod { path, mode } => {
                let p = self.c(path)?;
                // SAFETY: `p` is a NUL-terminated path.
                unit(check(unsafe {
                    libc::chmod(p.as_ptr(), *mode as libc::mode_t)
                }))
            }
            Op::Fsync { slot } => {
                let fd = self.fd(*slot)?;
                // SAFETY: plain system call on an owned descriptor.
                unit(check(unsafe { libc::fsync(fd) }))
            }
            Op::FsyncDir { path } => self.fsync_dir(path),
        }
    }

    /// open(2) into `slot`.
    fn open(&mut self, slot: usize, path: &Path, flags: i32, mode: u32) -> Result<Value, i32> {
        let p = self.c(path)?;
        // SAFETY: `p` is a NUL-terminated path that outlives the call.
        let fd = check(unsafe { libc::open(p.as_ptr(), flags, mode as libc::c_uint) })?;
        if let Some(old) = self.fds[slot].replace(fd) {
            // SAFETY: the model only opens into free slots; this
            // closes a descriptor this `Real` owns, once.
            unsafe { libc::close(old) };
        }
        Ok(Value::Unit)
    }

    /// write(2) at the descriptor's position (`offset` None), or pwrite(2).
    fn write(&mut self, slot: usize, offset: Option<u64>, data: &Data) -> Result<Value, i32> {
        let bytes = data.bytes();
        let fd = self.fd(slot)?;
        let (buf, len) = (bytes.as_ptr().cast(), bytes.len());
        let n = match offset {
            // SAFETY: `bytes` is valid for reads of its length.
            None => check_size(unsafe { libc::write(fd, buf, len) })?,
            // SAFETY: `bytes` is valid for reads of its length.
            Some(at) => check_size(unsafe { libc::pwrite(fd, buf, len, at as libc::off_t) })?,
        };
        Ok(Value::Count(n))
    }

    /// linkat(2) without following a final symlink.
    fn link(&self, from: &Path, to: &Path) -> Result<Value, i32> {
        let (a, b) = (self.c(from)?, self.c(to)?);
        // SAFETY: both are NUL-terminated paths; flags 0 does not
        // follow a final symlink.
        check(unsafe { libc::linkat(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), 0) })?;
        Ok(Value::Unit)
    }

    fn setxattr(&self, path: &Path, name: &str, value: &[u8]) -> Result<Value, i32> {
        let p = self.c(path)?;
        let n = CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)?;
        // SAFETY: `p` and `n` are NUL-terminated, `value` is valid for
        // reads of its length.
        check(unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })?;
        Ok(Value::Unit)
    }

    /// fsync(2) of a directory, through a descriptor opened for the call.
    fn fsync_dir(&self, path: &Path) -> Result<Value, i32> {
        let p = self.c(path)?;
        // SAFETY: `p` is a NUL-terminated path.
        let fd = check(unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened here and is closed once.
        let r = check(unsafe { libc::fsync(fd) });
        // SAFETY: as above.
        unsafe { libc::close(fd) };
        r.map(|_| Value::Unit)
    }

    /// Read `len` bytes at `offset`, or fewer at the end of the file.
    fn pread_all(&self, fd: libc::c_int, offset: u64, len: u64) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; len as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is valid for writes of its length.
            let n = check_size(unsafe {
                libc::pread(
                    fd,
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (offset + done as u64) as libc::off_t,
                )
            })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Bytes of the file open in `slot`.
    pub fn read_slot(&self, slot: usize, offset: u64, len: u64) -> Result<Vec<u8>, i32> {
        self.pread_all(self.fd(slot)?, offset, len)
    }

    /// Bytes of the file at `path` (opened read-only for the call).
    pub fn read_path(&self, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, i32> {
        let p = self.c(path)?;
        // SAFETY: `p` is a NUL-terminated path.
        let fd = check(unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        })?;
        let r = self.pread_all(fd, offset, len);
        // SAFETY: `fd` was opened here and is closed once.
        unsafe { libc::close(fd) };
        r
    }

    pub fn lstat(&self, path: &Path) -> Result<Stat, i32> {
        lstat(&self.path(path))
    }

    pub fn fstat(&self, slot: usize) -> Result<Stat, i32> {
        let fd = self.fd(slot)?;
        // SAFETY: all-zero is a valid `stat`; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is valid for writes.
        check(unsafe { libc::fstat(fd, &mut st) })?;
        Ok(Stat::from(&st))
    }

    /// Entries of a directory with their `d_type` as `S_IFMT` bits (0 when
    /// the filesystem does not say), sorted by name.
    pub fn list(&self, path: &Path) -> Result<Vec<(String, u32)>, i32> {
        list(&self.path(path))
    }

    pub fn readlink(&self, path: &Path) -> Result<String, i32> {
        std::fs::read_link(self.path(path))
            .map(|t| t.to_string_lossy().into_owned())
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// The `user.*` extended attributes of `path` (not following a final
    /// symlink) with their values, sorted by name.
    pub fn xattrs(&self, path: &Path) -> Result<Vec<(String, Vec<u8>)>, i32> {
        xattrs(&self.path(path))
    }
}

pub fn lstat(path: &FsPath) -> Result<Stat, i32> {
    let p = cstr(path)?;
    // SAFETY: all-zero is a valid `stat`; lstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is NUL-terminated, `st` valid for writes.
    check(unsafe { libc::lstat(p.as_ptr(), &mut st) })?;
    Ok(Stat::from(&st))
}

pub fn list(path: &FsPath) -> Result<Vec<(String, u32)>, i32> {
    let dir = std::fs::read_dir(path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let t = entry
            .file_type()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let format = if t.is_dir() {
            libc::S_IFDIR
        } else if t.is_symlink() {
            libc::S_IFLNK
        } else if t.is_file() {
            libc::S_IFREG
        } else {
            0
        };
        out.push((entry.file_name().to_string_lossy().into_owned(), format));
    }
    out.sort();
    Ok(out)
}

pub fn xattrs(path: &FsPath) -> Result<Vec<(String, Vec<u8>)>, i32> {
    let p = cstr(path)?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: `p` is NUL-terminated; `names` is valid for writes of its length.
    let n = check_size(unsafe {
        libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len())
    })?;
    names.truncate(n);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let cname = CString::new(name).map_err(|_| libc::EINVAL)?;
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: both strings are NUL-terminated; `value` is valid for
        // writes of its length.
        let len = check_size(unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        })?;
        value.truncate(len);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    out.sort();
    Ok(out)
}

/// The bytes of the file at `path`, whole.
pub fn read_file(path: &FsPath) -> Result<Vec<u8>, i32> {
    std::fs::read(path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}
