//! Hand-built hostile descriptor chains against the device: each test lays
//! out in guest memory what a malicious guest driver could post, and checks
//! the reply, the counters and that nothing sized by the guest was
//! allocated while the chain was served.

use std::mem::size_of;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, GetattrIn, InitIn, IoctlIn, Opcode, OpenOut, ReadIn, WriteIn, WriteOut,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace};

use super::alloc_probe::largest_allocation;
use super::request::{Chain, Requests};
use super::testkit::{
    guest_memory, header, post, reply, served_fs, write_request, BULK, BULK_LEN, OUT_LEN, REPLY,
    REQUEST,
};
use super::validate::{CHAIN_DESCRIPTORS_MAX, IN_HEADER_LEN, REQUEST_BYTES_MAX};
use crate::ratelimit::LINES_PER_WINDOW;

/// Larger than anything serving a refused chain may allocate (the reader's
/// list of buffers), far smaller than what the hostile chains ask for.
const SMALL_ALLOCATION: usize = 64 << 10;

/// A reply buffer for requests whose answer has a body.
const REPLY_LEN: u32 = 4096;

/// `count` readable descriptors over the same 1 MiB region.
fn overlapping(count: usize) -> Vec<(u64, u32, bool)> {
    vec![(BULK, BULK_LEN, false); count]
}

/// Serve `chain` and assert that no single allocation reached
/// [`SMALL_ALLOCATION`] and that a bare reply header was written.
fn serve_without_large_allocation(requests: &Requests, chain: &Chain) {
    let (used, largest) = largest_allocation(|| requests.serve(chain, 1));
    assert!(largest < SMALL_ALLOCATION, "allocated {largest} bytes");
    assert_eq!(used, OUT_LEN);
}

#[test]
fn an_ioctl_over_overlapping_descriptors_is_refused_without_allocating() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    // fuse-backend-rs 0.14 checks in_size only against the readable bytes
    // and then allocates and copies in_size bytes: 64 descriptors over one
    // 1 MiB region make 64 MiB "available".
    let in_size = 64 * BULK_LEN;
    let ioctl = IoctlIn {
        in_size,
        ..IoctlIn::default()
    };
    let len = IN_HEADER_LEN + size_of::<IoctlIn>();
    let h = header(len, Opcode::Ioctl as u32, 3);
    let req = write_request(&mem, h, ioctl.as_slice());
    let mut bufs = vec![(REQUEST, req, false)];
    bufs.extend(overlapping(64));
    bufs.push((REPLY, OUT_LEN, true));
    let chain = post(&mem, &bufs);

    serve_without_large_allocation(&requests, &chain);
    let out = reply(&mem);
    assert_eq!((out.error, out.unique), (-libc::EINVAL, 3));
    assert_eq!(metrics.requests_rejected.get(), 1);
}

#[test]
fn an_ioctl_within_the_cap_is_answered_enosys_before_the_server() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    // A well-framed IOCTL whose input fills the largest request: the
    // server would allocate and copy all of it before asking the
    // filesystem, which has no ioctls.
    let in_size = BULK_LEN - 64;
    let ioctl = IoctlIn {
        in_size,
        ..IoctlIn::default()
    };
    let len = IN_HEADER_LEN + size_of::<IoctlIn>() + in_size as usize;
    assert!(len <= REQUEST_BYTES_MAX);
    let h = header(len, Opcode::Ioctl as u32, 4);
    let req = write_request(&mem, h, ioctl.as_slice());
    let chain = post(
        &mem,
        &[
            (REQUEST, req, false),
            (BULK, in_size, false),
            (REPLY, OUT_LEN, true),
        ],
    );

    serve_without_large_allocation(&requests, &chain);
    let out = reply(&mem);
    assert_eq!((out.error, out.unique), (-libc::ENOSYS, 4));
    assert_eq!(metrics.requests_unsupported.get(), 1);
    assert_eq!(metrics.requests_rejected.get(), 0);
}

