//! A real Garage (S3-compatible object store) for the S3 backend and cluster tests.
//!
//! Every node is a `garage server` child process with a generated `garage.toml` (LMDB
//! metadata, RPC, S3 API and admin API on 127.0.0.1 ephemeral ports) in the instance's
//! temporary directory, and is killed by PID when its guard drops. A single node configures
//! itself (`--single-node --default-access-key --default-bucket`); a cluster is wired with the
//! `garage` CLI exactly as an operator would: `node connect`, `layout assign`, `layout apply`,
//! `bucket create`, `key create`, `bucket allow`.
//!
//! The binary comes from `REGMIRROR_GARAGE`, else `target/tools/bin/garage` (where
//! tests/run.sh installs it), else `PATH`. Objects are read and written with `curl
//! --aws-sigv4`, a client independent of the code under test.
//!
//! Garage's guarantees with `replication_factor = 3` (the default `consistent` mode): reads
//! and writes each need a quorum of 2 of the 3 copies, so with one node down everything
//! still works, and with two down both fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{free_port, log_tail, no_proxy, require_tool, run, tempdir, ChildProc, CmdOutput};

/// The bucket every instance serves.
pub const BUCKET: &str = "regmirror";
/// The S3 region every instance answers for (Garage checks it in signatures).
pub const REGION: &str = "garage";

/// How long a node may take to answer after it was (re)started; a safety net against hangs
/// on a loaded machine, not a measure.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// One `garage` CLI call.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// One S3 request through curl (bodies are at most a few hundred MiB in these tests).
const S3_TIMEOUT: Duration = Duration::from_secs(300);

/// The `garage` binary: `REGMIRROR_GARAGE`, `target/tools/bin/garage`, or `PATH`.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REGMIRROR_GARAGE") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "REGMIRROR_GARAGE={} is not a file; `bash tests/run.sh` builds Garage into \
             target/tools/bin/garage",
            p.display()
        );
        return p;
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/garage");
    if local.is_file() {
        return local;
    }
    match super::which("garage") {
        Some(p) => p,
        None => panic!(
            "\n\n==== REQUIRED TOOL MISSING: `garage` (Garage 2.5.0) ====\n\
             The S3 and cluster tests run a real Garage and refuse to skip silently.\n\
             `bash tests/run.sh` builds it once into target/tools/bin/garage, or run\n\
             cargo install garage --version 2.5.0 --locked --root target/tools\n\n"
        ),
    }
}

/// One `garage server` process and its ports.
struct Node {
    config: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    admin_port: u16,
    /// `<full node id>@127.0.0.1:<rpc port>`, known once the node has started (cluster
    /// nodes only).
    id: Option<String>,
    /// `None` while stopped.
    proc: Option<ChildProc>,
}

/// A running Garage: one node or a cluster, with one bucket and one key allowed on it.
///
/// Dropping it kills every node (by PID, through [`ChildProc`]) and then removes the data.
pub struct Garage {
    nodes: Vec<Node>,
    /// `--single-node` (replication factor 1, layout and credentials made by the server).
    single: bool,
    access_key: String,
    secret_key: String,
    admin_token: String,
    /// Declared last: the processes are killed before their directories go.
    dir: tempfile::TempDir,
}

/// An object in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Object {
    pub key: String,
    pub size: u64,
}

/// The status and body of one S3 request.
#[derive(Debug)]
pub struct S3Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl S3Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Garage {
    /// One node, `replication_factor = 1`, bucket and key created by the server itself
    /// (`--single-node --default-access-key --default-bucket`). Returns once a signed listing
    /// of the bucket answers 200.
    pub async fn single() -> Garage {
        let dir = tempdir("garage-");
        let key_id = format!("GK{}", random_hex(12));
        let secret = random_hex(32);
        let mut g = Garage {
            nodes: vec![Node::new(dir.path(), 0, &random_hex(32))],
            single: true,
            access_key: key_id,
            secret_key: secret,
            admin_token: random_hex(16),
            dir,
        };
        g.write_configs(&[]);
        g.spawn(0);
        g.wait_listening(0).await;
        g.wait_healthy(0, true).await;
        g.wait_s3(0).await;
        g
    }

