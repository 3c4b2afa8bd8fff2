//! The commit log of a `file://` volume: where a commit becomes durable.
//!
//! `DIR/log/commit.log` is created once, preallocated and zero-filled, so
//! that later writes overwrite written blocks and `fdatasync` flushes data
//! without a journal commit. Records are written `O_DIRECT` where the file
//! system allows it, so a commit writes its own pages and not the page
//! cache's whole folio around them. Page 0 is the header: the ring's tail (where
//! replay starts). The rest is a ring of 4 KiB pages holding records, each
//! page aligned, so a torn write damages only its own pages:
//!
//! ```text
//! magic u32, version u16, flags u16, lsn u64, prev u32 (crc of the record
//! before), len u32 (payload bytes), crc u32 (crc32c of the header with crc
//! = 0, then the payload), zero u32, payload, zero pad to a page
//! ```
//!
//! A record that would cross the end of the file is preceded by a wrap
//! record (flag `WRAP`, the lsn of the record that follows) and starts at
//! page 1. Replay walks from the tail while records have the magic, a good
//! crc, the next lsn and the previous record's crc in `prev`: a stale record
//! of an earlier lap has a lower lsn, a torn one fails its crc, and a record
//! left behind a torn one by an unacknowledged group fails the chain.
//!
//! The payload (see `encode_payload`) is an engine batch as `(key,
//! Option<value>)` pairs and the bytes of small writes with their segment
//! placements: those of one commit, or the union of a group of commits
//! (`log_queue.rs`), which the record makes durable together.
//!
//! One writer at a time: the file is locked with `flock`. An opener (which
//! has fenced the previous writer's engine already) that finds it locked
//! creates `log/fence` and waits, bounded; the holder polls for that file,
//! stops appending (its next commit fails as fenced) and releases the
//! lock. A second open in the same process takes the lock over from the
//! first instance directly, fencing it the same way.
//!
//! This module owns the file, the ring and the lock; the bytes of records
//! and the header are `log_record.rs`. It never touches the engine or the
//! segments: the commit path and recovery (`recover.rs`) do.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use thiserror::Error;

use super::log_record::{decode_header, encode_header, seal, RingBytes, FLAG_WRAP};
pub use super::log_record::{
    encode_payload, record_bytes, scan, Position, Record, SegWrite, PAGE, RECORD_HEADER,
};

/// The log's directory inside a `file://` volume.
pub const DIR_NAME: &str = "log";
/// The log file's name in [`DIR_NAME`].
pub const FILE_NAME: &str = "commit.log";
/// The log's size when the URL names none.
pub const LOG_BYTES_DEFAULT: u64 = 16 << 20;
/// The smallest log a URL may ask for.
pub const LOG_BYTES_MIN: u64 = 64 << 10;
/// The file an opener that finds the log locked creates beside it: the
/// holder, which polls for it, stops appending and releases the lock.
const FENCE_FILE: &str = "fence";
/// How long an open waits for another process to release the log.
const LOCK_WAIT_MS: u64 = 10_000;
const LOCK_STEP_MS: u64 = 10;

/// What went wrong with the log.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("commit log I/O")]
    Io(#[from] io::Error),
    #[error("commit log header: {0}")]
    Header(String),
    #[error("commit log record of {0} bytes exceeds the ring")]
    TooLarge(usize),
    #[error("commit log is full until a checkpoint")]
    Full,
    #[error("another instance opened the volume; this one is fenced")]
    Fenced,
    #[error("an earlier commit log write failed; reopen the volume")]
    Failed,
    #[error("commit log is locked by another process")]
    Locked,
    #[error("commit log record {lsn}: {reason}")]
    Corrupt { lsn: u64, reason: String },
}

/// The records from the tail of the log of the volume in `volume_dir`,
/// read without taking its lock (none when it has no log).
pub fn read_unreplayed(volume_dir: &Path) -> Result<Vec<Record>, LogError> {
    let path = volume_dir.join(DIR_NAME).join(FILE_NAME);
    let ring = match std::fs::read(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LogError::Io(e)),
    };
    let size = ring.len() as u64 / PAGE * PAGE;
    if size < LOG_BYTES_MIN {
        return Err(LogError::Header(format!("log file of {size} bytes")));
    }
    let ring = &ring[..size as usize];
    let tail = decode_header(&ring[..PAGE as usize], size)?;
    Ok(scan(ring, tail)?.0)
}

