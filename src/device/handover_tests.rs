//! The volume's hand-over in a live migration, over the real vhost-user
//! protocol, on a `file://` volume with its holder record: the
//! destination (`--incoming`) does not open the volume before the state
//! arrives, the source lets it go once the state is out, the destination
//! opens it then, sparing the unlinked inodes the session holds, and a
//! source whose migration failed opens it again (`docs/migration.md`).

use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::VhostUserFrontend;

use super::frontend_kit::Kit;
use super::migrate_tests::{load, save, unlink};
use crate::fs::{FsConfig, PohmelFs};
use crate::metrics::Metrics;
use crate::store::engine::holder::Holder;
use crate::store::engine::OpenMode;
use crate::store::Store;
use crate::writeback::slot::{Opener, Phase, VolumeSlot};
use crate::writeback::{self, TxnConfig};

const READ_BUF: u64 = 0x60000;
const EXISTING: OpenMode = OpenMode::Existing { take_over: false };

/// A `file://` volume in a directory of its own.
struct Volume {
    dir: tempfile::TempDir,
}

impl Volume {
    fn new() -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let v = Volume { dir };
        let format = OpenMode::Format {
            capacity_bytes: None,
        };
        crate::store::engine::SlateStore::open_as(&v.url(), format)
            .unwrap()
            .close()
            .unwrap();
        v
    }

    fn url(&self) -> String {
        format!("file://{}/vol", self.dir.path().display())
    }

    /// The holder record, if there is one.
    fn holder(&self) -> Option<Holder> {
        let text = std::fs::read_to_string(self.dir.path().join("vol/volume.holder")).ok()?;
        Holder::parse(&text)
    }

    fn opener(&self, metrics: &Arc<Metrics>) -> Opener {
        let (url, metrics) = (self.url(), Arc::clone(metrics));
        Box::new(move |spare, standby| {
            writeback::open_from(
                &url,
                TxnConfig::default(),
                None,
                Arc::clone(&metrics),
                EXISTING,
                spare,
                standby,
            )
        })
    }

    /// A daemon holding the volume, as `serve` starts: its slot and kit.
    fn source(&self, name: &str) -> (Arc<VolumeSlot>, Kit) {
        self.source_waiting(name, WAIT)
    }

    /// [`Volume::source`], whose open after a release waits at most `wait`.
    fn source_waiting(&self, name: &str, wait: Duration) -> (Arc<VolumeSlot>, Kit) {
        let metrics = Arc::new(Metrics::default());
        let store = writeback::open_as(
            &self.url(),
            TxnConfig::default(),
            None,
            Arc::clone(&metrics),
            EXISTING,
        )
        .unwrap();
        let slot = VolumeSlot::holding(store, &self.url(), self.opener(&metrics), wait);
        self.daemon(name, Arc::new(slot), metrics)
    }

    /// A daemon started with `--incoming`, waiting at most `wait` for the
    /// volume's holder to let it go.
    fn destination(&self, name: &str, wait: Duration) -> (Arc<VolumeSlot>, Kit) {
        let metrics = Arc::new(Metrics::default());
        let slot = VolumeSlot::incoming(&self.url(), self.opener(&metrics), wait);
        self.daemon(name, Arc::new(slot), metrics)
    }

    /// [`Volume::destination_on_standby`] whose standby open, once it has
    /// claimed the volume, says so on `claimed` and waits (bounded) for
    /// `go` before the engine opens; `fail` makes it fail once open.
    fn destination_held_at_claim(
        &self,
        name: &str,
        claimed: std::sync::mpsc::Sender<()>,
        go: std::sync::mpsc::Receiver<()>,
        fail: bool,
    ) -> (Arc<VolumeSlot>, Kit) {
        let (slot, kit) = self.destination(name, WAIT);
        let url = self.url();
        let record = crate::store::engine::holder::record_file(&url).expect("a file:// volume");
        let latch = std::sync::Mutex::new((claimed, go));
        slot.open_on_standby(
            record,
            Box::new(move |on_claim| {
                let hold = || {
                    on_claim();
                    let latch = latch.lock().unwrap();
                    latch.0.send(()).unwrap();
                    latch
                        .1
                        .recv_timeout(WAIT)
                        .expect("the test let the open go on");
                };
                let engine = writeback::open_standby(&url, &TxnConfig::default(), &hold)?;
                if !fail {
                    return Ok(engine);
                }
                engine.close().unwrap();
                Err(crate::store::OpenError::BadOption(
                    "failed on purpose".into(),
                ))
            }),
        );
        (slot, kit)
    }

    /// [`Volume::destination`] that opens the volume on standby as soon as
    /// its holder lets it go, as `serve --incoming` does on `file://`.
    fn destination_on_standby(&self, name: &str) -> (Arc<VolumeSlot>, Kit) {
        let (slot, kit) = self.destination(name, WAIT);
        let url = self.url();
        let record = crate::store::engine::holder::record_file(&url).expect("a file:// volume");
        slot.open_on_standby(
            record,
            Box::new(move |claimed| writeback::open_standby(&url, &TxnConfig::default(), claimed)),
        );
        (slot, kit)
    }

    fn daemon(&self, name: &str, slot: Arc<VolumeSlot>, m: Arc<Metrics>) -> (Arc<VolumeSlot>, Kit) {
        let fs = PohmelFs::on_slot(Arc::clone(&slot), FsConfig::default(), Arc::clone(&m)).unwrap();
        (slot, Kit::start_with(name, Arc::new(fs), m))
    }

    /// Open the volume once more (after both daemons are gone): the inode
    /// `ino`, if it is still there.
    fn inode_after(&self, ino: u64) -> Option<crate::store::Inode> {
        let store = crate::store::engine::SlateStore::open_as(&self.url(), EXISTING).unwrap();
        let inode = store.get_inode(ino).unwrap();
        store.close().unwrap();
        inode
    }
}

