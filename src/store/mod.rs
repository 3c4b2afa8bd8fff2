//! The store seam: what the filesystem layer needs from a volume, and the
//! contract every store implementation keeps.
//!
//! A volume holds inodes, directory entries, symlink targets, extended
//! attributes and file data in fixed-size blocks ([`BLOCK_SIZE`]). The
//! filesystem layer above decides POSIX semantics (it checks names,
//! permissions, emptiness, link counts) while it holds the inodes' locks; the
//! store applies what it is told, atomically, and never second-guesses it.
//!
//! # Contract
//!
//! * [`Store::commit`] applies every [`Op`] of a [`Txn`] in order, all or
//!   nothing. The stores that hold a volume (`mem:`, the engine, the client
//!   of store servers) return `Ok` only once the whole transaction is
//!   durable for their notion of durability (for `mem:` that is "in
//!   memory"; for the engine and a store server it is "flushed to the
//!   medium"). The write-back layer ([`crate::writeback::WritebackStore`]) is the
//!   exception: its `Ok` means accepted (queued, and seen by reads), and the
//!   transaction is durable only once a later [`Store::sync`] has returned
//!   `Ok` ([`Store::flush`], a close, waits only under `--sync-on-close`). A caller that
//!   sees `Err` must assume nothing of the transaction was applied.
//! * Reads see every transaction whose `commit` has returned `Ok`.
//! * [`Store::sync`] returns `Ok` once everything committed before the call
//!   (for one inode, or for the whole volume) is durable. Stores that make
//!   `commit` durable before returning may answer at once; the write-back
//!   layer, which the daemon puts in front of every store, resolves it by
//!   finding the transactions that refer to the inode (or all of them),
//!   sending or resending them, and waiting for their durable acks.
//! * Ids handed out by [`Store::reserve_ids`] are never handed out again, even
//!   across restarts of a durable store.
//! * A store must never panic on the contents of a transaction: an op that
//!   names a missing inode or entry is applied as a no-op.
//! * A store that another writer has taken over (fenced) fails every later
//!   write with [`StoreError::Fenced`]; it never applies one.
//!
//! # Exactly once
//!
//! [`OnceStore::commit_once`] names a transaction by `(session, txn_id)`.
//! The record that it was applied is written in the same atomic batch as
//! the transaction, so after a crash either both exist or neither does. A
//! resent transaction whose record exists applies nothing, and is
//! acknowledged (`duplicate: true`) only once the first copy is durable.
//! A client drops the records it will never resend with
//! [`OnceStore::prune_applied`], and detects that the store restarted (and
//! may have lost what it had not acknowledged) by [`OnceStore::epoch`].

pub mod bench;
pub mod copy;
pub mod data;
pub(crate) mod delegate;
pub mod engine;
mod error;
#[cfg(test)]
pub(crate) mod hooked;
pub mod import;
pub mod mem;
mod open;
mod pages;
pub mod readcache;
pub mod sink;

use std::fmt;

pub use data::{ReadData, ReadPiece, ReadPin, WriteData, PAGE_SIZE};
pub use error::StoreError;
pub use open::{open, open_once, open_once_as, OpenError};

/// The inode number of the volume's root directory.
pub const ROOT_INO: u64 = 1;

/// The first id [`Store::reserve_ids`] may return; lower ids are reserved.
pub const FIRST_FREE_ID: u64 = 16;

/// The size of one data block of a file, in bytes.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// What a request would ask of the store, for [`Store::would_not_wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demand {
    /// A write of `len` bytes to inode `ino` at `offset` (`None`: not
    /// known before the inode is locked, an append).
    Write {
        ino: u64,
        offset: Option<u64>,
        len: u64,
    },
    /// A metadata change (create, unlink, rename, setattr, xattrs, the
    /// removal of an orphan at its last forget).
    Metadata,
    /// A close (FLUSH, RELEASE).
    Close,
    /// A read of inode `ino`'s attributes, answered without the store.
    Attributes { ino: u64 },
    /// A lookup in directory `dir` (or a change of one of its entries),
    /// answered without the store: every entry of `dir` is in memory.
    Entries { dir: u64 },
    /// A read of `len` bytes of `ino` at `offset`, answered from memory
    /// (or, where the store [reads it locally](Store::reads_locally), from
    /// this machine's storage).
    Read { ino: u64, offset: u64, len: u64 },
    /// A read or a listing of inode `ino`'s extended attributes, answered
    /// without the store: `ino` is known to have none (it was created in
    /// this session and none was set since).
    Xattrs { ino: u64 },
}

