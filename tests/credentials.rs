//! End-to-end tests of regmirror's side of upstream security, with the real programs:
//! distribution with htpasswd, distribution with `auth: token` trusting a token server this
//! test runs (ES256 JWTs signed with a key made by openssl), distribution serving TLS and
//! requiring client certificates, a credential helper, and tinyproxy as a forward proxy.
//! regmirror runs as its built binary at debug level; skopeo pulls through it. Every test
//! ends by searching regmirror's log, every response it gave and skopeo's output for the
//! secrets it was given or that were issued to it.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use common::distribution::TokenAuth;
use common::pki::{self, Ca};
use common::{
    assert_skopeo_dir_holds, http, push_image, require_tool, run, skopeo_copy_to_dir, tempdir,
    ChildProc, Distribution, DistributionOptions, Pusher, Regmirror,
};

const USER: &str = "puller";
const PASSWORD: &str = "pw-e2e-41c7d9-upstream";

/// What the tests saw from regmirror, plus its log, searched for secrets at the end.
#[derive(Default)]
struct Haystack(Vec<String>);

impl Haystack {
    async fn get(&mut self, url: &str) -> (u16, String) {
        let response = http().get(url).send().await.expect("request to regmirror");
        let status = response.status().as_u16();
        let mut text = format!("{status}\n");
        for (name, value) in response.headers() {
            text.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        let body = response.text().await.unwrap_or_default();
        text.push_str(&body);
        self.0.push(text);
        (status, body)
    }

    fn add(&mut self, text: impl ToString) {
        self.0.push(text.to_string());
    }

    /// Fails if any secret, raw or as a Basic header, is in the log or anything seen.
    fn assert_clean(&self, mirror: &Regmirror, secrets: &[String]) {
        let log = mirror.log();
        assert!(log.contains("DEBUG"), "the log is at debug level");
        let all = format!("{log}\n{}", self.0.join("\n"));
        for secret in secrets {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{secret}"));
            assert!(
                !all.contains(secret.as_str()) && !all.contains(&basic),
                "a secret ({}…) leaked into regmirror's log or responses",
                &secret[..8.min(secret.len())]
            );
        }
    }
}

/// skopeo copy through regmirror, checking the bytes against what was pushed.
async fn pull_through(
    hay: &mut Haystack,
    mirror: &Regmirror,
    path: &str,
    img: &common::PushedImage,
) {
    let out_dir = tempdir("pulled-");
    let src = format!("docker://{}/{path}", mirror.host());
    let out = skopeo_copy_to_dir(&src, out_dir.path(), false).await;
    hay.add(&out);
    assert!(
        out.success,
        "pull of {path} through regmirror failed: {out}\n--- log ---\n{}",
        tail(mirror)
    );
    assert_skopeo_dir_holds(out_dir.path(), img, "manifest.json");
}

fn tail(mirror: &Regmirror) -> String {
    let log = mirror.log();
    log[log.len().saturating_sub(4000)..].to_owned()
}

fn yaml_upstreams(entries: &[String]) -> String {
    format!(
        "listen: @LISTEN@\nstorage: {{ root: @ROOT@ }}\ndefault_upstream: reg.test\nlog: {{ level: debug }}\nupstreams:\n{}\n",
        entries.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_upstream_with_password_file_and_credential_helper() {
    let dist = Distribution::start_with(DistributionOptions {
        htpasswd: Some((USER.into(), PASSWORD.into())),
        ..Default::default()
    })
    .await;
    let img = Pusher::new(&dist.url())
        .basic_auth(USER, PASSWORD)
        .push_image("team/app", "v1", &common::ImageSpec::new(&[2000, 300_000]))
        .await;
    let dir = tempdir("creds-");
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    // A credential helper, as `docker-credential-<name> get` is run by Docker: it reads the
    // server on stdin and answers JSON.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let helper = bin.join("docker-credential-regmirrortest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\necho \"$server\" >> {calls}\n[ \"$1\" = get ] || exit 3\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n",
            calls = dir.path().join("helper-calls").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config_json = dir.path().join("config.json");
    std::fs::write(
        &config_json,
        format!(r#"{{"credHelpers":{{"{}":"regmirrortest"}}}}"#, dist.host()),
    )
    .unwrap();
    let yaml = yaml_upstreams(&[
        format!(
            "  reg.test: {{ url: '{}', username: {USER}, password_file: {password_file:?} }}",
            dist.url()
        ),
        format!(
            "  helper.test: {{ url: '{}', docker_config: {config_json:?} }}",
            dist.url()
        ),
        format!(
            "  wrong.test: {{ url: '{}', username: {USER}, password: not-the-password }}",
            dist.url()
        ),
        format!("  anon.test: {{ url: '{}' }}", dist.url()),
    ]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mirror = Regmirror::start_with_env(&yaml, &[("PATH", &path)]).await;
    let mut hay = Haystack::default();
    pull_through(&mut hay, &mirror, "team/app:v1", &img).await;
    pull_through(&mut hay, &mirror, "helper.test/team/app:v1", &img).await;
    let calls = std::fs::read_to_string(dir.path().join("helper-calls")).unwrap();
    assert_eq!(
        calls.trim(),
        dist.host(),
        "the helper was asked once, for the upstream's host"
    );
    for ns in ["wrong.test", "anon.test"] {
        let (status, body) = hay
            .get(&format!(
                "{}/v2/team/app/manifests/v1?ns={ns}",
                mirror.url()
            ))
            .await;
        assert_eq!(status, 403, "{ns}: {body}");
        assert!(body.contains("DENIED"), "{body}");
    }
    assert!(
        mirror.log().contains("mirror has no access control"),
        "start-up warns that the credentials are open to anyone"
    );
    hay.assert_clean(&mirror, &[PASSWORD.into(), "not-the-password".into()]);
}

// ---------------------------------------------------------------------------------------------
// A token server for distribution's `auth: token`.

/// (scope, `Authorization`) of every token request.
type Requests = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct TokenServer {
    url: String,
    /// (scope, Authorization header) of every request.
    requests: Requests,
    issued: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct Signer {
    key: Arc<ring::signature::EcdsaKeyPair>,
    cert_der: Arc<Vec<u8>>,
    requests: Requests,
    issued: Arc<Mutex<Vec<String>>>,
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    /// An ES256 JWT as distribution's token auth wants it: `x5c` names the signing
    /// certificate, which `rootcertbundle` trusts.
    fn jwt(&self, subject: &str, access: serde_json::Value) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(self.cert_der.as_slice())],
        });
        let claims = serde_json::json!({
            "iss": "regmirror-test-issuer",
            "sub": subject,
            "aud": "regmirror-test-registry",
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{now}-{}", self.issued.lock().unwrap().len()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let rng = ring::rand::SystemRandom::new();
        let signature = self.key.sign(&rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64url(signature.as_ref()))
    }
}

async fn token_server(dir: &Path) -> (TokenServer, std::path::PathBuf) {
    async fn token(State(signer): State<Signer>, uri: Uri, headers: HeaderMap) -> Response {
        let params: HashMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let scope = params.get("scope").cloned().unwrap_or_default();
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        signer
            .requests
            .lock()
            .unwrap()
            .push((scope.clone(), auth.clone()));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        let (subject, access) = match auth {
            Some(a) if a == expected => {
                // `repository:<name>:pull` → that repository, pull only.
                let mut parts = scope.splitn(3, ':');
                let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                (
                    USER,
                    serde_json::json!([{"type": kind, "name": name, "actions": ["pull"]}]),
                )
            }
            Some(_) => return StatusCode::UNAUTHORIZED.into_response(),
            // Anonymous: a valid token that grants nothing, as Docker Hub's for private images.
            None => ("", serde_json::json!([])),
        };
        let jwt = signer.jwt(subject, access);
        signer.issued.lock().unwrap().push(jwt.clone());
        let body = serde_json::json!({"token": jwt, "expires_in": 300});
        (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
    let key = pki::signing_key(dir, "token-signer");
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.key_pkcs8_der,
        &rng,
    )
    .expect("openssl's PKCS#8 P-256 key");
    let signer = Signer {
        key: Arc::new(pair),
        cert_der: Arc::new(key.cert_der),
        requests: Default::default(),
        issued: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = TokenServer {
        url,
        requests: signer.requests.clone(),
        issued: signer.issued.clone(),
    };
    let app = Router::new().route("/token", get(token)).with_state(signer);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (server, key.cert_pem)
}

/// Two distributions on one storage directory: an open one to push to, and the guarded one
/// regmirror pulls from.
fn shared_root(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("registry-data");
    std::fs::create_dir_all(&root).unwrap();
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_upstream_with_jwt_token_server() {
    let dir = tempdir("token-");
    let (tokens, root_cert) = token_server(dir.path()).await;
    let root = shared_root(dir.path());
    let open = Distribution::start_with(DistributionOptions {
        root: Some(root.clone()),
        ..Default::default()
    })
    .await;
    let app = push_image(&open.url(), "private/app", "v1", &[1500, 200_000]).await;
    let other = push_image(&open.url(), "private/other", "v2", &[900]).await;
    let guarded = Distribution::start_with(DistributionOptions {
        root: Some(root),
        token: Some(TokenAuth {
            realm: format!("{}/token", tokens.url),
            service: "regmirror-test-registry".into(),
            issuer: "regmirror-test-issuer".into(),
            rootcertbundle: root_cert,
        }),
        ..Default::default()
    })
    .await;
    let direct = http()
        .get(format!("{}/v2/private/app/manifests/v1", guarded.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401, "distribution demands a token");

    let yaml = yaml_upstreams(&[
        format!(
            "  reg.test: {{ url: '{}', username: '${{REGMIRROR_E2E_USER}}', password: '${{REGMIRROR_E2E_PASSWORD}}' }}",
            guarded.url()
        ),
        format!("  anon.test: {{ url: '{}' }}", guarded.url()),
    ]);
    let mirror = Regmirror::start_with_env(
        &yaml,
        &[
            ("REGMIRROR_E2E_USER", USER),
            ("REGMIRROR_E2E_PASSWORD", PASSWORD),
        ],
    )
    .await;
    let mut hay = Haystack::default();
    pull_through(&mut hay, &mirror, "private/app:v1", &app).await;
    pull_through(&mut hay, &mirror, "private/other:v2", &other).await;
    let requests = tokens.requests.lock().unwrap().clone();
    let scopes: Vec<&str> = requests.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        scopes,
        [
            "repository:private/app:pull",
            "repository:private/other:pull"
        ],
        "one token per repository, each cached for all of that repository's requests"
    );
    assert!(requests
        .iter()
        .all(|(_, auth)| auth.as_deref().is_some_and(|a| a.starts_with("Basic "))));

    // The anonymous upstream on the same registry gets its own token, which grants nothing.
    let (status, body) = hay
        .get(&format!(
            "{}/v2/private/app/manifests/v1?ns=anon.test",
            mirror.url()
        ))
        .await;
    assert_eq!(status, 403, "{body}");
    let last = tokens.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last, ("repository:private/app:pull".to_owned(), None));

    let mut secrets = vec![PASSWORD.to_owned()];
    secrets.extend(tokens.issued.lock().unwrap().iter().cloned());
    assert_eq!(secrets.len(), 4);
    hay.assert_clean(&mirror, &secrets);
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_requiring_client_certificates() {
    let dir = tempdir("mtls-");
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server("registry");
    let client = ca.client("client");
    let root = shared_root(dir.path());
    let open = Distribution::start_with(DistributionOptions {
        root: Some(root.clone()),
        ..Default::default()
    })
    .await;
    let img = push_image(&open.url(), "secure/app", "v1", &[1200, 50_000]).await;
    let guarded = Distribution::start_with(DistributionOptions {
        root: Some(root),
        tls: Some((server.cert.clone(), server.key.clone())),
        client_ca: Some(ca.cert.clone()),
        ..Default::default()
    })
    .await;
    // Docker's certs.d layout for the upstream: ca.crt, client.cert, client.key.
    let certs_d = dir.path().join("certs.d").join(guarded.host());
    std::fs::create_dir_all(&certs_d).unwrap();
    std::fs::copy(&ca.cert, certs_d.join("ca.crt")).unwrap();
    std::fs::copy(&client.cert, certs_d.join("client.cert")).unwrap();
    std::fs::copy(&client.key, certs_d.join("client.key")).unwrap();
    let yaml = yaml_upstreams(&[
        format!(
            "  reg.test: {{ url: '{}', certs_dir: {certs_d:?} }}",
            guarded.url()
        ),
        format!(
            "  keypair.test: {{ url: '{}', ca: {:?}, client_cert: {:?}, client_key: {:?} }}",
            guarded.url(),
            ca.cert,
            client.cert,
            client.key
        ),
        format!(
            "  nocert.test: {{ url: '{}', ca: {:?} }}",
            guarded.url(),
            ca.cert
        ),
        format!("  untrusted.test: {{ url: '{}' }}", guarded.url()),
    ]);
    let mirror = Regmirror::start(&yaml).await;
    let mut hay = Haystack::default();
    pull_through(&mut hay, &mirror, "secure/app:v1", &img).await;
    let (status, _) = hay
        .get(&format!(
            "{}/v2/secure/app/manifests/v1?ns=keypair.test",
            mirror.url()
        ))
        .await;
    assert_eq!(status, 200, "explicit ca, client_cert and client_key");

    for (ns, why) in [
        ("nocert.test", "client certificate"),
        ("untrusted.test", "not signed by a trusted CA"),
    ] {
        let (status, body) = hay
            .get(&format!(
                "{}/v2/secure/app/manifests/v1?ns={ns}",
                mirror.url()
            ))
            .await;
        assert_eq!(status, 502, "{ns}: {body}");
        assert!(
            !body.contains("certificate"),
            "no internal text to clients: {body}"
        );
        let log = mirror.log();
        assert!(
            log.lines()
                .any(|l| l.contains("upstream unreachable") && l.contains(why)),
            "{ns}: the log says why ({why}):\n{}",
            tail(&mirror)
        );
    }
    // The probe behind that hint: the guarded registry asks for a client certificate during
    // the handshake, a plain HTTP one cannot even do TLS.
    let probe = |url: String| async move {
        let url = reqwest::Url::parse(&url.replace("http://", "https://")).unwrap();
        regmirror::upstream::tls::asks_for_client_certificate(&url, Duration::from_secs(5)).await
    };
    assert!(probe(guarded.url()).await);
    assert!(!probe(open.url()).await);
    let key = std::fs::read_to_string(&client.key).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    hay.assert_clean(&mirror, &[key_body]);
    drop(open);
}

// ---------------------------------------------------------------------------------------------

struct Tinyproxy {
    _proc: ChildProc,
    port: u16,
    log: std::path::PathBuf,
}

impl Tinyproxy {
    async fn start(dir: &Path) -> Tinyproxy {
        let bin = require_tool("tinyproxy");
        let port = common::free_port();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\nMaxClients 50\nAllow 127.0.0.1\n",
                log.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-d").arg("-c").arg(&conf);
        let mut proc = ChildProc::spawn("tinyproxy", cmd, &dir.join("tinyproxy.out"));
        common::distribution::wait_for_tcp(port, &mut proc, Duration::from_secs(10)).await;
        Tinyproxy {
            _proc: proc,
            port,
            log,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request lines the proxy forwarded whose URL contains `part`.
    fn forwarded(&self, part: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Request (file descriptor") && l.contains(part))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_proxy_from_config_and_environment() {
    let dir = tempdir("proxy-");
    let proxy = Tinyproxy::start(dir.path()).await;
    let root = shared_root(dir.path());
    let dist = Distribution::start_with(DistributionOptions {
        root: Some(root.clone()),
        ..Default::default()
    })
    .await;
    let img = push_image(&dist.url(), "proxied/app", "v1", &[1000, 40_000]).await;
    let port = dist.host().rsplit(':').next().unwrap().to_owned();
    // The same content over HTTPS, reached through HTTPS_PROXY with CONNECT.
    let ca = Ca::new(dir.path(), "proxy-test-ca");
    let server = ca.server("registry");
    let tls_dist = Distribution::start_with(DistributionOptions {
        root: Some(root),
        tls: Some((server.cert.clone(), server.key.clone())),
        ..Default::default()
    })
    .await;
    // HTTP_PROXY applies to every upstream without a `proxy` of its own, except the hosts in
    // NO_PROXY (`localhost` here; the same registry is also reachable as 127.0.0.1).
    let yaml = yaml_upstreams(&[
        format!("  reg.test: {{ url: 'http://127.0.0.1:{port}' }}"),
        format!("  bypass.test: {{ url: 'http://localhost:{port}' }}"),
        format!("  direct.test: {{ url: 'http://127.0.0.1:{port}', proxy: direct }}"),
        format!(
            "  own.test: {{ url: 'http://localhost:{port}', proxy: '{}' }}",
            proxy.url()
        ),
        format!(
            "  tls.test: {{ url: '{}', ca: {:?} }}",
            tls_dist.url(),
            ca.cert
        ),
    ]);
    let mirror = Regmirror::start_with_env(
        &yaml,
        &[
            ("HTTP_PROXY", &proxy.url()),
            ("HTTPS_PROXY", &proxy.url()),
            ("NO_PROXY", "localhost"),
        ],
    )
    .await;
    let mut hay = Haystack::default();
    pull_through(&mut hay, &mirror, "proxied/app:v1", &img).await;
    let through_env = proxy.forwarded(&format!("http://127.0.0.1:{port}/v2/proxied/app/"));
    assert!(
        through_env >= 4,
        "manifest and 3 blobs through the proxy, saw {through_env}"
    );
    let manifest = format!("/v2/proxied/app/manifests/{}", img.manifest_digest);
    for (ns, via_proxy) in [
        ("bypass.test", false),
        ("direct.test", false),
        ("own.test", true),
    ] {
        let before = proxy.forwarded("/v2/proxied/app/manifests/");
        let upstream_before = dist.requests().await.len();
        let (status, body) = hay
            .get(&format!("{}{manifest}?ns={ns}", mirror.url()))
            .await;
        assert_eq!(status, 200, "{ns}: {body}");
        assert!(
            dist.requests().await.len() > upstream_before,
            "{ns} asked the upstream"
        );
        let after = proxy.forwarded("/v2/proxied/app/manifests/");
        assert_eq!(
            after - before,
            usize::from(via_proxy),
            "{ns} via the proxy: {via_proxy}"
        );
    }
    // An upstream's own `proxy` wins over NO_PROXY, which is for the environment's proxies.
    assert_eq!(proxy.forwarded(&format!("http://localhost:{port}/v2/")), 1);
    let (status, body) = hay
        .get(&format!("{}{manifest}?ns=tls.test", mirror.url()))
        .await;
    assert_eq!(status, 200, "tls.test: {body}");
    assert_eq!(
        proxy.forwarded(&format!("CONNECT {}", tls_dist.host())),
        1,
        "HTTPS_PROXY tunnels the https upstream"
    );
    hay.assert_clean(&mirror, &[]);
}

#[tokio::test]
async fn check_config_and_serve_refuse_missing_credentials() {
    let dir = tempdir("check-");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "storage: {{ root: {:?} }}\ndefault_upstream: reg.test\nupstreams:\n  reg.test: {{ url: 'http://127.0.0.1:9', username: u, password_file: /nonexistent/regmirror-secret }}\n  other.test: {{ url: 'http://127.0.0.1:9', username: u, password: '${{REGMIRROR_E2E_UNSET}}' }}\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    for command in ["check-config", "serve"] {
        let mut cmd = Command::new(Regmirror::binary());
        cmd.arg(command).arg("--config").arg(&config);
        cmd.env_remove("REGMIRROR_E2E_UNSET");
        let out = run(cmd, Duration::from_secs(30)).await;
        assert!(
            !out.success,
            "{command} accepted missing credentials: {out}"
        );
        for want in [
            "upstreams.reg.test: credentials: password_file /nonexistent/regmirror-secret",
            "upstreams.other.test: credentials: password: environment variable REGMIRROR_E2E_UNSET is not set",
        ] {
            assert!(out.stderr.contains(want), "{command}: {want}\n{out}");
        }
    }
}
