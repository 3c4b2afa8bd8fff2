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
//! * No inode number or cookie is at or above the superblock's `next_id`
//!   (a later allocation would hand it out again), and the space counters
//!   match the inodes and blocks actually stored.
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
use crate::store::engine::VolumeScan;
use crate::store::{FileKind, Inode, StoreError, BLOCK_SIZE, FIRST_FREE_ID, NAME_MAX, ROOT_INO};

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

/// Collect one scan: records that do not decode become problems, an engine
/// error ends the check.
fn collect<T>(
    what: &'static str,
    scan: Result<crate::store::engine::Scan<'_, T>, StoreError>,
    problems: &mut Vec<Problem>,
    mut each: impl FnMut(T, &mut Vec<Problem>),
) -> Result<(), CheckError> {
    for item in scan.map_err(|e| CheckError::Scan(what, e))? {
        match item {
            Ok(v) => each(v, problems),
            Err(StoreError::Corrupt(m)) => problems.push(Problem::Unreadable(m)),
            Err(e) => return Err(CheckError::Scan(what, e)),
        }
    }
    Ok(())
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
pub fn check_volume(v: &dyn VolumeScan) -> Result<Report, CheckError> {
    let mut r = Report::default();
    let mut p = Vec::new();

    let info = match v.volume_info() {
        Ok(info) => Some(info),
        Err(StoreError::Corrupt(m)) if m.contains("no superblock") => {
            p.push(Problem::NoSuperblock);
            None
        }
        Err(StoreError::Corrupt(m)) => {
            p.push(Problem::Unreadable(format!("superblock or counters: {m}")));
            None
        }
        Err(e) => return Err(CheckError::Superblock(e)),
    };
    if let Some(info) = &info {
        if info.format_version != 1 {
            p.push(Problem::FormatVersion(info.format_version));
        }
    }
    let next_id = info.as_ref().map_or(u64::MAX, |i| i.next_id);

    // Inodes.
    let mut nodes: BTreeMap<u64, Node> = BTreeMap::new();
    collect("inodes", v.scan_inodes(), &mut p, |inode, p| {
        if inode.ino != ROOT_INO && inode.ino < FIRST_FREE_ID {
            p.push(Problem::ReservedInode(inode.ino));
        }
        if inode.ino >= next_id {
            p.push(Problem::IdNotReserved {
                what: "inode",
                id: inode.ino,
                next_id,
            });
        }
        nodes.insert(
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
    r.inodes = nodes.len() as u64;
    match nodes.get(&ROOT_INO) {
        None => p.push(Problem::NoRoot),
        Some(root) if root.inode.kind != FileKind::Directory => {
            p.push(Problem::RootNotDirectory(root.inode.kind))
        }
        Some(root) if root.inode.parent != ROOT_INO => {
            p.push(Problem::RootParent(root.inode.parent))
        }
        Some(_) => {}
    }

    // Entries: the by-cookie index first, then every by-name entry is
    // matched against it.
    let mut by_cookie: HashMap<(u64, u64), crate::store::Dirent> = HashMap::new();
    collect(
        "entries by cookie",
        v.scan_dirents_by_cookie(),
        &mut p,
        |d, _| {
            by_cookie.insert((d.parent, d.dirent.cookie), d.dirent);
        },
    )?;
    let mut cookie_owner: HashMap<u64, (u64, String)> = HashMap::new();
    let mut entries = 0u64;
    collect(
        "entries by name",
        v.scan_dirents_by_name(),
        &mut p,
        |d, p| {
            entries += 1;
            let (parent, e) = (d.parent, d.dirent);
            let name = lossy(&e.name);
            if !valid_name(&e.name) {
                p.push(Problem::BadName {
                    parent,
                    name: name.clone(),
                });
            }
            match by_cookie.remove(&(parent, e.cookie)) {
                None => p.push(Problem::MissingCookieIndex {
                    parent,
                    name: name.clone(),
                    cookie: e.cookie,
                }),
                Some(twin) if twin != e => {
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
                        name: name.clone(),
                        cookie: e.cookie,
                        detail,
                    });
                }
                Some(_) => {}
            }
            if e.cookie < FIRST_FREE_ID {
                p.push(Problem::ReservedCookie {
                    parent,
                    name: name.clone(),
                    cookie: e.cookie,
                });
            }
            if e.cookie >= next_id {
                p.push(Problem::IdNotReserved {
                    what: "cookie",
                    id: e.cookie,
                    next_id,
                });
            }
            if let Some(first) = cookie_owner.insert(e.cookie, (parent, name.clone())) {
                p.push(Problem::DuplicateCookie {
                    cookie: e.cookie,
                    first,
                    second: (parent, name.clone()),
                });
            }
            match nodes.get(&parent).map(|n| n.inode.kind) {
                Some(FileKind::Directory) => {}
                found => p.push(Problem::EntryOutsideDirectory {
                    parent,
                    name: name.clone(),
                    found,
                }),
            }
            let Some(target) = nodes.get_mut(&e.ino) else {
                p.push(Problem::DanglingEntry {
                    parent,
                    name,
                    ino: e.ino,
                });
                return;
            };
            if target.inode.kind != e.kind {
                p.push(Problem::EntryKind {
                    parent,
                    name: name.clone(),
                    ino: e.ino,
                    entry: e.kind,
                    inode: target.inode.kind,
                });
            }
            if e.ino == ROOT_INO {
                p.push(Problem::RootNamed { parent, name });
            }
            target.named_by.push((parent, e.name));
            let is_dir = target.inode.kind == FileKind::Directory;
            let dir = nodes
                .get_mut(&parent)
                .filter(|d| d.inode.kind == FileKind::Directory);
            if let Some(dir) = dir {
                dir.children.push(e.ino);
                if is_dir {
                    dir.subdirs += 1;
                }
            }
        },
    )?;
    r.entries = entries;
    let mut unmatched: Vec<_> = by_cookie.into_iter().collect();
    unmatched.sort_by_key(|(k, _)| *k);
    for ((parent, cookie), d) in unmatched {
        p.push(Problem::MissingNameIndex {
            parent,
            name: lossy(&d.name),
            cookie,
        });
    }

    // Symlink targets.
    collect(
        "symlink targets",
        v.scan_symlinks(),
        &mut p,
        |(ino, target), p| {
            let Some(n) = nodes.get_mut(&ino) else {
                p.push(Problem::RecordOfMissingInode {
                    what: "symlink target".into(),
                    ino,
                });
                return;
            };
            n.has_target = true;
            if n.inode.kind != FileKind::Symlink {
                p.push(Problem::TargetOfNonSymlink {
                    ino,
                    kind: n.inode.kind,
                });
            } else if n.inode.size != target.len() as u64 {
                p.push(Problem::SymlinkSize {
                    ino,
                    size: n.inode.size,
                    target_len: target.len(),
                });
            }
        },
    )?;

    // Extended attributes.
    collect("extended attributes", v.scan_xattrs(), &mut p, |x, p| {
        if !nodes.contains_key(&x.ino) {
            p.push(Problem::RecordOfMissingInode {
                what: format!("extended attribute {:?}", lossy(&x.name)),
                ino: x.ino,
            });
        }
    })?;

    // Data blocks.
    let mut blocks = 0u64;
    collect("data blocks", v.scan_blocks(), &mut p, |b, p| {
        blocks += 1;
        let Some(n) = nodes.get_mut(&b.ino) else {
            p.push(Problem::RecordOfMissingInode {
                what: format!("data block {}", b.index),
                ino: b.ino,
            });
            return;
        };
        n.blocks += 1;
        let (ino, index, size) = (b.ino, b.index, n.inode.size);
        if n.inode.kind != FileKind::Regular {
            p.push(Problem::BlockOfNonFile {
                ino,
                index,
                kind: n.inode.kind,
            });
            return;
        }
        let start = index.saturating_mul(BLOCK_SIZE);
        if start >= size {
            p.push(Problem::BlockPastSize { ino, index, size });
        } else if start.saturating_add(b.nonzero_len as u64) > size {
            p.push(Problem::BytesPastSize {
                ino,
                index,
                size,
                stored_to: start + b.nonzero_len as u64,
            });
        }
    })?;
    r.blocks = blocks;

    // Applied-transaction records, counted per session.
    let mut sessions: BTreeMap<u64, SessionRecords> = BTreeMap::new();
    collect(
        "applied records",
        v.scan_applied(),
        &mut p,
        |(session, txn), _| {
            let s = sessions.entry(session).or_insert(SessionRecords {
                session,
                count: 0,
                lowest: txn,
                highest: txn,
            });
            s.count += 1;
            s.lowest = s.lowest.min(txn);
            s.highest = s.highest.max(txn);
        },
    )?;
    r.sessions = sessions.into_values().collect();

    collect("unknown records", v.scan_unknown(), &mut p, |k, p| {
        p.push(Problem::UnknownRecord(k));
    })?;

    if let Some(info) = &info {
        if info.counted_inodes != r.inodes {
            p.push(Problem::Counter {
                what: "inodes",
                counted: info.counted_inodes,
                found: r.inodes,
            });
        }
        if info.counted_blocks != r.blocks {
            p.push(Problem::Counter {
                what: "blocks",
                counted: info.counted_blocks,
                found: r.blocks,
            });
        }
    }

    // Link counts, parents, targets, orphans.
    let reachable = reachable_from_root(&nodes);
    for (ino, n) in &nodes {
        let (ino, i) = (*ino, &n.inode);
        let orphan = i.nlink == 0 && n.named_by.is_empty() && ino != ROOT_INO;
        if orphan {
            r.warnings.push(Warning::Orphan {
                ino,
                kind: i.kind,
                size: i.size,
                blocks: n.blocks,
            });
        }
        if i.kind == FileKind::Symlink && !n.has_target {
            p.push(Problem::SymlinkWithoutTarget { ino });
        }
        if i.kind == FileKind::Directory {
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
        } else if !orphan && i.nlink as usize != n.named_by.len() {
            p.push(Problem::FileLinks {
                ino,
                kind: i.kind,
                nlink: i.nlink,
                entries: n.named_by.len() as u32,
            });
        }
        if !orphan && !reachable.contains(&ino) {
            p.push(Problem::Unreachable {
                ino,
                kind: i.kind,
                nlink: i.nlink,
            });
        }
    }
    r.problems = p;
    Ok(r)
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
