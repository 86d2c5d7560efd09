//! The day the upstream is down: real clients (skopeo, a real dockerd) still pull what the
//! mirror holds from a real regmirror process once the real distribution upstream is killed;
//! SIGTERM lets in-flight downloads finish; a load of 200 clients sees no errors.

mod common;
mod fake;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn cached_images_still_pull_with_skopeo_and_dockerd_when_the_upstream_is_killed() {
    let mut dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let image = pusher
        .push_image("library/outage", "v1", &ImageSpec::new(&[20_000, 300_000]))
        .await;
    // Revalidate every time, so the second pulls really ask the (dead) upstream.
    let rm = RegmirrorConfig::docker_io(&dist.url())
        .tag_ttl("0s")
        .start()
        .await;
    let docker = Dockerd::start(Containerd::start().await, &rm.url()).await;
    let dir = tempdir("outage");

    skopeo_copy_to_dir(
        &format!("docker://{}/library/outage:v1", rm.host()),
        &dir.path().join("warm"),
        false,
    )
    .await
    .assert_success();
    docker.docker_pull("outage:v1").await.assert_success();

    dist.kill9();

    let cold = dir.path().join("cold");
    let out = skopeo_copy_to_dir(
        &format!("docker://{}/library/outage:v1", rm.host()),
        &cold,
        false,
    )
    .await;
    assert!(out.success, "{out}\n--- regmirror ---\n{}", tail(&rm.log()));
    assert_skopeo_dir_holds(&cold, &image, "manifest.json");

    docker.docker(&["rmi", "outage:v1"]).await.assert_success();
    let out = docker.docker_pull("outage:v1").await;
    assert!(out.success, "{out}\n--- regmirror ---\n{}", tail(&rm.log()));
    assert_eq!(
        docker.repo_digests("outage:v1").await,
        vec![format!("outage@{}", image.manifest_digest)]
    );
    assert!(
        rm.log().contains("serving cached tag"),
        "the stale answer is logged"
    );

