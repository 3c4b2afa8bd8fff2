//! Comparing the directory under test with the model: after each step the
//! paths and descriptors the step touched, now and then everything; and
//! the saved model — one line per path with a SHA-256 of each file — that
//! `--save-model` writes and `--verify` checks against a tree later (after
//! an unmount, a daemon restart, a reboot of the guest).
//!
//! A difference is returned as one line naming the path (or descriptor),
//! the field, what the model says and what the filesystem says.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path as FsPath;

use sha2::{Digest, Sha256};

use super::model::{Features, Kind, Model, NodeId};
use super::ops::{show, Path};
use super::real::{self, Real, Stat};

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::ENOENT => "ENOENT",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EBADF => "EBADF",
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EFBIG => "EFBIG",
        libc::EXDEV => "EXDEV",
        libc::EBUSY => "EBUSY",
        libc::EMLINK => "EMLINK",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// `ENOENT` or `one of ENOTEMPTY, EEXIST`.
pub fn errnos(set: &[i32]) -> String {
    match set {
        [one] => errno_name(*one),
        more => format!(
            "one of {}",
            more.iter()
                .map(|e| errno_name(*e))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn errno(e: i32) -> String {
    errno_name(e)
}

fn format_of(kind: &Kind) -> u32 {
    match kind {
        Kind::File(_) => libc::S_IFREG,
        Kind::Dir(_) => libc::S_IFDIR,
        Kind::Symlink(_) => libc::S_IFLNK,
    }
}

fn format_name(format: u32) -> &'static str {
    match format {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        0 => "unknown",
        _ => "other",
    }
}

/// Where the first difference of two byte strings is, described.
pub fn bytes_differ(offset: u64, want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let at = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let near = |b: &[u8]| b[at..b.len().min(at + 8)].to_vec();
    Some(format!(
        "{} bytes at {offset} expected, {} read; first difference at offset {}: expected {:02x?}, read {:02x?}",
        want.len(),
        got.len(),
        offset + at as u64,
        near(want),
        near(got)
    ))
}

/// Type, mode, link count and size of node `id` against `st`.
fn attributes_match(m: &Model, id: NodeId, st: &Stat, at: &str) -> Result<(), String> {
    let node = m.node(id);
    let want_format = format_of(&node.kind);
    if st.format != want_format {
        return Err(format!(
            "{at}: is a {}, model says {}",
            format_name(st.format),
            format_name(want_format)
        ));
    }
    if !matches!(node.kind, Kind::Symlink(_)) && st.perm != node.perm {
        return Err(format!(
            "{at}: mode {:o}, model says {:o}",
            st.perm, node.perm
        ));
    }
    let dir = matches!(node.kind, Kind::Dir(_));
    if (!dir || m.features.dir_nlink) && st.nlink != u64::from(m.nlink(id)) {
        return Err(format!(
            "{at}: link count {}, model says {}",
            st.nlink,
            m.nlink(id)
        ));
    }
    let size = match &node.kind {
        Kind::File(c) => Some(c.size),
        Kind::Symlink(t) => Some(t.len() as u64),
        Kind::Dir(_) => None,
    };
    if let Some(size) = size.filter(|s| *s != st.size) {
        return Err(format!("{at}: size {}, model says {size}", st.size));
    }
    Ok(())
}

fn target_matches(real: &Real, path: &Path, target: &str, at: &str) -> Result<(), String> {
    let got = real
        .readlink(path)
        .map_err(|e| format!("{at}: readlink: {}", errno(e)))?;
    if got != target {
        return Err(format!(
            "{at}: symlink target {got:?}, model says {target:?}"
        ));
    }
    Ok(())
}

/// A directory's entries, by name and type (a type of 0 is not known and
/// matches any).
fn listing_matches(
    m: &Model,
    real: &Real,
    path: &Path,
    entries: &BTreeMap<String, NodeId>,
    at: &str,
) -> Result<(), String> {
    let got = real
        .list(path)
        .map_err(|e| format!("{at}: readdir: {}", errno(e)))?;
    let want: Vec<(String, u32)> = entries
        .iter()
        .map(|(n, c)| (n.clone(), format_of(&m.node(*c).kind)))
        .collect();
    let same = got.len() == want.len()
        && got
            .iter()
            .zip(&want)
            .all(|((gn, gf), (wn, wf))| gn == wn && (*gf == 0 || gf == wf));
    if !same {
        let names = |v: &[(String, u32)]| {
            v.iter()
                .map(|(n, f)| format!("{}:{}", show(&vec![n.clone()]), format_name(*f)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        return Err(format!(
            "{at}: lists [{}], model says [{}]",
            names(&got),
            names(&want)
        ));
    }
    Ok(())
}

fn xattrs_match(
    real: &Real,
    path: &Path,
    xattrs: &BTreeMap<String, Vec<u8>>,
    at: &str,
) -> Result<(), String> {
    let got = real
        .xattrs(path)
        .map_err(|e| format!("{at}: xattrs: {}", errno(e)))?;
    let want: Vec<(String, Vec<u8>)> = xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if got != want {
        let show_x = |v: &[(String, Vec<u8>)]| {
            v.iter()
                .map(|(k, v)| format!("{k}({} bytes)", v.len()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        return Err(format!(
            "{at}: extended attributes [{}], model says [{}]{}",
            show_x(&got),
            show_x(&want),
            if got.len() == want.len() {
                " (values differ)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

/// What the verifier remembers between steps: which real inode number each
/// model node has, so hard links must share one and distinct nodes differ.
#[derive(Default)]
pub struct Verifier {
    ino_of: HashMap<NodeId, u64>,
    node_of: HashMap<u64, NodeId>,
}

/// Which way a node is reached.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    Path(&'a Path),
    Slot(usize),
}

impl Via<'_> {
    fn name(&self) -> String {
        match self {
            Via::Path(p) => show(p),
            Via::Slot(s) => format!("descriptor [{s}]"),
        }
    }
}

impl Verifier {
    /// Check that `st` (of `via`) is what the model says of node `id`:
    /// its attributes, its identity, and through a path what it holds (a
    /// symlink's target, a directory's entries) and its extended attributes.
    fn node(
        &mut self,
        m: &Model,
        real: &Real,
        id: NodeId,
        st: &Stat,
        via: Via<'_>,
    ) -> Result<(), String> {
        let at = via.name();
        attributes_match(m, id, st, &at)?;
        self.identity(m, id, st, &at)?;
        let Via::Path(path) = via else {
            return Ok(());
        };
        let node = m.node(id);
        match &node.kind {
            Kind::Symlink(target) => return target_matches(real, path, target, &at),
            Kind::Dir(entries) => listing_matches(m, real, path, entries, &at)?,
            Kind::File(_) => {}
        }
        if m.features.xattrs {
            xattrs_match(real, path, &node.xattrs, &at)?;
        }
        Ok(())
    }

    /// One inode per node, one node per inode.
    fn identity(&mut self, m: &Model, id: NodeId, st: &Stat, at: &str) -> Result<(), String> {
        match self.ino_of.get(&id) {
            Some(&ino) if ino != st.ino => {
                return Err(format!(
                    "{at}: inode number {}, but this node had inode number {ino} before",
                    st.ino
                ))
            }
            _ => {}
        }
        if let Some(&other) = self.node_of.get(&st.ino) {
            if other != id && m.nodes.contains_key(&other) {
                return Err(format!(
                    "{at}: inode number {} also belongs to another live node",
                    st.ino
                ));
            }
        }
        self.ino_of.insert(id, st.ino);
        self.node_of.insert(st.ino, id);
        Ok(())
    }

    /// Check what `path` names (or the errno of looking it up).
    pub fn path(&mut self, m: &Model, real: &Real, path: &Path) -> Result<(), String> {
        match (m.lookup(path), real.lstat(path)) {
            (Err(want), Err(got)) if want.contains(&got) => Ok(()),
            (Err(want), Err(got)) => Err(format!(
                "{}: lstat fails with {}, model says {}",
                show(path),
                errno(got),
                errnos(want)
            )),
            (Err(want), Ok(st)) => Err(format!(
                "{}: exists (a {}), model says {}",
                show(path),
                format_name(st.format),
                errnos(want)
            )),
            (Ok(id), Err(got)) => Err(format!(
                "{}: lstat fails with {}, model says it is a {}",
                show(path),
                errno(got),
                format_name(format_of(&m.node(id).kind))
            )),
            (Ok(id), Ok(st)) => self.node(m, real, id, &st, Via::Path(path)),
        }
    }

    /// Check the file open in `slot`.
    pub fn slot(&mut self, m: &Model, real: &Real, slot: usize) -> Result<(), String> {
        let Some(fd) = m.fds[slot] else { return Ok(()) };
        let st = real
            .fstat(slot)
            .map_err(|e| format!("descriptor [{slot}]: fstat: {}", errno(e)))?;
        self.node(m, real, fd.node, &st, Via::Slot(slot))
    }

    /// Check bytes `offset..offset + len` of node `id` (a file), read
    /// through `via`.
    pub fn bytes(
        &self,
        m: &Model,
        real: &Real,
        id: NodeId,
        via: Via<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), String> {
        let Some(content) = m.content(id) else {
            return Ok(());
        };
        let want = content.read(offset, len);
        let got = match via {
            Via::Path(p) => real.read_path(p, offset, len),
            Via::Slot(s) => real.read_slot(s, offset, len),
        }
        .map_err(|e| format!("{}: read at {offset}: {}", via.name(), errno(e)))?;
        match bytes_differ(offset, &want, &got) {
            None => Ok(()),
            Some(d) => Err(format!("{}: {d}", via.name())),
        }
    }

    /// Check the whole file `id` through `via`, one MiB at a time, and that
    /// nothing follows its end.
    pub fn whole(&self, m: &Model, real: &Real, id: NodeId, via: Via<'_>) -> Result<(), String> {
        let Some(content) = m.content(id) else {
            return Ok(());
        };
        const CHUNK: u64 = 1 << 20;
        let mut at = 0;
        while at < content.size {
            self.bytes(m, real, id, via, at, CHUNK.min(content.size - at))?;
            at += CHUNK;
        }
        self.bytes(m, real, id, via, content.size, 1)
    }

    /// Check everything: every path, every file's bytes, every open
    /// descriptor (unlinked files included).
    pub fn everything(&mut self, m: &Model, real: &Real, bytes: bool) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (path, id) in m.paths() {
            self.path(m, real, &path)?;
            if bytes && seen.insert(id) {
                self.whole(m, real, id, Via::Path(&path))?;
            }
        }
        for slot in 0..m.fds.len() {
            self.slot(m, real, slot)?;
            if let (true, Some(fd)) = (bytes, m.fds[slot]) {
                if seen.insert(fd.node) {
                    self.whole(m, real, fd.node, Via::Slot(slot))?;
                }
            }
        }
        Ok(())
    }
}

/// One path of a saved model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `f`, `d`, `l` (or `?` for anything else found on the filesystem).
    pub kind: char,
    pub perm: u32,
    /// `None` for directories when the filesystem does not count their links.
    pub nlink: Option<u64>,
    pub size: Option<u64>,
    /// SHA-256 of a file, the hex of a symlink's target.
    pub digest: String,
    /// For non-directories with more links than one: the first path (in
    /// name order) of the same inode.
    pub group: String,
    /// `name=hex` of each `user.*` attribute.
    pub xattrs: String,
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn xattr_text(x: &[(String, Vec<u8>)]) -> String {
    if x.is_empty() {
        return "-".into();
    }
    x.iter()
        .map(|(k, v)| format!("{k}={}", hex(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn path_key(p: &Path) -> String {
    if p.is_empty() {
        ".".into()
    } else {
        p.join("/")
    }
}

/// The records the model says the tree must hold (descriptors closed).
pub fn model_records(m: &Model) -> BTreeMap<String, Record> {
    let paths = m.paths();
    let mut first_path: HashMap<NodeId, String> = HashMap::new();
    for (p, id) in &paths {
        first_path.entry(*id).or_insert_with(|| path_key(p));
    }
    let mut out = BTreeMap::new();
    for (p, id) in &paths {
        let n = m.node(*id);
        let nlink = u64::from(m.nlink(*id));
        let xattrs: Vec<(String, Vec<u8>)> = n
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (kind, size, digest) = match &n.kind {
            Kind::File(c) => ('f', Some(c.size), hex(&Sha256::digest(c.read(0, c.size)))),
            Kind::Dir(_) => ('d', None, "-".into()),
            Kind::Symlink(t) => ('l', Some(t.len() as u64), hex(t.as_bytes())),
        };
        out.insert(
            path_key(p),
            Record {
                kind,
                perm: if kind == 'l' { 0o777 } else { n.perm },
                nlink: if kind == 'd' && !m.features.dir_nlink {
                    None
                } else {
                    Some(nlink)
                },
                size,
                digest,
                group: if kind != 'd' && nlink > 1 {
                    first_path[id].clone()
                } else {
                    "-".into()
                },
                xattrs: if kind == 'l' || !m.features.xattrs {
                    "-".into()
                } else {
                    xattr_text(&xattrs)
                },
            },
        );
    }
    out
}

/// The records of the tree at `root`, read from the filesystem.
pub fn real_records(root: &FsPath, features: Features) -> Result<BTreeMap<String, Record>, String> {
    let mut out = BTreeMap::new();
    let mut first_of_ino: HashMap<u64, String> = HashMap::new();
    let mut queue = vec![(Vec::<String>::new(), root.to_path_buf())];
    let mut i = 0;
    while i < queue.len() {
        let (p, fs_path) = queue[i].clone();
        i += 1;
        let key = path_key(&p);
        let st = real::lstat(&fs_path).map_err(|e| format!("{key}: lstat: {}", errno(e)))?;
        let (kind, size, digest) = match st.format {
            libc::S_IFREG => {
                let bytes =
                    real::read_file(&fs_path).map_err(|e| format!("{key}: read: {}", errno(e)))?;
                ('f', Some(bytes.len() as u64), hex(&Sha256::digest(&bytes)))
            }
            libc::S_IFDIR => {
                let entries =
                    real::list(&fs_path).map_err(|e| format!("{key}: readdir: {}", errno(e)))?;
                for (name, _) in entries {
                    let mut child = p.clone();
                    child.push(name.clone());
                    queue.push((child, fs_path.join(&name)));
                }
                ('d', None, "-".into())
            }
            libc::S_IFLNK => {
                let t =
                    std::fs::read_link(&fs_path).map_err(|e| format!("{key}: readlink: {e}"))?;
                ('l', Some(st.size), hex(t.as_os_str().as_encoded_bytes()))
            }
            _ => ('?', Some(st.size), "-".into()),
        };
        let group = if kind != 'd' && st.nlink > 1 {
            first_of_ino
                .entry(st.ino)
                .or_insert_with(|| key.clone())
                .clone()
        } else {
            "-".into()
        };
        let xattrs = if kind == 'l' || !features.xattrs {
            "-".into()
        } else {
            xattr_text(&real::xattrs(&fs_path).map_err(|e| format!("{key}: xattrs: {}", errno(e)))?)
        };
        out.insert(
            key,
            Record {
                kind,
                perm: if kind == 'l' { 0o777 } else { st.perm },
                nlink: if kind == 'd' && !features.dir_nlink {
                    None
                } else {
                    Some(st.nlink)
                },
                size,
                digest,
                group,
                xattrs,
            },
        );
    }
    Ok(out)
}

/// The lines naming each difference between two record sets.
pub fn differences(want: &BTreeMap<String, Record>, got: &BTreeMap<String, Record>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, w) in want {
        let Some(g) = got.get(path) else {
            out.push(format!("{path}: missing (a {} is expected)", w.kind));
            continue;
        };
        let mut fields = Vec::new();
        let mut diff = |name: &str, a: String, b: String| {
            if a != b {
                fields.push(format!("{name} {b}, expected {a}"));
            }
        };
        diff("kind", w.kind.to_string(), g.kind.to_string());
        diff("mode", format!("{:o}", w.perm), format!("{:o}", g.perm));
        diff("links", format!("{:?}", w.nlink), format!("{:?}", g.nlink));
        diff("size", format!("{:?}", w.size), format!("{:?}", g.size));
        diff("content", w.digest.clone(), g.digest.clone());
        diff("hard link of", w.group.clone(), g.group.clone());
        diff("xattrs", w.xattrs.clone(), g.xattrs.clone());
        if !fields.is_empty() {
            out.push(format!("{path}: {}", fields.join("; ")));
        }
    }
    for (path, g) in got {
        if !want.contains_key(path) {
            out.push(format!("{path}: unexpected {}", g.kind));
        }
    }
    out
}

/// A saved model: where the tree is, how it was made, and its records.
#[derive(Debug, PartialEq, Eq)]
pub struct Saved {
    pub root: std::path::PathBuf,
    pub seed: u64,
    pub ops: u64,
    pub features: Features,
    pub records: BTreeMap<String, Record>,
}

const MAGIC: &str = "pohmelfs-torture-model 1";

impl Saved {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{MAGIC}");
        let _ = writeln!(s, "root\t{}", self.root.display());
        let _ = writeln!(s, "seed\t{}", self.seed);
        let _ = writeln!(s, "ops\t{}", self.ops);
        let _ = writeln!(
            s,
            "features\txattrs={}\tdir_nlink={}",
            u8::from(self.features.xattrs),
            u8::from(self.features.dir_nlink)
        );
        for (path, r) in &self.records {
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            let _ = writeln!(
                s,
                "path\t{path}\t{}\t{:o}\t{}\t{}\t{}\t{}\t{}",
                r.kind,
                r.perm,
                opt(r.nlink),
                opt(r.size),
                r.digest,
                r.group,
                r.xattrs
            );
        }
        s
    }

    pub fn parse(text: &str) -> Result<Saved, String> {
        let mut lines = text.lines().enumerate();
        if lines.next().map(|(_, l)| l) != Some(MAGIC) {
            return Err(format!("not a saved torture model (no {MAGIC:?} line)"));
        }
        let mut saved = Saved {
            root: Default::default(),
            seed: 0,
            ops: 0,
            features: Features::all(),
            records: BTreeMap::new(),
        };
        for (n, line) in lines {
            let bad = || format!("line {}: cannot parse {line:?}", n + 1);
            let f: Vec<&str> = line.split('\t').collect();
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
            let opt = |s: &str| if s == "-" { Ok(None) } else { num(s).map(Some) };
            match f.as_slice() {
                ["root", r] => saved.root = r.into(),
                ["seed", s] => saved.seed = num(s)?,
                ["ops", s] => saved.ops = num(s)?,
                ["features", x, d] => {
                    saved.features.xattrs = *x == "xattrs=1";
                    saved.features.dir_nlink = *d == "dir_nlink=1";
                }
                ["path", path, kind, perm, nlink, size, digest, group, xattrs] => {
                    let record = Record {
                        kind: kind.chars().next().ok_or_else(bad)?,
                        perm: u32::from_str_radix(perm, 8).map_err(|_| bad())?,
                        nlink: opt(nlink)?,
                        size: opt(size)?,
                        digest: digest.to_string(),
                        group: group.to_string(),
                        xattrs: xattrs.to_string(),
                    };
                    saved.records.insert(path.to_string(), record);
                }
                _ => return Err(bad()),
            }
        }
        Ok(saved)
    }
}