/// The ring file read on demand, [`FILE_CHUNK`] bytes at a time, for the
/// scan at open: after a clean close the records from the tail are none,
/// and reading the whole ring (16 MiB by default) cost an open about as
/// much as the engine's own open.
struct FileRing<'f> {
    file: &'f File,
    size: u64,
    /// The chunks read so far, by index.
    chunks: HashMap<u64, Vec<u8>>,
    /// A record's bytes when it spans chunks.
    joined: Vec<u8>,
}

/// How much of the ring [`FileRing`] reads at a time.
const FILE_CHUNK: u64 = 256 << 10;

impl<'f> FileRing<'f> {
    fn new(file: &'f File, size: u64) -> Self {
        FileRing {
            file,
            size,
            chunks: HashMap::new(),
            joined: Vec::new(),
        }
    }

    fn chunk(&mut self, index: u64) -> Result<&[u8], LogError> {
        if !self.chunks.contains_key(&index) {
            let start = index * FILE_CHUNK;
            let mut buf = vec![0u8; FILE_CHUNK.min(self.size - start) as usize];
            self.file.read_exact_at(&mut buf, start)?;
            self.chunks.insert(index, buf);
        }
        Ok(self.chunks.get(&index).map_or(&[], Vec::as_slice))
    }
}

impl RingBytes for FileRing<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn get(&mut self, off: u64, len: usize) -> Result<&[u8], LogError> {
        let end = off.saturating_add(len as u64).min(self.size);
        if off >= end {
            return Ok(&[]);
        }
        let (first, last) = (off / FILE_CHUNK, (end - 1) / FILE_CHUNK);
        if first == last {
            let at = (off - first * FILE_CHUNK) as usize;
            let chunk = self.chunk(first)?;
            return Ok(&chunk[at..at + (end - off) as usize]);
        }
        let mut joined = std::mem::take(&mut self.joined);
        joined.clear();
        for index in first..=last {
            let chunk_start = index * FILE_CHUNK;
            let from = off.max(chunk_start) - chunk_start;
            let to = end.min(chunk_start + FILE_CHUNK) - chunk_start;
            joined.extend_from_slice(&self.chunk(index)?[from as usize..to as usize]);
        }
        self.joined = joined;
        Ok(&self.joined)
    }
}

/// The ring's state, under the log's lock.
struct Ring {
    file: Arc<File>,
    /// The same file opened `O_DIRECT`, where the file system allows it:
    /// records go through it (see [`write_direct`]).
    direct: Option<Arc<File>>,
    size: u64,
    /// Where the next record goes.
    head: Position,
    /// Where replay would start: nothing before it is needed.
    tail: Position,
    /// The end of the last record whose batch the engine has.
    applied: Position,
    fenced: bool,
    failed: bool,
    /// Records made durable by this instance (one `fdatasync` each).
    synced: u64,
}

impl Ring {
    /// Bytes free for records between the head and the tail.
    fn free(&self) -> u64 {
        if self.tail.off > self.head.off {
            self.tail.off - self.head.off
        } else {
            (self.size - self.head.off) + (self.tail.off - PAGE)
        }
    }
}

/// The commit log of one open volume.
pub struct CommitLog {
    ring: Mutex<Ring>,
    /// Where another process asks for the lock.
    fence: std::path::PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type OpenLogs = Mutex<HashMap<(u64, u64), Weak<CommitLog>>>;

/// The logs open in this process, by (device, inode): a second open takes
/// the lock (and the file description holding it) over from the first.
fn open_logs() -> &'static OpenLogs {
    static LOGS: OnceLock<OpenLogs> = OnceLock::new();
    LOGS.get_or_init(Mutex::default)
}

/// Take the lock of `file`, asking its holder to let go through the
/// fence file in `dir` (the caller has fenced the holder's engine already).
fn flock_exclusive(file: &File, dir: &Path) -> Result<(), LogError> {
    let mut waited = 0;
    let fence = dir.join(FENCE_FILE);
    loop {
        // SAFETY: flock only reads its integer arguments; the fd is open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            // Ours now: a request left behind must not fence us.
            return match std::fs::remove_file(&fence) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(LogError::Io(e)),
                _ => Ok(()),
            };
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(LogError::Io(e));
        }
        if waited == 0 {
            std::fs::write(&fence, std::process::id().to_string())?;
        }
        if waited >= LOCK_WAIT_MS {
            return Err(LogError::Locked);
        }
        // Another process holds it: bounded polling, as flock has no timeout.
        std::thread::sleep(std::time::Duration::from_millis(LOCK_STEP_MS));
        waited += LOCK_STEP_MS;
    }
}

