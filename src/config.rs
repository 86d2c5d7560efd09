//! Configuration: the `config.yml` contract, its defaults and its validation.
//!
//! The structs are the reference: every field says what it does. Loading reports the file, the
//! key and the reason; validation reports every problem at once so an operator fixes a file in
//! one pass. This module knows nothing of HTTP or storage; it only describes them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// The configuration compiled into the binary: `config.yml` at the repository root.
pub const EMBEDDED: &str = include_str!("../config.yml");
/// Name used in error messages for the embedded configuration.
pub const EMBEDDED_NAME: &str = "<embedded config.yml>";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the registry API listens on.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Where blobs and the index live, and how large the cache may grow.
    #[serde(default)]
    pub storage: StorageConfig,
    /// How long tags are trusted and what happens when the upstream fails.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Upstream used when neither `?ns=` nor a path prefix names one.
    pub default_upstream: String,
    /// Upstream registries by the name clients use for them (`docker.io`, `ghcr.io`, …).
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Serve HTTPS instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Who may use the mirror; without it anyone who can reach `listen` may pull.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// After SIGTERM, how long to keep accepting requests while `/readyz` answers 503, so that
    /// load balancers and Kubernetes endpoints stop sending clients before the listener closes
    /// (a `FROM scratch` image has no `sleep` for a preStop hook).
    #[serde(default = "defaults::shutdown_delay")]
    pub shutdown_delay: HumanDuration,
    /// Then, how long in-flight responses may take to finish before the process exits.
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    /// How the mirror treats its own clients' connections: timeouts, limits, sendfile.
    #[serde(default)]
    pub server: ServerConfig,
    /// Images kept whatever happens: `<upstream>/<repository>:<tag>` (e.g.
    /// `docker.io/library/alpine:3.20`), where the tag may hold `*` wildcards
    /// (`ghcr.io/org/app:1.*` pins every tag of the repository's tag list that matches).
    /// Fetched in the background at start-up (every platform, through the cache, so verified
    /// and single-flighted), revalidated every `pins_refresh`, never evicted nor aged out, and
    /// counted against `storage.max_size`: once the first pass knows their size, a pinned set
    /// larger than `max_size` stops the mirror with an error.
    #[serde(default)]
    pub pins: Vec<Pin>,
    /// How often pinned tags are revalidated with the upstream (default `1h`).
    #[serde(default = "defaults::pins_refresh")]
    pub pins_refresh: HumanDuration,
    /// Run as one replica of a cluster sharing one bucket: who the other replicas are, and the
    /// authenticated peer channel between them. Unset: a single mirror.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// Client connections: what one client (or many) may hold of the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Connections served at once (TLS handshakes included). Default: what the process's file
    /// descriptor limit holds (two per connection, beside a reserve for the store), at most
    /// 4096. A new connection beyond it, or one that finds the descriptors exhausted, closes
    /// the connection idle the longest; with none idle it waits until one closes or goes idle.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Time an HTTP/1 client has to send a request's headers once it started one.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// A connection with no request under way and no bytes in either direction for this long
    /// is closed (a silent socket, an idle keep-alive or HTTP/2 connection).
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A connection whose client has not taken a single byte of a response for this long is
    /// closed (a stalled reader holds its buffers until then).
    #[serde(default = "defaults::send_timeout")]
    pub send_timeout: HumanDuration,
    /// HTTP/2 streams (requests) one connection may have open at once. Each holds at most one
    /// 64 KiB read chunk and 64 KiB of send buffer while its client does not read, see the
    /// README's memory bound.
    #[serde(default = "defaults::http2_max_streams")]
    pub http2_max_streams: u32,
    /// `auto`: cache hits on plain HTTP/1 connections go out with sendfile(2) if the start-up
    /// self-test proves that the HTTP stack passes placeholder frames through untouched;
    /// `off`: always copy.
    #[serde(default)]
    pub sendfile: SendfileMode,
    /// For tests only: plain connections report that they cannot write vectored, as a broken
    /// IO wrapper would, so the sendfile self-test must notice and turn sendfile off.
    #[cfg(feature = "test-hooks")]
    #[serde(skip)]
    pub break_vectored_writes: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: None,
            header_read_timeout: defaults::header_read_timeout(),
            idle_timeout: defaults::idle_timeout(),
            send_timeout: defaults::send_timeout(),
            http2_max_streams: defaults::http2_max_streams(),
            sendfile: SendfileMode::Auto,
            #[cfg(feature = "test-hooks")]
            break_vectored_writes: false,
        }
    }
}

/// `server.sendfile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendfileMode {
    #[default]
    Auto,
    Off,
}

/// A pinned image reference: an upstream, a repository and a tag or tag pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The upstream's name (or alias) as configured.
    pub upstream: String,
    pub repository: crate::oci::RepoName,
    /// A tag, or a pattern where `*` stands for any run of characters.
    pub tag: String,
}

impl Pin {
    /// Whether the tag is a pattern (to match against the repository's tag list).
    pub fn is_pattern(&self) -> bool {
        self.tag.contains('*')
    }

    /// Whether `tag` is named by this pin.
    pub fn matches(&self, tag: &str) -> bool {
        glob(self.tag.as_bytes(), tag.as_bytes())
    }
}

/// `*`-only wildcard matching.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

impl FromStr for Pin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!("{s:?} is not an image reference like docker.io/library/alpine:3.20: {why}")
        };
        let (name, tag) = s.rsplit_once(':').ok_or_else(|| bad("no tag"))?;
        if tag.contains('/') {
            return Err(bad("no tag"));
        }
        let (upstream, repository) = name.split_once('/').ok_or_else(|| bad("no upstream"))?;
        let valid_tag = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*'));
        if !valid_tag {
            return Err(bad("invalid tag"));
        }
        Ok(Pin {
            upstream: upstream.to_owned(),
            repository: repository.parse().map_err(|e| bad(&format!("{e}")))?,
            tag: tag.to_owned(),
        })
    }
}

impl<'de> Deserialize<'de> for Pin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.upstream, self.repository, self.tag)
    }
}