/// What a daemon waits for another's release, in the tests that do not
/// test the bound.
const WAIT: Duration = Duration::from_secs(30);

/// A file with `len` bytes of a pattern seeded by `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// READ `len` bytes of `ino` through `fh`, which must succeed.
fn read_back(kit: &mut Kit, ino: u64, fh: u64, len: u32, what: &str) -> Vec<u8> {
    let (error, back) = kit.read(ino, fh, READ_BUF, len);
    assert_eq!(error, 0, "READ {what}");
    back
}

/// A process of this host that lives until dropped: a holder the
/// destination must wait for.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A control socket on `slot`, as `serve` starts one; its `status` answer.
/// The socket's directory goes when the answer does.
fn status_of(slot: &Arc<VolumeSlot>, name: &str) -> impl Fn() -> String {
    let dir = tempfile::Builder::new()
        .prefix(&format!("pohmelfs-status-{name}-"))
        .tempdir()
        .unwrap();
    let socket = dir.path().join("daemon.sock");
    let store: Arc<dyn crate::store::Store> = Arc::clone(slot) as _;
    crate::control::spawn_control_socket(
        &crate::control::control_path(&socket),
        Arc::new(Metrics::default()),
        Some(store),
    )
    .unwrap();
    move || {
        let _dir = &dir;
        crate::control::query(&socket, "status").unwrap()
    }
}

