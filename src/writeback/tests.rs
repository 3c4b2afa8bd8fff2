//! Tests of the transaction layer with a fault-injecting sink: lost acks,
//! duplicated and reordered acks, error replies, dropped connections, a
//! fenced server, a store restart (epoch change), a full volume; and a
//! seeded property test of random writes, overwrites, truncates and fsyncs
//! under random faults, for both overwrite policies, against a simple model.
//!
//! A test that needs an ack to come late holds it with the sink's latch
//! ([`Gate`]) and lets it go itself, on a real clock with an ack timeout
//! no test reaches: a timed latency on tokio's paused clock proves nothing,
//! since the clock jumps whenever the sender idles. The paused clock serves
//! the tests of timeouts and backoff, which take no real time on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{OverwritePolicy, TxnConfig};
use crate::check::torture::rng::Rng;
use crate::store::{Inode, Op, Store, Txn};

use super::testkit::*;

#[test]
fn writes_complete_before_the_ack_and_fsync_waits_for_it() {
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 1);
    let wb = Arc::new(wb);
    sink.gate.close();
    create(&*wb, 20);
    write(&*wb, 20, 0, b"hello world", 11);
    // The write completed with no ack: the guest reads it back from the
    // cache, and the store does not have it.
    assert_eq!(content(&*wb, 20), b"hello world");
    assert_eq!(store.get_inode(20).unwrap(), None);
    assert_eq!(m.txn_acked.get(), 0);
    let fsync = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || wb.sync(Some(20)))
    };
    eventually("the fsync to send the transaction", || {
        sink.gate.held() >= 1
    });
    assert!(!fsync.is_finished(), "fsync returned before any ack");
    sink.gate.open();
    fsync.join().unwrap().unwrap();
    assert_eq!(
        content(&*store, 20),
        b"hello world",
        "fsync returned: the store has it"
    );
    assert_eq!(wb.unacked(), 0);
    assert!(m.txn_acked.get() >= 1);
    assert_eq!(m.levels.dirty_bytes.get(), 0);
}

#[test]
fn lost_acks_are_resent_and_applied_once() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 2);
    create(&wb, 20);
    sink.set(Faults {
        lose_ack: 100,
        ..Faults::default()
    });
    write(&wb, 20, 0, b"first", 5);
    // Let a few timeouts pass (on the paused clock), then let acks through.
    eventually("two resends", || m.txn_resent.get() >= 2);
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), b"first");
    assert!(
        m.txn_duplicate_acks.get() >= 1,
        "the resend found the first copy applied"
    );
}

#[test]
fn errors_and_dropped_connections_are_retried() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 1, 3);
    sink.set(Faults {
        fail_first: 5,
        drop_after_apply: 30,
        ..Faults::default()
    });
    create(&wb, 20);
    for i in 0..20u64 {
        write(&wb, 20, i * 4096, &[i as u8; 4096], (i + 1) * 4096);
    }
    wb.sync(None).unwrap();
    let got = content(&*store, 20);
    for i in 0..20usize {
        assert!(
            got[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "page {i}"
        );
    }
    assert!(m.txn_resent.get() >= 5);
}

#[test]
fn a_fenced_server_sends_transactions_to_the_next() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 2, 4);
    sink.set(Faults {
        fenced: vec![0],
        ..Faults::default()
    });
    create(&wb, 20);
    write(&wb, 20, 0, b"elsewhere", 9);
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), b"elsewhere");
    assert!(m.txn_failovers.get() >= 1);
    assert!(sink.sent_to(1) >= 1);
}

#[test]
fn timeouts_move_to_the_next_server_after_the_attempt_bound() {
    let (wb, sink, store, m) = layer(OverwritePolicy::Cow, 2, 5);
    // Server 0 swallows acks forever; server 1 works.
    create(&wb, 21);
    sink.set(Faults {
        lose_ack: 100,
        ..Faults::default()
    });
    write(&wb, 21, 0, b"x", 1);
    eventually("a failover", || m.txn_failovers.get() >= 1);
    sink.set(Faults::default());
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 21), b"x");
}

