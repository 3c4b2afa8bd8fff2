//! `pohmelfs torture`: a model-based random-operation checker for any
//! directory — a tmpfs or ext4 directory, a host FUSE mount of pohmelfs,
//! a virtio-fs mount in a guest.
//!
//! A run with seed `S` works in `DIR/seed-S` (which must not exist). Each
//! step generates one operation from the seed and the model's state
//! (`ops.rs`), predicts its outcome with the model (`model.rs`), runs it as
//! a system call (`real.rs`), and compares the result — the value, or the
//! errno of an operation that must fail — and then what the step touched
//! (`verify.rs`): the paths and their directories, the descriptor, the
//! bytes around the write. Every [`Config::full_every`] steps and at the
//! end everything is compared, bytes included.
//!
//! The first divergence stops the run. The shortest failing prefix is then
//! searched by replaying the same seed with fewer operations, each replay
//! in `DIR/seed-S.replay-N` and checked in full at its end, so the report
//! says `--ops N` for the smallest run that still fails.
//!
//! `--save-model FILE` writes the final tree's expected state (descriptors
//! closed: `verify.rs`), and [`verify_saved`] compares a tree with it
//! later: after an unmount and mount, a daemon or store restart, a reboot.
//!
//! This module never touches anything outside `DIR/seed-S*`.

pub mod content;
pub mod gen;
pub mod model;
pub mod ops;
pub mod real;
pub mod rng;
pub mod verify;

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use gen::Limits;
use model::{Features, Model};
use ops::{Falloc, Op};
use real::Real;
use rng::Rng;
use verify::{bytes_differ, errno, errnos, Verifier, Via};

/// Operations a `--long` run does unless `--ops` says otherwise.
pub const LONG_OPS: u64 = 2_000_000;

/// Operations shown before a divergence.
const RECENT: usize = 20;

/// One torture run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The directory the run's own directory is made in.
    pub dir: PathBuf,
    pub seed: u64,
    pub ops: u64,
    /// Steps between full comparisons (bytes included).
    pub full_every: u64,
    pub limits: Limits,
    /// Where to write the final expected state.
    pub save_model: Option<PathBuf>,
    /// Search the shortest failing prefix after a divergence.
    pub minimize: bool,
    /// Print a progress line to the report this often (0: never).
    pub progress_every: u64,
    /// A deliberate bug, for the checker's own tests.
    pub fault: Option<Fault>,
}

/// A deliberate bug in the filesystem under test, so the checker's tests
/// can see it caught: the `skip_pwrite`-th pwrite of a run (from 1)
/// reports success without writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub skip_pwrite: u64,
}

impl Config {
    pub fn new(dir: PathBuf, seed: u64, ops: u64) -> Config {
        Config {
            dir,
            seed,
            ops,
            full_every: 1000,
            limits: Limits::default(),
            save_model: None,
            minimize: true,
            progress_every: 0,
            fault: None,
        }
    }

    /// The run's own directory, `DIR/seed-S`.
    pub fn root(&self) -> PathBuf {
        self.dir.join(format!("seed-{}", self.seed))
    }
}

