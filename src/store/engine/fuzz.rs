//! The harness of the `engine_decode` fuzz target: the decoders of what the
//! engine reads back from its metadata store (record keys, superblock,
//! counters, inodes, entries, byte values, segment records, chunk extent
//! lists) on bytes a corrupted or hostile volume could hold, and the extent
//! functions the engine runs on a decoded list.
//!
//! The input's first byte picks the decoder, the second the length of a key
//! (taken next), the rest is the value. What it checks: nothing panics, and
//! whatever decodes encodes to bytes that decode to the same thing.

use std::fmt::Debug;

use bytes::Bytes;

use super::{codec, extent, keys};
use crate::store::BLOCK_SIZE;

/// Decode `data` as the record the first byte names.
pub fn engine_decode(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Some((&key_len, rest)) = rest.split_first() else {
        return;
    };
    let (key, value) = rest.split_at(usize::from(key_len).min(rest.len()));
    let number = |b: &[u8]| b.iter().take(8).fold(0u64, |n, &x| n << 8 | u64::from(x));
    match which % 9 {
        0 => again(codec::decode_superblock(value), |s| {
            codec::decode_superblock(&codec::encode_superblock(s))
        }),
        1 => again(codec::decode_counters(value), |c| {
            codec::decode_counters(&codec::encode_counters(c))
        }),
        2 => {
            let ino = number(key);
            again(codec::decode_inode(ino, value), |i| {
                codec::decode_inode(ino, &codec::encode_inode(i))
            })
        }
        3 => again(codec::decode_dirent_by_name(key, value), |d| {
            codec::decode_dirent_by_name(key, &codec::encode_dirent_by_name(d))
        }),
        4 => {
            let cookie = number(key);
            again(codec::decode_dirent_by_cookie(cookie, value), |d| {
                codec::decode_dirent_by_cookie(cookie, &codec::encode_dirent_by_cookie(d))
            })
        }
        5 => again(codec::decode_bytes("value", value), |b| {
            codec::decode_bytes("value", &codec::encode_bytes(b)).map(|b| b.to_vec())
        }),
        6 => again(codec::decode_segment(value), |n| {
            codec::decode_segment(&codec::encode_segment(*n))
        }),
        7 => extents(key, value),
        _ => record_keys(value),
    }
}

/// When `decoded` is a value, check that `reencode` (its encoding decoded
/// again) gives it back.
fn again<T: Debug, U: Debug + PartialEq<T>, E>(
    decoded: Result<T, E>,
    reencode: impl FnOnce(&T) -> Result<U, E>,
) {
    if let Ok(v) = decoded {
        match reencode(&v) {
            Ok(w) => assert!(w == v, "{v:?} encoded decodes as {w:?}"),
            Err(_) => panic!("{v:?} encoded does not decode"),
        }
    }
}

/// A chunk record, then what the engine does with a decoded one: the
/// windows' segment ranges, live bytes, dead pages, and a range (from the
/// key) cut out and written over.
fn extents(key: &[u8], value: &[u8]) {
    let Ok(list) = extent::decode(&Bytes::copy_from_slice(value)) else {
        return;
    };
    let again = extent::decode(&Bytes::from(extent::encode(&list)));
    assert!(
        again.as_ref().ok() == Some(&list),
        "{list:?} does not round-trip"
    );
    let mut r = [0u8; 8];
    let n = key.len().min(8);
    r[..n].copy_from_slice(&key[..n]);
    let (start, len) = (
        u32::from_le_bytes([r[0], r[1], r[2], r[3]]),
        u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
    );
    for e in &list {
        let _ = e.seg_window();
    }
    let _ = extent::live_bytes(&list);
    let _ = extent::covered_end(&list);
    let _ = extent::segment_pages_dead(&list, &[]);
    let end = (u64::from(start) + u64::from(len)).min(BLOCK_SIZE) as u32;
    if start < end {
        let cut = extent::remove_range(&list, start..end);
        let _ = extent::segment_pages_dead(&list, &cut);
        let inline = extent::Extent {
            start,
            len: end - start,
            data: extent::Data::Inline(Bytes::from(vec![0u8; (end - start) as usize])),
        };
        let _ = extent::insert(&list, inline);
    }
}

/// Every key decoder on the same bytes, and each decoded key built again.
fn record_keys(key: &[u8]) {
    if let Ok(id) = keys::decode_segment(key) {
        assert_eq!(keys::segment(id), key);
    }
    if let Ok((ino, index)) = keys::decode_block(key) {
        assert_eq!(keys::block(ino, index), key);
    }
    if let Ok((parent, cookie)) = keys::decode_dirent_by_cookie(key) {
        assert_eq!(keys::dirent_by_cookie(parent, cookie), key);
    }
    if let Ok((session, txn)) = keys::decode_applied(key) {
        assert_eq!(keys::applied(session, txn), key);
    }
    if let Ok((ino, name)) = keys::decode_xattr(key) {
        assert_eq!(keys::xattr(ino, name), key);
    }
}

/// One input of [`engine_decode`]: decoder `which`, `key`, `value`.
fn input(which: u8, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut v = vec![which, key.len() as u8];
    v.extend_from_slice(key);
    v.extend_from_slice(value);
    v
}

/// Seed inputs: one well-formed record of each kind.
pub fn record_seeds() -> Vec<Vec<u8>> {
    use crate::store::{Dirent, FileKind, Inode, Timestamp};
    let t = Timestamp { sec: 1, nsec: 2 };
    let inode = Inode {
        ino: 9,
        kind: FileKind::Regular,
        perm: 0o644,
        uid: 1,
        gid: 1,
        nlink: 1,
        size: 100,
        rdev: 0,
        atime: t,
        mtime: t,
        ctime: t,
        parent: 1,
    };
    let dirent = Dirent {
        name: b"f".to_vec(),
        ino: 9,
        kind: FileKind::Regular,
        cookie: 5,
    };
    let sb = codec::Superblock {
        format_version: codec::FORMAT_VERSION,
        volume_id: [7; 16],
        next_id: 100,
        open_count: 2,
    };
    let piece = extent::Piece {
        seg: 3,
        seg_off: 4096,
        start: 0,
        len: 8192,
        crcs: vec![1, 2],
    };
    let extents = [
        extent::Extent {
            start: 0,
            len: 8192,
            data: extent::Data::Segment(piece),
        },
        extent::Extent {
            start: 10_000,
            len: 3,
            data: extent::Data::Inline(Bytes::from_static(b"abc")),
        },
    ];
    vec![
        input(0, &[], &codec::encode_superblock(&sb)),
        input(1, &[], &codec::encode_counters(&codec::Counters::default())),
        input(2, &[9], &codec::encode_inode(&inode)),
        input(3, b"f", &codec::encode_dirent_by_name(&dirent)),
        input(4, &[5], &codec::encode_dirent_by_cookie(&dirent)),
        input(5, &[], &codec::encode_bytes(b"target")),
        input(6, &[], &codec::encode_segment(4096)),
        input(7, &[0, 16, 0, 0, 0, 1, 0, 0], &extent::encode(&extents)),
        input(8, &[], &keys::block(9, 1)),
        input(8, &[], &keys::xattr(9, b"user.a")),
    ]
}
