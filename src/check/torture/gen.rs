//! The seeded generator: the next operation from the model's current state.
//!
//! Paths are drawn from a small pool of names so operations collide: most
//! name something that exists, some name nothing, a few go through a file
//! or a symlink, or use a name that is too long. Offsets and sizes cluster
//! around page (4 KiB) and pohmelfs block (64 KiB) boundaries. The model
//! is kept within [`Limits`] so that a run of millions of operations stays
//! small enough to verify in full now and then.

use super::model::{Kind, Model};
use super::ops::{Data, Falloc, Op, Path, SLOTS, SYMLINK_PREFIX, XATTR_NAMES};
use super::rng::Rng;

/// Names entries are drawn from.
const NAMES: [&str; 10] = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];

const KIB: u64 = 1024;
const BLOCK: u64 = 64 * KIB;

/// Bounds on the model, so every run stays verifiable.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Named nodes at most (creating ops turn into removals above it).
    pub nodes: usize,
    /// Directory depth new entries are made at, at most.
    pub depth: usize,
    /// File bytes the model holds at most (writes turn into truncates
    /// above it).
    pub stored_bytes: u64,
    /// Largest offset a write or fallocate reaches, for the rare far ones.
    pub far_offset: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            nodes: 80,
            depth: 4,
            stored_bytes: 24 << 20,
            far_offset: 2 << 20,
        }
    }
}

/// What the generator sees of the model at one step.
struct View<'a> {
    m: &'a Model,
    /// Every named node's path (the root excluded).
    named: Vec<(Path, u64)>,
    /// Directories new entries may go in.
    dirs: Vec<Path>,
}

fn name(rng: &mut Rng) -> String {
    match rng.below(200) {
        // A valid name of NAME_MAX bytes, and one byte too long.
        0 => format!("{:L<255}", rng.pick(&NAMES)),
        1 => format!("{:L<256}", rng.pick(&NAMES)),
        _ => (*rng.pick(&NAMES)).to_string(),
    }
}

impl View<'_> {
    fn new<'a>(m: &'a Model, limits: &Limits) -> View<'a> {
        let all = m.paths();
        View {
            m,
            dirs: all
                .iter()
                .filter(|(p, id)| m.is_dir(*id) && p.len() < limits.depth)
                .map(|(p, _)| p.clone())
                .collect(),
            named: all.into_iter().skip(1).collect(),
        }
    }

    fn new_path(&self, rng: &mut Rng) -> Path {
        let mut p = rng.pick(&self.dirs).clone();
        p.push(name(rng));
        p
    }

    fn existing(&self, rng: &mut Rng) -> Path {
        if self.named.is_empty() {
            return self.new_path(rng);
        }
        rng.pick(&self.named).0.clone()
    }

    /// Mostly something that exists, sometimes a fresh name, rarely a path
    /// through a file or symlink.
    fn any(&self, rng: &mut Rng) -> Path {
        match rng.below(100) {
            0..=2 => {
                let through: Vec<&Path> = self
                    .named
                    .iter()
                    .filter(|(_, id)| !self.m.is_dir(*id))
                    .map(|(p, _)| p)
                    .collect();
                if through.is_empty() {
                    return self.new_path(rng);
                }
                let mut p = (*rng.pick(&through)).clone();
                p.push(name(rng));
                p
            }
            3..=64 => self.existing(rng),
            _ => self.new_path(rng),
        }
    }

    /// A path naming a regular file when there is one.
    fn file(&self, rng: &mut Rng) -> Path {
        let files: Vec<&Path> = self
            .named
            .iter()
            .filter(|(_, id)| matches!(self.m.node(*id).kind, Kind::File(_)))
            .map(|(p, _)| p)
            .collect();
        if files.is_empty() || rng.percent(10) {
            return self.any(rng);
        }
        (*rng.pick(&files)).clone()
    }
}

fn offset(rng: &mut Rng, limits: &Limits) -> u64 {
    match rng.below(100) {
        0..=59 => rng.below(256 * KIB),
        // Around a page or block boundary.
        60..=89 => {
            let unit = if rng.percent(50) { 4 * KIB } else { BLOCK };
            (rng.below(8) * unit + rng.below(64)).saturating_sub(32)
        }
        _ => rng.below(limits.far_offset),
    }
}

fn length(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..=4 => 0,
        5..=59 => rng.range(1, 4 * KIB),
        60..=84 => rng.range(4 * KIB, BLOCK + 100),
        _ => rng.range(BLOCK, 256 * KIB),
    }
}

fn data(rng: &mut Rng, len: u64) -> Data {
    Data {
        len: len as usize,
        pattern: [0u8, 0, 0, 1, 2, 3][rng.below(6) as usize],
        seed: rng.next_u64(),
    }
}

