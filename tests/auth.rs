//! In-process tests of upstream authentication and of the mirror's own access control.
//!
//! The upstream here is a small registry of our own (basic or bearer auth, blob redirects to a
//! "CDN" that records what it was sent) with a token server that records every token request
//! and can expire or revoke what it issued: the faults and the hostile behaviour a real
//! registry cannot be made to show. Every log line regmirror writes (at debug level) and every
//! response a test sees are searched for the secrets at the end of each test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

const USER: &str = "mirror-bot";
const PASSWORD: &str = "pw-7f3a9c1e-upstream-secret";
const MIRROR_USER: &str = "alice";
const MIRROR_PASSWORD: &str = "pw-1b2c3d-mirror-secret";

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

// ---------------------------------------------------------------------------------------------
// Everything regmirror logged, for the secret search.

#[derive(Clone)]
struct LogSink;

fn log_buffer() -> &'static Mutex<Vec<u8>> {
    static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    BUFFER.get_or_init(Default::default)
}

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Debug-level logs of the whole test binary go to one buffer.
fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(|| LogSink)
            .with_ansi(false)
            .init();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

/// Everything the tests saw from regmirror: status, headers and bodies.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, HeaderMap, Bytes) {
        let response = request.send().await.expect("request to regmirror");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("body");
        let mut text = format!("{status}\n");
        for (name, value) in &headers {
            text.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        text.push_str(&String::from_utf8_lossy(&body));
        self.0.lock().unwrap().push(text);
        (status, headers, body)
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// Fails if any secret, or the Basic header made from it, appears in what regmirror wrote.
fn assert_no_secrets(seen: &Seen, secrets: &[String]) {
    let haystack = format!("{}\n{}", logs(), seen.text());
    assert!(haystack.len() > 1000, "the search must cover something");
    for secret in secrets {
        for form in [
            secret.clone(),
            basic(USER, secret),
            basic(MIRROR_USER, secret),
        ] {
            assert!(
                !haystack.contains(&form),
                "a secret ({}…) leaked into regmirror's logs or responses",
                &secret[..6.min(secret.len())]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream: a registry with one image per repository, basic or bearer auth.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Basic,
    Bearer,
}

/// What a server was sent: path and `Authorization`.
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// One token request: method, scope, `Authorization`, form body.
type TokenRequest = (String, String, Option<String>, String);

#[derive(Default)]
struct Tokens {
    /// token → (scope, expiry)
    issued: Mutex<HashMap<String, (String, Instant)>>,
    /// Every token request: (method, scope, Authorization, form body).
    requests: Mutex<Vec<TokenRequest>>,
    expires_in: AtomicU64,
    next: AtomicUsize,
}

impl Tokens {
    fn issued_tokens(&self) -> Vec<String> {
        self.issued.lock().unwrap().keys().cloned().collect()
    }
    fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }
    fn revoke_all(&self) {
        self.issued.lock().unwrap().clear();
    }
}

struct Registry {
    mode: Mode,
    realm: String,
    tokens: Arc<Tokens>,
    log: Log,
    /// repository → (manifest, config, layer)
    images: HashMap<String, (Bytes, Bytes, Bytes)>,
    redirect_blobs_to: Option<String>,
}

struct Server {
    addr: SocketAddr,
    log: Log,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn image(repo: &str) -> (Bytes, Bytes, Bytes) {
    let config = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","repo":"{repo}"}}"#
    ));
    let layer = Bytes::from(format!("layer of {repo} ").repeat(500));
    let manifest = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        sha(&config),
        config.len(),
        sha(&layer),
        layer.len()
    ));
    (manifest, config, layer)
}

