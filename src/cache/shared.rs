//! What the replicas of a cluster share: the bucket, which holds what any of them committed,
//! and the cluster, which says which replica fetches a digest or revalidates a tag.
//!
//! Without `storage.s3` and `cluster:` both are absent and every function here is a no-op, so
//! the single-node request path is the one it always was. With them, the cache consults the
//! bucket after its local store and before the upstream, writes what it fetched through to
//! the bucket, and sends misses of digests another replica owns to that replica (the
//! owner's single flight then serves every replica). An owner that does not answer is not
//! waited for: this replica fetches itself, and the fallback is counted per peer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use prometheus::{IntCounterVec, Opts, Registry};
use tracing::{debug, warn};

use super::chain::{Answer, Link};
use super::download::Body;
use super::flight::Source;
use super::{Cache, Error};
use crate::cluster::{Cluster, Member, Owner, PeerError};
use crate::oci::media_type::is_valid_header_value;
use crate::oci::{Digest, RepoName};
use crate::storage::s3::Bucket;
use crate::storage::Scope;
use crate::upstream::{self, Upstream};

pub const HOT_TIER: &str = "regmirror_hot_tier_total";
/// On a peer's answer for a tag: when the owner's upstream last confirmed it (unix ms).
pub const CONFIRMED_HEADER: &str = "x-regmirror-confirmed";
/// A blob's size, in an owner's answer to a peer's `sizes/` request (sealed).
pub const SIZE_HEADER: &str = "x-regmirror-size";

/// The largest manifest a peer may send.
const MAX_PEER_MANIFEST: usize = 4 << 20;

/// The bucket and the cluster, when configured.
pub struct Shared {
    bucket: Option<Arc<Bucket>>,
    cluster: Option<Arc<Cluster>>,
    /// Presigned redirects for blobs only the bucket holds (`storage.s3.redirect`).
    redirect: Option<Duration>,
    hot_tier: Option<IntCounterVec>,
    /// Late uploads under way (see [`Cache::publish_blob_once`]).
    uploads: std::sync::Mutex<std::collections::HashSet<Digest>>,
    /// Bounds of the bucket and this replica's memory for its eviction passes.
    pub(super) evict: super::bucket_evict::State,
}

impl Shared {
    /// A single replica on its own disk.
    pub fn none() -> Shared {
        Shared {
            bucket: None,
            cluster: None,
            redirect: None,
            hot_tier: None,
            uploads: Default::default(),
            evict: super::bucket_evict::State::idle(),
        }
    }

    pub fn new(
        bucket: Option<Arc<Bucket>>,
        cluster: Option<Arc<Cluster>>,
        redirect: Option<Duration>,
        registry: &Registry,
    ) -> Shared {
        let hot_tier = IntCounterVec::new(
            Opts::new(
                HOT_TIER,
                "Blob reads with a bucket behind the local disk: hit (served from the local hot tier) or fill (copied from the bucket first).",
            ),
            &["result"],
        )
        .ok();
        if let Some(counter) = &hot_tier {
            let _ = registry.register(Box::new(counter.clone()));
        }
        Shared {
            bucket,
            cluster,
            redirect,
            hot_tier,
            uploads: Default::default(),
            evict: super::bucket_evict::State::idle(),
        }
    }

    /// Bounds the bucket (`storage.max_size`, `cache.max_age`), enforced by
    /// [`super::bucket_evict::run`].
    pub fn with_bound(mut self, bound: super::bucket_evict::Bound, registry: &Registry) -> Shared {
        self.evict = super::bucket_evict::State::new(bound, registry);
        self
    }

