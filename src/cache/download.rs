//! Filling the store: one task per blob download streams the upstream's bytes into `tmp/`
//! while hashing them, resumes a dropped or stalled transfer with `Range`, verifies, commits,
//! records, and tells the readers of the flight how far it got.
//!
//! The store may refuse a download at any point: the size limit or the free-space reserve
//! reached while writing (a body without Content-Length has no size to check up front), or the
//! disk full, over quota or read-only at the first write, a later one, the fsync or the rename.
//! None of that breaks a transfer: a blob refused before it was verified turns into
//! pass-through for its readers, one verified but not committed is served from the open file.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::chain::{Answer, Link};
use super::flight::{Download, Flight, Progress, Source};
use super::{blob_error, Cache, Error};
use crate::oci::DigestHasher;
use crate::storage;
use crate::upstream;

/// How many times a dropped or stalled blob download is resumed with a `Range` request.
const RESUME_ATTEMPTS: u32 = 3;
/// Bytes gathered from the network before one write to disk.
const WRITE_BATCH: usize = 256 * 1024;

/// A batch being hashed and written on the blocking pool; it hands the hasher back.
type Write = tokio::task::JoinHandle<std::io::Result<DigestHasher>>;

/// How a download ended, short of failing.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    /// Verified, committed and recorded; `publish` when it came from the upstream and the
    /// shared bucket should have it too.
    Committed { total: u64, publish: bool },
    /// Verified, but the store refused the commit: served from the open file, not cached.
    Uncached(u64),
    /// The store refused the blob after its first `valid` bytes (0: before any): its readers
    /// go on from the upstream.
    PassThrough { valid: u64 },
}

/// Where a download's bytes come from. Only the upstream costs a fetch the upstream counts:
/// the shared bucket holds what a replica of the cluster committed, the owner (a peer) runs
/// the cluster's single flight of the digest.
#[derive(Clone)]
pub(super) enum Origin {
    Upstream,
    Bucket,
    Peer(crate::cluster::Member),
}

impl Origin {
    fn name(&self) -> &'static str {
        match self {
            Origin::Upstream => "upstream",
            Origin::Bucket => "bucket",
            Origin::Peer(_) => "peer",
        }
    }
}

/// A response body being read, whatever its origin.
pub(super) struct Body {
    /// The length of this body, if it says.
    pub len: Option<u64>,
    pub chunks: BoxStream<'static, Result<Bytes, String>>,
}

/// The minimum-rate rule of a blob download: at least `min_bytes` in every `window`, or the
/// transfer counts as stalled (a trickle keeps a per-read timeout happy forever).
struct RateFloor {
    window: Duration,
    min_bytes: u64,
    window_end: Instant,
    in_window: u64,
}

/// Why no chunk came.
enum ChunkError {
    Transport(String),
    Stalled,
}

impl RateFloor {
    fn new(window: Duration, min_bytes: u64) -> RateFloor {
        RateFloor {
            window,
            min_bytes,
            window_end: Instant::now() + window,
            in_window: 0,
        }
    }

    /// A fresh window, for a new request.
    fn restart(&mut self) {
        self.window_end = Instant::now() + self.window;
        self.in_window = 0;
    }

    /// The next chunk of `body`, or `Stalled` when the window closes before `min_bytes`
    /// arrived in it.
    async fn chunk(&mut self, body: &mut Body) -> Result<Option<Bytes>, ChunkError> {
        match tokio::time::timeout_at(self.window_end, body.chunks.next()).await {
            Ok(Some(Ok(chunk))) => {
                self.in_window = self.in_window.saturating_add(chunk.len() as u64);
                if self.in_window >= self.min_bytes {
                    self.restart();
                }
                Ok(Some(chunk))
            }
            Ok(None) => Ok(None),
            Ok(Some(Err(err))) => Err(ChunkError::Transport(err)),
            Err(_) => Err(ChunkError::Stalled),
        }
    }
}

