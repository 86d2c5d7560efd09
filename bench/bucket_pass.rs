//! One bucket eviction pass over a large bucket (issue 18 item 6): how long it takes, how
//! much memory it holds at its peak, and how many S3 requests it makes, for a pass after a
//! start (every manifest unknown), a pass after that (what it learned in memory) and a pass
//! after a restart on the same data directory (what it wrote down in the index).
//!
//! A single-node Garage is filled with `--images` images of one manifest, `--layers` blobs
//! and a pull record each (100,000 objects by default), written straight to the bucket. The
//! replica runs in-process through `regmirror::state`, bounded far above what the bucket
//! holds, so each pass lists, learns and decides, and cuts nothing. Peak memory is the most
//! heap the process held during the pass above what it held when the pass began, counted by
//! this binary's allocator (resident size would hide memory freed earlier and reused).
//!
//! `cargo bench --bench bucket_pass [-- --images N --layers L]`. `cargo test --all-targets`
//! runs this target without `--bench`: it then only checks its arguments and exits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use regmirror::oci::Digest;
use regmirror::storage::s3::S3_REQUESTS;

/// The system allocator, counting the bytes held and the most held since the last reset.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let held = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(held, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Options {
    images: usize,
    layers: usize,
    bench: bool,
}

fn usage() -> ! {
    eprintln!("usage: cargo bench --bench bucket_pass -- [--images N] [--layers L]");
    std::process::exit(2)
}

fn parse(args: &[String]) -> Options {
    let mut o = Options {
        images: 10_000,
        layers: 8,
        bench: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--bench" => o.bench = true,
            "--images" => o.images = value(),
            "--layers" => o.layers = value(),
            _ => usage(),
        }
    }
    if o.images == 0 {
        usage()
    }
    o
}

/// S3 requests by operation, from the replica's own counters.
fn requests(state: &regmirror::AppState) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for family in state.metrics.registry().gather() {
        if family.name() != S3_REQUESTS {
            continue;
        }
        for m in family.get_metric() {
            if let Some(op) = m.get_label().iter().find(|l| l.name() == "op") {
                *out.entry(op.value().to_owned()).or_default() +=
                    m.get_counter().get_value() as u64;
            }
        }
    }
    out
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = after
        .iter()
        .filter_map(|(op, n)| {
            let d = n - before.get(op).copied().unwrap_or(0);
            (d > 0).then(|| format!("{op} {d}"))
        })
        .collect();
    parts.join(", ")
}

async fn pass(label: &str, state: &regmirror::AppState) {
    let before = requests(state);
    let held = HELD.load(Ordering::Relaxed);
    PEAK.store(held, Ordering::Relaxed);
    let started = Instant::now();
    let done = state
        .cache
        .evict_bucket_once()
        .await
        .expect("the pass completes");
    let took = started.elapsed();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(held);
    let after = requests(state);
    let total: u64 = after.values().sum::<u64>() - before.values().sum::<u64>();
    println!(
        "| {label} | {:.2} s | {:.1} MiB | {total} ({}) | {} KiB listed, {} cut |",
        took.as_secs_f64(),
        peak as f64 / (1024.0 * 1024.0),
        delta(&after, &before),
        done.total >> 10,
        done.cut,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse(&args);
    if !o.bench {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let garage = common::garage::Garage::single().await;
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(garage.endpoint())
            .with_bucket_name(garage.bucket())
            .with_region(garage.region())
            .with_access_key_id(garage.access_key())
            .with_secret_access_key(garage.secret_key())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("an S3 client for Garage"),
    );

    // Fill: per image, `layers` small blobs, one manifest naming them, one pull record.
    let started = Instant::now();
    let objects = o.images * (o.layers + 2);
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0);
    let puts = futures_util::stream::iter(0..o.images)
        .map(|i| {
            let store = store.clone();
            let layers = o.layers;
            async move {
                let mut entries = Vec::new();
                for l in 0..layers {
                    let body = Bytes::from(format!("image {i} layer {l}"));
                    let digest = Digest::sha256_of(&body);
                    let key = Path::from(format!("blobs/sha256/{}", digest.hex()));
                    store.put(&key, PutPayload::from(body.clone())).await?;
                    entries.push(format!(
                        r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":{}}}"#,
                        body.len()
                    ));
                }
                let config = entries.first().cloned().unwrap_or_default();
                let manifest = Bytes::from(format!(
                    r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{config},"layers":[{}]}}"#,
                    entries.join(",")
                ));
                let digest = Digest::sha256_of(&manifest);
                let key = Path::from(format!("manifests/sha256/{}", digest.hex()));
                store.put(&key, PutPayload::from(manifest)).await?;
                // Pulled within the last hour: nothing is past `cache.max_age`.
                let record = format!(r#"{{"last_pull":{}}}"#, now.saturating_sub(i as u64));
                let key = Path::from(format!("images/sha256/{}", digest.hex()));
                store.put(&key, PutPayload::from(record.into_bytes())).await?;
                Ok::<_, object_store::Error>(())
            }
        })
        .buffer_unordered(32);
    tokio::pin!(puts);
    while let Some(put) = puts.next().await {
        put.expect("Garage takes the object");
    }
    eprintln!(
        "filled {objects} objects in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let dir = common::tempdir("bucket-pass-");
    let config = |dir: &std::path::Path| {
        let text = format!(
            "listen: 127.0.0.1:0\ndefault_upstream: docker.io\nupstreams:\n  docker.io: {{ url: 'http://127.0.0.1:9' }}\n\
             storage: {{ root: {:?}, local: {{ max_size: 1GiB }}, max_size: 1TiB, s3: {} }}\n",
            dir.join("data"),
            garage.s3_yaml()
        );
        regmirror::Config::parse(&text, "bench").expect("the bench's configuration")
    };
    println!(
        "\nbucket pass over {objects} objects ({} images of {} blobs, a manifest and a pull record)\n",
        o.images, o.layers
    );
    println!("| pass | time | peak memory | S3 requests | |\n|---|---|---|---|---|");
    {
        let state = regmirror::state(&config(dir.path()))
            .await
            .expect("the replica starts");
        pass("first after start", &state).await;
        pass("second", &state).await;
    }
    let state = regmirror::state(&config(dir.path()))
        .await
        .expect("the replica starts again on its data directory");
    pass("first after a restart", &state).await;
}