    pub fn bucket(&self) -> Option<&Arc<Bucket>> {
        self.bucket.as_ref()
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub fn redirect(&self) -> Option<Duration> {
        self.redirect
    }

    /// The replica that owns `key`, if that is another one.
    pub fn owner_peer(&self, key: &str) -> Option<Member> {
        match self.cluster.as_ref()?.owner(key) {
            Owner::Me => None,
            Owner::Peer(member) => Some(member),
        }
    }

    /// Whether a miss of `key` goes to another replica, its owner.
    pub fn forwards(&self, key: &str) -> bool {
        self.owner_peer(key).is_some()
    }

    pub fn fell_back(&self, member: &Member) {
        if let Some(cluster) = &self.cluster {
            cluster.fell_back(member);
        }
    }

    pub fn hot_tier_hit(&self) {
        if let (Some(counter), Some(_)) = (&self.hot_tier, &self.bucket) {
            counter.with_label_values(&["hit"]).inc();
        }
    }

    fn start_upload(&self, digest: &Digest) -> bool {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        uploads.insert(digest.clone())
    }

    fn end_upload(&self, digest: &Digest) {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        uploads.remove(digest);
    }

    pub fn hot_tier_counts(&self) -> Option<(u64, u64)> {
        self.bucket.as_ref()?;
        let counter = self.hot_tier.as_ref()?;
        Some((
            counter.with_label_values(&["hit"]).get(),
            counter.with_label_values(&["fill"]).get(),
        ))
    }

    pub fn hot_tier_fill(&self) {
        if let Some(counter) = &self.hot_tier {
            counter.with_label_values(&["fill"]).inc();
        }
    }

    /// A failed peer request as the cache sees it: the owner's relayed answer about its
    /// upstream, final (`missing` for a 404; a 429 also holds this replica back from the
    /// upstream for its `Retry-After`), or [`Error::Internal`] when the owner could not serve,
    /// and the caller goes on to the next source.
    fn peer_error(
        &self,
        member: &Member,
        upstream: &Upstream,
        err: PeerError,
        missing: Error,
    ) -> Error {
        let PeerError::Status {
            status,
            final_answer: true,
            retry_after,
            ..
        } = &err
        else {
            return Error::Internal(err.to_string());
        };
        let answer = match status.as_u16() {
            404 => missing,
            429 => {
                upstream.rate_limited(*retry_after);
                Error::Upstream(upstream::Error::TooManyRequests {
                    retry_after: *retry_after,
                })
            }
            401 => Error::Upstream(upstream::Error::Unauthorized),
            403 => Error::Upstream(upstream::Error::Denied),
            _ => return Error::Internal(err.to_string()),
        };
        if let Some(cluster) = &self.cluster {
            cluster.relayed_final(member);
        }
        answer
    }

    /// A blob from its owner, from byte `from` on.
    pub(super) async fn peer_blob(
        &self,
        member: &Member,
        source: &Source,
        from: u64,
    ) -> Result<Body, Error> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or_else(|| Error::Internal("peer origin without a cluster".into()))?;
        let path = peer_path(
            "blobs",
            source.digest.as_str(),
            &source.upstream.name,
            &source.repo,
        );
        let response = cluster
            .get(member, &path, from)
            .await
            .map_err(|e| self.peer_error(member, &source.upstream, e, Error::BlobUnknown))?;
        cluster.forwarded(member);
        Ok(Body {
            len: response.content_length(),
            chunks: response.bytes_stream().map_err(|e| e.to_string()).boxed(),
        })
    }

    /// A manifest (by tag or digest) from its owner: its bytes and media type, unverified
    /// (the caller checks them against the digest the owner names or the one asked for).
    /// A blob's size as its owner `member` knows it (its store, the bucket, or its flight of
    /// upstream `HEAD`s); its upstream's errors are final.
    pub(super) async fn peer_blob_size(
        &self,
        member: &Member,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<u64, Error> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or_else(|| Error::Internal("peer origin without a cluster".into()))?;
        let path = peer_path("sizes", digest.as_str(), &upstream.name, repo);
        let response = cluster
            .get(member, &path, 0)
            .await
            .map_err(|e| self.peer_error(member, upstream, e, Error::BlobUnknown))?;
        let size = response
            .headers()
            .get(SIZE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| Error::Internal("peer answered a size without one".into()))?;
        cluster.forwarded(member);
        Ok(size)
    }

