//! regmirror side by side with what users would run instead, in one run on loopback (issue 7):
//! CNCF distribution in proxy mode (the peer) and nginx with sendfile on the very same blob
//! file (the limit of this machine).
//!
//! One upstream distribution holds generated images; regmirror and the peer pull through it
//! (optionally through a relay that behaves like a WAN link). The measurements alternate the
//! servers' order from one repetition to the next, and the figures reported are medians over
//! repetitions. Run it with `bash bench/run.sh` (see README.md, "Benchmarks").
//!
//! `cargo test --all-targets` also runs this target, without `--bench`: it then only checks its
//! own parsers and exits, so CI never starts a benchmark.

mod cluster;
#[path = "../tests/common/mod.rs"]
mod common;
mod load;
mod relay;
mod servers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Distribution, ImageSpec, PushedImage, Pusher, RegmirrorConfig};
use servers::{Nginx, Peer, Regmirror, Usage};

const MIB: usize = 1024 * 1024;

/// Command-line options (after cargo's `--bench`).
#[derive(Clone, Debug)]
struct Options {
    /// Repetitions of every measurement, alternating the servers' order.
    reps: usize,
    /// Seconds each load measurement lasts (after a warm-up).
    secs: f64,
    /// Size of the big image's layer.
    big: usize,
    wan: Option<relay::Wan>,
    /// Where the markdown table is written as well as printed.
    out: Option<PathBuf>,
    /// Phases to run (pulls, herd, blobs, manifests, https, cluster); all when empty.
    only: Vec<String>,
    /// Record a `perf` profile of the server during each load figure.
    perf: bool,
    /// The regmirror binary (default: the one cargo built with this bench).
    regmirror_bin: PathBuf,
}