fn size_near(rng: &mut Rng, current: u64, limits: &Limits) -> u64 {
    match rng.below(100) {
        0..=39 => rng.below(BLOCK),
        40..=59 => (current + rng.below(8 * KIB)).saturating_sub(4 * KIB),
        60..=89 => (rng.below(6) * BLOCK + rng.below(64)).saturating_sub(32),
        _ => rng.below(limits.far_offset),
    }
}

/// Operation kinds and their weights.
const WEIGHTS: [(&str, u64); 19] = [
    ("open", 10),
    ("close", 4),
    ("write", 8),
    ("pwrite", 14),
    ("read", 10),
    ("truncate", 3),
    ("ftruncate", 3),
    ("fallocate", 4),
    ("rename", 8),
    ("link", 4),
    ("unlink", 5),
    ("mkdir", 5),
    ("rmdir", 4),
    ("symlink", 3),
    ("setxattr", 4),
    ("removexattr", 2),
    ("chmod", 3),
    ("fsync", 3),
    ("fsyncdir", 1),
];

/// The next operation for the model's state: first its kind, within the
/// limits, then its arguments.
pub fn generate(rng: &mut Rng, m: &Model, limits: &Limits) -> Op {
    let view = View::new(m, limits);
    let heavy = m.stored_bytes() > limits.stored_bytes;
    let (kind, slot) = choose(rng, &view, limits, heavy);
    match kind {
        "rename" | "link" | "unlink" | "mkdir" | "rmdir" | "symlink" => {
            namespace_op(kind, rng, &view)
        }
        "setxattr" | "removexattr" | "chmod" | "fsyncdir" => attribute_op(kind, rng, &view),
        _ => descriptor_op(kind, slot, rng, &view, limits, heavy),
    }
}

/// The kind of the next operation and the descriptor slot it uses (0 for
/// operations on paths): weighted, then kept within the limits (no growth
/// when full or heavy) and to what the open slots allow.
fn choose(rng: &mut Rng, view: &View, limits: &Limits, heavy: bool) -> (&'static str, usize) {
    let m = view.m;
    let open: Vec<usize> = (0..SLOTS).filter(|s| m.fds[*s].is_some()).collect();
    let full = view.named.len() >= limits.nodes;

    let weights: Vec<u64> = WEIGHTS.iter().map(|(_, w)| *w).collect();
    let mut kind = WEIGHTS[rng.weighted(&weights)].0;
    if full && matches!(kind, "open" | "mkdir" | "symlink" | "link") {
        kind = if rng.percent(50) { "unlink" } else { "rmdir" };
    }
    if heavy && matches!(kind, "write" | "pwrite" | "fallocate") {
        kind = "ftruncate";
    }
    let fd_op = matches!(
        kind,
        "close" | "write" | "pwrite" | "read" | "ftruncate" | "fallocate" | "fsync"
    );
    if fd_op && open.is_empty() {
        kind = "open";
    }
    if kind == "open" && open.len() == SLOTS {
        kind = "close";
    }
    let slot = if fd_op || kind == "close" {
        open.first().map(|_| *rng.pick(&open)).unwrap_or(0)
    } else {
        0
    };
    (kind, slot)
}

/// open, and the operations on an open descriptor (and truncate, which
/// sizes like ftruncate).
fn descriptor_op(
    kind: &str,
    slot: usize,
    rng: &mut Rng,
    view: &View,
    limits: &Limits,
    heavy: bool,
) -> Op {
    match kind {
        "open" => open(rng, view),
        "close" => Op::Close { slot },
        "write" => {
            let len = length(rng);
            Op::Write {
                slot,
                data: data(rng, len),
            }
        }
        "pwrite" => {
            let off = offset(rng, limits);
            let len = length(rng);
            Op::Pwrite {
                slot,
                offset: off,
                data: data(rng, len),
            }
        }
        "read" => {
            let size = slot_size(view.m, slot);
            let off = if rng.percent(70) && size > 0 {
                rng.below(size)
            } else {
                offset(rng, limits)
            };
            Op::Read {
                slot,
                offset: off,
                len: length(rng).max(1),
            }
        }
        "truncate" | "ftruncate" => {
            let size = if heavy {
                rng.below(BLOCK)
            } else {
                size_near(rng, slot_size(view.m, slot), limits)
            };
            if kind == "truncate" {
                Op::Truncate {
                    path: view.file(rng),
                    size,
                }
            } else {
                Op::Ftruncate { slot, size }
            }
        }
        "fallocate" => Op::Fallocate {
            slot,
            mode: *rng.pick(&Falloc::ALL),
            offset: offset(rng, limits),
            len: length(rng).max(1),
        },
        _ => Op::Fsync { slot },
    }
}

/// The size of the file open in `slot` (0 when none is).
fn slot_size(m: &Model, slot: usize) -> u64 {
    m.fds[slot]
        .and_then(|fd| m.content(fd.node).map(|c| c.size))
        .unwrap_or(0)
}

