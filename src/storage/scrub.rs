//! Re-hashing stored bytes: the start-up verification of files without an index entry, the
//! periodic scrub of indexed blobs, and `regmirror verify`.
//!
//! A committed blob was verified before its rename, but disks rot, hosts crash mid-write and
//! operators copy files around; only hashing again tells. Everything here is blocking std I/O
//! paced by a [`Limiter`] (so a scrub never starves clients of disk bandwidth) and run off the
//! async threads.
//!
//! A blob found corrupt is removed from the index first, then unlinked. A client streaming it
//! at that moment keeps reading the unlinked inode (Linux frees it at the last close), so it
//! gets the bytes it was already getting; nobody is served the blob afterwards, and the next
//! pull fetches it again. A fill that commits the same digest between the hash and the removal
//! would be removed too: that costs one more download, never a wrong byte.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Error, Store};
use crate::oci::{media_type, Digest, DigestHasher};

/// Files up to this size are also parsed as JSON to recognise manifests (their media type is
/// what they are served with); it is the upstream client's manifest cap.
const MAX_MANIFEST: u64 = 4 << 20;
const CHUNK: usize = 256 * 1024;

/// Paces reads to `max_rate` bytes per second (`0`: unbounded).
pub struct Limiter {
    max_rate: u64,
    start: Instant,
    bytes: u64,
}

impl Limiter {
    pub fn new(max_rate: u64) -> Limiter {
        Limiter {
            max_rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts for `n` bytes read, sleeping while ahead of the rate; `false` when `stop`
    /// said to give up while waiting.
    fn consumed(&mut self, n: usize, stop: &dyn Fn() -> bool) -> bool {
        if self.max_rate == 0 {
            return true;
        }
        self.bytes = self.bytes.saturating_add(n as u64);
        let due = Duration::from_secs_f64(self.bytes as f64 / self.max_rate as f64);
        loop {
            let elapsed = self.start.elapsed();
            if elapsed >= due {
                return true;
            }
            if stop() {
                return false;
            }
            // Short naps, so a stopping server is not held by a slow rate.
            std::thread::sleep((due - elapsed).min(Duration::from_millis(100)));
        }
    }
}

/// What hashing a file found.
#[derive(Debug)]
pub struct Hashed {
    pub digest: Digest,
    pub size: u64,
    /// For a small JSON file declaring (or shaped like) a manifest type: that type.
    pub manifest_type: Option<String>,
    /// For a manifest: the digests its body names as content (config, layers, manifests).
    pub children: Vec<Digest>,
}

/// Hashes the file at `path`; `None` if `stop` said to give up.
pub fn hash_file(
    path: &Path,
    limiter: &mut Limiter,
    stop: &dyn Fn() -> bool,
) -> io::Result<Option<Hashed>> {
    let mut file = File::open(path)?;
    let small = file.metadata()?.len() <= MAX_MANIFEST;
    let mut hasher = DigestHasher::new();
    let mut kept = Vec::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        hasher.update(&buf[..n]);
        size = size.saturating_add(n as u64);
        // A file that grew past the cap since its stat is no manifest.
        if small && size <= MAX_MANIFEST {
            kept.extend_from_slice(&buf[..n]);
        }
        if stop() || !limiter.consumed(n, stop) {
            return Ok(None);
        }
    }
    let manifest_type = if small && size <= MAX_MANIFEST {
        media_type::sniff(&kept).filter(|mt| media_type::is_manifest_type(mt))
    } else {
        None
    };
    let children = match manifest_type {
        Some(_) => media_type::referenced_digests(&kept)
            .into_iter()
            .map(|(digest, _)| digest)
            .collect(),
        None => Vec::new(),
    };
    Ok(Some(Hashed {
        digest: hasher.finish(),
        size,
        manifest_type,
        children,
    }))
}

/// What a pass found, for logs, metrics and `regmirror verify`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Blobs hashed.
    pub blobs: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// Files that did not hash to their name (or had another size than their entry).
    pub corrupt: Vec<Digest>,
    /// Unindexed files that hashed to their name and were adopted into the index.
    pub adopted: u64,
    /// Adopted manifests linked again to the repositories the link journal names.
    pub relinked: u64,
    /// Whether the pass was cut short by `stop`.
    pub stopped: bool,
}

/// Progress events, so callers can keep metrics live during a long pass.
#[derive(Debug)]
pub enum Event<'a> {
    /// A file was hashed.
    Hashed { bytes: u64 },
    /// A file was found corrupt (and removed if the pass repairs).
    Corrupt { digest: &'a Digest },
    /// An unindexed file was settled (adopted or deleted).
    Settled,
}

