//! What the upstream said does not exist, remembered for `cache.negative_ttl`: a client
//! retrying a missing tag, a CI matrix asking for one that was never pushed, or every replica
//! of a cluster asking at once then cost the upstream one request per window instead of one
//! each (Docker Hub counts manifest GETs, 404s included).
//!
//! The same table remembers what the upstream answered to a blob `HEAD` (its size, or that it
//! does not exist): `HEAD`s store nothing, so without it every replica and client asking a
//! moment after the last one finished would ask again.
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

/// What the upstream said does not exist.
pub type NotFound = Remembered<()>;

/// Answers of the upstream by key, each for `ttl`.
pub struct Remembered<V> {
    ttl: Duration,
    entries: Mutex<HashMap<ManifestKey, (Instant, V)>>,
}

impl<V: Clone> Remembered<V> {
    /// Remembers for `ttl`; zero remembers nothing.
    pub fn new(ttl: Duration) -> Remembered<V> {
        Remembered {
            ttl,
            entries: Mutex::default(),
        }
    }

    /// Whether the upstream said within `ttl` that this manifest does not exist.
    pub fn contains(&self, key: &ManifestKey) -> bool {
        self.get(key).is_some()
    }

    /// What the upstream answered for `key` within `ttl`.
    pub fn get(&self, key: &ManifestKey) -> Option<V> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(key) {
            Some((expires, value)) if Instant::now() < *expires => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// The upstream answered `value` for `key`.
    pub fn answer(&self, key: ManifestKey, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (expires, _)| now < *expires);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(key, (now + self.ttl, value));
    }

    /// The manifest exists after all (fetched and verified): forget what was said.
    pub fn remove(&self, key: &ManifestKey) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(key);
    }
}

impl Remembered<()> {
    /// The upstream said this manifest does not exist.
    pub fn insert(&self, key: ManifestKey) {
        self.answer(key, ());
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
