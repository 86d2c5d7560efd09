//! The cluster: which replicas exist and are healthy (membership), which of them owns a key
//! (rendezvous hashing over the healthy members), and the client side of the peer channel
//! with its authentication (every request signed with the shared secret, see [`auth`]).
//!
//! Only built with `cluster:` in the configuration. Members are identified by their
//! peer-channel address exactly as the static list or DNS gives it, the same string on every
//! replica, which is what makes their ownership decisions agree. A replica finds itself
//! among them by its health answer: `GET /_regmirror/peer/health` returns the replica's
//! instance id, random per process.
//!
//! This module must not know storage, upstreams or the cache: it answers "who owns this key"
//! and "give me this path from that member"; the cache decides what to forward and what to do
//! when a peer fails (and reports it with [`Cluster::forwarded`] and [`Cluster::fell_back`]).
//! The peer channel's server side (routes) lives in `api`, and calls [`Cluster::verify`].

pub mod auth;
pub mod rendezvous;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use futures_util::future::join_all;
use tokio::time::Instant;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;

pub use auth::{Nonce, HEADER as PEER_HEADER};

/// The health probe's path on the peer channel.
pub const HEALTH_PATH: &str = "/_regmirror/peer/health";
/// Prefix of every peer-channel path.
pub const PEER_PREFIX: &str = "/_regmirror/peer/";
/// On an owner's error answer: the status is its upstream's own answer (404, 429, 401, 403),
/// relayed as final, not a failure of the owner. Without it an error answer means the owner
/// could not serve, and the asking replica goes on to the next source.
pub const FINAL_HEADER: &str = "x-regmirror-final";
/// On the health answer: the replica's instance id, under the answer's seal.
pub const INSTANCE_HEADER: &str = "x-regmirror-instance";
/// The longest `Retry-After` taken from a peer's relayed 429.
const MAX_PEER_RETRY_AFTER: u64 = 24 * 3600;

/// Longest wait for a member's health answer (shorter when `refresh` is).
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the DNS name's addresses; on failure the previous members are kept.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Peers are on the cluster network: a connection that takes longer is as good as refused,
/// and the caller falls back to fetching itself.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A peer stream that delivers nothing for this long is stalled. Longer than an owner may
/// legitimately wait on its upstream before its first byte (`request_timeout`, 30 s by
/// default) and than its own stall detection (`blob_stall_timeout`, 30 s), so a slow upstream
/// is reported by the owner, not mistaken for a dead owner.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// An instance id is 32 hex digits; a health answer longer than this is not one of ours.
const MAX_HEALTH_BODY: usize = 128;
/// At most this many members (a DNS answer may hold more records; the rest are ignored), so
/// probes per pass and metric series stay bounded.
pub const MAX_MEMBERS: usize = 256;

/// A replica of the cluster: its peer-channel address and the URL requests to it start with.
/// Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    address: Arc<str>,
    base_url: Arc<str>,
}

impl Member {
    /// `scheme` is `https` with `cluster.tls`, else `http`: the same for every member.
    fn new(address: &str, scheme: &str) -> Member {
        Member {
            address: address.into(),
            base_url: format!("{scheme}://{address}").into(),
        }
    }

    /// `host:port` as listed or resolved: the member's identity, and its metrics label.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `http://host:port` (`https://` with `cluster.tls`), no trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

/// Who owns a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This replica: fetch it upstream (single-flighted) or serve it.
    Me,
    /// Another replica: forward the miss to it.
    Peer(Member),
}

/// One member as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub address: String,
    /// Its last health probe succeeded.
    pub healthy: bool,
    /// It answered with our instance id.
    pub is_self: bool,
    /// Seconds since its last successful probe; `None` if it never answered.
    pub last_ok_secs_ago: Option<u64>,
    /// Misses forwarded to it, and fetched locally because it did not answer, since it joined.
    pub forwards: u64,
    pub fallbacks: u64,
}

/// Why a request to a peer failed. The caller falls back to fetching itself.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer answered, but not with 2xx (redirects included: they are never followed).
    /// `final_answer`: the peer relays its upstream's answer ([`FINAL_HEADER`]), with the
    /// upstream's `Retry-After` (clamped) when it was a 429.
    #[error("peer {peer} answered {status}")]
    Status {
        peer: String,
        status: StatusCode,
        final_answer: bool,
        retry_after: Option<u64>,
    },
    /// The answer is not sealed for our request with the cluster's secret: it did not come
    /// from the peer (or was changed on the way), and nothing in it is believed.
    #[error("peer {peer} answered without a valid seal")]
    Unsealed { peer: String },
    /// The member's instance id is not known yet (it never answered a probe), so no request
    /// can be signed for it.
    #[error("peer {peer} has not answered a health probe yet")]
    NotProbed { peer: String },
    /// No answer: refused, reset, timed out.
    #[error("peer {peer}: {source}")]
    Transport {
        peer: String,
        #[source]
        source: reqwest::Error,
    },
    /// The path given to [`Cluster::get`] is not an absolute path with an optional query.
    #[error("not a peer path: {0:?}")]
    InvalidPath(String),
}

