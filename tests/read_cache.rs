//! The local read cache (`--cache-dir`) in front of a real `pohmelfs store`
//! on loopback, reached through a relay that counts the bytes the server
//! sends: a file read a second time through a fresh daemon (a new
//! transaction layer, so an empty page cache, on the same cache
//! directory) costs no data round trip, whether the cache got the data
//! from the write's ack or from the first read; a damaged cache file is
//! detected and read from the server again. On `s3://` (moto), the
//! cache survives the daemon's own reopen and is emptied when another
//! writer opened the volume meanwhile.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pohmelfs::metrics::Metrics;
use pohmelfs::store::readcache::CacheConfig;
use pohmelfs::store::{Inode, Store, WriteData, BLOCK_SIZE};
use pohmelfs::writeback::{open_with_cache, TxnConfig, WritebackStore};
use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{skip_requested, Moto, ScratchDir, StoreServer};

const SECRET: &str = "test-secret-read-cache";
const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const INO: u64 = 1000;
const FILE_BYTES: usize = 2 << 20;

/// A TCP relay to `server` that counts the bytes coming back from it.
struct Relay {
    addr: String,
    from_server: Arc<AtomicU64>,
}

impl Relay {
    fn start(server: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let from_server = Arc::new(AtomicU64::new(0));
        let (server, counter) = (server.to_owned(), Arc::clone(&from_server));
        // The threads end with the test process; every connection ends
        // when either side closes.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(&server) else {
                    return;
                };
                let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || pump(client, upstream, None));
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || pump(u2, c2, Some(counter)));
            }
        });
        Relay { addr, from_server }
    }

    fn bytes_from_server(&self) -> u64 {
        self.from_server.load(Ordering::SeqCst)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, counter: Option<Arc<AtomicU64>>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = &counter {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

struct Setup {
    dir: ScratchDir,
    _server: StoreServer,
    relay: Relay,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = ScratchDir::new(&format!("it-readcache-{name}")).unwrap();
        let data = format!("file://{}/volumes", dir.path().display());
        let server =
            StoreServer::start(POHMELFS, dir.path(), "store", &data, Some(SECRET)).unwrap();
        let relay = Relay::start(server.addr());
        Setup {
            dir,
            _server: server,
            relay,
        }
    }

    /// A fresh daemon's transaction layer (empty page cache) over the
    /// volume, with the read cache in `cache`.
    fn daemon(&self, cache: &Path) -> (Arc<WritebackStore>, Arc<Metrics>) {
        let url = format!(
            "pohmel://{}/vol?secret_file={}",
            self.relay.addr,
            secret_file(self.dir.path()).display()
        );
        let metrics = Arc::new(Metrics::default());
        let cfg = CacheConfig {
            dir: cache.to_owned(),
            size_bytes: 64 << 20,
        };
        let store =
            open_with_cache(&url, TxnConfig::default(), Some(&cfg), Arc::clone(&metrics)).unwrap();
        (store, metrics)
    }

    fn cache_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn contents() -> Vec<u8> {
    (0..FILE_BYTES)
        .map(|i| (i % 253) as u8 ^ (i >> 16) as u8)
        .collect()
}

fn write_file(store: &WritebackStore, data: &[u8]) {
    let chunk = 256 << 10;
    for (i, part) in data.chunks(chunk).enumerate() {
        let offset = (i * chunk) as u64;
        let inode = Inode::regular(INO, offset + part.len() as u64);
        store
            .write(INO, offset, WriteData::from(part.to_vec()), inode)
            .unwrap();
    }
    store.sync(None).unwrap();
}

/// Read the file through `store`; the bytes the server sent meanwhile.
fn read_file(setup: &Setup, store: &WritebackStore) -> (Vec<u8>, u64) {
    let before = setup.relay.bytes_from_server();
    let mut buf = vec![0u8; FILE_BYTES];
    for (i, part) in buf.chunks_mut(128 << 10).enumerate() {
        // The filesystem layer asks for the inode before each read.
        assert!(store.get_inode(INO).unwrap().is_some());
        store.read(INO, (i * (128 << 10)) as u64, part).unwrap();
    }
    (buf, setup.relay.bytes_from_server() - before)
}

/// Far below one block: what a read that made no data round trip may
/// have cost in other messages.
const NO_DATA: u64 = BLOCK_SIZE / 4;

#[test]
fn acknowledged_data_is_read_back_without_a_round_trip() {
    let setup = Setup::new("ack");
    let cache = setup.cache_dir("cache");
    let data = contents();
    {
        let (store, _) = setup.daemon(&cache);
        write_file(&store, &data);
    }
    let (store, metrics) = setup.daemon(&cache);
    let (read, sent) = read_file(&setup, &store);
    assert!(read == data, "the file reads back as written");
    assert!(
        sent < NO_DATA,
        "the server sent {sent} bytes for a cached file"
    );
    assert_eq!(metrics.read_cache_misses.get(), 0);
    assert_eq!(
        metrics.read_cache_hits.get(),
        FILE_BYTES as u64 / BLOCK_SIZE
    );
    // Blocks on this machine are read when asked, like segment files:
    // neither fetched ahead nor kept as clean pages.
    assert_eq!(
        metrics.read_ahead.get(),
        0,
        "no read-ahead of cached blocks"
    );
    assert_eq!(metrics.cache_hits.get(), 0, "no clean pages kept");
}

#[test]
fn a_second_cold_read_makes_no_round_trip_and_damage_is_refetched() {
    let setup = Setup::new("fill");
    let data = contents();
    {
        // Written through a daemon without this cache.
        let (store, _) = setup.daemon(&setup.cache_dir("writer"));
        write_file(&store, &data);
    }
    let cache = setup.cache_dir("reader");
    {
        let (store, metrics) = setup.daemon(&cache);
        let (read, sent) = read_file(&setup, &store);
        assert!(read == data);
        assert!(sent >= FILE_BYTES as u64, "the first read fetched the file");
        assert!(metrics.read_cache_misses.get() > 0);
    }
    {
        let (store, metrics) = setup.daemon(&cache);
        let (read, sent) = read_file(&setup, &store);
        assert!(read == data);
        assert!(
            sent < NO_DATA,
            "the server sent {sent} bytes for a cached file"
        );
        assert_eq!(metrics.read_cache_misses.get(), 0);
    }
    // Damage one block file: one byte flipped near its end.
    let block = cache_files(&cache)
        .into_iter()
        .next()
        .expect("a block file");
    let mut bytes = std::fs::read(&block).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x5a;
    std::fs::write(&block, bytes).unwrap();
    let (store, metrics) = setup.daemon(&cache);
    let (read, sent) = read_file(&setup, &store);
    assert!(read == data, "the damaged block was not served");
    assert_eq!(metrics.read_cache_corrupt.get(), 1);
    assert!(sent >= BLOCK_SIZE, "the damaged block came from the server");
    assert!(
        sent < 2 * BLOCK_SIZE + NO_DATA,
        "only the damaged block: {sent}"
    );
}

fn cache_files(cache: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in std::fs::read_dir(cache.join("blocks")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            files.push(f.unwrap().path());
        }
    }
    files.sort();
    files
}

/// A transaction layer over the `s3://` volume `url` with the read cache
/// in `cache`.
fn s3_daemon(url: &str, cache: &Path) -> (Arc<WritebackStore>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let cfg = CacheConfig {
        dir: cache.to_owned(),
        size_bytes: 64 << 20,
    };
    let store =
        open_with_cache(url, TxnConfig::default(), Some(&cfg), Arc::clone(&metrics)).unwrap();
    (store, metrics)
}

fn read_whole(store: &WritebackStore, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    store.read(INO, 0, &mut buf).unwrap();
    buf
}

#[test]
fn an_s3_cache_is_kept_across_reopens_and_emptied_after_another_writer() {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the read cache's S3 test") {
        return;
    }
    let dir = ScratchDir::new("it-readcache-s3").unwrap();
    let moto = Moto::start(dir.path(), "pohmelfs-readcache").expect("start moto_server");
    let url = moto.url("volumes/rc");
    let cache = dir.join("cache");
    let first: Vec<u8> = contents()[..4 * BLOCK_SIZE as usize].to_vec();
    {
        let (store, _) = s3_daemon(&url, &cache);
        write_file(&store, &first);
    }
    {
        let (store, metrics) = s3_daemon(&url, &cache);
        assert!(read_whole(&store, first.len()) == first);
        assert_eq!(metrics.read_cache_misses.get(), 0, "kept across a reopen");
        assert_eq!(metrics.read_cache_hits.get(), 4);
    }
    // Another writer, without this cache, changes the file.
    let second: Vec<u8> = first.iter().map(|b| b ^ 0xff).collect();
    {
        let (store, _) = s3_daemon(&url, &dir.join("other-cache"));
        write_file(&store, &second);
    }
    let (store, metrics) = s3_daemon(&url, &cache);
    assert!(
        read_whole(&store, second.len()) == second,
        "no stale block served"
    );
    assert_eq!(metrics.read_cache_hits.get(), 0);
}