#[test]
fn every_opcode_the_daemon_does_not_serve_is_enosys() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    // 7 and 19 are holes in the opcode space (fuse-backend-rs would
    // transmute them into its Opcode enum when tracing); 31-33 locks, 37
    // BMAP, 39 IOCTL, 40 POLL, 41 NOTIFY_REPLY, 47 COPY_FILE_RANGE, 48/49
    // DAX mappings, 51 TMPFILE, 52 STATX, then unknown numbers.
    let unserved = [
        0,
        7,
        19,
        31,
        32,
        33,
        37,
        39,
        40,
        41,
        47,
        48,
        49,
        51,
        52,
        53,
        4096,
        u32::MAX,
    ];
    for (i, &opcode) in unserved.iter().enumerate() {
        let unique = 100 + i as u64;
        let body = [0u8; 64];
        let h = header(IN_HEADER_LEN + body.len(), opcode, unique);
        let req = write_request(&mem, h, &body);
        let chain = post(&mem, &[(REQUEST, req, false), (REPLY, OUT_LEN, true)]);
        assert_eq!(requests.serve(&chain, 1), OUT_LEN, "opcode {opcode}");
        let out = reply(&mem);
        assert_eq!(
            (out.error, out.unique),
            (-libc::ENOSYS, unique),
            "opcode {opcode}"
        );
    }
    assert_eq!(metrics.requests_unsupported.get(), unserved.len() as u64);
}

#[test]
fn an_overlapping_write_chain_is_refused_before_any_allocation() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    let (ino, fh) = create(&requests, &mem, b"f\0");
    // A proper 1 MiB WRITE, then 63 more descriptors over the same data.
    let write = WriteIn {
        fh,
        size: BULK_LEN,
        ..WriteIn::default()
    };
    let len = IN_HEADER_LEN + size_of::<WriteIn>() + BULK_LEN as usize;
    let mut h = header(len, Opcode::Write as u32, 5);
    h.nodeid = ino;
    let req = write_request(&mem, h, write.as_slice());
    let mut bufs = vec![(REQUEST, req, false)];
    bufs.extend(overlapping(64));
    bufs.push((REPLY, REPLY_LEN, true));
    let chain = post(&mem, &bufs);

    serve_without_large_allocation(&requests, &chain);
    assert_eq!(reply(&mem).error, -libc::EINVAL);
    assert_eq!(metrics.requests_rejected.get(), 1);
    assert_eq!(metrics.bytes_written.get(), 0);
}

#[test]
fn a_write_whose_size_disagrees_with_its_length_is_refused() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    let (ino, fh) = create(&requests, &mem, b"f\0");
    // The header says 80 bytes, the WriteIn says 1 MiB, and 1 MiB of
    // readable bytes follow: the filesystem would allocate the 1 MiB.
    let write = WriteIn {
        fh,
        size: BULK_LEN,
        ..WriteIn::default()
    };
    let mut h = header(
        IN_HEADER_LEN + size_of::<WriteIn>(),
        Opcode::Write as u32,
        6,
    );
    h.nodeid = ino;
    let req = write_request(&mem, h, write.as_slice());
    let chain = post(
        &mem,
        &[
            (REQUEST, req, false),
            (BULK, BULK_LEN, false),
            (REPLY, REPLY_LEN, true),
        ],
    );
    serve_without_large_allocation(&requests, &chain);
    assert_eq!(reply(&mem).error, -libc::EINVAL);
    assert_eq!(metrics.requests_rejected.get(), 1);
    assert_eq!(metrics.bytes_written.get(), 0);
}

