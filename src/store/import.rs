//! `pohmelfs import DIR URL`: a host directory tree into a volume no daemon
//! has served yet (a golden root filesystem, say), through the [`Store`]
//! interface, so any kind of store works.
//!
//! Everything a root filesystem needs survives: file kinds (regular,
//! directory, symlink, fifo, socket, character and block devices with
//! their device numbers), permission bits with setuid, setgid and sticky,
//! owners, the three times, extended attributes (file capabilities are
//! `security.capability`), hard links within the tree (one inode, its link
//! count counted in the tree), and holes (a chunk of zeros is not
//! written). New inode numbers and entry cookies come from the volume.
//! The tree is walked without following symlinks, and not across mount
//! points below `DIR`.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::copy::{Batch, CopyError};
use super::{Dirent, FileKind, Inode, Op, Store, StoreError, Timestamp, WriteData, ROOT_INO};

/// Bytes read from a host file at once.
const CHUNK: usize = 1 << 20;
/// Ids reserved from the volume at once (inodes and cookies).
const ID_BATCH: u64 = 4096;
/// An extended attribute's value at most (Linux's XATTR_SIZE_MAX).
const XATTR_VALUE_MAX: usize = 64 << 10;

/// Why an import failed.
#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{1}: {0}")]
    Host(#[source] std::io::Error, PathBuf),
    #[error(transparent)]
    Store(#[from] CopyError),
    #[error("the volume has been served already (its root exists): import into a new volume")]
    NotNew,
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
}

/// How far an import got, and the tree's totals (counted first).
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub entries: u64,
    pub bytes: u64,
    pub total_entries: u64,
    pub total_bytes: u64,
}

/// An import's progress in the shape of a copy's, entries for inodes, so
/// that one display serves both commands.
impl From<Progress> for super::copy::Progress {
    fn from(p: Progress) -> super::copy::Progress {
        super::copy::Progress {
            inodes: p.entries,
            bytes: p.bytes,
            total_inodes: p.total_entries,
            total_bytes: p.total_bytes,
        }
    }
}

fn host(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |e| ImportError::Host(e, path.to_owned())
}

fn store<T>(r: Result<T, StoreError>) -> Result<T, ImportError> {
    r.map_err(|e| ImportError::Store(CopyError::Destination(e)))
}

/// A device number as FUSE carries it (Linux's `new_encode_dev`).
pub fn fuse_rdev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn kind_of(t: std::fs::FileType) -> FileKind {
    if t.is_dir() {
        FileKind::Directory
    } else if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_fifo() {
        FileKind::Fifo
    } else if t.is_socket() {
        FileKind::Socket
    } else if t.is_char_device() {
        FileKind::CharDevice
    } else if t.is_block_device() {
        FileKind::BlockDevice
    } else {
        FileKind::Regular
    }
}

fn inode_of(ino: u64, m: &std::fs::Metadata, parent: u64) -> Inode {
    let kind = kind_of(m.file_type());
    let time = |sec: i64, nsec: i64| Timestamp {
        sec,
        nsec: u32::try_from(nsec).unwrap_or(0),
    };
    Inode {
        ino,
        kind,
        perm: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        nlink: if kind == FileKind::Directory { 2 } else { 1 },
        size: match kind {
            FileKind::Regular | FileKind::Symlink => m.len(),
            _ => 0,
        },
        rdev: match kind {
            FileKind::CharDevice | FileKind::BlockDevice => fuse_rdev(m.rdev()),
            _ => 0,
        },
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        parent: if kind == FileKind::Directory {
            parent
        } else {
            0
        },
    }
}

/// The extended attributes of `path` itself (not a symlink's target).
fn xattrs(path: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: `c` is a NUL-terminated path; `names` is valid for writes of
    // its length, which is passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        // A filesystem without xattrs has none to copy.
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        let mut value = vec![0u8; XATTR_VALUE_MAX];
        // SAFETY: both strings are NUL-terminated; `value` is valid for
        // writes of its length, which is passed.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            return Err(std::io::Error::last_os_error());
        }
        value.truncate(len as usize);
        out.push((name.to_vec(), value));
    }
    Ok(out)
}

/// Entries and data bytes of the tree (the progress's totals).
fn count(dir: &Path, dev: u64) -> Result<(u64, u64), ImportError> {
    let (mut entries, mut bytes) = (0, 0);
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).map_err(host(&d))? {
            let e = e.map_err(host(&d))?;
            let m = e.metadata().map_err(host(&e.path()))?;
            entries += 1;
            if m.is_dir() && m.dev() == dev {
                todo.push(e.path());
            } else if m.is_file() {
                bytes += m.len();
            }
        }
    }
    Ok((entries, bytes))
}

/// What [`import`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Imported {
    pub entries: u64,
    pub bytes: u64,
    pub txns: u64,
}

struct Importer<'a> {
    dest: &'a dyn Store,
    batch: Batch<'a>,
    ids: std::ops::Range<u64>,
    /// Hard-linked files by host (dev, ino): their inode and links so far.
    links: HashMap<(u64, u64), Inode>,
    p: Progress,
    progress: &'a mut dyn FnMut(Progress),
    shown: std::time::Instant,
}

