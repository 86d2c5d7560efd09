//! The live check: pull an image with each client found on this node and ask the mirror
//! which of those pulls it saw.
//!
//! The mirror keeps a short record of recent requests and answers
//! `GET /_regmirror/doctor/seen?since=N` with the ones that came from the asking address
//! only. Probes run one client at a time, so a request the mirror saw between the two
//! questions around a pull, with that client's user agent, is that client's. A client
//! whose pull the mirror did not see bypasses it, whether its pull then succeeded from the
//! upstream or failed.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

use super::{Client, Error, Finding, Mirror, Problem, Verdict};

/// How the live check finds and runs the clients.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// A fully qualified reference, e.g. `docker.io/library/alpine:3.20`.
    pub image: String,
    /// Deadline of each probe pull.
    pub timeout: Duration,
    /// The docker daemon (`unix:///var/run/docker.sock`).
    pub docker_host: String,
    /// containerd's gRPC socket (`/run/containerd/containerd.sock`).
    pub containerd_address: PathBuf,
    /// Arguments put before `pull` on podman's command line (`--root DIR`, …).
    pub podman_args: Vec<String>,
    /// PEM CA certificates for an https mirror.
    pub ca: Option<PathBuf>,
}

/// The mirror's answer to `/_regmirror/doctor/seen`.
#[derive(Debug, Deserialize)]
struct Seen {
    next: u64,
    requests: Vec<SeenRequest>,
}

#[derive(Debug, Deserialize)]
struct SeenRequest {
    method: String,
    path: String,
    #[serde(default)]
    user_agent: String,
}

/// Answers whose body is longer are refused: the record is bounded on the server side too.
const MAX_SEEN_BODY: usize = 4 << 20;

/// A client found on this node and the command that pulls the probe image with it.
struct Probe {
    client: Client,
    program: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, PathBuf)>,
    /// How this client's requests announce themselves.
    agents: &'static [&'static str],
}

/// Runs a probe pull with each client that is present; one live finding per client.
pub async fn run(
    mirror: &Mirror,
    options: &ProbeOptions,
    hosts_dir: Option<PathBuf>,
    registries_conf: Option<PathBuf>,
) -> Result<Vec<Finding>, Error> {
    let http = http_client(options)?;
    let seen_url = format!("{}/_regmirror/doctor/seen", mirror.url());
    let mut findings = Vec::new();
    for probe in probes(options, hosts_dir, registries_conf) {
        let probe = match probe {
            Ok(probe) => probe,
            Err(finding) => {
                findings.push(finding);
                continue;
            }
        };
        let mark = seen(&http, &seen_url, u64::MAX).await?.next;
        let outcome = pull(&probe, options.timeout).await;
        let after = seen(&http, &seen_url, mark).await?;
        let mine: Vec<&SeenRequest> = after
            .requests
            .iter()
            .filter(|r| probe.agents.iter().any(|a| r.user_agent.contains(a)))
            .collect();
        let pulled = match &outcome {
            Ok(()) => "pulled".to_owned(),
            Err(why) => format!("pull failed ({why})"),
        };
        let command = format!("{} {}", probe.program, probe.args.join(" "));
        let finding = if let Some(first) = mine.first() {
            Finding {
                client: probe.client,
                upstream: None,
                verdict: Verdict::Ok,
                problem: None,
                message: format!(
                    "`{command}`: {pulled}; the mirror saw {} request(s) from it, first {} {}",
                    mine.len(),
                    first.method,
                    first.path
                ),
                fix: None,
                mode: "live",
            }
        } else {
            Finding {
                client: probe.client,
                upstream: None,
                verdict: Verdict::Bypass,
                problem: Some(Problem::ProbeNotSeen),
                message: format!(
                    "`{command}`: {pulled}; the mirror saw no request from it: it went around the mirror"
                ),
                fix: Some(format!(
                    "apply the static fixes for {} above, restart it, and run doctor again",
                    probe.client.as_str()
                )),
                mode: "live",
            }
        };
        findings.push(finding);
    }
    Ok(findings)
}

