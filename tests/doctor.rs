//! `regmirror doctor`, run as the real binary: against configuration trees (`--root`) that
//! are right and wrong in each way it names, and live (`--probe`) against a real regmirror
//! in front of Debian's registry, with real dockerd, containerd (`ctr`) and podman, one node
//! configured right and one configured wrong.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIRROR: &str = "http://mirror.example:5000";
/// The placeholder address of the snippets in deploy/clients/.
const SNIPPET_HOST: &str = "mirror.example:5000";

fn snippet(path: &str) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/clients")
        .join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn write(root: &Path, path: &str, text: &str) {
    let file = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, text).unwrap();
}

/// A node configured as README says, for docker.io, with the snippets users copy: Docker,
/// containerd 1.x (version 2 config), BuildKit and registries.conf, all pointing at
/// `mirror_host` over plain HTTP.
fn good_tree(root: &Path, mirror_host: &str) {
    let fill = |text: String| text.replace(SNIPPET_HOST, mirror_host);
    write(
        root,
        "/etc/docker/daemon.json",
        &fill(snippet("docker/daemon.json")),
    );
    write(
        root,
        "/etc/containerd/config.toml",
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    );
    write(
        root,
        "/etc/containerd/certs.d/docker.io/hosts.toml",
        &fill(snippet("containerd/docker.io/hosts.toml")),
    );
    write(
        root,
        "/etc/buildkit/buildkitd.toml",
        &fill(snippet("buildkit/buildkitd.toml")),
    );
    write(
        root,
        "/etc/containers/registries.conf",
        &fill(snippet("containers/registries.conf")),
    );
}

/// `regmirror doctor ARGS`, its exit code and output.
fn doctor(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(Regmirror::binary());
    cmd.arg("doctor").args(args);
    let out = run_blocking(cmd, Duration::from_secs(60));
    (out.code.unwrap_or(-1), out.stdout, out.stderr)
}

/// One finding of a JSON report: (client, mode, verdict, problem or `-`).
type Row = (String, String, String, String);

/// `doctor --json` on `root`: exit code and (client, mode, verdict, problem) per finding.
fn doctor_json(root: &Path, extra: &[&str]) -> (i32, Vec<Row>, String) {
    let root = root.to_str().unwrap();
    let mut args = vec!["--mirror", MIRROR, "--root", root, "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = doctor(&args);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}\n{stdout}\n{stderr}"));
    let findings = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or("-").to_owned();
            (s("client"), s("mode"), s("verdict"), s("problem"))
        })
        .collect();
    (code, findings, stdout)
}

/// The problems named in a report, in order.
fn problems(findings: &[Row]) -> Vec<&str> {
    findings
        .iter()
        .filter(|f| f.3 != "-")
        .map(|f| f.3.as_str())
        .collect()
}

/// The snippets README tells users to copy make every client OK (exit 0); with nothing
/// installed or configured every client is ABSENT, which is no failure either.
#[test]
fn right_configuration_passes_and_an_empty_node_is_absent() {
    let dir = tempdir("doctor-");
    good_tree(dir.path(), SNIPPET_HOST);
    let (code, findings, out) = doctor_json(dir.path(), &[]);
    assert_eq!(code, 0, "{out}");
    let verdicts: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| (f.0.as_str(), f.2.as_str()))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("docker", "OK"),
            ("containerd", "OK"),
            ("buildkit", "OK"),
            ("containers", "OK")
        ],
        "{out}"
    );

    let empty = tempdir("doctor-empty-");
    let (code, findings, out) = doctor_json(empty.path(), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(findings.iter().all(|f| f.2 == "ABSENT"), "{out}");
}

