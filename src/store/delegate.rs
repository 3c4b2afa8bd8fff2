//! [`delegate_store!`]: the [`Store`](crate::store::Store) methods a
//! wrapper passes through to the store it wraps unchanged, written once.
//! A wrapper (the read cache's [`CachedStore`], the tests' hooked store)
//! names the field that holds the inner store and the methods to pass
//! through, and writes only the methods it changes. It must never pass
//! through a method the wrapper has to see (a cache writes `commit`).
//!
//! [`CachedStore`]: crate::store::readcache::CachedStore

/// Inside an `impl Store for Wrapper` block, define each named method as a
/// call of the same method on `self.$inner`, with the same arguments:
///
/// ```ignore
/// impl Store for Wrapper {
///     delegate_store!(inner: get_inode, lookup, sync);
///     fn commit(&self, txn: Txn) -> Result<(), StoreError> { ... }
/// }
/// ```
///
/// Every method of the trait may be named; those with a default body
/// (`flush`, `would_not_wait`, …) then call the inner store's instead of the default.
/// `metadata_reads` names the required methods that read what is not file
/// data: `get_inode`, `lookup`, `readdir`, `next_data`, `next_hole`,
/// `readlink`, `get_xattr`, `list_xattr` and `statfs`; `metadata` names
/// those and `reserve_ids`.
macro_rules! delegate_store {
    ($inner:tt: $($method:ident),+ $(,)?) => {
        $($crate::store::delegate::delegate_store!(@one $inner $method);)+
    };
    (@one $inner:tt metadata) => {
        $crate::store::delegate::delegate_store!($inner: metadata_reads, reserve_ids);
    };
    (@one $inner:tt metadata_reads) => {
        $crate::store::delegate::delegate_store!(
            $inner: get_inode,
            lookup,
            readdir,
            next_data,
            next_hole,
            readlink,
            get_xattr,
            list_xattr,
            statfs,
        );
    };
    (@one $inner:tt get_inode) => {
        fn get_inode(
            &self,
            ino: u64,
        ) -> Result<Option<$crate::store::Inode>, $crate::store::StoreError> {
            self.$inner.get_inode(ino)
        }
    };
    (@one $inner:tt lookup) => {
        fn lookup(
            &self,
            parent: u64,
            name: &[u8],
        ) -> Result<Option<$crate::store::Dirent>, $crate::store::StoreError> {
            self.$inner.lookup(parent, name)
        }
    };
    (@one $inner:tt readdir) => {
        fn readdir(
            &self,
            parent: u64,
            after: u64,
            max: usize,
        ) -> Result<Vec<$crate::store::Dirent>, $crate::store::StoreError> {
            self.$inner.readdir(parent, after, max)
        }
    };
    (@one $inner:tt read) => {
        fn read(
            &self,
            ino: u64,
            offset: u64,
            buf: &mut [u8],
        ) -> Result<(), $crate::store::StoreError> {
            self.$inner.read(ino, offset, buf)
        }
    };
    (@one $inner:tt read_data) => {
        fn read_data(
            &self,
            ino: u64,
            offset: u64,
            len: usize,
        ) -> Result<$crate::store::ReadData, $crate::store::StoreError> {
            self.$inner.read_data(ino, offset, len)
        }
    };
    (@one $inner:tt next_data) => {
        fn next_data(
            &self,
            ino: u64,
            offset: u64,
        ) -> Result<Option<u64>, $crate::store::StoreError> {
            self.$inner.next_data(ino, offset)
        }
    };
    (@one $inner:tt next_hole) => {
        fn next_hole(&self, ino: u64, offset: u64) -> Result<u64, $crate::store::StoreError> {
            self.$inner.next_hole(ino, offset)
        }
    };
    (@one $inner:tt readlink) => {
        fn readlink(&self, ino: u64) -> Result<Option<Vec<u8>>, $crate::store::StoreError> {
            self.$inner.readlink(ino)
        }
    };
    (@one $inner:tt get_xattr) => {
        fn get_xattr(
            &self,
            ino: u64,
            name: &[u8],
        ) -> Result<Option<Vec<u8>>, $crate::store::StoreError> {
            self.$inner.get_xattr(ino, name)
        }
    };
    (@one $inner:tt list_xattr) => {
        fn list_xattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, $crate::store::StoreError> {
            self.$inner.list_xattr(ino)
        }
    };
    (@one $inner:tt statfs) => {
        fn statfs(&self) -> Result<$crate::store::StoreStats, $crate::store::StoreError> {
            self.$inner.statfs()
        }
    };
    (@one $inner:tt reserve_ids) => {
        fn reserve_ids(&self, count: u64) -> Result<u64, $crate::store::StoreError> {
            self.$inner.reserve_ids(count)
        }
    };
    (@one $inner:tt commit) => {
        fn commit(&self, txn: $crate::store::Txn) -> Result<(), $crate::store::StoreError> {
            self.$inner.commit(txn)
        }
    };
    (@one $inner:tt wait_for_room) => {
        fn wait_for_room(&self, bytes: u64) -> Result<(), $crate::store::StoreError> {
            self.$inner.wait_for_room(bytes)
        }
    };
    (@one $inner:tt would_not_wait) => {
        fn would_not_wait(&self, demand: $crate::store::Demand) -> bool {
            self.$inner.would_not_wait(demand)
        }
    };
    (@one $inner:tt reads_locally) => {
        fn reads_locally(&self, ino: u64, offset: u64, len: u64) -> bool {
            self.$inner.reads_locally(ino, offset, len)
        }
    };
    (@one $inner:tt sync) => {
        fn sync(&self, ino: Option<u64>) -> Result<(), $crate::store::StoreError> {
            self.$inner.sync(ino)
        }
    };
    (@one $inner:tt flush) => {
        fn flush(&self, ino: u64) -> Result<(), $crate::store::StoreError> {
            self.$inner.flush(ino)
        }
    };
    (@one $inner:tt forgotten) => {
        fn forgotten(&self, ino: u64) {
            self.$inner.forgotten(ino)
        }
    };
}

pub(crate) use delegate_store;
