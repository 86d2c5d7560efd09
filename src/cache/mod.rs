//! The pull-through policy: answer from the store when we may, fetch from the upstream when we
//! must, verify everything before it is committed, and share every fetch between the clients
//! that want it at the same time.
//!
//! This is the only module that knows both storage and upstreams. It knows nothing of HTTP
//! requests: the API asks it for manifests and blobs and turns its answers into responses.

mod blobs;
pub mod bucket_evict;
mod chain;
mod download;
mod evict;
mod flight;
mod listing;
mod manifest;
mod manifests;
mod negative;
mod passthrough;
pub mod pins;
pub mod scrub;
mod shared;
mod single;
mod tag;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;

pub use blobs::{Blob, BlobBody};
pub use bucket_evict::{Bound as BucketBound, BucketEvicted};
pub use evict::{Clock, Evicted, Evictor, ReadGuard, Readers};
use flight::Flights;
pub use flight::{file_stream, Progress};
use manifests::{ManifestCache, MANIFEST_CACHE_BYTES};
pub use shared::{Shared, CONFIRMED_HEADER, SIZE_HEADER};
use single::SingleFlight;

use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
pub use crate::outcome::Outcome;
use crate::storage::{self, Store};
use crate::upstream::{self, Upstream, Upstreams};

/// A cache failure, classified for the API.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Neither the store nor the upstream has this manifest.
    #[error("manifest unknown")]
    ManifestUnknown,
    /// Neither the store nor the upstream has this blob (in this repository).
    #[error("blob unknown")]
    BlobUnknown,
    /// The upstream does not know this repository.
    #[error("repository unknown")]
    NameUnknown,
    /// The upstream failed and we hold nothing to serve instead.
    #[error(transparent)]
    Upstream(upstream::Error),
    /// The upstream's bytes do not match their digest; nothing was committed.
    #[error("content from upstream does not match digest {expected}")]
    DigestMismatch { expected: Digest },
    /// A local failure (disk, index). The text is for logs, not clients.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// Whether this is the upstream's own answer about the content (it does not exist, it
    /// refuses us, it is rate-limiting us) rather than a failure along the way. An owner
    /// relays these to the replica that asked, which relays them on as final instead of
    /// asking the upstream itself.
    pub fn is_authoritative(&self) -> bool {
        use upstream::Error as U;
        matches!(
            self,
            Error::ManifestUnknown
                | Error::BlobUnknown
                | Error::NameUnknown
                | Error::Upstream(
                    U::NotFound | U::Unauthorized | U::Denied | U::TooManyRequests { .. }
                )
        )
    }
}

impl From<storage::Error> for Error {
    fn from(err: storage::Error) -> Self {
        Error::Internal(err.to_string())
    }
}

/// A verified manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    pub digest: Digest,
    pub media_type: String,
}

/// Cache policy settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub tag_ttl: Duration,
    pub serve_stale: bool,
    /// `storage.max_size` in bytes; 0 is unbounded.
    pub max_size: u64,
    pub low_watermark_percent: u8,
    /// Upstream fetches at once, per upstream: blob downloads, and apart from them manifest
    /// fetches and tag revalidations.
    pub max_concurrent_fetches: usize,
    /// How long a tag revalidation may take (waiting for a slot included) before the cached
    /// tag is served stale instead.
    pub revalidate_timeout: Duration,
    /// A blob download receiving fewer than `blob_stall_bytes` in this long is resumed.
    pub blob_stall_timeout: Duration,
    pub blob_stall_bytes: u64,
    /// Images not pulled for this long are evicted; zero never.
    pub max_age: Duration,
    /// Free space a download must leave on the store's disk, or it passes through uncached.
    pub min_free: u64,
    /// How long the upstream's "no such manifest" is answered here without asking again.
    pub negative_ttl: Duration,
}

impl Policy {
    pub fn from_config(config: &crate::config::Config) -> Policy {
        Policy {
            tag_ttl: config.cache.tag_ttl.0,
            serve_stale: config.cache.serve_stale,
            max_size: config.storage.max_size.0,
            low_watermark_percent: config.storage.low_watermark_percent,
            max_concurrent_fetches: config.cache.max_concurrent_fetches,
            revalidate_timeout: config.cache.revalidate_timeout.0,
            blob_stall_timeout: config.cache.blob_stall_timeout.0,
            blob_stall_bytes: config.cache.blob_stall_bytes.0,
            max_age: config.cache.max_age.0,
            min_free: config.storage.min_free.0,
            negative_ttl: config.cache.negative_ttl.0,
        }
    }
}