/// Each way a configured client misses the mirror is named, with its fix line, and makes
/// the exit status 1.
#[test]
fn each_wrong_configuration_is_named_with_its_fix() {
    type Break = fn(&Path);
    let cases: &[(&str, Break, &str, &str)] = &[
        (
            "docker without registry-mirrors",
            |r| write(r, "/etc/docker/daemon.json", "{\"debug\": true}"),
            "docker-no-mirror",
            "add \"http://mirror.example:5000\" to \"registry-mirrors\" in",
        ),
        (
            "docker with another mirror",
            |r| write(r, "/etc/docker/daemon.json", "{\"registry-mirrors\": [\"https://mirror.gcr.io\"]}"),
            "docker-other-mirror",
            "to \"registry-mirrors\"",
        ),
        (
            "containerd without config_path",
            |r| write(r, "/etc/containerd/config.toml", "version = 2\n"),
            "containerd-no-config-path",
            "set config_path = \"/etc/containerd/certs.d\" under [plugins.\"io.containerd.grpc.v1.cri\".registry]",
        ),
        (
            "containerd 2.x: CRI has config_path, the transfer service has none",
            |r| write(
                r,
                "/etc/containerd/config.toml",
                "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
            ),
            "containerd-transfer-no-config-path",
            "set config_path = \"/etc/containerd/certs.d\" under [plugins.\"io.containerd.transfer.v1.local\"]",
        ),
        (
            "containerd 2.x: transfer reads another directory",
            |r| write(
                r,
                "/etc/containerd/config.toml",
                "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.transfer.v1.local\"]\n  config_path = \"/etc/containerd/other.d\"\n",
            ),
            "containerd-transfer-config-path-differs",
            "under [plugins.\"io.containerd.transfer.v1.local\"]",
        ),
        (
            "no hosts.toml for docker.io",
            |r| std::fs::remove_file(r.join("etc/containerd/certs.d/docker.io/hosts.toml")).unwrap(),
            "containerd-no-hosts-toml",
            "create /etc/containerd/certs.d/docker.io/hosts.toml with",
        ),
        (
            "hosts.toml whose host is not the mirror",
            |r| write(
                r,
                "/etc/containerd/certs.d/docker.io/hosts.toml",
                "server = \"https://registry-1.docker.io\"\n[host.\"https://mirror.gcr.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            ),
            "containerd-host-not-mirror",
            "[host.\"http://mirror.example:5000\"] capabilities = [\"pull\", \"resolve\"]",
        ),
        (
            "hosts.toml without resolve",
            |r| write(
                r,
                "/etc/containerd/certs.d/docker.io/hosts.toml",
                "[host.\"http://mirror.example:5000\"]\n  capabilities = [\"pull\"]\n",
            ),
            "containerd-capabilities",
            "set capabilities = [\"pull\", \"resolve\"]",
        ),
        (
            "hosts.toml path-prefix mirror without override_path",
            |r| write(
                r,
                "/etc/containerd/certs.d/docker.io/hosts.toml",
                "[host.\"http://mirror.example:5000/v2/docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            ),
            "containerd-path-without-override",
            "set override_path = true under [host.\"http://mirror.example:5000/v2/docker.io\"]",
        ),
        (
            "hosts.toml naming a missing CA",
            |r| write(
                r,
                "/etc/containerd/certs.d/docker.io/hosts.toml",
                "[host.\"http://mirror.example:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/containerd/certs.d/docker.io/ca.crt\"\n",
            ),
            "containerd-ca-missing",
            "put the certificate at",
        ),
        (
            "buildkitd.toml without the mirror",
            |r| write(r, "/etc/buildkit/buildkitd.toml", "[registry.\"ghcr.io\"]\n  mirrors = [\"mirror.example:5000\"]\n"),
            "buildkit-no-mirror",
            "add \"mirror.example:5000\" to mirrors under [registry.\"docker.io\"]",
        ),
        (
            "buildkitd.toml without http = true",
            |r| write(r, "/etc/buildkit/buildkitd.toml", "[registry.\"docker.io\"]\n  mirrors = [\"mirror.example:5000\"]\n"),
            "buildkit-http-missing",
            "set http = true under [registry.\"mirror.example:5000\"]",
        ),
        (
            "registries.conf without insecure",
            |r| write(
                r,
                "/etc/containers/registries.conf",
                "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"mirror.example:5000/docker.io\"\n",
            ),
            "containers-insecure-missing",
            "set insecure = true",
        ),
        (
            "registries.conf without a mirror",
            |r| write(r, "/etc/containers/registries.conf", "unqualified-search-registries = [\"docker.io\"]\n"),
            "containers-no-mirror",
            "[[registry.mirror]] location = \"mirror.example:5000/docker.io\" insecure = true",
        ),
        (
            "registries.conf mirror at another upstream's prefix",
            |r| write(
                r,
                "/etc/containers/registries.conf",
                "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"mirror.example:5000/quay.io\"\ninsecure = true\n",
            ),
            "containers-prefix",
            "set location = \"mirror.example:5000/docker.io\"",
        ),
    ];
    for (what, break_it, problem, fix) in cases {
        let dir = tempdir("doctor-");
        good_tree(dir.path(), SNIPPET_HOST);
        break_it(dir.path());
        let (code, findings, out) = doctor_json(dir.path(), &[]);
        assert_eq!(code, 1, "{what}: exit status\n{out}");
        assert_eq!(problems(&findings), [*problem], "{what}\n{out}");
        let root = dir.path().to_str().unwrap();
        let (code, text, _) = doctor(&["--mirror", MIRROR, "--root", root]);
        assert_eq!(code, 1, "{what}\n{text}");
        let line = text
            .lines()
            .find(|l| l.contains(&format!("[{problem}]")))
            .unwrap_or_else(|| panic!("{what}: no [{problem}] line\n{text}"));
        assert!(line.contains("BYPASS"), "{what}: {line}");
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("fix:") && l.contains(fix)),
            "{what}: no fix line containing {fix:?}\n{text}"
        );
    }
}

