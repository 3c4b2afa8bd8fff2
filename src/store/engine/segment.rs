//! Segment files: where a `file://` volume keeps file data, outside the
//! LSM tree.
//!
//! A segment is an append-only file `DIR/segments/<id>.seg` (the id as 16
//! hex digits). One segment is active at a time; it is sealed (never
//! written again) when the next write would take it past
//! [`SEGMENT_BYTES_MAX`], and when the volume closes: every open starts a
//! new one. Bytes once written never change; they only die, when no extent
//! refers to them any more, and are then given back to the filesystem by
//! punching holes (after the batch that dropped them is durable).
//!
//! Each write starts on a fresh page, at an offset congruent to its file
//! offset modulo [`PAGE`] (see `extent.rs` for why).
//!
//! A large append whose buffers and offset are sector-aligned (a guest's
//! whole pages) is written `O_DIRECT`: through the page cache, the kernel's
//! copy into newly allocated page-cache folios was most of a sequential
//! write's CPU (`docs/benchmarks.md`, "Direct segment writes"). The
//! written range is not in the host's page cache afterwards: its first
//! read comes from the disk through the kernel's read-ahead, into large
//! folios (advising it `WILLNEED` after the write, as before session 45,
//! cost the writer CPU and left single-page folios that made every later
//! read of it dearer). Small or unaligned appends, and file systems that
//! refuse `O_DIRECT`, go through the page cache.
//!
//! Durability is shared like WAL flushes in `group.rs`: committers append,
//! then ask for their bytes to be durable; one of them runs `fdatasync` for
//! everything appended so far and the others find themselves covered. A
//! segment is synced (and its directory entry made durable) when it is
//! sealed, so "durable up to (id, offset)" covers every older segment.
//!
//! This module owns the files. It never touches the engine and never
//! decides what is live; the engine tells it what to punch and delete.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::extent::PAGE;
use super::overlay::Overlay;

/// A segment is sealed once it holds this many bytes.
pub const SEGMENT_BYTES_MAX: u64 = 256 << 20;

/// Appends this long or longer go `O_DIRECT` when aligned: below it the
/// device's latency on the commit thread costs more than the copy.
pub const DIRECT_MIN: u64 = 64 << 10;

/// The alignment `O_DIRECT` asks of offsets, lengths and buffers here (a
/// file system that wants more refuses with `EINVAL`, and appends go
/// through the page cache from then on).
const SECTOR: u64 = 512;

/// Open read handles kept for sealed segments; past this the cache is
/// emptied (handles in use stay open through their `Arc`).
const READ_HANDLES_MAX: usize = 256;

/// The name of the segment directory inside a `file://` volume.
pub const DIR_NAME: &str = "segments";

/// Where one write's bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub seg: u64,
    pub seg_off: u64,
    pub len: u64,
}

struct Active {
    id: u64,
    file: Arc<File>,
    /// The same file opened `O_DIRECT`, unless refused.
    direct: Option<File>,
    len: u64,
}

impl Active {
    fn new(dir: &Path, id: u64, direct: bool) -> io::Result<Active> {
        let file = Arc::new(create(dir, id)?);
        let direct = direct
            .then(|| open_direct(&dir.join(file_name(id))))
            .flatten();
        Ok(Active {
            id,
            file,
            direct,
            len: 0,
        })
    }
}

