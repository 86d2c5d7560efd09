//! Mutual TLS on the peer channel (`cluster.tls`), with the real binary on a real Garage:
//! replicas that present certificates of the cluster's CA forward misses to their owners over
//! https; anything else is refused at the handshake, before HTTP; bad files are reported by
//! `check-config` with their key.
//!
//! Synchronisation is on events (membership, log lines); the deadlines are hang guards.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::pki::{Ca, Issued};
use common::*;

/// The peer channel's health probe, which needs no content.
const HEALTH: &str = "/_regmirror/peer/health";

/// The `cluster` section's `tls` entry for `peer`'s files and `ca`.
fn tls_entry(peer: &Issued, ca: &Path) -> String {
    format!(
        "tls: {{ cert: {:?}, key: {:?}, ca: {:?} }}",
        peer.cert, peer.key, ca
    )
}

/// `n` replicas of one cluster, each with its own certificate of `ca`, all healthy in every
/// view (which already needs the health probes to pass the handshake both ways).
async fn tls_cluster(n: usize, upstream: &str, garage: &Garage, ca: &Ca) -> Vec<Replica> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let peer = ca.peer(&format!("replica-{i}"));
        let entry = tls_entry(&peer, &ca.cert);
        replicas.push(
            Replica::start_clustered(upstream, &garage.s3_yaml(), &ports, *port, &entry).await,
        );
    }
    for replica in &replicas {
        until_healthy(replica, n).await;
    }
    replicas
}

