//! Upstream etiquette on one replica: what the upstream said (a 429 with its Retry-After, a
//! 404) is remembered and answered here, so clients retrying cost the upstream nothing more.
//! The fleet-wide half (an owner's answer is final for every replica) is in tests/cluster.rs.
//! In-process regmirror in front of the counting fake upstream.

mod fake;

use fake::{client, mirror, Fake};
use futures_util::future::join_all;

async fn error_code(response: reqwest::Response) -> (u16, String, Option<u64>) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = response.bytes().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("error bodies are JSON: {e}: {bytes:?}"));
    let code = body["errors"][0]["code"].as_str().unwrap().to_owned();
    (status, code, retry_after)
}

fn registry_requests(fake: &Fake) -> usize {
    fake.counters.requests.lock().unwrap().len()
}

/// After a 429 with `Retry-After: 30` the upstream is not asked again within the window:
/// misses are answered 429 with the time that remains, what is cached is served stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_holds_every_request_back_until_its_retry_after() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/app", "1", &[10], 8);
    let m = mirror(&fake, "cache: { tag_ttl: 0s }").await;
    let http = client();
    let get = |path: String| http.get(format!("{}{path}", m.url)).send();
    assert_eq!(
        get("/v2/app/manifests/1".into()).await.unwrap().status(),
        200
    );

    *fake.faults.status.lock().unwrap() = Some(429);
    *fake.faults.retry_after.lock().unwrap() = Some("30".into());
    let (status, code, retry_after) =
        error_code(get("/v2/app/manifests/2".into()).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str(), retry_after),
        (429, "TOOMANYREQUESTS", Some(30))
    );
    let asked = registry_requests(&fake);

    // The upstream recovers, but said to wait: nothing reaches it within the window.
    *fake.faults.status.lock().unwrap() = None;
    let missing_blob = regmirror::oci::Digest::sha256_of(b"not cached");
    for path in [
        "/v2/app/manifests/2".to_owned(),
        "/v2/app/manifests/3".to_owned(),
        format!("/v2/app/blobs/{missing_blob}"),
        "/v2/other/manifests/latest".to_owned(),
    ] {
        let (status, code, retry_after) = error_code(get(path.clone()).await.unwrap()).await;
        assert_eq!((status, code.as_str()), (429, "TOOMANYREQUESTS"), "{path}");
        assert!(
            retry_after.is_some_and(|s| (1..=30).contains(&s)),
            "{path}: {retry_after:?}"
        );
    }
    // A tag we hold is served stale meanwhile, without a revalidation.
    let r = get("/v2/app/manifests/1".into()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-regmirror-cache"], "stale");
    assert_eq!(r.headers()["docker-content-digest"], image.digest.as_str());
    assert_eq!(
        registry_requests(&fake),
        asked,
        "the upstream was asked within its Retry-After"
    );

    let metrics = get("/metrics".into()).await.unwrap().text().await.unwrap();
    let spared = metrics
        .lines()
        .find(|l| l.starts_with("regmirror_upstream_spared_total") && l.contains("rate_limited"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(spared.is_some_and(|n| n >= 5), "{metrics}");
}

/// A tag the upstream lacks costs one request per `cache.negative_ttl`, however many clients
/// ask, at once or one after another; with `negative_ttl: 0s`, one per wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_tag_is_asked_once_per_negative_ttl() {
    let fake = Fake::start().await;
    fake.put_image("library/app", "1", &[10], 8);
    let http = client();
    let asked = |fake: &Fake| fake.counters.count("GET", "/manifests/nope");

    let m = mirror(&fake, "cache: { negative_ttl: 1h }").await;
    let url = format!("{}/v2/app/manifests/nope", m.url);
    let wave = join_all((0..9).map(|_| http.get(&url).send())).await;
    for r in wave {
        assert_eq!(error_code(r.unwrap()).await.1, "MANIFEST_UNKNOWN");
    }
    for _ in 0..5 {
        assert_eq!(
            error_code(http.get(&url).send().await.unwrap()).await.1,
            "MANIFEST_UNKNOWN"
        );
    }
    assert_eq!(asked(&fake), 1, "one upstream request for 14 clients");
    // By digest too; and a manifest that does exist is never held back by it.
    let missing = regmirror::oci::Digest::sha256_of(b"no such manifest");
    let by_digest = format!("{}/v2/app/manifests/{missing}", m.url);
    for _ in 0..3 {
        assert_eq!(
            error_code(http.get(&by_digest).send().await.unwrap())
                .await
                .1,
            "MANIFEST_UNKNOWN"
        );
    }
    assert_eq!(
        fake.counters.count("GET", &format!("/manifests/{missing}")),
        1
    );
    let r = http
        .get(format!("{}/v2/app/manifests/1", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Off: every sequential request asks (concurrent ones still share one flight).
    let before = asked(&fake);
    let m = mirror(&fake, "cache: { negative_ttl: 0s }").await;
    let url = format!("{}/v2/app/manifests/nope", m.url);
    for _ in 0..5 {
        assert_eq!(
            error_code(http.get(&url).send().await.unwrap()).await.1,
            "MANIFEST_UNKNOWN"
        );
    }
    assert_eq!(asked(&fake) - before, 5);
}
