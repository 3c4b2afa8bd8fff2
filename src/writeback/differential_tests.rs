//! The filesystem layer over the transaction layer (write-back metadata
//! and data, truncates and punched holes, acks delayed, lost and
//! reordered) behaves exactly like the filesystem layer straight on a
//! store: same answers, the same tree with the same bytes every twentieth
//! step, and the same durable volume after a sync; under both overwrite
//! policies.

use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn, SetattrValid};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::testkit::{cfg, layer_with, Faults, GuestBytes};
use super::{OverwritePolicy, TxnConfig};
use crate::check::torture::rng::Rng;
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::{FileKind, Store};

/// One inode reachable from the root: its path and attributes as text, and
/// a regular file's bytes.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    line: String,
    bytes: Vec<u8>,
}

/// Every inode reachable from the root, sorted by path.
fn tree(s: &dyn Store) -> Vec<Node> {
    let mut out = Vec::new();
    let mut dirs = vec![(crate::store::ROOT_INO, "/".to_string())];
    while let Some((dir, path)) = dirs.pop() {
        let mut after = 0;
        loop {
            let batch = s.readdir(dir, after, 7).unwrap();
            if batch.is_empty() {
                break;
            }
            for d in batch {
                after = d.cookie;
                let i = s
                    .get_inode(d.ino)
                    .unwrap()
                    .expect("entry names a live inode");
                let name = format!("{path}{}", String::from_utf8_lossy(&d.name));
                let mut line = format!(
                    "{name} ino={} {:?} nlink={} size={} mode={:o}",
                    i.ino, i.kind, i.nlink, i.size, i.perm
                );
                if i.kind == FileKind::Symlink {
                    line += &format!(" -> {:?}", s.readlink(i.ino).unwrap());
                }
                line += &format!(" xattrs={:?}", s.list_xattr(i.ino).unwrap());
                let mut bytes = Vec::new();
                if i.kind == FileKind::Regular {
                    bytes = vec![0u8; i.size as usize];
                    s.read(i.ino, 0, &mut bytes).unwrap();
                }
                if i.kind == FileKind::Directory {
                    dirs.push((i.ino, format!("{name}/")));
                }
                out.push(Node { line, bytes });
            }
        }
    }
    out.sort_by(|a, b| a.line.cmp(&b.line));
    out
}

/// `got` holds the same tree as `want`, byte for byte; `what` names `got`.
fn same_trees(want: &dyn Store, got: &dyn Store, what: &str) {
    let (want, got) = (tree(want), tree(got));
    let lines = |t: &[Node]| t.iter().map(|n| n.line.clone()).collect::<Vec<_>>();
    assert_eq!(lines(&want), lines(&got), "{what}: the trees differ");
    for (w, g) in want.iter().zip(&got) {
        if let Some(at) = w.bytes.iter().zip(&g.bytes).position(|(a, b)| a != b) {
            panic!(
                "{what}: {} differs at byte {at}: {} instead of {}",
                w.line, g.bytes[at], w.bytes[at]
            );
        }
    }
}

#[test]
fn the_filesystem_over_the_layer_matches_the_filesystem_on_the_store() {
    for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
        run(policy);
    }
}

