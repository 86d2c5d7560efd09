//! The process's one clock for what is measured in minutes and hours: pull times and image
//! ages, tag confirmations, token lifetimes. It is the wall clock (or the monotonic one, for
//! lifetimes) plus an offset that only the tests move (`test-hooks`), so time-dependent
//! behaviour is tested by moving time forward instead of sleeping through it.
//!
//! Short deadlines (timeouts, Retry-After, negative answers) use tokio's clock instead, which
//! unit tests pause and advance.

use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "test-hooks")]
use std::time::Duration;
use std::time::Instant;

/// Milliseconds since the Unix epoch by the wall clock (0 before 1970).
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Default)]
pub struct Clock {
    /// Milliseconds added to the real clocks.
    offset: AtomicU64,
}

impl Clock {
    /// Milliseconds since the Unix epoch, as this clock tells it.
    pub fn now(&self) -> u64 {
        now_millis().saturating_add(self.offset.load(Ordering::Relaxed))
    }

    /// A monotonic instant, as this clock tells it (for lifetimes).
    pub fn instant(&self) -> Instant {
        let offset = std::time::Duration::from_millis(self.offset.load(Ordering::Relaxed));
        let now = Instant::now();
        now.checked_add(offset).unwrap_or(now)
    }

    /// Moves this clock forward (tests).
    #[cfg(feature = "test-hooks")]
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                Some(o.saturating_add(by))
            })
            .ok();
    }
}
