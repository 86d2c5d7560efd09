//! The status page at `GET /` (and `/status`): one small server-rendered HTML page for people,
//! no scripts. It shows whether the mirror pays off (cache fill against its limit, hit ratio,
//! bytes served from the cache, the busiest cached repositories) and whether each upstream is
//! healthy (state, last error, rate-limit allowance left).
//!
//! Every figure is also in an element with an `id` and its exact value in `data-value`, so
//! tests (and scrapers) read numbers without parsing the human formatting. It reads the cache
//! and [`Metrics`]; it changes nothing.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::cache::Outcome;
use crate::config::ByteSize;
use crate::metrics::{Metrics, RepositoryCounts, UpstreamHealth, CACHE_KINDS, FROM_CACHE};

/// Repositories listed on the page.
const TOP_REPOSITORIES: usize = 10;

/// `GET /`: the status page.
pub async fn page(State(state): State<AppState>) -> Response {
    let repositories = match state.cache.repositories().await {
        Ok(repositories) => repositories,
        Err(error) => {
            tracing::error!(%error, "status page: repository listing failed");
            Vec::new()
        }
    };
    let facts = Facts::gather(&state, repositories);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render(&facts, SystemTime::now()),
    )
        .into_response()
}

/// Everything the page shows, gathered first so rendering is a pure function (unit-tested).
struct Facts {
    version: &'static str,
    used_bytes: u64,
    limit_bytes: u64,
    blobs: u64,
    downloads_in_flight: usize,
    /// Per kind (`manifest`, `blob`): (served from cache, all lookups).
    lookups: Vec<(&'static str, u64, u64)>,
    bytes_from_cache: u64,
    bytes_from_upstream: u64,
    repositories_cached: usize,
    /// `(upstream/repository, counts)`, busiest first.
    top: Vec<(String, RepositoryCounts)>,
    upstreams: Vec<(String, UpstreamHealth)>,
    /// Whether this listener serves `/metrics` (not when `metrics.listen` moved it).
    metrics_here: bool,
    /// Pinned tags (`upstream/repository:tag`) with the image digest each names, sorted.
    pinned: Vec<(String, String)>,
    /// Cluster members, when this replica is in a cluster.
    members: Vec<crate::cluster::MemberStatus>,
    /// With a bucket: blob reads served from the local hot tier, and copied from the bucket.
    hot_tier: Option<(u64, u64)>,
}

impl Facts {
    fn gather(state: &AppState, repositories: Vec<(String, String)>) -> Facts {
        let metrics: &Metrics = &state.metrics;
        let cache = &state.cache;
        let lookups = CACHE_KINDS
            .iter()
            .map(|kind| {
                let from_cache: u64 = FROM_CACHE
                    .iter()
                    .map(|o| metrics.cache_outcome_count(kind, *o))
                    .sum();
                let all = from_cache + metrics.cache_outcome_count(kind, Outcome::Miss);
                (*kind, from_cache, all)
            })
            .collect();
        let repositories_cached = repositories.len();
        let mut top: Vec<(String, RepositoryCounts)> = repositories
            .into_iter()
            .map(|(upstream, repo)| {
                let counts = metrics.repository_counts(&upstream, &repo);
                (format!("{upstream}/{repo}"), counts)
            })
            .collect();
        top.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then_with(|| a.0.cmp(&b.0)));
        top.truncate(TOP_REPOSITORIES);
        Facts {
            version: env!("CARGO_PKG_VERSION"),
            used_bytes: cache.used_bytes(),
            limit_bytes: state.max_size,
            blobs: cache.blob_count(),
            downloads_in_flight: state.cache.downloads_in_flight(),
            lookups,
            bytes_from_cache: metrics.served_bytes_total("cache"),
            bytes_from_upstream: metrics.served_bytes_total("upstream"),
            repositories_cached,
            top,
            upstreams: metrics.upstream_health().into_iter().collect(),
            metrics_here: state.metrics_enabled,
            pinned: {
                let mut pinned: Vec<(String, String)> = cache
                    .pinned()
                    .into_iter()
                    .map(|(name, digest)| (name, digest.to_string()))
                    .collect();
                pinned.sort();
                pinned
            },
            members: cache.cluster().map(|c| c.members()).unwrap_or_default(),
            hot_tier: cache.hot_tier_counts(),
        }
    }
}

