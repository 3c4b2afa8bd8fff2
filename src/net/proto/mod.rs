//! The wire protocol between the daemon and `pohmelfs store` (see
//! `docs/protocol.md`): frames with a fixed 24-byte header (magic, version,
//! opcode, flags, request id, payload length, crc32c over header and
//! payload), a versioned handshake with mutual HMAC authentication, and the
//! store operations as messages.
//!
//! Everything received is hostile until checked: the header is validated
//! before the payload is read, the payload length is capped before anything
//! is allocated, the checksum is verified before the payload is decoded, and
//! every decoded message goes through its validation function. A bad frame
//! is an error value, never a panic.

pub mod auth;
pub mod code;
pub mod codec;
pub mod msg;
mod response;
pub mod stage;
mod validate;

use thiserror::Error;

use super::buffers;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// "POHM", little endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"POHM");
/// The protocol version this build speaks. Version 2 added TLS, named
/// credentials and server-issued sessions to the handshake; version 3 the
/// writer claim (`Request::Claim`), which a server requires before any
/// write, so a version-2 client is refused at its Hello; version 4 staged
/// write data (`Request::Stage`, `Request::StagedTxn`).
pub const VERSION: u8 = 4;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// The largest payload either side accepts: a transaction of up to 8 MiB of
/// data plus its metadata.
pub const MAX_PAYLOAD: u32 = (8 << 20) + (256 << 10);
/// The largest payload of a handshake frame (Hello, Auth and their answers
/// are a few hundred bytes); a server checks it before reading the payload
/// of a peer that has not authenticated.
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 4096;
/// The most ops one transaction may carry.
pub const MAX_OPS: usize = 65_536;
/// The most bytes one read request may ask for.
pub const MAX_READ: u32 = 4 << 20;
/// The most entries one readdir request may ask for.
pub const MAX_READDIR: u32 = 4096;
/// The most ids one reserve request may ask for.
pub const MAX_RESERVE: u64 = 1 << 20;
/// The most data bytes one [`msg::Request::Stage`] carries: what fits a
/// payload beside its three u64 fields and the length.
pub const MAX_STAGE: u32 = 8 << 20;
/// Staged data not yet committed, per connection: bytes at most (the
/// client keeps its own staging below it, so it never meets the bound).
pub const STAGED_BYTES_MAX: u64 = 64 << 20;
/// Staged data not yet committed, per connection: stages at most.
pub const STAGES_MAX: usize = 4096;
/// The most staged writes one [`msg::Request::StagedTxn`] may reference.
pub const MAX_STAGED_REFS: usize = STAGES_MAX;

/// Why a frame or message was refused.
#[derive(Debug, Error)]
pub enum ProtoError {
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:#x}: not a pohmelfs peer")]
    BadMagic(u32),
    #[error("peer speaks protocol version {0}, this build speaks version {VERSION}")]
    BadVersion(u8),
    #[error("payload of {0} bytes exceeds the limit of {1}")]
    TooLarge(u32, u32),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

/// The fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
    pub payload_len: u32,
}

/// One frame: a header and its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
    pub payload: Vec<u8>,
}

/// A header's fields, its checksum left zero.
fn header_fields(
    version: u8,
    opcode: u8,
    flags: u16,
    request_id: u64,
    payload_len: u32,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = version;
    h[5] = opcode;
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    h[16..20].copy_from_slice(&payload_len.to_le_bytes());
    h
}

fn checksum(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut h = *header;
    h[20..24].fill(0);
    crate::checksum::crc32c_append(crate::checksum::crc32c(&h), payload)
}

impl Frame {
    /// The frame as bytes, header first.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(VERSION)
    }

    /// The frame as bytes, stamped with protocol `version`: only for the
    /// answer to a peer of another version, which could not read ours.
    pub fn encode_as(&self, version: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header(version));
        out.extend_from_slice(&self.payload);
        out
    }

    /// The frame's header, checksum included, stamped with `version`.
    fn header(&self, version: u8) -> [u8; HEADER_LEN] {
        let mut h = header_fields(
            version,
            self.opcode,
            self.flags,
            self.request_id,
            self.payload.len() as u32,
        );
        let crc = checksum(&h, &self.payload);
        h[20..24].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Validate a received header (magic, version, length) before its
    /// payload is read.
    pub fn decode_header(h: &[u8; HEADER_LEN], max_payload: u32) -> Result<Header, ProtoError> {
        let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        if h[4] != VERSION {
            return Err(ProtoError::BadVersion(h[4]));
        }
        let payload_len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        if payload_len > max_payload {
            return Err(ProtoError::TooLarge(payload_len, max_payload));
        }
        Ok(Header {
            opcode: h[5],
            flags: u16::from_le_bytes([h[6], h[7]]),
            request_id: u64::from_le_bytes(h[8..16].try_into().unwrap_or_default()),
            payload_len,
        })
    }

    /// Decode a frame from a complete buffer (tests, fuzzing).
    pub fn decode(buf: &[u8], max_payload: u32) -> Result<Frame, ProtoError> {
        let header: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(ProtoError::Malformed("frame shorter than its header"))?;
        let h = Frame::decode_header(header, max_payload)?;
        let payload = &buf[HEADER_LEN..];
        if payload.len() != h.payload_len as usize {
            return Err(ProtoError::Malformed(
                "payload length does not match the header",
            ));
        }
        Frame::check(header, h, payload.to_vec())
    }

    fn check(header: &[u8; HEADER_LEN], h: Header, payload: Vec<u8>) -> Result<Frame, ProtoError> {
        let crc = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
        if crc != checksum(header, &payload) {
            return Err(ProtoError::BadChecksum);
        }
        Ok(Frame {
            opcode: h.opcode,
            flags: h.flags,
            request_id: h.request_id,
            payload,
        })
    }
}

