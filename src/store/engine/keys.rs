//! The key layout of a volume: how each record is named in the engine's
//! ordered key space, and how a key read back is taken apart.
//!
//! Every key starts with a one-byte record type, then fixed-width big-endian
//! numbers, then at most one variable-length byte string at the very end (a
//! name). Because numbers are big-endian and fixed-width, byte order is
//! numeric order, so "all blocks of inode 7 from block 3 on" or "entries of
//! directory 1 after cookie 100" are single range scans. This module owns
//! only bytes: it never reads or writes the engine, and decoding a key never
//! panics (a malformed key is a [`StoreError::Corrupt`]).

use std::ops::Range;

use crate::store::StoreError;

/// Record type bytes. Their numeric order is the order of the key space; the
/// gaps leave room for new record types without renumbering.
pub mod tag {
    /// The volume's superblock (one key, the tag alone).
    pub const SUPERBLOCK: u8 = 0x01;
    /// Space accounting counters (one key, the tag alone).
    pub const STATS: u8 = 0x02;
    /// The lsn of the last commit-log record whose batch this is (one
    /// key, the tag alone; `log.rs`).
    pub const LOG: u8 = 0x03;
    /// The volume's writer claim: which client session of a store server
    /// may write (one key, the tag alone; `writer.rs`).
    pub const WRITER: u8 = 0x04;
    /// `ino` -> inode attributes.
    pub const INODE: u8 = 0x10;
    /// `ino` -> symlink target.
    pub const SYMLINK: u8 = 0x11;
    /// `ino` -> nothing: the inode lost its last link while a guest held
    /// it (an orphan); removed with the inode. Whatever is left when a
    /// daemon opens the volume is what a crash left behind (`orphans.rs`).
    pub const ORPHAN: u8 = 0x12;
    /// `parent, name` -> entry (ino, kind, cookie).
    pub const DIRENT_BY_NAME: u8 = 0x20;
    /// `parent, cookie` -> entry (ino, kind, name), for readdir.
    pub const DIRENT_BY_COOKIE: u8 = 0x21;
    /// `ino, name` -> extended attribute value.
    pub const XATTR: u8 = 0x30;
    /// `ino, chunk index` -> the extents of one `BLOCK_SIZE` chunk of file
    /// data (`extent.rs`).
    pub const BLOCK: u8 = 0x40;
    /// `segment id` -> the live bytes of one segment file.
    pub const SEGMENT: u8 = 0x48;
    /// `session, txn_id` -> marker that the transaction was applied.
    pub const APPLIED: u8 = 0x50;
}

fn with_u64(tag: u8, a: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(tag);
    k.extend_from_slice(&a.to_be_bytes());
    k
}

fn with_u64_u64(tag: u8, a: u64, b: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag);
    k.extend_from_slice(&a.to_be_bytes());
    k.extend_from_slice(&b.to_be_bytes());
    k
}

fn with_u64_bytes(tag: u8, a: u64, bytes: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + bytes.len());
    k.push(tag);
    k.extend_from_slice(&a.to_be_bytes());
    k.extend_from_slice(bytes);
    k
}

pub fn superblock() -> Vec<u8> {
    vec![tag::SUPERBLOCK]
}

pub fn log() -> Vec<u8> {
    vec![tag::LOG]
}

pub fn writer() -> Vec<u8> {
    vec![tag::WRITER]
}

pub fn stats() -> Vec<u8> {
    vec![tag::STATS]
}

pub fn inode(ino: u64) -> Vec<u8> {
    with_u64(tag::INODE, ino)
}

pub fn symlink(ino: u64) -> Vec<u8> {
    with_u64(tag::SYMLINK, ino)
}

pub fn orphan(ino: u64) -> Vec<u8> {
    with_u64(tag::ORPHAN, ino)
}

pub fn dirent_by_name(parent: u64, name: &[u8]) -> Vec<u8> {
    with_u64_bytes(tag::DIRENT_BY_NAME, parent, name)
}

pub fn dirent_by_cookie(parent: u64, cookie: u64) -> Vec<u8> {
    with_u64_u64(tag::DIRENT_BY_COOKIE, parent, cookie)
}

pub fn xattr(ino: u64, name: &[u8]) -> Vec<u8> {
    with_u64_bytes(tag::XATTR, ino, name)
}

pub fn block(ino: u64, index: u64) -> Vec<u8> {
    with_u64_u64(tag::BLOCK, ino, index)
}

pub fn segment(id: u64) -> Vec<u8> {
    with_u64(tag::SEGMENT, id)
}

