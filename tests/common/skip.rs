//! Skipped tests say so, in one form: the line `SKIPPED: <test>: <reason>` on stderr, which
//! `scripts/test` counts (and, under CI, fails on unless the machine cannot run the test). A
//! skipped test still passes as far as `cargo test` is concerned; the line is what tells.

/// The running test's name: libtest names each test's thread after the test.
fn current_test() -> String {
    std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .unwrap_or("unnamed test")
        .to_owned()
}

/// Prints `SKIPPED: <test>: <reason>` to stderr; the caller then returns. Like any output of a
/// passing test, libtest shows the line only with `--show-output` or `--nocapture`, which is how
/// `scripts/test` runs the tests, and then always at the start of a line.
pub fn skipped(reason: &str) {
    eprintln!("SKIPPED: {}: {reason}", current_test());
}

/// True, after printing the skip line, when the environment variable `var` asks to skip
/// (`1`); `what` names what would not run.
pub fn skip_requested(var: &str, what: &str) -> bool {
    let asked = std::env::var(var).as_deref() == Ok("1");
    if asked {
        skipped(&format!("{var}=1 skips {what}"));
    }
    asked
}
