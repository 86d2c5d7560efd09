//! The pull-through policy: answer from the store when we may, fetch from the upstream when we
//! must, verify everything before it is committed, and share every fetch between the clients
//! that want it at the same time.
//!
//! This is the only module that knows both storage and upstreams. It knows nothing of HTTP
//! requests: the API asks it for manifests and blobs and turns its answers into responses.

mod evict;
mod flight;
mod passthrough;
mod single;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use evict::{Evicted, Evictor, ReadGuard, Readers};
pub use flight::{file_stream, Progress, CHUNK};
use flight::{Flight, FlightReader, Flights, Joined};
use single::SingleFlight;

use crate::metrics::Metrics;
use crate::oci::{media_type, Digest, DigestHasher, Reference, RepoName};
use crate::storage::{self, Store};
use crate::upstream::{self, Upstream, Upstreams};

/// How many times a dropped blob download is resumed with a `Range` request.
const RESUME_ATTEMPTS: u32 = 3;
/// Free space kept on the store's disk: a download that would eat into it passes through.
const DISK_RESERVE: u64 = 1 << 20;
/// Bytes gathered from the network before one write to disk.
const WRITE_BATCH: usize = 256 * 1024;

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

impl From<storage::Error> for Error {
    fn from(err: storage::Error) -> Self {
        Error::Internal(err.to_string())
    }
}

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

/// A verified manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    pub digest: Digest,
    pub media_type: String,
}

/// A blob ready to be streamed.
pub struct Blob {
    pub size: u64,
    pub outcome: Outcome,
    pub body: BlobBody,
}

/// Where a blob's bytes come from.
pub enum BlobBody {
    /// A committed file, pinned against eviction while it is read.
    Stored(Arc<File>, ReadGuard),
    /// A download in flight.
    Flight(FlightReader),
    /// Straight from the upstream, not cached (it cannot fit, or the disk is full); still
    /// verified before its last bytes go out.
    Direct(reqwest::Response, Digest),
}

impl BlobBody {
    /// The bytes `start..end`.
    pub fn stream(
        self,
        start: u64,
        end: u64,
    ) -> std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>> {
        match self {
            BlobBody::Stored(file, guard) => {
                // The pin travels with the stream and is released when the response ends.
                let chunks = Box::pin(file_stream(file, start, end));
                Box::pin(futures_util::stream::unfold(
                    (chunks, guard),
                    |(mut chunks, guard)| async move {
                        let chunk = chunks.next().await?;
                        Some((chunk, (chunks, guard)))
                    },
                ))
            }
            BlobBody::Flight(reader) => Box::pin(reader.stream(start, end)),
            BlobBody::Direct(response, digest) => {
                Box::pin(passthrough::verified_range(response, digest, start, end))
            }
        }
    }
}

/// Cache policy settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub tag_ttl: Duration,
    pub serve_stale: bool,
    /// `storage.max_size` in bytes; 0 is unbounded.
    pub max_size: u64,
    pub low_watermark_percent: u8,
    /// Upstream fetches at once, per upstream.
    pub max_concurrent_fetches: usize,
}

