//! The FUSE operations as fuse-backend-rs dispatches them: each checks
//! nothing itself and hands the request to the filesystem's own method
//! (`namespace.rs`, `data.rs`, `attr.rs`, `xattr.rs`, ...), whose result
//! [`PohmelFs::reply`](super::PohmelFs) turns into the errno reply, the
//! counter and the rate-limited log line.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use tracing::debug;

use super::error::{errno, FsError};
use super::{attr, lock, CachePolicy, PohmelFs};
use crate::store::FileKind;

impl FileSystem for PohmelFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let want = self.offered_options();
        debug!(?capable, ?want, "FUSE init");
        // A new FUSE session: the guest holds no references any more.
        self.reset_session();
        *lock(&self.negotiated) = Some(want & capable);
        Ok(want & capable)
    }

    fn destroy(&self) {
        self.reset_session();
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.reply("lookup", parent, self.do_lookup(_ctx, parent, name))
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        self.drop_refs(inode, count);
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.drop_refs(inode, count);
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _h: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let r = self
            .inode(inode)
            .map(|i| (attr::to_stat(&i), self.cfg.timeout()));
        self.reply("getattr", inode, r)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let r = self
            .writable()
            .and_then(|()| self.do_setattr(ctx, inode, &attr, handle, valid))
            .map(|i| (attr::to_stat(&i), self.cfg.timeout()));
        self.reply("setattr", inode, r)
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let r = self.inode(inode).and_then(|i| {
            if i.kind != FileKind::Symlink {
                return errno!(EINVAL);
            }
            self.store.readlink(inode)?.ok_or(FsError::Errno(libc::EIO))
        });
        self.reply("readlink", inode, r)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let r = self
            .writable()
            .and_then(|()| self.do_symlink(ctx, linkname, parent, name));
        self.reply("symlink", parent, r)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        let r = self
            .writable()
            .and_then(|()| self.do_mknod(ctx, parent, name, mode, rdev));
        self.reply("mknod", parent, r)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        let r = self
            .writable()
            .and_then(|()| self.create_node(ctx, parent, name, FileKind::Directory, mode, 0, None));
        self.reply("mkdir", parent, r)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let r = self
            .writable()
            .and_then(|()| self.do_remove(ctx, parent, name, false));
        self.reply("unlink", parent, r)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let r = self
            .writable()
            .and_then(|()| self.do_remove(ctx, parent, name, true));
        self.reply("rmdir", parent, r)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let r = self
            .writable()
            .and_then(|()| self.do_rename(ctx, olddir, oldname, newdir, newname, flags));
        self.reply("rename", olddir, r)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let r = self
            .writable()
            .and_then(|()| self.do_link(ctx, inode, newparent, newname));
        self.reply("link", inode, r)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let r = self
            .writable_open(flags)
            .and_then(|()| self.do_open(ctx, inode, flags, fuse_flags))
            .map(|h| (Some(h), self.open_options(), None));
        self.reply("open", inode, r)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let r = self
            .writable()
            .and_then(|()| self.do_create(ctx, parent, name, args.mode, args.flags))
            .map(|(e, h)| (e, Some(h), self.open_options(), None));
        self.reply("create", parent, r)
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        self.reply("read", inode, self.do_read(inode, w, size, offset))
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let res = self
            .writable()
            .and_then(|()| self.do_write(ctx, inode, handle, r, size, offset, fuse_flags));
        self.reply("write", inode, res)
    }

    fn flush(&self, _ctx: &Context, inode: u64, _handle: u64, _lock_owner: u64) -> io::Result<()> {
        self.metrics.flush_calls.inc();
        self.reply(
            "flush",
            inode,
            self.store.flush(inode).map_err(FsError::from),
        )
    }

    fn fsync(&self, _ctx: &Context, inode: u64, _datasync: bool, _handle: u64) -> io::Result<()> {
        self.reply(
            "fsync",
            inode,
            self.store.sync(Some(inode)).map_err(FsError::from),
        )
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        _handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let r = self
            .writable()
            .and_then(|()| self.do_fallocate(ctx, inode, mode, offset, length));
        self.reply("fallocate", inode, r)
    }

    fn release(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
        handle: u64,
        flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        lock(&self.handles).remove(handle);
        let r = if flush {
            self.store.flush(inode).map_err(FsError::from)
        } else {
            Ok(())
        };
        self.reply("release", inode, r)
    }

    fn statfs(&self, _ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.reply("statfs", inode, self.do_statfs())
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let r = self
            .writable()
            .and_then(|()| self.do_setxattr(ctx, inode, name, value, flags));
        self.reply("setxattr", inode, r)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.reply("getxattr", inode, self.do_getxattr(ctx, inode, name, size))
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.reply("listxattr", inode, self.do_listxattr(inode, size))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        let r = self
            .writable()
            .and_then(|()| self.do_removexattr(ctx, inode, name));
        self.reply("removexattr", inode, r)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let r = self.do_opendir(ctx, inode).map(|h| {
            let opts = if self.cfg.cache == CachePolicy::Always {
                OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE
            } else {
                OpenOptions::empty()
            };
            (Some(h), opts)
        });
        self.reply("opendir", inode, r)
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let r = self.do_readdir(inode, size, offset, &mut |d, _| add_entry(d), false);
        self.reply("readdir", inode, r)
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let r = self.do_readdir(inode, size, offset, add_entry, true);
        self.reply("readdirplus", inode, r)
    }

    fn fsyncdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _datasync: bool,
        _handle: u64,
    ) -> io::Result<()> {
        self.reply(
            "fsyncdir",
            inode,
            self.store.sync(Some(inode)).map_err(FsError::from),
        )
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        lock(&self.handles).remove(handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let r = self.inode(inode).and_then(|i| {
            if mask == libc::F_OK as u32 {
                Ok(())
            } else {
                attr::check_access(ctx, &i, mask & 7)
            }
        });
        self.reply("access", inode, r)
    }

    fn lseek(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.reply("lseek", inode, self.do_lseek(inode, offset, whence))
    }
}
