//! Keeping the store under `storage.max_size` and `cache.max_age`, by image: the unit is what a
//! tag names (its index or manifest, the platform manifests, configs and layers), and content
//! fetched by digest alone is a unit of its own. The least recently pulled images go first;
//! content another image still holds stays; an image with content someone is reading is left
//! for the next pass. A tag is never left with any of its content gone: every tag the mirror
//! lists pulls completely with the upstream down.
//!
//! Eviction runs in a background task woken after each commit that takes the store over its
//! limit (and once a minute, which is also when ageing is checked); [`Evictor::run_once`] runs
//! one pass for tests, against the injectable [`Clock`].

use std::collections::{HashMap, HashSet};
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(digest.clone())
            .or_default() += 1;
        ReadGuard {
            readers: self.clone(),
            digest: digest.clone(),
        }
    }

    fn is_pinned(&self, digest: &Digest) -> bool {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(digest)
    }
}

/// A reader's pin on a blob.
pub struct ReadGuard {
    readers: Arc<Readers>,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut open = self
            .readers
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.digest) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.digest);
            }
        }
    }
}

pub use crate::clock::Clock;

/// What one pass removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: usize,
    pub bytes: u64,
    /// Images removed.
    pub images: usize,
    /// Images left for the next pass because some of their content was being read.
    pub busy: usize,
}

/// The eviction policy over a store.
pub struct Evictor {
    store: Arc<Store>,
    readers: Arc<Readers>,
    metrics: Arc<Metrics>,
    clock: Arc<Clock>,
    /// Bytes above which a pass starts (0: unbounded).
    high: u64,
    /// Bytes a pass evicts down to.
    low: u64,
    /// Images not pulled for this long are removed (0: never).
    max_age: u64,
    /// Roots of pinned images: never evicted, never aged out.
    pinned: Mutex<HashSet<Digest>>,
    wake: Notify,
}

impl Evictor {
    pub fn new(
        store: Arc<Store>,
        readers: Arc<Readers>,
        metrics: Arc<Metrics>,
        clock: Arc<Clock>,
        max_size: u64,
        low_watermark_percent: u8,
        max_age: Duration,
    ) -> Evictor {
        Evictor {
            store,
            readers,
            metrics,
            clock,
            high: max_size,
            low: max_size / 100 * u64::from(low_watermark_percent),
            max_age: u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
            pinned: Mutex::default(),
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

    /// Replaces the set of pinned image roots.
    pub fn set_pinned(&self, roots: HashSet<Digest>) {
        *self
            .pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = roots;
    }

    /// Whether the image rooted at `root` is pinned.
    pub fn is_pinned(&self, root: &Digest) -> bool {
        self.pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(root)
    }

    /// One pass: removes images older than `max_age`, and when over the high watermark, the
    /// least recently pulled images until under the low one. Blocking (index walk, unlinks):
    /// call from `spawn_blocking`.
    pub fn run_once(&self) -> Evicted {
        let mut evicted = Evicted::default();
        let now = self.clock.now();
        let shrinking = self.high > 0 && self.store.used_bytes() > self.high;
        if !shrinking && self.max_age == 0 {
            return evicted;
        }
        self.pass(now, shrinking, &mut evicted);
        // Still over with every image considered: stored content no image holds (files adopted
        // at start-up, an index from before images) becomes images of its own, and one more
        // pass considers them.
        if shrinking && self.store.used_bytes() > self.low {
            let adopted = self.adopt_strays();
            if adopted > 0 {
                info!(adopted, "content no image held became images of its own");
                self.pass(now, shrinking, &mut evicted);
            }
        }
        if evicted.images > 0 {
            self.metrics.evicted(evicted.blobs as u64, evicted.bytes);
            info!(
                images = evicted.images,
                blobs = evicted.blobs,
                bytes = evicted.bytes,
                busy = evicted.busy,
                used = self.store.used_bytes(),
                "evicted least recently pulled images"
            );
        }
        evicted
    }

    fn pass(&self, now: u64, shrinking: bool, evicted: &mut Evicted) {
        let images = match self.store.index().images_by_age() {
            Ok(images) => images,
            Err(error) => {
                warn!(%error, "eviction could not list images");
                return;
            }
        };
        for (pulled, root) in images {
            let aged = self.max_age > 0 && now.saturating_sub(pulled) > self.max_age;
            let over = shrinking && self.store.used_bytes() > self.low;
            if !aged && !over {
                // Oldest first: nothing after this one is older.
                break;
            }
            if self.is_pinned(&root) {
                continue;
            }
            if let Err(error) = self.remove_image(&root, evicted) {
                warn!(%error, %root, "eviction could not remove an image");
            }
        }
    }

    /// Makes every stored blob no image holds an image of its own, dated by its last access,
    /// so it can be evicted too. A full scan of the blobs: only when the images could not
    /// bring the store under its limit.
    fn adopt_strays(&self) -> usize {
        let index = self.store.index();
        let mut adopted = 0;
        for (digest, entry) in index.all_blobs().unwrap_or_default() {
            let stray = index.owners(&digest).is_ok_and(|owners| owners.is_empty());
            if stray && index.own(&digest, entry.accessed).is_ok() {
                adopted += 1;
            }
        }
        adopted
    }

    fn remove_image(
        &self,
        root: &Digest,
        evicted: &mut Evicted,
    ) -> Result<(), crate::storage::Error> {
        let index = self.store.index();
        // All or nothing: an image whose content is being read waits for the next pass rather
        // than losing part of itself.
        if index
            .sole_members(root)?
            .iter()
            .any(|digest| self.readers.is_pinned(digest))
        {
            evicted.busy += 1;
            return Ok(());
        }
        for digest in index.remove_image(root)? {
            if let Some(size) = self.store.remove(&digest)? {
                evicted.blobs += 1;
                evicted.bytes = evicted.bytes.saturating_add(size);
            }
        }
        evicted.images += 1;
        Ok(())
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