impl Options {
    fn runs(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench compare -- [--reps N] [--secs S] [--big-mib M] \
         [--wan RTT_MS,MBIT] [--out FILE] [--quick] [--only PHASE,...] [--perf] [--regmirror-bin PATH]\n\
         phases: pulls, herd, blobs, manifests, https, cluster; --perf writes target/bench/perf/*.data"
    );
    std::process::exit(2)
}

fn parse_options(args: &[String]) -> Options {
    let mut o = Options {
        reps: 2,
        secs: 3.0,
        big: 256 * MIB,
        wan: None,
        out: None,
        only: Vec::new(),
        perf: false,
        regmirror_bin: PathBuf::from(env!("CARGO_BIN_EXE_regmirror")),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--bench" => {}
            "--reps" => o.reps = value().parse().unwrap_or_else(|_| usage()),
            "--secs" => o.secs = value().parse().unwrap_or_else(|_| usage()),
            "--big-mib" => o.big = value().parse::<usize>().unwrap_or_else(|_| usage()) * MIB,
            "--wan" => {
                o.wan = Some(relay::Wan::parse(&value()).unwrap_or_else(|e| {
                    eprintln!("{e}");
                    usage()
                }))
            }
            "--out" => o.out = Some(PathBuf::from(value())),
            "--only" => {
                o.only = value().split(',').map(str::to_owned).collect();
                let known = ["pulls", "herd", "blobs", "manifests", "https", "cluster"];
                if o.only.iter().any(|p| !known.contains(&p.as_str())) {
                    usage()
                }
            }
            "--perf" => o.perf = true,
            "--regmirror-bin" => o.regmirror_bin = PathBuf::from(value()),
            "--quick" => {
                o.reps = 1;
                o.secs = 1.0;
                o.big = 32 * MIB;
            }
            _ => usage(),
        }
    }
    if o.reps == 0 || o.secs <= 0.0 {
        usage()
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test` runs bench targets without `--bench`: check the parsers, start nothing.
        load::self_check();
        servers::self_check();
        relay::self_check();
        report_self_check();
        cluster::self_check();
        println!("bench compare: self-check passed (run `bash bench/run.sh` to benchmark)");
        return;
    }
    let opts = parse_options(&args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Servers are spawned from this thread (block_on), which outlives them all.
    rt.block_on(run(opts));
}

/// The images of one repetition, all on the upstream.
struct Images {
    big: PushedImage,
    five: PushedImage,
    fifty: PushedImage,
    /// Pulled by 8 clients at once.
    herd: PushedImage,
}

/// The three servers under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Regmirror,
    /// regmirror with `tag_ttl: 0s`.
    RegmirrorTtl0,
    Peer,
    Nginx,
    /// A regmirror serving HTTPS, and nginx serving its blob file over HTTPS with the same
    /// certificate (the `https` phase).
    RegmirrorTls,
    NginxTls,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Regmirror => "regmirror",
            Who::RegmirrorTtl0 => "regmirror ttl=0",
            Who::Peer => "distribution",
            Who::Nginx => "nginx",
            Who::RegmirrorTls => "regmirror https",
            Who::NginxTls => "nginx https",
        }
    }
}

/// Every sample, by (measure, server).
#[derive(Default)]
struct Samples {
    values: BTreeMap<(String, Who), Vec<f64>>,
}

impl Samples {
    fn add(&mut self, key: &str, who: Who, v: f64) {
        self.values
            .entry((key.to_owned(), who))
            .or_default()
            .push(v);
    }

    fn median(&self, key: &str, who: Who) -> Option<f64> {
        let v = self.values.get(&(key.to_owned(), who))?;
        median(v)
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The servers' order in repetition `rep`: reversed every other time.
fn order(rep: usize, servers: &[Who]) -> Vec<Who> {
    let mut v = servers.to_vec();
    if rep % 2 == 1 {
        v.reverse();
    }
    v
}

struct Bench {
    opts: Options,
    upstream: Distribution,
    regmirror: Regmirror,
    ttl0: Regmirror,
    peer: Peer,
    nginx: Option<Nginx>,
    /// The `https` phase's servers.
    tls: Option<(Regmirror, Nginx)>,
    /// Bytes the WAN relay carried towards the caches, when there is one.
    relay_bytes: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    samples: Samples,
}

impl Bench {
    fn host(&self, who: Who) -> String {
        match who {
            Who::Regmirror => self.regmirror.host(),
            Who::RegmirrorTtl0 => self.ttl0.host(),
            Who::Peer => self.peer.host(),
            Who::Nginx => self.nginx.as_ref().expect("nginx started").host(),
            Who::RegmirrorTls => self.tls.as_ref().expect("https phase").0.host(),
            Who::NginxTls => self.tls.as_ref().expect("https phase").1.host(),
        }
    }

    fn addr(&self, who: Who) -> SocketAddr {
        self.host(who).parse().expect("host is an address")
    }

    fn pids(&self, who: Who) -> Vec<u32> {
        match who {
            Who::Regmirror => vec![self.regmirror.pid()],
            Who::RegmirrorTtl0 => vec![self.ttl0.pid()],
            Who::Peer => vec![self.peer.pid()],
            Who::Nginx => self.nginx.as_ref().map(|n| n.pids()).unwrap_or_default(),
            Who::RegmirrorTls => self.tls.iter().map(|t| t.0.pid()).collect(),
            Who::NginxTls => self.tls.as_ref().map(|t| t.1.pids()).unwrap_or_default(),
        }
    }

    fn measure_window(&self) -> (Duration, Duration) {
        let measure = Duration::from_secs_f64(self.opts.secs);
        (Duration::from_millis(500).min(measure), measure)
    }

    /// Runs one load measurement off the async threads; panics on any failed request.
    async fn load(&self, who: Who, target: load::Target, conns: usize) -> load::Outcome {
        let (warmup, measure) = self.measure_window();
        let what = format!(
            "{} {} {}",
            who.name(),
            if target.head { "HEAD" } else { "GET" },
            target.path
        );
        let perf = self.opts.perf.then(|| self.perf(who, &target, conns));
        let o = tokio::task::spawn_blocking(move || load::run(&target, conns, warmup, measure))
            .await
            .expect("load thread");
        if let Some(mut p) = perf {
            // SIGINT makes perf write its file and exit.
            p.signal(libc::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while p.exited().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(
            o.errors == 0 && (o.requests > 0 || o.body_bytes > 0),
            "{what} at c={conns}: {} errors, first: {:?}, {} requests",
            o.errors,
            o.first_error,
            o.requests
        );
        o
    }
}

impl Bench {
    /// [`Bench::load`], with the server's and the client's CPU use over the figure (as a
    /// share of one core, warm-up included) to show which side was the bottleneck.
    async fn load_with_cpu(
        &self,
        who: Who,
        target: load::Target,
        conns: usize,
    ) -> (load::Outcome, String) {
        let before = servers::usage(&self.pids(who)).cpu_secs;
        let started = Instant::now();
        let o = self.load(who, target, conns).await;
        let wall = started.elapsed().as_secs_f64();
        let server = servers::usage(&self.pids(who)).cpu_secs - before;
        let cpu = format!(
            "server CPU {:.0}%, client CPU {:.0}%",
            server / wall * 100.0,
            o.client_cpu_secs / wall * 100.0
        );
        (o, cpu)
    }
}

/// Numbers the perf recordings of one run.
static PERF_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Bench {
    /// Starts `perf record` on the server for the length of one load figure.
    fn perf(&self, who: Who, target: &load::Target, conns: usize) -> common::ChildProc {
        let dir = PathBuf::from("target/bench/perf");
        std::fs::create_dir_all(&dir).expect("creating target/bench/perf");
        let kind = if target.path.contains("/manifests/") {
            "manifest"
        } else {
            "blob"
        };
        let name = format!(
            "{}-{kind}-{}-c{conns}-{}",
            who.name().replace([' ', '='], "_"),
            if target.head { "head" } else { "get" },
            PERF_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let pids: Vec<String> = self.pids(who).iter().map(u32::to_string).collect();
        let mut cmd = std::process::Command::new(common::require_tool("perf"));
        cmd.args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "499",
            "--call-graph",
            "dwarf,8192",
            "-p",
        ])
        .arg(pids.join(","))
        .arg("-o")
        .arg(dir.join(format!("{name}.data")));
        println!(
            "perf: recording {} into target/bench/perf/{name}.data",
            who.name()
        );
        common::ChildProc::spawn("perf", cmd, &dir.join(format!("{name}.log")))
    }
}

/// Pulls `repo:tag` from `host` with skopeo into a fresh directory; the manifest must be the
/// pushed one byte for byte (skopeo checks every blob's digest itself).
async fn pull(host: &str, img: &PushedImage) -> f64 {
    let dest = common::tempdir("bench-pull-");
    let src = format!("docker://{host}/{}:{}", img.repo, img.reference);
    let started = Instant::now();
    let out = common::skopeo_copy_to_dir(&src, dest.path(), false).await;
    let secs = started.elapsed().as_secs_f64();
    out.assert_success();
    let manifest = std::fs::read(dest.path().join("manifest.json")).expect("manifest.json");
    assert!(manifest == img.manifest_bytes, "{src}: manifest differs");
    secs
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn run(opts: Options) {
    let started = Instant::now();
    let date = utc_now();
    let load_before = loadavg();
    println!("bench compare: {opts:?}");
    println!(
        "machine: {}; load average at start: {load_before}",
        machine()
    );

    let upstream = Distribution::start().await;
    let relay = match opts.wan {
        Some(wan) => Some(relay::start(upstream.host().parse().unwrap(), wan).await),
        None => None,
    };
    let remote = match &relay {
        Some(r) => format!("http://{}", r.addr),
        None => upstream.url(),
    };

    // Every repetition gets its own images, so each cold pull is really cold; the herd image
    // is pulled by 8 clients at once.
    let pusher = Pusher::new(&upstream.url());
    let mut images = Vec::new();
    for rep in 0..opts.reps {
        let tag = format!("r{rep}");
        let t = Instant::now();
        let big = pusher
            .push_image("bench/big", &tag, &ImageSpec::new(&[opts.big]))
            .await;
        let herd = pusher
            .push_image("bench/herd", &tag, &ImageSpec::new(&[opts.big]))
            .await;
        let five = pusher
            .push_image("bench/five", &tag, &ImageSpec::new(&[MIB; 5]))
            .await;
        let fifty = pusher
            .push_image("bench/fifty", &tag, &ImageSpec::new(&[100 * 1024; 50]))
            .await;
        println!(
            "images for repetition {rep} pushed in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        images.push(Images {
            big,
            five,
            fifty,
            herd,
        });
    }

    let mut config = RegmirrorConfig::docker_io(&remote);
    config.log_level = "info".into();
    let regmirror = Regmirror::start(&opts.regmirror_bin, &config.to_yaml()).await;
    let ttl0 = Regmirror::start(&opts.regmirror_bin, &config.clone().tag_ttl("0s").to_yaml()).await;
    let peer = Peer::start(&remote).await;
    let mut b = Bench {
        opts: opts.clone(),
        upstream,
        regmirror,
        ttl0,
        peer,
        nginx: None,
        tls: None,
        relay_bytes: relay.as_ref().map(|r| r.downstream_bytes.clone()),
        samples: Samples::default(),
    };

    if opts.runs("pulls") {
        pulls(&mut b, &images).await;
    } else {
        // The later phases want the first repetition's images cached by both.
        for who in [Who::Regmirror, Who::Peer] {
            for img in [&images[0].big, &images[0].five] {
                pull(&b.host(who), img).await;
            }
        }
    }
    if opts.runs("herd") {
        herds(&mut b, &images).await;
    }
    b.nginx = Some(Nginx::start(b.regmirror.data_dir()).await);
    if opts.runs("blobs") {
        blobs(&mut b, &images[0]).await;
    }
    if opts.runs("manifests") {
        manifests(&mut b, &images[0]).await;
    }
    if opts.runs("https") {
        https(&mut b, &config, &images[0]).await;
    }
    let cluster_samples = if opts.runs("cluster") {
        Some(cluster::run(&b.opts, &b.upstream).await)
    } else {
        None
    };

    let mut usage = BTreeMap::new();
    for who in [Who::Regmirror, Who::RegmirrorTtl0, Who::Peer, Who::Nginx] {
        let u = servers::usage(&b.pids(who));
        println!(
            "{:<16} peak RSS {:>7.1} MiB, CPU {:>6.1} s",
            who.name(),
            u.peak_rss_kib as f64 / 1024.0,
            u.cpu_secs
        );
        usage.insert(who, u);
    }
    let header = format!(
        "{date}; {}; load average {load_before} at start, {} at end; {} repetition(s), {} s per load \
         figure, big layer {} MiB{}; {:.0} s in all",
        machine(),
        loadavg(),
        opts.reps,
        opts.secs,
        opts.big / MIB,
        opts.wan.map_or(String::new(), |w| format!(
            ", WAN relay {:.0} ms RTT {:.0} Mbit/s",
            w.rtt.as_secs_f64() * 1000.0,
            w.bytes_per_sec * 8.0 / 1e6
        )),
        started.elapsed().as_secs_f64()
    );
    let mut table = report(&b.samples, &usage, &header, opts.big / MIB);
    if let Some(samples) = &cluster_samples {
        table.push('\n');
        table.push_str(&cluster::report(samples));
    }
    println!("\n{table}");
    if let Some(path) = &opts.out {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, &table).expect("writing --out");
        println!("written to {}", path.display());
    }
    drop(relay);
}

/// Cold then warm pull of each image, by each cache.
async fn pulls(b: &mut Bench, images: &[Images]) {
    for (rep, img) in images.iter().enumerate() {
        for who in order(rep, &[Who::Regmirror, Who::Peer]) {
            let host = b.host(who);
            for (key, image) in [
                ("big", &img.big),
                ("five", &img.five),
                ("fifty", &img.fifty),
            ] {
                let cold = pull(&host, image).await;
                let warm = pull(&host, image).await;
                println!(
                    "[rep {rep}] {:<13} pull {key:<5} cold {cold:6.2}s warm {warm:6.2}s",
                    who.name()
                );
                b.samples.add(&format!("cold {key}"), who, cold);
                b.samples.add(&format!("warm {key}"), who, warm);
            }
        }
    }
}

/// Eight clients pull the same cold image at once: wall time, and what the upstream served.
async fn herds(b: &mut Bench, images: &[Images]) {
    for (rep, img) in images.iter().enumerate() {
        for who in order(rep, &[Who::Regmirror, Who::Peer]) {
            let host = b.host(who);
            b.upstream.settle().await;
            let offset = servers::file_len(&b.upstream.log_path().to_owned());
            let relayed = relay_count(b);
            let started = Instant::now();
            let pulls: Vec<_> = (0..8).map(|_| pull(&host, &img.herd)).collect();
            futures_util::future::join_all(pulls).await;
            let wall = started.elapsed().as_secs_f64();
            b.upstream.settle().await;
            let served = servers::served_since(b.upstream.log_path(), offset);
            if let Some(r) = relay_count(b) {
                let mib = (r - relayed.unwrap_or(0)) as f64 / MIB as f64;
                println!(
                    "[rep {rep}] {:<13} the WAN relay carried {mib:.1} MiB",
                    who.name()
                );
            }
            let blobs = img.herd.blob_digests().len();
            println!(
                "[rep {rep}] {:<13} 8 cold pulls of {} MiB: {wall:.2}s, upstream served {} blob GETs \
                 for {blobs} blobs, {:.1} MiB",
                who.name(),
                b.opts.big / MIB,
                served.blob_gets,
                served.bytes as f64 / MIB as f64
            );
            b.samples.add("herd wall", who, wall);
            b.samples
                .add("herd bytes", who, served.bytes as f64 / MIB as f64);
            b.samples.add(
                "herd blob gets per blob",
                who,
                served.blob_gets as f64 / blobs as f64,
            );
        }
    }
}

fn relay_count(b: &Bench) -> Option<u64> {
    let r = b.relay_bytes.as_ref()?;
    Some(r.load(std::sync::atomic::Ordering::Relaxed))
}

/// Warm blob GET throughput, against nginx serving regmirror's own copy of the file.
async fn blobs(b: &mut Bench, img: &Images) {
    let (big, _) = img.big.largest_layer();
    let small = img.five.layer_digests[0].clone();
    let path = |who: Who, digest: &str, repo: &str| match who {
        Who::Nginx => {
            let hex = digest.strip_prefix("sha256:").unwrap();
            format!("/blobs/sha256/{}/{hex}", &hex[..2])
        }
        _ => format!("/v2/{repo}/blobs/{digest}"),
    };
    // Both caches hold the blobs (pulled above); nginx must find regmirror's file.
    for digest in [&big, &small] {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let file = b
            .regmirror
            .data_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        assert!(file.exists(), "regmirror has no file for {digest}");
    }
    for rep in 0..b.opts.reps {
        for who in order(rep, &[Who::Regmirror, Who::Peer, Who::Nginx]) {
            for c in [1, 4, 16] {
                let t = load::Target {
                    addr: b.addr(who),
                    head: false,
                    path: path(who, &big, "bench/big"),
                    headers: vec![],
                    tls: None,
                };
                let (o, cpu) = b.load_with_cpu(who, t, c).await;
                println!(
                    "[rep {rep}] {:<13} blob {} MiB c={c:<2} {:6.2} GB/s ({cpu})",
                    who.name(),
                    b.opts.big / MIB,
                    o.gbps()
                );
                b.samples.add(&format!("blob c={c}"), who, o.gbps());
            }
            let t = load::Target {
                addr: b.addr(who),
                head: false,
                path: path(who, &small, "bench/five"),
                headers: vec![],
                tls: None,
            };
            let (o, cpu) = b.load_with_cpu(who, t, 64).await;
            println!(
                "[rep {rep}] {:<13} blob 1 MiB c=64 {:8.0} req/s ({cpu})",
                who.name(),
                o.rps()
            );
            b.samples.add("blob 1MiB c=64", who, o.rps());
        }
    }
}

/// Warm blob GET over HTTPS (HTTP/1.1, TLS 1.3): a regmirror with `tls:` against nginx serving
/// that regmirror's own blob file over HTTPS with the same certificate. Neither can use
/// sendfile; both read the file and encrypt it.
async fn https(b: &mut Bench, config: &RegmirrorConfig, img: &Images) {
    let pki = common::tempdir("bench-pki-");
    let ca = common::pki::Ca::new(pki.path(), "bench-ca");
    let cert = ca.server("bench-server");
    let yaml = format!(
        "{}tls: {{ cert: {:?}, key: {:?} }}\n",
        config.to_yaml(),
        cert.cert,
        cert.key
    );
    let regmirror = Regmirror::start_tls(&b.opts.regmirror_bin, &yaml).await;
    let (big, _) = img.big.largest_layer();
    let client = load::tls_client(&ca.cert);
    // One GET fills this instance's cache from the upstream.
    let warm = load::Target {
        addr: regmirror.host().parse().expect("address"),
        head: false,
        path: format!("/v2/bench/big/blobs/{big}"),
        headers: vec![],
        tls: Some(client.clone()),
    };
    let o = tokio::task::spawn_blocking(move || {
        load::run(&warm, 1, Duration::ZERO, Duration::from_secs(2))
    })
    .await
    .expect("warm-up");
    assert!(o.errors == 0, "https warm-up: {:?}", o.first_error);
    let hex = big.strip_prefix("sha256:").expect("sha256 digest");
    assert!(
        regmirror
            .data_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists(),
        "the https regmirror cached the blob"
    );
    let nginx = Nginx::start_https(regmirror.data_dir(), &cert.cert, &cert.key).await;
    b.tls = Some((regmirror, nginx));
    for rep in 0..b.opts.reps {
        for who in order(rep, &[Who::RegmirrorTls, Who::NginxTls]) {
            for c in [1, 4, 16] {
                let path = match who {
                    Who::NginxTls => format!("/blobs/sha256/{}/{hex}", &hex[..2]),
                    _ => format!("/v2/bench/big/blobs/{big}"),
                };
                let t = load::Target {
                    addr: b.addr(who),
                    head: false,
                    path,
                    headers: vec![],
                    tls: Some(client.clone()),
                };
                let (o, cpu) = b.load_with_cpu(who, t, c).await;
                println!(
                    "[rep {rep}] {:<16} blob {} MiB c={c:<2} {:6.2} GB/s ({cpu})",
                    who.name(),
                    b.opts.big / MIB,
                    o.gbps()
                );
                b.samples.add(&format!("https blob c={c}"), who, o.gbps());
            }
        }
    }
}

/// Manifest GET and HEAD, by tag and by digest, at concurrency 64.
async fn manifests(b: &mut Bench, img: &Images) {
    let five = &img.five;
    let accept = format!("Accept: {}", common::ACCEPT_ALL_MANIFESTS);
    for rep in 0..b.opts.reps {
        for who in order(rep, &[Who::Regmirror, Who::RegmirrorTtl0, Who::Peer]) {
            for (by, reference) in [("tag", &five.reference), ("digest", &five.manifest_digest)] {
                if who == Who::RegmirrorTtl0 && by == "digest" {
                    // The TTL only concerns tags.
                    continue;
                }
                for head in [false, true] {
                    let t = load::Target {
                        addr: b.addr(who),
                        head,
                        path: format!("/v2/{}/manifests/{reference}", five.repo),
                        headers: vec![accept.clone()],
                        tls: None,
                    };
                    b.upstream.settle().await;
                    let offset = servers::file_len(&b.upstream.log_path().to_owned());
                    let cpu_before = servers::usage(&b.pids(who)).cpu_secs;
                    let started = Instant::now();
                    let o = b.load(who, t, 64).await;
                    // Requests over the whole run (warm-up included), estimated from the rate.
                    let all = o.rps() * started.elapsed().as_secs_f64();
                    let cpu = servers::usage(&b.pids(who)).cpu_secs - cpu_before;
                    b.upstream.settle().await;
                    let upstream = servers::served_since(b.upstream.log_path(), offset);
                    let method = if head { "HEAD" } else { "GET" };
                    println!(
                        "[rep {rep}] {:<15} manifest {method:<4} by {by:<6} c=64 {:8.0} req/s \
                         p50 {:6.2} ms p99 {:6.2} ms; server CPU {:.0} us/req, upstream \
                         requests per request {:.3}",
                        who.name(),
                        o.rps(),
                        o.percentile_ms(50.0),
                        o.percentile_ms(99.0),
                        cpu * 1e6 / all.max(1.0),
                        upstream.requests as f64 / all.max(1.0)
                    );
                    let key = format!("manifest {method} {by}");
                    b.samples.add(&format!("{key} rps"), who, o.rps());
                    b.samples
                        .add(&format!("{key} p50"), who, o.percentile_ms(50.0));
                    b.samples
                        .add(&format!("{key} p99"), who, o.percentile_ms(99.0));
                }
            }
        }
    }
}

/// A target on the ratio regmirror ÷ reference.
#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    fn met(self, ratio: f64) -> bool {
        match self {
            Goal::AtLeast(t) => ratio >= t,
            Goal::AtMost(t) => ratio <= t,
        }
    }

    fn text(self, against: &str) -> String {
        match self {
            Goal::AtLeast(t) => format!("≥ {t}× {against}"),
            Goal::AtMost(t) => format!("≤ {t}× {against}"),
        }
    }
}

/// One line of the table.
struct Line {
    label: String,
    cells: [String; 3],
    ratio_peer: Option<f64>,
    ratio_limit: Option<f64>,
    goal: Option<(Goal, bool)>,
}

fn fmt_num(v: f64) -> String {
    if v >= 10_000.0 {
        // Thousands separated, as req/s figures are large.
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        out
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// A line with one median per server; `goal_vs_limit` is a goal on regmirror ÷ nginx.
fn simple(s: &Samples, label: &str, key: &str, goal_vs_limit: Option<Goal>) -> Line {
    let cell = |v: Option<f64>| v.map_or("–".to_owned(), fmt_num);
    let a = s.median(key, Who::Regmirror);
    let p = s.median(key, Who::Peer);
    let n = s.median(key, Who::Nginx);
    let (rp, rn) = (ratio(a, p), ratio(a, n));
    Line {
        label: label.to_owned(),
        cells: [cell(a), cell(p), cell(n)],
        ratio_peer: rp,
        ratio_limit: rn,
        goal: goal_vs_limit.and_then(|g| Some((g, g.met(rn?)))),
    }
}

/// The markdown table: each figure for regmirror, the peer and the limit, and the ratios.
fn report(s: &Samples, usage: &BTreeMap<Who, Usage>, header: &str, big_mib: usize) -> String {
    let big = format!("{big_mib} MiB layer");
    let mut lines: Vec<Line> = Vec::new();
    let mut goal_texts: Vec<(usize, String)> = Vec::new();
    let cell = |v: Option<f64>| v.map_or("–".to_owned(), fmt_num);
    for (key, what) in [
        ("big", big.as_str()),
        ("five", "5 × 1 MiB"),
        ("fifty", "50 × 100 KiB"),
    ] {
        lines.push(simple(
            s,
            &format!("cold pull, {what} (s)"),
            &format!("cold {key}"),
            None,
        ));
        lines.push(simple(
            s,
            &format!("warm pull, {what} (s)"),
            &format!("warm {key}"),
            None,
        ));
    }
    lines.push(simple(
        s,
        "8 concurrent cold pulls of the big image: wall (s)",
        "herd wall",
        None,
    ));
    lines.push(simple(
        s,
        "… bytes the upstream served (MiB)",
        "herd bytes",
        None,
    ));
    let mut once = simple(
        s,
        "… upstream GETs per blob",
        "herd blob gets per blob",
        None,
    );
    // "Each blob once" is an absolute goal on regmirror's figure, not a ratio.
    once.goal = s
        .median("herd blob gets per blob", Who::Regmirror)
        .map(|v| (Goal::AtMost(1.0), v <= 1.0));
    lines.push(once);
    goal_texts.push((lines.len() - 1, "each blob once".into()));
    for c in [1, 4, 16] {
        let goal = (c == 16).then_some(Goal::AtLeast(0.95));
        lines.push(simple(
            s,
            &format!("warm blob GET, c={c} (GB/s)"),
            &format!("blob c={c}"),
            goal,
        ));
        if let Some(goal) = goal {
            goal_texts.push((lines.len() - 1, goal.text("nginx")));
        }
    }
    lines.push(simple(
        s,
        "warm 1 MiB blob GET, c=64 (req/s)",
        "blob 1MiB c=64",
        None,
    ));
    for c in [1, 4, 16] {
        let key = format!("https blob c={c}");
        let (a, n) = (
            s.median(&key, Who::RegmirrorTls),
            s.median(&key, Who::NginxTls),
        );
        let rn = ratio(a, n);
        let goal = (c == 16).then_some(Goal::AtLeast(0.9));
        lines.push(Line {
            label: format!(
                "warm blob GET over HTTPS, c={c} (GB/s) [nginx: HTTPS, same file and certificate]"
            ),
            cells: [cell(a), "–".into(), cell(n)],
            ratio_peer: None,
            ratio_limit: rn,
            goal: goal.and_then(|g| Some((g, g.met(rn?)))),
        });
        if let Some(goal) = goal {
            goal_texts.push((lines.len() - 1, goal.text("nginx")));
        }
    }

    for (by, goal_default) in [("tag", 20.0), ("digest", 5.0)] {
        for method in ["GET", "HEAD"] {
            let key = format!("manifest {method} {by}");
            let label = format!("manifest {method} by {by}, c=64: req/s (p50 / p99 ms)");
            let fig = |who: Who| {
                let rps = s.median(&format!("{key} rps"), who)?;
                let p50 = s.median(&format!("{key} p50"), who)?;
                let p99 = s.median(&format!("{key} p99"), who)?;
                Some((rps, format!("{} ({p50:.2} / {p99:.2})", fmt_num(rps))))
            };
            let rows: &[(Who, &str, f64)] = if by == "tag" {
                &[
                    (Who::Regmirror, "", goal_default),
                    (Who::RegmirrorTtl0, " [regmirror tag_ttl: 0s]", 3.0),
                ]
            } else {
                &[(Who::Regmirror, "", goal_default)]
            };
            for &(who, suffix, target) in rows {
                let a = fig(who);
                let p = fig(Who::Peer);
                let rp = ratio(a.as_ref().map(|x| x.0), p.as_ref().map(|x| x.0));
                let goal = Goal::AtLeast(target);
                lines.push(Line {
                    label: format!("{label}{suffix}"),
                    cells: [
                        a.map_or("–".into(), |x| x.1),
                        p.map_or("–".into(), |x| x.1),
                        "–".into(),
                    ],
                    ratio_peer: rp,
                    ratio_limit: None,
                    goal: rp.map(|r| (goal, goal.met(r))),
                });
                goal_texts.push((lines.len() - 1, goal.text("peer")));
            }
        }
    }
    let rss = |w: Who| usage.get(&w).map(|u| u.peak_rss_kib as f64 / 1024.0);
    let cpu = |w: Who| usage.get(&w).map(|u| u.cpu_secs);
    let rp = ratio(rss(Who::Regmirror), rss(Who::Peer));
    let goal = Goal::AtMost(0.5);
    lines.push(Line {
        label: "peak RSS over the run (MiB)".into(),
        cells: [
            cell(rss(Who::Regmirror)),
            cell(rss(Who::Peer)),
            cell(rss(Who::Nginx)),
        ],
        ratio_peer: rp,
        ratio_limit: None,
        goal: rp.map(|r| (goal, goal.met(r))),
    });
    goal_texts.push((lines.len() - 1, goal.text("peer")));
    lines.push(Line {
        label: "CPU seconds over the run".into(),
        cells: [
            cell(cpu(Who::Regmirror)),
            cell(cpu(Who::Peer)),
            cell(cpu(Who::Nginx)),
        ],
        ratio_peer: ratio(cpu(Who::Regmirror), cpu(Who::Peer)),
        ratio_limit: None,
        goal: None,
    });

    let mut out = format!("{header}\n\n");
    out.push_str("| measure | regmirror | distribution (proxy) | nginx sendfile | regmirror ÷ distribution | regmirror ÷ nginx | target |\n");
    out.push_str("|---|--:|--:|--:|--:|--:|---|\n");
    for (i, l) in lines.iter().enumerate() {
        if l.cells.iter().all(|c| c == "–") {
            // A phase left out with --only.
            continue;
        }
        let r = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}×"));
        let target = match (&l.goal, goal_texts.iter().find(|(j, _)| *j == i)) {
            (Some((_, met)), Some((_, text))) => {
                format!("{text}: {}", if *met { "met" } else { "**missed**" })
            }
            _ => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            l.label,
            l.cells[0],
            l.cells[1],
            l.cells[2],
            r(l.ratio_peer),
            r(l.ratio_limit),
            target
        ));
    }
    out.push_str(
        "\nTimes and memory: lower is better; throughput and req/s: higher is better. Figures \
         are medians over repetitions; \"regmirror tag_ttl: 0s\" revalidates every tag request \
         upstream, as distribution does.\n",
    );
    out
}

/// Checks the table arithmetic, for `cargo test`'s run of this bench.
fn report_self_check() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&[4.0, 1.0]), Some(2.5));
    assert_eq!(median(&[]), None);
    assert_eq!(
        order(1, &[Who::Regmirror, Who::Peer]),
        vec![Who::Peer, Who::Regmirror]
    );
    assert_eq!(fmt_num(1234567.0), "1,234,567");
    assert_eq!(fmt_num(2.345), "2.35");
    let mut s = Samples::default();
    s.add("blob c=16", Who::Regmirror, 2.0);
    s.add("blob c=16", Who::Nginx, 2.0);
    s.add("herd blob gets per blob", Who::Regmirror, 1.0);
    let t = report(&s, &BTreeMap::new(), "h", 256);
    assert!(
        t.contains(
            "| warm blob GET, c=16 (GB/s) | 2.00 | – | 2.00 | – | 1.00× | ≥ 0.95× nginx: met |"
        ),
        "{t}"
    );
    assert!(t.contains("each blob once: met"), "{t}");
}
