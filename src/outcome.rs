//! How a request was answered. Shared vocabulary of `cache` (which decides it), `metrics` (which
//! counts it) and `api` (which puts it in headers and logs); it lives apart from all three so
//! that none of them imports another just for this type.

/// How a request was answered, for headers, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From the store without asking the upstream.
    Hit,
    /// Fetched from the upstream.
    Miss,
    /// From the store because the upstream failed.
    Stale,
    /// From the store after the upstream confirmed it is current.
    Revalidated,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
        }
    }
}
