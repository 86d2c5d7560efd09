//! The `cluster` phase (issue 12): regmirror replicas on a shared Garage bucket.
//!
//! Four comparisons, each against the honest reference for what it measures:
//! 1. a warm blob from the local hot tier of a replica with `storage.s3`, against nginx
//!    serving that replica's own file with sendfile;
//! 2. a blob only the bucket holds, read through a replica started on an empty disk (so every
//!    read is a first read: bucket → replica → client, filling the hot tier on the way),
//!    against a GET of the same object straight from Garage with the same load generator on a
//!    URL presigned once with `object_store` (what a replica with `storage.s3.redirect` hands
//!    out; Garage checks the signature on every request);
//! 3. 16 concurrent cold pulls through 3 replicas behind an nginx round-robin front, against
//!    the same through 1 replica, each on a fresh single-node Garage: upstream bytes and wall
//!    time;
//! 4. manifest GET by tag at c=64 through the front of the 3 replicas, against one replica
//!    directly and one replica behind the same kind of front (so the nginx hop is accounted
//!    for).
//!
//! Every figure also reports CPU seconds of the servers involved per GB served or per 1,000
//! requests, read from `/proc/PID/stat`, so that throughput on a machine with more cores can
//! be estimated from what one core does here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::front::Front;
use crate::common::garage::Garage;
use crate::common::{self, Distribution, ImageSpec, PushedImage, Pusher};
use crate::servers::{self, Nginx, Regmirror};
use crate::{load, median, Options, MIB};

/// The shared secret of the benchmark's clusters.
const SECRET: &str = "bench-cluster-secret-0123456789abcdef";
/// Hang guard for waits on readiness and uploads; never a measure.
const GUARD: Duration = Duration::from_secs(180);
/// Layers of the image of the concurrent cold pulls (the issue asks for ≥ 64 MiB).
const HERD_LAYERS: [usize; 2] = [64 * MIB, MIB];
/// Blobs read once each from the bucket through a fresh replica.
const SPREAD_BLOBS: usize = 16;
const SPREAD_SIZE: usize = 16 * MIB;

/// Samples of the phase, by measure.
#[derive(Default)]
pub struct Samples(BTreeMap<String, Vec<f64>>);

impl Samples {
    fn add(&mut self, key: &str, v: f64) {
        self.0.entry(key.to_owned()).or_default().push(v);
    }

    fn median(&self, key: &str) -> Option<f64> {
        median(self.0.get(key)?)
    }
}

/// One replica started by the benchmark.
struct Replica {
    mirror: Regmirror,
}

