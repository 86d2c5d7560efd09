//! Talking to upstream registries: one HTTP client per upstream for the life of the process,
//! bearer-token and basic auth with the upstream's credentials, and the upstream's answers
//! classified into [`Error`].
//!
//! Upstream knows nothing of storage: it hands the cache bytes, streams and digests as the
//! remote registry claims them; verifying them is the cache's job.
//!
//! An upstream is hostile until proven otherwise: every body held in memory is read with a cap
//! (and decoded with a cap when it comes gzip-encoded), every exchange but a blob body has an
//! overall deadline (`request_timeout`), every number it sends (token lifetimes, `Retry-After`,
//! rate limits) is clamped before arithmetic. An upstream may have several URLs: they are tried
//! in order, a failed one is skipped for a while, and idempotent requests are retried with
//! jittered backoff on connection errors and 5xx within the deadline.

mod auth;
pub mod backoff;
pub mod credentials;
pub mod tls;

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

pub use auth::{Challenge, RealmPolicy, TokenCache};
use credentials::Credentials;

use crate::config::{Config, UpstreamConfig};
use crate::metrics::{Metrics, RateLimit};
use crate::oci::{media_type, Digest, RepoName};

/// Manifests larger than this are refused, as distribution does: they are read into memory.
/// Tag lists and referrers indexes have the same cap.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// A token endpoint's answer is a small JSON object (a JWT or two); more is refused.
pub const MAX_TOKEN_BYTES: usize = 1 << 20;
/// The longest `Retry-After` passed on to clients: an upstream's number, clamped.
pub const MAX_RETRY_AFTER_SECONDS: u64 = 24 * 3600;
/// How long a URL of an upstream with several is skipped after it failed (no connection, a
/// timeout, a 5xx), unless every URL failed.
pub const FAILED_URL_SKIP: Duration = Duration::from_secs(30);
/// Retries of an idempotent request after a connection error or a 5xx (besides trying the
/// upstream's other URLs), each after a jittered backoff, all within `request_timeout`.
pub const RETRIES: u32 = 2;
/// The first backoff; it doubles with each retry.
const BACKOFF: Duration = Duration::from_millis(100);

/// An upstream failure, classified for the cache (which may serve stale) and the API (which maps
/// it to an OCI error). Cheap to clone so one failure can answer every waiting client.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The upstream has no such manifest, blob or repository.
    #[error("not found upstream")]
    NotFound,
    /// The upstream wants credentials we do not have or refused the ones we sent.
    #[error("upstream requires authentication")]
    Unauthorized,
    /// The upstream refused access.
    #[error("upstream denied access")]
    Denied,
    /// The upstream is rate-limiting us.
    #[error("upstream rate limit exceeded")]
    TooManyRequests { retry_after: Option<u64> },
    /// Any other unexpected status.
    #[error("upstream answered {0}")]
    Status(u16),
    /// No answer in time.
    #[error("upstream timed out")]
    Timeout,
    /// Connection refused, reset, TLS failure… (the text never holds credentials).
    #[error("upstream unreachable: {0}")]
    Transport(String),
    /// The upstream sent something we refuse to cache (oversized or malformed).
    #[error("upstream sent an invalid response: {0}")]
    Invalid(String),
}

impl Error {
    /// Whether the failure says the upstream is unhealthy rather than that the content is not
    /// there; the cache serves stale content only for these.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::TooManyRequests { .. }
                | Error::Timeout
                | Error::Transport(_)
                | Error::Status(500..=599)
        )
    }

    fn from_reqwest(err: reqwest::Error) -> Error {
        if err.is_timeout() {
            return Error::Timeout;
        }
        // reqwest errors carry the URL, which never holds credentials (they go in headers); the
        // source chain names the real cause (refused, reset, certificate).
        let err = err.without_url();
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        if let Some(hint) = tls::explain(&text) {
            text.push_str(" (");
            text.push_str(hint);
            text.push(')');
        }
        Error::Transport(text)
    }
}

