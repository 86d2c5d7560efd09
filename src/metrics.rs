//! Prometheus metrics and the in-memory facts behind the status page: names as constants, one
//! registry per process, low-cardinality labels only (route kinds, outcomes, upstream names,
//! status classes; never a repository or a digest).
//!
//! Per-repository request counts and each upstream's health are kept here in memory for the
//! status page (`GET /`) and are deliberately not exported as labels. This module knows nothing
//! of HTTP servers, storage or upstream protocols: callers report what happened.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::outcome::Outcome;

pub const HTTP_REQUESTS: &str = "regmirror_http_requests_total";
pub const HTTP_DURATION: &str = "regmirror_http_request_duration_seconds";
pub const CACHE_REQUESTS: &str = "regmirror_cache_requests_total";
pub const SERVED_BYTES: &str = "regmirror_served_bytes_total";
pub const UPSTREAM_REQUESTS: &str = "regmirror_upstream_requests_total";
pub const UPSTREAM_DURATION: &str = "regmirror_upstream_request_duration_seconds";
pub const UPSTREAM_BYTES: &str = "regmirror_upstream_fetched_bytes_total";
pub const UPSTREAM_UP: &str = "regmirror_upstream_up";
pub const TOKEN_FETCHES: &str = "regmirror_token_fetches_total";
pub const RATELIMIT_REMAINING: &str = "regmirror_upstream_ratelimit_remaining";
pub const RATELIMIT_LIMIT: &str = "regmirror_upstream_ratelimit_limit";
pub const SINGLE_FLIGHT_JOINS: &str = "regmirror_single_flight_joins_total";
pub const DOWNLOADS_IN_FLIGHT: &str = "regmirror_downloads_in_flight";
pub const CACHE_SIZE: &str = "regmirror_cache_size_bytes";
pub const CACHE_BLOBS: &str = "regmirror_cache_blobs";
pub const CACHE_LIMIT: &str = "regmirror_cache_limit_bytes";
pub const EVICTIONS: &str = "regmirror_evictions_total";
pub const EVICTED_BYTES: &str = "regmirror_evicted_bytes_total";
pub const PASSTHROUGH: &str = "regmirror_passthrough_total";
pub const SENDFILE_BYTES: &str = "regmirror_sendfile_bytes_total";
pub const CONNECTIONS_EVICTED: &str = "regmirror_connections_evicted_total";
pub const SENDFILE_ENABLED: &str = "regmirror_sendfile_enabled";
pub const SCRUB_CORRUPT: &str = "regmirror_scrub_corrupt_total";
pub const SCRUB_BLOBS: &str = "regmirror_scrub_blobs_total";
pub const SCRUB_BYTES: &str = "regmirror_scrub_bytes_total";
pub const SCRUB_PASSES: &str = "regmirror_scrub_passes_total";
pub const STORE_UNVERIFIED: &str = "regmirror_store_unverified_blobs";
pub const BUILD_INFO: &str = "regmirror_build_info";
pub const CLUSTER_MEMBERS: &str = "regmirror_cluster_members";
pub const CLUSTER_FORWARDS: &str = "regmirror_cluster_forwards_total";
pub const CLUSTER_FALLBACKS: &str = "regmirror_cluster_fallbacks_total";
pub const UPSTREAM_SPARED: &str = "regmirror_upstream_spared_total";
pub const CLUSTER_FINAL: &str = "regmirror_cluster_final_answers_total";
pub const SOURCE_ANSWERS: &str = "regmirror_source_answers_total";

/// Repositories whose request counts are remembered for the status page; beyond this, new
/// repositories are not counted, so memory stays bounded whatever clients ask for.
const MAX_TRACKED_REPOSITORIES: usize = 10_000;

