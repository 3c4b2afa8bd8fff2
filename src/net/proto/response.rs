//! A server's answers ([`Response`]): their opcodes, encoding, and the
//! validation every received answer goes through ([`Response::validate`]).
//! The requests are `msg.rs`.

use bytes::Bytes;

use super::codec::{Dec, Enc};
use super::msg::{ErrorCode, ERROR_MESSAGE_MAX, NONCE_LEN, OP_DATA, PROOF_LEN, TICKET_LEN};
use super::{Frame, ProtoError, MAX_PAYLOAD, MAX_READ, MAX_READDIR};
use crate::store::{Dirent, Inode, StoreStats, XATTR_NAME_MAX};

/// A server's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Challenge {
        server_nonce: [u8; NONCE_LEN],
    },
    /// The handshake succeeded.
    Welcome {
        /// The server's proof of the same secret (mutual authentication).
        proof: [u8; PROOF_LEN],
        /// The session this connection's transactions belong to (issued
        /// now, or the one resumed) and the ticket that resumes it.
        session: u64,
        ticket: [u8; TICKET_LEN],
        /// The volume's durability epoch.
        epoch: u64,
        max_payload: u32,
        max_in_flight: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The transaction is durable (or was applied before: `duplicate`).
    TxnAck {
        txn_id: u64,
        duplicate: bool,
        epoch: u64,
    },
    Inode(Option<Inode>),
    Dirent(Option<Dirent>),
    Dirents(Vec<Dirent>),
    Data(Bytes),
    Offset(Option<u64>),
    Bytes(Option<Vec<u8>>),
    Names(Vec<Vec<u8>>),
    Stats(StoreStats),
    Ids {
        first: u64,
    },
    /// Answers [`Request::ReclaimOrphans`](super::msg::Request::ReclaimOrphans): how many inodes went.
    Removed {
        count: u64,
    },
    /// Answers [`Request::Claim`](super::msg::Request::Claim): the claim's number, one more than the
    /// volume's claim before.
    Claimed {
        claim: u64,
    },
    /// Answers [`Request::Stage`](super::msg::Request::Stage): the server holds the data.
    Staged {
        stage_id: u64,
    },
}

