//! Deployment artefacts, tested as users run them: the container image built from
//! `deploy/Dockerfile` and run by `compose.yaml` on a real Docker engine, the Kubernetes
//! manifests rendered by kustomize and validated against the Kubernetes schemas, the systemd
//! unit checked by `systemd-analyze`, and the client snippets under `deploy/clients/`.
//!
//! The files are read where users find them, never copied into the tests; only the
//! addresses that must differ on this machine (listen port, upstream) are substituted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ::regmirror::config::Config;
use common::*;

/// The repository root: compose.yaml, deploy/ and the Docker build context.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Parses a TOML file with Python's `tomllib` (the crate has no TOML parser) into JSON.
fn toml_to_json(path: &Path) -> serde_json::Value {
    let python = require_tool("python3");
    let mut cmd = Command::new(python);
    cmd.args([
        "-c",
        "import json, sys, tomllib; print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))))",
    ])
    .arg(path);
    let out = run_blocking(cmd, Duration::from_secs(30));
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap()
}

fn yaml(text: &str, what: &str) -> serde_json::Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Static binary and image
// ---------------------------------------------------------------------------------------

/// The target directory of this build (`…/target`), from the path of the tested binary.
fn target_dir() -> PathBuf {
    Path::new(Regmirror::binary())
        .parent()
        .and_then(Path::parent)
        .expect("the regmirror binary lives in <target>/<profile>/")
        .to_owned()
}

/// Builds the statically linked binary the image packages (a no-op when it is fresh;
/// tests/run.sh builds it before the tests) and checks that it is static.
fn static_binary() -> PathBuf {
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo())
        .args(["build", "--release", "--bin", "regmirror"])
        .args(["--target", TRIPLE])
        .arg("--target-dir")
        .arg(target_dir())
        // With an explicit --target these flags reach only the binary, not build scripts
        // and proc-macros, which must stay dynamic.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        );
    // What `cargo test` sets for this test process, and the shell that ran tests/run.sh's
    // build had not: build scripts (ring's) rerun when CARGO_PKG_NAME or CARGO_MANIFEST_DIR
    // change, so with them the build here would not be the no-op it should be, but a
    // rebuild of the whole binary on every run.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key == "OUT_DIR"
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
            || key == "CARGO_RUSTC_CURRENT_DIR"
            || ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
                .iter()
                .any(|p| key.starts_with(p))
        {
            cmd.env_remove(key);
        }
    }
    let out = run_blocking(cmd, Duration::from_secs(1800));
    out.assert_success();
    let bin = target_dir().join(TRIPLE).join("release/regmirror");
    let mut ldd = Command::new(require_tool("ldd"));
    ldd.arg(&bin);
    let out = run_blocking(ldd, Duration::from_secs(30));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("statically linked") || text.contains("not a dynamic executable"),
        "{} is not static:\n{text}",
        bin.display()
    );
    bin
}

/// Stages the binary and a CA bundle where the Dockerfile's `prebuilt` stage takes them:
/// a directory under `target/image/` (the only part of target/ in the build context).
struct Staged {
    dir: PathBuf,
    rel: String,
}

