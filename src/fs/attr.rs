//! Attributes and permissions: turning store inodes into `stat`, checking a
//! caller's access the way the kernel would for a local filesystem, and
//! validating names that come from the guest.

use std::ffi::CStr;

use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::Context;

use super::error::{errno, FsResult};
use crate::store::{FileKind, Inode, NAME_MAX};

pub const MAY_EXEC: u32 = 1;
pub const MAY_WRITE: u32 = 2;
pub const MAY_READ: u32 = 4;

/// The block size `stat` reports.
pub const STAT_BLKSIZE: i64 = 64 * 1024;

/// Build the `stat` of an inode.
pub fn to_stat(inode: &Inode) -> stat64 {
    // SAFETY: stat64 is a plain C struct of integers; all-zero is valid.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_ino = inode.ino;
    st.st_mode = inode.kind.mode_bits() | (inode.perm & 0o7777);
    st.st_nlink = inode.nlink.into();
    st.st_uid = inode.uid;
    st.st_gid = inode.gid;
    st.st_rdev = inode.rdev.into();
    st.st_size = i64::try_from(inode.size).unwrap_or(i64::MAX);
    st.st_blksize = STAT_BLKSIZE;
    st.st_blocks = i64::try_from(inode.size.div_ceil(512)).unwrap_or(i64::MAX);
    st.st_atime = inode.atime.sec;
    st.st_atime_nsec = inode.atime.nsec.into();
    st.st_mtime = inode.mtime.sec;
    st.st_mtime_nsec = inode.mtime.nsec.into();
    st.st_ctime = inode.ctime.sec;
    st.st_ctime_nsec = inode.ctime.nsec.into();
    st
}

/// Check that `ctx` may access `inode` with `mask` (MAY_READ | MAY_WRITE |
/// MAY_EXEC), with the owner/group/other rules and root's overrides. Only
/// the caller's primary group is known (FUSE does not carry the others).
pub fn check_access(ctx: &Context, inode: &Inode, mask: u32) -> FsResult<()> {
    if ctx.uid == 0 {
        // Root may read and write anything, and execute what has any x bit;
        // directories are always searchable.
        if mask & MAY_EXEC != 0 && inode.kind != FileKind::Directory && inode.perm & 0o111 == 0 {
            return errno!(EACCES);
        }
        return Ok(());
    }
    let bits = if ctx.uid == inode.uid {
        inode.perm >> 6
    } else if ctx.gid == inode.gid {
        inode.perm >> 3
    } else {
        inode.perm
    } & 7;
    if bits & mask == mask {
        Ok(())
    } else {
        errno!(EACCES)
    }
}

/// True when `ctx` owns `inode` or is root.
pub fn is_owner(ctx: &Context, inode: &Inode) -> bool {
    ctx.uid == 0 || ctx.uid == inode.uid
}

/// The sticky-bit rule: in a sticky directory only the owner of the entry,
/// the owner of the directory or root may remove or rename the entry.
pub fn check_sticky(ctx: &Context, dir: &Inode, victim: &Inode) -> FsResult<()> {
    if dir.perm & libc::S_ISVTX != 0 && ctx.uid != 0 && ctx.uid != dir.uid && ctx.uid != victim.uid
    {
        return errno!(EPERM);
    }
    Ok(())
}

/// Validate a name for a new or looked-up directory entry: not empty, no
/// `/`, at most NAME_MAX bytes (NUL cannot occur inside a `CStr`).
pub fn check_name(name: &CStr) -> FsResult<&[u8]> {
    let bytes = name.to_bytes();
    if bytes.is_empty() {
        return errno!(ENOENT);
    }
    if bytes.len() > NAME_MAX {
        return errno!(ENAMETOOLONG);
    }
    if bytes.contains(&b'/') {
        return errno!(EINVAL);
    }
    Ok(bytes)
}

/// True for `.` and `..`, which never exist as stored entries.
pub fn is_dot_or_dotdot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Timestamp;

    fn inode(uid: u32, gid: u32, perm: u32, kind: FileKind) -> Inode {
        Inode {
            ino: 20,
            kind,
            perm,
            uid,
            gid,
            nlink: 1,
            size: 0,
            rdev: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            parent: 0,
        }
    }

    fn ctx(uid: u32, gid: u32) -> Context {
        let mut c = Context::new();
        c.uid = uid;
        c.gid = gid;
        c
    }

    #[test]
    fn owner_group_other_bits_apply_in_order() {
        let f = inode(1000, 100, 0o640, FileKind::Regular);
        assert!(check_access(&ctx(1000, 1), &f, MAY_READ | MAY_WRITE).is_ok());
        assert!(check_access(&ctx(1001, 100), &f, MAY_READ).is_ok());
        assert!(check_access(&ctx(1001, 100), &f, MAY_WRITE).is_err());
        assert!(check_access(&ctx(1001, 1), &f, MAY_READ).is_err());
        // The owner class applies even when it grants less than the group's.
        let g = inode(1000, 100, 0o070, FileKind::Regular);
        assert!(check_access(&ctx(1000, 100), &g, MAY_READ).is_err());
    }

    #[test]
    fn root_needs_an_x_bit_to_execute_files() {
        let f = inode(1000, 100, 0o600, FileKind::Regular);
        assert!(check_access(&ctx(0, 0), &f, MAY_READ | MAY_WRITE).is_ok());
        assert!(check_access(&ctx(0, 0), &f, MAY_EXEC).is_err());
        let d = inode(1000, 100, 0o700, FileKind::Directory);
        assert!(check_access(&ctx(0, 0), &d, MAY_EXEC).is_ok());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name(c"ok").is_ok());
        assert_eq!(check_name(c"a/b").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(check_name(c"").unwrap_err().errno(), libc::ENOENT);
        let long = std::ffi::CString::new(vec![b'x'; 256]).unwrap();
        assert_eq!(check_name(&long).unwrap_err().errno(), libc::ENAMETOOLONG);
        let max = std::ffi::CString::new(vec![b'x'; 255]).unwrap();
        assert!(check_name(&max).is_ok());
    }

    #[test]
    fn sticky_directories_protect_other_users_entries() {
        let dir = inode(0, 0, 0o1777, FileKind::Directory);
        let theirs = inode(1001, 1001, 0o644, FileKind::Regular);
        assert_eq!(
            check_sticky(&ctx(1000, 1000), &dir, &theirs)
                .unwrap_err()
                .errno(),
            libc::EPERM
        );
        assert!(check_sticky(&ctx(1001, 1), &dir, &theirs).is_ok());
        assert!(check_sticky(&ctx(0, 0), &dir, &theirs).is_ok());
    }
}