    // What was never cached fails with an OCI error, not a hang (the client's timeout is only
    // a safety net).
    let r = reqwest::Client::builder()
        .timeout(SAFETY)
        .build()
        .unwrap()
        .get(format!("{}/v2/library/never/manifests/v1", rm.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
}

/// Issue 21 item 4: the index is deleted while regmirror is stopped, and the upstream is
/// down when it comes back. Once the background verification has adopted the files, every
/// image on disk pulls by digest with skopeo (its manifest with the media type it was served
/// with, its blobs under the repository): the rebuild restored each manifest's media type from
/// its body and the repository links from the store's link journal, with the links its body
/// implies for config and layers. A repository the image was never pulled under gets nothing.
#[tokio::test(flavor = "multi_thread")]
async fn images_on_disk_pull_with_the_upstream_down_after_the_index_is_lost() {
    let mut dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let docker = pusher
        .push_image("library/lost", "v1", &ImageSpec::new(&[20_000, 300_000]))
        .await;
    let oci = pusher
        .push_image(
            "team/lost-oci",
            "v2",
            &ImageSpec::new(&[30_000]).media_types(MediaTypes::Oci),
        )
        .await;
    let mut rm = RegmirrorConfig::docker_io(&dist.url()).start().await;
    let dir = tempdir("index-lost");
    for (repo, tag) in [("library/lost", "v1"), ("team/lost-oci", "v2")] {
        skopeo_copy_to_dir(
            &format!("docker://{}/{repo}:{tag}", rm.host()),
            &dir.path().join(format!("warm-{tag}")),
            false,
        )
        .await
        .assert_success();
    }
    assert!(rm.stop(), "regmirror stopped cleanly");
    std::fs::remove_dir_all(rm.data_dir().join("index")).unwrap();
    dist.kill9();
    // The log is appended to: only what the restarted process wrote counts.
    let before = rm.log().len();
    rm.restart().await;
    let deadline = Instant::now() + SAFETY;
    while !rm.log()[before..].contains("store verification finished") {
        assert!(
            Instant::now() < deadline,
            "no verification pass:\n{}",
            tail(&rm.log())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for (image, tag) in [(&docker, "v1"), (&oci, "v2")] {
        let by_digest = format!(
            "docker://{}/{}@{}",
            rm.host(),
            image.repo,
            image.manifest_digest
        );
        let out =
            skopeo_copy_to_dir(&by_digest, &dir.path().join(format!("cold-{tag}")), false).await;
        assert!(out.success, "{out}\n--- regmirror ---\n{}", tail(&rm.log()));
        assert_skopeo_dir_holds(
            &dir.path().join(format!("cold-{tag}")),
            image,
            "manifest.json",
        );
        let r = reqwest::get(format!(
            "{}/v2/{}/manifests/{}",
            rm.url(),
            image.repo,
            image.manifest_digest
        ))
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            image.media_type,
            "the media type it was served with"
        );
    }
    // Links are per repository, after a rebuild as before it.
    let r = reqwest::get(format!(
        "{}/v2/library/other/manifests/{}",
        rm.url(),
        docker.manifest_digest
    ))
    .await
    .unwrap();
    assert_ne!(
        r.status(),
        200,
        "served under a repository that never held it"
    );
}

/// How long a test waits for an event before calling it a hang: a safety net against hangs,
/// never the assertion itself (the machine may be loaded).
const SAFETY: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_downloads_finish() {
    let upstream = fake::Fake::start().await;
    let image = upstream.put_image("library/slow", "1", &[8 << 20], 700);
    let digest = image.layers[0].0.clone();
    // About 2.5 s for the whole blob.
    upstream.faults.chunk_delay_ms.store(20, Ordering::SeqCst);
    let rm = RegmirrorConfig::docker_io(&upstream.url()).start().await;
    let mut response = http()
        .get(format!("{}/v2/slow/blobs/{digest}", rm.url()))
        .send()
        .await
        .unwrap();
    let mut body = response.chunk().await.unwrap().unwrap().to_vec();
    let pid = rm.pid().expect("running");
    assert_eq!(send_signal(pid, "TERM"), 0);
    while let Some(chunk) = response
        .chunk()
        .await
        .expect("the in-flight response completes")
    {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(sha256_digest(&body), digest.as_str());
    let deadline = Instant::now() + SAFETY;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "regmirror did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rm.log().contains("shutting down"));
}

/// With `shutdown_delay`, SIGTERM turns readiness off first and the listener keeps taking new
/// connections until the delay is over, so a load balancer can stop sending clients before
/// anyone is refused. Checked by the order of events (readiness off, a new client served while
/// the log has not yet announced the end of the delay, then the exit), not by durations.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_turns_readiness_off_then_serves_through_the_delay() {
    const DELAY_OVER: &str = "shutting down: finishing in-flight requests";
    let upstream = fake::Fake::start().await;
    let mut config = RegmirrorConfig::docker_io(&upstream.url());
    // Long enough that the checks below happen inside it even on a loaded machine.
    config.extra_yaml = "shutdown_delay: 10s\n".into();
    let rm = config.start().await;
    let get = |path: &'static str| {
        let url = format!("{}{path}", rm.url());
        // A new connection each time: the listener itself must still accept.
        async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(SAFETY)
                .build()
                .unwrap();
            client.get(url).send().await.map(|r| r.status().as_u16())
        }
    };
    assert_eq!(get("/readyz").await.unwrap(), 200);
    let pid = rm.pid().expect("running");
    assert_eq!(send_signal(pid, "TERM"), 0);
    let deadline = Instant::now() + SAFETY;
    while get("/readyz").await.unwrap() != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz never turned 503 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Readiness is off and the delay is not over: a new client is still served.
    assert!(
        !rm.log().contains(DELAY_OVER),
        "the delay ended before readiness was seen off"
    );
    assert_eq!(get("/v2/").await.unwrap(), 200);
    assert!(
        !rm.log().contains(DELAY_OVER),
        "the delay ended before the new client was served"
    );
    let deadline = Instant::now() + SAFETY;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "regmirror did not exit after the delay"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = rm.log();
    let (announced, over) = (
        log.find("/readyz answers 503, still accepting requests"),
        log.find(DELAY_OVER),
    );
    assert!(
        matches!((announced, over), (Some(a), Some(o)) if a < o),
        "the exit did not go through the delay: {}",
        tail(&log)
    );
    assert!(get("/v2/").await.is_err(), "nothing listens any more");
}

/// Sends a signal with the `kill` program (no libc in the tests).
fn send_signal(pid: u32, signal: &str) -> i32 {
    std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

/// 200 clients for 60 s against a mix of cached and uncached blobs and manifests, with a cache
/// small enough that eviction churns all along: no errors, bounded memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_clients_for_a_minute_see_no_errors() {
    let upstream = fake::Fake::start().await;
    let images: Vec<_> = (0..60)
        .map(|i| {
            upstream.put_image(
                &format!("library/load{i}"),
                "1",
                &[64 * 1024, 1 << 20],
                800 + i,
            )
        })
        .collect();
    let images = Arc::new(images);
    let mut config = RegmirrorConfig::docker_io(&upstream.url());
    // ~65 MiB of content against a 24 MiB cache: misses, hits and evictions all the time.
    config.extra_yaml = "storage: { max_size: 24MiB }\n".into();
    config.log_level = std::env::var("SOAK_LOG").unwrap_or_else(|_| "warn".into());
    // The builder writes `storage: { root: … }`; the extra key must not repeat it.
    let yaml = config
        .to_yaml()
        .replace("storage: { root: @ROOT@ }\n", "")
        .replace(
            "storage: { max_size: 24MiB }",
            "storage: { root: @ROOT@, max_size: 24MiB }",
        );
    let rm = Regmirror::start(&yaml).await;
    let pid = rm.pid().unwrap();
    let http = http();
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut clients = Vec::new();
    for client in 0..200u64 {
        let (http, base, images, ok, errors) = (
            http.clone(),
            rm.url(),
            images.clone(),
            ok.clone(),
            errors.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = client;
            while Instant::now() < until {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let image = &images[(n >> 33) as usize % images.len()];
                let repo = format!("load{}", (n >> 33) as usize % images.len());
                let url = match (n >> 20) % 3 {
                    0 => format!("{base}/v2/{repo}/manifests/1"),
                    1 => format!("{base}/v2/{repo}/blobs/{}", image.layers[0].0),
                    _ => format!("{base}/v2/{repo}/blobs/{}", image.layers[1].0),
                };
                let result = async {
                    let r = http.get(&url).send().await?;
                    let status = r.status();
                    let body = r.bytes().await?;
                    Ok::<_, reqwest::Error>((status, body))
                }
                .await;
                match result {
                    Ok((status, body))
                        if status == 200
                            && (url.contains("/manifests/")
                                || sha256_digest(&body) == url.rsplit('/').next().unwrap()) =>
                    {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((status, _)) => {
                        eprintln!("{url}: status {status}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        eprintln!("{url}: {err}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let (ok, errors) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    // Eviction runs right after the commits that overfill the store; give the last pass a moment.
    let mut used = du(&rm.data_dir().join("blobs"));
    for _ in 0..50 {
        if used <= 24 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        used = du(&rm.data_dir().join("blobs"));
    }
    eprintln!(
        "soak: {ok} good responses, {errors} errors, peak RSS {} MiB, store {} MiB",
        peak_kib / 1024,
        used >> 20
    );
    assert_eq!(errors, 0, "errors under load");
    assert!(ok > 1000, "the load really ran: {ok}");
    assert!(peak_kib < 512 * 1024, "peak RSS {peak_kib} KiB");
    assert!(used <= 24 << 20, "store {used} bytes over max_size");
}

/// Whether a process runs (a zombie waiting to be reaped has exited).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn du(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            du(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// The end of a log, for failure messages.
fn tail(log: &str) -> &str {
    let start = log.len().saturating_sub(4000);
    let start = (start..log.len())
        .find(|&i| log.is_char_boundary(i))
        .unwrap_or(log.len());
    &log[start..]
}