fn run(policy: OverwritePolicy) {
    let direct_store = Arc::new(MemStore::new(1 << 30));
    let direct = PohmelFs::new(
        direct_store.clone(),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    // A cache of 16 pages: files outgrow it, so reads and partial writes
    // go to the store, under truncates and holes not acknowledged yet.
    let config = TxnConfig {
        cache_bytes: 16 * 4096,
        dirty_max_bytes: 8 * 4096,
        ..cfg(policy)
    };
    let (wb, sink, durable, _) = layer_with(config, 1, 21, true);
    sink.set(Faults {
        jitter: Duration::from_millis(20),
        lose_ack: 3,
        ..Faults::default()
    });
    let wb = Arc::new(wb);
    let layered = PohmelFs::new(
        wb.clone(),
        FsConfig::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let ctx = Context::new();
    let mut rng = Rng::new(0xC0FFEE);
    let mut dirs = vec![crate::store::ROOT_INO];
    let mut succeeded = 0;
    for step in 0..1500 {
        let s = Step::draw(&mut rng, &dirs, step);
        let a = s.apply(&direct, &ctx);
        let b = s.apply(&layered, &ctx);
        assert_eq!(a, b, "{policy:?} step {step}: op {} answers differ", s.op);
        if !a.starts_with("errno") {
            succeeded += 1;
        }
        if s.op == 1 && a.starts_with("ino ") {
            dirs.push(a[4..].parse().unwrap());
        }
        dirs.retain(|d| {
            direct_store
                .get_inode(*d)
                .unwrap()
                .is_some_and(|i| i.nlink > 0)
        });
        if step % 20 == 0 {
            same_trees(
                &*direct_store,
                &*wb,
                &format!("{policy:?} step {step}: the layer"),
            );
        }
    }
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    same_trees(
        &*direct_store,
        &*wb,
        &format!("{policy:?} at the end: the layer"),
    );
    same_trees(
        &*direct_store,
        &*durable,
        &format!("{policy:?} after the sync: the durable volume"),
    );
    assert!(
        succeeded > 300,
        "{policy:?}: only {succeeded} operations succeeded: the test exercises too little"
    );
    let files = tree(&*durable);
    assert!(
        files.len() > 5 && files.iter().any(|n| n.bytes.len() > 4096),
        "{policy:?}: the final tree is too small to mean much"
    );
}

/// The names steps choose from: few, so that steps meet each other.
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// One random step: an operation and its arguments, drawn once and applied
/// to both filesystems.
struct Step {
    parent: u64,
    name: CString,
    other: u64,
    name2: CString,
    op: u64,
    data: Vec<u8>,
    offset: u64,
}

impl Step {
    /// Step number `step`, in and between the live directories `dirs`.
    fn draw(rng: &mut Rng, dirs: &[u64], step: usize) -> Step {
        let dir = |rng: &mut Rng| dirs[rng.below(dirs.len() as u64) as usize];
        let name =
            |rng: &mut Rng| CString::new(NAMES[rng.below(NAMES.len() as u64) as usize]).unwrap();
        Step {
            parent: dir(rng),
            name: name(rng),
            other: dir(rng),
            name2: name(rng),
            op: rng.below(11),
            data: vec![(step % 250) as u8 + 1; 1 + rng.below(9000) as usize],
            offset: rng.below(20_000),
        }
    }

    /// Apply the step to `fs`; its answer as text (`errno N` on failure).
    fn apply(&self, fs: &PohmelFs, ctx: &Context) -> String {
        let (parent, name, other, name2) = (self.parent, &self.name, self.other, &self.name2);
        let r: std::io::Result<String> = match self.op {
            0 => fs
                .create(
                    ctx,
                    parent,
                    name,
                    CreateIn {
                        flags: 2,
                        mode: libc::S_IFREG | 0o644,
                        umask: 0,
                        fuse_flags: 0,
                    },
                )
                .map(|(e, ..)| format!("ino {}", e.inode)),
            1 => fs
                .mkdir(ctx, parent, name, 0o755, 0)
                .map(|e| format!("ino {}", e.inode)),
            2 => fs.unlink(ctx, parent, name).map(|_| "ok".into()),
            3 => fs.rmdir(ctx, parent, name).map(|_| "ok".into()),
            4 => fs
                .rename(ctx, parent, name, other, name2, 0)
                .map(|_| "ok".into()),
            5 => fs
                .symlink(ctx, c"target", parent, name)
                .map(|e| format!("ino {}", e.inode)),
            6 => fs.lookup(ctx, parent, name).and_then(|e| {
                fs.setxattr(ctx, e.inode, c"user.k", &self.data[..3], 0)
                    .map(|_| "ok".into())
            }),
            7 => fs.lookup(ctx, parent, name).and_then(|e| {
                fs.link(ctx, e.inode, other, name2)
                    .map(|e| format!("ino {}", e.inode))
            }),
            9 => fs
                .lookup(ctx, parent, name)
                .and_then(|e| self.truncate(fs, ctx, e.inode)),
            10 => fs.lookup(ctx, parent, name).and_then(|e| {
                const PUNCH_HOLE_KEEP_SIZE: u32 = 0x03;
                let len = self.data.len() as u64;
                fs.fallocate(ctx, e.inode, 0, PUNCH_HOLE_KEEP_SIZE, self.offset, len)
                    .map(|_| "ok".into())
            }),
            _ => fs
                .lookup(ctx, parent, name)
                .and_then(|e| self.write(fs, ctx, e.inode)),
        };
        match r {
            Ok(s) => s,
            Err(e) => format!("errno {:?}", e.raw_os_error()),
        }
    }

    /// Set the size of `ino` to the step's offset (ftruncate).
    fn truncate(&self, fs: &PohmelFs, ctx: &Context, ino: u64) -> std::io::Result<String> {
        // SAFETY: stat64 is a plain C struct of integers; all-zero is valid.
        let mut attr: stat64 = unsafe { std::mem::zeroed() };
        attr.st_size = self.offset as i64;
        fs.setattr(ctx, ino, attr, None, SetattrValid::SIZE)
            .map(|(st, _)| format!("size {}", st.st_size))
    }

    /// Write the step's data at its offset into `ino`.
    fn write(&self, fs: &PohmelFs, ctx: &Context, ino: u64) -> std::io::Result<String> {
        fs.write(
            ctx,
            ino,
            0,
            &mut GuestBytes::new(self.data.clone()),
            self.data.len() as u32,
            self.offset,
            None,
            false,
            0,
            0,
        )
        .map(|n| format!("wrote {n}"))
    }
}