impl PeerError {
    /// The peer's status, when it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            PeerError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where the candidate members come from.
enum Source {
    Static(Vec<String>),
    Dns(String),
}

/// What the last membership pass found. Replaced whole after each pass, never edited in place,
/// so readers take a snapshot without holding a lock.
#[derive(Default)]
struct View {
    /// By address.
    members: BTreeMap<Arc<str>, MemberState>,
    /// The addresses that answered with our instance id, from the last pass that found any:
    /// normally one, more if the list names this replica twice (all of them are "me", so we
    /// never forward to ourselves). Empty until we have seen ourselves.
    self_addresses: BTreeSet<Arc<str>>,
    /// Whether this replica serves: it is up in its own view, and its view agreed (every
    /// member up or down, none unknown) for two passes in a row once; from then on until it
    /// loses itself.
    ready: bool,
    /// Consecutive passes that ended with this replica up and no member unknown.
    settled_passes: u32,
    /// The members that are up: the ring ownership is decided over.
    ring: Vec<Member>,
    /// Passes run so far.
    passes: u64,
}

/// What probes have established about a member, with hysteresis: one lost probe does not
/// take a member down, one answer does not bring a flapping one back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Listed, but neither up nor down yet: at start-up, the peers starting beside us.
    Unknown,
    Up,
    Down,
}

struct MemberState {
    member: Member,
    health: Health,
    /// Probes in a row that went against `health` (failures of an unknown or up member,
    /// answers of a down one).
    streak: u32,
    last_ok: Option<Instant>,
    /// What it last answered to a health probe: requests to it are signed for this id.
    instance_id: Option<Arc<str>>,
}

/// Why a health probe failed.
struct ProbeError {
    /// No answer in time (as opposed to refused, reset or a wrong answer).
    timed_out: bool,
    text: String,
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// This replica's view of the cluster.
pub struct Cluster {
    instance_id: String,
    signer: auth::Signer,
    /// Nonces of the peer requests accepted lately.
    replays: auth::Replays,
    source: Source,
    refresh: Duration,
    probe_timeout: Duration,
    down_after: u32,
    up_after: u32,
    client: reqwest::Client,
    /// `https` with `cluster.tls`, else `http`.
    scheme: &'static str,
    metrics: Arc<Metrics>,
    view: RwLock<Arc<View>>,
}

impl Cluster {
    /// Reads the secret (a file, or `${VAR}`s) and builds the peer client. Membership is empty
    /// until the first [`Cluster::refresh_once`]: meanwhile this replica owns everything.
    pub fn new(config: &ClusterConfig, metrics: Arc<Metrics>) -> Result<Arc<Cluster>, String> {
        Cluster::with_probe_timeout(config, metrics, config.refresh.0.min(MAX_PROBE_TIMEOUT))
    }

    /// [`Cluster::new`] with another health-probe deadline: tests on a loaded machine use a
    /// generous one, so that only a dead member is unhealthy, never a slow test server.
    fn with_probe_timeout(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
        probe_timeout: Duration,
    ) -> Result<Arc<Cluster>, String> {
        let secret = config.load_secret()?;
        let source = match (&config.dns, config.peers.is_empty()) {
            (Some(name), true) => Source::Dns(name.clone()),
            (None, false) => Source::Static(config.peers.clone()),
            _ => return Err("cluster: set either peers or dns".to_owned()),
        };
        // rustls needs a process-wide provider even for a client that only speaks plain HTTP.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder();
        let scheme = match &config.tls {
            Some(tls) => {
                builder = builder
                    .tls_backend_preconfigured(tls::client_config(tls)?)
                    // Never fall back to plain HTTP, whatever URL a bug might build.
                    .https_only(true);
                "https"
            }
            None => "http",
        };
        let client = builder
            .user_agent(concat!("regmirror-peer/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            // Peers are on the cluster network: a proxy from the environment would send the
            // signed requests (and the bytes) somewhere else.
            .no_proxy()
            // A peer serves content or fails; a redirect is an error, never followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| format!("cluster: cannot build the peer client: {err}"))?;
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| "cluster: no randomness for the instance id".to_owned())?;
        Ok(Arc::new(Cluster {
            instance_id: hex::encode(id),
            signer: auth::Signer::new(&secret),
            replays: auth::Replays::default(),
            source,
            refresh: config.refresh.0,
            probe_timeout,
            down_after: config.down_after.max(1),
            up_after: config.up_after.max(1),
            client,
            scheme,
            metrics,
            view: RwLock::new(Arc::new(View::default())),
        }))
    }

    /// This process's id: 128 random bits in hex, what our health endpoint answers.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Refreshes membership every `refresh` until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl Future) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = self.refresh_once() => {}
                _ = &mut shutdown => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.refresh) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// One membership pass: resolve the candidates, probe each, publish the new view.
    pub async fn refresh_once(&self) {
        let old = self.view();
        let addresses = self.candidates(&old).await;
        let answers = join_all(addresses.iter().map(|address| self.probe(address))).await;
        let now = Instant::now();
        let mut members = BTreeMap::new();
        let mut seen_self = BTreeSet::new();
        for (address, answer) in addresses.iter().zip(answers) {
            let previous = old.members.get(address.as_str());
            let ok = match &answer {
                Ok(id) => {
                    if *id == self.instance_id {
                        seen_self.insert(Arc::<str>::from(address.as_str()));
                    }
                    true
                }
                // Our own listener answering slowly (a loaded machine) is still us: a replica
                // never drops itself from its own view for a probe that timed out. A refused
                // connection is another matter: our peer listener is gone.
                Err(error) if error.timed_out && old.self_addresses.contains(address.as_str()) => {
                    seen_self.insert(Arc::<str>::from(address.as_str()));
                    true
                }
                Err(_) => false,
            };
            let (health, streak) = previous.map_or((Health::Unknown, 0), |p| (p.health, p.streak));
            let (health, streak) = self.next_health(health, streak, ok);
            // Log transitions only: a dead member would otherwise log every pass.
            let was = previous.map(|p| p.health);
            if health != was.unwrap_or(Health::Unknown) || previous.is_none() {
                match (health, &answer) {
                    (Health::Up, _) => tracing::info!(peer = %address, "cluster member up"),
                    (Health::Down, Err(error)) => {
                        tracing::warn!(peer = %address, %error, "cluster member down")
                    }
                    _ => {}
                }
            }
            let member = match previous {
                Some(p) => p.member.clone(),
                None => {
                    self.metrics.cluster_peer_joined(address);
                    Member::new(address, self.scheme)
                }
            };
            let last_ok = if ok {
                Some(now)
            } else {
                previous.and_then(|p| p.last_ok)
            };
            let instance_id = match &answer {
                Ok(id) => Some(Arc::<str>::from(id.as_str())),
                Err(_) => previous.and_then(|p| p.instance_id.clone()),
            };
            members.insert(
                member.address.clone(),
                MemberState {
                    member,
                    health,
                    streak,
                    last_ok,
                    instance_id,
                },
            );
        }
        for address in old.members.keys() {
            if !members.contains_key(address) {
                tracing::info!(peer = %address, "cluster member left");
                self.metrics.cluster_peer_left(address);
            }
        }
        if seen_self.len() > 1 && seen_self != old.self_addresses {
            tracing::warn!(addresses = ?seen_self, "this replica is listed under several addresses");
        }
        let self_addresses = if seen_self.is_empty() {
            old.self_addresses.clone()
        } else {
            seen_self
        };
        let self_up = self_addresses
            .iter()
            .any(|a| members.get(a).is_some_and(|m| m.health == Health::Up));
        let settled = self_up && members.values().all(|m| m.health != Health::Unknown);
        let settled_passes = if settled {
            old.settled_passes.saturating_add(1)
        } else {
            0
        };
        // Agree before owning: the first time, two settled passes in a row, so the peers that
        // started beside us have had a whole `refresh` to probe us too. Once ready, a member
        // joining later (unknown until probed) does not take every replica out of service.
        let ready = self_up && (old.ready || settled_passes >= 2);
        if ready && !old.ready {
            tracing::info!(addresses = ?self_addresses, "cluster: this replica is among the healthy members and its view is settled");
        } else if !self_up && (old.ready || old.passes == 0) {
            // Not ready until it is: usually our own address is missing from `peers` (or from
            // the DNS answer), or our peer listener does not answer.
            tracing::warn!("cluster: no member answered with this replica's instance id");
        }
        let ring: Vec<Member> = members
            .values()
            .filter(|m| m.health == Health::Up)
            .map(|m| m.member.clone())
            .collect();
        self.metrics
            .cluster_members(ring.len(), members.len() - ring.len());
        let view = View {
            members,
            self_addresses,
            ready,
            settled_passes,
            ring,
            passes: old.passes.saturating_add(1),
        };
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
    }

