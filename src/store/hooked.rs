//! The unit tests' store with a hook: it passes every call through to the
//! store it wraps, counts the reads that reach that store, asks a closure
//! before each commit and each reservation of ids, which may fail it (an
//! interrupted destination, a lost connection, an unreachable store), and
//! calls one after each data read, which may hold it (a store answering
//! late). Tests that need one method changed build it here rather than
//! writing a `Store` of their own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::store::delegate::delegate_store;
use crate::store::{ReadData, Store, StoreError, Txn};

/// What a [`Hooked`] store asks before each commit.
type CommitHook = Box<dyn Fn(&Txn) -> Result<(), StoreError> + Send + Sync>;

/// What a [`Hooked`] store calls with the inode after each data read.
type ReadHook = Box<dyn Fn(u64) + Send + Sync>;

/// What a [`Hooked`] store asks before each reservation of ids.
type ReserveHook = Box<dyn Fn(u64) -> Result<(), StoreError> + Send + Sync>;

/// A store in front of `inner` (see the module documentation).
pub struct Hooked<S: Store + ?Sized> {
    /// The store every call reaches.
    pub inner: Arc<S>,
    /// Reads ([`Store::read`]) that reached `inner`.
    pub reads: AtomicU64,
    before_commit: CommitHook,
    after_read: ReadHook,
    before_reserve: ReserveHook,
    name: &'static str,
}

impl<S: Store + ?Sized> Hooked<S> {
    /// Pass everything through to `inner`; `name` is what `describe` says.
    pub fn new(inner: Arc<S>, name: &'static str) -> Hooked<S> {
        Hooked {
            inner,
            reads: AtomicU64::new(0),
            before_commit: Box::new(|_| Ok(())),
            after_read: Box::new(|_| ()),
            before_reserve: Box::new(|_| Ok(())),
            name,
        }
    }

    /// Run `hook` before each commit; an `Err` fails the commit without
    /// passing it on.
    pub fn before_commit(
        mut self,
        hook: impl Fn(&Txn) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Hooked<S> {
        self.before_commit = Box::new(hook);
        self
    }

    /// Run `hook` with the inode after each [`Store::read_data`] has read
    /// `inner` and before it returns: blocking in it holds the answer.
    pub fn after_read(mut self, hook: impl Fn(u64) + Send + Sync + 'static) -> Hooked<S> {
        self.after_read = Box::new(hook);
        self
    }

    /// Run `hook` with the count before each [`Store::reserve_ids`]; an
    /// `Err` fails the reservation without passing it on.
    pub fn before_reserve(
        mut self,
        hook: impl Fn(u64) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Hooked<S> {
        self.before_reserve = Box::new(hook);
        self
    }
}

impl<S: Store + ?Sized> Store for Hooked<S> {
    delegate_store!(inner: metadata_reads, sync);

    fn reserve_ids(&self, count: u64) -> Result<u64, StoreError> {
        (self.before_reserve)(count)?;
        self.inner.reserve_ids(count)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read(ino, offset, buf)
    }

    fn read_data(&self, ino: u64, offset: u64, len: usize) -> Result<ReadData, StoreError> {
        let mut buf = vec![0u8; len];
        self.read(ino, offset, &mut buf)?;
        (self.after_read)(ino);
        Ok(ReadData::from(buf))
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        (self.before_commit)(&txn)?;
        self.inner.commit(txn)
    }

    fn describe(&self) -> String {
        self.name.into()
    }
}
