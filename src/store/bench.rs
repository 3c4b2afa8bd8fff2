//! The store commit benchmark behind `pohmelfs bench-store`: transactions
//! of one write each, committed from several threads, with the latency of
//! every commit recorded. It prints figures; it asserts nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Inode, Op, Store, StoreError, Txn, WriteData};

/// What one run measured.
#[derive(Clone, Debug)]
pub struct CommitFigures {
    pub txn_bytes: usize,
    pub threads: usize,
    pub commits: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub commits_per_sec: f64,
    pub mib_per_sec: f64,
}

/// Commit `count` transactions of `txn_bytes` each from `threads` threads.
/// Inode numbers start at `first_ino` so runs do not overlap.
pub fn commit_bench(
    store: Arc<dyn Store>,
    txn_bytes: usize,
    count: usize,
    threads: usize,
    first_ino: u64,
) -> Result<CommitFigures, StoreError> {
    let threads = threads.max(1);
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (store, latencies) = (Arc::clone(&store), Arc::clone(&latencies));
            std::thread::spawn(move || -> Result<(), StoreError> {
                let data: WriteData = (0..txn_bytes)
                    .map(|i| (i * 31 + t) as u8)
                    .collect::<Vec<u8>>()
                    .into();
                for i in (t..count).step_by(threads) {
                    let ino = first_ino + i as u64;
                    let mut txn = Txn::new();
                    txn.push(Op::PutInode(Inode::regular(ino, txn_bytes as u64)));
                    txn.push(Op::Write {
                        ino,
                        offset: 0,
                        data: data.clone(),
                    });
                    let t0 = Instant::now();
                    store.commit(txn)?;
                    let dt = t0.elapsed();
                    latencies.lock().unwrap_or_else(|e| e.into_inner()).push(dt);
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| StoreError::Io(std::io::Error::other("bench thread panicked")))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut l = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    l.sort();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(CommitFigures {
        txn_bytes,
        threads,
        commits: l.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        max: l.last().copied().unwrap_or_default(),
        commits_per_sec: l.len() as f64 / elapsed,
        mib_per_sec: (l.len() * txn_bytes) as f64 / elapsed / (1 << 20) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_counts_every_commit_and_the_data_lands() {
        let store = Arc::new(crate::store::mem::MemStore::new(1 << 30));
        let f = commit_bench(store.clone(), 4096, 40, 3, 1000).unwrap();
        assert_eq!(f.commits, 40);
        assert!(f.p50 <= f.p99 && f.p99 <= f.max);
        for ino in 1000..1040 {
            assert_eq!(store.get_inode(ino).unwrap().unwrap().size, 4096);
        }
    }
}
