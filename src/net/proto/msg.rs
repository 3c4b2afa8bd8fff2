//! The messages: what a client asks ([`Request`]) and what a server answers
//! ([`Response`], in `response.rs`), their opcodes, encoding, and the one
//! validation function every received message goes through
//! ([`Request::validate`], [`Response::validate`]).

pub use super::code::ErrorCode;
pub use super::response::Response;

use super::codec::{Dec, Enc};
use super::stage::{decode_staged_txn, encode_staged_txn, stage_from_frame};
pub use super::stage::{Stage, StageRef, OP_STAGE, STAGE_FIXED};

/// The opcode of [`Response::Data`].
pub const OP_DATA: u8 = 163;
pub use super::validate::valid_volume_name;
use super::validate::{validate_refs, validate_txn};
use super::{Frame, ProtoError, MAX_READ, MAX_READDIR, MAX_RESERVE, MAX_STAGE};
use crate::store::{Txn, NAME_MAX, XATTR_NAME_MAX};

/// Bytes in a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in an HMAC-SHA256 proof.
pub const PROOF_LEN: usize = 32;
/// Bytes in a session ticket (an HMAC-SHA256).
pub const TICKET_LEN: usize = 32;
/// The longest credential name.
pub const CREDENTIAL_NAME_MAX: usize = 64;
/// The longest volume name.
pub const VOLUME_NAME_MAX: usize = 64;
/// The longest error message carried on the wire.
pub const ERROR_MESSAGE_MAX: usize = 1024;

/// A client's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// First frame of a connection.
    Hello {
        version: u8,
        /// Which of the server's credentials the client proves.
        credential: String,
        /// 0 asks for a new session; otherwise the session to resume, with
        /// the `ticket` the server issued for it.
        session: u64,
        ticket: [u8; TICKET_LEN],
        volume: String,
        client_nonce: [u8; NONCE_LEN],
        /// The largest payload the client accepts.
        max_payload: u32,
        /// Requests the client keeps in flight at most.
        max_in_flight: u32,
    },
    /// The client's proof of the shared secret, answering the challenge.
    Auth {
        proof: [u8; PROOF_LEN],
    },
    /// Apply a transaction once; `low_water` is the client's mark below
    /// which it never resends.
    Txn {
        txn_id: u64,
        low_water: u64,
        txn: Txn,
    },
    GetInode {
        ino: u64,
    },
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    Readdir {
        parent: u64,
        after: u64,
        max: u32,
    },
    Read {
        ino: u64,
        offset: u64,
        len: u32,
    },
    NextData {
        ino: u64,
        offset: u64,
    },
    NextHole {
        ino: u64,
        offset: u64,
    },
    Readlink {
        ino: u64,
    },
    GetXattr {
        ino: u64,
        name: Vec<u8>,
    },
    ListXattr {
        ino: u64,
    },
    Statfs,
    ReserveIds {
        count: u64,
    },
    /// Remove the inodes unlinked while open before a crash (the orphan
    /// marks), except `spare`: the daemon that sends it is the volume's
    /// only writer, and `spare` are the unlinked inodes the guest session
    /// it took over (a live migration) still holds.
    ReclaimOrphans {
        spare: Vec<u64>,
    },
    /// Make this session the volume's one writer (protocol version 3): the
    /// server keeps the claim durably in the volume and refuses, with
    /// [`ErrorCode::NotWriter`], every write of any other session from now
    /// on, including resends of transactions sent before. A daemon sends
    /// it once, when it opens the volume for writing. Refused with
    /// [`ErrorCode::WriterAlive`] while the session holding the claim is
    /// alive (`docs/protocol.md`, "Writer claim").
    Claim,
    /// Write data ahead of its transaction (protocol version 4), answered
    /// [`Response::Staged`]. A client writes it with
    /// [`super::write_stage`], which copies none of the data.
    Stage(Stage),
    /// As [`Request::Txn`], with the writes that `staged` names taking
    /// their bytes from this connection's stages: on the wire such a
    /// write carries its stage id instead of its bytes; decoded, it is an
    /// [`crate::store::Op::Write`] with no data until the server fills it in. A client
    /// keeps the data in `txn` (for the resend).
    StagedTxn {
        txn_id: u64,
        low_water: u64,
        txn: Txn,
        staged: Vec<StageRef>,
    },
    /// As [`Request::Claim`], even while the claim's session is alive:
    /// `serve --take-over`, for an operator who knows that writer is dead.
    TakeOver,
}

/// The most inodes a [`Request::ReclaimOrphans`] spares (a migrated
/// session's unlinked-open inodes; 512 KiB on the wire).
pub const MAX_SPARE: usize = 1 << 16;

