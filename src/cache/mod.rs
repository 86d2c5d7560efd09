//! The pull-through policy: answer from the store when we may, fetch from the upstream when we
//! must, verify everything before it is committed, and share every fetch between the clients
//! that want it at the same time.
//!
//! This is the only module that knows both storage and upstreams. It knows nothing of HTTP
//! requests: the API asks it for manifests and blobs and turns its answers into responses.

mod blobs;
pub mod bucket_evict;
mod download;
mod evict;
mod flight;
mod manifests;
mod negative;
mod passthrough;
pub mod pins;
pub mod scrub;
mod shared;
mod single;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

pub use blobs::{Blob, BlobBody};
pub use bucket_evict::{Bound as BucketBound, BucketEvicted};
pub use evict::{Clock, Evicted, Evictor, ReadGuard, Readers};
use flight::Flights;
pub use flight::{file_stream, Progress, CHUNK};
use manifests::{ManifestCache, MANIFEST_CACHE_BYTES};
pub use shared::{Shared, CONFIRMED_HEADER};
use single::SingleFlight;

use crate::metrics::Metrics;
use crate::oci::{media_type, Digest, Reference, RepoName};
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
    store: Arc<Store>,
    upstreams: Arc<Upstreams>,
    policy: Policy,
    metrics: Arc<Metrics>,
    blob_flights: Flights,
    /// Manifest fetches by key and by whether they may be forwarded to the key's owner (a
    /// peer's request never joins one that forwards: see [`flight::Flights`]).
    manifest_flights: SingleFlight<(ManifestKey, bool), Result<(Manifest, Outcome), Error>>,
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
        Arc::new(Cache {
            store,
            upstreams,
            policy,
            metrics,
            blob_flights: Flights::default(),
            manifest_flights: SingleFlight::default(),
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
    pub fn tag_confirmed(&self, upstream: &Upstream, repo: &RepoName, tag: &str) -> Option<u64> {
        let entry = self.cached_tag(upstream, repo, tag).ok()??;
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

    /// A manifest by tag or digest.
    pub async fn manifest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Manifest, Outcome), Error> {
        self.manifest_for(upstream, repo, reference, true).await
    }

    /// A manifest for a peer that forwarded a miss or a tag to this replica, its owner:
    /// never forwarded again.
    pub async fn peer_manifest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Manifest, Outcome), Error> {
        self.manifest_for(upstream, repo, reference, false).await
    }

    async fn manifest_for(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
        forward: bool,
    ) -> Result<(Manifest, Outcome), Error> {
        let result = match reference {
            Reference::Digest(digest) => {
                self.manifest_by_digest(upstream, repo, digest, forward)
                    .await
            }
            Reference::Tag(tag) => {
                self.manifest_by_tag(upstream, repo, tag.as_str(), forward)
                    .await
            }
        };
        if let Ok((manifest, outcome)) = &result {
            self.metrics.cache_outcome("manifest", *outcome);
            // A pull of every image holding this manifest, for eviction order and `max_age`.
            let _ = self.store.index().touch_owners(
                &manifest.digest,
                self.clock.now(),
                TOUCH_GRANULARITY_MS,
            );
            self.touch_shared(&manifest.digest);
        }
        result
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<(Manifest, Outcome), Error> {
        if self
            .store
            .index()
            .is_linked(&upstream.name, repo.as_str(), digest)
            .map_err(storage::Error::from)?
        {
            if let Some(manifest) = self.stored_manifest(digest).await? {
                return Ok((manifest, Outcome::Hit));
            }
        }
        let key = (upstream.name.clone(), repo.to_string(), digest.to_string());
        if self.known_missing(upstream, &key) {
            return Err(Error::ManifestUnknown);
        }
        // Whether this flight goes to another replica: the owner's own clients and the peers
        // asking it share one flight, which asks the upstream once.
        let forward = forward && self.shared.forwards(digest.as_str());
        let (this, upstream, repo, digest) =
            (self.clone(), upstream.clone(), repo.clone(), digest.clone());
        self.manifest_flights
            .run((key.clone(), forward), move || async move {
                let result = this
                    .fetch_manifest(&upstream, &repo, &digest, forward)
                    .await;
                // Inside the flight, so no request starts another between its end and this.
                this.remember_missing(key, &result);
                result
            })
            .await
            .unwrap_or_else(|| Err(Error::Internal("manifest fetch panicked".into())))
    }

    /// A manifest by digest that this replica does not hold: from the bucket, its owner
    /// (whose answer is final, errors included: only an owner that does not answer sends
    /// this replica to the upstream), or the upstream.
    async fn fetch_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<(Manifest, Outcome), Error> {
        if let Some(manifest) = self.bucket_manifest(upstream, repo, digest).await {
            return Ok((manifest, Outcome::Hit));
        }
        if forward {
            if let Some((manifest, _, _)) = self
                .forwarded_manifest(upstream, repo, digest.as_str(), Some(digest))
                .await?
            {
                return Ok((manifest, Outcome::Miss));
            }
        }
        let remote = upstream.get_manifest(repo, digest.as_str()).await;
        let remote = remote.map_err(manifest_error)?;
        let manifest = self
            .commit_manifest(upstream, repo, remote, Some(digest), false)
            .await?;
        self.persist().await?;
        Ok((manifest, Outcome::Miss))
    }

    /// Whether the upstream said lately that this manifest does not exist (counted as a
    /// request spared).
    fn known_missing(&self, upstream: &Upstream, key: &ManifestKey) -> bool {
        let missing = self.not_found.contains(key);
        if missing {
            self.metrics.upstream_spared(&upstream.name, "not_found");
        }
        missing
    }

    /// Remembers a manifest the upstream said does not exist, for `cache.negative_ttl`; one
    /// that was found is forgotten.
    fn remember_missing(&self, key: ManifestKey, result: &Result<(Manifest, Outcome), Error>) {
        match result {
            Err(Error::ManifestUnknown) => self.not_found.insert(key),
            Ok(_) => self.not_found.remove(&key),
            Err(_) => {}
        }
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
        forward: bool,
    ) -> Result<(Manifest, Outcome), Error> {
        let cached = self.cached_tag(upstream, repo, tag)?;
        if let Some(entry) = &cached {
            let age = self.clock.now().saturating_sub(entry.confirmed);
            if Duration::from_millis(age) < self.policy.tag_ttl {
                if let Some(manifest) = self.stored_manifest(&entry.digest).await? {
                    return Ok((manifest, Outcome::Hit));
                }
            }
        }
        // Revalidation and misses of one tag are shared by every client asking meanwhile.
        let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
        if self.known_missing(upstream, &key) {
            return Err(Error::ManifestUnknown);
        }
        let forward = forward
            && self.shared.forwards(&crate::cluster::Cluster::tag_key(
                &upstream.name,
                repo.as_str(),
                tag,
            ));
        let (this, upstream, repo, tag) =
            (self.clone(), upstream.clone(), repo.clone(), tag.to_owned());
        self.manifest_flights
            .run((key.clone(), forward), move || async move {
                let result = match this.shared_tag(&upstream, &repo, &tag, forward).await {
                    Ok(Some(found)) => Ok(found),
                    Ok(None) => this.refresh_tag(&upstream, &repo, &tag).await,
                    Err(answer) => this.owner_answered(&upstream, &repo, &tag, answer).await,
                };
                this.remember_missing(key, &result);
                result
            })
            .await
            .unwrap_or_else(|| Err(Error::Internal("manifest fetch panicked".into())))
    }

    /// The tag's owner relayed its upstream's failure: ours too, except that what this
    /// replica holds is served stale when the upstream is only unavailable (rate-limiting),
    /// exactly as if this replica had asked it.
    async fn owner_answered(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        answer: Error,
    ) -> Result<(Manifest, Outcome), Error> {
        let Error::Upstream(err) = answer else {
            return Err(answer);
        };
        let held = match self.cached_tag(upstream, repo, tag)? {
            Some(entry) => self.stored_manifest(&entry.digest).await?,
            None => None,
        };
        match held {
            Some(held) => self.serve_stale(upstream, repo, tag, held, err),
            None => Err(Error::Upstream(err)),
        }
    }

    /// Asks the upstream what a tag points to now: a HEAD if we hold a digest for it (cheap,
    /// and free of Docker Hub's pull limit), a GET otherwise. Serves what we hold when the
    /// upstream is unavailable, or slower than `revalidate_timeout`.
    async fn refresh_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
    ) -> Result<(Manifest, Outcome), Error> {
        let cached = self.cached_tag(upstream, repo, tag)?;
        let held = match &cached {
            Some(entry) => self.stored_manifest(&entry.digest).await?,
            None => None,
        };
        let Some(held) = held else {
            let _slot = self.manifest_slot(upstream).await;
            let remote = upstream.get_manifest(repo, tag).await;
            let remote = remote.map_err(manifest_error)?;
            return self.commit_tag(upstream, repo, tag, remote, None).await;
        };
        // The revalidation runs in its own task: when it takes too long, this request is
        // answered stale and the revalidation still ends (and records what it learnt); requests
        // meanwhile join it rather than start another.
        let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
        let (this, upstream_, repo_, tag_, held_) = (
            self.clone(),
            upstream.clone(),
            repo.clone(),
            tag.to_owned(),
            held.clone(),
        );
        let revalidation = self.revalidations.run(key, move || async move {
            this.revalidate(&upstream_, &repo_, &tag_, held_).await
        });
        match tokio::time::timeout(self.policy.revalidate_timeout, revalidation).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(Error::Internal("tag revalidation panicked".into())),
            Err(_) => self.serve_stale(upstream, repo, tag, held, upstream::Error::Timeout),
        }
    }

    /// Revalidates a tag whose manifest we hold: unchanged, it is confirmed; moved, the new
    /// manifest is fetched by its digest and verified.
    async fn revalidate(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
        held: Manifest,
    ) -> Result<(Manifest, Outcome), Error> {
        let _slot = self.manifest_slot(upstream).await;
        let fetched = match upstream.head_manifest(repo, tag).await {
            Ok(head) if head.digest.as_ref() == Some(&held.digest) => {
                // The bucket may have evicted the image while this replica kept it in its hot
                // tier: the tag is then confirmed here only, never listed in the bucket again
                // with its content gone.
                let share = match self.shared.bucket() {
                    Some(bucket) => bucket.has_manifest(&held.digest).await.unwrap_or(true),
                    None => true,
                };
                self.record_tag(upstream, repo, tag, &held.digest, self.clock.now(), share)
                    .await?;
                let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
                self.stale
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&key);
                return Ok((held, Outcome::Revalidated));
            }
            Ok(head) => match head.digest {
                // Moved: fetch the new manifest by its digest, which we then verify.
                Some(digest) => upstream
                    .get_manifest(repo, digest.as_str())
                    .await
                    .map(|m| (m, Some(digest))),
                // The upstream does not say: ask for the tag itself.
                None => upstream.get_manifest(repo, tag).await.map(|m| (m, None)),
            },
            Err(err) => Err(err),
        };
        match fetched {
            Ok((remote, expected)) => {
                self.commit_tag(upstream, repo, tag, remote, expected.as_ref())
                    .await
            }
            Err(err) => self.serve_stale(upstream, repo, tag, held, err),
        }
    }

    /// Commits a manifest fetched for a tag and points the tag at it.
    async fn commit_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        remote: upstream::RemoteManifest,
        expected: Option<&Digest>,
    ) -> Result<(Manifest, Outcome), Error> {
        let manifest = self
            .commit_manifest(upstream, repo, remote, expected, true)
            .await?;
        self.record_tag(
            upstream,
            repo,
            tag,
            &manifest.digest,
            self.clock.now(),
            true,
        )
        .await?;
        self.persist().await?;
        let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
        self.stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key);
        Ok((manifest, Outcome::Miss))
    }

    /// The manifest we hold for a tag the upstream could not confirm, if stale answers are
    /// allowed and the upstream is unavailable (not when it says the tag is gone).
    fn serve_stale(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        held: Manifest,
        err: upstream::Error,
    ) -> Result<(Manifest, Outcome), Error> {
        if !(err.is_unavailable() && self.policy.serve_stale) {
            return Err(manifest_error(err));
        }
        let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
        if self
            .stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key)
        {
            warn!(upstream = %upstream.name, repository = %repo, tag, error = %err, "upstream unavailable, serving cached tag until it answers again");
        }
        Ok((held, Outcome::Stale))
    }

    /// Makes the index durable after a commit (see [`storage::Index::flush_async`]).
    async fn persist(&self) -> Result<(), Error> {
        self.store
            .index()
            .flush_async()
            .await
            .map_err(|e| storage::Error::from(e).into())
    }

    fn cached_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
    ) -> Result<Option<storage::TagEntry>, Error> {
        self.store
            .index()
            .get_tag(&upstream.name, repo.as_str(), tag)
            .map_err(|e| storage::Error::from(e).into())
    }

    /// Points a tag at a digest, confirmed by the upstream at `confirmed` (unix ms), here and,
    /// if `share`, in the bucket for the other replicas.
    async fn record_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        digest: &Digest,
        confirmed: u64,
        share: bool,
    ) -> Result<(), Error> {
        self.put_tag(upstream, repo, tag, digest, confirmed)?;
        if let (true, Some(bucket)) = (share, self.shared.bucket()) {
            let entry = storage::s3::SharedTag {
                digest: digest.clone(),
                confirmed,
            };
            if let Err(err) = bucket
                .put_tag(&upstream.name, repo.as_str(), tag, &entry)
                .await
            {
                warn!(upstream = %upstream.name, repository = %repo, tag, error = %err, "could not record the tag in the bucket");
            }
            self.share_tag_ref(&upstream.name, repo.as_str(), tag, digest);
        }
        Ok(())
    }

    fn put_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        digest: &Digest,
        confirmed: u64,
    ) -> Result<(), Error> {
        let index = self.store.index();
        // A tag always names an image: what it names is evicted as one.
        index
            .add_member(digest, digest, self.clock.now())
            .and_then(|()| index.put_tag(&upstream.name, repo.as_str(), tag, digest, confirmed))
            .map_err(|e| storage::Error::from(e).into())
    }

    /// Verifies a manifest from the upstream against the digest we asked for (or the one the
    /// upstream claims), stores it and links it and everything it references to the repository.
    /// It joins the images that hold it already; fetched for a tag, or by digest with no image
    /// holding it, it roots an image of its own.
    async fn commit_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        remote: upstream::RemoteManifest,
        expected: Option<&Digest>,
        tagged: bool,
    ) -> Result<Manifest, Error> {
        let digest = Digest::sha256_of(&remote.bytes);
        if let Some(expected) = expected.or(remote.digest.as_ref()) {
            if *expected != digest {
                warn!(upstream = %upstream.name, repository = %repo, %expected, actual = %digest, "manifest digest mismatch, not cached");
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                });
            }
        }
        let manifest = Manifest {
            bytes: remote.bytes,
            digest,
            media_type: remote.media_type,
        };
        self.keep_manifest(upstream, repo, manifest, tagged, true)
            .await
    }

    /// Stores a verified manifest here (and, if `share`, in the bucket), links it and what
    /// it references to the repository, and records the images it belongs to.
    async fn keep_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        manifest: Manifest,
        tagged: bool,
        share: bool,
    ) -> Result<Manifest, Error> {
        if let (true, Some(bucket)) = (share, self.shared.bucket()) {
            // In the bucket before any tag points at it, so a replica reading the tag
            // finds the manifest.
            let shared = bucket
                .put_manifest(
                    &manifest.digest,
                    manifest.bytes.clone(),
                    &manifest.media_type,
                )
                .await;
            let linked = match shared {
                Ok(()) => {
                    bucket
                        .put_link(&upstream.name, repo.as_str(), &manifest.digest)
                        .await
                }
                Err(err) => Err(err),
            };
            match linked {
                Ok(()) => self.bucket_written(manifest.bytes.len() as u64),
                Err(err) => {
                    warn!(digest = %manifest.digest, error = %err, "could not write the manifest to the bucket; it stays on this replica only")
                }
            }
        }
        // fsync and rename: blocking, off the async workers.
        let (store, copy) = (self.store.clone(), manifest.clone());
        let stored = tokio::task::spawn_blocking(move || {
            store.put_verified(&copy.digest, &copy.bytes, &copy.media_type)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
        match stored {
            Ok(()) => {}
            Err(err) if err.is_unwritable() => {
                // A full or read-only disk must not take the mirror down: serve what we
                // fetched, uncached.
                warn!(digest = %manifest.digest, error = %err, "store full or read-only, manifest served without caching");
                self.metrics.passthrough();
                return Ok(manifest);
            }
            Err(err) => return Err(err.into()),
        }
        let digest = &manifest.digest;
        let index = self.store.index();
        let link = |d: &Digest| {
            index
                .link(&upstream.name, repo.as_str(), d)
                .map_err(storage::Error::from)
        };
        link(digest)?;
        // A manifest from this repository vouches for the blobs it names as its content, so
        // those already in the store (shared base layers) are served without asking the
        // upstream again. Its `subject` vouches for nothing: registries accept any digest there.
        let children: Vec<Digest> = media_type::referenced_digests(&manifest.bytes)
            .into_iter()
            .map(|(referenced, _)| referenced)
            .collect();
        for referenced in &children {
            link(referenced)?;
        }
        index
            .set_children(digest, &children)
            .map_err(storage::Error::from)?;
        let mut roots = index.owners(digest).map_err(storage::Error::from)?;
        if roots.is_empty() || (tagged && !roots.contains(digest)) {
            roots.push(digest.clone());
        }
        let now = self.clock.now();
        for root in &roots {
            index
                .add_member(root, digest, now)
                .map_err(storage::Error::from)?;
        }
        self.manifests.insert(&manifest);
        self.evictor.committed();
        debug!(upstream = %upstream.name, repository = %repo, %digest, "manifest cached");
        Ok(manifest)
    }

    /// A manifest from the store, if we hold it with its media type: from memory when it is
    /// there, else read and hashed on the blocking pool.
    async fn stored_manifest(&self, digest: &Digest) -> Result<Option<Manifest>, Error> {
        let Some(entry) = self.store.stat(digest)? else {
            return Ok(None);
        };
        let Some(media_type) = entry.media_type else {
            return Ok(None);
        };
        if let Some(manifest) = self.manifests.get(digest) {
            return Ok(Some(manifest));
        }
        let (store, wanted) = (self.store.clone(), digest.clone());
        let read = tokio::task::spawn_blocking(move || {
            store
                .blobs()
                .read(&wanted)
                .map(|bytes| (Digest::sha256_of(&bytes) == wanted, bytes))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
        match read {
            // Small enough to hash on every read: a damaged file is dropped and fetched again,
            // never served under the digest it no longer has.
            Ok((false, bytes)) => {
                self.forget_damaged(digest, Some(bytes.len() as u64), entry.size);
                Ok(None)
            }
            Ok((true, bytes)) => {
                let manifest = Manifest {
                    bytes: bytes.into(),
                    digest: digest.clone(),
                    media_type,
                };
                self.manifests.insert(&manifest);
                Ok(Some(manifest))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.forget_damaged(digest, None, entry.size);
                Ok(None)
            }
            Err(err) => Err(storage::Error::from(err).into()),
        }
    }

    /// Tags of a repository: the upstream's list, or the tags we hold when it is unavailable.
    pub async fn tags(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        query: &str,
    ) -> Result<(Bytes, Outcome), Error> {
        match upstream.tags(repo, query).await {
            Ok(body) => Ok((body, Outcome::Miss)),
            Err(err) if err.is_unavailable() && self.policy.serve_stale => {
                let tags = self
                    .store
                    .index()
                    .tags(&upstream.name, repo.as_str())
                    .map_err(storage::Error::from)?;
                if tags.is_empty() {
                    return Err(Error::Upstream(err));
                }
                let body = serde_json::json!({ "name": repo.as_str(), "tags": tags });
                Ok((Bytes::from(body.to_string()), Outcome::Stale))
            }
            Err(upstream::Error::NotFound) => Err(Error::NameUnknown),
            Err(err) => Err(Error::Upstream(err)),
        }
    }

    /// Referrers of a manifest (per `artifactType` filter), cached like tags: within `tag_ttl`
    /// from the index, after it asked again, and served stale when the upstream is unavailable,
    /// so signature verification (cosign, notation) keeps working offline. Only referrers of a
    /// subject we hold are kept, so the index holds no more of them than the store has images.
    pub async fn referrers(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        query: &str,
    ) -> Result<(Bytes, Outcome), Error> {
        let index = &self.store.index();
        let cached = index
            .get_referrers(&upstream.name, repo.as_str(), digest, query)
            .map_err(storage::Error::from)?;
        if let Some(entry) = &cached {
            let age = self.clock.now().saturating_sub(entry.confirmed);
            if Duration::from_millis(age) < self.policy.tag_ttl {
                return Ok((Bytes::from(entry.body.clone()), Outcome::Hit));
            }
        }
        match upstream.referrers(repo, digest, query).await {
            Ok(body) => {
                self.keep_referrers(upstream, repo, digest, query, &body)?;
                Ok((body, Outcome::Miss))
            }
            Err(err) if err.is_unavailable() && self.policy.serve_stale && cached.is_some() => {
                debug!(upstream = %upstream.name, repository = %repo, %digest, error = %err, "upstream unavailable, serving cached referrers");
                let body = cached.map(|entry| entry.body).unwrap_or_default();
                Ok((Bytes::from(body), Outcome::Stale))
            }
            Err(err) => {
                if cached.is_some() && err == upstream::Error::NotFound {
                    // The upstream no longer answers for it: neither do we.
                    index
                        .remove_referrers(&upstream.name, repo.as_str(), digest, query)
                        .map_err(storage::Error::from)?;
                }
                Err(manifest_error(err))
            }
        }
    }

    /// Records the upstream's referrers answer, if its subject is in the store and the body is
    /// text (a referrers index is JSON; anything else is passed on but not kept).
    fn keep_referrers(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        query: &str,
        body: &Bytes,
    ) -> Result<(), Error> {
        if self.store.stat(digest)?.is_none() {
            return Ok(());
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return Ok(());
        };
        // Filters are chosen by clients: a few per subject are kept, not one per made-up value.
        const MAX_REFERRERS_QUERIES: usize = 8;
        let index = &self.store.index();
        let (name, repository) = (&upstream.name, repo.as_str());
        if index
            .get_referrers(name, repository, digest, query)
            .map_err(storage::Error::from)?
            .is_none()
            && index
                .referrers_queries(name, repository, digest)
                .map_err(storage::Error::from)?
                >= MAX_REFERRERS_QUERIES
        {
            return Ok(());
        }
        self.store
            .index()
            .put_referrers(
                &upstream.name,
                repo.as_str(),
                digest,
                query,
                text.to_owned(),
                self.clock.now(),
            )
            .map_err(|e| storage::Error::from(e).into())
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