#[test]
fn reordered_acks_keep_each_inode_in_order() {
    let (wb, sink, store, _) = layer(OverwritePolicy::Cow, 1, 6);
    sink.set(Faults {
        jitter: Duration::from_millis(50),
        ..Faults::default()
    });
    for ino in 20..30u64 {
        create(&wb, ino);
    }
    for round in 0..20u8 {
        for ino in 20..30u64 {
            write(&wb, ino, 0, &[round; 100], 100);
        }
    }
    wb.sync(None).unwrap();
    for ino in 20..30u64 {
        assert_eq!(
            content(&*store, ino),
            vec![19u8; 100],
            "inode {ino} ends with the newest version"
        );
    }
}

#[test]
fn an_epoch_change_resends_everything_unacknowledged() {
    // No ack timeout fires in this test: only the epoch change can resend.
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 7);
    create(&wb, 20);
    create(&wb, 21);
    wb.sync(None).unwrap();
    // One transaction's ack is lost; another is acked under a new epoch
    // (the store restarted): the first must be resent at once.
    sink.set(Faults {
        lose_ack: 100,
        ..Faults::default()
    });
    let seen = sink.sends.load(Ordering::SeqCst);
    write(&wb, 20, 0, b"a", 1);
    eventually("the sink to take the write", || {
        sink.sends.load(Ordering::SeqCst) > seen
    });
    assert_eq!(m.txn_resent.get(), 0);
    sink.epoch.store(2, Ordering::SeqCst);
    sink.set(Faults::default());
    write(&wb, 21, 0, b"b", 1);
    eventually("the epoch change to resend the lost one", || {
        m.txn_resent.get() >= 1
    });
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), b"a");
    assert_eq!(content(&*store, 21), b"b");
    assert_eq!(wb.unacked(), 0);
}

#[test]
fn fsync_fails_after_its_deadline_and_stays_failed_until_durable() {
    let fsync_timeout = Duration::from_secs(2);
    let config = TxnConfig {
        fsync_timeout,
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, m) = layer_with(config, 1, 8, false);
    create(&wb, 20);
    wb.sync(None).unwrap();
    sink.gate.close();
    write(&wb, 20, 0, b"data", 4);
    assert!(
        wb.sync(Some(20)).is_err(),
        "no ack comes: EIO after the deadline"
    );
    // The ack is still held, so a sync that waited would fail only at its
    // deadline: failing sooner, it failed on the sticky error.
    let again = std::time::Instant::now();
    assert!(wb.sync(Some(20)).is_err(), "the error is sticky");
    assert!(
        again.elapsed() < fsync_timeout,
        "the second fsync waited {:?}: it did not fail at once",
        again.elapsed()
    );
    assert_eq!(wb.unacked(), 1, "the transaction is kept, not dropped");
    sink.gate.open();
    eventually("the held transaction to be acknowledged", || {
        wb.unacked() == 0
    });
    wb.sync(Some(20)).unwrap();
    assert_eq!(content(&*store, 20), b"data");
    assert_eq!(m.fsync_errors.get(), 2);
}

#[test]
fn overwrite_policies_differ_only_in_waiting() {
    for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
        let (wb, sink, store, m) = held_layer(policy, 9);
        let wb = Arc::new(wb);
        create(&*wb, 20);
        wb.sync(None).unwrap();
        // Hold the first version in flight (pinned) while the guest
        // overwrites it.
        sink.gate.close();
        write(&*wb, 20, 0, &[1u8; 8192], 8192);
        eventually("the first version to be sent", || sink.gate.held() >= 1);
        let writer = {
            let wb = Arc::clone(&wb);
            std::thread::spawn(move || write(&*wb, 20, 0, &[2u8; 8192], 8192))
        };
        match policy {
            OverwritePolicy::Wait => {
                eventually("the overwrite to wait", || m.overwrite_waits.get() >= 1);
                assert!(
                    !writer.is_finished(),
                    "wait: the overwrite waits for the ack"
                );
            }
            OverwritePolicy::Cow => {
                eventually("the overwrite to copy", || m.overwrite_copies.get() >= 1);
                eventually("the overwrite to finish", || writer.is_finished());
                assert_eq!(
                    content(&*wb, 20),
                    vec![2u8; 8192],
                    "cow: the guest sees its new bytes at once"
                );
            }
        }
        sink.gate.open();
        writer.join().unwrap();
        wb.sync(None).unwrap();
        assert_eq!(content(&*store, 20), vec![2u8; 8192], "{policy:?}");
        match policy {
            OverwritePolicy::Wait => assert_eq!(m.overwrite_copies.get(), 0),
            OverwritePolicy::Cow => assert_eq!(m.overwrite_waits.get(), 0),
        }
    }
}