impl Request {
    fn opcode(&self) -> u8 {
        match self {
            Request::Hello { .. } => 1,
            Request::Auth { .. } => 2,
            Request::Txn { .. } => 16,
            Request::GetInode { .. } => 32,
            Request::Lookup { .. } => 33,
            Request::Readdir { .. } => 34,
            Request::Read { .. } => 35,
            Request::NextData { .. } => 36,
            Request::NextHole { .. } => 37,
            Request::Readlink { .. } => 38,
            Request::GetXattr { .. } => 39,
            Request::ListXattr { .. } => 40,
            Request::Statfs => 41,
            Request::ReserveIds { .. } => 42,
            Request::ReclaimOrphans { .. } => 43,
            Request::Claim => 44,
            Request::Stage(_) => OP_STAGE,
            Request::StagedTxn { .. } => 18,
            Request::TakeOver => 45,
        }
    }

    /// True for requests that change the volume.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Txn { .. }
                | Request::StagedTxn { .. }
                | Request::Stage(_)
                | Request::ReserveIds { .. }
                | Request::ReclaimOrphans { .. }
                | Request::Claim
                | Request::TakeOver
        )
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        let mut e = Enc::default();
        match self {
            Request::Hello {
                version,
                credential,
                session,
                ticket,
                volume,
                client_nonce,
                max_payload,
                max_in_flight,
            } => {
                e.u8(*version)
                    .bytes(credential.as_bytes())
                    .u64(*session)
                    .fixed(ticket)
                    .bytes(volume.as_bytes())
                    .fixed(client_nonce)
                    .u32(*max_payload)
                    .u32(*max_in_flight);
            }
            Request::Auth { proof } => {
                e.fixed(proof);
            }
            Request::Txn {
                txn_id,
                low_water,
                txn,
            } => {
                e.u64(*txn_id).u64(*low_water).txn(txn);
            }
            Request::Stage(stage) => {
                stage.encode_fixed(&mut e.buf);
                for s in stage.data.slices() {
                    e.fixed(s);
                }
            }
            Request::StagedTxn {
                txn_id,
                low_water,
                txn,
                staged,
            } => {
                e.u64(*txn_id).u64(*low_water);
                encode_staged_txn(&mut e, txn, staged);
            }
            Request::GetInode { ino } | Request::Readlink { ino } | Request::ListXattr { ino } => {
                e.u64(*ino);
            }
            Request::Lookup { parent, name } => {
                e.u64(*parent).bytes(name);
            }
            Request::Readdir { parent, after, max } => {
                e.u64(*parent).u64(*after).u32(*max);
            }
            Request::Read { ino, offset, len } => {
                e.u64(*ino).u64(*offset).u32(*len);
            }
            Request::NextData { ino, offset } | Request::NextHole { ino, offset } => {
                e.u64(*ino).u64(*offset);
            }
            Request::GetXattr { ino, name } => {
                e.u64(*ino).bytes(name);
            }
            Request::Statfs | Request::Claim | Request::TakeOver => {}
            Request::ReserveIds { count } => {
                e.u64(*count);
            }
            Request::ReclaimOrphans { spare } => {
                // Bounded by MAX_SPARE (validated), so the count fits.
                e.u32(u32::try_from(spare.len()).unwrap_or(u32::MAX));
                for ino in spare {
                    e.u64(*ino);
                }
            }
        }
        Frame {
            opcode: self.opcode(),
            flags: 0,
            request_id,
            payload: e.buf,
        }
    }

    /// As [`Request::from_frame`], taking the frame: a stage's data then
    /// stays in the frame's buffer, not copied (`stage::stage_from_frame`).
    pub fn from_owned_frame(f: Frame) -> Result<Request, ProtoError> {
        let r = match f.opcode {
            OP_STAGE => Request::Stage(stage_from_frame(f)?),
            _ => {
                // Decoding copied what it keeps: the buffer goes back.
                let r = Request::from_frame(&f);
                crate::net::buffers::give(f.payload);
                return r;
            }
        };
        r.validate()?;
        Ok(r)
    }

    /// Decode and validate a request frame.
    pub fn from_frame(f: &Frame) -> Result<Request, ProtoError> {
        let mut d = Dec::new(&f.payload);
        let r = match f.opcode {
            1 => Request::Hello {
                version: d.u8()?,
                credential: String::from_utf8(d.bytes(CREDENTIAL_NAME_MAX)?)
                    .map_err(|_| ProtoError::Malformed("credential name is not UTF-8"))?,
                session: d.u64()?,
                ticket: d.fixed()?,
                volume: String::from_utf8(d.bytes(VOLUME_NAME_MAX)?)
                    .map_err(|_| ProtoError::Malformed("volume name is not UTF-8"))?,
                client_nonce: d.fixed()?,
                max_payload: d.u32()?,
                max_in_flight: d.u32()?,
            },
            2 => Request::Auth { proof: d.fixed()? },
            16 => Request::Txn {
                txn_id: d.u64()?,
                low_water: d.u64()?,
                txn: d.txn()?,
            },
            32 => Request::GetInode { ino: d.u64()? },
            33 => Request::Lookup {
                parent: d.u64()?,
                name: d.bytes(NAME_MAX)?,
            },
            34 => Request::Readdir {
                parent: d.u64()?,
                after: d.u64()?,
                max: d.u32()?,
            },
            35 => Request::Read {
                ino: d.u64()?,
                offset: d.u64()?,
                len: d.u32()?,
            },
            36 => Request::NextData {
                ino: d.u64()?,
                offset: d.u64()?,
            },
            37 => Request::NextHole {
                ino: d.u64()?,
                offset: d.u64()?,
            },
            38 => Request::Readlink { ino: d.u64()? },
            39 => Request::GetXattr {
                ino: d.u64()?,
                name: d.bytes(XATTR_NAME_MAX)?,
            },
            40 => Request::ListXattr { ino: d.u64()? },
            41 => Request::Statfs,
            42 => Request::ReserveIds { count: d.u64()? },
            43 => {
                let n = d.u32()? as usize;
                // Checked against what is left before anything is allocated.
                if n > MAX_SPARE || n.saturating_mul(8) > d.remaining() {
                    return Err(ProtoError::Invalid("spare count out of range"));
                }
                let spare = (0..n).map(|_| d.u64()).collect::<Result<_, _>>()?;
                Request::ReclaimOrphans { spare }
            }
            44 => Request::Claim,
            OP_STAGE => Request::Stage(Stage {
                stage_id: d.u64()?,
                ino: d.u64()?,
                offset: d.u64()?,
                data: d.bytes(MAX_STAGE as usize)?.into(),
            }),
            18 => {
                let (txn_id, low_water) = (d.u64()?, d.u64()?);
                let (txn, staged) = decode_staged_txn(&mut d)?;
                Request::StagedTxn {
                    txn_id,
                    low_water,
                    txn,
                    staged,
                }
            }
            45 => Request::TakeOver,
            op => return Err(ProtoError::UnknownOpcode(op)),
        };
        d.finish()?;
        r.validate()?;
        Ok(r)
    }

    /// The one validation function for requests: every bound a server
    /// relies on is checked here, on receive.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Request::Hello {
                credential,
                volume,
                max_payload,
                max_in_flight,
                ..
            } => {
                if !valid_volume_name(credential) {
                    return Err(ProtoError::Invalid(
                        "credential name must be 1-64 of [A-Za-z0-9._-], not starting with '.'",
                    ));
                }
                if !valid_volume_name(volume) {
                    return Err(ProtoError::Invalid(
                        "volume name must be 1-64 of [A-Za-z0-9._-], not starting with '.'",
                    ));
                }
                if *max_payload < 64 << 10 || *max_in_flight == 0 {
                    return Err(ProtoError::Invalid("client limits too small"));
                }
            }
            Request::Txn {
                txn_id,
                low_water,
                txn,
            } => validate_txn(*txn_id, *low_water, txn)?,
            Request::StagedTxn {
                txn_id,
                low_water,
                txn,
                staged,
            } => {
                validate_txn(*txn_id, *low_water, txn)?;
                validate_refs(txn, staged)?;
            }
            Request::Stage(Stage { offset, data, .. })
                if data.is_empty()
                    || offset
                        .checked_add(data.len() as u64)
                        .is_none_or(|e| e > i64::MAX as u64) =>
            {
                return Err(ProtoError::Invalid(
                    "empty stage or beyond the largest file offset",
                ));
            }
            Request::Lookup { name, .. }
                if name.is_empty() || name.contains(&b'/') || name.contains(&0) =>
            {
                return Err(ProtoError::Invalid("bad entry name"));
            }
            Request::Readdir { max, .. } if *max == 0 || *max > MAX_READDIR => {
                return Err(ProtoError::Invalid("readdir count out of range"));
            }
            Request::Read { offset, len, .. }
                if *len > MAX_READ || offset.checked_add(u64::from(*len)).is_none() =>
            {
                return Err(ProtoError::Invalid("read length or range out of range"));
            }
            Request::ReserveIds { count } if *count == 0 || *count > MAX_RESERVE => {
                return Err(ProtoError::Invalid("reserve count out of range"));
            }
            Request::ReclaimOrphans { spare } if spare.len() > MAX_SPARE => {
                return Err(ProtoError::Invalid("spare count out of range"));
            }
            _ => {}
        }
        Ok(())
    }
}
