//! Rename, with NOREPLACE and EXCHANGE: planning what changes (the
//! source, the directories, a replaced or exchanged target) and the one
//! transaction that says so.

use std::ffi::CStr;

use fuse_backend_rs::api::filesystem::Context;

use super::attr::{check_access, check_name, check_sticky, is_dot_or_dotdot, MAY_EXEC, MAY_WRITE};
use super::error::{errno, FsError, FsResult};
use super::{lock, PohmelFs};
use crate::store::{Dirent, FileKind, Inode, Op, Timestamp, Txn, ROOT_INO};

/// A rename being planned: the source inode and the directories it
/// changes, and the transaction that will say so.
struct Renaming {
    olddir: u64,
    newdir: u64,
    sinode: Inode,
    odir: Inode,
    /// The second directory, when it is not the first one.
    other_dir: Option<Inode>,
    now: Timestamp,
    txn: Txn,
}

impl Renaming {
    /// The directory the source moves to.
    fn new_dir(&self) -> &Inode {
        self.other_dir.as_ref().unwrap_or(&self.odir)
    }

    fn new_dir_mut(&mut self) -> &mut Inode {
        self.other_dir.as_mut().unwrap_or(&mut self.odir)
    }
}

impl PohmelFs {
    /// True if `ancestor` is `dir` or one of its ancestors. A guest may
    /// nest directories as deep as it likes, so the walk has no depth
    /// bound; a corrupt parent chain that loops is found instead (Brent's
    /// cycle detection: a mark moved to the walk's position at each power
    /// of two steps), within twice the loop's length and start.
    fn is_ancestor(&self, ancestor: u64, mut dir: u64) -> FsResult<bool> {
        let (mut mark, mut power, mut steps) = (dir, 1u64, 0u64);
        loop {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.inode(dir)?.parent;
            if dir == mark {
                return Err(FsError::Store(crate::store::StoreError::Corrupt(format!(
                    "directory {dir}: its parent chain loops"
                ))));
            }
            steps += 1;
            if steps == power {
                (mark, power, steps) = (dir, power.saturating_mul(2), 0);
            }
        }
    }