/// Starts the token server: Basic `USER:PASSWORD` gets any scope, a refresh token
/// `REFRESH` by POST too, anonymous requests only `public/` repositories.
async fn token_server(tokens: Arc<Tokens>, refresh: Option<String>) -> Server {
    #[derive(Clone)]
    struct S(Arc<Tokens>, Option<String>, Log);
    async fn token(
        State(S(tokens, refresh, log)): State<S>,
        method: axum::http::Method,
        uri: Uri,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        log.lock().unwrap().push((uri.to_string(), auth.clone()));
        let params: HashMap<String, String> = if method == "POST" {
            form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect()
        } else {
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect()
        };
        let scope = params.get("scope").cloned().unwrap_or_default();
        tokens.requests.lock().unwrap().push((
            method.to_string(),
            scope.clone(),
            auth.clone(),
            body,
        ));
        let authorized = auth.as_deref() == Some(basic(USER, PASSWORD).as_str())
            || (method == "POST"
                && refresh.is_some()
                && params.get("grant_type").map(String::as_str) == Some("refresh_token")
                && params.get("refresh_token") == refresh.as_ref());
        let public = scope.starts_with("repository:public/");
        if auth.is_some() && !authorized {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        if !authorized && !public {
            // Like Docker Hub: an anonymous token that grants nothing.
            return (
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"token":"anonymous-nothing"}"#,
            )
                .into_response();
        }
        let n = tokens.next.fetch_add(1, Ordering::SeqCst);
        let token = format!(
            "tok-{n}-{}",
            hex::encode(Sha256::digest(format!("{n}{scope}{:?}", Instant::now())))
        );
        let lifetime = tokens.expires_in.load(Ordering::SeqCst);
        tokens.issued.lock().unwrap().insert(
            token.clone(),
            (scope, Instant::now() + Duration::from_secs(lifetime)),
        );
        let body = serde_json::json!({"token": token, "expires_in": lifetime});
        (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
    let log: Log = Default::default();
    let app = Router::new()
        .route("/token", any(token))
        .with_state(S(tokens, refresh, log.clone()));
    Server {
        addr: serve(app).await,
        log,
    }
}

async fn registry(
    mode: Mode,
    realm: String,
    tokens: Arc<Tokens>,
    redirect_blobs_to: Option<String>,
) -> Server {
    async fn handle(State(reg): State<Arc<Registry>>, uri: Uri, headers: HeaderMap) -> Response {
        let path = uri.path().to_owned();
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        reg.log.lock().unwrap().push((path.clone(), auth.clone()));
        let rest = path.strip_prefix("/v2/").unwrap_or_default();
        let (repo, kind, reference) = if let Some((repo, r)) = rest.split_once("/manifests/") {
            (repo.to_owned(), "manifests", r.to_owned())
        } else if let Some((repo, r)) = rest.split_once("/blobs/") {
            (repo.to_owned(), "blobs", r.to_owned())
        } else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let scope = format!("repository:{repo}:pull");
        let ok = match reg.mode {
            Mode::Basic => auth.as_deref() == Some(basic(USER, PASSWORD).as_str()),
            Mode::Bearer => auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .and_then(|t| reg.tokens.issued.lock().unwrap().get(t).cloned())
                .is_some_and(|(s, expires)| s == scope && expires > Instant::now()),
        };
        if !ok {
            let challenge = match reg.mode {
                Mode::Basic => r#"Basic realm="test""#.to_owned(),
                Mode::Bearer => format!(
                    r#"Bearer realm="{}",service="test-registry",scope="{scope}""#,
                    reg.realm
                ),
            };
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, challenge)],
            )
                .into_response();
        }
        let Some((manifest, config, layer)) = reg.images.get(&repo) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        if kind == "manifests" {
            return Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/vnd.oci.image.manifest.v1+json",
                )
                .header("docker-content-digest", sha(manifest))
                .body(Body::from(manifest.clone()))
                .unwrap();
        }
        let blob = [config, layer].into_iter().find(|b| sha(b) == reference);
        match (blob, &reg.redirect_blobs_to) {
            (None, _) => StatusCode::NOT_FOUND.into_response(),
            (Some(_), Some(cdn)) => (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("{cdn}/cdn/{reference}?sig=abc"))],
            )
                .into_response(),
            (Some(blob), None) => Response::builder()
                .header(header::CONTENT_LENGTH, blob.len())
                .body(Body::from(blob.clone()))
                .unwrap(),
        }
    }
    let log: Log = Default::default();
    let images = ["private/app", "public/app", "private/other"]
        .into_iter()
        .map(|r| (r.to_owned(), image(r)))
        .collect();
    let reg = Arc::new(Registry {
        mode,
        realm,
        tokens,
        log: log.clone(),
        images,
        redirect_blobs_to,
    });
    let app = Router::new()
        .route("/v2/{*rest}", any(handle))
        .with_state(reg);
    Server {
        addr: serve(app).await,
        log,
    }
}

