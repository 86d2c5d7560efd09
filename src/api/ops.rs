//! Operator endpoints: `/metrics`, `/healthz`, `/readyz` and `/v2/_catalog`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::{ApiError, ErrorCode};

/// Prometheus text format; gauges that mirror the store are refreshed on scrape.
pub async fn metrics(State(state): State<AppState>) -> Response {
    if !state.metrics_enabled {
        return StatusCode::NOT_FOUND.into_response();
    }
    state
        .metrics
        .cache_size
        .set(state.cache.used_bytes() as i64);
    state
        .metrics
        .cache_blobs
        .set(state.cache.blob_count() as i64);
    state.metrics.cache_limit.set(state.max_size as i64);
    state
        .metrics
        .downloads_in_flight
        .set(state.cache.downloads_in_flight() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The process is alive.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready to serve: the store takes writes, the index answers and we are not shutting down.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutting_down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if state.cache.ready().await {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store not ready\n").into_response()
    }
}

/// `/v2/_catalog`: the repositories we hold, as `<upstream>/<repository>`, with `n`/`last`
/// pagination.
pub async fn catalog(state: &AppState, query: &str) -> Response {
    let n = match super::pagination(query) {
        Ok(n) => n,
        Err(error) => return error.into_response(),
    };
    let last: Option<String> = form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "last")
        .map(|(_, value)| value.into_owned());
    let repositories = match state.cache.repositories().await {
        Ok(repositories) => repositories,
        Err(error) => {
            tracing::error!(%error, "catalog listing failed");
            return ApiError::new(ErrorCode::Unknown).into_response();
        }
    };
    let names = repositories
        .into_iter()
        .map(|(upstream, repo)| format!("{upstream}/{repo}"))
        .filter(|name| last.as_ref().is_none_or(|last| name > last));
    let names: Vec<String> = match n {
        Some(n) => names.take(n).collect(),
        None => names.collect(),
    };
    let body = serde_json::json!({ "repositories": names }).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