    /// rename(2) with RENAME_NOREPLACE or RENAME_EXCHANGE: validate the
    /// names, flags and source; plan what changes (an exchange, or a move
    /// that may replace the target); commit it in one transaction.
    pub(super) fn do_rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> FsResult<()> {
        let oldname = check_name(oldname)?;
        let newname = check_name(newname)?;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return errno!(EINVAL);
        }
        if is_dot_or_dotdot(oldname) || is_dot_or_dotdot(newname) {
            return errno!(EBUSY);
        }
        loop {
            let guess = (self.guess(olddir, oldname), self.guess(newdir, newname));
            // A directory changing parent: see `locks.rs`.
            let moves_dir = olddir != newdir
                && [guess.0, guess.1].into_iter().flatten().any(|ino| {
                    self.store
                        .get_inode(ino)
                        .ok()
                        .flatten()
                        .is_some_and(|i| i.kind == FileKind::Directory)
                });
            let _rename = moves_dir.then(|| lock(&self.rename_lock));
            let inos = [
                olddir,
                newdir,
                guess.0.unwrap_or(olddir),
                guess.1.unwrap_or(olddir),
            ];
            let _held = self.locks.lock(&inos);
            let names = (oldname, newname);
            if let Some(done) = self.rename_locked(ctx, olddir, newdir, names, flags, guess)? {
                return Ok(done);
            }
        }
    }

    /// rename with the directories, source and target locked (and the
    /// rename lock when a directory changes parent); `None` when a name no
    /// longer names the inode `guess` says (the caller locks again).
    fn rename_locked(
        &self,
        ctx: &Context,
        olddir: u64,
        newdir: u64,
        (oldname, newname): (&[u8], &[u8]),
        flags: u32,
        guess: (Option<u64>, Option<u64>),
    ) -> FsResult<Option<()>> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let odir = self.dir(olddir)?;
        check_access(ctx, &odir, MAY_WRITE | MAY_EXEC)?;
        let other_dir = if newdir == olddir {
            None
        } else {
            let d = self.dir(newdir)?;
            check_access(ctx, &d, MAY_WRITE | MAY_EXEC)?;
            Some(d)
        };
        // A removed directory (still held by the guest) takes no names:
        // they would keep their inodes alive with no way to reach them.
        if other_dir.as_ref().unwrap_or(&odir).nlink == 0 {
            return errno!(ENOENT);
        }
        let src = self.store.lookup(olddir, oldname)?;
        let dst = self.store.lookup(newdir, newname)?;
        if (src.as_ref().map(|d| d.ino), dst.as_ref().map(|d| d.ino)) != guess {
            return Ok(None);
        }
        let src = src.ok_or(FsError::Errno(libc::ENOENT))?;
        let sinode = self.inode(src.ino)?;
        check_sticky(ctx, &odir, &sinode)?;
        if olddir == newdir && oldname == newname {
            return if exchange && dst.is_none() {
                errno!(ENOENT)
            } else {
                Ok(Some(()))
            };
        }
        let mut r = Renaming {
            olddir,
            newdir,
            sinode,
            odir,
            other_dir,
            now: Timestamp::now(),
            txn: Txn::new(),
        };
        if exchange {
            let dst = dst.ok_or(FsError::Errno(libc::ENOENT))?;
            self.plan_exchange(ctx, &mut r, oldname, dst.ino)?;
        } else {
            if let Some(dst) = &dst {
                if noreplace {
                    return errno!(EEXIST);
                }
                if dst.ino == r.sinode.ino {
                    // Two names of one inode: POSIX says do nothing.
                    return Ok(Some(()));
                }
                self.plan_replace(ctx, &mut r, dst.ino)?;
            }
            self.plan_move(ctx, &mut r)?;
            r.txn.push(Op::RemoveDirent {
                parent: olddir,
                name: oldname.to_vec(),
            });
        }
        self.commit_rename(r, newname).map(Some)
    }

    /// RENAME_EXCHANGE: the target takes the source's old name; a
    /// directory that changes parent gets a new `..` and moves a link
    /// count with it.
    fn plan_exchange(
        &self,
        ctx: &Context,
        r: &mut Renaming,
        oldname: &[u8],
        dst_ino: u64,
    ) -> FsResult<()> {
        let mut dinode = self.inode(dst_ino)?;
        check_sticky(ctx, r.new_dir(), &dinode)?;
        let sdir = r.sinode.kind == FileKind::Directory;
        let ddir = dinode.kind == FileKind::Directory;
        if let Some(ndir) = r.other_dir.as_mut() {
            if (sdir && self.is_ancestor(r.sinode.ino, r.newdir)?)
                || (ddir && self.is_ancestor(dinode.ino, r.olddir)?)
            {
                return errno!(EINVAL);
            }
            if sdir {
                r.sinode.parent = r.newdir;
                r.odir.nlink = r.odir.nlink.saturating_sub(1);
                ndir.nlink = ndir.nlink.saturating_add(1);
            }
            if ddir {
                dinode.parent = r.olddir;
                ndir.nlink = ndir.nlink.saturating_sub(1);
                r.odir.nlink = r.odir.nlink.saturating_add(1);
            }
        }
        r.txn.push(Op::PutDirent {
            parent: r.olddir,
            dirent: Dirent {
                name: oldname.to_vec(),
                ino: dinode.ino,
                kind: dinode.kind,
                cookie: self.alloc_id()?,
            },
        });
        dinode.ctime = r.now;
        r.txn.push(Op::PutInode(dinode));
        Ok(())
    }

    /// The source replaces the target inode `dst_ino`, which loses that
    /// name (a directory, which must be empty, its only one) and is
    /// unlinked when it was its last.
    fn plan_replace(&self, ctx: &Context, r: &mut Renaming, dst_ino: u64) -> FsResult<()> {
        let mut dinode = self.inode(dst_ino)?;
        check_sticky(ctx, r.new_dir(), &dinode)?;
        let sdir = r.sinode.kind == FileKind::Directory;
        match (sdir, dinode.kind == FileKind::Directory) {
            (true, false) => return errno!(ENOTDIR),
            (false, true) => return errno!(EISDIR),
            (true, true) => {
                if !self.store.readdir(dinode.ino, 0, 1)?.is_empty() {
                    return errno!(ENOTEMPTY);
                }
                dinode.nlink = 0;
                let new_dir = r.new_dir_mut();
                new_dir.nlink = new_dir.nlink.saturating_sub(1);
            }
            (false, false) => dinode.nlink = dinode.nlink.saturating_sub(1),
        }
        dinode.ctime = r.now;
        if dinode.nlink == 0 {
            self.unlinked(&dinode, &mut r.txn);
        } else {
            r.txn.push(Op::PutInode(dinode));
        }
        Ok(())
    }

    /// A directory moving to another parent: not below itself, and the
    /// caller may write its `..`; the link count moves with it.
    fn plan_move(&self, ctx: &Context, r: &mut Renaming) -> FsResult<()> {
        let Some(ndir) = r.other_dir.as_mut() else {
            return Ok(());
        };
        if r.sinode.kind != FileKind::Directory {
            return Ok(());
        }
        if self.is_ancestor(r.sinode.ino, r.newdir)? {
            return errno!(EINVAL);
        }
        // Moving a directory rewrites its `..`: the caller must be
        // allowed to write it.
        check_access(ctx, &r.sinode, MAY_WRITE)?;
        r.sinode.parent = r.newdir;
        r.odir.nlink = r.odir.nlink.saturating_sub(1);
        ndir.nlink = ndir.nlink.saturating_add(1);
        Ok(())
    }

    /// The source's new entry and every inode the rename changed, in one
    /// transaction.
    fn commit_rename(&self, mut r: Renaming, newname: &[u8]) -> FsResult<()> {
        r.txn.push(Op::PutDirent {
            parent: r.newdir,
            dirent: Dirent {
                name: newname.to_vec(),
                ino: r.sinode.ino,
                kind: r.sinode.kind,
                cookie: self.alloc_id()?,
            },
        });
        r.sinode.ctime = r.now;
        r.txn.push(Op::PutInode(r.sinode));
        for dir in std::iter::once(&mut r.odir).chain(r.other_dir.as_mut()) {
            dir.mtime = r.now;
            dir.ctime = r.now;
        }
        r.txn.push(Op::PutInode(r.odir));
        if let Some(ndir) = r.other_dir {
            r.txn.push(Op::PutInode(ndir));
        }
        self.commit(r.txn)
    }
}
