//! `regmirror warm` end to end: the real binary warms a real regmirror in front of a real
//! distribution holding a multi-platform index with a 64 MiB layer; after the upstream is
//! killed, skopeo pulls every platform from the mirror. The plain (non-terminal) output is
//! checked line by line.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use indicatif::HumanBytes;
use serde_json::json;

const BIG_LAYER: usize = 64 << 20;

/// `regmirror warm ARGS` with stdout and stderr captured (so stdout is not a terminal).
async fn warm(args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(Regmirror::binary());
    cmd.arg("warm").args(args);
    no_proxy(&mut cmd);
    run(cmd, Duration::from_secs(300)).await
}

/// Pushes one image per spec by digest, then an OCI index naming them under `tag`.
async fn push_oci_index(
    pusher: &Pusher,
    repo: &str,
    tag: &str,
    specs: Vec<ImageSpec>,
) -> PushedIndex {
    let mut images = Vec::new();
    for spec in specs {
        let spec = spec.media_types(MediaTypes::Oci);
        let img = tokio::task::spawn_blocking(move || generate_image(&spec))
            .await
            .unwrap();
        let digest = img.manifest_digest.clone();
        images.push(pusher.push_generated(repo, &digest, &img).await);
    }
    let manifests: Vec<_> = images
        .iter()
        .map(|i| {
            let mut platform = json!({"architecture": i.platform.architecture, "os": "linux"});
            if let Some(variant) = i.platform.variant {
                platform["variant"] = json!(variant);
            }
            json!({
                "mediaType": i.media_type,
                "size": i.manifest_bytes.len(),
                "digest": i.manifest_digest,
                "platform": platform,
            })
        })
        .collect();
    let bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": MediaTypes::Oci.index(),
        "manifests": manifests,
    }))
    .unwrap();
    pusher
        .push_manifest(repo, tag, MediaTypes::Oci.index(), &bytes)
        .await;
    PushedIndex {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        media_type: MediaTypes::Oci.index().to_owned(),
        digest: sha256_digest(&bytes),
        bytes,
        images,
    }
}

/// Total compressed size of every blob of `images`, each digest once.
fn blob_bytes<'a>(images: impl IntoIterator<Item = &'a PushedImage>) -> (usize, u64) {
    let mut seen = std::collections::BTreeMap::new();
    for img in images {
        seen.insert(img.config_digest.clone(), img.config_bytes.len() as u64);
        for (d, s) in img.layer_digests.iter().zip(&img.layer_sizes) {
            seen.insert(d.clone(), *s);
        }
    }
    (seen.len(), seen.values().sum())
}

/// Checks one `warmed REF DIGEST: N platform(s), B blobs, X fetched, Y cached, Ts` line.
fn assert_warmed_line(
    line: &str,
    reference: &str,
    digest: &str,
    platforms: usize,
    blobs: usize,
    fetched: u64,
    cached: u64,
) {
    let plural = if platforms == 1 { "" } else { "s" };
    let prefix = format!(
        "warmed {reference} {digest}: {platforms} platform{plural}, {blobs} blobs, {} fetched, {} cached, ",
        HumanBytes(fetched),
        HumanBytes(cached)
    );
    let rest = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("line {line:?}\ndoes not start with {prefix:?}"));
    let seconds = rest
        .strip_suffix('s')
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("line {line:?} does not end with seconds"));
    assert!(seconds >= 0.0, "{line}");
}

/// Checks the summary line: `W of N images warmed: B blobs, X fetched, Y already cached, Ts`.
fn assert_summary_line(
    line: &str,
    warmed: usize,
    images: usize,
    blobs: usize,
    fetched: u64,
    cached: u64,
) {
    let prefix = format!(
        "{warmed} of {images} images warmed: {blobs} blobs, {} fetched, {} already cached, ",
        HumanBytes(fetched),
        HumanBytes(cached)
    );
    let rest = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("summary {line:?}\ndoes not start with {prefix:?}"));
    assert!(
        rest.strip_suffix('s')
            .and_then(|s| s.parse::<f64>().ok())
            .is_some(),
        "summary {line:?} does not end with seconds"
    );
}

