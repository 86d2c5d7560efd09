//! Scale-out (issue 12) with the clients users run and the single-node S3 mode, all with real
//! programs: Garage, distribution as the upstream, dockerd (`registry-mirrors`), containerd's
//! `ctr --hosts-dir` (`?ns=docker.io`), skopeo, and nginx as the round-robin front. The
//! fault-injecting fake upstream is used only where a download must be held mid-way (kill -9
//! of a replica during a pull).
//!
//! Synchronisation is on events (a request arriving at the upstream, a metric moving, an
//! object appearing in the bucket); the deadlines are hang guards, never assertions.

mod common;
mod fake;

use std::time::Duration;

use common::cluster::*;
use common::front::Front;
use common::garage::Garage;
use common::*;

/// One replica with `storage.s3` and no `cluster:` section (single-node S3 mode).
/// `s3_extra` goes inside the `s3:` mapping (`, redirect: true`), `storage_extra` inside
/// `storage:` (`, local: { max_size: 5MiB }`).
async fn s3_replica(
    upstream: &str,
    garage: &Garage,
    s3_extra: &str,
    storage_extra: &str,
) -> Regmirror {
    let s3 = garage.s3_yaml();
    let s3 = s3
        .trim_end()
        .strip_suffix('}')
        .expect("s3_yaml is a flow mapping")
        .trim_end();
    let yaml = format!(
        "listen: @LISTEN@\n\
         storage: {{ root: @ROOT@, s3: {s3}{s3_extra} }}{storage_extra} }}\n\
         cache: {{ tag_ttl: 5m }}\n\
         default_upstream: docker.io\n\
         upstreams:\n  docker.io: {{ url: \"{upstream}\" }}\n\
         log: {{ level: debug, format: text }}\n"
    );
    Regmirror::start(&yaml).await
}