/// Local storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory holding `blobs/`, `tmp/` and `index/`.
    #[serde(default = "defaults::storage_root")]
    pub root: PathBuf,
    /// Upper bound on the bytes of cached blobs (default `50GiB`); above it the least recently
    /// pulled images are evicted, whole. `0` means unbounded. With `s3`, the bound of the
    /// bucket (each replica removes the images it owns), and `local.max_size` that of the disk.
    #[serde(default = "defaults::max_size")]
    pub max_size: ByteSize,
    /// Eviction stops once the cache is back under this percentage of `max_size`, so it runs in
    /// batches rather than on every download.
    #[serde(default = "defaults::low_watermark_percent")]
    pub low_watermark_percent: u8,
    /// Free space kept on the store's disk for the index and logs (default `1GiB`): a download
    /// that would eat into it is passed through uncached.
    #[serde(default = "defaults::min_free")]
    pub min_free: ByteSize,
    /// Memory sled may use to cache the index's pages (sled's `cache_capacity`). sled's own
    /// default is 1 GiB; 64 MiB holds the hot part of an index of about a million blobs.
    #[serde(default = "defaults::index_cache")]
    pub index_cache: ByteSize,
    /// Re-hashing stored blobs in the background (and verifying files found without an index
    /// entry at start-up).
    #[serde(default)]
    pub scrub: ScrubConfig,
    /// A shared S3-compatible bucket (Garage, MinIO, AWS) holding the cache's truth: blobs,
    /// manifests, tags and repository links. `root` then holds only a bounded hot tier
    /// (`local.max_size`) and the index, a cache of facts about the bucket; `max_size` bounds
    /// the bucket.
    #[serde(default)]
    pub s3: Option<S3Config>,
    /// The local hot tier when `s3` is set.
    #[serde(default)]
    pub local: LocalTierConfig,
}

/// Where the shared bucket is and how to sign for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The S3 API's URL, e.g. `http://garage:3900` (AWS: `https://s3.<region>.amazonaws.com`).
    pub endpoint: String,
    /// The bucket; it must exist.
    pub bucket: String,
    /// The region the endpoint signs for (Garage: its `s3_region`, often `garage`).
    #[serde(default = "defaults::s3_region")]
    pub region: String,
    /// The access key id, `${VAR}`-expanded.
    pub access_key_id: String,
    /// The secret key, `${VAR}`-expanded; `secret_access_key_file` keeps it out of the file.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// A file holding the secret key (a Kubernetes or compose secret).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Path-style requests (`endpoint/bucket/key`, default `true`, what Garage and MinIO
    /// expect); `false` for virtual-hosted style (`bucket.endpoint/key`).
    #[serde(default = "defaults::yes")]
    pub path_style: bool,
    /// Answer blob GETs that the hot tier does not hold with a `307` to a presigned bucket
    /// URL valid for `redirect_ttl`, so the bytes go from the bucket to the client directly.
    /// The URL carries a signature, never the secret.
    #[serde(default)]
    pub redirect: bool,
    /// How long a presigned redirect stays valid (default `5m`).
    #[serde(default = "defaults::redirect_ttl")]
    pub redirect_ttl: HumanDuration,
    /// How long an image the bucket's eviction chose stays before its content is deleted
    /// (default `15m`): a pass marks it, and a later pass deletes it once the grace is over,
    /// unless it was pulled meanwhile. At least `redirect_ttl` (a presigned URL handed out
    /// before the mark stays good) and longer than the longest pull you expect.
    #[serde(default = "defaults::evict_grace")]
    pub evict_grace: HumanDuration,
}

impl S3Config {
    /// The access key id and the secret key, `${VAR}`-expanded or read from the secret file
    /// (without its trailing newline): at start-up and by `check-config`.
    pub fn load_credentials(&self) -> Result<(String, String), String> {
        let expand = expand_env;
        let id =
            expand(&self.access_key_id).map_err(|e| format!("storage.s3.access_key_id: {e}"))?;
        let secret = match (&self.secret_access_key, &self.secret_access_key_file) {
            (Some(inline), None) => {
                expand(inline).map_err(|e| format!("storage.s3.secret_access_key: {e}"))?
            }
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("storage.s3.secret_access_key_file {}: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            _ => {
                return Err(
                    "storage.s3: set exactly one of secret_access_key and secret_access_key_file"
                        .to_owned(),
                )
            }
        };
        if id.is_empty() || secret.is_empty() {
            return Err(
                "storage.s3: the access key id and the secret key must not be empty".to_owned(),
            );
        }
        Ok((id, secret))
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match reqwest::Url::parse(&self.endpoint) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => problems.push(format!(
                "storage.s3.endpoint: {:?} must be an http:// or https:// URL with a host",
                self.endpoint
            )),
        }
        if self.bucket.is_empty() {
            problems.push("storage.s3.bucket: must not be empty".to_owned());
        }
        if self.secret_access_key.is_some() == self.secret_access_key_file.is_some() {
            problems.push(
                "storage.s3: set exactly one of secret_access_key and secret_access_key_file"
                    .to_owned(),
            );
        }
        if self.redirect_ttl.0.is_zero() || self.redirect_ttl.0 > Duration::from_secs(7 * 86400) {
            problems.push("storage.s3.redirect_ttl: must be between 1s and 7d".to_owned());
        }
        if self.evict_grace.0 < self.redirect_ttl.0 {
            problems.push(
                "storage.s3.evict_grace: must be at least redirect_ttl (a presigned URL must not outlive its content)"
                    .to_owned(),
            );
        }
        problems
    }
}

/// The local disk in front of the bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTierConfig {
    /// Bytes of blobs kept on the local disk (default `20GiB`), least recently pulled images
    /// dropped first; what is dropped stays in the bucket. `0` means unbounded.
    #[serde(default = "defaults::local_max_size")]
    pub max_size: ByteSize,
}

impl Default for LocalTierConfig {
    fn default() -> Self {
        LocalTierConfig {
            max_size: defaults::local_max_size(),
        }
    }
}

/// The background scrub: every `interval`, every stored blob is hashed again; a blob that no
/// longer hashes to its digest is removed from the store and the index, and is fetched again
/// on its next pull.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubConfig {
    /// Time between the end of one pass and the start of the next. `0` turns the periodic
    /// scrub off (files found unindexed at start-up are still verified before being served).
    #[serde(default = "defaults::scrub_interval")]
    pub interval: HumanDuration,
    /// Bytes per second the scrub and the start-up verification may read, so they do not
    /// starve clients of disk bandwidth. `0` means unbounded.
    #[serde(default = "defaults::scrub_max_rate")]
    pub max_rate: ByteSize,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            interval: defaults::scrub_interval(),
            max_rate: defaults::scrub_max_rate(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            root: defaults::storage_root(),
            max_size: defaults::max_size(),
            low_watermark_percent: defaults::low_watermark_percent(),
            min_free: defaults::min_free(),
            index_cache: defaults::index_cache(),
            scrub: ScrubConfig::default(),
            s3: None,
            local: LocalTierConfig::default(),
        }
    }
}

