//! Scale-out (issue 12): regmirror replicas on a shared Garage bucket, with real programs:
//! Garage (one node or three), distribution as the upstream, skopeo as the client and nginx
//! as the round-robin front. The fault-injecting fake upstream is used only where a download
//! must be held mid-way (killing the owner of an in-flight blob).
//!
//! Synchronisation is on events (a request arriving at the upstream, a metric moving, an
//! object appearing in the bucket); the deadlines below are hang guards, never assertions.

mod common;
mod fake;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::*;
use common::front::Front;
use common::garage::Garage;
use common::*;

type Signer = Arc<::regmirror::cluster::Cluster>;
use reqwest::header::HeaderValue;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_fetch_each_blob_once_and_survive_a_garage_node() {
    let garage = Garage::cluster(3).await;
    let upstream = Distribution::start().await;
    let image = push_image(&upstream.url(), "team/app", "v1", &[64 << 20, 1 << 20]).await;
    let replicas = cluster(3, &upstream.url(), &garage, "").await;
    let front = Front::start(&replicas.iter().map(Replica::addr).collect::<Vec<_>>()).await;

    // 16 concurrent cold pulls through the front, which spreads them over the replicas.
    let dirs: Vec<_> = (0..16).map(|_| tempdir("pull-")).collect();
    let pulls = dirs.iter().map(|dir| {
        let src = format!("docker://{}/team/app:v1", front.host());
        let dest = dir.path().join("img");
        async move { skopeo_copy_to_dir(&src, &dest, false).await }
    });
    for out in futures_util::future::join_all(pulls).await {
        out.assert_success();
    }
    for dir in &dirs {
        assert_skopeo_dir_holds(&dir.path().join("img"), &image, "manifest.json");
    }
    for digest in image.blob_digests() {
        assert_eq!(
            upstream.blob_gets_for(&digest).await,
            1,
            "one upstream GET of {digest} for the whole cluster: {:#?}",
            upstream.request_lines().await
        );
    }
    assert_eq!(
        upstream.manifest_gets().await,
        1,
        "{:#?}",
        upstream.request_lines().await
    );
    let mut forwards = 0.0;
    for replica in &replicas {
        let metrics = replica.metrics().await;
        for other in &replicas {
            let series = format!(
                "regmirror_cluster_forwards_total{{peer=\"{}\"}}",
                other.peer_address()
            );
            forwards += metric(&metrics, &series).unwrap_or(0.0);
        }
    }
    assert!(forwards > 0.0, "misses were forwarded to their owners");
    until_in_bucket(&garage, "blobs/", image.blob_digests().len()).await;
    until_in_bucket(&garage, "manifests/", 1).await;

    // One Garage node down: what the cluster holds still pulls through every replica, and a
    // cold image still comes through.
    let mut garage = garage;
    garage.stop_node(2);
    for replica in &replicas {
        let dir = tempdir("warm-");
        let src = format!("docker://{}/team/app:v1", replica.mirror.host());
        skopeo_copy_to_dir(&src, &dir.path().join("img"), false)
            .await
            .assert_success();
        assert_skopeo_dir_holds(&dir.path().join("img"), &image, "manifest.json");
    }
    let cold = push_image(&upstream.url(), "team/other", "v1", &[2 << 20]).await;
    let dir = tempdir("cold-");
    let src = format!("docker://{}/team/other:v1", front.host());
    skopeo_copy_to_dir(&src, &dir.path().join("img"), false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&dir.path().join("img"), &cold, "manifest.json");
    for digest in cold.blob_digests() {
        assert_eq!(upstream.blob_gets_for(&digest).await, 1, "{digest}");
    }

    // A fourth replica on an empty disk serves the warm image from the bucket alone.
    let before = upstream.requests().await.len();
    let mut ports: Vec<u16> = replicas.iter().map(|r| r.peer_port).collect();
    let fourth_port = free_port();
    ports.push(fourth_port);
    let fourth = Replica::start(&upstream.url(), &garage.s3_yaml(), &ports, fourth_port, "").await;
    let dir = tempdir("fourth-");
    let src = format!("docker://{}/team/app:v1", fourth.mirror.host());
    skopeo_copy_to_dir(&src, &dir.path().join("img"), false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&dir.path().join("img"), &image, "manifest.json");
    let after = upstream.requests().await;
    assert_eq!(
        after.len(),
        before,
        "the fourth replica asked the upstream: {:#?}",
        &after[before..]
    );
    drop(front);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_owner_of_an_in_flight_blob_leaves_the_others_complete() {
    let garage = Garage::single().await;
    let upstream = fake::Fake::start().await;
    let image = upstream.put_image("team/app", "v1", &[24 << 20], 7);
    let (layer, bytes) = image.layers[0].clone();
    let (open, gate) = tokio::sync::watch::channel(false);
    *upstream.faults.hold.lock().unwrap() = Some((4 << 20, gate));
    let mut replicas = cluster(3, &upstream.url(), &garage, "").await;

    // Every replica asked for the layer at once: its owner fetches it, the others forward.
    let pulls: Vec<_> = replicas
        .iter()
        .map(|r| {
            let url = format!("{}/v2/team/app/blobs/{layer}", r.mirror.url());
            tokio::spawn(async move {
                let response = http().get(url).send().await.ok()?;
                let body = response.bytes().await.ok()?;
                Some(body)
            })
        })
        .collect();
    upstream.counters.arrival("GET", "/blobs/").await;
    let owner = tokio::time::timeout(GUARD, async {
        loop {
            for replica in &replicas {
                let metrics = replica.metrics().await;
                for (i, other) in replicas.iter().enumerate() {
                    let series = format!(
                        "regmirror_cluster_forwards_total{{peer=\"{}\"}}",
                        other.peer_address()
                    );
                    if metric(&metrics, &series).unwrap_or(0.0) >= 1.0 {
                        return i;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a forward to the owner");
    assert_eq!(
        upstream.counters.count("GET", "/blobs/"),
        1,
        "only the owner fetches"
    );

    replicas[owner].mirror.kill9();
    open.send(true).unwrap();
    for (i, pull) in pulls.into_iter().enumerate() {
        let got = pull.await.unwrap();
        if i == owner {
            continue;
        }
        let got =
            got.unwrap_or_else(|| panic!("replica {i} failed:\n{}", replicas[i].mirror.log()));
        assert!(got == bytes, "replica {i} served other bytes");
    }
    let owner_address = replicas[owner].peer_address();
    let mut fallbacks = 0.0;
    for (i, replica) in replicas.iter().enumerate() {
        if i != owner {
            let series = format!("regmirror_cluster_fallbacks_total{{peer=\"{owner_address}\"}}");
            fallbacks += metric(&replica.metrics().await, &series).unwrap_or(0.0);
        }
    }
    assert!(
        fallbacks >= 1.0,
        "the fallback is counted against the dead owner"
    );

    // Restarted, the owner rejoins and serves the blob.
    replicas[owner].mirror.restart().await;
    for replica in &replicas {
        until_healthy(replica, 3).await;
    }
    let url = format!("{}/v2/team/app/blobs/{layer}", replicas[owner].mirror.url());
    let got = http().get(url).send().await.unwrap().bytes().await.unwrap();
    assert!(got == bytes);
    drop(garage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_peer_channel_refuses_all_but_signed_content_by_digest() {
    let garage = Garage::single().await;
    let upstream = Distribution::start().await;
    let image = push_image(&upstream.url(), "team/app", "v1", &[1 << 20]).await;
    let replicas = cluster(1, &upstream.url(), &garage, "").await;
    let replica = &replicas[0];
    let base = format!("http://{}", replica.peer_address());
    let layer = image.layer_digests[0].clone();
    let before = upstream.requests().await.len();

    let signer = |secret: &str| {
        let text = format!(
            "default_upstream: docker.io\nupstreams: {{ docker.io: {{ url: 'http://127.0.0.1:1' }} }}\n\
             storage: {{ s3: {{ endpoint: 'http://127.0.0.1:1', bucket: b, access_key_id: k, secret_access_key: s }} }}\n\
             cluster: {{ peers: ['127.0.0.1:1'], secret: '{secret}' }}\n"
        );
        let config = ::regmirror::Config::parse(&text, "test").unwrap();
        ::regmirror::cluster::Cluster::new(
            config.cluster.as_ref().unwrap(),
            Arc::new(::regmirror::metrics::Metrics::new()),
        )
        .unwrap()
    };
    let right = signer(SECRET);
    let wrong = signer("another-secret-0123456789abcdef");
    let send = |path: String, signature: Option<HeaderValue>| {
        let base = base.clone();
        async move {
            let mut request = http().get(format!("{base}{path}"));
            if let Some(value) = signature {
                request = request.header(::regmirror::cluster::PEER_HEADER, value);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let id = response
                .headers()
                .get(::regmirror::cluster::INSTANCE_HEADER)
                .map(|v| v.to_str().unwrap().to_owned());
            (status, response.text().await.unwrap(), id)
        }
    };
    let sign = |signer: &Signer, path: &str, receiver: &str| {
        Some(signer.sign("GET", path, receiver).unwrap().1)
    };
    // The replica's instance id, from a health probe (signed for whoever answers).
    let health = "/_regmirror/peer/health".to_owned();
    let (status, _, id) = send(health.clone(), sign(&right, &health, "")).await;
    assert_eq!(status, 200);
    let id = id.expect("the health answer names the replica");
    let blob = format!("/_regmirror/peer/blobs/{layer}?upstream=docker.io&repository=team/app");
    /// Path, signature, status, OCI code.
    type Case<'a> = (String, Option<HeaderValue>, u16, &'a str);
    let signed = |path: &str| (path.to_owned(), sign(&right, path, &id));
    let cases: Vec<Case> = vec![
        (blob.clone(), None, 401, "UNAUTHORIZED"),
        (blob.clone(), sign(&wrong, &blob, &id), 401, "UNAUTHORIZED"),
        // A signature is for one request, to one replica.
        (
            blob.clone(),
            sign(&right, &health, &id),
            401,
            "UNAUTHORIZED",
        ),
        (
            blob.clone(),
            sign(&right, &blob, "0123456789abcdef0123456789abcdef"),
            401,
            "UNAUTHORIZED",
        ),
        (blob.clone(), sign(&right, &blob, ""), 401, "UNAUTHORIZED"),
        {
            let (p, s) = signed(&format!(
                "/_regmirror/peer/blobs/{layer}?upstream=evil.example&repository=team/app"
            ));
            (p, s, 404, "NAME_UNKNOWN")
        },
        {
            let (p, s) =
                signed("/_regmirror/peer/blobs/sha256:nope?upstream=docker.io&repository=team/app");
            (p, s, 400, "DIGEST_INVALID")
        },
        {
            let (p, s) = signed(&format!(
                "/_regmirror/peer/blobs/{layer}?upstream=docker.io&repository=../../etc"
            ));
            (p, s, 400, "NAME_INVALID")
        },
        {
            let (p, s) = signed(&format!("/_regmirror/peer/blobs/{layer}?upstream=docker.io&repository=team/app&url=http://evil.example/"));
            (p, s, 404, "UNSUPPORTED")
        },
        {
            let (p, s) =
                signed("/_regmirror/peer/tags/list?upstream=docker.io&repository=team/app");
            (p, s, 404, "UNSUPPORTED")
        },
        {
            let (p, s) = signed("/v2/team/app/manifests/v1");
            (p, s, 404, "UNSUPPORTED")
        },
        {
            let (p, s) = signed("/v2/_catalog");
            (p, s, 404, "UNSUPPORTED")
        },
    ];
    for (path, signature, status, code) in cases {
        let (got, body, _) = send(path.clone(), signature).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(code), "{path}: {body}");
    }
    assert_eq!(
        upstream.requests().await.len(),
        before,
        "a refused peer request dialled the upstream"
    );
    // The positive control: signed, by digest, for a configured upstream; then replayed.
    let signature = sign(&right, &blob, &id);
    let (status, _, _) = send(blob.clone(), signature.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.blob_gets_for(&layer).await, 1);
    let (status, body, _) = send(blob, signature).await;
    assert_eq!(status, 401, "a replayed signature is refused: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_uploads_a_blob_its_bucket_write_missed_when_a_peer_asks_for_it() {
    let mut garage = Garage::single().await;
    let upstream = Distribution::start().await;
    let image = push_image(&upstream.url(), "team/app", "v1", &[2 << 20]).await;
    let replicas = cluster(2, &upstream.url(), &garage, "").await;
    let layer = image.layer_digests[0].clone();
    let addresses: Vec<String> = replicas.iter().map(Replica::peer_address).collect();
    let owner_address =
        ::regmirror::cluster::rendezvous::pick(addresses.iter().map(String::as_str), &layer)
            .unwrap()
            .to_owned();
    let owner = addresses.iter().position(|a| *a == owner_address).unwrap();
    let other = 1 - owner;
    let get = |i: usize| {
        let url = format!("{}/v2/team/app/blobs/{layer}", replicas[i].mirror.url());
        async move { http().get(url).send().await.unwrap().bytes().await.unwrap() }
    };

    // The bucket is down while the owner fetches: it serves the blob from its disk, and its
    // upload fails.
    garage.stop_node(0);
    let first = get(owner).await;
    assert_eq!(sha256_digest(&first), layer);
    tokio::time::timeout(GUARD, async {
        loop {
            let metrics = replicas[owner].metrics().await;
            if metric(
                &metrics,
                "regmirror_s3_requests_total{op=\"put_blob\",result=\"error\"}",
            )
            .unwrap_or(0.0)
                >= 1.0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the owner's upload failed");
    garage.start_node(0).await;
    assert_eq!(garage.count_objects("blobs/").await, 0);

    // The other replica misses it in the bucket and asks the owner, which then uploads it.
    let second = get(other).await;
    assert_eq!(sha256_digest(&second), layer);
    until_in_bucket(&garage, "blobs/", 1).await;
    assert_eq!(upstream.blob_gets_for(&layer).await, 1);
}

/// The sum of every series of `name` in `metrics`.
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_tags_owner_revalidates_it_and_a_stale_answer_stays_stale() {
    let garage = Garage::single().await;
    let mut upstream = Distribution::start().await;
    let image = push_image(&upstream.url(), "team/app", "v1", &[1 << 20]).await;
    // Every lookup of the tag revalidates it: the test sees each one.
    let replicas = cluster(2, &upstream.url(), &garage, "cache: { tag_ttl: 0s }\n").await;
    let addresses: Vec<String> = replicas.iter().map(Replica::peer_address).collect();
    let key = ::regmirror::cluster::Cluster::tag_key("docker.io", "team/app", "v1");
    let owner_address =
        ::regmirror::cluster::rendezvous::pick(addresses.iter().map(String::as_str), &key)
            .unwrap()
            .to_owned();
    let owner = addresses.iter().position(|a| *a == owner_address).unwrap();
    let other = 1 - owner;
    let manifest = |i: usize| {
        let url = format!("{}/v2/team/app/manifests/v1", replicas[i].mirror.url());
        async move {
            let response = http().get(url).send().await.unwrap();
            let status = response.status().as_u16();
            let outcome = response
                .headers()
                .get("x-regmirror-cache")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, outcome, response.bytes().await.unwrap())
        }
    };
    for _ in 0..3 {
        let (status, outcome, body) = manifest(other).await;
        assert_eq!(status, 200);
        assert_ne!(outcome.as_deref(), Some("stale"));
        assert!(body == image.manifest_bytes);
    }
    let requests = "regmirror_upstream_requests_total{";
    let asked_by_other = metric_sum(&replicas[other].metrics().await, requests);
    let asked_by_owner = metric_sum(&replicas[owner].metrics().await, requests);
    assert_eq!(
        asked_by_other, 0.0,
        "the tag's owner alone asks the upstream"
    );
    assert!(
        asked_by_owner >= 3.0,
        "the owner revalidated each lookup: {asked_by_owner}"
    );

    // The upstream gone: the owner answers from what it holds, and says so; the replica that
    // asked it passes that on rather than calling the answer fresh.
    upstream.kill9();
    let (status, outcome, body) = manifest(other).await;
    assert_eq!(status, 200);
    assert_eq!(outcome.as_deref(), Some("stale"));
    assert!(body == image.manifest_bytes);
}

/// Upstream etiquette across the fleet (issue 18): what the owner's upstream answered (a 404,
/// a 429 with its Retry-After) is final for every replica, never a reason for each to ask the
/// upstream itself. 9 clients over 3 replicas: one upstream request each time.
/// Issue 18 item 1: a blob `HEAD` walks the same chain as a `GET` (store, bucket, owner,
/// upstream): 9 concurrent `HEAD`s of a cold blob over 3 replicas make one upstream `HEAD`, and
/// so do 9 of a blob the upstream lacks (its 404 is the owner's final answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_head_is_asked_of_the_upstream_once_for_the_fleet() {
    let garage = Garage::single().await;
    let upstream = fake::Fake::start().await;
    let image = upstream.put_image("team/app", "v1", &[300_000], 12);
    let replicas = cluster(3, &upstream.url(), &garage, "").await;
    let (layer, bytes) = image.layers[0].clone();
    let missing = ::regmirror::oci::Digest::sha256_of(b"nobody has this");
    for (digest, status) in [(layer.to_string(), 200), (missing.to_string(), 404)] {
        let heads = (0..9).map(|i| {
            let url = format!(
                "{}/v2/team/app/blobs/{digest}",
                replicas[i % 3].mirror.url()
            );
            async move {
                let r = http().head(url).send().await.unwrap();
                let length = r
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                (r.status().as_u16(), length)
            }
        });
        for (got, length) in futures_util::future::join_all(heads).await {
            assert_eq!(got, status, "{digest}");
            if status == 200 {
                assert_eq!(length, Some(bytes.len()));
            }
        }
        assert_eq!(
            upstream.counters.count("HEAD", &digest),
            1,
            "one upstream HEAD for the fleet: {:#?}",
            upstream.counters.requests.lock().unwrap()
        );
        assert_eq!(upstream.counters.count("GET", &digest), 0);
    }
    drop(garage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owners_404_and_429_are_final_for_every_replica() {
    let garage = Garage::single().await;
    let upstream = fake::Fake::start().await;
    let image = upstream.put_image("team/app", "v1", &[1 << 20], 11);
    let replicas = cluster(3, &upstream.url(), &garage, "").await;
    let asked = |upstream: &fake::Fake| upstream.counters.requests.lock().unwrap().len();

    // A tag the upstream lacks, asked 9 times at once over the three replicas.
    let before = asked(&upstream);
    let gets = (0..9).map(|i| {
        let url = format!(
            "{}/v2/team/app/manifests/nope",
            replicas[i % 3].mirror.url()
        );
        async move { http().get(url).send().await.unwrap().status() }
    });
    for status in futures_util::future::join_all(gets).await {
        assert_eq!(status, 404);
    }
    assert_eq!(
        asked(&upstream) - before,
        1,
        "one upstream request for the fleet: {:#?}",
        upstream.counters.requests.lock().unwrap()
    );

    // The upstream rate-limits: one cold blob asked 9 times at once, then 6 more requests.
    *upstream.faults.retry_after.lock().unwrap() = Some("30".into());
    *upstream.faults.status.lock().unwrap() = Some(429);
    let before = asked(&upstream);
    let layer = image.layers[0].0.clone();
    let gets = (0..9).map(|i| {
        let url = format!("{}/v2/team/app/blobs/{layer}", replicas[i % 3].mirror.url());
        async move {
            let r = http().get(url).send().await.unwrap();
            let retry_after: Option<u64> = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            (r.status().as_u16(), retry_after)
        }
    });
    for (status, retry_after) in futures_util::future::join_all(gets).await {
        assert_eq!(status, 429);
        assert!(
            retry_after.is_some_and(|s| (1..=30).contains(&s)),
            "{retry_after:?}"
        );
    }
    assert_eq!(asked(&upstream) - before, 1, "the owner asked once");
    *upstream.faults.status.lock().unwrap() = None;
    for replica in &replicas {
        for path in [format!("blobs/{layer}"), "manifests/v1".to_owned()] {
            let url = format!("{}/v2/team/app/{path}", replica.mirror.url());
            assert_eq!(http().get(url).send().await.unwrap().status(), 429);
        }
    }
    assert_eq!(
        asked(&upstream) - before,
        1,
        "nobody asks within the owner's Retry-After"
    );
    let mut relayed = 0.0;
    for replica in &replicas {
        let metrics = replica.metrics().await;
        for other in &replicas {
            let series = format!(
                "regmirror_cluster_final_answers_total{{peer=\"{}\"}}",
                other.peer_address()
            );
            relayed += metric(&metrics, &series).unwrap_or(0.0);
        }
        let fallbacks = metrics
            .lines()
            .filter(|l| l.starts_with("regmirror_cluster_fallbacks_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        assert_eq!(fallbacks, 0.0, "an answer is not a failure:\n{metrics}");
    }
    assert!(relayed >= 2.0, "non-owners relayed the owner's answers");
    drop(garage);
}

/// Replicas started together own keys only once their views agree (issue 18): 18 clients
/// arriving the moment all three answer `/readyz` fetch each blob and tag once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_started_together_fetch_each_blob_once() {
    let garage = Garage::single().await;
    let upstream = fake::Fake::start().await;
    let images: Vec<_> = (0..6u64)
        .map(|i| {
            upstream.put_image(
                &format!("team/app{i}"),
                "v1",
                &[256 << 10, 64 << 10],
                40 + i,
            )
        })
        .collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let (s3, upstream_url) = (garage.s3_yaml(), upstream.url());
    // One after the other, as a rollout starts them, probing every 3 s: a replica that took
    // traffic as soon as it saw itself would hold a partial view (the others not up at its
    // first probe) for seconds, and fetch what another replica also fetches.
    let mut replicas = Vec::new();
    for port in &ports {
        replicas.push(Replica::start_refreshing(&upstream_url, &s3, &ports, *port, "3s").await);
    }
    tokio::time::timeout(GUARD, async {
        loop {
            let mut ready = 0;
            for replica in &replicas {
                let url = format!("{}/readyz", replica.mirror.url());
                if http()
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
                {
                    ready += 1;
                }
            }
            if ready == replicas.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every replica ready");
    // Ready means its view agreed: each sees all three (a replica ready at its first probe,
    // before the others were up, would own every key alone for a whole refresh).
    for replica in &replicas {
        let metrics = replica.metrics().await;
        assert_eq!(
            metric(&metrics, "regmirror_cluster_members{state=\"healthy\"}"),
            Some(3.0),
            "{}",
            replica.mirror.log()
        );
    }

    let pulls = (0..18).map(|k| {
        let base = replicas[k % 3].mirror.url();
        let image = &images[k % 6];
        let repo = format!("team/app{}", k % 6);
        async move {
            let r = http()
                .get(format!("{base}/v2/{repo}/manifests/v1"))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            for (digest, bytes) in &image.layers {
                let r = http()
                    .get(format!("{base}/v2/{repo}/blobs/{digest}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                assert!(r.bytes().await.unwrap() == *bytes);
            }
        }
    });
    futures_util::future::join_all(pulls).await;
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            upstream
                .counters
                .count("GET", &format!("/team/app{i}/manifests/v1")),
            1
        );
        for (digest, _) in &image.layers {
            assert_eq!(
                upstream.counters.count("GET", &format!("/blobs/{digest}")),
                1,
                "{digest} fetched once by the fleet"
            );
        }
    }
    drop(garage);
}

/// Two replicas whose views disagree (each lists the other under another name, so each thinks
/// the other owns the blob) never wait on each other (issue 18): a peer's request never joins
/// a flight that is itself forwarded, so no cycle forms and nothing waits for the 60 s peer
/// read timeout (which would show as a fallback). Both clients get the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_whose_views_disagree_never_wait_on_each_other() {
    use ::regmirror::cluster::rendezvous::pick;
    let garage = Garage::single().await;
    let upstream = fake::Fake::start().await;
    let (pa, pb) = (free_port(), free_port());
    let (a_as_a, a_as_b, b) = (
        format!("127.0.0.1:{pa}"),
        format!("localhost:{pa}"),
        format!("127.0.0.1:{pb}"),
    );
    // A blob that A's view gives to B and B's view gives to A.
    let (digest, bytes) = (0u64..)
        .map(|seed| {
            let bytes = fake::pseudo_random(512 << 10, 9_000 + seed);
            (::regmirror::oci::Digest::sha256_of(&bytes), bytes)
        })
        .find(|(digest, _)| {
            let key = digest.as_str();
            pick([a_as_a.as_str(), b.as_str()], key) == Some(b.as_str())
                && pick([a_as_b.as_str(), b.as_str()], key) == Some(a_as_b.as_str())
        })
        .unwrap();
    upstream.put_blob(bytes.clone());
    upstream
        .content
        .repo_blobs
        .lock()
        .unwrap()
        .insert(("team/app".to_owned(), digest.clone()));
    let s3 = garage.s3_yaml();
    let replica_a =
        Replica::start_listing(&upstream.url(), &s3, &[a_as_a.clone(), b.clone()], pa, "").await;
    let replica_b = Replica::start_listing(&upstream.url(), &s3, &[a_as_b, b], pb, "").await;
    for replica in [&replica_a, &replica_b] {
        until_healthy(replica, 2).await;
    }
    let gets = [&replica_a, &replica_b].map(|replica| {
        let url = format!("{}/v2/team/app/blobs/{digest}", replica.mirror.url());
        async move { http().get(url).send().await.unwrap().bytes().await.unwrap() }
    });
    for got in futures_util::future::join_all(gets).await {
        assert!(got == bytes, "the blob's bytes");
    }
    for replica in [&replica_a, &replica_b] {
        let metrics = replica.metrics().await;
        let fallbacks: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("regmirror_cluster_fallbacks_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(fallbacks, 0.0, "nobody gave up on a peer:\n{metrics}");
    }
    assert!(upstream.counters.count("GET", "/blobs/") <= 2);
    drop(garage);
}
