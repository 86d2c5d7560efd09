//! Access control for the mirror itself: HTTP Basic checked against an htpasswd file of bcrypt
//! hashes, so `docker login mirror:port` followed by `docker pull` works.
//!
//! Everything is guarded except `/healthz`, `/readyz` (probes carry no credentials) and
//! `/metrics` (scrapers rarely do either; its labels name no repository, and `metrics.listen`
//! can move it to an internal address). A refused request gets `401 UNAUTHORIZED` with a
//! `WWW-Authenticate: Basic` challenge. Passwords are never logged or kept: a successful check
//! is remembered by a SHA-256 of user and password for a few minutes, because clients send
//! Basic on every request and bcrypt is deliberately slow.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::AppState;
use crate::config::AuthConfig;
use crate::error::{ApiError, ErrorCode};

/// Paths open without credentials.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];
/// How long a verified user and password are trusted without running bcrypt again.
const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// How often the htpasswd file is checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on remembered verifications; the memory is cleared when it is reached.
const MAX_VERIFIED: usize = 4096;
/// Failed password checks one client address may make in a burst; then one more every
/// [`FAILURE_REFILL`]. bcrypt costs milliseconds of CPU on purpose, and a 2-core mirror must not
/// be kept busy guessing passwords.
const FAILURE_BURST: u32 = 10;
const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Bound on the addresses remembered; the oldest half is forgotten when it is reached.
const MAX_TRACKED_CLIENTS: usize = 16_384;

/// The users who may pull, reloaded when the htpasswd file changes.
pub struct AccessControl {
    path: PathBuf,
    challenge: String,
    users: RwLock<Arc<HashMap<String, String>>>,
    stamp: Mutex<Option<(Option<std::time::SystemTime>, u64)>>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    failures: Failures,
}

/// What a request's credentials get.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny,
    /// Too many failed checks from this address: retry after this many seconds.
    Throttled(u64),
}

/// Failed password checks per client address, as a leaky bucket: each failure adds one, one
/// drains every [`FAILURE_REFILL`], and a full bucket refuses checks without running bcrypt.
#[derive(Default)]
struct Failures(Mutex<HashMap<std::net::IpAddr, (f64, Instant)>>);

impl Failures {
    fn level(count: f64, since: Instant, now: Instant) -> f64 {
        let drained =
            now.saturating_duration_since(since).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        (count - drained).max(0.0)
    }

    /// `Some(seconds to wait)` when `addr` may not try another password now.
    fn throttled(&self, addr: std::net::IpAddr, now: Instant) -> Option<u64> {
        let failures = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let &(count, since) = failures.get(&addr)?;
        let level = Self::level(count, since, now);
        let full = f64::from(FAILURE_BURST);
        (level > full - 1.0).then(|| {
            let wait = (level - (full - 1.0)) * FAILURE_REFILL.as_secs_f64();
            (wait.ceil() as u64).max(1)
        })
    }

    fn failed(&self, addr: std::net::IpAddr, now: Instant) {
        let mut failures = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_CLIENTS && !failures.contains_key(&addr) {
            // Forget the addresses that have drained the most.
            let mut levels: Vec<_> = failures
                .iter()
                .map(|(a, &(count, since))| (Self::level(count, since, now), *a))
                .collect();
            levels.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (_, a) in levels.into_iter().take(MAX_TRACKED_CLIENTS / 2) {
                failures.remove(&a);
            }
        }
        let entry = failures.entry(addr).or_insert((0.0, now));
        let level = Self::level(entry.0, entry.1, now);
        *entry = (level + 1.0, now);
    }
}

impl AccessControl {
    /// Reads the htpasswd file; an unreadable file or a non-bcrypt entry is a start-up error.
    pub fn load(config: &AuthConfig) -> Result<AccessControl, String> {
        let users = read_htpasswd(&config.htpasswd).map_err(|e| format!("auth.htpasswd: {e}"))?;
        Ok(AccessControl {
            stamp: Mutex::new(file_stamp(&config.htpasswd)),
            path: config.htpasswd.clone(),
            challenge: format!("Basic realm=\"{}\"", config.realm),
            users: RwLock::new(Arc::new(users)),
            verified: Mutex::new(HashMap::new()),
            failures: Failures::default(),
        })
    }

    /// Re-reads the file if it changed; a broken file keeps the users in force.
    pub fn reload_if_changed(&self) {
        let now = file_stamp(&self.path);
        if *self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == now
        {
            return;
        }
        match read_htpasswd(&self.path) {
            Ok(users) => {
                tracing::info!(users = users.len(), file = %self.path.display(), "htpasswd reloaded");
                *self
                    .users
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(users);
                // A removed user or changed password must not stay trusted.
                self.verified
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
                *self
                    .stamp
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
            }
            Err(error) => {
                tracing::warn!(%error, "htpasswd changed but cannot be read; keeping the current users")
            }
        }
    }

