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