/// Warm two images (a two-platform OCI index with a 64 MiB layer on the default upstream, a
/// single image on `ghcr.io` by `?ns=`), warm again (all cached, no upstream blob GET), a
/// missing reference fails by name, then the upstream dies and skopeo still pulls every
/// platform of both from the mirror.
#[tokio::test(flavor = "multi_thread")]
async fn warm_then_pull_every_platform_with_the_upstream_down() {
    let mut dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let multi = push_oci_index(
        &pusher,
        "library/multi",
        "v1",
        vec![
            ImageSpec::new(&[BIG_LAYER, 4096]).platform(Platform::AMD64),
            ImageSpec::new(&[200_000]).platform(Platform::ARM64),
        ],
    )
    .await;
    let app = pusher
        .push_image("org/app", "1.4", &ImageSpec::new(&[3000, 500_000]))
        .await;
    // Both upstreams are this registry: `ghcr.io/...` references reach it through `?ns=`.
    let rm = RegmirrorConfig::docker_io(&dist.url())
        .upstream("ghcr.io", &dist.url())
        .start()
        .await;
    let (multi_blobs, multi_bytes) = blob_bytes(&multi.images);
    let (app_blobs, app_bytes) = blob_bytes([&app]);

    // First warm: everything is fetched.
    let out = warm(&[
        "--mirror",
        &rm.url(),
        "--jobs",
        "3",
        "docker.io/library/multi:v1",
        "ghcr.io/org/app:1.4",
    ])
    .await;
    assert!(out.success, "{out}");
    eprintln!("first warm:\n{}", out.stdout);
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "one line per image and a summary:\n{out}");
    let summary = lines.pop().unwrap();
    // Images finish in any order.
    lines.sort();
    assert_warmed_line(
        lines[0],
        "docker.io/library/multi:v1",
        &multi.digest,
        2,
        multi_blobs,
        multi_bytes,
        0,
    );
    assert_warmed_line(
        lines[1],
        "ghcr.io/org/app:1.4",
        &app.manifest_digest,
        1,
        app_blobs,
        app_bytes,
        0,
    );
    assert_summary_line(
        summary,
        2,
        2,
        multi_blobs + app_blobs,
        multi_bytes + app_bytes,
        0,
    );
    assert!(
        !out.stdout.contains('\x1b'),
        "no terminal escapes when stdout is a file: {out}"
    );
    // Through the mirror's single flight: each blob once upstream, and with `ns`.
    for img in multi.images.iter().chain([&app]) {
        for d in img.blob_digests() {
            assert_eq!(dist.blob_gets_for(&d).await, 1, "upstream GETs of {d}");
        }
    }
    let blob_gets = dist.blob_gets().await;

    // Second warm: all already cached, one image at a time (lines in order), from a list.
    let scratch = tempdir("warm-");
    let list = scratch.path().join("images.txt");
    std::fs::write(
        &list,
        "# release day\ndocker.io/library/multi:v1\n\nghcr.io/org/app:1.4  # the app\n",
    )
    .unwrap();
    let out = warm(&[
        "--mirror",
        &rm.url(),
        "--jobs",
        "1",
        "--file",
        list.to_str().unwrap(),
    ])
    .await;
    assert!(out.success, "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_warmed_line(
        lines[0],
        "docker.io/library/multi:v1",
        &multi.digest,
        2,
        multi_blobs,
        0,
        multi_bytes,
    );
    assert_warmed_line(
        lines[1],
        "ghcr.io/org/app:1.4",
        &app.manifest_digest,
        1,
        app_blobs,
        0,
        app_bytes,
    );
    assert_summary_line(
        lines[2],
        2,
        2,
        multi_blobs + app_blobs,
        0,
        multi_bytes + app_bytes,
    );
    assert_eq!(
        dist.blob_gets().await,
        blob_gets,
        "the second warm fetched blobs upstream"
    );

    // A missing reference: exit non-zero, named on stdout and stderr; the others still warm.
    let out = warm(&[
        "--mirror",
        &rm.url(),
        "--jobs",
        "1",
        "docker.io/library/multi:v1",
        "docker.io/library/nope:v1",
        "ghcr.io/org/app:1.4",
    ])
    .await;
    assert!(!out.success, "{out}");
    assert_eq!(out.code, Some(1), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_warmed_line(
        lines[0],
        "docker.io/library/multi:v1",
        &multi.digest,
        2,
        multi_blobs,
        0,
        multi_bytes,
    );
    assert!(
        lines[1].starts_with("failed docker.io/library/nope:v1: ") && lines[1].contains("404"),
        "{out}"
    );
    assert_warmed_line(
        lines[2],
        "ghcr.io/org/app:1.4",
        &app.manifest_digest,
        1,
        app_blobs,
        0,
        app_bytes,
    );
    assert_summary_line(
        lines[3],
        2,
        3,
        multi_blobs + app_blobs,
        0,
        multi_bytes + app_bytes,
    );
    assert_eq!(
        out.stderr.trim(),
        "regmirror warm: failed: docker.io/library/nope:v1",
        "{out}"
    );

    // The upstream dies; every platform still pulls, byte for byte.
    dist.kill9();
    let copy = scratch.path().join("multi");
    skopeo_copy_to_dir(
        &format!("docker://{}/library/multi:v1", rm.host()),
        &copy,
        true,
    )
    .await
    .assert_success();
    assert_skopeo_dir_holds_index(&copy, &multi);
    let copy = scratch.path().join("app");
    skopeo_copy_to_dir(
        &format!("docker://{}/ghcr.io/org/app:1.4", rm.host()),
        &copy,
        true,
    )
    .await
    .assert_success();
    assert_skopeo_dir_holds(&copy, &app, "manifest.json");
}

