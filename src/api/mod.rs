//! The HTTP face of regmirror: the OCI distribution read API under `/v2/`, plus `/metrics`,
//! `/healthz`, `/readyz` and the status page at `/`.
//!
//! Handlers parse the request into an [`Endpoint`], ask the cache, and turn its answer into
//! headers and a streamed body. They know nothing of storage or upstream protocols; errors
//! become OCI error responses through `error.rs`.

pub mod auth;
mod endpoint;
mod ops;
pub mod peer;
pub mod seen;
mod status;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use futures_util::StreamExt;
use tracing::{info, Instrument};

pub use endpoint::{Endpoint, Route, Target};

use crate::cache::{BlobBody, Cache, Outcome};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::server::{sendfile::Sendfile, Connection};

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
    pub metrics_enabled: bool,
    pub max_size: u64,
    /// Who may use the mirror (`auth.htpasswd`); `None` lets everyone in.
    pub access: Option<Arc<auth::AccessControl>>,
    /// Recent requests, for `regmirror doctor` (`/_regmirror/doctor/seen`).
    pub seen: Arc<seen::SeenLog>,
}

/// The router: testable with `oneshot`, served by [`crate::run`].
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v2", any(v2_root))
        .route("/v2/", any(v2_root))
        .route("/v2/{*rest}", any(registry))
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/", get(status::page))
        .route("/status", get(status::page))
        .route(seen::PATH, get(seen::handler))
        .layer(middleware::from_fn_with_state(state.clone(), auth::require))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// With `metrics.listen`: serves `/metrics` alone on `listener` until `shutdown`, and answers
/// the state for the main router, which then no longer serves it.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> AppState {
    let router = Router::new()
        .route("/metrics", get(ops::metrics))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "metrics listener failed");
        }
    });
    AppState {
        metrics_enabled: false,
        ..state
    }
}

/// Facts a handler leaves on its response for the access log and metrics.
#[derive(Clone, Copy)]
struct Served {
    route: Route,
    outcome: Option<Outcome>,
}

/// Facts about the upstream, left on the response for the access log.
#[derive(Clone)]
struct ServedUpstream(Arc<str>);

fn mark(mut response: Response, route: Route, outcome: Option<Outcome>) -> Response {
    response.extensions_mut().insert(Served { route, outcome });
    response
}

/// One log line and one metrics sample per request, and the headers every response carries.
async fn access_log(State(state): State<AppState>, request: Request, next: Next) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let started = Instant::now();
    let id = format!(
        "{:x}-{}",
        process_nonce(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );
    let method = request.method().clone();
    let peer = request
        .extensions()
        .get::<ConnectInfo<Connection>>()
        .map(|c| c.peer);
    // Kept only while `regmirror doctor` is watching: no allocation per request otherwise.
    let seen = state.seen.watching().then(|| {
        let user_agent = request
            .headers()
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        (request.uri().clone(), user_agent)
    });
    let span = tracing::info_span!("request", id = %id);
    let mut response = next.run(request).instrument(span).await;
    let elapsed = started.elapsed().as_secs_f64();
    let served = response.extensions().get::<Served>().copied();
    let route = served.map_or_else(
        || match response.status() {
            StatusCode::NOT_FOUND => "not_found",
            _ => "other",
        },
        |s| s.route.as_str(),
    );
    let outcome = served.and_then(|s| s.outcome).map_or("-", Outcome::as_str);
    let upstream = response
        .extensions()
        .get::<ServedUpstream>()
        .map(|u| u.0.clone());
    // Handlers that build their body in memory leave Content-Length to hyper; the body knows.
    let body_size = http_body::Body::size_hint(response.body()).exact();
    let headers = response.headers_mut();
    headers.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert("x-request-id", value);
    }
    if outcome != "-" {
        headers.insert("x-regmirror-cache", HeaderValue::from_static(outcome));
    }
    let bytes = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or(body_size)
        .unwrap_or(0);
    let status = response.status().as_u16();
    if let Some((uri, user_agent)) = seen {
        state.seen.record(
            peer.map(|p| p.ip()),
            method.as_str(),
            uri.path(),
            uri.query(),
            &user_agent,
            status,
        );
    }
    state
        .metrics
        .http_request(method_label(&method), route, status, elapsed);
    info!(
        request_id = %id,
        peer = peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        method = %method,
        route,
        status,
        bytes,
        duration_ms = (elapsed * 1000.0).round() as u64,
        cache = outcome,
        upstream = upstream.as_deref().unwrap_or("-"),
        "request"
    );
    response
}