    pub(super) async fn peer_manifest(
        &self,
        member: &Member,
        upstream: &Upstream,
        repo: &RepoName,
        reference: &str,
    ) -> Result<PeerManifest, Error> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or_else(|| Error::Internal("peer origin without a cluster".into()))?;
        let path = peer_path("manifests", reference, &upstream.name, repo);
        let response = cluster
            .get(member, &path, 0)
            .await
            .map_err(|e| self.peer_error(member, upstream, e, Error::ManifestUnknown))?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let media_type = header("content-type").unwrap_or_default();
        let digest = header("docker-content-digest").and_then(|d| d.parse::<Digest>().ok());
        let confirmed = header(CONFIRMED_HEADER).and_then(|c| c.parse::<u64>().ok());
        let stale = header("x-regmirror-cache").as_deref() == Some("stale");
        if response
            .content_length()
            .is_some_and(|len| len > MAX_PEER_MANIFEST as u64)
        {
            return Err(Error::Internal("peer manifest too large".into()));
        }
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| Error::Internal(e.to_string()))?;
            if body.len().saturating_add(chunk.len()) > MAX_PEER_MANIFEST {
                return Err(Error::Internal("peer manifest too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        cluster.forwarded(member);
        Ok(PeerManifest {
            bytes: Bytes::from(body),
            media_type,
            digest,
            confirmed,
            stale,
        })
    }
}

/// A manifest as a peer sent it: unverified until the caller checks it.
pub(super) struct PeerManifest {
    bytes: Bytes,
    media_type: String,
    /// The digest the owner names (what a tag points to).
    digest: Option<Digest>,
    /// When the owner's upstream last confirmed the tag (unix ms).
    confirmed: Option<u64>,
    /// The owner answered from what it holds because its upstream failed.
    stale: bool,
}

/// `/_regmirror/peer/<kind>/<reference>?upstream=..&repository=..`.
pub fn peer_path(kind: &str, reference: &str, upstream: &str, repo: &RepoName) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("upstream", upstream)
        .append_pair("repository", repo.as_str())
        .finish();
    format!("/_regmirror/peer/{kind}/{reference}?{query}")
}

