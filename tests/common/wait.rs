//! Waiting for a condition, never for a time: [`wait_until`] polls until the condition holds or
//! its bound has passed, and says which. A test that sleeps instead hopes the machine is fast
//! enough; a test that waits without a bound hangs the suite when the condition never comes.

use std::time::{Duration, Instant};

/// What a polled condition returns: `true` or `Some(value)` once it holds.
pub trait Ready {
    /// What [`wait_until`] returns once the condition holds.
    type Value;
    /// `Some` once the condition holds.
    fn ready(self) -> Option<Self::Value>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `condition` every `interval` until it holds (`true` or `Some`) or `timeout` has
/// passed; `None` means it did not hold in time. The condition is always asked at least once,
/// and once more at the deadline.
pub fn wait_until<R: Ready>(
    timeout: Duration,
    interval: Duration,
    mut condition: impl FnMut() -> R,
) -> Option<R::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().ready() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}
