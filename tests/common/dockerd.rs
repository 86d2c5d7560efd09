//! A real dockerd (20.10) with a registry mirror, on its own containerd.
//!
//! Everything lives under a temporary directory: data root, exec root, pid file, socket
//! and daemon.json (so /etc/docker/daemon.json cannot interfere); daemon.json is
//! `deploy/clients/docker/daemon.json` with the mirror's address filled in. The
//! sandbox-safe flags are `--storage-driver=vfs --iptables=false --ip6tables=false
//! --bridge=none --ip-masq=false`. The classic daemon sends a mirror plain
//! `/v2/library/x/...` paths (no `ns`); with no internet a fallback to Docker Hub fails,
//! so a successful pull came through the mirror.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    log_tail, no_proxy, require_root, require_tool, run, tempdir, unmount_under, ChildProc,
    CmdOutput, Containerd,
};

pub struct Dockerd {
    // Dropped in this order: dockerd, then containerd, then the directory.
    proc: Option<ChildProc>,
    containerd: Option<Containerd>,
    docker: PathBuf,
    host: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// The docker CLI: prefer the one packaged with dockerd (the same API version).
pub fn docker_cli() -> PathBuf {
    let packaged = PathBuf::from("/usr/bin/docker");
    if packaged.exists() {
        packaged
    } else {
        require_tool("docker")
    }
}

impl Dockerd {
    pub async fn start(containerd: Containerd, registry_mirror_url: &str) -> Self {
        Self::start_with_args(containerd, registry_mirror_url, &[]).await
    }

    /// Like [`start`](Self::start), with extra daemon flags (`--insecure-registry=HOST:PORT`).
    pub async fn start_with_args(
        containerd: Containerd,
        registry_mirror_url: &str,
        extra_args: &[String],
    ) -> Self {
        require_root("dockerd");
        let bin = require_tool("dockerd");
        let docker = docker_cli();
        let dir = tempdir("dkd-");
        let d = dir.path();
        let sock = d.join("docker.sock");
        let log = d.join("dockerd.log");
        // deploy/clients/docker/daemon.json, what users copy, with the mirror's address.
        let daemon_json = d.join("daemon.json");
        std::fs::write(&daemon_json, daemon_json_for(registry_mirror_url)).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--config-file")
            .arg(&daemon_json)
            .arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("-p")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-masq=false",
                "--userland-proxy=false",
                "--debug",
            ])
            .args(extra_args)
            .arg("--containerd")
            .arg(containerd.socket());
        no_proxy(&mut cmd);
        let mut proc = ChildProc::spawn("dockerd", cmd, &log);
        let host = format!("unix://{}", sock.display());

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = proc.exited() {
                panic!(
                    "dockerd exited with {s}\n--- log ---\n{}",
                    log_tail(&log, 8000)
                );
            }
            if sock.exists() {
                let mut v = Command::new(&docker);
                v.arg("-H").arg(&host).arg("version");
                v.env("DOCKER_CONFIG", d.join("cli"));
                if run(v, Duration::from_secs(10)).await.success {
                    break;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "dockerd did not answer on {host} within 60s\n--- log ---\n{}",
                    log_tail(&log, 8000)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Dockerd {
            proc: Some(proc),
            containerd: Some(containerd),
            docker,
            host,
            log,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `docker -H unix://... ARGS`, with a private client config.
    pub async fn docker(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(&self.docker);
        cmd.arg("-H").arg(&self.host).args(args);
        cmd.env("DOCKER_CONFIG", self.dir.path().join("cli"));
        run(cmd, Duration::from_secs(300)).await
    }

    /// `docker pull IMAGE` (e.g. `x:t`, `org/x:t`; Docker Hub names go to the mirror).
    pub async fn docker_pull(&self, image: &str) -> CmdOutput {
        self.docker(&["pull", image]).await
    }

    /// `docker image inspect IMAGE` as JSON (the first element), or `None` if absent.
    pub async fn image_inspect(&self, image: &str) -> Option<serde_json::Value> {
        let out = self.docker(&["image", "inspect", image]).await;
        if !out.success {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("docker image inspect output: {e}\n{out}"));
        v.get(0).cloned()
    }

    /// The `RepoDigests` of an image, e.g. `["x@sha256:..."]`.
    pub async fn repo_digests(&self, image: &str) -> Vec<String> {
        self.image_inspect(image)
            .await
            .and_then(|v| {
                v["RepoDigests"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Stops dockerd, then its containerd, then detaches leftover mounts.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(15));
        }
        if let Some(mut c) = self.containerd.take() {
            c.stop();
        }
        unmount_under(self.dir.path());
    }
}

/// `deploy/clients/docker/daemon.json` with its placeholder mirror replaced by `mirror_url`.
fn daemon_json_for(mirror_url: &str) -> String {
    let snippet = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clients/docker/daemon.json");
    let text = std::fs::read_to_string(&snippet)
        .unwrap_or_else(|e| panic!("reading {}: {e}", snippet.display()));
    assert!(
        text.contains(super::containerd::SNIPPET_MIRROR_URL),
        "{} does not name the placeholder {}",
        snippet.display(),
        super::containerd::SNIPPET_MIRROR_URL
    );
    text.replace(super::containerd::SNIPPET_MIRROR_URL, mirror_url)
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}