fn render(facts: &Facts, now: SystemTime) -> String {
    let mut html = String::with_capacity(8 * 1024);
    let (from_cache, lookups) = facts
        .lookups
        .iter()
        .fold((0, 0), |(c, a), (_, kc, ka)| (c + kc, a + ka));
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>regmirror status</title>
<style>{STYLE}</style></head>
<body><main>
<h1>regmirror <small>{version}</small></h1>
<section class="cards">
"#,
        version = escape(facts.version),
    );
    // Cache fill.
    let fill = if facts.limit_bytes > 0 {
        format!(
            r#"<div class="bar"><div style="width:{:.1}%"></div></div><p>of <span id="cache-limit" data-value="{}">{}</span> limit ({})</p>"#,
            (percent(facts.used_bytes, facts.limit_bytes)).min(100.0),
            facts.limit_bytes,
            ByteSize(facts.limit_bytes),
            format_percent(facts.used_bytes, facts.limit_bytes),
        )
    } else {
        r#"<p>no limit (<span id="cache-limit" data-value="0">unbounded</span>)</p>"#.to_owned()
    };
    card(
        &mut html,
        "Cache size",
        &format!(
            r#"<span id="cache-size" data-value="{}">{}</span>"#,
            facts.used_bytes,
            ByteSize(facts.used_bytes)
        ),
        &format!(
            r#"{fill}<p><span id="cache-blobs" data-value="{blobs}">{blobs}</span> blobs, <span id="downloads-in-flight" data-value="{dl}">{dl}</span> downloads in flight</p>"#,
            blobs = facts.blobs,
            dl = facts.downloads_in_flight,
        ),
    );
    // Hit ratio, overall and per kind.
    let mut detail = String::new();
    for (kind, kind_cached, kind_all) in &facts.lookups {
        let _ = write!(
            detail,
            r#"<p>{kind}s: <span id="{kind}-from-cache" data-value="{kind_cached}">{kind_cached}</span> of <span id="{kind}-lookups" data-value="{kind_all}">{kind_all}</span> from cache</p>"#,
        );
    }
    card(
        &mut html,
        "Hit ratio",
        &format!(
            r#"<span id="hit-ratio" data-value="{}">{}</span>"#,
            if lookups == 0 {
                "0".to_owned()
            } else {
                format!("{:.4}", from_cache as f64 / lookups as f64)
            },
            format_percent(from_cache, lookups),
        ),
        &format!(
            r#"<p><span id="lookups-from-cache" data-value="{from_cache}">{from_cache}</span> of <span id="lookups" data-value="{lookups}">{lookups}</span> lookups answered from the store (hit, revalidated or stale)</p>{detail}"#
        ),
    );
    card(
        &mut html,
        "Bytes saved",
        &format!(
            r#"<span id="bytes-saved" data-value="{}">{}</span>"#,
            facts.bytes_from_cache,
            ByteSize(facts.bytes_from_cache)
        ),
        &format!(
            r#"<p>blob bytes served from the cache instead of the upstream; <span id="bytes-from-upstream" data-value="{}">{}</span> came through from upstreams</p>"#,
            facts.bytes_from_upstream,
            ByteSize(facts.bytes_from_upstream)
        ),
    );
    html.push_str("</section>\n");

    // Upstreams.
    html.push_str(
        r#"<h2>Upstreams</h2>
<table id="upstreams"><thead><tr><th>Upstream</th><th>State</th><th>Last success</th><th>Last error</th><th>Rate limit left</th></tr></thead><tbody>
"#,
    );
    for (name, health) in &facts.upstreams {
        let state = health.state.map_or("unknown", |s| s.as_str());
        let class = match state {
            "up" => "ok",
            "unknown" => "idle",
            _ => "bad",
        };
        let last_success = health
            .last_success
            .map_or_else(|| "never".to_owned(), |t| ago(now, t));
        let last_error = match &health.last_error {
            Some((t, text)) => format!(
                r#"<span class="when">{}</span> {}"#,
                ago(now, *t),
                escape(text)
            ),
            None => "none".to_owned(),
        };
        let limit = match (health.ratelimit_remaining, health.ratelimit_limit) {
            (Some(left), Some(limit)) => format!("{left} of {limit}"),
            (Some(left), None) => left.to_string(),
            _ => "not reported".to_owned(),
        };
        let _ = writeln!(
            html,
            r#"<tr data-upstream="{name}"><td class="name">{name}</td><td class="state {class}" data-value="{state}">{state}</td><td class="success">{last_success}</td><td class="error">{last_error}</td><td class="ratelimit" data-value="{remaining}">{limit}</td></tr>"#,
            name = escape(name),
            remaining = health
                .ratelimit_remaining
                .map_or_else(String::new, |r| r.to_string()),
        );
    }
    html.push_str("</tbody></table>\n");

    // Cluster.
    if !facts.members.is_empty() {
        let healthy = facts.members.iter().filter(|m| m.healthy).count();
        let _ = write!(
            html,
            r#"<h2>Cluster <small><span id="members-healthy" data-value="{healthy}">{healthy}</span> of {n} members healthy</small></h2>
<table id="members"><thead><tr><th>Member</th><th>State</th><th>Last answer</th><th>Misses forwarded to it</th><th>Fetched here instead</th></tr></thead><tbody>
"#,
            n = facts.members.len(),
        );
        for member in &facts.members {
            let (state, class) = if member.healthy {
                ("healthy", "ok")
            } else {
                ("unhealthy", "bad")
            };
            let last = member
                .last_ok_secs_ago
                .map_or_else(|| "never".to_owned(), |s| format!("{s} s ago"));
            let _ = writeln!(
                html,
                r#"<tr data-member="{address}"><td class="name">{address}{this}</td><td class="state {class}" data-value="{state}">{state}</td><td>{last}</td><td class="forwards" data-value="{forwards}">{forwards}</td><td class="fallbacks" data-value="{fallbacks}">{fallbacks}</td></tr>"#,
                address = escape(&member.address),
                this = if member.is_self {
                    " <small>this replica</small>"
                } else {
                    ""
                },
                forwards = member.forwards,
                fallbacks = member.fallbacks,
            );
        }
        html.push_str("</tbody></table>\n");
    }
    if let Some((hits, fills)) = facts.hot_tier {
        let _ = writeln!(
            html,
            r#"<p id="hot-tier">Local hot tier: <span id="hot-tier-hits" data-value="{hits}">{hits}</span> blob reads served from this disk, <span id="hot-tier-fills" data-value="{fills}">{fills}</span> copied from the bucket first.</p>"#
        );
    }

    // Repositories.
    let _ = write!(
        html,
        r#"<h2>Top cached repositories <small><span id="repositories-cached" data-value="{n}">{n}</span> cached</small></h2>
<table id="repositories"><thead><tr><th>Repository</th><th>Requests since start</th><th>From cache</th></tr></thead><tbody>
"#,
        n = facts.repositories_cached,
    );
    if facts.top.is_empty() {
        html.push_str(r#"<tr><td colspan="3" class="idle">nothing cached yet</td></tr>"#);
    }
    for (name, counts) in &facts.top {
        let _ = writeln!(
            html,
            r#"<tr data-repository="{name}"><td class="name">{name}</td><td class="requests" data-value="{requests}">{requests}</td><td class="from-cache" data-value="{cached}">{cached}</td></tr>"#,
            name = escape(name),
            requests = counts.requests,
            cached = counts.from_cache,
        );
    }
    html.push_str("</tbody></table>\n");
    // Pinned images.
    if !facts.pinned.is_empty() {
        let _ = write!(
            html,
            r#"<h2>Pinned images <small><span id="pinned-count" data-value="{n}">{n}</span> pinned, never evicted</small></h2>
<table id="pinned"><thead><tr><th>Image</th><th>Digest</th></tr></thead><tbody>
"#,
            n = facts.pinned.len(),
        );
        for (name, digest) in &facts.pinned {
            let _ = writeln!(
                html,
                r#"<tr data-pinned="{name}"><td class="name">{name} <small>pinned</small></td><td class="digest">{digest}</td></tr>"#,
                name = escape(name),
                digest = escape(digest),
            );
        }
        html.push_str("</tbody></table>\n");
    }
    let _ = write!(
        html,
        r#"<footer>Counts are since the process started; sizes are live.{}</footer>
</main></body></html>
"#,
        if facts.metrics_here {
            r#" Prometheus metrics at <a href="/metrics">/metrics</a>."#
        } else {
            ""
        }
    );
    html
}