impl Cache {
    /// The bucket's answer for a blob (counted): its size if the bucket holds it and this
    /// repository may be served it (the local index or the bucket links it to the repository,
    /// or the upstream vouches for it: a HEAD, then linked here and in the bucket).
    pub(super) async fn vouched_in_bucket(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Answer<u64> {
        let Some(bucket) = self.shared.bucket() else {
            return Answer::Absent;
        };
        self.bucket_vouches(bucket, upstream, repo, digest)
            .await
            .counted(&self.metrics, Link::Bucket)
    }

    pub(super) async fn bucket_vouches(
        &self,
        bucket: &Bucket,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Answer<u64> {
        let size = match bucket.blob_size(digest).await {
            Ok(Some(size)) => size,
            Ok(None) => return Answer::Absent,
            Err(err) => {
                warn!(%digest, error = %err, "bucket unavailable, not reading the blob from it");
                return Answer::Unavailable(err.into());
            }
        };
        if self
            .facts
            .is_linked(&upstream.name, repo.as_str(), digest)
            .await
            .unwrap_or(false)
        {
            return Answer::Found(size);
        }
        if upstream.head_blob(repo, digest).await.is_ok() {
            let link = vec![digest.clone()];
            let _ = self
                .facts
                .link(&upstream.name, repo.as_str(), link, Scope::Shared)
                .await;
            return Answer::Found(size);
        }
        // Held, but not for this repository as far as anyone can show: not this source's.
        Answer::Absent
    }

    /// A manifest was just written to the bucket: what it names that this replica's hot tier
    /// already holds (an image the bucket evicted and a client pulls again, served from the
    /// hot tier, never fetched upstream again) goes to the bucket too, off the request's
    /// path, so the bucket never lists an image it holds only part of for good.
    pub(super) fn share_held_children(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        manifest: &super::Manifest,
    ) {
        let (Some(this), Some(upstream)) = (self.me.upgrade(), self.upstreams.get(&upstream.name))
        else {
            return;
        };
        let children: Vec<Digest> = crate::oci::media_type::referenced_digests(&manifest.bytes)
            .into_iter()
            .map(|(child, _)| child)
            .collect();
        if children.is_empty() {
            return;
        }
        let (upstream, repo) = (upstream.clone(), repo.clone());
        let pending = self.shared.evict.pending();
        tokio::spawn(async move {
            let _pending = pending;
            let held: Vec<(Digest, Option<String>)> = this
                .facts
                .local(move |store| {
                    Ok(children
                        .into_iter()
                        .filter_map(|child| {
                            let entry = store.stat(&child).ok()??;
                            Some((child, entry.media_type))
                        })
                        .collect())
                })
                .await
                .unwrap_or_default();
            for (digest, media_type) in held {
                match media_type {
                    Some(media_type) => {
                        this.share_held_manifest(&upstream, &repo, &digest, &media_type)
                            .await
                    }
                    None => {
                        let source = Source {
                            upstream: upstream.clone(),
                            repo: repo.clone(),
                            digest,
                            forward: false,
                        };
                        this.publish_blob_once(source).await;
                    }
                }
            }
        });
    }

    /// A manifest this replica holds, written to the bucket (with its link) if it lacks it.
    async fn share_held_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
    ) {
        let Some(bucket) = self.shared.bucket() else {
            return;
        };
        if !matches!(bucket.has_manifest(digest).await, Ok(false)) {
            return;
        }
        let Ok(Some(manifest)) = self.stored_manifest(digest).await else {
            return;
        };
        if bucket
            .put_manifest(digest, manifest.bytes.clone(), media_type)
            .await
            .is_ok()
        {
            let _ = bucket.put_link(&upstream.name, repo.as_str(), digest).await;
            self.bucket_written(manifest.bytes.len() as u64);
            // An index's platform manifests name layers of their own.
            self.share_held_children(upstream, repo, &manifest);
        }
    }

    /// [`Cache::publish_blob`] unless an upload of the digest is already under way here (two
    /// fills of one digest commit while replicas' views disagree; one upload is enough).
    pub(super) async fn publish_fetched_blob(&self, source: &Source) {
        if !self.shared.start_upload(&source.digest) {
            return;
        }
        self.publish_blob(source).await;
        self.shared.end_upload(&source.digest);
    }

    /// [`Cache::publish_blob`] unless an upload of the digest is already under way here or
    /// the bucket already has it.
    pub(super) async fn publish_blob_once(&self, source: Source) {
        let Some(bucket) = self.shared.bucket() else {
            return;
        };
        if !self.shared.start_upload(&source.digest) {
            return;
        }
        if let Ok(None) = bucket.blob_size(&source.digest).await {
            self.publish_blob(&source).await;
        }
        self.shared.end_upload(&source.digest);
    }

    /// Writes a blob fetched from the upstream through to the bucket, with the link of the
    /// repository it was fetched for. A failure costs only a later refetch: the blob is
    /// served from this replica's disk meanwhile.
    pub(super) async fn publish_blob(&self, source: &Source) {
        let Some(bucket) = self.shared.bucket() else {
            return;
        };
        let digest = &source.digest;
        let wanted = digest.clone();
        let opened = self
            .facts
            .local(move |store| match store.blobs().file(&wanted) {
                Some(Ok(file)) => Ok(Some(file)),
                _ => Ok(None),
            })
            .await;
        let file = match opened {
            Ok(Some(file)) => Arc::new(file),
            // Evicted from the hot tier already: nothing to upload from.
            _ => return,
        };
        let _guard = self.readers.pin(digest);
        match bucket.put_blob_file(digest, file).await {
            Ok(bytes) => {
                debug!(%digest, bytes, "blob written to the bucket");
                self.bucket_written(bytes);
                if let Err(err) = bucket
                    .put_link(&source.upstream.name, source.repo.as_str(), digest)
                    .await
                {
                    warn!(%digest, error = %err, "could not link the blob in the bucket");
                }
            }
            Err(err) => {
                warn!(%digest, error = %err, "could not write the blob to the bucket; it stays on this replica only")
            }
        }
    }
}

impl Cache {
    /// The bucket's answer for a manifest (counted): one another replica committed, if this
    /// repository showed it (linked here or in the bucket); kept in the local store too.
    pub(super) async fn bucket_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Answer<super::Manifest> {
        if self.shared.bucket().is_none() {
            return Answer::Absent;
        }
        self.bucket_manifest_answer(upstream, repo, digest)
            .await
            .counted(&self.metrics, Link::Bucket)
    }