#[test]
fn the_volume_moves_to_the_incoming_daemon_only_when_the_source_let_it_go() {
    let vol = Volume::new();
    let (src_slot, mut src) = vol.source("handover-src");
    src.init();
    let (kept, kept_fh) = src.create("kept");
    let (gone, gone_fh) = src.create("gone");
    let (kept_data, gone_data) = (pattern(1, 8192), pattern(2, 12288));
    src.write(kept, kept_fh, &kept_data);
    src.write(gone, gone_fh, &gone_data);
    // Open and unlinked: only the guest's reference keeps it.
    unlink(&mut src, "gone");
    assert!(vol.holder().is_some(), "the source holds the volume");

    let (dst_slot, mut dst) = vol.destination("handover-dst", WAIT);
    assert_eq!(dst_slot.phase(), Phase::Incoming);
    let (src_status, dst_status) = (status_of(&src_slot, "src"), status_of(&dst_slot, "dst"));
    assert!(dst_status().contains("not open yet"), "{}", dst_status());
    assert!(src_status().contains("volume_id"), "{}", src_status());
    assert!(
        dst_slot.current().is_none(),
        "--incoming opened the volume at start"
    );
    // The slot asks the open volume whether a request would wait: none
    // open here (a request would wait for it), one open at the source.
    use crate::store::{Demand, Store};
    assert!(!dst_slot.would_not_wait(Demand::Close));
    assert!(src_slot.would_not_wait(Demand::Close));
    assert!(!src_slot.would_not_wait(Demand::Attributes { ino: u64::MAX }));
    // A request before the state arrives is answered, with EIO.
    let (error, _) = dst.read(kept, kept_fh, READ_BUF, 4096);
    assert_eq!(error, -libc::EIO);
    assert_eq!(dst_slot.phase(), Phase::Incoming);

    let bytes = save(&src);
    // The state is out: the source let the volume go, holder record and all.
    assert_eq!(src_slot.phase(), Phase::Released);
    assert!(src_slot.current().is_none());
    assert_eq!(vol.holder(), None, "the source still holds the volume");

    load(&dst, &bytes).unwrap();
    assert_eq!(dst_slot.phase(), Phase::Open);
    // `pohmelfs status` says so now, not what it was at start.
    let now = dst_status();
    assert!(!now.contains("not open yet"), "{now}");
    assert!(now.contains("holder"), "{now}");
    assert!(src_status().contains("let go"), "{}", src_status());
    assert!(vol.holder().is_some(), "the destination holds the volume");
    // QEMU's source disconnects: the unlinked file is the destination's.
    drop(src);
    assert_eq!(
        src_slot.phase(),
        Phase::Released,
        "the source took the volume back"
    );

    assert!(read_back(&mut dst, kept, kept_fh, 8192, "kept") == kept_data);
    // Spared from the reclamation of orphans at open.
    let back = read_back(&mut dst, gone, gone_fh, 12288, "the unlinked file");
    assert!(back == gone_data, "the unlinked file changed");
    let more = pattern(3, 4096);
    dst.write(gone, gone_fh, &more);
    assert!(read_back(&mut dst, gone, gone_fh, 4096, "after a write") == more);

    // The guest's session ends at the destination: the unlinked file goes
    // (stored by the drain `serve` does before it exits).
    drop(dst);
    dst_slot.release().unwrap();
    assert!(vol.inode_after(kept).is_some());
    assert!(
        vol.inode_after(gone).is_none(),
        "the orphan outlived its session"
    );
}

#[test]
fn a_source_whose_migration_failed_opens_the_volume_again() {
    let vol = Volume::new();
    let (slot, mut src) = vol.source("handover-failed");
    src.init();
    let (gone, fh) = src.create("gone");
    let data = pattern(4, 8192);
    src.write(gone, fh, &data);
    unlink(&mut src, "gone");
    save(&src);
    assert_eq!(slot.phase(), Phase::Released);
    assert_eq!(vol.holder(), None);

    // No destination took the state; QEMU resumes the guest here.
    let back = read_back(&mut src, gone, fh, 8192, "after the failed migration");
    assert!(back == data, "the unlinked file changed");
    assert_eq!(slot.phase(), Phase::Open);
    assert!(vol.holder().is_some());

    // The session is the source's again: at its end the orphan goes.
    drop(src);
    slot.release().unwrap();
    assert!(vol.inode_after(gone).is_none());
}

