//! Errors of the filesystem layer. Every failed request becomes one errno
//! reply to the guest; the store's failures are kept as the source so the log
//! line names the real cause.

use thiserror::Error;

use crate::store::StoreError;

/// Why a filesystem operation failed.
#[derive(Debug, Error)]
pub enum FsError {
    /// A POSIX error decided by the filesystem layer (ENOENT, EEXIST, ...).
    #[error("errno {0}")]
    Errno(i32),
    /// The store failed under the operation.
    #[error("store operation failed")]
    Store(#[from] StoreError),
    /// A volume served read-only has no root directory: it was formatted
    /// and never served, and the root cannot be made without writing.
    #[error("the volume has no root directory yet (it was never served): serve it once without --readonly")]
    NoRoot,
}

impl FsError {
    /// The errno the guest sees.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Errno(e) => *e,
            FsError::Store(e) if e.is_no_space() => libc::ENOSPC,
            FsError::Store(StoreError::ReadOnly) => libc::EROFS,
            FsError::Store(_) | FsError::NoRoot => libc::EIO,
        }
    }

    /// True for errors that are part of normal operation (a lookup of a
    /// missing name, a full volume) or that a guest asks for with its own
    /// arguments (a file or an xattr too large, too many links or open
    /// handles, renaming `.`), rather than a sign of trouble worth a
    /// warning.
    pub fn is_routine(&self) -> bool {
        // Judged by the errno: a store's full or read-only volume is routine
        // as the guest's own ENOSPC or EROFS is; a store's other failures
        // (EIO) are not.
        matches!(
            self.errno(),
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENODATA
                | libc::ERANGE
                | libc::EACCES
                | libc::EPERM
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::ENXIO
                | libc::ENAMETOOLONG
                | libc::EINVAL
                | libc::EOPNOTSUPP
                | libc::EFBIG
                | libc::E2BIG
                | libc::EBUSY
                | libc::EMLINK
                | libc::ENFILE
                | libc::ENODEV
                | libc::ENOSPC
                | libc::EROFS
        )
    }
}

impl From<FsError> for std::io::Error {
    fn from(e: FsError) -> std::io::Error {
        std::io::Error::from_raw_os_error(e.errno())
    }
}

/// Shorthand for the result of a filesystem operation.
pub type FsResult<T> = Result<T, FsError>;

/// `Err(FsError::Errno(libc::NAME))`.
macro_rules! errno {
    ($e:ident) => {
        Err($crate::fs::error::FsError::Errno(libc::$e))
    };
}
pub(crate) use errno;
