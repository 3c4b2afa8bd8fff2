//! A writer killed (SIGKILL) while it uploads data objects to S3 (moto on
//! loopback): whatever it was doing, the volume it leaves is consistent
//! (`pohmelfs check`: no problem; the uploads of commits that never became
//! durable at most leaked objects), and the next open deletes those.
//! Without `moto_server` the test fails, unless `POHMELFS_SKIP_S3_TESTS=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use pohmelfs::check::volume::{check_volume, Problem, Warning};
use pohmelfs::store::engine::{SlateStore, VolumeReader};
use pohmelfs_testkit::{skip_requested, wait_until, ChildGuard, Moto, ScratchDir};

fn leaked(url: &str) -> usize {
    let reader = VolumeReader::open(url).expect("open the volume to check it");
    let report = check_volume(&reader).expect("check");
    // bench-store writes bare inodes (no root, no entries): only the
    // problems of file data are this test's.
    let data: Vec<&Problem> = report
        .problems
        .iter()
        .filter(|p| {
            matches!(
                p,
                Problem::MissingSegment { .. }
                    | Problem::ExtentChecksum { .. }
                    | Problem::ExtentPastSegment { .. }
                    | Problem::SegmentLive { .. }
                    | Problem::Unreadable(_)
            )
        })
        .collect();
    assert!(data.is_empty(), "{data:?}");
    report
        .warnings
        .iter()
        .filter(|w| matches!(w, Warning::LeakedObject { .. }))
        .count()
}

#[test]
fn a_writer_killed_while_uploading_leaves_a_consistent_volume() {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the S3 kill test") {
        return;
    }
    let dir = ScratchDir::new("s3-kill").expect("scratch directory");
    let moto = Moto::start(dir.path(), "pohmelfs-kill").expect("start moto_server");
    // 1 MiB commits from 8 threads: most of a commit's time is its upload.
    let mut writer = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
            .args(["bench-store", "--store", &moto.cli_url("killed")])
            .args(["--sizes", "1m", "--count", "100000", "--threads", "8"])
            .envs(Moto::CLI_ENV)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bench-store"),
    );
    // Some commits are durable (their objects and records are in), and
    // more are uploading, when it is killed.
    let objects = |n| moto.keys("killed/data/").is_ok_and(|k| k.len() >= n);
    wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
        objects(24)
    })
    .expect("the writer uploads data objects");
    writer.0.kill().expect("SIGKILL the writer");
    writer.0.wait().expect("reap the writer");
    let url = moto.url("killed");
    let before = leaked(&url);
    assert!(
        before <= 8,
        "{before} commits were uploading, with 8 threads"
    );
    // Take the volume over (the dead writer's holder record names a pid
    // that is gone): the open sweeps what no record names.
    let store = SlateStore::open(&url).expect("reopen the volume");
    store.close().expect("close");
    drop(store);
    assert_eq!(leaked(&url), 0, "{before} leaked before the reopen");
}
