//! `regmirror warm`: pre-warms a running mirror by pulling images through it the way a
//! client does, so the mirror's own single flight, verification and bookkeeping apply.
//!
//! For each reference: the manifest with every manifest type accepted; for an index, each
//! platform manifest (all of them, or those matching `--platform`); then every config and
//! layer blob, read to the end and checked against its digest and size. The mirror's
//! `x-regmirror-cache` header says whether a blob was already cached or fetched upstream.
//! This module is a client of the HTTP API only: it knows nothing of the cache or storage.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{header, StatusCode, Url};
use sha2::Digest as _;
use tokio::sync::Semaphore;

use crate::oci::{media_type, Digest, Reference, RepoName};

/// The largest manifest or index accepted (the mirror itself caps them lower).
const MANIFEST_MAX_BYTES: usize = 4 << 20;
/// How long the mirror may stay silent in the middle of an answer (a cold blob streams as
/// the upstream delivers it, so this bounds a stall, not a download).
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `regmirror warm` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The mirror's base URL (`http://host:5000`).
    pub mirror: String,
    /// Image references as users write them: `alpine`, `docker.io/library/alpine:3.20`,
    /// `ghcr.io/org/app:1.4`, `quay.io/x/y@sha256:…`.
    pub references: Vec<String>,
    /// Only this platform of an index (`linux/amd64`, `linux/arm64/v8`); all when `None`.
    pub platform: Option<Platform>,
    /// How many blob downloads run at once, and how many images are worked on at once.
    pub jobs: usize,
    /// The mirror's htpasswd user and password (`auth.htpasswd`).
    pub basic_auth: Option<(String, String)>,
    /// Extra CA certificates (PEM) to trust for an HTTPS mirror.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for a mirror with `tls.client_ca`.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Progress bars (a terminal) or one plain line per image.
    pub progress: bool,
}

/// Why one image could not be warmed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an image reference: {0}")]
    Reference(String),
    #[error("{url}: HTTP {status}{detail}")]
    Status {
        url: String,
        status: StatusCode,
        detail: String,
    },
    #[error("{url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: content has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("blob {digest}: {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("manifest {0}")]
    Manifest(String),
    #[error("no manifest for platform {0} in the index")]
    NoPlatform(String),
    /// The client itself cannot be built (CA or client certificate files).
    #[error("{0}")]
    Setup(String),
}

/// An `os/architecture[/variant]` selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: Some((*variant).to_owned()),
            }),
            _ => Err(format!("{s:?} is not os/architecture[/variant]")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl Platform {
    fn matches(&self, platform: &serde_json::Value) -> bool {
        let field = |name: &str| platform.get(name).and_then(|v| v.as_str());
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|variant| field("variant") == Some(variant))
    }
}

/// A parsed image reference and the mirror request it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry named in the reference (sent as `?ns=`), `None` for the mirror's default
    /// upstream.
    pub registry: Option<String>,
    pub repo: RepoName,
    pub reference: Reference,
}

impl FromStr for ImageRef {
    type Err = Error;

    /// Docker's rule: a first component with a `.` or `:`, or `localhost`, is a registry
    /// host; a missing tag is `latest`; `name:tag@digest` pulls the digest.
    fn from_str(s: &str) -> Result<ImageRef, Error> {
        let bad = |why: String| Error::Reference(format!("{s:?}: {why}"));
        let (registry, rest) = match s.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_owned()), rest)
            }
            _ => (None, s),
        };
        let (name, reference) = if let Some((name, digest)) = rest.split_once('@') {
            // A tag next to a digest is informational; the digest is what is pulled.
            let last_slash = name.rfind('/').map_or(0, |i| i + 1);
            let name = match name[last_slash..].rfind(':') {
                Some(i) => &name[..last_slash + i],
                None => name,
            };
            let digest: Digest = digest.parse().map_err(|e| bad(format!("{e}")))?;
            (name, Reference::Digest(digest))
        } else {
            let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
            match rest[last_slash..].rfind(':') {
                Some(i) => {
                    let (name, tag) = rest.split_at(last_slash + i);
                    let tag = tag[1..].parse().map_err(|e| bad(format!("{e}")))?;
                    (name, Reference::Tag(tag))
                }
                None => (rest, Reference::Tag("latest".parse().expect("valid tag"))),
            }
        };
        let repo: RepoName = name.parse().map_err(|e| bad(format!("{e}")))?;
        Ok(ImageRef {
            registry,
            repo,
            reference,
        })
    }
}

