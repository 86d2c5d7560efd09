//! Chaos: 3 replicas on a 3-node Garage, with replicas and Garage nodes killed (SIGKILL) and
//! restarted while clients pull. It proves, with real programs (Garage, distribution as the
//! upstream, skopeo and an in-test client that hashes every byte):
//!
//! - no client is ever handed wrong bytes: every complete body matches its digest;
//! - no pull fails for a client that retries on the next replica (and only the killed replica
//!   ever fails an attempt);
//! - the upstream serves each blob exactly once for the whole fleet and the whole test
//!   (upstream bytes are 1.00x what the images hold): once everything is in the bucket, the
//!   faults cost the upstream nothing;
//! - nothing is lost: with the upstream killed at the end, every image pulls completely from
//!   every replica.
//!
//! The counts are deterministic by construction. Wave 1 (cold, no faults) fills the bucket,
//! and the test waits until every blob, manifest, tag and link is there. Only then do the
//! faults start, so every later miss has the bucket to go to. The replicas' hot tiers are
//! smaller than the images together, so warm pulls keep refilling from the bucket: the Garage
//! node dies while the bucket is being read, not while everything is served from local disks.
//!
//! Synchronisation is on events (objects in the bucket, a metric moving, attempts and pulls
//! completing, membership); the deadlines are hang guards, never assertions.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use common::cluster::*;
use common::garage::Garage;
use common::*;

/// The images: a few MiB each, 2-3 layers. Each fits the hot tier alone, all of them do not.
const IMAGES: &[(&str, &[usize])] = &[
    ("chaos/alpha", &[1536 << 10, 512 << 10]),
    ("chaos/bravo", &[2 << 20, 768 << 10, 256 << 10]),
    ("chaos/charlie", &[1 << 20, 1 << 20]),
    ("chaos/delta", &[2560 << 10, 384 << 10, 128 << 10]),
];
/// Each replica's local disk in front of the bucket: about two of the images (~11 MiB in all),
/// so pulls keep evicting and refilling from the bucket.
const HOT_TIER: &str = "6MiB";
/// Concurrent pulling clients during the fault waves.
const CLIENTS: usize = 4;
/// Attempts of one pull, each on the next replica: every replica once. A pull fails only if
/// all three failed it, and with one replica down at a time that must never happen.
const MAX_ATTEMPTS: usize = 3;
/// Bounds each client's loop; far more than the waves need (they end on events).
const MAX_PULLS_PER_CLIENT: usize = 5_000;
/// Hang guard of one attempt; a stalled attempt counts as failed and is retried elsewhere.
const ATTEMPT_GUARD: Duration = Duration::from_secs(60);
/// The replica that is killed, and the Garage node that is killed. The replicas' S3 endpoint
/// is node 0; node 2 is another copy of every object, so with it down Garage still has its
/// quorum of 2 out of 3 (what Garage promises), and regmirror must not notice.
const VICTIM: usize = 1;
const GARAGE_VICTIM: usize = 2;

/// What the fleet is going through when an attempt starts, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Warm,
    ReplicaDown,
    ReplicaRestarting,
    ReplicaBack,
    GarageDown,
    GarageBack,
}

const PHASES: [Phase; 6] = [
    Phase::Warm,
    Phase::ReplicaDown,
    Phase::ReplicaRestarting,
    Phase::ReplicaBack,
    Phase::GarageDown,
    Phase::GarageBack,
];

// Fields only read through `Debug`, in the failure messages.
#[allow(dead_code)]
#[derive(Clone, Debug)]
enum Failure {
    /// Refused, cut off, a non-200 answer or no answer: the client tries the next replica.
    Unavailable(String),
    /// A complete answer whose bytes are not the image's: never allowed.
    Wrong(String),
}

#[allow(dead_code)]
#[derive(Debug)]
struct Attempt {
    client: usize,
    ticket: usize,
    replica: usize,
    image: usize,
    /// The phase when the attempt started and when it ended.
    started: Phase,
    ended: Phase,
    /// Bytes received (manifest and blobs), or why it failed.
    outcome: Result<u64, Failure>,
}

#[allow(dead_code)]
#[derive(Debug)]
struct Pull {
    client: usize,
    ticket: usize,
    image: usize,
    attempts: usize,
    ok: bool,
}

/// What the clients and the test share: the phase, and what happened.
struct Chaos {
    phase: AtomicUsize,
    ticket: AtomicUsize,
    stop: AtomicBool,
    running: AtomicUsize,
    /// Attempts under way, per replica.
    busy: [AtomicUsize; 3],
    attempts: Mutex<Vec<Attempt>>,
    pulls: Mutex<Vec<Pull>>,
}

