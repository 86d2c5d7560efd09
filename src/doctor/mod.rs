//! `regmirror doctor`: does each client on this node really pull through the mirror?
//!
//! The static part reads the files each client reads (Docker's `daemon.json`, containerd's
//! `config.toml` and `hosts.toml` files, `buildkitd.toml`, containers' `registries.conf`),
//! under an optional `--root`, and gives one [`Finding`] per client and upstream: OK,
//! BYPASS (a configured client skips the mirror, with the exact fix) or WARN (works, with a
//! caveat), or ABSENT (nothing to check). The live part ([`probe`]) pulls an image with each
//! client it finds and asks the mirror which of those pulls it saw.
//!
//! It knows client configuration formats and the mirror's `/_regmirror/doctor/seen` answer;
//! it knows nothing of the server's internals, storage or upstream protocols. It never
//! changes a file: a fix is printed, for the operator to apply.

mod buildkit;
mod containerd;
mod containers;
mod docker;
pub mod probe;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Everything `doctor` needs to know, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// The mirror clients should use.
    pub mirror: Mirror,
    /// Every path below is read under this directory (`/` on a live node).
    pub root: PathBuf,
    /// Upstreams to check each client for (default: docker.io).
    pub upstreams: Vec<String>,
    /// Per-file overrides: taken as given, not under `root`.
    pub docker_config: Option<PathBuf>,
    pub containerd_config: Option<PathBuf>,
    pub buildkit_config: Option<PathBuf>,
    pub registries_conf: Option<PathBuf>,
    /// Live mode: the image each client pulls (`docker.io/library/alpine:3.20`).
    pub probe: Option<probe::ProbeOptions>,
    /// Machine-readable output.
    pub json: bool,
}

/// The mirror, as `--mirror http://host:port` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `http` or `https`.
    pub scheme: String,
    /// `host:port`, lower case, the port always written out.
    pub authority: String,
}

impl Mirror {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    pub fn is_http(&self) -> bool {
        self.scheme == "http"
    }

    /// Whether `url` (a URL or a bare `host[:port][/path]`) names this mirror's host and port.
    /// A bare name takes the port of this mirror's scheme when it has none.
    fn is(&self, url: &str) -> bool {
        parse_authority(url, &self.scheme)
            .is_some_and(|(_, authority, _)| authority == self.authority)
    }
}

impl std::str::FromStr for Mirror {
    type Err = Error;

    fn from_str(s: &str) -> Result<Mirror, Error> {
        let bad = || {
            Error::Usage(format!(
                "--mirror {s:?}: expected http://HOST:PORT or https://HOST:PORT"
            ))
        };
        let scheme = if s.starts_with("http://") {
            "http"
        } else if s.starts_with("https://") {
            "https"
        } else {
            return Err(bad());
        };
        let (scheme, authority, path) = parse_authority(s, scheme).ok_or_else(bad)?;
        if !path.trim_matches('/').is_empty() {
            return Err(Error::Usage(format!(
                "--mirror {s:?}: the mirror is a host and port; upstreams are chosen with --upstream"
            )));
        }
        Ok(Mirror { scheme, authority })
    }
}

/// Splits `[scheme://]host[:port][/path]` into (scheme, `host:port` lower case with the
/// default port of the scheme filled in, path). `default_scheme` applies to a bare name.
fn parse_authority(url: &str, default_scheme: &str) -> Option<(String, String, String)> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => (default_scheme.to_owned(), url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let has_port = match authority.rfind(':') {
        // `[::1]` has colons but no port.
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let authority = if has_port {
        authority
    } else {
        let port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        format!("{authority}:{port}")
    };
    Some((scheme, authority, path.to_owned()))
}

/// The clients `doctor` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    Docker,
    Containerd,
    Buildkit,
    /// containers/image: podman, buildah, skopeo, CRI-O.
    Containers,
}

impl Client {
    pub fn as_str(self) -> &'static str {
        match self {
            Client::Docker => "docker",
            Client::Containerd => "containerd",
            Client::Buildkit => "buildkit",
            Client::Containers => "containers",
        }
    }
}

/// What a finding means for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Goes through the mirror.
    Ok,
    /// Works through the mirror, with a caveat worth knowing.
    Warn,
    /// A configured client skips the mirror: the exit status is 1.
    Bypass,
    /// Not installed or not configured on this node: nothing to check.
    Absent,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Bypass => "BYPASS",
            Verdict::Absent => "ABSENT",
        }
    }
}