/// A manifest as the upstream sent it, not yet verified.
#[derive(Debug, Clone)]
pub struct RemoteManifest {
    pub bytes: Bytes,
    pub media_type: String,
    /// The upstream's `Docker-Content-Digest`, if it sent one.
    pub digest: Option<Digest>,
}

/// What a manifest `HEAD` told us.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
}

/// One URL of an upstream and its recent health.
struct Origin {
    base: Url,
    /// Which token realms may see the credentials when this URL challenges us.
    realms: RealmPolicy,
    /// When it last failed (connection, timeout, 5xx); it is skipped for [`FAILED_URL_SKIP`].
    failed_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Origin {
    fn url(&self, path: &str) -> Result<Url, Error> {
        let base = self.base.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/v2/{path}"))
            .map_err(|_| Error::Invalid("bad upstream URL".into()))
    }

    fn recently_failed(&self) -> bool {
        let failed_at = *self
            .failed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failed_at.is_some_and(|at| at.elapsed() < FAILED_URL_SKIP)
    }

    fn set_failed(&self, failed: bool) {
        *self
            .failed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            failed.then(tokio::time::Instant::now);
    }
}

/// One upstream registry.
pub struct Upstream {
    /// The configured name (`docker.io`), used in logs, metrics and the index.
    pub name: String,
    /// The configured URLs, in order of preference.
    origins: Vec<Origin>,
    client: reqwest::Client,
    tokens: TokenCache,
    library_prefix: bool,
    credentials: Option<Arc<credentials::Store>>,
    /// The upstream answered a `Basic` challenge: send the credentials up front from now on
    /// rather than paying a 401 round trip per request.
    basic: AtomicBool,
    has_client_certificate: bool,
    connect_timeout: Duration,
    /// The overall deadline of one exchange (see `UpstreamConfig::request_timeout`).
    request_timeout: Duration,
    /// When the last failed connection was diagnosed, and whether the upstream asked for a
    /// client certificate; probes are rate-limited to one a minute.
    diagnosis: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
    /// Every exchange and token fetch is reported here (timing, status, health, rate limit).
    metrics: Arc<Metrics>,
    /// Held back after a 429 until its `Retry-After` passes.
    backoff: backoff::Backoff,
}

impl Upstream {
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        clock: Arc<crate::clock::Clock>,
    ) -> Result<Upstream, String> {
        install_crypto_provider();
        let mut origins = Vec::new();
        for url in config.url.iter() {
            let base = Url::parse(url).map_err(|err| format!("upstreams.{name}.url: {err}"))?;
            origins.push(Origin {
                realms: RealmPolicy::new(&base, &config.token_realms),
                base,
                failed_at: std::sync::Mutex::new(None),
            });
        }
        if origins.is_empty() {
            return Err(format!("upstreams.{name}.url: no URL"));
        }
        let builder = reqwest::Client::builder()
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout.0)
            .read_timeout(config.read_timeout.0)
            // reqwest drops Authorization when a redirect leaves the host, scheme or port (blob
            // CDNs), so credentials and tokens stay with the upstream.
            .redirect(reqwest::redirect::Policy::limited(5));
        let (builder, has_client_certificate) = tls::configure(builder, name, config)?;
        let client = builder
            .build()
            .map_err(|err| format!("upstreams.{name}: cannot build HTTP client: {err}"))?;
        let credentials = match credentials::Source::from_config(name, config) {
            Some(source) => Some(Arc::new(
                credentials::Store::new(source)
                    .map_err(|err| format!("upstreams.{name}: credentials: {err}"))?,
            )),
            None => None,
        };
        Ok(Upstream {
            name: name.to_owned(),
            origins,
            client,
            tokens: TokenCache::with_clock(clock),
            library_prefix: config.library_prefix(name),
            credentials,
            basic: AtomicBool::new(false),
            has_client_certificate,
            connect_timeout: config.connect_timeout.0,
            request_timeout: config.request_timeout.0,
            diagnosis: std::sync::Mutex::new(None),
            metrics,
            backoff: backoff::Backoff::default(),
        })
    }

    /// Records that the upstream rate-limited us (here, or as another replica of the cluster
    /// relayed it): it is not asked again until `retry_after` seconds have passed.
    pub fn rate_limited(&self, retry_after: Option<u64>) {
        self.backoff.hold(retry_after);
    }

    /// The seconds left before the upstream may be asked again after a 429, if any.
    pub fn backing_off(&self) -> Option<u64> {
        self.backoff.remaining()
    }

    /// Whether requests to this upstream carry configured credentials.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// The repository name as this upstream knows it (`library/` for Docker Hub's one-segment
    /// names).
    pub fn normalize(&self, repo: RepoName) -> RepoName {
        if self.library_prefix {
            repo.with_library_prefix()
        } else {
            repo
        }
    }

    /// Fetches a manifest by tag or digest, refusing anything over [`MAX_MANIFEST_BYTES`].
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<RemoteManifest, Error> {
        let path = format!("{repo}/manifests/{reference}");
        let (body, digest, declared) = self
            .within(async {
                let response = self
                    .send(Method::GET, repo, &path, manifest_headers())
                    .await?;
                let digest = header_digest(response.headers());
                let declared = content_type(response.headers());
                let body = read_capped(response, MAX_MANIFEST_BYTES, "manifest").await?;
                Ok((body, digest, declared))
            })
            .await?;
        let media_type = declared
            .filter(|mt| media_type::is_manifest_type(mt))
            .or_else(|| media_type::sniff(&body))
            .ok_or_else(|| Error::Invalid("response is not a manifest".into()))?;
        Ok(RemoteManifest {
            bytes: body,
            media_type,
            digest,
        })
    }

    /// Asks which digest a tag points to without downloading the manifest (Docker Hub does not
    /// count HEADs against its pull limit).
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<ManifestHead, Error> {
        let path = format!("{repo}/manifests/{reference}");
        let response = self
            .within(self.send(Method::HEAD, repo, &path, manifest_headers()))
            .await?;
        Ok(ManifestHead {
            digest: header_digest(response.headers()),
        })
    }

    /// Starts a blob download at byte `from` (a `Range` request to resume a dropped transfer).
    /// Answers the response with its status checked; the caller streams the body. The deadline
    /// covers the response's headers only: the body is bounded by `read_timeout`.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: u64,
    ) -> Result<reqwest::Response, Error> {
        let path = format!("{repo}/blobs/{digest}");
        let mut headers = HeaderMap::new();
        if from > 0 {
            let range = HeaderValue::from_str(&format!("bytes={from}-")).expect("ascii");
            headers.insert(header::RANGE, range);
        }
        let response = self
            .within(self.send(Method::GET, repo, &path, headers))
            .await?;
        if from > 0 && response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(Error::Invalid(
                "upstream ignored the Range of a resumed download".into(),
            ));
        }
        Ok(response)
    }

    /// The size of a blob, if the upstream has it.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64, Error> {
        let path = format!("{repo}/blobs/{digest}");
        let response = self
            .within(self.send(Method::HEAD, repo, &path, HeaderMap::new()))
            .await?;
        response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Invalid("blob HEAD without Content-Length".into()))
    }

    /// The upstream's tag list, passed through (with `n` and `last` when given).
    pub async fn tags(&self, repo: &RepoName, query: &str) -> Result<Bytes, Error> {
        let path = if query.is_empty() {
            format!("{repo}/tags/list")
        } else {
            format!("{repo}/tags/list?{query}")
        };
        self.within(async {
            let response = self
                .send(Method::GET, repo, &path, HeaderMap::new())
                .await?;
            read_capped(response, MAX_MANIFEST_BYTES, "response").await
        })
        .await
    }

    /// The upstream's referrers of `digest` (an OCI image index), passed through with the
    /// `artifactType` filter when given. An upstream without the referrers API answers 404, and
    /// so do we, which sends OCI 1.1 clients to the tag-schema fallback.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        query: &str,
    ) -> Result<Bytes, Error> {
        let path = if query.is_empty() {
            format!("{repo}/referrers/{digest}")
        } else {
            format!("{repo}/referrers/{digest}?{query}")
        };
        self.within(async {
            let response = self
                .send(Method::GET, repo, &path, HeaderMap::new())
                .await?;
            read_capped(response, MAX_MANIFEST_BYTES, "response").await
        })
        .await
    }

    /// Runs one exchange under the upstream's overall deadline; a deadline that passes is an
    /// [`Error::Timeout`], reported like any failed exchange.
    async fn within<T>(
        &self,
        exchange: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let started = std::time::Instant::now();
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                let error = Error::Timeout;
                self.metrics
                    .upstream_exchange(&self.name, Err(&error), started.elapsed());
                Err(error)
            }
        }
    }

    /// Sends a request with the cached token for the repository's pull scope; on a 401, answers
    /// the challenge once and retries. Connection errors and 5xx are retried (they are GETs and
    /// HEADs, idempotent) after a jittered backoff, [`RETRIES`] times. Statuses other than 2xx
    /// become [`Error`]s.
    async fn send(
        &self,
        method: Method,
        repo: &RepoName,
        path: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        let sent = self.send_once(method, repo, path, headers).await;
        // Any 429 that ends an exchange holds the upstream back, the token realm's included.
        if let Err(Error::TooManyRequests { retry_after }) = &sent {
            self.backoff.hold(*retry_after);
        }
        sent
    }

    async fn send_once(
        &self,
        method: Method,
        repo: &RepoName,
        path: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        // Within a 429's Retry-After the upstream is not asked: the answer is the same 429,
        // with the time that remains.
        if let Some(retry_after) = self.backoff.remaining() {
            self.metrics.upstream_spared(&self.name, "rate_limited");
            return Err(Error::TooManyRequests {
                retry_after: Some(retry_after),
            });
        }
        let scope = format!("repository:{repo}:pull");
        let mut authorization = if self.basic.load(Ordering::Relaxed) {
            self.basic_authorization()
        } else {
            self.tokens.get(&scope).map(|t| format!("Bearer {t}"))
        };
        let mut challenged = false;
        let mut retries = 0;
        loop {
            let (response, origin) = self
                .exchange(&method, path, &headers, authorization.as_deref())
                .await;
            let retry = match &response {
                Err(Error::Transport(_)) => true,
                Ok(response) => response.status().is_server_error(),
                Err(_) => false,
            };
            if retry && retries < RETRIES {
                retries += 1;
                tokio::time::sleep(backoff(retries)).await;
                continue;
            }
            let response = response?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = response
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                match challenge {
                    Some(challenge) if challenge.scheme == "bearer" => {
                        self.tokens.forget(&scope);
                        let token = self.fetch_token(&challenge, &scope, origin).await?;
                        authorization = Some(format!("Bearer {token}"));
                        continue;
                    }
                    Some(challenge) if challenge.scheme == "basic" => {
                        if authorization.is_some() && self.basic.load(Ordering::Relaxed) {
                            // The credentials we sent were refused; a rotated secret is read
                            // again before the one retry.
                            self.refresh_credentials().await;
                        }
                        match self.basic_authorization() {
                            Some(value) => {
                                self.basic.store(true, Ordering::Relaxed);
                                authorization = Some(value);
                                continue;
                            }
                            None => return Err(Error::Unauthorized),
                        }
                    }
                    _ => return Err(Error::Unauthorized),
                }
            }
            return classify(response);
        }
    }

    /// One request, to the first of the upstream's URLs that answers: URLs that failed lately
    /// are tried last, a connection failure, timeout or 5xx moves on to the next URL (the last
    /// URL's answer is returned whatever it is). Answers which URL it came from.
    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        authorization: Option<&str>,
    ) -> (Result<reqwest::Response, Error>, usize) {
        let mut order: Vec<usize> = (0..self.origins.len())
            .filter(|i| !self.origins[*i].recently_failed())
            .collect();
        order.extend((0..self.origins.len()).filter(|i| self.origins[*i].recently_failed()));
        let mut last = (Err(Error::Transport("no upstream URL".into())), 0);
        for (n, index) in order.iter().copied().enumerate() {
            let origin = &self.origins[index];
            let url = match origin.url(path) {
                Ok(url) => url,
                Err(err) => return (Err(err), index),
            };
            let mut request = self
                .client
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(value) = authorization {
                request = request.header(header::AUTHORIZATION, value);
            }
            let started = std::time::Instant::now();
            let response = match request.send().await.map_err(Error::from_reqwest) {
                Err(Error::Transport(text)) => {
                    Err(Error::Transport(self.diagnose(&origin.base, text).await))
                }
                other => other,
            };
            self.observe(&response, started);
            let failed = match &response {
                Ok(response) => response.status().is_server_error(),
                Err(err) => matches!(err, Error::Transport(_) | Error::Timeout),
            };
            origin.set_failed(failed);
            if failed && n + 1 < order.len() {
                tracing::info!(upstream = %self.name, url = %origin.base, "upstream URL failed, trying the next one");
                last = (response, index);
                continue;
            }
            return (response, index);
        }
        last
    }

    /// Reports one exchange (status, timing, rate limit, health) to the metrics.
    fn observe(&self, response: &Result<reqwest::Response, Error>, started: std::time::Instant) {
        let result = match response {
            Ok(response) => Ok((response.status(), rate_limit(response.headers()))),
            Err(error) => Err(error as &dyn std::fmt::Display),
        };
        self.metrics
            .upstream_exchange(&self.name, result, started.elapsed());
    }

    /// Gets a bearer token from the challenge's realm for `scope` and caches it; every attempt
    /// is counted, and a failure becomes the upstream's last error on the status page.
    async fn fetch_token(
        &self,
        challenge: &Challenge,
        scope: &str,
        origin: usize,
    ) -> Result<String, Error> {
        let result = self.request_token(challenge, scope, origin).await;
        let error = result.as_ref().err().map(|e| e as &dyn std::fmt::Display);
        self.metrics.token_fetch(&self.name, error);
        result
    }

    /// Adds a hint to a connection failure whose text does not say why: an https upstream
    /// that wants a client certificate we do not have often shows up only as a closed
    /// connection.
    async fn diagnose(&self, base: &Url, text: String) -> String {
        if base.scheme() != "https" || self.has_client_certificate || tls::explain(&text).is_some()
        {
            return text;
        }
        let cached = *self
            .diagnosis
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let asked = match cached {
            Some((at, asked)) if at.elapsed() < Duration::from_secs(60) => asked,
            _ => {
                let asked = tls::asks_for_client_certificate(base, self.connect_timeout).await;
                *self
                    .diagnosis
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((std::time::Instant::now(), asked));
                asked
            }
        };
        if asked {
            format!("{text} (the upstream asks for a client certificate and none is configured: set client_cert and client_key, or certs_dir)")
        } else {
            text
        }
    }

    /// The `Authorization: Basic` value, if the upstream has a user and password.
    fn basic_authorization(&self) -> Option<String> {
        self.credentials.as_ref()?.get().basic_header()
    }

    async fn refresh_credentials(&self) {
        if let Some(store) = &self.credentials {
            store.refresh(&self.name).await;
        }
    }

    /// Asks the challenge's realm for a token. The credentials go along only if the realm
    /// passes the [`RealmPolicy`] of the URL that challenged us; otherwise the token is
    /// requested anonymously, which is enough for public content and leaks nothing.
    async fn request_token(
        &self,
        challenge: &Challenge,
        scope: &str,
        origin: usize,
    ) -> Result<String, Error> {
        let realm = challenge
            .param("realm")
            .ok_or_else(|| Error::Invalid("bearer challenge without realm".into()))?;
        let mut url =
            Url::parse(realm).map_err(|_| Error::Invalid("bearer realm is not a URL".into()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Invalid("bearer realm is not an http(s) URL".into()));
        }
        let credentials = match &self.credentials {
            Some(store) if self.origins[origin].realms.allows(&url) => Some(store.get()),
            Some(_) => {
                tracing::warn!(
                    upstream = %self.name,
                    realm_host = url.host_str().unwrap_or_default(),
                    "token realm is neither on the upstream's domain nor in token_realms: requesting an anonymous token"
                );
                None
            }
            None => None,
        };
        let service = challenge.param("service");
        let request = match &credentials {
            // OAuth2 refresh tokens are exchanged by POST, as Docker does.
            Some(Credentials::IdentityToken(token)) => {
                let mut form = form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", token.expose())
                    .append_pair("client_id", "regmirror")
                    .append_pair("scope", scope);
                if let Some(service) = service {
                    form.append_pair("service", service);
                }
                self.client
                    .post(url)
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form.finish())
            }
            _ => {
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", scope);
                }
                let request = self.client.get(url);
                match credentials.as_ref().and_then(Credentials::basic_header) {
                    Some(value) => request.header(header::AUTHORIZATION, value),
                    None => request,
                }
            }
        };
        let response = request.send().await.map_err(Error::from_reqwest)?;
        let response = match classify(response) {
            Err(Error::NotFound) => return Err(Error::Unauthorized),
            Err(Error::Unauthorized) if credentials.is_some() => {
                // The realm refused our credentials: a rotated secret is picked up next time.
                self.refresh_credentials().await;
                return Err(Error::Unauthorized);
            }
            other => other?,
        };
        let body = read_capped(response, MAX_TOKEN_BYTES, "token response").await?;
        let (token, lifetime) = serde_json::from_slice::<auth::TokenResponse>(&body)
            .ok()
            .and_then(auth::TokenResponse::into_token)
            .ok_or_else(|| Error::Invalid("token endpoint answered without a token".into()))?;
        self.tokens.put(scope, token.clone(), lifetime);
        Ok(token)
    }
}

