//! Observability, tested with the real programs: the regmirror binary's JSON access log, its
//! health endpoints, its status page rendered by headless Chromium, its `/metrics` checked by
//! `promtool` and scraped by a real Prometheus, and the Grafana dashboard's queries run against
//! that Prometheus and matched against the metrics regmirror exports.
//!
//! The upstream is the in-process fake (tests/fake) behind a small "Docker Hub" front that adds
//! `ratelimit-*` headers the way Docker Hub does, so every figure the tests check is one the
//! test caused.

mod common;
mod fake;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use common::{free_port, http, no_proxy, require_tool, run, tempdir, ChildProc, Regmirror};
use fake::Fake;

/// Docker Hub's window, as it sends it: `ratelimit-remaining: 98;w=21600`.
const WINDOW: &str = "w=21600";
const RATE_LIMIT: u64 = 100;

/// A Docker Hub–like front for the fake: forwards every request and adds `ratelimit-limit` and
/// `ratelimit-remaining` to manifest responses, counting successful manifest GETs against the
/// allowance (HEADs are free, as on Docker Hub).
#[derive(Clone)]
struct Hub {
    target: String,
    client: reqwest::Client,
    remaining: Arc<AtomicU64>,
}

impl Hub {
    async fn start(fake: &Fake) -> (String, Hub) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let hub = Hub {
            target: fake.url(),
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            remaining: Arc::new(AtomicU64::new(RATE_LIMIT)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().fallback(forward).with_state(hub.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, hub)
    }
}

async fn forward(State(hub): State<Hub>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = hub
        .client
        .request(method.clone(), format!("{}{path}", hub.target));
    for (name, value) in &headers {
        if name != header::HOST {
            request = request.header(name, value);
        }
    }
    let Ok(answer) = request.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let status = answer.status();
    let mut out_headers = answer.headers().clone();
    out_headers.remove(header::TRANSFER_ENCODING);
    out_headers.remove(header::CONNECTION);
    let body = answer.bytes().await.unwrap_or_default();
    if uri.path().contains("/manifests/") {
        let left = if method == Method::GET && status.is_success() {
            let before = hub
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    Some(n.saturating_sub(1))
                })
                .unwrap();
            before.saturating_sub(1)
        } else {
            hub.remaining.load(Ordering::SeqCst)
        };
        let value = |n: u64| HeaderValue::from_str(&format!("{n};{WINDOW}")).unwrap();
        out_headers.insert("ratelimit-limit", value(RATE_LIMIT));
        out_headers.insert("ratelimit-remaining", value(left));
    }
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = out_headers;
    response
}

/// regmirror's configuration: `docker.io` through the hub, `ghcr.io` on a port nothing listens
/// on (an unreachable upstream), plus `extra` top-level keys.
fn config(hub_url: &str, extra: &str) -> String {
    let dead = format!("http://127.0.0.1:{}", free_port());
    format!(
        "listen: @LISTEN@\n\
         storage: {{ root: @ROOT@, max_size: 1GiB }}\n\
         cache: {{ tag_ttl: 5m }}\n\
         default_upstream: docker.io\n\
         upstreams:\n  docker.io: {{ url: \"{hub_url}\" }}\n  ghcr.io: {{ url: \"{dead}\" }}\n\
         {extra}"
    )
}

/// What one image pull through the mirror moved.
#[derive(Debug, Default, Clone, Copy)]
struct Pulled {
    /// Manifest and blob GETs.
    requests: u64,
    /// Of those, answered from the cache (`x-regmirror-cache: hit`).
    hits: u64,
    manifest_bytes: u64,
    /// Config and layers.
    blob_bytes: u64,
    blobs: u64,
}