impl Replica {
    /// A replica on `garage`'s bucket, in a cluster whose peer channels are `peers` (its own,
    /// `peer`, included), or on its own when `peers` is empty.
    async fn start(
        opts: &Options,
        upstream: &str,
        garage: &Garage,
        peers: &[u16],
        peer: u16,
    ) -> Replica {
        let cluster = if peers.is_empty() {
            String::new()
        } else {
            let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            format!(
                "cluster: {{ peers: [{}], listen: \"127.0.0.1:{peer}\", secret: \"{SECRET}\", refresh: 1s }}\n",
                peers.join(", ")
            )
        };
        let yaml = format!(
            "listen: @LISTEN@\n\
             storage: {{ root: @ROOT@, s3: {} }}\n\
             cache: {{ tag_ttl: 1h }}\n\
             default_upstream: docker.io\n\
             upstreams:\n  docker.io: {{ url: \"{upstream}\" }}\n\
             log: {{ level: info, format: text }}\n{cluster}",
            garage.s3_yaml()
        );
        Replica {
            mirror: Regmirror::start(&opts.regmirror_bin, &yaml).await,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.mirror.host().parse().expect("address")
    }

    fn pid(&self) -> u32 {
        self.mirror.pid()
    }

    /// Waits until `/readyz` answers 200 and the replica sees `n` healthy members.
    async fn until_healthy(&self, n: usize) {
        let wanted = format!("regmirror_cluster_members{{state=\"healthy\"}} {n}");
        let base = format!("http://{}", self.mirror.host());
        let ok = tokio::time::timeout(GUARD, async {
            loop {
                let ready = common::http()
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ready {
                    if let Ok(r) = common::http().get(format!("{base}/metrics")).send().await {
                        if r.text().await.unwrap_or_default().contains(&wanted) {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "replica {base} never saw {n} healthy members");
    }
}

/// `n` replicas of one cluster on `garage`, each seeing all of them healthy.
async fn cluster(opts: &Options, upstream: &str, garage: &Garage, n: usize) -> Vec<Replica> {
    let ports: Vec<u16> = (0..n).map(|_| common::free_port()).collect();
    let mut replicas = Vec::new();
    for port in &ports {
        replicas.push(Replica::start(opts, upstream, garage, &ports, *port).await);
    }
    for r in &replicas {
        r.until_healthy(n).await;
    }
    replicas
}

/// Waits until the bucket holds every blob of `digests` (uploads finish after the clients
/// are answered).
async fn until_in_bucket(garage: &Garage, digests: &[String]) {
    let ok = tokio::time::timeout(GUARD, async {
        for d in digests {
            let key = format!("blobs/{}", d.replace(':', "/"));
            while garage.count_objects(&key).await == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
    .await;
    assert!(ok.is_ok(), "the bucket never held all of {digests:?}");
}

/// CPU seconds used so far by `pids` and, for nginx-like masters, their workers.
fn cpu(pids: &[u32]) -> f64 {
    servers::usage(pids).cpu_secs
}

fn front_pids(front: &Front) -> Vec<u32> {
    servers::process_tree(front.pid())
}

/// A presigned GET URL's path and query for `key` in `garage`'s bucket (valid one hour),
/// made once with `object_store`, as the S3 backend itself signs redirects.
async fn presigned_path(garage: &Garage, key: &str) -> String {
    use object_store::signer::Signer;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(garage.endpoint())
        .with_bucket_name(garage.bucket())
        .with_region(garage.region())
        .with_access_key_id(garage.access_key())
        .with_secret_access_key(garage.secret_key())
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()
        .expect("object_store client for Garage");
    let url = store
        .signed_url(
            http::Method::GET,
            &object_store::path::Path::from(key),
            Duration::from_secs(3600),
        )
        .await
        .expect("presigned URL");
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    }
}

fn garage_addr(garage: &Garage) -> SocketAddr {
    let ep = garage.endpoint();
    ep.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("Garage endpoint is an address")
}

/// A timed load figure off the async threads, with the CPU seconds `pids` used during it and
/// the figure's length in seconds (warm-up included, as the CPU is).
async fn timed_load(
    opts: &Options,
    target: load::Target,
    conns: usize,
    pids: &[u32],
) -> (load::Outcome, f64, f64) {
    let measure = Duration::from_secs_f64(opts.secs);
    let warmup = Duration::from_millis(500).min(measure);
    let before = cpu(pids);
    let started = Instant::now();
    let what = format!("{} {}", target.addr, target.path);
    let o = tokio::task::spawn_blocking(move || load::run(&target, conns, warmup, measure))
        .await
        .expect("load thread");
    let used = cpu(pids) - before;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        o.errors == 0 && o.requests > 0,
        "{what} at c={conns}: {} errors, first: {:?}",
        o.errors,
        o.first_error
    );
    (o, used, elapsed)
}

/// One request per target (all at once, or one after another), with the CPU `pids` used.
async fn one_each(
    targets: Vec<load::Target>,
    concurrent: bool,
    pids: &[u32],
) -> (load::Outcome, f64) {
    let before = cpu(pids);
    let o = tokio::task::spawn_blocking(move || load::one_each(&targets, concurrent))
        .await
        .expect("load thread");
    let used = cpu(pids) - before;
    assert!(
        o.errors == 0,
        "one read each: {} errors, first: {:?}",
        o.errors,
        o.first_error
    );
    (o, used)
}

fn blob_target(addr: SocketAddr, path: String) -> load::Target {
    load::Target {
        addr,
        head: false,
        path,
        headers: vec![],
        tls: None,
    }
}

/// A setup under test: its name, the address clients use, the image it serves, the pids of
/// its replicas and those of the nginx front (empty without one).
type Setup<'a> = (&'a str, SocketAddr, &'a PushedImage, &'a [u32], &'a [u32]);

/// Runs the phase `opts.reps` times; each repetition starts its own Garages and replicas.
pub async fn run(opts: &Options, upstream: &Distribution) -> Samples {
    let mut s = Samples::default();
    let pusher = Pusher::new(&upstream.url());
    for rep in 0..opts.reps {
        repetition(opts, upstream, &pusher, rep, &mut s).await;
    }
    s
}

async fn repetition(
    opts: &Options,
    upstream: &Distribution,
    pusher: &Pusher,
    rep: usize,
    s: &mut Samples,
) {
    let tag = format!("c{rep}");
    let herd_three = pusher
        .push_image("bench/cluster-three", &tag, &ImageSpec::new(&HERD_LAYERS))
        .await;
    let herd_one = pusher
        .push_image("bench/cluster-one", &tag, &ImageSpec::new(&HERD_LAYERS))
        .await;
    let spread = pusher
        .push_image(
            "bench/spread",
            &tag,
            &ImageSpec::new(&[SPREAD_SIZE; SPREAD_BLOBS]),
        )
        .await;

    // Two fresh single-node Garages: one per setup, so neither finds the other's blobs.
    let g1 = Garage::single().await;
    let g3 = Garage::single().await;
    let url = upstream.url();
    let one = cluster(opts, &url, &g1, 1).await;
    let three = cluster(opts, &url, &g3, 3).await;
    let front3 = Front::start(&three.iter().map(Replica::addr).collect::<Vec<_>>()).await;
    let front1 = Front::start(&[one[0].addr()]).await;
    let three_pids: Vec<u32> = three.iter().map(Replica::pid).collect();
    let one_pid = vec![one[0].pid()];

    // 3. 16 concurrent cold pulls, 3 replicas behind the front against 1 replica. The CPU of
    // the replicas and of the front are kept apart.
    let front3_pids = front_pids(&front3);
    let setups: [Setup; 2] = [
        ("one", one[0].addr(), &herd_one, &one_pid, &[]),
        (
            "three",
            front3.addr(),
            &herd_three,
            &three_pids,
            &front3_pids,
        ),
    ];
    let mut order: Vec<usize> = vec![0, 1];
    if rep % 2 == 1 {
        order.reverse();
    }
    for i in order {
        let (name, addr, img, pids, front) = &setups[i];
        let host = addr.to_string();
        upstream.settle().await;
        let offset = servers::file_len(&upstream.log_path().to_owned());
        let (before, front_before) = (cpu(pids), cpu(front));
        let started = Instant::now();
        let pulls: Vec<_> = (0..16).map(|_| crate::pull(&host, img)).collect();
        futures_util::future::join_all(pulls).await;
        let wall = started.elapsed().as_secs_f64();
        let used = cpu(pids) - before;
        let front_used = cpu(front) - front_before;
        upstream.settle().await;
        let served = servers::served_since(upstream.log_path(), offset);
        let blobs = img.blob_digests().len();
        let image_bytes: u64 = img.layer_sizes.iter().sum::<u64>() + img.config_bytes.len() as u64;
        let delivered_gb = 16.0 * image_bytes as f64 / 1e9;
        println!(
            "[rep {rep}] cluster {name:<5} 16 cold pulls of {} MiB: {wall:.2}s, upstream served {} blob \
             GETs for {blobs} blobs, {:.1} MiB; regmirror CPU {used:.2}s ({:.3} s/GB delivered), \
             nginx front CPU {front_used:.2}s ({:.3} s/GB)",
            image_bytes / MIB as u64,
            served.blob_gets,
            served.bytes as f64 / MIB as f64,
            used / delivered_gb,
            front_used / delivered_gb
        );
        s.add(&format!("herd wall {name}"), wall);
        s.add(
            &format!("herd bytes {name}"),
            served.bytes as f64 / MIB as f64,
        );
        s.add(
            &format!("herd gets per blob {name}"),
            served.blob_gets as f64 / blobs as f64,
        );
        s.add(&format!("herd cpu per GB {name}"), used / delivered_gb);
        if !front.is_empty() {
            s.add(
                &format!("herd front cpu per GB {name}"),
                front_used / delivered_gb,
            );
        }
    }
    // The uploads of the pulls finish in the background: let them land before measuring.
    until_in_bucket(&g1, &herd_one.blob_digests()).await;
    until_in_bucket(&g3, &herd_three.blob_digests()).await;

    // 4. Manifest GET by tag at c=64.
    let accept = format!("Accept: {}", common::ACCEPT_ALL_MANIFESTS);
    let front1_pids = front_pids(&front1);
    let mut manifest_setups: Vec<Setup> = vec![
        (
            "three",
            front3.addr(),
            &herd_three,
            &three_pids,
            &front3_pids,
        ),
        ("one", one[0].addr(), &herd_one, &one_pid, &[]),
        (
            "one front",
            front1.addr(),
            &herd_one,
            &one_pid,
            &front1_pids,
        ),
    ];
    if rep % 2 == 1 {
        manifest_setups.reverse();
    }
    for (name, addr, img, pids, front) in &manifest_setups {
        let t = load::Target {
            addr: *addr,
            head: false,
            path: format!("/v2/{}/manifests/{}", img.repo, img.reference),
            headers: vec![accept.clone()],
            tls: None,
        };
        let front_before = cpu(front);
        let (o, used, elapsed) = timed_load(opts, t, 64, pids).await;
        let front_used = cpu(front) - front_before;
        // Requests over the whole figure (warm-up included), estimated from the rate.
        let all = o.rps() * elapsed;
        let per_k = used * 1000.0 / all.max(1.0);
        let front_per_k = front_used * 1000.0 / all.max(1.0);
        println!(
            "[rep {rep}] cluster {name:<9} manifest GET by tag c=64 {:8.0} req/s p50 {:6.2} ms \
             p99 {:6.2} ms; CPU per 1k requests: regmirror {per_k:.3} s, nginx front \
             {front_per_k:.3} s, load generator {:.3} s",
            o.rps(),
            o.percentile_ms(50.0),
            o.percentile_ms(99.0),
            o.client_cpu_secs * 1000.0 / all.max(1.0)
        );
        s.add(&format!("manifest rps {name}"), o.rps());
        s.add(&format!("manifest cpu per 1k {name}"), per_k);
        if !front.is_empty() {
            s.add(&format!("manifest front cpu per 1k {name}"), front_per_k);
        }
    }

    // 1. Warm blob c=16 from the hot tier of the single replica, against nginx on its file.
    let (big, _) = herd_one.largest_layer();
    let hex = big
        .strip_prefix("sha256:")
        .expect("sha256 digest")
        .to_owned();
    let file = one[0]
        .mirror
        .data_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(&hex);
    assert!(
        file.exists(),
        "the replica's hot tier has no file for {big}"
    );
    let nginx = Nginx::start(one[0].mirror.data_dir()).await;
    let mut hot: Vec<(&str, load::Target, Vec<u32>)> = vec![
        (
            "replica",
            blob_target(one[0].addr(), format!("/v2/{}/blobs/{big}", herd_one.repo)),
            one_pid.clone(),
        ),
        (
            "nginx",
            blob_target(
                nginx.host().parse().expect("address"),
                format!("/blobs/sha256/{}/{hex}", &hex[..2]),
            ),
            nginx.pids(),
        ),
    ];
    if rep % 2 == 1 {
        hot.reverse();
    }
    for (name, t, pids) in hot {
        let (o, used, elapsed) = timed_load(opts, t, 16, &pids).await;
        // Bytes over the whole figure (warm-up included), estimated from the rate.
        let gb = o.gbps() * elapsed;
        println!(
            "[rep {rep}] cluster hot tier {name:<7} blob 64 MiB c=16 {:6.2} GB/s; server CPU {:.3} s/GB",
            o.gbps(),
            used / gb.max(1e-9)
        );
        s.add(&format!("hot gbps {name}"), o.gbps());
        s.add(&format!("hot cpu per GB {name}"), used / gb.max(1e-9));
    }
    drop(nginx);

    // 2. First reads from the bucket through replicas on empty disks, against Garage direct.
    crate::pull(&one[0].mirror.host(), &spread).await;
    let layers = spread.layer_digests.clone();
    until_in_bucket(&g1, &layers).await;
    let gpid: Vec<u32> = g1.pid(0).into_iter().collect();
    let mut direct_paths = Vec::new();
    for d in &layers {
        direct_paths.push(presigned_path(&g1, &format!("blobs/{}", d.replace(':', "/"))).await);
    }
    // Layers are compressed: a little over their nominal size.
    let total_bytes: u64 = spread.layer_sizes.iter().sum();
    let total_gb = total_bytes as f64 / 1e9;
    for c in [1usize, 16] {
        let concurrent = c > 1;
        let mut sides = vec!["replica", "garage"];
        if rep % 2 == 1 {
            sides.reverse();
        }
        for side in sides {
            let (o, used_server, used_garage) = if side == "replica" {
                // A replica on an empty disk, on its own: every read goes to the bucket.
                upstream.settle().await;
                let offset = servers::file_len(&upstream.log_path().to_owned());
                let fresh = Replica::start(opts, &url, &g1, &[], 0).await;
                let targets = layers
                    .iter()
                    .map(|d| blob_target(fresh.addr(), format!("/v2/{}/blobs/{d}", spread.repo)))
                    .collect();
                let g_before = cpu(&gpid);
                let (o, used) = one_each(targets, concurrent, &[fresh.pid()]).await;
                let g_used = cpu(&gpid) - g_before;
                // What the reads cost in S3 requests, for whoever reads the figure.
                let metrics = match common::http()
                    .get(format!("http://{}/metrics", fresh.mirror.host()))
                    .send()
                    .await
                {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                for line in metrics.lines().filter(|l| {
                    l.starts_with("regmirror_s3_requests_total")
                        || l.starts_with("regmirror_s3_request_duration_seconds_sum")
                        || l.starts_with("regmirror_hot_tier_total")
                }) {
                    println!("[rep {rep}] cluster bucket replica c={c}: {line}");
                }
                upstream.settle().await;
                let asked = servers::served_since(upstream.log_path(), offset).requests;
                assert_eq!(asked, 0, "a replica on an empty disk asked the upstream");
                (o, used, g_used)
            } else {
                let addr = garage_addr(&g1);
                let targets = direct_paths
                    .iter()
                    .map(|p| blob_target(addr, p.clone()))
                    .collect();
                let (o, g_used) = one_each(targets, concurrent, &gpid).await;
                (o, 0.0, g_used)
            };
            assert_eq!(o.body_bytes, total_bytes, "{side} served every blob whole");
            println!(
                "[rep {rep}] cluster bucket {side:<7} {SPREAD_BLOBS} × {} MiB c={c:<2} {:6.2} GB/s; CPU \
                 regmirror {:.3} s/GB, garage {:.3} s/GB",
                SPREAD_SIZE / MIB,
                o.gbps(),
                used_server / total_gb,
                used_garage / total_gb
            );
            s.add(&format!("bucket gbps c={c} {side}"), o.gbps());
            s.add(
                &format!("bucket cpu per GB c={c} {side}"),
                used_server / total_gb,
            );
            s.add(
                &format!("bucket garage cpu per GB c={c} {side}"),
                used_garage / total_gb,
            );
        }
    }
    drop(front1);
    drop(front3);
}

/// One line of the phase's table.
struct Row {
    label: String,
    value: Option<f64>,
    reference: Option<f64>,
    goal: Option<f64>,
    cpu: String,
}

fn cell(v: Option<f64>) -> String {
    v.map_or("–".into(), crate::fmt_num)
}

/// The phase's markdown table: regmirror's figure, the reference's, the ratio and its target,
/// and the CPU the servers used for it.
pub fn report(s: &Samples) -> String {
    let m = |k: &str| s.median(k);
    let cpu2 = |unit: &str, a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => String::new(),
        _ => format!(
            "{} / {} {unit}",
            a.map_or("–".into(), |v| format!("{v:.3}")),
            b.map_or("–".into(), |v| format!("{v:.3}"))
        ),
    };
    let mut rows = vec![Row {
        label: "warm 64 MiB blob GET c=16 (GB/s): hot tier of an S3 replica ÷ nginx sendfile of its file".into(),
        value: m("hot gbps replica"),
        reference: m("hot gbps nginx"),
        goal: Some(0.95),
        cpu: cpu2("s/GB", m("hot cpu per GB replica"), m("hot cpu per GB nginx")),
    }];
    for c in [1, 16] {
        let garage = |side: &str| m(&format!("bucket garage cpu per GB c={c} {side}"));
        rows.push(Row {
            label: format!(
                "first read of {SPREAD_BLOBS} × {} MiB blobs from the bucket c={c} (GB/s): replica on an empty disk ÷ presigned GET from Garage",
                SPREAD_SIZE / MIB
            ),
            value: m(&format!("bucket gbps c={c} replica")),
            reference: m(&format!("bucket gbps c={c} garage")),
            goal: Some(0.8),
            cpu: match (m(&format!("bucket cpu per GB c={c} replica")), garage("replica"), garage("garage")) {
                (None, None, None) => String::new(),
                (r, gr, gg) => format!(
                    "regmirror {} + garage {} / garage {} s/GB",
                    r.map_or("–".into(), |v| format!("{v:.3}")),
                    gr.map_or("–".into(), |v| format!("{v:.3}")),
                    gg.map_or("–".into(), |v| format!("{v:.3}"))
                ),
            },
        });
    }
    let herd = format!("{} MiB image", HERD_LAYERS.iter().sum::<usize>() / MIB);
    rows.push(Row {
        label: format!("16 concurrent cold pulls of a {herd}: upstream MiB, 3 replicas behind nginx ÷ 1 replica"),
        value: m("herd bytes three"),
        reference: m("herd bytes one"),
        goal: None,
        cpu: String::new(),
    });
    rows.push(Row {
        label: "… upstream GETs per blob, 3 replicas ÷ 1 replica".into(),
        value: m("herd gets per blob three"),
        reference: m("herd gets per blob one"),
        goal: None,
        cpu: String::new(),
    });
    let with_front = |key: &str, who: &str| -> String {
        let r = m(&format!("{key} {who}"));
        let f = m(&format!("{} {who}", key.replacen(' ', " front ", 1)));
        match (r, f) {
            (None, _) => "–".into(),
            (Some(r), None) => format!("{r:.3}"),
            (Some(r), Some(f)) => format!("{r:.3} + front {f:.3}"),
        }
    };
    let fronted = |key: &str, unit: &str, a: &str, b: &str| {
        if m(&format!("{key} {a}")).is_none() && m(&format!("{key} {b}")).is_none() {
            return String::new();
        }
        format!("{} / {} {unit}", with_front(key, a), with_front(key, b))
    };
    rows.push(Row {
        label: "… wall time (s), 3 replicas behind nginx ÷ 1 replica".into(),
        value: m("herd wall three"),
        reference: m("herd wall one"),
        goal: None,
        cpu: fronted("herd cpu per GB", "s/GB delivered", "three", "one"),
    });
    rows.push(Row {
        label: "manifest GET by tag c=64 (req/s): 3 replicas behind nginx ÷ 1 replica direct"
            .into(),
        value: m("manifest rps three"),
        reference: m("manifest rps one"),
        goal: None,
        cpu: fronted("manifest cpu per 1k", "s per 1k req", "three", "one"),
    });
    rows.push(Row {
        label: "manifest GET by tag c=64 (req/s): 3 replicas behind nginx ÷ 1 replica behind the same nginx front".into(),
        value: m("manifest rps three"),
        reference: m("manifest rps one front"),
        goal: None,
        cpu: fronted("manifest cpu per 1k", "s per 1k req", "three", "one front"),
    });

    let mut out = String::from(
        "| cluster measure | regmirror | reference | ratio | target | server CPU (regmirror / reference) |\n|---|--:|--:|--:|---|---|\n",
    );
    for r in rows {
        if r.value.is_none() && r.reference.is_none() {
            continue;
        }
        let ratio = crate::ratio(r.value, r.reference);
        let target = match (r.goal, ratio) {
            (Some(g), Some(x)) => format!("≥ {g}×: {}", if x >= g { "met" } else { "**missed**" }),
            (Some(g), None) => format!("≥ {g}×"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {target} | {} |\n",
            r.label,
            cell(r.value),
            cell(r.reference),
            ratio.map_or("–".into(), |v| format!("{v:.2}×")),
            r.cpu
        ));
    }
    out.push_str(
        "\nCluster rows: each repetition runs on fresh single-node Garages (one per setup); \
         server CPU sums every process serving the figure (replicas, nginx front, Garage where \
         named) from /proc/PID/stat, warm-up included.\n",
    );
    out
}

/// Checks the table, for `cargo test`'s run of this bench.
pub fn self_check() {
    let mut s = Samples::default();
    s.add("hot gbps replica", 1.9);
    s.add("hot gbps nginx", 2.0);
    s.add("hot cpu per GB replica", 0.5);
    s.add("herd bytes three", 65.0);
    s.add("herd bytes one", 65.0);
    s.add("herd wall three", 4.0);
    s.add("herd wall one", 2.0);
    s.add("herd cpu per GB three", 1.5);
    s.add("herd front cpu per GB three", 0.25);
    s.add("herd cpu per GB one", 0.5);
    let t = report(&s);
    assert!(
        t.contains("| 1.90 | 2.00 | 0.95× | ≥ 0.95×: met | 0.500 / – s/GB |"),
        "{t}"
    );
    assert!(t.contains("| 65.0 | 65.0 | 1.00× |  |  |"), "{t}");
    assert!(
        t.contains("| 4.00 | 2.00 | 2.00× |  | 1.500 + front 0.250 / 0.500 s/GB delivered |"),
        "{t}"
    );
    assert!(
        !t.contains("first read"),
        "rows without figures are left out: {t}"
    );
}
