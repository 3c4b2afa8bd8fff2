//! The volume's writer claim (`tag::WRITER`): which client session of a
//! store server may write to it (`net::server`). The server records a
//! claim here before it answers it, so a restarted server, or another
//! server of the same store that takes the volume over, refuses the
//! sessions the claim superseded. The engine only keeps the record: it
//! never checks a commit against it.

use slatedb::WriteBatch;

use super::{keys, SlateStore};
use crate::store::{StoreError, WriterClaim};

/// Bytes of the record: the claim number and the session, little endian.
const RECORD_LEN: usize = 16;

fn encode(c: WriterClaim) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    out[..8].copy_from_slice(&c.claim.to_le_bytes());
    out[8..].copy_from_slice(&c.session.to_le_bytes());
    out
}

fn decode(v: &[u8]) -> Result<WriterClaim, StoreError> {
    let (Some(claim), Some(session)) = (v.get(..8), v.get(8..)) else {
        return Err(StoreError::Corrupt(format!(
            "writer claim of {} bytes, not {RECORD_LEN}",
            v.len()
        )));
    };
    match (<[u8; 8]>::try_from(claim), <[u8; 8]>::try_from(session)) {
        (Ok(c), Ok(s)) => Ok(WriterClaim {
            claim: u64::from_le_bytes(c),
            session: u64::from_le_bytes(s),
        }),
        _ => Err(StoreError::Corrupt(format!(
            "writer claim of {} bytes, not {RECORD_LEN}",
            v.len()
        ))),
    }
}

impl SlateStore {
    pub(super) async fn writer_claim_inner(&self) -> Result<Option<WriterClaim>, StoreError> {
        match self.get(keys::writer()).await? {
            None => Ok(None),
            // Claim 0 records "no claim" (written to prove the server
            // still holds the volume, `net::server::writer`).
            Some(v) => decode(&v).map(|c| Some(c).filter(|c| c.claim != 0)),
        }
    }

    /// Write the claim and wait until it is durable (as `prune_inner`
    /// writes its deletions: behind every batch built before it).
    pub(super) async fn set_writer_claim_inner(
        &self,
        claim: WriterClaim,
    ) -> Result<(), StoreError> {
        self.check_writable()?;
        let serial = self.commit_lock.lock().await;
        self.await_applied().await?;
        let mut batch = WriteBatch::new();
        batch.put(keys::writer(), encode(claim));
        self.write_behind_queue(serial, batch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_short_one_is_corrupt() {
        let c = WriterClaim {
            claim: 7,
            session: 0xfeed_beef,
        };
        assert_eq!(decode(&encode(c)).unwrap(), c);
        assert!(matches!(decode(&[1, 2, 3]), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode(&[0; 17]), Err(StoreError::Corrupt(_))));
    }
}
