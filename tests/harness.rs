//! Self-tests of the end-to-end harness against distribution directly, as if it were the
//! mirror. When one of these fails the environment or the harness is broken, not
//! regmirror.

mod common;

use common::*;

#[test]
fn parses_distribution_log() {
    let log = concat!(
        r#"{"level":"info","msg":"listening on 127.0.0.1:5055"}"#,
        "\n",
        r#"{"http.request.method":"GET","http.request.uri":"/v2/library/x/blobs/sha256:ab?ns=docker.io","http.response.status":200,"msg":"response completed"}"#,
        "\n",
        r#"{"http.request.method":"GET","http.request.uri":"/v2/foo/blobs/sha256:cd","http.response.status":404,"msg":"response completed with error"}"#,
        "\n",
        r#"{"http.request.method":"POST","http.request.uri":"/v2/foo/blobs/uploads/","http.response.status":202,"msg":"response completed"}"#,
        "\n127.0.0.1 - - not json\n"
    );
    let r = common::distribution::parse_requests(log);
    assert_eq!(r.len(), 3);
    assert!(r[0].is_blob());
    assert_eq!(r[0].ns(), Some("docker.io"));
    assert_eq!(r[1].status, 404);
    assert!(!r[2].is_blob());
}

#[tokio::test(flavor = "multi_thread")]
async fn pusher_and_skopeo_against_distribution() {
    let dist = Distribution::start().await;
    let docker = push_image(&dist.url(), "library/x", "t", &[1000, 200_000]).await;
    let oci = push_image_with(
        &dist.url(),
        "org/y",
        "t",
        &ImageSpec::new(&[5000]).media_types(MediaTypes::Oci),
    )
    .await;
    let index = push_index(
        &dist.url(),
        "library/multi",
        "v1",
        &[Platform::AMD64, Platform::ARM64],
        MediaTypes::Oci,
    )
    .await;
    let list = push_index(
        &dist.url(),
        "library/multi",
        "list",
        &[Platform::AMD64, Platform::ARM64],
        MediaTypes::Docker,
    )
    .await;

    let out = tempdir("copy-");
    let d1 = out.path().join("x");
    skopeo_copy_to_dir(&format!("docker://{}/library/x:t", dist.host()), &d1, false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&d1, &docker, "manifest.json");

    let d2 = out.path().join("y");
    skopeo_copy_to_dir(&format!("docker://{}/org/y:t", dist.host()), &d2, false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&d2, &oci, "manifest.json");

    for idx in [&index, &list] {
        let d = out.path().join(&idx.tag);
        skopeo_copy_to_dir(
            &format!("docker://{}/library/multi:{}", dist.host(), idx.tag),
            &d,
            true,
        )
        .await
        .assert_success();
        assert_eq!(std::fs::read(d.join("manifest.json")).unwrap(), idx.bytes);
        for img in &idx.images {
            let hex = img.manifest_digest.strip_prefix("sha256:").unwrap();
            assert_skopeo_dir_holds(&d, img, &format!("{hex}.manifest.json"));
        }
    }

    // Every pushed blob was fetched exactly once by the five copies above.
    let gets = dist.blob_gets().await;
    let expected = docker.blob_digests().len()
        + oci.blob_digests().len()
        + 2 * index
            .images
            .iter()
            .map(|i| i.blob_digests().len())
            .sum::<usize>();
    assert_eq!(gets, expected, "{:#?}", dist.request_lines().await);
    assert_eq!(dist.blob_gets_for(&docker.layer_digests[1]).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_pulls_through_hosts_toml_mirror() {
    require_root("ctr test");
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/x", "t", &[1000, 200_000]).await;
    let idx = push_index(
        &dist.url(),
        "library/multi",
        "v1",
        &[Platform::AMD64, Platform::ARM64],
        MediaTypes::Oci,
    )
    .await;
    let pushed = dist.requests().await.len();
    let ctd = Containerd::start().await;
    let hosts = tempdir("hosts-");
    let file = write_hosts_toml(hosts.path(), "docker.io", &dist.url());
    let toml = std::fs::read_to_string(file).unwrap();
    assert!(toml.contains("server = \"https://registry-1.docker.io\""));

    ctd.ctr_pull(hosts.path(), "docker.io/library/x:t")
        .await
        .assert_success();
    assert_eq!(
        ctd.image_digest("docker.io/library/x:t").await.as_deref(),
        Some(img.manifest_digest.as_str())
    );
    ctd.ctr_pull(hosts.path(), "docker.io/library/multi:v1")
        .await
        .assert_success();
    assert_eq!(
        ctd.image_digest("docker.io/library/multi:v1")
            .await
            .as_deref(),
        Some(idx.digest.as_str())
    );

    // containerd names the registry it is mirroring on every request.
    let reqs = dist.requests().await.split_off(pushed);
    let pulls: Vec<_> = reqs
        .iter()
        .filter(|r| (r.method == "GET" || r.method == "HEAD") && r.path != "/v2/")
        .collect();
    assert!(!pulls.is_empty(), "{reqs:#?}");
    assert!(
        pulls.iter().all(|r| r.ns() == Some("docker.io")),
        "{pulls:#?}"
    );
    for d in img.blob_digests() {
        assert_eq!(dist.blob_gets_for(&d).await, 1, "{d}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dockerd_pulls_through_registry_mirror() {
    require_root("dockerd test");
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/x", "t", &[1000, 200_000]).await;
    let org = push_image_with(
        &dist.url(),
        "org/y",
        "t",
        &ImageSpec::new(&[3000]).media_types(MediaTypes::Oci),
    )
    .await;
    let docker = Dockerd::start(Containerd::start().await, &dist.url()).await;

    docker.docker_pull("x:t").await.assert_success();
    docker.docker_pull("org/y:t").await.assert_success();
    assert_eq!(
        docker.repo_digests("x:t").await,
        vec![format!("x@{}", img.manifest_digest)]
    );
    assert_eq!(
        docker.repo_digests("org/y:t").await,
        vec![format!("org/y@{}", org.manifest_digest)]
    );
    let inspect = docker.image_inspect("x:t").await.unwrap();
    assert_eq!(inspect["Id"], img.config_digest.as_str());

    // The classic daemon sends plain paths to the mirror, without ns.
    let reqs = dist.requests().await;
    assert!(reqs.iter().any(|r| r.method == "GET"
        && r.path == format!("/v2/library/x/manifests/{}", img.manifest_digest)
        && r.ns().is_none()));
    for d in img.blob_digests().iter().chain(org.blob_digests().iter()) {
        assert_eq!(dist.blob_gets_for(d).await, 1, "{d}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn distribution_with_htpasswd_requires_basic_auth() {
    let dist = Distribution::start_with(DistributionOptions {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    })
    .await;
    let r = http()
        .get(format!("{}/v2/", dist.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("WWW-Authenticate").is_some());
    let img = Pusher::new(&dist.url())
        .basic_auth("alice", "s3cret")
        .push_image("org/private", "v1", &ImageSpec::new(&[100]))
        .await;
    let r = http()
        .get(format!(
            "{}/v2/org/private/manifests/{}",
            dist.url(),
            img.manifest_digest
        ))
        .basic_auth("alice", Some("s3cret"))
        .header("Accept", ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_bytes);
}
