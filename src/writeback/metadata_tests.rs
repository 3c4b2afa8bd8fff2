//! Tests of the metadata path of the transaction layer: a create, its
//! first write and its close are one commit; bursts of metadata join one
//! transaction, never one already sent; what the layer answers without the
//! store (remembered extended attributes, lookups in directories created
//! in this session) never goes stale; the table of attributes holds to its
//! share of the budget.

use std::sync::Arc;

use super::budget::ATTR_ENTRY_BYTES;
use super::testkit::{content, create, create_in, eventually, layer, lingering_layer, write};
use super::{OverwritePolicy, WritebackStore};
use crate::store::{Dirent, FileKind, Inode, Op, Store, Txn};

#[test]
fn create_write_close_is_one_commit() {
    let (wb, _sink, store, m) = lingering_layer(13);
    create_in(&wb, 1, 30, "a");
    write(&wb, 30, 0, b"0\n", 2);
    // fsync (like a close) sends the lingering transaction at once.
    wb.sync(Some(30)).unwrap();
    assert_eq!(
        m.txn_sent.get(),
        1,
        "create and its first write travel together"
    );
    assert_eq!(content(&*store, 30), b"0\n");
    assert!(store.lookup(1, b"a").unwrap().is_some());
}

#[test]
fn flush_before_the_first_write_sends_nothing_and_the_write_joins_the_create() {
    // A shell's `echo > f`: open (create), close of the original descriptor
    // (FLUSH), write through the duplicate, close again (FLUSH).
    let (wb, _sink, store, m) = lingering_layer(18);
    create_in(&wb, 1, 31, "b");
    wb.flush(31).unwrap();
    assert_eq!(m.txn_sent.get(), 0, "no data to write back: nothing sent");
    write(&wb, 31, 0, b"1\n", 2);
    // FLUSH with data neither sends nor waits: the transaction lingers
    // for the next files of a burst; fsync sends it and waits.
    wb.flush(31).unwrap();
    assert_eq!(m.txn_sent.get(), 0, "the close left it lingering");
    wb.sync(Some(31)).unwrap();
    assert_eq!(m.txn_sent.get(), 1, "create and write in one commit");
    assert_eq!(content(&*store, 31), b"1\n");
    // fsync, unlike FLUSH, makes the metadata durable too.
    create_in(&wb, 1, 32, "c");
    wb.sync(Some(32)).unwrap();
    assert!(store.lookup(1, b"c").unwrap().is_some());
}

#[test]
fn a_burst_of_metadata_joins_one_transaction_up_to_the_op_bound() {
    let (wb, _sink, store, m) = lingering_layer(14);
    // 40 creates of two ops each: 16 ops per transaction at most.
    for i in 0..40 {
        create_in(&wb, 1, 100 + i, &format!("f{i}"));
    }
    // Reads see them before any ack.
    assert_eq!(wb.lookup(1, b"f39").unwrap().map(|d| d.ino), Some(139));
    wb.sync(None).unwrap();
    assert_eq!(
        m.txn_formed.get(),
        5,
        "40 creates × 2 ops in transactions of 16 ops"
    );
    assert_eq!(m.txn_joined.get(), 35);
    for i in 0..40 {
        let d = store.lookup(1, format!("f{i}").as_bytes()).unwrap();
        assert_eq!(d.map(|d| d.ino), Some(100 + i));
    }
    assert_eq!(wb.unacked(), 0);
}

#[test]
fn metadata_never_joins_a_transaction_already_sent() {
    let (wb, sink, store, m) = lingering_layer(15);
    let wb = Arc::new(wb);
    sink.gate.close();
    create_in(&*wb, 1, 40, "x");
    // A truncate joins the lingering create; an fsync sends both at once,
    // then waits for their ack, which the gate holds.
    let mut t = Txn::new();
    t.push(Op::Truncate { ino: 40, size: 0 });
    wb.commit(t).unwrap();
    let fsync = {
        let wb = Arc::clone(&wb);
        std::thread::spawn(move || wb.sync(Some(40)))
    };
    eventually("the create and truncate to be sent", || {
        sink.gate.held() >= 1
    });
    let (formed, joined) = (m.txn_formed.get(), m.txn_joined.get());
    assert_eq!((formed, joined), (1, 1), "the truncate joined the create");
    create_in(&*wb, 1, 41, "y");
    assert_eq!(
        (m.txn_formed.get(), m.txn_joined.get()),
        (formed + 1, joined),
        "the later create is its own transaction"
    );
    sink.gate.open();
    fsync.join().unwrap().unwrap();
    wb.sync(None).unwrap();
    assert!(store.lookup(1, b"x").unwrap().is_some());
    assert!(store.lookup(1, b"y").unwrap().is_some());
}

