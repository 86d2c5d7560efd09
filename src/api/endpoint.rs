//! Parsing a `/v2/...` request into an [`Endpoint`]: which operation, which upstream, which
//! repository, which reference.
//!
//! Repository names contain slashes, so the path is read from its end (`…/manifests/<ref>`,
//! `…/blobs/<digest>`, `…/tags/list`). The upstream comes from `?ns=`, else from a first path
//! segment that names a configured upstream, else the default. Everything is validated against
//! the OCI grammar here, before anything touches the cache.

use std::sync::Arc;

use crate::error::{ApiError, ErrorCode};
use crate::oci::{Digest, Reference, RepoName};
use crate::upstream::{Upstream, Upstreams};

/// The operation a request asks for, also the `route` label of logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Ping,
    Catalog,
    Manifest,
    Blob,
    BlobUpload,
    Tags,
    Referrers,
    Unknown,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Ping => "ping",
            Route::Catalog => "catalog",
            Route::Manifest => "manifest",
            Route::Blob => "blob",
            Route::BlobUpload => "blob_upload",
            Route::Tags => "tags",
            Route::Referrers => "referrers",
            Route::Unknown => "unknown",
        }
    }
}

/// What a repository request targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Manifest(Reference),
    Blob(Digest),
    BlobUpload,
    Tags,
    Referrers(Digest),
}

impl Target {
    pub fn route(&self) -> Route {
        match self {
            Target::Manifest(_) => Route::Manifest,
            Target::Blob(_) => Route::Blob,
            Target::BlobUpload => Route::BlobUpload,
            Target::Tags => Route::Tags,
            Target::Referrers(_) => Route::Referrers,
        }
    }
}

/// A parsed repository request.
#[derive(Clone)]
pub struct Endpoint {
    pub upstream: Arc<Upstream>,
    /// The repository as the upstream knows it (`library/` added for Docker Hub).
    pub repo: RepoName,
    pub target: Target,
}