/// open(2) into a free slot, creating mostly.
fn open(rng: &mut Rng, view: &View) -> Op {
    let free: Vec<usize> = (0..SLOTS).filter(|s| view.m.fds[*s].is_none()).collect();
    let create = rng.percent(60);
    Op::Open {
        slot: *rng.pick(&free),
        path: if create {
            view.any(rng)
        } else {
            view.file(rng)
        },
        create,
        excl: create && rng.percent(20),
        trunc: rng.percent(10),
        append: rng.percent(10),
        mode: *rng.pick(&[0o600, 0o640, 0o644, 0o664, 0o666]),
    }
}

/// The operations that add, move or remove names.
fn namespace_op(kind: &str, rng: &mut Rng, view: &View) -> Op {
    match kind {
        "rename" => {
            let from = view.any(rng);
            let to = view.any(rng);
            Op::Rename { from, to }
        }
        "link" => {
            let from = view.file(rng);
            let to = view.any(rng);
            Op::Link { from, to }
        }
        "unlink" => Op::Unlink {
            path: view.any(rng),
        },
        "mkdir" => Op::Mkdir {
            path: view.any(rng),
            mode: *rng.pick(&[0o700, 0o750, 0o755, 0o775, 0o777]),
        },
        "rmdir" => {
            let dirs: Vec<&Path> = view
                .named
                .iter()
                .filter(|(_, id)| view.m.is_dir(*id))
                .map(|(p, _)| p)
                .collect();
            let path = if dirs.is_empty() || rng.percent(20) {
                view.any(rng)
            } else {
                (*rng.pick(&dirs)).clone()
            };
            Op::Rmdir { path }
        }
        _ => symlink(rng, view),
    }
}

/// symlink(2) to a target in `zz/`, rarely a long one.
fn symlink(rng: &mut Rng, view: &View) -> Op {
    let len = if rng.percent(3) {
        rng.range(200, 1000)
    } else {
        rng.range(1, 40)
    };
    let target = SYMLINK_PREFIX.to_string()
        + &(0..len)
            .map(|_| char::from(*rng.pick(b"abcdefghijklmnopqrstuvwxyz0123456789._-")))
            .collect::<String>();
    Op::Symlink {
        target,
        path: view.any(rng),
    }
}

/// The operations on what a path names: extended attributes, mode, and
/// fsync of a directory.
fn attribute_op(kind: &str, rng: &mut Rng, view: &View) -> Op {
    match kind {
        "setxattr" => {
            let path = view.any(rng);
            let name = (*rng.pick(&XATTR_NAMES)).to_string();
            let len = if rng.percent(10) {
                0
            } else {
                rng.range(1, 512)
            };
            Op::SetXattr {
                path,
                name,
                data: data(rng, len),
            }
        }
        "removexattr" => Op::RemoveXattr {
            path: view.any(rng),
            name: (*rng.pick(&XATTR_NAMES)).to_string(),
        },
        "chmod" => {
            let path = view.any(rng);
            let dir = view.m.lookup(&path).is_ok_and(|id| view.m.is_dir(id));
            // Owners keep their access, or the run could not go on as a
            // normal user.
            let mode = if dir {
                0o700 | rng.below(0o100) as u32
            } else {
                0o600 | rng.below(0o200) as u32
            };
            Op::Chmod { path, mode }
        }
        _ => {
            let path = if rng.percent(20) {
                Vec::new()
            } else {
                view.any(rng)
            };
            Op::FsyncDir { path }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::torture::model::Features;
    use crate::check::torture::rng::Rng;

    #[test]
    fn the_same_seed_generates_the_same_operations() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut m = Model::new(Features::all(), 0o022);
            let mut out = Vec::new();
            for _ in 0..2000 {
                let op = generate(&mut rng, &m, &Limits::default());
                let _ = m.apply(&op);
                out.push(op.to_string());
            }
            out
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn generated_runs_stay_within_the_limits_and_use_every_kind() {
        let limits = Limits::default();
        let mut rng = Rng::new(7);
        let mut m = Model::new(Features::all(), 0o022);
        let mut seen = std::collections::BTreeSet::new();
        let mut failures = 0;
        for _ in 0..20_000 {
            let op = generate(&mut rng, &m, &limits);
            seen.insert(
                op.to_string()
                    .split([' ', '['])
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
            if m.apply(&op).is_err() {
                failures += 1;
            }
            assert!(m.paths().len() <= limits.nodes + 2);
            assert!(m.stored_bytes() <= limits.stored_bytes + (2 << 20));
        }
        for k in [
            "open",
            "close",
            "write",
            "pwrite",
            "pread",
            "truncate",
            "ftruncate",
            "fallocate",
            "rename",
            "link",
            "unlink",
            "mkdir",
            "rmdir",
            "symlink",
            "setxattr",
            "removexattr",
            "chmod",
            "fsync",
        ] {
            assert!(seen.contains(k), "{k} never generated: {seen:?}");
        }
        // Both outcomes are exercised: failures are neither rare nor the rule.
        assert!(
            (1000..12_000).contains(&failures),
            "{failures} of 20000 fail"
        );
    }
}