impl Staged {
    fn new(binary: &Path) -> Self {
        // One directory per test: the compose tests run in parallel in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rel = format!("target/image/deploy-test-{}-{n}", std::process::id());
        let dir = repo().join(&rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(binary, dir.join("regmirror")).unwrap();
        // As the Dockerfile's builder does: line tables out, symbols kept for backtraces.
        let mut strip = Command::new(require_tool("strip"));
        strip.arg("--strip-debug").arg(dir.join("regmirror"));
        run_blocking(strip, Duration::from_secs(60)).assert_success();
        std::fs::copy(
            "/etc/ssl/certs/ca-certificates.crt",
            dir.join("ca-certificates.crt"),
        )
        .expect("the CA bundle /etc/ssl/certs/ca-certificates.crt (Debian ca-certificates)");
        Staged { dir, rel }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `docker-compose` (v1, Debian's package) against the test's dockerd, on the files
/// `files` (compose.yaml and the test override, then their rendered merge); `down -v` and
/// the image removal happen on drop, before dockerd stops (containers would otherwise
/// outlive it).
struct ComposeProject {
    project: String,
    /// Where relative paths in the files resolve: the repository root for compose.yaml,
    /// deploy/compose for cluster.yaml (compose's default, the first file's directory).
    directory: PathBuf,
    files: Vec<PathBuf>,
    docker_host: String,
    env: Vec<(String, String)>,
    image: String,
    /// `--env-file`: an empty one stands for a fresh clone without `.env`.
    env_file: Option<PathBuf>,
}

impl ComposeProject {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(require_tool("docker-compose"));
        cmd.current_dir(repo())
            .arg("--project-name")
            .arg(&self.project)
            .arg("--project-directory")
            .arg(&self.directory);
        if let Some(env_file) = &self.env_file {
            cmd.arg("--env-file").arg(env_file);
        }
        for file in &self.files {
            cmd.arg("--file").arg(file);
        }
        cmd.args(args)
            .env("DOCKER_HOST", &self.docker_host)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        no_proxy(&mut cmd);
        cmd
    }

    /// Merges compose.yaml with the override (`docker-compose config`) and drops the one
    /// thing host networking cannot have: compose v1's Docker client refuses published
    /// ports with `network_mode: host`, where the engine and compose v2 would ignore them.
    /// Everything else runs as compose.yaml says.
    async fn render_for_host_network(&mut self, dir: &Path) {
        let out = self.run(&["config"]).await;
        out.assert_success();
        let mut merged = yaml(&out.stdout, "docker-compose config");
        let service = merged["services"]["regmirror"]
            .as_object_mut()
            .expect("a regmirror service");
        assert_eq!(service["network_mode"], "host", "the override applies");
        let ports = service
            .remove("ports")
            .expect("compose.yaml publishes a port");
        assert!(
            ports.to_string().contains("5000"),
            "compose.yaml publishes port 5000: {ports}"
        );
        let rendered = dir.join("compose.rendered.yaml");
        std::fs::write(&rendered, serde_yaml_ng::to_string(&merged).unwrap()).unwrap();
        self.files = vec![rendered];
    }

    async fn run(&self, args: &[&str]) -> CmdOutput {
        run(self.command(args), Duration::from_secs(180)).await
    }

    fn docker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(docker_cli());
        cmd.arg("-H").arg(&self.docker_host).args(args);
        cmd
    }

    async fn container_id(&self) -> String {
        self.service_container("regmirror").await
    }

    /// The container of `service` (one replica each).
    async fn service_container(&self, service: &str) -> String {
        let out = self.run(&["ps", "-q", service]).await;
        out.assert_success();
        let id = out.stdout.trim().to_owned();
        assert!(!id.is_empty(), "no {service} container: {out}");
        id
    }

    /// Polls the regmirror container's health until `healthy`; returns how long that took.
    async fn wait_healthy(&self, timeout: Duration) -> Duration {
        self.wait_service_healthy("regmirror", timeout).await
    }

    async fn wait_service_healthy(&self, service: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let id = self.service_container(service).await;
        loop {
            let out = run(
                self.docker(&[
                    "inspect",
                    "--format",
                    "{{.State.Status}} {{.State.Health.Status}}",
                    &id,
                ]),
                Duration::from_secs(30),
            )
            .await;
            out.assert_success();
            let state = out.stdout.trim().to_owned();
            if state == "running healthy" {
                return start.elapsed();
            }
            if state.starts_with("exited") || start.elapsed() > timeout {
                let logs = run(self.docker(&["logs", &id]), Duration::from_secs(30)).await;
                let health = run(
                    self.docker(&["inspect", "--format", "{{json .State.Health}}", &id]),
                    Duration::from_secs(30),
                )
                .await;
                panic!(
                    "{service} container is `{state}` after {:?}\n--- health ---\n{}\n--- logs ---\n{}{}",
                    start.elapsed(),
                    health.stdout,
                    logs.stdout,
                    logs.stderr
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn inspect_container(&self) -> serde_json::Value {
        let id = self.container_id().await;
        let out = run(self.docker(&["inspect", &id]), Duration::from_secs(30)).await;
        out.assert_success();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v[0].clone()
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = run_blocking(
                self.command(&["logs", "--no-color"]),
                Duration::from_secs(30),
            );
            eprintln!(
                "--- docker-compose logs ---\n{}{}",
                logs.stdout, logs.stderr
            );
        }
        let down = run_blocking(
            self.command(&["down", "--volumes", "--remove-orphans"]),
            Duration::from_secs(120),
        );
        if !down.success {
            eprintln!("docker-compose down failed: {down}");
        }
        let _ = run_blocking(
            self.docker(&["rmi", "--force", &self.image]),
            Duration::from_secs(60),
        );
    }
}

/// The whole compose story: build the image from the static binary, `up`, wait for
/// healthy, pull through it with two clients (dockerd via daemon.json, containerd via the
/// hosts.toml snippet), `down` (keeping the volume), `up` again, and pull everything again
/// with zero blob downloads from the upstream. The upstream requires credentials, which
/// reach regmirror as a compose secret through the opt-in compose.credentials.yaml; the
/// test config listens on another port than 5000, which compose.yaml's healthcheck
/// (`healthcheck --config`) finds in the configuration.
#[tokio::test(flavor = "multi_thread")]
async fn compose_serves_from_its_volume_after_down_and_up() {
    require_root("the compose test");
    require_tool("docker-compose");
    require_tool("skopeo");
    let started = Instant::now();
    let binary = tokio::task::spawn_blocking(static_binary).await.unwrap();
    eprintln!(
        "static binary (cargo build, fresh or not): {:?}",
        started.elapsed()
    );

    // An upstream "Docker Hub" that wants a password.
    let (user, password) = ("hubuser", "s3cret-hub-token");
    let dist = Distribution::start_with(DistributionOptions {
        htpasswd: Some((user.into(), password.into())),
        ..Default::default()
    })
    .await;
    let img = Pusher::new(&dist.url())
        .basic_auth(user, password)
        .push_image(
            "library/deploytest",
            "v1",
            &ImageSpec::new(&[3000, 1_500_000, 4_000_000]),
        )
        .await;

    let port = free_port();
    let mirror = format!("http://127.0.0.1:{port}");
    let containerd = Containerd::start().await;
    let dockerd = Dockerd::start(containerd, &mirror).await;
    let docker_host = format!("unix://{}", dockerd.dir().join("docker.sock").display());

    // The image, from the `prebuilt` target.
    let staged = Staged::new(&binary);
    let image = format!("regmirror:deploy-test-{}", std::process::id());
    let started = Instant::now();
    let dockerfile = repo().join("deploy/Dockerfile");
    let build = dockerd
        .docker(&[
            "build",
            "--file",
            dockerfile.to_str().unwrap(),
            "--target",
            "prebuilt",
            "--build-arg",
            &format!("PREBUILT={}", staged.rel),
            "--tag",
            &image,
            repo().to_str().unwrap(),
        ])
        .await;
    build.assert_success();
    eprintln!("docker build --target prebuilt: {:?}", started.elapsed());
    let inspect = dockerd.image_inspect(&image).await.expect("built image");
    let config = &inspect["Config"];
    assert_eq!(config["User"], "65532:65532", "{config:#}");
    assert!(
        config["ExposedPorts"].get("5000/tcp").is_some(),
        "{config:#}"
    );
    assert!(
        config["Volumes"].get("/var/lib/regmirror").is_some(),
        "{config:#}"
    );
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/regmirror"])
    );
    let healthcheck = config["Healthcheck"]["Test"].to_string();
    assert!(healthcheck.contains("healthcheck"), "{config:#}");
    eprintln!(
        "image size: {} bytes",
        inspect["Size"].as_u64().unwrap_or_default()
    );

    // The configurations that ship with the image and the Kubernetes manifests are valid
    // inside the image, with the files they name (check-config reads them all).
    check_config_in_image(&dockerd, &image, &[]).await;
    let k8s_base = repo().join("deploy/kubernetes/base/config.yml");
    check_config_in_image(
        &dockerd,
        &image,
        &[(k8s_base.to_str().unwrap(), "/etc/regmirror/config.yml")],
    )
    .await;
    let scratch = tempdir("deploy-");
    let secret = yaml(
        &read("deploy/kubernetes/components/credentials/upstream-credentials.example.yaml"),
        "upstream-credentials.example.yaml",
    );
    let dockerconfigjson = scratch.path().join("dockerconfigjson");
    std::fs::write(
        &dockerconfigjson,
        secret["stringData"][".dockerconfigjson"]
            .as_str()
            .expect("stringData.\".dockerconfigjson\""),
    )
    .unwrap();
    set_mode(&dockerconfigjson, 0o444);
    let k8s_credentials = repo().join("deploy/kubernetes/components/credentials/config.yml");
    check_config_in_image(
        &dockerd,
        &image,
        &[
            (
                k8s_credentials.to_str().unwrap(),
                "/etc/regmirror/config.yml",
            ),
            (
                dockerconfigjson.to_str().unwrap(),
                "/run/secrets/regmirror/.dockerconfigjson",
            ),
        ],
    )
    .await;

    // compose's config with this machine's addresses; the upstream by name, resolved
    // through the container's /etc/hosts.
    let compose_config = read("deploy/compose/config.credentials.yml");
    for needle in ["listen: 0.0.0.0:5000", "url: https://registry-1.docker.io"] {
        assert!(
            compose_config.contains(needle),
            "deploy/compose/config.credentials.yml has no `{needle}`"
        );
    }
    let test_config = compose_config
        .replace("listen: 0.0.0.0:5000", &format!("listen: 127.0.0.1:{port}"))
        .replace(
            "url: https://registry-1.docker.io",
            &format!("url: http://upstream.regmirror.test:{}", dist_port(&dist)),
        );
    let config_path = scratch.path().join("config.yml");
    std::fs::write(&config_path, test_config).unwrap();
    set_mode(&config_path, 0o444);
    // The secret as the compose.yaml comment says to store it: owned by 65532, mode 0400.
    let token_path = scratch.path().join("dockerhub-token");
    std::fs::write(&token_path, password).unwrap();
    std::os::unix::fs::chown(&token_path, Some(65532), Some(65532)).unwrap();
    set_mode(&token_path, 0o400);

    let mut project = ComposeProject {
        project: format!("regmirror-deploy-{}", std::process::id()),
        directory: repo().to_owned(),
        files: vec![
            repo().join("compose.yaml"),
            repo().join("compose.credentials.yaml"),
            repo().join("tests/deploy/compose.test.yaml"),
        ],
        docker_host: docker_host.clone(),
        env: vec![
            ("DOCKERHUB_USERNAME".into(), user.into()),
            (
                "DOCKERHUB_TOKEN_FILE".into(),
                token_path.display().to_string(),
            ),
            ("REGMIRROR_TEST_IMAGE".into(), image.clone()),
            (
                "REGMIRROR_TEST_CONFIG".into(),
                config_path.display().to_string(),
            ),
        ],
        image: image.clone(),
        env_file: None,
    };
    project.render_for_host_network(scratch.path()).await;

    // First life: cold cache.
    project
        .run(&["up", "--detach", "--no-build", "regmirror"])
        .await
        .assert_success();
    let healthy = project.wait_healthy(Duration::from_secs(60)).await;
    eprintln!("first `up`: healthy after {healthy:?}");
    let container = project.inspect_container().await;
    let host_config = &container["HostConfig"];
    assert_eq!(host_config["ReadonlyRootfs"], true, "{host_config:#}");
    assert_eq!(host_config["RestartPolicy"]["Name"], "unless-stopped");
    assert!(
        host_config["CapDrop"].to_string().contains("ALL"),
        "{host_config:#}"
    );
    let mounts = container["Mounts"].to_string();
    assert!(
        mounts.contains("/run/secrets/dockerhub-token"),
        "the secret is not mounted: {mounts}"
    );

    // Client 1: dockerd, whose daemon.json is deploy/clients/docker/daemon.json.
    let tag = "deploytest:v1";
    dockerd.docker_pull(tag).await.assert_success();
    let repo_digest = format!("deploytest@{}", img.manifest_digest);
    assert!(
        dockerd.repo_digests(tag).await.contains(&repo_digest),
        "{:?}",
        dockerd.repo_digests(tag).await
    );
    // Client 2: containerd with deploy/clients/containerd/docker.io/hosts.toml.
    let ctd = Containerd::start().await;
    let hosts = tempdir("hosts-");
    write_hosts_toml(hosts.path(), "docker.io", &mirror);
    ctd.ctr_pull(hosts.path(), "docker.io/library/deploytest:v1")
        .await
        .assert_success();
    assert_eq!(
        ctd.image_digest("docker.io/library/deploytest:v1")
            .await
            .as_deref(),
        Some(img.manifest_digest.as_str())
    );
    let blob_gets_first_life = dist.blob_gets().await;
    let manifest_gets_first_life = dist.manifest_gets().await;
    for digest in img.blob_digests() {
        let authorized = dist
            .requests()
            .await
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with(&digest) && r.status == 200);
        assert!(
            authorized,
            "blob {digest} was never fetched with the secret's credentials:\n{:#?}",
            dist.request_lines().await
        );
    }

    // `down` keeps the named volume.
    project.run(&["down"]).await.assert_success();
    let volume = format!("{}_regmirror-data", project.project);
    let volumes = run(
        project.docker(&["volume", "ls", "--quiet"]),
        Duration::from_secs(30),
    )
    .await;
    volumes.assert_success();
    assert!(
        volumes.stdout.lines().any(|l| l.trim() == volume),
        "volume {volume} is gone after `down`: {volumes}"
    );

    // Second life: everything from the volume.
    project
        .run(&["up", "--detach", "--no-build", "regmirror"])
        .await
        .assert_success();
    let healthy = project.wait_healthy(Duration::from_secs(60)).await;
    eprintln!("second `up`: healthy after {healthy:?}");
    dockerd
        .docker(&["rmi", "--force", tag])
        .await
        .assert_success();
    dockerd.docker_pull(tag).await.assert_success();
    assert!(dockerd.repo_digests(tag).await.contains(&repo_digest));
    let copy = scratch.path().join("copy");
    skopeo_copy_to_dir(
        &format!("docker://127.0.0.1:{port}/library/deploytest:v1"),
        &copy,
        false,
    )
    .await
    .assert_success();
    assert_skopeo_dir_holds(&copy, &img, "manifest.json");
    let new_blob_gets = dist.blob_gets().await - blob_gets_first_life;
    let new_manifest_gets = dist.manifest_gets().await - manifest_gets_first_life;
    eprintln!(
        "upstream GETs: first life {blob_gets_first_life} blob, {manifest_gets_first_life} \
         manifest; second life {new_blob_gets} blob, {new_manifest_gets} manifest"
    );
    assert_eq!(
        new_blob_gets,
        0,
        "blobs were fetched again after down/up:\n{:#?}",
        dist.request_lines().await
    );
    drop(project);
    drop(ctd);
    drop(dockerd);
    drop(staged);
}

/// Distinct blobs the upstream container's log shows served in full.
async fn served_blobs(project: &ComposeProject, upstream: &str) -> usize {
    upstream_requests(project, upstream)
        .await
        .iter()
        .filter(|r| r.method == "GET" && r.status == 200 && r.is_blob())
        .map(|r| r.path.clone())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Sends SIGCONT to a container frozen with SIGSTOP when dropped (also when a test fails).
struct Thaw {
    docker_host: String,
    container: String,
}

impl Drop for Thaw {
    fn drop(&mut self) {
        let mut cmd = std::process::Command::new(docker_cli());
        cmd.arg("-H")
            .arg(&self.docker_host)
            .args(["kill", "--signal", "CONT", &self.container]);
        if let Err(error) = cmd.output() {
            eprintln!("cannot thaw {}: {error}", self.container);
        }
    }
}

/// A fresh clone, as a new user runs it: `docker-compose up --detach` with compose.yaml as
/// it is, no `.env`, no variable and no secret file, starts a healthy anonymous mirror
/// published on :5000 by default (the test moves it to a free loopback port with REGMIRROR_PORT,
/// through the engine's port proxy, on the project's own bridge network).
/// Then compose's config.yml, unchanged but for a local upstream's URL (there are no
/// credentials in it to remove), serves a real dockerd's pulls through the same compose.yaml
/// with the test's host-network override.
#[tokio::test(flavor = "multi_thread")]
async fn compose_starts_with_zero_setup_and_serves_pulls() {
    require_root("the compose test");
    require_tool("docker-compose");
    let binary = tokio::task::spawn_blocking(static_binary).await.unwrap();
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/zerosetup", "v1", &[3000, 800_000]).await;
    // compose.yaml publishes 5000 unless REGMIRROR_PORT says otherwise: the test takes a free
    // port on loopback, so nothing it starts listens beyond this machine.
    let published = format!("127.0.0.1:{}", free_port());
    let mirror = format!("http://{published}");
    let mirror = mirror.as_str();
    let containerd = Containerd::start().await;
    // The port proxy publishes ports without iptables rules; `--ip` keeps them on loopback.
    let dockerd = Dockerd::start_with_args(
        containerd,
        mirror,
        &["--userland-proxy=true".into(), "--ip=127.0.0.1".into()],
    )
    .await;
    let docker_host = format!("unix://{}", dockerd.dir().join("docker.sock").display());

    // compose.yaml's own image name, so `up` finds it instead of building from source.
    let staged = Staged::new(&binary);
    let image = "regmirror:latest";
    let dockerfile = repo().join("deploy/Dockerfile");
    dockerd
        .docker(&[
            "build",
            "--file",
            dockerfile.to_str().unwrap(),
            "--target",
            "prebuilt",
            "--build-arg",
            &format!("PREBUILT={}", staged.rel),
            "--tag",
            image,
            repo().to_str().unwrap(),
        ])
        .await
        .assert_success();

    let scratch = tempdir("zero-setup-");
    let empty_env = scratch.path().join("empty.env");
    std::fs::write(&empty_env, "").unwrap();
    let fresh = ComposeProject {
        project: format!("regmirror-zero-{}", std::process::id()),
        directory: repo().to_owned(),
        // No --file: compose finds compose.yaml itself.
        files: Vec::new(),
        docker_host: docker_host.clone(),
        env: vec![("REGMIRROR_PORT".into(), published.clone())],
        image: image.to_owned(),
        env_file: Some(empty_env.clone()),
    };
    fresh.run(&["up", "--detach"]).await.assert_success();
    let healthy = fresh.wait_healthy(Duration::from_secs(90)).await;
    eprintln!("zero-setup `up`: healthy after {healthy:?}");
    let http = http();
    for path in ["/v2/", "/healthz"] {
        let response = http
            .get(format!("{mirror}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {mirror}{path}: {e}"));
        assert_eq!(response.status(), 200, "{path}");
    }
    let container = fresh.inspect_container().await;
    let mounts = container["Mounts"].to_string();
    assert!(!mounts.contains("/run/secrets"), "{mounts}");
    let env = container["Config"]["Env"].to_string();
    assert!(!env.contains("DOCKERHUB"), "{env}");
    // The probe went where the configuration listens.
    let health = container["State"]["Health"]["Log"].to_string();
    assert!(
        health.contains("http://127.0.0.1:5000/healthz: HTTP/1.0 200"),
        "{health}"
    );
    fresh.run(&["down", "--volumes"]).await.assert_success();

    // Pulls: the same compose.yaml, its config.yml with a local upstream.
    let compose_config = read("deploy/compose/config.yml");
    for needle in ["listen: 0.0.0.0:5000", "url: https://registry-1.docker.io"] {
        assert!(
            compose_config.contains(needle),
            "config.yml has no `{needle}`"
        );
    }
    let test_config = compose_config
        .replace("listen: 0.0.0.0:5000", &format!("listen: {published}"))
        .replace(
            "url: https://registry-1.docker.io",
            &format!("url: http://upstream.regmirror.test:{}", dist_port(&dist)),
        );
    let config_path = scratch.path().join("config.yml");
    std::fs::write(&config_path, test_config).unwrap();
    set_mode(&config_path, 0o444);
    let mut project = ComposeProject {
        project: format!("regmirror-zero-pull-{}", std::process::id()),
        directory: repo().to_owned(),
        files: vec![
            repo().join("compose.yaml"),
            repo().join("tests/deploy/compose.test.yaml"),
        ],
        docker_host,
        env: vec![
            ("REGMIRROR_TEST_IMAGE".into(), image.to_owned()),
            (
                "REGMIRROR_TEST_CONFIG".into(),
                config_path.display().to_string(),
            ),
        ],
        image: image.to_owned(),
        env_file: Some(empty_env),
    };
    project.render_for_host_network(scratch.path()).await;
    project
        .run(&["up", "--detach", "--no-build", "regmirror"])
        .await
        .assert_success();
    project.wait_healthy(Duration::from_secs(90)).await;
    let tag = "zerosetup:v1";
    dockerd.docker_pull(tag).await.assert_success();
    assert!(
        dockerd
            .repo_digests(tag)
            .await
            .contains(&format!("zerosetup@{}", img.manifest_digest)),
        "{:?}",
        dockerd.repo_digests(tag).await
    );
    for d in img.blob_digests() {
        assert_eq!(dist.blob_gets_for(&d).await, 1, "upstream GETs of {d}");
    }
    drop(project);
    drop(fresh);
    drop(dockerd);
    drop(staged);
}

// ---------------------------------------------------------------------------------------
// deploy/compose/cluster.yaml on a real engine
// ---------------------------------------------------------------------------------------

/// Fills `dir`, the build context of a `FROM scratch` test image, with `binary` at `at` and
/// the shared libraries and loader `ldd` names, each at its own path.
fn rootfs_with(dir: &Path, binary: &Path, at: &str) {
    let copy = |from: &Path, to: &str| {
        let dest = dir.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // Follows symbolic links: the library's content lands at the path the loader asks for.
        std::fs::copy(from, &dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), dest.display()));
    };
    copy(binary, at);
    let mut ldd = Command::new(require_tool("ldd"));
    ldd.arg(binary);
    let out = run_blocking(ldd, Duration::from_secs(30));
    out.assert_success();
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, `/lib64/ld-linux-x86-64.so.2
    // (0x…)`; the vDSO has no file.
    for line in out.stdout.lines() {
        let file = line.split_once("=>").map_or(line, |(_, rest)| rest);
        if let Some(path) = file
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            copy(Path::new(path), path);
        }
    }
}

/// `docker build` of one of the test images under tests/deploy/ from the context `context`.
async fn build_test_image(dockerd: &Dockerd, dockerfile: &str, context: &Path, tag: &str) {
    let started = Instant::now();
    let dockerfile = repo().join("tests/deploy").join(dockerfile);
    dockerd
        .docker(&[
            "build",
            "--file",
            dockerfile.to_str().unwrap(),
            "--tag",
            tag,
            context.to_str().unwrap(),
        ])
        .await
        .assert_success();
    eprintln!("docker build {tag}: {:?}", started.elapsed());
}

/// The generated secrets of deploy/compose/cluster.yaml (deploy/compose/secrets/cluster/):
/// removed on drop if the test's garage-init.sh created them, kept if a developer's own
/// cluster had them already (garage-init.sh reuses them).
struct ClusterSecrets {
    dir: PathBuf,
    created: bool,
}

impl ClusterSecrets {
    fn new() -> Self {
        let dir = repo().join("deploy/compose/secrets/cluster");
        let created = !dir.exists();
        ClusterSecrets { dir, created }
    }
}

impl Drop for ClusterSecrets {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Every request the upstream container completed, from its JSON log (`docker logs`),
/// parsed as the host-side [`Distribution`] parses its log file.
async fn upstream_requests(project: &ComposeProject, id: &str) -> Vec<Request> {
    let out = run(project.docker(&["logs", id]), Duration::from_secs(30)).await;
    out.assert_success();
    common::distribution::parse_requests(&format!("{}\n{}", out.stdout, out.stderr))
}

/// deploy/compose/cluster.yaml, started as its header tells a user to: `bash
/// deploy/compose/garage-init.sh`, then `docker-compose -f deploy/compose/cluster.yaml up -d`,
/// on a real dockerd whose only images are built here from local binaries (the static
/// regmirror through deploy/Dockerfile's `prebuilt`, Garage from target/tools, Debian's nginx
/// and docker-registry): nothing is pulled. The override tests/deploy/cluster.test.yaml adds
/// the upstream registry on the project's network and the test's copies of the
/// configurations (the upstream's URL; nginx.conf without `resolve`, which Debian's nginx
/// 1.22 lacks). A second dockerd pulls an eight-layer image through the published front; once
/// the upstream has served the first blob, one Garage node and one replica are stopped (no
/// grace), and the pull still completes with the pushed digest, each blob fetched upstream
/// at most twice, every blob in the bucket of the two remaining Garage nodes.
/// `docker-compose down -v` leaves no container, network or volume behind.
///
/// The header's `up -d --build` is run without `--build`: the default build stage needs the
/// rust image, which cannot be pulled here; compose takes the `regmirror:latest` built from
/// the same Dockerfile's `prebuilt` stage.
#[tokio::test(flavor = "multi_thread")]
async fn compose_cluster_starts_and_pulls_through_a_stopped_node_and_replica() {
    require_root("the compose cluster test");
    require_tool("docker-compose");
    let started = Instant::now();
    let binary = tokio::task::spawn_blocking(static_binary).await.unwrap();

    // The upstream's content, pushed through a registry on the host into a directory that
    // the upstream container then serves.
    let upstream_root = tempdir("cluster-upstream-");
    let storage = upstream_root.path().join("data");
    let layer = 16 << 20;
    let img = {
        let dist = Distribution::start_with(DistributionOptions {
            root: Some(storage.clone()),
            ..Default::default()
        })
        .await;
        Pusher::new(&dist.url())
            .push_image(
                "library/clustertest",
                "v1",
                &ImageSpec::new(&[3000, layer, layer, layer, layer, layer, layer, layer, layer]),
            )
            .await
    };

    let published = format!("127.0.0.1:{}", free_port());
    let mirror = format!("http://{published}");
    let containerd = Containerd::start().await;
    // The port proxy publishes ports without iptables rules; `--ip` keeps them on loopback.
    let dockerd = Dockerd::start_with_args(
        containerd,
        &mirror,
        &["--userland-proxy=true".into(), "--ip=127.0.0.1".into()],
    )
    .await;
    let docker_host = format!("unix://{}", dockerd.dir().join("docker.sock").display());

    // The images: cluster.yaml's own name for regmirror, the others through its variables.
    let staged = Staged::new(&binary);
    let dockerfile = repo().join("deploy/Dockerfile");
    dockerd
        .docker(&[
            "build",
            "--file",
            dockerfile.to_str().unwrap(),
            "--target",
            "prebuilt",
            "--build-arg",
            &format!("PREBUILT={}", staged.rel),
            "--tag",
            "regmirror:latest",
            repo().to_str().unwrap(),
        ])
        .await
        .assert_success();
    let contexts = tempdir("cluster-images-");
    let garage_image = "regmirror-test/garage:local";
    let garage_ctx = contexts.path().join("garage");
    rootfs_with(&garage_ctx, &common::garage::garage_bin(), "/garage");
    build_test_image(&dockerd, "garage.Dockerfile", &garage_ctx, garage_image).await;
    let nginx_image = "regmirror-test/nginx:local";
    let nginx_ctx = contexts.path().join("nginx");
    rootfs_with(&nginx_ctx, &require_tool("nginx"), "/usr/sbin/nginx");
    std::fs::create_dir_all(nginx_ctx.join("etc")).unwrap();
    std::fs::write(
        nginx_ctx.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    )
    .unwrap();
    // nginx's default worker group is `nogroup` on Debian's build, `nobody` elsewhere.
    std::fs::write(
        nginx_ctx.join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n",
    )
    .unwrap();
    for dir in ["tmp", "var/cache/nginx"] {
        std::fs::create_dir_all(nginx_ctx.join(dir)).unwrap();
    }
    build_test_image(&dockerd, "nginx.Dockerfile", &nginx_ctx, nginx_image).await;
    let registry_image = "regmirror-test/registry:local";
    let registry_ctx = contexts.path().join("registry");
    rootfs_with(
        &registry_ctx,
        &require_tool("docker-registry"),
        "/usr/bin/docker-registry",
    );
    build_test_image(
        &dockerd,
        "registry.Dockerfile",
        &registry_ctx,
        registry_image,
    )
    .await;
    eprintln!("static binary and four images: {:?}", started.elapsed());

    // The test's copies of the configurations.
    let scratch = tempdir("cluster-");
    let config = read("deploy/compose/config.cluster.yml");
    let hub = "url: https://registry-1.docker.io";
    assert!(config.contains(hub), "config.cluster.yml has no `{hub}`");
    let config_path = scratch.path().join("config.yml");
    std::fs::write(
        &config_path,
        config.replace(hub, "url: http://upstream:5000"),
    )
    .unwrap();
    set_mode(&config_path, 0o444);
    let nginx = read("deploy/compose/nginx.conf");
    assert_eq!(nginx.matches(" resolve ").count(), 6, "{nginx}");
    let nginx_path = scratch.path().join("nginx.conf");
    std::fs::write(&nginx_path, nginx.replace(" resolve ", " ")).unwrap();
    set_mode(&nginx_path, 0o444);
    let registry_config = scratch.path().join("registry.yml");
    std::fs::write(
        &registry_config,
        "version: 0.1\n\
         log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: /var/lib/registry\n\
         \x20 maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\n\
         http:\n  addr: 0.0.0.0:5000\n  secret: regmirror-test-secret\n",
    )
    .unwrap();
    set_mode(&registry_config, 0o444);

    let project_name = format!("regmirror-cluster-{}", std::process::id());
    let secrets = ClusterSecrets::new();
    let project = ComposeProject {
        project: project_name.clone(),
        directory: repo().join("deploy/compose"),
        files: vec![
            repo().join("deploy/compose/cluster.yaml"),
            repo().join("tests/deploy/cluster.test.yaml"),
        ],
        docker_host: docker_host.clone(),
        env: [
            // cluster.yaml's own variables.
            ("GARAGE_IMAGE", garage_image.to_owned()),
            ("NGINX_IMAGE", nginx_image.to_owned()),
            ("REGMIRROR_PORT", published.clone()),
            // The override's.
            ("UPSTREAM_TEST_IMAGE", registry_image.to_owned()),
            (
                "UPSTREAM_TEST_CONFIG",
                registry_config.display().to_string(),
            ),
            ("UPSTREAM_TEST_ROOT", storage.display().to_string()),
            ("REGMIRROR_TEST_CONFIG", config_path.display().to_string()),
            ("REGMIRROR_TEST_NGINX", nginx_path.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        image: "regmirror:latest".into(),
        env_file: None,
    };

    // 1. `bash deploy/compose/garage-init.sh`, with this engine and project, and the files
    // `up` is given (COMPOSE_FILE): Garage started from other files would be recreated by
    // `up`.
    let compose_file = std::env::join_paths(&project.files)
        .unwrap()
        .into_string()
        .unwrap();
    let garage_init = || {
        let mut init = Command::new(require_tool("bash"));
        init.arg(repo().join("deploy/compose/garage-init.sh"))
            .current_dir(repo())
            .env("DOCKER_HOST", &docker_host)
            .env("COMPOSE_PROJECT_NAME", &project_name)
            .env("COMPOSE_FILE", &compose_file)
            .envs(project.env.iter().map(|(k, v)| (k, v)));
        no_proxy(&mut init);
        run(init, Duration::from_secs(300))
    };
    let step = Instant::now();
    let out = garage_init().await;
    out.assert_success();
    assert!(out.stdout.contains("Garage is ready"), "{out}");
    eprintln!("garage-init.sh: {:?}\n{}", step.elapsed(), out.stdout);
    // Run again, as after `down`/`up`: nothing to create, the nodes reconnected.
    let out = garage_init().await;
    out.assert_success();
    assert!(!out.stdout.contains("generated"), "{out}");
    let mut garage_nodes = Vec::new();
    for node in ["garage1", "garage2", "garage3"] {
        garage_nodes.push((node, project.service_container(node).await));
    }

    // 2. `docker-compose -f deploy/compose/cluster.yaml up -d`.
    let step = Instant::now();
    let up = project.run(&["up", "--detach"]).await;
    up.assert_success();
    // Garage as garage-init.sh left it: recreated, its nodes would have addresses the
    // others do not know.
    assert!(!up.stderr.contains("Recreating"), "{up}");
    for (node, id) in &garage_nodes {
        assert_eq!(
            &project.service_container(node).await,
            id,
            "{node} was replaced"
        );
    }
    for replica in ["regmirror1", "regmirror2", "regmirror3"] {
        project
            .wait_service_healthy(replica, Duration::from_secs(120))
            .await;
    }
    // The front answers once nginx has started (it restarts until every name resolves).
    let http = http();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match http.get(format!("{mirror}/v2/")).send().await {
            Ok(r) if r.status() == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "the front does not answer on {mirror}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "`up -d`: replicas healthy, front answering after {:?}",
        step.elapsed()
    );
    let lb = project.service_container("lb").await;
    let restarts = run(
        project.docker(&["inspect", "--format", "{{.RestartCount}}", &lb]),
        Duration::from_secs(30),
    )
    .await;
    eprintln!(
        "lb restarts before every name resolved: {}",
        restarts.stdout.trim()
    );
    let upstream = project.service_container("upstream").await;
    let garage2 = project.service_container("garage2").await;
    let regmirror2 = project.service_container("regmirror2").await;

    // 3. A pull through the front; one Garage node and one replica stop under it.
    let step = Instant::now();
    let tag = "clustertest:v1";
    let mut pull_cmd = Command::new(docker_cli());
    pull_cmd
        .arg("-H")
        .arg(&docker_host)
        .args(["pull", tag])
        .env("DOCKER_CONFIG", dockerd.dir().join("cli"));
    no_proxy(&mut pull_cmd);
    let pull = tokio::spawn(run(pull_cmd, Duration::from_secs(600)));
    // The event: the upstream has served the first blob (the config, or a layer), so
    // dockerd has the manifest and is downloading the layers through the replicas.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if served_blobs(&project, &upstream).await > 0 {
            break;
        }
        assert!(
            !pull.is_finished(),
            "the pull ended before any blob was served"
        );
        assert!(Instant::now() < deadline, "no blob reached the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The upstream is frozen (SIGSTOP reaches a container's init from the host) while the
    // two containers stop: with blobs still to come from it, the pull cannot end meanwhile,
    // however slow the machine or `docker stop` is. Thawed afterwards.
    run(
        project.docker(&["kill", "--signal", "STOP", &upstream]),
        Duration::from_secs(60),
    )
    .await
    .assert_success();
    let thaw = Thaw {
        docker_host: docker_host.clone(),
        container: upstream.clone(),
    };
    let blobs = img.blob_digests().len();
    let served_at_freeze = served_blobs(&project, &upstream).await;
    assert!(
        served_at_freeze < blobs,
        "every blob had come from the upstream before it froze: make the layers larger"
    );
    run(
        project.docker(&["stop", "--time", "0", &garage2, &regmirror2]),
        Duration::from_secs(60),
    )
    .await
    .assert_success();
    assert!(
        !pull.is_finished(),
        "the pull ended with blobs still upstream"
    );
    eprintln!(
        "stopped garage2 and regmirror2 {:?} into the pull, with {served_at_freeze} of {blobs} \
         blobs from the upstream so far",
        step.elapsed(),
    );
    drop(thaw);
    let out = pull.await.unwrap();
    out.assert_success();
    // A measurement: nginx's 2 s connect timeout keeps a stopped node from stalling
    // requests for its default 60 s.
    eprintln!("pull: {:?}", step.elapsed());
    let repo_digest = format!("clustertest@{}", img.manifest_digest);
    assert!(
        dockerd.repo_digests(tag).await.contains(&repo_digest),
        "{:?}",
        dockerd.repo_digests(tag).await
    );
    let ps = project.run(&["ps"]).await;
    ps.assert_success();
    for stopped in ["garage2", "regmirror2"] {
        let line = ps
            .stdout
            .lines()
            .find(|l| l.contains(&format!("_{stopped}_")))
            .unwrap_or_else(|| panic!("no {stopped} in {ps}"));
        assert!(line.contains("Exit"), "{stopped} came back: {line}");
    }

    // The shared tier works with one Garage node stopped: the blobs reach the bucket
    // (written by the replicas after they served them, hence the wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    let objects = loop {
        let info = project
            .run(&[
                "exec",
                "-T",
                "garage1",
                "/garage",
                "bucket",
                "info",
                "regmirror",
            ])
            .await;
        info.assert_success();
        let objects: usize = info
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("Objects:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no object count in {info}"));
        if objects >= img.blob_digests().len() || Instant::now() > deadline {
            break objects;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Reported, not asserted in full: a blob whose upload was cut by the stopped node or
    // replica stays in the hot tier of the replica that served it (in one run 9 of 10 blobs
    // reached the bucket).
    eprintln!(
        "objects in the bucket: {objects} for {} blobs",
        img.blob_digests().len()
    );
    assert!(
        objects > 0,
        "nothing reached the bucket with one Garage node down"
    );

    // The upstream, protected: each blob fetched once, twice where a fetch died with its
    // replica.
    let requests = upstream_requests(&project, &upstream).await;
    let mut counts = Vec::new();
    for digest in img.blob_digests() {
        let gets = requests
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&digest))
            .count();
        counts.push(gets);
        assert!(
            (1..=2).contains(&gets),
            "{gets} upstream GETs of {digest}:\n{requests:#?}"
        );
    }
    let manifest_gets = requests
        .iter()
        .filter(|r| r.method == "GET" && r.is_manifest())
        .count();
    eprintln!(
        "upstream GETs per blob (config, then layers): {counts:?}; manifest GETs: {manifest_gets}"
    );

    // 4. `docker-compose down -v` leaves nothing of the project.
    project.run(&["down", "--volumes"]).await.assert_success();
    let label = format!("label=com.docker.compose.project={project_name}");
    for what in [
        vec!["ps", "--all", "--quiet", "--filter", &label],
        vec!["network", "ls", "--quiet", "--filter", &label],
        vec!["volume", "ls", "--quiet", "--filter", &label],
    ] {
        let out = run(project.docker(&what), Duration::from_secs(30)).await;
        out.assert_success();
        assert_eq!(out.stdout.trim(), "", "left after `down -v`: {out}");
    }
    let volumes = run(
        project.docker(&["volume", "ls", "--quiet"]),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !volumes.stdout.contains(&project_name),
        "volumes left after `down -v`: {volumes}"
    );
    eprintln!("whole test: {:?}", started.elapsed());
    drop(project);
    drop(secrets);
    drop(dockerd);
    drop(staged);
}

/// `regmirror healthcheck --config FILE` probes where FILE says the server listens: another
/// port than 5000, HTTPS with `tls` (the certificate is not verified: the probe talks to its
/// own listener), and with `tls.client_ca` the probe's client certificate.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_follows_the_configuration() {
    let dir = tempdir("healthcheck-");
    let ca = common::pki::Ca::new(dir.path(), "hc-ca");
    let server = ca.server("mirror");
    let clients = common::pki::Ca::new(dir.path(), "hc-clients");
    let probe = clients.client("probe");
    let dist = Distribution::start().await;
    let check = |args: Vec<String>| async move {
        let mut cmd = Command::new(Regmirror::binary());
        cmd.arg("healthcheck").args(["--timeout", "5"]).args(args);
        run(cmd, Duration::from_secs(30)).await
    };
    let config_arg = |rm: &Regmirror| {
        vec![
            "--config".to_owned(),
            rm.config_path().display().to_string(),
        ]
    };
    let tls_config = |extra: &str| {
        format!(
            "listen: @LISTEN@\nstorage: {{ root: @ROOT@ }}\ndefault_upstream: docker.io\n\
             upstreams:\n  docker.io: {{ url: '{}' }}\n\
             tls: {{ cert: {:?}, key: {:?}{extra} }}\n",
            dist.url(),
            server.cert,
            server.key
        )
    };