#[test]
fn dirty_bytes_are_bounded_by_backpressure() {
    let (wb, sink, store, m) = held_layer(OverwritePolicy::Cow, 10);
    let wb = Arc::new(wb);
    let dirty_max = cfg(OverwritePolicy::Cow).dirty_max_bytes;
    const CHUNK: u64 = 256 << 10;
    const CHUNKS: u64 = 64;
    create(&*wb, 20);
    wb.sync(None).unwrap();
    // No ack comes until the test opens the gate: the writer must stop
    // once dirty and in-flight bytes reach the bound.
    sink.gate.close();
    let written = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let writer = {
        let (wb, m, written, peak) = (wb.clone(), m.clone(), written.clone(), peak.clone());
        std::thread::spawn(move || {
            for i in 0..CHUNKS {
                write(&*wb, 20, i * CHUNK, &[7u8; CHUNK as usize], (i + 1) * CHUNK);
                written.fetch_add(1, Ordering::SeqCst);
                peak.fetch_max(m.levels.dirty_bytes.get(), Ordering::SeqCst);
            }
        })
    };
    eventually("the writer to meet backpressure", || {
        m.backpressure_waits.get() >= 1
    });
    assert_eq!(
        written.load(Ordering::SeqCst),
        dirty_max / CHUNK,
        "the writer stopped exactly at the bound"
    );
    assert!(
        !writer.is_finished(),
        "no ack came, yet the writer finished"
    );
    assert_eq!(m.txn_acked.get(), 1, "only the create was acknowledged");
    sink.gate.open();
    writer.join().unwrap();
    wb.sync(None).unwrap();
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= dirty_max, "dirty bytes peaked at {peak}");
    assert_eq!(content(&*store, 20), vec![7u8; (CHUNKS * CHUNK) as usize]);
}

#[test]
fn reads_see_the_newest_bytes_across_cache_and_store() {
    let (wb, _sink, store, _) = layer(OverwritePolicy::Cow, 1, 11);
    create(&wb, 20);
    write(&wb, 20, 0, &[1u8; 20_000], 20_000);
    wb.sync(None).unwrap();
    // A partial overwrite of a page the cache may not hold: the untouched
    // bytes come from the store.
    write(&wb, 20, 5000, b"XYZ", 20_000);
    let got = content(&wb, 20);
    assert_eq!(&got[4999..5004], &[1, b'X', b'Y', b'Z', 1]);
    wb.sync(None).unwrap();
    assert_eq!(content(&*store, 20), got);
}

#[test]
fn truncate_is_ordered_after_the_data_it_cuts() {
    let (wb, sink, store, _) = layer(OverwritePolicy::Cow, 1, 12);
    sink.set(Faults {
        jitter: Duration::from_millis(30),
        ..Faults::default()
    });
    create(&wb, 20);
    write(&wb, 20, 0, &[3u8; 10_000], 10_000);
    let mut t = Txn::new();
    t.push(Op::Truncate { ino: 20, size: 100 });
    t.push(Op::PutInode(Inode::regular(20, 100)));
    wb.commit(t).unwrap();
    write(&wb, 20, 8000, b"end", 8003);
    wb.sync(None).unwrap();
    let got = content(&*store, 20);
    assert_eq!(got.len(), 8003);
    assert!(got[..100].iter().all(|&b| b == 3));
    assert!(
        got[100..8000].iter().all(|&b| b == 0),
        "truncated bytes must not come back"
    );
    assert_eq!(&got[8000..], b"end");
}

/// Random writes, overwrites, truncates and fsyncs under random faults,
/// for both policies. After every successful fsync the store holds exactly
/// the model's bytes for that inode; at the end, for every inode.
#[test]
fn random_operations_under_faults_match_the_model() {
    let seeds: u64 = std::env::var("POHMELFS_PROPTEST_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 1..=seeds {
        for policy in [OverwritePolicy::Wait, OverwritePolicy::Cow] {
            run_model(seed, policy);
        }
    }
}