pub fn applied(session: u64, txn_id: u64) -> Vec<u8> {
    with_u64_u64(tag::APPLIED, session, txn_id)
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when there is none (the prefix is all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The keys that start with `prefix`, as a half-open range. Every prefix
/// this module builds starts with a tag below `0xff`, so the end exists.
fn prefix_range(prefix: Vec<u8>) -> Range<Vec<u8>> {
    let end = prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
    prefix..end
}

/// Blocks `first..` of `ino`.
pub fn blocks_from(ino: u64, first: u64) -> Range<Vec<u8>> {
    block(ino, first)..prefix_range(with_u64(tag::BLOCK, ino)).end
}

/// Blocks `first..=last` of `ino`.
pub fn blocks_between(ino: u64, first: u64, last: u64) -> Range<Vec<u8>> {
    let end = match last.checked_add(1) {
        Some(next) => block(ino, next),
        None => prefix_range(with_u64(tag::BLOCK, ino)).end,
    };
    block(ino, first)..end
}

/// Every data chunk record of every inode.
pub fn blocks_all() -> Range<Vec<u8>> {
    prefix_range(vec![tag::BLOCK])
}

/// Every segment record.
pub fn segments_all() -> Range<Vec<u8>> {
    prefix_range(vec![tag::SEGMENT])
}

/// The id of a segment record key.
pub fn decode_segment(key: &[u8]) -> Result<u64, StoreError> {
    if key.len() != 9 || key[0] != tag::SEGMENT {
        return Err(corrupt("segment", key));
    }
    be_u64(&key[1..]).ok_or_else(|| corrupt("segment", key))
}

/// All extended attributes of `ino`.
pub fn xattrs_of(ino: u64) -> Range<Vec<u8>> {
    prefix_range(with_u64(tag::XATTR, ino))
}

/// Entries of `parent` whose cookie is greater than `after`.
pub fn cookies_after(parent: u64, after: u64) -> Range<Vec<u8>> {
    let end = prefix_range(with_u64(tag::DIRENT_BY_COOKIE, parent)).end;
    match after.checked_add(1) {
        Some(next) => dirent_by_cookie(parent, next)..end,
        // Nothing is after the largest cookie: an empty range.
        None => end.clone()..end,
    }
}

/// Every applied-transaction record of `session`.
pub fn applied_of(session: u64) -> Range<Vec<u8>> {
    prefix_range(with_u64(tag::APPLIED, session))
}

/// Applied-transaction records of `session` with `txn_id < below`.
pub fn applied_below(session: u64, below: u64) -> Range<Vec<u8>> {
    applied(session, 0)..applied(session, below)
}

fn corrupt(what: &str, key: &[u8]) -> StoreError {
    StoreError::Corrupt(format!("malformed {what} key {key:02x?}"))
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The `(a, b)` of a key built by `with_u64_u64(expected_tag, a, b)`.
fn decode_u64_u64(expected_tag: u8, what: &str, key: &[u8]) -> Result<(u64, u64), StoreError> {
    if key.len() != 17 || key[0] != expected_tag {
        return Err(corrupt(what, key));
    }
    match (be_u64(&key[1..9]), be_u64(&key[9..17])) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(corrupt(what, key)),
    }
}

/// The `(ino, index)` of a block key.
pub fn decode_block(key: &[u8]) -> Result<(u64, u64), StoreError> {
    decode_u64_u64(tag::BLOCK, "block", key)
}

/// The `(parent, cookie)` of a by-cookie entry key.
pub fn decode_dirent_by_cookie(key: &[u8]) -> Result<(u64, u64), StoreError> {
    decode_u64_u64(tag::DIRENT_BY_COOKIE, "dirent cookie", key)
}

/// The `(session, txn_id)` of an applied record key.
pub fn decode_applied(key: &[u8]) -> Result<(u64, u64), StoreError> {
    decode_u64_u64(tag::APPLIED, "applied", key)
}

/// The `(ino, name)` of an xattr key.
pub fn decode_xattr(key: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    if key.len() < 9 || key[0] != tag::XATTR {
        return Err(corrupt("xattr", key));
    }
    let ino = be_u64(&key[1..9]).ok_or_else(|| corrupt("xattr", key))?;
    Ok((ino, &key[9..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_sort_numerically_and_decode() {
        let a = block(7, 255);
        let b = block(7, 256);
        let c = block(8, 0);
        assert!(a < b && b < c);
        assert_eq!(decode_block(&b).unwrap(), (7, 256));
        assert!(decode_block(&a[..10]).is_err());
        assert!(decode_block(&inode(7)).is_err());
    }

    #[test]
    fn ranges_hold_exactly_their_keys() {
        let r = blocks_from(7, 3);
        assert!(r.contains(&block(7, 3)));
        assert!(r.contains(&block(7, u64::MAX)));
        assert!(!r.contains(&block(7, 2)));
        assert!(!r.contains(&block(8, 0)));
        let r = blocks_between(7, 3, 4);
        assert!(r.contains(&block(7, 4)) && !r.contains(&block(7, 5)));
        let r = blocks_between(u64::MAX, 0, u64::MAX);
        assert!(r.contains(&block(u64::MAX, u64::MAX)));
        let r = xattrs_of(5);
        assert!(r.contains(&xattr(5, b"")) && r.contains(&xattr(5, &[0xff; 300])));
        assert!(!r.contains(&xattr(6, b"")));
        let r = cookies_after(1, 100);
        assert!(!r.contains(&dirent_by_cookie(1, 100)));
        assert!(r.contains(&dirent_by_cookie(1, 101)));
        assert!(cookies_after(1, u64::MAX).is_empty());
        assert!(applied_below(3, 0).is_empty());
    }

    #[test]
    fn prefix_end_carries_over_ff() {
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }

    #[test]
    fn xattr_keys_decode() {
        let k = xattr(9, b"user.x");
        assert_eq!(decode_xattr(&k).unwrap(), (9, &b"user.x"[..]));
        assert!(decode_xattr(&[tag::XATTR, 1]).is_err());
    }
}
