//! Local storage: verified blobs on disk and the index that describes them.
//!
//! Storage knows nothing of HTTP or upstreams. It offers two narrow interfaces: a
//! [`BlobStore`] (the filesystem is its implementation) and the [`Index`]'s named operations;
//! sled never shows outside `index.rs`. It keeps the index consistent with the files
//! (reconciled at start-up). Hashing and the decision to commit belong to the cache, which is
//! the only caller.
//!
//! The index is a cache of facts about the files. If sled cannot open it or it has an unknown
//! format, it is moved aside to `index.broken-<unix seconds>` and rebuilt empty; every file is
//! then unverified. Unverified files (all of them after a rebuild, and files found without an
//! index entry after a crash) are not in the index, so they are not served: a request for one
//! goes to the upstream as a miss. [`scrub::verify_unverified`] hashes them in the background
//! at a bounded rate and adopts those that hash to their name (deleting the others), so start-up
//! never waits for hashing a large store.

mod blobs;
mod facts;
mod index;
mod journal;
pub mod s3;
pub mod scrub;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

pub use blobs::{BlobStore, Blobs};
pub use facts::{Facts, Scope};
pub use index::{
    blob_entry, BlobEntry, ImageEntry, Index, IndexError, TagEntry, DEFAULT_CACHE_BYTES, FORMAT,
};

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
    /// Another process (a running server, a `verify --repair`) has the store open.
    #[error("the store is in use by another regmirror process (lock on {0})")]
    Locked(PathBuf),
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
    /// Files on disk without an index entry, waiting for [`scrub::verify_unverified`].
    unverified: Mutex<Vec<Digest>>,
    /// Which repository each manifest was committed to: what a rebuilt index cannot learn
    /// from the files.
    journal: journal::Journal,
    /// Held (with an exclusive `flock`) for as long as the store is open: one process per
    /// store. It is what tells "sled cannot open its files" (rebuild) from "another process
    /// has them open" (refuse), which sled reports alike.
    _lock: File,
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct Options {
    /// sled's page cache (`storage.index_cache`).
    pub index_cache: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            index_cache: DEFAULT_CACHE_BYTES,
        }
    }
}

/// What start-up reconciliation found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Index entries whose file was gone.
    pub dropped: usize,
    /// Index entries whose file had another size than the entry: removed with their file as
    /// corrupt (a committed blob never changes size).
    pub corrupt: usize,
    /// Files the index did not know (committed just before a crash, or all of them after a
    /// rebuild): not served until [`scrub::verify_unverified`] has hashed them.
    pub unverified: usize,
    /// Where an unreadable index was moved before being rebuilt.
    pub broken_index: Option<PathBuf>,
}

impl Store {
    /// Opens the store under `root` with default options.
    pub fn open(root: &Path) -> Result<(Arc<Store>, Reconciled), Error> {
        Store::open_with(root, &Options::default())
    }

    /// Opens the store under `root`: takes the store's lock, empties `tmp/`, opens the index
    /// (setting a broken one aside and starting afresh) and reconciles it with the files.
    /// Files without an entry are left for [`scrub::verify_unverified`]. Blocking (a directory
    /// scan, no hashing): call before serving or from `spawn_blocking`.
    pub fn open_with(root: &Path, options: &Options) -> Result<(Arc<Store>, Reconciled), Error> {
        std::fs::create_dir_all(root)?;
        let lock = lock(root)?;
        let blobs = Blobs::open(root)?;
        let dir = root.join("index");
        let (index, broken_index) = match Index::open_with_cache(&dir, options.index_cache) {
            Ok(index) => (index, None),
            Err(err) => {
                let aside = root.join(format!("index.broken-{}", now_millis() / 1000));
                tracing::warn!(error = %err, index = %dir.display(), moved_to = %aside.display(), "the index cannot be used: moving it aside and rebuilding it from the blobs (they are verified in the background before being served)");
                std::fs::rename(&dir, &aside)?;
                (
                    Index::open_with_cache(&dir, options.index_cache)?,
                    Some(aside),
                )
            }
        };
        let store = Store {
            blobs,
            index,
            used: AtomicU64::new(0),
            count: AtomicU64::new(0),
            unverified: Mutex::new(Vec::new()),
            journal: journal::Journal::open(root)?,
            _lock: lock,
        };
        let mut reconciled = store.reconcile()?;
        if reconciled.unverified > 0 {
            tracing::warn!(files = reconciled.unverified, "files without an index entry: they are hashed in the background and served once verified");
        }
        reconciled.broken_index = broken_index;
        Ok((Arc::new(store), reconciled))
    }

