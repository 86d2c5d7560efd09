//! A damaged or unwritable store: files truncated, deleted or corrupted behind regmirror's
//! back, a full disk, a read-only `tmp/` or `blobs/`, and bodies without a length that would
//! fill the disk. Nothing damaged is served, and a store that cannot take a fill turns it into
//! verified pass-through for every client attached to it.
//!
//! The disk tests mount small tmpfs and read-only bind mounts: they need root.

mod common;
mod fake;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use fake::{client, mirror, mirror_at, Fake};
use regmirror::oci::Digest;

fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs/sha256")
        .join(&digest.hex()[..2])
        .join(digest.hex())
}

fn sha(bytes: &[u8]) -> String {
    common::sha256_digest(bytes)
}

/// Unmounts (lazily) when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn run(args: &[&str], path: &Path) {
    let status = std::process::Command::new("mount")
        .args(args)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mount {args:?} {path:?}");
}

/// A tmpfs of `size` (e.g. `4m`) at `path`.
fn tmpfs(path: &Path, size: &str) -> Mount {
    std::fs::create_dir_all(path).unwrap();
    run(
        &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
        path,
    );
    Mount(path.to_owned())
}

/// `path` made read-only by a read-only bind mount over itself.
fn read_only(path: &Path) -> Mount {
    let path_str = path.to_str().unwrap();
    run(&["--bind", path_str], path);
    let mount = Mount(path.to_owned());
    run(&["-o", "remount,bind,ro"], path);
    mount
}