    /// A member's health after one more probe (`ok`: it answered), with hysteresis: up after
    /// `up_after` answers in a row once down (at the first answer if never up or down yet),
    /// down after `down_after` failures in a row.
    fn next_health(&self, health: Health, streak: u32, ok: bool) -> (Health, u32) {
        match (health, ok) {
            (Health::Unknown, true) => (Health::Up, 0),
            (Health::Up, true) | (Health::Down, false) => (health, 0),
            (Health::Unknown | Health::Up, false) => {
                let streak = streak.saturating_add(1);
                if streak >= self.down_after {
                    (Health::Down, 0)
                } else {
                    (health, streak)
                }
            }
            (Health::Down, true) => {
                let streak = streak.saturating_add(1);
                if streak >= self.up_after {
                    (Health::Up, 0)
                } else {
                    (Health::Down, streak)
                }
            }
        }
    }

    /// The addresses to probe this pass: the static list, or what the DNS name resolves to
    /// (the previous members if resolving fails, so a DNS hiccup empties nothing).
    async fn candidates(&self, old: &View) -> Vec<String> {
        let addresses: BTreeSet<String> = match &self.source {
            Source::Static(peers) => peers.iter().cloned().collect(),
            Source::Dns(name) => {
                match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host(name.as_str()))
                    .await
                {
                    Ok(Ok(found)) => found.map(|addr| addr.to_string()).collect(),
                    Ok(Err(error)) => {
                        tracing::warn!(%name, %error, "cluster: cannot resolve the peers' name; keeping the last members");
                        old.members.keys().map(|a| a.to_string()).collect()
                    }
                    Err(_) => {
                        tracing::warn!(%name, "cluster: resolving the peers' name timed out; keeping the last members");
                        old.members.keys().map(|a| a.to_string()).collect()
                    }
                }
            }
        };
        if addresses.len() > MAX_MEMBERS {
            tracing::warn!(
                found = addresses.len(),
                kept = MAX_MEMBERS,
                "cluster: too many members"
            );
        }
        addresses.into_iter().take(MAX_MEMBERS).collect()
    }

