//! What the volume checker reports: each [`Problem`] (an invariant broken)
//! and [`Warning`] (legal but worth knowing), with the line `pohmelfs
//! check` prints for it, naming the inodes, directories and names involved.

use std::fmt;

use crate::store::{FileKind, FIRST_FREE_ID, ROOT_INO};

/// Something that breaks an invariant of the volume. Each one names the
/// inodes, directories and names involved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A record that does not decode (the message names it).
    Unreadable(String),
    /// A snapshot or clone (`s3://`) names an object of this volume that
    /// is gone.
    HeldObjectMissing {
        holder: String,
        id: u64,
    },
    /// The volume has no superblock.
    NoSuperblock,
    /// The superblock names a format this checker does not know.
    FormatVersion(u32),
    /// A key whose record type the layout does not define.
    UnknownRecord(Vec<u8>),
    NoRoot,
    RootNotDirectory(FileKind),
    /// The root's `parent` is not itself.
    RootParent(u64),
    /// An entry names the root.
    RootNamed {
        parent: u64,
        name: String,
    },
    /// An inode number in the reserved range below [`FIRST_FREE_ID`].
    ReservedInode(u64),
    /// An id at or above the superblock's `next_id`.
    IdNotReserved {
        what: &'static str,
        id: u64,
        next_id: u64,
    },
    /// An entry whose name no directory may hold.
    BadName {
        parent: u64,
        name: String,
    },
    /// An entry in a directory that does not exist or is no directory.
    EntryOutsideDirectory {
        parent: u64,
        name: String,
        found: Option<FileKind>,
    },
    /// An entry naming an inode that does not exist.
    DanglingEntry {
        parent: u64,
        name: String,
        ino: u64,
    },
    /// An entry whose kind is not its inode's.
    EntryKind {
        parent: u64,
        name: String,
        ino: u64,
        entry: FileKind,
        inode: FileKind,
    },
    /// A by-name entry without its by-cookie twin.
    MissingCookieIndex {
        parent: u64,
        name: String,
        cookie: u64,
    },
    /// A by-cookie entry without its by-name twin.
    MissingNameIndex {
        parent: u64,
        name: String,
        cookie: u64,
    },
    /// The two index records of one entry disagree.
    IndexMismatch {
        parent: u64,
        name: String,
        cookie: u64,
        detail: String,
    },
    /// One cookie used by two entries.
    DuplicateCookie {
        cookie: u64,
        first: (u64, String),
        second: (u64, String),
    },
    /// A cookie in the reserved range (readdir offsets 0..FIRST_FREE_ID).
    ReservedCookie {
        parent: u64,
        name: String,
        cookie: u64,
    },
    DirectoryLinks {
        ino: u64,
        nlink: u32,
        expected: u32,
    },
    FileLinks {
        ino: u64,
        kind: FileKind,
        nlink: u32,
        entries: u32,
    },
    /// A directory's `..` is not the directory holding it.
    DirectoryParent {
        ino: u64,
        parent: u64,
        held_by: u64,
    },
    /// A directory named by more than one entry.
    DirectoryHardLinked {
        ino: u64,
        entries: Vec<(u64, String)>,
    },
    /// A live inode the root does not reach.
    Unreachable {
        ino: u64,
        kind: FileKind,
        nlink: u32,
    },
    /// A symlink, xattr or block of an inode that does not exist.
    RecordOfMissingInode {
        what: String,
        ino: u64,
    },
    SymlinkWithoutTarget {
        ino: u64,
    },
    TargetOfNonSymlink {
        ino: u64,
        kind: FileKind,
    },
    SymlinkSize {
        ino: u64,
        size: u64,
        target_len: usize,
    },
    BlockOfNonFile {
        ino: u64,
        index: u64,
        kind: FileKind,
    },
    BlockPastSize {
        ino: u64,
        index: u64,
        size: u64,
    },
    BytesPastSize {
        ino: u64,
        index: u64,
        size: u64,
        stored_to: u64,
    },
    /// The space counters disagree with what is stored.
    Counter {
        what: &'static str,
        counted: u64,
        found: u64,
    },
    /// An extent names a segment file that does not exist (or the volume
    /// keeps no segment files).
    MissingSegment {
        ino: u64,
        index: u64,
        seg: u64,
    },
    /// An extent's piece runs past the end of its segment file.
    ExtentPastSegment {
        ino: u64,
        index: u64,
        seg: u64,
        end: u64,
        seg_len: u64,
    },
    /// Segment bytes an extent refers to do not match its checksum.
    ExtentChecksum {
        ino: u64,
        index: u64,
        seg: u64,
        offset: u64,
    },
    /// A segment record's live bytes disagree with the extents found.
    SegmentLive {
        seg: u64,
        counted: u64,
        found: u64,
    },
}