/// A blob store on another port that records what it was sent.
async fn cdn() -> Server {
    async fn blob(State(log): State<Log>, uri: Uri, headers: HeaderMap) -> Response {
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        log.lock().unwrap().push((uri.to_string(), auth));
        let digest = uri.path().strip_prefix("/cdn/").unwrap_or_default();
        for repo in ["private/app", "public/app", "private/other"] {
            let (_, config, layer) = image(repo);
            for b in [config, layer] {
                if sha(&b) == digest {
                    return Response::builder()
                        .header(header::CONTENT_LENGTH, b.len())
                        .body(Body::from(b))
                        .unwrap();
                }
            }
        }
        StatusCode::NOT_FOUND.into_response()
    }
    let log: Log = Default::default();
    let app = Router::new()
        .route("/cdn/{digest}", get(blob))
        .with_state(log.clone());
    Server {
        addr: serve(app).await,
        log,
    }
}

// ---------------------------------------------------------------------------------------------
// regmirror in process.

struct Mirror {
    url: String,
    state: regmirror::AppState,
    _dir: tempfile::TempDir,
}

/// Starts regmirror with `upstreams` (YAML mapping entries, indented two spaces) and `extra`
/// top-level YAML; the default upstream is `reg.test`.
async fn mirror(upstreams: &str, extra: &str) -> Mirror {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "listen: 127.0.0.1:0\nstorage: {{ root: {:?} }}\ndefault_upstream: reg.test\nupstreams:\n{upstreams}\n{extra}\n",
        dir.path().join("data")
    );
    let config = regmirror::Config::parse(&text, "test").unwrap_or_else(|e| panic!("{e}"));
    let state = regmirror::state(&config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = regmirror::app(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Mirror {
        url,
        state,
        _dir: dir,
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Pulls the manifest and both blobs of `repo`; answers the manifest's status and error code.
async fn pull(seen: &Seen, mirror: &Mirror, repo: &str) -> (u16, String) {
    let http = client();
    let (status, _, body) = seen
        .send(http.get(format!("{}/v2/{repo}/manifests/v1", mirror.url)))
        .await;
    if status != 200 {
        let code = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["errors"][0]["code"]
            .as_str()
            .unwrap()
            .to_owned();
        return (status, code);
    }
    let (manifest, config, layer) = image(repo);
    assert_eq!(body, manifest);
    for blob in [config, layer] {
        let (status, _, body) = seen
            .send(http.get(format!("{}/v2/{repo}/blobs/{}", mirror.url, sha(&blob))))
            .await;
        assert_eq!(status, 200, "{repo} blob");
        assert_eq!(body, blob, "{repo} blob bytes");
    }
    (200, String::new())
}

fn secrets(tokens: &Tokens) -> Vec<String> {
    let mut all = vec![
        PASSWORD.to_owned(),
        MIRROR_PASSWORD.to_owned(),
        "refresh-9d8e7f-identity".to_owned(),
    ];
    all.extend(tokens.issued_tokens());
    all
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_go_to_a_foreign_token_realm() {
    let tokens = Arc::new(Tokens::default());
    tokens.expires_in.store(300, Ordering::SeqCst);
    let realm_server = token_server(tokens.clone(), None).await;
    // The upstream is 127.0.0.1; its challenge names `localhost`: another host, as far as the
    // credentials are concerned.
    let realm = format!("http://localhost:{}/token", realm_server.addr.port());
    let upstream = registry(Mode::Bearer, realm, tokens.clone(), None).await;
    let seen = Seen::default();
    let entry = format!(
        "  reg.test: {{ url: '{}', username: {USER}, password: {PASSWORD} }}",
        upstream.url()
    );
    let m = mirror(&entry, "").await;
    assert_eq!(
        pull(&seen, &m, "public/app").await,
        (200, String::new()),
        "anonymous tokens still serve public content"
    );
    assert_eq!(
        pull(&seen, &m, "private/app").await,
        (403, "DENIED".to_owned())
    );
    let requests = tokens.requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|(_, _, auth, _)| auth.is_none()),
        "the foreign realm received credentials: {requests:?}"
    );
    assert!(logs().contains("token realm is neither on the upstream's domain nor in token_realms"));

    // Allowed explicitly, the same realm gets them and the private image is served.
    let entry = format!(
        "  reg.test: {{ url: '{}', username: {USER}, password: {PASSWORD}, token_realms: ['localhost:{}'] }}",
        upstream.url(),
        realm_server.addr.port()
    );
    let m = mirror(&entry, "").await;
    assert_eq!(pull(&seen, &m, "private/app").await, (200, String::new()));
    let with_credentials = tokens
        .requests()
        .iter()
        .filter(|(_, _, auth, _)| auth.as_deref() == Some(basic(USER, PASSWORD).as_str()))
        .count();
    assert_eq!(
        with_credentials, 1,
        "one token fetch for private/app's scope"
    );
    assert_no_secrets(&seen, &secrets(&tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_per_scope_cached_until_expiry_and_refreshed_on_401() {
    let tokens = Arc::new(Tokens::default());
    tokens.expires_in.store(300, Ordering::SeqCst);
    // The realm is on the upstream's own host (another port): credentials may go there.
    let realm_server = token_server(tokens.clone(), None).await;
    let realm = format!("{}/token", realm_server.url());
    let upstream = registry(Mode::Bearer, realm, tokens.clone(), None).await;
    let seen = Seen::default();
    let password_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password_file.path(), format!("{PASSWORD}\n")).unwrap();
    let entry = format!(
        "  reg.test: {{ url: '{}', username: {USER}, password_file: {:?} }}",
        upstream.url(),
        password_file.path()
    );
    let m = mirror(&entry, "cache: { tag_ttl: 0s }").await;
    assert_eq!(pull(&seen, &m, "private/app").await.0, 200);
    assert_eq!(pull(&seen, &m, "private/other").await.0, 200);
    let scopes: Vec<String> = tokens
        .requests()
        .into_iter()
        .map(|(_, s, _, _)| s)
        .collect();
    assert_eq!(
        scopes,
        [
            "repository:private/app:pull",
            "repository:private/other:pull"
        ],
        "one token per repository scope; the registry refuses a token of another scope"
    );

    // Cached: revalidating the tag (tag_ttl 0s) reuses the token.
    assert_eq!(pull(&seen, &m, "private/app").await.0, 200);
    assert_eq!(tokens.requests().len(), 2, "cached token reused");

    // Revoked upstream: the 401 makes regmirror fetch a new token and retry once.
    tokens.revoke_all();
    assert_eq!(pull(&seen, &m, "private/app").await.0, 200);
    assert_eq!(tokens.requests().len(), 3, "refreshed after a 401");

    // Short-lived tokens are fetched again once expired, without waiting for a 401.
    tokens.expires_in.store(1, Ordering::SeqCst);
    tokens.revoke_all();
    assert_eq!(pull(&seen, &m, "private/other").await.0, 200);
    let before = tokens.requests().len();
    // Past the token's lifetime by the process's clock (no sleep).
    m.state.cache.clock().advance(Duration::from_secs(2));
    assert_eq!(pull(&seen, &m, "private/other").await.0, 200);
    let after = tokens.requests();
    assert_eq!(after.len(), before + 1, "expired token replaced");
    assert_no_secrets(&seen, &secrets(&tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_never_shared_between_upstreams() {
    let tokens = Arc::new(Tokens::default());
    tokens.expires_in.store(300, Ordering::SeqCst);
    let realm_server = token_server(tokens.clone(), None).await;
    let upstream = registry(
        Mode::Bearer,
        format!("{}/token", realm_server.url()),
        tokens.clone(),
        None,
    )
    .await;
    let seen = Seen::default();
    // Two names for one registry: one with credentials, one without.
    let entries = format!(
        "  reg.test: {{ url: '{url}', username: {USER}, password: {PASSWORD} }}\n  anon.test: {{ url: '{url}' }}",
        url = upstream.url()
    );
    let m = mirror(&entries, "").await;
    assert_eq!(pull(&seen, &m, "private/app").await.0, 200);
    let http = client();
    let (status, _, _) = seen
        .send(http.get(format!(
            "{}/v2/private/app/manifests/v1?ns=anon.test",
            m.url
        )))
        .await;
    assert_eq!(
        status, 403,
        "the anonymous upstream must not borrow the other's token"
    );
    let anon_sent: Vec<_> = upstream
        .requests()
        .into_iter()
        .filter_map(|(_, a)| a)
        .filter(|a| a.contains("anonymous-nothing"))
        .collect();
    assert!(
        !anon_sent.is_empty(),
        "the anonymous upstream used its own anonymous token"
    );
    assert_no_secrets(&seen, &secrets(&tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_tokens_are_exchanged_by_post() {
    let tokens = Arc::new(Tokens::default());
    tokens.expires_in.store(300, Ordering::SeqCst);
    let refresh = "refresh-9d8e7f-identity".to_owned();
    let realm_server = token_server(tokens.clone(), Some(refresh.clone())).await;
    let upstream = registry(
        Mode::Bearer,
        format!("{}/token", realm_server.url()),
        tokens.clone(),
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config_json = dir.path().join("config.json");
    let host = upstream.addr.to_string();
    std::fs::write(
        &config_json,
        format!(r#"{{"auths":{{"{host}":{{"identitytoken":"{refresh}"}}}}}}"#),
    )
    .unwrap();
    let seen = Seen::default();
    let entry = format!(
        "  reg.test: {{ url: '{}', docker_config: {config_json:?} }}",
        upstream.url()
    );
    let m = mirror(&entry, "").await;
    assert_eq!(pull(&seen, &m, "private/app").await.0, 200);
    let requests = tokens.requests();
    assert_eq!(requests.len(), 1);
    let (method, scope, auth, body) = &requests[0];
    assert_eq!(
        (method.as_str(), scope.as_str(), auth),
        ("POST", "repository:private/app:pull", &None)
    );
    assert!(body.contains("grant_type=refresh_token"), "{body}");
    assert_no_secrets(&seen, &secrets(&tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_upstream_and_cdn_redirects_without_authorization() {
    let cdn = cdn().await;
    let tokens = Arc::new(Tokens::default());
    let upstream = registry(Mode::Basic, String::new(), tokens.clone(), Some(cdn.url())).await;
    let seen = Seen::default();
    let entry = format!(
        "  reg.test: {{ url: '{}', username: {USER}, password: '${{REGMIRROR_AUTH_TEST_PASSWORD}}' }}",
        upstream.url()
    );
    std::env::set_var("REGMIRROR_AUTH_TEST_PASSWORD", PASSWORD);
    let m = mirror(&entry, "").await;
    assert_eq!(pull(&seen, &m, "private/app").await, (200, String::new()));
    let cdn_requests = cdn.requests();
    assert_eq!(
        cdn_requests.len(),
        2,
        "both blobs came from the CDN: {cdn_requests:?}"
    );
    assert!(
        cdn_requests.iter().all(|(_, auth)| auth.is_none()),
        "the upstream's Authorization followed a redirect to another host: {cdn_requests:?}"
    );
    // After the first Basic challenge the credentials are sent up front: one 401 in all.
    let sent = upstream.requests();
    let unauthenticated = sent.iter().filter(|(_, a)| a.is_none()).count();
    assert_eq!(unauthenticated, 1, "{sent:?}");
    assert!(sent.iter().filter(|(_, a)| a.is_some()).count() >= 3);
    assert_no_secrets(&seen, &secrets(&tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_not_anonymous() {
    let tokens = Arc::new(Tokens::default());
    let upstream = registry(Mode::Basic, String::new(), tokens.clone(), None).await;
    let seen = Seen::default();
    let entry = format!(
        "  reg.test: {{ url: '{}', username: {USER}, password: wrong-{PASSWORD} }}",
        upstream.url()
    );
    let m = mirror(&entry, "").await;
    assert_eq!(
        pull(&seen, &m, "private/app").await,
        (403, "DENIED".to_owned())
    );
    assert_no_secrets(&seen, &[format!("wrong-{PASSWORD}")]);
}

#[tokio::test]
async fn missing_credentials_are_start_up_errors_naming_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let helper_config = dir.path().join("config.json");
    std::fs::write(
        &helper_config,
        r#"{"credHelpers":{"reg.test":"regmirror-test-absent"}}"#,
    )
    .unwrap();
    let cases = [
        (
            "password: '${REGMIRROR_TEST_SURELY_UNSET}', username: u",
            "REGMIRROR_TEST_SURELY_UNSET is not set",
        ),
        (
            "username: u, password_file: /nonexistent/secret",
            "/nonexistent/secret",
        ),
        (
            &*format!("docker_config: {:?}", dir.path().join("missing.json")),
            "missing.json",
        ),
        (
            &*format!("docker_config: {helper_config:?}"),
            "docker-credential-regmirror-test-absent",
        ),
        ("ca: /nonexistent/ca.crt", "upstreams.reg.test.ca"),
    ];
    for (fields, want) in cases {
        let text = format!(
            "storage: {{ root: {:?} }}\ndefault_upstream: reg.test\nupstreams:\n  reg.test: {{ url: 'http://127.0.0.1:9', {fields} }}\n",
            dir.path().join("data")
        );
        let config = regmirror::Config::parse(&text, "t.yml").unwrap();
        let err = regmirror::check(&config).unwrap_err().to_string();
        assert!(
            err.contains("upstreams.reg.test") && err.contains(want),
            "{fields}: {err}"
        );
        let err = match regmirror::state(&config).await {
            Ok(_) => panic!("{fields}: started without its credentials"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains(want), "{fields}: {err}");
    }
    // Impossible combinations are refused by validation, all at once.
    let text = "default_upstream: a.io\nupstreams:\n  a.io: { url: 'https://a.io', password: x }\n  b.io: { url: 'https://b.io', client_cert: c.pem, proxy: 'ftp://p' }\n";
    let err = regmirror::Config::parse(text, "t.yml")
        .unwrap_err()
        .to_string();
    for want in [
        "upstreams.a.io.username",
        "upstreams.b.io.client_cert",
        "upstreams.b.io.proxy",
    ] {
        assert!(err.contains(want), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_access_control_challenges_and_keeps_probes_open() {
    let tokens = Arc::new(Tokens::default());
    let upstream = registry(Mode::Basic, String::new(), tokens.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash(MIRROR_PASSWORD, 5).unwrap();
    std::fs::write(&htpasswd, format!("{MIRROR_USER}:{hash}\n")).unwrap();
    let seen = Seen::default();
    let entry = format!(
        "  reg.test: {{ url: '{}', username: {USER}, password: {PASSWORD} }}",
        upstream.url()
    );
    let m = mirror(&entry, &format!("auth: {{ htpasswd: {htpasswd:?} }}")).await;
    let http = client();
    for (path, authorization, want) in [
        ("/v2/", None, 401),
        ("/v2/private/app/manifests/v1", None, 401),
        (
            "/v2/private/app/manifests/v1",
            Some(basic(MIRROR_USER, "wrong")),
            401,
        ),
        (
            "/v2/private/app/manifests/v1",
            Some(basic("mallory", MIRROR_PASSWORD)),
            401,
        ),
        (
            "/v2/private/app/manifests/v1",
            Some(format!("Bearer {MIRROR_PASSWORD}")),
            401,
        ),
        ("/status", None, 401),
        ("/healthz", None, 200),
        ("/readyz", None, 200),
        ("/metrics", None, 200),
        ("/v2/", Some(basic(MIRROR_USER, MIRROR_PASSWORD)), 200),
        (
            "/v2/private/app/manifests/v1",
            Some(basic(MIRROR_USER, MIRROR_PASSWORD)),
            200,
        ),
    ] {
        let mut request = http.get(format!("{}{path}", m.url));
        if let Some(value) = &authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let (status, headers, body) = seen.send(request).await;
        assert_eq!(
            status,
            want,
            "{path} with {:?}",
            authorization.as_ref().map(|a| &a[..6])
        );
        if status == 401 {
            assert_eq!(
                headers[header::WWW_AUTHENTICATE],
                r#"Basic realm="regmirror""#
            );
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
        }
    }
    assert!(!logs().is_empty());
    assert_no_secrets(&seen, &secrets(&tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mirror_with_upstream_credentials_warns() {
    let tokens = Arc::new(Tokens::default());
    let upstream = registry(Mode::Basic, String::new(), tokens, None).await;
    let entry = format!("  warn.test: {{ url: '{}', username: {USER}, password: {PASSWORD} }}\n  reg.test: {{ url: '{}' }}", upstream.url(), upstream.url());
    let _m = mirror(&entry, "").await;
    let logs = logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("mirror has no access control") && l.contains("warn.test"))
        .unwrap_or_else(|| panic!("no warning in:\n{logs}"));
    assert!(warning.contains("WARN"), "{warning}");
}
