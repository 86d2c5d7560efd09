//! The shared bucket: an S3-compatible object store (Garage is the reference) holding what a
//! cluster of replicas knows together: blobs and manifests by digest, tags with the time they
//! were last confirmed, and which repository showed which digest.
//!
//! Layout (keys in the bucket):
//! ```text
//! blobs/sha256/<64 hex>                 verified blob content
//! manifests/sha256/<64 hex>             verified manifest (Content-Type: its media type)
//! tags/<upstream>/<repository>/_t/<tag> {"digest": ..., "confirmed": <unix ms>}
//! links/<upstream>/<repository>/_l/<64 hex>   empty: the repository showed this digest
//! images/sha256/<64 hex>                {"last_pull": <unix ms>}: an image root, for eviction
//! refs/sha256/<64 hex>/<upstream>/<repository>/_t/<tag>   empty: this tag was recorded
//!                                       naming that root (the tag to remove with the image)
//! pins/sha256/<64 hex>                  {"at": <unix ms>}: a pin pass pinned this root then
//! evicting                              {"at": <unix ms>}: the bucket went over its bound and
//!                                       the replicas are evicting down to the low watermark
//! ```
//! (`_t` and `_l` cannot be repository path components: those start with `[a-z0-9]`.)
//!
//! Like the filesystem store, nothing here decides what is trusted: the cache verifies content
//! before it calls [`Bucket::put_blob_file`] or [`Bucket::put_manifest`]. An upload is still
//! hashed as it is sent and completed only if it hashes to its name (a multipart upload is
//! aborted otherwise), so a bit flipped on the local disk between verification and upload
//! never reaches the bucket. Garage has no conditional PUT and none is needed: two replicas
//! writing one digest write the same bytes.
//!
//! Storage knows nothing of HTTP requests or upstreams: upstream and repository names are
//! opaque strings here.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutOptions, PutPayload, RetryConfig,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use super::Error;
use crate::oci::{Digest, DigestHasher};

pub const S3_REQUESTS: &str = "regmirror_s3_requests_total";
pub const S3_DURATION: &str = "regmirror_s3_request_duration_seconds";

/// Part size of a multipart upload: S3 wants at least 5 MiB for every part but the last.
const PART: usize = 8 << 20;
/// The largest manifest, tag or link object read into memory.
const MAX_SMALL_OBJECT: u64 = 4 << 20;

/// How to reach the bucket (secrets already resolved by the caller).
#[derive(Clone)]
pub struct BucketOptions {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub path_style: bool,
}

impl std::fmt::Debug for BucketOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of every debug print.
        f.debug_struct("BucketOptions")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// A tag as the bucket records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedTag {
    pub digest: Digest,
    /// When the upstream last confirmed it (unix milliseconds).
    pub confirmed: u64,
}

/// An image root as the bucket records it: when some replica last served a pull of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedImage {
    pub last_pull: u64,
}

/// A pin pass's mark on an image root: when it last pinned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedPin {
    pub at: u64,
}

/// An eviction pass's mark on an image root: the image is to go once `cache`'s grace period
/// has passed since `marked_at`, unless it was pulled after `last_pull` meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedMark {
    pub marked_at: u64,
    pub last_pull: u64,
}

/// An object as a listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The key after the listed prefix.
    pub name: String,
    pub size: u64,
    /// Last modification, unix milliseconds.
    pub modified: u64,
    pub e_tag: Option<String>,
}

/// A blob body read from the bucket.
pub struct BucketBody {
    /// The blob's whole size.
    pub size: u64,
    pub stream: BoxStream<'static, Result<Bytes, String>>,
}

