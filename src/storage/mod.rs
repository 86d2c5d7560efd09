//! Local storage: verified blobs on disk and the index that describes them.
//!
//! Storage knows nothing of HTTP or upstreams. It offers two narrow interfaces: a
//! [`BlobStore`] (the filesystem is its implementation) and the [`Index`]'s named operations;
//! sled never shows outside `index.rs`. It keeps the index consistent with the files
//! (reconciled at start-up). Hashing and the decision to commit belong to the cache, which is
//! the only caller.

mod blobs;
mod index;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use blobs::{BlobStore, Blobs};
pub use index::{blob_entry, BlobEntry, ImageEntry, Index, IndexError, TagEntry};

use crate::oci::Digest;

/// A storage failure, classified where it is known.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The content is not stored.
    #[error("not stored")]
    NotFound,
    /// The disk is full (ENOSPC or EDQUOT): callers switch to pass-through.
    #[error("no space left on the store")]
    NoSpace,
    /// The filesystem is read-only (EROFS): callers switch to pass-through.
    #[error("the store is read-only")]
    ReadOnly,
    /// Any other I/O failure.
    #[error("storage I/O: {0}")]
    Io(io::Error),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::NotFound => Error::NotFound,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Error::NoSpace,
            io::ErrorKind::ReadOnlyFilesystem => Error::ReadOnly,
            _ => Error::Io(err),
        }
    }
}

impl Error {
    /// Whether the store cannot take writes (full, over quota, read-only): content is then
    /// served from the upstream uncached rather than failed.
    pub fn is_unwritable(&self) -> bool {
        matches!(self, Error::NoSpace | Error::ReadOnly)
    }
}

/// Blobs plus index, with the running total of stored bytes.
pub struct Store {
    blobs: Blobs,
    index: Index,
    used: AtomicU64,
    count: AtomicU64,
}

/// What start-up reconciliation found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Index entries whose file was gone.
    pub dropped: usize,
    /// Files the index did not know (committed just before a crash), now indexed.
    pub adopted: usize,
}

impl Store {
    /// Opens the store under `root`: empties `tmp/`, opens the index and reconciles it with the
    /// files. Blocking: call before serving or from `spawn_blocking`.
    pub fn open(root: &Path) -> Result<(Arc<Store>, Reconciled), Error> {
        let blobs = Blobs::open(root)?;
        let index = Index::open(&root.join("index"))?;
        let store = Store {
            blobs,
            index,
            used: AtomicU64::new(0),
            count: AtomicU64::new(0),
        };
        let reconciled = store.reconcile()?;
        Ok((Arc::new(store), reconciled))
    }

