//! Whole-volume scans, record type by record type, for the volume checker
//! (`pohmelfs check`, `src/check/`).
//!
//! [`VolumeScan`] decodes every record of one type in key order. It is
//! implemented by [`SlateStore`] (a volume this process has open for
//! writing) and by [`VolumeReader`](super::VolumeReader) (`reader.rs`), a
//! read-only view that writes nothing.
//!
//! A record that does not decode is an item `Err(StoreError::Corrupt)` and
//! the scan goes on with the next key; any other error (the engine failed)
//! is the last item. This module never writes and never interprets POSIX
//! semantics; that is the checker's job.

use super::objects::ObjectFiles;
use std::ops::{Bound, Range};

use bytes::Bytes;
use slatedb::config::ScanOptions;
use slatedb::{ByteRangeBounds, DbIterator, DbReadOps};

use super::extent::{self, Extent};
use super::keys::{self, tag};
use super::segment::SegmentFiles;
use super::{codec, map_engine_error, SlateStore};
use crate::store::{Dirent, Inode, StoreError};

/// What the superblock and the space counters say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub format_version: u32,
    pub volume_id: [u8; 16],
    /// Ids below this may have been handed out; none at or above it has.
    pub next_id: u64,
    /// Opens for writing so far (the durability epoch).
    pub open_count: u64,
    /// Data blocks in use, by the counters every commit keeps.
    pub counted_blocks: u64,
    /// Inodes in use, by the same counters.
    pub counted_inodes: u64,
    /// Bytes of metadata records, by the same counters.
    pub counted_meta_bytes: u64,
}

/// One data chunk (a block of `BLOCK_SIZE` file bytes): its extents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    pub ino: u64,
    pub index: u64,
    pub extents: Vec<Extent>,
}

/// One extended attribute, without its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XattrRecord {
    pub ino: u64,
    pub name: Vec<u8>,
    pub value_len: usize,
}

/// A directory entry as one of its two index records holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirentRecord {
    pub parent: u64,
    pub dirent: Dirent,
}

/// A half-open or unbounded key range for the engine.
#[derive(Clone, Debug)]
pub struct KeyRange {
    pub(super) start: Vec<u8>,
    pub(super) end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key whose first byte is `tag`.
    fn of_tag(tag: u8) -> KeyRange {
        KeyRange {
            start: vec![tag],
            end: keys::prefix_end(&[tag]),
        }
    }
}

impl From<Range<Vec<u8>>> for KeyRange {
    fn from(r: Range<Vec<u8>>) -> KeyRange {
        KeyRange {
            start: r.start,
            end: Some(r.end),
        }
    }
}

impl ByteRangeBounds for KeyRange {
    fn start_bound(&self) -> Bound<&[u8]> {
        Bound::Included(&self.start)
    }

    fn end_bound(&self) -> Bound<&[u8]> {
        match &self.end {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        }
    }
}

/// The tags the layout defines, in key order.
const KNOWN_TAGS: [u8; 13] = [
    tag::SUPERBLOCK,
    tag::STATS,
    tag::LOG,
    tag::WRITER,
    tag::INODE,
    tag::SYMLINK,
    tag::ORPHAN,
    tag::DIRENT_BY_NAME,
    tag::DIRENT_BY_COOKIE,
    tag::XATTR,
    tag::BLOCK,
    tag::SEGMENT,
    tag::APPLIED,
];

/// The key ranges between (and around) the known tags: whatever is stored
/// there is no record of this layout.
fn unknown_ranges() -> Vec<KeyRange> {
    let mut out = Vec::new();
    let mut from = 0u8;
    for t in KNOWN_TAGS {
        if t > from {
            out.push(KeyRange {
                start: vec![from],
                end: Some(vec![t]),
            });
        }
        from = t + 1;
    }
    out.push(KeyRange {
        start: vec![from],
        end: None,
    });
    out
}

/// Decodes one key-value pair of a scan into a record.
type Decode<T> = fn(&[u8], &[u8]) -> Result<T, StoreError>;

/// Puts (`Some`) and deletes (`None`) laid over one range of a scan.
pub(super) type Laid = Vec<(Bytes, Option<Bytes>)>;