impl Cache {
    /// Runs one blob download to its end and tells the readers. The [`Download`] guard ends
    /// the flight failed if this task ends any other way (a panic included).
    pub(super) async fn download(self: Arc<Self>, download: Download) {
        let source = download.source().clone();
        #[cfg(feature = "test-hooks")]
        if self.take_injected_panic(&source.digest) {
            panic!("injected panic in the download of {}", source.digest);
        }
        let result = self.fetch_into(&source, &download).await;
        let (upstream, repo, digest) = (&source.upstream, &source.repo, &source.digest);
        let progress = match result {
            Ok(Fetched::Committed { total, publish }) => {
                self.evictor.committed();
                // Counted from before the readers are answered, so a test that saw its
                // pull end also sees the upload under way.
                let _pending = publish.then(|| self.shared.evict.pending());
                download.finish_committed(Progress::Done { total });
                if publish {
                    // After the readers are answered: they read the local file, and peers
                    // asking meanwhile are served from it too.
                    self.publish_fetched_blob(&source).await;
                }
                return;
            }
            Ok(Fetched::Uncached(total)) => {
                self.abort_tmp(download.tmp_path());
                self.metrics.passthrough();
                Progress::Done { total }
            }
            Ok(Fetched::PassThrough { valid }) => {
                self.abort_tmp(download.tmp_path());
                Progress::PassThrough { valid }
            }
            Err(err) => {
                warn!(upstream = %upstream.name, repository = %repo, %digest, error = %err, "blob download failed, nothing cached");
                self.abort_tmp(download.tmp_path());
                Progress::Failed(err)
            }
        };
        download.finish(progress);
    }

    /// Removes a download's temporary file, on the blocking pool.
    pub(super) fn abort_tmp(&self, tmp: &std::path::Path) {
        let (store, tmp) = (self.store.clone(), tmp.to_owned());
        drop(tokio::task::spawn_blocking(move || {
            store.blobs().abort(&tmp)
        }));
    }

