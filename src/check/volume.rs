//! The volume checker behind `pohmelfs check`: reads every record of a
//! volume through [`VolumeScan`] and reports what breaks the invariants the
//! filesystem layer keeps.
//!
//! * Every directory entry names a live inode of the kind it says, in a
//!   directory that exists, with a valid name.
//! * The two entry indexes (by name, by cookie) hold the same entries, and
//!   every cookie is unique in the volume and outside the reserved range.
//! * A directory's link count is 2 plus its subdirectories, its `parent`
//!   (`..`) is the one directory that holds it; the root is held by none
//!   and is its own parent. Any other inode's link count is the number of
//!   entries naming it.
//! * Every inode is reachable from the root, except orphans: inodes with
//!   link count 0 that no entry names. The daemon keeps those while a guest
//!   holds them open after unlink and removes them when it forgets them or
//!   its session ends; a daemon that crashed leaves them behind. They are
//!   legal — a space leak, not an inconsistency — so they are warnings.
//! * Symlink targets, extended attributes and data blocks belong to live
//!   inodes of the right kind; a symlink has a target as long as its size;
//!   no block lies wholly past its file's size and no nonzero byte is
//!   stored past it (growing the file would bring it back).
//! * Every extent of a block lies inside the segment file it names and
//!   matches its checksums; each segment record counts exactly the live
//!   bytes the extents refer to; segment pages holding data no extent
//!   refers to are leaked space (a warning, like orphans), unless another
//!   volume (a snapshot or clone) links the same file: shared segments are
//!   reported as notes, with their link counts.
//! * No inode number or cookie is at or above the superblock's `next_id`
//!   (a later allocation would hand it out again), and the space counters
//!   match the inodes, blocks and metadata bytes actually stored.
//! * No key outside the layout, and every record decodes.
//!
//! The layout keeps no low-water mark for applied-transaction records
//! (clients prune their own), so those are reported as counts per session.
//!
//! This module only reads; it never repairs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use thiserror::Error;

use super::problem::lossy;
pub use super::problem::{Problem, Warning};
use super::segments::SegmentCheck;
pub use super::segments::SharedSegment;
use crate::store::engine::{reads_format, BlockRecord, DirentRecord, Scan, VolumeInfo, VolumeScan};
use crate::store::{
    Dirent, FileKind, Inode, StoreError, BLOCK_SIZE, FIRST_FREE_ID, NAME_MAX, ROOT_INO,
};

/// Applied-transaction records of one client session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecords {
    pub session: u64,
    pub count: u64,
    pub lowest: u64,
    pub highest: u64,
}

/// What a check found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub volume: String,
    pub inodes: u64,
    pub entries: u64,
    pub blocks: u64,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Warning>,
    pub sessions: Vec<SessionRecords>,
    /// Segment files shared with snapshots or clones (hard links).
    pub shared: Vec<SharedSegment>,
}

impl Report {
    /// Whether the volume is consistent (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The one-line summary, `check: N inodes, N entries, N blocks, N problems, N warnings`.
    pub fn summary(&self) -> String {
        format!(
            "check: {} inodes, {} entries, {} blocks, {} problems, {} warnings",
            self.inodes,
            self.entries,
            self.blocks,
            self.problems.len(),
            self.warnings.len()
        )
    }

    /// Every line `pohmelfs check` prints: problems, warnings, applied
    /// records, then the summary.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.problems.iter().map(|p| format!("problem: {p}")));
        out.extend(self.warnings.iter().map(|w| format!("warning: {w}")));
        for s in &self.sessions {
            out.push(format!(
                "note: session {:016x} has {} applied-transaction records (txn ids {}..={}); \
                 the layout keeps no low-water mark to judge them by",
                s.session, s.count, s.lowest, s.highest
            ));
        }
        for s in &self.shared {
            out.push(format!(
                "note: segment {} is shared ({} links: this volume and its snapshots or clones; \
                 on s3:// a data object and the holders naming it); \
                 {} bytes of it are not referenced here and are kept for the others",
                s.seg, s.links, s.unreferenced_bytes
            ));
        }
        out.push(self.summary());
        out
    }
}