#[test]
fn remembered_xattrs_never_go_stale() {
    let (wb, _, store, _) = layer(OverwritePolicy::Cow, 1, 16);
    create(&wb, 50);
    wb.sync(None).unwrap();
    let name = b"user.k".as_slice();
    // Absent, and remembered as absent.
    assert_eq!(wb.get_xattr(50, name).unwrap(), None);
    let set = |v: &[u8]| {
        let mut t = Txn::new();
        t.push(Op::SetXattr {
            ino: 50,
            name: name.to_vec(),
            value: v.to_vec(),
        });
        wb.commit(t).unwrap();
    };
    set(b"one");
    assert_eq!(
        wb.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"one"[..])
    );
    // Acked: the overlay retires, and what is remembered must not be the
    // absence read before the change.
    wb.sync(None).unwrap();
    assert_eq!(
        wb.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"one"[..])
    );
    set(b"two");
    wb.sync(None).unwrap();
    assert_eq!(
        wb.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        store.get_xattr(50, name).unwrap().as_deref(),
        Some(&b"two"[..])
    );
    let mut t = Txn::new();
    t.push(Op::RemoveXattr {
        ino: 50,
        name: name.to_vec(),
    });
    wb.commit(t).unwrap();
    wb.sync(None).unwrap();
    assert_eq!(wb.get_xattr(50, name).unwrap(), None);
}

/// A directory created through the layer, with `ids - 1` ids after it
/// reserved for its entries.
fn session_dir(wb: &WritebackStore, ids: u64) -> u64 {
    let dir = wb.reserve_ids(ids).unwrap();
    let mut d = Inode::regular(dir, 0);
    d.kind = FileKind::Directory;
    let mut t = Txn::new();
    t.push(Op::PutInode(d));
    wb.commit(t).unwrap();
    dir
}