/// Hashes the files [`Store::open_with`] found without an index entry: those that hash to
/// their name are adopted (with their media type when they parse as a manifest, so they can
/// be served as one), the others are deleted. Until then they are not in the index, so they
/// are not served. `store` gives the store while it is still open (`None`: the server is
/// gone, stop); it is held only between files, never while hashing.
pub fn verify_unverified(
    store: &dyn Fn() -> Option<std::sync::Arc<Store>>,
    limiter: &mut Limiter,
    on: &mut dyn FnMut(Event),
) -> Result<Report, Error> {
    let mut report = Report::default();
    let Some(opened) = store() else {
        report.stopped = true;
        return Ok(report);
    };
    let pending = opened.take_unverified();
    // The repositories the journal says the manifests among them were committed to: read
    // once, only for these files.
    let mut journalled = if pending.is_empty() {
        Default::default()
    } else {
        opened.journalled(&pending).unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the link journal: adopted manifests stay unlinked until pulled again");
            Default::default()
        })
    };
    drop(opened);
    for digest in pending {
        let Some(opened) = store() else {
            report.stopped = true;
            return Ok(report);
        };
        let path = opened.blob_path(&digest);
        drop(opened);
        let hashed = hash_file(&path, limiter, &|| store().is_none());
        let Some(opened) = store() else {
            report.stopped = true;
            return Ok(report);
        };
        match hashed {
            Ok(None) => {
                report.stopped = true;
                return Ok(report);
            }
            Ok(Some(hashed)) => {
                report.blobs += 1;
                report.bytes = report.bytes.saturating_add(hashed.size);
                on(Event::Hashed { bytes: hashed.size });
                if hashed.digest == digest {
                    // A fill may have committed and recorded it meanwhile: `record` keeps
                    // the count right and the media type it learnt.
                    let manifest = hashed.manifest_type.is_some();
                    opened.record(&digest, hashed.size, hashed.manifest_type)?;
                    if let (true, Some(commits)) = (manifest, journalled.remove(&digest)) {
                        opened.restore_manifest(&digest, &hashed.children, &commits)?;
                        report.relinked += 1;
                    }
                    report.adopted += 1;
                } else if opened.stat(&digest)?.is_none() {
                    // Not the bytes its name promises: never served, deleted. (If a fill
                    // recorded it meanwhile, the file is that fill's verified one.)
                    tracing::warn!(%digest, actual = %hashed.digest, "unindexed file does not hash to its name, deleting it");
                    opened.discard_file(&digest)?;
                    report.corrupt.push(digest.clone());
                    on(Event::Corrupt { digest: &digest });
                }
            }
            // Gone meanwhile (a fill's rename is atomic, so this is an operator): nothing to do.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(%digest, error = %err, "cannot read an unindexed file, leaving it unserved");
            }
        }
        on(Event::Settled);
    }
    Ok(report)
}

/// Hashes every indexed blob; one that does not hash to its digest or has another size than
/// its entry is removed from the index and the disk when `repair`, and reported either way.
/// `store` is as for [`verify_unverified`].
pub fn scrub_index(
    store: &dyn Fn() -> Option<std::sync::Arc<Store>>,
    limiter: &mut Limiter,
    repair: bool,
    on: &mut dyn FnMut(Event),
) -> Result<Report, Error> {
    let mut report = Report::default();
    let Some(opened) = store() else {
        report.stopped = true;
        return Ok(report);
    };
    let entries = opened.indexed_blobs()?;
    drop(opened);
    for (digest, entry) in entries {
        let Some(opened) = store() else {
            report.stopped = true;
            return Ok(report);
        };
        let path = opened.blob_path(&digest);
        drop(opened);
        let hashed = match hash_file(&path, limiter, &|| store().is_none()) {
            Ok(Some(hashed)) => hashed,
            Ok(None) => {
                report.stopped = true;
                return Ok(report);
            }
            // Evicted since the listing: the hit path drops entries whose file is gone.
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                tracing::warn!(%digest, error = %err, "scrub cannot read a stored blob");
                continue;
            }
        };
        report.blobs += 1;
        report.bytes = report.bytes.saturating_add(hashed.size);
        on(Event::Hashed { bytes: hashed.size });
        if hashed.digest == digest && hashed.size == entry.size {
            continue;
        }
        let Some(opened) = store() else {
            report.stopped = true;
            return Ok(report);
        };
        tracing::warn!(%digest, actual = %hashed.digest, indexed = entry.size, found = hashed.size, repair, "stored blob is corrupt");
        if repair {
            opened.remove(&digest)?;
            // `remove` unlinks only what the index knew; make sure the bad file is gone.
            opened.discard_file(&digest)?;
        }
        report.corrupt.push(digest.clone());
        on(Event::Corrupt { digest: &digest });
    }
    Ok(report)
}