    /// Asks one member for its instance id.
    async fn probe(&self, address: &str) -> Result<String, ProbeError> {
        let failed = |e: reqwest::Error| ProbeError {
            timed_out: e.is_timeout(),
            text: e.to_string(),
        };
        let wrong = |text: String| ProbeError {
            timed_out: false,
            text,
        };
        let url = format!("{}://{address}{HEALTH_PATH}", self.scheme);
        // The probe is for whoever answers at the address: its id is what we learn here.
        let (name, value, nonce) = self
            .sign("GET", HEALTH_PATH, "")
            .ok_or_else(|| wrong("no randomness for a nonce".to_owned()))?;
        let response = self
            .client
            .get(&url)
            .header(name, value)
            .timeout(self.probe_timeout)
            .send()
            .await
            .map_err(failed)?;
        if !self
            .signer
            .check_seal(&nonce, response.status(), response.headers())
        {
            return Err(wrong(format!(
                "health answered {} without a valid seal (another secret?)",
                response.status()
            )));
        }
        if !response.status().is_success() {
            return Err(wrong(format!("health answered {}", response.status())));
        }
        let id = response
            .headers()
            .get(INSTANCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= MAX_HEALTH_BODY
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            .ok_or_else(|| wrong("health answer without an instance id".to_owned()))?;
        Ok(id.to_owned())
    }

    fn view(&self) -> Arc<View> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Who owns `key` (a digest `sha256:…`, or `tag\0<upstream>\0<repository>\0<tag>`):
    /// rendezvous hashing over the healthy members. Until this replica has seen itself, or when
    /// no member is healthy, it owns everything: a lone replica serves on its own.
    pub fn owner(&self, key: &str) -> Owner {
        let view = self.view();
        if view.self_addresses.is_empty() {
            return Owner::Me;
        }
        let Some(best) = rendezvous::pick(view.ring.iter().map(Member::address), key) else {
            return Owner::Me;
        };
        if view.self_addresses.contains(best) {
            return Owner::Me;
        }
        match view.ring.iter().find(|m| m.address() == best) {
            Some(member) => Owner::Peer(member.clone()),
            None => Owner::Me,
        }
    }

    /// The ownership key of a tag, so that every replica builds it alike.
    pub fn tag_key(upstream: &str, repository: &str, tag: &str) -> String {
        format!("tag\0{upstream}\0{repository}\0{tag}")
    }

    /// Every member from the last pass, by address.
    pub fn members(&self) -> Vec<MemberStatus> {
        let view = self.view();
        let now = Instant::now();
        view.members
            .values()
            .map(|m| {
                let (forwards, fallbacks) = self.metrics.cluster_peer_counts(m.member.address());
                MemberStatus {
                    address: m.member.address().to_owned(),
                    healthy: m.health == Health::Up,
                    is_self: view.self_addresses.contains(m.member.address()),
                    last_ok_secs_ago: m
                        .last_ok
                        .map(|t| now.saturating_duration_since(t).as_secs()),
                    forwards,
                    fallbacks,
                }
            })
            .collect()
    }

    /// Whether this replica is up in its own view, which has settled (for `/readyz`).
    pub fn ready(&self) -> bool {
        self.view().ready
    }

    /// The signature header for a request this replica sends now.
    /// The signature header for a request this replica sends now to the replica whose
    /// instance id is `receiver` (empty for a health probe), with the nonce its answer's seal
    /// must be bound to. `None` only without randomness.
    pub fn sign(
        &self,
        method: &str,
        path_and_query: &str,
        receiver: &str,
    ) -> Option<(HeaderName, HeaderValue, Nonce)> {
        let nonce = self.signer.nonce()?;
        let value = self
            .signer
            .sign_at(method, path_and_query, auth::unix_now(), &nonce, receiver);
        Some((auth::HEADER, value, nonce))
    }

    /// The request's nonce if it carries a valid signature for this method and path (with
    /// query, exactly as received), made for this replica (any replica for the health probe)
    /// within the last minute or so, and never seen before. A missing, malformed, stale,
    /// replayed or wrong signature, or one meant for another replica, is `None`.
    pub fn verify(&self, headers: &HeaderMap, method: &str, path_and_query: &str) -> Option<Nonce> {
        self.verify_as(&self.instance_id, headers, method, path_and_query)
    }

    fn verify_as(
        &self,
        instance_id: &str,
        headers: &HeaderMap,
        method: &str,
        path_and_query: &str,
    ) -> Option<Nonce> {
        let receiver = if path_and_query == HEALTH_PATH {
            ""
        } else {
            instance_id
        };
        let now = auth::unix_now();
        let (seconds, nonce) =
            self.signer
                .verify_at(headers, method, path_and_query, receiver, now)?;
        self.replays.first_use(nonce, seconds, now).then_some(nonce)
    }

    /// Seals our answer to the peer request that sent `nonce`: the asking replica believes
    /// its status and meaningful headers only with this.
    pub fn seal(&self, nonce: &Nonce, response: &mut axum::response::Response) {
        let seal = self
            .signer
            .seal(nonce, response.status(), response.headers());
        response.headers_mut().insert(auth::SEAL, seal);
    }

    /// A signed `GET` of `path_and_query` (starting with `/`) on `member`, from byte
    /// `range_from` on. Any answer but 2xx is an error carrying its status.
    pub async fn get(
        &self,
        member: &Member,
        path_and_query: &str,
        range_from: u64,
    ) -> Result<reqwest::Response, PeerError> {
        if !path_and_query.starts_with('/') || path_and_query.starts_with("//") {
            return Err(PeerError::InvalidPath(path_and_query.to_owned()));
        }
        let url = reqwest::Url::parse(&format!("{}{path_and_query}", member.base_url()))
            .map_err(|_| PeerError::InvalidPath(path_and_query.to_owned()))?;
        // Sign what goes on the wire: the URL parser may have percent-encoded characters.
        let signed = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let receiver = self
            .view()
            .members
            .get(member.address())
            .and_then(|m| m.instance_id.clone())
            .ok_or_else(|| PeerError::NotProbed {
                peer: member.address().to_owned(),
            })?;
        let mut answer = self
            .send_signed(member, &url, &signed, range_from, &receiver)
            .await;
        if let Err(PeerError::Unsealed { .. }) = &answer {
            // A member restarted at the same address has a new instance id, and refuses what
            // was signed for the old one until the next pass learns it: ask it now, once.
            if let Ok(id) = self.probe(member.address()).await {
                if *id != *receiver {
                    answer = self
                        .send_signed(member, &url, &signed, range_from, &id)
                        .await;
                }
            }
        }
        let response = answer?;
        if !response.status().is_success() {
            let headers = response.headers();
            return Err(PeerError::Status {
                peer: member.address().to_owned(),
                status: response.status(),
                final_answer: headers.contains_key(FINAL_HEADER),
                retry_after: headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|seconds| seconds.min(MAX_PEER_RETRY_AFTER)),
            });
        }
        Ok(response)
    }

