//! Registry authentication: `WWW-Authenticate` challenges and the bearer-token cache.
//!
//! Tokens are cached per scope inside one upstream, so a token is never offered to an upstream
//! or a repository it was not issued for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        Some((
            token,
            Duration::from_secs(self.expires_in.unwrap_or(60).max(1)),
        ))
    }
}

/// Bearer tokens by scope, with their expiry.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl TokenCache {
    /// A token for `scope` that is still valid for a few seconds more.
    pub fn get(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().expect("token cache lock");
        tokens
            .get(scope)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(token, _)| token.clone())
    }

    pub fn put(&self, scope: &str, token: String, lifetime: Duration) {
        // Renew a little early so a token never expires between our check and the upstream's.
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let expires = Instant::now() + lifetime - margin;
        let mut tokens = self.tokens.lock().expect("token cache lock");
        tokens.retain(|_, (_, e)| *e > Instant::now());
        tokens.insert(scope.to_owned(), (token, expires));
    }

    pub fn forget(&self, scope: &str) {
        self.tokens.lock().expect("token cache lock").remove(scope);
    }
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
    fn tokens_expire_per_scope() {
        let cache = TokenCache::default();
        cache.put("repository:a:pull", "t1".into(), Duration::from_secs(300));
        cache.put("repository:b:pull", "t2".into(), Duration::ZERO);
        assert_eq!(cache.get("repository:a:pull").as_deref(), Some("t1"));
        assert_eq!(cache.get("repository:b:pull"), None, "expired");
        assert_eq!(cache.get("repository:c:pull"), None, "other scope");
    }
}
