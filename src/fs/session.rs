//! The guest session's state, carried to another daemon by a live
//! migration (`device::state`, `docs/migration.md`): what the guest's
//! kernel refers to and the volume does not record — the options INIT
//! negotiated, the lookup count of every inode it holds, the unlinked
//! inodes those keep alive, and its open file and directory handles.
//! Directory positions need nothing: READDIR carries its own offset.

use std::collections::{HashMap, HashSet};

use fuse_backend_rs::api::filesystem::FsOptions;
use thiserror::Error;

use super::handles::OpenFile;
use super::{lock, PohmelFs};
use crate::store::ROOT_INO;

/// The largest lookup count and next file handle a session's state may
/// carry: they only ever count up by one from there, so no count or
/// handle of the session can wrap (a guest's kernel never comes near).
const IMPORTED_MAX: u64 = u64::MAX / 2;

/// A guest session, as exported by the source and imported by the
/// destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionState {
    /// The FUSE options INIT negotiated (`FsOptions` bits).
    pub options: u64,
    /// `(inode, lookup count)` of every inode the guest holds.
    pub lookups: Vec<(u64, u64)>,
    /// The unlinked inodes the guest keeps alive.
    pub orphans: Vec<u64>,
    /// `(handle, what it refers to)` of every open handle.
    pub handles: Vec<(u64, OpenFile)>,
    /// The next handle number: handles are never reused in a session.
    pub next_handle: u64,
}

/// Why a session cannot be exported or imported.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the guest has not started a FUSE session (no INIT)")]
    NoSession,
    #[error("this daemon serves a guest session already")]
    Busy,
    #[error("the guest negotiated FUSE options {guest:#x}; this daemon offers only {offered:#x}")]
    Options { guest: u64, offered: u64 },
    #[error("the guest holds {have} inodes; this daemon allows {max} (--max-referenced-inodes)")]
    TooManyInodes { have: usize, max: usize },
    #[error("the guest has {have} open handles; this daemon allows {max} (--max-handles)")]
    TooManyHandles { have: usize, max: usize },
    #[error("inode {0} appears twice, or is the root, or has a zero count")]
    BadLookup(u64),
    #[error("unlinked inode {0} is not one the guest holds")]
    BadOrphan(u64),
    #[error("handle {0} appears twice, is 0, or is not below the next handle")]
    BadHandle(u64),
    #[error("cannot open the volume: {0}")]
    Volume(String),
}

impl PohmelFs {
    /// The FUSE options this daemon offers at INIT (the guest gets those
    /// it is capable of).
    pub(super) fn offered_options(&self) -> FsOptions {
        let mut want = FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::CACHE_SYMLINKS
            // We clear setuid/setgid and security.capability on write,
            // truncate and chown; the kernel then stops asking for
            // security.capability before every write (a round trip each).
            | FsOptions::HANDLE_KILLPRIV_V2;
        // Nothing to write back on a read-only volume.
        if self.cfg.writeback_cache && !self.cfg.read_only {
            want |= FsOptions::WRITEBACK_CACHE;
        }
        want
    }

    /// The options a guest session may hold to be taken over: those
    /// offered, and ATOMIC_O_TRUNC, which daemons before it was dropped
    /// offered and `do_open` still honours. It is no longer offered because
    /// with it the guest kernel takes a file's size to be 0 as soon as OPEN
    /// returns, before it checks that the file may be truncated at all: an
    /// `open(O_RDONLY | O_TRUNC)` refused with ETXTBSY still cut a running
    /// executable short under its process (which died of SIGBUS or SIGSEGV
    /// while loading). Without it the kernel checks, then truncates through
    /// SETATTR.
    fn accepted_options(&self) -> FsOptions {
        self.offered_options() | FsOptions::ATOMIC_O_TRUNC
    }

    /// The guest session as it stands, for a migration's source. Called with
    /// the queues stopped and the requests drained, so it does not change
    /// under the copy.
    pub fn export_session(&self) -> Result<SessionState, SessionError> {
        let options = (*lock(&self.negotiated)).ok_or(SessionError::NoSession)?;
        let (mut lookups, mut orphans) = {
            let refs = lock(&self.refs);
            let lookups: Vec<(u64, u64)> = refs.lookups.iter().map(|(&i, &n)| (i, n)).collect();
            (lookups, refs.orphans.iter().copied().collect::<Vec<u64>>())
        };
        let (mut handles, next_handle) = lock(&self.handles).export();
        lookups.sort_unstable();
        orphans.sort_unstable();
        handles.sort_unstable_by_key(|(h, _)| *h);
        Ok(SessionState {
            options: options.bits(),
            lookups,
            orphans,
            handles,
            next_handle,
        })
    }

