//! Shared harness for integration and end-to-end tests.
//!
//! Every server the tests need (distribution, containerd, dockerd, regmirror) runs as
//! a real child process on 127.0.0.1 with an ephemeral port and its own temporary
//! directory, and is killed by process group and reaped when its guard is dropped.
//! Nothing here talks to the internet. A missing tool is a loud panic, never a skip.
#![allow(dead_code)]

pub mod cluster;
pub mod containerd;
pub mod distribution;
pub mod dockerd;
pub mod front;
pub mod garage;
pub mod image;
pub mod pki;
pub mod regmirror;

#[allow(unused_imports)]
pub use containerd::{write_hosts_toml, Containerd};
#[allow(unused_imports)]
pub use distribution::{Distribution, DistributionOptions, Request};
#[allow(unused_imports)]
pub use dockerd::{docker_cli, Dockerd};
#[allow(unused_imports)]
pub use front::Front;
#[allow(unused_imports)]
pub use garage::Garage;
#[allow(unused_imports)]
pub use image::{
    generate_image, push_image, push_image_with, push_index, GeneratedImage, ImageSpec, MediaTypes,
    Platform, PushedImage, PushedIndex, Pusher, ACCEPT_ALL_MANIFESTS,
};
#[allow(unused_imports)]
pub use regmirror::{Regmirror, RegmirrorConfig};

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// A reqwest client for talking to local test servers.
///
/// The crate builds reqwest with `rustls-no-provider`, so a crypto provider has to be
/// installed once per process before the first client is built.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        // A proxy from the environment must never see test traffic to 127.0.0.1.
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(300))
        .build()
        .expect("building reqwest client")
}

/// Panics loudly unless `name` is an executable on `PATH` (or an existing path).
pub fn require_tool(name: &str) -> PathBuf {
    match which(name) {
        Some(p) => p,
        None => panic!(
            "\n\n==== REQUIRED TOOL MISSING: `{name}` ====\n\
             The end-to-end tests need `{name}` on PATH and refuse to skip silently.\n\
             Run `bash tests/run.sh` as root (it installs the Debian packages), or\n\
             apt-get install -y skopeo docker-registry containerd docker.io umoci \
             apache2-utils prometheus jq chromium\n\n"
        ),
    }
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_exec(p))
}

/// Panics loudly unless the tests run as root (containerd and dockerd need it).
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "\n\n==== {what} NEEDS ROOT ====\nThis test runs real containerd/dockerd daemons and \
             must run as root (euid is {euid}). Run `sudo bash tests/run.sh`.\n\n"
        );
    }
}

/// An unused TCP port on 127.0.0.1.
///
/// The port is released before it is returned, so another process could take it; ports
/// handed out by this process are remembered so that parallel tests never get the same one.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A temporary directory with a short path (unix socket paths are limited to 108 bytes).
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("creating temporary directory")
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file's content, streamed.
pub fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The last `max` bytes of a log file, for panic messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let s = std::fs::read(path).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    String::from_utf8_lossy(&s[start..]).into_owned()
}

/// A child process that runs in its own process group and is killed (group and all) and
/// reaped when dropped.
pub struct ChildProc {
    name: String,
    child: Child,
    reaped: Option<ExitStatus>,
    log: PathBuf,
}

impl ChildProc {
    /// Spawns `cmd` with stdout and stderr appended to `log` and stdin closed.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening log {}: {e}", log.display()));
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        // If the test process is killed outright (a CI timeout), Drop never runs; the
        // kernel then kills the server when the spawning thread dies. Servers are spawned
        // from the test runtime's worker threads, which outlive every guard.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        ChildProc {
            name: name.to_owned(),
            child,
            reaped: None,
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().expect("try_wait");
        }
        self.reaped
    }

    /// Sends `sig` to the whole process group, unless the leader is already reaped (its
    /// process group id could then belong to someone else).
    pub fn signal(&mut self, sig: i32) {
        if self.reaped.is_some() {
            return;
        }
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; an unreaped leader keeps the
        // group id ours.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; always reaps.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                // Stragglers in the group (if any) do not outlive the test.
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIGTERM for {grace:?}; killing", self.name);
        self.kill9()
    }

    /// SIGKILL to the process group, then reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        if let Some(s) = self.reaped {
            return s;
        }
        let s = self.child.wait().expect("wait");
        self.reaped = Some(s);
        s
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Output of a finished command.
#[derive(Debug)]
pub struct CmdOutput {
    pub command: String,
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// Panics with the full output unless the command succeeded.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success, "command failed: {self}");
        self
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion off the async threads, killing it after `timeout`.
///
/// Output goes through temporary files so a chatty child can never block on a full pipe.
pub async fn run(cmd: Command, timeout: Duration) -> CmdOutput {
    tokio::task::spawn_blocking(move || run_blocking(cmd, timeout))
        .await
        .expect("command thread panicked")
}

/// Blocking version of [`run`].
pub fn run_blocking(mut cmd: Command, timeout: Duration) -> CmdOutput {
    use std::os::unix::process::CommandExt;
    let command = format!("{cmd:?}");
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(err.try_clone().unwrap()))
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {command}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            // SAFETY: the child is not reaped yet, so its group id is still ours.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |mut f: File| {
        use std::io::{Read, Seek};
        let mut s = String::new();
        f.rewind().unwrap();
        let mut b = Vec::new();
        f.read_to_end(&mut b).unwrap();
        s.push_str(&String::from_utf8_lossy(&b));
        s
    };
    let mut stderr = read(err);
    if status.is_none() {
        stderr.push_str(&format!("\n[harness: killed after {timeout:?}]"));
    }
    CmdOutput {
        command,
        success: status.map(|s| s.success()).unwrap_or(false),
        code: status.and_then(|s| s.code()),
        stdout: read(out),
        stderr,
    }
}

