//! Snapshots and clones of `s3://` volumes on real S3 servers (moto and
//! s3s-fs, as `s3_tests.rs`): a snapshot while commits run is at a
//! transaction boundary, a clone and its source do not see each other's
//! writes, the source's collector and its sweep at open leave what the
//! snapshot and the clone name, and deleting them gives the bucket back
//! to what the source alone needs.

use std::collections::BTreeSet;
use std::sync::Arc;

use pohmelfs_testkit::{skip_requested, Moto, S3sFs, ScratchDir, Steps};

use super::conformance::{commit, read, write_op};
use super::lineage;
use super::s3_snapshot;
use super::snapshot::SnapshotError;
use super::{ReadOnlyVolume, SlateStore};
use crate::check::volume::{check_volume, Problem, Report, Warning};
use crate::store::{Store, Txn};

const BUCKET: &str = "pohmelfs-test";

/// Over the 64 KiB a commit keeps inline: each goes to a data object.
const CHUNK: usize = 256 * 1024;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The ids of the data objects in the folder of the volume at `prefix`.
fn objects_in(s: &SlateStore) -> BTreeSet<u64> {
    let o = s.objects.as_ref().expect("data objects");
    s.rt()
        .unwrap()
        .block_on(o.list())
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// The ids this volume's records name.
fn records_of(s: &SlateStore) -> BTreeSet<u64> {
    let o = s.objects.as_ref().expect("data objects");
    s.rt()
        .unwrap()
        .block_on(lineage::object_records(o.store().clone(), o.db_path()))
        .unwrap()
}

/// Commits run on a thread while the snapshot is taken: the snapshot
/// holds transactions 0..k for some k, each whole (its 8-byte mark and
/// its data object), and none after.
fn snapshot_is_at_a_transaction_boundary(url: &dyn Fn(&str) -> String) {
    let v = url("volumes/busy");
    let s = Arc::new(SlateStore::open(&v).expect("open s3 volume"));
    let writer = {
        let s = s.clone();
        Steps::spawn(200, move |i| {
            let mark = (i + 1).to_le_bytes();
            let ops = vec![
                write_op(50, 8 * i, &mark),
                write_op(51, CHUNK as u64 * i, &pattern(i as u8, CHUNK)),
            ];
            s.commit(Txn { ops }).expect("commit");
        })
    };
    assert!(
        writer.reach(3, std::time::Duration::from_secs(60)),
        "writer started"
    );
    s.take_object_snapshot("busy").expect("take snapshot");
    let written = writer.finish();
    let ro = ReadOnlyVolume::open(&format!("{}@busy{}", base(&v), query(&v)))
        .expect("open snapshot read-only");
    let marks = read(&ro, 50, 0, 8 * written as usize);
    let mut k = 0;
    while k < written && marks[8 * k as usize..8 * k as usize + 8] == (k + 1).to_le_bytes() {
        k += 1;
    }
    assert!(k >= 3, "the snapshot lacks commits acknowledged before it");
    assert!(
        marks[8 * k as usize..].iter().all(|b| *b == 0),
        "the snapshot holds commits past a gap"
    );
    for i in 0..written {
        let got = read(&ro, 51, CHUNK as u64 * i, CHUNK);
        if i < k {
            assert_eq!(got, pattern(i as u8, CHUNK), "transaction {i} torn");
        } else {
            assert!(got.iter().all(|b| *b == 0), "transaction {i} half in");
        }
    }
}

/// `check` of `s`, which must find nothing wrong but the inodes these
/// tests never write (they write data only).
fn checked(s: &SlateStore) -> Report {
    let report = check_volume(s).unwrap();
    let real = report
        .problems
        .iter()
        .filter(|p| !matches!(p, Problem::RecordOfMissingInode { .. }))
        .count();
    assert_eq!(real, 0, "{report:?}");
    report
}

fn base(url: &str) -> &str {
    url.split_once('?').map_or(url, |(b, _)| b)
}

fn query(url: &str) -> String {
    url.split_once('?')
        .map_or_else(String::new, |(_, q)| format!("?{q}"))
}

/// The checkpoint the lineage of snapshot `name` of `s` names, and the
/// checkpoints the snapshot's engine holds.
fn checkpoints_of_snapshot(
    s: &SlateStore,
    name: &str,
) -> (Option<uuid::Uuid>, Vec<slatedb::Checkpoint>) {
    let o = s.objects.as_ref().unwrap();
    let snap = s3_snapshot::snapshot_prefix(o.db_path(), name).unwrap();
    s.rt().unwrap().block_on(async {
        let l = lineage::read(&**o.store(), &snap).await.unwrap().unwrap();
        let held = slatedb::admin::AdminBuilder::new(snap.clone(), o.store().clone())
            .build()
            .list_checkpoints(None)
            .await
            .unwrap();
        (l.checkpoint, held)
    })
}

/// A clone and its source written on both sides; the source overwritten
/// and collected, reopened (swept) with the snapshot and the clone
/// alive; then both deleted.
fn clones_share_objects_until_deleted(url: &dyn Fn(&str) -> String) {
    let v = url("volumes/golden");
    let c = url("volumes/job1");
    let s = SlateStore::open(&v).expect("open s3 volume");
    commit(&s, vec![write_op(10, 0, &pattern(1, CHUNK))]);
    commit(&s, vec![write_op(11, 0, &pattern(2, CHUNK))]);
    let alone = objects_in(&s);
    s.take_object_snapshot("gold").expect("take snapshot");
    assert_eq!(s3_snapshot::list(&v).unwrap().len(), 1);
    // Written after the snapshot: not in it.
    commit(&s, vec![write_op(12, 0, &pattern(3, CHUNK))]);

    s3_snapshot::clone_from(&v, "gold", &c).expect("clone");
    // The clone started from the checkpoint the snapshot pinned: the
    // snapshot's engine holds that one and the clone's own, and no
    // checkpoint SlateDB would have written first to clone from.
    let (pinned, held) = checkpoints_of_snapshot(&s, "gold");
    let pinned = pinned.expect("the snapshot's lineage names its checkpoint");
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(held.iter().any(|c| c.id == pinned), "{held:?}");
    let cl = SlateStore::open(&c).expect("open clone");
    assert_ne!(cl.identity().volume_id, s.identity().volume_id);
    assert_eq!(read(&cl, 10, 0, CHUNK), pattern(1, CHUNK));
    assert!(read(&cl, 12, 0, 16).iter().all(|b| *b == 0));
    commit(&cl, vec![write_op(11, 0, &pattern(7, CHUNK))]);
    commit(&s, vec![write_op(10, 0, &pattern(8, CHUNK))]);
    assert_eq!(read(&cl, 10, 0, CHUNK), pattern(1, CHUNK));
    assert_eq!(read(&cl, 11, 0, CHUNK), pattern(7, CHUNK));
    assert_eq!(read(&s, 11, 0, CHUNK), pattern(2, CHUNK));
    assert_eq!(read(&s, 10, 0, CHUNK), pattern(8, CHUNK));
    assert!(objects_in(&cl).iter().all(|id| !alone.contains(id)));

    // Overwrite everything the snapshot names, collect, reopen (sweep).
    commit(&s, vec![write_op(11, 0, &pattern(9, CHUNK))]);
    s.collect_objects().expect("collect");
    s.object_gc.as_ref().unwrap().barrier();
    for id in &alone {
        assert!(
            objects_in(&s).contains(id),
            "object {id:x} of the snapshot deleted"
        );
    }
    s.close().unwrap();
    let s = SlateStore::open(&v).expect("reopen source");
    s.object_gc.as_ref().unwrap().barrier();
    assert!(
        alone.is_subset(&objects_in(&s)),
        "the sweep deleted shared objects"
    );
    let ro = ReadOnlyVolume::open(&format!("{}@gold{}", base(&v), query(&v)))
        .expect("open snapshot read-only");
    assert_eq!(read(&ro, 10, 0, CHUNK), pattern(1, CHUNK));
    assert_eq!(read(&ro, 11, 0, CHUNK), pattern(2, CHUNK));
    drop(ro);
    assert_eq!(read(&cl, 10, 0, CHUNK), pattern(1, CHUNK));
    // `check` accounts the objects only the snapshot and the clone name
    // as kept for them, not leaked.
    let report = checked(&s);
    assert!(report.warnings.is_empty(), "{report:?}");
    let kept: BTreeSet<u64> = report.shared.iter().map(|x| x.seg).collect();
    assert!(alone.is_subset(&kept), "{report:?}");
    let report = checked(&cl);
    assert!(report.warnings.is_empty(), "{report:?}");
    // The writable open refuses a snapshot.
    assert!(SlateStore::open(&format!("{}@gold{}", base(&v), query(&v))).is_err());

    // Deleting the snapshot while its clone lives is refused (for that,
    // not for a lock left behind).
    let refused = s3_snapshot::delete(&v, "gold");
    assert!(
        matches!(refused, Err(SnapshotError::HasClones(..))),
        "{refused:?}"
    );
    cl.close().unwrap();
    let owners = s3_snapshot::delete_clone(&c).expect("delete clone");
    assert_eq!(
        owners,
        vec![base(&v).split_once("pohmelfs-test/").unwrap().1.to_string()]
    );
    s3_snapshot::delete(&v, "gold").expect("delete snapshot");
    assert!(s3_snapshot::list(&v).unwrap().is_empty());
    s.close().unwrap();
    let s = SlateStore::open(&v).expect("reopen source");
    s.object_gc.as_ref().unwrap().barrier();
    assert_eq!(
        objects_in(&s),
        records_of(&s),
        "objects the source alone needs"
    );
    assert_eq!(read(&s, 10, 0, CHUNK), pattern(8, CHUNK));
    assert_eq!(read(&s, 11, 0, CHUNK), pattern(9, CHUNK));
    assert_eq!(read(&s, 12, 0, CHUNK), pattern(3, CHUNK));
    let o = s.objects.as_ref().unwrap();
    let regs = s
        .rt()
        .unwrap()
        .block_on(lineage::registrations(&**o.store(), o.db_path()))
        .unwrap();
    assert!(regs.is_empty(), "{regs:?}");
    // Nothing is left of the clone.
    assert!(SlateStore::open_as(&c, super::OpenMode::Existing { take_over: false }).is_err());
}

/// The capacity `format` recorded goes with a snapshot to its clones: a
/// clone's `statfs` reports it, not the default.
fn clones_keep_the_capacity(url: &dyn Fn(&str) -> String) {
    const CAPACITY: u64 = 48 << 20;
    let v = url("volumes/sized");
    let c = url("volumes/sized-job");
    SlateStore::format(&v, Some(CAPACITY)).expect("format with a capacity");
    let s = SlateStore::open(&v).expect("open s3 volume");
    let total = s.statfs().expect("statfs").capacity_bytes;
    assert!(total <= CAPACITY, "{total}");
    s.take_object_snapshot("sized").expect("take snapshot");
    // As a snapshot taken before snapshots pinned a checkpoint for their
    // clones: its lineage names none, and the clone starts from its latest
    // state.
    let o = s.objects.as_ref().unwrap();
    let snap = s3_snapshot::snapshot_prefix(o.db_path(), "sized").unwrap();
    s.rt().unwrap().block_on(async {
        let mut l = lineage::read(&**o.store(), &snap).await.unwrap().unwrap();
        l.checkpoint = None;
        lineage::write(&**o.store(), &snap, &l).await.unwrap();
    });
    s3_snapshot::clone_from(&v, "sized", &c).expect("clone");
    let cl = SlateStore::open(&c).expect("open clone");
    assert_eq!(cl.statfs().expect("statfs").capacity_bytes, total);
    cl.close().unwrap();
    s3_snapshot::delete_clone(&c).expect("delete clone");
    s3_snapshot::delete(&v, "sized").expect("delete snapshot");
    s.close().unwrap();
}

/// Every key under `prefix` but SlateDB's manifests (each checkpoint
/// written or stripped is a new manifest version, which only the
/// engine's collector removes).
fn keys_but_manifests(s: &SlateStore, prefix: &str) -> BTreeSet<String> {
    let store = s.objects.as_ref().unwrap().store().clone();
    s.rt().unwrap().block_on(async {
        let mut dirs = vec![object_store::path::Path::from(prefix)];
        let mut keys = BTreeSet::new();
        while let Some(dir) = dirs.pop() {
            let listed = store.list_with_delimiter(Some(&dir)).await.unwrap();
            keys.extend(
                listed
                    .objects
                    .into_iter()
                    .map(|m| m.location.to_string())
                    .filter(|k| !k.contains("/manifest/")),
            );
            dirs.extend(listed.common_prefixes);
        }
        keys
    })
}

/// The ids of the checkpoints the engine at `prefix` holds.
fn checkpoints_at(s: &SlateStore, prefix: &str) -> BTreeSet<uuid::Uuid> {
    let store = s.objects.as_ref().unwrap().store().clone();
    s.rt().unwrap().block_on(async {
        slatedb::admin::AdminBuilder::new(prefix.to_string(), store)
            .build()
            .list_checkpoints(None)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect()
    })
}

/// CI jobs, each a clone of the golden volume's snapshot opened, written,
/// closed and deleted, leave nothing behind: the same objects in the
/// bucket as before the first (manifest versions aside), the same
/// checkpoints in the golden volume's engine and only the pinned one in
/// the snapshot's, and the snapshot as the golden volume's only holder.
fn jobs_leave_nothing_behind(url: &dyn Fn(&str) -> String) {
    const JOBS: u8 = 6;
    let v = url("volumes/golden-ci");
    let s = SlateStore::open(&v).expect("open s3 volume");
    commit(&s, vec![write_op(10, 0, &pattern(1, CHUNK))]);
    s.take_object_snapshot("base").expect("take snapshot");
    let o = s.objects.as_ref().unwrap();
    let gold = o.db_path().to_string();
    let snap = s3_snapshot::snapshot_prefix(&gold, "base").unwrap();
    let bucket = gold.rsplit_once('/').map_or("", |(b, _)| b).to_string();
    let before = keys_but_manifests(&s, &bucket);
    let gold_checkpoints = checkpoints_at(&s, &gold);
    let (pinned, _) = checkpoints_of_snapshot(&s, "base");
    for job in 0..JOBS {
        let c = url(&format!("volumes/job{job}"));
        s3_snapshot::clone_from(&v, "base", &c).expect("clone");
        let cl = SlateStore::open(&c).expect("open clone");
        assert_eq!(read(&cl, 10, 0, CHUNK), pattern(1, CHUNK));
        commit(&cl, vec![write_op(10, 0, &pattern(job + 2, CHUNK))]);
        commit(&cl, vec![write_op(11, 0, &pattern(job + 3, CHUNK))]);
        cl.close().unwrap();
        s3_snapshot::delete_clone(&c).expect("delete clone");
    }
    assert_eq!(keys_but_manifests(&s, &bucket), before);
    assert_eq!(checkpoints_at(&s, &gold), gold_checkpoints);
    assert_eq!(
        checkpoints_at(&s, &snap),
        pinned.into_iter().collect::<BTreeSet<_>>()
    );
    let rt = s.rt().unwrap();
    let holders = rt
        .block_on(lineage::registrations(&**o.store(), &gold))
        .unwrap();
    assert_eq!(
        holders
            .iter()
            .map(|r| r.holder.as_str())
            .collect::<Vec<_>>(),
        [snap.as_str()]
    );
    assert!(rt
        .block_on(lineage::registrations(&**o.store(), &snap))
        .unwrap()
        .is_empty());
    assert_eq!(read(&s, 10, 0, CHUNK), pattern(1, CHUNK));
    s3_snapshot::delete(&v, "base").expect("delete snapshot");
    s.close().unwrap();
}

/// A registration whose holder never became complete (a crash half
/// way) keeps every object below its bound through the sweep, and `check`
/// says so; once it is gone, the next sweep frees them.
fn incomplete_holders_keep_everything_below_their_bound(url: &dyn Fn(&str) -> String) {
    let v = url("volumes/ghosted");
    let s = SlateStore::open(&v).expect("open s3 volume");
    commit(&s, vec![write_op(10, 0, &pattern(1, CHUNK))]);
    let before = objects_in(&s);
    let o = s.objects.as_ref().unwrap();
    let (store, prefix) = (o.store().clone(), o.db_path().to_string());
    let bound = o.next_unallocated();
    let rt = s.rt().unwrap();
    rt.block_on(lineage::register(&*store, &prefix, "volumes/ghost", bound))
        .unwrap();
    s.close().unwrap();
    let s = SlateStore::open(&v).expect("reopen");
    commit(&s, vec![write_op(10, 0, &pattern(2, CHUNK))]);
    s.close().unwrap();
    let s = SlateStore::open(&v).expect("reopen: sweep");
    s.object_gc.as_ref().unwrap().barrier();
    assert!(
        before.is_subset(&objects_in(&s)),
        "an incomplete holder's objects swept"
    );
    let report = checked(&s);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| matches!(w, Warning::IncompleteHolder { .. })),
        "{report:?}"
    );
    let rt = s.rt().unwrap();
    rt.block_on(lineage::unregister(&*store, &prefix, "volumes/ghost"))
        .unwrap();
    s.close().unwrap();
    SlateStore::open(&v)
        .expect("reopen: sweep")
        .close()
        .unwrap();
    let s = SlateStore::open(&v).expect("reopen");
    let now = objects_in(&s);
    assert!(
        before.iter().all(|id| !now.contains(id)),
        "{before:?} {now:?}"
    );
    assert_eq!(read(&s, 10, 0, CHUNK), pattern(2, CHUNK));
}

