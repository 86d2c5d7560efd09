//! What a hostile or broken upstream does to regmirror (issue 13): token lifetimes that
//! overflow, bodies without end, bodies trickled a byte at a time, gzip bombs, `subject` fields
//! naming other repositories' blobs, upstream URLs that are down, and referrers needed while the
//! upstream is away.
//!
//! The exotic answers come from a small server in this file; content and faults from the
//! shared fake (tests/fake). Time is never the assertion: deadlines here are configured short
//! against answers that would take far longer, and the outer timeouts only catch hangs.

mod fake;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use fake::{client, mirror, mirror_from, Fake};
use regmirror::oci::Digest;

/// Against hangs only: every exchange below is expected to end far sooner.
const SAFETY: Duration = Duration::from_secs(60);

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("error bodies are JSON: {e}: {bytes:?}"));
    (
        status,
        body["errors"][0]["code"].as_str().unwrap().to_owned(),
    )
}

async fn get(http: &reqwest::Client, url: String) -> reqwest::Response {
    tokio::time::timeout(SAFETY, http.get(&url).send())
        .await
        .unwrap_or_else(|_| panic!("GET {url} hung"))
        .unwrap()
}

async fn body(response: reqwest::Response) -> Bytes {
    tokio::time::timeout(SAFETY, response.bytes())
        .await
        .expect("body hung")
        .unwrap()
}

/// A manifest the hostile server serves (its config need not exist).
fn manifest_bytes() -> Bytes {
    let config = Digest::sha256_of(b"{}");
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[]}}"#
    ))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// One byte a second, for ever longer than any deadline under test.
fn trickle(bytes: Bytes) -> Body {
    let stream = futures_util::stream::unfold(0usize, move |sent| {
        let bytes = bytes.clone();
        async move {
            if sent >= bytes.len() {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((
                Ok::<Bytes, std::io::Error>(bytes.slice(sent..sent + 1)),
                sent + 1,
            ))
        }
    });
    Body::from_stream(stream)
}

#[derive(Clone, Default)]
struct Hostile {
    /// `/v2/trickle/…` trickles its bodies and never answers HEADs (else it behaves).
    trickling: Arc<AtomicBool>,
}

/// Starts the hostile server; answers its base URL.
async fn hostile() -> (String, Hostile) {
    let state = Hostile::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .fallback(any(hostile_answer))
        .with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state)
}

