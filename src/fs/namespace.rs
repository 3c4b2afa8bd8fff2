//! Namespace operations: lookup, creating nodes, unlink and rmdir, hard
//! links and directory listing (rename: `rename.rs`).

use std::ffi::CStr;
use std::io;

use fuse_backend_rs::api::filesystem::{Context, DirEntry, Entry};

use super::attr::{
    check_access, check_name, check_sticky, is_dot_or_dotdot, MAY_EXEC, MAY_READ, MAY_WRITE,
};
use super::error::{errno, FsError, FsResult};
use super::handles::OpenFile;
use super::{lock, PohmelFs};
use crate::store::{
    Dirent, FileKind, Inode, Op, StoreError, Timestamp, Txn, FIRST_FREE_ID, SYMLINK_MAX,
};

/// The most hard links one inode may have.
const LINK_MAX: u32 = 65_000;

/// How many entries readdir fetches from the store at a time.
const READDIR_BATCH: usize = 128;

impl PohmelFs {
    pub(super) fn do_lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> FsResult<Entry> {
        let name = check_name(name)?;
        let dir = self.dir(parent)?;
        check_access(ctx, &dir, MAY_EXEC)?;
        let ino = match name {
            b"." => dir.ino,
            b".." => dir.parent,
            _ => match self.store.lookup(parent, name)? {
                Some(d) => d.ino,
                None => return errno!(ENOENT),
            },
        };
        let inode = self.inode(ino)?;
        self.may_reference(Some(inode.ino))?;
        self.remember(inode.ino);
        Ok(self.entry(&inode))
    }

