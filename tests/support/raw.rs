//! A raw protocol client for the integration tests, for what the real client never does on
//! purpose: hand-built handshakes, resumed sessions of others, bad frames.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pohmelfs::net::proto::auth::{self, Side, Transcript};
use pohmelfs::net::proto::msg::{ErrorCode, Request, Response};
use pohmelfs::net::proto::{Frame, HEADER_LEN, MAX_PAYLOAD, VERSION};

/// A raw protocol client for what the real client never does on purpose.
pub struct Raw {
    pub stream: TcpStream,
    /// The session the server issued or resumed, and its ticket.
    pub session: (u64, [u8; 32]),
}

/// The nonce every hello of [`hello`] carries.
const CLIENT_NONCE: [u8; 32] = [9; 32];

/// The hello of a client of `credential` resuming `session` (or starting
/// one with `(0, _)`) on `volume`.
pub fn hello(credential: &str, session: (u64, [u8; 32]), volume: &str) -> Request {
    Request::Hello {
        version: VERSION,
        credential: credential.into(),
        session: session.0,
        ticket: session.1,
        volume: volume.into(),
        client_nonce: CLIENT_NONCE,
        max_payload: MAX_PAYLOAD,
        max_in_flight: 8,
    }
}

impl Raw {
    /// A new session of the credential `default`.
    pub fn connect(addr: &str, secret: &str, volume: &str) -> Result<Raw, (ErrorCode, String)> {
        Raw::resume(addr, "default", secret, (0, [0; 32]), volume)
    }

    /// Resume `session` of `credential` (with its ticket), or start one with `(0, _)`.
    pub fn resume(
        addr: &str,
        credential: &str,
        secret: &str,
        session: (u64, [u8; 32]),
        volume: &str,
    ) -> Result<Raw, (ErrorCode, String)> {
        let mut raw = Raw::open(addr);
        let hello = hello(credential, session, volume);
        let client_nonce = CLIENT_NONCE;
        // A server over a limit answers the hello with an error (a slot
        // given back only when a closed connection's task ends, say).
        // It may also close at once, and then the hello meets a reset.
        let server_nonce = match raw.try_call(&hello) {
            Some(Response::Challenge { server_nonce }) => server_nonce,
            Some(Response::Error { code, message }) => return Err((code, message)),
            Some(other) => panic!("no challenge: {other:?}"),
            None => {
                let why = "closed without answering the hello".to_owned();
                return Err((ErrorCode::Busy, why));
            }
        };
        let t = Transcript {
            client_nonce: &client_nonce,
            server_nonce: &server_nonce,
            credential,
            volume,
            session: session.0,
            ticket: &session.1,
        };
        match raw.call(&Request::Auth {
            proof: auth::prove(secret.as_bytes(), Side::Client, &t),
        }) {
            Response::Welcome {
                session, ticket, ..
            } => {
                raw.session = (session, ticket);
                Ok(raw)
            }
            Response::Error { code, message } => Err((code, message)),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A connection that has sent nothing yet.
    pub fn open(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Raw {
            stream,
            session: (0, [0; 32]),
        }
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn recv(&mut self) -> Option<Response> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header).ok()?;
        let len = u32::from_le_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut all = header.to_vec();
        all.resize(HEADER_LEN + len, 0);
        self.stream.read_exact(&mut all[HEADER_LEN..]).ok()?;
        Some(Response::from_frame(&Frame::decode(&all, MAX_PAYLOAD).unwrap()).unwrap())
    }

    /// Send `req` and read the answer; `None` when the connection was
    /// closed or reset instead.
    pub fn try_call(&mut self, req: &Request) -> Option<Response> {
        self.stream.write_all(&req.to_frame(1).encode()).ok()?;
        self.recv()
    }

    pub fn call(&mut self, req: &Request) -> Response {
        self.send_bytes(&req.to_frame(1).encode());
        self.recv().expect("answer")
    }
}