async fn hostile_answer(State(state): State<Hostile>, method: Method, uri: Uri) -> Response {
    let json = |body: Body| {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap()
    };
    let manifest = manifest_bytes();
    let manifest_type = "application/vnd.oci.image.manifest.v1+json";
    match uri.path() {
        "/token/overflow" => json(Body::from(
            r#"{"token":"tok-overflow","expires_in":18446744073709551615}"#,
        )),
        "/token/huge" => {
            // 512 MiB of token, streamed without a Content-Length from one static chunk.
            static CHUNK: [u8; 64 * 1024] = [b'a'; 64 * 1024];
            let head = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(
                Bytes::from_static(br#"{"token":""#),
            )]);
            let middle = futures_util::stream::iter(
                (0..8192).map(|_| Ok::<Bytes, std::io::Error>(Bytes::from_static(&CHUNK))),
            );
            let tail = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(
                Bytes::from_static(br#"","expires_in":300}"#),
            )]);
            use futures_util::StreamExt;
            json(Body::from_stream(head.chain(middle).chain(tail)))
        }
        "/token/trickle" => json(trickle(Bytes::from_static(
            br#"{"token":"tok-trickle","expires_in":300}"#,
        ))),
        "/v2/gzip/manifests/1" => Response::builder()
            .header(header::CONTENT_TYPE, manifest_type)
            .header(header::CONTENT_ENCODING, "gzip")
            .header(
                "docker-content-digest",
                Digest::sha256_of(&manifest).as_str(),
            )
            .body(Body::from(gzip(&manifest)))
            .unwrap(),
        "/v2/bomb/manifests/1" => {
            // 256 MiB of spaces (valid JSON whitespace) in about 250 KiB of gzip.
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            let spaces = vec![b' '; 1 << 20];
            for _ in 0..256 {
                encoder.write_all(&spaces).unwrap();
            }
            encoder.write_all(&manifest).unwrap();
            Response::builder()
                .header(header::CONTENT_TYPE, manifest_type)
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(encoder.finish().unwrap()))
                .unwrap()
        }
        path if path.starts_with("/v2/trickle/") => {
            let trickling = state.trickling.load(Ordering::SeqCst);
            if trickling && method == Method::HEAD {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if path.ends_with("/tags/list") {
                let tags = Bytes::from_static(br#"{"name":"trickle","tags":["1"]}"#);
                return json(if trickling {
                    trickle(tags)
                } else {
                    Body::from(tags)
                });
            }
            let body = if method == Method::HEAD {
                Body::empty()
            } else if trickling {
                trickle(manifest.clone())
            } else {
                Body::from(manifest.clone())
            };
            Response::builder()
                .header(header::CONTENT_TYPE, manifest_type)
                .header(
                    "docker-content-digest",
                    Digest::sha256_of(&manifest).as_str(),
                )
                .body(body)
                .unwrap()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A `regmirror_…` gauge's value from `/metrics`.
async fn gauge(http: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let text = get(http, format!("{base}/metrics"))
        .await
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Item 3: a token lifetime of `u64::MAX` seconds neither panics the download nor wedges the
/// blob: it is clamped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_lifetime_that_overflows_is_clamped() {
    let (hostile_url, _) = hostile().await;
    let fake = Fake::start().await;
    let image = fake.put_image("library/app", "1", &[100_000], 31);
    fake.faults.require_token.store(true, Ordering::SeqCst);
    *fake.faults.token_realm.lock().unwrap() = Some(format!("{hostile_url}/token/overflow"));
    let m = mirror(&fake, "").await;
    let http = client();
    let (digest, bytes) = &image.layers[0];
    for round in 0..2 {
        let r = get(&http, format!("{}/v2/app/blobs/{digest}", m.url)).await;
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(&body(r).await, bytes, "round {round}");
    }
    assert_eq!(
        gauge(&http, &m.url, "regmirror_downloads_in_flight").await,
        Some(0.0)
    );
    // The token (clamped to a day) is reused, not fetched again.
    let r = get(&http, format!("{}/v2/app/manifests/1", m.url)).await;
    assert_eq!(r.status(), 200);
}

/// Item 5: a 512 MiB token answer is refused after its first MiB, and the process's peak RSS
/// barely moves (it went up by the whole body before).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_token_answer_is_refused_without_buffering_it() {
    let (hostile_url, _) = hostile().await;
    let fake = Fake::start().await;
    fake.put_image("library/app", "1", &[10], 32);
    fake.faults.require_token.store(true, Ordering::SeqCst);
    *fake.faults.token_realm.lock().unwrap() = Some(format!("{hostile_url}/token/huge"));
    let m = mirror(&fake, "").await;
    let http = client();
    // Warm up everything but the token (connections, the index), then measure the peak from
    // here: writing 5 to clear_refs resets VmHWM to the current RSS.
    assert_eq!(
        get(&http, format!("{}/v2/", m.url)).await.status(),
        StatusCode::OK
    );
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = peak_rss_kib();
    let r = get(&http, format!("{}/v2/app/manifests/1", m.url)).await;
    let (status, code) = error_code(r).await;
    let after = peak_rss_kib();
    let grown_mib = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!(
        "peak RSS before {:.1} MiB, after {:.1} MiB: +{grown_mib:.1} MiB for a 512 MiB token answer",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"));
    assert!(
        grown_mib < 64.0,
        "a 512 MiB token raised the peak RSS by {grown_mib:.1} MiB"
    );
}

/// Item 8: manifest, tag-list and token exchanges have an overall deadline. Bodies trickled a
/// byte a second (each read well within read_timeout) would take minutes; the client gets a
/// 504, or the tag it already had, stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trickled_answers_meet_the_exchange_deadline() {
    let (hostile_url, hostile_state) = hostile().await;
    let m = mirror_from(&format!(
        "default_upstream: docker.io\ncache: {{ tag_ttl: 0s }}\nupstreams:\n  docker.io: {{ url: '{hostile_url}', library_prefix: false, read_timeout: 30s, request_timeout: 2s }}\n"
    ))
    .await;
    let http = client();
    let r = get(&http, format!("{}/v2/trickle/manifests/1", m.url)).await;
    assert_eq!(r.status(), 200);
    hostile_state.trickling.store(true, Ordering::SeqCst);
    // Held: the revalidation (a HEAD that never answers) gives up and the tag is served stale.
    let r = get(&http, format!("{}/v2/trickle/manifests/1", m.url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-regmirror-cache"], "stale");
    assert_eq!(body(r).await, manifest_bytes());
    // Never held: a trickled manifest body is a 504.
    let r = get(&http, format!("{}/v2/trickle/manifests/2", m.url)).await;
    assert_eq!(error_code(r).await, (504, "UNAVAILABLE".into()));
    // A trickled tag list: the tags we hold, stale.
    let r = get(&http, format!("{}/v2/trickle/tags/list", m.url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-regmirror-cache"], "stale");

    // A token trickled by its realm.
    let fake = Fake::start().await;
    fake.put_image("library/app", "1", &[10], 33);
    fake.faults.require_token.store(true, Ordering::SeqCst);
    *fake.faults.token_realm.lock().unwrap() = Some(format!("{hostile_url}/token/trickle"));
    let m = mirror_from(&format!(
        "default_upstream: docker.io\nupstreams:\n  docker.io: {{ url: '{}', read_timeout: 30s, request_timeout: 2s }}\n",
        fake.url()
    ))
    .await;
    let r = get(&http, format!("{}/v2/app/manifests/1", m.url)).await;
    assert_eq!(error_code(r).await, (504, "UNAVAILABLE".into()));
}

/// Item 15: a gzip-encoded manifest is stored, verified and served decoded; a gzip bomb is
/// refused at the manifest cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gzip_manifests_are_decoded_with_a_cap() {
    let (hostile_url, _) = hostile().await;
    let m = mirror_from(&format!(
        "default_upstream: docker.io\nupstreams:\n  docker.io: {{ url: '{hostile_url}', library_prefix: false }}\n"
    ))
    .await;
    let http = client();
    let manifest = manifest_bytes();
    let digest = Digest::sha256_of(&manifest);
    for (round, reference) in [(0, "1".to_owned()), (1, digest.to_string())] {
        let r = get(&http, format!("{}/v2/gzip/manifests/{reference}", m.url)).await;
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
        assert!(r.headers().get(header::CONTENT_ENCODING).is_none());
        assert_eq!(body(r).await, manifest, "round {round}");
    }
    let r = get(&http, format!("{}/v2/bomb/manifests/1", m.url)).await;
    assert_eq!(error_code(r).await, (502, "UNAVAILABLE".into()));
}

/// Item 14: a manifest's `subject` does not make a blob servable under its repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subject_does_not_link_a_blob_to_a_repository() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/a", "1", &[1000], 34);
    let (secret, _) = &image.layers[0];
    // Repository b holds its own config, and names a's layer as its subject; the upstream says
    // b does not have that layer.
    let config = Bytes::from_static(b"{}");
    let config_digest = fake.put_blob(config.clone());
    fake.content
        .repo_blobs
        .lock()
        .unwrap()
        .insert(("library/b".into(), config_digest.clone()));
    let crafted = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config_digest}","size":2}},"layers":[],"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{secret}","size":1000}}}}"#
    );
    fake.put_manifest(
        "library/b",
        "sig",
        Bytes::from(crafted),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let m = mirror(&fake, "").await;
    let http = client();
    let r = get(&http, format!("{}/v2/a/blobs/{secret}", m.url)).await;
    assert_eq!(r.status(), 200);
    body(r).await;
    let r = get(&http, format!("{}/v2/b/manifests/sig", m.url)).await;
    assert_eq!(r.status(), 200);
    for method in [Method::GET, Method::HEAD] {
        let r = tokio::time::timeout(
            SAFETY,
            http.request(method.clone(), format!("{}/v2/b/blobs/{secret}", m.url))
                .send(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r.status(), 404, "{method}");
        if method == Method::GET {
            assert_eq!(error_code(r).await, (404, "BLOB_UNKNOWN".into()));
        }
    }
    // Its content still is linked: b's config is served from the store.
    let r = get(&http, format!("{}/v2/b/blobs/{config_digest}", m.url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, config);
}

/// A port nothing listens on.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Item 17: the upstream's URLs are tried in order; a URL that is down (closed port) or
/// answers 503 gives way to the next, and is then skipped for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_urls_fail_over_in_order() {
    let good = Fake::start().await;
    let image = good.put_image("library/app", "1", &[1000, 2000], 35);
    let failing = Fake::start().await;
    *failing.faults.status.lock().unwrap() = Some(503);
    let closed = closed_port_url().await;
    let m = mirror_from(&format!(
        "default_upstream: docker.io\nupstreams:\n  docker.io: {{ url: ['{closed}', '{}', '{}'] }}\n",
        failing.url(),
        good.url()
    ))
    .await;
    let http = client();
    let r = get(&http, format!("{}/v2/app/manifests/1", m.url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, image.manifest);
    let asked = failing.counters.requests.lock().unwrap().len();
    assert!(asked >= 1, "the 503 URL was tried before the good one");
    for (digest, bytes) in &image.layers {
        let r = get(&http, format!("{}/v2/app/blobs/{digest}", m.url)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(&body(r).await, bytes);
    }
    assert_eq!(
        failing.counters.requests.lock().unwrap().len(),
        asked,
        "a failed URL is skipped for a while"
    );
}

/// Item 17: idempotent requests are retried after a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passing_5xx_is_retried() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/app", "1", &[1000], 36);
    let m = mirror(&fake, "").await;
    let http = client();
    fake.faults.fail_next.store(2, Ordering::SeqCst);
    let r = get(&http, format!("{}/v2/app/manifests/1", m.url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, image.manifest);
    fake.faults.fail_next.store(2, Ordering::SeqCst);
    let (digest, bytes) = &image.layers[0];
    let r = get(&http, format!("{}/v2/app/blobs/{digest}", m.url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(&body(r).await, bytes);
    assert_eq!(
        fake.counters.count("GET", "/blobs/"),
        3,
        "two 503s, then the blob"
    );
}

/// Item 18: referrers are cached like tags: served from the index within the TTL, and stale
/// (marked) while the upstream is down, so signatures verify offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn referrers_are_cached_and_served_stale() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/signed", "1", &[10], 37);
    let index = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#);
    fake.content
        .referrers
        .lock()
        .unwrap()
        .insert(image.digest.clone(), index.clone());
    let referrers = |m: &fake::Mirror, query: &str| {
        format!("{}/v2/signed/referrers/{}{query}", m.url, image.digest)
    };
    let http = client();

    let m = mirror(&fake, "cache: { tag_ttl: 0s }").await;
    assert_eq!(
        get(&http, format!("{}/v2/signed/manifests/1", m.url))
            .await
            .status(),
        200
    );
    let r = get(&http, referrers(&m, "")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-regmirror-cache"], "miss");
    assert_eq!(body(r).await, index);
    for status in [503, 429] {
        *fake.faults.status.lock().unwrap() = Some(status);
        let r = get(&http, referrers(&m, "")).await;
        assert_eq!(r.status(), 200, "upstream {status}");
        assert_eq!(r.headers()["x-regmirror-cache"], "stale");
        assert_eq!(body(r).await, index);
        // Another filter was never asked for: nothing to serve.
        let r = get(&http, referrers(&m, "?artifactType=x%2Fy")).await;
        assert_ne!(r.status(), 200, "upstream {status}");
    }
    *fake.faults.status.lock().unwrap() = None;

    let m = mirror(&fake, "cache: { tag_ttl: 5m }").await;
    get(&http, format!("{}/v2/signed/manifests/1", m.url)).await;
    let asked = |fake: &Fake| fake.counters.count("GET", "/referrers/");
    let before = asked(&fake);
    for expect in ["miss", "hit"] {
        let r = get(&http, referrers(&m, "")).await;
        assert_eq!(r.headers()["x-regmirror-cache"], expect);
        assert_eq!(body(r).await, index);
    }
    assert_eq!(asked(&fake), before + 1, "within the TTL from the index");
    // Filters are the client's: only a few per subject are kept.
    for i in 0..20 {
        let r = get(&http, referrers(&m, &format!("?artifactType=x%2F{i}"))).await;
        assert_eq!(r.status(), 200);
    }
    let kept = m
        .state
        .cache
        .store()
        .index()
        .referrers_queries("docker.io", "library/signed", &image.digest)
        .unwrap();
    assert!((2..=8).contains(&kept), "{kept} filters kept");
}
