//! Tags: served within `cache.tag_ttl`, revalidated after it with a `HEAD` (by the tag's
//! owner in a cluster), served stale when the upstream is unavailable, and recorded here and
//! in the bucket with the time the upstream confirmed them.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::{manifest_error, Cache, Error, Manifest, Outcome};
use crate::oci::{Digest, RepoName};
use crate::storage::{self, Scope};
use crate::upstream::{self, Upstream};

impl Cache {
    pub(super) async fn manifest_by_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
        forward: bool,
    ) -> Result<(Manifest, Outcome), Error> {
        let cached = self.cached_tag(upstream, repo, tag).await?;
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
    pub(super) async fn owner_answered(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        answer: Error,
    ) -> Result<(Manifest, Outcome), Error> {
        let Error::Upstream(err) = answer else {
            return Err(answer);
        };
        let held = match self.cached_tag(upstream, repo, tag).await? {
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
    pub(super) async fn refresh_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
    ) -> Result<(Manifest, Outcome), Error> {
        let cached = self.cached_tag(upstream, repo, tag).await?;
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
    pub(super) async fn revalidate(
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
    pub(super) async fn commit_tag(
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
    pub(super) fn serve_stale(
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

    pub(super) async fn cached_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
    ) -> Result<Option<storage::TagEntry>, Error> {
        Ok(self.facts.tag(&upstream.name, repo.as_str(), tag).await?)
    }

    /// Points a tag at a digest, confirmed by the upstream at `confirmed` (unix ms), here and,
    /// if `share`, in the bucket for the other replicas.
    pub(super) async fn record_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &str,
        digest: &Digest,
        confirmed: u64,
        share: bool,
    ) -> Result<(), Error> {
        let scope = if share { Scope::Shared } else { Scope::Here };
        self.facts
            .put_tag(
                &upstream.name,
                repo.as_str(),
                tag,
                digest,
                confirmed,
                self.clock.now(),
                scope,
            )
            .await?;
        if share {
            self.share_tag_ref(&upstream.name, repo.as_str(), tag, digest);
        }
        Ok(())
    }
}
