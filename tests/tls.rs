//! End-to-end tests of regmirror as a server: HTTPS with a test CA (skopeo verifying it),
//! certificate rotation without a restart, required client certificates, and htpasswd
//! access control driven by the real docker CLI and daemon (`docker login`, then pulls).
//! Each test searches regmirror's debug log and what its clients printed for the passwords.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::{Ca, Issued};
use common::{
    push_image, require_tool, run, skopeo_policy, tempdir, CmdOutput, Containerd, Distribution,
    Dockerd, PushedImage, Regmirror,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const MIRROR_USER: &str = "alice";
const MIRROR_PASSWORD: &str = "pw-tls-5e6f7a-mirror";

fn htpasswd(dir: &Path) -> std::path::PathBuf {
    let out = Command::new(require_tool("htpasswd"))
        .args(["-Bbn", MIRROR_USER, MIRROR_PASSWORD])
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = dir.join("htpasswd");
    std::fs::write(&path, out.stdout).unwrap();
    path
}

fn config(upstream: &str, extra: &str) -> String {
    format!(
        "listen: @LISTEN@\nstorage: {{ root: @ROOT@ }}\ndefault_upstream: docker.io\nlog: {{ level: debug }}\nupstreams:\n  docker.io: {{ url: '{upstream}' }}\n{extra}\n"
    )
}

/// `skopeo copy` from regmirror over verified HTTPS, trusting what `cert_dir` holds
/// (`*.crt` CAs, `*.cert`/`*.key` client pairs), with optional `user:password`.
async fn skopeo_https(src: &str, dest: &Path, cert_dir: &Path, creds: Option<&str>) -> CmdOutput {
    let work = tempdir("skopeo-");
    let mut cmd = Command::new(require_tool("skopeo"));
    cmd.arg("--policy")
        .arg(skopeo_policy(work.path()))
        .arg("--registries.d")
        .arg(work.path())
        .arg("copy")
        .arg("--src-cert-dir")
        .arg(cert_dir)
        .arg("--retry-times=0");
    if let Some(creds) = creds {
        cmd.arg("--src-creds").arg(creds);
    }
    cmd.arg(src).arg(format!("dir:{}", dest.display()));
    cmd.env("HOME", work.path())
        .env("XDG_RUNTIME_DIR", work.path())
        .env("REGISTRY_AUTH_FILE", work.path().join("auth.json"));
    std::fs::write(work.path().join("auth.json"), "{}").unwrap();
    run(cmd, Duration::from_secs(120)).await
}

fn assert_pulled(dir: &Path, img: &PushedImage) {
    common::assert_skopeo_dir_holds(dir, img, "manifest.json");
}

fn der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

/// A client trusting only `ca`, optionally presenting `identity`; a new one per call, so
/// every request is a new TLS handshake.
fn client(ca: &Path, identity: Option<&Issued>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        let mut pem = std::fs::read(&id.key).unwrap();
        pem.extend(std::fs::read(&id.cert).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

/// The certificate the server presented for `GET /healthz`.
async fn served_certificate(url: &str, ca: &Path) -> Vec<u8> {
    let response = client(ca, None)
        .get(format!("{url}/healthz"))
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(response.status(), 200);
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("peer certificate")
        .to_vec()
}

/// Replaces `to` by `from` atomically, as cert-manager's and certbot's renames do.
fn swap(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn assert_clean(mirror: &Regmirror, outputs: &[String]) {
    let log = mirror.log();
    assert!(log.contains("DEBUG"));
    let all = format!("{log}\n{}", outputs.join("\n"));
    assert!(
        !all.contains(MIRROR_PASSWORD),
        "the mirror password leaked into regmirror's log or its clients' output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_access_control_and_certificate_rotation() {
    let dir = tempdir("https-");
    let ca = Ca::new(dir.path(), "mirror-ca");
    let first = ca.server("first");
    let second = ca.server("second");
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/web", "1", &[1000, 80_000]).await;
    let htpasswd = htpasswd(dir.path());
    let extra = format!(
        "tls: {{ cert: {cert:?}, key: {key:?}, reload_interval: 200ms }}\nauth: {{ htpasswd: {htpasswd:?} }}"
    );
    let mirror = Regmirror::start(&config(&dist.url(), &extra)).await;
    assert!(mirror.url().starts_with("https://"));
    let certs = dir.path().join("client-certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(&ca.cert, certs.join("ca.crt")).unwrap();
    let src = format!("docker://{}/library/web:1", mirror.host());
    let creds = format!("{MIRROR_USER}:{MIRROR_PASSWORD}");
    let mut outputs = Vec::new();

    // Verified HTTPS and a login: skopeo pulls the image byte for byte.
    let pulled = tempdir("pulled-");
    let out = skopeo_https(&src, pulled.path(), &certs, Some(&creds)).await;
    // Only what skopeo printed: its command line holds the password we gave it.
    outputs.push(format!("{}\n{}", out.stdout, out.stderr));
    assert!(out.success, "{out}\n{}", mirror.log());
    assert_pulled(pulled.path(), &img);
    // Without the password: refused with the challenge docker login answers.
    let denied = tempdir("denied-");
    let out = skopeo_https(&src, denied.path(), &certs, None).await;
    outputs.push(out.to_string());
    assert!(!out.success);
    assert!(
        out.stderr.contains("unauthorized") || out.stderr.contains("authentication required"),
        "{out}"
    );
    let response = client(&ca.cert, None)
        .get(format!("{}/v2/", mirror.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Basic realm="regmirror""#
    );

    // Rotation: new handshakes see the new certificate, without a restart.
    let pid = mirror.pid();
    assert_eq!(
        served_certificate(&mirror.url(), &ca.cert).await,
        der(&first.cert)
    );
    swap(&second.key, &key);
    swap(&second.cert, &cert);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_certificate(&mirror.url(), &ca.cert).await != der(&second.cert) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mirror.pid(), pid, "same process");
    assert!(mirror.log().contains("TLS certificate reloaded"));

    // A broken file keeps the certificate in use, and says so.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mirror
        .log()
        .contains("TLS files changed but cannot be loaded")
    {
        assert!(
            Instant::now() < deadline,
            "no warning about the broken certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served_certificate(&mirror.url(), &ca.cert).await,
        der(&second.cert)
    );
    let again = tempdir("again-");
    let out = skopeo_https(&src, again.path(), &certs, Some(&creds)).await;
    outputs.push(format!("{}\n{}", out.stdout, out.stderr));
    assert!(out.success, "{out}");
    assert_clean(&mirror, &outputs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required() {
    let dir = tempdir("mtls-server-");
    let ca = Ca::new(dir.path(), "mirror-ca");
    let server = ca.server("mirror");
    let clients = Ca::new(dir.path(), "clients-ca");
    let good = clients.client("buildkit");
    let stranger = ca.client("stranger");
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/tool", "2", &[500, 20_000]).await;
    let extra = format!(
        "tls: {{ cert: {:?}, key: {:?}, client_ca: {:?} }}",
        server.cert, server.key, clients.cert
    );
    let mirror = Regmirror::start(&config(&dist.url(), &extra)).await;

    let url = format!("{}/v2/", mirror.url());
    let ok = client(&ca.cert, Some(&good))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // Without a valid client certificate the handshake fails; the client may see only the
    // closed connection (TLS 1.3 sends the alert after the client's last flight), so the
    // server's log says why.
    for (who, identity, why) in [
        ("no certificate", None, "peer sent no certificates"),
        (
            "a certificate of another CA",
            Some(&stranger),
            "invalid peer certificate: UnknownIssuer",
        ),
    ] {
        let result = client(&ca.cert, identity).get(&url).send().await;
        assert!(result.is_err(), "{who}: {result:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !mirror
            .log()
            .lines()
            .any(|l| l.contains("TLS handshake failed") && l.contains(why))
        {
            assert!(
                Instant::now() < deadline,
                "{who}: no log line saying {why:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The BuildKit `keypair` case, through skopeo's certs.d-style directory.
    let certs = dir.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(&ca.cert, certs.join("ca.crt")).unwrap();
    std::fs::copy(&good.cert, certs.join("client.cert")).unwrap();
    std::fs::copy(&good.key, certs.join("client.key")).unwrap();
    let pulled = tempdir("pulled-");
    let src = format!("docker://{}/library/tool:2", mirror.host());
    let out = skopeo_https(&src, pulled.path(), &certs, None).await;
    assert!(out.success, "{out}");
    assert_pulled(pulled.path(), &img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_login_then_pull_from_a_protected_mirror() {
    let dir = tempdir("login-");
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/hello", "v1", &[700, 30_000]).await;
    let htpasswd = htpasswd(dir.path());
    let mirror = Regmirror::start(&config(
        &dist.url(),
        &format!("auth: {{ htpasswd: {htpasswd:?} }}"),
    ))
    .await;
    let docker = Dockerd::start_with_args(
        Containerd::start().await,
        &mirror.url(),
        &[format!("--insecure-registry={}", mirror.host())],
    )
    .await;
    let direct = format!("{}/library/hello:v1", mirror.host());
    let mut outputs = Vec::new();

    let out = docker.docker_pull(&direct).await;
    outputs.push(out.to_string());
    assert!(!out.success, "pulled without logging in: {out}");
    assert!(
        out.stderr.contains("no basic auth credentials") || out.stderr.contains("unauthorized"),
        "{out}"
    );
    let out = docker
        .docker(&[
            "login",
            "-u",
            MIRROR_USER,
            "-p",
            "wrong-password",
            &mirror.host(),
        ])
        .await;
    outputs.push(out.to_string());
    assert!(!out.success, "a wrong password logged in: {out}");
    let out = docker
        .docker(&[
            "login",
            "-u",
            MIRROR_USER,
            "-p",
            MIRROR_PASSWORD,
            &mirror.host(),
        ])
        .await;
    outputs.push(out.stdout.clone());
    assert!(
        out.success && out.stdout.contains("Login Succeeded"),
        "{out}"
    );
    let out = docker.docker_pull(&direct).await;
    outputs.push(out.to_string());
    assert!(out.success, "{out}\n{}", mirror.log());
    let digests = docker.repo_digests(&direct).await;
    assert!(
        digests.iter().any(|d| d.ends_with(&img.manifest_digest)),
        "{digests:?} should name {}",
        img.manifest_digest
    );

    // As a registry mirror, dockerd sends the mirror the credentials it holds for Docker
    // Hub: with the mirror's login filed under Docker Hub's key, `docker pull hello:v1` goes
    // through the protected mirror (with no internet, Docker Hub itself cannot answer).
    let out = docker.docker_pull("hello:v1").await;
    outputs.push(out.to_string());
    assert!(!out.success, "mirror pull without credentials: {out}");
    let config_json = docker.dir().join("cli").join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_json).unwrap()).unwrap();
    let auth = config["auths"][mirror.host()].clone();
    assert!(
        auth["auth"].is_string(),
        "docker login stored the login: {config}"
    );
    config["auths"]["https://index.docker.io/v1/"] = auth;
    std::fs::write(&config_json, config.to_string()).unwrap();
    let out = docker.docker_pull("hello:v1").await;
    outputs.push(out.to_string());
    assert!(out.success, "{out}\n{}", mirror.log());
    assert!(docker
        .repo_digests("hello:v1")
        .await
        .iter()
        .any(|d| d.ends_with(&img.manifest_digest)));
    assert_clean(&mirror, &outputs);
}
