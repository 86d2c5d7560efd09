//! Keeping the store under `storage.max_size`: least-recently-used blobs go first, blobs that
//! cached tags point to go last, and a blob someone is reading or downloading is never chosen.
//!
//! Eviction runs in a background task woken after each commit that takes the store over its
//! limit (and once a minute as a safety net); [`Evictor::run_once`] runs one pass for tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::storage::Store;

/// Counts open readers per digest so eviction can skip blobs being served.
#[derive(Default)]
pub struct Readers {
    open: Mutex<HashMap<Digest, usize>>,
}

impl Readers {
    /// Pins `digest` until the guard is dropped.
    pub fn pin(self: &Arc<Self>, digest: &Digest) -> ReadGuard {
        *self
            .open
            .lock()
            .expect("readers lock")
            .entry(digest.clone())
            .or_default() += 1;
        ReadGuard {
            readers: self.clone(),
            digest: digest.clone(),
        }
    }

    fn is_pinned(&self, digest: &Digest) -> bool {
        self.open.lock().expect("readers lock").contains_key(digest)
    }
}

/// A reader's pin on a blob.
pub struct ReadGuard {
    readers: Arc<Readers>,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut open = self.readers.open.lock().expect("readers lock");
        if let Some(count) = open.get_mut(&self.digest) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.digest);
            }
        }
    }
}

/// What one pass removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: usize,
    pub bytes: u64,
}

/// The eviction policy over a store.
pub struct Evictor {
    store: Arc<Store>,
    readers: Arc<Readers>,
    metrics: Arc<Metrics>,
    /// Bytes above which a pass starts (0: unbounded).
    high: u64,
    /// Bytes a pass evicts down to.
    low: u64,
    wake: Notify,
}

impl Evictor {
    pub fn new(
        store: Arc<Store>,
        readers: Arc<Readers>,
        metrics: Arc<Metrics>,
        max_size: u64,
        low_watermark_percent: u8,
    ) -> Evictor {
        Evictor {
            store,
            readers,
            metrics,
            high: max_size,
            low: max_size / 100 * u64::from(low_watermark_percent),
            wake: Notify::new(),
        }
    }

    /// Whether a blob of `size` bytes can be cached at all.
    pub fn fits(&self, size: u64) -> bool {
        self.high == 0 || size <= self.low
    }

    /// Called after a commit: wakes the background task if the store went over its limit.
    pub fn committed(&self) {
        if self.high > 0 && self.store.used_bytes() > self.high {
            self.wake.notify_one();
        }
    }

    /// One pass: when over the high watermark, removes blobs until under the low one.
    /// Blocking (index scan, unlinks): call from `spawn_blocking`.
    pub fn run_once(&self) -> Evicted {
        let mut evicted = Evicted::default();
        if self.high == 0 || self.store.used_bytes() <= self.high {
            return evicted;
        }
        let candidates = match self.store.index.lru_candidates() {
            Ok(candidates) => candidates,
            Err(error) => {
                warn!(%error, "eviction could not list blobs");
                return evicted;
            }
        };
        let tagged = self.store.index.tagged_digests().unwrap_or_default();
        // Orphans (layers, configs, untagged manifests) by age first, then tagged manifests by
        // age: a tag we can still answer offline is worth more than a layer nobody asked for.
        let (mut order, kept): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .partition(|(digest, _)| !tagged.contains(digest));
        order.extend(kept);
        for (digest, _) in order {
            if self.store.used_bytes() <= self.low {
                break;
            }
            if self.readers.is_pinned(&digest) {
                continue;
            }
            match self.store.remove(&digest) {
                Ok(Some(size)) => {
                    evicted.blobs += 1;
                    evicted.bytes += size;
                }
                Ok(None) => {}
                Err(error) => warn!(%error, %digest, "eviction could not remove a blob"),
            }
        }
        self.metrics.evicted(evicted.blobs as u64, evicted.bytes);
        info!(
            blobs = evicted.blobs,
            bytes = evicted.bytes,
            used = self.store.used_bytes(),
            "evicted least recently used blobs"
        );
        evicted
    }

    /// Runs passes when woken or once a minute, until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.run_once()).await;
        }
    }
}
