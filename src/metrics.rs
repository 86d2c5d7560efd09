//! Prometheus metrics: names as constants, one registry per process, low-cardinality labels
//! only (route kinds, outcomes, upstream names; never a repository or a digest).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::cache::Outcome;

pub const HTTP_REQUESTS: &str = "regmirror_http_requests_total";
pub const HTTP_DURATION: &str = "regmirror_http_request_duration_seconds";
pub const CACHE_REQUESTS: &str = "regmirror_cache_requests_total";
pub const SERVED_BYTES: &str = "regmirror_served_bytes_total";
pub const UPSTREAM_BYTES: &str = "regmirror_upstream_fetched_bytes_total";
pub const SINGLE_FLIGHT_JOINS: &str = "regmirror_single_flight_joins_total";
pub const DOWNLOADS_IN_FLIGHT: &str = "regmirror_downloads_in_flight";
pub const CACHE_SIZE: &str = "regmirror_cache_size_bytes";
pub const CACHE_BLOBS: &str = "regmirror_cache_blobs";
pub const CACHE_LIMIT: &str = "regmirror_cache_limit_bytes";

/// Every metric regmirror exports.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    cache_requests: IntCounterVec,
    served_bytes: IntCounterVec,
    upstream_bytes: IntCounterVec,
    single_flight_joins: IntCounter,
    pub downloads_in_flight: IntGauge,
    pub cache_size: IntGauge,
    pub cache_blobs: IntGauge,
    pub cache_limit: IntGauge,
    _info: IntGaugeVec,
}

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
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let metrics = Metrics {
            http_requests: counter_vec(HTTP_REQUESTS, "HTTP requests by method, route and status.", &["method", "route", "status"]),
            http_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(HTTP_DURATION, "Time to response headers, by route.")
                        .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            cache_requests: counter_vec(CACHE_REQUESTS, "Cache lookups by kind (manifest, blob) and result (hit, miss, stale, revalidated).", &["kind", "result"]),
            served_bytes: counter_vec(SERVED_BYTES, "Blob bytes sent to clients, by source (cache, upstream).", &["source"]),
            upstream_bytes: counter_vec(UPSTREAM_BYTES, "Blob bytes fetched from each upstream.", &["upstream"]),
            single_flight_joins: reg(&registry, IntCounter::new(SINGLE_FLIGHT_JOINS, "Requests that joined a blob download already under way.").expect("valid metric")),
            downloads_in_flight: gauge(DOWNLOADS_IN_FLIGHT, "Blob downloads under way."),
            cache_size: gauge(CACHE_SIZE, "Bytes of committed blobs."),
            cache_blobs: gauge(CACHE_BLOBS, "Number of committed blobs."),
            cache_limit: gauge(CACHE_LIMIT, "Configured storage.max_size (0 = unbounded)."),
            _info: {
                let info = reg(&registry, IntGaugeVec::new(Opts::new("regmirror_build_info", "Build information."), &["version"]).expect("valid metric"));
                info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
                info
            },
            registry,
        };
        for kind in ["manifest", "blob"] {
            for outcome in [
                Outcome::Hit,
                Outcome::Miss,
                Outcome::Stale,
                Outcome::Revalidated,
            ] {
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

    pub fn served_bytes(&self, source: &str, bytes: u64) {
        self.served_bytes.with_label_values(&[source]).inc_by(bytes);
    }

    pub fn upstream_bytes(&self, upstream: &str, bytes: u64) {
        self.upstream_bytes
            .with_label_values(&[upstream])
            .inc_by(bytes);
    }

    pub fn single_flight_join(&self) {
        self.single_flight_joins.inc();
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
