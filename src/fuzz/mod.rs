//! Entry points of the fuzz targets in `fuzz/` (cargo feature `fuzzing`;
//! also built for the tests, which replay every kept crash input from
//! `fuzz/regressions/`). Each takes the fuzzer's bytes and must not panic
//! on any of them; a panic or a failed check is a bug of the daemon, not of
//! the input. `scripts/fuzz` builds and runs them; `docs/security.md` says
//! what each covers and how long they ran.
//!
//! * [`fuse_stream`] — FUSE requests in descriptor chains of any layout,
//!   through the device's checks, fuse-backend-rs and the filesystem over
//!   the in-memory store (`device/fuzz.rs`).
//! * [`wire_frames`] — the wire protocol's frame and message decoders and
//!   their validation, both directions (`wire.rs`).
//! * [`handshake`] — a store server's handshake on a connection whose
//!   client sends what the input says, then the requests after it
//!   (`net/server/fuzz.rs`).
//! * [`engine_decode`] — the engine's record key and value decoders and
//!   its extent functions (`store/engine/fuzz.rs`).
//!
//! Nothing here is part of the daemon's API: it exists for the fuzzer.

pub(crate) mod frames;
#[cfg(test)]
mod regressions;
mod wire;

pub use crate::device::fuzz::{fuse_stream, seeds as fuse_stream_seeds};
pub use crate::net::server::fuzz::handshake;
pub use crate::store::engine::fuzz::engine_decode;
pub use wire::wire_frames;

mod seeds;

/// The seed inputs of `target`, or `None` for a target that does not exist.
pub fn seeds(target: &str) -> Option<Vec<Vec<u8>>> {
    Some(match target {
        "fuse_stream" => fuse_stream_seeds(),
        "wire_frames" => seeds::wire_frames(),
        "handshake" => seeds::handshake(),
        "engine_decode" => seeds::engine_decode(),
        _ => return None,
    })
}