/// Another live process of this host named as the volume's holder (as a daemon that has
/// not let it go would be).
fn hold_elsewhere(vol: &Volume) -> (Sleeper, Holder) {
    let sleeper = Sleeper(
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap(),
    );
    let other = Holder {
        pid: sleeper.0.id(),
        ..Holder::this_process()
    };
    std::fs::write(vol.dir.path().join("vol/volume.holder"), other.encode()).unwrap();
    (sleeper, other)
}

#[test]
fn a_source_that_cannot_take_the_volume_back_answers_eio_until_told_to_retry() {
    let vol = Volume::new();
    let (slot, mut src) = vol.source_waiting("handover-gave-up", Duration::from_millis(300));
    src.init();
    let (ino, fh) = src.create("f");
    let data = pattern(6, 4096);
    src.write(ino, fh, &data);
    save(&src);
    // Another daemon took the volume meanwhile (and holds it).
    let (sleeper, other) = hold_elsewhere(&vol);
    assert_eq!(src.read(ino, fh, READ_BUF, 4096).0, -libc::EIO);
    assert!(slot.gave_up());
    // The next request does not wait again; the record is left alone.
    assert_eq!(src.read(ino, fh, READ_BUF, 4096).0, -libc::EIO);
    assert_eq!(vol.holder(), Some(other));
    assert_eq!(slot.phase(), Phase::Released);

    // That daemon let go; a new frontend (here: told directly) tries again.
    drop(sleeper);
    src.fs.new_frontend();
    assert!(read_back(&mut src, ino, fh, 4096, "after the retry") == data);
    assert_eq!(slot.phase(), Phase::Open);
    drop(src);
    slot.release().unwrap();
}

#[test]
fn the_destination_waits_for_a_live_holder_and_gives_up_at_its_bound() {
    let vol = Volume::new();
    let (src_slot, mut src) = vol.source("handover-held-src");
    src.init();
    let (ino, fh) = src.create("f");
    let data = pattern(5, 4096);
    src.write(ino, fh, &data);
    let bytes = save(&src);
    assert_eq!(vol.holder(), None);

    // Another live process of this host holds the volume now (as a source
    // that has not let it go would).
    let (sleeper, other) = hold_elsewhere(&vol);
    let (dst_slot, mut dst) = vol.destination("handover-held-dst", Duration::from_millis(300));
    assert!(
        load(&dst, &bytes).is_err(),
        "opened a volume another process holds"
    );
    assert_eq!(dst_slot.phase(), Phase::Incoming);
    assert_eq!(
        vol.holder(),
        Some(other),
        "the destination took the volume over"
    );
    assert!(
        !dst_slot.gave_up(),
        "an incoming daemon waits for the next state"
    );

    // The holder exits: the next attempt opens the volume.
    drop(sleeper);
    load(&dst, &bytes).unwrap();
    drop(src);
    assert!(read_back(&mut dst, ino, fh, 4096, "f") == data);
    drop(dst);
    dst_slot.release().unwrap();
    assert_eq!(src_slot.phase(), Phase::Released);
}