/// Key-value pairs of a range, fetched one at a time on a runtime, with
/// the commit log's unreplayed records laid over them (`overlay.rs`).
pub struct RawScan<'a> {
    runtime: &'a tokio::runtime::Runtime,
    iters: std::vec::IntoIter<DbIterator>,
    /// One per iterator, or none.
    laid: std::vec::IntoIter<Laid>,
    current: Option<DbIterator>,
    /// The current range's next engine record, and whether it has none.
    head: Option<(Bytes, Bytes)>,
    head_done: bool,
    over: std::iter::Peekable<std::vec::IntoIter<(Bytes, Option<Bytes>)>>,
    done: bool,
}

impl<'a> RawScan<'a> {
    pub(super) fn new(
        runtime: &'a tokio::runtime::Runtime,
        iters: Vec<DbIterator>,
        laid: Vec<Laid>,
    ) -> Self {
        RawScan {
            runtime,
            iters: iters.into_iter(),
            laid: laid.into_iter(),
            current: None,
            head: None,
            head_done: false,
            over: Vec::new().into_iter().peekable(),
            done: false,
        }
    }
}

impl Iterator for RawScan<'_> {
    type Item = Result<(Bytes, Bytes), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(iter) = self.current.as_mut() else {
                self.current = self.iters.next();
                self.over = self.laid.next().unwrap_or_default().into_iter().peekable();
                self.head_done = false;
                if self.current.is_none() {
                    self.done = true;
                }
                continue;
            };
            if self.head.is_none() && !self.head_done {
                match self.runtime.block_on(iter.next()) {
                    Ok(Some(kv)) => self.head = Some((kv.key, kv.value)),
                    Ok(None) => self.head_done = true,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(map_engine_error(e)));
                    }
                }
            }
            let order = match (&self.head, self.over.peek()) {
                (None, None) => {
                    self.current = None;
                    continue;
                }
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((k, _)), Some((o, _))) => k.cmp(o),
            };
            if order == std::cmp::Ordering::Less {
                return self.head.take().map(Ok);
            }
            if order == std::cmp::Ordering::Equal {
                // The log's record replaces the engine's.
                self.head = None;
            }
            if let Some((k, Some(v))) = self.over.next() {
                return Some(Ok((k, v)));
            }
        }
        None
    }
}

/// Decoded records of one type, in key order. See the module documentation
/// for what an error item means.
pub struct Scan<'a, T> {
    raw: RawScan<'a>,
    decode: Decode<T>,
}

impl<T> Iterator for Scan<'_, T> {
    type Item = Result<T, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.raw.next()? {
            Ok((k, v)) => (self.decode)(&k, &v),
            Err(e) => Err(e),
        })
    }
}

fn decode_u64_key(what: &str, tag_byte: u8, key: &[u8]) -> Result<u64, StoreError> {
    match key.split_first() {
        Some((&t, rest)) if t == tag_byte && rest.len() == 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(rest);
            Ok(u64::from_be_bytes(a))
        }
        _ => Err(StoreError::Corrupt(format!(
            "malformed {what} key {key:02x?}"
        ))),
    }
}

/// The `(parent, name)` of a by-name entry key.
fn decode_by_name_key(key: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    if key.len() < 9 || key[0] != tag::DIRENT_BY_NAME {
        return Err(StoreError::Corrupt(format!(
            "malformed dirent key {key:02x?}"
        )));
    }
    let parent = decode_u64_key("dirent", tag::DIRENT_BY_NAME, &key[..9])?;
    Ok((parent, &key[9..]))
}

fn decode_inode(k: &[u8], v: &[u8]) -> Result<Inode, StoreError> {
    let ino = decode_u64_key("inode", tag::INODE, k)?;
    codec::decode_inode(ino, v).map_err(|e| name_ino(e, "inode", ino))
}

fn decode_orphan(k: &[u8], _v: &[u8]) -> Result<u64, StoreError> {
    decode_u64_key("orphan", tag::ORPHAN, k)
}

fn decode_symlink(k: &[u8], v: &[u8]) -> Result<(u64, Vec<u8>), StoreError> {
    let ino = decode_u64_key("symlink", tag::SYMLINK, k)?;
    let target = codec::decode_bytes("symlink", v).map_err(|e| name_ino(e, "symlink", ino))?;
    Ok((ino, target.to_vec()))
}

fn decode_by_name(k: &[u8], v: &[u8]) -> Result<DirentRecord, StoreError> {
    let (parent, name) = decode_by_name_key(k)?;
    let dirent = codec::decode_dirent_by_name(name, v).map_err(|e| {
        StoreError::Corrupt(format!(
            "entry {:?} of directory {parent}: {e}",
            String::from_utf8_lossy(name)
        ))
    })?;
    Ok(DirentRecord { parent, dirent })
}