    /// One GET of `url` (whose path and query are `signed`) signed for the replica `receiver`;
    /// its answer if sealed for it.
    async fn send_signed(
        &self,
        member: &Member,
        url: &reqwest::Url,
        signed: &str,
        range_from: u64,
        receiver: &str,
    ) -> Result<reqwest::Response, PeerError> {
        let (name, value, nonce) =
            self.sign("GET", signed, receiver)
                .ok_or_else(|| PeerError::NotProbed {
                    peer: member.address().to_owned(),
                })?;
        let mut request = self.client.get(url.clone()).header(name, value);
        if range_from > 0 {
            request = request.header(header::RANGE, format!("bytes={range_from}-"));
        }
        let response = request
            .send()
            .await
            .map_err(|source| PeerError::Transport {
                peer: member.address().to_owned(),
                source,
            })?;
        if !self
            .signer
            .check_seal(&nonce, response.status(), response.headers())
        {
            return Err(PeerError::Unsealed {
                peer: member.address().to_owned(),
            });
        }
        Ok(response)
    }

    /// A miss was forwarded to its owner `member`.
    pub fn forwarded(&self, member: &Member) {
        self.metrics.cluster_forward(member.address());
    }

    /// `member` relayed its upstream's answer (404, 429, 401, 403), which this replica relays
    /// on instead of asking the upstream itself.
    pub fn relayed_final(&self, member: &Member) {
        self.metrics.cluster_final(member.address());
    }

    /// A miss owned by `member` was fetched locally because it did not answer.
    pub fn fell_back(&self, member: &Member) {
        self.metrics.cluster_fallback(member.address());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::{Method, Uri};
    use axum::response::{IntoResponse, Response};
    use axum::Router;

    use crate::config::HumanDuration;

    const SECRET: &str = "a shared secret of the test cluster";

    /// A safety net against hangs only: members are unhealthy because they refuse, not
    /// because a loaded machine was slow.
    const TEST_PROBE_TIMEOUT: Duration = Duration::from_secs(60);

    fn new_cluster(config: &ClusterConfig, metrics: Arc<Metrics>) -> Result<Arc<Cluster>, String> {
        Cluster::with_probe_timeout(config, metrics, TEST_PROBE_TIMEOUT)
    }

    fn config(peers: Vec<String>, secret: &str) -> ClusterConfig {
        ClusterConfig {
            peers,
            dns: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            secret: Some(secret.to_owned()),
            secret_file: None,
            refresh: HumanDuration(Duration::from_secs(2)),
            // Without hysteresis, so one pass shows each change; the hysteresis has its own test.
            down_after: 1,
            up_after: 1,
            tls: None,
        }
    }

    /// A stand-in for another replica's peer channel: checks every request's signature with a
    /// cluster of its own (same secret), answers the health probe with `id`, echoes the Range
    /// of blob requests, redirects `/_regmirror/peer/redirect`. Every answer closes its
    /// connection, so a killed server is gone for the client at once.
    struct TestPeer {
        address: String,
        task: tokio::task::JoinHandle<()>,
        signed: Arc<AtomicUsize>,
        unsigned: Arc<AtomicUsize>,
    }

    impl TestPeer {
        async fn start(
            listener: tokio::net::TcpListener,
            id: String,
            verifier: Arc<Cluster>,
        ) -> TestPeer {
            let address = listener.local_addr().unwrap().to_string();
            let signed = Arc::new(AtomicUsize::new(0));
            let unsigned = Arc::new(AtomicUsize::new(0));
            let (good, bad) = (signed.clone(), unsigned.clone());
            let app =
                Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
                    let (verifier, id, good, bad) =
                        (verifier.clone(), id.clone(), good.clone(), bad.clone());
                    async move {
                        let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
                        let nonce = verifier.verify_as(&id, &headers, method.as_str(), target);
                        let mut answer: Response = match nonce {
                            None => {
                                bad.fetch_add(1, Ordering::SeqCst);
                                StatusCode::UNAUTHORIZED.into_response()
                            }
                            Some(_) => {
                                good.fetch_add(1, Ordering::SeqCst);
                                let range = headers
                                    .get(header::RANGE)
                                    .map(|v| v.to_str().unwrap().to_owned());
                                match uri.path() {
                                    HEALTH_PATH => ([(INSTANCE_HEADER, id.clone())], id.clone())
                                        .into_response(),
                                    "/_regmirror/peer/redirect" => (
                                        StatusCode::TEMPORARY_REDIRECT,
                                        [(header::LOCATION, "http://127.0.0.1:9/")],
                                    )
                                        .into_response(),
                                    "/_regmirror/peer/final" => (
                                        StatusCode::TOO_MANY_REQUESTS,
                                        [
                                            (FINAL_HEADER, "1"),
                                            (header::RETRY_AFTER.as_str(), "99999999999"),
                                        ],
                                    )
                                        .into_response(),
                                    path if path.starts_with("/_regmirror/peer/blobs/") => {
                                        format!("{target} range={range:?}").into_response()
                                    }
                                    _ => StatusCode::NOT_FOUND.into_response(),
                                }
                            }
                        };
                        // Every answer sealed, except the one that shows an unsealed answer
                        // is not believed.
                        if let Some(nonce) =
                            nonce.filter(|_| uri.path() != "/_regmirror/peer/unsealed")
                        {
                            verifier.seal(&nonce, &mut answer);
                        }
                        ([(header::CONNECTION, "close")], answer).into_response()
                    }
                });
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            TestPeer {
                address,
                task,
                signed,
                unsigned,
            }
        }