/// The method as a metrics label: the standard ones by name, anything a client made up as
/// `other`, so clients cannot create series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// A per-process value that keeps request ids unique across restarts.
fn process_nonce() -> u64 {
    use std::sync::OnceLock;
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (now.as_nanos() as u64 ^ u64::from(std::process::id())) & 0xffff_ffff
    })
}

/// `GET /v2/`: the API version check every client starts with.
async fn v2_root(method: Method) -> Response {
    let response = match method {
        Method::GET | Method::HEAD => {
            ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
        }
        _ => ApiError::new(ErrorCode::Unsupported).into_response(),
    };
    mark(response, Route::Ping, None)
}

/// Every `/v2/<name>/...` request.
async fn registry(
    State(state): State<AppState>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Zerocopy(sendfile): Zerocopy,
) -> Response {
    let rest = uri.path().strip_prefix("/v2/").unwrap_or_default();
    let query = uri.query().unwrap_or("");
    if rest == "_catalog" {
        let response = match method {
            Method::GET | Method::HEAD => ops::catalog(&state, query).await,
            _ => ApiError::new(ErrorCode::Unsupported).into_response(),
        };
        return mark(response, Route::Catalog, None);
    }
    let (raw_name, target) = match endpoint::split(rest) {
        Ok(split) => split,
        Err((route, error)) => return mark(error.into_response(), route, None),
    };
    let route = target.route();
    let ns = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned());
    let endpoint = match endpoint::resolve(state.cache.upstreams(), raw_name, ns.as_deref(), target)
    {
        Ok(endpoint) => endpoint,
        Err(error) => return mark(error.into_response(), route, None),
    };
    let upstream_name = ServedUpstream(Arc::from(endpoint.upstream.name.as_str()));
    let head = method == Method::HEAD;
    let result = match (&method, &endpoint.target) {
        (&Method::GET | &Method::HEAD, Target::Manifest(_)) => {
            manifest(&state, &endpoint, head).await
        }
        (&Method::GET | &Method::HEAD, Target::Blob(_)) => {
            blob(&state, &endpoint, &headers, head, sendfile).await
        }
        (&Method::GET, Target::Tags) => tags(&state, &endpoint, query).await,
        (&Method::GET | &Method::HEAD, Target::Referrers(_)) => {
            referrers(&state, &endpoint, query, head).await
        }
        // A mirror is read-only: pushes and deletes belong to the upstream.
        _ => Err((
            ApiError::new(ErrorCode::Unsupported)
                .with_message("this registry is a read-only mirror"),
            None,
        )),
    };
    if let (Ok((_, outcome)), Target::Manifest(_) | Target::Blob(_)) = (&result, &endpoint.target) {
        // For the status page's busiest repositories; never a metrics label.
        let (upstream, repo) = (&endpoint.upstream.name, endpoint.repo.as_str());
        state.metrics.repository_request(upstream, repo, *outcome);
    }
    let mut response = match result {
        Ok((response, outcome)) => mark(response, route, Some(outcome)),
        Err((error, outcome)) => mark(error.into_response(), route, outcome),
    };
    response.extensions_mut().insert(upstream_name);
    // distribution-spec "Registry Proxying": say which namespace answered. Only an `ns` that
    // resolved to a configured upstream gets here, so the value is one of a closed set.
    if let Some(value) = ns.as_deref().and_then(|ns| HeaderValue::from_str(ns).ok()) {
        response.headers_mut().insert("oci-namespace", value);
    }
    response
}

