//! The index: facts about committed blobs, tags, which repositories hold which blobs, and which
//! images (what a tag names, or content fetched by digest alone) hold which content, in sled.
//!
//! Every fact about a digest has a reverse entry keyed by that digest (`tag_refs`, `linked`,
//! `owners`, `children`), so removing content removes everything said about it without a scan,
//! and the catalog (`repos`, a link count per repository) and eviction order (`by_age`, images
//! by last pull) are maintained as content comes and goes rather than computed per request.
//!
//! This is the only module that touches sled, so the engine stays swappable. One named tree per
//! keyspace, values are versioned JSON so a later release can read an older index. The index is
//! a cache of facts about files: [`Store::open`](super::Store::open) reconciles it with `blobs/`.
//!
//! sled reads and writes are memory operations with background flushing, so point lookups run on
//! the calling thread; whole-tree scans are left to callers to run with `spawn_blocking`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::now_millis;
use crate::oci::Digest;

/// A committed blob (layer, config or manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Schema version of this value.
    pub v: u8,
    /// Size in bytes of the file.
    pub size: u64,
    /// Last time it was served or stored, milliseconds since the Unix epoch (for LRU eviction).
    pub accessed: u64,
    /// Media type, for manifests (the `Content-Type` to serve them with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
}

/// What a tag pointed to the last time the upstream confirmed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    /// Schema version of this value.
    pub v: u8,
    /// The manifest digest.
    pub digest: Digest,
    /// When the upstream last confirmed the digest, milliseconds since the Unix epoch (a
    /// `tag_ttl` of a second must mean a second, not anything up to two).
    pub confirmed: u64,
}

/// A referrers index as the upstream last answered it, for one subject and filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferrersEntry {
    /// Schema version of this value.
    pub v: u8,
    /// The index body (JSON text, stored as the upstream sent it).
    pub body: String,
    /// When the upstream last answered it, milliseconds since the Unix epoch.
    pub confirmed: u64,
}

const VERSION: u8 = 1;

/// Format of the index as a whole, kept under [`FORMAT_KEY`] in sled's default tree. An index
/// with another format (a newer release's, or garbage) is not read: it is set aside and
/// rebuilt from the blobs by [`Store::open`](super::Store::open).
pub const FORMAT: u32 = 1;
const FORMAT_KEY: &[u8] = b"regmirror.format";

/// sled's page cache when the caller does not say (`storage.index_cache`'s default).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// Errors from the index engine.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The engine failed (I/O, corruption).
    #[error("index: {0}")]
    Engine(String),
    /// The index was written in a format this release does not read.
    #[error("index: unknown format {found:?} (this release reads format {FORMAT})")]
    Format { found: String },
    /// A stored value could not be decoded.
    #[error("index: undecodable value in {tree}: {source}")]
    Decode {
        tree: &'static str,
        source: serde_json::Error,
    },
}

/// An image: the unit of eviction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// Schema version of this value.
    pub v: u8,
    /// Last time any of its manifests was pulled, milliseconds since the Unix epoch.
    pub pulled: u64,
}

impl From<sled::Error> for IndexError {
    fn from(err: sled::Error) -> Self {
        IndexError::Engine(err.to_string())
    }
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    blobs: sled::Tree,
    tags: sled::Tree,
    links: sled::Tree,
    referrers: sled::Tree,
    /// `digest\0upstream\0repo\0tag`: the tags pointing at a digest.
    tag_refs: sled::Tree,
    /// `digest\0upstream\0repo`: the reverse of `links`.
    linked: sled::Tree,
    /// `upstream\0repo\0` → number of links (big-endian u64): the catalog.
    repos: sled::Tree,
    /// `manifest\0referenced`: what a committed manifest names.
    children: sled::Tree,
    /// `root\0member` and its reverse `member\0root`: image membership.
    members: sled::Tree,
    owners: sled::Tree,
    /// `root` → [`ImageEntry`], and `pulled (8 bytes big-endian) root` in pull order.
    images: sled::Tree,
    by_age: sled::Tree,
    /// `manifest` → the digests it names, `\n`-separated: what the bucket evictor learned
    /// from the shared bucket's manifests, kept across restarts so a pass does not read every
    /// manifest again. Only a memo of immutable content: losing it costs reads, nothing else.
    bucket_children: sled::Tree,
}

