//! Binary encoding of the wire messages: little-endian integers, byte
//! strings prefixed by a u32 length, and the store types (inodes, entries,
//! ops). Decoding checks every length against what remains of the payload
//! and against a cap *before* allocating, and never panics.

use super::ProtoError;
use crate::store::{Dirent, FileKind, Inode, Op, StoreStats, Timestamp, Txn, WriteData};

/// Appends encoded values to a buffer.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Enc {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Enc {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Enc {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Enc {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Enc {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Enc {
        self.u8(v.into())
    }
    /// A byte string: u32 length, then the bytes. Callers keep lengths far
    /// below u32::MAX (frames are capped).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Enc {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    /// Write data, encoded as a byte string: its parts are copied into
    /// the frame buffer once each, never joined into a buffer of their own
    /// first.
    pub fn data(&mut self, v: &WriteData) -> &mut Enc {
        self.u32(v.len() as u32);
        self.buf.reserve(v.len());
        for s in v.slices() {
            self.buf.extend_from_slice(s);
        }
        self
    }
    pub fn fixed(&mut self, v: &[u8]) -> &mut Enc {
        self.buf.extend_from_slice(v);
        self
    }
    pub fn opt<T>(&mut self, v: Option<&T>, f: impl FnOnce(&mut Enc, &T)) -> &mut Enc {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                f(self, x);
                self
            }
        }
    }

    pub fn timestamp(&mut self, t: Timestamp) -> &mut Enc {
        self.i64(t.sec).u32(t.nsec)
    }

    pub fn inode(&mut self, i: &Inode) -> &mut Enc {
        self.u64(i.ino)
            .u8(kind_code(i.kind))
            .u32(i.perm)
            .u32(i.uid)
            .u32(i.gid)
            .u32(i.nlink)
            .u64(i.size)
            .u32(i.rdev)
            .timestamp(i.atime)
            .timestamp(i.mtime)
            .timestamp(i.ctime)
            .u64(i.parent)
    }

    pub fn dirent(&mut self, d: &Dirent) -> &mut Enc {
        self.bytes(&d.name)
            .u64(d.ino)
            .u8(kind_code(d.kind))
            .u64(d.cookie)
    }

    pub fn stats(&mut self, s: &StoreStats) -> &mut Enc {
        self.u64(s.capacity_bytes)
            .u64(s.used_bytes)
            .u64(s.capacity_inodes)
            .u64(s.used_inodes)
    }

    pub fn op(&mut self, op: &Op) -> &mut Enc {
        match op {
            Op::PutInode(i) => self.u8(1).inode(i),
            Op::RemoveInode { ino } => self.u8(2).u64(*ino),
            Op::PutDirent { parent, dirent } => self.u8(3).u64(*parent).dirent(dirent),
            Op::RemoveDirent { parent, name } => self.u8(4).u64(*parent).bytes(name),
            Op::Write { ino, offset, data } => self.u8(5).u64(*ino).u64(*offset).data(data),
            Op::Truncate { ino, size } => self.u8(6).u64(*ino).u64(*size),
            Op::PunchHole { ino, offset, len } => self.u8(7).u64(*ino).u64(*offset).u64(*len),
            Op::SetSymlink { ino, target } => self.u8(8).u64(*ino).bytes(target),
            Op::SetXattr { ino, name, value } => self.u8(9).u64(*ino).bytes(name).bytes(value),
            Op::RemoveXattr { ino, name } => self.u8(10).u64(*ino).bytes(name),
        }
    }

    pub fn txn(&mut self, t: &Txn) -> &mut Enc {
        self.u32(t.ops.len() as u32);
        for op in &t.ops {
            self.op(op);
        }
        self
    }
}

