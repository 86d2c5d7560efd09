//! The regmirror binary under test, run as a child process.
//!
//! The YAML is written to a file in the instance's temporary directory and passed with
//! `serve --config`. `@LISTEN@` and `@ROOT@` in the YAML are replaced by the listen
//! address and the storage root, which the harness chooses. The data directory survives
//! `kill9()` and `restart()`, so crash-recovery tests can reuse it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{free_port, no_proxy, tempdir, wait_for_v2, ChildProc};

/// The usual configuration, rendered into the contract's YAML shape.
#[derive(Clone, Debug)]
pub struct RegmirrorConfig {
    pub default_upstream: String,
    /// (name, url) in order.
    pub upstreams: Vec<(String, String)>,
    pub tag_ttl: String,
    pub log_level: String,
    /// Appended verbatim (top-level keys) for options this builder does not know.
    pub extra_yaml: String,
}

impl Default for RegmirrorConfig {
    fn default() -> Self {
        RegmirrorConfig {
            default_upstream: "docker.io".into(),
            upstreams: Vec::new(),
            tag_ttl: "5m".into(),
            log_level: "debug".into(),
            extra_yaml: String::new(),
        }
    }
}

impl RegmirrorConfig {
    /// `docker.io` (the default upstream) served by `url`.
    pub fn docker_io(url: &str) -> Self {
        Self::default().upstream("docker.io", url)
    }

    pub fn upstream(mut self, name: &str, url: &str) -> Self {
        self.upstreams.push((name.to_owned(), url.to_owned()));
        self
    }

    pub fn tag_ttl(mut self, ttl: &str) -> Self {
        self.tag_ttl = ttl.to_owned();
        self
    }

    /// The YAML with `@LISTEN@` and `@ROOT@` placeholders.
    pub fn to_yaml(&self) -> String {
        let mut y = format!(
            "listen: @LISTEN@\n\
             storage: {{ root: @ROOT@ }}\n\
             cache: {{ tag_ttl: {} }}\n\
             default_upstream: {}\n\
             upstreams:\n",
            self.tag_ttl, self.default_upstream
        );
        for (name, url) in &self.upstreams {
            y.push_str(&format!("  {name}: {{ url: \"{url}\" }}\n"));
        }
        y.push_str(&format!(
            "log: {{ level: {}, format: text }}\n",
            self.log_level
        ));
        y.push_str(&self.extra_yaml);
        y
    }

    pub async fn start(&self) -> Regmirror {
        Regmirror::start(&self.to_yaml()).await
    }
}

pub struct Regmirror {
    proc: Option<ChildProc>,
    port: u16,
    config_path: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// `https` when the config has a top-level `tls:` section.
    scheme: &'static str,
    /// Extra environment for the process (credentials, proxies), kept across restarts.
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Regmirror {
    /// Starts `regmirror serve --config FILE` with `config_yaml` (placeholders
    /// `@LISTEN@`, `@ROOT@` filled in) and waits until `GET /v2/` answers.
    pub async fn start(config_yaml: &str) -> Self {
        Self::start_with_env(config_yaml, &[]).await
    }

    /// Like [`start`](Self::start), with extra environment variables (set after the proxy
    /// variables are cleared, so a test may set its own).
    pub async fn start_with_env(config_yaml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempdir("regmirror-");
        let port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let yaml = config_yaml
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@ROOT@", &data.to_string_lossy());
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, yaml).unwrap();
        let log = dir.path().join("regmirror.log");
        let tls = config_yaml.starts_with("tls:") || config_yaml.contains("\ntls:");
        let mut r = Regmirror {
            proc: None,
            port,
            config_path,
            data,
            log,
            scheme: if tls { "https" } else { "http" },
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
        };
        r.spawn().await;
        r
    }

    /// Starts with the standard config: docker.io (default) served by `upstream_url`.
    pub async fn with_docker_io(upstream_url: &str) -> Self {
        RegmirrorConfig::docker_io(upstream_url).start().await
    }

    pub fn binary() -> &'static str {
        env!("CARGO_BIN_EXE_regmirror")
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(Self::binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path());
        no_proxy(&mut cmd);
        // Backtraces in the log make a crash diagnosable from a test failure.
        cmd.env("RUST_BACKTRACE", "1");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut proc = ChildProc::spawn("regmirror", cmd, &self.log);
        if self.scheme == "https" {
            super::distribution::wait_for_tcp(self.port, &mut proc, Duration::from_secs(30)).await;
        } else {
            wait_for_v2(&self.url(), &mut proc, Duration::from_secs(30)).await;
        }
        self.proc = Some(proc);
    }

    /// `http://127.0.0.1:PORT` (`https://` with `tls:`)
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The storage root (survives restarts).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Everything the process wrote to stdout and stderr, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; returns whether it exited cleanly in time.
    pub fn stop(&mut self) -> bool {
        match self.proc.take() {
            Some(mut p) => p.terminate(Duration::from_secs(10)).success(),
            None => true,
        }
    }

    /// Starts again on the same port, config and data directory (after `kill9`/`stop`,
    /// or kills the running process first).
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Rewrites the config file (placeholders filled in); takes effect on `restart()`.
    pub fn rewrite_config(&self, config_yaml: &str) {
        let yaml = config_yaml
            .replace("@LISTEN@", &format!("127.0.0.1:{}", self.port))
            .replace("@ROOT@", &self.data.to_string_lossy());
        std::fs::write(&self.config_path, yaml).unwrap();
    }
}

impl Drop for Regmirror {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- regmirror log ({}) ---\n{}",
                self.log.display(),
                super::log_tail(&self.log, 6000)
            );
        }
        self.kill9();
    }
}
