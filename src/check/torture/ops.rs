//! The operations the torture runs, and how they print (briefly: data is
//! described by its length and seed, long names abbreviated).

use std::fmt;

use super::rng::Rng;

/// Descriptors the torture keeps open at most.
pub const SLOTS: usize = 6;

/// A path below the run's root, by component; empty is the root.
pub type Path = Vec<String>;

/// Extended attribute names (few, so values get replaced and removed).
pub const XATTR_NAMES: [&str; 4] = ["user.a", "user.b", "user.c", "user.d"];

/// Where every symlink points: no directory holds `zz`.
pub const SYMLINK_PREFIX: &str = "zz/";

/// Bytes to write, described by a seed so an operation prints briefly and
/// replays exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data {
    pub len: usize,
    /// 0 random, 1 zeros, 2 one repeated byte, 3 a counting pattern.
    pub pattern: u8,
    pub seed: u64,
}

impl Data {
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        match self.pattern {
            0 => Rng::new(self.seed).fill(&mut v),
            1 => {}
            2 => v.fill(self.seed as u8 | 1),
            _ => {
                for (i, b) in v.iter_mut().enumerate() {
                    *b = (i as u64).wrapping_add(self.seed) as u8;
                }
            }
        }
        v
    }
}

/// fallocate(2) modes the torture uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Falloc {
    /// 0: allocate, growing the size.
    Allocate,
    /// KEEP_SIZE.
    KeepSize,
    /// PUNCH_HOLE | KEEP_SIZE.
    PunchHole,
    /// ZERO_RANGE, growing the size.
    ZeroRange,
    /// ZERO_RANGE | KEEP_SIZE.
    ZeroRangeKeepSize,
}

impl Falloc {
    pub const ALL: [Falloc; 5] = [
        Falloc::Allocate,
        Falloc::KeepSize,
        Falloc::PunchHole,
        Falloc::ZeroRange,
        Falloc::ZeroRangeKeepSize,
    ];

    pub fn index(self) -> usize {
        Falloc::ALL.iter().position(|m| *m == self).unwrap_or(0)
    }

    /// The `mode` argument of fallocate(2).
    pub fn flags(self) -> i32 {
        match self {
            Falloc::Allocate => 0,
            Falloc::KeepSize => libc::FALLOC_FL_KEEP_SIZE,
            Falloc::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Falloc::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
            Falloc::ZeroRangeKeepSize => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// One operation on the tree under test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// open(2) O_RDWR into descriptor slot `slot`.
    Open {
        slot: usize,
        path: Path,
        create: bool,
        excl: bool,
        trunc: bool,
        append: bool,
        mode: u32,
    },
    Close {
        slot: usize,
    },
    /// write(2) at the descriptor's position.
    Write {
        slot: usize,
        data: Data,
    },
    Pwrite {
        slot: usize,
        offset: u64,
        data: Data,
    },
    /// pread(2), compared with the model.
    Read {
        slot: usize,
        offset: u64,
        len: u64,
    },
    Truncate {
        path: Path,
        size: u64,
    },
    Ftruncate {
        slot: usize,
        size: u64,
    },
    Fallocate {
        slot: usize,
        mode: Falloc,
        offset: u64,
        len: u64,
    },
    Rename {
        from: Path,
        to: Path,
    },
    /// linkat(2) without following a final symlink.
    Link {
        from: Path,
        to: Path,
    },
    Unlink {
        path: Path,
    },
    Mkdir {
        path: Path,
        mode: u32,
    },
    Rmdir {
        path: Path,
    },
    Symlink {
        target: String,
        path: Path,
    },
    SetXattr {
        path: Path,
        name: String,
        data: Data,
    },
    RemoveXattr {
        path: Path,
        name: String,
    },
    Chmod {
        path: Path,
        mode: u32,
    },
    Fsync {
        slot: usize,
    },
    /// open(2) O_DIRECTORY and fsync(2).
    FsyncDir {
        path: Path,
    },
}

/// A path as printed: components joined by `/`, long names abbreviated.
pub fn show(path: &Path) -> String {
    if path.is_empty() {
        return ".".into();
    }
    path.iter()
        .map(|c| {
            if c.len() > 12 {
                format!("{}…({} bytes)", &c[..4], c.len())
            } else {
                c.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = ["random", "zeros", "byte", "counting"][usize::from(self.pattern.min(3))];
        write!(f, "{} bytes {kind}#{}", self.len, self.seed % 10_000)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Open {
                slot,
                path,
                create,
                excl,
                trunc,
                append,
                mode,
            } => {
                write!(f, "open[{slot}] {} O_RDWR", show(path))?;
                for (on, name) in [
                    (create, "O_CREAT"),
                    (excl, "O_EXCL"),
                    (trunc, "O_TRUNC"),
                    (append, "O_APPEND"),
                ] {
                    if *on {
                        write!(f, "|{name}")?;
                    }
                }
                if *create {
                    write!(f, " {mode:o}")?;
                }
                Ok(())
            }
            Op::Close { slot } => write!(f, "close[{slot}]"),
            Op::Write { slot, data } => write!(f, "write[{slot}] {data}"),
            Op::Pwrite { slot, offset, data } => write!(f, "pwrite[{slot}] at {offset}: {data}"),
            Op::Read { slot, offset, len } => write!(f, "pread[{slot}] at {offset}: {len} bytes"),
            Op::Truncate { path, size } => write!(f, "truncate {} to {size}", show(path)),
            Op::Ftruncate { slot, size } => write!(f, "ftruncate[{slot}] to {size}"),
            Op::Fallocate {
                slot,
                mode,
                offset,
                len,
            } => {
                write!(f, "fallocate[{slot}] {mode:?} at {offset}: {len} bytes")
            }
            Op::Rename { from, to } => write!(f, "rename {} -> {}", show(from), show(to)),
            Op::Link { from, to } => write!(f, "link {} -> {}", show(from), show(to)),
            Op::Unlink { path } => write!(f, "unlink {}", show(path)),
            Op::Mkdir { path, mode } => write!(f, "mkdir {} {mode:o}", show(path)),
            Op::Rmdir { path } => write!(f, "rmdir {}", show(path)),
            Op::Symlink { target, path } => {
                write!(f, "symlink {} -> {} bytes", show(path), target.len())
            }
            Op::SetXattr { path, name, data } => {
                write!(f, "setxattr {} {name}: {data}", show(path))
            }
            Op::RemoveXattr { path, name } => write!(f, "removexattr {} {name}", show(path)),
            Op::Chmod { path, mode } => write!(f, "chmod {} {mode:o}", show(path)),
            Op::Fsync { slot } => write!(f, "fsync[{slot}]"),
            Op::FsyncDir { path } => write!(f, "fsync dir {}", show(path)),
        }
    }
}
