//! The read cache's files: the header that says which volume the cache
//! holds, and one file per cached block, each with its checksum.
//!
//! Both are written to a temporary name and renamed into place, so a name
//! never shows a half-written file; a torn or altered file still fails its
//! checksum, and is never served.

use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

use bytes::Bytes;

use crate::store::BLOCK_SIZE;

const HEADER_MAGIC: &[u8; 8] = b"PFSRCHDR";
const BLOCK_MAGIC: &[u8; 4] = b"PFRB";
/// The version of both layouts; a cache of another version is reset.
pub const CACHE_FORMAT: u32 = 1;
/// Bytes of a block file before its data.
pub const BLOCK_HEADER_BYTES: u64 = 4 + 16 + 8 + 8 + 4 + 4;
/// The longest volume key a header holds.
pub const KEY_MAX: usize = 4096;

/// What the header records: the volume the cache's blocks belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Random at every reset: block files of an earlier incarnation of
    /// the cache (a reset that did not finish) carry another one and are
    /// never served.
    pub instance: [u8; 16],
    /// The volume's identity (see `VolumeIdentity::key`).
    pub key: String,
    /// The volume's generation when the cache was last opened.
    pub generation: u64,
}

pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + h.key.len());
    v.extend_from_slice(HEADER_MAGIC);
    v.extend_from_slice(&CACHE_FORMAT.to_le_bytes());
    v.extend_from_slice(&h.instance);
    v.extend_from_slice(&(h.key.len() as u32).to_le_bytes());
    v.extend_from_slice(h.key.as_bytes());
    v.extend_from_slice(&h.generation.to_le_bytes());
    let crc = crate::checksum::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// The header in `bytes`, or `None` when it is not one this build wrote
/// (another format, torn, altered).
pub fn decode_header(bytes: &[u8]) -> Option<Header> {
    let (body, crc) = bytes.split_last_chunk::<4>()?;
    if crate::checksum::crc32c(body) != u32::from_le_bytes(*crc) {
        return None;
    }
    let rest = body.strip_prefix(HEADER_MAGIC)?;
    let (format, rest) = rest.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*format) != CACHE_FORMAT {
        return None;
    }
    let (instance, rest) = rest.split_first_chunk::<16>()?;
    let (key_len, rest) = rest.split_first_chunk::<4>()?;
    let key_len = u32::from_le_bytes(*key_len) as usize;
    if key_len > KEY_MAX || rest.len() != key_len + 8 {
        return None;
    }
    let (key, generation) = rest.split_at(key_len);
    Some(Header {
        instance: *instance,
        key: String::from_utf8(key.to_vec()).ok()?,
        generation: u64::from_le_bytes(generation.try_into().ok()?),
    })
}

/// A block file's bytes: its header, then the block's data up to its last
/// non-zero byte (the rest of the block reads as zeros).
pub fn encode_block(instance: &[u8; 16], ino: u64, block: u64, data: &[u8]) -> Vec<u8> {
    let used = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let data = &data[..used];
    let mut v = Vec::with_capacity(BLOCK_HEADER_BYTES as usize + used);
    v.extend_from_slice(BLOCK_MAGIC);
    v.extend_from_slice(instance);
    v.extend_from_slice(&ino.to_le_bytes());
    v.extend_from_slice(&block.to_le_bytes());
    v.extend_from_slice(&(used as u32).to_le_bytes());
    let mut crc = crate::checksum::crc32c(&v);
    crc = crate::checksum::crc32c_append(crc, data);
    v.extend_from_slice(&crc.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// The block's data in a block file's `bytes` (up to its last non-zero
/// byte; the rest of the block reads as zeros), if the file is the one the
/// cache wrote for `(ino, block)` in this incarnation and its checksum
/// holds.
pub fn decode_block(instance: &[u8; 16], ino: u64, block: u64, bytes: Vec<u8>) -> Option<Bytes> {
    let (head, data) = bytes.split_at_checked(BLOCK_HEADER_BYTES as usize)?;
    let (covered, crc) = head.split_last_chunk::<4>()?;
    let rest = covered.strip_prefix(BLOCK_MAGIC)?;
    let (inst, rest) = rest.split_first_chunk::<16>()?;
    let (file_ino, rest) = rest.split_first_chunk::<8>()?;
    let (file_block, rest) = rest.split_first_chunk::<8>()?;
    let len = u32::from_le_bytes(rest.try_into().ok()?) as usize;
    if inst != instance
        || u64::from_le_bytes(*file_ino) != ino
        || u64::from_le_bytes(*file_block) != block
        || len as u64 > BLOCK_SIZE
        || data.len() != len
    {
        return None;
    }
    let sum = crate::checksum::crc32c_append(crate::checksum::crc32c(covered), data);
    if sum != u32::from_le_bytes(*crc) {
        return None;
    }
    // The file's own buffer, past its header: no copy.
    Some(Bytes::from(bytes).slice(BLOCK_HEADER_BYTES as usize..))
}

/// Write `bytes` to `path` by way of `tmp` and a rename; with `durable`,
/// fsync the file and the directory.
pub fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let mut f = fs::File::create(tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    fs::rename(tmp, path)?;
    if durable {
        if let Some(parent) = path.parent() {
            fs::File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// The `(ino, block)` a block file's name encodes: `{ino:016x}-{block:016x}`.
pub fn parse_block_name(name: &str) -> Option<(u64, u64)> {
    let (ino, block) = name.split_once('-')?;
    if ino.len() != 16 || block.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(ino, 16).ok()?,
        u64::from_str_radix(block, 16).ok()?,
    ))
}

pub fn block_name(ino: u64, block: u64) -> String {
    format!("{ino:016x}-{block:016x}")
}
