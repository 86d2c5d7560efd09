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
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::flight::{Download, Flight, Progress, Source};
use super::{blob_error, Cache, Error};
use crate::oci::DigestHasher;
use crate::storage;
use crate::upstream;

/// How many times a dropped or stalled blob download is resumed with a `Range` request.
const RESUME_ATTEMPTS: u32 = 3;
/// Bytes gathered from the network before one write to disk.
const WRITE_BATCH: usize = 256 * 1024;

/// How a download ended, short of failing.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    /// Verified, committed and recorded.
    Committed(u64),
    /// Verified, but the store refused the commit: served from the open file, not cached.
    Uncached(u64),
    /// The store refused the blob after its first `valid` bytes (0: before any): its readers
    /// go on from the upstream.
    PassThrough { valid: u64 },
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
    Transport(reqwest::Error),
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

    /// The next chunk of `response`, or `Stalled` when the window closes before `min_bytes`
    /// arrived in it.
    async fn chunk(
        &mut self,
        response: &mut reqwest::Response,
    ) -> Result<Option<Bytes>, ChunkError> {
        match tokio::time::timeout_at(self.window_end, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                self.in_window = self.in_window.saturating_add(chunk.len() as u64);
                if self.in_window >= self.min_bytes {
                    self.restart();
                }
                Ok(Some(chunk))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(err)) => Err(ChunkError::Transport(err)),
            Err(_) => Err(ChunkError::Stalled),
        }
    }
}

impl Cache {
    /// Runs one blob download to its end and tells the readers. The [`Download`] guard ends
    /// the flight failed if this task ends any other way (a panic included).
    pub(super) async fn download(self: Arc<Self>, download: Download) {
        let source = download.source().clone();
        if self.take_injected_panic(&source.digest) {
            panic!("injected panic in the download of {}", source.digest);
        }
        let result = self.fetch_into(&source, &download).await;
        let (upstream, repo, digest) = (&source.upstream, &source.repo, &source.digest);
        let progress = match result {
            Ok(Fetched::Committed(total)) => {
                self.evictor.committed();
                Progress::Done { total }
            }
            Ok(Fetched::Uncached(total)) => {
                self.store.blobs().abort(download.tmp_path());
                self.metrics.passthrough();
                Progress::Done { total }
            }
            Ok(Fetched::PassThrough { valid }) => {
                self.store.blobs().abort(download.tmp_path());
                Progress::PassThrough { valid }
            }
            Err(err) => {
                warn!(upstream = %upstream.name, repository = %repo, %digest, error = %err, "blob download failed, nothing cached");
                self.store.blobs().abort(download.tmp_path());
                Progress::Failed(err)
            }
        };
        download.finish(progress);
    }

    /// Why the store will not take `bytes` more of a blob that will then be `size` bytes
    /// long, if it will not.
    fn refuses(&self, size: u64, bytes: u64) -> Option<&'static str> {
        if !self.evictor.fits(size) {
            return Some("blob larger than the cache may hold");
        }
        let free = self.store.blobs().available_bytes()?;
        (free < bytes.saturating_add(self.policy.min_free)).then_some("store disk nearly full")
    }

    /// Downloads into the flight's file and commits it.
    async fn fetch_into(&self, source: &Source, flight: &Flight) -> Result<Fetched, Error> {
        let (upstream, repo, digest) = (&source.upstream, &source.repo, &source.digest);
        let _slot = self.fetch_slot(upstream).await;
        let started = std::time::Instant::now();
        let mut response = upstream
            .get_blob(repo, digest, 0)
            .await
            .map_err(blob_error)?;
        let total = response.content_length();
        if let Some(total) = total {
            if let Some(reason) = self.refuses(total, total) {
                info!(%digest, bytes = total, reason, "passing the blob through uncached");
                self.metrics.passthrough();
                return Ok(Fetched::PassThrough { valid: 0 });
            }
        }
        flight.publish(Progress::Running { written: 0, total });
        let file = flight.file().clone();
        let mut hasher = DigestHasher::new();
        let mut written: u64 = 0;
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut resumes = 0;
        let mut floor =
            RateFloor::new(self.policy.blob_stall_timeout, self.policy.blob_stall_bytes);
        loop {
            let chunk = match floor.chunk(&mut response).await {
                Ok(chunk) => chunk,
                Err(err) if resumes < RESUME_ATTEMPTS => {
                    resumes += 1;
                    let from = written + batch.len() as u64;
                    match err {
                        ChunkError::Transport(err) => {
                            info!(upstream = %upstream.name, %digest, from, error = %err, "blob download dropped, resuming")
                        }
                        ChunkError::Stalled => {
                            info!(upstream = %upstream.name, %digest, from, "blob download stalled, resuming")
                        }
                    }
                    response = upstream
                        .get_blob(repo, digest, from)
                        .await
                        .map_err(blob_error)?;
                    floor.restart();
                    continue;
                }
                Err(ChunkError::Transport(err)) => {
                    return Err(Error::Upstream(upstream::Error::Transport(err.to_string())))
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
                self.metrics
                    .upstream_bytes(&upstream.name, chunk.len() as u64);
            }
            if batch.len() >= WRITE_BATCH || (end && !batch.is_empty()) {
                let len = batch.len() as u64;
                let size = written.saturating_add(len);
                if total.is_some_and(|t| size > t) {
                    return Err(Error::Upstream(upstream::Error::Invalid(
                        "blob longer than its Content-Length".into(),
                    )));
                }
                // A body without a length (or two downloads sharing the free space) is held
                // to the limits as it grows, not only by what it declared.
                if let Some(reason) = self.refuses(size, len) {
                    warn!(%digest, written, reason, "store refuses the rest of the blob, passing it through");
                    self.metrics.passthrough();
                    return Ok(Fetched::PassThrough { valid: written });
                }
                let data = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH));
                let file = file.clone();
                let offset = written;
                let wrote = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    hasher.update(&data);
                    file.write_all_at(&data, offset).map(|()| hasher)
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
                hasher = match wrote.map_err(storage::Error::from) {
                    Ok(hasher) => hasher,
                    Err(err) if err.is_unwritable() => {
                        warn!(%digest, written, error = %err, "store refused a write, passing the blob through");
                        self.metrics.passthrough();
                        return Ok(Fetched::PassThrough { valid: written });
                    }
                    Err(err) => return Err(err.into()),
                };
                written = size;
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
        self.store.record(digest, written, None)?;
        let index = self.store.index();
        index
            .link(&upstream.name, repo.as_str(), digest)
            .and_then(|()| index.own(digest, self.clock.now()))
            .map_err(storage::Error::from)?;
        self.persist().await?;
        debug!(upstream = %upstream.name, repository = %repo, %digest, bytes = written, seconds = started.elapsed().as_secs_f64(), "blob cached");
        Ok(Fetched::Committed(written))
    }
}
