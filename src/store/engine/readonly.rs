//! A volume opened read-only, for `pohmelfs serve --readonly`: a [`Store`]
//! whose reads answer from the engine through SlateDB's `DbReader`
//! ([`VolumeReader`]) and whose every write is refused with
//! [`StoreError::ReadOnly`].
//!
//! Opening writes nothing to the volume: no holder record, no superblock
//! update (the epoch is not counted), no commit-log replay or checkpoint,
//! no orphan reclaim, no segment sweep or punch, no removal of snapshot
//! leftovers. The reader is pinned to what the volume held when it
//! opened: its engine follows no newer manifest, and the commit log's
//! records the engine lacked then are read once and laid over what it
//! reads (`overlay.rs`). A snapshot (`DIR/snapshots/NAME`, or the URL
//! `file:///DIR@NAME`) never changes, so a snapshot served this way is
//! exactly its point in time. A volume a writing daemon holds may be
//! served too, as of the open; but that writer goes on, and once it
//! compacts away a table or punches a page the reader still names, that
//! read fails (EIO): every segment page read is checked against its
//! extent's checksum, so a punched page is an error, never zeros. Serve a
//! snapshot for a view that lasts (docs/design.md, "Read-only export").
//!
//! This module never writes to the volume, and takes no lock on it.

use std::ops::Range;
use std::time::Duration;

use super::extent::{self, Data, Piece, PAGE};
use super::objects::ObjectFiles;
use super::reader::{OpenReaderError, VolumeReader};
use super::scan::VolumeScan;
use super::segment::SegmentFiles;
use super::{codec, holder, keys, snapshot, VolumeIdentity, FORMAT_VERSION};
use crate::store::{
    CommitOutcome, Dirent, Inode, OnceStore, Store, StoreError, StoreStats, Txn, BLOCK_SIZE,
};

/// How often the engine would look for a newer manifest: never, in
/// practice. A reader pinned to its open keeps the commit log's records it
/// read then consistent with the engine's state.
const PINNED_POLL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A volume served read-only. See the module documentation.
pub struct ReadOnlyVolume {
    reader: VolumeReader,
    /// The segment files of a `file://` volume; `None` on `s3://`.
    segments: Option<SegmentFiles>,
    /// The data objects of an `s3://` volume.
    objects: Option<ObjectFiles>,
    identity: VolumeIdentity,
    stats: StoreStats,
    describe: String,
}

impl ReadOnlyVolume {
    /// Open the volume named by a `file://` or `s3://` URL read-only;
    /// `file:///DIR@NAME` names snapshot NAME of the volume in DIR. A
    /// `file://` directory must exist, and hold a volume.
    pub fn open(url: &str) -> Result<ReadOnlyVolume, OpenReaderError> {
        let url = snapshot::resolve_url(url).map_err(OpenReaderError::Snapshot)?;
        let mut cfg = VolumeReader::config(&url)?;
        // Read before the engine opens, on a runtime of this call's own:
        // whether there is a volume, and the capacity `format` recorded.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OpenReaderError::Runtime)?;
        if !rt
            .block_on(holder::exists(&*cfg.object_store, &cfg.db_path))
            .map_err(OpenReaderError::Holder)?
        {
            return Err(OpenReaderError::NoVolume);
        }
        if !cfg.capacity_named {
            if let Some(bytes) = rt
                .block_on(holder::read_capacity(&*cfg.object_store, &cfg.db_path))
                .map_err(OpenReaderError::Holder)?
            {
                cfg.capacity_bytes = bytes;
            }
        }
        drop(rt);
        let reader = VolumeReader::with_config(&cfg, PINNED_POLL)?;
        let info = reader.volume_info().map_err(OpenReaderError::Superblock)?;
        if !codec::reads_format(info.format_version) {
            return Err(OpenReaderError::FormatVersion {
                found: info.format_version,
                expected: FORMAT_VERSION,
            });
        }
        let segments = reader.segment_files();
        let objects = reader.object_files();
        let describe = format!(
            "{} (volume {}, read-only)",
            cfg.describe,
            hex(&info.volume_id)
        );
        tracing::info!(volume = %describe, epoch = info.open_count, "opened volume read-only");
        Ok(ReadOnlyVolume {
            segments,
            objects,
            identity: VolumeIdentity {
                volume_id: info.volume_id,
                format_version: info.format_version,
                epoch: info.open_count,
                holder: None,
            },
            stats: StoreStats {
                capacity_bytes: cfg.capacity_bytes.saturating_sub(info.counted_meta_bytes),
                used_bytes: info.counted_blocks.saturating_mul(BLOCK_SIZE),
                capacity_inodes: cfg.capacity_inodes,
                used_inodes: info.counted_inodes,
            },
            describe,
            reader,
        })
    }

