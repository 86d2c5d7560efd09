//! Registry authentication: `WWW-Authenticate` challenges, the bearer-token cache, and the
//! policy deciding which token realms may see an upstream's credentials.
//!
//! Tokens are cached per scope inside one upstream, so a token is never offered to an upstream
//! or a repository it was not issued for. Credentials go to a token realm only on the
//! upstream's own host or registrable domain, or on a host the configuration allows: a
//! hostile upstream cannot send them elsewhere by naming another realm.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::Url;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic`, lower-cased.
    pub scheme: String,
    /// Parameters with lower-cased names (`realm`, `service`, `scope`).
    pub params: HashMap<String, String>,
}

impl Challenge {
    /// Parses the first challenge of a header value such as
    /// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull"`.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty() {
            return None;
        }
        let mut params = HashMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if name.is_empty() {
                break;
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                // Quoted strings may contain commas (`scope="repository:a:pull,push"`) and
                // backslash escapes.
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(c) = chars.peek() {
                    if *c == ',' {
                        break;
                    }
                    value.push(*c);
                    chars.next();
                }
                value = value.trim().to_owned();
            }
            params.insert(name.trim().to_ascii_lowercase(), value);
        }
        Some(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// The JSON a token endpoint answers with.
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    /// Seconds; the spec's default is 60.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// The longest a token is trusted, whatever the realm says: `expires_in` is the realm's number
/// and `u64::MAX` seconds cannot be added to an `Instant`. A day is far beyond any registry's
/// tokens (Docker Hub's live 5 minutes); a token that dies earlier is renewed on its 401.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Scopes whose tokens are kept per upstream: one per repository pulled recently. Beyond it the
/// token expiring soonest goes, so a client walking many repositories cannot grow the cache.
pub const MAX_CACHED_TOKENS: usize = 1024;

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let seconds = self
            .expires_in
            .unwrap_or(60)
            .clamp(1, MAX_TOKEN_LIFETIME.as_secs());
        Some((token, Duration::from_secs(seconds)))
    }
}

/// Bearer tokens by scope, with their expiry; at most [`MAX_CACHED_TOKENS`].
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Lifetimes are measured with the process's clock (tests move it).
    clock: std::sync::Arc<crate::clock::Clock>,
}

impl TokenCache {
    pub fn with_clock(clock: std::sync::Arc<crate::clock::Clock>) -> TokenCache {
        TokenCache {
            tokens: Mutex::default(),
            clock,
        }
    }

    /// A token for `scope` that is still valid for a few seconds more.
    pub fn get(&self, scope: &str) -> Option<String> {
        let tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tokens
            .get(scope)
            .filter(|(_, expires)| *expires > self.clock.instant())
            .map(|(token, _)| token.clone())
    }

    pub fn put(&self, scope: &str, token: String, lifetime: Duration) {
        // Renew a little early so a token never expires between our check and the upstream's.
        let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let now = self.clock.instant();
        let Some(expires) = now.checked_add(lifetime.saturating_sub(margin)) else {
            return;
        };
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tokens.retain(|_, (_, e)| *e > now);
        while tokens.len() >= MAX_CACHED_TOKENS && !tokens.contains_key(scope) {
            let Some(soonest) = tokens
                .iter()
                .min_by_key(|(_, (_, e))| *e)
                .map(|(s, _)| s.clone())
            else {
                break;
            };
            tokens.remove(&soonest);
        }
        tokens.insert(scope.to_owned(), (token, expires));
    }

    /// Scopes held (for tests and the bound).
    pub fn held(&self) -> usize {
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn forget(&self, scope: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(scope);
    }
}

/// Which token realms may receive an upstream's credentials.
#[derive(Debug, Clone)]
pub struct RealmPolicy {
    host: String,
    /// The registrable domain (`docker.io` for `registry-1.docker.io`); none for IP addresses
    /// and hosts that are themselves public suffixes.
    domain: Option<String>,
    https: bool,
    /// `host` or `host:port` entries from `token_realms`, lower-cased.
    allowed: Vec<String>,
}

impl RealmPolicy {
    pub fn new(upstream: &Url, allowed: &[String]) -> RealmPolicy {
        let host = upstream.host_str().unwrap_or_default().to_ascii_lowercase();
        RealmPolicy {
            domain: registrable_domain(upstream),
            host,
            https: upstream.scheme() == "https",
            allowed: allowed.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether credentials may be sent to `realm`.
    pub fn allows(&self, realm: &Url) -> bool {
        let Some(host) = realm.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        // Credentials for an https upstream never travel in clear text.
        if self.https && realm.scheme() != "https" {
            return false;
        }
        let with_port = match realm.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        if host == self.host || self.allowed.iter().any(|a| *a == host || *a == with_port) {
            return true;
        }
        self.domain.is_some() && registrable_domain(realm) == self.domain
    }
}

/// The registrable domain of a URL's host by the public suffix list (`github.io` subdomains
/// belong to different owners); `None` for IP addresses.
fn registrable_domain(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let domain = host.trim_end_matches('.').to_ascii_lowercase();
    psl::domain_str(&domain).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::type_complexity)]
    fn parses_challenges() {
        let cases: &[(&str, Option<(&str, &[(&str, &str)])>)] = &[
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull""#,
                Some((
                    "bearer",
                    &[
                        ("realm", "https://auth.docker.io/token"),
                        ("service", "registry.docker.io"),
                        ("scope", "repository:library/x:pull"),
                    ],
                )),
            ),
            (
                r#"Bearer realm="https://t/x", scope="repository:a:pull,push""#,
                Some((
                    "bearer",
                    &[
                        ("realm", "https://t/x"),
                        ("scope", "repository:a:pull,push"),
                    ],
                )),
            ),
            (
                r#"Basic realm="Registry Realm""#,
                Some(("basic", &[("realm", "Registry Realm")])),
            ),
            (
                r#"bearer Realm=unquoted,service=s"#,
                Some(("bearer", &[("realm", "unquoted"), ("service", "s")])),
            ),
            (
                r#"Bearer realm="a\"b""#,
                Some(("bearer", &[("realm", "a\"b")])),
            ),
            ("Basic", Some(("basic", &[]))),
            ("", None),
        ];
        for (header, want) in cases {
            let got = Challenge::parse(header);
            match want {
                None => assert!(got.is_none(), "{header}"),
                Some((scheme, params)) => {
                    let got = got.unwrap_or_else(|| panic!("{header}"));
                    assert_eq!(got.scheme, *scheme, "{header}");
                    assert_eq!(got.params.len(), params.len(), "{header}: {:?}", got.params);
                    for (k, v) in *params {
                        assert_eq!(got.param(k), Some(*v), "{header}");
                    }
                }
            }
        }
    }