impl ImageRef {
    fn reference_str(&self) -> String {
        match &self.reference {
            Reference::Tag(tag) => tag.to_string(),
            Reference::Digest(digest) => digest.to_string(),
        }
    }
}

/// What warming one image did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageReport {
    /// The digest of the manifest or index the reference named.
    pub digest: String,
    pub platforms: usize,
    pub blobs: usize,
    /// Bytes the mirror fetched from its upstream for this pull.
    pub fetched_bytes: u64,
    /// Bytes the mirror already held.
    pub cached_bytes: u64,
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub images: usize,
    pub warmed: usize,
    pub blobs: usize,
    pub fetched_bytes: u64,
    pub cached_bytes: u64,
    pub elapsed: Duration,
    /// `(reference, reason)` of each image that failed, in the order given.
    pub failed: Vec<(String, String)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} images warmed: {} blobs, {} fetched, {} already cached, {:.1}s",
            self.warmed,
            self.images,
            self.blobs,
            HumanBytes(self.fetched_bytes),
            HumanBytes(self.cached_bytes),
            self.elapsed.as_secs_f64()
        )
    }
}

/// Where per-image lines go: above the progress bars on a terminal, else plain lines.
enum Reporter {
    Terminal(MultiProgress),
    Plain(Mutex<Box<dyn Write + Send>>),
}

