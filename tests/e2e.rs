//! End-to-end tests: real clients (skopeo, ctr, dockerd) pull through a real regmirror
//! process from real distribution registries.
//!
//! Each test starts its own upstream(s) and its own regmirror, so they run in parallel.
//! Upstream request counts come from distribution's log, never from regmirror's.

mod common;
mod fake;

use std::sync::Arc;

use common::*;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;

/// Size of the file in the big layer: at least 64 MiB, and not a round number so that
/// off-by-one and chunk-boundary bugs show.
const BIG: usize = 64 * 1024 * 1024 + 4097;

/// The big image is generated once per test process and pushed to every upstream that
/// needs it (each test still has its own registries).
async fn big_image() -> &'static GeneratedImage {
    static BIG_IMAGE: OnceCell<GeneratedImage> = OnceCell::const_new();
    BIG_IMAGE
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| generate_image(&ImageSpec::new(&[4096, 1_500_000, BIG])))
                .await
                .unwrap()
        })
        .await
}

/// An upstream "Docker Hub": distribution holding
/// - `library/big:v1`: Docker schema 2, three layers, the last ≥ 64 MiB;
/// - `team/app:v1`: OCI, two small layers;
/// - `library/multi:oci`: OCI index (amd64 + arm64);
/// - `library/multi:list`: Docker manifest list (amd64 + arm64).
struct Upstream {
    dist: Distribution,
    big: PushedImage,
    app: PushedImage,
    multi_oci: PushedIndex,
    multi_list: PushedIndex,
}

async fn upstream() -> Upstream {
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let big = pusher
        .push_generated("library/big", "v1", big_image().await)
        .await;
    let app = pusher
        .push_image(
            "team/app",
            "v1",
            &ImageSpec::new(&[10_000, 700_000]).media_types(MediaTypes::Oci),
        )
        .await;
    let platforms = [Platform::AMD64, Platform::ARM64];
    let multi_oci = pusher
        .push_index("library/multi", "oci", &platforms, MediaTypes::Oci)
        .await;
    let multi_list = pusher
        .push_index("library/multi", "list", &platforms, MediaTypes::Docker)
        .await;
    Upstream {
        dist,
        big,
        app,
        multi_oci,
        multi_list,
    }
}

/// A manifest response, as a client sees it.
struct Fetched {
    status: u16,
    content_type: Option<String>,
    digest: Option<String>,
    body: Vec<u8>,
}

async fn get_manifest(url: &str) -> Fetched {
    let r = http()
        .get(url)
        .header("Accept", ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = r.status().as_u16();
    let content_type = header("Content-Type");
    let digest = header("Docker-Content-Digest");
    let body = r.bytes().await.unwrap().to_vec();
    Fetched {
        status,
        content_type,
        digest,
        body,
    }
}

fn assert_manifest(f: &Fetched, bytes: &[u8], media_type: &str, what: &str) {
    assert_eq!(
        f.status,
        200,
        "{what}: status {} body {}",
        f.status,
        String::from_utf8_lossy(&f.body)
    );
    assert!(
        f.body == bytes,
        "{what}: body differs from upstream:\n{}",
        String::from_utf8_lossy(&f.body)
    );
    assert_eq!(f.content_type.as_deref(), Some(media_type), "{what}");
    assert_eq!(
        f.digest.as_deref(),
        Some(sha256_digest(bytes).as_str()),
        "{what}: Docker-Content-Digest"
    );
}

/// GETs a blob and returns (status, sha256 of the body, body length).
async fn get_blob(url: &str) -> (u16, String, u64) {
    let r = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let mut h = Sha256::new();
    let mut len = 0u64;
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("reading {url}: {e}"));
        len += chunk.len() as u64;
        h.update(&chunk);
    }
    (status, format!("sha256:{}", hex::encode(h.finalize())), len)
}

