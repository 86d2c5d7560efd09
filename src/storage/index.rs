//! The index: facts about committed blobs, tags and which repositories hold which blobs, in sled.
//!
//! This is the only module that touches sled, so the engine stays swappable. One named tree per
//! keyspace, values are versioned JSON so a later release can read an older index. The index is
//! a cache of facts about files: [`Store::open`](super::Store::open) reconciles it with `blobs/`.
//!
//! sled reads and writes are memory operations with background flushing, so point lookups run on
//! the calling thread; whole-tree scans are left to callers to run with `spawn_blocking`.

use serde::{Deserialize, Serialize};
use std::path::Path;

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
    Engine(#[from] sled::Error),
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

/// The sled database and its trees.
#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    blobs: sled::Tree,
    tags: sled::Tree,
    links: sled::Tree,
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
            db,
        })
    }

    pub fn get_blob(&self, digest: &Digest) -> Result<Option<BlobEntry>, IndexError> {
        decode("blobs", self.blobs.get(digest.as_str())?)
    }

    pub fn put_blob(&self, digest: &Digest, entry: &BlobEntry) -> Result<(), IndexError> {
        self.blobs.insert(digest.as_str(), encode(entry))?;
        Ok(())
    }

    /// Records an access; writes only when the stored time is older than `granularity`, so a
    /// hot blob costs one index write a second, not one per request.
    pub fn touch(&self, digest: &Digest, now: u64, granularity: u64) -> Result<(), IndexError> {
        if let Some(mut entry) = self.get_blob(digest)? {
            if entry.accessed + granularity <= now {
                entry.accessed = now;
                self.put_blob(digest, &entry)?;
            }
        }
        Ok(())
    }

    pub fn remove_blob(&self, digest: &Digest) -> Result<(), IndexError> {
        self.blobs.remove(digest.as_str())?;
        Ok(())
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

    /// Blobs ordered from least to most recently used (a full scan: call off the async threads).
    pub fn lru_candidates(&self) -> Result<Vec<(Digest, BlobEntry)>, IndexError> {
        let mut all = self.all_blobs()?;
        all.sort_by_key(|(_, entry)| entry.accessed);
        Ok(all)
    }

    pub fn get_tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagEntry>, IndexError> {
        decode("tags", self.tags.get(key3(upstream, repo, tag))?)
    }

    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
        digest: &Digest,
        confirmed: u64,
    ) -> Result<(), IndexError> {
        let entry = TagEntry {
            v: VERSION,
            digest: digest.clone(),
            confirmed,
        };
        self.tags
            .insert(key3(upstream, repo, tag), encode(&entry))?;
        Ok(())
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

    /// Digests every cached tag points to (they are kept in preference to orphans on eviction).
    pub fn tagged_digests(&self) -> Result<std::collections::HashSet<Digest>, IndexError> {
        let mut out = std::collections::HashSet::new();
        for item in self.tags.iter() {
            let (_, value) = item?;
            if let Some(entry) = decode::<TagEntry>("tags", Some(value))? {
                out.insert(entry.digest);
            }
        }
        Ok(out)
    }

    /// Records that `repo` on `upstream` holds `digest`: a cached blob is served under a
    /// repository only if that repository's upstream has shown it to us.
    pub fn link(&self, upstream: &str, repo: &str, digest: &Digest) -> Result<(), IndexError> {
        self.links
            .insert(key3(upstream, repo, digest.as_str()), &[])?;
        Ok(())
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

    /// Distinct `(upstream, repository)` pairs holding at least one blob, sorted.
    pub fn repositories(&self) -> Result<Vec<(String, String)>, IndexError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for item in self.links.iter() {
            let (key, _) = item?;
            let mut parts = key.split(|b| *b == 0);
            let (Some(upstream), Some(repo)) = (parts.next(), parts.next()) else {
                continue;
            };
            let pair = (
                String::from_utf8_lossy(upstream).into_owned(),
                String::from_utf8_lossy(repo).into_owned(),
            );
            if out.last() != Some(&pair) {
                out.push(pair);
            }
        }
        Ok(out)
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
    fn tags_links_and_lru() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        index
            .put_blob(&digest(1), &blob_entry(10, 300, None))
            .unwrap();
        index
            .put_blob(&digest(2), &blob_entry(20, 100, Some("x".into())))
            .unwrap();
        index.touch(&digest(1), 330, 60).unwrap();
        assert_eq!(
            index.get_blob(&digest(1)).unwrap().unwrap().accessed,
            300,
            "within granularity"
        );
        index.touch(&digest(1), 400, 60).unwrap();
        assert_eq!(index.get_blob(&digest(1)).unwrap().unwrap().accessed, 400);
        let order: Vec<_> = index
            .lru_candidates()
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(order, vec![digest(2), digest(1)]);

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
    }
}
