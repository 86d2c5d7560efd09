//! A store that heals itself: a missing, truncated or garbage index is set aside and rebuilt
//! from the blobs (verified before they are served), `regmirror verify [--repair]` finds and
//! removes flipped bytes, and the background scrub does the same while serving.
//!
//! The real binary against a real distribution upstream. Synchronisation is on the
//! `regmirror_scrub_passes_total` / `regmirror_scrub_corrupt_total` metrics, polled under a
//! generous safety deadline.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_skopeo_dir_holds, assert_skopeo_dir_holds_index, ImageSpec};
use common::{
    http, run, skopeo_copy_to_dir, tempdir, Distribution, MediaTypes, Platform, PushedImage,
    PushedIndex, Pusher, Regmirror,
};

const DEADLINE: Duration = Duration::from_secs(90);

fn yaml(upstream: &str, scrub_interval: &str) -> String {
    format!(
        "listen: @LISTEN@\n\
         storage: {{ root: @ROOT@, scrub: {{ interval: {scrub_interval}, max_rate: 0 }} }}\n\
         cache: {{ tag_ttl: 5m }}\n\
         default_upstream: docker.io\n\
         upstreams:\n  docker.io: {{ url: \"{upstream}\" }}\n\
         log: {{ level: debug, format: text }}\n"
    )
}