/// Cache policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a tag's digest is served without asking the upstream again. `0s` revalidates
    /// every request, as distribution's proxy does.
    #[serde(default = "defaults::tag_ttl")]
    pub tag_ttl: HumanDuration,
    /// Serve what we hold when the upstream is down, erroring or rate-limiting.
    #[serde(default = "defaults::yes")]
    pub serve_stale: bool,
    /// Upstream downloads running at once, per upstream; more wait their turn, so a burst of
    /// cold pulls cannot exhaust connections or memory. Blob downloads and manifest fetches
    /// (tag revalidations included) each have this many slots of their own, so slow layers
    /// never starve tag look-ups.
    #[serde(default = "defaults::max_concurrent_fetches")]
    pub max_concurrent_fetches: usize,
    /// Longest wait for an expired tag's revalidation (a free slot and the upstream's answer)
    /// before the cached tag is served stale instead.
    #[serde(default = "defaults::revalidate_timeout")]
    pub revalidate_timeout: HumanDuration,
    /// Minimum rate of a blob download: receiving fewer than `blob_stall_bytes` in this long,
    /// the transfer counts as stalled and is resumed with a `Range` request (a trickle never
    /// trips the upstream's `read_timeout`).
    #[serde(default = "defaults::blob_stall_timeout")]
    pub blob_stall_timeout: HumanDuration,
    /// See `blob_stall_timeout`.
    #[serde(default = "defaults::blob_stall_bytes")]
    pub blob_stall_bytes: ByteSize,
    /// Images nobody pulled for this long are evicted even below `storage.max_size` (default
    /// `30d`; `0` keeps them until space is needed). With `storage.s3`, from the bucket too.
    #[serde(default = "defaults::max_age")]
    pub max_age: HumanDuration,
    /// How long a manifest or tag the upstream said does not exist (404) is answered 404 here
    /// without asking again (default `30s`; `0` asks every time). Clients retrying a missing
    /// tag, or many replicas asking at once, then cost the upstream one request per window.
    #[serde(default = "defaults::negative_ttl")]
    pub negative_ttl: HumanDuration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: defaults::tag_ttl(),
            serve_stale: true,
            max_concurrent_fetches: defaults::max_concurrent_fetches(),
            revalidate_timeout: defaults::revalidate_timeout(),
            blob_stall_timeout: defaults::blob_stall_timeout(),
            blob_stall_bytes: defaults::blob_stall_bytes(),
            max_age: defaults::max_age(),
            negative_ttl: defaults::negative_ttl(),
        }
    }
}

/// One upstream registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the registry, e.g. `https://registry-1.docker.io`, or a list of URLs serving
    /// the same content (`[https://a, https://b]`): they are tried in order, the first that
    /// answers wins, and one that failed (no connection, a 5xx) is skipped for 30 s.
    pub url: UpstreamUrls,
    /// Other names clients may use for this upstream in `?ns=` (`index.docker.io` for Docker
    /// Hub is added automatically).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Prefix one-segment names with `library/`, as Docker Hub does. Defaults to on for
    /// `docker.io` and off elsewhere.
    #[serde(default)]
    pub library_prefix: Option<bool>,
    /// Time allowed to establish a connection to the upstream.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Time allowed between two reads from the upstream before the transfer counts as stalled.
    #[serde(default = "defaults::read_timeout")]
    pub read_timeout: HumanDuration,
    /// Overall deadline of one manifest, tag-list, referrers or token exchange with this
    /// upstream, body, retries and failover included; and of a blob request until its headers
    /// arrive (a blob body is bounded by `read_timeout` and resumed instead). A tag the upstream
    /// does not answer in time is served stale when we hold it.
    #[serde(default = "defaults::request_timeout")]
    pub request_timeout: HumanDuration,
    /// User name for the upstream (`${VAR}` is replaced by an environment variable). Needs
    /// `password` or `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// Password or access token, `${VAR}`-expanded; `password_file` keeps it out of the file.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (a Docker or Kubernetes secret); a trailing newline is ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A Docker `config.json`: the `credHelpers`, `credsStore` or `auths` entry for this
    /// upstream's host gives the credentials, as for `docker pull`.
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Hosts (`host` or `host:port`) besides the upstream's own registrable domain that may
    /// receive the credentials as a bearer-token realm.
    #[serde(default)]
    pub token_realms: Vec<String>,
    /// PEM file of CA certificates trusted for this upstream, in addition to the system roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain) presented to the upstream; needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// A Docker `certs.d/<host>` directory: `*.crt` are CAs, `*.cert` with `*.key` a client
    /// certificate.
    #[serde(default)]
    pub certs_dir: Option<PathBuf>,
    /// Proxy for everything sent for this upstream, token realm and redirects included
    /// (`http://proxy:3128`, `${VAR}`-expanded), or `direct` for none. Without it
    /// `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` apply.
    #[serde(default)]
    pub proxy: Option<String>,
}

/// HTTPS for the mirror's own clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Re-read when it changes (certificate rotation).
    pub cert: PathBuf,
    /// PEM private key of `cert`; re-read with it.
    pub key: PathBuf,
    /// PEM CA certificates: when set, clients must present a certificate signed by one of them.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    #[serde(default = "defaults::tls_reload_interval")]
    pub reload_interval: HumanDuration,
}