/// Pulls `name:tag` like a client does: the manifest by tag, then every blob it names, each
/// body checked against its digest.
async fn pull(base: &str, name: &str, tag: &str) -> Pulled {
    let http = http();
    let mut pulled = Pulled::default();
    let response = http
        .get(format!("{base}/v2/{name}/manifests/{tag}"))
        .header(header::ACCEPT, "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "manifest {name}:{tag}");
    pulled.requests += 1;
    pulled.hits += u64::from(response.headers()["x-regmirror-cache"] == "hit");
    let manifest = response.bytes().await.unwrap();
    pulled.manifest_bytes = manifest.len() as u64;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in manifest["layers"].as_array().unwrap() {
        digests.push(layer["digest"].as_str().unwrap().to_owned());
    }
    for digest in digests {
        let response = http
            .get(format!("{base}/v2/{name}/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "blob {digest}");
        pulled.requests += 1;
        pulled.hits += u64::from(response.headers()["x-regmirror-cache"] == "hit");
        let body = response.bytes().await.unwrap();
        assert_eq!(common::sha256_digest(&body), digest);
        pulled.blob_bytes += body.len() as u64;
        pulled.blobs += 1;
    }
    pulled
}

async fn get_text(url: &str) -> (u16, String) {
    let response = http().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The value of the sample `name{labels}` (labels exactly as Prometheus' text format sorts them).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
}

/// The directory for files a test leaves for people to look at: `target/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    // The test binary is target/<profile>/deps/<name>; its target dir is three levels up.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_parsable_line_per_request_and_no_secrets() {
    let fake = Fake::start().await;
    // Bearer tokens on every request: the log must never show one, even at debug level.
    fake.faults.require_token.store(true, Ordering::SeqCst);
    fake.put_image("library/alpine", "3.20", &[40_000], 1);
    let (hub_url, _hub) = Hub::start(&fake).await;
    let mirror = Regmirror::start(&config(&hub_url, "log: { format: json, level: debug }\n")).await;
    let base = mirror.url();
    let http = http();

    // (method, path, status, route, cache, upstream) for each request we make.
    let blob = fake
        .content
        .blobs
        .lock()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let cases: Vec<(Method, String, u16, &str, &str, &str)> = vec![
        (
            Method::GET,
            "/v2/alpine/manifests/3.20".into(),
            200,
            "manifest",
            "miss",
            "docker.io",
        ),
        (
            Method::GET,
            "/v2/alpine/manifests/3.20".into(),
            200,
            "manifest",
            "hit",
            "docker.io",
        ),
        (
            Method::HEAD,
            "/v2/alpine/manifests/3.20".into(),
            200,
            "manifest",
            "hit",
            "docker.io",
        ),
        (
            Method::GET,
            format!("/v2/alpine/blobs/{blob}"),
            200,
            "blob",
            "miss",
            "docker.io",
        ),
        (
            Method::GET,
            "/v2/alpine/manifests/nope".into(),
            404,
            "manifest",
            "-",
            "docker.io",
        ),
        (
            Method::GET,
            "/v2/ghcr.io/x/y/manifests/1".into(),
            502,
            "manifest",
            "-",
            "ghcr.io",
        ),
        (Method::GET, "/healthz".into(), 200, "other", "-", "-"),
    ];
    let mut ids = Vec::new();
    for (method, path, status, ..) in &cases {
        let response = http
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), *status, "{method} {path}");
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let bytes = response.bytes().await.unwrap().len() as u64;
        ids.push((id, bytes));
    }
    assert!(
        fake.counters.tokens_issued.load(Ordering::SeqCst) > 0,
        "the fake issued tokens"
    );
    // The line is written before the response leaves, the file append may land just after:
    // wait until every request's id is in the log.
    let log = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let log = mirror.log();
            if ids.iter().all(|(id, _)| log.contains(id.as_str())) {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every request logged");

    let mut lines = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        lines.push(value);
    }
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "debug level is on"
    );
    let requests: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["message"] == "request").collect();
    for ((method, path, status, route, cache, upstream), (id, body_bytes)) in cases.iter().zip(&ids)
    {
        let matching: Vec<_> = requests
            .iter()
            .filter(|l| l["request_id"] == id.as_str())
            .collect();
        assert_eq!(matching.len(), 1, "one line for {method} {path} ({id})");
        let line = matching[0];
        assert_eq!(line["method"], method.as_str(), "{line}");
        assert_eq!(line["route"], *route, "{line}");
        assert_eq!(line["status"], *status, "{line}");
        assert_eq!(line["cache"], *cache, "{line}");
        assert_eq!(line["upstream"], *upstream, "{line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
        let peer = line["peer"].as_str().unwrap_or_default();
        assert!(
            peer.starts_with("127.0.0.1:"),
            "the client's address: {line}"
        );
        if *method == Method::GET {
            assert_eq!(line["bytes"], *body_bytes, "{line}");
        }
        assert_eq!(line["level"], "INFO", "{line}");
    }
    // No token issued by the fake (`tok-N`) and no Authorization value, at any level.
    for secret in ["tok-", "Bearer ", "bearer "] {
        assert!(!log.contains(secret), "the log holds {secret:?}:\n{log}");
    }
}