/// Each way a client can miss the mirror (or nearly), named so an operator can look it up
/// and a test can assert it. The message and fix of a [`Finding`] say the specifics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    /// A config file that does not parse: the client fails or ignores it.
    Unparsable,
    /// Docker: no `registry-mirrors` (or no daemon.json at all).
    DockerNoMirror,
    /// Docker: `registry-mirrors` names other mirrors only.
    DockerOtherMirror,
    /// Docker: `registry-mirrors` covers Docker Hub only (moby #52890).
    DockerHubOnly,
    /// containerd: no `config_path` for CRI, so no hosts.toml is read.
    ContainerdNoConfigPath,
    /// containerd 2.x: the transfer service has no `config_path` of its own
    /// (containerd #12415, #12636).
    ContainerdTransferNoConfigPath,
    /// containerd 2.x: the transfer service reads another directory than CRI.
    ContainerdTransferConfigPathDiffers,
    /// containerd: no `hosts.toml` for the upstream.
    ContainerdNoHostsToml,
    /// containerd: `hosts.toml` names no `[host]` that is the mirror.
    ContainerdHostNotMirror,
    /// containerd: the mirror's `[host]` has another scheme than the mirror serves.
    ContainerdSchemeMismatch,
    /// containerd: the mirror's `[host]` lacks `pull` or `resolve`.
    ContainerdCapabilities,
    /// containerd: a `[host]` URL with a path but no `override_path = true`.
    ContainerdPathWithoutOverride,
    /// containerd: a `ca` (or `client`) file named in hosts.toml does not exist.
    ContainerdCaMissing,
    /// containerd: a remote snapshotter (SOCI, stargz) that ignores hosts.toml.
    ContainerdSnapshotterIgnoresHosts,
    /// BuildKit: `[registry."<upstream>"] mirrors` lacks the mirror.
    BuildkitNoMirror,
    /// BuildKit: a plain-HTTP mirror without `http = true` in its own entry.
    BuildkitHttpMissing,
    /// BuildKit: a `ca` or `keypair` file that does not exist.
    BuildkitCertMissing,
    /// registries.conf: no `[[registry.mirror]]` for the upstream.
    ContainersNoMirror,
    /// registries.conf: mirrors, but none is this mirror.
    ContainersOtherMirror,
    /// registries.conf: the mirror location lacks the `/<upstream>` path prefix (or has
    /// another).
    ContainersPrefix,
    /// registries.conf: a plain-HTTP mirror without `insecure = true`.
    ContainersInsecureMissing,
    /// registries.conf: an upstream with a port cannot be a path prefix.
    ContainersPortInPrefix,
    /// Live: the client pulled (or tried) and the mirror saw nothing from it.
    ProbeNotSeen,
}

impl Problem {
    pub fn code(self) -> &'static str {
        match self {
            Problem::Unparsable => "unparsable",
            Problem::DockerNoMirror => "docker-no-mirror",
            Problem::DockerOtherMirror => "docker-other-mirror",
            Problem::DockerHubOnly => "docker-hub-only",
            Problem::ContainerdNoConfigPath => "containerd-no-config-path",
            Problem::ContainerdTransferNoConfigPath => "containerd-transfer-no-config-path",
            Problem::ContainerdTransferConfigPathDiffers => {
                "containerd-transfer-config-path-differs"
            }
            Problem::ContainerdNoHostsToml => "containerd-no-hosts-toml",
            Problem::ContainerdHostNotMirror => "containerd-host-not-mirror",
            Problem::ContainerdSchemeMismatch => "containerd-scheme-mismatch",
            Problem::ContainerdCapabilities => "containerd-capabilities",
            Problem::ContainerdPathWithoutOverride => "containerd-path-without-override",
            Problem::ContainerdCaMissing => "containerd-ca-missing",
            Problem::ContainerdSnapshotterIgnoresHosts => "containerd-snapshotter-ignores-hosts",
            Problem::BuildkitNoMirror => "buildkit-no-mirror",
            Problem::BuildkitHttpMissing => "buildkit-http-missing",
            Problem::BuildkitCertMissing => "buildkit-cert-missing",
            Problem::ContainersNoMirror => "containers-no-mirror",
            Problem::ContainersOtherMirror => "containers-other-mirror",
            Problem::ContainersPrefix => "containers-prefix",
            Problem::ContainersInsecureMissing => "containers-insecure-missing",
            Problem::ContainersPortInPrefix => "containers-port-in-prefix",
            Problem::ProbeNotSeen => "probe-not-seen",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One line of the report: a client, for one upstream (or for all), and what is wrong.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub client: Client,
    /// `None` when the finding is about the client as a whole (absent, a file that does
    /// not parse, a snapshotter).
    pub upstream: Option<String>,
    pub verdict: Verdict,
    pub problem: Option<Problem>,
    /// What doctor found, with the file it read.
    pub message: String,
    /// The exact change that makes it go through the mirror.
    pub fix: Option<String>,
    /// `static` for what the files say, `live` for what the probe saw.
    pub mode: &'static str,
}

impl Finding {
    fn ok(client: Client, upstream: &str, message: String) -> Finding {
        Finding {
            client,
            upstream: Some(upstream.to_owned()),
            verdict: Verdict::Ok,
            problem: None,
            message,
            fix: None,
            mode: "static",
        }
    }

