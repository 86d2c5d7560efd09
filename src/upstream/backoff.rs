//! Upstream etiquette for rate limits: after a 429, this upstream is not asked again until its
//! `Retry-After` has passed. Requests meanwhile are answered here with a 429 carrying the time
//! that remains, so a mirror in front of many clients sends the upstream one request per
//! window, not one per client (the cache still serves what it holds, stale).
//!
//! Time is tokio's clock, so tests drive it with `tokio::time::pause`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a 429 without a usable `Retry-After` holds requests back.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);
/// The longest hold: an upstream's number is clamped, so a hostile or mistaken `Retry-After`
/// cannot keep the mirror from its upstream for a day.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// When this upstream may be asked again, if it said to wait.
#[derive(Debug, Default)]
pub struct Backoff {
    until: Mutex<Option<Instant>>,
}

impl Backoff {
    /// Records a 429: hold requests for `retry_after` seconds (clamped), or the default. A
    /// shorter answer never shortens a hold already in force.
    pub fn hold(&self, retry_after: Option<u64>) {
        let wait = retry_after
            .map(Duration::from_secs)
            .filter(|wait| !wait.is_zero())
            .unwrap_or(DEFAULT_BACKOFF)
            .min(MAX_BACKOFF);
        let until = Instant::now() + wait;
        let mut held = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none_or(|current| current < until) {
            *held = Some(until);
        }
    }

    /// The whole seconds left of a hold in force (at least 1), or `None` when the upstream may
    /// be asked.
    pub fn remaining(&self) -> Option<u64> {
        let mut held = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let until = (*held)?;
        let now = Instant::now();
        if now >= until {
            *held = None;
            return None;
        }
        let left = until - now;
        // Rounded up: a client told "0" would retry at once and be held back again.
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hold_lasts_its_retry_after_and_counts_down() {
        let backoff = Backoff::default();
        assert_eq!(backoff.remaining(), None);
        backoff.hold(Some(30));
        assert_eq!(backoff.remaining(), Some(30));
        tokio::time::advance(Duration::from_millis(10_500)).await;
        assert_eq!(backoff.remaining(), Some(20));
        // A shorter answer does not shorten it.
        backoff.hold(Some(1));
        assert_eq!(backoff.remaining(), Some(20));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(backoff.remaining(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn missing_zero_and_huge_retry_after_are_bounded() {
        for (given, expected) in [
            (None, DEFAULT_BACKOFF),
            (Some(0), DEFAULT_BACKOFF),
            (Some(u64::MAX), MAX_BACKOFF),
        ] {
            let backoff = Backoff::default();
            backoff.hold(given);
            assert_eq!(backoff.remaining(), Some(expected.as_secs()), "{given:?}");
            tokio::time::advance(expected).await;
            assert_eq!(backoff.remaining(), None, "{given:?}");
        }
    }
}