/// (a) skopeo copies through regmirror, single images and whole indexes, byte-identical.
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copy_through_regmirror_is_byte_identical() {
    let up = upstream().await;
    let rm = Regmirror::with_docker_io(&up.dist.url()).await;
    let out = tempdir("e2e-skopeo-");

    let d = out.path().join("big");
    skopeo_copy_to_dir(&format!("docker://{}/library/big:v1", rm.host()), &d, false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&d, &up.big, "manifest.json");

    let d = out.path().join("app");
    skopeo_copy_to_dir(&format!("docker://{}/team/app:v1", rm.host()), &d, false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&d, &up.app, "manifest.json");

    for idx in [&up.multi_oci, &up.multi_list] {
        let d = out.path().join(&idx.tag);
        skopeo_copy_to_dir(
            &format!("docker://{}/library/multi:{}", rm.host(), idx.tag),
            &d,
            true,
        )
        .await
        .assert_success();
        assert_skopeo_dir_holds_index(&d, idx);
    }

    // The same bytes over plain HTTP, by tag and by digest, with the upstream's media
    // type and digest header; HEAD agrees with GET.
    let base = rm.url();
    for (repo, reference, bytes, media_type) in [
        (
            "library/big",
            "v1".to_owned(),
            &up.big.manifest_bytes,
            &up.big.media_type,
        ),
        (
            "library/big",
            up.big.manifest_digest.clone(),
            &up.big.manifest_bytes,
            &up.big.media_type,
        ),
        (
            "library/multi",
            "oci".to_owned(),
            &up.multi_oci.bytes,
            &up.multi_oci.media_type,
        ),
        (
            "library/multi",
            "list".to_owned(),
            &up.multi_list.bytes,
            &up.multi_list.media_type,
        ),
    ] {
        let url = format!("{base}/v2/{repo}/manifests/{reference}");
        let f = get_manifest(&url).await;
        assert_manifest(&f, bytes, media_type, &url);
        let head = http()
            .head(&url)
            .header("Accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status().as_u16(), 200, "HEAD {url}");
        assert_eq!(
            head.headers()
                .get("Docker-Content-Digest")
                .and_then(|v| v.to_str().ok()),
            f.digest.as_deref(),
            "HEAD and GET of {url} disagree"
        );
    }
}

/// (b) containerd with a hosts.toml mirror entry (what users copy) pulls through
/// regmirror, which receives `?ns=docker.io`.
#[tokio::test(flavor = "multi_thread")]
async fn ctr_pull_through_regmirror_hosts_toml() {
    let up = upstream().await;
    let rm = Regmirror::with_docker_io(&up.dist.url()).await;
    let ctd = Containerd::start().await;
    let hosts = tempdir("e2e-hosts-");
    write_hosts_toml(hosts.path(), "docker.io", &rm.url());

    for (image_ref, digest) in [
        ("docker.io/library/big:v1", &up.big.manifest_digest),
        ("docker.io/team/app:v1", &up.app.manifest_digest),
        ("docker.io/library/multi:oci", &up.multi_oci.digest),
        ("docker.io/library/multi:list", &up.multi_list.digest),
    ] {
        let out = ctd.ctr_pull(hosts.path(), image_ref).await;
        assert!(
            out.success,
            "{out}\n--- regmirror log ---\n{}",
            log_tail_str(&rm.log(), 6000)
        );
        assert_eq!(
            ctd.image_digest(image_ref).await.as_deref(),
            Some(digest.as_str()),
            "{image_ref}"
        );
    }
    // Every blob came from the upstream exactly once.
    let amd64 = up.multi_oci.image_for("amd64");
    for d in up
        .big
        .blob_digests()
        .iter()
        .chain(amd64.blob_digests().iter())
    {
        assert_eq!(up.dist.blob_gets_for(d).await, 1, "upstream GETs of {d}");
    }
}

/// (c) A real dockerd with `registry-mirrors` pulls `library/<x>` and `<org>/<x>`
/// through regmirror (no internet: a fallback to Docker Hub would fail).
#[tokio::test(flavor = "multi_thread")]
async fn dockerd_pull_through_regmirror() {
    let up = upstream().await;
    let rm = Regmirror::with_docker_io(&up.dist.url()).await;
    let docker = Dockerd::start(Containerd::start().await, &rm.url()).await;

    for (image, repo, img) in [
        ("big:v1", "big", &up.big),
        ("team/app:v1", "team/app", &up.app),
    ] {
        let out = docker.docker_pull(image).await;
        assert!(
            out.success,
            "{out}\n--- regmirror log ---\n{}\n--- dockerd log ---\n{}",
            log_tail_str(&rm.log(), 6000),
            log_tail_str(&docker.log(), 4000)
        );
        assert_eq!(
            docker.repo_digests(image).await,
            vec![format!("{repo}@{}", img.manifest_digest)],
            "{image}"
        );
        let inspect = docker.image_inspect(image).await.unwrap();
        assert_eq!(inspect["Id"], img.config_digest.as_str(), "{image}");
        assert_eq!(
            inspect["RootFS"]["Layers"],
            serde_json::json!(img.diff_ids),
            "{image}"
        );
    }
    // The pulls really went through regmirror to this upstream.
    for d in up
        .big
        .blob_digests()
        .iter()
        .chain(up.app.blob_digests().iter())
    {
        assert_eq!(up.dist.blob_gets_for(d).await, 1, "upstream GETs of {d}");
    }
    // A multi-arch index resolves to the daemon's platform.
    docker.docker_pull("multi:list").await.assert_success();
    let amd64 = up.multi_list.image_for("amd64");
    let inspect = docker.image_inspect("multi:list").await.unwrap();
    assert_eq!(inspect["Id"], amd64.config_digest.as_str());
}

/// (d) A second pull of the same image is served from the cache: no new upstream blob
/// GETs, whichever client pulls.
#[tokio::test(flavor = "multi_thread")]
async fn second_pull_makes_no_upstream_blob_requests() {
    let up = upstream().await;
    let rm = Regmirror::with_docker_io(&up.dist.url()).await;
    let out = tempdir("e2e-second-");

    let first = out.path().join("first");
    skopeo_copy_to_dir(
        &format!("docker://{}/library/big:v1", rm.host()),
        &first,
        false,
    )
    .await
    .assert_success();
    let d = out.path().join("multi-first");
    skopeo_copy_to_dir(
        &format!("docker://{}/library/multi:oci", rm.host()),
        &d,
        true,
    )
    .await
    .assert_success();
    for d in up.big.blob_digests() {
        assert_eq!(up.dist.blob_gets_for(&d).await, 1, "first pull, {d}");
    }
    let blob_gets = up.dist.blob_gets().await;

    let second = out.path().join("second");
    skopeo_copy_to_dir(
        &format!("docker://{}/library/big:v1", rm.host()),
        &second,
        false,
    )
    .await
    .assert_success();
    assert_skopeo_dir_holds(&second, &up.big, "manifest.json");
    let d = out.path().join("multi-second");
    skopeo_copy_to_dir(
        &format!("docker://{}/library/multi:oci", rm.host()),
        &d,
        true,
    )
    .await
    .assert_success();
    assert_skopeo_dir_holds_index(&d, &up.multi_oci);
    // Plain GETs of every blob, by the repository that pulled them.
    for digest in up.big.blob_digests() {
        let (status, sha, _) =
            get_blob(&format!("{}/v2/library/big/blobs/{digest}", rm.url())).await;
        assert_eq!((status, sha.as_str()), (200, digest.as_str()));
    }

    let after = up.dist.blob_gets().await;
    assert_eq!(
        after,
        blob_gets,
        "second pulls fetched blobs upstream again: {:#?}",
        &up.dist.request_lines().await
    );
}

/// (e) Eight concurrent cold GETs of the big blob: one upstream GET, eight correct copies.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_cold_gets_of_big_blob_fetch_upstream_once() {
    let up = upstream().await;
    let rm = Regmirror::with_docker_io(&up.dist.url()).await;
    let (digest, size) = up.big.largest_layer();
    assert!(size >= 64 * 1024 * 1024);
    let url = format!("{}/v2/library/big/blobs/{digest}", rm.url());

    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                get_blob(&url).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, sha, len) = t.await.unwrap();
        assert_eq!(status, 200, "client {i}");
        assert_eq!(len, size, "client {i} length");
        assert_eq!(sha, digest, "client {i} content");
    }
    let gets = up.dist.blob_gets_for(&digest).await;
    assert_eq!(
        gets,
        1,
        "upstream GETs of the big blob: {:#?}",
        up.dist.request_lines().await
    );
}