    fn absent(client: Client, message: String) -> Finding {
        Finding {
            client,
            upstream: None,
            verdict: Verdict::Absent,
            problem: None,
            message,
            fix: None,
            mode: "static",
        }
    }

    fn problem(
        client: Client,
        upstream: Option<&str>,
        verdict: Verdict,
        problem: Problem,
        message: String,
        fix: Option<String>,
    ) -> Finding {
        Finding {
            client,
            upstream: upstream.map(str::to_owned),
            verdict,
            problem: Some(problem),
            message,
            fix,
            mode: "static",
        }
    }

    fn bypass(
        client: Client,
        upstream: &str,
        problem: Problem,
        message: String,
        fix: String,
    ) -> Finding {
        Finding::problem(
            client,
            Some(upstream),
            Verdict::Bypass,
            problem,
            message,
            Some(fix),
        )
    }
}

/// Why doctor could not give a verdict (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The live check could not ask the mirror.
    #[error("probe: {0}")]
    Probe(String),
    #[error("writing the report: {0}")]
    Output(std::io::Error),
}

/// The report: every finding, static then live.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mirror: String,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether a configured client bypasses the mirror.
    pub fn bypassed(&self) -> bool {
        self.findings.iter().any(|f| f.verdict == Verdict::Bypass)
    }

    /// The exit status: 0 when every configured client goes through the mirror, else 1.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.bypassed())
    }

    /// One line per finding, `fix:` lines under the ones that need one.
    pub fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "mirror {}", self.mirror)?;
        for f in &self.findings {
            let problem = f.problem.map_or(String::new(), |p| format!("[{p}] "));
            writeln!(
                out,
                "{:<10} {:<8} {:<16} {:<6} {problem}{}",
                f.client.as_str(),
                f.mode,
                f.upstream.as_deref().unwrap_or("-"),
                f.verdict.as_str(),
                f.message
            )?;
            if let Some(fix) = &f.fix {
                writeln!(out, "{:<43}fix: {fix}", "")?;
            }
        }
        let bypass = self
            .findings
            .iter()
            .filter(|f| f.verdict == Verdict::Bypass)
            .count();
        if bypass == 0 {
            writeln!(out, "every configured client goes through the mirror")
        } else {
            writeln!(
                out,
                "{bypass} finding(s) where a client bypasses the mirror"
            )
        }
    }
}

/// Reads a file under the doctor's root: `Ok(None)` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Where the doctor reads the node's files: `/etc/x` becomes `<root>/etc/x`.
#[derive(Debug, Clone)]
struct Root(PathBuf);

impl Root {
    fn join(&self, absolute: &str) -> PathBuf {
        self.0.join(absolute.trim_start_matches('/'))
    }

    /// Whether one of the named programs is installed (in the usual binary directories).
    fn has_binary(&self, names: &[&str]) -> bool {
        ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin"]
            .iter()
            .any(|dir| {
                names
                    .iter()
                    .any(|n| self.join(&format!("{dir}/{n}")).exists())
            })
    }
}

/// Runs the static checks and, with a probe, the live ones; writes the report to `out`.
/// Answers the exit status (0 or 1); an error is exit status 2.
pub async fn run(options: Options, out: &mut (dyn Write + Send)) -> Result<u8, Error> {
    let mut report = check(&options)?;
    if let Some(probe) = &options.probe {
        let hosts_dir = containerd::hosts_dir(&options)?;
        let registries = containers::registries_conf_for_probe(&options);
        let live = probe::run(&options.mirror, probe, hosts_dir, registries).await?;
        report.findings.extend(live);
    }
    if options.json {
        serde_json::to_writer_pretty(&mut *out, &report)
            .map_err(|err| Error::Output(err.into()))?;
        writeln!(out).map_err(Error::Output)?;
    } else {
        report.write_text(out).map_err(Error::Output)?;
    }
    Ok(report.exit_code())
}

/// The static checks: what each client's files say.
pub fn check(options: &Options) -> Result<Report, Error> {
    if options.upstreams.is_empty() {
        return Err(Error::Usage("no upstream to check".to_owned()));
    }
    let mut findings = Vec::new();
    findings.extend(docker::check(options)?);
    findings.extend(containerd::check(options)?);
    findings.extend(buildkit::check(options)?);
    findings.extend(containers::check(options)?);
    Ok(Report {
        mirror: options.mirror.url(),
        findings,
    })
}

