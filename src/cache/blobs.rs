//! Serving blobs: from the store when the file is whole, joined to (or starting) the blob's
//! single download otherwise, or straight from the upstream when the store cannot take it.
//!
//! The store's files are not trusted blindly: a file missing or of another size than the index
//! says is treated as not held (its entry dropped, the blob fetched again), never served.
//! Same-size corruption of a blob is not caught here (hashing every hit would cost the hit
//! path); that is the scrub's job.

use std::fs::File;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tracing::warn;

use super::chain::{Answer, Link};
use super::flight::{FlightReader, Joined, Source};
use super::{blob_error, file_stream, passthrough, Cache, Error, Outcome, ReadGuard};
use crate::oci::{Digest, RepoName};
use crate::storage::{self, Scope, Store};
use crate::upstream::{self, Upstream};

/// What the store holds of a blob for one repository.
enum Held {
    /// Not stored, or stored damaged (then dropped just now).
    No,
    /// Stored whole and linked to the repository: its size, and its file when asked for.
    Linked(u64, Option<File>),
    /// Stored whole, but for other repositories as far as this replica's index knows.
    Unlinked,
}

/// Looks a blob up in the store, blocking (index, file system): its index entry, its file
/// (opened when `open`, else only its size read), the repository's link. A file missing or
/// of another size than its entry is dropped (fetched again) and reads as not held. A file
/// opened for a client is a pull of the blob's own image if it is one (fetched by digest
/// alone); a layer's image is touched through its manifest.
fn look_up(
    store: &Store,
    upstream: &str,
    repo: &str,
    digest: &Digest,
    open: bool,
    now: u64,
) -> Result<Held, storage::Error> {
    let Some(entry) = store.stat(digest)? else {
        return Ok(Held::No);
    };
    let (len, file) = if open {
        // The filesystem backend hands out files, which sendfile needs; the only backend
        // today, so a store without them is a configuration that cannot be.
        match store.blobs().file(digest) {
            None => {
                return Err(storage::Error::Io(std::io::Error::other(
                    "store backend without file handles",
                )))
            }
            Some(Ok(file)) => (file.metadata().map(|m| m.len()), Some(file)),
            Some(Err(err)) => (Err(err), None),
        }
    } else {
        (store.blobs().stat(digest), None)
    };
    match len {
        Ok(len) if len == entry.size => {}
        Ok(len) => {
            forget_damaged(store, digest, Some(len), entry.size);
            return Ok(Held::No);
        }
        // Evicted between the look-up and the open (then the entry is already gone), or
        // deleted behind our back: fetched again.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            forget_damaged(store, digest, None, entry.size);
            return Ok(Held::No);
        }
        Err(err) => return Err(err.into()),
    }
    if !store.index().is_linked(upstream, repo, digest)? {
        return Ok(Held::Unlinked);
    }
    if open {
        let _ = store
            .index()
            .touch_image(digest, now, super::TOUCH_GRANULARITY_MS);
    }
    Ok(Held::Linked(entry.size, file))
}

/// Drops a stored blob whose file is gone or does not have the size it was committed with
/// (truncated by a disk error, an operator, a bad restore): it is fetched again. Blocking.
pub(super) fn forget_damaged(store: &Store, digest: &Digest, found: Option<u64>, indexed: u64) {
    warn!(%digest, indexed, found = ?found, "stored blob damaged or missing, dropping it to fetch it again");
    if let Err(err) = store.remove(digest) {
        warn!(%digest, error = %err, "could not drop a damaged blob");
    }
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
    /// A presigned URL of the shared bucket (`storage.s3.redirect`): the client fetches the
    /// bytes there, verified by the client against the digest as every client does.
    Redirect(String),
    /// Straight from the upstream, not cached (it cannot fit, or the disk is full or
    /// read-only); still verified before its last bytes go out.
    Direct {
        response: reqwest::Response,
        digest: Digest,
        size: u64,
    },
}

impl BlobBody {
    /// The bytes `start..end`.
    pub fn stream(
        self,
        start: u64,
        end: u64,
    ) -> std::pin::Pin<Box<dyn Stream<Item = std::io::Result<bytes::Bytes>> + Send>> {
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
            BlobBody::Redirect(_) => Box::pin(futures_util::stream::empty()),
            BlobBody::Direct {
                response,
                digest,
                size,
            } => Box::pin(passthrough::verified_range(
                response, digest, start, end, size,
            )),
        }
    }
}