fn run_model(seed: u64, policy: OverwritePolicy) {
    let (wb, sink, store, _) = layer(policy, 2, seed);
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    sink.set(Faults {
        jitter: Duration::from_millis(5),
        lose_ack: 5,
        error: 5,
        drop_after_apply: 5,
        ..Faults::default()
    });
    let inodes = [20u64, 21, 22];
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    for &ino in &inodes {
        create(&wb, ino);
        model.insert(ino, Vec::new());
    }
    for step in 0..300 {
        let ino = inodes[rng.below(3) as usize];
        let m = model.get_mut(&ino).unwrap();
        match rng.below(10) {
            0..=5 => {
                let offset = rng.below(64 << 10);
                let max = if rng.percent(20) { 40_000 } else { 5000 };
                let len = 1 + rng.below(max) as usize;
                let byte = (step % 251) as u8 + 1;
                let data = vec![byte; len];
                let end = offset as usize + len;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[offset as usize..end].copy_from_slice(&data);
                write(&wb, ino, offset, &data, m.len() as u64);
            }
            6 => {
                let size = rng.below(70 << 10) as usize;
                m.resize(size, 0);
                let mut t = Txn::new();
                t.push(Op::Truncate {
                    ino,
                    size: size as u64,
                });
                t.push(Op::PutInode(Inode::regular(ino, size as u64)));
                wb.commit(t).unwrap();
            }
            7 => {
                assert_eq!(
                    &content(&wb, ino),
                    m,
                    "seed {seed} {policy:?} step {step}: read through the layer"
                );
            }
            _ => {
                wb.sync(Some(ino)).unwrap();
                assert_eq!(
                    &content(&*store, ino),
                    m,
                    "seed {seed} {policy:?} step {step}: fsync returned but the store differs"
                );
            }
        }
    }
    wb.sync(None).unwrap();
    for &ino in &inodes {
        assert_eq!(
            &content(&*store, ino),
            &model[&ino],
            "seed {seed} {policy:?}: final content of {ino}"
        );
    }
}

#[test]
fn a_write_in_another_shape_is_read_back_at_once_and_written_through() {
    let (wb, _sink, store, _) = layer(OverwritePolicy::Cow, 1, 19);
    create(&wb, 20);
    write(&wb, 20, 0, &[1u8; 8192], 8192);
    wb.sync(None).unwrap();
    assert_eq!(content(&wb, 20), vec![1u8; 8192], "both pages are cached");
    // Two writes and the attributes in one transaction: not the shape the
    // filesystem layer commits.
    let mut t = Txn::new();
    for (offset, byte) in [(100u64, 2u8), (5000, 3)] {
        t.push(Op::Write {
            ino: 20,
            offset,
            data: vec![byte; 10].into(),
        });
    }
    t.push(Op::PutInode(Inode::regular(20, 8192)));
    wb.commit(t).unwrap();
    let mut want = vec![1u8; 8192];
    want[100..110].fill(2);
    want[5000..5010].fill(3);
    assert_eq!(content(&wb, 20), want, "reads see the write at once");
    assert_eq!(content(&*store, 20), want, "commit returned once stored");
}

/// A panic while the state is locked leaves it half changed: the next
/// lock stops the daemon with a log line instead of going on.
#[test]
fn a_poisoned_state_lock_aborts_the_daemon() {
    const CHILD: &str = "POHMELFS_TXN_POISONED_LOCK_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .try_init();
        let (wb, _, _, _) = layer(OverwritePolicy::Cow, 1, 23);
        let wb = Arc::new(wb);
        let poisoner = Arc::clone(&wb);
        let _ = std::thread::spawn(move || {
            let _state = super::ack::lock(&poisoner.shared.state);
            panic!("a change of the state was interrupted");
        })
        .join();
        let left = wb.unacked();
        println!("went on with {left} transactions unacknowledged");
        return;
    }
    let name = "writeback::tests::a_poisoned_state_lock_aborts_the_daemon";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "the child was not aborted ({:?}); stdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("invariant violated") && stderr.contains("poisoned"),
        "no log line says why:\n{stderr}"
    );
}