/// The longest name of a directory entry, in bytes.
pub const NAME_MAX: usize = 255;

/// The longest symlink target, in bytes (Linux's PATH_MAX less the NUL).
pub const SYMLINK_MAX: usize = 4095;

/// The longest extended attribute name, in bytes.
pub const XATTR_NAME_MAX: usize = 255;

/// The largest extended attribute value, in bytes (Linux's XATTR_SIZE_MAX).
pub const XATTR_VALUE_MAX: usize = 64 * 1024;

/// The most bytes the NUL-separated name list of one inode may take
/// (Linux's XATTR_LIST_MAX): the filesystem refuses a name beyond it, and
/// the embedded engine lists no more.
pub const XATTR_LIST_MAX: usize = 64 * 1024;

/// The type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::Regular => libc::S_IFREG,
            FileKind::Directory => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(FileKind::Regular),
            libc::S_IFDIR => Some(FileKind::Directory),
            libc::S_IFLNK => Some(FileKind::Symlink),
            libc::S_IFIFO => Some(FileKind::Fifo),
            libc::S_IFSOCK => Some(FileKind::Socket),
            libc::S_IFCHR => Some(FileKind::CharDevice),
            libc::S_IFBLK => Some(FileKind::BlockDevice),
            _ => None,
        }
    }

    /// The `d_type` value readdir reports for this kind.
    pub fn dirent_type(self) -> u32 {
        self.mode_bits() >> 12
    }
}

/// A point in time, as seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nsec: d.subsec_nanos(),
        }
    }
}

/// The attributes of one inode, as the store keeps them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits, including setuid, setgid and sticky (07777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// For directories, the inode of the parent (`..`); 0 otherwise.
    pub parent: u64,
}

impl Inode {
    /// A regular file of `size` bytes: mode 0644, owned by root, one link,
    /// every time zero, no parent.
    pub fn regular(ino: u64, size: u64) -> Inode {
        Inode {
            ino,
            kind: FileKind::Regular,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size,
            rdev: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            parent: 0,
        }
    }
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirent {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: FileKind,
    /// A position in the directory that stays valid while other entries come
    /// and go: readdir resumes after it. Unique within the volume.
    pub cookie: u64,
}

/// One mutation of a volume. Ops are blind: they say what the volume must
/// look like afterwards, not what it looked like before.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or replace an inode's attributes.
    PutInode(Inode),
    /// Remove an inode with its data, symlink target and extended attributes.
    RemoveInode { ino: u64 },
    /// Create or replace the entry `name` in directory `parent`.
    PutDirent { parent: u64, dirent: Dirent },
    /// Remove the entry `name` from directory `parent`.
    RemoveDirent { parent: u64, name: Vec<u8> },
    /// Write `data` at `offset` of the file's blocks. Does not change the
    /// inode's size: the caller puts the inode too. The bytes are shared
    /// buffers (the write-back layer's pages), never copied to build the op.
    Write {
        ino: u64,
        offset: u64,
        data: WriteData,
    },
    /// Drop the file's data at and beyond `size`.
    Truncate { ino: u64, size: u64 },
    /// Zero `len` bytes at `offset`, freeing whole blocks.
    PunchHole { ino: u64, offset: u64, len: u64 },
    /// Set a symlink's target.
    SetSymlink { ino: u64, target: Vec<u8> },
    /// Create or replace an extended attribute.
    SetXattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    /// Remove an extended attribute.
    RemoveXattr { ino: u64, name: Vec<u8> },
}

