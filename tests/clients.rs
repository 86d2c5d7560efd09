//! Clients beyond `docker pull` and `ctr`, end to end with the real programs: podman
//! (containers/image, as buildah and CRI-O use it) with the repository's registries.conf,
//! `docker build` with BuildKit resolving `FROM` through `registry-mirrors`, and the
//! `OCI-Namespace` header of `?ns=` requests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The placeholder address in deploy/clients/containers/registries.conf.
const SNIPPET_ADDRESS: &str = "mirror.example:5000";

/// deploy/clients/containers/registries.conf with the mirror's `host:port` filled in.
fn registries_conf(dir: &Path, mirror_host: &str) -> PathBuf {
    let snippet =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clients/containers/registries.conf");
    let text = std::fs::read_to_string(&snippet).unwrap();
    assert!(text.contains(SNIPPET_ADDRESS), "{}", snippet.display());
    let path = dir.join("registries.conf");
    std::fs::write(&path, text.replace(SNIPPET_ADDRESS, mirror_host)).unwrap();
    path
}

/// podman with its own storage (vfs), run root, registries.conf and policy, all under `dir`.
struct Podman {
    dir: tempfile::TempDir,
    registries: PathBuf,
}

impl Podman {
    fn new(mirror_host: &str) -> Podman {
        require_root("podman");
        let dir = tempdir("podman-");
        let registries = registries_conf(dir.path(), mirror_host);
        // Its own storage.conf, so /etc/containers/storage.conf says nothing.
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.path().join("runroot").display(),
                dir.path().join("root").display()
            ),
        )
        .unwrap();
        skopeo_policy(dir.path());
        Podman { dir, registries }
    }

    async fn run(&self, args: &[&str]) -> CmdOutput {
        let d = self.dir.path();
        let mut cmd = Command::new(require_tool("podman"));
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args)
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries)
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("HOME", d)
            .env("XDG_RUNTIME_DIR", d)
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"));
        std::fs::write(d.join("auth.json"), "{}").unwrap();
        no_proxy(&mut cmd);
        run(cmd, Duration::from_secs(300)).await
    }

    async fn pull(&self, image: &str) -> CmdOutput {
        let policy = self.dir.path().join("policy.json");
        self.run(&[
            "pull",
            "--signature-policy",
            policy.to_str().unwrap(),
            image,
        ])
        .await
    }

    /// The manifest digest podman recorded for `image`.
    async fn digest(&self, image: &str) -> String {
        let out = self
            .run(&["image", "inspect", "--format", "{{.Digest}}", image])
            .await;
        out.assert_success();
        out.stdout.trim().to_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // vfs leaves no mounts, but a killed podman may leave its run root mounted.
        unmount_under(self.dir.path());
    }
}

/// podman pulls `docker.io/...` and `ghcr.io/...` images through one regmirror by the
/// registries.conf path-prefix convention (each from its own upstream); after `podman rmi`
/// the second pulls make no upstream blob request.
#[tokio::test(flavor = "multi_thread")]
async fn podman_pulls_two_upstreams_through_registries_conf() {
    let hub = Distribution::start().await;
    let ghcr = Distribution::start().await;
    let base = push_image(&hub.url(), "library/base", "v1", &[2000, 600_000]).await;
    let app = push_image_with(
        &ghcr.url(),
        "org/app",
        "1.4",
        &ImageSpec::new(&[1000, 400_000]).media_types(MediaTypes::Oci),
    )
    .await;
    let rm = RegmirrorConfig::docker_io(&hub.url())
        .upstream("ghcr.io", &ghcr.url())
        .start()
        .await;
    let podman = Podman::new(&rm.host());

    let pulls = [
        ("docker.io/library/base:v1", &base, &hub),
        ("ghcr.io/org/app:1.4", &app, &ghcr),
    ];
    for (image, img, _) in pulls {
        let out = podman.pull(image).await;
        assert!(out.success, "{out}\n--- regmirror ---\n{}", rm.log());
        assert_eq!(podman.digest(image).await, img.manifest_digest, "{image}");
    }
    for (image, img, upstream) in pulls {
        for d in img.blob_digests() {
            assert_eq!(
                upstream.blob_gets_for(&d).await,
                1,
                "{image}: upstream GETs of {d}"
            );
        }
        // By the path prefix, never by `ns` (containers/image cannot send one).
        let requests = upstream.requests().await;
        assert!(requests.iter().all(|r| r.ns().is_none()), "{requests:#?}");
    }
    let before = (hub.blob_gets().await, ghcr.blob_gets().await);

    podman
        .run(&["rmi", "--all", "--force"])
        .await
        .assert_success();
    for (image, img, _) in pulls {
        podman.pull(image).await.assert_success();
        assert_eq!(podman.digest(image).await, img.manifest_digest, "{image}");
    }
    assert_eq!(
        (hub.blob_gets().await, ghcr.blob_gets().await),
        before,
        "the second pulls fetched blobs upstream"
    );
    // ...and they did come through the mirror: every blob request of the second round hit.
    let log = rm.log();
    let hits = log
        .lines()
        .filter(|l| l.contains("route=\"blob\"") || l.contains("route=blob"))
        .filter(|l| l.contains("cache=\"hit\"") || l.contains("cache=hit"))
        .count();
    assert!(hits >= 2, "no blob cache hits in the mirror's log:\n{log}");
}

