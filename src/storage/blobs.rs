//! Content-addressed files: `blobs/sha256/<2 hex>/<64 hex>` for verified content and `tmp/` for
//! downloads in progress.
//!
//! A file reaches `blobs/` only by [`Blobs::commit`], which the caller invokes after checking the
//! bytes against their digest; nothing here trusts or hashes content. Everything is blocking
//! std I/O: callers run it off the async threads.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::oci::Digest;

/// Where verified content lives: the narrow interface the cache sees, so a second backend (an
/// object store) can take the filesystem's place.
///
/// A write is a pending file (readable while it grows, so clients stream a download as it
/// arrives) that the caller hashes as it writes and then either commits under its digest,
/// atomically, or aborts. Reads are whole (`read`), by range (`read_range`), or, where the
/// backend has them, through a file handle (`file`), which the sendfile fast path needs.
/// Everything is blocking: callers run it off the async threads.
pub trait BlobStore: Send + Sync {
    /// A fresh pending write: its location and a readable, writable handle.
    fn begin(&self) -> io::Result<(PathBuf, File)>;
    /// Makes verified pending content durable and visible under `digest`, atomically.
    fn commit(&self, pending: &Path, file: &File, digest: &Digest) -> io::Result<()>;
    /// Drops a pending write.
    fn abort(&self, pending: &Path);
    /// Writes and commits small verified content (a manifest) in one go.
    fn write_verified(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()>;
    /// A whole committed blob (manifests are small; callers enforce the cap).
    fn read(&self, digest: &Digest) -> io::Result<Vec<u8>>;
    /// Up to `len` bytes of a committed blob from `offset`.
    fn read_range(&self, digest: &Digest, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// A file handle on a committed blob, for backends that have one (`None` otherwise).
    fn file(&self, digest: &Digest) -> Option<io::Result<File>>;
    /// The size of a committed blob.
    fn stat(&self, digest: &Digest) -> io::Result<u64>;
    /// Removes a committed blob; removing one that is not there succeeds.
    fn delete(&self, digest: &Digest) -> io::Result<()>;
    /// Every committed blob with its size.
    fn list(&self) -> io::Result<Vec<(Digest, u64)>>;
    /// Bytes the backend can still take, if it says.
    fn available_bytes(&self) -> Option<u64>;
    /// Whether the backend takes writes (for `/readyz`).
    fn writable(&self) -> bool;
}

impl BlobStore for Blobs {
    fn begin(&self) -> io::Result<(PathBuf, File)> {
        self.create_tmp()
    }
    fn commit(&self, pending: &Path, file: &File, digest: &Digest) -> io::Result<()> {
        Blobs::commit(self, pending, file, digest)
    }
    fn abort(&self, pending: &Path) {
        let _ = fs::remove_file(pending);
    }
    fn write_verified(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        Blobs::write_verified(self, digest, bytes)
    }
    fn read(&self, digest: &Digest) -> io::Result<Vec<u8>> {
        Blobs::read(self, digest)
    }
    fn read_range(&self, digest: &Digest, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let file = self.open_blob(digest)?;
        let mut buf = vec![0; len];
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], offset.saturating_add(filled as u64))? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }
    fn file(&self, digest: &Digest) -> Option<io::Result<File>> {
        Some(self.open_blob(digest))
    }
    fn stat(&self, digest: &Digest) -> io::Result<u64> {
        Ok(fs::metadata(self.path(digest))?.len())
    }
    fn delete(&self, digest: &Digest) -> io::Result<()> {
        self.remove(digest)
    }
    fn list(&self) -> io::Result<Vec<(Digest, u64)>> {
        self.scan()
    }
    fn available_bytes(&self) -> Option<u64> {
        Blobs::available_bytes(self)
    }
    fn writable(&self) -> bool {
        Blobs::writable(self)
    }
}

/// The blob directories under the storage root: the filesystem [`BlobStore`].
#[derive(Debug)]
pub struct Blobs {
    blobs: PathBuf,
    tmp: PathBuf,
    next_tmp: AtomicU64,
}

impl Blobs {
    /// Creates the directories if needed and empties `tmp/`: whatever is there is a download a
    /// previous process did not finish, and can never be trusted.
    pub fn open(root: &Path) -> io::Result<Blobs> {
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
        fs::create_dir_all(&blobs)?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(Blobs {
            blobs,
            tmp,
            next_tmp: AtomicU64::new(0),
        })
    }

    /// Where the verified content of `digest` lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs.join(&hex[..2]).join(hex)
    }

    /// Opens committed content for reading.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<File> {
        File::open(self.path(digest))
    }

    /// Reads a whole committed blob (manifests are small; callers enforce the cap).
    pub fn read(&self, digest: &Digest) -> io::Result<Vec<u8>> {
        fs::read(self.path(digest))
    }

    /// Creates a fresh file in `tmp/` for a download; the handle is readable so that clients
    /// can stream a download while it is being written.
    pub fn create_tmp(&self) -> io::Result<(PathBuf, File)> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// Makes verified content durable and visible under its digest: fsync the data, rename into
    /// place, fsync the directory so the rename itself survives a power cut.
    pub fn commit(&self, tmp_path: &Path, file: &File, digest: &Digest) -> io::Result<()> {
        file.sync_all()?;
        let dest = self.path(digest);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        fs::rename(tmp_path, &dest)?;
        File::open(dir)?.sync_all()
    }

    /// Writes small verified content (a manifest) in one go.
    pub fn write_verified(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let (tmp_path, mut file) = self.create_tmp()?;
        let result = file
            .write_all(bytes)
            .and_then(|()| self.commit(&tmp_path, &file, digest));
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result
    }

    /// Removes a committed blob. A reader that has it open keeps reading the old inode.
    pub fn remove(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.path(digest)) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Every committed blob with its size, for reconciling the index at start-up. Names that
    /// are not digests (editor droppings, half-renamed files) are ignored.
    pub fn scan(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut found = Vec::new();
        for shard in fs::read_dir(&self.blobs)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
                else {
                    continue;
                };
                found.push((digest, entry.metadata()?.len()));
            }
        }
        Ok(found)
    }

    /// Bytes the filesystem holding the store can still give us, if it says.
    pub fn available_bytes(&self) -> Option<u64> {
        let stat = rustix::fs::statvfs(&self.tmp).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Whether the filesystem holding the store accepts writes (for `/readyz`).
    pub fn writable(&self) -> bool {
        match self.create_tmp() {
            Ok((path, _file)) => fs::remove_file(path).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filesystem_store_commits_reads_ranges_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Box<dyn BlobStore> = Box::new(Blobs::open(dir.path()).unwrap());
        let digest = Digest::sha256_of(b"hello world");
        blobs.write_verified(&digest, b"hello world").unwrap();
        assert_eq!(blobs.stat(&digest).unwrap(), 11);
        assert_eq!(blobs.read_range(&digest, 6, 100).unwrap(), b"world");
        assert_eq!(blobs.read(&digest).unwrap(), b"hello world");
        assert!(blobs.file(&digest).unwrap().is_ok());
        assert_eq!(blobs.list().unwrap(), vec![(digest.clone(), 11)]);
        let (pending, file) = blobs.begin().unwrap();
        blobs.abort(&pending);
        drop(file);
        blobs.delete(&digest).unwrap();
        blobs.delete(&digest).unwrap();
        assert!(blobs.list().unwrap().is_empty());
        assert!(blobs.stat(&digest).is_err());
    }
}