/// `--platform` warms only that platform's blobs; a bad reference or a bad flag is refused
/// before anything is fetched.
#[tokio::test(flavor = "multi_thread")]
async fn warm_one_platform_and_refuse_bad_input() {
    let dist = Distribution::start().await;
    let pusher = Pusher::new(&dist.url());
    let multi = push_oci_index(
        &pusher,
        "library/multi",
        "v2",
        vec![
            ImageSpec::new(&[300_000]).platform(Platform::AMD64),
            ImageSpec::new(&[200_000]).platform(Platform::ARM64),
        ],
    )
    .await;
    let rm = Regmirror::with_docker_io(&dist.url()).await;
    let arm64 = multi.image_for("arm64");
    let (blobs, bytes) = blob_bytes([arm64]);
    let out = warm(&[
        "--mirror",
        &rm.url(),
        "--platform",
        "linux/arm64/v8",
        "multi:v2",
    ])
    .await;
    assert!(out.success, "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_warmed_line(lines[0], "multi:v2", &multi.digest, 1, blobs, bytes, 0);
    assert_summary_line(lines[1], 1, 1, blobs, bytes, 0);
    for d in multi.image_for("amd64").blob_digests() {
        assert_eq!(
            dist.blob_gets_for(&d).await,
            0,
            "amd64 blob {d} was fetched"
        );
    }
    for d in arm64.blob_digests() {
        assert_eq!(dist.blob_gets_for(&d).await, 1, "arm64 blob {d}");
    }

    // On a terminal (util-linux `script` gives it one): progress bars, and the same lines.
    let mut cmd = Command::new(require_tool("script"));
    cmd.args(["--quiet", "--return", "--command"])
        .arg(format!(
            "{} warm --mirror {} --platform linux/amd64 multi:v2",
            Regmirror::binary(),
            rm.url()
        ))
        .arg("/dev/null");
    no_proxy(&mut cmd);
    let out = run(cmd, Duration::from_secs(120)).await;
    assert!(out.success, "{out}");
    let amd64 = multi.image_for("amd64");
    let (blobs, bytes) = blob_bytes([amd64]);
    let text = out.stdout.replace('\r', "\n");
    let warmed = format!(
        "warmed multi:v2 {}: 1 platform, {blobs} blobs, {} fetched, 0 B cached, ",
        multi.digest,
        HumanBytes(bytes)
    );
    assert!(text.contains(&warmed), "no {warmed:?} in:\n{text}");
    assert!(text.contains("1 of 1 images warmed: "), "{text}");

    let out = warm(&[
        "--mirror",
        &rm.url(),
        "--platform",
        "windows/amd64",
        "multi:v2",
    ])
    .await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout
            .starts_with("failed multi:v2: no manifest for platform windows/amd64"),
        "{out}"
    );

    let out = warm(&["--mirror", &rm.url(), "Not/Valid:x"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout
            .starts_with("failed Not/Valid:x: not an image reference"),
        "{out}"
    );

    // The password never comes from the command line.
    let out = warm(&["--mirror", &rm.url(), "--username", "u", "multi:v2"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("REGMIRROR_PASSWORD"), "{out}");
    let out = warm(&["--mirror", &rm.url()]).await;
    assert_eq!(out.code, Some(2), "{out}");
}

/// A mirror with HTTPS, required client certificates and htpasswd: `warm` trusts `--ca`,
/// presents `--client-cert`, and logs in with the password from `REGMIRROR_PASSWORD` or
/// `--password-file`; a wrong password fails the image, by name.
#[tokio::test(flavor = "multi_thread")]
async fn warm_a_mirror_with_tls_client_certificates_and_a_password() {
    let dir = tempdir("warm-tls-");
    let ca = pki::Ca::new(dir.path(), "mirror-ca");
    let server = ca.server("mirror");
    let clients = pki::Ca::new(dir.path(), "clients-ca");
    let client = clients.client("warm");
    let (user, password) = ("warmer", "pw-warm-91c2");
    let out = Command::new(require_tool("htpasswd"))
        .args(["-Bbn", user, password])
        .output()
        .unwrap();
    assert!(out.status.success());
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, out.stdout).unwrap();
    let dist = Distribution::start().await;
    let img = push_image(&dist.url(), "library/web", "1", &[1000, 80_000]).await;
    let mirror = Regmirror::start(&format!(
        "listen: @LISTEN@\nstorage: {{ root: @ROOT@ }}\ndefault_upstream: docker.io\n\
         upstreams:\n  docker.io: {{ url: '{}' }}\n\
         tls: {{ cert: {:?}, key: {:?}, client_ca: {:?} }}\nauth: {{ htpasswd: {htpasswd:?} }}\n",
        dist.url(),
        server.cert,
        server.key,
        clients.cert
    ))
    .await;
    assert!(mirror.url().starts_with("https://"));
    let (ca_path, cert, key) = (
        ca.cert.to_str().unwrap(),
        client.cert.to_str().unwrap(),
        client.key.to_str().unwrap(),
    );
    let tls_args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "warm",
            "--mirror",
            &mirror.url(),
            "--ca",
            ca_path,
            "--client-cert",
            cert,
            "--client-key",
            key,
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let warm_env = |args: Vec<String>, password: Option<&str>| {
        let mut cmd = Command::new(Regmirror::binary());
        cmd.args(args);
        no_proxy(&mut cmd);
        cmd.env_remove("REGMIRROR_PASSWORD");
        if let Some(p) = password {
            cmd.env("REGMIRROR_PASSWORD", p);
        }
        run(cmd, Duration::from_secs(120))
    };

    let out = warm_env(tls_args(&["--username", user, "web:1"]), Some(password)).await;
    assert!(out.success, "{out}\n{}", mirror.log());
    let (blobs, bytes) = blob_bytes([&img]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_warmed_line(lines[0], "web:1", &img.manifest_digest, 1, blobs, bytes, 0);

    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let out = warm_env(
        tls_args(&[
            "--username",
            user,
            "--password-file",
            password_file.to_str().unwrap(),
            "web:1",
        ]),
        None,
    )
    .await;
    assert!(out.success, "{out}");
    assert_warmed_line(
        out.stdout.lines().next().unwrap(),
        "web:1",
        &img.manifest_digest,
        1,
        blobs,
        0,
        bytes,
    );

    let out = warm_env(tls_args(&["--username", user, "web:1"]), Some("wrong")).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.starts_with("failed web:1: ") && out.stdout.contains("401"),
        "{out}"
    );
    assert!(
        !out.stdout.contains("wrong") && !out.stderr.contains("wrong"),
        "{out}"
    );
    assert!(out.stderr.contains("failed: web:1"), "{out}");

    // Without the mirror's CA the certificate is refused.
    let out = warm_env(
        [
            "warm",
            "--mirror",
            &mirror.url(),
            "--client-cert",
            cert,
            "--client-key",
            key,
            "--username",
            user,
            "web:1",
        ]
        .map(String::from)
        .to_vec(),
        Some(password),
    )
    .await;
    assert_eq!(out.code, Some(1), "{out}");
}
