//! The volume's hand-over in a live migration, over the real vhost-user
//! protocol, on a `file://` volume with its holder record: the
//! destination (`--incoming`) does not open the volume before the state
//! arrives, the source lets it go once the state is out, the destination
//! opens it then, sparing the unlinked inodes the session holds, and a
//! source whose migration failed opens it again (`docs/migration.md`).
//! The destination on standby: `standby_tests.rs`, on this volume kit.

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

pub(super) const READ_BUF: u64 = 0x60000;
const EXISTING: OpenMode = OpenMode::Existing { take_over: false };

/// A `file://` volume in a directory of its own.
pub(super) struct Volume {
    dir: tempfile::TempDir,
}

impl Volume {
    pub(super) fn new() -> Volume {
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

    pub(super) fn url(&self) -> String {
        format!("file://{}/vol", self.dir.path().display())
    }

    /// The holder record, if there is one.
    pub(super) fn holder(&self) -> Option<Holder> {
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
    pub(super) fn source(&self, name: &str) -> (Arc<VolumeSlot>, Kit) {
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
    pub(super) fn destination(&self, name: &str, wait: Duration) -> (Arc<VolumeSlot>, Kit) {
        let metrics = Arc::new(Metrics::default());
        let slot = VolumeSlot::incoming(&self.url(), self.opener(&metrics), wait);
        self.daemon(name, Arc::new(slot), metrics)
    }

    /// [`Volume::destination`] that opens the volume on standby as soon as
    /// its holder lets it go, as `serve --incoming` does on `file://`.
    pub(super) fn destination_on_standby(&self, name: &str) -> (Arc<VolumeSlot>, Kit) {
        let url = self.url();
        self.destination_standing_by(
            name,
            Box::new(move |claimed| writeback::open_standby(&url, &TxnConfig::default(), claimed)),
        )
    }

    /// [`Volume::destination`] that opens the volume on standby with
    /// `open` as soon as its holder lets it go.
    pub(super) fn destination_standing_by(
        &self,
        name: &str,
        open: crate::writeback::standby::StandbyOpener,
    ) -> (Arc<VolumeSlot>, Kit) {
        let (slot, kit) = self.destination(name, WAIT);
        let record =
            crate::store::engine::holder::record_file(&self.url()).expect("a file:// volume");
        slot.open_on_standby(record, open);
        (slot, kit)
    }

    fn daemon(&self, name: &str, slot: Arc<VolumeSlot>, m: Arc<Metrics>) -> (Arc<VolumeSlot>, Kit) {
        let fs = PohmelFs::on_slot(Arc::clone(&slot), FsConfig::default(), Arc::clone(&m)).unwrap();
        (slot, Kit::start_with(name, Arc::new(fs), m))
    }

    /// Open the volume once more (after both daemons are gone): the inode
    /// `ino`, if it is still there.
    pub(super) fn inode_after(&self, ino: u64) -> Option<crate::store::Inode> {
        let store = crate::store::engine::SlateStore::open_as(&self.url(), EXISTING).unwrap();
        let inode = store.get_inode(ino).unwrap();
        store.close().unwrap();
        inode
    }
}

/// What a daemon waits for another's release, in the tests that do not
/// test the bound.
pub(super) const WAIT: Duration = Duration::from_secs(30);

/// A file the guest keeps and one it unlinked while holding it open,
/// written with patterns seeded by `seed` and `seed + 1`.
pub(super) struct TwoFiles {
    pub(super) kept: (u64, u64),
    pub(super) kept_data: Vec<u8>,
    pub(super) gone: (u64, u64),
    pub(super) gone_data: Vec<u8>,
}

/// Create and write [`TwoFiles`] through `src`, `gone_len` bytes in the
/// unlinked one.
pub(super) fn kept_and_gone(src: &mut Kit, seed: u8, gone_len: usize) -> TwoFiles {
    let kept = src.create("kept");
    let gone = src.create("gone");
    let (kept_data, gone_data) = (pattern(seed, 8192), pattern(seed + 1, gone_len));
    src.write(kept.0, kept.1, &kept_data);
    src.write(gone.0, gone.1, &gone_data);
    // Open and unlinked: only the guest's reference keeps it.
    unlink(src, "gone");
    TwoFiles {
        kept,
        kept_data,
        gone,
        gone_data,
    }
}

/// A file with `len` bytes of a pattern seeded by `seed`.
pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// READ `len` bytes of `ino` through `fh`, which must succeed.
pub(super) fn read_back(kit: &mut Kit, ino: u64, fh: u64, len: u32, what: &str) -> Vec<u8> {
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
    let TwoFiles {
        kept: (kept, kept_fh),
        kept_data,
        gone: (gone, gone_fh),
        gone_data,
    } = kept_and_gone(&mut src, 1, 12288);
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
