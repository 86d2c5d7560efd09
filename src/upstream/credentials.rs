//! Upstream credentials: where they come from (inline with `${ENV}` expansion, a password file,
//! a Docker `config.json` with `auths`, `credHelpers` or `credsStore`) and how they are held.
//!
//! A source that is configured but yields nothing (a missing file, an unset variable, a helper
//! that fails) is an error naming the upstream: regmirror never falls back to anonymous pulls
//! behind the operator's back. Secrets live in [`Secret`], whose `Debug` and `Display` never
//! print them. This module knows nothing of HTTP.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::config::{UpstreamConfig, DOCKER_HUB};

/// A password or token. It cannot be printed by accident: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for the one place that puts it in a request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What regmirror presents to an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and password: sent as HTTP Basic to the registry or its token realm.
    Basic { username: String, password: Secret },
    /// An OAuth2 refresh token (Docker's `identitytoken`, or a helper answering the user
    /// `<token>`): exchanged at the token realm with `grant_type=refresh_token`.
    IdentityToken(Secret),
}

impl Credentials {
    /// The `Authorization` header value for HTTP Basic, if these are a user and password.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", password.expose()))
            )),
            Credentials::IdentityToken(_) => None,
        }
    }
}

/// Where an upstream's credentials come from, parsed from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `username` with `password`, both `${ENV}`-expanded.
    Inline { username: String, password: String },
    /// `username` with the content of `password_file`.
    PasswordFile { username: String, path: PathBuf },
    /// The entry for one of `hosts` in a Docker `config.json`.
    DockerConfig { path: PathBuf, hosts: Vec<String> },
}

impl Source {
    /// The configured source, if any. The combinations were checked by config validation.
    pub fn from_config(name: &str, config: &UpstreamConfig) -> Option<Source> {
        if let Some(path) = &config.docker_config {
            return Some(Source::DockerConfig {
                path: path.clone(),
                hosts: docker_config_hosts(name, config),
            });
        }
        let username = config.username.clone()?;
        match (&config.password, &config.password_file) {
            (_, Some(path)) => Some(Source::PasswordFile {
                username,
                path: path.clone(),
            }),
            (Some(password), None) => Some(Source::Inline {
                username,
                password: password.clone(),
            }),
            (None, None) => None,
        }
    }

    /// Reads the credentials now. Blocking: it may read files and run a credential helper.
    pub fn resolve(&self) -> Result<Credentials, String> {
        match self {
            Source::Inline { username, password } => Ok(Credentials::Basic {
                username: expand_env(username).map_err(|e| format!("username: {e}"))?,
                password: Secret::new(expand_env(password).map_err(|e| format!("password: {e}"))?),
            }),
            Source::PasswordFile { username, path } => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("password_file {}: {e}", path.display()))?;
                // Secrets files usually end with a newline that is not part of the password.
                let password = text.trim_end_matches(['\n', '\r']).to_owned();
                if password.is_empty() {
                    return Err(format!("password_file {} is empty", path.display()));
                }
                Ok(Credentials::Basic {
                    username: expand_env(username).map_err(|e| format!("username: {e}"))?,
                    password: Secret::new(password),
                })
            }
            Source::DockerConfig { path, hosts } => {
                from_docker_config(path, hosts).map_err(|e| format!("docker_config {e}"))
            }
        }
    }
}

/// The keys Docker would file this upstream's credentials under: Docker Hub's
/// `https://index.docker.io/v1/` first, then the URL's host and port, the name and the aliases.
fn docker_config_hosts(name: &str, config: &UpstreamConfig) -> Vec<String> {
    let mut hosts = Vec::new();
    if name == DOCKER_HUB {
        hosts.push("index.docker.io".to_owned());
    }
    for url in config
        .url
        .iter()
        .filter_map(|u| reqwest::Url::parse(u).ok())
    {
        if let Some(host) = url.host_str() {
            hosts.push(match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            });
        }
    }
    hosts.extend(config.all_names(name).map(str::to_owned));
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.to_ascii_lowercase()));
    hosts
}