/// Access control for the mirror itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An htpasswd file of bcrypt hashes (`htpasswd -B`): the users who may pull. Re-read when
    /// it changes.
    pub htpasswd: PathBuf,
    /// The realm named in the `WWW-Authenticate: Basic` challenge.
    #[serde(default = "defaults::auth_realm")]
    pub realm: String,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics`.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Serve `/metrics` on this address instead of the registry's port (e.g. `127.0.0.1:9090`,
    /// so only a local Prometheus can scrape it). Unset: `/metrics` is on `listen`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `cluster`: the replicas, found by a static list or DNS, and the peer channel between them.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The peer-channel addresses (`host:port`) of ALL replicas, this one included: every
    /// replica must list the same strings, since ownership hashes them. Set this or `dns`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// A name and port (`regmirror-peers.ns.svc.cluster.local:5001`, a Kubernetes headless
    /// Service) resolved every `refresh`: each address it returns is a replica. Set this or
    /// `peers`.
    #[serde(default)]
    pub dns: Option<String>,
    /// Address the peer channel listens on: a listener of its own, never the public `listen`.
    #[serde(default = "defaults::cluster_listen")]
    pub listen: SocketAddr,
    /// The secret shared by all replicas (at least 16 bytes, `${VAR}`-expanded): every peer
    /// request is signed with it. Set this or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the shared secret (a Docker or Kubernetes secret), read at start-up; a
    /// trailing newline is ignored.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// How often the member list is resolved again and each member's health probed (default
    /// `2s`).
    #[serde(default = "defaults::cluster_refresh")]
    pub refresh: HumanDuration,
    /// A healthy member counts as down after this many probes in a row failed (default 3): one
    /// lost probe on a loaded machine must not move its keys to the others and back.
    #[serde(default = "defaults::cluster_down_after")]
    pub down_after: u32,
    /// A member that was down counts as up again after this many probes in a row succeeded
    /// (default 2). A member never probed before is up at its first answer.
    #[serde(default = "defaults::cluster_up_after")]
    pub up_after: u32,
    /// Mutual TLS on the peer channel, in addition to the signatures: the listener serves
    /// `https` and accepts only clients whose certificate chains to `ca`, and this replica
    /// speaks `https` to its peers, presenting `cert` and trusting only `ca`. Unset: plain HTTP.
    #[serde(default)]
    pub tls: Option<ClusterTlsConfig>,
}

/// `cluster.tls`: one certificate per replica, used both ways, and the CA of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsConfig {
    /// PEM certificate chain of this replica, leaf first: served on `cluster.listen` and
    /// presented to peers. It must allow TLS server and client authentication (extended key
    /// usages `serverAuth` and `clientAuth`, or none) and name the host its peers reach it
    /// by: the host of its `peers` entry, or with `dns`, the address the name resolves to.
    /// The listener re-reads it when it changes; what this replica presents to its peers is
    /// read at start-up (restart after a rotation).
    pub cert: PathBuf,
    /// PEM private key of `cert`; re-read with it.
    pub key: PathBuf,
    /// PEM certificates of the CA(s) the replicas' certificates chain to: the only roots
    /// trusted for peers, both ways (no system roots).
    pub ca: PathBuf,
}

/// The secret stays out of logs and `Debug` output.
impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("peers", &self.peers)
            .field("dns", &self.dns)
            .field("listen", &self.listen)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("refresh", &self.refresh)
            .field("down_after", &self.down_after)
            .field("up_after", &self.up_after)
            // Paths only: the key's content is never read into the config.
            .field("tls", &self.tls)
            .finish()
    }
}

/// The shortest shared secret accepted: 128 bits, HMAC-SHA256's security needs no more from a
/// random secret, and anything shorter is likely a typo or a placeholder.
pub const MIN_CLUSTER_SECRET: usize = 16;

impl ClusterConfig {
    /// Every problem of the `cluster` section, each prefixed with its key.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match (self.peers.is_empty(), &self.dns) {
            (true, None) => {
                problems.push("cluster: set peers (a list of host:port) or dns".to_owned())
            }
            (false, Some(_)) => problems.push("cluster.dns: set peers or dns, not both".to_owned()),
            _ => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        for peer in &self.peers {
            if let Err(reason) = validate_host_port(peer) {
                problems.push(format!("cluster.peers: {reason}"));
            } else if !seen.insert(peer.to_ascii_lowercase()) {
                problems.push(format!("cluster.peers: {peer:?} is listed twice"));
            }
        }
        if let Some(dns) = &self.dns {
            if let Err(reason) = validate_host_port(dns) {
                problems.push(format!("cluster.dns: {reason}"));
            }
        }
        match (&self.secret, &self.secret_file) {
            (None, None) => problems.push("cluster: set secret or secret_file".to_owned()),
            (Some(_), Some(_)) => {
                problems.push("cluster.secret_file: set secret or secret_file, not both".to_owned())
            }
            // A `${VAR}` value is checked once expanded, at start-up.
            (Some(secret), None) if !secret.contains('$') && secret.len() < MIN_CLUSTER_SECRET => {
                problems.push(format!(
                    "cluster.secret: must be at least {MIN_CLUSTER_SECRET} bytes"
                ))
            }
            _ => {}
        }
        for (key, value) in [("down_after", self.down_after), ("up_after", self.up_after)] {
            if !(1..=100).contains(&value) {
                problems.push(format!("cluster.{key}: must be 1 to 100 probes"));
            }
        }
        if self.refresh.0.is_zero() {
            problems.push("cluster.refresh: must be more than 0s".to_owned());
        }
        problems
    }

    /// The shared secret: `secret` expanded, or the content of `secret_file`. Reads a file:
    /// called once at start-up.
    pub fn load_secret(&self) -> Result<Vec<u8>, String> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(secret), None) => {
                expand_env(secret).map_err(|e| format!("cluster.secret: {e}"))?
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cluster.secret_file {}: {e}", path.display()))?;
                // Secrets files usually end with a newline that is not part of the secret.
                text.trim_end_matches(['\n', '\r']).to_owned()
            }
            _ => return Err("cluster: set secret or secret_file".to_owned()),
        };
        if secret.len() < MIN_CLUSTER_SECRET {
            let what = if self.secret_file.is_some() {
                "cluster.secret_file"
            } else {
                "cluster.secret"
            };
            return Err(format!(
                "{what}: the secret must be at least {MIN_CLUSTER_SECRET} bytes (it has {})",
                secret.len()
            ));
        }
        Ok(secret.into_bytes())
    }
}

/// A peer address: `host:port` (a name or an IPv4 address) or `[v6]:port`, port required.
fn validate_host_port(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("{text:?} is not host:port (like 10.0.0.1:5001 or peers.local:5001)");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(port) if port != 0 => {}
        _ => return Err(bad()),
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(bad())
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: None,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `regmirror=debug,tower=warn`, …
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: defaults::log_level(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

mod defaults {
    use super::*;

    pub fn header_read_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }

    pub fn idle_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }

    pub fn send_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }

    pub fn http2_max_streams() -> u32 {
        32
    }

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 5000))
    }
    pub fn storage_root() -> PathBuf {
        PathBuf::from("./data")
    }
    pub fn s3_region() -> String {
        "garage".to_owned()
    }

    pub fn evict_grace() -> HumanDuration {
        HumanDuration(Duration::from_secs(15 * 60))
    }
    pub fn redirect_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(300))
    }

    pub fn local_max_size() -> ByteSize {
        ByteSize(20 << 30)
    }

    pub fn max_size() -> ByteSize {
        ByteSize(50 << 30)
    }
    pub fn pins_refresh() -> HumanDuration {
        HumanDuration(Duration::from_secs(3600))
    }
    pub fn min_free() -> ByteSize {
        ByteSize(1 << 30)
    }
    pub fn max_age() -> HumanDuration {
        HumanDuration(Duration::from_secs(30 * 24 * 3600))
    }
    pub fn negative_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn tag_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(300))
    }
    pub fn connect_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    pub fn read_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }
    pub fn request_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn low_watermark_percent() -> u8 {
        90
    }
    pub fn index_cache() -> ByteSize {
        ByteSize(64 << 20)
    }
    pub fn scrub_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(7 * 24 * 3600))
    }
    pub fn scrub_max_rate() -> ByteSize {
        ByteSize(50 << 20)
    }
    pub fn max_concurrent_fetches() -> usize {
        32
    }
    pub fn revalidate_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(2))
    }
    pub fn blob_stall_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn blob_stall_bytes() -> ByteSize {
        ByteSize(64 * 1024)
    }
    pub fn shutdown_delay() -> HumanDuration {
        HumanDuration(Duration::ZERO)
    }
    pub fn shutdown_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn tls_reload_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    pub fn cluster_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 5001))
    }
    pub fn cluster_down_after() -> u32 {
        3
    }
    pub fn cluster_up_after() -> u32 {
        2
    }
    pub fn cluster_refresh() -> HumanDuration {
        HumanDuration(Duration::from_secs(2))
    }
    pub fn auth_realm() -> String {
        "regmirror".to_owned()
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
    pub fn yes() -> bool {
        true
    }
}

/// A configuration problem, with where it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// The YAML did not match the schema.
    #[error("{file}: {key}: {reason}")]
    Parse {
        file: String,
        key: String,
        reason: String,
    },
    /// The values parsed but do not make sense together.
    #[error("{file}: {}", problems.join(&format!("\n{file}: ")))]
    Invalid { file: String, problems: Vec<String> },
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// The configuration compiled into the binary.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED, EMBEDDED_NAME)
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config =
            serde_path_to_error::deserialize(deserializer).map_err(|err| ConfigError::Parse {
                file: file.to_owned(),
                key: match err.path().to_string() {
                    path if path == "." => "(top level)".to_owned(),
                    path => path,
                },
                reason: err.into_inner().to_string(),
            })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems,
            })
        }
    }

    /// Every semantic problem, each prefixed with its key.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(s3) = &self.storage.s3 {
            problems.extend(s3.problems());
        }
        if self.cluster.is_some() && self.storage.s3.is_none() {
            // Replicas share what they fetched through the bucket; without one, each would
            // hold its own copy and a warm replica could not serve a cold one's misses.
            problems.push("cluster: needs storage.s3, the bucket the replicas share".to_owned());
        }
        if self.server.max_connections == Some(0) {
            problems.push("server.max_connections: must be at least 1".to_owned());
        }
        if self.server.http2_max_streams == 0 {
            problems.push("server.http2_max_streams: must be at least 1".to_owned());
        }
        for (key, value) in [
            ("header_read_timeout", self.server.header_read_timeout),
            ("idle_timeout", self.server.idle_timeout),
            ("send_timeout", self.server.send_timeout),
        ] {
            if value.0.is_zero() {
                problems.push(format!("server.{key}: must be longer than 0s"));
            }
        }
        if self.upstreams.is_empty() {
            problems.push("upstreams: at least one upstream is required".to_owned());
        }
        if !self.upstreams.contains_key(&self.default_upstream) {
            problems.push(format!(
                "default_upstream: {:?} is not one of the configured upstreams",
                self.default_upstream
            ));
        }
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (name, upstream) in &self.upstreams {
            if let Err(reason) = validate_host_name(name) {
                problems.push(format!("upstreams.{name}: {reason}"));
            }
            if upstream.url.0.is_empty() {
                problems.push(format!(
                    "upstreams.{name}.url: at least one URL is required"
                ));
            }
            for url in upstream.url.iter() {
                match reqwest::Url::parse(url) {
                    Ok(parsed)
                        if matches!(parsed.scheme(), "http" | "https")
                            && parsed.host().is_some() => {}
                    Ok(_) => problems.push(format!(
                        "upstreams.{name}.url: {url:?} must be an http:// or https:// URL with a host"
                    )),
                    Err(err) => problems.push(format!(
                        "upstreams.{name}.url: {url:?} is not a URL: {err}"
                    )),
                }
            }
            if upstream.request_timeout.0.is_zero() {
                problems.push(format!(
                    "upstreams.{name}.request_timeout: must be more than 0s"
                ));
            }
            problems.extend(upstream.credential_problems(name));
            for alias in std::iter::once(name).chain(&upstream.aliases) {
                if let Some(other) = seen.insert(alias.to_ascii_lowercase(), name) {
                    problems.push(format!(
                        "upstreams.{name}: the name {alias:?} is already used by upstreams.{other}"
                    ));
                }
            }
        }
        for pin in &self.pins {
            let known = self.upstreams.iter().any(|(name, upstream)| {
                name.eq_ignore_ascii_case(&pin.upstream)
                    || upstream
                        .aliases
                        .iter()
                        .any(|a| a.eq_ignore_ascii_case(&pin.upstream))
            });
            if !known {
                problems.push(format!(
                    "pins: {pin}: {:?} is not one of the configured upstreams",
                    pin.upstream
                ));
            }
        }
        if !(1..=100).contains(&self.storage.low_watermark_percent) {
            problems.push("storage.low_watermark_percent: must be between 1 and 100".to_owned());
        }
        if self.cache.max_concurrent_fetches == 0 {
            problems.push("cache.max_concurrent_fetches: must be at least 1".to_owned());
        }
        if self.cache.revalidate_timeout.0.is_zero() {
            problems.push("cache.revalidate_timeout: must be more than 0s".to_owned());
        }
        if self.cache.blob_stall_timeout.0.is_zero() {
            problems.push("cache.blob_stall_timeout: must be more than 0s".to_owned());
        }
        if let Some(tls) = &self.tls {
            if tls.reload_interval.0.is_zero() {
                problems.push("tls.reload_interval: must be more than 0s".to_owned());
            }
        }
        if let Some(auth) = &self.auth {
            if auth.realm.contains(['"', '\\']) || auth.realm.chars().any(char::is_control) {
                problems.push(
                    "auth.realm: must not contain quotes, backslashes or control characters"
                        .to_owned(),
                );
            }
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!("log.level: {:?}: {err}", self.log.level));
        }
        if let Some(cluster) = &self.cluster {
            problems.extend(cluster.problems());
            if cluster.listen == self.listen && self.listen.port() != 0 {
                problems.push(format!(
                    "cluster.listen: {} is already `listen`; the peer channel needs a port of its own",
                    self.listen
                ));
            }
        }
        if self.metrics.listen == Some(self.listen) && self.listen.port() != 0 {
            problems.push(format!(
                "metrics.listen: {} is already `listen`; leave it unset to serve /metrics there",
                self.listen
            ));
        }
        problems
    }
}

impl UpstreamConfig {
    /// Combinations of the credential, TLS and proxy keys that cannot work. Files, variables
    /// and helpers are checked when the upstream client is built (`check-config` does too).
    fn credential_problems(&self, name: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let key = |field: &str| format!("upstreams.{name}.{field}");
        if self.password.is_some() && self.password_file.is_some() {
            problems.push(format!(
                "{}: set password or password_file, not both",
                key("password_file")
            ));
        }
        if self.username.is_some() != (self.password.is_some() || self.password_file.is_some()) {
            problems.push(format!(
                "{}: username needs password or password_file, and they need username",
                key("username")
            ));
        }
        if self.docker_config.is_some() && self.username.is_some() {
            problems.push(format!(
                "{}: set docker_config or username, not both",
                key("docker_config")
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            problems.push(format!(
                "{}: client_cert and client_key go together",
                key("client_cert")
            ));
        }
        if let Some(proxy) = self
            .proxy
            .as_deref()
            .filter(|p| *p != "direct" && !p.contains("${"))
        {
            match reqwest::Url::parse(proxy) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => problems.push(format!(
                    "{}: must be an http:// or https:// URL, or direct",
                    key("proxy")
                )),
            }
        }
        for realm in &self.token_realms {
            if let Err(reason) = validate_host_name(realm) {
                problems.push(format!("{}: {reason}", key("token_realms")));
            }
        }
        problems
    }

    /// Whether one-segment repository names get `library/` in front.
    pub fn library_prefix(&self, name: &str) -> bool {
        self.library_prefix.unwrap_or(name == DOCKER_HUB)
    }

    /// Every name `?ns=` may use for this upstream, including Docker Hub's well-known hosts.
    pub fn all_names<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let hub: &[&str] = if name == DOCKER_HUB {
            DOCKER_HUB_ALIASES
        } else {
            &[]
        };
        std::iter::once(name)
            .chain(self.aliases.iter().map(String::as_str))
            .chain(hub.iter().copied())
    }
}

/// The name Docker and containerd use for Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";
/// Other names clients send in `?ns=` for Docker Hub.
const DOCKER_HUB_ALIASES: &[&str] = &["index.docker.io", "registry-1.docker.io"];

/// An upstream name is what clients put in `?ns=` or a path prefix: a host with an optional port.
fn validate_host_name(name: &str) -> Result<(), String> {
    let (host, port) = match name.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (name, None),
    };
    if let Some(port) = port {
        port.parse::<u16>()
            .map_err(|_| format!("{name:?} has an invalid port"))?;
    }
    let valid = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a host name (like ghcr.io or registry.local:5000)"
        ))
    }
}

/// An upstream's URLs in the order they are tried: `url: https://a` or `url: [https://a, https://b]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrls(pub Vec<String>);

