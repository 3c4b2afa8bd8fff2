//! `pohmelfs copy`: a whole volume from one store to another (the embedded
//! store to S3, S3 to a store server, ...), through the [`Store`] interface
//! of each, so any two kinds of store work.
//!
//! The copy walks the source's namespace from the root and writes every
//! inode it reaches under the same inode number, with its attributes,
//! symlink target, extended attributes, directory entries (with their
//! cookies, so readdir positions stay valid) and data (holes stay holes),
//! in transactions of at most [`TXN_DATA_BYTES`] of data and
//! [`TXN_OPS`] operations. Every operation is blind (it says what the
//! destination must hold, not what it held), so doing it again gives the
//! same volume: a copy interrupted anywhere is finished by running it
//! again. The destination's root carries the extended attribute
//! [`COPYING_XATTR`] (naming the source) from the start of a copy until
//! its end, which is how a rerun tells an unfinished copy of the same
//! source from a volume that holds other files (refused); a rerun after a
//! copy finished finds the destination equal to the source and writes
//! nothing. Unlinked inodes
//! that are still open on the source are not reachable and not copied.
//!
//! [`verify`] walks the source again and compares everything with the
//! destination, data byte for byte.

use std::collections::HashSet;

use thiserror::Error;

use super::{Dirent, FileKind, Inode, Op, Store, StoreError, Txn, WriteData, ROOT_INO};

/// Data bytes per transaction at most (well under the wire protocol's
/// 8.25 MiB frame).
pub const TXN_DATA_BYTES: usize = 4 << 20;
/// Operations per transaction at most.
pub const TXN_OPS: usize = 1024;
/// Bytes read from the source at once.
const CHUNK: usize = 1 << 20;
/// Directory entries read at once.
const READDIR_PAGE: usize = 1024;
/// On the destination's root while a copy runs: the source it copies.
pub const COPYING_XATTR: &[u8] = b"trusted.pohmelfs.copying";

/// Why a copy or its verification failed.
#[derive(Debug, Error)]
pub enum CopyError {
    #[error("read the source")]
    Source(#[source] StoreError),
    #[error("write the destination")]
    Destination(#[source] StoreError),
    #[error(
        "the destination holds files and is not an unfinished copy of this source \
         ({0}); copy into a new or empty volume"
    )]
    NotEmpty(String),
    #[error("the source has an entry for inode {0}, which does not exist")]
    Dangling(u64),
    #[error("the copy differs from the source: {0}")]
    Differs(String),
}

/// How far a copy or verification got: inodes and data bytes done, and
/// the source's totals (what its statfs says is in use).
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub inodes: u64,
    pub bytes: u64,
    pub total_inodes: u64,
    pub total_bytes: u64,
}

/// What [`copy`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Copied {
    pub inodes: u64,
    pub bytes: u64,
    pub txns: u64,
    /// The destination was an unfinished copy of the same source.
    pub resumed: bool,
    /// The destination was a finished copy of the source already (it
    /// verified equal): nothing was written.
    pub already: bool,
}

fn src<T>(r: Result<T, StoreError>) -> Result<T, CopyError> {
    r.map_err(CopyError::Source)
}

fn dst<T>(r: Result<T, StoreError>) -> Result<T, CopyError> {
    r.map_err(CopyError::Destination)
}

/// Transactions being filled for the destination.
pub(super) struct Batch<'a> {
    dst: &'a dyn Store,
    txn: Txn,
    data: usize,
    pub(super) txns: u64,
}