    let plain = Regmirror::with_docker_io(&dist.url()).await;
    let out = check(config_arg(&plain)).await;
    assert!(out.success, "{out}");
    assert!(
        out.stdout
            .starts_with(&format!("{}/healthz: HTTP/1.0 200", plain.url())),
        "{out}"
    );

    let https = Regmirror::start(&tls_config("")).await;
    assert!(https.url().starts_with("https://"));
    let out = check(config_arg(&https)).await;
    assert!(out.success, "{out}");
    assert!(
        out.stdout
            .starts_with(&format!("{}/healthz: HTTP/1.0 200", https.url())),
        "{out}"
    );

    let mtls = Regmirror::start(&tls_config(&format!(", client_ca: {:?}", clients.cert))).await;
    let out = check(config_arg(&mtls)).await;
    assert!(!out.success, "no client certificate: {out}");
    let mut args = config_arg(&mtls);
    args.extend([
        "--client-cert".to_owned(),
        probe.cert.display().to_string(),
        "--client-key".to_owned(),
        probe.key.display().to_string(),
    ]);
    let out = check(args).await;
    assert!(out.success, "{out}");

    // The default still probes http://127.0.0.1:5000, and an unreadable config is refused.
    let out = check(vec!["--config".into(), "/nonexistent/config.yml".into()]).await;
    assert_eq!(out.code, Some(2), "{out}");
}

/// `docker run --rm --network none IMAGE check-config` with `mounts` (host file, container
/// path) bind-mounted read-only.
async fn check_config_in_image(dockerd: &Dockerd, image: &str, mounts: &[(&str, &str)]) {
    let mut args: Vec<String> = ["run", "--rm", "--network", "none"]
        .map(String::from)
        .to_vec();
    for (host, container) in mounts {
        args.push("--volume".into());
        args.push(format!("{host}:{container}:ro"));
    }
    args.extend(
        [
            image,
            "check-config",
            "--config",
            "/etc/regmirror/config.yml",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = dockerd.docker(&args).await;
    assert!(out.success, "check-config in the image failed: {out}");
    assert!(out.stdout.contains("configuration ok"), "{out}");
}

fn dist_port(dist: &Distribution) -> u16 {
    dist.host().rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Bind-mounted files keep their host owner and mode, so uid 65532 must be able to read them.
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

// ---------------------------------------------------------------------------------------
// compose.yaml without an engine
// ---------------------------------------------------------------------------------------

/// `docker-compose config` accepts compose.yaml with the `monitoring` profile, and
/// `promtool` accepts the Prometheus configuration it mounts. compose.yaml needs no
/// variable, `.env` or secret; compose.credentials.yaml adds them and refuses to run without
/// the user name.
#[test]
fn compose_file_and_monitoring_config_validate() {
    let scratch = tempdir("compose-");
    // A developer's .env must not supply anything: an empty one, as in a fresh clone.
    let empty_env = scratch.path().join("empty.env");
    std::fs::write(&empty_env, "").unwrap();
    let compose = |files: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(require_tool("docker-compose"));
        cmd.current_dir(repo()).arg("--env-file").arg(&empty_env);
        for file in files {
            cmd.args(["--file", file]);
        }
        cmd.args(["--profile", "monitoring", "config"])
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKERHUB_USERNAME")
            .env_remove("DOCKERHUB_TOKEN_FILE")
            .envs(env.iter().copied());
        run_blocking(cmd, Duration::from_secs(60))
    };
    let out = compose(&["compose.yaml"], &[]);
    out.assert_success();
    let rendered = yaml(&out.stdout, "docker-compose config");
    for service in ["regmirror", "prometheus", "grafana"] {
        assert!(
            rendered["services"].get(service).is_some(),
            "no service {service}: {}",
            out.stdout
        );
    }
    let regmirror = &rendered["services"]["regmirror"];
    assert_eq!(regmirror["restart"], "unless-stopped");
    // The healthcheck probes where the mounted configuration listens.
    assert_eq!(
        regmirror["healthcheck"]["test"],
        serde_json::json!([
            "CMD",
            "/usr/local/bin/regmirror",
            "healthcheck",
            "--config",
            "/etc/regmirror/config.yml"
        ])
    );
    assert!(rendered["volumes"].get("regmirror-data").is_some());
    assert!(rendered.get("secrets").is_none(), "{}", out.stdout);
    assert!(regmirror.get("secrets").is_none(), "{}", out.stdout);
    assert!(!out.stdout.contains("DOCKERHUB"), "{}", out.stdout);

    // The credentials override: the user name is required, and says why.
    let out = compose(&["compose.yaml", "compose.credentials.yaml"], &[]);
    assert!(!out.success, "{out}");
    assert!(out.stderr.contains("DOCKERHUB_USERNAME"), "{out}");
    let out = compose(
        &["compose.yaml", "compose.credentials.yaml"],
        &[("DOCKERHUB_USERNAME", "someone")],
    );
    out.assert_success();
    let rendered = yaml(&out.stdout, "docker-compose config");
    let regmirror = &rendered["services"]["regmirror"];
    assert!(rendered["secrets"].get("dockerhub-token").is_some());
    assert_eq!(regmirror["environment"]["DOCKERHUB_USERNAME"], "someone");
    let volumes = regmirror["volumes"].to_string();
    assert!(volumes.contains("config.credentials.yml"), "{volumes}");
    assert!(
        !volumes.contains("compose/config.yml"),
        "one config mount: {volumes}"
    );

    // The two compose configurations differ only by the Docker Hub credentials.
    let anonymous = yaml(&read("deploy/compose/config.yml"), "config.yml");
    let mut credentials = yaml(
        &read("deploy/compose/config.credentials.yml"),
        "config.credentials.yml",
    );
    let hub = credentials["upstreams"]["docker.io"]
        .as_object_mut()
        .unwrap();
    assert_eq!(hub.remove("username").unwrap(), "${DOCKERHUB_USERNAME}");
    assert_eq!(
        hub.remove("password_file").unwrap(),
        "/run/secrets/dockerhub-token"
    );
    assert_eq!(anonymous, credentials);

    let mut promtool = Command::new(require_tool("promtool"));
    promtool
        .args(["check", "config"])
        .arg(repo().join("deploy/compose/monitoring/prometheus.yml"));
    run_blocking(promtool, Duration::from_secs(60)).assert_success();

    // Each shipped configuration is valid and keeps its data in the volume.
    for file in [
        "deploy/config.yml",
        "deploy/compose/config.yml",
        "deploy/compose/config.credentials.yml",
        "deploy/kubernetes/base/config.yml",
        "deploy/kubernetes/components/credentials/config.yml",
    ] {
        let config = Config::parse(&read(file), file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.storage.root,
            Path::new("/var/lib/regmirror"),
            "{file}"
        );
        assert_eq!(config.listen.port(), 5000, "{file}");
    }
}

/// `docker-compose config` on deploy/compose/cluster.yaml, from a fresh clone's state (no
/// `.env`, no variable, no generated secret), with `extra` variables.
fn compose_cluster_config(scratch: &Path, extra: &[(&str, &str)]) -> serde_json::Value {
    let empty_env = scratch.join("empty.env");
    std::fs::write(&empty_env, "").unwrap();
    let mut cmd = Command::new(require_tool("docker-compose"));
    cmd.current_dir(repo())
        .arg("--env-file")
        .arg(&empty_env)
        .args(["--file", "deploy/compose/cluster.yaml", "config"])
        .env_remove("DOCKER_HOST")
        .env_remove("REGMIRROR_PORT")
        .env_remove("GARAGE_IMAGE")
        .env_remove("NGINX_IMAGE")
        .envs(extra.iter().copied());
    let out = run_blocking(cmd, Duration::from_secs(60));
    out.assert_success();
    yaml(&out.stdout, "docker-compose config (cluster.yaml)")
}

/// The `server` addresses of `upstream NAME { … }` in an nginx configuration.
fn nginx_upstream(conf: &str, name: &str) -> Vec<String> {
    let start = conf
        .find(&format!("upstream {name} {{"))
        .unwrap_or_else(|| panic!("no `upstream {name}` in nginx.conf"));
    let block = &conf[start..];
    let block = &block[..block.find('}').unwrap()];
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(';')
                .to_owned()
        })
        .collect()
}

/// The (listen port, proxied upstream) of each `server { … }` block.
fn nginx_servers(conf: &str) -> Vec<(u16, String)> {
    conf.split("server {")
        .skip(1)
        .map(|block| {
            let listen = block
                .lines()
                .find_map(|l| l.trim().strip_prefix("listen "))
                .expect("a listen directive")
                .trim_end_matches(';')
                .parse()
                .expect("listen PORT");
            let upstream = block
                .lines()
                .find_map(|l| l.trim().strip_prefix("proxy_pass http://"))
                .expect("a proxy_pass")
                .trim_end_matches(';')
                .to_owned();
            (listen, upstream)
        })
        .collect()
}

/// deploy/compose/cluster.yaml is valid for `docker-compose` (1.29) and holds together: 3
/// Garage nodes with replication factor 3, 3 regmirror replicas built from deploy/Dockerfile,
/// each with its own hot-tier volume and the secrets their shared configuration reads, whose
/// `cluster.peers` are the replicas themselves; nginx publishes 5000 (REGMIRROR_PORT) and
/// spreads clients round robin, unbuffered, over the replicas and the replicas' S3 requests
/// over the Garage nodes; `nginx -t` accepts its configuration; garage-init.sh imports the key
/// the configuration uses and generates the secrets compose mounts.
#[test]
fn compose_cluster_file_and_load_balancer_validate() {
    let scratch = tempdir("compose-cluster-");
    let rendered = compose_cluster_config(scratch.path(), &[]);
    let services = rendered["services"].as_object().unwrap();
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "garage1",
            "garage2",
            "garage3",
            "lb",
            "regmirror1",
            "regmirror2",
            "regmirror3"
        ]
    );
    let secrets = rendered["secrets"].as_object().unwrap();
    let secrets_dir = repo().join("deploy/compose/secrets");
    for (name, secret) in secrets {
        let file = Path::new(secret["file"].as_str().unwrap());
        assert!(
            file.starts_with(&secrets_dir),
            "secret {name} comes from {}, outside the git-ignored {}",
            file.display(),
            secrets_dir.display()
        );
    }
    assert_eq!(
        read("deploy/compose/secrets/.gitignore")
            .lines()
            .find(|l| !l.starts_with('#')),
        Some("*"),
        "no generated secret can be committed"
    );
    let secret_names = |service: &serde_json::Value| -> Vec<String> {
        service["secrets"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|s| s["source"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let volume_at = |service: &serde_json::Value, target: &str| -> String {
        service["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .find_map(|v| {
                let mut parts = v.split(':');
                let source = parts.next()?;
                (parts.next()? == target).then(|| source.to_owned())
            })
            .unwrap_or_else(|| panic!("nothing mounted at {target}: {service:#}"))
    };

    // Garage: three nodes of one configuration, each with its own disks.
    let garage_toml = toml_to_json(&repo().join("deploy/compose/garage.toml"));
    assert_eq!(garage_toml["replication_factor"], 3);
    let rpc_secret_file = garage_toml["rpc_secret_file"].as_str().unwrap();
    let (_, s3_port) = host_port(garage_toml["s3_api"]["api_bind_addr"].as_str().unwrap());
    let mut garage_volumes = Vec::new();
    for node in ["garage1", "garage2", "garage3"] {
        let service = &services[node];
        assert!(
            service["image"]
                .as_str()
                .unwrap()
                .starts_with("dxflrs/garage:v2."),
            "{service:#}"
        );
        assert_eq!(
            Path::new(&volume_at(service, "/etc/garage.toml")),
            repo().join("deploy/compose/garage.toml")
        );
        let secret = secret_names(service);
        assert_eq!(
            secret
                .iter()
                .map(|s| format!("/run/secrets/{s}"))
                .collect::<Vec<_>>(),
            [rpc_secret_file],
            "{node} gets the RPC secret where garage.toml reads it"
        );
        garage_volumes.push(volume_at(service, "/var/lib/garage/meta"));
        garage_volumes.push(volume_at(service, "/var/lib/garage/data"));
    }
    let distinct: std::collections::BTreeSet<_> = garage_volumes.iter().collect();
    assert_eq!(distinct.len(), 6, "{garage_volumes:?}");

    // The replicas: one image, one configuration, a volume each.
    let config_text = read("deploy/compose/config.cluster.yml");
    let config = yaml(&config_text, "config.cluster.yml");
    let (_, listen_port) = host_port(config["listen"].as_str().unwrap());
    let (_, peer_port) = host_port(config["cluster"]["listen"].as_str().unwrap());
    let replicas = ["regmirror1", "regmirror2", "regmirror3"];
    let peers: Vec<String> = replicas
        .iter()
        .map(|r| format!("{r}:{peer_port}"))
        .collect();
    assert_eq!(
        config["cluster"]["peers"],
        serde_json::json!(peers),
        "cluster.peers lists every replica's peer channel"
    );
    let s3 = &config["storage"]["s3"];
    let mut data_volumes = Vec::new();
    for replica in replicas {
        let service = &services[replica];
        assert_eq!(service["build"]["context"], repo().to_str().unwrap());
        assert_eq!(service["build"]["dockerfile"], "deploy/Dockerfile");
        assert_eq!(service["user"], "65532:65532");
        assert_eq!(service["read_only"], true);
        assert_eq!(service["cap_drop"], serde_json::json!(["ALL"]));
        assert!(service["healthcheck"]["test"]
            .to_string()
            .contains("healthcheck"));
        assert_eq!(
            Path::new(&volume_at(service, "/etc/regmirror/config.yml")),
            repo().join("deploy/compose/config.cluster.yml")
        );
        data_volumes.push(volume_at(service, "/var/lib/regmirror"));
        let mounted: Vec<String> = secret_names(service)
            .iter()
            .map(|s| format!("/run/secrets/{s}"))
            .collect();
        for file in [
            &s3["secret_access_key_file"],
            &config["cluster"]["secret_file"],
        ] {
            let file = file.as_str().unwrap().to_owned();
            assert!(
                mounted.contains(&file),
                "{replica} lacks {file}: {mounted:?}"
            );
        }
    }
    let distinct: std::collections::BTreeSet<_> = data_volumes.iter().collect();
    assert_eq!(distinct.len(), 3, "a hot tier each: {data_volumes:?}");

    // nginx: published on 5000 by default, REGMIRROR_PORT elsewhere.
    let lb = &services["lb"];
    assert_eq!(lb["ports"][0]["published"], 5000, "{lb:#}");
    assert_eq!(lb["ports"][0]["target"], 5000, "{lb:#}");
    let moved = compose_cluster_config(scratch.path(), &[("REGMIRROR_PORT", "127.0.0.1:5999")]);
    assert_eq!(
        moved["services"]["lb"]["ports"][0],
        serde_json::json!("127.0.0.1:5999:5000/tcp")
    );
    // The published images by default; GARAGE_IMAGE and NGINX_IMAGE choose others (the
    // engine test's local builds).
    assert_eq!(lb["image"], "nginx:1.28-alpine", "{lb:#}");
    let local = compose_cluster_config(
        scratch.path(),
        &[
            ("GARAGE_IMAGE", "garage:local"),
            ("NGINX_IMAGE", "nginx:local"),
        ],
    );
    for node in ["garage1", "garage2", "garage3"] {
        assert_eq!(local["services"][node]["image"], "garage:local");
    }
    assert_eq!(local["services"]["lb"]["image"], "nginx:local");
    let nginx_path = volume_at(lb, "/etc/nginx/nginx.conf");
    assert_eq!(
        Path::new(&nginx_path),
        repo().join("deploy/compose/nginx.conf")
    );
    let nginx = read("deploy/compose/nginx.conf");
    // A stopped node or replica costs one short connect attempt before nginx marks it down,
    // not nginx's default 60 s (which stalled pulls in the compose cluster test).
    assert!(
        nginx
            .lines()
            .any(|l| l.trim() == "proxy_connect_timeout 2s;"),
        "nginx.conf sets no short proxy_connect_timeout"
    );
    let servers = nginx_servers(&nginx);
    let client_upstream = &servers
        .iter()
        .find(|(port, _)| *port == 5000)
        .expect("nginx listens on 5000")
        .1;
    assert_eq!(
        nginx_upstream(&nginx, client_upstream),
        replicas
            .iter()
            .map(|r| format!("{r}:{listen_port}"))
            .collect::<Vec<_>>()
    );
    // Round robin (nginx's default), and streamed.
    for balancing in ["ip_hash", "least_conn", "hash ", "random"] {
        assert!(!nginx.contains(balancing), "{balancing} in nginx.conf");
    }
    for directive in ["proxy_buffering off;", "proxy_request_buffering off;"] {
        assert!(nginx.contains(directive), "nginx.conf lacks `{directive}`");
    }
    // The replicas' S3 endpoint is nginx, in front of every Garage node.
    let endpoint = s3["endpoint"].as_str().unwrap();
    let (endpoint_host, endpoint_port) = host_port(endpoint.strip_prefix("http://").unwrap());
    assert_eq!(endpoint_host, "lb");
    let s3_upstream = &servers
        .iter()
        .find(|(port, _)| *port == endpoint_port)
        .unwrap_or_else(|| panic!("nginx does not listen on {endpoint_port}"))
        .1;
    assert_eq!(
        nginx_upstream(&nginx, s3_upstream),
        ["garage1", "garage2", "garage3"].map(|g| format!("{g}:{s3_port}"))
    );
    assert_eq!(s3["region"], garage_toml["s3_api"]["s3_region"]);

    // `nginx -t` with this machine's nginx: the compose names become loopback addresses,
    // and `resolve` goes (Debian's nginx 1.22 predates it; the image's 1.28 has it).
    let mut local = nginx.replace(" resolve ", " ");
    for name in replicas.iter().chain(&["garage1", "garage2", "garage3"]) {
        local = local.replace(&format!("{name}:"), "127.0.0.1:");
    }
    let prefix = scratch.path().join("nginx");
    std::fs::create_dir_all(&prefix).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, local).unwrap();
    let mut test = Command::new(require_tool("nginx"));
    test.arg("-t")
        .arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-c")
        .arg(&conf);
    let out = run_blocking(test, Duration::from_secs(30));
    assert!(out.success, "nginx -t: {out}");

    // garage-init.sh: valid shell, imports the key and creates the bucket the configuration
    // names, and generates every secret compose mounts.
    let mut syntax = Command::new(require_tool("bash"));
    syntax
        .arg("-n")
        .arg(repo().join("deploy/compose/garage-init.sh"));
    run_blocking(syntax, Duration::from_secs(30)).assert_success();
    let init = read("deploy/compose/garage-init.sh");
    for needle in [
        format!("key_id={}", s3["access_key_id"].as_str().unwrap()),
        format!("bucket={}", s3["bucket"].as_str().unwrap()),
    ] {
        assert!(init.contains(&needle), "garage-init.sh lacks `{needle}`");
    }
    for (name, secret) in secrets {
        let file = Path::new(secret["file"].as_str().unwrap());
        assert_eq!(
            file.parent().unwrap(),
            secrets_dir.join("cluster"),
            "{name}"
        );
        assert!(
            init.contains(&format!("secret {name} ")),
            "garage-init.sh does not generate {name}"
        );
    }
}