// ---------------------------------------------------------------------------------------------
// Health

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_follow_the_store() {
    let fake = Fake::start().await;
    let (hub_url, _hub) = Hub::start(&fake).await;
    let mirror = Regmirror::start(&config(&hub_url, "log: { level: info }\n")).await;
    let base = mirror.url();
    assert_eq!(
        get_text(&format!("{base}/healthz")).await,
        (200, "ok\n".into())
    );
    assert_eq!(
        get_text(&format!("{base}/readyz")).await,
        (200, "ready\n".into())
    );

    // We run as root, so permissions cannot make the store unwritable: put a file where the
    // download directory must be.
    let tmp = mirror.data_dir().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let (status, body) = get_text(&format!("{base}/readyz")).await;
    assert_eq!((status, body.as_str()), (503, "store not ready\n"));
    assert_eq!(
        get_text(&format!("{base}/healthz")).await.0,
        200,
        "still alive"
    );

    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    assert_eq!(
        get_text(&format!("{base}/readyz")).await.0,
        200,
        "ready again"
    );
}

/// Shutting down is only visible to a request that arrives between the signal and the
/// listener closing, so the flag itself is checked through the router.
#[tokio::test]
async fn readyz_is_unavailable_while_shutting_down() {
    use tower::ServiceExt;
    let dir = tempdir("regmirror-ready-");
    let text = format!(
        "listen: 127.0.0.1:0\nstorage: {{ root: {:?} }}\ndefault_upstream: docker.io\nupstreams:\n  docker.io: {{ url: 'http://127.0.0.1:1' }}\n",
        dir.path().join("data")
    );
    let config = regmirror::Config::parse(&text, "test").unwrap();
    let state = regmirror::state(&config).await.unwrap();
    let readyz = || {
        axum::http::Request::get("/readyz")
            .body(Body::empty())
            .unwrap()
    };
    let app = regmirror::app(state.clone());
    assert_eq!(app.clone().oneshot(readyz()).await.unwrap().status(), 200);
    state.shutting_down.store(true, Ordering::SeqCst);
    let response = app.clone().oneshot(readyz()).await.unwrap();
    assert_eq!(response.status(), 503);
    let body = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    assert_eq!(&body[..], b"shutting down\n");
    let healthz = axum::http::Request::get("/healthz")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.oneshot(healthz).await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Status page

/// The `data-value` of the element with `id` in a serialized DOM.
fn value_by_id(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page:\n{dom}"));
    attribute_after(&dom[at..], "data-value")
}

/// The first `name="…"` attribute value in `text`.
fn attribute_after(text: &str, name: &str) -> String {
    let start = text.find(&format!("{name}=\"")).expect("attribute") + name.len() + 2;
    let end = text[start..].find('"').unwrap() + start;
    text[start..end].to_owned()
}

/// The table row `<tr data-{kind}="{key}" …>…</tr>`.
fn row<'a>(dom: &'a str, kind: &str, key: &str) -> &'a str {
    let at = dom
        .find(&format!("<tr data-{kind}=\"{key}\""))
        .unwrap_or_else(|| panic!("no row for {kind} {key} in the page:\n{dom}"));
    let end = dom[at..].find("</tr>").unwrap() + at;
    &dom[at..end]
}

fn cell(row: &str, class: &str) -> String {
    let at = row
        .find(&format!("class=\"{class}"))
        .unwrap_or_else(|| panic!("no cell {class} in {row}"));
    row[at..].to_owned()
}