/// A transaction behind an older one of its inode leaves the sender's
/// ready set, so that no dispatch looks at it again until the one ahead
/// is acknowledged: a directory's creates, each its own transaction, queue
/// up behind the one in flight without costing every dispatch a look.
#[test]
fn a_queue_behind_one_directory_leaves_the_ready_set() {
    // Transactions of one create each (two operations): a burst of
    // creates would otherwise join one transaction.
    let config = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        max_txn_ops: 2,
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, _) = layer_with(config, 1, 12, false);
    sink.gate.close();
    // Each file's write joins its create, which is full, so the next
    // create starts a transaction of its own; all of them touch
    // directory 1.
    for ino in 100..150u64 {
        create_in(&wb, 1, ino, &format!("f{ino}"));
        write(&wb, ino, 0, b"x", 1);
    }
    eventually("the first transaction to wait at the gate", || {
        sink.gate.held() == 1
    });
    // A write joins its create's transaction unless the create lingered
    // out and left first; then the write is a transaction of its own,
    // behind the create on its inode. Either way every one is queued.
    eventually("the queued ones to leave the ready set", || {
        let st = super::ack::lock(&wb.shared.state);
        st.ready.is_empty() && st.txns.len() >= 50
    });
    sink.gate.open();
    wb.sync(None).unwrap();
    for ino in 100..150u64 {
        assert_eq!(content(&*store, ino), b"x");
    }
    assert!(super::ack::lock(&wb.shared.state).ready.is_empty());
}

/// A write the layer has room for would not wait, so the device serves it
/// on its queue thread; past `dirty_max_bytes`, or under `--overwrite
/// wait` to an inode with pages in flight, it might, and the device hands
/// it to the pool. A metadata change
/// needs room too (not the overwrite policy); a close waits only under
/// `sync_on_close`.
#[test]
fn a_request_would_not_wait_while_there_is_room() {
    use crate::store::Demand::{Close, Metadata, Write};
    let config = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Cow)
    };
    let dirty_max = config.dirty_max_bytes;
    let (wb, sink, _store, _m) = layer_with(config, 1, 31, false);
    create(&wb, 50);
    wb.sync(None).unwrap();
    assert!(wb.would_not_wait(Write {
        ino: 50,
        offset: Some(0),
        len: 4096
    }));
    assert!(wb.would_not_wait(Metadata));
    assert!(wb.would_not_wait(Close));
    sink.gate.close();
    write(&wb, 50, 0, &vec![1u8; dirty_max as usize], dirty_max);
    assert!(
        !wb.would_not_wait(Write {
            ino: 50,
            offset: Some(0),
            len: 4096
        }),
        "no room under dirty_max_bytes"
    );
    assert!(!wb.would_not_wait(Metadata), "no room for metadata either");
    assert!(wb.would_not_wait(Close), "a close does not wait for room");
    sink.gate.open();
    wb.sync(None).unwrap();
    assert!(
        wb.would_not_wait(Write {
            ino: 50,
            offset: Some(0),
            len: 4096
        }),
        "room again once acknowledged"
    );
    assert!(wb.would_not_wait(Metadata));
    // Under wait, a write to an inode with pages in flight may wait for
    // their ack; one to an inode without does not.
    let config = TxnConfig {
        ack_timeout: Duration::from_secs(3600),
        ..cfg(OverwritePolicy::Wait)
    };
    let (wait, sink, _, m) = layer_with(config, 1, 32, false);
    create(&wait, 50);
    create(&wait, 51);
    wait.sync(None).unwrap();
    let to = |ino| Write {
        ino,
        offset: Some(0),
        len: 4096,
    };
    assert!(wait.would_not_wait(to(50)), "nothing in flight");
    sink.gate.close();
    let sent = m.txn_sent.get();
    write(&wait, 50, 0, &[1u8; 4096], 4096);
    eventually("the write to go", || m.txn_sent.get() > sent);
    assert!(
        !wait.would_not_wait(to(50)),
        "under wait a pinned page may hold it"
    );
    assert!(
        wait.would_not_wait(to(51)),
        "another inode's pages are free"
    );
    let past = Write {
        ino: 50,
        offset: Some(4096),
        len: 4096,
    };
    assert!(
        wait.would_not_wait(past),
        "the inode's other pages are free"
    );
    let append = Write {
        ino: 50,
        offset: None,
        len: 4096,
    };
    assert!(
        !wait.would_not_wait(append),
        "an append may land on the pinned page"
    );
    assert!(wait.would_not_wait(Metadata), "metadata pins no page");
    sink.gate.open();
    wait.sync(None).unwrap();
    assert!(wait.would_not_wait(to(50)), "acknowledged: unpinned");
    let strict = TxnConfig {
        sync_on_close: true,
        ..cfg(OverwritePolicy::Cow)
    };
    let (strict, _, _, _) = layer_with(strict, 1, 33, false);
    assert!(!strict.would_not_wait(Close), "a close waits as fsync does");
}