        async fn kill(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    async fn listener() -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    fn keys() -> Vec<String> {
        (0..3_000u32)
            .map(|i| format!("sha256:{:064x}", i))
            .collect()
    }

    fn owner_names(cluster: &Cluster, keys: &[String], me: &str) -> Vec<String> {
        keys.iter()
            .map(|key| match cluster.owner(key) {
                Owner::Me => me.to_owned(),
                Owner::Peer(member) => member.address().to_owned(),
            })
            .collect()
    }

    #[tokio::test]
    async fn membership_health_and_ownership_over_loopback() {
        let listeners = [listener().await, listener().await, listener().await];
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut addresses: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        addresses.push(dead.clone());
        let metrics = Arc::new(Metrics::new());
        let cluster = new_cluster(&config(addresses.clone(), SECRET), metrics.clone()).unwrap();
        assert_eq!(cluster.instance_id().len(), 32);
        assert!(cluster.instance_id().bytes().all(|b| b.is_ascii_hexdigit()));
        // Before the first pass: alone, not ready, owner of everything.
        assert!(!cluster.ready());
        assert_eq!(cluster.owner("sha256:00"), Owner::Me);

        let verifier = new_cluster(
            &config(vec!["x:1".into()], SECRET),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let [l0, l1, l2] = listeners;
        let me = TestPeer::start(l0, cluster.instance_id().to_owned(), verifier.clone()).await;
        let b = TestPeer::start(l1, "id-of-b".to_owned(), verifier.clone()).await;
        let c = TestPeer::start(l2, "id-of-c".to_owned(), verifier.clone()).await;

        // Ready at the second pass that finds every member up or down.
        cluster.refresh_once().await;
        assert!(!cluster.ready(), "not at the first settled pass");
        cluster.refresh_once().await;
        let members = cluster.members();
        assert_eq!(members.len(), 4, "{members:?}");
        for m in &members {
            let expect_healthy = m.address != dead;
            assert_eq!(m.healthy, expect_healthy, "{m:?}");
            assert_eq!(m.is_self, m.address == me.address, "{m:?}");
            assert_eq!(m.last_ok_secs_ago.is_some(), expect_healthy, "{m:?}");
        }
        assert!(cluster.ready());
        let text = metrics.render();
        assert!(
            text.contains("regmirror_cluster_members{state=\"healthy\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("regmirror_cluster_members{state=\"unhealthy\"} 1"),
            "{text}"
        );

        let keys = keys();
        let before = owner_names(&cluster, &keys, &me.address);
        for who in [&me.address, &b.address, &c.address] {
            let share = before.iter().filter(|o| *o == who).count();
            assert!(share > 700, "{who} owns {share} of {}", keys.len());
        }
        assert!(!before.contains(&dead), "the dead member owns nothing");
        // Other replicas agree: the same ring from any replica's point of view.
        for (key, owner) in keys.iter().zip(&before) {
            let ring = [me.address.as_str(), b.address.as_str(), c.address.as_str()];
            assert_eq!(rendezvous::pick(ring, key), Some(owner.as_str()));
        }

        let (c_address, c_signed, c_unsigned) =
            (c.address.clone(), c.signed.clone(), c.unsigned.clone());
        c.kill().await;
        cluster.refresh_once().await;
        let status = cluster
            .members()
            .into_iter()
            .find(|m| m.address == c_address)
            .unwrap();
        assert!(
            !status.healthy && status.last_ok_secs_ago.is_some(),
            "{status:?}"
        );
        assert!(cluster.ready());
        let after = owner_names(&cluster, &keys, &me.address);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if *old == c_address {
                moved += 1;
                assert!(*new == me.address || *new == b.address, "{new}");
            } else {
                assert_eq!(old, new, "only the departed member's keys move");
            }
        }
        assert!(moved > 700, "{moved}");
        let text = metrics.render();
        assert!(
            text.contains("regmirror_cluster_members{state=\"unhealthy\"} 2"),
            "{text}"
        );

        // Every probe the replicas received was signed with the shared secret.
        for (signed, unsigned) in [
            (&me.signed, &me.unsigned),
            (&b.signed, &b.unsigned),
            (&c_signed, &c_unsigned),
        ] {
            assert!(signed.load(Ordering::SeqCst) >= 1);
            assert_eq!(unsigned.load(Ordering::SeqCst), 0);
        }
        me.kill().await;
        b.kill().await;
    }

    #[tokio::test]
    async fn a_replica_that_loses_itself_is_not_ready_and_never_forwards_to_itself() {
        let (l0, l1) = (listener().await, listener().await);
        let address = l0.local_addr().unwrap().to_string();
        // Listed twice under two names: both are "me".
        let alias = format!("localhost:{}", l0.local_addr().unwrap().port());
        let other = l1.local_addr().unwrap().to_string();
        let cluster = new_cluster(
            &config(vec![address.clone(), alias.clone(), other.clone()], SECRET),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let me = TestPeer::start(l0, cluster.instance_id().to_owned(), cluster.clone()).await;
        let b = TestPeer::start(l1, "id-of-b".to_owned(), cluster.clone()).await;
        // Ready at the second pass that finds every member up or down.
        cluster.refresh_once().await;
        assert!(!cluster.ready(), "not at the first settled pass");
        cluster.refresh_once().await;
        assert!(cluster.ready());
        let keys = keys();
        let owners = owner_names(&cluster, &keys, "me");
        assert!(
            owners.iter().all(|o| o == "me" || *o == other),
            "never an alias of me"
        );
        assert!(owners.iter().filter(|o| *o == "me").count() > 700);

        // Our own peer listener is gone: the others no longer count us, so neither do we, and
        // we forward to the member they agree on rather than fetch what we no longer own.
        me.kill().await;
        cluster.refresh_once().await;
        assert!(!cluster.ready(), "self not seen healthy in the last pass");
        let owners = owner_names(&cluster, &keys, "me");
        assert!(
            owners.iter().all(|o| *o == other),
            "all to the one healthy member"
        );

        b.kill().await;
        cluster.refresh_once().await;
        assert!(cluster.members().iter().all(|m| !m.healthy));
        assert_eq!(
            cluster.owner("sha256:00"),
            Owner::Me,
            "no healthy member: alone, so everything is ours"
        );
    }

    #[tokio::test]
    async fn hysteresis_and_readiness_wait_for_an_agreed_view() {
        let (l0, l1) = (listener().await, listener().await);
        let (address, other) = (
            l0.local_addr().unwrap().to_string(),
            l1.local_addr().unwrap().to_string(),
        );
        // `other` is not listening yet: a peer starting beside us.
        drop(l1);
        let mut config = config(vec![address.clone(), other.clone()], SECRET);
        (config.down_after, config.up_after) = (3, 2);
        let cluster = new_cluster(&config, Arc::new(Metrics::new())).unwrap();
        let me = TestPeer::start(l0, cluster.instance_id().to_owned(), cluster.clone()).await;
        // [us, b]
        let health = |cluster: &Cluster| -> Vec<bool> {
            let members = cluster.members();
            let of = |a: &str| members.iter().find(|m| m.address == a).unwrap().healthy;
            vec![of(&address), of(&other)]
        };
        let ours = |cluster: &Cluster, key: &str| cluster.owner(key) == Owner::Me;
        let keys = keys();

        // Unknown for down_after passes: not ready, so no load balancer sends us clients
        // while the peer may still come up and own half the keys.
        for _ in 0..2 {
            cluster.refresh_once().await;
            assert!(!cluster.ready(), "a peer is still unknown");
        }
        let l1 = tokio::net::TcpListener::bind(&other).await.unwrap();
        let b = TestPeer::start(l1, "id-of-b".to_owned(), cluster.clone()).await;
        cluster.refresh_once().await;
        assert_eq!(health(&cluster), [true, true], "up at its first answer");
        assert!(!cluster.ready(), "settled once");
        cluster.refresh_once().await;
        assert!(cluster.ready(), "settled twice");
        let shared: Vec<bool> = keys.iter().map(|k| ours(&cluster, k)).collect();
        assert!(
            shared.iter().filter(|o| !**o).count() > 1000,
            "b owns its share"
        );

        // One or two lost probes move nothing; the third takes b down.
        let b_address = b.address.clone();
        b.kill().await;
        for _ in 0..2 {
            cluster.refresh_once().await;
            assert_eq!(health(&cluster), [true, true]);
            assert_eq!(
                keys.iter().map(|k| ours(&cluster, k)).collect::<Vec<_>>(),
                shared
            );
        }
        cluster.refresh_once().await;
        assert_eq!(health(&cluster), [true, false]);
        assert!(keys.iter().all(|k| ours(&cluster, k)));
        assert!(cluster.ready(), "ready stays once settled");

        // Back: up only after up_after answers in a row.
        let l1 = tokio::net::TcpListener::bind(&b_address).await.unwrap();
        let b = TestPeer::start(l1, "id-of-b".to_owned(), cluster.clone()).await;
        cluster.refresh_once().await;
        assert_eq!(health(&cluster), [true, false]);
        cluster.refresh_once().await;
        assert_eq!(health(&cluster), [true, true]);
        assert_eq!(
            keys.iter().map(|k| ours(&cluster, k)).collect::<Vec<_>>(),
            shared
        );
        b.kill().await;
        me.kill().await;
    }

    #[tokio::test]
    async fn a_member_restarted_at_its_address_is_asked_again_at_once() {
        let l0 = listener().await;
        let address = l0.local_addr().unwrap().to_string();
        let verifier = new_cluster(
            &config(vec!["x:1".into()], SECRET),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let first = TestPeer::start(l0, "id-before".to_owned(), verifier.clone()).await;
        let cluster = new_cluster(
            &config(vec![address.clone()], SECRET),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        cluster.refresh_once().await;
        first.kill().await;
        // Same address, new process: a new instance id the last pass did not see.
        let l0 = tokio::net::TcpListener::bind(&address).await.unwrap();
        let second = TestPeer::start(l0, "id-after".to_owned(), verifier).await;
        let path = "/_regmirror/peer/blobs/sha256:ab?upstream=docker.io&repository=library/x";
        let body = cluster
            .get(&Member::new(&address, "http"), path, 0)
            .await
            .expect("signed again for the new instance")
            .text()
            .await
            .unwrap();
        assert_eq!(body, format!("{path} range=None"));
        second.kill().await;
    }

    #[tokio::test]
    async fn dns_names_resolve_to_members() {
        let l0 = listener().await;
        let port = l0.local_addr().unwrap().port();
        let mut config = config(Vec::new(), SECRET);
        config.dns = Some(format!("localhost:{port}"));
        let cluster = new_cluster(&config, Arc::new(Metrics::new())).unwrap();
        let me = TestPeer::start(l0, cluster.instance_id().to_owned(), cluster.clone()).await;
        // Ready at the second pass that finds every member up or down.
        cluster.refresh_once().await;
        assert!(!cluster.ready(), "not at the first settled pass");
        cluster.refresh_once().await;
        let members = cluster.members();
        let own = format!("127.0.0.1:{port}");
        let found = members.iter().find(|m| m.address == own);
        assert!(found.is_some_and(|m| m.healthy && m.is_self), "{members:?}");
        assert!(cluster.ready());
        me.kill().await;
    }

    #[tokio::test]
    async fn get_is_signed_sends_ranges_and_refuses_non_2xx() {
        let l0 = listener().await;
        let verifier = new_cluster(
            &config(vec!["x:1".into()], SECRET),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let peer = TestPeer::start(l0, "id".to_owned(), verifier).await;
        let metrics = Arc::new(Metrics::new());
        let cluster =
            new_cluster(&config(vec![peer.address.clone()], SECRET), metrics.clone()).unwrap();
        let member = Member::new(&peer.address, "http");
        assert_eq!(member.base_url(), format!("http://{}", peer.address));

        let path = "/_regmirror/peer/blobs/sha256:ab?upstream=docker.io&repository=library/x";
        // Requests are signed for the instance id the member's health answer gave.
        assert!(matches!(
            cluster.get(&member, path, 0).await,
            Err(PeerError::NotProbed { .. })
        ));
        cluster.refresh_once().await;
        let body = cluster
            .get(&member, path, 0)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, format!("{path} range=None"));
        let body = cluster
            .get(&member, path, 100)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, format!("{path} range=Some(\"bytes=100-\")"));
        // Characters the URL parser encodes: the signature covers what is sent.
        let odd = "/_regmirror/peer/blobs/a b?repository=ü x";
        let body = cluster
            .get(&member, odd, 0)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.starts_with("/_regmirror/peer/blobs/a%20b?"), "{body}");

        let err = cluster
            .get(&member, "/_regmirror/peer/redirect", 0)
            .await
            .unwrap_err();
        assert_eq!(
            err.status(),
            Some(StatusCode::TEMPORARY_REDIRECT),
            "never followed: {err}"
        );
        let err = cluster
            .get(&member, "/_regmirror/peer/other", 0)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
        assert!(
            matches!(
                err,
                PeerError::Status {
                    final_answer: false,
                    ..
                }
            ),
            "an error without the final header is the owner's failure: {err:?}"
        );
        let err = cluster
            .get(&member, "/_regmirror/peer/final", 0)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                PeerError::Status {
                    final_answer: true,
                    retry_after: Some(MAX_PEER_RETRY_AFTER),
                    ..
                }
            ),
            "relayed and clamped: {err:?}"
        );
        let err = cluster
            .get(&member, "/_regmirror/peer/unsealed", 0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, PeerError::Unsealed { .. }),
            "an answer without our seal is not believed: {err:?}"
        );
        // A signature is good once, and for its receiver only.
        let url = format!("{}{path}", member.base_url());
        let (name, value, _) = cluster.sign("GET", path, "id").unwrap();
        let send = |value: HeaderValue| {
            let (url, name) = (url.clone(), name.clone());
            async move {
                reqwest::Client::new()
                    .get(url)
                    .header(name, value)
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        };
        assert_eq!(send(value.clone()).await, StatusCode::OK);
        assert_eq!(send(value).await, StatusCode::UNAUTHORIZED, "replayed");
        let (_, other, _) = cluster.sign("GET", path, "id-of-another").unwrap();
        assert_eq!(
            send(other).await,
            StatusCode::UNAUTHORIZED,
            "meant for another"
        );
        assert_eq!(peer.unsigned.load(Ordering::SeqCst), 2);
        peer.unsigned.store(0, Ordering::SeqCst);
        for bad in ["relative", "", "//elsewhere/x"] {
            assert!(
                matches!(
                    cluster.get(&member, bad, 0).await,
                    Err(PeerError::InvalidPath(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(peer.unsigned.load(Ordering::SeqCst), 0);

        let stranger = new_cluster(
            &config(vec![peer.address.clone()], "not the cluster's secret"),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        stranger.refresh_once().await;
        assert!(stranger.members().iter().all(|m| !m.healthy));
        assert_eq!(
            peer.unsigned.load(Ordering::SeqCst),
            1,
            "its probe was refused"
        );
        assert!(matches!(
            stranger.get(&member, path, 0).await,
            Err(PeerError::NotProbed { .. })
        ));

        let port = peer.address.rsplit_once(':').unwrap().1.to_owned();
        peer.kill().await;
        let err = cluster.get(&member, path, 0).await.unwrap_err();
        assert!(matches!(err, PeerError::Transport { .. }), "{err}");
        assert!(err.status().is_none());

        cluster.refresh_once().await;
        cluster.forwarded(&member);
        cluster.forwarded(&member);
        cluster.fell_back(&member);
        let text = metrics.render();
        let peer_label = format!("peer=\"127.0.0.1:{port}\"");
        assert!(
            text.contains(&format!(
                "regmirror_cluster_forwards_total{{{peer_label}}} 2"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "regmirror_cluster_fallbacks_total{{{peer_label}}} 1"
            )),
            "{text}"
        );
        let status = &cluster.members()[0];
        assert_eq!((status.forwards, status.fallbacks), (2, 1));
    }

    #[tokio::test]
    async fn run_stops_on_shutdown() {
        let cluster = Cluster::new(
            &config(vec!["127.0.0.1:9".into()], SECRET),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cluster.clone().run(stopped));
        stop.send(()).unwrap();
        // A safety net against a hang, not the assertion.
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_short_secret_is_refused_at_start_up() {
        let err = Cluster::new(
            &config(vec!["x:1".into()], "short"),
            Arc::new(Metrics::new()),
        )
        .err()
        .unwrap();
        assert!(err.contains("at least 16 bytes"), "{err}");
    }
}
