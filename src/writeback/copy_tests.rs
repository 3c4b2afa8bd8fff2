//! Copies on the data path: a guest write reaches the sink in the page
//! buffers it was read into (no buffer of the whole write on the way, a
//! resend carries the same buffers, reads hand out those buffers), and the
//! overwrite policies still decide what a write to a pinned page does.

use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::testkit::{content, create, eventually, held_layer, GuestBytes};
use super::{OverwritePolicy, TxnConfig, WritebackStore};
use crate::device::alloc_probe::largest_allocation;
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::mem::MemStore;
use crate::store::sink::{Ack, SendError, SendFuture, Sink};
use crate::store::{Inode, OnceStore, Op, ReadPiece, Store, Txn, WriteData, ROOT_INO};

/// A sink into a MemStore that notes, for every attempt, where the bytes
/// of its writes live, and refuses the first `fail_first` attempts.
struct RecordingSink {
    store: Arc<MemStore>,
    fail_first: AtomicU64,
    /// Per attempt: (address, length) of every part of its writes.
    attempts: Mutex<Vec<Vec<(usize, usize)>>>,
}

impl Sink for RecordingSink {
    fn servers(&self) -> usize {
        1
    }
    fn server_name(&self, _server: usize) -> String {
        "recording".into()
    }
    fn session(&self) -> u64 {
        5
    }
    fn send(&self, _server: usize, txn_id: u64, _low_water: u64, txn: Txn) -> SendFuture<'_> {
        let parts = txn
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Write { data, .. } => Some(data.parts()),
                _ => None,
            })
            .flatten()
            .map(|p| (p.as_ptr() as usize, p.len()))
            .collect();
        self.attempts.lock().unwrap().push(parts);
        let refuse = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if refuse {
                return Err(SendError::Retry("injected".into()));
            }
            let outcome = self
                .store
                .commit_once(5, txn_id, txn)
                .map_err(|e| SendError::Retry(e.to_string()))?;
            Ok(Ack {
                epoch: 1,
                duplicate: outcome.duplicate,
            })
        })
    }
}

#[test]
fn a_guest_write_reaches_the_sink_in_the_buffers_it_was_read_into() {
    const LEN: usize = 1 << 20;
    let store = Arc::new(MemStore::new(1 << 30));
    let sink = Arc::new(RecordingSink {
        store: Arc::clone(&store),
        fail_first: AtomicU64::new(0),
        attempts: Mutex::new(Vec::new()),
    });
    let cfg = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        ..TxnConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let wb = Arc::new(
        WritebackStore::new(cfg, store.clone(), sink.clone(), Arc::clone(&metrics)).unwrap(),
    );
    let fs = PohmelFs::new(wb.clone(), FsConfig::default(), metrics).unwrap();
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let ctx = Context::new();
    let (entry, handle, _, _) = fs
        .create(&ctx, ROOT_INO, &CString::new("f").unwrap(), args)
        .unwrap();
    let (ino, handle) = (entry.inode, handle.unwrap());
    wb.sync(None).unwrap();
    sink.attempts.lock().unwrap().clear();
    // The first attempt of the write is refused: it is resent.
    sink.fail_first.store(1, Ordering::SeqCst);

    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let mut guest = GuestBytes::new(data.clone());
    let (written, largest) = largest_allocation(|| {
        fs.write(
            &ctx, ino, handle, &mut guest, LEN as u32, 0, None, false, 0, 0,
        )
    });
    assert_eq!(written.unwrap(), LEN);
    assert!(
        largest <= 64 << 10,
        "the write allocated {largest} bytes at once: a buffer of the whole write"
    );

    wb.sync(None).unwrap();
    let attempts = sink.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2, "refused once, then resent");
    let pages = &attempts[0];
    assert_eq!(pages.len(), LEN / 4096, "one part per page, never joined");
    assert!(pages.iter().all(|&(_, len)| len == 4096));
    assert_eq!(&attempts[1], pages, "the resend carries the same buffers");
    // The buffers the sink got are the pages reads are answered from.
    let read = wb.read_data(ino, 0, LEN).unwrap();
    let served: Vec<(usize, usize)> = read
        .pieces()
        .iter()
        .map(|p| match p {
            ReadPiece::Bytes(b) => (b.as_ptr() as usize, b.len()),
            ReadPiece::Zeros(n) => (0, *n),
            ReadPiece::File { len, .. } => (1, *len),
        })
        .collect();
    assert_eq!(&served, pages);
    assert_eq!(content(&*store, ino), data);
}

/// Whole pages read from the guest for a write at `offset`.
fn guest_write(s: &dyn Store, ino: u64, offset: u64, bytes: &[u8], size: u64) {
    let data = WriteData::read_aligned(&mut &bytes[..], bytes.len(), offset).unwrap();
    s.write(ino, offset, data, Inode::regular(ino, size))
        .unwrap();
}

#[test]
fn a_pinned_page_is_left_to_its_transaction_or_waited_for() {
    for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
        let (wb, sink, store, m) = held_layer(policy, 31);
        let wb = Arc::new(wb);
        create(&*wb, 20);
        wb.sync(None).unwrap();
        sink.gate.close();
        guest_write(&*wb, 20, 0, &[1u8; 8192], 8192);
        eventually("the first version to be sent", || sink.gate.held() >= 1);
        // One whole page (its buffer becomes the page) and part of the
        // next (copied into it), both pinned by the held transaction.
        let writer = {
            let wb = Arc::clone(&wb);
            std::thread::spawn(move || guest_write(&*wb, 20, 0, &[2u8; 4196], 8192))
        };
        let mut expected = vec![2u8; 4196];
        expected.resize(8192, 1);
        match policy {
            OverwritePolicy::Wait => {
                eventually("the overwrite to wait", || m.overwrite_waits.get() >= 1);
                assert!(!writer.is_finished(), "wait: the write waits for the ack");
            }
            OverwritePolicy::Cow => {
                eventually("the overwrite to finish", || writer.is_finished());
                assert_eq!(m.overwrite_copies.get(), 2, "both pinned pages");
                assert_eq!(content(&*wb, 20), expected, "cow: seen at once");
            }
        }
        sink.gate.open();
        writer.join().unwrap();
        wb.sync(None).unwrap();
        assert_eq!(content(&*store, 20), expected, "{policy:?}");
    }
}
