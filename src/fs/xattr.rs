//! Extended attributes. Guests with SELinux fail to mount a filesystem whose
//! getxattr is ENOSYS, so these are real: stored per inode, with the Linux
//! limits on name and value sizes and the namespace permission rules.

use std::ffi::CStr;

use fuse_backend_rs::api::filesystem::{Context, GetxattrReply, ListxattrReply};

use super::attr::{check_access, is_owner, MAY_READ, MAY_WRITE};
use super::error::{errno, FsError, FsResult};
use super::PohmelFs;
use crate::store::{
    FileKind, Inode, Op, Timestamp, Txn, XATTR_LIST_MAX, XATTR_NAME_MAX, XATTR_VALUE_MAX,
};

const XATTR_CREATE: u32 = 1;
const XATTR_REPLACE: u32 = 2;

/// Which namespace a name is in, and so who may touch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Namespace {
    User,
    Trusted,
    Security,
}

fn namespace(name: &[u8]) -> FsResult<Namespace> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return errno!(ERANGE);
    }
    if name.starts_with(b"user.") {
        Ok(Namespace::User)
    } else if name.starts_with(b"trusted.") {
        Ok(Namespace::Trusted)
    } else if name.starts_with(b"security.") {
        Ok(Namespace::Security)
    } else {
        // system.posix_acl_* and unknown namespaces: no ACL support.
        errno!(EOPNOTSUPP)
    }
}

/// May `ctx` read (`write == false`) or change the attribute `ns` of
/// `inode`?
fn check_xattr_access(ctx: &Context, inode: &Inode, ns: Namespace, write: bool) -> FsResult<()> {
    match ns {
        Namespace::Trusted if ctx.uid != 0 => errno!(EPERM),
        Namespace::Trusted => Ok(()),
        Namespace::Security if write && !is_owner(ctx, inode) => errno!(EPERM),
        Namespace::Security => Ok(()),
        Namespace::User => {
            // user.* lives only on regular files and directories.
            if !matches!(inode.kind, FileKind::Regular | FileKind::Directory) {
                return if write {
                    errno!(EPERM)
                } else {
                    errno!(ENODATA)
                };
            }
            check_access(ctx, inode, if write { MAY_WRITE } else { MAY_READ })
        }
    }
}

impl PohmelFs {
    pub(super) fn do_setxattr(
        &self,
        ctx: &Context,
        ino: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let name = name.to_bytes();
        let ns = namespace(name)?;
        if value.len() > XATTR_VALUE_MAX {
            return errno!(E2BIG);
        }
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
            return errno!(EINVAL);
        }
        let _held = self.locks.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        check_xattr_access(ctx, &inode, ns, true)?;
        let exists = self.store.get_xattr(ino, name)?.is_some();
        if exists && flags & XATTR_CREATE != 0 {
            return errno!(EEXIST);
        }
        if !exists && flags & XATTR_REPLACE != 0 {
            return errno!(ENODATA);
        }
        if !exists {
            let listed: usize = self
                .store
                .list_xattr(ino)?
                .iter()
                .map(|n| n.len() + 1)
                .sum();
            if listed + name.len() + 1 > XATTR_LIST_MAX {
                return errno!(ENOSPC);
            }
        }
        inode.ctime = Timestamp::now();
        let mut txn = Txn::new();
        txn.push(Op::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
        });
        txn.push(Op::PutInode(inode));
        self.commit(txn)
    }

    pub(super) fn do_getxattr(
        &self,
        ctx: &Context,
        ino: u64,
        name: &CStr,
        size: u32,
    ) -> FsResult<GetxattrReply> {
        let name = name.to_bytes();
        let ns = namespace(name)?;
        let inode = self.inode(ino)?;
        check_xattr_access(ctx, &inode, ns, false)?;
        let value = self
            .store
            .get_xattr(ino, name)?
            .ok_or(FsError::Errno(libc::ENODATA))?;
        sized_reply(value, size, GetxattrReply::Value, GetxattrReply::Count)
    }

    pub(super) fn do_listxattr(&self, ino: u64, size: u32) -> FsResult<ListxattrReply> {
        self.inode(ino)?;
        let mut list = Vec::new();
        for name in self.store.list_xattr(ino)? {
            list.extend_from_slice(&name);
            list.push(0);
        }
        sized_reply(list, size, ListxattrReply::Names, ListxattrReply::Count)
    }

    pub(super) fn do_removexattr(&self, ctx: &Context, ino: u64, name: &CStr) -> FsResult<()> {
        let name = name.to_bytes();
        let ns = namespace(name)?;
        let _held = self.locks.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        check_xattr_access(ctx, &inode, ns, true)?;
        if self.store.get_xattr(ino, name)?.is_none() {
            return errno!(ENODATA);
        }
        inode.ctime = Timestamp::now();
        let mut txn = Txn::new();
        txn.push(Op::RemoveXattr {
            ino,
            name: name.to_vec(),
        });
        txn.push(Op::PutInode(inode));
        self.commit(txn)
    }
}

/// The getxattr/listxattr size protocol: size 0 asks for the length, a
/// buffer too small is ERANGE.
fn sized_reply<T>(
    data: Vec<u8>,
    size: u32,
    value: fn(Vec<u8>) -> T,
    count: fn(u32) -> T,
) -> FsResult<T> {
    let len = u32::try_from(data.len()).map_err(|_| FsError::Errno(libc::E2BIG))?;
    if size == 0 {
        Ok(count(len))
    } else if size < len {
        errno!(ERANGE)
    } else {
        Ok(value(data))
    }
}