/// Every metric regmirror exports, plus the status page's in-memory facts.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    cache_requests: IntCounterVec,
    served_bytes: IntCounterVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_bytes: IntCounterVec,
    upstream_up: IntGaugeVec,
    token_fetches: IntCounterVec,
    ratelimit_remaining: IntGaugeVec,
    ratelimit_limit: IntGaugeVec,
    single_flight_joins: IntCounter,
    evictions: IntCounter,
    evicted_bytes: IntCounter,
    passthrough: IntCounter,
    sendfile_bytes: IntCounter,
    connections_evicted: IntCounter,
    pub downloads_in_flight: IntGauge,
    pub cache_size: IntGauge,
    pub cache_blobs: IntGauge,
    pub cache_limit: IntGauge,
    /// 1 when cache hits on plain HTTP/1 go out with sendfile (the self-test passed).
    pub sendfile_enabled: IntGauge,
    /// Not on the hit path's critical section for long: one map update per request.
    repositories: Mutex<HashMap<(String, String), RepositoryCounts>>,
    upstreams: Mutex<BTreeMap<String, UpstreamHealth>>,
    /// Stored blobs found not to hash to their digest (by the scrub or start-up verification).
    pub scrub_corrupt: IntCounter,
    /// Blobs and bytes hashed by the scrub and start-up verification.
    pub scrub_blobs: IntCounter,
    pub scrub_bytes: IntCounter,
    /// Finished scrub passes (start-up verification counts as one).
    pub scrub_passes: IntCounter,
    /// Files found without an index entry, not yet verified (and so not served).
    pub store_unverified: IntGauge,
    /// Cluster members by state (`healthy`, `unhealthy`) after the last membership pass.
    cluster_members: IntGaugeVec,
    /// Misses forwarded to their owner, and owners found unreachable (fetched locally), by
    /// peer. The peer label is a member address from the configuration or DNS, never from a
    /// client, and a member's series go when it leaves.
    cluster_forwards: IntCounterVec,
    cluster_fallbacks: IntCounterVec,
    /// Requests answered here instead of asking the upstream, by why (`rate_limited`: within a
    /// 429's Retry-After; `not_found`: the upstream said so within `cache.negative_ttl`).
    upstream_spared: IntCounterVec,
    /// A peer's authoritative answer about its upstream (404, 429, 401, 403) relayed as it is.
    cluster_final: IntCounterVec,
    /// What each source of the cache's chain answered (see `cache::chain`).
    source_answers: IntCounterVec,
    /// Its series for a blob hit, resolved once: the hit path takes no label lookup.
    hot_tier_found: IntCounter,
}

/// Requests served for one repository since start-up (status page only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepositoryCounts {
    /// Manifest and blob requests that got an answer.
    pub requests: u64,
    /// Of those, answered from the store (hit, revalidated or stale).
    pub from_cache: u64,
}

/// What the last exchanges with one upstream said about its health (status page only).
#[derive(Debug, Clone, Default)]
pub struct UpstreamHealth {
    /// `None` until the first exchange.
    pub state: Option<UpstreamState>,
    pub last_success: Option<SystemTime>,
    /// When and what; the text never holds a credential (upstream errors are built that way).
    pub last_error: Option<(SystemTime, String)>,
    /// The pull allowance left and the window's limit, from `ratelimit-*` headers.
    pub ratelimit_remaining: Option<u64>,
    pub ratelimit_limit: Option<u64>,
}

/// How the last exchange with an upstream went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// It answered (any status below 500 other than 429).
    Up,
    /// It answered 429.
    RateLimited,
    /// It answered a 5xx.
    Erroring,
    /// No answer: refused, reset, TLS failure or timeout.
    Unreachable,
}

impl UpstreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamState::Up => "up",
            UpstreamState::RateLimited => "rate limited",
            UpstreamState::Erroring => "erroring",
            UpstreamState::Unreachable => "unreachable",
        }
    }
}

