//! The error codes of `Error` answers (`docs/protocol.md`, "Requests and
//! answers"): what a client branches on. A code says what to do next
//! (fail, go elsewhere, stage again), the message says why.

/// Error codes carried by [`super::msg::Response::Error`]; clients branch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request could not be decoded or is invalid.
    BadRequest = 1,
    /// Authentication failed.
    AuthFailed = 2,
    /// The volume name is not valid or cannot be opened.
    NoSuchVolume = 3,
    /// Another server took the volume over: go elsewhere.
    Fenced = 4,
    /// The volume is full.
    NoSpace = 5,
    /// The store's medium failed.
    Io = 6,
    /// Stored data is corrupt.
    Corrupt = 7,
    /// The server is at its connection or request limit.
    Busy = 8,
    /// The server is shutting down.
    ShuttingDown = 9,
    /// Protocol versions do not match.
    Version = 10,
    /// Another session claimed the volume for writing ([`super::msg::Request::Claim`]):
    /// this one may never write to it again. Final: not a reason to go to
    /// another server.
    NotWriter = 11,
    /// A [`super::msg::Request::Claim`] refused: the session that holds the
    /// claim is alive (connected and heard from within the server's writer
    /// lease). The message names it; [`super::msg::Request::TakeOver`]
    /// claims anyway.
    WriterAlive = 12,
    /// A [`super::msg::Request::Claim`] refused for a while: the server
    /// just opened the volume and gives the session holding the claim a
    /// writer lease to reconnect. The client asks again.
    WriterAway = 13,
    /// A [`super::msg::Request::StagedTxn`] references a stage this connection does
    /// not hold (never staged, refused, or lost with a connection or a
    /// server): nothing was applied; stage the data again and resend.
    Unstaged = 14,
}

impl ErrorCode {
    pub(super) fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => BadRequest,
            2 => AuthFailed,
            3 => NoSuchVolume,
            4 => Fenced,
            5 => NoSpace,
            6 => Io,
            7 => Corrupt,
            8 => Busy,
            9 => ShuttingDown,
            10 => Version,
            11 => NotWriter,
            12 => WriterAlive,
            13 => WriterAway,
            14 => Unstaged,
            _ => return None,
        })
    }
}