/// Create the log file at `path`: preallocated, zero-filled, an empty
/// ring whose first record gets lsn `first_lsn`, all durable, then renamed
/// into place.
fn create(dir: &Path, path: &Path, size: u64, first_lsn: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{FILE_NAME}.new"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::other("log size"))?;
    // SAFETY: fallocate only reads its integer arguments; the fd is open.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    let empty = Position {
        off: PAGE,
        lsn: first_lsn.max(1),
        prev: 0,
    };
    f.write_all_at(&encode_header(empty), 0)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// The log file opened for `O_DIRECT` writes; `None` where the file
/// system refuses it.
fn open_direct(path: &Path) -> Option<Arc<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
        .map(Arc::new)
}

/// Write `bytes` at `at` (a page boundary) through the `O_DIRECT` file,
/// zero-padded to whole pages from a page-aligned buffer. Records are
/// small writes into a preallocated file: through the page cache each
/// dirtied a whole folio, which the kernel counts (and may write back) in
/// full — about 1 MiB of `write_bytes` per 4 KiB commit on this ext4.
/// Direct, a commit writes its record's pages and no more.
fn write_direct(direct: &File, bytes: &[u8], at: u64) -> io::Result<()> {
    let page = PAGE as usize;
    let len = bytes.len().div_ceil(page) * page;
    let mut buf = vec![0u8; len + page];
    let start = buf.as_ptr().align_offset(page);
    if start > page {
        return Err(io::Error::other("cannot align a buffer to a page"));
    }
    let aligned = &mut buf[start..start + len];
    aligned[..bytes.len()].copy_from_slice(bytes);
    direct.write_all_at(aligned, at)
}

impl CommitLog {
    /// Open (creating if missing, at `size` bytes) the log of the volume
    /// in `volume_dir`, take its lock, and read the records to replay. A
    /// log created here numbers its records from `first_lsn`: above the
    /// last lsn the engine says it applied, which a clone inherits from its
    /// source. (A new log counting from 1 under an engine that says 2 had
    /// its first two records skipped by the replay after a crash.)
    pub fn open(
        volume_dir: &Path,
        size: u64,
        first_lsn: u64,
    ) -> Result<(Arc<CommitLog>, Vec<Record>), LogError> {
        let dir = volume_dir.join(DIR_NAME);
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            std::fs::create_dir_all(&dir)?;
            File::open(volume_dir)?.sync_all()?;
            create(&dir, &path, size, first_lsn)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let meta = file.metadata()?;
        let size = meta.len() / PAGE * PAGE;
        if size < LOG_BYTES_MIN {
            return Err(LogError::Header(format!("log file of {size} bytes")));
        }
        let id = (meta.dev(), meta.ino());
        let mut logs = lock(open_logs());
        let previous = logs.get(&id).and_then(Weak::upgrade);
        let file = match previous {
            Some(old) => {
                // Fence the earlier instance: once we hold its lock it
                // appends nothing more, and we keep its locked file.
                let (file, direct) = {
                    let mut r = lock(&old.ring);
                    r.fenced = true;
                    (r.file.clone(), r.direct.clone())
                };
                // Held already through this description, unless the old
                // instance gave it up on finding its engine fenced.
                flock_exclusive(&file, &dir)?;
                (file, direct)
            }
            None => {
                flock_exclusive(&file, &dir)?;
                (Arc::new(file), open_direct(&path))
            }
        };
        let (file, direct) = file;
        let mut header = vec![0u8; PAGE as usize];
        file.read_exact_at(&mut header, 0)?;
        let tail = decode_header(&header, size)?;
        let (records, head) = scan(FileRing::new(&file, size), tail)?;
        // Some file systems open O_DIRECT but refuse the writes: try one
        // (the header as it is) and write through the page cache if it fails.
        let direct = direct.filter(|d| write_direct(d, &header, 0).is_ok());
        let log = Arc::new(CommitLog {
            fence: dir.join(FENCE_FILE),
            ring: Mutex::new(Ring {
                file,
                direct,
                size,
                head,
                tail,
                applied: head,
                fenced: false,
                failed: false,
                synced: 0,
            }),
        });
        logs.retain(|_, w| w.strong_count() > 0);
        logs.insert(id, Arc::downgrade(&log));
        Ok((log, records))
    }

    /// The lsn the next record gets.
    pub fn next_lsn(&self) -> u64 {
        lock(&self.ring).head.lsn
    }

    /// Whether an append can no longer succeed.
    pub fn check(&self) -> Result<(), LogError> {
        let r = lock(&self.ring);
        if r.fenced {
            return Err(LogError::Fenced);
        }
        if r.failed {
            return Err(LogError::Failed);
        }
        Ok(())
    }

    /// The largest record the ring takes: a quarter of it.
    pub fn record_max(&self) -> u64 {
        lock(&self.ring).size / 4
    }