/// (f) One regmirror, two upstreams: a path prefix or `?ns=` picks the second, plain
/// requests go to the default, an unknown `ns` is refused with an OCI error.
#[tokio::test(flavor = "multi_thread")]
async fn routes_requests_to_the_right_upstream() {
    let hub = Distribution::start().await;
    let other = Distribution::start().await;
    let spec = ImageSpec::new(&[3000, 40_000]);
    let on_hub = push_image_with(&hub.url(), "team/app", "v1", &spec).await;
    let on_other = push_image_with(&other.url(), "team/app", "v1", &spec).await;
    assert_ne!(on_hub.manifest_digest, on_other.manifest_digest);
    let solo = push_image(&hub.url(), "library/solo", "v1", &[1000]).await;

    let rm = RegmirrorConfig::docker_io(&hub.url())
        .upstream("other.test", &other.url())
        .start()
        .await;
    let base = rm.url();
    let media = MediaTypes::Docker.manifest();

    let f = get_manifest(&format!("{base}/v2/team/app/manifests/v1")).await;
    assert_manifest(&f, &on_hub.manifest_bytes, media, "default upstream");
    let f = get_manifest(&format!("{base}/v2/team/app/manifests/v1?ns=docker.io")).await;
    assert_manifest(&f, &on_hub.manifest_bytes, media, "ns=docker.io");
    let f = get_manifest(&format!("{base}/v2/solo/manifests/v1")).await;
    assert_manifest(&f, &solo.manifest_bytes, media, "library/ prefix");

    let f = get_manifest(&format!("{base}/v2/other.test/team/app/manifests/v1")).await;
    assert_manifest(
        &f,
        &on_other.manifest_bytes,
        media,
        "path prefix other.test",
    );
    let f = get_manifest(&format!("{base}/v2/team/app/manifests/v1?ns=other.test")).await;
    assert_manifest(&f, &on_other.manifest_bytes, media, "ns=other.test");
    for d in on_other.blob_digests() {
        let (status, sha, _) = get_blob(&format!("{base}/v2/other.test/team/app/blobs/{d}")).await;
        assert_eq!((status, sha.as_str()), (200, d.as_str()), "prefix blob");
        let (status, sha, _) =
            get_blob(&format!("{base}/v2/team/app/blobs/{d}?ns=other.test")).await;
        assert_eq!((status, sha.as_str()), (200, d.as_str()), "ns blob");
    }

    // The second upstream saw the repository name without the prefix.
    let reqs = other.requests().await;
    assert!(
        reqs.iter()
            .any(|r| r.method == "GET" && r.path.starts_with("/v2/team/app/manifests/")),
        "{reqs:#?}"
    );
    assert!(
        reqs.iter().all(|r| !r.path.contains("other.test")),
        "{reqs:#?}"
    );

    let (hub_before, other_before) = (hub.requests().await.len(), other.requests().await.len());
    let r = http()
        .get(format!("{base}/v2/team/app/manifests/v1?ns=evil.example"))
        .header("Accept", ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert!(status.is_client_error(), "unknown ns: {status} {body}");
    let json: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("unknown ns: body is not JSON ({e}): {body}"));
    let code = json["errors"][0]["code"].as_str();
    assert!(
        code.is_some_and(
            |code| !code.is_empty() && code.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_')
        ),
        "unknown ns: not an OCI error body: {body}"
    );
    assert_eq!(
        hub.requests().await.len(),
        hub_before,
        "evil ns reached docker.io"
    );
    assert_eq!(
        other.requests().await.len(),
        other_before,
        "evil ns reached other.test"
    );
}