/// Warnings do not fail the run: Docker mirrors Docker Hub only, a remote snapshotter
/// ignores hosts.toml. An upstream with a port cannot be a podman path prefix, which is a
/// bypass; a file that does not parse is too. A bad --mirror is a usage error (2).
#[test]
fn warnings_ports_parse_errors_and_usage() {
    let dir = tempdir("doctor-");
    good_tree(dir.path(), SNIPPET_HOST);
    write(
        dir.path(),
        "/etc/containerd/config.toml",
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n[proxy_plugins.stargz]\n  type = \"snapshot\"\n  address = \"/run/containerd-stargz-grpc/containerd-stargz-grpc.sock\"\n",
    );
    let (code, findings, out) = doctor_json(dir.path(), &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        problems(&findings),
        ["containerd-snapshotter-ignores-hosts"],
        "{out}"
    );

    let root = dir.path().to_str().unwrap();
    let (code, findings, out) = doctor_json(
        dir.path(),
        &[
            "--upstream",
            "docker.io",
            "--upstream",
            "registry.local:5000",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let named = problems(&findings);
    assert!(named.contains(&"docker-hub-only"), "{out}");
    assert!(named.contains(&"containers-port-in-prefix"), "{out}");
    let (_, text, _) = doctor(&[
        "--mirror",
        MIRROR,
        "--root",
        root,
        "--upstream",
        "registry.local:5000",
    ]);
    assert!(
        text.contains("podman cannot mirror an upstream whose name has a port in a path prefix"),
        "{text}"
    );

    write(
        dir.path(),
        "/etc/docker/daemon.json",
        "{\"registry-mirrors\": [",
    );
    let (code, findings, out) = doctor_json(dir.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(problems(&findings).contains(&"unparsable"), "{out}");

    let (code, _, stderr) = doctor(&["--mirror", "mirror.example:5000", "--root", root]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--mirror"), "{stderr}");
}

/// Environment and flags that keep a probe's clients to their own directories.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(mirror_host: &str) -> Node {
        let dir = tempdir("doctor-node-");
        good_tree(dir.path(), mirror_host);
        let d = dir.path();
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                d.join("podman/run").display(),
                d.join("podman/root").display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("auth.json"), "{}").unwrap();
        Node { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `doctor --probe` with docker on `docker_sock`, ctr on `containerd_sock`, podman on
    /// private storage.
    async fn probe(
        &self,
        mirror_url: &str,
        image: &str,
        docker_sock: &Path,
        containerd_sock: &Path,
    ) -> (i32, serde_json::Value, String) {
        require_tool("podman");
        let d = self.dir.path();
        let mut cmd = Command::new(Regmirror::binary());
        cmd.arg("doctor")
            .args(["--mirror", mirror_url, "--json", "--probe", image])
            .arg("--root")
            .arg(d)
            .arg(format!("--docker-host=unix://{}", docker_sock.display()))
            .arg("--containerd-address")
            .arg(containerd_sock)
            .arg(format!(
                "--podman-arg=--root={}",
                d.join("podman/root").display()
            ))
            .arg(format!(
                "--podman-arg=--runroot={}",
                d.join("podman/run").display()
            ))
            .args([
                "--podman-arg=--storage-driver=vfs",
                "--podman-arg=--cgroup-manager=cgroupfs",
                "--podman-arg=--events-backend=file",
                "--probe-timeout=120",
            ])
            // ctr unpacks with a snapshotter that works on any filesystem.
            .env("CONTAINERD_SNAPSHOTTER", "native")
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("DOCKER_CONFIG", d.join("docker-cli"))
            .env("HOME", d)
            .env("XDG_RUNTIME_DIR", d);
        no_proxy(&mut cmd);
        let out = run(cmd, Duration::from_secs(600)).await;
        let report: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor --json: {e}\n{out}"));
        (out.code.unwrap_or(-1), report, out.to_string())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        unmount_under(self.dir.path());
    }
}

/// The live verdict of each client: (client, verdict).
fn live(report: &serde_json::Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["mode"] == "live")
        .map(|f| {
            (
                f["client"].as_str().unwrap().to_owned(),
                f["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn mirror_with_image() -> (Distribution, Regmirror) {
    let hub = Distribution::start().await;
    push_image(&hub.url(), "library/probe", "v1", &[2000, 300_000]).await;
    let rm = Regmirror::with_docker_io(&hub.url()).await;
    (hub, rm)
}

/// A node configured right: dockerd with `registry-mirrors`, containerd whose CRI
/// config_path has the mirror's hosts.toml, podman with the path-prefix registries.conf.
/// The probe pulls with all three and the mirror saw each of them.
#[tokio::test(flavor = "multi_thread")]
async fn live_probe_sees_each_client_of_a_right_node() {
    let (_hub, rm) = mirror_with_image().await;
    let node = Node::new(&rm.host());
    let ctr = Containerd::start().await;
    let dockerd = Dockerd::start(Containerd::start().await, &rm.url()).await;
    // The daemon's real daemon.json is the one doctor reads.
    std::fs::copy(
        dockerd.dir().join("daemon.json"),
        node.root().join("etc/docker/daemon.json"),
    )
    .unwrap();

    let (code, report, out) = node
        .probe(
            &rm.url(),
            "docker.io/library/probe:v1",
            &dockerd.dir().join("docker.sock"),
            ctr.socket(),
        )
        .await;
    assert_eq!(
        live(&report),
        [
            ("docker".to_owned(), "OK".to_owned()),
            ("containerd".to_owned(), "OK".to_owned()),
            ("containers".to_owned(), "OK".to_owned())
        ],
        "{out}\n--- regmirror ---\n{}",
        rm.log()
    );
    assert_eq!(code, 0, "{out}");
}

/// A node configured wrong: dockerd's `registry-mirrors` names another mirror, containerd
/// has no config_path, registries.conf's mirror lacks `insecure = true`. Each is named
/// statically, and live the mirror saw none of the three pulls: BYPASS, exit status 1.
#[tokio::test(flavor = "multi_thread")]
async fn live_probe_names_each_client_that_bypasses() {
    let (_hub, rm) = mirror_with_image().await;
    let node = Node::new(&rm.host());
    let ctr = Containerd::start().await;
    // A mirror nobody listens on: the daemon falls back to Docker Hub, unreachable here.
    let dockerd = Dockerd::start(Containerd::start().await, "http://127.0.0.1:9").await;
    std::fs::copy(
        dockerd.dir().join("daemon.json"),
        node.root().join("etc/docker/daemon.json"),
    )
    .unwrap();
    write(node.root(), "/etc/containerd/config.toml", "version = 2\n");
    let conf = node.root().join("etc/containers/registries.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text.replace("insecure = true", "")).unwrap();

    let (code, report, out) = node
        .probe(
            &rm.url(),
            "docker.io/library/probe:v1",
            &dockerd.dir().join("docker.sock"),
            ctr.socket(),
        )
        .await;
    let named: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["problem"].as_str())
        .collect();
    for problem in [
        "docker-other-mirror",
        "containerd-no-config-path",
        "containers-insecure-missing",
    ] {
        assert!(named.contains(&problem), "{problem}\n{out}");
    }
    assert_eq!(
        live(&report),
        [
            ("docker".to_owned(), "BYPASS".to_owned()),
            ("containerd".to_owned(), "BYPASS".to_owned()),
            ("containers".to_owned(), "BYPASS".to_owned())
        ],
        "{out}\n--- regmirror ---\n{}",
        rm.log()
    );
    assert_eq!(code, 1, "{out}");
}

/// A client of 127.0.0.1 from the given loopback source address.
fn http_from(source: [u8; 4]) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from(source))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The mirror's record answers each address with its own requests only, keeps no
/// credential, and does not record the questions themselves.
#[tokio::test(flavor = "multi_thread")]
async fn seen_endpoint_answers_each_address_with_its_own_requests() {
    let (_hub, rm) = mirror_with_image().await;
    let seen = format!("{}/_regmirror/doctor/seen", rm.url());
    let one = http_from([127, 0, 0, 1]);
    let two = http_from([127, 0, 0, 2]);
    let ask = |client: reqwest::Client, since: u64| {
        let url = format!("{seen}?since={since}");
        async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            serde_json::from_slice::<serde_json::Value>(&response.bytes().await.unwrap()).unwrap()
        }
    };
    let start = ask(one.clone(), u64::MAX).await["next"].as_u64().unwrap();
    let pulled = one
        .get(format!(
            "{}/v2/library/probe/manifests/v1?ns=docker.io",
            rm.url()
        ))
        .header("user-agent", "containerd/1.6.0-doctor-test")
        .header("authorization", "Bearer s3cret-token")
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pulled.status(), 200);

    let mine = ask(one.clone(), start).await;
    let requests = mine["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 1, "{mine}");
    assert_eq!(
        requests[0]["path"], "/v2/library/probe/manifests/v1",
        "{mine}"
    );
    assert_eq!(requests[0]["ns"], "docker.io", "{mine}");
    assert_eq!(
        requests[0]["user_agent"], "containerd/1.6.0-doctor-test",
        "{mine}"
    );
    assert!(!mine.to_string().contains("s3cret"), "{mine}");

    let theirs = ask(two, start).await;
    assert_eq!(theirs["requests"].as_array().unwrap().len(), 0, "{theirs}");
}
