//! File data and attributes: open, read, write, setattr (truncate, chmod,
//! chown, times), fallocate, lseek and statfs.

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, OpenOptions, SetattrValid, FOPEN_IN_KILL_SUIDGID, WRITE_KILL_PRIV,
};
use fuse_backend_rs::api::filesystem::{Context, ZeroCopyReader, ZeroCopyWriter};

use super::attr::{check_access, is_owner, MAY_READ, MAY_WRITE};
use super::error::{errno, FsError, FsResult};
use super::handles::OpenFile;
use super::{lock, CachePolicy, PohmelFs};
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};

use crate::store::{FileKind, Inode, Op, ReadData, ReadPiece, Timestamp, Txn};

/// The largest read or write the daemon serves in one request (the FUSE
/// MAX_PAGES limit: 256 pages of 4 KiB).
pub const MAX_IO_BYTES: usize = 1 << 20;

/// The largest file offset (Linux's MAX_LFS_FILESIZE).
const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// A page of the write-back layer, which counts dirty bytes in pages.
const PAGE: u64 = 4096;

const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

impl PohmelFs {
    pub(super) fn open_options(&self) -> OpenOptions {
        match self.cfg.cache {
            CachePolicy::Never => OpenOptions::DIRECT_IO,
            CachePolicy::Auto => OpenOptions::empty(),
            CachePolicy::Always => OpenOptions::KEEP_CACHE,
        }
    }

    /// Whether writes through a handle opened with `flags` append.
    pub(super) fn append_mode(&self, flags: u32) -> bool {
        // With the writeback cache the guest kernel positions appends itself.
        flags & libc::O_APPEND as u32 != 0 && !self.cfg.writeback_cache
    }