#[test]
fn a_request_longer_than_the_cap_is_einval() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    // One byte more than a 1 MiB write, carried whole by two descriptors.
    let size = BULK_LEN + 1;
    let write = WriteIn {
        size,
        ..WriteIn::default()
    };
    let len = IN_HEADER_LEN + size_of::<WriteIn>() + size as usize;
    let h = header(len, Opcode::Write as u32, 7);
    let req = write_request(&mem, h, write.as_slice());
    let bufs = [
        (REQUEST, req, false),
        (BULK, BULK_LEN, false),
        (BULK, 1, false),
        (REPLY, OUT_LEN, true),
    ];
    let chain = post(&mem, &bufs);
    assert_eq!(requests.serve(&chain, 1), OUT_LEN);
    assert_eq!(reply(&mem).error, -libc::EINVAL);
    assert_eq!(metrics.requests_rejected.get(), 1);

    // A length beyond the cap on a chain that does not even carry it.
    let h = header(REQUEST_BYTES_MAX + 1, Opcode::Getattr as u32, 8);
    let req = write_request(&mem, h, GetattrIn::default().as_slice());
    let chain = post(&mem, &[(REQUEST, req, false), (REPLY, OUT_LEN, true)]);
    assert_eq!(requests.serve(&chain, 1), OUT_LEN);
    assert_eq!((reply(&mem).error, reply(&mem).unique), (-libc::EINVAL, 8));
    assert_eq!(metrics.requests_rejected.get(), 2);
}

#[test]
fn a_chain_of_too_many_descriptors_is_refused() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    let h = header(
        IN_HEADER_LEN + size_of::<GetattrIn>(),
        Opcode::Getattr as u32,
        9,
    );
    let req = write_request(&mem, h, GetattrIn::default().as_slice());
    let mut bufs = vec![(REQUEST, req, false)];
    bufs.extend(vec![(BULK, 16, false); CHAIN_DESCRIPTORS_MAX]);
    bufs.push((REPLY, REPLY_LEN, true));
    let chain = post(&mem, &bufs);
    assert_eq!(requests.serve(&chain, 1), OUT_LEN);
    assert_eq!((reply(&mem).error, reply(&mem).unique), (-libc::EINVAL, 9));
    assert_eq!(metrics.requests_rejected.get(), 1);
}

#[test]
fn a_name_without_a_nul_never_reaches_the_server() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    // fuse-backend-rs copies the whole body, then logs all of it with
    // `{:?}` at error level when the name has no NUL.
    let name = vec![b'a'; 512 << 10];
    mem.memory().write_slice(&name, GuestAddress(BULK)).unwrap();
    let h = header(IN_HEADER_LEN + name.len(), Opcode::Lookup as u32, 10);
    let req = write_request(&mem, h, &[]);
    let chain = post(
        &mem,
        &[
            (REQUEST, req, false),
            (BULK, name.len() as u32, false),
            (REPLY, REPLY_LEN, true),
        ],
    );
    serve_without_large_allocation(&requests, &chain);
    assert_eq!((reply(&mem).error, reply(&mem).unique), (-libc::EINVAL, 10));
    assert_eq!(metrics.requests_rejected.get(), 1);

    // The second name of a RENAME must be terminated too.
    let mut body = 1u64.to_ne_bytes().to_vec();
    body.extend_from_slice(b"old\0new");
    let h = header(IN_HEADER_LEN + body.len(), Opcode::Rename as u32, 11);
    let req = write_request(&mem, h, &body);
    let chain = post(&mem, &[(REQUEST, req, false), (REPLY, OUT_LEN, true)]);
    assert_eq!(requests.serve(&chain, 1), OUT_LEN);
    assert_eq!((reply(&mem).error, reply(&mem).unique), (-libc::EINVAL, 11));
    assert_eq!(metrics.requests_rejected.get(), 2);
    assert_eq!(metrics.fs_errors.get(), 0);
}