impl fmt::Debug for Op {
    // Data payloads are summarised by length: a log line must not carry a
    // megabyte of file contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write { ino, offset, data } => f
                .debug_struct("Write")
                .field("ino", ino)
                .field("offset", offset)
                .field("len", &data.len())
                .finish(),
            Op::PutInode(i) => f.debug_tuple("PutInode").field(i).finish(),
            Op::RemoveInode { ino } => f.debug_struct("RemoveInode").field("ino", ino).finish(),
            Op::PutDirent { parent, dirent } => f
                .debug_struct("PutDirent")
                .field("parent", parent)
                .field("dirent", dirent)
                .finish(),
            Op::RemoveDirent { parent, name } => f
                .debug_struct("RemoveDirent")
                .field("parent", parent)
                .field("name", &String::from_utf8_lossy(name))
                .finish(),
            Op::Truncate { ino, size } => f
                .debug_struct("Truncate")
                .field("ino", ino)
                .field("size", size)
                .finish(),
            Op::PunchHole { ino, offset, len } => f
                .debug_struct("PunchHole")
                .field("ino", ino)
                .field("offset", offset)
                .field("len", len)
                .finish(),
            Op::SetSymlink { ino, target } => f
                .debug_struct("SetSymlink")
                .field("ino", ino)
                .field("len", &target.len())
                .finish(),
            Op::SetXattr { ino, name, value } => f
                .debug_struct("SetXattr")
                .field("ino", ino)
                .field("name", &String::from_utf8_lossy(name))
                .field("len", &value.len())
                .finish(),
            Op::RemoveXattr { ino, name } => f
                .debug_struct("RemoveXattr")
                .field("ino", ino)
                .field("name", &String::from_utf8_lossy(name))
                .finish(),
        }
    }
}

/// A batch of ops applied atomically, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn push(&mut self, op: Op) -> &mut Txn {
        self.ops.push(op);
        self
    }

    /// The bytes of file data this transaction carries.
    pub fn data_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Write { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

/// Space accounting of a volume, for statfs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes the volume may hold in all (the engine charges metadata
    /// against its capacity and reports what is left for file data).
    pub capacity_bytes: u64,
    /// Bytes of file data blocks in use.
    pub used_bytes: u64,
    /// Inodes the volume may hold in all.
    pub capacity_inodes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
}

/// A volume the filesystem layer stores its files in. See the module
/// documentation for the contract.
pub trait Store: Send + Sync {
    /// The attributes of `ino`, or `None` if it does not exist.
    fn get_inode(&self, ino: u64) -> Result<Option<Inode>, StoreError>;

    /// The entry `name` in directory `parent`, or `None`.
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, StoreError>;

    /// Up to `max` entries of `parent` whose cookie is greater than `after`,
    /// in increasing cookie order.
    fn readdir(&self, parent: u64, after: u64, max: usize) -> Result<Vec<Dirent>, StoreError>;

    /// Fill `buf` with the file's bytes at `offset`; holes and bytes past the
    /// last block read as zeros. The caller clips reads to the file size.
    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError>;

    /// The file's `len` bytes at `offset` as pieces (zeros, shared
    /// buffers), as [`Store::read`] would fill them: a store that holds the
    /// bytes in buffers of its own hands them back without copying them
    /// into one. The default reads into a new buffer.
    fn read_data(&self, ino: u64, offset: u64, len: usize) -> Result<ReadData, StoreError> {
        let mut buf = vec![0u8; len];
        self.read(ino, offset, &mut buf)?;
        Ok(ReadData::from(buf))
    }

    /// Whether a read of `len` bytes of `ino` at `offset` would be served
    /// from this machine's storage, without a round trip to a remote store
    /// (the local read cache holds every block of it): a layer above reads
    /// such a range when asked, neither ahead nor into clean pages.
    /// Advisory; the default says no.
    fn reads_locally(&self, ino: u64, offset: u64, len: u64) -> bool {
        let _ = (ino, offset, len);
        false
    }

    /// The smallest offset `>= offset` inside a stored block, if any.
    fn next_data(&self, ino: u64, offset: u64) -> Result<Option<u64>, StoreError>;

    /// The smallest offset `>= offset` not inside a stored block.
    fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, StoreError>;

    /// A symlink's target.
    fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// The value of extended attribute `name` of `ino`.
    fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The names of all extended attributes of `ino`.
    fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Space accounting.
    fn statfs(&self) -> Result<StoreStats, StoreError>;

    /// Reserve `count` fresh ids (inode numbers and entry cookies) and return
    /// the first; the range `first..first + count` is the caller's.
    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError>;

    /// Apply `txn` atomically. For a store that holds the volume, `Ok` means
    /// applied and durable; for the write-back layer it means accepted
    /// (visible to reads), durable once a later `sync` or `flush` returns
    /// `Ok` (see the module documentation).
    fn commit(&self, txn: Txn) -> Result<(), StoreError>;