/// What was cached survives `kill -9`: after a restart on the same data directory the
/// image is served with the upstream gone.
#[tokio::test(flavor = "multi_thread")]
async fn cache_survives_kill9_and_serves_without_upstream() {
    // Time for the index to reach disk before the crash; the immediate case is below.
    kill9_restart_then_pull_without_upstream(std::time::Duration::from_secs(2)).await;
}

/// The same with `kill -9` right after the pull completes: the manifest and blobs are
/// committed files by then, so nothing that was served may be lost.
#[tokio::test(flavor = "multi_thread")]
async fn cache_survives_kill9_immediately_after_pull() {
    kill9_restart_then_pull_without_upstream(std::time::Duration::ZERO).await;
}

async fn kill9_restart_then_pull_without_upstream(before_kill: std::time::Duration) {
    let mut dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/small", "v1", &[5000, 300_000]).await;
    let mut rm = Regmirror::with_docker_io(&dist.url()).await;
    let out = tempdir("e2e-restart-");
    let src = format!("docker://{}/library/small:v1", rm.host());

    let d = out.path().join("before");
    skopeo_copy_to_dir(&src, &d, false).await.assert_success();
    assert_skopeo_dir_holds(&d, &img, "manifest.json");

    tokio::time::sleep(before_kill).await;
    rm.kill9();
    rm.restart().await;
    dist.kill9();

    let d = out.path().join("after");
    let copy = skopeo_copy_to_dir(&src, &d, false).await;
    assert!(
        copy.success,
        "{copy}\n--- regmirror log ---\n{}",
        log_tail_str(&rm.log(), 6000)
    );
    assert_skopeo_dir_holds(&d, &img, "manifest.json");
}

