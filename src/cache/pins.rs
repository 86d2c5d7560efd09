//! Pinned images (`pins:`): fetched in the background at start-up, every platform, through the
//! cache's own paths (so verified and single-flighted like any pull), revalidated every
//! `pins_refresh`, and handed to the evictor, which never removes or ages them out.
//!
//! A pin whose refresh fails (upstream down) keeps the image it pinned last. Pattern pins
//! (`app:1.*`) match against the first page of the upstream's tag list.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::{Cache, Error, Manifest};
use crate::config::Pin;
use crate::oci::{media_type, Digest, Reference, RepoName};
use crate::outcome::Outcome;
use crate::storage::Store;
use crate::upstream::Upstream;

/// What pins hold now: `upstream/repository:tag` → root digest.
pub type Pinned = HashMap<String, Digest>;

/// One pass over the pins.
#[derive(Debug, Default)]
pub struct PinPass {
    /// Tags pinned, with the image each names.
    pub pinned: Pinned,
    /// Pins (or tags of pattern pins) that could not be fetched.
    pub failed: usize,
    /// Bytes of the content the pinned images hold (shared content counted once).
    pub bytes: u64,
}

impl Cache {
    /// Fetches every pinned image whole and records the pinned set with the evictor.
    pub async fn refresh_pins(self: &Arc<Self>, pins: &[Pin]) -> PinPass {
        let mut pass = PinPass::default();
        let previous = self.pinned();
        // Sizes as the upstream gave them, so content too large to be stored counts too.
        let mut sizes: HashMap<Digest, u64> = HashMap::new();
        for pin in pins {
            let Some(upstream) = self.upstreams.get(&pin.upstream).cloned() else {
                pass.failed += 1;
                continue;
            };
            let repo = upstream.normalize(pin.repository.clone());
            let tags = match self.pin_tags(&upstream, &repo, pin).await {
                Ok(tags) => tags,
                Err(err) => {
                    warn!(%pin, error = %err, "pinned repository's tags unavailable, keeping what it pinned");
                    pass.failed += 1;
                    let prefix = format!("{}/{}:", upstream.name, repo);
                    for (name, root) in &previous {
                        if name.starts_with(&prefix) && pin.matches(&name[prefix.len()..]) {
                            pass.pinned.insert(name.clone(), root.clone());
                        }
                    }
                    continue;
                }
            };
            for tag in tags {
                let name = format!("{}/{}:{}", upstream.name, repo, tag);
                match self.pin_image(&upstream, &repo, &tag, &mut sizes).await {
                    Ok(root) => {
                        pass.pinned.insert(name, root);
                    }
                    Err(err) => {
                        warn!(pin = %name, error = %err, "pinned image could not be fetched, keeping what it pinned");
                        pass.failed += 1;
                        if let Some(root) = previous.get(&name) {
                            pass.pinned.insert(name, root.clone());
                        }
                    }
                }
            }
        }
        let roots: Vec<Digest> = pass.pinned.values().cloned().collect();
        sizes = self
            .facts
            .local(move |store| Ok(stored_sizes(store, &roots, sizes)))
            .await
            .unwrap_or_default();
        pass.bytes = sizes
            .values()
            .fold(0u64, |sum, size| sum.saturating_add(*size));
        self.evictor
            .set_pinned(pass.pinned.values().cloned().collect());
        self.share_pins(pass.pinned.values()).await;
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = pass.pinned.clone();
        pass
    }

    /// The pinned tags and the images they name (for the status page).
    pub fn pinned(&self) -> Pinned {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Completed pin passes, to wait on.
    pub fn pin_passes(&self) -> watch::Receiver<u64> {
        self.pin_passes.subscribe()
    }

    async fn pin_tags(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        pin: &Pin,
    ) -> Result<Vec<String>, Error> {
        if !pin.is_pattern() {
            return Ok(vec![pin.tag.clone()]);
        }
        let (body, _) = self.tags(upstream, repo, "").await?;
        let list: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Error::Internal(format!("tag list: {e}")))?;
        Ok(list["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .filter(|t| pin.matches(t))
            .map(str::to_owned)
            .collect())
    }

    /// Pulls a tag with everything it names, as a client pulling every platform would.
    async fn pin_image(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        tag: &str,
        sizes: &mut HashMap<Digest, u64>,
    ) -> Result<Digest, Error> {
        let reference: Reference = tag
            .parse()
            .map_err(|_| Error::Internal(format!("invalid pinned tag {tag:?}")))?;
        let (root, _) = self.manifest(upstream, repo, &reference).await?;
        let mut pending: Vec<Manifest> = vec![root.clone()];
        while let Some(manifest) = pending.pop() {
            sizes.insert(manifest.digest.clone(), manifest.bytes.len() as u64);
            for (digest, kind) in media_type::referenced_digests(&manifest.bytes) {
                let is_manifest = kind.as_deref().is_some_and(media_type::is_manifest_type);
                if is_manifest {
                    let (child, _) = self
                        .manifest(upstream, repo, &Reference::Digest(digest))
                        .await?;
                    pending.push(child);
                } else {
                    let blob = self.blob(upstream, repo, &digest).await?;
                    sizes.insert(digest.clone(), blob.size);
                    if blob.outcome != Outcome::Hit {
                        // Read to the end: the pass is done when the content is.
                        let mut body = blob.body.stream(0, blob.size);
                        while let Some(chunk) = body.next().await {
                            chunk.map_err(|e| Error::Internal(e.to_string()))?;
                        }
                    }
                }
            }
        }
        Ok(root.digest)
    }
}

/// Adds the stored sizes of what the images rooted at `roots` hold (pins kept from an earlier
/// pass were not fetched in this one). Blocking.
fn stored_sizes(
    store: &Store,
    roots: &[Digest],
    mut sizes: HashMap<Digest, u64>,
) -> HashMap<Digest, u64> {
    let index = store.index();
    for root in roots {
        for member in index.members(root).unwrap_or_default() {
            if let std::collections::hash_map::Entry::Vacant(slot) = sizes.entry(member) {
                if let Ok(Some(entry)) = index.get_blob(slot.key()) {
                    slot.insert(entry.size);
                }
            }
        }
    }
    sizes
}

/// Runs pin passes at start-up and every `every` until `shutdown`. When the first pass finds
/// the pinned set (every blob and manifest the pinned tags name, at the sizes the upstream
/// gave, shared content once) larger than `max_size` (non-zero), says so through `too_big`
/// and stops: `run` then exits with that error.
pub async fn run(
    cache: Arc<Cache>,
    pins: Vec<Pin>,
    every: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    too_big: oneshot::Sender<String>,
) {
    tokio::pin!(shutdown);
    let mut too_big = Some(too_big);
    loop {
        let pass = cache.refresh_pins(&pins).await;
        info!(
            pinned = pass.pinned.len(),
            failed = pass.failed,
            bytes = pass.bytes,
            "pinned images refreshed"
        );
        let max_size = cache.policy.max_size;
        if let Some(sender) = too_big.take() {
            if max_size > 0 && pass.bytes > max_size {
                let message = format!(
                    "pins: the pinned images hold {} bytes, more than storage.max_size ({max_size} bytes)",
                    pass.bytes
                );
                error!("{message}");
                let _ = sender.send(message);
                return;
            }
        }
        cache.pin_passes.send_modify(|n| *n += 1);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