/// The cluster configurations that ship (the Kubernetes overlay's ConfigMap and compose's
/// config.cluster.yml) are valid regmirror configurations with `storage.s3` and `cluster`.
#[test]
fn cluster_configs_parse_as_regmirror_config() {
    let rendered = kustomize(&repo().join("deploy/kubernetes/overlays/cluster"));
    let docs = documents(&rendered);
    let k8s = find(&docs, "ConfigMap")["data"]["config.yml"]
        .as_str()
        .unwrap()
        .to_owned();
    for (file, text) in [
        ("cluster overlay ConfigMap config.yml", k8s),
        (
            "deploy/compose/config.cluster.yml",
            read("deploy/compose/config.cluster.yml"),
        ),
    ] {
        let config = Config::parse(&text, file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.storage.root,
            Path::new("/var/lib/regmirror"),
            "{file}"
        );
        assert_eq!(config.listen.port(), 5000, "{file}");
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

/// `kustomize build` (standalone, or kubectl's built-in one).
fn kustomize(dir: &Path) -> String {
    let mut cmd = match which("kustomize") {
        Some(k) => {
            let mut c = Command::new(k);
            c.arg("build");
            c
        }
        None => {
            let mut c = Command::new(require_tool("kubectl"));
            c.arg("kustomize");
            c
        }
    };
    cmd.arg(dir);
    let out = run_blocking(cmd, Duration::from_secs(120));
    out.assert_success();
    out.stdout
}

/// Every document of `rendered` against the Kubernetes OpenAPI schemas, strictly (unknown
/// fields are errors), with `kubernetes-validate` (PyPI; it ships the schemas: offline).
fn validate_against_schemas(rendered: &str, scratch: &Path, name: &str) {
    let file = scratch.join(format!("{name}.yaml"));
    std::fs::write(&file, rendered).unwrap();
    let mut probe = Command::new(require_tool("python3"));
    probe.args(["-c", "import kubernetes_validate"]);
    let out = run_blocking(probe, Duration::from_secs(60));
    assert!(
        out.success,
        "\n==== REQUIRED TOOL MISSING: the Python package kubernetes-validate ====\n\
         Run `bash tests/run.sh` (it installs it) or `python3 -m pip install \
         kubernetes-validate==1.37.0`.\n{out}"
    );
    let mut cmd = Command::new(require_tool("python3"));
    cmd.args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .arg(&file);
    let out = run_blocking(cmd, Duration::from_secs(120));
    assert!(out.success, "{name} does not validate: {out}");
    assert!(
        !out.stdout.contains("ERROR") && !out.stderr.contains("ERROR"),
        "{out}"
    );
}

fn documents(rendered: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(rendered)
        .map(|d| serde_json::Value::deserialize(d).expect("kustomize output is YAML"))
        .collect()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the rendered manifests"))
}

#[test]
fn kubernetes_manifests_render_and_validate() {
    let scratch = tempdir("k8s-");
    let base = kustomize(&repo().join("deploy/kubernetes"));
    validate_against_schemas(&base, scratch.path(), "base");
    let docs = documents(&base);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ConfigMap",
        "Service",
        "PersistentVolumeClaim",
        "Deployment",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }

    let deployment = find(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selector.as_object().is_some_and(|s| !s.is_empty()));
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&labels[k], v, "the selector must match the pod labels");
    }
    // The ConfigMap the pod mounts is the generated one, and its config.yml is valid.
    let configmap = find(&docs, "ConfigMap");
    let mounted = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("a configMap volume");
    assert_eq!(configmap["metadata"]["name"], mounted);
    let config_yml = configmap["data"]["config.yml"].as_str().unwrap();
    let config = Config::parse(config_yml, "ConfigMap config.yml").unwrap();
    assert_eq!(config.storage.root, Path::new("/var/lib/regmirror"));
    let pvc = find(&docs, "PersistentVolumeClaim");
    assert!(pod["volumes"]
        .to_string()
        .contains(pvc["metadata"]["name"].as_str().unwrap()));
    let service = find(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"], 5000);

    // The overlay with upstream credentials: the dockerconfigjson Secret is mounted where
    // its config.yml looks for it.
    let overlay = kustomize(&repo().join("deploy/kubernetes/overlays/with-credentials"));
    validate_against_schemas(&overlay, scratch.path(), "with-credentials");
    let docs = documents(&overlay);
    let secret = find(&docs, "Secret");
    assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
    let dockerconfig: serde_json::Value =
        serde_json::from_str(secret["stringData"][".dockerconfigjson"].as_str().unwrap())
            .expect(".dockerconfigjson is JSON");
    assert!(dockerconfig["auths"].is_object());
    let config_yml = find(&docs, "ConfigMap")["data"]["config.yml"]
        .as_str()
        .unwrap();
    let config = Config::parse(config_yml, "overlay config.yml").unwrap();
    let docker_config = config.upstreams["docker.io"]
        .docker_config
        .clone()
        .expect("docker.io reads the Secret");
    let pod = &find(&docs, "Deployment")["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "upstream-credentials")
        .expect("the Secret is mounted");
    assert_eq!(
        docker_config,
        Path::new(mount["mountPath"].as_str().unwrap()).join(".dockerconfigjson")
    );
}

fn find_named<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// Asserts that the label selector `selector` (a `matchLabels` or a Service's `selector`)
/// is non-empty and selects pods with `labels`.
fn assert_selects(selector: &serde_json::Value, labels: &serde_json::Value, what: &str) {
    let selector = selector
        .as_object()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("{what}: no selector"));
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "{what} must select the regmirror pods ({k})");
    }
}