/// Reads a body held in memory (manifest, tag list, referrers index, token) with a cap on what
/// is received and, for a gzip-encoded body, on what it decodes to (a few KiB of gzip can
/// expand to gigabytes), so a hostile upstream cannot make us buffer without bound. Other
/// content codings are refused: we never ask for them.
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
    what: &str,
) -> Result<Bytes, Error> {
    let too_large = || Error::Invalid(format!("{what} larger than {cap} bytes"));
    let gzip = match response
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or_default().trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("" | "identity") => false,
        Some("gzip" | "x-gzip") => true,
        Some(_) => {
            return Err(Error::Invalid(format!(
                "{what} with an unsupported Content-Encoding"
            )))
        }
    };
    if response
        .content_length()
        .is_some_and(|length| length > cap as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Error::from_reqwest)? {
        if body.len().saturating_add(chunk.len()) > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if !gzip {
        return Ok(body.into());
    }
    // At most 4 MiB each way: decoding in place is cheaper than a hop to the blocking pool.
    let mut decoded = Vec::new();
    flate2::read::MultiGzDecoder::new(body.as_slice())
        .take(cap as u64 + 1)
        .read_to_end(&mut decoded)
        .map_err(|_| Error::Invalid(format!("{what}: undecodable gzip body")))?;
    if decoded.len() > cap {
        return Err(too_large());
    }
    Ok(decoded.into())
}

