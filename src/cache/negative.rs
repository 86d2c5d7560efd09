//! What the upstream said does not exist, remembered for `cache.negative_ttl`: a client
//! retrying a missing tag, a CI matrix asking for one that was never pushed, or every replica
//! of a cluster asking at once then cost the upstream one request per window instead of one
//! each (Docker Hub counts manifest GETs, 404s included).
//!
//! In memory only, bounded: a full table stops remembering (the upstream is asked, as without
//! it) rather than growing with what clients make up. Time is tokio's clock, so tests drive it
//! with `tokio::time::pause`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::ManifestKey;

/// Missing manifests remembered at most; the keys are chosen by clients.
const MAX_ENTRIES: usize = 10_000;

pub struct NotFound {
    ttl: Duration,
    entries: Mutex<HashMap<ManifestKey, Instant>>,
}

impl NotFound {
    /// Remembers for `ttl`; zero remembers nothing.
    pub fn new(ttl: Duration) -> NotFound {
        NotFound {
            ttl,
            entries: Mutex::default(),
        }
    }

    /// Whether the upstream said within `ttl` that this manifest does not exist.
    pub fn contains(&self, key: &ManifestKey) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(key) {
            Some(expires) if Instant::now() < *expires => true,
            Some(_) => {
                entries.remove(key);
                false
            }
            None => false,
        }
    }

    /// The upstream said this manifest does not exist.
    pub fn insert(&self, key: ManifestKey) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, expires| now < *expires);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(key, now + self.ttl);
    }

    /// The manifest exists after all (fetched and verified): forget what was said.
    pub fn remove(&self, key: &ManifestKey) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: &str) -> ManifestKey {
        ("docker.io".into(), "library/app".into(), tag.into())
    }

    #[tokio::test(start_paused = true)]
    async fn remembered_for_the_ttl_only() {
        let missing = NotFound::new(Duration::from_secs(30));
        assert!(!missing.contains(&key("1")));
        missing.insert(key("1"));
        assert!(missing.contains(&key("1")));
        assert!(!missing.contains(&key("2")));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(missing.contains(&key("1")));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!missing.contains(&key("1")));
        missing.insert(key("1"));
        missing.remove(&key("1"));
        assert!(!missing.contains(&key("1")));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_ttl_remembers_nothing_and_the_table_is_bounded() {
        let off = NotFound::new(Duration::ZERO);
        off.insert(key("1"));
        assert!(!off.contains(&key("1")));

        let missing = NotFound::new(Duration::from_secs(30));
        for i in 0..MAX_ENTRIES + 10 {
            missing.insert(key(&i.to_string()));
        }
        assert_eq!(missing.entries.lock().unwrap().len(), MAX_ENTRIES);
        assert!(!missing.contains(&key(&MAX_ENTRIES.to_string())));
        // Expired entries make room again.
        tokio::time::advance(Duration::from_secs(30)).await;
        missing.insert(key("new"));
        assert!(missing.contains(&key("new")));
    }
}