/// Reads encoded values from a payload.
pub struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Dec<'a> {
        Dec { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fail unless the whole payload was consumed: trailing bytes mean the
    /// peer and we disagree on the format.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes after message"))
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(ProtoError::Malformed("message truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, ProtoError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Malformed("bad boolean")),
        }
    }
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        self.array()
    }

    /// A byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> Result<Vec<u8>, ProtoError> {
        self.bytes_ref(max).map(<[u8]>::to_vec)
    }

    /// A byte string, borrowed from the payload.
    pub fn bytes_ref(&mut self, max: usize) -> Result<&'a [u8], ProtoError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(ProtoError::Malformed("byte string longer than its limit"));
        }
        self.take(len)
    }

    pub fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Dec<'a>) -> Result<T, ProtoError>,
    ) -> Result<Option<T>, ProtoError> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            _ => Err(ProtoError::Malformed("bad option tag")),
        }
    }

    /// A count of items each at least `min_item` bytes long: refuse counts
    /// the remaining payload cannot hold, before allocating for them.
    pub fn count(&mut self, min_item: usize, max: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n > max || n.saturating_mul(min_item) > self.remaining() {
            return Err(ProtoError::Malformed(
                "item count exceeds the payload or its limit",
            ));
        }
        Ok(n)
    }

    pub fn timestamp(&mut self) -> Result<Timestamp, ProtoError> {
        let sec = self.i64()?;
        let nsec = self.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(ProtoError::Malformed("nanoseconds out of range"));
        }
        Ok(Timestamp { sec, nsec })
    }

    pub fn kind(&mut self) -> Result<FileKind, ProtoError> {
        kind_from_code(self.u8()?).ok_or(ProtoError::Malformed("unknown file kind"))
    }

    pub fn inode(&mut self) -> Result<Inode, ProtoError> {
        Ok(Inode {
            ino: self.u64()?,
            kind: self.kind()?,
            perm: self.u32()?,
            uid: self.u32()?,
            gid: self.u32()?,
            nlink: self.u32()?,
            size: self.u64()?,
            rdev: self.u32()?,
            atime: self.timestamp()?,
            mtime: self.timestamp()?,
            ctime: self.timestamp()?,
            parent: self.u64()?,
        })
    }

    pub fn dirent(&mut self) -> Result<Dirent, ProtoError> {
        Ok(Dirent {
            name: self.bytes(crate::store::NAME_MAX)?,
            ino: self.u64()?,
            kind: self.kind()?,
            cookie: self.u64()?,
        })
    }

    pub fn stats(&mut self) -> Result<StoreStats, ProtoError> {
        Ok(StoreStats {
            capacity_bytes: self.u64()?,
            used_bytes: self.u64()?,
            capacity_inodes: self.u64()?,
            used_inodes: self.u64()?,
        })
    }

    pub fn op(&mut self) -> Result<Op, ProtoError> {
        let tag = self.u8()?;
        self.op_tagged(tag)
    }

    /// The op whose tag byte was `tag` (already read).
    pub fn op_tagged(&mut self, tag: u8) -> Result<Op, ProtoError> {
        use crate::store::{NAME_MAX, SYMLINK_MAX, XATTR_NAME_MAX, XATTR_VALUE_MAX};
        Ok(match tag {
            1 => Op::PutInode(self.inode()?),
            2 => Op::RemoveInode { ino: self.u64()? },
            3 => Op::PutDirent {
                parent: self.u64()?,
                dirent: self.dirent()?,
            },
            4 => Op::RemoveDirent {
                parent: self.u64()?,
                name: self.bytes(NAME_MAX)?,
            },
            5 => Op::Write {
                ino: self.u64()?,
                offset: self.u64()?,
                data: self.bytes(super::MAX_PAYLOAD as usize)?.into(),
            },
            6 => Op::Truncate {
                ino: self.u64()?,
                size: self.u64()?,
            },
            7 => Op::PunchHole {
                ino: self.u64()?,
                offset: self.u64()?,
                len: self.u64()?,
            },
            8 => Op::SetSymlink {
                ino: self.u64()?,
                target: self.bytes(SYMLINK_MAX)?,
            },
            9 => Op::SetXattr {
                ino: self.u64()?,
                name: self.bytes(XATTR_NAME_MAX)?,
                value: self.bytes(XATTR_VALUE_MAX)?,
            },
            10 => Op::RemoveXattr {
                ino: self.u64()?,
                name: self.bytes(XATTR_NAME_MAX)?,
            },
            _ => return Err(ProtoError::Malformed("unknown op")),
        })
    }

    pub fn txn(&mut self) -> Result<Txn, ProtoError> {
        // The smallest op is a tag and one u64.
        let n = self.count(9, super::MAX_OPS)?;
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            ops.push(self.op()?);
        }
        Ok(Txn { ops })
    }
}

fn kind_code(k: FileKind) -> u8 {
    match k {
        FileKind::Regular => 1,
        FileKind::Directory => 2,
        FileKind::Symlink => 3,
        FileKind::Fifo => 4,
        FileKind::Socket => 5,
        FileKind::CharDevice => 6,
        FileKind::BlockDevice => 7,
    }
}

fn kind_from_code(c: u8) -> Option<FileKind> {
    Some(match c {
        1 => FileKind::Regular,
        2 => FileKind::Directory,
        3 => FileKind::Symlink,
        4 => FileKind::Fifo,
        5 => FileKind::Socket,
        6 => FileKind::CharDevice,
        7 => FileKind::BlockDevice,
        _ => return None,
    })
}