/// `DOCKER_BUILDKIT=1 docker build` on a dockerd whose daemon.json names the mirror: a
/// Dockerfile `FROM library/base` and a multi-stage one (`FROM team/tool AS build`, then
/// `FROM library/base`) get their base layers through regmirror; after `docker builder prune
/// -a -f` and `docker rmi`, the rebuild fetches no blob upstream.
#[tokio::test(flavor = "multi_thread")]
async fn docker_build_with_buildkit_resolves_from_through_the_mirror() {
    require_root("docker build");
    let up = Distribution::start().await;
    let base = push_image(&up.url(), "library/base", "v1", &[3000, 700_000]).await;
    let tool = push_image(&up.url(), "team/tool", "v2", &[2000, 500_000]).await;
    let rm = Regmirror::with_docker_io(&up.url()).await;
    let dockerd = Dockerd::start(Containerd::start().await, &rm.url()).await;

    let context = tempdir("build-ctx-");
    let c = context.path();
    std::fs::write(c.join("hello.txt"), "built through regmirror\n").unwrap();
    // No `# syntax=` line: the dockerfile frontend image would come from Docker Hub, which a
    // mirror-only (or offline) builder cannot reach; the built-in frontend needs nothing.
    std::fs::write(
        c.join("single.Dockerfile"),
        "FROM library/base:v1\nCOPY hello.txt /hello.txt\n",
    )
    .unwrap();
    std::fs::write(
        c.join("multi.Dockerfile"),
        "FROM team/tool:v2 AS build\nCOPY hello.txt /work/hello.txt\n\
         FROM library/base:v1\nCOPY --from=build /regmirror-test/layer-1.bin /tool.bin\n\
         COPY --from=build /work/hello.txt /hello.txt\n",
    )
    .unwrap();

    let build = |file: &str, tag: &str| {
        let mut cmd = Command::new(docker_cli());
        cmd.arg("-H")
            .arg(format!(
                "unix://{}",
                dockerd.dir().join("docker.sock").display()
            ))
            .args(["build", "--progress", "plain", "--file"])
            .arg(c.join(file))
            .args(["--tag", tag])
            .arg(c)
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_CONFIG", dockerd.dir().join("cli"));
        no_proxy(&mut cmd);
        run(cmd, Duration::from_secs(300))
    };
    let built = ["built/single:1", "built/multi:1"];
    let check = |out: &CmdOutput, resolved: &str| {
        assert!(
            out.success,
            "{out}\n--- regmirror ---\n{}\n--- dockerd ---\n{}",
            rm.log(),
            log_tail(&dockerd.dir().join("dockerd.log"), 6000)
        );
        // BuildKit says what it pulled in its plain progress (the legacy builder has no such
        // lines); a stage whose base another build already pulled says CACHED instead.
        let line = format!("resolve docker.io/{resolved}@sha256:");
        assert!(out.stderr.contains(&line), "no `{line}` in:\n{out}");
    };
    check(
        &build("single.Dockerfile", built[0]).await,
        "library/base:v1",
    );
    check(&build("multi.Dockerfile", built[1]).await, "team/tool:v2");

    // The images hold the base layers and what the steps added.
    let single = dockerd.image_inspect(built[0]).await.expect("built image");
    let layers = single["RootFS"]["Layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), base.diff_ids.len() + 1, "{single:#}");
    assert_eq!(
        layers[..base.diff_ids.len()],
        base.diff_ids
            .iter()
            .map(|d| serde_json::json!(d))
            .collect::<Vec<_>>()[..]
    );
    let multi = dockerd.image_inspect(built[1]).await.expect("built image");
    let layers = multi["RootFS"]["Layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), base.diff_ids.len() + 2, "{multi:#}");

    // Every base layer came from the upstream through regmirror, once.
    for d in base.blob_digests().iter().chain(tool.layer_digests.iter()) {
        assert_eq!(up.blob_gets_for(d).await, 1, "upstream GETs of {d}");
    }
    let blob_gets = up.blob_gets().await;
    let mirror_blob_requests = |log: &str| {
        log.lines()
            .filter(|l| l.contains("route=\"blob\"") || l.contains("route=blob"))
            .filter(|l| l.contains("method=GET"))
            .count()
    };
    let served_before = mirror_blob_requests(&rm.log());

    // Forget everything the builder and the engine hold, and build again.
    dockerd
        .docker(&["builder", "prune", "--all", "--force"])
        .await
        .assert_success();
    dockerd
        .docker(&["rmi", "--force", built[0], built[1]])
        .await
        .assert_success();
    assert!(dockerd.image_inspect(built[0]).await.is_none());
    check(
        &build("single.Dockerfile", built[0]).await,
        "library/base:v1",
    );
    check(&build("multi.Dockerfile", built[1]).await, "team/tool:v2");
    assert_eq!(
        up.blob_gets().await,
        blob_gets,
        "the rebuild fetched blobs upstream:\n{:#?}",
        up.request_lines().await
    );
    assert!(
        mirror_blob_requests(&rm.log()) > served_before,
        "the rebuild did not pull its base layers from the mirror:\n{}",
        rm.log()
    );
}

/// Responses to `?ns=` requests name the namespace (`OCI-Namespace`, distribution-spec
/// "Registry Proxying"); requests without `ns`, or with one that is not configured, do not.
#[tokio::test(flavor = "multi_thread")]
async fn oci_namespace_header_answers_ns_requests() {
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "org/app", "v1", &[1000]).await;
    let rm = RegmirrorConfig::docker_io(&dist.url())
        .upstream("ghcr.io", &dist.url())
        .start()
        .await;
    let http = http();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{}{path}", rm.url());
        async move {
            let response = http
                .get(&url)
                .header("accept", ACCEPT_ALL_MANIFESTS)
                .send()
                .await
                .unwrap();
            let ns = response
                .headers()
                .get("oci-namespace")
                .map(|v| v.to_str().unwrap().to_owned());
            (response.status().as_u16(), ns)
        }
    };
    let layer = &img.layer_digests[0];
    let cases = [
        (
            "/v2/org/app/manifests/v1?ns=ghcr.io".to_owned(),
            200,
            Some("ghcr.io"),
        ),
        (
            format!("/v2/org/app/blobs/{layer}?ns=ghcr.io"),
            200,
            Some("ghcr.io"),
        ),
        (
            "/v2/org/app/manifests/v1?ns=docker.io".to_owned(),
            200,
            Some("docker.io"),
        ),
        // An alias of a configured upstream is echoed as the client sent it.
        (
            "/v2/org/app/manifests/v1?ns=registry-1.docker.io".to_owned(),
            200,
            Some("registry-1.docker.io"),
        ),
        // Errors after a valid ns carry it too.
        (
            "/v2/org/app/manifests/missing?ns=ghcr.io".to_owned(),
            404,
            Some("ghcr.io"),
        ),
        ("/v2/org/app/manifests/v1".to_owned(), 200, None),
        ("/v2/ghcr.io/org/app/manifests/v1".to_owned(), 200, None),
        // Closed world: an unknown ns is refused and never echoed.
        (
            "/v2/org/app/manifests/v1?ns=evil.example".to_owned(),
            404,
            None,
        ),
        (
            "/v2/org/app/manifests/v1?ns=%0d%0aX-Evil:%201".to_owned(),
            404,
            None,
        ),
    ];
    for (path, status, ns) in cases {
        assert_eq!(
            get(path.clone()).await,
            (status, ns.map(str::to_owned)),
            "{path}"
        );
    }
}