#[test]
fn a_directory_created_here_answers_lookups_of_new_names_itself() {
    let (wb, sink, store, _) = layer(OverwritePolicy::Cow, 1, 17);
    let dir = session_dir(&wb, 16);
    create_in(&wb, dir, dir + 1, "a");
    wb.sync(None).unwrap();
    // Whatever the store says behind the layer's back, the layer answers
    // for what it created: entries of its directories (present and
    // absent) and the extended attributes of its inodes (none).
    let mut t = Txn::new();
    t.push(Op::PutDirent {
        parent: dir,
        dirent: Dirent {
            name: b"nope".to_vec(),
            ino: 98,
            kind: FileKind::Regular,
            cookie: 98,
        },
    });
    t.push(Op::SetXattr {
        ino: dir + 1,
        name: b"user.x".to_vec(),
        value: b"v".to_vec(),
    });
    store.commit(t).unwrap();
    assert!(wb.lookup(dir, b"nope").unwrap().is_none());
    assert_eq!(wb.lookup(dir, b"a").unwrap().map(|d| d.ino), Some(dir + 1));
    assert_eq!(wb.get_xattr(dir + 1, b"user.x").unwrap(), None);
    assert!(wb.list_xattr(dir + 1).unwrap().is_empty());
    let xattrs = |ino| crate::store::Demand::Xattrs { ino };
    assert!(wb.would_not_wait(xattrs(dir + 1)));
    assert!(!wb.would_not_wait(xattrs(99)), "not created here");
    // A change of its attributes sends reads to the store again.
    let mut t = Txn::new();
    t.push(Op::SetXattr {
        ino: dir + 1,
        name: b"user.y".to_vec(),
        value: b"w".to_vec(),
    });
    wb.commit(t).unwrap();
    assert!(!wb.would_not_wait(xattrs(dir + 1)), "one was set");
    wb.sync(None).unwrap();
    assert_eq!(
        wb.get_xattr(dir + 1, b"user.x").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(
        wb.list_xattr(dir + 1).unwrap(),
        [b"user.x".to_vec(), b"user.y".to_vec()]
    );
    // An entry the layer never saw in a directory it did not create is the
    // store's to answer.
    create_in(&*store, 1, 99, "old");
    assert_eq!(wb.lookup(1, b"old").unwrap().map(|d| d.ino), Some(99));
    // Removed, then absent again.
    let mut t = Txn::new();
    t.push(Op::RemoveDirent {
        parent: dir,
        name: b"a".to_vec(),
    });
    wb.commit(t).unwrap();
    wb.sync(None).unwrap();
    assert!(wb.lookup(dir, b"a").unwrap().is_none());
    drop(sink);
}

/// Every entry of `dir` through `s`, in batches of `max`.
fn list(s: &dyn Store, dir: u64, max: usize) -> Vec<(Vec<u8>, u64)> {
    let (mut out, mut after) = (Vec::new(), 0);
    loop {
        let batch = s.readdir(dir, after, max).unwrap();
        assert!(batch.len() <= max);
        let Some(last) = batch.last() else { break };
        assert!(batch.windows(2).all(|w| w[0].cookie < w[1].cookie));
        after = last.cookie;
        out.extend(batch.into_iter().map(|d| (d.name, d.cookie)));
    }
    out
}

#[test]
fn a_directory_created_here_is_listed_from_memory() {
    let (wb, sink, store, _) = layer(OverwritePolicy::Cow, 1, 19);
    let dir = session_dir(&wb, 256);
    for i in 1..=100 {
        create_in(&wb, dir, dir + i, &format!("f{i}"));
    }
    wb.sync(None).unwrap();
    // Half acknowledged, half not: removals and a rename over a name.
    for i in (2..=100).step_by(3) {
        let mut t = Txn::new();
        t.push(Op::RemoveDirent {
            parent: dir,
            name: format!("f{i}").into_bytes(),
        });
        wb.commit(t).unwrap();
        if i == 50 {
            wb.sync(None).unwrap();
        }
    }
    create_in(&wb, dir, dir + 200, "f1");
    let expect = |s: &dyn Store| list(s, dir, 1000);
    let listed = list(&wb, dir, 7);
    assert_eq!(listed.len(), 100 - 33);
    assert!(listed.contains(&(b"f1".to_vec(), dir + 200)));
    wb.sync(None).unwrap();
    assert_eq!(
        listed,
        expect(&*store),
        "the store lists the same, in order"
    );
    // Behind the layer's back (the layer is the only writer): not listed,
    // so the listing came from memory.
    create_in(&*store, dir, dir + 250, "nope");
    assert_eq!(list(&wb, dir, 7), listed);
    assert_eq!(wb.readdir(dir, 0, 0).unwrap(), Vec::new());
    drop(sink);
}

/// On a remote store, a directory the session did not create is read
/// ahead in listings of `LISTING_FETCH` entries, which follow the layer's
/// own changes: the listing equals the store's once everything is acked.
#[test]
fn a_listing_read_ahead_follows_the_layers_changes() {
    use super::listing::LISTING_FETCH;
    use super::testkit::{cfg, layer_with};
    let config = super::TxnConfig {
        forget_clean_pages: false,
        ..cfg(OverwritePolicy::Cow)
    };
    let (wb, sink, store, _) = layer_with(config, 1, 29, true);
    let dir = 1;
    let n = 2 * LISTING_FETCH as u64 + 10;
    let mut t = Txn::new();
    for i in 1..=n {
        t.push(Op::PutDirent {
            parent: dir,
            dirent: Dirent {
                name: format!("e{i}").into_bytes(),
                ino: 1000 + i,
                kind: FileKind::Regular,
                cookie: 10 * i,
            },
        });
    }
    store.commit(t).unwrap();
    // Behind the layer's back, inside a range it read ahead: not listed
    // (the layer is the volume's only writer), so the listing was kept.
    let first = wb.readdir(dir, 0, 1).unwrap();
    create_in(&*store, dir, first[0].cookie + 1, "behind");
    let next = wb.readdir(dir, first[0].cookie, 1).unwrap();
    assert_eq!(next[0].name, b"e2".to_vec());
    let mut t = Txn::new();
    t.push(Op::RemoveDirent {
        parent: dir,
        name: b"behind".to_vec(),
    });
    store.commit(t).unwrap();
    // The guest's `rm -r`: a buffer of entries, then their unlinks, and a
    // create now and then, half of them acknowledged as it goes.
    let (mut after, mut seen) = (0, 0);
    loop {
        let batch = wb.readdir(dir, after, 25).unwrap();
        let Some(last) = batch.last() else { break };
        after = last.cookie;
        seen += batch.len();
        for d in &batch {
            let mut t = Txn::new();
            t.push(Op::RemoveDirent {
                parent: dir,
                name: d.name.clone(),
            });
            wb.commit(t).unwrap();
        }
        // Creates go past the stored range (listed, and removed, later).
        if after <= 10 * n {
            create_in(&wb, dir, 100_000 + after, &format!("new{after}"));
        }
        if seen % 50 == 0 {
            wb.sync(None).unwrap();
        }
    }
    assert!(seen as u64 >= n, "every stored entry listed once at least");
    let listed = list(&wb, dir, 7);
    wb.sync(None).unwrap();
    assert_eq!(listed, list(&*store, dir, 1000), "as the store lists it");
    drop(sink);
}

/// What the device may serve on its queue thread for a remote volume:
/// only what the layer answers from memory.
#[test]
fn the_layer_says_what_it_answers_from_memory() {
    use crate::store::Demand;
    let (wb, sink, _store, _) = layer(OverwritePolicy::Cow, 1, 23);
    let dir = session_dir(&wb, 16);
    create_in(&wb, dir, dir + 1, "a");
    write(&wb, dir + 1, 0, &[7; 4096], 4096);
    assert!(wb.would_not_wait(Demand::Entries { dir }));
    assert!(
        !wb.would_not_wait(Demand::Entries { dir: 1 }),
        "not created here"
    );
    assert!(wb.would_not_wait(Demand::Attributes { ino: dir + 1 }));
    assert!(!wb.would_not_wait(Demand::Attributes { ino: 999 }));
    let read = |offset, len| Demand::Read {
        ino: dir + 1,
        offset,
        len,
    };
    assert!(wb.would_not_wait(read(0, 4096)), "a cached page");
    assert!(wb.would_not_wait(read(100, 10)));
    assert!(!wb.would_not_wait(read(0, 8192)), "a page not cached");
    drop(sink);
}

#[test]
fn a_join_moves_the_linger_on_within_its_span() {
    use super::queue::META_LINGER_SPAN_MAX;
    use std::time::Duration;
    let (wb, _sink, _store, _m) = lingering_layer(19);
    create_in(&wb, 1, 33, "d");
    let before = {
        let st = super::ack::lock(&wb.shared.state);
        st.txns.values().last().unwrap().not_before.unwrap()
    };
    // The file's first write joins the create: the burst goes on.
    write(&wb, 33, 0, b"3\n", 2);
    let mut st = super::ack::lock(&wb.shared.state);
    assert_eq!(st.txns.len(), 1, "the write joined the create");
    let t = st.txns.values_mut().last().unwrap();
    assert!(
        t.not_before.unwrap() > before,
        "the write moved the linger on"
    );
    // The rule itself, on a 2 ms linger.
    let linger = Duration::from_millis(2);
    let formed = t.formed;
    t.not_before = Some(formed + linger);
    t.linger_on(formed + Duration::from_micros(1500), linger);
    assert_eq!(t.not_before, Some(formed + Duration::from_micros(3500)));
    // A change long after: never past the span from the forming.
    t.linger_on(formed + Duration::from_secs(1), linger);
    assert_eq!(t.not_before, Some(formed + linger * META_LINGER_SPAN_MAX));
    // An earlier `now` never brings the send closer.
    t.linger_on(formed, linger);
    assert_eq!(t.not_before, Some(formed + linger * META_LINGER_SPAN_MAX));
    // A sync cut the linger: a later join does not bring it back.
    t.not_before = None;
    t.linger_on(formed + linger, linger);
    assert_eq!(t.not_before, None);
}

#[test]
fn the_attributes_table_stays_within_its_share_by_what_it_allocates() {
    let (wb, _sink, _store, _m) = layer(OverwritePolicy::Cow, 1, 17);
    let share =
        super::budget::MetaShares::of(super::testkit::cfg(OverwritePolicy::Cow).meta_cache_bytes)
            .attrs;
    let fits = share / ATTR_ENTRY_BYTES;
    let mut ino = 100;
    // Ten times what the share holds, acknowledged a batch at a time: the
    // attributes are clean then, and the table may keep only what fits.
    for _ in 0..20 {
        for _ in 0..fits / 2 {
            create(&wb, ino);
            ino += 1;
        }
        wb.sync(None).unwrap();
        let (held, slots) = {
            let st = super::ack::lock(&wb.shared.state);
            (st.attrs.len() as u64, st.attrs.capacity() as u64)
        };
        let allocated = slots * ATTR_ENTRY_BYTES;
        assert!(
            allocated <= share,
            "{held} attribute sets in a table of {allocated} bytes, over the share of {share}"
        );
        // Still a cache: at least a quarter of what the share holds.
        assert!(held >= fits / 4, "{held} attribute sets kept");
    }
    // What was evicted is read back from the store.
    assert_eq!(wb.get_inode(100).unwrap().map(|i| i.size), Some(0));
}