impl Policy {
    pub fn from_config(config: &crate::config::Config) -> Policy {
        Policy {
            tag_ttl: config.cache.tag_ttl.0,
            serve_stale: config.cache.serve_stale,
            max_size: config.storage.max_size.0,
            low_watermark_percent: config.storage.low_watermark_percent,
            max_concurrent_fetches: config.cache.max_concurrent_fetches,
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
    manifest_flights: SingleFlight<ManifestKey, Result<(Manifest, Outcome), Error>>,
    readers: Arc<Readers>,
    evictor: Arc<Evictor>,
    /// Per upstream, a permit per fetch under way.
    fetch_slots: HashMap<String, Arc<Semaphore>>,
    /// Tags being served stale, so the warning is logged once per tag, not per request.
    stale: Mutex<HashSet<ManifestKey>>,
}

impl Cache {
    pub fn new(
        store: Arc<Store>,
        upstreams: Arc<Upstreams>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Arc<Cache> {
        let readers = Arc::new(Readers::default());
        let evictor = Arc::new(Evictor::new(
            store.clone(),
            readers.clone(),
            metrics.clone(),
            policy.max_size,
            policy.low_watermark_percent,
        ));
        let fetch_slots = upstreams
            .all()
            .into_iter()
            .map(|u| {
                (
                    u.name.clone(),
                    Arc::new(Semaphore::new(policy.max_concurrent_fetches)),
                )
            })
            .collect();
        Arc::new(Cache {
            store,
            upstreams,
            policy,
            metrics,
            blob_flights: Flights::default(),
            manifest_flights: SingleFlight::default(),
            readers,
            evictor,
            fetch_slots,
            stale: Mutex::default(),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
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

    /// Waits for a fetch slot of this upstream.
    async fn fetch_slot(&self, upstream: &Upstream) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = self.fetch_slots.get(&upstream.name)?;
        slots.clone().acquire_owned().await.ok()
    }

    /// A manifest by tag or digest.
    pub async fn manifest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Manifest, Outcome), Error> {
        let result = match reference {
            Reference::Digest(digest) => self.manifest_by_digest(upstream, repo, digest).await,
            Reference::Tag(tag) => self.manifest_by_tag(upstream, repo, tag.as_str()).await,
        };
        if let Ok((_, outcome)) = &result {
            self.metrics.cache_outcome("manifest", *outcome);
        }
        result
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(Manifest, Outcome), Error> {
        if self
            .store
            .index
            .is_linked(&upstream.name, repo.as_str(), digest)
            .map_err(storage::Error::from)?
        {
            if let Some(manifest) = self.stored_manifest(digest)? {
                return Ok((manifest, Outcome::Hit));
            }
        }
        let key = (upstream.name.clone(), repo.to_string(), digest.to_string());
        let (this, upstream, repo, digest) =
            (self.clone(), upstream.clone(), repo.clone(), digest.clone());
        self.manifest_flights
            .run(key, move || async move {
                let remote = upstream.get_manifest(&repo, digest.as_str()).await;
                let remote = remote.map_err(manifest_error)?;
                let manifest = this.commit_manifest(&upstream, &repo, remote, Some(&digest))?;
                this.persist().await?;
                Ok((manifest, Outcome::Miss))
            })
            .await
            .unwrap_or_else(|| Err(Error::Internal("manifest fetch panicked".into())))
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
    ) -> Result<(Manifest, Outcome), Error> {
        let cached = self.cached_tag(upstream, repo, tag)?;
        if let Some(entry) = &cached {
            let age = storage::now_millis().saturating_sub(entry.confirmed);
            if Duration::from_millis(age) < self.policy.tag_ttl {
                if let Some(manifest) = self.stored_manifest(&entry.digest)? {
                    return Ok((manifest, Outcome::Hit));
                }
            }
        }
        // Revalidation and misses of one tag are shared by every client asking meanwhile.
        let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
        let (this, upstream, repo, tag) =
            (self.clone(), upstream.clone(), repo.clone(), tag.to_owned());
        self.manifest_flights
            .run(key, move || async move {
                this.refresh_tag(&upstream, &repo, &tag).await
            })
            .await
            .unwrap_or_else(|| Err(Error::Internal("manifest fetch panicked".into())))
    }

    /// Asks the upstream what a tag points to now: a HEAD if we hold a digest for it (cheap,
    /// and free of Docker Hub's pull limit), a GET otherwise. Serves what we hold when the
    /// upstream is unavailable.
    async fn refresh_tag(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
    ) -> Result<(Manifest, Outcome), Error> {
        let cached = self.cached_tag(upstream, repo, tag)?;
        let held = match &cached {
            Some(entry) => self.stored_manifest(&entry.digest)?,
            None => None,
        };
        let _slot = self.fetch_slot(upstream).await;
        let result = match &held {
            Some(manifest) => match upstream.head_manifest(repo, tag).await {
                Ok(head) if head.digest.as_ref() == Some(&manifest.digest) => {
                    self.put_tag(upstream, repo, tag, &manifest.digest)?;
                    let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
                    self.stale.lock().expect("stale lock").remove(&key);
                    return Ok((manifest.clone(), Outcome::Revalidated));
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
            },
            None => upstream.get_manifest(repo, tag).await.map(|m| (m, None)),
        };
        let key = (upstream.name.clone(), repo.to_string(), tag.to_owned());
        match result {
            Ok((remote, expected)) => {
                let manifest = self.commit_manifest(upstream, repo, remote, expected.as_ref())?;
                self.put_tag(upstream, repo, tag, &manifest.digest)?;
                self.persist().await?;
                self.stale.lock().expect("stale lock").remove(&key);
                Ok((manifest, Outcome::Miss))
            }
            Err(err) if err.is_unavailable() && self.policy.serve_stale && held.is_some() => {
                if self.stale.lock().expect("stale lock").insert(key) {
                    warn!(upstream = %upstream.name, repository = %repo, tag, error = %err, "upstream unavailable, serving cached tag until it answers again");
                }
                Ok((held.expect("checked above"), Outcome::Stale))
            }
            Err(err) => Err(manifest_error(err)),
        }
    }

    /// Makes the index durable after a commit (see [`storage::Index::flush_async`]).
    async fn persist(&self) -> Result<(), Error> {
        self.store
            .index
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
            .index
            .get_tag(&upstream.name, repo.as_str(), tag)
            .map_err(|e| storage::Error::from(e).into())
    }

    fn put_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        digest: &Digest,
    ) -> Result<(), Error> {
        self.store
            .index
            .put_tag(
                &upstream.name,
                repo.as_str(),
                tag,
                digest,
                storage::now_millis(),
            )
            .map_err(|e| storage::Error::from(e).into())
    }

    /// Verifies a manifest from the upstream against the digest we asked for (or the one the
    /// upstream claims), stores it and links it and everything it references to the repository.
    fn commit_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        remote: upstream::RemoteManifest,
        expected: Option<&Digest>,
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
        match self
            .store
            .put_verified(&manifest.digest, &manifest.bytes, &manifest.media_type)
        {
            Ok(()) => {}
            Err(storage::Error::NoSpace) => {
                // A full disk must not take the mirror down: serve what we fetched, uncached.
                warn!(digest = %manifest.digest, "store full, manifest served without caching");
                self.metrics.passthrough();
                return Ok(manifest);
            }
            Err(err) => return Err(err.into()),
        }
        let digest = &manifest.digest;
        let index = &self.store.index;
        let link = |d: &Digest| {
            index
                .link(&upstream.name, repo.as_str(), d)
                .map_err(storage::Error::from)
        };
        link(digest)?;
        // A manifest from this repository vouches for the blobs it names as its content, so
        // those already in the store (shared base layers) are served without asking the
        // upstream again. Its `subject` vouches for nothing: registries accept any digest there.
        for (referenced, _) in media_type::referenced_digests(&manifest.bytes) {
            link(&referenced)?;
        }
        self.evictor.committed();
        debug!(upstream = %upstream.name, repository = %repo, %digest, "manifest cached");
        Ok(manifest)
    }

    /// A manifest from the store, if we hold it with its media type.
    fn stored_manifest(&self, digest: &Digest) -> Result<Option<Manifest>, Error> {
        let Some(entry) = self.store.stat(digest)? else {
            return Ok(None);
        };
        let Some(media_type) = entry.media_type else {
            return Ok(None);
        };
        match self.store.blobs.read(digest) {
            Ok(bytes) => {
                let _ = self.store.touch(digest);
                Ok(Some(Manifest {
                    bytes: bytes.into(),
                    digest: digest.clone(),
                    media_type,
                }))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(storage::Error::from(err).into()),
        }
    }

    /// A blob's size without its body (for `HEAD`): the store, a download in flight, or an
    /// upstream `HEAD`.
    pub async fn blob_size(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(u64, Outcome), Error> {
        if let Some(size) = self.linked_blob_size(upstream, repo, digest).await? {
            return Ok((size, Outcome::Hit));
        }
        match upstream.head_blob(repo, digest).await {
            Ok(size) => Ok((size, Outcome::Miss)),
            Err(err) => Err(blob_error(err)),
        }
    }

    /// The size of a blob we may serve under this repository from the store; `None` if we do
    /// not hold it. A blob held for another repository is checked with this repository's
    /// upstream (a HEAD, no download) before it is served under its name.
    async fn linked_blob_size(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, Error> {
        let Some(entry) = self.store.stat(digest)? else {
            return Ok(None);
        };
        if self
            .store
            .index
            .is_linked(&upstream.name, repo.as_str(), digest)
            .map_err(storage::Error::from)?
        {
            return Ok(Some(entry.size));
        }
        upstream.head_blob(repo, digest).await.map_err(blob_error)?;
        self.store
            .index
            .link(&upstream.name, repo.as_str(), digest)
            .map_err(storage::Error::from)?;
        Ok(Some(entry.size))
    }

    /// A blob to stream: from the store, or joined to (or starting) its single download.
    pub async fn blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Blob, Error> {
        // Twice at most: a download that commits between our look-up and our joining is served
        // from the store on the second round.
        for _ in 0..2 {
            if self
                .linked_blob_size(upstream, repo, digest)
                .await?
                .is_some()
            {
                match self.store.blobs.open_blob(digest) {
                    Ok(file) => {
                        let size = file.metadata().map_err(storage::Error::from)?.len();
                        let _ = self.store.touch(digest);
                        self.metrics.cache_outcome("blob", Outcome::Hit);
                        return Ok(Blob {
                            size,
                            outcome: Outcome::Hit,
                            body: BlobBody::Stored(Arc::new(file), self.readers.pin(digest)),
                        });
                    }
                    // Evicted between the look-up and the open: fetch it again.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(storage::Error::from(err).into()),
                }
            }
            let store = &self.store;
            let joined = self
                .blob_flights
                .join(
                    digest,
                    (&upstream.name, repo.as_str()),
                    || store.blobs.create_tmp(),
                    // The index, not the file, says committed: eviction drops the entry before
                    // the file, and `linked_blob_size` above reads the index too.
                    || {
                        let stored = matches!(store.stat(digest), Ok(Some(_)));
                        let linked = store.index.is_linked(&upstream.name, repo.as_str(), digest);
                        stored && linked.unwrap_or(false)
                    },
                )
                .map_err(storage::Error::from)?;
            let mut reader = match joined {
                None => continue,
                Some(Joined::Existing(flight)) => {
                    if !flight.owned_by(&upstream.name, repo.as_str()) {
                        // Started for another repository: this one's upstream must vouch for
                        // the blob before it is served under this name.
                        upstream.head_blob(repo, digest).await.map_err(blob_error)?;
                        self.store
                            .index
                            .link(&upstream.name, repo.as_str(), digest)
                            .map_err(storage::Error::from)?;
                    }
                    self.metrics.single_flight_join();
                    flight.reader()
                }
                Some(Joined::Started(flight, reader)) => {
                    let this = self.clone();
                    let (upstream, repo, digest) = (upstream.clone(), repo.clone(), digest.clone());
                    // Its own task: a client that disconnects does not abort the fill.
                    tokio::spawn(
                        async move { this.download(upstream, repo, digest, flight).await },
                    );
                    reader
                }
            };
            self.metrics.cache_outcome("blob", Outcome::Miss);
            return match reader.size().await? {
                Some(size) => Ok(Blob {
                    size,
                    outcome: Outcome::Miss,
                    body: BlobBody::Flight(reader),
                }),
                None => self.pass_through(upstream, repo, digest).await,
            };
        }
        Err(Error::Internal("blob vanished while being served".into()))
    }

    /// A blob the store will not take, straight from the upstream to this client.
    async fn pass_through(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Blob, Error> {
        let response = upstream
            .get_blob(repo, digest, 0)
            .await
            .map_err(blob_error)?;
        let size = response.content_length().ok_or_else(|| {
            Error::Upstream(upstream::Error::Invalid(
                "blob without Content-Length".into(),
            ))
        })?;
        self.metrics.passthrough();
        Ok(Blob {
            size,
            outcome: Outcome::Miss,
            body: BlobBody::Direct(response, digest.clone()),
        })
    }

    /// Runs one blob download to its end: stream to `tmp/` while hashing, resume on a dropped
    /// connection, verify, commit, record, and tell the readers.
    async fn download(
        self: Arc<Self>,
        upstream: Arc<Upstream>,
        repo: RepoName,
        digest: Digest,
        flight: Arc<Flight>,
    ) {
        let result = self.fetch_into(&upstream, &repo, &digest, &flight).await;
        let progress = match result {
            Ok(Some(total)) => {
                self.evictor.committed();
                Progress::Done { total }
            }
            Ok(None) => {
                let _ = std::fs::remove_file(flight.tmp_path());
                Progress::PassThrough
            }
            Err(err) => {
                warn!(upstream = %upstream.name, repository = %repo, %digest, error = %err, "blob download failed, nothing cached");
                let _ = std::fs::remove_file(flight.tmp_path());
                Progress::Failed(err)
            }
        };
        self.blob_flights.finish(&digest, &flight, progress);
    }

    /// Downloads into the flight's file and commits; `None` when the blob must pass through
    /// uncached instead.
    async fn fetch_into(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        flight: &Flight,
    ) -> Result<Option<u64>, Error> {
        let _slot = self.fetch_slot(upstream).await;
        let started = std::time::Instant::now();
        let mut response = upstream
            .get_blob(repo, digest, 0)
            .await
            .map_err(blob_error)?;
        let total = response.content_length();
        if let Some(total) = total {
            if !self.evictor.fits(total) {
                info!(%digest, bytes = total, "blob larger than the cache may hold, passing it through");
                return Ok(None);
            }
            if self
                .store
                .blobs
                .available_bytes()
                .is_some_and(|free| free < total.saturating_add(DISK_RESERVE))
            {
                warn!(%digest, bytes = total, "store disk nearly full, passing the blob through uncached");
                return Ok(None);
            }
        }
        flight.publish(Progress::Running { written: 0, total });
        let file = flight.file().clone();
        let mut hasher = DigestHasher::new();
        let mut written: u64 = 0;
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut resumes = 0;
        loop {
            let chunk = match response.chunk().await {
                Ok(chunk) => chunk,
                Err(err) if resumes < RESUME_ATTEMPTS => {
                    resumes += 1;
                    let from = written + batch.len() as u64;
                    info!(upstream = %upstream.name, %digest, from, error = %err, "blob download dropped, resuming");
                    response = upstream
                        .get_blob(repo, digest, from)
                        .await
                        .map_err(blob_error)?;
                    continue;
                }
                Err(err) => {
                    return Err(Error::Upstream(upstream::Error::Transport(err.to_string())))
                }
            };
            let end = chunk.is_none();
            if let Some(chunk) = chunk {
                batch.extend_from_slice(&chunk);
                self.metrics
                    .upstream_bytes(&upstream.name, chunk.len() as u64);
            }
            if batch.len() >= WRITE_BATCH || (end && !batch.is_empty()) {
                let data = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH));
                let file = file.clone();
                let offset = written;
                let len = data.len() as u64;
                hasher = tokio::task::spawn_blocking(move || -> std::io::Result<DigestHasher> {
                    hasher.update(&data);
                    file.write_all_at(&data, offset)?;
                    Ok(hasher)
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(|err| match storage::Error::from(err) {
                    storage::Error::NoSpace => {
                        // Readers of this download see a broken transfer; the next request
                        // finds the disk full before downloading and passes through.
                        self.metrics.passthrough();
                        Error::Internal("store disk full during download".into())
                    }
                    other => other.into(),
                })?;
                written += len;
                if total.is_some_and(|t| written > t) {
                    return Err(Error::Upstream(upstream::Error::Invalid(
                        "blob longer than its Content-Length".into(),
                    )));
                }
                flight.publish(Progress::Running { written, total });
            }
            if end {
                break;
            }
        }
        if total.is_some_and(|t| written != t) {
            return Err(Error::Upstream(upstream::Error::Invalid(
                "blob shorter than its Content-Length".into(),
            )));
        }
        let actual = hasher.finish();
        if actual != *digest {
            warn!(upstream = %upstream.name, repository = %repo, expected = %digest, %actual, "blob digest mismatch, not cached");
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
            });
        }
        let store = self.store.clone();
        let (file, target) = (flight.file().clone(), digest.clone());
        let tmp = flight.tmp_path().to_owned();
        tokio::task::spawn_blocking(move || -> Result<(), storage::Error> {
            store.blobs.commit(&tmp, &file, &target)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        self.store.record(digest, written, None)?;
        self.store
            .index
            .link(&upstream.name, repo.as_str(), digest)
            .map_err(storage::Error::from)?;
        self.persist().await?;
        debug!(upstream = %upstream.name, repository = %repo, %digest, bytes = written, seconds = started.elapsed().as_secs_f64(), "blob cached");
        Ok(Some(written))
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
                    .index
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
        let index = &self.store.index;
        let cached = index
            .get_referrers(&upstream.name, repo.as_str(), digest, query)
            .map_err(storage::Error::from)?;
        if let Some(entry) = &cached {
            let age = storage::now_millis().saturating_sub(entry.confirmed);
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
        let index = &self.store.index;
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
            .index
            .put_referrers(
                &upstream.name,
                repo.as_str(),
                digest,
                query,
                text.to_owned(),
                storage::now_millis(),
            )
            .map_err(|e| storage::Error::from(e).into())
    }
}

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
