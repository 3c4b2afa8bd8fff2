//! The checks shared by the messages' validation functions
//! (`Request::validate`): transactions, their ops, staged references,
//! volume and credential names. Each returns the first thing wrong.

use super::msg::StageRef;
use super::msg::VOLUME_NAME_MAX;
use super::{ProtoError, MAX_OPS, MAX_STAGED_REFS};
use crate::store::{Op, Txn, NAME_MAX};

/// What every transaction must be: a nonzero id at or above its low-water
/// mark, 1 to [`MAX_OPS`] ops, each valid.
pub(super) fn validate_txn(txn_id: u64, low_water: u64, txn: &Txn) -> Result<(), ProtoError> {
    if txn_id == 0 || low_water > txn_id {
        return Err(ProtoError::Invalid(
            "transaction id 0 or low-water mark above it",
        ));
    }
    if txn.ops.is_empty() || txn.ops.len() > MAX_OPS {
        return Err(ProtoError::Invalid("transaction with no ops or too many"));
    }
    txn.ops.iter().try_for_each(validate_op)
}

fn validate_op(op: &Op) -> Result<(), ProtoError> {
    let name_ok = |n: &[u8]| {
        !n.is_empty()
            && n.len() <= NAME_MAX
            && !n.contains(&b'/')
            && !n.contains(&0)
            && n != b"."
            && n != b".."
    };
    match op {
        Op::PutDirent { dirent, .. } if !name_ok(&dirent.name) => {
            Err(ProtoError::Invalid("bad entry name in op"))
        }
        Op::RemoveDirent { name, .. } if !name_ok(name) => {
            Err(ProtoError::Invalid("bad entry name in op"))
        }
        Op::Write { offset, data, .. }
            if offset
                .checked_add(data.len() as u64)
                .is_none_or(|e| e > i64::MAX as u64) =>
        {
            Err(ProtoError::Invalid("write beyond the largest file offset"))
        }
        Op::PutInode(i) if i.perm & !0o7777 != 0 || i.size > i64::MAX as u64 => {
            Err(ProtoError::Invalid("bad inode attributes"))
        }
        Op::SetXattr { name, .. } | Op::RemoveXattr { name, .. } if name.is_empty() => {
            Err(ProtoError::Invalid("empty xattr name"))
        }
        _ => Ok(()),
    }
}

/// Volume names become object-store path segments: keep them plain.
pub fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= VOLUME_NAME_MAX
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The references of a staged transaction: 1 to [`MAX_STAGED_REFS`], each
/// to a write of `txn`, no stage twice.
pub(super) fn validate_refs(txn: &Txn, staged: &[StageRef]) -> Result<(), ProtoError> {
    if staged.is_empty() || staged.len() > MAX_STAGED_REFS {
        return Err(ProtoError::Invalid(
            "staged transaction with no stages or too many",
        ));
    }
    let mut ids = std::collections::HashSet::with_capacity(staged.len());
    for r in staged {
        let is_write = matches!(txn.ops.get(r.op as usize), Some(Op::Write { .. }));
        if !is_write || !ids.insert(r.stage_id) {
            return Err(ProtoError::Invalid(
                "stage reference to no write, or a stage referenced twice",
            ));
        }
    }
    Ok(())
}