/// A Kubernetes quantity (`25Gi`) or a regmirror size (`20GiB`) in bytes: the binary
/// suffixes only, which is what the manifests and configurations here use.
fn size_bytes(text: &str) -> u64 {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("size {text:?}"));
    let shift = match unit.trim_end_matches('B') {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        "Ti" => 40,
        other => panic!("unit {other:?} of {text:?}"),
    };
    number << shift
}

/// `host:port` split at the last colon.
fn host_port(address: &str) -> (&str, u16) {
    let (host, port) = address
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{address:?} is not host:port"));
    (
        host,
        port.parse()
            .unwrap_or_else(|_| panic!("port of {address:?}")),
    )
}

/// The `cluster` overlay, rendered and validated as the base is, and checked for what the
/// scale-out needs: 3 replicas rolled one at a time with no volume claim, a
/// PodDisruptionBudget and anti-affinity over the same pods, the headless Service that
/// `cluster.dns` names (not-ready pods published, the peer port), the Secret mounted where
/// the configuration reads it, and a hot tier bounded below the emptyDir's limit.
#[test]
fn kubernetes_cluster_overlay_renders_and_validates() {
    let scratch = tempdir("k8s-cluster-");
    let rendered = kustomize(&repo().join("deploy/kubernetes/overlays/cluster"));
    validate_against_schemas(&rendered, scratch.path(), "cluster");
    let docs = documents(&rendered);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    // The bucket is the truth: no pod owns a volume.
    assert!(
        !kinds.contains(&"PersistentVolumeClaim"),
        "the cluster overlay keeps no PersistentVolumeClaim: {kinds:?}"
    );

    let deployment = find(&docs, "Deployment");
    let namespace = deployment["metadata"]["namespace"].as_str().unwrap();
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1);
    let labels = &spec["template"]["metadata"]["labels"];
    assert_selects(&spec["selector"]["matchLabels"], labels, "the Deployment");
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );

    // Spread over nodes, preferably (a small cluster still schedules all three).
    let anti = &pod["affinity"]["podAntiAffinity"];
    assert!(
        anti.get("requiredDuringSchedulingIgnoredDuringExecution")
            .is_none(),
        "{anti:#}"
    );
    let term = &anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname", "{anti:#}");
    assert_selects(
        &term["labelSelector"]["matchLabels"],
        labels,
        "the anti-affinity term",
    );

    let pdb = find(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert_selects(
        &pdb["spec"]["selector"]["matchLabels"],
        labels,
        "the PodDisruptionBudget",
    );

    // The volumes: the data directory is an emptyDir with a size limit, the config the
    // generated ConfigMap.
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let volume_at = |path: &str| {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}: {mounts:#?}"));
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]))
    };
    assert!(
        !pod["volumes"].to_string().contains("persistentVolumeClaim"),
        "{volumes:#?}"
    );
    let configmap = find(&docs, "ConfigMap");
    let config_yml = configmap["data"]["config.yml"].as_str().unwrap();
    let config = yaml(config_yml, "cluster ConfigMap config.yml");
    let root = config["storage"]["root"].as_str().unwrap();
    let data = volume_at(root);
    let size_limit = data["emptyDir"]["sizeLimit"]
        .as_str()
        .unwrap_or_else(|| panic!("{root} is an emptyDir with a sizeLimit: {data:#}"));
    let local_max = config["storage"]["local"]["max_size"]
        .as_str()
        .expect("storage.local.max_size bounds the hot tier");
    assert!(
        size_bytes(local_max) < size_bytes(size_limit),
        "storage.local.max_size {local_max} must stay below the emptyDir's sizeLimit \
         {size_limit}, or the kubelet evicts the pod"
    );
    assert_eq!(
        volume_at("/etc/regmirror")["configMap"]["name"],
        configmap["metadata"]["name"]
    );

    // The headless Service that cluster.dns names: every pod, ready or not, on the port the
    // peer channel listens on.
    let cluster = &config["cluster"];
    let (dns_host, dns_port) = host_port(cluster["dns"].as_str().expect("cluster.dns"));
    let (_, listen_port) = host_port(cluster["listen"].as_str().expect("cluster.listen"));
    let services: Vec<&serde_json::Value> =
        docs.iter().filter(|d| d["kind"] == "Service").collect();
    let headless = services
        .iter()
        .find(|s| s["spec"]["clusterIP"] == "None")
        .expect("a headless Service");
    let headless_name = headless["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        dns_host,
        format!(
            "{headless_name}.{}.svc.cluster.local",
            headless["metadata"]["namespace"].as_str().unwrap()
        ),
        "cluster.dns names the headless Service in its namespace"
    );
    assert_eq!(headless["metadata"]["namespace"], namespace);
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    assert_selects(
        &headless["spec"]["selector"],
        labels,
        "the headless Service",
    );
    let peer = &headless["spec"]["ports"][0];
    assert_eq!(peer["name"], "peer");
    assert_eq!(peer["port"], 5001);
    assert_eq!(peer["port"], dns_port);
    let peer_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == peer["targetPort"])
        .unwrap_or_else(|| panic!("no container port {}", peer["targetPort"]));
    assert_eq!(peer_port["containerPort"], listen_port);
    // Clients: the normal Service on 5000, the same pods.
    let client = services
        .iter()
        .find(|s| s["spec"]["clusterIP"] != "None")
        .expect("a client Service");
    assert_eq!(client["spec"]["ports"][0]["port"], 5000);
    assert_selects(&client["spec"]["selector"], labels, "the client Service");

    // The Secret: mounted where the configuration reads its files, and the access key ID
    // reaches the variable the configuration expands.
    let secret = find_named(&docs, "Secret", "regmirror-cluster");
    let secret_volume = volumes
        .iter()
        .find(|v| v["secret"]["secretName"] == "regmirror-cluster")
        .expect("the Secret regmirror-cluster is a volume");
    let secret_dir = mounts
        .iter()
        .find(|m| m["name"] == secret_volume["name"])
        .expect("the Secret is mounted")["mountPath"]
        .as_str()
        .unwrap();
    let s3 = &config["storage"]["s3"];
    for file in [
        s3["secret_access_key_file"]
            .as_str()
            .expect("storage.s3.secret_access_key_file"),
        cluster["secret_file"]
            .as_str()
            .expect("cluster.secret_file"),
    ] {
        let key = Path::new(file)
            .strip_prefix(secret_dir)
            .unwrap_or_else(|_| panic!("{file} is not in the Secret's mount {secret_dir}"));
        let key = key.to_str().unwrap();
        assert!(
            secret["stringData"].get(key).is_some(),
            "the Secret has no key {key}: {secret:#}"
        );
    }
    assert!(
        s3.get("secret_access_key").is_none() && cluster.get("secret").is_none(),
        "secrets come from files, not from the ConfigMap"
    );
    let access_key_id = s3["access_key_id"].as_str().unwrap();
    let variable = access_key_id
        .strip_prefix("${")
        .and_then(|v| v.strip_suffix('}'))
        .unwrap_or_else(|| panic!("access_key_id {access_key_id:?} comes from the environment"));
    let env = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == variable)
        .unwrap_or_else(|| panic!("the container has no variable {variable}"));
    let from = &env["valueFrom"]["secretKeyRef"];
    assert_eq!(from["name"], "regmirror-cluster");
    assert!(secret["stringData"]
        .get(from["key"].as_str().unwrap())
        .is_some());
    // Placeholders only.
    for (key, value) in secret["stringData"].as_object().unwrap() {
        assert!(
            value.as_str().unwrap().starts_with("REPLACE-ME"),
            "{key} must be an obvious placeholder"
        );
    }
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