/// `(upstream, repository, reference)`.
type ManifestKey = (String, String, String);

/// The cache: store, upstreams and the fetches in flight.
pub struct Cache {
    /// This cache, for work spawned from a `&self` method (write-through to the bucket).
    me: std::sync::Weak<Cache>,
    store: Arc<Store>,
    /// Links, tags and image membership: the local index in front of the bucket's records.
    facts: storage::Facts,
    upstreams: Arc<Upstreams>,
    policy: Policy,
    metrics: Arc<Metrics>,
    blob_flights: Flights,
    /// Manifest fetches by key and by whether they may be forwarded to the key's owner (a
    /// peer's request never joins one that forwards: see [`flight::Flights`]).
    manifest_flights: SingleFlight<(ManifestKey, bool), Result<(Manifest, Outcome), Error>>,
    /// Blob sizes asked of the owner or the upstream (`HEAD`), by key and by whether they
    /// forward, like manifests.
    size_flights: SingleFlight<(ManifestKey, bool), Result<u64, Error>>,
    /// What the owner or the upstream answered to a blob `HEAD` (its size, or that it does
    /// not exist), for `cache.negative_ttl`.
    sizes: negative::Remembered<Result<u64, Error>>,
    /// Manifests the upstream (or the owner, relaying it) said do not exist.
    not_found: negative::NotFound,
    /// Tag revalidations, which outlive the requests that gave up waiting for them.
    revalidations: SingleFlight<ManifestKey, Result<(Manifest, Outcome), Error>>,
    readers: Arc<Readers>,
    evictor: Arc<Evictor>,
    /// Per upstream, a permit per blob download under way.
    fetch_slots: HashMap<String, Arc<Semaphore>>,
    /// Per upstream, a permit per manifest fetch or tag revalidation under way: apart from the
    /// blob downloads', so slow layers never starve tag look-ups.
    manifest_slots: HashMap<String, Arc<Semaphore>>,
    /// Digests whose next download panics (a fault hook for tests of the single flight).
    #[cfg(feature = "test-hooks")]
    injected_panics: Mutex<HashSet<Digest>>,
    /// Tags being served stale, so the warning is logged once per tag, not per request.
    stale: Mutex<HashSet<ManifestKey>>,
    /// Verified manifests by digest, so hits touch no file.
    manifests: ManifestCache,
    /// Pull times and ages.
    clock: Arc<Clock>,
    /// Pinned tags and the images they name, as of the last pin pass.
    pinned: Mutex<pins::Pinned>,
    /// Pin passes completed.
    pin_passes: tokio::sync::watch::Sender<u64>,
    /// The bucket and the cluster, when this replica shares them.
    shared: Shared,
}