    /// Write `data` at `offset` of `ino` and put `inode` (the attributes
    /// after the write, whose size covers it), as one transaction: the
    /// filesystem layer's write. The write-back layer takes the buffers of
    /// `data` as its pages where they cover whole pages; a store that holds
    /// the volume commits `[Write, PutInode]`.
    fn write(
        &self,
        ino: u64,
        offset: u64,
        data: WriteData,
        inode: Inode,
    ) -> Result<(), StoreError> {
        let mut txn = Txn::new();
        txn.push(Op::Write { ino, offset, data });
        txn.push(Op::PutInode(inode));
        self.commit(txn)
    }

    /// Wait until a write of about `bytes` may go in without waiting for
    /// room (dirty-byte backpressure in the write-back layer): the
    /// filesystem layer calls it before it takes an inode's lock, so that
    /// a write held back blocks nothing else. Advisory: `write` checks
    /// again. A store that writes through has no such bound.
    fn wait_for_room(&self, bytes: u64) -> Result<(), StoreError> {
        let _ = bytes;
        Ok(())
    }

    /// Whether a request asking `demand` would go in now without waiting
    /// (no backpressure, no page pinned by a transaction in flight to wait
    /// for, no close that waits as fsync does): the device serves such a
    /// request on its queue thread. Advisory: by the time the request runs
    /// it may wait after all, bounded as every wait of the layer is.
    fn would_not_wait(&self, demand: Demand) -> bool {
        let _ = demand;
        true
    }

    /// Wait until everything committed before the call (for `ino`, or for
    /// the whole volume when `None`) is durable.
    fn sync(&self, ino: Option<u64>) -> Result<(), StoreError>;

    /// FLUSH (a close of one of the guest's descriptors): start writing
    /// back the data of `ino` written so far. A close promises no
    /// durability (POSIX's): the write-back layer returns at once (the data
    /// goes on its own, within `meta_linger` for a new file), reporting
    /// only errors it already knows, unless told to
    /// wait as `sync` does (`--sync-on-close`). Even then it may return at
    /// once when `ino` has no data waiting — only metadata, such as its own
    /// creation (a shell's `echo > f` closes the new file once before it
    /// writes). Stores that are durable at commit answer at once.
    fn flush(&self, ino: u64) -> Result<(), StoreError> {
        self.sync(Some(ino))
    }

    /// The guest holds no reference to `ino` any more (its lookup count
    /// fell to zero): a layer may drop what it caches of it. Never what it
    /// holds that the store below does not have yet.
    fn forgotten(&self, _ino: u64) {}

    /// A one-line description for logs ("mem: (does not persist)").
    fn describe(&self) -> String;

    /// Take snapshot `name` of the volume, consistent at a transaction
    /// boundary: every transaction acknowledged before the call is in it,
    /// and a layer that holds writes back sends them first. Returns where
    /// the snapshot lives. Only the embedded engine on `file://` has
    /// snapshots (`store/engine/snapshot.rs`).
    fn snapshot(&self, name: &str) -> Result<String, StoreError> {
        Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("{} has no snapshots (snapshot {name:?})", self.describe()),
        )))
    }

    /// The volume's id, format version, epoch and holder, where this
    /// process opened the volume itself (the embedded engine).
    fn identity(&self) -> Option<engine::VolumeIdentity> {
        None
    }
}

/// What [`OnceStore::commit_once`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The transaction had been applied before; this call applied nothing.
    pub duplicate: bool,
}

/// A store that applies each named transaction at most once. See "Exactly
/// once" in the module documentation.
pub trait OnceStore: Store {
    /// Apply `txn` atomically and durably unless `(session, txn_id)` was
    /// applied before, in which case apply nothing and report a duplicate
    /// (once the earlier copy is durable).
    fn commit_once(&self, session: u64, txn_id: u64, txn: Txn)
        -> Result<CommitOutcome, StoreError>;

    /// Forget the applied records of `session` with `txn_id < below`: the
    /// client's low-water mark, below which it never resends.
    fn prune_applied(&self, session: u64, below: u64) -> Result<(), StoreError>;