    fn reconcile(&self) -> Result<Reconciled, Error> {
        let files: std::collections::HashMap<Digest, u64> =
            self.blobs.scan()?.into_iter().collect();
        let mut report = Reconciled::default();
        let mut known = std::collections::HashSet::new();
        for (digest, entry) in self.index.all_blobs()? {
            match files.get(&digest) {
                Some(&size) if size == entry.size => {
                    known.insert(digest);
                }
                Some(&size) => {
                    // The file is authoritative: it was verified before its rename.
                    self.index
                        .put_blob(&digest, &blob_entry(size, entry.accessed, entry.media_type))?;
                    known.insert(digest);
                }
                None => {
                    self.index.remove_blob(&digest)?;
                    report.dropped += 1;
                }
            }
        }
        let now = now_millis();
        for (digest, size) in &files {
            if !known.contains(digest) {
                // Committed files were verified before their rename; a crash between rename and
                // index write leaves one without an entry. Media types are re-learnt on demand.
                self.index.put_blob(digest, &blob_entry(*size, now, None))?;
                report.adopted += 1;
            }
        }
        self.used.store(files.values().sum(), Ordering::Relaxed);
        self.count.store(files.len() as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// Where the content is.
    pub fn blobs(&self) -> &dyn BlobStore {
        &self.blobs
    }

    /// The facts about it.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Bytes of committed blobs.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Number of committed blobs.
    pub fn blob_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The index entry of a committed blob, if its file is there.
    pub fn stat(&self, digest: &Digest) -> Result<Option<BlobEntry>, Error> {
        Ok(self.index.get_blob(digest)?)
    }

    /// Records a blob just committed to `blobs/` by [`Blobs::commit`].
    pub fn record(
        &self,
        digest: &Digest,
        size: u64,
        media_type: Option<String>,
    ) -> Result<(), Error> {
        let previous = self.index.get_blob(digest)?;
        let media_type =
            media_type.or_else(|| previous.as_ref().and_then(|e| e.media_type.clone()));
        self.index
            .put_blob(digest, &blob_entry(size, now_millis(), media_type))?;
        if previous.is_none() {
            self.used.fetch_add(size, Ordering::Relaxed);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes, commits and records small verified content (a manifest).
    pub fn put_verified(
        &self,
        digest: &Digest,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(), Error> {
        self.blobs.write_verified(digest, bytes)?;
        self.record(digest, bytes.len() as u64, Some(media_type.to_owned()))
    }

    /// Removes a blob from the disk and everything the index says about it (links, tags,
    /// image membership), returning its size if it was stored. Also called for content an
    /// evicted image named but never got, to drop its facts.
    pub fn remove(&self, digest: &Digest) -> Result<Option<u64>, Error> {
        // Index first: a crash in between leaves a file the next start-up adopts, never an
        // entry without a file.
        let Some(entry) = self.index.remove_blob(digest)? else {
            return Ok(None);
        };
        self.blobs.remove(digest)?;
        self.used.fetch_sub(entry.size, Ordering::Relaxed);
        self.count.fetch_sub(1, Ordering::Relaxed);
        Ok(Some(entry.size))
    }

    /// `/readyz`: the disk takes writes and the index answers.
    pub fn ready(&self) -> bool {
        self.index.healthy() && self.blobs.writable()
    }
}

/// Milliseconds since the Unix epoch: access times (LRU order must tell apart blobs used in the
/// same second) and tag confirmations.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_read_only_disks_are_told_apart_from_other_failures() {
        let kinds = [
            (io::ErrorKind::StorageFull, true),
            (io::ErrorKind::QuotaExceeded, true),
            (io::ErrorKind::ReadOnlyFilesystem, true),
            (io::ErrorKind::PermissionDenied, false),
            (io::ErrorKind::NotFound, false),
        ];
        for (kind, unwritable) in kinds {
            let err = Error::from(io::Error::from(kind));
            assert_eq!(err.is_unwritable(), unwritable, "{kind:?}");
        }
        let erofs = Error::from(io::Error::from_raw_os_error(libc::EROFS));
        assert!(erofs.is_unwritable());
        let edquot = Error::from(io::Error::from_raw_os_error(libc::EDQUOT));
        assert!(edquot.is_unwritable());
    }

    #[test]
    fn reconcile_drops_missing_adopts_orphans_and_clears_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"bb");
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.put_verified(&a, b"a", "m").unwrap();
            store.put_verified(&b, b"bb", "m").unwrap();
            assert_eq!(store.used_bytes(), 3);
            // A partial download and a blob whose index entry was lost.
            std::fs::write(dir.path().join("tmp").join("partial"), b"xx").unwrap();
            store.index.remove_blob(&b).unwrap();
            std::fs::remove_file(store.blobs.path(&a)).unwrap();
            store.index.flush().unwrap();
        }
        let (store, report) = Store::open(dir.path()).unwrap();
        assert_eq!(
            report,
            Reconciled {
                dropped: 1,
                adopted: 1
            }
        );
        assert!(store.stat(&a).unwrap().is_none());
        assert_eq!(store.stat(&b).unwrap().unwrap().size, 2);
        assert_eq!(store.used_bytes(), 2);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