/// The shared bucket.
pub struct Bucket {
    store: Arc<AmazonS3>,
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl Bucket {
    /// A client for the bucket; no request is made (see [`Bucket::check`]).
    pub fn new(options: &BucketOptions, registry: &Registry) -> Result<Bucket, String> {
        // A dead node must not hold a request for object_store's default three minutes of
        // retries: the cache has fallbacks (the upstream, a peer) that are better than waiting.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(60))
            .with_allow_http(true);
        let store = AmazonS3Builder::new()
            .with_endpoint(&options.endpoint)
            .with_bucket_name(&options.bucket)
            .with_region(&options.region)
            .with_access_key_id(&options.access_key_id)
            .with_secret_access_key(&options.secret_access_key)
            .with_virtual_hosted_style_request(!options.path_style)
            .with_allow_http(true)
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| format!("storage.s3: {e}"))?;
        let requests = IntCounterVec::new(
            Opts::new(
                S3_REQUESTS,
                "Requests to the shared bucket, by operation and result.",
            ),
            &["op", "result"],
        )
        .map_err(|e| e.to_string())?;
        let duration = HistogramVec::new(
            HistogramOpts::new(S3_DURATION, "Time of requests to the shared bucket.").buckets(
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
            ),
            &["op"],
        )
        .map_err(|e| e.to_string())?;
        // A second bucket in one process (tests) shares the first one's series.
        let _ = registry.register(Box::new(requests.clone()));
        let _ = registry.register(Box::new(duration.clone()));
        Ok(Bucket {
            store: Arc::new(store),
            requests,
            duration,
        })
    }

    fn observe<T>(&self, op: &str, started: Instant, result: &Result<T, Error>) {
        let label = match result {
            Ok(_) => "ok",
            Err(Error::NotFound) => "not_found",
            Err(_) => "error",
        };
        self.requests.with_label_values(&[op, label]).inc();
        self.duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Whether the bucket answers (a listing of one key): for start-up and `/readyz`.
    pub async fn check(&self) -> Result<(), Error> {
        let started = Instant::now();
        let prefix = Path::from("blobs");
        let result = self
            .store
            .list(Some(&prefix))
            .next()
            .await
            .transpose()
            .map(|_| ())
            .map_err(classify);
        self.observe("list", started, &result);
        result
    }

    /// The size of a blob in the bucket, `None` if it is not there.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, Error> {
        let started = Instant::now();
        let result = self
            .store
            .head(&blob_key(digest))
            .await
            .map(|meta| meta.size)
            .map_err(classify);
        self.observe("head", started, &result);
        match result {
            Ok(size) => Ok(Some(size)),
            Err(Error::NotFound) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// A blob from byte `from` on.
    pub async fn get_blob(&self, digest: &Digest, from: u64) -> Result<BucketBody, Error> {
        let started = Instant::now();
        let options = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&blob_key(digest), options)
            .await
            .map_err(classify);
        self.observe("get", started, &result);
        let got = result?;
        let size = got.meta.size;
        let stream = got.into_stream().map_err(|e| e.to_string()).boxed();
        Ok(BucketBody { size, stream })
    }

    /// Uploads a verified local file as the blob `digest`, hashing what is sent: the upload is
    /// completed only if the bytes sent hash to `digest`, aborted otherwise.
    pub async fn put_blob_file(&self, digest: &Digest, file: Arc<File>) -> Result<u64, Error> {
        let started = Instant::now();
        let result = self.put_file(&blob_key(digest), digest, file).await;
        self.observe("put_blob", started, &result);
        result
    }

    async fn put_file(&self, key: &Path, digest: &Digest, file: Arc<File>) -> Result<u64, Error> {
        let mut hasher = DigestHasher::new();
        let mut offset = 0u64;
        let first = read_part(&file, offset).await?;
        if first.len() < PART {
            // Small enough for one PUT: nothing is visible until it completes.
            hasher.update(&first);
            check_digest(hasher, digest)?;
            let len = first.len() as u64;
            self.store
                .put(key, PutPayload::from_bytes(first))
                .await
                .map_err(classify)?;
            return Ok(len);
        }
        let mut upload = self.store.put_multipart(key).await.map_err(classify)?;
        let mut part = first;
        let sent: Result<(), Error> = async {
            loop {
                if part.is_empty() {
                    break;
                }
                hasher.update(&part);
                offset = offset.saturating_add(part.len() as u64);
                let full = part.len() == PART;
                upload
                    .put_part(PutPayload::from_bytes(part))
                    .await
                    .map_err(classify)?;
                if !full {
                    break;
                }
                part = read_part(&file, offset).await?;
            }
            Ok(())
        }
        .await;
        let verified = sent.and_then(|()| check_digest(hasher, digest));
        match verified {
            Ok(()) => {
                upload.complete().await.map_err(classify)?;
                Ok(offset)
            }
            Err(err) => {
                // Nothing of an aborted upload is ever visible under the key.
                let _ = upload.abort().await;
                Err(err)
            }
        }
    }

    /// Removes a blob; removing one that is not there succeeds.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<(), Error> {
        let started = Instant::now();
        let result = match self.store.delete(&blob_key(digest)).await.map_err(classify) {
            Err(Error::NotFound) => Ok(()),
            other => other,
        };
        self.observe("delete", started, &result);
        result
    }