    fn reconcile(&self) -> Result<Reconciled, Error> {
        let mut files: std::collections::HashMap<Digest, u64> =
            self.blobs.scan()?.into_iter().collect();
        let mut report = Reconciled::default();
        let (mut used, mut count) = (0u64, 0u64);
        for (digest, entry) in self.index.all_blobs()? {
            match files.remove(&digest) {
                Some(size) if size == entry.size => {
                    used = used.saturating_add(size);
                    count += 1;
                }
                Some(size) => {
                    // A committed blob never changes size: the file was truncated or
                    // overwritten after it was verified. Fetched again on its next pull.
                    tracing::warn!(%digest, indexed = entry.size, found = size, "stored blob has changed size, removing it as corrupt");
                    self.index.remove_blob(&digest)?;
                    self.blobs.remove(&digest)?;
                    report.corrupt += 1;
                }
                None => {
                    self.index.remove_blob(&digest)?;
                    report.dropped += 1;
                }
            }
        }
        // What is left has no entry: a crash between rename and index write, an operator's
        // copy, or a rebuilt index. Nothing vouches for those bytes until they are hashed.
        report.unverified = files.len();
        *self.unverified.lock().unwrap_or_else(|e| e.into_inner()) = files.into_keys().collect();
        self.used.store(used, Ordering::Relaxed);
        self.count.store(count, Ordering::Relaxed);
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

    /// Where the file of `digest` lives (for hashing it in place). The scrub reaches the
    /// store only through this and the methods below.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.path(digest)
    }

    /// Every indexed blob with its entry (a full scan: call off the async threads).
    pub fn indexed_blobs(&self) -> Result<Vec<(Digest, BlobEntry)>, Error> {
        Ok(self.index.all_blobs()?)
    }

    /// Deletes the file of `digest` whatever the index says (a file that failed verification).
    pub fn discard_file(&self, digest: &Digest) -> Result<(), Error> {
        Ok(self.blobs.remove(digest)?)
    }

    /// Makes index writes so far durable (`verify --repair` before it exits).
    pub fn flush(&self) -> Result<(), Error> {
        Ok(self.index.flush()?)
    }

    /// Records what a manifest committed to `repository` implies beyond its links: the
    /// children it references, its image membership (its own image when nothing holds it yet
    /// or a tag named it), and the journal line that lets an index rebuild link it again.
    pub fn manifest_committed(
        &self,
        upstream: &str,
        repository: &str,
        manifest: &Digest,
        children: &[Digest],
        tagged: bool,
        now: u64,
    ) -> Result<(), Error> {
        self.record_implied(manifest, children, tagged, now)?;
        if let Err(error) = self.journal.append(upstream, repository, manifest, tagged) {
            // The journal only matters to a rebuild; the commit stands.
            tracing::warn!(%error, digest = %manifest, "cannot append to the link journal");
        }
        Ok(())
    }

    /// The journalled commits of the manifests among `digests` (for a rebuild).
    pub fn journalled(
        &self,
        digests: &[Digest],
    ) -> Result<std::collections::HashMap<Digest, Vec<journal::Entry>>, Error> {
        let wanted = digests.iter().cloned().collect();
        Ok(self.journal.read(&wanted)?)
    }

    /// After an index rebuild adopted `manifest` (verified, with `children` read from its
    /// body): links it and its children to each repository the journal says it was committed
    /// to, and records what that commit implied, as the original commit did.
    pub fn restore_manifest(
        &self,
        manifest: &Digest,
        children: &[Digest],
        commits: &[journal::Entry],
    ) -> Result<(), Error> {
        for commit in commits {
            for digest in children.iter().chain(std::iter::once(manifest)) {
                self.index
                    .link(&commit.upstream, &commit.repository, digest)?;
            }
        }
        if commits.is_empty() {
            return Ok(());
        }
        let tagged = commits.iter().any(|c| c.tagged);
        self.record_implied(manifest, children, tagged, now_millis())
    }

