//! What the cache passes through with a memory of its own: a repository's tag list (the tags
//! we hold when the upstream is unavailable) and referrers (cached like tags, so signature
//! verification works offline).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::debug;

use super::{manifest_error, Cache, Error, Outcome};
use crate::oci::{Digest, RepoName};
use crate::storage;
use crate::upstream::{self, Upstream};

impl Cache {
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
        let key = (
            upstream.name.clone(),
            repo.to_string(),
            digest.clone(),
            query.to_owned(),
        );
        let cached = {
            let (up, repository, subject, query) = key.clone();
            self.facts
                .local(move |store| {
                    Ok(store
                        .index()
                        .get_referrers(&up, &repository, &subject, &query)?)
                })
                .await?
        };
        if let Some(entry) = &cached {
            let age = self.clock.now().saturating_sub(entry.confirmed);
            if Duration::from_millis(age) < self.policy.tag_ttl {
                return Ok((Bytes::from(entry.body.clone()), Outcome::Hit));
            }
        }
        match upstream.referrers(repo, digest, query).await {
            Ok(body) => {
                self.keep_referrers(key, &body).await?;
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
                    let (up, repository, subject, query) = key;
                    self.facts
                        .local(move |store| {
                            Ok(store.index().remove_referrers(
                                &up,
                                &repository,
                                &subject,
                                &query,
                            )?)
                        })
                        .await?;
                }
                Err(manifest_error(err))
            }
        }
    }

    /// Records the upstream's referrers answer, if its subject is in the store and the body is
    /// text (a referrers index is JSON; anything else is passed on but not kept).
    async fn keep_referrers(
        &self,
        (up, repository, subject, query): (String, String, Digest, String),
        body: &Bytes,
    ) -> Result<(), Error> {
        let Ok(text) = std::str::from_utf8(body) else {
            return Ok(());
        };
        // Filters are chosen by clients: a few per subject are kept, not one per made-up value.
        const MAX_REFERRERS_QUERIES: usize = 8;
        let (text, now) = (text.to_owned(), self.clock.now());
        self.facts
            .local(move |store| {
                if store.stat(&subject)?.is_none() {
                    return Ok(());
                }
                let index = store.index();
                if index
                    .get_referrers(&up, &repository, &subject, &query)?
                    .is_none()
                    && index.referrers_queries(&up, &repository, &subject)? >= MAX_REFERRERS_QUERIES
                {
                    return Ok(());
                }
                Ok(index.put_referrers(&up, &repository, &subject, &query, text, now)?)
            })
            .await?;
        Ok(())
    }
}
