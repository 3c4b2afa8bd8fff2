//! Mutual authentication by a shared secret: each side proves it knows the
//! secret with an HMAC-SHA256 over both nonces, the session and the volume,
//! so a proof cannot be replayed on another connection, session or volume.
//! The secret never crosses the wire. A server without a secret uses the
//! empty key (and says so in its log): the handshake is the same.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::msg::{NONCE_LEN, PROOF_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Which side a proof speaks for; the two proofs differ so a server's proof
/// cannot be reflected back as a client's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Everything a proof binds.
pub struct Transcript<'a> {
    pub client_nonce: &'a [u8; NONCE_LEN],
    pub server_nonce: &'a [u8; NONCE_LEN],
    pub session: u64,
    pub volume: &'a str,
}

fn mac(secret: &[u8], side: Side, t: &Transcript<'_>) -> HmacSha256 {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut m = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    m.update(match side {
        Side::Client => b"pohmelfs-v1 client proof",
        Side::Server => b"pohmelfs-v1 server proof",
    });
    m.update(t.client_nonce);
    m.update(t.server_nonce);
    m.update(&t.session.to_le_bytes());
    m.update(t.volume.as_bytes());
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
            session: 7,
            volume: "vol",
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
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