/// With dirty logging on (a migration under way: the kit negotiates it),
/// QEMU's stop of the last queue lets the volume go before the state is
/// asked for, what the guest wrote stored; a queue started again instead
/// (the migration failed before the state, or the stop was a pause) finds
/// the volume opened again at its next request. The state then carries
/// the session as before.
#[test]
fn the_last_queue_stop_of_a_migration_lets_the_volume_go_early() {
    let vol = Volume::new();
    let (src_slot, mut src) = vol.source("handover-early-src");
    src.init();
    let (ino, fh) = src.create("f");
    let data = pattern(7, 8192);
    src.write(ino, fh, &data);
    let base = src.stop_queue();
    // The let-go runs on a thread of its own; a queue's start waits for it.
    src.restart_queue(base);
    assert_eq!(
        src_slot.phase(),
        Phase::Released,
        "the stop kept the volume"
    );
    assert_eq!(vol.holder(), None);
    assert!(read_back(&mut src, ino, fh, 8192, "after the stop") == data);
    assert_eq!(src_slot.phase(), Phase::Open);
    assert!(vol.holder().is_some());

    // The stop again, then the state: let go before CHECK_DEVICE_STATE.
    src.stop_queue();
    let mut stream = super::migrate_tests::start_save(&src);
    assert_eq!(src_slot.phase(), Phase::Released);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut bytes).unwrap();
    src.frontend().check_device_state().unwrap();
    let (dst_slot, mut dst) = vol.destination("handover-early-dst", WAIT);
    load(&dst, &bytes).unwrap();
    drop(src);
    assert!(read_back(&mut dst, ino, fh, 8192, "at the destination") == data);
    drop(dst);
    dst_slot.release().unwrap();
}

/// Without dirty logging (a guest paused, or reset: no migration) a queue
/// stop leaves the volume open.
#[test]
fn a_queue_stop_without_a_migration_keeps_the_volume() {
    use vhost::vhost_user::message::VhostUserVirtioFeatures;
    use vhost::VhostBackend;
    let vol = Volume::new();
    let (slot, mut src) = vol.source("handover-no-log");
    src.init();
    let (ino, fh) = src.create("f");
    let data = pattern(8, 4096);
    src.write(ino, fh, &data);
    let features = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    src.frontend().set_features(features).unwrap();
    let base = src.stop_queue();
    src.restart_queue(base);
    assert_eq!(slot.phase(), Phase::Open);
    assert!(read_back(&mut src, ino, fh, 4096, "after the stop") == data);
    drop(src);
    slot.release().unwrap();
}

/// The epoch (opens counted) of the volume open in `slot`.
fn epoch(slot: &VolumeSlot) -> u64 {
    use crate::store::Store as _;
    slot.identity().expect("an open engine").epoch
}

/// Wait (bounded) until `slot` has an engine open on standby.
fn until_on_standby(slot: &VolumeSlot) {
    let ready = pohmelfs_testkit::wait_until(WAIT, Duration::from_millis(2), || {
        slot.standby_ready().then_some(())
    });
    assert!(ready.is_some(), "no standby open after the source let go");
}

/// A destination on standby opens the volume as soon as the source lets
/// it go at the queues' stop, before the state, and takes the state on
/// that open: one open counted, the unlinked file spared, the record
/// mine and no longer saying standby.
#[test]
fn the_destination_opens_on_standby_at_the_stop_and_takes_the_state_on_it() {
    let vol = Volume::new();
    let (src_slot, mut src) = vol.source("standby-src");
    src.init();
    let (kept, kept_fh) = src.create("kept");
    let (gone, gone_fh) = src.create("gone");
    let (kept_data, gone_data) = (pattern(9, 8192), pattern(10, 12288));
    src.write(kept, kept_fh, &kept_data);
    src.write(gone, gone_fh, &gone_data);
    unlink(&mut src, "gone");
    let source_epoch = epoch(&src_slot);
    let (dst_slot, mut dst) = vol.destination_on_standby("standby-dst");
    assert!(
        !dst_slot.standby_ready(),
        "opened while the source holds it"
    );
    assert!(vol.holder().is_some_and(|h| !h.standby));

    src.stop_queue();
    let bytes = save(&src);
    until_on_standby(&dst_slot);
    let standby = vol.holder().expect("the standby open's record");
    assert!(standby.standby, "{standby:?}");
    assert_eq!(dst_slot.phase(), Phase::Incoming);
    // Nothing served before the state.
    assert_eq!(dst.read(kept, kept_fh, READ_BUF, 4096).0, -libc::EIO);

    load(&dst, &bytes).unwrap();
    assert_eq!(dst_slot.phase(), Phase::Open);
    assert_eq!(
        epoch(&dst_slot),
        source_epoch + 1,
        "opened the volume twice"
    );
    assert!(dst_slot.unconfirmed());
    assert!(
        vol.holder().is_some_and(|h| h.standby),
        "promoted before the guest ran here"
    );
    drop(src);
    // The guest runs here: the record stops saying standby.
    assert!(read_back(&mut dst, kept, kept_fh, 8192, "kept") == kept_data);
    assert!(!dst_slot.unconfirmed());
    let promoted = pohmelfs_testkit::wait_until(WAIT, Duration::from_millis(5), || {
        vol.holder().filter(|h| !h.standby)
    });
    assert!(promoted.is_some_and(|h| h.same_holder(&standby)));
    let back = read_back(&mut dst, gone, gone_fh, 12288, "the unlinked file");
    assert!(back == gone_data, "the unlinked file changed");
    drop(dst);
    dst_slot.release().unwrap();
    assert!(vol.inode_after(kept).is_some());
    assert!(vol.inode_after(gone).is_none());
}