/// Polls `GET {base}/v2/` until it answers with any HTTP status, panicking with the log
/// tail if `proc` exits first or nothing answers within `timeout`.
pub async fn wait_for_v2(base: &str, proc: &mut ChildProc, timeout: Duration) {
    let client = http();
    let deadline = Instant::now() + timeout;
    let url = format!("{base}/v2/");
    loop {
        if let Some(status) = proc.exited() {
            panic!(
                "{} exited with {status} before answering {url}\n--- log {} ---\n{}",
                proc.name,
                proc.log.display(),
                log_tail(&proc.log, 8000)
            );
        }
        let r = client
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if r.is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{} did not answer {url} within {timeout:?}: {r:?}\n--- log {} ---\n{}",
                proc.name,
                proc.log.display(),
                log_tail(&proc.log, 8000)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Detaches every mount under `dir`, deepest first (what a killed daemon may leave behind).
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let c = std::ffi::CString::new(p.clone()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            eprintln!("umount {p}: {}", std::io::Error::last_os_error());
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let octal = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A minimal policy.json that lets skopeo copy anything (the tests check digests themselves).
pub fn skopeo_policy(dir: &Path) -> PathBuf {
    let p = dir.join("policy.json");
    std::fs::write(&p, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    p
}

/// `skopeo copy` from a plain-HTTP registry into a `dir:` layout.
///
/// `--preserve-digests` makes skopeo fail rather than rewrite a manifest, so the copy is
/// byte-identical or an error.
pub async fn skopeo_copy_to_dir(src: &str, dest: &Path, all: bool) -> CmdOutput {
    let skopeo = require_tool("skopeo");
    let work = tempdir("skopeo-");
    let policy = skopeo_policy(work.path());
    let mut cmd = Command::new(skopeo);
    cmd.arg("--policy")
        .arg(&policy)
        .arg("--registries.d")
        .arg(work.path())
        .arg("copy")
        .arg("--src-tls-verify=false")
        .arg("--preserve-digests")
        .arg("--retry-times=0");
    if all {
        cmd.arg("--all");
    }
    cmd.arg(src).arg(format!("dir:{}", dest.display()));
    // skopeo reads its auth file from XDG_RUNTIME_DIR/HOME; keep it in the scratch dir.
    cmd.env("XDG_RUNTIME_DIR", work.path())
        .env("HOME", work.path())
        .env("REGISTRY_AUTH_FILE", work.path().join("auth.json"));
    std::fs::write(work.path().join("auth.json"), "{}").unwrap();
    no_proxy(&mut cmd);
    let out = run(cmd, Duration::from_secs(300)).await;
    drop(work);
    out
}

/// Checks that what `skopeo copy ... dir:DIR` wrote for one image is the pushed image
/// byte for byte: the manifest file (`manifest.json`, or `<hex>.manifest.json` for an
/// index member) and every blob, by digest.
pub fn assert_skopeo_dir_holds(dir: &Path, img: &PushedImage, manifest_file: &str) {
    let manifest = std::fs::read(dir.join(manifest_file))
        .unwrap_or_else(|e| panic!("reading {manifest_file} in {}: {e}", dir.display()));
    assert!(
        manifest == img.manifest_bytes,
        "manifest {manifest_file} in {} differs from the pushed one:\n{}\n--- pushed ---\n{}",
        dir.display(),
        String::from_utf8_lossy(&manifest),
        String::from_utf8_lossy(&img.manifest_bytes)
    );
    for d in img.blob_digests() {
        let hex = d.strip_prefix("sha256:").unwrap();
        assert_eq!(
            sha256_file(&dir.join(hex)),
            d,
            "blob {d} in {}",
            dir.display()
        );
    }
}

/// Checks a `skopeo copy --all ... dir:DIR` of an index: the index and every member.
pub fn assert_skopeo_dir_holds_index(dir: &Path, idx: &PushedIndex) {
    let index = std::fs::read(dir.join("manifest.json")).unwrap();
    assert!(
        index == idx.bytes,
        "index in {} differs from the pushed one:\n{}",
        dir.display(),
        String::from_utf8_lossy(&index)
    );
    for img in &idx.images {
        let hex = img.manifest_digest.strip_prefix("sha256:").unwrap();
        assert_skopeo_dir_holds(dir, img, &format!("{hex}.manifest.json"));
    }
}

/// Proxy variables would send test traffic for 127.0.0.1 elsewhere.
pub fn no_proxy(cmd: &mut Command) -> &mut Command {
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd
}
