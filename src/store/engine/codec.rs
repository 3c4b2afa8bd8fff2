//! The value encodings of a volume's records: small hand-written binary
//! formats, each starting with a version byte so a record can change shape
//! without rewriting the volume. Numbers are little-endian and fixed-width.
//!
//! This module owns only bytes: it never touches the engine, and decoding
//! never panics — every length is checked before it is used and anything
//! unexpected is a [`StoreError::Corrupt`] naming the record.

use crate::store::{Dirent, FileKind, Inode, StoreError, Timestamp};

/// The version byte every value written by this code starts with.
const V1: u8 = 1;

/// The bytes a superblock value starts with after its version byte, so a
/// store that is not a pohmelfs volume is recognised as such.
pub const MAGIC: &[u8; 8] = b"POHMELFS";

/// The layout version of volumes this code writes and reads. A volume with
/// another version is refused at open, never reformatted, except the
/// versions of [`UPGRADES_FROM`].
///
/// Version 4 marks the layouts older builds must not open: an `s3://`
/// volume's file data in data objects (`data/<id>.obj`) and its snapshots
/// and clones (`lineage`, `holders/`, `CLONED`), and a `file://` volume's
/// segment files shared by hard link with its snapshots and clones (a
/// build before snapshots punches pages in a shared file). Version 3 added
/// the commit log (`log/commit.log`, key `0x03`) and the orphan marks
/// (`0x12`). Version 2 moved file data out of the engine: a chunk record
/// is a list of extents (`extent.rs`) and `file://` volumes keep the bytes
/// in segment files. Version 1 stored each 64 KiB block as one value.
pub const FORMAT_VERSION: u32 = 4;

/// The older versions an open upgrades in place, by rewriting only the
/// superblock's number. A version-2 volume has neither a commit log nor
/// orphan marks, which is what a version-3 volume with an empty log and no
/// orphans looks like; a version-3 volume is a version-4 volume without
/// data objects, snapshots or clones (or one a version-3 build of this
/// code wrote with them: the records are the same). A build of an older
/// version then refuses the volume instead of misreading what it cannot
/// know.
pub const UPGRADES_FROM: &[u32] = &[2, 3];

/// Whether this build reads a volume of format `version`, as it is
/// ([`FORMAT_VERSION`]) or after upgrading it ([`UPGRADES_FROM`]).
pub fn reads_format(version: u32) -> bool {
    version == FORMAT_VERSION || UPGRADES_FROM.contains(&version)
}

/// A reader over one value that turns every short read into `Corrupt`.
struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Start reading a value of record type `what`, checking its version.
    fn new(what: &'static str, bytes: &'a [u8]) -> Result<Reader<'a>, StoreError> {
        let mut r = Reader { what, bytes };
        let version = r.u8()?;
        if version != V1 {
            return Err(StoreError::Corrupt(format!(
                "{what} value has unknown version {version}"
            )));
        }
        Ok(r)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.bytes.len() < n {
            return Err(StoreError::Corrupt(format!(
                "{} value is truncated",
                self.what
            )));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, StoreError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn timestamp(&mut self) -> Result<Timestamp, StoreError> {
        let sec = self.i64()?;
        let nsec = self.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(StoreError::Corrupt(format!(
                "{} value has nanoseconds {nsec}",
                self.what
            )));
        }
        Ok(Timestamp { sec, nsec })
    }

    fn kind(&mut self) -> Result<FileKind, StoreError> {
        let b = self.u8()?;
        kind_from_byte(b)
            .ok_or_else(|| StoreError::Corrupt(format!("{} value has file kind {b}", self.what)))
    }

    /// Everything not yet read.
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// Check that the value has been read to its end.
    fn finish(self) -> Result<(), StoreError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!(
                "{} value has {} trailing bytes",
                self.what,
                self.bytes.len()
            )))
        }
    }
}

fn kind_byte(kind: FileKind) -> u8 {
    match kind {
        FileKind::Regular => 1,
        FileKind::Directory => 2,
        FileKind::Symlink => 3,
        FileKind::Fifo => 4,
        FileKind::Socket => 5,
        FileKind::CharDevice => 6,
        FileKind::BlockDevice => 7,
    }
}

