//! The shared bucket's records and bounds. Issue 12 item 5: the bucket stays within
//! `storage.max_size` and `cache.max_age`, by image, with each replica removing only the images
//! it owns, and pins holding cluster-wide. Issue 18: eviction marks before it deletes, passes
//! reuse what they learned across restarts, and a replica's index is a cache in front of the
//! bucket's records.
//!
//! Real programs: Garage (the bucket), distribution (the upstream), skopeo (the client). The
//! replicas run in-process through the production server path, so a test drives one pass at a
//! time (`Cache::evict_bucket_once`) and moves each replica's clock instead of sleeping.

mod common;

use std::time::Duration;

use ::regmirror::oci::Digest;
use ::regmirror::storage::s3::{Bucket, BucketOptions};
use common::*;

/// Safety net against hangs only; never the assertion.
const DEADLINE: Duration = Duration::from_secs(120);

/// The shared single-node Garage harness, with this file's views of it.
struct Garage(common::garage::Garage);

impl Garage {
    async fn single() -> Garage {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Garage(common::garage::Garage::single().await)
    }

    fn s3_yaml(&self) -> String {
        format!("s3: {}", self.0.s3_yaml())
    }

    /// A client of the bucket of our own, to look at what it holds.
    fn bucket(&self) -> Bucket {
        Bucket::new(
            &BucketOptions {
                endpoint: self.0.endpoint(),
                bucket: self.0.bucket().into(),
                region: self.0.region().into(),
                access_key_id: self.0.access_key().into(),
                secret_access_key: self.0.secret_key().into(),
                path_style: true,
            },
            &prometheus::Registry::new(),
        )
        .unwrap()
    }
}

/// What the bucket holds: blob and manifest digests with their sizes.
async fn content(bucket: &Bucket) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for prefix in ["blobs", "manifests"] {
        for item in bucket.list(prefix).await.unwrap() {
            let hex = item.name.trim_start_matches("sha256/");
            out.push((format!("sha256:{hex}"), item.size));
        }
    }
    out
}

async fn total(bucket: &Bucket) -> u64 {
    content(bucket).await.iter().map(|(_, s)| s).sum()
}

async fn holds(bucket: &Bucket, digest: &str) -> bool {
    content(bucket).await.iter().any(|(d, _)| d == digest)
}

async fn tag_in_bucket(bucket: &Bucket, repo: &str, tag: &str) -> Option<Digest> {
    bucket
        .get_tag("docker.io", repo, tag)
        .await
        .unwrap()
        .map(|t| t.digest)
}

/// A replica in-process, its peer channel and membership included when `cluster` is given.
struct Replica {
    url: String,
    state: ::regmirror::AppState,
    dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<()>,
}

async fn replica(upstream: &str, garage: &Garage, storage: &str, extra: &str) -> Replica {
    replica_in(tempdir("replica-"), upstream, garage, storage, extra).await
}

