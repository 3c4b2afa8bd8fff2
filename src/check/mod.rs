//! Correctness instruments: tools that look for bugs in pohmelfs (and in
//! any filesystem) from the outside, run by hand, by CI and by the VM tests.
//!
//! * [`volume`] — `pohmelfs check`: reads a volume read-only and reports
//!   every broken invariant of its records (entries, link counts, parents,
//!   reachability, data past the size, orphaned records, counters, extents
//!   against their segment files, leaked segment space).
//! * [`torture`] — `pohmelfs torture`: seeded random operations on a real
//!   directory, each checked against an in-memory model; a saved model can
//!   be verified again after an unmount, a restart or a crash.
//!
//! Neither repairs anything; `docs/correctness.md` says how to run them and
//! what a crash may lose.

mod problem;
mod segments;
pub mod torture;
pub mod volume;