fn kind_from_byte(b: u8) -> Option<FileKind> {
    Some(match b {
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

fn put_timestamp(v: &mut Vec<u8>, t: Timestamp) {
    v.extend_from_slice(&t.sec.to_le_bytes());
    v.extend_from_slice(&t.nsec.to_le_bytes());
}

/// What a volume records about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub format_version: u32,
    /// Random at creation; names the volume in logs.
    pub volume_id: [u8; 16],
    /// Every id below this may have been handed out already.
    pub next_id: u64,
    /// How many times the volume has been opened for writing, this time
    /// included: the durability epoch.
    pub open_count: u64,
}

pub fn encode_superblock(s: &Superblock) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 8 + 4 + 16 + 16);
    v.push(V1);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&s.format_version.to_le_bytes());
    v.extend_from_slice(&s.volume_id);
    v.extend_from_slice(&s.next_id.to_le_bytes());
    v.extend_from_slice(&s.open_count.to_le_bytes());
    v
}

pub fn decode_superblock(bytes: &[u8]) -> Result<Superblock, StoreError> {
    let mut r = Reader::new("superblock", bytes)?;
    if r.array::<8>()? != *MAGIC {
        return Err(StoreError::Corrupt(
            "superblock lacks the pohmelfs magic: not a pohmelfs volume".into(),
        ));
    }
    let s = Superblock {
        format_version: r.u32()?,
        volume_id: r.array()?,
        next_id: r.u64()?,
        open_count: r.u64()?,
    };
    r.finish()?;
    Ok(s)
}

/// Space accounting, kept exact by every commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Chunks holding a record (each charged a whole block).
    pub blocks: u64,
    pub inodes: u64,
    /// Key and value bytes of the inode, symlink, entry and xattr records.
    pub meta_bytes: u64,
}

pub fn encode_counters(c: &Counters) -> Vec<u8> {
    let mut v = Vec::with_capacity(25);
    v.push(V1);
    v.extend_from_slice(&c.blocks.to_le_bytes());
    v.extend_from_slice(&c.inodes.to_le_bytes());
    v.extend_from_slice(&c.meta_bytes.to_le_bytes());
    v
}

pub fn decode_counters(bytes: &[u8]) -> Result<Counters, StoreError> {
    let mut r = Reader::new("counters", bytes)?;
    let c = Counters {
        blocks: r.u64()?,
        inodes: r.u64()?,
        meta_bytes: r.u64()?,
    };
    r.finish()?;
    Ok(c)
}

pub fn encode_inode(i: &Inode) -> Vec<u8> {
    let mut v = Vec::with_capacity(80);
    v.push(V1);
    v.push(kind_byte(i.kind));
    for n in [i.perm, i.uid, i.gid, i.nlink] {
        v.extend_from_slice(&n.to_le_bytes());
    }
    v.extend_from_slice(&i.size.to_le_bytes());
    v.extend_from_slice(&i.rdev.to_le_bytes());
    for t in [i.atime, i.mtime, i.ctime] {
        put_timestamp(&mut v, t);
    }
    v.extend_from_slice(&i.parent.to_le_bytes());
    v
}

/// The inode stored under the key of `ino`.
pub fn decode_inode(ino: u64, bytes: &[u8]) -> Result<Inode, StoreError> {
    let mut r = Reader::new("inode", bytes)?;
    let i = Inode {
        ino,
        kind: r.kind()?,
        perm: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        nlink: r.u32()?,
        size: r.u64()?,
        rdev: r.u32()?,
        atime: r.timestamp()?,
        mtime: r.timestamp()?,
        ctime: r.timestamp()?,
        parent: r.u64()?,
    };
    r.finish()?;
    Ok(i)
}

/// A by-name entry value: what the entry points at; the name is in the key.
pub fn encode_dirent_by_name(d: &Dirent) -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.push(V1);
    v.extend_from_slice(&d.ino.to_le_bytes());
    v.push(kind_byte(d.kind));
    v.extend_from_slice(&d.cookie.to_le_bytes());
    v
}

pub fn decode_dirent_by_name(name: &[u8], bytes: &[u8]) -> Result<Dirent, StoreError> {
    let mut r = Reader::new("dirent", bytes)?;
    let d = Dirent {
        name: name.to_vec(),
        ino: r.u64()?,
        kind: r.kind()?,
        cookie: r.u64()?,
    };
    r.finish()?;
    Ok(d)
}