/// A replica on `dir`'s data directory (one a stopped replica left, or a new one).
async fn replica_in(
    dir: tempfile::TempDir,
    upstream: &str,
    garage: &Garage,
    storage: &str,
    extra: &str,
) -> Replica {
    let root = dir.path().join("data");
    let text = format!(
        "listen: 127.0.0.1:0\ndefault_upstream: docker.io\n\
         upstreams:\n  docker.io: {{ url: '{upstream}', read_timeout: 5s }}\n\
         storage: {{ root: {root:?}, local: {{ max_size: 1GiB }}, {}, {storage} }}\n{extra}\n",
        garage.s3_yaml()
    );
    let config = ::regmirror::Config::parse(&text, "test").unwrap();
    let state = ::regmirror::state(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = ::regmirror::server::Listener::new(listener, None).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = ::regmirror::serve(listener, state.clone(), async move {
        let _ = stopped.await;
    });
    let serving = tokio::spawn(async move { serving.await.unwrap() });
    // The peer channel and membership, as `run` starts them.
    if let (Some(cluster), Some(cluster_config)) = (state.cache.cluster(), &config.cluster) {
        let peer = tokio::net::TcpListener::bind(cluster_config.listen)
            .await
            .unwrap();
        let peer = ::regmirror::server::Listener::new(peer, None).unwrap();
        let router = ::regmirror::api::peer::router(state.clone(), cluster.clone());
        let server_config = config.server.clone();
        tokio::spawn(async move {
            ::regmirror::server::serve(
                peer,
                router,
                &server_config,
                ::regmirror::server::Options::default(),
                std::future::pending::<()>(),
            )
            .await
            .unwrap();
        });
        tokio::spawn(cluster.clone().run(std::future::pending::<()>()));
    }
    Replica {
        url,
        state,
        dir,
        stop,
        serving,
    }
}

impl Replica {
    /// Stops serving and lets go of the store (its lock included): the data directory stays.
    async fn stop(self) -> tempfile::TempDir {
        self.settle().await;
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.serving)
            .await
            .expect("the replica stops within the deadline")
            .unwrap();
        self.dir
    }

    /// S3 requests of operation `op` this replica made.
    fn s3_requests(&self, op: &str) -> u64 {
        self.state
            .metrics
            .registry()
            .gather()
            .iter()
            .filter(|family| family.name() == ::regmirror::storage::s3::S3_REQUESTS)
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "op" && l.value() == op)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    fn host(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// Pulls `repo:v1` whole (every platform) into a fresh directory, and waits until the
    /// bucket writes it started are done.
    async fn pull(&self, repo: &str) -> CmdOutput {
        let work = tempdir("pull-");
        let out = tokio::time::timeout(
            DEADLINE,
            skopeo_copy_to_dir(
                &format!("docker://{}/{repo}:v1", self.host()),
                &work.path().join("image"),
                true,
            ),
        )
        .await
        .expect("pull within the deadline");
        self.settle().await;
        out
    }

    async fn settle(&self) {
        tokio::time::timeout(DEADLINE, self.state.cache.bucket_writes_settled())
            .await
            .expect("bucket writes settle");
    }

    fn advance(&self, by: Duration) {
        self.state.cache.clock().advance(by);
    }

    async fn pass(&self) -> ::regmirror::cache::BucketEvicted {
        tokio::time::timeout(DEADLINE, self.state.cache.evict_bucket_once())
            .await
            .expect("pass within the deadline")
            .unwrap()
    }

    /// A pass that marks what goes and deletes nothing, then one past the grace that deletes
    /// what this replica owns of it.
    async fn pass_and_delete(&self) -> ::regmirror::cache::BucketEvicted {
        let marking = self.pass().await;
        assert!(
            marking.removed_roots.is_empty(),
            "nothing goes before its grace: {marking:?}"
        );
        self.advance(PAST_GRACE);
        self.pass().await
    }
}

/// Past the default grace (`storage.s3.evict_grace`, 15 minutes) and the two pass intervals
/// (70 s each at most) the owner waits after it, so every replica has dropped its tags first.
const PAST_GRACE: Duration = Duration::from_secs(18 * 60);

fn image_bytes(img: &PushedImage) -> u64 {
    img.manifest_bytes.len() as u64
        + img.config_bytes.len() as u64
        + img.layer_sizes.iter().sum::<u64>()
}

/// More than a replica's own record interval, so each pull below is a new last pull.
const BETWEEN_PULLS: Duration = Duration::from_secs(15 * 60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_max_size_the_least_recently_pulled_image_leaves_the_bucket_and_the_rest_pulls_from_it_alone(
) {
    let garage = Garage::single().await;
    let bucket = garage.bucket();
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
            &ImageSpec::new(&[2048, 600_000]).seed(21),
        )
        .await;
    let c = pusher
        .push_image(
            "library/c",
            "v1",
            // Same seed: c's first layer is b's.
            &ImageSpec::new(&[2048, 300_000]).seed(21),
        )
        .await;
    let shared = b.layer_digests[0].clone();
    assert_eq!(shared, c.layer_digests[0]);
    assert_ne!(b.layer_digests[1], c.layer_digests[1]);
    let size_a = a.bytes.len() as u64 + a.images.iter().map(image_bytes).sum::<u64>();
    let (size_b, size_c) = (image_bytes(&b), image_bytes(&c));
    // All three do not fit; without b (the least recently pulled) the rest is under the low
    // watermark: one pass removes b and only b.
    let max_size = (size_a + size_b + size_c) * 95 / 100;
    assert!(size_a + size_c < max_size * 80 / 100);
    // Every pull revalidates its tag with the upstream.
    let r = replica(
        &dist.url(),
        &garage,
        &format!("max_size: {max_size}, low_watermark_percent: 80"),
        "cache: { tag_ttl: 0s }",
    )
    .await;
    for name in ["a", "b", "c", "a"] {
        r.advance(BETWEEN_PULLS);
        r.pull(&format!("library/{name}")).await.assert_success();
    }
    let before = total(&bucket).await;
    assert!(before > max_size, "the pulls overfill the bucket: {before}");
    // The local hot tier is far under its own bound: only the bucket is over.
    assert!(r.state.cache.used_bytes() < 1 << 30);

    let pass = r.pass_and_delete().await;
    assert_eq!(pass.total, before);
    assert_eq!(pass.cut, 1, "{pass:?}");
    assert_eq!(pass.cut_roots[0].as_str(), b.manifest_digest, "{pass:?}");
    let after = total(&bucket).await;
    assert!(after <= max_size * 80 / 100, "{after} > low watermark");
    assert_eq!(
        after,
        before - (size_b - b.layer_sizes[0]),
        "b's content and only b's"
    );
    // b is gone: its tag, manifest, config and own layer; the layer c shares stays.
    assert_eq!(tag_in_bucket(&bucket, "library/b", "v1").await, None);
    assert!(!holds(&bucket, &b.manifest_digest).await);
    for digest in b.blob_digests() {
        assert_eq!(
            holds(&bucket, &digest).await,
            digest == shared,
            "{digest} of b"
        );
    }
    assert!(tag_in_bucket(&bucket, "library/a", "v1").await.is_some());
    assert!(tag_in_bucket(&bucket, "library/c", "v1").await.is_some());
    // A second pass finds nothing more to do.
    assert_eq!(r.pass().await.cut, 0);
    // Counted: b's manifest, config and own layer.
    let metrics = http()
        .get(format!("{}/metrics", r.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("regmirror_bucket_evictions_total 3\n"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "regmirror_bucket_evicted_bytes_total {}\n",
        size_b - b.layer_sizes[0]
    )));

    // The evicting replica forgot its tag for b, so b was never answered from a tag whose
    // content the bucket no longer held. Pulled again (through the upstream for its tag,
    // from the hot tier for the rest), b is back in the bucket whole: what the hot tier held
    // is written through with the manifest.
    let index = r.state.cache.store().index();
    assert!(index
        .get_tag("docker.io", "library/b", "v1")
        .unwrap()
        .is_none());
    r.pull("library/b").await.assert_success();
    assert_eq!(
        tag_in_bucket(&bucket, "library/b", "v1")
            .await
            .map(|d| d.to_string()),
        Some(b.manifest_digest.clone())
    );
    for digest in b.blob_digests() {
        assert!(
            holds(&bucket, &digest).await,
            "{digest} of b back in the bucket"
        );
    }

    // With the upstream gone, a replica on an empty disk pulls a, b and c completely from
    // the bucket alone.
    dist.kill9();
    let fresh = replica(
        &dist.url(),
        &garage,
        &format!("max_size: {max_size}, low_watermark_percent: 80"),
        "",
    )
    .await;
    fresh.pull("library/a").await.assert_success();
    fresh.pull("library/c").await.assert_success();
    fresh.pull("library/b").await.assert_success();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_nobody_pulled_for_max_age_leave_the_bucket_below_the_size_limit() {
    let garage = Garage::single().await;
    let bucket = garage.bucket();
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let old = pusher
        .push_image("library/old", "v1", &ImageSpec::new(&[4096]).seed(31))
        .await;
    let kept = pusher
        .push_image("library/kept", "v1", &ImageSpec::new(&[4096]).seed(32))
        .await;
    let r = replica(
        &dist.url(),
        &garage,
        "max_size: 1GiB",
        "cache: { max_age: 1d }",
    )
    .await;
    r.pull("library/old").await.assert_success();
    r.pull("library/kept").await.assert_success();
    assert_eq!(r.pass().await.cut, 0, "nothing is old yet");

    r.advance(Duration::from_secs(36 * 3600));
    r.pull("library/kept").await.assert_success();
    let pass = r.pass_and_delete().await;
    assert_eq!(pass.cut_roots.len(), 1, "{pass:?}");
    assert_eq!(pass.cut_roots[0].as_str(), old.manifest_digest);
    assert_eq!(tag_in_bucket(&bucket, "library/old", "v1").await, None);
    for digest in old.blob_digests() {
        assert!(!holds(&bucket, &digest).await);
    }
    assert!(tag_in_bucket(&bucket, "library/kept", "v1").await.is_some());
    for digest in kept.blob_digests() {
        assert!(holds(&bucket, &digest).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_image_stays_in_the_bucket_even_for_a_replica_whose_pin_pass_has_not_run() {
    let garage = Garage::single().await;
    let bucket = garage.bucket();
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let pinned = pusher
        .push_image("library/pinned", "v1", &ImageSpec::new(&[200_000]).seed(41))
        .await;
    let mut others = Vec::new();
    for i in 0..3 {
        others.push(
            pusher
                .push_image(
                    &format!("library/o{i}"),
                    "v1",
                    &ImageSpec::new(&[200_000]).seed(42 + i),
                )
                .await,
        );
    }
    let storage = "max_size: 500KiB, low_watermark_percent: 50";
    let pins = "pins: [ 'docker.io/library/pinned:v1' ]";
    let with_pins = replica(&dist.url(), &garage, storage, pins).await;
    let config = ::regmirror::Config::parse(
        &format!(
            "default_upstream: docker.io\nupstreams: {{ docker.io: {{ url: '{}' }} }}\n{pins}\n",
            dist.url()
        ),
        "test",
    )
    .unwrap();
    // The pin pass is the oldest pull of all.
    let pass = with_pins.state.cache.refresh_pins(&config.pins).await;
    assert_eq!(pass.failed, 0);
    with_pins.settle().await;
    for i in 0..3 {
        with_pins.advance(BETWEEN_PULLS);
        with_pins
            .pull(&format!("library/o{i}"))
            .await
            .assert_success();
    }
    assert!(total(&bucket).await > 500 << 10);

    // Another replica, started with no pin pass of its own yet, decides for the bucket.
    let other = replica(&dist.url(), &garage, storage, "").await;
    other.advance(BETWEEN_PULLS * 4);
    let pass = other.pass_and_delete().await;
    assert!(pass.cut >= 1, "{pass:?}");
    assert!(
        !pass
            .cut_roots
            .iter()
            .any(|r| r.as_str() == pinned.manifest_digest),
        "{pass:?}"
    );
    assert!(tag_in_bucket(&bucket, "library/pinned", "v1")
        .await
        .is_some());
    for digest in pinned.blob_digests() {
        assert!(holds(&bucket, &digest).await);
    }
    // What it cut instead is the oldest pull that is not pinned.
    assert_eq!(pass.cut_roots[0].as_str(), others[0].manifest_digest);
    assert_eq!(tag_in_bucket(&bucket, "library/o0", "v1").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_cluster_each_replica_removes_only_the_images_it_owns_and_together_they_reach_the_bound(
) {
    let garage = Garage::single().await;
    let bucket = garage.bucket();
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let mut images = Vec::new();
    for i in 0..8u64 {
        images.push(
            pusher
                .push_image(
                    &format!("library/i{i}"),
                    "v1",
                    &ImageSpec::new(&[100_000]).seed(50 + i),
                )
                .await,
        );
    }
    let size: u64 = images.iter().map(image_bytes).sum();
    // Half the images must go.
    let max_size = size * 70 / 100;
    let low = max_size * 75 / 100;
    let storage = format!("max_size: {max_size}, low_watermark_percent: 75");
    // Ownership hashes the peer addresses, which take free ports: pick a pair under which each
    // replica owns one of the three oldest images (each cut below), so the test always shows
    // both shares.
    let ports = loop {
        let ports = [free_port(), free_port()];
        let addresses = ports.map(|p| format!("127.0.0.1:{p}"));
        let owners: std::collections::HashSet<&str> = images[..3]
            .iter()
            .filter_map(|i| {
                ::regmirror::cluster::rendezvous::pick(
                    addresses.iter().map(String::as_str),
                    &i.manifest_digest,
                )
            })
            .collect();
        if owners.len() == 2 {
            break ports;
        }
    };
    let peers = format!("[127.0.0.1:{}, 127.0.0.1:{}]", ports[0], ports[1]);
    let cluster = |port: u16| {
        format!("cluster: {{ peers: {peers}, listen: '127.0.0.1:{port}', secret: 0123456789abcdef0123456789abcdef, refresh: 200ms }}")
    };
    let r1 = replica(&dist.url(), &garage, &storage, &cluster(ports[0])).await;
    let r2 = replica(&dist.url(), &garage, &storage, &cluster(ports[1])).await;
    tokio::time::timeout(DEADLINE, async {
        for r in [&r1, &r2] {
            let cluster = r.state.cache.cluster().unwrap();
            while !cluster.ready() || cluster.members().iter().filter(|m| m.healthy).count() < 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
    .await
    .expect("both replicas see each other");

    for (i, image) in images.iter().enumerate() {
        for r in [&r1, &r2] {
            r.advance(BETWEEN_PULLS);
        }
        let r = if i % 2 == 0 { &r1 } else { &r2 };
        r.pull(&image.repo).await.assert_success();
        r1.settle().await;
        r2.settle().await;
    }
    let before = total(&bucket).await;
    assert!(before > max_size);

    let owner_is_r1 = |root: &Digest| {
        matches!(
            r1.state.cache.cluster().unwrap().owner(root.as_str()),
            ::regmirror::cluster::Owner::Me
        )
    };
    // Both mark their share first; past the grace, each deletes it.
    let marking = r2.pass().await;
    assert!(
        marking.removed_roots.is_empty() && marking.marked >= 1,
        "{marking:?}"
    );
    r2.advance(PAST_GRACE);
    let first = r1.pass_and_delete().await;
    assert!(first.cut >= 3, "{first:?}");
    let (mine, theirs): (Vec<Digest>, Vec<Digest>) =
        first.cut_roots.iter().cloned().partition(owner_is_r1);
    assert!(
        !mine.is_empty() && !theirs.is_empty(),
        "both own some of what goes: {first:?}"
    );
    assert_eq!(first.removed_roots, mine, "r1 removed exactly what it owns");
    let oldest: Vec<&str> = images[..first.cut]
        .iter()
        .map(|i| i.manifest_digest.as_str())
        .collect();
    let cut: Vec<&str> = first.cut_roots.iter().map(Digest::as_str).collect();
    assert_eq!(cut, oldest, "the least recently pulled go first");
    for image in &images[..first.cut] {
        let gone = !holds(&bucket, &image.manifest_digest).await;
        let r1_owns = mine.iter().any(|d| d.as_str() == image.manifest_digest);
        assert_eq!(gone, r1_owns, "{} is r1's to remove or not", image.repo);
        assert_eq!(
            tag_in_bucket(&bucket, &image.repo, "v1").await.is_none(),
            r1_owns
        );
    }
    assert!(
        total(&bucket).await > low,
        "r1 alone does not reach the bound"
    );

    // r2 decides the same (what r1 removed is gone from its listing, and the rest of the
    // cut is still the oldest) and removes its share.
    let second = r2.pass().await;
    assert_eq!(second.removed_roots, theirs, "{second:?}");
    let after = total(&bucket).await;
    assert!(after <= low, "together within the bound: {after} > {low}");
    for image in &images[first.cut..] {
        assert!(tag_in_bucket(&bucket, &image.repo, "v1").await.is_some());
        for digest in image.blob_digests() {
            assert!(holds(&bucket, &digest).await);
        }
    }
}

/// Eviction never breaks a pull (issue 18): a pass marks what goes and deletes nothing; within
/// the grace a presigned redirect handed out before the mark still fetches its blob, and a pull
/// saves the image (its mark goes, the next oldest is marked instead); past the grace every
/// replica drops its local tags for the image before its owner deletes it, so no replica
/// answers a tag whose content is gone, and what stays pulls completely with the upstream down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_marks_first_and_a_pull_within_the_grace_saves_the_image() {
    let garage = Garage::single().await;
    let bucket = garage.bucket();
    let mut dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let a = pusher
        .push_image("library/a", "v1", &ImageSpec::new(&[300_000]).seed(61))
        .await;
    let b = pusher
        .push_image("library/b", "v1", &ImageSpec::new(&[300_000]).seed(62))
        .await;
    let max_size = (image_bytes(&a) + image_bytes(&b)) * 80 / 100;
    let storage = format!("max_size: {max_size}, low_watermark_percent: 70");
    let r = replica(&dist.url(), &garage, &storage, "").await;
    // b is pulled first: the least recently pulled, the one that goes.
    r.advance(BETWEEN_PULLS);
    r.pull("library/b").await.assert_success();
    r.advance(BETWEEN_PULLS);
    r.pull("library/a").await.assert_success();
    assert!(total(&bucket).await > max_size);
    // A presigned URL to one of b's blobs, handed out before the mark.
    let layer = b.layer_digests[0].clone();
    let url = bucket
        .presigned_blob_url(&layer.parse().unwrap(), Duration::from_secs(300))
        .await
        .unwrap();

    let first = r.pass().await;
    assert_eq!(first.cut_roots.len(), 1, "{first:?}");
    assert_eq!(first.cut_roots[0].as_str(), b.manifest_digest);
    assert_eq!(
        (first.marked, first.removed_roots.len()),
        (1, 0),
        "{first:?}"
    );
    assert!(
        holds(&bucket, &b.manifest_digest).await,
        "marked, not deleted"
    );
    assert!(tag_in_bucket(&bucket, "library/b", "v1").await.is_some());
    // Within the grace: the redirect still fetches its bytes, and b is pulled again.
    let fetched = http().get(&url).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(sha256_digest(&fetched.bytes().await.unwrap()), layer);
    r.advance(Duration::from_secs(5 * 60));
    r.pull("library/b").await.assert_success();

    // Past the grace: b was pulled after its mark and stays; a is now the oldest and is
    // marked in its place.
    r.advance(PAST_GRACE);
    let second = r.pass().await;
    assert_eq!(second.cut_roots.len(), 1, "{second:?}");
    assert_eq!(second.cut_roots[0].as_str(), a.manifest_digest);
    assert_eq!(
        (second.marked, second.unmarked, second.removed_roots.len()),
        (1, 1, 0),
        "{second:?}"
    );
    for digest in b.blob_digests().iter().chain([&b.manifest_digest]) {
        assert!(holds(&bucket, digest).await, "{digest} of b kept");
    }

    // a's grace runs out: first this replica forgets its tag (forgotten, nothing deleted
    // yet), two pass intervals later its owner deletes it.
    let index = r.state.cache.store().index();
    assert!(index
        .get_tag("docker.io", "library/a", "v1")
        .unwrap()
        .is_some());
    r.advance(Duration::from_secs(15 * 60 + 1));
    let forgetting = r.pass().await;
    assert!(forgetting.forgotten >= 1, "{forgetting:?}");
    assert!(forgetting.removed_roots.is_empty(), "{forgetting:?}");
    assert!(index
        .get_tag("docker.io", "library/a", "v1")
        .unwrap()
        .is_none());
    r.advance(Duration::from_secs(3 * 60));
    let deleting = r.pass().await;
    assert_eq!(deleting.removed_roots.len(), 1, "{deleting:?}");
    assert_eq!(deleting.removed_roots[0].as_str(), a.manifest_digest);
    assert_eq!(tag_in_bucket(&bucket, "library/a", "v1").await, None);
    assert!(!holds(&bucket, &a.manifest_digest).await);

    // With the upstream gone, b pulls completely from a replica on an empty disk; a's tag is
    // answered by nobody.
    dist.kill9();
    let fresh = replica(&dist.url(), &garage, &storage, "").await;
    fresh.pull("library/b").await.assert_success();
    for replica in [&r, &fresh] {
        let status = http()
            .get(format!("{}/v2/library/a/manifests/v1", replica.url))
            .send()
            .await
            .unwrap()
            .status();
        assert_ne!(status, 200, "a tag whose content is gone is not answered");
    }
}

/// Issue 18 item 6: what a pass learned of the bucket's manifests outlives the process: a
/// replica restarted on its data directory reads no manifest to know what each image holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_replica_reads_no_manifest_again_to_know_what_images_hold() {
    let garage = Garage::single().await;
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    pusher
        .push_index(
            "library/a",
            "v1",
            &[Platform::AMD64, Platform::ARM64],
            MediaTypes::Oci,
        )
        .await;
    pusher
        .push_image("library/b", "v1", &ImageSpec::new(&[2048]).seed(3))
        .await;
    // Bounded far above what it holds: passes run and cut nothing.
    let storage = "max_size: 1GiB";
    let first = replica(&dist.url(), &garage, storage, "").await;
    for name in ["a", "b"] {
        first
            .pull(&format!("library/{name}"))
            .await
            .assert_success();
    }
    let before = first.s3_requests("get_manifest");
    let pass = first.pass().await;
    assert_eq!(pass.cut, 0, "{pass:?}");
    // The index, two platform manifests, b's manifest: each read once.
    let read = first.s3_requests("get_manifest") - before;
    assert_eq!(read, 4, "the first pass reads every manifest");
    let again = first.pass().await;
    assert_eq!(again.total, pass.total);
    assert_eq!(
        first.s3_requests("get_manifest") - before,
        read,
        "a second pass reads none"
    );

    let dir = first.stop().await;
    let restarted = replica_in(dir, &dist.url(), &garage, storage, "").await;
    let pass = restarted.pass().await;
    assert_eq!(pass.total, again.total);
    assert_eq!(pass.cut, 0, "{pass:?}");
    assert_eq!(
        restarted.s3_requests("get_manifest"),
        0,
        "the restarted replica knows what every manifest names"
    );
}

/// Issue 18 item 1: a replica's index is a cache in front of the bucket's records. A blob
/// another replica fetched is vouched for by the bucket's link the first time this replica
/// is asked for it under that repository, and by its own index after that: the second `HEAD`
/// asks the bucket for no link, and the upstream is asked nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_read_from_the_bucket_is_remembered_by_the_replica() {
    let garage = Garage::single().await;
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let image = pusher
        .push_image("library/b", "v1", &ImageSpec::new(&[2048, 4096]).seed(5))
        .await;
    let storage = "max_size: 1GiB";
    let first = replica(&dist.url(), &garage, storage, "").await;
    first.pull("library/b").await.assert_success();
    let before = dist.requests().await.len();

    let second = replica(&dist.url(), &garage, storage, "").await;
    let client = reqwest::Client::new();
    let (layer, size) = (&image.layer_digests[1], image.layer_sizes[1].to_string());
    let head = || async {
        let url = format!("{}/v2/library/b/blobs/{layer}", second.url);
        let response = client.head(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(response.headers()["content-length"], size.as_str());
    };
    head().await;
    assert_eq!(
        second.s3_requests("head_link"),
        1,
        "the first HEAD reads the bucket's link"
    );
    head().await;
    assert_eq!(
        second.s3_requests("head_link"),
        1,
        "the second is vouched for by the replica's own index"
    );
    assert_eq!(
        dist.requests().await.len(),
        before,
        "the upstream was asked nothing"
    );
}