impl Response {
    fn opcode(&self) -> u8 {
        match self {
            Response::Challenge { .. } => 128,
            Response::Welcome { .. } => 129,
            Response::Error { .. } => 130,
            Response::TxnAck { .. } => 144,
            Response::Inode(_) => 160,
            Response::Dirent(_) => 161,
            Response::Dirents(_) => 162,
            Response::Data(_) => OP_DATA,
            Response::Offset(_) => 164,
            Response::Bytes(_) => 165,
            Response::Names(_) => 166,
            Response::Stats(_) => 167,
            Response::Ids { .. } => 168,
            Response::Removed { .. } => 169,
            Response::Claimed { .. } => 170,
            Response::Staged { .. } => 145,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        let mut message: String = message.into();
        if message.len() > ERROR_MESSAGE_MAX {
            let mut cut = ERROR_MESSAGE_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Error { code, message }
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        let mut e = Enc::default();
        match self {
            Response::Challenge { server_nonce } => {
                e.fixed(server_nonce);
            }
            Response::Welcome {
                proof,
                session,
                ticket,
                epoch,
                max_payload,
                max_in_flight,
            } => {
                e.fixed(proof)
                    .u64(*session)
                    .fixed(ticket)
                    .u64(*epoch)
                    .u32(*max_payload)
                    .u32(*max_in_flight);
            }
            Response::Error { code, message } => {
                e.u16(*code as u16).bytes(message.as_bytes());
            }
            Response::TxnAck {
                txn_id,
                duplicate,
                epoch,
            } => {
                e.u64(*txn_id).bool(*duplicate).u64(*epoch);
            }
            Response::Inode(i) => {
                e.opt(i.as_ref(), |e, i| {
                    e.inode(i);
                });
            }
            Response::Dirent(d) => {
                e.opt(d.as_ref(), |e, d| {
                    e.dirent(d);
                });
            }
            Response::Dirents(ds) => {
                e.u32(ds.len() as u32);
                for d in ds {
                    e.dirent(d);
                }
            }
            Response::Data(b) => {
                e.bytes(b);
            }
            Response::Offset(o) => {
                e.opt(o.as_ref(), |e, o| {
                    e.u64(*o);
                });
            }
            Response::Bytes(b) => {
                e.opt(b.as_ref(), |e, b| {
                    e.bytes(b);
                });
            }
            Response::Names(ns) => {
                e.u32(ns.len() as u32);
                for n in ns {
                    e.bytes(n);
                }
            }
            Response::Stats(s) => {
                e.stats(s);
            }
            Response::Ids { first }
            | Response::Removed { count: first }
            | Response::Claimed { claim: first }
            | Response::Staged { stage_id: first } => {
                e.u64(*first);
            }
        }
        Frame {
            opcode: self.opcode(),
            flags: 0,
            request_id,
            payload: e.buf,
        }
    }

    /// Decode and validate a response frame, keeping its payload: the
    /// bytes of a [`Response::Data`] are the frame's own, not a copy.
    pub fn from_owned_frame(f: Frame) -> Result<Response, ProtoError> {
        if f.opcode != OP_DATA {
            let r = Response::from_frame(&f);
            crate::net::buffers::give(f.payload);
            return r;
        }
        let mut d = Dec::new(&f.payload);
        let len = d.bytes_ref(MAX_READ as usize)?.len();
        d.finish()?;
        // The byte string follows its u32 length.
        Ok(Response::Data(
            crate::net::buffers::into_bytes(f.payload).slice(4..4 + len),
        ))
    }

    /// Decode and validate a response frame.
    pub fn from_frame(f: &Frame) -> Result<Response, ProtoError> {
        let mut d = Dec::new(&f.payload);
        let r = match f.opcode {
            128 => Response::Challenge {
                server_nonce: d.fixed()?,
            },
            129 => Response::Welcome {
                proof: d.fixed()?,
                session: d.u64()?,
                ticket: d.fixed()?,
                epoch: d.u64()?,
                max_payload: d.u32()?,
                max_in_flight: d.u32()?,
            },
            130 => {
                let code = ErrorCode::from_u16(d.u16()?)
                    .ok_or(ProtoError::Malformed("unknown error code"))?;
                let message = String::from_utf8_lossy(&d.bytes(ERROR_MESSAGE_MAX)?).into_owned();
                Response::Error { code, message }
            }
            144 => Response::TxnAck {
                txn_id: d.u64()?,
                duplicate: d.bool()?,
                epoch: d.u64()?,
            },
            160 => Response::Inode(d.opt(|d| d.inode())?),
            161 => Response::Dirent(d.opt(|d| d.dirent())?),
            162 => {
                // The smallest entry: empty name length, ino, kind, cookie.
                let n = d.count(21, MAX_READDIR as usize)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(d.dirent()?);
                }
                Response::Dirents(v)
            }
            OP_DATA => Response::Data(Bytes::copy_from_slice(d.bytes_ref(MAX_READ as usize)?)),
            164 => Response::Offset(d.opt(|d| d.u64())?),
            165 => Response::Bytes(d.opt(|d| d.bytes(MAX_PAYLOAD as usize))?),
            166 => {
                let n = d.count(4, MAX_PAYLOAD as usize / 4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(d.bytes(XATTR_NAME_MAX)?);
                }
                Response::Names(v)
            }
            167 => Response::Stats(d.stats()?),
            168 => Response::Ids { first: d.u64()? },
            169 => Response::Removed { count: d.u64()? },
            170 => Response::Claimed { claim: d.u64()? },
            145 => Response::Staged { stage_id: d.u64()? },
            op => return Err(ProtoError::UnknownOpcode(op)),
        };
        d.finish()?;
        r.validate()?;
        Ok(r)
    }

    /// The one validation function for responses.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Response::Welcome {
                max_payload,
                max_in_flight,
                ..
            } if *max_payload < 64 << 10 || *max_in_flight == 0 => {
                Err(ProtoError::Invalid("server limits too small"))
            }
            Response::Welcome { session: 0, .. } => Err(ProtoError::Invalid("session 0 issued")),
            Response::TxnAck { txn_id: 0, .. } => Err(ProtoError::Invalid("ack for transaction 0")),
            Response::Claimed { claim: 0 } => Err(ProtoError::Invalid("claim 0 granted")),
            Response::Ids { first } if *first < crate::store::FIRST_FREE_ID => {
                Err(ProtoError::Invalid("reserved id range"))
            }
            _ => Ok(()),
        }
    }
}
