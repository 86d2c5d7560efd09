//! A real `docker-registry` (distribution 2.8) as a counting test upstream.
//!
//! Requests are counted from its JSON log: distribution writes one `response completed`
//! (or `response completed with error`) line per request, with `http.request.method`,
//! `http.request.uri` and `http.response.status`, after the response body has been
//! written. A client can therefore see the whole body before the line exists, so the
//! counting methods first wait for the log to stop growing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{free_port, require_tool, tempdir, wait_for_v2, ChildProc};

/// Optional features of the test registry.
#[derive(Clone, Debug, Default)]
pub struct DistributionOptions {
    /// Require HTTP basic auth with this user and password (htpasswd, bcrypt).
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with this certificate and key (PEM files); `url()` becomes `https://`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: require client certificates signed by this CA (`http.tls.clientcas`).
    pub client_ca: Option<PathBuf>,
    /// Require bearer tokens from a token server (`auth: token`).
    pub token: Option<TokenAuth>,
    /// Storage directory, to share content with another instance (push to an open one, pull
    /// from a guarded one); a fresh one by default.
    pub root: Option<PathBuf>,
}

/// distribution's `auth: token` settings: tokens are JWTs signed by a key whose certificate
/// chains to `rootcertbundle`.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub rootcertbundle: PathBuf,
}

/// One request as distribution logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Path and query as sent.
    pub uri: String,
    pub status: u16,
}

impl Request {
    /// `GET`/`HEAD` etc. of `/v2/<name>/blobs/<digest>` (not uploads).
    pub fn is_blob(&self) -> bool {
        blob_digest(&self.path).is_some()
    }

    pub fn is_manifest(&self) -> bool {
        self.path.starts_with("/v2/") && self.path.contains("/manifests/")
    }

    /// The `ns` query parameter, if any.
    pub fn ns(&self) -> Option<&str> {
        let q = self.uri.split_once('?')?.1;
        q.split('&').find_map(|kv| kv.strip_prefix("ns="))
    }
}

/// The digest of a `/v2/<name>/blobs/<digest>` path.
fn blob_digest(path: &str) -> Option<&str> {
    let (head, digest) = path.rsplit_once("/blobs/")?;
    (head.starts_with("/v2/") && digest.starts_with("sha256:")).then_some(digest)
}

pub struct Distribution {
    // Field order matters: the process dies before its directory is removed.
    proc: ChildProc,
    port: u16,
    scheme: &'static str,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Distribution {
    /// A plain-HTTP registry without auth.
    pub async fn start() -> Self {
        Self::start_with(DistributionOptions::default()).await
    }

    pub async fn start_with(opts: DistributionOptions) -> Self {
        let bin = require_tool("docker-registry");
        let dir = tempdir("dist-");
        let port = free_port();
        let data = opts.root.clone().unwrap_or_else(|| dir.path().join("data"));
        std::fs::create_dir_all(&data).unwrap();
        let log = dir.path().join("registry.log");

        let mut auth = String::new();
        if let Some((user, pass)) = &opts.htpasswd {
            let htpasswd = require_tool("htpasswd");
            let out = Command::new(htpasswd)
                .args(["-Bbn", user, pass])
                .output()
                .expect("running htpasswd");
            assert!(out.status.success(), "htpasswd failed: {out:?}");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: regmirror-test\n    path: {}\n",
                file.display()
            );
        }
        if let Some(token) = &opts.token {
            assert!(opts.htpasswd.is_none(), "one auth method at a time");
            auth = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                token.realm,
                token.service,
                token.issuer,
                token.rootcertbundle.display()
            );
        }
        let mut tls = String::new();
        let mut scheme = "http";
        if let Some((cert, key)) = &opts.tls {
            scheme = "https";
            tls = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            if let Some(ca) = &opts.client_ca {
                tls.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        // The access log is off: it is a second, unstructured line per request.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             {auth}\
             http:\n  addr: 127.0.0.1:{port}\n  secret: regmirror-test-secret\n{tls}",
            data = data.display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();

        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config_path).current_dir(dir.path());
        // REGISTRY_* variables would override the file.
        for (k, _) in std::env::vars() {
            if k.starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let mut proc = ChildProc::spawn("docker-registry", cmd, &log);
        let base = format!("{scheme}://127.0.0.1:{port}");
        if opts.tls.is_some() {
            // The harness client trusts no test CA (and may have no client certificate).
            wait_for_tcp(port, &mut proc, Duration::from_secs(30)).await;
        } else {
            wait_for_v2(&base, &mut proc, Duration::from_secs(30)).await;
        }
        Distribution {
            proc,
            port,
            scheme,
            log,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The raw log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has not grown for a short while (so every request whose
    /// response a client has seen is logged), at most a few seconds.
    pub async fn settle(&self) {
        let quiet = Duration::from_millis(250);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = file_len(&self.log);
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let now = file_len(&self.log);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }

    /// Every completed request so far, in log order, after [`settle`](Self::settle).
    pub async fn requests(&self) -> Vec<Request> {
        self.settle().await;
        self.requests_now()
    }

    /// Every completed request logged so far, without waiting.
    pub fn requests_now(&self) -> Vec<Request> {
        parse_requests(&self.log())
    }

    /// Number of completed `GET /v2/<name>/blobs/<digest>` requests, any status.
    pub async fn blob_gets(&self) -> usize {
        self.requests()
            .await
            .iter()
            .filter(|r| r.method == "GET" && r.is_blob())
            .count()
    }

    /// Number of completed `GET`s of one blob, any repository, any status.
    pub async fn blob_gets_for(&self, digest: &str) -> usize {
        self.requests()
            .await
            .iter()
            .filter(|r| r.method == "GET" && blob_digest(&r.path) == Some(digest))
            .count()
    }

    /// Number of completed `GET`s of manifests, any status.
    pub async fn manifest_gets(&self) -> usize {
        self.requests()
            .await
            .iter()
            .filter(|r| r.method == "GET" && r.is_manifest())
            .count()
    }

    /// Reads requests (method, path, status) for quick assertions and messages.
    pub async fn request_lines(&self) -> Vec<(String, String, u16)> {
        self.requests()
            .await
            .into_iter()
            .map(|r| (r.method, r.uri, r.status))
            .collect()
    }

    /// Kills the registry now (to simulate an upstream outage).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port` (for TLS servers,
/// whose certificates the harness client does not trust), panicking with the log if `proc`
/// exits first.
pub async fn wait_for_tcp(port: u16, proc: &mut ChildProc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.exited() {
            panic!(
                "{} exited with {status} before listening on {port}\n--- log ---\n{}",
                proc.name,
                super::log_tail(&proc.log, 8000)
            );
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen on {port} within {timeout:?}\n--- log ---\n{}",
            proc.name,
            super::log_tail(&proc.log, 8000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Parses distribution's JSON log; non-JSON lines (start-up noise, panics) are skipped.
pub fn parse_requests(log: &str) -> Vec<Request> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("response completed"))
        })
        .filter_map(|v| {
            let method = v["http.request.method"].as_str()?.to_owned();
            let uri = v["http.request.uri"].as_str()?.to_owned();
            let status = v["http.response.status"].as_u64()? as u16;
            let path = uri.split('?').next().unwrap_or("").to_owned();
            Some(Request {
                method,
                path,
                uri,
                status,
            })
        })
        .collect()
}