#[test]
fn s3_snapshots_and_clones_on_moto() {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the engine's S3 snapshot test") {
        return;
    }
    let dir = ScratchDir::new("s3-snap").expect("scratch directory");
    let moto = Moto::start(dir.path(), BUCKET).expect("start moto_server");
    snapshot_is_at_a_transaction_boundary(&|p| moto.url(p));
    clones_share_objects_until_deleted(&|p| moto.url(p));
    incomplete_holders_keep_everything_below_their_bound(&|p| moto.url(p));
    commands_take_turns(&|p| moto.url(p));
    clones_keep_the_capacity(&|p| moto.url(p));
    jobs_leave_nothing_behind(&|p| moto.url(p));
}

#[test]
fn s3_snapshots_and_clones_on_s3s_fs() {
    if skip_requested(
        "POHMELFS_SKIP_S3_TESTS",
        "the engine's s3s-fs snapshot test",
    ) {
        return;
    }
    let dir = ScratchDir::new("s3s-snap").expect("scratch directory");
    let server = S3sFs::start(dir.path(), BUCKET).expect("start s3s-fs");
    snapshot_is_at_a_transaction_boundary(&|p| server.url(p));
    clones_share_objects_until_deleted(&|p| server.url(p));
    commands_take_turns(&|p| server.url(p));
    drop(server);
}