/// The probes for the clients present; a client that is not is an ABSENT finding.
fn probes(
    options: &ProbeOptions,
    hosts_dir: Option<PathBuf>,
    registries_conf: Option<PathBuf>,
) -> Vec<Result<Probe, Finding>> {
    let absent = |client, message: String| Finding {
        client,
        upstream: None,
        verdict: Verdict::Absent,
        problem: None,
        message,
        fix: None,
        mode: "live",
    };
    let image = options.image.clone();
    let mut probes = Vec::new();
    let docker_socket = options
        .docker_host
        .strip_prefix("unix://")
        .map(PathBuf::from);
    probes.push(match (which("docker"), docker_socket) {
        (Some(_), Some(socket)) if !socket.exists() => Err(absent(
            Client::Docker,
            format!("no docker daemon at {}", options.docker_host),
        )),
        (Some(_), _) => Ok(Probe {
            client: Client::Docker,
            program: "docker",
            args: vec![
                "-H".into(),
                options.docker_host.clone(),
                "pull".into(),
                image.clone(),
            ],
            env: Vec::new(),
            // The daemon's own agent; with the containerd image store, containerd's.
            agents: &["docker/", "containerd/"],
        }),
        (None, _) => Err(absent(Client::Docker, "no docker CLI".to_owned())),
    });
    probes.push(match which("ctr") {
        Some(_) if options.containerd_address.exists() => {
            let mut args = vec![
                "-a".into(),
                options.containerd_address.display().to_string(),
                "images".into(),
                "pull".into(),
            ];
            // What CRI and the transfer service read; without a config_path, nothing.
            if let Some(dir) = &hosts_dir {
                args.push("--hosts-dir".into());
                args.push(dir.display().to_string());
            }
            args.push(image.clone());
            Ok(Probe {
                client: Client::Containerd,
                program: "ctr",
                args,
                env: Vec::new(),
                agents: &["containerd/"],
            })
        }
        Some(_) => Err(absent(
            Client::Containerd,
            format!("no containerd at {}", options.containerd_address.display()),
        )),
        None => Err(absent(Client::Containerd, "no ctr".to_owned())),
    });
    probes.push(match which("podman") {
        Some(_) => {
            let mut args = options.podman_args.clone();
            args.push("pull".into());
            args.push(image);
            Ok(Probe {
                client: Client::Containers,
                program: "podman",
                args,
                env: registries_conf
                    .map(|file| vec![("CONTAINERS_REGISTRIES_CONF", file)])
                    .unwrap_or_default(),
                agents: &["containers/", "c/image"],
            })
        }
        None => Err(absent(Client::Containers, "no podman".to_owned())),
    });
    probes
}

/// Runs one probe pull to its end or its deadline (then it is killed).
async fn pull(probe: &Probe, timeout: Duration) -> Result<(), String> {
    let mut command = tokio::process::Command::new(probe.program);
    command
        .args(&probe.args)
        .envs(probe.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|err| err.to_string())?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
        Ok(Err(err)) => Err(err.to_string()),
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            let last: String = last.chars().take(200).collect();
            Err(format!("{}: {}", output.status, last.trim()))
        }
    }
}

/// Asks the mirror what it saw from this address since `since`.
async fn seen(http: &reqwest::Client, url: &str, since: u64) -> Result<Seen, Error> {
    let failed = |why: String| Error::Probe(format!("{url}: {why}"));
    let response = http
        .get(format!("{url}?since={since}"))
        .send()
        .await
        .map_err(|err| failed(err.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!(
            "{} (a regmirror without the doctor endpoint, or not a regmirror)",
            response.status()
        )));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_SEEN_BODY as u64)
    {
        return Err(failed("answer too large".to_owned()));
    }
    // Read chunk by chunk, so an answer without a length is cut at the cap, not held whole.
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| failed(err.to_string()))?
    {
        if body.len().saturating_add(chunk.len()) > MAX_SEEN_BODY {
            return Err(failed("answer too large".to_owned()));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|err| failed(format!("unexpected answer: {err}")))
}

fn http_client(options: &ProbeOptions) -> Result<reqwest::Client, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("regmirror-doctor/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30));
    if let Some(ca) = &options.ca {
        let pem = std::fs::read(ca).map_err(|source| Error::Read {
            path: ca.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|err| Error::Usage(format!("--ca {}: {err}", ca.display())))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|err| Error::Probe(format!("HTTP client: {err}")))
}

/// A reference as every client reads it the same way: `alpine:3.20` becomes
/// `docker.io/library/alpine:3.20` (docker would say so, ctr needs it spelled out).
pub fn qualify(image: &str) -> String {
    let (first, rest) = match image.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (image, None),
    };
    let is_registry = first.contains('.') || first.contains(':') || first == "localhost";
    match rest {
        Some(_) if is_registry => image.to_owned(),
        Some(_) => format!("docker.io/{image}"),
        None => format!("docker.io/library/{image}"),
    }
}

/// The program's path, if it is on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_references() {
        let cases = [
            ("alpine:3.20", "docker.io/library/alpine:3.20"),
            ("org/app:1", "docker.io/org/app:1"),
            ("docker.io/library/x:t", "docker.io/library/x:t"),
            ("ghcr.io/org/app:1.4", "ghcr.io/org/app:1.4"),
            ("localhost/x:t", "localhost/x:t"),
            ("registry.local:5000/x:t", "registry.local:5000/x:t"),
        ];
        for (input, want) in cases {
            assert_eq!(qualify(input), want, "{input}");
        }
    }

    #[test]
    fn seen_answer_parses() {
        let body = r#"{"next": 7, "requests": [{"seq": 6, "method": "GET", "path": "/v2/", "ns": null, "user_agent": "containerd/1.6.20", "status": 200}]}"#;
        let seen: Seen = serde_json::from_str(body).unwrap();
        assert_eq!(seen.next, 7);
        assert_eq!(seen.requests[0].user_agent, "containerd/1.6.20");
    }
}