/// The backoff before retry `n` (1-based): doubling from [`BACKOFF`], with full jitter over its
/// upper half so that many clients retrying at once do not retry in step.
fn backoff(n: u32) -> Duration {
    use std::hash::BuildHasher;
    let ceiling = BACKOFF.saturating_mul(1 << n.min(8));
    let random = std::collections::hash_map::RandomState::new().hash_one(n);
    let fraction = 0.5 + (random % 1000) as f64 / 2000.0;
    ceiling.mul_f64(fraction)
}

/// The upstream's pull allowance from Docker Hub's `ratelimit-remaining` and `ratelimit-limit`.
pub fn rate_limit(headers: &HeaderMap) -> RateLimit {
    RateLimit {
        remaining: ratelimit_header(headers, "ratelimit-remaining"),
        limit: ratelimit_header(headers, "ratelimit-limit"),
    }
}

/// The number at the start of a `ratelimit-*` header: Docker Hub sends `100;w=21600`.
fn ratelimit_header(headers: &HeaderMap, name: &str) -> Option<u64> {
    let value = headers.get(name)?.to_str().ok()?;
    value.split(';').next()?.trim().parse().ok()
}

/// Turns non-success statuses into errors.
fn classify(response: reqwest::Response) -> Result<reqwest::Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(match status {
        StatusCode::NOT_FOUND => Error::NotFound,
        StatusCode::UNAUTHORIZED => Error::Unauthorized,
        StatusCode::FORBIDDEN => Error::Denied,
        StatusCode::TOO_MANY_REQUESTS => Error::TooManyRequests {
            retry_after: response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|seconds| seconds.min(MAX_RETRY_AFTER_SECONDS)),
        },
        other => Error::Status(other.as_u16()),
    })
}

