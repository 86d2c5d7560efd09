//! A private containerd (1.6) and the `ctr` client.
//!
//! Root, state and every socket live under one temporary directory; the CRI plugin and
//! the snapshotters that need special filesystems are disabled, and pulls unpack with
//! the `native` snapshotter, which works on any filesystem. `ctr images pull
//! --hosts-dir` reads `<dir>/<host>/hosts.toml` and, for a mirror, sends
//! `?ns=<host>` with every request; an `http://` host entry is dialled as plain HTTP
//! without `--plain-http`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    log_tail, no_proxy, require_root, require_tool, run, tempdir, unmount_under, ChildProc,
    CmdOutput,
};

pub struct Containerd {
    proc: Option<ChildProc>,
    sock: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    pub async fn start() -> Self {
        require_root("containerd");
        let bin = require_tool("containerd");
        require_tool("ctr");
        let dir = tempdir("ctd-");
        let d = dir.path();
        let sock = d.join("containerd.sock");
        let log = d.join("containerd.log");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = "{debug}"
  level = "debug"

[metrics]
  address = ""
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
            debug = d.join("debug.sock").display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path);
        let mut proc = ChildProc::spawn("containerd", cmd, &log);

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = proc.exited() {
                panic!(
                    "containerd exited with {s}\n--- log ---\n{}",
                    log_tail(&log, 8000)
                );
            }
            if sock.exists() {
                let mut v = Command::new("ctr");
                v.arg("-a").arg(&sock).arg("version");
                if run(v, Duration::from_secs(10)).await.success {
                    break;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "containerd did not answer on {} within 30s\n--- log ---\n{}",
                    sock.display(),
                    log_tail(&log, 8000)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Containerd {
            proc: Some(proc),
            sock,
            log,
            dir,
        }
    }

    /// The gRPC socket (for `ctr -a` and `dockerd --containerd`).
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr` with the socket and extra arguments.
    pub async fn ctr(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.sock).args(args);
        // ctr would honour proxies from the environment for registry traffic.
        no_proxy(&mut cmd);
        run(cmd, Duration::from_secs(300)).await
    }

    /// `ctr images pull --hosts-dir DIR --snapshotter native REF` (REF fully qualified,
    /// e.g. `docker.io/library/x:t`).
    pub async fn ctr_pull(&self, hosts_dir: &Path, image_ref: &str) -> CmdOutput {
        let hosts = hosts_dir.to_string_lossy().into_owned();
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            image_ref,
        ])
        .await
    }

    /// The digest `ctr images ls` shows for `image_ref`, if the image exists.
    pub async fn image_digest(&self, image_ref: &str) -> Option<String> {
        let out = self.ctr(&["images", "ls"]).await;
        out.assert_success();
        out.stdout.lines().skip(1).find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(image_ref))
                .then(|| cols.nth(1).map(str::to_owned))
                .flatten()
        })
    }

    /// Stops containerd (SIGTERM, then SIGKILL) and detaches anything it left mounted.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
        unmount_under(self.dir.path());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The placeholder mirror address in the snippets under `deploy/clients/`.
pub const SNIPPET_MIRROR_URL: &str = "http://mirror.example:5000";

/// Writes `<dir>/<host>/hosts.toml` naming `mirror_url` as a pull/resolve mirror for
/// `host`, the way users configure containerd, and returns the path of the file.
///
/// For the hosts `deploy/clients/containerd/` ships a file for (docker.io, ghcr.io,
/// quay.io), that file is used with its placeholder address replaced, so the tests
/// exercise exactly what users copy.
pub fn write_hosts_toml(dir: &Path, host: &str, mirror_url: &str) -> PathBuf {
    let snippet = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/clients/containerd")
        .join(host)
        .join("hosts.toml");
    let content = match std::fs::read_to_string(&snippet) {
        Ok(text) => {
            assert!(
                text.contains(SNIPPET_MIRROR_URL),
                "{} does not name the placeholder {SNIPPET_MIRROR_URL}",
                snippet.display()
            );
            text.replace(SNIPPET_MIRROR_URL, mirror_url)
        }
        Err(_) => {
            let server = if host == "docker.io" {
                "https://registry-1.docker.io".to_owned()
            } else {
                format!("https://{host}")
            };
            format!(
                "server = \"{server}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            )
        }
    };
    let d = dir.join(host);
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("hosts.toml");
    std::fs::write(&file, content).unwrap();
    file
}
