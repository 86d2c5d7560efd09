//! Resilience: a bounded cache, pass-through when the store cannot take a blob, upstreams that
//! hang, and crashes in the middle of a download.

mod common;
mod fake;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fake::{client, mirror, mirror_at, Fake};

fn blob_path(root: &std::path::Path, digest: &regmirror::oci::Digest) -> std::path::PathBuf {
    root.join("blobs/sha256")
        .join(&digest.hex()[..2])
        .join(digest.hex())
}

fn sha(bytes: &[u8]) -> String {
    common::sha256_digest(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_keeps_the_cache_under_max_size_and_recent_blobs() {
    let fake = Fake::start().await;
    let images: Vec<_> = (0..5)
        .map(|i| fake.put_image(&format!("library/i{i}"), "1", &[1 << 20], 100 + i))
        .collect();
    let m = mirror(
        &fake,
        "storage: { max_size: 3.5MiB, low_watermark_percent: 90 }",
    )
    .await;
    let http = client();
    let pull = |i: usize| {
        let (http, url) = (
            http.clone(),
            format!("{}/v2/i{i}/blobs/{}", m.url, images[i].layers[0].0),
        );
        async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }
    };
    pull(0).await;
    // Pull times are written at most once a second: instead of waiting, move the cache's
    // clock on between the pulls, so that pulling blob 0 again records a new pull.
    let clock = m.state.cache.clock().clone();
    clock.advance(Duration::from_secs(10));
    pull(1).await;
    clock.advance(Duration::from_secs(10));
    let store = m.state.cache.store().clone();
    pull(0).await;
    pull(2).await;
    pull(3).await;
    let max = 3.5 * (1 << 20) as f64;
    assert!(
        store.used_bytes() as f64 > max,
        "the test must overfill the cache"
    );
    let evictor = m.state.cache.evictor().clone();
    let evicted = tokio::task::spawn_blocking(move || evictor.run_once())
        .await
        .unwrap();
    assert!(evicted.blobs >= 1, "{evicted:?}");
    assert!(
        store.used_bytes() as f64 <= max * 0.9,
        "used {} after eviction",
        store.used_bytes()
    );
    assert!(
        blob_path(&m.root, &images[0].layers[0].0).exists(),
        "recently used blob 0 must stay"
    );
    assert!(
        blob_path(&m.root, &images[3].layers[0].0).exists(),
        "newest blob must stay"
    );
    assert!(
        !blob_path(&m.root, &images[1].layers[0].0).exists(),
        "least recently used blob 1 goes first"
    );
    // An evicted blob is fetched again and served correctly.
    assert_eq!(sha(&pull(1).await), images[1].layers[0].0.as_str());
    let metrics = m.state.metrics.render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regmirror_evictions_total ") && !l.ends_with(" 0")),
        "eviction counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_being_read_is_not_evicted() {
    let fake = Fake::start().await;
    // Larger than the loopback socket buffers, so the reader is still reading when eviction runs.
    let a = fake.put_image("library/a", "1", &[32 << 20], 200);
    let b = fake.put_image("library/b", "1", &[16 << 20], 201);
    let m = mirror(&fake, "storage: { max_size: 40MiB }").await;
    let http = client();
    let url_a = format!("{}/v2/a/blobs/{}", m.url, a.layers[0].0);
    http.get(&url_a)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // Hold a reader on blob a (the oldest) while b pushes the cache over its limit.
    let mut reader = http.get(&url_a).send().await.unwrap();
    let first = reader.chunk().await.unwrap().unwrap();
    http.get(format!("{}/v2/b/blobs/{}", m.url, b.layers[0].0))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let evictor = m.state.cache.evictor().clone();
    tokio::task::spawn_blocking(move || evictor.run_once())
        .await
        .unwrap();
    assert!(
        blob_path(&m.root, &a.layers[0].0).exists(),
        "pinned by its reader"
    );
    let mut body = first.to_vec();
    while let Some(chunk) = reader.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(sha(&body), a.layers[0].0.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_larger_than_the_cache_passes_through_verified() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/huge", "1", &[3 << 20], 300);
    let digest = image.layers[0].0.clone();
    let m = mirror(&fake, "storage: { max_size: 2MiB }").await;
    let http = client();
    for _ in 0..2 {
        let body = http
            .get(format!("{}/v2/huge/blobs/{digest}", m.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha(&body), digest.as_str());
    }
    assert!(!blob_path(&m.root, &digest).exists());
    assert!(m.state.cache.store().used_bytes() <= 2 << 20);
    // A range of an uncached blob is still cut from verified bytes.
    let r = http
        .get(format!("{}/v2/huge/blobs/{digest}", m.url))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), image.layers[0].1.slice(10..20));
    // Lying upstream, uncached path: the transfer fails rather than completing wrong.
    fake.faults.corrupt.store(true, Ordering::SeqCst);
    let r = http
        .get(format!("{}/v2/huge/blobs/{digest}", m.url))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_turns_into_pass_through() {
    common::require_root("mounting a small tmpfs to fill the disk");
    let fake = Fake::start().await;
    let small = fake.put_image("library/small", "1", &[100_000], 400);
    let big = fake.put_image("library/big", "1", &[6 << 20], 401);
    let dir = common::tempdir("regmirror-full");
    let mount = dir.path().join("store");
    std::fs::create_dir_all(&mount).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let m = mirror_at(&fake, &mount.join("data"), "storage: { min_free: 1MiB }").await;
    let http = client();
    let get = |repo: &str, digest: &regmirror::oci::Digest| {
        http.get(format!("{}/v2/{repo}/blobs/{digest}", m.url))
            .send()
    };
    let body = get("small", &small.layers[0].0)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha(&body), small.layers[0].0.as_str());
    assert!(
        blob_path(&m.root, &small.layers[0].0).exists(),
        "a blob that fits is cached"
    );
    let body = get("big", &big.layers[0].0)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        sha(&body),
        big.layers[0].0.as_str(),
        "served straight from the upstream"
    );
    assert!(!blob_path(&m.root, &big.layers[0].0).exists());
    let metrics = m.state.metrics.render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regmirror_passthrough_total ") && !l.ends_with(" 0")),
        "pass-through counted"
    );
    // Still up, still serving the cache.
    let r = get("small", &small.layers[0].0).await.unwrap();
    assert_eq!(r.headers()["x-regmirror-cache"], "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_upstream_times_out_and_cached_tags_are_served_stale() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/app", "1", &[10], 500);
    // The fake mirror config sets read_timeout: 2s for the upstream.
    let m = mirror(&fake, "cache: { tag_ttl: 0s }").await;
    let http = client();
    assert_eq!(
        http.get(format!("{}/v2/app/manifests/1", m.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    fake.faults.hang.store(true, Ordering::SeqCst);
    // A hang would never answer: this deadline only guards against that; the assertions are
    // what the answers say.
    let guard = Duration::from_secs(60);
    let r = tokio::time::timeout(
        guard,
        http.get(format!("{}/v2/app/manifests/1", m.url)).send(),
    )
    .await
    .expect("the stale tag is answered")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-regmirror-cache"], "stale");
    assert_eq!(r.headers()["docker-content-digest"], image.digest.as_str());
    let r = tokio::time::timeout(
        guard,
        http.get(format!("{}/v2/app/manifests/never-cached", m.url))
            .send(),
    )
    .await
    .expect("the upstream's deadline answers")
    .unwrap();
    assert_eq!(r.status(), 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_a_download_leaves_no_partial_blob() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/big", "1", &[256 << 20], 600);
    let digest = image.layers[0].0.clone();
    // Slow enough that the kill lands mid-download (4096 chunks of 64 KiB).
    fake.faults.chunk_delay_ms.store(2, Ordering::SeqCst);
    let config = common::RegmirrorConfig::docker_io(&fake.url());
    let mut mirror = config.start().await;
    let http = client();
    let mut response = http
        .get(format!("{}/v2/big/blobs/{digest}", mirror.url()))
        .send()
        .await
        .unwrap();
    let mut received = 0;
    while received < 8 << 20 {
        received += response
            .chunk()
            .await
            .unwrap()
            .expect("download continues")
            .len();
    }
    let tmp = mirror.data_dir().join("tmp");
    assert!(
        std::fs::read_dir(&tmp).unwrap().count() > 0,
        "a download is in progress"
    );
    mirror.kill9();
    drop(response);
    mirror.restart().await;
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "partial download removed at start-up"
    );
    assert!(!blob_path(mirror.data_dir(), &digest).exists());
    fake.faults.chunk_delay_ms.store(0, Ordering::SeqCst);
    let body = http
        .get(format!("{}/v2/big/blobs/{digest}", mirror.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha(&body), digest.as_str());
    assert!(
        blob_path(mirror.data_dir(), &digest).exists(),
        "committed after the retry"
    );
}