fn decode_by_cookie(k: &[u8], v: &[u8]) -> Result<DirentRecord, StoreError> {
    let (parent, cookie) = keys::decode_dirent_by_cookie(k)?;
    let dirent = codec::decode_dirent_by_cookie(cookie, v).map_err(|e| {
        StoreError::Corrupt(format!(
            "entry with cookie {cookie} of directory {parent}: {e}"
        ))
    })?;
    Ok(DirentRecord { parent, dirent })
}

fn decode_xattr(k: &[u8], v: &[u8]) -> Result<XattrRecord, StoreError> {
    let (ino, name) = keys::decode_xattr(k)?;
    let value = codec::decode_bytes("xattr", v).map_err(|e| name_ino(e, "xattr", ino))?;
    Ok(XattrRecord {
        ino,
        name: name.to_vec(),
        value_len: value.len(),
    })
}

fn decode_block(k: &[u8], v: &[u8]) -> Result<BlockRecord, StoreError> {
    let (ino, index) = keys::decode_block(k)?;
    let extents = extent::decode(&Bytes::copy_from_slice(v))
        .map_err(|e| StoreError::Corrupt(format!("block {index} of inode {ino}: {e}")))?;
    Ok(BlockRecord {
        ino,
        index,
        extents,
    })
}

fn decode_segment(k: &[u8], v: &[u8]) -> Result<(u64, u64), StoreError> {
    let id = decode_u64_key("segment", tag::SEGMENT, k)?;
    let live = codec::decode_segment(v).map_err(|e| name_ino(e, "segment record", id))?;
    Ok((id, live))
}

fn decode_applied(k: &[u8], _v: &[u8]) -> Result<(u64, u64), StoreError> {
    keys::decode_applied(k)
}

fn decode_unknown(k: &[u8], _v: &[u8]) -> Result<Vec<u8>, StoreError> {
    Ok(k.to_vec())
}

/// Say which inode a value error belongs to.
fn name_ino(e: StoreError, what: &str, ino: u64) -> StoreError {
    match e {
        StoreError::Corrupt(m) => StoreError::Corrupt(format!("{what} of inode {ino}: {m}")),
        other => other,
    }
}

/// Reads a whole volume record type by record type. See the module
/// documentation.
pub trait VolumeScan {
    /// The data objects of an `s3://` volume (`objects.rs`).
    fn object_files(&self) -> Option<ObjectFiles> {
        None
    }

    /// The value of `key`.
    fn raw_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError>;

    /// The key-value pairs of `ranges`, one range after the other.
    fn raw_scan(&self, ranges: Vec<KeyRange>) -> Result<RawScan<'_>, StoreError>;

    /// The superblock and space counters.
    fn volume_info(&self) -> Result<VolumeInfo, StoreError> {
        let sb = self
            .raw_get(&keys::superblock())?
            .ok_or_else(|| StoreError::Corrupt("the volume has no superblock".into()))?;
        let sb = codec::decode_superblock(&sb)?;
        let counters = match self.raw_get(&keys::stats())? {
            Some(v) => codec::decode_counters(&v)?,
            None => codec::Counters::default(),
        };
        Ok(VolumeInfo {
            format_version: sb.format_version,
            volume_id: sb.volume_id,
            next_id: sb.next_id,
            open_count: sb.open_count,
            counted_blocks: counters.blocks,
            counted_inodes: counters.inodes,
            counted_meta_bytes: counters.meta_bytes,
        })
    }