impl Chaos {
    fn phase(&self) -> Phase {
        PHASES[self.phase.load(Ordering::SeqCst)]
    }

    fn enter(&self, phase: Phase) {
        let i = PHASES.iter().position(|p| *p == phase).unwrap();
        self.phase.store(i, Ordering::SeqCst);
        eprintln!(
            "chaos: {phase:?} after {} pulls, {} attempts",
            self.pulls_done(),
            self.attempts.lock().unwrap().len()
        );
    }

    fn pulls_done(&self) -> usize {
        self.pulls.lock().unwrap().len()
    }

    /// Whether an attempt matching `pred` has been recorded.
    fn any_attempt(&self, pred: impl Fn(&Attempt) -> bool) -> bool {
        self.attempts.lock().unwrap().iter().any(pred)
    }

    /// Whether every image has been pulled whole by an attempt started in `phase`, and
    /// `pulls` pulls have completed since `mark`.
    fn every_image_pulled_in(&self, phase: Phase, mark: usize, pulls: usize) -> bool {
        self.pulls_done() >= mark + pulls
            && (0..IMAGES.len()).all(|image| {
                self.any_attempt(|a| a.image == image && a.started == phase && a.outcome.is_ok())
            })
    }

    /// Waits until `done` holds (checked on the shared records), or fails if the clients
    /// stopped first or the hang guard fires.
    async fn until(&self, what: &str, done: impl Fn(&Chaos) -> bool) {
        let waited = tokio::time::timeout(GUARD, async {
            loop {
                if done(self) {
                    return;
                }
                assert!(
                    self.running.load(Ordering::SeqCst) > 0,
                    "the clients stopped before {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "never saw {what}; last attempts: {:#?}",
                self.attempts
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// One pull as a client makes it: the manifest by tag, then every blob, each body hashed
/// as it arrives. Returns the bytes received.
async fn pull_once(base: &str, image: &PushedImage) -> Result<u64, Failure> {
    let unavailable =
        |what: &str, e: &dyn std::fmt::Display| Failure::Unavailable(format!("{what}: {e}"));
    // A fresh client per attempt, as a new client process would be: no pooled connection to
    // a replica that has been killed since.
    let client = http();
    let url = format!("{base}/v2/{}/manifests/{}", image.repo, image.reference);
    let response = client
        .get(&url)
        .header("accept", &image.media_type)
        .send()
        .await
        .map_err(|e| unavailable("manifest", &e))?;
    let status = response.status();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return Err(Failure::Unavailable(format!("manifest: {status} {body}")));
    }
    let manifest = response
        .bytes()
        .await
        .map_err(|e| unavailable("manifest body", &e))?;
    if manifest != image.manifest_bytes {
        return Err(Failure::Wrong(format!(
            "manifest of {}: {}",
            image.repo,
            String::from_utf8_lossy(&manifest)
        )));
    }
    let mut received = manifest.len() as u64;
    let sizes = std::iter::once(image.config_bytes.len() as u64).chain(image.layer_sizes.clone());
    for (digest, size) in image.blob_digests().into_iter().zip(sizes) {
        let url = format!("{base}/v2/{}/blobs/{digest}", image.repo);
        let response = client
            .get(&url)
            .send()
            .await
            .map_err(|e| unavailable(&digest, &e))?;
        let status = response.status();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return Err(Failure::Unavailable(format!("{digest}: {status} {body}")));
        }
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            // A body cut short (a killed replica) is an error here, never a short success:
            // the response has a length, and hyper checks it.
            let chunk = chunk.map_err(|e| unavailable(&digest, &e))?;
            hasher.update(&chunk);
            len += chunk.len() as u64;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest || len != size {
            return Err(Failure::Wrong(format!(
                "{digest} ({size} bytes): got {actual} ({len} bytes)"
            )));
        }
        received += len;
    }
    Ok(received)
}

/// A client: pulls images one after another until told to stop, each pull trying the
/// replicas in turn from a rotating first one, at most [`MAX_ATTEMPTS`] times.
async fn client(
    id: usize,
    chaos: Arc<Chaos>,
    bases: Arc<Vec<String>>,
    images: Arc<Vec<PushedImage>>,
) {
    for _ in 0..MAX_PULLS_PER_CLIENT {
        if chaos.stop.load(Ordering::SeqCst) {
            break;
        }
        // Tickets spread the pulls over every (image, first replica) pair.
        let ticket = chaos.ticket.fetch_add(1, Ordering::SeqCst);
        let image = ticket % images.len();
        let first = (ticket / images.len() + ticket) % bases.len();
        let mut attempts = 0;
        let mut ok = false;
        while attempts < MAX_ATTEMPTS && !ok {
            let replica = (first + attempts) % bases.len();
            attempts += 1;
            let started = chaos.phase();
            chaos.busy[replica].fetch_add(1, Ordering::SeqCst);
            let outcome =
                tokio::time::timeout(ATTEMPT_GUARD, pull_once(&bases[replica], &images[image]))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::Unavailable(format!(
                            "no complete answer within {ATTEMPT_GUARD:?}"
                        )))
                    });
            chaos.busy[replica].fetch_sub(1, Ordering::SeqCst);
            ok = outcome.is_ok();
            chaos.attempts.lock().unwrap().push(Attempt {
                client: id,
                ticket,
                replica,
                image,
                started,
                ended: chaos.phase(),
                outcome,
            });
        }
        chaos.pulls.lock().unwrap().push(Pull {
            client: id,
            ticket,
            image,
            attempts,
            ok,
        });
    }
    chaos.running.fetch_sub(1, Ordering::SeqCst);
}

/// Blobs copied from the bucket into a hot tier, over the replicas that answer.
async fn bucket_fills(replicas: &[Replica]) -> f64 {
    let mut fills = 0.0;
    for replica in replicas {
        let metrics = replica.metrics().await;
        fills += metric(&metrics, "regmirror_hot_tier_total{result=\"fill\"}").unwrap_or(0.0);
    }
    fills
}

/// `skopeo copy` of `image` through `host`, checked byte for byte. (A failing test prints
/// every replica's log as it drops them.)
async fn skopeo_pull(host: String, image: &PushedImage) {
    let dir = tempdir("chaos-pull-");
    let dest = dir.path().join("img");
    let src = format!("docker://{host}/{}:{}", image.repo, image.reference);
    skopeo_copy_to_dir(&src, &dest, false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&dest, image, "manifest.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_and_garage_nodes_killed_under_load_lose_nothing_and_refetch_nothing() {
    let began = Instant::now();
    let mut garage = Garage::cluster(3).await;
    let mut upstream = Distribution::start().await;
    let mut images = Vec::new();
    for (repo, layers) in IMAGES {
        images.push(push_image(&upstream.url(), repo, "v1", layers).await);
    }
    let blobs: Vec<(String, u64)> = images
        .iter()
        .flat_map(|image| {
            let sizes =
                std::iter::once(image.config_bytes.len() as u64).chain(image.layer_sizes.clone());
            image
                .blob_digests()
                .into_iter()
                .zip(sizes)
                .collect::<Vec<_>>()
        })
        .collect();
    let image_bytes: u64 = blobs.iter().map(|(_, size)| size).sum();

    // The cluster, each replica with a small hot tier. Replica::start puts its `s3` argument
    // inside the `storage:` flow mapping, so the hot tier's bound rides along after it.
    let s3 = format!("{}, local: {{ max_size: {HOT_TIER} }}", garage.s3_yaml());
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for port in &ports {
        replicas.push(Replica::start(&upstream.url(), &s3, &ports, *port, "").await);
    }
    for replica in &replicas {
        until_healthy(replica, replicas.len()).await;
    }
    eprintln!("chaos: set up in {:?}", began.elapsed());

    // Wave 1, cold, no faults: each image pulled by one skopeo per replica at once, so every
    // replica asks for every blob together and the owners' single flights serve the fleet.
    // One image at a time, and each in the bucket before the next: the small hot tiers then
    // only ever evict what the bucket already holds.
    let wave1 = Instant::now();
    for (i, image) in images.iter().enumerate() {
        let pulls = replicas
            .iter()
            .map(|replica| skopeo_pull(replica.mirror.host(), image));
        futures_util::future::join_all(pulls).await;
        // Uploads finish after the clients are answered; links after their blobs.
        let so_far = &images[..=i];
        let blobs_so_far: usize = so_far.iter().map(|im| im.blob_digests().len()).sum();
        until_in_bucket(&garage, "blobs/", blobs_so_far).await;
        until_in_bucket(&garage, "manifests/", i + 1).await;
        until_in_bucket(&garage, "tags/", i + 1).await;
        until_in_bucket(&garage, "links/", blobs_so_far + i + 1).await;
    }
    for (digest, _) in &blobs {
        assert_eq!(
            upstream.blob_gets_for(digest).await,
            1,
            "wave 1 fetched {digest} once for the fleet: {:#?}",
            upstream.request_lines().await
        );
    }
    let after_wave1 = upstream.requests().await;
    eprintln!(
        "chaos: wave 1 in {:?}, {} upstream requests",
        wave1.elapsed(),
        after_wave1.len()
    );

    // The fault waves: clients pull without pause while a replica and then a Garage node are
    // killed and restarted.
    let faults = Instant::now();
    let chaos = Arc::new(Chaos {
        phase: AtomicUsize::new(0),
        ticket: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        running: AtomicUsize::new(CLIENTS),
        busy: Default::default(),
        attempts: Mutex::new(Vec::new()),
        pulls: Mutex::new(Vec::new()),
    });
    let bases = Arc::new(replicas.iter().map(|r| r.mirror.url()).collect::<Vec<_>>());
    let shared_images = Arc::new(images.clone());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                id,
                chaos.clone(),
                bases.clone(),
                shared_images.clone(),
            ))
        })
        .collect();

    // Kill the replica while a client is pulling from it. The phase moves first, so an
    // attempt the kill cuts off always ends in it.
    chaos
        .until("every client pulling, one of them from the victim", |c| {
            c.pulls_done() >= CLIENTS
                && c.any_attempt(|a| a.replica == VICTIM && a.outcome.is_ok())
                && c.busy[VICTIM].load(Ordering::SeqCst) > 0
        })
        .await;
    chaos.enter(Phase::ReplicaDown);
    replicas[VICTIM].mirror.kill9();
    let mark = chaos.pulls_done();
    // Down until a client has found it down and moved on, and every image pulled whole
    // from the two others.
    chaos
        .until(
            "a refused attempt and every image pulled while the replica is down",
            |c| {
                c.any_attempt(|a| {
                    a.replica == VICTIM && a.started == Phase::ReplicaDown && a.outcome.is_err()
                }) && c.every_image_pulled_in(Phase::ReplicaDown, mark, CLIENTS)
            },
        )
        .await;

    chaos.enter(Phase::ReplicaRestarting);
    replicas[VICTIM].mirror.restart().await;
    for replica in &replicas {
        until_healthy(replica, replicas.len()).await;
    }
    chaos.enter(Phase::ReplicaBack);
    let mark = chaos.pulls_done();
    chaos
        .until("the restarted replica serving a whole pull", |c| {
            c.any_attempt(|a| {
                a.replica == VICTIM && a.started == Phase::ReplicaBack && a.outcome.is_ok()
            }) && c.every_image_pulled_in(Phase::ReplicaBack, mark, CLIENTS)
        })
        .await;

    // Kill a Garage node while a replica is reading the bucket (a hot-tier fill under way:
    // every blob is in the bucket, so no download has another origin).
    tokio::time::timeout(GUARD, async {
        loop {
            let mut downloading = false;
            for replica in &replicas {
                let metrics = replica.metrics().await;
                downloading |=
                    metric(&metrics, "regmirror_downloads_in_flight ").unwrap_or(0.0) > 0.0;
            }
            if downloading {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a download from the bucket under way");
    chaos.enter(Phase::GarageDown);
    garage.stop_node(GARAGE_VICTIM);
    // Counted from after the kill: every fill below read the bucket with the node gone.
    let fills_before = bucket_fills(&replicas).await;
    let mark = chaos.pulls_done();
    let fills_down = tokio::time::timeout(GUARD, async {
        loop {
            let fills = bucket_fills(&replicas).await;
            // A fill is a whole blob read from the bucket and committed: one per image at
            // least, while the node is down; and every replica serves every image meanwhile.
            let everywhere = (0..replicas.len()).all(|replica| {
                chaos.any_attempt(|a| {
                    a.replica == replica && a.started == Phase::GarageDown && a.outcome.is_ok()
                })
            });
            if fills >= fills_before + IMAGES.len() as f64
                && everywhere
                && chaos.every_image_pulled_in(Phase::GarageDown, mark, CLIENTS)
            {
                return fills - fills_before;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the replicas read the bucket while a Garage node is down");
    garage.start_node(GARAGE_VICTIM).await;
    chaos.enter(Phase::GarageBack);
    let mark = chaos.pulls_done();
    chaos
        .until("every image pulled after the Garage node is back", |c| {
            c.every_image_pulled_in(Phase::GarageBack, mark, CLIENTS)
        })
        .await;
    chaos.stop.store(true, Ordering::SeqCst);
    for client in clients {
        tokio::time::timeout(GUARD, client)
            .await
            .expect("a client stops once told")
            .expect("a client does not panic");
    }
    let fault_time = faults.elapsed();

    let attempts = std::mem::take(&mut *chaos.attempts.lock().unwrap());
    let pulls = std::mem::take(&mut *chaos.pulls.lock().unwrap());
    let wrong: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| matches!(a.outcome, Err(Failure::Wrong(_))))
        .collect();
    let exhausted: Vec<&Pull> = pulls.iter().filter(|p| !p.ok).collect();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    // Only the killed replica may fail an attempt: one that was running when it died, or one
    // made while it was down or starting again.
    let excused = |a: &Attempt| {
        a.replica == VICTIM
            && a.started <= Phase::ReplicaRestarting
            && a.ended >= Phase::ReplicaDown
    };
    let unexcused: Vec<&&Attempt> = failed.iter().filter(|a| !excused(a)).collect();
    let interrupted = failed
        .iter()
        .filter(|a| a.started == Phase::Warm && a.ended >= Phase::ReplicaDown)
        .count();
    let served: u64 = attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().ok())
        .sum();
    eprintln!(
        "chaos: fault waves in {fault_time:?}: {} pulls, {} attempts, {} failed ({} cut off by \
         the kill), {} retried pulls, {} MiB served, {fills_down} bucket fills with a Garage \
         node down",
        pulls.len(),
        attempts.len(),
        failed.len(),
        interrupted,
        pulls.iter().filter(|p| p.attempts > 1).count(),
        served >> 20,
    );
    for a in &failed {
        eprintln!(
            "chaos:   failed: replica {} in {:?}..{:?}: {:?}",
            a.replica, a.started, a.ended, a.outcome
        );
    }
    for phase in PHASES {
        let of_phase = || attempts.iter().filter(|a| a.started == phase);
        eprintln!(
            "chaos:   {phase:?}: {} attempts, {} failed",
            of_phase().count(),
            of_phase().filter(|a| a.outcome.is_err()).count()
        );
    }
    assert!(wrong.is_empty(), "wrong bytes were served: {wrong:#?}");
    assert!(
        exhausted.is_empty(),
        "pulls failed on every replica: {exhausted:#?}\nattempts: {:#?}",
        attempts
            .iter()
            .filter(|a| exhausted.iter().any(|p| p.ticket == a.ticket))
            .collect::<Vec<_>>()
    );
    assert!(
        unexcused.is_empty(),
        "replicas that were never killed failed attempts: {unexcused:#?}"
    );
    assert!(
        failed.iter().any(|a| a.replica == VICTIM),
        "the killed replica failed no attempt: the retries were never exercised"
    );

    // The faults cost the upstream nothing: everything came from the bucket.
    let after_faults = upstream.requests().await;
    let new_gets: Vec<_> = after_faults[after_wave1.len()..]
        .iter()
        .filter(|r| r.method == "GET")
        .collect();
    eprintln!(
        "chaos: {} upstream requests during the fault waves",
        after_faults.len() - after_wave1.len()
    );
    assert!(
        new_gets.is_empty(),
        "the fault waves asked the upstream: {new_gets:#?}\n--- all new requests ---\n{:#?}",
        &after_faults[after_wave1.len()..]
    );

    // Nothing lost: the upstream gone, every image pulls completely from every replica.
    let last = Instant::now();
    upstream.kill9();
    for replica in &replicas {
        let pulls = images
            .iter()
            .map(|image| skopeo_pull(replica.mirror.host(), image));
        futures_util::future::join_all(pulls).await;
    }
    assert_eq!(garage.count_objects("blobs/").await, blobs.len());
    assert_eq!(garage.count_objects("manifests/").await, images.len());

    // The upstream's log, whole: each blob once, so its bytes are 1.00x the images'.
    let mut fetched = 0u64;
    for (digest, size) in &blobs {
        let gets = upstream.blob_gets_for(digest).await;
        assert_eq!(
            gets,
            1,
            "{digest} fetched {gets} times from the upstream: {:#?}",
            upstream.request_lines().await
        );
        fetched += size * gets as u64;
    }
    assert_eq!(
        upstream.manifest_gets().await,
        images.len(),
        "one upstream GET of each tag for the whole test: {:#?}",
        upstream.request_lines().await
    );
    eprintln!(
        "chaos: final pulls in {:?}; upstream served {fetched} blob bytes for {image_bytes} in \
         the images ({:.2}x); {:?} in all",
        last.elapsed(),
        fetched as f64 / image_bytes as f64,
        began.elapsed()
    );
    assert_eq!(fetched, image_bytes);
}