/// Runs Debian's Chromium headless with a throw-away profile and no network chatter.
async fn chromium(args: &[String]) -> common::CmdOutput {
    let chromium = require_tool("chromium");
    let profile = tempdir("chromium-");
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args);
    no_proxy(&mut cmd);
    let out = run(cmd, Duration::from_secs(90)).await;
    drop(profile);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_what_the_test_did() {
    let fake = Fake::start().await;
    fake.put_image("library/app", "1", &[200_000, 50_000], 1);
    fake.put_image("library/tool", "1", &[30_000], 2);
    let (hub_url, _hub) = Hub::start(&fake).await;
    let mirror = Regmirror::start(&config(&hub_url, "log: { level: info }\n")).await;
    let base = mirror.url();

    // app twice (misses, then hits), tool once, and one request to the dead upstream.
    let app_first = pull(&base, "app", "1").await;
    let app_again = pull(&base, "app", "1").await;
    let tool = pull(&base, "tool", "1").await;
    assert_eq!((app_first.hits, app_again.hits, tool.hits), (0, 4, 0));
    let dead = http()
        .get(format!("{base}/v2/ghcr.io/some/repo/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(dead.status(), 502);

    let out = chromium(&["--dump-dom".into(), format!("{base}/")]).await;
    out.assert_success();
    let dom = out.stdout;
    assert!(dom.contains("<h1>regmirror"), "the page rendered:\n{dom}");

    let stored =
        app_first.manifest_bytes + app_first.blob_bytes + tool.manifest_bytes + tool.blob_bytes;
    assert_eq!(value_by_id(&dom, "cache-size"), stored.to_string());
    assert_eq!(value_by_id(&dom, "cache-limit"), (1u64 << 30).to_string());
    assert_eq!(
        value_by_id(&dom, "cache-blobs"),
        (2 + app_first.blobs + tool.blobs).to_string()
    );
    let lookups = app_first.requests + app_again.requests + tool.requests;
    let from_cache = app_again.hits;
    assert_eq!(value_by_id(&dom, "lookups"), lookups.to_string());
    assert_eq!(
        value_by_id(&dom, "lookups-from-cache"),
        from_cache.to_string()
    );
    assert_eq!(
        value_by_id(&dom, "hit-ratio"),
        format!("{:.4}", from_cache as f64 / lookups as f64)
    );
    assert!(dom.contains(&format!(
        "{:.1}%",
        from_cache as f64 * 100.0 / lookups as f64
    )));
    assert_eq!(
        value_by_id(&dom, "bytes-saved"),
        app_again.blob_bytes.to_string()
    );
    assert_eq!(
        value_by_id(&dom, "bytes-from-upstream"),
        (app_first.blob_bytes + tool.blob_bytes).to_string()
    );

    // Busiest repository first, with the requests and cache answers the test caused.
    assert_eq!(value_by_id(&dom, "repositories-cached"), "2");
    let app_row = row(&dom, "repository", "docker.io/library/app");
    let tool_row = row(&dom, "repository", "docker.io/library/tool");
    assert!(
        dom.find(app_row).unwrap() < dom.find(tool_row).unwrap(),
        "app before tool"
    );
    let counts = |row: &str| {
        (
            attribute_after(&cell(row, "requests"), "data-value"),
            attribute_after(&cell(row, "from-cache"), "data-value"),
        )
    };
    assert_eq!(
        counts(app_row),
        (
            (app_first.requests + app_again.requests).to_string(),
            app_again.hits.to_string()
        )
    );
    assert_eq!(counts(tool_row), (tool.requests.to_string(), "0".into()));

    // Upstreams: docker.io up with the allowance the hub reported after two manifest GETs;
    // ghcr.io unreachable with its error.
    let hub_row = row(&dom, "upstream", "docker.io");
    assert_eq!(attribute_after(&cell(hub_row, "state"), "data-value"), "up");
    assert_eq!(
        attribute_after(&cell(hub_row, "ratelimit"), "data-value"),
        (RATE_LIMIT - 2).to_string()
    );
    assert!(
        hub_row.contains(&format!("{} of {RATE_LIMIT}", RATE_LIMIT - 2)),
        "{hub_row}"
    );
    let dead_row = row(&dom, "upstream", "ghcr.io");
    assert_eq!(
        attribute_after(&cell(dead_row, "state"), "data-value"),
        "unreachable"
    );
    assert!(
        cell(dead_row, "error").contains("unreachable"),
        "{dead_row}"
    );
    assert!(
        cell(dead_row, "ratelimit").contains("not reported"),
        "{dead_row}"
    );

    // The page agrees with /metrics.
    let (_, metrics) = get_text(&format!("{base}/metrics")).await;
    assert_eq!(
        sample(&metrics, "regmirror_served_bytes_total{source=\"cache\"}") as u64,
        app_again.blob_bytes
    );
    assert_eq!(
        sample(&metrics, "regmirror_cache_size_bytes") as u64,
        stored
    );

    // A screenshot for people (and the reviewer) to look at.
    let png = artifacts_dir().join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let out = chromium(&[
        format!("--screenshot={}", png.display()),
        "--window-size=1200,900".into(),
        format!("{base}/"),
    ])
    .await;
    out.assert_success();
    let image =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {png:?}: {e}\n{out}"));
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    // PNG IHDR: width and height, big-endian, at bytes 16..24.
    let width = u32::from_be_bytes(image[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(image[20..24].try_into().unwrap());
    assert_eq!((width, height), (1200, 900));
    assert!(
        image.len() > 20_000,
        "a page with content, not a blank ({} bytes)",
        image.len()
    );
    eprintln!("status page screenshot: {}", png.display());
}

// ---------------------------------------------------------------------------------------------
// Prometheus and Grafana

/// The dashboard's PromQL expressions.
fn dashboard_exprs() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/regmirror.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    fn walk(value: &serde_json::Value, exprs: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(expr)) => exprs.push(expr.clone()),
                        _ => walk(value, exprs),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, exprs)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has queries: {exprs:?}");
    exprs
}

/// Grafana's variables replaced by what a user would see with "All" selected.
fn expand_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "10m")
        .replace("$upstream", ".*")
}