/// A by-cookie entry value: the whole entry but its cookie (in the key), so
/// readdir is one scan.
pub fn encode_dirent_by_cookie(d: &Dirent) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + d.name.len());
    v.push(V1);
    v.extend_from_slice(&d.ino.to_le_bytes());
    v.push(kind_byte(d.kind));
    v.extend_from_slice(&d.name);
    v
}

pub fn decode_dirent_by_cookie(cookie: u64, bytes: &[u8]) -> Result<Dirent, StoreError> {
    let mut r = Reader::new("dirent cookie", bytes)?;
    let ino = r.u64()?;
    let kind = r.kind()?;
    let name = r.rest().to_vec();
    Ok(Dirent {
        name,
        ino,
        kind,
        cookie,
    })
}

/// A value that is a version byte and opaque bytes: symlink targets,
/// xattr values, applied-transaction markers.
pub fn encode_bytes(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + payload.len());
    v.push(V1);
    v.extend_from_slice(payload);
    v
}

pub fn decode_bytes<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a [u8], StoreError> {
    Ok(Reader::new(what, bytes)?.rest())
}

/// A segment record: the segment's live bytes.
pub fn encode_segment(live_bytes: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(V1);
    v.extend_from_slice(&live_bytes.to_le_bytes());
    v
}

pub fn decode_segment(bytes: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader::new("segment", bytes)?;
    let live = r.u64()?;
    r.finish()?;
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode() -> Inode {
        Inode {
            ino: 42,
            kind: FileKind::Symlink,
            perm: 0o4755,
            uid: 1000,
            gid: 100,
            nlink: 3,
            size: 1 << 40,
            rdev: 0x0801,
            atime: Timestamp { sec: -5, nsec: 7 },
            mtime: Timestamp {
                sec: 1_700_000_000,
                nsec: 999_999_999,
            },
            ctime: Timestamp { sec: 1, nsec: 0 },
            parent: 9,
        }
    }

    #[test]
    fn records_round_trip() {
        let i = inode();
        assert_eq!(decode_inode(42, &encode_inode(&i)).unwrap(), i);
        let d = Dirent {
            name: b"name".to_vec(),
            ino: 5,
            kind: FileKind::Directory,
            cookie: 77,
        };
        assert_eq!(
            decode_dirent_by_name(b"name", &encode_dirent_by_name(&d)).unwrap(),
            d
        );
        assert_eq!(
            decode_dirent_by_cookie(77, &encode_dirent_by_cookie(&d)).unwrap(),
            d
        );
        let s = Superblock {
            format_version: FORMAT_VERSION,
            volume_id: [3; 16],
            next_id: 1 << 20,
            open_count: 2,
        };
        assert_eq!(decode_superblock(&encode_superblock(&s)).unwrap(), s);
        let c = Counters {
            blocks: 3,
            inodes: 4,
            meta_bytes: 5,
        };
        assert_eq!(decode_counters(&encode_counters(&c)).unwrap(), c);
        assert_eq!(decode_bytes("x", &encode_bytes(b"abc")).unwrap(), b"abc");
    }

    #[test]
    fn every_truncation_and_garbage_is_corrupt_not_a_panic() {
        let full = encode_inode(&inode());
        for n in 0..full.len() {
            assert!(matches!(
                decode_inode(1, &full[..n]),
                Err(StoreError::Corrupt(_))
            ));
        }
        let mut long = full.clone();
        long.push(0);
        assert!(decode_inode(1, &long).is_err());
        let mut bad_kind = full.clone();
        bad_kind[1] = 99;
        assert!(decode_inode(1, &bad_kind).is_err());
        let mut bad_version = full;
        bad_version[0] = 200;
        assert!(decode_inode(1, &bad_version).is_err());
        assert!(decode_superblock(b"\x01NOTMAGICxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").is_err());
        assert_eq!(decode_segment(&encode_segment(7)).unwrap(), 7);
        assert!(decode_segment(&[V1, 1, 2]).is_err());
        assert!(decode_dirent_by_cookie(1, &[V1, 1, 2]).is_err());
    }
}