    /// Change owner check used by setattr: may `ctx` give `inode` to
    /// `uid`/`gid`?
    pub(super) fn check_chown(
        ctx: &Context,
        inode: &Inode,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> FsResult<()> {
        if ctx.uid == 0 {
            return Ok(());
        }
        if uid.is_some_and(|u| u != inode.uid) {
            return errno!(EPERM);
        }
        if let Some(g) = gid {
            if !is_owner(ctx, inode) || (g != inode.gid && g != ctx.gid) {
                return errno!(EPERM);
            }
        }
        Ok(())
    }

    /// EROFS on a volume served read-only. Asked first by every request
    /// that would change the volume, and again where changes reach the
    /// store (`commit`, the write below), so that none does, whatever
    /// asked for it (a session's end, an imported session).
    pub(super) fn writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            return errno!(EROFS);
        }
        Ok(())
    }

    /// EROFS for an open that could write (for writing, or `O_TRUNC`) on
    /// a volume served read-only.
    pub(super) fn writable_open(&self, flags: u32) -> FsResult<()> {
        let acc = flags & libc::O_ACCMODE as u32;
        if acc != libc::O_RDONLY as u32 || flags & libc::O_TRUNC as u32 != 0 {
            return self.writable();
        }
        Ok(())
    }

    pub(super) fn do_open(
        &self,
        ctx: &Context,
        ino: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        let acc = flags & libc::O_ACCMODE as u32;
        let writes = acc == libc::O_WRONLY as u32 || acc == libc::O_RDWR as u32;
        let mut mask = 0;
        if acc == libc::O_RDONLY as u32 || acc == libc::O_RDWR as u32 {
            mask |= MAY_READ;
        }
        if writes || flags & libc::O_TRUNC as u32 != 0 {
            mask |= MAY_WRITE;
        }
        if inode.kind == FileKind::Directory && writes {
            return errno!(EISDIR);
        }
        check_access(ctx, &inode, mask)?;
        // O_TRUNC reaches OPEN only in a session that negotiated
        // ATOMIC_O_TRUNC (one taken over from an older daemon,
        // `accepted_options`); the guest kernel then counts on OPEN to have
        // truncated, whatever the access mode.
        if flags & libc::O_TRUNC as u32 != 0 && inode.kind == FileKind::Regular {
            self.truncate(ino, 0, fuse_flags & FOPEN_IN_KILL_SUIDGID != 0)?;
        } else if writes {
            // Every write drops `security.capability` (`drop_capability`):
            // ask now whether there is one, so that the transaction layer
            // remembers the answer and the writes need no store round trip
            // (an open waits for the store anyway; a write must not).
            self.store.get_xattr(ino, CAPABILITY_XATTR)?;
        }
        lock(&self.handles).insert(OpenFile {
            ino,
            append: self.append_mode(flags),
        })
    }

    /// Set the size of a regular file (O_TRUNC); `kill`: the kernel asks
    /// for setuid/setgid to be cleared (FUSE_HANDLE_KILLPRIV_V2).
    fn truncate(&self, ino: u64, size: u64, kill: bool) -> FsResult<()> {
        let _held = self.locks.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        let now = Timestamp::now();
        inode.size = size;
        inode.mtime = now;
        inode.ctime = now;
        if kill {
            kill_suid_sgid(&mut inode);
        }
        self.drop_capability(ino)?;
        let mut txn = Txn::new();
        txn.push(Op::Truncate { ino, size });
        txn.push(Op::PutInode(inode));
        self.commit(txn)
    }

    pub(super) fn do_read(
        &self,
        ino: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
    ) -> FsResult<usize> {
        let inode = self.inode(ino)?;
        match inode.kind {
            FileKind::Regular => {}
            FileKind::Directory => return errno!(EISDIR),
            _ => return errno!(EINVAL),
        }
        if offset >= inode.size {
            return Ok(0);
        }
        // Never allocate more than the request may carry, whatever it asks.
        let len = (size as usize)
            .min(w.available_bytes())
            .min(MAX_IO_BYTES)
            .min((inode.size - offset).try_into().unwrap_or(usize::MAX));
        // The store hands back pieces: cached pages and its own buffers
        // (copied once, into the guest's buffers), zeros, and ranges of
        // segment files, which `preadv` reads straight into the guest's
        // buffers (served by the host page cache when hot).
        let data = self.store.read_data(ino, offset, len)?;
        if data.len() != len {
            return errno!(EIO);
        }
        write_pieces(&data, w)
            .map_err(|e| FsError::Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        self.metrics.bytes_read.add(len as u64);
        Ok(len)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_write(
        &self,
        ctx: &Context,
        ino: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        fuse_flags: u32,
    ) -> FsResult<usize> {
        let len = size as usize;
        // The server bounds the whole message; bound the allocation here too,
        // and refuse a size the message does not actually carry.
        if len > MAX_IO_BYTES {
            return errno!(EINVAL);
        }
        let append = lock(&self.handles)
            .get(handle)
            .is_some_and(|h| h.append && h.ino == ino);
        // A write past the largest file is refused before its bytes are
        // copied (an append's offset is checked under the lock below).
        if !append && offset.saturating_add(len as u64) > MAX_FILE_SIZE {
            return errno!(EFBIG);
        }
        // Copy the guest's bytes once, into buffers that each cover one
        // page of the file: the write-back layer keeps the whole ones as
        // its pages. An append's offset is known only under the lock; the
        // size now is the likely one (a wrong guess costs copies, never
        // correctness).
        let aligned_at = if append {
            self.inode(ino)?.size
        } else {
            offset
        };
        let data = super::guest_bytes::read_write_data(r, len, aligned_at)
            .map_err(|_| FsError::Errno(libc::EINVAL))?;

        // Wait for room in the write-back layer before taking the inode's
        // lock: a write held back by dirty-byte backpressure then blocks
        // nothing but itself.
        if len > 0 {
            let pages = (aligned_at.saturating_add(len as u64 - 1)) / PAGE - aligned_at / PAGE + 1;
            self.store.wait_for_room(pages * PAGE)?;
        }
        let _held = self.locks.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        if inode.kind != FileKind::Regular {
            return errno!(EINVAL);
        }
        let offset = if append { inode.size } else { offset };
        self.drop_capability(ino)?;
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        let now = Timestamp::now();
        inode.size = inode.size.max(end);
        inode.mtime = now;
        inode.ctime = now;
        if (fuse_flags & WRITE_KILL_PRIV != 0 || ctx.uid != 0)
            && inode.perm & (libc::S_ISUID | libc::S_ISGID) != 0
        {
            kill_suid_sgid(&mut inode);
        }
        self.writable()?;
        self.store.write(ino, offset, data, inode)?;
        self.metrics.store_commits.inc();
        self.metrics.bytes_written.add(len as u64);
        Ok(len)
    }

    pub(super) fn do_setattr(
        &self,
        ctx: &Context,
        ino: u64,
        attr: &stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> FsResult<Inode> {
        let _held = self.locks.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        let now = Timestamp::now();
        let mut txn = Txn::new();

        if valid.contains(SetattrValid::MODE) {
            if !is_owner(ctx, &inode) {
                return errno!(EPERM);
            }
            inode.perm = attr.st_mode & 0o7777;
            if ctx.uid != 0 && ctx.gid != inode.gid {
                inode.perm &= !libc::S_ISGID;
            }
        }
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            let uid = valid.contains(SetattrValid::UID).then_some(attr.st_uid);
            let gid = valid.contains(SetattrValid::GID).then_some(attr.st_gid);
            Self::check_chown(ctx, &inode, uid, gid)?;
            let changes =
                uid.is_some_and(|u| u != inode.uid) || gid.is_some_and(|g| g != inode.gid);
            if changes && inode.kind != FileKind::Directory && ctx.uid != 0 {
                kill_suid_sgid(&mut inode);
            }
            if changes {
                self.drop_capability(ino)?;
            }
            inode.uid = uid.unwrap_or(inode.uid);
            inode.gid = gid.unwrap_or(inode.gid);
        }
        if valid.contains(SetattrValid::SIZE) {
            match inode.kind {
                FileKind::Regular => {}
                FileKind::Directory => return errno!(EISDIR),
                _ => return errno!(EINVAL),
            }
            // ftruncate on a handle was checked at open; truncate by path
            // needs write permission now.
            if handle.is_none() {
                check_access(ctx, &inode, MAY_WRITE)?;
            }
            let size = u64::try_from(attr.st_size).map_err(|_| FsError::Errno(libc::EINVAL))?;
            if size > MAX_FILE_SIZE {
                return errno!(EFBIG);
            }
            txn.push(Op::Truncate { ino, size });
            inode.size = size;
            inode.mtime = now;
            if ctx.uid != 0 || valid.contains(SetattrValid::KILL_SUIDGID) {
                kill_suid_sgid(&mut inode);
            }
            self.drop_capability(ino)?;
        }
        let times = [
            (
                SetattrValid::ATIME,
                SetattrValid::ATIME_NOW,
                ts(attr.st_atime, attr.st_atime_nsec),
            ),
            (
                SetattrValid::MTIME,
                SetattrValid::MTIME_NOW,
                ts(attr.st_mtime, attr.st_mtime_nsec),
            ),
        ];
        if valid.intersects(SetattrValid::ATIME | SetattrValid::MTIME) && !is_owner(ctx, &inode) {
            // The VFS's rules (vfs_utimes): setting both times to now (a
            // "touch") needs write access (EACCES); anything else, an
            // explicit time or one time to now with the other left alone,
            // needs ownership (EPERM).
            if !is_touch(attr, valid) {
                return errno!(EPERM);
            }
            check_access(ctx, &inode, MAY_WRITE)?;
        }
        for (i, (set, set_now, value)) in times.into_iter().enumerate() {
            if !valid.contains(set) {
                continue;
            }
            let to_now = valid.contains(set_now);
            let t = if to_now { now } else { value };
            if i == 0 {
                inode.atime = t;
            } else {
                inode.mtime = t;
            }
        }
        inode.ctime = if valid.contains(SetattrValid::CTIME) {
            ts(attr.st_ctime, attr.st_ctime_nsec)
        } else {
            now
        };
        txn.push(Op::PutInode(inode.clone()));
        self.commit(txn)?;
        Ok(inode)
    }

    pub(super) fn do_fallocate(
        &self,
        ctx: &Context,
        ino: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> FsResult<()> {
        if length == 0 {
            return errno!(EINVAL);
        }
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        let _held = self.locks.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        match inode.kind {
            FileKind::Regular => {}
            FileKind::Directory => return errno!(EISDIR),
            _ => return errno!(ENODEV),
        }
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let mut txn = Txn::new();
        match mode & !FALLOC_FL_KEEP_SIZE {
            0 => {}
            FALLOC_FL_PUNCH_HOLE if keep_size => {
                txn.push(Op::PunchHole {
                    ino,
                    offset,
                    len: length.min(inode.size.saturating_sub(offset)),
                });
            }
            FALLOC_FL_ZERO_RANGE => {
                txn.push(Op::PunchHole {
                    ino,
                    offset,
                    len: length.min(inode.size.saturating_sub(offset)),
                });
            }
            _ => return errno!(EOPNOTSUPP),
        }
        let now = Timestamp::now();
        let old_size = inode.size;
        if !keep_size && end > inode.size {
            inode.size = end;
        }
        if !txn.ops.is_empty() || inode.size != old_size {
            inode.mtime = now;
            inode.ctime = now;
        }
        // Like a write (Linux's `file_modified`): the file capability goes,
        // and setuid/setgid unless the caller is root (FUSE sends no
        // kill-priv flag with a fallocate, so root stands for CAP_FSETID,
        // as for a write without the flag).
        self.drop_capability(ino)?;
        if ctx.uid != 0 && inode.perm & (libc::S_ISUID | libc::S_ISGID) != 0 {
            kill_suid_sgid(&mut inode);
            inode.ctime = now;
        }
        txn.push(Op::PutInode(inode));
        self.commit(txn)
    }

    pub(super) fn do_lseek(&self, ino: u64, offset: u64, whence: u32) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        if inode.kind != FileKind::Regular {
            return errno!(EINVAL);
        }
        if offset >= inode.size {
            return errno!(ENXIO);
        }
        match whence as i32 {
            libc::SEEK_DATA => match self.store.next_data(ino, offset)? {
                Some(d) if d < inode.size => Ok(d),
                _ => errno!(ENXIO),
            },
            libc::SEEK_HOLE => Ok(self.store.next_hole(ino, offset)?.min(inode.size)),
            _ => errno!(EINVAL),
        }
    }

    pub(super) fn do_statfs(&self) -> FsResult<statvfs64> {
        const FRSIZE: u64 = 4096;
        let s = self.store.statfs()?;
        // SAFETY: statvfs64 is a plain C struct of integers; all-zero is valid.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = crate::store::BLOCK_SIZE;
        st.f_frsize = FRSIZE;
        st.f_blocks = s.capacity_bytes / FRSIZE;
        st.f_bfree = s.capacity_bytes.saturating_sub(s.used_bytes) / FRSIZE;
        st.f_bavail = st.f_bfree;
        st.f_files = s.capacity_inodes;
        st.f_ffree = s.capacity_inodes.saturating_sub(s.used_inodes);
        st.f_favail = st.f_ffree;
        st.f_namemax = crate::store::NAME_MAX as u64;
        Ok(st)
    }
}

/// True when a setattr sets both times to now, as utimes(NULL) and
/// utimensat(UTIME_NOW, UTIME_NOW) do. With the writeback cache the kernel
/// keeps mtime itself and sends it as an explicit time, together with the
/// ctime it set in the same step: a touch is then an mtime equal to that
/// ctime (an explicit mtime from the caller lands there only by chance).
fn is_touch(attr: &stat64, valid: SetattrValid) -> bool {
    let both_now = SetattrValid::ATIME
        | SetattrValid::ATIME_NOW
        | SetattrValid::MTIME
        | SetattrValid::MTIME_NOW;
    let kernel_mtime =
        SetattrValid::ATIME | SetattrValid::ATIME_NOW | SetattrValid::MTIME | SetattrValid::CTIME;
    valid.contains(both_now)
        || (valid.contains(kernel_mtime)
            && !valid.contains(SetattrValid::MTIME_NOW)
            && (attr.st_mtime, attr.st_mtime_nsec) == (attr.st_ctime, attr.st_ctime_nsec))
}

/// The file capability attribute, which a write, truncate or chown drops
/// (the kernel leaves that to us under FUSE_HANDLE_KILLPRIV_V2, and stops
/// asking for it before every write).
const CAPABILITY_XATTR: &[u8] = b"security.capability";

impl PohmelFs {
    /// Drop `security.capability` if the file has one; the caller holds
    /// the inode's lock. Cheap when absent: the transaction layer
    /// remembers absences.
    fn drop_capability(&self, ino: u64) -> FsResult<()> {
        if self.store.get_xattr(ino, CAPABILITY_XATTR)?.is_some() {
            let mut txn = Txn::new();
            txn.push(Op::RemoveXattr {
                ino,
                name: CAPABILITY_XATTR.to_vec(),
            });
            self.commit(txn)?;
        }
        Ok(())
    }
}

/// Clear setuid, and setgid where it means "setgid" (group-executable).
fn kill_suid_sgid(inode: &mut Inode) {
    inode.perm &= !libc::S_ISUID;
    if inode.perm & 0o010 != 0 {
        inode.perm &= !libc::S_ISGID;
    }
}

fn ts(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: u32::try_from(nsec).unwrap_or(0).min(999_999_999),
    }
}

/// Write every piece of `data` to the guest: file ranges with
/// `write_all_from` (no copy in the daemon), the rest with `write_all`.
pub(crate) fn write_pieces(data: &ReadData, w: &mut dyn ZeroCopyWriter) -> io::Result<()> {
    for piece in data.pieces() {
        match piece {
            ReadPiece::File {
                file, offset, len, ..
            } => {
                // SAFETY: the descriptor stays open while `file` (borrowed
                // for this block) lives, and `ManuallyDrop` never closes
                // it; the borrowed `File` is only read with `preadv` at
                // explicit offsets, so the shared handle's position is
                // untouched.
                let mut borrowed =
                    ManuallyDrop::new(unsafe { File::from_raw_fd(file.as_raw_fd()) });
                w.write_all_from(&mut *borrowed, *len, *offset)?;
            }
            other => other.write_to(w)?,
        }
    }
    Ok(())
}