    /// Why the store will not take `bytes` more of a blob that will then be `size` bytes
    /// long, if it will not.
    async fn refuses(&self, size: u64, bytes: u64) -> Option<&'static str> {
        if !self.evictor.fits(size) {
            return Some("blob larger than the cache may hold");
        }
        // statvfs, on the blocking pool like every file-system call.
        let free = self
            .facts
            .local(|store| Ok(store.blobs().available_bytes()))
            .await
            .ok()
            .flatten()?;
        (free < bytes.saturating_add(self.policy.min_free)).then_some("store disk nearly full")
    }

    /// Waits for a write of the download: the hasher back, or, if the store refused it, how
    /// the download ends (its readers go on from the upstream after the `written` bytes that
    /// landed before it).
    async fn landed(
        &self,
        write: Write,
        digest: &crate::oci::Digest,
        written: u64,
    ) -> Result<Result<DigestHasher, Fetched>, Error> {
        let wrote = write.await.map_err(|e| Error::Internal(e.to_string()))?;
        match wrote.map_err(storage::Error::from) {
            Ok(hasher) => Ok(Ok(hasher)),
            Err(err) if err.is_unwritable() => {
                warn!(%digest, written, error = %err, "store refused a write, passing the blob through");
                self.metrics.passthrough();
                Ok(Err(Fetched::PassThrough { valid: written }))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The upstream, in place of a bucket or peer that failed: counted, and logged.
    fn fall_back(&self, origin: Origin, digest: &crate::oci::Digest, err: &Error) -> Origin {
        match &origin {
            Origin::Peer(member) => {
                warn!(peer = member.address(), %digest, error = %err, "owner unreachable, fetching the blob from the upstream here");
                self.shared.fell_back(member);
            }
            Origin::Bucket => {
                warn!(%digest, error = %err, "bucket read failed, fetching the blob from the upstream");
            }
            Origin::Upstream => {}
        }
        Origin::Upstream
    }

    /// Opens `origin` for the blob's bytes from `from` on.
    pub(super) async fn open_origin(
        &self,
        origin: &Origin,
        source: &Source,
        from: u64,
    ) -> Result<Body, Error> {
        let (upstream, repo, digest) = (&source.upstream, &source.repo, &source.digest);
        match origin {
            Origin::Upstream => {
                let response = upstream
                    .get_blob(repo, digest, from)
                    .await
                    .map_err(blob_error)?;
                Ok(Body {
                    len: response.content_length(),
                    chunks: response.bytes_stream().map_err(|e| e.to_string()).boxed(),
                })
            }
            Origin::Bucket => {
                let bucket = self
                    .shared
                    .bucket()
                    .ok_or_else(|| Error::Internal("bucket origin without a bucket".into()))?;
                let body = bucket.get_blob(digest, from).await?;
                Ok(Body {
                    len: Some(body.size.saturating_sub(from)),
                    chunks: body.stream,
                })
            }
            Origin::Peer(member) => self.shared.peer_blob(member, source, from).await,
        }
    }

    /// Walks the chain for the flight's bytes (see `chain.rs`): the bucket when a replica
    /// already committed the blob, else the digest's owner when that is another replica (and
    /// this request may be forwarded), else the upstream. An unavailable source is passed over
    /// (counted, and for the owner reported as a fallback); a final answer ends the walk.
    /// With the upstream, also the download slot it took (held for the whole download).
    async fn open_chain(
        &self,
        source: &Source,
    ) -> Result<(Origin, Body, Option<tokio::sync::OwnedSemaphorePermit>), Error> {
        let (upstream, repo, digest) = (&source.upstream, &source.repo, &source.digest);
        if let Some(bucket) = self.shared.bucket() {
            let answer = match self.bucket_vouches(bucket, upstream, repo, digest).await {
                Answer::Found(_) => match self.open_origin(&Origin::Bucket, source, 0).await {
                    Ok(body) => Answer::Found(body),
                    Err(err) => Answer::Unavailable(err),
                },
                Answer::Absent => Answer::Absent,
                Answer::Final(err) => Answer::Final(err),
                Answer::Unavailable(err) => Answer::Unavailable(err),
            };
            match answer.counted(&self.metrics, Link::Bucket) {
                Answer::Found(body) => return Ok((Origin::Bucket, body, None)),
                Answer::Final(err) => return Err(err),
                Answer::Unavailable(err) => {
                    self.fall_back(Origin::Bucket, digest, &err);
                }
                Answer::Absent => {}
            }
        }
        if let Some(member) = source
            .forward
            .then(|| self.shared.owner_peer(digest.as_str()))
            .flatten()
        {
            let origin = Origin::Peer(member);
            let answer = match self.open_origin(&origin, source, 0).await {
                Ok(body) => Answer::Found(body),
                // The owner relayed its upstream's answer: final for this replica too. Asking
                // the upstream here would turn one 404 or 429 into one per replica.
                Err(err) if err.is_authoritative() => Answer::Final(err),
                Err(err) => Answer::Unavailable(err),
            };
            match answer.counted(&self.metrics, Link::Owner) {
                Answer::Found(body) => return Ok((origin, body, None)),
                Answer::Final(err) => return Err(err),
                Answer::Unavailable(err) => {
                    self.fall_back(origin, digest, &err);
                }
                Answer::Absent => {}
            }
        }
        let slot = self.fetch_slot(upstream).await;
        let opened = self.open_origin(&Origin::Upstream, source, 0).await;
        match Answer::from_upstream(opened).counted(&self.metrics, Link::Upstream) {
            Answer::Found(body) => Ok((Origin::Upstream, body, slot)),
            Answer::Final(err) | Answer::Unavailable(err) => Err(err),
            Answer::Absent => Err(Error::BlobUnknown),
        }
    }

    /// Downloads into the flight's file and commits it.
    async fn fetch_into(&self, source: &Source, flight: &Flight) -> Result<Fetched, Error> {
        let (upstream, repo, digest) = (&source.upstream, &source.repo, &source.digest);
        let started = std::time::Instant::now();
        let (mut origin, mut body, mut _slot) = self.open_chain(source).await?;
        let total = body.len;
        if let Some(total) = total {
            if let Some(reason) = self.refuses(total, total).await {
                info!(%digest, bytes = total, reason, "passing the blob through uncached");
                self.metrics.passthrough();
                return Ok(Fetched::PassThrough { valid: 0 });
            }
        }
        flight.publish(Progress::Running { written: 0, total });
        let file = flight.file().clone();
        // One write (hash + pwrite on the blocking pool) is in flight while the next batch
        // arrives from the network, so receiving overlaps hashing and writing. Writes stay in
        // order: the next one starts only when the previous one has landed and handed the
        // hasher back.
        let mut hasher = Some(DigestHasher::new());
        let mut pending: Option<Write> = None;
        // Bytes written and hashed; bytes handed to writes (the one in flight included).
        let mut written: u64 = 0;
        let mut queued: u64 = 0;
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut resumes = 0;
        let mut floor =
            RateFloor::new(self.policy.blob_stall_timeout, self.policy.blob_stall_bytes);
        loop {
            let chunk = match floor.chunk(&mut body).await {
                Ok(chunk) => chunk,
                Err(err) if resumes < RESUME_ATTEMPTS => {
                    resumes += 1;
                    let from = queued + batch.len() as u64;
                    let from_name = origin.name();
                    match &err {
                        ChunkError::Transport(err) => {
                            info!(upstream = %upstream.name, origin = from_name, %digest, from, error = %err, "blob download dropped, resuming")
                        }
                        ChunkError::Stalled => {
                            info!(upstream = %upstream.name, origin = from_name, %digest, from, "blob download stalled, resuming")
                        }
                    }
                    // A peer or the bucket failing mid-way: the upstream takes over from
                    // where they stopped, verified as one stream all the same.
                    if !matches!(origin, Origin::Upstream) {
                        let reason = match &err {
                            ChunkError::Transport(err) => Error::Internal(err.clone()),
                            ChunkError::Stalled => Error::Internal("stalled".into()),
                        };
                        let link = match origin {
                            Origin::Bucket => Link::Bucket,
                            _ => Link::Owner,
                        };
                        self.metrics.source_answer(link.as_str(), "unavailable");
                        origin = self.fall_back(origin, digest, &reason);
                        // The upstream takes over: within its slots, like any download of it.
                        _slot = self.fetch_slot(upstream).await;
                    }
                    body = self.open_origin(&origin, source, from).await?;
                    floor.restart();
                    continue;
                }
                Err(ChunkError::Transport(err)) => {
                    return Err(Error::Upstream(upstream::Error::Transport(err)))
                }
                Err(ChunkError::Stalled) => {
                    return Err(Error::Upstream(upstream::Error::Transport(
                        "blob download stalled".into(),
                    )))
                }
            };
            let end = chunk.is_none();
            if let Some(chunk) = chunk {
                batch.extend_from_slice(&chunk);
                if matches!(origin, Origin::Upstream) {
                    self.metrics
                        .upstream_bytes(&upstream.name, chunk.len() as u64);
                }
            }
            if batch.len() >= WRITE_BATCH || (end && !batch.is_empty()) {
                if let Some(write) = pending.take() {
                    match self.landed(write, digest, written).await? {
                        Ok(back) => hasher = Some(back),
                        Err(fetched) => return Ok(fetched),
                    }
                    written = queued;
                    flight.publish(Progress::Running { written, total });
                }
                let len = batch.len() as u64;
                let size = written.saturating_add(len);
                if total.is_some_and(|t| size > t) {
                    return Err(Error::Upstream(upstream::Error::Invalid(
                        "blob longer than its Content-Length".into(),
                    )));
                }
                // A body without a length (or two downloads sharing the free space) is held
                // to the limits as it grows, not only by what it declared.
                if let Some(reason) = self.refuses(size, len).await {
                    warn!(%digest, written, reason, "store refuses the rest of the blob, passing it through");
                    self.metrics.passthrough();
                    return Ok(Fetched::PassThrough { valid: written });
                }
                let data = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH));
                let file = file.clone();
                let offset = written;
                let mut into = hasher
                    .take()
                    .ok_or_else(|| Error::Internal("blob hasher lost".into()))?;
                pending = Some(tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    into.update(&data);
                    file.write_all_at(&data, offset).map(|()| into)
                }));
                queued = size;
            }
            if end {
                break;
            }
        }
        if let Some(write) = pending.take() {
            match self.landed(write, digest, written).await? {
                Ok(back) => hasher = Some(back),
                Err(fetched) => return Ok(fetched),
            }
            written = queued;
            flight.publish(Progress::Running { written, total });
        }
        let hasher = hasher.ok_or_else(|| Error::Internal("blob hasher lost".into()))?;
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
        let committed =
            tokio::task::spawn_blocking(move || store.blobs().commit(&tmp, &file, &target))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(storage::Error::from);
        match committed {
            Ok(()) => {}
            Err(err) if err.is_unwritable() => {
                warn!(%digest, error = %err, "store refused the commit, serving the verified blob uncached");
                return Ok(Fetched::Uncached(written));
            }
            Err(err) => return Err(err.into()),
        }
        let (up, repository, target, now) = (
            upstream.name.clone(),
            repo.to_string(),
            digest.clone(),
            self.clock.now(),
        );
        self.facts
            .local(move |store| {
                store.record(&target, written, None)?;
                let index = store.index();
                index.link(&up, &repository, &target)?;
                index.own(&target, now)?;
                Ok(())
            })
            .await?;
        self.persist().await?;
        debug!(upstream = %upstream.name, repository = %repo, %digest, origin = origin.name(), bytes = written, seconds = started.elapsed().as_secs_f64(), "blob cached");
        if matches!(origin, Origin::Bucket) {
            self.shared.hot_tier_fill();
        }
        Ok(Fetched::Committed {
            total: written,
            publish: matches!(origin, Origin::Upstream) && self.shared.bucket().is_some(),
        })
    }
}