/// `systemd-analyze verify` in a root holding the unit, the binary at its ExecStart path and
/// the system's own units: no warnings at all; and `systemd-analyze security` rates the
/// sandbox "OK" (exposure below 2.0 of 10).
#[test]
fn systemd_unit_verifies_and_is_sandboxed() {
    let analyze = require_tool("systemd-analyze");
    let root = tempdir("systemd-");
    let r = root.path();
    let unit = repo().join("deploy/systemd/regmirror.service");
    let text = read("deploy/systemd/regmirror.service");
    for needle in [
        "ExecStart=/usr/local/bin/regmirror serve --config /etc/regmirror/config.yml",
        "DynamicUser=yes",
        "StateDirectory=regmirror",
        "ProtectSystem=strict",
    ] {
        assert!(text.contains(needle), "the unit lacks `{needle}`");
    }
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    std::fs::copy(Regmirror::binary(), r.join("usr/local/bin/regmirror")).unwrap();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::copy(&unit, r.join("etc/systemd/system/regmirror.service")).unwrap();
    copy_dir(
        Path::new("/lib/systemd/system"),
        &r.join("usr/lib/systemd/system"),
    );

    let mut verify = Command::new(&analyze);
    verify
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("regmirror.service");
    let out = run_blocking(verify, Duration::from_secs(60));
    assert!(out.success, "{out}");
    assert!(
        out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify warned: {out}"
    );

    let mut security = Command::new(&analyze);
    security
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--root={}", r.display()))
        .arg("regmirror.service");
    let out = run_blocking(security, Duration::from_secs(60));
    assert!(out.success, "{out}");
    let exposure: f64 = out
        .stdout
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for regmirror.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {out}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure < 2.0, "exposure {exposure}: {}", out.stdout);

    // The config the unit's instructions install keeps its data in the StateDirectory.
    let config = Config::parse(&read("deploy/config.yml"), "deploy/config.yml").unwrap();
    assert_eq!(config.storage.root, Path::new("/var/lib/regmirror"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            let link = std::fs::read_link(entry.path()).unwrap();
            std::os::unix::fs::symlink(link, &target).unwrap();
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client snippets (the containerd and Docker ones are also used by every e2e test)
// ---------------------------------------------------------------------------------------

#[test]
fn client_snippets_name_the_mirror_for_every_upstream() {
    let placeholder = common::containerd::SNIPPET_MIRROR_URL;
    let host = placeholder.strip_prefix("http://").unwrap();

    let daemon: serde_json::Value =
        serde_json::from_str(&read("deploy/clients/docker/daemon.json")).unwrap();
    assert_eq!(daemon["registry-mirrors"], serde_json::json!([placeholder]));

    for (upstream, server) in [
        ("docker.io", "https://registry-1.docker.io"),
        ("ghcr.io", "https://ghcr.io"),
        ("quay.io", "https://quay.io"),
    ] {
        let hosts =
            toml_to_json(&repo().join(format!("deploy/clients/containerd/{upstream}/hosts.toml")));
        assert_eq!(hosts["server"], server, "{upstream}");
        assert_eq!(
            hosts["host"][placeholder]["capabilities"],
            serde_json::json!(["pull", "resolve"]),
            "{upstream}"
        );
    }

    let plain = toml_to_json(&repo().join("deploy/clients/buildkit/buildkitd.toml"));
    let tls = toml_to_json(&repo().join("deploy/clients/buildkit/buildkitd-tls.toml"));
    for config in [&plain, &tls] {
        for upstream in ["docker.io", "ghcr.io", "quay.io"] {
            assert_eq!(
                config["registry"][upstream]["mirrors"],
                serde_json::json!([host]),
                "{upstream}"
            );
        }
    }
    // BuildKit reads how to reach a mirror from the mirror's own entry.
    assert_eq!(plain["registry"][host]["http"], true);
    let mirror = &tls["registry"][host];
    assert!(mirror["ca"][0].is_string(), "{mirror:#}");
    assert!(mirror["keypair"][0]["key"].is_string(), "{mirror:#}");
    assert!(mirror["keypair"][0]["cert"].is_string(), "{mirror:#}");
    assert!(mirror.get("http").is_none());

    // containers/image: a path-prefix mirror per upstream (tests/clients.rs pulls with it).
    let containers = toml_to_json(&repo().join("deploy/clients/containers/registries.conf"));
    for upstream in ["docker.io", "ghcr.io", "quay.io"] {
        let entry = containers["registry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["prefix"] == upstream)
            .unwrap_or_else(|| panic!("no [[registry]] for {upstream}"));
        assert_eq!(
            entry["mirror"][0]["location"],
            format!("{host}/{upstream}"),
            "{upstream}"
        );
    }

    let k3s = yaml(
        &read("deploy/clients/k3s/registries.yaml"),
        "registries.yaml",
    );
    for upstream in ["docker.io", "ghcr.io", "quay.io"] {
        assert_eq!(
            k3s["mirrors"][upstream]["endpoint"],
            serde_json::json!([placeholder]),
            "{upstream}"
        );
    }

    // kind: the containerd patch points CRI at certs.d, and the mount puts the hosts.toml
    // snippets there.
    let kind = yaml(
        &read("deploy/clients/kind/cluster.yaml"),
        "kind cluster.yaml",
    );
    assert_eq!(kind["kind"], "Cluster");
    let patch = kind["containerdConfigPatches"][0].as_str().unwrap();
    let scratch = tempdir("kind-");
    let patch_file = scratch.path().join("patch.toml");
    std::fs::write(&patch_file, patch).unwrap();
    let patch = toml_to_json(&patch_file);
    let config_path = patch["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"]
        .as_str()
        .unwrap();
    let mount = &kind["nodes"][0]["extraMounts"][0];
    assert_eq!(mount["containerPath"], config_path);
    let host_path = repo().join(mount["hostPath"].as_str().unwrap());
    assert!(
        host_path.join("docker.io/hosts.toml").is_file(),
        "{}",
        host_path.display()
    );
}

// ---------------------------------------------------------------------------------------
// The healthcheck subcommand (the image's HEALTHCHECK: a scratch image has no curl)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_subcommand_reports_the_status() {
    let dist = Distribution::start().await;
    let rm = Regmirror::with_docker_io(&dist.url()).await;
    let check = |url: String| async move {
        let mut cmd = Command::new(Regmirror::binary());
        cmd.args(["healthcheck", "--timeout", "2", "--url", &url]);
        run(cmd, Duration::from_secs(30)).await
    };
    let ok = check(format!("{}/healthz", rm.url())).await;
    assert!(ok.success, "{ok}");
    assert!(ok.stdout.contains("200"), "{ok}");
    let missing = check(format!("{}/no-such-endpoint", rm.url())).await;
    assert!(!missing.success, "{missing}");
    assert!(missing.stderr.contains("404"), "{missing}");
    let closed = check(format!("http://127.0.0.1:{}/healthz", free_port())).await;
    assert!(!closed.success, "{closed}");
}