/// Snapshot commands on one volume take turns (`s3_lock.rs`): a delete
/// waits while another command holds the lock and runs once it is let go;
/// a lock whose holder is gone (this host) or whose lease ran out
/// (another host) is taken over, a live one is not.
fn commands_take_turns(url: &dyn Fn(&str) -> String) {
    use super::holder::{self, Holder};
    use super::s3_lock;
    use object_store::ObjectStoreExt;
    use std::time::Duration;
    let s = SlateStore::open(&url("turns")).expect("open volume");
    s.take_object_snapshot("s1").expect("snapshot");
    let objects = s.objects.as_ref().expect("data objects");
    let (store, volume) = (objects.store().clone(), objects.db_path().to_string());
    let rt = s.rt().unwrap();
    let held = rt
        .block_on(s3_lock::acquire(&store, &volume, Duration::ZERO))
        .expect("lock");
    let again = rt.block_on(s3_lock::acquire(
        &store,
        &volume,
        Duration::from_millis(200),
    ));
    assert!(
        matches!(again, Err(super::snapshot::SnapshotError::Busy(_))),
        "{:?}",
        again.err()
    );
    let u = url("turns");
    let delete = std::thread::spawn(move || s3_snapshot::delete(&u, "s1"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !delete.is_finished(),
        "the delete ran while the lock was held"
    );
    let snap = s3_snapshot::snapshot_prefix(&volume, "s1").unwrap();
    assert!(rt
        .block_on(lineage::read(&*store, &snap))
        .unwrap()
        .is_some());
    rt.block_on(held.release());
    delete
        .join()
        .unwrap()
        .expect("the delete once the lock was let go");
    assert!(rt
        .block_on(lineage::read(&*store, &snap))
        .unwrap()
        .is_none());
    // Records of others: a process of this host that ended, a host whose
    // lease ran out, a host that renewed just now.
    let path = object_store::path::Path::from(format!("{volume}/{}", s3_lock::LOCK_NAME));
    let mut ended = std::process::Command::new("true").spawn().unwrap();
    let pid = ended.id();
    ended.wait().unwrap();
    let now = holder::now_secs();
    let record = |host: &str, pid: u32, renewed: u64| Holder {
        host: host.to_string(),
        pid,
        since: renewed,
        renewed,
        standby: false,
        open_id: 0,
    };
    for (h, live) in [
        (record(&holder::host_name(), pid, now), false),
        (record("elsewhere", 1, now - holder::LEASE_SECS), false),
        (record("elsewhere", 1, now), true),
    ] {
        rt.block_on(store.put(&path, h.encode().into_bytes().into()))
            .unwrap();
        let got = rt.block_on(s3_lock::acquire(&store, &volume, Duration::ZERO));
        assert_eq!(got.is_err(), live, "{h:?}");
        if let Ok(lock) = got {
            rt.block_on(lock.release());
        }
    }
    rt.block_on(store.delete(&path)).unwrap();
    s.close().unwrap();
}