/// Credentials together with their source, re-read when the upstream refuses them (a rotated
/// password file, a helper handing out short-lived tokens).
pub struct Store {
    source: Source,
    current: Mutex<(Credentials, Instant)>,
}

/// Re-reading the source after a refusal happens at most this often, so a wrong password does
/// not run a credential helper on every request.
const REFRESH_INTERVAL: Duration = Duration::from_secs(30);

impl Store {
    /// Resolves the source once; failure is a start-up error.
    pub fn new(source: Source) -> Result<Store, String> {
        let credentials = source.resolve()?;
        Ok(Store {
            source,
            current: Mutex::new((credentials, Instant::now())),
        })
    }

    pub fn get(&self) -> Credentials {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// The upstream refused the credentials: read the source again if it is not too soon.
    /// Answers whether the credentials changed.
    pub async fn refresh(self: &std::sync::Arc<Self>, upstream: &str) -> bool {
        {
            let current = self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if current.1.elapsed() < REFRESH_INTERVAL {
                return false;
            }
        }
        let store = self.clone();
        let resolved = tokio::task::spawn_blocking(move || store.source.resolve())
            .await
            .unwrap_or_else(|_| Err("credential resolution panicked".to_owned()));
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.1 = Instant::now();
        match resolved {
            Ok(credentials) if credentials != current.0 => {
                tracing::info!(
                    upstream,
                    "credentials re-read after the upstream refused them"
                );
                current.0 = credentials;
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(upstream, %error, "cannot re-read credentials; keeping the old ones");
                false
            }
        }
    }
}

// Configuration values are expanded where they are read; the function lives with the
// configuration so that `config` depends on nothing above it.
pub use crate::config::expand_env;

/// The parts of a Docker `config.json` that hold credentials.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct DockerConfigFile {
    auths: BTreeMap<String, AuthEntry>,
    #[serde(rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Docker's key normalisation: `https://index.docker.io/v1/` and `index.docker.io` are one host.
fn key_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or("").to_ascii_lowercase()
}

/// Looks the upstream up as Docker does: a `credHelpers` entry for the host, else the
/// `credsStore`, else the `auths` entry.
fn from_docker_config(path: &Path, hosts: &[String]) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: DockerConfigFile = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a Docker config.json: {e}", path.display()))?;
    for host in hosts {
        let helper = file
            .cred_helpers
            .iter()
            .find(|(k, _)| key_host(k) == host.to_ascii_lowercase());
        if let Some((key, helper)) = helper {
            return run_helper(helper, key);
        }
    }
    if let Some(store) = &file.creds_store {
        // Docker Hub's credentials are stored under the legacy index URL.
        let key = match hosts.first() {
            Some(h) if h == "index.docker.io" => "https://index.docker.io/v1/".to_owned(),
            Some(h) => h.clone(),
            None => return Err(format!("{}: no host to look up", path.display())),
        };
        return run_helper(store, &key);
    }
    for host in hosts {
        let entry = file
            .auths
            .iter()
            .find(|(k, _)| key_host(k) == host.to_ascii_lowercase());
        if let Some((key, entry)) = entry {
            return auth_entry(entry).map_err(|e| format!("{}: auths.{key}: {e}", path.display()));
        }
    }
    Err(format!(
        "{}: no credentials for {} (looked for auths, credHelpers and credsStore)",
        path.display(),
        hosts.join(" or ")
    ))
}

fn auth_entry(entry: &AuthEntry) -> Result<Credentials, String> {
    if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Credentials::IdentityToken(Secret::new(token.to_owned())));
    }
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| "auth is not base64".to_owned())?;
        let decoded = String::from_utf8(decoded).map_err(|_| "auth is not UTF-8".to_owned())?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| "auth is not base64 of user:password".to_owned())?;
        return Ok(Credentials::Basic {
            username: username.to_owned(),
            password: Secret::new(password.to_owned()),
        });
    }
    match (&entry.username, &entry.password) {
        (Some(username), Some(password)) => Ok(Credentials::Basic {
            username: username.clone(),
            password: Secret::new(password.clone()),
        }),
        _ => Err("entry has no auth, username/password or identitytoken".to_owned()),
    }
}