    /// Create a new inode of `kind` named `name` in `parent`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_node(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        kind: FileKind,
        mode: u32,
        rdev: u32,
        symlink_target: Option<&[u8]>,
    ) -> FsResult<Entry> {
        let name = check_name(name)?;
        self.may_reference(None)?;
        // The new inode is invisible until committed: the parent's lock
        // covers the name and the parent's link count.
        let _held = self.locks.lock(&[parent]);
        let mut dir = self.dir(parent)?;
        check_access(ctx, &dir, MAY_WRITE | MAY_EXEC)?;
        if is_dot_or_dotdot(name) || self.store.lookup(parent, name)?.is_some() {
            return errno!(EEXIST);
        }
        if dir.nlink == 0 {
            // The directory was removed while the guest still held it.
            return errno!(ENOENT);
        }
        let now = Timestamp::now();
        let mut perm = mode & 0o7777;
        let gid = if dir.perm & libc::S_ISGID != 0 {
            if kind == FileKind::Directory {
                perm |= libc::S_ISGID;
            }
            dir.gid
        } else {
            ctx.gid
        };
        if kind != FileKind::Directory
            && perm & libc::S_ISGID != 0
            && ctx.uid != 0
            && gid != ctx.gid
        {
            perm &= !libc::S_ISGID;
        }
        let inode = Inode {
            ino: self.alloc_id()?,
            kind,
            perm,
            uid: ctx.uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            size: symlink_target.map_or(0, |t| t.len() as u64),
            rdev,
            atime: now,
            mtime: now,
            ctime: now,
            parent: if kind == FileKind::Directory {
                parent
            } else {
                0
            },
        };
        let mut txn = Txn::new();
        txn.push(Op::PutInode(inode.clone()));
        if let Some(target) = symlink_target {
            txn.push(Op::SetSymlink {
                ino: inode.ino,
                target: target.to_vec(),
            });
        }
        txn.push(Op::PutDirent {
            parent,
            dirent: Dirent {
                name: name.to_vec(),
                ino: inode.ino,
                kind,
                cookie: self.alloc_id()?,
            },
        });
        if kind == FileKind::Directory {
            dir.nlink += 1;
        }
        dir.mtime = now;
        dir.ctime = now;
        txn.push(Op::PutInode(dir));
        self.commit(txn)?;
        self.remember(inode.ino);
        Ok(self.entry(&inode))
    }

    pub(super) fn do_symlink(
        &self,
        ctx: &Context,
        target: &CStr,
        parent: u64,
        name: &CStr,
    ) -> FsResult<Entry> {
        let target = target.to_bytes();
        if target.is_empty() {
            return errno!(ENOENT);
        }
        if target.len() > SYMLINK_MAX {
            return errno!(ENAMETOOLONG);
        }
        self.create_node(ctx, parent, name, FileKind::Symlink, 0o777, 0, Some(target))
    }

    pub(super) fn do_mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
    ) -> FsResult<Entry> {
        let kind = match FileKind::from_mode(mode) {
            Some(k @ (FileKind::Regular | FileKind::Fifo | FileKind::Socket)) => k,
            Some(k @ (FileKind::CharDevice | FileKind::BlockDevice)) => {
                if !self.cfg.allow_device_nodes || ctx.uid != 0 {
                    return errno!(EPERM);
                }
                k
            }
            // mknod(2) with no type bits makes a regular file.
            None if mode & libc::S_IFMT == 0 => FileKind::Regular,
            _ => return errno!(EINVAL),
        };
        let rdev = if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
            rdev
        } else {
            0
        };
        self.create_node(ctx, parent, name, kind, mode, rdev, None)
    }

    pub(super) fn do_create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: u32,
    ) -> FsResult<(Entry, u64)> {
        let entry = self.create_node(ctx, parent, name, FileKind::Regular, mode, 0, None)?;
        let file = OpenFile {
            ino: entry.inode,
            append: self.append_mode(flags),
        };
        // Not under the handle table's lock: dropping the reference may
        // lock the inode.
        let inserted = lock(&self.handles).insert(file);
        match inserted {
            Ok(h) => Ok((entry, h)),
            Err(e) => {
                // The guest will not learn of the inode: drop its reference.
                self.drop_refs(entry.inode, 1);
                Err(e)
            }
        }
    }

    /// unlink (`dir == false`) or rmdir (`dir == true`).
    pub(super) fn do_remove(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        dir: bool,
    ) -> FsResult<()> {
        let name = check_name(name)?;
        match (name, dir) {
            (b".", true) => return errno!(EINVAL),
            (b"..", true) => return errno!(ENOTEMPTY),
            (b"." | b"..", false) => return errno!(EISDIR),
            _ => {}
        }
        loop {
            let guess = self.guess(parent, name);
            let _held = self.locks.lock(&[parent, guess.unwrap_or(parent)]);
            if let Some(done) = self.remove_locked(ctx, parent, name, dir, guess)? {
                return Ok(done);
            }
        }
    }

    /// The inode `name` names in `dir` now, as a guess of what to lock
    /// (checked again under the lock; errors are reported then).
    pub(super) fn guess(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.store.lookup(dir, name).ok().flatten().map(|d| d.ino)
    }

    /// unlink or rmdir with `parent` and `guess` locked; `None` when the
    /// name no longer names `guess` (the caller locks again).
    fn remove_locked(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        dir: bool,
        guess: Option<u64>,
    ) -> FsResult<Option<()>> {
        let mut pdir = self.dir(parent)?;
        check_access(ctx, &pdir, MAY_WRITE | MAY_EXEC)?;
        let found = self.store.lookup(parent, name)?;
        if found.as_ref().map(|d| d.ino) != guess {
            return Ok(None);
        }
        let dirent = found.ok_or(FsError::Errno(libc::ENOENT))?;
        let mut child = self.inode(dirent.ino)?;
        check_sticky(ctx, &pdir, &child)?;
        let now = Timestamp::now();
        if dir {
            if child.kind != FileKind::Directory {
                return errno!(ENOTDIR);
            }
            if !self.store.readdir(child.ino, 0, 1)?.is_empty() {
                return errno!(ENOTEMPTY);
            }
            child.nlink = 0;
            pdir.nlink = pdir.nlink.saturating_sub(1);
        } else {
            if child.kind == FileKind::Directory {
                return errno!(EISDIR);
            }
            child.nlink = child.nlink.saturating_sub(1);
        }
        child.ctime = now;
        pdir.mtime = now;
        pdir.ctime = now;
        let mut txn = Txn::new();
        txn.push(Op::RemoveDirent {
            parent,
            name: name.to_vec(),
        });
        txn.push(Op::PutInode(pdir));
        if child.nlink == 0 {
            self.unlinked(&child, &mut txn);
        } else {
            txn.push(Op::PutInode(child));
        }
        self.commit(txn).map(Some)
    }

    pub(super) fn do_link(
        &self,
        ctx: &Context,
        ino: u64,
        newparent: u64,
        newname: &CStr,
    ) -> FsResult<Entry> {
        let newname = check_name(newname)?;
        let _held = self.locks.lock(&[ino, newparent]);
        let mut inode = self.inode(ino)?;
        if inode.kind == FileKind::Directory {
            return errno!(EPERM);
        }
        if inode.nlink == 0 {
            return errno!(ENOENT);
        }
        if inode.nlink >= LINK_MAX {
            return errno!(EMLINK);
        }
        self.may_reference(Some(ino))?;
        let mut dir = self.dir(newparent)?;
        check_access(ctx, &dir, MAY_WRITE | MAY_EXEC)?;
        if is_dot_or_dotdot(newname) || self.store.lookup(newparent, newname)?.is_some() {
            return errno!(EEXIST);
        }
        if dir.nlink == 0 {
            // Removed while the guest still held it: a name there would
            // keep the inode alive with no way to reach it.
            return errno!(ENOENT);
        }
        let now = Timestamp::now();
        inode.nlink += 1;
        inode.ctime = now;
        dir.mtime = now;
        dir.ctime = now;
        let mut txn = Txn::new();
        txn.push(Op::PutDirent {
            parent: newparent,
            dirent: Dirent {
                name: newname.to_vec(),
                ino,
                kind: inode.kind,
                cookie: self.alloc_id()?,
            },
        });
        txn.push(Op::PutInode(inode.clone()));
        txn.push(Op::PutInode(dir));
        self.commit(txn)?;
        self.remember(ino);
        Ok(self.entry(&inode))
    }

    pub(super) fn do_opendir(&self, ctx: &Context, ino: u64) -> FsResult<u64> {
        let dir = self.dir(ino)?;
        check_access(ctx, &dir, MAY_READ)?;
        lock(&self.handles).insert(OpenFile { ino, append: false })
    }

    /// List `ino` from `offset` (0, 1 and 2 stand before `.`, `..` and the
    /// first stored entry; larger offsets are entry cookies).
    pub(super) fn do_readdir(
        &self,
        ino: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
        plus: bool,
    ) -> FsResult<()> {
        let dir = self.dir(ino)?;
        let emit = |name: &[u8],
                    target: &Inode,
                    off: u64,
                    add: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>| {
            let d = DirEntry {
                ino: target.ino,
                offset: off,
                type_: target.kind.dirent_type(),
                name,
            };
            add(d, self.entry(target))
        };
        if offset < 1 && emit(b".", &dir, 1, add_entry).map_err(io_errno)? == 0 {
            return Ok(());
        }
        if offset < 2 {
            let parent = if dir.parent == ino {
                dir.clone()
            } else {
                self.inode(dir.parent)?
            };
            if emit(b"..", &parent, 2, add_entry).map_err(io_errno)? == 0 {
                return Ok(());
            }
        }
        // Whether this reply holds an entry yet: past the bound on
        // referenced inodes, a reply that does ends early (the guest asks
        // again from its last offset), one that does not is ENFILE.
        let mut sent = offset < 2;
        let mut after = if offset < FIRST_FREE_ID { 0 } else { offset };
        loop {
            let batch = self.store.readdir(ino, after, READDIR_BATCH)?;
            if batch.is_empty() {
                return Ok(());
            }
            for d in batch {
                // Cookies only grow: a store whose listing does not move
                // on (damaged, or a hostile server) would keep this loop
                // asking for ever.
                if d.cookie <= after {
                    return Err(FsError::Store(StoreError::Corrupt(format!(
                        "directory {ino}: the store listed cookie {} after {after}",
                        d.cookie
                    ))));
                }
                after = d.cookie;
                let added = if plus {
                    // A racing unlink may have removed the inode: skip it.
                    let Some(inode) = self.store.get_inode(d.ino)? else {
                        continue;
                    };
                    if self.may_reference(Some(inode.ino)).is_err() {
                        return if sent { Ok(()) } else { errno!(ENFILE) };
                    }
                    let n = emit(&d.name, &inode, d.cookie, add_entry).map_err(io_errno)?;
                    if n > 0 {
                        self.remember(inode.ino);
                    }
                    n
                } else {
                    let de = DirEntry {
                        ino: d.ino,
                        offset: d.cookie,
                        type_: d.kind.dirent_type(),
                        name: &d.name,
                    };
                    add_entry(de, Entry::default()).map_err(io_errno)?
                };
                if added == 0 {
                    return Ok(());
                }
                sent = true;
            }
        }
    }
}

/// An error from the reply buffer (it cannot be written) becomes EIO.
fn io_errno(e: io::Error) -> FsError {
    FsError::Errno(e.raw_os_error().unwrap_or(libc::EIO))
}
