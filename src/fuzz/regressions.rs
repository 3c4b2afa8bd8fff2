//! Every input a fuzz target crashed on, kept in
//! `fuzz/regressions/<target>/`, replayed through the target's entry point
//! without a fuzzer: each must now pass.

use std::fs;
use std::path::Path;

fn replay(target: &str, entry: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let Ok(files) = fs::read_dir(&dir) else {
        return;
    };
    let mut names: Vec<_> = files.map(|f| f.unwrap().path()).collect();
    names.sort();
    for path in names {
        let data = fs::read(&path).unwrap();
        eprintln!("replaying {}", path.display());
        entry(&data);
    }
}

#[test]
fn fuse_stream_regressions_pass() {
    replay("fuse_stream", super::fuse_stream);
}

#[test]
fn wire_frames_regressions_pass() {
    replay("wire_frames", super::wire_frames);
}

#[test]
fn handshake_regressions_pass() {
    replay("handshake", super::handshake);
}

#[test]
fn engine_decode_regressions_pass() {
    replay("engine_decode", super::engine_decode);
}

/// The seed inputs scripts/fuzz starts from are files in
/// `fuzz/seeds/<target>/`, written from [`super::seeds`]; this test
/// fails when they differ and, with `POHMELFS_WRITE_SEEDS=1`, writes them.
#[test]
fn seed_files_match_the_seeds_in_the_code() {
    let write = std::env::var_os("POHMELFS_WRITE_SEEDS").is_some();
    for target in ["fuse_stream", "wire_frames", "handshake", "engine_decode"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let seeds = super::seeds(target).unwrap();
        if write {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds.iter().enumerate() {
                fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
            }
        }
        let count = fs::read_dir(&dir).map_or(0, |d| d.count());
        assert_eq!(
            count,
            seeds.len(),
            "{}: run POHMELFS_WRITE_SEEDS=1 cargo test --lib seed_files",
            dir.display()
        );
        for (i, seed) in seeds.iter().enumerate() {
            let file = fs::read(dir.join(format!("seed-{i}"))).unwrap_or_default();
            assert!(file == *seed, "{target} seed-{i} is stale: run POHMELFS_WRITE_SEEDS=1 cargo test --lib seed_files");
        }
    }
}
