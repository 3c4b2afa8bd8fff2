//! A migration's destination on standby (`src/writeback/standby.rs`): it
//! opens the volume as soon as the source lets it go, takes the state on
//! that open, gives the volume back to a source whose guest runs on, and
//! answers a state that arrives while its open is under way, past the
//! claim, without waiting for the open (`docs/migration.md`). The volume
//! and the daemons are `handover_tests.rs`'s.

use std::sync::Arc;
use std::time::Duration;

use super::frontend_kit::Kit;
use super::handover_tests::{kept_and_gone, pattern, read_back, TwoFiles, Volume, READ_BUF, WAIT};
use super::migrate_tests::{load, save, unlink};
use crate::writeback::slot::{Phase, VolumeSlot};
use crate::writeback::{self, TxnConfig};

/// A [`Volume::destination_on_standby`] whose standby open, once it has
/// claimed the volume, says so on `claimed` and waits (bounded) for
/// `go` before the engine opens; `fail` makes it fail once open.
fn destination_held_at_claim(
    vol: &Volume,
    name: &str,
    claimed: std::sync::mpsc::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
    fail: bool,
) -> (Arc<VolumeSlot>, Kit) {
    let url = vol.url();
    let latch = std::sync::Mutex::new((claimed, go));
    vol.destination_standing_by(
        name,
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
    )
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
    let TwoFiles {
        kept: (kept, kept_fh),
        kept_data,
        gone: (gone, gone_fh),
        gone_data,
    } = kept_and_gone(&mut src, 9, 12288);
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
    let TwoFiles {
        kept: (kept, kept_fh),
        kept_data,
        gone: (gone, gone_fh),
        gone_data,
    } = kept_and_gone(&mut src, 14, 4096);
    let source_epoch = epoch(&src_slot);
    let (claimed_tx, claimed) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let (dst_slot, mut dst) =
        destination_held_at_claim(&vol, "behind-dst", claimed_tx, go_rx, false);

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
        destination_held_at_claim(&vol, "behind-fail-dst", claimed_tx, go_rx, true);

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