/// Why a run could not be carried out (a divergence is a result, not an
/// error).
#[derive(Debug, Error)]
pub enum TortureError {
    #[error("{0} already exists: remove it or pick another --dir or --seed")]
    Exists(PathBuf),
    #[error("create {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("probe what {0} supports")]
    Probe(PathBuf, #[source] std::io::Error),
    #[error("write the model to {0}")]
    SaveModel(PathBuf, #[source] std::io::Error),
    #[error("read the model from {0}")]
    ReadModel(PathBuf, #[source] std::io::Error),
    #[error("parse the model in {0}: {1}")]
    ParseModel(PathBuf, String),
    #[error("write the report")]
    Report(#[source] std::io::Error),
}

/// Where and how a run diverged from the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// 0-based step of the operation after which it was seen.
    pub step: u64,
    pub op: String,
    pub what: String,
    /// The operations up to and including `step`, numbered, last few.
    pub recent: Vec<String>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    /// Operations carried out.
    pub ops: u64,
    pub elapsed: Duration,
    pub divergence: Option<Divergence>,
    /// The smallest `--ops` that still fails, when searched and found.
    pub shortest_prefix: Option<u64>,
    /// Replays the search ran.
    pub replays: u64,
    pub features: Features,
}

/// The process umask, without changing it (other threads may be creating
/// files).
fn current_umask() -> u32 {
    let from_proc = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        });
    from_proc.unwrap_or(0o022)
}

/// What the filesystem at `root` supports, learnt by trying it on scratch
/// names no operation uses.
pub fn probe(root: &FsPath) -> std::io::Result<Features> {
    use std::os::unix::fs::FileExt;
    let file = root.join("probe.f");
    let f = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&file)?;
    f.write_all_at(&[1; 8192], 0)?;
    let c = std::ffi::CString::new(file.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: `c` and the name are NUL-terminated; the value is 1 byte.
    let set = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"user.probe".as_ptr(),
            b"x".as_ptr().cast(),
            1,
            0,
        )
    };
    let xattrs = if set == 0 {
        true
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        false
    };
    let mut falloc = [true; 5];
    for mode in Falloc::ALL {
        use std::os::fd::AsRawFd;
        // SAFETY: plain system call on a descriptor `f` owns.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode.flags(), 0, 4096) };
        falloc[mode.index()] =
            r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EOPNOTSUPP);
    }
    drop(f);
    std::fs::remove_file(&file)?;
    let dir = root.join("probe.d");
    std::fs::create_dir(&dir)?;
    let dir_nlink = std::os::unix::fs::MetadataExt::nlink(&std::fs::symlink_metadata(&dir)?) == 2;
    std::fs::remove_dir(&dir)?;
    Ok(Features {
        xattrs,
        dir_nlink,
        falloc,
    })
}

/// Make `root` (which must not exist) with mode 755 whatever the umask.
fn make_root(root: &FsPath) -> Result<(), TortureError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::create_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(TortureError::Exists(root.to_path_buf()))
        }
        Err(e) => return Err(TortureError::Create(root.to_path_buf(), e)),
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| TortureError::Create(root.to_path_buf(), e))
}

/// Compare an operation's result with the model's prediction.
fn compare(expected: &model::Expected, actual: &Result<model::Value, i32>) -> Result<(), String> {
    use model::Value;
    match (expected, actual) {
        (Ok(Value::Bytes(w)), Ok(Value::Bytes(g))) => match bytes_differ(0, w, g) {
            None => Ok(()),
            Some(d) => Err(format!("read returned other bytes: {d}")),
        },
        (Ok(w), Ok(g)) if w == g => Ok(()),
        (Ok(w), Ok(g)) => Err(format!("returned {g:?}, model says {w:?}")),
        (Err(w), Err(g)) if w.contains(g) => Ok(()),
        (Err(w), Err(g)) => Err(format!(
            "failed with {}, model says {}",
            errno(*g),
            errnos(w)
        )),
        (Err(w), Ok(_)) => Err(format!("succeeded, model says it fails with {}", errnos(w))),
        (Ok(_), Err(g)) => Err(format!("failed with {}, model says it succeeds", errno(*g))),
    }
}

/// The parent of a non-empty path.
fn parent(p: &ops::Path) -> ops::Path {
    p[..p.len().saturating_sub(1)].to_vec()
}