/// The connection's sendfile handle, for HTTP/1 requests on a plain connection (HTTP/2 copies
/// frames into its own buffers, so it must never be handed placeholder frames).
struct Zerocopy(Option<Sendfile>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Zerocopy {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Zerocopy, Self::Rejection> {
        let http1 = matches!(parts.version, Version::HTTP_10 | Version::HTTP_11);
        let connection = parts.extensions.get::<ConnectInfo<Connection>>();
        Ok(Zerocopy(
            connection
                .filter(|_| http1)
                .and_then(|c| c.sendfile.clone()),
        ))
    }
}

type Answer = Result<(Response, Outcome), (ApiError, Option<Outcome>)>;

fn failed(error: crate::cache::Error) -> (ApiError, Option<Outcome>) {
    (ApiError::from(error), None)
}

async fn manifest(state: &AppState, endpoint: &Endpoint, head: bool) -> Answer {
    let Target::Manifest(reference) = &endpoint.target else {
        unreachable!("dispatched on Target::Manifest")
    };
    let (manifest, outcome) = state
        .cache
        .manifest(&endpoint.upstream, &endpoint.repo, reference)
        .await
        .map_err(failed)?;
    // The media type comes from the upstream (a header or the manifest's body): a value that
    // cannot be a header is the upstream's fault, answered as such, never a panic.
    if !crate::oci::media_type::is_valid_header_value(&manifest.media_type) {
        tracing::warn!(digest = %manifest.digest, media_type = ?manifest.media_type, "manifest media type cannot be sent as Content-Type");
        return Err((
            ApiError::new(ErrorCode::BadGateway)
                .with_message("the upstream's manifest has an invalid media type"),
            Some(outcome),
        ));
    }
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, &manifest.media_type)
        .header(header::CONTENT_LENGTH, manifest.bytes.len())
        .header("docker-content-digest", manifest.digest.as_str())
        .header(header::ETAG, format!("\"{}\"", manifest.digest));
    if outcome == Outcome::Stale {
        builder = builder.header(
            header::WARNING,
            "110 - \"Response is stale: upstream unavailable\"",
        );
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(manifest.bytes)
    };
    Ok((built(builder, body)?, outcome))
}

async fn blob(
    state: &AppState,
    endpoint: &Endpoint,
    headers: &HeaderMap,
    head: bool,
    sendfile: Option<Sendfile>,
) -> Answer {
    let Target::Blob(digest) = &endpoint.target else {
        unreachable!("dispatched on Target::Blob")
    };
    if head {
        let (size, outcome) = state
            .cache
            .blob_size(&endpoint.upstream, &endpoint.repo, digest)
            .await
            .map_err(failed)?;
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size)
            .header(header::ACCEPT_RANGES, "bytes")
            .header("docker-content-digest", digest.as_str());
        return Ok((built(response, Body::empty())?, outcome));
    }
    let blob = state
        .cache
        .blob(&endpoint.upstream, &endpoint.repo, digest)
        .await
        .map_err(failed)?;
    blob_response(state, digest, blob, headers, sendfile)
}

/// A blob's bytes (a range of them if asked for), sent with sendfile when it is a stored file
/// on a connection that can take it.
fn blob_response(
    state: &AppState,
    digest: &crate::oci::Digest,
    blob: crate::cache::Blob,
    headers: &HeaderMap,
    sendfile: Option<Sendfile>,
) -> Answer {
    let (size, outcome) = (blob.size, blob.outcome);
    if let BlobBody::Redirect(location) = &blob.body {
        // A presigned bucket URL: the bytes go from the bucket to the client.
        let response = Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, location.as_str())
            .header("docker-content-digest", digest.as_str());
        return Ok((built(response, Body::empty())?, outcome));
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(value) => match parse_range(value, size) {
            RangeRequest::Satisfiable(start, end) => Some((start, end)),
            RangeRequest::Ignored => None,
            RangeRequest::Unsatisfiable => {
                let error = ApiError::new(ErrorCode::RangeInvalid)
                    .with_message(format!("range not satisfiable for a blob of {size} bytes"));
                let mut response = error.into_response();
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, value);
                }
                return Ok((response, outcome));
            }
        },
    };
    let (start, end) = range.unwrap_or((0, size));
    let source = if outcome == Outcome::Hit {
        "cache"
    } else {
        "upstream"
    };
    let metrics = state.metrics.clone();
    // A stored blob on a plain HTTP/1 connection goes out with sendfile, without being read.
    let stream = match (sendfile, blob.body) {
        // regmirror_sendfile_bytes_total is counted by the connection, as sendfile(2) returns.
        (Some(sendfile), BlobBody::Stored(file, pin)) => {
            Box::pin(sendfile.stream(file, start, end, pin))
        }
        (_, body) => body.stream(start, end),
    };
    let stream = stream.inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            metrics.served_bytes(source, chunk.len() as u64);
        }
    });
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest.as_str())
        .header(header::ETAG, format!("\"{digest}\""));
    if range.is_some() {
        builder = builder.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    Ok((built(builder, Body::from_stream(stream))?, outcome))
}