    /// `n` nodes with `replication_factor = n` (3 for the reference deployment) and one shared
    /// RPC secret, connected, given a layout (zone dc1, 1G each), with a bucket and a key
    /// allowed to read, write and own it. Returns once every node reports the cluster fully
    /// operational and answers a signed listing of the bucket.
    pub async fn cluster(n: usize) -> Garage {
        assert!(n >= 1, "a cluster has at least one node");
        let dir = tempdir("garage-");
        let secret = random_hex(32);
        let nodes = (0..n).map(|i| Node::new(dir.path(), i, &secret)).collect();
        let mut g = Garage {
            nodes,
            single: false,
            access_key: String::new(),
            secret_key: String::new(),
            admin_token: random_hex(16),
            dir,
        };
        g.write_configs(&[]);
        for i in 0..n {
            g.spawn(i);
        }
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            g.wait_listening(i).await;
            // The node key is written at start-up, before the S3 listener opens.
            let out = g.cli(i, &["node", "id", "-q"]).await;
            let id = out.stdout.trim().to_owned();
            assert!(
                id.contains('@'),
                "unexpected `garage node id` output: {out}"
            );
            g.nodes[i].id = Some(id.clone());
            ids.push(id);
        }
        for id in &ids[1..] {
            g.cli(0, &["node", "connect", id]).await;
        }
        // A restarted node finds the others through `bootstrap_peers` at once; the peer list
        // it saves itself may predate its first connections, and the others only retry a
        // lost peer every 30 s.
        g.write_configs(&ids);
        for id in &ids {
            let hex = id.split('@').next().unwrap_or_default();
            g.cli(0, &["layout", "assign", "-z", "dc1", "-c", "1G", hex])
                .await;
        }
        g.cli(0, &["layout", "apply", "--version", "1"]).await;
        for i in 0..n {
            g.wait_healthy(i, true).await;
        }
        g.cli(0, &["bucket", "create", BUCKET]).await;
        let key = g.cli(0, &["key", "create", "regmirror-test"]).await;
        g.access_key = table_value(&key.stdout, "Key ID:")
            .unwrap_or_else(|| panic!("no key id in `garage key create` output: {key}"));
        g.secret_key = table_value(&key.stdout, "Secret key:")
            .unwrap_or_else(|| panic!("no secret in `garage key create` output: {key}"));
        g.cli(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                "regmirror-test",
            ],
        )
        .await;
        for i in 0..n {
            g.wait_s3(i).await;
        }
        g
    }

    /// `http://127.0.0.1:PORT` of node 0's S3 API.
    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    /// The S3 API of node `i`.
    pub fn endpoint_of(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The S3 API of every node, in node order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.endpoint_of(i)).collect()
    }

    /// `http://127.0.0.1:PORT` of node `i`'s admin API (`/health`, `/metrics`, `/v2/...`).
    pub fn admin_endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].admin_port)
    }

    /// The bearer token of the admin API.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The working directory (configs, node data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log of node `i` (stdout and stderr, across restarts).
    pub fn log(&self, i: usize) -> String {
        log_tail(&self.nodes[i].log, 16_000)
    }

    /// PID of node `i`, `None` while it is stopped.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].proc.as_ref().map(ChildProc::pid)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].proc.is_some()
    }

    /// The `storage.s3` section of regmirror's configuration for this Garage, as a YAML flow
    /// mapping (fits after `s3: ` in block or flow style), pointing at node 0.
    pub fn s3_yaml(&self) -> String {
        self.s3_yaml_for(0)
    }

    /// Like [`s3_yaml`](Self::s3_yaml), pointing at node `i` (one replica per node spreads
    /// the S3 load, as a deployment with a local Garage per host would).
    pub fn s3_yaml_for(&self, i: usize) -> String {
        format!(
            "{{ endpoint: \"{}\", bucket: {BUCKET}, region: {REGION}, access_key_id: \"{}\", \
             secret_access_key: \"{}\", path_style: true }}",
            self.endpoint_of(i),
            self.access_key,
            self.secret_key
        )
    }

    /// Kills node `i` (SIGKILL, by PID) and reaps it; its data stays for [`start_node`].
    /// The other nodes notice within seconds; meanwhile they still reach a quorum without it.
    ///
    /// [`start_node`]: Self::start_node
    pub fn stop_node(&mut self, i: usize) {
        let mut proc = self.nodes[i]
            .proc
            .take()
            .unwrap_or_else(|| panic!("garage node {i} is not running"));
        proc.kill9();
    }

    /// Starts node `i` again on its data and ports, and waits until it answers a signed
    /// listing of the bucket; in a cluster, also until every running node is connected to
    /// every other running node again (each side reconnects on its own).
    pub async fn start_node(&mut self, i: usize) {
        assert!(
            self.nodes[i].proc.is_none(),
            "garage node {i} is already running"
        );
        self.spawn(i);
        self.wait_listening(i).await;
        if !self.single {
            // The restarted node dials its bootstrap peers, but each of them would only dial
            // back after its 30 s retry interval: connect them now, as an operator would.
            let id = self.nodes[i].id.clone().expect("cluster node id");
            for j in (0..self.nodes.len()).filter(|&j| j != i && self.is_running(j)) {
                self.cli(j, &["node", "connect", &id]).await;
            }
            self.wait_connected().await;
        }
        self.wait_healthy(i, false).await;
        self.wait_s3(i).await;
    }

    /// Runs `garage -c <node i's config> ARGS` and panics with its output unless it succeeds.
    pub async fn cli(&self, i: usize, args: &[&str]) -> CmdOutput {
        let out = self.cli_unchecked(i, args).await;
        assert!(
            out.success,
            "garage CLI failed: {out}\n--- node {i} log ---\n{}",
            self.log(i)
        );
        out
    }

    /// Runs `garage -c <node i's config> ARGS`, whatever its exit status.
    pub async fn cli_unchecked(&self, i: usize, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(garage_bin());
        clean_env(&mut cmd);
        cmd.arg("-c").arg(&self.nodes[i].config).args(args);
        run(cmd, CLI_TIMEOUT).await
    }

    // ---- S3 through curl --aws-sigv4 ----

    /// One signed request to node `i`'s S3 API. `path` is what follows the bucket (an object
    /// key, or empty) and `query` the query string, which must already be in canonical order
    /// and encoding (curl signs it as given).
    pub async fn s3_request_via(
        &self,
        i: usize,
        method: &str,
        path: &str,
        query: &str,
        body: Option<&[u8]>,
    ) -> S3Response {
        let curl = require_tool("curl");
        let work = tempdir("garage-curl-");
        let out_file = work.path().join("body");
        let mut url = format!("{}/{BUCKET}", self.endpoint_of(i));
        if !path.is_empty() {
            url.push('/');
            url.push_str(&encode_path(path));
        }
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let mut cmd = Command::new(curl);
        no_proxy(&mut cmd);
        cmd.args(["-sS", "--noproxy", "*", "--max-time"])
            .arg(S3_TIMEOUT.as_secs().to_string())
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{REGION}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            // Garage insists on the header; curl signs it as the payload hash.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(["-X", method, "-o"])
            .arg(&out_file)
            .args(["-w", "%{http_code}"]);
        if let Some(body) = body {
            let in_file = work.path().join("upload");
            std::fs::write(&in_file, body).unwrap();
            cmd.args(["-H", "Content-Type: application/octet-stream"])
                .arg("--data-binary")
                .arg(format!("@{}", in_file.display()));
        }
        cmd.arg(&url);
        let out = run(cmd, S3_TIMEOUT + Duration::from_secs(30)).await;
        assert!(out.success, "curl to garage node {i} failed: {out}");
        let status = out
            .stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl printed no status: {out}"));
        S3Response {
            status,
            body: std::fs::read(&out_file).unwrap_or_default(),
        }
    }

    /// PUT an object through node `i`; panics unless Garage answers 200.
    pub async fn put_object_via(&self, i: usize, key: &str, bytes: &[u8]) {
        let r = self.s3_request_via(i, "PUT", key, "", Some(bytes)).await;
        assert_eq!(r.status, 200, "PUT {key} via garage node {i}: {}", r.text());
    }

    /// GET an object through node `i`: `None` on 404, panics on any other error.
    pub async fn get_object_via(&self, i: usize, key: &str) -> Option<Vec<u8>> {
        let r = self.s3_request_via(i, "GET", key, "", None).await;
        match r.status {
            200 => Some(r.body),
            404 => None,
            s => panic!("GET {key} via garage node {i}: {s} {}", r.text()),
        }
    }

    /// Every object under `prefix`, through node `i` (ListObjectsV2, all pages).
    pub async fn list_objects_via(&self, i: usize, prefix: &str) -> Vec<S3Object> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // Parameters in canonical (sorted) order, values percent-encoded.
            let mut query = String::new();
            if let Some(t) = &token {
                query.push_str(&format!("continuation-token={}&", encode_component(t)));
            }
            query.push_str(&format!("list-type=2&prefix={}", encode_component(prefix)));
            let r = self.s3_request_via(i, "GET", "", &query, None).await;
            assert_eq!(
                r.status,
                200,
                "listing {prefix:?} via garage node {i}: {}",
                r.text()
            );
            let xml = r.text();
            for c in xml_elements(&xml, "Contents") {
                let key = xml_elements(c, "Key").first().map(|k| xml_unescape(k));
                let size = xml_elements(c, "Size")
                    .first()
                    .and_then(|s| s.trim().parse().ok());
                match (key, size) {
                    (Some(key), Some(size)) => out.push(S3Object { key, size }),
                    _ => panic!("unparsable listing entry {c:?} in {xml}"),
                }
            }
            let truncated =
                xml_elements(&xml, "IsTruncated").first().map(|s| s.trim()) == Some("true");
            if !truncated {
                return out;
            }
            token = Some(
                xml_elements(&xml, "NextContinuationToken")
                    .first()
                    .map(|t| xml_unescape(t))
                    .unwrap_or_else(|| panic!("truncated listing without a token: {xml}")),
            );
        }
    }

    /// PUT through the first running node.
    pub async fn put_object(&self, key: &str, bytes: &[u8]) {
        self.put_object_via(self.first_running(), key, bytes).await
    }

    /// GET through the first running node.
    pub async fn get_object(&self, key: &str) -> Option<Vec<u8>> {
        self.get_object_via(self.first_running(), key).await
    }

    /// Objects under `prefix`, through the first running node.
    pub async fn list_objects(&self, prefix: &str) -> Vec<S3Object> {
        self.list_objects_via(self.first_running(), prefix).await
    }

    /// How many objects the bucket holds under `prefix`.
    pub async fn count_objects(&self, prefix: &str) -> usize {
        self.list_objects(prefix).await.len()
    }

    /// Total size of the objects under `prefix`.
    pub async fn bytes_under(&self, prefix: &str) -> u64 {
        self.list_objects(prefix).await.iter().map(|o| o.size).sum()
    }

    // ---- process management ----

    fn first_running(&self) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.is_running(i))
            .expect("no garage node is running")
    }

    /// Writes every node's `garage.toml`; `ids` (`<node id>@<rpc addr>` of every node, in
    /// node order, once known) become each node's `bootstrap_peers`.
    fn write_configs(&self, ids: &[String]) {
        let n = self.nodes.len();
        for (i, node) in self.nodes.iter().enumerate() {
            let d = node.config.parent().unwrap();
            let peers: Vec<String> = ids
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, id)| format!("\"{id}\""))
                .collect();
            let secret = std::fs::read_to_string(d.join("rpc_secret")).unwrap();
            // `consistent` (the default) is spelled out: the quorum rules above depend on it.
            let config = format!(
                "metadata_dir = \"{d}/meta\"\n\
                 data_dir = \"{d}/data\"\n\
                 db_engine = \"lmdb\"\n\
                 replication_factor = {rf}\n\
                 consistency_mode = \"consistent\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 bootstrap_peers = [{peers}]\n\
                 \n\
                 [s3_api]\n\
                 s3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 \n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n\
                 admin_token = \"{token}\"\n",
                d = d.display(),
                rf = if self.single { 1 } else { n },
                rpc = node.rpc_port,
                s3 = node.s3_port,
                admin = node.admin_port,
                token = self.admin_token,
                peers = peers.join(", "),
            );
            std::fs::write(&node.config, config).unwrap();
        }
    }

    fn spawn(&mut self, i: usize) {
        let mut cmd = Command::new(garage_bin());
        clean_env(&mut cmd);
        cmd.arg("-c").arg(&self.nodes[i].config).arg("server");
        if self.single {
            cmd.args(["--single-node", "--default-access-key", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
                .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
                .env("GARAGE_DEFAULT_BUCKET", BUCKET);
        }
        let node = &mut self.nodes[i];
        node.proc = Some(ChildProc::spawn(
            &format!("garage node {i}"),
            cmd,
            &node.log,
        ));
    }

    /// Waits for node `i`'s S3 listener (it opens after the node's own set-up).
    async fn wait_listening(&mut self, i: usize) {
        let port = self.nodes[i].s3_port;
        let proc = self.nodes[i].proc.as_mut().expect("node running");
        super::distribution::wait_for_tcp(port, proc, READY_TIMEOUT).await;
    }

    /// Polls every running node's cluster status until it sees every running node up.
    async fn wait_connected(&mut self) {
        let client = super::http();
        let deadline = Instant::now() + READY_TIMEOUT;
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.is_running(j))
            .collect();
        for &j in &running {
            let url = format!("{}/v2/GetClusterStatus", self.admin_endpoint(j));
            loop {
                self.assert_alive(j);
                let status: Option<serde_json::Value> = match client
                    .get(&url)
                    .bearer_auth(&self.admin_token)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => r
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok()),
                    _ => None,
                };
                let up = |id: &str| {
                    status.as_ref().is_some_and(|s| {
                        s["nodes"].as_array().is_some_and(|nodes| {
                            nodes
                                .iter()
                                .any(|n| n["id"].as_str() == Some(id) && n["isUp"] == true)
                        })
                    })
                };
                let hex = |k: usize| {
                    self.nodes[k]
                        .id
                        .as_deref()
                        .and_then(|id| id.split('@').next())
                };
                if running.iter().all(|&k| hex(k).is_some_and(up)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "garage node {j} does not see every running node within {READY_TIMEOUT:?}: \
                     {status:?}\n--- log ---\n{}",
                    self.log(j)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Polls node `i`'s `/health` until it has a quorum (`fully`: every node connected).
    async fn wait_healthy(&mut self, i: usize, fully: bool) {
        let client = super::http();
        let url = format!("{}/health", self.admin_endpoint(i));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.assert_alive(i);
            let r = client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let last = match r {
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    if status == 200 && (!fully || body.contains("fully operational")) {
                        return;
                    }
                    format!("{status} {body}")
                }
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "garage node {i} not healthy within {READY_TIMEOUT:?}: {last}\n--- log ---\n{}",
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls a signed listing of the bucket through node `i` until it answers 200: the key,
    /// the bucket and the permission have reached that node.
    async fn wait_s3(&mut self, i: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.assert_alive(i);
            let r = self
                .s3_request_via(i, "GET", "", "list-type=2&max-keys=1", None)
                .await;
            if r.status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "garage node {i}: signed listing still {} after {READY_TIMEOUT:?}: {}\n--- log ---\n{}",
                r.status,
                r.text(),
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn assert_alive(&mut self, i: usize) {
        let proc = self.nodes[i].proc.as_mut().expect("node running");
        if let Some(status) = proc.exited() {
            panic!(
                "garage node {i} exited with {status}\n--- log ---\n{}",
                log_tail(&self.nodes[i].log, 16_000)
            );
        }
    }
}

impl Node {
    fn new(root: &Path, i: usize, rpc_secret: &str) -> Node {
        let d = root.join(format!("node{i}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("rpc_secret"), rpc_secret).unwrap();
        Node {
            config: d.join("garage.toml"),
            log: d.join("garage.log"),
            rpc_port: free_port(),
            s3_port: free_port(),
            admin_port: free_port(),
            id: None,
            proc: None,
        }
    }
}

/// Garage reads `GARAGE_*` variables (RPC secret, config file, admin token) over its
/// configuration file; the test's environment must not change the instance. Logs at info.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GARAGE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "garage=info,netapp=warn");
    no_proxy(cmd);
}

/// `n` random bytes from the kernel, hex-encoded.
fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    hex::encode(b)
}

/// The value after `label` in the CLI's `Label:<tab>value` tables.
fn table_value(out: &str, label: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/`.
fn encode_path(s: &str) -> String {
    encode(s, true)
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a query value).
fn encode_component(s: &str) -> String {
    encode(s, false)
}

fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inner text of every `<tag>…</tag>` (not nested in itself) in `xml`.
fn xml_elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else {
            break;
        };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}