async fn metrics_of(mirror: &Regmirror) -> String {
    match http().get(format!("{}/metrics", mirror.url())).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

const FILLS: &str = "regmirror_hot_tier_total{result=\"fill\"}";

/// `skopeo copy docker://HOST/REF dir:` and the check that the copy is `image` byte for byte.
async fn skopeo_pull(host: &str, reference: &str, image: &PushedImage, log: &dyn Fn() -> String) {
    let dir = tempdir("pull-");
    let out = skopeo_copy_to_dir(
        &format!("docker://{host}/{reference}"),
        &dir.path().join("img"),
        false,
    )
    .await;
    assert!(out.success, "{out}\n--- mirror ---\n{}", log());
    assert_skopeo_dir_holds(&dir.path().join("img"), image, "manifest.json");
}

/// A real dockerd (`registry-mirrors` = the front), `ctr --hosts-dir` (`?ns=docker.io`) and
/// skopeo pull one cold image at once through an nginx front of three replicas: every client
/// gets the pushed image, each blob is fetched once from the upstream for the whole cluster,
/// and `?ns=` requests are answered with `OCI-Namespace` through the front on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dockerd_and_ctr_pull_through_the_front_of_three_replicas() {
    require_root("dockerd and containerd");
    let garage = Garage::single().await;
    let upstream = Distribution::start().await;
    let image = push_image(&upstream.url(), "library/app", "v1", &[24 << 20, 1 << 20]).await;
    let replicas = cluster(3, &upstream.url(), &garage, "").await;
    let front = Front::start(&replicas.iter().map(Replica::addr).collect::<Vec<_>>()).await;
    let dockerd = Dockerd::start(Containerd::start().await, &front.url()).await;
    let containerd = Containerd::start().await;
    let hosts = tempdir("hosts-");
    write_hosts_toml(hosts.path(), "docker.io", &front.url());
    let logs = || {
        replicas
            .iter()
            .map(|r| {
                log_tail(
                    &r.mirror.config_path().with_file_name("regmirror.log"),
                    3000,
                )
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // The three clients at once: the same cold blobs are asked of different replicas.
    let front_host = front.host();
    let (docker, ctr, ()) = tokio::join!(
        dockerd.docker_pull("app:v1"),
        containerd.ctr_pull(hosts.path(), "docker.io/library/app:v1"),
        skopeo_pull(&front_host, "library/app:v1", &image, &logs),
    );
    assert!(
        docker.success,
        "{docker}\n--- dockerd ---\n{}\n--- mirrors ---\n{}",
        log_tail(&dockerd.dir().join("dockerd.log"), 4000),
        logs()
    );
    assert!(ctr.success, "{ctr}\n--- mirrors ---\n{}", logs());

    // The content is the pushed image: its manifest digest, and (docker) its layers.
    let digests = dockerd.repo_digests("app:v1").await;
    assert!(
        digests
            .iter()
            .any(|d| d.ends_with(&format!("@{}", image.manifest_digest))),
        "docker recorded {digests:?}, pushed {}",
        image.manifest_digest
    );
    let inspected = dockerd.image_inspect("app:v1").await.expect("pulled image");
    assert_eq!(
        inspected["RootFS"]["Layers"],
        serde_json::json!(image.diff_ids),
        "{inspected:#}"
    );
    assert_eq!(
        containerd
            .image_digest("docker.io/library/app:v1")
            .await
            .as_deref(),
        Some(image.manifest_digest.as_str())
    );

    // One upstream GET per blob for the whole cluster, three clients notwithstanding.
    for digest in image.blob_digests() {
        assert_eq!(
            upstream.blob_gets_for(&digest).await,
            1,
            "upstream GETs of {digest}: {:#?}",
            upstream.request_lines().await
        );
    }

    // ctr's requests went through the front with `ns`, docker's without, over several replicas.
    let access = front.access_log();
    let served = |with_ns: bool| {
        access
            .lines()
            .filter(|l| l.starts_with("GET /v2/library/app/blobs/sha256:"))
            .filter(|l| l.contains("ns=docker.io") == with_ns)
            .filter(|l| l.contains(" 200 "))
            .count()
    };
    assert!(served(true) >= image.blob_digests().len(), "{access}");
    assert!(served(false) >= image.blob_digests().len(), "{access}");
    let backends: std::collections::HashSet<&str> = access
        .lines()
        .filter_map(|l| l.split("upstream=").nth(1))
        .collect();
    assert!(
        backends.len() >= 2,
        "one backend served everything: {access}"
    );

    // `OCI-Namespace` answers `?ns=` through the front, on each replica in turn.
    let layer = &image.layer_digests[1];
    for path in [
        "/v2/library/app/manifests/v1?ns=docker.io".to_owned(),
        format!("/v2/library/app/blobs/{layer}?ns=docker.io"),
        format!("/v2/library/app/blobs/{layer}?ns=docker.io"),
        format!("/v2/library/app/blobs/{layer}?ns=docker.io"),
    ] {
        let response = http()
            .get(format!("{}{path}", front.url()))
            .header("accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response
                .headers()
                .get("oci-namespace")
                .and_then(|v| v.to_str().ok()),
            Some("docker.io"),
            "{path}: {:?}",
            response.headers()
        );
        let body = response.bytes().await.unwrap();
        if path.contains("/blobs/") {
            assert_eq!(sha256_digest(&body), *layer, "{path}");
        }
    }
    drop(containerd);
    drop(dockerd);
    drop(front);
}

/// Single-node S3 mode: the local disk is a bounded hot tier. An image evicted from it pulls
/// again from the bucket alone (0 upstream requests), refilling the hot tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_node_s3_refills_an_evicted_image_from_the_bucket() {
    let garage = Garage::single().await;
    let upstream = Distribution::start().await;
    let first = push_image(&upstream.url(), "team/first", "v1", &[3 << 20]).await;
    let second = push_image(&upstream.url(), "team/second", "v1", &[3 << 20]).await;
    // Room for one of the two images on the local disk, not for both.
    let mirror = s3_replica(&upstream.url(), &garage, "", ", local: { max_size: 5MiB }").await;
    let log = || mirror.log();

    skopeo_pull(&mirror.host(), "team/first:v1", &first, &log).await;
    until_in_bucket(&garage, "blobs/", first.blob_digests().len()).await;
    skopeo_pull(&mirror.host(), "team/second:v1", &second, &log).await;
    until_in_bucket(
        &garage,
        "blobs/",
        first.blob_digests().len() + second.blob_digests().len(),
    )
    .await;

    // The first image (the least recently pulled) leaves the local disk.
    let hex = |d: &str| d.strip_prefix("sha256:").unwrap().to_owned();
    let local = |d: &str| {
        let hex = hex(d);
        mirror
            .data_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(&hex)
    };
    tokio::time::timeout(GUARD, async {
        while local(&first.layer_digests[0]).exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the first image was never evicted:\n{}", mirror.log()));
    assert!(
        local(&second.layer_digests[0]).exists(),
        "the second image stays"
    );

    let before = upstream.requests().await.len();
    let fills = metric(&metrics_of(&mirror).await, FILLS).unwrap_or(0.0);
    skopeo_pull(&mirror.host(), "team/first:v1", &first, &log).await;
    let after = upstream.requests().await;
    assert_eq!(
        after.len(),
        before,
        "the evicted image was fetched upstream again: {:#?}",
        &after[before..]
    );
    let refilled = metric(&metrics_of(&mirror).await, FILLS).unwrap_or(0.0) - fills;
    assert!(
        refilled >= first.blob_digests().len() as f64,
        "hot-tier fills moved by {refilled}"
    );
    assert!(
        local(&first.layer_digests[0]).exists(),
        "back in the hot tier"
    );
}

/// Single-node S3 mode, kill -9 of the replica (1) while a large layer is being downloaded and
/// (2) while it is being written to the bucket: the bucket never holds a partial blob, and
/// after a restart the layer pulls with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_node_s3_kill9_mid_pull_leaves_no_partial_blob_in_the_bucket() {
    let garage = Garage::single().await;
    let upstream = fake::Fake::start().await;
    let image = upstream.put_image("team/big", "v1", &[24 << 20], 11);
    let (layer, bytes) = image.layers[0].clone();
    let key = format!("blobs/{}", layer.as_str().replace(':', "/"));
    let (open, gate) = tokio::sync::watch::channel(false);
    *upstream.faults.hold.lock().unwrap() = Some((4 << 20, gate));
    let mut mirror = s3_replica(&upstream.url(), &garage, "", "").await;
    let url = format!("{}/v2/team/big/blobs/{layer}", mirror.url());

    // (1) Killed with the download held after 4 MiB.
    let pull = {
        let url = url.clone();
        tokio::spawn(async move { http().get(url).send().await?.bytes().await })
    };
    upstream.counters.arrival("GET", "/blobs/").await;
    mirror.kill9();
    assert!(
        pull.await.unwrap().is_err(),
        "the client of a killed replica cannot have the whole blob"
    );
    assert!(
        garage.list_objects("blobs/").await.is_empty(),
        "{:?}",
        garage.list_objects("blobs/").await
    );
    open.send(true).unwrap();
    *upstream.faults.hold.lock().unwrap() = None;
    mirror.restart().await;

    // (2) Killed as soon as the blob's upload to the bucket shows: an upload in progress or
    // the object itself.
    let gets = upstream.counters.count("GET", "/blobs/");
    let pull = {
        let url = url.clone();
        tokio::spawn(async move { http().get(url).send().await?.bytes().await })
    };
    let seen = tokio::time::timeout(GUARD, async {
        loop {
            let uploads = garage.s3_request_via(0, "GET", "", "uploads=", None).await;
            if uploads.text().contains("<Upload>") {
                return "an upload in progress";
            }
            if garage
                .list_objects("blobs/")
                .await
                .iter()
                .any(|o| o.key == key)
            {
                return "the object";
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the blob never went to the bucket:\n{}", mirror.log()));
    mirror.kill9();
    eprintln!("killed on seeing {seen}");
    assert_eq!(
        upstream.counters.count("GET", "/blobs/"),
        gets + 1,
        "fetched again after the restart"
    );
    let _ = pull.await;
    for object in garage.list_objects("blobs/").await {
        assert_eq!(object.key, key);
        assert_eq!(object.size, bytes.len() as u64, "a partial blob is visible");
        let held = garage.get_object(&key).await.expect("listed");
        assert!(held == bytes, "the bucket holds other bytes");
    }

    // Restarted, the layer pulls whole and right.
    mirror.restart().await;
    let got = http().get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    let got = got.bytes().await.unwrap();
    assert!(got == bytes, "{}", mirror.log());
}

/// `storage.s3.redirect: true`: a blob only the bucket holds is answered 307 to a presigned
/// Garage URL (signed, without the secret) that plain clients and skopeo follow to the right
/// bytes; a blob in the replica's hot tier is served directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirect_sends_bucket_only_blobs_to_a_presigned_url() {
    let garage = Garage::single().await;
    let upstream = Distribution::start().await;
    let image = push_image(&upstream.url(), "team/app", "v1", &[2 << 20, 300_000]).await;
    let first = s3_replica(&upstream.url(), &garage, ", redirect: true", "").await;
    skopeo_pull(&first.host(), "team/app:v1", &image, &|| first.log()).await;
    until_in_bucket(&garage, "blobs/", image.blob_digests().len()).await;
    until_in_bucket(&garage, "manifests/", 1).await;
    until_in_bucket(&garage, "tags/", 1).await;

    let plain = {
        let _ = http();
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    };
    // In the hot tier: the replica serves the bytes itself.
    for digest in image.blob_digests() {
        let response = plain
            .get(format!("{}/v2/team/app/blobs/{digest}", first.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{digest}");
        assert!(response.headers().get("location").is_none());
        assert_eq!(sha256_digest(&response.bytes().await.unwrap()), digest);
    }

    // A replica on an empty disk: the bucket alone holds the blobs.
    let second = s3_replica(&upstream.url(), &garage, ", redirect: true", "").await;
    let before = upstream.requests().await.len();
    for digest in image.blob_digests() {
        let url = format!("{}/v2/team/app/blobs/{digest}", second.url());
        let response = plain.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 307, "{digest}\n{}", second.log());
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("a Location")
            .to_owned();
        assert!(
            location.starts_with(&format!("{}/", garage.endpoint())),
            "{location}"
        );
        assert!(location.contains("X-Amz-Signature="), "{location}");
        assert!(!location.contains(garage.secret_key()), "{location}");
        let followed = plain.get(&location).send().await.unwrap();
        assert_eq!(followed.status(), 200, "{location}");
        assert_eq!(sha256_digest(&followed.bytes().await.unwrap()), digest);
        // A client that follows redirects gets the bytes from the mirror's URL.
        let bytes = http()
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha256_digest(&bytes), digest);
    }
    skopeo_pull(&second.host(), "team/app:v1", &image, &|| second.log()).await;
    let after = upstream.requests().await;
    assert_eq!(
        after.len(),
        before,
        "the bucket's blobs were fetched upstream: {:#?}",
        &after[before..]
    );
}
