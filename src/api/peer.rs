//! The peer channel's server side: what one replica of a cluster answers another, on its own
//! listener (`cluster.listen`), never on the public port.
//!
//! Every request must carry a valid signature of the cluster's shared secret (checked by
//! [`crate::cluster::Cluster::verify`]) before anything else is looked at. Then only three
//! things are answered: the health probe (our instance id, which is how a replica finds
//! itself in the member list), a blob by digest and a manifest by digest or tag, each for a
//! configured upstream and a valid repository. Blobs and manifests are served from this
//! replica's flights, disk or the bucket, or fetched upstream as the owner's single flight;
//! the request is never forwarded again. The channel is not a proxy: there is no way to make
//! it dial anything but a configured upstream, and an unsigned or malformed request dials
//! nothing at all.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

use super::{blob_response, built, AppState};
use crate::cluster::Cluster;
use crate::error::{ApiError, ErrorCode};
use crate::oci::{Digest, Reference, RepoName};

#[derive(Clone)]
struct PeerState {
    app: AppState,
    cluster: Arc<Cluster>,
}

/// The peer channel's router.
pub fn router(app: AppState, cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/_regmirror/peer/{*rest}", any(peer))
        .fallback(|| async { refuse(ErrorCode::UnknownEndpoint, "not a peer request") })
        .with_state(PeerState { app, cluster })
}

fn refuse(code: ErrorCode, message: &str) -> Response {
    ApiError::new(code).with_message(message).into_response()
}

async fn peer(State(state): State<PeerState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_default();
    let Some(nonce) = state
        .cluster
        .verify(&parts.headers, parts.method.as_str(), target)
    else {
        return refuse(
            ErrorCode::Unauthorized,
            "peer request without a valid signature",
        );
    };
    // Every answer to a signed request is sealed for it, errors included: the asking replica
    // believes nothing else (a forged 404 or tag would otherwise pass for ours).
    let mut response = answer(&state, &parts).await;
    state.cluster.seal(&nonce, &mut response);
    response
}

async fn answer(state: &PeerState, parts: &axum::http::request::Parts) -> Response {
    if parts.method != axum::http::Method::GET {
        return refuse(ErrorCode::Unsupported, "the peer channel only reads");
    }
    let path = parts.uri.path();
    let rest = path.strip_prefix("/_regmirror/peer/").unwrap_or_default();
    if rest == "health" {
        let id = state.cluster.instance_id().to_owned();
        return ([(crate::cluster::INSTANCE_HEADER, id.clone())], id).into_response();
    }
    let (kind, reference) = match rest.split_once('/') {
        Some((kind @ ("blobs" | "sizes" | "manifests"), reference)) => (kind, reference),
        _ => return refuse(ErrorCode::UnknownEndpoint, "not a peer request"),
    };
    let query = parts.uri.query().unwrap_or_default();
    let (mut upstream, mut repository) = (None, None);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "upstream" => upstream = Some(value.into_owned()),
            "repository" => repository = Some(value.into_owned()),
            _ => return refuse(ErrorCode::UnknownEndpoint, "unknown parameter"),
        }
    }
    let Some(upstream) = upstream
        .as_deref()
        .and_then(|name| state.app.cache.upstreams().get(name))
        .cloned()
    else {
        return refuse(ErrorCode::NameUnknown, "not a configured upstream");
    };
    let Some(repo) = repository.and_then(|r| r.parse::<RepoName>().ok()) else {
        return refuse(ErrorCode::NameInvalid, "invalid repository name");
    };
    let app = &state.app;
    let answer = if kind == "sizes" {
        // A blob's size, for a replica answering a HEAD: the owner's flight of HEADs (or its
        // store, or the bucket) answers it, and its upstream's errors are final.
        let Ok(digest) = reference.parse::<Digest>() else {
            return refuse(ErrorCode::DigestInvalid, "invalid digest");
        };
        return match app.cache.peer_blob_size(&upstream, &repo, &digest).await {
            Ok((size, _)) => ([(crate::cache::SIZE_HEADER, size.to_string())], ()).into_response(),
            Err(err) => relay(err),
        };
    } else if kind == "blobs" {
        let Ok(digest) = reference.parse::<Digest>() else {
            return refuse(ErrorCode::DigestInvalid, "invalid digest");
        };
        match app.cache.peer_blob(&upstream, &repo, &digest).await {
            // No sendfile on this listener: peers are few and the bytes often still arriving.
            Ok(blob) => blob_response(app, &digest, blob, &parts.headers, None),
            Err(err) => return relay(err),
        }
    } else {
        let Ok(reference) = reference.parse::<Reference>() else {
            return refuse(ErrorCode::ManifestUnknown, "invalid reference");
        };
        match app.cache.peer_manifest(&upstream, &repo, &reference).await {
            Ok((manifest, outcome)) => {
                manifest_response(app, &upstream, &repo, &reference, manifest, outcome).await
            }
            Err(err) => return relay(err),
        }
    };
    match answer {
        Ok((response, _)) => response,
        Err((error, _)) => error.into_response(),
    }
}

/// A failure of the cache as the asking replica gets it: the OCI error, marked final when
/// it is the upstream's own answer (404, 429 with its Retry-After, 401, 403), so the peer
/// relays it instead of asking the upstream itself.
fn relay(err: crate::cache::Error) -> Response {
    let authoritative = err.is_authoritative();
    let mut response = ApiError::from(err).into_response();
    if authoritative {
        response.headers_mut().insert(
            crate::cluster::FINAL_HEADER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    response
}

async fn manifest_response(
    app: &AppState,
    upstream: &Arc<crate::upstream::Upstream>,
    repo: &RepoName,
    reference: &Reference,
    manifest: crate::cache::Manifest,
    outcome: crate::outcome::Outcome,
) -> super::Answer {
    if !crate::oci::media_type::is_valid_header_value(&manifest.media_type) {
        return Err((ApiError::new(ErrorCode::BadGateway), Some(outcome)));
    }
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, &manifest.media_type)
        .header(header::CONTENT_LENGTH, manifest.bytes.len())
        .header("docker-content-digest", manifest.digest.as_str())
        .header("x-regmirror-cache", outcome.as_str());
    if let Reference::Tag(tag) = reference {
        // When the upstream last confirmed the tag: a stale answer stays stale on the peer.
        if let Some(confirmed) = app.cache.tag_confirmed(upstream, repo, tag.as_str()).await {
            builder = builder.header(crate::cache::CONFIRMED_HEADER, confirmed);
        }
    }
    Ok((built(builder, Body::from(manifest.bytes))?, outcome))
}