impl UpstreamUrls {
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::One(url) => Ok(UpstreamUrls(vec![url])),
            Raw::Many(urls) => Ok(UpstreamUrls(urls)),
        }
    }
}

/// A duration written as people write it: `30s`, `5m`, `1h 30m`, `0s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "0" {
            return Ok(HumanDuration(Duration::ZERO));
        }
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|err| format!("{s:?} is not a duration like 30s, 5m or 1h: {err}"))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size written as people write it: `500MiB`, `50GiB`, `2GB`, `1048576`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "m" | "mb" => 1000u64.pow(2),
            "g" | "gb" => 1000u64.pow(3),
            "t" | "tb" => 1000u64.pow(4),
            "ki" | "kib" => 1 << 10,
            "mi" | "mib" => 1 << 20,
            "gi" | "gib" => 1 << 30,
            "ti" | "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                ))
            }
        };
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 500MiB or 50GiB"))?;
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept both `50GiB` and a bare YAML integer of bytes.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

/// Replaces `${NAME}` with the environment variable `NAME`; `$$` is a literal `$`. An unset
/// variable is an error naming it (never silently empty).
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(after) = after.strip_prefix('{') {
            let end = after
                .find('}')
                .ok_or_else(|| "unterminated ${ in value".to_owned())?;
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(format!("${{{name}}} is not a variable name"));
            }
            let value = std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "default_upstream: docker.io\nupstreams:\n  docker.io: { url: https://registry-1.docker.io }\n";
    /// With the bucket a cluster needs.
    const SHARED: &str = "default_upstream: docker.io\nupstreams:\n  docker.io: { url: https://registry-1.docker.io }\nstorage: { s3: { endpoint: 'http://garage:3900', bucket: b, access_key_id: k, secret_access_key: s } }\n";

    #[test]
    fn embedded_config_is_valid() {
        let config = Config::embedded().expect("embedded config.yml must be valid");
        assert_eq!(config.default_upstream, "docker.io");
        assert_eq!(config.storage.root, PathBuf::from("./data"));
        assert_eq!(config.listen.port(), 5000);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL, "t.yml").unwrap();
        assert_eq!(config.cache.tag_ttl.0, Duration::from_secs(300));
        assert!(config.cache.serve_stale);
        assert!(config.upstreams["docker.io"].library_prefix("docker.io"));
        assert_eq!(config.cache.revalidate_timeout.0, Duration::from_secs(2));
        assert_eq!(config.cache.blob_stall_timeout.0, Duration::from_secs(30));
        assert_eq!(config.cache.blob_stall_bytes.0, 64 * 1024);
        let zero =
            format!("{MINIMAL}\ncache: {{ revalidate_timeout: 0s, blob_stall_timeout: 0s }}\n");
        let err = Config::parse(&zero, "t.yml").unwrap_err().to_string();
        assert!(err.contains("cache.revalidate_timeout"), "{err}");
        assert!(err.contains("cache.blob_stall_timeout"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = format!("{MINIMAL}storage:\n  max_sise: 5GiB\n");
        let err = Config::parse(&text, "t.yml").unwrap_err().to_string();
        assert!(err.starts_with("t.yml: storage"), "{err}");
        assert!(err.contains("max_sise"), "{err}");
    }

    #[test]
    fn bad_values_are_all_reported() {
        let text = "default_upstream: nowhere\nupstreams:\n  docker.io: { url: ftp://x }\n  'bad host': { url: https://x }\n";
        let err = Config::parse(text, "t.yml").unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn sizes_and_durations() {
        let sizes = [
            ("50GiB", Some(50u64 << 30)),
            ("500 MiB", Some(500 << 20)),
            ("2GB", Some(2_000_000_000)),
            ("1048576", Some(1 << 20)),
            ("1.5KiB", Some(1536)),
            ("12 parsecs", None),
            ("-1GiB", None),
            ("", None),
        ];
        for (text, want) in sizes {
            assert_eq!(text.parse::<ByteSize>().ok().map(|s| s.0), want, "{text}");
        }
        let durations = [
            ("5m", Some(300)),
            ("0s", Some(0)),
            ("0", Some(0)),
            ("1h 30m", Some(5400)),
            ("soon", None),
        ];
        for (text, want) in durations {
            assert_eq!(
                text.parse::<HumanDuration>().ok().map(|d| d.0.as_secs()),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn metrics_listen_must_differ_from_listen() {
        let text =
            format!("{MINIMAL}listen: 127.0.0.1:5000\nmetrics: {{ listen: 127.0.0.1:5000 }}\n");
        let err = Config::parse(&text, "t.yml").unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        let text = format!("{MINIMAL}metrics: {{ listen: 127.0.0.1:9100 }}\n");
        let config = Config::parse(&text, "t.yml").unwrap();
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9100".parse().unwrap())
        );
    }

    #[test]
    fn url_is_one_or_a_list_and_each_is_checked() {
        let text = "default_upstream: a.io\nupstreams:\n  a.io: { url: [https://a.io, 'http://127.0.0.1:5000'] }\n";
        let config = Config::parse(text, "t.yml").unwrap();
        assert_eq!(
            config.upstreams["a.io"].url.0,
            vec!["https://a.io", "http://127.0.0.1:5000"]
        );
        let text = "default_upstream: a.io\nupstreams:\n  a.io: { url: [https://a.io, ftp://b, 'nonsense'] }\n";
        let err = Config::parse(text, "t.yml").unwrap_err().to_string();
        assert!(err.contains("ftp://b") && err.contains("nonsense"), "{err}");
        let text = "default_upstream: a.io\nupstreams:\n  a.io: { url: [] }\n";
        let err = Config::parse(text, "t.yml").unwrap_err().to_string();
        assert!(err.contains("at least one URL"), "{err}");
    }

    #[test]
    fn duplicate_alias_is_refused() {
        let text = "default_upstream: a.io\nupstreams:\n  a.io: { url: https://a.io }\n  b.io: { url: https://b.io, aliases: [a.io] }\n";
        let err = Config::parse(text, "t.yml").unwrap_err().to_string();
        assert!(err.contains("already used"), "{err}");
    }

    #[test]
    fn pins_parse_and_match_tag_patterns() {
        let pin: Pin = "docker.io/library/alpine:3.20".parse().unwrap();
        assert_eq!(
            (
                pin.upstream.as_str(),
                pin.repository.as_str(),
                pin.tag.as_str()
            ),
            ("docker.io", "library/alpine", "3.20")
        );
        assert!(!pin.is_pattern() && pin.matches("3.20") && !pin.matches("3.2"));
        let pin: Pin = "registry.local:5000/org/app:1.*".parse().unwrap();
        assert_eq!(pin.upstream, "registry.local:5000");
        assert!(pin.is_pattern());
        assert!(
            pin.matches("1.4") && pin.matches("1.") && !pin.matches("2.1") && !pin.matches("11.0")
        );
        for bad in [
            "alpine",
            "docker.io/alpine",
            "registry.local:5000/org/app",
            "docker.io/a:b/c",
            "docker.io/x:",
        ] {
            assert!(bad.parse::<Pin>().is_err(), "{bad}");
        }
        let config = Config::parse(
            "default_upstream: docker.io\nupstreams: { docker.io: { url: 'https://registry-1.docker.io' } }\npins: [ 'ghcr.io/org/app:1' ]\n",
            "test",
        );
        let err = format!("{:?}", config.unwrap_err());
        assert!(err.contains("not one of the configured upstreams"), "{err}");
    }

    #[test]
    fn s3_credentials_come_from_the_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s3");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "{MINIMAL}storage: {{ s3: {{ endpoint: 'http://g:3900', bucket: b, access_key_id: GK1, secret_access_key_file: {} }} }}\n",
            file.display()
        );
        let s3 = Config::parse(&text, "t.yml").unwrap().storage.s3.unwrap();
        assert_eq!(s3.region, "garage");
        assert!(s3.path_style && !s3.redirect);
        assert_eq!(
            s3.load_credentials().unwrap(),
            ("GK1".into(), "from-file".into())
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(s3.load_credentials().is_err(), "an empty secret is refused");
        let text = format!(
            "{MINIMAL}storage: {{ s3: {{ endpoint: 'ftp://g', bucket: '', access_key_id: k, secret_access_key: s, secret_access_key_file: /f, redirect_ttl: 0s }} }}\n"
        );
        let err = Config::parse(&text, "t.yml").unwrap_err().to_string();
        for want in [
            "storage.s3.endpoint",
            "storage.s3.bucket",
            "exactly one of",
            "redirect_ttl",
        ] {
            assert!(err.contains(want), "{want} in {err}");
        }
    }

    #[test]
    fn cluster_section_parses_with_defaults() {
        let text = format!(
            "{SHARED}cluster:\n  peers: [10.0.0.1:5001, 'regmirror-1.peers:5001', '[fd00::1]:5001']\n  secret: 0123456789abcdef\n"
        );
        let config = Config::parse(&text, "t.yml").unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.peers.len(), 3);
        assert_eq!(cluster.listen, "0.0.0.0:5001".parse().unwrap());
        assert_eq!(cluster.refresh.0, Duration::from_secs(2));
        assert!(!format!("{cluster:?}").contains("0123456789abcdef"));
        let text = format!(
            "{SHARED}cluster: {{ dns: 'peers.ns.svc.cluster.local:5001', secret_file: /run/s, refresh: 500ms, listen: '127.0.0.1:6001' }}\n"
        );
        let cluster = Config::parse(&text, "t.yml").unwrap().cluster.unwrap();
        assert_eq!(
            cluster.dns.as_deref(),
            Some("peers.ns.svc.cluster.local:5001")
        );
        assert_eq!(cluster.refresh.0, Duration::from_millis(500));
        assert!(Config::parse(MINIMAL, "t.yml").unwrap().cluster.is_none());
        let text = format!("{MINIMAL}cluster: {{ dns: 'a:1', secret_file: /s }}\n");
        let err = Config::parse(&text, "t.yml").unwrap_err().to_string();
        assert!(err.contains("cluster: needs storage.s3"), "{err}");
        let text = format!("{SHARED}cluster: {{ dns: 'a:1', secret_file: /s, peer: [] }}\n");
        let err = Config::parse(&text, "t.yml").unwrap_err().to_string();
        assert!(err.contains("cluster") && err.contains("peer"), "{err}");
    }

    #[test]
    fn cluster_tls_takes_three_paths() {
        let text = format!(
            "{SHARED}cluster: {{ dns: 'a:1', secret_file: /s, tls: {{ cert: /t/peer.crt, key: /t/peer.key, ca: /t/ca.crt }} }}\n"
        );
        let cluster = Config::parse(&text, "t.yml").unwrap().cluster.unwrap();
        let tls = cluster.tls.as_ref().unwrap();
        assert_eq!(tls.key, PathBuf::from("/t/peer.key"));
        assert!(format!("{cluster:?}").contains("/t/peer.key"));
        for section in [
            "{ cert: /c, key: /k }",
            "{ cert: /c, key: /k, ca: /a, client_ca: /a }",
        ] {
            let text =
                format!("{SHARED}cluster: {{ dns: 'a:1', secret_file: /s, tls: {section} }}\n");
            let err = Config::parse(&text, "t.yml").unwrap_err().to_string();
            assert!(err.contains("cluster.tls"), "{section}: {err}");
        }
    }

    #[test]
    fn cluster_problems_are_all_reported() {
        let cases = [
            ("{ secret: 0123456789abcdef }", vec!["set peers (a list of host:port) or dns"]),
            (
                "{ peers: ['a:1'], dns: 'b:1', secret: 0123456789abcdef }",
                vec!["cluster.dns: set peers or dns, not both"],
            ),
            (
                "{ peers: ['a', 'b:0', 'c:99999', 'bad host:1', 'a:1', 'A:1'], secret: short, refresh: 0s }",
                vec![
                    "\"a\" is not host:port",
                    "\"b:0\" is not host:port",
                    "\"c:99999\" is not host:port",
                    "\"bad host:1\" is not host:port",
                    "\"A:1\" is listed twice",
                    "cluster.secret: must be at least 16 bytes",
                    "cluster.refresh: must be more than 0s",
                ],
            ),
            ("{ dns: 'peers' }", vec!["cluster.dns: \"peers\" is not host:port", "set secret or secret_file"]),
            (
                "{ dns: 'p:1', secret: 0123456789abcdef, secret_file: /s }",
                vec!["set secret or secret_file, not both"],
            ),
            (
                "{ dns: 'p:1', secret: '${X}', listen: '0.0.0.0:5000' }",
                vec!["cluster.listen: 0.0.0.0:5000 is already `listen`"],
            ),
        ];
        for (section, wanted) in cases {
            let text = format!("{SHARED}cluster: {section}\n");
            let err = Config::parse(&text, "t.yml").unwrap_err();
            let ConfigError::Invalid { problems, .. } = &err else {
                panic!("{section}: expected Invalid, got {err}")
            };
            assert_eq!(problems.len(), wanted.len(), "{section}: {problems:?}");
            for want in wanted {
                assert!(
                    problems.iter().any(|p| p.contains(want)),
                    "{section}: {want:?} not in {problems:?}"
                );
            }
        }
    }

    #[test]
    fn cluster_secret_is_read_expanded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        let section = |secret: &str| {
            let text = format!("{SHARED}cluster: {{ dns: 'p:1', {secret} }}\n");
            Config::parse(&text, "t.yml").unwrap().cluster.unwrap()
        };
        let from_file = section(&format!("secret_file: {}", file.display()));
        let err = from_file.load_secret().unwrap_err();
        assert!(err.starts_with("cluster.secret_file"), "{err}");
        std::fs::write(&file, "0123456789abcdef\n").unwrap();
        assert_eq!(from_file.load_secret().unwrap(), b"0123456789abcdef");
        std::fs::write(&file, "0123456789abcde\n").unwrap();
        let err = from_file.load_secret().unwrap_err();
        assert!(err.contains("at least 16 bytes"), "{err}");
        std::fs::write(&file, "").unwrap();
        assert!(from_file.load_secret().is_err(), "empty");
        std::env::set_var("REGMIRROR_TEST_CLUSTER_SECRET", "from the environment!");
        let expanded = section("secret: '${REGMIRROR_TEST_CLUSTER_SECRET}'");
        assert_eq!(expanded.load_secret().unwrap(), b"from the environment!");
        std::env::set_var("REGMIRROR_TEST_CLUSTER_SHORT", "tiny");
        let short = section("secret: '${REGMIRROR_TEST_CLUSTER_SHORT}'");
        assert!(short
            .load_secret()
            .unwrap_err()
            .contains("at least 16 bytes"));
        let unset = section("secret: '${REGMIRROR_TEST_CLUSTER_UNSET}'");
        assert!(unset.load_secret().unwrap_err().contains("not set"));
    }

    #[test]
    fn documented_defaults_are_the_defaults() {
        let config = Config::parse(
            "default_upstream: docker.io\nupstreams: { docker.io: { url: 'https://registry-1.docker.io' } }\n",
            "test",
        )
        .unwrap();
        assert_eq!(config.storage.max_size, ByteSize(50 << 30));
        assert_eq!(config.storage.min_free, ByteSize(1 << 30));
        assert_eq!(config.cache.max_age.0, Duration::from_secs(30 * 86400));
        assert_eq!(config.pins_refresh.0, Duration::from_secs(3600));
        let embedded = include_str!("../config.yml");
        assert!(embedded.contains("max_size: 50GiB"));
    }
}
