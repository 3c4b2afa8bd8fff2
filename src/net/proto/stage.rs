//! Staged write data (protocol version 4): a [`Stage`] carries a write's
//! bytes ahead of the transaction that makes them visible, and a
//! [`super::msg::Request::StagedTxn`] references stages by id instead of
//! carrying the bytes. This module owns their encoding; validation is in
//! `msg.rs` with every other request's. It never holds stages (the server
//! does, per connection).

use super::codec::{Dec, Enc};
use super::{Frame, ProtoError, MAX_OPS, MAX_STAGE, MAX_STAGED_REFS};
use crate::store::{Op, Txn, WriteData};

/// The opcode of [`super::msg::Request::Stage`].
pub const OP_STAGE: u8 = 17;
/// Payload bytes of a [`Stage`] before its data: stage id, ino, offset
/// and the data's length.
pub const STAGE_FIXED: usize = 28;
/// The op tag of a write whose bytes were staged (in a
/// [`super::msg::Request::StagedTxn`] only).
pub(super) const TAG_STAGED_WRITE: u8 = 11;

/// Write data sent ahead of the transaction that makes it visible
/// (protocol version 4): held by the server for this connection until a
/// [`super::msg::Request::StagedTxn`] references it, or the connection ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    /// Unique among the stages of the connection not yet committed.
    pub stage_id: u64,
    /// Where the bytes go, as in the write that will reference them.
    pub ino: u64,
    pub offset: u64,
    pub data: WriteData,
}

impl Stage {
    /// The fields before the data ([`STAGE_FIXED`] bytes), data length
    /// last.
    pub fn encode_fixed(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.stage_id.to_le_bytes());
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
    }
}

/// In a [`super::msg::Request::StagedTxn`]: the write at op index `op` takes the
/// bytes of stage `stage_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageRef {
    pub op: u32,
    pub stage_id: u64,
}

/// A transaction whose writes at the indices of `staged` carry their
/// stage id (tag 11: ino, offset, stage id) instead of their bytes.
pub(super) fn encode_staged_txn(e: &mut Enc, txn: &Txn, staged: &[StageRef]) {
    let by_op: std::collections::HashMap<u32, u64> =
        staged.iter().map(|r| (r.op, r.stage_id)).collect();
    e.u32(txn.ops.len() as u32);
    for (i, op) in txn.ops.iter().enumerate() {
        match (op, u32::try_from(i).ok().and_then(|i| by_op.get(&i))) {
            (Op::Write { ino, offset, .. }, Some(id)) => {
                e.u8(TAG_STAGED_WRITE).u64(*ino).u64(*offset).u64(*id);
            }
            _ => {
                e.op(op);
            }
        }
    }
}

/// The inverse of [`encode_staged_txn`]: staged writes come back without
/// data, their stage ids in the list.
pub(super) fn decode_staged_txn(d: &mut Dec<'_>) -> Result<(Txn, Vec<StageRef>), ProtoError> {
    // The smallest op is a tag and one u64.
    let n = d.count(9, MAX_OPS)?;
    let mut ops = Vec::with_capacity(n);
    let mut staged = Vec::new();
    for i in 0..n {
        let tag = d.u8()?;
        if tag == TAG_STAGED_WRITE {
            let (ino, offset, stage_id) = (d.u64()?, d.u64()?, d.u64()?);
            if staged.len() >= MAX_STAGED_REFS {
                return Err(ProtoError::Invalid("too many staged writes"));
            }
            staged.push(StageRef {
                op: i as u32,
                stage_id,
            });
            ops.push(Op::Write {
                ino,
                offset,
                data: WriteData::new(),
            });
        } else {
            ops.push(d.op_tagged(tag)?);
        }
    }
    Ok((Txn { ops }, staged))
}

/// The [`Stage`] a frame of opcode [`OP_STAGE`] carries, its data the
/// frame's own buffer (no copy): the fields are checked as
/// [`super::msg::Request::from_frame`] checks them; validation is the
/// caller's.
pub(super) fn stage_from_frame(f: Frame) -> Result<Stage, ProtoError> {
    stage_from_payload(crate::net::buffers::into_bytes(f.payload))
}

/// The [`Stage`] a payload of opcode [`OP_STAGE`] carries, its data a
/// slice of `payload` (no copy).
pub(super) fn stage_from_payload(payload: bytes::Bytes) -> Result<Stage, ProtoError> {
    let mut d = Dec::new(&payload);
    let (stage_id, ino, offset) = (d.u64()?, d.u64()?, d.u64()?);
    let len = d.u32()? as usize;
    if len > MAX_STAGE as usize {
        return Err(ProtoError::Malformed("byte string longer than its limit"));
    }
    if len != d.remaining() {
        return Err(ProtoError::Malformed(if len > d.remaining() {
            "message truncated"
        } else {
            "trailing bytes after message"
        }));
    }
    let data = payload.slice(STAGE_FIXED..);
    Ok(Stage {
        stage_id,
        ino,
        offset,
        data: WriteData::from_parts([data]),
    })
}