impl<'a> Batch<'a> {
    pub(super) fn new(dst: &'a dyn Store) -> Batch<'a> {
        Batch {
            dst,
            txn: Txn::new(),
            data: 0,
            txns: 0,
        }
    }

    pub(super) fn push(&mut self, op: Op) -> Result<(), CopyError> {
        if let Op::Write { data, .. } = &op {
            self.data += data.len();
        }
        self.txn.push(op);
        if self.data >= TXN_DATA_BYTES || self.txn.ops.len() >= TXN_OPS {
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), CopyError> {
        if self.txn.ops.is_empty() {
            return Ok(());
        }
        dst(self.dst.commit(std::mem::take(&mut self.txn)))?;
        self.data = 0;
        self.txns += 1;
        Ok(())
    }
}

/// Every entry of directory `dir`, page by page.
fn for_each_entry(
    store: &dyn Store,
    dir: u64,
    mut each: impl FnMut(Dirent) -> Result<(), CopyError>,
    wrap: fn(StoreError) -> CopyError,
) -> Result<(), CopyError> {
    let mut after = 0;
    loop {
        let page = store.readdir(dir, after, READDIR_PAGE).map_err(wrap)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.cookie;
        let full = page.len() == READDIR_PAGE;
        for d in page {
            each(d)?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// The source's namespace from the root, each inode once (hard links),
/// children after their directory.
fn walk(
    store: &dyn Store,
    mut visit: impl FnMut(&Inode) -> Result<(), CopyError>,
) -> Result<(), CopyError> {
    let mut seen = HashSet::from([ROOT_INO]);
    let mut todo = vec![ROOT_INO];
    while let Some(ino) = todo.pop() {
        let inode = src(store.get_inode(ino))?.ok_or(CopyError::Dangling(ino))?;
        visit(&inode)?;
        if inode.kind == FileKind::Directory {
            for_each_entry(
                store,
                ino,
                |d| {
                    if seen.insert(d.ino) {
                        todo.push(d.ino);
                    }
                    Ok(())
                },
                CopyError::Source,
            )?;
        }
    }
    Ok(())
}

/// A name for the source in the destination's marker.
fn marker(source: &dyn Store) -> Vec<u8> {
    let id = source.identity().map(|i| i.id_hex());
    id.unwrap_or_else(|| source.describe()).into_bytes()
}

/// Copy the volume `source` into `dest` (a new or empty volume, or an
/// unfinished copy of the same source), calling `progress` after each
/// inode. Does not verify: see [`verify`].
pub fn copy(
    source: &dyn Store,
    dest: &dyn Store,
    progress: &mut dyn FnMut(Progress),
) -> Result<Copied, CopyError> {
    let mark = marker(source);
    let resumed = match dst(dest.get_xattr(ROOT_INO, COPYING_XATTR))? {
        Some(m) if m == mark => true,
        Some(m) => return Err(CopyError::NotEmpty(String::from_utf8_lossy(&m).into())),
        // A finished copy of this source (a rerun after success) is
        // left as it is; anything else with files is refused.
        None if !dst(dest.readdir(ROOT_INO, 0, 1))?.is_empty() => {
            return match verify(source, dest, progress) {
                Ok(p) => Ok(Copied {
                    inodes: p.inodes,
                    bytes: p.bytes,
                    already: true,
                    ..Copied::default()
                }),
                Err(CopyError::Differs(_)) => {
                    Err(CopyError::NotEmpty("no copy was started here".into()))
                }
                Err(e) => Err(e),
            };
        }
        None => false,
    };
    let stats = src(source.statfs())?;
    let mut p = Progress {
        total_inodes: stats.used_inodes,
        total_bytes: stats.used_bytes,
        ..Progress::default()
    };
    let mut batch = Batch::new(dest);
    batch.push(Op::SetXattr {
        ino: ROOT_INO,
        name: COPYING_XATTR.to_vec(),
        value: mark,
    })?;
    batch.flush()?;
    let mut max_id = ROOT_INO;
    walk(source, |inode| {
        max_id = max_id.max(inode.ino);
        p.bytes += copy_inode(source, &mut batch, inode, &mut max_id)?;
        p.inodes += 1;
        progress(p);
        Ok(())
    })?;
    batch.push(Op::RemoveXattr {
        ino: ROOT_INO,
        name: COPYING_XATTR.to_vec(),
    })?;
    batch.flush()?;
    // Inodes and cookies the destination gives out later must be new.
    let next = dst(dest.reserve_ids(1))?;
    if next <= max_id {
        dst(dest.reserve_ids(max_id - next + 1))?;
    }
    dst(dest.sync(None))?;
    Ok(Copied {
        inodes: p.inodes,
        bytes: p.bytes,
        txns: batch.txns,
        resumed,
        already: false,
    })
}

/// One inode's attributes, symlink target, extended attributes, entries
/// and data; the data bytes it copied.
fn copy_inode(
    source: &dyn Store,
    batch: &mut Batch<'_>,
    inode: &Inode,
    max_id: &mut u64,
) -> Result<u64, CopyError> {
    let ino = inode.ino;
    batch.push(Op::PutInode(inode.clone()))?;
    if inode.kind == FileKind::Symlink {
        if let Some(target) = src(source.readlink(ino))? {
            batch.push(Op::SetSymlink { ino, target })?;
        }
    }
    for name in src(source.list_xattr(ino))? {
        if let Some(value) = src(source.get_xattr(ino, &name))? {
            batch.push(Op::SetXattr { ino, name, value })?;
        }
    }
    if inode.kind == FileKind::Directory {
        for_each_entry(
            source,
            ino,
            |dirent| {
                *max_id = (*max_id).max(dirent.cookie);
                batch.push(Op::PutDirent {
                    parent: ino,
                    dirent,
                })
            },
            CopyError::Source,
        )?;
    }
    if inode.kind != FileKind::Regular {
        return Ok(0);
    }
    // What an interrupted copy wrote beyond the size goes; holes stay.
    batch.push(Op::Truncate {
        ino,
        size: inode.size,
    })?;
    let mut copied = 0;
    let mut at = 0;
    while at < inode.size {
        let Some(start) = src(source.next_data(ino, at))?.filter(|&s| s < inode.size) else {
            break;
        };
        let end = src(source.next_hole(ino, start))?.min(inode.size);
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; len];
            src(source.read(ino, pos, &mut buf))?;
            batch.push(Op::Write {
                ino,
                offset: pos,
                data: WriteData::from(buf),
            })?;
            pos += len as u64;
            copied += len as u64;
        }
        at = end.max(start + 1);
    }
    Ok(copied)
}

/// Compare `dest` with `source` whole: every reachable inode's
/// attributes, symlink target, extended attributes, entries and bytes.
pub fn verify(
    source: &dyn Store,
    dest: &dyn Store,
    progress: &mut dyn FnMut(Progress),
) -> Result<Progress, CopyError> {
    let stats = src(source.statfs())?;
    let mut p = Progress {
        total_inodes: stats.used_inodes,
        total_bytes: stats.used_bytes,
        ..Progress::default()
    };
    walk(source, |inode| {
        p.bytes = p.bytes.saturating_add(verify_inode(source, dest, inode)?);
        p.inodes += 1;
        progress(p);
        Ok(())
    })?;
    Ok(p)
}

fn verify_inode(source: &dyn Store, dest: &dyn Store, inode: &Inode) -> Result<u64, CopyError> {
    let ino = inode.ino;
    let differs = |what: &str| CopyError::Differs(format!("inode {ino}: {what}"));
    let copied = dst(dest.get_inode(ino))?.ok_or_else(|| differs("missing"))?;
    if copied != *inode {
        return Err(differs(&format!("attributes {copied:?}, source {inode:?}")));
    }
    if src(source.readlink(ino))? != dst(dest.readlink(ino))? {
        return Err(differs("symlink target"));
    }
    let mut names = src(source.list_xattr(ino))?;
    let mut copied_names = dst(dest.list_xattr(ino))?;
    if ino == ROOT_INO {
        copied_names.retain(|n| n != COPYING_XATTR);
    }
    names.sort();
    copied_names.sort();
    if names != copied_names {
        return Err(differs("extended attribute names"));
    }
    for name in &names {
        if src(source.get_xattr(ino, name))? != dst(dest.get_xattr(ino, name))? {
            return Err(differs(&format!(
                "extended attribute {}",
                String::from_utf8_lossy(name)
            )));
        }
    }
    if inode.kind == FileKind::Directory {
        let mut a = Vec::new();
        for_each_entry(
            source,
            ino,
            |d| {
                a.push(d);
                Ok(())
            },
            CopyError::Source,
        )?;
        let mut b = Vec::new();
        for_each_entry(
            dest,
            ino,
            |d| {
                b.push(d);
                Ok(())
            },
            CopyError::Destination,
        )?;
        if a != b {
            return Err(differs("directory entries"));
        }
    }
    if inode.kind != FileKind::Regular {
        return Ok(0);
    }
    // Only where either side has data: a hole on both reads as zeros on
    // both, and a guest may make a file of 2^63 bytes that are nearly all
    // hole (read whole, its verification would never end).
    let size = inode.size;
    let mut compared = 0u64;
    let mut at = 0;
    while at < size {
        let data = |s: &dyn Store| s.next_data(ino, at).map(|d| d.filter(|&d| d < size));
        let start = match (src(data(source))?, dst(data(dest))?) {
            (None, None) => break,
            (a, b) => a.into_iter().chain(b).min().unwrap_or(size),
        };
        // To the end of the data run of whichever side has data here (a
        // side in a hole reports the hole at `start` itself).
        let end = src(source.next_hole(ino, start))?
            .max(dst(dest.next_hole(ino, start))?)
            .min(size)
            .max(start + 1);
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(CHUNK as u64) as usize;
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            src(source.read(ino, pos, &mut a))?;
            dst(dest.read(ino, pos, &mut b))?;
            if a != b {
                return Err(differs(&format!("data in {pos}..{}", pos + len as u64)));
            }
            pos += len as u64;
            compared += len as u64;
        }
        at = end;
    }
    Ok(compared)
}

#[cfg(test)]
#[path = "copy_tests.rs"]
mod tests;
