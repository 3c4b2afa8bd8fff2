//! The in-memory model of the directory tree under test: what every
//! operation must do, by POSIX and Linux rules, including which errno an
//! operation that must fail returns.
//!
//! [`Model::apply`] predicts one operation's outcome and, when it
//! succeeds, changes the model accordingly. It owns no file descriptors and
//! makes no system calls; `real.rs` does those. Symlinks made by the
//! torture always point into `zz/`, a name no directory holds, so following
//! one fails with ENOENT and path resolution never leaves the model.

use std::collections::{BTreeMap, HashMap};

pub use super::content::{Content, PAGE};
use super::ops::{Data, Falloc, Op, Path, SLOTS};

/// What an operation returns when it succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Unit,
    /// Bytes written.
    Count(usize),
    /// Bytes read.
    Bytes(Vec<u8>),
}

/// An operation's predicted outcome: a value, or the errnos Linux may
/// return (more than one where filesystems legitimately differ).
pub type Expected = Result<Value, &'static [i32]>;

/// What the filesystem under test supports, probed before the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `user.*` extended attributes.
    pub xattrs: bool,
    /// Directories count 2 + subdirectories links (btrfs says 1).
    pub dir_nlink: bool,
    /// Each fallocate mode of [`Falloc::ALL`].
    pub falloc: [bool; 5],
}

impl Features {
    /// Everything (ext4, tmpfs on recent kernels, pohmelfs).
    pub fn all() -> Features {
        Features {
            xattrs: true,
            dir_nlink: true,
            falloc: [true; 5],
        }
    }
}

/// Model node ids (not the filesystem's inode numbers).
pub type NodeId = u64;

#[derive(Clone, Debug)]
pub enum Kind {
    File(Content),
    Dir(BTreeMap<String, NodeId>),
    Symlink(String),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits (0o777).
    pub perm: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Entries naming it (for non-directories).
    pub names: u32,
    /// The directory holding it (for directories).
    pub parent: NodeId,
}

/// An open file descriptor of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fd {
    pub node: NodeId,
    pub pos: u64,
    pub append: bool,
}

/// The model: a tree of nodes under the run's root, and the open slots.
#[derive(Clone, Debug)]
pub struct Model {
    pub nodes: HashMap<NodeId, Node>,
    pub root: NodeId,
    pub fds: [Option<Fd>; SLOTS],
    pub features: Features,
    umask: u32,
    next_id: NodeId,
}

use libc::{
    EBADF, EEXIST, EINVAL, EISDIR, ENAMETOOLONG, ENODATA, ENOENT, ENOTDIR, ENOTEMPTY, EOPNOTSUPP,
    EPERM,
};

/// Linux's NAME_MAX.
pub const NAME_MAX: usize = 255;

/// Where a path leads, resolved like Linux does without following the last
/// component.
enum Resolved<'a> {
    /// The parent directory, the last name, and what it names.
    Found(NodeId, &'a str, Option<NodeId>),
}

impl Model {
    pub fn new(features: Features, umask: u32) -> Model {
        let root = Node {
            kind: Kind::Dir(BTreeMap::new()),
            perm: 0o755,
            xattrs: BTreeMap::new(),
            names: 0,
            parent: 1,
        };
        Model {
            nodes: HashMap::from([(1, root)]),
            root: 1,
            fds: [None; SLOTS],
            features,
            umask,
            next_id: 2,
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[&id]
    }

    /// A live node, to change. Ids come only from the model's own tables
    /// (entries, descriptors), so a missing one is a bug in the model.
    #[allow(clippy::expect_used)] // an id from the model's own tables is live
    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes.get_mut(&id).expect("live node")
    }

    fn entries(&self, dir: NodeId) -> &BTreeMap<String, NodeId> {
        match &self.nodes[&dir].kind {
            Kind::Dir(e) => e,
            _ => unreachable!("node {dir} is not a directory"),
        }
    }