    /// Every inode.
    fn scan_inodes(&self) -> Result<Scan<'_, Inode>, StoreError> {
        scan_tag(self, tag::INODE, decode_inode)
    }

    /// Every inode marked as an orphan.
    fn scan_orphans(&self) -> Result<Scan<'_, u64>, StoreError> {
        scan_tag(self, tag::ORPHAN, decode_orphan)
    }

    /// Every symlink target, as `(ino, target)`.
    fn scan_symlinks(&self) -> Result<Scan<'_, (u64, Vec<u8>)>, StoreError> {
        scan_tag(self, tag::SYMLINK, decode_symlink)
    }

    /// Every directory entry of the by-name index.
    fn scan_dirents_by_name(&self) -> Result<Scan<'_, DirentRecord>, StoreError> {
        scan_tag(self, tag::DIRENT_BY_NAME, decode_by_name)
    }

    /// Every directory entry of the by-cookie index.
    fn scan_dirents_by_cookie(&self) -> Result<Scan<'_, DirentRecord>, StoreError> {
        scan_tag(self, tag::DIRENT_BY_COOKIE, decode_by_cookie)
    }

    /// Every extended attribute.
    fn scan_xattrs(&self) -> Result<Scan<'_, XattrRecord>, StoreError> {
        scan_tag(self, tag::XATTR, decode_xattr)
    }

    /// Every data chunk, with its extents.
    fn scan_blocks(&self) -> Result<Scan<'_, BlockRecord>, StoreError> {
        scan_tag(self, tag::BLOCK, decode_block)
    }

    /// Every segment record, as `(segment id, live bytes)`.
    fn scan_segments(&self) -> Result<Scan<'_, (u64, u64)>, StoreError> {
        scan_tag(self, tag::SEGMENT, decode_segment)
    }

    /// The volume's segment files (`file://` volumes only).
    fn segment_files(&self) -> Option<SegmentFiles>;

    /// Every applied-transaction record, as `(session, txn_id)`.
    fn scan_applied(&self) -> Result<Scan<'_, (u64, u64)>, StoreError> {
        scan_tag(self, tag::APPLIED, decode_applied)
    }

    /// The key and value bytes of the records the metadata counter
    /// follows: inodes, symlink targets, both entry indexes, xattrs.
    fn metadata_bytes(&self) -> Result<u64, StoreError> {
        let ranges = [
            tag::INODE,
            tag::SYMLINK,
            tag::DIRENT_BY_NAME,
            tag::DIRENT_BY_COOKIE,
            tag::XATTR,
        ]
        .into_iter()
        .map(KeyRange::of_tag)
        .collect();
        let mut total = 0u64;
        for kv in self.raw_scan(ranges)? {
            let (k, v) = kv?;
            total += (k.len() + v.len()) as u64;
        }
        Ok(total)
    }

    /// The keys of records no part of this layout defines.
    fn scan_unknown(&self) -> Result<Scan<'_, Vec<u8>>, StoreError> {
        Ok(Scan {
            raw: self.raw_scan(unknown_ranges())?,
            decode: decode_unknown,
        })
    }
}

fn scan_tag<S: VolumeScan + ?Sized, T>(
    s: &S,
    tag: u8,
    decode: Decode<T>,
) -> Result<Scan<'_, T>, StoreError> {
    Ok(Scan {
        raw: s.raw_scan(vec![KeyRange::of_tag(tag)])?,
        decode,
    })
}

/// Options for whole-volume scans: nothing is worth caching, and reading
/// ahead pays off.
pub(super) fn scan_options() -> ScanOptions {
    ScanOptions {
        cache_blocks: false,
        read_ahead_bytes: 1 << 20,
        ..ScanOptions::default()
    }
}

/// Open one iterator per range on `db`.
pub(super) async fn open_iters<D: DbReadOps + Sync>(
    db: &D,
    ranges: Vec<KeyRange>,
    options: &ScanOptions,
) -> Result<Vec<DbIterator>, StoreError> {
    let mut iters = Vec::with_capacity(ranges.len());
    for r in ranges {
        iters.push(
            db.scan_with_options(r, options)
                .await
                .map_err(map_engine_error)?,
        );
    }
    Ok(iters)
}

impl VolumeScan for SlateStore {
    fn object_files(&self) -> Option<ObjectFiles> {
        let rt = self.rt().ok()?;
        Some(ObjectFiles::new(self.objects.clone()?, rt.handle().clone()))
    }

    fn segment_files(&self) -> Option<SegmentFiles> {
        self.segments.as_ref().map(|s| SegmentFiles::at(s.dir()))
    }

    fn raw_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        self.rt()?.block_on(self.get(key.to_vec()))
    }

    fn raw_scan(&self, ranges: Vec<KeyRange>) -> Result<RawScan<'_>, StoreError> {
        let runtime = self.rt()?;
        // A whole-volume scan reads the engine alone: the groups already
        // acknowledged go in first.
        let iters = runtime.block_on(async {
            self.await_applied().await?;
            open_iters(&self.db, ranges, &scan_options()).await
        })?;
        Ok(RawScan::new(runtime, iters, Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ranges_cover_everything_but_the_known_tags() {
        let ranges = unknown_ranges();
        let covered = |t: u8| {
            ranges
                .iter()
                .any(|r| r.start <= vec![t] && r.end.as_ref().is_none_or(|e| vec![t] < *e))
        };
        for t in 0..=255u8 {
            assert_eq!(covered(t), !KNOWN_TAGS.contains(&t), "tag {t:#x}");
        }
    }
}