    /// The value of `key`, decoded by `decode`.
    fn get<T>(
        &self,
        key: Vec<u8>,
        decode: impl FnOnce(&[u8]) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.reader.raw_get(&key)?.map(|v| decode(&v)).transpose()
    }

    /// Fill `out` with chunk `index` of `ino` from chunk offset `from` on.
    fn read_chunk(
        &self,
        ino: u64,
        index: u64,
        from: u32,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let Some(v) = self.reader.raw_get(&keys::block(ino, index))? else {
            out.fill(0);
            return Ok(());
        };
        let list = extent::decode(&v).map_err(|e| match e {
            StoreError::Corrupt(m) => {
                StoreError::Corrupt(format!("block {index} of inode {ino}: {m}"))
            }
            other => other,
        })?;
        out.fill(0);
        let to = from + out.len() as u32;
        for e in &list {
            let (s, t) = (e.start.max(from), e.end().min(to));
            if s >= t {
                continue;
            }
            let dst = &mut out[(s - from) as usize..(t - from) as usize];
            match &e.data {
                Data::Inline(b) => {
                    dst.copy_from_slice(&b[(s - e.start) as usize..(t - e.start) as usize]);
                }
                Data::Segment(p) if self.objects.is_some() => {
                    if let Some(objects) = &self.objects {
                        let got = objects.read_many(&[(p.clone(), s..t)])?;
                        let b = got.first().ok_or_else(|| {
                            StoreError::Corrupt("object read returned nothing".into())
                        })?;
                        dst.copy_from_slice(b);
                    }
                }
                Data::Segment(p) => {
                    let files = self.segments.as_ref().ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "extent in segment {} on a volume without segments",
                            p.seg
                        ))
                    })?;
                    read_verified(files, p, s..t, dst)?;
                }
            }
        }
        Ok(())
    }
}