/// Check what `op` touched, after it ran.
fn check_touched(
    v: &mut Verifier,
    m: &Model,
    real: &Real,
    op: &Op,
    rng: &mut Rng,
) -> Result<(), String> {
    let mut paths: Vec<&ops::Path> = Vec::new();
    let mut slot = None;
    let mut window = None;
    match op {
        Op::Open { slot: s, path, .. } => {
            paths.push(path);
            slot = Some(*s);
        }
        Op::Close { .. } | Op::Read { .. } | Op::Fsync { .. } => {}
        Op::Write { slot: s, data } => {
            slot = Some(*s);
            if let Some(fd) = m.fds[*s] {
                window = Some((fd.pos.saturating_sub(data.len as u64), data.len as u64));
            }
        }
        Op::Pwrite {
            slot: s,
            offset,
            data,
        } => {
            slot = Some(*s);
            let append = m.fds[*s].is_some_and(|fd| fd.append);
            let size = m.fds[*s]
                .and_then(|fd| m.content(fd.node))
                .map_or(0, |c| c.size);
            let at = if append {
                size.saturating_sub(data.len as u64)
            } else {
                *offset
            };
            window = Some((at, data.len as u64));
        }
        Op::Ftruncate { slot: s, size } => {
            slot = Some(*s);
            window = Some((size.saturating_sub(100), 200));
        }
        Op::Fallocate {
            slot: s,
            offset,
            len,
            ..
        } => {
            slot = Some(*s);
            window = Some((*offset, (*len).min(256 * 1024)));
        }
        Op::Truncate { path, .. }
        | Op::Unlink { path }
        | Op::Mkdir { path, .. }
        | Op::Rmdir { path }
        | Op::Symlink { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. }
        | Op::Chmod { path, .. }
        | Op::FsyncDir { path } => paths.push(path),
        Op::Rename { from, to } | Op::Link { from, to } => {
            paths.push(from);
            paths.push(to);
        }
    }
    for p in &paths {
        v.path(m, real, p)?;
        if !p.is_empty() {
            v.path(m, real, &parent(p))?;
        }
        if let (Op::Truncate { size, .. }, Ok(id)) = (op, m.lookup(p)) {
            v.bytes(m, real, id, Via::Path(p), size.saturating_sub(100), 200)?;
        }
    }
    if let Some(s) = slot {
        v.slot(m, real, s)?;
        if let Some(fd) = m.fds[s] {
            let via = Via::Slot(s);
            if let Some((at, len)) = window {
                v.bytes(m, real, fd.node, via, at.saturating_sub(16), len + 32)?;
            }
            let size = m.content(fd.node).map_or(0, |c| c.size);
            v.bytes(m, real, fd.node, via, size.saturating_sub(64), 128)?;
            // Now and then the whole file, for damage away from the window.
            if rng.below(32) == 0 {
                v.whole(m, real, fd.node, via)?;
            }
        }
    }
    Ok(())
}

/// The result of carrying out the first `ops` steps of a seed.
struct Steps {
    done: u64,
    divergence: Option<Divergence>,
    model: Model,
    real: Real,
}

/// Carry out `cfg.ops` steps in `root`, with a full comparison at the end.
fn steps(cfg: &Config, root: &FsPath, out: Option<&mut dyn Write>) -> Result<Steps, TortureError> {
    make_root(root)?;
    let features = probe(root).map_err(|e| TortureError::Probe(root.to_path_buf(), e))?;
    let mut model = Model::new(features, current_umask());
    let mut real = Real::new(root.to_path_buf());
    let mut verifier = Verifier::default();
    // The generator's and the checks' randomness are separate streams, so
    // checking differently never changes the operations.
    let mut rng = Rng::new(cfg.seed);
    let mut check_rng = Rng::new(cfg.seed ^ 0x5eed_c4ec);
    let mut recent: VecDeque<String> = VecDeque::with_capacity(RECENT);
    let mut pwrites = 0u64;
    let started = Instant::now();
    let mut out = out;
    let diverge = |step: u64, op: &Op, what: String, recent: &VecDeque<String>| Divergence {
        step,
        op: op.to_string(),
        what,
        recent: recent.iter().cloned().collect(),
    };
    for step in 0..cfg.ops {
        let op = gen::generate(&mut rng, &model, &cfg.limits);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(format!("{step:>8}  {op}"));
        let expected = model.apply(&op);
        if matches!(op, Op::Pwrite { .. }) {
            pwrites += 1;
        }
        let skip = cfg.fault.is_some_and(|f| f.skip_pwrite == pwrites);
        let actual = match &op {
            Op::Pwrite { data, .. } if skip => Ok(model::Value::Count(data.len)),
            _ => real.apply(&op),
        };
        let checked = compare(&expected, &actual)
            .map_err(|w| format!("{op}: {w}"))
            .and_then(|()| check_touched(&mut verifier, &model, &real, &op, &mut check_rng));
        let checked = checked.and_then(|()| {
            if (step + 1) % cfg.full_every.max(1) == 0 {
                verifier.everything(&model, &real, true)
            } else {
                Ok(())
            }
        });
        if let Err(what) = checked {
            return Ok(Steps {
                done: step + 1,
                divergence: Some(diverge(step, &op, what, &recent)),
                model,
                real,
            });
        }
        if let Some(w) = out.as_deref_mut() {
            if cfg.progress_every > 0 && (step + 1) % cfg.progress_every == 0 {
                let secs = started.elapsed().as_secs_f64();
                let _ = writeln!(
                    w,
                    "torture: {} operations ({:.0} ops/s)",
                    step + 1,
                    (step + 1) as f64 / secs
                );
            }
        }
    }
    let mut divergence = None;
    if let Err(what) = verifier.everything(&model, &real, true) {
        let op = Op::Fsync { slot: 0 };
        let mut d = diverge(cfg.ops.saturating_sub(1), &op, what, &recent);
        d.op = "final full comparison".into();
        divergence = Some(d);
    }
    Ok(Steps {
        done: cfg.ops,
        divergence,
        model,
        real,
    })
}