impl Index {
    /// Opens (or creates) the index in `dir` with the default page cache.
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        Index::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the index in `dir`; sled keeps up to `cache_bytes` of pages in memory
    /// (its own default, 1 GiB, is too much for a sidecar). Fails on an index sled cannot read
    /// or one of an unknown [`FORMAT`]: the caller decides whether to rebuild.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Index, IndexError> {
        let existed = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Facts in the index can be rebuilt from the files, so losing the last half second
            // on a crash only costs a re-download; flushing on every write would cost every hit.
            .flush_every_ms(Some(500))
            .open()?;
        match db.get(FORMAT_KEY)? {
            Some(found) if found.as_ref() == FORMAT.to_string().as_bytes() => {}
            Some(found) => {
                return Err(IndexError::Format {
                    found: String::from_utf8_lossy(&found).into_owned(),
                })
            }
            // sled takes emptied (truncated) files for a new database: an index directory
            // that was there but holds nothing was damaged, and is set aside like one sled
            // refuses, so the operator sees it.
            None if existed && is_empty(&db)? => {
                return Err(IndexError::Format {
                    found: "none (empty database)".to_owned(),
                })
            }
            None => {
                // A new index, or one written before the format was recorded (the same
                // format as 1): record it durably before anything else is written.
                db.insert(FORMAT_KEY, FORMAT.to_string().as_bytes())?;
                db.flush()?;
            }
        }
        Ok(Index {
            blobs: db.open_tree("blobs")?,
            tags: db.open_tree("tags")?,
            links: db.open_tree("links")?,
            referrers: db.open_tree("referrers")?,
            tag_refs: db.open_tree("tag_refs")?,
            linked: db.open_tree("linked")?,
            repos: db.open_tree("repos")?,
            children: db.open_tree("children")?,
            members: db.open_tree("members")?,
            owners: db.open_tree("owners")?,
            images: db.open_tree("images")?,
            by_age: db.open_tree("by_age")?,
            bucket_children: db.open_tree("bucket_children")?,
            db,
        })
    }

    /// What the bucket's manifests among `manifests` name, as far as an earlier pass learned
    /// it: `None` for one never read. A value that does not parse counts as never read.
    pub fn bucket_children(
        &self,
        manifests: &[Digest],
    ) -> Result<Vec<Option<Vec<Digest>>>, IndexError> {
        let mut out = Vec::with_capacity(manifests.len());
        for manifest in manifests {
            let known = self
                .bucket_children
                .get(manifest.as_str())?
                .and_then(|value| {
                    std::str::from_utf8(&value)
                        .ok()?
                        .split_terminator('\n')
                        .map(|d| d.parse().ok())
                        .collect::<Option<Vec<Digest>>>()
                });
            out.push(known);
        }
        Ok(out)
    }

    /// Remembers what bucket manifests name (see [`Index::bucket_children`]).
    pub fn put_bucket_children(&self, learned: &[(Digest, Vec<Digest>)]) -> Result<(), IndexError> {
        let mut batch = sled::Batch::default();
        for (manifest, children) in learned {
            let mut value = String::with_capacity(children.len() * 72);
            for child in children {
                value.push_str(child.as_str());
                value.push('\n');
            }
            batch.insert(manifest.as_str(), value.as_bytes());
        }
        self.bucket_children.apply_batch(batch)?;
        Ok(())
    }

    /// Forgets what bucket manifests no longer listed named: those for which `listed` is false.
    /// Returns how many it forgot.
    pub fn retain_bucket_children(
        &self,
        listed: impl Fn(&Digest) -> bool,
    ) -> Result<usize, IndexError> {
        let mut batch = sled::Batch::default();
        let mut forgotten = 0;
        for item in self.bucket_children.iter().keys() {
            let key = item?;
            let keep = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| k.parse::<Digest>().ok())
                .is_some_and(|d| listed(&d));
            if !keep {
                batch.remove(key);
                forgotten += 1;
            }
        }
        self.bucket_children.apply_batch(batch)?;
        Ok(forgotten)
    }

    pub fn get_blob(&self, digest: &Digest) -> Result<Option<BlobEntry>, IndexError> {
        decode("blobs", self.blobs.get(digest.as_str())?)
    }

    /// Records a blob; answers whether it was new (atomically: of two concurrent commits of
    /// one digest, exactly one is told so).
    pub fn put_blob(&self, digest: &Digest, entry: &BlobEntry) -> Result<bool, IndexError> {
        Ok(self.blobs.insert(digest.as_str(), encode(entry))?.is_none())
    }

    /// All blobs with their entries (a full scan: call off the async threads).
    pub fn all_blobs(&self) -> Result<Vec<(Digest, BlobEntry)>, IndexError> {
        let mut out = Vec::new();
        for item in self.blobs.iter() {
            let (key, value) = item?;
            let Some(digest) = std::str::from_utf8(&key)
                .ok()
                .and_then(|s| s.parse::<Digest>().ok())
            else {
                continue;
            };
            let entry: BlobEntry =
                serde_json::from_slice(&value).map_err(|source| IndexError::Decode {
                    tree: "blobs",
                    source,
                })?;
            out.push((digest, entry));
        }
        Ok(out)
    }

    pub fn get_tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagEntry>, IndexError> {
        decode("tags", self.tags.get(key3(upstream, repo, tag))?)
    }

    /// Tags we hold for a repository, sorted (for `tags/list` when the upstream is down).
    pub fn tags(&self, upstream: &str, repo: &str) -> Result<Vec<String>, IndexError> {
        let prefix = key2(upstream, repo);
        let mut out = Vec::new();
        for item in self.tags.scan_prefix(&prefix) {
            let (key, _) = item?;
            if let Ok(tag) = std::str::from_utf8(&key[prefix.len()..]) {
                out.push(tag.to_owned());
            }
        }
        Ok(out)
    }

    pub fn is_linked(
        &self,
        upstream: &str,
        repo: &str,
        digest: &Digest,
    ) -> Result<bool, IndexError> {
        Ok(self
            .links
            .contains_key(key3(upstream, repo, digest.as_str()))?)
    }

    /// The cached referrers of `subject` in a repository for one query (`artifactType=…` or
    /// empty).
    pub fn get_referrers(
        &self,
        upstream: &str,
        repo: &str,
        subject: &Digest,
        query: &str,
    ) -> Result<Option<ReferrersEntry>, IndexError> {
        decode(
            "referrers",
            self.referrers
                .get(referrers_key(upstream, repo, subject, query))?,
        )
    }

    pub fn put_referrers(
        &self,
        upstream: &str,
        repo: &str,
        subject: &Digest,
        query: &str,
        body: String,
        confirmed: u64,
    ) -> Result<(), IndexError> {
        let entry = ReferrersEntry {
            v: VERSION,
            body,
            confirmed,
        };
        self.referrers.insert(
            referrers_key(upstream, repo, subject, query),
            encode(&entry),
        )?;
        Ok(())
    }

    /// How many queries (filters) of `subject`'s referrers are cached for this repository.
    pub fn referrers_queries(
        &self,
        upstream: &str,
        repo: &str,
        subject: &Digest,
    ) -> Result<usize, IndexError> {
        let mut prefix = referrers_key(upstream, repo, subject, "");
        prefix.pop();
        let mut count = 0;
        for item in self.referrers.scan_prefix(&prefix) {
            item?;
            count += 1;
        }
        Ok(count)
    }

    pub fn remove_referrers(
        &self,
        upstream: &str,
        repo: &str,
        subject: &Digest,
        query: &str,
    ) -> Result<(), IndexError> {
        self.referrers
            .remove(referrers_key(upstream, repo, subject, query))?;
        Ok(())
    }

    /// Points a tag at a digest, confirmed by the upstream at `confirmed`.
    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
        digest: &Digest,
        confirmed: u64,
    ) -> Result<(), IndexError> {
        let entry = encode(&TagEntry {
            v: VERSION,
            digest: digest.clone(),
            confirmed,
        });
        let (key, reference) = (
            key3(upstream, repo, tag),
            tag_ref(digest, upstream, repo, tag),
        );
        // The tag and its reverse entry change together, or not at all.
        (&self.tags, &self.tag_refs)
            .transaction(|(tags, tag_refs)| {
                let previous = tags.insert(key.as_slice(), entry.as_slice())?;
                if let Some(previous) = decode::<TagEntry>("tags", previous).map_err(abort)? {
                    if previous.digest != *digest {
                        tag_refs.remove(tag_ref(&previous.digest, upstream, repo, tag))?;
                    }
                }
                tag_refs.insert(reference.as_slice(), &[])?;
                Ok(())
            })
            .map_err(committed)
    }

    /// Records that `repo` on `upstream` holds `digest`: a cached blob is served under a
    /// repository only if that repository's upstream has shown it to us.
    pub fn link(&self, upstream: &str, repo: &str, digest: &Digest) -> Result<(), IndexError> {
        let (link, reverse, repository) = (
            key3(upstream, repo, digest.as_str()),
            key3(digest.as_str(), upstream, repo),
            key2(upstream, repo),
        );
        // The link, its reverse entry and the repository's count change together.
        (&self.links, &self.linked, &self.repos)
            .transaction(|(links, linked, repos)| {
                if links.insert(link.as_slice(), &[])?.is_none() {
                    linked.insert(reverse.as_slice(), &[])?;
                    let n = count(repos.get(repository.as_slice())?.as_deref());
                    repos.insert(repository.as_slice(), &n.saturating_add(1).to_be_bytes())?;
                }
                Ok(())
            })
            .map_err(committed)
    }

    /// Distinct `(upstream, repository)` pairs holding at least one link, sorted: read from the
    /// per-repository link counts, as long as the list of repositories present.
    pub fn repositories(&self) -> Result<Vec<(String, String)>, IndexError> {
        let mut out = Vec::new();
        for item in self.repos.iter() {
            let (key, _) = item?;
            let mut parts = key.split(|b| *b == 0);
            if let (Some(upstream), Some(repo)) = (parts.next(), parts.next()) {
                out.push((
                    String::from_utf8_lossy(upstream).into_owned(),
                    String::from_utf8_lossy(repo).into_owned(),
                ));
            }
        }
        Ok(out)
    }

    /// Records what a committed manifest references, so images that hold it hold those too.
    pub fn set_children(&self, manifest: &Digest, children: &[Digest]) -> Result<(), IndexError> {
        for child in children {
            self.children.insert(key2d(manifest, child.as_str()), &[])?;
        }
        Ok(())
    }

    /// Makes `member` (and, through `children`, what it references) part of the image rooted
    /// at `root`, creating the image as pulled at `now` if it is new.
    pub fn add_member(&self, root: &Digest, member: &Digest, now: u64) -> Result<(), IndexError> {
        if self.images.get(root.as_str())?.is_none() {
            let entry = encode(&ImageEntry {
                v: VERSION,
                pulled: now,
            });
            let age = age_key(now, root);
            // The image and its place in the age order are created together, once.
            (&self.images, &self.by_age)
                .transaction(|(images, by_age)| {
                    if images.get(root.as_str())?.is_none() {
                        images.insert(root.as_str(), entry.as_slice())?;
                        by_age.insert(age.as_slice(), &[])?;
                    }
                    Ok(())
                })
                .map_err(committed)?;
        }
        self.add_member_at(root, member, 0)
    }

    fn add_member_at(&self, root: &Digest, member: &Digest, depth: u8) -> Result<(), IndexError> {
        let (forward, reverse) = (key2d(root, member.as_str()), key2d(member, root.as_str()));
        (&self.members, &self.owners)
            .transaction(|(members, owners)| {
                members.insert(forward.as_slice(), &[])?;
                owners.insert(reverse.as_slice(), &[])?;
                Ok(())
            })
            .map_err(committed)?;
        // An index names manifests which name blobs: three levels; more is a loop or abuse.
        if depth < 3 {
            for child in self.digests_under(&self.children, member)? {
                self.add_member_at(root, &child, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Makes content nobody holds (a blob fetched by digest alone) an image of its own.
    pub fn own(&self, digest: &Digest, now: u64) -> Result<(), IndexError> {
        if self.owners.scan_prefix(prefix(digest)).next().is_none() {
            self.add_member(digest, digest, now)?;
        }
        Ok(())
    }

    /// The content the image rooted at `root` holds.
    pub fn members(&self, root: &Digest) -> Result<Vec<Digest>, IndexError> {
        self.digests_under(&self.members, root)
    }

    /// The images holding `digest`.
    pub fn owners(&self, digest: &Digest) -> Result<Vec<Digest>, IndexError> {
        self.digests_under(&self.owners, digest)
    }

    /// The members of the image rooted at `root` that no other image holds.
    pub fn sole_members(&self, root: &Digest) -> Result<Vec<Digest>, IndexError> {
        let mut out = Vec::new();
        for member in self.digests_under(&self.members, root)? {
            if self.owners(&member)?.iter().all(|owner| owner == root) {
                out.push(member);
            }
        }
        Ok(out)
    }

    /// Records a pull of the image rooted at `root`; writes only when the stored time is older
    /// than `granularity`, so a hot image costs one index write a second, not one per request.
    pub fn touch_image(&self, root: &Digest, now: u64, granularity: u64) -> Result<(), IndexError> {
        let Some(old) = self.images.get(root.as_str())? else {
            return Ok(());
        };
        let Some(entry) = decode::<ImageEntry>("images", Some(old.clone()))? else {
            return Ok(());
        };
        if entry.pulled.saturating_add(granularity) > now {
            return Ok(());
        }
        let new = encode(&ImageEntry {
            v: VERSION,
            pulled: now,
        });
        let (before, after) = (age_key(entry.pulled, root), age_key(now, root));
        // Only the toucher whose transaction still finds the old entry moves the image in
        // `by_age`, in the same transaction: no duplicates, no image without its age.
        (&self.images, &self.by_age)
            .transaction(|(images, by_age)| {
                if images.get(root.as_str())?.as_deref() != Some(&old[..]) {
                    return Ok(());
                }
                images.insert(root.as_str(), new.as_slice())?;
                by_age.remove(before.as_slice())?;
                by_age.insert(after.as_slice(), &[])?;
                Ok(())
            })
            .map_err(committed)
    }

    /// Records a pull of every image holding `digest`.
    pub fn touch_owners(
        &self,
        digest: &Digest,
        now: u64,
        granularity: u64,
    ) -> Result<(), IndexError> {
        for root in self.owners(digest)? {
            self.touch_image(&root, now, granularity)?;
        }
        Ok(())
    }

    /// The image rooted at `root`, if there is one.
    pub fn image(&self, root: &Digest) -> Result<Option<ImageEntry>, IndexError> {
        decode("images", self.images.get(root.as_str())?)
    }

    /// Images from least to most recently pulled, with their last pull. Reads the `by_age`
    /// tree, as long as the number of images held.
    pub fn images_by_age(&self) -> Result<Vec<(u64, Digest)>, IndexError> {
        let mut out = Vec::new();
        for item in self.by_age.iter() {
            let (key, _) = item?;
            if key.len() < 8 {
                continue;
            }
            let mut at = [0u8; 8];
            at.copy_from_slice(&key[..8]);
            if let Some(root) = parse_digest(&key[8..]) {
                out.push((u64::from_be_bytes(at), root));
            }
        }
        Ok(out)
    }

    /// Removes the image rooted at `root` with the tags naming it, and returns its members no
    /// image holds any more: the caller removes that content (and with it this index's facts).
    pub fn remove_image(&self, root: &Digest) -> Result<Vec<Digest>, IndexError> {
        let mut orphans = Vec::new();
        for member in self.digests_under(&self.members, root)? {
            let (forward, reverse) = (key2d(root, member.as_str()), key2d(&member, root.as_str()));
            (&self.members, &self.owners)
                .transaction(|(members, owners)| {
                    members.remove(forward.as_slice())?;
                    owners.remove(reverse.as_slice())?;
                    Ok(())
                })
                .map_err(committed)?;
            if self.owners.scan_prefix(prefix(&member)).next().is_none() {
                orphans.push(member);
            }
        }
        (&self.images, &self.by_age)
            .transaction(|(images, by_age)| {
                let removed = images.remove(root.as_str())?;
                if let Some(entry) = decode::<ImageEntry>("images", removed).map_err(abort)? {
                    by_age.remove(age_key(entry.pulled, root))?;
                }
                Ok(())
            })
            .map_err(committed)?;
        self.remove_tags_of(root)?;
        Ok(orphans)
    }

    /// Removes everything the index says about `digest`: its blob entry, links (and catalog
    /// counts), tags naming it, what it references, and the image it roots. Content that image
    /// alone held and that is still stored becomes an image of its own; facts about content it
    /// named but never got are dropped. Returns the blob entry if there was one (exactly one
    /// of concurrent removers gets it).
    pub fn remove_blob(&self, digest: &Digest) -> Result<Option<BlobEntry>, IndexError> {
        let removed = decode("blobs", self.blobs.remove(digest.as_str())?)?;
        self.drop_facts(digest)?;
        if self.images.contains_key(digest.as_str())? {
            for orphan in self.remove_image(digest)? {
                if orphan == *digest {
                    continue;
                }
                if self.blobs.contains_key(orphan.as_str())? {
                    self.own(&orphan, now_millis())?;
                } else {
                    self.drop_facts(&orphan)?;
                }
            }
        }
        Ok(removed)
    }

    fn drop_facts(&self, digest: &Digest) -> Result<(), IndexError> {
        for item in self.linked.scan_prefix(prefix(digest)) {
            let (key, _) = item?;
            self.linked.remove(&key)?;
            let mut parts = key[prefix(digest).len()..].split(|b| *b == 0);
            let (Some(upstream), Some(repo)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (upstream, repo) = (
                String::from_utf8_lossy(upstream),
                String::from_utf8_lossy(repo),
            );
            if self
                .links
                .remove(key3(&upstream, &repo, digest.as_str()))?
                .is_some()
            {
                self.repos.update_and_fetch(key2(&upstream, &repo), |old| {
                    let n = count(old).saturating_sub(1);
                    (n > 0).then(|| n.to_be_bytes().to_vec())
                })?;
            }
        }
        self.remove_tags_of(digest)?;
        for item in self.children.scan_prefix(prefix(digest)) {
            let (key, _) = item?;
            self.children.remove(key)?;
        }
        // Referrers are cached only for what the store holds: they go with their subject.
        for item in self.referrers.scan_prefix(prefix(digest)) {
            let (key, _) = item?;
            self.referrers.remove(key)?;
        }
        Ok(())
    }

    /// Drops the tags naming `root` (those that still do): its image is leaving the shared
    /// bucket, so this replica must not answer them from what it happens to hold.
    pub fn forget_tags_of(&self, root: &Digest) -> Result<(), IndexError> {
        self.remove_tags_of(root)
    }

    fn remove_tags_of(&self, digest: &Digest) -> Result<(), IndexError> {
        for item in self.tag_refs.scan_prefix(prefix(digest)) {
            let (reference, _) = item?;
            let mut parts = reference[prefix(digest).len()..].split(|b| *b == 0);
            let (Some(upstream), Some(repo), Some(tag)) =
                (parts.next(), parts.next(), parts.next())
            else {
                self.tag_refs.remove(&reference)?;
                continue;
            };
            let key = key3(
                &String::from_utf8_lossy(upstream),
                &String::from_utf8_lossy(repo),
                &String::from_utf8_lossy(tag),
            );
            // The reverse entry and the tag go together, and the tag only if it still names
            // this digest: one moved on meanwhile (a concurrent `put_tag`) keeps its target.
            (&self.tags, &self.tag_refs)
                .transaction(|(tags, tag_refs)| {
                    tag_refs.remove(reference.as_ref())?;
                    if let Some(entry) =
                        decode::<TagEntry>("tags", tags.get(&key)?).map_err(abort)?
                    {
                        if entry.digest == *digest {
                            tags.remove(key.as_slice())?;
                        }
                    }
                    Ok(())
                })
                .map_err(committed)?;
        }
        Ok(())
    }

    /// The digests after `digest\0` in a `digest\0digest` tree.
    fn digests_under(&self, tree: &sled::Tree, digest: &Digest) -> Result<Vec<Digest>, IndexError> {
        let prefix = prefix(digest);
        let mut out = Vec::new();
        for item in tree.scan_prefix(&prefix) {
            let (key, _) = item?;
            if let Some(digest) = parse_digest(&key[prefix.len()..]) {
                out.push(digest);
            }
        }
        Ok(out)
    }

    /// Entries per tree and bytes on disk, for tests and the index-growth bound.
    pub fn footprint(&self) -> Result<(usize, u64), IndexError> {
        let entries = self
            .db
            .tree_names()
            .iter()
            // The default tree holds only bookkeeping (the format key), no facts.
            .filter(|name| name.as_ref() != b"__sled__default")
            .map(|name| self.db.open_tree(name).map(|t| t.len()))
            .sum::<Result<usize, _>>()?;
        Ok((entries, self.db.size_on_disk()?))
    }

    /// Whether the engine answers (for `/readyz`).
    pub fn healthy(&self) -> bool {
        self.db.get(b"\0health").is_ok()
    }

    /// Makes every write so far durable. Called after each commit, before the client sees its
    /// last byte: what was served must survive a `kill -9`, and a fill costs a network fetch
    /// anyway, so one fsync more is noise (hits never flush).
    pub async fn flush_async(&self) -> Result<(), IndexError> {
        // sled's own `flush_async` hung under a few hundred concurrent commits (its flush runs
        // on sled's small internal pool); a blocking flush on tokio's blocking pool does not.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .expect("index flush does not panic")?;
        Ok(())
    }

    /// Flushes pending writes (on shutdown).
    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Whether no tree of `db` holds anything.
fn is_empty(db: &sled::Db) -> Result<bool, IndexError> {
    for name in db.tree_names() {
        if !db.open_tree(name)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Keys are NUL-separated: NUL appears in no repository name, tag or digest.
/// An index error inside a transaction: aborts it.
fn abort(err: IndexError) -> ConflictableTransactionError<IndexError> {
    ConflictableTransactionError::Abort(err)
}

/// A transaction's failure as an index error (sled retries conflicts itself).
fn committed(result: TransactionError<IndexError>) -> IndexError {
    match result {
        TransactionError::Abort(err) => err,
        TransactionError::Storage(err) => err.into(),
    }
}

fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + b.len() + 2);
    key.extend_from_slice(a.as_bytes());
    key.push(0);
    key.extend_from_slice(b.as_bytes());
    key.push(0);
    key
}

fn key3(a: &str, b: &str, c: &str) -> Vec<u8> {
    let mut key = key2(a, b);
    key.extend_from_slice(c.as_bytes());
    key
}

/// Subject first, so everything cached for a digest goes with one prefix scan when the digest
/// leaves the store; the query (`artifactType=…`, possibly empty) last, after a NUL.
fn referrers_key(upstream: &str, repo: &str, subject: &Digest, query: &str) -> Vec<u8> {
    let mut key = key3(subject.as_str(), upstream, repo);
    key.push(0);
    key.extend_from_slice(query.as_bytes());
    key
}

fn prefix(digest: &Digest) -> Vec<u8> {
    let mut key = digest.as_str().as_bytes().to_vec();
    key.push(0);
    key
}

fn key2d(a: &Digest, b: &str) -> Vec<u8> {
    let mut key = prefix(a);
    key.extend_from_slice(b.as_bytes());
    key
}

fn tag_ref(digest: &Digest, upstream: &str, repo: &str, tag: &str) -> Vec<u8> {
    let mut key = prefix(digest);
    key.extend_from_slice(&key3(upstream, repo, tag));
    key
}

fn age_key(pulled: u64, root: &Digest) -> Vec<u8> {
    let mut key = pulled.to_be_bytes().to_vec();
    key.extend_from_slice(root.as_str().as_bytes());
    key
}

fn parse_digest(bytes: &[u8]) -> Option<Digest> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn count(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map_or(0, u64::from_be_bytes)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("index values always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(
    tree: &'static str,
    value: Option<sled::IVec>,
) -> Result<Option<T>, IndexError> {
    value
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|source| IndexError::Decode { tree, source })
        })
        .transpose()
}

/// A fresh blob entry.
pub fn blob_entry(size: u64, accessed: u64, media_type: Option<String>) -> BlobEntry {
    BlobEntry {
        v: VERSION,
        size,
        accessed,
        media_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    #[test]
    fn bucket_children_survive_a_reopen_and_go_with_their_manifest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = Index::open(dir.path()).unwrap();
            index
                .put_bucket_children(&[
                    (digest(1), vec![digest(2), digest(3)]),
                    (digest(4), vec![]),
                ])
                .unwrap();
            index.flush().unwrap();
        }
        let index = Index::open(dir.path()).unwrap();
        assert_eq!(
            index
                .bucket_children(&[digest(1), digest(4), digest(5)])
                .unwrap(),
            vec![Some(vec![digest(2), digest(3)]), Some(vec![]), None]
        );
        assert_eq!(
            index.retain_bucket_children(|d| *d == digest(4)).unwrap(),
            1
        );
        assert_eq!(
            index.bucket_children(&[digest(1), digest(4)]).unwrap(),
            vec![None, Some(vec![])]
        );
    }

    #[test]
    fn tags_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        index
            .put_tag("docker.io", "library/a", "1", &digest(1), 5)
            .unwrap();
        index
            .put_tag("docker.io", "library/a", "2", &digest(2), 5)
            .unwrap();
        index
            .put_tag("docker.io", "library/ab", "3", &digest(2), 5)
            .unwrap();
        assert_eq!(
            index.tags("docker.io", "library/a").unwrap(),
            vec!["1", "2"]
        );
        assert_eq!(
            index
                .get_tag("docker.io", "library/a", "2")
                .unwrap()
                .unwrap()
                .digest,
            digest(2)
        );
        assert!(index
            .get_tag("ghcr.io", "library/a", "2")
            .unwrap()
            .is_none());

        index
            .put_referrers("docker.io", "library/a", &digest(9), "", "{}".into(), 7)
            .unwrap();
        index
            .put_referrers(
                "docker.io",
                "library/a",
                &digest(9),
                "artifactType=x",
                "{\"x\":1}".into(),
                8,
            )
            .unwrap();
        let got = index
            .get_referrers("docker.io", "library/a", &digest(9), "")
            .unwrap()
            .unwrap();
        assert_eq!((got.body.as_str(), got.confirmed), ("{}", 7));
        assert!(index
            .get_referrers("docker.io", "library/b", &digest(9), "")
            .unwrap()
            .is_none());
        assert_eq!(
            index
                .referrers_queries("docker.io", "library/a", &digest(9))
                .unwrap(),
            2
        );
        index
            .remove_referrers("docker.io", "library/a", &digest(9), "artifactType=x")
            .unwrap();
        assert!(index
            .get_referrers("docker.io", "library/a", &digest(9), "artifactType=x")
            .unwrap()
            .is_none());
        // They go with their subject.
        index.remove_blob(&digest(9)).unwrap();
        assert_eq!(
            index
                .referrers_queries("docker.io", "library/a", &digest(9))
                .unwrap(),
            0
        );

        index.link("docker.io", "library/a", &digest(1)).unwrap();
        index.link("docker.io", "library/a", &digest(1)).unwrap();
        index.link("docker.io", "library/a", &digest(2)).unwrap();
        index.link("ghcr.io", "x/y", &digest(2)).unwrap();
        assert!(index
            .is_linked("docker.io", "library/a", &digest(1))
            .unwrap());
        assert!(!index.is_linked("ghcr.io", "library/a", &digest(1)).unwrap());
        assert_eq!(
            index.repositories().unwrap(),
            vec![
                ("docker.io".into(), "library/a".into()),
                ("ghcr.io".into(), "x/y".into())
            ]
        );
        // Removing content removes its links, the repositories left empty and its tags.
        index.remove_blob(&digest(2)).unwrap();
        assert_eq!(
            index.repositories().unwrap(),
            vec![("docker.io".into(), "library/a".into())]
        );
        assert_eq!(index.tags("docker.io", "library/a").unwrap(), vec!["1"]);
        assert!(index.tags("docker.io", "library/ab").unwrap().is_empty());
        index.remove_blob(&digest(1)).unwrap();
        assert!(index.repositories().unwrap().is_empty());
        assert_eq!(index.footprint().unwrap().0, 0, "nothing left behind");
    }

    #[test]
    fn images_hold_what_their_manifests_name_and_age_by_pull() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        // Index 10 names manifest 11 which names layers 1 and 2; image 20 shares layer 2.
        index.set_children(&digest(10), &[digest(11)]).unwrap();
        index.add_member(&digest(10), &digest(10), 100).unwrap();
        index
            .set_children(&digest(11), &[digest(1), digest(2)])
            .unwrap();
        for root in index.owners(&digest(11)).unwrap() {
            index.add_member(&root, &digest(11), 100).unwrap();
        }
        index.set_children(&digest(20), &[digest(2)]).unwrap();
        index.add_member(&digest(20), &digest(20), 200).unwrap();
        index.own(&digest(30), 300).unwrap();
        index.own(&digest(2), 300).unwrap();
        assert_eq!(
            index.owners(&digest(2)).unwrap().len(),
            2,
            "not its own unit"
        );
        assert_eq!(index.owners(&digest(1)).unwrap(), vec![digest(10)]);
        let order = |index: &Index| -> Vec<Digest> {
            index
                .images_by_age()
                .unwrap()
                .into_iter()
                .map(|(_, d)| d)
                .collect()
        };
        assert_eq!(order(&index), vec![digest(10), digest(20), digest(30)]);
        index.touch_owners(&digest(11), 400, 1000).unwrap();
        assert_eq!(
            order(&index),
            vec![digest(10), digest(20), digest(30)],
            "within granularity"
        );
        index.touch_owners(&digest(11), 1500, 1000).unwrap();
        assert_eq!(order(&index), vec![digest(20), digest(30), digest(10)]);
        let mut sole = index.sole_members(&digest(10)).unwrap();
        sole.sort();
        let mut expected = vec![digest(10), digest(11), digest(1)];
        expected.sort();
        assert_eq!(sole, expected);
        index.put_tag("u", "r", "t", &digest(10), 1).unwrap();
        let mut orphans = index.remove_image(&digest(10)).unwrap();
        orphans.sort();
        assert_eq!(orphans, expected, "layer 2 stays with image 20");
        assert!(index.get_tag("u", "r", "t").unwrap().is_none());
        assert_eq!(order(&index), vec![digest(20), digest(30)]);
    }
}