    /// Whether more than half the ring is in use.
    pub fn half_full(&self) -> bool {
        let r = lock(&self.ring);
        r.free() < (r.size - PAGE) / 2
    }

    /// Write `buf` (from [`encode_payload`]) as the record with lsn
    /// [`CommitLog::next_lsn`] and make it durable: one `pwrite` (two
    /// when it wraps) and one `fdatasync`. `Full` changes nothing; any I/O
    /// error leaves the log failed: the page cache no longer says what
    /// reached the disk.
    pub fn append(&self, buf: &mut Vec<u8>) -> Result<u64, LogError> {
        let mut r = lock(&self.ring);
        if r.fenced {
            return Err(LogError::Fenced);
        }
        if r.failed {
            return Err(LogError::Failed);
        }
        let taken = record_bytes(buf.len() - RECORD_HEADER);
        if taken > r.size / 4 {
            return Err(LogError::TooLarge(buf.len()));
        }
        let mut at = r.head.off;
        let wraps = at + taken > r.size;
        let needed = if wraps { r.size - at + taken } else { taken };
        // Strictly less: a full ring would look empty.
        if needed >= r.free() {
            return Err(LogError::Full);
        }
        let lsn = r.head.lsn;
        let prev = r.head.prev;
        let file = r.file.clone();
        let direct = r.direct.clone();
        let write = |bytes: &[u8], at: u64| match &direct {
            Some(d) => write_direct(d, bytes, at),
            None => file.write_all_at(bytes, at),
        };
        let written = (|| {
            if wraps {
                if at < r.size {
                    let mut w = vec![0u8; RECORD_HEADER];
                    seal(&mut w, FLAG_WRAP, lsn, prev);
                    write(&w, at)?;
                }
                at = PAGE;
            }
            let crc = seal(buf, 0, lsn, prev);
            write(buf, at)?;
            file.sync_data()?;
            Ok::<u32, io::Error>(crc)
        })();
        match written {
            Ok(crc) => {
                r.synced += 1;
                r.head = Position {
                    off: at + taken,
                    lsn: lsn + 1,
                    prev: crc,
                };
                Ok(lsn)
            }
            Err(e) => {
                r.failed = true;
                Err(LogError::Io(e))
            }
        }
    }

    /// How many records this instance wrote and synced (one `fdatasync`
    /// each).
    #[cfg(test)]
    pub fn synced(&self) -> u64 {
        lock(&self.ring).synced
    }

    /// Refuse every later append: what was logged and what the engine
    /// holds have parted.
    pub fn fail(&self) {
        lock(&self.ring).failed = true;
    }

    /// If another process asked for the log (it has fenced this
    /// instance's engine already), stop appending and release the lock;
    /// whether this instance is fenced now.
    pub fn yield_if_asked(&self) -> bool {
        self.yield_lock(false)
    }

    /// Stop appending and release the lock, asked or not (the engine
    /// reported this instance fenced: another writer opened the volume).
    pub fn yield_to_successor(&self) {
        self.yield_lock(true);
    }

    fn yield_lock(&self, unasked: bool) -> bool {
        let mut r = lock(&self.ring);
        if r.fenced {
            return true;
        }
        if !unasked && !self.fence.exists() {
            return false;
        }
        r.fenced = true;
        // SAFETY: flock only reads its integer arguments; the fd is open.
        unsafe { libc::flock(r.file.as_raw_fd(), libc::LOCK_UN) };
        true
    }

    /// Note that the engine has the batch of every record so far.
    pub fn applied_all(&self) {
        let mut r = lock(&self.ring);
        r.applied = r.head;
    }

    /// The end of the last record whose batch the engine has.
    pub fn applied(&self) -> Position {
        lock(&self.ring).applied
    }

    /// The tail as last made durable.
    pub fn tail(&self) -> Position {
        lock(&self.ring).tail
    }

    /// Move the tail to `to` (a position from [`CommitLog::applied`],
    /// whose records are durable elsewhere): write the header and
    /// `fdatasync` it.
    pub fn advance_tail(&self, to: Position) -> Result<(), LogError> {
        let mut r = lock(&self.ring);
        if r.fenced {
            return Err(LogError::Fenced);
        }
        if r.failed {
            return Err(LogError::Failed);
        }
        if to == r.tail {
            return Ok(());
        }
        let file = r.file.clone();
        let written = file
            .write_all_at(&encode_header(to), 0)
            .and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                r.tail = to;
                Ok(())
            }
            Err(e) => {
                r.failed = true;
                Err(LogError::Io(e))
            }
        }
    }
}