/// Replay the first `n` steps of `cfg.seed` in a fresh directory; whether
/// they fail. The directory of a passing replay is removed.
fn replay_fails(cfg: &Config, n: u64) -> Result<bool, TortureError> {
    let root = cfg.dir.join(format!("seed-{}.replay-{n}", cfg.seed));
    let mut c = cfg.clone();
    c.ops = n;
    let s = steps(&c, &root, None)?;
    let failed = s.divergence.is_some();
    drop(s);
    if !failed {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(failed)
}

/// Run the torture described by `cfg`, printing the report to `out`.
pub fn run(cfg: &Config, out: &mut dyn Write) -> Result<Outcome, TortureError> {
    let started = Instant::now();
    let root = cfg.root();
    let s = steps(cfg, &root, Some(&mut *out))?;
    let elapsed = started.elapsed();
    let features = s.model.features;
    let mut outcome = Outcome {
        seed: cfg.seed,
        ops: s.done,
        elapsed,
        divergence: s.divergence.clone(),
        shortest_prefix: None,
        replays: 0,
        features,
    };
    if !features.xattrs || !features.dir_nlink || features.falloc.contains(&false) {
        say(
            out,
            format!(
                "torture: note: {} lacks some features, their operations must fail: {features:?}",
                root.display()
            ),
        )?;
    }
    match outcome.divergence.clone() {
        None => close_and_save(cfg, s, &root, out)?,
        Some(d) => {
            let (prefix, replays) = report_divergence(cfg, s, &d, &root, out)?;
            outcome.shortest_prefix = prefix;
            outcome.replays = replays;
        }
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    say(
        out,
        format!(
            "torture: {:.1}s, {:.0} ops/s",
            secs,
            outcome.ops as f64 / secs
        ),
    )?;
    say(
        out,
        format!(
            "torture: {} operations, {} divergences, seed {}",
            outcome.ops,
            usize::from(outcome.divergence.is_some()),
            cfg.seed
        ),
    )?;
    Ok(outcome)
}

/// One line of the report.
fn say(out: &mut dyn Write, line: String) -> Result<(), TortureError> {
    writeln!(out, "{line}").map_err(TortureError::Report)
}

/// After a run without divergence: close every descriptor, and save the
/// model when asked to.
fn close_and_save(
    cfg: &Config,
    mut s: Steps,
    root: &FsPath,
    out: &mut dyn Write,
) -> Result<(), TortureError> {
    s.real.close_all();
    for slot in s.model.fds.iter_mut() {
        *slot = None;
    }
    let Some(path) = &cfg.save_model else {
        return Ok(());
    };
    let closed = close_model(&s.model);
    let saved = verify::Saved {
        root: root.to_path_buf(),
        seed: cfg.seed,
        ops: s.done,
        features: s.model.features,
        records: verify::model_records(&closed),
    };
    write_synced(path, saved.to_text().as_bytes())
        .map_err(|e| TortureError::SaveModel(path.clone(), e))?;
    say(
        out,
        format!(
            "torture: model of {} saved to {}",
            root.display(),
            path.display()
        ),
    )
}

/// Report divergence `d` and the operations before it, then (when asked)
/// search the shortest failing prefix: `(prefix, replays)`.
fn report_divergence(
    cfg: &Config,
    s: Steps,
    d: &Divergence,
    root: &FsPath,
    out: &mut dyn Write,
) -> Result<(Option<u64>, u64), TortureError> {
    say(
        out,
        format!(
            "torture: DIVERGENCE at step {} (seed {}): {}",
            d.step, cfg.seed, d.what
        ),
    )?;
    say(out, "torture: operations up to it:".into())?;
    for line in &d.recent {
        say(out, format!("  {line}"))?;
    }
    say(
        out,
        format!("torture: the tree is kept in {}", root.display()),
    )?;
    drop(s);
    if !cfg.minimize {
        return Ok((None, 0));
    }
    let (prefix, replays) = shortest_prefix(cfg, d)?;
    match prefix {
        Some(n) => say(
            out,
            format!(
                "torture: shortest failing prefix: {n} operations ({replays} replays); re-run: \
                 pohmelfs torture --dir {} --seed {} --ops {n}",
                cfg.dir.display(),
                cfg.seed
            ),
        )?,
        None => say(
            out,
            format!(
                "torture: the divergence did not recur when the first {} operations were replayed: \
                 it depends on timing or on state outside the run",
                d.step + 1
            ),
        )?,
    }
    Ok((prefix, replays))
}

/// The model with every descriptor closed (unlinked open files gone).
fn close_model(m: &Model) -> Model {
    let mut closed = m.clone();
    for slot in 0..closed.fds.len() {
        if closed.fds[slot].is_some() {
            let _ = closed.apply(&Op::Close { slot });
        }
    }
    closed
}

/// Search the smallest number of steps that still fails, between the last
/// full comparison that passed and the divergence: `(None, replays)` when
/// even the whole prefix passes on replay.
fn shortest_prefix(cfg: &Config, d: &Divergence) -> Result<(Option<u64>, u64), TortureError> {
    let mut hi = d.step + 1;
    let mut replays = 1;
    if !replay_fails(cfg, hi)? {
        return Ok((None, replays));
    }
    // Steps up to a full comparison that passed cannot fail by themselves
    // (the same seed makes the same operations), so search after it.
    let full = (d.step / cfg.full_every.max(1)) * cfg.full_every.max(1);
    let mut lo = full.saturating_add(1).min(hi);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        replays += 1;
        if replay_fails(cfg, mid)? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok((Some(hi), replays))
}

/// Write `bytes` to `path` and fsync it and its directory: the model must
/// survive what the tree survives.
fn write_synced(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Compare the tree a saved model names (or `root`, when given) with it;
/// prints each difference and a summary. Returns the number of
/// differences.
pub fn verify_saved(
    model: &FsPath,
    root: Option<&FsPath>,
    out: &mut dyn Write,
) -> Result<usize, TortureError> {
    let text = std::fs::read_to_string(model)
        .map_err(|e| TortureError::ReadModel(model.to_path_buf(), e))?;
    let saved = verify::Saved::parse(&text)
        .map_err(|e| TortureError::ParseModel(model.to_path_buf(), e))?;
    let root = root.map_or_else(|| saved.root.clone(), FsPath::to_path_buf);
    let started = Instant::now();
    let diffs = match verify::real_records(&root, saved.features) {
        Ok(got) => verify::differences(&saved.records, &got),
        Err(e) => vec![e],
    };
    let w =
        |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(TortureError::Report);
    for d in &diffs {
        w(out, format!("torture: verify: {d}"))?;
    }
    w(
        out,
        format!(
            "torture: verify: {} paths of {} after {} operations (seed {}), {} differences, {:.1}s",
            saved.records.len(),
            root.display(),
            saved.ops,
            saved.seed,
            diffs.len(),
            started.elapsed().as_secs_f64()
        ),
    )?;
    Ok(diffs.len())
}

#[cfg(test)]
mod tests;