impl Cache {
    pub fn new(
        store: Arc<Store>,
        upstreams: Arc<Upstreams>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Arc<Cache> {
        Cache::new_shared(store, upstreams, policy, metrics, Shared::none())
    }

    /// A cache whose store is the hot tier of a shared bucket, in a cluster or alone.
    pub fn new_shared(
        store: Arc<Store>,
        upstreams: Arc<Upstreams>,
        policy: Policy,
        metrics: Arc<Metrics>,
        shared: Shared,
    ) -> Arc<Cache> {
        let readers = Arc::new(Readers::default());
        let clock = upstreams.clock().clone();
        let evictor = Arc::new(Evictor::new(
            store.clone(),
            readers.clone(),
            metrics.clone(),
            clock.clone(),
            policy.max_size,
            policy.low_watermark_percent,
            policy.max_age,
        ));
        let slots = || -> HashMap<String, Arc<Semaphore>> {
            upstreams
                .all()
                .into_iter()
                .map(|u| {
                    (
                        u.name.clone(),
                        Arc::new(Semaphore::new(policy.max_concurrent_fetches)),
                    )
                })
                .collect()
        };
        let (fetch_slots, manifest_slots) = (slots(), slots());
        let not_found = negative::NotFound::new(policy.negative_ttl);
        let sizes = negative::Remembered::new(policy.negative_ttl);
        let facts = storage::Facts::new(store.clone(), shared.bucket().cloned());
        Arc::new_cyclic(|me| Cache {
            me: me.clone(),
            store,
            facts,
            upstreams,
            policy,
            metrics,
            blob_flights: Flights::default(),
            manifest_flights: SingleFlight::default(),
            size_flights: SingleFlight::default(),
            sizes,
            not_found,
            revalidations: SingleFlight::default(),
            readers,
            evictor,
            fetch_slots,
            manifest_slots,
            #[cfg(feature = "test-hooks")]
            injected_panics: Mutex::default(),
            stale: Mutex::default(),
            manifests: ManifestCache::new(MANIFEST_CACHE_BYTES),
            clock,
            pinned: Mutex::default(),
            pin_passes: tokio::sync::watch::Sender::new(0),
            shared,
        })
    }

    /// The store, for start-up, shutdown and tests; the API asks the cache instead.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The clock pulls are recorded with (tests move it forward).
    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Bytes of committed blobs.
    pub fn used_bytes(&self) -> u64 {
        self.store.used_bytes()
    }

    /// Number of committed blobs.
    pub fn blob_count(&self) -> u64 {
        self.store.blob_count()
    }

    /// Whether the store takes writes and the index answers, and, in a cluster, whether this
    /// replica has seen itself among the healthy members (for `/readyz`).
    pub async fn ready(&self) -> bool {
        if self.shared.cluster().is_some_and(|c| !c.ready()) {
            return false;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.ready())
            .await
            .unwrap_or(false)
    }

    /// With a bucket: blob reads served from the hot tier, and filled from the bucket.
    pub fn hot_tier_counts(&self) -> Option<(u64, u64)> {
        self.shared.hot_tier_counts()
    }

    /// When the upstream last confirmed a tag we hold (unix ms), for a peer asking its owner.
    pub async fn tag_confirmed(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
    ) -> Option<u64> {
        let entry = self.cached_tag(upstream, repo, tag).await.ok()??;
        Some(entry.confirmed)
    }

    /// The cluster this replica belongs to, if any.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.shared.cluster()
    }

    /// The `(upstream, repository)` pairs we hold content for, sorted (the catalog).
    pub async fn repositories(&self) -> Result<Vec<(String, String)>, Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.index().repositories())
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| storage::Error::from(e).into())
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// Blob downloads under way.
    pub fn downloads_in_flight(&self) -> usize {
        self.blob_flights.len()
    }

    /// The eviction policy, for the background task and tests.
    pub fn evictor(&self) -> &Arc<Evictor> {
        &self.evictor
    }

    /// Waits for a blob download slot of this upstream.
    async fn fetch_slot(&self, upstream: &Upstream) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = self.fetch_slots.get(&upstream.name)?;
        slots.clone().acquire_owned().await.ok()
    }

    /// Waits for a manifest fetch slot of this upstream.
    async fn manifest_slot(
        &self,
        upstream: &Upstream,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = self.manifest_slots.get(&upstream.name)?;
        slots.clone().acquire_owned().await.ok()
    }

    /// Makes the next download of `digest` panic: a fault hook for tests proving that a
    /// download ending in a panic fails its readers and leaves the digest fetchable.
    #[cfg(feature = "test-hooks")]
    pub fn inject_download_panic(&self, digest: &Digest) {
        let mut panics = self
            .injected_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        panics.insert(digest.clone());
    }

    /// Empties the in-memory manifest cache, so the next hits read (and hash) the files: a
    /// hook for tests of damaged files on the disk path.
    #[cfg(feature = "test-hooks")]
    pub fn drop_manifests_in_memory(&self) {
        self.manifests.clear();
    }

    #[cfg(feature = "test-hooks")]
    fn take_injected_panic(&self, digest: &Digest) -> bool {
        let mut panics = self
            .injected_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        panics.remove(digest)
    }
}

/// Pull times are written at most this often per image.
const TOUCH_GRANULARITY_MS: u64 = 1000;

fn manifest_error(err: upstream::Error) -> Error {
    match err {
        upstream::Error::NotFound => Error::ManifestUnknown,
        other => Error::Upstream(other),
    }
}

fn blob_error(err: upstream::Error) -> Error {
    match err {
        upstream::Error::NotFound => Error::BlobUnknown,
        other => Error::Upstream(other),
    }
}
