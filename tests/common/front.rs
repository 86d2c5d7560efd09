//! An nginx round-robin load balancer in front of several servers (regmirror replicas in
//! the cluster tests), as a deployment puts one in front of its replicas.
//!
//! Requests are spread strictly round-robin (the upstream state lives in a shared zone, so
//! every worker process follows the same rotation) and streamed both ways without buffering,
//! so a client sees bytes as the backend sends them. A backend that refuses connections is
//! skipped for the next one (nginx's `proxy_next_upstream error timeout`; POST and PATCH are
//! not retried once sent), and left out for 10 s. Each request is
//! logged with the backend that served it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{free_port, log_tail, require_tool, tempdir, ChildProc};

pub struct Front {
    proc: ChildProc,
    port: u16,
    access_log: PathBuf,
    /// Declared last: nginx is killed before its directory goes.
    dir: tempfile::TempDir,
}

impl Front {
    /// nginx on 127.0.0.1:ephemeral, round-robin over `backends`; returns once it accepts
    /// connections (the backends need not be up yet).
    pub async fn start(backends: &[SocketAddr]) -> Front {
        assert!(!backends.is_empty(), "a front needs at least one backend");
        let bin = require_tool("nginx");
        let dir = tempdir("front-");
        let port = free_port();
        let d = dir.path().display();
        let servers: String = backends
            .iter()
            .map(|a| format!("    server {a};\n"))
            .collect();
        // As root the workers would otherwise switch to `nobody`, who cannot enter the
        // private temporary directory.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;\n"
        } else {
            ""
        };
        let config = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes auto;\n\
             {user}\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20 log_format front '$request_method $request_uri $status $body_bytes_sent upstream=$upstream_addr';\n\
             \x20 access_log {d}/access.log front;\n\
             \x20 client_body_temp_path {d}/body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 upstream backends {{\n\
             \x20   zone backends 64k;\n\
             {servers}\
             \x20   keepalive 64;\n\
             \x20 }}\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{port};\n\
             \x20   client_max_body_size 0;\n\
             \x20   client_body_timeout 300s;\n\
             \x20   send_timeout 300s;\n\
             \x20   location / {{\n\
             \x20     proxy_pass http://backends;\n\
             \x20     proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n\
             \x20     proxy_set_header Host $http_host;\n\
             \x20     proxy_buffering off;\n\
             \x20     proxy_request_buffering off;\n\
             \x20     proxy_connect_timeout 5s;\n\
             \x20     proxy_read_timeout 300s;\n\
             \x20     proxy_send_timeout 300s;\n\
             \x20   }}\n\
             \x20 }}\n\
             }}\n",
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let mut cmd = Command::new(bin);
        // `-e` before the configuration is read: the packaged default log path may not exist.
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"));
        let log = dir.path().join("nginx.out");
        let mut proc = ChildProc::spawn("nginx front", cmd, &log);
        super::distribution::wait_for_tcp(port, &mut proc, Duration::from_secs(30)).await;
        Front {
            proc,
            port,
            access_log: dir.path().join("access.log"),
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr().to_string()
    }

    /// PID of the nginx master.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// One line per finished request: `METHOD URI STATUS BYTES upstream=ADDR[, ADDR...]`
    /// (several addresses when nginx moved on from a failed backend).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.access_log).unwrap_or_default()
    }

    /// The error log, for panic messages.
    pub fn error_log(&self) -> String {
        log_tail(&self.dir.path().join("error.log"), 8000)
    }
}
