//! An in-process upstream registry for fault injection: it counts every request and can be
//! slow, drop connections, lie about content, fail with a status, or demand bearer tokens.
//! The real upstream of the end-to-end tests is distribution; this one exists for the faults
//! distribution cannot be made to commit.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use regmirror::oci::Digest;

/// What the fake does wrong, changeable while it runs.
#[derive(Default)]
pub struct Faults {
    /// Answer every registry request with this status.
    pub status: Mutex<Option<u16>>,
    /// With `status`: this `Retry-After` header too.
    pub retry_after: Mutex<Option<String>>,
    /// Sleep this long between 64 KiB chunks of a blob.
    pub chunk_delay_ms: AtomicU64,
    /// Drop the connection after this many bytes of the next full (non-range) blob GET.
    pub drop_after: Mutex<Option<usize>>,
    /// Flip a byte in every blob body.
    pub corrupt: AtomicBool,
    /// Require `Authorization: Bearer <token>` issued by `/token`.
    pub require_token: AtomicBool,
    /// Accept requests and never answer them.
    pub hang: AtomicBool,
    /// Blob GETs answer without Content-Length (chunked); HEAD still says the size.
    pub no_length: AtomicBool,
    /// Blob GET bodies never end (pseudo-random bytes after the blob's), without length.
    pub endless: AtomicBool,
    /// The next this many full (non-range) blob GETs trickle after their first chunk: one byte
    /// every 100 ms.
    pub trickle: AtomicUsize,
    /// Blob GET bodies pause after this many bytes until the receiver reads `true`.
    pub hold: Mutex<Option<(usize, tokio::sync::watch::Receiver<bool>)>>,
    /// Sleep this long before answering a manifest request.
    pub manifest_delay_ms: AtomicU64,
    /// The bearer challenge's realm instead of this fake's `/token` (a hostile token endpoint).
    pub token_realm: Mutex<Option<String>>,
    /// Answer this many of the next registry requests with 503, then behave.
    pub fail_next: AtomicUsize,
}

#[derive(Default)]
pub struct Counters {
    pub requests: Mutex<Vec<(String, String, Option<String>)>>,
    pub tokens_issued: AtomicUsize,
    /// Woken on every request the fake receives.
    pub arrived: tokio::sync::Notify,
}

impl Counters {
    /// Requests whose method is `method` and whose path contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p, _)| m == method && p.contains(part))
            .count()
    }
}

#[derive(Default)]
pub struct Content {
    pub blobs: Mutex<HashMap<Digest, Bytes>>,
    /// Which repositories hold which blobs, as a registry scopes them.
    pub repo_blobs: Mutex<std::collections::HashSet<(String, Digest)>>,
    /// Referrers index bodies by subject digest (no entry: the API is not supported, 404).
    pub referrers: Mutex<HashMap<Digest, Bytes>>,
    /// (repository, tag or digest) → (body, media type)
    pub manifests: Mutex<HashMap<(String, String), (Bytes, String)>>,
}

#[derive(Clone, Default)]
pub struct Fake {
    pub faults: Arc<Faults>,
    pub counters: Arc<Counters>,
    pub content: Arc<Content>,
    pub addr: Arc<Mutex<Option<SocketAddr>>>,
}

/// An image the fake serves.
pub struct Image {
    pub manifest: Bytes,
    pub digest: Digest,
    pub layers: Vec<(Digest, Bytes)>,
}

impl Fake {
    /// Starts the fake on 127.0.0.1 with an ephemeral port; it stops with the test's runtime.
    pub async fn start() -> Fake {
        let fake = Fake::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        *fake.addr.lock().unwrap() = Some(listener.local_addr().unwrap());
        let app = Router::new()
            .route("/token", get(token))
            .route("/v2/{*rest}", any(registry))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr.lock().unwrap().unwrap())
    }

    pub fn put_blob(&self, bytes: Bytes) -> Digest {
        let digest = Digest::sha256_of(&bytes);
        self.content
            .blobs
            .lock()
            .unwrap()
            .insert(digest.clone(), bytes);
        digest
    }

    pub fn put_manifest(&self, repo: &str, tag: &str, body: Bytes, media_type: &str) -> Digest {
        let digest = Digest::sha256_of(&body);
        let mut manifests = self.content.manifests.lock().unwrap();
        manifests.insert((repo.into(), tag.into()), (body.clone(), media_type.into()));
        manifests.insert((repo.into(), digest.to_string()), (body, media_type.into()));
        digest
    }

    /// An OCI image with one layer per size, each of pseudo-random bytes, tagged `tag`.
    pub fn put_image(&self, repo: &str, tag: &str, layer_sizes: &[usize], seed: u64) -> Image {
        let config = Bytes::from(format!(
            r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#
        ));
        let config_digest = self.put_blob(config.clone());
        let layers: Vec<(Digest, Bytes)> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                let bytes = pseudo_random(*size, seed * 1000 + i as u64);
                (self.put_blob(bytes.clone()), bytes)
            })
            .collect();
        let layer_json: Vec<String> = layers
            .iter()
            .map(|(d, b)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#, b.len()))
            .collect();
        let manifest = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layer_json.join(",")
        ));
        let digest = self.put_manifest(
            repo,
            tag,
            manifest.clone(),
            "application/vnd.oci.image.manifest.v1+json",
        );
        let mut repo_blobs = self.content.repo_blobs.lock().unwrap();
        repo_blobs.insert((repo.to_owned(), config_digest));
        for (layer, _) in &layers {
            repo_blobs.insert((repo.to_owned(), layer.clone()));
        }
        drop(repo_blobs);
        Image {
            manifest,
            digest,
            layers,
        }
    }
}

