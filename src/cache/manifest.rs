//! Manifests by digest, and what every manifest goes through: the façade the API calls
//! (`manifest`, `peer_manifest`), the single flight per key that wraps the sources (bucket,
//! owner, upstream), what the upstream said does not exist, and verification before commit
//! (`commit_manifest` → `keep_manifest`), with the links and image membership a manifest
//! implies. Tags are in `tag.rs`.

use std::sync::Arc;

use tracing::{debug, warn};

use super::blobs::forget_damaged;
use super::chain::{Answer, Link};
use super::{manifest_error, Cache, Error, Manifest, ManifestKey, Outcome};
use crate::oci::{media_type, Digest, Reference, RepoName};
use crate::storage::{self, Scope};
use crate::upstream::{self, Upstream};

impl Cache {
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

    pub(super) async fn manifest_for(
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
            self.record_pull(&manifest.digest);
        }
        result
    }

    pub(super) async fn manifest_by_digest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<(Manifest, Outcome), Error> {
        if self
            .facts
            .is_linked_here(&upstream.name, repo.as_str(), digest)
            .await?
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
    pub(super) async fn fetch_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<(Manifest, Outcome), Error> {
        match self.bucket_manifest(upstream, repo, digest).await {
            Answer::Found(manifest) => return Ok((manifest, Outcome::Hit)),
            Answer::Final(err) => return Err(err),
            Answer::Absent | Answer::Unavailable(_) => {}
        }
        if forward {
            match self
                .forwarded_manifest(upstream, repo, digest.as_str(), Some(digest))
                .await
            {
                Answer::Found((manifest, _, _)) => return Ok((manifest, Outcome::Miss)),
                Answer::Final(err) => return Err(err),
                Answer::Absent | Answer::Unavailable(_) => {}
            }
        }
        let fetched = async {
            let remote = upstream.get_manifest(repo, digest.as_str()).await;
            let remote = remote.map_err(manifest_error)?;
            let manifest = self
                .commit_manifest(upstream, repo, remote, Some(digest), false)
                .await?;
            self.persist().await?;
            Ok((manifest, Outcome::Miss))
        }
        .await;
        match Answer::from_upstream(fetched).counted(&self.metrics, Link::Upstream) {
            Answer::Found(found) => Ok(found),
            Answer::Final(err) | Answer::Unavailable(err) => Err(err),
            Answer::Absent => Err(Error::ManifestUnknown),
        }
    }

    /// Whether the upstream said lately that this manifest does not exist (counted as a
    /// request spared).
    pub(super) fn known_missing(&self, upstream: &Upstream, key: &ManifestKey) -> bool {
        let missing = self.not_found.contains(key);
        if missing {
            self.metrics.upstream_spared(&upstream.name, "not_found");
        }
        missing
    }

    /// Remembers a manifest the upstream said does not exist, for `cache.negative_ttl`; one
    /// that was found is forgotten.
    pub(super) fn remember_missing(
        &self,
        key: ManifestKey,
        result: &Result<(Manifest, Outcome), Error>,
    ) {
        match result {
            Err(Error::ManifestUnknown) => self.not_found.insert(key),
            Ok(_) => self.not_found.remove(&key),
            Err(_) => {}
        }
    }

    /// Makes the index durable after a commit (see [`storage::Index::flush_async`]).
    pub(super) async fn persist(&self) -> Result<(), Error> {
        self.store
            .index()
            .flush_async()
            .await
            .map_err(|e| storage::Error::from(e).into())
    }

    /// Verifies a manifest from the upstream against the digest we asked for (or the one the
    /// upstream claims), stores it and links it and everything it references to the repository.
    /// It joins the images that hold it already; fetched for a tag, or by digest with no image
    /// holding it, it roots an image of its own.
    pub(super) async fn commit_manifest(
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
    pub(super) async fn keep_manifest(
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
                Ok(()) => {
                    self.bucket_written(manifest.bytes.len() as u64);
                    self.share_held_children(upstream, repo, &manifest);
                }
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
        // A manifest from this repository vouches for the blobs it names as its content, so
        // those already in the store (shared base layers) are served without asking the
        // upstream again. Its `subject` vouches for nothing: registries accept any digest there.
        let children: Vec<Digest> = media_type::referenced_digests(&manifest.bytes)
            .into_iter()
            .map(|(referenced, _)| referenced)
            .collect();
        let mut links = children.clone();
        links.push(digest.clone());
        self.facts
            .link(&upstream.name, repo.as_str(), links, Scope::Here)
            .await?;
        let (member, now) = (digest.clone(), self.clock.now());
        let (up, repository) = (upstream.name.clone(), repo.to_string());
        self.facts
            .local(move |store| {
                store.manifest_committed(&up, &repository, &member, &children, tagged, now)
            })
            .await?;
        self.manifests.insert(&manifest);
        self.evictor.committed();
        debug!(upstream = %upstream.name, repository = %repo, %digest, "manifest cached");
        Ok(manifest)
    }

    /// A manifest from the store, if we hold it with its media type: from memory when it is
    /// there, else read and hashed on the blocking pool.
    pub(super) async fn stored_manifest(&self, digest: &Digest) -> Result<Option<Manifest>, Error> {
        let wanted = digest.clone();
        let Some(entry) = self.facts.local(move |store| store.stat(&wanted)).await? else {
            return Ok(None);
        };
        let Some(media_type) = entry.media_type else {
            return Ok(None);
        };
        if let Some(manifest) = self.manifests.get(digest) {
            return Ok(Some(manifest));
        }
        let (wanted, size) = (digest.clone(), entry.size);
        let read = self
            .facts
            .local(move |store| match store.blobs().read(&wanted) {
                Ok(bytes) if Digest::sha256_of(&bytes) == wanted => Ok(Some(bytes)),
                // Small enough to hash on every read: a damaged file is dropped and fetched
                // again, never served under the digest it no longer has.
                Ok(bytes) => {
                    forget_damaged(store, &wanted, Some(bytes.len() as u64), size);
                    Ok(None)
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    forget_damaged(store, &wanted, None, size);
                    Ok(None)
                }
                Err(err) => Err(err.into()),
            })
            .await?;
        Ok(read.map(|bytes| {
            let manifest = Manifest {
                bytes: bytes.into(),
                digest: digest.clone(),
                media_type,
            };
            self.manifests.insert(&manifest);
            manifest
        }))
    }
}
