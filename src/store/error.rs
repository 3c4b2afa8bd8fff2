//! What a store reports when an operation fails, and which failures mean
//! a full volume.

use thiserror::Error;

/// Errors a store reports. Callers branch on them: `NoSpace` becomes ENOSPC,
/// everything else EIO.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The volume has no room for the data of a transaction.
    #[error("volume is full")]
    NoSpace,
    /// The store's medium or engine failed.
    #[error("store I/O failed")]
    Io(#[source] std::io::Error),
    /// The store found data it cannot decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// Another writer has opened the volume; this instance may no longer
    /// write to it.
    #[error("volume was opened by another writer (fenced)")]
    Fenced,
    /// The volume is open read-only (`serve --readonly`): nothing may be
    /// written to it.
    #[error("volume is open read-only")]
    ReadOnly,
}

impl StoreError {
    /// Whether the volume has no room: [`NoSpace`](Self::NoSpace), or an
    /// I/O error whose cause is the medium's own ENOSPC or EDQUOT (the
    /// host's disk or quota under a `file://` volume full, however deep
    /// in the engine's error the cause sits). Such a failure is answered
    /// as a full volume is: ENOSPC, not EIO, and not retried at once.
    pub fn is_no_space(&self) -> bool {
        let StoreError::Io(e) = self else {
            return matches!(self, StoreError::NoSpace);
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                    return true;
                }
                // `io::Error::other(inner)` hides `inner` from `source()`.
                if let Some(inner) = io.get_ref() {
                    cause = Some(inner);
                    continue;
                }
            }
            cause = c.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::StoreError;

    fn io(code: i32) -> StoreError {
        StoreError::Io(std::io::Error::from_raw_os_error(code))
    }

    #[test]
    fn a_full_medium_is_a_full_volume_however_deep_its_cause() {
        assert!(StoreError::NoSpace.is_no_space());
        assert!(io(libc::ENOSPC).is_no_space());
        assert!(io(libc::EDQUOT).is_no_space());
        // As the engine wraps its own errors: `io::Error::other` over an
        // error whose source is the medium's.
        #[derive(Debug, thiserror::Error)]
        #[error("flush failed")]
        struct Engine(#[source] std::io::Error);
        let deep = StoreError::Io(std::io::Error::other(Engine(
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        )));
        assert!(deep.is_no_space());
        assert!(!io(libc::EIO).is_no_space());
        assert!(
            !StoreError::Io(std::io::Error::other(Engine(std::io::Error::other("x"))))
                .is_no_space()
        );
        assert!(!StoreError::Fenced.is_no_space());
        assert!(!StoreError::Corrupt("x".into()).is_no_space());
    }
}