/// A client that goes away mid-download does not cancel the fill: the blob is committed
/// and the next client is served without a second upstream download.
#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_does_not_abort_the_fill() {
    let dist = Distribution::start().await;
    let img = Pusher::new(&dist.url())
        .push_generated("library/big", "v1", big_image().await)
        .await;
    let rm = Regmirror::with_docker_io(&dist.url()).await;
    let (digest, size) = img.largest_layer();
    let url = format!("{}/v2/library/big/blobs/{digest}", rm.url());

    let r = http().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut read = 0;
    while read < 1 << 20 {
        read += body.next().await.expect("body ended early").unwrap().len();
    }
    drop(body);

    // The fill goes on without the client: wait for it to end (no download in flight and
    // the blob in the store), then take the upstream away, so the whole blob can only come
    // from what the abandoned fill committed.
    let metrics_url = format!("{}/metrics", rm.url());
    tokio::time::timeout(std::time::Duration::from_secs(120), async {
        loop {
            let text = http()
                .get(&metrics_url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let gauge = |name: &str| {
                text.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            };
            if gauge("regmirror_downloads_in_flight ") == Some(0)
                && gauge("regmirror_cache_size_bytes ").is_some_and(|b| b >= size)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the abandoned fill never finished");
    let gets = dist.blob_gets_for(&digest).await;
    let mut dist = dist;
    dist.kill9();
    let (status, sha, len) = get_blob(&url).await;
    assert_eq!((status, len, sha.as_str()), (200, size, digest.as_str()));
    assert_eq!(gets, 1, "the abandoned download was not kept");
}

/// A tag is answered from the cache within `tag_ttl`; after it, regmirror revalidates
/// with a HEAD (no GET of the tag upstream) and serves the new digest.
#[tokio::test(flavor = "multi_thread")]
async fn tag_is_revalidated_with_head_after_ttl() {
    let dist = Distribution::start().await;
    let v1 = push_image(&dist.url(), "library/tagged", "latest", &[1000]).await;
    // In-process, in front of the real registry, so the test moves the cache's clock past the
    // TTL instead of sleeping through it (an hour: no loaded machine is that slow).
    let rm = fake::mirror_from(&format!(
        "default_upstream: docker.io\nupstreams:\n  docker.io: {{ url: '{}' }}\ncache: {{ tag_ttl: 1h }}",
        dist.url()
    ))
    .await;
    let url = format!("{}/v2/tagged/manifests/latest", rm.url);
    let media = MediaTypes::Docker.manifest();

    assert_manifest(
        &get_manifest(&url).await,
        &v1.manifest_bytes,
        media,
        "first",
    );
    let upstream_manifest_requests = |reqs: Vec<Request>| -> Vec<(String, String)> {
        reqs.into_iter()
            .filter(|r| r.is_manifest() && r.method != "PUT")
            .map(|r| (r.method, r.path))
            .collect()
    };
    let filled = upstream_manifest_requests(dist.requests().await).len();
    assert_manifest(
        &get_manifest(&url).await,
        &v1.manifest_bytes,
        media,
        "cached",
    );
    assert_eq!(
        upstream_manifest_requests(dist.requests().await).len(),
        filled,
        "a fresh tag went upstream"
    );

    let v2 = push_image(&dist.url(), "library/tagged", "latest", &[2000]).await;
    rm.state
        .cache
        .clock()
        .advance(std::time::Duration::from_secs(3601));
    assert_manifest(
        &get_manifest(&url).await,
        &v2.manifest_bytes,
        media,
        "after ttl",
    );
    let after = upstream_manifest_requests(dist.requests().await).split_off(filled);
    let tag_path = "/v2/library/tagged/manifests/latest".to_owned();
    assert!(
        after.contains(&("HEAD".to_owned(), tag_path.clone())),
        "no HEAD revalidation: {after:?}"
    );
    assert!(
        !after.contains(&("GET".to_owned(), tag_path)),
        "revalidation GET the tag instead of HEAD: {after:?}"
    );
}

fn log_tail_str(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
