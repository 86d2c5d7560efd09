//! The short record of recent requests that `regmirror doctor` asks about:
//! `GET /_regmirror/doctor/seen?since=N`.
//!
//! The access log notes every request here (time, peer address, method, path, `ns`, user
//! agent, status; never a header that could carry a credential, and every field capped).
//! An answer holds only the requests that came from the asking connection's own address,
//! so a host learns what its own clients did and nothing about anyone else's. The record is
//! a bounded ring behind a plain mutex held for a push or a copy, never across an await.
//!
//! Nothing is recorded until someone asks: a question arms the record for [`WATCH`], so
//! ordinary requests cost one clock read and doctor's first question (before its probe pulls)
//! starts the record its later questions read.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::server::Connection;

/// The path of the endpoint; requests to it are not themselves recorded.
pub const PATH: &str = "/_regmirror/doctor/seen";
/// How many requests the ring holds.
const CAPACITY: usize = 1024;
/// Longest kept path or user agent; longer ones are cut (on a character boundary).
const MAX_FIELD: usize = 256;
/// How long a question keeps the record on: longer than doctor's probe pulls take.
pub const WATCH: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// One request, as an answer shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SeenRequest {
    /// Position in the record: ask `since` the `next` of an earlier answer.
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub method: String,
    pub path: String,
    pub ns: Option<String>,
    pub user_agent: String,
    pub status: u16,
    #[serde(skip)]
    peer: Option<IpAddr>,
}

#[derive(Default)]
struct Ring {
    next: u64,
    requests: VecDeque<SeenRequest>,
}

/// The record, shared by the access log and the endpoint.
#[derive(Default)]
pub struct SeenLog {
    ring: Mutex<Ring>,
    /// Unix seconds until which requests are recorded (0: never asked).
    watch_until: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SeenLog {
    /// Whether requests are being recorded (someone asked within [`WATCH`]).
    pub fn watching(&self) -> bool {
        now_secs() < self.watch_until.load(Ordering::Relaxed)
    }

    /// Records requests from now until [`WATCH`] from now.
    pub fn watch(&self) {
        self.watch_until.fetch_max(
            now_secs().saturating_add(WATCH.as_secs()),
            Ordering::Relaxed,
        );
    }

    /// Notes one request. `query` is only searched for `ns`; nothing else of it is kept.
    pub fn record(
        &self,
        peer: Option<IpAddr>,
        method: &str,
        path: &str,
        query: Option<&str>,
        user_agent: &str,
        status: u16,
    ) {
        if path == PATH || !self.watching() {
            return;
        }
        let ns = query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| cap(&v))
        });
        let time = now_secs();
        let entry = SeenRequest {
            seq: 0,
            time,
            method: cap(method),
            path: cap(path),
            ns,
            user_agent: cap(user_agent),
            status,
            peer: peer.map(|ip| ip.to_canonical()),
        };
        let mut ring = self
            .ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let seq = ring.next;
        ring.next = seq.saturating_add(1);
        if ring.requests.len() == CAPACITY {
            ring.requests.pop_front();
        }
        ring.requests.push_back(SeenRequest { seq, ..entry });
    }

    /// The requests from `peer` from `since` on, and where the next question starts.
    pub fn since(&self, peer: Option<IpAddr>, since: u64) -> (u64, Vec<SeenRequest>) {
        let peer = peer.map(|ip| ip.to_canonical());
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let requests = ring
            .requests
            .iter()
            .filter(|r| r.seq >= since && r.peer == peer)
            .cloned()
            .collect();
        (ring.next, requests)
    }
}

fn cap(text: &str) -> String {
    match text.char_indices().nth(MAX_FIELD) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

#[derive(Deserialize)]
pub struct SinceQuery {
    #[serde(default)]
    since: u64,
}

#[derive(Serialize)]
struct Answer {
    next: u64,
    requests: Vec<SeenRequest>,
}

/// `GET /_regmirror/doctor/seen?since=N`: what this address asked since `N`, as JSON.
pub async fn handler(
    State(state): State<AppState>,
    Query(query): Query<SinceQuery>,
    request: Request,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<Connection>>()
        .map(|c| c.peer.ip());
    state.seen.watch();
    let (next, requests) = state.seen.since(peer, query.since);
    let body = serde_json::to_string(&Answer { next, requests }).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_the_askers_requests_within_bounds() {
        let log = SeenLog::default();
        log.record(None, "GET", "/v2/", None, "before anyone asked", 200);
        assert_eq!(log.since(None, 0).0, 0, "not recorded before anyone asked");
        log.watch();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a_mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        log.record(Some(a), "GET", "/v2/", None, "docker/20.10", 200);
        log.record(
            Some(b),
            "GET",
            "/v2/x/manifests/1",
            Some("ns=ghcr.io&n=1"),
            "containerd/1.6",
            200,
        );
        log.record(
            Some(a),
            "GET",
            PATH,
            Some("since=0"),
            "regmirror-doctor",
            200,
        );
        let long = "u".repeat(5000);
        log.record(
            Some(a_mapped),
            "HEAD",
            &long,
            Some("ns=docker.io"),
            &long,
            404,
        );

        let (next, seen) = log.since(Some(a), 0);
        assert_eq!(next, 3, "the doctor's own question is not recorded");
        let paths: Vec<usize> = seen.iter().map(|r| r.path.len()).collect();
        assert_eq!(paths, [4, MAX_FIELD]);
        assert_eq!(seen[1].user_agent.len(), MAX_FIELD);
        assert_eq!(seen[1].ns.as_deref(), Some("docker.io"));
        assert_eq!(log.since(Some(a), 2).1.len(), 1);
        assert_eq!(log.since(Some(a), u64::MAX).1.len(), 0);
        let (_, theirs) = log.since(Some(b), 0);
        assert_eq!(theirs.len(), 1);
        assert_eq!(theirs[0].ns.as_deref(), Some("ghcr.io"));
        assert!(log.since(None, 0).1.is_empty());

        for _ in 0..CAPACITY + 10 {
            log.record(Some(a), "GET", "/v2/", None, "x", 200);
        }
        let (next, seen) = log.since(Some(a), 0);
        assert_eq!(seen.len(), CAPACITY);
        assert_eq!(next, 3 + CAPACITY as u64 + 10);
    }
}