    /// Checks the file for changes every few seconds until `stop` resolves.
    pub async fn reload_loop(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELOAD_INTERVAL) => {}
                () = &mut stop => return,
            }
            let access = self.clone();
            let _ = tokio::task::spawn_blocking(move || access.reload_if_changed()).await;
        }
    }

    /// Whether an `Authorization` header names a user with the right password.
    #[cfg(test)]
    async fn allows(&self, authorization: Option<&str>) -> bool {
        let addr = std::net::IpAddr::from([127, 0, 0, 1]);
        self.check(authorization, addr, Instant::now()).await == Verdict::Allow
    }

    /// Checks an `Authorization` header from a client at `addr`.
    async fn check(
        &self,
        authorization: Option<&str>,
        addr: std::net::IpAddr,
        now: Instant,
    ) -> Verdict {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            // No credentials is how every client starts (to get the challenge): not a failure.
            return Verdict::Deny;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        {
            let verified = self
                .verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if verified
                .get(&key)
                .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
            {
                return Verdict::Allow;
            }
        }
        if let Some(seconds) = self.failures.throttled(addr, now) {
            return Verdict::Throttled(seconds);
        }
        let Some(hash) = self
            .users
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&user)
            .cloned()
        else {
            self.failures.failed(addr, now);
            return Verdict::Deny;
        };
        // bcrypt costs milliseconds of CPU on purpose: off the async threads.
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !ok {
            self.failures.failed(addr, now);
            return Verdict::Deny;
        }
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(key, Instant::now());
        Verdict::Allow
    }
}

/// The middleware: passes open paths and authenticated requests, answers 401 otherwise.
pub async fn require(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(access) = &state.access else {
        return next.run(request).await;
    };
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Requests without a connection (`app().oneshot` in tests) share one unspecified address.
    let addr = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::server::Connection>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| {
            c.peer.ip().to_canonical()
        });
    match access.check(authorization, addr, Instant::now()).await {
        Verdict::Allow => next.run(request).await,
        Verdict::Deny => ApiError::new(ErrorCode::Unauthorized)
            .with_challenge(access.challenge.clone())
            .into_response(),
        // 429 rather than a delayed 401: it costs nothing to answer and holds no connection
        // open, and `docker login` shows it as such, where a 401 would read as a wrong
        // password.
        Verdict::Throttled(seconds) => ApiError::new(ErrorCode::TooManyRequests)
            .with_message(format!(
                "too many failed logins from this address; retry in {seconds} s"
            ))
            .with_retry_after(seconds)
            .into_response(),
    }
}

/// `Basic base64(user:password)` → (user, password).
fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn file_stamp(path: &Path) -> Option<(Option<std::time::SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len()))
}

/// `user:hash` lines; blank lines and `#` comments are skipped. Only bcrypt (`htpasswd -B`)
/// is accepted: the other htpasswd formats (MD5-crypt, SHA-1, crypt) are too weak to keep.
fn read_htpasswd(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let where_ = format!("{} line {}", path.display(), number + 1);
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("{where_}: not user:hash"))?;
        if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            // The hash itself is not echoed: it is secret-adjacent.
            return Err(format!(
                "{where_}: user {user:?} does not have a bcrypt hash (create it with htpasswd -B)"
            ));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    if users.is_empty() {
        return Err(format!("{}: no users", path.display()));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_headers() {
        let cases = [
            ("Basic dTpwOnc=", Some(("u", "p:w"))),
            ("basic   dTpw", Some(("u", "p"))),
            ("Bearer dTpw", None),
            ("Basic !!!", None),
            ("Basic bm9jb2xvbg==", None),
            ("Basic", None),
        ];
        for (header, want) in cases {
            let got = parse_basic(header);
            assert_eq!(
                got.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
                want,
                "{header}"
            );
        }
    }

    #[tokio::test]
    async fn htpasswd_users_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw1", 4).unwrap();
        std::fs::write(&path, format!("# users\nalice:{hash}\n")).unwrap();
        let access = AccessControl::load(&AuthConfig {
            htpasswd: path.clone(),
            realm: "regmirror".into(),
        })
        .unwrap();
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        assert!(access.allows(Some(&basic("alice", "pw1"))).await);
        assert!(access.allows(Some(&basic("alice", "pw1"))).await, "cached");
        assert!(!access.allows(Some(&basic("alice", "pw2"))).await);
        assert!(!access.allows(Some(&basic("bob", "pw1"))).await);
        assert!(!access.allows(None).await);

        // Bob replaces Alice: her remembered verification must not outlive the change.
        let hash = bcrypt::hash("pw2", 4).unwrap();
        std::fs::write(&path, format!("bob:{hash}\n# and a longer comment line\n")).unwrap();
        access.reload_if_changed();
        assert!(!access.allows(Some(&basic("alice", "pw1"))).await);
        assert!(access.allows(Some(&basic("bob", "pw2"))).await);

        std::fs::write(&path, "carol:$apr1$xyz$abc\n").unwrap();
        access.reload_if_changed();
        assert!(
            access.allows(Some(&basic("bob", "pw2"))).await,
            "broken file keeps users"
        );
        let err = read_htpasswd(&path).unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("carol") && !err.contains("apr1"),
            "{err}"
        );
    }

    #[test]
    fn failed_checks_are_throttled_per_address_and_drain() {
        let failures = Failures::default();
        let (a, b) = (
            std::net::IpAddr::from([10, 0, 0, 1]),
            std::net::IpAddr::from([10, 0, 0, 2]),
        );
        let t0 = Instant::now();
        for _ in 0..FAILURE_BURST - 1 {
            assert_eq!(failures.throttled(a, t0), None);
            failures.failed(a, t0);
        }
        assert_eq!(failures.throttled(a, t0), None, "the last of the burst");
        failures.failed(a, t0);
        let wait = failures
            .throttled(a, t0)
            .expect("throttled after the burst");
        assert_eq!(wait, FAILURE_REFILL.as_secs());
        assert_eq!(
            failures.throttled(b, t0),
            None,
            "other addresses are not affected"
        );
        assert_eq!(
            failures.throttled(a, t0 + FAILURE_REFILL),
            None,
            "drained by one"
        );
    }
}