fn manifest_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static(media_type::MANIFEST_ACCEPT),
    );
    headers
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next()?.trim().to_owned())
}

/// rustls needs one process-wide crypto provider; we use ring.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The configured upstreams, found by every name clients may use for them.
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
    default: Arc<Upstream>,
    /// The process's clock, shared with the cache.
    clock: Arc<crate::clock::Clock>,
}

impl Upstreams {
    pub fn from_config(config: &Config, metrics: &Arc<Metrics>) -> Result<Upstreams, String> {
        let mut by_name = HashMap::new();
        // Every upstream's problem is reported at once (a missing secret, an unreadable CA).
        let mut problems = Vec::new();
        let clock = Arc::new(crate::clock::Clock::default());
        for (name, upstream_config) in &config.upstreams {
            metrics.register_upstream(name);
            let upstream =
                match Upstream::new(name, upstream_config, metrics.clone(), clock.clone()) {
                    Ok(upstream) => Arc::new(upstream),
                    Err(problem) => {
                        problems.push(problem);
                        continue;
                    }
                };
            for alias in upstream_config.all_names(name) {
                by_name.insert(alias.to_ascii_lowercase(), upstream.clone());
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let default = by_name
            .get(&config.default_upstream.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| {
                format!(
                    "default_upstream {} is not configured",
                    config.default_upstream
                )
            })?;
        Ok(Upstreams {
            by_name,
            default,
            clock,
        })
    }

    /// The process's clock: token lifetimes here, pull times and tag ages in the cache.
    pub fn clock(&self) -> &Arc<crate::clock::Clock> {
        &self.clock
    }

    /// The upstream a client means by `name` (from `?ns=` or a path prefix). Closed world: a
    /// name we were not configured with is never dialled.
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(&name.to_ascii_lowercase())
    }

    pub fn default_upstream(&self) -> &Arc<Upstream> {
        &self.default
    }

    /// Each upstream once.
    pub fn all(&self) -> Vec<Arc<Upstream>> {
        let mut all: Vec<_> = self.by_name.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.dedup_by(|a, b| Arc::ptr_eq(a, b));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_headers() {
        let cases = [
            ("100;w=21600", Some(100)),
            ("0;w=21600", Some(0)),
            ("76", Some(76)),
            (" 12 ; w=60", Some(12)),
            ("-1;w=60", None),
            ("lots", None),
        ];
        for (value, want) in cases {
            let mut headers = HeaderMap::new();
            headers.insert("ratelimit-remaining", value.parse().unwrap());
            assert_eq!(rate_limit(&headers).remaining, want, "{value}");
        }
        assert_eq!(rate_limit(&HeaderMap::new()), RateLimit::default());
    }

    #[test]
    fn retry_after_is_clamped() {
        let cases = [
            ("18446744073709551615", Some(MAX_RETRY_AFTER_SECONDS)),
            ("120", Some(120)),
            ("Wed, 21 Oct 2015 07:28:00 GMT", None),
            ("-5", None),
        ];
        for (value, want) in cases {
            let response = axum::http::Response::builder()
                .status(429)
                .header(header::RETRY_AFTER, value)
                .body(Vec::<u8>::new())
                .unwrap();
            let got = classify(reqwest::Response::from(response)).unwrap_err();
            assert_eq!(got, Error::TooManyRequests { retry_after: want }, "{value}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        for n in 1..=RETRIES + 2 {
            let ceiling = BACKOFF * (1 << n);
            let got = backoff(n);
            assert!(got >= ceiling / 2 && got <= ceiling, "{n}: {got:?}");
        }
        assert!(backoff(u32::MAX) <= BACKOFF * 256);
    }
}