    /// A URL that lets its bearer GET the blob for `ttl`, signed, without the secret.
    pub async fn presigned_blob_url(
        &self,
        digest: &Digest,
        ttl: Duration,
    ) -> Result<String, Error> {
        let started = Instant::now();
        let result = self
            .store
            .signed_url(http::Method::GET, &blob_key(digest), ttl)
            .await
            .map(|url| url.to_string())
            .map_err(classify);
        self.observe("presign", started, &result);
        result
    }

    /// Stores a verified manifest with its media type.
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<(), Error> {
        if Digest::sha256_of(&bytes) != *digest {
            return Err(Error::Io(std::io::Error::other(
                "manifest does not match its digest",
            )));
        }
        let started = Instant::now();
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, media_type.to_owned().into());
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        let result = self
            .store
            .put_opts(
                &manifest_key(digest),
                PutPayload::from_bytes(bytes),
                options,
            )
            .await
            .map(|_| ())
            .map_err(classify);
        self.observe("put_manifest", started, &result);
        result
    }

    /// Whether the bucket holds the manifest `digest`.
    pub async fn has_manifest(&self, digest: &Digest) -> Result<bool, Error> {
        let started = Instant::now();
        let result = self
            .store
            .head(&manifest_key(digest))
            .await
            .map(|_| ())
            .map_err(classify);
        self.observe("head", started, &result);
        match result {
            Ok(()) => Ok(true),
            Err(Error::NotFound) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// A manifest and its media type, `None` if the bucket does not have it (or has bytes that
    /// do not hash to its name, which are not served).
    pub async fn get_manifest(&self, digest: &Digest) -> Result<Option<(Bytes, String)>, Error> {
        let started = Instant::now();
        let result = self.get_small(&manifest_key(digest)).await;
        self.observe(
            "get_manifest",
            started,
            &result.as_ref().map(|_| ()).map_err(clone_err),
        );
        let Some((bytes, attributes)) = result? else {
            return Ok(None);
        };
        if Digest::sha256_of(&bytes) != *digest {
            tracing::warn!(%digest, "manifest in the bucket does not match its digest, ignoring it");
            return Ok(None);
        }
        let media_type = attributes
            .get(&Attribute::ContentType)
            .map(|v| v.as_ref().to_owned())
            .unwrap_or_default();
        Ok(Some((bytes, media_type)))
    }

    /// Records what a tag points to and when the upstream confirmed it.
    pub async fn put_tag(
        &self,
        upstream: &str,
        repository: &str,
        tag: &str,
        entry: &SharedTag,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let body = serde_json::to_vec(entry).map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let result = self
            .store
            .put(&tag_key(upstream, repository, tag), PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(classify);
        self.observe("put_tag", started, &result);
        result
    }

    /// What the cluster last recorded for a tag.
    pub async fn get_tag(
        &self,
        upstream: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<SharedTag>, Error> {
        let started = Instant::now();
        let result = self.get_small(&tag_key(upstream, repository, tag)).await;
        self.observe(
            "get_tag",
            started,
            &result.as_ref().map(|_| ()).map_err(clone_err),
        );
        let Some((bytes, _)) = result? else {
            return Ok(None);
        };
        // A record that does not parse is as good as none: the tag is asked for again.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Records that `repository` of `upstream` showed `digest`.
    pub async fn put_link(
        &self,
        upstream: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let result = self
            .store
            .put(&link_key(upstream, repository, digest), PutPayload::new())
            .await
            .map(|_| ())
            .map_err(classify);
        self.observe("put_link", started, &result);
        result
    }

    /// Whether `repository` of `upstream` showed `digest` to some replica.
    pub async fn is_linked(
        &self,
        upstream: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<bool, Error> {
        let started = Instant::now();
        let result = self
            .store
            .head(&link_key(upstream, repository, digest))
            .await
            .map(|_| ())
            .map_err(classify);
        self.observe("head_link", started, &result);
        match result {
            Ok(()) => Ok(true),
            Err(Error::NotFound) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Every object under `prefix` (`blobs`, `manifests`, `images`, `refs`, `pins`), with
    /// names relative to it, collected: for tests and small prefixes. Passes over the whole
    /// bucket use [`Bucket::scan`].
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, Error> {
        let mut out = Vec::new();
        self.scan(prefix, |item| out.push(item)).await?;
        Ok(out)
    }

    /// Hands every object under `prefix` to `each` as the listing pages arrive (one request
    /// per thousand keys), holding one page at a time: what a pass keeps of each is its own
    /// business. Names are relative to `prefix`.
    pub async fn scan(&self, prefix: &str, mut each: impl FnMut(Listed)) -> Result<(), Error> {
        let started = Instant::now();
        let base = Path::from(prefix);
        let skip = base.as_ref().len() + 1;
        let mut pages = self.store.list(Some(&base));
        let mut result = Ok(());
        let mut listed: u64 = 0;
        while let Some(item) = pages.next().await {
            match item {
                Ok(meta) => {
                    listed += 1;
                    each(Listed {
                        name: meta.location.as_ref().get(skip..).unwrap_or("").to_owned(),
                        size: meta.size,
                        modified: u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0),
                        e_tag: meta.e_tag,
                    })
                }
                Err(err) => {
                    result = Err(classify(err));
                    break;
                }
            }
        }
        // One request per page of `LIST_PAGE` keys (the stream hides pages): counted as such,
        // so `regmirror_s3_requests_total` says what the bucket's operator is billed for.
        self.observe("list", started, &result);
        let more_pages = listed.saturating_sub(1) / LIST_PAGE;
        if more_pages > 0 {
            let label = if result.is_ok() { "ok" } else { "error" };
            self.requests
                .with_label_values(&["list", label])
                .inc_by(more_pages);
        }
        result
    }

    /// Records a pull of the image rooted at `root`.
    pub async fn put_image(&self, root: &Digest, image: &SharedImage) -> Result<(), Error> {
        self.put_json("put_image", &image_key(root), image).await
    }

    /// The image record of `root`, `None` if absent or unreadable.
    pub async fn get_image(&self, root: &Digest) -> Result<Option<SharedImage>, Error> {
        self.get_json("get_image", &image_key(root)).await
    }

    /// Marks the image rooted at `root` pinned as of `pin.at`.
    pub async fn put_pin(&self, root: &Digest, pin: &SharedPin) -> Result<(), Error> {
        self.put_json("put_pin", &pin_key(root), pin).await
    }

    /// A pin mark, `None` if absent or unreadable.
    pub async fn get_pin(&self, root: &Digest) -> Result<Option<SharedPin>, Error> {
        self.get_json("get_pin", &pin_key(root)).await
    }

    /// Marks the image rooted at `root` for eviction.
    pub async fn put_mark(&self, root: &Digest, mark: &SharedMark) -> Result<(), Error> {
        self.put_json("put_mark", &mark_key(root), mark).await
    }

    /// An eviction mark, `None` if absent or unreadable.
    pub async fn get_mark(&self, root: &Digest) -> Result<Option<SharedMark>, Error> {
        self.get_json("get_mark", &mark_key(root)).await
    }

    /// Marks the bucket as being evicted down to its low watermark (or clears the mark), so
    /// replicas whose passes come after another's first deletions keep going.
    pub async fn set_evicting(&self, at: Option<u64>) -> Result<(), Error> {
        match at {
            Some(at) => {
                self.put_json("put_evicting", &evicting_key(), &SharedPin { at })
                    .await
            }
            None => self.delete_key(&evicting_key()).await,
        }
    }

    /// Whether the bucket is marked as being evicted.
    pub async fn evicting(&self) -> Result<bool, Error> {
        Ok(self
            .get_json::<SharedPin>("get_evicting", &evicting_key())
            .await?
            .is_some())
    }

    /// Records that a tag was pointed at the image rooted at `root`, so whoever removes the
    /// image finds the tag to remove first.
    pub async fn put_tag_ref(
        &self,
        root: &Digest,
        upstream: &str,
        repository: &str,
        tag: &str,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let key = Path::from(format!(
            "refs/sha256/{}/{upstream}/{repository}/_t/{tag}",
            root.hex()
        ));
        let result = self
            .store
            .put(&key, PutPayload::new())
            .await
            .map(|_| ())
            .map_err(classify);
        self.observe("put_ref", started, &result);
        result
    }

    /// Removes the tag `tags/<name>` (`name` as a `refs/` listing gives it after the root:
    /// `<upstream>/<repository>/_t/<tag>`) if it still names `root`; a tag that moved on to
    /// another image stays. Returns whether it was removed.
    pub async fn delete_tag_naming(&self, name: &str, root: &Digest) -> Result<bool, Error> {
        let key = Path::from(format!("tags/{name}"));
        let started = Instant::now();
        let found = self.get_small(&key).await;
        self.observe(
            "get_tag",
            started,
            &found.as_ref().map(|_| ()).map_err(clone_err),
        );
        let Some((bytes, _)) = found? else {
            return Ok(false);
        };
        match serde_json::from_slice::<SharedTag>(&bytes) {
            Ok(tag) if tag.digest != *root => Ok(false),
            // Naming this root, or unreadable (as good as none to every reader).
            _ => self.delete_key(&key).await.map(|()| true),
        }
    }

    /// Removes an object as [`Bucket::scan`] of `prefix` named it.
    pub async fn delete_listed(&self, prefix: &str, name: &str) -> Result<(), Error> {
        self.delete_key(&Path::from(format!("{prefix}/{name}")))
            .await
    }

    /// Removes an object by its whole key; removing one that is not there succeeds.
    pub async fn delete_key(&self, key: &Path) -> Result<(), Error> {
        let started = Instant::now();
        let result = match self.store.delete(key).await.map_err(classify) {
            Err(Error::NotFound) => Ok(()),
            other => other,
        };
        self.observe("delete", started, &result);
        result
    }

    async fn put_json<T: Serialize>(&self, op: &str, key: &Path, value: &T) -> Result<(), Error> {
        let started = Instant::now();
        let body = serde_json::to_vec(value).map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let result = self
            .store
            .put(key, PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(classify);
        self.observe(op, started, &result);
        result
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        op: &str,
        key: &Path,
    ) -> Result<Option<T>, Error> {
        let started = Instant::now();
        let result = self.get_small(key).await;
        self.observe(op, started, &result.as_ref().map(|_| ()).map_err(clone_err));
        Ok(result?.and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok()))
    }

    /// A small object (manifest, tag), refused if larger than [`MAX_SMALL_OBJECT`].
    async fn get_small(&self, key: &Path) -> Result<Option<(Bytes, Attributes)>, Error> {
        let got = match self.store.get(key).await.map_err(classify) {
            Ok(got) => got,
            Err(Error::NotFound) => return Ok(None),
            Err(err) => return Err(err),
        };
        if got.meta.size > MAX_SMALL_OBJECT {
            return Err(Error::Io(std::io::Error::other(format!(
                "{key}: {} bytes, more than a manifest or tag may have",
                got.meta.size
            ))));
        }
        let attributes = got.attributes.clone();
        let bytes = got.bytes().await.map_err(classify)?;
        Ok(Some((bytes, attributes)))
    }
}

/// Keys per listing request: S3's (and Garage's) default `max-keys`, which `object_store` uses.
const LIST_PAGE: u64 = 1000;

fn clone_err(err: &Error) -> Error {
    match err {
        Error::NotFound => Error::NotFound,
        other => Error::Io(std::io::Error::other(other.to_string())),
    }
}

fn check_digest(hasher: DigestHasher, digest: &Digest) -> Result<(), Error> {
    let actual = hasher.finish();
    if actual == *digest {
        Ok(())
    } else {
        tracing::warn!(expected = %digest, %actual, "local file no longer matches its digest, not uploading it");
        Err(Error::Io(std::io::Error::other(format!(
            "content hashes to {actual}, not {digest}"
        ))))
    }
}

/// Up to one part of `file` from `offset`, read on the blocking pool.
async fn read_part(file: &Arc<File>, offset: u64) -> Result<Bytes, Error> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; PART];
        let mut filled = 0;
        while filled < PART {
            match file.read_at(&mut buf[filled..], offset.saturating_add(filled as u64))? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok::<_, std::io::Error>(Bytes::from(buf))
    })
    .await
    .map_err(|e| Error::Io(std::io::Error::other(e)))?
    .map_err(Error::from)
}

fn classify(err: object_store::Error) -> Error {
    match err {
        object_store::Error::NotFound { .. } => Error::NotFound,
        other => Error::Io(std::io::Error::other(other.to_string())),
    }
}

fn blob_key(digest: &Digest) -> Path {
    Path::from(format!("blobs/sha256/{}", digest.hex()))
}

fn manifest_key(digest: &Digest) -> Path {
    Path::from(format!("manifests/sha256/{}", digest.hex()))
}

// Upstream names are configured host names, repositories and tags follow the OCI grammar:
// none holds characters that need escaping in a key, and `Path::from` splits on `/` only.
fn tag_key(upstream: &str, repository: &str, tag: &str) -> Path {
    Path::from(format!("tags/{upstream}/{repository}/_t/{tag}"))
}

/// The key of a blob (`manifest` false) or manifest in the bucket.
pub fn content_key(digest: &Digest, manifest: bool) -> Path {
    if manifest {
        manifest_key(digest)
    } else {
        blob_key(digest)
    }
}

fn evicting_key() -> Path {
    Path::from("evicting")
}

pub fn image_key(root: &Digest) -> Path {
    Path::from(format!("images/sha256/{}", root.hex()))
}

pub fn mark_key(root: &Digest) -> Path {
    Path::from(format!("marks/sha256/{}", root.hex()))
}

pub fn pin_key(root: &Digest) -> Path {
    Path::from(format!("pins/sha256/{}", root.hex()))
}

/// The key of a tag reference (`name` as a `refs/` listing gives it after the root).
pub fn tag_ref_key(root: &Digest, name: &str) -> Path {
    Path::from(format!("refs/sha256/{}/{name}", root.hex()))
}

fn link_key(upstream: &str, repository: &str, digest: &Digest) -> Path {
    Path::from(format!("links/{upstream}/{repository}/_l/{}", digest.hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_collide_between_repositories_and_tags() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            tag_key("docker.io", "library/alpine", "3.20").as_ref(),
            "tags/docker.io/library/alpine/_t/3.20"
        );
        assert_eq!(
            link_key("docker.io", "library/alpine", &d).as_ref(),
            format!("links/docker.io/library/alpine/_l/{}", d.hex())
        );
        assert_eq!(blob_key(&d).as_ref(), format!("blobs/sha256/{}", d.hex()));
        // A repository named like a tag key's tail stays apart: `_t` is no repository component.
        assert!("_t".parse::<crate::oci::RepoName>().is_err());
    }

    #[test]
    fn debug_output_has_no_secret() {
        let options = BucketOptions {
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "b".into(),
            region: "garage".into(),
            access_key_id: "GK1".into(),
            secret_access_key: "very-secret".into(),
            path_style: true,
        };
        assert!(!format!("{options:?}").contains("very-secret"));
    }
}