    #[test]
    fn realm_policy() {
        let cases: &[(&str, &[&str], &str, bool)] = &[
            (
                "https://registry-1.docker.io",
                &[],
                "https://auth.docker.io/token",
                true,
            ),
            ("https://ghcr.io", &[], "https://ghcr.io/token", true),
            ("https://ghcr.io", &[], "https://evil.example/token", false),
            ("https://ghcr.io", &[], "http://ghcr.io/token", false),
            (
                "http://registry.local:5000",
                &[],
                "http://registry.local:5001/auth",
                true,
            ),
            (
                "https://a.github.io",
                &[],
                "https://b.github.io/token",
                false,
            ),
            (
                "https://registry.corp.example.com",
                &[],
                "https://sso.example.com/token",
                true,
            ),
            (
                "https://r.example.com",
                &["auth.other.net"],
                "https://auth.other.net/t",
                true,
            ),
            (
                "https://r.example.com",
                &["auth.other.net:8443"],
                "https://auth.other.net/t",
                false,
            ),
            (
                "https://r.example.com",
                &["auth.other.net:8443"],
                "https://auth.other.net:8443/t",
                true,
            ),
            (
                "http://127.0.0.1:5000",
                &[],
                "http://127.0.0.1:6000/token",
                true,
            ),
            (
                "http://127.0.0.1:5000",
                &[],
                "http://127.0.0.2/token",
                false,
            ),
            (
                "http://127.0.0.1:5000",
                &[],
                "http://localhost/token",
                false,
            ),
            (
                "http://localhost:5000",
                &[],
                "http://other.localhost/token",
                false,
            ),
        ];
        for (upstream, allowed, realm, want) in cases {
            let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
            let policy = RealmPolicy::new(&Url::parse(upstream).unwrap(), &allowed);
            assert_eq!(
                policy.allows(&Url::parse(realm).unwrap()),
                *want,
                "{upstream} {allowed:?} {realm}"
            );
        }
    }

    #[test]
    fn token_lifetimes_are_clamped() {
        let cases = [
            (Some(u64::MAX), MAX_TOKEN_LIFETIME),
            (Some(0), Duration::from_secs(1)),
            (Some(300), Duration::from_secs(300)),
            (None, Duration::from_secs(60)),
        ];
        for (expires_in, want) in cases {
            let response = TokenResponse {
                token: Some("t".into()),
                access_token: None,
                expires_in,
            };
            assert_eq!(response.into_token().unwrap().1, want, "{expires_in:?}");
        }
        // Whatever reaches the cache, adding it to now cannot overflow.
        let cache = TokenCache::default();
        cache.put("s", "t".into(), Duration::MAX);
        assert_eq!(cache.get("s").as_deref(), Some("t"));
    }

    #[test]
    fn token_cache_is_bounded() {
        let cache = TokenCache::default();
        for i in 0..MAX_CACHED_TOKENS + 100 {
            cache.put(
                &format!("repository:r{i}:pull"),
                format!("t{i}"),
                Duration::from_secs(300 + i as u64),
            );
        }
        assert_eq!(cache.held(), MAX_CACHED_TOKENS);
        // The ones expiring soonest went; the newest stays.
        assert_eq!(cache.get("repository:r0:pull"), None);
        let last = MAX_CACHED_TOKENS + 99;
        assert_eq!(
            cache.get(&format!("repository:r{last}:pull")),
            Some(format!("t{last}"))
        );
    }

    #[test]
    fn tokens_expire_per_scope() {
        let cache = TokenCache::default();
        cache.put("repository:a:pull", "t1".into(), Duration::from_secs(300));
        cache.put("repository:b:pull", "t2".into(), Duration::ZERO);
        assert_eq!(cache.get("repository:a:pull").as_deref(), Some("t1"));
        assert_eq!(cache.get("repository:b:pull"), None, "expired");
        assert_eq!(cache.get("repository:c:pull"), None, "other scope");
    }
}