    /// A manifest's children, and its membership in the images that hold it (its own image
    /// when nothing holds it yet or a tag named it).
    fn record_implied(
        &self,
        manifest: &Digest,
        children: &[Digest],
        tagged: bool,
        now: u64,
    ) -> Result<(), Error> {
        self.index.set_children(manifest, children)?;
        let mut roots = self.index.owners(manifest)?;
        if roots.is_empty() || (tagged && !roots.contains(manifest)) {
            roots.push(manifest.clone());
        }
        for root in &roots {
            self.index.add_member(root, manifest, now)?;
        }
        Ok(())
    }

    /// Takes the files found without an index entry at start-up, to verify them.
    pub fn take_unverified(&self) -> Vec<Digest> {
        std::mem::take(&mut *self.unverified.lock().unwrap_or_else(|e| e.into_inner()))
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
        let new = self
            .index
            .put_blob(digest, &blob_entry(size, now_millis(), media_type))?;
        if new {
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

/// Takes the exclusive lock of the store under `root` (`<root>/lock`), without waiting.
fn lock(root: &Path) -> Result<File, Error> {
    let path = root.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Locked(path)),
        Err(err) => Err(Error::Io(err.into())),
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
    fn reconcile_drops_missing_removes_resized_defers_orphans_and_clears_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"bb");
        let c = Digest::sha256_of(b"ccc");
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.put_verified(&a, b"a", "m").unwrap();
            store.put_verified(&b, b"bb", "m").unwrap();
            store.put_verified(&c, b"ccc", "m").unwrap();
            assert_eq!(store.used_bytes(), 6);
            // A partial download, a blob whose index entry was lost, one whose file is gone
            // and one whose file was truncated.
            std::fs::write(dir.path().join("tmp").join("partial"), b"xx").unwrap();
            store.index.remove_blob(&b).unwrap();
            std::fs::remove_file(store.blobs.path(&a)).unwrap();
            std::fs::write(store.blobs.path(&c), b"cc").unwrap();
            store.index.flush().unwrap();
        }
        let (store, report) = Store::open(dir.path()).unwrap();
        assert_eq!(
            report,
            Reconciled {
                dropped: 1,
                corrupt: 1,
                unverified: 1,
                broken_index: None,
            }
        );
        assert!(store.stat(&a).unwrap().is_none());
        assert!(store.stat(&c).unwrap().is_none());
        assert!(!store.blobs.path(&c).exists(), "a resized file is removed");
        // Not served before it is hashed.
        assert!(store.stat(&b).unwrap().is_none());
        assert_eq!(store.take_unverified(), vec![b.clone()]);
        assert_eq!(store.used_bytes(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn an_unreadable_or_foreign_index_is_moved_aside_and_rebuilt() {
        let a = Digest::sha256_of(b"a");
        type Damage = fn(&Path);
        let damage: [(&str, Damage); 3] = [
            ("garbage", |index| {
                for entry in std::fs::read_dir(index).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_file() {
                        std::fs::write(&path, vec![0xA5u8; 4096]).unwrap();
                    }
                }
            }),
            ("truncated", |index| {
                for entry in std::fs::read_dir(index).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_file() {
                        std::fs::File::create(&path).unwrap();
                    }
                }
            }),
            ("format", |index| {
                let db = sled::open(index).unwrap();
                db.insert(b"regmirror.format", b"99".as_slice()).unwrap();
                db.flush().unwrap();
            }),
        ];
        for (name, damage) in damage {
            let dir = tempfile::tempdir().unwrap();
            {
                let (store, _) = Store::open(dir.path()).unwrap();
                store.put_verified(&a, b"a", "m").unwrap();
                store.index.flush().unwrap();
            }
            damage(&dir.path().join("index"));
            let (store, report) = Store::open(dir.path())
                .unwrap_or_else(|err| panic!("{name}: the store does not open: {err}"));
            let aside = report
                .broken_index
                .unwrap_or_else(|| panic!("{name}: not set aside"));
            assert!(aside.exists(), "{name}");
            assert_eq!(report.unverified, 1, "{name}");
            assert_eq!(store.take_unverified(), vec![a.clone()], "{name}");
        }
    }

    #[test]
    fn a_second_process_is_refused_and_the_index_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, _) = Store::open(dir.path()).unwrap();
        match Store::open(dir.path()) {
            Err(Error::Locked(_)) => {}
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("opened twice"),
        }
        let moved = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("index.broken")
            })
            .count();
        assert_eq!(moved, 0);
    }
}