/// Deterministic incompressible bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

async fn token(State(fake): State<Fake>) -> Response {
    let n = fake.counters.tokens_issued.fetch_add(1, Ordering::SeqCst);
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"token":"tok-{n}","expires_in":300}}"#),
    )
        .into_response()
}

async fn registry(
    State(fake): State<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_owned();
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    fake.counters
        .requests
        .lock()
        .unwrap()
        .push((method.to_string(), path.clone(), auth.clone()));
    fake.counters.arrived.notify_waiters();
    if fake.faults.require_token.load(Ordering::SeqCst)
        && !auth
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer tok-"))
    {
        let realm = fake
            .faults
            .token_realm
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| format!("{}/token", fake.url()));
        let challenge =
            format!(r#"Bearer realm="{realm}",service="fake",scope="repository:x:pull""#);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            "{}",
        )
            .into_response();
    }
    if fake.faults.hang.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some(status) = *fake.faults.status.lock().unwrap() {
        let mut response = StatusCode::from_u16(status).unwrap().into_response();
        if let Some(seconds) = fake.faults.retry_after.lock().unwrap().clone() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.parse().unwrap());
        }
        return response;
    }
    if fake
        .faults
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        let delay = fake.faults.manifest_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let found = fake
            .content
            .manifests
            .lock()
            .unwrap()
            .get(&(repo.to_owned(), reference.to_owned()))
            .cloned();
        return match found {
            Some((body, media_type)) => {
                let digest = Digest::sha256_of(&body);
                let body = if method == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from(body.clone())
                };
                Response::builder()
                    .header(header::CONTENT_TYPE, media_type)
                    .header("docker-content-digest", digest.as_str())
                    .body(body)
                    .unwrap()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        let Ok(digest) = digest.parse::<Digest>() else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        if !fake
            .content
            .repo_blobs
            .lock()
            .unwrap()
            .contains(&(repo.to_owned(), digest.clone()))
        {
            return StatusCode::NOT_FOUND.into_response();
        }
        let Some(mut bytes) = fake.content.blobs.lock().unwrap().get(&digest).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        if fake.faults.corrupt.load(Ordering::SeqCst) && !bytes.is_empty() {
            let mut v = bytes.to_vec();
            let last = v.len() - 1;
            v[last] ^= 0xff;
            bytes = v.into();
        }
        let total = bytes.len();
        let start = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.strip_suffix('-'))
            .and_then(|v| v.parse::<usize>().ok());
        let unsized_body = method == Method::GET
            && (fake.faults.no_length.load(Ordering::SeqCst)
                || fake.faults.endless.load(Ordering::SeqCst));
        let mut builder = Response::builder();
        if !unsized_body {
            builder = builder.header(header::CONTENT_LENGTH, total - start.unwrap_or(0));
        }
        if let Some(start) = start {
            builder = builder.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", total - 1),
            );
        }
        if method == Method::HEAD {
            return builder.body(Body::empty()).unwrap();
        }
        let body = bytes.slice(start.unwrap_or(0)..);
        let drop_after = if start.is_none() {
            fake.faults.drop_after.lock().unwrap().take()
        } else {
            None
        };
        let delay = Duration::from_millis(fake.faults.chunk_delay_ms.load(Ordering::SeqCst));
        let chunks: Vec<Bytes> = (0..body.len())
            .step_by(64 * 1024)
            .map(|i| body.slice(i..(i + 64 * 1024).min(body.len())))
            .collect();
        let stream = futures_util::stream::unfold(
            (chunks.into_iter(), 0usize),
            move |(mut chunks, sent)| async move {
                if let Some(limit) = drop_after {
                    if sent >= limit {
                        // Let hyper flush what was sent, so the drop happens mid-body.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Some((
                            Err(std::io::Error::other("injected drop")),
                            (chunks, usize::MAX),
                        ));
                    }
                }
                if sent == usize::MAX {
                    return None;
                }
                let chunk = chunks.next()?;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let sent = sent + chunk.len();
                Some((Ok::<Bytes, std::io::Error>(chunk), (chunks, sent)))
            },
        );
        let stream = shaped(&fake, start.is_none(), stream);
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    if let Some((_, subject)) = rest.rsplit_once("/referrers/") {
        let found = subject
            .parse::<Digest>()
            .ok()
            .and_then(|d| fake.content.referrers.lock().unwrap().get(&d).cloned());
        return match found {
            Some(body) => (
                [(
                    header::CONTENT_TYPE,
                    "application/vnd.oci.image.index.v1+json",
                )],
                body,
            )
                .into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if rest.ends_with("/tags/list") {
        let repo = rest.trim_end_matches("/tags/list");
        let mut tags: Vec<String> = fake
            .content
            .manifests
            .lock()
            .unwrap()
            .keys()
            .filter(|(r, t)| r == repo && !t.contains(':'))
            .map(|(_, t)| t.clone())
            .collect();
        tags.sort();
        return (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({"name": repo, "tags": tags}).to_string(),
        )
            .into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}

/// regmirror in-process, bound on 127.0.0.1:0, in front of a fake.
pub struct Mirror {
    pub url: String,
    pub root: std::path::PathBuf,
    pub state: regmirror::AppState,
    _dir: Option<tempfile::TempDir>,
}

/// Starts regmirror with `extra` YAML (top-level keys such as `cache: { tag_ttl: 0s }`) and its
/// store in a fresh temporary directory.
pub async fn mirror(fake: &Fake, extra: &str) -> Mirror {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let mut mirror = mirror_at(fake, &root, extra).await;
    mirror._dir = Some(dir);
    mirror
}

/// Starts regmirror with its store at `root`.
pub async fn mirror_at(fake: &Fake, root: &std::path::Path, extra: &str) -> Mirror {
    // The store's root goes into the test's own `storage:` section when it has one.
    let storage = format!("storage: {{ root: {root:?}, ");
    let extra = if extra.contains("storage: {") {
        extra.replacen("storage: {", &storage, 1)
    } else {
        format!("{extra}\nstorage: {{ root: {root:?} }}")
    };
    let text = format!(
        "listen: 127.0.0.1:0\ndefault_upstream: docker.io\nupstreams:\n  docker.io: {{ url: '{}', read_timeout: 2s }}\n{extra}\n",
        fake.url()
    );
    let config = regmirror::Config::parse(&text, "test").unwrap();
    let state = regmirror::state(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // The server `run` uses, so cache hits go out with sendfile as in production.
    let listener = regmirror::server::Listener::new(listener, None).unwrap();
    let serving = regmirror::serve(listener, state.clone(), std::future::pending());
    tokio::spawn(async move { serving.await.unwrap() });
    Mirror {
        url,
        root: root.to_owned(),
        state,
        _dir: None,
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

type BodyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Applies the `endless`, `trickle` and `hold` faults to a blob body.
fn shaped(
    fake: &Fake,
    full: bool,
    body: impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> BodyStream {
    use futures_util::StreamExt;
    let mut body: BodyStream = Box::pin(body);
    if fake.faults.endless.load(Ordering::SeqCst) {
        let more =
            futures_util::stream::iter(0u64..).map(|i| Ok(pseudo_random(64 * 1024, 7_000_000 + i)));
        body = Box::pin(body.chain(more));
    }
    let trickle = full
        && fake
            .faults
            .trickle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if trickle {
        // The first chunk at full speed, then the rest one byte at a time.
        body = Box::pin(body.enumerate().flat_map(|(i, chunk)| -> BodyStream {
            match chunk {
                Ok(chunk) if i > 0 => {
                    Box::pin(futures_util::stream::iter(0..chunk.len()).then(move |at| {
                        let byte = chunk.slice(at..at + 1);
                        async move {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Ok(byte)
                        }
                    }))
                }
                other => Box::pin(futures_util::stream::iter([other])),
            }
        }));
    }
    let Some((limit, gate)) = fake.faults.hold.lock().unwrap().clone() else {
        return body;
    };
    Box::pin(futures_util::stream::unfold(
        (body, 0usize, gate),
        move |(mut body, sent, mut gate)| async move {
            if sent >= limit {
                let _ = gate.wait_for(|open| *open).await;
            }
            let chunk = body.next().await?;
            let sent = sent + chunk.as_ref().map_or(0, Bytes::len);
            Some((chunk, (body, sent, gate)))
        },
    ))
}

impl Counters {
    /// Waits until a request whose method is `method` and whose path contains `part` arrived.
    pub async fn arrival(&self, method: &str, part: &str) {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.count(method, part) > 0 {
                return;
            }
            arrived.await;
        }
    }
}

/// Starts regmirror from a whole configuration (upstreams included) without `listen` and
/// `storage`, which are set here: its store is in a fresh temporary directory.
pub async fn mirror_from(text: &str) -> Mirror {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let text = format!("listen: 127.0.0.1:0\nstorage: {{ root: {root:?} }}\n{text}\n");
    let config = regmirror::Config::parse(&text, "test").unwrap();
    let state = regmirror::state(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = regmirror::server::Listener::new(listener, None).unwrap();
    let serving = regmirror::serve(listener, state.clone(), std::future::pending());
    tokio::spawn(async move { serving.await.unwrap() });
    Mirror {
        url,
        root,
        state,
        _dir: Some(dir),
    }
}
