//! Mutual authentication by a shared secret: each side proves it knows the
//! secret of the client's credential with an HMAC-SHA256 over both nonces,
//! the credential, the volume and the session, so a proof cannot be
//! replayed on another connection, credential, session or volume. The
//! secret never crosses the wire. A server without credentials (loopback
//! only) uses the empty key: the handshake is the same.
//!
//! Sessions are issued by the server. The ticket that resumes one is an
//! HMAC under the credential's secret over the credential, the volume and
//! the session, and the session id the volume stores (`stored_session`)
//! is derived from the credential and the session: a client can reach only
//! the exactly-once records of sessions of its own credential.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::msg::{NONCE_LEN, PROOF_LEN, TICKET_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Which side a proof speaks for; the two proofs differ so a server's proof
/// cannot be reflected back as a client's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Everything a proof binds. The client's proof carries the session and
/// ticket it asked for, the server's the ones it issued.
pub struct Transcript<'a> {
    pub client_nonce: &'a [u8; NONCE_LEN],
    pub server_nonce: &'a [u8; NONCE_LEN],
    pub credential: &'a str,
    pub volume: &'a str,
    pub session: u64,
    pub ticket: &'a [u8; TICKET_LEN],
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

/// Names go in with their length, so ("a", "bc") and ("ab", "c") differ.
fn update_str(m: &mut HmacSha256, s: &str) {
    m.update(&(s.len() as u32).to_le_bytes());
    m.update(s.as_bytes());
}

fn mac(secret: &[u8], side: Side, t: &Transcript<'_>) -> HmacSha256 {
    let mut m = keyed(secret);
    m.update(match side {
        Side::Client => b"pohmelfs-v2 client proof",
        Side::Server => b"pohmelfs-v2 server proof",
    });
    m.update(t.client_nonce);
    m.update(t.server_nonce);
    update_str(&mut m, t.credential);
    update_str(&mut m, t.volume);
    m.update(&t.session.to_le_bytes());
    m.update(t.ticket);
    m
}

/// The proof `side` sends.
pub fn prove(secret: &[u8], side: Side, t: &Transcript<'_>) -> [u8; PROOF_LEN] {
    mac(secret, side, t).finalize().into_bytes().into()
}

/// Check a proof from `side`, in constant time.
pub fn verify(secret: &[u8], side: Side, t: &Transcript<'_>, proof: &[u8; PROOF_LEN]) -> bool {
    mac(secret, side, t).verify_slice(proof).is_ok()
}

/// The ticket that resumes `session` of `credential` on `volume`.
pub fn ticket(secret: &[u8], credential: &str, volume: &str, session: u64) -> [u8; TICKET_LEN] {
    let mut m = keyed(secret);
    m.update(b"pohmelfs-v2 session ticket");
    update_str(&mut m, credential);
    update_str(&mut m, volume);
    m.update(&session.to_le_bytes());
    m.finalize().into_bytes().into()
}

/// Check a ticket, in constant time.
pub fn ticket_valid(
    secret: &[u8],
    credential: &str,
    volume: &str,
    session: u64,
    ticket: &[u8; TICKET_LEN],
) -> bool {
    let mut m = keyed(secret);
    m.update(b"pohmelfs-v2 session ticket");
    update_str(&mut m, credential);
    update_str(&mut m, volume);
    m.update(&session.to_le_bytes());
    m.verify_slice(ticket).is_ok()
}

/// The session id under which the volume keeps the exactly-once records
/// of `session` of `credential`: no two credentials share one (but for a
/// 2^-64 collision).
pub fn stored_session(credential: &str, session: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(b"pohmelfs-v2 stored session");
    h.update((credential.len() as u32).to_le_bytes());
    h.update(credential.as_bytes());
    h.update(session.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// A fresh session id: random, never 0.
pub fn new_session() -> std::io::Result<u64> {
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
        let s = u64::from_le_bytes(b);
        if s != 0 {
            return Ok(s);
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_side_and_transcript() {
        let (c, s) = ([1u8; 32], [2u8; 32]);
        let t = Transcript {
            client_nonce: &c,
            server_nonce: &s,
            credential: "alice",
            volume: "vol",
            session: 7,
            ticket: &[0; TICKET_LEN],
        };
        let p = prove(b"secret", Side::Client, &t);
        assert!(verify(b"secret", Side::Client, &t, &p));
        assert!(!verify(b"other", Side::Client, &t, &p));
        assert!(!verify(b"secret", Side::Server, &t, &p));
        let t2 = Transcript {
            volume: "vol2",
            ..t
        };
        assert!(!verify(b"secret", Side::Client, &t2, &p));
        let t3 = Transcript {
            credential: "bob",
            ..t
        };
        assert!(!verify(b"secret", Side::Client, &t3, &p));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }

    #[test]
    fn tickets_and_stored_sessions_bind_the_credential() {
        let tk = ticket(b"k", "alice", "vol", 9);
        assert!(ticket_valid(b"k", "alice", "vol", 9, &tk));
        assert!(!ticket_valid(b"k", "alice", "vol", 10, &tk));
        assert!(!ticket_valid(b"k", "bob", "vol", 9, &tk));
        assert!(!ticket_valid(b"k", "alice", "vol2", 9, &tk));
        assert!(!ticket_valid(b"other", "alice", "vol", 9, &tk));
        assert_ne!(stored_session("alice", 9), stored_session("bob", 9));
        assert_eq!(stored_session("alice", 9), stored_session("alice", 9));
        assert_ne!(new_session().unwrap(), 0);
    }
}