/// The TOML value at a dotted path of table keys (each key taken whole: keys may contain
/// dots, like `plugins."io.containerd.grpc.v1.cri"`).
fn toml_at<'a>(table: &'a toml::Table, keys: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = keys.split_first()?;
    let value = table.get(*first)?;
    if rest.is_empty() {
        Some(value)
    } else {
        toml_at(value.as_table()?, rest)
    }
}

/// A TOML value that may be one string or an array of strings.
fn toml_strings(value: Option<&toml::Value>) -> Vec<String> {
    match value {
        Some(toml::Value::String(s)) => vec![s.clone()],
        Some(toml::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses TOML, or the finding that says the client cannot read its file.
fn parse_toml(client: Client, path: &Path, text: &str) -> Result<toml::Table, Finding> {
    text.parse::<toml::Table>().map_err(|err| {
        Finding::problem(
            client,
            None,
            Verdict::Bypass,
            Problem::Unparsable,
            format!(
                "{} is not valid TOML: {}",
                path.display(),
                one_line(&err.to_string())
            ),
            Some(format!("fix the syntax of {}", path.display())),
        )
    })
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_urls() {
        let cases = [
            ("http://127.0.0.1:5000", Some(("http", "127.0.0.1:5000"))),
            (
                "https://Mirror.Example",
                Some(("https", "mirror.example:443")),
            ),
            (
                "http://mirror.example/",
                Some(("http", "mirror.example:80")),
            ),
            ("http://[::1]:5000", Some(("http", "[::1]:5000"))),
            ("mirror.example:5000", None),
            ("ftp://mirror.example", None),
            ("http://mirror.example:5000/docker.io", None),
            ("http://user@mirror.example", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<Mirror>().ok();
            let got = got
                .as_ref()
                .map(|m| (m.scheme.as_str(), m.authority.as_str()));
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn mirror_matches_urls_and_bare_names() {
        let mirror: Mirror = "http://mirror.example:5000".parse().unwrap();
        let cases = [
            ("http://mirror.example:5000", true),
            ("https://mirror.example:5000", true),
            ("mirror.example:5000", true),
            ("mirror.example:5000/docker.io", true),
            ("MIRROR.example:5000", true),
            ("mirror.example", false),
            ("mirror.example:5001", false),
            ("other.example:5000", false),
        ];
        for (url, want) in cases {
            assert_eq!(mirror.is(url), want, "{url}");
        }
        let plain: Mirror = "http://mirror.example".parse().unwrap();
        assert!(plain.is("mirror.example"));
        assert!(plain.is("mirror.example:80"));
    }

    #[test]
    fn exit_code_counts_only_bypass() {
        let finding = |verdict| Finding {
            client: Client::Docker,
            upstream: None,
            verdict,
            problem: None,
            message: String::new(),
            fix: None,
            mode: "static",
        };
        let report = |verdicts: &[Verdict]| Report {
            mirror: String::new(),
            findings: verdicts.iter().map(|v| finding(*v)).collect(),
        };
        assert_eq!(
            report(&[Verdict::Ok, Verdict::Warn, Verdict::Absent]).exit_code(),
            0
        );
        assert_eq!(report(&[Verdict::Ok, Verdict::Bypass]).exit_code(), 1);
    }
}

/// Shared by the client modules' tests.
#[cfg(test)]
mod tests_support {
    use super::*;

    /// Options for `mirror.example:5000` (plain HTTP) under a fresh root.
    pub fn options_in(upstreams: &[&str]) -> (tempfile::TempDir, Options) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            mirror: "http://mirror.example:5000".parse().unwrap(),
            root: dir.path().to_owned(),
            upstreams: upstreams.iter().map(|u| u.to_string()).collect(),
            docker_config: None,
            containerd_config: None,
            buildkit_config: None,
            registries_conf: None,
            probe: None,
            json: false,
        };
        (dir, options)
    }

    /// Each finding as its problem's code, or `ok` / `absent`.
    pub fn codes(findings: &[Finding]) -> Vec<&'static str> {
        findings
            .iter()
            .map(|f| match (f.problem, f.verdict) {
                (Some(p), _) => p.code(),
                (None, Verdict::Absent) => "absent",
                (None, _) => "ok",
            })
            .collect()
    }

    /// Writes `text` to `<root>/<path>`, creating directories.
    pub fn write(root: &Path, path: &str, text: &str) {
        let file = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
}
