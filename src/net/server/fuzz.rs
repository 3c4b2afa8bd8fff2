//! The harness of the `handshake` fuzz target: a store server's handshake
//! (`super::handshake`) over an in-memory connection, on a `mem:` volume,
//! with a client that sends what the input says (`crate::fuzz::frames`),
//! then the requests after it through the server's request handler.
//!
//! The input's first byte decides whether the client answers the server's
//! challenge with the right proof (bit 0; a fuzzer cannot forge an HMAC)
//! and after how many items it does (bits 1-3, at least 1: the first item
//! must be the hello); everything after the
//! handshake is served as the server serves an authenticated peer.
//! What it checks: nothing panics and the handshake ends.
//!
//! `run` counts the requests answered without an error, for the test of
//! the seeds (`crate::fuzz::seeds`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf};
use tokio::sync::Semaphore;

use super::handshake::handshake as serve_handshake;
use super::staging::{Staging, Step};
use super::{handle, staged_bytes_semaphore, ServerConfig, Shared, Volumes};
use crate::fuzz::frames::{items, Item};
use crate::net::credentials::{Credentials, Secret};
use crate::net::proto::auth::{self, Side, Transcript};
use crate::net::proto::msg::{Request, Response};
use crate::net::proto::{read_frame, Frame, MAX_PAYLOAD};

const SECRET: &[u8] = b"fuzzing secret";

/// Run one connection's handshake and requests as `data` says.
pub fn handshake(data: &[u8]) {
    run(data);
}

/// How many requests the server answered after the handshake; `None` when
/// the handshake failed.
fn run(data: &[u8]) -> Option<usize> {
    let (&ctl, data) = data.split_first()?;
    let rt = tokio::runtime::Builder::new_current_thread().build().ok()?;
    let items = items(data);
    let answer_after = usize::from(ctl >> 1 & 7);
    let mut cfg = ServerConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), "mem:");
    cfg.credentials = Credentials::single(Secret::new(SECRET.to_vec()));
    cfg.max_connections = 1;
    cfg.max_in_flight = 4;
    let shared = Shared {
        volumes: Arc::new(Volumes::new(
            cfg.data_url.clone(),
            1,
            true,
            cfg.writer_lease,
        )),
        connections: Arc::new(Semaphore::new(cfg.max_connections)),
        requests: Arc::new(Semaphore::new(cfg.max_in_flight as usize)),
        staged_bytes: staged_bytes_semaphore(cfg.max_staged_bytes),
        cfg,
    };
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let server = async move {
            let (mut rd, mut wr) = tokio::io::split(server);
            let session = serve_handshake(&mut rd, &mut wr, &shared).await.ok()?;
            // What serve_connection does with each request after the
            // handshake, in order.
            let mut answered = 0;
            let mut staging = Staging::new(Arc::clone(&shared.staged_bytes));
            while let Ok(Some(f)) = read_frame(&mut rd, MAX_PAYLOAD).await {
                if let Ok(req) = Request::from_frame(&f) {
                    let answer =
                        match staging.step(req, || session.volume.is_writer(session.stored)) {
                            Step::Serve(req) => handle(&session.volume, session.stored, req),
                            Step::Answer(answer) => answer,
                        };
                    if !matches!(answer, Response::Error { .. }) {
                        answered += 1;
                    }
                }
            }
            Some(answered)
        };
        // The server answers a hello that comes first (and only then: after
        // other bytes it may wait for more of them, and the client for its
        // answer).
        let hello = match items.first() {
            Some(first @ Item::Frame { .. }) => Frame::decode(&first.bytes(0), MAX_PAYLOAD)
                .ok()
                .and_then(|f| Request::from_frame(&f).ok()),
            _ => None,
        };
        let client = async move {
            let (mut rd, mut wr) = tokio::io::split(client);
            for (i, item) in items.iter().enumerate() {
                if i == answer_after.max(1) && ctl & 1 != 0 {
                    if let Some(proof) = answer(&mut rd, hello.as_ref()).await {
                        let auth = Request::Auth { proof }.to_frame(i as u64);
                        if wr.write_all(&auth.encode()).await.is_err() {
                            return;
                        }
                    }
                }
                if wr.write_all(&item.bytes(i as u64)).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
            // Read what the server still sends until it closes, as a client
            // does: closing early would fail the server's writes instead.
            let _ = tokio::io::copy(&mut rd, &mut tokio::io::sink()).await;
        };
        tokio::join!(server, client).0
    })
}

/// The right proof for the server's challenge to the hello the client sent
/// first, when there was one.
async fn answer(rd: &mut ReadHalf<DuplexStream>, hello: Option<&Request>) -> Option<[u8; 32]> {
    let Some(Request::Hello {
        credential,
        session,
        ticket,
        volume,
        client_nonce,
        ..
    }) = hello
    else {
        return None;
    };
    let f = read_frame(rd, MAX_PAYLOAD).await.ok()??;
    let Ok(Response::Challenge { server_nonce }) = Response::from_frame(&f) else {
        return None;
    };
    let t = Transcript {
        client_nonce,
        server_nonce: &server_nonce,
        credential,
        volume,
        session: *session,
        ticket,
    };
    Some(auth::prove(SECRET, Side::Client, &t))
}

#[cfg(test)]
mod tests {
    use super::run;
    use crate::fuzz::seeds;

    #[test]
    fn the_seeds_pass_the_handshake_only_with_the_answer() {
        let seeds = seeds("handshake").unwrap();
        // A hello answered with the right proof, then eleven requests,
        // each answered.
        assert_eq!(run(&seeds[0]), Some(11));
        // The same hello, unanswered: the server waits for the proof
        // until the client closes.
        assert_eq!(run(&seeds[1]), None);
    }
}