#[test]
fn an_init_older_than_fuse_7_is_eproto() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    let init = InitIn {
        major: 6,
        minor: 99,
        ..InitIn::default()
    };
    let h = header(IN_HEADER_LEN + size_of::<InitIn>(), Opcode::Init as u32, 12);
    let req = write_request(&mem, h, init.as_slice());
    let chain = post(&mem, &[(REQUEST, req, false), (REPLY, REPLY_LEN, true)]);
    assert_eq!(requests.serve(&chain, 1), OUT_LEN);
    assert_eq!(reply(&mem).error, -libc::EPROTO);
    assert_eq!(metrics.requests_rejected.get(), 1);
}

/// CREATE `name` (NUL included) in the root; the new inode and handle.
fn create(
    requests: &Requests,
    mem: &vm_memory::GuestMemoryAtomic<super::request::Mem>,
    name: &[u8],
) -> (u64, u64) {
    let mut body = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        ..CreateIn::default()
    }
    .as_slice()
    .to_vec();
    body.extend_from_slice(name);
    let h = header(IN_HEADER_LEN + body.len(), Opcode::Create as u32, 1);
    let req = write_request(mem, h, &body);
    let chain = post(mem, &[(REQUEST, req, false), (REPLY, REPLY_LEN, true)]);
    let want = OUT_LEN as usize + size_of::<EntryOut>() + size_of::<OpenOut>();
    assert_eq!(requests.serve(&chain, 1) as usize, want);
    assert_eq!(reply(mem).error, 0);
    let m = mem.memory();
    let entry: EntryOut = m
        .read_obj(GuestAddress(REPLY + u64::from(OUT_LEN)))
        .unwrap();
    let open: OpenOut = m
        .read_obj(GuestAddress(
            REPLY + u64::from(OUT_LEN) + size_of::<EntryOut>() as u64,
        ))
        .unwrap();
    (entry.nodeid, open.fh)
}

#[test]
fn requests_a_linux_guest_sends_are_served() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    let init = InitIn {
        major: 7,
        minor: 31,
        ..InitIn::default()
    };
    let h = header(IN_HEADER_LEN + size_of::<InitIn>(), Opcode::Init as u32, 20);
    let req = write_request(&mem, h, init.as_slice());
    let chain = post(&mem, &[(REQUEST, req, false), (REPLY, REPLY_LEN, true)]);
    assert!(requests.serve(&chain, 1) > OUT_LEN);
    assert_eq!((reply(&mem).error, reply(&mem).unique), (0, 20));

    // Bytes after the request are not read (a GETATTR with padding).
    let h = header(
        IN_HEADER_LEN + size_of::<GetattrIn>(),
        Opcode::Getattr as u32,
        21,
    );
    let req = write_request(&mem, h, GetattrIn::default().as_slice());
    let chain = post(
        &mem,
        &[(REQUEST, req + 64, false), (REPLY, REPLY_LEN, true)],
    );
    assert!(requests.serve(&chain, 1) > OUT_LEN);
    assert_eq!((reply(&mem).error, reply(&mem).unique), (0, 21));

    let h = header(IN_HEADER_LEN + 8, Opcode::Lookup as u32, 22);
    let req = write_request(&mem, h, b"missing\0");
    let chain = post(&mem, &[(REQUEST, req, false), (REPLY, REPLY_LEN, true)]);
    assert_eq!(requests.serve(&chain, 1), OUT_LEN);
    assert_eq!(reply(&mem).error, -libc::ENOENT);

    // The largest write: header, WriteIn and 1 MiB of data.
    let (ino, fh) = create(&requests, &mem, b"big\0");
    let data: Vec<u8> = (0..BULK_LEN).map(|i| (i % 251) as u8).collect();
    mem.memory().write_slice(&data, GuestAddress(BULK)).unwrap();
    let write = WriteIn {
        fh,
        size: BULK_LEN,
        ..WriteIn::default()
    };
    let len = IN_HEADER_LEN + size_of::<WriteIn>() + data.len();
    let mut h = header(len, Opcode::Write as u32, 23);
    h.nodeid = ino;
    let req = write_request(&mem, h, write.as_slice());
    let chain = post(
        &mem,
        &[
            (REQUEST, req, false),
            (BULK, BULK_LEN, false),
            (REPLY, REPLY_LEN, true),
        ],
    );
    assert!(requests.serve(&chain, 1) > OUT_LEN);
    assert_eq!(reply(&mem).error, 0);
    let written: WriteOut = mem
        .memory()
        .read_obj(GuestAddress(REPLY + u64::from(OUT_LEN)))
        .unwrap();
    assert_eq!(written.size, BULK_LEN);

    // And the last page of it reads back.
    let page = 4096u32;
    let read = ReadIn {
        fh,
        offset: u64::from(BULK_LEN - page),
        size: page,
        ..ReadIn::default()
    };
    let mut h = header(IN_HEADER_LEN + size_of::<ReadIn>(), Opcode::Read as u32, 24);
    h.nodeid = ino;
    let req = write_request(&mem, h, read.as_slice());
    let chain = post(
        &mem,
        &[(REQUEST, req, false), (REPLY, OUT_LEN + page, true)],
    );
    assert_eq!(requests.serve(&chain, 1), OUT_LEN + page);
    let mut back = vec![0u8; page as usize];
    mem.memory()
        .read_slice(&mut back, GuestAddress(REPLY + u64::from(OUT_LEN)))
        .unwrap();
    assert_eq!(back, data[(BULK_LEN - page) as usize..]);
    assert_eq!(metrics.requests_rejected.get(), 0);
    assert_eq!(metrics.requests_unsupported.get(), 0);
}

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// The line the device logs for a request it refuses.
const REFUSED_LINE: &str = "refused a malformed FUSE request";