/// The source lets the volume go at the stop, the destination opens it on
/// standby, and the source's guest runs on after all (a `stop` and
/// `cont`): its next request takes the volume back. At the migration's
/// real stop the destination finds its standby open taken over and opens
/// the volume again.
#[test]
fn a_source_whose_guest_runs_on_takes_the_volume_back_from_standby() {
    let vol = Volume::new();
    let (src_slot, mut src) = vol.source("standby-back-src");
    src.init();
    let (ino, fh) = src.create("f");
    let data = pattern(11, 8192);
    src.write(ino, fh, &data);
    let (dst_slot, mut dst) = vol.destination_on_standby("standby-back-dst");

    let base = src.stop_queue();
    src.restart_queue(base);
    assert_eq!(src_slot.phase(), Phase::Released);
    until_on_standby(&dst_slot);
    assert!(vol.holder().is_some_and(|h| h.standby));
    // The guest runs on at the source.
    assert!(read_back(&mut src, ino, fh, 8192, "after the stop") == data);
    assert_eq!(src_slot.phase(), Phase::Open);
    assert!(vol
        .holder()
        .is_some_and(|h| !h.standby && h.pid == std::process::id()));
    let more = pattern(12, 4096);
    src.write(ino, fh, &more);
    let back_epoch = epoch(&src_slot);

    src.stop_queue();
    let bytes = save(&src);
    load(&dst, &bytes).unwrap();
    assert_eq!(dst_slot.phase(), Phase::Open);
    assert_eq!(epoch(&dst_slot), back_epoch + 1);
    drop(src);
    let mut want = data.clone();
    want[..4096].copy_from_slice(&more);
    assert!(read_back(&mut dst, ino, fh, 8192, "at the destination") == want);
    drop(dst);
    dst_slot.release().unwrap();
}

/// The destination took the state, but its frontend went before the guest
/// ran there (the migration failed after the state; QEMU resumes the guest
/// at the source): it neither removes the unlinked file the guest holds
/// nor keeps the volume, so the source takes it back at its next request,
/// the file still there.
#[test]
fn a_destination_whose_guest_never_ran_hands_session_and_volume_back() {
    let vol = Volume::new();
    let (src_slot, mut src) = vol.source("unserved-src");
    src.init();
    let (gone, fh) = src.create("gone");
    let data = pattern(13, 8192);
    src.write(gone, fh, &data);
    unlink(&mut src, "gone");
    let (dst_slot, dst) = vol.destination_on_standby("unserved-dst");
    let base = src.stop_queue();
    let bytes = save(&src);
    until_on_standby(&dst_slot);
    load(&dst, &bytes).unwrap();
    assert_eq!(dst_slot.phase(), Phase::Open);
    assert!(dst_slot.unconfirmed());
    // QEMU's destination quits without running the guest.
    drop(dst);
    assert_eq!(
        dst_slot.phase(),
        Phase::Released,
        "the destination kept the volume"
    );
    assert_eq!(vol.holder(), None);
    // The source's guest runs on, through the same handle.
    src.restart_queue(base);
    let back = read_back(&mut src, gone, fh, 8192, "after the failed migration");
    assert!(back == data, "the unlinked file changed");
    assert_eq!(src_slot.phase(), Phase::Open);
    drop(src);
    src_slot.release().unwrap();
    assert!(
        vol.inode_after(gone).is_none(),
        "the orphan outlived its session"
    );
}

