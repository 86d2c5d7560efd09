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

/// The one eviction policy, applied to each tier: the hot tier here, the shared bucket in
/// `bucket_evict.rs`. Images are considered least recently pulled first; one not pulled
/// within `max_age` goes, and while the tier was over `max_size` when the pass began, images
/// go until it is under the low watermark; a pinned image is spared either way. The tiers
/// differ only in what they list, how an image's size is known and how it goes (at once here;
/// marked, then deleted after a grace, in the bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictPolicy {
    /// Bytes above which the tier shrinks (0: unbounded).
    high: u64,
    /// Bytes it shrinks down to.
    low: u64,
    /// Milliseconds without a pull after which an image goes (0: never).
    max_age: u64,
}

/// What the policy says of the next image, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Neither aged nor needed: nothing after it is older, the pass is done.
    Stop,
    /// Pinned: kept, and the pass goes on.
    Spare,
    /// Goes.
    Cut,
}

impl EvictPolicy {
    pub fn new(max_size: u64, low_watermark_percent: u8, max_age: Duration) -> EvictPolicy {
        EvictPolicy {
            high: max_size,
            low: max_size / 100 * u64::from(low_watermark_percent),
            max_age: u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Whether the tier bounds anything at all.
    pub fn bounded(&self) -> bool {
        self.high > 0 || self.max_age > 0
    }

    /// Whether images can age out (`max_age` set).
    pub fn ages(&self) -> bool {
        self.max_age > 0
    }

    /// Whether `used` bytes are over the high watermark.
    pub fn over(&self, used: u64) -> bool {
        self.high > 0 && used > self.high
    }

    /// Whether `used` bytes are over the low watermark.
    pub fn over_low(&self, used: u64) -> bool {
        self.high > 0 && used > self.low
    }

    /// Whether one blob of `size` bytes may be kept at all: not if it alone would take the tier
    /// past its low watermark.
    pub fn fits(&self, size: u64) -> bool {
        self.high == 0 || size <= self.low
    }

    /// The verdict on an image last pulled at `last_pull`, the next oldest: `shrinking` says
    /// the tier was over its bound when the pass began, `remaining` what it holds after the
    /// cuts so far.
    pub fn verdict(
        &self,
        last_pull: u64,
        pinned: bool,
        now: u64,
        shrinking: bool,
        remaining: u64,
    ) -> Verdict {
        let aged = self.max_age > 0 && now.saturating_sub(last_pull) > self.max_age;
        let needed = shrinking && self.over_low(remaining);
        if !aged && !needed {
            Verdict::Stop
        } else if pinned {
            Verdict::Spare
        } else {
            Verdict::Cut
        }
    }
}

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
    policy: EvictPolicy,
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
            policy: EvictPolicy::new(max_size, low_watermark_percent, max_age),
            pinned: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// Whether a blob of `size` bytes can be cached at all.
    pub fn fits(&self, size: u64) -> bool {
        self.policy.fits(size)
    }

    /// Called after a commit: wakes the background task if the store went over its limit.
    pub fn committed(&self) {
        if self.policy.over(self.store.used_bytes()) {
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
        let shrinking = self.policy.over(self.store.used_bytes());
        if !shrinking && !self.policy.ages() {
            return evicted;
        }
        self.pass(now, shrinking, &mut evicted);
        // Still over with every image considered: stored content no image holds (files adopted
        // at start-up, an index from before images) becomes images of its own, and one more
        // pass considers them.
        if shrinking && self.policy.over_low(self.store.used_bytes()) {
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
            let pinned = self.is_pinned(&root);
            let used = self.store.used_bytes();
            match self.policy.verdict(pulled, pinned, now, shrinking, used) {
                Verdict::Stop => break,
                Verdict::Spare => continue,
                Verdict::Cut => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_cuts_oldest_first_down_to_the_low_watermark_and_spares_pins() {
        let minute = Duration::from_secs(60);
        let policy = EvictPolicy::new(1000, 80, minute * 10);
        let now = 100 * 60_000;
        let recent = now - 60_000;
        // Under its bound and nothing aged: the pass stops at the oldest image.
        assert_eq!(
            policy.verdict(recent, false, now, false, 900),
            Verdict::Stop
        );
        // Shrinking: images go until the tier is at the low watermark (800).
        assert_eq!(policy.verdict(recent, false, now, true, 1001), Verdict::Cut);
        assert_eq!(policy.verdict(recent, false, now, true, 801), Verdict::Cut);
        assert_eq!(policy.verdict(recent, false, now, true, 800), Verdict::Stop);
        // Pinned images are spared, and the pass goes on past them.
        assert_eq!(
            policy.verdict(recent, true, now, true, 1001),
            Verdict::Spare
        );
        // Not pulled within max_age: goes even under the bound, unless pinned.
        let old = now - 11 * 60_000;
        assert_eq!(policy.verdict(old, false, now, false, 10), Verdict::Cut);
        assert_eq!(policy.verdict(old, true, now, false, 10), Verdict::Spare);
        // No bound, no age: nothing ever goes; a pull stamped in the future is not aged.
        let none = EvictPolicy::new(0, 80, Duration::ZERO);
        assert!(!none.bounded() && !none.over(u64::MAX) && none.fits(u64::MAX));
        assert_eq!(none.verdict(0, false, now, true, u64::MAX), Verdict::Stop);
        assert_eq!(policy.verdict(now + 1, false, now, false, 0), Verdict::Stop);
        assert!(policy.fits(800) && !policy.fits(801));
    }
}