/// Metric names in a PromQL expression: identifiers outside label matchers and strings that
/// are neither functions, keywords, nor grouping labels.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
    ];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut depth_braces, mut grouping) = (0, 0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += usize::from(chars[i] == '\\') + 1;
            }
            i += 1;
            continue;
        }
        if c == '[' {
            // A range like [1m] or [$__rate_interval].
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '{' {
            depth_braces += 1;
        } else if c == '}' {
            depth_braces -= 1;
        } else if c == ')' {
            grouping = false;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
            if AGGREGATIONS.contains(&word.as_str()) {
                // `sum by (x) (...)`: an operator, whatever follows it.
            } else if KEYWORDS.contains(&word.as_str()) {
                grouping = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
            } else if depth_braces == 0 && !grouping && next != Some('(') {
                names.insert(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn metric_name_extraction() {
    let cases = [
        (
            r#"sum by (kind) (rate(regmirror_cache_requests_total{result=~"hit|x"}[$__rate_interval])) / sum by (kind) (rate(regmirror_cache_requests_total[5m]))"#,
            vec!["regmirror_cache_requests_total"],
        ),
        (
            "histogram_quantile(0.95, sum by (upstream, le) (rate(a_bucket{upstream=~\"$upstream\"}[1m])))",
            vec!["a_bucket"],
        ),
        ("regmirror_cache_size_bytes / (regmirror_cache_limit_bytes > 0)", vec!["regmirror_cache_limit_bytes", "regmirror_cache_size_bytes"]),
        ("up", vec!["up"]),
        ("sum without (instance) (x) and on (job) count(y)", vec!["x", "y"]),
    ];
    for (expr, want) in cases {
        let got: Vec<String> = metric_names(expr).into_iter().collect();
        assert_eq!(got, want, "{expr}");
    }
}

/// The series names (histograms as their `_bucket`, `_sum` and `_count`) in a text exposition.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Traffic that makes every metric the dashboard shows have a series: tokens, misses, hits,
/// rate-limit headers, an unreachable upstream.
async fn traffic(base: &str) -> (Pulled, Pulled) {
    let first = pull(base, "app", "1").await;
    let again = pull(base, "app", "1").await;
    let dead = http()
        .get(format!("{base}/v2/ghcr.io/some/repo/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(dead.status(), 502);
    (first, again)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let fake = Fake::start().await;
    fake.faults.require_token.store(true, Ordering::SeqCst);
    fake.put_image("library/app", "1", &[20_000], 3);
    let (hub_url, _hub) = Hub::start(&fake).await;
    let mirror = Regmirror::start(&config(&hub_url, "log: { level: info }\n")).await;
    traffic(&mirror.url()).await;
    let (status, metrics) = get_text(&format!("{}/metrics", mirror.url())).await;
    assert_eq!(status, 200);
    let exported = exported_names(&metrics);
    let mut used = BTreeSet::new();
    for expr in dashboard_exprs() {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "no metric found in {expr}");
        used.extend(names);
    }
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics regmirror does not export: {missing:?}\nexported: {exported:?}");
    // The dashboard covers what the issue asks for.
    for name in [
        "regmirror_cache_requests_total",
        "regmirror_served_bytes_total",
        "regmirror_upstream_request_duration_seconds_bucket",
        "regmirror_upstream_requests_total",
        "regmirror_cache_size_bytes",
        "regmirror_cache_limit_bytes",
        "regmirror_upstream_ratelimit_remaining",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

/// A Prometheus server scraping `target` every second, on its own port and data directory.
struct Prometheus {
    _proc: ChildProc,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        let binary = require_tool("prometheus");
        let dir = tempdir("prometheus-");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 scrape_configs:\n  - job_name: regmirror\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path());
        let mut proc = ChildProc::spawn("prometheus", cmd, &dir.path().join("prometheus.log"));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "prometheus exited with {status}:\n{}",
                    common::log_tail(proc.log_path(), 4000)
                );
            }
            if let Ok(r) = http().get(format!("{url}/-/ready")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Prometheus {
            _proc: proc,
            url,
            _dir: dir,
        }
    }

    /// An instant query; panics unless Prometheus accepts it.
    async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let response = http()
            .get(format!(
                "{}/api/v1/query?query={}",
                self.url,
                form_urlencoded::byte_serialize(promql.as_bytes()).collect::<String>()
            ))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls `promql` until `accept` likes the result, for at most `timeout`.
    async fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        accept: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql).await;
            if accept(&result) {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} did not give the expected result in {timeout:?}; last: {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn scalar(result: &[serde_json::Value]) -> Option<f64> {
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_metrics_listener_and_counts_our_hits() {
    let fake = Fake::start().await;
    fake.faults.require_token.store(true, Ordering::SeqCst);
    fake.put_image("library/app", "1", &[100_000, 3_000], 4);
    let (hub_url, _hub) = Hub::start(&fake).await;
    let metrics_port = free_port();
    let mirror = Regmirror::start(&config(
        &hub_url,
        &format!("metrics: {{ listen: 127.0.0.1:{metrics_port} }}\nlog: {{ level: info }}\n"),
    ))
    .await;
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");

    // /metrics moved to its own port.
    assert_eq!(get_text(&format!("{}/metrics", mirror.url())).await.0, 404);
    let (first, again) = traffic(&mirror.url()).await;
    assert_eq!((first.hits, again.hits), (0, again.requests));

    // promtool accepts the exposition, with no lint complaints.
    let promtool = require_tool("promtool");
    let (status, exposition) = get_text(&metrics_url).await;
    assert_eq!(status, 200);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &exposition).unwrap();
    let out = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prometheus = Prometheus::start(&format!("127.0.0.1:{metrics_port}")).await;
    let hits = again.hits as f64;
    let result = prometheus
        .wait_for(
            r#"sum(regmirror_cache_requests_total{job="regmirror",result="hit"})"#,
            Duration::from_secs(30),
            |r| scalar(r) == Some(hits),
        )
        .await;
    assert_eq!(
        scalar(&result),
        Some(hits),
        "Prometheus saw the {hits} hits we caused"
    );
    let up = prometheus.query(r#"up{job="regmirror"}"#).await;
    assert_eq!(scalar(&up), Some(1.0));
    let remaining = prometheus
        .query(r#"regmirror_upstream_ratelimit_remaining{upstream="docker.io"}"#)
        .await;
    assert_eq!(
        scalar(&remaining),
        Some((RATE_LIMIT - 1) as f64),
        "one manifest GET counted"
    );

    // Every dashboard query is valid PromQL and shows data for this traffic. Rates need two
    // scrapes of each series, so poll (bounded) rather than sleep.
    for expr in dashboard_exprs() {
        let promql = expand_grafana_variables(&expr);
        prometheus
            .wait_for(&promql, Duration::from_secs(15), |r| !r.is_empty())
            .await;
    }
}
