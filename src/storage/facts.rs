//! One interface to the facts the cache states about content: which repositories a digest is
//! content of (links), what a tag names, which images hold what. The local sled [`Index`] is a
//! cache in front of the shared bucket's records: a link is looked up here first, then in the
//! bucket, and a link found there is remembered here; a fact is written once, through
//! [`Facts`], which writes it here and, when it is to be shared, to the bucket as well. Every
//! sled call runs on the blocking pool, never on an async worker.
//!
//! What the bucket says of tags is read by the cache itself (`cache::shared`), since whether a
//! tag record is fresh enough is the cache's policy (`tag_ttl`), not a storage fact.
//!
//! [`Index`]: super::Index

use std::sync::Arc;

use tracing::warn;

use super::s3::{Bucket, SharedTag};
use super::{Error, Store, TagEntry};
use crate::oci::Digest;

/// Whether a fact is for this replica only or for every replica sharing the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Here only: facts the bucket already has, or that only this replica may state.
    Here,
    /// Here, and in the bucket when there is one. A bucket that refuses is logged; the
    /// replica keeps serving from what it knows.
    Shared,
}

/// The local index and, optionally, the shared bucket's records, behind one interface.
#[derive(Clone)]
pub struct Facts {
    store: Arc<Store>,
    bucket: Option<Arc<Bucket>>,
}

impl Facts {
    pub fn new(store: Arc<Store>, bucket: Option<Arc<Bucket>>) -> Facts {
        Facts { store, bucket }
    }

    /// Runs `work` against the local store (index and files) on the blocking pool.
    pub async fn local<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
    }

    /// Whether `digest` is content of `repository`: as this replica knows it, else as the
    /// bucket records it (then remembered here). A bucket that does not answer counts as not
    /// saying so.
    pub async fn is_linked(
        &self,
        upstream: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<bool, Error> {
        if self.is_linked_here(upstream, repository, digest).await? {
            return Ok(true);
        }
        let Some(bucket) = &self.bucket else {
            return Ok(false);
        };
        if !bucket
            .is_linked(upstream, repository, digest)
            .await
            .unwrap_or(false)
        {
            return Ok(false);
        }
        self.link(upstream, repository, vec![digest.clone()], Scope::Here)
            .await?;
        Ok(true)
    }

    /// Whether this replica's index links `digest` to `repository`.
    pub async fn is_linked_here(
        &self,
        upstream: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<bool, Error> {
        let (upstream, repository, digest) =
            (upstream.to_owned(), repository.to_owned(), digest.clone());
        self.local(move |store| Ok(store.index().is_linked(&upstream, &repository, &digest)?))
            .await
    }

    /// Records that each of `digests` is content of `repository`.
    pub async fn link(
        &self,
        upstream: &str,
        repository: &str,
        digests: Vec<Digest>,
        scope: Scope,
    ) -> Result<(), Error> {
        let shared = match (&self.bucket, scope) {
            (Some(_), Scope::Shared) => Some(digests.clone()),
            _ => None,
        };
        let (up, repo) = (upstream.to_owned(), repository.to_owned());
        self.local(move |store| {
            let index = store.index();
            for digest in &digests {
                index.link(&up, &repo, digest)?;
            }
            Ok(())
        })
        .await?;
        if let (Some(bucket), Some(digests)) = (&self.bucket, shared) {
            for digest in digests {
                if let Err(error) = bucket.put_link(upstream, repository, &digest).await {
                    warn!(%digest, %error, "could not record the link in the bucket");
                }
            }
        }
        Ok(())
    }

    /// What `tag` names as this replica last confirmed it.
    pub async fn tag(
        &self,
        upstream: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<TagEntry>, Error> {
        let (upstream, repository, tag) =
            (upstream.to_owned(), repository.to_owned(), tag.to_owned());
        self.local(move |store| Ok(store.index().get_tag(&upstream, &repository, &tag)?))
            .await
    }

    /// Points `tag` at `digest`, confirmed by the upstream at `confirmed` (unix ms). A tag
    /// always names an image: what it names is evicted as one, pulled as of `now`.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_tag(
        &self,
        upstream: &str,
        repository: &str,
        tag: &str,
        digest: &Digest,
        confirmed: u64,
        now: u64,
        scope: Scope,
    ) -> Result<(), Error> {
        let (up, repo, name, target) = (
            upstream.to_owned(),
            repository.to_owned(),
            tag.to_owned(),
            digest.clone(),
        );
        self.local(move |store| {
            let index = store.index();
            index.add_member(&target, &target, now)?;
            index.put_tag(&up, &repo, &name, &target, confirmed)?;
            Ok(())
        })
        .await?;
        if let (Some(bucket), Scope::Shared) = (&self.bucket, scope) {
            let entry = SharedTag {
                digest: digest.clone(),
                confirmed,
            };
            if let Err(error) = bucket.put_tag(upstream, repository, tag, &entry).await {
                warn!(upstream, repository, tag, %error, "could not record the tag in the bucket");
            }
        }
        Ok(())
    }
}