impl Cache {
    /// A blob's size without its body (for `HEAD`): the store, the bucket, the owner, or an
    /// upstream `HEAD`.
    pub async fn blob_size(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(u64, Outcome), Error> {
        self.blob_size_for(upstream, repo, digest, true).await
    }

    /// A blob's size for a peer that asked this replica, its owner: never forwarded again.
    pub async fn peer_blob_size(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(u64, Outcome), Error> {
        self.blob_size_for(upstream, repo, digest, false).await
    }

    async fn blob_size_for(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<(u64, Outcome), Error> {
        if let Some(size) = self.linked_blob_size(upstream, repo, digest).await? {
            return Ok((size, Outcome::Hit));
        }
        if let Answer::Found(size) = self.vouched_in_bucket(upstream, repo, digest).await {
            return Ok((size, Outcome::Hit));
        }
        // One question per key on this replica, and in a cluster one for the whole cluster:
        // the owner's, whose upstream's answer (errors included) is final.
        // HEADs store nothing: their answers are remembered for `cache.negative_ttl`, or every
        // replica and client asking a moment after the last flight ended would ask again.
        let key = (upstream.name.clone(), repo.to_string(), digest.to_string());
        if let Some(answer) = self.sizes.get(&key) {
            self.metrics.upstream_spared(&upstream.name, "answered");
            return answer.map(|size| (size, Outcome::Miss));
        }
        let forward = forward && self.shared.forwards(digest.as_str());
        let (this, upstream, repo, digest) =
            (self.clone(), upstream.clone(), repo.clone(), digest.clone());
        let size = self
            .size_flights
            .run((key.clone(), forward), move || async move {
                let answer = this.ask_size(&upstream, &repo, &digest, forward).await;
                // Inside the flight, so no request starts another between its end and this.
                if matches!(answer, Ok(_) | Err(Error::BlobUnknown)) {
                    this.sizes.answer(key, answer.clone());
                }
                answer
            })
            .await
            .unwrap_or_else(|| Err(Error::Internal("blob size lookup panicked".into())))?;
        Ok((size, Outcome::Miss))
    }

    /// A blob's size from the owner (when `forward` and another replica owns it), else from
    /// the upstream.
    async fn ask_size(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<u64, Error> {
        if let Some(member) = forward
            .then(|| self.shared.owner_peer(digest.as_str()))
            .flatten()
        {
            let answer = Answer::from_owner(
                self.shared
                    .peer_blob_size(&member, upstream, repo, digest)
                    .await,
            );
            match answer.counted(&self.metrics, Link::Owner) {
                Answer::Found(size) => return Ok(size),
                Answer::Final(err) => return Err(err),
                Answer::Absent => {}
                Answer::Unavailable(err) => {
                    warn!(peer = member.address(), %digest, error = %err, "owner unreachable, asking the upstream here");
                    self.shared.fell_back(&member);
                }
            }
        }
        upstream.head_blob(repo, digest).await.map_err(blob_error)
    }

    /// The size of a blob we may serve under this repository from the store; `None` if we do
    /// not hold it whole.
    async fn linked_blob_size(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, Error> {
        Ok(self
            .held_blob(upstream, repo, digest, false)
            .await?
            .map(|(size, _)| size))
    }

    /// A blob the store holds whole for this repository: its size, and its open file when
    /// `open`. A blob held for another repository is checked first: the bucket's link, else
    /// this repository's upstream (a HEAD, no download), before it is served under this name.
    async fn held_blob(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        open: bool,
    ) -> Result<Option<(u64, Option<File>)>, Error> {
        match self.look_up_blob(upstream, repo, digest, open).await? {
            Held::No => return Ok(None),
            Held::Linked(size, file) => return Ok(Some((size, file))),
            Held::Unlinked => {}
        }
        if !self
            .facts
            .is_linked(&upstream.name, repo.as_str(), digest)
            .await?
        {
            upstream.head_blob(repo, digest).await.map_err(blob_error)?;
            self.facts
                .link(
                    &upstream.name,
                    repo.as_str(),
                    vec![digest.clone()],
                    Scope::Here,
                )
                .await?;
        }
        match self.look_up_blob(upstream, repo, digest, open).await? {
            Held::Linked(size, file) => Ok(Some((size, file))),
            // Evicted meanwhile: fetched again.
            Held::No | Held::Unlinked => Ok(None),
        }
    }

    /// One trip to the blocking pool: see [`look_up`].
    async fn look_up_blob(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        open: bool,
    ) -> Result<Held, Error> {
        let (up, repo, digest) = (upstream.name.clone(), repo.to_string(), digest.clone());
        let now = self.clock.now();
        Ok(self
            .facts
            .local(move |store| look_up(store, &up, &repo, &digest, open, now))
            .await?)
    }

    /// A blob to stream: from the store, or joined to (or starting) its single download,
    /// which in a cluster is the owner's.
    pub async fn blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Blob, Error> {
        self.blob_for(upstream, repo, digest, true).await
    }

    /// A blob for a peer that forwarded a miss to this replica, its owner: served from this
    /// replica's flight, disk or the bucket, or fetched here, never forwarded again.
    pub async fn peer_blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Blob, Error> {
        let blob = self.blob_for(upstream, repo, digest, false).await?;
        if matches!(blob.body, BlobBody::Stored(..)) && self.shared.bucket().is_some() {
            // A peer asks its owner only for what the bucket does not hold: this replica
            // committed the blob but its upload never finished (a crash, a bucket outage).
            // Upload it now, so the cluster stops depending on this one disk.
            let source = Source {
                upstream: upstream.clone(),
                repo: repo.clone(),
                digest: digest.clone(),
                forward: false,
            };
            let this = self.clone();
            tokio::spawn(async move { this.publish_blob_once(source).await });
        }
        Ok(blob)
    }

    async fn blob_for(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<Blob, Error> {
        // Twice at most: a download that commits between our look-up and our joining is served
        // from the store on the second round.
        for _ in 0..2 {
            // Before the look in the store: a download committing after it is then known to
            // `join`, which does not start it again.
            let seen = self.blob_flights.commits();
            if let Some((size, Some(file))) = self.held_blob(upstream, repo, digest, true).await? {
                self.metrics.cache_outcome("blob", Outcome::Hit);
                self.metrics.hot_tier_found();
                self.shared.hot_tier_hit();
                return Ok(Blob {
                    size,
                    outcome: Outcome::Hit,
                    body: BlobBody::Stored(Arc::new(file), self.readers.pin(digest)),
                });
            }
            if let (true, Some(ttl), Some(bucket)) =
                (forward, self.shared.redirect(), self.shared.bucket())
            {
                if let Answer::Found(size) = self.vouched_in_bucket(upstream, repo, digest).await {
                    if let Ok(url) = bucket.presigned_blob_url(digest, ttl).await {
                        self.metrics.cache_outcome("blob", Outcome::Hit);
                        return Ok(Blob {
                            size,
                            outcome: Outcome::Hit,
                            body: BlobBody::Redirect(url),
                        });
                    }
                }
            }
            self.metrics.source_answer(Link::HotTier.as_str(), "absent");
            let source = Source {
                upstream: upstream.clone(),
                repo: repo.clone(),
                digest: digest.clone(),
                // The owner's own clients and the peers asking it share one flight.
                forward: forward && self.shared.forwards(digest.as_str()),
            };
            let joined = match self.blob_flights.running(&source) {
                Some(flight) => Some(Joined::Existing(flight)),
                None => {
                    // The file a new download writes is made on the blocking pool, before the
                    // registry's lock is taken; unused (another request started first), it
                    // goes again.
                    let made = self.facts.local(|store| Ok(store.blobs().begin()?)).await;
                    let mut made = match made {
                        Ok(made) => Some(made),
                        Err(err) if err.is_unwritable() => {
                            warn!(%digest, error = %err, "store cannot take downloads, passing the blob through uncached");
                            return self.pass_through(upstream, repo, digest).await;
                        }
                        Err(err) => return Err(err.into()),
                    };
                    let joined = self.blob_flights.join(
                        source,
                        || {
                            made.take()
                                .ok_or_else(|| std::io::Error::other("file taken"))
                        },
                        seen,
                    );
                    if let Some((unused, _)) = made.take() {
                        self.abort_tmp(&unused);
                    }
                    joined.map_err(|e| Error::from(storage::Error::from(e)))?
                }
            };
            let mut reader = match joined {
                None => continue,
                Some(Joined::Existing(flight)) => {
                    if !flight.owned_by(&upstream.name, repo.as_str()) {
                        // Started for another repository: this one's upstream must vouch for
                        // the blob before it is served under this name.
                        upstream.head_blob(repo, digest).await.map_err(blob_error)?;
                        let link = vec![digest.clone()];
                        self.facts
                            .link(&upstream.name, repo.as_str(), link, Scope::Here)
                            .await?;
                    }
                    self.metrics.single_flight_join();
                    flight.reader()
                }
                Some(Joined::Started(download, reader)) => {
                    let this = self.clone();
                    // Its own task: a client that disconnects does not abort the fill.
                    tokio::spawn(async move { this.download(download).await });
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

    /// A blob the store will not take, straight from the upstream to this client. Its size is
    /// the response's length, or the upstream's `HEAD` when the response has none.
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
        let size = match response.content_length() {
            Some(size) => size,
            None => upstream.head_blob(repo, digest).await.map_err(|err| {
                warn!(%digest, error = %err, "blob without Content-Length and no size from HEAD");
                Error::Upstream(upstream::Error::Invalid(
                    "blob without Content-Length".into(),
                ))
            })?,
        };
        self.metrics.passthrough();
        Ok(Blob {
            size,
            outcome: Outcome::Miss,
            body: BlobBody::Direct {
                response,
                digest: digest.clone(),
                size,
            },
        })
    }
}