/// How long a credential helper may take before it counts as failed.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `docker-credential-<helper> get` with the server URL on stdin, as Docker does.
fn run_helper(helper: &str, server: &str) -> Result<Credentials, String> {
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("credential helper name {helper:?} is invalid"));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input gives EPIPE; its exit status says more.
        let _ = stdin.write_all(server.as_bytes());
    }
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{program} get did not answer within {HELPER_TIMEOUT:?}"
                ));
            }
            Err(e) => return Err(format!("waiting for {program}: {e}")),
        }
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_end(&mut stderr);
    }
    if !status.success() {
        // Helpers print why on stdout ("credentials not found in native keychain"); that text
        // holds no secret, but keep it short.
        let why = String::from_utf8_lossy(if stdout.is_empty() { &stderr } else { &stdout })
            .trim()
            .chars()
            .take(200)
            .collect::<String>();
        return Err(format!(
            "{program} get for {server} failed ({status}): {why}"
        ));
    }
    #[derive(serde::Deserialize)]
    struct HelperAnswer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let answer: HelperAnswer = serde_json::from_slice(&stdout).map_err(|_| {
        format!("{program} get for {server} did not answer JSON with Username and Secret")
    })?;
    if answer.secret.is_empty() {
        return Err(format!(
            "{program} get for {server} answered an empty secret"
        ));
    }
    Ok(if answer.username == "<token>" {
        Credentials::IdentityToken(Secret::new(answer.secret))
    } else {
        Credentials::Basic {
            username: answer.username,
            password: Secret::new(answer.secret),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_environment_variables() {
        std::env::set_var("REGMIRROR_TEST_USER", "alice");
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("${REGMIRROR_TEST_USER}", Ok("alice")),
            ("x-${REGMIRROR_TEST_USER}-y", Ok("x-alice-y")),
            ("plain", Ok("plain")),
            ("cost $$5", Ok("cost $5")),
            ("a$b", Ok("a$b")),
            (
                "${REGMIRROR_TEST_UNSET_VAR}",
                Err("REGMIRROR_TEST_UNSET_VAR is not set"),
            ),
            ("${oops", Err("unterminated")),
            ("${a-b}", Err("not a variable name")),
        ];
        for (text, want) in cases {
            match (expand_env(text), want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{text}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{text}: {got}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let credentials = Credentials::Basic {
            username: "u".into(),
            password: Secret::new("hunter2".into()),
        };
        assert!(!format!("{credentials:?}").contains("hunter2"));
        assert_eq!(
            credentials.basic_header().as_deref(),
            Some("Basic dTpodW50ZXIy")
        );
    }

    #[test]
    fn docker_config_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
                    "registry.local:5000":{{"username":"u","password":"p"}},
                    "tok.example":{{"identitytoken":"refresh"}},
                    "broken.example":{{}}}}}}"#
            ),
        )
        .unwrap();
        let hub = from_docker_config(&path, &["index.docker.io".into()]).unwrap();
        assert_eq!(
            hub.basic_header(),
            Credentials::Basic {
                username: "bob".into(),
                password: Secret::new("s3cret".into())
            }
            .basic_header()
        );
        assert!(matches!(
            from_docker_config(&path, &["registry.local:5000".into()]).unwrap(),
            Credentials::Basic { username, .. } if username == "u"
        ));
        assert!(matches!(
            from_docker_config(&path, &["tok.example".into()]).unwrap(),
            Credentials::IdentityToken(_)
        ));
        let err = from_docker_config(&path, &["other.example".into()]).unwrap_err();
        assert!(err.contains("no credentials for other.example"), "{err}");
        let err = from_docker_config(&path, &["broken.example".into()]).unwrap_err();
        assert!(err.contains("auths.broken.example"), "{err}");
        let missing = dir.path().join("nope.json");
        assert!(from_docker_config(&missing, &["x".into()])
            .unwrap_err()
            .contains("nope.json"));
    }

    #[test]
    fn key_hosts_are_normalised() {
        assert_eq!(key_host("https://index.docker.io/v1/"), "index.docker.io");
        assert_eq!(key_host("Registry.Local:5000"), "registry.local:5000");
        assert_eq!(key_host("http://h/x"), "h");
    }
}
