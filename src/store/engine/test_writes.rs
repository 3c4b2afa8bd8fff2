//! Test-only writes that no [`crate::store::Op`] can express: the
//! checker's tests damage volumes with them.

use super::{codec, keys, SlateStore};
use crate::store::Dirent;

impl SlateStore {
    /// Put `dirent` into the by-cookie index of `parent` only.
    pub(crate) fn raw_put_cookie_entry(&self, parent: u64, dirent: &Dirent) {
        let db = &self.db;
        self.rt()
            .expect("runtime of a live store")
            .block_on(db.put(
                keys::dirent_by_cookie(parent, dirent.cookie),
                codec::encode_dirent_by_cookie(dirent),
            ))
            .expect("put by-cookie entry");
    }

    /// Delete the by-cookie index record `(parent, cookie)` only.
    pub(crate) fn raw_delete_cookie_entry(&self, parent: u64, cookie: u64) {
        self.rt()
            .expect("runtime of a live store")
            .block_on(self.db.delete(keys::dirent_by_cookie(parent, cookie)))
            .expect("delete by-cookie entry");
    }

    /// Store `value` under `key` as is.
    pub(crate) fn raw_put(&self, key: &[u8], value: &[u8]) {
        self.rt()
            .expect("runtime of a live store")
            .block_on(self.db.put(key, value))
            .expect("raw put");
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
}
