//! The servers regmirror is compared with, and what the benchmark reads about processes.
//!
//! The peer is CNCF distribution (Debian `docker-registry`) in proxy mode with the defaults a
//! user gets from the packaged config (filesystem storage, in-memory blob descriptor cache,
//! info logging with the access log on). The limit is nginx serving the very file regmirror
//! stored, with sendfile. Each runs as a child process in its own process group on
//! 127.0.0.1, killed when its guard drops.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{free_port, no_proxy, require_tool, tempdir, wait_for_v2, ChildProc};

/// regmirror, from `target/release/regmirror` or the binary given with `--regmirror-bin` (to
/// compare two builds), with a configuration in the harness's YAML shape.
pub struct Regmirror {
    proc: ChildProc,
    port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Regmirror {
    /// Starts `bin serve --config FILE`; `@LISTEN@` and `@ROOT@` in `yaml` are filled in.
    pub async fn start(bin: &Path, yaml: &str) -> Regmirror {
        let dir = tempdir("bench-regmirror-");
        let port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let yaml = yaml
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@ROOT@", &data.to_string_lossy());
        let config = dir.path().join("config.yml");
        std::fs::write(&config, &yaml).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path());
        no_proxy(&mut cmd);
        let log = dir.path().join("regmirror.log");
        let mut proc = ChildProc::spawn("regmirror", cmd, &log);
        if yaml.contains("\ntls:") {
            crate::common::distribution::wait_for_tcp(port, &mut proc, Duration::from_secs(30))
                .await;
        } else {
            let base = format!("http://127.0.0.1:{port}");
            wait_for_v2(&base, &mut proc, Duration::from_secs(30)).await;
        }
        Regmirror {
            proc,
            port,
            data,
            _dir: dir,
        }
    }

    /// [`Regmirror::start`] with a `tls:` section in `yaml`: waits for the port, not `/v2/`.
    pub async fn start_tls(bin: &Path, yaml: &str) -> Regmirror {
        assert!(yaml.contains("\ntls:"), "an HTTPS configuration");
        Regmirror::start(bin, yaml).await
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The storage root.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

/// Distribution 2.8 as a pull-through cache of `remote`.
pub struct Peer {
    proc: ChildProc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Peer {
    pub async fn start(remote: &str) -> Peer {
        let bin = require_tool("docker-registry");
        let dir = tempdir("bench-peer-");
        let port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  cache:\n    blobdescriptor: inmemory\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: regmirror-bench-secret\n\
             proxy:\n  remoteurl: {remote}\n",
            data = data.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config_path).current_dir(dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let log = dir.path().join("peer.log");
        let mut proc = ChildProc::spawn("docker-registry (proxy)", cmd, &log);
        let base = format!("http://127.0.0.1:{port}");
        wait_for_v2(&base, &mut proc, Duration::from_secs(30)).await;
        Peer {
            proc,
            port,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// nginx serving files under `root` with sendfile: what this machine can do at best.
pub struct Nginx {
    proc: ChildProc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub async fn start(root: &Path) -> Nginx {
        Nginx::start_with(root, None).await
    }

    /// nginx serving `root` over HTTPS (HTTP/1.1) with this certificate and key.
    pub async fn start_https(root: &Path, cert: &Path, key: &Path) -> Nginx {
        Nginx::start_with(root, Some((cert, key))).await
    }

    async fn start_with(root: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        let bin = require_tool("nginx");
        let dir = tempdir("bench-nginx-");
        let port = free_port();
        let d = dir.path().display();
        // One worker per core, as `worker_processes auto` would pick; `user root` because the
        // files live in a private temporary directory.
        let config = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes auto;\n\
             user root;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20 access_log off;\n\
             \x20 sendfile on;\n\
             \x20 tcp_nopush on;\n\
             \x20 keepalive_requests 1000000;\n\
             \x20 client_body_temp_path {d}/body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 default_type application/octet-stream;\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{port}{ssl};\n\
             {certs}\
             \x20   root {root};\n\
             \x20   location /v2/ {{ return 200 '{{}}'; }}\n\
             \x20 }}\n\
             }}\n",
            root = root.display(),
            ssl = if tls.is_some() { " ssl" } else { "" },
            certs = tls.map_or(String::new(), |(cert, key)| format!(
                "    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:SSL:1m;\n",
                cert.display(),
                key.display()
            )),
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"));
        let log = dir.path().join("nginx.out");
        let mut proc = ChildProc::spawn("nginx", cmd, &log);
        if tls.is_some() {
            crate::common::distribution::wait_for_tcp(port, &mut proc, Duration::from_secs(10))
                .await;
        } else {
            let base = format!("http://127.0.0.1:{port}");
            wait_for_v2(&base, &mut proc, Duration::from_secs(10)).await;
        }
        Nginx {
            proc,
            port,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.proc.pid();
        let mut v = vec![master];
        v.extend(children(master));
        v
    }
}

/// Peak resident memory and CPU time of a set of processes (summed).
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub peak_rss_kib: u64,
    pub cpu_secs: f64,
}

/// Reads `VmHWM` from `/proc/PID/status` and utime + stime from `/proc/PID/stat`.
pub fn usage(pids: &[u32]) -> Usage {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut u = Usage::default();
    for pid in pids {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            u.peak_rss_kib += status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Some(t) = stat_fields(*pid) {
            // Fields 14 and 15 (utime, stime), counted from 1 with the command removed.
            let utime: f64 = t.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let stime: f64 = t.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            u.cpu_secs += (utime + stime) / ticks;
        }
    }
    u
}

/// `/proc/PID/stat` fields after the parenthesised command name (which may hold spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_owned).collect())
}

/// `pid` and its direct children (an nginx master and its workers).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut v = vec![pid];
    v.extend(children(pid));
    v
}

/// Direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Field 4 (ppid) is the second after the command.
        if stat_fields(child).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
            == Some(pid)
        {
            out.push(child);
        }
    }
    out
}

/// What the upstream served, read from its JSON log (one `response completed` line per
/// request, with `http.response.written`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    pub blob_gets: u64,
    pub manifest_requests: u64,
    pub bytes: u64,
}

/// Sums the requests logged after byte `offset` of `log`.
pub fn served_since(log: &Path, offset: u64) -> Served {
    let text = std::fs::read(log).unwrap_or_default();
    let from = (offset as usize).min(text.len());
    parse_served(&String::from_utf8_lossy(&text[from..]))
}

fn parse_served(text: &str) -> Served {
    let mut s = Served::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if !v["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("response completed"))
        {
            continue;
        }
        s.requests += 1;
        let uri = v["http.request.uri"].as_str().unwrap_or_default();
        let method = v["http.request.method"].as_str().unwrap_or_default();
        if uri.contains("/blobs/sha256:") && method == "GET" {
            s.blob_gets += 1;
        }
        if uri.contains("/manifests/") {
            s.manifest_requests += 1;
        }
        s.bytes += v["http.response.written"].as_u64().unwrap_or(0);
    }
    s
}

pub fn file_len(p: &PathBuf) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Checks of the log and /proc parsing, for `cargo test`'s run of this bench.
pub fn self_check() {
    let log = concat!(
        r#"{"http.request.method":"GET","http.request.uri":"/v2/a/b/blobs/sha256:ab","http.response.written":100,"msg":"response completed"}"#,
        "\n",
        r#"{"http.request.method":"HEAD","http.request.uri":"/v2/a/b/manifests/t","http.response.written":0,"msg":"response completed"}"#,
        "\nnot json\n",
        r#"{"msg":"listening"}"#,
        "\n"
    );
    assert_eq!(
        parse_served(log),
        Served {
            requests: 2,
            blob_gets: 1,
            manifest_requests: 1,
            bytes: 100
        }
    );
    let me = usage(&[std::process::id()]);
    assert!(me.peak_rss_kib > 0, "VmHWM of this process: {me:?}");
    assert!(stat_fields(std::process::id()).is_some_and(|f| f.len() > 20));
}