    /// Take over the guest session `s`, for a migration's destination:
    /// refused unless this daemon has no session yet, offers every option
    /// the guest negotiated, and has room for the inodes and handles. The
    /// state is checked whole before anything changes; then the volume is
    /// opened if it is not open yet (`--incoming`: once the source let it
    /// go, sparing the unlinked inodes the session holds; an open under
    /// way that has claimed the volume finishes behind the answer).
    pub fn import_session(&self, s: SessionState) -> Result<(), SessionError> {
        let offered = self.accepted_options().bits();
        if s.options & !offered != 0 {
            return Err(SessionError::Options {
                guest: s.options,
                offered,
            });
        }
        if s.lookups.len() > self.cfg.max_referenced_inodes {
            return Err(SessionError::TooManyInodes {
                have: s.lookups.len(),
                max: self.cfg.max_referenced_inodes,
            });
        }
        if s.handles.len() > self.cfg.max_handles {
            return Err(SessionError::TooManyHandles {
                have: s.handles.len(),
                max: self.cfg.max_handles,
            });
        }
        let mut lookups = HashMap::with_capacity(s.lookups.len());
        for &(ino, count) in &s.lookups {
            if ino == ROOT_INO
                || count == 0
                || count > IMPORTED_MAX
                || lookups.insert(ino, count).is_some()
            {
                return Err(SessionError::BadLookup(ino));
            }
        }
        let mut orphans = HashSet::with_capacity(s.orphans.len());
        for &ino in &s.orphans {
            if !lookups.contains_key(&ino) || !orphans.insert(ino) {
                return Err(SessionError::BadOrphan(ino));
            }
        }
        if s.next_handle > IMPORTED_MAX {
            return Err(SessionError::BadHandle(s.next_handle));
        }
        let mut seen = HashSet::with_capacity(s.handles.len());
        for &(h, _) in &s.handles {
            if h == 0 || h >= s.next_handle || !seen.insert(h) {
                return Err(SessionError::BadHandle(h));
            }
        }
        if self.has_session() {
            return Err(SessionError::Busy);
        }
        self.acquire_volume_for_state(&s.orphans)
            .map_err(|e| SessionError::Volume(crate::ErrorChain(&e).to_string()))?;
        let mut negotiated = lock(&self.negotiated);
        let mut refs = lock(&self.refs);
        if negotiated.is_some() || !refs.lookups.is_empty() || !refs.orphans.is_empty() {
            return Err(SessionError::Busy);
        }
        // Never lock the handle table and an inode together; the refs lock
        // is not an inode lock.
        let mut handles = lock(&self.handles);
        if !handles.is_empty() {
            return Err(SessionError::Busy);
        }
        handles.import(&s.handles, s.next_handle);
        refs.lookups = lookups;
        refs.orphans = orphans;
        *negotiated = Some(FsOptions::from_bits_truncate(s.options));
        Ok(())
    }

    /// Whether a guest session is under way (INIT, or one taken over).
    fn has_session(&self) -> bool {
        // In the order `import_session` takes them.
        let negotiated = lock(&self.negotiated);
        let refs = lock(&self.refs);
        negotiated.is_some() || !refs.lookups.is_empty() || !refs.orphans.is_empty()
    }

    /// Forget the session without removing the unlinked inodes it keeps
    /// alive: another daemon serves it now (a migration's source, once the
    /// frontend disconnects after the state went out).
    pub fn hand_off_session(&self) {
        let held: Vec<u64> = {
            let mut refs = lock(&self.refs);
            refs.orphans.clear();
            refs.lookups.drain().map(|(ino, _)| ino).collect()
        };
        lock(&self.handles).clear();
        *lock(&self.negotiated) = None;
        for ino in held {
            self.store.forgotten(ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fuse_backend_rs::api::filesystem::FileSystem;

    use super::*;
    use crate::fs::FsConfig;
    use crate::store::mem::MemStore;

    fn fs(writeback_cache: bool) -> PohmelFs {
        let cfg = FsConfig {
            writeback_cache,
            ..FsConfig::default()
        };
        PohmelFs::new(Arc::new(MemStore::new(1 << 20)), cfg, Arc::default()).unwrap()
    }

    fn state(options: FsOptions) -> SessionState {
        SessionState {
            options: options.bits(),
            lookups: vec![(5, 1), (6, 2)],
            orphans: vec![6],
            handles: vec![(
                2,
                OpenFile {
                    ino: 5,
                    append: false,
                },
            )],
            next_handle: 3,
        }
    }

    #[test]
    fn a_session_exports_as_imported() {
        let dst = fs(false);
        dst.import_session(state(FsOptions::ASYNC_READ)).unwrap();
        assert_eq!(dst.export_session().unwrap(), state(FsOptions::ASYNC_READ));
        // A second one is refused whole.
        assert_eq!(
            dst.import_session(state(FsOptions::ASYNC_READ)),
            Err(SessionError::Busy)
        );
    }

    #[test]
    fn options_this_daemon_does_not_offer_are_refused() {
        let src = fs(true);
        let negotiated = src.init(FsOptions::all()).unwrap();
        assert!(negotiated.contains(FsOptions::WRITEBACK_CACHE));
        let err = fs(false).import_session(state(negotiated)).unwrap_err();
        assert!(matches!(err, SessionError::Options { .. }), "{err}");
        fs(true).import_session(state(negotiated)).unwrap();
    }

    #[test]
    fn inconsistent_states_are_refused_before_anything_changes() {
        let dst = fs(false);
        let mut s = state(FsOptions::ASYNC_READ);
        s.orphans = vec![7];
        assert_eq!(dst.import_session(s), Err(SessionError::BadOrphan(7)));
        let mut s = state(FsOptions::ASYNC_READ);
        s.handles[0].0 = 3;
        assert_eq!(dst.import_session(s), Err(SessionError::BadHandle(3)));
        let mut s = state(FsOptions::ASYNC_READ);
        s.lookups.push((ROOT_INO, 1));
        assert_eq!(
            dst.import_session(s),
            Err(SessionError::BadLookup(ROOT_INO))
        );
        // Counts and handles that could wrap as the session goes on.
        let mut s = state(FsOptions::ASYNC_READ);
        s.lookups[0].1 = u64::MAX;
        assert_eq!(dst.import_session(s), Err(SessionError::BadLookup(5)));
        let mut s = state(FsOptions::ASYNC_READ);
        s.next_handle = u64::MAX;
        assert_eq!(
            dst.import_session(s),
            Err(SessionError::BadHandle(u64::MAX))
        );
        assert_eq!(dst.export_session(), Err(SessionError::NoSession));
    }
}
