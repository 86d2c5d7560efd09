//! The chain of content sources: what the cache asks, in order, for content it does not hold
//! whole on this replica, and the four answers every source gives.
//!
//! ```text
//! hot tier (store) ─▶ bucket ─▶ owner (peer channel) ─▶ upstream
//! ```
//!
//! - **found**: verified content (or a stream verified as it arrives) — the chain stops;
//! - **absent**: this source does not have it (the bucket has no such object, this replica
//!   is the key's owner) — ask the next one;
//! - **final**: an authoritative answer about the upstream (it does not exist, 429 with its
//!   Retry-After, 401/403), relayed as it is — the chain stops: an owner relays its
//!   upstream's answers as final, so the fleet never asks the upstream once per replica;
//! - **unavailable**: the source is down, timed out or sent something wrong — counted, and
//!   the next one is asked. Only this, never an answer, sends a replica to the upstream.
//!
//! The single flight of a key wraps the whole walk on each replica (blobs: `Flights`,
//! manifests: `manifest_flights`), so concurrent misses make one walk. Every answer is
//! counted per source (`regmirror_source_answers_total{source,answer}`).

use super::Error;
use crate::metrics::Metrics;

/// What one source answered.
pub(super) enum Answer<T> {
    Found(T),
    Absent,
    Final(Error),
    Unavailable(Error),
}

/// The links of the chain, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    HotTier,
    Bucket,
    Owner,
    Upstream,
}

impl Link {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Link::HotTier => "hot_tier",
            Link::Bucket => "bucket",
            Link::Owner => "owner",
            Link::Upstream => "upstream",
        }
    }
}

impl<T> Answer<T> {
    fn as_str(&self) -> &'static str {
        match self {
            Answer::Found(_) => "found",
            Answer::Absent => "absent",
            Answer::Final(_) => "final",
            Answer::Unavailable(_) => "unavailable",
        }
    }

    /// Counts the answer of `link`, and hands it back.
    pub(super) fn counted(self, metrics: &Metrics, link: Link) -> Answer<T> {
        metrics.source_answer(link.as_str(), self.as_str());
        self
    }

    /// What an owner answered: its upstream's own answers (`Error::is_authoritative`) are
    /// final; any other failure means the owner is unavailable.
    pub(super) fn from_owner(result: Result<T, Error>) -> Answer<T> {
        match result {
            Ok(found) => Answer::Found(found),
            Err(err) if err.is_authoritative() => Answer::Final(err),
            Err(err) => Answer::Unavailable(err),
        }
    }

    /// The upstream is the last link: whatever it says ends the chain, found or not.
    pub(super) fn from_upstream(result: Result<T, Error>) -> Answer<T> {
        match result {
            Ok(found) => Answer::Found(found),
            Err(err) => Answer::Final(err),
        }
    }
}
