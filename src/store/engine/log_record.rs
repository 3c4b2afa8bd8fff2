//! The commit log's format: records (page aligned, crc-chained, with their
//! payload of puts, deletes and small writes) and the header page that
//! holds the ring's tail. See `log.rs` for the file and the ring.
//!
//! This module owns the bytes. It never touches a file; every length read
//! back is checked, since the file is disk input.

use bytes::Bytes;

use super::log::LogError;

/// Records and the header are aligned to this.
pub const PAGE: u64 = 4096;

pub const HEADER_MAGIC: u32 = 0x4847_4c50; // "PLGH"
pub const RECORD_MAGIC: u32 = 0x4352_4c50; // "PLRC"
pub const VERSION: u16 = 1;
pub const FLAG_WRAP: u16 = 1;
/// Bytes of a record's header before its payload.
pub const RECORD_HEADER: usize = 32;

/// A place in the ring: the next record's offset and lsn, and the crc of
/// the record before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub off: u64,
    pub lsn: u64,
    pub prev: u32,
}

/// One small write's bytes and where they went in a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegWrite {
    pub seg: u64,
    pub off: u64,
    pub bytes: Vec<u8>,
}

/// A record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: u64,
    pub puts: Vec<(Bytes, Option<Bytes>)>,
    pub writes: Vec<SegWrite>,
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A record's buffer, header space included, with its payload: the puts
/// and deletes, then the writes (segment, offset, bytes given as parts).
pub fn encode_payload<'a, W>(puts: &[(Vec<u8>, Option<Bytes>)], writes: W) -> Vec<u8>
where
    W: IntoIterator<Item = (u64, u64, Vec<&'a [u8]>)>,
{
    let mut out = vec![0u8; RECORD_HEADER];
    put_u32(&mut out, puts.len() as u32);
    for (k, v) in puts {
        put_u32(&mut out, k.len() as u32);
        out.extend_from_slice(k);
        match v {
            Some(v) => {
                out.push(1);
                put_u32(&mut out, v.len() as u32);
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    let count_at = out.len();
    put_u32(&mut out, 0);
    let mut count = 0u32;
    for (seg, off, parts) in writes {
        count += 1;
        put_u64(&mut out, seg);
        put_u64(&mut out, off);
        put_u32(
            &mut out,
            parts.iter().map(|p| p.len()).sum::<usize>() as u32,
        );
        for p in parts {
            out.extend_from_slice(p);
        }
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    out
}

/// The bytes a record with `payload` bytes takes in the ring.
pub fn record_bytes(payload: usize) -> u64 {
    ((RECORD_HEADER + payload) as u64).div_ceil(PAGE) * PAGE
}

/// Fill in the header of `buf` (from [`encode_payload`]) and pad it to a
/// page; its crc.
pub fn seal(buf: &mut Vec<u8>, flags: u16, lsn: u64, prev: u32) -> u32 {
    let len = (buf.len() - RECORD_HEADER) as u32;
    let mut h = [0u8; RECORD_HEADER];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..16].copy_from_slice(&lsn.to_le_bytes());
    h[16..20].copy_from_slice(&prev.to_le_bytes());
    h[20..24].copy_from_slice(&len.to_le_bytes());
    let crc = crate::checksum::crc32c_append(crate::checksum::crc32c(&h), &buf[RECORD_HEADER..]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    buf[..RECORD_HEADER].copy_from_slice(&h);
    buf.resize(record_bytes(len as usize) as usize, 0);
    crc
}

/// A record's header, checked against what replay expects next.
struct Header {
    flags: u16,
    len: usize,
    crc: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The record at the start of `at` (which runs to the end of the ring),
/// if it is the one expected at `pos`.
fn check_record(at: &[u8], pos: Position) -> Option<Header> {
    if at.len() < RECORD_HEADER {
        return None;
    }
    let h = &at[..RECORD_HEADER];
    if le_u32(h, 0) != RECORD_MAGIC
        || le_u16(h, 4) != VERSION
        || le_u64(h, 8) != pos.lsn
        || le_u32(h, 16) != pos.prev
    {
        return None;
    }
    let len = le_u32(h, 20) as usize;
    if RECORD_HEADER + len > at.len() {
        return None;
    }
    let mut zeroed = [0u8; RECORD_HEADER];
    zeroed.copy_from_slice(h);
    zeroed[24..28].fill(0);
    let crc = crate::checksum::crc32c_append(
        crate::checksum::crc32c(&zeroed),
        &at[RECORD_HEADER..RECORD_HEADER + len],
    );
    (crc == le_u32(h, 24)).then_some(Header {
        flags: le_u16(h, 6),
        len,
        crc,
    })
}

/// Reads the payload of one record; every length is checked.
struct Reader<'a> {
    b: &'a [u8],
    lsn: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LogError> {
        if self.b.len() < n {
            return Err(LogError::Corrupt {
                lsn: self.lsn,
                reason: "payload shorter than its contents".into(),
            });
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, LogError> {
        Ok(le_u32(self.take(4)?, 0))
    }

    fn u64(&mut self) -> Result<u64, LogError> {
        Ok(le_u64(self.take(8)?, 0))
    }
}

/// The puts and writes of a payload.
pub fn decode_payload(lsn: u64, payload: &[u8]) -> Result<Record, LogError> {
    let mut r = Reader { b: payload, lsn };
    let n = r.u32()? as usize;
    let mut puts = Vec::with_capacity(n.min(payload.len()));
    for _ in 0..n {
        let klen = r.u32()? as usize;
        let key = Bytes::copy_from_slice(r.take(klen)?);
        let value = match r.take(1)?[0] {
            0 => None,
            1 => {
                let vlen = r.u32()? as usize;
                Some(Bytes::copy_from_slice(r.take(vlen)?))
            }
            b => {
                return Err(LogError::Corrupt {
                    lsn,
                    reason: format!("value marker {b}"),
                })
            }
        };
        puts.push((key, value));
    }
    let n = r.u32()? as usize;
    let mut writes = Vec::with_capacity(n.min(payload.len()));
    for _ in 0..n {
        let seg = r.u64()?;
        let off = r.u64()?;
        let len = r.u32()? as usize;
        writes.push(SegWrite {
            seg,
            off,
            bytes: r.take(len)?.to_vec(),
        });
    }
    Ok(Record { lsn, puts, writes })
}

/// The ring's bytes, as [`scan`] asks for them: the whole file in memory
/// (`&[u8]`), or read from it on demand (`log.rs`), so that an open after a
/// clean close reads a page, not the whole ring.
pub trait RingBytes {
    /// The ring's size: a multiple of [`PAGE`].
    fn size(&self) -> u64;
    /// The bytes from `off` on, `len` of them or up to the ring's end if
    /// fewer are left.
    fn get(&mut self, off: u64, len: usize) -> Result<&[u8], LogError>;
}

impl RingBytes for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn get(&mut self, off: u64, len: usize) -> Result<&[u8], LogError> {
        let at = <[u8]>::get(self, off as usize..).unwrap_or_default();
        Ok(&at[..len.min(at.len())])
    }
}

/// The record at `pos`, if a good one is there: its header, then its
/// payload (a length the header gives, checked against the ring).
fn record_at(ring: &mut impl RingBytes, pos: Position) -> Result<Option<Header>, LogError> {
    let at = ring.get(pos.off, RECORD_HEADER)?;
    if at.len() < RECORD_HEADER || le_u32(at, 0) != RECORD_MAGIC {
        return Ok(None);
    }
    let len = le_u32(at, 20) as u64;
    if RECORD_HEADER as u64 + len > ring.size().saturating_sub(pos.off) {
        return Ok(None);
    }
    Ok(check_record(
        ring.get(pos.off, RECORD_HEADER + len as usize)?,
        pos,
    ))
}

/// Walk `ring` from `from`: every good record in order, and the position
/// after the last one.
pub fn scan(mut ring: impl RingBytes, from: Position) -> Result<(Vec<Record>, Position), LogError> {
    let size = ring.size();
    let mut pos = from;
    let mut out = Vec::new();
    let mut walked = 0u64;
    while walked < size {
        if pos.off >= size {
            pos.off = PAGE;
        }
        let Some(h) = record_at(&mut ring, pos)? else {
            break;
        };
        let taken = record_bytes(h.len);
        walked += taken;
        if h.flags & FLAG_WRAP != 0 {
            // The record it announces starts the ring again; the chain
            // skips the wrap record.
            walked += size - pos.off - taken;
            pos.off = PAGE;
            continue;
        }
        let start = pos.off + RECORD_HEADER as u64;
        let payload = ring.get(start, h.len)?;
        out.push(decode_payload(pos.lsn, payload)?);
        pos = Position {
            off: pos.off + taken,
            lsn: pos.lsn + 1,
            prev: h.crc,
        };
    }
    Ok((out, pos))
}

pub fn encode_header(tail: Position) -> Vec<u8> {
    let mut h = vec![0u8; PAGE as usize];
    h[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&tail.off.to_le_bytes());
    h[16..24].copy_from_slice(&tail.lsn.to_le_bytes());
    h[24..28].copy_from_slice(&tail.prev.to_le_bytes());
    let crc = crate::checksum::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

pub fn decode_header(h: &[u8], size: u64) -> Result<Position, LogError> {
    if h.len() < 32 || le_u32(h, 0) != HEADER_MAGIC {
        return Err(LogError::Header("no header magic".into()));
    }
    if le_u16(h, 4) != VERSION {
        return Err(LogError::Header(format!("version {}", le_u16(h, 4))));
    }
    if crate::checksum::crc32c(&h[..28]) != le_u32(h, 28) {
        return Err(LogError::Header("bad crc".into()));
    }
    let tail = Position {
        off: le_u64(h, 8),
        lsn: le_u64(h, 16),
        prev: le_u32(h, 24),
    };
    if tail.off < PAGE || tail.off > size || tail.off % PAGE != 0 {
        return Err(LogError::Header(format!("tail offset {}", tail.off)));
    }
    Ok(tail)
}