#[test]
fn a_flood_of_bad_requests_logs_a_bounded_amount() {
    let (requests, metrics) = served_fs();
    let mem = guest_memory();
    let name = vec![b'a'; 200];
    let h = header(IN_HEADER_LEN + name.len(), Opcode::Lookup as u32, 30);
    let req = write_request(&mem, h, &name);
    let chain = post(&mem, &[(REQUEST, req, false), (REPLY, OUT_LEN, true)]);

    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    // The limit is per call site and shared with the other tests of this
    // binary, which may spend a window's budget while the flood runs; so
    // the flood goes on past 1,000 requests until a line of its own got
    // out (a later window always has room), within a bound.
    let min_flood = 1000u64;
    let deadline = Duration::from_secs(30);
    let start = Instant::now();
    let mut flood = 0u64;
    let logged = || {
        let text = log.0.lock().unwrap();
        String::from_utf8_lossy(&text).contains(REFUSED_LINE)
    };
    tracing::subscriber::with_default(subscriber, || {
        while flood < min_flood || !logged() {
            assert!(start.elapsed() < deadline, "no line logged in {deadline:?}");
            assert_eq!(requests.serve(&chain, 1), OUT_LEN);
            flood += 1;
        }
    });
    let elapsed = start.elapsed();

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let refused = lines.iter().filter(|l| l.contains(REFUSED_LINE)).count() as u64;
    // The call site let out at most the budget of each window the flood
    // touched (other tests share it, so this test's share may be less),
    // counted every line it held back, and the lines let out reached the
    // log (but for any the subscriber missed while tracing rebuilt its
    // per-call-site interest, which other tests' subscribers trigger).
    let windows = elapsed.as_secs() + 2;
    let let_out = flood - metrics.log_lines_suppressed.get();
    assert!(refused >= 1);
    assert!(
        let_out <= u64::from(LINES_PER_WINDOW) * windows,
        "{let_out} lines let out in {elapsed:?}"
    );
    assert!(
        refused <= let_out,
        "{refused} lines logged, {let_out} let out"
    );
    assert_eq!(metrics.requests_rejected.get(), flood);
    for line in &lines {
        assert!(line.len() < 1024, "long line: {line}");
        assert!(!line.contains("aaaaaaaa"), "guest bytes echoed: {line}");
    }
}