async fn referrers(state: &AppState, endpoint: &Endpoint, query: &str, head: bool) -> Answer {
    let Target::Referrers(digest) = &endpoint.target else {
        unreachable!("dispatched on Target::Referrers")
    };
    // The spec's only filter; anything else stays here.
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k == "artifactType"))
        .finish();
    let (body, outcome) = state
        .cache
        .referrers(&endpoint.upstream, &endpoint.repo, digest, &query)
        .await
        .map_err(failed)?;
    let response = Response::builder()
        .header(header::CONTENT_TYPE, crate::oci::media_type::OCI_INDEX)
        .header(header::CONTENT_LENGTH, body.len());
    let body = if head {
        Body::empty()
    } else {
        Body::from(body)
    };
    Ok((built(response, body)?, outcome))
}

async fn tags(state: &AppState, endpoint: &Endpoint, query: &str) -> Answer {
    if let Err(error) = pagination(query) {
        return Err((error, None));
    }
    // Pass through only the pagination parameters the spec defines.
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k == "n" || k == "last"),
        )
        .finish();
    let (body, outcome) = state
        .cache
        .tags(&endpoint.upstream, &endpoint.repo, &query)
        .await
        .map_err(failed)?;
    let response = Response::builder().header(header::CONTENT_TYPE, "application/json");
    Ok((built(response, Body::from(body))?, outcome))
}

/// A response from its builder; a header the builder refused (which only data from the
/// network could cause) is logged and answered as an internal error rather than a panic.
fn built(
    builder: axum::http::response::Builder,
    body: Body,
) -> Result<Response, (ApiError, Option<Outcome>)> {
    builder.body(body).map_err(|error| {
        tracing::error!(%error, "response headers refused");
        (ApiError::new(ErrorCode::Unknown), None)
    })
}

/// The `n` of a paginated listing must be a number when present.
pub(crate) fn pagination(query: &str) -> Result<Option<usize>, ApiError> {
    let mut n = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == "n" {
            match value.parse::<usize>() {
                Ok(value) => n = Some(value),
                Err(_) => {
                    return Err(ApiError::new(ErrorCode::PaginationNumberInvalid)
                        .with_message("n must be a non-negative integer"))
                }
            }
        }
    }
    Ok(n)
}

/// A parsed `Range` header.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Bytes `start..end` (end exclusive).
    Satisfiable(u64, u64),
    /// Not a single byte range we understand: serve the whole blob, as RFC 9110 allows.
    Ignored,
    Unsatisfiable,
}

fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignored;
    };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignored;
    };
    // Digits only: `parse::<u64>` alone would take `+1`.
    let parse = |s: &str| {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok()
    };
    match (first.trim().is_empty(), parse(first), parse(last)) {
        // `bytes=-N`: the last N bytes.
        (true, _, Some(suffix)) if suffix > 0 => {
            if size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Satisfiable(size.saturating_sub(suffix), size)
            }
        }
        (false, Some(start), None) if last.trim().is_empty() => {
            if start < size {
                RangeRequest::Satisfiable(start, size)
            } else {
                RangeRequest::Unsatisfiable
            }
        }
        (false, Some(start), Some(end)) if start <= end => {
            if start < size {
                RangeRequest::Satisfiable(start, end.min(size - 1) + 1)
            } else {
                RangeRequest::Unsatisfiable
            }
        }
        _ => RangeRequest::Ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        let cases = [
            ("bytes=0-9", 100, Satisfiable(0, 10)),
            ("bytes=90-", 100, Satisfiable(90, 100)),
            ("bytes=90-200", 100, Satisfiable(90, 100)),
            ("bytes=-10", 100, Satisfiable(90, 100)),
            ("bytes=-200", 100, Satisfiable(0, 100)),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=100-150", 100, Unsatisfiable),
            ("bytes=5-2", 100, Ignored),
            ("bytes=0-1,5-6", 100, Ignored),
            ("items=0-1", 100, Ignored),
            ("bytes=x-y", 100, Ignored),
            ("bytes=-0", 100, Ignored),
            ("bytes=+1-2", 100, Ignored),
            ("bytes=1-+2", 100, Ignored),
            ("bytes=-+5", 100, Ignored),
            ("bytes= 1 - 2", 100, Satisfiable(1, 3)),
        ];
        for (header, size, want) in cases {
            assert_eq!(parse_range(header, size), want, "{header}");
        }
    }
}
