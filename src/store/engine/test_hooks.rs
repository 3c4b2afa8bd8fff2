//! Test-only hooks: writes that no [`crate::store::Op`] can express (the
//! checker's tests damage volumes with them), and ways to look inside a
//! live engine or stop it as a crash would.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use slatedb::Db;

use super::apply::Puts;
use super::{codec, keys, Segments, SlateStore};
use crate::store::Dirent;

impl SlateStore {
    /// Write `puts` straight to the engine (and the record cache), after
    /// every group acknowledged so far is in it (else a group's engine
    /// write, still on its way, could land on top).
    fn raw_write(&self, puts: Puts) {
        self.block_on(async {
            self.await_applied().await.expect("groups applied");
            self.write_puts(&puts).await.expect("raw engine write");
        });
    }

    /// Put `dirent` into the by-cookie index of `parent` only.
    pub(crate) fn raw_put_cookie_entry(&self, parent: u64, dirent: &Dirent) {
        self.raw_write(vec![(
            keys::dirent_by_cookie(parent, dirent.cookie),
            Some(codec::encode_dirent_by_cookie(dirent).into()),
        )]);
    }

    /// Delete the by-cookie index record `(parent, cookie)` only.
    pub(crate) fn raw_delete_cookie_entry(&self, parent: u64, cookie: u64) {
        self.raw_write(vec![(keys::dirent_by_cookie(parent, cookie), None)]);
    }

    /// Store `value` under `key` as is.
    pub(crate) fn raw_put(&self, key: &[u8], value: &[u8]) {
        self.raw_write(vec![(key.to_vec(), Some(Bytes::copy_from_slice(value)))]);
    }

    /// Put an applied-transaction record.
    pub(crate) fn raw_put_applied(&self, session: u64, txn_id: u64) {
        self.raw_put(&keys::applied(session, txn_id), &codec::encode_bytes(&[]));
    }

    /// Set the space counters.
    pub(crate) fn raw_put_counters(&self, blocks: u64, inodes: u64, meta_bytes: u64) {
        self.raw_put(
            &keys::stats(),
            &codec::encode_counters(&codec::Counters {
                blocks,
                inodes,
                meta_bytes,
            }),
        );
    }

    /// Stop as a crash would: no clean close.
    pub(crate) fn crash_for_test(self) {
        self.crash();
    }

    /// The key of inode `ino`'s record.
    pub(crate) fn inode_key(ino: u64) -> Vec<u8> {
        keys::inode(ino)
    }

    /// Stop as a crash would: no final flush nor checkpoint, the runtime's
    /// tasks dropped wherever they are. The groups on their way to the
    /// engine get there first (bounded): one still writing when the
    /// engine's tasks go panics inside SlateDB ("sending into a closed
    /// channel"), which a process that dies never prints, and the next
    /// open replays them from the commit log all the same.
    pub(super) fn crash(self) {
        let _ = self.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), self.await_applied()).await
        });
        self.closed.store(true, Ordering::Release);
        drop(self);
    }

    pub(super) fn raw_db(&self) -> &Db {
        &self.db
    }

    /// The value stored under `key`.
    pub(super) fn raw_get_for_test(&self, key: &[u8]) -> bytes::Bytes {
        self.block_on(self.get(key.to_vec()))
            .expect("get")
            .expect("a stored record")
    }

    /// Wait until the reclaimer has done what commits so far freed (a
    /// checkpoint first hands it over).
    pub(super) fn reclaimed(&self) {
        if let Some(cp) = &self.checkpoint {
            self.block_on(self.await_applied()).expect("groups applied");
            self.block_on(cp.run()).expect("checkpoint");
        }
        if let Some(r) = &self.reclaimer {
            r.barrier();
        }
    }

    /// Wait until the reclaimer has done what it was handed, without a
    /// checkpoint.
    pub(super) fn reclaimer_barrier(&self) {
        if let Some(r) = &self.reclaimer {
            r.barrier();
        }
    }

    /// How many checkpoints moved the commit log's tail.
    pub(super) fn checkpoints(&self) -> u64 {
        self.checkpoint.as_ref().map_or(0, |cp| cp.count())
    }

    /// The segment files, on a `file://` volume.
    pub(super) fn segments(&self) -> &Segments {
        self.segments.as_deref().expect("a file:// volume")
    }

    pub(super) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt().expect("runtime of a live store").block_on(f)
    }
}
