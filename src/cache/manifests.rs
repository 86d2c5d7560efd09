//! A small in-memory LRU of verified manifests by digest, bounded in bytes, so that manifest
//! hits (the bulk of a registry's requests) neither read nor hash a file. An entry is served
//! only while the index still holds the digest, so eviction and damage handling stay the
//! store's business.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::Manifest;
use crate::oci::Digest;

/// Bytes of manifests kept in memory: thousands of typical manifests (1-10 KiB), a fixed cost
/// next to the blob store.
pub const MANIFEST_CACHE_BYTES: usize = 16 << 20;

/// Least recently used manifests, up to a byte budget.
pub struct ManifestCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, (Manifest, u64)>,
    order: BTreeMap<u64, Digest>,
    bytes: usize,
    tick: u64,
}

impl ManifestCache {
    pub fn new(capacity: usize) -> ManifestCache {
        ManifestCache {
            capacity,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<Manifest> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        inner.tick += 1;
        let tick = inner.tick;
        let (manifest, used) = inner.entries.get_mut(digest)?;
        inner.order.remove(used);
        *used = tick;
        inner.order.insert(tick, digest.clone());
        Some(manifest.clone())
    }

    /// Keeps a verified manifest; one larger than an eighth of the budget is not kept.
    pub fn insert(&self, manifest: &Manifest) {
        let size = manifest.bytes.len();
        if size > self.capacity / 8 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((old, used)) = inner
            .entries
            .insert(manifest.digest.clone(), (manifest.clone(), tick))
        {
            inner.order.remove(&used);
            inner.bytes -= old.bytes.len();
        }
        inner.order.insert(tick, manifest.digest.clone());
        inner.bytes += size;
        while inner.bytes > self.capacity {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= old.bytes.len();
            }
        }
    }

    /// Forgets everything (a test hook: see `Cache::drop_manifests_in_memory`).
    #[cfg(feature = "test-hooks")]
    pub fn clear(&self) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Inner::default();
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(n: u8, len: usize) -> Manifest {
        let bytes = bytes::Bytes::from(vec![n; len]);
        Manifest {
            digest: Digest::sha256_of(&bytes),
            bytes,
            media_type: "m".into(),
        }
    }

    #[test]
    fn keeps_the_most_recently_used_within_its_byte_budget() {
        let cache = ManifestCache::new(800);
        let (a, b, c) = (manifest(1, 100), manifest(2, 100), manifest(3, 100));
        cache.insert(&a);
        cache.insert(&b);
        assert!(cache.get(&a.digest).is_some());
        for n in 10..16 {
            cache.insert(&manifest(n, 100));
        }
        cache.insert(&c);
        assert!(cache.bytes() <= 800);
        assert!(cache.get(&a.digest).is_some(), "recently used");
        assert!(cache.get(&b.digest).is_none(), "least recently used");
        assert!(cache.get(&c.digest).is_some());
        cache.insert(&manifest(4, 101));
        assert!(cache.get(&manifest(4, 101).digest).is_none(), "too large");
    }
}