/// The segments of one volume open for writing.
pub struct Segments {
    dir: PathBuf,
    active: Mutex<Active>,
    /// Held by the committer running an `fdatasync`; holds what is durable:
    /// every segment below `.0`, and segment `.0` up to `.1`.
    durable: Mutex<(u64, u64)>,
    handles: Mutex<HashMap<u64, Arc<File>>>,
    /// Appends whose batch has not been written yet, per segment: a pinned
    /// segment is never deleted, however few live bytes it has.
    pins: Mutex<HashMap<u64, usize>>,
    /// How many `fdatasync` calls committers shared, for tests and logs.
    syncs: AtomicU64,
    /// Bytes appended `O_DIRECT`, for tests and logs.
    direct_bytes: AtomicU64,
    /// Whether appends may still go `O_DIRECT` (cleared when refused).
    direct_ok: AtomicBool,
    max_bytes: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these leaves plain numbers behind, still true.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// The id of a segment file name, if it is one.
pub fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The segment files in `dir`, as `(id, length)`, by id.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_name) {
            out.push((id, entry.metadata()?.len()));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `path` opened again for `O_DIRECT` writes; `None` where the file
/// system refuses it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Whether `bufs` at `at` may go `O_DIRECT`: long enough, and every
/// buffer, length and the offset on a sector boundary.
fn direct_shaped(bufs: &[&[u8]], at: u64, len: u64) -> bool {
    let sector = SECTOR as usize;
    len >= DIRECT_MIN
        && at % SECTOR == 0
        && bufs
            .iter()
            .all(|b| b.as_ptr() as usize % sector == 0 && b.len() % sector == 0)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create(dir: &Path, id: u64) -> io::Result<File> {
    let path = dir.join(file_name(id));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    if let Err(e) = sync_dir(dir) {
        // Leave no file behind: the next attempt creates the same id.
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(f)
}

/// Write all of `bufs` at `offset` of `file`, with as few `pwritev` calls
/// as the kernel allows.
pub fn write_all_at(file: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0usize;
    while first < iov.len() {
        let count = (iov.len() - first).min(1024) as libc::c_int;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::other("segment offset out of range"))?;
        // SAFETY: every iovec points into a slice of `bufs`, alive and
        // unaliased for reading for the whole call; `count` entries from
        // `first` are in bounds of `iov`; the fd is open while `file` is.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov[first..].as_ptr(), count, off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote 0"));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && first < iov.len() {
            if n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same slice, n < its length.
                iov[first].iov_base = unsafe { (iov[first].iov_base as *mut u8).add(n) }.cast();
                iov[first].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Give the pages of `r` back to the filesystem, keeping the file's size.
pub fn punch(file: &File, r: Range<u64>) -> io::Result<()> {
    let (off, len) = match (
        libc::off_t::try_from(r.start),
        libc::off_t::try_from(r.end - r.start),
    ) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::other("punch range out of range")),
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is open
    // while `file` is.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Segments {
    /// Open the segment directory of a volume at `volume_dir`, creating it,
    /// and start a new active segment after every existing one.
    pub fn open_with_max(volume_dir: &Path, max_bytes: u64) -> io::Result<Segments> {
        let dir = volume_dir.join(DIR_NAME);
        std::fs::create_dir_all(&dir)?;
        sync_dir(volume_dir)?;
        let id = list(&dir)?.last().map_or(1, |(id, _)| id + 1);
        let active = Active::new(&dir, id, true)?;
        Ok(Segments {
            direct_ok: AtomicBool::new(active.direct.is_some()),
            dir,
            active: Mutex::new(active),
            durable: Mutex::new((id, 0)),
            handles: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            syncs: AtomicU64::new(0),
            direct_bytes: AtomicU64::new(0),
            max_bytes,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The active segment's id: every lower id is sealed.
    pub fn active_id(&self) -> u64 {
        lock(&self.active).id
    }

    /// Append `bufs` (one write's bytes, for file offset `file_off`) to the
    /// active segment, sealing it first if they would not fit. The segment
    /// stays pinned until [`Segments::unpin`].
    pub fn append(&self, file_off: u64, bufs: &[&[u8]]) -> io::Result<Placed> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let mut a = lock(&self.active);
        let mut at = a.len.div_ceil(PAGE) * PAGE + file_off % PAGE;
        if a.len > 0 && at + len > self.max_bytes {
            a.file.sync_data()?;
            *a = Active::new(&self.dir, a.id + 1, self.direct_ok.load(Ordering::Relaxed))?;
            at = file_off % PAGE;
        }
        self.write(&a, bufs, at, len)?;
        a.len = at + len;
        *lock(&self.pins).entry(a.id).or_insert(0) += 1;
        Ok(Placed {
            seg: a.id,
            seg_off: at,
            len,
        })
    }

    /// Seal the active segment (synced) and start a new one, whatever its
    /// length: a snapshot shares every segment below the new active one,
    /// and no later append may go into a shared file. The new active id.
    pub fn seal(&self) -> io::Result<u64> {
        let mut a = lock(&self.active);
        a.file.sync_data()?;
        *a = Active::new(&self.dir, a.id + 1, self.direct_ok.load(Ordering::Relaxed))?;
        Ok(a.id)
    }

    /// Write one append's bytes at `at` of the active segment: `O_DIRECT`
    /// when shaped for it; else (or when the file system refuses the
    /// shape) through the page cache.
    fn write(&self, a: &Active, bufs: &[&[u8]], at: u64, len: u64) -> io::Result<()> {
        if let Some(direct) = a.direct.as_ref().filter(|_| direct_shaped(bufs, at, len)) {
            match write_all_at(direct, bufs, at) {
                Ok(()) => {
                    self.direct_bytes.fetch_add(len, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if self.direct_ok.swap(false, Ordering::Relaxed) {
                        tracing::info!(dir = %self.dir.display(), error = %e, "segment appends go through the page cache: the file system refuses their O_DIRECT shape");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        write_all_at(&a.file, bufs, at)
    }

    /// Bytes appended `O_DIRECT` so far.
    #[cfg(test)]
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes.load(Ordering::Relaxed)
    }

    /// How many directory entries name segment `seg`'s file: more than
    /// one while a snapshot or clone shares it (`snapshot.rs`).
    pub fn links(&self, seg: u64) -> io::Result<u64> {
        Ok(std::os::unix::fs::MetadataExt::nlink(
            &self.handle(seg)?.metadata()?,
        ))
    }

    /// Release the pin of one append, once its batch is written or
    /// abandoned.
    pub fn unpin(&self, seg: u64) {
        let mut pins = lock(&self.pins);
        if let Some(n) = pins.get_mut(&seg) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&seg);
            }
        }
    }

    /// Whether `seg` may be deleted once nothing refers to it: sealed, and
    /// no append into it is waiting for its batch.
    pub fn deletable(&self, seg: u64) -> bool {
        seg < self.active_id() && !lock(&self.pins).contains_key(&seg)
    }

    /// Return once everything appended so far up to `(seg, end)` is on the
    /// medium, sharing the `fdatasync` with concurrent callers.
    pub fn sync_to(&self, seg: u64, end: u64) -> io::Result<()> {
        let mut durable = lock(&self.durable);
        if *durable >= (seg, end) {
            return Ok(());
        }
        let (id, file, len) = {
            let a = lock(&self.active);
            (a.id, a.file.clone(), a.len)
        };
        if id > seg {
            // Sealing synced the whole of `seg`.
            return Ok(());
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        file.sync_data()?;
        *durable = (*durable).max((id, len));
        Ok(())
    }

    /// Return once everything appended so far is on the medium.
    pub fn sync_all(&self) -> io::Result<()> {
        let (id, len) = {
            let a = lock(&self.active);
            (a.id, a.len)
        };
        self.sync_to(id, len)
    }

    /// Write `bytes` at `off` of segment `seg` again (replaying the commit
    /// log: the same bytes to the same place).
    pub fn rewrite(&self, seg: u64, off: u64, bytes: &[u8]) -> io::Result<()> {
        write_all_at(&*self.handle(seg)?, &[bytes], off)
    }

    /// `fdatasync` segment `seg`.
    pub fn sync_segment(&self, seg: u64) -> io::Result<()> {
        self.handle(seg)?.sync_data()
    }

    /// How many `fdatasync` calls were made for commits.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// An open handle of segment `seg`.
    pub(super) fn handle(&self, seg: u64) -> io::Result<Arc<File>> {
        {
            let a = lock(&self.active);
            if a.id == seg {
                return Ok(a.file.clone());
            }
        }
        let mut h = lock(&self.handles);
        if let Some(f) = h.get(&seg) {
            return Ok(f.clone());
        }
        if h.len() >= READ_HANDLES_MAX {
            h.clear();
        }
        // Writable, for punching; nothing else writes through it.
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.dir.join(file_name(seg)))?,
        );
        h.insert(seg, f.clone());
        Ok(f)
    }

    /// Read `buf.len()` bytes at `off` of segment `seg`; short is an error.
    pub fn read_at(&self, seg: u64, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.handle(seg)?.read_exact_at(buf, off)
    }

    /// Punch the (page-aligned) ranges of `seg`; a filesystem that cannot
    /// punch keeps the bytes (space is lost until the segment is deleted).
    pub fn punch(&self, seg: u64, ranges: &[Range<u64>]) -> io::Result<()> {
        let f = self.handle(seg)?;
        for r in ranges {
            match punch(&f, r.clone()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Delete sealed segment `seg`.
    pub fn remove(&self, seg: u64) -> io::Result<()> {
        lock(&self.handles).remove(&seg);
        match std::fs::remove_file(self.dir.join(file_name(seg))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Dead page ranges, by segment.
pub type DeadPages = BTreeMap<u64, Vec<Range<u64>>>;

/// Segment files opened read-only: for the volume checker, and for a
/// volume served read-only (`readonly.rs`).
pub struct SegmentFiles {
    dir: PathBuf,
    /// The commit log's bytes not yet replayed into the files.
    overlay: Arc<Overlay>,
    /// Open handles, at most [`READ_HANDLES_MAX`] (then emptied).
    handles: Mutex<HashMap<u64, Arc<File>>>,
}

impl SegmentFiles {
    /// The segment files of the volume in `volume_dir`.
    pub fn of_volume(volume_dir: &Path) -> SegmentFiles {
        SegmentFiles::at(&volume_dir.join(DIR_NAME))
    }

    /// The segment files in `dir` itself.
    pub fn at(dir: &Path) -> SegmentFiles {
        SegmentFiles {
            dir: dir.to_path_buf(),
            overlay: Arc::default(),
            handles: Mutex::default(),
        }
    }

    /// The same files, read with the commit log's unreplayed bytes over
    /// them.
    pub(super) fn with_overlay(self, overlay: Arc<Overlay>) -> SegmentFiles {
        SegmentFiles { overlay, ..self }
    }

    /// Every segment file, as `(id, length)`, by id.
    pub fn list(&self) -> io::Result<Vec<(u64, u64)>> {
        list(&self.dir)
    }

    pub fn read_at(&self, seg: u64, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.handle(seg)?.read_exact_at(buf, off)?;
        self.overlay.patch(seg, off, buf);
        Ok(())
    }

    /// An open (read-only) handle of segment `seg`.
    fn handle(&self, seg: u64) -> io::Result<Arc<File>> {
        let mut h = lock(&self.handles);
        if let Some(f) = h.get(&seg) {
            return Ok(f.clone());
        }
        if h.len() >= READ_HANDLES_MAX {
            h.clear();
        }
        let f = Arc::new(File::open(self.dir.join(file_name(seg)))?);
        h.insert(seg, f.clone());
        Ok(f)
    }

    /// How many directory entries name segment `seg`'s file (more than
    /// one: a snapshot or clone shares it).
    pub fn links(&self, seg: u64) -> io::Result<u64> {
        Ok(std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(
            self.dir.join(file_name(seg)),
        )?))
    }

    /// The byte ranges of `seg` that hold data (not holes), page-aligned.
    pub fn allocated(&self, seg: u64) -> io::Result<Vec<Range<u64>>> {
        allocated(&File::open(self.dir.join(file_name(seg)))?)
    }

    /// The dead pages a live migration's hand-over left for the next
    /// open's reclaimer to punch (`reclaim.rs`), and the emptied segments
    /// it is to delete.
    pub fn handed(&self) -> Result<(DeadPages, Vec<u64>), String> {
        super::reclaim::read_handed(&self.dir).map(|r| (r.dead, r.emptied))
    }
}

/// The byte ranges of `f` that hold data (not holes), page-aligned.
pub fn allocated(f: &File) -> io::Result<Vec<Range<u64>>> {
    let size = libc::off_t::try_from(f.metadata()?.len())
        .map_err(|_| io::Error::other("segment too large"))?;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: libc::off_t = 0;
    while pos < size {
        // SAFETY: lseek only reads its integer arguments; fd is open.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push(data as u64..hole as u64);
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);

    /// Whole aligned pages go `O_DIRECT` (where the test's file system
    /// takes it), small and misaligned appends through the page cache, and
    /// every append reads back as written.
    #[test]
    fn aligned_appends_go_direct_and_every_append_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open_with_max(dir.path(), SEGMENT_BYTES_MAX).unwrap();
        let takes_direct = open_direct(&segs.dir().join(file_name(segs.active_id()))).is_some();
        let pages: Vec<Box<Page>> = (0..32u8).map(|i| Box::new(Page([i; 4096]))).collect();
        let whole: Vec<&[u8]> = pages.iter().map(|p| &p.0[..]).collect();
        let small: &[u8] = b"a few bytes";
        let big = vec![7u8; 2 * DIRECT_MIN as usize + 1];
        let misaligned = &big[1..];
        let appends: [(u64, Vec<&[u8]>); 4] = [
            (0, whole.clone()),
            (100, vec![small]),
            (0, vec![misaligned]),
            (8192, whole.clone()),
        ];
        let mut placed = Vec::new();
        for (file_off, bufs) in &appends {
            placed.push(segs.append(*file_off, bufs).unwrap());
        }
        segs.sync_all().unwrap();
        let direct = if takes_direct { 2 * 32 * 4096 } else { 0 };
        assert_eq!(segs.direct_bytes(), direct, "O_DIRECT bytes");
        for ((_, bufs), p) in appends.iter().zip(&placed) {
            let want: Vec<u8> = bufs.concat();
            let mut got = vec![0u8; want.len()];
            segs.read_at(p.seg, p.seg_off, &mut got).unwrap();
            assert!(got == want, "append at {p:?} reads back otherwise");
        }
    }
}
