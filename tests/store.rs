//! Store v2 (issue 11): eviction by image with the upstream down afterwards, `max_age` against
//! an injected clock, pins, and an index that stays bounded under churn.
//!
//! The mirror runs in-process (through the production server path) so that tests drive one
//! eviction pass at a time with `Evictor::run_once` and move the cache's clock instead of
//! sleeping.

mod common;
mod fake;

use std::time::Duration;

use common::*;
use fake::{client, Fake};

/// regmirror running in-process.
struct Mirror {
    url: String,
    state: ::regmirror::AppState,
}

/// Runs regmirror in-process in front of `upstream_url` (a real distribution or the fake).
async fn mirror_of(upstream_url: &str, extra: &str) -> (Mirror, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let storage = format!("storage: {{ root: {root:?}, ");
    let extra = if extra.contains("storage: {") {
        extra.replacen("storage: {", &storage, 1)
    } else {
        format!("{extra}\nstorage: {{ root: {root:?} }}")
    };
    let text = format!(
        "listen: 127.0.0.1:0\ndefault_upstream: docker.io\nupstreams:\n  docker.io: {{ url: '{upstream_url}', read_timeout: 5s }}\n{extra}\n"
    );
    let config = ::regmirror::Config::parse(&text, "test").unwrap();
    let state = ::regmirror::state(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = ::regmirror::server::Listener::new(listener, None).unwrap();
    let serving = ::regmirror::serve(listener, state.clone(), std::future::pending());
    tokio::spawn(async move { serving.await.unwrap() });
    (Mirror { url, state }, dir)
}

async fn evict(m: &Mirror) -> ::regmirror::cache::Evicted {
    // The pull records of the requests so far land off their paths: the pass must see them.
    m.state.cache.bucket_writes_settled().await;
    let evictor = m.state.cache.evictor().clone();
    tokio::task::spawn_blocking(move || evictor.run_once())
        .await
        .unwrap()
}

async fn json(url: String) -> (u16, serde_json::Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn image_bytes(img: &PushedImage) -> u64 {
    img.manifest_bytes.len() as u64
        + img.config_bytes.len() as u64
        + img.layer_sizes.iter().sum::<u64>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_eviction_every_tag_still_held_pulls_completely_with_the_upstream_down() {
    let mut dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let a = pusher
        .push_index(
            "library/a",
            "v1",
            &[Platform::AMD64, Platform::ARM64],
            MediaTypes::Oci,
        )
        .await;
    let b = pusher
        .push_image(
            "library/b",
            "v1",
            &ImageSpec::new(&[2048, 600_000]).seed(11),
        )
        .await;
    let c = pusher
        .push_image(
            "library/c",
            "v1",
            &ImageSpec::new(&[2048, 300_000]).seed(12),
        )
        .await;
    let size_a = a.bytes.len() as u64 + a.images.iter().map(image_bytes).sum::<u64>();
    let (size_b, size_c) = (image_bytes(&b), image_bytes(&c));
    let total = size_a + size_b + size_c;
    // All three do not fit; without the least recently pulled (b), the rest is under the low
    // watermark, so one pass removes b and only b.
    let max_size = total * 95 / 100;
    assert!(size_a + size_c < max_size * 80 / 100);
    let (m, _dir) = mirror_of(
        &dist.url(),
        &format!("storage: {{ max_size: {max_size}, low_watermark_percent: 80 }}"),
    )
    .await;
    let host = m.url.trim_start_matches("http://").to_owned();
    let work = tempdir("store-evict");
    let clock = m.state.cache.clock().clone();
    let pull = |name: &str, all: bool, n: usize| {
        let (src, dest) = (
            format!("docker://{host}/library/{name}:v1"),
            work.path().join(format!("{name}-{n}")),
        );
        async move { (skopeo_copy_to_dir(&src, &dest, all).await, dest) }
    };
    for (name, all) in [("a", true), ("b", false), ("c", false), ("a", true)] {
        // Pull times are recorded to the second: move the clock on between pulls.
        clock.advance(Duration::from_secs(5));
        let (out, _) = pull(name, all, 0).await;
        out.assert_success();
    }
    assert!(
        m.state.cache.used_bytes() > max_size,
        "the pulls overfill the cache"
    );
    let evicted = evict(&m).await;
    assert_eq!(evicted.images, 1, "{evicted:?}");
    assert!(m.state.cache.used_bytes() <= max_size * 80 / 100);

    dist.kill9();

    // Every repository the catalog lists, and every tag its (stale) tag list names, pulls
    // completely from the mirror alone.
    let (status, catalog) = json(format!("{}/v2/_catalog", m.url)).await;
    assert_eq!(status, 200);
    let repositories: Vec<String> = catalog["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        repositories,
        vec!["docker.io/library/a", "docker.io/library/c"],
        "b was evicted with everything the index said about it"
    );
    let mut pulled = 0;
    for name in ["a", "b", "c"] {
        let (status, list) = json(format!("{}/v2/library/{name}/tags/list", m.url)).await;
        let tags = list["tags"].as_array().cloned().unwrap_or_default();
        if name == "b" {
            assert!(status != 200 || tags.is_empty(), "b still listed: {list}");
            continue;
        }
        assert_eq!(status, 200, "{name}: {list}");
        assert_eq!(tags, vec![serde_json::json!("v1")]);
        let (out, dest) = pull(name, name == "a", 1).await;
        assert!(out.success, "{name}: {out}");
        if name == "a" {
            assert_skopeo_dir_holds_index(&dest, &a);
        } else {
            assert_skopeo_dir_holds(&dest, &c, "manifest.json");
        }
        pulled += 1;
    }
    assert_eq!(pulled, 2);
    // The evicted image fails cleanly: its manifest is unknown or the upstream is down, and
    // no client gets part of it.
    let r = client()
        .get(format!("{}/v2/library/b/manifests/v1", m.url))
        .send()
        .await
        .unwrap();
    assert!(
        r.status() == 404 || r.status().is_server_error(),
        "{}",
        r.status()
    );
    let (out, _) = pull("b", false, 1).await;
    assert!(!out.success, "b cannot be pulled with the upstream down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_not_pulled_for_max_age_are_removed_below_the_size_limit() {
    let fake = Fake::start().await;
    let old = fake.put_image("library/old", "1", &[10_000], 1);
    let new = fake.put_image("library/new", "1", &[10_000], 2);
    let (m, _dir) = mirror_of(&fake.url(), "cache: { max_age: 1h }").await;
    let get = |path: String| {
        let url = format!("{}/v2/{path}", m.url);
        async move {
            let r = client().get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }
    };
    get("old/manifests/1".into()).await;
    get(format!("old/blobs/{}", old.layers[0].0)).await;
    let clock = m.state.cache.clock().clone();
    clock.advance(Duration::from_secs(40 * 60));
    get("new/manifests/1".into()).await;
    get(format!("new/blobs/{}", new.layers[0].0)).await;
    assert_eq!(evict(&m).await.images, 0, "nothing is an hour old yet");
    clock.advance(Duration::from_secs(30 * 60));
    let evicted = evict(&m).await;
    assert_eq!(evicted.images, 1, "{evicted:?}");
    let store = m.state.cache.store();
    assert!(store.stat(&old.layers[0].0).unwrap().is_none());
    assert!(store.stat(&old.digest).unwrap().is_none());
    assert!(store.stat(&new.layers[0].0).unwrap().is_some());
    // Pulling `new` again keeps it young.
    get("new/manifests/1".into()).await;
    clock.advance(Duration::from_secs(40 * 60));
    assert_eq!(evict(&m).await.images, 0);
    assert!(store.stat(&new.layers[0].0).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_index_stays_bounded_under_churn_and_the_catalog_lists_what_is_held() {
    const IMAGES: usize = 2000;
    let fake = Fake::start().await;
    let images: Vec<_> = (0..IMAGES)
        .map(|i| fake.put_image(&format!("library/g{i}"), "1", &[4096], 10_000 + i as u64))
        .collect();
    let (m, _dir) = mirror_of(
        &fake.url(),
        "storage: { max_size: 2MiB, low_watermark_percent: 50 }",
    )
    .await;
    let http = client();
    let clock = m.state.cache.clock().clone();
    let mut peak = (0usize, 0u64);
    for (i, image) in images.iter().enumerate() {
        for path in [
            format!("g{i}/manifests/1"),
            format!("g{i}/blobs/{}", image.layers[0].0),
        ] {
            let r = http
                .get(format!("{}/v2/{path}", m.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            r.bytes().await.unwrap();
        }
        clock.advance(Duration::from_secs(2));
        if i % 50 == 49 {
            evict(&m).await;
            let footprint = m.state.cache.store().index().footprint().unwrap();
            peak = (peak.0.max(footprint.0), peak.1.max(footprint.1));
        }
    }
    let (entries, disk) = m.state.cache.store().index().footprint().unwrap();
    println!(
        "index after {IMAGES} images: {entries} entries, {disk} bytes on disk; peak {} entries, {} bytes",
        peak.0, peak.1
    );
    // A 2 MiB cache holds a few hundred of these images; each costs about twenty entries.
    assert!(peak.0 <= 12_000, "index entries grew to {}", peak.0);
    assert!(peak.1 <= 64 << 20, "index on disk grew to {} bytes", peak.1);
    let (status, catalog) = json(format!("{}/v2/_catalog", m.url)).await;
    assert_eq!(status, 200);
    let listed = catalog["repositories"].as_array().unwrap();
    let held = images
        .iter()
        .filter(|image| m.state.cache.store().stat(&image.digest).unwrap().is_some())
        .count();
    assert!(held > 0 && held < IMAGES / 2, "{held} images held");
    assert_eq!(listed.len(), held, "the catalog lists exactly what is held");
    for name in listed {
        let name = name.as_str().unwrap();
        let i: usize = name
            .trim_start_matches("docker.io/library/g")
            .parse()
            .unwrap();
        assert!(
            m.state
                .cache
                .store()
                .stat(&images[i].layers[0].0)
                .unwrap()
                .is_some(),
            "{name} listed without its layer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_image_is_fetched_at_start_up_and_survives_a_churn_that_evicts_everything_else() {
    let fake = Fake::start().await;
    let pinned = fake.put_image("library/pinned", "1.4", &[60_000, 40_000], 50);
    let others: Vec<_> = (0..8)
        .map(|i| fake.put_image(&format!("library/o{i}"), "1", &[60_000], 60 + i))
        .collect();
    let (m, _dir) = mirror_of(
        &fake.url(),
        "storage: { max_size: 300KiB, low_watermark_percent: 50 }\npins: [ 'docker.io/library/pinned:1.*' ]",
    )
    .await;
    // The task `run` starts for `pins:`, started here the same way.
    let config = ::regmirror::Config::parse(
        &format!(
            "default_upstream: docker.io\nupstreams: {{ docker.io: {{ url: '{}' }} }}\npins: [ 'docker.io/library/pinned:1.*' ]\n",
            fake.url()
        ),
        "test",
    )
    .unwrap();
    let (too_big, mut refused) = tokio::sync::oneshot::channel();
    let mut passes = m.state.cache.pin_passes();
    tokio::spawn(::regmirror::cache::pins::run(
        m.state.cache.clone(),
        config.pins.clone(),
        Duration::from_secs(3600),
        std::future::pending(),
        too_big,
    ));
    tokio::time::timeout(Duration::from_secs(60), passes.wait_for(|n| *n >= 1))
        .await
        .expect("first pin pass")
        .unwrap();
    assert!(refused.try_recv().is_err(), "the pins fit");
    // Fetched without a client asking: manifest, config and both layers are in the store.
    let store = m.state.cache.store().clone();
    let held = |d: &::regmirror::oci::Digest| store.stat(d).unwrap().is_some();
    assert!(held(&pinned.digest));
    assert!(pinned.layers.iter().all(|(d, _)| held(d)));
    for (i, image) in others.iter().enumerate() {
        for path in [
            format!("o{i}/manifests/1"),
            format!("o{i}/blobs/{}", image.layers[0].0),
        ] {
            let r = client()
                .get(format!("{}/v2/{path}", m.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
        m.state.cache.clock().advance(Duration::from_secs(5));
        evict(&m).await;
    }
    // Ageing does not take it either.
    m.state
        .cache
        .clock()
        .advance(Duration::from_secs(365 * 86400));
    evict(&m).await;
    assert!(held(&pinned.digest), "the pinned manifest stays");
    assert!(
        pinned.layers.iter().all(|(d, _)| held(d)),
        "its layers stay"
    );
    assert!(
        others.iter().all(|o| !held(&o.layers[0].0)),
        "everything else was evicted"
    );
    let page = client()
        .get(format!("{}/", m.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"data-pinned="docker.io/library/pinned:1.4""#),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pins_larger_than_the_cache_are_refused_once_their_size_is_known() {
    let fake = Fake::start().await;
    fake.put_image("library/big", "1", &[400_000], 70);
    let (m, _dir) = mirror_of(&fake.url(), "storage: { max_size: 300KiB }").await;
    let config = ::regmirror::Config::parse(
        &format!(
            "default_upstream: docker.io\nupstreams: {{ docker.io: {{ url: '{}' }} }}\npins: [ 'docker.io/library/big:1' ]\n",
            fake.url()
        ),
        "test",
    )
    .unwrap();
    let (too_big, refused) = tokio::sync::oneshot::channel();
    tokio::spawn(::regmirror::cache::pins::run(
        m.state.cache.clone(),
        config.pins.clone(),
        Duration::from_secs(3600),
        std::future::pending(),
        too_big,
    ));
    let message = tokio::time::timeout(Duration::from_secs(60), refused)
        .await
        .expect("first pin pass")
        .unwrap();
    assert!(message.contains("storage.max_size"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_content_no_image_holds_is_evicted_too() {
    let fake = Fake::start().await;
    let images: Vec<_> = (0..3)
        .map(|i| fake.put_image(&format!("library/s{i}"), "1", &[100_000], 80 + i))
        .collect();
    let (m, _dir) = mirror_of(
        &fake.url(),
        "storage: { max_size: 250KiB, low_watermark_percent: 50 }",
    )
    .await;
    let store = m.state.cache.store().clone();
    for (i, image) in images.iter().enumerate() {
        let url = format!("{}/v2/s{i}/blobs/{}", m.url, image.layers[0].0);
        client()
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        // As if adopted at start-up or indexed before images existed: held by no image.
        store.index().remove_image(&image.layers[0].0).unwrap();
    }
    assert!(store.used_bytes() > 250 << 10);
    let evicted = evict(&m).await;
    assert!(evicted.images >= 2, "{evicted:?}");
    assert!(store.used_bytes() <= 125 << 10, "{}", store.used_bytes());
}