/// Read a frame's header; `None` on a clean end of stream between frames.
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<[u8; HEADER_LEN]>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => Ok(Some(header)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Read one frame. Returns `Ok(None)` on a clean end of stream between
/// frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_payload: u32,
) -> Result<Option<Frame>, ProtoError> {
    let Some(header) = read_header(r).await? else {
        return Ok(None);
    };
    let h = Frame::decode_header(&header, max_payload)?;
    let mut payload = buffers::take(h.payload_len as usize);
    read_payload(r, &mut payload, h.payload_len as usize).await?;
    Frame::check(&header, h, payload).map(Some)
}

/// Read `n` more bytes into `buf`'s spare capacity: a payload of 512 KiB is
/// not zeroed first only to be written over.
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    n: usize,
) -> Result<(), ProtoError> {
    let end = buf.len() + n;
    while buf.len() < end {
        let want = (end - buf.len()) as u64;
        if (&mut *r).take(want).read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(())
}

/// Where a stage's data starts in memory: on a page boundary, so that the
/// server's engine appends it to a segment with `O_DIRECT`
/// (`store/engine/segment.rs`) instead of through the page cache.
pub const STAGE_DATA_ALIGN: usize = 4096;

/// Read one request (a server's side of the stream). As [`read_frame`] and
/// [`msg::Request::from_owned_frame`], except that a stage's payload is
/// read to put its data on a page boundary ([`STAGE_DATA_ALIGN`]).
/// `Ok(None)` on a clean end of stream between frames.
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    max_payload: u32,
) -> Result<Option<(u64, msg::Request)>, ProtoError> {
    let Some(header) = read_header(r).await? else {
        return Ok(None);
    };
    let h = Frame::decode_header(&header, max_payload)?;
    let n = h.payload_len as usize;
    if h.opcode != msg::OP_STAGE || n < msg::STAGE_FIXED {
        let mut payload = buffers::take(n);
        read_payload(r, &mut payload, n).await?;
        let f = Frame::check(&header, h, payload)?;
        return Ok(Some((f.request_id, msg::Request::from_owned_frame(f)?)));
    }
    // Pad the front so that the bytes after the fixed fields land on a
    // boundary; the capacity covers pad and payload, so nothing moves.
    let mut buf = buffers::take(n + STAGE_DATA_ALIGN);
    let pad = (STAGE_DATA_ALIGN - (buf.as_ptr() as usize + msg::STAGE_FIXED) % STAGE_DATA_ALIGN)
        % STAGE_DATA_ALIGN;
    buf.resize(pad, 0);
    read_payload(r, &mut buf, n).await?;
    let payload = buffers::into_bytes(buf).slice(pad..);
    let crc = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
    if crc != checksum(&header, &payload) {
        return Err(ProtoError::BadChecksum);
    }
    let req = msg::Request::Stage(stage::stage_from_payload(payload)?);
    req.validate()?;
    Ok(Some((h.request_id, req)))
}

/// Write a [`msg::Request::Stage`] frame without copying its data: the
/// header and the fixed fields from one small buffer, then the data's
/// parts as they are, with vectored writes (`write_vectored`). The bytes
/// on the wire are those of `Request::Stage{..}.to_frame(request_id)`.
pub async fn write_stage<W: AsyncWrite + Unpin>(
    w: &mut W,
    request_id: u64,
    stage: &msg::Stage,
) -> Result<(), ProtoError> {
    let mut head = Vec::with_capacity(HEADER_LEN + msg::STAGE_FIXED);
    let payload_len = msg::STAGE_FIXED + stage.data.len();
    head.extend_from_slice(&header_fields(
        VERSION,
        msg::OP_STAGE,
        0,
        request_id,
        payload_len as u32,
    ));
    stage.encode_fixed(&mut head);
    let mut crc = crate::checksum::crc32c(&head);
    for s in stage.data.slices() {
        crc = crate::checksum::crc32c_append(crc, s);
    }
    head[20..24].copy_from_slice(&crc.to_le_bytes());
    let mut parts: Vec<&[u8]> = Vec::with_capacity(stage.data.parts().len() + 1);
    parts.push(&head);
    parts.extend(stage.data.slices());
    write_all_vectored(w, &parts).await?;
    Ok(())
}

/// Write every byte of `parts`, in order, with as few vectored writes as
/// the stream takes (a write may take only part of them).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    /// The most slices one write is given (below every IOV_MAX).
    const SLICES_MAX: usize = 512;
    let (mut i, mut off) = (0usize, 0usize);
    while i < parts.len() {
        let end = (i + SLICES_MAX).min(parts.len());
        let mut io = Vec::with_capacity(end - i);
        io.push(std::io::IoSlice::new(&parts[i][off..]));
        io.extend(parts[i + 1..end].iter().map(|p| std::io::IoSlice::new(p)));
        let mut n = w.write_vectored(&io).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while i < parts.len() && n >= parts[i].len() - off {
            n -= parts[i].len() - off;
            i += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), ProtoError> {
    // A large payload (read data) goes out from where it is, beside its
    // header; a small one is copied behind the header into one write.
    if frame.payload.len() < VECTORED_FROM {
        w.write_all(&frame.encode()).await?;
    } else {
        let header = frame.header(VERSION);
        write_all_vectored(w, &[&header, &frame.payload]).await?;
    }
    Ok(())
}

/// Payloads from this size on are written without a copy.
const VECTORED_FROM: usize = 16 << 10;

#[cfg(test)]
mod stage_tests;
#[cfg(test)]
mod tests;