    async fn bucket_manifest_answer(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Answer<super::Manifest> {
        let Some(bucket) = self.shared.bucket() else {
            return Answer::Absent;
        };
        let (bytes, media_type) = match bucket.get_manifest(digest).await {
            Ok(Some(found)) => found,
            Ok(None) => return Answer::Absent,
            Err(err) => {
                warn!(%digest, error = %err, "bucket unavailable, not reading the manifest from it");
                return Answer::Unavailable(err.into());
            }
        };
        let linked = self
            .facts
            .is_linked(&upstream.name, repo.as_str(), digest)
            .await
            .unwrap_or(false);
        if !linked {
            return Answer::Absent;
        }
        if !is_valid_header_value(&media_type) {
            return Answer::Unavailable(Error::Internal(format!(
                "the bucket's manifest {digest} has an invalid media type"
            )));
        }
        let manifest = super::Manifest {
            bytes,
            digest: digest.clone(),
            media_type,
        };
        match self
            .keep_manifest(upstream, repo, manifest, false, false)
            .await
        {
            Ok(manifest) => Answer::Found(manifest),
            Err(err) => Answer::Unavailable(err),
        }
    }

    /// The owner's answer for `reference` (a digest, or a tag when `expected` is `None`),
    /// counted: found (verified and kept here, with when the upstream confirmed it and
    /// whether the owner served it stale), absent when this replica owns it, final for the
    /// owner's relayed answer about its upstream (404, 429, 401, 403), unavailable when the
    /// owner could not answer (then this replica asks the upstream itself).
    pub(super) async fn forwarded_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Answer<(super::Manifest, u64, bool)> {
        let key = match expected {
            Some(digest) => digest.to_string(),
            None => Cluster::tag_key(&upstream.name, repo.as_str(), reference),
        };
        let Some(member) = self.shared.owner_peer(&key) else {
            return Answer::Absent;
        };
        self.owner_manifest(&member, upstream, repo, reference, expected)
            .await
            .counted(&self.metrics, Link::Owner)
    }

    async fn owner_manifest(
        &self,
        member: &Member,
        upstream: &Upstream,
        repo: &RepoName,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Answer<(super::Manifest, u64, bool)> {
        let answer = self
            .shared
            .peer_manifest(member, upstream, repo, reference)
            .await;
        let (mut confirmed, mut stale) = (None, false);
        let verified = answer.and_then(|answer| {
            let PeerManifest {
                bytes,
                media_type,
                digest: named,
                confirmed: owner_confirmed,
                stale: owner_stale,
            } = answer;
            (confirmed, stale) = (owner_confirmed, owner_stale);
            let actual = Digest::sha256_of(&bytes);
            // A tag has no digest of its own to check: the owner names one, and the bytes
            // must hash to it.
            match expected.or(named.as_ref()) {
                Some(wanted) if *wanted == actual && is_valid_header_value(&media_type) => {
                    Ok(super::Manifest {
                        bytes,
                        digest: actual,
                        media_type,
                    })
                }
                _ => Err(Error::Internal(format!(
                    "peer sent a manifest that does not match its digest ({actual})"
                ))),
            }
        });
        let manifest = match verified {
            Ok(manifest) => manifest,
            Err(err) if err.is_authoritative() => {
                debug!(peer = member.address(), upstream = %upstream.name, repository = %repo, reference, error = %err, "owner relayed its upstream's answer");
                return Answer::Final(err);
            }
            Err(err) => {
                warn!(peer = member.address(), upstream = %upstream.name, repository = %repo, reference, error = %err, "owner unreachable, asking the upstream here");
                self.shared.fell_back(member);
                return Answer::Unavailable(err);
            }
        };
        let manifest = match self
            .keep_manifest(upstream, repo, manifest, expected.is_none(), false)
            .await
        {
            Ok(manifest) => manifest,
            Err(err) => return Answer::Unavailable(err),
        };
        // As fresh as the owner's record, never fresher than now (a peer's clock or number is
        // not trusted further); without one, expired: asked again next time.
        let now = self.clock.now();
        let confirmed = confirmed.unwrap_or(0).min(now);
        if expected.is_none() {
            if let Err(err) = self
                .record_tag(
                    upstream,
                    repo,
                    reference,
                    &manifest.digest,
                    confirmed,
                    false,
                )
                .await
            {
                return Answer::Unavailable(err);
            }
        }
        Answer::Found((manifest, confirmed, stale))
    }

    /// A tag from what the cluster shares: the bucket's record when the upstream confirmed it
    /// within `tag_ttl`, else the owner's answer (if `forward` and another replica owns it).
    /// `Ok(None)` leaves the tag to this replica's own revalidation; `Err` is the owner's final
    /// answer about its upstream.
    pub(super) async fn shared_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        forward: bool,
    ) -> Result<Option<(super::Manifest, super::Outcome)>, Error> {
        if let Some(bucket) = self.shared.bucket() {
            let entry = match bucket.get_tag(&upstream.name, repo.as_str(), tag).await {
                Ok(entry) => entry,
                Err(err) => {
                    warn!(upstream = %upstream.name, repository = %repo, tag, error = %err, "bucket unavailable, not reading the tag from it");
                    None
                }
            };
            if let Some(entry) = entry {
                let age = self.clock.now().saturating_sub(entry.confirmed);
                if Duration::from_millis(age) < self.policy.tag_ttl {
                    let manifest = match self.stored_manifest(&entry.digest).await.ok().flatten() {
                        Some(manifest) => Some(manifest),
                        // The tag vouches for its manifest in this repository.
                        None => match bucket.get_manifest(&entry.digest).await {
                            Ok(Some((bytes, media_type))) if is_valid_header_value(&media_type) => {
                                Some(super::Manifest {
                                    bytes,
                                    digest: entry.digest.clone(),
                                    media_type,
                                })
                            }
                            _ => None,
                        },
                    };
                    if let Some(manifest) = manifest {
                        let Ok(kept) = self
                            .keep_manifest(upstream, repo, manifest, true, false)
                            .await
                        else {
                            return Ok(None);
                        };
                        if self
                            .record_tag(upstream, repo, tag, &kept.digest, entry.confirmed, false)
                            .await
                            .is_err()
                        {
                            return Ok(None);
                        }
                        return Ok(Some((kept, super::Outcome::Hit)));
                    }
                }
            }
        }
        if !forward {
            return Ok(None);
        }
        let (manifest, _, stale) = match self.forwarded_manifest(upstream, repo, tag, None).await {
            Answer::Found(found) => found,
            Answer::Final(err) => return Err(err),
            Answer::Absent | Answer::Unavailable(_) => return Ok(None),
        };
        // The owner could not confirm it either (its upstream is down): stale here too.
        let outcome = if stale {
            super::Outcome::Stale
        } else {
            super::Outcome::Miss
        };
        Ok(Some((manifest, outcome)))
    }
}
