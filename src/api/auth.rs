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

/// The users who may pull, reloaded when the htpasswd file changes.
pub struct AccessControl {
    path: PathBuf,
    challenge: String,
    users: RwLock<Arc<HashMap<String, String>>>,
    stamp: Mutex<Option<(Option<std::time::SystemTime>, u64)>>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
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
        })
    }

    /// Re-reads the file if it changed; a broken file keeps the users in force.
    pub fn reload_if_changed(&self) {
        let now = file_stamp(&self.path);
        if *self.stamp.lock().expect("htpasswd stamp lock") == now {
            return;
        }
        match read_htpasswd(&self.path) {
            Ok(users) => {
                tracing::info!(users = users.len(), file = %self.path.display(), "htpasswd reloaded");
                *self.users.write().expect("htpasswd lock") = Arc::new(users);
                // A removed user or changed password must not stay trusted.
                self.verified.lock().expect("verified lock").clear();
                *self.stamp.lock().expect("htpasswd stamp lock") = now;
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
    async fn allows(&self, authorization: Option<&str>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        {
            let verified = self.verified.lock().expect("verified lock");
            if verified
                .get(&key)
                .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
            {
                return true;
            }
        }
        let Some(hash) = self
            .users
            .read()
            .expect("htpasswd lock")
            .get(&user)
            .cloned()
        else {
            return false;
        };
        // bcrypt costs milliseconds of CPU on purpose: off the async threads.
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok {
            let mut verified = self.verified.lock().expect("verified lock");
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(key, Instant::now());
        }
        ok
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
    if access.allows(authorization).await {
        return next.run(request).await;
    }
    ApiError::new(ErrorCode::Unauthorized)
        .with_challenge(access.challenge.clone())
        .into_response()
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
}