fn blob_path(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// The value of an unlabelled metric.
async fn metric(rm: &Regmirror, name: &str) -> u64 {
    let text = http()
        .get(format!("{}/metrics", rm.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Polls `name` until it reaches `at_least` (the deadline only guards against a hang).
async fn wait_metric(rm: &Regmirror, name: &str, at_least: u64) {
    let start = Instant::now();
    loop {
        if metric(rm, name).await >= at_least {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{name} never reached {at_least}; log:\n{}",
            rm.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Upstream {
    dist: Distribution,
    app: PushedImage,
    multi: PushedIndex,
}

async fn upstream() -> Upstream {
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let app = pusher
        .push_image(
            "team/app",
            "v1",
            &ImageSpec::new(&[10_000, 300_000]).media_types(MediaTypes::Oci),
        )
        .await;
    let multi = pusher
        .push_index(
            "library/multi",
            "oci",
            &[Platform::AMD64, Platform::ARM64],
            MediaTypes::Oci,
        )
        .await;
    Upstream { dist, app, multi }
}

/// Pulls both images through the mirror with skopeo and checks them byte for byte.
async fn pull_all(rm: &Regmirror, up: &Upstream) {
    let out = tempdir("heal-skopeo-");
    let d = out.path().join("app");
    skopeo_copy_to_dir(&format!("docker://{}/team/app:v1", rm.host()), &d, false)
        .await
        .assert_success();
    assert_skopeo_dir_holds(&d, &up.app, "manifest.json");
    let d = out.path().join("multi");
    skopeo_copy_to_dir(
        &format!("docker://{}/library/multi:oci", rm.host()),
        &d,
        true,
    )
    .await
    .assert_success();
    assert_skopeo_dir_holds_index(&d, &up.multi);
}

async fn get_blob(rm: &Regmirror, repo: &str, digest: &str) -> (u16, Vec<u8>) {
    let response = http()
        .get(format!("{}/v2/{repo}/blobs/{digest}", rm.url()))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

fn damage_index(index: &Path, how: &str) {
    match how {
        "deleted" => std::fs::remove_dir_all(index).unwrap(),
        "truncated" | "garbage" => {
            let mut damaged = 0;
            for entry in walk(index) {
                if how == "truncated" {
                    std::fs::File::create(&entry).unwrap();
                } else {
                    let len = std::fs::metadata(&entry).unwrap().len().max(4096) as usize;
                    let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
                    std::fs::write(&entry, garbage).unwrap();
                }
                damaged += 1;
            }
            assert!(damaged > 0, "sled left no files in {}", index.display());
        }
        other => unreachable!("{other}"),
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Start-up with sled's directory deleted, truncated or filled with garbage: the mirror starts,
/// sets the index aside (warn), verifies the files in the background, and a warm pull of what
/// it held makes no upstream blob GET. A planted file with wrong bytes under a valid name is
/// deleted and never served.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_index_is_rebuilt_from_verified_blobs() {
    let up = upstream().await;
    for how in ["deleted", "truncated", "garbage"] {
        let mut rm = Regmirror::start(&yaml(&up.dist.url(), "0")).await;
        pull_all(&rm, &up).await;
        assert!(rm.stop(), "{how}: clean stop");

        damage_index(&rm.data_dir().join("index"), how);
        // A file under the name of content the upstream holds, with other bytes.
        let planted = &up.app.layer_digests[0];
        let planted_path = blob_path(rm.data_dir(), planted);
        flip_byte(&planted_path);

        rm.restart().await;
        // The start-up verification is the first pass.
        wait_metric(&rm, "regmirror_scrub_passes_total", 1).await;
        let log = rm.log();
        if how != "deleted" {
            assert!(
                log.contains("WARN") && log.contains("moving it aside"),
                "{how}: no warning about the index:\n{log}"
            );
            let aside = std::fs::read_dir(rm.data_dir())
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("index.broken-"));
            assert!(aside, "{how}: the broken index was not kept aside");
        }
        assert!(
            !planted_path.exists(),
            "{how}: the planted file is still there"
        );
        assert_eq!(
            metric(&rm, "regmirror_scrub_corrupt_total").await,
            1,
            "{how}"
        );

        up.dist.settle().await;
        let before = up.dist.blob_gets().await;
        let planted_before = up.dist.blob_gets_for(planted).await;
        pull_all(&rm, &up).await;
        up.dist.settle().await;
        let fetched = up.dist.blob_gets().await - before;
        // The planted blob is the only one fetched again, with its right bytes.
        assert_eq!(
            up.dist.blob_gets_for(planted).await - planted_before,
            1,
            "{how}"
        );
        assert_eq!(
            fetched,
            1,
            "{how}: a warm pull after the rebuild fetched blobs: {:?}",
            up.dist.request_lines().await
        );
        assert!(rm.stop());
        std::fs::remove_dir_all(rm.data_dir()).unwrap();
        std::fs::create_dir_all(rm.data_dir()).unwrap();
    }
}

fn verify(rm: &Regmirror, repair: bool) -> Command {
    let mut cmd = Command::new(Regmirror::binary());
    cmd.arg("verify").arg("--config").arg(rm.config_path());
    if repair {
        cmd.arg("--repair");
    }
    cmd
}

/// A stored blob with one byte flipped: `verify` exits 1 naming it, `--repair` is refused on a
/// live store and removes it on a stopped one, and the next pull fetches the right bytes once.
#[tokio::test(flavor = "multi_thread")]
async fn verify_names_a_flipped_byte_and_repair_removes_it() {
    let up = upstream().await;
    let mut rm = Regmirror::start(&yaml(&up.dist.url(), "0")).await;
    pull_all(&rm, &up).await;
    let layer = up.app.layer_digests[1].clone();
    flip_byte(&blob_path(rm.data_dir(), &layer));

    // Beside a live server: files only, reported; a repair needs the store to itself.
    let out = run(verify(&rm, false), DEADLINE).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains(&format!("corrupt {layer}")), "{out}");
    assert_eq!(out.stdout.matches("corrupt sha256:").count(), 1, "{out}");
    let out = run(verify(&rm, true), DEADLINE).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("in use"), "{out}");
    assert!(blob_path(rm.data_dir(), &layer).exists());

    assert!(rm.stop());
    let out = run(verify(&rm, true), DEADLINE).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains(&format!("corrupt {layer} (removed)")),
        "{out}"
    );
    assert!(!blob_path(rm.data_dir(), &layer).exists());
    let out = run(verify(&rm, false), DEADLINE).await;
    assert_eq!(out.code, Some(0), "{out}");

    rm.restart().await;
    up.dist.settle().await;
    let before = up.dist.blob_gets_for(&layer).await;
    let (status, body) = get_blob(&rm, "team/app", &layer).await;
    assert_eq!(status, 200);
    assert_eq!(common::sha256_digest(&body), layer);
    up.dist.settle().await;
    assert_eq!(up.dist.blob_gets_for(&layer).await - before, 1);
}

/// The background scrub finds a flipped byte while serving, counts it, and the blob is fetched
/// again (right bytes) on the next pull instead of being served corrupt.
#[tokio::test(flavor = "multi_thread")]
async fn the_background_scrub_removes_a_flipped_byte() {
    let up = upstream().await;
    let rm = Regmirror::start(&yaml(&up.dist.url(), "200ms")).await;
    pull_all(&rm, &up).await;
    let layer = up.app.layer_digests[1].clone();
    flip_byte(&blob_path(rm.data_dir(), &layer));

    wait_metric(&rm, "regmirror_scrub_corrupt_total", 1).await;
    assert!(metric(&rm, "regmirror_scrub_blobs_total").await >= 1);
    assert!(metric(&rm, "regmirror_scrub_bytes_total").await >= 300_000);
    assert!(!blob_path(rm.data_dir(), &layer).exists());

    up.dist.settle().await;
    let before = up.dist.blob_gets_for(&layer).await;
    let (status, body) = get_blob(&rm, "team/app", &layer).await;
    assert_eq!(status, 200);
    assert_eq!(common::sha256_digest(&body), layer, "served corrupt");
    up.dist.settle().await;
    assert_eq!(up.dist.blob_gets_for(&layer).await - before, 1);
}
