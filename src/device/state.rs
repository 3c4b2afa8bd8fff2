//! The device state a live migration carries from the source daemon to the
//! destination (vhost-user `DEVICE_STATE`): the guest session of
//! [`crate::fs::SessionState`] in a versioned, checksummed, bounded format
//! (`docs/migration.md`). A state this daemon cannot read is refused whole
//! with an error that says why, and the migration fails cleanly: the guest
//! keeps running on the source.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::fs::{OpenFile, SessionState};

/// The first bytes of every state.
pub const MAGIC: &[u8; 8] = b"POHMSTAT";
/// The format this daemon writes and reads.
pub const VERSION: u32 = 1;
/// The largest state read: 2^22 held inodes (the default
/// `max_referenced_inodes`) at 16 bytes and 2^16 handles at 20 bytes fit
/// with room to spare.
pub const MAX_STATE_BYTES: u32 = 96 << 20;
/// Bytes before the payload: magic, version, payload length.
const HEADER_BYTES: usize = 16;
/// `OpenFile::append`.
const FLAG_APPEND: u32 = 1;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("not a pohmelfs device state (magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("device state format {found}; this daemon reads format {VERSION} only")]
    Version { found: u32 },
    #[error("device state of {0} bytes exceeds the bound of {MAX_STATE_BYTES}")]
    TooLarge(u64),
    #[error("device state is truncated: {0}")]
    Truncated(&'static str),
    #[error("device state checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("device state has {0} bytes after its last record")]
    Trailing(usize),
    #[error("device state flags {0:#x} on a handle are unknown")]
    Flags(u32),
    #[error("cannot transfer the device state")]
    Io(#[from] io::Error),
}

/// `s` in the state format.
pub fn encode(s: &SessionState) -> Result<Vec<u8>, StateError> {
    let mut p = Vec::with_capacity(32 + 16 * s.lookups.len() + 20 * s.handles.len());
    p.extend_from_slice(&s.options.to_le_bytes());
    p.extend_from_slice(&s.next_handle.to_le_bytes());
    put_count(&mut p, s.lookups.len());
    for &(ino, count) in &s.lookups {
        p.extend_from_slice(&ino.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
    }
    put_count(&mut p, s.orphans.len());
    for &ino in &s.orphans {
        p.extend_from_slice(&ino.to_le_bytes());
    }
    put_count(&mut p, s.handles.len());
    for &(h, f) in &s.handles {
        p.extend_from_slice(&h.to_le_bytes());
        p.extend_from_slice(&f.ino.to_le_bytes());
        let flags = if f.append { FLAG_APPEND } else { 0 };
        p.extend_from_slice(&flags.to_le_bytes());
    }
    let len = u32::try_from(p.len())
        .ok()
        .filter(|&l| l <= MAX_STATE_BYTES)
        .ok_or(StateError::TooLarge(p.len() as u64))?;
    let mut out = Vec::with_capacity(HEADER_BYTES + p.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&p);
    out.extend_from_slice(&crate::checksum::crc32c(&p).to_le_bytes());
    Ok(out)
}

fn put_count(p: &mut Vec<u8>, n: usize) {
    // Counts are bounded by the daemon's limits, far below u32::MAX.
    p.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// Read a whole state from `r` (a migration's pipe), bounded.
pub fn read(r: &mut impl Read) -> Result<SessionState, StateError> {
    let mut header = [0u8; HEADER_BYTES];
    r.read_exact(&mut header)
        .map_err(|_| StateError::Truncated("header"))?;
    let (magic, rest) = header.split_at(8);
    if magic != MAGIC {
        let mut m = [0u8; 8];
        m.copy_from_slice(magic);
        return Err(StateError::Magic(m));
    }
    let found = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if found != VERSION {
        return Err(StateError::Version { found });
    }
    let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len > MAX_STATE_BYTES {
        return Err(StateError::TooLarge(u64::from(len)));
    }
    let mut payload = vec![0u8; len as usize + 4];
    r.read_exact(&mut payload)
        .map_err(|_| StateError::Truncated("payload"))?;
    let crc = payload.split_off(len as usize);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crate::checksum::crc32c(&payload);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    // Nothing may follow the state in the stream.
    let mut extra = [0u8; 1];
    if r.read(&mut extra)? != 0 {
        return Err(StateError::Trailing(1));
    }
    decode_payload(&payload)
}

fn decode_payload(p: &[u8]) -> Result<SessionState, StateError> {
    let mut c = Cursor(p);
    let options = c.u64("options")?;
    let next_handle = c.u64("next handle")?;
    let n = c.count(16, "lookups")?;
    let mut lookups = Vec::with_capacity(n);
    for _ in 0..n {
        lookups.push((c.u64("lookup")?, c.u64("lookup")?));
    }
    let n = c.count(8, "orphans")?;
    let mut orphans = Vec::with_capacity(n);
    for _ in 0..n {
        orphans.push(c.u64("orphan")?);
    }
    let n = c.count(20, "handles")?;
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let h = c.u64("handle")?;
        let ino = c.u64("handle")?;
        let flags = c.u32("handle")?;
        if flags & !FLAG_APPEND != 0 {
            return Err(StateError::Flags(flags));
        }
        let append = flags & FLAG_APPEND != 0;
        handles.push((h, OpenFile { ino, append }));
    }
    if !c.0.is_empty() {
        return Err(StateError::Trailing(c.0.len()));
    }
    Ok(SessionState {
        options,
        lookups,
        orphans,
        handles,
        next_handle,
    })
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], StateError> {
        if self.0.len() < N {
            return Err(StateError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        self.take::<8>(what).map(u64::from_le_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        self.take::<4>(what).map(u32::from_le_bytes)
    }

    /// A count of records of `size` bytes each, which must fit in what is
    /// left (so a hostile count cannot make a large allocation).
    fn count(&mut self, size: usize, what: &'static str) -> Result<usize, StateError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(size) > self.0.len() {
            return Err(StateError::Truncated(what));
        }
        Ok(n)
    }
}

/// Write `state` to `w` (a migration's pipe) and close it by dropping.
pub fn write(mut w: impl Write, state: &[u8]) -> Result<(), StateError> {
    w.write_all(state)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SessionState {
        SessionState {
            options: 0x1234,
            lookups: vec![(5, 2), (9, 1), (12, 7)],
            orphans: vec![9],
            handles: vec![
                (
                    3,
                    OpenFile {
                        ino: 5,
                        append: false,
                    },
                ),
                (
                    4,
                    OpenFile {
                        ino: 12,
                        append: true,
                    },
                ),
            ],
            next_handle: 8,
        }
    }

    #[test]
    fn a_state_reads_back_as_written() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(read(&mut &bytes[..]).unwrap(), sample());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                read(&mut &bad[..]).is_err(),
                "byte {i} flipped was accepted"
            );
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            assert!(read(&mut &bytes[..len]).is_err(), "{len} bytes accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            read(&mut &longer[..]),
            Err(StateError::Trailing(1))
        ));
    }

    #[test]
    fn another_version_names_both() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = read(&mut &bytes[..]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device state format 2; this daemon reads format 1 only"
        );
    }

    #[test]
    fn a_huge_length_or_count_allocates_nothing() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read(&mut &bytes[..]),
            Err(StateError::TooLarge(_))
        ));
        // A lookup count of u32::MAX inside a valid checksum.
        let mut p = Vec::new();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_payload(&p),
            Err(StateError::Truncated("lookups"))
        ));
    }
}