/// Hashes every file under `<root>/blobs` against its name without opening the index or
/// taking the store's lock, so it runs beside a live server (read-only: it reports, it never
/// removes). For `regmirror verify` without `--repair`.
pub fn verify_files(root: &Path, limiter: &mut Limiter) -> io::Result<Report> {
    let mut report = Report::default();
    for (digest, path) in list_files(root)? {
        match hash_file(&path, limiter, &|| false) {
            Ok(Some(hashed)) => {
                report.blobs += 1;
                report.bytes = report.bytes.saturating_add(hashed.size);
                if hashed.digest != digest {
                    report.corrupt.push(digest);
                }
            }
            Ok(None) => {}
            // Evicted by a running server since the listing.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    report.corrupt.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(report)
}

/// `blobs/sha256/<2 hex>/<64 hex>` files under `root`, by digest.
fn list_files(root: &Path) -> io::Result<Vec<(Digest, PathBuf)>> {
    let dir = root.join("blobs").join("sha256");
    let mut found = Vec::new();
    let shards = match std::fs::read_dir(&dir) {
        Ok(shards) => shards,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(err) => return Err(err),
    };
    for shard in shards {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(shard.path())? {
            let entry = entry?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
            else {
                continue;
            };
            found.push((digest, entry.path()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn flip(path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn unindexed_files_are_adopted_only_when_they_hash_to_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        let m = Digest::sha256_of(manifest);
        let good = Digest::sha256_of(b"good");
        let bad = Digest::sha256_of(b"bad");
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.put_verified(&m, manifest, "x").unwrap();
            store.put_verified(&good, b"good", "x").unwrap();
            store.put_verified(&bad, b"bad", "x").unwrap();
            flip(&store.blob_path(&bad));
        }
        // The index goes: every file is unverified, none is served before it is hashed.
        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let (store, reconciled) = Store::open(dir.path()).unwrap();
        assert_eq!(reconciled.unverified, 3);
        assert!(store.stat(&good).unwrap().is_none());
        assert_eq!(store.blob_count(), 0);
        let held = store.clone();
        let report =
            verify_unverified(&|| Some(held.clone()), &mut Limiter::new(0), &mut |_| {}).unwrap();
        assert_eq!(report.adopted, 2);
        assert_eq!(report.corrupt, vec![bad.clone()]);
        assert!(!store.blob_path(&bad).exists());
        assert!(store.stat(&bad).unwrap().is_none());
        assert_eq!(store.stat(&good).unwrap().unwrap().media_type, None);
        assert_eq!(
            store.stat(&m).unwrap().unwrap().media_type.as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        assert_eq!(store.blob_count(), 2);
    }

    #[test]
    fn scrub_finds_and_removes_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let a = Digest::sha256_of(b"aaaa");
        let b = Digest::sha256_of(b"bbbb");
        store.put_verified(&a, b"aaaa", "x").unwrap();
        store.put_verified(&b, b"bbbb", "x").unwrap();
        flip(&store.blob_path(&b));
        let held = store.clone();
        let get = || Some(held.clone());

        let files = verify_files(dir.path(), &mut Limiter::new(0)).unwrap();
        assert_eq!((files.blobs, files.corrupt.clone()), (2, vec![b.clone()]));
        let dry = scrub_index(&get, &mut Limiter::new(0), false, &mut |_| {}).unwrap();
        assert_eq!(dry.corrupt, vec![b.clone()]);
        assert!(
            store.stat(&b).unwrap().is_some(),
            "not removed without repair"
        );

        let mut corrupt = 0;
        let fixed = scrub_index(&get, &mut Limiter::new(0), true, &mut |e| {
            if let Event::Corrupt { .. } = e {
                corrupt += 1
            }
        })
        .unwrap();
        assert_eq!((fixed.blobs, fixed.bytes, corrupt), (2, 8, 1));
        assert!(store.stat(&b).unwrap().is_none());
        assert!(!store.blob_path(&b).exists());
        assert!(store.stat(&a).unwrap().is_some());
        assert_eq!(store.blob_count(), 1);
    }

    #[test]
    fn a_pass_stops_when_the_store_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store
            .put_verified(&Digest::sha256_of(b"a"), b"a", "x")
            .unwrap();
        let weak = Arc::downgrade(&store);
        drop(store);
        let report =
            scrub_index(&|| weak.upgrade(), &mut Limiter::new(1), true, &mut |_| {}).unwrap();
        assert!(report.stopped);
    }
}