/// Reads a response to its end: `Ok(body)` only if the transfer completed.
async fn read_whole(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// GETs `url` (with `range`) and reads it whole, within a safety deadline.
async fn get(url: &str, range: Option<&str>) -> (u16, Result<Vec<u8>, reqwest::Error>) {
    let mut request = client().get(url);
    if let Some(range) = range {
        request = request.header("range", range);
    }
    let fetch = async {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, read_whole(response).await)
    };
    tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("answered in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_truncated_blob_is_fetched_again_not_served_short() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/t", "1", &[300_000], 500);
    let digest = image.layers[0].0.clone();
    let m = mirror(&fake, "").await;
    let url = format!("{}/v2/t/blobs/{digest}", m.url);
    let (status, body) = get(&url, None).await;
    assert_eq!((status, sha(&body.unwrap())), (200, digest.to_string()));
    // A disk error, an operator or a bad restore shortens the file.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(blob_path(&m.root, &digest))
        .unwrap();
    file.set_len(100_000).unwrap();
    let head = client().head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "300000");
    let (status, body) = get(&url, None).await;
    let body = body.expect("a complete body");
    assert_eq!((status, sha(&body)), (200, digest.to_string()));
    assert_eq!(fake.counters.count("GET", "/blobs/"), 2, "fetched again");
    // Stored whole again, and a hit from then on.
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-regmirror-cache"], "hit");
    assert_eq!(sha(&r.bytes().await.unwrap()), digest.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_blob_is_fetched_again() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/d", "1", &[200_000], 501);
    let digest = image.layers[0].0.clone();
    let m = mirror(&fake, "").await;
    let url = format!("{}/v2/d/blobs/{digest}", m.url);
    let (status, _) = get(&url, None).await;
    assert_eq!(status, 200);
    std::fs::remove_file(blob_path(&m.root, &digest)).unwrap();
    let (status, body) = get(&url, None).await;
    assert_eq!((status, sha(&body.unwrap())), (200, digest.to_string()));
    let (status, body) = get(&url, Some("bytes=10-19")).await;
    assert_eq!(status, 206);
    assert_eq!(body.unwrap(), image.layers[0].1[10..20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_manifest_is_fetched_again() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/c", "1", &[1000], 502);
    let m = mirror(&fake, "cache: { tag_ttl: 5m }").await;
    let by_tag = format!("{}/v2/c/manifests/1", m.url);
    let by_digest = format!("{}/v2/c/manifests/{}", m.url, image.digest);
    assert_eq!(get(&by_tag, None).await.1.unwrap(), image.manifest);
    // Same size, one byte changed.
    let path = blob_path(&m.root, &image.digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    // Hits are served from memory: the damaged file is met once the manifest is not there.
    m.state.cache.drop_manifests_in_memory();
    for url in [&by_digest, &by_tag] {
        let r = client().get(url.as_str()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], image.digest.as_str());
        assert_eq!(r.bytes().await.unwrap(), image.manifest, "{url}");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        image.manifest,
        "stored again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_without_length_is_held_to_max_size_while_it_is_written() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/n", "1", &[3 << 20], 503);
    let digest = image.layers[0].0.clone();
    fake.faults.no_length.store(true, Ordering::SeqCst);
    let m = mirror(&fake, "storage: { max_size: 1MiB }").await;
    let url = format!("{}/v2/n/blobs/{digest}", m.url);
    let (status, body) = get(&url, None).await;
    assert_eq!(status, 200);
    assert_eq!(sha(&body.unwrap()), digest.as_str(), "passed through whole");
    assert!(
        m.state.cache.store().stat(&digest).unwrap().is_none(),
        "a blob larger than the cache is never stored"
    );
    assert_eq!(m.state.cache.downloads_in_flight(), 0);
    let tmp = std::fs::read_dir(m.root.join("tmp")).unwrap().count();
    assert_eq!(tmp, 0, "nothing left in tmp/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endless_body_fails_cleanly_without_filling_the_disk() {
    common::require_root("mounting a tmpfs the endless body must not fill");
    let fake = Fake::start().await;
    let image = fake.put_image("library/e", "1", &[1 << 20], 504);
    let digest = image.layers[0].0.clone();
    fake.faults.endless.store(true, Ordering::SeqCst);
    let dir = common::tempdir("regmirror-endless");
    let _mount = tmpfs(&dir.path().join("store"), "64m");
    let m = mirror_at(
        &fake,
        &dir.path().join("store/data"),
        "storage: { max_size: 8MiB, min_free: 1MiB }",
    )
    .await;
    let (status, body) = get(&format!("{}/v2/e/blobs/{digest}", m.url), None).await;
    assert!(
        status != 200 || body.is_err(),
        "an endless body is never delivered complete"
    );
    assert!(m.state.cache.store().stat(&digest).unwrap().is_none());
    assert_eq!(m.state.cache.downloads_in_flight(), 0);
    let free = m.state.cache.store().blobs().available_bytes().unwrap();
    assert!(
        free > 48 << 20,
        "the disk was not filled: {free} bytes free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_without_length_on_a_nearly_full_disk_passes_through() {
    common::require_root("mounting a small tmpfs to fill the disk");
    let fake = Fake::start().await;
    let image = fake.put_image("library/f", "1", &[6 << 20], 505);
    let digest = image.layers[0].0.clone();
    fake.faults.no_length.store(true, Ordering::SeqCst);
    let dir = common::tempdir("regmirror-nolength");
    let _mount = tmpfs(&dir.path().join("store"), "4m");
    let m = mirror_at(
        &fake,
        &dir.path().join("store/data"),
        "storage: { min_free: 1MiB }",
    )
    .await;
    let url = format!("{}/v2/f/blobs/{digest}", m.url);
    let (status, body) = get(&url, None).await;
    assert_eq!((status, sha(&body.unwrap())), (200, digest.to_string()));
    let (status, body) = get(&url, Some("bytes=5000000-5000099")).await;
    assert_eq!(status, 206);
    assert_eq!(body.unwrap(), image.layers[0].1[5_000_000..5_000_100]);
    assert!(m.state.cache.store().stat(&digest).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_downloads_outgrowing_the_disk_together_both_complete() {
    common::require_root("mounting a small tmpfs to fill the disk");
    let fake = Fake::start().await;
    let dir = common::tempdir("regmirror-two");
    let _mount = tmpfs(&dir.path().join("store"), "16m");
    let m = mirror_at(
        &fake,
        &dir.path().join("store/data"),
        "storage: { min_free: 1MiB }",
    )
    .await;
    // Each fits the free space with the reserve to spare; both together do not.
    let free = m.state.cache.store().blobs().available_bytes().unwrap() as usize;
    let size = (free - (1 << 20)) * 6 / 10;
    let a = fake.put_image("library/a", "1", &[size], 506);
    let b = fake.put_image("library/b", "1", &[size], 507);
    // Both downloads pass the free-space check before either writes past 1 MiB.
    let (release, gate) = tokio::sync::watch::channel(false);
    *fake.faults.hold.lock().unwrap() = Some((1 << 20, gate));
    let url = |repo: &str, image: &fake::Image| {
        format!("{}/v2/{repo}/blobs/{}", m.url, image.layers[0].0)
    };
    let (url_a, url_b) = (url("a", &a), url("b", &b));
    let full_a = client().get(&url_a).send().await.unwrap();
    let full_b = client().get(&url_b).send().await.unwrap();
    assert_eq!(
        (full_a.status().as_u16(), full_b.status().as_u16()),
        (200, 200)
    );
    assert_eq!(m.state.cache.downloads_in_flight(), 2);
    // Ranged readers attached to each fill as well, one of them past the point where the
    // disk runs out.
    let last = format!("bytes={}-{}", size - 1000, size - 1);
    let ranged_a = tokio::spawn({
        let url = url_a.clone();
        async move { get(&url, Some("bytes=0-99999")).await }
    });
    let ranged_b = tokio::spawn({
        let (url, last) = (url_b.clone(), last.clone());
        async move { get(&url, Some(&last)).await }
    });
    release.send_replace(true);
    let body_a = tokio::time::timeout(Duration::from_secs(60), read_whole(full_a)).await;
    let body_b = tokio::time::timeout(Duration::from_secs(60), read_whole(full_b)).await;
    assert_eq!(
        sha(&body_a.unwrap().expect("a complete")),
        a.layers[0].0.as_str()
    );
    assert_eq!(
        sha(&body_b.unwrap().expect("b complete")),
        b.layers[0].0.as_str()
    );
    let (status, body) = ranged_a.await.unwrap();
    assert_eq!(status, 206);
    assert_eq!(body.unwrap(), a.layers[0].1[..100_000]);
    let (status, body) = ranged_b.await.unwrap();
    assert_eq!(status, 206);
    assert_eq!(body.unwrap(), b.layers[0].1[size - 1000..]);
    assert_eq!(m.state.cache.downloads_in_flight(), 0);
    assert!(
        fake.counters.count("GET", "/blobs/") > 2,
        "readers of a refused fill went on from the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_tmp_passes_cold_content_through() {
    common::require_root("a read-only bind mount of tmp/");
    let fake = Fake::start().await;
    let image = fake.put_image("library/ro", "1", &[2 << 20], 508);
    let digest = image.layers[0].0.clone();
    let m = mirror(&fake, "").await;
    let _ro = read_only(&m.root.join("tmp"));
    let (status, body) = get(&format!("{}/v2/ro/manifests/1", m.url), None).await;
    assert_eq!((status, body.unwrap()), (200, image.manifest.to_vec()));
    let url = format!("{}/v2/ro/blobs/{digest}", m.url);
    let (status, body) = get(&url, None).await;
    assert_eq!((status, sha(&body.unwrap())), (200, digest.to_string()));
    let (status, body) = get(&url, Some("bytes=1000-1999")).await;
    assert_eq!(status, 206);
    assert_eq!(body.unwrap(), image.layers[0].1[1000..2000]);
    assert!(m.state.cache.store().stat(&digest).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_blobs_dir_serves_verified_downloads_uncached() {
    common::require_root("a read-only bind mount of blobs/");
    let fake = Fake::start().await;
    let image = fake.put_image("library/rb", "1", &[2 << 20], 509);
    let digest = image.layers[0].0.clone();
    let m = mirror(&fake, "").await;
    // Downloads go to tmp/ as usual; the commit into blobs/ is refused.
    let _ro = read_only(&m.root.join("blobs/sha256"));
    let url = format!("{}/v2/rb/blobs/{digest}", m.url);
    let (status, body) = get(&url, None).await;
    assert_eq!((status, sha(&body.unwrap())), (200, digest.to_string()));
    assert!(m.state.cache.store().stat(&digest).unwrap().is_none());
    assert_eq!(std::fs::read_dir(m.root.join("tmp")).unwrap().count(), 0);
}