impl Reporter {
    fn line(&self, line: &str) {
        match self {
            Reporter::Terminal(multi) => {
                let _ = multi.println(line);
            }
            Reporter::Plain(out) => {
                let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    fn bar(&self, prefix: String) -> ProgressBar {
        match self {
            Reporter::Terminal(multi) => {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(prefix);
                bar
            }
            Reporter::Plain(_) => ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()),
        }
    }
}

/// Everything the image tasks share.
struct Warmer {
    client: reqwest::Client,
    mirror: Url,
    platform: Option<Platform>,
    basic_auth: Option<(String, String)>,
    downloads: Semaphore,
    jobs: usize,
    reporter: Reporter,
}

/// Builds the HTTP client for the mirror with its CA and client certificate. Proxy variables
/// from the environment apply, as for any client (NO_PROXY exempts a local mirror).
fn client(options: &Options) -> Result<reqwest::Client, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("regmirror-warm/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT);
    if let Some(ca) = &options.ca {
        let pem =
            std::fs::read(ca).map_err(|e| Error::Setup(format!("--ca {}: {e}", ca.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::Setup(format!("--ca {}: {e}", ca.display())))?;
        builder = builder.tls_certs_merge(certs);
    }
    if let Some((cert, key)) = &options.client_identity {
        let mut pem = std::fs::read(cert)
            .map_err(|e| Error::Setup(format!("--client-cert {}: {e}", cert.display())))?;
        pem.push(b'\n');
        pem.extend(
            std::fs::read(key)
                .map_err(|e| Error::Setup(format!("--client-key {}: {e}", key.display())))?,
        );
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| Error::Setup(format!("--client-cert/--client-key: {e}")))?;
        builder = builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| Error::Setup(format!("HTTP client: {e}")))
}

/// Warms every reference; one line per image on `out` (or progress bars on a terminal), then
/// the summary line. Never stops at the first failure: each failed reference is in
/// [`Summary::failed`].
pub async fn run(options: Options, out: Box<dyn Write + Send>) -> Result<Summary, Error> {
    let started = Instant::now();
    let mirror = Url::parse(options.mirror.trim_end_matches('/'))
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| Error::Setup(format!("--mirror {}: not an http(s) URL", options.mirror)))?;
    let jobs = options.jobs.max(1);
    let reporter = if options.progress {
        Reporter::Terminal(MultiProgress::with_draw_target(ProgressDrawTarget::stdout()))
    } else {
        Reporter::Plain(Mutex::new(out))
    };
    let warmer = Arc::new(Warmer {
        client: client(&options)?,
        mirror,
        platform: options.platform.clone(),
        basic_auth: options.basic_auth.clone(),
        downloads: Semaphore::new(jobs),
        jobs,
        reporter,
    });
    let results: Vec<(usize, String, Result<ImageReport, Error>)> =
        futures_util::stream::iter(options.references.iter().cloned().enumerate())
            .map(|(i, reference)| {
                let warmer = warmer.clone();
                async move {
                    let result = warmer.image(&reference).await;
                    (i, reference, result)
                }
            })
            .buffer_unordered(jobs)
            .collect()
            .await;
    let mut results = results;
    results.sort_by_key(|(i, _, _)| *i);
    let mut summary = Summary {
        images: results.len(),
        ..Summary::default()
    };
    for (_, reference, result) in results {
        match result {
            Ok(report) => {
                summary.warmed += 1;
                summary.blobs += report.blobs;
                summary.fetched_bytes = summary.fetched_bytes.saturating_add(report.fetched_bytes);
                summary.cached_bytes = summary.cached_bytes.saturating_add(report.cached_bytes);
            }
            Err(error) => summary.failed.push((reference, error.to_string())),
        }
    }
    summary.elapsed = started.elapsed();
    warmer.reporter.line(&summary.to_string());
    Ok(summary)
}

/// A manifest as fetched: its bytes, digest and parsed JSON.
struct Fetched {
    digest: String,
    json: serde_json::Value,
}

impl Warmer {
    /// Warms one image and reports it (one line), whatever the outcome.
    async fn image(&self, text: &str) -> Result<ImageReport, Error> {
        let started = Instant::now();
        let bar = self.reporter.bar(text.to_owned());
        let result = self.image_inner(text, &bar).await;
        let seconds = started.elapsed().as_secs_f64();
        match &result {
            Ok(r) => {
                bar.finish_and_clear();
                self.reporter.line(&format!(
                    "warmed {text} {}: {} platform{}, {} blobs, {} fetched, {} cached, {seconds:.1}s",
                    r.digest,
                    r.platforms,
                    if r.platforms == 1 { "" } else { "s" },
                    r.blobs,
                    HumanBytes(r.fetched_bytes),
                    HumanBytes(r.cached_bytes),
                ));
            }
            Err(error) => {
                bar.abandon_with_message("failed");
                self.reporter.line(&format!("failed {text}: {error}"));
            }
        }
        result
    }

    async fn image_inner(&self, text: &str, bar: &ProgressBar) -> Result<ImageReport, Error> {
        let image: ImageRef = text.parse()?;
        let top = self.manifest(&image, &image.reference_str()).await?;
        if let Reference::Digest(expected) = &image.reference {
            if top.digest != expected.as_str() {
                return Err(Error::DigestMismatch {
                    what: format!("manifest {expected}"),
                    expected: expected.to_string(),
                    actual: top.digest,
                });
            }
        }
        let mut manifests = Vec::new();
        if let Some(entries) = top.json.get("manifests").and_then(|m| m.as_array()) {
            for entry in entries {
                let selected = match &self.platform {
                    None => true,
                    Some(p) => entry
                        .get("platform")
                        .is_some_and(|platform| p.matches(platform)),
                };
                if !selected {
                    continue;
                }
                let digest = descriptor(entry)?.0;
                let child = self.manifest(&image, &digest).await?;
                if child.digest != digest {
                    return Err(Error::DigestMismatch {
                        what: format!("manifest {digest}"),
                        expected: digest,
                        actual: child.digest,
                    });
                }
                if child.json.get("manifests").is_some() {
                    return Err(Error::Manifest(format!(
                        "{digest}: an index inside an index"
                    )));
                }
                manifests.push(child.json);
            }
            if manifests.is_empty() {
                return Err(match &self.platform {
                    Some(p) => Error::NoPlatform(p.to_string()),
                    None => Error::Manifest(format!("{}: an empty index", top.digest)),
                });
            }
        } else {
            manifests.push(top.json.clone());
        }
        // Config and layers, each once even when platforms share them.
        let mut blobs = BTreeMap::new();
        for manifest in &manifests {
            let config = manifest.get("config").ok_or_else(|| {
                Error::Manifest("without a config (schema 1 is not supported)".into())
            })?;
            let (digest, size) = descriptor(config)?;
            blobs.insert(digest, size);
            for layer in manifest
                .get("layers")
                .and_then(|l| l.as_array())
                .into_iter()
                .flatten()
            {
                // Foreign layers live elsewhere by design (`urls`); a mirror cannot hold them.
                if layer
                    .get("urls")
                    .is_some_and(|u| u.as_array().is_some_and(|a| !a.is_empty()))
                {
                    continue;
                }
                let (digest, size) = descriptor(layer)?;
                blobs.insert(digest, size);
            }
        }
        let total = blobs
            .values()
            .fold(0u64, |sum, size| sum.saturating_add(*size));
        bar.set_length(total);
        let results: Vec<Result<(u64, bool), Error>> = futures_util::stream::iter(blobs.iter())
            .map(|(digest, size)| self.blob(&image, digest, *size, bar))
            .buffer_unordered(self.jobs)
            .collect()
            .await;
        let mut report = ImageReport {
            digest: top.digest,
            platforms: manifests.len(),
            blobs: blobs.len(),
            ..ImageReport::default()
        };
        for result in results {
            let (size, cached) = result?;
            if cached {
                report.cached_bytes = report.cached_bytes.saturating_add(size);
            } else {
                report.fetched_bytes = report.fetched_bytes.saturating_add(size);
            }
        }
        Ok(report)
    }

    fn url(&self, image: &ImageRef, kind: &str, reference: &str) -> Url {
        let mut url = self.mirror.clone();
        url.set_path(&format!(
            "{}/v2/{}/{kind}/{reference}",
            self.mirror.path().trim_end_matches('/'),
            image.repo
        ));
        if let Some(registry) = &image.registry {
            url.query_pairs_mut().append_pair("ns", registry);
        }
        url
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &Url,
    ) -> Result<reqwest::Response, Error> {
        let request = match &self.basic_auth {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        };
        let response = request.send().await.map_err(|source| Error::Transport {
            url: url.to_string(),
            source,
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        // The OCI error envelope's first message, if any, says why (a short read: capped).
        let detail = match response.bytes().await {
            Ok(body) if body.len() <= 64 << 10 => {
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| {
                        let e = v.get("errors")?.get(0)?;
                        Some(format!(
                            " {}: {}",
                            e.get("code")?.as_str()?,
                            e.get("message").and_then(|m| m.as_str()).unwrap_or("")
                        ))
                    })
                    .unwrap_or_default()
            }
            _ => String::new(),
        };
        Err(Error::Status {
            url: url.to_string(),
            status,
            detail,
        })
    }

    async fn manifest(&self, image: &ImageRef, reference: &str) -> Result<Fetched, Error> {
        let url = self.url(image, "manifests", reference);
        let mut response = self
            .send(
                self.client
                    .get(url.clone())
                    .header(header::ACCEPT, media_type::MANIFEST_ACCEPT),
                &url,
            )
            .await?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|source| Error::Transport {
            url: url.to_string(),
            source,
        })? {
            if body.len().saturating_add(chunk.len()) > MANIFEST_MAX_BYTES {
                return Err(Error::Manifest(format!(
                    "{reference}: larger than {MANIFEST_MAX_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
        let json = serde_json::from_slice(&body)
            .map_err(|e| Error::Manifest(format!("{reference}: not JSON: {e}")))?;
        Ok(Fetched { digest, json })
    }

    /// Reads one blob to its end through the mirror; answers its size and whether the mirror
    /// already held it.
    async fn blob(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        bar: &ProgressBar,
    ) -> Result<(u64, bool), Error> {
        let _permit = self
            .downloads
            .acquire()
            .await
            .map_err(|_| Error::Setup("shutting down".into()))?;
        let url = self.url(image, "blobs", digest);
        let mut response = self.send(self.client.get(url.clone()), &url).await?;
        let cached = response
            .headers()
            .get("x-regmirror-cache")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|outcome| matches!(outcome, "hit" | "stale" | "revalidated"));
        let mut hasher = sha2::Sha256::new();
        let mut read = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(|source| Error::Transport {
            url: url.to_string(),
            source,
        })? {
            read = read.saturating_add(chunk.len() as u64);
            if read > size {
                break;
            }
            hasher.update(&chunk);
            bar.inc(chunk.len() as u64);
        }
        if read != size {
            return Err(Error::SizeMismatch {
                digest: digest.to_owned(),
                expected: size,
                actual: read,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok((size, cached))
    }
}

/// The digest and size of a descriptor, validated.
fn descriptor(value: &serde_json::Value) -> Result<(String, u64), Error> {
    let digest = value
        .get("digest")
        .and_then(|d| d.as_str())
        .ok_or_else(|| Error::Manifest("a descriptor without a digest".into()))?;
    let digest: Digest = digest
        .parse()
        .map_err(|e| Error::Manifest(format!("descriptor: {e}")))?;
    let size = value
        .get("size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| Error::Manifest(format!("descriptor {digest} without a size")))?;
    Ok((digest.to_string(), size))
}

/// References from a file: one per line; blank lines and `#` comments are skipped.
pub fn read_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (registry, repository, reference) a reference maps to; `None` when it is refused.
    type Mapped<'a> = Option<(Option<&'a str>, &'a str, String)>;

    #[test]
    fn references_map_to_mirror_requests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases: Vec<(String, Mapped)> = vec![
            ("alpine".into(), Some((None, "alpine", "latest".into()))),
            ("alpine:3.20".into(), Some((None, "alpine", "3.20".into()))),
            ("team/app:v1".into(), Some((None, "team/app", "v1".into()))),
            (
                "docker.io/library/alpine:3.20".into(),
                Some((Some("docker.io"), "library/alpine", "3.20".into())),
            ),
            (
                "ghcr.io/org/app:1.4".into(),
                Some((Some("ghcr.io"), "org/app", "1.4".into())),
            ),
            (
                "registry.local:5000/a/b".into(),
                Some((Some("registry.local:5000"), "a/b", "latest".into())),
            ),
            (
                "localhost/x:1".into(),
                Some((Some("localhost"), "x", "1".into())),
            ),
            (
                format!("quay.io/x/y@{d}"),
                Some((Some("quay.io"), "x/y", d.clone())),
            ),
            (format!("x/y:v1@{d}"), Some((None, "x/y", d.clone()))),
            ("Alpine".into(), None),
            ("alpine:".into(), None),
            ("alpine@sha256:1".into(), None),
            ("ghcr.io/".into(), None),
            ("".into(), None),
        ];
        for (text, want) in cases {
            let got = text.parse::<ImageRef>();
            match (got, want) {
                (Ok(got), Some((registry, repo, reference))) => assert_eq!(
                    (
                        got.registry.as_deref(),
                        got.repo.as_str(),
                        got.reference_str()
                    ),
                    (registry, repo, reference),
                    "{text}"
                ),
                (Err(_), None) => {}
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn urls_carry_ns() {
        let warmer = Warmer {
            client: reqwest::Client::new(),
            mirror: Url::parse("http://m:5000").unwrap(),
            platform: None,
            basic_auth: None,
            downloads: Semaphore::new(1),
            jobs: 1,
            reporter: Reporter::Plain(Mutex::new(Box::new(std::io::sink()))),
        };
        let image: ImageRef = "ghcr.io/org/app:1.4".parse().unwrap();
        assert_eq!(
            warmer.url(&image, "manifests", "1.4").as_str(),
            "http://m:5000/v2/org/app/manifests/1.4?ns=ghcr.io"
        );
        let image: ImageRef = "alpine".parse().unwrap();
        assert_eq!(
            warmer.url(&image, "manifests", "latest").as_str(),
            "http://m:5000/v2/alpine/manifests/latest"
        );
    }

    #[test]
    fn platforms() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(p.matches(
            &serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"})
        ));
        assert!(!p.matches(
            &serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v7"})
        ));
        let p: Platform = "linux/amd64".parse().unwrap();
        assert!(p.matches(&serde_json::json!({"os": "linux", "architecture": "amd64"})));
        assert!(!p.matches(&serde_json::json!({"os": "linux", "architecture": "arm64"})));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn list_files() {
        assert_eq!(
            read_list("# images\nalpine:3.20\n\n  ghcr.io/org/app:1.4  # the app\n"),
            vec!["alpine:3.20", "ghcr.io/org/app:1.4"]
        );
    }
}