    /// A durability epoch: it changes whenever the store is reopened, so a
    /// client that sees it change knows unacknowledged work may be gone.
    fn epoch(&self) -> u64;

    /// Remove the inodes unlinked while open before a crash, except
    /// `spare`; how many went. A store that keeps no orphan marks (`mem:`,
    /// whose volume dies with its process) has none.
    fn reclaim_orphans_except(&self, spare: &[u64]) -> Result<u64, StoreError> {
        let _ = spare;
        Ok(0)
    }

    /// The volume's writer claim as [`OnceStore::set_writer_claim`] last
    /// recorded it, or none. A store that cannot keep one (`mem:`, whose
    /// volume dies with its process) has none: its server keeps the claim
    /// in memory.
    fn writer_claim(&self) -> Result<Option<WriterClaim>, StoreError> {
        Ok(None)
    }

    /// Record `claim` as the volume's writer claim, durably before it
    /// returns, so that a reopen (a store server restarted, or another one
    /// that took the volume over) still refuses every other writer.
    fn set_writer_claim(&self, claim: WriterClaim) -> Result<(), StoreError> {
        let _ = claim;
        Ok(())
    }
}

/// Which client session of a store server may write to a volume
/// (`net::server`, `docs/protocol.md` "Writer claim"): the last one that
/// claimed it. `claim` counts the claims made on the volume, from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterClaim {
    pub claim: u64,
    /// The stored session (`net::proto::auth::stored_session`) of the
    /// claiming client.
    pub session: u64,
}

/// The reserved inode under which `mem:` keeps its applied records, as
/// extended attributes named by `(session, txn_id)`: a mem volume then needs
/// nothing but [`Store::commit`] to write them atomically with the txn.
const MEM_APPLIED_INO: u64 = 2;

/// Serializes `commit_once` on mem volumes between its check and its commit.
static MEM_ONCE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn mem_applied_name(session: u64, txn_id: u64) -> Vec<u8> {
    let mut name = session.to_be_bytes().to_vec();
    name.extend_from_slice(&txn_id.to_be_bytes());
    name
}

impl OnceStore for mem::MemStore {
    fn commit_once(
        &self,
        session: u64,
        txn_id: u64,
        mut txn: Txn,
    ) -> Result<CommitOutcome, StoreError> {
        let _serial = MEM_ONCE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let name = mem_applied_name(session, txn_id);
        if self.get_xattr(MEM_APPLIED_INO, &name)?.is_some() {
            return Ok(CommitOutcome { duplicate: true });
        }
        txn.push(Op::SetXattr {
            ino: MEM_APPLIED_INO,
            name,
            value: Vec::new(),
        });
        self.commit(txn)?;
        Ok(CommitOutcome { duplicate: false })
    }

    fn prune_applied(&self, session: u64, below: u64) -> Result<(), StoreError> {
        let _serial = MEM_ONCE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut txn = Txn::new();
        for name in self.list_xattr(MEM_APPLIED_INO)? {
            let (s, t) = name.split_at(8.min(name.len()));
            let s = u64::from_be_bytes(s.try_into().unwrap_or_default());
            let t = u64::from_be_bytes(t.try_into().unwrap_or_default());
            if s == session && t < below {
                txn.push(Op::RemoveXattr {
                    ino: MEM_APPLIED_INO,
                    name,
                });
            }
        }
        self.commit(txn)
    }

    fn epoch(&self) -> u64 {
        // A mem volume is never reopened: it has one epoch.
        1
    }
}

/// Parse a size such as `512M`, `8G` or `4096` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("8g"), Some(8 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn kinds_round_trip_through_mode() {
        for k in [
            FileKind::Regular,
            FileKind::Directory,
            FileKind::Symlink,
            FileKind::Fifo,
            FileKind::Socket,
            FileKind::CharDevice,
            FileKind::BlockDevice,
        ] {
            assert_eq!(FileKind::from_mode(k.mode_bits() | 0o644), Some(k));
        }
        assert_eq!(FileKind::from_mode(0o644), None);
    }

    #[test]
    fn open_rejects_unknown_schemes() {
        assert!(matches!(open("nfs://x"), Err(OpenError::UnknownScheme(_))));
        assert!(matches!(open("nothing"), Err(OpenError::BadUrl(_))));
        assert!(open("mem:").is_ok());
    }
}