/// Why a check could not finish (the volume could not be read; what it
/// holds is reported as [`Problem`]s instead).
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("read the superblock")]
    Superblock(#[source] StoreError),
    #[error("scan {0}")]
    Scan(&'static str, #[source] StoreError),
}

/// What the checker learns about one inode.
struct Node {
    inode: Inode,
    /// Entries naming it: `(parent, name)`.
    named_by: Vec<(u64, Vec<u8>)>,
    /// Subdirectories (for directories).
    subdirs: u32,
    /// Children (for directories), for the reachability walk.
    children: Vec<u64>,
    has_target: bool,
    blocks: u64,
}

fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

/// Check the volume `v`. See the module documentation for what is checked.
///
/// One pass per record type, in key order of the layout, then the passes
/// over what they gathered: counters, then links, parents and reachability.
pub fn check_volume(v: &dyn VolumeScan) -> Result<Report, CheckError> {
    check_volume_reporting(v, &mut |_, _| {})
}

/// As [`check_volume`], calling `phase(name, items)` as each pass over
/// the volume ends (`items`: what it read, where it counts them): the
/// progress a long check shows.
pub fn check_volume_reporting(
    v: &dyn VolumeScan,
    phase: &mut dyn FnMut(&'static str, Option<u64>),
) -> Result<Report, CheckError> {
    let mut problems = Vec::new();
    let segs = SegmentCheck::new(v.segment_files(), v.object_files(), &mut problems);
    let mut c = Checker {
        next_id: u64::MAX,
        nodes: BTreeMap::new(),
        problems,
        segs,
    };
    let info = c.superblock(v)?;
    let inodes = c.inodes(v)?;
    phase("inodes", Some(inodes));
    c.root();
    let entries = c.entries(v)?;
    phase("directory entries", Some(entries));
    c.symlinks(v)?;
    c.xattrs(v)?;
    phase("symlinks and extended attributes", None);
    let blocks = c.blocks(v)?;
    phase("data blocks", Some(blocks));
    let segment_records = c.segment_records(v)?;
    let sessions = c.applied(v)?;
    c.unknown(v)?;
    phase("segments and applied records", None);
    if let Some(info) = &info {
        c.counters(info, inodes, blocks);
        let meta = v
            .metadata_bytes()
            .map_err(|e| CheckError::Scan("metadata bytes", e))?;
        if info.counted_meta_bytes != meta {
            c.problems.push(Problem::Counter {
                what: "metadata bytes",
                counted: info.counted_meta_bytes,
                found: meta,
            });
        }
    }
    let mut warnings = c.links();
    let mut shared = Vec::new();
    c.segs.finish(
        &segment_records,
        &mut c.problems,
        &mut warnings,
        &mut shared,
    );
    Ok(Report {
        volume: String::new(),
        inodes,
        entries,
        blocks,
        problems: c.problems,
        warnings,
        sessions,
        shared,
    })
}

/// One check under way: what it learned of each inode, and the problems
/// found so far, in the order they were found.
struct Checker {
    /// The superblock's `next_id` (`u64::MAX` without a superblock).
    next_id: u64,
    nodes: BTreeMap<u64, Node>,
    problems: Vec<Problem>,
    segs: SegmentCheck,
}

/// The by-cookie entry index, and the owners of the cookies seen, while
/// the by-name entries are matched against it.
struct EntryIndex {
    by_cookie: HashMap<(u64, u64), Dirent>,
    cookie_owner: HashMap<u64, (u64, String)>,
}

impl Checker {
    /// Run `each` on every record of one scan: records that do not decode
    /// become problems, an engine error ends the check.
    fn collect<T>(
        &mut self,
        what: &'static str,
        scan: Result<Scan<'_, T>, StoreError>,
        mut each: impl FnMut(&mut Self, T),
    ) -> Result<(), CheckError> {
        for item in scan.map_err(|e| CheckError::Scan(what, e))? {
            match item {
                Ok(v) => each(self, v),
                Err(StoreError::Corrupt(m)) => self.problems.push(Problem::Unreadable(m)),
                Err(e) => return Err(CheckError::Scan(what, e)),
            }
        }
        Ok(())
    }

    /// The superblock and counters, if they can be read.
    fn superblock(&mut self, v: &dyn VolumeScan) -> Result<Option<VolumeInfo>, CheckError> {
        let info = match v.volume_info() {
            Ok(info) => info,
            Err(StoreError::Corrupt(m)) if m.contains("no superblock") => {
                self.problems.push(Problem::NoSuperblock);
                return Ok(None);
            }
            Err(StoreError::Corrupt(m)) => {
                let m = format!("superblock or counters: {m}");
                self.problems.push(Problem::Unreadable(m));
                return Ok(None);
            }
            Err(e) => return Err(CheckError::Superblock(e)),
        };
        if !reads_format(info.format_version) {
            self.problems
                .push(Problem::FormatVersion(info.format_version));
        }
        self.next_id = info.next_id;
        Ok(Some(info))
    }

    /// Every inode, with its number checked; how many there are.
    fn inodes(&mut self, v: &dyn VolumeScan) -> Result<u64, CheckError> {
        self.collect("inodes", v.scan_inodes(), |c, inode| {
            if inode.ino != ROOT_INO && inode.ino < FIRST_FREE_ID {
                c.problems.push(Problem::ReservedInode(inode.ino));
            }
            if inode.ino >= c.next_id {
                c.problems.push(Problem::IdNotReserved {
                    what: "inode",
                    id: inode.ino,
                    next_id: c.next_id,
                });
            }
            c.nodes.insert(
                inode.ino,
                Node {
                    inode,
                    named_by: Vec::new(),
                    subdirs: 0,
                    children: Vec::new(),
                    has_target: false,
                    blocks: 0,
                },
            );
        })?;
        Ok(self.nodes.len() as u64)
    }

    /// The root is a directory and its own parent.
    fn root(&mut self) {
        let problem = match self.nodes.get(&ROOT_INO) {
            // A volume no daemon has served yet (just formatted, or a
            // copy's empty destination): the first serve makes the root.
            None if self.nodes.is_empty() => return,
            None => Problem::NoRoot,
            Some(root) if root.inode.kind != FileKind::Directory => {
                Problem::RootNotDirectory(root.inode.kind)
            }
            Some(root) if root.inode.parent != ROOT_INO => Problem::RootParent(root.inode.parent),
            Some(_) => return,
        };
        self.problems.push(problem);
    }

    /// Entries: the by-cookie index first, then every by-name entry is
    /// matched against it; how many by-name entries there are.
    fn entries(&mut self, v: &dyn VolumeScan) -> Result<u64, CheckError> {
        let mut index = EntryIndex {
            by_cookie: HashMap::new(),
            cookie_owner: HashMap::new(),
        };
        self.collect("entries by cookie", v.scan_dirents_by_cookie(), |_, d| {
            index
                .by_cookie
                .insert((d.parent, d.dirent.cookie), d.dirent);
        })?;
        let mut entries = 0u64;
        self.collect("entries by name", v.scan_dirents_by_name(), |c, d| {
            entries += 1;
            c.entry(&mut index, d);
        })?;
        let mut unmatched: Vec<_> = index.by_cookie.into_iter().collect();
        unmatched.sort_by_key(|(k, _)| *k);
        for ((parent, cookie), d) in unmatched {
            self.problems.push(Problem::MissingNameIndex {
                parent,
                name: lossy(&d.name),
                cookie,
            });
        }
        Ok(entries)
    }

    /// One by-name entry: its name, its cookie and its twin in the
    /// by-cookie index, its directory, and the inode it names.
    fn entry(&mut self, index: &mut EntryIndex, d: DirentRecord) {
        let (parent, e) = (d.parent, d.dirent);
        let name = lossy(&e.name);
        if !valid_name(&e.name) {
            self.problems.push(Problem::BadName {
                parent,
                name: name.clone(),
            });
        }
        self.entry_cookie(index, parent, &e, &name);
        match self.nodes.get(&parent).map(|n| n.inode.kind) {
            Some(FileKind::Directory) => {}
            found => self.problems.push(Problem::EntryOutsideDirectory {
                parent,
                name: name.clone(),
                found,
            }),
        }
        self.entry_target(parent, e, name);
    }

    /// An entry's cookie: its by-cookie twin, its range, its uniqueness.
    fn entry_cookie(&mut self, index: &mut EntryIndex, parent: u64, e: &Dirent, name: &str) {
        let p = &mut self.problems;
        match index.by_cookie.remove(&(parent, e.cookie)) {
            None => p.push(Problem::MissingCookieIndex {
                parent,
                name: name.to_string(),
                cookie: e.cookie,
            }),
            Some(twin) if twin != *e => {
                let detail = format!(
                    "by name: inode {} {:?} {:?}; by cookie: inode {} {:?} {:?}",
                    e.ino,
                    e.kind,
                    name,
                    twin.ino,
                    twin.kind,
                    lossy(&twin.name)
                );
                p.push(Problem::IndexMismatch {
                    parent,
                    name: name.to_string(),
                    cookie: e.cookie,
                    detail,
                });
            }
            Some(_) => {}
        }
        if e.cookie < FIRST_FREE_ID {
            p.push(Problem::ReservedCookie {
                parent,
                name: name.to_string(),
                cookie: e.cookie,
            });
        }
        if e.cookie >= self.next_id {
            p.push(Problem::IdNotReserved {
                what: "cookie",
                id: e.cookie,
                next_id: self.next_id,
            });
        }
        let owner = (parent, name.to_string());
        if let Some(first) = index.cookie_owner.insert(e.cookie, owner.clone()) {
            p.push(Problem::DuplicateCookie {
                cookie: e.cookie,
                first,
                second: owner,
            });
        }
    }

    /// The inode an entry names: it exists, has the entry's kind, is not
    /// the root; it learns its name and its directory learns a child.
    fn entry_target(&mut self, parent: u64, e: Dirent, name: String) {
        let Some(target) = self.nodes.get_mut(&e.ino) else {
            self.problems.push(Problem::DanglingEntry {
                parent,
                name,
                ino: e.ino,
            });
            return;
        };
        if target.inode.kind != e.kind {
            self.problems.push(Problem::EntryKind {
                parent,
                name: name.clone(),
                ino: e.ino,
                entry: e.kind,
                inode: target.inode.kind,
            });
        }
        if e.ino == ROOT_INO {
            self.problems.push(Problem::RootNamed { parent, name });
        }
        target.named_by.push((parent, e.name));
        let is_dir = target.inode.kind == FileKind::Directory;
        let dir = self
            .nodes
            .get_mut(&parent)
            .filter(|d| d.inode.kind == FileKind::Directory);
        if let Some(dir) = dir {
            dir.children.push(e.ino);
            if is_dir {
                dir.subdirs += 1;
            }
        }
    }

    /// Symlink targets belong to symlinks of the target's length.
    fn symlinks(&mut self, v: &dyn VolumeScan) -> Result<(), CheckError> {
        self.collect("symlink targets", v.scan_symlinks(), |c, (ino, target)| {
            let Some(n) = c.nodes.get_mut(&ino) else {
                c.problems.push(Problem::RecordOfMissingInode {
                    what: "symlink target".into(),
                    ino,
                });
                return;
            };
            n.has_target = true;
            if n.inode.kind != FileKind::Symlink {
                c.problems.push(Problem::TargetOfNonSymlink {
                    ino,
                    kind: n.inode.kind,
                });
            } else if n.inode.size != target.len() as u64 {
                c.problems.push(Problem::SymlinkSize {
                    ino,
                    size: n.inode.size,
                    target_len: target.len(),
                });
            }
        })
    }

    /// Extended attributes belong to live inodes.
    fn xattrs(&mut self, v: &dyn VolumeScan) -> Result<(), CheckError> {
        self.collect("extended attributes", v.scan_xattrs(), |c, x| {
            if !c.nodes.contains_key(&x.ino) {
                c.problems.push(Problem::RecordOfMissingInode {
                    what: format!("extended attribute {:?}", lossy(&x.name)),
                    ino: x.ino,
                });
            }
        })
    }

    /// Data blocks belong to regular files and hold nothing past their
    /// size; how many blocks there are.
    fn blocks(&mut self, v: &dyn VolumeScan) -> Result<u64, CheckError> {
        let mut blocks = 0u64;
        self.collect("data blocks", v.scan_blocks(), |c, b| {
            blocks += 1;
            c.block(b);
        })?;
        Ok(blocks)
    }

    fn block(&mut self, b: BlockRecord) {
        let nonzero_len = self
            .segs
            .chunk(b.ino, b.index, &b.extents, &mut self.problems);
        let Some(n) = self.nodes.get_mut(&b.ino) else {
            self.problems.push(Problem::RecordOfMissingInode {
                what: format!("data block {}", b.index),
                ino: b.ino,
            });
            return;
        };
        n.blocks += 1;
        let (ino, index, size) = (b.ino, b.index, n.inode.size);
        if n.inode.kind != FileKind::Regular {
            self.problems.push(Problem::BlockOfNonFile {
                ino,
                index,
                kind: n.inode.kind,
            });
            return;
        }
        let start = index.saturating_mul(BLOCK_SIZE);
        if start >= size {
            self.problems
                .push(Problem::BlockPastSize { ino, index, size });
        } else if start.saturating_add(nonzero_len) > size {
            self.problems.push(Problem::BytesPastSize {
                ino,
                index,
                size,
                stored_to: start + nonzero_len,
            });
        }
    }

    /// Segment records, as live bytes by segment id.
    fn segment_records(&mut self, v: &dyn VolumeScan) -> Result<BTreeMap<u64, u64>, CheckError> {
        let mut out = BTreeMap::new();
        self.collect("segment records", v.scan_segments(), |_, (seg, live)| {
            out.insert(seg, live);
        })?;
        Ok(out)
    }

    /// Applied-transaction records, counted per session.
    fn applied(&mut self, v: &dyn VolumeScan) -> Result<Vec<SessionRecords>, CheckError> {
        let mut sessions: BTreeMap<u64, SessionRecords> = BTreeMap::new();
        self.collect("applied records", v.scan_applied(), |_, (session, txn)| {
            let s = sessions.entry(session).or_insert(SessionRecords {
                session,
                count: 0,
                lowest: txn,
                highest: txn,
            });
            s.count += 1;
            s.lowest = s.lowest.min(txn);
            s.highest = s.highest.max(txn);
        })?;
        Ok(sessions.into_values().collect())
    }

    /// Keys outside the layout.
    fn unknown(&mut self, v: &dyn VolumeScan) -> Result<(), CheckError> {
        self.collect("unknown records", v.scan_unknown(), |c, k| {
            c.problems.push(Problem::UnknownRecord(k));
        })
    }

    /// The space counters match the inodes and blocks found.
    fn counters(&mut self, info: &VolumeInfo, inodes: u64, blocks: u64) {
        if info.counted_inodes != inodes {
            self.problems.push(Problem::Counter {
                what: "inodes",
                counted: info.counted_inodes,
                found: inodes,
            });
        }
        if info.counted_blocks != blocks {
            self.problems.push(Problem::Counter {
                what: "blocks",
                counted: info.counted_blocks,
                found: blocks,
            });
        }
    }

    /// Link counts, parents, targets and reachability of every inode; the
    /// orphans, as warnings.
    fn links(&mut self) -> Vec<Warning> {
        let reachable = reachable_from_root(&self.nodes);
        let mut warnings = Vec::new();
        for (&ino, n) in &self.nodes {
            let i = &n.inode;
            let orphan = i.nlink == 0 && n.named_by.is_empty() && ino != ROOT_INO;
            if orphan {
                warnings.push(Warning::Orphan {
                    ino,
                    kind: i.kind,
                    size: i.size,
                    blocks: n.blocks,
                });
            }
            if i.kind == FileKind::Symlink && !n.has_target {
                self.problems.push(Problem::SymlinkWithoutTarget { ino });
            }
            if i.kind == FileKind::Directory {
                directory_links(ino, n, orphan, &mut self.problems);
            } else if !orphan && i.nlink as usize != n.named_by.len() {
                self.problems.push(Problem::FileLinks {
                    ino,
                    kind: i.kind,
                    nlink: i.nlink,
                    entries: n.named_by.len() as u32,
                });
            }
            if !orphan && !reachable.contains(&ino) {
                self.problems.push(Problem::Unreachable {
                    ino,
                    kind: i.kind,
                    nlink: i.nlink,
                });
            }
        }
        warnings
    }
}

/// A directory's link count (unless it is an orphan), and the one entry
/// naming it, in the directory its `..` names.
fn directory_links(ino: u64, n: &Node, orphan: bool, p: &mut Vec<Problem>) {
    let i = &n.inode;
    if !orphan {
        let expected = 2 + n.subdirs;
        if i.nlink != expected {
            p.push(Problem::DirectoryLinks {
                ino,
                nlink: i.nlink,
                expected,
            });
        }
    }
    if n.named_by.len() > 1 {
        p.push(Problem::DirectoryHardLinked {
            ino,
            entries: n
                .named_by
                .iter()
                .map(|(d, name)| (*d, lossy(name)))
                .collect(),
        });
    } else if let Some((held_by, _)) = n.named_by.first() {
        if i.parent != *held_by {
            p.push(Problem::DirectoryParent {
                ino,
                parent: i.parent,
                held_by: *held_by,
            });
        }
    }
}

/// The inodes the root reaches through entries.
fn reachable_from_root(nodes: &BTreeMap<u64, Node>) -> HashSet<u64> {
    let mut seen = HashSet::new();
    if !nodes.contains_key(&ROOT_INO) {
        return seen;
    }
    let mut queue = VecDeque::from([ROOT_INO]);
    seen.insert(ROOT_INO);
    while let Some(ino) = queue.pop_front() {
        let Some(n) = nodes.get(&ino) else { continue };
        for &child in &n.children {
            if nodes.contains_key(&child) && seen.insert(child) {
                queue.push_back(child);
            }
        }
    }
    seen
}

#[cfg(test)]
#[path = "volume_tests.rs"]
mod tests;