/// The state arrives while the destination's standby open is under way,
/// past its claim of the volume (held there by a latch): the state is
/// answered at once, the slot opening, and the guest's first request waits
/// for the open, which spares the unlinked file the session holds; the
/// volume was opened once.
#[test]
fn a_state_is_answered_before_the_claimed_open_ends_and_requests_wait_for_it() {
    let vol = Volume::new();
    let (src_slot, mut src) = vol.source("behind-src");
    src.init();
    let (kept, kept_fh) = src.create("kept");
    let (gone, gone_fh) = src.create("gone");
    let (kept_data, gone_data) = (pattern(14, 8192), pattern(15, 4096));
    src.write(kept, kept_fh, &kept_data);
    src.write(gone, gone_fh, &gone_data);
    unlink(&mut src, "gone");
    let source_epoch = epoch(&src_slot);
    let (claimed_tx, claimed) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let (dst_slot, mut dst) = vol.destination_held_at_claim("behind-dst", claimed_tx, go_rx, false);

    src.stop_queue();
    let bytes = save(&src);
    claimed
        .recv_timeout(WAIT)
        .expect("the standby open claimed the volume");
    assert!(vol.holder().is_some_and(|h| h.standby));
    // Answered with the engine still held at the latch.
    load(&dst, &bytes).unwrap();
    assert_eq!(dst_slot.phase(), Phase::Opening);
    drop(src);
    std::thread::scope(|s| {
        let reader = s.spawn(|| read_back(&mut dst, kept, kept_fh, 8192, "kept"));
        go.send(()).unwrap();
        assert!(reader.join().unwrap() == kept_data);
    });
    assert_eq!(dst_slot.phase(), Phase::Open);
    assert!(!dst_slot.unconfirmed());
    assert_eq!(
        epoch(&dst_slot),
        source_epoch + 1,
        "opened the volume twice"
    );
    let back = read_back(&mut dst, gone, gone_fh, 4096, "the unlinked file");
    assert!(back == gone_data, "the unlinked file changed");
    drop(dst);
    dst_slot.release().unwrap();
    assert!(vol.inode_after(gone).is_none());
}

/// The standby open fails after its claim, the state already answered:
/// the open behind the state opens the volume anew, and the guest's
/// request is served.
#[test]
fn a_claimed_open_that_fails_behind_the_state_is_made_again() {
    let vol = Volume::new();
    let (_src_slot, mut src) = vol.source("behind-fail-src");
    src.init();
    let (ino, fh) = src.create("f");
    let data = pattern(16, 8192);
    src.write(ino, fh, &data);
    let (claimed_tx, claimed) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let (dst_slot, mut dst) =
        vol.destination_held_at_claim("behind-fail-dst", claimed_tx, go_rx, true);

    src.stop_queue();
    let bytes = save(&src);
    claimed
        .recv_timeout(WAIT)
        .expect("the standby open claimed the volume");
    load(&dst, &bytes).unwrap();
    assert_eq!(dst_slot.phase(), Phase::Opening);
    drop(src);
    go.send(()).unwrap();
    assert!(read_back(&mut dst, ino, fh, 8192, "after the failed open") == data);
    assert_eq!(dst_slot.phase(), Phase::Open);
    drop(dst);
    dst_slot.release().unwrap();
}
