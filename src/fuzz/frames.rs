//! The input format the two wire-protocol targets share: a sequence of
//! items, each either a frame the harness encodes (so its checksum is
//! right and the fuzzer reaches the message decoders) or raw bytes sent as
//! they are (so the frame checks are fuzzed too):
//!
//! ```text
//! kind: u8   bit 7 set: raw bytes; clear: a frame
//! opcode: u8 the frame's opcode (ignored for raw bytes)
//! len: u16, then len bytes (payload, or the raw bytes)
//! ```

use crate::net::proto::Frame;

/// One item of the input.
pub enum Item<'a> {
    /// A frame with this opcode and payload, encoded with a valid header.
    Frame { opcode: u8, payload: &'a [u8] },
    /// Bytes sent as they are.
    Raw(&'a [u8]),
}

impl Item<'_> {
    /// The bytes that go on the wire; `request_id` for a frame.
    pub fn bytes(&self, request_id: u64) -> Vec<u8> {
        match self {
            Item::Frame { opcode, payload } => Frame {
                opcode: *opcode,
                flags: 0,
                request_id,
                payload: payload.to_vec(),
            }
            .encode(),
            Item::Raw(b) => b.to_vec(),
        }
    }
}

/// The items of `data`; an item the input ends in is cut to what is left.
pub fn items(mut data: &[u8]) -> Vec<Item<'_>> {
    let mut out = Vec::new();
    while let [kind, opcode, lo, hi, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (body, tail) = rest.split_at(len);
        out.push(if kind & 0x80 != 0 {
            Item::Raw(body)
        } else {
            Item::Frame {
                opcode: *opcode,
                payload: body,
            }
        });
        data = tail;
    }
    out
}