impl Importer<'_> {
    /// Progress, at most five times a second.
    fn tick(&mut self) {
        if self.shown.elapsed() >= std::time::Duration::from_millis(200) {
            self.shown = std::time::Instant::now();
            (self.progress)(self.p);
        }
    }

    fn id(&mut self) -> Result<u64, ImportError> {
        if self.ids.is_empty() {
            let first = store(self.dest.reserve_ids(ID_BATCH))?;
            self.ids = first..first + ID_BATCH;
        }
        let id = self.ids.start;
        self.ids.start += 1;
        Ok(id)
    }

    fn attrs(&mut self, ino: u64, path: &Path) -> Result<(), ImportError> {
        for (name, value) in xattrs(path).map_err(host(path))? {
            self.batch.push(Op::SetXattr { ino, name, value })?;
        }
        Ok(())
    }

    fn data(&mut self, ino: u64, path: &Path) -> Result<(), ImportError> {
        let mut f = std::fs::File::open(path).map_err(host(path))?;
        let mut offset = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match f.read(&mut buf[filled..]).map_err(host(path))? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                return Ok(());
            }
            buf.truncate(filled);
            self.p.bytes += filled as u64;
            // A chunk of zeros stays a hole.
            if buf.iter().any(|&b| b != 0) {
                self.batch.push(Op::Write {
                    ino,
                    offset,
                    data: WriteData::from(buf),
                })?;
            }
            offset += filled as u64;
        }
    }

    /// Directory `dir` (inode `ino`, whose attributes `m`) and below.
    fn tree(&mut self, root: &Path, root_meta: &std::fs::Metadata) -> Result<(), ImportError> {
        let dev = root_meta.dev();
        let mut todo = vec![(root.to_owned(), ROOT_INO, ROOT_INO, root_meta.clone())];
        while let Some((dir, ino, parent, meta)) = todo.pop() {
            let mut subdirs = 0u32;
            let mut entries: Vec<_> = std::fs::read_dir(&dir)
                .map_err(host(&dir))?
                .collect::<Result<_, _>>()
                .map_err(host(&dir))?;
            entries.sort_by_key(std::fs::DirEntry::file_name);
            for e in entries {
                let path = e.path();
                let m = std::fs::symlink_metadata(&path).map_err(host(&path))?;
                let kind = kind_of(m.file_type());
                let known = (kind != FileKind::Directory && m.nlink() > 1)
                    .then(|| self.links.get_mut(&(m.dev(), m.ino())))
                    .flatten();
                let child = match known {
                    Some(linked) => {
                        linked.nlink += 1;
                        linked.ino
                    }
                    None => {
                        let child = self.id()?;
                        self.new_inode(child, ino, &path, &m, dev, &mut todo)?;
                        child
                    }
                };
                if kind == FileKind::Directory {
                    subdirs += 1;
                }
                let cookie = self.id()?;
                self.batch.push(Op::PutDirent {
                    parent: ino,
                    dirent: Dirent {
                        name: e.file_name().as_bytes().to_vec(),
                        ino: child,
                        kind,
                        cookie,
                    },
                })?;
                self.p.entries += 1;
                self.tick();
            }
            let mut inode = inode_of(ino, &meta, parent);
            inode.nlink = 2 + subdirs;
            self.batch.push(Op::PutInode(inode))?;
            self.attrs(ino, &dir)?;
        }
        Ok(())
    }

    fn new_inode(
        &mut self,
        child: u64,
        parent: u64,
        path: &Path,
        m: &std::fs::Metadata,
        dev: u64,
        todo: &mut Vec<(PathBuf, u64, u64, std::fs::Metadata)>,
    ) -> Result<(), ImportError> {
        let inode = inode_of(child, m, parent);
        match inode.kind {
            // Its inode goes in once its entries are counted; a mount point
            // below the tree is imported as an empty directory.
            FileKind::Directory if m.dev() == dev => {
                todo.push((path.to_owned(), child, parent, m.clone()));
                return Ok(());
            }
            FileKind::Directory => {}
            FileKind::Symlink => {
                let target = std::fs::read_link(path).map_err(host(path))?;
                self.batch.push(Op::SetSymlink {
                    ino: child,
                    target: target.as_os_str().as_bytes().to_vec(),
                })?;
            }
            FileKind::Regular => self.data(child, path)?,
            _ => {}
        }
        self.attrs(child, path)?;
        if m.nlink() > 1 {
            self.links.insert((m.dev(), m.ino()), inode.clone());
        }
        self.batch.push(Op::PutInode(inode))?;
        Ok(())
    }
}

/// Import the tree at `dir` into `dest`, a volume no daemon has served
/// (no root inode yet), calling `progress` now and then and at the end.
pub fn import<'a>(
    dir: &Path,
    dest: &'a dyn Store,
    progress: &'a mut dyn FnMut(Progress),
) -> Result<Imported, ImportError> {
    let meta = std::fs::symlink_metadata(dir).map_err(host(dir))?;
    if !meta.is_dir() {
        return Err(ImportError::NotADirectory(dir.to_owned()));
    }
    if store(dest.get_inode(ROOT_INO))?.is_some() {
        return Err(ImportError::NotNew);
    }
    let (total_entries, total_bytes) = count(dir, meta.dev())?;
    let mut im = Importer {
        dest,
        batch: Batch::new(dest),
        ids: 0..0,
        links: HashMap::new(),
        p: Progress {
            total_entries,
            total_bytes,
            ..Progress::default()
        },
        progress,
        shown: std::time::Instant::now(),
    };
    im.tree(dir, &meta)?;
    // Hard links: each file's count of names in the tree.
    let linked: Vec<Inode> = im.links.drain().map(|(_, i)| i).collect();
    for inode in linked {
        im.batch.push(Op::PutInode(inode))?;
    }
    im.batch.flush()?;
    store(dest.sync(None))?;
    (im.progress)(im.p);
    Ok(Imported {
        entries: im.p.entries,
        bytes: im.p.bytes,
        txns: im.batch.txns,
    })
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