/// Splits the path after `/v2/` into the raw repository part and its target. Answers the route
/// even when the rest is invalid, for logs and metrics.
///
/// The operation is named by the path's last segments (`…/manifests/<ref>`, `…/blobs/<digest>`,
/// `…/referrers/<digest>`, `…/tags/list`, `…/blobs/uploads[/<id>]`), so a repository may itself
/// have a segment called `manifests` or `blobs` (`a/manifests/b/blobs/<digest>`).
pub fn split(rest: &str) -> Result<(&str, Target), (Route, ApiError)> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((name, Target::Tags));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads")
        .or_else(|| rest.strip_suffix("/blobs/uploads/"))
    {
        return Ok((name, Target::BlobUpload));
    }
    let unknown = || {
        (
            Route::Unknown,
            ApiError::new(ErrorCode::UnknownEndpoint).with_message("unknown registry API path"),
        )
    };
    let (head, last) = rest.rsplit_once('/').ok_or_else(unknown)?;
    // A one-segment repository is `head` alone; the name is then empty and refused later.
    let (name, kind) = head.rsplit_once('/').unwrap_or(("", head));
    match kind {
        "manifests" => {
            // A reference that cannot exist is a manifest that does not exist, as the
            // conformance suite and distribution answer; it is never asked for upstream.
            let reference = last.parse().map_err(|e: crate::oci::ParseError| {
                (
                    Route::Manifest,
                    ApiError::new(ErrorCode::ManifestUnknown).with_message(e.to_string()),
                )
            })?;
            Ok((name, Target::Manifest(reference)))
        }
        "blobs" => {
            let digest = last.parse().map_err(|e| (Route::Blob, ApiError::from(e)))?;
            Ok((name, Target::Blob(digest)))
        }
        "referrers" => {
            let digest = last
                .parse()
                .map_err(|e| (Route::Referrers, ApiError::from(e)))?;
            Ok((name, Target::Referrers(digest)))
        }
        "uploads" => match name.strip_suffix("/blobs") {
            Some(name) => Ok((name, Target::BlobUpload)),
            None => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

/// Resolves the upstream and the repository name.
pub fn resolve(
    upstreams: &Upstreams,
    raw_name: &str,
    ns: Option<&str>,
    target: Target,
) -> Result<Endpoint, ApiError> {
    let (upstream, name) = match ns {
        Some(ns) => {
            let upstream = upstreams.get(ns).ok_or_else(|| unknown_upstream(ns))?;
            (upstream.clone(), raw_name)
        }
        None => match raw_name
            .split_once('/')
            .and_then(|(first, rest)| Some((upstreams.get(first)?, rest)))
        {
            Some((upstream, rest)) => (upstream.clone(), rest),
            None => (upstreams.default_upstream().clone(), raw_name),
        },
    };
    let repo: RepoName = name.parse()?;
    let repo = upstream.normalize(repo);
    Ok(Endpoint {
        upstream,
        repo,
        target,
    })
}

fn unknown_upstream(ns: &str) -> ApiError {
    // Closed world: an unconfigured upstream is refused, so the mirror is never an open proxy.
    let shown: String = ns.chars().take(100).collect();
    ApiError::new(ErrorCode::NameUnknown)
        .with_message(format!("no upstream is configured for ns={shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstreams() -> Upstreams {
        let config = Config::parse(
            "default_upstream: docker.io\nupstreams:\n  docker.io: { url: 'http://127.0.0.1:1' }\n  ghcr.io: { url: 'http://127.0.0.1:2' }\n  registry.local:5000: { url: 'http://127.0.0.1:3' }\n",
            "t",
        )
        .unwrap();
        Upstreams::from_config(&config, &Default::default()).unwrap()
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn resolves_upstream_and_name() {
        let ups = upstreams();
        let d = "sha256:".to_owned() + &"a".repeat(64);
        let cases: Vec<(&str, Option<&str>, Option<(&str, &str, Route)>)> = vec![
            (
                "alpine/manifests/3.20",
                None,
                Some(("docker.io", "library/alpine", Route::Manifest)),
            ),
            (
                "library/alpine/manifests/latest",
                Some("docker.io"),
                Some(("docker.io", "library/alpine", Route::Manifest)),
            ),
            (
                "alpine/manifests/latest",
                Some("index.docker.io"),
                Some(("docker.io", "library/alpine", Route::Manifest)),
            ),
            (
                "alpine/manifests/latest",
                Some("registry-1.docker.io"),
                Some(("docker.io", "library/alpine", Route::Manifest)),
            ),
            (
                "org/img/manifests/v1",
                Some("ghcr.io"),
                Some(("ghcr.io", "org/img", Route::Manifest)),
            ),
            (
                "img/manifests/v1",
                Some("ghcr.io"),
                Some(("ghcr.io", "img", Route::Manifest)),
            ),
            (
                "ghcr.io/org/img/tags/list",
                None,
                Some(("ghcr.io", "org/img", Route::Tags)),
            ),
            (
                "registry.local:5000/a/b/manifests/x",
                None,
                Some(("registry.local:5000", "a/b", Route::Manifest)),
            ),
            // Not a configured upstream: an ordinary repository name on the default upstream.
            (
                "unknown.io/org/img/manifests/v1",
                None,
                Some(("docker.io", "unknown.io/org/img", Route::Manifest)),
            ),
            ("x/manifests/v1", Some("evil.example"), None),
            ("Alpine/manifests/v1", None, None),
            ("a/manifests/", None, None),
            ("a/manifests/.bad", None, None),
            ("a/blobs/sha256:zz", None, None),
            (
                "a/blobs/uploads/",
                None,
                Some(("docker.io", "library/a", Route::BlobUpload)),
            ),
            (
                "a/b/c/d/e/referrers/DIGEST",
                None,
                Some(("docker.io", "a/b/c/d/e", Route::Referrers)),
            ),
            (
                "a/b/blobs/DIGEST",
                None,
                Some(("docker.io", "a/b", Route::Blob)),
            ),
            ("manifests/x", None, None),
            ("a/nothing", None, None),
            // Repositories with segments named like the operations.
            (
                "a/manifests/b/manifests/latest",
                None,
                Some(("docker.io", "a/manifests/b", Route::Manifest)),
            ),
            (
                "a/manifests/b/blobs/DIGEST",
                None,
                Some(("docker.io", "a/manifests/b", Route::Blob)),
            ),
            (
                "blobs/manifests/v1",
                None,
                Some(("docker.io", "library/blobs", Route::Manifest)),
            ),
            (
                "a/blobs/uploads/manifests/v1",
                None,
                Some(("docker.io", "a/blobs/uploads", Route::Manifest)),
            ),
            (
                "a/blobs/uploads/some-id",
                None,
                Some(("docker.io", "library/a", Route::BlobUpload)),
            ),
        ];
        for (path, ns, want) in cases {
            let path = path.replace("DIGEST", &d);
            let got = split(&path)
                .map_err(|(_, e)| e)
                .and_then(|(name, target)| resolve(&ups, name, ns, target));
            match (got, want) {
                (Ok(ep), Some((up, repo, route))) => {
                    assert_eq!(
                        (
                            ep.upstream.name.as_str(),
                            ep.repo.as_str(),
                            ep.target.route()
                        ),
                        (up, repo, route),
                        "{path} ns={ns:?}"
                    );
                }
                (Err(_), None) => {}
                (Ok(ep), None) => panic!(
                    "{path} ns={ns:?}: expected an error, got {} {}",
                    ep.upstream.name, ep.repo
                ),
                (Err(e), Some(_)) => panic!("{path} ns={ns:?}: {e}"),
            }
        }
    }

    #[test]
    fn error_codes() {
        let ups = upstreams();
        let code = |path: &str, ns: Option<&str>| {
            split(path)
                .map_err(|(_, e)| e)
                .and_then(|(n, t)| resolve(&ups, n, ns, t))
                .err()
                .map(|e| e.code())
        };
        assert_eq!(
            code("UPPER/manifests/x", None),
            Some(ErrorCode::NameInvalid)
        );
        assert_eq!(
            code("a/blobs/sha256:1", None),
            Some(ErrorCode::DigestInvalid)
        );
        assert_eq!(
            code("a/manifests/x", Some("nope.io")),
            Some(ErrorCode::NameUnknown)
        );
        assert_eq!(code("a/whatever", None), Some(ErrorCode::UnknownEndpoint));
        assert_eq!(code("a/b/c", None), Some(ErrorCode::UnknownEndpoint));
        assert_eq!(
            code("a/manifests/.INVALID_MANIFEST_NAME", None),
            Some(ErrorCode::ManifestUnknown)
        );
    }
}