    fn entries_mut(&mut self, dir: NodeId) -> &mut BTreeMap<String, NodeId> {
        match &mut self.node_mut(dir).kind {
            Kind::Dir(e) => e,
            _ => unreachable!("node {dir} is not a directory"),
        }
    }

    pub fn is_dir(&self, id: NodeId) -> bool {
        matches!(self.nodes[&id].kind, Kind::Dir(_))
    }

    /// The link count `stat` must report.
    pub fn nlink(&self, id: NodeId) -> u32 {
        match &self.nodes[&id].kind {
            Kind::Dir(e) => 2 + e.values().filter(|c| self.is_dir(**c)).count() as u32,
            _ => self.nodes[&id].names,
        }
    }

    /// Resolve `path` (non-empty): its directory, then its last name.
    fn resolve<'p>(&self, path: &'p Path) -> Result<Resolved<'p>, &'static [i32]> {
        let (dir, last) = self.resolve_parent(path)?;
        Ok(Resolved::Found(dir, last, self.child(dir, last)?))
    }

    /// What `name` names in directory `dir`.
    fn child(&self, dir: NodeId, name: &str) -> Result<Option<NodeId>, &'static [i32]> {
        if name.len() > NAME_MAX {
            return Err(&[ENAMETOOLONG]);
        }
        Ok(self.entries(dir).get(name).copied())
    }

    /// Resolve all but the last component of `path` (non-empty).
    fn resolve_parent<'p>(&self, path: &'p Path) -> Result<(NodeId, &'p str), &'static [i32]> {
        // The empty path is the root, which has no parent: the generator
        // names it only where `lookup` resolves it (fsync of a directory).
        #[allow(clippy::expect_used)] // the generator never renames, links or makes the root
        let (last, dirs) = path
            .split_last()
            .expect("paths of operations that name an entry are not empty");
        let mut cur = self.root;
        // Linux looks components up in order: a missing directory fails
        // before a long name after it is looked at.
        for name in dirs {
            if name.len() > NAME_MAX {
                return Err(&[ENAMETOOLONG]);
            }
            match self.entries(cur).get(name) {
                None => return Err(&[ENOENT]),
                Some(&c) => match self.nodes[&c].kind {
                    Kind::Dir(_) => cur = c,
                    Kind::File(_) => return Err(&[ENOTDIR]),
                    // Every symlink dangles (see the module documentation).
                    Kind::Symlink(_) => return Err(&[ENOENT]),
                },
            }
        }
        Ok((cur, last))
    }

    /// What `path` names without following a final symlink (lstat), or the
    /// errno of looking it up. The empty path is the root.
    pub fn lookup(&self, path: &Path) -> Result<NodeId, &'static [i32]> {
        if path.is_empty() {
            return Ok(self.root);
        }
        let Resolved::Found(_, _, child) = self.resolve(path)?;
        child.ok_or(&[ENOENT])
    }

    /// As [`Model::lookup`], following a final symlink (stat, open, chmod).
    fn lookup_follow(&self, path: &Path) -> Result<NodeId, &'static [i32]> {
        let id = self.lookup(path)?;
        if matches!(self.nodes[&id].kind, Kind::Symlink(_)) {
            return Err(&[ENOENT]);
        }
        Ok(id)
    }

    fn alloc(&mut self, kind: Kind, perm: u32, parent: NodeId) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        let names = u32::from(!matches!(kind, Kind::Dir(_)));
        self.nodes.insert(
            id,
            Node {
                kind,
                perm,
                xattrs: BTreeMap::new(),
                names,
                parent,
            },
        );
        id
    }

    /// Drop a non-directory's name; forget it once nothing refers to it.
    fn unname(&mut self, id: NodeId) {
        self.node_mut(id).names -= 1;
        self.collect(id);
    }

    /// Forget `id` if no entry names it and no descriptor holds it.
    fn collect(&mut self, id: NodeId) {
        let n = &self.nodes[&id];
        let named = match n.kind {
            Kind::Dir(_) => true,
            _ => n.names > 0,
        };
        if !named && !self.fds.iter().flatten().any(|fd| fd.node == id) {
            self.nodes.remove(&id);
        }
    }

    /// Whether `dir` is `ancestor` or lies below it.
    fn within(&self, mut dir: NodeId, ancestor: NodeId) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == self.root {
                return false;
            }
            dir = self.nodes[&dir].parent;
        }
    }

    fn content_mut(&mut self, id: NodeId) -> &mut Content {
        match &mut self.node_mut(id).kind {
            Kind::File(c) => c,
            _ => unreachable!("descriptors are only opened on files"),
        }
    }

    pub fn content(&self, id: NodeId) -> Option<&Content> {
        match &self.nodes.get(&id)?.kind {
            Kind::File(c) => Some(c),
            _ => None,
        }
    }

    /// Predict `op` and apply it when it succeeds.
    pub fn apply(&mut self, op: &Op) -> Expected {
        match op {
            Op::Open {
                slot,
                path,
                create,
                excl,
                trunc,
                append,
                mode,
            } => {
                let node = self.open(path, *create, *excl, *trunc, *mode)?;
                debug_assert!(self.fds[*slot].is_none(), "slot {slot} is free");
                self.fds[*slot] = Some(Fd {
                    node,
                    pos: 0,
                    append: *append,
                });
                Ok(Value::Unit)
            }
            Op::Close { slot } => {
                let fd = self.fd(*slot)?;
                self.fds[*slot] = None;
                self.collect(fd.node);
                Ok(Value::Unit)
            }
            Op::Write { slot, data } => self.write(*slot, None, data),
            Op::Pwrite { slot, offset, data } => self.write(*slot, Some(*offset), data),
            Op::Read { slot, offset, len } => {
                let fd = self.fd(*slot)?;
                Ok(Value::Bytes(self.content_mut(fd.node).read(*offset, *len)))
            }
            Op::Truncate { path, size } => {
                let id = self.lookup_follow(path)?;
                if self.is_dir(id) {
                    return Err(&[EISDIR]);
                }
                self.content_mut(id).set_size(*size);
                Ok(Value::Unit)
            }
            Op::Ftruncate { slot, size } => {
                let fd = self.fd(*slot)?;
                self.content_mut(fd.node).set_size(*size);
                Ok(Value::Unit)
            }
            Op::Fallocate {
                slot,
                mode,
                offset,
                len,
            } => self.fallocate(*slot, *mode, *offset, *len),
            Op::Rename { from, to } => self.rename(from, to),
            Op::Link { from, to } => self.link(from, to),
            Op::Unlink { path } => self.unlink(path),
            Op::Mkdir { path, mode } => {
                let perm = mode & !self.umask & 0o777;
                self.make(path, Kind::Dir(BTreeMap::new()), perm)
            }
            Op::Rmdir { path } => self.rmdir(path),
            Op::Symlink { target, path } => self.make(path, Kind::Symlink(target.clone()), 0o777),
            Op::SetXattr { path, name, data } => {
                let id = self.lookup_follow(path)?;
                if !self.features.xattrs {
                    return Err(&[EOPNOTSUPP]);
                }
                self.node_mut(id).xattrs.insert(name.clone(), data.bytes());
                Ok(Value::Unit)
            }
            Op::RemoveXattr { path, name } => {
                let id = self.lookup_follow(path)?;
                if !self.features.xattrs {
                    return Err(&[EOPNOTSUPP, ENODATA]);
                }
                match self.node_mut(id).xattrs.remove(name) {
                    Some(_) => Ok(Value::Unit),
                    None => Err(&[ENODATA]),
                }
            }
            Op::Chmod { path, mode } => {
                let id = self.lookup_follow(path)?;
                self.node_mut(id).perm = mode & 0o777;
                Ok(Value::Unit)
            }
            Op::Fsync { slot } => self.fd(*slot).map(|_| Value::Unit),
            Op::FsyncDir { path } => {
                let id = self.lookup_follow(path)?;
                if !self.is_dir(id) {
                    return Err(&[ENOTDIR]);
                }
                Ok(Value::Unit)
            }
        }
    }

    /// The descriptor open in `slot`; EBADF, as Linux says, for a free
    /// slot.
    fn fd(&self, slot: usize) -> Result<Fd, &'static [i32]> {
        self.fds.get(slot).copied().flatten().ok_or(&[EBADF][..])
    }

    /// open(2) of a file: the node the descriptor will refer to, created
    /// or truncated as the flags say.
    fn open(
        &mut self,
        path: &Path,
        create: bool,
        excl: bool,
        trunc: bool,
        mode: u32,
    ) -> Result<NodeId, &'static [i32]> {
        let Resolved::Found(dir, name, child) = self.resolve(path)?;
        match child {
            Some(_) if create && excl => Err(&[EEXIST]),
            Some(c) => match &self.nodes[&c].kind {
                Kind::Symlink(_) => Err(&[ENOENT]),
                Kind::Dir(_) => Err(&[EISDIR]),
                Kind::File(_) => {
                    if trunc {
                        self.content_mut(c).set_size(0);
                    }
                    Ok(c)
                }
            },
            None if !create => Err(&[ENOENT]),
            None => {
                let perm = mode & !self.umask & 0o777;
                let id = self.alloc(Kind::File(Content::default()), perm, dir);
                self.entries_mut(dir).insert(name.to_string(), id);
                Ok(id)
            }
        }
    }

    /// write(2) at the descriptor's position (`offset` None), moving it,
    /// or pwrite(2) at `offset`; both append on an O_APPEND descriptor.
    fn write(&mut self, slot: usize, offset: Option<u64>, data: &Data) -> Expected {
        let fd = self.fd(slot)?;
        let bytes = data.bytes();
        // Linux: pwrite on an O_APPEND descriptor appends.
        let at = match offset {
            _ if fd.append => self.content_mut(fd.node).size,
            Some(offset) => offset,
            None => fd.pos,
        };
        self.content_mut(fd.node).write(at, &bytes);
        if offset.is_none() {
            self.fds[slot] = Some(Fd {
                pos: at + bytes.len() as u64,
                ..fd
            });
        }
        Ok(Value::Count(bytes.len()))
    }

    fn fallocate(&mut self, slot: usize, mode: Falloc, offset: u64, len: u64) -> Expected {
        if !self.features.falloc[mode.index()] {
            return Err(&[EOPNOTSUPP]);
        }
        let fd = self.fd(slot)?;
        let c = self.content_mut(fd.node);
        let end = offset + len;
        match mode {
            Falloc::Allocate => c.size = c.size.max(end),
            Falloc::KeepSize => {}
            Falloc::PunchHole => c.zero(offset, len),
            Falloc::ZeroRange => {
                c.zero(offset, len);
                c.size = c.size.max(end);
            }
            Falloc::ZeroRangeKeepSize => c.zero(offset, len),
        }
        Ok(Value::Unit)
    }

    /// link(2) without following a final symlink.
    fn link(&mut self, from: &Path, to: &Path) -> Expected {
        let Resolved::Found(_, _, src) = self.resolve(from)?;
        let src = src.ok_or(&[ENOENT][..])?;
        let Resolved::Found(dir, name, dst) = self.resolve(to)?;
        if dst.is_some() {
            return Err(&[EEXIST]);
        }
        if self.is_dir(src) {
            return Err(&[EPERM]);
        }
        self.entries_mut(dir).insert(name.to_string(), src);
        self.node_mut(src).names += 1;
        Ok(Value::Unit)
    }

    fn unlink(&mut self, path: &Path) -> Expected {
        let Resolved::Found(dir, name, child) = self.resolve(path)?;
        let child = child.ok_or(&[ENOENT][..])?;
        if self.is_dir(child) {
            return Err(&[EISDIR]);
        }
        self.entries_mut(dir).remove(name);
        self.unname(child);
        Ok(Value::Unit)
    }

    /// mkdir(2) or symlink(2): a new node of `kind` at `path`.
    fn make(&mut self, path: &Path, kind: Kind, perm: u32) -> Expected {
        let Resolved::Found(dir, name, child) = self.resolve(path)?;
        if child.is_some() {
            return Err(&[EEXIST]);
        }
        let id = self.alloc(kind, perm, dir);
        self.entries_mut(dir).insert(name.to_string(), id);
        Ok(Value::Unit)
    }

    fn rmdir(&mut self, path: &Path) -> Expected {
        let Resolved::Found(dir, name, child) = self.resolve(path)?;
        let child = child.ok_or(&[ENOENT][..])?;
        if !self.is_dir(child) {
            return Err(&[ENOTDIR]);
        }
        if !self.entries(child).is_empty() {
            return Err(&[ENOTEMPTY, EEXIST]);
        }
        self.entries_mut(dir).remove(name);
        self.nodes.remove(&child);
        Ok(Value::Unit)
    }

    /// rename(2) without flags, checked in the order Linux checks.
    fn rename(&mut self, from: &Path, to: &Path) -> Expected {
        // Both directories first, then the source's name, then the target's.
        let (odir, oname) = self.resolve_parent(from)?;
        let (ndir, nname) = self.resolve_parent(to)?;
        let src = self.child(odir, oname)?.ok_or(&[ENOENT][..])?;
        let dst = self.child(ndir, nname)?;
        let sdir = self.is_dir(src);
        // The source may not be an ancestor of the target's directory...
        if sdir && self.within(ndir, src) && odir != ndir {
            return Err(&[EINVAL]);
        }
        if sdir && ndir == src {
            return Err(&[EINVAL]);
        }
        // ...nor the target an ancestor of the source (it is then a
        // non-empty directory).
        if let Some(d) = dst {
            if self.is_dir(d) && d != src && self.within(odir, d) {
                return Err(&[ENOTEMPTY, EEXIST]);
            }
            if d == src {
                return Ok(Value::Unit);
            }
            match (sdir, self.is_dir(d)) {
                (true, false) => return Err(&[ENOTDIR]),
                (false, true) => return Err(&[EISDIR]),
                (true, true) if !self.entries(d).is_empty() => return Err(&[ENOTEMPTY, EEXIST]),
                _ => {}
            }
        }
        let (oname, nname) = (oname.to_string(), nname.to_string());
        if let Some(d) = dst {
            self.entries_mut(ndir).remove(&nname);
            if self.is_dir(d) {
                self.nodes.remove(&d);
            } else {
                self.unname(d);
            }
        }
        self.entries_mut(odir).remove(&oname);
        self.entries_mut(ndir).insert(nname, src);
        if sdir {
            self.node_mut(src).parent = ndir;
        }
        Ok(Value::Unit)
    }

    /// Every named node with its path, depth first in name order (the
    /// root first, as the empty path).
    pub fn paths(&self) -> Vec<(Path, NodeId)> {
        let mut out = vec![(Vec::new(), self.root)];
        let mut i = 0;
        while i < out.len() {
            let (path, id) = out[i].clone();
            if let Kind::Dir(entries) = &self.nodes[&id].kind {
                for (name, child) in entries {
                    let mut p = path.clone();
                    p.push(name.clone());
                    out.push((p, *child));
                }
            }
            i += 1;
        }
        out
    }

    /// Bytes all files hold in pages (for the memory bound).
    pub fn stored_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match &n.kind {
                Kind::File(c) => c.stored_bytes(),
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