/// A client of the peer listener trusting `ca`, presenting `identity` if any; a new one per
/// call, so every request is a new handshake.
fn peer_client(ca: &Path, identity: Option<&Issued>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        let mut pem = std::fs::read(&id.key).unwrap();
        pem.extend(std::fs::read(&id.cert).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

fn sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_forward_to_the_owner_over_mutual_tls() {
    let dir = tempdir("cluster-tls-");
    let ca = Ca::new(dir.path(), "cluster-ca");
    let garage = Garage::single().await;
    let upstream = Distribution::start().await;
    let image = push_image(
        &upstream.url(),
        "team/app",
        "v1",
        &[3 << 20, 1 << 20, 300 << 10],
    )
    .await;
    let replicas = tls_cluster(3, &upstream.url(), &garage, &ca).await;
    for replica in &replicas {
        assert!(
            replica
                .mirror
                .log()
                .lines()
                .any(|l| l.contains("peer channel listening") && l.contains("https")),
            "the peer channel serves https:\n{}",
            replica.mirror.log()
        );
    }

    // Cold pulls through every replica at once: each blob's owner fetches it, the others ask
    // it over the peer channel.
    let dirs: Vec<_> = (0..3).map(|_| tempdir("pull-")).collect();
    let pulls = replicas.iter().zip(&dirs).map(|(replica, dir)| {
        let src = format!("docker://{}/team/app:v1", replica.mirror.host());
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
    let (mut forwards, mut fallbacks) = (0.0, 0.0);
    for replica in &replicas {
        let metrics = replica.metrics().await;
        forwards += sum(&metrics, "regmirror_cluster_forwards_total{");
        fallbacks += sum(&metrics, "regmirror_cluster_fallbacks_total{");
    }
    assert!(forwards > 0.0, "misses were forwarded to their owners");
    assert_eq!(fallbacks, 0.0, "every owner answered over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_refuses_clients_without_a_cluster_certificate() {
    let dir = tempdir("cluster-tls-refuse-");
    let ca = Ca::new(dir.path(), "cluster-ca");
    let other = Ca::new(dir.path(), "other-ca");
    let stranger = other.peer("stranger");
    let member = ca.peer("member");
    let garage = Garage::single().await;
    let upstream = Distribution::start().await;
    let replicas = tls_cluster(1, &upstream.url(), &garage, &ca).await;
    let replica = &replicas[0];
    let url = format!("https://{}{HEALTH}", replica.peer_address());

    // With a certificate of the cluster's CA the handshake passes and HTTP answers (an unsigned
    // request is refused by the signature check, a layer further in).
    let answer = peer_client(&ca.cert, Some(&member))
        .get(&url)
        .send()
        .await
        .expect("a cluster certificate gets past the handshake");
    assert!(answer.status().is_client_error(), "{}", answer.status());

    // Without one, or with one of another CA, there is no HTTP answer at all; the client may
    // see only the closed connection (TLS 1.3 sends the alert after the client's last flight),
    // so the replica's log says why.
    for (who, identity, why) in [
        ("no certificate", None, "peer sent no certificates"),
        (
            "a certificate of another CA",
            Some(&stranger),
            "invalid peer certificate: UnknownIssuer",
        ),
    ] {
        let result = peer_client(&ca.cert, identity).get(&url).send().await;
        assert!(result.is_err(), "{who}: an HTTP answer: {result:?}");
        // Only a hang-catcher: the line is written when the handshake fails.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !replica
            .mirror
            .log()
            .lines()
            .any(|l| l.contains("TLS handshake failed") && l.contains(why))
        {
            assert!(
                Instant::now() < deadline,
                "{who}: no log line saying {why:?}:\n{}",
                replica.mirror.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Plain HTTP gets no answer either.
    let plain = http()
        .get(format!("http://{}{HEALTH}", replica.peer_address()))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
}

/// `regmirror check-config` on `yaml`: exit code and everything it printed.
fn check_config(dir: &Path, yaml: &str) -> (i32, String) {
    let path = dir.join("regmirror.yml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_config_names_each_bad_cluster_tls_file() {
    let dir = tempdir("cluster-tls-check-");
    let ca = Ca::new(dir.path(), "cluster-ca");
    let peer = ca.peer("replica");
    let other = ca.peer("other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a PEM file\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let yaml = |cert: &Path, key: &Path, ca_file: &Path| {
        format!(
            "default_upstream: docker.io\n\
             upstreams:\n  docker.io: {{ url: 'https://registry-1.docker.io' }}\n\
             storage: {{ s3: {{ endpoint: 'http://127.0.0.1:9', bucket: b, access_key_id: k, secret_access_key: s }} }}\n\
             cluster: {{ peers: ['127.0.0.1:5001'], secret: 0123456789abcdef, tls: {{ cert: {cert:?}, key: {key:?}, ca: {ca_file:?} }} }}\n"
        )
    };
    let (code, out) = check_config(dir.path(), &yaml(&peer.cert, &peer.key, &ca.cert));
    assert_eq!(code, 0, "good files pass: {out}");

    let cases = [
        (
            yaml(&missing, &peer.key, &ca.cert),
            "cluster.tls.cert",
            "missing.pem",
        ),
        (
            yaml(&garbage, &peer.key, &ca.cert),
            "cluster.tls.cert",
            "no PEM certificate",
        ),
        (
            yaml(&peer.cert, &missing, &ca.cert),
            "cluster.tls.key",
            "missing.pem",
        ),
        (
            yaml(&peer.cert, &peer.cert, &ca.cert),
            "cluster.tls.key",
            "no PEM private key",
        ),
        (
            yaml(&peer.cert, &peer.key, &missing),
            "cluster.tls.ca",
            "missing.pem",
        ),
        (
            yaml(&peer.cert, &peer.key, &garbage),
            "cluster.tls.ca",
            "no PEM certificate",
        ),
        (
            yaml(&peer.cert, &other.key, &ca.cert),
            "cluster.tls.cert and cluster.tls.key",
            "",
        ),
    ];
    for (yaml, key, reason) in cases {
        let (code, out) = check_config(dir.path(), &yaml);
        assert_eq!(code, 2, "{yaml}\n{out}");
        assert!(out.contains(key), "names the key {key}: {out}");
        assert!(out.contains(reason), "gives the reason ({reason}): {out}");
        assert!(!out.contains("BEGIN"), "prints no file content: {out}");
    }
}