/// The cache results counted as "served from the store" in hit ratios.
pub const FROM_CACHE: [Outcome; 3] = [Outcome::Hit, Outcome::Revalidated, Outcome::Stale];
const OUTCOMES: [Outcome; 4] = [
    Outcome::Hit,
    Outcome::Miss,
    Outcome::Stale,
    Outcome::Revalidated,
];
pub const CACHE_KINDS: [&str; 2] = ["manifest", "blob"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            metric: T,
        ) -> T {
            registry
                .register(Box::new(metric.clone()))
                .expect("metric names are unique");
            metric
        }
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let buckets = vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            reg(
                &registry,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                    .expect("valid metric"),
            )
        };
        gauge_vec(BUILD_INFO, "Build information.", &["version"])
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let source_answers = counter_vec(
            SOURCE_ANSWERS,
            "Answers of the cache's chain of content sources, by source (hot_tier, bucket, owner, upstream) and answer (found; absent: ask the next; final: the upstream's authoritative answer, relayed; unavailable: down or failed, the next is asked).",
            &["source", "answer"],
        );
        let hot_tier_found = source_answers.with_label_values(&["hot_tier", "found"]);
        let metrics = Metrics {
            http_requests: counter_vec(
                HTTP_REQUESTS,
                "HTTP requests by method, route and status.",
                &["method", "route", "status"],
            ),
            http_duration: histogram_vec(
                HTTP_DURATION,
                "Time to response headers, by route.",
                &["route"],
            ),
            cache_requests: counter_vec(
                CACHE_REQUESTS,
                "Cache lookups by kind (manifest, blob) and result (hit, miss, stale, revalidated).",
                &["kind", "result"],
            ),
            served_bytes: counter_vec(
                SERVED_BYTES,
                "Blob bytes sent to clients, by source (cache, upstream).",
                &["source"],
            ),
            upstream_requests: counter_vec(
                UPSTREAM_REQUESTS,
                "Requests to upstreams, by upstream and status class (2xx..5xx, or error when no response came).",
                &["upstream", "status"],
            ),
            upstream_duration: histogram_vec(
                UPSTREAM_DURATION,
                "Time to an upstream's response headers, by upstream.",
                &["upstream"],
            ),
            upstream_bytes: counter_vec(
                UPSTREAM_BYTES,
                "Blob bytes fetched from each upstream.",
                &["upstream"],
            ),
            upstream_up: gauge_vec(
                UPSTREAM_UP,
                "1 if the upstream's last answer was neither a 5xx, a 429 nor a transport failure.",
                &["upstream"],
            ),
            token_fetches: counter_vec(
                TOKEN_FETCHES,
                "Bearer token requests to upstream token realms, by upstream and result (ok, error).",
                &["upstream", "result"],
            ),
            ratelimit_remaining: gauge_vec(
                RATELIMIT_REMAINING,
                "Pulls left in the upstream's rate-limit window (its ratelimit-remaining header).",
                &["upstream"],
            ),
            ratelimit_limit: gauge_vec(
                RATELIMIT_LIMIT,
                "Pulls allowed per rate-limit window (the upstream's ratelimit-limit header).",
                &["upstream"],
            ),
            single_flight_joins: counter(
                SINGLE_FLIGHT_JOINS,
                "Requests that joined a blob download already under way.",
            ),
            evictions: counter(EVICTIONS, "Blobs evicted to keep the store under its limit."),
            evicted_bytes: counter(EVICTED_BYTES, "Bytes of blobs evicted."),
            passthrough: counter(
                PASSTHROUGH,
                "Blobs served straight from the upstream without caching because the disk was full.",
            ),
            connections_evicted: counter(
                CONNECTIONS_EVICTED,
                "Idle client connections closed to make room for new ones (connection limit or file descriptors reached).",
            ),
            sendfile_bytes: counter(
                SENDFILE_BYTES,
                "Cache-hit blob bytes sendfile(2) reported sent, straight from the page cache (plain HTTP/1 connections).",
            ),
            downloads_in_flight: gauge(DOWNLOADS_IN_FLIGHT, "Blob downloads under way."),
            cache_size: gauge(CACHE_SIZE, "Bytes of committed blobs."),
            cache_blobs: gauge(CACHE_BLOBS, "Number of committed blobs."),
            cache_limit: gauge(CACHE_LIMIT, "Configured storage.max_size (0 = unbounded)."),
            sendfile_enabled: gauge(
                SENDFILE_ENABLED,
                "1 when cache hits on plain HTTP/1 connections are sent with sendfile(2): server.sendfile is auto and the start-up self-test passed.",
            ),
            repositories: Mutex::new(HashMap::new()),
            upstreams: Mutex::new(BTreeMap::new()),
            scrub_corrupt: counter(
                SCRUB_CORRUPT,
                "Stored blobs that no longer hashed to their digest, removed to be fetched again.",
            ),
            scrub_blobs: counter(SCRUB_BLOBS, "Stored blobs re-hashed by the scrub."),
            scrub_bytes: counter(SCRUB_BYTES, "Bytes of stored blobs re-hashed by the scrub."),
            scrub_passes: counter(
                SCRUB_PASSES,
                "Finished passes over the store (the start-up verification is the first).",
            ),
            store_unverified: gauge(
                STORE_UNVERIFIED,
                "Files found without an index entry and not yet verified; they are not served.",
            ),
            cluster_members: gauge_vec(
                CLUSTER_MEMBERS,
                "Cluster members by state (healthy, unhealthy) after the last membership pass.",
                &["state"],
            ),
            cluster_forwards: counter_vec(
                CLUSTER_FORWARDS,
                "Misses forwarded to the member that owns them, by peer (member address).",
                &["peer"],
            ),
            cluster_fallbacks: counter_vec(
                CLUSTER_FALLBACKS,
                "Misses fetched locally because their owner did not answer, by peer (member address).",
                &["peer"],
            ),
            upstream_spared: counter_vec(
                UPSTREAM_SPARED,
                "Requests answered without asking the upstream, by upstream and reason (rate_limited: within a 429's Retry-After; not_found: a manifest the upstream said does not exist, within cache.negative_ttl).",
                &["upstream", "reason"],
            ),
            cluster_final: counter_vec(
                CLUSTER_FINAL,
                "Authoritative answers about the upstream (404, 429, 401, 403) an owner gave and this replica relayed instead of asking the upstream itself, by peer.",
                &["peer"],
            ),
            source_answers,
            hot_tier_found,
            registry,
        };
        // Series that exist from the start, so rates and dashboards see zeros, not gaps.
        for kind in CACHE_KINDS {
            for outcome in OUTCOMES {
                metrics
                    .cache_requests
                    .with_label_values(&[kind, outcome.as_str()]);
            }
        }
        for source in ["cache", "upstream"] {
            metrics.served_bytes.with_label_values(&[source]);
        }
        metrics
    }

    /// Creates an upstream's series at zero (called once per configured upstream).
    /// The registry, for metrics owned by a component that only some configurations have
    /// (the shared bucket's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn register_upstream(&self, upstream: &str) {
        self.upstream_bytes.with_label_values(&[upstream]);
        for reason in ["rate_limited", "not_found", "answered"] {
            self.upstream_spared.with_label_values(&[upstream, reason]);
        }
        for result in ["ok", "error"] {
            self.token_fetches.with_label_values(&[upstream, result]);
        }
        for class in ["2xx", "4xx", "5xx", "error"] {
            self.upstream_requests.with_label_values(&[upstream, class]);
        }
        self.upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(upstream.to_owned())
            .or_default();
    }

    pub fn http_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    pub fn cache_outcome(&self, kind: &str, outcome: Outcome) {
        self.cache_requests
            .with_label_values(&[kind, outcome.as_str()])
            .inc();
    }

    /// Count of cache lookups of `kind` with `outcome` since start-up.
    pub fn cache_outcome_count(&self, kind: &str, outcome: Outcome) -> u64 {
        self.cache_requests
            .with_label_values(&[kind, outcome.as_str()])
            .get()
    }

    pub fn served_bytes(&self, source: &str, bytes: u64) {
        self.served_bytes.with_label_values(&[source]).inc_by(bytes);
    }

    /// The counter sendfile(2)'s results are added to, for the connections' writers.
    pub fn sendfile_counter(&self) -> IntCounter {
        self.sendfile_bytes.clone()
    }

    /// The counter of idle connections the server closed to make room.
    pub fn connections_evicted_counter(&self) -> IntCounter {
        self.connections_evicted.clone()
    }

    /// Cache-hit bytes sendfile(2) reported sent since start-up.
    pub fn sendfile_bytes_total(&self) -> u64 {
        self.sendfile_bytes.get()
    }

    /// Blob bytes sent to clients from `source` (`cache` or `upstream`) since start-up.
    pub fn served_bytes_total(&self, source: &str) -> u64 {
        self.served_bytes.with_label_values(&[source]).get()
    }

    pub fn upstream_bytes(&self, upstream: &str, bytes: u64) {
        self.upstream_bytes
            .with_label_values(&[upstream])
            .inc_by(bytes);
    }

    /// One request answered here instead of asking `upstream`, for `reason`.
    pub fn upstream_spared(&self, upstream: &str, reason: &'static str) {
        self.upstream_spared
            .with_label_values(&[upstream, reason])
            .inc();
    }

    /// A peer's authoritative answer about the upstream was relayed.
    pub fn cluster_final(&self, peer: &str) {
        self.cluster_final.with_label_values(&[peer]).inc();
    }

    /// A blob served from the hot tier, the first source of the chain.
    pub fn hot_tier_found(&self) {
        self.hot_tier_found.inc();
    }

    /// One answer of a source of the cache's chain.
    pub fn source_answer(&self, source: &'static str, answer: &'static str) {
        self.source_answers
            .with_label_values(&[source, answer])
            .inc();
    }

    pub fn single_flight_join(&self) {
        self.single_flight_joins.inc();
    }

    /// `blobs` blobs of `bytes` bytes in all were evicted from the store.
    pub fn evicted(&self, blobs: u64, bytes: u64) {
        self.evictions.inc_by(blobs);
        self.evicted_bytes.inc_by(bytes);
    }

    /// One blob served from the upstream without caching (disk full).
    pub fn passthrough(&self) {
        self.passthrough.inc();
    }

    /// One request/response exchange with an upstream: `Ok` with the status and the rate limit
    /// it announced when it answered, `Err` with the failure's text when it did not. Times,
    /// counts and updates the upstream's health.
    pub fn upstream_exchange(
        &self,
        upstream: &str,
        result: Result<(StatusCode, RateLimit), &dyn std::fmt::Display>,
        elapsed: Duration,
    ) {
        let class = match &result {
            Ok((status, _)) => match status.as_u16() {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            Err(_) => "error",
        };
        self.upstream_requests
            .with_label_values(&[upstream, class])
            .inc();
        self.upstream_duration
            .with_label_values(&[upstream])
            .observe(elapsed.as_secs_f64());
        let now = SystemTime::now();
        let (state, error) = match &result {
            Ok((status, _)) if *status == StatusCode::TOO_MANY_REQUESTS => (
                UpstreamState::RateLimited,
                Some(format!("answered {status}")),
            ),
            Ok((status, _)) if status.is_server_error() => {
                (UpstreamState::Erroring, Some(format!("answered {status}")))
            }
            Ok(_) => (UpstreamState::Up, None),
            Err(error) => (UpstreamState::Unreachable, Some(error.to_string())),
        };
        let limits = match &result {
            Ok((_, limit)) => (limit.remaining, limit.limit),
            Err(_) => (None, None),
        };
        if let Some(remaining) = limits.0 {
            self.ratelimit_remaining
                .with_label_values(&[upstream])
                .set(remaining.min(i64::MAX as u64) as i64);
        }
        if let Some(limit) = limits.1 {
            self.ratelimit_limit
                .with_label_values(&[upstream])
                .set(limit.min(i64::MAX as u64) as i64);
        }
        self.upstream_up
            .with_label_values(&[upstream])
            .set(i64::from(state == UpstreamState::Up));
        let mut upstreams = self
            .upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let health = upstreams.entry(upstream.to_owned()).or_default();
        health.state = Some(state);
        match error {
            Some(error) => health.last_error = Some((now, error)),
            None => health.last_success = Some(now),
        }
        health.ratelimit_remaining = limits.0.or(health.ratelimit_remaining);
        health.ratelimit_limit = limits.1.or(health.ratelimit_limit);
    }

    /// One bearer-token request to an upstream's realm; a failure is remembered as its last
    /// error (the text must not hold a credential).
    pub fn token_fetch(&self, upstream: &str, error: Option<&dyn std::fmt::Display>) {
        let result = if error.is_some() { "error" } else { "ok" };
        self.token_fetches
            .with_label_values(&[upstream, result])
            .inc();
        if let Some(error) = error {
            let mut upstreams = self
                .upstreams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            upstreams.entry(upstream.to_owned()).or_default().last_error =
                Some((SystemTime::now(), format!("token: {error}")));
        }
    }

    /// Each upstream's health, by name.
    pub fn upstream_health(&self) -> BTreeMap<String, UpstreamHealth> {
        self.upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A manifest or blob request for a repository was answered with `outcome`.
    pub fn repository_request(&self, upstream: &str, repository: &str, outcome: Outcome) {
        let mut repositories = self
            .repositories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (upstream.to_owned(), repository.to_owned());
        if repositories.len() >= MAX_TRACKED_REPOSITORIES && !repositories.contains_key(&key) {
            return;
        }
        let counts = repositories.entry(key).or_default();
        counts.requests += 1;
        if FROM_CACHE.contains(&outcome) {
            counts.from_cache += 1;
        }
    }

    /// Request counts of one repository since start-up.
    pub fn repository_counts(&self, upstream: &str, repository: &str) -> RepositoryCounts {
        self.repositories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(upstream.to_owned(), repository.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// The cluster's member counts after a membership pass.
    pub fn cluster_members(&self, healthy: usize, unhealthy: usize) {
        for (state, count) in [("healthy", healthy), ("unhealthy", unhealthy)] {
            self.cluster_members
                .with_label_values(&[state])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Creates a cluster member's series at zero (`peer` is its address).
    pub fn cluster_peer_joined(&self, peer: &str) {
        self.cluster_forwards.with_label_values(&[peer]);
        self.cluster_fallbacks.with_label_values(&[peer]);
    }

    /// Drops a departed member's series, so addresses that churn (pods rescheduled behind a
    /// DNS name) do not accumulate.
    pub fn cluster_peer_left(&self, peer: &str) {
        let _ = self.cluster_forwards.remove_label_values(&[peer]);
        let _ = self.cluster_fallbacks.remove_label_values(&[peer]);
        let _ = self.cluster_final.remove_label_values(&[peer]);
    }

    /// One miss forwarded to its owner `peer`.
    pub fn cluster_forward(&self, peer: &str) {
        self.cluster_forwards.with_label_values(&[peer]).inc();
    }

    /// One miss fetched locally because its owner `peer` did not answer.
    pub fn cluster_fallback(&self, peer: &str) {
        self.cluster_fallbacks.with_label_values(&[peer]).inc();
    }

    /// Forwards to and fallbacks from `peer` since it joined: (forwards, fallbacks).
    pub fn cluster_peer_counts(&self, peer: &str) -> (u64, u64) {
        (
            self.cluster_forwards.with_label_values(&[peer]).get(),
            self.cluster_fallbacks.with_label_values(&[peer]).get(),
        )
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// An upstream's pull allowance as it announced it (Docker Hub's `ratelimit-*` headers, parsed
/// by `upstream`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Pulls left in the current window.
    pub remaining: Option<u64>,
    /// Pulls allowed per window.
    pub limit: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_exchanges_set_health_and_gauges() {
        let metrics = Metrics::new();
        metrics.register_upstream("docker.io");
        let limit = RateLimit {
            remaining: Some(76),
            limit: Some(100),
        };
        metrics.upstream_exchange(
            "docker.io",
            Ok((StatusCode::OK, limit)),
            Duration::from_millis(20),
        );
        let health = &metrics.upstream_health()["docker.io"];
        assert_eq!(health.state, Some(UpstreamState::Up));
        assert_eq!(health.ratelimit_remaining, Some(76));
        assert_eq!(health.ratelimit_limit, Some(100));
        let refused = "connection refused";
        metrics.upstream_exchange("docker.io", Err(&refused), Duration::from_millis(1));
        metrics.upstream_exchange(
            "docker.io",
            Ok((StatusCode::SERVICE_UNAVAILABLE, RateLimit::default())),
            Duration::from_millis(1),
        );
        let health = &metrics.upstream_health()["docker.io"];
        assert_eq!(health.state, Some(UpstreamState::Erroring));
        assert_eq!(health.ratelimit_remaining, Some(76), "kept from earlier");
        assert!(health.last_error.as_ref().unwrap().1.contains("503"));
        let text = metrics.render();
        for line in [
            "regmirror_upstream_ratelimit_remaining{upstream=\"docker.io\"} 76",
            "regmirror_upstream_ratelimit_limit{upstream=\"docker.io\"} 100",
            "regmirror_upstream_requests_total{status=\"2xx\",upstream=\"docker.io\"} 1",
            "regmirror_upstream_requests_total{status=\"5xx\",upstream=\"docker.io\"} 1",
            "regmirror_upstream_requests_total{status=\"error\",upstream=\"docker.io\"} 1",
            "regmirror_upstream_request_duration_seconds_count{upstream=\"docker.io\"} 3",
            "regmirror_upstream_up{upstream=\"docker.io\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn repository_counts_are_bounded() {
        let metrics = Metrics::new();
        metrics.repository_request("docker.io", "library/alpine", Outcome::Miss);
        metrics.repository_request("docker.io", "library/alpine", Outcome::Hit);
        metrics.repository_request("docker.io", "library/alpine", Outcome::Stale);
        assert_eq!(
            metrics.repository_counts("docker.io", "library/alpine"),
            RepositoryCounts {
                requests: 3,
                from_cache: 2
            }
        );
        for i in 0..MAX_TRACKED_REPOSITORIES + 10 {
            metrics.repository_request("docker.io", &format!("r/{i}"), Outcome::Hit);
        }
        assert_eq!(
            metrics.repositories.lock().unwrap().len(),
            MAX_TRACKED_REPOSITORIES
        );
        // Repositories never become label values.
        assert!(!metrics.render().contains("library/alpine"));
    }

    #[test]
    fn evictions_and_passthrough_are_counted() {
        let metrics = Metrics::new();
        metrics.evicted(1, 1000);
        metrics.evicted(1, 24);
        metrics.passthrough();
        let text = metrics.render();
        assert!(text.contains("regmirror_evictions_total 2\n"), "{text}");
        assert!(
            text.contains("regmirror_evicted_bytes_total 1024\n"),
            "{text}"
        );
        assert!(text.contains("regmirror_passthrough_total 1\n"), "{text}");
    }
}