fn card(html: &mut String, title: &str, figure: &str, detail: &str) {
    let _ = writeln!(
        html,
        r#"<div class="card"><h2>{title}</h2><p class="figure">{figure}</p>{detail}</div>"#
    );
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn format_percent(part: u64, whole: u64) -> String {
    match percent(part, whole) {
        _ if whole == 0 => "–".to_owned(),
        // A large cache fills slowly: show that it is filling at all.
        p if p > 0.0 && p < 1.0 => format!("{p:.2}%"),
        p => format!("{p:.1}%"),
    }
}

/// "12s ago", "5m ago", "3h ago", "2d ago".
fn ago(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// HTML text and attribute escaping.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 16px}h1 small,h2 small{color:#6b7280;font-weight:400;font-size:14px}
h2{font-size:18px;margin:24px 0 8px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:16px}
.card{background:#fff;border-radius:8px;padding:16px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.card h2{margin:0;font-size:14px;color:#6b7280;text-transform:uppercase;letter-spacing:.04em}
.card p{margin:6px 0;font-size:14px}.card .figure{font-size:32px;font-weight:600;margin:8px 0}
.bar{height:10px;background:#e5e7eb;border-radius:5px;overflow:hidden}.bar div{height:100%;background:#2563eb}
table{width:100%;border-collapse:collapse;background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 3px rgba(0,0,0,.12);font-size:14px}
th,td{text-align:left;padding:8px 12px;border-bottom:1px solid #e5e7eb}th{background:#f9fafb;color:#374151}
td.name{font-family:ui-monospace,'DejaVu Sans Mono',monospace}
.ok{color:#047857;font-weight:600}.bad{color:#b91c1c;font-weight:600}.idle{color:#6b7280}
.when{color:#6b7280}footer{margin-top:24px;color:#6b7280;font-size:13px}
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::UpstreamState;

    fn facts() -> Facts {
        let now = SystemTime::now();
        Facts {
            version: "0.1.0",
            used_bytes: 3 << 20,
            limit_bytes: 12 << 20,
            blobs: 7,
            downloads_in_flight: 1,
            lookups: vec![("manifest", 3, 4), ("blob", 1, 4)],
            bytes_from_cache: 2048,
            bytes_from_upstream: 4096,
            repositories_cached: 2,
            pinned: vec![("docker.io/library/alpine:3.20".into(), "sha256:0123".into())],
            members: vec![crate::cluster::MemberStatus {
                address: "10.0.0.2:5001".into(),
                healthy: true,
                is_self: true,
                last_ok_secs_ago: Some(1),
                forwards: 3,
                fallbacks: 1,
            }],
            hot_tier: Some((7, 2)),
            top: vec![
                (
                    "docker.io/library/alpine".into(),
                    RepositoryCounts {
                        requests: 5,
                        from_cache: 4,
                    },
                ),
                ("ghcr.io/<evil>".into(), RepositoryCounts::default()),
            ],
            upstreams: vec![(
                "docker.io".into(),
                UpstreamHealth {
                    state: Some(UpstreamState::Erroring),
                    last_success: Some(now - Duration::from_secs(120)),
                    last_error: Some((now, "answered 503 <Service Unavailable>".into())),
                    ratelimit_remaining: Some(76),
                    ratelimit_limit: Some(100),
                },
            )],
            metrics_here: true,
        }
    }

    #[test]
    fn renders_figures_with_exact_values() {
        let html = render(&facts(), SystemTime::now());
        for want in [
            r#"id="cache-size" data-value="3145728">3.0 MiB<"#,
            r#"id="cache-limit" data-value="12582912">12.0 MiB<"#,
            "(25.0%)",
            r#"id="hit-ratio" data-value="0.5000">50.0%<"#,
            r#"id="lookups" data-value="8""#,
            r#"id="bytes-saved" data-value="2048">2.0 KiB<"#,
            r#"data-value="erroring">erroring<"#,
            "76 of 100",
            "2m ago",
            "answered 503 &lt;Service Unavailable&gt;",
            "ghcr.io/&lt;evil&gt;",
            r#"data-pinned="docker.io/library/alpine:3.20""#,
            r#"id="members-healthy" data-value="1">1<"#,
            r#"data-member="10.0.0.2:5001"><td class="name">10.0.0.2:5001 <small>this replica</small>"#,
            r#"class="forwards" data-value="3""#,
            r#"class="fallbacks" data-value="1""#,
            r#"id="hot-tier-hits" data-value="7""#,
        ] {
            assert!(html.contains(want), "missing {want:?} in\n{html}");
        }
        assert!(!html.contains("<script"), "no scripts on the page");
        assert!(html.contains(r#"href="/metrics""#));
        assert_eq!(format_percent(3, 10_000), "0.03%");
    }

    #[test]
    fn empty_store_and_no_limit() {
        let mut facts = facts();
        facts.limit_bytes = 0;
        facts.lookups = vec![("manifest", 0, 0), ("blob", 0, 0)];
        facts.top.clear();
        facts.metrics_here = false;
        let html = render(&facts, SystemTime::now());
        assert!(
            html.contains(r#"id="hit-ratio" data-value="0">–<"#),
            "{html}"
        );
        assert!(html.contains("unbounded"));
        assert!(html.contains("nothing cached yet"));
        assert!(
            !html.contains("/metrics"),
            "no link to a /metrics this port does not serve"
        );
    }

    #[test]
    fn ages() {
        let now = SystemTime::now();
        let cases = [
            (5, "5s ago"),
            (90, "1m ago"),
            (7200, "2h ago"),
            (200_000, "2d ago"),
        ];
        for (secs, want) in cases {
            assert_eq!(ago(now, now - Duration::from_secs(secs)), want);
        }
    }
}