/// Fill `dst` with the bytes of chunk range `r` of piece `p`, checking
/// every segment page they touch against the piece's checksums: a live
/// writer may have punched or deleted what this open still names, and
/// that must read as an error, never as zeros.
fn read_verified(
    files: &SegmentFiles,
    p: &Piece,
    r: Range<u32>,
    dst: &mut [u8],
) -> Result<(), StoreError> {
    let want = p.seg_range(r);
    let pages = extent::pages_of(want.clone());
    let piece_end = p.seg_off + u64::from(p.len);
    // The piece's bytes in those pages: what each checksum covers.
    let from = (pages.start * PAGE).max(p.seg_off);
    let to = (pages.end * PAGE).min(piece_end);
    let mut buf = vec![0u8; (to - from) as usize];
    files.read_at(p.seg, from, &mut buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::Corrupt(format!("extent past the end of segment {}", p.seg))
        } else {
            StoreError::Io(e)
        }
    })?;
    let first = p.pages().start;
    for page in pages {
        let s = (page * PAGE).max(from);
        let t = ((page + 1) * PAGE).min(to);
        let crc = crate::checksum::crc32c(&buf[(s - from) as usize..(t - from) as usize]);
        if p.crcs.get((page - first) as usize) != Some(&crc) {
            return Err(StoreError::Corrupt(format!(
                "segment {} page at offset {} does not match its checksum \
                 (a writer may have reclaimed it since this read-only open)",
                p.seg,
                page * PAGE
            )));
        }
    }
    dst.copy_from_slice(&buf[(want.start - from) as usize..(want.end - from) as usize]);
    Ok(())
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store for ReadOnlyVolume {
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError> {
        self.get(keys::inode(ino), |v| codec::decode_inode(ino, v))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError> {
        self.get(keys::dirent_by_name(parent, name), |v| {
            codec::decode_dirent_by_name(name, v)
        })
    }

    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError> {
        let range = keys::cookies_after(parent, after);
        if max == 0 || range.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for kv in self.reader.raw_range(range)? {
            let (k, v) = kv?;
            let (_, cookie) = keys::decode_dirent_by_cookie(&k)?;
            out.push(codec::decode_dirent_by_cookie(cookie, &v)?);
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let index = pos / BLOCK_SIZE;
            let in_chunk = (pos % BLOCK_SIZE) as u32;
            let n = (buf.len() - done).min(BLOCK_SIZE as usize - in_chunk as usize);
            self.read_chunk(ino, index, in_chunk, &mut buf[done..done + n])?;
            done += n;
            pos = match pos.checked_add(n as u64) {
                Some(p) => p,
                // Past the largest offset nothing is stored: zeros.
                None => {
                    buf[done..].fill(0);
                    break;
                }
            };
        }
        Ok(())
    }

    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError> {
        let range = keys::blocks_from(ino, offset / BLOCK_SIZE);
        match self.reader.raw_range(range)?.next() {
            Some(kv) => {
                let (_, index) = keys::decode_block(&kv?.0)?;
                Ok(Some(index.saturating_mul(BLOCK_SIZE).max(offset)))
            }
            None => Ok(None),
        }
    }

    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError> {
        let mut want = offset / BLOCK_SIZE;
        for kv in self.reader.raw_range(keys::blocks_from(ino, want))? {
            let (_, index) = keys::decode_block(&kv?.0)?;
            if index != want {
                break;
            }
            want = match want.checked_add(1) {
                Some(w) => w,
                None => return Ok(u64::MAX),
            };
        }
        Ok(want.saturating_mul(BLOCK_SIZE).max(offset))
    }

    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(keys::symlink(ino), |v| {
            Ok(codec::decode_bytes("symlink", v)?.to_vec())
        })
    }

    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(keys::xattr(ino, name), |v| {
            Ok(codec::decode_bytes("xattr", v)?.to_vec())
        })
    }

    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.reader
            .raw_range(keys::xattrs_of(ino))?
            .map(|kv| Ok(keys::decode_xattr(&kv?.0)?.1.to_vec()))
            .collect()
    }

    fn statfs(&self) -> Result<StoreStats, StoreError> {
        Ok(self.stats)
    }

    fn reserve_ids(&self, _count: u64) -> Result<u64, StoreError> {
        Err(StoreError::ReadOnly)
    }

    fn commit(&self, _txn: Txn) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }

    fn sync(&self, _ino: Option<u64>) -> Result<(), StoreError> {
        // Nothing was written: everything is as durable as it was.
        Ok(())
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn identity(&self) -> Option<VolumeIdentity> {
        Some(self.identity.clone())
    }
}

impl OnceStore for ReadOnlyVolume {
    fn commit_once(
        &self,
        _session: u64,
        _txn_id: u64,
        _txn: Txn,
    ) -> Result<CommitOutcome, StoreError> {
        Err(StoreError::ReadOnly)
    }

    fn prune_applied(&self, _session: u64, _below: u64) -> Result<(), StoreError> {
        // Nothing was applied, so there is nothing to forget.
        Ok(())
    }

    fn epoch(&self) -> u64 {
        self.identity.epoch
    }

    fn set_writer_claim(&self, _claim: crate::store::WriterClaim) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
}