/// Legal but worth knowing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Warning {
    /// An unlinked inode still stored (see the module documentation).
    Orphan {
        ino: u64,
        kind: FileKind,
        size: u64,
        blocks: u64,
    },
    /// Segment pages that hold data no extent refers to: bytes written for
    /// a commit that never completed, or a punch that failed.
    LeakedSpace { seg: u64, bytes: u64 },
    /// A data object (`s3://`) that no record and no extent names: the
    /// upload of a commit that never became durable.
    LeakedObject { id: u64, bytes: u64 },
    /// A snapshot or clone (`s3://`) registered with this volume but not
    /// complete (a crash half way): it keeps every object below its bound.
    IncompleteHolder { holder: String, bound: u64 },
}

pub(super) fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl fmt::Display for Problem {
    #[allow(clippy::too_many_lines)] // one arm per problem: a table of messages
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Problem::*;
        match self {
            Unreadable(m) => write!(f, "unreadable record: {m}"),
            HeldObjectMissing { holder, id } => write!(
                f,
                "data object {id:016x} of this volume is named by {holder}, which registered it, but is gone"
            ),
            NoSuperblock => write!(f, "no superblock: not a pohmelfs volume"),
            FormatVersion(v) => write!(
                f,
                "superblock has format version {v}; this build reads version {}",
                crate::store::engine::FORMAT_VERSION
            ),
            UnknownRecord(k) => write!(f, "unknown record type: key {k:02x?}"),
            NoRoot => write!(f, "root directory (inode {ROOT_INO}) is missing"),
            RootNotDirectory(k) => write!(f, "root inode {ROOT_INO} is a {k:?}, not a directory"),
            RootParent(p) => write!(f, "root's parent is inode {p}, not itself"),
            RootNamed { parent, name } => {
                write!(f, "entry {name:?} of directory {parent} names the root")
            }
            ReservedInode(ino) => write!(f, "inode {ino} is in the reserved range below {FIRST_FREE_ID}"),
            IdNotReserved { what, id, next_id } => write!(
                f,
                "{what} {id} is not below the superblock's next id {next_id}: it may be handed out again"
            ),
            BadName { parent, name } => write!(f, "entry {name:?} of directory {parent} has an invalid name"),
            EntryOutsideDirectory { parent, name, found } => match found {
                None => write!(f, "entry {name:?} is in directory {parent}, which does not exist"),
                Some(k) => write!(f, "entry {name:?} is in inode {parent}, a {k:?}, not a directory"),
            },
            DanglingEntry { parent, name, ino } => write!(
                f,
                "dangling entry: {name:?} in directory {parent} names inode {ino}, which does not exist"
            ),
            EntryKind { parent, name, ino, entry, inode } => write!(
                f,
                "entry {name:?} in directory {parent} says inode {ino} is a {entry:?}; it is a {inode:?}"
            ),
            MissingCookieIndex { parent, name, cookie } => write!(
                f,
                "entry {name:?} in directory {parent} has no by-cookie record (cookie {cookie}): readdir misses it"
            ),
            MissingNameIndex { parent, name, cookie } => write!(
                f,
                "by-cookie record {cookie} of directory {parent} ({name:?}) has no by-name record: lookup misses it"
            ),
            IndexMismatch { parent, name, cookie, detail } => write!(
                f,
                "entry {name:?} in directory {parent} (cookie {cookie}): the two indexes disagree: {detail}"
            ),
            DuplicateCookie { cookie, first, second } => write!(
                f,
                "cookie {cookie} is used by entry {:?} of directory {} and by entry {:?} of directory {}",
                first.1, first.0, second.1, second.0
            ),
            ReservedCookie { parent, name, cookie } => write!(
                f,
                "entry {name:?} in directory {parent} has cookie {cookie}, in the reserved range below {FIRST_FREE_ID}"
            ),
            DirectoryLinks { ino, nlink, expected } => write!(
                f,
                "directory {ino} has link count {nlink}; 2 + its subdirectories is {expected}"
            ),
            FileLinks { ino, kind, nlink, entries } => write!(
                f,
                "{kind:?} inode {ino} has link count {nlink} but {entries} entries name it"
            ),
            DirectoryParent { ino, parent, held_by } => write!(
                f,
                "directory {ino} says its parent (..) is {parent}, but directory {held_by} holds it"
            ),
            DirectoryHardLinked { ino, entries } => {
                write!(f, "directory {ino} is named by {} entries:", entries.len())?;
                for (p, n) in entries {
                    write!(f, " {n:?} in {p}")?;
                }
                Ok(())
            }
            Unreachable { ino, kind, nlink } => write!(
                f,
                "{kind:?} inode {ino} (link count {nlink}) is not reachable from the root"
            ),
            RecordOfMissingInode { what, ino } => {
                write!(f, "{what} of inode {ino}, which does not exist")
            }
            SymlinkWithoutTarget { ino } => write!(f, "symlink {ino} has no target"),
            TargetOfNonSymlink { ino, kind } => {
                write!(f, "{kind:?} inode {ino} has a symlink target")
            }
            SymlinkSize { ino, size, target_len } => write!(
                f,
                "symlink {ino} has size {size} but its target is {target_len} bytes"
            ),
            BlockOfNonFile { ino, index, kind } => {
                write!(f, "{kind:?} inode {ino} has data block {index}")
            }
            BlockPastSize { ino, index, size } => write!(
                f,
                "file {ino} of size {size} has block {index}, wholly past its end"
            ),
            BytesPastSize { ino, index, size, stored_to } => write!(
                f,
                "file {ino} of size {size} stores nonzero bytes up to offset {stored_to} in block {index}"
            ),
            Counter { what, counted, found } => write!(
                f,
                "space counters say {counted} {what}; the volume holds {found}"
            ),
            MissingSegment { ino, index, seg } => write!(
                f,
                "block {index} of file {ino} refers to segment {seg}, which does not exist"
            ),
            ExtentPastSegment { ino, index, seg, end, seg_len } => write!(
                f,
                "block {index} of file {ino} refers to segment {seg} up to offset {end}; it holds {seg_len} bytes"
            ),
            ExtentChecksum { ino, index, seg, offset } => write!(
                f,
                "block {index} of file {ino}: segment {seg} page at offset {offset} does not match its checksum"
            ),
            SegmentLive { seg, counted, found } => write!(
                f,
                "segment {seg}'s record counts {counted} live bytes; extents refer to {found}"
            ),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::Orphan { ino, kind, size, blocks } => write!(
                f,
                "orphan: {kind:?} inode {ino} (size {size}, {blocks} blocks) is unlinked but still stored \
                 (a guest holds it open, or held it when its daemon stopped)"
            ),
            Warning::LeakedSpace { seg, bytes } => write!(
                f,
                "leaked space: segment {seg} holds {bytes} bytes no extent refers to \
                 (written for a commit that never completed)"
            ),
            Warning::LeakedObject { id, bytes } => write!(
                f,
                "leaked object: data object {id:016x} ({bytes} bytes) is named by no record \
                 (uploaded for a commit that never completed; the next open deletes it)"
            ),
            Warning::IncompleteHolder { holder, bound } => write!(
                f,
                "incomplete holder: {holder} registered with this volume but has no lineage or engine                  (a snapshot or clone interrupted); objects below {bound:016x} stay until it is deleted                  (the volume's next open removes its own snapshots; `pohmelfs clone --delete` a clone)"
            ),
        }
    }
}
